//! `GET /_/logs`: the recent log lines of the whole system in one answer, for operators.
//!
//! The gateway asks every node it is connected to (`GET /_/logs` over the packet protocol, which
//! the service runtime answers on every service), the distributor (the same request on a
//! connection of its own), and reads its own buffer ([`shared::logs`]). Each source has
//! [`SOURCE_DEADLINE`] to answer: one that does not (stopped, overloaded, an original-design node
//! that does not know the request) is named in `missing` and never holds up the answer. The
//! lines are merged by time, newest last, and the newest `limit` kept.
//!
//! With `follow=1` the answer is a Server-Sent Events stream instead: the same lines, one
//! `event: log` each, then, polling every source each [`FOLLOW_INTERVAL`] for the lines after the
//! last one it sent, every new line as it comes. docs/HTTP.md, "Logs", is the contract.

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    sync::Arc,
    time::Duration,
};

use axum::{
    extract::{Request, State},
    http::StatusCode,
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    Json,
};
use serde::{Deserialize, Serialize};
use shared::{
    logs::{LogLine, LogQuery, MinLevel, LOGS_URI, MAX_LINES},
    Dialect, Packet, PacketClient,
};
use tokio::time::{timeout, Instant};

use crate::{endpoints::refusal_unless_admin, error::json_error, metrics::GaugeGuard, AppState};

/// How long one source has to answer before it is listed as missing.
pub const SOURCE_DEADLINE: Duration = Duration::from_secs(1);
/// How often a follower asks every source for new lines.
pub const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);
/// The longest `service` filter accepted (service names are at most 64 bytes).
const MAX_SERVICE_LENGTH: usize = 64;

/// The service name of the gateway's own lines.
pub const GATEWAY_SERVICE: &str = "gateway";
/// The service name of the distributor's lines.
pub const DISTRIBUTOR_SERVICE: &str = "distributor";

/// One line of the answer.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub time: String,
    pub level: String,
    /// `name@host:port`.
    pub node: String,
    pub service: String,
    pub message: String,
}

/// The answer without `follow`.
#[derive(Debug, Serialize)]
pub struct Gathered {
    pub lines: Vec<Line>,
    pub missing: Vec<String>,
}

/// What the query string asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LogsRequest {
    query: LogQuery,
    service: Option<String>,
    follow: bool,
}

impl LogsRequest {
    fn parse(query: Option<&str>) -> Result<LogsRequest, String> {
        let mut request = LogsRequest {
            query: LogQuery::default(),
            service: None,
            follow: false,
        };
        for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match &*name {
                "level" => request.query.level = Some(value.parse::<MinLevel>()?),
                "limit" => {
                    request.query.limit = value
                        .parse()
                        .ok()
                        .filter(|limit| (1..=MAX_LINES).contains(limit))
                        .ok_or_else(|| format!("limit must be between 1 and {MAX_LINES}"))?
                }
                "service" => {
                    if value.is_empty() || value.len() > MAX_SERVICE_LENGTH {
                        return Err(format!(
                            "service must be a service name of 1 to {MAX_SERVICE_LENGTH} bytes"
                        ));
                    }
                    request.service = Some(value.into_owned());
                }
                "follow" => {
                    request.follow = match &*value {
                        "1" | "true" => true,
                        "0" | "false" => false,
                        _ => return Err("follow must be 1 or 0".into()),
                    }
                }
                crate::auth::ACCESS_TOKEN_PARAM => {}
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}: use level, service, limit or follow"
                    ))
                }
            }
        }
        Ok(request)
    }
}

/// Where lines come from.
#[derive(Clone)]
enum Origin {
    Gateway,
    Distributor(String),
    Node(Arc<crate::routes::Node>),
}

#[derive(Clone)]
struct Source {
    node: Arc<str>,
    service: Arc<str>,
    origin: Origin,
}

