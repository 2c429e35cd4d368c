//! Logs through `tracing`, text or one JSON object per line, with Pingora's `log` records bridged
//! in. `RUST_LOG` overrides the configured level.

use sidecar_config::{LogFormat, RawLog};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once; later calls (a reload) leave it as it is.
pub fn init(log: &RawLog) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_log::LogTracer::init();
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
