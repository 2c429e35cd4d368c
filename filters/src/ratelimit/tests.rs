use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, Method};
use sidecar_config::{Config, RateLimit};
use tokio::time::{advance, sleep, Instant};

use super::*;

fn rules(yaml_rules: &str) -> Vec<RateLimit> {
    let text = format!(
        "upstreams:\n  - {{ name: api, url: \"http://127.0.0.1:1\" }}\n  - {{ name: other, url: \"http://127.0.0.1:2\" }}\nrate_limits:\n{yaml_rules}"
    );
    Config::parse(&text, "t.yaml").unwrap().rate_limits
}

fn limiter(yaml_rules: &str) -> Arc<RateLimiter> {
    Arc::new(RateLimiter::new(&rules(yaml_rules)))
}

fn get<'a>(path: &'a str) -> RateRequest<'a> {
    RateRequest {
        upstream: "api",
        method: &Method::GET,
        path,
        client_ip: None,
        headers: None,
    }
}

async fn admit(l: &RateLimiter, path: &str) -> Admission {
    l.admit(&get(path)).await
}

fn is_go(a: &Admission) -> bool {
    matches!(a, Admission::Go { .. })
}

fn rejected_by(a: &Admission) -> Option<(&str, Duration)> {
    match a {
        Admission::Reject { rule, retry_after } => Some((rule, *retry_after)),
        Admission::Go { .. } => None,
    }
}

