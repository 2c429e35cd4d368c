//! Replicas that share one account through a real `redis-server` (`shared:`): three real
//! sidecar processes behave as one client of the identity provider — one IdP call per
//! rotation, no refresh token spent twice, a killed lock holder replaced after its lease —
//! and Redis going away and coming back (both `on_redis_down` modes), a wrong password and
//! garbage under the prefix are survived.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use sidecar_mocks::{IdpConfig, MockIdp, MockUpstream, Scripted, UpstreamConfig};
use support::providers::{keygen, provider_status};
use support::redis::Redis;
use support::{wait_until, Scratch, Sidecar};

const PREFIX: &str = "ts-test";

/// How the shared provider obtains tokens.
#[derive(Clone, Copy)]
enum Kind {
    ClientCredentials,
    /// `oauth2_refresh_token` from this initial refresh token.
    RefreshToken,
}

struct Fleet {
    idp: MockIdp,
    api: MockUpstream,
    redis: Redis,
    dir: Scratch,
    key: String,
    initial_rt: String,
    sidecars: Vec<Sidecar>,
}

struct Settings {
    kind: Kind,
    before_expiry: &'static str,
    mode: &'static str,
    lease: &'static str,
    wait_for_token: &'static str,
    url: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            kind: Kind::ClientCredentials,
            before_expiry: "30m",
            mode: "local",
            lease: "1s",
            wait_for_token: "10s",
            url: None,
        }
    }
}

impl Fleet {
    async fn new(ttl: Duration) -> Fleet {
        let idp = MockIdp::start(IdpConfig {
            ttl,
            ..IdpConfig::default()
        })
        .await;
        let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
        let initial_rt = idp.issue_refresh_token();
        Fleet {
            redis: Redis::start().await,
            dir: Scratch::new("replicas"),
            key: keygen(),
            initial_rt,
            sidecars: Vec::new(),
            idp,
            api,
        }
    }

    fn yaml(&self, n: usize, s: &Settings) -> String {
        let kind = match s.kind {
            Kind::ClientCredentials => "oauth2_client_credentials".to_owned(),
            Kind::RefreshToken => format!(
                "oauth2_refresh_token\n    refresh_token: \"{}\"",
                self.initial_rt
            ),
        };
        let url = s.url.clone().unwrap_or_else(|| self.redis.url());
        format!(
            r#"shared:
  redis: {{ url: "{url}", key_prefix: {PREFIX}, lease: {lease}, timeout: 300ms }}
  on_redis_down: {mode}
replay: {{ wait_for_token: {wait} }}
providers:
  main:
    type: {kind}
    token_url: "{token_url}"
    client_id: demo-client
    client_secret: demo-secret
    store: {{ path: "{store}", key: "{key}" }}
    refresh: {{ skew: 0s, min_interval: 0s, jitter: 0%, backoff: [200ms], before_expiry: {before} }}
upstreams:
  - {{ name: api, url: "{api}", provider: main }}
log: {{ access_log: false }}
"#,
            lease = s.lease,
            mode = s.mode,
            wait = s.wait_for_token,
            token_url = self.idp.token_url(),
            store = self.dir.path(&format!("r{n}.tok")).display(),
            key = self.key,
            before = s.before_expiry,
            api = self.api.url(),
        )
    }

    /// Starts `n` sidecars one after the other, each waiting for its first token.
    async fn start(&mut self, n: usize, s: &Settings) {
        for _ in 0..n {
            let i = self.sidecars.len();
            let sc = Sidecar::start_with_env(&self.yaml(i, s), &[]).await;
            wait_valid(&sc).await;
            self.sidecars.push(sc);
        }
    }

    fn generations(&self) -> Vec<u64> {
        self.sidecars.iter().map(generation_now).collect()
    }

    fn logs(&self) -> String {
        self.sidecars
            .iter()
            .enumerate()
            .map(|(i, s)| format!("--- sidecar {i} ---\n{}", s.logs()))
            .collect()
    }
}

fn status_now(sc: &Sidecar) -> serde_json::Value {
    // Blocking on purpose: called from sync helpers inside wait loops.
    let url = sc.admin_url("/v1/token/status");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { reqwest::get(url).await.unwrap().json().await.unwrap() })
    })
    .join()
    .unwrap()
}

