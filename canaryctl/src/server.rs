//! What `canaryctl serve` holds: the desired state (durable, broadcast to every xDS stream), the fleet of
//! Envoys it has seen with what each applied or refused (durable too), and counters for `/metrics`.
//!
//! This file keeps the state and its writes (every change, an operator's or the judge's, through
//! [`Server::change`], guarded by the store's revision). Beside it: `server/fleet_view.rs` (the Envoys and their
//! streams, merged across replicas), `server/reports.rs` (the evidence the report streams bring) and
//! `server/rollout_loop.rs` (the leader's loop that applies the rollouts' verdicts). The evidence sources
//! (the Envoys' streams, Prometheus) are behind one trait in `sources.rs`; the judge, pure, is `judge.rs`,
//! and the rules it applies are `rollout.rs`, `analysis.rs`, `coverage.rs`, `availability.rs`,
//! `findings.rs`. The store is `store/` (a file or etcd), the leader's election `leader.rs`, the wire types
//! of the report streams `intake.rs`, the xDS and admin surfaces `xds.rs` and `admin.rs` (with the rollout
//! page, `page/` and `charts.rs`). Each write's changes to a rollout are told by `notify.rs` and `notifier.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::analysis::{either_reported, Histogram, Tick};
use crate::availability::Hosts;
use crate::coverage::LastReports;
use crate::evidence::{Partial, Summed};
use crate::findings::{Events, Signature};
use crate::fleet::{EnvoyStatus, Fleet, FleetSettings, RefusedPeer, RefusedPeers};
use crate::leader::Leadership;
use crate::prometheus::{Counters, Prometheus};
use crate::rollout::{Action, Rollout, Source};
use crate::state::{now_unix, Changes, Desired, Saved, StateError};
use crate::store::{Fence, Revision, SaveError, Store};
use crate::tls::{Refused, TlsState};
use canary_router::config::RawConfig;

mod fleet_view;
mod reports;
mod rollout_loop;

/// Which build of the filter the Envoys load, and where they find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Artifact {
    /// The proxy-wasm `.wasm`, at this path as the Envoys see it.
    Wasm(String),
    /// The native dynamic module (`libcanary_router_native.so`), at this path as the Envoys see it.
    Native(String),
}

/// How the filter is delivered: the ECDS resource name and the artifact.
#[derive(Debug, Clone)]
pub struct FilterSettings {
    pub name: String,
    pub artifact: Artifact,
}

#[derive(Default)]
pub struct Metrics {
    pub pushes: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    pub writes_applied: AtomicU64,
    pub writes_unchanged: AtomicU64,
    pub writes_refused: AtomicU64,
    pub unauthorized: AtomicU64,
    pub tls_reloads: AtomicU64,
    pub load_reports: AtomicU64,
    pub stats_flushes: AtomicU64,
    /// When an Envoy last streamed its stats (unix seconds; 0: never).
    pub last_stats_unix: AtomicU64,
    pub tls_reloads_refused: AtomicU64,
    pub prometheus_queries: AtomicU64,
    pub prometheus_failures: AtomicU64,
    pub access_log_entries: AtomicU64,
    pub app_log_lines: AtomicU64,
    /// Failures not kept because a tick already held [`MAX_FAILURE_KEYS`] distinct signatures.
    pub failures_dropped: AtomicU64,
    /// Load reports and stats readings refused as beyond a plausible rate (see `serve --max-report-rate`).
    pub reports_implausible: AtomicU64,
    /// Saves of the state file that failed.
    pub save_failures: AtomicU64,
    /// Reports refused because their node holds no ADS stream under the same identity.
    pub reports_unsubscribed: AtomicU64,
}

/// The default bound on what one Envoy may report for one cluster: requests per second. Far beyond any one
/// proxy (Envoy serves in the order of 10^4 to 10^5 a second a core), far below the counts that break sums.
pub const DEFAULT_MAX_REPORT_RATE: u64 = 1_000_000;

/// Whose failure it is: an upstream cluster's (from Envoy's access logs), or a version's (an application's log
/// line, for one rollout or for any rollout with that version).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owner {
    /// An upstream cluster's, as one Envoy (node id) logged it.
    Cluster { node: String, cluster: String },
    Version {
        rollout: Option<String>,
        version: String,
    },
}

/// The longest cluster, version or rollout name a failure may be charged to. Envoy cluster names can be
/// longer than the filter's 128-byte names; none of a rollout's is longer than this.
pub const MAX_OWNER_BYTES: usize = 512;

/// Distinct (owner, signature) pairs kept between two ticks: hostile or runaway logs cannot grow memory (each
/// pair's texts are bounded: the owner by MAX_OWNER_BYTES, the signature and example cut).
pub const MAX_FAILURE_KEYS: usize = 4096;

/// One kind of failure since the last tick: how many, and the first example.
#[derive(Debug, Default)]
struct Seen {
    count: u64,
    example: String,
}

/// Failures since the last tick, by owner and signature.
type Failures = BTreeMap<(Owner, Signature), Seen>;

