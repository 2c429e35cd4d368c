use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;

use super::*;

const S: fn(u64) -> Duration = Duration::from_secs;

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn the_ttl_is_clamped_to_min_and_max() {
    for (ttl, min, max, want) in [
        (S(0), S(5), S(300), S(5)),
        (S(4), S(5), S(300), S(5)),
        (S(60), S(5), S(300), S(60)),
        (S(86_400), S(5), S(300), S(300)),
        (Duration::MAX, S(5), S(300), S(300)),
        (S(1), S(1), S(1), S(1)),
        // Refused by the config; still no panic, and never below min.
        (S(60), S(10), S(5), S(10)),
    ] {
        assert_eq!(
            clamp_ttl(ttl, min, max),
            want,
            "{ttl:?} in [{min:?}, {max:?}]"
        );
    }
}

#[test]
fn lookups_replace_keep_and_warn_as_a_table() {
    let (min, max) = (S(5), S(300));
    let two = vec![a("127.0.0.2:80"), a("127.0.0.3:80")];
    struct Row {
        what: &'static str,
        current: Vec<SocketAddr>,
        lookup: Lookup,
        replace: Option<Vec<SocketAddr>>,
        next: Duration,
    }
    let rows = [
        Row {
            what: "first answer",
            current: vec![],
            lookup: Lookup::Answer(vec![a("127.0.0.3:80"), a("127.0.0.2:80")], S(60)),
            replace: Some(two.clone()),
            next: S(60),
        },
        Row {
            what: "same set in another order, with a duplicate",
            current: two.clone(),
            lookup: Lookup::Answer(
                vec![a("127.0.0.3:80"), a("127.0.0.2:80"), a("127.0.0.3:80")],
                S(1),
            ),
            replace: None,
            next: S(5),
        },
        Row {
            what: "an address left the record",
            current: two.clone(),
            lookup: Lookup::Answer(vec![a("127.0.0.3:80")], S(3600)),
            replace: Some(vec![a("127.0.0.3:80")]),
            next: S(300),
        },
        Row {
            what: "zero addresses keep the last good set",
            current: two.clone(),
            lookup: Lookup::Answer(vec![], S(60)),
            replace: None,
            next: S(5),
        },
        Row {
            what: "a failed lookup keeps the last good set",
            current: two.clone(),
            lookup: Lookup::Failed,
            replace: None,
            next: S(5),
        },
    ];
    for row in rows {
        let step = Follow::default().after(&row.current, row.lookup, min, max);
        assert_eq!(step.replace, row.replace, "{}", row.what);
        assert_eq!(step.next, row.next, "{}", row.what);
    }
}

/// One WARN per streak of failures, every failure counted, and a note when lookups work again.
#[test]
fn a_streak_of_failures_warns_once_and_counts_each() {
    let (min, max) = (S(5), S(300));
    let current = vec![a("127.0.0.2:80")];
    let mut f = Follow::default();
    let mut warns = 0;
    let mut failures = 0;
    for _ in 0..10 {
        let step = f.after(&current, Lookup::Failed, min, max);
        warns += usize::from(step.warn);
        failures += usize::from(step.failure);
        assert!(!step.recovered);
        assert_eq!(step.replace, None);
    }
    assert_eq!((warns, failures), (1, 10));
    let step = f.after(&current, Lookup::Answer(current.clone(), S(30)), min, max);
    assert!(step.recovered && !step.warn && !step.failure);
    assert_eq!(step.next, S(30));
    // A new streak warns again.
    assert!(
        f.after(&current, Lookup::Answer(vec![], S(30)), min, max)
            .warn
    );
    assert!(!f.after(&current, Lookup::Failed, min, max).warn);
}

#[test]
fn connects_go_round_the_addresses() {
    assert_eq!(address_index(0, 0, 0), None);
    let picks: Vec<_> = (0..4).map(|i| address_index(7, i, 3).unwrap()).collect();
    assert_eq!(picks, [1, 2, 0, 1]);
    assert_eq!(address_index(usize::MAX, 1, 3), Some(0));
    // Two addresses: the first failure tries the other one at once, the second is a full round.
    assert!(try_next_address(1, 2));
    assert!(!try_next_address(2, 2));
    assert!(try_next_address(3, 2));
    // One address: nothing else to try.
    assert!(!try_next_address(1, 1));
    assert!(!try_next_address(1, 0));
}

/// The decisions over time, with tokio's paused clock: a record with a 1 s TTL and
/// `min_ttl: 5s` is looked up every 5 s; failures retry after `min_ttl` too.
#[tokio::test(start_paused = true)]
async fn lookups_follow_the_clamped_schedule_on_a_paused_clock() {
    let (min, max) = (S(5), S(300));
    let start = tokio::time::Instant::now();
    let mut f = Follow::default();
    let mut current = vec![];
    let mut at = vec![];
    let answers = [
        Lookup::Answer(vec![a("127.0.0.2:80")], S(1)),
        Lookup::Failed,
        Lookup::Answer(vec![a("127.0.0.3:80")], S(60)),
        Lookup::Answer(vec![a("127.0.0.3:80")], S(600)),
    ];
    for lookup in answers {
        at.push(start.elapsed());
        let step = f.after(&current, lookup, min, max);
        if let Some(next) = step.replace {
            current = next;
        }
        tokio::time::sleep(step.next).await;
    }
    assert_eq!(at, [S(0), S(5), S(10), S(70)]);
    assert_eq!(start.elapsed(), S(370));
    assert_eq!(current, [a("127.0.0.3:80")]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    /// Whatever a server answers: the next lookup is within [min, max], addresses in use are
    /// never emptied, and a replacement is sorted and free of duplicates.
    #[test]
    fn any_answer_keeps_a_usable_set(
        ips in prop::collection::vec((1u8..=3, 0u16..3), 0..8),
        ttl in any::<u64>(),
        min in 1u64..10,
        extra in 0u64..1000,
        failed in any::<bool>(),
    ) {
        let (min, max) = (S(min), S(min + extra));
        let addrs: Vec<SocketAddr> = ips
            .iter()
            .map(|(i, p)| SocketAddr::from(([127, 0, 0, *i], 80 + p)))
            .collect();
        let current = vec![a("127.0.0.9:80")];
        let lookup = if failed { Lookup::Failed } else { Lookup::Answer(addrs.clone(), S(ttl)) };
        let step = Follow::default().after(&current, lookup, min, max);
        prop_assert!(step.next >= min && step.next <= max);
        if let Some(new) = &step.replace {
            prop_assert!(!new.is_empty());
            prop_assert!(new.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(new.iter().all(|x| addrs.contains(x)));
        }
        prop_assert_eq!(step.failure, failed || addrs.is_empty());
    }
}
