//! The gateway's settings, as a plain struct so tests can build one without parsing flags.

use std::{sync::Arc, time::Duration};

use shared::{cluster::ClusterSecret, token::TokenVerifier, topology_cache::TopologyCache};

use crate::rate_limit::RateLimit;

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
    /// Where the last topology from the distributor is kept, and read from at start-up while
    /// the distributor does not answer (static stability). `None`: nowhere.
    pub topology_cache: Option<TopologyCache>,
    /// Verifies callers' bearer tokens. `None` is protected mode: requests are served without
    /// tokens, from loopback clients only (see [`crate::auth`]).
    pub tokens: Option<Arc<TokenVerifier>>,
    /// The scopes granted to requests without a token (`admin` for all).
    pub anonymous_scopes: Vec<String>,
    /// Requests per caller; `None` for no limit.
    pub rate_limit: Option<RateLimit>,
    /// The cluster secret the gateway proves to the distributor and the nodes. `None` connects
    /// without the handshake, which only members in protected mode (loopback) accept.
    pub cluster_secret: Option<ClusterSecret>,
    /// With a cluster secret, still connect to original-design nodes, which cannot prove it.
    pub allow_legacy_nodes: bool,
    /// How the HTTP listener treats its clients: limits, timeouts, CORS and TLS.
    pub edge: EdgeConfig,
    /// The metrics listener (`--metrics-listen`), which serves what `/metrics` does; the log
    /// format is set before [`crate::run`] by the binary.
    pub telemetry: shared::telemetry::TelemetryArgs,
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
            topology_cache: None,
            tokens: None,
            anonymous_scopes: Vec::new(),
            rate_limit: None,
            cluster_secret: None,
            allow_legacy_nodes: false,
            edge: EdgeConfig::default(),
            telemetry: Default::default(),
        }
    }
}

/// The HTTP listener's settings: what one client may hold and how slowly it may send
/// (docs/HTTP.md, "Limits"), which browser origins may call (CORS), and TLS.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// A request head must arrive whole within this time of the connection's opening (after
    /// the TLS handshake), or of the end of the previous answer; so an HTTP/1.1 connection idle
    /// between requests is closed after it too. Also bounds the TLS handshake.
    pub header_timeout: Duration,
    /// A request body must keep arriving: each piece within this time of the one before, and
    /// the whole body within this time plus its size at [`crate::http::MIN_BODY_RATE`].
    pub body_timeout: Duration,
    /// A connection on which no byte moves either way for this long is closed.
    pub idle_timeout: Duration,
    /// Most header fields one request may have (431 above it).
    pub max_headers: usize,
    /// Largest request head (request line and headers) in bytes (431 above it).
    pub max_header_bytes: usize,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Connections served at once from one IP address; more are closed at once.
    pub max_connections_per_ip: usize,
    /// Browser origins allowed to call the gateway.
    pub cors: CorsOrigins,
    /// Serve HTTPS (HTTP/2 and HTTP/1.1 over ALPN) with this configuration, built by
    /// [`crate::tls::server_config`]; `None` serves plain HTTP/1.1.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            header_timeout: crate::http::HEADER_READ_TIMEOUT,
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_headers: crate::http::DEFAULT_MAX_HEADERS,
            max_header_bytes: 64 * 1024,
            max_connections: shared::server::MAX_CONNECTIONS,
            max_connections_per_ip: shared::server::MAX_CONNECTIONS_PER_IP,
            cors: CorsOrigins::None,
            tls: None,
        }
    }
}

/// Which browser origins may call the gateway from their pages' scripts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CorsOrigins {
    /// None: browsers keep pages of other origins from reading the gateway's answers.
    #[default]
    None,
    /// Any origin (`*`).
    Any,
    /// These origins, each `scheme://host[:port]` as a browser sends it in `Origin`.
    List(Vec<String>),
}

impl CorsOrigins {
    /// Reads `--cors-origin` values: nothing, `*`, or origins such as `https://app.example.com`
    /// (a trailing `/` is dropped).
    pub fn parse<S: AsRef<str>>(values: &[S]) -> Result<CorsOrigins, String> {
        let mut origins = Vec::new();
        for value in values {
            let value = value.as_ref().trim();
            if value.is_empty() {
                continue;
            }
            if value == "*" {
                return Ok(CorsOrigins::Any);
            }
            let origin = value.strip_suffix('/').unwrap_or(value);
            let host = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"))
                .ok_or_else(|| {
                    format!("CORS origin {value:?} must start with https:// or http://")
                })?;
            if host.is_empty()
                || host.contains(['/', '?', '#', ' '])
                || !origin.bytes().all(|byte| byte.is_ascii_graphic())
            {
                return Err(format!(
                    "CORS origin {value:?} must be scheme://host[:port], as a browser sends it"
                ));
            }
            origins.push(origin.to_ascii_lowercase());
        }
        Ok(if origins.is_empty() {
            CorsOrigins::None
        } else {
            CorsOrigins::List(origins)
        })
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
    use super::{parse_byte_size, CorsOrigins};

    #[test]
    fn cors_origins_parse_as_browsers_send_them() {
        assert_eq!(CorsOrigins::parse::<&str>(&[]), Ok(CorsOrigins::None));
        assert_eq!(CorsOrigins::parse(&["*"]), Ok(CorsOrigins::Any));
        assert_eq!(
            CorsOrigins::parse(&["https://App.example.com/", "http://localhost:3000"]),
            Ok(CorsOrigins::List(vec![
                "https://app.example.com".into(),
                "http://localhost:3000".into()
            ]))
        );
        assert!(CorsOrigins::parse(&["app.example.com"]).is_err());
        assert!(CorsOrigins::parse(&["https://app.example.com/path"]).is_err());
        assert!(CorsOrigins::parse(&["https://"]).is_err());
    }

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
