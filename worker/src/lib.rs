//! The Tidings worker: consumes jobs from Redis, sends Web Pushes, runs periodic work.
//!
//! - [`context`]: what every job gets (database, push sender, settings, queue producer).
//! - [`jobs`]: one module per job (fan-out, digest, test push, relay, trim) and how jobs fail.
//! - [`immediate`]: the in-process mode tests use: jobs run in the caller, without Redis.
//! - [`push`]: the Web Push sender (VAPID, aes128gcm, outcome classification).
//! - [`queue`]: apalis wiring: polling, wake-up on push, graceful shutdown, periodic ticks.
//! - [`app`]: the worker process: builds everything and runs until stopped.
//! - [`cli`]: the command line (`run`, `status`, `dead …`).
//! - [`status`]: `worker status`, what an operator checks first.
//! - [`ops`]: `worker dead list|retry|discard` and `worker jobs list|cancel`.

pub mod app;
pub mod cli;
pub mod context;
pub mod encrypt;
pub mod immediate;
pub mod jobs;
pub mod ops;
pub mod push;
pub mod queue;
pub mod runs;
pub mod status;
