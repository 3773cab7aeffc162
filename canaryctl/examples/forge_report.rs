//! A test tool, not part of the product: sends canaryctl's gRPC port one load report (LRS) the way a hostile
//! or broken peer would, so that the tests can check it is refused. Plaintext only.
//!
//! forge_report <xds host:port> <node id> <node cluster> <upstream cluster> <successful requests> [errors]

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterStats, UpstreamLocalityStats};
use envoy_types::pb::envoy::service::load_stats::v3::load_reporting_service_client::LoadReportingServiceClient;
use envoy_types::pb::envoy::service::load_stats::v3::LoadStatsRequest;
use envoy_types::pb::google::protobuf::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, node_id, node_cluster, cluster, ok, rest @ ..] = args.as_slice() else {
        return Err("usage: forge_report <xds host:port> <node id> <node cluster> <upstream cluster> <successful> [errors]".into());
    };
    let errors: u64 = rest.first().map(|e| e.parse()).transpose()?.unwrap_or(0);
    let node = Node {
        id: node_id.clone(),
        cluster: node_cluster.clone(),
        ..Default::default()
    };
    let hello = LoadStatsRequest {
        node: Some(node.clone()),
        cluster_stats: Vec::new(),
    };
    let report = LoadStatsRequest {
        node: Some(node),
        cluster_stats: vec![ClusterStats {
            cluster_name: cluster.clone(),
            upstream_locality_stats: vec![UpstreamLocalityStats {
                total_successful_requests: ok.parse()?,
                total_error_requests: errors,
                ..Default::default()
            }],
            load_report_interval: Some(Duration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        }],
    };
    let mut client = LoadReportingServiceClient::connect(format!("http://{addr}")).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(hello).await?;
    let mut answers = client
        .stream_load_stats(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // canaryctl answers the first message with the interval it wants; then the report goes.
    answers.message().await?;
    tx.send(report).await?;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    println!("sent");
    Ok(())
}
