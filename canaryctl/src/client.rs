//! The CLI side: talks to `canaryctl serve`'s admin API (through reqwest), prints what changed, and waits
//! until every Envoy of the fleet has applied the new version, or says by name which did not.
//!
//! Exit codes: 0 done; 1 refused (by canaryctl, or an Envoy NACKed it), or the wait timed out; 2 canaryctl
//! could not be reached or answered nonsense; 3 saved and applied by every connected Envoy, but some
//! Envoys of the fleet are disconnected and did not get it (`--allow-disconnected` makes that 0); 4 pushed
//! (a change that takes canary traffic away) but not saved: canaryctl cannot write its state.

use std::io::IsTerminal;
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::fleet::{EnvoyStatus, Link, ProgressView, RefusedPeer};
use crate::server::WriteOutcome;

/// Exit code of a write that some Envoys of the fleet did not apply because they are disconnected.
pub const EXIT_DISCONNECTED: u8 = 3;

/// Exit code of a write that was pushed (a rollback) but could not be saved.
pub const EXIT_NOT_SAVED: u8 = 4;

/// `GET /v1/status`, as the CLI reads it.
#[derive(Deserialize)]
struct StatusBody {
    desired: DesiredBody,
    fleet: FleetBody,
    envoys: Vec<EnvoyStatus>,
    #[serde(default)]
    xds: XdsBody,
    #[serde(default)]
    refused: Vec<RefusedPeer>,
    #[serde(default)]
    state: StateBody,
    #[serde(default)]
    hold: Option<HoldBody>,
    #[serde(default)]
    store: Option<StoreBody>,
}

/// Where the server keeps its state and, with replicas, who judges.
#[derive(Deserialize)]
struct StoreBody {
    kind: String,
    #[serde(rename = "where")]
    place: String,
    #[serde(default)]
    replica: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    leader: Option<String>,
    #[serde(default)]
    replicas: Option<Vec<Value>>,
}

impl StoreBody {
    /// "store: etcd … ; replica b (follower; leader a); replicas: a, b, c".
    fn line(&self) -> String {
        if self.kind != "etcd" {
            return format!("store: {}", self.place);
        }
        let role = match (self.role.as_deref(), &self.leader) {
            (Some("leader"), _) => "leader".to_string(),
            (_, Some(leader)) => format!("follower; leader {leader}"),
            _ => "follower; no leader".to_string(),
        };
        let replicas = match &self.replicas {
            Some(list) => list
                .iter()
                .filter_map(|r| r.get("replica").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(", "),
            None => "unknown (etcd did not answer)".to_string(),
        };
        format!(
            "store: {}; replica {} ({role}); replicas: {replicas}",
            self.place,
            self.replica.as_deref().unwrap_or("?")
        )
    }
}

#[derive(Deserialize, Default)]
struct StateBody {
    #[serde(default)]
    line: Option<String>,
}

#[derive(Deserialize)]
struct HoldBody {
    line: String,
}

#[derive(Deserialize, Default)]
struct XdsBody {
    mtls: bool,
    serving_certificate_not_after_unix: Option<i64>,
}

#[derive(Deserialize)]
struct DesiredBody {
    version: u64,
    updated_at_unix: u64,
    summary: String,
}

#[derive(Deserialize)]
struct FleetBody {
    window_seconds: u64,
}

/// A dry run of `POST /v1/apply`.
#[derive(Deserialize)]
struct PreviewBody {
    version: u64,
    changes: Vec<String>,
}

/// A failure of a CLI command; `exit_code` is what the process exits with.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub exit_code: u8,
}

impl CliError {
    /// The request could not be made or answered (exit 2).
    fn transport(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            exit_code: 2,
        }
    }

    /// The server refused the change, an Envoy refused it, or the wait timed out (exit 1).
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            exit_code: 1,
        }
    }
}

pub struct Client {
    base: reqwest::Url,
    http: reqwest::Client,
    token: Option<String>,
}

/// The innermost cause of an error, which is the one that says what went wrong.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

