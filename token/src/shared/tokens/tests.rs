use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use sidecar_config::{OnRedisDown, Secret, Shared};

use super::*;

/// A raw 32-byte key: no KDF, so the tests stay fast.
const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn backend() -> SharedBackend {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = Shared {
        url: Secret::new("redis://127.0.0.1:1/0"),
        shown_url: "redis://127.0.0.1:1/0".into(),
        key_prefix: "t".into(),
        on_redis_down: OnRedisDown::Local,
        plaintext_tokens: false,
        timeout: Duration::from_millis(100),
        lease: Duration::from_secs(1),
    };
    let b = SharedBackend::start(&config, rt.handle()).unwrap();
    // The runtime (and with it the connect tasks) is dropped: nothing here talks to Redis.
    drop(rt);
    b
}

fn record(generation: u64) -> Record {
    let now = Record::unix_ms(SystemTime::now());
    Record {
        access_token: format!("tok-{generation}"),
        refresh_token: Some(format!("rt-{generation}")),
        generation,
        issued_at_ms: now,
        expires_at_ms: now + 60_000,
    }
}

#[test]
fn sealed_records_round_trip_and_never_show_the_token() {
    let shared = SharedTokens::new(backend(), "main", Some(KEY), Duration::from_secs(1));
    let value = shared.encode(&record(7)).unwrap();
    assert!(value.starts_with("tsk1:7:e:"), "{value}");
    assert!(!value.contains("tok-7") && !value.contains("rt-7"));
    let b64 = value.rsplit(':').next().unwrap();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert!(!String::from_utf8_lossy(&raw).contains("tok-7"));
    let (view, back) = shared.parse(value.as_bytes());
    assert_eq!(
        view,
        View::Valid {
            generation: 7,
            usable: true
        }
    );
    let back = back.unwrap();
    assert_eq!(
        (
            back.access_token.as_str(),
            back.refresh_token.as_deref(),
            back.generation
        ),
        ("tok-7", Some("rt-7"), 7)
    );
}

#[test]
fn plain_records_round_trip_only_when_configured_plain() {
    let plain = SharedTokens::new(backend(), "main", None, Duration::from_secs(1));
    let value = plain.encode(&record(3)).unwrap();
    assert!(value.starts_with("tsk1:3:p:"));
    assert!(matches!(
        plain.parse(value.as_bytes()).0,
        View::Valid { generation: 3, .. }
    ));
    // A replica with a key does not take a plain value as its own (and the other way round).
    let sealed = SharedTokens::new(backend(), "main", Some(KEY), Duration::from_secs(1));
    assert_eq!(
        sealed.parse(value.as_bytes()).0,
        View::Damaged { generation: 3 }
    );
    let sealed_value = sealed.encode(&record(4)).unwrap();
    assert_eq!(
        plain.parse(sealed_value.as_bytes()).0,
        View::Damaged { generation: 4 }
    );
}

#[test]
fn foreign_damaged_and_other_provider_values_are_damaged() {
    let main = SharedTokens::new(backend(), "main", Some(KEY), Duration::from_secs(1));
    let other = SharedTokens::new(backend(), "other", Some(KEY), Duration::from_secs(1));
    let of_other = other.encode(&record(5)).unwrap();
    assert_eq!(
        main.parse(of_other.as_bytes()).0,
        View::Damaged { generation: 5 }
    );
    for (value, generation) in [
        (&b"hello"[..], 0),
        (b"tsk1:", 0),
        (b"tsk1:12:", 12),
        (b"tsk1:12:e:!!!", 12),
        (b"tsk1:99999999999999999999:e:AAAA", 0),
        (b"tsk1:-1:e:AAAA", 0),
        (b"\xff\xfe", 0),
    ] {
        assert_eq!(
            main.parse(value).0,
            View::Damaged { generation },
            "{value:?}"
        );
    }
    // A sealed value whose visible generation was changed: the sealed one is authoritative.
    let forged = main
        .encode(&record(5))
        .unwrap()
        .replacen("tsk1:5:", "tsk1:50:", 1);
    assert_eq!(
        main.parse(forged.as_bytes()).0,
        View::Damaged { generation: 50 }
    );
}

#[test]
fn an_expired_shared_record_is_not_usable() {
    let shared = SharedTokens::new(backend(), "main", Some(KEY), Duration::from_secs(1));
    let mut r = record(2);
    r.expires_at_ms = r.issued_at_ms.saturating_sub(1);
    let value = shared.encode(&r).unwrap();
    assert_eq!(
        shared.parse(value.as_bytes()).0,
        View::Valid {
            generation: 2,
            usable: false
        }
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Whatever lies under the key, reading it never panics, and only a value sealed by this
    /// provider with this key is ever taken as a token.
    #[test]
    fn any_value_reads_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), head in "(tsk1:[0-9]{0,18}:[ep]?:?)?") {
        let shared = SharedTokens::new(backend(), "main", Some(KEY), Duration::from_secs(1));
        let mut value = head.into_bytes();
        value.extend_from_slice(&bytes);
        let (view, record) = shared.parse(&value);
        let valid = matches!(view, View::Valid { .. });
        prop_assert!(!valid);
        prop_assert!(record.is_none());
    }
}
