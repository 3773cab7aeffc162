//! canaryctl: adjust canary-router's canaries through xDS, for a fleet of Envoys.
//!
//! `canaryctl serve` is the control plane (ADS for the filter's ECDS resource, an admin API, a durable
//! state file); every other command is a client of its admin API.

mod admin;
mod als;
mod analysis;
mod availability;
mod charts;
mod client;
mod coverage;
mod durability;
mod evidence;
mod findings;
mod fleet;
mod identity;
mod intake;
mod judge;
mod leader;
mod lrs;
mod metrics_sink;
mod notifier;
mod notify;
mod prometheus;
mod rollout;
mod server;
mod sources;
mod state;
mod store;
mod tls;
mod user_metrics;
mod xds;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogServiceServer;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use serde_json::json;

use client::{CliError, Client, Wait};
use fleet::FleetSettings;
use server::{Artifact, FilterSettings, Metrics, Server};
use state::{Desired, Saved, StateFile};

#[derive(Parser)]
#[command(
    name = "canaryctl",
    version,
    about = "Adjust canary-router's canaries through xDS, for a fleet of Envoys"
)]
struct Cli {
    /// The admin API of `canaryctl serve`.
    #[arg(
        long,
        global = true,
        env = "CANARYCTL_SERVER",
        default_value = "http://127.0.0.1:9902"
    )]
    server: String,
    /// The admin token (serve: require it on /v1; other commands: send it). Visible in `ps`: prefer
    /// --token-file or the environment.
    #[arg(long, global = true, env = "CANARYCTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the admin token (one line; a trailing newline is ignored).
    #[arg(long, global = true, env = "CANARYCTL_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct WaitArgs {
    /// How long to wait for every connected Envoy to apply the change.
    #[arg(long, default_value = "30", value_name = "SECONDS")]
    timeout: f64,
    /// Save and push, but do not wait for the Envoys.
    #[arg(long)]
    no_wait: bool,
    /// Exit 0 even when Envoys of the fleet are disconnected and did not get the change (they are
    /// still named; without this flag that is exit 3).
    #[arg(long)]
    allow_disconnected: bool,
}

impl WaitArgs {
    fn wait(&self) -> Wait {
        Wait {
            enabled: !self.no_wait,
            timeout: Duration::from_secs_f64(self.timeout.max(0.0)),
            allow_disconnected: self.allow_disconnected,
        }
    }
}

