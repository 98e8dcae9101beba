//! The registry: which nodes are registered, which service owns which url, and the topology
//! packet that describes them.
//!
//! Each connection registers at most one node, whose JSON is encoded once when it registers.
//! Every change assembles the topology packet from those pieces (a copy, no serialization) and
//! publishes it on a `watch` channel; each connection task forwards the latest value to its
//! node once the previous one has been written. A node that reads slowly therefore has at most
//! one topology pending on our side, the newest, and every node shares that one buffer, which
//! keeps memory linear in the number of nodes however often the topology changes.
//!
//! A registration changes the topology only if it keeps the rules every node relies on; they are
//! checked under the same lock as the change, so two registrations racing cannot both win:
//! - **Route ownership.** The first service name to register a url owns it for as long as any
//!   node of that name is registered; a node of another name claiming it is refused. Nodes of
//!   the same name are replicas and share their urls.
//! - **One connection per address.** A `host:port` held by one live connection cannot be claimed
//!   by another: the first keeps it until it leaves or is evicted.
//! - **Per-address cap.** One IP address holds at most so many registrations at once.
//! - **Bounded topology.** The encoded topology never grows past what nodes accept as one frame.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use bytes::{BufMut, Bytes, BytesMut};
use shared::{
    codec::{encode_frame, DEFAULT_MAX_FRAME_LENGTH, DELIMITER},
    packet::NodeInfo,
};
use tokio::sync::watch;

/// Identifies one accepted connection for as long as the process runs.
pub type ConnectionId = u64;

/// Registrations one IP address may hold at once by default.
pub const MAX_REGISTRATIONS_PER_IP: usize = 256;

/// How much longer than the topology packet the answer to a `GET /distributes` can be: the
/// same list, with the request's key (up to 20 digits) instead of `0`.
const ANSWER_HEADROOM: usize = 20;

/// The topology packet around its list of nodes: what `encode_frame` writes for
/// `Packet::request("GET", DISTRIBUTES_URI, nodes)` (a test checks that it stays so).
const TOPOLOGY_HEAD: &[u8] = br#"{"uri":"/distributes","method":"GET","key":0,"params":["#;
const TOPOLOGY_TAIL: &[u8] = "]}¶".as_bytes();

/// What the registry lets its nodes hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryLimits {
    /// Registrations one peer IP address may hold at once.
    pub max_registrations_per_ip: usize,
    /// The longest topology frame (delimiter excluded) the registry publishes: the maximum frame
    /// length of the nodes, which would otherwise refuse the topology and never learn of a change.
    pub max_topology_length: usize,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        RegistryLimits {
            max_registrations_per_ip: MAX_REGISTRATIONS_PER_IP,
            max_topology_length: DEFAULT_MAX_FRAME_LENGTH,
        }
    }
}

/// The topology as published: the encoded packet every node is sent, shared by all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The `GET /distributes` packet, delimiter included.
    pub frame: Bytes,
    /// How many nodes it lists.
    pub nodes: usize,
}

/// Why a registration was refused. The topology is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("url {url:?} belongs to service {owner:?}")]
    UrlOwned { url: String, owner: String },
    #[error("address already registered by another connection: {addr}")]
    AddressTaken { addr: String },
    #[error("{ip} already holds {max} registrations, the most one address may hold")]
    TooManyFromAddress { ip: IpAddr, max: usize },
    #[error("the topology would grow to {length} bytes, more than the {max} bytes a node accepts")]
    TopologyTooLarge { length: usize, max: usize },
}

impl RegisterError {
    /// The status of the error packet that answers the registration.
    pub fn status(&self) -> u16 {
        match self {
            RegisterError::UrlOwned { .. } => 403,
            RegisterError::AddressTaken { .. } => 409,
            RegisterError::TooManyFromAddress { .. } => 429,
            RegisterError::TopologyTooLarge { .. } => 413,
        }
    }
}

/// A cheap-to-clone handle to the shared registry.
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

struct Shared {
    limits: RegistryLimits,
    state: Mutex<State>,
    topology: watch::Sender<Topology>,
}

#[derive(Default)]
struct State {
    /// Registered nodes by connection, in connection order so the topology order is stable.
    nodes: BTreeMap<ConnectionId, Entry>,
    /// Which service name owns each registered url.
    owners: HashMap<String, String>,
    /// Registered nodes per service name: a name keeps its urls while it has any.
    per_name: HashMap<String, usize>,
    /// Registered nodes per peer address, for the per-address cap.
    per_ip: HashMap<IpAddr, usize>,
    /// The total length of the nodes' JSON, so a registration's effect on the topology's length
    /// is known before anything changes.
    json_length: usize,
}

