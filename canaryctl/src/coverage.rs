//! Whether a rollout's evidence for one tick is complete: every Envoy of its fleet connected, serving the
//! rollout's last change, and (with the Envoys' own streams) reporting. Plain rules over the fleet's status
//! and the reports' times, so that "no promotion without evidence" is answered by tested code.

use std::collections::BTreeMap;

use canary_router::text::quote;
use serde::{Deserialize, Serialize};

use crate::fleet::{EnvoyStatus, Link};
use crate::rollout::{Rollout, Source};
use crate::state::rfc3339;

/// An Envoy that reports every second and whose last report is older than this missed two: it is silent, and
/// the tick is not complete without it. One that reports less often is silent after two of its intervals.
pub const REPORT_FRESH_S: u64 = 2;

/// The longest interval between two reports that is taken as an Envoy's pace (Envoy's own bound for a load
/// report's interval is a minute).
pub const MAX_REPORT_EVERY_S: u64 = 60;

/// When a node last sent a load report and a stats flush, and how often it sends them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reported {
    /// Unix seconds of its last load report (0: none yet).
    pub load: u64,
    /// Unix seconds of its last stats flush (0: none yet).
    pub stats: u64,
    /// Seconds between its load reports: the interval canaryctl asked of it (the longer of the old and the new
    /// one until a report comes at the new).
    #[serde(default = "one_second")]
    pub load_every: u64,
    /// Seconds between its last two stats flushes (Envoy's `stats_flush_interval`, which canaryctl does not
    /// set, as measured).
    #[serde(default = "one_second")]
    pub stats_every: u64,
}

fn one_second() -> u64 {
    1
}

impl Default for Reported {
    fn default() -> Self {
        Self {
            load: 0,
            stats: 0,
            load_every: 1,
            stats_every: 1,
        }
    }
}

impl Reported {
    /// A stats flush at `now`: the time since the previous one is the Envoy's pace.
    pub fn flushed(&mut self, now: u64) {
        if self.stats != 0 {
            self.stats_every = now.saturating_sub(self.stats).clamp(1, MAX_REPORT_EVERY_S);
        }
        self.stats = now;
    }

    /// Whether a report last sent at `at`, by an Envoy that sends one every `every` seconds, is still current
    /// at `now`.
    fn fresh(at: u64, every: u64, now: u64) -> bool {
        now.saturating_sub(at) <= REPORT_FRESH_S.max(every.saturating_mul(2))
    }

    /// The later of two records of one Envoy (two replicas' shares): each time, and the pace that goes with
    /// the later report.
    pub fn merge(&mut self, other: &Reported) {
        if other.load > self.load {
            (self.load, self.load_every) = (other.load, other.load_every);
        }
        if other.stats > self.stats {
            (self.stats, self.stats_every) = (other.stats, other.stats_every);
        }
    }
}

/// How each node has reported, by node id.
pub type LastReports = BTreeMap<String, Reported>;

/// Whether `envoy` serves this rollout: its cluster is one of the rollout's (any, for a rollout saved before
/// fleets existed).
fn of_fleet(rollout: &Rollout, envoy: &EnvoyStatus) -> bool {
    let clusters = &rollout.plan.fleet_clusters;
    clusters.is_empty() || clusters.contains(&envoy.cluster)
}

/// The Envoys a rollout starting now serves: those of `clusters` (every cluster when empty) that are
/// connected, or reconnecting after a restart of canaryctl. Returns the clusters named (the connected Envoys'
/// own when none was) and the node ids; one line naming the cause when there is no such Envoy.
pub fn fleet_at_start(
    clusters: &[String],
    envoys: &[EnvoyStatus],
) -> Result<(Vec<String>, Vec<String>), String> {
    let up = |e: &&EnvoyStatus| matches!(e.link, Link::Connected | Link::Reconnecting);
    let members: Vec<&EnvoyStatus> = envoys
        .iter()
        .filter(up)
        .filter(|e| clusters.is_empty() || clusters.contains(&e.cluster))
        .collect();
    if members.is_empty() {
        return Err(if clusters.is_empty() {
            "fleet: no Envoy is connected to canaryctl: a rollout's steps would reach no one (connect the Envoys first)"
                .to_string()
        } else {
            let quoted: Vec<String> = clusters.iter().map(|c| quote(c)).collect();
            format!(
                "fleet-cluster: no connected Envoy of {}: a rollout's steps would reach no one",
                quoted.join(", ")
            )
        });
    }
    let mut named: Vec<String> = if clusters.is_empty() {
        members.iter().map(|e| e.cluster.clone()).collect()
    } else {
        clusters.to_vec()
    };
    named.sort();
    named.dedup();
    Ok((named, members.iter().map(|e| e.node_id.clone()).collect()))
}

