//! The read deadlines of [`Guarded`], on a paused clock over an in-memory stream.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::{timeout, Instant};

use super::*;

const HEADER: Duration = Duration::from_secs(5);
const IDLE: Duration = Duration::from_secs(10);

fn guarded() -> (Guarded, DuplexStream) {
    let (server, client) = tokio::io::duplex(64 * 1024);
    let limits = Downstream {
        header_timeout: HEADER,
        idle_timeout: IDLE,
        max_connections: 1,
        read_buffer: 0,
    };
    (Guarded::new(Box::new(server), limits), client)
}

/// Reads until an error; returns the error kind and what was read.
async fn read_until_error(g: &mut Guarded) -> (io::ErrorKind, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match g.read(&mut buf).await {
            Ok(0) => panic!("EOF instead of a timeout"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (e.kind(), got),
        }
    }
}

/// Everything the guarded side wrote, once it is gone.
async fn written(g: Guarded, mut client: DuplexStream) -> String {
    drop(g);
    let mut out = Vec::new();
    client.read_to_end(&mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_head_cut_short_gets_408_at_the_header_timeout() {
    let (mut g, mut client) = guarded();
    let start = Instant::now();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (kind, got) = read_until_error(&mut g).await;
    assert_eq!(kind, io::ErrorKind::TimedOut);
    assert_eq!(got, b"GET / HTTP/1.1\r\nHost: x\r\n");
    assert_eq!(start.elapsed(), HEADER);
    // Later reads fail too: the connection is done.
    assert!(g.read(&mut [0u8; 8]).await.is_err());
    let answer = written(g, client).await;
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{answer}"
    );
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    assert!(
        answer.ends_with(
            "\"request_timeout\",\"message\":\"the request head did not arrive within 5s\"}"
        ),
        "{answer}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_never_speaks_closes_without_an_answer() {
    let (mut g, client) = guarded();
    let start = Instant::now();
    let (kind, got) = read_until_error(&mut g).await;
    assert_eq!(kind, io::ErrorKind::TimedOut);
    assert!(got.is_empty());
    assert_eq!(start.elapsed(), HEADER);
    assert_eq!(written(g, client).await, "");
}

#[tokio::test(start_paused = true)]
async fn a_dribbled_head_ends_at_the_deadline_however_often_bytes_come() {
    let (mut g, mut client) = guarded();
    let start = Instant::now();
    let dribble = tokio::spawn(async move {
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if client.write_all(b"X").await.is_err() {
                return client;
            }
        }
    });
    let (kind, got) = read_until_error(&mut g).await;
    assert_eq!(kind, io::ErrorKind::TimedOut);
    assert!(got.len() > 10, "{got:?}");
    let took = start.elapsed();
    assert!(
        took >= HEADER && took < HEADER + Duration::from_millis(300),
        "{took:?}"
    );
    dribble.abort();
}

#[tokio::test(start_paused = true)]
async fn a_request_in_flight_has_no_deadline_of_ours() {
    let (mut g, mut client) = guarded();
    client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    assert!(g.read(&mut buf).await.unwrap() > 0);
    g.set_phase(Phase::Request);
    // A body that takes an hour is Pingora's read timeout's business, not ours.
    let waited = timeout(Duration::from_secs(3600), g.read(&mut buf)).await;
    assert!(waited.is_err(), "the read ended: {waited:?}");
    client.write_all(b"body").await.unwrap();
    assert_eq!(g.read(&mut buf).await.unwrap(), 4);
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_closes_quietly_at_the_idle_timeout() {
    let (mut g, client) = guarded();
    g.set_phase(Phase::Request);
    g.set_phase(Phase::Idle);
    let start = Instant::now();
    let (kind, _) = read_until_error(&mut g).await;
    assert_eq!(kind, io::ErrorKind::TimedOut);
    assert_eq!(start.elapsed(), IDLE);
    assert_eq!(written(g, client).await, "", "an idle close says nothing");
}

#[tokio::test(start_paused = true)]
async fn the_next_head_gets_its_own_deadline_from_its_first_byte() {
    let (mut g, mut client) = guarded();
    g.set_phase(Phase::Idle);
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(8)).await;
        client.write_all(b"GE").await.unwrap();
        client
    });
    let (kind, got) = read_until_error(&mut g).await;
    assert_eq!(kind, io::ErrorKind::TimedOut);
    assert_eq!(got, b"GE");
    // 8 s idle (under the 10 s idle limit), then 5 s for the head.
    assert_eq!(start.elapsed(), Duration::from_secs(8) + HEADER);
    let client = sender.await.unwrap();
    assert!(written(g, client).await.starts_with("HTTP/1.1 408 "));
}

