//! External tools: wrk (load generator), nginx and HAProxy (the peer proxies), installed from
//! Debian with apt-get when missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::load::Percentiles;
use crate::procs::{self, Proc, Scratch};

/// The first of `candidates` that exists as an executable file.
fn find(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.is_file())
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Installs Debian packages (bounded by the apt timeouts; output kept quiet).
fn apt_install(packages: &[&str]) -> Result<(), String> {
    eprintln!("bench: installing {} with apt-get", packages.join(" "));
    let update = Command::new("apt-get")
        .args(["update", "-qq"])
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("apt-get: {e}"))?;
    if !update.success() {
        return Err("apt-get update failed".into());
    }
    let st = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("apt-get: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("apt-get install {} failed", packages.join(" ")))
    }
}

/// wrk, installed if missing; `None` if it cannot be had (the in-repo generator is used then).
pub fn wrk() -> Option<PathBuf> {
    if let Some(p) = on_path("wrk") {
        return Some(p);
    }
    if let Err(e) = apt_install(&["wrk"]) {
        eprintln!("bench: {e}; using the in-repo load generator");
    }
    on_path("wrk")
}

/// Debian's `redis-server` (scenario 6). Not installed here: `tests/tools/install` installs it
/// with the other real components (tests/tools/apt.txt); missing, the scenario fails naming it.
pub fn redis_server() -> Result<PathBuf, String> {
    find(&["/usr/bin/redis-server"])
        .or_else(|| on_path("redis-server"))
        .ok_or_else(|| {
            "redis-server is missing: install Debian's `redis-server` package \
             (`tests/tools/install` does)"
                .into()
        })
}

/// nginx, installed (nginx-light, else nginx) if missing.
pub fn nginx() -> Result<PathBuf, String> {
    let locate = || find(&["/usr/sbin/nginx", "/usr/bin/nginx"]).or_else(|| on_path("nginx"));
    if let Some(p) = locate() {
        return Ok(p);
    }
    if apt_install(&["nginx-light"]).is_err() {
        apt_install(&["nginx"])?;
    }
    locate().ok_or_else(|| "nginx is not installed and could not be installed".into())
}

/// The upstream a peer proxy (nginx, HAProxy) forwards to, and how many workers it runs.
pub struct PeerUpstream {
    /// Names the peer's files in the scratch directory (several lineups may run in one run).
    pub tag: String,
    pub addr: SocketAddr,
    /// `Some(CA file)`: the upstream speaks TLS and the peer verifies it against this CA.
    pub ca_file: Option<PathBuf>,
    /// nginx `worker_processes`, HAProxy `nbthread`.
    pub workers: usize,
}

/// Starts nginx as a plain reverse proxy with a static `Authorization` header: `up.workers`
/// workers, a keep-alive upstream pool, no access log, config and temp files in `scratch`.
pub fn start_nginx(
    binary: &Path,
    scratch: &Scratch,
    listen: SocketAddr,
    up: &PeerUpstream,
    authorization: &str,
    worker_connections: usize,
) -> Result<Proc, String> {
    let dir = scratch.path(&format!("nginx-{}", up.tag));
    let upstream = up.addr;
    let workers = up.workers;
    // Over TLS: verify the upstream's certificate against the test CA, with the name it was
    // issued for, and reuse sessions on the kept-alive connections.
    let (scheme, tls) = match &up.ca_file {
        Some(ca) => (
            "https",
            format!(
                "proxy_ssl_verify on;\n            proxy_ssl_trusted_certificate {};\n            \
                 proxy_ssl_name {};\n            proxy_ssl_server_name on;\n            \
                 proxy_ssl_session_reuse on;",
                ca.display(),
                crate::upstream::TLS_NAME
            ),
        ),
        None => ("http", String::new()),
    };
    for sub in ["", "logs", "tmp"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("nginx dir: {e}"))?;
    }
    let d = dir.display();
    let conf = format!(
        r#"worker_processes {workers};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
worker_rlimit_nofile {rlimit};
events {{
    worker_connections {worker_connections};
}}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    upstream bench_upstream {{
        server {upstream};
        keepalive {pool};
    }}
    server {{
        listen {listen} backlog=4096;
        location / {{
            proxy_pass {scheme}://bench_upstream;
            {tls}
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "{authorization}";
        }}
    }}
}}
"#,
        rlimit = worker_connections * 2 + 64,
        // Idle upstream connections kept, as many as the Pingora proxies keep.
        pool = token_sidecar::cli::UPSTREAM_POOL,
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).map_err(|e| format!("nginx.conf: {e}"))?;
    let mut cmd = Command::new(binary);
    cmd.arg("-p").arg(&dir).arg("-c").arg(&path);
    let proc = procs::spawn("nginx", cmd, &dir.join("logs/stdout.log"), true)?;
    procs::wait_port(listen, proc.pid, Duration::from_secs(10)).map_err(|e| {
        let log = std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default();
        format!("nginx: {e}\n{log}")
    })?;
    Ok(proc)
}

