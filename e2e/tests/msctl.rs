//! `msctl` run as a process against a real stack with authentication on, as an operator runs it:
//! every command, its table and its `--json`, its exit status and its errors on stderr; and the
//! gateway's `/_/connections` figures it shows, including a node that dropped and came back.
//!
//! msctl is one of the workspace's binaries: build it (`cargo build --workspace`) before running
//! these tests alone.

use std::{process::Stdio, time::Duration};

use e2e::{bin_dir, Checks, Stack, StackOptions, READY_TIMEOUT};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStderr, ChildStdout, Command},
};

/// One msctl command line against a gateway, with a token.
struct Msctl {
    gateway: String,
    token: Option<String>,
}

/// What a finished msctl printed, and how it ended.
#[derive(Debug)]
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Output {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|err| panic!("stdout is not JSON ({err}): {self:?}"))
    }

    #[track_caller]
    fn succeeded(self) -> Output {
        assert_eq!(self.code, Some(0), "msctl failed: {self:?}");
        assert!(
            self.stderr.is_empty(),
            "a success writes nothing on stderr: {self:?}"
        );
        self
    }

    #[track_caller]
    fn failed_with(self, needle: &str) -> Output {
        assert_eq!(self.code, Some(1), "msctl should have failed: {self:?}");
        assert!(
            self.stdout.is_empty(),
            "a failure writes nothing on stdout: {self:?}"
        );
        assert!(self.stderr.starts_with("msctl: "), "{self:?}");
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}: {self:?}"
        );
        self
    }
}

/// A msctl left running (a follower), with its output read line by line.
struct Follower {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: ChildStderr,
}

impl Follower {
    /// The next line it prints, within [`READY_TIMEOUT`].
    async fn line(&mut self) -> String {
        tokio::time::timeout(READY_TIMEOUT, self.stdout.next_line())
            .await
            .expect("msctl printed nothing in time")
            .expect("reading msctl's output")
            .expect("msctl ended before printing the line")
    }

    /// Waits for it to exit by itself; its status code and stderr.
    async fn exit(mut self) -> (Option<i32>, String) {
        use tokio::io::AsyncReadExt;
        let status = tokio::time::timeout(READY_TIMEOUT, self.child.wait())
            .await
            .expect("msctl did not end")
            .unwrap();
        let mut stderr = String::new();
        self.stderr.read_to_string(&mut stderr).await.unwrap();
        (status.code(), stderr)
    }
}

impl Msctl {
    fn for_stack(stack: &Stack) -> Msctl {
        Msctl {
            gateway: stack.url(""),
            token: stack.secrets.as_ref().map(|s| s.admin_token.clone()),
        }
    }

    fn with_token(&self, token: Option<String>) -> Msctl {
        Msctl {
            gateway: self.gateway.clone(),
            token,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(bin_dir().join("msctl"));
        command
            .args(args)
            .env_remove("MSCTL_TOKEN")
            .env_remove("MSCTL_JSON")
            .env("MSCTL_GATEWAY", &self.gateway)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(token) = &self.token {
            command.env("MSCTL_TOKEN", token);
        }
        command
    }

    async fn run(&self, args: &[&str]) -> Output {
        let output = tokio::time::timeout(READY_TIMEOUT, self.command(args).output())
            .await
            .unwrap_or_else(|_| panic!("msctl {args:?} did not finish"))
            .expect("running msctl (build it with `cargo build --workspace`)");
        Output {
            code: output.status.code(),
            stdout: String::from_utf8(output.stdout).unwrap(),
            stderr: String::from_utf8(output.stderr).unwrap(),
        }
    }

    fn follow(&self, args: &[&str]) -> Follower {
        let mut child = self.command(args).spawn().expect("starting msctl");
        Follower {
            stdout: BufReader::new(child.stdout.take().unwrap()).lines(),
            stderr: child.stderr.take().unwrap(),
            child,
        }
    }
}

/// Runs `args` until `done` holds for its output (figures that follow traffic by a sample).
async fn run_until(msctl: &Msctl, args: &[&str], done: impl Fn(&Output) -> bool) -> Output {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        let output = msctl.run(args).await;
        if done(&output) {
            return output;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "msctl {args:?} never showed what was expected: {output:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The node at `addr` in a `msctl connections --json` answer.
fn node<'a>(connections: &'a Value, addr: &str) -> Option<&'a Value> {
    connections["nodes"]
        .as_array()?
        .iter()
        .find(|node| node["addr"] == addr)
}

#[tokio::test]
async fn msctl_reads_and_operates_a_running_system() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let mut checks = Checks::new("msctl against a real stack");
    let msctl = Msctl::for_stack(&stack);
    let jwt_file = stack
        .secrets
        .as_ref()
        .unwrap()
        .jwt_secret_file
        .display()
        .to_string();
    let kv_addr = format!("127.0.0.1:{}", stack.kv[0].port);

