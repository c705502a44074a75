//! Command line of registry-access-operator: `run` the controller, or print the `crd`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kube::CustomResourceExt;
use registry_access_operator::api::RegistryAccess;
use registry_access_operator::controller::{self, RunConfig};
use registry_access_operator::keycloak::token;
use registry_access_operator::metrics::Metrics;
use registry_access_operator::policy::{self, Policy};
use registry_access_operator::reconcile::schedule;
use registry_access_operator::requests::queue::{self, QueueConfig};
use registry_access_operator::runtime::leader::{self, LeaderConfig};
use registry_access_operator::runtime::probes::{self, Readiness};
use registry_access_operator::runtime::telemetry::{self, LogFormat};
use std::sync::Arc;

#[derive(Parser)]
#[command(version, about = "Keeps a fresh Keycloak access token in a Secret for every RegistryAccess")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the RegistryAccess CustomResourceDefinition as YAML.
    Crd,
    /// Print the CRD's field reference as Markdown (docs/reference.md).
    CrdReference,
    /// Run the controller (in a cluster, or with a kubeconfig).
    Run(Box<RunArgs>),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Path of a kubeconfig file. Default: $KUBECONFIG, ~/.kube/config, or the in-cluster
    /// service account.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Watch only this namespace; repeat the flag (or separate with commas) for several.
    /// Default: all namespaces.
    #[arg(long = "namespace", env = "WATCH_NAMESPACE", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Address of the /healthz, /readyz and /metrics endpoints, e.g. `0.0.0.0:8081`. Default:
    /// not served.
    #[arg(long, env = "PROBE_ADDR")]
    probe_addr: Option<std::net::SocketAddr>,
    /// Keycloak servers RegistryAccess objects may use, as URL prefixes (repeat, or separate
    /// with commas), e.g. `https://keycloak.example.com/auth`. Default: any server.
    #[arg(long = "allowed-server", env = "ALLOWED_SERVERS", value_delimiter = ',')]
    allowed_servers: Vec<String>,
    /// Allow Keycloak servers with plain `http://` URLs. Without it, an object naming one gets
    /// reason InsecureServer and nothing is sent: over http the client secret and the token
    /// cross the network readable by anyone on the path. For local tests and demos only.
    #[arg(long, env = "ALLOW_INSECURE_HTTP")]
    allow_insecure_http: bool,
    /// Follow the pods of the namespaces that have RegistryAccess objects (needs get, list,
    /// watch and patch on pods): after each token Secret write, change the
    /// registry-access.io/token-written annotation of the running pods that mount it as a volume,
    /// so their kubelets update the file within about a second (where the object's
    /// spec.nudgePods allows it); and report pods that read a token Secret through an
    /// environment variable or a subPath mount (TokenReadOnce). `--nudge-pods=false` turns both
    /// off cluster-wide.
    #[arg(long, env = "NUDGE_PODS", default_value_t = true, action = clap::ArgAction::Set)]
    nudge_pods: bool,
    /// Name of the Secret holding the operator's digest key (a random HMAC key, created when
    /// missing), which keys the fingerprints of client secrets recorded on token Secrets.
    #[arg(long, default_value = "registry-access-operator-digest-key")]
    digest_key_secret: String,
    /// Namespace of the digest key Secret. Default: $POD_NAMESPACE, else `default`.
    #[arg(long, env = "DIGEST_KEY_NAMESPACE")]
    digest_key_namespace: Option<String>,
    /// The longest a pod's mounted Secret takes to show an update (the kubelet resyncs each pod
    /// every 1 to 1.5 x its syncFrequency, 60 s by default): an object whose tokens are renewed
    /// with less validity left is reported Degraded (RenewBeforeTooShort). `0s` turns the
    /// warning off (when no pod mounts the token Secrets as volumes). 0s to 10m.
    #[arg(long, default_value_t = Span(schedule::DEFAULT_MOUNT_DELAY), value_parser = duration_in(Duration::ZERO, Duration::from_secs(600)))]
    kubelet_sync_period: Span,
    /// A file of PEM CA certificates trusted for every token request, in addition to the system
    /// roots (e.g. the platform's private CA).
    #[arg(long, env = "CA_BUNDLE_FILE")]
    ca_bundle_file: Option<PathBuf>,
    /// Run only while holding a Lease, so that of several replicas only one writes.
    #[arg(long, env = "LEADER_ELECTION")]
    leader_election: bool,
    /// Namespace of the Lease. Default: $POD_NAMESPACE, else `default`.
    #[arg(long, env = "LEADER_ELECTION_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, default_value = leader::DEFAULT_LEASE_NAME)]
    leader_election_lease_name: String,
    /// How long the Lease stays valid after the holder's last renewal, e.g. `15s`: the longest
    /// a failed leader blocks a standby (2s to 10m).
    #[arg(long, default_value_t = Span(leader::DEFAULT_LEASE_DURATION), value_parser = duration_in(Duration::from_secs(2), Duration::from_secs(600)))]
    leader_election_lease_duration: Span,
    /// The holder renews the Lease this long before it would expire (1s to 10m, shorter than the
    /// lease duration).
    #[arg(long, default_value_t = Span(leader::DEFAULT_RENEW_GRACE), value_parser = duration_in(Duration::from_secs(1), Duration::from_secs(600)))]
    leader_election_renew_grace: Span,
    /// Most token requests in flight for the whole operator (1 to 10000).
    #[arg(long, default_value_t = queue::DEFAULT_MAX_IN_FLIGHT, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    max_requests_in_flight: usize,
    /// Most token requests in flight for one namespace, over all the servers its objects name
    /// (1 to 1000); while n namespaces have requests, each may have at most
    /// max-requests-in-flight / n in flight (at least one).
    #[arg(long, default_value_t = queue::DEFAULT_MAX_IN_FLIGHT_PER_NAMESPACE, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000))]
    max_requests_in_flight_per_namespace: usize,
    /// Most token requests in flight to one Keycloak server (1 to 1000): a server that never
    /// answers holds this many, and no more.
    #[arg(long, default_value_t = queue::DEFAULT_MAX_IN_FLIGHT_PER_SERVER, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000))]
    max_requests_in_flight_per_server: usize,
    /// Token requests per second to one Keycloak server, evenly spread (1 to 100000). Size it
    /// as objects / (token lifetime - renewBefore) in seconds, with margin (2.25 x objects / 300
    /// for Keycloak's default 300s tokens and the default renewBefore).
    #[arg(long, default_value_t = queue::DEFAULT_PER_SERVER_PER_SECOND, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_requests_per_second_per_server: u32,
    /// Log filter, e.g. `info` or `registry_access_operator=debug`.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Most RegistryAccess objects reconciled at once (1 to 1024). Reconciles only wait for the
    /// Kubernetes API: token requests wait in their own queue.
    #[arg(long, default_value_t = controller::DEFAULT_CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..=1024))]
    concurrency: u16,
    /// Time allowed to connect to Keycloak, e.g. `5s` (100ms to 5m).
    #[arg(long, default_value_t = Span(token::DEFAULT_CONNECT_TIMEOUT), value_parser = duration_in(Duration::from_millis(100), Duration::from_secs(300)))]
    connect_timeout: Span,
    /// Time allowed for one token request, e.g. `15s` (100ms to 5m).
    #[arg(long, default_value_t = Span(token::DEFAULT_REQUEST_TIMEOUT), value_parser = duration_in(Duration::from_millis(100), Duration::from_secs(300)))]
    request_timeout: Span,
    /// Time allowed for one Kubernetes API call, e.g. `30s` (1s to 5m): a connection that stops
    /// answering frees its reconcile slot after this long.
    #[arg(long, default_value_t = Span(controller::DEFAULT_API_TIMEOUT), value_parser = duration_in(Duration::from_secs(1), Duration::from_secs(300)))]
    api_timeout: Span,
}

