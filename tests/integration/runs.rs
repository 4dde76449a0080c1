//! Opening and closing fan-out runs (`shared::queries::delivery::{open_run, close_run,
//! close_runs}`): one statement each on PostgreSQL, a few on SQLite, and the same answers
//! on both.

use sea_orm::EntityTrait;
use shared::domain::NewFeedback;
use shared::entities::{dispatch, push_subscription};
use shared::queries::delivery::{self, Coalescing, Opening, RunToClose, RunToOpen};
use shared::queries::feedback::{Submitted, insert_for_request, insert_with_dispatch};
use tidings_tests::harness::{Backend, Options, TestApp, spawn_app_with};

/// A window long enough that every message of the test falls in the same one.
const ONE_WINDOW: Coalescing = Coalescing { threshold: 2, window_secs: 1_000_000_000 };

async fn submit(app: &TestApp, n: usize) -> Submitted {
    let feedback = NewFeedback::parse("Ann", "ann@example.com", &format!("message {n}")).expect("valid");
    insert_with_dispatch(&app.db, &feedback).await.expect("stored")
}

fn lease() -> chrono::DateTime<chrono::Utc> {
    shared::queries::now() + chrono::Duration::seconds(30)
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
    assert!(matches!(opened[0], Opening::Folded { in_window: 3, .. }), "{:?}", opened[0]);
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

/// The pool a worker writes groups of runs on; on PostgreSQL it plans every statement
/// for its values, so no plan cached while a table was small is reused once it grew.
async fn group_pool(app: &TestApp) -> sea_orm::DatabaseConnection {
    use sea_orm::ConnectionTrait;
    let pool = shared::db::connect_for_groups(&app.db, &app.settings.database_url).await.expect("connected");
    if app.db.get_database_backend() == sea_orm::DbBackend::Postgres {
        let row = pool
            .query_one_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, "SHOW plan_cache_mode"))
            .await
            .expect("query")
            .expect("a row");
        assert_eq!(row.try_get::<String>("", "plan_cache_mode").expect("text"), "force_custom_plan");
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
