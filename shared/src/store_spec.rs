//! The `--store` flag the stateful services share: where their data lives.

use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

/// `mem`, `sqlite:PATH` (also `sqlite://PATH`) or a `postgres://` URL.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreSpec {
    Memory,
    Sqlite(PathBuf),
    Postgres(String),
}

impl FromStr for StoreSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        if spec == "mem" || spec == "memory" {
            return Ok(StoreSpec::Memory);
        }
        if let Some(path) = spec.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err("the sqlite store needs a path, e.g. sqlite:data.db".into());
            }
            Ok(StoreSpec::Sqlite(PathBuf::from(path)))
        } else if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
            Ok(StoreSpec::Postgres(spec.to_owned()))
        } else {
            Err(format!(
                "unknown store {spec:?}: expected mem, sqlite:PATH or postgres://USER@HOST/DB"
            ))
        }
    }
}

impl fmt::Debug for StoreSpec {
    // A PostgreSQL URL may hold a password; logs show only the kind of store.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Memory => f.write_str("mem"),
            StoreSpec::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            StoreSpec::Postgres(_) => f.write_str("postgres://..."),
        }
    }
}

/// How a store is opened and used, beyond where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// The longest an operation waits for a database connection, and on PostgreSQL for one
    /// statement: shorter than the gateway's request timeout, so that during an outage callers
    /// hear "the store is unavailable" rather than the gateway's timeout.
    pub timeout: Duration,
    /// How thoroughly a SQLite file is checked when it opens.
    pub check: StoreCheck,
}

impl StoreOptions {
    /// The default of `--store-timeout`.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            timeout: StoreOptions::DEFAULT_TIMEOUT,
            check: StoreCheck::Quick,
        }
    }
}

/// `--check-store`: `quick` runs SQLite's `PRAGMA quick_check` at open, `full` its
/// `integrity_check` (slower: it also checks that every index matches its table).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreCheck {
    #[default]
    Quick,
    Full,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_flag_values() {
        assert_eq!("mem".parse::<StoreSpec>(), Ok(StoreSpec::Memory));
        assert_eq!("memory".parse::<StoreSpec>(), Ok(StoreSpec::Memory));
        assert_eq!(
            "sqlite:/tmp/x.db".parse::<StoreSpec>(),
            Ok(StoreSpec::Sqlite("/tmp/x.db".into()))
        );
        assert_eq!(
            "sqlite:///tmp/x.db".parse::<StoreSpec>(),
            Ok(StoreSpec::Sqlite("/tmp/x.db".into()))
        );
        assert_eq!(
            "postgres://u@h/db".parse::<StoreSpec>(),
            Ok(StoreSpec::Postgres("postgres://u@h/db".into()))
        );
        assert!("sqlite:".parse::<StoreSpec>().is_err());
        assert!("redis://x"
            .parse::<StoreSpec>()
            .unwrap_err()
            .contains("unknown store \"redis://x\""));
    }

    #[test]
    fn debug_hides_the_postgres_url() {
        let spec: StoreSpec = "postgres://u:secret@h/db".parse().unwrap();
        assert_eq!(format!("{spec:?}"), "postgres://...");
    }
}
