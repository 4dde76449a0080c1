//! Several real `worker` processes sharing one queue: periodic work runs once per tick,
//! and every process stops cleanly on SIGTERM.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tidings_tests::harness::{Options, spawn_app_with};

/// The worker command line as a real process (same code as the `worker` binary).
fn worker_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_worker-process"))
}

#[tokio::test]
async fn three_worker_processes_run_each_periodic_tick_exactly_once() {
    let binary = worker_binary();
    let app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    let mut env = app.env.clone();
    env.insert("RELAY_INTERVAL_MS".into(), "100".into());
    env.insert("TRIM_INTERVAL_MS".into(), "200".into());
    env.insert("WORKER_METRICS_BIND".into(), "off".into());
    env.insert("RUST_LOG".into(), "warn".into());

    let mut workers: Vec<_> = (0..3).map(|_| start_worker(&binary, &env)).collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    for worker in &workers {
        let pid = worker.id().expect("running").to_string();
        let status = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill");
        assert!(status.success());
    }
    for worker in &mut workers {
        let status = tokio::time::timeout(Duration::from_secs(30), worker.wait()).await.expect("stops").expect("waits");
        assert!(status.success(), "a worker exits 0 after SIGTERM: {status}");
    }

    let queue =
        shared::queue::JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    let periodic = worker::queue::Periodic::new(queue.connection(), &app.settings.redis_namespace);
    let runs = periodic.runs("relay").await.expect("runs");
    assert_once_per_tick(&runs, 20, "the relay: about 40 ticks in 4 s at 100 ms");
    let pids: std::collections::HashSet<u32> = runs.iter().map(|(_, pid)| *pid).collect();
    assert!(pids.len() >= 2, "no process is special: ticks ran in {pids:?}");
    // The trim of Redis, likewise.
    let trims = periodic.runs(worker::app::TRIM_TASK).await.expect("runs");
    assert_once_per_tick(&trims, 10, "the trim: about 20 ticks in 4 s at 200 ms");
}

#[tokio::test]
async fn a_worker_host_whose_clock_is_behind_does_not_run_a_tick_again() {
    // Arrange: a tick of a task that runs every 100 ms, claimed by one host.
    let app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    let queue =
        shared::queue::JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    let periodic = worker::queue::Periodic::new(queue.connection(), &app.settings.redis_namespace);
    let every = Duration::from_millis(100);
    assert!(periodic.claim("relay", 7, every).await.expect("redis"), "the first host runs it");

    // Act: a host whose clock is two seconds behind (twenty ticks) reaches the same tick.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = periodic.claim("relay", 7, every).await.expect("redis");

    // Assert: the claim still stands.
    assert!(!again, "a tick ran twice");
}

/// Every tick in `runs` ran once, and at least `least` ticks ran.
fn assert_once_per_tick(runs: &[(u64, u32)], least: usize, what: &str) {
    let mut ticks: Vec<u64> = runs.iter().map(|(tick, _)| *tick).collect();
    let count = ticks.len();
    ticks.sort_unstable();
    ticks.dedup();
    assert_eq!(ticks.len(), count, "{what}: a tick ran twice: {runs:?}");
    assert!(count >= least, "{what}: got {count}");
}

fn start_worker(binary: &PathBuf, env: &std::collections::HashMap<String, String>) -> tokio::process::Child {
    start_worker_with(binary, env, 2)
}

fn start_worker_with(
    binary: &PathBuf,
    env: &std::collections::HashMap<String, String>,
    concurrency: usize,
) -> tokio::process::Child {
    tokio::process::Command::new(binary)
        .args(["run", "--concurrency", &concurrency.to_string()])
        .envs(env)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("worker starts")
}

