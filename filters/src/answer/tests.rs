use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use sidecar_config::Config;

use super::*;

fn config(extra: &str) -> Config {
    Config::parse(
        &format!("upstreams: [{{ name: a, url: \"http://127.0.0.1:1\" }}]\n{extra}"),
        "t.yaml",
    )
    .unwrap()
}

const MS: fn(u64) -> Duration = Duration::from_millis;

/// A replayable first attempt whose body Pingora holds, carrying generation 5 (the newest).
fn first() -> Attempt {
    Attempt {
        attempts: 1,
        transient: 0,
        replay: Ok(()),
        forced: false,
        body_whole: true,
        token: Some(Generations {
            sent: 5,
            current: 5,
        }),
    }
}

fn answer(status: u16) -> Answer<'static> {
    Answer {
        status,
        www_authenticate: None,
        retry_after: None,
        grpc_status: None,
    }
}

/// Defaults: retry.statuses [502, 503, 504], backoff [100ms, 500ms, 2s], respect_retry_after,
/// max_retry_after 30s; expiry.statuses [401], body_statuses [403] with patterns;
/// max_attempts 3. Jitter 0.5 is the middle of ±20 % (no change).
#[test]
fn after_response_table() {
    let c = config("");
    let policy = Policy {
        retry: &c.retry,
        expiry: &c.upstreams[0].expiry,
        max_attempts: c.replay.max_attempts,
    };
    let no_token = Attempt {
        token: None,
        ..first()
    };
    let invalid = br#"Bearer error="invalid_token""#;
    #[rustfmt::skip]
    let table: Vec<(&str, Answer, Attempt, f64, Step)> = vec![
        ("success passes", answer(200), first(), 0.5, Step::Pass),
        ("redirect passes", answer(302), first(), 0.5, Step::Pass),
        ("502: first backoff step", answer(502), first(), 0.5, Step::Retry { delay: MS(100) }),
        ("502: jitter low end", answer(502), first(), 0.0, Step::Retry { delay: MS(80) }),
        ("502: jitter high end", answer(502), first(), 1.0, Step::Retry { delay: MS(120) }),
        ("502: second step", answer(502), Attempt { transient: 1, ..first() }, 0.5, Step::Retry { delay: MS(500) }),
        ("502: backoff used up", answer(502), Attempt { transient: 3, ..first() }, 0.5, Step::Pass),
        ("502: not replayable", answer(502), Attempt { replay: Err(SkipReason::NonIdempotent), ..first() }, 0.5, Step::Pass),
        ("502: body not in Pingora's buffer", answer(502), Attempt { body_whole: false, ..first() }, 0.5, Step::Pass),
        ("502 without a token is retried too", answer(502), no_token, 0.5, Step::Retry { delay: MS(100) }),
        ("500 is not transient", answer(500), first(), 0.5, Step::Pass),
        ("503 + Retry-After", Answer { retry_after: Some(Duration::from_secs(5)), ..answer(503) }, first(), 0.5, Step::Retry { delay: Duration::from_secs(5) }),
        ("503 + Retry-After beyond the bound", Answer { retry_after: Some(Duration::from_secs(60)), ..answer(503) }, first(), 0.5, Step::Retry { delay: Duration::from_secs(30) }),
        ("429 alone is not transient", answer(429), first(), 0.5, Step::Pass),
        ("429 + Retry-After is", Answer { retry_after: Some(Duration::from_secs(2)), ..answer(429) }, first(), 0.5, Step::Retry { delay: Duration::from_secs(2) }),
        ("429 + Retry-After, backoff used up", Answer { retry_after: Some(Duration::from_secs(2)), ..answer(429) }, Attempt { transient: 3, ..first() }, 0.5, Step::Pass),
        ("401: refresh and replay", answer(401), first(), 0.5, Step::Replay { refresh: true }),
        ("401: a newer token is held", answer(401), Attempt { token: Some(Generations { sent: 5, current: 6 }), ..first() }, 0.5, Step::Replay { refresh: false }),
        ("401: big body, own replay", answer(401), Attempt { body_whole: false, ..first() }, 0.5, Step::OwnReplay { refresh: true }),
        ("401: forced refresh rejected too", answer(401), Attempt { forced: true, attempts: 2, ..first() }, 0.5, Step::Skip(SkipReason::AttemptsExhausted)),
        ("401: attempts used up", answer(401), Attempt { attempts: 3, ..first() }, 0.5, Step::Skip(SkipReason::AttemptsExhausted)),
        ("401: not replayable", answer(401), Attempt { replay: Err(SkipReason::NonIdempotent), ..first() }, 0.5, Step::Skip(SkipReason::NonIdempotent)),
        ("401: route says no", answer(401), Attempt { replay: Err(SkipReason::Disabled), ..first() }, 0.5, Step::Skip(SkipReason::Disabled)),
        ("401 without a token is the client's", answer(401), no_token, 0.5, Step::Pass),
        ("400 + invalid_token", Answer { www_authenticate: Some(invalid), ..answer(400) }, first(), 0.5, Step::Replay { refresh: true }),
        ("403: the body decides", answer(403), first(), 0.5, Step::CheckBody),
        ("403: attempts used up", answer(403), Attempt { attempts: 3, ..first() }, 0.5, Step::Pass),
        ("403: not replayable, nothing counted", answer(403), Attempt { replay: Err(SkipReason::BodyTooLarge), ..first() }, 0.5, Step::Pass),
        ("403 without a token", answer(403), no_token, 0.5, Step::Pass),
        ("404 passes", answer(404), first(), 0.5, Step::Pass),
        ("gRPC UNAUTHENTICATED in a 200: refresh and replay", Answer { grpc_status: Some(b"16"), ..answer(200) }, first(), 0.5, Step::Replay { refresh: true }),
        ("gRPC 16, padded", Answer { grpc_status: Some(b" 16 "), ..answer(200) }, first(), 0.5, Step::Replay { refresh: true }),
        ("gRPC 16: a newer token is held", Answer { grpc_status: Some(b"16"), ..answer(200) }, Attempt { token: Some(Generations { sent: 5, current: 6 }), ..first() }, 0.5, Step::Replay { refresh: false }),
        ("gRPC 16: not replayable", Answer { grpc_status: Some(b"16"), ..answer(200) }, Attempt { replay: Err(SkipReason::NonIdempotent), ..first() }, 0.5, Step::Skip(SkipReason::NonIdempotent)),
        ("gRPC 16: attempts used up", Answer { grpc_status: Some(b"16"), ..answer(200) }, Attempt { attempts: 3, ..first() }, 0.5, Step::Skip(SkipReason::AttemptsExhausted)),
        ("gRPC 16 without a token is the client's", Answer { grpc_status: Some(b"16"), ..answer(200) }, no_token, 0.5, Step::Pass),
        ("gRPC 16: body beyond Pingora's buffer, no own replay (no trailers there)", Answer { grpc_status: Some(b"16"), ..answer(200) }, Attempt { body_whole: false, ..first() }, 0.5, Step::Skip(SkipReason::BodyTooLarge)),
        ("gRPC OK passes", Answer { grpc_status: Some(b"0"), ..answer(200) }, first(), 0.5, Step::Pass),
        ("gRPC PERMISSION_DENIED passes", Answer { grpc_status: Some(b"7"), ..answer(200) }, first(), 0.5, Step::Pass),
        ("gRPC 160 is not 16", Answer { grpc_status: Some(b"160"), ..answer(200) }, first(), 0.5, Step::Pass),
    ];
    for (name, a, state, jitter, want) in table {
        assert_eq!(after_response(&a, &state, &policy, jitter), want, "{name}");
    }
}

