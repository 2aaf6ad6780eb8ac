//! Byte sizes written as `"64MiB"`, `"1.5GB"` or a plain integer of bytes: strata's one rule for sizes,
//! in config files, `--set`, `strata plan` and `strata-bench`.
//!
//! `kB`, `MB`, `GB`, `TB` are powers of 1000 (as DeepSpeed users, disk vendors and `--device-memory 80GB`
//! mean them); `KiB`, `MiB`, `GiB`, `TiB`, and the single letters `K`, `M`, `G`, `T` (as `dd bs=1M` and
//! nccl-tests write them), powers of 1024. Units are case-insensitive; `B` is one byte.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A number of bytes. In TOML: an integer, or a string with a unit (see the module's rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        ByteSize(n << 20)
    }
    pub const fn gib(n: u64) -> Self {
        ByteSize(n << 30)
    }
    pub fn bytes(self) -> u64 {
        self.0
    }
}

const UNITS: [(&str, u64); 13] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("T", 1 << 40),
    ("G", 1 << 30),
    ("M", 1 << 20),
    ("K", 1 << 10),
    ("B", 1),
];

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let unit = unit.trim();
        let multiplier = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(unit))
                .map(|(_, m)| *m)
                .ok_or_else(|| {
                    format!(
                        "`{s}`: unknown size unit `{unit}` (kB, MB, GB, TB are powers of 1000; \
                         KiB, MiB, GiB, TiB and K, M, G, T powers of 1024)"
                    )
                })?
        };
        let digits = number.replace('_', "");
        let not_a_size = || format!("`{s}` is not a size (examples: \"64MiB\", \"1.5GB\", 4096)");
        let too_large = || format!("`{s}` is beyond the largest size, {} bytes", u64::MAX);
        // Whole numbers exactly; fractions ("1.5GB") through f64, rounded to the byte.
        let bytes = if let Ok(whole) = digits.parse::<u64>() {
            whole.checked_mul(multiplier).ok_or_else(too_large)?
        } else {
            let number: f64 = digits.parse().map_err(|_| not_a_size())?;
            if !number.is_finite() || number < 0.0 {
                return Err(not_a_size());
            }
            let bytes = (number * multiplier as f64).round();
            if bytes >= u64::MAX as f64 {
                return Err(too_large());
            }
            bytes as u64
        };
        Ok(ByteSize(bytes))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, m) in UNITS.iter().filter(|(n, _)| n.contains('i')) {
            if self.0 >= *m && self.0 % m == 0 {
                return write!(f, "{}{}", self.0 / m, name);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"64MiB\" or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_plain_numbers() {
        assert_eq!("64MiB".parse::<ByteSize>().unwrap(), ByteSize(64 << 20));
        assert_eq!(
            "1.5GB".parse::<ByteSize>().unwrap(),
            ByteSize(1_500_000_000)
        );
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert_eq!("2 kib".parse::<ByteSize>().unwrap(), ByteSize(2048));
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("MiB".parse::<ByteSize>().is_err());
        // One rule: SI with B, IEC with iB and the single letters (dd, nccl-tests).
        for (text, bytes) in [
            ("80GB", 80_000_000_000),
            ("1MB", 1_000_000),
            ("1kB", 1_000),
            ("1M", 1 << 20),
            ("64K", 64 << 10),
            ("2T", 2 << 40),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
        for text in [
            "18446744073709551616",
            "20000000TiB",
            "1e30GB",
            "-1",
            "1.5.2GB",
        ] {
            assert!(text.parse::<ByteSize>().is_err(), "{text}");
        }
        assert_eq!(ByteSize(64 << 20).to_string(), "64MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }
}

/// A size, or `"auto"` (the setting's documented default behaviour).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SizeOrAuto {
    #[default]
    Auto,
    Size(ByteSize),
}

impl SizeOrAuto {
    /// The size in bytes, or None for `auto`.
    pub fn bytes(self) -> Option<u64> {
        match self {
            SizeOrAuto::Auto => None,
            SizeOrAuto::Size(s) => Some(s.bytes()),
        }
    }
}

impl Serialize for SizeOrAuto {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            SizeOrAuto::Auto => s.serialize_str("auto"),
            SizeOrAuto::Size(size) => size.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for SizeOrAuto {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(SizeOrAuto::Size(ByteSize(n))),
            Raw::Text(t) if t.trim().eq_ignore_ascii_case("auto") => Ok(SizeOrAuto::Auto),
            Raw::Text(t) => t
                .parse::<ByteSize>()
                .map(SizeOrAuto::Size)
                .map_err(|e| serde::de::Error::custom(format!("{e}, or \"auto\""))),
        }
    }
}
