//! The Prometheus page on `/metrics`: the recorder and its buckets, the `# HELP` text of every
//! metric (the two per-request duration histograms' is with them, in [`crate::histogram`]), the
//! gauges that are computed when a scrape comes (token TTL and state, in-flight requests,
//! breakers) rather than on events, and the `process_*` metrics read from `/proc`.

use std::fmt::Write as _;
use std::io::Read;

use metrics::{describe_counter, describe_gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::app::App;

/// Duration buckets, in seconds: from 100 µs (a token injection) up to 300 s, past the default
/// read timeout (60 s) and the longest a request can wait for a token, so that the slowest
/// requests are not all lumped into `+Inf`.
pub const BUCKETS: [f64; 20] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Installs the process's recorder (rendered by the admin service, never its own listener) and
/// describes every metric; `None` when a recorder is installed already.
pub fn recorder() -> Option<PrometheusHandle> {
    let recorder = PrometheusBuilder::new()
        .set_buckets(&BUCKETS)
        .ok()?
        .set_buckets_for_metric(
            Matcher::Full("sidecar_stream_duration_seconds".into()),
            &crate::streams::DURATION_BUCKETS,
        )
        .ok()?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).ok()?;
    describe();
    crate::streams::describe();
    metrics::gauge!("sidecar_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Present from the first scrape, not from the first request that waits.
    metrics::gauge!("sidecar_waiting_requests").set(0.0);
    Some(handle)
}

/// The `# HELP` text of the metrics this crate records, and of the other crates'.
fn describe() {
    sidecar_token::describe_metrics();
    sidecar_filters::describe_metrics();
    describe_counter!(
        "sidecar_requests_total",
        "Requests answered, by upstream (empty: no route), method, status (0: no answer written) and origin (sidecar: the sidecar's own answer; upstream: the upstream's)"
    );
    describe_counter!(
        "sidecar_replays_total",
        "Requests re-sent with a fresh token after the upstream rejected the old one, by upstream, reason and result"
    );
    describe_counter!(
        "sidecar_replay_skipped_total",
        "Expired-token answers passed on without a replay, by upstream and reason (non_idempotent, body_too_large, attempts_exhausted, ...)"
    );
    describe_gauge!(
        "sidecar_waiting_requests",
        "Requests waiting for a token now"
    );
    describe_gauge!(
        "sidecar_inflight_requests",
        "Requests being proxied now (waiting for a token included)"
    );
    describe_counter!(
        "sidecar_upstream_errors_total",
        "Requests whose last upstream attempt failed, by upstream and class (auth, client, server, rate_limit, network, timeout)"
    );
    describe_gauge!(
        "sidecar_breaker_open",
        "1 while the upstream's circuit breaker is open or half-open (requests fail fast with 503), 0 when closed"
    );
    describe_counter!(
        "sidecar_config_reloads_total",
        "Configuration reloads by result (success, error: the running configuration stays)"
    );
    describe_gauge!("sidecar_client_connections", "Client connections open now");
    describe_counter!(
        "sidecar_client_connections_refused_total",
        "Client connections closed at once because downstream.max_connections were open"
    );
    describe_gauge!(
        "sidecar_build_info",
        "Always 1; the version label says which token-sidecar this is"
    );
}

/// The page for one scrape: the gauges that describe the present are set first.
pub fn render(app: &App, handle: &PrometheusHandle) -> String {
    let live = app.live.load();
    for source in live.providers.values() {
        source.publish_metrics();
    }
    for up in &live.upstreams {
        metrics::gauge!("sidecar_breaker_open", "upstream" => up.config.name.clone())
            .set(if up.breaker.is_open() { 1.0 } else { 0.0 });
    }
    metrics::gauge!("sidecar_inflight_requests").set(app.inflight.now() as f64);
    let mut page = handle.render();
    if !page.is_empty() && !page.ends_with('\n') {
        page.push('\n');
    }
    crate::histogram::render(&mut page);
    if let Some(p) = Process::read() {
        p.write(&mut page);
    }
    page
}

/// Clock ticks per second of `/proc/*/stat` times: `USER_HZ`, 100 on every Linux ABI.
const USER_HZ: f64 = 100.0;
/// Read at most this much of a `/proc` file.
const PROC_READ_MAX: u64 = 64 * 1024;
/// Count at most this many open descriptors.
const FD_COUNT_MAX: usize = 1 << 20;

/// What `/proc` tells about this process (Linux only; elsewhere nothing is exported).
#[derive(Debug, Default, PartialEq)]
struct Process {
    cpu_seconds: f64,
    resident_bytes: Option<f64>,
    virtual_bytes: Option<f64>,
    start_time: Option<f64>,
    open_fds: Option<f64>,
    max_fds: Option<f64>,
}

fn read_proc(path: &str) -> Option<String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(PROC_READ_MAX)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

impl Process {
    fn read() -> Option<Process> {
        let stat = read_proc("/proc/self/stat")?;
        let status = read_proc("/proc/self/status").unwrap_or_default();
        let btime = read_proc("/proc/stat").and_then(|s| boot_time(&s));
        let limits = read_proc("/proc/self/limits").unwrap_or_default();
        let mut p = Process::parse(&stat, &status, btime, &limits)?;
        p.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.take(FD_COUNT_MAX).count() as f64);
        Some(p)
    }

    /// From the texts of `/proc/self/stat`, `/proc/self/status`, the boot time of `/proc/stat`
    /// and `/proc/self/limits`. `None` when `stat` is not what Linux writes.
    fn parse(stat: &str, status: &str, btime: Option<f64>, limits: &str) -> Option<Process> {
        // The command name (field 2) is in parentheses and may hold spaces and parentheses.
        let after = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        // fields[0] is field 3 (state): utime is field 14, stime 15, starttime 22.
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
        let cpu_seconds = (field(14)? + field(15)?) / USER_HZ;
        let start_time = match (btime, field(22)) {
            (Some(b), Some(ticks)) => Some(b + ticks / USER_HZ),
            _ => None,
        };
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.trim().strip_suffix("kB"))
                .and_then(|n| n.trim().parse::<f64>().ok())
                .map(|n| n * 1024.0)
        };
        let max_fds = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok());
        Some(Process {
            cpu_seconds,
            resident_bytes: kib("VmRSS:"),
            virtual_bytes: kib("VmSize:"),
            start_time,
            open_fds: None,
            max_fds,
        })
    }

    fn write(&self, page: &mut String) {
        let mut metric = |name: &str, kind: &str, help: &str, value: Option<f64>| {
            if let Some(v) = value {
                let _ = write!(
                    page,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n\n"
                );
            }
        };
        metric(
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds",
            Some(self.cpu_seconds),
        );
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size, in bytes",
            self.resident_bytes,
        );
        metric(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size, in bytes",
            self.virtual_bytes,
        );
        metric(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, in seconds",
            self.start_time,
        );
        metric(
            "process_open_fds",
            "gauge",
            "Open file descriptors",
            self.open_fds,
        );
        metric(
            "process_max_fds",
            "gauge",
            "Limit on open file descriptors",
            self.max_fds,
        );
    }
}

