//! The SQLite store checked at start and backed up while it serves, with the real binary: a file
//! with a damaged page (or one that is not a database) is refused with a message naming the file,
//! and `notice-service backup` makes a copy another instance serves the same notices from.

mod common;

use std::{
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
};

use chrono::Utc;
use common::{call, publish_now, WAIT};
use notice_service::{
    notice::NewNotice,
    store::{NoticeStore, SqliteStore, StoreOptions},
};
use serde_json::json;
use shared::{sqlite::damage, Dialect, PacketClient};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::oneshot,
};

/// The binary with no distributor and a clean environment.
fn notice_service() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_notice-service"));
    command
        .args(["--distributor", ""])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .env_remove("NOTICE_STORE")
        .env_remove("NOTICE_CHECK_STORE")
        .env_remove("NOTICE_LISTEN")
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
    let output = tokio::time::timeout(WAIT, notice_service().args(args).output())
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

/// A serving notice-service process and a client connected to it; killed on drop.
struct Process {
    child: Child,
    client: PacketClient,
}

impl Process {
    /// Starts the binary on `store` and waits until it serves.
    async fn start(store: &Path) -> Process {
        let addr = format!("127.0.0.1:{}", shared::testing::free_port());
        let mut child = notice_service()
            .args(["--store", &sqlite(store), "--listen", &addr])
            .stdout(Stdio::null())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (serving, served) = oneshot::channel();
        let kept = log.clone();
        // Keeps the log and drains it, so the child never blocks on a full pipe.
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut serving = Some(serving);
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("serving") {
                    if let Some(serving) = serving.take() {
                        let _ = serving.send(());
                    }
                }
                kept.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        tokio::time::timeout(WAIT, served)
            .await
            .expect("the service did not start in time")
            .unwrap_or_else(|_| panic!("exited before serving:\n{}", log.lock().unwrap()));
        let client = PacketClient::connect(addr, Dialect::Packet);
        tokio::time::timeout(WAIT, client.connected())
            .await
            .expect("the service accepts connections");
        Process { child, client }
    }

    /// The messages of the first notices, oldest first.
    async fn messages(&self) -> Vec<String> {
        let answer = call(&self.client, "GET", "/notices", json!({"limit": 500})).await;
        assert_eq!(answer.status(), 200, "{answer:?}");
        answer.params["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|notice| notice["message"].as_str().unwrap().to_owned())
            .collect()
    }

    async fn stop(mut self) {
        self.child.start_kill().unwrap();
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("the process did not exit")
            .unwrap();
    }
}

fn sqlite(path: &Path) -> String {
    format!("sqlite:{}", path.display())
}

/// A store of `count` notices written through the service's own SQLite store, then closed.
async fn filled_store(path: &Path, count: usize) {
    let store = SqliteStore::open(path, StoreOptions::default())
        .await
        .unwrap();
    for n in 0..count {
        let notice = NewNotice {
            message: format!("notice {n} {}", "m".repeat(200)),
            topic: Some("news".into()),
            to: None,
            from: None,
        };
        store.insert(notice, Utc::now()).await.unwrap();
    }
    store.close().await;
}

#[tokio::test]
async fn a_damaged_page_is_refused_at_start_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notices.db");
    filled_store(&path, 2000).await;
    let page = damage::garble_middle_page(&path).unwrap();
    let listen = format!("127.0.0.1:{}", shared::testing::free_port());

    for check in ["quick", "full"] {
        let (success, output) = run_to_exit(&[
            "--store",
            &sqlite(&path),
            "--check-store",
            check,
            "--listen",
            &listen,
        ])
        .await;
        assert!(
            !success,
            "started on page {page} garbled ({check}):\n{output}"
        );
        assert!(output.contains(&path.display().to_string()), "{output}");
        assert!(output.contains("is damaged"), "{output}");
        // The findings of the pragma: which page is bad.
        assert!(output.contains(&format!("page {page}")), "{output}");
        assert!(output.contains(".recover"), "{output}");
    }
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notices.db");
    std::fs::write(&path, "notice\n".repeat(1000)).unwrap();
    let listen = format!("127.0.0.1:{}", shared::testing::free_port());
    let (success, output) = run_to_exit(&["--store", &sqlite(&path), "--listen", &listen]).await;
    assert!(!success, "started on a text file:\n{output}");
    assert!(output.contains(&path.display().to_string()), "{output}");
    assert!(output.contains("not a SQLite database"), "{output}");
}

#[tokio::test]
async fn an_intact_file_is_checked_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notices.db");
    filled_store(&path, 2000).await;
    let process = Process::start(&path).await;
    let messages = process.messages().await;
    assert!(!messages.is_empty());
    assert!(messages[0].starts_with("notice 0 "), "{:?}", messages[0]);
    process.stop().await;
}

#[tokio::test]
async fn a_backup_taken_while_serving_restores_every_notice() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("notices.db");
    let copy = dir.path().join("backup.db");
    let process = Process::start(&live).await;
    for n in 0..50 {
        publish_now(&process.client, json!({"message": format!("m{n}")})).await;
    }

    let to = copy.display().to_string();
    let (success, output) = run_to_exit(&["backup", "--store", &sqlite(&live), "--to", &to]).await;
    assert!(success, "{output}");
    assert!(output.contains("backed up"), "{output}");
    // The service goes on writing after the copy; that notice is not in it.
    publish_now(&process.client, json!({"message": "after"})).await;
    process.stop().await;

    let restored = Process::start(&copy).await;
    let expected: Vec<String> = (0..50).map(|n| format!("m{n}")).collect();
    assert_eq!(restored.messages().await, expected);
    restored.stop().await;
}

#[tokio::test]
async fn backup_refuses_to_overwrite_and_refuses_other_stores() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("notices.db");
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
    for store in ["mem", "postgres://notice:secret@127.0.0.1/notices"] {
        let (success, output) = run_to_exit(&["backup", "--store", store, "--to", &fresh]).await;
        assert!(!success, "{output}");
        assert!(output.contains("sqlite:PATH"), "{output}");
        assert!(!output.contains("secret"), "{output}");
    }
    assert!(!Path::new(&fresh).exists());
}
