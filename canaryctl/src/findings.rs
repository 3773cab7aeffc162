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
//!   the canary against each version's requests in that tick ([`Evidence`]). The findings' share α of the
//!   false-rollback budget is spent over signatures in their order of arrival: the k-th gets α / (k (k+1)),
//!   and these add up to α however many come, so every signature is tested and none needs a slot. A flood of
//!   junk signatures before a real failure raises the real one's threshold (by k², not by a cap).
//! - **Memory** is bounded in bytes ([`MAX_FINDINGS_BYTES`] a rollout, each signature and example cut). When it
//!   is full, signatures the canary has never had (stable's alone: they cannot roll back) make room for new
//!   ones; only when none is left are events counted as untracked.
//! - **Classes.** `new`: seen on the canary, never on stable. `worse`: on both, the canary's rate significantly
//!   higher (its evidence reached the threshold). `known`: stable has it too, not significantly less often.
//!   A `new` or `worse` signature whose evidence reached the threshold is a rollback reason.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::analysis::{Evidence, Tick};

/// What a rollout's findings may hold, signatures and examples, in bytes.
pub const MAX_FINDINGS_BYTES: usize = 512 * 1024;
/// What one kept signature costs besides its text and example (counts, evidence, the map's node).
const FINDING_OVERHEAD: usize = 160;
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
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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
    /// Its place in the order of arrival, from 1: its α is the findings' α / (k (k+1)). 0 in a state saved
    /// before this existed (its place in the list is used).
    #[serde(default)]
    pub arrival: u64,
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

    /// The α of this signature, given the findings' share of the budget.
    pub fn alpha(&self, findings_alpha: f64) -> f64 {
        arrival_alpha(findings_alpha, self.arrival)
    }

    fn bytes(&self) -> usize {
        self.signature.len() + self.example.len() + FINDING_OVERHEAD
    }
}

/// The α of the k-th signature to arrive (from 1): α / (k (k+1)). The sum over every k is α.
pub fn arrival_alpha(findings_alpha: f64, k: u64) -> f64 {
    let k = k.max(1) as f64;
    findings_alpha / (k * (k + 1.0))
}

