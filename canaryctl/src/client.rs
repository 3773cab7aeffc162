//! The CLI side: talks to `canaryctl serve`'s admin API, prints what changed, and waits until every
//! connected Envoy has applied the new version (or one refused it, or the wait times out).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::server::{EnvoyStatus, WriteOutcome};

/// `GET /v1/status`, as the CLI reads it.
#[derive(Deserialize)]
struct StatusBody {
    desired: DesiredBody,
    envoys: Vec<EnvoyStatus>,
}

#[derive(Deserialize)]
struct DesiredBody {
    version: u64,
    updated_at_unix: u64,
    summary: String,
}

/// A dry run of `POST /v1/apply`.
#[derive(Deserialize)]
struct PreviewBody {
    version: u64,
    changes: Vec<String>,
}
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
    fn refused(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            exit_code: 1,
        }
    }
}

pub struct Client {
    host: String,
    port: u16,
    token: Option<String>,
}

impl Client {
    /// `server` is the admin API's address: `http://127.0.0.1:9902` or `127.0.0.1:9902`.
    pub fn new(server: &str, token: Option<String>) -> Result<Self, CliError> {
        let rest = server.strip_prefix("http://").unwrap_or(server);
        if server.starts_with("https://") {
            return Err(CliError::transport(
                "the admin API speaks plain HTTP on loopback; use http://",
            ));
        }
        let authority = rest.split('/').next().unwrap_or(rest);
        let (host, port) = authority
            .rsplit_once(':')
            .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_string(), p)))
            .ok_or_else(|| {
                CliError::transport(format!("--server {server:?}: expected host:port"))
            })?;
        Ok(Self { host, port, token })
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), CliError> {
        let unreachable = |err: std::io::Error| {
            CliError::transport(format!(
                "cannot reach canaryctl serve at {}:{}: {err}",
                self.host, self.port
            ))
        };
        let mut stream = tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| {
            CliError::transport(format!(
                "cannot reach canaryctl serve at {}:{}: timed out",
                self.host, self.port
            ))
        })?
        .map_err(unreachable)?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n",
            self.host
        );
        if let Some(token) = &self.token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        if method != "GET" {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(unreachable)?;
        stream
            .write_all(body.as_bytes())
            .await
            .map_err(unreachable)?;
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
            .await
            .map_err(|_| CliError::transport("canaryctl serve did not answer within 30 s"))?
            .map_err(unreachable)?;
        parse_response(&raw)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let (status, body) = self.request("GET", path, None).await?;
        typed(status, body)
    }

    async fn post<T: DeserializeOwned>(&self, path: &str, body: Value) -> Result<T, CliError> {
        let (status, answer) = self.request("POST", path, Some(&body)).await?;
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

/// Parse an HTTP/1.1 response read to EOF (Connection: close), chunked or not.
fn parse_response(raw: &[u8]) -> Result<(u16, Value), CliError> {
    let bad = || CliError::transport("canaryctl serve sent a malformed HTTP response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = String::from_utf8_lossy(raw.get(..split).ok_or_else(bad)?).to_string();
    let mut body = raw.get(split + 4..).ok_or_else(bad)?.to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(bad)?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body).ok_or_else(bad)?;
    }
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
    };
    Ok((status, value))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(data.get(..line_end)?).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = data.get(line_end + 2..)?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
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
    if status.envoys.is_empty() {
        println!("no Envoy has connected");
        return Ok(());
    }
    println!();
    let mut rows = vec![[
        "ENVOY".to_string(),
        "CLUSTER".to_string(),
        "STREAM".to_string(),
        "APPLIED".to_string(),
        "NOTE".to_string(),
    ]];
    for e in &status.envoys {
        let applied = match e.acked_version {
            Some(v) if v == version => format!("{v} (current)"),
            Some(v) => format!("{v} (behind)"),
            None => "-".to_string(),
        };
        let note = match &e.nack {
            Some(n) => format!("NACK of version {}: {}", n.version, n.message),
            None => format!("since {}", ago(e.last_change_unix)),
        };
        let stream = if e.connected { "connected" } else { "gone" };
        rows.push([
            e.node_id.clone(),
            e.cluster.clone(),
            stream.to_string(),
            applied,
            note,
        ]);
    }
    let mut widths = [0usize; 4];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row.iter()) {
            *width = (*width).max(cell.len());
        }
    }
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            match widths.get(i) {
                Some(w) => line.push_str(&format!("{cell:<w$}  ")),
                None => line.push_str(cell),
            }
        }
        println!("{}", line.trim_end());
    }
    Ok(())
}

