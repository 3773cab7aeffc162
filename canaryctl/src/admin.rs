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
//! GET  /v1/rollouts                   progressive rollouts: plan, phase, step, evidence, history
//! POST /v1/rollouts/start  {"rollout", "canary", "steps": ["1", "5", "pause", "100"], "stable_cluster",
//!                           "canary_cluster", "hold_s"?, "max_step_s"?, "alpha"?, "min_canary_requests"?}
//! POST /v1/rollouts/{pause,resume,abort,promote}  {"rollout"}
//! GET  /v1/rollouts/chart?rollout=R&chart=traffic|errors|latency|evidence   one chart of a rollout (SVG)
//! GET  /metrics                       Prometheus text
//! GET  /, /page.js, /page.css         the rollout page (no data in them: it reads /v1 with the token)

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use crate::analysis::Histogram;
use crate::findings::Class;
use crate::fleet::Link;
use crate::rollout::{Phase, Plan, Rollout, Source, Step};
use crate::server::carry_out;
use crate::server::{Metrics, Server, Writer};
use crate::state::{self, StateError};
use crate::tls::Refused;

pub fn router(server: Arc<Server>) -> Router {
    let guarded = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/progress", get(progress))
        .route("/v1/set", post(set))
        .route("/v1/promote", post(promote))
        .route("/v1/rollback", post(rollback))
        .route("/v1/apply", post(apply))
        .route("/v1/rollouts", get(rollouts))
        .route("/v1/rollouts/chart", get(rollout_chart))
        .route("/v1/rollouts/start", post(rollout_start))
        .route("/v1/rollouts/pause", post(rollout_pause))
        .route("/v1/rollouts/resume", post(rollout_resume))
        .route("/v1/rollouts/abort", post(rollout_abort))
        .route("/v1/rollouts/promote", post(rollout_promote))
        .route("/v1/logs", post(app_logs))
        .route_layer(middleware::from_fn_with_state(
            server.clone(),
            require_token,
        ));
    Router::new()
        .merge(guarded)
        .route("/", get(page_html))
        .route("/page.js", get(page_js))
        .route("/page.css", get(page_css))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::map_response(body_errors_as_json))
        .with_state(server)
}

/// The largest request body the admin API reads (a plugin config, or a batch of application log lines).
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// axum answers a body it will not read (over [`MAX_BODY_BYTES`], or not the declared type) in plain text:
/// every answer of this API is JSON with one `error` line, which the CLI repeats.
async fn body_errors_as_json(response: Response) -> Response {
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    match response.status() {
        StatusCode::PAYLOAD_TOO_LARGE if !json => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body over the limit of {MAX_BODY_BYTES} bytes (2 MiB): send less at once"
            ),
        ),
        _ => response,
    }
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
        // Who asks, for the events its writes cause (the token's name, never the token).
        let actor = crate::notify::Actor {
            token: server.token_name().map(str::to_string),
            address: request
                .extensions()
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|info| info.0.to_string()),
        };
        return crate::notifier::OPERATOR
            .scope(actor, next.run(request))
            .await;
    }
    Metrics::bump(&server.metrics.unauthorized);
    error(
        StatusCode::UNAUTHORIZED,
        "this needs the admin token (Authorization: Bearer …; canaryctl --token-file or CANARYCTL_TOKEN)",
    )
}

/// How long a progress poll waits for the fleet to move, by default and at most.
const PROGRESS_WAIT: Duration = Duration::from_secs(1);
const PROGRESS_WAIT_MAX: Duration = Duration::from_secs(10);
/// A progress poll answers no sooner than this after it came, so a fleet ACKing by the thousand is read a few
/// dozen times a second, not once per ACK.
const PROGRESS_EVERY: Duration = Duration::from_millis(25);

/// `GET /v1/progress?version=N[&since=G][&wait_ms=M]`: how far the fleet (every replica's Envoys) is in
/// applying version N, what `set` and the other writes wait on. With `since` (the `generation` of the previous
/// answer) it is a long poll: answered once the fleet view moved past G, or after `wait_ms` (default 1000, at
/// most 10000). It replaces reading the whole `/v1/status` every 10 ms (2.8 MB a poll at 10,000 Envoys).
async fn progress(State(server): State<Arc<Server>>, uri: axum::http::Uri) -> Response {
    let arrived = tokio::time::Instant::now();
    let query = match ProgressQuery::parse(uri.query().unwrap_or_default()) {
        Ok(query) => query,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let mut moves = server.fleet_moves();
    if let Some(since) = query.since {
        let moved = moves.wait_for(|generation| *generation != since);
        // Not moved within the wait: the same answer again, which the caller reads as "still waiting".
        let _ = tokio::time::timeout(query.wait, moved).await;
        tokio::time::sleep_until(arrived + PROGRESS_EVERY).await;
    }
    let generation = *moves.borrow_and_update();
    let envoys = server.envoys();
    let progress = crate::fleet::Progress::of(&envoys, query.version);
    Json(crate::fleet::ProgressView::of(
        &progress,
        query.version,
        generation,
    ))
    .into_response()
}

/// `/v1/progress`'s query.
#[derive(Debug, PartialEq)]
struct ProgressQuery {
    version: u64,
    since: Option<u64>,
    wait: Duration,
}

impl ProgressQuery {
    fn parse(query: &str) -> Result<Self, String> {
        let mut version = None;
        let mut since = None;
        let mut wait = PROGRESS_WAIT;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = || {
                value.parse::<u64>().map_err(|_| {
                    format!(
                        "{key}: {} is not a whole number",
                        canary_router::text::quote(value)
                    )
                })
            };
            match key {
                "version" => version = Some(number()?),
                "since" => since = Some(number()?),
                "wait_ms" => wait = Duration::from_millis(number()?).min(PROGRESS_WAIT_MAX),
                other => {
                    return Err(format!(
                        "{}: unknown parameter (version, since, wait_ms)",
                        canary_router::text::quote(other)
                    ))
                }
            }
        }
        let version = version.ok_or("version: missing (the version to wait for)")?;
        Ok(Self {
            version,
            since,
            wait,
        })
    }
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
        "state": state_view(&server),
        "store": store_view(&server).await,
        "hold": server.fleet_ahead().map(|ahead| {
            let line = ahead.line();
            let mut view = json!(ahead);
            if let Some(object) = view.as_object_mut() {
                object.insert("line".to_string(), json!(line));
            }
            view
        }),
    }))
    .into_response()
}

