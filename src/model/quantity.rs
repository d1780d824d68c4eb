//! Sizes as Kubernetes writes them: `1Gi`, `500M`, `1073741824`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A byte count parsed from a Kubernetes-style quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity(pub u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid size {input:?}: {why} (write a whole number of bytes, or one with a suffix: Ki Mi Gi Ti Pi Ei or k M G T P E, e.g. 500Gi)")]
pub struct QuantityError {
    pub input: String,
    pub why: &'static str,
}

impl FromStr for Quantity {
    type Err = QuantityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| QuantityError {
            input: s.to_string(),
            why,
        };
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, suffix) = t.split_at(split);
        if num.is_empty() {
            return Err(err("no number"));
        }
        let n: u64 = num.parse().map_err(|_| err("number too large"))?;
        let mult: u64 = match suffix {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            "Pi" => 1 << 50,
            "Ei" => 1 << 60,
            "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            "P" => 1_000_000_000_000_000,
            "E" => 1_000_000_000_000_000_000,
            _ => return Err(err("unknown suffix")),
        };
        n.checked_mul(mult)
            .map(Quantity)
            .ok_or_else(|| err("larger than 16 EiB"))
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Quantity(n)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_bytes(self.0))
    }
}

/// Human size with binary units and one decimal, e.g. `320.0 MiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut v = n as f64;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Bytes as an exact Kubernetes quantity, with the largest binary suffix that
/// divides them (`268435456` → `256Mi`), so `kubectl get pv` reads well.
pub fn exact(bytes: u64) -> String {
    for (shift, suffix) in [(50, "Pi"), (40, "Ti"), (30, "Gi"), (20, "Mi"), (10, "Ki")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_suffixes() {
        assert_eq!("1Gi".parse(), Ok(Quantity(1 << 30)));
        assert_eq!("320Mi".parse(), Ok(Quantity(320 << 20)));
        assert_eq!("8Ti".parse(), Ok(Quantity(8 << 40)));
        assert_eq!("500G".parse(), Ok(Quantity(500_000_000_000)));
        assert_eq!("4096".parse(), Ok(Quantity(4096)));
    }

    #[test]
    fn rejects_garbage_with_a_hint() {
        let e = "1GB".parse::<Quantity>().unwrap_err();
        assert_eq!(e.why, "unknown suffix");
        assert!(e.to_string().contains("500Gi"));
        assert!("Gi".parse::<Quantity>().is_err());
        assert!("-1Gi".parse::<Quantity>().is_err());
        assert!("1.5Gi".parse::<Quantity>().is_err());
        assert_eq!(
            "20Ei".parse::<Quantity>().unwrap_err().why,
            "larger than 16 EiB"
        );
    }

    #[test]
    fn formats_binary_units() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(320 << 20), "320.0 MiB");
        assert_eq!(format_bytes(3 << 39), "1.5 TiB");
    }
}
