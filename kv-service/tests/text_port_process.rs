//! The text port's protections with the real binary: protected mode (no key, no `--insecure`:
//! loopback only, and a refusal to start elsewhere), authentication with a key from a file, a log
//! that never shows a token, and silent connections that can no longer lock clients out.

mod common;

use std::{net::SocketAddr, process::Stdio};

use common::{token_with, TextClient, WAIT};
use kv_service::text_protocol::OwnedReply;
use shared::testing::process::{self, clean_command, Exit, Serving};
use tokio::{io::AsyncReadExt, net::TcpStream, process::Command};

/// A kv-service process on the memory store, unregistered; killed on drop.
struct Process {
    serving: Serving,
    text_addr: SocketAddr,
}

fn kv_service() -> Command {
    let mut command = clean_command(
        env!("CARGO_BIN_EXE_kv-service"),
        &[
            "JWT_SECRET_FILE",
            "JWT_PUBLIC_KEY_FILE",
            "CLUSTER_SECRET_FILE",
            "INSECURE",
        ],
    );
    command
        .args(["--distributor", "", "--store", "mem"])
        // An environment variable, so that a test can still give `--listen`.
        .env("KV_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null());
    command
}

impl Process {
    /// Starts the binary with `args` (`--text-listen` among them) and waits until the text port
    /// serves.
    async fn start(args: &[&str], rust_log: &str) -> Process {
        let mut command = kv_service();
        command.args(args).env("RUST_LOG", rust_log);
        let (serving, text_addr) = common::serve_text(command).await;
        Process { serving, text_addr }
    }

    /// The text port on loopback (it may listen on the unspecified address).
    fn loopback_text_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.text_addr.port()))
    }

    /// Stops the process and returns its log.
    async fn stop(self) -> String {
        self.serving.stop().await.log
    }
}

/// Runs the binary with `args`, which must make it exit; returns (success, stderr).
async fn run_to_exit(args: &[&str]) -> (bool, String) {
    let mut command = kv_service();
    command.args(args).env("RUST_LOG", "info");
    let Exit { success, output } = process::run_to_exit(command).await;
    (success, output)
}

fn secret_file(dir: &tempfile::TempDir, secret: &[u8]) -> String {
    let path = dir.path().join("jwt.secret");
    std::fs::write(&path, secret).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_str().unwrap().to_owned()
}

fn token(secret: &[u8], subject: &str, scopes: &[&str]) -> String {
    token_with(secret, subject, &scopes.join(" "))
}

#[tokio::test]
async fn without_a_key_a_non_loopback_text_port_refuses_to_start() {
    let (success, stderr) = run_to_exit(&["--text-listen", "0.0.0.0:0"]).await;
    assert!(!success, "started without a key on 0.0.0.0:\n{stderr}");
    assert!(
        stderr.contains("refusing to serve the text protocol on 0.0.0.0"),
        "{stderr}"
    );
    assert!(stderr.contains("--jwt-secret-file"), "{stderr}");
    assert!(stderr.contains("--insecure"), "{stderr}");
    assert!(!stderr.contains("serving the text protocol"), "{stderr}");
}

#[tokio::test]
async fn without_a_cluster_secret_a_non_loopback_packet_port_refuses_to_start() {
    let (success, stderr) =
        run_to_exit(&["--text-listen", "127.0.0.1:0", "--listen", "0.0.0.0:0"]).await;
    assert!(
        !success,
        "started without a cluster secret on 0.0.0.0:\n{stderr}"
    );
    assert!(stderr.contains("--cluster-secret-file"), "{stderr}");
    assert!(!stderr.contains("serving the text protocol"), "{stderr}");
}

#[tokio::test]
async fn insecure_lets_a_non_loopback_text_port_serve_without_tokens() {
    let process = Process::start(&["--text-listen", "0.0.0.0:0", "--insecure"], "info").await;
    assert!(process.text_addr.ip().is_unspecified());
    let mut client = TextClient::connect(process.loopback_text_addr()).await;
    assert_eq!(client.call("put<a,1>").await, OwnedReply::Ok("a".into()));
    assert_eq!(client.call("get<a>").await, OwnedReply::Value("1".into()));
    let log = process.stop().await;
    assert!(log.contains("--insecure"), "no warning:\n{log}");
}

