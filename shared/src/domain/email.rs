//! Email addresses (of visitors and of admins).

use std::fmt;

/// A syntactically valid email address of at most 254 characters, trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailAddress(String);

/// Why a string is not an acceptable email address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmailError {
    /// Nothing but whitespace.
    #[error("is required")]
    Empty,
    /// Longer than RFC 5321 allows in a path.
    #[error("must be at most 254 characters")]
    TooLong,
    /// Not of the form `local@domain`.
    #[error("is not a valid email address")]
    Invalid,
}

impl EmailAddress {
    /// Longest address accepted (RFC 5321 path limit).
    pub const MAX_LEN: usize = 254;

    /// Trims and checks `raw`.
    pub fn parse(raw: &str) -> Result<Self, EmailError> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(EmailError::Empty);
        }
        if trimmed.chars().count() > Self::MAX_LEN {
            return Err(EmailError::TooLong);
        }
        // Display names ("Ann <a@b>") are valid RFC 5322 but not an address field.
        if trimmed.contains(['<', '>', ' ']) || !email_address::EmailAddress::is_valid(trimmed) {
            return Err(EmailError::Invalid);
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// The address as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The address with its domain lower-cased, for lookups of admin accounts.
    pub fn normalized(&self) -> String {
        match self.0.rsplit_once('@') {
            Some((local, domain)) => format!("{local}@{}", domain.to_ascii_lowercase()),
            None => self.0.clone(),
        }
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn common_addresses_are_accepted() {
        for ok in ["ann@example.com", " bob.smith+tag@sub.example.org ", "x@y.io"] {
            assert!(EmailAddress::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn malformed_addresses_are_refused() {
        for bad in ["", "  ", "plain", "@example.com", "ann@", "a b@example.com", "Ann <a@b.c>"] {
            assert!(EmailAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses_over_254_characters_are_refused() {
        let long = format!("{}@example.com", "a".repeat(250));
        assert_eq!(EmailAddress::parse(&long), Err(EmailError::TooLong));
    }

    proptest! {
        #[test]
        fn parsing_never_panics(raw in ".{0,300}") {
            let _ = EmailAddress::parse(&raw);
        }

        #[test]
        fn simple_generated_addresses_round_trip(local in "[a-z0-9]{1,30}", domain in "[a-z]{1,20}\\.[a-z]{2,6}") {
            let raw = format!("{local}@{domain}");
            let parsed = EmailAddress::parse(&raw).expect("valid");
            prop_assert_eq!(parsed.as_str(), raw.as_str());
        }
    }
}
