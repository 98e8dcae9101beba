//! The packet: the one message shape every connection carries.
//!
//! A request is `{"uri","method","key","params"}`; its response repeats `uri`, `method` and `key`
//! and carries the result in `params`, with an optional HTTP-like `status` and an `error`. The
//! remaining fields are the extensions described in docs/PROTOCOL.md (streams, cancel, request
//! ids). Unknown fields are ignored on input and absent optional fields are left out on output, so
//! a node that only knows the original four fields can still talk to us.
//!
//! The control messages exchanged with the distributor (registration, topology, heartbeat) are
//! ordinary packets with key 0; their `params` shapes live here too.

use std::{collections::BTreeMap, fmt};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{value::RawValue, Value};

/// The `uri` of registration (`POST`) and topology (`GET`) packets.
pub const DISTRIBUTES_URI: &str = "/distributes";
/// The `uri` of heartbeat packets.
pub const HEARTBEAT_URI: &str = "/heartbeat";
/// The protocol version our nodes announce at registration.
pub const PROTOCOL_VERSION: u8 = 2;

fn is_false(value: &bool) -> bool {
    !value
}

fn is_true(value: &bool) -> bool {
    *value
}

fn ready_by_default() -> bool {
    true
}

/// One message on the wire. See docs/PROTOCOL.md for every field.
///
/// `params` is a [`Value`] for code that looks inside it. Code that only passes it on (the
/// gateway relaying answers, a service sending one notice to many subscribers) uses
/// [`RawParams`] and never parses or rebuilds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Packet<P = Value> {
    #[serde(default)]
    pub uri: String,
    #[serde(default)]
    pub method: String,
    /// Pairs a response with its request. Requests use keys from 1 up; 0 marks control packets.
    #[serde(default)]
    pub key: u64,
    #[serde(default)]
    pub params: P,
    /// HTTP-like status of a response; absent means 200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// On a request: the caller accepts a stream of events rather than one answer. On a
    /// response: this packet is one event of a stream.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stream: bool,
    /// On a response: the last packet of a stream.
    #[serde(default, skip_serializing_if = "is_false")]
    pub end: bool,
    /// On a stream request: the caller also takes this stream's events in packets that carry
    /// one event to several of its streams at once (`keys`). Without it, every event comes in a
    /// packet of its own.
    #[serde(default, skip_serializing_if = "is_false")]
    pub multicast: bool,
    /// On a stream event sent to several streams of one connection at once: all their keys
    /// (`key` is the first). Each of those streams gets the event as if it had come alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<u64>,
    /// On a request: the caller is no longer interested in the stream with this key.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cancel: bool,
    /// On a stream event: the event's id (becomes the SSE `id:` line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    /// On a stream event: the event's name (becomes the SSE `event:` line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// The id of the HTTP request this packet serves, for correlating logs across processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// On a request: who the caller is, as the gateway verified it. Only the gateway sets it
    /// (it drops whatever a client sent); services trust it because the link is authenticated.
    /// Absent on a request a cluster member makes on its own behalf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Identity>,
    /// On a request: the W3C trace context (`00-<trace id>-<parent span id>-<flags>`) of the
    /// request this one serves, so that the node continues that trace (see `crate::trace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The scope that implies every other one.
pub const ADMIN_SCOPE: &str = "admin";

/// A verified caller: the token's subject (none for an anonymous caller) and its scopes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
}

impl Identity {
    /// True when the caller holds `scope`, or `admin`, which implies every scope.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes
            .iter()
            .any(|held| held == scope || held == ADMIN_SCOPE)
    }
}

impl<P> Packet<P> {
    /// The same packet with its params converted by `convert`.
    pub fn map_params<Q>(self, convert: impl FnOnce(P) -> Q) -> Packet<Q> {
        Packet {
            uri: self.uri,
            method: self.method,
            key: self.key,
            params: convert(self.params),
            status: self.status,
            error: self.error,
            stream: self.stream,
            end: self.end,
            multicast: self.multicast,
            keys: self.keys,
            cancel: self.cancel,
            id: self.id,
            event: self.event,
            request_id: self.request_id,
            auth: self.auth,
            traceparent: self.traceparent,
        }
    }

    /// A response to `request` carrying `params`, status 200.
    pub fn reply_to<R>(request: &Packet<R>, params: P) -> Packet<P> {
        // Spelled out rather than `..Packet::default()`, which would build default params only
        // to drop them.
        Packet {
            uri: request.uri.clone(),
            method: request.method.clone(),
            key: request.key,
            params,
            status: None,
            error: None,
            stream: false,
            end: false,
            multicast: false,
            keys: Vec::new(),
            cancel: false,
            id: None,
            event: None,
            request_id: None,
            auth: None,
            traceparent: None,
        }
    }