/// Where the state is kept and, with replicas, which one judges, for the status.
async fn store_view(server: &Server) -> serde_json::Value {
    let store = &server.store;
    let lead = server.leadership.view();
    let mut view = json!({
        "kind": if store.shared() { "etcd" } else { "file" },
        "where": store.describe(),
        "revision": server.revision(),
        "role": lead.role,
    });
    if let crate::store::Store::Etcd(etcd) = &**store {
        // Each live replica's entry (kept by its lease); unknown when etcd does not answer in time.
        let replicas =
            tokio::time::timeout(std::time::Duration::from_secs(1), etcd.list("replicas/"))
                .await
                .ok()
                .and_then(Result::ok)
                .map(|entries| {
                    entries
                        .into_iter()
                        .filter_map(|(_, value)| {
                            serde_json::from_slice::<serde_json::Value>(&value).ok()
                        })
                        .collect::<Vec<_>>()
                });
        if let Some(object) = view.as_object_mut() {
            object.insert("replica".to_string(), json!(lead.replica));
            object.insert("leader".to_string(), json!(lead.leader));
            object.insert(
                "leading_since_unix".to_string(),
                json!(lead.leading_since_unix),
            );
            object.insert("replicas".to_string(), json!(replicas));
        }
    }
    view
}

/// Whether the state file holds what is served, for the status.
fn state_view(server: &Server) -> serde_json::Value {
    let durability = server.durability();
    json!({
        "saved": durability.unsaved_since_unix.is_none(),
        "unsaved_since_unix": durability.unsaved_since_unix,
        "reason": durability.unsaved_since_unix.map(|_| durability.reason.clone()),
        "line": durability.line(),
        "save_failures": durability.failures,
    })
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

/// An edit of the desired config (and of the progressive rollouts it touches), given the parsed request.
type Edit<B> = fn(
    B,
    &canary_router::config::RawConfig,
    &mut BTreeMap<String, Rollout>,
) -> Result<(canary_router::config::RawConfig, state::Changes), StateError>;

/// The progressive rollout moving this rollout, if one is (paused and inconclusive ones included).
fn active<'a>(rollouts: &'a mut BTreeMap<String, Rollout>, name: &str) -> Option<&'a mut Rollout> {
    rollouts.get_mut(name).filter(|r| !r.phase.finished())
}

/// A manual change of a rollout that a progressive rollout is moving would fight it: refused.
fn refuse_under_rollout(rollout: &Rollout, what: &str) -> StateError {
    StateError::Edit(format!(
        "rollout {name}: a progressive rollout of {} is {} at {}; `{what}` would fight it: `canaryctl rollout pause|abort|promote {name}` first",
        rollout.plan.canary,
        rollout.phase.label(),
        rollout.step_name(),
        name = rollout.plan.rollout,
    ))
}

/// The common path of every write: parse the body, run the edit, answer.
async fn write<B: DeserializeOwned + Clone>(
    server: &Server,
    body: &Bytes,
    edit: Edit<B>,
) -> Response {
    match parse_body(body) {
        Ok(request) => write_parsed(server, request, edit).await,
        Err(message) => {
            Metrics::bump(&server.metrics.writes_refused);
            error(StatusCode::BAD_REQUEST, message)
        }
    }
}

async fn write_parsed<B: Clone>(server: &Server, request: B, edit: Edit<B>) -> Response {
    // Made again from a newer state when another replica wrote first: each attempt gets its own copy.
    match server
        .change(Writer::Operator, |config, rollouts| {
            edit(request.clone(), config, rollouts)
        })
        .await
    {
        Ok(outcome) => Json(outcome).into_response(),
        Err(err) => refused(err),
    }
}

/// A write that did not happen: 500 when the state file could not be written, 503 while it cannot be
/// saved and the change would add canary traffic, else 400 (refused).
fn refused(err: StateError) -> Response {
    match err {
        StateError::Io(message) => error(StatusCode::INTERNAL_SERVER_ERROR, message),
        StateError::Unsaved(message) => error(StatusCode::SERVICE_UNAVAILABLE, message),
        err => error(StatusCode::BAD_REQUEST, err.to_string()),
    }
}

/// A request body, or the one-line message saying where it is wrong. A key repeated in any object is refused
/// (every door reads JSON the same way: the filter, `check_config` and the CLI's files refuse it too, where a
/// JSON map would silently keep the last value).
fn parse_body<B: DeserializeOwned>(body: &Bytes) -> Result<B, String> {
    if let Err(message) = unique_keys(body) {
        return Err(format!("bad request body: {message}"));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        canary_router::text::one_line(
            &format!("bad request body: {} at {}", err.inner(), err.path()),
            canary_router::text::MAX_LINE,
        )
    })
}

/// Checks that no JSON object in `text` repeats a key; the error names the key and where it is
/// (`config.rollouts[0]`). Text that is not JSON is left to the parser that follows.
pub fn unique_keys(text: &[u8]) -> Result<(), String> {
    use serde::de::{
        DeserializeSeed, Deserializer, Error, IgnoredAny, MapAccess, SeqAccess, Visitor,
    };
    use std::fmt;

    /// Walks one value at `path`.
    struct Walk<'p>(&'p str);

    impl<'de> DeserializeSeed<'de> for Walk<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
            deserializer.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0usize;
            while seq
                .next_element_seed(Walk(&format!("{}[{i}]", self.0)))?
                .is_some()
            {
                i += 1;
            }
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                // With arbitrary_precision, a number arrives as a one-entry map with serde_json's private
                // key: it is a number, not an object.
                if key == "$serde_json::private::Number" {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                let at = if self.0.is_empty() {
                    key.clone()
                } else {
                    format!("{}.{key}", self.0)
                };
                if !seen.insert(key.clone()) {
                    let shown = if self.0.is_empty() {
                        "the top level"
                    } else {
                        self.0
                    };
                    return Err(A::Error::custom(format!(
                        "duplicate key {} in {shown}: each key once (a JSON object with a repeated key is ambiguous)",
                        canary_router::text::quote(&key)
                    )));
                }
                map.next_value_seed(Walk(&at))?;
            }
            Ok(())
        }
    }

    let mut deserializer = serde_json::Deserializer::from_slice(text);
    match Walk("").deserialize(&mut deserializer) {
        Ok(()) => Ok(()),
        Err(err) if err.is_data() => Err(canary_router::text::one_line(
            &err.to_string(),
            canary_router::text::MAX_LINE,
        )),
        // Syntax errors: the body's own parser says them, with its context.
        Err(_) => Ok(()),
    }
}

/// Application log lines in one POST, at most.
const MAX_LOG_LINES: usize = 10_000;

/// The longest `version` and `rollout` of a posted line: the filter's own bound on names.
const MAX_LOG_NAME_BYTES: usize = 128;
/// The longest `level` of a posted line.
const MAX_LOG_LEVEL_BYTES: usize = 32;
/// The longest `message` of a posted line (its signature keeps 160 characters, its example 240).
const MAX_LOG_MESSAGE_BYTES: usize = 16 * 1024;

