//! The `aes128gcm` content encoding of a push message (RFC 8291 on RFC 8188), on `ring`.
//!
//! The same composition as the `ece` crate's, about three times cheaper per message: the
//! fan-out encrypts once per subscription, so this is most of a push's CPU. It stays
//! interoperable: the tests here decrypt with `ece`, and the push-service stand-in of the
//! integration tests decrypts every push with it too.

use ring::rand::{SecureRandom, SystemRandom};
use ring::{aead, agreement, hkdf};

/// Record size announced in the header: one record holds the whole message.
const RECORD_SIZE: u32 = 4096;

/// Largest plaintext one record holds (the record size less the tag and the delimiter).
pub const MAX_PLAINTEXT: usize = RECORD_SIZE as usize - 16 - 1;

/// Why a message could not be encrypted for a subscription.
#[derive(Debug, thiserror::Error)]
pub enum EncryptError {
    /// The subscription's public key is not a P-256 point.
    #[error("the subscription's public key is not a valid P-256 key")]
    BadPublicKey,
    /// The subscription's authentication secret is not 16 bytes.
    #[error("the subscription's authentication secret is not 16 bytes")]
    BadAuthSecret,
    /// The plaintext does not fit in one record.
    #[error("a payload of {0} bytes does not fit in one record")]
    TooLarge(usize),
    /// The system's random number generator or a primitive failed.
    #[error("encryption failed")]
    Crypto,
}

impl From<ring::error::Unspecified> for EncryptError {
    fn from(_: ring::error::Unspecified) -> Self {
        Self::Crypto
    }
}

/// An output length for HKDF-Expand.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn expand<const N: usize>(prk: &hkdf::Prk, info: &[&[u8]]) -> Result<[u8; N], EncryptError> {
    let mut out = [0u8; N];
    prk.expand(info, Len(N))?.fill(&mut out)?;
    Ok(out)
}

/// Encrypts `plaintext` for the user agent with public key `ua_public` (65 bytes,
/// uncompressed) and authentication secret `auth_secret` (16 bytes): the request body,
/// header (salt, record size, sender's public key) and one record.
pub fn aes128gcm(ua_public: &[u8], auth_secret: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, EncryptError> {
    if auth_secret.len() != 16 {
        return Err(EncryptError::BadAuthSecret);
    }
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(EncryptError::TooLarge(plaintext.len()));
    }
    let rng = SystemRandom::new();
    let private = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng)?;
    let as_public = private.compute_public_key()?;
    let peer = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, ua_public);
    let ecdh_secret =
        agreement::agree_ephemeral(private, &peer, |secret| secret.to_vec()).map_err(|_| EncryptError::BadPublicKey)?;

    // RFC 8291 §3.4: the input keying material from the key exchange and the auth secret.
    let prk_key = hkdf::Salt::new(hkdf::HKDF_SHA256, auth_secret).extract(&ecdh_secret);
    let ikm: [u8; 32] = expand(&prk_key, &[b"WebPush: info\0", ua_public, as_public.as_ref()])?;

    // RFC 8188 §2.2–2.3: content encryption key and nonce from a fresh salt.
    let mut salt = [0u8; 16];
    rng.fill(&mut salt)?;
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(&ikm);
    let cek: [u8; 16] = expand(&prk, &[b"Content-Encoding: aes128gcm\0"])?;
    let nonce: [u8; 12] = expand(&prk, &[b"Content-Encoding: nonce\0"])?;

    let key = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_128_GCM, &cek)?);
    let mut record = Vec::with_capacity(plaintext.len() + 1 + aead::AES_128_GCM.tag_len());
    record.extend_from_slice(plaintext);
    // The delimiter of the last (and only) record.
    record.push(2);
    key.seal_in_place_append_tag(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::empty(), &mut record)?;

    let key_id = as_public.as_ref();
    let mut body = Vec::with_capacity(16 + 4 + 1 + key_id.len() + record.len());
    body.extend_from_slice(&salt);
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(u8::try_from(key_id.len()).map_err(|_| EncryptError::Crypto)?);
    body.extend_from_slice(key_id);
    body.extend_from_slice(&record);
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receiver() -> (ece::crypto::EcKeyComponents, [u8; 16]) {
        let (keys, auth) = ece::generate_keypair_and_auth_secret().expect("keys");
        (keys.raw_components().expect("components"), auth)
    }

    #[test]
    fn ece_decrypts_what_it_encrypts() {
        let (keys, auth) = receiver();
        for plaintext in [&b""[..], b"{\"title\":\"New feedback\"}", &[7u8; MAX_PLAINTEXT]] {
            let body = aes128gcm(keys.public_key(), &auth, plaintext).expect("encrypt");
            let decrypted = ece::decrypt(&keys, &auth, &body).expect("ece decrypts it");
            assert_eq!(decrypted, plaintext);
        }
    }

    #[test]
    fn every_message_gets_a_fresh_salt_and_key() {
        let (keys, auth) = receiver();
        let a = aes128gcm(keys.public_key(), &auth, b"same").expect("encrypt");
        let b = aes128gcm(keys.public_key(), &auth, b"same").expect("encrypt");
        assert_ne!(a[..16], b[..16], "salt");
        assert_ne!(a[21..86], b[21..86], "sender key");
        assert_eq!(u32::from_be_bytes([a[16], a[17], a[18], a[19]]), RECORD_SIZE);
        assert_eq!(a[20], 65);
    }

    #[test]
    fn bad_keys_and_sizes_are_refused() {
        let (keys, auth) = receiver();
        assert!(matches!(aes128gcm(&[4u8; 65], &auth, b"x"), Err(EncryptError::BadPublicKey)));
        assert!(matches!(aes128gcm(keys.public_key(), &auth[..8], b"x"), Err(EncryptError::BadAuthSecret)));
        let big = vec![0u8; MAX_PLAINTEXT + 1];
        assert!(matches!(aes128gcm(keys.public_key(), &auth, &big), Err(EncryptError::TooLarge(_))));
    }
}
