//! Feedback messages.

use sea_orm::{ActiveModelTrait, ConnectionTrait, DbErr, EntityTrait, Set, TransactionSession, TransactionTrait};

use crate::domain::NewFeedback;
use crate::entities::{dispatch, feedback_message};

/// Ids written by [`insert_with_dispatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    /// The new feedback message.
    pub feedback_id: i64,
    /// Its dispatch record (the job to enqueue after commit).
    pub dispatch_id: i64,
}

/// Stores `feedback` and its dispatch record in one transaction.
///
/// When this returns `Ok`, both rows are committed: the visitor's message is durable and
/// will be announced even if enqueueing fails afterwards (the relay picks it up).
pub async fn insert_with_dispatch<C>(db: &C, feedback: &NewFeedback) -> Result<Submitted, DbErr>
where
    C: TransactionTrait + ConnectionTrait,
{
    insert_for_request(db, feedback, None).await
}

/// As [`insert_with_dispatch`], recording the submitting request's id on the dispatch so
/// the job carries it even when the relay enqueues it later.
///
/// On PostgreSQL both rows are written by one statement (one round trip, atomic on its
/// own); elsewhere in a transaction.
pub async fn insert_for_request<C>(db: &C, feedback: &NewFeedback, request_id: Option<&str>) -> Result<Submitted, DbErr>
where
    C: TransactionTrait + ConnectionTrait,
{
    if db.get_database_backend() == sea_orm::DbBackend::Postgres {
        return insert_in_one_statement(db, feedback, request_id).await;
    }
    let txn = db.begin().await?;
    let submitted = insert_with_dispatch_in(&txn, feedback, request_id).await?;
    txn.commit().await?;
    Ok(submitted)
}

/// Stores many submissions, each `(feedback, request id)` with its dispatch record, and
/// returns their ids in the same order. Each submission is atomic as with
/// [`insert_for_request`]; all of them commit together or not at all.
///
/// On PostgreSQL this is one statement (the rows travel as one JSON array); elsewhere a
/// transaction of two inserts per submission.
pub async fn insert_many_for_requests<C>(
    db: &C,
    submissions: &[(&NewFeedback, Option<&str>)],
) -> Result<Vec<Submitted>, DbErr>
where
    C: TransactionTrait + ConnectionTrait,
{
    use sea_orm::{DbBackend, Statement};
    if submissions.is_empty() {
        return Ok(Vec::new());
    }
    if let [(feedback, request_id)] = submissions {
        // Alone: the single statement, whose plan the server keeps.
        return Ok(vec![insert_for_request(db, feedback, *request_id).await?]);
    }
    if db.get_database_backend() != DbBackend::Postgres {
        let txn = db.begin().await?;
        let mut submitted = Vec::with_capacity(submissions.len());
        for (feedback, request_id) in submissions {
            submitted.push(insert_with_dispatch_in(&txn, feedback, *request_id).await?);
        }
        txn.commit().await?;
        return Ok(submitted);
    }
    // The ids are drawn first, one per row in its place (`o`), so each answer is matched
    // to its submission without relying on the order rows come back in.
    const SQL: &str = "WITH input AS (\
         SELECT * FROM json_to_recordset($1::json) AS t(o int, n text, e text, c text, r text)), \
         ids AS (SELECT o, nextval(pg_get_serial_sequence('feedback_messages', 'id')) AS id FROM input), \
         message AS (\
         INSERT INTO feedback_messages (id, submitter_name, submitter_email, content, created_at) \
         SELECT ids.id, input.n, input.e, input.c, $2 FROM input JOIN ids USING (o) RETURNING id), \
         dispatch AS (\
         INSERT INTO dispatches (feedback_id, created_at, due_at, enqueue_count, request_id) \
         SELECT m.id, $2, $2, 0, input.r FROM message m JOIN ids ON ids.id = m.id JOIN input USING (o) \
         RETURNING id, feedback_id) \
         SELECT ids.o, d.feedback_id, d.id FROM dispatch d JOIN ids ON ids.id = d.feedback_id";
    let rows: Vec<serde_json::Value> = submissions
        .iter()
        .enumerate()
        .map(|(o, (feedback, request_id))| {
            serde_json::json!({
                "o": o,
                "n": feedback.submitter_name.as_str(),
                "e": feedback.submitter_email.as_str(),
                "c": feedback.content.as_str(),
                "r": request_id,
            })
        })
        .collect();
    let values: [sea_orm::Value; 2] = [serde_json::Value::Array(rows).to_string().into(), super::now().into()];
    let answers = db.query_all_raw(Statement::from_sql_and_values(DbBackend::Postgres, SQL, values)).await?;
    let mut submitted = vec![None; submissions.len()];
    for row in answers {
        let o: i32 = row.try_get("", "o")?;
        let slot = usize::try_from(o).ok().and_then(|o| submitted.get_mut(o));
        if let Some(slot) = slot {
            *slot =
                Some(Submitted { feedback_id: row.try_get("", "feedback_id")?, dispatch_id: row.try_get("", "id")? });
        }
    }
    submitted.into_iter().collect::<Option<Vec<_>>>().ok_or(DbErr::RecordNotInserted)
}

