//! The registry: which nodes are registered, and the topology packet that describes them.
//!
//! Each connection registers at most one node. Every change re-encodes the topology packet once
//! and publishes it on a `watch` channel; each connection task forwards the latest value to its
//! node when the node's queue has room. A node that reads slowly therefore has at most one
//! topology pending on our side, the newest, which keeps memory bounded however often the
//! topology changes.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use shared::{
    codec::encode_frame,
    packet::{NodeInfo, DISTRIBUTES_URI},
    Packet,
};
use tokio::sync::watch;

/// Identifies one accepted connection for as long as the process runs.
pub type ConnectionId = u64;

/// A cheap-to-clone handle to the shared registry.
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

struct Shared {
    /// Registered nodes by connection, in connection order so the topology order is stable.
    nodes: Mutex<BTreeMap<ConnectionId, NodeInfo>>,
    topology: watch::Sender<Bytes>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            shared: Arc::new(Shared {
                nodes: Mutex::default(),
                topology: watch::channel(encode_topology(&[])).0,
            }),
        }
    }
}

impl Registry {
    /// Registers (or updates) the node on connection `id`. Another connection claiming the same
    /// address is an older incarnation of the node that has not been noticed gone yet: it is
    /// dropped from the topology. Returns the entries that were replaced that way.
    pub fn register(&self, id: ConnectionId, node: NodeInfo) -> Vec<NodeInfo> {
        let mut nodes = self.shared.nodes.lock().unwrap();
        let stale: Vec<ConnectionId> = nodes
            .iter()
            .filter(|(other, known)| {
                **other != id && known.host == node.host && known.port == node.port
            })
            .map(|(other, _)| *other)
            .collect();
        let replaced = stale
            .iter()
            .filter_map(|other| nodes.remove(other))
            .collect();
        if nodes.get(&id) != Some(&node) || !stale.is_empty() {
            nodes.insert(id, node);
            self.publish(&nodes);
        }
        replaced
    }

    /// Removes the node on connection `id`, if it registered one.
    pub fn remove(&self, id: ConnectionId) -> Option<NodeInfo> {
        let mut nodes = self.shared.nodes.lock().unwrap();
        let removed = nodes.remove(&id);
        if removed.is_some() {
            self.publish(&nodes);
        }
        removed
    }

    /// The latest encoded topology packet, changing whenever the registry does.
    pub fn subscribe(&self) -> watch::Receiver<Bytes> {
        self.shared.topology.subscribe()
    }

    /// The registered nodes, in the order their connections were accepted.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.shared
            .nodes
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect()
    }

    /// True when the node on connection `id` is still the one registered there.
    pub fn is_registered(&self, id: ConnectionId) -> bool {
        self.shared.nodes.lock().unwrap().contains_key(&id)
    }

    fn publish(&self, nodes: &BTreeMap<ConnectionId, NodeInfo>) {
        let nodes: Vec<NodeInfo> = nodes.values().cloned().collect();
        self.shared.topology.send_replace(encode_topology(&nodes));
    }
}

fn encode_topology(nodes: &[NodeInfo]) -> Bytes {
    let packet = Packet::request(
        "GET",
        DISTRIBUTES_URI,
        serde_json::to_value(nodes).expect("node infos always serialize"),
    );
    encode_frame(&packet).expect("a topology packet always encodes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(port: u16) -> NodeInfo {
        NodeInfo {
            host: "127.0.0.1".into(),
            port,
            name: "kv".into(),
            urls: vec!["GET/kv".into()],
            protocol: Some(2),
        }
    }

    #[test]
    fn registering_publishes_the_topology() {
        let registry = Registry::default();
        let topology = registry.subscribe();
        registry.register(1, node(9010));
        assert!(topology.has_changed().unwrap());
        let text = String::from_utf8(topology.borrow().to_vec()).unwrap();
        assert!(text.contains(r#""port":9010"#), "{text}");
        assert!(text.ends_with('¶'));
    }

    #[test]
    fn registering_the_same_node_again_publishes_nothing() {
        let registry = Registry::default();
        registry.register(1, node(9010));
        let mut topology = registry.subscribe();
        topology.borrow_and_update();
        registry.register(1, node(9010));
        assert!(!topology.has_changed().unwrap());
    }

    #[test]
    fn a_new_connection_for_the_same_address_replaces_the_old_one() {
        let registry = Registry::default();
        registry.register(1, node(9010));
        registry.register(2, node(9011));
        let replaced = registry.register(3, node(9010));
        assert_eq!(replaced, vec![node(9010)]);
        assert_eq!(registry.nodes(), vec![node(9011), node(9010)]);
        assert!(!registry.is_registered(1));
    }

    #[test]
    fn removing_publishes_and_forgets() {
        let registry = Registry::default();
        registry.register(1, node(9010));
        let mut topology = registry.subscribe();
        topology.borrow_and_update();
        assert_eq!(registry.remove(1), Some(node(9010)));
        assert!(topology.has_changed().unwrap());
        assert_eq!(registry.remove(1), None);
        assert!(registry.nodes().is_empty());
    }
}
