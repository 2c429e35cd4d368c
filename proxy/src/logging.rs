//! Logs through `tracing`, text or one JSON object per line, with Pingora's `log` records bridged
//! in. `RUST_LOG` overrides the configured level.

use sidecar_config::{Log, LogFormat};
use tracing_log::AsLog;
use tracing_subscriber::EnvFilter;

/// Capped at `info` whatever level is asked for. Pingora's own debug and trace records print raw
/// request lines, headers and bodies, which hold tokens. The file watcher's (notify, inotify)
/// describe every event in the config's directory — including the writes of this very log when
/// it lives there, each of which makes another event: at `trace` that loop wrote hundreds of MiB
/// in seconds with no traffic.
const CAPS: [&str; 5] = [
    "pingora_proxy=info",
    "pingora_core=info",
    "pingora_pool=info",
    "notify=info",
    "inotify=info",
];

/// Installs the global subscriber once; later calls (a reload) leave it as it is.
pub fn init(log: &Log) {
    let mut filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    for cap in CAPS {
        if let Ok(d) = cap.parse() {
            filter = filter.add_directive(d);
        }
    }
    // `log` records (Pingora's, rustls's) finer than anything the filter lets through are
    // dropped at the `log` macro itself: building and filtering Pingora's per-request debug
    // records only to throw them away cost measurable CPU.
    let log_max = filter
        .max_level_hint()
        .map_or(log::LevelFilter::Trace, |l| l.as_log());
    let _ = tracing_log::LogTracer::builder()
        .with_max_level(log_max)
        .init();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
}
