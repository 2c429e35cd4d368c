//! `/metrics` read with a real Prometheus text parser (`prometheus-parse`) and by a real
//! Prometheus: `# HELP` on every family; token expiry, build info, in-flight requests, breaker
//! state, store failures and process metrics; gauges current at scrape time; the sidecar's own
//! answers told from the upstream's; the shipped alert rules and dashboard checked by `promtool`
//! and against what the sidecar really exports.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_parse::{Sample, Scrape, Value};
use sidecar_mocks::{Failure, IdpConfig, MockIdp, MockUpstream, Scripted, UpstreamConfig};
use support::providers::{cc_provider, keygen, token_stack};
use support::tools::require;
use support::{free_port, wait_until, Scratch, Sidecar};

/// `GET /metrics` parsed by `prometheus-parse`; also returns the raw text.
async fn scrape(sc: &Sidecar) -> (Scrape, String) {
    let text = sc.admin_text("/metrics").await;
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let parsed = Scrape::parse(lines).unwrap_or_else(|e| panic!("unparsable: {e}\n{text}"));
    (parsed, text)
}

/// Scrapes once `answered` requests are counted and none is in flight: the sidecar counts a
/// request in its logging phase, which may run just after the client has read its answer.
async fn scrape_after(sc: &Sidecar, answered: f64) -> (Scrape, String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (s, text) = scrape(sc).await;
        // A request is counted in its logging phase and leaves `inflight` a moment later, when
        // Pingora drops its context: both, or the scrape can fall in between.
        let done = sum(&s, "sidecar_requests_total", &[]) >= answered
            && sum(&s, "sidecar_inflight_requests", &[]) == 0.0;
        if done || std::time::Instant::now() >= deadline {
            return (s, text);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn value(s: &Sample) -> f64 {
    match &s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{} is not a single value: {other:?}", s.metric),
    }
}

/// The samples of `name` whose labels include `labels`.
fn find<'a>(scrape: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect()
}

/// The value of the one sample of `name` with `labels`.
fn one(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = find(scrape, name, labels);
    assert_eq!(found.len(), 1, "{name}{labels:?}: {found:#?}");
    value(found[0])
}

/// Sum over the samples of `name` with `labels` (0 when there are none).
fn sum(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    find(scrape, name, labels).into_iter().map(value).sum()
}

/// The families of a scrape (a histogram's `_sum`/`_count` belong to its family, which the
/// parser names by its `# HELP`).
fn families(scrape: &Scrape) -> BTreeSet<String> {
    scrape
        .samples
        .iter()
        .map(|s| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| s.metric.strip_suffix(suffix))
                .filter(|base| scrape.docs.contains_key(*base))
                .unwrap_or(&s.metric)
                .to_string()
        })
        .collect()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Every family has `# HELP`; the operating families are there with the labels and values
