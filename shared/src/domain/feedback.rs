//! A visitor's feedback message, validated field by field.

use super::email::EmailAddress;
use super::field_errors::FieldErrors;

/// Who wrote the feedback: 1 to 200 characters, trimmed, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitterName(String);

/// The message itself: 1 to 5,000 characters, trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackContent(String);

/// Why a text field is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// Nothing but whitespace.
    #[error("is required")]
    Empty,
    /// Over the field's limit.
    #[error("must be at most {0} characters")]
    TooLong(usize),
    /// Contains control characters (a name is one line of text).
    #[error("must not contain control characters")]
    ControlCharacters,
}

impl SubmitterName {
    /// Longest name accepted.
    pub const MAX_LEN: usize = 200;

    /// Trims and checks `raw`.
    pub fn parse(raw: &str) -> Result<Self, TextError> {
        let trimmed = checked_text(raw, Self::MAX_LEN)?;
        if trimmed.chars().any(char::is_control) {
            return Err(TextError::ControlCharacters);
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FeedbackContent {
    /// Longest message accepted.
    pub const MAX_LEN: usize = 5000;

    /// Trims and checks `raw`; line breaks and tabs are kept, other control characters refused.
    pub fn parse(raw: &str) -> Result<Self, TextError> {
        let trimmed = checked_text(raw, Self::MAX_LEN)?;
        if trimmed.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t')) {
            return Err(TextError::ControlCharacters);
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// The message as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn checked_text(raw: &str, max: usize) -> Result<&str, TextError> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(TextError::Empty);
    }
    if trimmed.chars().count() > max {
        return Err(TextError::TooLong(max));
    }
    Ok(trimmed)
}

/// A feedback message ready to be stored: every field valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFeedback {
    /// Who wrote it.
    pub submitter_name: SubmitterName,
    /// How to answer them.
    pub submitter_email: EmailAddress,
    /// What they wrote.
    pub content: FeedbackContent,
}

impl NewFeedback {
    /// Checks all three fields and reports every problem at once, keyed by field name.
    pub fn parse(name: &str, email: &str, content: &str) -> Result<Self, FieldErrors> {
        let mut errors = FieldErrors::default();
        let name = errors.check("submitter_name", SubmitterName::parse(name));
        let email = errors.check("submitter_email", EmailAddress::parse(email));
        let content = errors.check("content", FeedbackContent::parse(content));
        match (name, email, content) {
            (Some(submitter_name), Some(submitter_email), Some(content)) => {
                Ok(Self { submitter_name, submitter_email, content })
            }
            _ => Err(errors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_valid_message_parses_and_is_trimmed() {
        let parsed = NewFeedback::parse(" Ann ", "ann@example.com", "  Hello\nthere ").expect("valid");
        assert_eq!(parsed.submitter_name.as_str(), "Ann");
        assert_eq!(parsed.content.as_str(), "Hello\nthere");
    }

    #[test]
    fn every_invalid_field_is_reported_at_once() {
        let errors = NewFeedback::parse("", "nope", "").expect_err("invalid");
        assert_eq!(errors.get("submitter_name"), ["is required"]);
        assert_eq!(errors.get("submitter_email"), ["is not a valid email address"]);
        assert_eq!(errors.get("content"), ["is required"]);
    }

    #[test]
    fn limits_count_characters_not_bytes() {
        assert!(SubmitterName::parse(&"é".repeat(200)).is_ok());
        assert_eq!(SubmitterName::parse(&"é".repeat(201)), Err(TextError::TooLong(200)));
        assert!(FeedbackContent::parse(&"ü".repeat(5000)).is_ok());
        assert_eq!(FeedbackContent::parse(&"x".repeat(5001)), Err(TextError::TooLong(5000)));
    }

    #[test]
    fn a_name_with_a_newline_is_refused() {
        assert_eq!(SubmitterName::parse("Ann\nBob"), Err(TextError::ControlCharacters));
    }

    proptest! {
        #[test]
        fn names_within_limits_are_accepted(name in "[\\p{L}][\\p{L} .'-]{0,198}[\\p{L}]") {
            prop_assert!(SubmitterName::parse(&name).is_ok());
        }

        #[test]
        fn content_parsing_never_panics(raw in "\\PC{0,6000}") {
            let _ = FeedbackContent::parse(&raw);
        }
    }
}
