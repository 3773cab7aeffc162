//! What `canaryctl serve` holds: the desired state (durable, broadcast to every xDS stream), the fleet of
//! connected Envoys with what each last applied or refused, and counters for `/metrics`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::state::{now_unix, Changes, Desired, StateError, StateFile};
use canary_router::config::RawConfig;

/// How the filter is delivered: the ECDS resource name and the `.wasm` path as the Envoys see it.
#[derive(Debug, Clone)]
pub struct FilterSettings {
    pub name: String,
    pub wasm_path: String,
}

/// One xDS stream, i.e. one Envoy (a reconnecting Envoy replaces its earlier entry).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnvoyStatus {
    pub node_id: String,
    pub cluster: String,
    pub peer: String,
    pub connected: bool,
    pub connected_at_unix: u64,
    /// The last desired version pushed to it.
    pub sent_version: Option<u64>,
    /// The last version it ACKed (applied).
    pub acked_version: Option<u64>,
    /// Its refusal of the latest version it was sent, if it refused it.
    pub nack: Option<Nack>,
    pub last_change_unix: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Nack {
    pub version: u64,
    pub message: String,
    pub at_unix: u64,
}

#[derive(Default)]
pub struct Metrics {
    pub pushes: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    pub writes_applied: AtomicU64,
    pub writes_unchanged: AtomicU64,
    pub writes_refused: AtomicU64,
    pub writes_unauthorized: AtomicU64,
}

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
}

pub struct Server {
    pub filter: FilterSettings,
    pub metrics: Metrics,
    token: Option<String>,
    state_file: StateFile,
    desired: watch::Sender<Arc<Desired>>,
    /// Serialises writes, so two operators cannot both edit version N.
    write_lock: tokio::sync::Mutex<()>,
    fleet: Mutex<BTreeMap<u64, EnvoyStatus>>,
    next_stream: AtomicU64,
}

impl Server {
    pub fn new(
        filter: FilterSettings,
        state_file: StateFile,
        desired: Desired,
        token: Option<String>,
    ) -> Self {
        let (desired, _) = watch::channel(Arc::new(desired));
        Self {
            filter,
            metrics: Metrics::default(),
            token,
            state_file,
            desired,
            write_lock: tokio::sync::Mutex::new(()),
            fleet: Mutex::new(BTreeMap::new()),
            next_stream: AtomicU64::new(1),
        }
    }

    pub fn desired(&self) -> Arc<Desired> {
        self.desired.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Desired>> {
        self.desired.subscribe()
    }

    /// True when writes need no token, or `given` is the token (compared in constant time).
    pub fn authorised(&self, given: Option<&str>) -> bool {
        match &self.token {
            None => true,
            Some(token) => given.is_some_and(|g| {
                canary_router::decision::constant_time_eq(g.as_bytes(), token.as_bytes())
            }),
        }
    }

    /// Apply an edit to the desired config: validated by the edit, saved durably, then pushed to every
    /// subscribed Envoy. Nothing is saved or pushed when the edit is refused or changes nothing.
    pub async fn write(
        &self,
        edit: impl FnOnce(&RawConfig) -> Result<(RawConfig, Changes), StateError>,
    ) -> Result<WriteOutcome, StateError> {
        let _guard = self.write_lock.lock().await;
        let current = self.desired();
        let (config, changes) = match edit(&current.config) {
            Ok(result) => result,
            Err(err) => {
                Metrics::bump(&self.metrics.writes_refused);
                return Err(err);
            }
        };
        if config == current.config {
            Metrics::bump(&self.metrics.writes_unchanged);
            return Ok(WriteOutcome {
                version: current.version,
                changed: false,
                changes: Vec::new(),
            });
        }
        let next = Desired {
            version: current.version + 1,
            updated_at_unix: now_unix(),
            config,
        };
        self.state_file.save(&next)?;
        let version = next.version;
        self.desired.send_replace(Arc::new(next));
        Metrics::bump(&self.metrics.writes_applied);
        Ok(WriteOutcome {
            version,
            changed: true,
            changes,
        })
    }

    // -- the fleet ---------------------------------------------------------------------------------

    fn fleet(&self) -> MutexGuard<'_, BTreeMap<u64, EnvoyStatus>> {
        // A poisoned lock only means a panic elsewhere; the map itself is still consistent.
        self.fleet
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn envoys(&self) -> Vec<EnvoyStatus> {
        self.fleet().values().cloned().collect()
    }

    pub fn connect(&self, peer: Option<SocketAddr>) -> u64 {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let now = now_unix();
        self.fleet().insert(
            id,
            EnvoyStatus {
                node_id: String::new(),
                cluster: String::new(),
                peer: peer.map(|p| p.to_string()).unwrap_or_default(),
                connected: true,
                connected_at_unix: now,
                sent_version: None,
                acked_version: None,
                nack: None,
                last_change_unix: now,
            },
        );
        id
    }

    /// Name a stream by its node; an earlier, disconnected entry of the same node is dropped.
    pub fn identify(&self, stream: u64, node_id: &str, cluster: &str) {
        let mut fleet = self.fleet();
        if fleet
            .get(&stream)
            .is_some_and(|e| e.node_id == node_id && e.cluster == cluster)
        {
            return;
        }
        fleet.retain(|&id, e| id == stream || e.connected || e.node_id != node_id);
        if let Some(entry) = fleet.get_mut(&stream) {
            entry.node_id = node_id.to_string();
            entry.cluster = cluster.to_string();
        }
    }

    pub fn sent(&self, stream: u64, version: u64) {
        Metrics::bump(&self.metrics.pushes);
        if let Some(entry) = self.fleet().get_mut(&stream) {
            entry.sent_version = Some(version);
            entry.last_change_unix = now_unix();
        }
    }

    pub fn acked(&self, stream: u64, version: u64) {
        Metrics::bump(&self.metrics.acks);
        if let Some(entry) = self.fleet().get_mut(&stream) {
            entry.acked_version = Some(version);
            entry.nack = None;
            entry.last_change_unix = now_unix();
        }
    }

    pub fn nacked(&self, stream: u64, version: u64, message: String) {
        Metrics::bump(&self.metrics.nacks);
        if let Some(entry) = self.fleet().get_mut(&stream) {
            let now = now_unix();
            entry.nack = Some(Nack {
                version,
                message,
                at_unix: now,
            });
            entry.last_change_unix = now;
        }
    }

    pub fn disconnect(&self, stream: u64) {
        if let Some(entry) = self.fleet().get_mut(&stream) {
            entry.connected = false;
            entry.last_change_unix = now_unix();
        }
    }
}
