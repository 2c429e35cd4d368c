//! `listen: "unix:/path"`: the data plane on a Unix socket (mode 0660), a stale socket file
//! from an earlier run replaced at start, the socket removed at exit — through the real binary,
//! with raw HTTP/1.1 bytes over a Unix stream.

mod support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sidecar_mocks::{MockUpstream, UpstreamConfig};
use support::{binary, free_port, wait_until, Scratch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const BOUND: Duration = Duration::from_secs(20);

/// A sidecar process on a config of the test's; killed on drop.
struct Proc {
    child: Child,
    log: PathBuf,
    admin: String,
}

impl Proc {
    fn start(dir: &Scratch, yaml: &str) -> Proc {
        let admin = format!("127.0.0.1:{}", free_port());
        let config = dir.path("sidecar.yaml");
        std::fs::write(&config, format!("admin_listen: \"{admin}\"\n{yaml}")).unwrap();
        let log = dir.path("sidecar.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary())
            .arg("run")
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .env_remove("RUST_LOG")
            .spawn()
            .expect("start token-sidecar");
        Proc { child, log, admin }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_exit(&mut self) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + BOUND;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -s {name} failed");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange over the socket at `path`: the whole answer as text.
async fn exchange(path: &Path, request: &str) -> std::io::Result<String> {
    let mut s = UnixStream::connect(path).await?;
    s.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(BOUND, (&mut s).take(1 << 20).read_to_end(&mut answer))
        .await
        .map_err(|_| std::io::Error::other("no answer in time"))??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[tokio::test]
async fn a_unix_socket_listener_serves_with_mode_0660_and_is_removed_at_exit() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let dir = Scratch::new("unix-listen");
    let sock = dir.path("sidecar.sock");
    // A socket file left by an earlier run that did not exit cleanly.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(is_socket(&sock));
    std::env::set_var("SIDECAR_UNIX_TEST_TOKEN", "unix-socket-token");
    let yaml = format!(
        "listen: \"unix:{}\"\n\
         providers: {{ main: {{ type: static, token: \"${{env:SIDECAR_UNIX_TEST_TOKEN}}\" }} }}\n\
         upstreams:\n  - {{ name: api, url: \"{}\", provider: main }}\n",
        sock.display(),
        api.url()
    );
    let mut sc = Proc::start(&dir, &yaml);
    let request = "GET /over/unix HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n\r\n";
    let answer = std::sync::Mutex::new(String::new());
    wait_until(
        BOUND,
        || async {
            match exchange(&sock, request).await {
                Ok(a) => {
                    *answer.lock().unwrap() = a;
                    true
                }
                Err(_) => false,
            }
        },
        || format!("the socket never answered\n{}", sc.logs()),
    )
    .await;
    let answer = answer.into_inner().unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{answer}\n{}",
        sc.logs()
    );
    let seen = api.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/over/unix");
    assert_eq!(seen[0].token.as_deref(), Some("unix-socket-token"));

    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert!(is_socket(&sock));
    assert_eq!(mode & 0o777, 0o660, "mode {mode:o}");
    // The admin API stays on TCP.
    let health = reqwest::get(format!("http://{}/healthz", sc.admin))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    sc.signal("TERM");
    let status = sc.wait_exit().await.expect("no exit after SIGTERM");
    assert!(status.success(), "{status}\n{}", sc.logs());
    assert!(
        !sock.exists(),
        "the socket file is still there after exit\n{}",
        sc.logs()
    );
}

/// Something other than a socket at the path is somebody's file: the sidecar refuses to start
/// and leaves it alone.
#[tokio::test]
async fn a_regular_file_at_the_socket_path_is_left_alone() {
    let dir = Scratch::new("unix-listen-file");
    let path = dir.path("not-a-socket");
    std::fs::write(&path, "keep me").unwrap();
    let yaml = format!(
        "listen: \"unix:{}\"\nupstreams: [{{ name: api, url: \"http://127.0.0.1:1\" }}]\n",
        path.display()
    );
    let mut sc = Proc::start(&dir, &yaml);
    let status = sc.wait_exit().await.expect("the sidecar kept running");
    assert!(!status.success());
    assert!(
        sc.logs().contains("something other than a socket"),
        "{}",
        sc.logs()
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
}

/// With h2c on, the listener looks for the HTTP/2 preface (24 bytes) first. A short HTTP/1.0
/// request (18 bytes, then the client waits) is told apart at its first byte and answered at
/// once, not after the head timeout.
#[tokio::test]
async fn a_short_http10_request_is_answered_with_h2c_on() {
    let (api, sc) = support::open_stack("downstream: { header_timeout: 30s }\n").await;
    let mut s = tokio::net::TcpStream::connect(sc.listen).await.unwrap();
    s.write_all(b"GET /a HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    // Well under the 30 s head timeout: the answer does not wait for it.
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("no answer: the request waited for bytes that never come")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
    assert_eq!(api.count(), 1);
}
