//! Notifications: what a rollout's changes tell the people who run it (`serve --notify URL`).
//!
//! Pure: which changes one write made to a rollout (before → after), the event each becomes (JSON, version
//! [`EVENT_VERSION`], or Slack's `{"text"}`), the targets `--notify` names, and the HMAC-SHA256 signature of a
//! body. Delivery (a bounded queue per target, retries with backoff, never in a rollout's way) is
//! `notifier.rs`.
//!
//! Changes are found by comparing a rollout before and after each write canaryctl saves (every write, the
//! judge's and an operator's, goes through `Server::change`), not where each is made: one place sees them all,
//! and a write that is made again after another replica's is compared again.

use std::fmt;

use serde_json::json;

use crate::findings::Class;
use crate::rollout::{Phase, Rollout};
use crate::state::rfc3339;

/// The version of the JSON payload. A field may be added within a version; one is never renamed, removed or
/// given another meaning without a new version.
pub const EVENT_VERSION: u32 = 1;

/// The findings a rollback's event names, the most evident first.
pub const TOP_FINDINGS: usize = 3;

/// A change of a rollout that people are told of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Started,
    /// The step at this index (into the plan's steps) passed.
    StepPassed(usize),
    Paused,
    Inconclusive,
    Resumed,
    RolledBack,
    Promoted,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Started => "started",
            Kind::StepPassed(_) => "step_passed",
            Kind::Paused => "paused",
            Kind::Inconclusive => "inconclusive",
            Kind::Resumed => "resumed",
            Kind::RolledBack => "rolled_back",
            Kind::Promoted => "promoted",
        }
    }
}

fn held(phase: Phase) -> bool {
    matches!(phase, Phase::Paused | Phase::Inconclusive)
}

/// The changes a write made to one rollout, in the order they happened. `before`: the rollout of that name
/// before the write (None, or another rollout of the same name, when this write started it).
pub fn transitions(before: Option<&Rollout>, after: &Rollout) -> Vec<Kind> {
    let mut kinds = Vec::new();
    let same = before.filter(|b| {
        b.started_unix == after.started_unix
            && b.plan.canary == after.plan.canary
            && b.plan.steps == after.plan.steps
    });
    let (phase, step) = match same {
        Some(b) => (b.phase, b.step),
        None => {
            kinds.push(Kind::Started);
            (Phase::Progressing, 0)
        }
    };
    if phase.finished() || (phase == after.phase && step == after.step) {
        return kinds;
    }
    // Out of a pause or an inconclusive step, on to a step (or the next step's own pause): resumed. Promoted
    // or aborted from there is not a resume.
    if held(phase)
        && (after.phase == Phase::Progressing || (held(after.phase) && after.step > step))
    {
        kinds.push(Kind::Resumed);
    }
    kinds.extend((step..after.step).map(Kind::StepPassed));
    match after.phase {
        Phase::Progressing => {}
        Phase::Paused | Phase::Inconclusive if after.phase == phase && after.step == step => {}
        Phase::Paused => kinds.push(Kind::Paused),
        Phase::Inconclusive => kinds.push(Kind::Inconclusive),
        Phase::RolledBack => kinds.push(Kind::RolledBack),
        Phase::Promoted => kinds.push(Kind::Promoted),
    }
    kinds
}

/// Who made a change through the admin API: the token it showed (there is one, named "admin"; None when
/// serve runs without one) and where the request came from. Changes made by canaryctl's own judgment have none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub token: Option<String>,
    pub address: Option<String>,
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.token {
            Some(token) => write!(f, "an operator with the {token} token")?,
            None => f.write_str("an operator (no token required)")?,
        }
        if let Some(address) = &self.address {
            write!(f, " from {address}")?;
        }
        Ok(())
    }
}

/// One event, ready to send in either form.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub rollout: String,
    pub kind: Kind,
    /// "web/1765100000/4": the rollout, its start, and the event's sequence number within it.
    pub id: String,
    /// The JSON payload (version [`EVENT_VERSION`]).
    pub payload: serde_json::Value,
    /// One line a person reads (Slack's `text`).
    pub text: String,
}

