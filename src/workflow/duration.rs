//! Durations as users write them in workflows: `"500ms"`, `"3s"`, `"10m"`, `"2h"`,
//! `"1d"` and compounds such as `"1h30m"`.

use std::time::Duration;

const UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// Parses a duration; the error message is lowercase and meant to follow a field name.
///
/// Units must appear from largest to smallest, each at most once (`"1h30m"`, not
/// `"30m1h"` or `"1m1m"`), so one duration has one spelling. Overflow is an error.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.is_empty() {
        return Err("must not be empty".into());
    }
    let mut rest = text;
    let mut total_ms: u64 = 0;
    // Index into UNITS of the next unit allowed, enforcing the largest-first order.
    let mut next_unit = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "invalid duration \"{text}\": expected a number at \"{rest}\" (e.g. \"10m\", \"1h30m\", \"500ms\")"
            ));
        }
        let (number, after) = rest.split_at(digits);
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(unit_len);
        let position = UNITS.iter().position(|(name, _)| *name == unit).ok_or_else(|| {
            if unit.is_empty() {
                format!("invalid duration \"{text}\": missing unit after \"{number}\" (ms, s, m, h or d)")
            } else {
                format!("invalid duration \"{text}\": unknown unit \"{unit}\" (ms, s, m, h or d)")
            }
        })?;
        if position < next_unit {
            return Err(format!(
                "invalid duration \"{text}\": units must go from largest to smallest, each once"
            ));
        }
        next_unit = position + 1;
        let too_large = || format!("invalid duration \"{text}\": too large");
        let value: u64 = number.parse().map_err(|_| too_large())?;
        let ms = value.checked_mul(UNITS[position].1).ok_or_else(too_large)?;
        total_ms = total_ms.checked_add(ms).ok_or_else(too_large)?;
        rest = after;
    }
    Ok(Duration::from_millis(total_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn compounds() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(
            parse_duration("1d2h3m4s5ms"),
            Ok(Duration::from_millis(93_784_005))
        );
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5400)));
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "", "10", "m", "-5s", "+5s", "1.5h", "10 m", " 10m", "10m ", "10x", "10M", "1h1h",
            "30m1h", "1s1m", "5ms3s", "1hh",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_duration("10x")
            .unwrap_err()
            .contains("unknown unit \"x\""));
        assert!(parse_duration("10").unwrap_err().contains("missing unit"));
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        assert!(parse_duration("99999999999999999999999s")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_duration("18446744073709551615d")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_duration("213503982334d23h59m59s999ms").is_err());
        assert!(parse_duration("18446744073709551615ms").is_ok());
    }
}
