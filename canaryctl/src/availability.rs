//! Is the canary up at all? A canary that is down is a failing canary, but behind the canary → stable
//! fallback it fails silently: after a few failed attempts Envoy ejects its hosts or marks them unhealthy,
//! routes its users to stable, and the load reports show no canary traffic at all (no errors either). The
//! error and latency tests then have nothing to judge, and a step could pass on the requests served before
//! the canary went down. Two signals say it, from what the Envoys send (or Prometheus scrapes):
//!
//! - **Health.** Each Envoy's `cluster.<canary>.membership_healthy` and `membership_total` gauges: hosts that
//!   pass health checks and are not ejected by outlier detection, of all hosts.
//! - **Traffic.** The filter's own counters say how many requests it sent to the canary; the canary's hosts'
//!   load (per-host counts) says how many reached them. Requests the filter sends to the canary that its
//!   hosts never get went to stable by the fallback, or nowhere (a route table without the canary's route).
//!
//! The canary is *down* when no Envoy that reports it has a healthy canary host, or when its hosts got less
//! than half of what the filter sent them over the last [`TRAFFIC_WINDOW`] ticks. Down for [`DOWN_FOR_S`]
//! seconds rolls back. Down on some Envoys only, or not yet for long enough, holds the step: it does not pass.
//! When the canary comes back, the step starts over, so it is judged on the canary that is up now.
//!
//! Plain data and rules, no tokio or Envoy types.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Seconds the canary must stay down before it is rolled back (a restart shorter than that holds the step
/// and starts it over instead).
pub const DOWN_FOR_S: u64 = 5;
/// Ticks over which the filter's requests to the canary are compared with what its hosts got.
pub const TRAFFIC_WINDOW: usize = 5;
/// Requests the filter must have sent to the canary in the window before "its hosts got too few" means
/// anything (a few requests in flight across a tick boundary are not a signal).
pub const MIN_ROUTED: u64 = 20;

/// One cluster's hosts as one Envoy sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hosts {
    pub healthy: u64,
    pub total: u64,
}

/// What one tick says about the canary being up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Availability {
    /// The canary cluster's hosts, one entry per Envoy that reports them (its latest gauges).
    pub canary: Vec<Hosts>,
    /// Stable's, likewise: when stable is down too, the trouble is not the canary's.
    pub stable: Vec<Hosts>,
    /// Requests the filter sent to the canary in this tick, from its counters (None: no counters seen).
    pub routed: Option<u64>,
    /// Requests (attempts) the canary's hosts got in this tick, from the load reports (None: no report).
    pub served: Option<u64>,
}

impl Availability {
    /// (Envoys that see a healthy canary host, Envoys that report the canary's hosts). An Envoy whose
    /// cluster has no host yet (DNS not resolved) reports nothing.
    pub fn canary_up_on(&self) -> (usize, usize) {
        let reporting = self.canary.iter().filter(|h| h.total > 0);
        (
            reporting.clone().filter(|h| h.healthy > 0).count(),
            reporting.count(),
        )
    }
}

/// Where the canary stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Up,
    /// Down somewhere, or not for long enough yet: the step holds (it does not pass). The line says why.
    Held(String),
    /// Down everywhere for [`DOWN_FOR_S`]: roll back. The line says why.
    Down(String),
}

/// What the watch remembers between ticks (kept in the state file, so a restart goes on).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watch {
    /// (sent by the filter, got by the hosts) of the last [`TRAFFIC_WINDOW`] ticks that had counters.
    window: VecDeque<(u64, u64)>,
    /// Since when the canary has been down (everywhere or somewhere), and why.
    pub down_since: Option<u64>,
    pub why: Option<String>,
}

impl Watch {
    /// One tick at `now`; `canary` names the version in the lines.
    pub fn observe(&mut self, a: &Availability, canary: &str, now: u64) -> Verdict {
        if let Some(routed) = a.routed {
            if self.window.len() >= TRAFFIC_WINDOW {
                self.window.pop_front();
            }
            // Counters but no load report this tick from the Envoys that sent them (each of those streams its
            // load too): their canary hosts got nothing that was reported.
            self.window.push_back((routed, a.served.unwrap_or(0)));
        }
        let everywhere = self.down_everywhere(a, canary);
        let somewhere = everywhere.clone().or_else(|| down_somewhere(a));
        let Some(why) = somewhere else {
            self.down_since = None;
            self.why = None;
            return Verdict::Up;
        };
        let since = *self.down_since.get_or_insert(now);
        self.why = Some(why.clone());
        let down_for = now.saturating_sub(since);
        match everywhere {
            Some(why) if down_for >= DOWN_FOR_S => Verdict::Down(format!("{why} for {down_for} s")),
            _ => Verdict::Held(why),
        }
    }

    /// True while the canary is down anywhere: a step must not pass.
    pub fn holding(&self) -> bool {
        self.down_since.is_some()
    }

    /// The canary down on every Envoy that reports it, or not getting the traffic sent to it; None otherwise.
    fn down_everywhere(&self, a: &Availability, canary: &str) -> Option<String> {
        let (up, reporting) = a.canary_up_on();
        let stable_up = a.stable.is_empty() || a.stable.iter().any(|h| h.healthy > 0);
        if reporting > 0 && up == 0 && stable_up {
            let total = a.canary.iter().map(|h| h.total).sum::<u64>() / reporting as u64;
            return Some(format!(
                "canary unhealthy: 0 of {total} hosts healthy on {reporting} of {reporting} Envoys"
            ));
        }
        let (routed, served) = self.window.iter().fold((0u64, 0u64), |(r, s), (dr, ds)| {
            (r.saturating_add(*dr), s.saturating_add(*ds))
        });
        if routed >= MIN_ROUTED && served.saturating_mul(2) < routed {
            return Some(format!(
                "canary not served: the filter sent {routed} requests to {canary} in the last {} s, its hosts got {served}",
                self.window.len()
            ));
        }
        None
    }
}