/// Adds the connected Envoys of the rollout's clusters to its fleet: one that joins mid-rollout serves its
/// config, so its evidence is waited for too.
pub fn join(rollout: &mut Rollout, envoys: &[EnvoyStatus]) {
    for envoy in envoys {
        if envoy.link == Link::Connected
            && of_fleet(rollout, envoy)
            && !rollout.fleet.contains(&envoy.node_id)
        {
            rollout.fleet.insert(envoy.node_id.clone());
        }
    }
}

/// "front-2 (edge)".
fn named(envoy: &EnvoyStatus) -> String {
    format!("{} ({})", quote(&envoy.node_id), envoy.cluster)
}

fn since(unix: u64) -> String {
    if unix == 0 {
        "never".to_string()
    } else {
        format!("none since {}", rfc3339(unix))
    }
}

/// Where one Envoy of the fleet stands against the rollout's last change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// Connected and serving the change.
    Applied,
    /// Connected, not serving it yet (still applying it).
    Behind(String),
    /// Connected, and refused it (a NACK): it keeps serving an older version.
    Refused(String),
    /// Not connected (since when).
    Missing(String),
}

/// One Envoy of the fleet against the rollout's last change (`None`: no status for that node any more).
pub fn standing(rollout: &Rollout, node: &str, envoy: Option<&EnvoyStatus>) -> Standing {
    let Some(envoy) = envoy else {
        return Standing::Missing(format!("{}: not seen any more", quote(node)));
    };
    let applied = match rollout.change_version {
        Some(version) => envoy.acked_version.is_some_and(|v| v >= version),
        None => true,
    };
    if envoy.link != Link::Connected {
        let when = envoy
            .disconnected_since_unix
            .map(rfc3339)
            .unwrap_or_default();
        let what = if applied {
            "applied the rollout's last change"
        } else {
            "has not applied the rollout's last change"
        };
        return Standing::Missing(format!(
            "{}: not connected since {when}; {what}",
            named(envoy)
        ));
    }
    if applied {
        return Standing::Applied;
    }
    let version = rollout.change_version.unwrap_or_default();
    let serving = envoy
        .acked_version
        .map_or("none".to_string(), |v| v.to_string());
    match &envoy.nack {
        Some(nack) if nack.version >= version => Standing::Refused(format!(
            "{}: refused version {} ({}), serves version {serving}",
            named(envoy),
            nack.version,
            nack.message
        )),
        _ => Standing::Behind(format!(
            "{}: has not applied version {version} yet (serves version {serving})",
            named(envoy)
        )),
    }
}

