//! Where canaryctl keeps what it must not forget: the desired config and its version, the progressive
//! rollouts (plan, phase, evidence), and the fleet it has seen. One interface, two stores:
//!
//! - a state file ([`file::FileStore`], the default): one process, nothing else to run;
//! - etcd ([`etcd::EtcdStore`], `serve --store etcd://…`): several replicas share one state; every write is one
//!   transaction guarded by the revision it was made from, so two replicas writing at once never lose an
//!   update, and a judge's write is also guarded by its leadership, so a deposed judge writes nothing.

pub mod etcd;
pub mod file;

use crate::fleet::{EnvoyStatus, KnownEnvoy};
use crate::rollout::Rollout;
use crate::state::{Desired, Saved, StateError};

/// A point in the store's history: the revision of the state a replica last read or wrote. A write made from
/// an older one is refused as a [`SaveError::Conflict`].
pub type Revision = i64;

/// Why a write of the state did not happen.
#[derive(Debug, Clone, PartialEq)]
pub enum SaveError {
    /// Another replica wrote since the revision the change was made from: re-read and edit again.
    Conflict,
    /// A judge's write after it lost the lead (its leader key is gone or another's): nothing was written.
    NotLeader,
    /// The store did not take it: a full disk, no etcd quorum, etcd unreachable.
    Failed(StateError),
}

/// What a judge's write is conditioned on: its leader key still being the one it created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub create_revision: i64,
}

/// The state store `serve` was given.
// One per process: the size of the etcd variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Store {
    File(file::FileStore),
    Etcd(etcd::EtcdStore),
}

impl Store {
    /// Where the state is kept, as people read it in the log.
    pub fn describe(&self) -> String {
        match self {
            Store::File(file) => file.describe(),
            Store::Etcd(etcd) => etcd.describe(),
        }
    }

    /// Whether several replicas may share this store (etcd).
    pub fn shared(&self) -> bool {
        matches!(self, Store::Etcd(_))
    }

    /// The stored state and its revision; `None` when there is none yet. A state that does not parse, or
    /// whose config this build refuses, is an error: starting from nothing would silently drop what
    /// operators set.
    pub async fn load(&self) -> Result<Option<(Saved, Revision)>, StateError> {
        match self {
            Store::File(file) => file.load(),
            Store::Etcd(etcd) => etcd.load().await,
        }
    }

    /// Stores a first state. `Ok(None)` when a state already exists (another replica started first): load it.
    pub async fn create(&self, saved: &Saved) -> Result<Option<Revision>, StateError> {
        match self {
            Store::File(file) => file.create(saved).map(Some),
            Store::Etcd(etcd) => etcd.create(saved).await,
        }
    }

    /// Writes the desired state and the rollouts, made from `expected`; with `fence`, only while that leader
    /// key stands. Returns the state's new revision. The state file keeps `fleet` with them (it is one file);
    /// etcd keeps each replica's fleet apart ([`Store::save_fleet`]).
    pub async fn save(
        &self,
        desired: &Desired,
        fleet: &[KnownEnvoy],
        rollouts: &[Rollout],
        expected: Revision,
        fence: Option<&Fence>,
    ) -> Result<Revision, SaveError> {
        match self {
            Store::File(file) => file.save(desired, fleet, rollouts, expected),
            Store::Etcd(etcd) => etcd.save(desired, rollouts, expected, fence).await,
        }
    }

    /// Writes this replica's view of the fleet (the Envoys it serves and has served).
    pub async fn save_fleet(&self, envoys: &[EnvoyStatus]) -> Result<(), StateError> {
        match self {
            Store::File(file) => {
                file.save_fleet(&envoys.iter().map(KnownEnvoy::of).collect::<Vec<_>>())
            }
            Store::Etcd(etcd) => etcd.save_fleet(envoys).await,
        }
    }

    /// A stored state whose config this build refuses, with `config` in its place as the next version.
    pub async fn recover(
        &self,
        config: canary_router::config::RawConfig,
    ) -> Result<(Saved, Revision), StateError> {
        match self {
            Store::File(file) => file.recover(config),
            Store::Etcd(etcd) => etcd.recover(config).await,
        }
    }
}