/// [`insert_for_request`] on PostgreSQL: the message and its dispatch record in one
/// statement, a data-modifying `WITH`.
async fn insert_in_one_statement<C: ConnectionTrait>(
    db: &C,
    feedback: &NewFeedback,
    request_id: Option<&str>,
) -> Result<Submitted, DbErr> {
    use sea_orm::{DbBackend, Statement};
    const SQL: &str = "WITH message AS (\
         INSERT INTO feedback_messages (submitter_name, submitter_email, content, created_at) \
         VALUES ($1, $2, $3, $4) RETURNING id) \
         INSERT INTO dispatches (feedback_id, created_at, due_at, enqueue_count, request_id) \
         SELECT id, $4, $4, 0, $5 FROM message RETURNING id, feedback_id";
    let now = super::now();
    let values: [sea_orm::Value; 5] = [
        feedback.submitter_name.as_str().into(),
        feedback.submitter_email.as_str().into(),
        feedback.content.as_str().into(),
        now.into(),
        request_id.map(str::to_owned).into(),
    ];
    let row = db
        .query_one_raw(Statement::from_sql_and_values(DbBackend::Postgres, SQL, values))
        .await?
        .ok_or_else(|| DbErr::RecordNotInserted)?;
    Ok(Submitted { feedback_id: row.try_get("", "feedback_id")?, dispatch_id: row.try_get("", "id")? })
}

/// The inserts of [`insert_with_dispatch`], on a caller's connection or transaction.
pub async fn insert_with_dispatch_in<C>(
    db: &C,
    feedback: &NewFeedback,
    request_id: Option<&str>,
) -> Result<Submitted, DbErr>
where
    C: ConnectionTrait,
{
    let now = super::now();
    let message = feedback_message::ActiveModel {
        submitter_name: Set(feedback.submitter_name.as_str().to_owned()),
        submitter_email: Set(feedback.submitter_email.as_str().to_owned()),
        content: Set(feedback.content.as_str().to_owned()),
        created_at: Set(now),
        read_at: Set(None),
        handled_at: Set(None),
        ..Default::default()
    }
    .insert(db)
    .await?;
    let dispatch_id = super::dispatch::create_for_request(db, message.id, now, request_id).await?;
    Ok(Submitted { feedback_id: message.id, dispatch_id })
}

/// The feedback message `id`, if it exists.
pub async fn find<C: ConnectionTrait>(db: &C, id: i64) -> Result<Option<feedback_message::Model>, DbErr> {
    feedback_message::Entity::find_by_id(id).one(db).await
}

/// One page of the inbox, newest first: `per_page` messages after skipping `page` pages.
pub async fn page<C: ConnectionTrait>(db: &C, page: u64, per_page: u64) -> Result<Vec<feedback_message::Model>, DbErr> {
    use sea_orm::{QueryOrder, QuerySelect};
    feedback_message::Entity::find()
        .order_by_desc(feedback_message::Column::Id)
        .offset(page.saturating_mul(per_page))
        .limit(per_page)
        .all(db)
        .await
}

/// Where an inbox page starts (keyset pagination on the primary key: a deep page costs
/// the same as the first, unlike OFFSET).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFrom {
    /// The newest messages.
    Newest,
    /// Messages older than this id.
    Before(i64),
    /// Messages newer than this id (the page before, going back).
    After(i64),
}

/// Up to `limit` messages from `from`, newest first.
pub async fn keyset_page<C: ConnectionTrait>(
    db: &C,
    from: PageFrom,
    limit: u64,
) -> Result<Vec<feedback_message::Model>, DbErr> {
    use sea_orm::{ColumnTrait, QueryFilter, QueryOrder, QuerySelect};
    let id = feedback_message::Column::Id;
    let query = feedback_message::Entity::find();
    let mut rows = match from {
        PageFrom::Newest => query.order_by_desc(id).limit(limit).all(db).await?,
        PageFrom::Before(before) => query.filter(id.lt(before)).order_by_desc(id).limit(limit).all(db).await?,
        PageFrom::After(after) => {
            let mut rows = query.filter(id.gt(after)).order_by_asc(id).limit(limit).all(db).await?;
            rows.reverse();
            rows
        }
    };
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    Ok(rows)
}

