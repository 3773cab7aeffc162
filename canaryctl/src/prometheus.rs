//! Evidence from a Prometheus server that already scrapes the Envoys' `/stats/prometheus`, for teams that
//! would rather point canaryctl at it than have every Envoy stream to canaryctl.
//!
//! **What it reads.** Envoy charges response codes, completions and latency to the cluster a route names. With
//! the shipped fallback, the canary's route names the aggregate cluster (`app-v2-or-v1`), and a canary attempt
//! that failed and was retried on stable leaves no 5xx anywhere: only the aggregate's retry counter shows it.
//! So, for the cluster each version's route names:
//! - requests: `envoy_cluster_upstream_rq_completed`;
//! - bad: `envoy_cluster_upstream_rq_xx{envoy_response_code_class="5"}` (what reached the user, or was
//!   answered after the retries) plus `envoy_cluster_upstream_rq_retry` (attempts that failed and were retried:
//!   5xx the retry policy retries, resets, connect failures, per-try timeouts);
//! - latency: `envoy_cluster_upstream_rq_time_bucket`.
//!
//! **How.** One instant query per tick returns the raw counters of both clusters, per scraped Envoy. The
//! difference of each series from its previous value is what happened since (a smaller value means Envoy
//! restarted: all of it is new), and the differences are added up per cluster. Raw counters, not `increase()`
//! over a window: windows that overlap would count the same requests twice, and the test needs each event once.
//! A series seen for the first time is only a starting point.
//!
//! The query text, the answer's parsing and the arithmetic are plain functions; [`Prometheus`] only does HTTP.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Deserialize;

use crate::analysis::{either_reported, Histogram, Tick};
use crate::availability::{Availability, Hosts};

const COMPLETED: &str = "envoy_cluster_upstream_rq_completed";
/// Requests sent to a cluster's connection pool: for the canary's own cluster, the attempts its hosts got
/// (its completions are charged to the route's aggregate cluster).
const ATTEMPTS: &str = "envoy_cluster_upstream_rq_total";
/// Gauges: hosts that pass health checks and are not ejected, and all hosts, as each Envoy sees them.
const HEALTHY: &str = "envoy_cluster_membership_healthy";
const HOSTS: &str = "envoy_cluster_membership_total";
/// The filter's counters, with the shipped bootstraps' stats tags (labels rollout, version, reason).
const ROUTED: &str = canary_router::metrics::REQUESTS;
const BY_CLASS: &str = "envoy_cluster_upstream_rq_xx";
const RETRIED: &str = "envoy_cluster_upstream_rq_retry";
const LATENCY: &str = "envoy_cluster_upstream_rq_time_bucket";
const CLUSTER: &str = "envoy_cluster_name";

/// A series not seen for this long is forgotten (an Envoy that went away).
const FORGET_AFTER_S: u64 = 600;

/// A PromQL string literal: `"` and `\` escaped.
fn string_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A regular expression (RE2) matching exactly `text`.
fn regex_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if r"\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Checks a label selector given by an operator (`job="envoy",namespace=~"prod-.*"`): label matchers only,
/// so it cannot change the query's shape. The error names the part that is not a matcher.
pub fn check_selector(selector: &str) -> Result<(), String> {
    let mut rest = selector.trim();
    while !rest.is_empty() {
        let name_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let (name, after) = rest.split_at(name_end);
        let after = after.trim_start();
        let op = ["=~", "!~", "!=", "="]
            .into_iter()
            .find(|op| after.starts_with(op));
        let starts_ok = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        let (Some(op), true) = (op, starts_ok) else {
            return Err(bad_selector(selector, rest));
        };
        let value = after[op.len()..].trim_start();
        let Some(body) = value.strip_prefix('"') else {
            return Err(bad_selector(selector, rest));
        };
        // The closing quote: the first `"` not escaped by a backslash.
        let mut escaped = false;
        let mut close = None;
        for (i, c) in body.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let Some(close) = close else {
            return Err(bad_selector(selector, rest));
        };
        rest = body[close + 1..].trim_start();
        if let Some(next) = rest.strip_prefix(',') {
            rest = next.trim_start();
        } else if !rest.is_empty() {
            return Err(bad_selector(selector, rest));
        }
    }
    Ok(())
}