/// What this tick's evidence lacks from the fleet, one line each (empty: complete). An Envoy that is not
/// connected is missing unless the plan allows it; a connected one must serve the rollout's last change and,
/// with the Envoys' own streams as the source, have sent its load report (and its stats, where latency is
/// compared) within [`REPORT_FRESH_S`], or two of its intervals when it reports less often.
pub fn fleet_gaps(
    rollout: &Rollout,
    envoys: &[EnvoyStatus],
    reports: &LastReports,
    now: u64,
) -> Vec<String> {
    let by_node: BTreeMap<&str, &EnvoyStatus> =
        envoys.iter().map(|e| (e.node_id.as_str(), e)).collect();
    let mut gaps = Vec::new();
    let mut connected = 0usize;
    for node in &rollout.fleet {
        let envoy = by_node.get(node.as_str()).copied();
        match standing(rollout, node, envoy) {
            Standing::Missing(line) => {
                if !rollout.plan.allow_missing_envoys {
                    gaps.push(line);
                }
                continue;
            }
            Standing::Behind(line) | Standing::Refused(line) => gaps.push(line),
            Standing::Applied => {}
        }
        connected += 1;
        let Some(envoy) = envoy else { continue };
        if rollout.plan.evidence == Source::Envoy {
            let seen = reports.get(node).copied().unwrap_or_default();
            let (load, stats) = (seen.load, seen.stats);
            if !Reported::fresh(load, seen.load_every, now) {
                gaps.push(format!("{}: no load report, {}", named(envoy), since(load)));
            }
            if rollout.plan.latency && !Reported::fresh(stats, seen.stats_every, now) {
                gaps.push(format!(
                    "{}: no stats flush, {}",
                    named(envoy),
                    since(stats)
                ));
            }
        }
    }
    if connected == 0 {
        gaps.push(if rollout.fleet.is_empty() {
            "no Envoy of the rollout's fleet has connected".to_string()
        } else {
            "no Envoy of the rollout's fleet is connected".to_string()
        });
    }
    gaps
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::fleet::Nack;

    pub(crate) fn envoy(node: &str, cluster: &str, link: Link, acked: Option<u64>) -> EnvoyStatus {
        EnvoyStatus {
            node_id: node.to_string(),
            cluster: cluster.to_string(),
            peer: String::new(),
            link,
            streams: u32::from(link == Link::Connected),
            first_seen_unix: 1,
            last_seen_unix: 100,
            disconnected_since_unix: (link != Link::Connected).then_some(90),
            in_fleet: true,
            sent_version: acked,
            acked_version: acked,
            nack: None,
            certificate: None,
            replica: None,
        }
    }

    /// Reported every second, last at `load` and `stats`.
    fn at(load: u64, stats: u64) -> Reported {
        Reported {
            load,
            stats,
            ..Default::default()
        }
    }

    #[test]
    fn an_envoy_that_reports_less_often_is_silent_after_two_of_its_intervals() {
        let mut r = rollout(Source::Envoy, true);
        r.fleet = ["front-1".to_string()].into();
        let up = [envoy("front-1", "edge", Link::Connected, Some(7))];
        // Asked for a load report every 5 s, flushing its stats every 3 s (as measured between two flushes).
        let mut seen = Reported {
            load_every: 5,
            ..Default::default()
        };
        seen.flushed(193);
        seen.flushed(196);
        assert_eq!(seen.stats_every, 3);
        seen.load = 190;
        let reports = |seen: Reported| LastReports::from([("front-1".to_string(), seen)]);
        assert_eq!(
            fleet_gaps(&r, &up, &reports(seen), 199),
            Vec::<String>::new()
        );
        let gaps = fleet_gaps(&r, &up, &reports(seen), 201);
        assert_eq!(gaps.len(), 1, "{gaps:?}");
        assert!(gaps[0].contains("no load report"), "{gaps:?}");
        assert_eq!(fleet_gaps(&r, &up, &reports(seen), 205).len(), 2);
        // At one second, the rule is two seconds, as it always was.
        assert_eq!(fleet_gaps(&r, &up, &reports(at(197, 198)), 200).len(), 1);
        // A pace is measured between two flushes, within a second and a minute.
        let mut once = Reported::default();
        once.flushed(100);
        assert_eq!(once.stats_every, 1);
        once.flushed(100);
        assert_eq!(once.stats_every, 1);
        once.flushed(100_000);
        assert_eq!(once.stats_every, MAX_REPORT_EVERY_S);
        // Two replicas' records of one Envoy: the later report, with its own pace.
        let mut merged = at(100, 100);
        merged.merge(&Reported {
            load: 104,
            load_every: 5,
            stats: 99,
            stats_every: 7,
        });
        assert_eq!((merged.load, merged.load_every), (104, 5));
        assert_eq!((merged.stats, merged.stats_every), (100, 1));
        // Shares published before the paces existed still read, at one second.
        let old: Reported = serde_json::from_str(r#"{"load":5,"stats":6}"#).unwrap();
        assert_eq!(old, at(5, 6));
    }

    fn rollout(source: Source, latency: bool) -> Rollout {
        let mut plan = crate::rollout::tests::plan("10,100");
        plan.latency = latency;
        plan.evidence = source;
        plan.fleet_clusters = vec!["edge".into()];
        let (mut r, _) = Rollout::start(plan, 50, Default::default()).unwrap();
        r.change_version = Some(7);
        r.change_pending = false;
        r
    }

    #[test]
    fn the_fleet_is_the_connected_envoys_of_the_named_or_seen_clusters_and_none_is_refused() {
        let envoys = [
            envoy("front-1", "edge", Link::Connected, Some(3)),
            envoy("front-2", "edge", Link::Reconnecting, Some(3)),
            envoy("batch-1", "batch", Link::Connected, Some(3)),
            envoy("old-1", "edge", Link::Disconnected, Some(2)),
        ];
        let (clusters, nodes) = fleet_at_start(&[], &envoys).unwrap();
        assert_eq!(clusters, ["batch", "edge"]);
        assert_eq!(nodes, ["front-1", "front-2", "batch-1"]);
        let (clusters, nodes) = fleet_at_start(&["edge".into()], &envoys).unwrap();
        assert_eq!(
            (clusters, nodes),
            (
                vec!["edge".to_string()],
                vec!["front-1".to_string(), "front-2".to_string()]
            )
        );
        assert_eq!(
            fleet_at_start(&["web".into()], &envoys).unwrap_err(),
            r#"fleet-cluster: no connected Envoy of "web": a rollout's steps would reach no one"#
        );
        assert!(fleet_at_start(&[], &envoys[3..])
            .unwrap_err()
            .starts_with("fleet: no Envoy is connected"));

        // One that connects later, of the rollout's clusters, joins; another cluster's does not.
        let mut r = rollout(Source::Envoy, false);
        r.fleet.insert("front-1".into());
        join(&mut r, &envoys);
        assert_eq!(r.fleet.iter().collect::<Vec<_>>(), ["front-1"]);
        join(&mut r, &[envoy("front-9", "edge", Link::Connected, None)]);
        assert!(r.fleet.contains("front-9"));
    }

    #[test]
    fn a_tick_is_complete_only_when_every_envoy_of_the_fleet_is_connected_applied_and_reporting() {
        let mut r = rollout(Source::Envoy, true);
        r.fleet = ["front-1".to_string(), "front-2".to_string()].into();
        let now = 200;
        let fresh: LastReports = [
            ("front-1".to_string(), at(199, 200)),
            ("front-2".to_string(), at(198, 199)),
        ]
        .into();
        let up = [
            envoy("front-1", "edge", Link::Connected, Some(7)),
            envoy("front-2", "edge", Link::Connected, Some(8)),
        ];
        assert_eq!(fleet_gaps(&r, &up, &fresh, now), Vec::<String>::new());

        // Silent streams: each kind named, with since when.
        let mut silent = fresh.clone();
        silent.insert("front-2".into(), at(190, 199));
        assert_eq!(
            fleet_gaps(&r, &up, &silent, now),
            [r#""front-2" (edge): no load report, none since 1970-01-01T00:03:10Z"#]
        );
        silent.remove("front-1");
        let gaps = fleet_gaps(&r, &up, &silent, now);
        assert!(
            gaps.contains(&r#""front-1" (edge): no load report, never"#.to_string()),
            "{gaps:?}"
        );
        assert!(
            gaps.contains(&r#""front-1" (edge): no stats flush, never"#.to_string()),
            "{gaps:?}"
        );
        // Stats are not waited for when latency is not compared; nor any stream with Prometheus's evidence.
        r.plan.latency = false;
        assert_eq!(fleet_gaps(&r, &up, &silent, now).len(), 2);
        r.plan.evidence = Source::Prometheus;
        assert_eq!(
            fleet_gaps(&r, &up, &LastReports::new(), now),
            Vec::<String>::new()
        );

        // Behind the rollout's change, or refusing it.
        let mut behind = up.clone();
        behind[0].acked_version = Some(6);
        assert_eq!(
            fleet_gaps(&r, &behind, &fresh, now),
            [r#""front-1" (edge): has not applied version 7 yet (serves version 6)"#]
        );
        behind[0].nack = Some(Nack {
            version: 7,
            message: "bad".into(),
            at_unix: 199,
        });
        assert_eq!(
            fleet_gaps(&r, &behind, &fresh, now),
            [r#""front-1" (edge): refused version 7 (bad), serves version 6"#]
        );

        // Cut off: missing, unless the plan allows it, and then not while none is connected.
        let mut cut = up.clone();
        cut[1] = envoy("front-2", "edge", Link::Disconnected, Some(6));
        assert_eq!(
            fleet_gaps(&r, &cut, &fresh, now),
            [
                r#""front-2" (edge): not connected since 1970-01-01T00:01:30Z; has not applied the rollout's last change"#
            ]
        );
        assert_eq!(
            fleet_gaps(&r, &cut[..1], &fresh, now),
            [r#""front-2": not seen any more"#]
        );
        r.plan.allow_missing_envoys = true;
        assert_eq!(fleet_gaps(&r, &cut, &fresh, now), Vec::<String>::new());
        cut[0].link = Link::Reconnecting;
        assert_eq!(
            fleet_gaps(&r, &cut, &fresh, now),
            ["no Envoy of the rollout's fleet is connected"]
        );
        r.fleet.clear();
        assert_eq!(
            fleet_gaps(&r, &cut, &fresh, now),
            ["no Envoy of the rollout's fleet has connected"]
        );
    }
}
