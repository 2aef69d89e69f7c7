//! The kinds of lifecycle event: one journal entry each, with the same words as `status` and a
//! stable journal `MESSAGE_ID` per kind (listed in docs/operations.md).

/// The kinds of lifecycle event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Spawned,
    Loading,
    Ready,
    Exited,
    OomKill,
    RestartScheduled,
    WaitingForMemory,
    Failed,
    NotAdmitted,
    Watchdog,
    LimitRaised,
    Shed,
    Restored,
    Thrashing,
    ThrashingCleared,
    PressureLevel,
    Added,
    Removed,
    RestartRequested,
    GpuFallback,
    GpuRestored,
    GpuReleaseTimeout,
    OutputSuppressed,
    Started,
    Stopped,
}

impl Event {
    pub const ALL: [Event; 25] = [
        Event::Spawned,
        Event::Loading,
        Event::Ready,
        Event::Exited,
        Event::OomKill,
        Event::RestartScheduled,
        Event::WaitingForMemory,
        Event::Failed,
        Event::NotAdmitted,
        Event::Watchdog,
        Event::LimitRaised,
        Event::Shed,
        Event::Restored,
        Event::Thrashing,
        Event::ThrashingCleared,
        Event::PressureLevel,
        Event::Added,
        Event::Removed,
        Event::RestartRequested,
        Event::GpuFallback,
        Event::GpuRestored,
        Event::GpuReleaseTimeout,
        Event::OutputSuppressed,
        Event::Started,
        Event::Stopped,
    ];

    /// The `EVENT` field: the words of `status` where a state has the same name.
    pub fn word(self) -> &'static str {
        match self {
            Event::Spawned => "spawned",
            Event::Loading => "loading",
            Event::Ready => "ready",
            Event::Exited => "exited",
            Event::OomKill => "oom-kill",
            Event::RestartScheduled => "restart-scheduled",
            Event::WaitingForMemory => "waiting-for-memory",
            Event::Failed => "failed",
            Event::NotAdmitted => "not-admitted",
            Event::Watchdog => "watchdog",
            Event::LimitRaised => "limit-raised",
            Event::Shed => "shed",
            Event::Restored => "restored",
            Event::Thrashing => "thrashing",
            Event::ThrashingCleared => "thrashing-cleared",
            Event::PressureLevel => "pressure-level",
            Event::Added => "added",
            Event::Removed => "removed",
            Event::RestartRequested => "restart-requested",
            Event::GpuFallback => "gpu-fallback",
            Event::GpuRestored => "gpu-restored",
            Event::GpuReleaseTimeout => "gpu-release-timeout",
            Event::OutputSuppressed => "output-suppressed",
            Event::Started => "started",
            Event::Stopped => "stopped",
        }
    }

    /// The journal `MESSAGE_ID` (128 bits, as `journalctl --new-id128` prints them). Stable:
    /// alert rules and saved queries depend on them; never reuse or change one.
    pub fn message_id(self) -> &'static str {
        match self {
            Event::Spawned => "f7e217e10eee407eb5a4c7deba93b416",
            Event::Loading => "4ced3133fb3542eb8a02abf6735215f6",
            Event::Ready => "b30987f0bc804ecf8a7bac0973a1c67e",
            Event::Exited => "2912ddede29c441a9c870d0c160aa32e",
            Event::OomKill => "db4f01205a8c4f648b234234efc761e2",
            Event::RestartScheduled => "b32491e1b96e4ed4a86d0f879d2f99bb",
            Event::WaitingForMemory => "4cad32d548e046c39741319c9ed0f0c5",
            Event::Failed => "6d13cc8941684717af01265bb0b2e545",
            Event::NotAdmitted => "16729a20d6564ccaabf19335b2d325f6",
            Event::Watchdog => "411d024c64444581a474b451fd1f22be",
            Event::LimitRaised => "22d21a2cfdb1457987a864baf03694d2",
            Event::Shed => "8eb6a2501eb84e1cba32211d138bb86d",
            Event::Restored => "ff1baa6dc75e420f91b86d28203f78f3",
            Event::Thrashing => "bbf9baa179814d99b3a06c56b5e8723e",
            Event::ThrashingCleared => "84e857200be04e368e19a4b1ff8b2b6b",
            Event::PressureLevel => "405a42dfabb84617b71c35b54ac3a79a",
            Event::Added => "ec592417f78b41afa76cd8a471418ae6",
            Event::Removed => "38aa2d39e05b474cbd4f10efb39d4e14",
            Event::RestartRequested => "043a11ce996745aabbf6257ca5dbf7db",
            Event::GpuFallback => "50294221a6a44b9dba4db5550703db57",
            Event::GpuRestored => "f9e697128a394cd3be4f6503a547767b",
            Event::GpuReleaseTimeout => "9042af19e0664e9395b35dc83d355efe",
            Event::OutputSuppressed => "3d9b5e53e348445795ae9ce0e600261b",
            Event::Started => "9a93f28c83ec4fe897900bf8da120eeb",
            Event::Stopped => "58f3f4a1f07e4b8c9d7c1a3e5b2d6f80",
        }
    }
}
