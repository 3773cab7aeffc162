//! The two report streams Envoy sends every second (load reports, stats flushes), served with message types
//! of our own that decode only what canaryctl reads.
//!
//! Why: Envoy 1.40 puts its whole node in every load report (61 KB with the shipped bootstrap: it lists the
//! 516 extensions of its build) and a stats flush carries every metric Envoy marks used. Decoded whole, with
//! Envoy's generated types, a load report cost 182 µs and a 15 KB flush 89 µs: one canaryctl spent a full
//! core on 1,000 reporting Envoys. These types are wire-compatible subsets of Envoy's messages: a load report's
//! node and a flush's metric families are declared as bytes (the same wire form as an embedded message), so
//! decoding passes over them by their length and keeps them as slices of the received buffer; the node is read
//! when a stream must be named or authorised, and a family only if its name is one canaryctl reads.
//!
//! [`Served`] puts an [`Rpc`] on tonic's router: tonic's own `Grpc` does the framing, compression and limits,
//! with `tonic_prost`'s codec over these types, as Envoy's generated services do over theirs.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterStats;
use envoy_types::pb::io::prometheus::client::MetricFamily;
use prost::Message;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::{Grpc, NamedService};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

/// Of Envoy's `config.core.v3.Node`, the two fields canaryctl reads (tags 1 and 2); the rest is skipped.
#[derive(Clone, PartialEq, Message)]
pub struct NodeName {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub cluster: String,
}

/// An Envoy's node as far as authorising and naming a stream go: Envoy's whole `Node` (ADS, access logs) or
/// our [`NodeName`] (the report streams).
pub trait Named {
    fn id(&self) -> &str;
    fn cluster(&self) -> &str;
}

impl Named for NodeName {
    fn id(&self) -> &str {
        &self.id
    }
    fn cluster(&self) -> &str {
        &self.cluster
    }
}

impl Named for envoy_types::pb::envoy::config::core::v3::Node {
    fn id(&self) -> &str {
        &self.id
    }
    fn cluster(&self) -> &str {
        &self.cluster
    }
}

/// `service.load_stats.v3.LoadStatsRequest`: the node left encoded (one length to skip, not 516 extensions
/// to walk; [`LoadReport::node_name`] reads it when it must) and the clusters' stats.
#[derive(Clone, PartialEq, Message)]
pub struct LoadReport {
    #[prost(bytes = "bytes", optional, tag = "1")]
    pub node: Option<Bytes>,
    #[prost(message, repeated, tag = "2")]
    pub cluster_stats: Vec<ClusterStats>,
}

impl LoadReport {
    /// The node's id and cluster (None: no node, or one that does not decode).
    pub fn node_name(&self) -> Option<NodeName> {
        NodeName::decode(self.node.clone()?).ok()
    }
}

/// `service.metrics.v3.StreamMetricsMessage`, its metric families left encoded: a flush carries every
/// metric Envoy marks used (106 families from an idle Envoy, more under traffic) and canaryctl reads a few,
/// picked by name ([`family_name`]).
#[derive(Clone, PartialEq, Message)]
pub struct StatsFlush {
    #[prost(message, optional, tag = "1")]
    pub identifier: Option<Identifier>,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub envoy_metrics: Vec<Bytes>,
}

/// `service.metrics.v3.StreamMetricsMessage.Identifier`.
#[derive(Clone, PartialEq, Message)]
pub struct Identifier {
    #[prost(message, optional, tag = "1")]
    pub node: Option<NodeName>,
}

/// Of `io.prometheus.client.MetricFamily` (proto2), its name only.
#[derive(Clone, PartialEq, Message)]
struct FamilyName {
    #[prost(bytes = "bytes", optional, tag = "1")]
    name: Option<Bytes>,
}

/// An encoded metric family's name, read without decoding its metrics (None: no name). Its bytes as sent:
/// whether they are UTF-8 is checked only for the few names that may be read.
pub fn family_name(family: &Bytes) -> Option<Bytes> {
    FamilyName::decode(family.clone()).ok()?.name
}

/// An encoded metric family, decoded as Envoy's generated type.
pub fn family(family: &Bytes) -> Result<MetricFamily, prost::DecodeError> {
    MetricFamily::decode(family.clone())
}

/// One streaming method of a gRPC service, with our own message types.
pub trait Rpc: Send + Sync + 'static {
    /// The service's full name (`envoy.service.load_stats.v3.LoadReportingService`).
    const SERVICE: &'static str;
    /// The method's path (`/<service>/<method>`).
    const PATH: &'static str;
    type Request: Message + Default + Send + 'static;
    type Response: Message + Default + Send + 'static;
    /// The largest request message taken (tonic's default: 4 MiB).
    const MAX_REQUEST_BYTES: usize = 4 << 20;
    /// Serves one call of the method through tonic's `grpc` (its `streaming` or `client_streaming`).
    fn serve(
        self: Arc<Self>,
        grpc: Grpc<ProstCodec<Self::Response, Self::Request>>,
        request: http::Request<Body>,
    ) -> Pin<Box<dyn Future<Output = http::Response<Body>> + Send>>;
}