/// Where the state is kept: the state file (default), or etcd shared by replicas.
#[derive(clap::Args, Clone)]
struct StoreArgs {
    /// The state file: reloaded on start, rewritten atomically on every change (one canaryctl).
    #[arg(long, default_value = "canaryctl-state.json")]
    state: String,
    /// Keep the state in etcd instead of the state file, shared by every replica given the same store:
    /// etcd://host:2379,host:2379 (the members' client URLs; TLS with --store-ca).
    #[arg(long, env = "CANARYCTL_STORE", value_name = "URL")]
    store: Option<String>,
    /// The prefix of canaryctl's keys in etcd (one per canaryctl deployment).
    #[arg(long, default_value = "/canaryctl/", value_name = "PREFIX")]
    store_prefix: String,
    /// The CA certificate (PEM) of etcd's serving certificates: speak TLS to etcd.
    #[arg(long, value_name = "PEM")]
    store_ca: Option<String>,
    /// This replica's client certificate for etcd (PEM), with --store-key.
    #[arg(long, value_name = "PEM", requires_all = ["store_key", "store_ca"])]
    store_cert: Option<String>,
    /// The private key of --store-cert (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["store_cert", "store_ca"])]
    store_key: Option<String>,
    /// etcd's auth: the user canaryctl authenticates as, with --store-password-file.
    #[arg(long, value_name = "USER", requires = "store_password_file")]
    store_user: Option<String>,
    /// A file holding the etcd user's password (one line).
    #[arg(long, value_name = "FILE", requires = "store_user")]
    store_password_file: Option<String>,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy a state file into etcd, for replicas to start from (refused when etcd already holds a state).
    Migrate {
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
// Parsed once per process: the size of `serve`'s flags does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the control plane: xDS (ADS) for the Envoys and the admin API for these commands.
    Serve {
        /// Where Envoys connect (gRPC, ADS). Beyond loopback it needs mTLS (--xds-tls-cert, --xds-tls-key,
        /// --xds-client-ca) or --insecure-xds.
        #[arg(long, default_value = "127.0.0.1:18000")]
        xds: SocketAddr,
        /// The xDS port's certificate chain (PEM). With --xds-tls-key and --xds-client-ca, every Envoy must
        /// connect with TLS 1.3 and a client certificate; the files are re-read on change and on SIGHUP.
        #[arg(long, value_name = "PEM", requires_all = ["xds_tls_key", "xds_client_ca"])]
        xds_tls_cert: Option<PathBuf>,
        /// The private key of --xds-tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
        #[arg(long, value_name = "PEM", requires_all = ["xds_tls_cert", "xds_client_ca"])]
        xds_tls_key: Option<PathBuf>,
        /// The CA certificates (PEM) that sign the Envoys' client certificates. A certificate names the
        /// Envoys it may speak for in URI SANs: spiffe://<domain>/envoy/<cluster>/<node id>, or
        /// spiffe://<domain>/envoy/<cluster> for any node of the cluster.
        #[arg(long, value_name = "PEM", requires_all = ["xds_tls_cert", "xds_tls_key"])]
        xds_client_ca: Option<PathBuf>,
        /// Only SPIFFE ids in this trust domain name Envoys (default: any signed by --xds-client-ca).
        #[arg(long, value_name = "DOMAIN", requires = "xds_client_ca")]
        xds_trust_domain: Option<String>,
        /// Serve xDS without TLS on a non-loopback address: anyone who reaches the port reads the filter
        /// config (override tokens included) and can pose as an Envoy.
        #[arg(long, conflicts_with = "xds_tls_cert")]
        insecure_xds: bool,
        /// Where the admin API listens (JSON over HTTP; keep it on loopback or behind a token).
        #[arg(long, default_value = "127.0.0.1:9902")]
        admin: SocketAddr,
        #[command(flatten)]
        store: StoreArgs,
        /// With --store etcd://…: this replica's name, unique among the replicas (its fleet's key, the leader
        /// key's value). Default: the host's name and the admin port.
        #[arg(long, value_name = "NAME")]
        replica_name: Option<String>,
        /// With --store etcd://…: the judge's lease. A replica that stops renewing it (killed, paused, cut off
        /// from etcd) stops judging before it expires; another leads after it does.
        #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
        lease: Duration,
        /// The plugin configuration to start from when there is no state file yet.
        #[arg(long, value_name = "FILE")]
        init_config: Option<String>,
        /// Replace a saved config that this build refuses with FILE, as the next version, keeping the
        /// fleet; refused when the saved config is valid.
        #[arg(long, value_name = "FILE", conflicts_with = "init_config")]
        recover_config: Option<String>,
        /// The .wasm path as the Envoys see it.
        #[arg(
            long,
            default_value = "target/wasm32-wasip1/release/canary_router.wasm"
        )]
        wasm_path: String,
        /// Serve the native module (Envoy 1.40's DynamicModuleFilter) at this path, as the Envoys see it,
        /// instead of the .wasm (use envoy/envoy-ads-native.yaml).
        #[arg(long, value_name = "SO")]
        native_module: Option<String>,
        /// The ECDS resource name (the filter's name in the Envoys' http_filters).
        #[arg(long, default_value = "canary-router")]
        filter_name: String,
        /// Envoys seen within this time are the fleet: a write waits for each, and names the
        /// disconnected ones.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        fleet_window: Duration,
        /// Envoys not seen for this long are forgotten.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        forget_after: Duration,
        /// How long a write waits for an Envoy whose stream dropped (or, after a restart, that has not
        /// reconnected yet) before reporting it disconnected.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        reconnect_grace: Duration,
        /// A Prometheus server that scrapes the Envoys' /stats/prometheus: rollouts started with
        /// `--evidence prometheus` read it (http:// or https://).
        #[arg(long, value_name = "URL")]
        prometheus_url: Option<String>,
        /// A file holding a bearer token for --prometheus-url (one line).
        #[arg(long, value_name = "FILE", requires = "prometheus_url")]
        prometheus_token_file: Option<PathBuf>,
        /// CA certificates (PEM) trusted for an https --prometheus-url, besides the system's.
        #[arg(long, value_name = "PEM", requires = "prometheus_url")]
        prometheus_ca: Option<PathBuf>,
        /// Requests a second one Envoy may report for one upstream cluster: a load report or stats reading
        /// beyond it is refused and counted (canaryctl_reports_refused_total), never summed.
        #[arg(long, default_value_t = server::DEFAULT_MAX_REPORT_RATE, value_parser = clap::value_parser!(u64).range(1..))]
        max_report_rate: u64,
        /// How often the Envoys send their load reports: `auto` (every second up to 2,000 Envoys streaming
        /// their load to this replica, then a second more per 2,000, at most 10 s), or whole seconds from 1s
        /// to 60s. A longer interval costs canaryctl less and delays a verdict by up to one interval.
        #[arg(long, default_value = "auto", value_name = "auto|DURATION", value_parser = lrs::LoadInterval::parse)]
        load_report_interval: lrs::LoadInterval,
        /// Post an event for every change of a rollout (started, step passed, paused, inconclusive, resumed,
        /// rolled back, promoted) to URL, as JSON (docs/canaryctl.md, Notifications). Repeatable. For one
        /// rollout, or Slack's form: rollout=web,format=slack,url=https://hooks.slack.com/…
        #[arg(
            long = "notify",
            value_name = "URL|rollout=R,format=json|slack,url=URL"
        )]
        notify: Vec<String>,
        /// A file holding the secret that signs each notification's body (HMAC-SHA256, in the
        /// x-canaryctl-signature-256 header as sha256=<hex>).
        #[arg(long, value_name = "FILE", requires = "notify")]
        notify_secret_file: Option<PathBuf>,
    },
    /// The state store: `canaryctl store migrate --state FILE --store etcd://…`.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Desired config and, per Envoy, the version it applied or refused.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Set canary percentages of a rollout: canaryctl set web v2=12.5
    Set {
        rollout: String,
        #[arg(required = true, value_name = "VERSION=PERCENT")]
        percents: Vec<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Make a canary the new stable at 100 % (blue/green flip); the old stable stays as a canary at 0 %.
    Promote {
        rollout: String,
        /// The canary to promote (needed when the rollout has several).
        version: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Every canary of the rollout to 0 % at once.
    Rollback {
        rollout: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Progressive rollouts: the canary moves through steps while it fails no more than stable, is promoted
    /// after the last, and is rolled back the moment the evidence says it fails more.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Replace the whole plugin configuration (validated; the diff is shown first).
    Apply {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: String,
        /// Show the diff only.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(Subcommand)]
// Parsed once per process: the size of `start`'s flags does not matter.
#[allow(clippy::large_enum_variant)]
enum RolloutCommand {
    /// Start: canaryctl rollout start web --canary v2 --steps 1,5,25,50,100 --hold 2m --stable-cluster app-v1
    /// --canary-cluster app-v2
    Start {
        rollout: String,
        /// The canary version (a canary of the rollout in the config).
        #[arg(long)]
        canary: String,
        /// Percentages in order, with `pause` for a manual gate: 1,5,pause,50,100. The last one passing
        /// promotes the canary.
        #[arg(
            long,
            value_delimiter = ',',
            required = true,
            allow_hyphen_values = true
        )]
        steps: Vec<String>,
        /// How long each step holds at least.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        hold: Duration,
        /// How long a step may wait for enough canary requests before the rollout is inconclusive (default:
        /// 30m, or five holds if longer).
        #[arg(long, value_parser = humantime::parse_duration)]
        max_step_time: Option<Duration>,
        /// The chance of rolling back a canary that is no worse than stable, at most.
        #[arg(long, default_value = "0.05")]
        false_rollback_budget: f64,
        /// Canary requests a step needs to pass (at least 1), counted from ticks whose evidence was complete.
        #[arg(long, default_value = "200")]
        min_canary_requests: u64,
        /// Envoy's cluster of the stable version (as in its load reports).
        #[arg(long)]
        stable_cluster: String,
        /// Envoy's cluster of the canary version (its hosts, not the fallback's aggregate cluster).
        #[arg(long)]
        canary_cluster: String,
        /// The cluster the canary's route names, where Envoy charges its latency: the aggregate it falls
        /// back through (app-v2-or-v1 in the shipped configs). Default: --canary-cluster.
        #[arg(long)]
        canary_route_cluster: Option<String>,
        /// Latency rolls back only a canary with more than this many times stable's share of slow requests.
        #[arg(long, default_value = "1.5")]
        latency_tolerance: f64,
        /// Where the evidence comes from: `envoy` (the Envoys' load reports and stats streams to canaryctl)
        /// or `prometheus` (the server given to `serve --prometheus-url`).
        #[arg(long, default_value = "envoy", value_parser = ["envoy", "prometheus"])]
        evidence: String,
        /// With --evidence prometheus: label matchers that pick this fleet's series, e.g. job="envoy".
        #[arg(long, value_name = "MATCHERS", default_value = "")]
        prometheus_selector: String,
        /// Collect error signatures but do not roll back on them (default: a `new` or `worse` signature with
        /// enough evidence rolls back).
        #[arg(long)]
        no_rollback_on_findings: bool,
        /// An Envoy cluster (node cluster) whose Envoys serve this rollout; repeat for more. Default: the
        /// clusters of the Envoys connected now. Every Envoy of the fleet must apply each step and report.
        #[arg(long = "fleet-cluster", value_name = "CLUSTER")]
        fleet_clusters: Vec<String>,
        /// Let steps pass while Envoys of the fleet are disconnected (they are still named in the status).
        #[arg(long)]
        allow_missing_envoys: bool,
        /// One of the application's count metrics, from Prometheus (`serve --prometheus-url`), compared canary
        /// against stable like the errors: NAME=SELECTOR of the events' counter, with {version} for the
        /// version, e.g. declines='payments_declined_total{version="{version}"}'. Needs --metric-requests NAME=…
        /// Repeatable.
        #[arg(long = "metric", value_name = "NAME=EVENTS")]
        metrics: Vec<String>,
        /// What a --metric's events are counted out of: NAME=SELECTOR of that counter, with {version}, e.g.
        /// declines='payments_total{version="{version}"}'.
        #[arg(long = "metric-requests", value_name = "NAME=REQUESTS")]
        metric_requests: Vec<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Error signatures of a rollout, canary against stable: new, worse or known, with counts, rates, evidence
    /// and an example each.
    Findings {
        rollout: String,
        #[arg(long)]
        json: bool,
    },
    /// Where rollouts are: phase, step, evidence, fleet, history. --watch exits 0 when promoted, 1 when rolled
    /// back, 3 when it ended but Envoys of its fleet did not apply its last change (named).
    Status {
        rollout: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        watch: bool,
    },
    /// Hold at the current step (the analysis keeps running and still rolls back).
    Pause {
        rollout: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Go on: past a manual gate, or from a pause; an inconclusive step waits another max step time.
    Resume {
        rollout: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Roll back now.
    Abort {
        rollout: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Finish now: the canary becomes stable.
    Promote {
        rollout: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// The command line, or the exit: help and version are printed as clap writes them; a usage error is one line
/// on stderr and exit 1 (refused, like any invalid request), never clap's usage text.
fn parse_cli() -> Result<Cli, ExitCode> {
    use clap::error::ErrorKind;
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(err) => match err.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                let _ = err.print();
                Err(ExitCode::SUCCESS)
            }
            // `canaryctl` or `canaryctl rollout` alone: the help, as a refusal.
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let _ = err.print();
                Err(ExitCode::from(1))
            }
            _ => {
                eprintln!("canaryctl: {}", usage_error_line(&err.render().to_string()));
                Err(ExitCode::from(1))
            }
        },
    }
}

/// clap's error text as one line: its first paragraph (the message, and what it lists) without the `error: `
/// prefix, its tip, and where to look; never the usage block.
fn usage_error_line(rendered: &str) -> String {
    let mut lines = rendered.lines().map(str::trim).skip_while(|l| l.is_empty());
    let head = lines.next().unwrap_or("invalid arguments");
    let head = head.strip_prefix("error: ").unwrap_or(head);
    let listed: Vec<&str> = lines
        .by_ref()
        .take_while(|l| !l.is_empty())
        .filter(|l| !l.starts_with("tip: "))
        .collect();
    let mut message = head.to_string();
    if !listed.is_empty() {
        message.push(' ');
        message.push_str(&listed.join(", "));
    }
    if let Some(tip) = rendered
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("tip: "))
    {
        message.push_str("; ");
        message.push_str(tip);
    }
    message.push_str(" (see --help)");
    canary_router::text::one_line(&message, canary_router::text::MAX_LINE)
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("canaryctl: cannot start: {err}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("canaryctl: {}", err.message);
            ExitCode::from(err.exit_code)
        }
    }
}

/// The admin token from --token or --token-file (or their environment variables), not both.
fn admin_token(cli: &Cli) -> Result<Option<String>, CliError> {
    let token = match (&cli.token, &cli.token_file) {
        (Some(_), Some(_)) => {
            return Err(fail(
                "give the admin token one way: --token (CANARYCTL_TOKEN) or --token-file (CANARYCTL_TOKEN_FILE)",
            ))
        }
        (Some(token), None) => token.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|err| fail(format!("--token-file {path}: {err}")))?
            .trim_end_matches(['\n', '\r'])
            .to_string(),
        (None, None) => return Ok(None),
    };
    if token.trim().is_empty() || token.chars().any(char::is_control) {
        return Err(fail(
            "the admin token is empty or has control characters: give one line of text",
        ));
    }
    Ok(Some(token))
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let token = admin_token(&cli)?;
    let client = || Client::new(&cli.server, token.clone());
    match &cli.command {
        Command::Serve {
            xds,
            xds_tls_cert,
            xds_tls_key,
            xds_client_ca,
            xds_trust_domain,
            insecure_xds,
            admin,
            store,
            replica_name,
            lease,
            init_config,
            recover_config,
            wasm_path,
            native_module,
            filter_name,
            fleet_window,
            forget_after,
            reconnect_grace,
            prometheus_url,
            prometheus_token_file,
            prometheus_ca,
            max_report_rate,
            load_report_interval,
            notify,
            notify_secret_file,
        } => {
            let notifier = notifier(notify, notify_secret_file.as_deref())?;
            let prometheus = match prometheus_url {
                Some(url) => Some(prometheus_source(
                    url,
                    prometheus_token_file.as_deref(),
                    prometheus_ca.as_deref(),
                )?),
                None => None,
            };
            let artifact = match native_module {
                Some(path) => Artifact::Native(path.clone()),
                None => Artifact::Wasm(wasm_path.clone()),
            };
            let tls = match (xds_tls_cert, xds_tls_key, xds_client_ca) {
                (Some(cert), Some(key), Some(client_ca)) => Some(tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: client_ca.clone(),
                    trust_domain: xds_trust_domain.clone(),
                }),
                _ => None,
            };
            let settings = ServeSettings {
                xds: *xds,
                tls,
                insecure_xds: *insecure_xds,
                admin: *admin,
                store: store.clone(),
                replica_name: replica_name.clone(),
                lease: *lease,
                init_config: init_config.clone(),
                recover_config: recover_config.clone(),
                filter: FilterSettings {
                    name: filter_name.clone(),
                    artifact,
                },
                fleet: FleetSettings {
                    window: *fleet_window,
                    forget_after: *forget_after,
                    reconnect_grace: *reconnect_grace,
                },
                prometheus,
                max_report_rate: *max_report_rate,
                load_report_interval: *load_report_interval,
                notifier,
            };
            serve(settings, token).await
        }
        Command::Store {
            command: StoreCommand::Migrate { store },
        } => migrate_store(store).await,
        Command::Status { json } => client::status(&client()?, *json).await,
        Command::Set {
            rollout,
            percents,
            wait,
        } => {
            let body = client::set_body(rollout, percents)?;
            client::write(&client()?, "/v1/set", body, &wait.wait()).await
        }
        Command::Promote {
            rollout,
            version,
            wait,
        } => {
            let body = json!({ "rollout": rollout, "version": version });
            client::write(&client()?, "/v1/promote", body, &wait.wait()).await
        }
        Command::Rollback { rollout, wait } => {
            client::write(
                &client()?,
                "/v1/rollback",
                json!({ "rollout": rollout }),
                &wait.wait(),
            )
            .await
        }
        Command::Apply {
            file,
            dry_run,
            wait,
        } => client::apply(&client()?, file, *dry_run, &wait.wait()).await,
        Command::Rollout { command } => rollout(command, &client()?).await,
    }
}