/// A duration flag, shown in `--help` as Go-style text (`90s`, `100ms`), so that each default is
/// the library's constant and not a second copy of it in text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span(Duration);

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.0;
        if d.subsec_millis() != 0 { write!(f, "{}ms", d.as_millis()) } else { write!(f, "{}s", d.as_secs()) }
    }
}

/// A parser of Go-style durations (`30s`, `1m30s`) within `[min, max]`.
fn duration_in(min: Duration, max: Duration) -> impl Fn(&str) -> Result<Span, String> + Clone {
    move |s: &str| {
        let d: kube::core::Duration = s.parse().map_err(|e| format!("{e}"))?;
        if d.is_negative() {
            return Err("duration must not be negative".to_owned());
        }
        let d: Duration = d.into();
        if d < min || d > max {
            return Err(format!("must be between {min:?} and {max:?}"));
        }
        Ok(Span(d))
    }
}

/// One thread: the operator waits on the network and does little work per event, and one thread
/// means one allocator arena and no hand-over between workers (measured with `make bench`: less
/// memory and CPU per refresh than the two-worker runtime).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match serde_yaml::to_string(&RegistryAccess::crd()) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::CrdReference => {
            print!("{}", registry_access_operator::reference::markdown());
            ExitCode::SUCCESS
        }
        Command::Run(args) => run(*args).await,
    }
}

