//! Push subscriptions.

use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};

use crate::domain::NewSubscription;
use crate::entities::push_subscription::{self, Column, Entity};

/// Stores `subscription` for admin `owner`; a known endpoint is updated in place (the
/// browser re-subscribed, possibly with new keys or for another admin).
pub async fn upsert<C: ConnectionTrait>(
    db: &C,
    subscription: &NewSubscription,
    owner: i64,
    user_agent: Option<&str>,
) -> Result<(), DbErr> {
    let model = push_subscription::ActiveModel {
        endpoint: Set(subscription.endpoint.as_str().to_owned()),
        p256dh: Set(subscription.p256dh.as_str().to_owned()),
        auth: Set(subscription.auth.as_str().to_owned()),
        admin_user_id: Set(owner),
        user_agent: Set(user_agent.map(|ua| ua.chars().take(200).collect())),
        created_at: Set(super::now()),
        last_success_at: Set(None),
        failure_count: Set(0),
        last_failure_reason: Set(None),
        ..Default::default()
    };
    Entity::insert(model)
        .on_conflict(
            OnConflict::column(Column::Endpoint)
                .update_columns([
                    Column::P256dh,
                    Column::Auth,
                    Column::AdminUserId,
                    Column::UserAgent,
                    Column::FailureCount,
                    Column::LastFailureReason,
                ])
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// Deletes the subscription at `endpoint` if `owner` owns it; true if one was deleted.
pub async fn delete_owned<C: ConnectionTrait>(db: &C, endpoint: &str, owner: i64) -> Result<bool, DbErr> {
    let result = Entity::delete_many()
        .filter(Column::Endpoint.eq(endpoint))
        .filter(Column::AdminUserId.eq(owner))
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}

/// Deletes subscription `id` if `owner` owns it; true if one was deleted.
pub async fn delete_owned_by_id<C: ConnectionTrait>(db: &C, id: i64, owner: i64) -> Result<bool, DbErr> {
    let result = Entity::delete_many().filter(Column::Id.eq(id)).filter(Column::AdminUserId.eq(owner)).exec(db).await?;
    Ok(result.rows_affected > 0)
}

/// Deletes subscription `id` (the push service said it is gone).
pub async fn delete<C: ConnectionTrait>(db: &C, id: i64) -> Result<(), DbErr> {
    Entity::delete_by_id(id).exec(db).await?;
    Ok(())
}

/// Deletes subscriptions that failed and have not taken a push since `cutoff` (nor
/// been created since): a browser whose push service has refused it for that long is
/// not coming back. Returns how many went.
pub async fn delete_failing_since<C: ConnectionTrait>(
    db: &C,
    cutoff: chrono::DateTime<chrono::Utc>,
) -> Result<u64, DbErr> {
    let result = Entity::delete_many()
        .filter(Column::FailureCount.gt(0))
        .filter(Column::CreatedAt.lt(cutoff))
        .filter(Column::LastSuccessAt.is_null().or(Column::LastSuccessAt.lt(cutoff)))
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}

/// Ids of the next `limit` subscriptions after id `after`, in id order (fan-out pages).
pub async fn ids_after<C: ConnectionTrait>(db: &C, after: i64, limit: u64) -> Result<Vec<i64>, DbErr> {
    Entity::find()
        .select_only()
        .column(Column::Id)
        .filter(Column::Id.gt(after))
        .order_by_asc(Column::Id)
        .limit(limit)
        .into_tuple()
        .all(db)
        .await
}

/// The subscriptions with these ids.
pub async fn by_ids<C: ConnectionTrait>(db: &C, ids: &[i64]) -> Result<Vec<push_subscription::Model>, DbErr> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Entity::find().filter(Column::Id.is_in(ids.iter().copied())).all(db).await
}

/// All subscriptions of admin `owner`, newest first.
pub async fn of_owner<C: ConnectionTrait>(db: &C, owner: i64) -> Result<Vec<push_subscription::Model>, DbErr> {
    Entity::find().filter(Column::AdminUserId.eq(owner)).order_by_desc(Column::Id).all(db).await
}

/// Counts subscriptions.
pub async fn count<C: ConnectionTrait>(db: &C) -> Result<u64, DbErr> {
    Entity::find().count(db).await
}

/// How fresh a subscription's `last_success_at` is kept: a success within this long of
/// the recorded one changes nothing. Under a flood of messages every push would otherwise
/// rewrite the same rows — lock contention between concurrent fan-outs and a table
/// bloated with dead row versions — for a figure shown to the minute and used in days.
pub const SUCCESS_RESOLUTION: std::time::Duration = std::time::Duration::from_secs(60);

/// Records an accepted push.
pub async fn record_success<C: ConnectionTrait>(db: &C, id: i64) -> Result<(), DbErr> {
    record_successes(db, &[id]).await
}

/// Records a successful delivery to each of `ids` in one statement; rows already marked
/// successful within [`SUCCESS_RESOLUTION`] and not failing are left alone.
pub async fn record_successes<C: ConnectionTrait>(db: &C, ids: &[i64]) -> Result<(), DbErr> {
    use sea_orm::Condition;
    if ids.is_empty() {
        return Ok(());
    }
    let now = super::now();
    let stale = now - chrono::Duration::from_std(SUCCESS_RESOLUTION).unwrap_or(chrono::Duration::minutes(1));
    Entity::update_many()
        .col_expr(Column::LastSuccessAt, Expr::value(now))
        .col_expr(Column::FailureCount, Expr::value(0))
        .col_expr(Column::LastFailureReason, Expr::value(Option::<String>::None))
        .filter(Column::Id.is_in(ids.iter().copied()))
        .filter(
            Condition::any()
                .add(Column::FailureCount.gt(0))
                .add(Column::LastSuccessAt.is_null())
                .add(Column::LastSuccessAt.lt(stale)),
        )
        .exec(db)
        .await?;
    Ok(())
}

/// Records a failed delivery and its reason.
pub async fn record_failure<C: ConnectionTrait>(db: &C, id: i64, reason: &str) -> Result<(), DbErr> {
    Entity::update_many()
        .col_expr(Column::FailureCount, Expr::col(Column::FailureCount).add(1))
        .col_expr(Column::LastFailureReason, Expr::value(reason.to_owned()))
        .filter(Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}
