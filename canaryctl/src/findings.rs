//! Findings unique to the new version: failures grouped into signatures, each counted per version against that
//! version's traffic and tested canary against stable.
//!
//! Plain data and rules, no tokio or gRPC types: the access-log stream and the log endpoint turn failures into
//! [`Signature`]s, the controller hands each tick's counts to [`Findings::observe`], and reads the verdict.
//!
//! - **Signatures.** A failed request or upstream attempt from Envoy's access logs: where it came from (the
//!   request as the user saw it, or one upstream attempt), method, path template, status, Envoy's response flags
//!   and the response-code details or upstream failure reason. An application's own error line: its message
//!   template. Templates mask what changes from one call to the next (numbers, uuids, hex and long ids, quoted
//!   values), so the same code path gives the same signature.
//! - **The test.** The rollout's error test, per signature: each tick, the signature's events on stable and on
//!   the canary against each version's requests in that tick ([`Evidence`]). The findings' share of the
//!   false-rollback budget is split evenly over [`MAX_SIGNATURES`] signatures, so all of them together stay
//!   within it. Later signatures are counted as untracked, not tested.
//! - **Classes.** `new`: seen on the canary, never on stable. `worse`: on both, the canary's rate significantly
//!   higher (its evidence reached the threshold). `known`: stable has it too, not significantly less often.
//!   A `new` or `worse` signature whose evidence reached the threshold is a rollback reason.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::analysis::{Evidence, Tick};

/// Signatures tested per rollout; the findings' budget is split evenly over them.
pub const MAX_SIGNATURES: usize = 32;
/// Templates are cut to this many characters.
const TEMPLATE_CHARS: usize = 160;
/// Examples are cut to this many characters.
const EXAMPLE_CHARS: usize = 240;

/// Where a failure was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The request as the user saw it (Envoy's HTTP access log).
    Request,
    /// One upstream attempt (the router's upstream log), including attempts the fallback retried.
    Attempt,
    /// A line the application logged.
    App,
}

impl Origin {
    pub fn label(self) -> &'static str {
        match self {
            Origin::Request => "request",
            Origin::Attempt => "attempt",
            Origin::App => "app",
        }
    }
}

/// What a failure is, without what changes between calls.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Signature {
    pub origin: Origin,
    /// "POST /checkout 503 UF upstream_reset_before_response_started{connection_failure}", or an app message
    /// template.
    pub text: String,
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.origin.label(), self.text)
    }
}

impl Signature {
    /// A failed request or attempt from Envoy's access log. `flags`: Envoy's short response flags ("UF,URX").
    pub fn http(
        origin: Origin,
        method: &str,
        path: &str,
        status: u32,
        flags: &str,
        details: &str,
    ) -> Self {
        let mut text = format!(
            "{} {} {}",
            if method.is_empty() { "-" } else { method },
            template_path(path),
            if status == 0 {
                "-".to_string()
            } else {
                status.to_string()
            }
        );
        if !flags.is_empty() {
            text.push(' ');
            text.push_str(flags);
        }
        if !details.is_empty() && details != "via_upstream" {
            text.push(' ');
            text.push_str(&template_text(details));
        }
        Self {
            origin,
            text: cut(&text, TEMPLATE_CHARS),
        }
    }

    /// An application's error line.
    pub fn app(message: &str) -> Self {
        Self {
            origin: Origin::App,
            text: cut(&template_text(message), TEMPLATE_CHARS),
        }
    }
}