/// Some Envoys see no healthy canary host while others do (a partition, one zone without it).
fn down_somewhere(a: &Availability) -> Option<String> {
    let (up, reporting) = a.canary_up_on();
    let down = reporting - up;
    (down > 0)
        .then(|| format!("canary unhealthy on {down} of {reporting} Envoys: no healthy host there"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &[(u64, u64)]) -> Vec<Hosts> {
        list.iter()
            .map(|&(healthy, total)| Hosts { healthy, total })
            .collect()
    }

    fn health(canary: &[(u64, u64)], stable: &[(u64, u64)]) -> Availability {
        Availability {
            canary: hosts(canary),
            stable: hosts(stable),
            routed: None,
            served: None,
        }
    }

    #[test]
    fn a_canary_unhealthy_on_every_envoy_for_five_seconds_is_down() {
        let mut w = Watch::default();
        assert_eq!(
            w.observe(&health(&[(1, 1), (1, 1)], &[(1, 1)]), "v2", 10),
            Verdict::Up
        );
        assert!(!w.holding());
        let down = health(&[(0, 1), (0, 1)], &[(1, 1), (1, 1)]);
        for t in 11..16 {
            assert_eq!(
                w.observe(&down, "v2", t),
                Verdict::Held("canary unhealthy: 0 of 1 hosts healthy on 2 of 2 Envoys".into())
            );
            assert!(w.holding());
        }
        assert_eq!(
            w.observe(&down, "v2", 16),
            Verdict::Down("canary unhealthy: 0 of 1 hosts healthy on 2 of 2 Envoys for 5 s".into())
        );
    }

    #[test]
    fn a_restart_shorter_than_the_limit_holds_then_clears() {
        let mut w = Watch::default();
        let down = health(&[(0, 2)], &[(1, 1)]);
        assert!(matches!(w.observe(&down, "v2", 1), Verdict::Held(_)));
        assert!(matches!(w.observe(&down, "v2", 4), Verdict::Held(_)));
        assert_eq!(
            w.observe(&health(&[(2, 2)], &[(1, 1)]), "v2", 5),
            Verdict::Up
        );
        assert!(!w.holding() && w.why.is_none());
        // Down again later: the clock starts again.
        assert!(matches!(w.observe(&down, "v2", 20), Verdict::Held(_)));
        assert!(matches!(w.observe(&down, "v2", 24), Verdict::Held(_)));
        assert!(matches!(w.observe(&down, "v2", 25), Verdict::Down(_)));
    }

    #[test]
    fn down_on_some_envoys_only_holds_and_stable_down_too_is_not_the_canary_s_fault() {
        let mut w = Watch::default();
        for t in 0..60 {
            assert_eq!(
                w.observe(&health(&[(0, 1), (1, 1)], &[(1, 1), (1, 1)]), "v2", t),
                Verdict::Held("canary unhealthy on 1 of 2 Envoys: no healthy host there".into())
            );
        }
        let mut w = Watch::default();
        for t in 0..60 {
            let verdict = w.observe(&health(&[(0, 1)], &[(0, 1)]), "v2", t);
            assert!(matches!(verdict, Verdict::Held(_)), "{verdict:?}");
        }
        // No gauges at all (no stats stream): no statement.
        let mut w = Watch::default();
        assert_eq!(w.observe(&Availability::default(), "v2", 1), Verdict::Up);
        // A cluster with no hosts yet (DNS not resolved) is not "unhealthy".
        assert_eq!(
            w.observe(&health(&[(0, 0)], &[(1, 1)]), "v2", 2),
            Verdict::Up
        );
    }

    #[test]
    fn requests_sent_to_the_canary_that_its_hosts_never_get_mean_it_is_down() {
        let tick = |routed, served| Availability {
            canary: hosts(&[(1, 1)]),
            stable: hosts(&[(1, 1)]),
            routed: Some(routed),
            served: Some(served),
        };
        let mut w = Watch::default();
        // Served what was sent, give or take requests in flight across a tick.
        for (t, (r, s)) in [(40, 38), (40, 43), (41, 40), (39, 39), (40, 40), (40, 41)]
            .into_iter()
            .enumerate()
        {
            assert_eq!(w.observe(&tick(r, s), "v2", t as u64), Verdict::Up);
        }
        // Its hosts stop getting them (healthy by their gauges: a route table without the canary's route).
        let mut last = Verdict::Up;
        for t in 6..30 {
            last = w.observe(&tick(40, 0), "v2", t);
            if matches!(last, Verdict::Down(_)) {
                break;
            }
        }
        let Verdict::Down(why) = last else {
            panic!("not down: {last:?}")
        };
        assert!(
            why.starts_with("canary not served: the filter sent 200 requests to v2 in the last 5 s, its hosts got 0"),
            "{why}"
        );
        // Few requests say nothing.
        let mut w = Watch::default();
        for t in 0..30 {
            assert_eq!(w.observe(&tick(2, 0), "v2", t), Verdict::Up);
        }
    }
}