#[tokio::test]
async fn a_worker_killed_mid_fan_out_is_taken_over_and_every_subscription_gets_its_push() {
    // Arrange: a slow push service, so the fan-out is mid-way when the worker dies.
    let binary = worker_binary();
    let app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    let admin = app.create_admin().await;
    let mut browsers = Vec::new();
    for _ in 0..200 {
        browsers.push(app.subscribe_device(admin).await);
    }
    app.push.set_delay(Duration::from_millis(100));
    let mut env = app.env.clone();
    env.insert("WORKER_RECOVERY_SECS".into(), "4".into());
    env.insert("PUSH_CONCURRENCY".into(), "4".into());
    env.insert("WORKER_METRICS_BIND".into(), "off".into());
    env.insert("RUST_LOG".into(), "warn".into());
    let mut first = start_worker(&binary, &env);
    app.submit_valid_feedback("Ann", "survives a crash").await;
    let some = app.push.wait_for_received(20, Duration::from_secs(20)).await;
    assert!(some.len() >= 20 && some.len() < 200, "the fan-out is mid-way ({} sent)", some.len());

    // Act: kill -9, then another worker comes up.
    first.start_kill().expect("SIGKILL");
    let _ = first.wait().await;
    let at_kill = app.push.received().len();
    let _second = start_worker(&binary, &env);

    // Assert: every subscription gets the message, within the bound plus the lease.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let received = app.push.received();
        let served = browsers.iter().filter(|b| received.iter().any(|p| p.endpoint == b.endpoint)).count();
        if served == browsers.len() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{served}/200 subscriptions served after the takeover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let received = app.push.received();
    let duplicated: Vec<_> =
        browsers.iter().filter(|b| received.iter().filter(|p| p.endpoint == b.endpoint).count() > 1).collect();
    // Only pushes in flight at the kill can arrive twice: those on the wire (at most
    // PUSH_CONCURRENCY) and those sent but not yet recorded (a batch being written, one
    // waiting, one the sender holds: at most three times PUSH_CONCURRENCY more).
    assert!(duplicated.len() <= 16, "{} duplicates, {at_kill} delivered before the kill", duplicated.len());
    let topics: std::collections::HashSet<_> = received.iter().map(|p| p.topic.clone()).collect();
    assert_eq!(topics.len(), 1, "every copy carries the same Topic, so a push service replaces an undelivered one");
}