fn bad_selector(selector: &str, at: &str) -> String {
    format!(
        "prometheus_selector: {} is not a list of label matchers like job=\"envoy\",namespace=~\"prod-.*\" (stuck at {})",
        canary_router::text::quote(selector),
        canary_router::text::quote(at)
    )
}

/// The clusters and version a rollout reads from Prometheus.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub stable: &'a str,
    /// The canary's own cluster (its hosts: health, attempts).
    pub canary: &'a str,
    /// The cluster the canary's route names (completions, errors, latency): the aggregate it falls back
    /// through, or the canary's own.
    pub canary_route: &'a str,
    pub rollout: &'a str,
    pub version: &'a str,
}

/// The instant query that returns every series a rollout reads, per scraped Envoy: the route clusters'
/// counters and latency, both versions' host gauges and attempts, and the filter's requests to the canary.
pub fn counters_query(wanted: &Wanted, selector: &str) -> String {
    let selector = selector.trim();
    let with = |mut matchers: String| {
        if !selector.is_empty() {
            matchers.push(',');
            matchers.push_str(selector);
        }
        format!("{{{matchers}}}")
    };
    let clusters = |list: &[&str]| {
        let mut clusters: Vec<String> = list.iter().map(|c| regex_literal(c)).collect();
        clusters.sort();
        clusters.dedup();
        string_literal(&clusters.join("|"))
    };
    let route = with(format!(
        "__name__=~{},{CLUSTER}=~{}",
        string_literal(&[COMPLETED, BY_CLASS, RETRIED, LATENCY].join("|")),
        clusters(&[wanted.stable, wanted.canary_route])
    ));
    let hosts = with(format!(
        "__name__=~{},{CLUSTER}=~{}",
        string_literal(&[HEALTHY, HOSTS, ATTEMPTS].join("|")),
        clusters(&[wanted.stable, wanted.canary])
    ));
    let routed = with(format!(
        "__name__={},rollout={},version={}",
        string_literal(ROUTED),
        string_literal(wanted.rollout),
        string_literal(wanted.version)
    ));
    format!("{route} or {hosts} or {routed}")
}

/// Stable's latency over the last `window_s` seconds, summed over the Envoys: a rollout's baseline.
pub fn baseline_query(cluster: &str, selector: &str, window_s: u64) -> String {
    let selector = selector.trim();
    let extra = if selector.is_empty() {
        String::new()
    } else {
        format!(",{selector}")
    };
    format!(
        "sum by (le) (increase({LATENCY}{{{CLUSTER}={}{extra}}}[{window_s}s]))",
        string_literal(cluster)
    )
}

/// One series of an instant query's answer: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<Series>,
}

#[derive(Deserialize)]
struct Series {
    metric: BTreeMap<String, String>,
    /// [unix time, "value"].
    value: (f64, String),
}

/// The samples of an instant query's JSON answer (`/api/v1/query`), or Prometheus's own error in one line.
pub fn parse_answer(body: &[u8]) -> Result<Vec<Sample>, String> {
    let answer: Answer = serde_json::from_slice(body).map_err(|err| {
        format!(
            "not a Prometheus API answer ({err}): {}",
            canary_router::text::quote(&String::from_utf8_lossy(body.get(..120).unwrap_or(body)))
        )
    })?;
    if answer.status != "success" {
        return Err(format!(
            "Prometheus refused the query ({}): {}",
            answer.error_type.as_deref().unwrap_or("error"),
            answer.error.as_deref().unwrap_or("no reason given")
        ));
    }
    let data = answer
        .data
        .ok_or_else(|| "a Prometheus answer without data".to_string())?;
    if data.result_type != "vector" {
        return Err(format!(
            "Prometheus answered a {} where a vector was expected",
            data.result_type
        ));
    }
    Ok(data
        .result
        .into_iter()
        .filter_map(|s| {
            // "NaN" and "+Inf" parse; a counter is neither, and such a sample is skipped.
            let value: f64 = s.value.1.parse().ok()?;
            value.is_finite().then_some(Sample {
                labels: s.metric,
                value,
            })
        })
        .collect())
}

/// An `le` bound in Envoy's milliseconds as microseconds; None for `+Inf` or nonsense.
fn bound_us(le: &str) -> Option<u64> {
    let ms: f64 = le.parse().ok()?;
    (ms.is_finite() && ms >= 0.0).then(|| (ms * 1000.0).round() as u64)
}