#[tokio::test]
async fn with_a_key_the_text_port_serves_anywhere_but_only_to_good_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let secret = b"a secret for the text port";
    let key = secret_file(&dir, secret);
    let process = Process::start(
        &["--text-listen", "0.0.0.0:0", "--jwt-secret-file", &key],
        "debug",
    )
    .await;
    let mut client = TextClient::connect(process.loopback_text_addr()).await;
    assert!(matches!(client.call("get<a>").await, OwnedReply::Err(_)));

    let forged = token(b"not the secret", "mallory", &["admin"]);
    assert!(matches!(
        client.call(format!("auth<{forged}>")).await,
        OwnedReply::Err(_)
    ));
    let good = token(secret, "alice", &["kv:read", "kv:write"]);
    client.send(format!("auth<{good}>put<a,1>get<a>")).await;
    assert_eq!(client.reply().await, OwnedReply::Ok("alice".into()));
    assert_eq!(client.reply().await, OwnedReply::Ok("a".into()));
    assert_eq!(client.reply().await, OwnedReply::Value("1".into()));
    drop(client);

    // Neither token appears in the log, at debug level, whether it was refused or accepted;
    // the refusal is logged with its reason.
    let log = process.stop().await;
    assert!(log.contains("refused a token"), "{log}");
    for token in [&forged, &good] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!log.contains(signature), "a token is in the log:\n{log}");
        let payload = token.split('.').nth(1).unwrap();
        assert!(!log.contains(payload), "a token is in the log:\n{log}");
    }
}

/// What a silent connection saw before the server closed it.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// Closed without a word: refused when accepted.
    Refused,
    /// Told why, then closed.
    Told(String),
}

/// Waits (bounded) until the server closes `stream`; returns what it sent first.
async fn ending(mut stream: TcpStream) -> Ending {
    let mut received = Vec::new();
    let closed = tokio::time::timeout(WAIT, async {
        let mut chunk = [0u8; 512];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => received.extend_from_slice(&chunk[..read]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a silent connection was never closed");
    if received.is_empty() {
        Ending::Refused
    } else {
        Ending::Told(String::from_utf8_lossy(&received).into_owned())
    }
}

/// Regression: 10,000 silent connections to the text port used to fill its connection cap and
/// never time out, so new clients waited until the attacker left. Now one address holds at most
/// `--max-connections-per-ip` of them, and silent ones are closed after `--idle-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_capped_per_address_and_closed_when_idle() {
    const CAP: usize = 50;
    const EXTRA: usize = 150;
    let process = Process::start(
        &[
            "--text-listen",
            "127.0.0.1:0",
            "--idle-timeout",
            "2s",
            "--max-connections-per-ip",
            &CAP.to_string(),
        ],
        "info",
    )
    .await;
    let addr = process.text_addr;

    // The first CAP connections are served: each answers one request, then goes silent.
    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut client = TextClient::connect(addr).await;
        assert_eq!(client.call("get<k>").await, OwnedReply::None("k".into()));
        held.push(client);
    }
    // Every further one from the same address is closed at once, without an answer.
    let mut extra = Vec::new();
    for _ in 0..EXTRA {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect failed");
        extra.push(stream);
    }
    for stream in extra {
        assert_eq!(ending(stream).await, Ending::Refused);
    }

    // The silent ones are closed after the idle timeout, each told why.
    for client in held {
        assert_eq!(
            ending(client.into_stream()).await,
            Ending::Told("err<closing: idle for 2s>\n".into())
        );
    }

    // And a fresh client is served.
    let mut fresh = TextClient::connect(addr).await;
    assert_eq!(fresh.call("put<k,v>").await, OwnedReply::Ok("k".into()));
    assert_eq!(fresh.call("get<k>").await, OwnedReply::Value("v".into()));
    process.stop().await;
}