impl Metrics {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The outcome of a write: the version now desired and what changed (empty: nothing did).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteOutcome {
    pub version: u64,
    pub changed: bool,
    pub changes: Changes,
    /// False when the change was pushed but the state could not be saved (a restart would not know it).
    #[serde(default = "durable_by_default")]
    pub durable: bool,
    /// `state not saved since … (reason)` when not durable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

fn durable_by_default() -> bool {
    true
}

/// Who makes a change: an operator's config write (`set`, `apply`, `rollback`, `promote`, a rollout's abort or
/// promote) is the word that ends a hold on a fleet ahead of the state; a rollout's start, pause or resume is
/// not; the judge's tick is not either, and is written only while this replica leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    Operator,
    Rollout,
    Judge,
}

/// A write that found the store changed by another replica is made again from the new state, this many times.
const MAX_WRITE_ATTEMPTS: usize = 8;

/// One attempt of a write: refused for good, or to be made again from the store's newer state.
enum Attempt {
    Refused(StateError),
    Conflict,
}

pub struct Server {
    pub filter: FilterSettings,
    pub metrics: Metrics,
    pub fleet_settings: FleetSettings,
    token: Option<String>,
    /// Where the state is kept: a state file, or etcd shared with other replicas.
    pub store: Arc<Store>,
    /// The store's revision of the state this replica serves (its writes are made from it).
    revision: Mutex<Revision>,
    /// Whether this replica judges the rollouts.
    pub leadership: Arc<Leadership>,
    desired: watch::Sender<Arc<Desired>>,
    /// Bumped whenever the fleet view may have moved (an ACK, a NACK, an Envoy named or gone, another replica's
    /// publication, time passing): what a write's wait ([`Server::fleet_moves`]) waits on instead of polling.
    fleet_moves: watch::Sender<u64>,
    /// Serialises this replica's writes (the store's revision guard serialises replicas').
    write_lock: tokio::sync::Mutex<()>,
    /// Nodes that reported without an ADS stream, since when (see [`Server::admit_report`]).
    unsubscribed_since: Mutex<BTreeMap<String, u64>>,
    /// Whether the state file holds what is served; when not, since when and why.
    durability: Mutex<crate::durability::Durability>,
    /// An Envoy applied a newer version than the state's (found on restart): pushes are held.
    ahead: Mutex<Option<crate::durability::FleetAhead>>,
    fleet: Mutex<Fleet>,
    refused: Mutex<RefusedPeers>,
    /// Progressive rollouts by rollout name (the latest of each, finished ones kept for `rollout status`).
    rollouts: Mutex<BTreeMap<String, Rollout>>,
    /// Requests and errors per Envoy and upstream cluster from the load reports, since the last analysis tick
    /// (by Envoy: a rollout counts only its fleet's).
    load: Mutex<BTreeMap<(String, String), Load>>,
    /// Latency per Envoy and cluster from the stats streams, since the last analysis tick.
    latency: Mutex<BTreeMap<(String, String), Histogram>>,
    /// Failures by owner and signature (access logs, application logs), since the last analysis tick.
    failures: Mutex<Failures>,
    /// Each Envoy's latest host gauges per cluster, and when they came: (node, cluster) → hosts.
    hosts: Mutex<BTreeMap<(String, String), (Hosts, u64)>>,
    /// Requests the filter sent to each (rollout, version) since the last tick, from Envoys that also stream
    /// their load (so the canary's hosts' load can be held against it).
    routed: Mutex<BTreeMap<(String, String, String), u64>>,
    /// Requests the filter sent, per Envoy and (rollout, version), since that Envoy's last load report: they
    /// join `routed` with its next one.
    routed_held: Mutex<BTreeMap<String, RoutedSince>>,
    /// Requests per Envoy and upstream cluster since the last tick from Envoys that also stream their stats.
    load_paired: Mutex<BTreeMap<(String, String), u64>>,
    /// Open load and stats streams per node.
    streams: Mutex<BTreeMap<String, [u32; 2]>>,
    /// When each node last sent a load report and a stats flush, and at what pace.
    last_reports: Mutex<LastReports>,
    /// How often the load streams are asked to report (`serve --load-report-interval`), and the seconds asked
    /// now (each load stream follows it).
    load_interval: crate::lrs::LoadInterval,
    pub load_every: watch::Sender<u64>,
    /// What the other replicas published (a shared store): their fleets, which of them live, their evidence.
    remote: Mutex<Remote>,
    /// Which of the other replicas' published ticks this replica, judging, has counted.
    counted: Mutex<crate::evidence::Counted>,
    /// The ticks this replica publishes when another judges.
    shares: Mutex<crate::evidence::Shares>,
    /// The latency of the last [`LATENCY_WINDOW_S`] seconds per Envoy cluster (`node.cluster`) and upstream
    /// cluster, one histogram a second summed over that cluster's Envoys: a rollout's stable baseline (from its
    /// fleet's clusters). Its size grows with the clusters, not with the Envoys (kept per Envoy, it held 300
    /// histograms of each Envoy and cluster: about 6 GB projected at 10,000 Envoys).
    recent_latency: Mutex<BTreeMap<(String, String), LatencyWindow>>,
    next_stream: AtomicU64,
    /// mTLS on the gRPC port, when configured.
    pub tls: Option<Arc<TlsState>>,
    /// The Prometheus server rollouts may take their evidence from (`serve --prometheus-url`).
    pub prometheus: Option<Prometheus>,
    /// Per rollout reading Prometheus: each series' previous value.
    prometheus_counters: Mutex<BTreeMap<String, Counters>>,
    /// The last Prometheus failure logged, and when (a failing server is logged once a minute).
    prometheus_logged: Mutex<(String, u64)>,
    /// Requests a second one Envoy may report for one cluster; beyond it a report is refused.
    pub max_report_rate: u64,
    /// When a refused report of each node was last logged (once a minute per node).
    refused_logged: Mutex<BTreeMap<String, u64>>,
    /// Per (rollout, metric name): the application's counters, as last read from Prometheus.
    metric_counters: Mutex<BTreeMap<(String, String), crate::user_metrics::MetricCounters>>,
    /// Where the rollouts' changes are told (`serve --notify`).
    pub notifier: Option<Arc<crate::notifier::Notifier>>,
}

/// What the other replicas sharing the store published, as this replica last saw it.
#[derive(Debug, Default)]
struct Remote {
    /// Replica and shard → its Envoys in that shard (no shard: a replica of a release before the shards, its whole fleet).
    fleets: BTreeMap<(String, Option<u32>), crate::fleet::FleetDoc>,
    /// The replicas whose lease lives.
    live: BTreeSet<String>,
    /// Replicas whose lease ended, since when (unix seconds).
    gone_since: BTreeMap<String, u64>,
    /// Replica → its evidence of its last ticks.
    evidence: BTreeMap<String, crate::evidence::Shares>,
}

/// Keeps what another replica published (a value that does not read as one is dropped, as a deleted one).
fn keep_published<K: Ord, T: serde::de::DeserializeOwned>(
    map: &mut BTreeMap<K, T>,
    key: K,
    value: Option<&[u8]>,
) {
    match value.map(serde_json::from_slice) {
        Some(Ok(read)) => {
            map.insert(key, read);
        }
        Some(Err(_)) | None => {
            map.remove(&key);
        }
    }
}

/// Requests one Envoy's filter routed per (rollout, version) since its last load report.
type RoutedSince = BTreeMap<(String, String), u64>;

/// The two report streams an Envoy opens besides ADS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Load = 0,
    Stats = 1,
}

