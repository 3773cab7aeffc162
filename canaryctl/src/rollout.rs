//! Progressive rollouts: a plan of steps, and the rules that move a canary through them by evidence. Plain
//! data and rules, no tokio or gRPC types: the controller feeds ticks and operator commands in, and carries
//! the actions out (set a percentage, promote, roll back) through the same write path as the CLI.
//!
//! - Each step holds its percentage for `hold`. It passes when the hold is over, no rollback fired, and the
//!   canary served at least `min_canary_requests` requests during the step (so the step was tested).
//! - The analysis runs on every tick in every phase until the rollout ends: a paused or inconclusive rollout
//!   is still rolled back when the evidence says so.
//! - A step whose `max_step_time` runs out without enough canary requests is `inconclusive`: it holds there,
//!   paused, and says so; `resume` waits another `max_step_time`.
//! - A `pause` step is a manual gate: the rollout holds at the previous percentage until `resume`.
//! - The last step passing promotes the canary (it becomes stable at 100 %).
//! - Load reports that may hold traffic from before the start (the first [`WARM_UP_S`] seconds) are not
//!   counted: they could charge a previous build's errors to this one. Latency is not judged in the first
//!   [`WARM_UP_S`] seconds of each step either: the canary's share just moved and Envoy opens connections.

use std::fmt;
use std::str::FromStr;

use canary_router::percent::Percent;
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::analysis::{Evidence, Histogram, Tick};
use crate::availability::{Availability, Verdict, Watch};
use crate::findings::{arrival_alpha, Events, Findings, Signature};

/// One step of a plan: a percentage for the canary, or a manual gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Step {
    Percent(Percent),
    Pause,
}

impl FromStr for Step {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("pause") {
            return Ok(Step::Pause);
        }
        match Percent::from_text(text) {
            Some(p) if p.basis_points() > 0 => Ok(Step::Percent(p)),
            _ => Err(format!(
                "{}: a step is a percentage in (0, 100] with at most two decimals, or \"pause\"",
                canary_router::text::quote(text)
            )),
        }
    }
}

impl TryFrom<String> for Step {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<Step> for String {
    fn from(step: Step) -> String {
        step.to_string()
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Percent(p) => write!(f, "{p}"),
            Step::Pause => f.write_str("pause"),
        }
    }
}

/// What an operator asked for with `rollout start`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub rollout: String,
    pub canary: String,
    /// Stable when the rollout started.
    pub stable: String,
    /// Envoy's upstream clusters of each version, as named in the load reports.
    pub stable_cluster: String,
    pub canary_cluster: String,
    pub steps: Vec<Step>,
    pub hold_s: u64,
    pub max_step_s: u64,
    /// The false-rollback budget α: a canary no worse than stable is rolled back with chance at most α.
    pub alpha: f64,
    pub min_canary_requests: u64,
    /// The cluster the canary's route names, where Envoy charges its latency (the aggregate it falls back
    /// through); the canary's own cluster when unset.
    #[serde(default)]
    pub canary_route_cluster: Option<String>,
    /// Latency is compared too: the Envoys were streaming their stats when the rollout started.
    #[serde(default)]
    pub latency: bool,
    /// How many times stable's share of slow requests the canary may have before latency rolls it back.
    #[serde(default = "default_latency_tolerance")]
    pub latency_tolerance: f64,
    /// Where the evidence comes from.
    #[serde(default)]
    pub evidence: Source,
    /// With Prometheus: label matchers that pick this fleet's series (`job="envoy"`); empty: every series.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prometheus_selector: String,
    /// A `new` or `worse` error signature rolls the canary back (findings are collected either way). False in
    /// state files from before findings existed.
    #[serde(default)]
    pub findings: bool,
    /// The Envoy clusters (node clusters) whose Envoys serve this rollout's config: its fleet. Set at the start
    /// from the connected Envoys unless named; empty in state files from before fleets existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fleet_clusters: Vec<String>,
    /// Steps may pass while Envoys of the fleet are disconnected (`--allow-missing-envoys`); they are still
    /// named. Evidence from the connected ones must still be complete.
    #[serde(default)]
    pub allow_missing_envoys: bool,
    /// The application's own count metrics, from Prometheus (`--metric`): each a test of its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<crate::user_metrics::MetricPlan>,
}

/// Where a rollout's evidence comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The Envoys' own streams to canaryctl: load reports (errors) and stats (latency).
    #[default]
    Envoy,
    /// A Prometheus server scraping the Envoys' /stats/prometheus (`serve --prometheus-url`).
    Prometheus,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Envoy => "envoy",
            Source::Prometheus => "prometheus",
        }
    }
}

impl FromStr for Source {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "envoy" => Ok(Source::Envoy),
            "prometheus" => Ok(Source::Prometheus),
            _ => Err(format!(
                "evidence: {}: \"envoy\" (the Envoys stream to canaryctl) or \"prometheus\"",
                canary_router::text::quote(text)
            )),
        }
    }
}

pub fn default_latency_tolerance() -> f64 {
    1.5
}

/// The smallest false-rollback budget: below it, the thresholds (1/α per test, and that times the signatures
/// for each error signature) are beyond any evidence a rollout can gather.
pub const MIN_ALPHA: f64 = 1e-6;

/// Stable's latency quantiles whose bucket bounds the latency checks use: "slower than b" for each.
pub const LATENCY_QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];
/// Stable requests needed to choose the latency bounds.
pub const LATENCY_BASELINE: u64 = 500;
/// Canary requests of each step whose latency is not judged (the ticks that bring them): new connections.
pub const LATENCY_WARM_UP_REQUESTS: u64 = 100;
/// Bounds below this (µs) are raised to it: under a millisecond, a fresh connection's setup, not the
/// version, decides which requests are "slow".
pub const LATENCY_FLOOR_US: u64 = 1000;

impl Plan {
    /// How many tests share the false-rollback budget: errors, each latency check, the findings, each of the
    /// application's metrics.
    pub fn tests(&self) -> usize {
        1 + if self.latency {
            LATENCY_QUANTILES.len()
        } else {
            0
        } + usize::from(self.findings)
            + self.metrics.len()
    }

    /// The α of each test: the budget split evenly over the tests.
    pub fn test_alpha(&self) -> f64 {
        self.alpha / self.tests() as f64
    }

    /// The findings' share of the budget (what it would be, when findings do not roll back), spent over the
    /// signatures in their order of arrival.
    pub fn findings_alpha(&self) -> f64 {
        self.alpha / (self.tests() + usize::from(!self.findings)) as f64
    }

    /// Where the canary's latency is read.
    pub fn canary_latency_cluster(&self) -> &str {
        self.canary_route_cluster
            .as_deref()
            .unwrap_or(&self.canary_cluster)
    }

