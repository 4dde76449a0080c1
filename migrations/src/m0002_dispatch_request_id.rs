//! Dispatch records remember the request that created them, so a job the relay enqueues
//! later (Redis was down at submit) still carries that request's id in its logs.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::string_len_null;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m0002_dispatch_request_id"
    }
}

#[derive(DeriveIden)]
enum Dispatches {
    Table,
    RequestId,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Dispatches::Table)
                    .add_column(string_len_null(Dispatches::RequestId, 128))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.alter_table(Table::alter().table(Dispatches::Table).drop_column(Dispatches::RequestId).to_owned()).await
    }
}
