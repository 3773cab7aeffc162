//! The leader's loop: each second, the leader reads each active rollout's evidence (its own Envoys' reports,
//! the other replicas' published shares, or Prometheus: `sources.rs`), hands it to the judge (`judge.rs`,
//! pure) and writes what it decides like an operator's change, fenced by its lead. A replica that does not
//! lead publishes its share of the evidence instead.

use super::*;
use crate::judge::{judge, Round};
use crate::sources::{EnvoyStreams, EvidenceSource, Inputs, PrometheusScrapes};

impl Server {
    /// This replica's share of a rollout's evidence since the last tick: what the Envoys of its fleet connected
    /// here reported (those of its clusters that connected since count too, as the judge adds them).
    #[allow(clippy::too_many_arguments)]
    fn share_of(
        &self,
        rollout: &Rollout,
        own_envoys: &[EnvoyStatus],
        load: &BTreeMap<(String, String), Load>,
        latency: &BTreeMap<(String, String), Histogram>,
        failures: &Failures,
        routed: &BTreeMap<(String, String, String), u64>,
        load_paired: &BTreeMap<(String, String), u64>,
    ) -> Partial {
        let plan = &rollout.plan;
        let fleet = &rollout.fleet;
        let joining = |e: &EnvoyStatus| {
            e.link == crate::fleet::Link::Connected
                && (plan.fleet_clusters.is_empty() || plan.fleet_clusters.contains(&e.cluster))
        };
        // Taken, and the lock let go, before the hosts below (which read the paces).
        let reports = {
            let last = lock(&self.last_reports);
            own_envoys
                .iter()
                .filter(|e| fleet.contains(&e.node_id) || joining(e))
                .filter_map(|e| Some((e.node_id.clone(), *last.get(&e.node_id)?)))
                .collect()
        };
        Partial {
            tick: tick_of(load, rollout),
            stable_latency: of_fleet(latency, fleet, &plan.stable_cluster),
            canary_latency: of_fleet(latency, fleet, plan.canary_latency_cluster()),
            canary_hosts: self.fresh_hosts(&plan.canary_cluster, fleet),
            stable_hosts: self.fresh_hosts(&plan.stable_cluster, fleet),
            routed: routed
                .iter()
                .filter(|((node, r, v), _)| {
                    fleet.contains(node) && *r == plan.rollout && *v == plan.canary
                })
                .map(|(_, n)| *n)
                .reduce(u64::saturating_add),
            served: of_fleet(load_paired, fleet, &plan.canary_cluster),
            events: events_of(failures, rollout).into_iter().collect(),
            reports,
        }
    }

    /// Publishes this tick's shares for the judge (under this replica's lease: gone with it).
    async fn publish_shares(&self, tick: BTreeMap<String, Partial>) {
        let Store::Etcd(etcd) = &*self.store else {
            return;
        };
        let Some(lease) = self.leadership.lease() else {
            return; // no lease: etcd is out of reach, and the judge too
        };
        let value = {
            let mut shares = lock(&self.shares);
            let seq = shares.ticks.last().map_or(0, |t| t.seq) + 1;
            shares.push(crate::evidence::Published {
                seq,
                at_unix: now_unix(),
                rollouts: tick,
            });
            serde_json::to_vec(&*shares)
        };
        let Ok(value) = value else { return };
        let key = etcd.key(&format!("evidence/{}", self.leadership.name()));
        // A failure is the store's to say (the lease's renewals say it first): the judge sees the gap.
        let _ = etcd.put_leased(key, value, lease).await;
    }

    /// A rollout's inputs for this tick, from its evidence source.
    async fn inputs(&self, rollout: &Rollout, share: &Partial) -> Inputs {
        match rollout.plan.evidence {
            Source::Envoy => EnvoyStreams { share }.inputs(rollout).await,
            Source::Prometheus => PrometheusScrapes { server: self }.inputs(rollout).await,
        }
    }

    /// The application's metrics of a rollout (`--metric`), from Prometheus: what each moved since the
    /// previous tick. A metric without an answer, or without a version's requests, is evidence missing: the
    /// step holds.
    async fn metric_inputs(&self, rollout: &Rollout, inputs: &mut Inputs) {
        let plan = &rollout.plan;
        for metric in &plan.metrics {
            let query = crate::user_metrics::query(metric, &plan.stable, &plan.canary);
            let moved = match self.prometheus_query(&query).await {
                Ok(samples) => {
                    self.metric_advance(&plan.rollout, metric, &samples, &plan.stable, &plan.canary)
                }
                Err(err) => {
                    inputs.missing.push(format!(
                        "metric {}: Prometheus: no answer ({})",
                        metric.name,
                        err.rsplit(": ").next().unwrap_or(&err)
                    ));
                    inputs.metrics.push(None);
                    continue;
                }
            };
            for version in &moved.missing {
                inputs.missing.push(format!(
                    "metric {}: no series of {version}'s requests",
                    metric.name
                ));
            }
            inputs.metrics.push(moved.tick);
        }
    }