fn fail(message: impl Into<String>) -> CliError {
    CliError {
        message: message.into(),
        exit_code: 1,
    }
}

/// What `canaryctl serve` was told.
struct ServeSettings {
    xds: SocketAddr,
    tls: Option<tls::TlsFiles>,
    insecure_xds: bool,
    admin: SocketAddr,
    store: StoreArgs,
    replica_name: Option<String>,
    lease: Duration,
    init_config: Option<String>,
    recover_config: Option<String>,
    filter: FilterSettings,
    fleet: FleetSettings,
    prometheus: Option<prometheus::Prometheus>,
    max_report_rate: u64,
    load_report_interval: lrs::LoadInterval,
    notifier: Option<Arc<notifier::Notifier>>,
}

/// The notification targets from `serve --notify`, and the signing secret (read once, at start).
fn notifier(
    targets: &[String],
    secret_file: Option<&std::path::Path>,
) -> Result<Option<Arc<notifier::Notifier>>, CliError> {
    if targets.is_empty() {
        return Ok(None);
    }
    let targets = targets
        .iter()
        .enumerate()
        .map(|(i, text)| notify::Target::parse(text, i + 1))
        .collect::<Result<Vec<_>, _>>()
        .map_err(fail)?;
    let secret = match secret_file {
        Some(path) => {
            let text = std::fs::read(path)
                .map_err(|err| fail(format!("--notify-secret-file {}: {err}", path.display())))?;
            let secret = text.trim_ascii_end().to_vec();
            if secret.len() < 16 {
                return Err(fail(format!(
                    "--notify-secret-file {}: {} bytes: give a secret of at least 16",
                    path.display(),
                    secret.len()
                )));
            }
            Some(secret)
        }
        None => None,
    };
    let notifier = notifier::Notifier::new(targets, secret).map_err(fail)?;
    Ok(Some(Arc::new(notifier)))
}

