//! `deliveries`: one row per (feedback message, subscription) once a push is attempted.
//!
//! This table is what makes fan-out idempotent: a worker *claims* a row before sending
//! (insert-if-absent, or a conditional update of a due retry or an expired lease) and
//! only the claimant sends, so a re-run job, a retry or a second worker never sends to a
//! subscription that already got the message.

use sea_orm::entity::prelude::*;

/// Claimed: a push is in flight until `lease_until`.
pub const SENDING: &str = "sending";
/// The push service accepted the push.
pub const SENT: &str = "sent";
/// Failed in a way that may succeed later; due again at `next_attempt_at`.
pub const RETRY: &str = "retry";
/// Given up: permanent error or attempts exhausted; `last_error` says why.
pub const FAILED: &str = "failed";

/// The delivery of one message to one subscription.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "deliveries")]
pub struct Model {
    /// The message delivered.
    #[sea_orm(primary_key, auto_increment = false)]
    pub feedback_id: i64,
    /// The subscription delivered to.
    #[sea_orm(primary_key, auto_increment = false)]
    pub subscription_id: i64,
    /// One of [`SENDING`], [`SENT`], [`RETRY`], [`FAILED`].
    pub status: String,
    /// Attempts made so far (including the one in flight).
    pub attempts: i32,
    /// Identifies the job run holding the claim while `status` is [`SENDING`].
    pub claim_token: Option<String>,
    /// A claim not finished by then is considered crashed and may be taken over.
    pub lease_until: Option<DateTimeUtc>,
    /// When a [`RETRY`] is due.
    pub next_attempt_at: Option<DateTimeUtc>,
    /// The last failure's reason (status code and short text; never the endpoint).
    pub last_error: Option<String>,
    /// When the push service accepted the push.
    pub sent_at: Option<DateTimeUtc>,
    /// Last change.
    pub updated_at: DateTimeUtc,
}

/// Relations (none navigated through the ORM).
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
