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

use std::{collections::HashMap, sync::Arc, time::Duration};

use shared::{Dialect, NodeInfo, Topology};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

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

/// The task's state: the connections, and the nodes on their way out.
struct Pool {
    clients: HashMap<NodeKey, NodeClient>,
    departed: HashMap<NodeKey, Departed>,
    current: HashMap<NodeKey, NodeInfo>,
    grace: Duration,
}

impl Pool {
    fn new(grace: Duration) -> Pool {
        Pool {
            clients: HashMap::new(),
            departed: HashMap::new(),
            current: HashMap::new(),
            grace,
        }
    }

    /// Takes a new topology in: nodes without urls (gateways) are not routed to.
    fn update(&mut self, topology: &Topology) {
        let now = Instant::now();
        let incoming: HashMap<NodeKey, NodeInfo> = topology
            .iter()
            .filter(|info| !info.urls.is_empty())
            .map(|info| (node_key(info), info.clone()))
            .collect();
        for (key, info) in self.current.drain() {
            if incoming.contains_key(&key) {
                continue;
            }
            let connected = self.clients.get(&key).is_some_and(NodeClient::is_connected);
            if connected && !self.grace.is_zero() {
                info!(addr = %key.0, name = %info.name, grace = ?self.grace,
                    "node left the topology; kept in rotation for the grace period");
                self.departed.insert(
                    key,
                    Departed {
                        info,
                        until: now + self.grace,
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
                    NodeClient::connect_as(key.0.clone(), dialect)
                }
            };
            clients.insert(key.clone(), client.clone());
            nodes.push(Arc::new(Node {
                addr: key.0.clone(),
                name: info.name.clone(),
                dialect,
                urls: info.urls.clone(),
                leaving,
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
    grace: Duration,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<RouteTable>> {
    let mut pool = Pool::new(grace);
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
