//! Admin accounts.

use sea_orm::{ActiveModelTrait, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, Set};

use crate::domain::EmailAddress;
use crate::entities::admin_user::{self, Column, Entity};

/// Creates an admin, or replaces the password of an existing one; returns the id.
pub async fn upsert<C: ConnectionTrait>(db: &C, email: &EmailAddress, password_hash: &str) -> Result<i64, DbErr> {
    if let Some(existing) = find_by_email(db, email).await? {
        let id = existing.id;
        let mut model: admin_user::ActiveModel = existing.into();
        model.password_hash = Set(password_hash.to_owned());
        model.update(db).await?;
        return Ok(id);
    }
    let model = admin_user::ActiveModel {
        email: Set(email.normalized()),
        password_hash: Set(password_hash.to_owned()),
        created_at: Set(super::now()),
        ..Default::default()
    }
    .insert(db)
    .await?;
    Ok(model.id)
}

/// The admin with this email, if any.
pub async fn find_by_email<C: ConnectionTrait>(
    db: &C,
    email: &EmailAddress,
) -> Result<Option<admin_user::Model>, DbErr> {
    Entity::find().filter(Column::Email.eq(email.normalized())).one(db).await
}

/// The admin `id`, if it still exists.
pub async fn find<C: ConnectionTrait>(db: &C, id: i64) -> Result<Option<admin_user::Model>, DbErr> {
    Entity::find_by_id(id).one(db).await
}
