//! Hostile and odd configs (issue 11) through the real binary: what a reload must refuse while the
//! running config keeps serving, reads that must be bounded, and what `check` must never print.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sidecar_mocks::{MockUpstream, UpstreamConfig};
use support::metrics::{reloads, wait_reloads_at_least};
use support::{run_cli, wait_until, Scratch, Sidecar, QUIET};

/// The whole config file, with the sidecar's own listen addresses.
fn full_text(sc: &Sidecar, yaml: &str) -> String {
    format!(
        "listen: \"{}\"\nadmin_listen: \"{}\"\n{yaml}",
        sc.listen, sc.admin
    )
}

fn routes(api: &MockUpstream) -> String {
    format!(
        "upstreams:\n  - {{ name: api, url: \"{}\", provider: main }}\n",
        api.url()
    )
}

fn static_provider(token: &str) -> String {
    format!("providers:\n  main: {{ type: static, token: \"{token}\" }}\n")
}

async fn get(client: &reqwest::Client, url: String) -> u16 {
    client.get(url).send().await.unwrap().status().as_u16()
}

/// The `Authorization` the upstream saw last.
fn last_token(api: &MockUpstream) -> String {
    api.requests()
        .last()
        .and_then(|r| r.header("authorization").map(str::to_string))
        .unwrap_or_default()
}

async fn start(api: &MockUpstream) -> Sidecar {
    let sc = Sidecar::start(&format!(
        "{}{}{QUIET}",
        static_provider("first"),
        routes(api)
    ))
    .await;
    let client = reqwest::Client::new();
    assert_eq!(get(&client, sc.url("/before")).await, 200, "{}", sc.logs());
    assert_eq!(last_token(api), "Bearer first");
    sc
}

/// `POST /v1/reload` must answer (bounded) 422: the file was refused, the running config stays.
async fn reload_is_refused(sc: &Sidecar) {
    let r = tokio::time::timeout(Duration::from_secs(30), sc.admin_post("/v1/reload"))
        .await
        .unwrap_or_else(|_| panic!("POST /v1/reload did not answer in 30 s\n{}", sc.logs()));
    assert_eq!(r.status(), 422, "{}", sc.logs());
}

#[tokio::test]
async fn an_empty_file_keeps_the_running_config() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let sc = start(&api).await;
    std::fs::write(sc.config_path(), "").unwrap();
    wait_reloads_at_least(&sc, "error", 1).await;
    reload_is_refused(&sc).await;
    let client = reqwest::Client::new();
    assert_eq!(get(&client, sc.url("/after")).await, 200, "{}", sc.logs());
    assert_eq!(last_token(&api), "Bearer first");
    assert_eq!(reloads(&sc, "success").await, 0);
    assert!(sc.logs().contains("holds no settings"), "{}", sc.logs());
}

/// What many editors and `>` do: the file is truncated in place, and only later written again.
/// Requests run all along; none may find its route gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncating_in_place_then_rewriting_never_loses_a_route() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let sc = start(&api).await;
    let good = std::fs::read_to_string(sc.config_path()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, not_ok) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut loops = Vec::new();
    for n in 0..2 {
        let (stop, sent, not_ok) = (stop.clone(), sent.clone(), not_ok.clone());
        let url = sc.url(&format!("/load/{n}"));
        loops.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let status = get(&client, url.clone()).await;
                sent.fetch_add(1, Ordering::Relaxed);
                if status != 200 {
                    not_ok.fetch_add(1, Ordering::Relaxed);
                    statuses.push(status);
                }
            }
            statuses
        }));
    }
    // Truncate in place: same file, zero bytes.
    std::fs::OpenOptions::new()
        .write(true)
        .open(sc.config_path())
        .unwrap()
        .set_len(0)
        .unwrap();
    // The watcher has seen the empty file once it has counted a reload of either kind.
    wait_until(
        Duration::from_secs(15),
        || async { reloads(&sc, "error").await + reloads(&sc, "success").await >= 1 },
        || format!("the truncation was never reloaded\n{}", sc.logs()),
    )
    .await;
    let at_truncation = sent.load(Ordering::Relaxed);
    // Requests keep flowing while the file is empty.
    wait_until(
        Duration::from_secs(10),
        || async { sent.load(Ordering::Relaxed) >= at_truncation + 20 },
        || "no traffic while the file was empty".into(),
    )
    .await;
    assert_eq!(not_ok.load(Ordering::Relaxed), 0, "{}", sc.logs());
    // Written again (the content changed, so it is a real reload).
    std::fs::write(sc.config_path(), format!("# written again\n{good}")).unwrap();
    wait_reloads_at_least(&sc, "success", 1).await;
    let at_rewrite = sent.load(Ordering::Relaxed);
    wait_until(
        Duration::from_secs(10),
        || async { sent.load(Ordering::Relaxed) >= at_rewrite + 20 },
        || "no traffic after the rewrite".into(),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut bad = Vec::new();
    for l in loops {
        bad.extend(l.await.unwrap());
    }
    assert!(
        bad.is_empty(),
        "statuses other than 200: {bad:?}\n{}",
        sc.logs()
    );
    assert!(reloads(&sc, "error").await >= 1, "{}", sc.logs());
}