fn cut(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// An example as shown beside a signature: cut, control characters replaced.
pub fn example(text: &str) -> String {
    cut(
        &text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>(),
        EXAMPLE_CHARS,
    )
}

fn is_uuid(word: &[u8]) -> bool {
    word.len() == 36
        && word.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// One word (a run of letters and digits): its mask, or None to keep it (with its digit runs masked).
fn word_mask(word: &str) -> Option<&'static str> {
    let bytes = word.as_bytes();
    let digits = bytes.iter().filter(|b| b.is_ascii_digit()).count();
    if digits == bytes.len() {
        return Some("{n}");
    }
    if digits > 0 && bytes.len() >= 8 && bytes.iter().all(u8::is_ascii_hexdigit) {
        return Some("{hex}");
    }
    if digits > 0 && bytes.len() >= 16 {
        return Some("{id}");
    }
    None
}

/// `text` with numbers, uuids, hex, long ids and quoted values masked.
pub fn template_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let Some(c) = rest.chars().next() else { break };
        let boundary_before = !matches!(
            i.checked_sub(1).and_then(|j| bytes.get(j)),
            Some(b) if b.is_ascii_alphanumeric()
        );
        if boundary_before
            && bytes.get(i..i + 36).is_some_and(is_uuid)
            && !matches!(bytes.get(i + 36), Some(b) if b.is_ascii_alphanumeric())
        {
            out.push_str("{uuid}");
            i += 36;
            continue;
        }
        if c == '"' || c == '\'' {
            // A quoted value, up to 64 characters: masked whole.
            if let Some(end) = rest[1..].find(c).filter(|end| *end <= 64) {
                out.push(c);
                out.push_str("{s}");
                out.push(c);
                i += end + 2;
                continue;
            }
        }
        if c.is_ascii_alphanumeric() {
            let len = rest
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(rest.len());
            let word = &rest[..len];
            match word_mask(word) {
                Some(mask) => out.push_str(mask),
                None => {
                    // Digit runs inside a word: "order42" → "order{n}".
                    let mut in_digits = false;
                    for ch in word.chars() {
                        if ch.is_ascii_digit() {
                            if !in_digits {
                                out.push_str("{n}");
                            }
                            in_digits = true;
                        } else {
                            out.push(ch);
                            in_digits = false;
                        }
                    }
                }
            }
            i += len;
            continue;
        }
        if c.is_whitespace() {
            // Runs of white space are one space.
            if !out.ends_with(' ') {
                out.push(' ');
            }
        } else if !c.is_control() {
            out.push(c);
        }
        i += c.len_utf8();
    }
    out.trim().to_string()
}

/// A path's template: without query or fragment, each segment masked like text.
pub fn template_path(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or("");
    if path.is_empty() {
        return "-".to_string();
    }
    path.split('/')
        .map(template_text)
        .collect::<Vec<_>>()
        .join("/")
}

/// A signature's events in one tick, per version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Events {
    pub stable: u64,
    pub canary: u64,
    /// One example (the first seen).
    #[serde(default)]
    pub example: String,
}

impl Events {
    pub fn add(&mut self, other: &Events) {
        self.stable = self.stable.saturating_add(other.stable);
        self.canary = self.canary.saturating_add(other.canary);
        if self.example.is_empty() {
            self.example.clone_from(&other.example);
        }
    }
}

/// One signature of a rollout: its counts, evidence and an example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Finding {
    pub origin: Origin,
    pub signature: String,
    pub stable: u64,
    pub canary: u64,
    pub evidence: Evidence,
    pub example: String,
    pub first_seen_unix: u64,
}

/// How a signature compares, canary against stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    New,
    Worse,
    Known,
}

impl Class {
    pub fn label(self) -> &'static str {
        match self {
            Class::New => "new",
            Class::Worse => "worse",
            Class::Known => "known",
        }
    }
}

impl Finding {
    /// The display name: "attempt POST /checkout 503".
    pub fn name(&self) -> String {
        format!("{} {}", self.origin.label(), self.signature)
    }

    /// Its class, given the α of one signature.
    pub fn class(&self, alpha: f64) -> Class {
        if self.stable == 0 && self.canary > 0 {
            Class::New
        } else if self.evidence.rejects(alpha) {
            Class::Worse
        } else {
            Class::Known
        }
    }

    /// A rollback reason: new or worse, with enough evidence.
    pub fn rolls_back(&self, alpha: f64) -> bool {
        self.canary > 0 && self.evidence.rejects(alpha)
    }
}

/// A rollout's findings, saved with it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Findings {
    /// By first appearance, at most [`MAX_SIGNATURES`].
    pub signatures: Vec<Finding>,
    /// Events of signatures beyond [`MAX_SIGNATURES`]: counted, not tested.
    pub untracked: u64,
    /// Requests of each version over the ticks observed: what the rates are of.
    pub stable_requests: u64,
    pub canary_requests: u64,
    /// Events that arrived while no tick had requests of both versions (a slow scrape): tested with the next
    /// tick that has. By signature as shown ("attempt POST /checkout/{n} 503"): a request and an attempt with the
    /// same text are two signatures.
    #[serde(default)]
    pub pending: BTreeMap<String, (Origin, String, Events)>,
}

