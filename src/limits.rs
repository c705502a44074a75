//! Caps on token requests, so that many objects due at once (start-up after an outage, mass
//! creation) never bunch up on Keycloak: a request rate and a concurrency limit per Keycloak
//! server, and a concurrency limit for the whole operator.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default most token requests in flight for the whole operator.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 16;
/// Default most token requests in flight to one Keycloak server.
pub const DEFAULT_MAX_IN_FLIGHT_PER_SERVER: usize = 4;
/// Default most token requests per second to one Keycloak server: well under the ~120 grants/s
/// per vCPU that Keycloak's sizing guide gives, so the operator never dominates a Keycloak.
pub const DEFAULT_PER_SERVER_PER_SECOND: u32 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitConfig {
    pub max_in_flight: usize,
    pub max_in_flight_per_server: usize,
    pub per_server_per_second: u32,
}

impl Default for LimitConfig {
    fn default() -> Self {
        Self {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_in_flight_per_server: DEFAULT_MAX_IN_FLIGHT_PER_SERVER,
            per_server_per_second: DEFAULT_PER_SERVER_PER_SECOND,
        }
    }
}

pub struct Limits {
    config: LimitConfig,
    global: Arc<Semaphore>,
    per_server: Mutex<HashMap<String, Arc<Semaphore>>>,
    rate: DefaultKeyedRateLimiter<String>,
}

/// Permission to send one token request; released when dropped.
pub struct Permit {
    _server: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

impl Limits {
    pub fn new(config: LimitConfig) -> Self {
        let per_second = NonZeroU32::new(config.per_server_per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        Self {
            config,
            global: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            per_server: Mutex::new(HashMap::new()),
            // A burst of at most one second's worth, then an even pace.
            rate: RateLimiter::keyed(Quota::per_second(per_second)),
        }
    }

    /// Waits until a request to `server` (its origin, e.g. `https://kc.example.com:443`) may go.
    pub async fn acquire(&self, server: &str) -> Permit {
        self.rate.until_key_ready(&server.to_owned()).await;
        let sem = {
            let mut map = self.per_server.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(server.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.config.max_in_flight_per_server.max(1))))
                .clone()
        };
        // The semaphores are never closed, so acquiring cannot fail.
        let server_permit = sem.acquire_owned().await.expect("semaphore closed");
        let global = self.global.clone().acquire_owned().await.expect("semaphore closed");
        Permit { _server: server_permit, _global: global }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrency_is_capped_per_server_and_overall() {
        let limits = Arc::new(Limits::new(LimitConfig {
            max_in_flight: 3,
            max_in_flight_per_server: 2,
            per_server_per_second: 1000,
        }));
        let (now, peak_a, peak_all) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let a_now = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (limits, now, peak_a, peak_all, a_now) =
                (limits.clone(), now.clone(), peak_a.clone(), peak_all.clone(), a_now.clone());
            tasks.push(tokio::spawn(async move {
                let server = if i % 2 == 0 { "https://a:443" } else { "https://b:443" };
                let _p = limits.acquire(server).await;
                let all = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak_all.fetch_max(all, Ordering::SeqCst);
                if i % 2 == 0 {
                    let a = a_now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak_a.fetch_max(a, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                if i % 2 == 0 {
                    a_now.fetch_sub(1, Ordering::SeqCst);
                }
                now.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(peak_a.load(Ordering::SeqCst) <= 2, "per-server peak {}", peak_a.load(Ordering::SeqCst));
        assert!(peak_all.load(Ordering::SeqCst) <= 3, "overall peak {}", peak_all.load(Ordering::SeqCst));
        assert!(peak_all.load(Ordering::SeqCst) >= 2, "the limits serialized everything");
    }

    #[tokio::test]
    async fn requests_to_one_server_are_paced() {
        let limits =
            Limits::new(LimitConfig { max_in_flight: 100, max_in_flight_per_server: 100, per_server_per_second: 10 });
        let start = std::time::Instant::now();
        for _ in 0..25 {
            drop(limits.acquire("https://a:443").await);
        }
        // A burst of 10, then 15 more at 10/s: at least ~1.4 s.
        assert!(start.elapsed() >= Duration::from_millis(1300), "25 requests in {:?}", start.elapsed());
    }
}
