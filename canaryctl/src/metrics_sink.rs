//! Envoy's stats stream (the MetricsService stat sink) on the gRPC port: canaryctl keeps only the latency
//! histograms of upstream clusters (`cluster.<name>.upstream_rq_time`, in Envoy's buckets), which a
//! progressive rollout compares canary with stable on. Envoy sends cumulative histograms at each stats flush;
//! the difference from that Envoy's previous flush is what happened since, and the differences of every Envoy
//! are added up per cluster.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::service::metrics::v3::metrics_service_server::MetricsService;
use envoy_types::pb::envoy::service::metrics::v3::{StreamMetricsMessage, StreamMetricsResponse};
use envoy_types::pb::io::prometheus::client::MetricFamily;
use tonic::{Request, Response, Status, Streaming};

use crate::analysis::Histogram;
use crate::server::{Metrics, Server};
use crate::tls::Peer;
use crate::xds::authorise;

const PREFIX: &str = "cluster.";
const SUFFIX: &str = ".upstream_rq_time";

pub struct Sink {
    server: Arc<Server>,
}

impl Sink {
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }
}

/// The cluster of an upstream latency histogram, from its stat name.
fn cluster_of(name: &str) -> Option<&str> {
    name.strip_prefix(PREFIX)?
        .strip_suffix(SUFFIX)
        .filter(|c| !c.is_empty())
}

/// Envoy's histogram (milliseconds, cumulative buckets) in microsecond bounds.
fn histogram_of(family: &MetricFamily) -> Option<Histogram> {
    let h = family.metric.first()?.histogram.as_ref()?;
    let at_most = h
        .bucket
        .iter()
        .filter_map(|b| {
            let bound = b.upper_bound?;
            bound.is_finite().then(|| {
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

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn stream_metrics(
        &self,
        request: Request<Streaming<StreamMetricsMessage>>,
    ) -> Result<Response<StreamMetricsResponse>, Status> {
        let peer = Peer::of(&request);
        let mut inbound = request.into_inner();
        let mut identified = false;
        // This Envoy's last cumulative histogram per cluster.
        let mut last: HashMap<String, Histogram> = HashMap::new();
        while let Some(message) = inbound.message().await? {
            let node = message.identifier.as_ref().and_then(|i| i.node.as_ref());
            authorise(&self.server, &peer, node, identified)?;
            identified = true;
            Metrics::bump(&self.server.metrics.stats_flushes);
            self.server.metrics.last_stats_unix.store(
                crate::state::now_unix(),
                std::sync::atomic::Ordering::Relaxed,
            );
            for family in &message.envoy_metrics {
                let Some(cluster) = family.name.as_deref().and_then(cluster_of) else {
                    continue;
                };
                let Some(now) = histogram_of(family) else {
                    continue;
                };
                let since = match last.get(cluster) {
                    Some(earlier) => now.since(earlier),
                    None => Histogram::default(), // the first flush: cumulative since Envoy started
                };
                self.server.report_latency(cluster, &since);
                last.insert(cluster.to_string(), now);
            }
        }
        Ok(Response::new(StreamMetricsResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::io::prometheus::client::{Bucket, Histogram as PromHistogram, Metric};

    #[test]
    fn only_upstream_latency_histograms_are_read_in_microseconds() {
        assert_eq!(
            cluster_of("cluster.app-v1.upstream_rq_time"),
            Some("app-v1")
        );
        assert_eq!(cluster_of("cluster.a.b.upstream_rq_time"), Some("a.b"));
        assert_eq!(cluster_of("cluster..upstream_rq_time"), None);
        assert_eq!(cluster_of("http.ingress.downstream_rq_time"), None);
        let bucket = |le: f64, n: u64| Bucket {
            upper_bound: Some(le),
            cumulative_count: Some(n),
            ..Default::default()
        };
        let family = MetricFamily {
            name: Some("cluster.app-v1.upstream_rq_time".into()),
            metric: vec![Metric {
                histogram: Some(PromHistogram {
                    sample_count: Some(10),
                    bucket: vec![bucket(0.5, 2), bucket(5.0, 9), bucket(f64::INFINITY, 10)],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let h = histogram_of(&family).unwrap();
        assert_eq!(h.count, 10);
        assert_eq!(
            h.at_most.into_iter().collect::<Vec<_>>(),
            vec![(500, 2), (5000, 9)]
        );
    }
}
