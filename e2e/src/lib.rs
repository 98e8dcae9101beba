//! A harness for end-to-end tests: it runs the real binaries as separate processes on loopback
//! ports and talks to them only the way users do, over HTTP, raw TCP and Server-Sent Events.
//!
//! Layout:
//! - [`Process`]: one child process, killed when dropped, with the signals the tests send
//!   (SIGKILL, SIGTERM, and SIGSTOP/SIGCONT as `freeze`/`thaw`, which waits until the process
//!   has stopped).
//! - [`Stack`]: distributor, gateway, kv-service replicas and a notice-service, started on free
//!   ports with their data in a temporary directory.
//! - [`sse`]: a reader for `text/event-stream` responses, as a browser's EventSource sees them.
//! - [`Checks`]: prints each check as it passes and a summary line.
//!
//! The benchmarks of the `bench` crate start their processes with this harness too, so a test
//! and a benchmark bring a stack up the same way.
//!
//! The binaries are taken from the target directory this test (or benchmark) was built into;
//! build them with `cargo build --workspace` (the workspace test command does) before running
//! these tests alone.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{bail, Context};
use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::Value;
use tokio::process::{Child, Command};

pub mod browser;
pub mod sse;

/// How long the harness waits for anything to come up before failing the test.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause between two looks at something a test waits for (a topology, a listing, a route).
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The directory holding the workspace's binaries: `target/<profile>`, whether the running
/// executable is a test (`target/<profile>/deps/e2e-<hash>`) or a binary beside them
/// (`target/release/gateway-bench`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable has a path");
    let dir = exe.parent().expect("an executable lives in a directory");
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent()
            .expect("deps lives in target/<profile>")
            .to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