#[test]
fn retry_after_is_ignored_when_not_respected() {
    let c = config("retry: { respect_retry_after: false, statuses: [503] }\n");
    let policy = Policy {
        retry: &c.retry,
        expiry: &c.upstreams[0].expiry,
        max_attempts: 3,
    };
    let a = Answer {
        retry_after: Some(Duration::from_secs(9)),
        ..answer(503)
    };
    assert_eq!(
        after_response(&a, &first(), &policy, 0.5),
        Step::Retry { delay: MS(100) }
    );
}

#[test]
fn after_a_body_check_the_generation_rule_decides() {
    let body_expired = Attempt {
        body_whole: false,
        ..first()
    };
    assert_eq!(
        after_expired_token(&body_expired, 3),
        Step::OwnReplay { refresh: true }
    );
    assert_eq!(
        after_expired_token(
            &Attempt {
                attempts: 3,
                ..body_expired
            },
            3
        ),
        Step::Skip(SkipReason::AttemptsExhausted)
    );
    assert_eq!(
        after_expired_token(
            &Attempt {
                token: None,
                ..body_expired
            },
            3
        ),
        Step::Skip(SkipReason::NoToken)
    );
}

#[test]
fn connect_failures() {
    let c = config("");
    let r = &c.retry;
    use ConnectFailure::*;
    #[rustfmt::skip]
    let table = [
        (Timeout, 0, 0.5, (ErrorClass::Timeout, Some(MS(100)))),
        (Other, 0, 0.0, (ErrorClass::Network, Some(MS(80)))),
        (Other, 2, 0.5, (ErrorClass::Network, Some(Duration::from_secs(2)))),
        (Other, 3, 0.5, (ErrorClass::Network, None)),
        (Timeout, 3, 0.5, (ErrorClass::Timeout, None)),
        (Permanent, 0, 0.5, (ErrorClass::Network, None)),
    ];
    for (failure, done, jitter, want) in table {
        assert_eq!(
            after_connect_failure(failure, done, r, jitter),
            want,
            "{failure:?} {done}"
        );
    }
    let none = config("retry: { backoff: [] }\n");
    assert_eq!(
        after_connect_failure(Other, 0, &none.retry, 0.5),
        (ErrorClass::Network, None)
    );
}