    /// Checks what the config cannot: the steps, the times and the budget. One line naming the field.
    pub fn check(&self) -> Result<(), String> {
        let mut last = 0u32;
        for (i, step) in self.steps.iter().enumerate() {
            if let Step::Percent(p) = step {
                if p.basis_points() <= last {
                    return Err(format!(
                        "steps: {} after {}: percentages must go up",
                        p,
                        canary_router::percent::decimal(last)
                    ));
                }
                last = p.basis_points();
            } else if i == 0 {
                return Err("steps: the first step must be a percentage".to_string());
            } else if self.steps.get(i - 1) == Some(&Step::Pause) {
                return Err("steps: two pauses in a row".to_string());
            }
        }
        if last == 0 {
            return Err("steps: give at least one percentage".to_string());
        }
        if self.hold_s == 0 {
            return Err("hold: must be at least 1s".to_string());
        }
        if self.min_canary_requests == 0 {
            return Err(
                "min-canary-requests: 0: a step needs at least 1 canary request to be judged (200 by default)"
                    .to_string(),
            );
        }
        if self.max_step_s < self.hold_s {
            return Err(format!(
                "max-step-time: {}s is shorter than the hold ({}s)",
                self.max_step_s, self.hold_s
            ));
        }
        if !(self.latency_tolerance >= 1.0 && self.latency_tolerance.is_finite()) {
            return Err(format!(
                "latency-tolerance: {} must be at least 1 (1.5: the canary may have 1.5× stable's share of slow requests)",
                self.latency_tolerance
            ));
        }
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return Err(format!(
                "false-rollback-budget: {} must be between 0 and 1 (e.g. 0.05)",
                self.alpha
            ));
        }
        if self.alpha < MIN_ALPHA {
            // Each error signature's threshold is 1/α times the tests and the signatures: far beyond any
            // evidence a rollout gathers, so such a budget could never roll back.
            return Err(format!(
                "false-rollback-budget: {:e} is below {MIN_ALPHA}: its thresholds ({:.1e} for the first error \
                 signature, more for later ones) could never be reached, so nothing would ever roll back",
                self.alpha,
                1.0 / arrival_alpha(self.findings_alpha(), 1)
            ));
        }
        if self.evidence == Source::Prometheus {
            crate::prometheus::check_selector(&self.prometheus_selector)?;
        } else if !self.prometheus_selector.is_empty() {
            return Err("prometheus-selector: only with evidence from Prometheus".to_string());
        }
        if self.metrics.len() > crate::user_metrics::MAX_METRICS {
            return Err(format!(
                "metric: {} metrics, at most {}",
                self.metrics.len(),
                crate::user_metrics::MAX_METRICS
            ));
        }
        for (i, metric) in self.metrics.iter().enumerate() {
            metric.check()?;
            if self.metrics.iter().take(i).any(|m| m.name == metric.name) {
                return Err(format!("metric {}: named twice", metric.name));
            }
        }
        if self.stable_cluster == self.canary_cluster {
            return Err(format!(
                "canary-cluster: {} is also the stable cluster",
                canary_router::text::quote(&self.canary_cluster)
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Progressing,
    Paused,
    /// A step's time ran out without enough canary traffic to judge it: held there, paused.
    Inconclusive,
    Promoted,
    RolledBack,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Progressing,
        Phase::Paused,
        Phase::Inconclusive,
        Phase::Promoted,
        Phase::RolledBack,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Phase::Progressing => "progressing",
            Phase::Paused => "paused",
            Phase::Inconclusive => "inconclusive",
            Phase::Promoted => "promoted",
            Phase::RolledBack => "rolled_back",
        }
    }

    pub fn finished(self) -> bool {
        matches!(self, Phase::Promoted | Phase::RolledBack)
    }
}

/// What the controller must do to the desired config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    SetPercent(Percent),
    Promote,
    /// The canary to 0 %, and why (one line).
    RollBack(String),
}

/// The evidence as a person reads it: 72.1, or 3.4e12 when it is far past any threshold.
pub fn evidence_text(value: f64) -> String {
    if value < 1e5 {
        format!("{value:.1}")
    } else {
        format!("{value:.1e}")
    }
}

/// One latency check: requests slower than `bound_us`, canary against stable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyCheck {
    pub bound_us: u64,
    pub evidence: Evidence,
}

/// "5 ms", "250 µs", "1.5 s".
pub fn duration_text(us: u64) -> String {
    match us {
        0..=999 => format!("{us} µs"),
        1000..=999_999 => format!("{} ms", us as f64 / 1000.0),
        _ => format!("{} s", us as f64 / 1e6),
    }
}

/// One line of a rollout's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub at_unix: u64,
    pub what: String,
}

/// A rollout in progress (or finished): its plan, where it is, and its evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub plan: Plan,
    pub phase: Phase,
    /// Index into the plan's steps.
    pub step: usize,
    pub step_started_unix: u64,
    pub step_canary_requests: u64,
    /// Errors (5xx, resets, connect failures, timeouts: Envoy's per-host rq_error), over the whole rollout.
    pub errors: Evidence,
    pub started_unix: u64,
    /// Ticks before this time are not counted (see [`WARM_UP_S`]).
    pub counted_from_unix: u64,
    pub finished_unix: Option<u64>,
    /// Why it is paused, inconclusive, rolled back or promoted.
    pub reason: Option<String>,
    pub history: Vec<Event>,
    /// The latency checks, once their bounds are chosen from stable's distribution.
    #[serde(default)]
    pub latency: Vec<LatencyCheck>,
    /// Stable's latency until the bounds are chosen (from before the start, then from the rollout).
    #[serde(default)]
    pub latency_baseline: Histogram,
    /// Failures by signature, canary against stable.
    #[serde(default)]
    pub findings: Findings,
    /// Canary requests of this step seen by the latency checks' warm-up (see [`LATENCY_WARM_UP_REQUESTS`]).
    #[serde(default)]
    pub step_latency_requests: u64,
    /// Whether the canary is up at all (its hosts' health, and whether they get what the filter sends them).
    #[serde(default)]
    pub availability: Watch,
    /// What the last [`RECENT_TICKS`] ticks brought, as the tests saw it (for `rollout status --json`).
    #[serde(default)]
    pub recent: std::collections::VecDeque<TickSeen>,
    /// The Envoys (node ids) of its fleet: those of its clusters connected at the start, and any that joined.
    #[serde(default)]
    pub fleet: std::collections::BTreeSet<String>,
    /// The desired version that carries the rollout's last change (a step, a rollback, a promotion): an
    /// Envoy that has not applied it is not serving what the rollout decided.
    #[serde(default)]
    pub change_version: Option<u64>,
    /// A change was made and its version is not known yet (set by [`carry_out`]'s caller when it is saved).
    #[serde(default)]
    pub change_pending: bool,
    /// Seconds of this step whose evidence was complete (see [`Rollout::observe_coverage`]).
    #[serde(default)]
    pub step_covered_s: u64,
    /// While the evidence is incomplete: since when, and what is missing.
    #[serde(default)]
    pub gap: Option<Gap>,
    /// When the last tick after the warm-up was observed.
    #[serde(default)]
    pub last_tick_unix: u64,
    /// The evidence of each of the plan's own metrics (`--metric`), in the plan's order.
    #[serde(default)]
    pub metrics: Vec<Evidence>,
    /// Its totals over time, for the rollout page's charts (see [`ChartPoint`]).
    #[serde(default)]
    pub chart: Vec<ChartPoint>,
    /// How many changes it has made that people are told of (started, a step passed, paused…): the
    /// sequence number of its last notification, so a receiver can tell a repeat from a new one.
    #[serde(default)]
    pub notices: u64,
}

/// Evidence that is missing: since when, and what (one line each: a silent source, a silent Envoy, an Envoy
/// that has not applied the rollout's change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gap {
    pub since_unix: u64,
    pub missing: Vec<String>,
}

/// A step passes on at least this many seconds of complete evidence, whatever its hold: never on one tick.
pub const MIN_COVERED_S: u64 = 2;

/// How many ticks a rollout shows.
pub const RECENT_TICKS: usize = 30;

/// One tick's inputs as the rollout saw them: requests per version from the load reports (errors test) and
/// from the latency histograms, and the canary's hosts. Lets an operator check the sources agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TickSeen {
    pub at_unix: u64,
    /// (stable, canary) requests in the errors test's tick; None: no report.
    pub requests: Option<(u64, u64)>,
    /// (stable, canary) requests in the latency histograms; None: none arrived.
    pub latency_requests: Option<(u64, u64)>,
    /// Requests the filter sent to the canary, and its hosts got.
    pub routed: Option<u64>,
    pub served: Option<u64>,
    /// Envoys that see a healthy canary host, of those that report its hosts.
    pub canary_up_on: (usize, usize),
}

/// One point of a rollout's charts: what its tests had counted by then, and where it stood. Totals, not
/// rates: a chart's rate is the difference of two points, so dropping points (to keep [`CHART_POINTS`])
/// loses resolution, never a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChartPoint {
    pub at_unix: u64,
    /// The canary's percentage then.
    pub percent: Percent,
    /// The errors test's totals: stable's requests and errors, the canary's requests and errors.
    pub errors: [u64; 4],
    /// Each latency check's totals (stable's requests and slow ones, the canary's), in the checks' order.
    pub latency: Vec<[u64; 4]>,
    /// Each test's evidence over its threshold (errors, each latency check, then the strongest error
    /// signature): 1 rolls back. Always finite (the state is JSON).
    pub evidence: Vec<f64>,
}