/// `GET /_/logs` (admin scope).
pub(crate) async fn logs(State(state): State<Arc<AppState>>, request: Request) -> Response {
    if let Some(refused) = refusal_unless_admin(&state, &request) {
        return refused;
    }
    let logs_request = match LogsRequest::parse(request.uri().query()) {
        Ok(logs_request) => logs_request,
        Err(message) => return json_error(StatusCode::BAD_REQUEST, &message),
    };
    let mut gatherer = Gatherer::new(&state, logs_request.service);
    if logs_request.follow {
        return follow(gatherer, logs_request.query, &state);
    }
    Json(gatherer.gather(&logs_request.query).await).into_response()
}

/// Asks the sources for lines; keeps the distributor connection between polls of a follower.
struct Gatherer {
    state: Arc<AppState>,
    service: Option<String>,
    distributor: Option<PacketClient>,
}

impl Gatherer {
    fn new(state: &Arc<AppState>, service: Option<String>) -> Gatherer {
        Gatherer {
            state: state.clone(),
            service,
            distributor: None,
        }
    }

    /// Every source now, filtered by service.
    fn sources(&self) -> Vec<Source> {
        let mut sources = vec![Source {
            node: format!("{GATEWAY_SERVICE}@{}", self.state.addr).into(),
            service: GATEWAY_SERVICE.into(),
            origin: Origin::Gateway,
        }];
        if let Some(addr) = &self.state.config.distributor {
            sources.push(Source {
                node: format!("{DISTRIBUTOR_SERVICE}@{addr}").into(),
                service: DISTRIBUTOR_SERVICE.into(),
                origin: Origin::Distributor(addr.clone()),
            });
        }
        let table = self.state.routes.borrow().clone();
        for node in table.nodes() {
            // A node leaving the topology is still listed while its grace lasts; once.
            if sources.iter().any(|source| *source.node == *label(node)) {
                continue;
            }
            sources.push(Source {
                node: label(node).into(),
                service: node.name.as_str().into(),
                origin: Origin::Node(node.clone()),
            });
        }
        sources.retain(|source| {
            self.service
                .as_deref()
                .is_none_or(|service| *source.service == *service)
        });
        sources
    }

    /// Lines matching `query` from every source, newest last, at most `query.limit`.
    async fn gather(&mut self, query: &LogQuery) -> Gathered {
        let mut per_source = HashMap::new();
        let (mut lines, missing) = self.poll(query, &mut per_source).await;
        let excess = lines.len().saturating_sub(query.limit);
        lines.drain(..excess);
        Gathered { lines, missing }
    }

    /// Asks every source at once for the lines after `after[source]`; returns them merged by
    /// time and the sources that did not answer. `after` is updated to each one's last line.
    async fn poll(
        &mut self,
        query: &LogQuery,
        after: &mut HashMap<Arc<str>, u64>,
    ) -> (Vec<Line>, Vec<String>) {
        let sources = self.sources();
        let distributor = sources.iter().find_map(|source| match &source.origin {
            Origin::Distributor(addr) => Some(addr.clone()),
            _ => None,
        });
        if let Some(addr) = distributor {
            let secret = self.state.config.cluster_secret.clone();
            self.distributor.get_or_insert_with(|| {
                PacketClient::connect_with_secret(addr, Dialect::Packet, secret)
            });
        }
        let asks = sources.iter().map(|source| {
            let query = LogQuery {
                after: after.get(&source.node).copied(),
                ..*query
            };
            ask(source, query, self.distributor.as_ref())
        });
        let answers = futures::future::join_all(asks).await;
        let mut lines = Vec::new();
        let mut missing = Vec::new();
        for (source, answer) in sources.into_iter().zip(answers) {
            let Some(answer) = answer else {
                missing.push(source.node.to_string());
                continue;
            };
            if let Some(last) = answer.last() {
                after.insert(source.node.clone(), last.seq);
            }
            lines.extend(answer.into_iter().map(|line| Line {
                time: line.time,
                level: line.level,
                node: source.node.to_string(),
                service: source.service.to_string(),
                message: line.message,
            }));
        }
        // Times are RFC 3339 in UTC with a fixed precision, so they sort as text; the sort is
        // stable, so lines of one source keep their order.
        lines.sort_by(|a, b| a.time.cmp(&b.time));
        (lines, missing)
    }
}

