//! Deliveries: claiming, recording outcomes, and what is still due.
//!
//! A fan-out run gets a fresh `claim_token`. It claims a subscription's delivery either
//! by inserting the row (only the first inserter wins, thanks to the primary key) or by
//! a conditional update of a due retry or an expired lease. Only rows carrying its token
//! are sent, and outcomes are written only while the token still matches.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ColumnTrait, Condition, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QuerySelect, Set};

use crate::entities::delivery::{self, Column, Entity, FAILED, RETRY, SENDING, SENT};

/// A delivery claimed by a run: who to send to, and how many attempts that makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimed {
    /// The subscription to send to.
    pub subscription_id: i64,
    /// Attempts including this one.
    pub attempts: i32,
}

/// Claims new deliveries of `feedback_id` to `subscription_ids` (those without a row yet).
pub async fn claim_new<C: ConnectionTrait>(
    db: &C,
    feedback_id: i64,
    subscription_ids: &[i64],
    token: &str,
    lease_until: DateTime<Utc>,
) -> Result<(), DbErr> {
    if subscription_ids.is_empty() {
        return Ok(());
    }
    let now = super::now();
    let rows = subscription_ids.iter().map(|&subscription_id| delivery::ActiveModel {
        feedback_id: Set(feedback_id),
        subscription_id: Set(subscription_id),
        status: Set(SENDING.to_owned()),
        attempts: Set(1),
        claim_token: Set(Some(token.to_owned())),
        lease_until: Set(Some(lease_until)),
        next_attempt_at: Set(None),
        last_error: Set(None),
        sent_at: Set(None),
        updated_at: Set(now),
    });
    Entity::insert_many(rows)
        .on_conflict_do_nothing_on([Column::FeedbackId, Column::SubscriptionId])
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// Claims deliveries of `feedback_id` that are due again: retries whose time has come,
/// and claims whose lease expired (their sender crashed).
pub async fn claim_due<C: ConnectionTrait>(
    db: &C,
    feedback_id: i64,
    token: &str,
    lease_until: DateTime<Utc>,
) -> Result<(), DbErr> {
    let now = super::now();
    Entity::update_many()
        .col_expr(Column::Status, Expr::value(SENDING))
        .col_expr(Column::ClaimToken, Expr::value(token.to_owned()))
        .col_expr(Column::LeaseUntil, Expr::value(lease_until))
        .col_expr(Column::Attempts, Expr::col(Column::Attempts).add(1))
        .col_expr(Column::UpdatedAt, Expr::value(now))
        .filter(Column::FeedbackId.eq(feedback_id))
        .filter(
            Condition::any()
                .add(Condition::all().add(Column::Status.eq(RETRY)).add(Column::NextAttemptAt.lte(now)))
                .add(Condition::all().add(Column::Status.eq(SENDING)).add(Column::LeaseUntil.lt(now))),
        )
        .exec(db)
        .await?;
    Ok(())
}

/// The deliveries of `feedback_id` claimed with `token` and not yet finished.
pub async fn claimed<C: ConnectionTrait>(db: &C, feedback_id: i64, token: &str) -> Result<Vec<Claimed>, DbErr> {
    let rows: Vec<(i64, i32)> = Entity::find()
        .select_only()
        .column(Column::SubscriptionId)
        .column(Column::Attempts)
        .filter(Column::FeedbackId.eq(feedback_id))
        .filter(Column::ClaimToken.eq(token))
        .filter(Column::Status.eq(SENDING))
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows.into_iter().map(|(subscription_id, attempts)| Claimed { subscription_id, attempts }).collect())
}

/// How a claimed delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the push service.
    Sent,
    /// To be tried again at `at`.
    Retry {
        /// When the next attempt is due.
        at: DateTime<Utc>,
        /// Why this attempt failed.
        reason: String,
    },
    /// Given up.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Records `outcome` for a delivery, if the claim `token` still holds it.
pub async fn finish<C: ConnectionTrait>(
    db: &C,
    feedback_id: i64,
    subscription_id: i64,
    token: &str,
    outcome: &Outcome,
) -> Result<(), DbErr> {
    let now = super::now();
    let mut update = Entity::update_many()
        .col_expr(Column::LeaseUntil, Expr::value(Option::<DateTime<Utc>>::None))
        .col_expr(Column::UpdatedAt, Expr::value(now));
    update = match outcome {
        Outcome::Sent => update
            .col_expr(Column::Status, Expr::value(SENT))
            .col_expr(Column::SentAt, Expr::value(now))
            .col_expr(Column::LastError, Expr::value(Option::<String>::None)),
        Outcome::Retry { at, reason } => update
            .col_expr(Column::Status, Expr::value(RETRY))
            .col_expr(Column::NextAttemptAt, Expr::value(*at))
            .col_expr(Column::LastError, Expr::value(reason.clone())),
        Outcome::Failed { reason } => update
            .col_expr(Column::Status, Expr::value(FAILED))
            .col_expr(Column::LastError, Expr::value(reason.clone())),
    };
    update
        .filter(Column::FeedbackId.eq(feedback_id))
        .filter(Column::SubscriptionId.eq(subscription_id))
        .filter(Column::ClaimToken.eq(token))
        .filter(Column::Status.eq(SENDING))
        .exec(db)
        .await?;
    Ok(())
}

/// Records many deliveries of `feedback_id` as sent in one statement (those the claim
/// `token` still holds): the fan-out writes its successes in batches, not one by one.
pub async fn finish_sent_many<C: ConnectionTrait>(
    db: &C,
    feedback_id: i64,
    subscription_ids: &[i64],
    token: &str,
) -> Result<(), DbErr> {
    if subscription_ids.is_empty() {
        return Ok(());
    }
    let now = super::now();
    Entity::update_many()
        .col_expr(Column::LeaseUntil, Expr::value(Option::<DateTime<Utc>>::None))
        .col_expr(Column::UpdatedAt, Expr::value(now))
        .col_expr(Column::Status, Expr::value(SENT))
        .col_expr(Column::SentAt, Expr::value(now))
        .col_expr(Column::LastError, Expr::value(Option::<String>::None))
        .filter(Column::FeedbackId.eq(feedback_id))
        .filter(Column::SubscriptionId.is_in(subscription_ids.iter().copied()))
        .filter(Column::ClaimToken.eq(token))
        .filter(Column::Status.eq(SENDING))
        .exec(db)
        .await?;
    Ok(())
}

