//! `token-sidecar check` as an operator runs it: it refuses what `run` would refuse or silently
//! mishandle, at the offending key's line and column, prints a YAML syntax error's place once,
//! and warns (exit 0, stderr) about what is allowed but suspicious.

mod support;

use support::providers::testdata;
use support::{run_cli, Scratch};

/// Runs `check` on `text`; (exit code, stdout, stderr, the file's path as printed).
fn check(tag: &str, text: &str, env: &[(&str, &str)]) -> (i32, String, String, String) {
    let scratch = Scratch::new(tag);
    let path = scratch.path("sidecar.yaml");
    std::fs::write(&path, text).unwrap();
    let file = path.display().to_string();
    let (code, out, err) = run_cli(&["check", "-c", &file], env);
    (code, out, err, file)
}

/// `check` fails with exactly one line on stderr, `file:line:col: …`, and prints no config.
fn refused(tag: &str, text: &str, line: usize, col: usize, part: &str) -> String {
    let (code, out, err, file) = check(tag, text, &[]);
    assert_eq!(code, 1, "accepted:\n{text}\nstderr: {err}");
    assert!(out.is_empty(), "printed a config: {out}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    let want = format!("{file}:{line}:{col}: ");
    assert!(lines[0].starts_with(&want), "want {want}…, got {err}");
    assert!(lines[0].contains(part), "{part:?} missing: {err}");
    err
}

const API: &str = "upstreams:\n  - { name: api, url: 'http://127.0.0.1:9', provider: main }\n";

#[test]
fn an_unknown_log_level_is_refused_at_its_key() {
    // Accepted before: the running sidecar then logged nothing at all, errors included.
    refused(
        "level",
        &format!("providers:\n  main: {{ type: static, token: t }}\n{API}log:\n  format: text\n  level: verbose\n"),
        7,
        3,
        "\"verbose\" is not a log level",
    );
}

#[test]
fn an_unusable_private_key_is_refused_at_its_key_without_showing_it() {
    let pem = std::fs::read_to_string(testdata("ec-sec1.pem")).unwrap();
    let scratch = Scratch::new("key-file");
    let key = scratch.path("client.pem");
    std::fs::write(&key, &pem).unwrap();
    let text = format!(
        "providers:\n  main:\n    type: oauth2_client_credentials\n    token_url: https://idp.example.com/t\n    client_id: c\n    client_auth: private_key_jwt\n    private_key: \"${{file:{}}}\"\n{API}",
        key.display()
    );
    let err = refused("key", &text, 7, 5, "SEC1");
    let body = pem.lines().nth(1).unwrap();
    assert!(
        !err.contains(&body[..20]) && !err.contains("BEGIN"),
        "{err}"
    );

    // `run` refuses it the same way instead of retrying a refresh that can never work.
    let path = scratch.path("sidecar.yaml");
    std::fs::write(&path, &text).unwrap();
    let (code, _, run_err) = run_cli(&["run", "-c", &path.display().to_string()], &[]);
    assert_eq!(code, 1, "{run_err}");
    assert!(
        run_err.contains(":7:5: ") && run_err.contains("SEC1"),
        "{run_err}"
    );
}

#[test]
fn a_missing_store_directory_is_refused_at_its_key() {
    refused(
        "store",
        &format!(
            "providers:\n  main:\n    type: static\n    token: t\n    store:\n      key: k\n      path: /nonexistent-token-sidecar-dir/main.tok\n{API}"
        ),
        7,
        7,
        "/nonexistent-token-sidecar-dir",
    );
}

#[test]
fn an_unset_environment_reference_is_refused_at_its_key() {
    refused(
        "env",
        &format!(
            "providers:\n  main:\n    type: static\n    token: \"${{env:SIDECAR_OPS_CHECK_UNSET}}\"\n{API}"
        ),
        4,
        12,
        "SIDECAR_OPS_CHECK_UNSET",
    );
}

#[test]
fn an_error_in_upstream_a_is_not_reported_at_upstream_api() {
    // The old text search found `name: a` inside `name: api` and pointed at line 2.
    refused(
        "a-api",
        "upstreams:\n  - name: api\n    url: http://127.0.0.1:9\n  - name: a\n    url: http://127.0.0.1:10\n    match: { path_prefix: nope }\n",
        6,
        14,
        "path_prefix must start with /",
    );
}

#[test]
fn a_yaml_syntax_error_names_its_place_once() {
    let err = refused(
        "syntax",
        "upstreams:\n  - name: a\n   url: http://127.0.0.1:9\n",
        3,
        4,
        "did not find expected '-' indicator",
    );
    assert!(
        !err.contains("line 3 column 4"),
        "place printed twice: {err}"
    );
}

#[test]
fn suspicious_configs_pass_with_warnings_on_stderr() {
    let text = "\
providers:
  main:
    type: oauth2_client_credentials
    token_url: http://idp.example.com/oauth2/token
    client_id: c
    client_secret: s
  spare: { type: static, token: t }
upstreams:
  - { name: api, url: 'http://127.0.0.1:9', provider: main }
  - { name: other, url: 'http://127.0.0.1:10' }
";
    let (code, out, err, file) = check("warn", text, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("upstreams:"), "the config is printed: {out}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains(": warning: ")).collect();
    assert_eq!(warnings.len(), 3, "{err}");
    assert!(
        warnings[0].starts_with(&format!("{file}:4:5: warning: "))
            && warnings[0].contains("plain http"),
        "{err}"
    );
    assert!(
        warnings[1].starts_with(&format!("{file}:7:3: warning: "))
            && warnings[1].contains("\"spare\" is used by no upstream"),
        "{err}"
    );
    assert!(
        warnings[2].starts_with(&format!("{file}:10:7: warning: "))
            && warnings[2].contains("\"other\" never gets a request"),
        "{err}"
    );
    assert!(err.contains("valid, with 3 warnings"), "{err}");
    // Nothing on stdout but the config.
    assert!(!out.contains("warning"), "{out}");

    // A clean config has no warning.
    let (code, _, err, _) = check(
        "clean",
        &format!("providers:\n  main: {{ type: static, token: t }}\n{API}"),
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "{err}");
}
