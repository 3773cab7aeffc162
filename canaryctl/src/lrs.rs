//! Envoy's load reports (LRS) on the gRPC port: per upstream cluster, the requests its hosts completed and how
//! many failed (5xx, resets, connect failures, timeouts). These are per-host counters, so they see the
//! attempts the canary → stable fallback hid from users, which per-cluster response-code stats do not.
//!
//! Each Envoy opens one stream; canaryctl asks for every cluster every second. A report carries the counts
//! since that Envoy's previous one, so the reports of every Envoy are simply added up per cluster. The cost
//! is one small message per Envoy per second, whatever the traffic.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::load_stats::v3::load_reporting_service_server::LoadReportingService;
use envoy_types::pb::envoy::service::load_stats::v3::{LoadStatsRequest, LoadStatsResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::server::{Metrics, Server, StreamKind};
use crate::tls::Peer;
use crate::xds::authorise;

/// How often Envoys report (the analysis ticks every second too).
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

pub struct Lrs {
    server: Arc<Server>,
}

impl Lrs {
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }
}

#[tonic::async_trait]
impl LoadReportingService for Lrs {
    type StreamLoadStatsStream = ReceiverStream<Result<LoadStatsResponse, Status>>;

    async fn stream_load_stats(
        &self,
        request: Request<Streaming<LoadStatsRequest>>,
    ) -> Result<Response<Self::StreamLoadStatsStream>, Status> {
        let peer = Peer::of(&request);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(2);
        let server = self.server.clone();
        tokio::spawn(async move {
            let mut node: Option<String> = None;
            while let Ok(Some(report)) = inbound.message().await {
                if let Err(status) = authorise(&server, &peer, report.node.as_ref(), node.is_some())
                {
                    let _ = tx.send(Err(status)).await;
                    break;
                }
                if node.is_none() {
                    let id = report
                        .node
                        .as_ref()
                        .map(|n| n.id.clone())
                        .unwrap_or_else(|| peer.addr.map(|a| a.to_string()).unwrap_or_default());
                    server.stream_opened(&id, StreamKind::Load);
                    node = Some(id);
                    let ask = LoadStatsResponse {
                        send_all_clusters: true,
                        load_reporting_interval: Some(
                            envoy_types::pb::google::protobuf::Duration {
                                seconds: REPORT_EVERY.as_secs() as i64,
                                nanos: 0,
                            },
                        ),
                        ..Default::default()
                    };
                    if tx.send(Ok(ask)).await.is_err() {
                        break;
                    }
                }
                Metrics::bump(&server.metrics.load_reports);
                for cluster in &report.cluster_stats {
                    let (mut ok, mut errors) = (0u64, 0u64);
                    for locality in &cluster.upstream_locality_stats {
                        ok = ok.saturating_add(locality.total_successful_requests);
                        errors = errors.saturating_add(locality.total_error_requests);
                    }
                    if ok > 0 || errors > 0 {
                        server.report_load(
                            node.as_deref().unwrap_or_default(),
                            &cluster.cluster_name,
                            ok.saturating_add(errors),
                            errors,
                        );
                    }
                }
            }
            if let Some(id) = &node {
                server.stream_closed(id, StreamKind::Load);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
