//! Operating the sidecar (SPEC §4 hot reload, §9 metrics, logs): reloads from the file watcher,
//! SIGHUP and `POST /v1/reload`, Prometheus text on `/metrics`, JSON and access logs — all through
//! the real binary.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sidecar_mocks::{IdpConfig, MockIdp, MockUpstream, UpstreamConfig};
use support::{open_stack, wait_until, Sidecar};

// ---------------------------------------------------------------------------------------------
// Prometheus text, parsed by hand: `# HELP`/`# TYPE` lines and `name{labels} value [timestamp]`.

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

/// Parses `{a="x",b="y\"z"}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("labels must start with {")?;
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or_else(|| format!("no = in {rest:?}"))?;
        let name = rest[..eq].trim();
        if !is_metric_name(name) || name.contains(':') {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name} is not quoted"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => return Err(format!("bad escape {other:?} in label {name}")),
                },
                Some((_, c)) => value.push(c),
                None => return Err(format!("unterminated value of label {name}")),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[end + 1..];
    }
}

fn parse_prometheus(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    for (n, line) in text.lines().enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("HELP"), Some(name), _) if is_metric_name(name) => {}
                (Some("TYPE"), Some(name), Some(kind)) if is_metric_name(name) => {
                    let known = ["counter", "gauge", "histogram", "summary", "untyped"];
                    if !known.contains(&kind) {
                        return Err(err(format!("unknown type {kind}")));
                    }
                    if out.types.insert(name.into(), kind.into()).is_some() {
                        return Err(err(format!("second TYPE for {name}")));
                    }
                }
                (Some("HELP" | "TYPE"), _, _) => return Err(err("malformed HELP/TYPE".into())),
                _ => {} // a plain comment
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(err(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(err)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value =
            parse_value(fields.next().ok_or_else(|| err("no value".into()))?).map_err(err)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|e| err(format!("bad timestamp: {e}")))?;
        }
        if fields.next().is_some() {
            return Err(err("trailing text".into()));
        }
        out.samples.push(Sample {
            name: name.into(),
            labels,
            value,
        });
    }
    // Every sample belongs to a declared family (histograms add _bucket/_sum/_count).
    for s in &out.samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| s.name.strip_suffix(suffix))
            .filter(|base| out.types.get(*base).map(String::as_str) == Some("histogram"))
            .unwrap_or(&s.name);
        if !out.types.contains_key(family) {
            return Err(format!("{} has no # TYPE line", s.name));
        }
    }
    Ok(out)
}

impl Exposition {
    /// Sum of the samples named `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .fold(0.0, |a, b| a + b)
    }
}

async fn scrape(sc: &Sidecar) -> Exposition {
    let text = sc.admin_text("/metrics").await;
    parse_prometheus(&text)
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}\n{text}"))
}

async fn reloads(sc: &Sidecar, result: &str) -> u64 {
    scrape(sc)
        .await
        .sum("sidecar_config_reloads_total", &[("result", result)]) as u64
}