fn generation_now(sc: &Sidecar) -> u64 {
    provider_status(&status_now(sc), "main")["generation"]
        .as_u64()
        .unwrap_or(0)
}

async fn wait_valid(sc: &Sidecar) {
    sc.wait_status(Duration::from_secs(15), |v| {
        provider_status(v, "main")["state"] == "valid"
    })
    .await;
}

async fn get(sc: &Sidecar, path: &str) -> (u16, String) {
    let r = reqwest::get(sc.url(path)).await.unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// The refresh tokens the IdP accepted were each accepted once, and none was refused.
fn no_refresh_token_twice(idp: &MockIdp, logs: impl Fn() -> String) {
    let redeemed = idp.redeemed_refresh_tokens();
    let unique: HashSet<_> = redeemed.iter().collect();
    assert_eq!(
        unique.len(),
        redeemed.len(),
        "a refresh token was redeemed twice"
    );
    assert_eq!(
        idp.refused_refresh_tokens(),
        0,
        "the IdP refused a refresh token (invalid_grant)\n{}",
        logs()
    );
}

#[tokio::test]
async fn one_idp_call_per_rotation_across_three_replicas() {
    let mut fleet = Fleet::new(Duration::from_secs(4)).await;
    let s = Settings {
        before_expiry: "2s",
        ..Settings::default()
    };
    fleet.start(3, &s).await;
    // The 2nd and 3rd replica adopted the first one's token.
    assert_eq!(fleet.idp.calls(), 1, "{}", fleet.logs());
    // Proactive refreshes of all three come due together, rotation after rotation: one IdP
    // call each time, and every replica moves to the new generation.
    wait_until(
        Duration::from_secs(40),
        || {
            let gens = fleet.generations();
            let calls = fleet.idp.calls() as u64;
            async move { gens.iter().all(|g| *g == gens[0]) && gens[0] >= 5 && calls == gens[0] }
        },
        || {
            format!(
                "generations {:?}, IdP calls {}\n{}",
                fleet.generations(),
                fleet.idp.calls(),
                fleet.logs()
            )
        },
    )
    .await;
    for sc in &fleet.sidecars {
        let (status, body) = get(sc, "/r").await;
        assert_eq!(status, 200, "{body}");
    }
    // The shared record is sealed: no token lies in Redis in clear.
    let value = fleet.redis.cli(&["GET", &format!("{PREFIX}:token:main")]);
    assert!(value.starts_with("tsk1:"), "{value}");
    let last = fleet.api.requests().pop().unwrap().token.unwrap();
    assert!(!value.contains(&last), "the token lies in Redis in clear");
}

#[tokio::test]
async fn revocation_under_concurrent_requests_costs_one_idp_call_and_no_client_401() {
    let mut fleet = Fleet::new(Duration::from_secs(3600)).await;
    fleet.start(3, &Settings::default()).await;
    assert_eq!(fleet.idp.calls(), 1);
    fleet.idp.registry().revoke_all();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let url = fleet.sidecars[i % 3].url(&format!("/revoked/{i}"));
        tasks.push(tokio::spawn(async move {
            reqwest::get(url).await.unwrap().status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let not_ok: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(not_ok.is_empty(), "{not_ok:?}\n{}", fleet.logs());
    assert_eq!(fleet.idp.calls(), 2, "{}", fleet.logs());
    assert_eq!(fleet.generations(), vec![2, 2, 2]);
}

#[tokio::test]
async fn rotating_refresh_tokens_are_never_spent_twice_over_thirty_rotations() {
    let mut fleet = Fleet::new(Duration::from_secs(1)).await;
    let s = Settings {
        kind: Kind::RefreshToken,
        before_expiry: "500ms",
        ..Settings::default()
    };
    fleet.start(3, &s).await;
    wait_until(
        Duration::from_secs(90),
        || {
            let top = fleet.generations().into_iter().max().unwrap_or(0);
            async move { top >= 31 }
        },
        || format!("generations {:?}\n{}", fleet.generations(), fleet.logs()),
    )
    .await;
    no_refresh_token_twice(&fleet.idp, || fleet.logs());
    let top = fleet.generations().into_iter().max().unwrap();
    let calls = fleet.idp.calls() as u64;
    // A rotation may be in flight while this reads: at most one call ahead.
    assert!(
        calls == top || calls == top + 1,
        "IdP calls {calls}, generation {top}\n{}",
        fleet.logs()
    );
    assert!(!fleet.logs().contains("invalid_grant"), "{}", fleet.logs());
}

#[tokio::test]
async fn a_killed_lock_holder_is_replaced_after_its_lease_and_no_refresh_token_is_spent_twice() {
    let mut fleet = Fleet::new(Duration::from_secs(3600)).await;
    let s = Settings {
        kind: Kind::RefreshToken,
        ..Settings::default()
    };
    fleet.start(3, &s).await;
    assert_eq!(fleet.idp.calls(), 1);
    // The IdP now takes far longer than the 1 s lease.
    fleet.idp.set_latency(Duration::from_secs(30));
    let holder = fleet.sidecars[0].admin_url("/v1/token/refresh?provider=main");
    let stuck = tokio::spawn(async move {
        let _ = reqwest::Client::new().post(holder).send().await;
    });
    wait_until(
        Duration::from_secs(10),
        || {
            let calls = fleet.idp.calls();
            async move { calls == 2 }
        },
        || "the holder never called the IdP".into(),
    )
    .await;
    // Another replica wants a new token while the holder's call runs past its lease.
    let waiter = fleet.sidecars[1].admin_url("/v1/token/refresh?provider=main");
    let waiting = tokio::spawn(async move {
        reqwest::Client::new()
            .post(waiter)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    // The holder renews its lease: four renewals take longer than the lease itself.
    wait_until(
        Duration::from_secs(10),
        || {
            let text = fleet.sidecars[0].admin_url("/metrics");
            async move {
                let body = reqwest::get(text).await.unwrap().text().await.unwrap();
                renewals(&body) >= 4.0
            }
        },
        || format!("the holder did not renew its lease\n{}", fleet.logs()),
    )
    .await;
    assert_eq!(
        fleet.idp.calls(),
        2,
        "a replica called the IdP while the lease was held"
    );
    // The holder dies mid-call; the IdP answers quickly again.
    fleet.sidecars[0].signal("KILL");
    stuck.abort();
    fleet.idp.set_latency(Duration::ZERO);
    let status = waiting.await.unwrap();
    assert_eq!(status, 200, "{}", fleet.logs());
    assert_eq!(fleet.idp.calls(), 3, "{}", fleet.logs());
    no_refresh_token_twice(&fleet.idp, || fleet.logs());
    // The third replica adopts that token without an IdP call.
    let third = fleet.sidecars[2]
        .admin_post("/v1/token/refresh?provider=main")
        .await;
    assert_eq!(third.status(), 200);
    assert_eq!(fleet.idp.calls(), 3, "{}", fleet.logs());
    assert_eq!(
        generation_now(&fleet.sidecars[1]),
        generation_now(&fleet.sidecars[2])
    );
}

fn renewals(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("sidecar_shared_ops_total")
                && l.contains("op=\"renew\"")
                && l.contains("result=\"ok\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_wrong_redis_password_at_start_is_not_fatal_and_never_logged() {
    let mut fleet = Fleet::new(Duration::from_secs(3600)).await;
    let guarded = Redis::with_password("right-pw-4471").await;
    let s = Settings {
        url: Some(format!(
            "redis://:${{env:REDIS_PW}}@127.0.0.1:{}/0",
            guarded.port
        )),
        ..Settings::default()
    };
    let yaml = fleet.yaml(0, &s);
    let sc = Sidecar::start_with_env(&yaml, &[("REDIS_PW", "wrong-pw-93817")]).await;
    // on_redis_down: local — it goes on alone.
    wait_valid(&sc).await;
    let (status, body) = get(&sc, "/alone").await;
    assert_eq!(status, 200, "{body}");
    let st = status_now(&sc);
    assert_eq!(st["shared"], "down", "{st}");
    assert_eq!(provider_status(&st, "main")["shared"], "down");
    let metrics = sc.admin_text("/metrics").await;
    assert!(metrics.contains("sidecar_shared_backend_up 0"), "{metrics}");
    wait_until(
        Duration::from_secs(10),
        || {
            let logs = sc.logs();
            async move { logs.contains("cannot connect to the shared redis") }
        },
        || format!("the reason was not logged\n{}", sc.logs()),
    )
    .await;
    let logs = sc.logs();
    let reason = logs
        .lines()
        .find(|l| l.contains("cannot connect to the shared redis"))
        .unwrap();
    assert!(reason.contains("authentication failed"), "{reason}");
    for text in [&logs, &st.to_string(), &metrics] {
        assert!(!text.contains("wrong-pw-93817"), "password leaked: {text}");
    }
    fleet.sidecars.push(sc);
}

#[tokio::test]
async fn garbage_and_foreign_values_under_the_prefix_are_ignored_and_overwritten() {
    let mut fleet = Fleet::new(Duration::from_secs(3600)).await;
    let token_key = format!("{PREFIX}:token:main");
    let lock_key = format!("{PREFIX}:lock:main");
    // A foreign lock without expiry and a damaged token value.
    fleet.redis.cli(&["SET", &lock_key, "someone-else"]);
    fleet
        .redis
        .cli(&["SET", &token_key, "tsk1:7:e:bm90LWEtdG9rZW4="]);
    fleet.start(1, &Settings::default()).await;
    let (status, body) = get(&fleet.sidecars[0], "/first").await;
    assert_eq!(status, 200, "{body}");
    let value = fleet.redis.cli(&["GET", &token_key]);
    assert!(value.starts_with("tsk1:8:e:"), "not overwritten: {value}");
    assert!(fleet.sidecars[0].logs().contains("damaged or not ours"));
    // Another type under the key: overwritten as well; the second replica starts clean.
    fleet.redis.cli(&["DEL", &token_key]);
    fleet.redis.cli(&["HSET", &token_key, "a", "b"]);
    fleet.start(1, &Settings::default()).await;
    let value = fleet.redis.cli(&["GET", &token_key]);
    assert!(value.starts_with("tsk1:"), "{value}");
    let (status, body) = get(&fleet.sidecars[1], "/second").await;
    assert_eq!(status, 200, "{body}");
    // Nothing that was under the prefix ever reached the upstream as a token.
    for r in fleet.api.requests() {
        let t = r.token.unwrap_or_default();
        assert!(fleet.idp.registry().is_valid(&t), "{t}");
    }
}

/// Sends GETs round-robin over the sidecars until stopped; counts statuses other than 200.
fn traffic(
    urls: Vec<String>,
) -> (
    tokio::task::JoinHandle<Vec<u16>>,
    tokio::sync::watch::Sender<bool>,
) {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut bad = Vec::new();
        let mut i = 0usize;
        while !*stopped.borrow_and_update() {
            let url = format!("{}/{i}", urls[i % urls.len()]);
            match client.get(url).send().await {
                Ok(r) if r.status() == 200 => {}
                Ok(r) => bad.push(r.status().as_u16()),
                Err(_) => bad.push(0),
            }
            i += 1;
        }
        bad
    });
    (task, stop)
}

#[tokio::test]
async fn redis_stopped_and_started_under_traffic_local_mode() {
    let mut fleet = Fleet::new(Duration::from_secs(3600)).await;
    fleet.start(2, &Settings::default()).await;
    let urls = fleet.sidecars.iter().map(|s| s.url("/t")).collect();
    let (load, stop) = traffic(urls);
    fleet.redis.stop();
    for sc in &fleet.sidecars {
        sc.wait_status(Duration::from_secs(10), |v| v["shared"] == "down")
            .await;
    }
    // Alone: a refresh still works (its own IdP call).
    let r = fleet.sidecars[0]
        .admin_post("/v1/token/refresh?provider=main")
        .await;
    assert_eq!(r.status(), 200, "{}", fleet.logs());
    assert_eq!(fleet.idp.calls(), 2, "{}", fleet.logs());
    // Redis returns (empty): both pick it up without a restart and share again.
    fleet.redis.start_again().await;
    for sc in &fleet.sidecars {
        sc.wait_status(Duration::from_secs(15), |v| v["shared"] == "connected")
            .await;
    }
    let r = fleet.sidecars[0]
        .admin_post("/v1/token/refresh?provider=main")
        .await;
    assert_eq!(r.status(), 200, "{}", fleet.logs());
    assert_eq!(fleet.idp.calls(), 3);
    let r = fleet.sidecars[1]
        .admin_post("/v1/token/refresh?provider=main")
        .await;
    assert_eq!(r.status(), 200, "{}", fleet.logs());
    assert_eq!(
        fleet.idp.calls(),
        3,
        "the second replica should adopt\n{}",
        fleet.logs()
    );
    let _ = stop.send(true);
    let bad = load.await.unwrap();
    assert!(bad.is_empty(), "{bad:?}\n{}", fleet.logs());
}

#[tokio::test]
async fn redis_stopped_and_started_under_traffic_fail_closed() {
    let mut fleet = Fleet::new(Duration::from_secs(4)).await;
    let s = Settings {
        mode: "fail_closed",
        before_expiry: "1s",
        wait_for_token: "500ms",
        ..Settings::default()
    };
    fleet.start(2, &s).await;
    let urls = fleet.sidecars.iter().map(|s| s.url("/t")).collect();
    let (load, stop) = traffic(urls);
    fleet.redis.stop();
    let calls = fleet.idp.calls();
    // No IdP call while Redis is down; once the token has expired: 503 token_unavailable.
    wait_until(
        Duration::from_secs(15),
        || {
            let sc = &fleet.sidecars[0];
            let url = sc.url("/after-expiry");
            async move {
                let r = reqwest::get(url).await.unwrap();
                r.status() == 503 && r.text().await.unwrap().contains("token_unavailable")
            }
        },
        || format!("no 503 token_unavailable\n{}", fleet.logs()),
    )
    .await;
    let _ = stop.send(true);
    let bad = load.await.unwrap();
    assert!(bad.iter().all(|s| *s == 503), "{bad:?}");
    assert_eq!(
        fleet.idp.calls(),
        calls,
        "fail_closed called the IdP while Redis was down"
    );
    // Redis returns: service resumes without a restart.
    fleet.redis.start_again().await;
    for sc in &fleet.sidecars {
        wait_until(
            Duration::from_secs(20),
            || {
                let url = sc.url("/back");
                async move { reqwest::get(url).await.unwrap().status() == 200 }
            },
            || format!("no recovery after redis returned\n{}", fleet.logs()),
        )
        .await;
    }
}

/// Sends GETs to `url` at `per_second`, paced and without waiting for answers, until stopped;
/// how many it sent.
fn offer(
    url: String,
    per_second: u64,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second as u32);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent = 0u64;
        while !*stopped.borrow_and_update() {
            tick.tick().await;
            let c = client.clone();
            let u = url.clone();
            tokio::spawn(async move {
                let _ = c.get(u).send().await;
            });
            sent += 1;
        }
        sent
    })
}

/// What the upstream saw of a paced load ([`offer`]) over a window.
struct Seen {
    /// The window's length and the upstream's rate in it, per second.
    seconds: f64,
    rate: f64,
    /// Requests the load sent in all.
    offered: u64,
}

impl Seen {
    /// Once `warm` more requests reached the upstream (the initial bursts are past), counts
    /// what it sees over `window`; then stops the load.
    async fn measure(
        fleet: &Fleet,
        warm: usize,
        window: Duration,
        stop: tokio::sync::watch::Sender<bool>,
        load: Vec<tokio::task::JoinHandle<u64>>,
    ) -> Seen {
        let before = fleet.api.count();
        wait_until(
            Duration::from_secs(10),
            || {
                let n = fleet.api.count();
                async move { n >= before + warm }
            },
            || format!("no traffic reached the upstream\n{}", fleet.logs()),
        )
        .await;
        let (start, first) = (std::time::Instant::now(), fleet.api.count());
        tokio::time::sleep(window).await;
        let (seconds, last) = (start.elapsed().as_secs_f64(), fleet.api.count());
        let _ = stop.send(true);
        let mut offered = 0;
        for l in load {
            offered += l.await.unwrap();
        }
        Seen {
            seconds,
            rate: (last - first) as f64 / seconds,
            offered,
        }
    }
}

/// Three replicas sharing the rule `shared50` (50/s, burst 5, reject) on `/limited`.
async fn limited_fleet() -> Fleet {
    let mut fleet = Fleet::new(Duration::from_secs(3600)).await;
    let rule = "rate_limits:\n  - { name: shared50, upstream: api, rate: 50/1s, burst: 5, mode: reject }\n";
    for i in 0..3 {
        let yaml = format!("{}{rule}", fleet.yaml(i, &Settings::default()));
        let sc = Sidecar::start_with_env(&yaml, &[]).await;
        wait_valid(&sc).await;
        fleet.sidecars.push(sc);
    }
    fleet
}

#[tokio::test]
async fn a_shared_rate_limit_holds_for_three_replicas_together() {
    let fleet = limited_fleet().await;
    // Each replica is offered 3x the rule (150/s), paced.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load: Vec<_> = fleet
        .sidecars
        .iter()
        .map(|sc| offer(sc.url("/limited"), 150, stopped.clone()))
        .collect();
    // Past the initial burst, count what the upstream saw over a 20 s window.
    let started = std::time::Instant::now();
    let seen = Seen::measure(&fleet, 100, Duration::from_secs(20), stop, load).await;
    let (seconds, rate) = (seen.seconds, seen.rate);
    let offered_rate = seen.offered as f64 / started.elapsed().as_secs_f64() / 3.0;
    eprintln!("shared rule 50/s over {seconds:.1} s: upstream saw {rate:.2}/s; offered {offered_rate:.1}/s per replica");
    assert!(
        offered_rate > 100.0,
        "the load was too light to test the limit: {offered_rate:.1}/s per replica"
    );
    assert!(
        (rate - 50.0).abs() <= 1.0,
        "combined rate {rate:.2}/s is not within 2 % of 50/s"
    );
}

/// Traffic within a shared rule, spread over three replicas, is all admitted: a replica with a
/// trickle of requests leases one cell at a time instead of 50 ms of the rate, most of which it
/// would drop unspent while the shared budget paid for them.
#[tokio::test]
async fn traffic_within_a_shared_rule_spread_over_three_replicas_is_all_admitted() {
    let fleet = limited_fleet().await;
    // 10 requests a second to each (30/s in all, 60 % of the rule), 30 each.
    let load: Vec<_> = fleet
        .sidecars
        .iter()
        .map(|sc| {
            let url = sc.url("/limited");
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                // A stalled runner must not turn missed ticks into a burst.
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut refused = 0;
                for _ in 0..30 {
                    tick.tick().await;
                    let r = client.get(&url).send().await.unwrap();
                    if r.status() == 429 {
                        refused += 1;
                    }
                }
                refused
            })
        })
        .collect();
    let mut refused = Vec::new();
    for l in load {
        refused.push(l.await.unwrap());
    }
    assert_eq!(
        refused,
        [0, 0, 0],
        "429s per replica at 60 % of a shared rule\n{}",
        fleet.logs()
    );
    assert_eq!(fleet.api.count(), 90);
}

