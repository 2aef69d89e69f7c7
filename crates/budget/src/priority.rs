//! Priority order: higher is more important; the lowest goes first (shed, killed, cut), and
//! ties are broken by name so every decision is deterministic.

use std::cmp::Ordering;

/// Orders `(priority, name)` pairs so that the first is the one to give up first: lowest
/// priority, then name in ascending order.
pub fn lowest_priority_first(a: (i64, &str), b: (i64, &str)) -> Ordering {
    a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_first_ties_by_name() {
        let mut v = vec![(5, "b"), (-1, "z"), (5, "a"), (10, "c")];
        v.sort_by(|a, b| lowest_priority_first(*a, *b));
        assert_eq!(v, vec![(-1, "z"), (5, "a"), (5, "b"), (10, "c")]);
    }
}
