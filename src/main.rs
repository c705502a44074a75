//! Command line of registry-access-operator: `run` the controller, or print the `crd`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kube::CustomResourceExt;
use registry_access_operator::api::RegistryAccess;
use registry_access_operator::controller::{self, RunConfig};
use registry_access_operator::leader::LeaderConfig;
use registry_access_operator::limits::{self, LimitConfig};
use registry_access_operator::metrics::Metrics;
use registry_access_operator::policy;
use registry_access_operator::probes::{self, Readiness};
use registry_access_operator::telemetry::{self, LogFormat};
use registry_access_operator::token;
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
    #[arg(long, default_value = "registry-access-operator")]
    leader_election_lease_name: String,
    /// How long the Lease stays valid after the holder's last renewal, e.g. `15s`: the longest
    /// a failed leader blocks a standby.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    leader_election_lease_duration: Duration,
    /// The holder renews the Lease this long before it would expire.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    leader_election_renew_grace: Duration,
    /// Most token requests in flight for the whole operator.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_IN_FLIGHT)]
    max_requests_in_flight: usize,
    /// Most token requests in flight to one Keycloak server.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_IN_FLIGHT_PER_SERVER)]
    max_requests_in_flight_per_server: usize,
    /// Most token requests per second to one Keycloak server.
    #[arg(long, default_value_t = limits::DEFAULT_PER_SERVER_PER_SECOND)]
    max_requests_per_second_per_server: u32,
    /// Log filter, e.g. `info` or `registry_access_operator=debug`.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Most RegistryAccess objects reconciled at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Time allowed to connect to Keycloak, e.g. `5s`.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Time allowed for one token request, e.g. `15s`.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    request_timeout: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d: kube::core::Duration = s.parse().map_err(|e| format!("{e}"))?;
    if d.is_negative() {
        return Err("duration must not be negative".to_owned());
    }
    Ok(d.into())
}

#[tokio::main]
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
        Command::Run(args) => run(*args).await,
    }
}

async fn run(args: RunArgs) -> ExitCode {
    telemetry::init(&args.log_level, args.log_format);
    token::install_crypto_provider();
    let client = match client(args.kubeconfig.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build a Kubernetes client");
            return ExitCode::FAILURE;
        }
    };
    let allowed_servers: Vec<String> = args.allowed_servers.into_iter().filter(|s| !s.is_empty()).collect();
    if let Err(e) = policy::validate_prefixes(&allowed_servers) {
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
        allowed_servers,
        limits: LimitConfig {
            max_in_flight: args.max_requests_in_flight,
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
            lease_duration: args.leader_election_lease_duration,
            renew_grace: args.leader_election_renew_grace,
        }),
        concurrency: args.concurrency,
        token_client: token::ClientConfig {
            connect_timeout: args.connect_timeout,
            request_timeout: args.request_timeout,
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