/// A rollout keeps at most this many chart points: one a second, then fewer as it runs longer (half of
/// them are dropped when it is full, and the pace halves), so an hour's rollout has a point every 15 s.
pub const CHART_POINTS: usize = 480;

/// The history keeps this many lines (the oldest go first).
const HISTORY: usize = 50;

/// Seconds after the start whose reports are not counted: an Envoy reports every second and canaryctl looks
/// every second (measured: a burst is counted 1.6 s after it ends), so a report that arrives in them may cover
/// traffic from before the rollout. Times are whole seconds, so the warm-up lasts 2 to 3 s.
pub const WARM_UP_S: u64 = 3;

impl Rollout {
    /// A new rollout at its first step; the action sets that step's percentage. `baseline`: stable's latency
    /// before the start (the bounds are chosen from it when it holds enough requests).
    pub fn start(plan: Plan, now: u64, baseline: Histogram) -> Result<(Self, Action), String> {
        plan.check()?;
        let Some(Step::Percent(first)) = plan.steps.first().copied() else {
            return Err("steps: the first step must be a percentage".to_string());
        };
        let plan_metrics = plan.metrics.len();
        let mut rollout = Self {
            plan,
            phase: Phase::Progressing,
            step: 0,
            step_started_unix: now,
            step_canary_requests: 0,
            errors: Evidence::default(),
            started_unix: now,
            counted_from_unix: now + WARM_UP_S,
            finished_unix: None,
            reason: None,
            history: Vec::new(),
            latency: Vec::new(),
            latency_baseline: Histogram::default(),
            findings: Findings::default(),
            step_latency_requests: 0,
            availability: Watch::default(),
            recent: std::collections::VecDeque::new(),
            fleet: std::collections::BTreeSet::new(),
            change_version: None,
            change_pending: true,
            step_covered_s: 0,
            gap: None,
            last_tick_unix: 0,
            notices: 0,
            metrics: vec![Evidence::default(); plan_metrics],
            chart: Vec::new(),
        };
        rollout.record(now, format!("started at {}", rollout.step_name()));
        if rollout.plan.latency {
            rollout.learn_latency_bounds(&baseline, now);
        }
        Ok((rollout, Action::SetPercent(first)))
    }

    fn record(&mut self, now: u64, what: String) {
        if self.history.len() >= HISTORY {
            self.history.remove(0);
        }
        self.history.push(Event { at_unix: now, what });
    }

    /// The canary's percentage at the current step (a gate holds the previous one).
    pub fn percent(&self) -> Percent {
        self.percent_at(self.step)
    }

    /// The canary's percentage at step `step` (an index into the plan's steps; a gate holds the previous one).
    pub fn percent_at(&self, step: usize) -> Percent {
        self.plan
            .steps
            .iter()
            .take(step + 1)
            .rev()
            .find_map(|s| match s {
                Step::Percent(p) => Some(*p),
                Step::Pause => None,
            })
            .unwrap_or_default()
    }

    /// "step 2/5 (5%)".
    pub fn step_name(&self) -> String {
        self.name_of_step(self.step)
    }

    /// "step 2/5 (5%)" for step `step` (an index into the plan's steps).
    pub fn name_of_step(&self, step: usize) -> String {
        let name = match self.plan.steps.get(step) {
            Some(Step::Pause) => "pause".to_string(),
            _ => format!("{}%", self.percent_at(step)),
        };
        format!("step {}/{} ({name})", step + 1, self.plan.steps.len())
    }

    /// One analysis tick (the load reports since the previous one, none when nothing arrived) at `now`: the
    /// error test, then the step rules (the controller runs the other tests in between).
    #[cfg(test)]
    pub fn tick(&mut self, tick: Option<Tick>, now: u64) -> Option<Action> {
        // The controller ticks every second: the seconds skipped here had complete evidence and no traffic.
        for quiet in self.last_tick_unix.saturating_add(1).max(self.started_unix)..now {
            self.observe_coverage(Vec::new(), quiet);
        }
        let covered = self.observe_coverage(Vec::new(), now);
        self.observe_errors(tick, covered, now)
            .or_else(|| self.advance(now))
    }

    /// Whether this tick's evidence is complete (`missing` is empty: every source answered, every Envoy of the
    /// fleet reported and applied the rollout's change). Only complete ticks count toward a step's hold and its
    /// canary requests; an incomplete one is kept as a gap the status names, with when it began.
    pub fn observe_coverage(&mut self, missing: Vec<String>, now: u64) -> bool {
        if self.phase.finished() || now < self.counted_from_unix {
            return false;
        }
        self.last_tick_unix = now;
        if missing.is_empty() {
            if let Some(gap) = self.gap.take() {
                self.record(
                    now,
                    format!(
                        "evidence complete again after {}s",
                        now.saturating_sub(gap.since_unix)
                    ),
                );
            }
            self.step_covered_s += 1;
            return true;
        }
        match &mut self.gap {
            Some(gap) => gap.missing = missing,
            None => {
                self.record(now, format!("waiting for evidence: {}", missing.join("; ")));
                self.gap = Some(Gap {
                    since_unix: now,
                    missing,
                });
            }
        }
        false
    }

    /// The error test on one tick (after the warm-up); rolls back when its evidence reaches the threshold.
    /// Every tick's errors count (a part of the fleet is still a sample of the canary); its requests count
    /// toward the step only when the tick's evidence was complete (`covered`).
    pub fn observe_errors(
        &mut self,
        tick: Option<Tick>,
        covered: bool,
        now: u64,
    ) -> Option<Action> {
        if self.phase.finished() {
            return None;
        }
        let tick = tick.filter(|_| now >= self.counted_from_unix)?;
        self.errors.observe(tick);
        if covered {
            self.step_canary_requests = self
                .step_canary_requests
                .saturating_add(tick.canary_requests);
        }
        if self.errors.rejects(self.plan.test_alpha()) {
            let why = self.naming_health(self.rollback_reason());
            return Some(self.finish_rolled_back(now, why));
        }
        None
    }

    /// Each of the application's metrics sees what it moved this tick (`ticks`, in the plan's order; None:
    /// nothing moved or no answer). Rolls back when one's evidence reaches its threshold.
    pub fn observe_metrics(&mut self, ticks: &[Option<Tick>], now: u64) -> Option<Action> {
        if self.phase.finished() || now < self.counted_from_unix {
            return None;
        }
        let alpha = self.plan.test_alpha();
        let mut rejected = None;
        for (i, tick) in ticks.iter().enumerate() {
            let (Some(tick), Some(evidence)) = (tick, self.metrics.get_mut(i)) else {
                continue;
            };
            evidence.observe(*tick);
            if rejected.is_none() && evidence.rejects(alpha) {
                rejected = Some(i);
            }
        }
        let i = rejected?;
        let (Some(metric), Some(e)) = (self.plan.metrics.get(i), self.metrics.get(i)) else {
            return None;
        };
        let why = self.versus_line(&format!("metric {}:", metric.name), e, "events per request");
        Some(self.finish_rolled_back(now, why))
    }

    /// A test's rollback line, led by the canary's health when its hosts are down: the errors of a canary that
    /// died are the symptom, its health is the cause an operator looks for first.
    fn naming_health(&self, why: String) -> String {
        match &self.availability.why {
            Some(down) => format!("{down}; {why}"),
            None => why,
        }
    }

