//! The accept loop every TCP server of the workspace shares: the services' and the distributor's
//! packet servers, the kv text server and the gateway's HTTP server.
//!
//! It exists so that the limits one client may hold are enforced once, the same way everywhere:
//! - at most [`ConnectionLimits::max_connections`] connections at once; further clients wait in
//!   the listen backlog, so no server can be driven out of file descriptors. The default cap
//!   ([`default_max_connections`]) is sized from the process's open-file limit, so that raising
//!   the limit is all it takes to serve more clients, and a low limit never turns into failed
//!   `accept` calls;
//! - at most [`ConnectionLimits::max_per_ip`] of them from one IP address; a client over it is
//!   closed at once, so one address cannot take every slot from the others;
//! - in protected mode ([`ConnectionLimits::loopback_only`]) only loopback peers are served.
//!
//! Protected mode's start-up rule lives here too ([`check_protected_mode`]): every listener of
//! the workspace (packet ports, the kv text port, the gateway's HTTP port) refuses a
//! non-loopback address without authentication the same way, and only its [`ListenerAdvice`]
//! (what it serves, which flags protect it) differs.
//!
//! Each connection runs on a task of its own; a failing connection is logged by its handler and
//! never stops the server, and accept errors are retried with backoff.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::FutureExt;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

/// Connections served at once when the open-file limit cannot be read (and by
/// [`ConnectionLimits::default`], which tests use).
pub const MAX_CONNECTIONS: usize = 10_000;

/// Descriptors kept back from connections whatever the open-file limit: the listeners, log
/// and database files, the node's own packet connections, a database pool.
pub const FILE_RESERVE: u64 = 64;

/// The share of the open-file limit kept back on top of [`FILE_RESERVE`], in percent: room for
/// what grows with the load (SQLite readers, a pool under pressure). Small enough that a limit
/// of 20,000 still serves 18,000 clients.
pub const FILE_HEADROOM_PERCENT: u64 = 5;

/// The cap never goes below this, however low the limit: a server that cannot take a handful
/// of connections is useless, and accept errors are retried anyway.
pub const MIN_CONNECTIONS: usize = 16;

/// The cap when the limit is `unlimited`: the semaphore needs a number, and no process serves
/// more than this on one listener.
pub const MAX_SIZED_CONNECTIONS: usize = 1 << 20;

/// The connection cap for an open-file soft limit (`None`: unlimited): the limit less
/// [`FILE_HEADROOM_PERCENT`] and [`FILE_RESERVE`], never below [`MIN_CONNECTIONS`].
pub fn connections_for_file_limit(soft_limit: Option<u64>) -> usize {
    let Some(limit) = soft_limit else {
        return MAX_SIZED_CONNECTIONS;
    };
    let headroom = limit / 100 * FILE_HEADROOM_PERCENT + limit % 100 * FILE_HEADROOM_PERCENT / 100;
    let usable = limit.saturating_sub(headroom).saturating_sub(FILE_RESERVE);
    usize::try_from(usable)
        .unwrap_or(MAX_SIZED_CONNECTIONS)
        .clamp(MIN_CONNECTIONS, MAX_SIZED_CONNECTIONS)
}

/// The default connection cap: sized from this process's open-file soft limit
/// ([`connections_for_file_limit`]), or [`MAX_CONNECTIONS`] where the limit cannot be read.
pub fn default_max_connections() -> usize {
    match open_file_limit() {
        Ok(limit) => connections_for_file_limit(limit),
        Err(err) => {
            debug!(%err, "open-file limit unknown; using the fixed connection cap");
            MAX_CONNECTIONS
        }
    }
}

/// Why the open-file limit could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileLimitError {
    #[error("cannot read /proc/self/limits: {0}")]
    Read(#[from] std::io::Error),
    #[error("/proc/self/limits has no readable \"Max open files\" line")]
    Malformed,
}

/// The largest `/proc/self/limits` we read; the real file is under 2 KiB.
const LIMITS_FILE_MAX: u64 = 16 * 1024;

/// This process's open-file soft limit (RLIMIT_NOFILE); `None` when unlimited. Read from
/// `/proc/self/limits` (Linux), which needs no binding to `getrlimit`.
pub fn open_file_limit() -> Result<Option<u64>, FileLimitError> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open("/proc/self/limits")?
        .take(LIMITS_FILE_MAX)
        .read_to_string(&mut text)?;
    parse_open_file_limit(&text).ok_or(FileLimitError::Malformed)
}

/// The soft limit of the `Max open files` line of a `/proc/self/limits` text: `Some(None)` for
/// `unlimited`, `None` when the line is missing or not a number.
fn parse_open_file_limit(limits: &str) -> Option<Option<u64>> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    match line
        .strip_prefix("Max open files")?
        .split_whitespace()
        .next()?
    {
        "unlimited" => Some(None),
        soft => soft.parse().ok().map(Some),
    }
}