/// When `feedback_id` next needs a run: the earliest pending retry or outstanding lease.
pub async fn next_due<C: ConnectionTrait>(db: &C, feedback_id: i64) -> Result<Option<DateTime<Utc>>, DbErr> {
    let retry: Option<Option<DateTime<Utc>>> = Entity::find()
        .select_only()
        .column_as(Column::NextAttemptAt.min(), "due")
        .filter(Column::FeedbackId.eq(feedback_id))
        .filter(Column::Status.eq(RETRY))
        .into_tuple()
        .one(db)
        .await?;
    let lease: Option<Option<DateTime<Utc>>> = Entity::find()
        .select_only()
        .column_as(Column::LeaseUntil.min(), "due")
        .filter(Column::FeedbackId.eq(feedback_id))
        .filter(Column::Status.eq(SENDING))
        .into_tuple()
        .one(db)
        .await?;
    Ok([retry.flatten(), lease.flatten()].into_iter().flatten().min())
}

/// Whether any delivery of `feedback_id` exists (reads at most one row).
pub async fn any_of_feedback<C: ConnectionTrait>(db: &C, feedback_id: i64) -> Result<bool, DbErr> {
    let one: Option<i64> = Entity::find()
        .select_only()
        .column(Column::SubscriptionId)
        .filter(Column::FeedbackId.eq(feedback_id))
        .limit(1)
        .into_tuple()
        .one(db)
        .await?;
    Ok(one.is_some())
}

/// All deliveries of `feedback_id` (tests and the admin detail page).
pub async fn of_feedback<C: ConnectionTrait>(db: &C, feedback_id: i64) -> Result<Vec<delivery::Model>, DbErr> {
    Entity::find().filter(Column::FeedbackId.eq(feedback_id)).all(db).await
}

/// A delivery a run holds a claim on, with where to send it.
#[derive(Debug, Clone, PartialEq, Eq, sea_orm::FromQueryResult)]
pub struct Target {
    /// The subscription.
    pub subscription_id: i64,
    /// Its push service endpoint.
    pub endpoint: String,
    /// Its public key (base64url).
    pub p256dh: String,
    /// Its authentication secret (base64url).
    pub auth: String,
    /// Attempts including this one.
    pub attempts: i32,
}

/// One page of subscriptions claimed by [`claim_page`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimedPage {
    /// The deliveries newly claimed on the page (those already recorded are left alone).
    pub targets: Vec<Target>,
    /// The last subscription id of the page; `None` when there were no more.
    pub last: Option<i64>,
    /// Whether the page was full (more subscriptions may follow).
    pub full: bool,
}

/// Claims the deliveries of `feedback_id` to the next `size` subscriptions after id
/// `after` that have no delivery yet, and returns them with their subscriptions. With
/// `with_due` (a run's first page) it also claims the deliveries due again: retries whose
/// time has come, claims whose lease expired.
///
/// On PostgreSQL this is one statement; elsewhere five (eight with `with_due`).
pub async fn claim_page<C: ConnectionTrait>(
    db: &C,
    feedback_id: i64,
    after: i64,
    size: u64,
    token: &str,
    lease_until: DateTime<Utc>,
    with_due: bool,
) -> Result<ClaimedPage, DbErr> {
    use sea_orm::{DbBackend, Statement};
    if db.get_database_backend() != DbBackend::Postgres {
        let mut targets =
            if with_due { claim_due_targets(db, feedback_id, token, lease_until).await? } else { Vec::new() };
        let ids = crate::queries::subscription::ids_after(db, after, size).await?;
        let Some(&last) = ids.last() else { return Ok(ClaimedPage { targets, last: None, full: false }) };
        // Only the rows this call inserts are new claims: a delivery that already had a
        // row (sent, owed, or claimed earlier in this run and still being sent) is not.
        let existing: Vec<i64> = Entity::find()
            .select_only()
            .column(Column::SubscriptionId)
            .filter(Column::FeedbackId.eq(feedback_id))
            .filter(Column::SubscriptionId.is_in(ids.iter().copied()))
            .into_tuple()
            .all(db)
            .await?;
        claim_new(db, feedback_id, &ids, token, lease_until).await?;
        let claimed: Vec<Claimed> = claimed(db, feedback_id, token)
            .await?
            .into_iter()
            .filter(|c| ids.contains(&c.subscription_id) && !existing.contains(&c.subscription_id))
            .collect();
        targets.extend(with_subscriptions(db, &claimed).await?);
        return Ok(ClaimedPage { targets, last: Some(last), full: ids.len() as u64 >= size });
    }
    // The page's size and last id come back on every row (one row of NULLs when nothing
    // was claimed). A due delivery's row exists, so the page's insert skips it.
    const SQL: &str = "WITH due AS (\
         UPDATE deliveries SET status = $4, claim_token = $5, lease_until = $6, attempts = attempts + 1, updated_at = $7 \
         WHERE $8 AND feedback_id = $3 \
         AND ((status = $9 AND next_attempt_at <= $7) OR (status = $4 AND lease_until < $7)) \
         RETURNING subscription_id, attempts), \
         page AS (\
         SELECT id FROM push_subscriptions WHERE id > $1 ORDER BY id LIMIT $2), \
         fresh AS (\
         INSERT INTO deliveries (feedback_id, subscription_id, status, attempts, claim_token, lease_until, updated_at) \
         SELECT $3, id, $4, 1, $5, $6, $7 FROM page \
         ON CONFLICT (feedback_id, subscription_id) DO NOTHING \
         RETURNING subscription_id, attempts), \
         claimed AS (SELECT * FROM due UNION ALL SELECT * FROM fresh) \
         SELECT p.n AS page_size, p.last AS page_last, \
         s.id AS subscription_id, s.endpoint, s.p256dh, s.auth, c.attempts \
         FROM (SELECT count(*) AS n, max(id) AS last FROM page) p \
         LEFT JOIN (claimed c CROSS JOIN LATERAL (SELECT id, endpoint, p256dh, auth FROM push_subscriptions WHERE id = c.subscription_id OFFSET 0) s) ON true";
    let values: [sea_orm::Value; 9] = [
        after.into(),
        i64::try_from(size).unwrap_or(i64::MAX).into(),
        feedback_id.into(),
        SENDING.into(),
        token.into(),
        lease_until.into(),
        super::now().into(),
        with_due.into(),
        RETRY.into(),
    ];
    let rows = db.query_all_raw(Statement::from_sql_and_values(DbBackend::Postgres, SQL, values)).await?;
    page_of(&rows, size)
}

