//! Test support for Tidings: the local push-service stand-in and the test harness.

pub mod harness;
pub mod push_service;
pub mod redis_server;
