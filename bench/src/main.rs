#![forbid(unsafe_code)]
//! `sidecar-bench`: measures token-sidecar side by side with a direct connection, nginx and a
//! bare Pingora proxy on loopback. See bench/README.md.

mod load;
mod paired;
mod procs;
mod replicas;
mod scenarios;
mod soak;
mod tools;
mod train;
mod upstream;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use scenarios::Scenario;

/// Benchmark token-sidecar against direct, nginx and bare Pingora on loopback.
#[derive(Debug, Parser)]
#[command(name = "sidecar-bench")]
pub struct Args {
    /// Shorter runs (a few minutes in all).
    #[arg(long, conflicts_with = "smoke")]
    pub quick: bool,
    /// Every scenario for about a second; fails only if a scenario cannot run (CI).
    #[arg(long)]
    pub smoke: bool,
    /// Where to write the Markdown results (default: bench/RESULTS.md; not written by --smoke
    /// unless given).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Do not run `cargo build`: use the binaries next to this one as they are.
    #[arg(long)]
    pub no_build: bool,
    /// Load generator for the throughput scenario.
    #[arg(long, value_enum, default_value_t = Loadgen::Auto)]
    pub loadgen: Loadgen,
    /// Instead of the scenarios: profile this target (sidecar, bare, nginx, haproxy) with `perf record`
    /// under 16 connections for `--profile-secs` and print the flat profile.
    #[arg(long)]
    pub profile: Option<String>,
    /// How long `--profile` samples.
    #[arg(long, default_value_t = 10)]
    pub profile_secs: u64,
    /// How many connections `--profile` uses.
    #[arg(long, default_value_t = 16)]
    pub profile_conns: usize,
    /// Run only these scenarios, comma separated: numbers 1-6 or names (throughput, storm,
    /// replay, rate, memory, replicas, soak). The soak runs only when named here, never with --smoke.
    #[arg(long, value_delimiter = ',', value_parser = Scenario::parse)]
    pub only: Vec<Scenario>,
    /// Instead of the scenarios: drive the sidecar and bare Pingora through the benchmark's
    /// request shapes for this many seconds each, then stop them with SIGTERM (the training run
    /// of a profile-guided build, `./dev release`; bench/src/train.rs).
    #[arg(long, conflicts_with_all = ["profile", "only", "smoke", "quick"], value_parser = clap::value_parser!(u64).range(1..=600))]
    pub train: Option<u64>,
    /// How long the soak runs, in seconds.
    #[arg(long, default_value_t = 180, value_parser = clap::value_parser!(u64).range(10..=86_400))]
    pub soak_secs: u64,
}

/// Which load generator drives the throughput scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Loadgen {
    /// wrk if it is installed or installable, else the in-repo generator.
    Auto,
    /// wrk (installed with apt-get if missing).
    Wrk,
    /// The in-repo generator.
    Builtin,
}

/// Durations and sizes per mode.
#[derive(Clone, Debug)]
pub struct Plan {
    pub mode: &'static str,
    pub run: Duration,
    pub rounds: usize,
    /// Paired rounds of the sidecar against bare Pingora by CPU (bench/src/paired.rs), and
    /// how long each proxy runs in one.
    pub pairs: usize,
    pub pair_run: Duration,
    pub warm: Duration,
    pub storm: usize,
    pub replay_run: Duration,
    pub revoke_every: Duration,
    pub rate_run: Duration,
    pub rate_per_s: u32,
    pub memory_conns: Vec<usize>,
    pub soak: Duration,
    pub replicas: replicas::ReplicasPlan,
    pub watchdog: Duration,
}

