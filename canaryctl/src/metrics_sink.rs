//! Envoy's stats stream (the MetricsService stat sink) on the gRPC port. canaryctl reads three things from it,
//! as Envoy 1.40 sends them (`source/extensions/stat_sinks/metrics_service/grpc_metrics_service_impl.cc`):
//!
//! - **Histograms are per flush interval.** Each flush carries `intervalStatistics()`: the samples recorded
//!   since the previous flush (buckets cumulative over the bounds, not over time). So each flush's
//!   `cluster.<name>.upstream_rq_time` is added as it is; subtracting the previous flush, as if it were
//!   cumulative, counted a third to a half of the requests and mixed up the versions' shares.
//! - **Gauges are current values.** `cluster.<name>.membership_healthy` and `membership_total`: the hosts of
//!   each cluster that pass health checks and are not ejected, of all, as this Envoy sees them now.
//! - **Counters are cumulative** unless the sink sets `report_counters_as_deltas` (the shipped bootstraps do
//!   not; canaryctl needs Envoy's default). The filter's `canary_router_requests.rollout.<r>.version.<v>…`
//!   counters are differenced per stream: what the filter sent to each version since the previous flush.
//!
//! Only metrics Envoy marks used are sent, and the node only in a stream's first message. Names come in both
//! of Envoy's forms: full names (`cluster.app-v2.membership_healthy`, the default), or with
//! `emit_tags_as_labels` the tag-extracted name and labels (`cluster.membership_healthy` with
//! `envoy.cluster_name="app-v2"`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use envoy_types::pb::envoy::service::metrics::v3::StreamMetricsResponse;
use envoy_types::pb::io::prometheus::client::{Metric, MetricFamily, MetricType};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::Grpc;
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

use crate::analysis::Histogram;
use crate::intake::{self, Call, Rpc, StatsFlush};
use crate::server::{Metrics, Server, StreamKind};
use crate::tls::Peer;
use crate::xds::authorise;
use canary_router::metrics::REQUESTS;

const CLUSTER_TAG: &str = "envoy.cluster_name";

pub struct Sink {
    server: Arc<Server>,
}

/// One metric canaryctl uses, recognised from its family name and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// `cluster.<c>.upstream_rq_time`.
    Latency { cluster: String },
    /// `cluster.<c>.membership_healthy`.
    Healthy { cluster: String },
    /// `cluster.<c>.membership_total`.
    Hosts { cluster: String },
    /// `…canary_router_requests.rollout.<r>.version.<v>.reason.<why>`: requests the filter sent to `v`.
    Routed { rollout: String, version: String },
}

/// What a metric is, from its family name and its labels (Envoy's tags, when it emits them as labels).
pub fn reading_of(name: &str, labels: &[(&str, &str)]) -> Option<Reading> {
    reading_by(name, |key| {
        labels.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    })
}

/// Whether a family of this name can hold a metric canaryctl reads, whatever its labels: the families of a
/// flush that are decoded (most of a flush is metrics canaryctl does not read). Bytes, not text: it runs for
/// every family of every flush, and most names are ruled out before they are checked for UTF-8.
pub fn may_be_read(name: &[u8]) -> bool {
    let possible = ["upstream_rq_time", "membership_healthy", "membership_total"]
        .iter()
        .any(|suffix| name.ends_with(suffix.as_bytes()))
        || memchr::memmem::find(name, REQUESTS.as_bytes()).is_some();
    possible && std::str::from_utf8(name).is_ok_and(|name| reading_by(name, |_| Some("")).is_some())
}

