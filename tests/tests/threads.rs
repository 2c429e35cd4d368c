//! `threads:`: how many worker threads serve the proxy, through the real sidecar binary.

mod support;

use std::time::Duration;

use support::{open_stack, wait_until};

/// Pingora names a service's worker threads after the service ("token-sidecar proxy"); Linux
/// keeps the first 15 bytes of a thread name.
fn proxy_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .filter(|name| name.starts_with("token-sidecar p"))
                .count()
        })
        .unwrap_or(0)
}

async fn serves(sc: &support::Sidecar, n: usize) {
    let client = reqwest::Client::new();
    for _ in 0..n {
        let r = client.get(sc.url("/x")).send().await.expect("request");
        assert_eq!(r.status(), 200);
    }
}

#[tokio::test]
async fn threads_sets_the_proxy_worker_threads_and_defaults_to_one() {
    for (extra, want) in [("", 1), ("threads: 2\n", 2)] {
        let (_api, sc) = open_stack(extra).await;
        let pid = sc.pid();
        wait_until(
            Duration::from_secs(10),
            || async move { proxy_threads(pid) == want },
            || {
                format!(
                    "{extra:?}: {} proxy threads, want {want}",
                    proxy_threads(pid)
                )
            },
        )
        .await;
        serves(&sc, 20).await;
        assert_eq!(proxy_threads(pid), want, "{extra:?}");
    }
}

#[tokio::test]
async fn threads_auto_takes_one_per_core() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (_api, sc) = open_stack("threads: auto\n").await;
    let pid = sc.pid();
    wait_until(
        Duration::from_secs(10),
        || async move { proxy_threads(pid) == cores },
        || format!("{} proxy threads, want {cores}", proxy_threads(pid)),
    )
    .await;
    serves(&sc, 10).await;
}

#[tokio::test]
async fn a_read_buffer_serves_like_none() {
    for extra in [
        "downstream: { read_buffer: 0 }\n",
        "downstream: { read_buffer: 64KiB }\n",
    ] {
        let (_api, sc) = open_stack(extra).await;
        serves(&sc, 10).await;
    }
}
