//! `capacity`: `e2e` at rising rates, the stack started anew for each (Tidings on a
//! database and a Redis namespace of the step's own; the reference restarted on its own
//! database, which its scripts keep), until a rate is not sustained — its
//! submit-to-push p99 past [`SUSTAINED_P99_MS`], or a submission refused, lost or
//! pushed twice, or a push refused by the push service. The last rate sustained before
//! it is the stack's capacity on this machine at this moment: how far the 2,000/s target
//! sits below the knee, where a single rate's run only says met or missed.

use std::time::Duration;

use crate::report::Report;
use crate::{Cli, Scenario, Target};

/// The p99 a sustained rate keeps, in milliseconds (`e2e`'s target at 2,000/s).
pub const SUSTAINED_P99_MS: f64 = 50.0;

/// Plotted delays are drawn at most this many times [`SUSTAINED_P99_MS`], so that the
/// first rate past the knee (seconds of backlog) does not flatten the others.
const PLOT_CAP: f64 = 4.0;

/// The rates a sweep from `from` to `to` by `step` tries, in order.
pub fn rates(from: u64, step: u64, to: u64) -> Vec<u64> {
    let step = usize::try_from(step.max(1)).unwrap_or(usize::MAX);
    (from.max(1)..=to).step_by(step).collect()
}

/// Whether an `e2e` run sustained its rate: a p99 within [`SUSTAINED_P99_MS`], and every
/// submission accepted, delivered once and accepted by the push service.
pub fn sustained(report: &Report) -> bool {
    report.get("submit_to_push_p99_ms").is_some_and(|p99| p99 <= SUSTAINED_P99_MS)
        && ["rejected", "lost", "duplicated", "refused_by_push_service"].iter().all(|f| report.get(f) == Some(0.0))
}

