//! A canary's share of traffic: a fixed-point percentage with at most two decimals, held in basis points
//! (1/100 of a percent, so 12.5 % is 1250 and 100 % is 10 000, the hash's bucket count).
//!
//! It is read from the number's text, never through a float: `12.5`, `12.50` and `1.25e1` are 1250, and
//! `12.500000001`, `99.999999999` or `0.30000000000000004` (a ramp script's `0.1 * 3`) are refused, where
//! a float compared within a tolerance would round them to a neighbour. Written back, it is the shortest
//! decimal of the same value (`12.5`, `25`), so a round trip never changes it.

use std::fmt;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// Basis points in 100 %.
pub const FULL: u32 = 10_000;

/// What a percent may be, as error messages say it.
pub const ALLOWED: &str = "a number from 0 to 100 with at most two decimals";

/// A percentage from 0 to 100 with at most two decimals, exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Percent(u32);

impl Percent {
    pub const ZERO: Percent = Percent(0);
    pub const HUNDRED: Percent = Percent(FULL);

    /// From basis points; `None` above 100 %.
    pub fn from_basis_points(basis_points: u32) -> Option<Self> {
        (basis_points <= FULL).then_some(Percent(basis_points))
    }

    pub fn basis_points(self) -> u32 {
        self.0
    }

    /// Reads a JSON number's text (`-`, digits, an optional fraction and exponent) exactly. `None` when the
    /// text is not a JSON number, or its value is negative, over 100 or has more than two decimals.
    pub fn from_text(text: &str) -> Option<Self> {
        let (mantissa, exponent) = match text.find(['e', 'E']) {
            Some(at) => (text.get(..at)?, Some(text.get(at + 1..)?)),
            None => (text, None),
        };
        let (whole, fraction) = match mantissa.split_once('.') {
            Some((whole, fraction)) => (whole, Some(fraction)),
            None => (mantissa, None),
        };
        let unsigned = whole.strip_prefix('-').unwrap_or(whole);
        let is_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        // The JSON grammar: no leading zeros, digits after a point, an exponent of digits.
        if !is_digits(unsigned)
            || (unsigned.len() > 1 && unsigned.starts_with('0'))
            || !fraction.map_or(true, is_digits)
        {
            return None;
        }
        let fraction = fraction.unwrap_or("");
        // value = digits × 10^(exponent − fraction length); basis points = value × 100.
        let mut scale: i64 = 2 - i64::try_from(fraction.len()).ok()?;
        if let Some(exponent) = exponent {
            let exp_digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if !is_digits(exp_digits) {
                return None;
            }
            // An exponent beyond any percent's needs is capped at a bound that still decides the answer.
            let significant_exp = exp_digits.trim_start_matches('0');
            let magnitude: i64 = match significant_exp.len() {
                0 => 0,
                1..=9 => significant_exp.parse().ok()?,
                _ => 1_000_000_000,
            };
            scale += if exponent.starts_with('-') {
                -magnitude
            } else {
                magnitude
            };
        }
        let digits: String = format!("{unsigned}{fraction}");
        let significant = digits.trim_start_matches('0');
        if significant.is_empty() {
            // Zero, however written; but never "-0": a negative sign is not part of the contract.
            return (!whole.starts_with('-')).then_some(Percent(0));
        }
        if whole.starts_with('-') {
            return None;
        }
        let trimmed = significant.trim_end_matches('0');
        scale += i64::try_from(significant.len() - trimmed.len()).ok()?;
        if scale < 0 {
            return None; // more than two decimals
        }
        // At most five digits in all (10 000): anything longer is over 100 %.
        let total = i64::try_from(trimmed.len()).ok()?.checked_add(scale)?;
        if total > 5 {
            return None;
        }
        let mut value: u32 = trimmed.parse().ok()?;
        for _ in 0..scale {
            value = value.checked_mul(10)?;
        }
        Percent::from_basis_points(value)
    }
}

/// Basis points as the shortest decimal: 1250 → `12.5`, 1 → `0.01`, 2500 → `25` (also above 100 %, for
/// messages about a total).
pub fn decimal(basis_points: u32) -> String {
    let (whole, frac) = (basis_points / 100, basis_points % 100);
    match frac {
        0 => format!("{whole}"),
        _ if frac % 10 == 0 => format!("{whole}.{}", frac / 10),
        _ => format!("{whole}.{frac:02}"),
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&decimal(self.0))
    }
}

