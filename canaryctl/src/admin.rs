//! The admin HTTP API (JSON; loopback by default). Reads are open; writes need the bearer token when one
//! is configured, and an unauthenticated write gets 401 and changes nothing.
//!
//! GET  /v1/status                     desired state and every Envoy
//! POST /v1/set      {"rollout", "percents": {"v2": 25}}
//! POST /v1/promote  {"rollout", "version"?}
//! POST /v1/rollback {"rollout"}
//! POST /v1/apply    {"config": {...}, "dry_run"?: bool}
//! GET  /metrics                       Prometheus text

use std::fmt::Write as _;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use crate::server::{Metrics, Server};
use crate::state::{self, StateError};

pub fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/set", post(set))
        .route("/v1/promote", post(promote))
        .route("/v1/rollback", post(rollback))
        .route("/v1/apply", post(apply))
        .route("/metrics", get(metrics))
        .with_state(server)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn status(State(server): State<Arc<Server>>) -> Response {
    let desired = server.desired();
    let summary = desired
        .config
        .validate()
        .map(|c| c.summary())
        .unwrap_or_default();
    Json(json!({
        "desired": {
            "version": desired.version,
            "updated_at_unix": desired.updated_at_unix,
            "summary": summary,
            "config": desired.config,
        },
        "envoys": server.envoys(),
    }))
    .into_response()
}

/// The common path of every write: authorise, parse the body, run the edit, answer.
async fn write<B: DeserializeOwned>(
    server: &Server,
    headers: &HeaderMap,
    body: &Bytes,
    edit: impl FnOnce(
        B,
        &canary_router::config::RawConfig,
    ) -> Result<(canary_router::config::RawConfig, state::Changes), StateError>,
) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !server.authorised(token) {
        Metrics::bump(&server.metrics.writes_unauthorized);
        return error(
            StatusCode::UNAUTHORIZED,
            "this write needs the admin token (Authorization: Bearer …; canaryctl --token or CANARYCTL_TOKEN)",
        );
    }
    let request: B = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(err) => {
            Metrics::bump(&server.metrics.writes_refused);
            return error(StatusCode::BAD_REQUEST, format!("bad request body: {err}"));
        }
    };
    match server.write(|config| edit(request, config)).await {
        Ok(outcome) => Json(outcome).into_response(),
        Err(StateError::Io(message)) => error(StatusCode::INTERNAL_SERVER_ERROR, message),
        Err(err) => error(StatusCode::BAD_REQUEST, err.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetRequest {
    rollout: String,
    percents: serde_json::Map<String, serde_json::Value>,
}

async fn set(State(server): State<Arc<Server>>, headers: HeaderMap, body: Bytes) -> Response {
    write(&server, &headers, &body, |req: SetRequest, config| {
        let mut percents = Vec::new();
        for (version, value) in req.percents {
            let percent = value.as_f64().ok_or_else(|| {
                StateError::Edit(format!("percent of {version}: {value} is not a number"))
            })?;
            percents.push((version, percent));
        }
        state::set_percents(config, &req.rollout, &percents)
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteRequest {
    rollout: String,
    version: Option<String>,
}

async fn promote(State(server): State<Arc<Server>>, headers: HeaderMap, body: Bytes) -> Response {
    write(&server, &headers, &body, |req: PromoteRequest, config| {
        state::promote(config, &req.rollout, req.version.as_deref())
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    rollout: String,
}

async fn rollback(State(server): State<Arc<Server>>, headers: HeaderMap, body: Bytes) -> Response {
    write(&server, &headers, &body, |req: RollbackRequest, config| {
        state::rollback(config, &req.rollout)
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyRequest {
    config: serde_json::Value,
    #[serde(default)]
    dry_run: bool,
}

async fn apply(State(server): State<Arc<Server>>, headers: HeaderMap, body: Bytes) -> Response {
    // A dry run only shows the diff: no token needed, nothing saved or pushed.
    if let Ok(ApplyRequest {
        config,
        dry_run: true,
    }) = serde_json::from_slice::<ApplyRequest>(&body)
    {
        let text = config.to_string();
        return match state::parse_config(text.as_bytes()) {
            Ok(new) => {
                let current = server.desired();
                let changes = state::diff(&current.config, &new);
                Json(json!({ "version": current.version, "changed": !changes.is_empty(), "changes": changes, "dry_run": true }))
                    .into_response()
            }
            Err(err) => error(StatusCode::BAD_REQUEST, err.to_string()),
        };
    }
    write(&server, &headers, &body, |req: ApplyRequest, config| {
        let new = state::parse_config(req.config.to_string().as_bytes())?;
        state::apply(config, new)
    })
    .await
}

async fn metrics(State(server): State<Arc<Server>>) -> Response {
    let desired = server.desired();
    let envoys = server.envoys();
    let connected: Vec<_> = envoys.iter().filter(|e| e.connected).collect();
    let current = connected
        .iter()
        .filter(|e| e.acked_version == Some(desired.version))
        .count();
    let m = &server.metrics;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    metric(
        "canaryctl_desired_version",
        "gauge",
        "Version of the desired filter config.",
        &[(String::new(), desired.version)],
    );
    metric(
        "canaryctl_envoys_connected",
        "gauge",
        "Envoys with an open xDS stream.",
        &[(String::new(), connected.len() as u64)],
    );
    metric(
        "canaryctl_envoys_current",
        "gauge",
        "Connected Envoys that ACKed the desired version.",
        &[(String::new(), current as u64)],
    );
    metric(
        "canaryctl_envoys_nacking",
        "gauge",
        "Connected Envoys whose latest response is a NACK.",
        &[(
            String::new(),
            connected.iter().filter(|e| e.nack.is_some()).count() as u64,
        )],
    );
    metric(
        "canaryctl_xds_pushes_total",
        "counter",
        "Config versions sent to Envoys.",
        &[(String::new(), Metrics::get(&m.pushes))],
    );
    metric(
        "canaryctl_xds_acks_total",
        "counter",
        "ACKs received.",
        &[(String::new(), Metrics::get(&m.acks))],
    );
    metric(
        "canaryctl_xds_nacks_total",
        "counter",
        "NACKs received.",
        &[(String::new(), Metrics::get(&m.nacks))],
    );
    metric(
        "canaryctl_writes_total",
        "counter",
        "Admin writes by result.",
        &[
            (
                "{result=\"applied\"}".to_string(),
                Metrics::get(&m.writes_applied),
            ),
            (
                "{result=\"unchanged\"}".to_string(),
                Metrics::get(&m.writes_unchanged),
            ),
            (
                "{result=\"refused\"}".to_string(),
                Metrics::get(&m.writes_refused),
            ),
            (
                "{result=\"unauthorized\"}".to_string(),
                Metrics::get(&m.writes_unauthorized),
            ),
        ],
    );
    let mut shares = Vec::new();
    for rollout in &desired.config.rollouts {
        for canary in &rollout.canaries {
            shares.push((
                format!(
                    "{{rollout=\"{}\",version=\"{}\"}}",
                    rollout.name,
                    canary.version.replace('"', "\\\"")
                ),
                (canary.percent * 100.0).round() as u64,
            ));
        }
    }
    metric(
        "canaryctl_canary_basis_points",
        "gauge",
        "Desired canary share per rollout and version, in 1/100 %.",
        &shares,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
