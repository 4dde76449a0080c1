//! Indexes for the admin's reads at scale: messages by arrival time (the per-day counts,
//! a burst's digest) and the unread ones (the unread count walks only those).

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m0003_inbox_indexes"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("CREATE INDEX feedback_messages_created_at ON feedback_messages (created_at)").await?;
        // Partial: as messages are read the index shrinks, and counting unread ones reads
        // nothing else. Both SQLite and PostgreSQL support it.
        db.execute_unprepared("CREATE INDEX feedback_messages_unread ON feedback_messages (id) WHERE read_at IS NULL")
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("DROP INDEX feedback_messages_unread").await?;
        db.execute_unprepared("DROP INDEX feedback_messages_created_at").await?;
        Ok(())
    }
}
