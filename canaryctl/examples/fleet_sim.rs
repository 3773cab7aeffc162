//! A benchmark tool, not part of the product: a fleet of simulated Envoys for `make bench-fleet`.
//!
//! fleet_sim capture <listen host:port> <dir>
//!     Poses as the control plane to one real Envoy (the shipped envoy-ads.yaml pointed at it) and saves what
//!     it sends, as protobuf: its node (`node.pb`, from its first ADS request), a load report with clusters
//!     (`lrs.pb`) and a stats flush (`metrics.pb`). Exits once it has all three.
//!
//! fleet_sim swarm <xds host:port[,host:port…]> <envoys> <dir> [ads|all] [minimal]
//!     Runs that many Envoys, each on its own connection (to the replicas in turn), each sending what the real
//!     one sent with its own node id (`sim-<i>`, cluster `edge`): ADS (the node in the first request only,
//!     as `set_node_on_first_message_only`), and with `all` a load report every interval canaryctl asks for
//!     (the node in every report, as Envoy 1.40 does) and a stats flush every second (the node in the first
//!     message). `minimal`: the node without its extension list. Prints one JSON line per config version
//!     once every Envoy received it: when the first, the median and the last got it (unix ms).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::load_stats::v3::load_reporting_service_server::{
    LoadReportingService, LoadReportingServiceServer,
};
use envoy_types::pb::envoy::service::load_stats::v3::{LoadStatsRequest, LoadStatsResponse};
use envoy_types::pb::envoy::service::metrics::v3::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use envoy_types::pb::envoy::service::metrics::v3::{StreamMetricsMessage, StreamMetricsResponse};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

const TYPED_EXTENSION_CONFIG: &str =
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";

type Error = Box<dyn std::error::Error + Send + Sync>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// -- capture ------------------------------------------------------------------------------------------

/// What the real Envoy sent, saved once each.
#[derive(Clone)]
struct Capture {
    dir: std::path::PathBuf,
    done: Arc<tokio::sync::Notify>,
}