/// Polls `/metrics` until `sidecar_config_reloads_total{result}` reaches `n` (bounded).
async fn wait_reloads(sc: &Sidecar, result: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = reloads(sc, result).await;
        if now >= n {
            assert_eq!(now, n, "more {result} reloads than expected\n{}", sc.logs());
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{now} of {n} {result} reloads after 15 s\n{}",
            sc.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until the `n`th successful reload, at most one second after `written`.
async fn wait_reloads_within(sc: &Sidecar, n: u64, written: Instant) {
    loop {
        if reloads(sc, "success").await >= n {
            return;
        }
        assert!(
            written.elapsed() < Duration::from_secs(1),
            "reload {n} not in 1 s after the write\n{}",
            sc.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Rewriting the config the way people do.

/// Rewrites the sidecar's config with `yaml` (its listen addresses are kept). `rename`: write a
/// temp file and rename it over the config, the way many editors save.
fn rewrite(sc: &Sidecar, yaml: &str, rename: bool) {
    let text = format!(
        "listen: \"{}\"\nadmin_listen: \"{}\"\n{yaml}",
        sc.listen, sc.admin
    );
    let path = sc.config_path();
    if rename {
        let tmp = path.with_extension("yaml.swp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    } else {
        std::fs::write(path, text).unwrap();
    }
}

fn idp_provider(idp: &MockIdp, name: &str, scope: &str) -> String {
    format!(
        "  {name}:\n    type: oauth2_client_credentials\n    token_url: \"{}\"\n    client_id: demo-client\n    client_secret: demo-secret\n    scopes: [{scope}]\n",
        idp.token_url()
    )
}

async fn get_status(client: &reqwest::Client, url: String) -> u16 {
    client.get(url).send().await.unwrap().status().as_u16()
}

/// `file:line:col:` for `path` somewhere in `logs`; returns (line, col).
fn located(logs: &str, path: &std::path::Path) -> Vec<(usize, usize)> {
    let needle = format!("{}:", path.display());
    let mut found = Vec::new();
    let mut rest = logs;
    while let Some(i) = rest.find(&needle) {
        rest = &rest[i + needle.len()..];
        let mut parts = rest.splitn(3, ':');
        if let (Some(l), Some(c), Some(_)) = (parts.next(), parts.next(), parts.next()) {
            if let (Ok(l), Ok(c)) = (l.parse(), c.parse()) {
                found.push((l, c));
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------

/// The harness writes the sidecar's log next to its config, and the watcher waits for 100 ms of
/// quiet in that directory before it reloads (see
/// `a_reload_is_seen_while_the_config_directory_is_busy`): tests that send traffic while they
/// wait for a reload keep access lines out of that file.
const QUIET: &str = "log: { access_log: false }\n";

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

#[tokio::test]
async fn an_invalid_edit_keeps_serving_is_counted_and_located() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let good = format!("upstreams:\n  - {{ name: api, url: \"{}\" }}\n", api.url());
    let sc = Sidecar::start(&good).await;
    let client = reqwest::Client::new();
    assert_eq!(get_status(&client, sc.url("/a")).await, 200);

    // Broken YAML: an unclosed flow sequence.
    rewrite(
        &sc,
        &format!("upstreams: [\n  {{ name: api, url: \"{}\" }}\n", api.url()),
        false,
    );
    wait_reloads(&sc, "error", 1).await;
    assert_eq!(get_status(&client, sc.url("/b")).await, 200);
    let first = located(&sc.logs(), sc.config_path());
    assert!(
        !first.is_empty(),
        "no file:line:col in the log:\n{}",
        sc.logs()
    );

    // A typo'd key on line 4 (listen and admin_listen are lines 1-2).
    rewrite(
        &sc,
        &format!(
            "upstreams:\n  - name: api\n    url: \"{}\"\n    provdier: main\n",
            api.url()
        ),
        true,
    );
    wait_reloads(&sc, "error", 2).await;
    assert_eq!(get_status(&client, sc.url("/c")).await, 200);
    let logs = sc.logs();
    let all = located(&logs, sc.config_path());
    assert!(
        all.len() > first.len() && all.last().unwrap().0 == 6,
        "the unknown key is on line 6: {all:?}\n{logs}"
    );
    assert!(logs.contains("provdier"), "{logs}");
    assert_eq!(reloads(&sc, "success").await, 0);

    // Fixed: the next save is taken.
    rewrite(&sc, &format!("# fixed\n{good}"), false);
    wait_reloads(&sc, "success", 1).await;
    assert_eq!(get_status(&client, sc.url("/d")).await, 200);
    assert_eq!(api.count(), 4, "the running config served throughout");
}

fn limits_yaml(api: &MockUpstream, general: &str) -> String {
    format!(
        "upstreams:\n  - {{ name: api, url: \"{}\" }}\nrate_limits:\n  - {{ name: strict, upstream: api, match: {{ path: \"/strict/**\" }}, rate: 1/60s, burst: 1, mode: reject }}\n  - {{ name: general, upstream: api, match: {{ path: \"/general/**\" }}, rate: {general}, mode: reject }}\n{QUIET}",
        api.url()
    )
}

#[tokio::test]
async fn a_changed_rate_limit_takes_effect_within_a_second_and_unchanged_rules_keep_state() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let sc = Sidecar::start(&limits_yaml(&api, "1/60s, burst: 1")).await;
    let client = reqwest::Client::new();
    assert_eq!(get_status(&client, sc.url("/strict/a")).await, 200);
    assert_eq!(get_status(&client, sc.url("/strict/a")).await, 429);
    assert_eq!(get_status(&client, sc.url("/general/a")).await, 200);
    assert_eq!(get_status(&client, sc.url("/general/a")).await, 429);

    // Loosen `general`: within a second of the write the reload is in and requests pass. (The
    // poll watches the reload counter, which moves right after the swap, rather than sending
    // refused requests: their access lines would land in the watched directory, see QUIET.)
    rewrite(&sc, &limits_yaml(&api, "1000/1s, burst: 1000"), true);
    let written = Instant::now();
    wait_reloads_within(&sc, 1, written).await;
    for _ in 0..5 {
        assert_eq!(get_status(&client, sc.url("/general/b")).await, 200);
    }
    let took = written.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the looser limit took {took:?}"
    );
    // `strict` did not change: its bucket survived the reload and is still empty.
    assert_eq!(get_status(&client, sc.url("/strict/b")).await, 429);

    // Tighten it again: a fresh 1/60s rule lets one through, then refuses.
    rewrite(&sc, &limits_yaml(&api, "1/60s, burst: 1"), false);
    let written = Instant::now();
    wait_reloads_within(&sc, 2, written).await;
    assert_eq!(get_status(&client, sc.url("/general/c")).await, 200);
    assert_eq!(get_status(&client, sc.url("/general/c")).await, 429);
    let took = written.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the tighter limit took {took:?}"
    );
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
        idp_provider(idp, "steady", "read"),
        idp_provider(idp, "changing", changing_scope),
        u = api.url()
    )
}

fn provider<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["providers"]
        .as_array()
        .and_then(|all| all.iter().find(|p| p["provider"] == name))
        .unwrap_or_else(|| panic!("no provider {name} in {status}"))
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
                .all(|n| provider(v, n)["generation"] == 1)
        })
        .await;
    assert_eq!(get_status(&client, sc.url("/a/x")).await, 200);
    assert_eq!(get_status(&client, sc.url("/b/x")).await, 200);
    assert_eq!(idp.calls(), 2);
    let steady_fp = provider(&before, "steady")["fingerprint"].clone();
    let changing_fp = provider(&before, "changing")["fingerprint"].clone();

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
            provider(v, "changing")["state"] == "valid"
                && provider(v, "changing")["fingerprint"] != changing_fp
        })
        .await;
    assert_eq!(idp.calls(), 3, "{:?}", idp.requests());
    assert_eq!(idp.requests()[2].scope.as_deref(), Some("v2"));
    let steady = provider(&after, "steady");
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
async fn sighup_reloads() {
    let (_api, sc) = open_stack("").await;
    assert_eq!(reqwest::get(sc.url("/x")).await.unwrap().status(), 200);
    // The file is unchanged, so the watcher has nothing to do: only the signal reloads.
    sc.signal("HUP");
    wait_reloads(&sc, "success", 1).await;
    sc.signal("HUP");
    wait_reloads(&sc, "success", 2).await;
    assert!(
        sc.logs().contains("configuration reloaded"),
        "{}",
        sc.logs()
    );
    assert_eq!(reqwest::get(sc.url("/y")).await.unwrap().status(), 200);
}

#[tokio::test]
async fn post_reload_reloads_and_answers_422_for_an_invalid_file() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let good = format!("upstreams:\n  - {{ name: api, url: \"{}\" }}\n", api.url());
    let sc = Sidecar::start(&good).await;
    let r = sc.admin_post("/v1/reload").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["status"],
        "reloaded"
    );
    assert_eq!(reloads(&sc, "success").await, 1);

    rewrite(
        &sc,
        "upstreams:\n  - { name: api, url: \"http://127.0.0.1:1\", bogus: 1 }\n",
        false,
    );
    // The watcher may count the bad file too; the POST answers for itself.
    let r = sc.admin_post("/v1/reload").await;
    assert_eq!(r.status(), 422);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "invalid_config");
    assert!(reloads(&sc, "error").await >= 1);
    assert_eq!(reloads(&sc, "success").await, 1);
    assert_eq!(reqwest::get(sc.url("/still")).await.unwrap().status(), 200);
    assert_eq!(api.count(), 1);
}

