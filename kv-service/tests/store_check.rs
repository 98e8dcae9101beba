//! The SQLite store checked at start and backed up while it serves, with the real binary: a file
//! with a damaged page (or one that is not a database) is refused with a message naming the file,
//! an intact one serves, and `kv-service backup` makes a copy another instance serves from.

mod common;

use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
};

use common::{TextClient, WAIT};
use kv_service::{
    store::{Condition, KvStore, SqliteStore, StoreOptions, Write},
    text_protocol::OwnedReply,
};
use shared::sqlite::damage;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::oneshot,
};

/// The binary with no distributor, ports chosen by the system and a clean environment.
fn kv_service() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kv-service"));
    command
        .args(["--distributor", "", "--listen", "127.0.0.1:0"])
        .args(["--text-listen", "127.0.0.1:0"])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .env_remove("KV_STORE")
        .env_remove("KV_CHECK_STORE")
        .env_remove("JWT_SECRET_FILE")
        .env_remove("JWT_PUBLIC_KEY_FILE")
        .env_remove("CLUSTER_SECRET_FILE")
        .env_remove("INSECURE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs the binary with `args` until it exits; returns (success, stdout and stderr).
async fn run_to_exit(args: &[&str]) -> (bool, String) {
    let output = tokio::time::timeout(WAIT, kv_service().args(args).output())
        .await
        .expect("the binary did not exit")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// A serving kv-service process; killed on drop.
struct Process {
    child: Child,
    text_addr: SocketAddr,
}

impl Process {
    /// Starts the binary on `store` and waits until its text port serves.
    async fn start(store: &Path) -> Process {
        let mut child = kv_service()
            .args(["--store", &sqlite(store)])
            .stdout(Stdio::null())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (found, text_addr) = oneshot::channel();
        let kept = log.clone();
        // Keeps the log and drains it, so the child never blocks on a full pipe.
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut found = Some(found);
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("serving the text protocol") {
                    if let (Some(found), Some(addr)) = (found.take(), addr_in(&line)) {
                        let _ = found.send(addr);
                    }
                }
                kept.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let text_addr = tokio::time::timeout(WAIT, text_addr)
            .await
            .expect("the text port did not start in time")
            .unwrap_or_else(|_| panic!("exited before serving:\n{}", log.lock().unwrap()));
        Process { child, text_addr }
    }

    async fn text(&self) -> TextClient {
        TextClient::connect(self.text_addr).await
    }

    async fn stop(mut self) {
        self.child.start_kill().unwrap();
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("the process did not exit")
            .unwrap();
    }
}

/// The value of `addr=` on a log line.
fn addr_in(line: &str) -> Option<SocketAddr> {
    let start = line.find("addr=")? + "addr=".len();
    line[start..].split_whitespace().next()?.parse().ok()
}

fn sqlite(path: &Path) -> String {
    format!("sqlite:{}", path.display())
}

/// A store of `keys` keys written through the service's own SQLite store, then closed.
async fn filled_store(path: &Path, keys: usize) {
    let store = SqliteStore::open(path, StoreOptions::default())
        .await
        .unwrap();
    let writes = (0..keys)
        .map(|n| Write::Put {
            key: format!("key-{n:05}"),
            value: format!("{n}:{}", "v".repeat(200)),
            condition: Condition::Always,
        })
        .collect();
    for result in store.write_batch(writes).await {
        result.unwrap();
    }
    store.close().await;
}

#[tokio::test]
async fn a_damaged_page_is_refused_at_start_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.db");
    filled_store(&path, 3000).await;
    let page = damage::garble_middle_page(&path).unwrap();

    for check in ["quick", "full"] {
        let (success, output) =
            run_to_exit(&["--store", &sqlite(&path), "--check-store", check]).await;
        assert!(
            !success,
            "started on page {page} garbled ({check}):\n{output}"
        );
        assert!(output.contains(&path.display().to_string()), "{output}");
        assert!(output.contains("is damaged"), "{output}");
        // The findings of the pragma: which page is bad.
        assert!(output.contains(&format!("page {page}")), "{output}");
        assert!(output.contains(".recover"), "{output}");
        assert!(!output.contains("serving the text protocol"), "{output}");
    }
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.db");
    std::fs::write(&path, "key=value\n".repeat(1000)).unwrap();
    let (success, output) = run_to_exit(&["--store", &sqlite(&path)]).await;
    assert!(!success, "started on a text file:\n{output}");
    assert!(output.contains(&path.display().to_string()), "{output}");
    assert!(output.contains("not a SQLite database"), "{output}");
}

#[tokio::test]
async fn an_intact_file_is_checked_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.db");
    filled_store(&path, 3000).await;
    let process = Process::start(&path).await;
    let mut client = process.text().await;
    let value = match client.call("get<key-01500>").await {
        OwnedReply::Value(value) => value,
        other => panic!("{other:?}"),
    };
    assert!(value.starts_with("1500:"), "{value}");
    process.stop().await;
}

#[tokio::test]
async fn a_backup_taken_while_serving_restores_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("kv.db");
    let copy = dir.path().join("backup.db");
    let process = Process::start(&live).await;
    let mut client = process.text().await;
    for n in 0..200 {
        let key = format!("k{n}");
        assert_eq!(
            client.call(format!("put<{key},{n}>")).await,
            OwnedReply::Ok(key)
        );
    }

    let to = copy.display().to_string();
    let (success, output) = run_to_exit(&["backup", "--store", &sqlite(&live), "--to", &to]).await;
    assert!(success, "{output}");
    assert!(output.contains("backed up"), "{output}");
    // The service goes on writing after the copy; those writes are not in it.
    assert_eq!(
        client.call("put<after,1>").await,
        OwnedReply::Ok("after".into())
    );
    process.stop().await;

    let restored = Process::start(&copy).await;
    let mut client = restored.text().await;
    for n in [0, 99, 199] {
        assert_eq!(
            client.call(format!("get<k{n}>")).await,
            OwnedReply::Value(n.to_string())
        );
    }
    assert!(
        !matches!(client.call("get<after>").await, OwnedReply::Value(_)),
        "a write after the backup is in it"
    );
    restored.stop().await;
}

#[tokio::test]
async fn backup_refuses_to_overwrite_and_refuses_other_stores() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("kv.db");
    filled_store(&live, 10).await;
    let taken = dir.path().join("taken.db");
    std::fs::write(&taken, "an earlier backup").unwrap();
    let to = taken.display().to_string();

    let (success, output) = run_to_exit(&["backup", "--store", &sqlite(&live), "--to", &to]).await;
    assert!(!success, "{output}");
    assert!(output.contains("already exists"), "{output}");
    assert_eq!(
        std::fs::read_to_string(&taken).unwrap(),
        "an earlier backup"
    );

    let fresh = dir.path().join("fresh.db").display().to_string();
    for store in ["mem", "postgres://kv:secret@127.0.0.1/kv"] {
        let (success, output) = run_to_exit(&["backup", "--store", store, "--to", &fresh]).await;
        assert!(!success, "{output}");
        assert!(output.contains("sqlite:PATH"), "{output}");
        assert!(!output.contains("secret"), "{output}");
    }
    assert!(!Path::new(&fresh).exists());
}
