//! Token requests waiting to be sent, as a pure state machine on the caller's clock: one queue per
//! Keycloak server served in turn, inside it one queue per namespace served in turn, an even pace
//! per server, and caps on requests in flight per server and overall.
//!
//! Nothing here waits: [`Queue::next`] says which request may go now, or when to look again. So a
//! server that never answers holds at most its own in-flight cap, and a namespace with a thousand
//! due objects is served alternately with a namespace that has one.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Default most token requests in flight for the whole operator.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// Default most token requests in flight to one Keycloak server: a hung server holds this many
/// requests until they time out, and no more.
pub const DEFAULT_MAX_IN_FLIGHT_PER_SERVER: usize = 8;
/// Default pace of token requests to one Keycloak server, per second. Steady demand is
/// objects x 1.5 / lifetime (a token is renewed after about two thirds of its life): 10,000
/// objects of 300 s tokens need 50/s, half of this pace; 1,000 objects due at once take 10 s.
/// Keycloak's sizing guide gives ~120 grants/s per vCPU even without keep-alive.
pub const DEFAULT_PER_SERVER_PER_SECOND: u32 = 100;

/// Caps on token requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    pub max_in_flight: usize,
    pub max_in_flight_per_server: usize,
    pub per_server_per_second: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_in_flight_per_server: DEFAULT_MAX_IN_FLIGHT_PER_SERVER,
            per_server_per_second: DEFAULT_PER_SERVER_PER_SECOND,
        }
    }
}

impl QueueConfig {
    /// Time between two requests to one server.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(1) / self.per_server_per_second.max(1)
    }
}

/// What may happen next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<J> {
    /// Send this request now.
    Go(Dispatch<J>),
    /// Nothing may go before this instant (pace or a server's `Retry-After`).
    WaitUntil(Instant),
    /// Nothing may go until a request finishes or a new one is queued.
    Idle,
}

/// A request taken from the queue.
#[derive(Debug, PartialEq, Eq)]
pub struct Dispatch<J> {
    pub server: String,
    pub key: String,
    pub job: J,
}

struct Server<J> {
    /// Queued requests per namespace, and the order namespaces are served in.
    namespaces: HashMap<String, VecDeque<(String, J)>>,
    turn: VecDeque<String>,
    queued: usize,
    in_flight: usize,
    /// Earliest time the next request may go (the pace), or a server's `Retry-After`.
    next_at: Instant,
}

impl<J> Server<J> {
    fn new(now: Instant) -> Self {
        Self { namespaces: HashMap::new(), turn: VecDeque::new(), queued: 0, in_flight: 0, next_at: now }
    }

    fn pop(&mut self) -> Option<(String, J)> {
        let ns = self.turn.pop_front()?;
        let queue = self.namespaces.get_mut(&ns)?;
        let item = queue.pop_front();
        if queue.is_empty() {
            self.namespaces.remove(&ns);
        } else {
            self.turn.push_back(ns);
        }
        self.queued -= usize::from(item.is_some());
        item
    }
}

/// The queues of all servers.
pub struct Queue<J> {
    config: QueueConfig,
    servers: HashMap<String, Server<J>>,
    /// Servers with queued requests, in the order they are served.
    turn: VecDeque<String>,
    /// Where each queued request is: key -> (server, namespace).
    queued: HashMap<String, (String, String)>,
    in_flight: usize,
}

impl<J> Queue<J> {
    pub fn new(config: QueueConfig) -> Self {
        Self { config, servers: HashMap::new(), turn: VecDeque::new(), queued: HashMap::new(), in_flight: 0 }
    }

    /// Queues a request for `server` on behalf of an object in `namespace`, under `key` (the
    /// object's uid). A request already queued under the same key is replaced where it stands.
    pub fn push(&mut self, server: &str, namespace: &str, key: &str, job: J, now: Instant) {
        if let Some((s, ns)) = self.queued.get(key)
            && s == server
            && ns == namespace
            && let Some(slot) = self
                .servers
                .get_mut(server)
                .and_then(|srv| srv.namespaces.get_mut(namespace))
                .and_then(|q| q.iter_mut().find(|(k, _)| k == key))
        {
            slot.1 = job;
            return;
        }
        self.cancel(key);
        let srv = self.servers.entry(server.to_owned()).or_insert_with(|| Server::new(now));
        if srv.queued == 0 {
            self.turn.push_back(server.to_owned());
        }
        let queue = srv.namespaces.entry(namespace.to_owned()).or_default();
        if queue.is_empty() {
            srv.turn.push_back(namespace.to_owned());
        }
        queue.push_back((key.to_owned(), job));
        srv.queued += 1;
        self.queued.insert(key.to_owned(), (server.to_owned(), namespace.to_owned()));
    }

