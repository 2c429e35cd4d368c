//! Open streams (WebSocket connections, Server-Sent Events): the `max_streams` cap, taken when a
//! request asks for a stream and given back when it ends, and the metrics of streams that
//! started — `sidecar_open_streams{upstream,kind}`, `sidecar_stream_duration_seconds{upstream,kind}`
//! and `sidecar_stream_idle_closed_total{upstream,kind}`.
//!
//! Why a cap of its own: every stream holds a client and an upstream connection for as long as
//! it lives, so without a bound a burst of reconnecting clients ends in file-descriptor errors
//! for everyone; with it, the stream over the cap gets a clear 503 and ordinary requests go on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use sidecar_filters::StreamKind;

/// How many stream requests are in flight, process-wide.
#[derive(Default)]
pub struct StreamCount(Arc<AtomicUsize>);

impl StreamCount {
    /// A place for one more stream, if fewer than `max` hold one; given back on drop.
    pub fn slot(&self, max: usize) -> Option<StreamSlot> {
        if self.0.fetch_add(1, Ordering::AcqRel) >= max {
            self.0.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(StreamSlot(self.0.clone()))
    }

    /// Stream requests in flight now.
    pub fn open(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// One stream request's place under `max_streams`.
pub struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One upstream's stream metrics for one kind, registered once per config.
pub struct StreamMetrics {
    open: metrics::Gauge,
    duration: metrics::Histogram,
    idle_closed: metrics::Counter,
}

/// Both kinds of an upstream.
pub struct UpstreamStreams {
    websocket: Arc<StreamMetrics>,
    sse: Arc<StreamMetrics>,
}

impl UpstreamStreams {
    /// The metrics of upstream `name`.
    pub(crate) fn new(name: &str) -> UpstreamStreams {
        let of = |kind: StreamKind| {
            let (up, k) = (name.to_string(), kind.as_str());
            Arc::new(StreamMetrics {
                open: metrics::gauge!("sidecar_open_streams", "upstream" => up.clone(), "kind" => k),
                duration: metrics::histogram!("sidecar_stream_duration_seconds", "upstream" => up.clone(), "kind" => k),
                idle_closed: metrics::counter!("sidecar_stream_idle_closed_total", "upstream" => up, "kind" => k),
            })
        };
        UpstreamStreams {
            websocket: of(StreamKind::WebSocket),
            sse: of(StreamKind::Sse),
        }
    }

    /// A stream of `kind` started now: counted open until the returned guard drops.
    pub(crate) fn start(&self, kind: StreamKind) -> OpenStream {
        let metrics = match kind {
            StreamKind::WebSocket => self.websocket.clone(),
            StreamKind::Sse => self.sse.clone(),
        };
        metrics.open.increment(1.0);
        OpenStream {
            metrics,
            kind,
            since: Instant::now(),
        }
    }
}

/// A stream that started: open in the gauge until it drops, then its lifetime goes to the
/// histogram.
pub struct OpenStream {
    metrics: Arc<StreamMetrics>,
    kind: StreamKind,
    since: Instant,
}

impl OpenStream {
    /// Its kind.
    pub fn kind(&self) -> StreamKind {
        self.kind
    }

    /// The upstream said nothing for `stream_idle`: the stream was closed for it.
    pub(crate) fn closed_idle(&self) {
        self.metrics.idle_closed.increment(1);
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.metrics.open.decrement(1.0);
        self.metrics
            .duration
            .record(self.since.elapsed().as_secs_f64());
    }
}

/// Buckets of `sidecar_stream_duration_seconds`: streams live from seconds to days, far beyond
/// the request-duration buckets.
pub const DURATION_BUCKETS: [f64; 13] = [
    1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 43200.0, 86400.0,
];

/// `# HELP` lines of the stream metrics; call once the recorder is installed.
pub fn describe() {
    metrics::describe_gauge!(
        "sidecar_open_streams",
        "Streams open now (WebSocket connections after their 101, Server-Sent Events answers), per upstream and kind."
    );
    metrics::describe_histogram!(
        "sidecar_stream_duration_seconds",
        metrics::Unit::Seconds,
        "How long streams lived, from the answer that started them to their close, per upstream and kind."
    );
    metrics::describe_counter!(
        "sidecar_stream_idle_closed_total",
        "Streams closed because the upstream sent nothing for timeouts.stream_idle, per upstream and kind."
    );
    metrics::describe_counter!(
        "sidecar_streams_refused_total",
        "Stream requests (WebSocket upgrades, Accept: text/event-stream) refused with 503 because max_streams were open."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_refuses_beyond_max_and_frees_on_drop() {
        let count = StreamCount::default();
        let a = count.slot(2).expect("first");
        let b = count.slot(2).expect("second");
        assert!(count.slot(2).is_none());
        assert_eq!(count.open(), 2);
        drop(a);
        let c = count.slot(2).expect("a place was given back");
        assert!(count.slot(2).is_none());
        drop((b, c));
        assert_eq!(count.open(), 0);
    }
}
