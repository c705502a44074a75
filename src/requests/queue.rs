//! Token requests waiting to be sent, as a pure state machine on the caller's clock: namespaces
//! (tenants) served in turn, inside each its servers in turn; a fair share of the overall slots
//! per namespace, whatever number of servers it names; per server an even pace and an in-flight
//! cap; and `Retry-After` pauses per client, never past a request's deadline.
//!
//! Nothing here waits: [`Queue::next`] says which request may go now, or when to look again. So
//! a namespace whose hundreds of servers never answer holds at most its share of the slots, and
//! another namespace's requests start on their turn.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Default most token requests in flight for the whole operator.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// Default most token requests in flight for one namespace, over all the servers it names: one
/// tenant whose servers never answer holds this many slots for the request timeout, no more. Twice
/// the per-server cap, so that inside a namespace a hung server leaves its other servers as many
/// slots as it holds.
pub const DEFAULT_MAX_IN_FLIGHT_PER_NAMESPACE: usize = 16;
/// Default most token requests in flight to one Keycloak server: a hung server holds this many
/// requests until they time out, and no more.
pub const DEFAULT_MAX_IN_FLIGHT_PER_SERVER: usize = 8;
/// Default pace of token requests to one Keycloak server, per second. Steady demand is
/// objects / (lifetime - renewBefore): with the default renewBefore a 300 s token is renewed every
/// 133 s, so 10,000 objects need 75/s, three quarters of this pace; 1,000 objects due at once take
/// 10 s. Keycloak's sizing guide gives ~120 grants/s per vCPU even without keep-alive.
pub const DEFAULT_PER_SERVER_PER_SECOND: u32 = 100;
/// How many queued requests of one namespace and server are looked at for one that is not
/// paused: bounds the work of one [`Queue::next`] whatever a namespace queues.
const SCAN: usize = 64;
/// How often idle servers and expired pauses are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// Caps on token requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    pub max_in_flight: usize,
    pub max_in_flight_per_namespace: usize,
    pub max_in_flight_per_server: usize,
    pub per_server_per_second: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_in_flight_per_namespace: DEFAULT_MAX_IN_FLIGHT_PER_NAMESPACE,
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

    /// The most requests one namespace may have in flight while `active` namespaces have work:
    /// an even split of the overall slots, at most the per-namespace cap, at least one.
    pub fn share(&self, active: usize) -> usize {
        (self.max_in_flight.max(1) / active.max(1)).clamp(1, self.max_in_flight_per_namespace.max(1))
    }
}

/// Where a request goes and on whose behalf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The server's origin (scheme, host, port): its pace and in-flight cap.
    pub server: String,
    /// The client on that server (token URL and client id): what a `Retry-After` pauses.
    pub client: String,
    /// The namespace of the object: its share.
    pub namespace: String,
    /// The object's uid: a later request under the same key replaces this one.
    pub key: String,
    /// The latest start that still saves a token already held; a pause does not hold the request
    /// past it.
    pub deadline: Option<Instant>,
}

/// What may happen next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<J> {
    /// Send this request now.
    Go(Dispatch<J>),
    /// Nothing may go before this instant (pace or a client's `Retry-After`).
    WaitUntil(Instant),
    /// Nothing may go until a request finishes or a new one is queued.
    Idle,
}

/// A request taken from the queue; hand its ticket back to [`Queue::done`] when it ends.
#[derive(Debug, PartialEq, Eq)]
pub struct Dispatch<J> {
    pub ticket: Ticket,
    pub job: J,
}

struct Entry<J> {
    ticket: Ticket,
    job: J,
}

/// One namespace's queued requests, per server, and its requests in flight.
struct Tenant<J> {
    servers: HashMap<String, VecDeque<Entry<J>>>,
    /// Servers with queued requests, in the order they are served.
    turn: VecDeque<String>,
    queued: usize,
    in_flight: usize,
}

impl<J> Default for Tenant<J> {
    fn default() -> Self {
        Self { servers: HashMap::new(), turn: VecDeque::new(), queued: 0, in_flight: 0 }
    }
}