/// The Prometheus source from `serve`'s flags: the token and CA files are read once, at start.
fn prometheus_source(
    url: &str,
    token_file: Option<&std::path::Path>,
    ca: Option<&std::path::Path>,
) -> Result<prometheus::Prometheus, CliError> {
    let token = match token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|err| {
                fail(format!("--prometheus-token-file {}: {err}", path.display()))
            })?;
            let token = text.trim_end_matches(['\n', '\r']).to_string();
            if token.trim().is_empty() || token.chars().any(char::is_control) {
                return Err(fail(format!(
                    "--prometheus-token-file {}: empty or has control characters: give one line of text",
                    path.display()
                )));
            }
            Some(token)
        }
        None => None,
    };
    let ca = match ca {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|err| fail(format!("--prometheus-ca {}: {err}", path.display())))?,
        ),
        None => None,
    };
    prometheus::Prometheus::new(url, token, ca.as_deref()).map_err(fail)
}

fn read_config(path: &str) -> Result<canary_router::config::RawConfig, CliError> {
    let text = std::fs::read(path).map_err(|err| fail(format!("{path}: {err}")))?;
    state::parse_config(&text).map_err(|err| fail(format!("{path}: {err}")))
}

/// The store `serve` (or `store migrate`) was given: etcd with --store, else the state file.
async fn open_store(args: &StoreArgs, replica: &str) -> Result<store::Store, CliError> {
    let Some(url) = &args.store else {
        return Ok(store::Store::File(store::file::FileStore::new(
            StateFile::new(&args.state),
        )));
    };
    let endpoints = store::etcd::endpoints_of(url)
        .ok_or_else(|| {
            fail(format!(
                "--store {}: give etcd://host:port[,host:port…] (without --store, the state file --state is used)",
                canary_router::text::quote(url)
            ))
        })?
        .map_err(fail)?;
    let prefix = &args.store_prefix;
    if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.chars().any(char::is_control) {
        return Err(fail(format!(
            "--store-prefix {}: give a key prefix that starts and ends with / (e.g. /canaryctl/)",
            canary_router::text::quote(prefix)
        )));
    }
    let user = match (&args.store_user, &args.store_password_file) {
        (Some(user), Some(file)) => {
            let text = std::fs::read_to_string(file)
                .map_err(|err| fail(format!("--store-password-file {file}: {err}")))?;
            Some((
                user.clone(),
                text.trim_end_matches(['\n', '\r']).to_string(),
            ))
        }
        _ => None,
    };
    let settings = store::etcd::EtcdSettings {
        endpoints,
        prefix: prefix.clone(),
        ca: args.store_ca.clone(),
        cert: args.store_cert.clone(),
        key: args.store_key.clone(),
        user,
        replica: replica.to_string(),
    };
    store::etcd::EtcdStore::connect(settings)
        .await
        .map(store::Store::Etcd)
        .map_err(|err| fail(err.to_string()))
}