impl std::str::FromStr for Percent {
    type Err = String;

    /// The text of a percent as a user types it (`12.5`, also `12.5%`); the error is the contract's rule.
    fn from_str(text: &str) -> Result<Self, String> {
        let number = text.strip_suffix('%').unwrap_or(text);
        Percent::from_text(number).ok_or_else(|| {
            format!(
                "{} is not allowed: {ALLOWED}",
                crate::text::quote_value(text)
            )
        })
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.0 % 100 == 0 {
            serializer.serialize_u32(self.0 / 100)
        } else {
            // A two-decimal value's nearest f64 prints back as those two decimals (shortest round trip).
            serializer.serialize_f64(f64::from(self.0) / 100.0)
        }
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // With serde_json's `arbitrary_precision`, a Number keeps the text it was written as.
        let number = serde_json::Number::deserialize(deserializer)?;
        let text = number.as_str();
        Percent::from_text(text).ok_or_else(|| {
            de::Error::custom(format!(
                "{} is not allowed: {ALLOWED}",
                crate::text::cut(text)
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bp(text: &str) -> Option<u32> {
        Percent::from_text(text).map(Percent::basis_points)
    }

    #[test]
    fn two_decimals_are_read_exactly_however_written() {
        for (text, basis_points) in [
            ("0", 0),
            ("0.0", 0),
            ("0e5", 0),
            ("12.5", 1250),
            ("12.50", 1250),
            ("1.25e1", 1250),
            ("1250e-2", 1250),
            ("0.01", 1),
            ("0.29", 29),
            ("33.33", 3333),
            ("57.01", 5701),
            ("100", 10_000),
            ("100.00", 10_000),
            ("1E2", 10_000),
            ("0.1e+1", 100),
            ("99.99", 9999),
            ("5", 500),
            ("1e-2", 1),
            ("0.0000000000000000000000000000000000000000001e43", 100),
        ] {
            assert_eq!(bp(text), Some(basis_points), "{text}");
        }
    }

    #[test]
    fn more_decimals_more_than_100_negatives_and_non_numbers_are_refused() {
        for text in [
            "12.500000001",
            "99.999999999",
            "0.30000000000000004",
            "12.345",
            "0.001",
            "1e-3",
            "100.01",
            "100.5",
            "101",
            "1e3",
            "1.25e41",
            "1e99999999999999999999",
            "1e-99999999999999999999",
            "-1",
            "-0",
            "-0.0",
            "",
            "-",
            ".5",
            "5.",
            "05",
            "00",
            "1e",
            "1e+",
            "+1",
            "1_0",
            "NaN",
            "Infinity",
            "12.5%",
            " 12.5",
            "0x10",
        ] {
            assert_eq!(bp(text), None, "{text}");
        }
    }

    #[test]
    fn written_back_as_the_shortest_decimal() {
        for (basis_points, text) in [
            (0, "0"),
            (1, "0.01"),
            (10, "0.1"),
            (1250, "12.5"),
            (2500, "25"),
            (9999, "99.99"),
            (10_000, "100"),
        ] {
            let p = Percent::from_basis_points(basis_points).unwrap();
            assert_eq!(p.to_string(), text);
            assert_eq!(serde_json::to_string(&p).unwrap(), text);
        }
        // Every value survives a JSON round trip unchanged.
        for basis_points in 0..=FULL {
            let p = Percent::from_basis_points(basis_points).unwrap();
            let text = serde_json::to_string(&p).unwrap();
            assert_eq!(serde_json::from_str::<Percent>(&text).unwrap(), p, "{text}");
        }
    }

    #[test]
    fn from_str_takes_an_optional_percent_sign_and_names_the_rule() {
        assert_eq!("12.5%".parse::<Percent>().unwrap().basis_points(), 1250);
        assert_eq!(
            "0.30000000000000004".parse::<Percent>().unwrap_err(),
            "0.30000000000000004 is not allowed: a number from 0 to 100 with at most two decimals"
        );
        assert_eq!(
            "x\ny".parse::<Percent>().unwrap_err(),
            "\"x\\ny\" is not allowed: a number from 0 to 100 with at most two decimals"
        );
    }
}
