//! The xDS side: state-of-the-world ADS serving one resource, the filter's `TypedExtensionConfig`
//! (ECDS), to every Envoy that asks for it, and a new version to all of them as soon as it is desired.
//!
//! Per stream: the first request of the type (no nonce) gets the current config; a request that answers
//! our last nonce is an ACK (no `error_detail`) or a NACK (with it); requests answering older nonces are
//! stale and ignored. Other resource types are not ours and get no answer.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, data_source, AsyncDataSource, DataSource, TypedExtensionConfig,
};
use envoy_types::pb::envoy::extensions::dynamic_modules::v3::DynamicModuleConfig;
use envoy_types::pb::envoy::extensions::filters::http::dynamic_modules::v3::DynamicModuleFilter;
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::wasm::v3::{
    plugin_config, FailurePolicy, PluginConfig, VmConfig,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Any, StringValue};
use envoy_types::util::pack_any;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::intake::Named;
use crate::server::{Artifact, FilterSettings, Server};
use crate::state::Desired;
use crate::tls::{Peer, Refused};

pub const TYPED_EXTENSION_CONFIG: &str =
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";

/// The native module's name and metrics namespace, as in envoy/envoy-native.yaml.
pub const NATIVE_MODULE_NAME: &str = "canary_router_native";

/// The ECDS resource: the filter carrying the plugin configuration as JSON, in the same shape as the
/// shipped bootstraps (envoy/envoy-inline.yaml for the `.wasm` with FAIL_RELOAD, envoy/envoy-native.yaml
/// for the native module) and tools/ecds.py.
pub fn filter_resource(filter: &FilterSettings, desired: &Desired) -> Any {
    let json = serde_json::to_string(&desired.config).unwrap_or_default();
    let configuration = Some(pack_any(StringValue { value: json }));
    let local = |path: &str| AsyncDataSource {
        specifier: Some(async_data_source::Specifier::Local(DataSource {
            specifier: Some(data_source::Specifier::Filename(path.to_string())),
            ..Default::default()
        })),
    };
    let typed_config = match &filter.artifact {
        Artifact::Wasm(path) => pack_any(Wasm {
            config: Some(PluginConfig {
                name: filter.name.clone(),
                root_id: filter.name.clone(),
                configuration,
                failure_policy: FailurePolicy::FailReload as i32,
                vm: Some(plugin_config::Vm::VmConfig(VmConfig {
                    vm_id: filter.name.clone(),
                    runtime: "envoy.wasm.runtime.v8".to_string(),
                    code: Some(local(path)),
                    ..Default::default()
                })),
                ..Default::default()
            }),
        }),
        Artifact::Native(path) => pack_any(DynamicModuleFilter {
            dynamic_module_config: Some(DynamicModuleConfig {
                name: NATIVE_MODULE_NAME.to_string(),
                metrics_namespace: NATIVE_MODULE_NAME.to_string(),
                module: Some(local(path)),
                ..Default::default()
            }),
            filter_name: filter.name.clone(),
            filter_config: configuration,
            ..Default::default()
        }),
    };
    pack_any(TypedExtensionConfig {
        name: filter.name.clone(),
        typed_config: Some(typed_config),
    })
}

pub struct Ads {
    server: Arc<Server>,
}

impl Ads {
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = Peer::of(&request);
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let server = self.server.clone();
        tokio::spawn(async move {
            let stream = server.connect(peer.addr);
            serve_stream(&server, stream, &peer, inbound, tx).await;
            server.disconnect(stream);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "canaryctl serves state-of-the-world ADS: use api_type GRPC, not DELTA_GRPC",
        ))
    }
}

