//! The notification an admin sees for a feedback message.

use serde::Serialize;
use url::Url;

/// What the service worker shows: `title`, `body`, and the `url` a click opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notification {
    /// `"<submitter_name>:"`.
    pub title: String,
    /// The content, cut to [`Notification::BODY_CHARS`] characters plus `…` when longer.
    pub body: String,
    /// Absolute link to the message in the admin inbox.
    pub url: String,
    /// Groups notifications of one message (the service worker's `tag`).
    pub tag: String,
}

impl Notification {
    /// Longest body before it is cut (the seed's privacy advice: short previews).
    pub const BODY_CHARS: usize = 120;

    /// The notification for feedback `id` from `name` saying `content`.
    pub fn for_feedback(id: i64, name: &str, content: &str, public_url: &Url) -> Self {
        let body = match content.char_indices().nth(Self::BODY_CHARS) {
            Some((cut, _)) => format!("{}…", &content[..cut]),
            None => content.to_owned(),
        };
        let url = public_url
            .join(&format!("admin/feedback/{id}"))
            .map(String::from)
            .unwrap_or_else(|_| format!("/admin/feedback/{id}"));
        Self { title: format!("{name}:"), body, url, tag: format!("feedback-{id}") }
    }

    /// One notification for a burst: `count` messages, the newest from `latest_name`.
    pub fn digest(count: usize, latest_name: &str, latest_content: &str, public_url: &Url) -> Self {
        let single = Self::for_feedback(0, latest_name, latest_content, public_url);
        let url = public_url.join("admin/").map(String::from).unwrap_or_else(|_| "/admin/".into());
        Self {
            title: if count == 1 { "1 new feedback message".into() } else { format!("{count} new feedback messages") },
            body: format!("Latest from {} {}", single.title, single.body),
            url,
            tag: "feedback-digest".into(),
        }
    }

    /// The notification "Send test notification" sends to an admin's own devices.
    pub fn test(public_url: &Url) -> Self {
        let url = public_url.join("admin/notifications").map(String::from).unwrap_or_else(|_| "/admin/".into());
        Self {
            title: "Test notification".into(),
            body: "Notifications from Tidings work on this device.".into(),
            url,
            tag: "test".into(),
        }
    }

    /// The push payload: this notification as JSON.
    pub fn to_payload(&self) -> Vec<u8> {
        // Serialising a struct of strings cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Url {
        Url::parse("https://tidings.example/").expect("valid")
    }

    #[test]
    fn short_content_is_kept_whole() {
        let n = Notification::for_feedback(7, "Ann", "Hi", &base());
        assert_eq!(n.title, "Ann:");
        assert_eq!(n.body, "Hi");
        assert_eq!(n.url, "https://tidings.example/admin/feedback/7");
    }

    #[test]
    fn long_content_is_cut_at_120_characters_with_an_ellipsis() {
        let content = "é".repeat(121);
        let n = Notification::for_feedback(1, "Ann", &content, &base());
        assert_eq!(n.body, format!("{}…", "é".repeat(120)));
        let exact = "x".repeat(120);
        assert_eq!(Notification::for_feedback(1, "A", &exact, &base()).body, exact);
    }

    #[test]
    fn a_digest_counts_its_messages_in_words() {
        let one = Notification::digest(1, "Ann", "Hi", &base());
        assert_eq!(one.title, "1 new feedback message");
        assert_eq!(one.body, "Latest from Ann: Hi");
        assert_eq!(one.url, "https://tidings.example/admin/");
        assert_eq!(Notification::digest(5, "Ann", "Hi", &base()).title, "5 new feedback messages");
    }

    #[test]
    fn a_public_url_with_a_path_keeps_it() {
        let n = Notification::for_feedback(3, "A", "b", &Url::parse("https://x.example/app/").expect("valid"));
        assert_eq!(n.url, "https://x.example/app/admin/feedback/3");
    }
}
