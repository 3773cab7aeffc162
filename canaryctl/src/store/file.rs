//! The state file as a store: one process writes it, so a write never conflicts; the file holds the state and
//! the fleet together and is rewritten whole (atomically, see [`StateFile`]) when either changes.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

use super::{Revision, SaveError};
use crate::fleet::KnownEnvoy;
use crate::rollout::Rollout;
use crate::state::{Desired, Saved, StateError, StateFile};

pub struct FileStore {
    file: StateFile,
    /// What the file holds (or should: the last write may have failed), so either half can be rewritten.
    held: Mutex<Held>,
    revision: AtomicI64,
}

#[derive(Default)]
struct Held {
    state: Option<(Desired, Vec<Rollout>)>,
    fleet: Vec<KnownEnvoy>,
}

impl FileStore {
    pub fn new(file: StateFile) -> Self {
        Self {
            file,
            held: Mutex::new(Held::default()),
            revision: AtomicI64::new(0),
        }
    }

    pub fn describe(&self) -> String {
        format!("state file {}", self.file.path().display())
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        crate::server::lock(&self.held)
    }

    fn next_revision(&self) -> Revision {
        self.revision.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn hold(&self, saved: &Saved) {
        let mut held = self.held();
        held.state = Some((saved.desired.clone(), saved.rollouts.clone()));
        held.fleet = saved.fleet.clone();
    }

    pub fn load(&self) -> Result<Option<(Saved, Revision)>, StateError> {
        let Some(saved) = self.file.load()? else {
            return Ok(None);
        };
        self.hold(&saved);
        Ok(Some((saved, self.next_revision())))
    }

    pub fn create(&self, saved: &Saved) -> Result<Revision, StateError> {
        self.file
            .save(&saved.desired, &saved.fleet, &saved.rollouts)?;
        self.hold(saved);
        Ok(self.next_revision())
    }

    pub fn save(
        &self,
        desired: &Desired,
        fleet: &[KnownEnvoy],
        rollouts: &[Rollout],
        _expected: Revision,
    ) -> Result<Revision, SaveError> {
        let mut held = self.held();
        held.state = Some((desired.clone(), rollouts.to_vec()));
        held.fleet = fleet.to_vec();
        self.file
            .save(desired, fleet, rollouts)
            .map_err(SaveError::Failed)?;
        Ok(self.next_revision())
    }

    pub fn save_fleet(&self, known: &[KnownEnvoy]) -> Result<(), StateError> {
        let mut held = self.held();
        held.fleet = known.to_vec();
        let Some((desired, rollouts)) = &held.state else {
            return Ok(());
        };
        self.file.save(desired, known, rollouts)
    }

    pub fn recover(
        &self,
        config: canary_router::config::RawConfig,
    ) -> Result<(Saved, Revision), StateError> {
        let saved = self.file.recover(config)?;
        self.hold(&saved);
        Ok((saved, self.next_revision()))
    }
}
