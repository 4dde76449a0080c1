//! Validated domain types: each can only be built through a `parse` that checks it, so a
//! value of one of these types is valid wherever it travels (parse, don't validate).

mod email;
mod feedback;
mod field_errors;
mod notification;
mod password;
mod push_endpoint;
mod subscription;

pub use email::EmailAddress;
pub use feedback::{FeedbackContent, NewFeedback, SubmitterName};
pub use field_errors::FieldErrors;
pub use notification::Notification;
pub use password::Password;
pub use push_endpoint::{PushEndpoint, PushHostPolicy, PushHostPolicyError};
pub use subscription::{AuthSecret, NewSubscription, P256dhKey};
