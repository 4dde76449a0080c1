//! `push_subscriptions`: admin browsers that receive notifications.

use sea_orm::entity::prelude::*;

/// One browser's subscription.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "push_subscriptions")]
pub struct Model {
    /// Primary key; fan-out pages through subscriptions in its order.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Push-service URL, unique: re-subscribing the same browser updates the row.
    #[sea_orm(unique, column_type = "Text")]
    pub endpoint: String,
    /// Browser public key (base64url).
    pub p256dh: String,
    /// Browser auth secret (base64url).
    pub auth: String,
    /// The admin who subscribed this browser; only they can remove it.
    pub admin_user_id: i64,
    /// Browser description shown in the device list (from `User-Agent`).
    pub user_agent: Option<String>,
    /// When the browser subscribed (or last re-subscribed).
    pub created_at: DateTimeUtc,
    /// Last push the push service accepted.
    pub last_success_at: Option<DateTimeUtc>,
    /// Failed deliveries since the last success.
    pub failure_count: i32,
    /// Why the last delivery failed.
    pub last_failure_reason: Option<String>,
}

/// Relations (none navigated through the ORM).
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
