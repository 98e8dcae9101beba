//! The UDP door: subscribers that register their address with a datagram and receive each
//! notice they are entitled to as one datagram, for clients that cannot hold a connection open
//! (the chat clients of the UDP notes this service comes from, small devices, scripts).
//!
//! ```text
//! → #REG <name> [topic,topic...] [token]      ← #OK <current_id>   (or #ERR <reason>)
//! → #DEREG                                    ← #BYE
//!                                              ← {"id":42,"message":"hi",...}   (one per notice)
//!                                              ← #END <reason>      (kicked, lagged, shutdown)
//! ```
//!
//! A registration is an ordinary hub subscription with the name and topics it gave, so
//! whispers, topics, presence and kick treat it like a stream. It lasts as long as its client
//! renews it with another `#REG` within the registration lifetime (60 s); an expired one is
//! ended without a word. With a token key set, `#REG` must carry a token whose subject is the
//! name (or that holds `notice:admin`) and that grants `notice:subscribe`; without a key the
//! door only listens on loopback (protected mode), and a name is chosen like a tokenless
//! stream's, unique to the registering address.
//!
//! Bounds, since anyone who can send a datagram can try: a datagram is read into a fixed
//! buffer and one that does not fit is garbage; garbage (anything that is not one of the two
//! commands) is counted and never answered, so it cannot be reflected at a third party; at most
//! `max_subscribers` addresses are registered at once; a notice whose JSON does not fit in
//! [`MAX_DATAGRAM`] bytes is sent as `{"id":N,"truncated":true}`, so the client fetches it over
//! HTTP (`GET /notices?after=N-1&limit=1`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use serde_json::json;
use shared::{server::ListenerAdvice, token::TokenVerifier};
use tokio::{net::UdpSocket, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    feed::FeedEnd,
    hub::{Live, Membership, NameClaim},
    notice::{validate_label, Interest, MAX_TOPICS},
    routes::{NOTICE_ADMIN_SCOPE, SUBSCRIBE_SCOPE},
    service::{JoinError, NoticeService},
    store::NoticeStore,
};

/// The largest notice datagram: what crosses any path without IP fragmentation.
pub const MAX_DATAGRAM: usize = 1200;
/// The largest command datagram read; a larger one is garbage. Room for a long token.
const MAX_COMMAND: usize = 4096;
/// How often expired registrations are swept, and how often ignored datagrams are reported.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
const REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// What protected mode tells an operator who opens the door to the network without a key.
pub const UDP_DOOR: ListenerAdvice = ListenerAdvice {
    serves: "UDP subscribers",
    lacking: "a token key",
    risk: "anyone who can send it a datagram could subscribe under any name and read its whispers",
    authenticate: "Set a JWT key with --jwt-secret-file PATH (env JWT_SECRET_FILE) or \
        --jwt-public-key-file PATH (env JWT_PUBLIC_KEY_FILE) so #REG must carry a token",
    loopback: "a loopback address (--udp-listen 127.0.0.1:9021)",
    opt_out: "pass --insecure to serve UDP subscribers from anywhere without a token",
    opt_out_warning: "the UDP door serves subscribers from anywhere without a token (--insecure)",
};

/// How the door is run; main.rs fills it from `--udp-*` flags.
#[derive(Debug, Clone)]
pub struct UdpConfig {
    /// The address to receive datagrams on.
    pub listen: SocketAddr,
    /// Registered addresses at once; more `#REG`s from new addresses are refused.
    pub max_subscribers: usize,
    /// How long a registration lasts without another `#REG`.
    pub registration_lifetime: Duration,
    /// When set, `#REG` must carry a token this verifies.
    pub tokens: Option<Arc<TokenVerifier>>,
}

impl UdpConfig {
    /// The defaults: 10,000 subscribers, registrations that last 60 s.
    pub fn new(listen: SocketAddr, tokens: Option<Arc<TokenVerifier>>) -> UdpConfig {
        UdpConfig {
            listen,
            max_subscribers: 10_000,
            registration_lifetime: Duration::from_secs(60),
            tokens,
        }
    }
}

/// What the door has seen, for logs and tests.
#[derive(Debug, Default)]
pub struct UdpCounters {
    /// Datagrams that were neither `#REG` nor `#DEREG`, or too large.
    pub ignored: AtomicU64,
    /// Notice datagrams sent.
    pub sent: AtomicU64,
    /// Notices sent as `{"id","truncated":true}`.
    pub truncated: AtomicU64,
}