#[tokio::test]
async fn with_redis_down_two_replicas_share_the_rule_between_them() {
    let mut fleet = Fleet::new(Duration::from_secs(3600)).await;
    let rule = "rate_limits:\n  - { name: shared50, upstream: api, rate: 50/1s, burst: 4, mode: reject }\n";
    for i in 0..2 {
        let yaml = format!("{}{rule}", fleet.yaml(i, &Settings::default()));
        let sc = Sidecar::start_with_env(&yaml, &[]).await;
        wait_valid(&sc).await;
        fleet.sidecars.push(sc);
    }
    // Each replica learns from its pings that there are two of them.
    for sc in &fleet.sidecars {
        sc.wait_status(Duration::from_secs(10), |v| v["shared_replicas_seen"] == 2)
            .await;
    }
    fleet.redis.stop();
    for sc in &fleet.sidecars {
        sc.wait_status(Duration::from_secs(10), |v| {
            v["shared"] == "down" && v["shared_replicas_seen"] == 2
        })
        .await;
    }
    // Each replica is offered 3x the rule (150/s) while Redis is down.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = std::time::Instant::now();
    let load: Vec<_> = fleet
        .sidecars
        .iter()
        .map(|sc| offer(sc.url("/alone"), 150, stopped.clone()))
        .collect();
    // Past the initial bursts, count what the upstream saw over a 10 s window.
    let seen = Seen::measure(&fleet, 50, Duration::from_secs(10), stop, load).await;
    let (seconds, rate) = (seen.seconds, seen.rate);
    let offered_rate = seen.offered as f64 / started.elapsed().as_secs_f64() / 2.0;
    eprintln!("redis down, shared rule 50/s over {seconds:.1} s: upstream saw {rate:.2}/s; offered {offered_rate:.1}/s per replica");
    assert!(
        offered_rate > 100.0,
        "the load was too light to test the limit: {offered_rate:.1}/s per replica"
    );
    // Each replica holds 25/s with a burst of 2: over the window at most 50/s plus 4 burst
    // cells (0.4/s over 10 s); 1/s (2 %) leaves room for requests in flight at the window's
    // edges. Without the division each replica would send the whole rule: ~100/s.
    assert!(
        rate <= 51.0,
        "combined rate {rate:.2}/s exceeds the 50/s rule\n{}",
        fleet.logs()
    );
    // And the replicas do use their shares (not divided by more replicas than there are).
    assert!(
        rate >= 48.0,
        "combined rate {rate:.2}/s is well below the rule"
    );
}

