//! Opening and closing fan-out runs (`shared::queries::delivery::{open_run, close_run,
//! close_runs}`): one statement each on PostgreSQL, a few on SQLite (a group's in one
//! transaction), and the same answers on both; a group that fails keeps nothing.

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use shared::domain::NewFeedback;
use shared::entities::{dispatch, push_subscription};
use shared::queries::delivery::{self, Coalescing, Opening, RunToClose, RunToOpen};
use shared::queries::feedback::{Submitted, insert_for_request, insert_with_dispatch};
use tidings_tests::harness::{Backend, Options, TestApp, spawn_app_with, store_unannounced};

/// A window long enough that every message of the test falls in the same one.
const ONE_WINDOW: Coalescing = Coalescing { threshold: 2, window_secs: 1_000_000_000 };

async fn submit(app: &TestApp, n: usize) -> Submitted {
    let feedback = NewFeedback::parse("Ann", "ann@example.com", &format!("message {n}")).expect("valid");
    insert_with_dispatch(&app.db, &feedback).await.expect("stored")
}

fn lease() -> chrono::DateTime<chrono::Utc> {
    shared::queries::now() + chrono::Duration::seconds(30)
}

/// An app on `backend` without a worker, with `n` browsers subscribed; their ids, in order.
async fn with_subscriptions(backend: Backend, n: usize) -> (TestApp, Vec<i64>) {
    let app = spawn_app_with(Options { backend, worker: false, ..Options::default() }).await;
    for _ in 0..n {
        app.subscribe_browser().await;
    }
    let mut subscriptions: Vec<i64> =
        push_subscription::Entity::find().all(&app.db).await.expect("query").iter().map(|s| s.id).collect();
    subscriptions.sort_unstable();
    (app, subscriptions)
}

/// The claimed subscriptions of an opening, or what it was instead.
fn claimed(opening: &Opening) -> Result<Vec<i64>, String> {
    match opening {
        Opening::Claimed { page, .. } => Ok(page.targets.iter().map(|t| t.subscription_id).collect()),
        Opening::Folded { in_window, .. } => Err(format!("folded ({in_window} in the window)")),
        Opening::Missing => Err("missing".into()),
    }
}

async fn a_run_opens_folds_and_closes_the_same_way(backend: Backend) {
    // Arrange: one subscription, four messages in one coalescing window.
    let app = spawn_app_with(Options { backend, worker: false, ..Options::default() }).await;
    app.subscribe_browser().await;
    let subscriptions = push_subscription::Entity::find().all(&app.db).await.expect("query");
    let subscription_id = subscriptions[0].id;
    let mut messages = Vec::new();
    for n in 0..3 {
        messages.push(submit(&app, n).await);
    }
    let fourth = NewFeedback::parse("Ann", "ann@example.com", "message 3").expect("valid");
    messages.push(insert_for_request(&app.db, &fourth, Some("req-fourth")).await.expect("stored"));
    let open = |feedback_id: i64, token: &'static str, coalescing: Coalescing| {
        let db = app.db.clone();
        async move { delivery::open_run(&db, feedback_id, 64, token, lease(), coalescing).await.expect("opened") }
    };

    // Act + assert: within the threshold a message is announced alone, with its message
    // loaded and its first page claimed.
    let first = open(messages[0].feedback_id, "t0", ONE_WINDOW).await;
    assert_eq!(claimed(&first), Ok(vec![subscription_id]));
    let Opening::Claimed { message, page } = &first else { unreachable!() };
    assert_eq!(message.content, "message 0");
    assert!(!page.full, "one subscription: the first page is the last");

    // Past it, a message nothing went out for folds into the digest, and says how busy
    // its window is.
    let third = open(messages[2].feedback_id, "t2", ONE_WINDOW).await;
    assert!(matches!(third, Opening::Folded { in_window: 3, .. }), "{third:?}");
    assert!(
        delivery::of_feedback(&app.db, messages[2].feedback_id).await.expect("query").is_empty(),
        "nothing claimed"
    );

    // The count stops one past the threshold: the fourth message of the window counts 2
    // for a threshold of 1.
    let capped = open(messages[3].feedback_id, "t3x", Coalescing { threshold: 1, ..ONE_WINDOW }).await;
    assert!(matches!(capped, Opening::Folded { in_window: 2, .. }), "{capped:?}");

    // Coalescing off: the same message is claimed.
    let again = open(messages[2].feedback_id, "t2b", Coalescing::OFF).await;
    assert_eq!(claimed(&again), Ok(vec![subscription_id]));

    // A message something went out for never folds, and its claimed delivery (leased, not
    // due) is not claimed twice.
    let fourth = open(messages[3].feedback_id, "t3", Coalescing::OFF).await;
    assert_eq!(claimed(&fourth), Ok(vec![subscription_id]));
    let reopened = open(messages[3].feedback_id, "t3b", ONE_WINDOW).await;
    assert_eq!(claimed(&reopened), Ok(vec![]));

    // A message that no longer exists.
    assert_eq!(open(9_999_999, "t9", ONE_WINDOW).await, Opening::Missing);

    // Closing with the last page's success records it and completes the dispatch; nothing
    // is owed, so no dispatch follows.
    let first_id = messages[0].feedback_id;
    let next = delivery::close_run(&app.db, first_id, messages[0].dispatch_id, &[subscription_id], "t0")
        .await
        .expect("closed");
    assert_eq!(next, None, "nothing owed after the only delivery was sent");
    let deliveries = delivery::of_feedback(&app.db, first_id).await.expect("query");
    assert_eq!(deliveries.iter().map(|d| d.status.as_str()).collect::<Vec<_>>(), ["sent"]);
    let subscription = push_subscription::Entity::find_by_id(subscription_id).one(&app.db).await.expect("query");
    assert!(subscription.and_then(|s| s.last_success_at).is_some(), "the subscription's success recorded");
    let dispatches = dispatches_of(&app, first_id).await;
    assert_eq!(dispatches.len(), 1);
    assert!(dispatches[0].completed_at.is_some(), "the run's dispatch completed");

    // Many runs closed at once, each answered in its place: a run whose delivery is still
    // claimed (here by the run itself, unsent) leaves a dispatch for when its claim
    // lapses; one whose push went out is finished.
    let second = open(messages[1].feedback_id, "t1", Coalescing::OFF).await;
    assert_eq!(claimed(&second), Ok(vec![subscription_id]));
    let (second_id, fourth_id) = (messages[1].feedback_id, messages[3].feedback_id);
    let sent = [subscription_id];
    let runs = [
        RunToClose { feedback_id: fourth_id, dispatch_id: messages[3].dispatch_id, sent: &[], token: "t3" },
        RunToClose { feedback_id: second_id, dispatch_id: messages[1].dispatch_id, sent: &sent, token: "t1" },
    ];
    let groups = group_pool(&app).await;
    let next = delivery::close_runs(&groups, &runs).await.expect("closed");
    assert_eq!(next.len(), 2);
    assert!(next[0].is_some_and(|due| due > shared::queries::now()), "{next:?}");
    assert_eq!(next[1], None, "{next:?}");
    let dispatches = dispatches_of(&app, fourth_id).await;
    assert_eq!(dispatches.len(), 2, "the completed one and the next");
    assert_eq!(dispatches.iter().filter(|d| d.completed_at.is_none()).count(), 1);
    assert!(
        dispatches.iter().all(|d| d.request_id.as_deref() == Some("req-fourth")),
        "the next dispatch keeps the request's id: {dispatches:?}"
    );
    let dispatches = dispatches_of(&app, second_id).await;
    assert_eq!(dispatches.len(), 1);
    assert!(dispatches[0].completed_at.is_some());
    // A second close of the same run (a job's copy) keeps the first completion time.
    let again = delivery::close_run(&app.db, second_id, messages[1].dispatch_id, &[], "t1").await.expect("closed");
    assert_eq!(again, None);
    assert_eq!(dispatches_of(&app, second_id).await[0].completed_at, dispatches[0].completed_at);
    let deliveries = delivery::of_feedback(&app.db, second_id).await.expect("query");
    assert_eq!(deliveries.iter().map(|d| d.status.as_str()).collect::<Vec<_>>(), ["sent"]);
    assert!(delivery::close_runs(&app.db, &[]).await.expect("nothing to close").is_empty());
}

