//! The dispatch outbox (see [`crate::entities::dispatch`]).

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
};

use crate::entities::dispatch::{self, Column, Entity};

/// Writes a dispatch for `feedback_id`, due at `due_at`; returns its id.
pub async fn create<C: ConnectionTrait>(db: &C, feedback_id: i64, due_at: DateTime<Utc>) -> Result<i64, DbErr> {
    create_for_request(db, feedback_id, due_at, None).await
}

/// As [`create`], remembering the request that asked for it.
pub async fn create_for_request<C: ConnectionTrait>(
    db: &C,
    feedback_id: i64,
    due_at: DateTime<Utc>,
    request_id: Option<&str>,
) -> Result<i64, DbErr> {
    let model = dispatch::ActiveModel {
        request_id: Set(request_id.map(str::to_owned)),
        feedback_id: Set(feedback_id),
        created_at: Set(super::now()),
        due_at: Set(due_at),
        enqueued_at: Set(None),
        enqueue_count: Set(0),
        completed_at: Set(None),
        ..Default::default()
    }
    .insert(db)
    .await?;
    Ok(model.id)
}

/// Records that dispatch `id` was handed to Redis, unless its job completed it already
/// (see [`mark_enqueued_many`]).
pub async fn mark_enqueued<C: ConnectionTrait>(db: &C, id: i64) -> Result<(), DbErr> {
    mark_enqueued_many(db, &[id]).await
}

/// Records that dispatches `ids` were handed to Redis (one statement).
///
/// A record its job completed already is left as it is: only outstanding records are
/// ever enqueued again (by the relay), so the mark would change nothing anyone reads,
/// and it would cost a row version. The web marks what it enqueued every 50 ms, by when
/// most of those jobs are done: this leaves each such record one write fewer.
pub async fn mark_enqueued_many<C: ConnectionTrait>(db: &C, ids: &[i64]) -> Result<(), DbErr> {
    if ids.is_empty() {
        return Ok(());
    }
    db.execute_raw(mark_enqueued_statement(db.get_database_backend(), ids)).await?;
    Ok(())
}

/// The statement of [`mark_enqueued_many`] for `ids` on `backend`.
pub fn mark_enqueued_statement(backend: sea_orm::DbBackend, ids: &[i64]) -> sea_orm::Statement {
    use sea_orm::QueryTrait;
    Entity::update_many()
        .col_expr(Column::EnqueuedAt, Expr::value(super::now()))
        .col_expr(Column::EnqueueCount, Expr::col(Column::EnqueueCount).add(1))
        .filter(Column::Id.is_in(ids.iter().copied()))
        // Wrapped, so the planner cannot take it for the predicate of the partial index
        // of outstanding records and read all of them (a backlog) instead of the keys.
        .filter(Expr::cust("(completed_at IS NULL) IS TRUE"))
        .build(backend)
}

/// Records that a job for dispatch `id` finished (whatever the deliveries' outcomes).
///
/// A first completion time is kept with `COALESCE`, not with a `completed_at IS NULL`
/// filter, which could lead a cached plan to the partial index of outstanding
/// dispatches (all of them, under a backlog) instead of the primary key.
pub async fn mark_completed<C: ConnectionTrait>(db: &C, id: i64) -> Result<(), DbErr> {
    Entity::update_many().col_expr(Column::CompletedAt, completed_now()).filter(Column::Id.eq(id)).exec(db).await?;
    Ok(())
}