/// A connection that opens like HTTP/2 but stops half way through the preface is a head like
/// any other and gets the same deadline.
#[tokio::test(start_paused = true)]
async fn a_connection_opening_like_http2_still_has_a_head_deadline() {
    let (mut g, mut client) = guarded();
    client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 24];
    let kind = g.try_peek(&mut buf).await.unwrap_err().kind();
    assert_eq!(kind, io::ErrorKind::TimedOut);
    assert_eq!(start.elapsed(), HEADER);
}

/// With h2c on, Pingora peeks 24 bytes for the preface. A short HTTP/1.0 request (18 bytes,
/// then the client waits for the answer) is told apart at its first byte and read whole
/// afterwards; a plain 24-byte peek waited for 6 bytes that never came.
#[tokio::test(start_paused = true)]
async fn a_short_http1_request_is_not_held_by_the_preface_peek() {
    let (mut g, mut client) = guarded();
    let request = b"GET / HTTP/1.0\r\n\r\n";
    client.write_all(request).await.unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 24];
    assert!(g.try_peek(&mut buf).await.unwrap());
    assert_ne!(&buf[..], H2_PREFACE);
    assert_eq!(start.elapsed(), Duration::ZERO);
    let mut got = vec![0u8; request.len()];
    g.read_exact(&mut got).await.unwrap();
    assert_eq!(&got[..], request);
}

/// Once the whole preface came, the connection is HTTP/2: the peeked bytes are read again, and
/// a quiet connection is no longer cut at the head deadline (Pingora's HTTP/2 idle timer owns it).
#[tokio::test(start_paused = true)]
async fn after_the_http2_preface_the_head_deadline_is_off() {
    let (mut g, mut client) = guarded();
    client.write_all(H2_PREFACE).await.unwrap();
    let mut buf = [0u8; 24];
    assert!(g.try_peek(&mut buf).await.unwrap());
    assert_eq!(&buf[..], H2_PREFACE);
    let mut got = [0u8; 24];
    g.read_exact(&mut got).await.unwrap();
    assert_eq!(&got[..], H2_PREFACE);
    let sender = tokio::spawn(async move {
        tokio::time::sleep(HEADER * 3).await;
        client.write_all(b"frame").await.unwrap();
        client
    });
    let mut frame = [0u8; 5];
    g.read_exact(&mut frame).await.unwrap();
    assert_eq!(&frame, b"frame");
    drop(sender.await.unwrap());
}

/// A served request of `request`'s size: read by "Pingora", counted by `request_done`.
async fn serve(g: &mut Guarded, client: &mut DuplexStream, request: &[u8]) {
    client.write_all(request).await.unwrap();
    let mut got = vec![0u8; request.len()];
    g.read_exact(&mut got).await.unwrap();
    g.set_phase(Phase::Request);
    g.set_phase(Phase::Idle);
    g.count_served(Some(request.len() as u64));
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

/// Between keep-alive requests only the stream waits: the next request's first bytes end the
/// wait, are read again by the next session, and start that head's own deadline.
#[tokio::test(start_paused = true)]
async fn the_wait_for_the_next_request_ends_at_its_first_bytes_and_keeps_them() {
    let (mut g, mut client) = guarded();
    let (_tx, shutdown) = tokio::sync::watch::channel(false);
    serve(&mut g, &mut client, GET).await;
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(8)).await;
        client.write_all(b"GET /next").await.unwrap();
        client
    });
    assert!(g.next_request(&mut Stopping::new(&shutdown)).await);
    assert_eq!(start.elapsed(), Duration::from_secs(8));
    assert!(g.rewound.capacity() > 0);
    let (kind, got) = read_until_error(&mut g).await;
    assert_eq!(got, b"GET /next");
    assert_eq!(kind, io::ErrorKind::TimedOut);
    assert_eq!(start.elapsed(), Duration::from_secs(8) + HEADER);
    let client = sender.await.unwrap();
    assert!(written(g, client).await.starts_with("HTTP/1.1 408 "));
}

