//! `dns:`, `listen: unix:…` and upstream `protocol`: defaults, parsing, located errors, all
//! offline (nothing is resolved or bound while a config is checked).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use proptest::prelude::*;

use crate::*;

fn err(text: &str) -> String {
    match Config::parse(text, "bad.yaml") {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn dns_defaults_are_the_system_resolver_between_5s_and_5m() {
    let c = Config::parse("upstreams: []\n", "x.yaml").unwrap();
    assert!(c.dns.nameservers.is_empty());
    assert_eq!(c.dns.min_ttl, Duration::from_secs(5));
    assert_eq!(c.dns.max_ttl, Duration::from_secs(300));
}

#[test]
fn dns_settings_parse_and_print_back() {
    let c = Config::parse(
        "dns: { nameservers: [\"127.0.0.1:5353\", \"[::1]:53\"], min_ttl: 1s, max_ttl: 30s }\n",
        "x.yaml",
    )
    .unwrap();
    let want: Vec<SocketAddr> = vec![
        "127.0.0.1:5353".parse().unwrap(),
        "[::1]:53".parse().unwrap(),
    ];
    assert_eq!(c.dns.nameservers, want);
    assert_eq!(c.dns.min_ttl, Duration::from_secs(1));
    assert_eq!(c.dns.max_ttl, Duration::from_secs(30));
    let again = Config::parse(&c.redacted_yaml(), "again.yaml").unwrap();
    assert_eq!(again.dns, c.dns);
}

#[test]
fn bad_dns_settings_are_located() {
    for (body, line, want) in [
        (
            "dns:\n  nameservers: [\"dns.example\"]\n",
            2,
            "\"dns.example\" is not an ip:port address",
        ),
        (
            "dns:\n  nameservers: [\"127.0.0.1\"]\n",
            2,
            "is not an ip:port address",
        ),
        ("dns:\n  nameservers: [\"127.0.0.1:0\"]\n", 2, "has port 0"),
        (
            "dns:\n  max_ttl: 10s\n  min_ttl: 1m\n",
            3,
            "dns.min_ttl (1m) is more than dns.max_ttl (10s)",
        ),
        (
            "dns:\n  min_ttl: 0s\n",
            2,
            "dns.min_ttl must be at least 1s",
        ),
        ("dns:\n  min_ttl: soon\n", 2, "invalid duration"),
        ("dns:\n  ttl: 5s\n", 2, "unknown field"),
    ] {
        let e = err(body);
        assert!(e.starts_with(&format!("bad.yaml:{line}:")), "{body}: {e}");
        assert!(e.contains(want), "{body}: {e}");
    }
}

#[test]
fn listen_takes_a_unix_socket_path() {
    let c = Config::parse("listen: \"unix:/run/token-sidecar/sock\"\n", "x.yaml").unwrap();
    assert_eq!(
        c.listen,
        Listen::Unix(PathBuf::from("/run/token-sidecar/sock"))
    );
    assert_eq!(c.listen.to_string(), "unix:/run/token-sidecar/sock");
    let c = Config::parse("listen: \"127.0.0.1:8080\"\n", "x.yaml").unwrap();
    assert_eq!(c.listen, Listen::Tcp("127.0.0.1:8080".parse().unwrap()));
}

#[test]
fn bad_unix_listen_paths_are_located() {
    let long = format!("unix:/{}", "s".repeat(107));
    for (value, want) in [
        ("unix:run/sock", "must be absolute"),
        ("unix:", "must be absolute"),
        ("unix:/run/", "not a socket file path"),
        (long.as_str(), "at most 107 bytes; this one has 108"),
    ] {
        let e = err(&format!("shutdown_grace: 1s\nlisten: \"{value}\"\n"));
        assert!(e.starts_with("bad.yaml:2:1: "), "{value}: {e}");
        assert!(e.contains(want), "{value}: {e}");
    }
    // The longest path that fits.
    let fits = format!("unix:/{}", "s".repeat(106));
    Config::parse(&format!("listen: \"{fits}\"\n"), "x.yaml").unwrap();
}

#[test]
fn upstream_protocol_h2c_needs_plain_http() {
    let c = Config::parse(
        "upstreams: [{ name: g, url: \"http://127.0.0.1:50051\", protocol: h2c }]\n",
        "x.yaml",
    )
    .unwrap();
    assert_eq!(c.upstreams[0].protocol, UpstreamProtocol::H2c);
    let c = Config::parse(
        "upstreams: [{ name: g, url: \"http://127.0.0.1:1\" }]\n",
        "x.yaml",
    )
    .unwrap();
    assert_eq!(c.upstreams[0].protocol, UpstreamProtocol::Auto);
    let e = err("upstreams:\n  - name: g\n    url: \"https://api\"\n    protocol: h2c\n");
    assert!(e.starts_with("bad.yaml:4:"), "{e}");
    assert!(e.contains("protocol h2c") && e.contains("http://"), "{e}");
    let e = err("upstreams:\n  - name: g\n    url: \"http://api\"\n    protocol: h3\n");
    assert!(e.starts_with("bad.yaml:4:"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Any `listen` or nameserver text: a config or a located error, never a panic.
    #[test]
    fn any_listen_or_nameserver_text_never_panics(s in "[ -~]{0,130}", unix in any::<bool>()) {
        let value = if unix { format!("unix:{s}") } else { s.clone() };
        let quoted = format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""));
        for text in [
            format!("listen: {quoted}\n"),
            format!("dns:\n  nameservers: [{quoted}]\n"),
        ] {
            if let Err(e) = Config::parse(&text, "p.yaml") {
                prop_assert!(e.to_string().starts_with("p.yaml:"), "{}", e);
            }
        }
    }
}
