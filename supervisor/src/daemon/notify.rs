//! systemd integration through sd_notify (a no-op without NOTIFY_SOCKET): READY=1 once the
//! mode's instances are admitted, STATUS= kept current, WATCHDOG=1 at half of WATCHDOG_USEC from
//! the event loop itself (a wedged loop stops pinging and systemd restarts the unit), and
//! STOPPING=1 on shutdown.

use sd_notify::NotifyState;

use super::Daemon;
use super::instance::State;

impl Daemon {
    fn notify(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::debug!("sd_notify failed: {e}");
        }
    }

    pub(super) fn notify_ready(&mut self) {
        let status = self.summary();
        self.notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        self.last_status = status;
        if let Some(period) = sd_notify::watchdog_enabled() {
            self.watchdog = Some(period / 2);
            self.watchdog_at = Some(super::clock());
        }
    }

    /// Sends STATUS= when the summary changed.
    pub(super) fn notify_status(&mut self) {
        let status = self.summary();
        if status != self.last_status {
            self.notify(&[NotifyState::Status(&status)]);
            self.last_status = status;
        }
    }

    pub(super) fn notify_watchdog(&mut self) {
        self.notify(&[NotifyState::Watchdog]);
        self.watchdog_at = self
            .watchdog
            .map(|half| belljar_budget::lifecycle::later(super::clock(), half));
    }

    pub(super) fn notify_stopping(&self) {
        self.notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// One line: how many instances are in which state, and the pressure level.
    fn summary(&self) -> String {
        let mut counts: Vec<(&'static str, usize)> = Vec::new();
        for inst in self.instances.values() {
            let s = inst.state().as_str();
            match counts.iter_mut().find(|(k, _)| *k == s) {
                Some((_, n)) => *n += 1,
                None => counts.push((s, 1)),
            }
        }
        counts.sort_by_key(|(k, _)| if *k == State::Ready.as_str() { "" } else { k });
        let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
        format!(
            "{} instance(s): {}; memory pressure {}",
            self.instances.len(),
            if parts.is_empty() {
                "none".to_owned()
            } else {
                parts.join(", ")
            },
            self.level.as_str()
        )
    }
}