/// The event for change `kind` of rollout `r` (as it is after the write), the `seq`-th of the rollout, made
/// by `by` (None: canaryctl's judgment) at `at` (unix seconds).
pub fn notice(r: &Rollout, kind: Kind, seq: u64, by: Option<&Actor>, at: u64) -> Notice {
    let plan = &r.plan;
    let id = format!("{}/{}/{seq}", plan.rollout, r.started_unix);
    let what = match kind {
        Kind::Started => format!("started against {} at {}", plan.stable, r.name_of_step(0)),
        Kind::StepPassed(k) => {
            let next = if k + 1 < plan.steps.len() {
                format!("; now at {}", r.name_of_step(k + 1))
            } else {
                String::new()
            };
            format!("passed {}{next}", r.name_of_step(k))
        }
        Kind::Paused => format!("paused at {}", r.step_name()),
        Kind::Inconclusive => format!("inconclusive at {}", r.step_name()),
        Kind::Resumed => format!("resumed at {}", r.step_name()),
        Kind::RolledBack => format!("ROLLED BACK to {} at {}", plan.stable, r.step_name()),
        Kind::Promoted => "promoted, now stable".to_string(),
    };
    let mut text = format!("rollout {}: {} {what}", plan.rollout, plan.canary);
    let reason = match kind {
        Kind::Paused | Kind::Inconclusive | Kind::RolledBack | Kind::Promoted => r.reason.clone(),
        _ => None,
    };
    if let Some(reason) = &reason {
        text.push_str(": ");
        text.push_str(reason);
    }
    let findings = if kind == Kind::RolledBack {
        top_findings(r)
    } else {
        Vec::new()
    };
    for (n, f) in findings.iter().enumerate() {
        let name = f.get("name").and_then(|v| v.as_str()).unwrap_or_default();
        let class = f.get("class").and_then(|v| v.as_str()).unwrap_or_default();
        let canary = f.get("canary").and_then(|v| v.as_u64()).unwrap_or_default();
        let stable = f.get("stable").and_then(|v| v.as_u64()).unwrap_or_default();
        text.push_str(if n == 0 { ". Findings: " } else { "; " });
        text.push_str(&format!(
            "{class} {name} ({canary} on {}, {stable} on {})",
            plan.canary, plan.stable
        ));
    }
    if let Some(actor) = by {
        text.push_str(&format!(" (by {actor})"));
    }
    let payload = json!({
        "version": EVENT_VERSION,
        "id": id,
        "seq": seq,
        "event": kind.label(),
        "at": rfc3339(at),
        "at_unix": at,
        "rollout": plan.rollout,
        "canary": plan.canary,
        "stable": plan.stable,
        "phase": r.phase.label(),
        "step": r.step + 1,
        "steps": plan.steps.len(),
        "step_name": r.step_name(),
        "percent": r.percent(),
        "passed_step": match kind {
            Kind::StepPassed(k) => Some(k + 1),
            _ => None,
        },
        "passed_step_name": match kind {
            Kind::StepPassed(k) => Some(r.name_of_step(k)),
            _ => None,
        },
        "reason": reason,
        "findings": findings,
        "by": by.map(|a| json!({ "kind": "operator", "token": a.token, "address": a.address })),
        "started_unix": r.started_unix,
        "text": text,
    });
    Notice {
        rollout: plan.rollout.clone(),
        kind,
        id,
        payload,
        text,
    }
}

/// The new or worse error signatures of a rollout, the most evident first (at most [`TOP_FINDINGS`]).
fn top_findings(r: &Rollout) -> Vec<serde_json::Value> {
    let alpha = r.plan.findings_alpha();
    let mut worth: Vec<_> = r
        .findings
        .signatures
        .iter()
        .filter(|f| f.canary > 0 && f.class(f.alpha(alpha)) != Class::Known)
        .collect();
    worth.sort_by(|a, b| {
        b.evidence
            .log_e_value()
            .total_cmp(&a.evidence.log_e_value())
            .then(b.canary.cmp(&a.canary))
    });
    worth
        .into_iter()
        .take(TOP_FINDINGS)
        .map(|f| {
            let own = f.alpha(alpha);
            let (canary_rate, stable_rate) = r.findings.rates(f);
            json!({
                "name": f.name(),
                "class": f.class(own).label(),
                "canary": f.canary,
                "canary_rate": canary_rate,
                "stable": f.stable,
                "stable_rate": stable_rate,
                "e_value": f.evidence.e_value(),
                "threshold": 1.0 / own,
                "example": f.example,
            })
        })
        .collect()
}

/// The body a target gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The JSON event (version [`EVENT_VERSION`]).
    Json,
    /// `{"text": "…"}`: what Slack's incoming webhooks (and Mattermost's, and others) take.
    Slack,
}