/// One Envoy's recent latency for one cluster: each flush, with when it came.
type LatencyWindow = std::collections::VecDeque<(u64, Histogram)>;

/// A node that reports without an ADS stream for less than this is not evidence, but not refused either.
pub const REPORT_GRACE: Duration = Duration::from_secs(10);
/// Nodes waiting out [`REPORT_GRACE`] at once, at most.
const MAX_WAITING_NODES: usize = 1024;

/// Host gauges older than this are not used: that Envoy stopped streaming its stats.
pub const HOSTS_FRESH_S: u64 = 5;

impl Server {
    pub fn new(
        filter: FilterSettings,
        store: Arc<Store>,
        (saved, revision): (Saved, Revision),
        fleet_settings: FleetSettings,
        token: Option<String>,
        tls: Option<Arc<TlsState>>,
    ) -> Self {
        let Saved {
            desired,
            fleet: known,
            rollouts,
        } = saved;
        let (desired, _) = watch::channel(Arc::new(desired));
        Self {
            filter,
            metrics: Metrics::default(),
            fleet_settings,
            token,
            store,
            revision: Mutex::new(revision),
            leadership: Leadership::alone(),
            desired,
            fleet_moves: watch::channel(0).0,
            write_lock: tokio::sync::Mutex::new(()),
            unsubscribed_since: Mutex::new(BTreeMap::new()),
            durability: Mutex::new(Default::default()),
            ahead: Mutex::new(None),
            fleet: Mutex::new(Fleet::restore(known, now_unix())),
            refused: Mutex::new(RefusedPeers::default()),
            rollouts: Mutex::new(
                rollouts
                    .into_iter()
                    .map(|r| (r.plan.rollout.clone(), r))
                    .collect(),
            ),
            load: Mutex::new(BTreeMap::new()),
            latency: Mutex::new(BTreeMap::new()),
            failures: Mutex::new(BTreeMap::new()),
            recent_latency: Mutex::new(BTreeMap::new()),
            hosts: Mutex::new(BTreeMap::new()),
            routed: Mutex::new(BTreeMap::new()),
            routed_held: Mutex::new(BTreeMap::new()),
            load_paired: Mutex::new(BTreeMap::new()),
            streams: Mutex::new(BTreeMap::new()),
            last_reports: Mutex::new(BTreeMap::new()),
            load_interval: crate::lrs::LoadInterval::Auto,
            load_every: watch::channel(1).0,
            remote: Mutex::new(Remote::default()),
            counted: Mutex::new(Default::default()),
            shares: Mutex::new(crate::evidence::Shares {
                incarnation: now_unix(),
                ticks: Vec::new(),
            }),
            next_stream: AtomicU64::new(1),
            tls,
            prometheus: None,
            prometheus_counters: Mutex::new(BTreeMap::new()),
            prometheus_logged: Mutex::new((String::new(), 0)),
            max_report_rate: DEFAULT_MAX_REPORT_RATE,
            refused_logged: Mutex::new(BTreeMap::new()),
            notifier: None,
            metric_counters: Mutex::new(BTreeMap::new()),
        }
    }

    /// The rollouts' changes are told to `notifier`'s targets.
    pub fn with_notifier(mut self, notifier: Option<Arc<crate::notifier::Notifier>>) -> Self {
        self.notifier = notifier;
        self
    }

    /// Rollouts are judged only while `leadership` leads (replicas sharing etcd).
    pub fn with_leadership(mut self, leadership: Arc<Leadership>) -> Self {
        self.leadership = leadership;
        self
    }

    /// The load streams are asked to report at this pace (`serve --load-report-interval`).
    pub fn with_load_interval(mut self, interval: crate::lrs::LoadInterval) -> Self {
        self.load_every.send_replace(interval.seconds(0, 1));
        self.load_interval = interval;
        self
    }

    /// Reports beyond `rate` requests a second per Envoy and cluster are refused.
    pub fn with_max_report_rate(mut self, rate: u64) -> Self {
        self.max_report_rate = rate;
        self
    }

    /// A report (or a reading of one) refused as implausible: counted for /metrics, and logged once a minute
    /// per node.
    pub fn refuse_report(&self, node: &str, what: String) {
        Metrics::bump(&self.metrics.reports_implausible);
        let now = now_unix();
        let node = &cut(node);
        let mut logged = lock(&self.refused_logged);
        // Node ids are the peer's word: however many it claims, only the last minute's are remembered.
        if logged.len() >= 1024 {
            logged.retain(|_, at| now.saturating_sub(*at) < 60);
            if logged.len() >= 1024 && !logged.contains_key(node) {
                return; // counted; the log already names a thousand peers this minute
            }
        }
        let last = logged.entry(node.to_string()).or_default();
        if *last == 0 || now.saturating_sub(*last) >= 60 {
            *last = now;
            eprintln!(
                "canaryctl: refused a report of {}: {what}, beyond {} requests a second (--max-report-rate)",
                canary_router::text::quote(node),
                self.max_report_rate
            );
        }
    }