/// A posted line's fields within their bounds, or the one-line refusal naming the line, field and size.
fn check_log_line(number: usize, line: &AppLine) -> Result<(), String> {
    let fields = [
        ("version", Some(line.version.as_str()), MAX_LOG_NAME_BYTES),
        ("rollout", line.rollout.as_deref(), MAX_LOG_NAME_BYTES),
        ("level", line.level.as_deref(), MAX_LOG_LEVEL_BYTES),
        (
            "message",
            Some(line.message.as_str()),
            MAX_LOG_MESSAGE_BYTES,
        ),
    ];
    for (field, value, max) in fields {
        if let Some(value) = value.filter(|v| v.len() > max) {
            return Err(format!(
                "logs: line {number}: {field}: {} bytes, at most {max}",
                value.len()
            ));
        }
    }
    if line.version.trim().is_empty() {
        return Err(format!("logs: line {number}: version: empty"));
    }
    Ok(())
}

/// Levels of lines that are not errors: a shipper that sends every line has those skipped.
const NOT_ERRORS: [&str; 7] = ["trace", "debug", "info", "notice", "warn", "warning", "ok"];

/// One application log line, as a log shipper posts it. Other fields (time, host, ...) are ignored.
#[derive(Deserialize)]
struct AppLine {
    version: String,
    message: String,
    /// Only for this rollout (default: any rollout with that version as stable or canary).
    #[serde(default)]
    rollout: Option<String>,
    #[serde(default)]
    level: Option<String>,
}

/// `POST /v1/logs`: an application's error lines, as JSON lines (one object a line) or one JSON array, each
/// with `version` and `message`. Every line is checked before any is counted: a bad line refuses the post,
/// naming the line and the field.
async fn app_logs(State(server): State<Arc<Server>>, body: Bytes) -> Response {
    let text = match std::str::from_utf8(&body) {
        Ok(text) => text.trim(),
        Err(err) => return error(StatusCode::BAD_REQUEST, format!("logs: not UTF-8: {err}")),
    };
    let values: Vec<(usize, serde_json::Value)> = if text.starts_with('[') {
        if let Err(message) = unique_keys(text.as_bytes()) {
            return error(StatusCode::BAD_REQUEST, format!("logs: {message}"));
        }
        match serde_json::from_str::<Vec<serde_json::Value>>(text) {
            Ok(values) => values
                .into_iter()
                .enumerate()
                .map(|(i, v)| (i + 1, v))
                .collect(),
            Err(err) => return error(StatusCode::BAD_REQUEST, format!("logs: {err}")),
        }
    } else {
        let mut values = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            if let Err(message) = unique_keys(line.as_bytes()) {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("logs: line {}: {message}", i + 1),
                );
            }
            match serde_json::from_str(line) {
                Ok(value) => values.push((i + 1, value)),
                Err(err) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("logs: line {}: {err}", i + 1),
                    )
                }
            }
        }
        values
    };
    if values.len() > MAX_LOG_LINES {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "logs: {} lines in one post, at most {MAX_LOG_LINES}",
                values.len()
            ),
        );
    }
    let mut lines = Vec::with_capacity(values.len());
    for (number, value) in values {
        let line: AppLine = match serde_path_to_error::deserialize(value) {
            Ok(line) => line,
            Err(err) => {
                let field = err.path().to_string();
                return error(
                    StatusCode::BAD_REQUEST,
                    canary_router::text::one_line(
                        &format!("logs: line {number}: {} (at {field})", err.inner()),
                        canary_router::text::MAX_LINE,
                    ),
                );
            }
        };
        if let Err(message) = check_log_line(number, &line) {
            return error(StatusCode::BAD_REQUEST, message);
        }
        lines.push(line);
    }
    let (mut accepted, mut ignored) = (0u64, 0u64);
    for line in lines {
        let quiet = line
            .level
            .as_deref()
            .is_some_and(|l| NOT_ERRORS.contains(&l.trim().to_ascii_lowercase().as_str()));
        if quiet || line.message.trim().is_empty() {
            ignored += 1;
            continue;
        }
        accepted += 1;
        Metrics::bump(&server.metrics.app_log_lines);
        server.report_failure(
            crate::server::Owner::Version {
                rollout: line.rollout,
                version: line.version,
            },
            crate::findings::Signature::app(&line.message),
            crate::findings::example(&line.message),
        );
    }
    Json(json!({ "accepted": accepted, "ignored": ignored })).into_response()
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct SetRequest {
    rollout: String,
    /// Version → percent, as JSON numbers (their text is kept: the percent is read from it exactly).
    percents: serde_json::Map<String, serde_json::Value>,
}

