//! What can be checked of `docker/` without a Docker engine: the Dockerfile copies paths that
//! exist and builds the way CI does, every sample config passes `token-sidecar check`, the compose
//! and Kubernetes examples are wired as documented — and a Kubernetes-style ConfigMap update (the
//! kubelet's `..data` symlink swap) really reloads the running sidecar.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_yaml::Value;
use sidecar_mocks::{MockUpstream, UpstreamConfig};
use support::{run_cli, wait_until, Scratch, Sidecar};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("proxy/ lives in the workspace")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Dockerfile instructions with their continuation lines joined and comments dropped.
fn instructions(dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                if !current.trim().is_empty() {
                    out.push(current.trim().to_string());
                }
                current.clear();
            }
        }
    }
    out
}

fn keyword(instruction: &str) -> String {
    instruction
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase()
}

/// Workspace members from the root Cargo.toml.
fn workspace_members() -> Vec<String> {
    let manifest = read("Cargo.toml");
    let start = manifest
        .find("members")
        .and_then(|i| manifest[i..].find('[').map(|j| i + j + 1))
        .expect("members = [...] in Cargo.toml");
    let end = start + manifest[start..].find(']').expect("closing ]");
    manifest[start..end]
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

#[test]
fn the_dockerfile_copies_paths_that_exist_and_every_workspace_member() {
    let dockerfile = read("docker/Dockerfile");
    let mut sources = Vec::new();
    for ins in instructions(&dockerfile) {
        if !matches!(keyword(&ins).as_str(), "COPY" | "ADD") {
            continue;
        }
        let args: Vec<&str> = ins.split_whitespace().skip(1).collect();
        if args.iter().any(|a| a.starts_with("--from")) {
            continue; // from another stage, not the build context
        }
        let paths: Vec<&str> = args.into_iter().filter(|a| !a.starts_with("--")).collect();
        assert!(
            paths.len() >= 2,
            "COPY needs a source and a destination: {ins}"
        );
        for src in &paths[..paths.len() - 1] {
            let src = src.trim_end_matches('/');
            assert!(
                !src.contains("..") && !src.starts_with('/'),
                "{src} is outside the build context"
            );
            assert!(
                repo().join(src).exists(),
                "the Dockerfile copies {src}, which is not in the repository"
            );
            sources.push(src.trim_start_matches("./").to_string());
        }
    }
    for needed in ["Cargo.toml", "Cargo.lock"] {
        assert!(
            sources.iter().any(|s| s == needed),
            "{needed} is not copied"
        );
    }
    // Cargo loads every member of the workspace, even to build one package.
    for member in workspace_members() {
        assert!(
            sources.contains(&member),
            "workspace member {member} is not copied into the builder: {sources:?}"
        );
    }
}

/// `./dev release ...` up to the end of its shell command.
fn dev_release(text: &str) -> Option<String> {
    let start = text.find("./dev release")?;
    let rest = &text[start..];
    let end = rest.find(['&', ';', '|', '\n']).unwrap_or(rest.len());
    Some(rest[..end].split_whitespace().collect::<Vec<_>>().join(" "))
}

#[test]
fn the_dockerfile_builds_the_way_ci_does_into_a_small_non_root_image() {
    let dockerfile = read("docker/Dockerfile");
    let ci = read(".ci/run");
    let ci_build = ci
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("./dev release"))
        .and_then(dev_release)
        .expect("a ./dev release line in .ci/run");
    let ins = instructions(&dockerfile);
    let runs: Vec<&String> = ins.iter().filter(|i| keyword(i) == "RUN").collect();
    let builds: Vec<String> = runs.iter().filter_map(|r| dev_release(r)).collect();
    assert_eq!(builds, vec![ci_build.clone()], "Dockerfile vs .ci/run");
    assert!(
        !runs.iter().any(|r| r.contains("cargo build")),
        "the image is built by ./dev release only"
    );
    // Both take the binary from where `./dev release` puts it.
    let built = "target/pgo/";
    assert!(
        ci.contains(&format!("release=\"{built}")),
        ".ci/run uses {built}"
    );
    assert!(
        runs.iter()
            .any(|r| r.contains("./dev release") && r.contains(built)),
        "the Dockerfile installs the binary from {built}"
    );
    // `./dev release`: both of its builds are release builds from the lock file, the first
    // instrumented and the second using the profile the training run left.
    let dev = read("dev");
    let cargo_builds: Vec<&str> = dev
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && l.contains("cargo build"))
        .collect();
    assert_eq!(cargo_builds.len(), 2, "{cargo_builds:?}");
    for b in &cargo_builds {
        assert!(b.contains("--release") && b.contains("--locked"), "{b}");
    }
    assert!(
        cargo_builds[0].contains("-Cprofile-generate="),
        "{cargo_builds:?}"
    );
    assert!(
        cargo_builds[1].contains("-Cprofile-use="),
        "{cargo_builds:?}"
    );
    assert!(dev.contains("--train"), "./dev release runs the training");

    // Multi-stage: a builder and a runtime stage that takes only the binary.
    let froms: Vec<&String> = ins.iter().filter(|i| keyword(i) == "FROM").collect();
    assert!(froms.len() >= 2, "{froms:?}");
    assert!(
        ins.iter()
            .any(|i| keyword(i) == "COPY" && i.contains("--from=builder")),
        "the runtime stage copies the binary from the builder"
    );
    // Whatever runs last is not root.
    let user = ins
        .iter()
        .rev()
        .find(|i| keyword(i) == "USER")
        .expect("a USER instruction");
    let who = user.split_whitespace().nth(1).unwrap_or_default();
    let uid = who.split(':').next().unwrap_or_default();
    assert!(!["root", "0"].contains(&uid), "{user}");
    // A health check on /healthz with a tool the runtime stage installs.
    let health = ins
        .iter()
        .find(|i| keyword(i) == "HEALTHCHECK")
        .expect("a HEALTHCHECK");
    assert!(health.contains("/healthz"), "{health}");
    let runtime_from = ins
        .iter()
        .rposition(|i| keyword(i) == "FROM")
        .expect("a runtime stage");
    if health.contains("curl") {
        assert!(
            ins[runtime_from..]
                .iter()
                .any(|i| keyword(i) == "RUN" && i.contains("install") && i.contains("curl")),
            "the health check uses curl, which the runtime stage must install"
        );
    }
    assert!(
        ins.iter().any(|i| keyword(i) == "ENV"
            && i.contains("TOKEN_SIDECAR_CONFIG=/etc/token-sidecar/sidecar.yaml")),
        "the config is read from /etc/token-sidecar/sidecar.yaml"
    );
    // The build context must not drag target/ along.
    let ignore = read("docker/Dockerfile.dockerignore");
    assert!(ignore
        .lines()
        .any(|l| l.trim().trim_end_matches('/') == "target"));
}

