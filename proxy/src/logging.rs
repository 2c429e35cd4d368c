//! Logs through `tracing`, text or one JSON object per line, with Pingora's `log` records bridged
//! in. `RUST_LOG` overrides the configured level.

use sidecar_config::{Log, LogFormat};
use tracing_log::AsLog;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::EnvFilter;

/// Capped at `info` whatever level is asked for, and no more verbose than what is asked for.
/// Pingora's own debug and trace records print raw request lines, headers and bodies, which
/// hold tokens. The file watcher's (notify, inotify) describe every event in the config's
/// directory — including the writes of this very log when it lives there, each of which makes
/// another event: at `trace` that loop wrote hundreds of MiB in seconds with no traffic.
const CAPPED: [&str; 5] = [
    "pingora_proxy",
    "pingora_core",
    "pingora_pool",
    "notify",
    "inotify",
];

/// The directives that cap [`CAPPED`] targets when the filter asks for `asked` at most. A
/// directive raises a target as well as lowering it, so at `warn` the cap is `warn`, not `info`.
fn caps(asked: LevelFilter) -> Vec<String> {
    let cap = asked.min(LevelFilter::INFO);
    CAPPED.iter().map(|t| format!("{t}={cap}")).collect()
}

/// Installs the global subscriber once; later calls (a reload) leave it as it is.
pub fn init(log: &Log) {
    let mut filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let asked = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    for cap in caps(asked) {
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
        LogFormat::Json => builder.event_format(crate::log_json::JsonLine).try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_never_raise_a_target_above_the_asked_level() {
        assert!(caps(LevelFilter::WARN).contains(&"pingora_core=warn".to_string()));
        assert!(caps(LevelFilter::ERROR).contains(&"pingora_proxy=error".to_string()));
        assert!(caps(LevelFilter::OFF).contains(&"notify=off".to_string()));
        assert!(caps(LevelFilter::TRACE).contains(&"pingora_proxy=info".to_string()));
        assert!(caps(LevelFilter::DEBUG).contains(&"inotify=info".to_string()));
        for d in caps(LevelFilter::WARN) {
            assert!(
                d.parse::<tracing_subscriber::filter::Directive>().is_ok(),
                "{d}"
            );
        }
    }
}
