//! `feedback_messages`: what visitors submitted.

use sea_orm::entity::prelude::*;

/// One feedback message.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "feedback_messages")]
pub struct Model {
    /// Primary key; increases with time, so it also orders the inbox.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Who wrote it (validated `SubmitterName`).
    pub submitter_name: String,
    /// Their email address (validated `EmailAddress`).
    pub submitter_email: String,
    /// The message (validated `FeedbackContent`).
    #[sea_orm(column_type = "Text")]
    pub content: String,
    /// When it was submitted.
    pub created_at: DateTimeUtc,
    /// When an admin first opened it; `None` while unread.
    pub read_at: Option<DateTimeUtc>,
    /// When an admin marked it handled.
    pub handled_at: Option<DateTimeUtc>,
}

/// Relations (none navigated through the ORM).
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