struct Registration {
    /// Tells this registration from a later one of the same address.
    serial: u64,
    name: String,
    topics: Vec<String>,
    expires: Instant,
    stop: CancellationToken,
}

/// The door: its socket, its registrations and its counters.
#[derive(Clone)]
pub struct UdpDoor {
    inner: Arc<DoorInner>,
}

struct DoorInner {
    socket: UdpSocket,
    service: NoticeService,
    config: UdpConfig,
    registrations: Mutex<HashMap<SocketAddr, Registration>>,
    next_serial: AtomicU64,
    counters: UdpCounters,
}

/// A parsed command datagram.
#[derive(Debug, PartialEq, Eq)]
enum Command<'a> {
    Register {
        name: &'a str,
        topics: Vec<String>,
        token: Option<&'a str>,
    },
    Deregister,
}

/// Why a `#REG` was refused; the text follows `#ERR`.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0}")]
    BadRequest(String),
    #[error("a token is required: #REG <name> [topics] <token>")]
    TokenRequired,
    #[error("invalid token")]
    InvalidToken,
    #[error("{0}")]
    Forbidden(String),
    #[error("too many UDP subscribers, try again later")]
    Full,
    #[error("{0}")]
    NotJoined(String),
}

impl From<JoinError> for Refusal {
    fn from(err: JoinError) -> Refusal {
        match err {
            JoinError::Refused(refused) => Refusal::NotJoined(refused.to_string()),
            // The details are for the logs, as on the other routes.
            JoinError::Store(failed) => {
                debug!(err = %failed, "a UDP registration could not read the store");
                Refusal::NotJoined("the store is unavailable, try again later".into())
            }
        }
    }
}

