//! The provider types that get their token on the machine, end to end through the real binary
//!: `exec` (every output format, failures, a hanging command), `file` (replaced by
//! rename, Kubernetes symlink swap) and `static`.

mod support;

use std::time::Duration;

use sidecar_mocks::{MockUpstream, UpstreamConfig};
use support::providers::{
    force_refresh, healthy, idp_ttl, provider_status, through, token_of, HOUR, REFRESH,
};
use support::{replace_atomically, wait_until, Scratch, Sidecar};

#[tokio::test]
async fn exec_provider_runs_the_command_for_every_token() {
    let idp = idp_ttl(HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let dir = Scratch::new("exec");
    let script = dir.path("get-token.sh");
    let write_script = |token: &str| {
        replace_atomically(
            &script,
            &format!(
                "#!/bin/sh\necho \"get-token: issuing for $TOKEN_AUDIENCE\" >&2\nprintf '%s\\n' '{{\"token\": \"{token}\", \"expires_in\": 3600}}'\n"
            ),
        );
    };
    let t1 = idp.registry().issue(HOUR);
    write_script(&t1);
    let yaml = format!(
        r#"providers:
  ex:
    type: exec
    command: ["/bin/sh", "{}"]
    timeout: 10s
    env: {{ TOKEN_AUDIENCE: orders-api }}
    {REFRESH}
upstreams:
  - {{ name: api, url: "{}", provider: ex }}
"#,
        script.display(),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    assert_eq!(token_of(&through(&sc, &api, "/a").await), t1);
    let status = force_refresh(&sc, "ex").await;
    assert_eq!(status["generation"], 2);
    // The command's expires_in is the token's lifetime.
    let ttl = status["ttl_seconds"].as_f64().unwrap();
    assert!(ttl > 3000.0 && ttl <= 3600.0, "{status}");

    let t2 = idp.registry().issue(HOUR);
    write_script(&t2);
    force_refresh(&sc, "ex").await;
    assert_eq!(token_of(&through(&sc, &api, "/b").await), t2);
    let logs = sc.logs();
    // stderr is logged, stdout never; the env the sidecar passed (config secrets) is scrubbed
    // from it, so its value shows as <redacted>.
    assert!(logs.contains("get-token: issuing for <redacted>"), "{logs}");
    assert!(!logs.contains("orders-api"), "{logs}");
    assert!(
        !logs.contains(&t1) && !logs.contains(&t2),
        "stdout of the command leaked into the logs:\n{}",
        logs.replace(&t1, "<token 1>").replace(&t2, "<token 2>")
    );
    healthy(&sc).await;
}

/// `2026-11-22T08:00:00Z` for a Unix time (days-to-civil, proleptic Gregorian).
fn rfc3339(unix: u64) -> String {
    let (days, secs) = ((unix / 86_400) as i64, unix % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn exec_provider_reads_exec_credentials_expires_at_and_bare_lines_and_logs_failures() {
    let idp = idp_ttl(HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let dir = Scratch::new("exec-formats");
    let registry = idp.registry();
    let (k8s, at, bare, hidden) = (
        registry.issue(HOUR),
        registry.issue(HOUR),
        registry.issue(HOUR),
        registry.issue(HOUR),
    );
    let now = unix_now();
    let scripts = [
        (
            "k8s",
            format!(
                r#"{{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{{"token":"{k8s}","expirationTimestamp":"{}"}}}}"#,
                rfc3339(now + 7200)
            ),
            0,
        ),
        (
            "at",
            format!(r#"{{"token":"{at}","expires_at":{}}}"#, now + 5400),
            0,
        ),
        ("bare", format!("{bare}\nsecond line ignored"), 0),
        ("fails", hidden.clone(), 3),
    ];
    let mut yaml = String::from("providers:\n");
    let mut routes = String::from("upstreams:\n");
    for (name, out, code) in &scripts {
        let path = dir.path(&format!("{name}.sh"));
        std::fs::write(
            &path,
            format!("#!/bin/sh\ncat <<'EOF'\n{out}\nEOF\necho '{name}: vault is sealed' >&2\nexit {code}\n"),
        )
        .unwrap();
        yaml += &format!(
            "  {name}: {{ type: exec, command: [\"/bin/sh\", \"{}\"], default_ttl: 45m, {REFRESH} }}\n",
            path.display()
        );
        routes += &format!(
            "  - {{ name: {name}, url: \"{}\", provider: {name}, match: {{ path_prefix: /{name} }} }}\n",
            api.url()
        );
    }
    // A command that hangs is killed after its timeout.
    yaml += "  hangs: { type: exec, command: [\"/bin/sh\", \"-c\", \"exec sleep 60\"], timeout: 300ms, refresh: { backoff: [1h] } }\n";
    yaml += &routes;
    yaml += "replay: { wait_for_token: 1s }\n";
    let sc = Sidecar::start(&yaml).await;
    assert_eq!(token_of(&through(&sc, &api, "/k8s").await), k8s);
    assert_eq!(token_of(&through(&sc, &api, "/at").await), at);
    assert_eq!(token_of(&through(&sc, &api, "/bare").await), bare);
    let status = sc
        .wait_status(Duration::from_secs(15), |v| {
            ["fails", "hangs"]
                .iter()
                .all(|n| provider_status(v, n)["refresh_failed"].as_u64() >= Some(1))
        })
        .await;
    // Lifetimes: the ExecCredential's expirationTimestamp (2 h), expires_at (1.5 h), and
    // default_ttl (45 min) for a bare line.
    let ttl = |name: &str| {
        provider_status(&status, name)["ttl_seconds"]
            .as_f64()
            .unwrap()
    };
    assert!(ttl("k8s") > 6000.0 && ttl("k8s") <= 7200.0, "{status}");
    assert!(ttl("at") > 4000.0 && ttl("at") <= 5400.0, "{status}");
    assert!(ttl("bare") > 2000.0 && ttl("bare") <= 2700.0, "{status}");

    let fails = provider_status(&status, "fails");
    assert_ne!(fails["state"], "valid");
    let error = fails["last_error"].as_str().unwrap();
    assert!(
        error.contains("exited with 3") && error.contains("vault is sealed"),
        "{status}"
    );
    let hangs = provider_status(&status, "hangs")["last_error"]
        .as_str()
        .unwrap();
    assert!(hangs.contains("did not finish within"), "{status}");
    let r = reqwest::get(sc.url("/fails")).await.unwrap();
    assert_eq!(r.status(), 503);
    let logs = sc.logs();
    assert!(logs.contains("fails: vault is sealed"), "{logs}");
    for t in [&k8s, &at, &bare, &hidden] {
        assert!(
            !logs.contains(t.as_str()),
            "stdout of a command leaked into the logs"
        );
    }
    healthy(&sc).await;
}

#[tokio::test]
async fn file_provider_picks_up_a_replaced_token_file() {
    let idp = idp_ttl(HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let dir = Scratch::new("file");
    let file = dir.path("api-token");
    let t1 = idp.registry().issue(HOUR);
    replace_atomically(&file, &format!("{t1}\n"));
    let yaml = format!(
        r#"providers:
  fi:
    type: file
    path: "{}"
    {REFRESH}
upstreams:
  - {{ name: api, url: "{}", provider: fi }}
"#,
        file.display(),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    assert_eq!(token_of(&through(&sc, &api, "/a").await), t1);

    // Replaced by rename (a new inode), like a projected service-account token.
    let t2 = idp.registry().issue(HOUR);
    replace_atomically(&file, &format!("{t2}\n"));
    wait_until(
        Duration::from_secs(20),
        || async {
            let seen = token_of(&through(&sc, &api, "/poll").await);
            // Until the new token is picked up, the old one is sent.
            assert!(
                seen == t2 || seen == t1,
                "neither the old nor the new token"
            );
            seen == t2
        },
        || format!("the new token file was never picked up\n{}", sc.logs()),
    )
    .await;
    // From then on only the new token is sent.
    assert_eq!(token_of(&through(&sc, &api, "/b").await), t2);
    healthy(&sc).await;
}

#[tokio::test]
async fn file_provider_follows_a_kubernetes_style_symlink_swap() {
    use std::os::unix::fs::symlink;
    let idp = idp_ttl(HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let dir = Scratch::new("file-k8s");
    // token -> ..data/token, ..data -> ..v1: how kubelet lays out projected volumes.
    let version = |name: &str, token: &str| {
        std::fs::create_dir(dir.path(name)).unwrap();
        std::fs::write(dir.path(name).join("token"), token).unwrap();
    };
    let t1 = idp.registry().issue(HOUR);
    version("..v1", &t1);
    symlink("..v1", dir.path("..data")).unwrap();
    symlink("..data/token", dir.path("token")).unwrap();
    let yaml = format!(
        "providers:\n  fi: {{ type: file, path: \"{}\", {REFRESH} }}\nupstreams:\n  - {{ name: api, url: \"{}\", provider: fi }}\n",
        dir.path("token").display(),
        api.url()
    );
    let sc = Sidecar::start(&yaml).await;
    assert_eq!(token_of(&through(&sc, &api, "/a").await), t1);

    // kubelet writes a new version and swaps the ..data symlink atomically.
    let t2 = idp.registry().issue(HOUR);
    version("..v2", &t2);
    symlink("..v2", dir.path("..data_tmp")).unwrap();
    std::fs::rename(dir.path("..data_tmp"), dir.path("..data")).unwrap();
    wait_until(
        Duration::from_secs(20),
        || async { token_of(&through(&sc, &api, "/poll").await) == t2 },
        || format!("the swapped token was never picked up\n{}", sc.logs()),
    )
    .await;
    std::fs::remove_dir_all(dir.path("..v1")).unwrap();
    assert_eq!(token_of(&through(&sc, &api, "/b").await), t2);
    healthy(&sc).await;
}

#[tokio::test]
async fn static_provider_injects_its_fixed_token() {
    let idp = idp_ttl(HOUR).await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let token = idp.registry().issue(HOUR);
    let yaml = format!(
        "providers:\n  st: {{ type: static, token: \"${{env:API_TOKEN}}\" }}\nupstreams:\n  - {{ name: api, url: \"{}\", provider: st }}\n",
        api.url()
    );
    let sc = Sidecar::start_with_env(&yaml, &[("API_TOKEN", &token)]).await;
    for path in ["/a", "/b", "/c"] {
        let seen = through(&sc, &api, path).await;
        assert_eq!(token_of(&seen), token);
        assert_eq!(
            seen.header("authorization"),
            Some(format!("Bearer {token}").as_str())
        );
    }
    assert_eq!(idp.calls(), 0);
    healthy(&sc).await;
}
