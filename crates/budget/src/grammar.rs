//! The one grammar for sizes, durations and instance names, shared by the config file, the CLI
//! and the control socket.
//!
//! Sizes are base 1024 as in systemd (`8G` = `8GiB`); decimal-looking units (`8GB`) and lowercase
//! units are rejected with a hint, because a silent factor of 1.07 in a memory limit is exactly
//! the kind of mistake that ends in an OOM kill.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a size, duration or name was rejected. The message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    #[error("invalid size {input:?}: {hint}")]
    Size { input: String, hint: String },
    #[error("invalid duration {input:?}: {reason}; expected e.g. \"500ms\", \"10s\", \"5min\"")]
    Duration { input: String, reason: String },
    #[error(
        "invalid instance name {input:?}: {reason}; names are 1-63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit (e.g. \"subject\", \"llama-7b\")"
    )]
    Name { input: String, reason: String },
}

/// A number of bytes. Parsed from an integer (bytes) or a string such as `"1.5GiB"` / `"512M"`,
/// printed human-readably (`1.5 GiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Size(pub u64);

const UNITS: [(&str, &str); 8] = [
    ("K", "KiB"),
    ("M", "MiB"),
    ("G", "GiB"),
    ("T", "TiB"),
    ("KiB", "KiB"),
    ("MiB", "MiB"),
    ("GiB", "GiB"),
    ("TiB", "TiB"),
];

impl Size {
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// Parses the size grammar. Zero is accepted here; whether zero is allowed is the caller's
    /// decision (see [`Size::parse_nonzero`]).
    pub fn parse(input: &str) -> Result<Size, GrammarError> {
        let err = |hint: String| GrammarError::Size {
            input: input.to_owned(),
            hint,
        };
        let s = input.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = (&s[..split], s[split..].trim_start());
        if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
            return Err(err(if s.starts_with('-') {
                "sizes cannot be negative".into()
            } else {
                "expected a number followed by K, M, G, T, KiB, MiB, GiB or TiB (e.g. \"512MiB\", \"1.5G\")".into()
            }));
        }
        if number.matches('.').count() > 1 {
            return Err(err("the number has more than one decimal point".into()));
        }
        if unit.is_empty() {
            if number.contains('.') {
                return Err(err(
                    "a plain number is a count of bytes and cannot have a fraction; add a unit (e.g. \"1.5G\")"
                        .into(),
                ));
            }
            return number
                .parse::<u64>()
                .map(Size)
                .map_err(|_| err(too_large()));
        }
        let Some(power) = UNITS.iter().position(|(u, _)| *u == unit) else {
            return Err(err(unit_hint(number, unit)));
        };
        // Exact decimal arithmetic in u128, checked: a size past u64 is an error, never a
        // saturated (or wrapped) value. Fractions of a byte are dropped.
        let multiplier = 1u128 << (10 * (power % 4 + 1));
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let whole: u128 = whole.parse().map_err(|_| err(too_large()))?;
        // 19 digits keep the fraction exact to far below a byte at any unit.
        let digits = &fraction[..fraction.len().min(19)];
        let fraction_bytes = if digits.is_empty() {
            0
        } else {
            let scale = 10u128.pow(digits.len() as u32);
            digits.parse::<u128>().map_err(|_| err(too_large()))? * multiplier / scale
        };
        whole
            .checked_mul(multiplier)
            .and_then(|b| b.checked_add(fraction_bytes))
            .and_then(|b| u64::try_from(b).ok())
            .map(Size)
            .ok_or_else(|| err(too_large()))
    }

    /// Parses a size that must not be zero (most keys: a zero limit is never what was meant).
    pub fn parse_nonzero(input: &str) -> Result<Size, GrammarError> {
        let size = Size::parse(input)?;
        if size.0 == 0 {
            return Err(GrammarError::Size {
                input: input.to_owned(),
                hint: "must be greater than zero".into(),
            });
        }
        Ok(size)
    }
}

