//! Your own metrics in the judgment (`rollout start --metric`): counts an application exposes per version
//! (payments declined, checkouts), read from Prometheus and compared canary against stable with the same
//! anytime-valid test as Envoy's errors, sharing the false-rollback budget.
//!
//! A metric is two PromQL selectors with a `{version}` placeholder: the events (declines) and what they are
//! counted out of (checkouts). Each tick canaryctl asks Prometheus for the four (events and requests of stable
//! and of the canary) in one query, each part tagged by a label of its own, and takes each series' increase
//! since the previous answer, as it does for Envoy's counters: a counter that went down was reset (the app
//! restarted: all it holds is new), a series that appears after the start counts from zero (a counter created
//! at its first use), and one that disappears and comes back is differenced against its last value. The first
//! answer of a rollout is its starting point. Plain functions: the HTTP is `prometheus.rs`'s.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::analysis::Tick;
use crate::prometheus::Sample;

/// What stands for a version's name in a metric's queries.
pub const PLACEHOLDER: &str = "{version}";
/// The label canaryctl adds to tell the four parts of a metric's query apart.
const PART: &str = "canaryctl_part";
/// A metric's query, at most (each selector).
pub const MAX_QUERY_BYTES: usize = 2048;
/// Metrics a rollout may take, at most.
pub const MAX_METRICS: usize = 8;

/// A count metric of the application's, as `rollout start --metric` gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricPlan {
    /// How the rollout names it ("declines").
    pub name: String,
    /// The events' counter series, with `{version}`: `payments_declined_total{version="{version}"}`.
    pub events: String,
    /// What the events are counted out of: `checkouts_total{version="{version}"}`.
    pub requests: String,
}

impl MetricPlan {
    /// Checks one metric, naming what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let name = &self.name;
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(format!(
                "metric: {} is not a name (a-z, 0-9, _ and -, at most 64)",
                canary_router::text::quote(name)
            ));
        }
        for (what, query) in [("events", &self.events), ("requests", &self.requests)] {
            if query.trim().is_empty() {
                return Err(format!("metric {name}: its {what} query is empty"));
            }
            if query.len() > MAX_QUERY_BYTES {
                return Err(format!(
                    "metric {name}: its {what} query is {} bytes, over {MAX_QUERY_BYTES}",
                    query.len()
                ));
            }
            if !query.contains(PLACEHOLDER) {
                return Err(format!(
                    "metric {name}: its {what} query {} has no {PLACEHOLDER}: it must pick one version's series",
                    canary_router::text::quote(query)
                ));
            }
        }
        Ok(())
    }
}

/// The four parts of a metric's query, in the order of a [`Tick`]'s fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    StableEvents,
    StableRequests,
    CanaryEvents,
    CanaryRequests,
}

const PARTS: [(Part, &str); 4] = [
    (Part::StableEvents, "stable_events"),
    (Part::StableRequests, "stable_requests"),
    (Part::CanaryEvents, "canary_events"),
    (Part::CanaryRequests, "canary_requests"),
];

/// A version's name inside a PromQL string literal (`"` and `\` escaped).
fn escaped(version: &str) -> String {
    version.replace('\\', "\\\\").replace('"', "\\\"")
}

/// One instant query for the four parts of `metric`, each series tagged with its part.
pub fn query(metric: &MetricPlan, stable: &str, canary: &str) -> String {
    PARTS
        .iter()
        .map(|(part, tag)| {
            let (selector, version) = match part {
                Part::StableEvents => (&metric.events, stable),
                Part::StableRequests => (&metric.requests, stable),
                Part::CanaryEvents => (&metric.events, canary),
                Part::CanaryRequests => (&metric.requests, canary),
            };
            format!(
                "label_replace(({}), \"{PART}\", \"{tag}\", \"\", \"\")",
                selector.replace(PLACEHOLDER, &escaped(version))
            )
        })
        .collect::<Vec<_>>()
        .join(" or ")
}

/// One metric's counters of one rollout: each series' last value.
#[derive(Debug, Default)]
pub struct MetricCounters {
    last: HashMap<BTreeMap<String, String>, f64>,
    started: bool,
}

/// What one answer brought for a metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Moved {
    /// The increases since the previous answer (None: the first answer, a starting point, or nothing moved).
    pub tick: Option<Tick>,
    /// A version whose requests have no series in this answer: the metric cannot be judged now.
    pub missing: Vec<String>,
}