/// The cluster's latency histogram from `sum by (le)` samples (counts rounded: `increase()` extrapolates).
pub fn histogram_of(samples: &[Sample]) -> Histogram {
    let mut histogram = Histogram::default();
    for s in samples {
        let n = s.value.max(0.0).round() as u64;
        match s.labels.get("le").map(String::as_str) {
            Some("+Inf") => histogram.count += n,
            Some(le) => {
                if let Some(b) = bound_us(le) {
                    *histogram.at_most.entry(b).or_default() += n;
                }
            }
            None => {}
        }
    }
    histogram
}

/// What one cluster did since the previous query, over every scraped Envoy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterDelta {
    pub requests: u64,
    pub bad: u64,
    pub latency: Histogram,
    /// Requests sent to its hosts (attempts); None without that series.
    pub attempts: Option<u64>,
    /// Its hosts as each scraped Envoy sees them now (by the series' other labels).
    pub hosts: BTreeMap<String, Hosts>,
}

/// Since the previous query: per cluster, and the filter's requests to the canary (None: no such series,
/// e.g. Envoys without the shipped stats tags).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Deltas {
    pub clusters: BTreeMap<String, ClusterDelta>,
    pub routed: Option<u64>,
    /// Envoys (their series' labels) that had requests series before and none in this answer: Prometheus did
    /// not scrape them (a failed scrape makes their series stale at once), so this answer lacks their part.
    pub silent: Vec<String>,
}

/// The previous value of each series, to difference the next answer against.
#[derive(Debug, Default)]
pub struct Counters {
    last: HashMap<BTreeMap<String, String>, (f64, u64)>,
    /// Every Envoy (series labels) whose requests series were in an answer since the rollout started.
    expected: std::collections::BTreeSet<String>,
}

/// The labels that tell one Envoy's series from another's: all but the metric's own (its name, cluster,
/// bucket, response class, the filter's rollout and version).
fn instance_of(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "__name__" | CLUSTER | "le" | "envoy_response_code_class" | "rollout" | "version"
            )
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl Counters {
    /// The increase of every counter since the previous answer, added up per cluster, and the gauges as
    /// they are.
    pub fn advance(&mut self, samples: &[Sample], now: u64) -> Deltas {
        let mut deltas = Deltas::default();
        let mut present = std::collections::BTreeSet::new();
        for sample in samples {
            let (Some(name), cluster) = (sample.labels.get("__name__"), sample.labels.get(CLUSTER))
            else {
                continue;
            };
            if name == COMPLETED {
                present.insert(instance_of(&sample.labels));
            }
            // Gauges are current values: never differenced.
            if name == HEALTHY || name == HOSTS {
                let Some(cluster) = cluster else { continue };
                let n = sample.value.max(0.0).round() as u64;
                let hosts = deltas
                    .clusters
                    .entry(cluster.clone())
                    .or_default()
                    .hosts
                    .entry(instance_of(&sample.labels))
                    .or_default();
                if name == HEALTHY {
                    hosts.healthy = n;
                } else {
                    hosts.total = n;
                }
                continue;
            }
            let previous = self
                .last
                .insert(sample.labels.clone(), (sample.value, now))
                .map(|(v, _)| v);
            if name == ROUTED {
                deltas.routed.get_or_insert(0);
            }
            if name == ATTEMPTS {
                if let Some(cluster) = cluster {
                    deltas
                        .clusters
                        .entry(cluster.clone())
                        .or_default()
                        .attempts
                        .get_or_insert(0);
                }
            }
            // First seen: a starting point, unless that Envoy's series were seen before: Envoy creates a
            // counter at its first use (the canary's retries when it begins to fail), so all it holds is new.
            let previous = match previous {
                Some(previous) => previous,
                None if self.expected.contains(&instance_of(&sample.labels)) => 0.0,
                None => continue,
            };
            // A counter that went down was reset (Envoy restarted): everything it holds is new.
            let increase = if sample.value >= previous {
                sample.value - previous
            } else {
                sample.value
            };
            let n = increase.round() as u64;
            if n == 0 {
                continue;
            }
            if name == ROUTED {
                deltas.routed = Some(deltas.routed.unwrap_or(0).saturating_add(n));
                continue;
            }
            let Some(cluster) = cluster else {
                continue;
            };
            let delta = deltas.clusters.entry(cluster.clone()).or_default();
            match name.as_str() {
                COMPLETED => delta.requests = delta.requests.saturating_add(n),
                RETRIED => delta.bad = delta.bad.saturating_add(n),
                ATTEMPTS => delta.attempts = Some(delta.attempts.unwrap_or(0).saturating_add(n)),
                BY_CLASS
                    if sample
                        .labels
                        .get("envoy_response_code_class")
                        .is_some_and(|c| c == "5") =>
                {
                    delta.bad = delta.bad.saturating_add(n);
                }
                LATENCY => match sample.labels.get("le").map(String::as_str) {
                    Some("+Inf") => delta.latency.count = delta.latency.count.saturating_add(n),
                    Some(le) => {
                        if let Some(b) = bound_us(le) {
                            let at = delta.latency.at_most.entry(b).or_default();
                            *at = at.saturating_add(n);
                        }
                    }
                    None => {}
                },
                _ => {}
            }
        }
        self.last
            .retain(|_, (_, seen)| now.saturating_sub(*seen) <= FORGET_AFTER_S);
        deltas.silent = self
            .expected
            .difference(&present)
            .map(|i| format!("{{{i}}}"))
            .collect();
        self.expected.extend(present);
        deltas
    }
}