/// Without `tls.ca_file` the sidecar trusts the system store where OpenSSL looks for it
/// (`/etc/ssl/certs/ca-certificates.crt` on Debian): the runtime image must have that bundle, or
/// every HTTPS identity provider and upstream fails with `UnknownIssuer`.
#[test]
fn the_runtime_image_has_the_ca_bundle_the_sidecar_trusts() {
    let dockerfile = read("docker/Dockerfile");
    let ins = instructions(&dockerfile);
    let runtime_from = ins
        .iter()
        .rposition(|i| keyword(i) == "FROM")
        .expect("a runtime stage");
    let base = &ins[runtime_from];
    let debian = (base.contains("RUNTIME_IMAGE")
        && dockerfile.contains("ARG RUNTIME_IMAGE=debian:"))
        || base.contains("debian");
    assert!(
        debian,
        "a Debian runtime stage (apt's ca-certificates): {base}"
    );
    assert!(
        ins[runtime_from..].iter().any(|i| keyword(i) == "RUN"
            && i.contains("apt-get install")
            && i.contains("ca-certificates")),
        "the runtime stage installs ca-certificates"
    );
}

fn check_env() -> Vec<(&'static str, &'static str)> {
    // The same dummy values .ci/run exports for its check loop.
    vec![
        ("CLIENT_SECRET", "ci-dummy-secret"),
        ("TOKEN_SIDECAR_KEY", "ci-dummy-key"),
        ("API_TOKEN", "ci-dummy-token"),
        ("REDIS_PASSWORD", "ci-dummy-redis-password"),
    ]
}