#[test]
fn error_classes() {
    let cases = [
        (200, None),
        (399, None),
        (401, Some("auth")),
        (403, Some("auth")),
        (404, Some("client")),
        (429, Some("rate_limit")),
        (500, Some("server")),
        (503, Some("server")),
        (600, None),
    ];
    for (status, want) in cases {
        assert_eq!(
            ErrorClass::of_status(status).map(ErrorClass::as_str),
            want,
            "{status}"
        );
    }
    assert!(ErrorClass::Server.is_upstream_failure());
    assert!(ErrorClass::Network.is_upstream_failure());
    assert!(ErrorClass::Timeout.is_upstream_failure());
    assert!(!ErrorClass::Auth.is_upstream_failure());
    assert!(!ErrorClass::RateLimit.is_upstream_failure());
}

#[test]
fn retry_after_only_on_429_and_503() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_470);
    let date = b"Wed, 21 Oct 2015 07:28:00 GMT";
    assert_eq!(retry_after_of(200, Some(b"5"), now), None);
    assert_eq!(retry_after_of(502, Some(b"5"), now), None);
    assert_eq!(
        retry_after_of(429, Some(b"5"), now),
        Some(Duration::from_secs(5))
    );
    assert_eq!(
        retry_after_of(503, Some(date), now),
        Some(Duration::from_secs(10))
    );
    assert_eq!(retry_after_of(503, None, now), None);
    assert_eq!(retry_after_of(429, Some(b"soon"), now), None);
    assert_eq!(retry_after_of(429, Some(b"\xff5"), now), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Any header bytes, any state: a step, never a panic; a retry never waits longer than the
    /// longest backoff step with jitter or `max_retry_after`, and only a replayable request
    /// whose body Pingora holds is retried or replayed by Pingora.
    #[test]
    fn any_answer_gets_a_bounded_step(
        status in 100u16..700,
        www in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..100)),
        retry_after in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        attempts in 0u32..6,
        transient in 0u32..6,
        replayable in any::<bool>(),
        forced in any::<bool>(),
        body_whole in any::<bool>(),
        token in proptest::option::of((0u64..4, 0u64..4)),
        jitter in 0.0f64..1.0,
    ) {
        static DEFAULTS: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
        let c = DEFAULTS.get_or_init(|| config(""));
        let policy = Policy { retry: &c.retry, expiry: &c.upstreams[0].expiry, max_attempts: 3 };
        let a = Answer {
            status,
            www_authenticate: www.as_deref(),
            retry_after: retry_after_of(status, retry_after.as_deref(), SystemTime::now()),
            grpc_status: None,
        };
        let state = Attempt {
            attempts,
            transient,
            replay: if replayable { Ok(()) } else { Err(SkipReason::NonIdempotent) },
            forced,
            body_whole,
            token: token.map(|(sent, current)| Generations { sent, current }),
        };
        match after_response(&a, &state, &policy, jitter) {
            Step::Retry { delay } => {
                prop_assert!(replayable && body_whole && (transient as usize) < c.retry.backoff.len());
                // A Retry-After is capped at max_retry_after (30 s); a backoff step (at most
                // 2 s) at +20 % jitter.
                let bound = if a.retry_after.is_some() {
                    Duration::from_secs(30)
                } else {
                    Duration::from_millis(2400)
                };
                prop_assert!(delay <= bound, "{delay:?}");
            }
            Step::Replay { .. } => prop_assert!(replayable && body_whole && token.is_some()),
            Step::OwnReplay { .. } | Step::CheckBody => prop_assert!(replayable && token.is_some()),
            Step::Pass | Step::Skip(_) => {}
        }
    }
}