/// A mock IdP, an upstream that accepts only its tokens, and a sidecar with provider `main` and
/// the upstream `api` on `/api`, plus `extra` YAML.
async fn main_stack(extra: &str) -> (MockIdp, MockUpstream, Sidecar) {
    let idp = MockIdp::start(IdpConfig::default()).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let yaml = format!(
        "providers:\n{}upstreams:\n  - {{ name: api, url: \"{}\", provider: main, match: {{ path_prefix: /api }} }}\n{extra}",
        idp_provider(&idp, "main", "read"),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    (idp, api, sc)
}

#[tokio::test]
async fn metrics_are_prometheus_text_that_moves_with_traffic_and_refreshes() {
    let (_idp, api, sc) = main_stack("").await;
    sc.wait_status(Duration::from_secs(10), |v| {
        provider(v, "main")["generation"] == 1
    })
    .await;
    let before = scrape(&sc).await;
    let ok = [("upstream", "api"), ("method", "GET"), ("status", "200")];
    let client = reqwest::Client::new();
    for id in 0..5 {
        let url = sc.url(&format!("/api/orders/{}?customer=c-{id}", 917_000 + id));
        assert_eq!(get_status(&client, url).await, 200);
    }
    assert_eq!(get_status(&client, sc.url("/unrouted/4242")).await, 404);
    let r = sc.admin_post("/v1/token/refresh?provider=main").await;
    assert_eq!(r.status(), 200);
    let after = scrape(&sc).await;

    let moved =
        |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);
    assert_eq!(moved("sidecar_requests_total", &ok), 5.0);
    assert_eq!(moved("sidecar_requests_total", &[("status", "404")]), 1.0);
    let buckets = "sidecar_request_duration_seconds_bucket";
    assert_eq!(moved(buckets, &[("upstream", "api"), ("le", "+Inf")]), 5.0);
    assert_eq!(
        moved(
            "sidecar_request_duration_seconds_count",
            &[("upstream", "api")]
        ),
        5.0
    );
    let refresh = [
        ("provider", "main"),
        ("trigger", "manual"),
        ("result", "success"),
    ];
    assert_eq!(moved("sidecar_token_refresh_total", &refresh), 1.0);
    assert_eq!(
        after.sum(
            "sidecar_token_refresh_total",
            &[("provider", "main"), ("trigger", "initial")]
        ),
        1.0
    );
    assert_eq!(
        after
            .types
            .get("sidecar_requests_total")
            .map(String::as_str),
        Some("counter")
    );
    assert_eq!(
        after
            .types
            .get("sidecar_request_duration_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    // Buckets suited to a proxy: the smallest is at most 100 µs.
    let smallest = after
        .samples
        .iter()
        .filter(|s| s.name == buckets)
        .filter_map(|s| parse_value(&s.labels["le"]).ok())
        .fold(f64::INFINITY, f64::min);
    assert!(smallest <= 0.0001, "smallest bucket {smallest}");

    // No label carries a raw path, an ID, a query, a token or a secret.
    let tokens: Vec<String> = api.requests().into_iter().filter_map(|r| r.token).collect();
    assert!(!tokens.is_empty());
    for s in &after.samples {
        for (k, v) in &s.labels {
            let bad = v.contains('/')
                || v.contains('?')
                || v.contains("917")
                || v.contains("4242")
                || v.contains("demo-secret")
                || tokens.iter().any(|t| v.contains(t.as_str()));
            // Shown with any token masked.
            let shown = tokens
                .iter()
                .fold(v.replace("demo-secret", "<secret>"), |v, t| {
                    v.replace(t.as_str(), "<token>")
                });
            assert!(!bad, "label {k}={shown:?} on {}", s.name);
        }
    }
}

/// Parses every non-empty line of `logs` as a JSON object.
fn json_lines(logs: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    logs.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(serde_json::Value::Object(o)) => o,
            _ => panic!("not a JSON object: {l:?}\n{logs}"),
        })
        .collect()
}