impl Client {
    /// `server` is the admin API's address: `http://127.0.0.1:9902` or `127.0.0.1:9902`.
    pub fn new(server: &str, token: Option<String>) -> Result<Self, CliError> {
        let with_scheme = if server.contains("://") {
            server.to_string()
        } else {
            format!("http://{server}")
        };
        let base = reqwest::Url::parse(&with_scheme)
            .ok()
            .filter(|url| url.host_str().is_some() && url.port_or_known_default().is_some())
            .ok_or_else(|| {
                CliError::transport(format!(
                    "--server {}: expected http://host:port",
                    canary_router::text::quote(server)
                ))
            })?;
        if base.scheme() != "http" {
            return Err(CliError::transport(format!(
                "--server {}: the admin API speaks plain HTTP (keep it on loopback, or put TLS in front \
                 and point the CLI at it from there)",
                canary_router::text::quote(server)
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|err| CliError::transport(format!("cannot start the HTTP client: {err}")))?;
        Ok(Self { base, http, token })
    }

    async fn request(&self, path: &str, body: Option<&Value>) -> Result<(u16, Value), CliError> {
        let url = self
            .base
            .join(path)
            .map_err(|err| CliError::transport(format!("{path}: {err}")))?;
        let mut request = match body {
            Some(body) => self.http.post(url).json(body),
            None => self.http.get(url),
        };
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let unreachable = |err: reqwest::Error| {
            CliError::transport(format!(
                "cannot reach canaryctl serve at {}: {}",
                self.base,
                root_cause(&err)
            ))
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(unreachable)?;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok((status, value))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let (status, body) = self.request(path, None).await?;
        typed(status, body)
    }

    async fn post<T: DeserializeOwned>(&self, path: &str, body: Value) -> Result<T, CliError> {
        let (status, answer) = self.request(path, Some(&body)).await?;
        typed(status, answer)
    }
}

fn typed<T: DeserializeOwned>(status: u16, body: Value) -> Result<T, CliError> {
    if status != 200 {
        return Err(CliError::refused(error_text(status, &body)));
    }
    serde_json::from_value(body).map_err(|err| {
        CliError::transport(format!("unexpected answer from canaryctl serve: {err}"))
    })
}

fn error_text(status: u16, body: &Value) -> String {
    match body.get("error").and_then(Value::as_str) {
        Some(message) if status == 401 => format!("unauthorized: {message}"),
        Some(message) => message.to_string(),
        None => format!("canaryctl serve answered HTTP {status}"),
    }
}

// -- commands ------------------------------------------------------------------------------------

pub async fn status(client: &Client, as_json: bool) -> Result<(), CliError> {
    if as_json {
        let raw: Value = client.get("/v1/status").await?;
        println!("{}", serde_json::to_string_pretty(&raw).unwrap_or_default());
        return Ok(());
    }
    let status: StatusBody = client.get("/v1/status").await?;
    let version = status.desired.version;
    println!(
        "desired: version {version}, changed {}",
        ago(status.desired.updated_at_unix)
    );
    for part in status.desired.summary.split("; ") {
        println!("  {part}");
    }
    match (
        status.xds.mtls,
        status.xds.serving_certificate_not_after_unix,
    ) {
        (true, Some(not_after)) => println!(
            "xds: mTLS (TLS 1.3), serving certificate valid until {}",
            crate::tls::unix_text(not_after)
        ),
        (true, None) => println!("xds: mTLS (TLS 1.3)"),
        (false, _) => println!("xds: plaintext (loopback or --insecure-xds)"),
    }
    if let Some(store) = &status.store {
        println!("{}", store.line());
    }
    if let Some(line) = &status.state.line {
        println!("{line}: retrying each second; changes that add canary traffic are refused");
    }
    if let Some(hold) = &status.hold {
        println!("{}", hold.line);
    }
    if status.envoys.is_empty() {
        println!("no Envoy has connected");
    } else {
        println!();
        envoy_table(&status);
    }
    if !status.refused.is_empty() {
        println!("\nrefused on the xDS port:");
        let mut rows = vec![[
            "PEER".to_string(),
            "REASON".to_string(),
            "NODE".to_string(),
            "COUNT".to_string(),
            "LAST".to_string(),
            "WHY".to_string(),
        ]];
        for r in &status.refused {
            rows.push([
                r.peer.clone(),
                r.reason.clone(),
                r.node_id.clone().unwrap_or_else(|| "-".to_string()),
                r.count.to_string(),
                ago(r.last_unix),
                r.message.clone(),
            ]);
        }
        print_table(&rows);
    }
    Ok(())
}

fn envoy_table(status: &StatusBody) {
    let version = status.desired.version;
    let mut rows = vec![[
        "ENVOY".to_string(),
        "CLUSTER".to_string(),
        "LINK".to_string(),
        "APPLIED".to_string(),
        "LAST SEEN".to_string(),
        "NOTE".to_string(),
    ]];
    for e in &status.envoys {
        let applied = match e.acked_version {
            Some(v) if v == version => format!("{v} (current)"),
            Some(v) => format!("{v} (behind)"),
            None => "-".to_string(),
        };
        let mut notes = Vec::new();
        // With replicas: the one it is (or was last) connected to.
        if let Some(replica) = &e.replica {
            notes.push(format!("replica {replica}"));
        }
        if let Some(n) = &e.nack {
            notes.push(format!("NACK of version {}: {}", n.version, n.message));
        }
        if e.streams > 1 {
            notes.push(format!("{} streams share this node id", e.streams));
        }
        match e.link {
            Link::Disconnected => notes.push(format!(
                "disconnected since {}",
                when(e.disconnected_since_unix.unwrap_or(e.last_seen_unix))
            )),
            Link::Gone => notes.push(format!(
                "not in the fleet (not seen for {})",
                humantime::format_duration(Duration::from_secs(status.fleet.window_seconds))
            )),
            Link::Connected | Link::Reconnecting => {}
        }
        let last_seen = match e.link {
            Link::Connected => "now".to_string(),
            _ => ago(e.last_seen_unix),
        };
        rows.push([
            e.node_id.clone(),
            e.cluster.clone(),
            link_name(e.link).to_string(),
            applied,
            last_seen,
            notes.join("; "),
        ]);
    }
    print_table(&rows);
}

fn link_name(link: Link) -> &'static str {
    match link {
        Link::Connected => "connected",
        Link::Reconnecting => "reconnecting",
        Link::Disconnected => "disconnected",
        Link::Gone => "gone",
    }
}

fn print_table<const N: usize>(rows: &[[String; N]]) {
    for line in table_lines(rows) {
        println!("{line}");
    }
}

/// The rows as aligned lines: each column as wide as its widest cell, two spaces between columns.
fn table_lines<const N: usize>(rows: &[[String; N]]) -> Vec<String> {
    let mut widths = [0usize; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row.iter()) {
            *width = (*width).max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|row| {
            let mut line = String::new();
            for (cell, width) in row.iter().zip(widths) {
                line.push_str(&format!("{cell:<width$}  "));
            }
            line.trim_end().to_string()
        })
        .collect()
}

/// Refusal of a command on a rollout that has no progressive rollout.
fn no_rollout(name: &str) -> CliError {
    CliError::refused(format!(
        "no progressive rollout of {} (start one with `canaryctl rollout start`)",
        canary_router::text::quote(name)
    ))
}

fn ago(unix: u64) -> String {
    let secs = crate::state::now_unix().saturating_sub(unix);
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        7200..=172_799 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// A time as RFC 3339 (UTC) and how long ago it was.
fn when(unix: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_secs(unix);
    format!("{} ({})", humantime::format_rfc3339_seconds(at), ago(unix))
}

/// How a write command waits for the fleet.
pub struct Wait {
    pub enabled: bool,
    pub timeout: Duration,
    /// Disconnected Envoys that did not get the version are reported but do not fail the command.
    pub allow_disconnected: bool,
}

/// Send a write, print what changed, and wait for the fleet.
pub async fn write(client: &Client, path: &str, body: Value, wait: &Wait) -> Result<(), CliError> {
    let outcome: WriteOutcome = client.post(path, body).await?;
    if !outcome.changed {
        println!(
            "nothing to change: version {} already says so",
            outcome.version
        );
        return Ok(());
    }
    for change in &outcome.changes {
        println!("{change}");
    }
    saved_as(&outcome);
    if wait.enabled {
        wait_for_fleet(client, outcome.version, wait).await?;
    }
    not_durable(&outcome)
}

/// "saved as version N", or that it was pushed but not saved.
fn saved_as(outcome: &WriteOutcome) {
    match outcome.warning.as_deref().filter(|_| !outcome.durable) {
        Some(warning) => println!(
            "pushed as version {}, NOT saved: {warning}; a restart before it is saved would not know it",
            outcome.version
        ),
        None => println!("saved as version {}", outcome.version),
    }
}

/// A change applied but not saved: exit 4, once the fleet has it.
fn not_durable(outcome: &WriteOutcome) -> Result<(), CliError> {
    if outcome.durable {
        return Ok(());
    }
    Err(CliError {
        message: format!(
            "applied, but not durable: {}",
            outcome
                .warning
                .as_deref()
                .unwrap_or("the state could not be saved")
        ),
        exit_code: EXIT_NOT_SAVED,
    })
}

fn names<'a>(envoys: impl IntoIterator<Item = &'a EnvoyStatus>) -> String {
    envoys
        .into_iter()
        .map(|e| e.node_id.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Wait until every Envoy of the fleet has applied `version`, refused it, or is disconnected; then say
/// which is which. A refusal or the timeout is exit 1, a disconnected Envoy exit 3. Reads `/v1/progress` as a
/// long poll: each answer comes when the fleet view moved (at most 40 a second) or after a second.
pub async fn wait_for_fleet(client: &Client, version: u64, wait: &Wait) -> Result<(), CliError> {
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_line = String::new();
    let end_progress_line = |last_line: &str| {
        if tty && !last_line.is_empty() {
            eprint!("\r{}\r", " ".repeat(last_line.chars().count()));
        }
    };
    let mut since: Option<u64> = None;
    loop {
        let path = match since {
            None => format!("/v1/progress?version={version}"),
            Some(generation) => format!("/v1/progress?version={version}&since={generation}"),
        };
        let progress: ProgressView = client.get(&path).await?;
        since = Some(progress.generation);
        if !progress.refused.is_empty() {
            end_progress_line(&last_line);
            let reasons: Vec<String> = progress
                .refused
                .iter()
                .map(|envoy| {
                    let nack = envoy.nack.as_ref().map_or("", |n| n.message.as_str());
                    let kept = envoy
                        .acked_version
                        .map_or("none".to_string(), |v| v.to_string());
                    format!(
                        "Envoy {} refused version {version}: {nack} (it keeps serving version {kept})",
                        envoy.node_id
                    )
                })
                .collect();
            return Err(CliError::refused(reasons.join("; ")));
        }
        let fleet = progress.fleet;
        let elapsed = started.elapsed().as_secs_f64();
        if fleet == 0 {
            println!("no Envoy is in the fleet: version {version} is saved and will be served when they connect");
            return Ok(());
        }
        if progress.settled() {
            end_progress_line(&last_line);
            println!(
                "applied by {}/{fleet} Envoys in {elapsed:.2} s",
                progress.applied
            );
            return report_disconnected(&progress, version, wait);
        }
        let line = format!(
            "waiting for Envoys to apply version {version}: {}/{fleet} ({elapsed:.1} s; waiting for {})",
            progress.applied,
            progress.waiting_line()
        );
        if tty {
            eprint!("\r{line}");
        } else if line != last_line {
            eprintln!("{line}");
        }
        last_line = line;
        if started.elapsed() >= wait.timeout {
            if tty {
                eprintln!();
            }
            let mut missing = progress.waiting_line();
            if !progress.disconnected.is_empty() {
                missing = format!("{missing}; disconnected: {}", names(&progress.disconnected));
            }
            return Err(CliError::refused(format!(
                "timed out after {:.0} s: {} of {fleet} Envoys have not applied version {version} ({missing})",
                wait.timeout.as_secs_f64(),
                progress.waiting + progress.disconnected.len(),
            )));
        }
    }
}

/// Names each disconnected Envoy of the fleet; exit 3 unless `--allow-disconnected`.
fn report_disconnected(progress: &ProgressView, version: u64, wait: &Wait) -> Result<(), CliError> {
    if progress.disconnected.is_empty() {
        return Ok(());
    }
    for envoy in &progress.disconnected {
        let since = envoy
            .disconnected_since_unix
            .unwrap_or(envoy.last_seen_unix);
        println!(
            "{} ({}): not applied: disconnected since {}; it gets version {version} when it reconnects",
            envoy.node_id,
            envoy.cluster,
            when(since)
        );
    }
    let count = progress.disconnected.len();
    let message = format!(
        "{count} Envoy{} of the fleet did not apply version {version}: disconnected ({})",
        if count == 1 { "" } else { "s" },
        names(&progress.disconnected)
    );
    if wait.allow_disconnected {
        println!("{message} (allowed by --allow-disconnected)");
        Ok(())
    } else {
        Err(CliError {
            message: format!("{message}; --allow-disconnected accepts this"),
            exit_code: EXIT_DISCONNECTED,
        })
    }
}

/// `["v2=12.5", "v3=1%"]` → `{"rollout", "percents": {"v2": 12.5, "v3": 1}}`, each percent sent as the
/// number it was written as (canaryctl serve reads it exactly and refuses what the filter would).
pub fn set_body(rollout: &str, assignments: &[String]) -> Result<Value, CliError> {
    let mut percents = serde_json::Map::new();
    for assignment in assignments {
        let (version, percent) = assignment.rsplit_once('=').ok_or_else(|| {
            CliError::refused(format!(
                "{}: expected <version>=<percent>, e.g. v2=12.5",
                canary_router::text::quote(assignment)
            ))
        })?;
        let text = percent.strip_suffix('%').unwrap_or(percent);
        let number: serde_json::Number = text.parse().map_err(|_| {
            CliError::refused(format!(
                "{}: {} is not a number",
                canary_router::text::quote(assignment),
                canary_router::text::quote(percent)
            ))
        })?;
        percents.insert(version.to_string(), Value::Number(number));
    }
    Ok(json!({ "rollout": rollout, "percents": percents }))
}

pub async fn apply(
    client: &Client,
    file: &str,
    dry_run: bool,
    wait: &Wait,
) -> Result<(), CliError> {
    let text = if file == "-" {
        let mut buf = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut buf)
            .map_err(|err| CliError::refused(format!("stdin: {err}")))?;
        buf
    } else {
        std::fs::read_to_string(file).map_err(|err| CliError::refused(format!("{file}: {err}")))?
    };
    // Validate here first, with the filter's own code: the same message the filter would log.
    let config = crate::state::parse_config(text.as_bytes())
        .map_err(|err| CliError::refused(format!("{file}: {err}")))?;
    let config = serde_json::to_value(&config).unwrap_or_default();
    let preview: PreviewBody = client
        .post("/v1/apply", json!({ "config": config, "dry_run": true }))
        .await?;
    if preview.changes.is_empty() {
        println!(
            "nothing to change: version {} is this config",
            preview.version
        );
        return Ok(());
    }
    println!("diff against version {}:", preview.version);
    for change in &preview.changes {
        println!("  {change}");
    }
    if dry_run {
        println!("dry run: nothing applied");
        return Ok(());
    }
    write(client, "/v1/apply", json!({ "config": config }), wait).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_arguments_are_version_equals_percent_sent_as_written() {
        assert_eq!(
            set_body("web", &["v2=12.5".into(), "v3=1%".into()])
                .unwrap()
                .to_string(),
            r#"{"percents":{"v2":12.5,"v3":1},"rollout":"web"}"#
        );
        // The text goes as written: canaryctl serve refuses float noise with the filter's message.
        assert_eq!(
            set_body("web", &["v2=0.30000000000000004".into()])
                .unwrap()
                .to_string(),
            r#"{"percents":{"v2":0.30000000000000004},"rollout":"web"}"#
        );
        assert!(set_body("web", &["v2".into()])
            .unwrap_err()
            .message
            .contains("expected <version>=<percent>"));
        assert_eq!(
            set_body("web", &["v2=x\n".into()]).unwrap_err().message,
            "\"v2=x\\n\": \"x\\n\" is not a number"
        );
    }

    #[test]
    fn server_addresses() {
        let c = Client::new("http://127.0.0.1:9902", None).unwrap();
        assert_eq!(c.base.as_str(), "http://127.0.0.1:9902/");
        let c = Client::new("localhost:9902", None).unwrap();
        assert_eq!(c.base.as_str(), "http://localhost:9902/");
        assert!(Client::new("https://x:1", None).is_err());
        assert!(Client::new("::::", None).is_err());
    }
}

/// The answer to a rollout operation: a write's outcome, and the rollout after it.
#[derive(Deserialize)]
struct RolloutOutcome {
    #[serde(flatten)]
    write: WriteOutcome,
    rollout: Option<Value>,
}

/// `rollout start|pause|resume|abort|promote`: what changed, where the rollout is, and (when the config
/// moved) the wait for the fleet, as for any write.
pub async fn rollout_write(
    client: &Client,
    path: &str,
    body: Value,
    wait: &Wait,
) -> Result<(), CliError> {
    let RolloutOutcome {
        write: outcome,
        rollout,
    } = client.post(path, body).await?;
    for change in &outcome.changes {
        println!("{change}");
    }
    if let Some(rollout) = &rollout {
        println!("{}", rollout_headline(rollout));
    }
    if outcome.changed {
        saved_as(&outcome);
        if wait.enabled {
            wait_for_fleet(client, outcome.version, wait).await?;
        }
    }
    not_durable(&outcome)
}

fn at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(key))
}

fn text<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    at(value, path).and_then(Value::as_str).unwrap_or("")
}

fn number(value: &Value, path: &[&str]) -> f64 {
    at(value, path).and_then(Value::as_f64).unwrap_or(0.0)
}

/// "rollout web: v2 progressing at step 2/5 (5%)".
fn rollout_headline(r: &Value) -> String {
    format!(
        "rollout {}: {} {} at {}",
        text(r, &["rollout"]),
        text(r, &["canary"]),
        text(r, &["phase"]),
        text(r, &["step_name"])
    )
}

/// One test of a rollout, canary against stable: "v2 2.00% (3/150) vs v1 0.00% (0/2850) · evidence 72.1
/// (rolls back at 20)". `bad` names the test's events in the API ("errors", "slow").
fn versus(r: &Value, test: &Value, bad: &str, decimals: usize) -> String {
    let n = |key: &str| number(test, &[key]);
    format!(
        "{} {:.decimals$}% ({}/{}) vs {} {:.decimals$}% ({}/{}) · evidence {} (rolls back at {:.0})",
        text(r, &["canary"]),
        n("canary_rate") * 100.0,
        n(&format!("canary_{bad}")),
        n("canary_requests"),
        text(r, &["stable"]),
        n("stable_rate") * 100.0,
        n(&format!("stable_{bad}")),
        n("stable_requests"),
        crate::rollout::evidence_text(n("e_value")),
        n("threshold"),
    )
}

/// `--metric NAME=EVENTS` and `--metric-requests NAME=REQUESTS`, paired by name, in the order given.
pub fn metric_plans(events: &[String], requests: &[String]) -> Result<Value, CliError> {
    let split = |flag: &str, text: &str| -> Result<(String, String), CliError> {
        text.split_once('=')
            .map(|(name, query)| (name.trim().to_string(), query.trim().to_string()))
            .filter(|(name, _)| !name.is_empty())
            .ok_or_else(|| {
                CliError::refused(format!(
                    "--{flag} {}: give NAME=SELECTOR",
                    canary_router::text::quote(text)
                ))
            })
    };
    let mut by_name: Vec<(String, String)> = Vec::new();
    for text in events {
        let (name, query) = split("metric", text)?;
        if by_name.iter().any(|(n, _)| *n == name) {
            return Err(CliError::refused(format!("--metric {name}: given twice")));
        }
        by_name.push((name, query));
    }
    let mut paired: std::collections::BTreeMap<String, String> = Default::default();
    for text in requests {
        let (name, query) = split("metric-requests", text)?;
        if !by_name.iter().any(|(n, _)| *n == name) {
            return Err(CliError::refused(format!(
                "--metric-requests {name}: no --metric {name}=… to count out of"
            )));
        }
        if paired.insert(name.clone(), query).is_some() {
            return Err(CliError::refused(format!(
                "--metric-requests {name}: given twice"
            )));
        }
    }
    let mut plans = Vec::new();
    for (name, events) in by_name {
        let Some(requests) = paired.remove(&name) else {
            return Err(CliError::refused(format!(
                "--metric {name}: give what its events are counted out of, --metric-requests {name}=SELECTOR"
            )));
        };
        plans.push(json!({ "name": name, "events": events, "requests": requests }));
    }
    Ok(Value::Array(plans))
}

fn print_rollout(r: &Value) {
    println!("{}", rollout_headline(r));
    if let Some(held) = r.get("held").and_then(Value::as_str) {
        println!("  held: {held}");
    }
    let steps: Vec<&str> = r
        .get("steps")
        .and_then(Value::as_array)
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    println!(
        "  plan: steps {} · hold {} · max {} a step · at least {} canary requests a step · false-rollback budget {}",
        steps.join(","),
        humantime::format_duration(Duration::from_secs(number(r, &["plan", "hold_s"]) as u64)),
        humantime::format_duration(Duration::from_secs(number(r, &["plan", "max_step_s"]) as u64)),
        number(r, &["plan", "min_canary_requests"]),
        number(r, &["plan", "false_rollback_budget"]),
    );
    let source = match text(r, &["plan", "evidence"]) {
        "prometheus" => match text(r, &["plan", "prometheus_selector"]) {
            "" => "Prometheus (serve --prometheus-url)".to_string(),
            selector => format!("Prometheus (serve --prometheus-url), series {{{selector}}}"),
        },
        _ => "the Envoys' load reports and stats streams".to_string(),
    };
    println!("  evidence from: {source}");
    let errors = at(r, &["evidence", "errors"]).unwrap_or(&Value::Null);
    println!("  errors: {}", versus(r, errors, "errors", 2));
    let compared = at(r, &["latency", "compared"])
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let checks = at(r, &["latency", "checks"])
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if !compared {
        let why = match text(r, &["plan", "evidence"]) {
            "prometheus" => "started before this canaryctl compared latency from Prometheus",
            _ => "the Envoys streamed no stats when the rollout started",
        };
        println!("  latency: not compared ({why})");
    } else if checks.is_empty() {
        println!(
            "  latency: learning stable's distribution ({} of {} requests)",
            number(r, &["latency", "baseline_requests"]),
            crate::rollout::LATENCY_BASELINE
        );
    }
    for check in &checks {
        println!(
            "  latency, slower than {}: {}",
            text(check, &["slower_than"]),
            versus(r, check, "slow", 1)
        );
    }
    for metric in at(r, &["metrics"])
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        println!(
            "  metric {}: {}",
            text(metric, &["name"]),
            versus(r, metric, "events", 2)
        );
    }
    let signatures = at(r, &["findings", "signatures"])
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if !signatures.is_empty() {
        let count = |class: &str| {
            signatures
                .iter()
                .filter(|s| text(s, &["class"]) == class)
                .count()
        };
        println!(
            "  findings: {} error signatures ({} new, {} worse, {} known){}: `canaryctl rollout findings {}`",
            signatures.len(),
            count("new"),
            count("worse"),
            count("known"),
            if at(r, &["findings", "roll_back"]).and_then(Value::as_bool) == Some(false) {
                ", not a rollback reason (--no-rollback-on-findings)"
            } else {
                ""
            },
            text(r, &["rollout"])
        );
    }
    // The canary's hosts: what the last tick saw, and whether the step is held because it is down.
    let last_tick = at(r, &["recent_ticks"])
        .and_then(Value::as_array)
        .and_then(|ticks| ticks.last());
    if let Some(up) = last_tick
        .and_then(|t| t.get("canary_up_on"))
        .and_then(Value::as_array)
    {
        let (healthy, reporting) = (
            up.first().and_then(Value::as_u64).unwrap_or(0),
            up.get(1).and_then(Value::as_u64).unwrap_or(0),
        );
        if reporting > 0 {
            println!("  canary hosts: healthy on {healthy} of {reporting} Envoys that report them");
        }
    }
    if let Some(why) = at(r, &["availability", "why"]).and_then(Value::as_str) {
        println!(
            "  held: {why} (since {})",
            when(number(r, &["availability", "down_since_unix"]) as u64)
        );
    }
    println!(
        "  this step: {} canary requests in {}s of complete evidence, since {}",
        number(r, &["step_canary_requests"]),
        number(r, &["step_covered_s"]),
        when(number(r, &["step_started_unix"]) as u64)
    );
    if let Some(gap) = r.get("evidence_gap").filter(|g| !g.is_null()) {
        println!(
            "  waiting for evidence since {} (steps do not pass without it):",
            when(number(gap, &["since_unix"]) as u64)
        );
        for line in gap
            .get("missing")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            println!("    {}", line.as_str().unwrap_or_default());
        }
    }
    let members = at(r, &["fleet", "envoys"])
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if !members.is_empty() {
        let applied = members
            .iter()
            .filter(|m| text(m, &["state"]) == "applied")
            .count();
        let clusters: Vec<&str> = at(r, &["fleet", "clusters"])
            .and_then(Value::as_array)
            .map(|c| c.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!(
            "  fleet: {applied} of {} Envoys ({}) serve its last change (version {}){}",
            members.len(),
            clusters.join(", "),
            number(r, &["fleet", "change_version"]),
            if at(r, &["fleet", "allow_missing_envoys"]).and_then(Value::as_bool) == Some(true) {
                "; steps may pass without disconnected ones (--allow-missing-envoys)"
            } else {
                ""
            }
        );
        for m in members.iter().filter(|m| text(m, &["state"]) != "applied") {
            println!("    {}", text(m, &["why"]));
        }
    }
    if let Some(reason) = r.get("reason").and_then(Value::as_str) {
        println!("  why: {reason}");
    }
    if let Some(history) = r.get("history").and_then(Value::as_array) {
        println!("  history:");
        for event in history.iter().rev().take(10).rev() {
            let at = UNIX_EPOCH + Duration::from_secs(number(event, &["at_unix"]) as u64);
            println!(
                "    {}  {}",
                humantime::format_rfc3339_seconds(at),
                text(event, &["what"])
            );
        }
    }
}

