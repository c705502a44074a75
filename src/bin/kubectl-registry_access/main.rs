//! `kubectl registry-access`: status, on-demand renewal, token claims and the operator's health,
//! as a kubectl plugin that uses the user's kubeconfig and context.
#![forbid(unsafe_code)]

mod view;

use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use registry_access_operator::api::{REFRESH_ANNOTATION, RegistryAccess};
use registry_access_operator::text::for_terminal;
use serde::Serialize;

/// The CRD's name.
const CRD: &str = "registryaccesses.registry-access.io";
/// Leases named like this (the operator's default, and the chart's `<release>-registry-access-operator`)
/// are the operator's.
const LEASE_SUFFIX: &str = registry_access_operator::runtime::leader::DEFAULT_LEASE_NAME;

/// Short-lived Keycloak tokens kept in Secrets by registry-access-operator: their state, on-demand
/// renewal, the claims of the current token and the operator's health.
#[derive(Parser)]
#[command(name = "kubectl-registry_access", bin_name = "kubectl registry-access", version)]
struct Cli {
    /// Path to the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, global = true)]
    context: Option<String>,
    /// Namespace (default: the context's namespace, else `default`).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long, global = true)]
    all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "text")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Text,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Command {
    /// A table of RegistryAccess objects; with NAME, its conditions, recent Events and token Secret.
    Status { name: Option<String> },
    /// Ask for one new token per object now (sets the refresh annotation).
    Renew {
        name: Option<String>,
        /// Every object of the namespace (or of all namespaces with -A).
        #[arg(long, conflicts_with = "name")]
        all: bool,
        /// Wait until each object's status shows a token issued later than the one it held when
        /// asked (its Secret holds it by then).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// The current token's claims (issuer, client, roles, scope, times); never the token itself.
    Inspect { name: String },
    /// The operator as a user sees it: the CRD, the Lease holder, objects Ready and Degraded by reason.
    Check,
    /// Shell completion script.
    Completion { shell: clap_complete::Shell },
}

/// A failure, told in terms of what the user can do about it.
#[derive(Debug, thiserror::Error)]
enum PluginError {
    #[error("cannot load the kubeconfig: {0}")]
    Config(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{kind} {namespace}/{name} does not exist")]
    NotFound { kind: &'static str, namespace: String, name: String },
    #[error("{0}")]
    Usage(String),
    #[error("the Kubernetes API failed while reading {what}: {source}")]
    Api { what: String, source: kube::Error },
    #[error("{0}")]
    Other(String),
}

/// What a request was for, to turn an API error into advice.
struct Access {
    verb: &'static str,
    resource: &'static str,
    namespace: Option<String>,
    command: &'static str,
}

impl Access {
    fn scope(&self) -> String {
        self.namespace.as_ref().map_or_else(|| "all namespaces".to_owned(), |ns| format!("namespace {ns}"))
    }

    /// What a denial of this request means, e.g. "you may not read Secrets in namespace X:
    /// inspect needs get on secrets".
    fn denied(&self) -> String {
        let what = match (self.verb, self.resource) {
            ("get", "secrets") => "read Secrets".to_owned(),
            (verb, resource) => format!("{verb} {resource}"),
        };
        format!("you may not {what} in {}: {} needs {} on {}", self.scope(), self.command, self.verb, self.resource)
    }

    fn fail(&self, e: kube::Error) -> PluginError {
        match &e {
            kube::Error::Api(s) if s.code == 403 => PluginError::Forbidden(self.denied()),
            _ => PluginError::Api { what: format!("{} ({})", self.resource, self.scope()), source: e },
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    registry_access_operator::keycloak::token::install_crypto_provider();
    let cli = Cli::parse();
    if let Command::Completion { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "kubectl-registry_access", &mut std::io::stdout());
        return;
    }
    if let Err(e) = run(cli).await {
        eprintln!("error: {}", for_terminal(&e.to_string()));
        std::process::exit(1);
    }
}

async fn client(cli: &Cli) -> Result<(Client, String), PluginError> {
    let options = KubeConfigOptions { context: cli.context.clone(), ..KubeConfigOptions::default() };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kc =
                Kubeconfig::read_from(path).map_err(|e| PluginError::Config(format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kc, &options).await
        }
        None => Config::from_kubeconfig(&options).await,
    }
    .map_err(|e| PluginError::Config(e.to_string()))?;
    let namespace = cli.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| PluginError::Config(e.to_string()))?;
    Ok((client, namespace))
}

async fn run(cli: Cli) -> Result<(), PluginError> {
    let (client, namespace) = client(&cli).await?;
    let scope = (!cli.all_namespaces).then(|| namespace.clone());
    let ras: Api<RegistryAccess> = match &scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let now = Timestamp::now();
    match &cli.command {
        Command::Status { name: None } => {
            let access =
                Access { verb: "list", resource: "registryaccesses", namespace: scope.clone(), command: "status" };
            let mut rows: Vec<view::Row> = ras
                .list(&ListParams::default())
                .await
                .map_err(|e| access.fail(e))?
                .items
                .iter()
                .map(|r| view::row(r, now))
                .collect();
            rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            match cli.output {
                Output::Text if rows.is_empty() => println!(
                    "No RegistryAccess objects in {}.",
                    scope.map_or("any namespace".into(), |n| format!("namespace {n}"))
                ),
                Output::Text => out(&view::table(&rows, cli.all_namespaces)),
                _ => print_as(cli.output, &rows)?,
            }
        }
        Command::Status { name: Some(name) } => {
            let ra = get(&client, &namespace, name, "status").await?;
            let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
            let selector = format!("involvedObject.kind=RegistryAccess,involvedObject.name={name}");
            let events = events
                .list(&ListParams::default().fields(&selector))
                .await
                .map_err(|e| {
                    Access {
                        verb: "list",
                        resource: "events",
                        namespace: Some(namespace.clone()),
                        command: "status NAME",
                    }
                    .fail(e)
                })?
                .items;
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
            let secret_name =
                ra.status.as_ref().and_then(|s| s.secret_name.clone()).unwrap_or_else(|| ra.token_secret_name());
            // Shown without its values; a user who may not read Secrets still gets the rest.
            let (secret, secret_note) = match secrets.get_opt(&secret_name).await {
                Ok(s) => (s.map(strip_values), None),
                Err(kube::Error::Api(e)) if e.code == 403 => {
                    (None, Some(format!("{secret_name}: not shown (you may not get secrets in namespace {namespace})")))
                }
                Err(e) => {
                    let access = Access {
                        verb: "get",
                        resource: "secrets",
                        namespace: Some(namespace.clone()),
                        command: "status NAME",
                    };
                    return Err(access.fail(e));
                }
            };
            let mut d = view::details(&ra, &events, secret.as_ref(), now);
            d.secret_note = secret_note;
            match cli.output {
                Output::Text => out(&view::details_text(&d)),
                _ => print_as(cli.output, &d)?,
            }
        }
        Command::Renew { name, all, wait, timeout } => {
            let targets: Vec<RegistryAccess> = match (name, all) {
                (Some(name), _) => vec![get(&client, &namespace, name, "renew").await?],
                (None, true) => {
                    ras.list(&ListParams::default())
                        .await
                        .map_err(|e| {
                            Access {
                                verb: "list",
                                resource: "registryaccesses",
                                namespace: scope.clone(),
                                command: "renew --all",
                            }
                            .fail(e)
                        })?
                        .items
                }
                (None, false) => return Err(PluginError::Usage("renew needs a NAME or --all".into())),
            };
            renew(&client, targets, *wait, Duration::from_secs(*timeout), cli.output).await?;
        }
        Command::Inspect { name } => {
            let ra = get(&client, &namespace, name, "inspect").await?;
            let secret_name =
                ra.status.as_ref().and_then(|s| s.secret_name.clone()).unwrap_or_else(|| ra.token_secret_name());
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
            let secret = secrets
                .get_opt(&secret_name)
                .await
                .map_err(|e| {
                    Access { verb: "get", resource: "secrets", namespace: Some(namespace.clone()), command: "inspect" }
                        .fail(e)
                })?
                .ok_or_else(|| PluginError::NotFound {
                    kind: "Secret",
                    namespace: namespace.clone(),
                    name: secret_name.clone(),
                })?;
            let token = secret
                .data
                .as_ref()
                .and_then(|d| d.get("access_token"))
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                .ok_or_else(|| {
                    PluginError::Other(format!("Secret {namespace}/{secret_name} holds no access_token yet"))
                })?;
            let claims = view::claims(&token, now).map_err(PluginError::Other)?;
            match cli.output {
                Output::Text => out(&view::claims_text(&claims)),
                _ => print_as(cli.output, &claims)?,
            }
        }
        Command::Check => {
            let health = check(&client).await?;
            match cli.output {
                Output::Text => out(&view::health_text(&health)),
                _ => print_as(cli.output, &health)?,
            }
        }
        Command::Completion { .. } => {}
    }
    Ok(())
}

/// A Secret with its values dropped (only the key names are shown).
fn strip_values(mut s: Secret) -> Secret {
    if let Some(d) = s.data.as_mut() {
        for v in d.values_mut() {
            v.0.clear();
        }
    }
    s.string_data = None;
    if let Some(a) = s.metadata.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    s
}

async fn get(
    client: &Client,
    namespace: &str,
    name: &str,
    command: &'static str,
) -> Result<RegistryAccess, PluginError> {
    let api: Api<RegistryAccess> = Api::namespaced(client.clone(), namespace);
    api.get_opt(name)
        .await
        .map_err(|e| {
            Access { verb: "get", resource: "registryaccesses", namespace: Some(namespace.to_owned()), command }.fail(e)
        })?
        .ok_or_else(|| PluginError::NotFound {
            kind: "RegistryAccess",
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
}

/// The result of renewing one object.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Renewed {
    namespace: String,
    name: String,
    requested_at: String,
    previous_issued_at: Option<String>,
    issued_at: Option<String>,
}

async fn renew(
    client: &Client,
    targets: Vec<RegistryAccess>,
    wait: bool,
    timeout: Duration,
    output: Output,
) -> Result<(), PluginError> {
    // Issue times are whole seconds: a token issued in this very second could not be told from
    // its successor, so the request waits for the next second.
    let newest = targets.iter().filter_map(|r| r.status.as_ref()?.issued_at.as_ref()).map(|t| t.0.as_second()).max();
    let now = Timestamp::now();
    if newest.is_some_and(|s| s >= now.as_second()) {
        tokio::time::sleep(Duration::from_nanos(1_000_000_000 - u64::from(now.subsec_nanosecond().unsigned_abs())))
            .await;
    }
    let requested = Timestamp::now();
    let mut results = Vec::new();
    for ra in &targets {
        let (ns, name) =
            (ra.metadata.namespace.clone().unwrap_or_default(), ra.metadata.name.clone().unwrap_or_default());
        let api: Api<RegistryAccess> = Api::namespaced(client.clone(), &ns);
        let patch = serde_json::json!({"metadata": {"annotations": {REFRESH_ANNOTATION: requested.to_string()}}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(|e| {
            Access { verb: "patch", resource: "registryaccesses", namespace: Some(ns.clone()), command: "renew" }
                .fail(e)
        })?;
        let previous = ra.status.as_ref().and_then(|s| s.issued_at.as_ref()).map(|t| t.0);
        results.push((ns, name, previous, None::<Timestamp>));
    }
    if wait {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            for (ns, name, previous, issued) in results.iter_mut().filter(|r| r.3.is_none()) {
                let api: Api<RegistryAccess> = Api::namespaced(client.clone(), ns);
                let now = api
                    .get_opt(name)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|r| r.status)
                    .and_then(|s| s.issued_at)
                    .map(|t| t.0);
                if now.is_some() && (previous.is_none() || now > *previous) {
                    *issued = now;
                }
            }
            if results.iter().all(|r| r.3.is_some()) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                let waiting: Vec<String> =
                    results.iter().filter(|r| r.3.is_none()).map(|r| format!("{}/{}", r.0, r.1)).collect();
                return Err(PluginError::Other(format!(
                    "no new token within {}s for {}: see `kubectl registry-access status NAME` for why",
                    timeout.as_secs(),
                    waiting.join(", ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let results: Vec<Renewed> = results
        .into_iter()
        .map(|(namespace, name, previous, issued)| Renewed {
            namespace,
            name,
            requested_at: requested.to_string(),
            previous_issued_at: previous.map(|t| t.to_string()),
            issued_at: issued.map(|t| t.to_string()),
        })
        .collect();
    match output {
        Output::Text => {
            for r in &results {
                match &r.issued_at {
                    Some(at) => println!("{}/{}: renewed, new token issued at {at}", r.namespace, r.name),
                    None => println!("{}/{}: renewal requested", r.namespace, r.name),
                }
            }
            Ok(())
        }
        _ => print_as(output, &results),
    }
}

async fn check(client: &Client) -> Result<view::Health, PluginError> {
    let mut health = view::Health::default();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = crds.get_opt(CRD).await.map_err(|e| {
        Access { verb: "get", resource: "customresourcedefinitions", namespace: None, command: "check" }.fail(e)
    })?;
    if let Some(crd) = crd {
        health.crd_installed = true;
        health.served_versions = crd.spec.versions.iter().filter(|v| v.served).map(|v| v.name.clone()).collect();
        health.storage_version = crd.spec.versions.iter().find(|v| v.storage).map(|v| v.name.clone());
    } else {
        return Ok(health);
    }
    let leases: Api<Lease> = Api::all(client.clone());
    let leases = match leases.list(&ListParams::default()).await {
        Ok(l) => l.items,
        // The rest of the picture is still worth showing.
        Err(kube::Error::Api(e)) if e.code == 403 => {
            health.lease_note =
                Some(Access { verb: "list", resource: "leases", namespace: None, command: "check" }.denied());
            Vec::new()
        }
        Err(e) => return Err(Access { verb: "list", resource: "leases", namespace: None, command: "check" }.fail(e)),
    };
    health.leases = leases
        .into_iter()
        .filter(|l| l.metadata.name.as_deref().is_some_and(|n| n.ends_with(LEASE_SUFFIX)))
        .map(|l| {
            let name = format!("{}/{}", l.metadata.namespace.unwrap_or_default(), l.metadata.name.unwrap_or_default());
            (name, l.spec.and_then(|s| s.holder_identity).filter(|h| !h.is_empty()))
        })
        .collect();
    let ras: Api<RegistryAccess> = Api::all(client.clone());
    let objects = ras.list(&ListParams::default()).await.map_err(|e| {
        Access { verb: "list", resource: "registryaccesses", namespace: None, command: "check" }.fail(e)
    })?;
    view::count(&mut health, &objects.items);
    Ok(health)
}

fn print_as<T: Serialize>(output: Output, value: &T) -> Result<(), PluginError> {
    let text = match output {
        Output::Yaml => serde_yaml::to_string(value).map_err(|e| PluginError::Other(e.to_string()))?,
        _ => serde_json::to_string_pretty(value).map_err(|e| PluginError::Other(e.to_string()))? + "\n",
    };
    out(&text);
    Ok(())
}

/// Prints text that may hold foreign strings (roles, annotations, claims, Event messages) with
/// every unprintable character escaped: nothing read from the cluster can act on the terminal.
fn out(text: &str) {
    print!("{}", for_terminal(text));
}