/// The timer is not moved when a deadline moves later (every request moves it): it fires
/// early, and the connection is still closed at its own deadline, not at the timer's. A
/// deadline that moves earlier moves the timer.
#[tokio::test(start_paused = true)]
async fn deadlines_hold_whichever_way_they_move_from_the_timer() {
    let (_tx, shutdown) = tokio::sync::watch::channel(false);
    let (mut g, mut client) = guarded();
    serve(&mut g, &mut client, GET).await;
    let start = Instant::now();
    // The wait arms the timer for IDLE; the next request comes at 8 s.
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(8)).await;
        client.write_all(GET).await.unwrap();
        client
    });
    assert!(g.next_request(&mut Stopping::new(&shutdown)).await);
    let client = sender.await.unwrap();
    let mut got = vec![0u8; GET.len()];
    g.read_exact(&mut got).await.unwrap();
    g.set_phase(Phase::Request);
    g.set_phase(Phase::Idle);
    g.count_served(Some(GET.len() as u64));
    // Idle again from 8 s: the timer fires at IDLE, the connection closes at 8 s + IDLE.
    assert!(!g.next_request(&mut Stopping::new(&shutdown)).await);
    assert_eq!(start.elapsed(), Duration::from_secs(8) + IDLE);
    drop(client);

    // The timer set for IDLE; a head starts at 1 s and must end by 1 s + HEADER, sooner.
    let (mut g, mut client) = guarded();
    serve(&mut g, &mut client, GET).await;
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        client.write_all(b"GE").await.unwrap();
        client
    });
    assert!(g.next_request(&mut Stopping::new(&shutdown)).await);
    let (kind, got) = read_until_error(&mut g).await;
    assert_eq!(
        (kind, got.as_slice()),
        (io::ErrorKind::TimedOut, &b"GE"[..])
    );
    assert_eq!(start.elapsed(), Duration::from_secs(1) + HEADER);
    let client = sender.await.unwrap();
    assert!(written(g, client).await.starts_with("HTTP/1.1 408 "));
}

/// A wait that finds nothing allocates nothing; the read-ahead buffer of a common request is
/// kept for the next one (no allocation per request), a large one is freed once it is served.
#[tokio::test(start_paused = true)]
async fn the_read_ahead_buffer_is_kept_only_when_small() {
    let (mut g, mut client) = guarded();
    let (_tx, shutdown) = tokio::sync::watch::channel(false);
    serve(&mut g, &mut client, GET).await;
    let waited = timeout(
        Duration::from_secs(1),
        g.next_request(&mut Stopping::new(&shutdown)),
    )
    .await;
    assert!(waited.is_err(), "the wait ended: {waited:?}");
    assert_eq!(g.rewound.capacity(), 0);
    for _ in 0..2 {
        client.write_all(GET).await.unwrap();
        assert!(g.next_request(&mut Stopping::new(&shutdown)).await);
        let mut got = vec![0u8; GET.len()];
        g.read_exact(&mut got).await.unwrap();
        assert_eq!(got, GET);
        // Kept for the next request (the old code freed it here).
        assert!((1..=KEEP_READ_AHEAD).contains(&g.rewound.capacity()));
        g.set_phase(Phase::Request);
        g.set_phase(Phase::Idle);
        g.count_served(Some(GET.len() as u64));
    }
    let large = [
        b"GET / HTTP/1.1\r\nX-Big: ".as_slice(),
        &[b'a'; 3000],
        b"\r\n\r\n",
    ]
    .concat();
    client.write_all(&large).await.unwrap();
    assert!(g.next_request(&mut Stopping::new(&shutdown)).await);
    let mut got = vec![0u8; large.len()];
    g.read_exact(&mut got).await.unwrap();
    assert_eq!(got, large);
    assert_eq!(g.rewound.capacity(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_wait_ends_at_the_idle_timeout_when_the_client_closes_or_at_shutdown() {
    let (_tx, shutdown) = tokio::sync::watch::channel(false);
    // Silent: closed at the idle timeout, with nothing written.
    let (mut g, mut client) = guarded();
    serve(&mut g, &mut client, GET).await;
    let start = Instant::now();
    assert!(!g.next_request(&mut Stopping::new(&shutdown)).await);
    assert_eq!(start.elapsed(), IDLE);
    assert_eq!(written(g, client).await, "");
    // The client closed its end.
    let (mut g, mut client) = guarded();
    serve(&mut g, &mut client, GET).await;
    drop(client);
    let start = Instant::now();
    assert!(!g.next_request(&mut Stopping::new(&shutdown)).await);
    assert_eq!(start.elapsed(), Duration::ZERO);
    // The sidecar shuts down while the connection waits.
    let (tx, shutdown) = tokio::sync::watch::channel(false);
    let (mut g, mut client) = guarded();
    serve(&mut g, &mut client, GET).await;
    let start = Instant::now();
    let stop = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        tx.send(true).unwrap();
        tx
    });
    assert!(!g.next_request(&mut Stopping::new(&shutdown)).await);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    drop(stop.await.unwrap());
    // One `Stopping` kept across the waits of a connection, as `serve` keeps it: a shutdown
    // that starts while a request is served ends the next wait at once, and one that starts
    // during a later wait ends that wait.
    let (tx, shutdown) = tokio::sync::watch::channel(false);
    let mut stop = Stopping::new(&shutdown);
    let (mut g, mut client) = guarded();
    serve(&mut g, &mut client, GET).await;
    client.write_all(GET).await.unwrap();
    assert!(g.next_request(&mut stop).await);
    let mut got = vec![0u8; GET.len()];
    g.read_exact(&mut got).await.unwrap();
    g.set_phase(Phase::Request);
    g.set_phase(Phase::Idle);
    g.count_served(Some(GET.len() as u64));
    let start = Instant::now();
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        tx.send(true).unwrap();
        tx
    });
    assert!(!g.next_request(&mut stop).await);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert!(!g.next_request(&mut stop).await);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    drop(stopper.await.unwrap());
    // The shutdown began before the wait (the connection subscribed before it): no wait.
    let (tx, shutdown) = tokio::sync::watch::channel(false);
    let (mut g, mut client) = guarded();
    serve(&mut g, &mut client, GET).await;
    tx.send(true).unwrap();
    let start = Instant::now();
    assert!(!g.next_request(&mut Stopping::new(&shutdown)).await);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