/// With mTLS, whether this request may go on: the stream's node (named in its first request) must be one
/// its certificate allows, and not a node id the fleet knows under another cluster (a node is its cluster and
/// node id together). A refused stream is ended with PERMISSION_DENIED before anything is sent.
pub fn authorise(
    server: &Server,
    peer: &Peer,
    node: Option<&impl Named>,
    identified: bool,
) -> Result<(), Status> {
    let Some(identity) = &peer.identity else {
        return Ok(());
    };
    let refused = match node {
        Some(node) => match identity.permits(node.id(), node.cluster()) {
            Ok(()) => match server.cluster_of(node.id()) {
                Some(known) if *known != *node.cluster() => (
                    Refused::NodeOfAnotherCluster,
                    format!(
                        "node {} is an Envoy of cluster {}, not {}: a certificate cannot take over another \
                         cluster's node",
                        canary_router::text::quote(node.id()),
                        canary_router::text::quote(&known),
                        canary_router::text::quote(node.cluster())
                    ),
                    Some(node.id()),
                ),
                _ => return Ok(()),
            },
            Err(mismatch) => (
                Refused::IdentityMismatch,
                mismatch.to_string(),
                Some(node.id()),
            ),
        },
        None if identified => return Ok(()),
        None => (
            Refused::NoNode,
            "its first request names no node (Envoy: node.id and node.cluster)".to_string(),
            None,
        ),
    };
    let (reason, message, node_id) = refused;
    server.refuse(peer.addr, reason, message.clone(), node_id);
    Err(Status::permission_denied(message))
}

async fn serve_stream(
    server: &Server,
    stream: u64,
    peer: &Peer,
    mut inbound: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
) {
    let mut identified = false;
    let mut desired = server.subscribe();
    let mut nonces = 0u64;
    // The nonce and version of our last response, until the Envoy answers it.
    let mut pending: Option<(String, u64)> = None;
    let mut subscribed = false;
    let mut node_name = (String::new(), String::new());
    loop {
        let push = tokio::select! {
            message = inbound.message() => {
                let Ok(Some(request)) = message else { return };
                if let Err(status) = authorise(server, peer, request.node.as_ref(), identified) {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                if let Some(node) = &request.node {
                    let certificate = peer
                        .identity
                        .as_ref()
                        .and_then(|identity| identity.granting_uri(&node.id, &node.cluster));
                    server.identify(stream, &node.id, &node.cluster, certificate);
                    node_name = (node.id.clone(), node.cluster.clone());
                    identified = true;
                }
                if request.type_url != TYPED_EXTENSION_CONFIG {
                    continue;
                }
                let wants_ours = request.resource_names.is_empty()
                    || request.resource_names.contains(&server.filter.name);
                if request.response_nonce.is_empty() {
                    // A new subscription (or a resubscription after a reconnect, naming the version the Envoy
                    // serves): answered, unless that version is newer than the state's and pushes hold.
                    subscribed = wants_ours;
                    let serving = request.version_info.parse::<u64>().ok();
                    let holding = subscribed && server.subscribed_at(&node_name.0, &node_name.1, serving);
                    subscribed && !holding
                } else {
                    if let Some((_, version)) = pending.take_if(|(nonce, _)| *nonce == request.response_nonce) {
                        match &request.error_detail {
                            None => server.acked(stream, version),
                            Some(status) => server.nacked(stream, version, status.message.clone()),
                        }
                    }
                    let was = subscribed;
                    subscribed = wants_ours;
                    subscribed && !was && !server.holding()
                }
            }
            changed = desired.changed(), if subscribed => {
                if changed.is_err() {
                    return;
                }
                // A hold ends with an operator's write, which is a new version: this branch pushes it.
                !server.holding()
            }
        };
        if push {
            let current = desired.borrow_and_update().clone();
            nonces += 1;
            let nonce = format!("{stream}-{nonces}");
            let response = DiscoveryResponse {
                version_info: current.version.to_string(),
                resources: vec![filter_resource(&server.filter, &current)],
                type_url: TYPED_EXTENSION_CONFIG.to_string(),
                nonce: nonce.clone(),
                ..Default::default()
            };
            pending = Some((nonce, current.version));
            server.sent(stream, current.version);
            if tx.send(Ok(response)).await.is_err() {
                return;
            }
        }
    }
}