fn reading_by<'a>(name: &str, label: impl Fn(&str) -> Option<&'a str>) -> Option<Reading> {
    let cluster_metric = |suffix: &str| -> Option<String> {
        if let Some(c) = name
            .strip_prefix("cluster.")
            .and_then(|rest| rest.strip_suffix(suffix))
            .and_then(|rest| rest.strip_suffix('.'))
            .filter(|c| !c.is_empty())
        {
            return Some(c.to_string());
        }
        // Tag-extracted: `cluster.<suffix>` with the cluster as a label.
        (name.strip_prefix("cluster.") == Some(suffix))
            .then(|| label(CLUSTER_TAG).map(str::to_string))
            .flatten()
    };
    if let Some(cluster) = cluster_metric("upstream_rq_time") {
        return Some(Reading::Latency { cluster });
    }
    if let Some(cluster) = cluster_metric("membership_healthy") {
        return Some(Reading::Healthy { cluster });
    }
    if let Some(cluster) = cluster_metric("membership_total") {
        return Some(Reading::Hosts { cluster });
    }
    let (rollout, version) = if name.ends_with(REQUESTS) {
        // Tag-extracted (the shipped stats_tags): rollout and version are labels.
        (label("rollout")?, label("version")?)
    } else {
        canary_router::metrics::parse_request_counter_name(name)?
    };
    Some(Reading::Routed {
        rollout: rollout.to_string(),
        version: version.to_string(),
    })
}

/// Envoy's histogram (milliseconds, buckets cumulative over the bounds) in microsecond bounds.
fn histogram_of(metric: &Metric) -> Option<Histogram> {
    let h = metric.histogram.as_ref()?;
    let at_most = h
        .bucket
        .iter()
        .filter_map(|b| {
            let bound = b.upper_bound?;
            (bound.is_finite() && bound >= 0.0).then(|| {
                (
                    (bound * 1000.0).round() as u64,
                    b.cumulative_count.unwrap_or(0),
                )
            })
        })
        .collect();
    Some(Histogram {
        count: h.sample_count.unwrap_or(0),
        at_most,
    })
}

/// A gauge's or counter's value as a count (None: absent, negative or not a number).
fn value_of(metric: &Metric, kind: Option<MetricType>) -> Option<u64> {
    let value = match kind {
        Some(MetricType::Gauge) => metric.gauge.as_ref()?.value?,
        Some(MetricType::Counter) => metric.counter.as_ref()?.value?,
        _ => return None,
    };
    (value.is_finite() && value >= 0.0).then(|| value.round() as u64)
}

/// Where a flush's readings go: the server, or a simulation's collector.
pub trait FlushReport {
    /// One Envoy's latency for a cluster in one flush interval.
    fn latency(&self, node: &str, cluster: &str, histogram: &Histogram);
    /// One Envoy's current hosts of a cluster.
    fn hosts(&self, node: &str, cluster: &str, healthy: u64, total: u64);
    /// Requests one Envoy's filter sent to a rollout's version since its previous flush.
    fn routed(&self, node: &str, rollout: &str, version: &str, requests: u64);
    /// The largest count one flush can plausibly hold; beyond it a reading is refused.
    fn max_count(&self) -> u64 {
        u64::MAX
    }
    /// A reading beyond [`FlushReport::max_count`]: refused, counted and logged.
    fn implausible(&self, _node: &str, _what: String) {}
}

impl FlushReport for Server {
    fn latency(&self, node: &str, cluster: &str, histogram: &Histogram) {
        self.report_latency(node, cluster, histogram);
    }
    fn hosts(&self, node: &str, cluster: &str, healthy: u64, total: u64) {
        self.report_hosts(node, cluster, healthy, total);
    }
    fn routed(&self, node: &str, rollout: &str, version: &str, requests: u64) {
        self.report_routed(node, rollout, version, requests);
    }
    fn max_count(&self) -> u64 {
        // A flush covers at most a minute (Envoy's stats_flush_interval is seconds).
        self.max_report_rate.saturating_mul(60)
    }
    fn implausible(&self, node: &str, what: String) {
        self.refuse_report(node, what);
    }
}

/// What one stream remembers between flushes: the filter's counters' last values.
#[derive(Default)]
pub struct StreamState {
    last_routed: HashMap<String, u64>,
}

