//! A rollout's evidence from Envoys connected to several replicas. Each replica sums, every tick, what its own
//! Envoys of a rollout's fleet reported (a [`Partial`]); the replicas that do not judge publish theirs in the
//! store (one write a second per replica, whatever the fleet's size), and the judge adds every replica's to its
//! own. Plain data and rules: which published ticks were already counted is decided here, tested on the host.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::analysis::{Histogram, Tick};
use crate::availability::Hosts;
use crate::coverage::LastReports;
use crate::findings::{Events, Signature};

/// One replica's share of a rollout's evidence in one tick: the sums over the Envoys of the rollout's fleet
/// connected to it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Partial {
    /// Requests and errors of stable and of the canary (None: neither reported).
    pub tick: Option<Tick>,
    pub stable_latency: Option<Histogram>,
    pub canary_latency: Option<Histogram>,
    /// The canary's and stable's hosts, one entry per Envoy that reports them.
    pub canary_hosts: Vec<Hosts>,
    pub stable_hosts: Vec<Hosts>,
    pub routed: Option<u64>,
    pub served: Option<u64>,
    /// Failures per error signature.
    pub events: Vec<(Signature, Events)>,
    /// When each of these Envoys last sent a load report and a stats flush (unix seconds).
    pub reports: LastReports,
}

/// What per-Envoy (and per-replica) readings add up as.
pub trait Summed {
    fn sum(&mut self, other: &Self);
}

impl Summed for Histogram {
    fn sum(&mut self, other: &Self) {
        self.add(other);
    }
}

impl Summed for u64 {
    fn sum(&mut self, other: &Self) {
        *self = self.saturating_add(*other);
    }
}

impl Summed for Tick {
    fn sum(&mut self, other: &Self) {
        self.stable_requests = self.stable_requests.saturating_add(other.stable_requests);
        self.canary_requests = self.canary_requests.saturating_add(other.canary_requests);
        self.stable_bad = self.stable_bad.saturating_add(other.stable_bad);
        self.canary_bad = self.canary_bad.saturating_add(other.canary_bad);
    }
}

/// Adds `other` to `mine`; None stands for nothing reported.
fn sum_option<T: Clone + Summed>(mine: &mut Option<T>, other: &Option<T>) {
    match (mine.as_mut(), other) {
        (Some(m), Some(o)) => m.sum(o),
        (None, Some(o)) => *mine = Some(o.clone()),
        _ => {}
    }
}

impl Partial {
    /// Adds another replica's share of the same tick.
    pub fn add(&mut self, other: &Partial) {
        self.add_counts(other);
        self.add_standing(other);
    }

    /// Adds what was counted in another tick or replica: requests, errors, latency, routed and served
    /// requests, failures.
    pub fn add_counts(&mut self, other: &Partial) {
        sum_option(&mut self.tick, &other.tick);
        sum_option(&mut self.stable_latency, &other.stable_latency);
        sum_option(&mut self.canary_latency, &other.canary_latency);
        sum_option(&mut self.routed, &other.routed);
        sum_option(&mut self.served, &other.served);
        let mut events: BTreeMap<Signature, Events> =
            std::mem::take(&mut self.events).into_iter().collect();
        for (signature, seen) in &other.events {
            events.entry(signature.clone()).or_default().add(seen);
        }
        self.events = events.into_iter().collect();
    }

    /// Adds how another replica's Envoys stand now: their hosts, and when they last reported.
    pub fn add_standing(&mut self, other: &Partial) {
        self.canary_hosts.extend_from_slice(&other.canary_hosts);
        self.stable_hosts.extend_from_slice(&other.stable_hosts);
        for (node, seen) in &other.reports {
            self.reports.entry(node.clone()).or_default().merge(seen);
        }
    }

