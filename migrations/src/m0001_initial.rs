//! The first schema: feedback, admins, subscriptions, deliveries and the dispatch outbox.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, big_pk_auto, integer, string, string_null, string_uniq, text, text_uniq, timestamp_with_time_zone,
    timestamp_with_time_zone_null,
};

/// Creates the initial tables and indexes.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum FeedbackMessages {
    Table,
    Id,
    SubmitterName,
    SubmitterEmail,
    Content,
    CreatedAt,
    ReadAt,
    HandledAt,
}

#[derive(DeriveIden)]
enum AdminUsers {
    Table,
    Id,
    Email,
    PasswordHash,
    CreatedAt,
}

#[derive(DeriveIden)]
enum PushSubscriptions {
    Table,
    Id,
    Endpoint,
    P256dh,
    Auth,
    AdminUserId,
    UserAgent,
    CreatedAt,
    LastSuccessAt,
    FailureCount,
    LastFailureReason,
}

#[derive(DeriveIden)]
enum Deliveries {
    Table,
    FeedbackId,
    SubscriptionId,
    Status,
    Attempts,
    ClaimToken,
    LeaseUntil,
    NextAttemptAt,
    LastError,
    SentAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Dispatches {
    Table,
    Id,
    FeedbackId,
    CreatedAt,
    DueAt,
    EnqueuedAt,
    EnqueueCount,
    CompletedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(FeedbackMessages::Table)
                    .col(big_pk_auto(FeedbackMessages::Id))
                    .col(string(FeedbackMessages::SubmitterName))
                    .col(string(FeedbackMessages::SubmitterEmail))
                    .col(text(FeedbackMessages::Content))
                    .col(timestamp_with_time_zone(FeedbackMessages::CreatedAt))
                    .col(timestamp_with_time_zone_null(FeedbackMessages::ReadAt))
                    .col(timestamp_with_time_zone_null(FeedbackMessages::HandledAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AdminUsers::Table)
                    .col(big_pk_auto(AdminUsers::Id))
                    .col(string_uniq(AdminUsers::Email))
                    .col(string(AdminUsers::PasswordHash))
                    .col(timestamp_with_time_zone(AdminUsers::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(PushSubscriptions::Table)
                    .col(big_pk_auto(PushSubscriptions::Id))
                    .col(text_uniq(PushSubscriptions::Endpoint))
                    .col(string(PushSubscriptions::P256dh))
                    .col(string(PushSubscriptions::Auth))
                    .col(big_integer(PushSubscriptions::AdminUserId))
                    .col(string_null(PushSubscriptions::UserAgent))
                    .col(timestamp_with_time_zone(PushSubscriptions::CreatedAt))
                    .col(timestamp_with_time_zone_null(PushSubscriptions::LastSuccessAt))
                    .col(integer(PushSubscriptions::FailureCount).default(0))
                    .col(string_null(PushSubscriptions::LastFailureReason))
                    .foreign_key(
                        ForeignKey::create()
                            .from(PushSubscriptions::Table, PushSubscriptions::AdminUserId)
                            .to(AdminUsers::Table, AdminUsers::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("push_subscriptions_owner")
                    .table(PushSubscriptions::Table)
                    .col(PushSubscriptions::AdminUserId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Deliveries::Table)
                    .col(big_integer(Deliveries::FeedbackId))
                    .col(big_integer(Deliveries::SubscriptionId))
                    .col(string(Deliveries::Status))
                    .col(integer(Deliveries::Attempts))
                    .col(string_null(Deliveries::ClaimToken))
                    .col(timestamp_with_time_zone_null(Deliveries::LeaseUntil))
                    .col(timestamp_with_time_zone_null(Deliveries::NextAttemptAt))
                    .col(string_null(Deliveries::LastError))
                    .col(timestamp_with_time_zone_null(Deliveries::SentAt))
                    .col(timestamp_with_time_zone(Deliveries::UpdatedAt))
                    .primary_key(Index::create().col(Deliveries::FeedbackId).col(Deliveries::SubscriptionId))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Deliveries::Table, Deliveries::FeedbackId)
                            .to(FeedbackMessages::Table, FeedbackMessages::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(Deliveries::Table, Deliveries::SubscriptionId)
                            .to(PushSubscriptions::Table, PushSubscriptions::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        // Deleting a subscription cascades to its deliveries: index the child key.
        manager
            .create_index(
                Index::create()
                    .name("deliveries_subscription")
                    .table(Deliveries::Table)
                    .col(Deliveries::SubscriptionId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Dispatches::Table)
                    .col(big_pk_auto(Dispatches::Id))
                    .col(big_integer(Dispatches::FeedbackId))
                    .col(timestamp_with_time_zone(Dispatches::CreatedAt))
                    .col(timestamp_with_time_zone(Dispatches::DueAt))
                    .col(timestamp_with_time_zone_null(Dispatches::EnqueuedAt))
                    .col(integer(Dispatches::EnqueueCount).default(0))
                    .col(timestamp_with_time_zone_null(Dispatches::CompletedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Dispatches::Table, Dispatches::FeedbackId)
                            .to(FeedbackMessages::Table, FeedbackMessages::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("dispatches_feedback")
                    .table(Dispatches::Table)
                    .col(Dispatches::FeedbackId)
                    .to_owned(),
            )
            .await?;
        // The relay only ever reads outstanding dispatches: a partial index keeps its scan
        // proportional to the backlog, not to history (same syntax on both backends).
        manager
            .get_connection()
            .execute_unprepared("CREATE INDEX dispatches_outstanding ON dispatches (due_at) WHERE completed_at IS NULL")
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Dispatches::Table.into_iden(),
            Deliveries::Table.into_iden(),
            PushSubscriptions::Table.into_iden(),
            AdminUsers::Table.into_iden(),
            FeedbackMessages::Table.into_iden(),
        ] {
            manager.drop_table(Table::drop().table(table).to_owned()).await?;
        }
        Ok(())
    }
}