/// The state to serve: the store's, or one started from --init-config, or recovered.
async fn starting_state(
    settings: &ServeSettings,
    store: &store::Store,
) -> Result<(Saved, store::Revision), CliError> {
    let shown = store.describe();
    if let Some(path) = &settings.recover_config {
        let (saved, revision) = store
            .recover(read_config(path)?)
            .await
            .map_err(|err| fail(err.to_string()))?;
        eprintln!(
            "canaryctl: {shown} recovered with {path}: version {}",
            saved.desired.version
        );
        return Ok((saved, revision));
    }
    if let Some((saved, revision)) = store.load().await.map_err(|err| fail(err.to_string()))? {
        eprintln!(
            "canaryctl: {shown}: version {}, {} Envoys known",
            saved.desired.version,
            saved.fleet.len()
        );
        return Ok((saved, revision));
    }
    let path = settings.init_config.as_deref().ok_or_else(|| {
        fail(format!(
            "no state in {shown}: give --init-config FILE to start one"
        ))
    })?;
    let saved = Saved {
        desired: Desired {
            version: 1,
            updated_at_unix: state::now_unix(),
            config: read_config(path)?,
        },
        fleet: Vec::new(),
        rollouts: Vec::new(),
    };
    match store
        .create(&saved)
        .await
        .map_err(|err| fail(err.to_string()))?
    {
        Some(revision) => {
            eprintln!("canaryctl: {shown} started from {path}: version 1");
            Ok((saved, revision))
        }
        // Another replica started it first: serve what it stored.
        None => match store.load().await.map_err(|err| fail(err.to_string()))? {
            Some((saved, revision)) => {
                eprintln!(
                    "canaryctl: {shown}: version {} (started by another replica; --init-config {path} not used)",
                    saved.desired.version
                );
                Ok((saved, revision))
            }
            None => Err(fail(format!("{shown}: the state vanished while starting"))),
        },
    }
}