/// The hint for a size past what 64 bits hold.
fn too_large() -> String {
    "the size is too large: sizes are at most 16 EiB (18446744073709551615 bytes, or \"16777215T\")"
        .into()
}

/// The hint for a unit outside the grammar: point at the base-1024 spelling that was probably
/// meant.
fn unit_hint(number: &str, unit: &str) -> String {
    let upper = unit.to_ascii_uppercase();
    let letter = upper.chars().next().filter(|c| "KMGT".contains(*c));
    match (letter, upper.as_str()) {
        (Some(l), _) if upper.len() == 2 && upper.ends_with('B') => {
            format!("sizes are base 1024: did you mean {number}{l}iB?")
        }
        (Some(l), _) if upper == format!("{l}IB") || upper.len() == 1 => {
            format!("units are case-sensitive: did you mean {number}{l}iB or {number}{l}?")
        }
        (None, "B") => format!("write a count of bytes as a plain integer: {number}"),
        _ => format!(
            "unknown unit {unit:?}; expected K, M, G, T, KiB, MiB, GiB or TiB (base 1024, e.g. \"{number}GiB\")"
        ),
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}

impl FromStr for Size {
    type Err = GrammarError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Size::parse(s)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

/// Deserializes an integer (bytes) or a size string. Zero passes; keys that forbid it check.
impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a size: an integer number of bytes or a string like \"512MiB\" or \"1.5G\"",
                )
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("invalid size {v}: sizes cannot be negative")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Size, E> {
                Err(E::custom(format!(
                    "invalid size {v}: a number is a count of bytes and cannot have a fraction; write a string with a unit (e.g. \"{v}G\")"
                )))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                Size::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration in humantime syntax (`"500ms"`, `"10s"`, `"5min"`), printed the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(input: &str) -> Result<HumanDuration, GrammarError> {
        humantime::parse_duration(input.trim())
            .map(HumanDuration)
            .map_err(|e| GrammarError::Duration {
                input: input.to_owned(),
                reason: e.to_string(),
            })
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string like \"500ms\", \"10s\" or \"5min\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                HumanDuration::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// A validated instance name: `[a-z0-9][a-z0-9_-]{0,62}`. Names become cgroup directories and
/// file names, so nothing else (no `/`, no `..`, no uppercase) gets through.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct InstanceName(String);

impl InstanceName {
    pub const MAX_LEN: usize = 63;

    pub fn parse(input: &str) -> Result<InstanceName, GrammarError> {
        let err = |reason: &str| GrammarError::Name {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let first = input.chars().next().ok_or_else(|| err("it is empty"))?;
        if input.len() > Self::MAX_LEN {
            return Err(err("it is longer than 63 characters"));
        }
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return Err(err("it must start with a lowercase letter or a digit"));
        }
        if let Some(bad) = input
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
        {
            return Err(err(&format!("character {bad:?} is not allowed")));
        }
        Ok(InstanceName(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for InstanceName {
    type Err = GrammarError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        InstanceName::parse(s)
    }
}

impl<'de> Deserialize<'de> for InstanceName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        InstanceName::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn sizes_are_base_1024() {
        assert_eq!(Size::parse("8G").unwrap(), Size(8 * GIB));
        assert_eq!(Size::parse("8GiB").unwrap(), Size(8 * GIB));
        assert_eq!(Size::parse("1.5G").unwrap(), Size(3 * GIB / 2));
        assert_eq!(Size::parse("512MiB").unwrap(), Size(512 << 20));
        assert_eq!(Size::parse("64K").unwrap(), Size(64 << 10));
        assert_eq!(Size::parse("1T").unwrap(), Size(1 << 40));
        assert_eq!(Size::parse("1024").unwrap(), Size(1024));
        assert_eq!(Size::parse("1.5 GiB").unwrap(), Size(3 * GIB / 2));
        assert_eq!(Size::parse("0").unwrap(), Size(0));
    }

    #[test]
    fn decimal_units_are_rejected_with_a_hint() {
        let e = Size::parse("8GB").unwrap_err().to_string();
        assert!(e.contains("sizes are base 1024: did you mean 8GiB?"), "{e}");
        let e = Size::parse("500MB").unwrap_err().to_string();
        assert!(e.contains("did you mean 500MiB?"), "{e}");
        let e = Size::parse("8gb").unwrap_err().to_string();
        assert!(e.contains("did you mean 8GiB?"), "{e}");
    }

    #[test]
    fn a_size_past_16_eib_is_an_error_not_a_saturated_value() {
        for bad in [
            "99999999999T",
            "16777216T",
            "17179869184G",
            "18446744073709551616",
        ] {
            let e = Size::parse(bad).unwrap_err().to_string();
            assert!(e.contains("too large"), "{bad}: {e}");
            assert!(e.contains("16 EiB"), "{bad}: {e}");
        }
        // The largest sizes still parse exactly.
        assert_eq!(Size::parse("16777215T").unwrap(), Size(16_777_215 << 40));
        assert_eq!(Size::parse("18446744073709551615").unwrap(), Size(u64::MAX));
        assert_eq!(Size::parse("0.5K").unwrap(), Size(512));
        assert_eq!(Size::parse("1.5G").unwrap(), Size(3 << 29));
        assert_eq!(Size::parse("0.1K").unwrap(), Size(102));
    }

    #[test]
    fn lowercase_units_are_rejected() {
        for bad in ["8g", "8gib", "8m", "2k"] {
            let e = Size::parse(bad).unwrap_err().to_string();
            assert!(e.contains("case-sensitive"), "{bad}: {e}");
        }
    }

    #[test]
    fn malformed_sizes_are_rejected() {
        for bad in [
            "",
            "G",
            "-1G",
            "1.2.3G",
            "1.G",
            ".5G",
            "1.5",
            "8X",
            "99999999999999999999",
        ] {
            assert!(Size::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(
            Size::parse("-1G")
                .unwrap_err()
                .to_string()
                .contains("negative")
        );
        assert!(
            Size::parse_nonzero("0")
                .unwrap_err()
                .to_string()
                .contains("greater than zero")
        );
        assert!(Size::parse_nonzero("0G").is_err());
    }

    #[test]
    fn sizes_print_human_readably() {
        assert_eq!(Size(3 * GIB / 2).to_string(), "1.5 GiB");
        assert_eq!(Size(512 << 20).to_string(), "512.0 MiB");
        assert_eq!(Size(100).to_string(), "100 B");
    }

    #[test]
    fn durations_use_humantime() {
        assert_eq!(
            HumanDuration::parse("500ms").unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            HumanDuration::parse("5min").unwrap().0,
            Duration::from_secs(300)
        );
        assert_eq!(HumanDuration::parse("10s").unwrap().to_string(), "10s");
        let e = HumanDuration::parse("10 parsecs").unwrap_err().to_string();
        assert!(e.contains("expected e.g."), "{e}");
    }

    #[test]
    fn instance_names() {
        let (long_ok, too_long) = ("x".repeat(63), "x".repeat(64));
        for ok in ["subject", "a", "0", "llama-7b_q4", &long_ok] {
            assert!(InstanceName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../../etc",
            "Subject",
            "-a",
            "_a",
            "a b",
            "a/b",
            "a.b",
            &too_long,
        ] {
            assert!(InstanceName::parse(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn every_unit_spelling_scales_by_1024(n in 0u64..100_000, unit in 0usize..8) {
            let (u, _) = UNITS[unit];
            let shift = 10 * (1 + (unit % 4) as u32);
            prop_assert_eq!(Size::parse(&format!("{n}{u}")).unwrap(), Size(n << shift));
        }

        #[test]
        fn parsing_never_panics(s in "\\PC{0,16}") {
            let _ = Size::parse(&s);
            let _ = InstanceName::parse(&s);
            let _ = HumanDuration::parse(&s);
        }

        #[test]
        fn valid_names_round_trip(s in "[a-z0-9][a-z0-9_-]{0,62}") {
            let name = InstanceName::parse(&s).unwrap();
            prop_assert_eq!(name.as_str(), s.as_str());
        }
    }
}
