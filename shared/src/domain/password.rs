//! Admin passwords as typed by a person, before hashing.

use secrecy::{ExposeSecret, SecretString};

/// A password of 12 to 1,024 characters; kept secret in memory and never printed.
pub struct Password(SecretString);

/// Why a password is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    /// Shorter than 12 characters.
    #[error("must be at least 12 characters")]
    TooShort,
    /// Longer than 1,024 characters (bounds the hashing work).
    #[error("must be at most 1024 characters")]
    TooLong,
}

impl Password {
    /// Shortest password accepted (OWASP ASVS 2.1.1).
    pub const MIN_LEN: usize = 12;
    /// Longest password accepted.
    pub const MAX_LEN: usize = 1024;

    /// Checks the length of `raw` (not trimmed: spaces are part of a password).
    pub fn parse(raw: &str) -> Result<Self, PasswordError> {
        let len = raw.chars().count();
        if len < Self::MIN_LEN {
            return Err(PasswordError::TooShort);
        }
        if len > Self::MAX_LEN {
            return Err(PasswordError::TooLong);
        }
        Ok(Self(SecretString::from(raw.to_owned())))
    }

    /// The password, for hashing or verification only.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_passwords_are_refused() {
        assert_eq!(Password::parse("elevenchars").err(), Some(PasswordError::TooShort));
        assert!(Password::parse("twelve chars").is_ok());
    }

    #[test]
    fn debug_output_hides_the_password() {
        let password = Password::parse("correct horse battery").expect("valid");
        assert!(!format!("{password:?}").contains("horse"));
    }
}