/// Connections from one IP address by default: generous, since a gateway or a load balancer
/// in front of us is one address carrying many clients.
pub const MAX_CONNECTIONS_PER_IP: usize = 1_024;

/// What one server lets its clients hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_per_ip: usize,
    /// Protected mode: serve loopback peers only (no cluster secret or token key is set).
    pub loopback_only: bool,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: MAX_CONNECTIONS,
            max_per_ip: MAX_CONNECTIONS_PER_IP,
            loopback_only: false,
        }
    }
}

/// True for 127.0.0.0/8, ::1 and IPv4-mapped loopback addresses.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// What protected mode tells the operator about one listener. Each field is a phrase of the
/// refusal ([`UnprotectedListener`]), so every binary refuses in the same shape while naming
/// its own flags; `'static` because each is written once, next to the flags it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerAdvice {
    /// What the listener serves: "the distributor", "the text protocol", "HTTP".
    pub serves: &'static str,
    /// The authentication it lacks: "a cluster secret", "a token key".
    pub lacking: &'static str,
    /// What anyone who reaches it could do.
    pub risk: &'static str,
    /// How to authenticate it, naming the flags (a sentence's first clause).
    pub authenticate: &'static str,
    /// A loopback address to listen on instead.
    pub loopback: &'static str,
    /// How to serve other hosts without authentication anyway.
    pub opt_out: &'static str,
    /// Logged at warn at every start that takes the opt-out.
    pub opt_out_warning: &'static str,
}

/// Refused at start: a listener on a non-loopback address without authentication.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "refusing to serve {serves} on {addr} without {lacking}: {risk}. {authenticate}, listen on \
     {loopback}, or {opt_out}",
    serves = .advice.serves,
    lacking = .advice.lacking,
    risk = .advice.risk,
    authenticate = .advice.authenticate,
    loopback = .advice.loopback,
    opt_out = .advice.opt_out
)]
pub struct UnprotectedListener {
    pub addr: SocketAddr,
    /// Boxed: an error this rare should not make every `Result` that carries it large.
    pub advice: Box<ListenerAdvice>,
}

/// Protected mode's start-up rule for a listener bound to `addr`: one that does not
/// authenticate its clients (`authenticated` false) may only listen on a loopback address,
/// unless the operator opted out (`insecure`), which is logged at warn.
pub fn check_protected_mode(
    addr: SocketAddr,
    authenticated: bool,
    insecure: bool,
    advice: &ListenerAdvice,
) -> Result<(), UnprotectedListener> {
    if authenticated || is_loopback(addr.ip()) {
        return Ok(());
    }
    if !insecure {
        return Err(UnprotectedListener {
            addr,
            advice: Box::new(*advice),
        });
    }
    warn!(%addr, listener = advice.serves, "{}", advice.opt_out_warning);
    Ok(())
}

