//! Errors and warnings at the offending key's line and column, for many configs at once.

use crate::*;

const UP: &str = "upstreams:\n  - { name: api, url: 'http://127.0.0.1:1' }\n";

/// `(config, line, col, part of the message)`.
const ERRORS: &[(&str, usize, usize, &str)] = &[
    // The `a` vs `api` case: the error is in upstream `a`, the second one.
    (
        "upstreams:\n  - name: api\n    url: http://127.0.0.1:1\n  - name: a\n    url: ftp://x\n",
        5,
        5,
        "scheme \"ftp\"",
    ),
    (
        "upstreams:\n  - name: api\n    url: http://127.0.0.1:1\n  - name: a\n    url: http://127.0.0.1:2\n    expiry: { statuses: [401, 200] }\n",
        6,
        31,
        "status 200",
    ),
    (
        "upstreams:\n  - name: a\n    url: http://127.0.0.1:1\n  - name: a\n    url: http://127.0.0.1:2\n",
        4,
        5,
        "used twice",
    ),
    (
        "upstreams:\n  - name: a\n    url: http://127.0.0.1:1\n    match: { path_prefix: api }\n",
        4,
        14,
        "path_prefix must start with /",
    ),
    (
        "upstreams:\n  - name: a\n    url: http://127.0.0.1:1\n    inject: { header: 'bad header' }\n",
        4,
        15,
        "inject.header",
    ),
    (
        "upstreams:\n  - name: a\n    url: http://127.0.0.1:1\n    timeouts:\n      read: 5 parsecs\n",
        5,
        13,
        "",
    ),
    ("log: {level: verbose}\nupstreams: []\n", 1, 7, "\"verbose\" is not a log level"),
    ("upstreams: []\nlog:\n  level: \"info,hyper\"\n", 3, 3, "\"hyper\""),
    ("upstreams: []\nlog:\n  level: \"\"\n", 3, 3, "log.level is empty"),
    ("listen: nowhere\nupstreams: []\n", 1, 1, "invalid listen address"),
    (
        "admin_listen: 127.0.0.1:8080\nlisten: 127.0.0.1:8080\nupstreams: []\n",
        1,
        1,
        "is also listen",
    ),
    (
        "probe_listen: 127.0.0.1:9901\nupstreams: []\n",
        1,
        1,
        "probe_listen 127.0.0.1:9901 is also",
    ),
    ("upstreams: []\nadmin:\n  token: short\n", 3, 3, "at least 16"),
    (
        "upstreams: []\nadmin: { token: '${env:SIDECAR_LOCATED_UNSET_42}' }\n",
        2,
        17,
        "SIDECAR_LOCATED_UNSET_42",
    ),
    (
        "providers:\n  api: { type: static, token: a }\n  a:\n    type: static\n    token: b\n    default_ttl: 0s\n",
        6,
        5,
        "default_ttl",
    ),
    (
        "providers:\n  p:\n    type: static\n    token: b\n    store:\n      path: /nonexistent-sidecar-dir/p.tok\n      key: k\n",
        6,
        7,
        "directory /nonexistent-sidecar-dir",
    ),
    (
        "providers:\n  p:\n    type: oauth2_client_credentials\n    token_url: https://idp/t\n    client_id: c\n    client_auth: private_key_jwt\n    private_key: not a key\n",
        7,
        5,
        "not a PEM private key",
    ),
    (
        "providers:\n  p:\n    type: oauth2_client_credentials\n    token_url: 'ftp://idp/t'\n    client_id: c\n    client_secret: s\n",
        4,
        5,
        "token_url",
    ),
    (
        "providers:\n  p:\n    type: static\n    token: t\n    command: [x]\n",
        5,
        5,
        "`command` does not apply",
    ),
    (
        "providers:\n  p:\n    type: json_login\n    login:\n      url: https://api/login\n      token_pointer: token\n",
        6,
        7,
        "not a JSON pointer",
    ),
    (
        "upstreams:\n  - name: a\n    url: http://127.0.0.1:1\n    provider: nope\n",
        4,
        5,
        "provider \"nope\"",
    ),
    ("upstreams: []\nretry:\n  statuses: [502, 302]\n", 3, 19, "302"),
    ("upstreams: []\nreplay:\n  max_attempts: 0\n", 3, 3, "max_attempts"),
    (
        "upstreams:\n  - { name: api, url: 'http://127.0.0.1:1' }\nrate_limits:\n  - { name: r, upstream: api, rate: 1/1s }\n  - name: s\n    upstream: api\n    rate: 1/1s\n    burst: 0\n",
        8,
        5,
        "burst",
    ),
    (
        "upstreams:\n  - { name: api, url: 'http://127.0.0.1:1' }\nrate_limits:\n  - name: r\n    upstream: apx\n    rate: 1/1s\n",
        5,
        5,
        "upstream \"apx\"",
    ),
    ("upstreams: []\ndownstream:\n  max_connections: 0\n", 3, 3, "max_connections"),
];

