//! The gateway's settings, as a plain struct so tests can build one without parsing flags.

use std::time::Duration;

/// Everything [`crate::run`] needs besides its listener.
#[derive(Debug, Clone)]
pub struct Config {
    /// The distributor to register with and learn the topology from. `None` runs the gateway
    /// without one, routing only what [`crate::run_with_topology`] is fed (tests, embedding).
    pub distributor: Option<String>,
    /// How long a request waits for the node's answer (for a stream: for its first packet).
    pub request_timeout: Duration,
    /// The largest request body accepted, in bytes; larger ones get 413.
    pub max_body: usize,
    /// How often an idle event stream gets a comment line, so proxies keep it open.
    pub keep_alive: Duration,
    /// How long a node that left the topology stays in rotation while its connection is still
    /// up. A restarted distributor announces nodes as they re-register, one by one, within a
    /// few seconds; this keeps the routes of the ones that have not yet re-registered.
    pub departure_grace: Duration,
}

/// The registry's name for the gateway.
pub const GATEWAY_NAME: &str = "gate";

impl Default for Config {
    fn default() -> Self {
        Config {
            distributor: Some("127.0.0.1:9000".into()),
            request_timeout: Duration::from_secs(5),
            max_body: 1024 * 1024,
            keep_alive: Duration::from_secs(15),
            departure_grace: Duration::from_secs(5),
        }
    }
}

/// Parses a byte size: a plain number of bytes, or a number with a unit (`64KiB`, `1MiB`,
/// `2MB`, `512k`; binary and decimal units alike, case-insensitive).
pub fn parse_byte_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: usize = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 1048576, 512KiB or 1MiB"))?;
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_byte_size;

    #[test]
    fn byte_sizes_parse_with_and_without_units() {
        assert_eq!(parse_byte_size("1048576"), Ok(1_048_576));
        assert_eq!(parse_byte_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_byte_size("64 KiB"), Ok(64 << 10));
        assert_eq!(parse_byte_size("2MB"), Ok(2_000_000));
        assert!(parse_byte_size("lots").is_err());
        assert!(parse_byte_size("12 parsecs").is_err());
        assert!(parse_byte_size("99999999999999999999GiB").is_err());
    }
}