async fn set(State(server): State<Arc<Server>>, body: Bytes) -> Response {
    write(&server, &body, |req: SetRequest, config, rollouts| {
        if let Some(running) = active(rollouts, &req.rollout) {
            return Err(refuse_under_rollout(running, "canaryctl set"));
        }
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

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct PromoteRequest {
    rollout: String,
    version: Option<String>,
}

async fn promote(State(server): State<Arc<Server>>, body: Bytes) -> Response {
    write(&server, &body, |req: PromoteRequest, config, rollouts| {
        // Promoting the canary of a progressive rollout finishes it; promoting another version would fight it.
        if let Some(running) = active(rollouts, &req.rollout) {
            if req
                .version
                .as_deref()
                .is_some_and(|v| v != running.plan.canary)
            {
                return Err(refuse_under_rollout(running, "canaryctl promote"));
            }
            let canary = running.plan.canary.clone();
            running
                .promote(state::now_unix())
                .map_err(StateError::Edit)?;
            return state::promote(config, &req.rollout, Some(&canary));
        }
        state::promote(config, &req.rollout, req.version.as_deref())
    })
    .await
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    rollout: String,
}

async fn rollback(State(server): State<Arc<Server>>, body: Bytes) -> Response {
    write(&server, &body, |req: RollbackRequest, config, rollouts| {
        // A manual rollback always works, and ends a progressive rollout of that rollout as rolled back.
        if let Some(running) = active(rollouts, &req.rollout) {
            running.abort(state::now_unix()).map_err(StateError::Edit)?;
        }
        state::rollback(config, &req.rollout)
    })
    .await
}

#[derive(Deserialize, Clone)]
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
    write_parsed(&server, request, |req: ApplyRequest, config, rollouts| {
        let new = state::config_from_value(req.config)?;
        let entry = |c: &canary_router::config::RawConfig, name: &str| {
            c.rollouts.iter().find(|r| r.name == name).cloned()
        };
        for running in rollouts.values().filter(|r| !r.phase.finished()) {
            if entry(config, &running.plan.rollout) != entry(&new, &running.plan.rollout) {
                return Err(refuse_under_rollout(running, "canaryctl apply"));
            }
        }
        state::apply(config, new)
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
        "canaryctl_load_reports_total",
        "counter",
        "Load reports (LRS) received from the Envoys.",
        &[(String::new(), Metrics::get(&m.load_reports))],
    );
    metric(
        "canaryctl_load_report_interval_seconds",
        "gauge",
        "How often this replica asks the Envoys for their load reports (serve --load-report-interval).",
        &[(String::new(), *server.load_every.borrow())],
    );
    metric(
        "canaryctl_stats_flushes_total",
        "counter",
        "Stats flushes (MetricsService) received from the Envoys.",
        &[(String::new(), Metrics::get(&m.stats_flushes))],
    );
    metric(
        "canaryctl_access_log_entries_total",
        "counter",
        "Access-log entries (ALS: failed requests and upstream attempts) received from the Envoys.",
        &[(String::new(), Metrics::get(&m.access_log_entries))],
    );
    metric(
        "canaryctl_app_log_lines_total",
        "counter",
        "Application error lines accepted on /v1/logs.",
        &[(String::new(), Metrics::get(&m.app_log_lines))],
    );
    metric(
        "canaryctl_failures_dropped_total",
        "counter",
        "Failures not kept: more distinct signatures than canaryctl keeps between two analysis ticks.",
        &[(String::new(), Metrics::get(&m.failures_dropped))],
    );
    metric(
        "canaryctl_reports_refused_total",
        "counter",
        "Reports refused, by reason (implausible: beyond serve --max-report-rate; no_ads_subscription: its node \
         holds no ADS stream under the same node id and cluster).",
        &[
            (
                "{reason=\"implausible\"}".to_string(),
                Metrics::get(&m.reports_implausible),
            ),
            (
                "{reason=\"no_ads_subscription\"}".to_string(),
                Metrics::get(&m.reports_unsubscribed),
            ),
        ],
    );
    let durability = server.durability();
    metric(
        "canaryctl_state_saved",
        "gauge",
        "1 when the state file holds what is served; 0 while saves fail (retried each second).",
        &[(
            String::new(),
            u64::from(durability.unsaved_since_unix.is_none()),
        )],
    );
    metric(
        "canaryctl_state_unsaved_since_seconds",
        "gauge",
        "When the state was last found unsaveable, unix seconds, while it is (0 when saved).",
        &[(String::new(), durability.unsaved_since_unix.unwrap_or(0))],
    );
    metric(
        "canaryctl_state_save_failures_total",
        "counter",
        "Saves of the state file that failed (full or read-only disk, ...).",
        &[(String::new(), durability.failures)],
    );
    let lanes = server
        .notifier
        .as_ref()
        .map(|n| n.lanes().to_vec())
        .unwrap_or_default();
    let per_lane = |count: &dyn Fn(&crate::notifier::Lane) -> u64| -> Vec<(String, u64)> {
        lanes
            .iter()
            .map(|l| {
                (
                    format!("{{target=\"{}\"}}", label(&l.target.label)),
                    count(l),
                )
            })
            .collect()
    };
    use std::sync::atomic::Ordering::Relaxed;
    metric(
        "canaryctl_notifications_sent_total",
        "counter",
        "Events delivered to a --notify target (by its number and host; a webhook's path is never shown).",
        &per_lane(&|l| l.sent.load(Relaxed)),
    );
    metric(
        "canaryctl_notifications_failed_total",
        "counter",
        "Attempts to deliver an event that failed (no answer, or not 2xx): each is tried again unless refused.",
        &per_lane(&|l| l.failed.load(Relaxed)),
    );
    metric(
        "canaryctl_notifications_dropped_total",
        "counter",
        "Events given up: refused by the receiver (4xx), older than 24h, or pushed out of a full queue.",
        &per_lane(&|l| l.dropped.load(Relaxed)),
    );
    metric(
        "canaryctl_notifications_waiting",
        "gauge",
        "Events queued for a target and not delivered yet.",
        &per_lane(&|l| l.waiting() as u64),
    );
    metric(
        "canaryctl_fleet_ahead",
        "gauge",
        "1 while an Envoy serves a version newer than the state's and pushes are held for an operator's write.",
        &[(String::new(), u64::from(server.holding()))],
    );
    metric(
        "canaryctl_prometheus_queries_total",
        "counter",
        "Queries to the Prometheus source (serve --prometheus-url), by result.",
        &[
            (
                "{result=\"ok\"}".to_string(),
                Metrics::get(&m.prometheus_queries)
                    .saturating_sub(Metrics::get(&m.prometheus_failures)),
            ),
            (
                "{result=\"failed\"}".to_string(),
                Metrics::get(&m.prometheus_failures),
            ),
        ],
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
    let rollouts = server.rollouts();
    let by_rollout = |value: &dyn Fn(&Rollout) -> u64| -> Vec<(String, u64)> {
        rollouts
            .iter()
            .map(|r| {
                (
                    format!("{{rollout=\"{}\"}}", label(&r.plan.rollout)),
                    value(r),
                )
            })
            .collect()
    };
    metric(
        "canaryctl_rollout_phase",
        "gauge",
        "1 for the phase each progressive rollout is in.",
        &rollouts
            .iter()
            .flat_map(|r| {
                Phase::ALL.iter().map(move |p| {
                    (
                        format!(
                            "{{rollout=\"{}\",canary=\"{}\",phase=\"{}\"}}",
                            label(&r.plan.rollout),
                            label(&r.plan.canary),
                            p.label()
                        ),
                        u64::from(r.phase == *p),
                    )
                })
            })
            .collect::<Vec<_>>(),
    );
    metric(
        "canaryctl_rollout_step",
        "gauge",
        "The step each rollout is at (1 = the first).",
        &by_rollout(&|r| r.step as u64 + 1),
    );
    metric(
        "canaryctl_rollout_requests_total",
        "counter",
        "Requests the load reports counted for each rollout, by version role.",
        &rollouts
            .iter()
            .flat_map(|r| {
                [
                    ("stable", r.errors.stable_requests),
                    ("canary", r.errors.canary_requests),
                ]
                .map(|(role, n)| {
                    (
                        format!("{{rollout=\"{}\",role=\"{role}\"}}", label(&r.plan.rollout)),
                        n,
                    )
                })
            })
            .collect::<Vec<_>>(),
    );
    metric(
        "canaryctl_rollout_errors_total",
        "counter",
        "Failed requests (5xx, resets, connect failures, timeouts; fallback attempts included), by version role.",
        &rollouts
            .iter()
            .flat_map(|r| {
                [("stable", r.errors.stable_bad), ("canary", r.errors.canary_bad)].map(|(role, n)| {
                    (format!("{{rollout=\"{}\",role=\"{role}\"}}", label(&r.plan.rollout)), n)
                })
            })
            .collect::<Vec<_>>(),
    );
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
    // Real numbers: written apart from the integer samples above. One series per test: the errors, each
    // latency bound ("latency_1000us": slower than 1 ms), each of the application's metrics ("metric_declines"),
    // and the findings (the signature with most evidence).
    let tests: Vec<(&Rollout, String, f64, f64)> = rollouts
        .iter()
        .flat_map(|r| {
            let threshold = 1.0 / r.plan.test_alpha();
            // The signature nearest its own threshold (each has its α by order of arrival).
            let (nearest, nearest_threshold) = r.findings.nearest(r.plan.findings_alpha());
            let findings = (r, "findings".to_string(), nearest, nearest_threshold);
            std::iter::once((r, "errors".to_string(), r.errors.e_value(), threshold))
                .chain(r.latency.iter().map(move |c| {
                    (
                        r,
                        format!("latency_{}us", c.bound_us),
                        c.evidence.e_value(),
                        threshold,
                    )
                }))
                .chain(
                    r.plan
                        .metrics
                        .iter()
                        .zip(r.metrics.iter())
                        .map(move |(m, e)| {
                            (r, format!("metric_{}", m.name), e.e_value(), threshold)
                        }),
                )
                .chain(std::iter::once(findings))
        })
        .collect();
    let gauges: [(&str, &str, bool); 2] = [
        (
            "canaryctl_rollout_evidence",
            "The evidence that the canary is worse than stable, per test (the e-value M_t).",
            false,
        ),
        (
            "canaryctl_rollout_evidence_threshold",
            "The evidence that rolls back, per test (1/alpha of the test; of one signature for findings).",
            true,
        ),
    ];
    for (name, help, threshold) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (r, test, e_value, bound) in &tests {
            let _ = writeln!(
                out,
                "{name}{{rollout=\"{}\",metric=\"{test}\"}} {}",
                label(&r.plan.rollout),
                if threshold { *bound } else { *e_value }
            );
        }
    }
    let mut classes = Vec::new();
    for r in &rollouts {
        let alpha = r.plan.findings_alpha();
        for class in [Class::New, Class::Worse, Class::Known] {
            let n = r
                .findings
                .signatures
                .iter()
                .filter(|f| f.class(f.alpha(alpha)) == class)
                .count();
            classes.push((
                format!(
                    "{{rollout=\"{}\",class=\"{}\"}}",
                    label(&r.plan.rollout),
                    class.label()
                ),
                n as u64,
            ));
        }
    }
    let _ = writeln!(
        out,
        "# HELP canaryctl_rollout_findings Error signatures of a rollout, by class (new, worse, known).\n# TYPE canaryctl_rollout_findings gauge"
    );
    for (labels, n) in classes {
        let _ = writeln!(out, "canaryctl_rollout_findings{labels} {n}");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// The rollout page's files, built into the binary. They hold no data: the page reads `/v1` with the token
/// typed into it. The policy lets the page load only its own script and style, and images it made itself.
const PAGE_HTML: &str = include_str!("page/index.html");
const PAGE_JS: &str = include_str!("page/page.js");
const PAGE_CSS: &str = include_str!("page/page.css");
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                           img-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn page_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, PAGE_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn page_html() -> Response {
    page_file("text/html; charset=utf-8", PAGE_HTML)
}

async fn page_js() -> Response {
    page_file("text/javascript; charset=utf-8", PAGE_JS)
}

async fn page_css() -> Response {
    page_file("text/css; charset=utf-8", PAGE_CSS)
}

/// `GET /v1/rollouts/chart?rollout=web&chart=errors`: one of the page's charts, as SVG.
async fn rollout_chart(State(server): State<Arc<Server>>, uri: axum::http::Uri) -> Response {
    let mut rollout = None;
    let mut chart = None;
    for pair in uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8_lossy()
            .into_owned();
        match key {
            "rollout" => rollout = Some(value),
            "chart" => chart = Some(value),
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "chart: unknown parameter {} (rollout, chart)",
                        canary_router::text::quote(other)
                    ),
                )
            }
        }
    }
    let (Some(name), Some(chart)) = (rollout, chart) else {
        return error(
            StatusCode::BAD_REQUEST,
            "chart: give ?rollout=NAME&chart=traffic|errors|latency|evidence",
        );
    };
    let Some(r) = server.rollout(&name) else {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "rollout: no progressive rollout of {}",
                canary_router::text::quote(&name)
            ),
        );
    };
    match crate::charts::render(&r, &chart) {
        Ok(svg) => (
            [
                (header::CONTENT_TYPE, "image/svg+xml"),
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; style-src 'unsafe-inline'",
                ),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            svg,
        )
            .into_response(),
        Err(message) => error(StatusCode::BAD_REQUEST, message),
    }
}