/// `canaryctl store migrate`: the state file's config, rollouts and fleet, copied into etcd as they are.
async fn migrate_store(args: &StoreArgs) -> Result<(), CliError> {
    if args.store.is_none() {
        return Err(fail(
            "store migrate: give --store etcd://host:port,… (where to copy --state to)",
        ));
    }
    let from = StateFile::new(&args.state);
    let saved = from
        .load()
        .map_err(|err| fail(err.to_string()))?
        .ok_or_else(|| fail(format!("store migrate: no state file at {}", args.state)))?;
    let etcd = open_store(args, "migrated").await?;
    match etcd
        .create(&saved)
        .await
        .map_err(|err| fail(err.to_string()))?
    {
        Some(revision) => {
            println!(
                "copied {} (version {}, {} rollouts, {} Envoys known) into {} at revision {revision}",
                args.state,
                saved.desired.version,
                saved.rollouts.len(),
                saved.fleet.len(),
                etcd.describe()
            );
            Ok(())
        }
        None => Err(fail(format!(
            "store migrate: {} already holds a state: nothing was copied (remove its keys first if it should be replaced)",
            etcd.describe()
        ))),
    }
}

async fn serve(settings: ServeSettings, token: Option<String>) -> Result<(), CliError> {
    let (xds_addr, admin_addr) = (settings.xds, settings.admin);
    if token.is_none() && !admin_addr.ip().is_loopback() {
        return Err(fail(format!(
            "the admin API on {admin_addr} would accept writes from anyone: set --token-file (or CANARYCTL_TOKEN), or listen on loopback"
        )));
    }
    let tls = match settings.tls.clone() {
        Some(files) => Some(Arc::new(tls::TlsState::load(files).map_err(fail)?)),
        None if xds_addr.ip().is_loopback() => None,
        None if settings.insecure_xds => {
            eprintln!(
                "canaryctl: WARNING: --insecure-xds: ADS on {xds_addr} is plaintext and unauthenticated: anyone who reaches it reads the filter config, override tokens included, and can pose as an Envoy"
            );
            None
        }
        None => {
            return Err(fail(format!(
                "xDS on {xds_addr} would be plaintext beyond loopback: anyone who reaches it reads the filter config (override tokens included) and can pose as an Envoy. Give --xds-tls-cert, --xds-tls-key and --xds-client-ca (docs/canaryctl.md), listen on loopback, or pass --insecure-xds"
            )))
        }
    };
    if settings.fleet.forget_after < settings.fleet.window {
        return Err(fail(
            "--forget-after must be at least --fleet-window: an Envoy of the fleet cannot be forgotten",
        ));
    }
    let replica = settings.replica_name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "canaryctl".to_string());
        format!("{host}:{}", admin_addr.port())
    });
    let store = Arc::new(open_store(&settings.store, &replica).await?);
    let started = starting_state(&settings, &store).await?;
    if let Some(prometheus) = &settings.prometheus {
        eprintln!(
            "canaryctl: rollouts with --evidence prometheus query {}",
            prometheus.url()
        );
    }
    let server = Arc::new(
        Server::new(
            settings.filter,
            store.clone(),
            started,
            settings.fleet,
            token,
            tls.clone(),
        )
        .with_prometheus(settings.prometheus)
        .with_max_report_rate(settings.max_report_rate)
        .with_load_interval(settings.load_report_interval)
        .with_notifier(settings.notifier.clone())
        .with_leadership(if store.shared() {
            leader::Leadership::replica(&replica)
        } else {
            leader::Leadership::alone()
        }),
    );

    let admin_listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|err| fail(format!("admin API on {admin_addr}: {err}")))?;
    let xds_listener = tokio::net::TcpListener::bind(xds_addr)
        .await
        .map_err(|err| fail(format!("xDS on {xds_addr}: {err}")))?;
    // Port 0 picks a free port: say which.
    let xds_addr = xds_listener.local_addr().unwrap_or(xds_addr);
    let admin_addr = admin_listener.local_addr().unwrap_or(admin_addr);
    if let Some(tls) = &tls {
        let (subject, not_after) = tls.serving();
        eprintln!(
            "canaryctl: xDS requires mTLS (TLS 1.3): serving certificate {subject}, valid until {}; re-read on change and on SIGHUP",
            tls::unix_text(not_after)
        );
    }
    eprintln!("canaryctl: serving ADS on {xds_addr}, admin API on http://{admin_addr}");
    if store.shared() {
        let announce = serde_json::to_vec(&json!({
            "replica": replica,
            "admin": format!("http://{admin_addr}"),
            "xds": xds_addr.to_string(),
            "started_unix": state::now_unix(),
        }))
        .unwrap_or_default();
        tokio::spawn(
            server
                .leadership
                .clone()
                .campaign(store.clone(), settings.lease, announce),
        );
        tokio::spawn(server.clone().follow_store());
        eprintln!(
            "canaryctl: replica {replica} of {}: rollouts are judged by the replica holding the lead (lease {})",
            store.describe(),
            humantime::format_duration(settings.lease)
        );
    }
    tokio::spawn(server.clone().keep_fleet());
    tokio::spawn(reload_tls(server.clone()));
    tokio::spawn(server.clone().run_rollouts());
    tokio::spawn(server.clone().pace_load_reports());
    if let Some(notifier) = &settings.notifier {
        notifier.spawn();
        for lane in notifier.lanes() {
            let target = &lane.target;
            eprintln!(
                "canaryctl: notify {}: {} events of {}{}",
                target.label,
                match target.format {
                    notify::Format::Json => "JSON",
                    notify::Format::Slack => "Slack-form",
                },
                target
                    .rollout
                    .as_deref()
                    .map_or("every rollout".to_string(), |r| format!("rollout {r}")),
                if notifier.signs() {
                    ", signed"
                } else {
                    ", unsigned (no --notify-secret-file)"
                }
            );
        }
    }
    let (incoming, connections) = tokio::sync::mpsc::channel(16);
    tokio::spawn(tls::accept(xds_listener, tls, server.clone(), incoming));

    let shutdown = async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = ctrl_c => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
    };
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut stop_admin = stop_tx.subscribe();
    let mut stop_xds = stop_tx.subscribe();

    // The peer's address is kept for the events an operator's write causes.
    let admin = axum::serve(
        admin_listener,
        admin::router(server.clone()).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = stop_admin.recv().await;
    });
    let ads = AggregatedDiscoveryServiceServer::new(xds::Ads::new(server.clone()));
    let lrs = intake::Served::new(Arc::new(lrs::Lrs::new(server.clone())));
    let sink = intake::Served::new(Arc::new(metrics_sink::Sink::new(server.clone())));
    let als = AccessLogServiceServer::new(als::Als::new(server.clone()))
        .max_decoding_message_size(16 << 20);
    let xds = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(ads)
        .add_service(lrs)
        .add_service(sink)
        .add_service(als)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(connections),
            async move {
                let _ = stop_xds.recv().await;
            },
        );
    let admin_task = tokio::spawn(async move { admin.await });
    let xds_task = tokio::spawn(xds);
    shutdown.await;
    eprintln!("canaryctl: shutting down");
    let _ = stop_tx.send(());
    // xDS streams stay open until Envoys hang up; do not wait for them longer than a moment.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = admin_task.await;
        let _ = xds_task.await;
    })
    .await;
    Ok(())
}