async fn many_runs_open_at_once_each_with_its_own_claims(backend: Backend) {
    // Arrange: one subscription; three messages in one window (a threshold of 1 folds the
    // second and third), and one that does not exist.
    let app = spawn_app_with(Options { backend, worker: false, ..Options::default() }).await;
    app.subscribe_browser().await;
    let subscription_id = push_subscription::Entity::find().all(&app.db).await.expect("query")[0].id;
    let mut messages = Vec::new();
    for n in 0..3 {
        messages.push(submit(&app, n).await.feedback_id);
    }
    let coalescing = Coalescing { threshold: 1, ..ONE_WINDOW };
    let runs = [
        RunToOpen { feedback_id: messages[2], token: "a" },
        RunToOpen { feedback_id: 9_999_999, token: "b" },
        RunToOpen { feedback_id: messages[0], token: "c" },
        // Two runs of one message (a job and its copy): only one of them may claim.
        RunToOpen { feedback_id: messages[0], token: "d" },
    ];

    // Act: on the pool the worker sends groups to.
    let opened = delivery::open_runs(&group_pool(&app).await, &runs, 64, lease(), coalescing).await.expect("opened");

    // Assert: in their order, each as it would open alone.
    assert_eq!(opened.len(), 4);
    // Counted up to one past the threshold.
    assert!(matches!(opened[0], Opening::Folded { in_window: 2, .. }), "{:?}", opened[0]);
    assert_eq!(opened[1], Opening::Missing);
    let (c, d) = (claimed(&opened[2]).expect("claimed"), claimed(&opened[3]).expect("claimed"));
    assert_eq!([c.clone(), d.clone()].concat(), vec![subscription_id], "one claim between the two: {c:?} {d:?}");
    let deliveries = delivery::of_feedback(&app.db, messages[0]).await.expect("query");
    assert_eq!(deliveries.len(), 1);
    let winner = if c.is_empty() { "d" } else { "c" };
    assert_eq!(deliveries[0].claim_token.as_deref(), Some(winner));
    assert!(delivery::open_runs(&app.db, &[], 64, lease(), coalescing).await.expect("nothing").is_empty());
}

#[tokio::test]
async fn many_runs_open_at_once_each_with_its_own_claims_on_postgres() {
    many_runs_open_at_once_each_with_its_own_claims(Backend::Postgres).await;
}

#[tokio::test]
async fn many_runs_open_at_once_each_with_its_own_claims_on_sqlite() {
    many_runs_open_at_once_each_with_its_own_claims(Backend::Sqlite).await;
}

/// The pool a worker writes groups of runs on: on PostgreSQL it plans each statement
/// once, and their statements read every table through an index condition whatever the
/// plan (see the plan tests below).
async fn group_pool(app: &TestApp) -> sea_orm::DatabaseConnection {
    use sea_orm::ConnectionTrait;
    let pool = shared::db::connect_for_groups(&app.db, &app.settings.database_url).await.expect("connected");
    if app.db.get_database_backend() == sea_orm::DbBackend::Postgres {
        for (setting, value) in shared::db::PLANNED_ONCE {
            let sql = format!("SHOW {setting}");
            let row = pool
                .query_one_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, sql))
                .await
                .expect("query")
                .expect("a row");
            assert_eq!(row.try_get::<String>("", setting).expect("text"), value);
        }
    }
    pool
}

async fn dispatches_of(app: &TestApp, feedback_id: i64) -> Vec<dispatch::Model> {
    use sea_orm::{ColumnTrait, QueryFilter};
    dispatch::Entity::find().filter(dispatch::Column::FeedbackId.eq(feedback_id)).all(&app.db).await.expect("query")
}

#[tokio::test]
async fn a_run_opens_folds_and_closes_the_same_way_on_postgres() {
    a_run_opens_folds_and_closes_the_same_way(Backend::Postgres).await;
}

