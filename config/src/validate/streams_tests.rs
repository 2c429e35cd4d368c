//! Long-lived connection keys: `upgrade.min_ttl` (top level, per-upstream override),
//! `timeouts.stream_idle`, `max_streams`.

use std::time::Duration;

use crate::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "t.yaml")
}

const UP: &str = "upstreams:\n  - name: api\n    url: \"http://127.0.0.1:1\"\n";

#[test]
fn defaults_are_five_minutes_ten_minutes_and_ten_thousand() {
    let c = parse(UP).unwrap();
    assert_eq!(c.max_streams, 10_000);
    assert_eq!(c.upstreams[0].upgrade_min_ttl, Duration::from_secs(300));
    assert_eq!(c.upstreams[0].stream_idle_timeout, Duration::from_secs(600));
}

#[test]
fn an_upstream_overrides_the_top_level_min_ttl() {
    let c = parse(&format!(
        "upgrade: {{ min_ttl: 2m }}\nmax_streams: 2\n{UP}    timeouts: {{ stream_idle: 3s }}\n\
         \x20 - name: other\n    url: \"http://127.0.0.1:2\"\n    match: {{ path_prefix: /o }}\n\
         \x20   upgrade: {{ min_ttl: 0s }}\n"
    ))
    .unwrap();
    assert_eq!(c.max_streams, 2);
    assert_eq!(c.upstreams[0].upgrade_min_ttl, Duration::from_secs(120));
    assert_eq!(c.upstreams[0].stream_idle_timeout, Duration::from_secs(3));
    assert_eq!(c.upstreams[1].upgrade_min_ttl, Duration::ZERO);
}

#[test]
fn zero_streams_and_zero_stream_idle_are_located_errors() {
    let e = parse(&format!("{UP}max_streams: 0\n"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("t.yaml:4:1: max_streams must be at least 1"),
        "{e}"
    );
    let e = parse(&format!("{UP}    timeouts: {{ stream_idle: 0s }}\n"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("t.yaml:4:17:") && e.contains("timeouts.stream_idle must be more than 0"),
        "{e}"
    );
    let e = parse(&format!("{UP}upgrade: {{ min_tll: 1m }}\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("min_tll"), "{e}");
}