fn label(node: &crate::routes::Node) -> String {
    format!("{}@{}", node.name, node.addr)
}

#[derive(Deserialize)]
struct Answer {
    lines: Vec<LogLine>,
}

/// One source's lines, or `None` when it did not answer well within [`SOURCE_DEADLINE`].
async fn ask(
    source: &Source,
    query: LogQuery,
    distributor: Option<&PacketClient>,
) -> Option<Vec<LogLine>> {
    let request = Packet::request("GET", LOGS_URI, query.to_params());
    let answered = timeout(SOURCE_DEADLINE, async {
        match &source.origin {
            Origin::Gateway => Some(shared::logs::buffer().query(&query)),
            // An original-design node does not know the request; it is not asked.
            Origin::Node(node) if node.dialect == Dialect::Legacy => None,
            Origin::Node(node) => {
                let answer = node.client.request(request).await.ok()?;
                (answer.status() == 200)
                    .then(|| serde_json::from_str::<Answer>(answer.params.get()).ok())
                    .flatten()
                    .map(|answer| answer.lines)
            }
            Origin::Distributor(_) => {
                let client = distributor?.connected().await;
                let answer = client.request(request).await.ok()?;
                (answer.status() == 200)
                    .then(|| Answer::deserialize(&answer.params).ok())
                    .flatten()
                    .map(|answer| answer.lines)
            }
        }
    })
    .await;
    answered.ok().flatten()
}

/// A follower's state between events.
struct Follower {
    gatherer: Gatherer,
    query: LogQuery,
    after: HashMap<Arc<str>, u64>,
    pending: VecDeque<Line>,
    next_poll: Instant,
    _open: GaugeGuard,
}

/// The `text/event-stream` answer of `follow=1`.
fn follow(gatherer: Gatherer, query: LogQuery, state: &AppState) -> Response {
    let follower = Follower {
        gatherer,
        query,
        after: HashMap::new(),
        pending: VecDeque::new(),
        next_poll: Instant::now(),
        _open: state.metrics.open_stream(),
    };
    let shutdown = state.shutdown.clone();
    let events = futures::stream::unfold(follower, move |mut follower| {
        let shutdown = shutdown.clone();
        async move {
            loop {
                if let Some(line) = follower.pending.pop_front() {
                    let event = Event::default()
                        .event("log")
                        .json_data(&line)
                        .expect("a log line serializes");
                    return Some((Ok::<_, Infallible>(event), follower));
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep_until(follower.next_poll) => {}
                }
                follower.next_poll = Instant::now() + FOLLOW_INTERVAL;
                // The first poll sends the recent lines, like `tail -f`; later ones everything
                // new, which one poll interval of a busy node can make more than `limit`.
                let query = match follower.after.is_empty() {
                    true => follower.query,
                    false => LogQuery {
                        limit: MAX_LINES,
                        ..follower.query
                    },
                };
                let (lines, _missing) = follower.gatherer.poll(&query, &mut follower.after).await;
                let excess = lines.len().saturating_sub(query.limit);
                follower.pending.extend(lines.into_iter().skip(excess));
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(state.config.keep_alive))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_string_is_read_and_bad_values_are_named() {
        let parsed = LogsRequest::parse(Some("level=warn&service=kv&limit=5&follow=1")).unwrap();
        assert_eq!(parsed.query.level, Some("warn".parse().unwrap()));
        assert_eq!(parsed.query.limit, 5);
        assert_eq!(parsed.service.as_deref(), Some("kv"));
        assert!(parsed.follow);
        let defaults = LogsRequest::parse(None).unwrap();
        assert_eq!(defaults.query, LogQuery::default());
        assert!(!defaults.follow);
        let error = |query: &str| LogsRequest::parse(Some(query)).unwrap_err();
        assert!(error("level=loud").contains("unknown level"));
        assert!(error("limit=0").contains("limit"));
        assert!(error("limit=10001").contains("limit"));
        assert!(error("limit=x").contains("limit"));
        assert!(error("follow=maybe").contains("follow"));
        assert!(error("service=").contains("service"));
        assert!(error("colour=red").contains("unknown parameter"));
    }
}
