//! The database schema, as sea-orm migrations that run the same on SQLite and PostgreSQL.
//!
//! Run them with the `migrations` command (`migrations up|down|status`) or, in tests and
//! the first-run script, through [`Migrator`] directly.

pub use sea_orm_migration::MigratorTrait;
use sea_orm_migration::prelude::*;

mod m0001_initial;
mod m0002_dispatch_request_id;
mod m0003_inbox_indexes;

/// Every migration, oldest first.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m0001_initial::Migration),
            Box::new(m0002_dispatch_request_id::Migration),
            Box::new(m0003_inbox_indexes::Migration),
        ]
    }
}
