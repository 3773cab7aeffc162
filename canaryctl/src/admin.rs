//! The admin HTTP API (JSON; loopback by default).
//!
//! With a token configured, every `/v1` endpoint needs it (`Authorization: Bearer <token>`, the scheme in
//! any case): reads too, and dry runs. Only `/metrics` (counts and shares, no secret) and `/healthz` stay
//! open. Override tokens are never returned by any endpoint, with or without the token: the status shows
//! them as "(secret)" and diffs say only that one changed.
//!
//! GET  /healthz                       200 "ok"
//! GET  /v1/status                     desired state and the fleet
//! POST /v1/set      {"rollout", "percents": {"v2": 25}}
//! POST /v1/promote  {"rollout", "version"?}
//! POST /v1/rollback {"rollout"}
//! POST /v1/apply    {"config": {...}, "dry_run"?: bool}
//! GET  /metrics                       Prometheus text

use std::fmt::Write as _;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use crate::fleet::Link;
use crate::server::{Metrics, Server};
use crate::state::{self, StateError};
use crate::tls::Refused;

pub fn router(server: Arc<Server>) -> Router {
    let guarded = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/set", post(set))
        .route("/v1/promote", post(promote))
        .route("/v1/rollback", post(rollback))
        .route("/v1/apply", post(apply))
        .route_layer(middleware::from_fn_with_state(
            server.clone(),
            require_token,
        ));
    Router::new()
        .merge(guarded)
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(server)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The bearer token of a request: `Authorization: Bearer <token>`, the scheme matched in any case.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

async fn require_token(
    State(server): State<Arc<Server>>,
    request: Request,
    next: Next,
) -> Response {
    if server.authorised(bearer(request.headers())) {
        return next.run(request).await;
    }
    Metrics::bump(&server.metrics.unauthorized);
    error(
        StatusCode::UNAUTHORIZED,
        "this needs the admin token (Authorization: Bearer …; canaryctl --token-file or CANARYCTL_TOKEN)",
    )
}

async fn status(State(server): State<Arc<Server>>) -> Response {
    let desired = server.desired();
    let summary = desired
        .config
        .validate()
        .map(|c| c.summary())
        .unwrap_or_default();
    let settings = server.fleet_settings;
    Json(json!({
        "desired": {
            "version": desired.version,
            "updated_at_unix": desired.updated_at_unix,
            "summary": summary,
            "config": state::redacted(&desired.config),
        },
        "fleet": {
            "window_seconds": settings.window.as_secs(),
            "forget_after_seconds": settings.forget_after.as_secs(),
            "reconnect_grace_seconds": settings.reconnect_grace.as_secs(),
        },
        "envoys": server.envoys(),
        "xds": xds_security(&server),
        "refused": server.refused_peers(),
    }))
    .into_response()
}

/// How the gRPC port is protected, for the status.
fn xds_security(server: &Server) -> serde_json::Value {
    match &server.tls {
        None => json!({ "mtls": false }),
        Some(tls) => {
            let (subject, not_after) = tls.serving();
            json!({
                "mtls": true,
                "serving_certificate": subject,
                "serving_certificate_not_after_unix": not_after,
                "trust_domain": tls.trust_domain(),
            })
        }
    }
}

/// An edit of the desired config, given the parsed request.
type Edit<B> = fn(
    B,
    &canary_router::config::RawConfig,
) -> Result<(canary_router::config::RawConfig, state::Changes), StateError>;

/// The common path of every write: parse the body, run the edit, answer.
async fn write<B: DeserializeOwned>(server: &Server, body: &Bytes, edit: Edit<B>) -> Response {
    match parse_body(body) {
        Ok(request) => write_parsed(server, request, edit).await,
        Err(message) => {
            Metrics::bump(&server.metrics.writes_refused);
            error(StatusCode::BAD_REQUEST, message)
        }
    }
}

async fn write_parsed<B>(server: &Server, request: B, edit: Edit<B>) -> Response {
    match server.write(|config| edit(request, config)).await {
        Ok(outcome) => Json(outcome).into_response(),
        Err(StateError::Io(message)) => error(StatusCode::INTERNAL_SERVER_ERROR, message),
        Err(err) => error(StatusCode::BAD_REQUEST, err.to_string()),
    }
}

/// A request body, or the one-line message saying where it is wrong.
fn parse_body<B: DeserializeOwned>(body: &Bytes) -> Result<B, String> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        canary_router::text::one_line(
            &format!("bad request body: {} at {}", err.inner(), err.path()),
            canary_router::text::MAX_LINE,
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetRequest {
    rollout: String,
    /// Version → percent, as JSON numbers (their text is kept: the percent is read from it exactly).
    percents: serde_json::Map<String, serde_json::Value>,
}

async fn set(State(server): State<Arc<Server>>, body: Bytes) -> Response {
    write(&server, &body, |req: SetRequest, config| {
        let mut percents = Vec::new();
        for (version, value) in req.percents {
            let serde_json::Value::Number(number) = value else {
                return Err(StateError::Edit(format!(
                    "percents.{version}: {} is not a number",
                    canary_router::text::cut(&value.to_string())
                )));
            };
            percents.push((version, number.as_str().to_string()));
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

async fn promote(State(server): State<Arc<Server>>, body: Bytes) -> Response {
    write(&server, &body, |req: PromoteRequest, config| {
        state::promote(config, &req.rollout, req.version.as_deref())
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    rollout: String,
}

async fn rollback(State(server): State<Arc<Server>>, body: Bytes) -> Response {
    write(&server, &body, |req: RollbackRequest, config| {
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

async fn apply(State(server): State<Arc<Server>>, body: Bytes) -> Response {
    let request: ApplyRequest = match parse_body(&body) {
        Ok(request) => request,
        Err(message) => {
            Metrics::bump(&server.metrics.writes_refused);
            return error(StatusCode::BAD_REQUEST, message);
        }
    };
    if request.dry_run {
        // Only the diff: nothing saved or pushed.
        return match state::config_from_value(request.config) {
            Ok(new) => {
                let current = server.desired();
                let changes = state::diff(&current.config, &new);
                Json(json!({ "version": current.version, "changed": !changes.is_empty(), "changes": changes, "dry_run": true }))
                    .into_response()
            }
            Err(err) => error(StatusCode::BAD_REQUEST, err.to_string()),
        };
    }
    write_parsed(&server, request, |req: ApplyRequest, config| {
        state::apply(config, state::config_from_value(req.config)?)
    })
    .await
}

/// A Prometheus label value: backslash, double quote and line feed escaped (the text format's rules).
fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

async fn metrics(State(server): State<Arc<Server>>) -> Response {
    let desired = server.desired();
    let envoys = server.envoys();
    let fleet: Vec<_> = envoys.iter().filter(|e| e.in_fleet).collect();
    let connected = envoys.iter().filter(|e| e.link == Link::Connected).count();
    let current = fleet
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
    let one = |value: usize| [(String::new(), value as u64)];
    metric(
        "canaryctl_desired_version",
        "gauge",
        "Version of the desired filter config.",
        &[(String::new(), desired.version)],
    );
    metric(
        "canaryctl_envoys_known",
        "gauge",
        "Envoys remembered (seen within forget_after).",
        &one(envoys.len()),
    );
    metric(
        "canaryctl_envoys_in_fleet",
        "gauge",
        "Envoys seen within the fleet window: the ones a write waits for.",
        &one(fleet.len()),
    );
    metric(
        "canaryctl_envoys_connected",
        "gauge",
        "Envoys with an open xDS stream.",
        &one(connected),
    );
    metric(
        "canaryctl_envoys_disconnected",
        "gauge",
        "Envoys of the fleet without an xDS stream (past the reconnect grace).",
        &one(fleet
            .iter()
            .filter(|e| e.link == Link::Disconnected)
            .count()),
    );
    metric(
        "canaryctl_envoys_current",
        "gauge",
        "Envoys of the fleet that ACKed the desired version.",
        &one(current),
    );
    metric(
        "canaryctl_envoys_nacking",
        "gauge",
        "Envoys of the fleet whose latest answer is a NACK.",
        &one(fleet.iter().filter(|e| e.nack.is_some()).count()),
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
        ],
    );
    metric(
        "canaryctl_unauthorized_total",
        "counter",
        "Admin requests refused for a missing or wrong token.",
        &[(String::new(), Metrics::get(&m.unauthorized))],
    );
    metric(
        "canaryctl_xds_refused_total",
        "counter",
        "Connections and streams refused on the xDS port, by reason (TLS handshake or node identity).",
        &Refused::ALL
            .iter()
            .map(|r| (format!("{{reason=\"{}\"}}", r.label()), server.refused_total(*r)))
            .collect::<Vec<_>>(),
    );
    if let Some(tls) = &server.tls {
        metric(
            "canaryctl_xds_tls_reloads_total",
            "counter",
            "Re-reads of the xDS TLS files after a change or SIGHUP, by result (refused: the previous files keep serving).",
            &[
                ("{result=\"applied\"}".to_string(), Metrics::get(&m.tls_reloads)),
                ("{result=\"refused\"}".to_string(), Metrics::get(&m.tls_reloads_refused)),
            ],
        );
        metric(
            "canaryctl_xds_tls_certificate_expiry_seconds",
            "gauge",
            "When the xDS serving certificate expires (unix seconds): alert well before it.",
            &[(String::new(), u64::try_from(tls.serving().1).unwrap_or(0))],
        );
    }
    let mut shares = Vec::new();
    for rollout in &desired.config.rollouts {
        for canary in &rollout.canaries {
            shares.push((
                format!(
                    "{{rollout=\"{}\",version=\"{}\"}}",
                    label(&rollout.name),
                    label(&canary.version)
                ),
                u64::from(canary.percent.basis_points()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            bearer(&headers).map(str::to_string)
        };
        assert_eq!(with("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(with("bearer abc").as_deref(), Some("abc"));
        assert_eq!(with("BEARER  abc ").as_deref(), Some("abc"));
        assert_eq!(with("Basic abc"), None);
        assert_eq!(with("Bearerabc"), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[test]
    fn label_values_are_escaped_fully() {
        assert_eq!(label(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(label("a\nb"), "a\\nb");
        assert_eq!(label("v1.2-rc"), "v1.2-rc");
    }
}