/// Claims the deliveries of `feedback_id` that are due again (retries whose time has
/// come, claims whose lease expired) and returns them with their subscriptions: the
/// generic part of [`claim_page`] (on PostgreSQL its one statement does this).
async fn claim_due_targets<C: ConnectionTrait>(
    db: &C,
    feedback_id: i64,
    token: &str,
    lease_until: DateTime<Utc>,
) -> Result<Vec<Target>, DbErr> {
    claim_due(db, feedback_id, token, lease_until).await?;
    let claimed = claimed(db, feedback_id, token).await?;
    with_subscriptions(db, &claimed).await
}

/// `claimed` joined with their subscriptions (those that still exist).
async fn with_subscriptions<C: ConnectionTrait>(db: &C, claimed: &[Claimed]) -> Result<Vec<Target>, DbErr> {
    let ids: Vec<i64> = claimed.iter().map(|c| c.subscription_id).collect();
    let subscriptions = crate::queries::subscription::by_ids(db, &ids).await?;
    Ok(subscriptions
        .into_iter()
        .map(|s| Target {
            attempts: claimed.iter().find(|c| c.subscription_id == s.id).map_or(1, |c| c.attempts),
            subscription_id: s.id,
            endpoint: s.endpoint,
            p256dh: s.p256dh,
            auth: s.auth,
        })
        .collect())
}

/// Extends to `lease_until` the claims `token` holds on deliveries of `feedback_id` still
/// being sent, so a run that takes longer than one hold keeps what it has yet to send;
/// returns how many.
pub async fn renew_claims<C: ConnectionTrait>(
    db: &C,
    feedback_id: i64,
    token: &str,
    lease_until: DateTime<Utc>,
) -> Result<u64, DbErr> {
    let renewed = Entity::update_many()
        .col_expr(Column::LeaseUntil, Expr::value(lease_until))
        .filter(Column::FeedbackId.eq(feedback_id))
        .filter(Column::ClaimToken.eq(token))
        .filter(Column::Status.eq(SENDING))
        .exec(db)
        .await?;
    Ok(renewed.rows_affected)
}

/// Records pushes of `feedback_id` to `subscription_ids` as sent (those the claim `token`
/// still holds) and their subscriptions' success, atomically.
///
/// On PostgreSQL this is one statement; elsewhere a transaction of two.
pub async fn record_sent<C: ConnectionTrait + sea_orm::TransactionTrait>(
    db: &C,
    feedback_id: i64,
    subscription_ids: &[i64],
    token: &str,
) -> Result<(), DbErr> {
    use sea_orm::{DbBackend, Statement, TransactionSession};
    if subscription_ids.is_empty() {
        return Ok(());
    }
    if db.get_database_backend() != DbBackend::Postgres {
        let txn = db.begin().await?;
        finish_sent_many(&txn, feedback_id, subscription_ids, token).await?;
        crate::queries::subscription::record_successes(&txn, subscription_ids).await?;
        return txn.commit().await;
    }
    const SQL: &str = "WITH sent AS (\
         UPDATE deliveries SET status = $4, sent_at = $5, lease_until = NULL, last_error = NULL, updated_at = $5 \
         WHERE feedback_id = $1 AND claim_token = $2 AND status = $6 AND subscription_id = ANY($3::text::bigint[]) \
         RETURNING subscription_id) \
         UPDATE push_subscriptions SET last_success_at = $5, failure_count = 0, last_failure_reason = NULL \
         WHERE id = ANY(ARRAY(SELECT subscription_id FROM sent)) \
         AND (failure_count > 0 OR last_success_at IS NULL OR last_success_at < $7)";
    let now = super::now();
    let values: [sea_orm::Value; 7] = [
        feedback_id.into(),
        token.into(),
        id_array(subscription_ids).into(),
        SENT.into(),
        now.into(),
        SENDING.into(),
        success_stale_before(now).into(),
    ];
    db.execute_raw(Statement::from_sql_and_values(DbBackend::Postgres, SQL, values)).await?;
    Ok(())
}