/// Accepts connections on `listener` until `shutdown` is cancelled and runs `handle(stream,
/// peer)` for each as a task of its own, within `limits`; returns once every one of those tasks
/// has ended (they watch `shutdown` themselves).
pub async fn serve_connections<F, Fut>(
    listener: TcpListener,
    limits: ConnectionLimits,
    shutdown: &CancellationToken,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_ip = PerIp::new(limits.max_per_ip);
    let mut refusals = RefusalLog::default();
    let connections = TaskTracker::new();
    while let Some((slot, stream, peer)) = accept_within(&listener, &slots, shutdown).await {
        if limits.loopback_only && !is_loopback(peer.ip()) {
            refusals.note(
                peer,
                "protected mode: only loopback clients are served until a secret is configured",
            );
            continue;
        }
        let Some(ip_slot) = per_ip.take(peer.ip()) else {
            refusals.note(peer, "too many connections from this address");
            continue;
        };
        // A combinator rather than `async move { connection.await; drop(slots) }`, which would
        // hold the connection's future twice (captured, and being awaited): that doubles the
        // memory of every open connection.
        connections.spawn(handle(stream, peer).map(move |()| drop((slot, ip_slot))));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Accepts the next connection while fewer than `slots`' permits are out: waits for a free
/// permit, then for a connection. `None` once `shutdown` is cancelled.
async fn accept_within(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let slot = tokio::select! {
        _ = shutdown.cancelled() => return None,
        slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
    };
    tokio::select! {
        _ = shutdown.cancelled() => None,
        (stream, peer) = accept_with_backoff(listener) => Some((slot, stream, peer)),
    }
}

/// Accepts the next connection. Accept errors (out of file descriptors, a connection reset
/// before it was accepted) are logged and retried with a growing pause: they never stop a server.
async fn accept_with_backoff(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    let mut backoff = Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(err) => {
                warn!(%err, "accept failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Open connections by IP address.
struct PerIp {
    max: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection's place in [`PerIp`]; gives it back when dropped.
struct IpSlot {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerIp {
    fn new(max: usize) -> PerIp {
        PerIp {
            max,
            open: Arc::default(),
        }
    }

    fn take(&self, ip: IpAddr) -> Option<IpSlot> {
        let mut open = self.open.lock().unwrap();
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            ip,
            open: self.open.clone(),
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap();
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                // Entries exist only for addresses with connections open, so the map is
                // bounded by the connection cap.
                open.remove(&self.ip);
            }
        }
    }
}

/// Logs refused connections at warn at most once a minute (with how many since), so a flood of
/// them cannot flood the log; every one is logged at debug.
#[derive(Default)]
struct RefusalLog {
    last_warned: Option<Instant>,
    since: u64,
}

impl RefusalLog {
    fn note(&mut self, peer: SocketAddr, reason: &str) {
        self.since += 1;
        debug!(%peer, reason, "connection refused");
        if self
            .last_warned
            .is_none_or(|last| last.elapsed() >= Duration::from_secs(60))
        {
            warn!(%peer, reason, refused = self.since, "connection refused");
            self.last_warned = Some(Instant::now());
            self.since = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_leaves_room_below_the_open_file_limit() {
        // The machine the scale target is measured on: 18,000 subscribers must fit.
        assert_eq!(connections_for_file_limit(Some(20_000)), 18_936);
        // The usual default soft limit.
        assert_eq!(connections_for_file_limit(Some(1_024)), 909);
        assert_eq!(connections_for_file_limit(Some(1_048_576)), 996_084);
        // A tiny limit still serves a few; unlimited gets the ceiling.
        assert_eq!(connections_for_file_limit(Some(50)), MIN_CONNECTIONS);
        assert_eq!(connections_for_file_limit(Some(0)), MIN_CONNECTIONS);
        assert_eq!(connections_for_file_limit(None), MAX_SIZED_CONNECTIONS);
        assert_eq!(
            connections_for_file_limit(Some(u64::MAX)),
            MAX_SIZED_CONNECTIONS
        );
    }

    #[test]
    fn the_open_file_limit_is_read_from_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max open files            20000                524288               files     \n";
        assert_eq!(parse_open_file_limit(text), Some(Some(20_000)));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_open_file_limit(unlimited), Some(None));
        assert_eq!(parse_open_file_limit("Max open files  lots  files\n"), None);
        assert_eq!(parse_open_file_limit("Max processes 100 100\n"), None);
        // This process's own limit is readable on Linux, and is a number or unlimited.
        assert!(open_file_limit().is_ok());
    }

    #[test]
    fn loopback_addresses_are_recognised() {
        for ip in ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "10.0.0.1",
            "0.0.0.0",
            "::",
            "::ffff:10.0.0.1",
            "192.168.1.1",
        ] {
            assert!(!is_loopback(ip.parse().unwrap()), "{ip}");
        }
    }

    const ADVICE: ListenerAdvice = ListenerAdvice {
        serves: "the test port",
        lacking: "a test key",
        risk: "anyone could test it",
        authenticate: "Give --test-key",
        loopback: "127.0.0.1",
        opt_out: "pass --insecure",
        opt_out_warning: "serving the test port to anyone (--insecure)",
    };

    #[test]
    fn protected_mode_refuses_only_an_unauthenticated_public_address() {
        let public: SocketAddr = "0.0.0.0:9".parse().unwrap();
        let mapped_loopback: SocketAddr = "[::ffff:127.0.0.1]:9".parse().unwrap();
        assert!(check_protected_mode(public, false, false, &ADVICE).is_err());
        assert!(check_protected_mode(public, true, false, &ADVICE).is_ok());
        assert!(check_protected_mode(public, false, true, &ADVICE).is_ok());
        assert!(check_protected_mode(mapped_loopback, false, false, &ADVICE).is_ok());
    }

    #[test]
    fn the_refusal_names_the_listener_and_every_way_out() {
        let public: SocketAddr = "10.0.0.1:9".parse().unwrap();
        let refusal = check_protected_mode(public, false, false, &ADVICE).unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "refusing to serve the test port on 10.0.0.1:9 without a test key: anyone could \
             test it. Give --test-key, listen on 127.0.0.1, or pass --insecure"
        );
    }

    #[test]
    fn an_address_holds_at_most_its_share_and_gets_it_back() {
        let per_ip = PerIp::new(2);
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let first = per_ip.take(ip).unwrap();
        let _second = per_ip.take(ip).unwrap();
        assert!(per_ip.take(ip).is_none());
        assert!(per_ip.take("10.1.2.4".parse().unwrap()).is_some());
        drop(first);
        assert!(per_ip.take(ip).is_some());
    }
}