/// Each Envoy of a rollout's fleet against the rollout's last change.
fn fleet_view(r: &Rollout, envoys: &[crate::fleet::EnvoyStatus]) -> serde_json::Value {
    use crate::coverage::{standing, Standing};
    let by_node: std::collections::BTreeMap<&str, &crate::fleet::EnvoyStatus> =
        envoys.iter().map(|e| (e.node_id.as_str(), e)).collect();
    let members: Vec<serde_json::Value> = r
        .fleet
        .iter()
        .map(|node| {
            let envoy = by_node.get(node.as_str()).copied();
            let (state, line) = match standing(r, node, envoy) {
                Standing::Applied => ("applied", None),
                Standing::Behind(line) => ("behind", Some(line)),
                Standing::Refused(line) => ("refused", Some(line)),
                Standing::Missing(line) => ("missing", Some(line)),
            };
            json!({
                "node_id": node,
                "cluster": envoy.map(|e| e.cluster.as_str()),
                "state": state,
                "acked_version": envoy.and_then(|e| e.acked_version),
                "why": line,
            })
        })
        .collect();
    let not_applied: Vec<&serde_json::Value> = members
        .iter()
        .filter(|m| m.get("state").and_then(|s| s.as_str()) != Some("applied"))
        .collect();
    json!({
        "clusters": r.plan.fleet_clusters,
        "allow_missing_envoys": r.plan.allow_missing_envoys,
        "change_version": r.change_version,
        "applied_everywhere": not_applied.is_empty(),
        "not_applied": not_applied,
        "envoys": members,
    })
}

