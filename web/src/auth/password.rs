//! argon2id password hashing with the OWASP parameters, off the async runtime.
//!
//! Hashing costs ~19 MiB and tens of milliseconds by design, so it runs on the blocking
//! pool behind a semaphore: a burst of logins can't starve request handling or memory.

use std::sync::LazyLock;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use shared::domain::Password;
use tokio::sync::Semaphore;

/// At most this many hashes are computed at once.
static HASHING: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(2));

/// A fixed hash verified when the account doesn't exist, so an unknown email takes as
/// long as a wrong password (no account enumeration by timing).
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| hash_blocking("dummy password for timing").unwrap_or_default());

fn argon2() -> Argon2<'static> {
    // OWASP Password Storage Cheat Sheet: argon2id, m = 19 MiB, t = 2, p = 1.
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

fn hash_blocking(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(argon2().hash_password(password.as_bytes(), &salt)?.to_string())
}

fn verify_blocking(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| argon2().verify_password(password.as_bytes(), &parsed).is_ok())
}

/// Hashes `password` into a PHC string.
pub async fn hash(password: Password) -> anyhow::Result<String> {
    let _permit = HASHING.acquire().await?;
    let hashed = tokio::task::spawn_blocking(move || hash_blocking(password.expose())).await?;
    hashed.map_err(|e| anyhow::anyhow!("hashing the password: {e}"))
}

/// Checks `password` against `hash`; with `None` (no such account) it does the same
/// work against a dummy hash and returns false.
pub async fn verify(password: String, hash: Option<String>) -> anyhow::Result<bool> {
    let _permit = HASHING.acquire().await?;
    let ok = tokio::task::spawn_blocking(move || match hash {
        Some(hash) => verify_blocking(&password, &hash),
        None => {
            verify_blocking(&password, &DUMMY_HASH);
            false
        }
    })
    .await?;
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hash_verifies_its_password_only() {
        let hashed = hash(Password::parse("correct horse battery").expect("valid")).await.expect("hash");
        assert!(hashed.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify("correct horse battery".into(), Some(hashed.clone())).await.expect("verify"));
        assert!(!verify("wrong horse battery".into(), Some(hashed)).await.expect("verify"));
        assert!(!verify("anything at all".into(), None).await.expect("verify"));
    }
}
