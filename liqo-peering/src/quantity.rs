//! Kubernetes resource quantities as exact integers, for offer and quota arithmetic.
//!
//! A quantity is held as thousandths of its unit (`1` CPU = 1000, `1Ki` = 1 024 000), which is
//! exact for every suffix Kubernetes uses down to milli; `u` and `n` round up, as the API server
//! does when it canonicalises.

use std::fmt;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// A quantity could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid quantity {input:?}: {reason}")]
pub struct QuantityError {
    /// The rejected text.
    pub input: String,
    /// Why.
    pub reason: &'static str,
}

/// A quantity in thousandths of its unit (never negative).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Milli(pub i128);

impl Milli {
    /// Zero.
    pub const ZERO: Milli = Milli(0);

    /// Parses a Kubernetes quantity such as `500m`, `4`, `1.5Gi`, `2e3`.
    pub fn parse(q: &str) -> Result<Self, QuantityError> {
        let err = |reason| QuantityError {
            input: q.to_owned(),
            reason,
        };
        let s = q.trim();
        let (negative, s) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, suffix) = s.split_at(split);
        if number.is_empty() || number == "." {
            return Err(err("no number"));
        }
        let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
        if frac_part.contains('.') {
            return Err(err("more than one decimal point"));
        }
        if int_part.len() + frac_part.len() > 30 {
            return Err(err("too many digits"));
        }
        let mut mantissa: i128 = 0;
        for d in int_part.bytes().chain(frac_part.bytes()) {
            mantissa = mantissa * 10 + i128::from(d - b'0');
        }
        // value = mantissa / 10^frac * num / den; in milli: * 1000.
        let pow10 = |e: u32| 10i128.checked_pow(e).ok_or(err("exponent out of range"));
        let (num, den): (i128, i128) = match suffix {
            "" => (1, 1),
            "n" => (1, 1_000_000_000),
            "u" => (1, 1_000_000),
            "m" => (1, 1000),
            "k" => (1000, 1),
            "M" => (pow10(6)?, 1),
            "G" => (pow10(9)?, 1),
            "T" => (pow10(12)?, 1),
            "P" => (pow10(15)?, 1),
            "E" => (pow10(18)?, 1),
            "Ki" => (1 << 10, 1),
            "Mi" => (1 << 20, 1),
            "Gi" => (1 << 30, 1),
            "Ti" => (1 << 40, 1),
            "Pi" => (1 << 50, 1),
            "Ei" => (1 << 60, 1),
            e if e.starts_with(['e', 'E']) => {
                let exp: i32 = e[1..].parse().map_err(|_| err("bad exponent"))?;
                if exp.unsigned_abs() > 18 {
                    return Err(err("exponent out of range"));
                }
                if exp >= 0 {
                    (pow10(exp.unsigned_abs())?, 1)
                } else {
                    (1, pow10(exp.unsigned_abs())?)
                }
            }
            _ => return Err(err("unknown suffix")),
        };
        let frac_digits = u32::try_from(frac_part.len()).map_err(|_| err("too many digits"))?;
        let numerator = mantissa
            .checked_mul(num)
            .and_then(|v| v.checked_mul(1000))
            .ok_or(err("too large"))?;
        let denominator = pow10(frac_digits)?
            .checked_mul(den)
            .ok_or(err("too precise"))?;
        let value = (numerator + denominator - 1) / denominator;
        if negative && value != 0 {
            return Err(err("negative"));
        }
        Ok(Milli(value))
    }

    /// Parses a [`Quantity`].
    pub fn of(q: &Quantity) -> Result<Self, QuantityError> {
        Self::parse(&q.0)
    }

    /// `self - other`, never below zero.
    pub fn saturating_sub(self, other: Milli) -> Milli {
        Milli((self.0 - other.0).max(0))
    }

    /// `self * percent / 100`, rounded down.
    pub fn percent(self, percent: u8) -> Milli {
        Milli(self.0 * i128::from(percent) / 100)
    }

    /// Whole units, rounded down (e.g. for a pod count).
    pub fn whole_units(self) -> i128 {
        self.0 / 1000
    }

    /// As a [`Quantity`]: whole units when exact, else milli-units.
    pub fn to_quantity(self) -> Quantity {
        Quantity(self.to_string())
    }
}

impl std::ops::Add for Milli {
    type Output = Milli;
    fn add(self, rhs: Milli) -> Milli {
        Milli(self.0.saturating_add(rhs.0))
    }
}

impl std::iter::Sum for Milli {
    fn sum<I: Iterator<Item = Milli>>(iter: I) -> Milli {
        iter.fold(Milli::ZERO, |a, b| a + b)
    }
}

impl fmt::Display for Milli {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 % 1000 == 0 {
            write!(f, "{}", self.0 / 1000)
        } else {
            write!(f, "{}m", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_suffix_exactly() {
        let cases = [
            ("4", 4000),
            ("500m", 500),
            ("1.5", 1500),
            ("0.1", 100),
            ("1k", 1_000_000),
            ("1Ki", 1_024_000),
            ("1.5Gi", 1_610_612_736_000),
            ("2M", 2_000_000_000),
            ("1e3", 1_000_000),
            ("1E-3", 1),
            ("250u", 1),
            ("1n", 1),
            ("0", 0),
            ("+3", 3000),
        ];
        for (text, milli) in cases {
            assert_eq!(Milli::parse(text).unwrap(), Milli(milli), "{text}");
        }
    }

    #[test]
    fn rejects_garbage_with_reason() {
        for (text, why) in [
            ("", "no number"),
            ("abc", "no number"),
            ("1.2.3", "decimal point"),
            ("4Xi", "unknown suffix"),
            ("-1", "negative"),
            ("1e99", "exponent"),
        ] {
            let e = Milli::parse(text).unwrap_err();
            assert!(e.to_string().contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn formats_round_trip_and_arithmetic() {
        assert_eq!(Milli(4000).to_string(), "4");
        assert_eq!(Milli(1500).to_string(), "1500m");
        assert_eq!(
            Milli::parse(&Milli(1_610_612_736_000).to_string()).unwrap(),
            Milli(1_610_612_736_000)
        );
        assert_eq!(Milli(1000).saturating_sub(Milli(3000)), Milli::ZERO);
        assert_eq!(Milli(8000).percent(25), Milli(2000));
        assert_eq!(Milli(2999).whole_units(), 2);
        assert_eq!([Milli(1), Milli(2)].into_iter().sum::<Milli>(), Milli(3));
    }
}
