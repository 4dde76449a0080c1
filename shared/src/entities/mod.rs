//! sea-orm entities, one module per table. The schema itself is made by the
//! `migrations` crate; these describe it to the ORM.

pub mod admin_user;
pub mod delivery;
pub mod dispatch;
pub mod feedback_message;
pub mod push_subscription;