    /// Lets rollouts take their evidence from this Prometheus server.
    pub fn with_prometheus(mut self, prometheus: Option<Prometheus>) -> Self {
        self.prometheus = prometheus;
        self
    }

    /// A rollout reading Prometheus starts from these samples (taken when it started).
    pub fn prometheus_start(&self, rollout: &str, samples: &[crate::prometheus::Sample]) {
        let mut counters = Counters::default();
        counters.advance(samples, now_unix());
        lock(&self.prometheus_counters).insert(rollout.to_string(), counters);
    }

    /// A rollout's metric starts from this answer (whatever an earlier rollout of that name left).
    pub fn metric_start(
        &self,
        rollout: &str,
        metric: &crate::user_metrics::MetricPlan,
        samples: &[crate::prometheus::Sample],
        stable: &str,
        canary: &str,
    ) {
        lock(&self.metric_counters).remove(&(rollout.to_string(), metric.name.clone()));
        self.metric_advance(rollout, metric, samples, stable, canary);
    }

    /// What a rollout's metric moved since its previous answer (`samples`). A replica that did not start the
    /// rollout (or restarted) takes its first answer as a starting point.
    pub fn metric_advance(
        &self,
        rollout: &str,
        metric: &crate::user_metrics::MetricPlan,
        samples: &[crate::prometheus::Sample],
        stable: &str,
        canary: &str,
    ) -> crate::user_metrics::Moved {
        lock(&self.metric_counters)
            .entry((rollout.to_string(), metric.name.clone()))
            .or_default()
            .advance(samples, stable, canary)
    }

    /// What a rollout's Prometheus counters moved since its previous answer (`samples` is the new one).
    pub fn prometheus_advance(
        &self,
        rollout: &str,
        samples: &[crate::prometheus::Sample],
    ) -> crate::prometheus::Deltas {
        lock(&self.prometheus_counters)
            .entry(rollout.to_string())
            .or_default()
            .advance(samples, now_unix())
    }

    /// One Prometheus query, counted for /metrics; a failure is logged (once a minute while it repeats).
    pub async fn prometheus_query(
        &self,
        query: &str,
    ) -> Result<Vec<crate::prometheus::Sample>, String> {
        let Some(prometheus) = &self.prometheus else {
            return Err(
                "evidence: prometheus needs `canaryctl serve --prometheus-url URL`".to_string(),
            );
        };
        Metrics::bump(&self.metrics.prometheus_queries);
        let result = prometheus.query(query).await;
        if let Err(err) = &result {
            Metrics::bump(&self.metrics.prometheus_failures);
            let now = now_unix();
            let mut logged = lock(&self.prometheus_logged);
            if logged.0 != *err || now.saturating_sub(logged.1) >= 60 {
                eprintln!("canaryctl: {err}");
                *logged = (err.clone(), now);
            }
        }
        result
    }

    /// The store's revision of the state served here.
    pub fn revision(&self) -> Revision {
        *lock(&self.revision)
    }

    pub fn desired(&self) -> Arc<Desired> {
        self.desired.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Desired>> {
        self.desired.subscribe()
    }

    /// True when no token is configured, or `given` is the token (compared in constant time).
    /// The name events give the admin token (None: serve runs without one).
    pub fn token_name(&self) -> Option<&str> {
        self.token.as_ref().map(|_| "admin")
    }

    pub fn authorised(&self, given: Option<&str>) -> bool {
        match &self.token {
            None => true,
            Some(token) => given.is_some_and(|g| {
                canary_router::decision::constant_time_eq(g.as_bytes(), token.as_bytes())
            }),
        }
    }

    /// Apply an edit to the desired config and the rollouts together: validated by the edit, saved durably
    /// in one write (so a restart never finds a rollout at one step and the config at another), then pushed to
    /// every subscribed Envoy. Nothing is saved or pushed when the edit is refused or changes nothing. When
    /// another replica wrote first, the state is read again and the edit made again from it: no update is lost.
    ///
    /// When the state cannot be saved, a change that only takes canary traffic away (a rollback) is still
    /// pushed and answered as not durable; one that may add canary traffic is refused until it can be saved.
    /// While the fleet is ahead of the state, an operator's write is pushed as a version past the fleet's (even
    /// when the config is unchanged) and ends the hold. The judge's writes are made only while this replica
    /// leads, and are conditioned on it in the store.
    pub async fn change(
        &self,
        by: Writer,
        mut edit: impl FnMut(
            &RawConfig,
            &mut BTreeMap<String, Rollout>,
        ) -> Result<(RawConfig, Changes), StateError>,
    ) -> Result<WriteOutcome, StateError> {
        let fence = match by {
            Writer::Judge => match self.leadership.judge() {
                Some(fence) => fence,
                None => return Err(StateError::NotLeader),
            },
            _ => None,
        };
        let _guard = self.write_lock.lock().await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.change_once(by, &mut edit, fence.as_ref()).await {
                Err(Attempt::Conflict) if attempt < MAX_WRITE_ATTEMPTS => {
                    // Another replica wrote: read what it wrote and make the edit again from there.
                    self.catch_up_locked().await?;
                }
                Err(Attempt::Conflict) => {
                    return Err(StateError::Io(format!(
                    "{}: the state changed under this write {attempt} times in a row: try again",
                    self.store.describe()
                )))
                }
                Err(Attempt::Refused(err)) => return Err(err),
                Ok(outcome) => return Ok(outcome),
            }
        }
    }

