//! A browser's push subscription, as `PushSubscription.toJSON()` produces it.

use base64::Engine;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};

use super::field_errors::FieldErrors;
use super::push_endpoint::{PushEndpoint, PushHostPolicy};

/// The browser's ECDH public key: an uncompressed P-256 point (65 bytes), base64url.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct P256dhKey(String);

/// The browser's authentication secret: 16 bytes, base64url.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSecret(String);

/// Why a key is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Missing.
    #[error("is required")]
    Empty,
    /// Not base64url.
    #[error("is not base64url")]
    NotBase64,
    /// Decodes to the wrong number of bytes.
    #[error("must decode to {expected} bytes, got {found}")]
    WrongLength {
        /// Bytes required.
        expected: usize,
        /// Bytes found.
        found: usize,
    },
    /// 65 bytes, but not a point on the P-256 curve.
    #[error("is not an uncompressed P-256 public key")]
    NotAPoint,
}

fn decode(raw: &str) -> Result<Vec<u8>, KeyError> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(KeyError::Empty);
    }
    // Browsers send unpadded base64url; accept padding too, as some libraries add it.
    URL_SAFE_NO_PAD.decode(raw).or_else(|_| URL_SAFE.decode(raw)).map_err(|_| KeyError::NotBase64)
}

fn exact_len(bytes: &[u8], expected: usize) -> Result<(), KeyError> {
    if bytes.len() == expected { Ok(()) } else { Err(KeyError::WrongLength { expected, found: bytes.len() }) }
}

impl P256dhKey {
    /// Checks that `raw` is base64url of an uncompressed point on P-256.
    pub fn parse(raw: &str) -> Result<Self, KeyError> {
        let bytes = decode(raw)?;
        exact_len(&bytes, 65)?;
        p256::PublicKey::from_sec1_bytes(&bytes).map_err(|_| KeyError::NotAPoint)?;
        if bytes[0] != 0x04 {
            return Err(KeyError::NotAPoint);
        }
        Ok(Self(URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// The key, base64url without padding.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AuthSecret {
    /// Checks that `raw` is base64url of 16 bytes.
    pub fn parse(raw: &str) -> Result<Self, KeyError> {
        let bytes = decode(raw)?;
        exact_len(&bytes, 16)?;
        Ok(Self(URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// The secret, base64url without padding.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A subscription ready to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSubscription {
    /// Where to POST pushes.
    pub endpoint: PushEndpoint,
    /// The browser's public key.
    pub p256dh: P256dhKey,
    /// The browser's auth secret.
    pub auth: AuthSecret,
}

impl NewSubscription {
    /// Checks all fields, reporting every problem keyed as `endpoint`, `keys.p256dh`, `keys.auth`.
    pub fn parse(endpoint: &str, p256dh: &str, auth: &str, policy: &PushHostPolicy) -> Result<Self, FieldErrors> {
        let mut errors = FieldErrors::default();
        let endpoint = errors.check("endpoint", PushEndpoint::parse(endpoint, policy));
        let p256dh = errors.check("keys.p256dh", P256dhKey::parse(p256dh));
        let auth = errors.check("keys.auth", AuthSecret::parse(auth));
        match (endpoint, p256dh, auth) {
            (Some(endpoint), Some(p256dh), Some(auth)) => Ok(Self { endpoint, p256dh, auth }),
            _ => Err(errors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real browser key (from the Web Push test vectors of RFC 8291).
    const P256DH: &str = "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";

    #[test]
    fn browser_keys_are_accepted() {
        assert!(P256dhKey::parse(P256DH).is_ok());
        assert!(AuthSecret::parse(AUTH).is_ok());
    }

    #[test]
    fn wrong_lengths_and_non_points_are_refused() {
        assert_eq!(AuthSecret::parse("AAAA"), Err(KeyError::WrongLength { expected: 16, found: 3 }));
        let not_a_point = URL_SAFE_NO_PAD.encode([4u8; 65]);
        assert_eq!(P256dhKey::parse(&not_a_point), Err(KeyError::NotAPoint));
        assert_eq!(P256dhKey::parse("!!!"), Err(KeyError::NotBase64));
    }

    #[test]
    fn all_subscription_errors_are_reported_by_field() {
        let errors =
            NewSubscription::parse("http://evil.example/", "x", "", &PushHostPolicy::default()).expect_err("invalid");
        assert_eq!(errors.get("endpoint"), ["must use https"]);
        assert_eq!(errors.get("keys.p256dh"), ["is not base64url"]);
        assert_eq!(errors.get("keys.auth"), ["is required"]);
    }
}