    /// The step rules at `now`: a gate pauses, a step whose hold is over and was tested passes, a step out of
    /// time is inconclusive.
    pub fn advance(&mut self, now: u64) -> Option<Action> {
        if self.phase != Phase::Progressing {
            return None;
        }
        match self.plan.steps.get(self.step) {
            Some(Step::Pause) => {
                self.phase = Phase::Paused;
                self.reason = Some(format!(
                    "{}: a manual gate; `canaryctl rollout resume {}` goes on",
                    self.step_name(),
                    self.plan.rollout
                ));
                self.record(now, format!("paused at the gate of {}", self.step_name()));
                None
            }
            Some(Step::Percent(_)) => {
                let elapsed = now.saturating_sub(self.step_started_unix);
                // The hold and the requests count complete evidence only, and never while the canary is down
                // anywhere: the requests it served before do not pass a step.
                if self.gap.is_none()
                    && self.step_covered_s >= self.plan.hold_s.max(MIN_COVERED_S)
                    && self.step_canary_requests >= self.plan.min_canary_requests.max(1)
                    && !self.availability.holding()
                {
                    self.record(
                        now,
                        format!(
                            "{} passed: {} canary requests in {}s of complete evidence ({}s in all), evidence {:.2}",
                            self.step_name(),
                            self.step_canary_requests,
                            self.step_covered_s,
                            elapsed,
                            self.errors.e_value()
                        ),
                    );
                    return Some(self.next_step(now));
                }
                if elapsed >= self.plan.max_step_s {
                    self.phase = Phase::Inconclusive;
                    let lacking = match &self.gap {
                        Some(gap) => format!(
                            "evidence missing since {} ({})",
                            crate::state::rfc3339(gap.since_unix),
                            gap.missing.join("; ")
                        ),
                        None if self.step_covered_s < self.plan.hold_s.max(MIN_COVERED_S) => {
                            format!(
                                "complete evidence for {}s of the {}s hold",
                                self.step_covered_s, self.plan.hold_s
                            )
                        }
                        None => format!(
                            "needs {} canary requests to judge",
                            self.plan.min_canary_requests
                        ),
                    };
                    let why = format!(
                        "{}: {} canary requests in {}s, {lacking}: held here, never promoted without it; `rollout resume` waits longer, `rollout promote` or `rollout abort` decides",
                        self.step_name(),
                        self.step_canary_requests,
                        elapsed,
                    );
                    self.record(now, format!("inconclusive: {why}"));
                    self.reason = Some(why);
                }
                None
            }
            None => None,
        }
    }

    /// Moves past the current step: the next percentage, a gate, or the promotion after the last.
    /// The current step's clock and counts start from zero at `now`.
    fn start_step_over(&mut self, now: u64) {
        self.step_started_unix = now;
        self.step_canary_requests = 0;
        self.step_latency_requests = 0;
        self.step_covered_s = 0;
    }

    fn next_step(&mut self, now: u64) -> Action {
        self.change_pending = true;
        self.step += 1;
        self.start_step_over(now);
        match self.plan.steps.get(self.step).copied() {
            None => {
                self.step = self.plan.steps.len() - 1;
                self.finish_promoted(now, "every step passed".to_string())
            }
            Some(Step::Pause) => {
                self.phase = Phase::Paused;
                self.reason = Some(format!(
                    "{}: a manual gate; `canaryctl rollout resume {}` goes on",
                    self.step_name(),
                    self.plan.rollout
                ));
                self.record(now, format!("paused at the gate of {}", self.step_name()));
                Action::SetPercent(self.percent())
            }
            Some(Step::Percent(p)) => {
                self.record(now, format!("{} begins", self.step_name()));
                Action::SetPercent(p)
            }
        }
    }

    fn finish_promoted(&mut self, now: u64, why: String) -> Action {
        self.change_pending = true;
        self.gap = None;
        self.phase = Phase::Promoted;
        self.finished_unix = Some(now);
        self.record(now, format!("promoted: {why}"));
        self.reason = Some(why);
        Action::Promote
    }

    fn finish_rolled_back(&mut self, now: u64, why: String) -> Action {
        self.change_pending = true;
        self.gap = None;
        self.phase = Phase::RolledBack;
        self.finished_unix = Some(now);
        self.record(now, format!("rolled back: {why}"));
        self.reason = Some(why.clone());
        Action::RollBack(why)
    }

    /// Stable's latency goes into the baseline until it holds enough requests; then the bounds are chosen.
    fn learn_latency_bounds(&mut self, stable: &Histogram, now: u64) {
        self.latency_baseline.add(stable);
        if self.latency_baseline.count < LATENCY_BASELINE {
            return;
        }
        let floor = self
            .latency_baseline
            .at_most
            .keys()
            .copied()
            .find(|b| *b >= LATENCY_FLOOR_US);
        let mut bounds: Vec<u64> = LATENCY_QUANTILES
            .iter()
            .filter_map(|q| self.latency_baseline.quantile_bound(*q))
            .map(|b| floor.map_or(b, |f| b.max(f)))
            .collect();
        bounds.dedup();
        self.latency = bounds
            .iter()
            .map(|b| LatencyCheck {
                bound_us: *b,
                evidence: Evidence::with_tolerance(self.plan.latency_tolerance),
            })
            .collect();
        let names: Vec<String> = bounds.iter().map(|b| duration_text(*b)).collect();
        self.record(
            now,
            format!(
                "latency checks: slower than {} (stable's p50, p90, p99 over {} requests, as Envoy's buckets)",
                names.join(", "),
                self.latency_baseline.count
            ),
        );
    }

    /// Latency since the previous report: stable's (its route's cluster) and the canary's (its route's
    /// cluster). Rolls back when a check's evidence reaches its threshold.
    pub fn observe_latency(
        &mut self,
        stable: &Histogram,
        canary: &Histogram,
        now: u64,
    ) -> Option<Action> {
        // Not in a step's first seconds, nor on its first canary requests: the canary's share just moved, Envoy
        // is opening connections to it (a canary that was unhealthy, or just deployed, gets its first requests
        // only later), and the first requests on a new connection are slower whatever the version.
        let warming = now < self.counted_from_unix || now < self.step_started_unix + WARM_UP_S;
        if self.phase.finished() || !self.plan.latency || warming {
            return None;
        }
        if self.latency.is_empty() {
            self.learn_latency_bounds(stable, now);
            return None;
        }
        if self.step_latency_requests < LATENCY_WARM_UP_REQUESTS {
            self.step_latency_requests = self.step_latency_requests.saturating_add(canary.count);
            return None;
        }
        for check in &mut self.latency {
            check.evidence.observe(Tick {
                stable_requests: stable.count,
                canary_requests: canary.count,
                stable_bad: stable.slower_than(check.bound_us),
                canary_bad: canary.slower_than(check.bound_us),
            });
        }
        let alpha = self.plan.test_alpha();
        let worst = self
            .latency
            .iter()
            .filter(|c| c.evidence.rejects(alpha))
            .max_by(|a, b| {
                a.evidence
                    .log_e_value()
                    .total_cmp(&b.evidence.log_e_value())
            })?;
        let e = &worst.evidence;
        let (canary_rate, stable_rate) = e.rates();
        let why = format!(
            "latency: {:.1}% of {} requests slower than {} vs {:.1}% of {} ({}/{} vs {}/{}), more than {}× stable's: evidence {} ≥ {:.0} ({}) at {}",
            canary_rate * 100.0,
            self.plan.canary,
            duration_text(worst.bound_us),
            stable_rate * 100.0,
            self.plan.stable,
            e.canary_bad,
            e.canary_requests,
            e.stable_bad,
            e.stable_requests,
            self.plan.latency_tolerance,
            evidence_text(e.e_value()),
            1.0 / alpha,
            self.alpha_text(),
            self.step_name()
        );
        let why = self.naming_health(why);
        Some(self.finish_rolled_back(now, why))
    }

    /// Whether the canary is up, on one tick: down everywhere for [`crate::availability::DOWN_FOR_S`] rolls
    /// back; down anywhere holds the step; back up after being down starts the step over, so it is judged on
    /// the canary that is up now, not on what it served before it went down.
    pub fn observe_availability(&mut self, a: &Availability, now: u64) -> Option<Action> {
        if self.phase.finished() || now < self.counted_from_unix {
            return None;
        }
        let was_holding = self.availability.holding();
        match self.availability.observe(a, &self.plan.canary, now) {
            Verdict::Up => {
                if was_holding {
                    self.start_step_over(now);
                    self.record(
                        now,
                        format!("canary up again: {} starts over", self.step_name()),
                    );
                }
                None
            }
            Verdict::Held(why) => {
                if !was_holding {
                    self.record(now, format!("held: {why}"));
                }
                None
            }
            Verdict::Down(why) => {
                let why = format!("{why} at {}", self.step_name());
                Some(self.finish_rolled_back(now, why))
            }
        }
    }

