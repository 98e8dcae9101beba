//! Test helpers for the other crates' integration tests (feature `testing`).
//!
//! [`TestPostgres`] is a throwaway PostgreSQL cluster per test: the stores are tested against a
//! real server, and a cluster of its own keeps each test independent of the others and of
//! whatever else runs on the machine.
//!
//! How it stays tidy:
//! - the cluster lives in a temporary directory (data, socket, server log), removed on drop;
//! - the server runs under a small `sh` wrapper that watches a pipe from the test process: when
//!   the [`TestPostgres`] is dropped, or the test process dies in any way (even `SIGKILL` from a
//!   test runner's timeout), the pipe closes and the wrapper stops the server. A server never
//!   outlives its test;
//! - PostgreSQL refuses to run as root, so when the tests run as root the cluster is created and
//!   served as the `postgres` user.
//!
//! Beside it, the fixtures kv-service and notice-service share, so each helper is written once:
//! [`StoreFixture`] (a fresh store on each [`Backend`]), [`store_contract!`](crate::store_contract)
//! (one contract suite run on all three backends), [`free_port`], [`hs256_token`], [`process`] (running a
//! workspace binary: to its exit, or serving until dropped) and [`store_binary`] (what a
//! service binary says when it refuses a store or backs one up).

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use crate::store_spec::StoreSpec;

/// How long `initdb` may take; several tests may be creating clusters at once on a small machine.
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a started server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a dropped server may take to stop before it is killed outright.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Starting is retried this many times when the chosen port was taken in the meantime.
const START_ATTEMPTS: usize = 5;

/// Runs the server (`"$@"`) in the background and stops it (immediate shutdown, SIGQUIT) as soon
/// as stdin reaches end of file, that is when the test process closes the pipe or dies. Exits with
/// the server's status, so an early server exit is seen by the test process too.
const WRAPPER: &str = r#"
exec 3<&0
"$@" </dev/null &
server=$!
{ read -r _ <&3; kill -QUIT "$server" 2>/dev/null; } &
watcher=$!
exec 3<&-
wait "$server"
status=$?
kill "$watcher" 2>/dev/null
exit "$status"
"#;

/// A PostgreSQL server of its own for one test, stopped and deleted on drop.
pub struct TestPostgres {
    /// Wrapper process around the server; see [`WRAPPER`].
    wrapper: Child,
    /// Closing this tells the wrapper to stop the server.
    stop: Option<ChildStdin>,
    port: u16,
    bin: PathBuf,
    user: Option<ServerUser>,
    // Declared last: removed after the server has stopped.
    dir: tempfile::TempDir,
}

/// The user the server runs as when the tests run as root.
#[derive(Clone, Copy)]
struct ServerUser {
    uid: u32,
    gid: u32,
}