impl Findings {
    /// One tick: the failures seen since the previous one, and the requests of each version.
    pub fn observe(&mut self, events: BTreeMap<Signature, Events>, tick: Option<Tick>, now: u64) {
        for (signature, e) in events {
            let key = signature.to_string();
            let known = self.pending.len() < MAX_SIGNATURES || self.pending.contains_key(&key);
            if !known {
                self.untracked = self.untracked.saturating_add(e.stable + e.canary);
                continue;
            }
            self.pending
                .entry(key)
                .or_insert_with(|| (signature.origin, signature.text, Events::default()))
                .2
                .add(&e);
        }
        let Some(tick) = tick else { return };
        self.stable_requests = self.stable_requests.saturating_add(tick.stable_requests);
        self.canary_requests = self.canary_requests.saturating_add(tick.canary_requests);
        if tick.stable_requests == 0 || tick.canary_requests == 0 {
            return; // π is 0 or 1: the events wait for a tick that can compare
        }
        for (_, (origin, text, e)) in std::mem::take(&mut self.pending) {
            let found = self
                .signatures
                .iter()
                .position(|f| f.origin == origin && f.signature == text);
            let index = match found {
                Some(i) => i,
                None if self.signatures.len() < MAX_SIGNATURES => {
                    self.signatures.push(Finding {
                        origin,
                        signature: text,
                        stable: 0,
                        canary: 0,
                        evidence: Evidence::default(),
                        example: e.example.clone(),
                        first_seen_unix: now,
                    });
                    self.signatures.len() - 1
                }
                None => {
                    self.untracked = self.untracked.saturating_add(e.stable + e.canary);
                    continue;
                }
            };
            let Some(finding) = self.signatures.get_mut(index) else {
                continue;
            };
            finding.stable = finding.stable.saturating_add(e.stable);
            finding.canary = finding.canary.saturating_add(e.canary);
            finding.evidence.observe(Tick {
                stable_requests: tick.stable_requests,
                canary_requests: tick.canary_requests,
                stable_bad: e.stable,
                canary_bad: e.canary,
            });
        }
    }

    /// The α of one signature, given the findings' share of the budget.
    pub fn signature_alpha(findings_alpha: f64) -> f64 {
        findings_alpha / MAX_SIGNATURES as f64
    }

    /// The signature with the most evidence among those that roll back.
    pub fn rollback_reason(&self, findings_alpha: f64) -> Option<&Finding> {
        let alpha = Self::signature_alpha(findings_alpha);
        self.signatures
            .iter()
            .filter(|f| f.rolls_back(alpha))
            .max_by(|a, b| {
                a.evidence
                    .log_e_value()
                    .total_cmp(&b.evidence.log_e_value())
            })
    }

    /// The largest evidence of any signature (1 without any).
    pub fn max_e_value(&self) -> f64 {
        self.signatures
            .iter()
            .map(|f| f.evidence.e_value())
            .fold(1.0, f64::max)
    }