    /// The response status, 200 when absent.
    pub fn status(&self) -> u16 {
        self.status.unwrap_or(200)
    }
}

impl<P: Params> Packet<P> {
    /// True for a stream event that carries nothing: the packet that opens a stream before its
    /// first real event. Callers skip it.
    pub fn is_empty_event(&self) -> bool {
        self.stream
            && !self.end
            && self.params.is_null()
            && self.id.is_none()
            && self.event.is_none()
    }
}

impl Packet {
    /// A request packet; the client that sends it assigns the key.
    pub fn request(method: &str, uri: &str, params: Value) -> Packet {
        Packet {
            uri: uri.to_owned(),
            method: method.to_owned(),
            params,
            ..Packet::default()
        }
    }

    /// True for a heartbeat packet (key 0, uri `/heartbeat`).
    pub fn is_heartbeat(&self) -> bool {
        self.key == 0 && self.uri == HEARTBEAT_URI
    }
}

/// What a packet's `params` can be: a parsed [`Value`], or [`RawParams`] kept as the text it
/// arrived as.
pub trait Params:
    Serialize + DeserializeOwned + Default + Clone + fmt::Debug + Send + Sync + 'static
{
    fn from_value(value: Value) -> Self;
    fn is_null(&self) -> bool;
}

impl Params for Value {
    fn from_value(value: Value) -> Self {
        value
    }

    fn is_null(&self) -> bool {
        Value::is_null(self)
    }
}

/// JSON params kept as their text, unparsed: reading them only checks that they are valid JSON,
/// and writing them copies the text. For params that are passed on, not looked into.
///
/// The text is exactly what the sender wrote (whitespace included). When written into a frame,
/// a `¶` inside it is escaped like any other (see [`crate::codec`]).
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawParams(Box<RawValue>);

impl RawParams {
    /// Serializes `value` once, to be written many times.
    pub fn to_raw(value: &impl Serialize) -> serde_json::Result<RawParams> {
        serde_json::value::to_raw_value(value).map(RawParams)
    }

    /// Takes JSON text as it is, after checking that it is JSON.
    pub fn from_text(text: String) -> serde_json::Result<RawParams> {
        RawValue::from_string(text).map(RawParams)
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// The JSON text, without a copy.
    pub fn into_string(self) -> String {
        Box::<str>::from(self.0).into_string()
    }

    /// The params parsed, for the rare caller that must look inside after all.
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.get()).expect("raw params always hold valid JSON")
    }
}

impl Params for RawParams {
    fn from_value(value: Value) -> Self {
        RawParams::to_raw(&value).expect("a JSON value always serializes")
    }

    fn is_null(&self) -> bool {
        self.get() == "null"
    }
}

impl Default for RawParams {
    fn default() -> Self {
        RawParams::from_value(Value::Null)
    }
}