/// One rate's reading.
struct Step {
    rate: u64,
    held: bool,
    figures: Vec<(&'static str, f64)>,
}

/// The figures of each step kept in the sweep's report, by rate.
const KEPT: [&str; 8] = [
    "submit_to_push_p50_ms",
    "submit_to_push_p99_ms",
    "stack_cpu_ms_per_message",
    "worker_statements_per_message",
    "worker_job_mean_ms",
    "machine_busy_cpu_seconds",
    "machine_steal_cpu_seconds",
    "cpu_probe_ms",
];

/// Runs the sweep `scenario` asks for against `cli`'s target, saving each step's report
/// as `e2e` does; returns the sweep's own report.
pub async fn run(cli: &Cli, push: &tidings_tests::push_service::PushService) -> anyhow::Result<Report> {
    let Scenario::Capacity { from, step, to, seconds } = cli.scenario else {
        anyhow::bail!("not a capacity sweep");
    };
    let rates = rates(from, step, to);
    anyhow::ensure!(!rates.is_empty(), "no rate from {from} to {to}");
    let mut steps = Vec::new();
    let mut files = Vec::new();
    // How the sweep ended, when a step measured nothing (then its highest rate sustained
    // is not a capacity).
    let mut ended = None;
    for rate in rates {
        let mut step_cli = cli.clone();
        step_cli.scenario = Scenario::E2e { rate, seconds, gap_secs: None };
        // The stand-in serves every step, each from a clean slate.
        push.reset();
        let probe_ms = crate::procs::cpu_probe_ms();
        eprintln!("capacity: {rate}/s");
        let result = match cli.target {
            Target::Django => crate::run_django(&step_cli, push).await,
            Target::Tidings => crate::run_tidings(&step_cli, push).await,
        };
        // A step that failed, or a reference that could not be started (its report then
        // holds the figures measured elsewhere), measured nothing: the sweep ends there,
        // with what the steps before it measured.
        let mut report = match result {
            Ok(report) if report.has_param("fallback") => {
                ended = Some(format!("at {rate}/s the reference could not be started (see its run's `fallback`)"));
                break;
            }
            Ok(report) => report,
            Err(e) => {
                ended = Some(format!("at {rate}/s the run failed: {e:#}"));
                break;
            }
        };
        report.figure("cpu_probe_ms", probe_ms);
        let saved = match report.save() {
            Ok(saved) => saved,
            Err(e) => {
                ended = Some(format!("at {rate}/s the run could not be saved: {e:#}"));
                break;
            }
        };
        let held = sustained(&report);
        let figures: Vec<(&'static str, f64)> =
            KEPT.iter().filter_map(|&name| report.get(name).map(|value| (name, value))).collect();
        eprintln!(
            "\ncapacity: {rate}/s {} (p99 {:.1} ms), saved {}",
            if held { "sustained" } else { "not sustained" },
            report.get("submit_to_push_p99_ms").unwrap_or(f64::NAN),
            saved.display()
        );
        files.push(format!("{rate}/s: {}", saved.file_name().and_then(|n| n.to_str()).unwrap_or_default()));
        steps.push(Step { rate, held, figures });
        if !held {
            break;
        }
        // Let the machine settle (the last step's database dropped, its processes gone).
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let failed = ended.is_some();
    let ended = ended.unwrap_or_else(|| ending(&steps));
    eprintln!("capacity: {ended}");
    anyhow::ensure!(!steps.is_empty(), "no rate measured: {ended}");
    summarise(cli, &steps, &files, &ended, failed)
}

/// How a sweep that ran every step it took ended: at the first rate not sustained (the
/// first of all: below `--from`), or past `--to` with every rate sustained (so the
/// highest is a lower bound).
fn ending(steps: &[Step]) -> String {
    match steps.iter().position(|s| !s.held) {
        Some(0) => "not sustained at the first rate: the capacity is below it".into(),
        Some(i) => format!("not sustained at {}/s", steps[i].rate),
        None => "every rate sustained: the capacity is at least the last".into(),
    }
}

/// Figure `name` of each step that has it, by the step's rate.
fn by_rate(steps: &[Step], name: &str) -> Vec<(f64, f64)> {
    steps.iter().filter_map(|s| s.figures.iter().find(|(n, _)| *n == name).map(|(_, v)| (s.rate as f64, *v))).collect()
}

/// The sweep's verdict as figures: the highest rate sustained (rates are held up to the
/// first that is not: the sweep stops there), named as only what the sweep reached when
/// it ended on a step that measured nothing (`failed`), and the first rate not
/// sustained, if any.
fn verdict(steps: &[Step], failed: bool) -> Vec<(&'static str, u64)> {
    let sustained = steps.iter().take_while(|s| s.held).last().map_or(0, |s| s.rate);
    let name = if failed { "sustained_before_the_failure_per_second" } else { "sustained_per_second" };
    let mut figures = vec![(name, sustained)];
    if let Some(missed) = steps.iter().find(|s| !s.held) {
        figures.push(("first_not_sustained_per_second", missed.rate));
    }
    figures
}

/// The sweep's report: the rate sustained, the first one not, each step's figures by
/// rate, and a plot of the delays by rate. A sweep that ended on a step that measured
/// nothing (`failed`) reports its highest rate sustained only as what it reached, and
/// is not checked against the target.
fn summarise(cli: &Cli, steps: &[Step], files: &[String], ended: &str, failed: bool) -> anyhow::Result<Report> {
    let Scenario::Capacity { from, step, to, seconds } = cli.scenario else {
        anyhow::bail!("not a capacity sweep");
    };
    let mut report = Report::new("capacity", &std::collections::HashMap::new());
    report.param("from_per_second", from);
    report.param("step_per_second", step);
    report.param("to_per_second", to);
    report.param("seconds", seconds);
    report.param("worker_concurrency", cli.worker_concurrency);
    report.param("database", if cli.sqlite { "sqlite" } else { "postgresql" });
    if cli.target == Target::Django {
        report.param("target", "django");
    }
    report.param("sustained_p99_ms", SUSTAINED_P99_MS);
    report.param("ended", ended);
    for (name, rate) in verdict(steps, failed) {
        report.figure(name, rate as f64);
    }
    for name in KEPT {
        report.series(&format!("{name}_by_rate"), &by_rate(steps, name));
    }
    report.note("steps", files.join("\n"));
    let capped = |name: &str| -> Vec<(f64, f64)> {
        by_rate(steps, name).into_iter().map(|(rate, ms)| (rate, ms.min(PLOT_CAP * SUSTAINED_P99_MS))).collect()
    };
    let (p50, p99) = (capped("submit_to_push_p50_ms"), capped("submit_to_push_p99_ms"));
    let title = format!("capacity: submit-to-push delay by rate (drawn at most {:.0} ms)", PLOT_CAP * SUSTAINED_P99_MS);
    crate::plot::Chart {
        title: &title,
        x_label: "submissions per second",
        y_label: "milliseconds",
        series: vec![
            crate::plot::Series { name: "p50", points: &p50 },
            crate::plot::Series { name: "p99", points: &p99 },
        ],
        limit: Some(("sustained: p99 ≤ 50 ms", SUSTAINED_P99_MS)),
    }
    .save(&report.artefact("delay-by-rate.svg")?)?;
    // The targets are Tidings' own; the reference's sweep is its side of the comparison.
    if cli.target == Target::Tidings && !failed {
        crate::targets::check(&mut report, cli.scenario, cli.workers, !cli.sqlite);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::{rates, sustained};
    use crate::report::Report;

    #[test]
    fn a_sweep_steps_from_its_first_rate_to_its_last_at_most() {
        assert_eq!(rates(1000, 500, 3000), vec![1000, 1500, 2000, 2500, 3000]);
        assert_eq!(rates(1000, 700, 3000), vec![1000, 1700, 2400]);
        assert_eq!(rates(0, 0, 3), vec![1, 2, 3]);
        assert!(rates(5000, 500, 3000).is_empty());
    }

    #[test]
    fn a_sweep_says_whether_its_highest_rate_is_the_capacity_or_a_bound() {
        let step = |rate, held| super::Step { rate, held, figures: Vec::new() };
        assert_eq!(super::ending(&[step(1000, true), step(1500, false)]), "not sustained at 1500/s");
        assert_eq!(super::ending(&[step(1000, false)]), "not sustained at the first rate: the capacity is below it");
        assert_eq!(super::ending(&[step(1000, true)]), "every rate sustained: the capacity is at least the last");
    }

    #[test]
    fn a_sweep_that_ended_on_a_failed_step_reports_only_what_it_reached() {
        let step = |rate, held| super::Step { rate, held, figures: Vec::new() };
        let steps = [step(1000, true), step(1500, true), step(2000, false)];
        assert_eq!(
            super::verdict(&steps, false),
            vec![("sustained_per_second", 1500), ("first_not_sustained_per_second", 2000)]
        );
        // A failure after two rates held: no capacity claimed, no rate not sustained.
        assert_eq!(super::verdict(&steps[..2], true), vec![("sustained_before_the_failure_per_second", 1500)]);
        // Nothing held before it.
        assert_eq!(super::verdict(&[], true), vec![("sustained_before_the_failure_per_second", 0)]);
    }

    fn e2e(p99: f64, lost: f64) -> Report {
        let mut report = Report::new("e2e", &HashMap::new());
        report.figure("submit_to_push_p99_ms", p99);
        for name in ["rejected", "duplicated", "refused_by_push_service"] {
            report.figure(name, 0.0);
        }
        report.figure("lost", lost);
        report
    }

    #[test]
    fn a_rate_is_sustained_only_with_its_p99_within_bound_and_nothing_lost() {
        assert!(sustained(&e2e(50.0, 0.0)));
        assert!(!sustained(&e2e(50.1, 0.0)));
        assert!(!sustained(&e2e(12.0, 1.0)));
        assert!(!sustained(&Report::new("e2e", &HashMap::new())));
    }
}
