//! Keeping the route table in step with the distributor's topology.
//!
//! One task watches the topology the distributor client publishes and rebuilds the
//! [`RouteTable`] whenever it changes. It owns the pool of node connections: one
//! [`NodeClient`] per node (by address and dialect), kept across topology changes so that a
//! change elsewhere never drops a working connection, and dropped when the node leaves, which
//! closes it. A client that loses its connection reconnects by itself every 3 s for as long as
//! the node is expected.
//!
//! A node that leaves the topology while its connection is still up stays in rotation for
//! [`crate::Config::departure_grace`]: a restarted distributor learns the nodes again only as
//! they re-register, and the routes of the slower ones must not vanish meanwhile. While the
//! distributor is down, the last topology simply stays in force.
//!
//! A node that says it is not ready keeps its connection; the route table only marks it, and
//! [`crate::routes::Route::rotation`] decides.
//!
//! At start-up the topology may come from the gateway's topology cache rather than the
//! distributor (see [`shared::topology_cache`]): its nodes are connected to like any others,
//! with the handshake, and those that do not answer stay out of rotation.
//!
//! With a cluster secret every node connection starts with the handshake, so the gateway only
//! talks to nodes that know the secret. Original-design nodes (no protocol 2) cannot do it: they
//! are left out of the route table unless `--allow-legacy-nodes` is given.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use shared::{cluster::ClusterSecret, Dialect, NodeInfo, Topology};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::routes::{Node, NodeClient, RouteTable};

/// How the gateway tells the nodes apart: the same address may come back speaking another
/// dialect (an original-design node replaced by one of ours), which needs a new client.
type NodeKey = (String, bool);

fn node_key(info: &NodeInfo) -> NodeKey {
    (info.addr(), info.speaks_protocol_2())
}

/// A node that left the topology but is kept in rotation until `until`.
struct Departed {
    info: NodeInfo,
    until: Instant,
}

/// Which nodes the gateway connects to, and how.
#[derive(Debug, Clone, Default)]
pub struct NodePolicy {
    /// See [`crate::Config::departure_grace`].
    pub grace: Duration,
    /// Proven to every protocol-2 node at the start of each connection.
    pub secret: Option<ClusterSecret>,
    /// With a secret, still connect to original-design nodes.
    pub allow_legacy: bool,
}

impl NodePolicy {
    /// False for an original-design node when the cluster has a secret it cannot prove.
    fn admits(&self, info: &NodeInfo) -> bool {
        info.speaks_protocol_2() || self.secret.is_none() || self.allow_legacy
    }
}

/// The task's state: the connections, and the nodes on their way out.
struct Pool {
    clients: HashMap<NodeKey, NodeClient>,
    departed: HashMap<NodeKey, Departed>,
    current: HashMap<NodeKey, NodeInfo>,
    /// Original-design nodes left out because of the secret, so each is reported once while
    /// it stays in the topology rather than at every change.
    refused: HashSet<NodeKey>,
    policy: NodePolicy,
}

impl Pool {
    fn new(policy: NodePolicy) -> Pool {
        Pool {
            clients: HashMap::new(),
            departed: HashMap::new(),
            current: HashMap::new(),
            refused: HashSet::new(),
            policy,
        }
    }

    /// Takes a new topology in: nodes without urls (gateways) are not routed to, nor are
    /// original-design nodes the policy does not admit.
    fn update(&mut self, topology: &Topology) {
        let now = Instant::now();
        let mut refused = HashSet::new();
        let incoming: HashMap<NodeKey, NodeInfo> = topology
            .iter()
            .filter(|info| !info.urls.is_empty())
            .filter(|info| {
                if self.policy.admits(info) {
                    return true;
                }
                let key = node_key(info);
                if !self.refused.contains(&key) {
                    warn!(addr = %key.0, name = %info.name,
                        "not connecting to an original-design node: it cannot prove the cluster \
                         secret (start the gateway with --allow-legacy-nodes to accept it)");
                }
                refused.insert(key);
                false
            })
            .map(|info| (node_key(info), info.clone()))
            .collect();
        self.refused = refused;
        for (key, info) in self.current.drain() {
            if incoming.contains_key(&key) {
                continue;
            }
            let connected = self.clients.get(&key).is_some_and(NodeClient::is_connected);
            let grace = self.policy.grace;
            if connected && !grace.is_zero() {
                info!(addr = %key.0, name = %info.name, ?grace,
                    "node left the topology; kept in rotation for the grace period");
                self.departed.insert(
                    key,
                    Departed {
                        info,
                        until: now + grace,
                    },
                );
            } else {
                info!(addr = %key.0, name = %info.name, "node left the topology");
            }
        }
        for key in incoming.keys() {
            if self.departed.remove(key).is_some() {
                debug!(addr = %key.0, "node is back in the topology");
            }
        }
        self.current = incoming;
    }

