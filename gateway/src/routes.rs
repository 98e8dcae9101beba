//! The route table: which nodes serve which `METHOD/path`, and how a request picks one.
//!
//! A table is immutable once built; [`crate::topology`] builds a new one whenever the topology
//! changes and publishes it, so a request takes a snapshot (one `Arc` clone) and never holds a
//! lock while it waits for a node. The only state a request changes is a route's round-robin
//! counter, an atomic.
//!
//! A route also carries the scope a caller needs for it, as its nodes registered it
//! ([`Route::scopes`]); [`crate::auth`] checks it before the request is forwarded.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use serde::Serialize;
use shared::{Dialect, PacketClient, RawParams};

/// The gateway's connection to a node. Answers' params are relayed to HTTP clients as the node
/// wrote them: checked to be JSON, never parsed into values and written out again.
pub type NodeClient = PacketClient<RawParams>;

/// One service node, with the connection the gateway keeps to it.
pub struct Node {
    /// `host:port`, as the node is reached.
    pub addr: String,
    pub name: String,
    pub dialect: Dialect,
    pub urls: Vec<String>,
    /// The scope each of its urls needs, for those that need one (keyed by url as registered).
    pub scopes: BTreeMap<String, String>,
    /// True while the node is kept in rotation after leaving the topology
    /// (see [`crate::Config::departure_grace`]).
    pub leaving: bool,
    /// False while the node says it cannot serve (see [`Route::rotation`]).
    pub ready: bool,
    pub client: NodeClient,
}

impl Node {
    pub fn is_connected(&self) -> bool {
        self.client.is_connected()
    }
}

/// The nodes serving one registered url, e.g. `GET/kv`.
pub struct Route {
    /// The url as registered, `METHOD/path`; also the route's metrics label.
    pub url: Arc<str>,
    /// The path part of the url: the packet's `uri`.
    pub path: String,
    pub nodes: Vec<Arc<Node>>,
    /// The scopes a caller needs, all of them: those its nodes declared for the url. Nodes of
    /// one service agree, but while an upgrade adds a scope some replicas declare it and some do
    /// not, and the route then needs it; nodes that disagree outright are all obeyed. Empty
    /// for a route no node declared a scope for, which any verified caller may use.
    pub scopes: Vec<Arc<str>>,
    next: AtomicUsize,
}

impl Route {
    /// The connected nodes in the order this request should try them: round-robin over the
    /// route's nodes, skipping those whose connection is down and those that say they are not
    /// ready (their store is unreachable, say).
    ///
    /// When every connected node is not ready, those nodes are the rotation after all: the
    /// caller then gets the service's own answer (a 503 naming what is unavailable) rather than
    /// a vaguer one from the gateway, and sees the service as soon as it recovers, before the
    /// topology says so.
    pub fn rotation(&self) -> impl Iterator<Item = &Arc<Node>> {
        let count = self.nodes.len();
        let start = if count > 1 {
            self.next.fetch_add(1, Ordering::Relaxed) % count
        } else {
            0
        };
        let any_ready = self
            .nodes
            .iter()
            .any(|node| node.ready && node.is_connected());
        (0..count)
            .map(move |offset| &self.nodes[(start + offset) % count])
            .filter(move |node| node.is_connected() && (node.ready || !any_ready))
    }

    pub fn connected_nodes(&self) -> usize {
        self.nodes.iter().filter(|node| node.is_connected()).count()
    }
}

/// A request's route: the route and the rest of the path after its url, still percent-encoded.
pub struct Matched<'a> {
    pub route: &'a Arc<Route>,
    pub rest: Option<&'a str>,
}

/// Every route the gateway knows, by method, then path.
#[derive(Default)]
pub struct RouteTable {
    routes: HashMap<String, HashMap<String, Arc<Route>>>,
    nodes: Vec<Arc<Node>>,
}