impl MetricCounters {
    /// The increases in `samples` (an answer to [`query`]) since the previous answer.
    pub fn advance(&mut self, samples: &[Sample], stable: &str, canary: &str) -> Moved {
        let mut sums = [0u64; 4];
        let mut requests_seen = [false; 2];
        for sample in samples {
            let Some(part) = sample
                .labels
                .get(PART)
                .and_then(|tag| PARTS.iter().find(|(_, t)| t == tag))
                .map(|(p, _)| *p)
            else {
                continue;
            };
            match part {
                Part::StableRequests => requests_seen[0] = true,
                Part::CanaryRequests => requests_seen[1] = true,
                _ => {}
            }
            let value = if sample.value.is_finite() {
                sample.value.max(0.0)
            } else {
                continue;
            };
            let previous = self.last.insert(sample.labels.clone(), value);
            if !self.started {
                continue;
            }
            let increase = match previous {
                Some(previous) if value >= previous => value - previous,
                // Went down: reset, all of it is new. First seen after the start: created since.
                _ => value,
            };
            let slot = match part {
                Part::StableEvents => 0,
                Part::StableRequests => 1,
                Part::CanaryEvents => 2,
                Part::CanaryRequests => 3,
            };
            if let Some(sum) = sums.get_mut(slot) {
                *sum = sum.saturating_add(increase.round() as u64);
            }
        }
        let first = !self.started;
        self.started = true;
        let mut missing = Vec::new();
        for (seen, version) in requests_seen.iter().zip([stable, canary]) {
            if !seen {
                missing.push(version.to_string());
            }
        }
        let [stable_events, stable_requests, canary_events, canary_requests] = sums;
        let tick = (!first && (stable_requests > 0 || canary_requests > 0)).then_some(Tick {
            stable_requests,
            canary_requests,
            // An event is counted at most once per request.
            stable_bad: stable_events.min(stable_requests),
            canary_bad: canary_events.min(canary_requests),
        });
        Moved { tick, missing }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::tests::Rng;

    fn declines() -> MetricPlan {
        MetricPlan {
            name: "declines".into(),
            events: r#"payments_declined_total{version="{version}"}"#.into(),
            requests: r#"payments_total{version="{version}"}"#.into(),
        }
    }

    fn sample(part: &str, instance: &str, value: f64) -> Sample {
        Sample {
            labels: BTreeMap::from([
                (PART.to_string(), part.to_string()),
                ("instance".to_string(), instance.to_string()),
            ]),
            value,
        }
    }

    #[test]
    fn one_query_asks_for_the_four_parts_each_tagged() {
        assert_eq!(
            query(&declines(), "v1", "v2"),
            "label_replace((payments_declined_total{version=\"v1\"}), \"canaryctl_part\", \"stable_events\", \"\", \"\") or \
             label_replace((payments_total{version=\"v1\"}), \"canaryctl_part\", \"stable_requests\", \"\", \"\") or \
             label_replace((payments_declined_total{version=\"v2\"}), \"canaryctl_part\", \"canary_events\", \"\", \"\") or \
             label_replace((payments_total{version=\"v2\"}), \"canaryctl_part\", \"canary_requests\", \"\", \"\")"
        );
    }

    #[test]
    fn a_metric_is_checked_naming_what_is_wrong() {
        declines().check().unwrap();
        let mut m = declines();
        m.name = "Declines!".into();
        assert!(m
            .check()
            .unwrap_err()
            .contains("\"Declines!\" is not a name"));
        let mut m = declines();
        m.requests = "payments_total".into();
        assert_eq!(
            m.check().unwrap_err(),
            "metric declines: its requests query \"payments_total\" has no {version}: it must pick one version's series"
        );
    }

    /// One simulated rollout judged on a metric read from Prometheus: an app serving `rps` payments a second,
    /// 20 % on the canary, stable declining `rate` and the canary `ratio` × `rate`; Prometheus scrapes every
    /// `scrape_s` seconds, canaryctl asks every second (the same values until the next scrape). Returns the
    /// second it rolled back, if it did within `seconds`.
    fn simulate(rng: &mut Rng, seconds: u64, scrape_s: u64, ratio: f64, alpha: f64) -> Option<u64> {
        let (rps, share, rate) = (300.0, 0.2, 0.02);
        let mut app = [0u64; 4]; // stable events, stable requests, canary events, canary requests
        let mut scraped = app;
        let mut counters = MetricCounters::default();
        let mut evidence = crate::analysis::Evidence::default();
        for second in 0..seconds {
            let stable = rng.poisson(rps * (1.0 - share));
            let canary = rng.poisson(rps * share);
            app[1] += stable;
            app[0] += rng.poisson(stable as f64 * rate);
            app[3] += canary;
            app[2] += rng.poisson(canary as f64 * rate * ratio);
            if second % scrape_s == 0 {
                scraped = app;
            }
            let answer: Vec<Sample> = PARTS
                .iter()
                .zip(scraped)
                .map(|((_, tag), value)| sample(tag, "app", value as f64))
                .collect();
            if let Some(tick) = counters.advance(&answer, "v1", "v2").tick {
                evidence.observe(tick);
                if evidence.rejects(alpha) {
                    return Some(second);
                }
            }
        }
        None
    }

    #[test]
    fn a_metric_read_from_prometheus_keeps_its_false_rollbacks_within_budget_and_catches_3x_declines(
    ) {
        // The test's share of the budget with the errors, three latency bounds, the findings and one metric.
        let alpha = 0.05 / 6.0;
        let mut rng = Rng(41);
        for scrape_s in [1, 15] {
            // A/A: 500 rollouts of 30 minutes, equal declines.
            let runs = 500;
            let false_rollbacks = (0..runs)
                .filter(|_| simulate(&mut rng, 1800, scrape_s, 1.0, alpha).is_some())
                .count();
            let rate = false_rollbacks as f64 / runs as f64;
            eprintln!("scrape every {scrape_s}s: A/A false rollbacks {rate:.3} (α {alpha:.4})");
            assert!(rate <= alpha * 1.5, "{rate} over {alpha}");
            // 3× the declines (6 % against 2 %): caught, within about a minute, slower by a scrape interval.
            let mut seconds: Vec<u64> = (0..200)
                .map(|_| simulate(&mut rng, 1800, scrape_s, 3.0, alpha).unwrap_or(u64::MAX))
                .collect();
            seconds.sort_unstable();
            let (median, worst) = (seconds[seconds.len() / 2], seconds[seconds.len() - 1]);
            eprintln!("scrape every {scrape_s}s: 3x declines caught in a median {median}s, at most {worst}s");
            assert!(median <= 20 + 2 * scrape_s, "median {median}s");
            assert!(worst < u64::MAX, "a 3x canary never caught");
        }
    }

    #[test]
    fn increases_are_taken_per_series_from_the_first_answer_resets_and_new_series_included() {
        let mut counters = MetricCounters::default();
        let first = [
            sample("stable_requests", "a", 1000.0),
            sample("stable_events", "a", 30.0),
            sample("canary_requests", "b", 100.0),
            sample("canary_events", "b", 9.0),
        ];
        // The first answer is the starting point.
        assert_eq!(counters.advance(&first, "v1", "v2").tick, None);
        let second = [
            sample("stable_requests", "a", 1100.0),
            sample("stable_events", "a", 33.0),
            // The canary's app restarted: its counters start from zero again.
            sample("canary_requests", "b", 10.0),
            sample("canary_events", "b", 3.0),
            // A second stable instance appeared: all of it is new.
            sample("stable_requests", "c", 5.0),
        ];
        let moved = counters.advance(&second, "v1", "v2");
        assert_eq!(
            moved.tick,
            Some(Tick {
                stable_requests: 105,
                canary_requests: 10,
                stable_bad: 3,
                canary_bad: 3,
            })
        );
        assert!(moved.missing.is_empty());
        // The canary's requests gone from an answer: missing, and nothing invented.
        let third = [sample("stable_requests", "a", 1100.0)];
        let moved = counters.advance(&third, "v1", "v2");
        assert_eq!(moved.tick, None);
        assert_eq!(moved.missing, vec!["v2".to_string()]);
        // Back: differenced against its last value, not counted again.
        let fourth = [
            sample("stable_requests", "a", 1110.0),
            sample("canary_requests", "b", 12.0),
        ];
        assert_eq!(
            counters.advance(&fourth, "v1", "v2").tick,
            Some(Tick {
                stable_requests: 10,
                canary_requests: 2,
                stable_bad: 0,
                canary_bad: 0,
            })
        );
    }
}
