//! Names and layout of the filter's counters.
//!
//! One counter per (rollout, version, reason), plus one for requests no rollout matched. The names carry
//! their labels as dot-separated segments; the shipped bootstrap's `stats_tags` turn them into Prometheus
//! labels: `canary_router_requests{rollout="web",version="v2",reason="sticky"}`.
//! Envoy adds the `wasmcustom.` prefix to names defined by a wasm module (dropped in `/stats/prometheus`).

use crate::config::Config;
use crate::decision::{Decision, Reason, NO_MATCH};

/// The metric name every counter shares once its labels are extracted.
pub const REQUESTS: &str = "canary_router_requests";

/// `canary_router_requests.rollout.<rollout>.version.<version>.reason.<reason>`
pub fn request_counter_name(rollout: &str, version: &str, reason: &str) -> String {
    format!("{REQUESTS}.rollout.{rollout}.version.{version}.reason.{reason}")
}

/// The rollout and version of a request counter's name, the inverse of [`request_counter_name`]: after
/// whatever prefix the host adds (`wasmcustom.`, the native module's namespace). Rollout names have no dots;
/// a version may. None for any other name, `no_match` included.
pub fn parse_request_counter_name(name: &str) -> Option<(&str, &str)> {
    let (_, rest) = name.split_once(REQUESTS)?;
    let rest = rest.strip_prefix(".rollout.")?;
    let (rollout, rest) = rest.split_once(".version.")?;
    let (version, _) = rest.rsplit_once(".reason.")?;
    (!rollout.is_empty() && !version.is_empty()).then_some((rollout, version))
}

/// `canary_router_requests.reason.no_match`
pub fn no_match_counter_name() -> String {
    format!("{REQUESTS}.reason.{NO_MATCH}")
}

/// Every counter a configuration needs, in slot order: slot 0 is no-match, then for each rollout, each
/// version, each reason of [`Reason::ALL`].
pub fn counter_names(config: &Config) -> Vec<String> {
    let mut names = vec![no_match_counter_name()];
    for rollout in &config.rollouts {
        for version in &rollout.versions {
            for reason in Reason::ALL {
                names.push(request_counter_name(
                    &rollout.name,
                    version,
                    reason.as_str(),
                ));
            }
        }
    }
    names
}

/// The slot of [`counter_names`] a decision counts in (`None`: no rollout matched → slot 0).
pub fn counter_slot(config: &Config, decision: Option<&Decision>) -> usize {
    let Some(decision) = decision else {
        return 0;
    };
    let before: usize = config
        .rollouts
        .iter()
        .take(decision.rollout)
        .map(|r| r.versions.len())
        .sum();
    1 + (before + decision.version) * Reason::ALL.len() + decision.reason.index()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    #[test]
    fn every_decision_has_its_own_named_slot() {
        let config = parse(
            br#"{"rollouts":[
              {"name":"web","stable":"v1","canaries":[{"version":"v2","percent":5}]},
              {"name":"api","stable":"1.0","canaries":[{"version":"1.1-rc.1","percent":5},{"version":"2","percent":1}]}]}"#,
        )
        .unwrap();
        let names = counter_names(&config);
        assert_eq!(names.len(), 1 + (2 + 3) * 5);
        assert_eq!(names[0], "canary_router_requests.reason.no_match");
        assert_eq!(counter_slot(&config, None), 0);
        for (rollout, r) in config.rollouts.iter().enumerate() {
            for version in 0..r.versions.len() {
                for reason in Reason::ALL {
                    let d = Decision {
                        rollout,
                        version,
                        reason,
                        assigned_key: None,
                    };
                    assert_eq!(
                        names[counter_slot(&config, Some(&d))],
                        request_counter_name(&r.name, &r.versions[version], reason.as_str())
                    );
                }
            }
        }
        assert_eq!(
            names[counter_slot(
                &config,
                Some(&Decision {
                    rollout: 1,
                    version: 1,
                    reason: Reason::Sticky,
                    assigned_key: None,
                })
            )],
            "canary_router_requests.rollout.api.version.1.1-rc.1.reason.sticky"
        );
        // Every name reads back as its rollout and version, with or without the host's prefix.
        for name in &names[1..] {
            for prefixed in [name.clone(), format!("wasmcustom.{name}")] {
                let (rollout, version) = parse_request_counter_name(&prefixed).unwrap();
                assert!(
                    config
                        .rollouts
                        .iter()
                        .any(|r| r.name == rollout && r.versions.iter().any(|v| v == version)),
                    "{prefixed}"
                );
                assert!(prefixed.ends_with(&request_counter_name(
                    rollout,
                    version,
                    prefixed.rsplit('.').next().unwrap()
                )));
            }
        }
        assert_eq!(parse_request_counter_name(&names[0]), None, "no_match");
    }
}
