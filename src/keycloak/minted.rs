//! ServiceAccount tokens minted moments ago, kept in memory only while young, so that objects
//! sharing a ServiceAccount and audience (or a retry) reuse one instead of asking the API server
//! again. Never written anywhere.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use secrecy::SecretString;

/// A minted token is reused for this long after it was made (it lives 600 s; Keycloak accepts a
/// ServiceAccount token up to an hour after its issue by default, less where configured).
pub const YOUNG: Duration = Duration::from_secs(60);

/// The young tokens, by ServiceAccount uid and audience.
#[derive(Default)]
pub struct Minted {
    tokens: Mutex<HashMap<(String, String), (SecretString, Instant)>>,
}

impl Minted {
    /// A token minted for `uid` and `audience` less than [`YOUNG`] ago.
    pub fn young(&self, uid: &str, audience: &str) -> Option<(SecretString, Instant)> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let (token, at) = tokens.get(&(uid.to_owned(), audience.to_owned()))?;
        (at.elapsed() < YOUNG).then(|| (token.clone(), *at))
    }

    /// Keeps a token minted at `at`; forgets those no longer young.
    pub fn keep(&self, uid: &str, audience: &str, token: SecretString, at: Instant) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens.retain(|_, (_, at)| at.elapsed() < YOUNG);
        tokens.insert((uid.to_owned(), audience.to_owned()), (token, at));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn a_token_is_reused_only_for_its_service_account_and_audience() {
        let m = Minted::default();
        m.keep("uid-1", "https://kc/realms/r", SecretString::from("t1"), Instant::now());
        assert_eq!(m.young("uid-1", "https://kc/realms/r").unwrap().0.expose_secret(), "t1");
        assert!(m.young("uid-2", "https://kc/realms/r").is_none(), "a recreated ServiceAccount has a new uid");
        assert!(m.young("uid-1", "https://other/realms/r").is_none());
    }
}
