//! A real `redis-server` (Debian's package) on a free loopback port, without persistence,
//! stopped by PID on drop; `redis-cli` to look at and tamper with what the sidecars share.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, tools, wait_until};

/// A running `redis-server`. Killed on drop.
pub struct Redis {
    pub port: u16,
    password: Option<String>,
    child: Option<Child>,
}

impl Redis {
    /// Starts a server on a free port and waits until it answers.
    pub async fn start() -> Redis {
        Redis::launch(free_port(), None).await
    }

    /// Starts a server that requires `password`.
    pub async fn with_password(password: &str) -> Redis {
        Redis::launch(free_port(), Some(password.to_owned())).await
    }

    async fn launch(port: u16, password: Option<String>) -> Redis {
        let mut r = Redis {
            port,
            password,
            child: None,
        };
        r.start_again().await;
        r
    }

    /// `redis://127.0.0.1:PORT/0` (no password).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts the server again on the same port (empty: no persistence).
    pub async fn start_again(&mut self) {
        let server = tools::require("redis-server", "redis-server");
        let mut cmd = Command::new(server);
        cmd.args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .args(["--port", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(pw) = &self.password {
            cmd.args(["--requirepass", pw]);
        }
        self.child = Some(cmd.spawn().expect("start redis-server"));
        let port = self.port;
        let pw = self.password.clone();
        wait_until(
            Duration::from_secs(10),
            move || {
                let pw = pw.clone();
                async move { cli_at(port, pw.as_deref(), &["PING"]).trim() == "PONG" }
            },
            || "redis-server did not answer PING".into(),
        )
        .await;
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `redis-cli` against this server; its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        cli_at(self.port, self.password.as_deref(), args)
    }
}

fn cli_at(port: u16, password: Option<&str>, args: &[&str]) -> String {
    let cli = tools::require("redis-cli", "redis-tools");
    let mut cmd = Command::new(cli);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if let Some(pw) = password {
        cmd.env("REDISCLI_AUTH", pw);
    }
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
