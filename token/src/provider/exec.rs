//! `exec`: runs a command (no shell) and reads a token from its standard output: a Kubernetes
//! `ExecCredential`, `{token, expires_in|expires_at}` JSON, or a bare token line. Standard error
//! is logged at info and its last line names a failure, both without the `env:` values;
//! standard output never is logged.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use sidecar_config::Secret;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::lifetime::{seconds, until};
use super::redact::Redactor;
use super::{Fetched, Held, Provider, ProviderError};

/// Output beyond this is not a token.
const MAX_OUTPUT: u64 = 1 << 20;

pub(super) struct Exec {
    command: Vec<String>,
    timeout: Duration,
    env: BTreeMap<String, Secret>,
    /// The `env:` values, kept out of what the command's standard error puts in logs and errors.
    redactor: Redactor,
}

impl Exec {
    pub(super) fn new(
        command: Vec<String>,
        timeout: Duration,
        env: BTreeMap<String, Secret>,
    ) -> Exec {
        let mut redactor = Redactor::default();
        for v in env.values() {
            redactor.secret(v.expose());
        }
        Exec {
            command,
            timeout,
            env,
            redactor,
        }
    }

    async fn run(&self) -> Result<Fetched, ProviderError> {
        let program = &self.command[0];
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&self.command[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v.expose());
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| ProviderError::Setup(format!("cannot run {program}: {e}")))?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let work = async {
            // The first stream over the limit ends both reads at once: the command is not
            // waited for (it would block writing to a pipe nobody reads) but killed on drop.
            let (out, err) = tokio::try_join!(
                read_capped(stdout, "standard output"),
                read_capped(stderr, "standard error")
            )?;
            let status = child.wait().await;
            Ok::<_, &'static str>((status, out, err))
        };
        let (status, out, err) = match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(done)) => done,
            Ok(Err(what)) => {
                return Err(ProviderError::Malformed(format!(
                    "{program} wrote more than 1 MiB to {what}; stopped it"
                )))
            }
            // Dropping the future drops the child, which kills it (kill_on_drop).
            Err(_) => {
                return Err(ProviderError::Network(format!(
                    "{program} did not finish within {}",
                    humantime::format_duration(self.timeout)
                )))
            }
        };
        let err = String::from_utf8_lossy(&err);
        let last_line = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        let status = status.map_err(|e| ProviderError::Setup(format!("{program}: {e}")))?;
        if !err.trim().is_empty() {
            // Many credential helpers report progress on stderr: INFO, not WARN (a failure is
            // logged with its last line by the token source).
            tracing::info!(command = %program, stderr = %self.redactor.clean(err.trim()), "token command wrote to stderr");
        }
        if !status.success() {
            let code = status
                .code()
                .map_or_else(|| "a signal".to_string(), |c| c.to_string());
            let detail = if last_line.is_empty() {
                String::new()
            } else {
                format!(": {}", self.redactor.clean(last_line.trim()))
            };
            return Err(ProviderError::Rejected {
                status: 0,
                message: format!("{program} exited with {code}{detail}"),
            });
        }
        parse_output(&out)
    }
}

/// Reads a pipe to its end, at most [`MAX_OUTPUT`] bytes; `Err(what)` past that. A read error
/// ends the output where it happened.
async fn read_capped(
    pipe: Option<impl AsyncRead + Unpin>,
    what: &'static str,
) -> Result<Vec<u8>, &'static str> {
    let mut buf = Vec::new();
    if let Some(p) = pipe {
        let _ = p.take(MAX_OUTPUT + 1).read_to_end(&mut buf).await;
    }
    if buf.len() as u64 > MAX_OUTPUT {
        return Err(what);
    }
    Ok(buf)
}

impl Provider for Exec {
    fn fetch<'a>(&'a self, _held: &'a Held) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        Box::pin(self.run())
    }
}

/// Reads a token from a command's output.
pub(super) fn parse_output(out: &[u8]) -> Result<Fetched, ProviderError> {
    let text = std::str::from_utf8(out)
        .map_err(|_| ProviderError::Malformed("command output is not UTF-8".into()))?
        .trim();
    if text.starts_with('{') {
        let json: serde_json::Value = serde_json::from_str(text)
            .map_err(|_| ProviderError::Malformed("command output is not valid JSON".into()))?;
        // Kubernetes client.authentication.k8s.io ExecCredential.
        if let Some(status) = json.get("status").filter(|_| json.get("kind").is_some()) {
            let token = status
                .get("token")
                .and_then(|v| v.as_str())
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    ProviderError::Malformed("ExecCredential has no status.token".into())
                })?;
            let expires_in = match status.get("expirationTimestamp") {
                Some(v) => until(v, "status.expirationTimestamp")?,
                None => None,
            };
            return Ok(Fetched::token(token.to_string(), expires_in));
        }
        let token = json
            .get("token")
            .or_else(|| json.get("access_token"))
            .and_then(|v| v.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ProviderError::Malformed("command JSON has no token".into()))?;
        let mut expires_in = match json.get("expires_in") {
            Some(v) => seconds(v, "expires_in")?,
            None => None,
        };
        if expires_in.is_none() {
            if let Some(v) = json.get("expires_at") {
                expires_in = until(v, "expires_at")?;
            }
        }
        return Ok(Fetched::token(token.to_string(), expires_in));
    }
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return Err(ProviderError::Malformed("command printed no token".into()));
    }
    Ok(Fetched::token(line.to_string(), None))
}