    /// Drops the queued request under `key`, if any (the object was deleted or changed).
    pub fn cancel(&mut self, key: &str) -> bool {
        let Some((server, ns)) = self.queued.remove(key) else { return false };
        let Some(srv) = self.servers.get_mut(&server) else { return false };
        let Some(queue) = srv.namespaces.get_mut(&ns) else { return false };
        let before = queue.len();
        queue.retain(|(k, _)| k != key);
        let removed = before - queue.len();
        srv.queued -= removed;
        if queue.is_empty() {
            srv.namespaces.remove(&ns);
            srv.turn.retain(|n| n != &ns);
        }
        if srv.queued == 0 {
            self.turn.retain(|s| s != &server);
        }
        removed > 0
    }

    /// Takes the next request that may go at `now`: servers in turn, namespaces in turn within a
    /// server, skipping servers at their cap or before their pace allows.
    pub fn next(&mut self, now: Instant) -> Next<J> {
        if self.turn.is_empty() {
            self.prune(now);
            return Next::Idle;
        }
        if self.in_flight >= self.config.max_in_flight.max(1) {
            return Next::Idle;
        }
        let mut earliest: Option<Instant> = None;
        for _ in 0..self.turn.len() {
            let Some(name) = self.turn.pop_front() else { break };
            let Some(srv) = self.servers.get_mut(&name) else { continue };
            if srv.queued == 0 {
                continue;
            }
            if srv.in_flight >= self.config.max_in_flight_per_server.max(1) {
                self.turn.push_back(name);
                continue;
            }
            if srv.next_at > now {
                earliest = Some(earliest.map_or(srv.next_at, |e| e.min(srv.next_at)));
                self.turn.push_back(name);
                continue;
            }
            let Some((key, job)) = srv.pop() else { continue };
            // An even pace: the next request to this server goes one interval after this one, or
            // after the interval from now when the server was idle (no saved-up burst).
            srv.next_at = srv.next_at.max(now) + self.config.interval();
            srv.in_flight += 1;
            self.in_flight += 1;
            if srv.queued > 0 {
                self.turn.push_back(name.clone());
            }
            self.queued.remove(&key);
            return Next::Go(Dispatch { server: name, key, job });
        }
        match earliest {
            Some(t) => Next::WaitUntil(t),
            None => Next::Idle,
        }
    }