/// A rollout as the API and `canaryctl rollout status` show it.
pub fn rollout_view(r: &Rollout, envoys: &[crate::fleet::EnvoyStatus]) -> serde_json::Value {
    let (canary_rate, stable_rate) = r.errors.rates();
    json!({
        "rollout": r.plan.rollout,
        "canary": r.plan.canary,
        "stable": r.plan.stable,
        "phase": r.phase.label(),
        "step": r.step + 1,
        "steps": r.plan.steps,
        "step_name": r.step_name(),
        "percent": r.percent(),
        "step_started_unix": r.step_started_unix,
        "step_canary_requests": r.step_canary_requests,
        "step_covered_s": r.step_covered_s,
        "evidence_gap": r.gap,
        "fleet": fleet_view(r, envoys),
        "plan": {
            "hold_s": r.plan.hold_s,
            "max_step_s": r.plan.max_step_s,
            "false_rollback_budget": r.plan.alpha,
            "min_canary_requests": r.plan.min_canary_requests,
            "stable_cluster": r.plan.stable_cluster,
            "canary_cluster": r.plan.canary_cluster,
            "evidence": r.plan.evidence.label(),
            "prometheus_selector": r.plan.prometheus_selector,
        },
        "evidence": {
            "errors": {
                "e_value": r.errors.e_value(),
                "threshold": 1.0 / r.plan.test_alpha(),
                "canary_requests": r.errors.canary_requests,
                "canary_errors": r.errors.canary_bad,
                "canary_rate": canary_rate,
                "stable_requests": r.errors.stable_requests,
                "stable_errors": r.errors.stable_bad,
                "stable_rate": stable_rate,
                "ticks": r.errors.ticks,
            }
        },
        "latency": {
            "compared": r.plan.latency,
            "tolerance": r.plan.latency_tolerance,
            "canary_cluster": r.plan.canary_latency_cluster(),
            "baseline_requests": r.latency_baseline.count,
            "checks": r.latency.iter().map(|c| {
                let (canary_rate, stable_rate) = c.evidence.rates();
                json!({
                    "slower_than_us": c.bound_us,
                    "slower_than": crate::rollout::duration_text(c.bound_us),
                    "e_value": c.evidence.e_value(),
                    "threshold": 1.0 / r.plan.test_alpha(),
                    "canary_requests": c.evidence.canary_requests,
                    "canary_slow": c.evidence.canary_bad,
                    "canary_rate": canary_rate,
                    "stable_requests": c.evidence.stable_requests,
                    "stable_slow": c.evidence.stable_bad,
                    "stable_rate": stable_rate,
                })
            }).collect::<Vec<_>>(),
        },
        "findings": findings_view(r),
        "metrics": r.plan.metrics.iter().zip(r.metrics.iter()).map(|(m, e)| {
            let (canary_rate, stable_rate) = e.rates();
            json!({
                "name": m.name,
                "events_query": m.events,
                "requests_query": m.requests,
                "e_value": e.e_value(),
                "threshold": 1.0 / r.plan.test_alpha(),
                "canary_requests": e.canary_requests,
                "canary_events": e.canary_bad,
                "canary_rate": canary_rate,
                "stable_requests": e.stable_requests,
                "stable_events": e.stable_bad,
                "stable_rate": stable_rate,
            })
        }).collect::<Vec<_>>(),
        "availability": {
            "down_since_unix": r.availability.down_since,
            "why": r.availability.why,
        },
        "recent_ticks": r.recent,
        "reason": r.reason,
        "started_unix": r.started_unix,
        "counted_from_unix": r.counted_from_unix,
        "finished_unix": r.finished_unix,
        "history": r.history,
    })
}

/// A rollout's error signatures, the most evident first.
fn findings_view(r: &Rollout) -> serde_json::Value {
    let alpha = r.plan.findings_alpha();
    let f = &r.findings;
    let mut signatures: Vec<_> = f.signatures.iter().collect();
    signatures.sort_by(|a, b| {
        b.evidence
            .log_e_value()
            .total_cmp(&a.evidence.log_e_value())
            .then(b.canary.cmp(&a.canary))
    });
    json!({
        "roll_back": r.plan.findings,
        "alpha": alpha,
        "canary_requests": f.canary_requests,
        "stable_requests": f.stable_requests,
        "untracked": f.untracked,
        "set_aside": f.set_aside,
        "bytes": f.bytes(),
        "max_bytes": crate::findings::MAX_FINDINGS_BYTES,
        "signatures": signatures.iter().map(|s| {
            let (canary_rate, stable_rate) = f.rates(s);
            let own = s.alpha(alpha);
            json!({
                "origin": s.origin.label(),
                "signature": s.signature,
                "arrival": s.arrival,
                "threshold": 1.0 / own,
                "class": s.class(own).label(),
                "rolls_back": r.plan.findings && s.rolls_back(own),
                "canary": s.canary,
                "canary_rate": canary_rate,
                "stable": s.stable,
                "stable_rate": stable_rate,
                "e_value": s.evidence.e_value(),
                "example": s.example,
                "first_seen_unix": s.first_seen_unix,
            })
        }).collect::<Vec<_>>(),
    })
}

async fn rollouts(State(server): State<Arc<Server>>) -> Response {
    let envoys = server.envoys();
    // Why an active rollout cannot move now, besides its own evidence.
    let held = server.fleet_ahead().map(|ahead| ahead.line()).or_else(|| {
        server.unsaved().map(|line| {
            format!("{line}: steps wait until it is saved; a rollback is still applied")
        })
    });
    let views: Vec<_> = server
        .rollouts()
        .iter()
        .map(|r| {
            let mut view = rollout_view(r, &envoys);
            if let (Some(line), Some(object)) = (&held, view.as_object_mut()) {
                if !r.phase.finished() {
                    object.insert("held".to_string(), json!(line));
                }
            }
            view
        })
        .collect();
    Json(json!({ "rollouts": views })).into_response()
}

fn default_hold() -> u64 {
    120
}

fn default_alpha() -> f64 {
    0.05
}

