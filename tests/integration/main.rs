//! Integration tests: the real web and worker in-process, real PostgreSQL / SQLite and
//! Redis, and the local push-service stand-in. One module per feature.

mod admin;
mod api;
mod browser;
mod cache;
mod feedback_form;
mod fleet;
mod immediate;
mod intake;
mod jobs;
mod locks;
mod measure;
mod metrics;
mod notifications;
mod outages;
mod pipeline;
mod push_failures;
mod pwa;
mod queues;
mod retries;
mod runs;