#[tokio::test]
async fn a_run_opens_folds_and_closes_the_same_way_on_sqlite() {
    a_run_opens_folds_and_closes_the_same_way(Backend::Sqlite).await;
}

async fn a_digest_counts_exactly_the_messages_whose_first_run_folds(backend: Backend) {
    use shared::queries::feedback::folded_between;
    // Arrange: one subscription; five messages, each with its dispatch record, in one
    // window of a minute, the second and third created at the same instant (and the
    // threshold of 2 falling between them), and one in the next window. No run has
    // opened yet.
    let app = spawn_app_with(Options { backend, worker: false, ..Options::default() }).await;
    app.subscribe_browser().await;
    let coalescing = Coalescing { threshold: 2, window_secs: 60 };
    let start =
        chrono::DateTime::from_timestamp(coalescing.window_start(shared::queries::now()) - 600, 0).expect("a time");
    let end = start + chrono::Duration::seconds(60);
    let mut ids = Vec::new();
    let mut records: Vec<i64> = Vec::new();
    for (n, ms) in [1_000, 2_250, 2_250, 3_500, 4_000, 61_000].into_iter().enumerate() {
        let created_at = start + chrono::Duration::milliseconds(ms);
        let (message, record) = store_unannounced(&app.db, created_at, &format!("Visitor {n}")).await;
        ids.push(message);
        records.push(record);
    }
    let digest = || async { folded_between(&app.db, start, end, coalescing.threshold).await.expect("query") };

    // Act + assert: before any run opens, the digest counts the messages past the
    // window's first two by creation time, both of the tie included, newest first; not
    // the first, though nothing went out for it yet (its run, late behind a backlog,
    // will send it on its own).
    let folding = vec![ids[4], ids[3], ids[2], ids[1]];
    assert_eq!(digest().await, folding);

    // The digest completes their dispatch records before it sends. The first message's
    // run opens (claimed: it goes out alone) and finishes; then that message is deleted,
    // so the second and third are now the window's first two.
    shared::queries::dispatch::complete_for_messages(&app.db, &folding).await.expect("completed");
    let opening = delivery::open_run(&app.db, ids[0], 64, "t0", lease(), coalescing).await.expect("opened");
    let sent = claimed(&opening).expect("claimed");
    assert_eq!(sent.len(), 1, "{opening:?}");
    delivery::close_run(&app.db, ids[0], records[0], &sent, "t0").await.expect("closed");
    assert!(shared::queries::feedback::delete(&app.db, ids[0]).await.expect("deleted"));

    // Act: the other runs open late, behind a backlog: the second alone, the rest in one
    // group (one statement on PostgreSQL).
    let second = delivery::open_run(&app.db, ids[1], 64, "t1", lease(), coalescing).await.expect("opened");
    let tokens = ["t2", "t3", "t4"];
    let group: Vec<RunToOpen<'_>> =
        ids[2..5].iter().zip(tokens).map(|(id, token)| RunToOpen { feedback_id: *id, token }).collect();
    let groups = group_pool(&app).await;
    let rest = delivery::open_runs(&groups, &group, 64, lease(), coalescing).await.expect("opened");

    // Assert: each folds, the second and third too, though their window's count no
    // longer puts them past the threshold: the digest announced them, and they are not
    // sent again on their own.
    for (n, opening) in std::iter::once(second).chain(rest).enumerate() {
        assert!(matches!(opening, Opening::Folded { .. }), "message {}: {opening:?}", n + 1);
        shared::queries::dispatch::mark_completed(&app.db, records[n + 1]).await.expect("completed");
    }
    assert_eq!(digest().await, folding, "the same messages once every run finished");

    // A message something went out for (a run with coalescing off) is not counted again;
    // nor is a message deleted since.
    let reopened = delivery::open_run(&app.db, ids[3], 64, "t3b", lease(), Coalescing::OFF).await.expect("opened");
    assert_eq!(claimed(&reopened).map(|c| c.len()), Ok(1));
    assert!(shared::queries::feedback::delete(&app.db, ids[2]).await.expect("deleted"));
    assert_eq!(digest().await, vec![ids[4], ids[1]]);

    // A window with no more messages than the threshold, none of whose runs folded, has
    // nothing to fold.
    let next = folded_between(&app.db, end, end + chrono::Duration::seconds(60), coalescing.threshold).await;
    assert!(next.expect("query").is_empty());
}

#[tokio::test]
async fn a_digest_counts_exactly_the_messages_whose_first_run_folds_on_postgres() {
    a_digest_counts_exactly_the_messages_whose_first_run_folds(Backend::Postgres).await;
}

#[tokio::test]
async fn a_digest_counts_exactly_the_messages_whose_first_run_folds_on_sqlite() {
    a_digest_counts_exactly_the_messages_whose_first_run_folds(Backend::Sqlite).await;
}