fn access_lines(
    lines: &[serde_json::Map<String, serde_json::Value>],
) -> Vec<&serde_json::Map<String, serde_json::Value>> {
    lines
        .iter()
        .filter(|l| l.get("target").and_then(|t| t.as_str()) == Some("access"))
        .collect()
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_an_access_line_per_request_and_no_token() {
    let (_idp, api, sc) = main_stack("log: { format: json }\n").await;
    let client = reqwest::Client::new();
    assert_eq!(get_status(&client, sc.url("/api/items")).await, 200);
    let r = client
        .post(sc.url("/api/items"))
        .header("authorization", "Bearer the-clients-own")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get_status(&client, sc.url("/nowhere")).await, 404);
    sc.admin_post("/v1/token/refresh?provider=main").await;
    assert_eq!(get_status(&client, sc.url("/api/again")).await, 200);

    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines = json_lines(&sc.logs());
        if access_lines(&lines).len() >= 4 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let access = access_lines(&lines);
    assert_eq!(access.len(), 4, "{lines:#?}");
    for l in &access {
        for field in [
            "method",
            "upstream",
            "status",
            "duration_ms",
            "attempts",
            "replayed",
            "generation",
        ] {
            assert!(l.contains_key(field), "no {field} in {l:?}");
        }
        assert!(l.contains_key("path") || l.contains_key("route"), "{l:?}");
    }
    let line = |method: &str, path: &str| {
        access
            .iter()
            .find(|l| l["method"] == method && l["path"] == path)
            .unwrap_or_else(|| panic!("no access line for {method} {path}: {access:#?}"))
    };
    let get = line("GET", "/api/items");
    assert_eq!(get["status"], 200);
    assert_eq!(get["upstream"], "api");
    assert_eq!(get["generation"], 1);
    assert_eq!(get["attempts"], 1);
    assert_eq!(get["replayed"], 0);
    assert_eq!(line("POST", "/api/items")["status"], 200);
    assert_eq!(line("GET", "/nowhere")["status"], 404);
    assert_eq!(line("GET", "/api/again")["generation"], 2);
    // Refresh events say what triggered them.
    let refreshes: Vec<_> = lines
        .iter()
        .filter(|l| l.get("message").and_then(|m| m.as_str()) == Some("token refreshed"))
        .map(|l| l["trigger"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(refreshes, ["initial", "manual"], "{lines:#?}");

    let logs = sc.logs();
    let tokens: Vec<String> = api.requests().into_iter().filter_map(|r| r.token).collect();
    assert_eq!(tokens.len(), 3);
    for t in &tokens {
        assert!(!logs.contains(t.as_str()), "a token is in the log");
    }
    assert!(!logs.contains("demo-secret") && !logs.contains("the-clients-own"));
}

#[tokio::test]
async fn access_log_false_turns_access_lines_off_and_a_reload_turns_them_on() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let yaml = |on: bool| {
        format!(
            "upstreams:\n  - {{ name: api, url: \"{}\" }}\nlog: {{ format: json, access_log: {on} }}\n",
            api.url()
        )
    };
    let sc = Sidecar::start(&yaml(false)).await;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        assert_eq!(get_status(&client, sc.url("/quiet")).await, 200);
    }
    assert_eq!(api.count(), 3);
    assert!(
        access_lines(&json_lines(&sc.logs())).is_empty(),
        "{}",
        sc.logs()
    );

    rewrite(&sc, &yaml(true), true);
    wait_reloads(&sc, "success", 1).await;
    assert_eq!(get_status(&client, sc.url("/loud")).await, 200);
    wait_until(
        Duration::from_secs(10),
        || async { !access_lines(&json_lines(&sc.logs())).is_empty() },
        || format!("no access line\n{}", sc.logs()),
    )
    .await;
    let lines = json_lines(&sc.logs());
    let access = access_lines(&lines);
    assert_eq!(access.len(), 1, "{lines:#?}");
    assert_eq!(access[0]["path"], "/loud");
}

