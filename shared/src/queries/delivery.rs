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

/// All deliveries of `feedback_id` (tests and the admin detail page).
pub async fn of_feedback<C: ConnectionTrait>(db: &C, feedback_id: i64) -> Result<Vec<delivery::Model>, DbErr> {
    Entity::find().filter(Column::FeedbackId.eq(feedback_id)).all(db).await
}