async fn a_digest_announces_what_it_read_and_a_retry_of_it_the_same(backend: Backend) {
    use worker::jobs::digest::announced;
    // Arrange: four messages in a window that ended ten minutes ago, each with its
    // dispatch record and no run yet; two past the threshold of 2.
    let app = spawn_app_with(Options { backend, worker: false, ..Options::default() }).await;
    let queue =
        shared::queue::JobQueue::connect(&app.settings.redis_url, &app.settings.redis_namespace).await.expect("redis");
    let start = (shared::queries::now().timestamp() / 60 - 10) * 60;
    let at = |secs: i64| chrono::DateTime::from_timestamp(start + secs, 0).expect("a time");
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(store_unannounced(&app.db, at(n + 1), &format!("Visitor {n}")).await.0);
    }
    let job = shared::jobs::Digest::new(start, start + 60, 2);
    let completed = |ids: Vec<i64>| {
        let db = app.db.clone();
        async move {
            let outstanding = shared::queries::dispatch::outstanding_among(&db, &ids).await.expect("query");
            ids.into_iter().filter(|id| !outstanding.contains(id)).collect::<Vec<_>>()
        }
    };

    // Act: the first attempt.
    let first = announced(&app.db, Some(&queue), &job, 2).await.expect("read");

    // Assert: it announces the two that fold, newest first, having completed their
    // records and then marked the window read.
    assert_eq!(first, [ids[3], ids[2]]);
    assert_eq!(completed(ids.clone()).await, [ids[2], ids[3]]);
    assert!(queue.digest_has_read(&job).await.expect("redis"));

    // Act: a message of the window commits only now; the newest record is pruned, as
    // after an outage longer than the records are kept; the digest is retried for one
    // subscription a push could not reach, and then runs again as a whole (as after a
    // failure past its mark).
    let late = store_unannounced(&app.db, at(30), "Visitor 4").await.0;
    let pruned = dispatch::Entity::delete_many().filter(dispatch::Column::FeedbackId.eq(ids[3])).exec(&app.db).await;
    assert_eq!(pruned.expect("deleted").rows_affected, 1);
    let retry = shared::jobs::Digest { only: Some(vec![1]), ..job.clone() };
    let again = announced(&app.db, Some(&queue), &retry, 2).await.expect("read");
    let whole = announced(&app.db, Some(&queue), &job, 2).await.expect("read");

    // Assert: both announce the same two, the one without a record included, and leave
    // the late message's record alone: its run, seeing the mark, sends it to every
    // subscription on its own.
    assert_eq!(again, [ids[3], ids[2]]);
    assert_eq!(whole, again);
    assert!(completed(vec![late]).await.is_empty(), "nothing completed it");
    let opening = delivery::open_run(&app.db, late, 64, "t", lease(), Coalescing { threshold: 2, window_secs: 60 })
        .await
        .expect("opened");
    assert!(matches!(opening, Opening::Folded { .. }), "its window is past the threshold: {opening:?}");

    // The digest names the newest message it announces that still exists.
    let newest = |ids: Vec<i64>| {
        let db = app.db.clone();
        async move { shared::queries::feedback::newest_of(&db, &ids).await.expect("query").map(|m| m.id) }
    };
    assert_eq!(newest(again.clone()).await, Some(ids[3]));
    assert!(shared::queries::feedback::delete(&app.db, ids[3]).await.expect("deleted"));
    assert_eq!(newest(again).await, Some(ids[2]));
}

#[tokio::test]
async fn a_digest_announces_what_it_read_and_a_retry_of_it_the_same_on_postgres() {
    a_digest_announces_what_it_read_and_a_retry_of_it_the_same(Backend::Postgres).await;
}

#[tokio::test]
async fn a_digest_announces_what_it_read_and_a_retry_of_it_the_same_on_sqlite() {
    a_digest_announces_what_it_read_and_a_retry_of_it_the_same(Backend::Sqlite).await;
}

async fn a_group_claims_again_what_is_due_for_its_first_run_of_a_message(backend: Backend) {
    use sea_orm::ActiveValue::Set;
    // Arrange: two subscriptions; a message with one delivery waiting for a retry that is
    // due and one claimed by a run whose lease lapsed; a second message nothing went out for.
    let (app, subscriptions) = with_subscriptions(backend, 2).await;
    let (retried, fresh) = (submit(&app, 0).await.feedback_id, submit(&app, 1).await.feedback_id);
    let past = shared::queries::now() - chrono::Duration::seconds(5);
    for (subscription_id, status, token) in
        [(subscriptions[0], shared::entities::delivery::RETRY, None), (subscriptions[1], "sending", Some("lapsed"))]
    {
        let row = shared::entities::delivery::ActiveModel {
            feedback_id: Set(retried),
            subscription_id: Set(subscription_id),
            status: Set(status.into()),
            attempts: Set(1),
            claim_token: Set(token.map(str::to_owned)),
            lease_until: Set(token.map(|_| past)),
            next_attempt_at: Set(token.is_none().then_some(past)),
            last_error: Set(None),
            sent_at: Set(None),
            updated_at: Set(past),
        };
        shared::entities::delivery::Entity::insert(row).exec(&app.db).await.expect("stored");
    }
    let runs = [
        RunToOpen { feedback_id: fresh, token: "f" },
        RunToOpen { feedback_id: retried, token: "r" },
        // A copy of the job in the same group: the claims due again go to the first run.
        RunToOpen { feedback_id: retried, token: "r2" },
    ];

    // Act
    let opened =
        delivery::open_runs(&group_pool(&app).await, &runs, 64, lease(), Coalescing::OFF).await.expect("opened");

    // Assert: both due deliveries are claimed again by the first run of their message,
    // each a second attempt; the other message claims its first page.
    assert_eq!(claimed(&opened[0]), Ok(subscriptions.clone()));
    let mut again = claimed(&opened[1]).expect("claimed");
    again.sort_unstable();
    assert_eq!(again, subscriptions);
    assert_eq!(claimed(&opened[2]), Ok(vec![]));
    for row in delivery::of_feedback(&app.db, retried).await.expect("query") {
        assert_eq!((row.status.as_str(), row.claim_token.as_deref(), row.attempts), ("sending", Some("r"), 2));
        assert!(row.lease_until.is_some_and(|until| until > shared::queries::now()), "{row:?}");
    }
}

#[tokio::test]
async fn a_group_claims_again_what_is_due_for_its_first_run_of_a_message_on_postgres() {
    a_group_claims_again_what_is_due_for_its_first_run_of_a_message(Backend::Postgres).await;
}

#[tokio::test]
async fn a_group_claims_again_what_is_due_for_its_first_run_of_a_message_on_sqlite() {
    a_group_claims_again_what_is_due_for_its_first_run_of_a_message(Backend::Sqlite).await;
}