/// that describe the process now: token expiry, build info, in-flight requests, an open and a
/// closed breaker, a store that could not be read, `process_*`, duration buckets up to 120 s.
#[tokio::test]
async fn every_family_has_help_and_the_operating_families_are_there() {
    let idp = MockIdp::start(IdpConfig {
        ttl: Duration::from_secs(3600),
        ..IdpConfig::default()
    })
    .await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let scratch = Scratch::new("metrics-store");
    let store = scratch.path("main.store");
    std::fs::write(&store, "not a token store").unwrap();
    let yaml = format!(
        "providers:\n{}    store: {{ path: \"{}\", key: \"${{env:STORE_KEY}}\" }}\nupstreams:\n  \
         - {{ name: down, url: \"http://127.0.0.1:{}\", match: {{ path_prefix: /down }}, circuit_breaker: {{ failures: 1, cooldown: 600s }} }}\n  \
         - {{ name: api, url: \"{}\", provider: main }}\n",
        cc_provider("main", &idp, ""),
        store.display(),
        free_port(),
        api.url()
    );
    let key = keygen();
    let sc = Sidecar::start_with_env(&yaml, &[("STORE_KEY", &key)]).await;
    sc.wait_status(Duration::from_secs(10), |v| {
        v["providers"][0]["generation"] == 1
    })
    .await;
    let client = reqwest::Client::new();
    assert_eq!(support::get_status(&client, sc.url("/items")).await, 200);
    assert_eq!(support::get_status(&client, sc.url("/down/x")).await, 502);
    let (s, text) = scrape_after(&sc, 2.0).await;

    for family in families(&s) {
        assert!(
            s.docs.contains_key(&family),
            "no # HELP for {family}\n{text}"
        );
    }
    let now = unix_now();
    let expiry = one(
        &s,
        "sidecar_token_expiry_timestamp_seconds",
        &[("provider", "main")],
    );
    assert!(
        expiry > now + 3500.0 && expiry <= now + 3600.0,
        "{expiry} vs {now}"
    );
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(one(&s, "sidecar_build_info", &[("version", version)]), 1.0);
    assert_eq!(one(&s, "sidecar_inflight_requests", &[]), 0.0);
    assert_eq!(
        one(&s, "sidecar_breaker_open", &[("upstream", "down")]),
        1.0
    );
    assert_eq!(one(&s, "sidecar_breaker_open", &[("upstream", "api")]), 0.0);
    assert_eq!(
        one(
            &s,
            "sidecar_store_errors_total",
            &[("provider", "main"), ("op", "load")]
        ),
        1.0
    );
    assert!(one(&s, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(one(&s, "process_cpu_seconds_total", &[]) >= 0.0);
    assert!(one(&s, "process_open_fds", &[]) >= 3.0);
    let start = one(&s, "process_start_time_seconds", &[]);
    assert!(
        start <= now + 1.0 && start > now - 600.0,
        "{start} vs {now}"
    );
    assert!(
        text.contains("# TYPE process_cpu_seconds_total counter"),
        "{text}"
    );
    // Durations up to the read timeout (60 s by default) and past it land in buckets of their own.
    let hist = find(
        &s,
        "sidecar_request_duration_seconds",
        &[("upstream", "api")],
    );
    let Value::Histogram(buckets) = &hist[0].value else {
        panic!("not a histogram: {hist:?}")
    };
    let bounds: Vec<f64> = buckets.iter().map(|b| b.less_than).collect();
    for b in [30.0, 60.0, 120.0] {
        assert!(bounds.contains(&b), "no {b} s bucket: {bounds:?}");
    }
    // The state gauge: exactly one state is 1.
    assert_eq!(sum(&s, "sidecar_token_state", &[("provider", "main")]), 1.0);
    assert_eq!(
        one(
            &s,
            "sidecar_token_state",
            &[("provider", "main"), ("state", "valid")]
        ),
        1.0
    );
}

/// `sidecar_token_ttl_seconds` is the remaining lifetime, computed when `/metrics` is scraped:
/// it falls between two scrapes with no refresh in between, while the expiry stays put.
#[tokio::test]
async fn ttl_falls_between_scrapes_without_a_refresh() {
    let (idp, _api, sc) = token_stack("").await;
    let (first, _) = scrape(&sc).await;
    let ttl = |s: &Scrape| one(s, "sidecar_token_ttl_seconds", &[("provider", "main")]);
    let refreshes = |s: &Scrape| sum(s, "sidecar_token_refresh_total", &[("provider", "main")]);
    let expiry = |s: &Scrape| {
        one(
            s,
            "sidecar_token_expiry_timestamp_seconds",
            &[("provider", "main")],
        )
    };
    let t1 = ttl(&first);
    assert!(t1 > 3500.0 && t1 <= 3600.0, "{t1}");
    let later = std::cell::RefCell::new(None);
    wait_until(
        Duration::from_secs(10),
        || async {
            let (s, _) = scrape(&sc).await;
            let fell = ttl(&s) < t1;
            *later.borrow_mut() = Some(s);
            fell
        },
        || format!("the TTL stayed at {t1}\n{}", sc.logs()),
    )
    .await;
    let later = later.into_inner().unwrap();
    assert_eq!(refreshes(&later), refreshes(&first), "a refresh happened");
    assert_eq!(refreshes(&first), 1.0);
    assert_eq!(expiry(&later), expiry(&first));
    assert_eq!(idp.calls(), 1);
}

/// `origin` tells the sidecar's own answers from the upstream's: the sidecar's 429 of a rate
/// limit and its 502 for an unreachable upstream are `origin="sidecar"`; a 502 the upstream
/// sent is `origin="upstream"`.
#[tokio::test]
async fn origin_tells_the_sidecars_answers_from_the_upstreams() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let yaml = format!(
        "upstreams:\n  \
         - {{ name: down, url: \"http://127.0.0.1:{}\", match: {{ path_prefix: /down }} }}\n  \
         - {{ name: api, url: \"{}\" }}\n\
         retry: {{ statuses: [503] }}\n\
         rate_limits:\n  - {{ name: tight, upstream: api, match: {{ path: \"/limited/**\" }}, rate: 1/60s, mode: reject }}\n",
        free_port(),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    let client = reqwest::Client::new();
    let get = |p: &str| support::get_status(&client, sc.url(p));
    assert_eq!(get("/limited/a").await, 200);
    assert_eq!(get("/limited/b").await, 429);
    api.push_script(Scripted::status(502));
    assert_eq!(get("/bad-gateway").await, 502);
    assert_eq!(get("/down/x").await, 502);
    let (s, text) = scrape_after(&sc, 4.0).await;
    let count = |upstream: &str, status: &str, origin: &str| {
        sum(
            &s,
            "sidecar_requests_total",
            &[
                ("upstream", upstream),
                ("status", status),
                ("origin", origin),
            ],
        )
    };
    assert_eq!(count("api", "429", "sidecar"), 1.0, "{text}");
    assert_eq!(count("api", "429", "upstream"), 0.0, "{text}");
    assert_eq!(count("api", "502", "upstream"), 1.0, "{text}");
    assert_eq!(count("api", "502", "sidecar"), 0.0, "{text}");
    assert_eq!(count("down", "502", "sidecar"), 1.0, "{text}");
    assert_eq!(count("api", "200", "upstream"), 1.0, "{text}");
    // Every request sample carries the label.
    for sample in find(&s, "sidecar_requests_total", &[]) {
        let origin = sample.labels.get("origin");
        assert!(matches!(origin, Some("sidecar" | "upstream")), "{sample:?}");
    }
}

/// A 401 answered by the sidecar's own replay (a body over Pingora's 64 KiB retry buffer) that
/// ended 200 counts as a replay, not as an upstream error of class `auth`.
#[tokio::test]
async fn an_own_replay_that_ended_200_is_no_error() {
    let idp = MockIdp::start(IdpConfig::default()).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let yaml = format!(
        "providers:\n{}upstreams:\n  - {{ name: api, url: \"{}\", provider: main }}\n",
        cc_provider("main", &idp, ""),
        api.url()
    );
    let sc = Sidecar::start_with_first_token(&yaml).await;
    idp.registry().revoke_all();
    let r = reqwest::Client::new()
        .put(sc.url("/blob"))
        .body(vec![1u8; 300 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", sc.logs());
    assert_eq!(api.count(), 2, "the 401 and the replay");
    let (s, text) = scrape_after(&sc, 1.0).await;
    assert_eq!(
        sum(&s, "sidecar_replays_total", &[("upstream", "api")]),
        1.0,
        "{text}"
    );
    assert_eq!(sum(&s, "sidecar_upstream_errors_total", &[]), 0.0, "{text}");
    assert_eq!(
        sum(
            &s,
            "sidecar_requests_total",
            &[("status", "200"), ("origin", "upstream")]
        ),
        1.0
    );
}

fn run_promtool(args: &[&str]) {
    let promtool = require("promtool", "prometheus");
    let out = Command::new(promtool)
        .args(args)
        .current_dir(repo_file("ops"))
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The shipped alert rules are valid and their unit tests (one or more per alert) pass.
#[test]
fn shipped_alert_rules_pass_promtool() {
    run_promtool(&["check", "rules", "alerts.yaml"]);
    run_promtool(&["test", "rules", "alerts.test.yaml"]);
}

/// Metric names (`sidecar_*`, `process_*`) in a text, histogram suffixes taken off.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let at_word_start =
            i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if at_word_start && (rest.starts_with("sidecar_") || rest.starts_with("process_")) {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..len];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(base.to_string());
            i += len;
        } else {
            i += 1;
        }
    }
    out
}

/// Every metric the alert rules and the dashboard use is one the sidecar exports: a live scrape
/// after traffic that touches them all (a replay, a failed refresh, a rate-limit delay and
/// rejection) has each of them.
#[tokio::test]
async fn alerts_and_dashboard_use_only_exported_metrics() {
    let idp = MockIdp::start(IdpConfig::default()).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let yaml = format!(
        "providers:\n{}upstreams:\n  - {{ name: api, url: \"{}\", provider: main }}\n\
         rate_limits:\n  \
         - {{ name: tight, upstream: api, match: {{ path: \"/limited/**\" }}, rate: 1/60s, mode: reject }}\n  \
         - {{ name: paced, upstream: api, match: {{ path: \"/paced/**\" }}, rate: 20/1s, burst: 1, mode: wait }}\n",
        cc_provider("main", &idp, ""),
        api.url()
    );
    let sc = Sidecar::start_with_first_token(&yaml).await;
    let client = reqwest::Client::new();
    let get = |p: String| support::get_status(&client, sc.url(&p));
    idp.registry().revoke_all();
    assert_eq!(get("/replayed".into()).await, 200);
    assert_eq!(get("/limited/a".into()).await, 200);
    assert_eq!(get("/limited/b".into()).await, 429);
    api.push_script(Scripted::status(404));
    assert_eq!(get("/missing".into()).await, 404);
    let paced = futures::future::join_all((0..3).map(|i| get(format!("/paced/{i}")))).await;
    assert!(paced.iter().all(|s| *s == 200), "{paced:?}");
    idp.set_failure(Some(Failure::Status(500)));
    let r = sc.admin_post("/v1/token/refresh?provider=main").await;
    assert_ne!(r.status(), 200);
    idp.set_failure(None);
    let (s, text) = scrape_after(&sc, 7.0).await;
    let exported = families(&s);

    let mut used = BTreeSet::new();
    for file in [
        "ops/alerts.yaml",
        "ops/alerts.test.yaml",
        "ops/grafana-dashboard.json",
    ] {
        let text = std::fs::read_to_string(repo_file(file)).unwrap();
        let names = names_in(&text);
        assert!(!names.is_empty(), "{file} names no metric");
        used.extend(names);
    }
    let missing: Vec<_> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(missing.is_empty(), "not exported: {missing:?}\n{text}");
    // The dashboard is JSON Grafana can import.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("ops/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert!(dash["panels"].as_array().is_some_and(|p| p.len() >= 8));
}

/// A Prometheus server started by a test; killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: Scratch,
}

impl Prometheus {
    fn start(target: std::net::SocketAddr) -> Prometheus {
        let bin = require("prometheus", "prometheus");
        let dir = Scratch::new("prometheus");
        let config = dir.path("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
                 rule_files: [\"{}\"]\n\
                 scrape_configs:\n  - job_name: sidecar\n    static_configs: [{{ targets: [\"{target}\"] }}]\n",
                repo_file("ops/alerts.yaml").display()
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path("prometheus.log")).unwrap_or_default()
    }

    /// The instant vector of `query`, as (labels, value) pairs; empty while Prometheus is not
    /// up or has no sample.
    async fn query(&self, query: &str) -> Vec<(HashMap<String, String>, f64)> {
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let Ok(r) = reqwest::Client::new()
            .get(url)
            .query(&[("query", query)])
            .timeout(Duration::from_secs(5))
            .send()
            .await
        else {
            return Vec::new();
        };
        let Ok(v) = r.json::<serde_json::Value>().await else {
            return Vec::new();
        };
        let Some(result) = v["data"]["result"].as_array() else {
            return Vec::new();
        };
        result
            .iter()
            .map(|r| {
                let labels = serde_json::from_value(r["metric"].clone()).unwrap_or_default();
                let value = r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (labels, value)
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Prometheus (Debian's package) scrapes the running sidecar every second, with the
/// shipped rules loaded; its HTTP API answers the token expiry and TTL series.
#[tokio::test]
async fn a_real_prometheus_scrapes_the_token_series() {
    let (_idp, _api, sc) = token_stack("").await;
    let prom = Prometheus::start(sc.admin);
    let found = std::cell::RefCell::new(Vec::new());
    wait_until(
        Duration::from_secs(60),
        || async {
            *found.borrow_mut() = prom.query("sidecar_token_expiry_timestamp_seconds").await;
            !found.borrow().is_empty()
        },
        || format!("Prometheus never had the series\n{}", prom.log()),
    )
    .await;
    let found = found.into_inner();
    assert_eq!(found.len(), 1, "{found:?}");
    let (labels, expiry) = &found[0];
    assert_eq!(labels.get("provider").map(String::as_str), Some("main"));
    assert_eq!(labels.get("job").map(String::as_str), Some("sidecar"));
    let now = unix_now();
    assert!(
        *expiry > now + 3500.0 && *expiry <= now + 3600.0,
        "{expiry}"
    );
    let ttl = prom
        .query("sidecar_token_ttl_seconds{provider=\"main\"}")
        .await;
    assert_eq!(ttl.len(), 1, "{ttl:?}");
    assert!(ttl[0].1 > 3500.0 && ttl[0].1 <= 3600.0, "{ttl:?}");
    // The token-expiry alert's expression evaluates, and says nothing about a fresh token.
    let alerting = prom
        .query("ALERTS{alertname=\"SidecarTokenExpiringWithoutRefresh\"}")
        .await;
    assert!(alerting.is_empty(), "{alerting:?}");
}