impl TestPostgres {
    /// Creates a cluster (trust authentication, superuser `postgres`) in a temporary directory and
    /// starts it on a free port of 127.0.0.1.
    ///
    /// Returns `None`, saying why on stderr, when no server can be started here (PostgreSQL not
    /// installed, ...). When the `CI` environment variable is set it panics instead, so tests that
    /// need PostgreSQL are never silently skipped in CI.
    pub async fn start() -> Option<TestPostgres> {
        match Self::try_start().await {
            Ok(server) => Some(server),
            Err(reason) if std::env::var_os("CI").is_some() => {
                panic!(
                    "cannot start a test PostgreSQL server (CI is set, so not skipping): {reason}"
                )
            }
            Err(reason) => {
                eprintln!("skipping: cannot start a test PostgreSQL server: {reason}");
                None
            }
        }
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates a database and returns its URL. `name` must be a plain identifier
    /// (ASCII letters, digits, `_`); the test is wrong otherwise, so this panics.
    pub async fn create_database(&self, name: &str) -> String {
        assert!(
            !name.is_empty()
                && name.len() < 64
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "database name {name:?} must be a plain identifier"
        );
        let mut psql = tokio::process::Command::new(self.bin.join("psql"));
        psql.args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .args(["-p", &self.port.to_string(), "-d", "postgres", "-c"])
        .arg(format!("CREATE DATABASE \"{name}\""))
        .current_dir(self.dir.path())
        .stdin(Stdio::null())
        .kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(60), psql.output())
            .await
            .unwrap_or_else(|_| panic!("CREATE DATABASE {name} did not finish within 60 s"))
            .unwrap_or_else(|err| panic!("cannot run psql: {err}"));
        assert!(
            output.status.success(),
            "CREATE DATABASE {name} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        self.database_url(name)
    }

    /// Kills the server and every one of its processes with SIGKILL, as a crash or an OOM kill
    /// would, and waits until they are gone. [`TestPostgres::start_again`] brings it back.
    pub async fn kill9(&mut self) {
        if let Some(pid) = server_pid(&self.dir.path().join("data")) {
            let mut victims = children_of(pid);
            victims.push(pid);
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(victims.iter().map(u32::to_string))
                .status();
        }
        self.wait_stopped().await;
    }

    /// Stops the server (immediate shutdown) and waits until it is gone.
    pub async fn stop(&mut self) {
        drop(self.stop.take());
        self.wait_stopped().await;
    }

    /// Starts the stopped or killed server again, on the same port with the same data.
    pub async fn start_again(&mut self) {
        let (wrapper, stop) =
            match start_server(&self.bin, self.dir.path(), self.port, self.user).await {
                Ok(started) => started,
                Err(StartError::PortTaken(log) | StartError::Failed(log)) => {
                    panic!("cannot start the test PostgreSQL server again:\n{log}")
                }
            };
        self.wrapper = wrapper;
        self.stop = Some(stop);
    }

    async fn wait_stopped(&mut self) {
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if !matches!(self.wrapper.try_wait(), Ok(None)) {
                // Backends orphaned by a killed postmaster notice within moments; give them those.
                while server_pid(&self.dir.path().join("data"))
                    .is_some_and(|pid| !children_of(pid).is_empty())
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the test PostgreSQL server did not stop within {STOP_TIMEOUT:?}");
    }

    fn database_url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    async fn try_start() -> Result<TestPostgres, String> {
        let bin = find_bin_dir()?;
        let user = server_user()?;
        let dir = tempfile::Builder::new()
            .prefix("test-postgres-")
            .tempdir()
            .map_err(|err| format!("cannot create a temporary directory: {err}"))?;
        if let Some(user) = user {
            std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid)).map_err(
                |err| format!("cannot hand {} to postgres: {err}", dir.path().display()),
            )?;
        }
        let data = dir.path().join("data");
        init_cluster(&bin, &data, dir.path(), user).await?;

        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match start_server(&bin, dir.path(), port, user).await {
                Ok((wrapper, stop)) => {
                    return Ok(TestPostgres {
                        wrapper,
                        stop: Some(stop),
                        port,
                        bin,
                        user,
                        dir,
                    })
                }
                Err(StartError::PortTaken(log)) => last_error = log,
                Err(StartError::Failed(reason)) => return Err(reason),
            }
        }
        Err(format!(
            "every port tried was taken; last server log:\n{last_error}"
        ))
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // Closing the pipe makes the wrapper stop the server (immediate shutdown).
        drop(self.stop.take());
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match self.wrapper.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        // The server ignored the shutdown: kill it, then its wrapper.
        if let Some(pid) = server_pid(&self.dir.path().join("data")) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = self.wrapper.kill();
        let _ = self.wrapper.wait();
    }
}

enum StartError {
    /// Someone else bound the port between our check and the server's bind.
    PortTaken(String),
    Failed(String),
}

/// The directory holding `initdb` and `postgres`: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin` (Debian keeps the server binaries off PATH).
fn find_bin_dir() -> Result<PathBuf, String> {
    let has_server = |dir: &Path| dir.join("postgres").is_file() && dir.join("initdb").is_file();
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| "PostgreSQL server binaries not found (no pg_config, no /usr/lib/postgresql)")?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    candidates.sort();
    candidates
        .pop()
        .map(|(_, dir)| dir)
        .ok_or_else(|| "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin".into())
}

