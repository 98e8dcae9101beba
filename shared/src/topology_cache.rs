//! Static stability: the last topology a node received, kept on disk.
//!
//! A node learns where every other node is only from the distributor, and keeps that in memory.
//! Restarted while the distributor is down, it would know nobody although every service is up
//! (Envoy has the same weakness). So the distributor client can keep the last topology it
//! received in a file and start from it: the nodes listed there are tried at once, and the
//! distributor's topology replaces the cache as soon as it answers.
//!
//! The file holds hosts, ports, names and urls, no secrets. It is still read as untrusted input:
//! its size is bounded, every entry is checked, and a file that fails any check is reported and
//! ignored (the node then starts as it would without one). Whoever connects to a cached node
//! still runs the cluster handshake with it, so a forged file cannot make a node trust a
//! stranger. A missing file is the normal first start and is not reported.
//!
//! The file names the distributor its topology came from, and is used only by a node following
//! that same distributor: a cache left by another cluster (or by a test next door) is not this
//! one's topology.
//!
//! Writes replace the file atomically (a temporary file in the same directory, then a rename),
//! so a crash mid-write leaves the previous cache, never half of one.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{codec::DEFAULT_MAX_FRAME_LENGTH, packet::Topology};

/// The largest cache file read: a topology never grows past the frame length a node accepts,
/// and the file adds a few bytes around it.
pub const MAX_CACHE_BYTES: u64 = DEFAULT_MAX_FRAME_LENGTH as u64 + 1024;

/// The format of the file; a file of another version is ignored.
const FORMAT_VERSION: u32 = 1;

/// The longest host accepted from the file (a DNS name is at most 253 bytes).
const MAX_HOST_LENGTH: usize = 253;

/// What the file holds.
#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    /// The address of the distributor the topology came from, as the node was configured.
    distributor: String,
    nodes: Topology,
}

