//! A hostile or broken identity provider and token store, through the real sidecar binary
//! (issue 11): redirects of credential-bearing calls, error texts that echo the credentials,
//! answers of 50 MB, a FIFO at the store path, and kill -9 while refreshes run.

mod support;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use sidecar_mocks::{Catcher, Hostile, IdpConfig, MockIdp, MockUpstream, UpstreamConfig};
use sidecar_token::Store;
use support::providers::{keygen, provider_status};
use support::{wait_until, Scratch, Sidecar};

/// The client secret, the password and the API key: characters that every encoding changes.
const CS: &str = "cs/+ SECRET=1&x";
const PW: &str = "pw/+ SECRET\"2";
const KEY: &str = "key/+ SECRET\"3";
const CLIENT: &str = "demo client";
const PROVIDERS: [&str; 4] = ["cc_basic", "cc_post", "pw", "jl"];

async fn idp() -> MockIdp {
    MockIdp::start(IdpConfig {
        client_id: CLIENT.to_owned(),
        client_secret: CS.to_owned(),
        users: vec![("alice".to_owned(), PW.to_owned())],
        api_keys: vec![("demo-user".to_owned(), KEY.to_owned())],
        ..IdpConfig::default()
    })
    .await
}

/// Every provider type that sends credentials to an IdP URL, each behind its own route
/// `/<provider>/`; requests wait at most 300 ms for a token.
fn credential_providers(idp: &MockIdp, api: &MockUpstream) -> String {
    let refresh = "refresh: { min_interval: 0s, backoff: [200ms] }";
    let mut yaml = format!(
        r#"log: {{ level: debug }}
replay: {{ wait_for_token: 300ms }}
providers:
  cc_basic:
    type: oauth2_client_credentials
    token_url: "{token}"
    client_id: "{CLIENT}"
    client_secret: "${{env:CS}}"
    {refresh}
  cc_post:
    type: oauth2_client_credentials
    token_url: "{token}"
    client_id: "{CLIENT}"
    client_secret: "${{env:CS}}"
    client_auth: client_secret_post
    {refresh}
  pw:
    type: oauth2_password
    token_url: "{token}"
    client_id: "{CLIENT}"
    client_secret: "${{env:CS}}"
    username: alice
    password: "${{env:PW}}"
    {refresh}
  jl:
    type: json_login
    login: {{ url: "{login}", body: {{ userName: demo-user, apiKey: "${{env:KEY}}" }}, token_pointer: /token, success_pointer: /success }}
    {refresh}
upstreams:
"#,
        token = idp.token_url(),
        login = idp.login_url(),
    );
    for p in PROVIDERS {
        yaml.push_str(&format!(
            "  - {{ name: {p}, url: \"{}\", provider: {p}, match: {{ path_prefix: /{p} }} }}\n",
            api.url()
        ));
    }
    yaml
}

const ENV: [(&str, &str); 3] = [("CS", CS), ("PW", PW), ("KEY", KEY)];

/// Waits until every provider of [`PROVIDERS`] has a `last_error` containing `needle`.
async fn wait_errors(sc: &Sidecar, needle: &str) -> serde_json::Value {
    sc.wait_status(Duration::from_secs(20), |v| {
        PROVIDERS.iter().all(|p| {
            provider_status(v, p)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(needle))
        })
    })
    .await
}