/// A rollout's analysis tick from the deltas of its two route clusters; None when neither moved.
pub fn tick_of(deltas: &Deltas, stable: &str, canary: &str) -> Option<Tick> {
    let moved = |c: &str| {
        deltas
            .clusters
            .get(c)
            .filter(|d| d.requests > 0 || d.bad > 0)
    };
    let (s, c) = either_reported(moved(stable), moved(canary))?;
    Some(Tick {
        stable_requests: s.requests,
        canary_requests: c.requests,
        stable_bad: s.bad,
        canary_bad: c.bad,
    })
}

/// Whether the canary is up, from one answer: both versions' hosts per Envoy, what the filter sent to the
/// canary and what its hosts got.
pub fn availability_of(deltas: &Deltas, wanted: &Wanted) -> Availability {
    let hosts = |cluster: &str| -> Vec<Hosts> {
        deltas
            .clusters
            .get(cluster)
            .map(|d| d.hosts.values().copied().collect())
            .unwrap_or_default()
    };
    Availability {
        canary: hosts(wanted.canary),
        stable: hosts(wanted.stable),
        routed: deltas.routed,
        served: deltas.clusters.get(wanted.canary).and_then(|d| d.attempts),
    }
}

/// Which clusters of `wanted` have a completions series in the answer (Envoy exports one for every cluster it
/// knows, even idle): the others are not scraped, or misnamed.
pub fn missing_clusters<'a>(samples: &[Sample], wanted: &[&'a str]) -> Vec<&'a str> {
    wanted
        .iter()
        .copied()
        .filter(|c| {
            !samples.iter().any(|s| {
                s.labels.get("__name__").is_some_and(|n| n == COMPLETED)
                    && s.labels.get(CLUSTER).is_some_and(|v| v == c)
            })
        })
        .collect()
}