    /// Runs the rollouts: every second, the load reported since the previous tick goes to each active
    /// rollout, and what it decides (a step, a promotion, a rollback) is written like an operator's change.
    pub async fn run_rollouts(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let load = std::mem::take(&mut *lock(&self.load));
            let latency = std::mem::take(&mut *lock(&self.latency));
            let failures = std::mem::take(&mut *lock(&self.failures));
            let routed = std::mem::take(&mut *lock(&self.routed));
            let load_paired = std::mem::take(&mut *lock(&self.load_paired));
            let active: Vec<Rollout> = lock(&self.rollouts)
                .values()
                .filter(|r| !r.phase.finished())
                .cloned()
                .collect();
            if active.is_empty() {
                continue;
            }
            // This replica's share of each rollout's evidence: judged here, or published for the judge.
            let own_envoys = self.own_envoys();
            let mut shares: BTreeMap<String, Partial> = active
                .iter()
                .map(|r| {
                    let share = self.share_of(
                        r,
                        &own_envoys,
                        &load,
                        &latency,
                        &failures,
                        &routed,
                        &load_paired,
                    );
                    (r.plan.rollout.clone(), share)
                })
                .collect();
            if self.leadership.judge().is_none() {
                // Another replica leads: it judges, with this replica's share.
                if self.store.shared() {
                    self.publish_shares(shares).await;
                }
                continue;
            }
            let now = now_unix();
            {
                let remote = lock(&self.remote);
                for (rollout, theirs) in lock(&self.counted).take(&remote.evidence, now) {
                    if let Some(mine) = shares.get_mut(&rollout) {
                        mine.add(&theirs);
                    }
                }
            }
            // The fleet serves a newer version than the state: nothing moves until an operator writes.
            if self.holding() {
                continue;
            }
            // Unsaved, a step would be forgotten by a restart: tests still run, steps wait.
            let steps_wait = self.unsaved().is_some();
            let envoys = self.envoys();
            for current in active {
                let name = current.plan.rollout.clone();
                let share = shares.remove(&name).unwrap_or_default();
                let mut inputs = self.inputs(&current, &share).await;
                self.metric_inputs(&current, &mut inputs).await;
                let reports = &share.reports;
                let events: BTreeMap<Signature, Events> = share.events.iter().cloned().collect();
                let now = now_unix();
                let result = self
                    .change(Writer::Judge, |config, rollouts| {
                        let Some(rollout) = rollouts.get_mut(&name) else {
                            return Ok((config.clone(), Vec::new()));
                        };
                        let round = Round {
                            inputs: &inputs,
                            events: &events,
                            envoys: &envoys,
                            reports,
                            steps_wait,
                            now,
                        };
                        let action = judge(rollout, &round);
                        match action {
                            Some(action) => carry_out(config, rollout, &action),
                            None => Ok((config.clone(), Vec::new())),
                        }
                    })
                    .await;
                match result {
                    Ok(outcome) if outcome.changed => {
                        let rollout = lock(&self.rollouts).get(&name).cloned();
                        if let Some(r) = rollout {
                            eprintln!(
                                "canaryctl: rollout {}: {} (version {}{}): {}",
                                r.plan.rollout,
                                r.phase.label(),
                                outcome.version,
                                if outcome.durable {
                                    ""
                                } else {
                                    ", pushed, NOT saved"
                                },
                                r.history.last().map(|e| e.what.as_str()).unwrap_or("")
                            );
                        }
                    }
                    Ok(_) => {}
                    // Said once by the leadership.
                    Err(StateError::NotLeader) => break,
                    Err(err) => eprintln!("canaryctl: rollout {name}: {err}"),
                }
            }
        }
    }
}

/// What the Envoys of `fleet` reported for `cluster` this tick, summed; None when none of them did.
fn of_fleet<T: Clone + Summed>(
    by_envoy: &BTreeMap<(String, String), T>,
    fleet: &BTreeSet<String>,
    cluster: &str,
) -> Option<T> {
    by_envoy
        .iter()
        .filter(|((node, c), _)| c == cluster && fleet.contains(node))
        .map(|(_, v)| v.clone())
        .reduce(|mut sum, v| {
            sum.sum(&v);
            sum
        })
}

impl Summed for Load {
    fn sum(&mut self, other: &Self) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
    }
}

/// A rollout's analysis tick from the load its fleet's Envoys (and only theirs) reported for its two clusters;
/// None when neither cluster was reported.
pub(super) fn tick_of(load: &BTreeMap<(String, String), Load>, rollout: &Rollout) -> Option<Tick> {
    let stable = of_fleet(load, &rollout.fleet, &rollout.plan.stable_cluster);
    let canary = of_fleet(load, &rollout.fleet, &rollout.plan.canary_cluster);
    let (stable, canary) = either_reported(stable.as_ref(), canary.as_ref())?;
    Some(Tick {
        stable_requests: stable.requests,
        canary_requests: canary.requests,
        stable_bad: stable.errors,
        canary_bad: canary.errors,
    })
}

/// A rollout's share of the failures since the last tick: per signature, stable's and the canary's. Envoy's
/// entries belong to a version by cluster (the canary's route cluster counts as the canary's: its attempts go
/// to the canary first), applications' lines by version name.
pub(super) fn events_of(failures: &Failures, rollout: &Rollout) -> BTreeMap<Signature, Events> {
    let plan = &rollout.plan;
    let mut events: BTreeMap<Signature, Events> = BTreeMap::new();
    for ((owner, signature), seen) in failures {
        let canary = match owner {
            // Envoy's access logs count only from the rollout's fleet.
            Owner::Cluster { node, .. } if !rollout.fleet.contains(node) => continue,
            Owner::Cluster { cluster: c, .. } if *c == plan.stable_cluster => false,
            Owner::Cluster { cluster: c, .. }
                if *c == plan.canary_cluster || Some(c) == plan.canary_route_cluster.as_ref() =>
            {
                true
            }
            Owner::Version { rollout, version }
                if rollout.as_ref().map_or(true, |r| *r == plan.rollout) =>
            {
                if *version == plan.stable {
                    false
                } else if *version == plan.canary {
                    true
                } else {
                    continue;
                }
            }
            _ => continue,
        };
        let count = seen.count;
        let split = Events {
            stable: if canary { 0 } else { count },
            canary: if canary { count } else { 0 },
            example: seen.example.clone(),
        };
        events.entry(signature.clone()).or_default().add(&split);
    }
    events
}