/// Closes the run of dispatch `dispatch_id` for `feedback_id`: records the pushes to
/// `sent` as sent (those the claim `token` still holds, with their subscriptions'
/// success, like [`record_sent`]), marks the dispatch completed and, when deliveries are
/// still owed (a retry scheduled, another run's claim outstanding), writes a dispatch
/// record for when the next is due, with the request id of the one it closes (so the
/// retry's job names the visitor's request too). Returns that time.
///
/// On PostgreSQL this is one statement; elsewhere four or five.
pub async fn close_run<C: ConnectionTrait + sea_orm::TransactionTrait>(
    db: &C,
    feedback_id: i64,
    dispatch_id: i64,
    sent: &[i64],
    token: &str,
) -> Result<Option<DateTime<Utc>>, DbErr> {
    use sea_orm::{DbBackend, Statement};
    if db.get_database_backend() != DbBackend::Postgres {
        record_sent(db, feedback_id, sent, token).await?;
        let due = next_due(db, feedback_id).await?;
        if let Some(due) = due {
            use sea_orm::EntityTrait;
            let closed = crate::entities::dispatch::Entity::find_by_id(dispatch_id).one(db).await?;
            let request_id = closed.and_then(|d| d.request_id);
            crate::queries::dispatch::create_for_request(db, feedback_id, due, request_id.as_deref()).await?;
        }
        crate::queries::dispatch::mark_completed(db, dispatch_id).await?;
        return Ok(due);
    }
    // Every part reads the statement's snapshot, so the deliveries `sent` updates still
    // look claimed to `due`, which leaves them out itself.
    const SQL: &str = "WITH sent AS (\
         UPDATE deliveries SET status = $6, sent_at = $5, lease_until = NULL, last_error = NULL, updated_at = $5 \
         WHERE feedback_id = $1 AND claim_token = $7 AND status = $4 AND subscription_id = ANY($8::text::bigint[]) \
         RETURNING subscription_id), \
         success AS (\
         UPDATE push_subscriptions SET last_success_at = $5, failure_count = 0, last_failure_reason = NULL \
         WHERE id = ANY(ARRAY(SELECT subscription_id FROM sent)) \
         AND (failure_count > 0 OR last_success_at IS NULL OR last_success_at < $9)), \
         due AS (\
         SELECT min(CASE WHEN status = $3 THEN next_attempt_at ELSE lease_until END) AS at \
         FROM deliveries WHERE feedback_id = $1 AND status IN ($3, $4) \
         AND (status <> $4 OR claim_token IS DISTINCT FROM $7 OR NOT subscription_id = ANY($8::text::bigint[]))), \
         done AS (UPDATE dispatches SET completed_at = COALESCE(completed_at, $5) WHERE id = $2) \
         INSERT INTO dispatches (feedback_id, created_at, due_at, enqueue_count, request_id) \
         SELECT $1, $5, at, 0, (SELECT request_id FROM dispatches WHERE id = $2) \
         FROM due WHERE at IS NOT NULL RETURNING due_at";
    let now = super::now();
    let values: [sea_orm::Value; 9] = [
        feedback_id.into(),
        dispatch_id.into(),
        RETRY.into(),
        SENDING.into(),
        now.into(),
        SENT.into(),
        token.into(),
        id_array(sent).into(),
        success_stale_before(now).into(),
    ];
    let row = db.query_one_raw(Statement::from_sql_and_values(DbBackend::Postgres, SQL, values)).await?;
    row.map(|row| row.try_get("", "due_at")).transpose()
}

/// A run for [`close_runs`] to close: as the arguments of [`close_run`].
#[derive(Debug, Clone, Copy)]
pub struct RunToClose<'a> {
    /// The message the run announced.
    pub feedback_id: i64,
    /// Its dispatch record.
    pub dispatch_id: i64,
    /// Pushes of its last page not recorded yet.
    pub sent: &'a [i64],
    /// Its claim token.
    pub token: &'a str,
}

/// The statement of [`close_runs`] for a group on PostgreSQL, each run of its own
/// message: as [`close_run`]'s statement, for every run (`o`, its place). `$9` holds each
/// run's successes as a row of a two-dimensional array (padded with NULL), so a delivery
/// finds its run's token and successes by its message's place in the group.
///
/// It is planned once per connection and that plan is kept whatever the tables become
/// ([`crate::db::PLANNED_ONCE`]), so no table is ever joined, and each is read through an
/// index condition on the group's ids or row by row from a run's row. The successes are
/// found among the deliveries of the group's messages, by message only: with their
/// subscriptions as an index condition too, a plan may look them up by subscription,
/// through every delivery ever made to it. What each run still owes is a scalar subquery
/// per run over its message's deliveries (materialised, so it runs once), the request id
/// of its dispatch is read by key. As joins, a plan made for small analysed tables hashed
/// whole indexes of `deliveries` and `push_subscriptions`, and one made for empty tables
/// checked each run's successes against every other's. `done` keeps a first completion
/// time with COALESCE rather than a `completed_at IS NULL` filter: with the filter, a
/// plan may pick the partial index of outstanding dispatches and, under a backlog of
/// thousands, read all of them for each close.
pub const CLOSE_RUNS_SQL: &str = "WITH runs AS (\
     SELECT * FROM unnest($1::text::bigint[], $2::text::bigint[], $8::text::text[]) WITH ORDINALITY AS r(f, d, t, o)), \
     sent AS (\
     UPDATE deliveries d SET status = $5, sent_at = $3, lease_until = NULL, last_error = NULL, updated_at = $3 \
     WHERE d.feedback_id = ANY($1::text::bigint[]) AND d.status = $6 \
     AND d.claim_token = ($8::text::text[])[array_position($1::text::bigint[], d.feedback_id)] \
     AND d.subscription_id = ANY(($9::text::bigint[])\
     [array_position($1::text::bigint[], d.feedback_id):array_position($1::text::bigint[], d.feedback_id)]) \
     RETURNING d.subscription_id), \
     success AS (\
     UPDATE push_subscriptions SET last_success_at = $3, failure_count = 0, last_failure_reason = NULL \
     WHERE id = ANY(ARRAY(SELECT subscription_id FROM sent)) \
     AND (failure_count > 0 OR last_success_at IS NULL OR last_success_at < $7)), \
     due AS MATERIALIZED (\
     SELECT r.f, r.d, (SELECT min(CASE WHEN x.status = $4 THEN x.next_attempt_at ELSE x.lease_until END) \
     FROM deliveries x WHERE x.feedback_id = r.f AND x.status IN ($4, $6) \
     AND (x.status = $6 AND x.claim_token = r.t AND x.subscription_id = ANY(($9::text::bigint[])[r.o::int:r.o::int])) IS NOT TRUE) \
     AS at FROM runs r), \
     done AS (UPDATE dispatches SET completed_at = COALESCE(completed_at, $3) WHERE id = ANY($2::text::bigint[])) \
     INSERT INTO dispatches (feedback_id, created_at, due_at, enqueue_count, request_id) \
     SELECT due.f, $3, due.at, 0, (SELECT x.request_id FROM dispatches x WHERE x.id = due.d) \
     FROM due WHERE due.at IS NOT NULL RETURNING feedback_id, due_at";