    async fn change_once(
        &self,
        by: Writer,
        edit: &mut impl FnMut(
            &RawConfig,
            &mut BTreeMap<String, Rollout>,
        ) -> Result<(RawConfig, Changes), StateError>,
        fence: Option<&Fence>,
    ) -> Result<WriteOutcome, Attempt> {
        let current = self.desired();
        let mut rollouts = lock(&self.rollouts).clone();
        let (config, mut changes) = match edit(&current.config, &mut rollouts) {
            Ok(result) => result,
            Err(err) => {
                Metrics::bump(&self.metrics.writes_refused);
                return Err(Attempt::Refused(err));
            }
        };
        let ahead = lock(&self.ahead).clone();
        let ends_hold = by == Writer::Operator && ahead.is_some();
        let config_changed = config != current.config || ends_hold;
        let rollouts_changed = rollouts != *lock(&self.rollouts);
        if !config_changed && !rollouts_changed {
            Metrics::bump(&self.metrics.writes_unchanged);
            return Ok(WriteOutcome {
                version: current.version,
                changed: false,
                changes: Vec::new(),
                durable: true,
                warning: None,
            });
        }
        let next = if config_changed {
            let past = ahead.as_ref().map_or(0, |a| a.fleet_version);
            Desired {
                version: current.version.max(past) + 1,
                updated_at_unix: now_unix(),
                config,
            }
        } else {
            (*current).clone()
        };
        if ends_hold && changes.is_empty() {
            changes.push(format!(
                "the state's config pushed as version {} (the fleet served version {})",
                next.version,
                ahead.as_ref().map_or(0, |a| a.fleet_version)
            ));
        }
        // The rollouts' changes are carried by this version: their Envoys are judged against it.
        for rollout in rollouts.values_mut().filter(|r| r.change_pending) {
            rollout.change_pending = false;
            rollout.change_version = Some(next.version);
        }
        // What people are told of, numbered in the state saved with it: a write made again after another
        // replica's is compared again, from what that replica saved.
        let told = self.changes_to_tell(&mut rollouts);
        let saved_rollouts: Vec<Rollout> = rollouts.values().cloned().collect();
        let warning = match self.persist(&next, &saved_rollouts, fence).await {
            Ok(()) => None,
            Err(SaveError::Conflict) => return Err(Attempt::Conflict),
            Err(SaveError::NotLeader) => {
                self.leadership.deposed();
                return Err(Attempt::Refused(StateError::NotLeader));
            }
            Err(SaveError::Failed(err)) => {
                let line = self.unsaved().unwrap_or_else(|| err.to_string());
                let adds_traffic = config_changed
                    && !crate::durability::only_lowers_canaries(&current.config, &next.config);
                if adds_traffic {
                    Metrics::bump(&self.metrics.writes_refused);
                    return Err(Attempt::Refused(StateError::Unsaved(format!(
                        "{line}: refused a change that may add canary traffic until the state is saved \
                         (retried each second); a rollback or a lower percent is still applied"
                    ))));
                }
                Some(line)
            }
        };
        *lock(&self.rollouts) = rollouts;
        self.tell(told);
        let version = next.version;
        if config_changed {
            if ends_hold {
                *lock(&self.ahead) = None;
                eprintln!(
                    "canaryctl: hold ended by an operator's write: version {version} is pushed to the fleet"
                );
            }
            self.desired.send_replace(Arc::new(next));
            Metrics::bump(&self.metrics.writes_applied);
        }
        Ok(WriteOutcome {
            version,
            changed: config_changed,
            changes,
            durable: warning.is_none(),
            warning,
        })
    }

    /// The changes this write makes to each rollout that people are told of, each numbered (the rollout's
    /// `notices` counts them), as the events to send once the write is made.
    fn changes_to_tell(
        &self,
        rollouts: &mut BTreeMap<String, Rollout>,
    ) -> Vec<crate::notify::Notice> {
        let before = lock(&self.rollouts);
        let by = crate::notifier::current_operator();
        let now = now_unix();
        let mut told = Vec::new();
        for (name, after) in rollouts.iter_mut() {
            let kinds = crate::notify::transitions(before.get(name), after);
            for kind in kinds {
                after.notices += 1;
                // An admin request's changes are its operator's (a gate passed by a resume too); the judge's
                // loop runs outside any request, so its changes carry none.
                told.push(crate::notify::notice(
                    after,
                    kind,
                    after.notices,
                    by.as_ref(),
                    now,
                ));
            }
        }
        told
    }

    /// Queues the events of a write that was made (never waits on a receiver).
    fn tell(&self, told: Vec<crate::notify::Notice>) {
        if let Some(notifier) = &self.notifier {
            for notice in &told {
                notifier.send(notice);
            }
        }
    }

    /// Saves the state, keeping track of whether the store holds what is served (logged, and shown in
    /// `status` and `/metrics`).
    async fn persist(
        &self,
        desired: &Desired,
        rollouts: &[Rollout],
        fence: Option<&Fence>,
    ) -> Result<(), SaveError> {
        let now = now_unix();
        let expected = *lock(&self.revision);
        // The state file keeps the fleet with the state; etcd keeps each replica's apart (keep_fleet).
        let known = if self.store.shared() {
            Vec::new()
        } else {
            self.fleet().known(now)
        };
        match self
            .store
            .save(desired, &known, rollouts, expected, fence)
            .await
        {
            Ok(revision) => {
                *lock(&self.revision) = revision;
                if let Some(line) = lock(&self.durability).saved(now, desired.version) {
                    eprintln!("canaryctl: {line}");
                }
                Ok(())
            }
            Err(SaveError::Failed(err)) => {
                Metrics::bump(&self.metrics.save_failures);
                if let Some(line) = lock(&self.durability).failed(now, &err.to_string()) {
                    eprintln!("canaryctl: {line}");
                }
                Err(SaveError::Failed(err))
            }
            Err(other) => Err(other),
        }
    }

    /// Reads the store's state and serves it when it is newer than this replica's (the write lock held).
    async fn catch_up_locked(&self) -> Result<(), StateError> {
        match self.store.load().await? {
            Some((saved, revision)) => {
                self.adopt_locked(saved, revision, "read again after a concurrent write");
                Ok(())
            }
            None => Err(StateError::Io(format!(
                "{}: the state is gone from the store",
                self.store.describe()
            ))),
        }
    }

