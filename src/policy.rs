//! Operator-wide policy on RegistryAccess objects: which Keycloak servers they may use, and
//! whether plain http is allowed.

use reqwest::Url;

/// What the operator was started to allow.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Keycloak servers objects may use (URL prefixes); any when empty.
    pub allowed_servers: Vec<String>,
    /// Plain `http://` servers are allowed (`--allow-insecure-http`): client secrets and tokens
    /// then cross the network readable by anyone on the path.
    pub allow_insecure_http: bool,
}

impl Policy {
    /// Why `server` may not be used, if it may not: plain http without the flag, or outside the
    /// allow-list.
    pub fn refusal(&self, server: &str) -> Option<(&'static str, String)> {
        use crate::failure::reason;
        let http = Url::parse(server).map(|u| u.scheme() == "http").unwrap_or(false);
        if http && !self.allow_insecure_http {
            return Some((
                reason::INSECURE_SERVER,
                format!(
                    "spec.server {server} uses plain http, which would send the client secret and the token \
                     unencrypted; use its https URL (this operator was not started with --allow-insecure-http); \
                     no request was sent"
                ),
            ));
        }
        (!server_allowed(server, &self.allowed_servers)).then(|| {
            (
                reason::SERVER_NOT_ALLOWED,
                format!(
                    "spec.server {server} is not among the Keycloak servers this operator may use ({}); no request was sent",
                    self.allowed_servers.join(", ")
                ),
            )
        })
    }
}

/// True when `server` is covered by one of the `allowed` URL prefixes, or when the list is empty
/// (any server). A prefix covers a server with the same scheme, host and port whose path starts
/// with the prefix's path at a segment boundary: `https://kc.example.com/auth` covers
/// `https://kc.example.com/auth` and `.../auth/x`, not `.../authx` or `https://kc.example.com.evil`.
pub fn server_allowed(server: &str, allowed: &[String]) -> bool {
    allowed.is_empty() || server_allowed_nonempty(server, allowed)
}

/// True when `server` is covered by one of the `allowed` URL prefixes (none when it is empty).
pub fn server_allowed_nonempty(server: &str, allowed: &[String]) -> bool {
    let Ok(server) = Url::parse(server) else { return false };
    allowed.iter().filter_map(|p| Url::parse(p).ok()).any(|prefix| covers(&prefix, &server))
}

fn covers(prefix: &Url, server: &Url) -> bool {
    let same_origin = prefix.scheme() == server.scheme()
        && prefix.host_str().map(str::to_ascii_lowercase) == server.host_str().map(str::to_ascii_lowercase)
        && prefix.port_or_known_default() == server.port_or_known_default();
    let want = prefix.path().trim_end_matches('/');
    let have = server.path().trim_end_matches('/');
    same_origin && (want.is_empty() || have == want || have.starts_with(&format!("{want}/")))
}

/// Checks the allowed-server prefixes given to the operator: absolute https URLs (http only
/// with `allow_insecure_http`).
pub fn validate_prefixes(allowed: &[String], allow_insecure_http: bool) -> Result<(), String> {
    for p in allowed {
        let url = Url::parse(p).map_err(|e| format!("allowed server {p:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!("allowed server {p:?} must be an absolute https URL"));
        }
        if url.scheme() == "http" && !allow_insecure_http {
            return Err(format!("allowed server {p:?} uses plain http: use https, or add --allow-insecure-http"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_empty_list_allows_any_server() {
        assert!(server_allowed("https://anything.example.com/auth", &[]));
    }

    #[test]
    fn prefixes_match_at_segment_boundaries() {
        let a = allowed(&["https://kc.example.com/auth"]);
        assert!(server_allowed("https://kc.example.com/auth", &a));
        assert!(server_allowed("https://kc.example.com/auth/", &a));
        assert!(server_allowed("https://KC.example.com:443/auth/sub", &a));
        assert!(!server_allowed("https://kc.example.com/authx", &a));
        assert!(!server_allowed("https://kc.example.com", &a));
        assert!(!server_allowed("https://kc.example.com.evil.org/auth", &a));
        assert!(!server_allowed("http://kc.example.com/auth", &a));
        assert!(!server_allowed("https://kc.example.com:8443/auth", &a));
    }

    #[test]
    fn a_host_prefix_allows_every_path() {
        let a = allowed(&["https://kc.example.com/", "http://127.0.0.1:8080"]);
        assert!(server_allowed("https://kc.example.com/auth", &a));
        assert!(server_allowed("http://127.0.0.1:8080/auth", &a));
        assert!(!server_allowed("http://127.0.0.1:8081/auth", &a));
        assert!(!server_allowed("not a url", &a));
    }

    #[test]
    fn prefixes_are_validated() {
        assert!(validate_prefixes(&allowed(&["https://kc.example.com"]), false).is_ok());
        assert!(validate_prefixes(&allowed(&["kc.example.com"]), false).is_err());
        assert!(validate_prefixes(&allowed(&["ftp://kc.example.com"]), true).is_err());
        assert!(validate_prefixes(&allowed(&["http://127.0.0.1:8080"]), false).is_err());
        assert!(validate_prefixes(&allowed(&["http://127.0.0.1:8080"]), true).is_ok());
    }

    #[test]
    fn plain_http_is_refused_unless_allowed() {
        let strict = Policy::default();
        let (why, message) = strict.refusal("http://127.0.0.1:8080/auth").unwrap();
        assert_eq!(why, crate::failure::reason::INSECURE_SERVER);
        assert!(message.contains("--allow-insecure-http"), "{message}");
        assert!(strict.refusal("https://kc.example.com/auth").is_none());
        let lax = Policy { allow_insecure_http: true, ..Policy::default() };
        assert!(lax.refusal("http://127.0.0.1:8080/auth").is_none());
        let listed = Policy { allowed_servers: allowed(&["https://kc.example.com/auth"]), allow_insecure_http: false };
        assert_eq!(
            listed.refusal("https://other.example.com/auth").unwrap().0,
            crate::failure::reason::SERVER_NOT_ALLOWED
        );
    }
}
