//! The subcommands that don't serve: `admin create` and `vapid generate`.

use std::io::BufRead;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use shared::domain::{EmailAddress, Password};

/// Prints a new VAPID key pair as `.env` lines: the raw private scalar and the
/// uncompressed public point, both base64url (the format browsers and pywebpush use).
pub fn vapid_generate() {
    let (private, public) = new_vapid_keys();
    println!("VAPID_PRIVATE_KEY={private}");
    println!("VAPID_PUBLIC_KEY={public}");
}

/// A new VAPID key pair: (private, public), base64url.
pub fn new_vapid_keys() -> (String, String) {
    let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let public = secret.public_key().to_encoded_point(false);
    (URL_SAFE_NO_PAD.encode(secret.to_bytes()), URL_SAFE_NO_PAD.encode(public.as_bytes()))
}

/// Creates the admin `email` (or resets their password) with a password read from stdin.
pub async fn admin_create(email: &str) -> anyhow::Result<()> {
    let email = EmailAddress::parse(email).map_err(|e| anyhow::anyhow!("--email {e}"))?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("reading the password from standard input")?;
    let password =
        Password::parse(line.trim_end_matches(['\r', '\n'])).map_err(|e| anyhow::anyhow!("the password {e}"))?;
    let settings = shared::settings::Settings::from_env()?;
    let db = shared::db::connect(&settings.database_url).await?;
    let hash = crate::auth::password::hash(password).await?;
    let id = shared::queries::admin::upsert(&db, &email, &hash).await?;
    println!("admin {id} ready: {}", email.normalized());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_browser_sizes() {
        let (private, public) = new_vapid_keys();
        assert_eq!(URL_SAFE_NO_PAD.decode(private).expect("b64").len(), 32);
        let public = URL_SAFE_NO_PAD.decode(public).expect("b64");
        assert_eq!(public.len(), 65);
        assert_eq!(public[0], 4);
    }
}