/// How long `rollout status --watch` waits, after a rollout ended, for connected Envoys to apply its last
/// change before it names them and exits 3.
const APPLY_GRACE_S: u64 = 10;

/// `rollout status [<rollout>] [--json] [--watch]`. With --watch it redraws every 2 s until the rollout ends
/// and its last change is applied: exit 0 when promoted, 1 when rolled back, 3 when Envoys of its fleet did not
/// apply its last change (disconnected, or refused it).
pub async fn rollout_status(
    client: &Client,
    name: Option<&str>,
    as_json: bool,
    watch: bool,
) -> Result<(), CliError> {
    loop {
        let body: Value = client.get("/v1/rollouts").await?;
        let all = body
            .get("rollouts")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let shown: Vec<&Value> = all
            .iter()
            .filter(|r| name.is_none_or_eq(text(r, &["rollout"])))
            .collect();
        if let Some(name) = name {
            if shown.is_empty() {
                return Err(no_rollout(name));
            }
        }
        if as_json {
            let list: Vec<&Value> = shown.clone();
            println!(
                "{}",
                serde_json::to_string_pretty(&list).unwrap_or_default()
            );
        } else if shown.is_empty() {
            println!("no progressive rollout");
        } else {
            for (i, r) in shown.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_rollout(r);
            }
        }
        if !watch {
            return Ok(());
        }
        let phases: Vec<&str> = shown.iter().map(|r| text(r, &["phase"])).collect();
        if !phases.is_empty()
            && phases
                .iter()
                .all(|p| *p == "promoted" || *p == "rolled_back")
        {
            // Ended: but did its last change reach every Envoy of its fleet? Wait for those still applying
            // it; name those that cannot (disconnected, refused).
            let not_applied: Vec<&Value> = shown
                .iter()
                .flat_map(|r| {
                    at(r, &["fleet", "not_applied"])
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                })
                .collect();
            // An Envoy whose stream is open but that applies nothing for this long is as good as cut off.
            let ended = shown
                .iter()
                .map(|r| number(r, &["finished_unix"]) as u64)
                .max()
                .unwrap_or_default();
            let waited = crate::state::now_unix().saturating_sub(ended);
            let applying = waited < APPLY_GRACE_S
                && not_applied.iter().any(|m| text(m, &["state"]) == "behind");
            if !applying {
                if !not_applied.is_empty() {
                    let names: Vec<&str> = not_applied.iter().map(|m| text(m, &["why"])).collect();
                    return Err(CliError {
                        message: format!(
                            "{} ended, but its last change did not reach every Envoy of its fleet: {}",
                            phases.join(", "),
                            names.join("; ")
                        ),
                        exit_code: EXIT_DISCONNECTED,
                    });
                }
                if phases.contains(&"rolled_back") {
                    return Err(CliError::refused("rolled back"));
                }
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        println!();
    }
}

/// `rollout findings <rollout> [--json]`: the error signatures, most evident first.
pub async fn rollout_findings(client: &Client, name: &str, as_json: bool) -> Result<(), CliError> {
    let body: Value = client.get("/v1/rollouts").await?;
    let rollout = body
        .get("rollouts")
        .and_then(Value::as_array)
        .and_then(|all| all.iter().find(|r| text(r, &["rollout"]) == name))
        .ok_or_else(|| no_rollout(name))?;
    let findings = rollout.get("findings").cloned().unwrap_or(Value::Null);
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&findings).unwrap_or_default()
        );
        return Ok(());
    }
    println!("{}", rollout_headline(rollout));
    let (canary, stable) = (text(rollout, &["canary"]), text(rollout, &["stable"]));
    println!(
        "  {} requests on {canary}, {} on {stable} · the k-th signature to arrive rolls back at evidence k(k+1)/{}{}",
        number(&findings, &["canary_requests"]),
        number(&findings, &["stable_requests"]),
        number(&findings, &["alpha"]),
        if findings.get("roll_back").and_then(Value::as_bool) == Some(false) {
            " (off: --no-rollback-on-findings)"
        } else {
            ""
        }
    );
    let signatures = findings
        .get("signatures")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if signatures.is_empty() {
        println!("  no error signature yet");
        return Ok(());
    }
    let mut rows: Vec<[String; 6]> = vec![[
        "CLASS".to_string(),
        format!("{canary} (CANARY)"),
        format!("{stable} (STABLE)"),
        "EVIDENCE".to_string(),
        "THRESHOLD".to_string(),
        "SIGNATURE".to_string(),
    ]];
    rows.extend(signatures.iter().map(|s| {
        let count =
            |n: &str, r: &str| format!("{} ({:.2}%)", number(s, &[n]), number(s, &[r]) * 100.0);
        [
            format!(
                "{}{}",
                text(s, &["class"]),
                if s.get("rolls_back").and_then(Value::as_bool) == Some(true) {
                    " ⟲"
                } else {
                    ""
                }
            ),
            count("canary", "canary_rate"),
            count("stable", "stable_rate"),
            crate::rollout::evidence_text(number(s, &["e_value"])),
            format!("{:.0}", number(s, &["threshold"])),
            format!("{} {}", text(s, &["origin"]), text(s, &["signature"])),
        ]
    }));
    let mut lines = table_lines(&rows).into_iter();
    if let Some(heads) = lines.next() {
        println!("  {heads}");
    }
    for (line, s) in lines.zip(&signatures) {
        println!("  {line}");
        println!("      e.g. {}", text(s, &["example"]));
    }
    if number(&findings, &["set_aside"]) > 0.0 {
        println!(
            "  {} signatures seen only on {stable} set aside to make room (findings keep at most {} bytes a rollout)",
            number(&findings, &["set_aside"]),
            number(&findings, &["max_bytes"])
        );
    }
    if number(&findings, &["untracked"]) > 0.0 {
        println!(
            "  and {} failures that found no room (not tested: findings keep at most {} bytes a rollout)",
            number(&findings, &["untracked"]),
            number(&findings, &["max_bytes"])
        );
    }
    Ok(())
}

trait NoneOrEq {
    fn is_none_or_eq(&self, other: &str) -> bool;
}

impl NoneOrEq for Option<&str> {
    fn is_none_or_eq(&self, other: &str) -> bool {
        match self {
            None => true,
            Some(name) => *name == other,
        }
    }
}
