//! The valid range of every numeric option, as clap value parsers. They are the one definition
//! of each range: the command line runs them when it parses, and the recipe validator runs the
//! same clap definitions on every recipe value, so `--lr -1` and `lr = -1` are refused with the
//! same message (the flag and its range), before any work, as usage errors (exit 2).
//!
//! Sizes, counts and epochs also have upper bounds (`MAX_*`): far beyond any real run, they
//! exist so that a typo (`epochs = 1000000000`, `batch_size = 10000000`) is refused at once
//! with its flag or recipe line, instead of starting work that allocates or runs forever.

use std::fmt;

/// Passes over the data, and epochs as positions in a schedule (warm-up, pruning, freezing).
pub const MAX_EPOCHS: usize = 10_000;
/// Images per batch.
pub const MAX_BATCH: usize = 65_536;
/// Image counts: data subsets, calibration sets (ImageNet's training split is 1.28 M images).
pub const MAX_IMAGES: usize = 10_000_000;
/// An input height or width, or a crop padding, in pixels.
pub const MAX_INPUT_SIZE: usize = 4096;
/// Channel counts and their rounding.
pub const MAX_CHANNELS: usize = 65_536;
/// Output classes (ImageNet-21k has 21,841).
pub const MAX_CLASSES: usize = 100_000;
/// Steps or batches: mask-update intervals, gradient batches, timed iterations.
pub const MAX_STEPS: usize = 100_000_000;

/// A parser of counts of at least `min` with no bound of their own (seeds of sizes that
/// another check bounds, thread counts).
pub fn count(min: usize) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    count_in(min, usize::MAX)
}

/// A parser of counts in `[min, max]`: `--epochs` (1 to [`MAX_EPOCHS`]), `--warmup` (0 to
/// [`MAX_STEPS`]).
pub fn count_in(
    min: usize,
    max: usize,
) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |text| {
        let expected = || match max {
            usize::MAX => format!("expected a whole number of at least {min}"),
            _ => format!("expected a whole number in [{min}, {max}]"),
        };
        // A number too large for the type is out of range too, not "not a number".
        let text = text.trim();
        let value: usize = match text.parse() {
            Ok(v) => v,
            Err(_)
                if max != usize::MAX
                    && !text.is_empty()
                    && text.bytes().all(|b| b.is_ascii_digit()) =>
            {
                return Err(format!("must be at most {max}"));
            }
            Err(_) => return Err(expected()),
        };
        if value < min {
            return Err(format!("must be at least {min}"));
        }
        if value > max {
            return Err(format!("must be at most {max}"));
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
/// A position in epochs, fractions allowed (warm-up length, pruning start and end):
/// `[0, MAX_EPOCHS]`.
pub const EPOCH_POSITION: Interval = closed(0.0, MAX_EPOCHS as f64);

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
    fn bounded_counts_refuse_values_above_the_maximum_and_say_so() {
        let p = count_in(1, MAX_EPOCHS);
        assert_eq!(p("10000"), Ok(10_000));
        assert_eq!(p("10001"), Err("must be at most 10000".to_string()));
        assert_eq!(p("1000000000"), Err("must be at most 10000".to_string()));
        // Beyond u64: still "too large", not "not a number".
        assert_eq!(
            p("99999999999999999999999"),
            Err("must be at most 10000".to_string())
        );
        assert_eq!(p("0"), Err("must be at least 1".to_string()));
        assert_eq!(
            p("ten"),
            Err("expected a whole number in [1, 10000]".to_string())
        );
        assert_eq!(EPOCH_POSITION.to_string(), "in [0, 10000]");
        assert!(EPOCH_POSITION.parser()("1e9").is_err());
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
