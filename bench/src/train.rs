//! `--train`: the workload a profile-guided build (`./dev release`) is optimised for.
//!
//! Run by an instrumented build (`-Cprofile-generate`), it drives `token-sidecar` and
//! `bare-pingora` through what the benchmark measures: `GET` at 1, 16 and 128 connections and a
//! `POST` with a small body, through the sidecar also a round of upstream 401s (refresh and
//! replay), and then stops both with SIGTERM so that each writes its profile on exit. What
//! the training does not reach (errors, the admin API, reloads) is compiled as cold code: it
//! works the same, and is laid out away from the request path.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::load;
use crate::procs;
use crate::scenarios::{start_sidecar_as, World};

/// How long a stopped proxy may take to exit (and write its profile) before it is killed and
/// the training fails.
const EXIT_LIMIT: Duration = Duration::from_secs(30);

/// Trains `sidecar` and `bare` for `secs` seconds per load shape.
pub async fn train(sidecar: &Path, bare: &Path, secs: u64) -> Result<String, String> {
    let w = World::start()?;
    let run = Duration::from_secs(secs);
    let auth = w.static_authorization();

    let bare_addr = procs::free_port()?;
    let mut cmd = Command::new(bare);
    cmd.arg(bare_addr.to_string())
        .arg(w.upstream.addr.to_string())
        .arg(&auth);
    let bare_proc = procs::spawn("bare-pingora", cmd, &w.scratch.path("bare-train.log"), true)?;
    procs::wait_port(bare_addr, bare_proc.pid, Duration::from_secs(10))?;
    // As the benchmark runs it.
    let url = format!("\"http://{}\"", w.upstream.addr);
    let side = start_sidecar_as(sidecar, &w, "train", &url, "", true).await?;

    let mut report = String::new();
    for (name, addr, a) in [
        ("sidecar", side.listen, None),
        ("bare-pingora", bare_addr, Some(auth.as_str())),
    ] {
        let get = Arc::new(load::bench_request(addr, a));
        let post = Arc::new(post_request(addr, a));
        let mut served = 0;
        for (request, conns) in [(&get, 1), (&get, 16), (&get, 128), (&post, 16)] {
            let out = load::closed_loop(addr, request.clone(), conns, run).await;
            progress(&format!("{name} {conns:>3} conns"), &out);
            if out.ok == 0 {
                return Err(format!(
                    "{name}: no request succeeded at {conns} connections ({})",
                    out.first_error.unwrap_or_default()
                ));
            }
            served += out.ok;
        }
        report.push_str(&format!("{name}: {served} requests\n"));
    }
    // The sidecar's replay path: every token revoked, so each request in flight meets a 401,
    // joins the refresh and is replayed. (Once: the refresh that follows a second revocation
    // would wait for the provider's `min_interval`.)
    w.registry.revoke_all();
    let get = Arc::new(load::bench_request(side.listen, None));
    let out = load::closed_loop(side.listen, get, 16, run).await;
    progress("sidecar, tokens revoked", &out);
    if out.ok == 0 {
        return Err("sidecar: no request succeeded after the tokens were revoked".into());
    }
    let stopping = Instant::now();

    for (name, pid) in [("sidecar", side.proc.pid), ("bare-pingora", bare_proc.pid)] {
        if !procs::stop_within(pid, EXIT_LIMIT) {
            return Err(format!(
                "{name} did not exit within {EXIT_LIMIT:?} of SIGTERM; its profile is not written"
            ));
        }
    }
    eprintln!(
        "bench: train: both stopped in {:.1} s",
        stopping.elapsed().as_secs_f64()
    );
    Ok(report)
}

/// One progress line on stderr.
fn progress(what: &str, out: &load::Outcome) {
    eprintln!(
        "bench: train: {what}: {} answered 2xx, {} other, {} errors in {:.1} s",
        out.ok,
        out.status_401 + out.other_status,
        out.errors,
        out.elapsed.as_secs_f64()
    );
}

/// `POST /bench` with a small JSON body.
fn post_request(addr: SocketAddr, authorization: Option<&str>) -> Vec<u8> {
    let body = br#"{"name":"train","items":[1,2,3]}"#;
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let mut r = format!(
        "POST /bench HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: sidecar-bench\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_post_is_one_whole_request_with_its_body() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let bytes = post_request(addr, Some("Bearer x"));
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut headers);
        let httparse::Status::Complete(head) = req.parse(&bytes).unwrap() else {
            panic!("incomplete head");
        };
        assert_eq!(req.method, Some("POST"));
        let length: usize = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
            .unwrap();
        assert_eq!(bytes.len() - head, length);
        assert!(req.headers.iter().any(|h| h.name == "Authorization"));
    }
}