impl RouteTable {
    /// Builds the table for `nodes`: every url a node registered becomes a route served by all
    /// the nodes that registered it, in the order given.
    pub fn new(nodes: Vec<Arc<Node>>) -> RouteTable {
        let mut routes: HashMap<String, HashMap<String, Route>> = HashMap::new();
        for node in &nodes {
            for url in &node.urls {
                let Some((method, path)) = split_url(url) else {
                    continue;
                };
                let route = routes
                    .entry(method.clone())
                    .or_default()
                    .entry(path.clone())
                    .or_insert_with(|| Route {
                        url: format!("{method}{path}").into(),
                        path,
                        nodes: Vec::new(),
                        scopes: Vec::new(),
                        next: AtomicUsize::new(0),
                    });
                if !route.nodes.iter().any(|known| Arc::ptr_eq(known, node)) {
                    route.nodes.push(node.clone());
                }
                if let Some(scope) = node.scopes.get(url) {
                    if !route.scopes.iter().any(|known| **known == **scope) {
                        route.scopes.push(scope.as_str().into());
                    }
                }
            }
        }
        let routes = routes
            .into_iter()
            .map(|(method, paths)| {
                let paths = paths
                    .into_iter()
                    .map(|(path, route)| (path, Arc::new(route)))
                    .collect();
                (method, paths)
            })
            .collect();
        RouteTable { routes, nodes }
    }

    /// Finds the route for `method path`: the exact url, else the longest registered prefix
    /// ending at a `/`, with the rest of the path after it. A prefix never matches the bare `/`.
    pub fn lookup<'a>(&'a self, method: &str, path: &'a str) -> Option<Matched<'a>> {
        let paths = self.routes.get(method)?;
        if let Some(route) = paths.get(path) {
            return Some(Matched { route, rest: None });
        }
        let mut prefix = path;
        while let Some(slash) = prefix.rfind('/') {
            prefix = &prefix[..slash];
            if prefix.is_empty() {
                return None;
            }
            if let Some(route) = paths.get(prefix) {
                let rest = &path[slash + 1..];
                return Some(Matched {
                    route,
                    rest: Some(rest).filter(|rest| !rest.is_empty()),
                });
            }
        }
        None
    }

    /// Every route, sorted by url.
    pub fn routes(&self) -> Vec<&Arc<Route>> {
        let mut routes: Vec<&Arc<Route>> = self.routes.values().flat_map(|p| p.values()).collect();
        routes.sort_by(|a, b| a.url.cmp(&b.url));
        routes
    }

    pub fn nodes(&self) -> &[Arc<Node>] {
        &self.nodes
    }

    /// The JSON answer of `GET /_/topology`.
    pub fn snapshot(&self) -> TopologySnapshot {
        let node_state = |node: &Arc<Node>| NodeState {
            addr: node.addr.clone(),
            name: node.name.clone(),
            connected: node.is_connected(),
            ready: node.ready,
        };
        TopologySnapshot {
            routes: self
                .routes()
                .into_iter()
                .map(|route| RouteState {
                    url: route.url.to_string(),
                    scopes: route.scopes.iter().map(|scope| scope.to_string()).collect(),
                    nodes: route.nodes.iter().map(node_state).collect(),
                })
                .collect(),
            nodes: self
                .nodes
                .iter()
                .map(|node| NodeDetail {
                    state: node_state(node),
                    protocol: match node.dialect {
                        Dialect::Packet => Some(shared::packet::PROTOCOL_VERSION),
                        Dialect::Legacy => None,
                    },
                    urls: node.urls.clone(),
                    leaving: node.leaving,
                })
                .collect(),
        }
    }
}

/// Splits a registered url such as `GET/kv` into method and path; `None` if it has no path.
fn split_url(url: &str) -> Option<(String, String)> {
    let slash = url.find('/')?;
    let (method, path) = url.split_at(slash);
    if method.is_empty() {
        return None;
    }
    let path = match path.trim_end_matches('/') {
        "" => "/",
        trimmed => trimmed,
    };
    Some((method.to_ascii_uppercase(), path.to_owned()))
}

#[derive(Debug, Serialize)]
pub struct TopologySnapshot {
    pub routes: Vec<RouteState>,
    pub nodes: Vec<NodeDetail>,
}

#[derive(Debug, Serialize)]
pub struct RouteState {
    pub url: String,
    /// The scopes a caller needs (empty: any verified caller).
    pub scopes: Vec<String>,
    pub nodes: Vec<NodeState>,
}

#[derive(Debug, Serialize)]
pub struct NodeState {
    pub addr: String,
    pub name: String,
    pub connected: bool,
    /// False while the node says it cannot serve; it is then skipped while another node of
    /// the route is connected and ready. Written only when false, as in the topology itself.
    #[serde(skip_serializing_if = "is_ready")]
    pub ready: bool,
}

fn is_ready(ready: &bool) -> bool {
    *ready
}

#[derive(Debug, Serialize)]
pub struct NodeDetail {
    #[serde(flatten)]
    pub state: NodeState,
    /// 2 for nodes that speak the extended protocol, null for original-design nodes.
    pub protocol: Option<u8>,
    pub urls: Vec<String>,
    pub leaving: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn table(urls: &[&[&str]]) -> RouteTable {
        scoped_table(urls, &[]).await
    }

