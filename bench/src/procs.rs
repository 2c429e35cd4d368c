//! Child processes (nginx, the bare Pingora proxy, the sidecar): every one is registered here and
//! killed at exit, on panic, on Ctrl-C and when the watchdog fires.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

struct Managed {
    name: String,
    child: Child,
    /// nginx: a master with a worker. SIGTERM lets the master stop its worker; SIGKILL would
    /// orphan it.
    graceful: bool,
}

static CHILDREN: Mutex<Vec<Managed>> = Mutex::new(Vec::new());

/// A registered child; dropping the handle stops it.
pub struct Proc {
    pub pid: u32,
}

impl Drop for Proc {
    fn drop(&mut self) {
        stop(self.pid);
    }
}

/// Spawns `cmd` (stdout/stderr to `log`) and registers it for cleanup.
pub fn spawn(name: &str, mut cmd: Command, log: &Path, graceful: bool) -> Result<Proc, String> {
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let pid = child.id();
    lock().push(Managed {
        name: name.to_string(),
        child,
        graceful,
    });
    Ok(Proc { pid })
}

fn lock() -> std::sync::MutexGuard<'static, Vec<Managed>> {
    CHILDREN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether the child is still running (false once it exited or was stopped).
pub fn alive(pid: u32) -> bool {
    let mut list = lock();
    match list.iter_mut().find(|m| m.child.id() == pid) {
        Some(m) => matches!(m.child.try_wait(), Ok(None)),
        None => false,
    }
}

/// How long a child may take to stop before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(2);

/// Stops one child (bounded: at most ~2 s).
pub fn stop(pid: u32) {
    stop_within(pid, STOP_LIMIT);
}

/// Stops one child, giving a graceful one (SIGTERM) `limit` to exit; false when it was still
/// running at the limit and was killed, or is not registered.
pub fn stop_within(pid: u32, limit: Duration) -> bool {
    let taken = {
        let mut list = lock();
        list.iter()
            .position(|m| m.child.id() == pid)
            .map(|i| list.swap_remove(i))
    };
    match taken {
        Some(m) => terminate(vec![m], limit) == 0,
        None => false,
    }
}

/// Stops every registered child (bounded: at most ~2 s).
pub fn stop_all() {
    let all: Vec<Managed> = std::mem::take(&mut *lock());
    terminate(all, STOP_LIMIT);
}

/// Stops every child and removes the scratch directory: for exits that skip destructors
/// (signals, the watchdog).
pub fn abandon() {
    stop_all();
    let _ = std::fs::remove_dir_all(scratch_dir());
}

fn scratch_dir() -> PathBuf {
    std::env::temp_dir().join(format!("sidecar-bench-{}", std::process::id()))
}

/// Stops `list`, killing what is still running after `limit`; how many had to be killed.
fn terminate(mut list: Vec<Managed>, limit: Duration) -> usize {
    // Descendants (nginx's worker) are collected before the master goes away.
    let mut orphans = Vec::new();
    for m in &mut list {
        orphans.extend(children_of(m.child.id()));
        if m.graceful {
            signal(m.child.id(), "-TERM");
        } else {
            let _ = m.child.kill();
        }
    }
    let deadline = Instant::now() + limit;
    let mut killed = 0;
    for m in &mut list {
        while Instant::now() < deadline && matches!(m.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(m.child.try_wait(), Ok(None)) {
            eprintln!("bench: {} did not stop in time; killing it", m.name);
            let _ = m.child.kill();
            killed += 1;
        }
        let _ = m.child.wait();
    }
    for pid in orphans {
        if Path::new(&format!("/proc/{pid}")).exists() {
            signal(pid, "-KILL");
        }
    }
    killed
}

/// `kill {sig} {pid}`, errors ignored.
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Direct children of `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// Every descendant of `pid` and `pid` itself.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() && out.len() < 64 {
        let kids = children_of(out[i]);
        out.extend(kids);
        i += 1;
    }
    out
}

/// CPU time used so far by `pid` and its descendants, all threads, in nanoseconds (from
/// /proc/PID/task/TID/schedstat).
pub fn cpu_ns(pid: u32) -> u64 {
    tree(pid)
        .iter()
        .map(|p| {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
                return 0;
            };
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// Resident memory of a process in KiB (VmRSS from /proc/PID/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Waits (bounded) until `addr` accepts TCP connections and the process is still alive.
pub fn wait_port(addr: SocketAddr, pid: u32, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if !alive(pid) {
            return Err(format!("process {pid} exited before listening on {addr}"));
        }
        if Instant::now() >= deadline {
            return Err(format!("nothing listens on {addr} after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free loopback port for a child to bind (each goes out once per run).
pub fn free_port() -> Result<SocketAddr, String> {
    sidecar_mocks::free_port().map_err(|e| format!("no free loopback port: {e}"))
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Result<Scratch, String> {
        let dir = scratch_dir();
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Scratch(dir))
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
