//! `dispatches`: the transactional outbox between the database and the Redis queue.
//!
//! A dispatch is written in the same transaction as the feedback it announces, so a
//! committed feedback always has one. The web enqueues the job after commit and sets
//! `enqueued_at` (unless the job has completed the record by then); the worker's relay
//! enqueues whatever is due and was never enqueued (Redis was down) or was enqueued long
//! ago and never completed (the job was lost).
//! Retries of individual deliveries are scheduled as new dispatches with a later `due_at`.

use sea_orm::entity::prelude::*;

/// One job to hand to the queue.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "dispatches")]
pub struct Model {
    /// Primary key, carried in the job payload.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The feedback message to fan out.
    pub feedback_id: i64,
    /// When the record was written.
    pub created_at: DateTimeUtc,
    /// Not to be enqueued before this time (retries are scheduled this way).
    pub due_at: DateTimeUtc,
    /// When it was last marked handed to Redis; `None` until then. A record its job
    /// completed before the mark is not marked (nothing enqueues it again).
    pub enqueued_at: Option<DateTimeUtc>,
    /// How many times it was marked handed to Redis (part of the job's idempotency key).
    pub enqueue_count: i32,
    /// When a job for it finished; `None` while outstanding.
    pub completed_at: Option<DateTimeUtc>,
    /// The request that created it (its `X-Request-Id`), carried by its jobs.
    pub request_id: Option<String>,
}

/// Relations (none navigated through the ORM).
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