#[test]
fn each_error_points_at_its_key() {
    for (text, line, col, part) in ERRORS {
        match Config::parse(text, "c.yaml") {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(ConfigError::At {
                line: l,
                col: c,
                message,
                ..
            }) => {
                assert_eq!((l, c), (*line, *col), "{message}\n{text}");
                assert!(message.contains(part), "{message:?} lacks {part:?}\n{text}");
            }
            Err(other) => panic!("not located: {other}\n{text}"),
        }
    }
}

#[test]
fn good_log_levels_pass() {
    for level in [
        "info",
        "WARN",
        "off",
        "info,token_sidecar=debug",
        "warn, pingora_proxy=error",
        "token_sidecar[request]=trace",
    ] {
        let text = format!("{UP}log: {{ level: '{level}' }}\n");
        assert!(Config::parse(&text, "c.yaml").is_ok(), "{level}");
    }
}

#[test]
fn yaml_syntax_errors_name_their_place_once() {
    for text in [
        "upstreams:\n  - name: a\n   url: x\n",
        "x: {a: 1\n",
        "a: \"unterminated\n",
    ] {
        let e = Config::parse(text, "c.yaml").unwrap_err().to_string();
        assert!(e.starts_with("c.yaml:"), "{e}");
        let (place, message) = e["c.yaml:".len()..].split_once(": ").unwrap();
        let (line, col) = place.split_once(':').unwrap();
        let own = format!("line {line} column {col}");
        assert!(!message.contains(&own), "location twice: {e}");
    }
}

fn warnings(text: &str) -> Vec<String> {
    match Config::parse(text, "c.yaml") {
        Ok(c) => c.warnings.iter().map(ToString::to_string).collect(),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn suspicious_configs_warn_at_their_key() {
    // Plain http to another host; loopback is fine.
    let w = warnings(
        "providers:\n  p:\n    type: oauth2_client_credentials\n    token_url: http://idp.example.com/t\n    client_id: c\n    client_secret: s\nupstreams:\n  - { name: a, url: 'http://127.0.0.1:1', provider: p }\n",
    );
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("c.yaml:4:5: warning: "), "{w:?}");
    assert!(w[0].contains("plain http"), "{w:?}");
    let w = warnings(
        "providers:\n  p:\n    type: oauth2_client_credentials\n    token_url: http://127.0.0.1:9/t\n    client_id: c\n    client_secret: s\nupstreams:\n  - { name: a, url: 'http://127.0.0.1:1', provider: p }\n",
    );
    assert!(w.is_empty(), "{w:?}");
    // json_login's URLs too.
    let w = warnings(
        "providers:\n  p:\n    type: json_login\n    login: { url: 'http://api.example.com/login', token_pointer: /t }\nupstreams:\n  - { name: a, url: 'http://127.0.0.1:1', provider: p }\n",
    );
    assert!(w.len() == 1 && w[0].starts_with("c.yaml:4:14: "), "{w:?}");

    // A provider no upstream uses.
    let w = warnings(
        "providers:\n  used: { type: static, token: a }\n  spare: { type: static, token: b }\nupstreams:\n  - { name: a, url: 'http://127.0.0.1:1', provider: used }\n",
    );
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("c.yaml:3:3: warning: "), "{w:?}");
    assert!(w[0].contains("\"spare\" is used by no upstream"), "{w:?}");

    // Two catch-all routes (same host match): the second never gets a request.
    let w = warnings(
        "upstreams:\n  - { name: a, url: 'http://127.0.0.1:1' }\n  - name: b\n    url: http://127.0.0.1:2\n    match: { path_prefix: / }\n",
    );
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("c.yaml:3:5: warning: "), "{w:?}");
    assert!(w[0].contains("\"b\" never gets a request"), "{w:?}");
    // Catch-alls for different hosts are fine, and so is a catch-all beside a prefix.
    assert!(warnings(
        "upstreams:\n  - { name: a, url: 'http://127.0.0.1:1', match: { host: a.local } }\n  - { name: b, url: 'http://127.0.0.1:2', match: { host: b.local } }\n  - { name: c, url: 'http://127.0.0.1:3', match: { path_prefix: /c } }\n  - { name: d, url: 'http://127.0.0.1:4' }\n"
    )
    .is_empty());

    // An admin API off loopback without a token.
    let w = warnings(&format!("admin_listen: 0.0.0.0:9901\n{UP}"));
    assert!(
        w.len() == 1 && w[0].starts_with("c.yaml:1:1: warning: admin_listen 0.0.0.0:9901"),
        "{w:?}"
    );
    let w = warnings(&format!(
        "admin_listen: 0.0.0.0:9901\nadmin: {{ token: '0123456789abcdef0123' }}\n{UP}"
    ));
    assert!(w.is_empty(), "{w:?}");

    // The full example warns about nothing.
    assert!(warnings(UP).is_empty());
}

