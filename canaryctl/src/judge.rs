//! The judge: one tick of one rollout, evidence in, verdict out. Plain rules over plain data (no tokio, no
//! store, no Envoy types), so that what a tick decides is tested on the host; the leader's loop
//! (`server/rollout_loop.rs`) gathers the evidence and writes what the judge decides, fenced by its lead.

use std::collections::BTreeMap;

use crate::coverage::LastReports;
use crate::findings::{Events, Signature};
use crate::fleet::EnvoyStatus;
use crate::rollout::{Action, Rollout};
use crate::sources::Inputs;

/// What one tick of a rollout is judged on.
pub struct Round<'a> {
    /// From the rollout's evidence source (`sources.rs`).
    pub inputs: &'a Inputs,
    /// Failures by signature (access logs, application logs), stable's and the canary's.
    pub events: &'a BTreeMap<Signature, Events>,
    /// The fleet as the replicas see it now.
    pub envoys: &'a [EnvoyStatus],
    /// How each Envoy reported (with the Envoys' streams as the source).
    pub reports: &'a LastReports,
    /// The state cannot be saved: the tests run, the steps wait (a restart would forget a step).
    pub steps_wait: bool,
    pub now: u64,
}

/// Judges one tick: the Envoys that joined are added to the fleet, the tick's coverage is noted (a tick
/// with evidence missing passes no step), then each test sees the tick, the first to reach its threshold
/// naming the rollback (availability, errors, latency, error signatures), then the step rules. None: nothing
/// to change.
pub fn judge(rollout: &mut Rollout, round: &Round) -> Option<Action> {
    let (inputs, now) = (round.inputs, round.now);
    crate::coverage::join(rollout, round.envoys);
    let mut missing = inputs.missing.clone();
    missing.extend(crate::coverage::fleet_gaps(
        rollout,
        round.envoys,
        round.reports,
        now,
    ));
    let covered = rollout.observe_coverage(missing, now);
    rollout.note_tick(
        now,
        inputs.tick.as_ref(),
        inputs.latency.as_ref().map(|(s, c)| (s, c)),
        &inputs.availability,
    );
    let action = rollout
        .observe_availability(&inputs.availability, now)
        .or_else(|| rollout.observe_errors(inputs.tick, covered, now))
        .or_else(|| {
            let (stable, canary) = inputs.latency.as_ref()?;
            rollout.observe_latency(stable, canary, now)
        })
        .or_else(|| rollout.observe_metrics(&inputs.metrics, now))
        .or_else(|| rollout.observe_findings(round.events.clone(), inputs.tick, now))
        .or_else(|| {
            if round.steps_wait {
                None
            } else {
                rollout.advance(now)
            }
        });
    rollout.note_chart(now);
    action
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{Histogram, Tick};
    use crate::coverage::tests::envoy;
    use crate::coverage::Reported;
    use crate::fleet::Link;
    use crate::rollout::tests::plan;

    /// Runs `seconds` ticks from `from`, each with `tick` and the Envoy's reports as fresh as `reported`
    /// says; returns the first action and when.
    fn run(
        rollout: &mut Rollout,
        from: u64,
        seconds: u64,
        tick: Tick,
        reported: impl Fn(u64) -> u64,
        steps_wait: bool,
    ) -> Option<(u64, Action)> {
        let envoys = [envoy("front-1", "edge", Link::Connected, None)];
        let events = BTreeMap::new();
        let inputs = Inputs {
            tick: Some(tick),
            ..Inputs::default()
        };
        (from..from + seconds).find_map(|now| {
            let at = reported(now);
            let reports = LastReports::from([(
                "front-1".to_string(),
                Reported {
                    load: at,
                    stats: at,
                    ..Reported::default()
                },
            )]);
            let round = Round {
                inputs: &inputs,
                events: &events,
                envoys: &envoys,
                reports: &reports,
                steps_wait,
                now,
            };
            judge(rollout, &round).map(|action| (now, action))
        })
    }

    fn started() -> Rollout {
        Rollout::start(plan("5,100"), 1_000, Histogram::default())
            .unwrap()
            .0
    }

    const GOOD: Tick = Tick {
        stable_requests: 950,
        canary_requests: 50,
        stable_bad: 10,
        canary_bad: 0,
    };

    #[test]
    fn a_step_passes_on_complete_evidence_only_and_an_envoy_gone_silent_holds_it() {
        // Reports fresh each second: the step (hold 10 s, 100 canary requests) passes, and the Envoy that
        // connected is in the fleet.
        let mut rollout = started();
        let (at, action) = run(&mut rollout, 1_001, 60, GOOD, |now| now, false).unwrap();
        assert!(matches!(action, Action::SetPercent(_)), "{action:?}");
        assert!(at <= 1_012, "{at}");
        assert!(rollout.fleet.contains("front-1"));
        // The same good ticks, the Envoy's last report a minute old: no step passes, whatever the counts.
        let mut rollout = started();
        assert_eq!(run(&mut rollout, 1_001, 120, GOOD, |_| 1_000, false), None);
    }

    #[test]
    fn a_failing_canary_is_rolled_back_even_while_steps_wait() {
        let failing = Tick {
            canary_bad: 25,
            ..GOOD
        };
        let mut rollout = started();
        let (at, action) = run(&mut rollout, 1_001, 60, failing, |now| now, true).unwrap();
        let Action::RollBack(why) = action else {
            panic!("{action:?}")
        };
        assert!(why.contains("error"), "{why}");
        assert!(at <= 1_005, "{at}");
        // While the state cannot be saved, good evidence passes no step.
        let mut rollout = started();
        assert_eq!(run(&mut rollout, 1_001, 60, GOOD, |now| now, true), None);
    }
}