/// Re-reads the xDS TLS files when they change (checked every couple of seconds) and at once on SIGHUP. A set
/// that does not load is refused with one line; the previous one keeps serving.
async fn reload_tls(server: Arc<Server>) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(tls::RELOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        #[cfg(unix)]
        let forced = tokio::select! {
            _ = tick.tick() => false,
            _ = async { match hangup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => true,
        };
        #[cfg(not(unix))]
        let forced = {
            tick.tick().await;
            false
        };
        let Some(tls) = &server.tls else {
            if forced {
                eprintln!("canaryctl: SIGHUP: nothing to reload (no --xds-tls-cert)");
            }
            continue;
        };
        let why = if forced { "SIGHUP" } else { "changed" };
        match tls.reload(forced) {
            tls::Reload::Unchanged => {}
            tls::Reload::Reloaded(serving) => {
                Metrics::bump(&server.metrics.tls_reloads);
                eprintln!(
                    "canaryctl: xDS TLS files re-read ({why}): serving certificate {serving}"
                );
            }
            tls::Reload::Refused(err) => {
                Metrics::bump(&server.metrics.tls_reloads_refused);
                eprintln!("canaryctl: xDS TLS files refused ({why}), the previous ones keep serving: {err}");
            }
        }
    }
}

async fn rollout(command: &RolloutCommand, client: &Client) -> Result<(), CliError> {
    let operation = |path: &str, rollout: &str, wait: &WaitArgs| {
        (path.to_string(), json!({ "rollout": rollout }), wait.wait())
    };
    let (path, body, wait) = match command {
        RolloutCommand::Status {
            rollout,
            json,
            watch,
        } => return client::rollout_status(client, rollout.as_deref(), *json, *watch).await,
        RolloutCommand::Findings { rollout, json } => {
            return client::rollout_findings(client, rollout, *json).await
        }
        RolloutCommand::Start {
            rollout,
            canary,
            steps,
            hold,
            max_step_time,
            false_rollback_budget,
            min_canary_requests,
            stable_cluster,
            canary_cluster,
            canary_route_cluster,
            latency_tolerance,
            evidence,
            prometheus_selector,
            no_rollback_on_findings,
            fleet_clusters,
            allow_missing_envoys,
            metrics,
            metric_requests,
            wait,
        } => (
            // The metrics are checked once more by serve; pairing them is the CLI's.
            "/v1/rollouts/start".to_string(),
            json!({
                "rollout": rollout,
                "canary": canary,
                "steps": steps,
                "hold_s": hold.as_secs(),
                "max_step_s": max_step_time.map(|d| d.as_secs()),
                "alpha": false_rollback_budget,
                "min_canary_requests": min_canary_requests,
                "stable_cluster": stable_cluster,
                "canary_cluster": canary_cluster,
                "canary_route_cluster": canary_route_cluster,
                "latency_tolerance": latency_tolerance,
                "evidence": evidence,
                "prometheus_selector": prometheus_selector,
                "findings": !no_rollback_on_findings,
                "fleet_clusters": fleet_clusters,
                "allow_missing_envoys": allow_missing_envoys,
                "metrics": client::metric_plans(metrics, metric_requests)?,
            }),
            wait.wait(),
        ),
        RolloutCommand::Pause { rollout, wait } => operation("/v1/rollouts/pause", rollout, wait),
        RolloutCommand::Resume { rollout, wait } => operation("/v1/rollouts/resume", rollout, wait),
        RolloutCommand::Abort { rollout, wait } => operation("/v1/rollouts/abort", rollout, wait),
        RolloutCommand::Promote { rollout, wait } => {
            operation("/v1/rollouts/promote", rollout, wait)
        }
    };
    client::rollout_write(client, &path, body, &wait).await
}
