//! The SQLite store checked at start and backed up while it serves, with the real binary: a file
//! with a damaged page (or one that is not a database) is refused with a message naming the file,
//! and `notice-service backup` makes a copy another instance serves the same notices from.
//! Running the binary and the checks both services share are in `shared::testing` (`process`,
//! `store_binary`); this file keeps how notice-service is started, filled and read.

mod common;

use std::path::Path;

use chrono::Utc;
use common::{call, publish_now, WAIT};
use notice_service::{
    notice::NewNotice,
    store::{NoticeStore, SqliteStore, StoreOptions},
};
use serde_json::json;
use shared::{
    sqlite::damage,
    testing::{
        free_port,
        process::{clean_command, run_to_exit, Serving},
        store_binary::{
            assert_backup_refusals, assert_refused_as_damaged, assert_refused_as_not_a_database,
            back_up, sqlite_spec, write_not_a_database,
        },
    },
    Dialect, PacketClient,
};
use tokio::process::Command;

/// The binary with no distributor and a clean environment.
fn notice_service() -> Command {
    let mut command = clean_command(
        env!("CARGO_BIN_EXE_notice-service"),
        &["NOTICE_STORE", "NOTICE_CHECK_STORE", "NOTICE_LISTEN"],
    );
    command.args(["--distributor", ""]);
    command
}

/// `notice-service` with `args`.
fn notice_service_with(args: &[&str]) -> Command {
    let mut command = notice_service();
    command.args(args);
    command
}

/// A serving notice-service process and a client connected to it; killed on drop.
struct Process {
    serving: Serving,
    client: PacketClient,
}

impl Process {
    /// Starts the binary on `store` and waits until it serves.
    async fn start(store: &Path) -> Process {
        let addr = format!("127.0.0.1:{}", free_port());
        let command = notice_service_with(&["--store", &sqlite_spec(store), "--listen", &addr]);
        let (serving, ()) =
            Serving::start(command, |line| line.contains("serving").then_some(())).await;
        let client = PacketClient::connect(addr, Dialect::Packet);
        tokio::time::timeout(WAIT, client.connected())
            .await
            .expect("the service accepts connections");
        Process { serving, client }
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

    async fn stop(self) {
        let _killed = self.serving.stop().await;
    }
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
    let listen = format!("127.0.0.1:{}", free_port());

    for check in ["quick", "full"] {
        let store = sqlite_spec(&path);
        let args = [
            "--store",
            &store,
            "--check-store",
            check,
            "--listen",
            &listen,
        ];
        let exit = run_to_exit(notice_service_with(&args)).await;
        assert_refused_as_damaged(&exit, &path, page);
    }
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notices.db");
    write_not_a_database(&path);
    let listen = format!("127.0.0.1:{}", free_port());
    let args = ["--store", &sqlite_spec(&path), "--listen", &listen];
    let exit = run_to_exit(notice_service_with(&args)).await;
    assert_refused_as_not_a_database(&exit, &path);
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

    back_up(notice_service(), &live, &copy).await;
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
    assert_backup_refusals(
        notice_service,
        &live,
        dir.path(),
        "postgres://notice:secret@127.0.0.1/notices",
    )
    .await;
}
