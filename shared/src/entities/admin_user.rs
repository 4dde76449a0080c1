//! `admin_users`: people who can log in to the admin area.

use sea_orm::entity::prelude::*;

/// One admin account.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "admin_users")]
pub struct Model {
    /// Primary key.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Login name, unique (domain lower-cased).
    #[sea_orm(unique)]
    pub email: String,
    /// argon2id PHC string; never the password.
    pub password_hash: String,
    /// When the account was made.
    pub created_at: DateTimeUtc,
}

/// Relations (none navigated through the ORM).
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