async fn run(args: RunArgs) -> ExitCode {
    telemetry::init(&args.log_level, args.log_format);
    token::install_crypto_provider();
    if args.leader_election && args.leader_election_renew_grace.0 >= args.leader_election_lease_duration.0 {
        tracing::error!("--leader-election-renew-grace must be shorter than --leader-election-lease-duration");
        return ExitCode::FAILURE;
    }
    let client = match client(args.kubeconfig.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build a Kubernetes client");
            return ExitCode::FAILURE;
        }
    };
    let allowed_servers: Vec<String> = args.allowed_servers.into_iter().filter(|s| !s.is_empty()).collect();
    if let Err(e) = policy::validate_prefixes(&allowed_servers, args.allow_insecure_http) {
        tracing::error!(error = %e, "invalid --allowed-server");
        return ExitCode::FAILURE;
    }
    let ca_bundle = match &args.ca_bundle_file {
        None => None,
        Some(path) => match std::fs::read_to_string(path) {
            Ok(pem) => match token::parse_ca_bundle(&pem) {
                Ok(_) => Some(pem),
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "invalid --ca-bundle-file");
                    return ExitCode::FAILURE;
                }
            },
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read --ca-bundle-file");
                return ExitCode::FAILURE;
            }
        },
    };
    let readiness = Readiness::default();
    let metrics = Arc::new(Metrics::new());
    if let Some(addr) = args.probe_addr {
        match probes::serve(addr, readiness.clone(), metrics.clone()).await {
            Ok(local) => tracing::info!(addr = %local, "serving /healthz and /readyz"),
            Err(e) => {
                tracing::error!(addr = %addr, error = %e, "cannot serve the probe endpoints");
                return ExitCode::FAILURE;
            }
        }
    }
    let config = RunConfig {
        namespaces: args.namespaces.into_iter().filter(|n| !n.is_empty()).collect(),
        readiness,
        policy: Policy { allowed_servers, allow_insecure_http: args.allow_insecure_http },
        digest_key_secret: (
            args.digest_key_namespace
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "default".to_owned()),
            args.digest_key_secret,
        ),
        mount_delay: args.kubelet_sync_period.0,
        limits: QueueConfig {
            max_in_flight: args.max_requests_in_flight,
            max_in_flight_per_namespace: args.max_requests_in_flight_per_namespace,
            max_in_flight_per_server: args.max_requests_in_flight_per_server,
            per_server_per_second: args.max_requests_per_second_per_server,
        },
        metrics,
        instance: std::env::var("POD_NAME").ok(),
        leader: args.leader_election.then(|| LeaderConfig {
            namespace: args
                .leader_election_namespace
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "default".to_owned()),
            lease_name: args.leader_election_lease_name,
            identity: std::env::var("POD_NAME").unwrap_or_else(|_| {
                format!("{}-{}", std::env::var("HOSTNAME").unwrap_or_else(|_| "operator".into()), std::process::id())
            }),
            lease_duration: args.leader_election_lease_duration.0,
            renew_grace: args.leader_election_renew_grace.0,
        }),
        concurrency: args.concurrency,
        nudge_pods: args.nudge_pods,
        api_timeout: args.api_timeout.0,
        token_client: token::ClientConfig {
            connect_timeout: args.connect_timeout.0,
            request_timeout: args.request_timeout.0,
            ca_bundle,
        },
    };
    match controller::run(client, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "controller failed");
            ExitCode::FAILURE
        }
    }
}

async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, Box<dyn std::error::Error>> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}
