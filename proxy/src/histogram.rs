//! The two duration histograms every proxied request records —
//! `sidecar_request_duration_seconds` and `sidecar_upstream_duration_seconds`, by upstream — as
//! a counter per bucket.
//!
//! `metrics-exporter-prometheus` keeps every histogram sample, with a clock reading, until its
//! upkeep sorts the samples into buckets: ~210 instructions per sample, two samples on every
//! request (bench/PROFILE.md §8.9). Here a sample is a search over the bucket bounds and two
//! atomic adds. The page's lines are written with the exporter's own formatting functions,
//! after the rest of its page; every other histogram stays the exporter's.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::formatting::{
    write_help_line, write_metric_line, write_type_line,
};
use metrics_exporter_prometheus::LabelSet;

use crate::metrics::BUCKETS;

/// A histogram of this module: its name and `# HELP` text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Family {
    name: &'static str,
    help: &'static str,
}

/// `sidecar_request_duration_seconds`.
pub const REQUEST: Family = Family {
    name: "sidecar_request_duration_seconds",
    help: "Time from a request's arrival to the end of its answer, waits and replays included, by upstream",
};

/// `sidecar_upstream_duration_seconds`.
pub const UPSTREAM: Family = Family {
    name: "sidecar_upstream_duration_seconds",
    help:
        "Per attempt that got an answer: request head sent to answer header received, by upstream",
};

/// Durations counted into [`BUCKETS`] (seconds) and one overflow bucket (`+Inf`).
#[derive(Debug)]
pub struct Durations {
    /// Samples per bucket, not cumulative: index `i` counts those over bound `i - 1` and up to
    /// bound `i`; the last counts those over every bound.
    counts: [AtomicU64; BUCKETS.len() + 1],
    /// The sum of all samples in seconds, as `f64` bits.
    sum: AtomicU64,
}

impl Durations {
    fn new() -> Durations {
        Durations {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// One sample.
    pub fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        // The first bound at or above the sample: Prometheus' buckets are `le` (≤).
        let i = BUCKETS.partition_point(|b| *b < secs);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some((f64::from_bits(s) + secs).to_bits())
            });
    }

    /// Cumulative counts per bound (the `le` buckets, `+Inf` last) and the sum.
    fn snapshot(&self) -> ([u64; BUCKETS.len() + 1], f64) {
        let mut total = 0u64;
        let cumulative = std::array::from_fn(|i| {
            total = total.wrapping_add(self.counts[i].load(Ordering::Relaxed));
            total
        });
        (cumulative, f64::from_bits(self.sum.load(Ordering::Relaxed)))
    }
}

type Registry = BTreeMap<(Family, String), Arc<Durations>>;

static REGISTRY: Mutex<Registry> = Mutex::new(BTreeMap::new());

/// The histogram of `family` for `upstream`: the same one for as long as the process runs, so
/// that a reload (which builds each upstream's handles again) keeps its counts.
pub fn durations(family: Family, upstream: &str) -> Arc<Durations> {
    let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let entry = registry.entry((family, upstream.to_owned()));
    Arc::clone(entry.or_insert_with(|| Arc::new(Durations::new())))
}

/// Appends every histogram of this module to `page`, in the exporter's text format.
pub fn render(page: &mut String) {
    let registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    render_from(&registry, page);
}

