//! What a hot reload changes and what it keeps, through the real binary: no request
//! fails across twenty reloads under load, a changed rate limit applies from the reload on while
//! unchanged rules keep their state, unchanged providers keep their tokens, in-flight requests
//! finish under their config, and a listen change asks for a restart.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sidecar_mocks::{IdpConfig, MockIdp, MockUpstream, UpstreamConfig};
use support::metrics::{reloads, wait_reloads};
use support::providers::{cc_provider, provider_status};
use support::{get_status, rewrite, wait_until, Sidecar, QUIET};

fn load_yaml(api: &MockUpstream, round: usize) -> String {
    // Something real changes every time: the rule's rate alternates (generous either way).
    let rate = if round.is_multiple_of(2) {
        "5000/1s"
    } else {
        "4000/1s"
    };
    format!(
        "# rewrite {round}\nupstreams:\n  - {{ name: api, url: \"{}\" }}\nrate_limits:\n  - {{ name: general, upstream: api, match: {{ path: \"/**\" }}, rate: {rate}, burst: 1000, mode: wait }}\n{QUIET}",
        api.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_fail_no_request() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let sc = Sidecar::start(&load_yaml(&api, 0)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut loops = Vec::new();
    for n in 0..4 {
        let (stop, ok) = (stop.clone(), ok.clone());
        let url = sc.url(&format!("/load/{n}"));
        loops.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            failures
        }));
    }
    // Traffic is flowing before the first rewrite.
    wait_until(
        Duration::from_secs(10),
        || async { ok.load(Ordering::Relaxed) >= 20 },
        || format!("no traffic\n{}", sc.logs()),
    )
    .await;
    let mut during = Vec::new();
    for round in 1..=20 {
        let before = ok.load(Ordering::Relaxed);
        // Every other save replaces the file by rename, like vim or an IDE.
        rewrite(&sc, &load_yaml(&api, round), !round.is_multiple_of(2));
        wait_reloads(&sc, "success", round as u64).await;
        during.push(ok.load(Ordering::Relaxed) - before);
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for l in loops {
        failures.extend(l.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "failed requests: {failures:?}\n{}",
        sc.logs()
    );
    let total = ok.load(Ordering::Relaxed);
    // Requests were in flight across the reloads, not only before and after.
    let busy = during.iter().filter(|n| **n > 0).count();
    assert!(busy >= 15, "traffic during reloads: {during:?}");
    assert!(total >= 100, "only {total} requests");
    assert_eq!(reloads(&sc, "error").await, 0, "{}", sc.logs());
    assert_eq!(api.count(), total);
}

fn limits_yaml(api: &MockUpstream, general: &str) -> String {
    format!(
        "upstreams:\n  - {{ name: api, url: \"{}\" }}\nrate_limits:\n  - {{ name: strict, upstream: api, match: {{ path: \"/strict/**\" }}, rate: 1/60s, burst: 1, mode: reject }}\n  - {{ name: general, upstream: api, match: {{ path: \"/general/**\" }}, rate: {general}, mode: reject }}\n{QUIET}",
        api.url()
    )
}

#[tokio::test]
async fn a_changed_rate_limit_takes_effect_from_the_counted_reload_and_unchanged_rules_keep_state()
{
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let sc = Sidecar::start(&limits_yaml(&api, "1/60s, burst: 1")).await;
    let client = reqwest::Client::new();
    assert_eq!(get_status(&client, sc.url("/strict/a")).await, 200);
    assert_eq!(get_status(&client, sc.url("/strict/a")).await, 429);
    assert_eq!(get_status(&client, sc.url("/general/a")).await, 200);
    assert_eq!(get_status(&client, sc.url("/general/a")).await, 429);

    // Loosen `general`: once the reload is counted (the counter moves right after the swap), the
    // very next requests pass, with no further wait. (The poll watches the reload counter rather
    // than sending refused requests: their access lines would land in the watched directory, see
    // QUIET.)
    rewrite(&sc, &limits_yaml(&api, "1000/1s, burst: 1000"), true);
    wait_reloads(&sc, "success", 1).await;
    for _ in 0..5 {
        assert_eq!(get_status(&client, sc.url("/general/b")).await, 200);
    }
    // `strict` did not change: its bucket survived the reload and is still empty.
    assert_eq!(get_status(&client, sc.url("/strict/b")).await, 429);

    // Tighten it again: from the counted reload on, a fresh 1/60s rule lets one through, then
    // refuses.
    rewrite(&sc, &limits_yaml(&api, "1/60s, burst: 1"), false);
    wait_reloads(&sc, "success", 2).await;
    assert_eq!(get_status(&client, sc.url("/general/c")).await, 200);
    assert_eq!(get_status(&client, sc.url("/general/c")).await, 429);
    assert_eq!(get_status(&client, sc.url("/strict/c")).await, 429);
    assert_eq!(reloads(&sc, "success").await, 2);
}

fn providers_yaml(
    idp: &MockIdp,
    api: &MockUpstream,
    changing_scope: &str,
    comment: &str,
) -> String {
    format!(
        "# {comment}\nproviders:\n{}{}upstreams:\n  - {{ name: a, url: \"{u}\", provider: steady, match: {{ path_prefix: /a }} }}\n  - {{ name: b, url: \"{u}\", provider: changing, match: {{ path_prefix: /b }} }}\n",
        cc_provider("steady", idp, "scopes: [read]"),
        cc_provider("changing", idp, &format!("scopes: [{changing_scope}]")),
        u = api.url()
    )
}

#[tokio::test]
async fn a_reload_keeps_unchanged_providers_and_restarts_changed_ones() {
    let idp = MockIdp::start(IdpConfig::default()).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let sc = Sidecar::start(&providers_yaml(&idp, &api, "v1", "first")).await;
    let client = reqwest::Client::new();
    let before = sc
        .wait_status(Duration::from_secs(10), |v| {
            ["steady", "changing"]
                .iter()
                .all(|n| provider_status(v, n)["generation"] == 1)
        })
        .await;
    assert_eq!(get_status(&client, sc.url("/a/x")).await, 200);
    assert_eq!(get_status(&client, sc.url("/b/x")).await, 200);
    assert_eq!(idp.calls(), 2);
    let steady_fp = provider_status(&before, "steady")["fingerprint"].clone();
    let changing_fp = provider_status(&before, "changing")["fingerprint"].clone();

    // Only a comment changes: nobody logs in again.
    rewrite(&sc, &providers_yaml(&idp, &api, "v1", "second"), true);
    wait_reloads(&sc, "success", 1).await;
    assert_eq!(get_status(&client, sc.url("/a/y")).await, 200);
    assert_eq!(idp.calls(), 2);

    // `changing` gets another scope: it starts fresh with a new token; `steady` keeps its own.
    rewrite(&sc, &providers_yaml(&idp, &api, "v2", "third"), false);
    wait_reloads(&sc, "success", 2).await;
    let after = sc
        .wait_status(Duration::from_secs(10), |v| {
            provider_status(v, "changing")["state"] == "valid"
                && provider_status(v, "changing")["fingerprint"] != changing_fp
        })
        .await;
    assert_eq!(idp.calls(), 3, "{:?}", idp.requests());
    assert_eq!(idp.requests()[2].scope.as_deref(), Some("v2"));
    let steady = provider_status(&after, "steady");
    assert_eq!(steady["generation"], 1);
    assert_eq!(steady["fingerprint"], steady_fp);
    assert_eq!(get_status(&client, sc.url("/a/z")).await, 200);
    assert_eq!(get_status(&client, sc.url("/b/z")).await, 200);
    let seen = api.requests();
    let tokens = |prefix: &str| -> Vec<String> {
        seen.iter()
            .filter(|r| r.path.starts_with(prefix))
            .filter_map(|r| r.token.clone())
            .collect()
    };
    let a = tokens("/a/");
    assert!(a.len() == 3 && a.iter().all(|t| *t == a[0]), "{a:?}");
    let b = tokens("/b/");
    assert!(b.len() == 2 && b[0] != b[1], "{b:?}");
    assert_eq!(idp.calls(), 3);
}

#[tokio::test]
async fn in_flight_requests_finish_under_the_config_they_started_with() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let yaml = |prefix: &str| {
        format!(
            "upstreams:\n  - {{ name: api, url: \"{}\", match: {{ path_prefix: {prefix} }} }}\n{QUIET}",
            api.url()
        )
    };
    let sc = Sidecar::start(&yaml("/slow")).await;
    let url = sc.url("/slow?ms=1500");
    let inflight =
        tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status().as_u16()) });
    wait_until(
        Duration::from_secs(10),
        || async { api.count() > 0 },
        || "the request never arrived".to_owned(),
    )
    .await;
    // The route the request took disappears while it is in flight.
    rewrite(&sc, &yaml("/other"), true);
    wait_reloads(&sc, "success", 1).await;
    assert_eq!(reqwest::get(sc.url("/slow")).await.unwrap().status(), 404);
    assert_eq!(inflight.await.unwrap().unwrap(), 200, "{}", sc.logs());
}

#[tokio::test]
async fn a_listen_change_is_logged_as_needing_a_restart() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let body = format!("upstreams:\n  - {{ name: api, url: \"{}\" }}\n", api.url());
    let sc = Sidecar::start(&body).await;
    let elsewhere = support::free_port();
    std::fs::write(
        sc.config_path(),
        format!(
            "listen: \"127.0.0.1:{elsewhere}\"\nadmin_listen: \"{}\"\n{body}",
            sc.admin
        ),
    )
    .unwrap();
    wait_reloads(&sc, "success", 1).await;
    let logs = sc.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("restart")),
        "{logs}"
    );
    // Still serving where it was.
    assert_eq!(reqwest::get(sc.url("/x")).await.unwrap().status(), 200);
}