fn default_min_canary_requests() -> u64 {
    200
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    rollout: String,
    canary: String,
    steps: Vec<Step>,
    stable_cluster: String,
    canary_cluster: String,
    #[serde(default = "default_hold")]
    hold_s: u64,
    /// Default: 30 minutes, or five holds if longer.
    max_step_s: Option<u64>,
    #[serde(default = "default_alpha")]
    alpha: f64,
    #[serde(default = "default_min_canary_requests")]
    min_canary_requests: u64,
    /// The cluster the canary's route names (its latency is charged there).
    canary_route_cluster: Option<String>,
    #[serde(default = "crate::rollout::default_latency_tolerance")]
    latency_tolerance: f64,
    /// "envoy" (default) or "prometheus".
    #[serde(default)]
    evidence: Source,
    #[serde(default)]
    prometheus_selector: String,
    /// A `new` or `worse` error signature rolls back (default: yes).
    #[serde(default = "yes")]
    findings: bool,
    /// The Envoy clusters whose Envoys serve the rollout (default: those of the connected Envoys).
    #[serde(default)]
    fleet_clusters: Vec<String>,
    /// Steps may pass while Envoys of the fleet are disconnected (they are still named).
    #[serde(default)]
    allow_missing_envoys: bool,
    /// The application's count metrics, from Prometheus.
    #[serde(default)]
    metrics: Vec<crate::user_metrics::MetricPlan>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutRequest {
    rollout: String,
}

/// A rollout operation's answer: the write's outcome and the rollout after it.
async fn rollout_write(
    server: &Server,
    by: Writer,
    name: String,
    edit: impl FnMut(
        &canary_router::config::RawConfig,
        &mut std::collections::BTreeMap<String, Rollout>,
    ) -> Result<(canary_router::config::RawConfig, state::Changes), StateError>,
) -> Response {
    match server.change(by, edit).await {
        Ok(outcome) => {
            let view = server
                .rollout(&name)
                .map(|r| rollout_view(&r, &server.envoys()));
            Json(json!({
                "version": outcome.version,
                "changed": outcome.changed,
                "changes": outcome.changes,
                "durable": outcome.durable,
                "warning": outcome.warning,
                "rollout": view,
            }))
            .into_response()
        }
        Err(err) => refused(err),
    }
}

/// Before a rollout reads Prometheus: the server answers, has both clusters' series (the selector matches the
/// fleet) and, when it has their latency, stable's recent distribution. The answer becomes the starting point
/// of the rollout's counters. Returns the baseline and whether latency is compared.
async fn prometheus_start(
    server: &Server,
    req: &StartRequest,
) -> Result<(Option<Histogram>, bool), (StatusCode, String)> {
    let bad = |message: String| (StatusCode::BAD_REQUEST, message);
    crate::prometheus::check_selector(&req.prometheus_selector).map_err(bad)?;
    let canary_route = req
        .canary_route_cluster
        .as_deref()
        .unwrap_or(&req.canary_cluster);
    let clusters = [req.stable_cluster.as_str(), canary_route];
    let wanted = crate::prometheus::Wanted {
        stable: &req.stable_cluster,
        canary: &req.canary_cluster,
        canary_route,
        rollout: &req.rollout,
        version: &req.canary,
    };
    let query = crate::prometheus::counters_query(&wanted, &req.prometheus_selector);
    let samples = match server.prometheus_query(&query).await {
        Ok(samples) => samples,
        Err(err) if server.prometheus.is_none() || err.starts_with("Prometheus refused") => {
            return Err(bad(err))
        }
        Err(err) => return Err((StatusCode::BAD_GATEWAY, err)),
    };
    let missing = crate::prometheus::missing_clusters(&samples, &clusters);
    if let Some(cluster) = missing.first() {
        let field = if *cluster == req.stable_cluster {
            "stable-cluster"
        } else if req.canary_route_cluster.is_some() {
            "canary-route-cluster"
        } else {
            "canary-cluster"
        };
        return Err(bad(format!(
            "{field}: Prometheus has no envoy_cluster_upstream_rq_completed{{envoy_cluster_name={}}}{}: does it scrape the Envoys' /stats/prometheus, and does the cluster have that name?",
            canary_router::text::quote(cluster),
            if req.prometheus_selector.trim().is_empty() {
                String::new()
            } else {
                format!(" with {}", req.prometheus_selector.trim())
            }
        )));
    }
    // Latency is always compared: Envoy exports every cluster's latency buckets on /stats/prometheus, once the
    // cluster has a sample and a stats flush merged it. A canary at 0 % until now has none yet, nor may stable
    // a moment after its first traffic: they come with their requests.
    let query = crate::prometheus::baseline_query(
        &req.stable_cluster,
        &req.prometheus_selector,
        crate::server::LATENCY_WINDOW_S,
    );
    let baseline = server
        .prometheus_query(&query)
        .await
        .ok()
        .map(|samples| crate::prometheus::histogram_of(&samples));
    // A running rollout of that name keeps its counters (the start is refused below).
    let running = server
        .rollout(&req.rollout)
        .is_some_and(|r| !r.phase.finished());
    if !running {
        server.prometheus_start(&req.rollout, &samples);
    }
    Ok((baseline, true))
}

/// Before a rollout takes the application's metrics: each is checked, its query answered by Prometheus (a
/// query Prometheus refuses is refused here, with its error), and the answer becomes its starting point.
async fn metrics_start(server: &Server, req: &StartRequest) -> Result<(), (StatusCode, String)> {
    if req.metrics.is_empty() {
        return Ok(());
    }
    for metric in &req.metrics {
        metric.check().map_err(|m| (StatusCode::BAD_REQUEST, m))?;
    }
    let stable = server
        .desired()
        .config
        .rollouts
        .iter()
        .find(|r| r.name == req.rollout)
        .map(|r| r.stable.clone())
        .unwrap_or_default();
    for metric in &req.metrics {
        let query = crate::user_metrics::query(metric, &stable, &req.canary);
        let samples = server.prometheus_query(&query).await.map_err(|err| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("metric {}: Prometheus: {err}", metric.name),
            )
        })?;
        server.metric_start(&req.rollout, metric, &samples, &stable, &req.canary);
    }
    Ok(())
}

async fn rollout_start(State(server): State<Arc<Server>>, body: Bytes) -> Response {
    let req: StartRequest = match parse_body(&body) {
        Ok(req) => req,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    if let Some(refusal) = refuse_more_canary_traffic(&server, "start a rollout") {
        return refusal;
    }
    let name = req.rollout.clone();
    // Refused after the plan's own checks (below), so that a bad plan is named first.
    let fleet = crate::coverage::fleet_at_start(&req.fleet_clusters, &server.envoys());
    let (baseline, compare_latency) = match req.evidence {
        Source::Envoy => (
            server.recent_latency(
                &req.stable_cluster,
                fleet
                    .as_ref()
                    .map(|(clusters, _)| clusters.as_slice())
                    .unwrap_or(&[]),
            ),
            server.streams_stats(),
        ),
        Source::Prometheus => match prometheus_start(&server, &req).await {
            Ok(found) => found,
            Err((status, message)) => return error(status, message),
        },
    };
    if let Err((status, message)) = metrics_start(&server, &req).await {
        return error(status, message);
    }
    rollout_write(&server, Writer::Rollout, name, move |config, rollouts| {
        if let Some(running) = rollouts.get(&req.rollout).filter(|r| !r.phase.finished()) {
            return Err(StateError::Edit(format!(
                "rollout {}: {} is already {} at {}: pause, abort or promote it first",
                req.rollout,
                running.plan.canary,
                running.phase.label(),
                running.step_name()
            )));
        }
        let raw = config
            .rollouts
            .iter()
            .find(|r| r.name == req.rollout)
            .ok_or_else(|| {
                StateError::Edit(format!(
                    "rollout: no rollout named {} in the config",
                    canary_router::text::quote(&req.rollout)
                ))
            })?;
        if !raw.canaries.iter().any(|c| c.version == req.canary) {
            let known: Vec<&str> = raw.canaries.iter().map(|c| c.version.as_str()).collect();
            return Err(StateError::Edit(format!(
                "canary: {} is not a canary of rollout {} (its canaries: {})",
                canary_router::text::quote(&req.canary),
                req.rollout,
                known.join(", ")
            )));
        }
        let plan = Plan {
            rollout: req.rollout.clone(),
            canary: req.canary.clone(),
            stable: raw.stable.clone(),
            stable_cluster: req.stable_cluster.clone(),
            canary_cluster: req.canary_cluster.clone(),
            steps: req.steps.clone(),
            hold_s: req.hold_s,
            max_step_s: req.max_step_s.unwrap_or((5 * req.hold_s).max(1800)),
            alpha: req.alpha,
            min_canary_requests: req.min_canary_requests,
            canary_route_cluster: req.canary_route_cluster.clone(),
            // Latency is compared when the Envoys stream their stats (or Prometheus has the histograms).
            latency: compare_latency,
            latency_tolerance: req.latency_tolerance,
            evidence: req.evidence,
            prometheus_selector: req.prometheus_selector.clone(),
            findings: req.findings,
            fleet_clusters: Vec::new(),
            allow_missing_envoys: req.allow_missing_envoys,
            metrics: req.metrics.clone(),
        };
        let (mut rollout, action) = Rollout::start(
            plan,
            state::now_unix(),
            baseline.clone().unwrap_or_default(),
        )
        .map_err(StateError::Edit)?;
        let (clusters, members) = fleet.clone().map_err(StateError::Edit)?;
        rollout.plan.fleet_clusters = clusters;
        rollout.fleet = members.into_iter().collect();
        let (next, mut changes) = carry_out(config, &rollout, &action)?;
        changes.insert(
            0,
            format!(
                "rollout {}: {} started at {}",
                rollout.plan.rollout,
                rollout.plan.canary,
                rollout.step_name()
            ),
        );
        rollouts.insert(req.rollout.clone(), rollout);
        Ok((next, changes))
    })
    .await
}

/// While the state cannot be saved, or the fleet is ahead of it, what would later add canary traffic (a
/// rollout's start or resume) is refused with the reason (503).
fn refuse_more_canary_traffic(server: &Server, what: &str) -> Option<Response> {
    if let Some(line) = server.unsaved() {
        return Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{line}: cannot {what} until the state is saved (retried each second)"),
        ));
    }
    let ahead = server.fleet_ahead()?;
    Some(error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("cannot {what}: {}", ahead.line()),
    ))
}