/// Why a cache file was not used, or not written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{path} is not a topology cache: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path} holds the topology of distributor {found}, not of {expected}")]
    OtherDistributor {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A topology cache file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyCache {
    path: PathBuf,
}

impl TopologyCache {
    pub fn new(path: impl Into<PathBuf>) -> TopologyCache {
        TopologyCache { path: path.into() }
    }

    /// A cache at `path`, or none when `path` is empty (how a flag turns the cache off).
    pub fn from_flag(path: &str) -> Option<TopologyCache> {
        let path = path.trim();
        (!path.is_empty()).then(|| TopologyCache::new(path))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The topology cached from `distributor`: `Ok(None)` when there is no file, an error when
    /// there is one that cannot be used (callers warn and go on without it).
    pub fn load(&self, distributor: &str) -> Result<Option<Topology>, CacheError> {
        let file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(self.read_error(source)),
        };
        let mut text = Vec::new();
        // One byte past the bound tells an oversized file from one exactly at it.
        file.take(MAX_CACHE_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(|source| self.read_error(source))?;
        if text.len() as u64 > MAX_CACHE_BYTES {
            return Err(CacheError::TooLarge {
                path: self.path.clone(),
                max: MAX_CACHE_BYTES,
            });
        }
        let cache: CacheFile =
            serde_json::from_slice(&text).map_err(|err| self.malformed(err.to_string()))?;
        if cache.version != FORMAT_VERSION {
            return Err(self.malformed(format!("format version {}", cache.version)));
        }
        validate(&cache.nodes).map_err(|reason| self.malformed(reason))?;
        if cache.distributor != distributor {
            return Err(CacheError::OtherDistributor {
                path: self.path.clone(),
                found: cache.distributor,
                expected: distributor.to_owned(),
            });
        }
        Ok(Some(cache.nodes))
    }

    /// Replaces the file with `topology`, received from `distributor`, atomically.
    pub fn save(&self, distributor: &str, topology: &Topology) -> Result<(), CacheError> {
        let cache = CacheFile {
            version: FORMAT_VERSION,
            distributor: distributor.to_owned(),
            nodes: topology.clone(),
        };
        let text = serde_json::to_vec(&cache).expect("a topology always serializes");
        self.write_atomically(&text)
            .map_err(|source| CacheError::Write {
                path: self.path.clone(),
                source,
            })
    }

    fn write_atomically(&self, text: &[u8]) -> std::io::Result<()> {
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let name = self
            .path
            .file_name()
            .ok_or_else(|| std::io::Error::other("the cache path names no file"))?;
        // The process id keeps two processes sharing a directory off each other's temporary
        // file; the rename is what readers see.
        let mut temporary_name = std::ffi::OsString::from(".");
        temporary_name.push(name);
        temporary_name.push(format!(".{}.tmp", std::process::id()));
        let temporary = dir.join(temporary_name);
        let written = (|| {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(text)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &self.path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        written
    }

    fn read_error(&self, source: std::io::Error) -> CacheError {
        CacheError::Read {
            path: self.path.clone(),
            source,
        }
    }

    fn malformed(&self, reason: String) -> CacheError {
        CacheError::Malformed {
            path: self.path.clone(),
            reason,
        }
    }
}

/// Every entry names a reachable-looking address: a host without spaces or control characters
/// and a port other than 0.
fn validate(topology: &Topology) -> Result<(), String> {
    for node in topology {
        let host = &node.host;
        if host.is_empty() || host.len() > MAX_HOST_LENGTH {
            return Err(format!("a host is {} bytes long", host.len()));
        }
        if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("a host has spaces or control characters".into());
        }
        if node.port == 0 {
            return Err("a node has port 0".into());
        }
        if node.name.chars().any(char::is_control) {
            return Err("a name has control characters".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::NodeInfo;

    fn topology() -> Topology {
        vec![
            NodeInfo {
                host: "127.0.0.1".into(),
                port: 9010,
                name: "kv".into(),
                urls: vec!["GET/kv".into()],
                protocol: Some(2),
                ..NodeInfo::default()
            },
            NodeInfo {
                host: "::1".into(),
                port: 9020,
                name: "notice".into(),
                urls: vec!["GET/notices".into()],
                ready: false,
                ..NodeInfo::default()
            },
        ]
    }

    const DISTRIBUTOR: &str = "127.0.0.1:9000";

    #[test]
    fn a_saved_topology_loads_back_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TopologyCache::new(dir.path().join("topology.json"));
        cache.save(DISTRIBUTOR, &topology()).unwrap();
        assert_eq!(cache.load(DISTRIBUTOR).unwrap(), Some(topology()));
        // A second save replaces the first.
        cache.save(DISTRIBUTOR, &topology()[..1].to_vec()).unwrap();
        assert_eq!(
            cache.load(DISTRIBUTOR).unwrap(),
            Some(topology()[..1].to_vec())
        );
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(files, ["topology.json"]);
    }

    #[test]
    fn a_missing_file_is_no_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TopologyCache::new(dir.path().join("absent.json"));
        assert_eq!(cache.load(DISTRIBUTOR).unwrap(), None);
    }

    #[test]
    fn the_topology_of_another_distributor_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TopologyCache::new(dir.path().join("topology.json"));
        cache.save("10.0.0.1:9000", &topology()).unwrap();
        let err = cache.load(DISTRIBUTOR).unwrap_err();
        assert!(matches!(err, CacheError::OtherDistributor { .. }), "{err}");
        assert!(err.to_string().contains("10.0.0.1:9000"), "{err}");
    }

    #[test]
    fn a_malformed_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("topology.json");
        let cache = TopologyCache::new(&path);
        let with_nodes = |nodes: &str| {
            format!(r#"{{"version":1,"distributor":"{DISTRIBUTOR}","nodes":{nodes}}}"#)
        };
        for text in [
            "not json".to_owned(),
            r#"[{"host":"127.0.0.1","port":1,"name":"kv"}]"#.to_owned(),
            format!(r#"{{"version":2,"distributor":"{DISTRIBUTOR}","nodes":[]}}"#),
            r#"{"version":1,"nodes":[]}"#.to_owned(),
            with_nodes(r#"[{"host":"","port":1,"name":"kv"}]"#),
            with_nodes(r#"[{"host":"a b","port":1,"name":"kv"}]"#),
            with_nodes(r#"[{"host":"127.0.0.1","port":0,"name":"kv"}]"#),
            with_nodes(r#"[{"host":"127.0.0.1","port":70000,"name":"kv"}]"#),
        ] {
            std::fs::write(&path, &text).unwrap();
            let err = cache.load(DISTRIBUTOR).unwrap_err();
            assert!(matches!(err, CacheError::Malformed { .. }), "{text}: {err}");
            assert!(err.to_string().contains("topology.json"), "{err}");
        }
        // The same file with a valid entry is taken: the cases above fail for their reason.
        std::fs::write(
            &path,
            with_nodes(r#"[{"host":"127.0.0.1","port":1,"name":"kv"}]"#),
        )
        .unwrap();
        assert_eq!(cache.load(DISTRIBUTOR).unwrap().unwrap().len(), 1);
    }

    #[test]
    fn an_oversized_file_is_refused_without_being_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("topology.json");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(MAX_CACHE_BYTES + 1).unwrap();
        let err = TopologyCache::new(&path).load(DISTRIBUTOR).unwrap_err();
        assert!(matches!(err, CacheError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn an_empty_flag_turns_the_cache_off() {
        assert_eq!(TopologyCache::from_flag(""), None);
        assert_eq!(TopologyCache::from_flag("  "), None);
        assert_eq!(
            TopologyCache::from_flag("gateway-topology.json").map(|cache| cache.path),
            Some(PathBuf::from("gateway-topology.json"))
        );
    }

    #[test]
    fn a_save_into_a_missing_directory_fails_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TopologyCache::new(dir.path().join("absent").join("topology.json"));
        assert!(matches!(
            cache.save(DISTRIBUTOR, &topology()),
            Err(CacheError::Write { .. })
        ));
    }
}