struct Entry {
    node: NodeInfo,
    /// The address the registration came from (not the `host` it may advertise).
    peer_ip: IpAddr,
    /// The node as JSON, its piece of the topology packet.
    json: Bytes,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(RegistryLimits::default())
    }
}

impl Registry {
    pub fn new(limits: RegistryLimits) -> Registry {
        Registry {
            shared: Arc::new(Shared {
                limits,
                state: Mutex::default(),
                topology: watch::channel(encode_topology(&BTreeMap::new(), 0)).0,
            }),
        }
    }

    /// Registers (or updates) the node on connection `id`, which came from `peer_ip`, if it keeps
    /// the registry's rules (see the module docs). A refused registration changes nothing: a node
    /// already registered on `id` stays as it was.
    pub fn register(
        &self,
        id: ConnectionId,
        peer_ip: IpAddr,
        node: NodeInfo,
    ) -> Result<(), RegisterError> {
        let limits = &self.shared.limits;
        let mut state = self.shared.state.lock().unwrap();
        let previous = state.nodes.get(&id).map(|entry| &entry.node);
        if previous == Some(&node) {
            return Ok(());
        }
        let previous_name = previous.map(|known| known.name.clone());

        if let Some((_, taken)) = state.nodes.iter().find(|(other, entry)| {
            **other != id && entry.node.host == node.host && entry.node.port == node.port
        }) {
            return Err(RegisterError::AddressTaken {
                addr: taken.node.addr(),
            });
        }
        for url in &node.urls {
            let Some(owner) = state.owners.get(url) else {
                continue;
            };
            // This connection's own entry does not keep a name alive against itself: a node
            // renaming itself releases what only it held.
            let others_of_owner = state
                .per_name
                .get(owner)
                .copied()
                .unwrap_or(0)
                .saturating_sub(usize::from(previous_name.as_ref() == Some(owner)));
            if *owner != node.name && others_of_owner > 0 {
                return Err(RegisterError::UrlOwned {
                    url: url.clone(),
                    owner: owner.clone(),
                });
            }
        }
        if previous.is_none() {
            let held = state.per_ip.get(&peer_ip).copied().unwrap_or(0);
            if held >= limits.max_registrations_per_ip {
                return Err(RegisterError::TooManyFromAddress {
                    ip: peer_ip,
                    max: limits.max_registrations_per_ip,
                });
            }
        }

        let json = node_json(&node);
        let json_length = state.json_length + json.len()
            - state.nodes.get(&id).map_or(0, |entry| entry.json.len());
        let nodes = state.nodes.len() + usize::from(previous.is_none());
        let length = topology_length(nodes, json_length) - DELIMITER.len();
        if length + ANSWER_HEADROOM > limits.max_topology_length {
            return Err(RegisterError::TopologyTooLarge {
                length,
                max: limits.max_topology_length,
            });
        }

        state.json_length = json_length;
        let entry = Entry {
            node: node.clone(),
            peer_ip,
            json,
        };
        state.nodes.insert(id, entry);

        match previous_name {
            Some(name) if name == node.name => {}
            Some(name) => {
                state.release_name(&name);
                *state.per_name.entry(node.name.clone()).or_default() += 1;
            }
            None => {
                *state.per_ip.entry(peer_ip).or_default() += 1;
                *state.per_name.entry(node.name.clone()).or_default() += 1;
            }
        }
        for url in node.urls {
            state.owners.entry(url).or_insert_with(|| node.name.clone());
        }
        let topology = encode_topology(&state.nodes, state.json_length);
        self.shared.topology.send_replace(topology);
        Ok(())
    }

