//! The valid range of every numeric option, as clap value parsers. They are the one definition
//! of each range: the command line runs them when it parses, and the recipe validator runs the
//! same clap definitions on every recipe value, so `--lr -1` and `lr = -1` are refused with the
//! same message (the flag and its range), before any work, as usage errors (exit 2).

use std::fmt;

/// A parser of counts of at least `min`: `--epochs`, `--batch-size` (1), `--warmup` (0).
pub fn count(min: usize) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |text| {
        let value: usize = text
            .trim()
            .parse()
            .map_err(|_| format!("expected a whole number of at least {min}"))?;
        if value < min {
            return Err(format!("must be at least {min}"));
        }
        Ok(value)
    }
}

/// An interval of the real line, written the usual way in messages: `[0, 1)`, `> 0`.
#[derive(Clone, Copy, Debug)]
pub struct Interval {
    low: f64,
    low_closed: bool,
    high: f64,
    high_closed: bool,
}

impl Interval {
    pub fn contains(&self, v: f64) -> bool {
        let above = if self.low_closed {
            v >= self.low
        } else {
            v > self.low
        };
        let below = if self.high_closed {
            v <= self.high
        } else {
            v < self.high
        };
        v.is_finite() && above && below
    }

    /// A parser of the finite numbers in this interval.
    pub fn parser(self) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
        move |text| {
            let value: f64 = text
                .trim()
                .parse()
                .map_err(|_| format!("expected a number {self}"))?;
            if !self.contains(value) {
                return Err(format!("must be {self}"));
            }
            Ok(value)
        }
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.high.is_infinite(), self.low_closed) {
            (true, true) => write!(f, "at least {}", self.low),
            (true, false) => write!(f, "greater than {}", self.low),
            (false, _) => write!(
                f,
                "in {}{}, {}{}",
                if self.low_closed { '[' } else { '(' },
                self.low,
                self.high,
                if self.high_closed { ']' } else { ')' }
            ),
        }
    }
}

/// `(low, high)`.
pub const fn open(low: f64, high: f64) -> Interval {
    Interval {
        low,
        low_closed: false,
        high,
        high_closed: false,
    }
}

/// `[low, high]`.
pub const fn closed(low: f64, high: f64) -> Interval {
    Interval {
        low,
        low_closed: true,
        high,
        high_closed: true,
    }
}

/// `[low, high)`.
pub const fn closed_open(low: f64, high: f64) -> Interval {
    Interval {
        low,
        low_closed: true,
        high,
        high_closed: false,
    }
}

/// `(low, high]`.
pub const fn open_closed(low: f64, high: f64) -> Interval {
    Interval {
        low,
        low_closed: false,
        high,
        high_closed: true,
    }
}

/// Learning rates, temperatures, widths: `> 0`.
pub const POSITIVE: Interval = open(0.0, f64::INFINITY);
/// Weight decay, penalties, epochs as positions: `>= 0`.
pub const NON_NEGATIVE: Interval = closed_open(0.0, f64::INFINITY);
/// A fraction removed or zeroed (sparsity, pruning ratio, label smoothing): `[0, 1)`.
pub const REMOVED_FRACTION: Interval = closed_open(0.0, 1.0);
/// A fraction kept (MAC and parameter targets, the step schedule's gamma): `(0, 1]`.
pub const KEPT_FRACTION: Interval = open_closed(0.0, 1.0);
/// A weight between two terms (distillation alpha): `[0, 1]`.
pub const WEIGHT: Interval = closed(0.0, 1.0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_refuse_values_below_the_minimum_and_say_so() {
        let p = count(1);
        assert_eq!(p("3"), Ok(3));
        assert_eq!(p("0"), Err("must be at least 1".to_string()));
        assert!(p("-1").unwrap_err().contains("at least 1"));
        assert_eq!(count(0)("0"), Ok(0));
    }

    #[test]
    fn intervals_check_their_bounds_and_print_them() {
        assert_eq!(REMOVED_FRACTION.to_string(), "in [0, 1)");
        assert_eq!(KEPT_FRACTION.to_string(), "in (0, 1]");
        assert_eq!(POSITIVE.to_string(), "greater than 0");
        assert_eq!(NON_NEGATIVE.to_string(), "at least 0");
        let p = REMOVED_FRACTION.parser();
        assert_eq!(p("0"), Ok(0.0));
        assert_eq!(p("1"), Err("must be in [0, 1)".to_string()));
        assert!(p("NaN").is_err());
        assert!(POSITIVE.parser()("0").is_err());
        assert!(POSITIVE.parser()("inf").is_err());
        assert_eq!(KEPT_FRACTION.parser()("1"), Ok(1.0));
        assert!(KEPT_FRACTION.parser()("0").is_err());
    }
}