async fn a_group_closes_each_run_with_its_own_successes(backend: Backend) {
    // Arrange: three subscriptions; four messages, each run alone claiming all three.
    let (app, subs) = with_subscriptions(backend, 3).await;
    let mut messages = Vec::new();
    for n in 0..4 {
        let submitted = submit(&app, n).await;
        let token = format!("t{n}");
        let opened = delivery::open_run(&app.db, submitted.feedback_id, 64, &token, lease(), Coalescing::OFF).await;
        assert_eq!(
            claimed(&opened.expect("opened")).map(|mut c| {
                c.sort_unstable();
                c
            }),
            Ok(subs.clone())
        );
        messages.push(submitted);
    }
    // Each message's run: the subscriptions it sent to, and its token.
    let plan: [(&[usize], &str); 4] = [
        // Every push went out.
        (&[0, 1, 2], "t0"),
        // One went out; two are still claimed by the run.
        (&[0], "t1"),
        // A token that is not the run's records nothing.
        (&[0, 1, 2], "wrong"),
        // Nothing to record.
        (&[], "t3"),
    ];
    let sent: Vec<Vec<i64>> = plan.iter().map(|(sent, _)| sent.iter().map(|&i| subs[i]).collect()).collect();
    let runs: Vec<RunToClose<'_>> = messages
        .iter()
        .zip(plan.iter().zip(&sent))
        .map(|(message, (&(_, token), sent))| RunToClose {
            feedback_id: message.feedback_id,
            dispatch_id: message.dispatch_id,
            sent,
            token,
        })
        .collect();

    // Act
    let due = delivery::close_runs(&group_pool(&app).await, &runs).await.expect("closed");

    // Assert: each run recorded only its own successes, and the runs owed more have a
    // dispatch for when their claims lapse.
    let owed: Vec<bool> = due.iter().map(Option::is_some).collect();
    assert_eq!(owed, [false, true, true, true], "{due:?}");
    let statuses = |n: usize| {
        let db = app.db.clone();
        let feedback_id = messages[n].feedback_id;
        async move {
            let mut rows = delivery::of_feedback(&db, feedback_id).await.expect("query");
            rows.sort_by_key(|d| d.subscription_id);
            rows.into_iter().map(|d| d.status).collect::<Vec<_>>()
        }
    };
    assert_eq!(statuses(0).await, ["sent", "sent", "sent"]);
    assert_eq!(statuses(1).await, ["sent", "sending", "sending"]);
    assert_eq!(statuses(2).await, ["sending", "sending", "sending"]);
    assert_eq!(statuses(3).await, ["sending", "sending", "sending"]);
    for (n, owed) in owed.iter().enumerate() {
        let dispatches = dispatches_of(&app, messages[n].feedback_id).await;
        let outstanding = dispatches.iter().filter(|d| d.completed_at.is_none()).count();
        assert_eq!((dispatches.len(), outstanding), if *owed { (2, 1) } else { (1, 0) }, "message {n}");
    }
    for subscription in push_subscription::Entity::find().all(&app.db).await.expect("query") {
        assert!(subscription.last_success_at.is_some(), "{subscription:?}");
    }

    // Two runs of one message closed in one group (a job, and a copy that took over one
    // of its claims once it lapsed) each record their own successes: the copy's after
    // the job's, which still sees the copy's claim as owed.
    let (feedback_id, dispatch_id) = (messages[1].feedback_id, messages[1].dispatch_id);
    let takeover = format!(
        "UPDATE deliveries SET claim_token = 'copy' WHERE feedback_id = {feedback_id} AND subscription_id = {}",
        subs[2]
    );
    sql(&app.db, &takeover).await;
    let (first, second) = ([subs[1]], [subs[2]]);
    let copies = [
        RunToClose {
            feedback_id: messages[0].feedback_id,
            dispatch_id: messages[0].dispatch_id,
            sent: &[],
            token: "t0",
        },
        RunToClose { feedback_id, dispatch_id, sent: &first, token: "t1" },
        RunToClose { feedback_id, dispatch_id, sent: &second, token: "copy" },
    ];
    let due = delivery::close_runs(&group_pool(&app).await, &copies).await.expect("closed");
    assert!(due[0].is_none() && due[1].is_some() && due[2].is_none(), "{due:?}");
    assert_eq!(statuses(1).await, ["sent", "sent", "sent"]);
}

#[tokio::test]
async fn a_group_closes_each_run_with_its_own_successes_on_postgres() {
    a_group_closes_each_run_with_its_own_successes(Backend::Postgres).await;
}

#[tokio::test]
async fn a_group_closes_each_run_with_its_own_successes_on_sqlite() {
    a_group_closes_each_run_with_its_own_successes(Backend::Sqlite).await;
}

/// The tables as they are when a group statement's one plan is made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PlannedOn {
    /// As migrated, never analysed.
    Empty,
    /// Empty and analysed: the server knows they hold nothing.
    EmptyAnalysed,
    /// A few rows each, analysed (a young database after any `ANALYZE`).
    SmallAnalysed,
    /// Thousands of rows each, analysed.
    LargeAnalysed,
}

#[tokio::test]
async fn the_grouped_opens_plan_made_on_empty_tables_reads_only_its_groups_rows_once_they_grew() {
    grouped_open_plan_reads_only_its_groups_rows(PlannedOn::Empty).await;
}

#[tokio::test]
async fn the_grouped_opens_plan_made_on_empty_analysed_tables_reads_only_its_groups_rows_once_they_grew() {
    grouped_open_plan_reads_only_its_groups_rows(PlannedOn::EmptyAnalysed).await;
}

#[tokio::test]
async fn the_grouped_opens_plan_made_on_small_analysed_tables_reads_only_its_groups_rows_once_they_grew() {
    grouped_open_plan_reads_only_its_groups_rows(PlannedOn::SmallAnalysed).await;
}

#[tokio::test]
async fn the_grouped_opens_plan_made_on_large_tables_reads_only_its_groups_rows() {
    grouped_open_plan_reads_only_its_groups_rows(PlannedOn::LargeAnalysed).await;
}

#[tokio::test]
async fn the_grouped_closes_plan_made_on_empty_tables_reads_only_its_groups_rows_once_they_grew() {
    grouped_close_plan_reads_only_its_groups_rows(PlannedOn::Empty).await;
}

#[tokio::test]
async fn the_grouped_closes_plan_made_on_empty_analysed_tables_reads_only_its_groups_rows_once_they_grew() {
    grouped_close_plan_reads_only_its_groups_rows(PlannedOn::EmptyAnalysed).await;
}

#[tokio::test]
async fn the_grouped_closes_plan_made_on_small_analysed_tables_reads_only_its_groups_rows_once_they_grew() {
    grouped_close_plan_reads_only_its_groups_rows(PlannedOn::SmallAnalysed).await;
}

