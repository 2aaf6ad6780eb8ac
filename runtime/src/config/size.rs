//! Byte sizes written as `"64MiB"`, `"1.5GB"` or a plain integer of bytes.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A number of bytes. In TOML: an integer, or a string with a unit (`B`, `KB`, `KiB`, `MB`, `MiB`, `GB`, `GiB`, `TB`, `TiB`).
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

const UNITS: [(&str, u64); 9] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
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
                .find(|(name, _)| name.eq_ignore_ascii_case(unit) && name.len() == unit.len())
                .map(|(_, m)| *m)
                .ok_or_else(|| {
                    format!("`{s}`: unknown size unit `{unit}` (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
                })?
        };
        let number: f64 = number
            .replace('_', "")
            .parse()
            .map_err(|_| format!("`{s}` is not a size (examples: \"64MiB\", \"1.5GB\", 4096)"))?;
        if !number.is_finite() || number < 0.0 {
            return Err(format!("`{s}` is not a non-negative size"));
        }
        Ok(ByteSize((number * multiplier as f64).round() as u64))
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
