//! Figures of one run: printed as a table and saved as JSON with the machine's facts.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

/// One run's parameters and figures.
pub struct Report {
    scenario: &'static str,
    params: BTreeMap<String, Value>,
    figures: Vec<(String, f64)>,
    notes: BTreeMap<String, String>,
    series: BTreeMap<String, Value>,
    /// Targets checked: figure, bound as text, verdict.
    verdicts: Vec<(String, String, String)>,
    stamp: String,
}

/// The `p`-th percentile (0–1) of sorted `values`.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// The `p`-th percentile (0–1), in milliseconds, of each second's values, for the
/// seconds that have any: `(second, milliseconds)`. Sorts each second's values.
pub fn percentile_by_second(by_second: &mut [Vec<Duration>], p: f64) -> Vec<(f64, f64)> {
    by_second
        .iter_mut()
        .enumerate()
        .filter(|(_, values)| !values.is_empty())
        .map(|(second, values)| {
            values.sort_unstable();
            (second as f64, percentile(values, p).as_secs_f64() * 1000.0)
        })
        .collect()
}

impl Report {
    /// A report for `scenario`; the settings that shape the run are recorded.
    pub fn new(scenario: &'static str, env: &HashMap<String, String>) -> Self {
        let mut params = BTreeMap::new();
        for key in ["SUBMIT_RATE_LIMIT", "PUSH_CONCURRENCY", "QUEUE_MAX_BACKLOG", "NOTIFY_BURST_THRESHOLD"] {
            if let Some(value) = env.get(key) {
                params.insert(key.to_lowercase(), json!(value));
            }
        }
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
        Self {
            scenario,
            params,
            figures: Vec::new(),
            notes: BTreeMap::new(),
            series: BTreeMap::new(),
            verdicts: Vec::new(),
            stamp,
        }
    }

    /// Records a parameter.
    pub fn param(&mut self, name: &str, value: impl Into<Value>) {
        self.params.insert(name.to_owned(), value.into());
    }

    /// Whether parameter `name` was recorded.
    pub fn has_param(&self, name: &str) -> bool {
        self.params.contains_key(name)
    }

    /// Records a figure.
    pub fn figure(&mut self, name: &str, value: f64) {
        self.figures.push((name.to_owned(), value));
    }

    /// The figure `name` recorded last, if any.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.figures.iter().rev().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// Records whether figure `name`, at `value`, meets `bound`.
    pub fn verdict(&mut self, name: &str, bound: crate::targets::Bound, value: f64) {
        let verdict = crate::targets::verdict(bound, value);
        self.verdicts.push((name.to_owned(), crate::targets::describe(bound), verdict));
    }

    /// Records a text (a query plan), printed after the table and saved.
    pub fn note(&mut self, name: &str, text: String) {
        self.notes.insert(name.to_owned(), text);
    }

    /// Records a time series (e.g. memory per second), saved with the figures.
    pub fn series(&mut self, name: &str, points: &[(f64, f64)]) {
        self.series.insert(name.to_owned(), json!(points));
    }

    /// A path beside the JSON file for a plot or another artefact of this run.
    pub fn artefact(&self, suffix: &str) -> anyhow::Result<PathBuf> {
        let dir = results_dir()?;
        Ok(dir.join(format!("{}-{}-{suffix}", self.scenario, self.stamp)))
    }

    /// Plots the distribution of sorted `values` (latency by percentile) beside the JSON.
    pub fn plot_latencies(&self, name: &str, sorted: &[Duration]) -> anyhow::Result<()> {
        let points: Vec<(f64, f64)> = (0..=100)
            .map(|p| (f64::from(p), percentile(sorted, f64::from(p) / 100.0).as_secs_f64() * 1000.0))
            .collect();
        crate::plot::Chart {
            title: &format!("{}: {name}, latency by percentile", self.scenario),
            x_label: "percentile",
            y_label: "milliseconds",
            series: vec![crate::plot::Series { name, points: &points }],
            limit: None,
        }
        .save(&self.artefact(&format!("{name}-latency.svg"))?)
    }

