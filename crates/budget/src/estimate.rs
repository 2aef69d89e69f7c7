//! How much memory an instance needs: the estimate from its model file, and the reservation
//! (`required`) that the budget, the ledger and the cgroup limit all use.

use crate::grammar::Size;

/// The knobs of the file-size rule (`[budget] estimate_factor`, `min_required`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EstimateRule {
    pub factor: f64,
    pub min_required: Size,
}

impl EstimateRule {
    /// `max(file size x factor, min_required)`, rounded up to a whole byte. The floor keeps tiny
    /// models from OOM-looping: a 0.6 MB model's worker still peaks at ~14 MB.
    pub fn estimate(&self, file_size: u64) -> u64 {
        let scaled = (file_size as f64 * self.factor).ceil();
        // f64 -> u64 saturates, so an absurd factor cannot wrap around to a small number.
        (scaled as u64).max(self.min_required.bytes())
    }
}

/// Reservations are whole multiples of this: the kernel keeps cgroup limits in pages (rounding
/// down), and 64 KiB is a multiple of every page size Linux uses, so the limit the kernel stores
/// is exactly the ledger's allocation.
pub const GRANULE: u64 = 64 << 10;

/// Rounds up to a whole [`GRANULE`].
pub fn align_up(bytes: u64) -> u64 {
    bytes.div_ceil(GRANULE).saturating_mul(GRANULE)
}

/// Rounds down to a whole [`GRANULE`].
pub fn align_down(bytes: u64) -> u64 {
    bytes / GRANULE * GRANULE
}

/// `max(ram_limit, estimate)`, rounded up to a whole [`GRANULE`]: a `ram_limit` may raise the
/// reservation but never lower it below what the model needs (a limit below the need only
/// produces OOM kills).
pub fn required(ram_limit: Option<Size>, estimate: u64) -> u64 {
    align_up(ram_limit.map_or(estimate, |l| l.bytes().max(estimate)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RULE: EstimateRule = EstimateRule {
        factor: 1.5,
        min_required: Size(64 << 20),
    };

    #[test]
    fn file_times_factor_with_a_floor() {
        assert_eq!(RULE.estimate(1 << 30), 3 << 29);
        assert_eq!(
            RULE.estimate(600_000),
            64 << 20,
            "tiny models get the floor"
        );
        assert_eq!(RULE.estimate(0), 64 << 20);
        assert_eq!(RULE.estimate(3), 64 << 20);
    }

    #[test]
    fn ram_limit_raises_but_never_lowers() {
        assert_eq!(required(None, 100), GRANULE);
        assert_eq!(required(Some(Size(50)), GRANULE), GRANULE);
        assert_eq!(required(Some(Size(5 * GRANULE)), 100), 5 * GRANULE);
        assert_eq!(
            required(Some(Size(5 * GRANULE + 1)), 100),
            6 * GRANULE,
            "rounded up to the granule"
        );
    }

    proptest! {
        #[test]
        fn estimate_is_monotonic_and_floored(a in 0u64..1 << 42, b in 0u64..1 << 42) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(RULE.estimate(lo) <= RULE.estimate(hi));
            prop_assert!(RULE.estimate(lo) >= RULE.min_required.bytes());
            prop_assert!(RULE.estimate(hi) >= hi);
        }
    }
}