fn render_from(registry: &Registry, page: &mut String) {
    let no_globals = Default::default();
    let mut family = None;
    for ((f, upstream), durations) in registry {
        if family != Some(*f) {
            if family.is_some() {
                page.push('\n');
            }
            family = Some(*f);
            write_help_line(page, f.name, None, None, f.help);
            write_type_line(page, f.name, None, None, "histogram");
        }
        let key = metrics::Key::from_parts(
            f.name,
            vec![metrics::Label::new("upstream", upstream.clone())],
        );
        let labels = LabelSet::from_key_and_global(&key, &no_globals);
        let (cumulative, sum) = durations.snapshot();
        for (bound, count) in BUCKETS.iter().zip(&cumulative) {
            write_metric_line(
                page,
                f.name,
                Some("bucket"),
                &labels,
                Some(("le", bound)),
                count,
                None,
            );
        }
        let count = cumulative[BUCKETS.len()];
        write_metric_line(
            page,
            f.name,
            Some("bucket"),
            &labels,
            Some(("le", "+Inf")),
            count,
            None,
        );
        write_metric_line::<&str, f64>(page, f.name, Some("sum"), &labels, None, sum, None);
        write_metric_line::<&str, u64>(page, f.name, Some("count"), &labels, None, count, None);
    }
    if family.is_some() {
        page.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_of(entries: &[(Family, &str, &[Duration])]) -> String {
        let mut registry = Registry::new();
        for (family, upstream, samples) in entries {
            let d = Arc::new(Durations::new());
            for s in *samples {
                d.record(*s);
            }
            registry.insert((*family, upstream.to_string()), d);
        }
        let mut page = String::new();
        render_from(&registry, &mut page);
        page
    }

    fn line<'a>(page: &'a str, start: &str) -> &'a str {
        page.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line {start}:\n{page}"))
    }

    #[test]
    fn a_sample_on_a_bound_counts_in_that_bucket_and_the_ones_above() {
        let ms = Duration::from_millis;
        let page = page_of(&[(
            REQUEST,
            "api",
            &[ms(1), ms(1) + Duration::from_nanos(1), ms(400_000)],
        )]);
        let bucket = |le: &str| {
            let l = line(
                &page,
                &format!(
                    "sidecar_request_duration_seconds_bucket{{upstream=\"api\",le=\"{le}\"}} "
                ),
            );
            l.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
        };
        assert_eq!(bucket("0.0005"), 0, "{page}");
        assert_eq!(bucket("0.001"), 1, "on the bound: ≤ 0.001");
        assert_eq!(bucket("0.0025"), 2, "just over the bound: the next bucket");
        assert_eq!(bucket("300"), 2, "400 s is over every bound");
        assert_eq!(bucket("+Inf"), 3);
        let count = line(
            &page,
            "sidecar_request_duration_seconds_count{upstream=\"api\"} ",
        );
        assert!(count.ends_with(" 3"), "{count}");
        let sum = line(
            &page,
            "sidecar_request_duration_seconds_sum{upstream=\"api\"} ",
        );
        let sum: f64 = sum.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((sum - 400.002).abs() < 1e-6, "{sum}");
    }

    #[test]
    fn each_family_is_written_once_with_its_help_and_type_and_label_values_are_escaped() {
        let page = page_of(&[
            (REQUEST, "a", &[Duration::from_millis(3)]),
            (REQUEST, "b\"c", &[]),
            (UPSTREAM, "a", &[Duration::from_millis(2)]),
        ]);
        for f in [REQUEST, UPSTREAM] {
            assert_eq!(
                page.matches(&format!("# TYPE {} histogram\n", f.name))
                    .count(),
                1,
                "{page}"
            );
            assert_eq!(
                page.matches(&format!("# HELP {} ", f.name)).count(),
                1,
                "{page}"
            );
        }
        // The request family's lines all come before the upstream family's.
        let last_request = page.rfind("sidecar_request_duration_seconds").unwrap();
        let first_upstream = page.find("sidecar_upstream_duration_seconds").unwrap();
        assert!(last_request < first_upstream, "{page}");
        assert!(
            page.contains("sidecar_request_duration_seconds_count{upstream=\"b\\\"c\"} 0"),
            "{page}"
        );
        // One bucket line per bound and +Inf, for each of the three series.
        assert_eq!(
            page.matches("_bucket{").count(),
            3 * (BUCKETS.len() + 1),
            "{page}"
        );
    }

    #[test]
    fn the_same_upstream_gets_the_same_histogram_across_reloads() {
        let a = durations(UPSTREAM, "histogram-test-upstream");
        a.record(Duration::from_millis(1));
        let b = durations(UPSTREAM, "histogram-test-upstream");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(
            &a,
            &durations(REQUEST, "histogram-test-upstream")
        ));
    }
}