/// Closes many runs at once, each as [`close_run`] does; returns, in their order, when
/// each one's message is next due (the dispatch written for it), if at all.
///
/// On PostgreSQL this is one statement (all commit together or not at all); run it on a
/// pool that plans it once ([`crate::db::connect_for_groups`]). Should one message have
/// two runs in the group (a job and a copy whose lock lapsed), the second goes out in a
/// statement after the first's, in the same transaction. On SQLite [`close_run`] for
/// each, all in one write transaction ([`sqlite_write`]): they commit together or not
/// at all, flushed once.
pub async fn close_runs<C: ConnectionTrait + sea_orm::TransactionTrait>(
    db: &C,
    runs: &[RunToClose<'_>],
) -> Result<Vec<Option<DateTime<Utc>>>, DbErr> {
    use sea_orm::TransactionSession;
    if db.get_database_backend() == sea_orm::DbBackend::Sqlite && !runs.is_empty() {
        let txn = sqlite_write(db).await?;
        let mut due = Vec::with_capacity(runs.len());
        for run in runs {
            due.push(close_run(&txn, run.feedback_id, run.dispatch_id, run.sent, run.token).await?);
        }
        txn.commit().await?;
        return Ok(due);
    }
    if db.get_database_backend() != sea_orm::DbBackend::Postgres || runs.len() <= 1 {
        // Alone: close_run's statement, whose plan the server keeps.
        let mut due = Vec::with_capacity(runs.len());
        for run in runs {
            due.push(close_run(db, run.feedback_id, run.dispatch_id, run.sent, run.token).await?);
        }
        return Ok(due);
    }
    // Each run's layer: how many runs of its message come before it.
    let mut seen = std::collections::HashMap::with_capacity(runs.len());
    let layers: Vec<usize> = runs
        .iter()
        .map(|run| {
            let before = seen.entry(run.feedback_id).or_insert(0);
            *before += 1;
            *before - 1
        })
        .collect();
    let count = layers.iter().copied().max().map_or(0, |top| top + 1);
    if count == 1 {
        return close_group(db, runs).await;
    }
    // Each layer sees the one before; all commit together, as one group would.
    let txn = db.begin().await?;
    let mut due = vec![None; runs.len()];
    for layer in 0..count {
        let places: Vec<usize> = (0..runs.len()).filter(|&i| layers[i] == layer).collect();
        let group: Vec<RunToClose<'_>> = places.iter().map(|&i| runs[i]).collect();
        for (place, at) in places.into_iter().zip(close_group(&txn, &group).await?) {
            due[place] = at;
        }
    }
    txn.commit().await?;
    Ok(due)
}

/// [`CLOSE_RUNS_SQL`] for `runs`, each of its own message.
async fn close_group<C: ConnectionTrait>(db: &C, runs: &[RunToClose<'_>]) -> Result<Vec<Option<DateTime<Utc>>>, DbErr> {
    use sea_orm::{DbBackend, Statement};
    let feedback_ids: Vec<i64> = runs.iter().map(|r| r.feedback_id).collect();
    let dispatch_ids: Vec<i64> = runs.iter().map(|r| r.dispatch_id).collect();
    let tokens: Vec<&str> = runs.iter().map(|r| r.token).collect();
    let sent: Vec<&[i64]> = runs.iter().map(|r| r.sent).collect();
    let now = super::now();
    let values = vec![
        id_array(&feedback_ids).into(),
        id_array(&dispatch_ids).into(),
        now.into(),
        RETRY.into(),
        SENT.into(),
        SENDING.into(),
        success_stale_before(now).into(),
        token_array(&tokens)?.into(),
        id_rows(&sent).into(),
    ];
    let rows = db.query_all_raw(Statement::from_sql_and_values(DbBackend::Postgres, CLOSE_RUNS_SQL, values)).await?;
    let mut due = std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        due.insert(row.try_get::<i64>("", "feedback_id")?, row.try_get::<DateTime<Utc>>("", "due_at")?);
    }
    Ok(runs.iter().map(|r| due.get(&r.feedback_id).copied()).collect())
}

/// Claim `tokens` as a PostgreSQL array literal (bound as text). Tokens are made of
/// letters, digits and dashes (UUIDs), which need no quoting; anything else (and `NULL`,
/// which would read as no value) is refused.
fn token_array(tokens: &[&str]) -> Result<String, DbErr> {
    let plain = |token: &str| {
        !token.is_empty()
            && !token.eq_ignore_ascii_case("null")
            && token.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if let Some(token) = tokens.iter().find(|t| !plain(t)) {
        return Err(DbErr::Custom(format!("claim token {token:?} is not plain")));
    }
    Ok(format!("{{{}}}", tokens.join(",")))
}

/// `ids` as a PostgreSQL array literal (bound as text: the driver has no array type here).
fn id_array(ids: &[i64]) -> String {
    format!("{{{}}}", ids.iter().map(i64::to_string).collect::<Vec<_>>().join(","))
}

/// `rows` as a two-dimensional PostgreSQL array literal, one row each, padded with NULL
/// to the longest (bound as text); `{}` when every row is empty.
fn id_rows(rows: &[&[i64]]) -> String {
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    if width == 0 {
        return "{}".into();
    }
    let row = |ids: &[i64]| {
        let mut cells: Vec<String> = ids.iter().map(i64::to_string).collect();
        cells.resize(width, "NULL".into());
        format!("{{{}}}", cells.join(","))
    };
    format!("{{{}}}", rows.iter().map(|r| row(r)).collect::<Vec<_>>().join(","))
}

/// A subscription's last success older than this is written again (see
/// `subscription::SUCCESS_RESOLUTION`).
fn success_stale_before(now: DateTime<Utc>) -> DateTime<Utc> {
    now - chrono::Duration::from_std(crate::queries::subscription::SUCCESS_RESOLUTION)
        .unwrap_or(chrono::Duration::minutes(1))
}

/// Coalescing of a message's first run: past `threshold` messages in one window of
/// `window_secs`, a message is folded into the window's digest instead of announced on
/// its own. A `threshold` of 0 turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coalescing {
    /// Messages a window announces one by one; 0: every message.
    pub threshold: u64,
    /// The window's length in seconds (at least 1).
    pub window_secs: i64,
}

impl Coalescing {
    /// Every message announced on its own.
    pub const OFF: Coalescing = Coalescing { threshold: 0, window_secs: 60 };

    /// The threshold as a statement's parameter: counting stops one past it, so it stays
    /// below the largest `bigint`.
    fn threshold_param(&self) -> i64 {
        Ord::min(i64::try_from(self.threshold).unwrap_or(i64::MAX), i64::MAX - 1)
    }

    /// The start (seconds since the epoch) of the window `created_at` falls in.
    pub fn window_start(&self, created_at: DateTime<Utc>) -> i64 {
        let window = Ord::max(self.window_secs, 1);
        created_at.timestamp().div_euclid(window) * window
    }
}

/// How a fan-out run of a message opened ([`open_run`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// The message no longer exists (deleted since it was submitted).
    Missing,
    /// The message is part of a burst: `in_window` messages arrived in its window so far,
    /// counted up to one past the threshold (a flood's messages do not each count it all).
    Folded {
        /// The message.
        message: crate::entities::feedback_message::Model,
        /// Messages in its window up to it.
        in_window: u64,
    },
    /// The first page of its deliveries is claimed.
    Claimed {
        /// The message.
        message: crate::entities::feedback_message::Model,
        /// The page.
        page: ClaimedPage,
    },
}