fn assert_checks(path: &Path) {
    // The samples keep their token store where the image has its directory (docker/Dockerfile
    // creates /var/lib/token-sidecar); `check` refuses a store whose directory is missing.
    std::fs::create_dir_all("/var/lib/token-sidecar").expect("create the store directory");
    let (code, out, err) = run_cli(&["check", "-c", path.to_str().unwrap()], &check_env());
    assert_eq!(code, 0, "{} fails check:\n{err}", path.display());
    assert!(!out.contains("ci-dummy-secret"), "check printed a secret");
    // A sample shows a config without mistakes: nothing for check to warn about.
    assert!(!err.contains("warning"), "{} warns:\n{err}", path.display());
}

fn k8s_documents() -> Vec<Value> {
    let text = read("docker/k8s-sidecar.yaml");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("docker/k8s-sidecar.yaml: YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The sidecar config held by the example's ConfigMap.
fn configmap_config(docs: &[Value]) -> (String, String) {
    let cm = kind(docs, "ConfigMap");
    assert_eq!(cm.len(), 1, "one ConfigMap");
    let name = cm[0]["metadata"]["name"].as_str().unwrap().to_string();
    let text = cm[0]["data"]["sidecar.yaml"]
        .as_str()
        .expect("the ConfigMap has a sidecar.yaml key")
        .to_string();
    (name, text)
}

#[test]
fn every_sample_config_passes_check() {
    let mut checked = Vec::new();
    for dir in ["docker", "examples"] {
        let Ok(entries) = std::fs::read_dir(repo().join(dir)) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for path in paths {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let sample = match dir {
                // The files CI's check loop takes (`docker/*.sidecar.yaml`).
                "docker" => name.ends_with(".sidecar.yaml"),
                _ => name.ends_with(".yaml"),
            };
            if sample {
                assert_checks(&path);
                checked.push(format!("{dir}/{name}"));
            }
        }
    }
    assert!(
        checked.iter().any(|c| c.starts_with("docker/")),
        "no docker/*.sidecar.yaml: {checked:?}"
    );
    // The config inside the Kubernetes example's ConfigMap too.
    let scratch = Scratch::new("k8s-check");
    let (_, text) = configmap_config(&k8s_documents());
    let path = scratch.path("sidecar.yaml");
    std::fs::write(&path, text).unwrap();
    assert_checks(&path);
}

fn listen_port(config_text: &str, key: &str) -> u16 {
    let v: Value = serde_yaml::from_str(config_text).unwrap();
    let addr: SocketAddr = v[key].as_str().expect(key).parse().expect(key);
    addr.port()
}

/// docker/compose.yaml, with its YAML merge keys (`<<: *sidecar`) applied as compose does.
fn compose() -> Value {
    let mut compose: Value = serde_yaml::from_str(&read("docker/compose.yaml")).unwrap();
    compose
        .apply_merge()
        .expect("docker/compose.yaml: merge keys");
    compose
}

/// The app replicas of the compose example and the sidecar each one shares a network with.
fn app_sidecar_pairs(compose: &Value) -> Vec<(String, String)> {
    let services = compose["services"].as_mapping().expect("services");
    services
        .iter()
        .filter_map(|(name, s)| {
            let sidecar = s["network_mode"].as_str()?.strip_prefix("service:")?;
            Some((name.as_str()?.to_string(), sidecar.to_string()))
        })
        .collect()
}

/// The sidecar config `service` mounts (a sample that exists, and passes check above).
fn mounted_config(service: &Value) -> String {
    let mount = service["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find(|v| v.contains(":/etc/token-sidecar/sidecar.yaml"))
        .expect("the config is mounted at /etc/token-sidecar/sidecar.yaml");
    let host = mount.split(':').next().unwrap();
    assert!(
        host.ends_with(".sidecar.yaml"),
        "CI checks docker/*.sidecar.yaml: {host}"
    );
    read(&format!("docker/{}", host.trim_start_matches("./")))
}

#[test]
fn compose_points_each_app_replica_at_its_own_sidecar_on_loopback() {
    let compose = compose();
    let services = &compose["services"];
    let pairs = app_sidecar_pairs(&compose);
    assert!(pairs.len() >= 2, "the app runs as replicas: {pairs:?}");
    let mut stores = Vec::new();
    for (app_name, sidecar_name) in &pairs {
        let sidecar = &services[sidecar_name.as_str()];
        assert_eq!(sidecar["build"]["dockerfile"], "docker/Dockerfile");
        assert_eq!(
            sidecar["build"]["context"], "..",
            "the context is the workspace"
        );
        let config_text = mounted_config(sidecar);
        // One network namespace: loopback reaches the sidecar, and nothing else can.
        let app = &services[app_name.as_str()];
        let port = listen_port(&config_text, "listen");
        let base = app["environment"]["API_BASE_URL"]
            .as_str()
            .expect("the app's API_BASE_URL");
        assert_eq!(base, format!("http://127.0.0.1:{port}"), "{app_name}");
        let config: Value = serde_yaml::from_str(&config_text).unwrap();
        let listen = config["listen"].as_str().unwrap();
        assert!(listen.starts_with("127.0.0.1:"), "{listen}");
        assert_eq!(
            app["depends_on"][sidecar_name.as_str()]["condition"],
            "service_healthy",
            "{app_name} waits for its sidecar's health check"
        );
        // Each sidecar its own token store volume: never two sidecars writing one file.
        let store = sidecar["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .find(|v| v.ends_with(":/var/lib/token-sidecar"))
            .expect("a token store volume")
            .split(':')
            .next()
            .unwrap()
            .to_string();
        assert!(
            compose["volumes"].get(store.as_str()).is_some(),
            "{store} is a named volume"
        );
        stores.push(store);
    }
    let sidecars: std::collections::HashSet<_> = pairs.iter().map(|p| &p.1).collect();
    assert_eq!(sidecars.len(), pairs.len(), "one sidecar per app replica");
    let distinct: std::collections::HashSet<_> = stores.iter().collect();
    assert_eq!(
        distinct.len(),
        stores.len(),
        "shared token stores: {stores:?}"
    );
}

#[test]
fn compose_sidecars_share_the_account_through_a_password_protected_redis() {
    let compose = compose();
    let services = &compose["services"];
    let redis = &services["redis"];
    let image = redis["image"].as_str().expect("a redis service");
    assert!(
        image.starts_with("redis:7") || image.starts_with("valkey/valkey:"),
        "{image}"
    );
    // Nothing to persist (an empty Redis costs one refresh): no snapshot, no append-only file.
    let command = serde_yaml::to_string(&redis["command"]).unwrap();
    assert!(
        command.contains("--save ''") && command.contains("--appendonly no"),
        "{command}"
    );
    // The password comes from the environment (required), read from stdin: no literal, and not
    // in the server's arguments.
    assert_eq!(
        redis["environment"]["REDIS_PASSWORD"]
            .as_str()
            .unwrap()
            .split(':')
            .next(),
        Some("${REDIS_PASSWORD"),
        "the password is required from the environment"
    );
    assert!(command.contains("redis-server -"), "{command}");
    assert!(
        command.contains("requirepass $$REDIS_PASSWORD"),
        "{command}"
    );
    assert!(
        !command.contains("--requirepass"),
        "the password would be in the arguments"
    );
    let health = serde_yaml::to_string(&redis["healthcheck"]["test"]).unwrap();
    assert!(
        health.contains("REDISCLI_AUTH") && health.contains("ping"),
        "{health}"
    );
    assert!(
        redis.get("ports").is_none(),
        "the shared Redis is not published to the host"
    );

    for (_, sidecar_name) in app_sidecar_pairs(&compose) {
        let sidecar = &services[sidecar_name.as_str()];
        assert_eq!(
            sidecar["depends_on"]["redis"]["condition"], "service_healthy",
            "{sidecar_name} waits for redis"
        );
        assert_eq!(
            sidecar["environment"]["REDIS_PASSWORD"], redis["environment"]["REDIS_PASSWORD"],
            "{sidecar_name} gets the same password"
        );
        // The config reaches the redis service by name, with the password from the environment.
        let config: Value = serde_yaml::from_str(&mounted_config(sidecar)).unwrap();
        let url = config["shared"]["redis"]["url"]
            .as_str()
            .expect("shared.redis.url");
        assert_eq!(url, "redis://:${env:REDIS_PASSWORD}@redis:6379/0");
        assert!(
            config["shared"]["redis"]["key_prefix"].is_string(),
            "a key prefix names the account"
        );
        assert_eq!(config["shared"]["on_redis_down"], "local");
        // The provider and the rate limit are shared (the default), not opted out.
        for p in config["providers"].as_mapping().unwrap().values() {
            assert_ne!(p["shared"], Value::Bool(false));
            assert!(p["store"]["key"].is_string(), "the shared token is sealed");
        }
        let limits = config["rate_limits"].as_sequence().unwrap();
        assert!(!limits.is_empty());
        for r in limits {
            assert_ne!(r["shared"], Value::Bool(false));
        }
    }
}

#[test]
fn the_kubernetes_example_mounts_the_configmap_as_a_directory_and_probes_the_probe_port() {
    let docs = k8s_documents();
    let (cm_name, config_text) = configmap_config(&docs);
    let probe_port = listen_port(&config_text, "probe_listen");
    let config: Value = serde_yaml::from_str(&config_text).unwrap();
    // Kubelet probes and Prometheus come to the pod IP: the probe listener (health, readiness,
    // metrics only) listens beyond loopback; the admin API, with its POST endpoints, does not.
    assert!(config["probe_listen"]
        .as_str()
        .unwrap()
        .starts_with("0.0.0.0:"));
    assert!(config["admin_listen"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(config["listen"].as_str().unwrap().starts_with("127.0.0.1:"));

    let deployments = kind(&docs, "Deployment");
    assert_eq!(deployments.len(), 1);
    let pod = &deployments[0]["spec"]["template"]["spec"];
    let all: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .filter_map(|k| pod[*k].as_sequence())
        .flatten()
        .collect();
    let sidecar = all
        .iter()
        .find(|c| {
            c["volumeMounts"]
                .as_sequence()
                .is_some_and(|m| m.iter().any(|m| m["mountPath"] == "/etc/token-sidecar"))
        })
        .expect("a container mounts /etc/token-sidecar");
    let is_native = pod["initContainers"]
        .as_sequence()
        .is_some_and(|s| s.iter().any(|c| c["name"] == sidecar["name"]));
    if is_native {
        assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
    }
    assert!(all.len() >= 2, "the app and the sidecar");

    // The ConfigMap volume, mounted whole: subPath mounts never see updates.
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == cm_name.as_str())
        .expect("a volume from the ConfigMap");
    for c in &all {
        for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
            if m["name"] == volume["name"] {
                assert!(m.get("subPath").is_none(), "subPath mount: {m:?}");
                assert!(m.get("subPathExpr").is_none(), "subPathExpr mount: {m:?}");
                assert_eq!(m["mountPath"], "/etc/token-sidecar");
            }
        }
    }
    // The file the sidecar reads is the ConfigMap's key in that directory.
    let env = sidecar["env"].as_sequence().unwrap();
    let config_env = env
        .iter()
        .find(|e| e["name"] == "TOKEN_SIDECAR_CONFIG")
        .map(|e| e["value"].as_str().unwrap().to_string());
    assert_eq!(
        config_env
            .as_deref()
            .unwrap_or("/etc/token-sidecar/sidecar.yaml"),
        "/etc/token-sidecar/sidecar.yaml"
    );
    // Every ${env:NAME} of the config is provided.
    for name in ["CLIENT_SECRET"] {
        if config_text.contains(&format!("${{env:{name}}}")) {
            assert!(env.iter().any(|e| e["name"] == name), "{name} is not set");
        }
    }

    // Probes on the probe port: readiness on /readyz, liveness on /healthz.
    let port_of = |probe: &Value| -> u16 {
        let p = &probe["httpGet"]["port"];
        match p.as_u64() {
            Some(n) => n as u16,
            None => sidecar["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|q| q["name"] == *p)
                .and_then(|q| q["containerPort"].as_u64())
                .expect("a named probe port") as u16,
        }
    };
    let readiness = &sidecar["readinessProbe"];
    let liveness = &sidecar["livenessProbe"];
    assert_eq!(readiness["httpGet"]["path"], "/readyz");
    assert_eq!(liveness["httpGet"]["path"], "/healthz");
    assert_eq!(port_of(readiness), probe_port);
    assert_eq!(port_of(liveness), probe_port);
    let startup = &sidecar["startupProbe"];
    if !startup.is_null() {
        assert_eq!(port_of(startup), probe_port);
    }
    let annotations = &deployments[0]["spec"]["template"]["metadata"]["annotations"];
    if let Some(port) = annotations["prometheus.io/port"].as_str() {
        assert_eq!(
            port,
            probe_port.to_string(),
            "Prometheus scrapes the probe port"
        );
    }

    // The app's base URL is the sidecar on the pod's loopback.
    let data_port = listen_port(&config_text, "listen");
    let app = all
        .iter()
        .find(|c| c["name"] != sidecar["name"])
        .expect("an app container");
    let base = app["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "API_BASE_URL")
        .and_then(|e| e["value"].as_str())
        .expect("API_BASE_URL");
    assert_eq!(base, format!("http://127.0.0.1:{data_port}"));
}

// ---------------------------------------------------------------------------------------------
// A ConfigMap update, the way the kubelet does it.

/// The status of a GET through the sidecar.
async fn get(sc: &Sidecar, path: &str) -> u16 {
    reqwest::get(sc.url(path)).await.unwrap().status().as_u16()
}

/// A new ConfigMap version: a timestamped directory, a `..data_tmp` symlink to it renamed over
/// `..data`, then the old directory removed — the kubelet's atomic writer.
fn publish(dir: &Path, version: &str, config: &str, old: Option<&str>) {
    let versioned = dir.join(version);
    std::fs::create_dir(&versioned).unwrap();
    std::fs::write(versioned.join("sidecar.yaml"), config).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

#[tokio::test]
async fn a_configmap_symlink_swap_reloads_the_running_sidecar() {
    let api = MockUpstream::start(UpstreamConfig::open()).await;
    let listen: SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    let version = |prefix: &str| {
        format!(
            "listen: \"{listen}\"\nadmin_listen: \"{admin}\"\nupstreams:\n  - {{ name: api, url: \"{}\", match: {{ path_prefix: {prefix} }} }}\n",
            api.url()
        )
    };
    // The kubelet's layout: ..<timestamp>/sidecar.yaml, ..data -> ..<timestamp>,
    // sidecar.yaml -> ..data/sidecar.yaml.
    let dir = Scratch::new("configmap");
    let first = "..2026_11_22_07_00_00.000000001";
    std::fs::create_dir(dir.path(first)).unwrap();
    std::fs::write(dir.path(first).join("sidecar.yaml"), version("/one")).unwrap();
    std::os::unix::fs::symlink(first, dir.path("..data")).unwrap();
    std::os::unix::fs::symlink("..data/sidecar.yaml", dir.path("sidecar.yaml")).unwrap();

    // Its log goes to a scratch directory of its own, not into the watched one.
    let sc = Sidecar::start_at(&dir.path("sidecar.yaml"), listen, admin).await;
    assert_eq!(get(&sc, "/one/a").await, 200);
    assert_eq!(get(&sc, "/two/a").await, 404);

    let mut previous = first.to_string();
    for (n, prefix) in [(2, "/two"), (3, "/three")] {
        let next = format!("..2026_11_22_07_00_0{n}.000000001");
        publish(&dir.0, &next, &version(prefix), Some(&previous));
        let path = format!("{prefix}/a");
        wait_until(
            Duration::from_secs(10),
            || async { get(&sc, &path).await == 200 },
            || {
                format!(
                    "ConfigMap version {n} not in effect after 10 s:\n{}",
                    sc.logs()
                )
            },
        )
        .await;
        previous = next;
    }
    assert_eq!(get(&sc, "/one/a").await, 404);
    let reloaded = support::metrics::reloads(&sc, "success").await;
    assert_eq!(reloaded, 2, "{}", sc.logs());
}