fn binary(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace`, with \
         `--release` for the benchmarks)",
        path.display()
    );
    path
}

pub use shared::testing::free_port;

/// One child process of the stack. Dropping it kills it.
pub struct Process {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    child: Child,
}

impl Process {
    /// Starts one of the workspace's binaries from [`bin_dir`].
    pub fn spawn(name: &str, program: &str, args: &[String]) -> Process {
        Process::spawn_in(&bin_dir(), name, program, args)
    }

    /// Starts one of the workspace's binaries from `dir`.
    pub fn spawn_in(dir: &Path, name: &str, program: &str, args: &[String]) -> Process {
        Process::start(name, binary(dir, program), args).unwrap_or_else(|err| panic!("{err:#}"))
    }

    /// Starts `program`, a path or a name looked up in `PATH`, failing rather than panicking:
    /// for tools that are not part of the workspace (nginx, redis-server) and may be missing.
    pub fn start(name: &str, program: PathBuf, args: &[String]) -> anyhow::Result<Process> {
        let child = start(&program, args)?;
        Ok(Process {
            name: name.to_owned(),
            program,
            args: args.to_vec(),
            child,
        })
    }

    /// Fails if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }

    /// Waits until the process accepts connections on 127.0.0.1:`port`, failing at once if it
    /// exits first.
    pub async fn wait_for_port(&mut self, port: u16) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            self.check_running()?;
            if tokio::time::Instant::now() > deadline {
                bail!("{} never listened on port {port}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().expect("the process is running") as i32)
    }

    pub fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(self.pid(), signal)
            .unwrap_or_else(|err| panic!("sending {signal} to {}: {err}", self.name));
    }

    /// SIGSTOP, then waits until every thread of the process has stopped: `kill` returns before
    /// the stop takes effect, and a thread still running could answer one more request.
    pub async fn freeze(&self) {
        self.signal(Signal::SIGSTOP);
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        while !self.all_threads_stopped() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not stop within {READY_TIMEOUT:?} of SIGSTOP",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// SIGCONT: a frozen process runs again.
    pub fn thaw(&self) {
        self.signal(Signal::SIGCONT);
    }

    /// Whether each of the process's threads is in the stopped state (`T` in its
    /// `/proc/PID/task/TID/stat`).
    fn all_threads_stopped(&self) -> bool {
        let tasks = format!("/proc/{}/task", self.pid());
        let Ok(threads) = std::fs::read_dir(&tasks) else {
            return false;
        };
        threads.flatten().all(|thread| {
            std::fs::read_to_string(thread.path().join("stat")).is_ok_and(|stat| {
                // The state follows the command name, which is in parentheses and may hold any
                // character, so it is found from the last `)`.
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
            })
        })
    }

    /// `kill -9`: no chance to clean up.
    pub async fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait().await;
    }

    /// SIGTERM, then waits for the process to exit on its own; returns its exit code.
    pub async fn terminate(&mut self) -> anyhow::Result<Option<i32>> {
        self.signal(Signal::SIGTERM);
        let status = tokio::time::timeout(READY_TIMEOUT, self.child.wait())
            .await
            .with_context(|| format!("{} did not exit after SIGTERM", self.name))??;
        Ok(status.code())
    }

    /// Starts the same program with the same arguments again (after it exited or was killed).
    pub fn restart(&mut self) {
        self.child = start(&self.program, &self.args).unwrap_or_else(|err| panic!("{err:#}"));
    }
}

fn start(program: &Path, args: &[String]) -> anyhow::Result<Child> {
    Command::new(program)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("E2E_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// Where the stack keeps its data.
#[derive(Debug, Clone)]
pub enum Storage {
    /// Each process keeps its data in memory (`--store mem`), as the benchmarks run.
    Memory,
    /// SQLite files in the stack's temporary directory (one per kv replica).
    Sqlite,
    /// One PostgreSQL database shared by every replica.
    Postgres { kv_url: String, notice_url: String },
}

impl Storage {
    /// Databases `kv` and `notices` on `postgres`, one for each service (all its replicas share
    /// it).
    pub async fn postgres(postgres: &shared::testing::TestPostgres) -> Storage {
        Storage::Postgres {
            kv_url: postgres.create_database("kv").await,
            notice_url: postgres.create_database("notices").await,
        }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub kv_replicas: usize,
    pub notice: bool,
    pub storage: Storage,
    /// Distributor heartbeat interval and timeout.
    pub heartbeat: (Duration, Duration),
    /// Authentication on, as users run it: a cluster secret on every node, a JWT key on the
    /// gateway and the kv text port. Off, every process runs in protected mode (loopback only).
    pub auth: bool,
    /// Where the binaries are; [`bin_dir`] when `None`.
    pub bin_dir: Option<PathBuf>,
    /// More flags for one process, by its name: `distributor`, `gateway`, `notice`, `kv-0`...
    pub extra_flags: std::collections::HashMap<String, Vec<String>>,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            kv_replicas: 1,
            notice: true,
            storage: Storage::Sqlite,
            heartbeat: (Duration::from_millis(500), Duration::from_secs(3)),
            auth: true,
            bin_dir: None,
            extra_flags: Default::default(),
        }
    }
}

/// The secrets of a stack with authentication on, as files in its directory.
pub struct Secrets {
    pub cluster_secret_file: PathBuf,
    pub jwt_secret_file: PathBuf,
    /// A token with every scope (`admin`), for the harness's own requests.
    pub admin_token: String,
}

impl Secrets {
    /// Fresh random secrets in `dir` (mode 0600), and an admin token signed with the JWT key.
    pub fn generate(dir: &Path) -> Secrets {
        use std::os::unix::fs::PermissionsExt;
        let write = |name: &str| {
            let path = dir.join(name);
            let secret = format!("{:032x}{:032x}", rand_u128(), rand_u128());
            std::fs::write(&path, format!("{secret}\n")).expect("writing a secret file");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod 600");
            path
        };
        let cluster_secret_file = write("cluster.secret");
        let jwt_secret_file = write("jwt.secret");
        let admin_token = Secrets::mint_with(&jwt_secret_file, "e2e-admin", &["admin"]);
        Secrets {
            cluster_secret_file,
            jwt_secret_file,
            admin_token,
        }
    }

    /// A token for `subject` with `scopes`, valid for an hour.
    pub fn mint(&self, subject: &str, scopes: &[&str]) -> String {
        Secrets::mint_with(&self.jwt_secret_file, subject, scopes)
    }

    fn mint_with(jwt_secret_file: &Path, subject: &str, scopes: &[&str]) -> String {
        let key = shared::secrets::read_secret_file(jwt_secret_file).expect("the JWT key");
        shared::testing::hs256_token(&key, subject, scopes, Duration::from_secs(3600))
    }

    /// The flags that give a node the cluster secret.
    pub fn cluster_flags(&self) -> Vec<String> {
        vec![
            "--cluster-secret-file".into(),
            self.cluster_secret_file.display().to_string(),
        ]
    }

    /// The flags that give a binary the JWT key.
    fn jwt_flags(&self) -> Vec<String> {
        vec![
            "--jwt-secret-file".into(),
            self.jwt_secret_file.display().to_string(),
        ]
    }
}

fn rand_u128() -> u128 {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| std::io::Read::read_exact(&mut random, &mut bytes))
        .expect("reading /dev/urandom");
    u128::from_le_bytes(bytes)
}

/// The name of the gateway's topology cache in the stack's directory.
const TOPOLOGY_CACHE: &str = "gateway-topology.json";

/// A kv-service replica and its ports.
pub struct KvReplica {
    pub process: Process,
    pub port: u16,
    pub text_port: u16,
}

/// The whole system, running.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub distributor: Process,
    pub distributor_port: u16,
    pub gateway: Process,
    pub gateway_port: u16,
    pub kv: Vec<KvReplica>,
    pub notice: Option<Process>,
    /// notice-service's packet port, when it runs.
    pub notice_port: Option<u16>,
    /// Sends the admin token with every request when authentication is on.
    pub http: reqwest::Client,
    pub secrets: Option<Secrets>,
}

impl Stack {
    pub async fn start(options: StackOptions) -> Stack {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let bin_dir = options.bin_dir.clone().unwrap_or_else(bin_dir);
        let spawn = |name: &str, program: &str, args: &[String]| {
            let extra = options.extra_flags.get(name).into_iter().flatten().cloned();
            let args: Vec<String> = args.iter().cloned().chain(extra).collect();
            Process::spawn_in(&bin_dir, name, program, &args)
        };
        let secrets = options.auth.then(|| Secrets::generate(dir.path()));
        let cluster_flags = secrets
            .as_ref()
            .map(Secrets::cluster_flags)
            .unwrap_or_default();
        let jwt_flags = secrets.as_ref().map(Secrets::jwt_flags).unwrap_or_default();
        let distributor_port = free_port();
        let distributor_addr = format!("127.0.0.1:{distributor_port}");
        let (interval, timeout) = options.heartbeat;
        let distributor = spawn(
            "distributor",
            "distributor",
            &[
                "--listen".into(),
                distributor_addr.clone(),
                "--heartbeat-interval".into(),
                format!("{}ms", interval.as_millis()),
                "--heartbeat-timeout".into(),
                format!("{}ms", timeout.as_millis()),
            ]
            .into_iter()
            .chain(cluster_flags.iter().cloned())
            .collect::<Vec<_>>(),
        );
        wait_for_port(distributor_port).await;

        let kv = (0..options.kv_replicas)
            .map(|replica| {
                let store = match &options.storage {
                    Storage::Memory => "mem".to_owned(),
                    Storage::Sqlite => format!(
                        "sqlite:{}",
                        dir.path().join(format!("kv-{replica}.db")).display()
                    ),
                    Storage::Postgres { kv_url, .. } => kv_url.clone(),
                };
                let (port, text_port) = (free_port(), free_port());
                let process = spawn(
                    &format!("kv-{replica}"),
                    "kv-service",
                    &[
                        "--listen".into(),
                        format!("127.0.0.1:{port}"),
                        "--text-listen".into(),
                        format!("127.0.0.1:{text_port}"),
                        "--distributor".into(),
                        distributor_addr.clone(),
                        "--store".into(),
                        store,
                    ]
                    .into_iter()
                    .chain(cluster_flags.iter().cloned())
                    .chain(jwt_flags.iter().cloned())
                    .collect::<Vec<_>>(),
                );
                KvReplica {
                    process,
                    port,
                    text_port,
                }
            })
            .collect();

        let notice_port = options.notice.then(free_port);
        let notice = notice_port.map(|port| {
            let store = match &options.storage {
                Storage::Memory => "mem".to_owned(),
                Storage::Sqlite => format!("sqlite:{}", dir.path().join("notices.db").display()),
                Storage::Postgres { notice_url, .. } => notice_url.clone(),
            };
            spawn(
                "notice",
                "notice-service",
                &[
                    "--listen".into(),
                    format!("127.0.0.1:{port}"),
                    "--distributor".into(),
                    distributor_addr.clone(),
                    "--store".into(),
                    store,
                ]
                .into_iter()
                .chain(cluster_flags.iter().cloned())
                .collect::<Vec<_>>(),
            )
        });

        let gateway_port = free_port();
        let gateway = spawn(
            "gateway",
            "gateway",
            &[
                "--listen".into(),
                format!("127.0.0.1:{gateway_port}"),
                "--distributor".into(),
                distributor_addr,
                "--request-timeout".into(),
                "5s".into(),
                // In the stack's directory: tests running side by side must not share one.
                "--topology-cache".into(),
                dir.path().join(TOPOLOGY_CACHE).display().to_string(),
            ]
            .into_iter()
            .chain(cluster_flags.iter().cloned())
            .chain(jwt_flags.iter().cloned())
            .collect::<Vec<_>>(),
        );
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(secrets) = &secrets {
            let bearer = format!("Bearer {}", secrets.admin_token);
            headers.insert(
                reqwest::header::AUTHORIZATION,
                bearer.parse().expect("a token is a valid header value"),
            );
        }

        let stack = Stack {
            dir,
            distributor,
            distributor_port,
            gateway,
            gateway_port,
            kv,
            notice,
            notice_port,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .default_headers(headers)
                .build()
                .expect("an HTTP client"),
            secrets,
        };
        stack
            .wait_until_routed(options.kv_replicas, options.notice)
            .await;
        stack
    }

    /// The gateway's topology cache file (`--topology-cache`).
    pub fn topology_cache(&self) -> PathBuf {
        self.dir.path().join(TOPOLOGY_CACHE)
    }

    /// `http://127.0.0.1:PORT/path` on the gateway.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.gateway_port)
    }

    /// A raw connection to kv replica `replica`'s text port, authenticated (`auth<TOKEN>`, with
    /// the admin token) when authentication is on.
    pub async fn text_connection(&self, replica: usize) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt;
        let port = self.kv[replica].text_port;
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|err| panic!("connecting to the text port {port}: {err}"));
        if let Some(secrets) = &self.secrets {
            socket
                .write_all(format!("auth<{}>", secrets.admin_token).as_bytes())
                .await
                .expect("sending auth");
            let answers = read_text_answers(&mut socket, 1)
                .await
                .expect("an answer to auth");
            assert_eq!(answers[0].0, "ok", "auth refused: {answers:?}");
        }
        socket
    }

    /// Waits until the gateway routes to `kv_replicas` connected kv nodes (and a notice node).
    pub async fn wait_until_routed(&self, kv_replicas: usize, notice: bool) {
        let wanted = [
            ("GET/kv", kv_replicas),
            ("GET/notices", usize::from(notice)),
        ];
        self.wait_for_topology(&format!("the routes {wanted:?}"), |topology| {
            wanted
                .iter()
                .all(|(url, n)| connected_nodes(topology, url) == *n)
        })
        .await;
    }

    /// Polls `GET /_/topology` until `done` holds for it, within [`READY_TIMEOUT`], and returns
    /// that topology; panics naming `what` (with the last topology seen) when it never does.
    pub async fn wait_for_topology(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        match self.topology_within(READY_TIMEOUT, done).await {
            Some(topology) => topology,
            None => {
                let topology = self.topology().await.unwrap_or(Value::Null);
                panic!("the gateway's topology never showed {what}; topology: {topology:#}");
            }
        }
    }

    /// Polls `GET /_/topology` until `done` holds for it (a topology the gateway cannot give
    /// counts as `Value::Null`); `None` when `within` passes first.
    pub async fn topology_within(
        &self,
        within: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        tokio::time::timeout(within, async {
            loop {
                let topology = self.topology().await.unwrap_or(Value::Null);
                if done(&topology) {
                    return topology;
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        })
        .await
        .ok()
    }

    /// Polls `GET path` on the gateway until it answers 200 (a gateway restarting, a route
    /// coming back), within [`READY_TIMEOUT`]; returns the JSON body. Panics naming `what`.
    pub async fn wait_for_ok(&self, path: &str, what: &str) -> Value {
        let answer = tokio::time::timeout(READY_TIMEOUT, async {
            loop {
                if let Ok(response) = self.http.get(self.url(path)).send().await {
                    if response.status() == reqwest::StatusCode::OK {
                        return response.json::<Value>().await;
                    }
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: GET {path} never answered 200"));
        answer.unwrap_or_else(|err| panic!("GET {path}: the body is not JSON: {err}"))
    }

    /// `GET path` through the gateway, its body as JSON, whatever the status.
    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.http.get(self.url(path)).send().await;
        let response = response.unwrap_or_else(|err| panic!("GET {path}: {err}"));
        response
            .json()
            .await
            .unwrap_or_else(|err| panic!("GET {path}: the body is not JSON: {err}"))
    }

    /// The names `GET /notices/subscribers` lists now.
    pub async fn subscriber_names(&self) -> anyhow::Result<Vec<String>> {
        let list: Value = self
            .http
            .get(self.url("/notices/subscribers"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| item["name"].as_str().map(str::to_owned))
            .collect())
    }

    /// Waits until every one of `names` is listed in `GET /notices/subscribers`, within
    /// [`READY_TIMEOUT`]: presence is how a test knows its streams are live before it publishes
    /// (or a replay, not the live stream, would be what delivers).
    pub async fn wait_for_subscribers(&self, names: &[&str]) {
        let present = tokio::time::timeout(READY_TIMEOUT, async {
            loop {
                if let Ok(listed) = self.subscriber_names().await {
                    if names.iter().all(|name| listed.iter().any(|l| l == name)) {
                        return;
                    }
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        })
        .await;
        assert!(
            present.is_ok(),
            "{names:?} never all showed up in /notices/subscribers"
        );
    }

    /// The gateway's own view: `GET /_/topology`.
    pub async fn topology(&self) -> anyhow::Result<Value> {
        let response = self.http.get(self.url("/_/topology")).send().await?;
        if !response.status().is_success() {
            bail!("GET /_/topology: {}", response.status());
        }
        Ok(response.json().await?)
    }
}

/// The nodes serving `url` (e.g. `GET/kv`) in a `GET /_/topology` answer:
/// `{"routes": [{"url": "GET/kv", "nodes": [{"addr", "name", "connected": bool}, ...]}], ...}`.
pub fn route_nodes<'t>(topology: &'t Value, url: &str) -> Vec<&'t Value> {
    topology["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|route| route["url"] == url)
        .flat_map(|route| route["nodes"].as_array().into_iter().flatten())
        .collect()
}

/// How many connected nodes serve `url` in a `GET /_/topology` answer.
pub fn connected_nodes(topology: &Value, url: &str) -> usize {
    route_nodes(topology, url)
        .into_iter()
        .filter(|node| node["connected"] == true)
        .count()
}

/// Waits until something accepts connections on 127.0.0.1:`port`.
pub async fn wait_for_port(port: u16) {
    let result = tokio::time::timeout(READY_TIMEOUT, async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(result.is_ok(), "nothing listens on port {port}");
}

/// Prints each check as it completes and a closing summary line.
pub struct Checks {
    suite: String,
    passed: usize,
}

impl Checks {
    pub fn new(suite: &str) -> Checks {
        println!("== {suite}");
        Checks {
            suite: suite.to_owned(),
            passed: 0,
        }
    }

    /// Records a check that held (a failing one panics through its assertion before this).
    pub fn pass(&mut self, what: impl std::fmt::Display) {
        self.passed += 1;
        println!("  ok   {what}");
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        let failed = usize::from(std::thread::panicking());
        println!("{}: {} passed, {failed} failed", self.suite, self.passed);
    }
}

/// Escapes a key or value for the kv text protocol (`\` before `<`, `>`, `,` and `\`).
pub fn text_escape(raw: &str) -> String {
    let mut escaped = String::with_capacity(raw.len());
    for c in raw.chars() {
        if matches!(c, '<' | '>' | ',' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// Reads text-protocol answers (`word<escaped>`) from a raw socket until `count` have arrived.
pub async fn read_text_answers(
    stream: &mut tokio::net::TcpStream,
    count: usize,
) -> anyhow::Result<Vec<(String, String)>> {
    use tokio::io::AsyncReadExt;
    let mut answers = Vec::new();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(READY_TIMEOUT, async {
        while answers.len() < count {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                bail!("connection closed after {} answers", answers.len());
            }
            bytes.extend_from_slice(&buf[..n]);
            while let Some((answer, used)) = parse_text_answer(&bytes)? {
                answers.push(answer);
                bytes.drain(..used);
            }
        }
        Ok(())
    })
    .await
    .context("timed out waiting for text-protocol answers")??;
    Ok(answers)
}

/// One answer off the front of `bytes`, with the number of bytes it used, if it is complete.
fn parse_text_answer(bytes: &[u8]) -> anyhow::Result<Option<((String, String), usize)>> {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let Some(open) = bytes[start..].iter().position(|b| *b == b'<') else {
        return Ok(None);
    };
    let word = std::str::from_utf8(&bytes[start..start + open])?.to_owned();
    let mut body = Vec::new();
    let mut i = start + open + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if i + 1 < bytes.len() => {
                body.push(bytes[i + 1]);
                i += 2;
            }
            b'\\' => return Ok(None),
            b'>' => return Ok(Some(((word, String::from_utf8(body)?), i + 1))),
            other => {
                body.push(other);
                i += 1;
            }
        }
    }
    Ok(None)
}