/// Opens a fan-out run of `feedback_id`: loads the message, decides whether it folds
/// into a digest ([`Coalescing`]: only a message nothing was sent for yet folds; one
/// whose dispatch record is completed already folds whatever its window's count, for a
/// digest announced it) and, if not, claims its first page of `size` subscriptions with
/// the deliveries due again (as [`claim_page`] with `with_due`).
///
/// On PostgreSQL this is one statement; elsewhere the same steps one after another.
///
/// On PostgreSQL the open commits without waiting for its flush to disk
/// (`synchronous_commit` off for its own transaction, so call it outside any other): the
/// first pushes leave one disk flush sooner. No promise is weakened. The run's close
/// commits durably, and a durable commit flushes everything written before it, the open
/// included. Only a server crash between the two can lose the open, and then the close
/// is lost too and the run's pushes go out again either way: with the open kept, as
/// soon as their claims lapse; with it lost, when the job is retried.
pub async fn open_run<C: ConnectionTrait>(
    db: &C,
    feedback_id: i64,
    size: u64,
    token: &str,
    lease_until: DateTime<Utc>,
    coalescing: Coalescing,
) -> Result<Opening, DbErr> {
    if db.get_database_backend() == sea_orm::DbBackend::Postgres {
        open_alone(db, feedback_id, size, token, lease_until, coalescing).await
    } else {
        open_one_by_one(db, feedback_id, size, token, lease_until, coalescing).await
    }
}

/// A run for [`open_runs`] to open: its message and its claim token.
#[derive(Debug, Clone, Copy)]
pub struct RunToOpen<'a> {
    /// The message to announce.
    pub feedback_id: i64,
    /// The run's claim token.
    pub token: &'a str,
}

/// The statement of [`open_runs`] for a group on PostgreSQL.
///
/// Per run (`o`, its place): `burst` is 0 when coalescing is off or something went out
/// already, one past the threshold when a digest announced the message (a completed
/// dispatch record and nothing sent), else the window's count; a run claims only if its
/// message exists and is not folded (`go`). Claims
/// carry their run's token, so two runs of one message never share one. Every row
/// carries its run's message and the page's size (one row of NULL targets for a run
/// that claimed nothing).
///
/// It is planned once per connection and that plan is kept whatever the tables become
/// ([`crate::db::PLANNED_ONCE`]), so no table is ever joined: each is read through an
/// index condition on the group's ids (`msg`, the claims due again: their run's token
/// is looked up in the arrays, not joined), row by row from a group's row (the burst
/// check's "anything sent yet", a scalar subquery with `LIMIT 1`; the window's count;
/// each claim's subscription, a `LATERAL` subquery kept apart by `OFFSET 0`), or in
/// index order up to the page's size. As an `EXISTS` and joins, a plan made for small
/// tables hashed the whole of `deliveries` and `push_subscriptions`. The joins left are
/// between the group's own rows.
pub const OPEN_RUNS_SQL: &str = "WITH runs AS (\
     SELECT * FROM unnest($1::text::bigint[], $2::text::text[]) WITH ORDINALITY AS r(f, t, o)), \
     msg AS (SELECT * FROM feedback_messages WHERE id = ANY($1::text::bigint[])), \
     burst AS (SELECT m.id AS f, \
     CASE WHEN $7::bigint = 0 OR (SELECT 1 FROM deliveries WHERE feedback_id = m.id LIMIT 1) IS NOT NULL THEN 0 \
     WHEN (SELECT 1 FROM dispatches WHERE feedback_id = m.id AND completed_at IS NOT NULL LIMIT 1) IS NOT NULL \
     THEN $7::bigint + 1 \
     ELSE (SELECT count(*) FROM (SELECT 1 FROM feedback_messages x \
     WHERE x.created_at >= to_timestamp((floor(extract(epoch FROM m.created_at) / $8::bigint) * $8::bigint)::float8) \
     AND x.created_at <= m.created_at LIMIT $7::bigint + 1) w) END AS n FROM msg m), \
     go AS (SELECT r.f, r.t FROM runs r JOIN burst b ON b.f = r.f WHERE b.n <= $7::bigint), \
     due AS (\
     UPDATE deliveries d SET status = $3, \
     claim_token = ($2::text::text[])[array_position($1::text::bigint[], d.feedback_id)], \
     lease_until = $4, attempts = d.attempts + 1, updated_at = $5 \
     WHERE d.feedback_id = ANY(ARRAY(SELECT f FROM go)) \
     AND ((d.status = $6 AND d.next_attempt_at <= $5) OR (d.status = $3 AND d.lease_until < $5)) \
     RETURNING d.feedback_id, d.subscription_id, d.attempts, d.claim_token), \
     page AS (SELECT id FROM push_subscriptions WHERE EXISTS (SELECT 1 FROM go) ORDER BY id LIMIT $9), \
     fresh AS (\
     INSERT INTO deliveries (feedback_id, subscription_id, status, attempts, claim_token, lease_until, updated_at) \
     SELECT go.f, page.id, $3, 1, go.t, $4, $5 FROM go CROSS JOIN page \
     ON CONFLICT (feedback_id, subscription_id) DO NOTHING \
     RETURNING feedback_id, subscription_id, attempts, claim_token), \
     claimed AS (SELECT * FROM due UNION ALL SELECT * FROM fresh) \
     SELECT r.o AS run, p.n AS page_size, p.last AS page_last, b.n AS in_window, \
     m.id AS m_id, m.submitter_name AS m_submitter_name, m.submitter_email AS m_submitter_email, \
     m.content AS m_content, m.created_at AS m_created_at, m.read_at AS m_read_at, m.handled_at AS m_handled_at, \
     s.id AS subscription_id, s.endpoint, s.p256dh, s.auth, c.attempts \
     FROM runs r CROSS JOIN (SELECT count(*) AS n, max(id) AS last FROM page) p \
     LEFT JOIN msg m ON m.id = r.f LEFT JOIN burst b ON b.f = r.f \
     LEFT JOIN (claimed c CROSS JOIN LATERAL (SELECT id, endpoint, p256dh, auth FROM push_subscriptions WHERE id = c.subscription_id OFFSET 0) s) \
     ON c.feedback_id = r.f AND c.claim_token = r.t \
     CROSS JOIN (SELECT set_config('synchronous_commit', 'off', true)) AS commit_mode";