impl Plan {
    fn from(args: &Args) -> Plan {
        if args.smoke {
            return Plan {
                mode: "smoke",
                run: Duration::from_secs(1),
                rounds: 1,
                pairs: 2,
                pair_run: Duration::from_secs(1),
                warm: Duration::from_millis(200),
                storm: 1000,
                replay_run: Duration::from_secs(1),
                revoke_every: Duration::from_millis(500),
                rate_run: Duration::from_secs(1),
                rate_per_s: 500,
                memory_conns: vec![200, 1000],
                soak: Duration::from_secs(args.soak_secs),
                replicas: replicas::ReplicasPlan::smoke(),
                watchdog: Duration::from_secs(240),
            };
        }
        let quick = Plan {
            mode: "quick",
            run: Duration::from_secs(5),
            rounds: 2,
            pairs: 6,
            pair_run: Duration::from_secs(2),
            warm: Duration::from_secs(1),
            storm: 1000,
            replay_run: Duration::from_secs(10),
            revoke_every: Duration::from_secs(1),
            rate_run: Duration::from_secs(10),
            rate_per_s: 1000,
            memory_conns: vec![1000, 10_000],
            soak: Duration::from_secs(args.soak_secs),
            replicas: replicas::ReplicasPlan::quick(),
            watchdog: Duration::from_secs(30 * 60),
        };
        if args.quick {
            return quick;
        }
        // The full plan: the quick one, longer.
        Plan {
            mode: "full",
            run: Duration::from_secs(10),
            rounds: 3,
            // 24 pairs: the median's 95 % interval spans the 7th to the 18th ratio.
            pairs: 24,
            pair_run: Duration::from_secs(3),
            warm: Duration::from_secs(2),
            replay_run: Duration::from_secs(20),
            rate_run: Duration::from_secs(60),
            replicas: replicas::ReplicasPlan::full(),
            watchdog: Duration::from_secs(90 * 60),
            ..quick
        }
    }
}

/// How the measured binaries were built, from where they are: `./dev release` puts its
/// profile-guided build under target/pgo/.
fn build_kind(sidecar: &Path) -> &'static str {
    if profile_guided(sidecar) {
        "profile-guided (`./dev release`), the sidecar and bare Pingora alike"
    } else {
        "`cargo build --release` (fat LTO, no profile), the sidecar and bare Pingora alike"
    }
}

fn profile_guided(binary: &Path) -> bool {
    binary.components().any(|c| c.as_os_str() == "pgo")
}

/// The command that repeats this run with `args` (may be empty), for the results' "Run:" line:
/// `cargo run` for a plain release build, `./dev release` and the binary it built for a
/// profile-guided one (`bench`: this binary, relative to the workspace where it is inside it).
fn run_command(bench: &Path, args: &str) -> String {
    let args = args.trim();
    // The arguments after `sep`, or nothing at all.
    let after = |sep: &str| {
        if args.is_empty() {
            String::new()
        } else {
            format!("{sep}{args}")
        }
    };
    if profile_guided(bench) {
        let bench = bench.strip_prefix(workspace_root()).unwrap_or(bench);
        format!(
            "`./dev release`, then `{} --no-build{}`",
            bench.display(),
            after(" ")
        )
    } else {
        format!("`cargo run --release -p sidecar-bench{}`", after(" -- "))
    }
}

/// The arguments that chose this run's mode and scenarios, as `run_command` takes them.
fn run_args(mode: &str, only: &[Scenario]) -> String {
    let mut args = Vec::new();
    if mode != "full" {
        args.push(format!("--{mode}"));
    }
    if !only.is_empty() {
        let names: Vec<&str> = only.iter().map(|s| s.name()).collect();
        args.push(format!("--only {}", names.join(",")));
    }
    args.join(" ")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Builds (unless told not to) and locates `token-sidecar` and `bare-pingora`: release builds,
/// next to this binary (target/release).
fn binaries(args: &Args) -> Result<(PathBuf, PathBuf), String> {
    let dir = std::env::current_exe()
        .map_err(|e| format!("cannot locate this binary: {e}"))?
        .parent()
        .map(Path::to_path_buf)
        .ok_or("this binary has no directory")?;
    if !args.no_build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!(
            "bench: cargo build --release --locked -p token-sidecar -p sidecar-bench (in {})",
            workspace_root().display()
        );
        let mut cmd = Command::new(cargo);
        // `cargo run` hands this process the package's CARGO_MANIFEST_DIR, CARGO_PKG_*, ...;
        // build scripts (ring's) list those in rerun-if-env-changed, so passing them on would
        // make this build, and the next plain one, rebuild half the tree.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || matches!(
                    &*k,
                    "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE" | "OUT_DIR"
                )
            {
                cmd.env_remove(&key);
            }
        }
        let st = cmd
            .args([
                "build",
                "--release",
                "--locked",
                "-p",
                "token-sidecar",
                "-p",
                "sidecar-bench",
            ])
            .current_dir(workspace_root())
            .status();
        match st {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!("bench: cargo build failed ({s}); trying existing binaries"),
            Err(e) => eprintln!("bench: cannot run cargo ({e}); trying existing binaries"),
        }
    }
    let sidecar = dir.join("token-sidecar");
    let bare = dir.join("bare-pingora");
    for b in [&sidecar, &bare] {
        if !b.is_file() {
            return Err(format!(
                "{} is missing: build it with `cargo build --release --locked -p token-sidecar -p sidecar-bench`",
                b.display()
            ));
        }
    }
    if !dir.ends_with("release") {
        eprintln!(
            "bench: warning: {} is not a release directory; numbers would be meaningless",
            dir.display()
        );
    }
    eprintln!("bench: using {} and {}", sidecar.display(), bare.display());
    Ok((sidecar, bare))
}