/// A Prometheus server's query API.
pub struct Prometheus {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// How long a query may take before the tick goes on without it.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

impl Prometheus {
    /// `url`: the server's base (http://prometheus:9090, or a path prefix behind a proxy). `token`: sent as a
    /// bearer token. `ca`: PEM certificates trusted for https besides the system's.
    pub fn new(url: &str, token: Option<String>, ca: Option<&[u8]>) -> Result<Self, String> {
        let base = url.trim().trim_end_matches('/').to_string();
        let parsed = reqwest::Url::parse(&base).map_err(|err| {
            format!(
                "--prometheus-url: {}: {err}",
                canary_router::text::quote(url)
            )
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(format!(
                "--prometheus-url: {}: an http:// or https:// URL of the Prometheus server",
                canary_router::text::quote(url)
            ));
        }
        let mut http = reqwest::Client::builder().timeout(QUERY_TIMEOUT);
        if let Some(pem) = ca {
            let certificates = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|err| format!("--prometheus-ca: {err}"))?;
            if certificates.is_empty() {
                return Err("--prometheus-ca: no PEM certificate in the file".to_string());
            }
            for certificate in certificates {
                http = http.add_root_certificate(certificate);
            }
        }
        let http = http
            .build()
            .map_err(|err| format!("--prometheus-url: {err}"))?;
        Ok(Self { base, token, http })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// An instant query's samples, or one line saying why not.
    pub async fn query(&self, query: &str) -> Result<Vec<Sample>, String> {
        let mut request = self
            .http
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", query)]);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|err| format!("Prometheus at {}: {}", self.base, error_chain(&err)))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|err| format!("Prometheus at {}: {}", self.base, error_chain(&err)))?;
        // Prometheus answers 400/422/503 with its JSON error: say that rather than the status.
        match parse_answer(&body) {
            Err(err) if !status.is_success() && !err.starts_with("Prometheus refused") => {
                Err(format!("Prometheus at {}: HTTP {status}", self.base))
            }
            other => other,
        }
    }
}

/// An HTTP error with its causes ("connection refused" is two levels down).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str, cluster: &str, extra: &[(&str, &str)], value: f64) -> Sample {
        let labels: BTreeMap<String, String> = [
            ("__name__", name),
            (CLUSTER, cluster),
            ("instance", "front-1:9901"),
        ]
        .into_iter()
        // Later pairs win: `extra` may name another instance.
        .chain(extra.iter().copied())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Sample { labels, value }
    }

    const WEB: Wanted = Wanted {
        stable: "app-v1",
        canary: "app-v2",
        canary_route: "app-v2-or-v1",
        rollout: "web",
        version: "v2",
    };