#[tokio::test]
async fn check_connects_to_nothing_and_never_prints_the_password() {
    let dir = Scratch::new("replicas-check");
    let file = dir.path("shared.yaml");
    // Nothing listens on port 1: `check` must not care.
    std::fs::write(
        &file,
        "shared:\n  redis: { url: \"redis://:${env:REDIS_PW}@127.0.0.1:1/0\", plaintext_tokens: true }\n\
         providers:\n  main: { type: oauth2_client_credentials, token_url: \"http://127.0.0.1:1/t\", client_id: c, client_secret: s }\n\
         upstreams:\n  - { name: api, url: \"http://127.0.0.1:1\", provider: main }\n",
    )
    .unwrap();
    let path = file.display().to_string();
    let (code, out, err) =
        support::run_cli(&["check", "-c", &path], &[("REDIS_PW", "pw-in-check-5521")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains("pw-in-check-5521") && !err.contains("pw-in-check-5521"),
        "{out}{err}"
    );
    // A shared provider without a store key and without plaintext_tokens is refused, located.
    std::fs::write(
        &file,
        "shared:\n  redis: { url: \"redis://127.0.0.1:1/0\" }\n\
         providers:\n  main: { type: oauth2_client_credentials, token_url: \"http://127.0.0.1:1/t\", client_id: c, client_secret: s }\n",
    )
    .unwrap();
    let (code, _, err) = support::run_cli(&["check", "-c", &path], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("store.key") && err.contains(":4:"), "{err}");
}

#[tokio::test]
async fn an_upstream_retry_after_hold_is_shared_by_the_replicas() {
    let mut fleet = Fleet::new(Duration::from_secs(3600)).await;
    fleet.start(2, &Settings::default()).await;
    let mut busy = Scripted::status(429);
    busy.headers.push(("Retry-After".into(), "3".into()));
    fleet.api.push_script(busy);
    // The first replica meets the 429 (and itself waits it out before retrying).
    let url = fleet.sidecars[0].url("/busy");
    let first = tokio::spawn(async move { reqwest::get(url).await.unwrap().status().as_u16() });
    // The other replica hears of the hold...
    wait_until(
        Duration::from_secs(10),
        || {
            let url = fleet.sidecars[1].admin_url("/metrics");
            async move {
                let body = reqwest::get(url).await.unwrap().text().await.unwrap();
                body.lines().any(|l| {
                    l.starts_with("sidecar_shared_ops_total") && l.contains("op=\"hold_received\"")
                })
            }
        },
        || format!("the hold was not shared\n{}", fleet.logs()),
    )
    .await;
    // ... and keeps its own request back until the hold ends (a lower bound: never flaky).
    let sent = std::time::Instant::now();
    let (status, body) = get(&fleet.sidecars[1], "/after-hold").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        sent.elapsed() >= Duration::from_millis(1500),
        "not held: {:?}",
        sent.elapsed()
    );
    assert_eq!(first.await.unwrap(), 200);
}