    /// Its report times as the judge reads them `age` seconds after they were published: moved by `age`, so an
    /// Envoy is as fresh at the judge as it was when its replica published (a share older than [`STALE_S`] is
    /// not read at all).
    fn report_times_moved(&self, age: u64) -> LastReports {
        let mut reports = self.reports.clone();
        for seen in reports.values_mut() {
            for t in [&mut seen.load, &mut seen.stats] {
                if *t != 0 {
                    *t = t.saturating_add(age);
                }
            }
        }
        reports
    }
}

/// One tick of a replica, as it publishes it: its share of each active rollout.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Published {
    pub seq: u64,
    pub at_unix: u64,
    pub rollouts: BTreeMap<String, Partial>,
}

/// What a replica keeps published: its last few ticks (a judge that reads late still counts each once), and
/// which run of the replica they come from (its counts start over when it restarts).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Shares {
    pub incarnation: u64,
    pub ticks: Vec<Published>,
}

/// The ticks a replica keeps published.
pub const KEPT_TICKS: usize = 5;

/// A published share older than this is not evidence (its replica stopped publishing): its Envoys' reports
/// are missing at the judge.
pub const STALE_S: u64 = 3;

impl Shares {
    /// Adds this tick and drops the oldest beyond [`KEPT_TICKS`].
    pub fn push(&mut self, tick: Published) {
        self.ticks.push(tick);
        if self.ticks.len() > KEPT_TICKS {
            let extra = self.ticks.len() - KEPT_TICKS;
            self.ticks.drain(..extra);
        }
    }
}

/// Which ticks of each replica the judge has counted.
#[derive(Debug, Default)]
pub struct Counted {
    /// Replica → (incarnation, last seq counted).
    last: BTreeMap<String, (u64, u64)>,
}

