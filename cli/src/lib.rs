//! `msctl`, the operator's command line. People who run etcd, Redis or NATS live in `etcdctl`,
//! `redis-cli` and `nats`; this is the same for our system. It talks only to the gateway, over
//! HTTP, with the routes any client uses (docs/HTTP.md), so it needs nothing but a URL and a
//! token, and it sees exactly what the gateway lets a token see.
//!
//! Output is a table by default and JSON with `--json` (the gateway's answer as it is; for the
//! commands that follow a stream, one JSON object per line). Errors go to stderr and the exit
//! status is 0 only on success.
//!
//! Layout:
//! - [`Cli`]: the commands and flags (clap), and [`run`], which carries one out.
//! - [`client`]: the gateway over HTTP: requests, answers, errors that say what to do.
//! - [`sse`]: a small `text/event-stream` reader for the commands that follow a stream.
//! - [`table`]: human-readable tables.
//! - `commands`: one function per command, turning answers into tables or JSON.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

pub mod client;
mod commands;
pub mod sse;
pub mod table;

/// msctl: look at and operate a running system through its gateway.
#[derive(Debug, Parser)]
#[command(name = "msctl", version, propagate_version = true)]
pub struct Cli {
    /// The gateway's URL.
    #[arg(
        long,
        global = true,
        env = "MSCTL_GATEWAY",
        default_value = "http://localhost:8000"
    )]
    pub gateway: String,
    /// A bearer token (see `msctl token`); most commands need the `admin` scope or the route's.
    #[arg(long, global = true, env = "MSCTL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the gateway's JSON instead of a table (one object per line for followed streams).
    #[arg(long, global = true, env = "MSCTL_JSON")]
    pub json: bool,
    /// How long to wait for an answer (for streams: for the stream to open).
    #[arg(long, global = true, env = "MSCTL_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The gateway's view of the system: routes, their nodes, connection and readiness.
    Topology,
    /// Per node: connected, requests in flight, requests and errors served; the gateway's open
    /// HTTP connections and streams.
    Connections {
        /// Also list every node's connection changes (when it dropped and came back).
        #[arg(long)]
        history: bool,
    },
    /// Recent log lines of every node, the gateway and the distributor.
    Logs(LogsArgs),
    /// Notices: publish, follow, see and kick subscribers.
    #[command(subcommand)]
    Notice(NoticeCommand),
    /// The key-value store.
    #[command(subcommand)]
    Kv(KvCommand),
    /// Mint a bearer token from the gateway's HS256 key file, like `gateway mint-token`.
    Token(shared::token::MintArgs),
    /// Print a shell completion script: `msctl completions bash > /etc/bash_completion.d/msctl`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The lowest level shown: trace, debug, info, warn or error.
    #[arg(long)]
    pub level: Option<String>,
    /// Only this service's lines (gateway, distributor, kv, notice...).
    #[arg(long)]
    pub service: Option<String>,
    /// At most this many lines (the newest).
    #[arg(long)]
    pub limit: Option<u32>,
    /// Keep printing new lines as they come.
    #[arg(long, short)]
    pub follow: bool,
}

#[derive(Debug, Subcommand)]
pub enum NoticeCommand {
    /// Publish a notice.
    Send {
        message: String,
        /// Only for subscribers of this topic.
        #[arg(long)]
        topic: Option<String>,
        /// A whisper to one subscriber name.
        #[arg(long)]
        to: Option<String>,
        /// Publish later, at this RFC 3339 time (2030-01-01T12:00:00Z).
        #[arg(long)]
        at: Option<String>,
    },
    /// Follow the notices as they are published (until interrupted or the stream ends).
    Tail {
        /// Comma-separated topics to receive besides the broadcasts.
        #[arg(long)]
        topics: Option<String>,
        /// Subscribe under this name (yours by default; another needs notice:admin).
        #[arg(long)]
        name: Option<String>,
        /// Replay the stored notices after this id first.
        #[arg(long)]
        after: Option<u64>,
    },
    /// The live subscribers.
    Who,
    /// End every subscription with this name.
    Kick { name: String },
}

#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Read a key.
    Get { key: String },
    /// Write a key (`-` as the value reads it from stdin).
    Put {
        key: String,
        value: String,
        /// Expire the key after this long (500ms, 30s, 10m, 1h).
        #[arg(long)]
        ttl: Option<String>,
        /// Write only if the key has this version.
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Delete a key.
    Del { key: String },
    /// List keys in order.
    Ls {
        /// Only keys starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Start after this key (the `next` of the page before).
        #[arg(long)]
        after: Option<String>,
        /// At most this many keys (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Follow the changes to a key, or to every key under --prefix.
    Watch {
        /// The key to watch (or give --prefix).
        #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
        key: Option<String>,
        /// Watch every key starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Replay the changes after this revision first.
        #[arg(long)]
        from_revision: Option<u64>,
    },
}

/// Why a command failed; printed on stderr as `msctl: <error>`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the gateway at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{request}: {status} {message}{}", hint(*.status))]
    Refused {
        request: String,
        status: u16,
        message: String,
    },
    #[error("{path} answered without an event stream: the service behind it cannot stream this (is it older than this msctl?)")]
    NotAStream { path: String },
    #[error("unexpected answer: {0}")]
    BadAnswer(String),
    #[error("the stream failed: {0}")]
    Stream(String),
    #[error(transparent)]
    Token(#[from] shared::token::TokenError),
    #[error("cannot write the output: {0}")]
    Io(#[from] std::io::Error),
}

/// What to do about a refusal, when msctl knows.
fn hint(status: u16) -> &'static str {
    match status {
        401 => " (give a token with --token or MSCTL_TOKEN; `msctl token` mints one)",
        403 => " (the token lacks the scope; `msctl token --scope admin` mints one with all)",
        _ => "",
    }
}

/// Carries out one command, writing its output to stdout.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    commands::run(cli).await
}
