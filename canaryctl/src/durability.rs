//! What canaryctl does when its state cannot be saved, and when it restarts from a state older than what its
//! Envoys serve. Plain logic: the server calls it around every save and every new subscription.
//!
//! The rule: a change that takes canary traffic away (a rollback, a lower percent) is pushed whether or not it
//! could be saved, because users on a failing canary cannot wait for a disk; a change that adds canary traffic
//! is refused until the state is saved again, because a restart would forget it. After a restart, an Envoy
//! that says it applied a version newer than the state's means the state lost a change: nothing is pushed
//! (the Envoys keep what they serve) until an operator writes the config they want.

use canary_router::config::RawConfig;
use serde::Serialize;

use crate::state::rfc3339;

/// Whether `new` only lowers canary percents of `old` (or changes nothing): every other field the same,
/// every canary's percent at most what it was. Anything else (a raised percent, a promotion, a new rule or
/// rollout) may send more users to a canary.
pub fn only_lowers_canaries(old: &RawConfig, new: &RawConfig) -> bool {
    if old.rollouts.len() != new.rollouts.len() {
        return false;
    }
    let mut raised = new.clone();
    for (rollout, before) in raised.rollouts.iter_mut().zip(&old.rollouts) {
        if rollout.canaries.len() != before.canaries.len() {
            return false;
        }
        for (canary, was) in rollout.canaries.iter_mut().zip(&before.canaries) {
            if canary.version == was.version
                && canary.percent.basis_points() <= was.percent.basis_points()
            {
                canary.percent = was.percent;
            }
        }
    }
    raised == *old
}

/// Whether the state on disk is what canaryctl serves.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Durability {
    /// The first failed save since the last good one (unix seconds), with the latest reason.
    pub unsaved_since_unix: Option<u64>,
    pub reason: String,
    /// Failed saves since the process started.
    pub failures: u64,
    /// When the failure was last logged (once a minute, plus the first).
    #[serde(skip)]
    logged_unix: u64,
}

impl Durability {
    /// A save failed: the line to log, when one is due.
    pub fn failed(&mut self, now: u64, reason: &str) -> Option<String> {
        self.failures += 1;
        self.reason = canary_router::text::one_line(reason, canary_router::text::MAX_LINE);
        let first = self.unsaved_since_unix.is_none();
        let since = *self.unsaved_since_unix.get_or_insert(now);
        if first || now.saturating_sub(self.logged_unix) >= 60 {
            self.logged_unix = now;
            return Some(format!(
                "{}: kept in memory and pushed where it takes traffic off canaries; retrying each second; \
                 changes that add canary traffic are refused until it is saved",
                unsaved_line(since, &self.reason)
            ));
        }
        None
    }

    /// A save succeeded: the line to log when it ends a run of failures.
    pub fn saved(&mut self, now: u64, version: u64) -> Option<String> {
        let since = self.unsaved_since_unix.take()?;
        self.logged_unix = 0;
        Some(format!(
            "state saved again (version {version}) after {}s unsaved",
            now.saturating_sub(since)
        ))
    }

    /// `state not saved since … (reason)` while unsaved.
    pub fn line(&self) -> Option<String> {
        self.unsaved_since_unix
            .map(|since| unsaved_line(since, &self.reason))
    }
}

fn unsaved_line(since: u64, reason: &str) -> String {
    format!("state not saved since {} ({reason})", rfc3339(since))
}

/// An Envoy reported, on subscribing, a version newer than the state's: the state is older than what the
/// fleet serves (a change that could not be saved, a restored backup). Pushes are held until an operator
/// writes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetAhead {
    pub node_id: String,
    pub cluster: String,
    /// The newest version an Envoy said it applied.
    pub fleet_version: u64,
    /// The state's version when it was noticed.
    pub state_version: u64,
    pub since_unix: u64,
}

impl FleetAhead {
    /// Notes an Envoy's applied version; true when it is newer than any noted so far.
    pub fn note(
        ahead: &mut Option<FleetAhead>,
        node_id: &str,
        cluster: &str,
        fleet_version: u64,
        state_version: u64,
        now: u64,
    ) -> bool {
        if fleet_version <= state_version
            || ahead
                .as_ref()
                .is_some_and(|a| a.fleet_version >= fleet_version)
        {
            return false;
        }
        let since_unix = ahead.as_ref().map_or(now, |a| a.since_unix);
        *ahead = Some(FleetAhead {
            node_id: node_id.to_string(),
            cluster: cluster.to_string(),
            fleet_version,
            state_version,
            since_unix,
        });
        true
    }