#[tokio::test]
async fn a_provider_written_twice_is_refused() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let sc = start(&api).await;
    let yaml = format!(
        "providers:\n  main: {{ type: static, token: \"first\" }}\n  main: {{ type: static, token: \"second\" }}\n{}{QUIET}",
        routes(&api)
    );
    std::fs::write(sc.config_path(), full_text(&sc, &yaml)).unwrap();
    wait_reloads_at_least(&sc, "error", 1).await;
    reload_is_refused(&sc).await;
    let logs = sc.logs();
    // The second `main:` is on line 5 (listen, admin_listen, providers, the first main).
    let place = format!("{}:5:3: ", sc.config_path().display());
    assert!(
        logs.contains(&place) && logs.contains("duplicate key \"main\""),
        "{logs}"
    );
    let client = reqwest::Client::new();
    assert_eq!(get(&client, sc.url("/after")).await, 200);
    assert_eq!(last_token(&api), "Bearer first");
    assert_eq!(reloads(&sc, "success").await, 0);
}

#[tokio::test]
async fn a_custom_tag_or_a_number_as_a_secret_is_refused() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let sc = start(&api).await;
    for (n, provider) in [
        "providers:\n  main: { type: static, token: !vault second }\n",
        "providers:\n  main: { type: static, token: 27182818 }\n",
    ]
    .into_iter()
    .enumerate()
    {
        let yaml = format!("{provider}{}{QUIET}", routes(&api));
        std::fs::write(sc.config_path(), full_text(&sc, &yaml)).unwrap();
        wait_reloads_at_least(&sc, "error", n as u64 + 1).await;
    }
    let logs = sc.logs();
    assert!(logs.contains("!vault"), "{logs}");
    assert!(
        logs.contains("quote it") && !logs.contains("27182818"),
        "{logs}"
    );
    let client = reqwest::Client::new();
    assert_eq!(get(&client, sc.url("/after")).await, 200);
    assert_eq!(last_token(&api), "Bearer first");
}

/// A reference to a FIFO would block the reload for ever, one to `/dev/zero` would read until
/// the kernel kills the process: both are refused at once with a clear error.
#[tokio::test]
async fn file_references_to_a_fifo_or_a_device_are_refused_and_the_process_lives() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let sc = start(&api).await;
    let fifo = sc.scratch.path("token.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let client = reqwest::Client::new();
    for (n, (path, kind)) in [
        (fifo.display().to_string(), "is a FIFO"),
        ("/dev/zero".to_string(), "is a character device"),
    ]
    .into_iter()
    .enumerate()
    {
        let token = format!("${{file:{path}}}");
        let yaml = format!("{}{}{QUIET}", static_provider(&token), routes(&api));
        std::fs::write(sc.config_path(), full_text(&sc, &yaml)).unwrap();
        reload_is_refused(&sc).await;
        // Both the watcher's reload and the POST were refused.
        wait_reloads_at_least(&sc, "error", 2 * (n as u64 + 1)).await;
        let logs = sc.logs();
        let said =
            format!("cannot read {path} (from ${{file:{path}}}): {kind}, not a regular file");
        assert!(logs.contains(&said), "want {said:?} in\n{logs}");
        assert_eq!(get(&client, sc.admin_url("/healthz")).await, 200);
        assert_eq!(get(&client, sc.url("/after")).await, 200);
        assert_eq!(last_token(&api), "Bearer first");
    }
}