/// One flush of one Envoy (`node`), handed to the server: latency added as sent (interval histograms),
/// host gauges as the latest values, the filter's counters as differences from this stream's previous flush
/// (the first flush of a stream only sets the starting point).
pub fn read_flush(
    server: &impl FlushReport,
    node: &str,
    families: &[MetricFamily],
    state: &mut StreamState,
) {
    let mut routed: HashMap<(String, String), u64> = HashMap::new();
    let mut hosts: HashMap<String, (Option<u64>, Option<u64>)> = HashMap::new();
    for family in families {
        let Some(name) = family.name.as_deref() else {
            continue;
        };
        let kind = MetricType::try_from(family.r#type.unwrap_or_default()).ok();
        for metric in &family.metric {
            let labels: Vec<(&str, &str)> = metric
                .label
                .iter()
                .filter_map(|l| Some((l.name.as_deref()?, l.value.as_deref()?)))
                .collect();
            let Some(reading) = reading_of(name, &labels) else {
                continue;
            };
            match reading {
                Reading::Latency { cluster } => {
                    if let Some(h) = histogram_of(metric) {
                        if h.count > server.max_count() {
                            server.implausible(
                                node,
                                format!("{name} of {cluster}: {} requests in one flush", h.count),
                            );
                            continue;
                        }
                        server.latency(node, &cluster, &h);
                    }
                }
                Reading::Healthy { cluster } => {
                    hosts.entry(cluster).or_default().0 = value_of(metric, kind);
                }
                Reading::Hosts { cluster } => {
                    hosts.entry(cluster).or_default().1 = value_of(metric, kind);
                }
                Reading::Routed { rollout, version } => {
                    let Some(now) = value_of(metric, kind) else {
                        continue;
                    };
                    // One counter per reason (and per label set): each differenced on its own.
                    let mut key = name.to_string();
                    for (k, v) in &labels {
                        key.push_str(&format!(",{k}={v}"));
                    }
                    let since = match state.last_routed.insert(key, now) {
                        // A smaller value: the counter was reset (a new config defines it again).
                        Some(before) if now >= before => now - before,
                        Some(_) => now,
                        None => 0,
                    };
                    if since > server.max_count() {
                        server.implausible(
                            node,
                            format!("{name} of {rollout}/{version}: {since} requests in one flush"),
                        );
                        continue;
                    }
                    let total = routed.entry((rollout, version)).or_default();
                    *total = total.saturating_add(since);
                }
            }
        }
    }
    for (cluster, (healthy, total)) in hosts {
        if let (Some(healthy), Some(total)) = (healthy, total) {
            server.hosts(node, &cluster, healthy.min(total), total);
        }
    }
    for ((rollout, version), n) in routed {
        server.routed(node, &rollout, &version, n);
    }
}

impl Rpc for Sink {
    const SERVICE: &'static str = "envoy.service.metrics.v3.MetricsService";
    const PATH: &'static str = "/envoy.service.metrics.v3.MetricsService/StreamMetrics";
    type Request = StatsFlush;
    type Response = StreamMetricsResponse;
    /// A flush holds every stat Envoy marks used: up to 16 MiB.
    const MAX_REQUEST_BYTES: usize = 16 << 20;

    fn serve(
        self: Arc<Self>,
        mut grpc: Grpc<ProstCodec<StreamMetricsResponse, StatsFlush>>,
        request: http::Request<Body>,
    ) -> Pin<Box<dyn Future<Output = http::Response<Body>> + Send>> {
        Box::pin(async move {
            let call = Call(move |request| self.clone().stream_metrics(request));
            grpc.client_streaming(call, request).await
        })
    }
}

/// The families of a flush canaryctl reads ([`may_be_read`]), decoded. One that does not decode is refused
/// (counted and logged) and the rest of the flush is read.
fn families_read(server: &Server, node: &str, flush: &[Bytes]) -> Vec<MetricFamily> {
    let mut read = Vec::new();
    for encoded in flush {
        let Some(name) = intake::family_name(encoded) else {
            continue;
        };
        if !may_be_read(&name) {
            continue;
        }
        let name = String::from_utf8_lossy(&name);
        match intake::family(encoded) {
            Ok(decoded) => read.push(decoded),
            Err(error) => server.refuse_report(
                node,
                format!("{}: {error}", canary_router::text::quote(&name)),
            ),
        }
    }
    read
}

impl Sink {
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }

    async fn stream_metrics(
        self: Arc<Self>,
        request: Request<Streaming<StatsFlush>>,
    ) -> Result<Response<StreamMetricsResponse>, Status> {
        let peer = Peer::of(&request);
        let mut inbound = request.into_inner();
        let mut node: Option<String> = None;
        let mut cluster = String::new();
        let mut state = StreamState::default();
        let result = async {
            while let Some(message) = inbound.message().await? {
                let sent = message.identifier.as_ref().and_then(|i| i.node.as_ref());
                authorise(&self.server, &peer, sent, node.is_some())?;
                if node.is_none() {
                    // Envoy names its node in a stream's first message only.
                    let id;
                    (id, cluster) = peer.reporter(sent);
                    self.server.stream_opened(&id, StreamKind::Stats);
                    node = Some(id);
                }
                Metrics::bump(&self.server.metrics.stats_flushes);
                let id = node.as_deref().unwrap_or_default();
                if !self
                    .server
                    .admit_report(peer.addr, id, &cluster, "a stats flush")
                {
                    continue;
                }
                self.server.stats_reported(id);
                self.server.metrics.last_stats_unix.store(
                    crate::state::now_unix(),
                    std::sync::atomic::Ordering::Relaxed,
                );
                let families = families_read(&self.server, id, &message.envoy_metrics);
                read_flush(self.server.as_ref(), id, &families, &mut state);
            }
            Ok::<_, Status>(())
        }
        .await;
        if let Some(id) = &node {
            self.server.stream_closed(id, StreamKind::Stats);
        }
        result.map(|()| Response::new(StreamMetricsResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::io::prometheus::client::{Bucket, Histogram as PromHistogram};

    #[test]
    fn a_flush_s_families_are_decoded_only_if_their_name_can_hold_a_reading() {
        for name in [
            "cluster.app-v1.upstream_rq_time",
            "cluster.upstream_rq_time",
            "cluster.app-v2.membership_healthy",
            "cluster.membership_total",
            "wasmcustom.canary_router_requests",
            "wasmcustom.canary_router_requests.rollout.web.version.v2.reason.sticky",
        ] {
            assert!(may_be_read(name.as_bytes()), "{name}");
        }
        for name in [
            "cluster.app-v1.upstream_rq_total",
            "cluster..upstream_rq_time",
            "http.ingress.downstream_rq_time",
            "server.wip_protos",
            "wasmcustom.canary_router_requests.rollout.web",
            "",
        ] {
            assert!(!may_be_read(name.as_bytes()), "{name}");
        }
        // A name of the right shape that is not UTF-8 is not read.
        assert!(!may_be_read(b"cluster.app-\xffv2.upstream_rq_time"));
        assert!(may_be_read(b"cluster.app-v2.upstream_rq_time"));
    }

    #[test]
    fn the_metrics_canaryctl_uses_are_recognised_in_both_of_envoy_s_naming_forms() {
        let latency = |c: &str| Some(Reading::Latency { cluster: c.into() });
        assert_eq!(
            reading_of("cluster.app-v1.upstream_rq_time", &[]),
            latency("app-v1")
        );
        assert_eq!(
            reading_of("cluster.a.b.upstream_rq_time", &[]),
            latency("a.b")
        );
        assert_eq!(reading_of("cluster..upstream_rq_time", &[]), None);
        assert_eq!(reading_of("http.ingress.downstream_rq_time", &[]), None);
        assert_eq!(
            reading_of(
                "cluster.upstream_rq_time",
                &[("envoy.cluster_name", "app-v2")]
            ),
            latency("app-v2")
        );
        assert_eq!(
            reading_of("cluster.app-v2.membership_healthy", &[]),
            Some(Reading::Healthy {
                cluster: "app-v2".into()
            })
        );
        assert_eq!(
            reading_of(
                "cluster.membership_total",
                &[("envoy.cluster_name", "app-v2")]
            ),
            Some(Reading::Hosts {
                cluster: "app-v2".into()
            })
        );
        assert_eq!(reading_of("cluster.app-v2.membership_degraded", &[]), None);
        let routed = |r: &str, v: &str| {
            Some(Reading::Routed {
                rollout: r.into(),
                version: v.into(),
            })
        };
        assert_eq!(
            reading_of(
                "wasmcustom.canary_router_requests.rollout.web.version.v2.reason.sticky",
                &[]
            ),
            routed("web", "v2")
        );
        assert_eq!(
            reading_of(
                "canary_router_native.canary_router_requests.rollout.api.version.1.1-rc.1.reason.rule",
                &[]
            ),
            routed("api", "1.1-rc.1")
        );
        assert_eq!(
            reading_of("wasmcustom.canary_router_requests.reason.no_match", &[]),
            None
        );
        assert_eq!(
            reading_of(
                "canary_router_requests",
                &[("rollout", "web"), ("version", "v2"), ("reason", "sticky")]
            ),
            routed("web", "v2")
        );
    }

    #[test]
    fn histograms_are_read_in_microseconds_with_their_count() {
        let bucket = |le: f64, n: u64| Bucket {
            upper_bound: Some(le),
            cumulative_count: Some(n),
            ..Default::default()
        };
        let metric = Metric {
            histogram: Some(PromHistogram {
                sample_count: Some(10),
                bucket: vec![bucket(0.5, 2), bucket(5.0, 9), bucket(f64::INFINITY, 10)],
                ..Default::default()
            }),
            ..Default::default()
        };
        let h = histogram_of(&metric).unwrap();
        assert_eq!(h.count, 10);
        assert_eq!(
            h.at_most.into_iter().collect::<Vec<_>>(),
            vec![(500, 2), (5000, 9)]
        );
    }

    use crate::analysis::tests::Rng;

    /// Envoy's default histogram buckets (ms): what `supportedBuckets()` sends with every histogram.
    const ENVOY_BUCKETS_MS: [f64; 19] = [
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ];

    /// One histogram as Envoy 1.40's `flushHistogram` builds it from `intervalStatistics()`: the samples
    /// of this flush interval only, with a cumulative count per supported bound.
    fn envoy_histogram_family(cluster: &str, samples_ms: &[f64]) -> MetricFamily {
        let bucket = ENVOY_BUCKETS_MS
            .iter()
            .map(|&bound| Bucket {
                upper_bound: Some(bound),
                cumulative_count: Some(samples_ms.iter().filter(|&&x| x <= bound).count() as u64),
                ..Default::default()
            })
            .collect();
        MetricFamily {
            name: Some(format!("cluster.{cluster}.upstream_rq_time")),
            r#type: Some(MetricType::Histogram as i32),
            metric: vec![Metric {
                histogram: Some(PromHistogram {
                    sample_count: Some(samples_ms.len() as u64),
                    sample_sum: Some(samples_ms.iter().sum()),
                    bucket,
                    ..Default::default()
                }),
                timestamp_ms: Some(0),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// What a tick collects from the flushes that arrived in it (the server's per-tick sum).
    #[derive(Default)]
    struct Collector(std::cell::RefCell<std::collections::BTreeMap<String, Histogram>>);

    impl FlushReport for Collector {
        fn latency(&self, _node: &str, cluster: &str, histogram: &Histogram) {
            if histogram.count > 0 {
                self.0
                    .borrow_mut()
                    .entry(cluster.to_string())
                    .or_default()
                    .add(histogram);
            }
        }
        fn hosts(&self, _: &str, _: &str, _: u64, _: u64) {}
        fn routed(&self, _: &str, _: &str, _: &str, _: u64) {}
    }

    /// How canaryctl read the stream before: as cumulative histograms, differenced from the previous flush
    /// of the same Envoy, a smaller one taken as a restart.
    fn as_if_cumulative(now: &Histogram, earlier: Option<&Histogram>) -> Histogram {
        let Some(earlier) = earlier else {
            return Histogram::default();
        };
        if now.count < earlier.count {
            return now.clone();
        }
        Histogram {
            count: now.count - earlier.count,
            at_most: now
                .at_most
                .iter()
                .map(|(b, n)| {
                    (
                        *b,
                        n.saturating_sub(earlier.at_most.get(b).copied().unwrap_or(0)),
                    )
                })
                .collect(),
        }
    }

    /// One simulated Envoy: its next stats flush, this interval's latencies (ms), its stream as canaryctl
    /// reads it, and (for the old reading) its previous flush per cluster.
    struct SimEnvoy {
        next_flush: f64,
        stable: Vec<f64>,
        canary: Vec<f64>,
        state: StreamState,
        previous: [Option<Histogram>; 2],
    }

    /// The simulated fleet's result: rollouts rolled back on latency, and the latency ticks' request counts
    /// against the true counts.
    struct Outcome {
        latency_rollbacks: usize,
        /// Seconds from the start to each latency rollback.
        rolled_back_after: Vec<u64>,
        counted: u64,
        served: u64,
    }

    /// Rollouts against `envoys` Envoys that stream their stats every second (with a little drift, each at
    /// its own phase to canaryctl's ticks), 150 requests a second each; both versions' latency log-normal
    /// with a 0.8 ms median, the canary's times `slower` (1: A/A). Each flush goes through `read_flush` as
    /// Envoy sends it; `misread` replays the old reading.
    fn rollouts(runs: usize, envoys: usize, misread: bool, seed: u64, slower: f64) -> Outcome {
        use crate::rollout::{Phase, Plan, Rollout, Source};
        let mut rng = Rng(seed);
        let mut outcome = Outcome {
            latency_rollbacks: 0,
            rolled_back_after: Vec::new(),
            counted: 0,
            served: 0,
        };
        const SLOT_S: f64 = 0.01;
        for _ in 0..runs {
            let plan = Plan {
                rollout: "web".into(),
                canary: "v2".into(),
                stable: "v1".into(),
                stable_cluster: "app-v1".into(),
                canary_cluster: "app-v2".into(),
                steps: ["20", "50", "100"]
                    .iter()
                    .map(|s| s.parse().unwrap())
                    .collect(),
                hold_s: 60,
                max_step_s: 600,
                alpha: 0.05,
                min_canary_requests: 100,
                fleet_clusters: Vec::new(),
                allow_missing_envoys: false,
                canary_route_cluster: Some("app-v2-or-v1".into()),
                latency: true,
                latency_tolerance: crate::rollout::default_latency_tolerance(),
                evidence: Source::Envoy,
                prometheus_selector: String::new(),
                findings: true,
                metrics: Vec::new(),
            };
            let mut fleet: Vec<SimEnvoy> = (0..envoys)
                .map(|_| SimEnvoy {
                    next_flush: rng.uniform(),
                    stable: Vec::new(),
                    canary: Vec::new(),
                    state: StreamState::default(),
                    previous: [None, None],
                })
                .collect();
            let mut rollout: Option<Rollout> = None;
            let mut baseline = Histogram::default();
            let mut share = 0.0;
            let (start_s, end_s) = (60u64, 600u64);
            for second in 0..end_s {
                let collector = Collector::default();
                let mut served = [0u64; 2];
                for slot in 0..100 {
                    let t = second as f64 + slot as f64 * SLOT_S;
                    for envoy in fleet.iter_mut() {
                        for _ in 0..rng.poisson(150.0 * SLOT_S) {
                            // Both versions: log-normal, median 0.8 ms.
                            let ms = 0.8 * (0.6 * rng.normal()).exp();
                            if rng.uniform() < share {
                                envoy.canary.push(ms * slower);
                                served[1] += 1;
                            } else {
                                envoy.stable.push(ms);
                                served[0] += 1;
                            }
                        }
                        if t >= envoy.next_flush {
                            // Envoy's flush timer: about a second, drifting by the time a flush takes.
                            envoy.next_flush += 1.0 + 0.02 * rng.normal().abs();
                            let flush = vec![
                                envoy_histogram_family("app-v1", &envoy.stable),
                                envoy_histogram_family("app-v2-or-v1", &envoy.canary),
                            ];
                            envoy.stable.clear();
                            envoy.canary.clear();
                            if misread {
                                for (i, family) in flush.iter().enumerate() {
                                    let now = histogram_of(&family.metric[0]).unwrap();
                                    let since = as_if_cumulative(&now, envoy.previous[i].as_ref());
                                    let cluster = if i == 0 { "app-v1" } else { "app-v2-or-v1" };
                                    collector.latency("front-1", cluster, &since);
                                    envoy.previous[i] = Some(now);
                                }
                            } else {
                                read_flush(&collector, "front", &flush, &mut envoy.state);
                            }
                        }
                    }
                }
                let latency = collector.0.into_inner();
                let now = second;
                let Some(r) = rollout.as_mut() else {
                    if let Some(h) = latency.get("app-v1") {
                        baseline.add(h);
                    }
                    if now + 1 == start_s {
                        let (r, _) = Rollout::start(plan.clone(), now, baseline.clone()).unwrap();
                        share = r.percent().basis_points() as f64 / 10_000.0;
                        rollout = Some(r);
                    }
                    continue;
                };
                let tick = crate::analysis::Tick {
                    stable_requests: served[0],
                    canary_requests: served[1],
                    stable_bad: 0,
                    canary_bad: 0,
                };
                let (stable, canary) = (
                    latency.get("app-v1").cloned().unwrap_or_default(),
                    latency.get("app-v2-or-v1").cloned().unwrap_or_default(),
                );
                if now >= r.counted_from_unix {
                    outcome.counted += stable.count + canary.count;
                    outcome.served += served[0] + served[1];
                }
                let covered = r.observe_coverage(Vec::new(), now);
                let action = r
                    .observe_errors(Some(tick), covered, now)
                    .or_else(|| {
                        (stable.count + canary.count > 0)
                            .then(|| r.observe_latency(&stable, &canary, now))
                            .flatten()
                    })
                    .or_else(|| r.advance(now));
                share = r.percent().basis_points() as f64 / 10_000.0;
                if r.phase == Phase::RolledBack {
                    assert!(
                        r.reason.as_deref().unwrap_or("").starts_with("latency: "),
                        "{:?}",
                        r.reason
                    );
                    outcome.latency_rollbacks += 1;
                    outcome.rolled_back_after.push(now - r.started_unix);
                    break;
                }
                if r.phase == Phase::Promoted
                    || matches!(action, Some(crate::rollout::Action::Promote))
                {
                    break;
                }
            }
        }
        outcome
    }

    #[test]
    fn a_a_rollouts_on_the_stream_envoy_sends_count_every_request_and_stay_within_the_latency_budget(
    ) {
        // The exact stream: each flush an interval histogram of Envoy's buckets, two Envoys at their own
        // phases. Read as sent, the latency ticks count what was served, and equal versions are rolled back
        // on latency well within the budget (each latency test's α is 0.05 / 5 = 0.01).
        let runs = 300;
        let read = rollouts(runs, 2, false, 41, 1.0);
        let ratio = read.counted as f64 / read.served as f64;
        assert!(
            (0.99..=1.01).contains(&ratio),
            "latency counted {ratio:.3} of the requests"
        );
        let rate = read.latency_rollbacks as f64 / runs as f64;
        assert!(rate <= 0.01, "A/A rolled back on latency {rate}");
        // The same stream read as cumulative (canaryctl before): a third to a half of the requests counted,
        // and equal versions rolled back on latency far more often than the budget allows.
        let misread = rollouts(runs, 2, true, 41, 1.0);
        let ratio = misread.counted as f64 / misread.served as f64;
        assert!(ratio < 0.7, "misread counted {ratio:.3}");
        eprintln!(
            "A/A over {runs} rollouts: read as sent {} latency rollbacks, counted {:.3}; misread {} ({:.3})",
            read.latency_rollbacks,
            read.counted as f64 / read.served as f64,
            misread.latency_rollbacks,
            ratio
        );
    }

    #[test]
    fn a_canary_three_times_slower_is_caught_within_seconds_on_the_stream_envoy_sends() {
        // Time to detect, on the same stream: the canary's latency 3× stable's at 20 % of the traffic.
        let runs = 100;
        let slow = rollouts(runs, 2, false, 43, 3.0);
        assert_eq!(slow.latency_rollbacks, runs, "every 3× canary rolled back");
        let mut after = slow.rolled_back_after.clone();
        after.sort_unstable();
        let (median, worst) = (after[after.len() / 2], after[after.len() - 1]);
        eprintln!("3× slower canary: rolled back after {median} s (median), {worst} s (worst)");
        // The warm-up (2–3 s, then the step's first 100 canary requests) and a few seconds of evidence.
        assert!(
            median <= 10 && worst <= 20,
            "median {median} s, worst {worst} s"
        );
    }
}