/// Pipelining: when Pingora was handed more bytes than the requests it served, it may hold the
/// next request already, and the client may send nothing more until that one is answered:
/// the wait ends at once and leaves the reading to Pingora. The same once a request's size on
/// the wire could not be counted.
#[tokio::test(start_paused = true)]
async fn bytes_pingora_may_already_hold_are_never_waited_for() {
    let (_tx, shutdown) = tokio::sync::watch::channel(false);
    let (mut g, mut client) = guarded();
    let mut two = GET.to_vec();
    two.extend_from_slice(b"GET /second HTTP/1.1\r\n\r\n");
    client.write_all(&two).await.unwrap();
    let mut got = vec![0u8; two.len()];
    g.read_exact(&mut got).await.unwrap();
    g.set_phase(Phase::Idle);
    g.count_served(Some(GET.len() as u64));
    let start = Instant::now();
    assert!(g.next_request(&mut Stopping::new(&shutdown)).await);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert!(g.rewound.is_empty());

    let (mut g, mut client) = guarded();
    serve(&mut g, &mut client, GET).await;
    g.count_served(None);
    g.count_served(Some(GET.len() as u64));
    assert!(g.next_request(&mut Stopping::new(&shutdown)).await);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(g.served.load(Ordering::Acquire), UNCOUNTED);
}

/// Only the codes Pingora's escaping writes make a request's size unknown; the `%2F`, `%3D` and
/// lower-case codes clients send every day do not.
#[test]
fn targets_pingora_may_have_escaped() {
    #[rustfmt::skip]
    let table: &[(&str, bool)] = &[
        ("/a/b", false),
        ("/a%2Fb?q=%3D&r=%26", false),
        ("/%e2%a2%ac", false),
        ("/%e2%82%ac", true),
        ("/a%2", false),
        ("/a%", false),
        ("/%7E", false),
        ("/%3c", false),
        ("/a%20b", true),
        ("/q?x=a%20", true),
        ("/%22", true),
        ("/%3C", true),
        ("/%3E", true),
        ("/%1F", true),
        ("/%00", true),
        ("/%7F", true),
        ("/%E2%82%AC", true),
    ];
    for (target, want) in table {
        assert_eq!(may_be_escaped(target.as_bytes()), *want, "{target}");
    }
}