impl PartialEq for RawParams {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl fmt::Debug for RawParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

/// The correlation key of a request: top-level `key`, or `params.key` as original-design gateways
/// send it (a number or a numeric string).
pub fn key_in(value: &Value) -> Option<u64> {
    fn as_key(value: &Value) -> Option<u64> {
        match value {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
    }
    value
        .get("key")
        .and_then(as_key)
        .filter(|key| *key != 0)
        .or_else(|| value.get("params")?.get("key").and_then(as_key))
}

/// What a node tells the distributor about itself (`params` of `POST /distributes`).
///
/// On the wire each url is a string (`"GET/kv"`) or, from a protocol-2 node, an object naming
/// the scope a caller needs (`{"url":"PUT/kv","scope":"kv:write"}`); here they are the plain
/// urls and a map of url to scope.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RegistrationWire", into = "RegistrationWire")]
pub struct Registration {
    pub port: u16,
    pub name: String,
    pub urls: Vec<String>,
    /// The scope each url needs, for the urls that need one.
    pub scopes: BTreeMap<String, String>,
    /// Overrides the host the distributor sees on the socket (containers, NAT). Honoured only
    /// for a node that authenticated with the cluster secret.
    pub host: Option<String>,
    /// 2 for nodes that speak the extended protocol; absent for original-design nodes.
    pub protocol: Option<u8>,
}

/// A registration as it is written on the wire.
#[derive(Serialize, Deserialize)]
struct RegistrationWire {
    port: u16,
    name: String,
    #[serde(default)]
    urls: Vec<UrlEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    protocol: Option<u8>,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum UrlEntry {
    Plain(String),
    Scoped {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope: Option<String>,
    },
}

impl From<RegistrationWire> for Registration {
    fn from(wire: RegistrationWire) -> Self {
        let mut urls = Vec::with_capacity(wire.urls.len());
        let mut scopes = BTreeMap::new();
        for entry in wire.urls {
            match entry {
                UrlEntry::Plain(url) => urls.push(url),
                UrlEntry::Scoped { url, scope } => {
                    if let Some(scope) = scope {
                        scopes.insert(url.clone(), scope);
                    }
                    urls.push(url);
                }
            }
        }
        Registration {
            port: wire.port,
            name: wire.name,
            urls,
            scopes,
            host: wire.host,
            protocol: wire.protocol,
        }
    }
}

impl From<Registration> for RegistrationWire {
    fn from(mut registration: Registration) -> Self {
        let urls = registration
            .urls
            .into_iter()
            .map(|url| match registration.scopes.remove(&url) {
                Some(scope) => UrlEntry::Scoped {
                    url,
                    scope: Some(scope),
                },
                None => UrlEntry::Plain(url),
            })
            .collect();
        RegistrationWire {
            port: registration.port,
            name: registration.name,
            urls,
            host: registration.host,
            protocol: registration.protocol,
        }
    }
}

/// One node of the topology (an element of `params` of `GET /distributes`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeInfo {
    pub host: String,
    pub port: u16,
    pub name: String,
    #[serde(default)]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u8>,
    /// The scope a caller needs for each url that needs one. A separate map rather than objects
    /// in `urls`, so that original-design gateways still read `urls` as plain strings.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scopes: BTreeMap<String, String>,
    /// False while the node says it cannot serve (its store is unreachable, say); gateways
    /// route around it. Absent means ready, so original-design nodes and topologies from
    /// before the flag read as they always did, and a ready node's entry looks as it did.
    #[serde(default = "ready_by_default", skip_serializing_if = "is_true")]
    pub ready: bool,
}

impl Default for NodeInfo {
    fn default() -> Self {
        NodeInfo {
            host: String::new(),
            port: 0,
            name: String::new(),
            urls: Vec::new(),
            protocol: None,
            scopes: BTreeMap::new(),
            ready: true,
        }
    }
}

impl NodeInfo {
    /// The address to connect to, `host:port`, with IPv6 hosts bracketed.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// True when the node speaks the extended protocol (heartbeats, streams, top-level keys).
    pub fn speaks_protocol_2(&self) -> bool {
        self.protocol.unwrap_or(0) >= PROTOCOL_VERSION
    }
}

/// The whole topology, as broadcast by the distributor.
pub type Topology = Vec<NodeInfo>;

/// A registration packet for the distributor.
pub fn registration_packet(registration: &Registration) -> Packet {
    Packet::request(
        "POST",
        DISTRIBUTES_URI,
        serde_json::to_value(registration).expect("a registration always serializes"),
    )
}

/// A heartbeat packet, sent by the distributor and echoed by the node.
pub fn heartbeat_packet() -> Packet {
    Packet::request("GET", HEARTBEAT_URI, Value::Null)
}

/// The params of a node's heartbeat (its echo of the distributor's, or one it sends when its
/// readiness changes): `{"ready": bool}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatParams {
    pub ready: bool,
}

/// A node's heartbeat saying whether it is ready.
pub fn readiness_heartbeat(ready: bool) -> Packet {
    Packet::request(
        "GET",
        HEARTBEAT_URI,
        serde_json::to_value(HeartbeatParams { ready }).expect("heartbeat params serialize"),
    )
}

/// The readiness a heartbeat reports, if it reports one (original-design nodes and older nodes
/// echo the distributor's heartbeat as it came, with no params).
pub fn readiness_in(heartbeat: &Packet) -> Option<bool> {
    heartbeat.params.get("ready")?.as_bool()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_without_the_ready_flag_is_ready_and_a_ready_one_writes_none() {
        let old: NodeInfo =
            serde_json::from_str(r#"{"host":"127.0.0.1","port":1,"name":"kv"}"#).unwrap();
        assert!(old.ready);
        assert!(!serde_json::to_string(&old).unwrap().contains("ready"));
        let not_ready = NodeInfo {
            ready: false,
            ..old
        };
        let text = serde_json::to_string(&not_ready).unwrap();
        assert!(text.contains(r#""ready":false"#), "{text}");
        assert_eq!(serde_json::from_str::<NodeInfo>(&text).unwrap(), not_ready);
    }

    #[test]
    fn a_heartbeat_reports_readiness_only_when_it_says_so() {
        assert_eq!(readiness_in(&heartbeat_packet()), None);
        assert_eq!(readiness_in(&readiness_heartbeat(false)), Some(false));
        assert_eq!(readiness_in(&readiness_heartbeat(true)), Some(true));
        assert!(readiness_heartbeat(false).is_heartbeat());
    }
}