#[tokio::test]
async fn the_grouped_closes_plan_made_on_large_tables_reads_only_its_groups_rows() {
    grouped_close_plan_reads_only_its_groups_rows(PlannedOn::LargeAnalysed).await;
}

#[tokio::test]
async fn marking_records_enqueued_reads_only_their_rows_under_a_backlog_the_statistics_never_saw() {
    use sea_orm::ConnectionTrait;
    // Arrange: 20,000 completed records and 5 outstanding, analysed; then a backlog of
    // 5,000 outstanding that the statistics have not seen (autovacuum off).
    let app = spawn_app_with(Options { backend: Backend::Postgres, worker: false, ..Options::default() }).await;
    for table in ["feedback_messages", "dispatches"] {
        sql(&app.db, &format!("ALTER TABLE {table} SET (autovacuum_enabled = false)")).await;
    }
    let records = |n: u32, completed: &str| {
        format!(
            "WITH m AS (INSERT INTO feedback_messages (submitter_name, submitter_email, content, created_at) \
             SELECT 'Old', 'old@example.com', 'message', now() FROM generate_series(1, {n}) RETURNING id) \
             INSERT INTO dispatches (feedback_id, created_at, due_at, enqueue_count, completed_at) \
             SELECT id, now(), now(), 0, {completed} FROM m"
        )
    };
    sql(&app.db, &records(20_000, "now()")).await;
    sql(&app.db, &records(5, "NULL")).await;
    for table in ["feedback_messages", "dispatches"] {
        sql(&app.db, &format!("VACUUM ANALYZE {table}")).await;
    }
    sql(&app.db, &records(5_000, "NULL")).await;
    let marked: Vec<i64> = dispatch::Entity::find()
        .filter(dispatch::Column::CompletedAt.is_null())
        .all(&app.db)
        .await
        .expect("records")
        .iter()
        .rev()
        .take(50)
        .map(|r| r.id)
        .collect();

    // Act: the marker's statement for 50 of them, under EXPLAIN ANALYZE, rolled back.
    let statement = shared::queries::dispatch::mark_enqueued_statement(sea_orm::DbBackend::Postgres, &marked);
    let explain = sea_orm::Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        format!("EXPLAIN (ANALYZE, FORMAT JSON) {}", statement.sql),
        statement.values.map(|v| v.0).unwrap_or_default(),
    );
    let txn = sea_orm::TransactionTrait::begin(&app.db).await.expect("begin");
    let row = txn.query_one_raw(explain).await.expect("explained").expect("a row");
    txn.rollback().await.expect("rolled back");
    let plan: serde_json::Value = row.try_get("", "QUERY PLAN").expect("json");

    // Assert: the records are found by their keys, not by a walk of the backlog.
    let mut scans = Vec::new();
    table_scans(&plan[0]["Plan"], &mut scans);
    assert!(!scans.is_empty(), "{plan}");
    for (table, node, read) in &scans {
        assert_eq!(table, "dispatches", "{plan}");
        assert!(*read <= 50.0, "{read} rows read by a {node}: {plan}");
    }
    assert_eq!(plan[0]["Plan"]["Plans"][0]["Actual Rows"].as_f64(), Some(50.0), "every record marked: {plan}");
}

/// A database whose tables are as a plan test wants them, and one connection set up as
/// the worker's pool for groups, on which a group statement is prepared.
struct PlanFixture {
    app: TestApp,
    conn: sea_orm::DatabaseConnection,
}

impl PlanFixture {
    /// Tables as `planned_on` says (autovacuum off, so no `ANALYZE` behind the test's back
    /// replaces the plan made below); `sql` prepared as `name` with `types`, and run once
    /// with `args` (rolled back), which makes its one plan on the tables as they are.
    async fn new(planned_on: PlannedOn, name: &str, types: &str, sql_text: &str, args: &str) -> Self {
        let app = spawn_app_with(Options { backend: Backend::Postgres, worker: false, ..Options::default() }).await;
        let tables = ["deliveries", "push_subscriptions", "feedback_messages", "dispatches"];
        for table in tables {
            sql(&app.db, &format!("ALTER TABLE {table} SET (autovacuum_enabled = false)")).await;
        }
        let admin = app.create_admin().await;
        match planned_on {
            PlannedOn::Empty | PlannedOn::EmptyAnalysed => {}
            PlannedOn::SmallAnalysed => grow(&app.db, admin, 3, 3, 1).await,
            PlannedOn::LargeAnalysed => grow(&app.db, admin, 5_000, 5_000, 10).await,
        }
        if planned_on != PlannedOn::Empty {
            for table in tables {
                sql(&app.db, &format!("VACUUM ANALYZE {table}")).await;
            }
        }
        let mut options = sea_orm::ConnectOptions::new(app.settings.database_url.clone());
        options
            .max_connections(1)
            .min_connections(1)
            .sqlx_logging(false)
            .map_sqlx_postgres_opts(|pg| pg.options(shared::db::PLANNED_ONCE));
        let conn = sea_orm::Database::connect(options).await.expect("connected");
        sql(&conn, &format!("PREPARE {name} ({types}) AS {sql_text}")).await;
        let fixture = Self { app, conn };
        fixture.explain(name, args).await;
        if planned_on != PlannedOn::LargeAnalysed {
            grow(&fixture.app.db, admin, 5_000, 5_000, 10).await;
        }
        fixture
    }

    /// `EXECUTE name(args)` under `EXPLAIN ANALYZE`, rolled back.
    async fn explain(&self, name: &str, args: &str) -> serde_json::Value {
        use sea_orm::ConnectionTrait;
        let statement = format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE {name}({args})");
        sql(&self.conn, "BEGIN").await;
        let row = self
            .conn
            .query_one_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, statement))
            .await
            .expect("explained")
            .expect("a row");
        sql(&self.conn, "ROLLBACK").await;
        row.try_get::<serde_json::Value>("", "QUERY PLAN").expect("json")
    }

    /// Asserts that `name` was never planned for its values (its second run used a
    /// generic plan; with autovacuum off nothing made the server remake it), and that in
    /// `plan` every table was read through an index, no further than `rows` rows.
    async fn assert_narrow(&self, name: &str, plan: &serde_json::Value, rows: f64) {
        use sea_orm::ConnectionTrait;
        let row = self
            .conn
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                format!("SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = '{name}'"),
            ))
            .await
            .expect("query")
            .expect("a row");
        assert_eq!(row.try_get::<i64>("", "custom_plans").expect("count"), 0);
        assert_eq!(row.try_get::<i64>("", "generic_plans").expect("count"), 2);
        let mut scans = Vec::new();
        table_scans(&plan[0]["Plan"], &mut scans);
        assert!(scans.iter().any(|(table, ..)| table == "deliveries"), "{scans:?}");
        for (table, node, read) in &scans {
            assert_ne!(node, "Seq Scan", "{table} read whole: {plan}");
            assert!(*read <= rows, "{read} rows of {table} read by a {node}: {plan}");
        }
    }
}