impl UdpDoor {
    pub fn new(socket: UdpSocket, service: NoticeService, config: UdpConfig) -> UdpDoor {
        UdpDoor {
            inner: Arc::new(DoorInner {
                socket,
                service,
                config,
                registrations: Mutex::default(),
                next_serial: AtomicU64::new(0),
                counters: UdpCounters::default(),
            }),
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.socket.local_addr()
    }

    pub fn counters(&self) -> &UdpCounters {
        &self.inner.counters
    }

    /// How many addresses are registered now.
    pub fn registered(&self) -> usize {
        self.registrations().len()
    }

    fn registrations(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Registration>> {
        self.inner
            .registrations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Serves datagrams until `shutdown`, then ends every registration.
    pub async fn run(self, shutdown: CancellationToken) {
        info!(addr = ?self.local_addr().ok(), "serving UDP subscribers");
        let mut buffer = vec![0u8; MAX_COMMAND + 1];
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        let mut report = tokio::time::interval(REPORT_INTERVAL);
        let mut ignored_reported = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = sweep.tick() => self.sweep(),
                _ = report.tick() => {
                    let ignored = self.inner.counters.ignored.load(Ordering::Relaxed);
                    if ignored > ignored_reported {
                        info!(ignored = ignored - ignored_reported, "ignored malformed UDP datagrams");
                        ignored_reported = ignored;
                    }
                }
                received = self.inner.socket.recv_from(&mut buffer) => match received {
                    Ok((len, from)) => self.handle(&buffer[..len], from).await,
                    // An ICMP error for an earlier send (a subscriber that went away) shows up
                    // here on some systems: nothing to do but go on.
                    Err(err) => debug!(%err, "UDP receive failed"),
                },
            }
        }
        for (_, registration) in self.registrations().drain() {
            registration.stop.cancel();
        }
    }

    async fn handle(&self, datagram: &[u8], from: SocketAddr) {
        let tokens = self.inner.config.tokens.is_some();
        let command = (datagram.len() <= MAX_COMMAND)
            .then(|| std::str::from_utf8(datagram).ok())
            .flatten()
            .and_then(|text| parse(text, tokens));
        let answer = match command {
            None => {
                self.inner.counters.ignored.fetch_add(1, Ordering::Relaxed);
                crate::metrics::count_udp("ignored");
                return;
            }
            Some(Command::Deregister) => {
                if let Some(registration) = self.registrations().remove(&from) {
                    registration.stop.cancel();
                }
                "#BYE".to_string()
            }
            Some(Command::Register {
                name,
                topics,
                token,
            }) => match self.register(from, name, topics, token).await {
                Ok(current_id) => format!("#OK {current_id}"),
                Err(refusal) => format!("#ERR {refusal}"),
            },
        };
        self.send(answer.as_bytes(), from).await;
    }

    async fn register(
        &self,
        from: SocketAddr,
        name: &str,
        topics: Vec<String>,
        token: Option<&str>,
    ) -> Result<i64, Refusal> {
        let claim = self.check_caller(from, name, token)?;
        validate_label("name", name).map_err(Refusal::BadRequest)?;
        for topic in &topics {
            validate_label("topic", topic).map_err(Refusal::BadRequest)?;
        }
        let current_id = self
            .inner
            .service
            .store()
            .last_id()
            .await
            .map_err(JoinError::from)?;
        let lifetime = self.inner.config.registration_lifetime;
        {
            let mut registrations = self.registrations();
            let registered = registrations.len();
            match registrations.get_mut(&from) {
                // A renewal.
                Some(known) if known.name == name && known.topics == topics => {
                    known.expires = Instant::now() + lifetime;
                    return Ok(current_id);
                }
                Some(_) => {}
                None if registered >= self.inner.config.max_subscribers => {
                    return Err(Refusal::Full);
                }
                None => {}
            }
            // Another name or other topics from the same address replace what it had.
            if let Some(replaced) = registrations.remove(&from) {
                replaced.stop.cancel();
            }
        }
        let interest = Interest {
            name: Some(name.to_string()),
            topics: topics.clone(),
        };
        let membership = Membership {
            presence: false,
            claim,
        };
        let mut feed = self
            .inner
            .service
            .subscribe(interest, membership, None)
            .await?;
        let stop = CancellationToken::new();
        let serial = self.inner.next_serial.fetch_add(1, Ordering::Relaxed);
        {
            let mut registrations = self.registrations();
            // Two `#REG`s from one address racing: the later one wins, the earlier one ends.
            if let Some(replaced) = registrations.insert(
                from,
                Registration {
                    serial,
                    name: name.to_string(),
                    topics,
                    expires: Instant::now() + lifetime,
                    stop: stop.clone(),
                },
            ) {
                replaced.stop.cancel();
            }
        }
        let door = self.clone();
        tokio::spawn(async move {
            let ended = tokio::select! {
                _ = stop.cancelled() => None,
                ended = door.forward(&mut feed, from) => Some(ended),
            };
            drop(feed);
            if let Some(reason) = ended {
                door.forget(from, serial);
                door.send(format!("#END {reason}").as_bytes(), from).await;
            }
        });
        Ok(current_id)
    }

    /// The claim the caller has on `name`: checked against its token when a key is set.
    fn check_caller(
        &self,
        from: SocketAddr,
        name: &str,
        token: Option<&str>,
    ) -> Result<NameClaim, Refusal> {
        let Some(verifier) = &self.inner.config.tokens else {
            // As a tokenless stream's: unique, shared only with this same address.
            return Ok(NameClaim::Chosen {
                client: Some(format!("udp:{from}")),
            });
        };
        let token = token.ok_or(Refusal::TokenRequired)?;
        let identity = verifier.verify(token).map_err(|_| Refusal::InvalidToken)?;
        if !identity.has_scope(SUBSCRIBE_SCOPE) {
            return Err(Refusal::Forbidden(format!(
                "this needs the scope {SUBSCRIBE_SCOPE:?}"
            )));
        }
        if identity.sub.as_deref() != Some(name) && !identity.has_scope(NOTICE_ADMIN_SCOPE) {
            return Err(Refusal::Forbidden(format!(
                "name {name:?} is not yours: a registration takes the name of its token's subject"
            )));
        }
        Ok(NameClaim::Entitled)
    }

    /// Sends the registration's notices until its subscription ends; returns why it ended.
    async fn forward(&self, feed: &mut crate::feed::Feed, to: SocketAddr) -> &'static str {
        loop {
            match feed.next().await {
                Ok(Live::Notice(notice)) => {
                    let json = notice.json.get();
                    let counters = &self.inner.counters;
                    if json.len() <= MAX_DATAGRAM {
                        self.send(json.as_bytes(), to).await;
                    } else {
                        counters.truncated.fetch_add(1, Ordering::Relaxed);
                        crate::metrics::count_udp("truncated");
                        let short = json!({"id": notice.id, "truncated": true}).to_string();
                        self.send(short.as_bytes(), to).await;
                    }
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::count_udp("sent");
                }
                Ok(Live::Presence(_)) => {}
                Err(FeedEnd::Ended(reason)) => return reason.event_name(),
                Err(FeedEnd::Store(err)) => {
                    warn!(%err, "a UDP subscription failed");
                    return "error";
                }
            }
        }
    }