    /// Serves a state written to the store by another replica (or read again), when newer than this one's:
    /// its config is pushed to this replica's Envoys, its rollouts replace this replica's. The write lock held.
    fn adopt_locked(&self, saved: Saved, revision: Revision, why: &str) -> bool {
        {
            let mut current = lock(&self.revision);
            if revision <= *current {
                return false;
            }
            *current = revision;
        }
        *lock(&self.rollouts) = saved
            .rollouts
            .into_iter()
            .map(|r| (r.plan.rollout.clone(), r))
            .collect();
        let now = now_unix();
        if let Some(line) = lock(&self.durability).saved(now, saved.desired.version) {
            eprintln!(
                "canaryctl: {line}; this replica's unsaved change is replaced by the store's (revision {revision})"
            );
        }
        if *self.desired() != saved.desired {
            eprintln!(
                "canaryctl: version {} from the store ({why}, revision {revision})",
                saved.desired.version
            );
            self.desired.send_replace(Arc::new(saved.desired));
        }
        true
    }

    /// Follows the store (etcd): every state another replica writes is served here within one watch round
    /// trip, and the other replicas' fleets, leases and evidence are kept at hand. Runs until the process
    /// ends; when the watch breaks (etcd unreachable, history compacted), everything is read again and the
    /// watch started over.
    pub async fn follow_store(self: Arc<Self>) {
        let Store::Etcd(etcd) = &*self.store else {
            return;
        };
        let mut last_error = String::new();
        loop {
            let result = async {
                let (entries, revision) = etcd.load_all().await?;
                self.apply_store(entries, true).await;
                let mut watch = etcd.watch_all(revision).await?;
                loop {
                    let entries = watch.next().await?;
                    self.apply_store(entries, false).await;
                }
                #[allow(unreachable_code)]
                Ok::<(), StateError>(())
            }
            .await;
            if let Err(err) = result {
                let line = err.to_string();
                // Said once per kind of failure, not once per member tried.
                let kind = line.split(':').take(2).collect::<String>();
                if kind != last_error {
                    last_error = kind;
                    eprintln!("canaryctl: following the store: {line}; retrying each second");
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Takes in what the store holds (`whole`: all of it, read at once) or what changed in it.
    async fn apply_store(&self, entries: Vec<crate::store::etcd::Entry>, whole: bool) {
        let me = self.leadership.name().to_string();
        let now = now_unix();
        if whole {
            let mut remote = lock(&self.remote);
            remote.fleets.clear();
            remote.evidence.clear();
            let live: BTreeSet<String> = entries
                .iter()
                .filter_map(|e| e.key.strip_prefix("replicas/"))
                .map(str::to_string)
                .collect();
            for gone in remote.live.difference(&live).cloned().collect::<Vec<_>>() {
                remote.gone_since.insert(gone, now);
            }
            remote.gone_since.retain(|r, _| !live.contains(r));
            remote.live = live;
        }
        for entry in entries {
            if entry.key == "state" {
                let Some(value) = entry.value else { continue };
                match crate::state::decode(&value, &self.store.describe()) {
                    Ok(saved) => {
                        let _guard = self.write_lock.lock().await;
                        self.adopt_locked(saved, entry.revision, "written by another replica");
                    }
                    Err(err) => eprintln!(
                        "canaryctl: refused the state at revision {} of the store, the previous one keeps serving: {err}",
                        entry.revision
                    ),
                }
                continue;
            }
            let mut remote = lock(&self.remote);
            if let Some(replica) = entry.key.strip_prefix("replicas/") {
                if entry.value.is_some() {
                    remote.live.insert(replica.to_string());
                    remote.gone_since.remove(replica);
                } else if remote.live.remove(replica) {
                    remote.gone_since.insert(replica.to_string(), now);
                }
            } else if let Some(rest) = entry.key.strip_prefix("fleets/") {
                // One shard of a replica's fleet, kept under `<replica>/<shard>`.
                if let Some((replica, shard)) = crate::fleet::shard_key(rest) {
                    if replica != me {
                        let key = (replica.to_string(), Some(shard));
                        keep_published(&mut remote.fleets, key, entry.value.as_deref());
                        self.fleet_moved();
                    }
                }
            } else if let Some(replica) = entry.key.strip_prefix("fleet/") {
                // A replica of a release before the shards: its whole fleet in one document.
                if replica != me {
                    let key = (replica.to_string(), None);
                    keep_published(&mut remote.fleets, key, entry.value.as_deref());
                    self.fleet_moved();
                }
            } else if let Some(replica) = entry.key.strip_prefix("evidence/") {
                if replica != me {
                    keep_published(
                        &mut remote.evidence,
                        replica.to_string(),
                        entry.value.as_deref(),
                    );
                }
            }
        }
    }

    /// `state not saved since … (reason)` while the state file is behind what is served.
    pub fn unsaved(&self) -> Option<String> {
        lock(&self.durability).line()
    }

    pub fn durability(&self) -> crate::durability::Durability {
        lock(&self.durability).clone()
    }

    /// The fleet ahead of the state, while pushes are held.
    pub fn fleet_ahead(&self) -> Option<crate::durability::FleetAhead> {
        lock(&self.ahead).clone()
    }

    /// An Envoy subscribed saying it applied `version`: past the state's, the fleet is ahead and pushes hold.
    /// True while they hold.
    pub fn subscribed_at(&self, node_id: &str, cluster: &str, version: Option<u64>) -> bool {
        let mut ahead = lock(&self.ahead);
        if let Some(version) = version {
            let state_version = self.desired().version;
            if crate::durability::FleetAhead::note(
                &mut ahead,
                node_id,
                cluster,
                version,
                state_version,
                now_unix(),
            ) {
                if let Some(a) = ahead.as_ref() {
                    eprintln!("canaryctl: {}", a.line());
                }
            }
        }
        ahead.is_some()
    }

    /// Whether pushes are held (the fleet is ahead of the state).
    pub fn holding(&self) -> bool {
        lock(&self.ahead).is_some()
    }

    pub fn rollouts(&self) -> Vec<Rollout> {
        lock(&self.rollouts).values().cloned().collect()
    }

    /// The rollout of that name (active or finished), without copying the others.
    pub fn rollout(&self, name: &str) -> Option<Rollout> {
        lock(&self.rollouts).get(name).cloned()
    }
}

/// How long stable's latency is remembered for a rollout's baseline.
pub const LATENCY_WINDOW_S: u64 = 300;

/// Requests and errors of one upstream cluster, summed over the Envoys' load reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub requests: u64,
    pub errors: u64,
}

/// A name a peer sent, cut for the refused peers and the log (node ids are the peer's word).
fn cut(name: &str) -> String {
    canary_router::text::one_line(name, 128)
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the data itself is still consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a rollout decided, as an edit of the desired config (the same edits as `set`, `promote`).
pub fn carry_out(
    config: &RawConfig,
    rollout: &Rollout,
    action: &Action,
) -> Result<(RawConfig, Changes), StateError> {
    let name = &rollout.plan.rollout;
    let canary = rollout.plan.canary.clone();
    let (next, mut changes) = match action {
        Action::SetPercent(p) => {
            crate::state::set_percents(config, name, &[(canary, p.to_string())])?
        }
        Action::Promote => crate::state::promote(config, name, Some(&canary))?,
        Action::RollBack(_) => {
            crate::state::set_percents(config, name, &[(canary, "0".to_string())])?
        }
    };
    if let Action::RollBack(why) = action {
        changes.push(format!("rolled back: {why}"));
    }
    Ok((next, changes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollout_loop::{events_of, tick_of};

    fn server(state: &std::path::Path, percent: &str) -> Server {
        let json = format!(
            r#"{{"rollouts":[{{"name":"web","stable":"v1","canaries":[{{"version":"v2","percent":{percent}}}]}}]}}"#
        );
        let saved = Saved {
            desired: Desired {
                version: 5,
                updated_at_unix: 1,
                config: crate::state::parse_config(json.as_bytes()).unwrap(),
            },
            fleet: Vec::new(),
            rollouts: Vec::new(),
        };
        Server::new(
            FilterSettings {
                name: "canary-router".to_string(),
                artifact: Artifact::Wasm("x.wasm".to_string()),
            },
            Arc::new(Store::File(crate::store::file::FileStore::new(
                crate::state::StateFile::new(state),
            ))),
            (saved, 1),
            FleetSettings {
                window: Duration::from_secs(60),
                forget_after: Duration::from_secs(3600),
                reconnect_grace: Duration::from_secs(5),
            },
            None,
            None,
        )
    }

    fn set(
        percent: &'static str,
    ) -> impl FnMut(&RawConfig, &mut BTreeMap<String, Rollout>) -> Result<(RawConfig, Changes), StateError>
    {
        move |config, _| {
            crate::state::set_percents(config, "web", &[("v2".to_string(), percent.to_string())])
        }
    }

    #[tokio::test]
    async fn unsaved_a_rollback_is_pushed_and_said_not_durable_and_more_canary_traffic_is_refused()
    {
        let dir = std::env::temp_dir().join(format!("canaryctl-unsaved-{}", std::process::id()));
        // Its directory does not exist: every save fails, as on a full or read-only disk.
        let server = server(&dir.join("missing").join("state.json"), "20");
        let mut pushed = server.subscribe();
        let outcome = server.change(Writer::Operator, set("0")).await.unwrap();
        assert!(outcome.changed && !outcome.durable, "{outcome:?}");
        assert!(outcome
            .warning
            .unwrap()
            .starts_with("state not saved since "));
        assert!(pushed.has_changed().unwrap());
        assert_eq!(pushed.borrow_and_update().version, 6);
        assert!(server.unsaved().is_some());
        assert_eq!(Metrics::get(&server.metrics.save_failures), 1);

        let refused = server.change(Writer::Operator, set("1")).await.unwrap_err();
        assert!(matches!(refused, StateError::Unsaved(_)), "{refused:?}");
        assert!(refused
            .to_string()
            .contains("refused a change that may add canary traffic"));
        assert_eq!(server.desired().version, 6);
        assert!(!pushed.has_changed().unwrap());

        // Saveable again (the directory appears): the next write saves, and the run of failures ends.
        std::fs::create_dir_all(dir.join("missing")).unwrap();
        let outcome = server.change(Writer::Operator, set("1")).await.unwrap();
        assert!(outcome.durable && outcome.version == 7, "{outcome:?}");
        assert!(server.unsaved().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_fleet_ahead_of_the_state_holds_until_an_operator_writes_past_its_version() {
        let dir = std::env::temp_dir().join(format!("canaryctl-ahead-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let server = server(&dir.join("state.json"), "20");
        assert!(!server.subscribed_at("front-1", "edge", Some(5)));
        assert!(!server.subscribed_at("front-1", "edge", None));
        assert!(server.subscribed_at("front-1", "edge", Some(9)));
        assert!(server.holding());
        // A rollout's own tick does not end it.
        let outcome = server
            .change(Writer::Rollout, |config, _| {
                Ok((config.clone(), Vec::new()))
            })
            .await
            .unwrap();
        assert!(!outcome.changed);
        assert!(server.holding());
        // An operator's write, even one that changes nothing, is pushed past the fleet's version.
        let outcome = server.change(Writer::Operator, set("20")).await.unwrap();
        assert!(outcome.changed && outcome.version == 10, "{outcome:?}");
        assert_eq!(
            outcome.changes,
            ["the state's config pushed as version 10 (the fleet served version 9)"]
        );
        assert!(!server.holding());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn what_the_filter_routed_joins_the_tick_with_its_envoy_s_next_load_report_at_any_pace() {
        let dir = std::env::temp_dir();
        let server = server(&dir.join("canaryctl-unused-state.json"), "20");
        let routed = |server: &Server| std::mem::take(&mut *lock(&server.routed));
        // Without a load stream, nothing to hold it against: not counted.
        server.report_routed("front-1", "web", "v2", 5);
        server.load_reported("front-1", 1);
        assert!(routed(&server).is_empty());
        server.stream_opened("front-1", StreamKind::Load);
        server.stream_opened("front-1", StreamKind::Stats);
        // Five flushes (five seconds) before the Envoy's next load report, at a pace of 5 s: held, then in
        // the tick of that report, whole.
        for _ in 0..5 {
            server.report_routed("front-1", "web", "v2", 10);
            assert!(routed(&server).is_empty());
        }
        server.load_reported("front-1", 5);
        let key = ("front-1".to_string(), "web".to_string(), "v2".to_string());
        assert_eq!(routed(&server).get(&key), Some(&50));
        assert_eq!(lock(&server.last_reports)["front-1"].load_every, 5);
        // A new pace asked: waited for over the longer until the next report.
        server.load_pace_asked("front-1", 5);
        server.load_reported("front-1", 2);
        assert_eq!(lock(&server.last_reports)["front-1"].load_every, 2);
        // Its load stream gone, what it held is dropped: no report will pair it.
        server.report_routed("front-1", "web", "v2", 7);
        server.stream_closed("front-1", StreamKind::Load);
        server.stream_opened("front-1", StreamKind::Load);
        server.load_reported("front-1", 1);
        assert!(routed(&server).is_empty());
        assert_eq!(server.load_streams(), 1);
    }

    #[test]
    fn a_report_counts_only_from_a_node_with_an_ads_stream_of_the_same_cluster() {
        let dir = std::env::temp_dir();
        let server = server(&dir.join("canaryctl-unused-state.json"), "20");
        let admit = |node: &str, cluster: &str, now: u64| {
            server.admit_report_at(None, node, cluster, "a load report", now)
        };
        // Before its ADS stream names it, an Envoy's first reports are not evidence, and not refused either.
        assert!(!admit("front-1", "edge", 1000));
        let stream = server.connect(None);
        server.identify(stream, "front-1", "edge", None);
        assert!(admit("front-1", "edge", 1001));
        // The same node id under another cluster, and another node of the same cluster: not evidence, and
        // refused (counted, listed) once they have reported so for the grace.
        assert!(!admit("front-1", "batch", 1002));
        assert!(!admit("ghost", "edge", 1002));
        assert_eq!(Metrics::get(&server.metrics.reports_unsubscribed), 0);
        assert!(!admit("front-1", "batch", 1012));
        assert!(!admit("ghost", "edge", 1012));
        assert!(!admit("ghost", "edge", 1013));
        assert_eq!(Metrics::get(&server.metrics.reports_unsubscribed), 3);
        assert_eq!(server.refused_total(Refused::NoAdsSubscription), 3);
        let listed = server.refused_peers();
        assert!(listed.iter().any(|r| r.node_id.as_deref() == Some("ghost")));
        assert_eq!(server.cluster_of("front-1").as_deref(), Some("edge"));
        server.disconnect(stream);
        assert!(!admit("front-1", "edge", 1014));
    }

    #[test]
    fn a_rollout_s_tick_and_findings_hold_only_its_fleet_s_reports() {
        let (mut rollout, _) = Rollout::start(
            crate::rollout::tests::plan("20,100"),
            0,
            Histogram::default(),
        )
        .unwrap();
        rollout.fleet = BTreeSet::from(["front-1".to_string()]);
        let key = |node: &str, cluster: &str| (node.to_string(), cluster.to_string());
        let load = BTreeMap::from([
            (
                key("front-1", "app-v1"),
                Load {
                    requests: 800,
                    errors: 0,
                },
            ),
            (
                key("front-1", "app-v2"),
                Load {
                    requests: 200,
                    errors: 10,
                },
            ),
            // Another fleet's Envoy, with the same upstream cluster names.
            (
                key("batch-1", "app-v2"),
                Load {
                    requests: 100_000,
                    errors: 0,
                },
            ),
        ]);
        let tick = tick_of(&load, &rollout).unwrap();
        assert_eq!(
            (tick.stable_requests, tick.canary_requests, tick.canary_bad),
            (800, 200, 10)
        );
        let failure = |node: &str, cluster: &str| {
            (
                (
                    Owner::Cluster {
                        node: node.to_string(),
                        cluster: cluster.to_string(),
                    },
                    Signature::app("boom"),
                ),
                Seen {
                    count: 3,
                    example: String::new(),
                },
            )
        };
        let failures: Failures =
            BTreeMap::from([failure("front-1", "app-v2"), failure("batch-1", "app-v1")]);
        let events = events_of(&failures, &rollout);
        let only = events.values().next().unwrap();
        assert_eq!((only.stable, only.canary), (0, 3));
    }

    #[tokio::test]
    async fn a_replica_that_does_not_lead_writes_no_judgement_but_operators_still_write() {
        let dir = std::env::temp_dir().join(format!("canaryctl-follower-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let server = server(&dir.join("state.json"), "20")
            .with_leadership(crate::leader::Leadership::replica("b"));
        let refused = server.change(Writer::Judge, set("50")).await.unwrap_err();
        assert_eq!(refused, StateError::NotLeader);
        assert_eq!(server.desired().version, 5, "nothing written");
        let outcome = server.change(Writer::Operator, set("50")).await.unwrap();
        assert!(outcome.changed && outcome.version == 6, "{outcome:?}");
        let view = server.leadership.view();
        assert_eq!((view.role, view.leader), ("follower", None));
        // The only replica (a state file) always judges, unfenced.
        assert_eq!(crate::leader::Leadership::alone().judge(), Some(None));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