/// Opens many runs at once, each as [`open_run`] does; returns their openings in their
/// order. Every run claims on the same first page of subscriptions.
///
/// On PostgreSQL this is one statement (all commit together or not at all); run it on a
/// pool that plans it once ([`crate::db::connect_for_groups`]). On SQLite [`open_run`]'s
/// steps for each, all in one write transaction ([`sqlite_write`]), flushed once. Two
/// runs of one message in a group share its verdict; the claims due again go to the
/// first of them.
pub async fn open_runs<C: ConnectionTrait + sea_orm::TransactionTrait>(
    db: &C,
    runs: &[RunToOpen<'_>],
    size: u64,
    lease_until: DateTime<Utc>,
    coalescing: Coalescing,
) -> Result<Vec<Opening>, DbErr> {
    use sea_orm::{DbBackend, Statement, TransactionSession};
    if db.get_database_backend() == DbBackend::Sqlite && !runs.is_empty() {
        let txn = sqlite_write(db).await?;
        let mut opened = Vec::with_capacity(runs.len());
        for run in runs {
            opened.push(open_one_by_one(&txn, run.feedback_id, size, run.token, lease_until, coalescing).await?);
        }
        txn.commit().await?;
        return Ok(opened);
    }
    if db.get_database_backend() != DbBackend::Postgres || runs.len() == 1 {
        let mut opened = Vec::with_capacity(runs.len());
        for run in runs {
            opened.push(open_run(db, run.feedback_id, size, run.token, lease_until, coalescing).await?);
        }
        return Ok(opened);
    }
    if runs.is_empty() {
        return Ok(Vec::new());
    }

    let feedback_ids: Vec<i64> = runs.iter().map(|r| r.feedback_id).collect();
    let tokens: Vec<&str> = runs.iter().map(|r| r.token).collect();
    let values = vec![
        id_array(&feedback_ids).into(),
        token_array(&tokens)?.into(),
        SENDING.into(),
        lease_until.into(),
        super::now().into(),
        RETRY.into(),
        coalescing.threshold_param().into(),
        Ord::max(coalescing.window_secs, 1).into(),
        i64::try_from(size).unwrap_or(i64::MAX).into(),
    ];
    let rows = db.query_all_raw(Statement::from_sql_and_values(DbBackend::Postgres, OPEN_RUNS_SQL, values)).await?;
    let mut by_run: Vec<Vec<sea_orm::QueryResult>> = (0..runs.len()).map(|_| Vec::new()).collect();
    for row in rows {
        let run: i64 = row.try_get("", "run")?;
        let slot = usize::try_from(run - 1).ok().and_then(|i| by_run.get_mut(i));
        slot.ok_or_else(|| DbErr::Custom(format!("a row for run {run} of {}", runs.len())))?.push(row);
    }
    let mut opened = Vec::with_capacity(runs.len());
    for rows in by_run {
        if rows.is_empty() {
            return Err(DbErr::Custom("a run without a row".into()));
        }
        opened.push(opening_of(&rows, size, coalescing)?);
    }
    Ok(opened)
}

/// A run's opening from its `rows` of the opening statements: missing (no message),
/// folded (past the threshold) or its claimed page.
fn opening_of(rows: &[sea_orm::QueryResult], size: u64, coalescing: Coalescing) -> Result<Opening, DbErr> {
    use sea_orm::FromQueryResult;

    use crate::entities::feedback_message;
    let Some(first) = rows.first() else { return Ok(Opening::Missing) };
    if first.try_get::<Option<i64>>("", "m_id")?.is_none() {
        return Ok(Opening::Missing);
    }
    let message = feedback_message::Model::from_query_result(first, "m_")?;
    let in_window = u64::try_from(first.try_get::<i64>("", "in_window")?).unwrap_or(0);
    if coalescing.threshold > 0 && in_window > coalescing.threshold {
        return Ok(Opening::Folded { message, in_window });
    }
    Ok(Opening::Claimed { message, page: page_of(rows, size)? })
}

/// [`open_run`] on PostgreSQL: one statement whose plan, unlike that of the batch, the
/// server keeps (a run alone is the common case, and the one that waits for it).
async fn open_alone<C: ConnectionTrait>(
    db: &C,
    feedback_id: i64,
    size: u64,
    token: &str,
    lease_until: DateTime<Utc>,
    coalescing: Coalescing,
) -> Result<Opening, DbErr> {
    use sea_orm::{DbBackend, Statement};
    // `burst` is 0 when coalescing is off or something went out already, one past the
    // threshold when a digest announced the message (a completed dispatch record and
    // nothing sent), else the window's count; nothing is claimed unless the message
    // exists and is not folded (`go`). Every row carries the
    // message and the page's size (one row of NULL targets when nothing was claimed).
    const SQL: &str = "WITH msg AS (SELECT * FROM feedback_messages WHERE id = $3), \
         burst AS (SELECT CASE WHEN $10::bigint = 0 OR EXISTS (SELECT 1 FROM deliveries WHERE feedback_id = $3) THEN 0 \
         WHEN EXISTS (SELECT 1 FROM dispatches WHERE feedback_id = $3 AND completed_at IS NOT NULL) THEN $10::bigint + 1 \
         ELSE (SELECT count(*) FROM (SELECT 1 FROM feedback_messages f, msg m \
         WHERE f.created_at >= to_timestamp((floor(extract(epoch FROM m.created_at) / $11::bigint) * $11::bigint)::float8) \
         AND f.created_at <= m.created_at LIMIT $10::bigint + 1) w) END AS n), \
         go AS (SELECT 1 FROM msg, burst WHERE burst.n <= $10::bigint), \
         due AS (\
         UPDATE deliveries SET status = $4, claim_token = $5, lease_until = $6, attempts = attempts + 1, updated_at = $7 \
         WHERE EXISTS (SELECT 1 FROM go) AND feedback_id = $3 \
         AND ((status = $9 AND next_attempt_at <= $7) OR (status = $4 AND lease_until < $7)) \
         RETURNING subscription_id, attempts), \
         page AS (\
         SELECT id FROM push_subscriptions WHERE EXISTS (SELECT 1 FROM go) AND id > $1 ORDER BY id LIMIT $2), \
         fresh AS (\
         INSERT INTO deliveries (feedback_id, subscription_id, status, attempts, claim_token, lease_until, updated_at) \
         SELECT $3, id, $4, 1, $5, $6, $7 FROM page \
         ON CONFLICT (feedback_id, subscription_id) DO NOTHING \
         RETURNING subscription_id, attempts), \
         claimed AS (SELECT * FROM due UNION ALL SELECT * FROM fresh) \
         SELECT p.n AS page_size, p.last AS page_last, b.n AS in_window, \
         m.id AS m_id, m.submitter_name AS m_submitter_name, m.submitter_email AS m_submitter_email, \
         m.content AS m_content, m.created_at AS m_created_at, m.read_at AS m_read_at, m.handled_at AS m_handled_at, \
         s.id AS subscription_id, s.endpoint, s.p256dh, s.auth, c.attempts \
         FROM (SELECT count(*) AS n, max(id) AS last FROM page) p \
         CROSS JOIN burst b LEFT JOIN msg m ON true \
         LEFT JOIN (claimed c CROSS JOIN LATERAL (SELECT id, endpoint, p256dh, auth FROM push_subscriptions WHERE id = c.subscription_id OFFSET 0) s) ON true \
         CROSS JOIN (SELECT set_config('synchronous_commit', 'off', true)) AS commit_mode";
    let values: [sea_orm::Value; 11] = [
        0i64.into(),
        i64::try_from(size).unwrap_or(i64::MAX).into(),
        feedback_id.into(),
        SENDING.into(),
        token.into(),
        lease_until.into(),
        super::now().into(),
        true.into(),
        RETRY.into(),
        coalescing.threshold_param().into(),
        Ord::max(coalescing.window_secs, 1).into(),
    ];
    let rows = db.query_all_raw(Statement::from_sql_and_values(DbBackend::Postgres, SQL, values)).await?;
    opening_of(&rows, size, coalescing)
}

/// A write transaction on SQLite that holds the database's write lock from its start
/// (`BEGIN IMMEDIATE`, waiting for it within the busy timeout): a group's runs (or a
/// lone run of the group writers) commit, and wait for their flush to disk, once
/// instead of statement by statement, and a transaction that reads before it writes is
/// never refused for having read a snapshot another process has since written past.
async fn sqlite_write<C: sea_orm::TransactionTrait>(db: &C) -> Result<C::Transaction, DbErr> {
    use sea_orm::{SqliteTransactionMode, TransactionOptions};
    db.begin_with_options(TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..TransactionOptions::default()
    })
    .await
}