/// Whether any message is older than `oldest` / newer than `newest`: one id each, read
/// from the primary key's index (ordered, so the planner never scans the table for a
/// row that is not there).
pub async fn has_older_newer<C: ConnectionTrait>(db: &C, oldest: i64, newest: i64) -> Result<(bool, bool), DbErr> {
    use sea_orm::{ColumnTrait, QueryFilter, QueryOrder, QuerySelect};
    let id = feedback_message::Column::Id;
    let probe = || feedback_message::Entity::find().select_only().column(id).limit(1);
    let older = probe().filter(id.lt(oldest)).order_by_desc(id).into_tuple::<i64>().one(db).await?.is_some();
    let newer = probe().filter(id.gt(newest)).order_by_asc(id).into_tuple::<i64>().one(db).await?.is_some();
    Ok((older, newer))
}

/// Counts unread feedback messages (on the partial index of unread messages).
pub async fn count_unread<C: ConnectionTrait>(db: &C) -> Result<u64, DbErr> {
    use sea_orm::{ColumnTrait, PaginatorTrait, QueryFilter};
    feedback_message::Entity::find().filter(feedback_message::Column::ReadAt.is_null()).count(db).await
}

/// The inbox's figures: all messages, unread ones, and arrivals per day.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InboxCounts {
    /// All messages.
    pub total: u64,
    /// Messages never opened.
    pub unread: u64,
    /// Messages per UTC day over the last days, oldest first (days without any left out).
    pub per_day: Vec<DayCount>,
}

/// Messages that arrived on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DayCount {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// Messages that arrived that day.
    pub count: u64,
}

/// Counts the inbox: three queries, each on an index (the primary key, the partial index
/// of unread messages, the arrival-time index for the last `days` days).
pub async fn counts<C: ConnectionTrait>(db: &C, days: u32) -> Result<InboxCounts, DbErr> {
    use sea_orm::{DbBackend, Statement};
    let total = count(db).await?;
    let unread = count_unread(db).await?;
    let today = super::now().date_naive();
    let since = today - chrono::Days::new(u64::from(days.saturating_sub(1)));
    let since = since.and_hms_opt(0, 0, 0).map(|t| t.and_utc()).unwrap_or_else(super::now);
    let backend = db.get_database_backend();
    let day = match backend {
        DbBackend::Postgres => "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        // Stored as RFC 3339 text in UTC: the date is its first ten characters.
        _ => "substr(created_at, 1, 10)",
    };
    let placeholder = if backend == DbBackend::Postgres { "$1" } else { "?" };
    let sql = format!(
        "SELECT {day} AS day, COUNT(*) AS n FROM feedback_messages WHERE created_at >= {placeholder} \
         GROUP BY 1 ORDER BY 1"
    );
    let rows = db.query_all_raw(Statement::from_sql_and_values(backend, sql, [since.into()])).await?;
    let per_day = rows
        .iter()
        .map(|row| Ok(DayCount { day: row.try_get("", "day")?, count: row.try_get::<i64>("", "n")?.max(0) as u64 }))
        .collect::<Result<_, DbErr>>()?;
    Ok(InboxCounts { total, unread, per_day })
}

/// Records that an admin opened message `id` (the first time only); true when this was
/// the first time.
pub async fn mark_read<C: ConnectionTrait>(db: &C, id: i64) -> Result<bool, DbErr> {
    use sea_orm::sea_query::Expr;
    use sea_orm::{ColumnTrait, QueryFilter};
    let result = feedback_message::Entity::update_many()
        .col_expr(feedback_message::Column::ReadAt, Expr::value(super::now()))
        .filter(feedback_message::Column::Id.eq(id))
        .filter(feedback_message::Column::ReadAt.is_null())
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}

