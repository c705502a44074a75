//! Operator-wide policy on RegistryAccess objects: which Keycloak servers they may use.

use reqwest::Url;

/// True when `server` is covered by one of the `allowed` URL prefixes, or when the list is empty
/// (any server). A prefix covers a server with the same scheme, host and port whose path starts
/// with the prefix's path at a segment boundary: `https://kc.example.com/auth` covers
/// `https://kc.example.com/auth` and `.../auth/x`, not `.../authx` or `https://kc.example.com.evil`.
pub fn server_allowed(server: &str, allowed: &[String]) -> bool {
    if allowed.is_empty() {
        return true;
    }
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

/// Checks the allowed-server prefixes given to the operator.
pub fn validate_prefixes(allowed: &[String]) -> Result<(), String> {
    for p in allowed {
        let url = Url::parse(p).map_err(|e| format!("allowed server {p:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!("allowed server {p:?} must be an absolute http(s) URL"));
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
        assert!(validate_prefixes(&allowed(&["https://kc.example.com"])).is_ok());
        assert!(validate_prefixes(&allowed(&["kc.example.com"])).is_err());
        assert!(validate_prefixes(&allowed(&["ftp://kc.example.com"])).is_err());
    }
}
