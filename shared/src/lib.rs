//! Code shared by the `web` and `worker` binaries.
//!
//! - [`domain`]: validated domain types (parse, don't validate).
//! - [`entities`]: sea-orm entities, one file per table.
//! - [`queries`]: database queries, generic over `ConnectionTrait` so they run inside a
//!   transaction or on a pool, from either binary.
//! - [`jobs`]: job payloads put on the Redis queue.
//! - [`lock`]: Redis locks that expire when their owner dies.
//! - [`job_stats`]: per-minute job figures for the admin's Queues page.
//! - [`metrics`]: the Prometheus registry both binaries serve at `/metrics`.
//! - [`queue`]: the producer side of the Redis queue (enqueue + wake the workers).
//! - [`redis_usage`]: what Redis holds, by kind of data (for `worker status`).
//! - [`settings`]: configuration read from the environment.
//! - [`telemetry`]: tracing set-up.
//! - [`budget`]: budgets of sessions, login counters and idempotency keys in Redis.
//! - [`cache`]: the admin's read cache in Redis (versioned, invalidated by id, trimmed to a budget).
//! - [`db`]: database connections.
//! - [`worker_health`]: what worker processes report about themselves in Redis.

pub mod batch;
pub mod budget;
pub mod cache;
pub mod db;
pub mod domain;
pub mod entities;
pub mod job_stats;
pub mod jobs;
pub mod lock;
pub mod metrics;
pub mod queries;
pub mod queue;
pub mod redis_usage;
pub mod runtime;
pub mod settings;
pub mod telemetry;
pub mod worker_health;