#[test]
fn new_keys_parse_with_their_defaults() {
    let c = Config::parse(UP, "c.yaml").unwrap();
    assert_eq!(c.shutdown_delay, std::time::Duration::ZERO);
    assert!(c.probe_listen.is_none() && c.admin_token.is_none());
    let c = Config::parse(
        &format!(
            "probe_listen: 0.0.0.0:9902\nshutdown_delay: 5s\nadmin: {{ token: 'a-long-admin-token-value' }}\n{UP}"
        ),
        "c.yaml",
    )
    .unwrap();
    assert_eq!(c.probe_listen, Some("0.0.0.0:9902".parse().unwrap()));
    assert_eq!(c.shutdown_delay, std::time::Duration::from_secs(5));
    assert_eq!(c.admin_token.unwrap().expose(), "a-long-admin-token-value");
    assert!(c.raw.admin.token.is_some());
    let printed = Config::parse(
        &format!("admin: {{ token: 'a-long-admin-token-value' }}\n{UP}"),
        "c.yaml",
    )
    .unwrap()
    .redacted_yaml();
    assert!(!printed.contains("a-long-admin-token-value"), "{printed}");
}

#[test]
fn a_provider_check_error_points_into_the_provider() {
    fn refuse(p: &Provider) -> Result<(), (String, String)> {
        if p.name == "b" {
            return Err(("token".into(), "refused by the check".into()));
        }
        Ok(())
    }
    let text = "providers:\n  a: { type: static, token: x }\n  b:\n    type: static\n    token: y\nupstreams: []\n";
    let e = Config::parse_with(text, "c.yaml", Some(refuse)).unwrap_err();
    assert_eq!(e.to_string(), "c.yaml:5:5: refused by the check");
    assert!(Config::parse(text, "c.yaml").is_ok());
}

mod prop {
    use crate::validate::log_level;
    use proptest::prelude::*;

    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Any text: no panic; accepted only when every directive is a level or `target=level`.
        #[test]
        fn log_levels_are_levels_or_directives(level in any::<String>()) {
            let expected = {
                let ds: Vec<&str> = level.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
                !ds.is_empty() && ds.iter().all(|d| match d.rsplit_once('=') {
                    Some((t, l)) => !t.trim().is_empty() && LEVELS.contains(&l.trim().to_ascii_lowercase().as_str()),
                    None => LEVELS.contains(&d.to_ascii_lowercase().as_str()),
                })
            };
            prop_assert_eq!(log_level(&level).is_ok(), expected);
        }

        /// A word that is no level is refused, alone or beside a level.
        #[test]
        fn a_bare_word_is_refused(word in "[a-z_]{1,12}") {
            prop_assume!(!LEVELS.contains(&word.as_str()));
            prop_assert!(log_level(&word).is_err());
            let beside = format!("info,{word}");
            prop_assert!(log_level(&beside).is_err());
            let directive = format!("{word}=debug");
            prop_assert!(log_level(&directive).is_ok());
        }
    }
}