/// One server's pace and requests in flight, over all namespaces.
struct Server {
    in_flight: usize,
    /// Earliest time the next request may go.
    next_at: Instant,
}

/// The queues of all namespaces.
pub struct Queue<J> {
    config: QueueConfig,
    /// Namespaces with requests queued or in flight.
    tenants: HashMap<String, Tenant<J>>,
    /// Namespaces with queued requests, in the order they are served.
    turn: VecDeque<String>,
    servers: HashMap<String, Server>,
    /// Clients paused by a `Retry-After`, until when.
    pauses: HashMap<String, Instant>,
    /// Where each queued request is: key -> (namespace, server).
    queued: HashMap<String, (String, String)>,
    in_flight: usize,
    pruned_at: Option<Instant>,
}

impl<J> Queue<J> {
    pub fn new(config: QueueConfig) -> Self {
        Self {
            config,
            tenants: HashMap::new(),
            turn: VecDeque::new(),
            servers: HashMap::new(),
            pauses: HashMap::new(),
            queued: HashMap::new(),
            in_flight: 0,
            pruned_at: None,
        }
    }

    /// Queues a request. One already queued under the same key is replaced where it stands
    /// when it goes to the same server for the same namespace, else dropped.
    pub fn push(&mut self, ticket: Ticket, job: J) {
        if let Some((ns, server)) = self.queued.get(&ticket.key)
            && *ns == ticket.namespace
            && *server == ticket.server
            && let Some(entry) = self
                .tenants
                .get_mut(ns)
                .and_then(|t| t.servers.get_mut(server))
                .and_then(|q| q.iter_mut().find(|e| e.ticket.key == ticket.key))
        {
            *entry = Entry { ticket, job };
            return;
        }
        self.cancel(&ticket.key);
        let (ns, server, key) = (ticket.namespace.clone(), ticket.server.clone(), ticket.key.clone());
        let tenant = self.tenants.entry(ns.clone()).or_default();
        if tenant.queued == 0 {
            self.turn.push_back(ns.clone());
        }
        let queue = tenant.servers.entry(server.clone()).or_default();
        if queue.is_empty() {
            tenant.turn.push_back(server.clone());
        }
        queue.push_back(Entry { ticket, job });
        tenant.queued += 1;
        self.queued.insert(key, (ns, server));
    }

    /// Drops the queued request under `key`, if any, and returns it (its object was deleted or
    /// its consent withdrawn).
    pub fn cancel(&mut self, key: &str) -> Option<J> {
        let (ns, server) = self.queued.remove(key)?;
        let tenant = self.tenants.get_mut(&ns)?;
        let queue = tenant.servers.get_mut(&server)?;
        let at = queue.iter().position(|e| e.ticket.key == key)?;
        let entry = queue.remove(at)?;
        tenant.queued -= 1;
        if queue.is_empty() {
            tenant.servers.remove(&server);
            tenant.turn.retain(|s| *s != server);
        }
        if tenant.queued == 0 {
            self.turn.retain(|n| *n != ns);
            if tenant.in_flight == 0 {
                self.tenants.remove(&ns);
            }
        }
        Some(entry.job)
    }

    /// When an entry may go: now, unless its client is paused; then at the pause's end or its
    /// deadline, whichever comes first.
    fn ready_at(pauses: &HashMap<String, Instant>, ticket: &Ticket, now: Instant) -> Instant {
        match pauses.get(&ticket.client) {
            Some(until) if *until > now => ticket.deadline.map_or(*until, |d| d.min(*until)),
            _ => now,
        }
    }