fn ago(unix: u64) -> String {
    let secs = crate::state::now_unix().saturating_sub(unix);
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

/// How a write command waits for the fleet.
pub struct Wait {
    pub enabled: bool,
    pub timeout: Duration,
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
    println!("saved as version {}", outcome.version);
    if wait.enabled {
        wait_for_fleet(client, outcome.version, wait.timeout).await?;
    }
    Ok(())
}

/// Poll until every connected Envoy has ACKed `version`; any NACK of it, or the timeout, is an error.
pub async fn wait_for_fleet(
    client: &Client,
    version: u64,
    timeout: Duration,
) -> Result<(), CliError> {
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_line = String::new();
    loop {
        let status: StatusBody = client.get("/v1/status").await?;
        let envoys: Vec<&EnvoyStatus> = status.envoys.iter().filter(|e| e.connected).collect();
        if let Some((envoy, nack)) = envoys.iter().find_map(|e| {
            e.nack
                .as_ref()
                .filter(|n| n.version == version)
                .map(|n| (e, n))
        }) {
            if tty && !last_line.is_empty() {
                eprintln!();
            }
            return Err(CliError::refused(format!(
                "Envoy {} refused version {version}: {} (it keeps serving version {})",
                envoy.node_id,
                nack.message,
                envoy
                    .acked_version
                    .map_or("none".to_string(), |v| v.to_string())
            )));
        }
        let done = |e: &&&EnvoyStatus| e.acked_version.is_some_and(|v| v >= version);
        let applied = envoys.iter().filter(done).count();
        let elapsed = started.elapsed().as_secs_f64();
        if envoys.is_empty() {
            println!("no Envoy is connected: version {version} is saved and will be served when they connect");
            return Ok(());
        }
        if applied == envoys.len() {
            if tty && !last_line.is_empty() {
                eprint!("\r{}\r", " ".repeat(last_line.len()));
            }
            println!(
                "applied by {applied}/{} Envoys in {elapsed:.2} s",
                envoys.len()
            );
            return Ok(());
        }
        let line = format!(
            "waiting for Envoys to apply version {version}: {applied}/{} ({elapsed:.1} s)",
            envoys.len()
        );
        if tty {
            eprint!("\r{line}");
        } else if line != last_line {
            eprintln!("{line}");
        }
        last_line = line;
        if started.elapsed() >= timeout {
            if tty {
                eprintln!();
            }
            let pending: Vec<&str> = envoys
                .iter()
                .filter(|e| !done(e))
                .map(|e| e.node_id.as_str())
                .collect();
            return Err(CliError::refused(format!(
                "timed out after {:.0} s: {} of {} Envoys have not applied version {version} ({})",
                timeout.as_secs_f64(),
                pending.len(),
                envoys.len(),
                pending.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn set_body(rollout: &str, assignments: &[String]) -> Result<Value, CliError> {
    let mut percents = serde_json::Map::new();
    for assignment in assignments {
        let (version, percent) = assignment.rsplit_once('=').ok_or_else(|| {
            CliError::refused(format!(
                "{assignment:?}: expected <version>=<percent>, e.g. v2=12.5"
            ))
        })?;
        let percent: f64 = percent.trim_end_matches('%').parse().map_err(|_| {
            CliError::refused(format!("{assignment:?}: {percent:?} is not a number"))
        })?;
        percents.insert(version.to_string(), json!(percent));
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
    fn responses_parse_plain_and_chunked() {
        let (status, body) =
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"a\": true}").unwrap();
        assert_eq!((status, body), (200, json!({"a": true})));
        let chunked = b"HTTP/1.1 401 Unauthorized\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"err\r\na\r\nor\": \"no\"}\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).unwrap(),
            (401, json!({"error": "no"}))
        );
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn set_arguments_are_version_equals_percent() {
        assert_eq!(
            set_body("web", &["v2=12.5".into(), "v3=1%".into()]).unwrap(),
            json!({"rollout": "web", "percents": {"v2": 12.5, "v3": 1.0}})
        );
        assert!(set_body("web", &["v2".into()])
            .unwrap_err()
            .message
            .contains("expected <version>=<percent>"));
        assert!(set_body("web", &["v2=x".into()])
            .unwrap_err()
            .message
            .contains("is not a number"));
    }

    #[test]
    fn server_addresses() {
        let c = Client::new("http://127.0.0.1:9902", None).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 9902));
        assert!(Client::new("localhost", None).is_err());
        assert!(Client::new("https://x:1", None).is_err());
    }
}