/// pause, resume, abort, promote: an operation on a rollout that may move the config.
async fn rollout_operation(
    server: &Server,
    by: Writer,
    body: &Bytes,
    op: fn(&mut Rollout, u64) -> Result<Option<crate::rollout::Action>, String>,
) -> Response {
    let req: RolloutRequest = match parse_body(body) {
        Ok(req) => req,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let name = req.rollout.clone();
    rollout_write(server, by, name, move |config, rollouts| {
        let rollout = rollouts.get_mut(&req.rollout).ok_or_else(|| {
            StateError::Edit(format!(
                "rollout: no progressive rollout of {} (start one with `canaryctl rollout start`)",
                canary_router::text::quote(&req.rollout)
            ))
        })?;
        let before = rollout.phase;
        let action = op(rollout, state::now_unix()).map_err(StateError::Edit)?;
        let (next, mut changes) = match &action {
            Some(action) => carry_out(config, rollout, action)?,
            None => (config.clone(), Vec::new()),
        };
        if rollout.phase != before || action.is_some() {
            changes.insert(
                0,
                format!(
                    "rollout {}: {} → {} at {}",
                    rollout.plan.rollout,
                    before.label(),
                    rollout.phase.label(),
                    rollout.step_name()
                ),
            );
        }
        Ok((next, changes))
    })
    .await
}

async fn rollout_pause(State(server): State<Arc<Server>>, body: Bytes) -> Response {
    rollout_operation(&server, Writer::Rollout, &body, Rollout::pause).await
}

async fn rollout_resume(State(server): State<Arc<Server>>, body: Bytes) -> Response {
    if let Some(refusal) = refuse_more_canary_traffic(&server, "resume a rollout") {
        return refusal;
    }
    rollout_operation(&server, Writer::Rollout, &body, Rollout::resume).await
}

async fn rollout_abort(State(server): State<Arc<Server>>, body: Bytes) -> Response {
    rollout_operation(&server, Writer::Operator, &body, |r, now| {
        r.abort(now).map(Some)
    })
    .await
}

async fn rollout_promote(State(server): State<Arc<Server>>, body: Bytes) -> Response {
    rollout_operation(&server, Writer::Operator, &body, |r, now| {
        r.promote(now).map(Some)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_poll_s_query_is_read_or_refused_naming_the_field() {
        assert_eq!(
            ProgressQuery::parse("version=7&since=3&wait_ms=60000"),
            Ok(ProgressQuery {
                version: 7,
                since: Some(3),
                wait: PROGRESS_WAIT_MAX
            })
        );
        assert_eq!(
            ProgressQuery::parse("version=7"),
            Ok(ProgressQuery {
                version: 7,
                since: None,
                wait: PROGRESS_WAIT
            })
        );
        assert_eq!(
            ProgressQuery::parse("version=x").unwrap_err(),
            r#"version: "x" is not a whole number"#
        );
        assert!(ProgressQuery::parse("")
            .unwrap_err()
            .starts_with("version: missing"));
        assert!(ProgressQuery::parse("version=1&timeout=3")
            .unwrap_err()
            .starts_with(r#""timeout": unknown parameter"#));
    }
    use axum::http::HeaderValue;

    #[test]
    fn a_key_repeated_in_any_object_of_a_body_is_refused_naming_it_and_where() {
        let refused = |body: &str| unique_keys(body.as_bytes()).unwrap_err();
        assert_eq!(
            refused(r#"{"rollout":"web","percents":{"v2":5,"v2":50}}"#),
            r#"duplicate key "v2" in percents: each key once (a JSON object with a repeated key is ambiguous) at line 1 column 40"#
        );
        assert!(refused(r#"{"rollout":"web","rollout":"api"}"#)
            .starts_with(r#"duplicate key "rollout" in the top level"#));
        assert!(refused(
            r#"{"config":{"rollouts":[{"name":"web","stable":"v1","stable":"v2","canaries":[]}]}}"#
        )
        .starts_with(r#"duplicate key "stable" in config.rollouts[0]"#));
        // Numbers (read exactly: arbitrary precision), arrays, the same key in two objects, and text that is not
        // JSON (its own parser says why) pass.
        for fine in [
            r#"{"a":1,"b":{"a":0.30000000000000004},"c":[{"a":1},{"a":2}],"d":null,"e":true,"f":-5}"#,
            "[1, 2.5e300, \"x\"]",
            "{\"a\":",
            "not json",
        ] {
            assert_eq!(unique_keys(fine.as_bytes()), Ok(()), "{fine}");
        }
        let body = Bytes::from_static(br#"{"rollout":"web","rollout":"web"}"#);
        let parsed: Result<serde_json::Value, String> = parse_body(&body);
        assert!(parsed
            .unwrap_err()
            .starts_with("bad request body: duplicate key \"rollout\""));
    }

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
