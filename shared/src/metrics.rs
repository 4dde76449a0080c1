//! A small Prometheus registry: counters and histograms with fixed label values,
//! rendered in the text exposition format. Both binaries keep one [`Registry`] and serve
//! it at `/metrics`.
//!
//! Updates are lock-free atomics on the hot path; the registry only locks to create a
//! new series (first use of a label combination).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Upper bounds (seconds) of every histogram's buckets.
pub const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Brings the count up to `value`, for a count kept elsewhere that only grows (read
    /// at scrape time); a lower `value` leaves it as it is.
    pub fn raise_to(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A distribution of durations in [`BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds (kept integral for atomics).
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(u64::try_from(value.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
struct Family<T> {
    help: &'static str,
    series: BTreeMap<String, (Labels, Arc<T>)>,
}

#[derive(Default)]
struct Inner {
    counters: BTreeMap<&'static str, Family<Counter>>,
    histograms: BTreeMap<&'static str, Family<Histogram>>,
}

/// The process's metrics; cheap to clone.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
}

fn key(labels: &[(&'static str, &str)]) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn owned(labels: &[(&'static str, &str)]) -> Labels {
    labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The counter `name{labels}`, created on first use.
    pub fn counter(&self, name: &'static str, help: &'static str, labels: &[(&'static str, &str)]) -> Arc<Counter> {
        let mut inner = self.lock();
        let family = inner.counters.entry(name).or_insert_with(|| Family { help, series: BTreeMap::new() });
        let entry = family.series.entry(key(labels)).or_insert_with(|| (owned(labels), Arc::new(Counter::default())));
        Arc::clone(&entry.1)
    }

    /// The histogram `name{labels}` (seconds), created on first use.
    pub fn histogram(&self, name: &'static str, help: &'static str, labels: &[(&'static str, &str)]) -> Arc<Histogram> {
        let mut inner = self.lock();
        let family = inner.histograms.entry(name).or_insert_with(|| Family { help, series: BTreeMap::new() });
        let entry = family.series.entry(key(labels)).or_insert_with(|| (owned(labels), Arc::new(Histogram::default())));
        Arc::clone(&entry.1)
    }

    /// The text exposition of every series, plus `gauges` read at scrape time.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let inner = self.lock();
        let mut out = String::new();
        for (name, family) in &inner.counters {
            let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} counter", family.help);
            for (labels, counter) in family.series.values() {
                let _ = writeln!(out, "{name}{} {}", format_labels(labels, None), counter.get());
            }
        }
        for (name, family) in &inner.histograms {
            let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} histogram", family.help);
            for (labels, histogram) in family.series.values() {
                for (bound, bucket) in BUCKETS.iter().zip(&histogram.buckets) {
                    let le = bound.to_string();
                    let _ = writeln!(
                        out,
                        "{name}_bucket{} {}",
                        format_labels(labels, Some(&le)),
                        bucket.load(Ordering::Relaxed)
                    );
                }
                let count = histogram.count();
                let _ = writeln!(out, "{name}_bucket{} {count}", format_labels(labels, Some("+Inf")));
                let sum = histogram.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
                let _ = writeln!(out, "{name}_sum{} {sum}", format_labels(labels, None));
                let _ = writeln!(out, "{name}_count{} {count}", format_labels(labels, None));
            }
        }
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        out
    }
}

fn format_labels(labels: &Labels, le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() { String::new() } else { format!("{{{}}}", parts.join(",")) }
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_histograms_and_gauges_render_in_the_text_format() {
        let registry = Registry::new();
        registry.counter("t_pushes_total", "Pushes.", &[("outcome", "delivered")]).add(3);
        registry.counter("t_pushes_total", "Pushes.", &[("outcome", "delivered")]).inc();
        registry.histogram("t_duration_seconds", "Time.", &[("kind", "fan_out")]).observe(Duration::from_millis(3));
        let text = registry.render(&[("t_backlog", "Jobs waiting.", 7.0)]);
        assert!(text.contains("# TYPE t_pushes_total counter\nt_pushes_total{outcome=\"delivered\"} 4\n"), "{text}");
        assert!(text.contains("t_duration_seconds_bucket{kind=\"fan_out\",le=\"0.0025\"} 0"), "{text}");
        assert!(text.contains("t_duration_seconds_bucket{kind=\"fan_out\",le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("t_duration_seconds_count{kind=\"fan_out\"} 1"), "{text}");
        assert!(text.contains("# TYPE t_backlog gauge\nt_backlog 7"), "{text}");
    }

    #[test]
    fn a_counter_raised_to_a_count_kept_elsewhere_never_goes_down() {
        let counter = Counter::default();
        counter.raise_to(5);
        counter.raise_to(3);
        assert_eq!(counter.get(), 5);
        counter.raise_to(8);
        assert_eq!(counter.get(), 8);
    }
}