/// Raises the open-file limit to the hard limit (10,000 connections need ~10,100 descriptors in
/// this process and in the sidecar, which inherits it). Returns the soft limit in force.
fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(1 << 20) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("bench: cannot raise the open-file limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(soft, _)| soft)
                .unwrap_or(1024)
        }
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kib| format!("{:.0} GiB", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem} RAM, Linux {kernel}")
}

fn tool_version(binary: &Path, arg: &str) -> String {
    Command::new(binary)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).to_string();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() -> ExitCode {
    let args = Args::parse();
    let plan = Plan::from(&args);

    // Every child dies with us: on panic, on Ctrl-C/SIGTERM, on the watchdog, at the end.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        procs::stop_all();
        default_hook(info);
    }));
    let code = match run(&args, &plan) {
        Ok(failures) if failures.is_empty() => ExitCode::SUCCESS,
        Ok(failures) => {
            for f in &failures {
                eprintln!("bench: FAILED: {f}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    };
    procs::stop_all();
    code
}

/// The scenarios to run: those of `--only`, or 1-6. The soak is refused with `--smoke`.
fn selection(args: &Args) -> Result<Vec<Scenario>, String> {
    if args.only.is_empty() {
        return Ok(Scenario::DEFAULT.to_vec());
    }
    if args.smoke && args.only.contains(&Scenario::Soak) {
        return Err("the soak takes minutes and is not part of --smoke".into());
    }
    Ok(args.only.clone())
}

/// Runs the selected scenarios; returns the scenarios that could not run.
fn run(args: &Args, plan: &Plan) -> Result<Vec<String>, String> {
    let started = Instant::now();
    let selected = selection(args)?;
    let soak = selected.contains(&Scenario::Soak);
    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let load_before = loadavg();
    let fd_limit = raise_fd_limit();
    let (sidecar_bin, bare_bin) = binaries(args)?;
    // Armed after the build, which may legitimately take minutes.
    let watchdog = plan.watchdog
        + if soak {
            plan.soak + Duration::from_secs(5 * 60)
        } else {
            Duration::ZERO
        };
    let _ = std::thread::Builder::new()
        .name("bench-watchdog".into())
        .spawn(move || {
            std::thread::sleep(watchdog);
            eprintln!("bench: watchdog: still running after {watchdog:?}; stopping everything");
            procs::abandon();
            std::process::exit(3);
        });
    // Only the throughput scenario and --profile drive nginx and wrk: do not install them for
    // the others (nor for --train, which uses the in-repo load generator).
    let needs_tools = args.train.is_none()
        && (args.profile.is_some() || selected.contains(&Scenario::Throughput));
    let wrk = match args.loadgen {
        _ if !needs_tools => None,
        Loadgen::Builtin => None,
        Loadgen::Wrk => Some(tools::wrk().ok_or("wrk is not available")?),
        Loadgen::Auto => tools::wrk(),
    };
    let nginx = if needs_tools {
        Some(tools::nginx()?)
    } else {
        None
    };
    let haproxy = if needs_tools {
        Some(tools::haproxy()?)
    } else {
        None
    };
    let env = scenarios::Env {
        plan: plan.clone(),
        sidecar_bin,
        bare_bin,
        nginx_bin: nginx.clone(),
        haproxy_bin: haproxy.clone(),
        wrk: wrk.clone(),
        fd_limit,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let (report, failures) = rt.block_on(async {
        tokio::spawn(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
            }
            eprintln!("bench: interrupted; stopping every child process");
            procs::abandon();
            std::process::exit(130);
        });
        if let Some(secs) = args.train {
            return match train::train(&env.sidecar_bin, &env.bare_bin, secs).await {
                Ok(text) => (scenarios::Report { main: text, soak: None }, Vec::new()),
                Err(e) => (scenarios::Report::default(), vec![format!("train: {e}")]),
            };
        }
        if let Some(target) = &args.profile {
            return match scenarios::profile(&env, target, args.profile_secs, args.profile_conns).await {
                Ok(text) => (scenarios::Report { main: text, soak: None }, Vec::new()),
                Err(e) => (scenarios::Report::default(), vec![format!("profile: {e}")]),
            };
        }
        scenarios::run_all(&env, &selected).await
    });
    if args.profile.is_some() || args.train.is_some() {
        println!("{}", report.main);
        return Ok(failures);
    }
    drop(rt);

    // Where this binary is tells how it was built, and so how to repeat the run.
    let bench_bin = std::env::current_exe().unwrap_or_default();
    let machine_line = format!(
        "Machine: {}. Load average (1/5/15 min) before: {}, after: {}.",
        machine(),
        load_before,
        loadavg()
    );
    let only_soak = selected == [Scenario::Soak];
    if !only_soak {
        let header = format!(
            "# token-sidecar benchmark results\n\n\
             Run: {} on {} ({} mode, {:.0} s).\n\n\
             {machine_line} Build: {}. Load generator: {}. nginx: {}. HAProxy: {}. Open-file \
             limit: {}.\n\n\
             Everything on 127.0.0.1: load generator, upstream (hyper, 1 thread), mock IdP, and \
             the proxies (1 worker/thread each unless a table says otherwise). Keep-alive \
             everywhere, `GET /bench`.\n",
            run_command(&bench_bin, &run_args(plan.mode, &args.only)),
            utc_now(),
            plan.mode,
            started.elapsed().as_secs_f64(),
            build_kind(&env.sidecar_bin),
            match &wrk {
                Some(w) => format!(
                    "{} (`-t1`, latency from its Lua `done` hook)",
                    tool_version(w, "-v")
                ),
                None => "in-repo (bench/src/load.rs)".into(),
            },
            nginx
                .as_deref()
                .map_or_else(|| "not used".into(), |n| tool_version(n, "-v")),
            haproxy
                .as_deref()
                .map_or_else(|| "not used".into(), |n| tool_version(n, "-v")),
            fd_limit,
        );
        let footer = format!(
            "Where the time goes (perf profiles of nginx, bare Pingora and the sidecar) and the \
             proposed fixes: [PROFILE.md](PROFILE.md). Profile one target yourself with {}.\n",
            run_command(&bench_bin, "--profile sidecar|bare|nginx")
        );
        let text = format!("{header}\n{}{footer}", report.main);
        println!("{text}");
        let out = match (&args.out, args.smoke) {
            (Some(p), _) => Some(p.clone()),
            (None, false) => Some(workspace_root().join("bench/RESULTS.md")),
            (None, true) => None,
        };
        if let Some(out) = out {
            std::fs::write(&out, &text).map_err(|e| format!("{}: {e}", out.display()))?;
            eprintln!("bench: results written to {}", out.display());
        }
    }
    if let Some(section) = &report.soak {
        let text = format!(
            "# Soak run of {}\n\nRun: {} at commit {}.\n\n{machine_line}\n\n{section}\n",
            utc_now(),
            run_command(
                &bench_bin,
                &format!("--only soak --soak-secs {}", plan.soak.as_secs())
            ),
            git_commit(),
        );
        println!("{text}");
        // Appended: each soak is a dated entry of the same file.
        let out = match &args.out {
            Some(p) if only_soak => p.clone(),
            _ => workspace_root().join("bench/RESULTS-soak.md"),
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out)
            .map_err(|e| format!("{}: {e}", out.display()))?;
        std::io::Write::write_all(&mut file, text.as_bytes())
            .map_err(|e| format!("{}: {e}", out.display()))?;
        eprintln!("bench: soak results appended to {}", out.display());
    }
    Ok(failures)
}

/// The workspace's commit (short hash, `+dirty` with uncommitted changes), or "unknown".
fn git_commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(workspace_root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(hash) if !hash.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{hash}+dirty")
            } else {
                hash
            }
        }
        _ => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &[&str]) -> Args {
        Args::try_parse_from([&["sidecar-bench"], line].concat()).expect("valid arguments")
    }

    #[test]
    fn the_run_line_names_the_command_that_built_and_ran_the_binary() {
        let root = workspace_root();
        let pgo = root.join("target/pgo/x86_64-unknown-linux-gnu/release/sidecar-bench");
        let plain = root.join("target/release/sidecar-bench");
        let cases: [(&Path, &str, &str); 5] = [
            (&plain, "", "`cargo run --release -p sidecar-bench`"),
            (
                &plain,
                "--quick",
                "`cargo run --release -p sidecar-bench -- --quick`",
            ),
            (
                &pgo,
                "",
                "`./dev release`, then \
                 `target/pgo/x86_64-unknown-linux-gnu/release/sidecar-bench --no-build`",
            ),
            (
                &pgo,
                "--only throughput",
                "`./dev release`, then `target/pgo/x86_64-unknown-linux-gnu/release/sidecar-bench \
                 --no-build --only throughput`",
            ),
            // A binary outside the workspace keeps its whole path.
            (
                Path::new("/opt/pgo/sidecar-bench"),
                "--smoke",
                "`./dev release`, then `/opt/pgo/sidecar-bench --no-build --smoke`",
            ),
        ];
        for (bench, args, want) in cases {
            assert_eq!(run_command(bench, args), want, "{} {args}", bench.display());
        }
        assert_eq!(run_args("full", &[]), "");
        assert_eq!(run_args("quick", &[]), "--quick");
        assert_eq!(
            run_args("full", &[Scenario::Throughput, Scenario::Storm]),
            "--only throughput,storm"
        );
    }

    #[test]
    fn only_takes_numbers_and_names_and_the_soak_is_opt_in() {
        assert_eq!(selection(&args(&[])).unwrap(), Scenario::DEFAULT.to_vec());
        assert!(!Scenario::DEFAULT.contains(&Scenario::Soak));
        assert!(!selection(&args(&["--smoke"]))
            .unwrap()
            .contains(&Scenario::Soak));
        assert_eq!(
            selection(&args(&["--only", "1,3"])).unwrap(),
            vec![Scenario::Throughput, Scenario::Replay]
        );
        assert_eq!(
            selection(&args(&["--only", "soak"])).unwrap(),
            vec![Scenario::Soak]
        );
        assert_eq!(
            selection(&args(&["--only", "storm,5,Soak"])).unwrap(),
            vec![Scenario::Storm, Scenario::Memory, Scenario::Soak]
        );
        assert!(selection(&args(&["--smoke", "--only", "soak"])).is_err());
        assert_eq!(
            selection(&args(&["--only", "replicas,6"])).unwrap(),
            vec![Scenario::Replicas, Scenario::Replicas]
        );
        assert!(Scenario::DEFAULT.contains(&Scenario::Replicas));
        for bad in ["0", "7", "soakk", ""] {
            assert!(
                Args::try_parse_from(["sidecar-bench", "--only", bad]).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(Plan::from(&args(&[])).soak, Duration::from_secs(180));
        assert_eq!(
            Plan::from(&args(&["--soak-secs", "60"])).soak,
            Duration::from_secs(60)
        );
        assert!(Args::try_parse_from(["sidecar-bench", "--soak-secs", "1"]).is_err());
    }
}