    // topology
    let table = msctl.run(&["topology"]).await.succeeded().stdout;
    assert!(table.starts_with("source: distributor\nROUTE"), "{table}");
    let kv_row = table
        .lines()
        .find(|line| line.starts_with("GET/kv ") && line.contains(&kv_addr))
        .unwrap_or_else(|| panic!("no GET/kv row: {table}"));
    assert!(
        kv_row.contains("kv:read") && kv_row.contains("connected"),
        "{kv_row}"
    );
    let topology = msctl.run(&["--json", "topology"]).await.succeeded().json();
    assert_eq!(topology["source"], "distributor");
    checks.pass("topology: a table of routes and nodes, and the gateway's JSON with --json");

    // kv
    let put = msctl
        .run(&["kv", "put", "app/greeting", "hello world"])
        .await
        .succeeded()
        .stdout;
    assert!(put.starts_with("KEY"), "{put}");
    assert!(put.contains("app/greeting  1"), "{put}");
    let got = msctl
        .run(&["--json", "kv", "get", "app/greeting"])
        .await
        .succeeded()
        .json();
    assert_eq!(got["value"], "hello world");
    assert_eq!(got["version"], 1);
    msctl
        .run(&["kv", "put", "app/odd key?#", "", "--if-version", "1"])
        .await
        .failed_with("409 version mismatch");
    let put = msctl
        .run(&["--json", "kv", "put", "app/odd key?#", "", "--ttl", "1h"])
        .await
        .succeeded()
        .json();
    assert_eq!(put["key"], "app/odd key?#");
    assert_eq!(put["value"], "");
    let listed = msctl
        .run(&["kv", "ls", "--prefix", "app/"])
        .await
        .succeeded()
        .stdout;
    let keys: Vec<&str> = listed
        .lines()
        .skip(1)
        .map(|line| line.split("  ").next().unwrap())
        .collect();
    assert_eq!(keys, ["app/greeting", "app/odd key?#"], "{listed}");
    let page = msctl
        .run(&["--json", "kv", "ls", "--prefix", "app/", "--limit", "1"])
        .await
        .succeeded()
        .json();
    assert_eq!(page["next"], "app/greeting");
    let deleted = msctl
        .run(&["kv", "del", "app/greeting"])
        .await
        .succeeded()
        .stdout;
    assert_eq!(deleted, "deleted app/greeting\n");
    msctl
        .run(&["kv", "get", "app/greeting"])
        .await
        .failed_with("GET /kv/app/greeting: 404 no such key: app/greeting");
    msctl
        .run(&["kv", "ls", "--limit", "5000"])
        .await
        .failed_with("400 limit must be between 1 and 1000");
    checks.pass("kv get/put/del/ls: tables, --json, keys with spaces and ?#, --ttl accepted, errors with status on stderr");

    // kv watch: changes as they are made, one line each.
    let mut watch = msctl.follow(&["kv", "watch", "--prefix", "app/"]);
    // The watch is open once the gateway relays it; a put made before then could be missed,
    // so keep writing until one shows.
    let mut seen = None;
    for attempt in 0..50 {
        msctl
            .run(&["kv", "put", "app/watched", &format!("v{attempt}")])
            .await
            .succeeded();
        if let Ok(Ok(Some(line))) =
            tokio::time::timeout(Duration::from_millis(200), watch.stdout.next_line()).await
        {
            seen = Some(line);
            break;
        }
    }
    let line = seen.expect("kv watch printed no change");
    assert!(line.starts_with("put  app/watched  version "), "{line}");
    checks.pass("kv watch --prefix prints the changes as they are made");

    // notices
    let published = msctl
        .run(&["notice", "send", "maintenance at noon", "--topic", "ops"])
        .await
        .succeeded()
        .stdout;
    assert!(published.starts_with("published #"), "{published}");
    let scheduled = msctl
        .run(&["notice", "send", "later", "--at", "2099-01-01T00:00:00Z"])
        .await
        .succeeded()
        .stdout;
    assert_eq!(scheduled, "scheduled for 2099-01-01T00:00:00.000Z\n");
    msctl
        .run(&["notice", "send", "x", "--at", "tomorrow"])
        .await
        .failed_with("400 at must be an RFC 3339 time");

