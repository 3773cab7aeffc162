//! Envoy's gRPC access logs (ALS) on the gRPC port: failed requests (the HTTP connection manager's access log)
//! and failed upstream attempts (the router's upstream log), each turned into an error signature of the cluster
//! it went to. The shipped bootstraps log only failures (status ≥ 500 or a response flag), so the stream's cost
//! grows with errors, not with traffic.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::RequestMethod;
use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogType, HttpAccessLogEntry, ResponseFlags,
};
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogService;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use tonic::{Request, Response, Status, Streaming};

use crate::findings::{example, Origin, Signature};
use crate::server::{Metrics, Owner, Server};
use crate::tls::Peer;
use crate::xds::authorise;

pub struct Als {
    server: Arc<Server>,
}

impl Als {
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }
}

/// Envoy's short response flags ("UF,URX"), as in its access log format.
pub fn flags_text(f: &ResponseFlags) -> String {
    let named = [
        (f.failed_local_healthcheck, "LH"),
        (f.no_healthy_upstream, "UH"),
        (f.upstream_request_timeout, "UT"),
        (f.local_reset, "LR"),
        (f.upstream_remote_reset, "UR"),
        (f.upstream_connection_failure, "UF"),
        (f.upstream_connection_termination, "UC"),
        (f.upstream_overflow, "UO"),
        (f.no_route_found, "NR"),
        (f.delay_injected, "DI"),
        (f.fault_injected, "FI"),
        (f.rate_limited, "RL"),
        (f.unauthorized_details.is_some(), "UAEX"),
        (f.rate_limit_service_error, "RLSE"),
        (f.downstream_connection_termination, "DC"),
        (f.upstream_retry_limit_exceeded, "URX"),
        (f.stream_idle_timeout, "SI"),
        (f.invalid_envoy_request_headers, "IH"),
        (f.downstream_protocol_error, "DPE"),
        (f.upstream_max_stream_duration_reached, "UMSDR"),
        (f.response_from_cache_filter, "RFCF"),
        (f.no_filter_config_found, "NFCF"),
        (f.duration_timeout, "DT"),
        (f.upstream_protocol_error, "UPE"),
        (f.no_cluster_found, "NC"),
        (f.overload_manager, "OM"),
    ];
    named
        .iter()
        .filter(|(set, _)| *set)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(",")
}

/// Where a log's entries come from, by its `log_name`: the shipped bootstraps name the router's upstream log
/// `canary-router-attempts` and the connection manager's `canary-router-requests`. Other names: by the entry's
/// type (Envoy marks an attempt that was retried as an upstream entry, but not always the last attempt).
pub fn origin_of_log(log_name: &str) -> Option<Origin> {
    if log_name.ends_with("attempts") {
        Some(Origin::Attempt)
    } else if log_name.ends_with("requests") {
        Some(Origin::Request)
    } else {
        None
    }
}

/// A failure's signature and its cluster, from one access-log entry; None for an entry that is not a failure
/// (a user's own access-log filter may send more than failures) or names no cluster.
pub fn failure_of(
    entry: &HttpAccessLogEntry,
    log: Option<Origin>,
) -> Option<(String, Signature, String)> {
    let common = entry.common_properties.as_ref()?;
    let cluster = common.upstream_cluster.clone();
    if cluster.is_empty() {
        return None;
    }
    let status = entry
        .response
        .as_ref()
        .and_then(|r| r.response_code.as_ref())
        .map_or(0, |c| c.value);
    let flags = common
        .response_flags
        .as_ref()
        .map(flags_text)
        .unwrap_or_default();
    // A failure: a 5xx, no response at all, or a flag of an upstream or local failure (not DI, RFCF, ...).
    let failure_flag = flags.split(',').any(|f| !matches!(f, "" | "DI" | "RFCF"));
    if !(status >= 500 || status == 0 || failure_flag) {
        return None;
    }
    let origin = log.unwrap_or(match AccessLogType::try_from(common.access_log_type) {
        Ok(
            AccessLogType::UpstreamEnd
            | AccessLogType::UpstreamPeriodic
            | AccessLogType::UpstreamPoolReady,
        ) => Origin::Attempt,
        _ => Origin::Request,
    });
    let request = entry.request.clone().unwrap_or_default();
    let method = RequestMethod::try_from(request.request_method)
        .map(|m| match m {
            RequestMethod::MethodUnspecified => "",
            other => other.as_str_name(),
        })
        .unwrap_or("");
    let details = entry
        .response
        .as_ref()
        .map(|r| r.response_code_details.as_str())
        .filter(|d| !d.is_empty())
        .unwrap_or(common.upstream_transport_failure_reason.as_str());
    let signature = Signature::http(origin, method, &request.path, status, &flags, details);
    let path = request.path.split('?').next().unwrap_or("");
    let mut seen = format!(
        "{method} {path} → {}",
        if status == 0 {
            "no response".to_string()
        } else {
            status.to_string()
        }
    );
    for part in [flags.as_str(), details] {
        if !part.is_empty() && part != "via_upstream" {
            seen.push(' ');
            seen.push_str(part);
        }
    }
    let seen = example(&format!("{seen} (cluster {cluster})"));
    Some((cluster, signature, seen))
}