#[tokio::test]
async fn fifty_thousand_jobs_at_once_are_all_done_by_worker_processes_within_the_backlog_bound() {
    // Arrange: 50,000 committed messages with their dispatch records, as a burst of
    // submissions leaves them while Redis is full or down.
    let app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    const JOBS: u64 = 50_000;
    app.insert_burst(JOBS).await;
    let bound = app.settings.worker.max_backlog;
    let mut env = app.env.clone();
    env.insert("RELAY_INTERVAL_MS".into(), "100".into());
    env.insert("WORKER_METRICS_BIND".into(), "off".into());
    env.insert("RUST_LOG".into(), "warn".into());

    // Act: two worker processes.
    let binary = worker_binary();
    let mut workers: Vec<_> = (0..2).map(|_| start_worker_with(&binary, &env, 16)).collect();

    // Assert: every job done, the backlog never above the bound, no worker died.
    let queue =
        shared::queue::JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    let mut conn = queue.connection();
    let (mut most, mut restarts, mut outstanding) = (0, 0, JOBS);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while outstanding > 0 && tokio::time::Instant::now() < deadline {
        for _ in 0..20 {
            most = most.max(queue.backlog().await.expect("backlog"));
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let reports = shared::worker_health::read_all(&mut conn, &app.settings.redis_namespace).await.expect("reports");
        restarts = restarts.max(reports.iter().map(|r| r.restarts).max().unwrap_or(0));
        outstanding = shared::queries::dispatch::outstanding(&app.db).await.expect("count");
    }
    assert_eq!(outstanding, 0, "every job was done");
    assert!(most <= bound, "Redis held {most} waiting jobs, above the bound of {bound}");
    assert!(most >= bound / 2, "the relay kept the queue fed (at most {most} waiting)");
    assert_eq!(restarts, 0, "no worker died");
    for worker in &mut workers {
        assert!(worker.try_wait().expect("status").is_none(), "the worker process is still running");
        let pid = worker.id().expect("running").to_string();
        tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill");
        let status = tokio::time::timeout(Duration::from_secs(30), worker.wait()).await.expect("stops").expect("waits");
        assert!(status.success(), "a worker exits 0 after SIGTERM: {status}");
    }
}

/// An app without a worker and one subscribed browser (its endpoint) whose pushes take
/// `delay`, with the environment of worker processes: a 4 s recovery bound, the push
/// timeout (ms) and the drain time (s) given, no metrics listener, quiet logs.
async fn one_slow_push(
    delay: Duration,
    push_timeout_ms: &str,
    drain_secs: &str,
) -> (tidings_tests::harness::TestApp, String, std::collections::HashMap<String, String>) {
    let app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    let browser = app.subscribe_browser().await;
    app.push.set_delay(delay);
    let mut env = app.env.clone();
    for (name, value) in [
        ("WORKER_RECOVERY_SECS", "4"),
        ("PUSH_TIMEOUT_MS", push_timeout_ms),
        ("SHUTDOWN_TIMEOUT_SECS", drain_secs),
        ("WORKER_METRICS_BIND", "off"),
        ("RUST_LOG", "warn"),
    ] {
        env.insert(name.into(), value.into());
    }
    (app, browser.endpoint, env)
}

/// Whether a delivery is claimed and its push on the wire.
async fn push_in_flight(app: &tidings_tests::harness::TestApp) -> bool {
    use sea_orm::EntityTrait;
    let rows = shared::entities::delivery::Entity::find().all(&app.db).await.expect("query");
    rows.iter().any(|r| r.status == "sending")
}

#[tokio::test]
async fn sigterm_during_a_long_job_lets_it_finish_and_no_other_worker_runs_it_again() {
    // Arrange: the push takes 6 s, longer than the 3 s of silence that mark a worker dead
    // (recovery bound 4 s), so the draining worker would look dead to the other one if it
    // stopped heartbeating while it finishes the job.
    let binary = worker_binary();
    let (app, endpoint, env) = one_slow_push(Duration::from_secs(6), "10000", "20").await;
    let mut first = start_worker(&binary, &env);
    app.submit_valid_feedback("Ann", "long job").await;
    assert!(crate::pipeline::wait_until(|| async { push_in_flight(&app).await }).await, "the push is on the wire");
    let mut second = start_worker(&binary, &env);

    // Act: SIGTERM to the worker running the job.
    let pid = first.id().expect("running").to_string();
    tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill");

    // Assert: it finishes the job and exits 0; the push was sent once, in all.
    let status = tokio::time::timeout(Duration::from_secs(30), first.wait()).await.expect("stops").expect("waits");
    assert!(status.success(), "the draining worker exits 0: {status}");
    let received = app.push.wait_for_received(1, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].endpoint, endpoint);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(app.push.attempts().len(), 1, "no second run anywhere: the other worker never sent it again");
    assert!(second.try_wait().expect("status").is_none(), "the other worker is still up");
    let _ = second.start_kill();
}

#[tokio::test]
async fn sigterm_during_a_job_longer_than_the_shutdown_timeout_stops_within_it_and_another_worker_finishes_the_job() {
    // Arrange: the push takes 5 s, the drain gets 1 s.
    let binary = worker_binary();
    let (app, endpoint, env) = one_slow_push(Duration::from_secs(5), "8000", "1").await;
    let mut first = start_worker(&binary, &env);
    app.submit_valid_feedback("Ann", "longer than the drain").await;
    let on_the_wire =
        crate::pipeline::wait_until(|| async { push_in_flight(&app).await && app.push.connections_opened() >= 1 })
            .await;
    assert!(on_the_wire, "the push is on the wire");
    let mut second = start_worker(&binary, &env);

    // Act: SIGTERM to the worker running the job.
    let stopping = std::time::Instant::now();
    let pid = first.id().expect("running").to_string();
    tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill");

    // Assert: it stops after its drain time and before the push's answer, exits 0, and
    // the other worker takes the job back once the claim lapses: the delivery ends up
    // sent. The stand-in records the cut-off push too (it finishes the request), so two
    // pushes arrive at most.
    let status = tokio::time::timeout(Duration::from_secs(30), first.wait()).await.expect("stops").expect("waits");
    let took = stopping.elapsed();
    assert!(status.success(), "the worker exits 0 after its drain time: {status}");
    assert!(took >= Duration::from_secs(1), "stopped after {took:?}, before its 1 s drain was over");
    assert!(took < Duration::from_secs(5), "stopped after {took:?}: it waited for the 5 s push");
    let sent = crate::pipeline::wait_until_for(Duration::from_secs(40), || async {
        use sea_orm::EntityTrait;
        let rows = shared::entities::delivery::Entity::find().all(&app.db).await.expect("query");
        rows.len() == 1 && rows[0].status == "sent"
    })
    .await;
    assert!(sent, "the other worker sent the push once the first one's claim lapsed");
    let received = app.push.received();
    assert!(!received.is_empty() && received.len() <= 2, "{} pushes arrived", received.len());
    assert!(received.iter().all(|p| p.endpoint == endpoint));
    assert!(second.try_wait().expect("status").is_none(), "the other worker is still up");
    let _ = second.start_kill();
}