    /// Forgets departed nodes whose grace period is over.
    fn expire(&mut self, now: Instant) {
        self.departed.retain(|key, departed| {
            let keep = departed.until > now;
            if !keep {
                info!(addr = %key.0, name = %departed.info.name, "departed node removed");
            }
            keep
        });
    }

    fn next_expiry(&self) -> Option<Instant> {
        self.departed.values().map(|departed| departed.until).min()
    }

    /// The route table for the current and departing nodes, connecting to new nodes and
    /// dropping the clients of nodes that are gone.
    fn table(&mut self) -> RouteTable {
        let mut wanted: Vec<(&NodeKey, &NodeInfo, bool)> = self
            .current
            .iter()
            .map(|(key, info)| (key, info, false))
            .chain(
                self.departed
                    .iter()
                    .map(|(key, departed)| (key, &departed.info, true)),
            )
            .collect();
        // A stable order keeps the rotation and the topology page predictable.
        wanted.sort_by(|a, b| a.0.cmp(b.0));

        let mut clients = HashMap::with_capacity(wanted.len());
        let mut nodes = Vec::with_capacity(wanted.len());
        for (key, info, leaving) in wanted {
            let dialect = if key.1 {
                Dialect::Packet
            } else {
                Dialect::Legacy
            };
            let client = match self.clients.remove(key) {
                Some(client) => client,
                None => {
                    info!(addr = %key.0, name = %info.name, ?dialect, urls = ?info.urls, "connecting to node");
                    NodeClient::connect_with_secret(
                        key.0.clone(),
                        dialect,
                        self.policy.secret.clone(),
                    )
                }
            };
            clients.insert(key.clone(), client.clone());
            nodes.push(Arc::new(Node {
                addr: key.0.clone(),
                name: info.name.clone(),
                dialect,
                urls: info.urls.clone(),
                scopes: info.scopes.clone(),
                leaving,
                ready: info.ready,
                client,
            }));
        }
        // What is left in the old map belongs to nodes that are gone; dropping the clients
        // closes their connections once the requests still using them are done.
        self.clients = clients;
        RouteTable::new(nodes)
    }
}

/// Rebuilds the route table from `topology` until `shutdown`, publishing each new table.
pub(crate) fn spawn(
    mut topology: watch::Receiver<Arc<Topology>>,
    policy: NodePolicy,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<RouteTable>> {
    let mut pool = Pool::new(policy);
    pool.update(&topology.borrow_and_update());
    let (table_tx, table_rx) = watch::channel(Arc::new(pool.table()));
    tokio::spawn(async move {
        let mut topology_open = true;
        loop {
            let expiry = pool.next_expiry();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = topology.changed(), if topology_open => {
                    if changed.is_err() {
                        // The distributor client stopped (shutdown): keep the last table.
                        topology_open = false;
                        continue;
                    }
                    let nodes = topology.borrow_and_update().clone();
                    pool.update(&nodes);
                }
                _ = sleep_until(expiry), if expiry.is_some() => {
                    pool.expire(Instant::now());
                }
            }
            table_tx.send_replace(Arc::new(pool.table()));
        }
        // The last table stays published, so requests still being served at shutdown keep
        // their routes; the connections close when the server drops its last table.
    });
    table_rx
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(port: u16, protocol: Option<u8>) -> NodeInfo {
        NodeInfo {
            host: "127.0.0.1".into(),
            port,
            name: "kv".into(),
            urls: vec!["GET/kv".into()],
            protocol,
            ..NodeInfo::default()
        }
    }

    fn admitted(policy: NodePolicy) -> Vec<u16> {
        let mut pool = Pool::new(policy);
        let topology: Topology = vec![node(1, Some(2)), node(2, None)];
        pool.update(&topology);
        let mut ports: Vec<u16> = pool.current.values().map(|info| info.port).collect();
        ports.sort();
        ports
    }

    #[test]
    fn with_a_secret_original_design_nodes_need_the_flag() {
        let secret = Some(ClusterSecret::new(b"s".to_vec()));
        assert_eq!(admitted(NodePolicy::default()), [1, 2]);
        let strict = NodePolicy {
            secret: secret.clone(),
            ..NodePolicy::default()
        };
        assert_eq!(admitted(strict), [1]);
        let lenient = NodePolicy {
            secret,
            allow_legacy: true,
            ..NodePolicy::default()
        };
        assert_eq!(admitted(lenient), [1, 2]);
    }
}
