//! The SQLite store checked at start and backed up while it serves, with the real binary: a file
//! with a damaged page (or one that is not a database) is refused with a message naming the file,
//! an intact one serves, and `kv-service backup` makes a copy another instance serves from.
//! Running the binary and the checks both services share are in `shared::testing` (`process`,
//! `store_binary`); this file keeps how kv-service is started, filled and read.

mod common;

use std::{net::SocketAddr, path::Path};

use common::TextClient;
use kv_service::{
    store::{Condition, KvStore, SqliteStore, StoreOptions, Write},
    text_protocol::OwnedReply,
};
use shared::{
    sqlite::damage,
    testing::{
        process::{clean_command, run_to_exit, Serving},
        store_binary::{
            assert_backup_refusals, assert_refused_as_damaged, assert_refused_as_not_a_database,
            back_up, sqlite_spec, write_not_a_database,
        },
    },
};
use tokio::process::Command;

/// The binary with no distributor, ports chosen by the system and a clean environment.
fn kv_service() -> Command {
    let mut command = clean_command(
        env!("CARGO_BIN_EXE_kv-service"),
        &[
            "KV_STORE",
            "KV_CHECK_STORE",
            "JWT_SECRET_FILE",
            "JWT_PUBLIC_KEY_FILE",
            "CLUSTER_SECRET_FILE",
            "INSECURE",
        ],
    );
    command
        .args(["--distributor", "", "--listen", "127.0.0.1:0"])
        .args(["--text-listen", "127.0.0.1:0"]);
    command
}

/// `kv-service` with `args`.
fn kv_service_with(args: &[&str]) -> Command {
    let mut command = kv_service();
    command.args(args);
    command
}

/// A serving kv-service process; killed on drop.
struct Process {
    serving: Serving,
    text_addr: SocketAddr,
}

impl Process {
    /// Starts the binary on `store` and waits until its text port serves.
    async fn start(store: &Path) -> Process {
        let command = kv_service_with(&["--store", &sqlite_spec(store)]);
        let (serving, text_addr) = common::serve_text(command).await;
        Process { serving, text_addr }
    }

    async fn text(&self) -> TextClient {
        TextClient::connect(self.text_addr).await
    }

    async fn stop(self) {
        let _killed = self.serving.stop().await;
    }
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
            expires_at: None,
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
        let store = sqlite_spec(&path);
        let exit = run_to_exit(kv_service_with(&[
            "--store",
            &store,
            "--check-store",
            check,
        ]))
        .await;
        assert_refused_as_damaged(&exit, &path, page);
        assert!(
            !exit.output.contains("serving the text protocol"),
            "{}",
            exit.output
        );
    }
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.db");
    write_not_a_database(&path);
    let exit = run_to_exit(kv_service_with(&["--store", &sqlite_spec(&path)])).await;
    assert_refused_as_not_a_database(&exit, &path);
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

    back_up(kv_service(), &live, &copy).await;
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
    assert_backup_refusals(
        kv_service,
        &live,
        dir.path(),
        "postgres://kv:secret@127.0.0.1/kv",
    )
    .await;
}