    /// Takes the next request that may go at `now`: namespaces in turn, each up to its share;
    /// within a namespace its servers in turn, skipping servers at their cap or pace and
    /// requests whose client is paused.
    pub fn next(&mut self, now: Instant) -> Next<J> {
        if self.pruned_at.is_none_or(|t| now.duration_since(t) >= PRUNE_EVERY) {
            self.prune(now);
        }
        if self.turn.is_empty() || self.in_flight >= self.config.max_in_flight.max(1) {
            return Next::Idle;
        }
        let share = self.config.share(self.tenants.len());
        let mut earliest: Option<Instant> = None;
        let mut later = |t: Instant| earliest = Some(earliest.map_or(t, |e: Instant| e.min(t)));
        for _ in 0..self.turn.len() {
            let Some(ns) = self.turn.pop_front() else { break };
            let Some(tenant) = self.tenants.get_mut(&ns) else { continue };
            if tenant.in_flight >= share {
                self.turn.push_back(ns);
                continue;
            }
            let mut taken = None;
            for _ in 0..tenant.turn.len() {
                let Some(name) = tenant.turn.pop_front() else { break };
                let server = self.servers.entry(name.clone()).or_insert(Server { in_flight: 0, next_at: now });
                if server.in_flight >= self.config.max_in_flight_per_server.max(1) {
                    tenant.turn.push_back(name);
                    continue;
                }
                if server.next_at > now {
                    later(server.next_at);
                    tenant.turn.push_back(name);
                    continue;
                }
                let Some(queue) = tenant.servers.get_mut(&name) else { continue };
                let mut soonest: Option<Instant> = None;
                let at = queue.iter().take(SCAN).position(|e| {
                    let t = Self::ready_at(&self.pauses, &e.ticket, now);
                    soonest = Some(soonest.map_or(t, |s| s.min(t)));
                    t <= now
                });
                let Some(entry) = at.and_then(|i| queue.remove(i)) else {
                    if let Some(t) = soonest {
                        later(t);
                    }
                    tenant.turn.push_back(name);
                    continue;
                };
                // An even pace: the next request to this server goes one interval after this
                // one, or one interval from now when the server was idle (no saved-up burst).
                server.next_at = server.next_at.max(now) + self.config.interval();
                server.in_flight += 1;
                if queue.is_empty() {
                    tenant.servers.remove(&name);
                } else {
                    tenant.turn.push_back(name);
                }
                taken = Some(entry);
                break;
            }
            let Some(entry) = taken else {
                self.turn.push_back(ns);
                continue;
            };
            tenant.queued -= 1;
            tenant.in_flight += 1;
            self.in_flight += 1;
            if tenant.queued > 0 {
                self.turn.push_back(ns);
            }
            self.queued.remove(&entry.ticket.key);
            return Next::Go(Dispatch { ticket: entry.ticket, job: entry.job });
        }
        match earliest {
            Some(t) => Next::WaitUntil(t),
            None => Next::Idle,
        }
    }