    /// What it means and how to end it, in one line.
    pub fn line(&self) -> String {
        format!(
            "holding: Envoy {} ({}) serves version {}, newer than this state's version {}: the state lost a \
             change (a failed save, an older copy); nothing is pushed and no rollout moves until an operator \
             writes the config to serve: `canaryctl rollback <rollout>` sends everyone to stable, `canaryctl \
             set` or `apply` another (saved as version {} or later)",
            canary_router::text::quote(&self.node_id),
            self.cluster,
            self.fleet_version,
            self.state_version,
            self.fleet_version + 1
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(percents: &[(&str, &str)]) -> RawConfig {
        let canaries: Vec<String> = percents
            .iter()
            .map(|(v, p)| format!(r#"{{"version":"{v}","percent":{p}}}"#))
            .collect();
        let json = format!(
            r#"{{"rollouts":[{{"name":"app","stable":"v1","canaries":[{}]}}]}}"#,
            canaries.join(",")
        );
        crate::state::parse_config(json.as_bytes()).unwrap()
    }

    #[test]
    fn only_a_lower_or_equal_percent_counts_as_taking_traffic_off() {
        let at20 = config(&[("v2", "20"), ("v3", "5")]);
        assert!(only_lowers_canaries(
            &at20,
            &config(&[("v2", "0"), ("v3", "5")])
        ));
        assert!(only_lowers_canaries(
            &at20,
            &config(&[("v2", "0"), ("v3", "0")])
        ));
        assert!(only_lowers_canaries(&at20, &at20));
        assert!(!only_lowers_canaries(
            &at20,
            &config(&[("v2", "20.01"), ("v3", "5")])
        ));
        // One down, one up: more users on v3.
        assert!(!only_lowers_canaries(
            &at20,
            &config(&[("v2", "0"), ("v3", "6")])
        ));
        // A promotion: stable changes.
        let promoted = crate::state::promote(&at20, "app", Some("v2")).unwrap().0;
        assert!(!only_lowers_canaries(&at20, &promoted));
        // Another canary, or another field.
        assert!(!only_lowers_canaries(
            &at20,
            &config(&[("v2", "0"), ("v4", "0")])
        ));
        let mut salted = at20.clone();
        salted.rollouts[0].sticky =
            Some(serde_json::from_str(r#"{"keys":[{"header":"x-user"}],"salt":"s"}"#).unwrap());
        assert!(!only_lowers_canaries(&at20, &salted));
    }

    #[test]
    fn an_unsaved_state_is_logged_once_then_once_a_minute_and_its_end_is_said() {
        let mut d = Durability::default();
        assert_eq!(d.line(), None);
        let first = d
            .failed(1000, "No space left on device (os error 28)")
            .unwrap();
        assert!(first.starts_with("state not saved since 1970-01-01T00:16:40Z (No space left"));
        assert_eq!(d.failed(1001, "again"), None);
        assert_eq!(d.failed(1059, "again"), None);
        assert!(d.failed(1060, "again").is_some());
        assert_eq!(d.failures, 4);
        assert_eq!(
            d.line().unwrap(),
            "state not saved since 1970-01-01T00:16:40Z (again)"
        );
        assert_eq!(
            d.saved(1090, 7).unwrap(),
            "state saved again (version 7) after 90s unsaved"
        );
        assert_eq!(d.line(), None);
        assert_eq!(d.saved(1091, 8), None);
    }

    #[test]
    fn the_fleet_is_ahead_only_past_the_state_s_version_and_the_newest_is_kept() {
        let mut ahead = None;
        assert!(!FleetAhead::note(&mut ahead, "a", "edge", 10, 10, 5));
        assert!(!FleetAhead::note(&mut ahead, "a", "edge", 3, 10, 5));
        assert!(ahead.is_none());
        assert!(FleetAhead::note(&mut ahead, "a", "edge", 11, 10, 5));
        assert!(!FleetAhead::note(&mut ahead, "b", "edge", 11, 10, 6));
        assert!(FleetAhead::note(&mut ahead, "b", "edge", 12, 10, 7));
        let a = ahead.unwrap();
        assert_eq!(
            (a.node_id.as_str(), a.fleet_version, a.since_unix),
            ("b", 12, 5)
        );
        assert!(a
            .line()
            .contains("serves version 12, newer than this state's version 10"));
        assert!(a.line().contains("version 13 or later"));
    }
}