#[tokio::test]
async fn a_worker_restarted_on_the_same_host_starts_at_once() {
    let binary = worker_binary();
    let app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    let browser = app.subscribe_browser().await;
    let mut env = app.env.clone();
    env.insert("HOSTNAME".into(), "worker-host-1".into());
    env.insert("WORKER_METRICS_BIND".into(), "off".into());
    env.insert("RUST_LOG".into(), "warn".into());
    let queue =
        shared::queue::JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    let mut conn = queue.connection();
    let mut first = start_worker(&binary, &env);
    let registered = crate::pipeline::wait_until(|| async {
        let mut conn = conn.clone();
        !shared::worker_health::read_all(&mut conn, &app.settings.redis_namespace).await.expect("read").is_empty()
    })
    .await;
    assert!(registered);

    // Act: the process dies without a word and a supervisor starts it again at once.
    first.start_kill().expect("SIGKILL");
    let _ = first.wait().await;
    let _second = start_worker(&binary, &env);
    app.submit_valid_feedback("Ann", "after the restart").await;

    // Assert: the new process serves at once (apalis-redis would refuse a reused worker
    // name until the old registration expired, minutes later).
    let received = app.push.wait_for_received(1, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 1, "delivered by the restarted worker");
    assert_eq!(received[0].endpoint, browser.endpoint);
    let reports = shared::worker_health::read_all(&mut conn, &app.settings.redis_namespace).await.expect("read");
    assert!(reports.iter().all(|r| r.host == "worker-host-1"));
}

#[tokio::test]
async fn a_worker_whose_log_reader_stalls_keeps_working() {
    // Arrange: a worker process whose standard error is a pipe nobody reads, logging a
    // line for every job; six hundred messages, each pushed on its own, log several
    // times what the pipe holds.
    let binary = worker_binary();
    let app = spawn_app_with(Options { worker: false, ..Options::default() }).await;
    app.subscribe_browser().await;
    let mut env = app.env.clone();
    env.insert("WORKER_METRICS_BIND".into(), "off".into());
    env.insert("NOTIFY_BURST_THRESHOLD".into(), "0".into());
    env.insert("RUST_LOG".into(), "info".into());
    let _worker = tokio::process::Command::new(&binary)
        .args(["run", "--concurrency", "8"])
        .envs(&env)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("worker starts");

    // Act
    const MESSAGES: usize = 600;
    for i in 0..MESSAGES {
        app.submit_valid_feedback("Ann", &format!("message {i}")).await;
    }

    // Assert: every message is pushed; a worker that waited for its log reader would
    // have stopped once the pipe filled.
    let received = app.push.wait_for_received(MESSAGES, Duration::from_secs(60)).await;
    assert_eq!(received.len(), MESSAGES, "the worker stalled on its logs");
}

#[tokio::test]
async fn a_bad_thread_count_stops_the_commands_but_not_the_help_that_says_how_to_set_it() {
    let with_bad_threads = |command: &str| {
        tokio::process::Command::new(worker_binary()).arg(command).env("WORKER_THREADS", "two").output()
    };
    let help = with_bad_threads("--help").await.expect("the worker runs");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "--help failed: {}", String::from_utf8_lossy(&help.stderr));
    assert!(text.contains("Usage:"), "{text}");

    let run = with_bad_threads("run").await.expect("the worker runs");
    let said = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{said}");
    assert!(said.contains("WORKER_THREADS must be a whole number"), "{said}");
}