    /// A request taken with this ticket finished.
    pub fn done(&mut self, ticket: &Ticket) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(server) = self.servers.get_mut(&ticket.server) {
            server.in_flight = server.in_flight.saturating_sub(1);
        }
        if let Some(tenant) = self.tenants.get_mut(&ticket.namespace) {
            tenant.in_flight = tenant.in_flight.saturating_sub(1);
            if tenant.in_flight == 0 && tenant.queued == 0 {
                self.tenants.remove(&ticket.namespace);
            }
        }
    }

    /// Holds the requests of `client` until `until` (its `Retry-After`), each at most until its
    /// own deadline.
    pub fn pause(&mut self, client: &str, until: Instant) {
        let at = self.pauses.entry(client.to_owned()).or_insert(until);
        *at = (*at).max(until);
    }

    /// Forgets idle servers whose pace has run out and pauses that ended, so the maps hold only
    /// what is in use, whatever hosts objects name.
    fn prune(&mut self, now: Instant) {
        self.pruned_at = Some(now);
        self.servers.retain(|_, s| s.in_flight > 0 || s.next_at > now);
        self.pauses.retain(|_, until| *until > now);
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.queued.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Requests of `namespace` waiting.
    #[cfg(test)]
    pub fn len_of(&self, namespace: &str) -> usize {
        self.tenants.get(namespace).map_or(0, |t| t.queued)
    }

    /// Requests of `namespace` in flight.
    #[cfg(test)]
    pub fn in_flight_of(&self, namespace: &str) -> usize {
        self.tenants.get(namespace).map_or(0, |t| t.in_flight)
    }

    /// Servers, namespaces and paused clients the queue keeps state for.
    #[cfg(test)]
    pub fn footprint(&self) -> (usize, usize, usize) {
        (self.servers.len(), self.tenants.len(), self.pauses.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_in_flight: usize, per_namespace: usize, per_server: usize, rate: u32) -> QueueConfig {
        QueueConfig {
            max_in_flight,
            max_in_flight_per_namespace: per_namespace,
            max_in_flight_per_server: per_server,
            per_server_per_second: rate,
        }
    }

    fn ticket(server: &str, ns: &str, key: &str) -> Ticket {
        Ticket {
            server: server.into(),
            client: format!("{server}/client"),
            namespace: ns.into(),
            key: key.into(),
            deadline: None,
        }
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
        let mut q = Queue::new(config(100, 100, 100, 10));
        for i in 0..5 {
            q.push(ticket("a", "ns", &format!("k{i}")), i);
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
    fn the_pace_of_a_server_holds_across_namespaces() {
        let t0 = Instant::now();
        let mut q = Queue::new(config(100, 100, 100, 10));
        q.push(ticket("kc", "a", "a0"), "a");
        q.push(ticket("kc", "b", "b0"), "b");
        go(q.next(t0));
        assert_eq!(q.next(t0), Next::WaitUntil(t0 + Duration::from_millis(100)));
    }

    #[test]
    fn a_server_at_its_cap_does_not_hold_up_another() {
        let t0 = Instant::now();
        let mut q = Queue::new(config(100, 100, 2, 1000));
        for i in 0..10 {
            q.push(ticket("hung", "tenant-a", &format!("h{i}")), i);
        }
        q.push(ticket("healthy", "tenant-a", "b0"), 100);
        let mut now = t0;
        let mut sent = Vec::new();
        while let Next::Go(d) = q.next(now) {
            sent.push(d.ticket.server);
            now += Duration::from_millis(1);
        }
        assert_eq!(sent.iter().filter(|s| *s == "hung").count(), 2);
        assert!(sent.contains(&"healthy".to_owned()));
        assert_eq!(q.len_of("tenant-a"), 8);
    }

    /// One namespace names a server per object, every one of which hangs until the request
    /// timeout; another namespace's requests to a healthy server still start on their turn.
    #[test]
    fn many_hung_servers_of_one_namespace_leave_the_others_their_share() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(15);
        let mut q = Queue::new(QueueConfig::default());
        for i in 0..400 {
            q.push(ticket(&format!("https://10.0.{}.{}:443", i / 250, i % 250), "hostile", &format!("h{i}")), "h");
        }
        for i in 0..2000 {
            q.push(ticket("https://keycloak", "honest", &format!("o{i}")), "o");
        }
        // Simulate 60 s: hostile requests end at their timeout (and are queued again at once),
        // honest ones take 10 ms.
        let mut ends: Vec<(Instant, Ticket)> = Vec::new();
        let (mut now, mut honest_done, mut hostile_max) = (t0, 0, 0);
        while now < t0 + Duration::from_secs(60) {
            ends.sort_by_key(|(t, _)| *t);
            while ends.first().is_some_and(|(t, _)| *t <= now) {
                let (_, ticket) = ends.remove(0);
                q.done(&ticket);
                if ticket.namespace == "hostile" {
                    q.push(ticket, "h");
                } else {
                    honest_done += 1;
                }
            }
            match q.next(now) {
                Next::Go(d) => {
                    let took = if d.ticket.namespace == "hostile" { timeout } else { Duration::from_millis(10) };
                    ends.push((now + took, d.ticket));
                    hostile_max = hostile_max.max(q.in_flight_of("hostile"));
                }
                Next::WaitUntil(t) => now = t.min(ends.iter().map(|(t, _)| *t).min().unwrap_or(t)),
                Next::Idle => now = ends.iter().map(|(t, _)| *t).min().unwrap_or(now + Duration::from_millis(1)),
            }
        }
        // 2000 honest requests at 100/s take 20 s; all are done well within the minute.
        assert_eq!(honest_done, 2000, "the honest namespace was starved");
        assert!(hostile_max <= DEFAULT_MAX_IN_FLIGHT_PER_NAMESPACE, "{hostile_max}");
    }

    #[test]
    fn inside_a_namespace_a_hung_server_leaves_the_others_slots() {
        let t0 = Instant::now();
        let mut q = Queue::new(QueueConfig::default());
        for i in 0..20 {
            q.push(ticket("hung", "ns", &format!("h{i}")), "hung");
        }
        for i in 0..20 {
            q.push(ticket("keycloak", "ns", &format!("k{i}")), "keycloak");
        }
        let mut now = t0;
        let mut healthy = 0;
        // The hung server's requests never end; the healthy server's end at once.
        while now < t0 + Duration::from_secs(1) {
            match q.next(now) {
                Next::Go(d) if d.job == "keycloak" => {
                    healthy += 1;
                    q.done(&d.ticket);
                }
                Next::Go(_) => {}
                Next::WaitUntil(t) => now = t,
                Next::Idle => break,
            }
        }
        assert_eq!(healthy, 20);
        assert_eq!(q.in_flight_of("ns"), DEFAULT_MAX_IN_FLIGHT_PER_SERVER);
    }

    #[test]
    fn a_namespace_holds_at_most_its_share_however_many_servers_it_names() {
        let t0 = Instant::now();
        let mut q = Queue::new(config(64, 8, 8, 1000));
        for i in 0..100 {
            q.push(ticket(&format!("s{i}"), "busy", &format!("k{i}")), i);
        }
        let mut n = 0;
        while let Next::Go(_) = q.next(t0) {
            n += 1;
        }
        assert_eq!(n, 8);
        assert_eq!(q.in_flight_of("busy"), 8);
    }

    #[test]
    fn the_share_shrinks_as_namespaces_arrive() {
        let c = config(64, 8, 8, 1000);
        assert_eq!((c.share(1), c.share(8), c.share(16), c.share(1000)), (8, 8, 4, 1));
        let t0 = Instant::now();
        let mut q = Queue::new(config(4, 4, 100, 1000));
        for i in 0..10 {
            q.push(ticket(&format!("a{i}"), "a", &format!("a{i}")), "a");
        }
        let first: Vec<Dispatch<&str>> = std::iter::from_fn(|| match q.next(t0) {
            Next::Go(d) => Some(d),
            _ => None,
        })
        .collect();
        assert_eq!(first.len(), 4, "alone, a namespace may use every slot");
        q.push(ticket("b", "b", "b0"), "b");
        // Namespace a now has a share of 2: as its requests end, b gets the freed slot first.
        q.done(&first[0].ticket);
        assert_eq!(go(q.next(t0)).job, "b");
        q.done(&first[1].ticket);
        assert_eq!(q.next(t0), Next::Idle, "a holds 2, its share while b is active");
    }

    #[test]
    fn namespaces_take_turns_and_servers_take_turns_within_one() {
        let t0 = Instant::now();
        let mut q = Queue::new(config(100, 100, 100, 1000));
        for i in 0..200 {
            q.push(ticket("kc", "busy", &format!("busy-{i}")), "busy");
        }
        q.push(ticket("kc", "quiet", "quiet-0"), "quiet");
        let mut now = t0;
        let mut order = Vec::new();
        for _ in 0..3 {
            let d = go(q.next(now));
            order.push(d.job);
            q.done(&d.ticket);
            now += Duration::from_millis(1);
        }
        assert!(order[..2].contains(&"quiet"), "the quiet namespace waited behind the busy one: {order:?}");

        let mut q = Queue::new(config(100, 100, 100, 1000));
        for i in 0..50 {
            q.push(ticket("big", "ns", &format!("big-{i}")), "big");
        }
        q.push(ticket("small", "ns", "small-0"), "small");
        let first = go(q.next(t0)).job;
        let second = go(q.next(t0)).job;
        assert_eq!([first, second], ["big", "small"]);
    }

    #[test]
    fn the_global_cap_holds_and_frees() {
        let t0 = Instant::now();
        let mut q = Queue::new(config(2, 10, 10, 1000));
        for s in ["a", "b", "c"] {
            q.push(ticket(s, s, s), s);
        }
        let d1 = go(q.next(t0));
        go(q.next(t0));
        assert_eq!(q.next(t0), Next::Idle);
        q.done(&d1.ticket);
        assert_eq!(go(q.next(t0)).job, "c");
    }

    #[test]
    fn a_queued_request_is_replaced_or_cancelled_by_key() {
        let t0 = Instant::now();
        let mut q = Queue::new(config(10, 10, 10, 1000));
        q.push(ticket("a", "ns", "uid-1"), "old");
        q.push(ticket("a", "ns", "uid-1"), "new");
        assert_eq!(q.len(), 1);
        q.push(ticket("b", "ns", "uid-1"), "moved");
        assert_eq!(q.len(), 1);
        assert_eq!(go(q.next(t0)).job, "moved");
        q.push(ticket("a", "ns", "uid-2"), "x");
        assert_eq!(q.cancel("uid-2"), Some("x"));
        assert_eq!(q.cancel("uid-2"), None);
        assert_eq!(q.next(t0), Next::Idle);
    }

    #[test]
    fn retry_after_pauses_one_client_not_the_server() {
        let t0 = Instant::now();
        let mut q = Queue::new(config(10, 10, 10, 1000));
        let limited = Ticket { client: "kc/limited".into(), ..ticket("kc", "ns", "k1") };
        q.push(limited.clone(), 1);
        q.push(Ticket { key: "k2".into(), ..limited.clone() }, 2);
        q.push(ticket("kc", "other", "k3"), 3);
        let d = go(q.next(t0));
        assert_eq!(d.job, 1);
        q.pause("kc/limited", t0 + Duration::from_secs(30));
        q.done(&d.ticket);
        let later = t0 + Duration::from_secs(1);
        assert_eq!(go(q.next(later)).job, 3, "another client of the same server is not held");
        assert_eq!(q.next(later + Duration::from_secs(1)), Next::WaitUntil(t0 + Duration::from_secs(30)));
        assert_eq!(go(q.next(t0 + Duration::from_secs(30))).job, 2);
    }

    #[test]
    fn a_pause_never_holds_a_request_past_its_deadline() {
        let t0 = Instant::now();
        let mut q = Queue::new(config(10, 10, 10, 1000));
        q.pause("kc/client", t0 + Duration::from_secs(150));
        let due = Ticket { deadline: Some(t0 + Duration::from_secs(40)), ..ticket("kc", "ns", "k") };
        q.push(due, "save-the-token");
        assert_eq!(q.next(t0), Next::WaitUntil(t0 + Duration::from_secs(40)));
        assert_eq!(go(q.next(t0 + Duration::from_secs(40))).job, "save-the-token");
    }

    #[test]
    fn nothing_is_kept_for_idle_servers_namespaces_or_ended_pauses() {
        let t0 = Instant::now();
        let mut q = Queue::new(config(10, 10, 10, 10));
        for i in 0..100 {
            q.push(ticket(&format!("https://tenant-{i}.example"), &format!("ns-{i}"), &format!("k{i}")), i);
            q.pause(&format!("c{i}"), t0 + Duration::from_secs(1));
        }
        let mut now = t0;
        while !q.is_empty() {
            if let Next::Go(d) = q.next(now) {
                q.done(&d.ticket);
            }
            now += Duration::from_millis(1);
        }
        assert_eq!(q.next(now + Duration::from_secs(2)), Next::Idle);
        assert_eq!(q.footprint(), (0, 0, 0));
    }
}