impl Counted {
    /// Every rollout's share from the other replicas: the counts of their published ticks not counted yet,
    /// each counted once, and how their Envoys stand in their newest tick. A replica seen for the first time
    /// (or restarted) counts from its newest tick: a judge that just took the lead does not count what its
    /// predecessor already did. Ticks older than [`STALE_S`] are not read.
    pub fn take(
        &mut self,
        published: &BTreeMap<String, Shares>,
        now: u64,
    ) -> BTreeMap<String, Partial> {
        let mut sums: BTreeMap<String, Partial> = BTreeMap::new();
        self.last
            .retain(|replica, _| published.contains_key(replica));
        for (replica, shares) in published {
            let Some(newest) = shares.ticks.iter().max_by_key(|t| t.seq) else {
                continue;
            };
            let from = match self.last.get(replica) {
                Some((incarnation, seq)) if *incarnation == shares.incarnation => *seq,
                // First seen: only its newest tick.
                _ => newest.seq.saturating_sub(1),
            };
            let fresh = |tick: &Published| now.saturating_sub(tick.at_unix) <= STALE_S;
            for tick in shares.ticks.iter().filter(|t| t.seq > from && fresh(t)) {
                for (rollout, partial) in &tick.rollouts {
                    sums.entry(rollout.clone()).or_default().add_counts(partial);
                }
            }
            if fresh(newest) {
                let age = now.saturating_sub(newest.at_unix);
                for (rollout, partial) in &newest.rollouts {
                    let standing = Partial {
                        canary_hosts: partial.canary_hosts.clone(),
                        stable_hosts: partial.stable_hosts.clone(),
                        reports: partial.report_times_moved(age),
                        ..Partial::default()
                    };
                    sums.entry(rollout.clone())
                        .or_default()
                        .add_standing(&standing);
                }
            }
            self.last
                .insert(replica.clone(), (shares.incarnation, newest.seq.max(from)));
        }
        sums
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coverage::Reported;

    fn share(requests: u64, node: &str, reported: u64) -> Partial {
        Partial {
            tick: Some(Tick {
                stable_requests: requests,
                canary_requests: requests / 10,
                stable_bad: 0,
                canary_bad: 1,
            }),
            canary_hosts: vec![Hosts {
                healthy: 1,
                total: 1,
            }],
            routed: Some(requests / 10),
            reports: [(
                node.to_string(),
                Reported {
                    load: reported,
                    stats: reported,
                    ..Default::default()
                },
            )]
            .into(),
            ..Partial::default()
        }
    }

    fn published(seq: u64, at: u64, requests: u64) -> Published {
        Published {
            seq,
            at_unix: at,
            rollouts: [("web".to_string(), share(requests, "front-b", at))].into(),
        }
    }

    #[test]
    fn shares_add_up_and_keep_each_envoy_s_hosts_and_latest_reports() {
        let mut sum = share(100, "front-a", 50);
        sum.add(&share(200, "front-b", 52));
        sum.add(&Partial::default());
        let tick = sum.tick.unwrap();
        assert_eq!(
            (tick.stable_requests, tick.canary_requests, tick.canary_bad),
            (300, 30, 2)
        );
        assert_eq!(sum.canary_hosts.len(), 2);
        assert_eq!(sum.routed, Some(30));
        assert_eq!(sum.reports["front-b"].load, 52);
        assert_eq!(sum.reports["front-b"].stats, 52);
        assert_eq!(sum.reports.len(), 2);
    }

    #[test]
    fn each_published_tick_counts_once_and_a_new_judge_starts_from_the_newest() {
        let mut shares = Shares {
            incarnation: 7,
            ticks: Vec::new(),
        };
        for seq in 1..=8 {
            shares.push(published(seq, 100 + seq, 10));
        }
        assert_eq!(shares.ticks.len(), KEPT_TICKS);
        let mut counted = Counted::default();
        let docs: BTreeMap<String, Shares> = [("b".to_string(), shares.clone())].into();
        // A judge that just took the lead counts only b's newest tick (seq 8), not what came before.
        let first = counted.take(&docs, 109);
        assert_eq!(first["web"].tick.unwrap().stable_requests, 10);
        // Read again with nothing new: no counts, but b's Envoys still stand as its newest tick says.
        let again = counted.take(&docs, 109);
        assert_eq!(again["web"].tick, None);
        assert_eq!(again["web"].canary_hosts.len(), 1);
        assert_eq!(again["web"].reports["front-b"].load, 108 + 1);
        assert_eq!(again["web"].reports["front-b"].stats, 108 + 1);
        // Two ticks came while the judge was busy: both count, once.
        shares.push(published(9, 109, 10));
        shares.push(published(10, 110, 10));
        let docs: BTreeMap<String, Shares> = [("b".to_string(), shares.clone())].into();
        assert_eq!(
            counted.take(&docs, 110)["web"]
                .tick
                .unwrap()
                .stable_requests,
            20
        );
        // b restarted: its counts start over, from its newest tick.
        let restarted = Shares {
            incarnation: 8,
            ticks: vec![published(1, 111, 10), published(2, 112, 10)],
        };
        let docs: BTreeMap<String, Shares> = [("b".to_string(), restarted)].into();
        assert_eq!(
            counted.take(&docs, 112)["web"]
                .tick
                .unwrap()
                .stable_requests,
            10
        );
    }

    #[test]
    fn a_share_published_late_or_long_ago_makes_its_envoys_stale() {
        let shares = Shares {
            incarnation: 1,
            ticks: vec![published(1, 100, 10)],
        };
        let docs: BTreeMap<String, Shares> = [("b".to_string(), shares)].into();
        // Seen 2 s after it was published: front-b's reports are as fresh as they were then.
        let seen = Counted::default().take(&docs, 102);
        assert_eq!(seen["web"].reports["front-b"].load, 102);
        assert_eq!(seen["web"].reports["front-b"].stats, 102);
        // A replica that stopped publishing long ago counts for nothing.
        assert!(Counted::default().take(&docs, 100 + STALE_S + 1).is_empty());
    }
}
