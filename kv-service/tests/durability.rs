//! Durability with the real binary: every answered put survives `kill -9` of the process, with
//! SQLite and with PostgreSQL. Also the binary's flags and its refusal of bad ones.

mod common;

use std::net::SocketAddr;

use common::{call, kv_store, Backend, TextClient, WAIT};
use kv_service::{config::StoreSpec, text_protocol::OwnedReply};
use serde_json::json;
use shared::{
    testing::process::{clean_command, logged_addr, Serving},
    Dialect, PacketClient,
};
use tokio::process::Command;

/// The kv-service binary, running; killed on drop.
struct Process {
    serving: Serving,
    rest_addr: SocketAddr,
    text_addr: SocketAddr,
}

fn store_flag(config: &StoreSpec) -> String {
    match config {
        StoreSpec::Memory => "mem".into(),
        StoreSpec::Sqlite(path) => format!("sqlite:{}", path.display()),
        StoreSpec::Postgres(url) => url.clone(),
    }
}

impl Process {
    async fn start(store: &StoreSpec) -> Process {
        let mut command = clean_command(env!("CARGO_BIN_EXE_kv-service"), &[]);
        command
            .args(["--listen", "127.0.0.1:0", "--text-listen", "127.0.0.1:0"])
            .args(["--distributor", ""])
            .args(["--store", &store_flag(store)])
            // One serving thread, as kv-bench runs it: that runtime must be as durable.
            .args(["--threads", "1"]);
        // Ready once both doors are up: each logs its address.
        let (mut rest, mut text) = (None, None);
        let (serving, (rest_addr, text_addr)) = Serving::start(command, move |line| {
            if line.contains("serving the text protocol") {
                text = logged_addr(line);
            } else if line.contains("serving") && line.contains("name=kv") {
                rest = logged_addr(line);
            }
            rest.zip(text)
        })
        .await;
        Process {
            serving,
            rest_addr,
            text_addr,
        }
    }

    /// `kill -9`, and wait until the process is gone.
    async fn kill_9(self) {
        let stopped = self.serving.stop().await;
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(stopped.status.signal(), Some(9));
    }
}

async fn answered_puts_survive_kill_9(backend: Backend) {
    let Some(fixture) = kv_store(backend).await else {
        return;
    };
    let first = Process::start(&fixture.spec).await;

    // Pipelined puts on several connections; every answered one must survive.
    let mut tasks = Vec::new();
    for connection in 0..4 {
        let addr = first.text_addr;
        tasks.push(tokio::spawn(async move {
            let mut client = TextClient::connect(addr).await;
            let mut batch = String::new();
            for i in 0..100 {
                batch.push_str(&format!("put<c{connection}/{i},value {i}>"));
            }
            client.send(batch).await;
            for i in 0..100 {
                assert_eq!(
                    client.reply().await,
                    OwnedReply::Ok(format!("c{connection}/{i}"))
                );
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    }
    let rest = PacketClient::connect(first.rest_addr.to_string(), Dialect::Packet);
    tokio::time::timeout(WAIT, rest.connected()).await.unwrap();
    for version in 1..=3 {
        let (status, body, _) = call(
            &rest,
            "PUT",
            json!({"params": "versioned", "value": format!("v{version}")}),
        )
        .await
        .unwrap();
        assert_eq!((status, body["version"].as_i64()), (200, Some(version)));
    }
    // The last answered put goes out right before the kill.
    let mut client = TextClient::connect(first.text_addr).await;
    assert_eq!(
        client.call("put<last,word>").await,
        OwnedReply::Ok("last".into())
    );
    first.kill_9().await;
    drop(rest);

    let second = Process::start(&fixture.spec).await;
    let mut client = TextClient::connect(second.text_addr).await;
    for connection in 0..4 {
        let mut batch = String::new();
        for i in 0..100 {
            batch.push_str(&format!("get<c{connection}/{i}>"));
        }
        client.send(batch).await;
        for i in 0..100 {
            assert_eq!(
                client.reply().await,
                OwnedReply::Value(format!("value {i}"))
            );
        }
    }
    assert_eq!(
        client.call("get<last>").await,
        OwnedReply::Value("word".into())
    );
    let rest = PacketClient::connect(second.rest_addr.to_string(), Dialect::Packet);
    tokio::time::timeout(WAIT, rest.connected()).await.unwrap();
    let (status, body, _) = call(&rest, "GET", json!({"params": "versioned"}))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"key": "versioned", "value": "v3", "version": 3,
            "revision": body["revision"], "expires_at": null})
    );
    second.kill_9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_answered_puts_survive_kill_9() {
    answered_puts_survive_kill_9(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_answered_puts_survive_kill_9() {
    answered_puts_survive_kill_9(Backend::Postgres).await;
}

#[tokio::test]
async fn a_bad_store_flag_exits_with_one_clear_line() {
    let output = Command::new(env!("CARGO_BIN_EXE_kv-service"))
        .args([
            "--store",
            "redis://nope",
            "--listen",
            "127.0.0.1:0",
            "--text-listen",
            "127.0.0.1:0",
        ])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(WAIT, output).await.unwrap().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unknown store \"redis://nope\""),
        "{stderr}"
    );
}

#[tokio::test]
async fn flags_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    // An unwritable SQLite path makes start-up fail, which shows the variable was read.
    let output = Command::new(env!("CARGO_BIN_EXE_kv-service"))
        .env(
            "KV_STORE",
            format!("sqlite:{}/missing-dir/kv.db", dir.path().display()),
        )
        .env("KV_LISTEN", "127.0.0.1:0")
        .env("KV_TEXT_LISTEN", "127.0.0.1:0")
        .env("KV_DISTRIBUTOR", "")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(WAIT, output).await.unwrap().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot open the store"), "{stderr}");
    assert!(stderr.contains("missing-dir"), "{stderr}");
}

#[tokio::test]
async fn help_lists_every_flag() {
    let output = Command::new(env!("CARGO_BIN_EXE_kv-service"))
        .arg("--help")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(WAIT, output).await.unwrap().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--listen",
        "--text-listen",
        "--distributor",
        "--store",
        "--advertise-host",
        "--threads",
        "[env: KV_LISTEN=]",
        "[env: KV_THREADS=]",
        "[env: KV_STORE=]",
        "--idle-timeout",
        "--auth-timeout",
        "--jwt-secret-file",
        "--jwt-public-key-file",
        "--cluster-secret-file",
        "--insecure",
        "--max-connections-per-ip",
        "[env: KV_IDLE_TIMEOUT=]",
        "[default: 127.0.0.1:9010]",
        "[default: 127.0.0.1:8395]",
        "[default: 300s]",
        "[default: 127.0.0.1:9000]",
        "[default: sqlite:kv.db]",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}