/// Where one `--notify` sends its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: reqwest::Url,
    /// Only this rollout's events (None: every rollout's).
    pub rollout: Option<String>,
    pub format: Format,
    /// "#2 hooks.slack.com": how logs and `/metrics` name it. A webhook's path and query often hold its
    /// secret: they are never shown.
    pub label: String,
}

impl Target {
    /// A `--notify` value: a URL (every rollout, JSON), or `key=value` pairs with `url` last
    /// (`rollout=web,format=slack,url=https://…`). `number`: its place among the `--notify` flags, from 1.
    pub fn parse(text: &str, number: usize) -> Result<Target, String> {
        let shown = |t: &str| canary_router::text::quote(t);
        let mut rollout = None;
        let mut format = Format::Json;
        let mut rest = text.trim();
        let url = loop {
            if rest.starts_with("http://") || rest.starts_with("https://") {
                break rest;
            }
            let Some((key, value)) = rest.split_once('=') else {
                return Err(format!(
                    "--notify {}: give a URL (http:// or https://) or key=value pairs ending with url=…",
                    shown(text)
                ));
            };
            if key == "url" {
                break value;
            }
            let (value, next) = value
                .split_once(',')
                .ok_or_else(|| format!("--notify {}: url=… must come last", shown(text)))?;
            match key {
                "rollout" if !value.is_empty() => rollout = Some(value.to_string()),
                "format" => {
                    format = match value {
                        "json" => Format::Json,
                        "slack" => Format::Slack,
                        other => {
                            return Err(format!(
                                "--notify format: {} is not json or slack",
                                shown(other)
                            ))
                        }
                    }
                }
                other => {
                    return Err(format!(
                        "--notify {}: unknown key {} (rollout, format, url)",
                        shown(text),
                        shown(other)
                    ))
                }
            }
            rest = next;
        };
        let parsed = reqwest::Url::parse(url)
            .map_err(|err| format!("--notify url: {} is not a URL: {err}", shown(url)))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(format!(
                "--notify url: {} must be http:// or https:// with a host",
                shown(url)
            ));
        }
        let host = parsed.host_str().unwrap_or_default();
        let label = match parsed.port() {
            Some(port) => format!("#{number} {host}:{port}"),
            None => format!("#{number} {host}"),
        };
        Ok(Target {
            url: parsed,
            rollout,
            format,
            label,
        })
    }

    /// Whether this target takes rollout `name`'s events.
    pub fn wants(&self, name: &str) -> bool {
        self.rollout.as_deref().map_or(true, |r| r == name)
    }

    /// The body of `notice` for this target.
    pub fn body(&self, notice: &Notice) -> Vec<u8> {
        let value = match self.format {
            Format::Json => notice.payload.clone(),
            Format::Slack => json!({ "text": notice.text }),
        };
        serde_json::to_vec(&value).unwrap_or_default()
    }
}

/// The header that carries a body's signature.
pub const SIGNATURE_HEADER: &str = "x-canaryctl-signature-256";