    /// A table whose node `i` declares `scopes[i]` (url, scope) pairs.
    async fn scoped_table(urls: &[&[&str]], scopes: &[&[(&str, &str)]]) -> RouteTable {
        let nodes = urls
            .iter()
            .enumerate()
            .map(|(i, urls)| {
                // Port 9 (discard) on loopback: nothing listens, nothing is sent.
                Arc::new(Node {
                    addr: format!("127.0.0.1:{}", 9 + i),
                    name: format!("node{i}"),
                    dialect: Dialect::Packet,
                    urls: urls.iter().map(|u| u.to_string()).collect(),
                    scopes: scopes
                        .get(i)
                        .into_iter()
                        .flat_map(|pairs| pairs.iter())
                        .map(|(url, scope)| (url.to_string(), scope.to_string()))
                        .collect(),
                    leaving: false,
                    ready: true,
                    client: NodeClient::connect_as("127.0.0.1:9", Dialect::Packet),
                })
            })
            .collect();
        RouteTable::new(nodes)
    }

    #[tokio::test]
    async fn exact_match_wins_over_a_prefix() {
        let table = table(&[&["GET/kv", "GET/kv/stats"]]).await;
        let matched = table.lookup("GET", "/kv/stats").unwrap();
        assert_eq!(&*matched.route.url, "GET/kv/stats");
        assert_eq!(matched.rest, None);
    }

    #[tokio::test]
    async fn the_longest_prefix_takes_the_rest_of_the_path() {
        let table = table(&[&["GET/a", "GET/a/b"]]).await;
        let matched = table.lookup("GET", "/a/b/c/d").unwrap();
        assert_eq!(&*matched.route.url, "GET/a/b");
        assert_eq!(matched.rest, Some("c/d"));
        let matched = table.lookup("GET", "/a/x").unwrap();
        assert_eq!(&*matched.route.url, "GET/a");
        assert_eq!(matched.rest, Some("x"));
    }

    #[tokio::test]
    async fn unknown_methods_and_paths_have_no_route() {
        let table = table(&[&["GET/kv"]]).await;
        assert!(table.lookup("PUT", "/kv").is_none());
        assert!(table.lookup("GET", "/kvx").is_none());
        assert!(table.lookup("GET", "/other/kv").is_none());
        assert!(table.lookup("GET", "/").is_none());
    }

    #[tokio::test]
    async fn a_trailing_slash_is_an_empty_rest() {
        let table = table(&[&["DELETE/kv/"]]).await;
        let matched = table.lookup("DELETE", "/kv/").unwrap();
        assert_eq!(&*matched.route.url, "DELETE/kv");
        assert_eq!(matched.rest, None);
    }

    #[tokio::test]
    async fn nodes_sharing_a_url_share_its_route() {
        let table = table(&[&["GET/kv"], &["GET/kv", "PUT/kv"]]).await;
        assert_eq!(table.lookup("GET", "/kv").unwrap().route.nodes.len(), 2);
        assert_eq!(table.lookup("PUT", "/kv").unwrap().route.nodes.len(), 1);
        assert_eq!(table.routes().len(), 2);
    }

    #[tokio::test]
    async fn a_route_needs_every_scope_its_nodes_declared() {
        let table = scoped_table(
            &[&["GET/kv", "PUT/kv"], &["GET/kv", "PUT/kv"], &["GET/kv"]],
            &[
                &[("GET/kv", "kv:read")],
                &[("GET/kv", "kv:read"), ("PUT/kv", "kv:write")],
                &[("GET/kv", "other")],
            ],
        )
        .await;
        let get = table.lookup("GET", "/kv").unwrap().route;
        let get_scopes: Vec<&str> = get.scopes.iter().map(|s| &**s).collect();
        assert_eq!(get_scopes, ["kv:read", "other"]);
        // One replica declares the scope and one does not yet: the route needs it.
        let put = table.lookup("PUT", "/kv").unwrap().route;
        assert_eq!(put.scopes.len(), 1);
        assert_eq!(&*put.scopes[0], "kv:write");
        let snapshot = serde_json::to_value(table.snapshot()).unwrap();
        assert_eq!(snapshot["routes"][1]["url"], "PUT/kv");
        assert_eq!(
            snapshot["routes"][1]["scopes"],
            serde_json::json!(["kv:write"])
        );
    }
}
