//! `--target django`: the same scenarios against the reference stack (Django + Huey +
//! pywebpush, built as the seed article builds it) in the peers folder beside this
//! repository, started with its own scripts, so the ratio is measured in one run on the
//! same machine. When it cannot be started, the run says why and reports the figures
//! measured for it on this machine kind instead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tidings_tests::push_service::{BrowserSubscription, PushService};
use tokio::process::Command;

/// Where the reference stack answers (its scripts' default).
pub const ADDRESS: &str = "http://127.0.0.1:8001";

/// Figures measured for the reference on this machine kind (PostgreSQL, gunicorn 4 sync
/// workers, Huey 4 threads), reported when it cannot be started.
pub const MEASURED: [(&str, f64); 7] = [
    ("submit_accepted_per_second", 440.0),
    ("submit_latency_p50_ms", 71.0),
    ("submit_latency_p99_ms", 105.0),
    ("e2e_50_per_second_p50_ms", 10.3),
    ("e2e_50_per_second_p99_ms", 14.0),
    ("fanout_1000_all_seconds", 2.4),
    ("fanout_1000_20ms_all_seconds", 24.0),
];

/// The running reference stack.
pub struct Peer {
    dir: PathBuf,
    run_dir: PathBuf,
}

/// A Python of at least 3.12 (what the reference's Django needs): `PYTHON` if set, else
/// the first that answers among `python3.13`, `python3.12`, `python3` and pyenv's.
async fn find_python() -> Option<String> {
    if let Ok(python) = std::env::var("PYTHON") {
        return Some(python);
    }
    let mut candidates: Vec<String> = ["python3.13", "python3.12", "python3"].iter().map(|s| (*s).to_owned()).collect();
    if let Ok(out) = Command::new("pyenv").arg("root").output().await {
        let root = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if let Ok(versions) = std::fs::read_dir(Path::new(&root).join("versions")) {
            let mut found: Vec<String> = versions
                .filter_map(Result::ok)
                .map(|v| v.path().join("bin/python3").to_string_lossy().into_owned())
                .collect();
            found.sort();
            candidates.extend(found.into_iter().rev());
        }
    }
    for candidate in candidates {
        let check = Command::new(&candidate)
            .args(["-c", "import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)"])
            .output()
            .await;
        if check.is_ok_and(|o| o.status.success()) {
            return Some(candidate);
        }
    }
    None
}

/// The `sslmode` of the benchmark's database URL, given to the reference's PostgreSQL
/// driver too.
pub static SSLMODE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

async fn script(path: &Path, args: &[&str], run_dir: &Path) -> anyhow::Result<String> {
    script_with(path, args, run_dir, None).await
}

async fn script_with(path: &Path, args: &[&str], run_dir: &Path, python: Option<&str>) -> anyhow::Result<String> {
    let mut command = Command::new("bash");
    if let Some(mode) = SSLMODE.get() {
        // libpq's own variable: the reference talks to PostgreSQL as Tidings does.
        command.env("PGSSLMODE", mode);
    }
    if let Some(python) = python {
        command.env("PYTHON", python);
    }
    let output = command
        .arg(path)
        .args(args)
        .env("RUN_DIR", run_dir)
        .output()
        .await
        .with_context(|| format!("running {}", path.display()))?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    anyhow::ensure!(output.status.success(), "{} failed: {}", path.display(), text.trim());
    Ok(text)
}

impl Peer {
    /// Sets the stack up if its virtual environment is missing (`setup.sh`), then starts
    /// it (`run_peer.sh`).
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let dir = dir.canonicalize().with_context(|| format!("no reference stack at {}", dir.display()))?;
        let peers = dir.parent().context("the reference stack's folder has no parent")?;
        if !peers.join(".venv").exists() {
            eprintln!("setting the reference stack up (once)…");
            let python = find_python().await.context("the reference needs Python 3.12 or newer (set PYTHON=…)")?;
            script_with(&peers.join("setup.sh"), &[], &std::env::temp_dir(), Some(&python)).await?;
        }
        let run_dir = std::env::temp_dir().join("tidings-bench-django");
        std::fs::create_dir_all(&run_dir)?;
        eprintln!("starting the reference stack…");
        script(&dir.join("run_peer.sh"), &[], &run_dir).await?;
        Ok(Self { dir, run_dir })
    }

    /// The VAPID public key its pushes are signed with.
    pub fn vapid_public_key(&self) -> anyhow::Result<String> {
        let env = std::fs::read_to_string(self.run_dir.join("vapid.env"))?;
        env.lines()
            .find_map(|l| l.strip_prefix("VAPID_PUBLIC_KEY="))
            .map(|k| k.trim().trim_matches('"').to_owned())
            .context("no VAPID_PUBLIC_KEY in the reference's vapid.env")
    }

    /// Makes its subscriptions exactly `browsers`.
    pub async fn subscribe(&self, browsers: &[BrowserSubscription]) -> anyhow::Result<()> {
        let list: Vec<serde_json::Value> = browsers
            .iter()
            .map(|b| serde_json::json!({"endpoint": b.endpoint, "keys": {"p256dh": b.p256dh, "auth": b.auth}}))
            .collect();
        let file = self.run_dir.join("subscriptions.json");
        std::fs::write(&file, serde_json::to_vec(&list)?)?;
        script(&self.dir.join("seed_hook.sh"), &[&file.to_string_lossy()], &self.run_dir).await?;
        Ok(())
    }

    /// CPU seconds used so far by gunicorn (master and workers) and the Huey consumer.
    pub fn cpu_seconds(&self) -> f64 {
        let pid_of = |name: &str| {
            std::fs::read_to_string(self.run_dir.join(name)).ok().and_then(|p| p.trim().parse::<u32>().ok())
        };
        let mut pids: Vec<u32> = ["gunicorn.pid", "huey.pid"].iter().filter_map(|n| pid_of(n)).collect();
        let children: Vec<u32> = pids.iter().flat_map(|pid| children_of(*pid)).collect();
        pids.extend(children);
        pids.iter().map(|pid| crate::procs::cpu_seconds(*pid)).sum()
    }

    /// Waits until its queue is empty (at most `timeout`).
    pub async fn drain(&self, timeout: Duration) {
        let _ =
            script(&self.dir.join("queue_len.sh"), &["--wait", &timeout.as_secs().to_string()], &self.run_dir).await;
    }

    /// Stops what `start` started.
    pub async fn stop(self) {
        if let Err(e) = script(&self.dir.join("stop_peer.sh"), &[], &self.run_dir).await {
            eprintln!("stopping the reference stack: {e:#}");
        }
    }
}

/// Direct children of process `pid` (from `/proc`).
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Subscriptions on the stand-in for the reference, `count` of them.
pub async fn subscribe_many(peer: &Peer, push: &PushService, count: usize) -> anyhow::Result<()> {
    let browsers: Vec<BrowserSubscription> = (0..count).map(|_| push.new_subscription()).collect();
    peer.subscribe(&browsers).await
}
