//! What `run` needs to know, as a plain struct: main.rs fills it from flags and environment
//! variables, tests fill it directly.
//!
//! Also the text port's protected mode: without a JWT key the text port has no way to tell
//! callers apart, so it serves loopback clients only, and refuses to start on another address
//! unless told `--insecure` ([`TEXT_PORT`]), as Redis does until a password is set.

use std::{sync::Arc, time::Duration};

use shared::{
    server::{ConnectionLimits, ListenerAdvice},
    service::ServiceConfig,
    token::TokenVerifier,
};

pub use crate::store::StoreSpec;
pub use shared::store_spec::{StoreCheck, StoreOptions};

/// How long a text connection may stay silent before it is closed, by default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a text connection has to send a good `auth<TOKEN>` when one is required, by default.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Config {
    /// Where the data lives.
    pub store: StoreSpec,
    /// How long a store operation may wait, and how the store is checked at open.
    pub store_options: StoreOptions,
    /// How the REST door is a node: the distributor it registers with, who may connect, what
    /// one client may hold.
    pub node: ServiceConfig,
    /// Who the text port lets in and for how long.
    pub text: TextConfig,
    /// Changes the change log keeps for watchers to resume from (`--history`).
    pub history: u64,
    /// A watcher that falls this many revisions further behind the newest one than it has been
    /// is ended with a `lagged` event (`--watch-max-lag`).
    pub watch_max_lag: u64,
}

/// The text port's admission rules.
#[derive(Debug, Clone)]
pub struct TextConfig {
    /// Verifies `auth<TOKEN>`. When set, every connection must authenticate before anything
    /// else, and each command needs its scope; when `None`, no command needs a token.
    pub tokens: Option<Arc<TokenVerifier>>,
    /// Connections at most, overall and per client address, and whether only loopback clients
    /// are served (protected mode: no key and no `--insecure`).
    pub limits: ConnectionLimits,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// A connection that has not authenticated this long after it opened is closed (only when
    /// `tokens` is set).
    pub auth_timeout: Duration,
}

impl Default for TextConfig {
    /// Protected mode with the default timeouts.
    fn default() -> Self {
        TextConfig {
            tokens: None,
            limits: ConnectionLimits {
                loopback_only: true,
                ..ConnectionLimits::default()
            },
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            auth_timeout: DEFAULT_AUTH_TIMEOUT,
        }
    }
}

impl Config {
    /// An unregistered service over `store` (tests).
    pub fn standalone(store: StoreSpec) -> Config {
        Config {
            store,
            store_options: StoreOptions::default(),
            node: ServiceConfig::named(crate::SERVICE_NAME),
            text: TextConfig::default(),
            history: crate::store::DEFAULT_HISTORY,
            watch_max_lag: crate::rest::MAX_WATCH_LAG,
        }
    }
}

/// What protected mode says about the text port: without a JWT key it cannot tell callers
/// apart. Checked at start with [`shared::server::check_protected_mode`].
pub const TEXT_PORT: ListenerAdvice = ListenerAdvice {
    serves: "the text protocol",
    lacking: "authentication",
    risk: "anyone who can reach it could read and write every key",
    authenticate: "Set a JWT key with --jwt-secret-file PATH (env JWT_SECRET_FILE) or \
        --jwt-public-key-file PATH (env JWT_PUBLIC_KEY_FILE) so clients must send auth<TOKEN>",
    loopback: "a loopback address (--text-listen 127.0.0.1:8395)",
    opt_out: "pass --insecure to serve anyone without a token",
    opt_out_warning:
        "the text port serves clients from anywhere without authentication (--insecure)",
};