/// Records that dispatch `id`'s job is on the queue again, waiting for a retry it was
/// scheduled for, so the relay does not take it for lost (its enqueue count, which keys
/// the relay's own enqueue, is left as it is).
pub async fn touch_enqueued<C: ConnectionTrait>(db: &C, id: i64) -> Result<(), DbErr> {
    Entity::update_many()
        .col_expr(Column::EnqueuedAt, Expr::value(super::now()))
        .filter(Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

/// Opens dispatch `id` again for a job put back on the queue by hand: not completed, and
/// enqueued now (so the relay takes it only if that job is lost).
pub async fn reopen<C: ConnectionTrait>(db: &C, id: i64) -> Result<(), DbErr> {
    Entity::update_many()
        .col_expr(Column::CompletedAt, Expr::value(Option::<DateTime<Utc>>::None))
        .col_expr(Column::EnqueuedAt, Expr::value(super::now()))
        .filter(Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

/// `completed_at` as a completion sets it: its first time kept, now otherwise.
fn completed_now() -> sea_orm::sea_query::SimpleExpr {
    use sea_orm::sea_query::Func;
    Func::coalesce([Expr::col(Column::CompletedAt), Expr::value(super::now())]).into()
}

/// Completes the dispatch records of messages `feedback_ids`, which a digest is about to
/// announce: a run of one of them that opens later finds its record completed and no
/// delivery, and folds (`delivery::open_run`), so the message is not also sent on its
/// own, whatever happened to its window since. The relay leaves completed records alone.
pub async fn complete_for_messages<C: ConnectionTrait>(db: &C, feedback_ids: &[i64]) -> Result<(), DbErr> {
    for ids in feedback_ids.chunks(IDS_PER_STATEMENT) {
        Entity::update_many()
            .col_expr(Column::CompletedAt, completed_now())
            .filter(Column::FeedbackId.is_in(ids.iter().copied()))
            .exec(db)
            .await?;
    }
    Ok(())
}

/// Ids in one statement's `IN` list: a flood's window holds more messages than a
/// statement takes parameters (SQLite 32,766, PostgreSQL 65,535).
const IDS_PER_STATEMENT: usize = 1000;

/// Those of messages `feedback_ids` with a dispatch record not completed.
pub async fn outstanding_among<C: ConnectionTrait>(
    db: &C,
    feedback_ids: &[i64],
) -> Result<std::collections::HashSet<i64>, DbErr> {
    use sea_orm::QuerySelect;
    let mut outstanding = std::collections::HashSet::new();
    for ids in feedback_ids.chunks(IDS_PER_STATEMENT) {
        let found: Vec<i64> = Entity::find()
            .select_only()
            .column(Column::FeedbackId)
            .filter(Column::FeedbackId.is_in(ids.iter().copied()))
            .filter(Column::CompletedAt.is_null())
            .into_tuple()
            .all(db)
            .await?;
        outstanding.extend(found);
    }
    Ok(outstanding)
}

/// Whether a dispatch record of message `feedback_id` is completed.
pub async fn any_completed_of_feedback<C: ConnectionTrait>(db: &C, feedback_id: i64) -> Result<bool, DbErr> {
    use sea_orm::PaginatorTrait;
    let completed = Entity::find()
        .filter(Column::FeedbackId.eq(feedback_id))
        .filter(Column::CompletedAt.is_not_null())
        .count(db)
        .await?;
    Ok(completed > 0)
}

/// Dispatches the relay should enqueue now, oldest first, at most `limit`:
/// due and never enqueued (and older than `grace`, leaving the web time to enqueue it
/// itself), or enqueued before `stuck_before` and still not completed (the job was lost).
pub async fn due_for_relay<C: ConnectionTrait>(
    db: &C,
    grace: chrono::Duration,
    stuck_before: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<dispatch::Model>, DbErr> {
    let now = super::now();
    Entity::find()
        .filter(Column::CompletedAt.is_null())
        .filter(Column::DueAt.lte(now))
        .filter(
            Condition::any()
                .add(Condition::all().add(Column::EnqueuedAt.is_null()).add(Column::CreatedAt.lte(now - grace)))
                .add(
                    Condition::all()
                        .add(Column::EnqueuedAt.is_null())
                        .add(Expr::col(Column::DueAt).gt(Expr::col(Column::CreatedAt))),
                )
                .add(Column::EnqueuedAt.lt(stuck_before)),
        )
        .order_by_asc(Column::DueAt)
        .limit(limit)
        .all(db)
        .await
}

/// Outstanding (not completed) dispatches: the backlog not yet announced.
pub async fn outstanding<C: ConnectionTrait>(db: &C) -> Result<u64, DbErr> {
    use sea_orm::PaginatorTrait;
    Entity::find().filter(Column::CompletedAt.is_null()).count(db).await
}

/// Deletes dispatch records completed before `cutoff`, at most `batch` per statement,
/// oldest first; returns how many went.
///
/// Only completed records go: an outstanding one is work still owed. A job still queued
/// for a deleted record is harmless: its run finds every delivery settled and its
/// completion updates nothing. (One exception, after an outage longer than the
/// records are kept: a message a digest announced, whose own run is still queued, loses
/// the completed record that makes that run fold, and may go out alone as well.) The
/// deliveries stay: they are what keeps a message from reaching a device twice.
pub async fn delete_completed_before<C: ConnectionTrait>(
    db: &C,
    cutoff: DateTime<Utc>,
    batch: u64,
) -> Result<u64, DbErr> {
    use sea_orm::sea_query::Query;
    let mut deleted = 0;
    loop {
        let oldest = Query::select()
            .column(Column::Id)
            .from(Entity)
            .and_where(Expr::col(Column::CompletedAt).lt(cutoff))
            .order_by(Column::Id, sea_orm::Order::Asc)
            .limit(batch)
            .to_owned();
        let gone = Entity::delete_many().filter(Column::Id.in_subquery(oldest)).exec(db).await?.rows_affected;
        deleted += gone;
        if gone < batch {
            return Ok(deleted);
        }
    }
}
