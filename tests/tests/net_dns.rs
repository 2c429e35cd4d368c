//! Upstream names that follow DNS: a real DNS server (Debian's dnsmasq, on a loopback port
//! started here) answers for `api.sidecar.test` with a 1 s TTL; its records are switched
//! between 127.0.0.2 and 127.0.0.3, where two mock upstreams listen on the same port (Linux
//! routes all of 127/8 to the loopback interface). The sidecar runs as users run it, with
//! `dns.nameservers` pointing at that server.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use sidecar_mocks::{MockUpstream, UpstreamConfig};
use support::metrics::scrape;
use support::{free_port, tools, wait_until, Scratch, Sidecar};

const NAME: &str = "api.sidecar.test";
/// Always in the hosts file: dnsmasq answers it once it serves (and handles SIGHUP).
const SENTINEL: &str = "ready.sidecar.test";
/// Any single wait of these tests: generous against `min_ttl: 1s`.
const BOUND: Duration = Duration::from_secs(20);
const WARN_LINE: &str = "DNS lookup of an upstream failed";

/// dnsmasq serving the names of a hosts file on 127.0.0.1:`port`; killed on drop.
struct Dnsmasq {
    child: Child,
    port: u16,
    hosts: PathBuf,
    _dir: Scratch,
}

impl Dnsmasq {
    async fn start(records: &[&str]) -> Dnsmasq {
        let bin = tools::require("dnsmasq", "dnsmasq-base");
        let dir = Scratch::new("dnsmasq");
        let hosts = dir.path("hosts");
        write_hosts(&hosts, records);
        let port = free_port();
        let child = Command::new(bin)
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                "--local-ttl=1",
                "--log-facility=-",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", hosts.display()))
            .arg(format!("--pid-file={}", dir.path("pid").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq");
        let dns = Dnsmasq {
            child,
            port,
            hosts,
            _dir: dir,
        };
        wait_until(
            BOUND,
            || async { !query(dns.addr(), SENTINEL).await.is_empty() },
            || "dnsmasq never answered".into(),
        )
        .await;
        dns
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Replaces the records of [`NAME`] and tells dnsmasq to re-read them (SIGHUP).
    fn set(&self, records: &[&str]) {
        write_hosts(&self.hosts, records);
        let ok = Command::new("kill")
            .args(["-s", "HUP", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "SIGHUP to dnsmasq failed");
    }

    /// Waits until the server answers [`NAME`] with exactly `want` (asked without a cache).
    async fn wait_answers(&self, want: &[&str]) {
        let mut want: Vec<IpAddr> = want.iter().map(|s| s.parse().unwrap()).collect();
        want.sort();
        let seen = std::sync::Mutex::new(Vec::new());
        wait_until(
            BOUND,
            || async {
                let got = query(self.addr(), NAME).await;
                *seen.lock().unwrap() = got.clone();
                got == want
            },
            || format!("dnsmasq answers {:?}, not {want:?}", seen.lock().unwrap()),
        )
        .await;
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_hosts(path: &PathBuf, records: &[&str]) {
    let mut text = format!("127.0.0.9 {SENTINEL}\n");
    text.extend(records.iter().map(|ip| format!("{ip} {NAME}\n")));
    std::fs::write(path, text).unwrap();
}

/// The A records of `name` at `server`, sorted; empty when it does not resolve.
async fn query(server: SocketAddr, name: &str) -> Vec<IpAddr> {
    let mut group = NameServerConfigGroup::new();
    group.push(NameServerConfig::new(server, Protocol::Udp));
    let mut builder = TokioResolver::builder_with_config(
        ResolverConfig::from_parts(None, vec![], group),
        TokioConnectionProvider::default(),
    );
    builder.options_mut().cache_size = 0;
    builder.options_mut().timeout = Duration::from_secs(1);
    let resolver = builder.build();
    let mut ips: Vec<IpAddr> = match resolver.ipv4_lookup(name).await {
        Ok(answer) => answer.iter().map(|a| IpAddr::V4(a.0)).collect(),
        Err(_) => Vec::new(),
    };
    ips.sort();
    ips
}

/// Two mock upstreams on the same port at 127.0.0.2 and 127.0.0.3.
async fn two_upstreams() -> (MockUpstream, MockUpstream, u16) {
    for _ in 0..20 {
        let port = free_port();
        let a = MockUpstream::start_at(UpstreamConfig::open(), ([127, 0, 0, 2], port).into()).await;
        let b = MockUpstream::start_at(UpstreamConfig::open(), ([127, 0, 0, 3], port).into()).await;
        if let (Ok(a), Ok(b)) = (a, b) {
            return (a, b, port);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

async fn sidecar(dns: &Dnsmasq, port: u16) -> Sidecar {
    Sidecar::start(&format!(
        "dns: {{ nameservers: [\"{}\"], min_ttl: 1s, max_ttl: 1s }}\n\
         upstreams:\n  - {{ name: api, url: \"http://{NAME}:{port}\" }}\n\
         log: {{ access_log: false }}\n",
        dns.addr()
    ))
    .await
}

async fn get(client: &reqwest::Client, sc: &Sidecar) -> Result<u16, String> {
    client
        .get(sc.url("/x"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

async fn dns_failures(sc: &Sidecar) -> f64 {
    scrape(sc)
        .await
        .sum("sidecar_dns_failures_total", &[("upstream", "api")])
}

/// Traffic moves to the new address once the record changes (within `min_ttl` and a lookup),
/// the old upstream then goes away, and a steady stream of requests across all of it sees no
/// failure; the old address gets nothing once it left the record (its pooled connections are
/// not reused).
#[tokio::test]
async fn traffic_follows_the_record_and_no_request_fails_across_the_switch() {
    let (a, b, port) = two_upstreams().await;
    let dns = Dnsmasq::start(&["127.0.0.2"]).await;
    dns.wait_answers(&["127.0.0.2"]).await;
    let sc = sidecar(&dns, port).await;
    let client = reqwest::Client::new();
    for _ in 0..5 {
        assert_eq!(get(&client, &sc).await, Ok(200), "{}", sc.logs());
    }
    assert_eq!((a.count(), b.count()), (5, 0));

    // A steady stream of requests from here to the end.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stream = {
        let (stop, sent, failures) = (stop.clone(), sent.clone(), failures.clone());
        let url = sc.url("/x");
        let client = client.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let r = client
                    .get(&url)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                match r.map(|r| r.status().as_u16()) {
                    Ok(200) => {}
                    other => failures.lock().unwrap().push(format!("{other:?}")),
                }
                sent.fetch_add(1, Ordering::AcqRel);
            }
        })
    };

    dns.set(&["127.0.0.3"]);
    dns.wait_answers(&["127.0.0.3"]).await;
    let switched = Instant::now();
    wait_until(
        BOUND,
        || async { b.count() > 0 },
        || format!("no request reached 127.0.0.3\n{}", sc.logs()),
    )
    .await;
    eprintln!(
        "traffic reached the new address {:?} after the server answered it (min_ttl 1s)",
        switched.elapsed()
    );
    // The old upstream goes away; the stream goes on for a while.
    a.shutdown();
    let at_switch = a.count();
    let mark = sent.load(Ordering::Acquire);
    wait_until(
        BOUND,
        || async { sent.load(Ordering::Acquire) >= mark + 100 },
        || "the request stream stalled".into(),
    )
    .await;
    stop.store(true, Ordering::Release);
    stream.await.unwrap();
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across the switch: {failures:?}\n{}",
        failures.len(),
        sent.load(Ordering::Acquire),
        sc.logs()
    );
    eprintln!(
        "{} requests in the stream across the switch and the old upstream's shutdown, {} failed",
        sent.load(Ordering::Acquire),
        failures.len()
    );
    assert_eq!(
        a.count(),
        at_switch,
        "the old address got requests after the switch"
    );
    assert!(b.count() >= 100, "{}", b.count());
}

/// A name that does not resolve at start does not stop the sidecar: its requests get 502
/// `upstream_unreachable` until the record appears, then 200. The failing lookups are counted
/// and logged once.
#[tokio::test]
async fn a_name_that_does_not_resolve_at_start_is_502_until_it_does() {
    let (a, _b, port) = two_upstreams().await;
    let dns = Dnsmasq::start(&[]).await;
    dns.wait_answers(&[]).await;
    let sc = sidecar(&dns, port).await;
    let client = reqwest::Client::new();
    let r = client.get(sc.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "upstream_unreachable", "{body}");
    // Several failed lookups (one per min_ttl), one WARN.
    wait_until(
        BOUND,
        || async { dns_failures(&sc).await >= 3.0 },
        || format!("fewer than 3 DNS failures counted\n{}", sc.logs()),
    )
    .await;
    assert_eq!(sc.logs().matches(WARN_LINE).count(), 1, "{}", sc.logs());
    assert_eq!(a.count(), 0);

    dns.set(&["127.0.0.2"]);
    wait_until(
        BOUND,
        || async { get(&client, &sc).await == Ok(200) },
        || format!("never 200 after the record appeared\n{}", sc.logs()),
    )
    .await;
    assert!(a.count() >= 1);
}

/// Both addresses of the record get traffic; with one of them dead, every request still gets
/// 200 (a connect failure moves on to the next address at once).
#[tokio::test]
async fn every_address_is_used_and_a_dead_one_is_skipped() {
    let (a, b, port) = two_upstreams().await;
    let dns = Dnsmasq::start(&["127.0.0.2", "127.0.0.3"]).await;
    dns.wait_answers(&["127.0.0.2", "127.0.0.3"]).await;
    let sc = sidecar(&dns, port).await;
    let client = reqwest::Client::new();
    for _ in 0..40 {
        assert_eq!(get(&client, &sc).await, Ok(200), "{}", sc.logs());
    }
    eprintln!(
        "40 requests over two addresses: {} and {}",
        a.count(),
        b.count()
    );
    assert!(
        a.count() >= 10 && b.count() >= 10,
        "{} / {}",
        a.count(),
        b.count()
    );

    b.shutdown();
    // Its listener is gone once a connect to it is refused.
    wait_until(
        BOUND,
        || async { tokio::net::TcpStream::connect(b.addr()).await.is_err() },
        || "127.0.0.3 still accepts".into(),
    )
    .await;
    let (before_a, before_b) = (a.count(), b.count());
    // Fresh connections: the pooled ones to the dead address are closed by now or fail.
    let fresh = reqwest::Client::new();
    for i in 0..40 {
        assert_eq!(
            get(&fresh, &sc).await,
            Ok(200),
            "request {i}\n{}",
            sc.logs()
        );
    }
    assert_eq!(b.count(), before_b);
    assert_eq!(a.count(), before_a + 40);
}

/// With the DNS server gone, the last good addresses keep working; the failed lookups are
/// counted and logged once.
#[tokio::test]
async fn when_dns_stops_the_last_addresses_keep_working() {
    let (a, _b, port) = two_upstreams().await;
    let mut dns = Dnsmasq::start(&["127.0.0.2"]).await;
    dns.wait_answers(&["127.0.0.2"]).await;
    let sc = sidecar(&dns, port).await;
    let client = reqwest::Client::new();
    assert_eq!(get(&client, &sc).await, Ok(200), "{}", sc.logs());
    assert_eq!(dns_failures(&sc).await, 0.0);
    dns.stop();
    // A lookup of a server that is gone ends at the resolver's timeouts (about 7 s here), so
    // two failures take a while: the bound is generous.
    wait_until(
        BOUND * 2,
        || async { dns_failures(&sc).await >= 2.0 },
        || format!("fewer than 2 DNS failures counted\n{}", sc.logs()),
    )
    .await;
    for _ in 0..20 {
        assert_eq!(get(&client, &sc).await, Ok(200), "{}", sc.logs());
    }
    assert_eq!(a.count(), 21);
    let logs = sc.logs();
    assert_eq!(logs.matches(WARN_LINE).count(), 1, "{logs}");
    assert!(
        logs.contains("127.0.0.2"),
        "the WARN names the addresses kept: {logs}"
    );
}
