//! `token-sidecar demo`: a mock identity provider and a mock API on loopback, the sidecar in front
//! of them, and a short scripted client that shows what the sidecar does.

use std::sync::Arc;
use std::time::Duration;

use sidecar_config::Config;
use sidecar_mocks::{IdpConfig, MockIdp, MockUpstream, UpstreamConfig};

use crate::app::App;

/// Runs the demo; returns the exit code.
pub fn run(listen: &str, admin_listen: &str, exit_after: bool) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("demo")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the demo runtime: {e}");
            return 1;
        }
    };
    let (idp, api) = rt.block_on(async {
        let idp = MockIdp::start(IdpConfig {
            ttl: Duration::from_secs(4),
            latency: Duration::from_millis(30),
            ..IdpConfig::default()
        })
        .await;
        let api = MockUpstream::start(UpstreamConfig::checking(idp.registry())).await;
        (Arc::new(idp), Arc::new(api))
    });
    let yaml = format!(
        r#"
listen: "{listen}"
admin_listen: "{admin_listen}"
shutdown_grace: 2s
providers:
  demo:
    type: oauth2_client_credentials
    token_url: "{token_url}"
    client_id: demo-client
    client_secret: demo-secret
    refresh: {{ before_expiry: 2s, skew: 0s, min_interval: 500ms, backoff: [500ms, 1s] }}
upstreams:
  - name: demo-api
    url: "{api_url}"
    provider: demo
rate_limits:
  - {{ name: history, upstream: demo-api, match: {{ methods: [POST], path: "/api/History/**" }}, rate: 5/1s, burst: 5, mode: reject }}
log: {{ level: "warn,token_sidecar=info,sidecar_token=info", format: text, access_log: false }}
"#,
        token_url = idp.token_url(),
        api_url = api.url(),
    );
    let config = match Config::parse(&yaml, "<demo>") {
        Ok(c) => c,
        Err(e) => {
            eprintln!("demo config: {e}");
            return 1;
        }
    };
    println!("token-sidecar demo");
    println!(
        "  mock identity provider  {}  (tokens live 4 s, answers in 30 ms)",
        idp.url()
    );
    println!(
        "  mock API                {}  (accepts only live tokens from that IdP)",
        api.url()
    );
    println!("  sidecar                 http://{listen}  (admin http://{admin_listen})");
    let listen = listen.to_string();
    let admin = admin_listen.to_string();
    let handle = rt.handle().clone();
    let script: Box<dyn FnOnce(Arc<App>) + Send> = Box::new(move |_app| {
        let (idp, api) = (idp.clone(), api.clone());
        handle.spawn(async move {
            let code = script(&listen, &admin, &idp, &api, exit_after).await;
            if exit_after {
                std::process::exit(code);
            }
        });
    });
    let code = crate::server::serve(config, Some(script));
    drop(rt);
    code
}

async fn join_gets(client: &reqwest::Client, base: &str, n: usize) -> Vec<u16> {
    futures::future::join_all((0..n).map(|i| {
        let c = client.clone();
        let url = format!("{base}/orders/{i}");
        async move {
            c.get(url)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    }))
    .await
}

async fn script(
    listen: &str,
    admin: &str,
    idp: &MockIdp,
    api: &MockUpstream,
    exit_after: bool,
) -> i32 {
    let client = reqwest::Client::new();
    let base = format!("http://{listen}");
    // Wait (bounded) for the listener.
    let mut up = false;
    for _ in 0..100 {
        if client
            .get(format!("http://{admin}/healthz"))
            .send()
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !up {
        println!("demo: the sidecar did not come up");
        return 1;
    }
    println!("\n1) 60 requests over 9 s while tokens expire every 4 s");
    let mut ok = 0;
    let mut other = 0usize;
    for _ in 0..60 {
        match client.get(format!("{base}/orders?page=1")).send().await {
            Ok(r) if r.status() == 200 => ok += 1,
            _ => other += 1,
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let tokens: std::collections::BTreeSet<String> =
        api.requests().into_iter().filter_map(|r| r.token).collect();
    println!(
        "   {ok} answered 200, {other} did not; the API saw {} different tokens; the IdP was called {} times",
        tokens.len(),
        idp.calls()
    );
    println!("   the client never sent a token: the sidecar injected a fresh one and rotated it in the background");
    println!("\n2) the API revokes every token it accepted; 50 concurrent GETs follow");
    let calls_before = idp.calls();
    idp.registry().revoke_all();
    let seen_before = api.count();
    let answers = join_gets(&client, &base, 50).await;
    let ok2 = answers.iter().filter(|s| **s == 200).count();
    let rejected = api
        .requests()
        .into_iter()
        .skip(seen_before)
        .filter(|r| r.status == 401)
        .count();
    println!(
        "   {ok2}/50 answered 200. {rejected} of them reached the API with the revoked token and got 401"
    );
    println!(
        "   (the others left the sidecar after it already held the new token); the sidecar held every 401 back,"
    );
    println!(
        "   made {} identity-provider call(s) for all of them together, and replayed them with the new token",
        idp.calls() - calls_before
    );
    other += 50 - ok2;

    println!(
        "\n3) 12 POSTs at once to /api/History/search under a limit of 5 per second (mode: reject)"
    );
    let posts = futures::future::join_all((0..12).map(|_| {
        let c = client.clone();
        let url = format!("{base}/api/History/search");
        async move {
            c.post(url)
                .body("{}")
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    }))
    .await;
    let passed = posts.iter().filter(|s| **s == 200).count();
    let limited = posts.iter().filter(|s| **s == 429).count();
    println!("   {passed} went through, {limited} got 429 rate_limited with Retry-After: the API never saw more than the limit");

    if let Ok(r) = client
        .get(format!("http://{admin}/v1/token/status"))
        .send()
        .await
    {
        if let Ok(text) = r.text().await {
            println!("\n4) token status (GET http://{admin}/v1/token/status) — a fingerprint, never the token:\n   {text}");
        }
    }
    if exit_after {
        println!("\n--exit: the demo ends here.");
    } else {
        println!("\nThe sidecar keeps serving. Try:\n   curl -s http://{listen}/hello\n   curl -s http://{admin}/v1/token/status\n   curl -s http://{admin}/metrics | grep sidecar_\nStop with Ctrl-C.");
    }
    i32::from(other > 0)
}