#[tonic::async_trait]
impl AccessLogService for Als {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let peer = Peer::of(&request);
        let mut inbound = request.into_inner();
        let mut identified = false;
        let mut log = None;
        let (mut node_id, mut cluster) = (String::new(), String::new());
        while let Some(message) = inbound.message().await? {
            // The first message names the node and the log; the later ones do not.
            let node = message.identifier.as_ref().and_then(|i| i.node.as_ref());
            if !identified || node.is_some() {
                authorise(&self.server, &peer, node, identified)?;
                identified = true;
            }
            if let Some(node) = node {
                node_id.clone_from(&node.id);
                cluster.clone_from(&node.cluster);
            }
            if let Some(identifier) = &message.identifier {
                log = origin_of_log(&identifier.log_name);
            }
            let Some(LogEntries::HttpLogs(logs)) = &message.log_entries else {
                continue;
            };
            if !self
                .server
                .admit_report(peer.addr, &node_id, &cluster, "an access log")
            {
                continue;
            }
            for entry in &logs.log_entry {
                Metrics::bump(&self.server.metrics.access_log_entries);
                if let Some((upstream, signature, seen)) = failure_of(entry, log) {
                    let owner = Owner::Cluster {
                        node: node_id.clone(),
                        cluster: upstream,
                    };
                    self.server.report_failure(owner, signature, seen);
                }
            }
        }
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::data::accesslog::v3::{
        AccessLogCommon, HttpRequestProperties, HttpResponseProperties,
    };

    fn entry(kind: AccessLogType, status: u32, flags: ResponseFlags) -> HttpAccessLogEntry {
        HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                upstream_cluster: "app-v2".into(),
                response_flags: Some(flags),
                access_log_type: kind as i32,
                ..Default::default()
            }),
            request: Some(HttpRequestProperties {
                request_method: RequestMethod::Post as i32,
                path: "/checkout/42?card=4111".into(),
                ..Default::default()
            }),
            response: Some(HttpResponseProperties {
                response_code: Some(envoy_types::pb::google::protobuf::UInt32Value {
                    value: status,
                }),
                response_code_details: "via_upstream".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn failed_attempts_and_requests_become_signatures_and_successes_do_not() {
        let (cluster, signature, seen) = failure_of(
            &entry(AccessLogType::UpstreamEnd, 503, ResponseFlags::default()),
            None,
        )
        .unwrap();
        assert_eq!(cluster, "app-v2");
        assert_eq!(signature.to_string(), "attempt POST /checkout/{n} 503");
        // The example keeps the path but not the query (it may hold secrets).
        assert!(
            seen.starts_with("POST /checkout/42 → 503") && !seen.contains("4111"),
            "{seen}"
        );
        let reset = ResponseFlags {
            upstream_remote_reset: true,
            ..Default::default()
        };
        let (_, signature, _) =
            failure_of(&entry(AccessLogType::DownstreamEnd, 0, reset), None).unwrap();
        assert_eq!(signature.to_string(), "request POST /checkout/{n} - UR");
        assert!(failure_of(
            &entry(AccessLogType::DownstreamEnd, 200, ResponseFlags::default()),
            None
        )
        .is_none());
        assert!(failure_of(
            &entry(AccessLogType::UpstreamEnd, 404, ResponseFlags::default()),
            None
        )
        .is_none());
        let mut no_cluster = entry(AccessLogType::UpstreamEnd, 503, ResponseFlags::default());
        if let Some(c) = no_cluster.common_properties.as_mut() {
            c.upstream_cluster.clear();
        }
        assert!(failure_of(&no_cluster, None).is_none());
        // The shipped log names decide the origin, whatever the entry's type says.
        let last_attempt = entry(AccessLogType::DownstreamEnd, 500, ResponseFlags::default());
        let log = origin_of_log("canary-router-attempts");
        let (_, signature, _) = failure_of(&last_attempt, log).unwrap();
        assert_eq!(signature.to_string(), "attempt POST /checkout/{n} 500");
        assert_eq!(
            origin_of_log("canary-router-requests"),
            Some(Origin::Request)
        );
        assert_eq!(origin_of_log("mine"), None);
        assert_eq!(
            flags_text(&ResponseFlags {
                upstream_connection_failure: true,
                upstream_retry_limit_exceeded: true,
                ..Default::default()
            }),
            "UF,URX"
        );
    }
}