    /// Adds a point to the charts at `now` (at most one every `elapsed / (CHART_POINTS / 2)` seconds).
    pub fn note_chart(&mut self, now: u64) {
        let every = (now.saturating_sub(self.started_unix) / (CHART_POINTS as u64 / 2)).max(1);
        if self
            .chart
            .last()
            .is_some_and(|last| now < last.at_unix.saturating_add(every))
        {
            return;
        }
        if self.chart.len() >= CHART_POINTS {
            // Every other point goes; the first stays (the start).
            let mut index = 0;
            self.chart.retain(|_| {
                index += 1;
                index % 2 == 1
            });
        }
        let totals = |e: &crate::analysis::Evidence| {
            [
                e.stable_requests,
                e.stable_bad,
                e.canary_requests,
                e.canary_bad,
            ]
        };
        // Three significant digits: a chart needs no more, and the state stays small (it is saved each tick).
        let over = |e: f64, threshold: f64| {
            let ratio = e / threshold;
            if ratio.is_nan() {
                0.0
            } else {
                let ratio = ratio.clamp(0.0, 1e300);
                format!("{ratio:.2e}").parse().unwrap_or(ratio)
            }
        };
        let test_threshold = 1.0 / self.plan.test_alpha();
        let mut evidence = vec![over(self.errors.e_value(), test_threshold)];
        evidence.extend(
            self.latency
                .iter()
                .map(|c| over(c.evidence.e_value(), test_threshold)),
        );
        evidence.extend(
            self.metrics
                .iter()
                .map(|m| over(m.e_value(), test_threshold)),
        );
        let alpha = self.plan.findings_alpha();
        let strongest = self
            .findings
            .signatures
            .iter()
            .filter(|f| f.canary > 0)
            .map(|f| over(f.evidence.e_value(), 1.0 / f.alpha(alpha)))
            .fold(0.0, f64::max);
        evidence.push(strongest);
        self.chart.push(ChartPoint {
            at_unix: now,
            percent: self.percent(),
            errors: totals(&self.errors),
            latency: self.latency.iter().map(|c| totals(&c.evidence)).collect(),
            evidence,
        });
    }

    /// Keeps what one tick brought (the last [`RECENT_TICKS`]).
    pub fn note_tick(
        &mut self,
        now: u64,
        tick: Option<&Tick>,
        latency: Option<(&Histogram, &Histogram)>,
        a: &Availability,
    ) {
        if self.phase.finished() {
            return;
        }
        if self.recent.len() >= RECENT_TICKS {
            self.recent.pop_front();
        }
        self.recent.push_back(TickSeen {
            at_unix: now,
            requests: tick.map(|t| (t.stable_requests, t.canary_requests)),
            latency_requests: latency.map(|(s, c)| (s.count, c.count)),
            routed: a.routed,
            served: a.served,
            canary_up_on: a.canary_up_on(),
        });
    }

    /// "1/α, α = 0.05", or with more tests "1/α, α = 0.01: 0.05 over 5 tests".
    fn alpha_text(&self) -> String {
        if self.plan.tests() > 1 {
            format!(
                "1/α, α = {}: {} over {} tests",
                self.plan.test_alpha(),
                self.plan.alpha,
                self.plan.tests()
            )
        } else {
            format!("1/α, α = {}", self.plan.alpha)
        }
    }

    /// Failures grouped by signature since the previous tick, with that tick's requests. Rolls back when a
    /// `new` or `worse` signature's evidence reaches its threshold (if the plan says findings roll back).
    pub fn observe_findings(
        &mut self,
        events: BTreeMap<Signature, Events>,
        tick: Option<Tick>,
        now: u64,
    ) -> Option<Action> {
        if self.phase.finished() || now < self.counted_from_unix {
            return None;
        }
        self.findings.observe(events, tick, now);
        if !self.plan.findings {
            return None;
        }
        let alpha = self.plan.test_alpha();
        let worst = self.findings.rollback_reason(alpha)?;
        let signature_alpha = worst.alpha(alpha);
        let (canary_rate, stable_rate) = self.findings.rates(worst);
        let why = format!(
            "finding {} on {}: {} {} vs {} on {} ({:.2}% of {} requests vs {:.2}% of {}), evidence {} ≥ {:.0} ({}, ÷ k(k+1) = {} for signature k = {} in order of arrival) at {}",
            worst.class(signature_alpha).label(),
            self.plan.canary,
            worst.name(),
            worst.canary,
            worst.stable,
            self.plan.stable,
            canary_rate * 100.0,
            self.findings.canary_requests,
            stable_rate * 100.0,
            self.findings.stable_requests,
            evidence_text(worst.evidence.e_value()),
            1.0 / signature_alpha,
            self.alpha_text(),
            worst.arrival.saturating_mul(worst.arrival.saturating_add(1)),
            worst.arrival,
            self.step_name()
        );
        let why = self.naming_health(why);
        Some(self.finish_rolled_back(now, why))
    }

    /// The line a person reads at 05:00: the metric, canary vs stable, the evidence and its threshold.
    pub fn rollback_reason(&self) -> String {
        self.versus_line("errors", &self.errors, "requests")
    }

    /// "`test` 2.00% on v2 vs 0.10% on v1 (3/150 vs 1/1000 `per`), evidence 120.3 ≥ 100 (1/α, …) at step …":
    /// a count test's rollback line (the errors, or an application's metric), at the test's share of α.
    fn versus_line(&self, test: &str, e: &Evidence, per: &str) -> String {
        let (canary, stable) = e.rates();
        format!(
            "{test} {:.2}% on {} vs {:.2}% on {} ({}/{} vs {}/{} {per}), evidence {} ≥ {:.0} ({}) at {}",
            canary * 100.0,
            self.plan.canary,
            stable * 100.0,
            self.plan.stable,
            e.canary_bad,
            e.canary_requests,
            e.stable_bad,
            e.stable_requests,
            evidence_text(e.e_value()),
            1.0 / self.plan.test_alpha(),
            self.alpha_text(),
            self.step_name()
        )
    }

    /// The tests whose evidence holds a number that is not finite (a state file saved by an older release).
    pub fn non_finite(&self) -> Vec<String> {
        let mut found = Vec::new();
        if !self.errors.is_finite() {
            found.push("errors".to_string());
        }
        for check in self.latency.iter().filter(|c| !c.evidence.is_finite()) {
            found.push(format!("latency {}", duration_text(check.bound_us)));
        }
        for f in self
            .findings
            .signatures
            .iter()
            .filter(|f| !f.evidence.is_finite())
        {
            found.push(format!("finding {}", f.name()));
        }
        found
    }

    /// A rollout restored with evidence that is not a finite number: that evidence starts over, and a running
    /// rollout is paused for an operator (it cannot be judged on what was lost). Returns the line to log.
    pub fn recover_non_finite(&mut self, now: u64) -> Option<String> {
        let found = self.non_finite();
        if found.is_empty() {
            return None;
        }
        if !self.errors.is_finite() {
            self.errors.start_over(1.0);
        }
        let tolerance = self.plan.latency_tolerance;
        for check in self.latency.iter_mut().filter(|c| !c.evidence.is_finite()) {
            check.evidence.start_over(tolerance);
        }
        for f in self
            .findings
            .signatures
            .iter_mut()
            .filter(|f| !f.evidence.is_finite())
        {
            f.evidence.start_over(1.0);
        }
        let what = format!(
            "its {} evidence was not a finite number in the state file, and starts over",
            found.join(", ")
        );
        if !self.phase.finished() {
            self.phase = Phase::Paused;
            self.reason = Some(format!(
                "{}: {what}; `canaryctl rollout resume {}` goes on, `rollout abort` rolls back",
                self.step_name(),
                self.plan.rollout
            ));
            self.record(now, format!("paused: {what}"));
        }
        Some(format!("rollout {}: {what}", self.plan.rollout))
    }