    async fn send(&self, datagram: &[u8], to: SocketAddr) {
        if let Err(err) = self.inner.socket.send_to(datagram, to).await {
            debug!(%err, %to, "UDP send failed");
        }
    }

    /// Removes the registration of `from` if it is still the one numbered `serial`.
    fn forget(&self, from: SocketAddr, serial: u64) {
        let mut registrations = self.registrations();
        if registrations
            .get(&from)
            .is_some_and(|current| current.serial == serial)
        {
            registrations.remove(&from);
        }
    }

    /// Ends the registrations that were not renewed in time.
    fn sweep(&self) {
        let now = Instant::now();
        self.registrations().retain(|addr, registration| {
            let live = registration.expires > now;
            if !live {
                debug!(%addr, name = %registration.name, "UDP registration expired");
                registration.stop.cancel();
            }
            live
        });
    }
}

/// Reads a command datagram; `None` for anything else. With a token key the last word of a
/// `#REG` is its token (so `#REG alice TOKEN` has no topics); without one there is no token.
fn parse(text: &str, tokens: bool) -> Option<Command<'_>> {
    let mut words = text.trim_end_matches(['\r', '\n']).split(' ');
    match words.next()? {
        "#DEREG" => words.next().is_none().then_some(Command::Deregister),
        "#REG" => {
            let rest: Vec<&str> = words.collect();
            let (name, topics, token) = match (rest.as_slice(), tokens) {
                ([name], false) => (*name, None, None),
                ([name, topics], false) => (*name, Some(*topics), None),
                ([name], true) => (*name, None, None),
                ([name, token], true) => (*name, None, Some(*token)),
                ([name, topics, token], true) => (*name, Some(*topics), Some(*token)),
                _ => return None,
            };
            let mut topics: Vec<String> = topics
                .into_iter()
                .flat_map(|list| list.split(','))
                .filter(|topic| !topic.is_empty())
                .map(str::to_string)
                .collect();
            topics.sort();
            topics.dedup();
            (!name.is_empty() && topics.len() <= MAX_TOPICS).then_some(Command::Register {
                name,
                topics,
                token,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_read_as_the_udp_chat_wrote_them() {
        assert_eq!(
            parse("#REG alice room,hall\n", false),
            Some(Command::Register {
                name: "alice",
                topics: vec!["hall".into(), "room".into()],
                token: None
            })
        );
        assert_eq!(
            parse("#REG alice", false),
            Some(Command::Register {
                name: "alice",
                topics: vec![],
                token: None
            })
        );
        assert_eq!(
            parse("#REG alice t.o.k", true),
            Some(Command::Register {
                name: "alice",
                topics: vec![],
                token: Some("t.o.k")
            })
        );
        assert_eq!(
            parse("#REG alice a,b t.o.k\r\n", true),
            Some(Command::Register {
                name: "alice",
                topics: vec!["a".into(), "b".into()],
                token: Some("t.o.k")
            })
        );
        assert_eq!(parse("#DEREG", false), Some(Command::Deregister));
        assert_eq!(parse("#DEREG\n", true), Some(Command::Deregister));
    }

    #[test]
    fn anything_else_is_garbage() {
        for garbage in [
            "",
            "#REG",
            "#REG ",
            "#REG a b c",
            "#REG a b c d",
            "#DEREG now",
            "#reg alice",
            "hello",
            "{\"uri\":\"/notices\"}",
        ] {
            assert_eq!(parse(garbage, false), None, "{garbage:?}");
        }
        let many_topics: Vec<String> = (0..=MAX_TOPICS).map(|i| format!("t{i}")).collect();
        let datagram = format!("#REG alice {}", many_topics.join(","));
        assert_eq!(parse(&datagram, false), None);
    }
}