/// A config over 4 MiB (here a valid one padded with a comment) is refused before it is parsed.
#[tokio::test]
async fn an_oversized_config_is_refused_and_the_process_lives() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let sc = start(&api).await;
    let mut text = full_text(
        &sc,
        &format!("{}{}{QUIET}", static_provider("second"), routes(&api)),
    );
    text.push('#');
    text.push_str(&"x".repeat(5 << 20));
    text.push('\n');
    std::fs::write(sc.config_path(), text).unwrap();
    wait_reloads_at_least(&sc, "error", 1).await;
    assert!(sc.logs().contains("is larger than 4 MiB"), "{}", sc.logs());
    let client = reqwest::Client::new();
    assert_eq!(get(&client, sc.url("/after")).await, 200);
    assert_eq!(last_token(&api), "Bearer first");
}

/// At `trace` with the log beside the config, the watcher's own event records would be events
/// again: the log must hold none of them, whatever happens in the directory.
#[tokio::test]
async fn trace_logging_beside_the_config_does_not_feed_itself() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let yaml = format!(
        "{}{}log: {{ level: trace, access_log: false }}\n",
        static_provider("first"),
        routes(&api)
    );
    let sc = Sidecar::start(&yaml).await;
    std::fs::write(sc.scratch.path("neighbour.txt"), "x").unwrap();
    // Events are delivered in order: once the config change is reloaded, the watcher has been
    // through the neighbour's and the log's events too.
    std::fs::write(
        sc.config_path(),
        format!("# changed\n{}", full_text(&sc, &yaml)),
    )
    .unwrap();
    wait_reloads_at_least(&sc, "success", 1).await;
    let logs = sc.logs();
    for word in ["inotify", "neighbour.txt", "sidecar.log"] {
        let lines: Vec<&str> = logs.lines().filter(|l| l.contains(word)).take(3).collect();
        assert!(lines.is_empty(), "the log mentions {word}: {lines:#?}");
    }
}

fn check(yaml: &str) -> (String, i32, String, String) {
    let scratch = Scratch::new("check");
    let path = scratch.path("sidecar.yaml");
    std::fs::write(&path, yaml).unwrap();
    let (code, out, err) = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
    (path.display().to_string(), code, out, err)
}

#[test]
fn check_never_prints_url_passwords() {
    for url in [
        "http://client:hunter2@idp.example/token",
        "https://client:hunter2@idp.example:99999/token",
    ] {
        let (file, code, out, err) = check(&format!(
            "providers:\n  main:\n    type: oauth2_client_credentials\n    token_url: \"{url}\"\n    client_id: c\n    client_secret: s\nupstreams: []\n"
        ));
        assert_eq!(code, 1, "{url}: accepted\n{out}");
        assert!(
            !out.contains("hunter2") && !err.contains("hunter2"),
            "{url}:\n{out}\n{err}"
        );
        // At the key itself, not at the provider that holds it.
        assert!(err.starts_with(&format!("{file}:4:5: ")), "{url}: {err}");
        assert!(
            err.contains("must not carry credentials") || err.contains("<redacted>@"),
            "{url}: {err}"
        );
    }
}

#[test]
fn check_refuses_durations_past_100_years_at_their_place() {
    for (yaml, place) in [
        (
            "providers:\n  s:\n    type: static\n    token: t\n    refresh:\n      backoff: [500000000000y]\n",
            "6:17",
        ),
        (
            "providers:\n  s:\n    type: static\n    token: t\n    default_ttl: 400000000000y\n",
            "5:18",
        ),
        (
            "upstreams: []\nreplay:\n  wait_for_token: 400000000000y\n",
            "3:19",
        ),
    ] {
        let (file, code, out, err) = check(yaml);
        assert_eq!(code, 1, "accepted:\n{out}");
        assert!(
            err.starts_with(&format!("{file}:{place}: ")) && err.contains("too long"),
            "want {place}: {err}"
        );
    }
}