/// What one wrk run reported.
#[derive(Clone, Copy, Debug, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub seconds: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
    pub latency: Percentiles,
}

const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d status=%d sockerr=%d p50=%.1f p90=%.1f p99=%.1f p999=%.1f\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
"#;

/// Runs `wrk -t1` against `addr` (bounded: killed 15 s after its duration).
pub async fn run_wrk(
    wrk: &Path,
    scratch: &Scratch,
    addr: SocketAddr,
    authorization: Option<&str>,
    conns: usize,
    duration: Duration,
) -> Result<WrkResult, String> {
    let script = scratch.path("report.lua");
    if !script.exists() {
        std::fs::write(&script, WRK_SCRIPT).map_err(|e| format!("wrk script: {e}"))?;
    }
    let mut cmd = tokio::process::Command::new(wrk);
    cmd.arg("-t1")
        .arg(format!("-c{conns}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--timeout")
        .arg("5s")
        .arg("-s")
        .arg(&script);
    if let Some(a) = authorization {
        cmd.arg("-H").arg(format!("Authorization: {a}"));
    }
    cmd.arg(format!("http://{addr}/bench"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| format!("wrk: {e}"))?;
    let out = tokio::time::timeout(duration + Duration::from_secs(15), child.wait_with_output())
        .await
        .map_err(|_| "wrk did not finish in time".to_string())?
        .map_err(|e| format!("wrk: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("BENCH "))
        .ok_or_else(|| {
            format!(
                "wrk printed no result: {}{}",
                stdout,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let get = |key: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok(WrkResult {
        requests: get("requests") as u64,
        seconds: get("duration_us") / 1e6,
        non_2xx: get("status") as u64,
        socket_errors: get("sockerr") as u64,
        latency: Percentiles {
            p50: get("p50"),
            p90: get("p90"),
            p99: get("p99"),
            p999: get("p999"),
        },
    })
}

/// HAProxy (Debian's), installed if missing.
pub fn haproxy() -> Result<PathBuf, String> {
    let locate = || find(&["/usr/sbin/haproxy", "/usr/bin/haproxy"]).or_else(|| on_path("haproxy"));
    if let Some(p) = locate() {
        return Ok(p);
    }
    apt_install(&["haproxy"])?;
    locate().ok_or_else(|| "haproxy is not installed and could not be installed".into())
}

/// The HAProxy configuration of a peer: `nbthread` = `up.workers`, a static `Authorization`
/// header, idle server connections shared between clients (`http-reuse always`), no logs; over
/// TLS it verifies the upstream's certificate against the test CA and its name.
pub fn haproxy_config(
    listen: SocketAddr,
    up: &PeerUpstream,
    authorization: &str,
    maxconn: usize,
) -> String {
    let server_tls = match &up.ca_file {
        Some(ca) => format!(
            " ssl verify required ca-file {} sni str({name}) verifyhost {name}",
            ca.display(),
            name = crate::upstream::TLS_NAME
        ),
        None => String::new(),
    };
    format!(
        r#"global
    nbthread {threads}
    maxconn {maxconn}

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    http-reuse always

frontend bench
    bind {listen}
    default_backend upstream

backend upstream
    http-request set-header Authorization "{authorization}"
    server up {upstream}{server_tls} pool-max-conn {pool}
"#,
        threads = up.workers,
        upstream = up.addr,
        pool = token_sidecar::cli::UPSTREAM_POOL,
    )
}

/// Starts HAProxy in the foreground (`-db`) with [`haproxy_config`].
pub fn start_haproxy(
    binary: &Path,
    scratch: &Scratch,
    listen: SocketAddr,
    up: &PeerUpstream,
    authorization: &str,
    maxconn: usize,
) -> Result<Proc, String> {
    let dir = scratch.path(&format!("haproxy-{}", up.tag));
    std::fs::create_dir_all(&dir).map_err(|e| format!("haproxy dir: {e}"))?;
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, haproxy_config(listen, up, authorization, maxconn))
        .map_err(|e| format!("haproxy.cfg: {e}"))?;
    let log = dir.join("haproxy.log");
    let mut cmd = Command::new(binary);
    cmd.arg("-db").arg("-f").arg(&path);
    let proc = procs::spawn("haproxy", cmd, &log, true)?;
    procs::wait_port(listen, proc.pid, Duration::from_secs(10)).map_err(|e| {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        format!("haproxy: {e}\n{text}")
    })?;
    Ok(proc)
}