/// Marks message `id` handled (or not); false when there is no such message.
pub async fn set_handled<C: ConnectionTrait>(db: &C, id: i64, handled: bool) -> Result<bool, DbErr> {
    use sea_orm::sea_query::Expr;
    use sea_orm::{ColumnTrait, QueryFilter};
    let at = if handled { Some(super::now()) } else { None };
    let result = feedback_message::Entity::update_many()
        .col_expr(feedback_message::Column::HandledAt, Expr::value(at))
        .filter(feedback_message::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}

/// Deletes message `id` with its deliveries and dispatch records; false when missing.
pub async fn delete<C: ConnectionTrait>(db: &C, id: i64) -> Result<bool, DbErr> {
    let result = feedback_message::Entity::delete_by_id(id).exec(db).await?;
    Ok(result.rows_affected > 0)
}

/// Counts messages created in `[from, to]`, up to `at_most` (it reads no further).
pub async fn count_created_between<C: ConnectionTrait>(
    db: &C,
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
    at_most: u64,
) -> Result<u64, DbErr> {
    use sea_orm::{ColumnTrait, QueryFilter, QuerySelect};
    let ids: Vec<i64> = feedback_message::Entity::find()
        .select_only()
        .column(feedback_message::Column::Id)
        .filter(feedback_message::Column::CreatedAt.gte(from))
        .filter(feedback_message::Column::CreatedAt.lte(to))
        .limit(at_most)
        .into_tuple()
        .all(db)
        .await?;
    Ok(u64::try_from(ids.len()).unwrap_or(u64::MAX))
}

/// The ids of the messages of the coalescing window `[from, to)` that its digest
/// announces, newest first: those a first run folded or will fold, with no delivery
/// recorded (ids only: a flood's window holds many).
///
/// A message's first run folds it when more than `threshold` messages of its window were
/// created at or before it (`delivery::open_run`). That holds exactly for the messages
/// created at or after the window's `threshold + 1`-th creation time, so the digest finds
/// them whether or not their runs have opened yet; the first `threshold` of the window
/// go out on their own whenever their runs open, before the digest or after it. A
/// deleted message moves that time later, so a message that folded before an earlier one
/// was deleted is found by what its run left instead: a completed dispatch record and
/// no delivery. The digest completes the records of what it announces
/// (`dispatch::complete_for_messages`), so a run that opens after it folds too, however
/// the window changed. A message whose run finished without a delivery left to show for
/// it leaves the same — no subscription then, only subscriptions deleted since (gone, or
/// removed), or its job cancelled — and is counted too: no subscription that exists was
/// sent it.
pub async fn folded_between<C: ConnectionTrait>(
    db: &C,
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
    threshold: u64,
) -> Result<Vec<i64>, DbErr> {
    use sea_orm::sea_query::{Expr, ExprTrait, Query};
    use sea_orm::{ColumnTrait, Condition, QueryFilter, QueryOrder, QuerySelect};

    use crate::entities::delivery;
    let first_folded: Option<chrono::DateTime<chrono::Utc>> = feedback_message::Entity::find()
        .select_only()
        .column(feedback_message::Column::CreatedAt)
        .filter(feedback_message::Column::CreatedAt.gte(from))
        .filter(feedback_message::Column::CreatedAt.lt(to))
        .order_by_asc(feedback_message::Column::CreatedAt)
        .offset(threshold)
        .limit(1)
        .into_tuple()
        .one(db)
        .await?;
    // Both looked up by the message, row by row: the window holds few messages, the
    // tables many rows.
    let this_message = (feedback_message::Entity, feedback_message::Column::Id);
    let delivered = Query::select()
        .expr(Expr::val(1))
        .from(delivery::Entity)
        .and_where(Expr::col((delivery::Entity, delivery::Column::FeedbackId)).equals(this_message))
        .to_owned();
    let run_finished = Query::select()
        .expr(Expr::val(1))
        .from(dispatch::Entity)
        .and_where(Expr::col((dispatch::Entity, dispatch::Column::FeedbackId)).equals(this_message))
        .and_where(Expr::col((dispatch::Entity, dispatch::Column::CompletedAt)).is_not_null())
        .to_owned();
    let mut folds = Condition::any().add(Expr::exists(run_finished));
    if let Some(cutoff) = first_folded {
        folds = folds.add(feedback_message::Column::CreatedAt.gte(cutoff));
    }
    feedback_message::Entity::find()
        .select_only()
        .column(feedback_message::Column::Id)
        .filter(feedback_message::Column::CreatedAt.gte(from))
        .filter(feedback_message::Column::CreatedAt.lt(to))
        .filter(Expr::exists(delivered).not())
        .filter(folds)
        .order_by_desc(feedback_message::Column::Id)
        .into_tuple()
        .all(db)
        .await
}

/// The newest of messages `ids` (given newest first) that still exists: a digest names
/// it.
pub async fn newest_of<C: ConnectionTrait>(db: &C, ids: &[i64]) -> Result<Option<feedback_message::Model>, DbErr> {
    use sea_orm::{ColumnTrait, QueryFilter, QueryOrder};
    // A few candidates in one statement: one deleted since the reading leaves the next.
    for some in ids.chunks(100) {
        let newest = feedback_message::Entity::find()
            .filter(feedback_message::Column::Id.is_in(some.iter().copied()))
            .order_by_desc(feedback_message::Column::Id)
            .one(db)
            .await?;
        if newest.is_some() {
            return Ok(newest);
        }
    }
    Ok(None)
}

/// Counts feedback messages (used by tests and status pages).
pub async fn count<C: ConnectionTrait>(db: &C) -> Result<u64, DbErr> {
    use sea_orm::PaginatorTrait;
    feedback_message::Entity::find().count(db).await
}

/// The dispatch entity, re-exported for callers that inspect the outbox.
pub use dispatch::Entity as DispatchEntity;
