//! Layer 3: the pre-load headroom check, run right before a model is loaded (by the worker
//! itself, and by the supervisor before every restart).

use serde::Serialize;

use crate::grammar::Size;
use crate::validate::HostMemory;

/// Host usage above which a passing check still warns.
pub const HIGH_USAGE_PERCENT: f64 = 75.0;

/// The outcome of the pre-load check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Precheck {
    pub ok: bool,
    pub required: u64,
    pub headroom: u64,
    pub available: u64,
    /// How much more would have to be available (0 when ok).
    pub shortfall: u64,
    pub warning: Option<String>,
}

impl Precheck {
    /// One line with the numbers, for logs and refusal messages.
    pub fn summary(&self) -> String {
        let verdict = if self.ok { "ok" } else { "refused" };
        let mut s = format!(
            "pre-load check {verdict}: available {} vs required {} + headroom {}",
            Size(self.available),
            Size(self.required),
            Size(self.headroom)
        );
        if !self.ok {
            s.push_str(&format!(
                "; short by {} (free memory or lower [budget] headroom)",
                Size(self.shortfall)
            ));
        }
        if let Some(w) = &self.warning {
            s.push_str("; ");
            s.push_str(w);
        }
        s
    }
}

/// ok only if `available >= required + headroom`; warns when the host is above 75% used.
pub fn precheck(required: u64, headroom: u64, reading: HostMemory) -> Precheck {
    let needed = required.saturating_add(headroom);
    let usage = reading.usage_percent();
    Precheck {
        ok: reading.available >= needed,
        required,
        headroom,
        available: reading.available,
        shortfall: needed.saturating_sub(reading.available),
        warning: (usage > HIGH_USAGE_PERCENT)
            .then(|| format!("host memory is {usage:.0}% used (above {HIGH_USAGE_PERCENT}%)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const GIB: u64 = 1 << 30;

    #[test]
    fn headroom_is_required_on_top() {
        let r = HostMemory {
            total: 16 * GIB,
            available: 4 * GIB,
        };
        let p = precheck(2 * GIB, 2 * GIB, r);
        assert!(p.ok, "exactly enough passes");
        assert_eq!(p.shortfall, 0);
        let p = precheck(2 * GIB + 1, 2 * GIB, r);
        assert!(!p.ok);
        assert_eq!(p.shortfall, 1);
        assert!(p.summary().contains("short by 1 B"), "{}", p.summary());
        assert!(p.warning.is_none(), "exactly 75% used does not warn");
    }

    #[test]
    fn warning_only_above_threshold() {
        let r = HostMemory {
            total: 100,
            available: 25,
        };
        assert!(
            precheck(0, 0, r).warning.is_none(),
            "exactly 75% does not warn"
        );
        let r = HostMemory {
            total: 100,
            available: 24,
        };
        assert!(precheck(0, 0, r).warning.is_some());
    }

    #[test]
    fn no_overflow() {
        let r = HostMemory {
            total: u64::MAX,
            available: u64::MAX,
        };
        assert!(precheck(u64::MAX, u64::MAX, r).ok);
    }
}