    /// Records whether the node on connection `id` is ready to serve, publishing the topology
    /// when that changes it. False when nothing changed (no node on `id`, or the same
    /// readiness). A change that would take the topology past its bound is refused.
    pub fn set_ready(&self, id: ConnectionId, ready: bool) -> Result<bool, RegisterError> {
        let limits = &self.shared.limits;
        let mut state = self.shared.state.lock().unwrap();
        let json_length = state.json_length;
        let nodes = state.nodes.len();
        let Some(entry) = state.nodes.get_mut(&id) else {
            return Ok(false);
        };
        if entry.node.ready == ready {
            return Ok(false);
        }
        let mut node = entry.node.clone();
        node.ready = ready;
        let json = node_json(&node);
        let json_length = json_length + json.len() - entry.json.len();
        let length = topology_length(nodes, json_length) - DELIMITER.len();
        if length + ANSWER_HEADROOM > limits.max_topology_length {
            return Err(RegisterError::TopologyTooLarge {
                length,
                max: limits.max_topology_length,
            });
        }
        entry.node = node;
        entry.json = json;
        state.json_length = json_length;
        let topology = encode_topology(&state.nodes, state.json_length);
        self.shared.topology.send_replace(topology);
        Ok(true)
    }

    /// Removes the node on connection `id`, if it registered one.
    pub fn remove(&self, id: ConnectionId) -> Option<NodeInfo> {
        let mut state = self.shared.state.lock().unwrap();
        let removed = state.nodes.remove(&id)?;
        state.json_length -= removed.json.len();
        if let Some(held) = state.per_ip.get_mut(&removed.peer_ip) {
            *held -= 1;
            if *held == 0 {
                state.per_ip.remove(&removed.peer_ip);
            }
        }
        state.release_name(&removed.node.name);
        let topology = encode_topology(&state.nodes, state.json_length);
        self.shared.topology.send_replace(topology);
        Some(removed.node)
    }

    /// The latest topology, changing whenever the registry does.
    pub fn subscribe(&self) -> watch::Receiver<Topology> {
        self.shared.topology.subscribe()
    }

    /// The registered nodes, in the order their connections were accepted.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let state = self.shared.state.lock().unwrap();
        state
            .nodes
            .values()
            .map(|entry| entry.node.clone())
            .collect()
    }

    /// True when a node is registered on connection `id`.
    pub fn is_registered(&self, id: ConnectionId) -> bool {
        self.shared.state.lock().unwrap().nodes.contains_key(&id)
    }

    /// The service that owns `url`, if any.
    pub fn owner_of(&self, url: &str) -> Option<String> {
        self.shared.state.lock().unwrap().owners.get(url).cloned()
    }
}

impl State {
    /// One node of `name` left (or renamed itself); the last one takes the name's urls with it.
    fn release_name(&mut self, name: &str) {
        let Some(count) = self.per_name.get_mut(name) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            self.per_name.remove(name);
            self.owners.retain(|_, owner| owner != name);
        }
    }
}

/// A node's JSON as the codec writes it (`¶` escaped), without the delimiter.
fn node_json(node: &NodeInfo) -> Bytes {
    let frame = encode_frame(node).expect("a node info always encodes");
    frame.slice(..frame.len() - DELIMITER.len())
}

/// The length of the topology frame for `nodes` nodes whose JSON is `json_length` bytes long.
fn topology_length(nodes: usize, json_length: usize) -> usize {
    let commas = nodes.saturating_sub(1);
    TOPOLOGY_HEAD.len() + json_length + commas + TOPOLOGY_TAIL.len()
}

/// The topology packet, assembled from the nodes' JSON.
fn encode_topology(nodes: &BTreeMap<ConnectionId, Entry>, json_length: usize) -> Topology {
    let mut frame = BytesMut::with_capacity(topology_length(nodes.len(), json_length));
    frame.put_slice(TOPOLOGY_HEAD);
    for (i, entry) in nodes.values().enumerate() {
        if i > 0 {
            frame.put_u8(b',');
        }
        frame.put_slice(&entry.json);
    }
    frame.put_slice(TOPOLOGY_TAIL);
    Topology {
        frame: frame.freeze(),
        nodes: nodes.len(),
    }
}

#[cfg(test)]
mod tests {
    use shared::{packet::DISTRIBUTES_URI, Packet};

    use super::*;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn node(port: u16) -> NodeInfo {
        named("kv", port, &["GET/kv"])
    }

    fn named(name: &str, port: u16, urls: &[&str]) -> NodeInfo {
        NodeInfo {
            host: "127.0.0.1".into(),
            port,
            name: name.into(),
            urls: urls.iter().map(|url| url.to_string()).collect(),
            protocol: Some(2),
            ..NodeInfo::default()
        }
    }