/// [`open_run`] as separate statements (databases other than PostgreSQL).
async fn open_one_by_one<C: ConnectionTrait>(
    db: &C,
    feedback_id: i64,
    size: u64,
    token: &str,
    lease_until: DateTime<Utc>,
    coalescing: Coalescing,
) -> Result<Opening, DbErr> {
    let Some(message) = crate::queries::feedback::find(db, feedback_id).await? else {
        return Ok(Opening::Missing);
    };
    if coalescing.threshold > 0 {
        let from =
            DateTime::from_timestamp(coalescing.window_start(message.created_at), 0).unwrap_or(message.created_at);
        // The questions at once (one after another inside a group's transaction, which
        // has one connection): has anything gone out for it, did a digest announce it
        // already, and how busy is its window.
        let (started, announced, in_window) = tokio::join!(
            any_of_feedback(db, feedback_id),
            crate::queries::dispatch::any_completed_of_feedback(db, feedback_id),
            crate::queries::feedback::count_created_between(
                db,
                from,
                message.created_at,
                coalescing.threshold.saturating_add(1)
            )
        );
        let (started, announced, in_window) = (started?, announced?, in_window?);
        if !started && announced {
            return Ok(Opening::Folded { message, in_window: coalescing.threshold.saturating_add(1) });
        }
        if !started && in_window > coalescing.threshold {
            return Ok(Opening::Folded { message, in_window });
        }
    }
    let page = claim_page(db, feedback_id, 0, size, token, lease_until, true).await?;
    Ok(Opening::Claimed { message, page })
}

/// The claimed page in `rows` of the claiming statements.
fn page_of(rows: &[sea_orm::QueryResult], size: u64) -> Result<ClaimedPage, DbErr> {
    use sea_orm::FromQueryResult;
    let mut page = ClaimedPage::default();
    for row in rows {
        let n: i64 = row.try_get("", "page_size")?;
        page.last = row.try_get("", "page_last")?;
        page.full = u64::try_from(n).unwrap_or(0) >= size;
        if row.try_get::<Option<i64>>("", "subscription_id")?.is_some() {
            page.targets.push(Target::from_query_result(row, "")?);
        }
    }
    Ok(page)
}
