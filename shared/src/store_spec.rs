//! The `--store` flag the stateful services share: where their data lives.

use std::{fmt, path::PathBuf, str::FromStr};

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
