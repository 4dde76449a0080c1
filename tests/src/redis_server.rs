//! A private `redis-server` a test can stop and restart, for outage tests.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

/// A Redis server on its own port, killed when dropped.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `redis-server` on a free port and waits until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut server = Self { port, child: None };
        server.restart().await?;
        Ok(server)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (like a crash: nothing is saved).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (`SIGSTOP`): connections stay open and commands are taken in
    /// but not answered, as when Redis hangs. It runs again (`SIGCONT`) when the guard is
    /// resumed or dropped, so a test that fails meanwhile does not leave it frozen.
    pub fn pause(&self) -> Paused<'_> {
        assert!(self.signal("-STOP"), "kill -STOP failed");
        Paused { server: self }
    }

    fn signal(&self, signal: &str) -> bool {
        let Some(child) = self.child.as_ref() else { return false };
        let status = Command::new("kill").args([signal, &child.id().to_string()]).status();
        status.is_ok_and(|s| s.success())
    }

    /// Starts the server again on the same port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (is it installed?)")?;
        self.child = Some(child);
        for _ in 0..100 {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("redis-server on port {} did not answer", self.port)
    }
}

/// A paused [`RedisServer`]; it runs again when this is resumed or dropped.
pub struct Paused<'a> {
    server: &'a RedisServer,
}

impl Paused<'_> {
    /// Lets the server run again: it answers what it was sent meanwhile.
    pub fn resume(self) {}
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.server.signal("-CONT");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
