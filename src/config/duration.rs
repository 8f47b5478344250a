//! Durations as config files write them: `250ms`, `5s`, `1m`, `1h`, `30d`, `2y`
//! (a year is 365 days), and compounds such as `1h30m`. Bare numbers are refused: `timeout: 5` could mean
//! seconds or milliseconds, and guessing wrong fails silently in production.

use std::fmt;
use std::time::Duration;

const HINT: &str = "write durations like 250ms, 5s, 1m, 1h, 30d, 2y or 1h30m";

/// Why a duration string was refused. `Display` names the input and shows the
/// expected form, so it can go straight into a config error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError {
    pub input: String,
    pub reason: &'static str,
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid duration {:?}: {}; {HINT}", self.input, self.reason)
    }
}

impl std::error::Error for DurationError {}

/// Units from largest to smallest, with their length in milliseconds.
const UNITS: [(&str, u64); 6] =
    [("y", 365 * 86_400_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

/// Parses `250ms`, `5s`, `1m`, `1h`, `30d`, `2y` and compounds like `1h30m`.
/// Units in a compound go from largest to smallest, each at most once.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let fail = |reason| DurationError { input: s.to_owned(), reason };
    let text = s.trim();
    if text.is_empty() {
        return Err(fail("it is empty"));
    }
    let mut rest = text;
    let mut total: u64 = 0;
    // Index into UNITS of the last unit seen; the next one must be smaller.
    let mut last_unit: Option<usize> = None;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(fail(match rest.as_bytes()[0] {
                b'-' => "negative durations are not allowed",
                b'.' => "fractions are not supported; use a smaller unit (1500ms, not 1.5s)",
                _ => "expected a number followed by a unit",
            }));
        }
        let (number, after) = rest.split_at(digits);
        let amount: u64 = number.parse().map_err(|_| fail("the number is too large"))?;
        let letters = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        if letters == 0 {
            return Err(fail(match after.as_bytes().first() {
                None if last_unit.is_none() => "a bare number has no unit",
                None => "the last number has no unit",
                Some(b'.') => "fractions are not supported; use a smaller unit (1500ms, not 1.5s)",
                Some(_) => "expected a unit (ms, s, m, h, d or y) after the number",
            }));
        }
        let (unit, after) = after.split_at(letters);
        let index = UNITS
            .iter()
            .position(|(name, _)| *name == unit)
            .ok_or_else(|| fail("unknown unit (use ms, s, m, h, d or y)"))?;
        if last_unit.is_some_and(|last| index <= last) {
            return Err(fail("units must go from largest to smallest, each at most once"));
        }
        last_unit = Some(index);
        let millis = amount
            .checked_mul(UNITS[index].1)
            .and_then(|m| total.checked_add(m))
            .ok_or_else(|| fail("it is too large"))?;
        total = millis;
        rest = after;
    }
    Ok(Duration::from_millis(total))
}

/// Writes a duration in the form `parse_duration` reads (`1h30m`, `250ms`,
/// `0s`); anything below a millisecond is dropped.
pub fn format_duration(d: Duration) -> String {
    let mut millis = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if millis == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (name, size) in UNITS {
        let amount = millis / size;
        if amount > 0 {
            out.push_str(&amount.to_string());
            out.push_str(name);
            millis -= amount * size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Duration {
        match parse_duration(s) {
            Ok(d) => d,
            Err(e) => panic!("{s:?} should parse: {e}"),
        }
    }

    fn err(s: &str) -> String {
        match parse_duration(s) {
            Ok(d) => panic!("{s:?} should be refused, got {d:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn duration_single_units_parse() {
        assert_eq!(ok("250ms"), Duration::from_millis(250));
        assert_eq!(ok("5s"), Duration::from_secs(5));
        assert_eq!(ok("1m"), Duration::from_secs(60));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("30d"), Duration::from_secs(30 * 86_400));
        assert_eq!(ok("2y"), Duration::from_secs(730 * 86_400));
        assert_eq!(ok(" 5s "), Duration::from_secs(5));
    }

    #[test]
    fn duration_zero_is_valid() {
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("0ms"), Duration::ZERO);
    }

    #[test]
    fn duration_compounds_parse() {
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("1d2h3m4s5ms"), Duration::from_millis(93_784_005));
        assert_eq!(ok("1s500ms"), Duration::from_millis(1500));
    }

    #[test]
    fn duration_bare_number_is_refused_with_the_expected_form() {
        let message = err("5");
        assert!(message.contains("no unit"), "{message}");
        assert!(message.contains("250ms, 5s, 1m, 1h, 30d"), "{message}");
        assert!(err("1h30").contains("no unit"));
    }

    #[test]
    fn duration_malformed_inputs_are_refused() {
        assert!(err("").contains("empty"));
        assert!(err("-5s").contains("negative"));
        assert!(err("1.5s").contains("fractions"));
        assert!(err("5x").contains("unknown unit"));
        assert!(err("5sec").contains("unknown unit"));
        assert!(err("s").contains("expected a number"));
        assert!(err("1m1h").contains("largest to smallest"));
        assert!(err("1m1m").contains("largest to smallest"));
        assert!(err("5 s").contains("unit"));
        assert!(err("99999999999999999999999s").contains("too large"));
        assert!(err("999999999999999d").contains("too large"));
        assert!(err("1d1y").contains("largest to smallest"));
    }

    #[test]
    fn duration_format_round_trips() {
        for s in ["0s", "250ms", "5s", "1m", "1h30m", "30d", "2y", "1y30d", "1d2h3m4s5ms"] {
            assert_eq!(format_duration(ok(s)), s);
        }
    }
}