    /// `rollout pause`: hold at the current step (the analysis keeps running).
    pub fn pause(&mut self, now: u64) -> Result<Option<Action>, String> {
        match self.phase {
            Phase::Progressing => {
                self.phase = Phase::Paused;
                self.reason = Some(format!("{}: paused by an operator", self.step_name()));
                self.record(
                    now,
                    format!("paused by an operator at {}", self.step_name()),
                );
                Ok(None)
            }
            Phase::Paused | Phase::Inconclusive => Ok(None),
            finished => Err(format!(
                "rollout {} is {}: nothing to pause",
                self.plan.rollout,
                finished.label()
            )),
        }
    }

    /// `rollout resume`: past a gate, or on from a pause; an inconclusive step waits another max time.
    pub fn resume(&mut self, now: u64) -> Result<Option<Action>, String> {
        match self.phase {
            Phase::Paused | Phase::Inconclusive => {
                self.phase = Phase::Progressing;
                self.reason = None;
                self.record(now, format!("resumed at {}", self.step_name()));
                if self.plan.steps.get(self.step) == Some(&Step::Pause) {
                    return Ok(Some(self.next_step(now)));
                }
                // The step's clock starts again; the requests it saw still count.
                self.step_started_unix = now;
                self.step_covered_s = 0;
                Ok(None)
            }
            Phase::Progressing => Ok(None),
            finished => Err(format!(
                "rollout {} is {}: start a new one",
                self.plan.rollout,
                finished.label()
            )),
        }
    }

    /// `rollout promote`: finish now, the canary becomes stable.
    pub fn promote(&mut self, now: u64) -> Result<Action, String> {
        if self.phase.finished() {
            return Err(format!(
                "rollout {} is {}",
                self.plan.rollout,
                self.phase.label()
            ));
        }
        Ok(self.finish_promoted(
            now,
            format!("promoted by an operator at {}", self.step_name()),
        ))
    }