fn form(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(char::from(b))
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Every way the secrets may come back from an IdP that echoes the request.
fn forbidden() -> Vec<String> {
    let b64 = |s: &str| {
        base64::engine::general_purpose::STANDARD
            .encode(s)
            .trim_end_matches('=')
            .to_owned()
    };
    let mut out = vec!["SECRET".to_owned()];
    for s in [CS, PW, KEY] {
        out.push(form(s));
        out.push(form(s).replace('+', "%20"));
        out.push(
            serde_json::to_string(s)
                .unwrap()
                .trim_matches('"')
                .to_owned(),
        );
    }
    out.push(b64(&format!("{CLIENT}:{CS}")));
    out.push(b64(&format!("{}:{}", form(CLIENT), form(CS))));
    out
}

#[tokio::test]
async fn redirects_are_refused_and_no_credential_reaches_the_redirect_target() {
    let idp = idp().await;
    let elsewhere = Catcher::start().await;
    idp.set_hostile(Some(Hostile::Redirect(elsewhere.url())));
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let sc = Sidecar::start_with_env(&credential_providers(&idp, &api), &ENV).await;

    let status = wait_errors(&sc, "not followed").await;
    for p in PROVIDERS {
        let s = provider_status(&status, p);
        assert_ne!(s["state"], "valid", "{p}: {s}");
        assert!(
            s["last_error"].as_str().unwrap().contains("307"),
            "{p}: {s}"
        );
    }
    assert!(idp.calls() >= 4);
    assert_eq!(
        elsewhere.connections(),
        0,
        "the redirect target was contacted: {:?}",
        String::from_utf8_lossy(&elsewhere.received())
    );
    // Nothing from the foreign host was used either.
    let r = reqwest::get(sc.url("/cc_post/x")).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(api.count(), 0);
}

#[tokio::test]
async fn echoed_credentials_never_reach_status_readyz_logs_or_clients() {
    let idp = idp().await;
    idp.set_hostile(Some(Hostile::EchoCredentials));
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let sc = Sidecar::start_with_env(&credential_providers(&idp, &api), &ENV).await;

    let status = wait_errors(&sc, "rejected").await;
    let status_text = sc.admin_text("/v1/token/status").await;
    // The echo made it (this test would pass vacuously otherwise), scrubbed.
    for p in PROVIDERS {
        let e = provider_status(&status, p)["last_error"].as_str().unwrap();
        assert!(e.contains("<redacted>"), "{p}: {e}");
    }
    let ready = reqwest::get(sc.admin_url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready_text = ready.text().await.unwrap();
    assert!(ready_text.contains("rejected"), "{ready_text}");
    let mut answers = Vec::new();
    for p in PROVIDERS {
        let r = reqwest::get(sc.url(&format!("/{p}/x"))).await.unwrap();
        assert_eq!(r.status(), 503, "{p}");
        answers.push(r.text().await.unwrap());
    }
    assert!(
        answers.iter().any(|a| a.contains("rejected")),
        "{answers:?}"
    );
    let logs = sc.logs();
    assert!(logs.contains("rejected Authorization"), "{logs}");
    for (what, text) in [
        ("status", &status_text),
        ("readyz", &ready_text),
        ("503 bodies", &answers.join("\n")),
        ("log", &logs),
    ] {
        for bad in forbidden() {
            assert!(!text.contains(&bad), "{bad:?} in the {what}:\n{text}");
        }
    }
}

#[tokio::test]
async fn a_50_mb_idp_answer_is_refused_without_being_read() {
    const HUGE: u64 = 50_000_000;
    let idp = idp().await;
    idp.set_hostile(Some(Hostile::HugeBody {
        bytes: HUGE,
        declare_length: false,
    }));
    let yaml = format!(
        r#"providers:
  main:
    type: oauth2_client_credentials
    token_url: "{}"
    client_id: "{CLIENT}"
    client_secret: "${{env:CS}}"
    refresh: {{ backoff: [200ms] }}
"#,
        idp.token_url()
    );
    let sc = Sidecar::start_with_env(&yaml, &ENV).await;
    let status = sc
        .wait_status(Duration::from_secs(20), |v| {
            provider_status(v, "main")["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("larger than 1 MiB"))
        })
        .await;
    assert_ne!(provider_status(&status, "main")["state"], "valid");
    // Each attempt hung up early: what went out per answer is what socket buffers hold, not
    // 50 MB (the connection is closed, the mock stops producing).
    idp.set_hostile(None);
    wait_until(
        Duration::from_secs(20),
        || async { idp.streams_open() == 0 },
        || "a huge answer was never closed".to_owned(),
    )
    .await;
    let per_answer = idp.streamed_bytes() / idp.calls().max(1) as u64;
    let peak = std::fs::read_to_string(format!("/proc/{}/status", sc.pid()))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .map(str::to_owned)
        .unwrap_or_default();
    eprintln!(
        "{} answers, {per_answer} bytes sent per answer; sidecar {peak}",
        idp.calls()
    );
    assert!(
        per_answer < HUGE / 4,
        "{per_answer} bytes sent per 50 MB answer"
    );
    // And the provider recovers once the IdP is sane.
    sc.wait_status(Duration::from_secs(20), |v| {
        provider_status(v, "main")["state"] == "valid"
    })
    .await;
    assert!(!sc.logs().contains("panicked"));
}

fn cc_with_store(idp: &MockIdp, api: &MockUpstream, store: &Path) -> String {
    format!(
        r#"providers:
  main:
    type: oauth2_client_credentials
    token_url: "{}"
    client_id: "{CLIENT}"
    client_secret: "${{env:CS}}"
    store: {{ path: "{}", key: "${{env:STORE_KEY}}" }}
    refresh: {{ skew: 0s, min_interval: 0s, backoff: [100ms] }}
upstreams:
  - {{ name: api, url: "{}", provider: main }}
"#,
        idp.token_url(),
        store.display(),
        api.url()
    )
}

#[tokio::test]
async fn a_fifo_at_the_store_path_is_refused_and_the_provider_logs_in_afresh() {
    let idp = idp().await;
    let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
    let dir = Scratch::new("store-fifo");
    let store = dir.path("main.tok");
    let made = std::process::Command::new("mkfifo")
        .arg(&store)
        .status()
        .unwrap();
    assert!(made.success());
    let key = keygen();
    let sc = Sidecar::start_with_env(
        &cc_with_store(&idp, &api, &store),
        &[("CS", CS), ("STORE_KEY", &key)],
    )
    .await;
    // A provider stuck opening the FIFO never gets here.
    sc.wait_status(Duration::from_secs(20), |v| {
        provider_status(v, "main")["state"] == "valid"
    })
    .await;
    let r = reqwest::get(sc.url("/x")).await.unwrap();
    assert_eq!(r.status(), 200, "{}", sc.logs());
    assert_eq!(idp.calls(), 1);
    let logs = sc.logs();
    assert!(
        logs.contains("token store ignored") && logs.contains("is a FIFO, not a regular file"),
        "{logs}"
    );
    // The new token replaced the FIFO with a store file.
    assert!(std::fs::metadata(&store).unwrap().is_file());
    let record = Store::new(&store, &key, "main").load().unwrap().unwrap();
    assert_eq!(record.generation, 1);
}

/// A pid no process has now.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

/// Every file of the store directory: none may hold a token in clear (the mock's tokens all
/// start with `tok_`).
fn assert_no_plaintext(dir: &Path, when: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "log") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap_or_default();
        assert!(
            !bytes.windows(4).any(|w| w == b"tok_"),
            "{when}: {} holds a token in clear",
            path.display()
        );
    }
}

#[tokio::test]
async fn kill_9_during_refreshes_never_corrupts_the_store_and_stale_temp_files_go() {
    const LIVES: usize = 50;
    let idp = MockIdp::start(IdpConfig {
        client_id: CLIENT.to_owned(),
        client_secret: CS.to_owned(),
        // The shortest lifetime the mock issues: proactive refreshes every half second, on
        // top of the forced ones below.
        ttl: Duration::from_secs(1),
        ..IdpConfig::default()
    })
    .await;
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let dir = Scratch::new("kill9");
    let store = dir.path("main.tok");
    let key = keygen();
    let yaml = cc_with_store(&idp, &api, &store);
    let env = [("CS", CS), ("STORE_KEY", key.as_str())];

    // What an interrupted write of a previous life leaves: removed at start.
    let stale = dir.path(&format!(".main.tok.tmp-{}-0badc0", dead_pid()));
    std::fs::write(&stale, b"tok_half-written-plaintext").unwrap();

    let client = reqwest::Client::new();
    let mut kills_mid_write = 0;
    for life in 0..LIVES {
        let mut sc = Sidecar::start_with_env(&yaml, &env).await;
        if life == 0 {
            wait_until(
                Duration::from_secs(10),
                || async { !stale.exists() },
                || format!("the stale temp file was not removed\n{}", sc.logs()),
            )
            .await;
        }
        // Forced refreshes back to back, and the proactive ones; killed after a varying number.
        let calls = idp.calls();
        let target = calls + 1 + life % 7;
        let admin = sc.admin_url("/v1/token/refresh?provider=main");
        let hammer = {
            let client = client.clone();
            tokio::spawn(async move {
                loop {
                    let _ = client.post(&admin).send().await;
                }
            })
        };
        wait_until(
            Duration::from_secs(20),
            || async { idp.calls() >= target },
            || format!("life {life}: no refreshes\n{}", sc.logs()),
        )
        .await;
        sc.signal("KILL");
        sc.wait_exit(Duration::from_secs(10))
            .await
            .expect("kill -9 did not end the sidecar");
        hammer.abort();

        // Whatever moment the kill hit: the store decrypts, and nothing holds a token in clear.
        let record = Store::new(&store, &key, "main").load();
        let record = record.unwrap_or_else(|e| panic!("life {life}: {e}"));
        assert!(record.is_some() || life == 0, "life {life}: no store file");
        assert_no_plaintext(&dir.0, &format!("life {life}"));
        let temps = std::fs::read_dir(&dir.0)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            })
            .count();
        kills_mid_write += usize::from(temps > 0);
    }
    // The next start cleans what the last kill left and serves.
    let sc = Sidecar::start_with_env(&yaml, &env).await;
    sc.wait_status(Duration::from_secs(20), |v| {
        provider_status(v, "main")["state"] == "valid"
    })
    .await;
    wait_until(
        Duration::from_secs(10),
        || async {
            std::fs::read_dir(&dir.0)
                .unwrap()
                .all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp-"))
        },
        || format!("temp files left after a start\n{}", sc.logs()),
    )
    .await;
    assert!(!sc.logs().contains("panicked"));
    eprintln!("{LIVES} kills, {kills_mid_write} of them left a temp file");
}