    /// Each version's rate of a signature: events over that version's requests.
    pub fn rates(&self, f: &Finding) -> (f64, f64) {
        let rate = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
        (
            rate(f.canary, self.canary_requests),
            rate(f.stable, self.stable_requests),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_templated_so_one_code_path_is_one_signature() {
        for (path, template) in [
            ("/orders/12345/items/7?debug=1", "/orders/{n}/items/{n}"),
            (
                "/users/3f2a1c9e-8b7d-4e6f-a1b2-c3d4e5f60718/cart",
                "/users/{uuid}/cart",
            ),
            ("/blobs/deadbeef42", "/blobs/{hex}"),
            ("/s/AbCdEf1234567890xyz", "/s/{id}"),
            ("/api/v2/checkout", "/api/v{n}/checkout"),
            ("/checkout", "/checkout"),
            ("/", "/"),
            ("", "-"),
            ("/café/über", "/café/über"),
        ] {
            assert_eq!(template_path(path), template, "{path}");
        }
        assert_eq!(
            template_path("/orders/1/items/2"),
            template_path("/orders/99/items/100")
        );
        assert_ne!(template_path("/orders/1"), template_path("/users/1"));
        // Short words keep their letters: "beef" is a word, not an id.
        assert_eq!(template_path("/beef/cafe"), "/beef/cafe");
    }

    #[test]
    fn messages_are_templated_the_same_way() {
        let a = template_text("payment 4412 failed for order 3f2a1c9e-8b7d-4e6f-a1b2-c3d4e5f60718: card 'visa-0042' declined after 1.5s");
        let b = template_text("payment 17 failed for order 00000000-0000-4000-8000-000000000000: card 'amex-9' declined after 30.25s");
        assert_eq!(a, b);
        assert_eq!(
            a,
            "payment {n} failed for order {uuid}: card '{s}' declined after {n}.{n}s"
        );
        assert_eq!(
            template_text("  connect   to 10.0.3.7:5432\tfailed\n"),
            "connect to {n}.{n}.{n}.{n}:{n} failed"
        );
        assert_eq!(
            template_text("key \"user:42\" missing"),
            "key \"{s}\" missing"
        );
        // An unmatched quote stays a quote.
        assert_eq!(template_text("it's 5"), "it's {n}");
        // Long messages are cut.
        let long = Signature::app(&"word ".repeat(100));
        assert!(long.text.chars().count() <= TEMPLATE_CHARS + 1 && long.text.ends_with('…'));
    }

    #[test]
    fn an_http_signature_names_method_path_status_flags_and_details() {
        let s = Signature::http(
            Origin::Attempt,
            "POST",
            "/checkout/991?x=1",
            503,
            "",
            "via_upstream",
        );
        assert_eq!(s.to_string(), "attempt POST /checkout/{n} 503");
        let s = Signature::http(
            Origin::Request,
            "GET",
            "/x",
            0,
            "UF,URX",
            "upstream_reset_before_response_started{connection_failure}",
        );
        assert_eq!(
            s.to_string(),
            "request GET /x - UF,URX upstream_reset_before_response_started{connection_failure}"
        );
    }

    fn tick(stable: u64, canary: u64) -> Option<Tick> {
        Some(Tick {
            stable_requests: stable,
            canary_requests: canary,
            stable_bad: 0,
            canary_bad: 0,
        })
    }

    fn events(list: &[(&str, u64, u64)]) -> BTreeMap<Signature, Events> {
        list.iter()
            .map(|(text, stable, canary)| {
                (
                    Signature {
                        origin: Origin::Attempt,
                        text: text.to_string(),
                    },
                    Events {
                        stable: *stable,
                        canary: *canary,
                        example: format!("e.g. {text}"),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_new_signature_rolls_back_and_a_shared_one_stays_known() {
        let alpha = 0.01;
        let mut findings = Findings::default();
        let mut rolled_at = None;
        for t in 0..60 {
            // 950 stable and 50 canary requests a tick; both fail GET /flaky at 2 %, the canary also fails
            // POST /checkout on one request in 50.
            let flaky = (19, 1);
            let checkout = 1;
            findings.observe(
                events(&[
                    ("GET /flaky 503", flaky.0, flaky.1),
                    ("POST /checkout 503", 0, checkout),
                ]),
                tick(950, 50),
                t,
            );
            if rolled_at.is_none() && findings.rollback_reason(alpha).is_some() {
                rolled_at = Some(t);
            }
        }
        let reason = findings.rollback_reason(alpha).unwrap();
        assert_eq!(reason.signature, "POST /checkout 503");
        let a = Findings::signature_alpha(alpha);
        assert_eq!(reason.class(a), Class::New);
        // With 1/α = 3200 per signature and π = 0.05, a handful of events suffice.
        assert!(rolled_at.unwrap() <= 6, "{rolled_at:?}");
        let flaky = &findings.signatures[0];
        assert_eq!(flaky.class(a), Class::Known);
        assert!(!flaky.rolls_back(a));
        let (canary, stable) = findings.rates(flaky);
        assert!((canary - 0.02).abs() < 1e-9 && (stable - 0.02).abs() < 1e-9);
        assert_eq!(findings.stable_requests, 60 * 950);
        assert_eq!(flaky.example, "e.g. GET /flaky 503");
    }

    #[test]
    fn findings_survive_a_save_and_restore() {
        let mut findings = Findings::default();
        findings.observe(events(&[("A", 0, 3), ("B", 2, 0)]), tick(100, 10), 1);
        findings.observe(events(&[("C", 0, 1)]), None, 2);
        let saved = serde_json::to_string(&findings).unwrap();
        let restored: Findings = serde_json::from_str(&saved).unwrap();
        assert_eq!(restored, findings);
        assert_eq!(restored.pending.len(), 1);
        assert_eq!(
            restored.signatures[0].evidence.e_value(),
            findings.signatures[0].evidence.e_value()
        );
    }

    #[test]
    fn a_request_and_an_attempt_with_the_same_text_are_two_signatures() {
        let mut findings = Findings::default();
        let failure = |origin| Signature {
            origin,
            text: "GET /search 500".into(),
        };
        let one = Events {
            stable: 1,
            canary: 0,
            example: String::new(),
        };
        let events = BTreeMap::from([
            (failure(Origin::Request), one.clone()),
            (failure(Origin::Attempt), one),
        ]);
        findings.observe(events, tick(100, 10), 1);
        let names: Vec<String> = findings.signatures.iter().map(Finding::name).collect();
        assert_eq!(
            names,
            ["attempt GET /search 500", "request GET /search 500"]
        );
        assert!(findings.signatures.iter().all(|f| f.stable == 1));
    }

    #[test]
    fn events_wait_for_a_tick_with_both_versions_and_signatures_are_capped() {
        let mut findings = Findings::default();
        findings.observe(events(&[("A", 0, 1)]), None, 1);
        findings.observe(events(&[("A", 0, 1)]), tick(100, 0), 2);
        assert!(findings.signatures.is_empty());
        findings.observe(BTreeMap::new(), tick(100, 10), 3);
        assert_eq!(findings.signatures.len(), 1);
        assert_eq!(findings.signatures[0].canary, 2);
        assert!(findings.pending.is_empty());
        let many: Vec<(String, u64, u64)> = (0..MAX_SIGNATURES + 5)
            .map(|i| (format!("S{i}"), 1, 1))
            .collect();
        let borrowed: Vec<(&str, u64, u64)> =
            many.iter().map(|(s, a, b)| (s.as_str(), *a, *b)).collect();
        findings.observe(events(&borrowed), tick(100, 10), 4);
        assert_eq!(findings.signatures.len(), MAX_SIGNATURES);
        assert!(findings.untracked >= 2 * 5, "{}", findings.untracked);
    }

    #[test]
    fn a_a_over_many_signatures_keeps_false_rollbacks_within_the_budget() {
        // 1000 rollouts, each with 20 signatures that stable and the canary share at the same rates (0.1 %–3 %),
        // 150 ticks of ~1000 requests with the canary at 10 %, every tenth tick a burst of 3000. Rollbacks by
        // any signature must stay within the findings' α (0.01 here): the budget is split over the signatures.
        let alpha = 0.01;
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        // Binomial(n, p) by geometric gaps between successes: cost grows with the successes, not with n.
        let mut binomial = move |n: u64, p: f64| {
            let (mut k, mut at) = (0u64, 0u64);
            loop {
                at += (uniform().ln() / (1.0 - p).ln()).floor() as u64 + 1;
                if at > n {
                    return k;
                }
                k += 1;
            }
        };
        let mut false_rollbacks = 0;
        let runs = 1000;
        for _ in 0..runs {
            let mut findings = Findings::default();
            for t in 0..150 {
                let total = if t % 10 == 0 { 3000 } else { 1000 };
                let canary_n = binomial(total, 0.1);
                let stable_n = total - canary_n;
                let mut ev = BTreeMap::new();
                for i in 0..20 {
                    let rate = 0.001 + 0.0015 * i as f64;
                    let (s, c) = (binomial(stable_n, rate), binomial(canary_n, rate));
                    if s + c > 0 {
                        let events = Events {
                            stable: s,
                            canary: c,
                            example: String::new(),
                        };
                        let signature = Signature {
                            origin: Origin::Attempt,
                            text: format!("S{i}"),
                        };
                        ev.insert(signature, events);
                    }
                }
                findings.observe(ev, tick(stable_n, canary_n), t);
                if findings.rollback_reason(alpha).is_some() {
                    false_rollbacks += 1;
                    break;
                }
            }
        }
        assert!(
            false_rollbacks as f64 / runs as f64 <= alpha,
            "{false_rollbacks} false rollbacks in {runs}"
        );
    }
}