/// Makes the grouped open's plan with the tables as `planned_on` says, grows them to
/// thousands of rows, then runs that same plan for a group (two new messages and one
/// with deliveries due again): every table is read through an index condition, no
/// further than the group's own rows.
async fn grouped_open_plan_reads_only_its_groups_rows(planned_on: PlannedOn) {
    let types = "text, text, text, timestamptz, timestamptz, text, bigint, bigint, bigint";
    // Coalescing as shipped, a first page of 64.
    let args = |ids: &str, tokens: &str| {
        format!("'{{{ids}}}', '{{{tokens}}}', 'sending', now() + interval '30 seconds', now(), 'retry', 6, 60, 64")
    };
    let fixture = PlanFixture::new(planned_on, "open_runs", types, delivery::OPEN_RUNS_SQL, &args("1,2", "a,b")).await;
    let app = &fixture.app;
    let (first, second) = (submit(app, 0).await.feedback_id, submit(app, 1).await.feedback_id);
    let retried = submit(app, 2).await.feedback_id;
    sql(
        &app.db,
        &format!(
            "INSERT INTO deliveries (feedback_id, subscription_id, status, attempts, next_attempt_at, updated_at) \
             SELECT {retried}, id, 'retry', 1, now() - interval '1 second', now() \
             FROM push_subscriptions ORDER BY id LIMIT 2"
        ),
    )
    .await;

    // Act
    let plan = fixture.explain("open_runs", &args(&format!("{first},{second},{retried}"), "a,b,c")).await;

    // Assert: the group's rows are a first page of 64 subscriptions for each of three
    // runs, the claims' subscriptions one by one, two deliveries due again, three messages.
    fixture.assert_narrow("open_runs", &plan, 400.0).await;
    // A number, fractional from PostgreSQL 18 on.
    let claimed = plan[0]["Plan"]["Actual Rows"].as_f64().expect("rows");
    assert_eq!(claimed, f64::from(3 * 64), "every run claimed its first page: {plan}");
}

/// Makes the grouped close's plan with the tables as `planned_on` says, grows them to
/// thousands of rows, then runs that same plan for a group of three runs: every table is
/// read through an index condition, no further than the group's own rows.
async fn grouped_close_plan_reads_only_its_groups_rows(planned_on: PlannedOn) {
    let types = "text, text, timestamptz, text, text, text, timestamptz, text, text";
    let args = |ids: &str, dispatches: &str, tokens: &str, sent: &str| {
        format!(
            "'{{{ids}}}', '{{{dispatches}}}', now(), 'retry', 'sent', 'sending', now() - interval '1 minute', \
             '{{{tokens}}}', '{sent}'"
        )
    };
    let fixture =
        PlanFixture::new(planned_on, "close_runs", types, delivery::CLOSE_RUNS_SQL, &args("1,2", "1,2", "a,b", "{}"))
            .await;
    let app = &fixture.app;
    // Three runs, each holding claims on the same three subscriptions; the third also
    // owes a retry to a fourth.
    let subscriptions: Vec<i64> = {
        use sea_orm::{QueryOrder, QuerySelect};
        let first = push_subscription::Entity::find().order_by_asc(push_subscription::Column::Id).limit(4);
        first.all(&app.db).await.expect("query").iter().map(|s| s.id).collect()
    };
    let mut runs = Vec::new();
    for (n, token) in ["a", "b", "c"].into_iter().enumerate() {
        let submitted = submit(app, n).await;
        sql(
            &app.db,
            &format!(
                "INSERT INTO deliveries (feedback_id, subscription_id, status, attempts, claim_token, lease_until, updated_at) \
                 SELECT {}, id, 'sending', 1, '{token}', now() + interval '30 seconds', now() \
                 FROM push_subscriptions WHERE id IN ({}, {}, {})",
                submitted.feedback_id, subscriptions[0], subscriptions[1], subscriptions[2]
            ),
        )
        .await;
        runs.push(submitted);
    }
    sql(
        &app.db,
        &format!(
            "INSERT INTO deliveries (feedback_id, subscription_id, status, attempts, next_attempt_at, updated_at) \
             VALUES ({}, {}, 'retry', 1, now() + interval '1 minute', now())",
            runs[2].feedback_id, subscriptions[3]
        ),
    )
    .await;
    let ids = runs.iter().map(|r| r.feedback_id.to_string()).collect::<Vec<_>>().join(",");
    let dispatches = runs.iter().map(|r| r.dispatch_id.to_string()).collect::<Vec<_>>().join(",");
    let [s0, s1, s2] = [subscriptions[0], subscriptions[1], subscriptions[2]];
    // The first run sent all three, the second two (one still claimed), the third all three.
    let sent = format!("{{{{{s0},{s1},{s2}}},{{{s0},{s1},NULL}},{{{s0},{s1},{s2}}}}}");

    // Act
    let plan = fixture.explain("close_runs", &args(&ids, &dispatches, "a,b,c", &sent)).await;

    // Assert: the group's rows are nine claims, a retry, three subscriptions and three
    // dispatches; the second run (a claim left) and the third (a retry) are owed more.
    fixture.assert_narrow("close_runs", &plan, 100.0).await;
    let owed = plan[0]["Plan"]["Actual Rows"].as_f64().expect("rows");
    assert_eq!(owed, 2.0, "two runs are owed more: {plan}");
}

