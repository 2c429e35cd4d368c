//! gRPC through the sidecar: a real gRPC client and server (Python `grpcio`, generic handlers
//! over raw bytes, so no protoc) speak HTTP/2 with prior knowledge (h2c) to the sidecar's
//! `listen`, and the sidecar speaks h2c to the server (`protocol: h2c`). The call arrives with
//! the token as `authorization` metadata; a trailers-only UNAUTHENTICATED answer (`grpc-status:
//! 16` in the header) counts as an expired token, and a replayable call is replayed with a
//! fresh one.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sidecar_mocks::{IdpConfig, MockIdp};
use support::{free_port, tools, wait_until, Scratch, Sidecar};

const BOUND: Duration = Duration::from_secs(30);

/// A server with one unary method, `/test.Echo/Call`, answering `pong:` + the request. Every
/// call's `authorization` goes to the log file, one line each. With `refuse_first`, the first
/// token it sees is refused with UNAUTHENTICATED (before any message: a trailers-only answer),
/// then and whenever it comes again.
const SERVER: &str = r#"
import sys
from concurrent import futures
import grpc

port, log_path, refuse_first = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
log = open(log_path, "a", buffering=1)
refused = set()

def call(request, context):
    auth = dict(context.invocation_metadata()).get("authorization", "")
    log.write("call " + auth + "\n")
    if refuse_first and not refused:
        refused.add(auth)
    if auth in refused:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "token expired")
    return b"pong:" + request

handler = grpc.method_handlers_generic_handler(
    "test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("127.0.0.1:%d" % port)
server.start()
log.write("ready\n")
server.wait_for_termination()
"#;

/// One unary call to `target` (h2c); prints the answer, or the status code and details.
const CLIENT: &str = r#"
import sys
import grpc

target, key = sys.argv[1], sys.argv[2]
metadata = [("idempotency-key", key)] if key else []
with grpc.insecure_channel(target) as channel:
    call = channel.unary_unary("/test.Echo/Call")
    try:
        print("ok " + call(b"ping", metadata=metadata, timeout=20).decode())
    except grpc.RpcError as e:
        print("error %s %s" % (e.code().name, e.details()))
"#;

/// The Python gRPC server; killed on drop.
struct GrpcServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl GrpcServer {
    async fn start(dir: &Scratch, refuse_first: bool) -> GrpcServer {
        let script = dir.path("server.py");
        std::fs::write(&script, SERVER).unwrap();
        let log = dir.path("server.log");
        let port = free_port();
        let child = Command::new(tools::python())
            .arg(&script)
            .arg(port.to_string())
            .arg(&log)
            .arg(if refuse_first { "1" } else { "0" })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the Python gRPC server");
        let server = GrpcServer { child, port, log };
        wait_until(
            BOUND,
            || async { server.lines().iter().any(|l| l == "ready") },
            || "the gRPC server never got ready".into(),
        )
        .await;
        server
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The `authorization` of every call, in order.
    fn calls(&self) -> Vec<String> {
        self.lines()
            .iter()
            .filter_map(|l| l.strip_prefix("call ").map(str::to_string))
            .collect()
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the client against `target`; its one line of output.
fn call(dir: &Path, target: &str, idempotency_key: &str) -> String {
    let script = dir.join("client.py");
    std::fs::write(&script, CLIENT).unwrap();
    let out = Command::new(tools::python())
        .arg(&script)
        .arg(target)
        .arg(idempotency_key)
        .stdin(Stdio::null())
        .output()
        .expect("run the Python gRPC client");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn setup(refuse_first: bool) -> (MockIdp, GrpcServer, Sidecar, Scratch) {
    let idp = MockIdp::start(IdpConfig {
        ttl: Duration::from_secs(3600),
        ..IdpConfig::default()
    })
    .await;
    let dir = Scratch::new("grpc");
    let server = GrpcServer::start(&dir, refuse_first).await;
    let yaml = format!(
        "providers:\n  main: {{ type: oauth2_client_credentials, token_url: \"{}\", client_id: demo-client, client_secret: demo-secret }}\n\
         upstreams:\n  - {{ name: grpc, url: \"http://127.0.0.1:{}\", provider: main, protocol: h2c }}\n",
        idp.token_url(),
        server.port
    );
    let sc = Sidecar::start_with_first_token(&yaml).await;
    (idp, server, sc, dir)
}

/// A unary call over h2c through the sidecar reaches the server with the token as
/// `authorization` metadata, and its answer (status in trailers) comes back.
#[tokio::test]
async fn a_grpc_call_gets_the_token_as_metadata() {
    let (idp, server, sc, dir) = setup(false).await;
    let target = sc.listen.to_string();
    let dir_path = dir.0.clone();
    let out = tokio::task::spawn_blocking(move || call(&dir_path, &target, ""))
        .await
        .unwrap();
    assert_eq!(out, "ok pong:ping", "{}", sc.logs());
    let calls = server.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(
        calls[0].starts_with("Bearer ") && calls[0].len() > "Bearer ".len() + 8,
        "{calls:?}"
    );
    assert_eq!(idp.calls(), 1);
}

/// The server refuses the first token with a trailers-only UNAUTHENTICATED: the sidecar takes
/// that as an expired token, gets a fresh one and replays the call (it carries an idempotency
/// key); the client sees only the success.
#[tokio::test]
async fn a_grpc_unauthenticated_answer_is_replayed_with_a_fresh_token() {
    let (idp, server, sc, dir) = setup(true).await;
    let target = sc.listen.to_string();
    let dir_path = dir.0.clone();
    let out = tokio::task::spawn_blocking(move || call(&dir_path, &target, "call-1"))
        .await
        .unwrap();
    assert_eq!(out, "ok pong:ping", "{}", sc.logs());
    let calls = server.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_ne!(calls[0], calls[1], "the replay carried the refused token");
    assert!(calls[1].starts_with("Bearer "), "{calls:?}");
    assert_eq!(idp.calls(), 2, "one refresh for the refused token");
    let metrics = support::metrics::scrape(&sc).await;
    assert_eq!(
        metrics.sum("sidecar_replays_total", &[("upstream", "grpc")]),
        1.0
    );
}

/// Without an idempotency key a call is not replayable: the client gets the server's
/// UNAUTHENTICATED unchanged, and the server saw the call once.
#[tokio::test]
async fn a_non_replayable_grpc_call_gets_the_refusal_unchanged() {
    let (_idp, server, sc, dir) = setup(true).await;
    let target = sc.listen.to_string();
    let dir_path = dir.0.clone();
    let out = tokio::task::spawn_blocking(move || call(&dir_path, &target, ""))
        .await
        .unwrap();
    assert_eq!(out, "error UNAUTHENTICATED token expired", "{}", sc.logs());
    assert_eq!(server.calls().len(), 1);
}