/// A rollout's findings, saved with it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Findings {
    /// By first appearance.
    pub signatures: Vec<Finding>,
    /// Events that found no room within [`MAX_FINDINGS_BYTES`]: counted, not tested.
    pub untracked: u64,
    /// Signatures that have arrived (the next one is the k-th + 1), those set aside included.
    #[serde(default)]
    pub arrivals: u64,
    /// Stable-only signatures set aside to make room for new ones.
    #[serde(default)]
    pub set_aside: u64,
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
        self.number_legacy();
        let mut used = self.bytes();
        for (signature, e) in events {
            let key = signature.to_string();
            if let Some(pending) = self.pending.get_mut(&key) {
                pending.2.add(&e);
                continue;
            }
            let cost = key.len() + signature.text.len() + e.example.len() + FINDING_OVERHEAD;
            if used + cost > MAX_FINDINGS_BYTES && !self.make_room(&mut used, cost) {
                self.untracked = self
                    .untracked
                    .saturating_add(e.stable.saturating_add(e.canary));
                continue;
            }
            used += cost;
            self.pending
                .insert(key, (signature.origin, signature.text, e));
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
                None => {
                    // Its place in the order of arrival fixes its α before any of its evidence is counted.
                    self.arrivals = self.arrivals.saturating_add(1);
                    self.signatures.push(Finding {
                        origin,
                        signature: text,
                        stable: 0,
                        canary: 0,
                        evidence: Evidence::default(),
                        example: e.example.clone(),
                        first_seen_unix: now,
                        arrival: self.arrivals,
                    });
                    self.signatures.len() - 1
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

    /// What the signatures and the events waiting for a tick hold, in bytes (as counted for the bound).
    pub fn bytes(&self) -> usize {
        let kept: usize = self.signatures.iter().map(Finding::bytes).sum();
        let pending: usize = self
            .pending
            .iter()
            .map(|(key, (_, text, e))| key.len() + text.len() + e.example.len() + FINDING_OVERHEAD)
            .sum();
        kept + pending
    }

    /// Sets aside stable-only signatures (the canary never had them: they cannot roll back), those seen least
    /// first, until `cost` more bytes fit. False when they do not.
    fn make_room(&mut self, used: &mut usize, cost: usize) -> bool {
        while *used + cost > MAX_FINDINGS_BYTES {
            let weakest = self
                .signatures
                .iter()
                .enumerate()
                .filter(|(_, f)| f.canary == 0)
                .min_by_key(|(_, f)| (f.stable, f.arrival))
                .map(|(i, _)| i);
            let Some(i) = weakest else {
                return false;
            };
            let gone = self.signatures.remove(i);
            *used = used.saturating_sub(gone.bytes());
            self.set_aside = self.set_aside.saturating_add(1);
        }
        true
    }

    /// A state saved before signatures had their place in the order of arrival: their place in the list.
    pub fn number_legacy(&mut self) {
        if self.signatures.iter().all(|f| f.arrival != 0) {
            return;
        }
        for (i, f) in self.signatures.iter_mut().enumerate() {
            f.arrival = i as u64 + 1;
        }
        self.arrivals = self.arrivals.max(self.signatures.len() as u64);
    }

    /// Among the signatures that roll back (each at its own α), the one furthest beyond its threshold.
    pub fn rollback_reason(&self, findings_alpha: f64) -> Option<&Finding> {
        let margin = |f: &Finding| f.evidence.log_e_value() + f.alpha(findings_alpha).ln();
        self.signatures
            .iter()
            .filter(|f| f.rolls_back(f.alpha(findings_alpha)))
            .max_by(|a, b| margin(a).total_cmp(&margin(b)))
    }

    /// The signature nearest its threshold: its evidence and threshold (1 and the first signature's threshold
    /// without any).
    pub fn nearest(&self, findings_alpha: f64) -> (f64, f64) {
        self.signatures
            .iter()
            .map(|f| (f.evidence.e_value(), 1.0 / f.alpha(findings_alpha)))
            .max_by(|a, b| (a.0 / a.1).total_cmp(&(b.0 / b.1)))
            .unwrap_or((1.0, 1.0 / arrival_alpha(findings_alpha, 1)))
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
        // GET /flaky arrived first (1/α = 200), POST /checkout second (1/α = 600).
        assert_eq!(reason.arrival, 2);
        let a = reason.alpha(alpha);
        assert!((1.0 / a - 600.0).abs() < 1e-9);
        assert_eq!(reason.class(a), Class::New);
        // With π = 0.05, a handful of events suffice.
        assert!(rolled_at.unwrap() <= 6, "{rolled_at:?}");
        let flaky = &findings.signatures[0];
        let a = flaky.alpha(alpha);
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
    fn events_wait_for_a_tick_with_both_versions() {
        let mut findings = Findings::default();
        findings.observe(events(&[("A", 0, 1)]), None, 1);
        findings.observe(events(&[("A", 0, 1)]), tick(100, 0), 2);
        assert!(findings.signatures.is_empty());
        findings.observe(BTreeMap::new(), tick(100, 10), 3);
        assert_eq!(findings.signatures.len(), 1);
        assert_eq!(findings.signatures[0].canary, 2);
        assert_eq!(findings.signatures[0].arrival, 1);
        assert!(findings.pending.is_empty());
    }

    #[test]
    fn the_alphas_of_every_signature_add_up_to_the_findings_share_however_many_arrive() {
        let sum: f64 = (1..=1_000_000).map(|k| arrival_alpha(0.01, k)).sum();
        assert!(sum <= 0.01 && sum > 0.01 * 0.99999, "{sum}");
        assert_eq!(arrival_alpha(0.01, 1), 0.005);
    }

    #[test]
    fn a_flood_of_junk_signatures_first_neither_crowds_out_a_real_failure_nor_grows_memory() {
        let alpha = 0.01;
        let mut findings = Findings::default();
        // 20,000 distinct junk signatures charged to stable, 2,000 a tick, each with a long example: far more
        // than the bytes findings keep.
        let junk: Vec<String> = (0..20_000)
            .map(|i| format!("junk {i} {}", "x".repeat(100)))
            .collect();
        for (t, chunk) in junk.chunks(2_000).enumerate() {
            let mut ev = BTreeMap::new();
            for text in chunk {
                ev.insert(
                    Signature {
                        origin: Origin::App,
                        text: text.clone(),
                    },
                    Events {
                        stable: 1,
                        canary: 0,
                        example: "y".repeat(EXAMPLE_CHARS),
                    },
                );
            }
            findings.observe(ev, tick(950, 50), t as u64);
            assert!(
                findings.bytes() <= MAX_FINDINGS_BYTES,
                "{}",
                findings.bytes()
            );
        }
        // Junk beyond what fits in one tick is counted untracked; what was kept is set aside as more comes.
        assert!(findings.set_aside > 5_000, "{}", findings.set_aside);
        let junk_kept = findings.arrivals;
        // Then the canary's real failure: one request in 50 of POST /checkout.
        let mut rolled_at = None;
        for t in 10..70 {
            findings.observe(events(&[("POST /checkout 503", 0, 1)]), tick(950, 50), t);
            if findings.rollback_reason(alpha).is_some() {
                rolled_at = Some(t - 10);
                break;
            }
            assert!(findings.bytes() <= MAX_FINDINGS_BYTES);
        }
        let reason = findings.rollback_reason(alpha).unwrap();
        assert_eq!(reason.signature, "POST /checkout 503");
        assert_eq!(reason.arrival, junk_kept + 1);
        // Its threshold is about 6·10^9 (k² / α), still only a few events more at π = 0.05.
        assert!(rolled_at.unwrap() <= 12, "{rolled_at:?}");
    }

    #[test]
    fn when_every_kept_signature_is_the_canary_s_new_ones_are_counted_untracked() {
        let mut findings = Findings::default();
        let mut t = 0;
        while findings.untracked == 0 {
            let mut ev = BTreeMap::new();
            for i in 0..500 {
                ev.insert(
                    Signature {
                        origin: Origin::App,
                        text: format!("canary {t} {i} {}", "x".repeat(100)),
                    },
                    Events {
                        stable: 0,
                        canary: 1,
                        example: String::new(),
                    },
                );
            }
            findings.observe(ev, tick(950, 50), t);
            t += 1;
            assert!(findings.bytes() <= MAX_FINDINGS_BYTES);
            assert!(t < 100);
        }
        assert_eq!(findings.set_aside, 0);
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