/// `btime` of `/proc/stat`: when the machine booted, as a Unix time.
fn boot_time(stat: &str) -> Option<f64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STAT: &str = "4242 (token (side) car) S 1 4242 4242 0 -1 4194560 2000 0 0 0 250 50 0 0 20 0 3 0 123400 1000000 3000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 0 0 0 0 0 0";

    #[test]
    fn reads_what_linux_writes() {
        let status = "Name:\ttoken-sidecar\nVmSize:\t  100 kB\nVmRSS:\t    16000 kB\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 4096                 files\n";
        let p = Process::parse(
            STAT,
            status,
            boot_time("cpu 1 2\nbtime 1700000000\n"),
            limits,
        )
        .unwrap();
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.start_time, Some(1_700_001_234.0));
        assert_eq!(p.resident_bytes, Some(16_000.0 * 1024.0));
        assert_eq!(p.virtual_bytes, Some(100.0 * 1024.0));
        assert_eq!(p.max_fds, Some(1024.0));
        let mut page = String::new();
        p.write(&mut page);
        assert!(page.contains("# HELP process_cpu_seconds_total "));
        assert!(page
            .contains("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 3\n"));
        assert!(
            !page.contains("process_open_fds"),
            "unknown values are left out"
        );
    }

    #[test]
    fn this_process_is_readable() {
        if std::path::Path::new("/proc/self/stat").exists() {
            let p = Process::read().unwrap();
            assert!(p.resident_bytes.unwrap_or(0.0) > 0.0);
            assert!(p.open_fds.unwrap_or(0.0) >= 1.0);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Whatever /proc holds, parsing neither panics nor invents a CPU time from garbage.
        #[test]
        fn any_text_is_safe(stat in "[0-9a-z() ]{0,80}", status in "[ -~\n]{0,60}", limits in "[ -~\n]{0,40}") {
            if let Some(p) = Process::parse(&stat, &status, boot_time(&status), &limits) {
                prop_assert!(p.cpu_seconds.is_finite());
                prop_assert!(stat.contains(')'));
            }
        }
    }
}