    fn peer(last: u8) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, last))
    }

    #[test]
    fn registering_publishes_the_topology() {
        let registry = Registry::default();
        let topology = registry.subscribe();
        registry.register(1, PEER, node(9010)).unwrap();
        assert!(topology.has_changed().unwrap());
        assert_eq!(topology.borrow().nodes, 1);
        let text = String::from_utf8(topology.borrow().frame.to_vec()).unwrap();
        assert!(text.contains(r#""port":9010"#), "{text}");
        assert!(text.ends_with('¶'));
    }

    #[test]
    fn the_topology_is_what_the_codec_would_write() {
        let registry = Registry::default();
        let expected = |nodes: Vec<NodeInfo>| {
            let packet = Packet::request("GET", DISTRIBUTES_URI, Default::default());
            encode_frame(packet.map_params(|_| nodes)).unwrap()
        };
        assert_eq!(registry.subscribe().borrow().frame, expected(vec![]));
        let mut odd = named("odd¶\"name", 2, &["GET/a¶"]);
        odd.scopes.insert("GET/a¶".into(), "s".into());
        registry.register(1, PEER, node(1)).unwrap();
        registry.register(2, PEER, odd).unwrap();
        registry.register(3, PEER, node(3)).unwrap();
        registry.remove(1);
        let topology = registry.subscribe().borrow().frame.clone();
        assert_eq!(topology, expected(registry.nodes()));
    }

    #[test]
    fn registering_the_same_node_again_publishes_nothing() {
        let registry = Registry::default();
        registry.register(1, PEER, node(9010)).unwrap();
        let mut topology = registry.subscribe();
        topology.borrow_and_update();
        registry.register(1, PEER, node(9010)).unwrap();
        assert!(!topology.has_changed().unwrap());
    }

    #[test]
    fn a_new_connection_cannot_take_an_address_another_one_holds() {
        let registry = Registry::default();
        registry.register(1, PEER, node(9010)).unwrap();
        registry.register(2, PEER, node(9011)).unwrap();
        let mut topology = registry.subscribe();
        topology.borrow_and_update();
        let refused = registry.register(3, PEER, node(9010)).unwrap_err();
        assert_eq!(
            refused,
            RegisterError::AddressTaken {
                addr: "127.0.0.1:9010".into()
            }
        );
        assert_eq!(refused.status(), 409);
        assert_eq!(registry.nodes(), vec![node(9010), node(9011)]);
        assert!(registry.is_registered(1));
        assert!(!registry.is_registered(3));
        assert!(!topology.has_changed().unwrap());

        // Once the holder leaves, the address is free again.
        registry.remove(1);
        registry.register(3, PEER, node(9010)).unwrap();
        assert_eq!(registry.nodes(), vec![node(9011), node(9010)]);
    }

    #[test]
    fn a_url_belongs_to_the_first_name_while_any_node_of_it_is_registered() {
        let registry = Registry::default();
        registry
            .register(1, PEER, named("kv", 1, &["GET/kv", "PUT/kv"]))
            .unwrap();
        // A replica without the url keeps the name, and so the url, alive.
        registry.register(2, PEER, named("kv", 2, &[])).unwrap();
        // Replicas share.
        registry
            .register(3, PEER, named("kv", 3, &["GET/kv"]))
            .unwrap();

        let mut topology = registry.subscribe();
        topology.borrow_and_update();
        let refused = registry
            .register(4, PEER, named("thief", 4, &["GET/other", "PUT/kv"]))
            .unwrap_err();
        assert_eq!(
            refused.to_string(),
            r#"url "PUT/kv" belongs to service "kv""#
        );
        assert_eq!(refused.status(), 403);
        assert!(!topology.has_changed().unwrap());
        assert_eq!(registry.nodes().len(), 3);

        registry.remove(1);
        registry.remove(3);
        assert!(registry
            .register(4, PEER, named("thief", 4, &["PUT/kv"]))
            .is_err());
        // Gateways register no urls and are never in the way.
        registry.register(5, PEER, named("gate", 5, &[])).unwrap();
        // The last node of the name leaves: the url is free.
        registry.remove(2);
        assert_eq!(registry.owner_of("PUT/kv"), None);
        registry
            .register(4, PEER, named("other", 4, &["PUT/kv"]))
            .unwrap();
        assert_eq!(registry.owner_of("PUT/kv").as_deref(), Some("other"));
    }

    #[test]
    fn a_refused_update_leaves_the_connection_as_it_was() {
        let registry = Registry::default();
        registry
            .register(1, PEER, named("kv", 1, &["GET/kv"]))
            .unwrap();
        registry
            .register(2, PEER, named("notice", 2, &["GET/notices"]))
            .unwrap();
        assert!(registry
            .register(2, PEER, named("notice", 2, &["GET/notices", "GET/kv"]))
            .is_err());
        assert_eq!(registry.nodes()[1], named("notice", 2, &["GET/notices"]));
        // The only node of a name updating its urls still holds the ones it dropped.
        registry.register(1, PEER, named("kv", 1, &[])).unwrap();
        assert_eq!(registry.owner_of("GET/kv").as_deref(), Some("kv"));
        assert!(registry
            .register(2, PEER, named("notice", 2, &["GET/kv"]))
            .is_err());
        // Renaming its only node releases what the old name held.
        registry.register(1, PEER, named("kv2", 1, &[])).unwrap();
        registry
            .register(2, PEER, named("notice", 2, &["GET/notices", "GET/kv"]))
            .unwrap();
    }

    #[test]
    fn one_address_holds_at_most_its_share_of_registrations() {
        let registry = Registry::new(RegistryLimits {
            max_registrations_per_ip: 2,
            ..RegistryLimits::default()
        });
        registry.register(1, peer(1), node(1)).unwrap();
        registry.register(2, peer(1), node(2)).unwrap();
        let refused = registry.register(3, peer(1), node(3)).unwrap_err();
        assert_eq!(refused.status(), 429);
        // Updating a registration is not another one.
        registry.register(2, peer(1), node(22)).unwrap();
        registry.register(4, peer(2), node(4)).unwrap();
        registry.remove(1);
        registry.register(3, peer(1), node(3)).unwrap();
        assert_eq!(registry.nodes().len(), 3);
    }

    #[test]
    fn the_topology_never_grows_past_what_a_node_accepts() {
        let max = 1024;
        let registry = Registry::new(RegistryLimits {
            max_topology_length: max,
            ..RegistryLimits::default()
        });
        let mut refused = None;
        for port in 1..100 {
            if let Err(err) = registry.register(u64::from(port), PEER, node(port)) {
                refused = Some((port, err));
                break;
            }
        }
        let (port, err) = refused.expect("the topology reaches its bound");
        assert!(
            matches!(err, RegisterError::TopologyTooLarge { length, max: m }
                if length + ANSWER_HEADROOM > m && m == max),
            "{err}"
        );
        assert_eq!(registry.nodes().len(), usize::from(port) - 1);
        let topology = registry.subscribe().borrow().frame.clone();
        assert!(topology.len() - DELIMITER.len() + ANSWER_HEADROOM <= max);
        // Room again once a node leaves.
        registry.remove(1);
        registry
            .register(u64::from(port), PEER, node(port))
            .unwrap();
    }

    #[test]
    fn readiness_changes_publish_and_repeats_do_not() {
        let registry = Registry::default();
        registry.register(1, PEER, node(9010)).unwrap();
        let mut topology = registry.subscribe();
        topology.borrow_and_update();
        assert_eq!(registry.set_ready(1, true), Ok(false));
        assert!(!topology.has_changed().unwrap());

        assert_eq!(registry.set_ready(1, false), Ok(true));
        assert!(topology.has_changed().unwrap());
        let text = String::from_utf8(topology.borrow_and_update().frame.to_vec()).unwrap();
        assert!(text.contains(r#""ready":false"#), "{text}");
        assert!(!registry.nodes()[0].ready);
        assert_eq!(registry.set_ready(1, false), Ok(false));

        assert_eq!(registry.set_ready(1, true), Ok(true));
        let text = String::from_utf8(topology.borrow_and_update().frame.to_vec()).unwrap();
        assert!(!text.contains("ready"), "{text}");
        // Nothing registered on the connection: nothing to change.
        assert_eq!(registry.set_ready(2, false), Ok(false));
    }

    #[test]
    fn removing_publishes_and_forgets() {
        let registry = Registry::default();
        registry.register(1, PEER, node(9010)).unwrap();
        let mut topology = registry.subscribe();
        topology.borrow_and_update();
        assert_eq!(registry.remove(1), Some(node(9010)));
        assert!(topology.has_changed().unwrap());
        assert_eq!(registry.remove(1), None);
        assert!(registry.nodes().is_empty());
        assert_eq!(registry.owner_of("GET/kv"), None);
    }
}