/// `Some(postgres user)` when running as root, since the server refuses to run as root.
fn server_user() -> Result<Option<ServerUser>, String> {
    let id = |args: &[&str]| -> Result<u32, String> {
        let output = Command::new("id")
            .args(args)
            .output()
            .map_err(|err| format!("cannot run id: {err}"))?;
        if !output.status.success() {
            return Err(format!(
                "id {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|err| format!("id {}: {err}", args.join(" ")))
    };
    if id(&["-u"])? != 0 {
        return Ok(None);
    }
    let uid = id(&["-u", "postgres"])
        .map_err(|err| format!("running as root and there is no postgres user ({err})"))?;
    let gid = id(&["-g", "postgres"])?;
    Ok(Some(ServerUser { uid, gid }))
}

fn command_as(program: impl AsRef<std::ffi::OsStr>, user: Option<ServerUser>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(program);
    if let Some(user) = user {
        command.uid(user.uid).gid(user.gid);
    }
    command
}

async fn init_cluster(
    bin: &Path,
    data: &Path,
    workdir: &Path,
    user: Option<ServerUser>,
) -> Result<(), String> {
    let mut initdb = command_as(bin.join("initdb"), user);
    initdb
        .arg("-D")
        .arg(data)
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
        .args(["--locale=C", "--no-instructions"])
        // The server user may not be allowed into the caller's working directory.
        .current_dir(workdir)
        .stdin(Stdio::null());
    let mut initdb = tokio::process::Command::from(initdb);
    initdb.kill_on_drop(true);
    let output = tokio::time::timeout(INITDB_TIMEOUT, initdb.output())
        .await
        .map_err(|_| format!("initdb did not finish within {INITDB_TIMEOUT:?}"))?
        .map_err(|err| format!("cannot run initdb: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "initdb failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// A port on 127.0.0.1 that was free a moment ago, for a server a test starts as a process (one
/// that cannot be handed a bound listener). The server may still lose it to someone else; a
/// caller that can retries with another one then. Every test of the workspace takes its ports
/// from here.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("binding 127.0.0.1:0 finds a free port")
}

async fn start_server(
    bin: &Path,
    dir: &Path,
    port: u16,
    user: Option<ServerUser>,
) -> Result<(Child, ChildStdin), StartError> {
    let log_path = dir.join(format!("server-{port}.log"));
    let log = std::fs::File::create(&log_path)
        .map_err(|err| StartError::Failed(format!("cannot create the server log: {err}")))?;
    let log_err = log
        .try_clone()
        .map_err(|err| StartError::Failed(format!("cannot create the server log: {err}")))?;
    let mut wrapper = command_as("sh", user)
        .args(["-c", WRAPPER, "sh"])
        .arg(bin.join("postgres"))
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-p", &port.to_string(), "-k"])
        .arg(dir)
        .args(["-c", "listen_addresses=127.0.0.1", "-F"])
        // Small: many tests run their own cluster at the same time.
        .args(["-c", "shared_buffers=16MB", "-c", "max_connections=200"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|err| StartError::Failed(format!("cannot start postgres: {err}")))?;
    let stop = wrapper.stdin.take().expect("stdin is piped");

    let read_log = || {
        let mut text = String::new();
        let _ = std::fs::File::open(&log_path).and_then(|mut f| f.read_to_string(&mut text));
        text
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = wrapper.try_wait() {
            let log = read_log();
            return Err(
                if log.contains("could not bind") || log.contains("already in use") {
                    StartError::PortTaken(log)
                } else {
                    StartError::Failed(format!("postgres exited ({status}) while starting:\n{log}"))
                },
            );
        }
        if is_ready(bin, dir, port).await {
            return Ok((wrapper, stop));
        }
        if Instant::now() >= deadline {
            drop(stop);
            let _ = wrapper.kill();
            let _ = wrapper.wait();
            return Err(StartError::Failed(format!(
                "postgres did not accept connections within {READY_TIMEOUT:?}:\n{}",
                read_log()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the server accepts connections (and so has finished starting up), per `pg_isready`.
async fn is_ready(bin: &Path, dir: &Path, port: u16) -> bool {
    let mut probe = tokio::process::Command::new(bin.join("pg_isready"));
    probe
        .args([
            "-q",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-t",
            "5",
        ])
        .args(["-p", &port.to_string()])
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    matches!(
        tokio::time::timeout(Duration::from_secs(10), probe.status()).await,
        Ok(Ok(status)) if status.success()
    )
}

/// The postmaster's pid, from the first line of `postmaster.pid`.
/// The processes whose parent is `pid` (Linux `/proc`).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            // The fields after the command name (in parentheses, which may hold spaces): state, ppid.
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let after_name = &stat[stat.rfind(')')? + 1..];
                    after_name.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn server_pid(data: &Path) -> Option<u32> {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The three places a service keeps its data, for suites run once on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Sqlite,
    Postgres,
}

/// How long a test waits for its own PostgreSQL cluster; `initdb` is slow on a busy machine.
const POSTGRES_START_TIMEOUT: Duration = Duration::from_secs(180);

/// A store specification plus whatever keeps its data alive (a temporary directory, a
/// PostgreSQL server), dropped with it.
pub struct StoreFixture {
    pub spec: StoreSpec,
    _dir: Option<tempfile::TempDir>,
    pub postgres: Option<TestPostgres>,
}

impl StoreFixture {
    /// A fresh, empty store on `backend`; `name` names its SQLite file (`NAME.db`) or its
    /// PostgreSQL database. `None` only when PostgreSQL cannot be started outside CI
    /// ([`TestPostgres::start`] says why).
    pub async fn new(backend: Backend, name: &str) -> Option<StoreFixture> {
        Some(match backend {
            Backend::Memory => StoreFixture {
                spec: StoreSpec::Memory,
                _dir: None,
                postgres: None,
            },
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("a temporary directory");
                StoreFixture {
                    spec: StoreSpec::Sqlite(dir.path().join(format!("{name}.db"))),
                    _dir: Some(dir),
                    postgres: None,
                }
            }
            Backend::Postgres => {
                let postgres = tokio::time::timeout(POSTGRES_START_TIMEOUT, TestPostgres::start())
                    .await
                    .expect("PostgreSQL did not start in time")?;
                let url = postgres.create_database(name).await;
                StoreFixture {
                    spec: StoreSpec::Postgres(url),
                    _dir: None,
                    postgres: Some(postgres),
                }
            }
        })
    }
}

/// Runs each of a store contract's cases on each [`Backend`], as one test per case and
/// backend, in modules `memory`, `sqlite` and `postgres`. The calling file provides
/// `open(Backend) -> Option<Opened>` (`None` skips the case: PostgreSQL could not start outside
/// CI), where `Opened` has a `store: Arc<S>` with an `async fn close(&self)`, and each case as
/// `async fn case(store: Arc<S>)`. `within` bounds each case; `workers` is the runtime's
/// worker threads (a literal). The `durable` cases run on the SQL backends only and get the
/// whole `Opened` (to close the store and open it again): `async fn case(opened: Opened)`.
///
/// ```ignore
/// shared::store_contract! {
///     within: WAIT, workers: 2;
///     ids_increase_and_queries_filter,
///     whispers_are_listed_only_to_their_addressee;
///     durable: data_survives_reopening,
/// }
/// ```
#[macro_export]
macro_rules! store_contract {
    (
        within: $within:expr, workers: $workers:literal;
        $($case:ident),+ $(,)?
        $(; durable: $($durable:ident),+ $(,)?)?
    ) => {
        $crate::store_contract!(@backend memory, Memory, $within, $workers; $($case),+;);
        $crate::store_contract!(
            @backend sqlite, Sqlite, $within, $workers; $($case),+; $($($durable),+)?
        );
        $crate::store_contract!(
            @backend postgres, Postgres, $within, $workers; $($case),+; $($($durable),+)?
        );
    };
    (
        @backend $module:ident, $kind:ident, $within:expr, $workers:literal;
        $($case:ident),+; $($durable:ident),*
    ) => {
        mod $module {
            use super::*;

            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = $workers)]
                async fn $case() {
                    let Some(opened) = open($crate::testing::Backend::$kind).await else {
                        return;
                    };
                    tokio::time::timeout($within, super::$case(opened.store.clone()))
                        .await
                        .expect("the case finished in time");
                    opened.store.close().await;
                }
            )+

            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $durable() {
                    let Some(opened) = open($crate::testing::Backend::$kind).await else {
                        return;
                    };
                    super::$durable(opened).await;
                }
            )*
        }
    };
}

/// An HS256 token signed with `secret` for `subject` with `scopes`, valid for `ttl`: what a
/// test hands the gateway or the kv text port as a caller's credentials.
pub fn hs256_token(secret: &[u8], subject: &str, scopes: &[&str], ttl: Duration) -> String {
    let scopes: Vec<String> = scopes.iter().map(|scope| scope.to_string()).collect();
    crate::token::mint(
        secret,
        &crate::token::TokenRequest {
            subject,
            scopes: &scopes,
            ttl,
            audience: None,
            issuer: None,
        },
    )
    .expect("a token can be minted")
}

/// Running a workspace binary from its tests: a clean command, a run to its exit with what it
/// printed, and a serving process found ready by a line of its log (the address it logs), killed
/// when dropped. The services' and the gateway's process tests all start binaries this way.
pub mod process {
    use std::{
        net::SocketAddr,
        process::{ExitStatus, Stdio},
        sync::{Arc, Mutex},
        time::Duration,
    };

    use tokio::{
        io::{AsyncBufReadExt, BufReader},
        process::{Child, Command},
        sync::oneshot,
        task::JoinHandle,
    };

    /// Bound on a binary's start, on its run to exit and on its stop; only reached when a test
    /// fails.
    pub const WAIT: Duration = Duration::from_secs(30);

    /// `program` with `RUST_LOG=info`, no colours, none of `cleared_env` (the binary's own
    /// variables, so the developer's environment cannot change a test), no stdin, piped output,
    /// and killed when dropped.
    pub fn clean_command(program: &str, cleared_env: &[&str]) -> Command {
        let mut command = Command::new(program);
        command
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for name in cleared_env {
            command.env_remove(name);
        }
        command
    }

    /// How a binary run to its exit ended.
    #[derive(Debug)]
    pub struct Exit {
        pub success: bool,
        /// Its stdout followed by its stderr.
        pub output: String,
    }

    /// Runs `command` until it exits, within [`WAIT`].
    pub async fn run_to_exit(mut command: Command) -> Exit {
        let output = tokio::time::timeout(WAIT, command.output())
            .await
            .expect("the binary did not exit in time")
            .expect("the binary runs");
        Exit {
            success: output.status.success(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    }

    /// The value of `addr=` on a log line, colour codes or not.
    pub fn logged_addr(line: &str) -> Option<SocketAddr> {
        let plain = without_colour(line);
        let start = plain.find("addr=")? + "addr=".len();
        plain[start..].split_whitespace().next()?.parse().ok()
    }

    /// `line` without ANSI colour sequences (`ESC [ ... m`).
    fn without_colour(line: &str) -> String {
        let mut plain = String::with_capacity(line.len());
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                chars.by_ref().find(|&c| c == 'm');
            } else {
                plain.push(c);
            }
        }
        plain
    }

    /// A serving process, killed when dropped.
    pub struct Serving {
        child: Child,
        /// Everything it has logged so far.
        log: Arc<Mutex<String>>,
        /// Reads the log; ends when the process has exited.
        reader: JoinHandle<()>,
    }

    /// How a serving process ended.
    #[derive(Debug)]
    pub struct Stopped {
        pub status: ExitStatus,
        /// Its whole log (stderr).
        pub log: String,
    }

    impl Serving {
        /// Spawns `command` and feeds each line of its log to `ready` until it returns what
        /// the test waits for (within [`WAIT`]). Its stderr is kept and drained for as long as
        /// it runs, so it never blocks on a full pipe; a process that exits first fails the
        /// test with its log.
        pub async fn start<T: Send + 'static>(
            mut command: Command,
            mut ready: impl FnMut(&str) -> Option<T> + Send + 'static,
        ) -> (Serving, T) {
            let mut child = command
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("the binary starts");
            let stderr = child.stderr.take().expect("stderr is piped");
            let log = Arc::new(Mutex::new(String::new()));
            let (found, found_rx) = oneshot::channel();
            let kept = log.clone();
            let reader = tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                let mut found = Some(found);
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(value) = found.is_some().then(|| ready(&line)).flatten() {
                        let _ = found.take().expect("not sent yet").send(value);
                    }
                    let mut log = kept.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
            let value = tokio::time::timeout(WAIT, found_rx)
                .await
                .expect("the binary did not start serving in time")
                .unwrap_or_else(|_| panic!("exited before serving:\n{}", log.lock().unwrap()));
            (Serving { child, log, reader }, value)
        }

        /// Its process id.
        pub fn pid(&self) -> u32 {
            self.child.id().expect("the process runs")
        }

        /// What it has logged so far.
        pub fn log(&self) -> String {
            self.log.lock().unwrap().clone()
        }

        /// Waits (within [`WAIT`]) until it exits by itself.
        pub async fn wait(&mut self) -> ExitStatus {
            tokio::time::timeout(WAIT, self.child.wait())
                .await
                .expect("the process did not exit")
                .expect("waiting for the process")
        }

        /// Kills it (`SIGKILL`), waits (within [`WAIT`]) until it has exited and its log is
        /// read to the end, and returns both.
        pub async fn stop(mut self) -> Stopped {
            self.child.start_kill().expect("the process can be killed");
            let status = self.wait().await;
            tokio::time::timeout(WAIT, &mut self.reader)
                .await
                .expect("the log did not end")
                .expect("the log reader did not panic");
            Stopped {
                status,
                log: self.log(),
            }
        }
    }
}

/// Running kv-service or notice-service on a SQLite store the way an operator does: both check
/// and back up their files with the same code (`crate::sqlite`), so the checks of what they
/// print live here once; each service's tests keep only how to start, fill and read it.
pub mod store_binary {
    use std::path::Path;

    use tokio::process::Command;

    use super::process::{run_to_exit, Exit};

    /// The `--store` value for the SQLite file at `path`.
    pub fn sqlite_spec(path: &Path) -> String {
        format!("sqlite:{}", path.display())
    }

    /// Writes text that is not a SQLite database where a store is expected.
    pub fn write_not_a_database(path: &Path) {
        std::fs::write(path, "not a database\n".repeat(1000)).expect("writing the file");
    }

    /// `exit` is a refusal to start on `path`, whose page `page` is damaged, naming the file,
    /// the page and the way to recover.
    pub fn assert_refused_as_damaged(exit: &Exit, path: &Path, page: u64) {
        let Exit { success, output } = exit;
        assert!(!success, "started with page {page} garbled:\n{output}");
        assert!(output.contains(&path.display().to_string()), "{output}");
        assert!(output.contains("is damaged"), "{output}");
        // The findings of the pragma: which page is bad.
        assert!(output.contains(&format!("page {page}")), "{output}");
        assert!(output.contains(".recover"), "{output}");
    }

    /// `exit` is a refusal to start on `path`, which is not a SQLite database, naming the file.
    pub fn assert_refused_as_not_a_database(exit: &Exit, path: &Path) {
        let Exit { success, output } = exit;
        assert!(!success, "started on a text file:\n{output}");
        assert!(output.contains(&path.display().to_string()), "{output}");
        assert!(output.contains("not a SQLite database"), "{output}");
    }

    /// Runs `binary backup` from the store at `live` to `copy` and checks that it succeeded.
    pub async fn back_up(mut binary: Command, live: &Path, copy: &Path) {
        let to = copy.display().to_string();
        binary.args(["backup", "--store", &sqlite_spec(live), "--to", &to]);
        let Exit { success, output } = run_to_exit(binary).await;
        assert!(success, "{output}");
        assert!(output.contains("backed up"), "{output}");
    }

    /// `binary backup` refuses to overwrite a file (leaving it as it was) and refuses a store
    /// that is not SQLite (the memory store, and `postgres_url`, whose password it does not
    /// print: it must be `secret`). `live` is a SQLite store; `dir` a directory for the files
    /// it tries.
    pub async fn assert_backup_refusals(
        binary: impl Fn() -> Command,
        live: &Path,
        dir: &Path,
        postgres_url: &str,
    ) {
        let taken = dir.join("taken.db");
        std::fs::write(&taken, "an earlier backup").unwrap();
        let to = taken.display().to_string();
        let mut command = binary();
        command.args(["backup", "--store", &sqlite_spec(live), "--to", &to]);
        let Exit { success, output } = run_to_exit(command).await;
        assert!(!success, "{output}");
        assert!(output.contains("already exists"), "{output}");
        assert_eq!(
            std::fs::read_to_string(&taken).unwrap(),
            "an earlier backup"
        );

        let fresh = dir.join("fresh.db").display().to_string();
        for store in ["mem", postgres_url] {
            let mut command = binary();
            command.args(["backup", "--store", store, "--to", &fresh]);
            let Exit { success, output } = run_to_exit(command).await;
            assert!(!success, "{output}");
            assert!(output.contains("sqlite:PATH"), "{output}");
            assert!(!output.contains("secret"), "{output}");
        }
        assert!(!Path::new(&fresh).exists());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `SELECT` text through psql against `url`, returning the single value printed.
    fn psql(server: &TestPostgres, url: &str, sql: &str) -> Result<String, String> {
        let output = Command::new(server.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                url,
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|err| err.to_string())?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    fn process_exists(pid: u32) -> bool {
        // A stopped server leaves at most a zombie until its wrapper reaps it; count only live ones.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| !stat.contains(") Z "))
            .unwrap_or(false)
    }

    async fn start() -> TestPostgres {
        tokio::time::timeout(Duration::from_secs(180), TestPostgres::start())
            .await
            .expect("start did not finish in time")
            .expect("PostgreSQL is installed on test machines")
    }

    #[test]
    fn wrapper_script_is_valid_sh() {
        let status = Command::new("sh")
            .args(["-n", "-c", WRAPPER])
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn serves_queries_and_creates_databases() {
        let server = start().await;
        assert_eq!(
            server.url(),
            format!("postgres://postgres@127.0.0.1:{}/postgres", server.port())
        );
        assert_eq!(psql(&server, &server.url(), "SELECT 40 + 2").unwrap(), "42");

        let url = server.create_database("second_db").await;
        assert!(url.ends_with("/second_db"));
        psql(
            &server,
            &url,
            "CREATE TABLE t (v text); INSERT INTO t VALUES ('x')",
        )
        .unwrap();
        assert_eq!(psql(&server, &url, "SELECT v FROM t").unwrap(), "x");
        assert_eq!(psql(&server, &url, "SHOW server_encoding").unwrap(), "UTF8");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn drop_stops_the_server_and_removes_its_directory() {
        let server = start().await;
        let port = server.port();
        let dir = server.dir.path().to_owned();
        let pid = server_pid(&dir.join("data")).expect("a running server has a pid file");
        assert!(process_exists(pid));

        drop(server);

        assert!(!process_exists(pid), "the server process is gone");
        assert!(!dir.exists(), "the cluster directory is removed");
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn servers_of_concurrent_tests_are_independent() {
        let (a, b) = tokio::join!(start(), start());
        assert_ne!(a.port(), b.port());
        psql(&a, &a.url(), "CREATE TABLE only_in_a (v int)").unwrap();
        assert!(psql(&b, &b.url(), "SELECT * FROM only_in_a").is_err());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn create_database_rejects_names_that_are_not_identifiers() {
        let server = start().await;
        let attempt = tokio::spawn(async move {
            server
                .create_database("x\"; DROP DATABASE postgres; --")
                .await
        });
        assert!(attempt.await.unwrap_err().is_panic());
    }

    /// Not a test of its own: the body of `server_stops_when_its_test_process_is_killed`,
    /// run in a child process that is then killed.
    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "helper run by another test"]
    async fn helper_start_and_wait_to_be_killed() {
        if std::env::var_os("TEST_POSTGRES_HELPER").is_none() {
            return;
        }
        let server = start().await;
        let pid = server_pid(&server.dir.path().join("data")).unwrap();
        println!("READY {pid} {}", server.port());
        tokio::time::sleep(Duration::from_secs(120)).await;
    }

    #[test]
    fn server_stops_when_its_test_process_is_killed() {
        use std::io::BufRead;
        let mut helper = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "testing::tests::helper_start_and_wait_to_be_killed",
            ])
            .args(["--ignored", "--nocapture", "--test-threads=1"])
            .env("TEST_POSTGRES_HELPER", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(helper.stdout.take().unwrap());
        let ready = stdout
            .lines()
            .map_while(Result::ok)
            // libtest may print the test's name on the same line first.
            .find_map(|line| Some(line.split_once("READY ")?.1.to_owned()));
        let Some(ready) = ready else {
            let _ = helper.kill();
            let _ = helper.wait();
            panic!("the helper did not start a server");
        };
        let pid: u32 = ready.split(' ').next().unwrap().parse().unwrap();
        assert!(process_exists(pid));

        helper.kill().unwrap();
        helper.wait().unwrap();

        let deadline = Instant::now() + Duration::from_secs(30);
        while process_exists(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!process_exists(pid), "the server outlived its test process");
    }
}