/// Reloads must not depend on the rest of the config directory being quiet: here another file in
/// it (a log, a lock file, an editor's swap file) changes every 20 ms while the config changes.
#[tokio::test]
async fn a_reload_is_seen_while_the_config_directory_is_busy() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let sc = Sidecar::start(&format!(
        "upstreams:\n  - {{ name: api, url: \"{}\" }}\n{QUIET}",
        api.url()
    ))
    .await;
    let busy = sc.config_path().with_file_name("busy.log");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                std::fs::write(&busy, n.to_string()).unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    rewrite(
        &sc,
        &format!(
            "# changed\nupstreams:\n  - {{ name: api, url: \"{}\" }}\n{QUIET}",
            api.url()
        ),
        false,
    );
    let written = Instant::now();
    let mut seen = false;
    while written.elapsed() < Duration::from_secs(5) {
        if reloads(&sc, "success").await == 1 {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert!(
        seen,
        "no reload within 5 s of the write while a sibling file kept changing"
    );
}

/// `log.access_log: false` should silence every access line, also those of answers the sidecar
/// gives itself (404 no_route, 429 rate_limited, ...), and a rate-limited request belongs to the
/// upstream it matched.
#[tokio::test]
async fn access_log_false_also_silences_local_answers() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let sc = Sidecar::start(&format!(
        "upstreams:\n  - {{ name: api, url: \"{}\", match: {{ path_prefix: /api }} }}\nrate_limits:\n  - {{ name: one, upstream: api, rate: 1/60s, burst: 1, mode: reject }}\nlog: {{ format: json, access_log: false }}\n",
        api.url()
    ))
    .await;
    let client = reqwest::Client::new();
    assert_eq!(get_status(&client, sc.url("/api/a")).await, 200);
    assert_eq!(get_status(&client, sc.url("/api/b")).await, 429);
    assert_eq!(get_status(&client, sc.url("/elsewhere")).await, 404);
    let counted = scrape(&sc).await.sum(
        "sidecar_requests_total",
        &[("upstream", "api"), ("status", "429")],
    );
    let lines = json_lines(&sc.logs());
    let access = access_lines(&lines);
    assert!(
        counted == 1.0 && access.is_empty(),
        "429s counted for upstream api: {counted}; access lines: {access:#?}"
    );
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
