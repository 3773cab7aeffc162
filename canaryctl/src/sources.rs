//! Where a rollout's evidence comes from, behind one interface (as Argo Rollouts keeps its metric providers
//! behind one): the Envoys' own streams, summed per replica and across replicas (`evidence.rs`), or a
//! Prometheus that scrapes the Envoys. Each turns what it read into one tick's [`Inputs`]; the judge
//! (`judge.rs`) takes them from there, whichever source it was.

use std::future::Future;

use crate::analysis::{either_reported, Histogram, Tick};
use crate::availability::Availability;
use crate::evidence::Partial;
use crate::rollout::Rollout;
use crate::server::Server;

/// What a rollout's analysis gets in one tick: errors, latency of stable and the canary, and whether the
/// canary is up.
#[derive(Debug, Default, Clone)]
pub struct Inputs {
    pub tick: Option<Tick>,
    pub latency: Option<(Histogram, Histogram)>,
    pub availability: Availability,
    /// What the source lacks this tick (Prometheus did not answer, or did not scrape an Envoy).
    pub missing: Vec<String>,
    /// What each of the application's metrics moved (the plan's order; None: nothing, or no answer).
    pub metrics: Vec<Option<Tick>>,
}

/// A source of a rollout's evidence.
pub trait EvidenceSource {
    /// This tick's inputs for `rollout`.
    fn inputs(&self, rollout: &Rollout) -> impl Future<Output = Inputs> + Send;
}

/// The Envoys' load reports and stats flushes: what the Envoys of the rollout's fleet sent this replica and
/// the others (their shares already added).
pub struct EnvoyStreams<'a> {
    pub share: &'a Partial,
}

impl EvidenceSource for EnvoyStreams<'_> {
    async fn inputs(&self, _rollout: &Rollout) -> Inputs {
        let share = self.share;
        Inputs {
            tick: share.tick,
            latency: either_reported(share.stable_latency.as_ref(), share.canary_latency.as_ref()),
            availability: Availability {
                canary: share.canary_hosts.clone(),
                stable: share.stable_hosts.clone(),
                routed: share.routed,
                served: share.served,
            },
            missing: Vec::new(),
            metrics: Vec::new(),
        }
    }
}

/// A Prometheus that scrapes the Envoys' `/stats/prometheus` (`serve --prometheus-url`): the counters of the
/// rollout's clusters and the filter's, as differences since the previous answer.
pub struct PrometheusScrapes<'a> {
    pub server: &'a Server,
}

impl EvidenceSource for PrometheusScrapes<'_> {
    async fn inputs(&self, rollout: &Rollout) -> Inputs {
        let plan = &rollout.plan;
        let canary_route = plan.canary_latency_cluster();
        let wanted = crate::prometheus::Wanted {
            stable: &plan.stable_cluster,
            canary: &plan.canary_cluster,
            canary_route,
            rollout: &plan.rollout,
            version: &plan.canary,
        };
        let query = crate::prometheus::counters_query(&wanted, &plan.prometheus_selector);
        // No tick without an answer: the counters stay where they were, and the next answer's differences
        // cover the gap.
        let samples = match self.server.prometheus_query(&query).await {
            Ok(samples) => samples,
            Err(err) => {
                return Inputs {
                    // Its cause, without the query's URL: "operation timed out".
                    missing: vec![format!(
                        "Prometheus: no answer ({})",
                        err.rsplit(": ").next().unwrap_or(&err)
                    )],
                    ..Inputs::default()
                };
            }
        };
        let deltas = self.server.prometheus_advance(&plan.rollout, &samples);
        let latency_of = |c: &str| deltas.clusters.get(c).map(|d| d.latency.clone());
        let stable = latency_of(&plan.stable_cluster);
        let canary = latency_of(canary_route);
        let moved = |h: &Option<Histogram>| h.as_ref().is_some_and(|h| h.count > 0);
        Inputs {
            tick: crate::prometheus::tick_of(&deltas, &plan.stable_cluster, canary_route),
            latency: (moved(&stable) || moved(&canary))
                .then(|| (stable.unwrap_or_default(), canary.unwrap_or_default())),
            availability: crate::prometheus::availability_of(&deltas, &wanted),
            missing: deltas
                .silent
                .iter()
                .map(|envoy| format!("Prometheus: no series from {envoy} (not scraped)"))
                .collect(),
            metrics: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::availability::Hosts;

    /// Runs a future that does not wait on anything (the Envoy streams' source reads what it holds).
    fn ready<T>(future: impl Future<Output = T>) -> T {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(future)
    }

    #[test]
    fn the_envoy_streams_source_hands_the_summed_share_over_as_it_is() {
        let rollout = crate::rollout::Rollout::start(
            crate::rollout::tests::plan("5,100"),
            1_000,
            Histogram::default(),
        )
        .unwrap()
        .0;
        let tick = Tick {
            stable_requests: 900,
            canary_requests: 100,
            stable_bad: 9,
            canary_bad: 4,
        };
        let share = Partial {
            tick: Some(tick),
            canary_latency: Some(Histogram::default()),
            canary_hosts: vec![Hosts {
                healthy: 0,
                total: 2,
            }],
            routed: Some(120),
            served: Some(100),
            ..Partial::default()
        };
        let inputs = ready(EnvoyStreams { share: &share }.inputs(&rollout));
        assert_eq!(inputs.tick, Some(tick));
        // Latency reported for one version only still compares (the other's is empty).
        assert!(inputs.latency.is_some());
        assert_eq!(inputs.availability.canary_up_on(), (0, 1));
        assert_eq!(
            (inputs.availability.routed, inputs.availability.served),
            (Some(120), Some(100))
        );
        assert!(inputs.missing.is_empty());
        // Nothing reported: nothing to judge, and nothing invented.
        let inputs = ready(
            EnvoyStreams {
                share: &Partial::default(),
            }
            .inputs(&rollout),
        );
        assert_eq!(inputs.tick, None);
        assert!(inputs.latency.is_none());
        assert_eq!(inputs.availability, Availability::default());
    }
}