/// Spawns `n` requests at the same instant; returns each one's answer and when it came.
async fn burst(l: &Arc<RateLimiter>, path: &'static str, n: usize) -> Vec<(Admission, Instant)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let l = l.clone();
            tokio::spawn(async move {
                let a = admit(&l, path).await;
                (a, Instant::now())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Most admissions within any window of `width` starting at an admission.
fn max_in_window(times: &[Instant], width: Duration) -> usize {
    let mut sorted = times.to_vec();
    sorted.sort();
    (0..sorted.len())
        .map(|i| {
            sorted[i..]
                .iter()
                .take_while(|t| **t < sorted[i] + width)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(start_paused = true)]
async fn wait_mode_spreads_sixty_requests_at_the_rate() {
    let l = limiter("  - { name: r, upstream: api, rate: 20/1s, burst: 1 }\n");
    let start = Instant::now();
    let results = burst(&l, "/x", 60).await;
    assert!(results.iter().all(|(a, _)| is_go(a)), "all admitted");
    let times: Vec<Instant> = results.iter().map(|(_, t)| *t).collect();
    assert!(max_in_window(&times, Duration::from_secs(1)) <= 21);
    let first = *times.iter().min().unwrap();
    let last = *times.iter().max().unwrap();
    assert_eq!(first, start, "the first goes at once");
    assert!(
        last - first >= Duration::from_millis(2500),
        "{:?}",
        last - first
    );
    // Exactly one slot per 50 ms: 59 intervals.
    assert!(
        last - first < Duration::from_millis(2960),
        "{:?}",
        last - first
    );
    let waited: Vec<Duration> = results
        .iter()
        .filter_map(|(a, _)| match a {
            Admission::Go { waited, rules } => {
                assert_eq!(rules.len(), 1);
                Some(*waited)
            }
            _ => None,
        })
        .collect();
    assert!(waited.iter().any(|w| *w >= Duration::from_millis(2900)));
}

#[tokio::test(start_paused = true)]
async fn reject_mode_refuses_the_surplus_with_retry_after() {
    let l = limiter("  - { name: r, upstream: api, rate: 3/10s, burst: 3, mode: reject }\n");
    let results = burst(&l, "/x", 10).await;
    assert_eq!(results.iter().filter(|(a, _)| is_go(a)).count(), 3);
    for (a, _) in results.iter().filter(|(a, _)| !is_go(a)) {
        let (rule, after) = rejected_by(a).unwrap();
        assert_eq!(rule, "r");
        // Next cell in 10s/3 = 3.33 s: Retry-After rounds up to 4.
        assert_eq!(after, Duration::from_nanos(3_333_333_333));
        assert_eq!(retry_after_secs(after), 4);
    }
    // Nothing was consumed by the refusals: one cell is back 3.33 s later.
    advance(Duration::from_nanos(3_333_333_333)).await;
    assert!(is_go(&admit(&l, "/x").await));
    assert!(!is_go(&admit(&l, "/x").await));
}

#[tokio::test(start_paused = true)]
async fn the_stricter_rule_governs_and_does_not_drain_the_looser() {
    let l = limiter(
        "  - { name: strict, upstream: api, rate: 2/1s, mode: reject, match: { path: \"/a/**\" } }\n  - { name: loose, upstream: api, rate: 10/1s, mode: reject }\n",
    );
    let a = burst(&l, "/a/x", 6).await;
    assert_eq!(a.iter().filter(|(a, _)| is_go(a)).count(), 2);
    assert!(a
        .iter()
        .filter_map(|(a, _)| rejected_by(a))
        .all(|(rule, _)| rule == "strict"));
    // The loose rule lost only the two that went: eight more fit, the ninth does not.
    let b = burst(&l, "/b", 9).await;
    assert_eq!(b.iter().filter(|(a, _)| is_go(a)).count(), 8);
    assert_eq!(rejected_by(&b[8].0).map(|r| r.0), Some("loose"));
}

#[tokio::test(start_paused = true)]
async fn overlapping_wait_rules_pace_at_the_stricter() {
    let l = limiter(
        "  - { name: strict, upstream: api, rate: 2/1s, burst: 1, match: { methods: [GET] } }\n  - { name: loose, upstream: api, rate: 100/1s, burst: 1 }\n",
    );
    let start = Instant::now();
    let r = burst(&l, "/x", 5).await;
    let last = r.iter().map(|(_, t)| *t).max().unwrap();
    assert!(r.iter().all(|(a, _)| is_go(a)));
    assert_eq!(
        last - start,
        Duration::from_secs(2),
        "4 intervals of 500 ms"
    );
}

#[tokio::test(start_paused = true)]
async fn a_wait_beyond_max_wait_is_refused() {
    let l = limiter("  - { name: r, upstream: api, rate: 1/1s, burst: 1, max_wait: 2s }\n");
    let r = burst(&l, "/x", 4).await;
    let go = r.iter().filter(|(a, _)| is_go(a)).count();
    assert_eq!(go, 3, "now, +1 s, +2 s");
    let refused: Vec<_> = r.iter().filter_map(|(a, _)| rejected_by(a)).collect();
    assert_eq!(refused, vec![("r", Duration::from_secs(3))]);
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_in_arrival_order() {
    let l = limiter("  - { name: r, upstream: api, rate: 10/1s, burst: 1 }\n");
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..30 {
        let (l, order) = (l.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            assert!(is_go(&admit(&l, "/x").await));
            order.lock().unwrap().push(i);
        }));
        // Arrivals at 3× the rate.
        sleep(Duration::from_millis(33)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(order, (0..30).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_gives_up_its_place() {
    let l = limiter("  - { name: r, upstream: api, rate: 1/1s, burst: 1, max_wait: 10s }\n");
    let start = Instant::now();
    assert!(is_go(&admit(&l, "/x").await));
    let l2 = l.clone();
    let b = tokio::spawn(async move { admit(&l2, "/x").await });
    sleep(Duration::from_millis(10)).await;
    let l3 = l.clone();
    let c = tokio::spawn(async move {
        let a = admit(&l3, "/x").await;
        (a, Instant::now())
    });
    sleep(Duration::from_millis(100)).await;
    b.abort();
    assert!(b.await.unwrap_err().is_cancelled());
    let (a, at) = c.await.unwrap();
    assert!(is_go(&a));
    assert_eq!(
        at - start,
        Duration::from_secs(1),
        "took b's slot, not the one after"
    );
}

/// 3× the rate for 60 s: admissions match the configured rate within ±1 %. The interval
/// (33.3 ms) does not fall on the timer's millisecond ticks, so every wake-up is late.
#[tokio::test(start_paused = true)]
async fn three_times_overload_delivers_the_configured_rate() {
    let l = limiter("  - { name: r, upstream: api, rate: 30/1s, burst: 1, max_wait: 2s }\n");
    let start = Instant::now();
    let end = start + Duration::from_secs(60);
    let admitted = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let gap = Duration::from_secs(1) / 90;
    let mut next = start;
    while next < end {
        tokio::time::sleep_until(next).await;
        let (l, admitted) = (l.clone(), admitted.clone());
        tasks.push(tokio::spawn(async move {
            if is_go(&admit(&l, "/x").await) {
                admitted.lock().unwrap().push(Instant::now());
            }
        }));
        next += gap;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let times = admitted.lock().unwrap().clone();
    let in_run = times.iter().filter(|t| **t < end).count();
    let want = 30.0 * 60.0;
    assert!(
        (in_run as f64 - want).abs() <= want * 0.01,
        "admitted {in_run} in 60 s, want {want} ± 1 %"
    );
    assert!(max_in_window(&times, Duration::from_secs(1)) <= 31);
}

#[tokio::test(start_paused = true)]
async fn keyed_limits_are_separate_and_capped_by_lru() {
    let l = limiter(
        "  - { name: r, upstream: api, rate: 1/10s, burst: 1, mode: reject, key: { header: X-Tenant }, max_keys: 2 }\n",
    );
    let tenant = |t: &'static str| {
        let mut h = HeaderMap::new();
        h.insert("x-tenant", HeaderValue::from_static(t));
        h
    };
    let ask = |h: HeaderMap| {
        let l = l.clone();
        async move {
            l.admit(&RateRequest {
                headers: Some(&h),
                ..get("/x")
            })
            .await
        }
    };
    assert!(is_go(&ask(tenant("a")).await));
    assert!(is_go(&ask(tenant("b")).await), "b has its own bucket");
    assert!(!is_go(&ask(tenant("b")).await));
    assert!(
        !is_go(&ask(tenant("a")).await),
        "a is limited; b is now least recent"
    );
    assert_eq!(l.keys("r"), Some(2));
    assert!(is_go(&ask(tenant("c")).await), "c evicts b");
    assert_eq!(l.keys("r"), Some(2));
    assert!(!is_go(&ask(tenant("a")).await), "a kept its state");
    assert!(
        is_go(&ask(tenant("b")).await),
        "b was forgotten: fresh bucket"
    );
    // Without the header, requests share one bucket.
    assert!(is_go(&ask(HeaderMap::new()).await));
    assert!(!is_go(&ask(HeaderMap::new()).await));
}

#[tokio::test(start_paused = true)]
async fn client_ip_keys() {
    let l = limiter(
        "  - { name: r, upstream: api, rate: 1/10s, burst: 1, mode: reject, key: { client_ip: true } }\n",
    );
    let from = |ip: &str| RateRequest {
        client_ip: Some(ip.parse::<IpAddr>().unwrap()),
        ..get("/x")
    };
    assert!(is_go(&l.admit(&from("10.0.0.1")).await));
    assert!(is_go(&l.admit(&from("10.0.0.2")).await));
    assert!(!is_go(&l.admit(&from("10.0.0.1")).await));
}

#[tokio::test(start_paused = true)]
async fn requests_the_rules_do_not_match_go_at_once() {
    let l = limiter(
        "  - { name: r, upstream: api, rate: 1/10s, burst: 1, mode: reject, match: { methods: [POST], path: \"/api/*\" } }\n",
    );
    let post = |path| RateRequest {
        method: &Method::POST,
        ..get(path)
    };
    assert!(is_go(&l.admit(&post("/api/a")).await));
    assert!(!is_go(&l.admit(&post("/api/a")).await));
    // Another method, a path two segments deep, another upstream: not counted.
    assert_eq!(
        admit(&l, "/api/a").await,
        Admission::Go {
            waited: Duration::ZERO,
            rules: vec![]
        }
    );
    assert!(is_go(&l.admit(&post("/api/a/b")).await));
    let other = RateRequest {
        upstream: "other",
        ..post("/api/a")
    };
    assert!(is_go(&l.admit(&other).await));
}

#[tokio::test(start_paused = true)]
async fn reload_keeps_unchanged_rules_and_resets_changed_ones() {
    let before = "  - { name: same, upstream: api, rate: 1/10s, burst: 1, mode: reject, match: { path: \"/s\" } }\n  - { name: changed, upstream: api, rate: 1/10s, burst: 1, mode: reject, match: { path: \"/c\" } }\n";
    let after = "  - { name: same, upstream: api, rate: 1/10s, burst: 1, mode: reject, match: { path: \"/s\" } }\n  - { name: changed, upstream: api, rate: 2/10s, burst: 1, mode: reject, match: { path: \"/c\" } }\n";
    let old = limiter(before);
    assert!(is_go(&admit(&old, "/s").await));
    assert!(is_go(&admit(&old, "/c").await));
    let new = old.rebuild(&rules(after));
    assert!(new.shares_rule_with(&old, "same"));
    assert!(!new.shares_rule_with(&old, "changed"));
    assert!(
        !is_go(&admit(&new, "/s").await),
        "state survived the reload"
    );
    assert!(is_go(&admit(&new, "/c").await), "changed rule starts fresh");
}

#[test]
fn retry_after_values() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 2015-10-21 07:28:00
    assert_eq!(
        parse_retry_after("120", now),
        Some(Duration::from_secs(120))
    );
    assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
    assert_eq!(
        parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
        Some(Duration::ZERO),
        "a past date means now"
    );
    for bad in ["", "soon", "-5", "1.5", "99999999999999999999999"] {
        assert_eq!(parse_retry_after(bad, now), None, "{bad}");
    }
    assert_eq!(retry_after_secs(Duration::from_millis(200)), 1);
    assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
    assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    assert_eq!(retry_after_secs(Duration::ZERO), 1);
}

#[tokio::test(start_paused = true)]
async fn upstream_holds_are_bounded_and_expire() {
    let holds = UpstreamHolds::new(Duration::from_secs(2));
    let now = Instant::now();
    assert_eq!(holds.held_until("api"), None);
    let held = holds.hold_until("api", now + Duration::from_secs(5));
    assert_eq!(held, now + Duration::from_secs(2), "capped at the bound");
    assert_eq!(
        holds.hold_until("api", now + Duration::from_secs(1)),
        held,
        "never shrinks"
    );
    assert_eq!(holds.held_until("api"), Some(held));
    assert_eq!(holds.held_until("other"), None);
    assert_eq!(
        holds.hold_for("other", Duration::from_secs(u64::MAX)),
        now + Duration::from_secs(2),
        "no overflow, still bounded"
    );
    advance(Duration::from_secs(2)).await;
    assert_eq!(holds.held_until("api"), None);
}

/// Waiters polled in the reverse of their arrival order still go in arrival order: each one was
/// given its own slot behind those ahead of it, rather than racing for the next free one.
#[tokio::test(start_paused = true)]
async fn order_does_not_depend_on_who_is_polled_first() {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    let l = limiter("  - { name: r, upstream: api, rate: 10/1s, burst: 1 }\n");
    let mut futs: Vec<Pin<Box<dyn Future<Output = Admission> + '_>>> =
        (0..10).map(|_| Box::pin(admit(&l, "/x")) as _).collect();
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut done = vec![false; futs.len()];
    let mut order = Vec::new();
    let mut poll = |i: usize, futs: &mut Vec<Pin<Box<dyn Future<Output = Admission> + '_>>>| {
        if !done[i] {
            if let Poll::Ready(a) = futs[i].as_mut().poll(&mut cx) {
                assert!(is_go(&a));
                done[i] = true;
                order.push(i);
            }
        }
    };
    for i in 0..10 {
        poll(i, &mut futs);
    }
    for _ in 0..2000 {
        advance(Duration::from_millis(1)).await;
        for i in (0..10).rev() {
            poll(i, &mut futs);
        }
    }
    assert_eq!(order, (0..10).collect::<Vec<_>>());
}

/// Requests held back by a strict rule do not hold up traffic that only a looser, overlapping
/// rule counts.
#[tokio::test(start_paused = true)]
async fn waiters_of_one_rule_do_not_block_another() {
    let l = limiter(
        "  - { name: h, upstream: api, rate: 1/10s, burst: 1, match: { path: \"/h/**\" } }\n  - { name: g, upstream: api, rate: 100/1s }\n",
    );
    let h: Vec<_> = (0..3)
        .map(|_| {
            let l = l.clone();
            tokio::spawn(async move { admit(&l, "/h/x").await })
        })
        .collect();
    sleep(Duration::from_millis(1)).await;
    let g = burst(&l, "/g", 50).await;
    assert!(g
        .iter()
        .all(|(a, _)| matches!(a, Admission::Go { waited, .. } if waited.is_zero())));
    let mut waited = Vec::new();
    for t in h {
        match t.await.unwrap() {
            Admission::Go { waited: w, .. } => waited.push(w),
            other => panic!("{other:?}"),
        }
    }
    waited.sort();
    assert_eq!(
        waited,
        [0, 10, 20].map(Duration::from_secs).to_vec(),
        "h paced at 1/10s"
    );
}

#[test]
fn metrics_count_delays_rejections_and_waits_per_rule() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let l = limiter("  - { name: r, upstream: api, rate: 1/1s, burst: 1, max_wait: 1s }\n");
            let answers = futures::future::join_all((0..3).map(|_| admit(&l, "/x"))).await;
            assert_eq!(answers.iter().filter(|a| is_go(a)).count(), 2);
        });
    });
    let mut seen = std::collections::HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let labels: Vec<_> = key.labels().map(|l| (l.key(), l.value())).collect();
        assert_eq!(labels, vec![("rule", "r")], "{key:?}");
        seen.insert(key.name().to_string(), value);
    }
    assert_eq!(
        seen.get("sidecar_ratelimit_delayed_total"),
        Some(&DebugValue::Counter(1))
    );
    assert_eq!(
        seen.get("sidecar_ratelimit_rejected_total"),
        Some(&DebugValue::Counter(1))
    );
    match seen.get("sidecar_ratelimit_wait_seconds") {
        Some(DebugValue::Histogram(v)) => {
            let mut v: Vec<f64> = v.iter().map(|x| x.into_inner()).collect();
            v.sort_by(f64::total_cmp);
            assert_eq!(v, vec![0.0, 1.0]);
        }
        other => panic!("{other:?}"),
    }
}

mod retry_after_properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        /// Any header text: a delay or `None`, never a panic; and whatever delay it gives, a
        /// hold placed with it stays within `max_retry_after`.
        #[test]
        fn any_value_parses_or_is_refused_and_holds_stay_bounded(value in "\\PC{0,40}") {
            let now = SystemTime::now();
            if let Some(d) = parse_retry_after(&value, now) {
                let holds = UpstreamHolds::new(Duration::from_secs(30));
                let until = holds.hold_for("api", d);
                prop_assert!(until <= Instant::now() + Duration::from_secs(30));
            }
        }

        #[test]
        fn seconds_of_any_size(n in any::<u64>()) {
            prop_assert_eq!(
                parse_retry_after(&n.to_string(), SystemTime::now()),
                Some(Duration::from_secs(n))
            );
        }

        #[test]
        fn digits_beyond_u64_are_refused(extra in "[1-9][0-9]{20,39}") {
            prop_assert_eq!(parse_retry_after(&extra, SystemTime::now()), None);
        }
    }
}