    /// Plots `events` (seconds since the start, sorted) as a rate per second over time
    /// beside the JSON, and records the series.
    pub fn plot_throughput(&mut self, name: &str, events: &[f64]) -> anyhow::Result<()> {
        let last = events.last().copied().unwrap_or(0.0).ceil().max(1.0) as usize;
        let mut per_second = vec![0.0f64; last + 1];
        for at in events {
            per_second[(*at as usize).min(last)] += 1.0;
        }
        let points: Vec<(f64, f64)> = per_second.iter().enumerate().map(|(s, n)| (s as f64, *n)).collect();
        self.series(&format!("{name}_per_second"), &points);
        crate::plot::Chart {
            title: &format!("{}: {name} per second", self.scenario),
            x_label: "seconds",
            y_label: "per second",
            series: vec![crate::plot::Series { name, points: &points }],
            limit: None,
        }
        .save(&self.artefact(&format!("{name}-throughput.svg"))?)
    }

    /// Records p50/p90/p95/p99/max of sorted `values` in milliseconds.
    pub fn latencies(&mut self, name: &str, sorted: &[Duration]) {
        for (label, p) in [("p50", 0.50), ("p90", 0.90), ("p95", 0.95), ("p99", 0.99), ("max", 1.0)] {
            self.figure(&format!("{name}_{label}_ms"), percentile(sorted, p).as_secs_f64() * 1000.0);
        }
    }

    /// Prints the table.
    pub fn print(&self) {
        println!("\nscenario: {}", self.scenario);
        for (name, value) in &self.params {
            println!("  {name:<28} {value}");
        }
        println!("  {:-<28} {:-<12}", "", "");
        for (name, value) in &self.figures {
            println!("  {name:<28} {value:>12.3}");
        }
        if !self.verdicts.is_empty() {
            println!("\ntargets:");
            for (name, bound, verdict) in &self.verdicts {
                let value = self.get(name).unwrap_or_default();
                println!("  {name:<28} {value:>12.3}  target {bound}: {verdict}");
            }
        }
        for (name, text) in &self.notes {
            println!("\n{name}:\n{text}");
        }
    }

    /// Writes `bench/results/<scenario>-<time>.json`; returns its path.
    pub fn save(&self) -> anyhow::Result<PathBuf> {
        let path = results_dir()?.join(format!("{}-{}.json", self.scenario, self.stamp));
        let body = json!({
            "scenario": self.scenario,
            "at": chrono::Utc::now().to_rfc3339(),
            "machine": machine(),
            "params": self.params,
            "figures": self.figures.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "notes": self.notes,
            "series": self.series,
            "targets": self.verdicts.iter().map(|(name, bound, verdict)| json!({"figure": name, "target": bound, "verdict": verdict})).collect::<Vec<_>>(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&body)?)?;
        Ok(path)
    }
}

/// `bench/results/`, created if needed.
fn results_dir() -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// CPU model, core count and memory, from `/proc`.
fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model =
        cpuinfo.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, m)| m.trim());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kib = meminfo.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1));
    json!({
        "cpu": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "memory_kib": memory_kib,
        "os": std::env::consts::OS,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::percentile_by_second;

    #[test]
    fn each_second_gets_its_own_percentile_and_empty_seconds_are_left_out() {
        let ms = Duration::from_millis;
        let mut by_second = vec![vec![ms(30), ms(10), ms(20)], Vec::new(), vec![ms(500)]];
        assert_eq!(percentile_by_second(&mut by_second, 0.5), vec![(0.0, 20.0), (2.0, 500.0)]);
        assert_eq!(percentile_by_second(&mut by_second, 0.99), vec![(0.0, 30.0), (2.0, 500.0)]);
    }
}