/// `sha256=<hex>`: HMAC-SHA256 of the body under the shared secret (the scheme of GitHub's webhooks).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, body);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for byte in tag.as_ref() {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::tests::plan;
    use crate::rollout::Step;

    fn started(steps: &str) -> Rollout {
        let (r, _) = Rollout::start(plan(steps), 1_000, Default::default()).unwrap();
        r
    }

    #[test]
    fn the_signature_is_hmac_sha256_as_rfc_4231_gives_it() {
        // RFC 4231, test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_new_rollout_is_started_and_nothing_else() {
        let r = started("20,50,100");
        assert_eq!(transitions(None, &r), vec![Kind::Started]);
        assert_eq!(transitions(Some(&r), &r), vec![]);
        // Another rollout of the same name (a new start after a finished one) is a start too.
        let mut old = r.clone();
        old.started_unix = 500;
        old.phase = Phase::RolledBack;
        assert_eq!(transitions(Some(&old), &r), vec![Kind::Started]);
    }

    #[test]
    fn steps_pauses_resumes_and_endings_are_each_told_once() {
        let before = started("20,pause,50,100");
        let mut after = before.clone();
        after.step = 1;
        after.phase = Phase::Paused;
        assert_eq!(
            transitions(Some(&before), &after),
            vec![Kind::StepPassed(0), Kind::Paused]
        );
        // Still paused: nothing new.
        assert_eq!(transitions(Some(&after), &after.clone()), vec![]);
        // Resumed past the gate: resumed, the gate passed.
        let mut on = after.clone();
        on.step = 2;
        on.phase = Phase::Progressing;
        assert_eq!(
            transitions(Some(&after), &on),
            vec![Kind::Resumed, Kind::StepPassed(1)]
        );
        // Aborted while paused: rolled back, not resumed.
        let mut aborted = after.clone();
        aborted.phase = Phase::RolledBack;
        assert_eq!(transitions(Some(&after), &aborted), vec![Kind::RolledBack]);
        // The last step passing promotes (the step index stays on the last).
        let mut last = on.clone();
        last.step = 3;
        let mut promoted = last.clone();
        promoted.phase = Phase::Promoted;
        assert_eq!(transitions(Some(&last), &promoted), vec![Kind::Promoted]);
        // Nothing after the end.
        let mut later = promoted.clone();
        later.history.clear();
        assert_eq!(transitions(Some(&promoted), &later), vec![]);
        // An inconclusive step resumed on the same step.
        let mut stuck = on.clone();
        stuck.phase = Phase::Inconclusive;
        assert_eq!(transitions(Some(&on), &stuck), vec![Kind::Inconclusive]);
        assert_eq!(transitions(Some(&stuck), &on), vec![Kind::Resumed]);
    }

    #[test]
    fn a_rollback_names_its_reason_top_findings_and_who() {
        let mut r = started("20,50,100");
        r.phase = Phase::RolledBack;
        r.reason = Some("aborted by an operator at step 1/3 (20%)".into());
        let by = Actor {
            token: Some("admin".into()),
            address: Some("127.0.0.1:5000".into()),
        };
        let n = notice(&r, Kind::RolledBack, 4, Some(&by), 1_060);
        assert_eq!(n.id, "web/1000/4");
        assert_eq!(n.payload["version"], 1);
        assert_eq!(n.payload["event"], "rolled_back");
        assert_eq!(n.payload["at"], "1970-01-01T00:17:40Z");
        assert_eq!(n.payload["by"]["token"], "admin");
        assert_eq!(n.payload["by"]["address"], "127.0.0.1:5000");
        assert_eq!(
            n.payload["reason"],
            "aborted by an operator at step 1/3 (20%)"
        );
        assert_eq!(
            n.text,
            "rollout web: v2 ROLLED BACK to v1 at step 1/3 (20%): aborted by an operator at step 1/3 (20%) \
             (by an operator with the admin token from 127.0.0.1:5000)"
        );
        let passed = notice(&r, Kind::StepPassed(0), 2, None, 1_030);
        assert_eq!(passed.payload["passed_step"], 1);
        assert_eq!(passed.payload["by"], serde_json::Value::Null);
        assert!(
            passed
                .text
                .contains("passed step 1/3 (20%); now at step 2/3 (50%)"),
            "{}",
            passed.text
        );
        assert_eq!(
            r.plan.steps.first(),
            Some(&Step::Percent("20".parse().unwrap()))
        );
    }

    #[test]
    fn targets_are_read_from_notify_naming_what_is_wrong() {
        let t = Target::parse("https://hooks.example.com/services/T0/B0/secret", 1).unwrap();
        assert_eq!((t.rollout.as_deref(), t.format), (None, Format::Json));
        assert_eq!(t.label, "#1 hooks.example.com");
        assert!(t.wants("any"));
        let t =
            Target::parse("rollout=web,format=slack,url=http://127.0.0.1:9/x?a=b,c", 2).unwrap();
        assert_eq!(
            (t.rollout.as_deref(), t.format),
            (Some("web"), Format::Slack)
        );
        assert_eq!(t.url.as_str(), "http://127.0.0.1:9/x?a=b,c");
        assert_eq!(t.label, "#2 127.0.0.1:9");
        assert!(t.wants("web") && !t.wants("api"));
        for (bad, says) in [
            ("hooks.example.com", "give a URL"),
            (
                "format=xml,url=http://a",
                "--notify format: \"xml\" is not json or slack",
            ),
            ("team=x,url=http://a", "unknown key \"team\""),
            ("url=ftp://a/b", "must be http:// or https://"),
            ("rollout=web", "url=… must come last"),
        ] {
            let err = Target::parse(bad, 1).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let slack = Target::parse("format=slack,url=http://a", 1).unwrap();
        let n = notice(&started("20,100"), Kind::Started, 1, None, 1_000);
        let body: serde_json::Value = serde_json::from_slice(&slack.body(&n)).unwrap();
        assert_eq!(
            body,
            json!({ "text": "rollout web: v2 started against v1 at step 1/2 (20%)" })
        );
    }
}