    /// A request to `server` finished.
    pub fn done(&mut self, server: &str) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(srv) = self.servers.get_mut(server) {
            srv.in_flight = srv.in_flight.saturating_sub(1);
        }
    }

    /// Forgets idle servers whose pace has run out, so the map holds only servers in use, whatever
    /// hosts objects name.
    fn prune(&mut self, now: Instant) {
        self.servers.retain(|_, s| s.queued > 0 || s.in_flight > 0 || s.next_at > now);
    }

    /// Holds every request to `server` until `until` (its `Retry-After`).
    pub fn pause(&mut self, server: &str, until: Instant) {
        if let Some(srv) = self.servers.get_mut(server) {
            srv.next_at = srv.next_at.max(until);
        }
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.queued.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Requests waiting for `server`.
    pub fn len_for(&self, server: &str) -> usize {
        self.servers.get(server).map_or(0, |s| s.queued)
    }

    /// Servers the queue keeps state for.
    pub fn servers(&self) -> usize {
        self.servers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_in_flight: usize, per_server: usize, rate: u32) -> QueueConfig {
        QueueConfig { max_in_flight, max_in_flight_per_server: per_server, per_server_per_second: rate }
    }

    fn go<J>(n: Next<J>) -> Dispatch<J> {
        match n {
            Next::Go(d) => d,
            _ => panic!("nothing to dispatch"),
        }
    }

    #[test]
    fn requests_to_one_server_are_evenly_paced() {
        let t0 = Instant::now();
        let mut q = Queue::new(config(100, 100, 10));
        for i in 0..5 {
            q.push("a", "ns", &format!("k{i}"), i, t0);
        }
        assert_eq!(go(q.next(t0)).job, 0);
        // No burst: the second waits a full interval.
        assert_eq!(q.next(t0), Next::WaitUntil(t0 + Duration::from_millis(100)));
        assert_eq!(q.next(t0 + Duration::from_millis(99)), Next::WaitUntil(t0 + Duration::from_millis(100)));
        assert_eq!(go(q.next(t0 + Duration::from_millis(100))).job, 1);
        // Late by 50 ms: the next goes an interval after that, not at once to catch up.
        assert_eq!(go(q.next(t0 + Duration::from_millis(250))).job, 2);
        assert_eq!(q.next(t0 + Duration::from_millis(300)), Next::WaitUntil(t0 + Duration::from_millis(350)));
    }

    #[test]
    fn a_server_at_its_cap_does_not_hold_up_another() {
        let t0 = Instant::now();
        let mut q = Queue::new(config(100, 2, 1000));
        for i in 0..10 {
            q.push("hung", "tenant-a", &format!("h{i}"), i, t0);
        }
        q.push("healthy", "tenant-b", "b0", 100, t0);
        let mut now = t0;
        let mut sent = Vec::new();
        while let Next::Go(d) = q.next(now) {
            sent.push(d.server);
            now += Duration::from_millis(1);
        }
        // Two to the hung server (its cap), then the healthy one; the rest of hung waits.
        assert_eq!(sent.iter().filter(|s| *s == "hung").count(), 2);
        assert!(sent.contains(&"healthy".to_owned()));
        assert_eq!(q.len_for("hung"), 8);
    }

    #[test]
    fn namespaces_of_one_server_take_turns() {
        let t0 = Instant::now();
        let mut q = Queue::new(config(100, 100, 1000));
        for i in 0..200 {
            q.push("kc", "busy", &format!("busy-{i}"), "busy", t0);
        }
        q.push("kc", "quiet", "quiet-0", "quiet", t0);
        let mut now = t0;
        let mut order = Vec::new();
        for _ in 0..3 {
            let d = go(q.next(now));
            order.push(d.job);
            q.done(&d.server);
            now += Duration::from_millis(1);
        }
        assert!(order[..2].contains(&"quiet"), "the quiet namespace waited behind the busy one: {order:?}");
    }

    #[test]
    fn servers_take_turns() {
        let t0 = Instant::now();
        let mut q = Queue::new(config(100, 100, 1000));
        for i in 0..50 {
            q.push("big", "ns", &format!("big-{i}"), "big", t0);
        }
        q.push("small", "ns", "small-0", "small", t0);
        let first = go(q.next(t0)).job;
        let second = go(q.next(t0)).job;
        assert_eq!([first, second], ["big", "small"]);
    }

    #[test]
    fn the_global_cap_holds_and_frees() {
        let t0 = Instant::now();
        let mut q = Queue::new(config(2, 10, 1000));
        for s in ["a", "b", "c"] {
            q.push(s, "ns", s, s, t0);
        }
        let d1 = go(q.next(t0));
        go(q.next(t0));
        assert_eq!(q.next(t0), Next::Idle);
        q.done(&d1.server);
        assert_eq!(go(q.next(t0)).job, "c");
    }

    #[test]
    fn a_queued_request_is_replaced_or_cancelled_by_key() {
        let t0 = Instant::now();
        let mut q = Queue::new(config(10, 10, 1000));
        q.push("a", "ns", "uid-1", "old", t0);
        q.push("a", "ns", "uid-1", "new", t0);
        assert_eq!(q.len(), 1);
        q.push("b", "ns", "uid-1", "moved", t0);
        assert_eq!((q.len(), q.len_for("a"), q.len_for("b")), (1, 0, 1));
        assert_eq!(go(q.next(t0)).job, "moved");
        q.push("a", "ns", "uid-2", "x", t0);
        assert!(q.cancel("uid-2"));
        assert!(!q.cancel("uid-2"));
        assert_eq!(q.next(t0), Next::Idle);
    }

    #[test]
    fn retry_after_pauses_a_server() {
        let t0 = Instant::now();
        let mut q = Queue::new(config(10, 10, 1000));
        q.push("a", "ns", "k1", 1, t0);
        q.push("a", "ns", "k2", 2, t0);
        let d = go(q.next(t0));
        q.pause("a", t0 + Duration::from_secs(30));
        q.done(&d.server);
        assert_eq!(q.next(t0 + Duration::from_secs(1)), Next::WaitUntil(t0 + Duration::from_secs(30)));
        assert_eq!(go(q.next(t0 + Duration::from_secs(30))).job, 2);
    }

    #[test]
    fn idle_servers_are_forgotten() {
        let t0 = Instant::now();
        let mut q = Queue::new(config(10, 10, 10));
        for i in 0..100 {
            let server = format!("https://tenant-{i}.example");
            q.push(&server, "ns", &format!("k{i}"), i, t0);
        }
        let mut now = t0;
        while !q.is_empty() {
            if let Next::Go(d) = q.next(now) {
                q.done(&d.server);
            }
            now += Duration::from_millis(1);
        }
        assert_eq!(q.next(now + Duration::from_secs(1)), Next::Idle);
        assert_eq!(q.servers(), 0);
    }
}