impl Capture {
    fn save(&self, name: &str, bytes: Vec<u8>) {
        let path = self.dir.join(name);
        if !path.exists() {
            let _ = std::fs::write(&path, bytes);
            eprintln!("fleet_sim: captured {}", path.display());
        }
        if ["node.pb", "lrs.pb", "metrics.pb"]
            .iter()
            .all(|n| self.dir.join(n).exists())
        {
            self.done.notify_one();
        }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Capture {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let capture = self.clone();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let _keep = tx;
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(node) = message.node {
                    capture.save("node.pb", node.encode_to_vec());
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;
    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("state of the world only"))
    }
}

#[tonic::async_trait]
impl LoadReportingService for Capture {
    type StreamLoadStatsStream = ReceiverStream<Result<LoadStatsResponse, Status>>;
    async fn stream_load_stats(
        &self,
        request: Request<Streaming<LoadStatsRequest>>,
    ) -> Result<Response<Self::StreamLoadStatsStream>, Status> {
        let mut inbound = request.into_inner();
        let capture = self.clone();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let ask = LoadStatsResponse {
                send_all_clusters: true,
                load_reporting_interval: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..Default::default()
            };
            let _ = tx.send(Ok(ask)).await;
            while let Ok(Some(message)) = inbound.message().await {
                if !message.cluster_stats.is_empty() {
                    capture.save("lrs.pb", message.encode_to_vec());
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl MetricsService for Capture {
    async fn stream_metrics(
        &self,
        request: Request<Streaming<StreamMetricsMessage>>,
    ) -> Result<Response<StreamMetricsResponse>, Status> {
        let mut inbound = request.into_inner();
        while let Ok(Some(message)) = inbound.message().await {
            if message.identifier.is_some() && !message.envoy_metrics.is_empty() {
                self.save("metrics.pb", message.encode_to_vec());
            }
        }
        Ok(Response::new(StreamMetricsResponse {}))
    }
}

async fn capture(listen: &str, dir: &str) -> Result<(), Error> {
    std::fs::create_dir_all(dir)?;
    let capture = Capture {
        dir: dir.into(),
        done: Arc::new(tokio::sync::Notify::new()),
    };
    let done = capture.done.clone();
    let server = tonic::transport::Server::builder()
        .add_service(AggregatedDiscoveryServiceServer::new(capture.clone()))
        .add_service(LoadReportingServiceServer::new(capture.clone()))
        .add_service(MetricsServiceServer::new(capture).max_decoding_message_size(16 << 20))
        .serve(listen.parse()?);
    // Done once all three are saved: the Envoy's streams are dropped with the server.
    tokio::select! {
        served = server => served?,
        _ = done.notified() => {}
    }
    Ok(())
}

// -- swarm --------------------------------------------------------------------------------------------

/// Sends messages encoded once beforehand (each simulated Envoy's report is the same bytes every second), and
/// decodes the answers as `D`.
struct RawCodec<D>(std::marker::PhantomData<D>);

impl<D> Default for RawCodec<D> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

struct RawEncoder;
struct ProstDecoder<D>(std::marker::PhantomData<D>);

impl tonic::codec::Encoder for RawEncoder {
    type Item = bytes::Bytes;
    type Error = Status;
    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl<D: Message + Default> tonic::codec::Decoder for ProstDecoder<D> {
    type Item = D;
    type Error = Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<D>, Status> {
        D::decode(src)
            .map(Some)
            .map_err(|err| Status::internal(err.to_string()))
    }
}

impl<D: Message + Default + Send + 'static> tonic::codec::Codec for RawCodec<D> {
    type Encode = bytes::Bytes;
    type Decode = D;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder<D>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ProstDecoder<D> {
        ProstDecoder(std::marker::PhantomData)
    }
}

/// A client stream of pre-encoded messages on `path`.
async fn raw_stream<D: Message + Default + Send + 'static>(
    channel: tonic::transport::Channel,
    path: &'static str,
    messages: mpsc::Receiver<bytes::Bytes>,
) -> Result<Streaming<D>, Error> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let answer = grpc
        .streaming(
            Request::new(ReceiverStream::new(messages)),
            tonic::codegen::http::uri::PathAndQuery::from_static(path),
            RawCodec::<D>::default(),
        )
        .await?;
    Ok(answer.into_inner())
}

/// When each simulated Envoy received each version (unix ms).
#[derive(Default)]
struct Receipts {
    by_version: BTreeMap<u64, Vec<u64>>,
}

struct Swarm {
    envoys: usize,
    receipts: Mutex<Receipts>,
}

impl Swarm {
    fn received(&self, version: u64, at: u64) {
        let mut receipts = self
            .receipts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let times = receipts.by_version.entry(version).or_default();
        times.push(at);
        if times.len() == self.envoys {
            times.sort_unstable();
            let at = |i: usize| times.get(i).copied().unwrap_or_default();
            println!(
                "{{\"version\": {version}, \"envoys\": {}, \"first_unix_ms\": {}, \"p50_unix_ms\": {}, \"last_unix_ms\": {}}}",
                times.len(),
                at(0),
                at(times.len() / 2),
                at(times.len() - 1)
            );
        }
    }
}

/// The captured node as simulated Envoy `i`.
fn node_of(template: &Node, i: usize, minimal: bool) -> Node {
    let mut node = template.clone();
    node.id = format!("sim-{i}");
    node.cluster = "edge".to_string();
    if minimal {
        node.extensions.clear();
    }
    node
}

async fn ads(
    channel: tonic::transport::Channel,
    node: Node,
    swarm: Arc<Swarm>,
) -> Result<(), Error> {
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(node),
        type_url: TYPED_EXTENSION_CONFIG.to_string(),
        resource_names: vec!["canary-router".to_string()],
        ..Default::default()
    })
    .await?;
    let mut answers = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(answer) = answers.message().await? {
        let at = now_ms();
        if let Ok(version) = answer.version_info.parse::<u64>() {
            swarm.received(version, at);
        }
        tx.send(DiscoveryRequest {
            version_info: answer.version_info,
            response_nonce: answer.nonce,
            type_url: answer.type_url,
            resource_names: vec!["canary-router".to_string()],
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}

async fn lrs(
    channel: tonic::transport::Channel,
    node: Node,
    report: LoadStatsRequest,
) -> Result<(), Error> {
    let (tx, rx) = mpsc::channel(2);
    let hello = LoadStatsRequest {
        node: Some(node.clone()),
        cluster_stats: Vec::new(),
    };
    tx.send(hello.encode_to_vec().into()).await?;
    let mut answers: Streaming<LoadStatsResponse> = raw_stream(
        channel,
        "/envoy.service.load_stats.v3.LoadReportingService/StreamLoadStats",
        rx,
    )
    .await?;
    // As Envoy does: report every interval the server asked for, and on a new answer (a new pace) the next
    // report comes one new interval after it.
    let interval_of = |asked: &LoadStatsResponse| {
        let every = asked
            .load_reporting_interval
            .map_or(Duration::from_secs(1), |d| {
                Duration::from_secs(d.seconds.max(0) as u64)
                    + Duration::from_nanos(d.nanos.max(0) as u64)
            });
        every.max(Duration::from_millis(100))
    };
    let asked = answers.message().await?.ok_or("no LRS answer")?;
    let mut every = interval_of(&asked);
    // Envoy 1.40 sends its node in every report.
    let mut report = report;
    report.node = Some(node);
    let report: bytes::Bytes = report.encode_to_vec().into();
    let mut next = tokio::time::Instant::now() + every;
    loop {
        tokio::select! {
            answer = answers.message() => match answer? {
                Some(asked) => {
                    every = interval_of(&asked);
                    next = tokio::time::Instant::now() + every;
                }
                None => return Ok(()),
            },
            () = tokio::time::sleep_until(next) => {
                tx.send(report.clone()).await?;
                next = tokio::time::Instant::now() + every;
            }
        }
    }
}

async fn stats(
    channel: tonic::transport::Channel,
    node: Node,
    flush: StreamMetricsMessage,
) -> Result<(), Error> {
    let (tx, rx) = mpsc::channel(2);
    let mut first = flush.clone();
    if let Some(identifier) = first.identifier.as_mut() {
        identifier.node = Some(node);
    }
    tx.send(first.encode_to_vec().into()).await?;
    let call = tokio::spawn(raw_stream::<StreamMetricsResponse>(
        channel,
        "/envoy.service.metrics.v3.MetricsService/StreamMetrics",
        rx,
    ));
    let mut later = flush;
    later.identifier = None;
    let later: bytes::Bytes = later.encode_to_vec().into();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        if tx.send(later.clone()).await.is_err() {
            break;
        }
    }
    let _ = call.await;
    Ok(())
}

fn read<T: Message + Default>(dir: &str, name: &str) -> Result<T, Error> {
    let bytes = std::fs::read(std::path::Path::new(dir).join(name))
        .map_err(|err| format!("{dir}/{name}: {err} (run `fleet_sim capture` first)"))?;
    Ok(T::decode(bytes.as_slice())?)
}

async fn swarm(xds: &str, envoys: usize, dir: &str, all: bool, minimal: bool) -> Result<(), Error> {
    let node: Node = read(dir, "node.pb")?;
    let report: LoadStatsRequest = read(dir, "lrs.pb")?;
    let flush: StreamMetricsMessage = read(dir, "metrics.pb")?;
    let replicas: Vec<String> = xds.split(',').map(|a| format!("http://{a}")).collect();
    let swarm = Arc::new(Swarm {
        envoys,
        receipts: Mutex::default(),
    });
    eprintln!(
        "fleet_sim: {envoys} Envoys, node {} bytes{}, load report {} bytes, stats flush {} bytes",
        node_of(&node, 0, minimal).encoded_len(),
        if minimal { " (minimal)" } else { "" },
        report.encoded_len(),
        flush.encoded_len()
    );
    for i in 0..envoys {
        let replica = replicas
            .get(i % replicas.len())
            .cloned()
            .unwrap_or_default();
        let endpoint = tonic::transport::Endpoint::from_shared(replica)?
            .http2_keep_alive_interval(Duration::from_secs(30));
        let node = node_of(&node, i, minimal);
        let (report, flush, swarm) = (report.clone(), flush.clone(), swarm.clone());
        tokio::spawn(async move {
            // Each Envoy its own connection; reconnect as Envoy does when it drops.
            loop {
                if let Ok(channel) = endpoint.connect().await {
                    let mut streams = vec![tokio::spawn(ads(
                        channel.clone(),
                        node.clone(),
                        swarm.clone(),
                    ))];
                    if all {
                        streams.push(tokio::spawn(lrs(
                            channel.clone(),
                            node.clone(),
                            report.clone(),
                        )));
                        streams.push(tokio::spawn(stats(channel, node.clone(), flush.clone())));
                    }
                    let _ = futures_first(streams).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        // Connect at a steady pace rather than all at once.
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// Waits until the first of the streams ends, then ends the others (the connection is dropped with them).
async fn futures_first(streams: Vec<tokio::task::JoinHandle<Result<(), Error>>>) {
    let (tx, mut rx) = mpsc::channel::<()>(streams.len().max(1));
    let aborts: Vec<_> = streams.iter().map(|s| s.abort_handle()).collect();
    for stream in streams {
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = stream.await;
            let _ = tx.send(()).await;
        });
    }
    rx.recv().await;
    for abort in aborts {
        abort.abort();
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        [_, "capture", listen, dir] => capture(listen, dir).await,
        [_, "swarm", xds, envoys, dir, rest @ ..] => {
            let envoys: usize = envoys.parse()?;
            let all = rest.contains(&"all");
            let minimal = rest.contains(&"minimal");
            swarm(xds, envoys, dir, all, minimal).await
        }
        _ => Err("usage: fleet_sim capture <listen host:port> <dir> | fleet_sim swarm <xds host:port[,…]> <envoys> <dir> [ads|all] [minimal]".into()),
    }
}