    /// `rollout abort`: roll back now.
    pub fn abort(&mut self, now: u64) -> Result<Action, String> {
        if self.phase.finished() {
            return Err(format!(
                "rollout {} is {}",
                self.plan.rollout,
                self.phase.label()
            ));
        }
        Ok(self.finish_rolled_back(
            now,
            format!("aborted by an operator at {}", self.step_name()),
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::findings::Origin;

    pub(crate) fn plan(steps: &str) -> Plan {
        Plan {
            rollout: "web".into(),
            canary: "v2".into(),
            stable: "v1".into(),
            stable_cluster: "app-v1".into(),
            canary_cluster: "app-v2".into(),
            steps: steps.split(',').map(|s| s.parse().unwrap()).collect(),
            hold_s: 10,
            max_step_s: 60,
            alpha: 0.05,
            min_canary_requests: 100,
            fleet_clusters: Vec::new(),
            allow_missing_envoys: false,
            canary_route_cluster: None,
            latency: false,
            latency_tolerance: 1.5,
            evidence: Source::Envoy,
            prometheus_selector: String::new(),
            findings: false,
            metrics: Vec::new(),
        }
    }

    impl Rollout {
        fn start_plain(plan: Plan, now: u64) -> Result<(Self, Action), String> {
            Rollout::start(plan, now, Histogram::default())
        }
    }

    fn pct(text: &str) -> Percent {
        Percent::from_text(text).unwrap()
    }

    fn tick(stable: u64, canary: u64, stable_bad: u64, canary_bad: u64) -> Option<Tick> {
        Some(Tick {
            stable_requests: stable,
            canary_requests: canary,
            stable_bad,
            canary_bad,
        })
    }

    #[test]
    fn steps_parse_and_plans_are_checked_with_the_field_named() {
        assert_eq!("12.5".parse::<Step>(), Ok(Step::Percent(pct("12.5"))));
        assert_eq!("PAUSE".parse::<Step>(), Ok(Step::Pause));
        for bad in ["0", "101", "12.345", "x", ""] {
            assert!(bad.parse::<Step>().is_err(), "{bad}");
        }
        assert!(plan("1,5,25,50,100").check().is_ok());
        assert!(plan("1,5,pause,50,100").check().is_ok());
        assert!(plan("5,1")
            .check()
            .unwrap_err()
            .starts_with("steps: 1 after 5"));
        assert!(plan("pause,5").check().unwrap_err().starts_with("steps:"));
        assert!(plan("5,pause,pause,10")
            .check()
            .unwrap_err()
            .contains("two pauses"));
        let mut p = plan("5,100");
        p.alpha = 0.0;
        assert!(p.check().unwrap_err().starts_with("false-rollback-budget:"));
        for useless in [1e-300, 1e-7, f64::MIN_POSITIVE] {
            let mut p = plan("5,100");
            p.alpha = useless;
            let err = p.check().unwrap_err();
            assert!(
                err.starts_with(&format!(
                    "false-rollback-budget: {useless:e} is below 0.000001"
                )),
                "{err}"
            );
        }
        let mut p = plan("5,100");
        p.alpha = MIN_ALPHA;
        assert!(p.check().is_ok());
        let mut p = plan("5,100");
        p.max_step_s = 5;
        assert!(p.check().unwrap_err().starts_with("max-step-time:"));
        let step: Step = serde_json::from_str("\"pause\"").unwrap();
        assert_eq!(serde_json::to_string(&step).unwrap(), "\"pause\"");
    }

    #[test]
    fn a_healthy_canary_goes_through_every_step_after_its_hold_and_is_promoted() {
        let (mut r, first) = Rollout::start_plain(plan("1,5,100"), 0).unwrap();
        assert_eq!(first, Action::SetPercent(pct("1")));
        // Enough requests but the hold is not over: stay.
        // The hold counts seconds of evidence: the warm-up's three are not.
        assert_eq!(r.tick(tick(9900, 100, 10, 0), 5), None);
        assert_eq!(r.tick(tick(9900, 100, 10, 1), 11), None);
        assert_eq!(
            r.tick(tick(9900, 100, 10, 1), 12),
            Some(Action::SetPercent(pct("5")))
        );
        assert_eq!(r.step, 1);
        assert_eq!(r.step_covered_s, 0);
        assert_eq!(
            r.tick(tick(9500, 500, 10, 1), 22),
            Some(Action::SetPercent(pct("100")))
        );
        // The last step holds too; passing it promotes.
        assert_eq!(r.tick(tick(0, 50, 0, 0), 27), None);
        assert_eq!(r.tick(tick(0, 50, 0, 0), 32), Some(Action::Promote));
        assert_eq!(r.phase, Phase::Promoted);
        assert_eq!(
            r.tick(tick(0, 10000, 0, 10000), 30),
            None,
            "finished stays finished"
        );
    }

    #[test]
    fn a_failing_canary_is_rolled_back_in_any_phase_with_a_readable_reason() {
        let (mut r, _) = Rollout::start_plain(plan("5,100"), 0).unwrap();
        r.pause(1).unwrap();
        assert_eq!(r.tick(tick(950, 50, 0, 1), 3), None);
        assert_eq!(r.tick(tick(950, 50, 0, 1), 4), None);
        let Some(Action::RollBack(why)) = r.tick(tick(950, 50, 0, 1), 5) else {
            panic!("not rolled back: {r:?}");
        };
        assert_eq!(r.phase, Phase::RolledBack);
        assert_eq!(
            why,
            "errors 2.00% on v2 vs 0.00% on v1 (3/150 vs 0/2850 requests), evidence 72.1 ≥ 20 (1/α, α = 0.05) at step 1/2 (5%)"
        );
    }

    #[test]
    fn low_traffic_ends_inconclusive_never_promoted_nor_rolled_back_without_evidence() {
        let (mut r, _) = Rollout::start_plain(plan("5,100"), 0).unwrap();
        for t in 1..=60 {
            assert_eq!(r.tick(tick(19, 1, 0, 0), t), None);
        }
        // The first two ticks fell in the warm-up.
        assert_eq!(r.phase, Phase::Inconclusive);
        assert!(r
            .reason
            .as_deref()
            .unwrap()
            .contains("58 canary requests in 60s, needs 100"));
        // Held there: more quiet ticks change nothing.
        assert_eq!(r.tick(tick(19, 1, 0, 0), 200), None);
        assert_eq!(r.phase, Phase::Inconclusive);
        // Resume waits another max time; the requests already seen still count.
        assert_eq!(r.resume(201).unwrap(), None);
        assert_eq!(
            r.tick(tick(760, 41, 0, 0), 211),
            Some(Action::SetPercent(pct("100")))
        );
    }

    #[test]
    fn reports_in_the_warm_up_may_hold_an_older_build_and_are_not_counted() {
        let (mut r, _) = Rollout::start_plain(plan("5,100"), 100).unwrap();
        // A previous build's failures, reported in the first seconds: no evidence, no rollback.
        for t in [100, 101, 102] {
            assert_eq!(r.tick(tick(950, 50, 0, 10), t), None);
        }
        assert_eq!((r.errors.ticks, r.step_canary_requests), (0, 0));
        assert_eq!(r.phase, Phase::Progressing);
        r.tick(tick(950, 50, 0, 0), 103);
        assert_eq!((r.errors.ticks, r.step_canary_requests), (1, 50));
    }

    #[test]
    fn a_step_passes_only_on_its_hold_of_complete_evidence_and_never_while_evidence_is_missing() {
        let (mut r, _) = Rollout::start_plain(plan("5,100"), 0).unwrap();
        let silent = || {
            vec![r#""front-2" (edge): no load report, none since 1970-01-01T00:00:04Z"#.to_string()]
        };
        // Four seconds of complete evidence, then the reports stop for an hour while traffic "goes on": the
        // requests and errors that arrive from the rest of the fleet are judged, but the hold does not move.
        for t in 3..=6 {
            assert!(r.observe_coverage(Vec::new(), t));
            assert_eq!(r.observe_errors(tick(950, 50, 0, 0), true, t), None);
        }
        for t in 7..=59 {
            assert!(!r.observe_coverage(silent(), t));
            assert_eq!(r.observe_errors(tick(950, 50, 0, 0), false, t), None);
            assert_eq!(r.advance(t), None, "passed on missing evidence at {t}");
        }
        assert_eq!((r.step_covered_s, r.step_canary_requests), (4, 200));
        assert_eq!(r.errors.canary_requests, 50 * 57);
        assert_eq!(r.gap.as_ref().unwrap().since_unix, 7);
        // Out of time with the evidence still missing: inconclusive, saying what is missing since when.
        r.observe_coverage(silent(), 60);
        assert_eq!(r.advance(60), None);
        assert_eq!(r.phase, Phase::Inconclusive);
        let why = r.reason.clone().unwrap();
        assert!(
            why.contains(
                "evidence missing since 1970-01-01T00:00:07Z (\"front-2\" (edge): no load report"
            ) && why.contains("never promoted without it"),
            "{why}"
        );
        assert!(r
            .history
            .iter()
            .any(|e| e.what.starts_with("waiting for evidence: \"front-2\"")));
        // Resumed and complete again: the hold counts from the resume, whatever the requests seen before.
        r.resume(61).unwrap();
        for t in 62..=70 {
            r.observe_coverage(Vec::new(), t);
            assert_eq!(r.observe_errors(tick(950, 50, 0, 0), true, t), None);
            assert_eq!(r.advance(t), None, "passed at {t}");
        }
        assert!(r
            .history
            .iter()
            .any(|e| e.what == "evidence complete again after 55s"));
        r.observe_coverage(Vec::new(), 71);
        assert_eq!(r.advance(71), Some(Action::SetPercent(pct("100"))));
    }

    #[test]
    fn no_step_passes_on_one_tick_and_a_step_needs_a_canary_request() {
        let mut p = plan("5,100");
        p.hold_s = 1;
        p.min_canary_requests = 1;
        let (mut r, _) = Rollout::start_plain(p.clone(), 0).unwrap();
        assert_eq!(r.tick(tick(950, 50, 0, 0), 3), None, "one tick of evidence");
        assert_eq!(
            r.tick(tick(950, 50, 0, 0), 4),
            Some(Action::SetPercent(pct("100")))
        );
        // Ticks without canary requests pass nothing, however long.
        let (mut r, _) = Rollout::start_plain(p.clone(), 0).unwrap();
        for t in 3..59 {
            assert_eq!(r.tick(None, t), None);
        }
        p.min_canary_requests = 0;
        assert!(p
            .check()
            .unwrap_err()
            .starts_with("min-canary-requests: 0: a step needs at least 1"));
    }

    #[test]
    fn a_gate_holds_until_resumed_and_a_paused_rollout_stays_paused() {
        let (mut r, _) = Rollout::start_plain(plan("1,pause,50,100"), 0).unwrap();
        assert_eq!(
            r.tick(tick(9900, 100, 0, 0), 13),
            Some(Action::SetPercent(pct("1")))
        );
        assert_eq!(r.phase, Phase::Paused);
        assert_eq!(r.percent(), pct("1"));
        for t in 14..500 {
            assert_eq!(r.tick(tick(9900, 100, 0, 0), t), None);
        }
        assert_eq!(r.phase, Phase::Paused);
        assert_eq!(r.resume(500).unwrap(), Some(Action::SetPercent(pct("50"))));
        r.pause(501).unwrap();
        for t in 502..600 {
            assert_eq!(r.tick(tick(5000, 5000, 0, 0), t), None);
        }
        assert_eq!((r.phase, r.percent()), (Phase::Paused, pct("50")));
        assert_eq!(r.resume(600).unwrap(), None);
        assert_eq!(
            r.tick(tick(5000, 5000, 0, 0), 610),
            Some(Action::SetPercent(pct("100")))
        );
    }

    #[test]
    fn operators_can_finish_or_abort_but_not_restart_a_finished_rollout() {
        let (mut r, _) = Rollout::start_plain(plan("5,100"), 0).unwrap();
        assert_eq!(r.promote(1).unwrap(), Action::Promote);
        assert!(r.abort(2).is_err() && r.resume(2).is_err() && r.pause(2).is_err());
        let (mut r, _) = Rollout::start_plain(plan("5,100"), 0).unwrap();
        assert_eq!(
            r.abort(1).unwrap(),
            Action::RollBack("aborted by an operator at step 1/2 (5%)".into())
        );
        assert_eq!(r.phase, Phase::RolledBack);
    }

    #[test]
    fn a_rollout_survives_a_save_and_restore() {
        let (mut r, _) = Rollout::start_plain(plan("1,5,pause,100"), 0).unwrap();
        r.tick(tick(950, 50, 0, 1), 3);
        let text = serde_json::to_string(&r).unwrap();
        let back: Rollout = serde_json::from_str(&text).unwrap();
        assert_eq!(back.plan, r.plan);
        assert_eq!(
            (back.phase, back.step, back.step_canary_requests),
            (r.phase, r.step, 50)
        );
        assert!((back.errors.e_value() - r.errors.e_value()).abs() < 1e-12);
    }

    fn latency(count: u64, at_most: &[(u64, u64)]) -> Histogram {
        Histogram {
            count,
            at_most: at_most.iter().copied().collect(),
        }
    }

    #[test]
    fn latency_bounds_come_from_stable_and_a_slower_canary_is_rolled_back_within_the_split_budget()
    {
        let mut p = plan("20,100");
        p.latency = true;
        assert_eq!(p.test_alpha(), 0.0125);
        // Stable's baseline before the start is too small: the bounds are learned during the rollout.
        let small = latency(100, &[(1000, 60), (5000, 95), (25000, 100)]);
        let (mut r, _) = Rollout::start(p, 0, small).unwrap();
        assert!(r.latency.is_empty());
        let stable = latency(400, &[(1000, 240), (5000, 380), (25000, 400)]);
        let fast_canary = latency(100, &[(1000, 60), (5000, 95), (25000, 100)]);
        assert_eq!(r.observe_latency(&stable, &fast_canary, 5), None);
        let bounds: Vec<u64> = r.latency.iter().map(|c| c.bound_us).collect();
        assert_eq!(
            bounds,
            vec![1000, 5000, 25000],
            "p50, p90, p99 of 500 stable requests"
        );
        // Sub-millisecond bounds are raised to the first bucket from 1 ms.
        let mut fast = plan("20,100");
        fast.latency = true;
        let quick = latency(1000, &[(500, 995), (1000, 1000), (5000, 1000)]);
        let (r2, _) = Rollout::start(fast, 0, quick).unwrap();
        assert_eq!(
            r2.latency.iter().map(|c| c.bound_us).collect::<Vec<_>>(),
            vec![1000]
        );
        // A canary as fast as stable moves nothing; a slow one is rolled back, naming the bound.
        for t in 6..20 {
            assert_eq!(r.observe_latency(&stable, &fast_canary, t), None);
        }
        let slow_canary = latency(100, &[(1000, 0), (5000, 10), (25000, 90)]);
        let mut action = None;
        for t in 20..30 {
            action = r.observe_latency(&stable, &slow_canary, t);
            if action.is_some() {
                break;
            }
        }
        let Some(Action::RollBack(why)) = action else {
            panic!("not rolled back: {r:?}");
        };
        assert!(why.starts_with("latency: "), "{why}");
        assert!(
            why.contains("(1/α, α = 0.0125: 0.05 over 4 tests)"),
            "{why}"
        );
        assert_eq!(r.phase, Phase::RolledBack);
    }

    #[test]
    fn without_stats_streams_latency_is_not_compared_and_errors_get_the_whole_budget() {
        let (mut r, _) = Rollout::start_plain(plan("20,100"), 0).unwrap();
        assert_eq!(r.plan.test_alpha(), 0.05);
        let slow = latency(100, &[(1000, 0)]);
        assert_eq!(
            r.observe_latency(&latency(100, &[(1000, 100)]), &slow, 5),
            None
        );
        assert!(r.latency.is_empty() && r.latency_baseline.count == 0);
    }

    #[test]
    fn a_new_signature_rolls_back_with_a_line_that_names_it_and_findings_share_the_budget() {
        let mut p = plan("20,100");
        p.latency = true;
        p.findings = true;
        assert_eq!(p.tests(), 5);
        assert_eq!(p.test_alpha(), 0.01);
        // The findings' 0.01, spent over signatures in order of arrival: 1/200 for the first, 1/600 for the next.
        assert_eq!(p.findings_alpha(), 0.01);
        assert!((1.0 / arrival_alpha(p.findings_alpha(), 1) - 200.0).abs() < 1e-9);
        assert!((1.0 / arrival_alpha(p.findings_alpha(), 2) - 600.0).abs() < 1e-9);
        let (mut r, _) = Rollout::start_plain(p, 0).unwrap();
        let tick = Some(Tick {
            stable_requests: 800,
            canary_requests: 200,
            stable_bad: 0,
            canary_bad: 0,
        });
        let checkout = Signature::http(Origin::Attempt, "POST", "/checkout/7", 503, "", "");
        let one = |s: &Signature| {
            BTreeMap::from([(
                s.clone(),
                Events {
                    stable: 0,
                    canary: 1,
                    example: "POST /checkout/7 → 503".into(),
                },
            )])
        };
        // Before the warm-up ends nothing is counted.
        assert_eq!(r.observe_findings(one(&checkout), tick, 1), None);
        assert!(r.findings.signatures.is_empty());
        let mut action = None;
        for t in WARM_UP_S..WARM_UP_S + 20 {
            action = r.observe_findings(one(&checkout), tick, t);
            if action.is_some() {
                break;
            }
        }
        let Some(Action::RollBack(why)) = action else {
            panic!("not rolled back: {r:?}");
        };
        assert!(
            why.starts_with("finding new on v2: attempt POST /checkout/{n} 503 "),
            "{why}"
        );
        assert!(
            why.contains(
                "≥ 200 (1/α, α = 0.01: 0.05 over 5 tests, ÷ k(k+1) = 2 for signature k = 1 in order of arrival) at step 1/2 (20%)"
            ),
            "{why}"
        );
        // Without rollback on findings, they are collected and shown, and the budget has one test less.
        let mut quiet = plan("20,100");
        quiet.findings = false;
        assert_eq!(quiet.tests(), 1);
        let (mut r, _) = Rollout::start_plain(quiet, 0).unwrap();
        for t in WARM_UP_S..WARM_UP_S + 40 {
            assert_eq!(r.observe_findings(one(&checkout), tick, t), None);
        }
        assert_eq!(r.findings.signatures[0].canary, 40);
        let first = &r.findings.signatures[0];
        assert!(first.rolls_back(first.alpha(r.plan.findings_alpha())));
    }

    #[test]
    fn a_canary_that_goes_down_is_rolled_back_and_never_passes_a_step_on_what_it_served_before() {
        use crate::availability::Hosts;
        let health = |canary_healthy: u64| Availability {
            canary: vec![
                Hosts {
                    healthy: canary_healthy,
                    total: 1,
                };
                2
            ],
            stable: vec![Hosts {
                healthy: 1,
                total: 1,
            }],
            routed: None,
            served: None,
        };
        let (mut r, _) = Rollout::start_plain(plan("20,50,100"), 0).unwrap();
        for t in 3..8 {
            assert_eq!(r.observe_availability(&health(1), t), None);
            assert_eq!(r.tick(tick(800, 200, 0, 0), t), None);
        }
        // Down at 8 s, 2 s before the hold (10 s) ends, with 1000 canary requests served before.
        for t in 8..13 {
            assert_eq!(r.observe_availability(&health(0), t), None);
            assert_eq!(r.tick(tick(1000, 0, 0, 0), t), None, "held at {t}");
        }
        assert_eq!(r.step, 0);
        let Some(Action::RollBack(why)) = r.observe_availability(&health(0), 13) else {
            panic!("not rolled back: {r:?}");
        };
        assert_eq!(
            why,
            "canary unhealthy: 0 of 1 hosts healthy on 2 of 2 Envoys for 5 s at step 1/3 (20%)"
        );
        assert_eq!(r.phase, Phase::RolledBack);
        assert!(r
            .history
            .iter()
            .any(|e| e.what.starts_with("held: canary unhealthy")));

        // Down for 3 s then back: the step starts over and needs its hold and requests again.
        let (mut r, _) = Rollout::start_plain(plan("20,50,100"), 0).unwrap();
        for t in 3..8 {
            r.observe_availability(&health(1), t);
            r.tick(tick(800, 200, 0, 0), t);
        }
        for t in 8..11 {
            assert_eq!(r.observe_availability(&health(0), t), None);
            r.tick(tick(1000, 0, 0, 0), t);
        }
        assert_eq!(r.observe_availability(&health(1), 11), None);
        assert_eq!((r.step_started_unix, r.step_canary_requests), (11, 0));
        assert_eq!(
            r.tick(tick(800, 200, 0, 0), 12),
            None,
            "the hold starts again"
        );
        assert_eq!(
            r.tick(tick(800, 200, 0, 0), 21),
            Some(Action::SetPercent(pct("50")))
        );
        assert!(r
            .history
            .iter()
            .any(|e| e.what == "canary up again: step 1/3 (20%) starts over"));
    }

    #[test]
    fn the_first_canary_requests_of_a_step_are_not_judged_on_latency() {
        // A canary that gets its first requests only after the step's first seconds (it was unhealthy, or just
        // deployed) opens new connections then: those requests are slow whatever the version.
        let mut p = plan("20,100");
        p.latency = true;
        let baseline = latency(1000, &[(1000, 990), (5000, 1000)]);
        let (mut r, _) = Rollout::start(p, 0, baseline).unwrap();
        assert_eq!(r.latency.len(), 1);
        let stable = latency(5000, &[(1000, 4950), (5000, 5000)]);
        let cold = latency(60, &[(1000, 0), (5000, 60)]);
        let warm = latency(300, &[(1000, 297), (5000, 300)]);
        assert_eq!(r.observe_latency(&stable, &latency(0, &[]), 5), None);
        assert_eq!(r.observe_latency(&stable, &cold, 6), None);
        assert_eq!(r.observe_latency(&stable, &cold, 7), None);
        assert_eq!(r.step_latency_requests, 120);
        assert_eq!(
            r.latency[0].evidence.canary_requests, 0,
            "warm-up ticks are not counted"
        );
        for t in 8..30 {
            assert_eq!(r.observe_latency(&stable, &warm, t), None);
        }
        assert!(r.latency[0].evidence.canary_requests > 0);
    }
}