/// Runs `statement` on `db`.
async fn sql(db: &sea_orm::DatabaseConnection, statement: &str) {
    use sea_orm::ConnectionTrait;
    db.execute_unprepared(statement).await.unwrap_or_else(|e| panic!("{statement}: {e}"));
}

/// Adds `subscriptions` subscriptions of `admin` and `messages` messages of a day ago,
/// each with a dispatch record (a third of them outstanding) and a sent delivery to each
/// of the first four subscriptions (a long history behind the subscriptions the close
/// test sends to), the last `delivered` also to every other subscription.
async fn grow(db: &sea_orm::DatabaseConnection, admin: i64, subscriptions: u32, messages: u32, delivered: u32) {
    sql(
        db,
        &format!(
            "INSERT INTO push_subscriptions (endpoint, p256dh, auth, admin_user_id, created_at, failure_count) \
             SELECT 'https://push.invalid/' || md5(random()::text), 'key', 'auth', {admin}, now(), 0 \
             FROM generate_series(1, {subscriptions})"
        ),
    )
    .await;
    sql(
        db,
        &format!(
            "INSERT INTO feedback_messages (submitter_name, submitter_email, content, created_at) \
             SELECT 'Old', 'old@example.com', 'old message ' || n, now() - interval '1 day' \
             FROM generate_series(1, {messages}) AS n"
        ),
    )
    .await;
    let added =
        format!("SELECT id FROM feedback_messages WHERE submitter_name = 'Old' ORDER BY id DESC LIMIT {messages}");
    sql(
        db,
        &format!(
            "INSERT INTO dispatches (feedback_id, created_at, due_at, enqueued_at, enqueue_count, completed_at) \
             SELECT id, now(), now() + interval '1 hour', now(), 1, CASE WHEN id % 3 = 0 THEN NULL ELSE now() END \
             FROM ({added}) f"
        ),
    )
    .await;
    sql(
        db,
        &format!(
            "INSERT INTO deliveries (feedback_id, subscription_id, status, attempts, sent_at, updated_at) \
             SELECT f.id, s.id, 'sent', 1, now(), now() \
             FROM ({added}) f CROSS JOIN (SELECT id FROM push_subscriptions ORDER BY id LIMIT 4) s"
        ),
    )
    .await;
    sql(
        db,
        &format!(
            "INSERT INTO deliveries (feedback_id, subscription_id, status, attempts, sent_at, updated_at) \
             SELECT f.id, s.id, 'sent', 1, now(), now() \
             FROM (SELECT id FROM ({added}) a ORDER BY id DESC LIMIT {delivered}) f CROSS JOIN (SELECT id FROM push_subscriptions ORDER BY id OFFSET 4) s"
        ),
    )
    .await;
}

/// Every node of `node`'s tree that reads a table: the table, the node's kind and the
/// rows it went through over all its loops (returned, and removed by its filters).
fn table_scans(node: &serde_json::Value, scans: &mut Vec<(String, String, f64)>) {
    let kind = node["Node Type"].as_str().unwrap_or_default();
    if let Some(table) = node["Relation Name"].as_str()
        && kind != "ModifyTable"
    {
        let number = |key: &str| node[key].as_f64().unwrap_or(0.0);
        let read = (number("Actual Rows") + number("Rows Removed by Filter") + number("Rows Removed by Index Recheck"))
            * number("Actual Loops").max(1.0);
        scans.push((table.to_owned(), kind.to_owned(), read));
    }
    for child in node["Plans"].as_array().into_iter().flatten() {
        table_scans(child, scans);
    }
}

/// Makes every insert of a delivery of `feedback_id` fail, as a write that fails midway
/// through a group would.
async fn refuse_deliveries_of(app: &TestApp, feedback_id: i64) {
    use sea_orm::ConnectionTrait;
    let statements = if app.db.get_database_backend() == sea_orm::DbBackend::Postgres {
        vec![
            "CREATE FUNCTION refuse_delivery() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$ \
             LANGUAGE plpgsql"
                .to_owned(),
            format!(
                "CREATE TRIGGER refuse BEFORE INSERT ON deliveries FOR EACH ROW WHEN (NEW.feedback_id = {feedback_id}) \
                 EXECUTE FUNCTION refuse_delivery()"
            ),
        ]
    } else {
        vec![format!(
            "CREATE TRIGGER refuse BEFORE INSERT ON deliveries WHEN NEW.feedback_id = {feedback_id} \
             BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )]
    };
    for statement in statements {
        app.db.execute_unprepared(&statement).await.expect("trigger created");
    }
}

async fn a_group_that_fails_midway_keeps_none_of_its_runs(backend: Backend) {
    // Arrange: one subscription, two messages; the second's claim will fail.
    let app = spawn_app_with(Options { backend, worker: false, ..Options::default() }).await;
    app.subscribe_browser().await;
    let (first, second) = (submit(&app, 0).await.feedback_id, submit(&app, 1).await.feedback_id);
    refuse_deliveries_of(&app, second).await;
    let runs = [RunToOpen { feedback_id: first, token: "a" }, RunToOpen { feedback_id: second, token: "b" }];

    // Act
    let failed = delivery::open_runs(&group_pool(&app).await, &runs, 64, lease(), Coalescing::OFF).await;

    // Assert: the group failed whole, so the first run's claim is not kept either (the
    // worker then opens each run on its own).
    assert!(failed.is_err(), "{failed:?}");
    assert!(delivery::of_feedback(&app.db, first).await.expect("query").is_empty(), "the first run's claim was kept");
    let alone = delivery::open_run(&app.db, first, 64, "a", lease(), Coalescing::OFF).await.expect("opened alone");
    assert_eq!(claimed(&alone).expect("claimed").len(), 1);
}

#[tokio::test]
async fn a_group_that_fails_midway_keeps_none_of_its_runs_on_postgres() {
    a_group_that_fails_midway_keeps_none_of_its_runs(Backend::Postgres).await;
}

#[tokio::test]
async fn a_group_that_fails_midway_keeps_none_of_its_runs_on_sqlite() {
    a_group_that_fails_midway_keeps_none_of_its_runs(Backend::Sqlite).await;
}