    // A subscriber of its own, with a token msctl minted.
    let tailer_token = msctl
        .run(&[
            "token",
            "--jwt-secret-file",
            &jwt_file,
            "--sub",
            "tailer",
            "--scope",
            "notice:subscribe",
            "--ttl",
            "10m",
        ])
        .await
        .succeeded()
        .stdout;
    let tailer = msctl.with_token(Some(tailer_token.trim().to_owned()));
    let mut tail = tailer.follow(&["notice", "tail", "--topics", "ops,news"]);
    stack.wait_for_subscribers(&["tailer"]).await;
    let who = msctl.run(&["notice", "who"]).await.succeeded().stdout;
    let row = who
        .lines()
        .find(|line| line.starts_with("tailer "))
        .unwrap_or_else(|| panic!("{who}"));
    assert!(row.ends_with("news,ops"), "{row}");
    msctl
        .run(&["notice", "send", "the deploy starts", "--topic", "ops"])
        .await
        .succeeded();
    let line = tail.line().await;
    assert!(
        line.contains("#ops  from e2e-admin: the deploy starts"),
        "{line}"
    );
    msctl
        .run(&["notice", "send", "psst", "--to", "tailer"])
        .await
        .succeeded();
    let line = tail.line().await;
    assert!(line.contains("to tailer  from e2e-admin: psst"), "{line}");
    let kicked = msctl
        .run(&["notice", "kick", "tailer"])
        .await
        .succeeded()
        .stdout;
    assert_eq!(kicked, "kicked 1 subscription(s) named tailer\n");
    let (code, stderr) = tail.exit().await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr, "msctl: the subscription ended: kicked\n");
    msctl
        .run(&["notice", "kick", "tailer"])
        .await
        .failed_with("404 no subscriber named \"tailer\"");
    checks.pass(
        "notice send/tail/who/kick: a tail sees topic notices and whispers, and ends when kicked",
    );

    // tokens and scopes
    let reader_token = msctl
        .run(&[
            "token",
            "--jwt-secret-file",
            &jwt_file,
            "--sub",
            "reader",
            "--scope",
            "kv:read",
        ])
        .await
        .succeeded()
        .stdout;
    let reader = msctl.with_token(Some(reader_token.trim().to_owned()));
    reader.run(&["kv", "ls"]).await.succeeded();
    reader
        .run(&["kv", "put", "a", "b"])
        .await
        .failed_with("403 this request needs the scope \"kv:write\"");
    reader.run(&["connections"]).await.failed_with("403");
    msctl
        .with_token(None)
        .run(&["topology"])
        .await
        .failed_with("401");
    msctl
        .run(&[
            "token",
            "--jwt-secret-file",
            "/nonexistent",
            "--sub",
            "x",
            "--scope",
            "admin",
        ])
        .await
        .failed_with("/nonexistent");
    msctl
        .run(&[
            "token",
            "--jwt-secret-file",
            &jwt_file,
            "--sub",
            " ",
            "--scope",
            "admin",
        ])
        .await
        .failed_with("--sub must name the caller");
    checks.pass("token mints from the key file; a token's scopes bind msctl; 401/403 explained");

    // connections: figures follow the traffic above.
    let connections = run_until(&msctl, &["--json", "connections"], |output| {
        output.code == Some(0)
            && node(&output.json(), &kv_addr).is_some_and(|node| {
                // The connection state is sampled (every 500 ms): wait for a sample too.
                node["requests"].as_u64() > Some(5) && node["connected"] == true
            })
    })
    .await
    .json();
    let kv = node(&connections, &kv_addr).unwrap();
    assert_eq!(kv["connected"], true);
    assert_eq!(kv["name"], "kv");
    assert_eq!(kv["in_flight"], 0);
    assert_eq!(
        kv["errors"], 0,
        "a 404 or 409 is an answer, not an error: {kv}"
    );
    assert!(connections["http"]["open_connections"].as_u64() >= Some(1));
    let table = msctl.run(&["connections"]).await.succeeded().stdout;
    assert!(table.starts_with("gateway: "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("kv ") && l.contains(&kv_addr) && l.contains("connected")),
        "{table}"
    );
    checks.pass(
        "connections: per node requests, errors and in flight; the gateway's open connections",
    );

    // The per-route history the status page draws, and who may read it.
    let history = stack.get_json("/_/history").await;
    assert_eq!(history["seconds"], 300);
    let put = history["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|route| route["route"] == "PUT/kv")
        .unwrap_or_else(|| panic!("no PUT/kv: {history}"));
    let requests: u64 = put["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .sum();
    // Two puts answered 200, one 409, and the reader's refused with 403 (the route was known):
    // at least those four, more if the watch above wrote.
    assert!(requests >= 4, "{put}");
    assert_eq!(put["errors"].as_array().unwrap().len(), 300);
    assert_eq!(put["p99_ms"].as_array().unwrap().len(), 300);
    let anonymous = reqwest::Client::new();
    for path in ["/_/history", "/_/connections"] {
        let status = anonymous
            .get(stack.url(path))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 401, "{path}");
        let status = anonymous
            .get(stack.url(path))
            .bearer_auth(reader.token.as_deref().unwrap())
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 403, "{path}");
    }
    checks.pass("/_/history: 300 seconds per route counting the puts; both routes need admin");

    // A node that drops and comes back shows both in its history.
    stack.kv[0]
        .process
        .signal(nix::sys::signal::Signal::SIGKILL);
    run_until(&msctl, &["--json", "connections"], |output| {
        node(&output.json(), &kv_addr).is_some_and(|node| node["connected"] == false)
    })
    .await;
    stack.kv[0].process.restart();
    let connections = run_until(&msctl, &["--json", "connections"], |output| {
        node(&output.json(), &kv_addr).is_some_and(|node| node["connected"] == true)
    })
    .await
    .json();
    let history: Vec<bool> = node(&connections, &kv_addr).unwrap()["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|change| change["connected"].as_bool().unwrap())
        .collect();
    // Its first sample may have caught it still connecting: the changes end with these three.
    assert!(history.ends_with(&[true, false, true]), "{history:?}");
    let table = msctl
        .run(&["connections", "--history"])
        .await
        .succeeded()
        .stdout;
    assert_eq!(
        table.lines().filter(|l| l.starts_with(&kv_addr)).count(),
        history.len(),
        "{table}"
    );
    checks.pass("connections --history: when the kv node dropped and when it came back");

    // logs: the contract of GET /_/logs.
    let logs = msctl
        .run(&[
            "--json",
            "logs",
            "--level",
            "warn",
            "--service",
            "kv",
            "--limit",
            "50",
        ])
        .await
        .succeeded()
        .json();
    let lines = logs["lines"].as_array().unwrap();
    assert!(lines.iter().all(|line| line["service"] == "kv"), "{logs}");
    let table = msctl
        .run(&["logs", "--level", "info"])
        .await
        .succeeded()
        .stdout;
    assert!(table.starts_with("TIME"), "{table}");
    msctl
        .run(&["logs", "--level", "loud"])
        .await
        .failed_with("400");
    // Something the gateway logs at warn whatever the stack's log filter: a 5xx. A request
    // sent to a frozen node gets one (its answer never comes), where a killed node's route
    // may already be gone (a 404). Caused first, it is among the recent lines a follower
    // starts with, like `tail -f` (live following itself is the gateway's logs test's).
    stack.kv[0].process.freeze().await;
    let frozen = stack.http.get(stack.url("/kv/x")).send().await.unwrap();
    stack.kv[0].process.thaw();
    assert!(frozen.status().is_server_error(), "{frozen:?}");
    let mut follow = msctl.follow(&[
        "--json",
        "logs",
        "--follow",
        "--level",
        "warn",
        "--service",
        "gateway",
    ]);
    let seen = follow.line().await;
    let line: Value = serde_json::from_str(&seen).expect("--json prints one object per line");
    assert_eq!(line["service"], "gateway", "{line}");
    checks.pass("logs: by level and service, as a table and JSON, and followed");

    // The command line itself.
    let completions = msctl.run(&["completions", "bash"]).await.succeeded().stdout;
    assert!(completions.contains("_msctl()"), "{completions}");
    assert!(completions.contains("complete -F _msctl"), "{completions}");
    for help in [
        &["--help"][..],
        &["kv", "--help"],
        &["notice", "tail", "--help"],
    ] {
        let text = msctl.run(help).await.succeeded().stdout;
        assert!(text.contains("Usage: msctl"), "{text}");
    }
    let usage = msctl.run(&["kv", "frobnicate"]).await;
    assert_eq!(usage.code, Some(2), "{usage:?}");
    assert!(
        usage.stderr.contains("unrecognized subcommand"),
        "{usage:?}"
    );
    Msctl {
        gateway: format!("http://127.0.0.1:{}", e2e::free_port()),
        token: None,
    }
    .run(&["topology"])
    .await
    .failed_with("cannot reach the gateway");
    Msctl {
        gateway: "localhost:8000".into(),
        token: None,
    }
    .run(&["topology"])
    .await
    .failed_with("must be an http:// or https:// URL");
    checks.pass("completions for bash, --help everywhere, usage errors exit 2, an unreachable gateway exits 1");
}