    #[test]
    fn the_query_names_the_series_and_exactly_the_clusters() {
        let q = counters_query(&WEB, "job=\"envoy\"");
        assert_eq!(
            q,
            concat!(
                r#"{__name__=~"envoy_cluster_upstream_rq_completed|envoy_cluster_upstream_rq_xx|envoy_cluster_upstream_rq_retry|envoy_cluster_upstream_rq_time_bucket",envoy_cluster_name=~"app-v1|app-v2-or-v1",job="envoy"}"#,
                r#" or {__name__=~"envoy_cluster_membership_healthy|envoy_cluster_membership_total|envoy_cluster_upstream_rq_total",envoy_cluster_name=~"app-v1|app-v2",job="envoy"}"#,
                r#" or {__name__="canary_router_requests",rollout="web",version="v2",job="envoy"}"#
            )
        );
        // Regex characters in a cluster name match themselves; quotes and backslashes are escaped.
        let odd = Wanted {
            stable: "a.b",
            canary: "c\"d",
            canary_route: "c\"d",
            ..WEB
        };
        let q = counters_query(&odd, "");
        assert!(q.contains(r#"envoy_cluster_name=~"a\\.b|c\"d"}"#), "{q}");
        assert_eq!(
            baseline_query("app-v1", "", 300),
            r#"sum by (le) (increase(envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="app-v1"}[300s]))"#
        );
    }

    #[test]
    fn host_gauges_are_read_as_they_are_and_the_filter_s_requests_against_the_canary_s_attempts() {
        let answer = |healthy: f64, attempts: f64, routed: f64| {
            vec![
                sample(HEALTHY, "app-v2", &[], healthy),
                sample(HOSTS, "app-v2", &[], 1.0),
                sample(HEALTHY, "app-v2", &[("instance", "front-2:9901")], 1.0),
                sample(HOSTS, "app-v2", &[("instance", "front-2:9901")], 1.0),
                sample(HEALTHY, "app-v1", &[], 2.0),
                sample(HOSTS, "app-v1", &[], 2.0),
                sample(ATTEMPTS, "app-v2", &[], attempts),
                sample(
                    ROUTED,
                    "",
                    &[("rollout", "web"), ("version", "v2"), ("reason", "sticky")],
                    routed,
                ),
            ]
        };
        let mut counters = Counters::default();
        let first = availability_of(&counters.advance(&answer(1.0, 100.0, 110.0), 1), &WEB);
        assert_eq!(
            (first.routed, first.served),
            (Some(0), Some(0)),
            "a starting point"
        );
        let up = availability_of(&counters.advance(&answer(1.0, 150.0, 160.0), 2), &WEB);
        assert_eq!((up.routed, up.served), (Some(50), Some(50)));
        assert_eq!(
            up.canary,
            vec![
                Hosts {
                    healthy: 1,
                    total: 1
                },
                Hosts {
                    healthy: 1,
                    total: 1
                }
            ]
        );
        assert_eq!(
            up.stable,
            vec![Hosts {
                healthy: 2,
                total: 2
            }]
        );
        // The canary ejected on front-1, its requests going to stable: 0 healthy there, nothing served.
        let down = availability_of(&counters.advance(&answer(0.0, 150.0, 210.0), 3), &WEB);
        assert_eq!(
            down.canary[0],
            Hosts {
                healthy: 0,
                total: 1
            }
        );
        assert_eq!((down.routed, down.served), (Some(50), Some(0)));
        // Without the filter's series (no stats tags): no statement on traffic.
        let d = Counters::default().advance(&answer(1.0, 1.0, 1.0)[..7], 1);
        assert_eq!(availability_of(&d, &WEB).routed, None);
    }

    #[test]
    fn a_selector_is_label_matchers_only() {
        for good in [
            "",
            "job=\"envoy\"",
            " job = \"envoy\" , namespace=~\"prod-.*\", pod!~\"x\\\"y\",a_b!=\"\"",
        ] {
            assert_eq!(check_selector(good), Ok(()), "{good}");
        }
        for bad in [
            "job",
            "job=envoy",
            "job=\"envoy\"} or vector(1) or {a=\"b\"",
            "job=\"envoy",
            "1job=\"x\"",
            "job=\"a\" namespace=\"b\"",
        ] {
            let err = check_selector(bad).unwrap_err();
            assert!(err.starts_with("prometheus_selector: "), "{err}");
        }
    }

    #[test]
    fn answers_and_errors_are_read() {
        let ok = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"__name__":"envoy_cluster_upstream_rq_completed","envoy_cluster_name":"app-v1"},"value":[1764460000.1,"42"]},
            {"metric":{"__name__":"x"},"value":[1764460000.1,"NaN"]}]}}"#;
        let samples = parse_answer(ok).unwrap();
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].value, 42.0);
        let refused = br#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\": 1:2: parse error"}"#;
        assert_eq!(
            parse_answer(refused).unwrap_err(),
            "Prometheus refused the query (bad_data): invalid parameter \"query\": 1:2: parse error"
        );
        assert!(parse_answer(b"<html>")
            .unwrap_err()
            .starts_with("not a Prometheus API answer"));
        let matrix = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(parse_answer(matrix).unwrap_err().contains("matrix"));
    }

    #[test]
    fn increases_are_summed_per_cluster_over_envoys_and_survive_restarts() {
        let at = |n1: f64, r1: f64, c5: f64, n2: f64| {
            vec![
                sample(COMPLETED, "app-v2-or-v1", &[], n1),
                sample(RETRIED, "app-v2-or-v1", &[], r1),
                sample(
                    BY_CLASS,
                    "app-v2-or-v1",
                    &[("envoy_response_code_class", "5")],
                    c5,
                ),
                sample(
                    BY_CLASS,
                    "app-v2-or-v1",
                    &[("envoy_response_code_class", "2")],
                    n1,
                ),
                sample(
                    COMPLETED,
                    "app-v2-or-v1",
                    &[("instance", "front-2:9901")],
                    n2,
                ),
                sample(COMPLETED, "app-v1", &[], 1000.0 + n1),
            ]
        };
        let mut counters = Counters::default();
        // The first answer is only a starting point.
        assert_eq!(
            counters.advance(&at(100.0, 5.0, 1.0, 50.0), 10),
            Deltas::default()
        );
        let d = counters.advance(&at(160.0, 8.0, 2.0, 90.0), 11);
        let canary = &d.clusters["app-v2-or-v1"];
        assert_eq!((canary.requests, canary.bad), (60 + 40, 3 + 1));
        assert_eq!(d.clusters["app-v1"].requests, 60);
        assert_eq!(
            tick_of(&d, "app-v1", "app-v2-or-v1"),
            Some(Tick {
                stable_requests: 60,
                canary_requests: 100,
                stable_bad: 0,
                canary_bad: 4
            })
        );
        // front-2 restarted: its counter went from 90 to 7, so 7 are new.
        let d = counters.advance(&at(160.0, 8.0, 2.0, 7.0), 12);
        assert_eq!(d.clusters["app-v2-or-v1"].requests, 7);
        // Nothing moved: no tick.
        let d = counters.advance(&at(160.0, 8.0, 2.0, 7.0), 13);
        assert_eq!(tick_of(&d, "app-v1", "app-v2-or-v1"), None);
        // A series absent from one answer (a failed scrape) counts its whole increase when it is back.
        let d = counters.advance(&at(160.0, 8.0, 2.0, 7.0)[..4], 14);
        assert_eq!(
            d.silent,
            ["{instance=front-2:9901}"],
            "that Envoy's part is missing"
        );
        let d = counters.advance(&at(170.0, 8.0, 2.0, 17.0), 15);
        assert_eq!(d.clusters["app-v2-or-v1"].requests, 20);
        assert!(d.silent.is_empty());
        // A counter an Envoy creates at its first use (the canary's first 5xx) counts from zero; a new
        // Envoy's series are a starting point.
        let mut later = at(170.0, 8.0, 2.0, 17.0);
        later.push(sample(
            BY_CLASS,
            "app-v2-or-v1",
            &[
                ("envoy_response_code_class", "5"),
                ("instance", "front-2:9901"),
            ],
            30.0,
        ));
        later.push(sample(
            COMPLETED,
            "app-v2-or-v1",
            &[("instance", "front-3:9901")],
            500.0,
        ));
        let d = counters.advance(&later, 16);
        assert_eq!(
            (
                d.clusters["app-v2-or-v1"].requests,
                d.clusters["app-v2-or-v1"].bad
            ),
            (0, 30)
        );
        // Series unseen for ten minutes are forgotten.
        counters.advance(&[], 16 + FORGET_AFTER_S + 1);
        assert!(counters.last.is_empty());
    }

    #[test]
    fn latency_buckets_become_a_histogram_in_microseconds() {
        let buckets = |v: [f64; 3]| {
            vec![
                sample(LATENCY, "app-v1", &[("le", "0.5")], v[0]),
                sample(LATENCY, "app-v1", &[("le", "25")], v[1]),
                sample(LATENCY, "app-v1", &[("le", "+Inf")], v[2]),
            ]
        };
        let mut counters = Counters::default();
        counters.advance(&buckets([10.0, 19.0, 20.0]), 1);
        let d = counters.advance(&buckets([13.0, 27.0, 30.0]), 2);
        let h = &d.clusters["app-v1"].latency;
        assert_eq!(h.count, 10);
        assert_eq!(
            h.at_most.iter().map(|(b, n)| (*b, *n)).collect::<Vec<_>>(),
            vec![(500, 3), (25_000, 8)]
        );
        assert_eq!(h.slower_than(25_000), 2);
        let baseline = histogram_of(&[
            sample("", "", &[("le", "1")], 480.4),
            sample("", "", &[("le", "+Inf")], 500.2),
        ]);
        assert_eq!((baseline.count, baseline.at_most[&1000]), (500, 480));
    }

    #[test]
    fn unscraped_clusters_are_named() {
        let samples = vec![
            sample(COMPLETED, "app-v1", &[], 1.0),
            sample(LATENCY, "app-v1", &[("le", "1")], 1.0),
        ];
        assert_eq!(
            missing_clusters(&samples, &["app-v1", "app-v2-or-v1"]),
            vec!["app-v2-or-v1"]
        );
    }

    #[test]
    fn urls_and_certificates_are_checked() {
        let p = Prometheus::new("http://127.0.0.1:9090/", None, None).unwrap();
        assert_eq!(p.url(), "http://127.0.0.1:9090");
        assert!(Prometheus::new("https://prometheus.example:9090/prefix", None, None).is_ok());
        for bad in ["ftp://p:9090", "not a url", "http://"] {
            let err = Prometheus::new(bad, None, None).map(|_| ()).unwrap_err();
            assert!(err.starts_with("--prometheus-url: "), "{err}");
        }
        let err = Prometheus::new("https://p:9090", None, Some(b"not pem"))
            .map(|_| ())
            .unwrap_err();
        assert!(err.starts_with("--prometheus-ca: "), "{err}");
    }
}
