//! Push-service endpoints, and the policy of which push services we talk to.
//!
//! An endpoint comes from a browser, so it is attacker-controlled: without this check
//! the worker would POST to any URL an admin's session supplies, internal hosts included.
//! The worker checks again at send time (and refuses private addresses at DNS level).

use url::Url;

/// Hosts of the push services browsers use; a leading `.` matches any subdomain.
const KNOWN_PUSH_SERVICES: &[&str] = &[
    "fcm.googleapis.com",
    "android.googleapis.com",
    "updates.push.services.mozilla.com",
    ".push.services.mozilla.com",
    ".push.apple.com",
    ".notify.windows.com",
];

/// Which endpoints subscriptions may use: https hosts (exact or by suffix), plus exact
/// origins written with a scheme (e.g. `http://127.0.0.1:8090`) for local stand-ins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushHostPolicy {
    /// `https` hosts; an entry starting with `.` matches that domain's subdomains.
    hosts: Vec<String>,
    /// Exact origins allowed whatever their scheme, address or port.
    origins: Vec<Url>,
}

/// A `PUSH_ALLOWED_HOSTS` entry that is neither a host name nor an origin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is neither a host name nor an origin like http://127.0.0.1:8090")]
pub struct PushHostPolicyError(String);

impl Default for PushHostPolicy {
    fn default() -> Self {
        Self { hosts: KNOWN_PUSH_SERVICES.iter().map(|h| (*h).to_owned()).collect(), origins: Vec::new() }
    }
}

impl PushHostPolicy {
    /// Parses a comma-separated list of hosts (`.example.com` for subdomains) and origins.
    pub fn parse(raw: &str) -> Result<Self, PushHostPolicyError> {
        let mut policy = Self { hosts: Vec::new(), origins: Vec::new() };
        for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry.contains("://") {
                let url = Url::parse(entry).map_err(|_| PushHostPolicyError(entry.to_owned()))?;
                if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                    return Err(PushHostPolicyError(entry.to_owned()));
                }
                policy.origins.push(origin_of(&url));
            } else if entry.trim_start_matches('.').chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
                policy.hosts.push(entry.to_ascii_lowercase());
            } else {
                return Err(PushHostPolicyError(entry.to_owned()));
            }
        }
        Ok(policy)
    }

    /// The origins allowed explicitly (they may be plain http or private addresses).
    pub fn explicit_origins(&self) -> Vec<Url> {
        self.origins.clone()
    }

    /// Whether `url` may receive pushes.
    pub fn allows(&self, url: &Url) -> bool {
        if self.origins.iter().any(|o| *o == origin_of(url)) {
            return true;
        }
        if url.scheme() != "https" {
            return false;
        }
        let Some(host) = url.host_str().map(str::to_ascii_lowercase) else {
            return false;
        };
        self.hosts.iter().any(|allowed| match allowed.strip_prefix('.') {
            Some(domain) => host.ends_with(allowed.as_str()) && host.len() > domain.len() + 1,
            None => host == *allowed,
        })
    }
}

fn origin_of(url: &Url) -> Url {
    let mut origin = url.clone();
    origin.set_path("/");
    origin.set_query(None);
    origin.set_fragment(None);
    // Credentials never match an origin entry: they are refused separately.
    let _ = origin.set_username("");
    let _ = origin.set_password(None);
    origin
}

/// An endpoint URL that the policy allows: no credentials, at most 2,048 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushEndpoint(Url);

/// Why an endpoint is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushEndpointError {
    /// Missing.
    #[error("is required")]
    Empty,
    /// Longer than any real push service's endpoint.
    #[error("must be at most 2048 characters")]
    TooLong,
    /// Not an absolute URL.
    #[error("is not a valid URL")]
    NotAUrl,
    /// Carries a user name or password.
    #[error("must not contain credentials")]
    Credentials,
    /// Plain http (only explicitly allowed origins may use it).
    #[error("must use https")]
    NotHttps,
    /// Not a push service we send to.
    #[error("is not on an allowed push service")]
    HostNotAllowed,
}

impl PushEndpoint {
    /// Longest endpoint accepted.
    pub const MAX_LEN: usize = 2048;

    /// Parses `raw` and checks it against `policy`.
    pub fn parse(raw: &str, policy: &PushHostPolicy) -> Result<Self, PushEndpointError> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(PushEndpointError::Empty);
        }
        if raw.len() > Self::MAX_LEN {
            return Err(PushEndpointError::TooLong);
        }
        let url = Url::parse(raw).map_err(|_| PushEndpointError::NotAUrl)?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(PushEndpointError::Credentials);
        }
        if !policy.allows(&url) {
            return Err(if url.scheme() == "https" {
                PushEndpointError::HostNotAllowed
            } else {
                PushEndpointError::NotHttps
            });
        }
        Ok(Self(url))
    }

    /// The endpoint as text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The endpoint's host, which may be logged (the full URL identifies a browser).
    pub fn host(&self) -> &str {
        self.0.host_str().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_policy() -> PushHostPolicy {
        PushHostPolicy::default()
    }

    #[test]
    fn known_push_services_are_allowed() {
        for ok in [
            "https://fcm.googleapis.com/fcm/send/abc",
            "https://updates.push.services.mozilla.com/wpush/v2/abc",
            "https://web.push.apple.com/QGx",
            "https://wns2-par02p.notify.windows.com/w/?token=abc",
        ] {
            assert!(PushEndpoint::parse(ok, &default_policy()).is_ok(), "{ok}");
        }
    }

    #[test]
    fn other_hosts_plain_http_and_credentials_are_refused() {
        let policy = default_policy();
        let refused = [
            ("https://evil.example/push", PushEndpointError::HostNotAllowed),
            ("https://push.apple.com.evil.example/x", PushEndpointError::HostNotAllowed),
            ("http://fcm.googleapis.com/fcm/send/abc", PushEndpointError::NotHttps),
            ("https://u:p@fcm.googleapis.com/fcm/send/abc", PushEndpointError::Credentials),
            ("http://127.0.0.1:6379/", PushEndpointError::NotHttps),
            ("not a url", PushEndpointError::NotAUrl),
            ("", PushEndpointError::Empty),
        ];
        for (raw, expected) in refused {
            assert_eq!(PushEndpoint::parse(raw, &policy), Err(expected), "{raw}");
        }
    }

    #[test]
    fn an_explicit_origin_allows_exactly_that_origin() {
        let policy = PushHostPolicy::parse("http://127.0.0.1:8090, fcm.googleapis.com").expect("valid");
        assert!(PushEndpoint::parse("http://127.0.0.1:8090/push/abc", &policy).is_ok());
        assert!(PushEndpoint::parse("http://127.0.0.1:8091/push/abc", &policy).is_err());
        assert!(PushEndpoint::parse("https://fcm.googleapis.com/x", &policy).is_ok());
        assert!(PushEndpoint::parse("https://updates.push.services.mozilla.com/x", &policy).is_err());
        assert_eq!(policy.explicit_origins().len(), 1);
    }

    #[test]
    fn malformed_policy_entries_are_refused() {
        assert!(PushHostPolicy::parse("ftp://x:1").is_err());
        assert!(PushHostPolicy::parse("bad host!").is_err());
    }
}
