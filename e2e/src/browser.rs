//! A real headless browser for checking what the gateway's status page shows a person.
//!
//! It starts Debian's `chromium` with the DevTools protocol on a free port, opens one page and
//! evaluates JavaScript in it over the protocol's websocket. That is all the tests need: read the
//! text the page shows, and type into its form as a person would.

use std::{path::Path, process::Stdio, time::Duration};

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio_tungstenite::{tungstenite::Message, MaybeTlsStream, WebSocketStream};

use crate::READY_TIMEOUT;

type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// The chromium binary, if this machine has one.
pub fn chromium() -> Option<&'static str> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|path| Path::new(path).exists())
}

/// The chromium binary for a test that needs one; `None` (the test should skip, having said
/// so) on a machine without it, except under CI, which must have it.
pub fn chromium_for_test() -> Option<&'static str> {
    let found = chromium();
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have chromium for the status page tests"
        );
        eprintln!("SKIP: no chromium on this machine (apt-get install chromium)");
    }
    found
}

/// A headless chromium showing one page. Dropping it kills the browser and its helpers.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    page: Socket,
    next_id: u64,
}

impl Browser {
    /// Starts chromium on `url` and connects to that page.
    pub async fn open(chromium: &str, url: &str) -> anyhow::Result<Browser> {
        let profile = tempfile::tempdir()?;
        let child = Command::new(chromium)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that dropping it takes the renderer processes along.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("starting chromium")?;
        let page = tokio::time::timeout(READY_TIMEOUT, connect_to_page(profile.path(), url))
            .await
            .context("chromium did not open the page in time")??;
        Ok(Browser {
            child,
            _profile: profile,
            page,
            next_id: 0,
        })
    }

    /// Evaluates `expression` in the page and returns its value.
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let params = json!({"expression": expression, "returnByValue": true, "awaitPromise": true});
        let result = self.command("Runtime.evaluate", params).await?;
        if let Some(exception) = result.get("exceptionDetails") {
            bail!("{expression}: {exception}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Writes a PNG of the page as it is shown now to `path` (creating its directory), so a
    /// person can look at what a test saw.
    pub async fn screenshot(&mut self, path: &Path) -> anyhow::Result<()> {
        use base64::Engine;
        let result = self
            .command(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await?;
        let data = result["data"]
            .as_str()
            .context("the screenshot has no data")?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }

    /// Sends one DevTools command to the page and returns its result.
    async fn command(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({"id": id, "method": method, "params": params});
        self.page.send(Message::text(command.to_string())).await?;
        while let Some(message) = self.page.next().await {
            let Message::Text(text) = message? else {
                continue;
            };
            let reply: Value = serde_json::from_str(&text)?;
            if reply["id"] != id {
                continue;
            }
            if let Some(error) = reply.get("error") {
                bail!("{method}: {error}");
            }
            return Ok(reply["result"].clone());
        }
        bail!("the browser closed the DevTools connection")
    }

    /// Waits until `expression` evaluates to `true` in the page.
    pub async fn wait_until(&mut self, expression: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        while self.eval(expression).await? != Value::Bool(true) {
            if tokio::time::Instant::now() > deadline {
                bail!("{expression} never became true");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Waits until the page's visible text contains `needle`; returns that text.
    pub async fn wait_for_text(&mut self, needle: &str) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let text = self.eval("document.body.innerText").await?;
            let text = text.as_str().unwrap_or_default().to_owned();
            if text.contains(needle) {
                return Ok(text);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the page never showed {needle:?}; it shows:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// Finds the DevTools port chromium wrote into its profile, then the page showing `url`, and
/// opens that page's DevTools websocket.
async fn connect_to_page(profile: &Path, url: &str) -> anyhow::Result<Socket> {
    let port_file = profile.join("DevToolsActivePort");
    let port = loop {
        if let Ok(contents) = tokio::fs::read_to_string(&port_file).await {
            if let Some(Ok(port)) = contents.lines().next().map(str::parse::<u16>) {
                break port;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let list_url = format!("http://127.0.0.1:{port}/json/list");
    loop {
        if let Ok(response) = reqwest::get(&list_url).await {
            let targets: Value = response.json().await?;
            let page = targets.as_array().into_iter().flatten().find(|target| {
                target["type"] == "page"
                    && target["url"].as_str().is_some_and(|u| u.starts_with(url))
            });
            if let Some(ws) = page.and_then(|page| page["webSocketDebuggerUrl"].as_str()) {
                let (socket, _) = tokio_tungstenite::connect_async(ws).await?;
                return Ok(socket);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
