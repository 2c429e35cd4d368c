//! Runs the real `token-sidecar` binary on ephemeral loopback ports for integration tests.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sidecar_mocks::{MockUpstream, UpstreamConfig};

pub mod logs;
pub mod metrics;
pub mod providers;
pub mod redis;
pub mod tools;

/// The harness writes the sidecar's log next to its config, and the watcher waits for 100 ms of
/// quiet in that directory before it reloads (see
/// `a_reload_is_seen_while_the_config_directory_is_busy`): tests that send traffic while they
/// wait for a reload keep access lines out of that file.
pub const QUIET: &str = "log: { access_log: false }\n";

/// A free loopback port (each goes out once per test process; see [`sidecar_mocks::free_port`]).
pub fn free_port() -> u16 {
    sidecar_mocks::free_port()
        .expect("no free loopback port")
        .port()
}

/// A private scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let n: u64 = rand::random();
        let dir =
            std::env::temp_dir().join(format!("sidecar-test-{tag}-{}-{n:x}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running sidecar process. Killed on drop.
pub struct Sidecar {
    child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub scratch: Scratch,
    config: PathBuf,
    log: PathBuf,
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_token-sidecar"))
}

impl Sidecar {
    /// Starts the sidecar with `yaml` (without `listen`/`admin_listen`: free ports are added) and
    /// waits until its admin port answers `/healthz`.
    pub async fn start(yaml: &str) -> Sidecar {
        Sidecar::start_with_env(yaml, &[]).await
    }

    /// Starts a sidecar and waits until its first provider holds its first token, so that a
    /// test counts identity-provider calls from a known point.
    pub async fn start_with_first_token(yaml: &str) -> Sidecar {
        let sc = Sidecar::start(yaml).await;
        sc.wait_status(Duration::from_secs(10), |v| {
            v["providers"][0]["generation"] == 1
        })
        .await;
        sc
    }

    pub async fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Sidecar {
        let scratch = Scratch::new("sidecar");
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = scratch.path("sidecar.yaml");
        let text = format!("listen: \"{listen}\"\nadmin_listen: \"{admin}\"\n{yaml}");
        std::fs::write(&config, text).unwrap();
        Sidecar::launch(scratch, config, listen, admin, env).await
    }

    /// Starts the sidecar on a config file the caller laid out, which names `listen` and
    /// `admin_listen` itself; the log goes to a scratch directory of its own.
    pub async fn start_at(config: &Path, listen: SocketAddr, admin: SocketAddr) -> Sidecar {
        let scratch = Scratch::new("sidecar");
        Sidecar::launch(scratch, config.to_path_buf(), listen, admin, &[]).await
    }

    async fn launch(
        scratch: Scratch,
        config: PathBuf,
        listen: SocketAddr,
        admin: SocketAddr,
        env: &[(&str, &str)],
    ) -> Sidecar {
        let log = scratch.path("sidecar.log");
        let child = spawn(&config, &log, env);
        let mut s = Sidecar {
            child,
            listen,
            admin,
            scratch,
            config,
            log,
        };
        s.wait_healthy().await;
        s
    }

    async fn wait_healthy(&mut self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sidecar exited early with {status}:\n{}", self.logs());
            }
            if let Ok(r) = client.get(self.admin_url("/healthz")).send().await {
                // Both listeners: Pingora starts its services independently.
                if r.status() == 200 && tokio::net::TcpStream::connect(self.listen).await.is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "sidecar not healthy in 20 s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// `GET` on the admin port; the body as text.
    pub async fn admin_text(&self, path: &str) -> String {
        reqwest::get(self.admin_url(path))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `POST` without a body on the admin port (`/v1/token/refresh?...`, `/v1/reload`).
    pub async fn admin_post(&self, path: &str) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.admin_url(path))
            .send()
            .await
            .unwrap()
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the log holds every one of `needles` on one line, and returns it.
    /// Access lines are written after the client has its answer, so a test reads them this way.
    pub async fn wait_log_line(&self, needles: &[&str]) -> String {
        let mut found = String::new();
        wait_until(
            Duration::from_secs(10),
            || {
                let line = self
                    .logs()
                    .lines()
                    .find(|l| needles.iter().all(|n| l.contains(n)))
                    .map(str::to_owned);
                let hit = line.is_some();
                if let Some(l) = line {
                    found = l;
                }
                async move { hit }
            },
            || format!("no log line with {needles:?}:\n{}", self.logs()),
        )
        .await;
        found
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `HUP`, `INT`, `KILL`).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -s {name} failed");
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls `/v1/token/status` until `pred` holds for the JSON, up to `limit`.
    pub async fn wait_status(
        &self,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + limit;
        loop {
            let v: serde_json::Value = client
                .get(self.admin_url("/v1/token/status"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "status never matched: {v}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An open mock upstream and a sidecar whose one upstream, `api`, takes every path to it; `extra`
/// is more top-level YAML.
pub async fn open_stack(extra: &str) -> (MockUpstream, Sidecar) {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let yaml = format!(
        "upstreams:\n  - {{ name: api, url: \"{}\" }}\n{extra}",
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    (api, sc)
}

/// `GET url`; the status code.
pub async fn get_status(client: &reqwest::Client, url: String) -> u16 {
    client.get(url).send().await.unwrap().status().as_u16()
}

/// Writes `text` next to `path` and renames it over `path`, the way many editors save and
/// Kubernetes and vault agents replace files.
pub fn replace_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Rewrites the sidecar's config with `yaml` (its listen addresses are kept). `rename`: write a
/// temp file and rename it over the config; otherwise write the file in place.
pub fn rewrite(sc: &Sidecar, yaml: &str, rename: bool) {
    let text = format!(
        "listen: \"{}\"\nadmin_listen: \"{}\"\n{yaml}",
        sc.listen, sc.admin
    );
    if rename {
        replace_atomically(sc.config_path(), &text);
    } else {
        std::fs::write(sc.config_path(), text).unwrap();
    }
}

/// Polls `check` every 20 ms until it holds; panics with `failure()` once `limit` has passed.
pub async fn wait_until<F, Fut>(limit: Duration, mut check: F, failure: impl FnOnce() -> String)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{}", failure());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spawn(config: &Path, log: &Path, env: &[(&str, &str)]) -> Child {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    let mut cmd = Command::new(binary());
    cmd.arg("run")
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    cmd.env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start token-sidecar")
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `token-sidecar` with `args` to completion; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(binary());
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run token-sidecar");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