/// An [`Rpc`] as a service tonic's router takes.
pub struct Served<R>(Arc<R>);

impl<R> Served<R> {
    pub fn new(rpc: Arc<R>) -> Self {
        Self(rpc)
    }
}

impl<R> Clone for Served<R> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<R: Rpc> NamedService for Served<R> {
    const NAME: &'static str = R::SERVICE;
}

impl<R: Rpc> tonic::codegen::Service<http::Request<Body>> for Served<R> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != R::PATH {
            let unknown = Status::unimplemented(format!("no method {}", request.uri().path()));
            return Box::pin(async move { Ok(unknown.into_http()) });
        }
        let rpc = self.0.clone();
        let grpc = Grpc::new(ProstCodec::default())
            .apply_max_message_size_config(Some(R::MAX_REQUEST_BYTES), None);
        Box::pin(async move { Ok(rpc.serve(grpc, request).await) })
    }
}

/// A handler of one call (a closure returning its future) as the service tonic's `Grpc` calls.
pub struct Call<F>(pub F);

impl<F, Fut, M, R> tonic::codegen::Service<Request<Streaming<M>>> for Call<F>
where
    F: FnMut(Request<Streaming<M>>) -> Fut,
    Fut: Future<Output = Result<Response<R>, Status>>,
{
    type Response = Response<R>;
    type Error = Status;
    type Future = Fut;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Streaming<M>>) -> Fut {
        (self.0)(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{Extension, Node};
    use envoy_types::pb::envoy::config::endpoint::v3::UpstreamLocalityStats;
    use envoy_types::pb::envoy::service::load_stats::v3::LoadStatsRequest;
    use envoy_types::pb::envoy::service::metrics::v3::{
        stream_metrics_message, StreamMetricsMessage,
    };
    use envoy_types::pb::io::prometheus::client::{Counter, LabelPair, Metric, MetricType};

    fn node() -> Node {
        Node {
            id: "front-1".into(),
            cluster: "edge".into(),
            user_agent_name: "envoy".into(),
            extensions: (0..600)
                .map(|i| Extension {
                    name: format!("envoy.extension.{i}"),
                    category: "envoy.filters.http".into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_load_report_reads_as_envoy_s_own_type_and_its_node_only_when_asked() {
        let sent = LoadStatsRequest {
            node: Some(node()),
            cluster_stats: vec![ClusterStats {
                cluster_name: "app-v2".into(),
                upstream_locality_stats: vec![UpstreamLocalityStats {
                    total_successful_requests: 41,
                    total_error_requests: 2,
                    ..Default::default()
                }],
                total_dropped_requests: 3,
                ..Default::default()
            }],
        };
        let read = LoadReport::decode(sent.encode_to_vec().as_slice()).unwrap();
        assert_eq!(read.cluster_stats, sent.cluster_stats);
        let name = read.node_name().unwrap();
        assert_eq!(
            (name.id.as_str(), name.cluster.as_str()),
            ("front-1", "edge")
        );
        let nameless = LoadStatsRequest { node: None, ..sent };
        assert_eq!(
            LoadReport::decode(nameless.encode_to_vec().as_slice())
                .unwrap()
                .node_name(),
            None
        );
    }

    #[test]
    fn a_stats_flush_keeps_its_families_encoded_until_one_is_asked_for() {
        let family_sent = MetricFamily {
            name: Some("cluster.app-v2.upstream_rq_retry".into()),
            help: Some("help text".into()),
            r#type: Some(MetricType::Counter as i32),
            metric: vec![Metric {
                label: vec![LabelPair {
                    name: Some("envoy.cluster_name".into()),
                    value: Some("app-v2".into()),
                }],
                counter: Some(Counter {
                    value: Some(7.0),
                    ..Default::default()
                }),
                timestamp_ms: Some(1_796_620_302_000),
                ..Default::default()
            }],
            ..Default::default()
        };
        let sent = StreamMetricsMessage {
            identifier: Some(stream_metrics_message::Identifier { node: Some(node()) }),
            envoy_metrics: vec![family_sent.clone(), MetricFamily::default()],
        };
        let read = StatsFlush::decode(sent.encode_to_vec().as_slice()).unwrap();
        assert_eq!(read.identifier.unwrap().node.unwrap().id, "front-1");
        assert_eq!(read.envoy_metrics.len(), 2);
        assert_eq!(
            family_name(&read.envoy_metrics[0]).as_deref(),
            Some(&b"cluster.app-v2.upstream_rq_retry"[..])
        );
        assert_eq!(family(&read.envoy_metrics[0]).unwrap(), family_sent);
        assert_eq!(family_name(&read.envoy_metrics[1]), None);
        // Its bytes as sent, UTF-8 or not. Not a family: refused when decoded, not before.
        assert_eq!(
            family_name(&Bytes::from_static(&[0x0a, 0x01, 0xff])).as_deref(),
            Some(&[0xff][..])
        );
        assert!(family(&Bytes::from_static(&[0x22, 0x05, 0x01])).is_err());
    }
}
