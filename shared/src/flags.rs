//! Parsers for flag values that several binaries take, so that each value is read and refused the
//! same way everywhere.

use std::time::Duration;

/// A duration written as humans write them (`500ms`, `30s`, `5m`), more than zero: for timeouts,
/// where zero would mean "give up at once" rather than "never".
pub fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(duration) if duration.is_zero() => Err("must be more than zero".to_owned()),
        Ok(duration) => Ok(duration),
        Err(err) => Err(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_read_as_humans_write_them_and_zero_is_refused() {
        assert_eq!(positive_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(positive_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(positive_duration("0s").is_err());
        assert!(positive_duration("soon").is_err());
    }
}
