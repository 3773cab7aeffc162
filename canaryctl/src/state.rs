//! The desired state canaryctl serves: one plugin configuration and its version, kept durable in a state
//! file with the fleet it has seen, and the edits operators make to it (set, promote, roll back, apply).
//!
//! Every edit produces a whole new configuration that must pass the filter's own validation (the same
//! Rust code the `.wasm` runs), so nothing the filter would refuse is ever saved or pushed, and canaryctl
//! can always restart from what it saved.

use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use canary_router::config::{
    self, invalid_percent, percent_text, Percent, RawCanary, RawConfig, RawRollout,
};
use serde::{Deserialize, Serialize};

use crate::fleet::KnownEnvoy;
use crate::rollout::Rollout;

/// The configuration being served and its version (`version_info` on the wire; it only grows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Desired {
    pub version: u64,
    pub updated_at_unix: u64,
    pub config: RawConfig,
}

/// Why an edit or a state file was refused. `Display` is the one line the operator sees.
#[derive(Debug, Clone, PartialEq)]
pub enum StateError {
    /// The result would not pass the filter's validation: the same text the filter would log.
    Invalid(String),
    /// The edit names something the configuration does not have, or is ambiguous.
    Edit(String),
    /// The state file could not be read or written, or is not a state file.
    Io(String),
    /// The state cannot be saved, and the change would add canary traffic: refused until it can.
    Unsaved(String),
    /// A judge's write after this replica lost the lead: nothing was written.
    NotLeader,
    /// The state file is fine but the config it holds is refused by this build's validation (saved by an
    /// older canaryctl, or edited by hand): reported as that, with the way to recover.
    SavedConfigRefused {
        path: String,
        version: u64,
        reason: String,
    },
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Invalid(msg) => write!(f, "invalid config: {msg}"),
            StateError::Edit(msg) | StateError::Io(msg) | StateError::Unsaved(msg) => {
                f.write_str(msg)
            }
            StateError::NotLeader => f.write_str(
                "this replica no longer leads the rollouts: the write was not made (the leader judges)",
            ),
            StateError::SavedConfigRefused {
                path,
                version,
                reason,
            } => write!(
                f,
                "{path}: the config saved as version {version} is refused: {reason}. Nothing was changed. \
                 To recover, start once with --recover-config FILE: a valid config that replaces it as \
                 version {} and keeps the fleet (see docs/canaryctl.md)",
                version + 1
            ),
        }
    }
}

impl std::error::Error for StateError {}

/// A unix time as people read it in a status line: "2026-12-06T20:31:02Z".
pub fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
        .to_string()
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Check a configuration with the filter's validation.
pub fn validate(config: &RawConfig) -> Result<(), StateError> {
    config
        .validate()
        .map(|_| ())
        .map_err(|err| StateError::Invalid(err.to_string()))
}

/// Parse and validate a plugin configuration given as JSON text.
pub fn parse_config(json: &[u8]) -> Result<RawConfig, StateError> {
    let raw = config::parse_raw(json).map_err(|err| StateError::Invalid(err.to_string()))?;
    validate(&raw)?;
    Ok(raw)
}

/// Read and validate a plugin configuration held in a JSON value (an API body).
pub fn config_from_value(value: serde_json::Value) -> Result<RawConfig, StateError> {
    let raw = config::from_value(value).map_err(|err| StateError::Invalid(err.to_string()))?;
    validate(&raw)?;
    Ok(raw)
}

/// The state file as written: the desired state, the fleet, and the progressive rollouts.
#[derive(Serialize)]
struct Stored<'a> {
    /// The replica that wrote it (a store shared by replicas), for whoever reads the store.
    #[serde(skip_serializing_if = "Option::is_none")]
    written_by: Option<&'a str>,
    version: u64,
    updated_at_unix: u64,
    config: &'a RawConfig,
    fleet: &'a [KnownEnvoy],
    rollouts: &'a [Rollout],
}

/// The state file as read: the config is checked apart, so that a refused config is reported as that.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Loaded {
    #[serde(default)]
    #[allow(dead_code)]
    // read to be accepted; what a replica serves does not depend on who wrote it
    written_by: Option<String>,
    version: u64,
    updated_at_unix: u64,
    config: serde_json::Value,
    #[serde(default)]
    fleet: Vec<KnownEnvoy>,
    #[serde(default)]
    rollouts: Vec<Rollout>,
}

/// What a state file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    pub desired: Desired,
    pub fleet: Vec<KnownEnvoy>,
    pub rollouts: Vec<Rollout>,
}

/// The durable state file: written whole to a temporary file (mode 0600: it holds the override tokens),
/// fsynced, renamed over the old one, and the directory fsynced, so a crash leaves either the old state
/// or the new one.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The saved state, `None` when there is no file yet. A file that does not parse, or whose config is
    /// refused, is an error: starting from nothing would silently drop what operators set.
    pub fn load(&self) -> Result<Option<Saved>, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                // A link to nothing is a state someone meant to keep (a moved volume, a typo): never start
                // from nothing in its place.
                if let Ok(target) = std::fs::read_link(&self.path) {
                    return Err(StateError::Io(format!(
                        "{}: a symbolic link to {}, which does not exist: refusing to start a new state in its \
                         place (fix the link, or remove it and start with --init-config)",
                        self.shown(),
                        target.display()
                    )));
                }
                return Ok(None);
            }
            Err(err) => return Err(StateError::Io(format!("{}: {err}", self.shown()))),
        };
        self.keep_private();
        decode(&bytes, &self.shown()).map(Some)
    }

    /// A state file whose config is refused, with `config` in its place as the next version; its version
    /// count and fleet are kept. Refused when the file is missing, unreadable, or its config is valid.
    pub fn recover(&self, config: RawConfig) -> Result<Saved, StateError> {
        match self.load() {
            Err(StateError::SavedConfigRefused { .. }) => {
                let bytes = std::fs::read(&self.path)
                    .map_err(|err| StateError::Io(format!("{}: {err}", self.shown())))?;
                let saved = recovered(&bytes, &self.shown(), config)?;
                self.save(&saved.desired, &saved.fleet, &saved.rollouts)?;
                Ok(saved)
            }
            Ok(Some(saved)) => Err(StateError::Edit(format!(
                "{}: its config (version {}) is valid: --recover-config only replaces a refused one; \
                 change a valid config with `canaryctl apply`",
                self.shown(),
                saved.desired.version
            ))),
            Ok(None) => Err(StateError::Edit(format!(
                "{}: no state file to recover: start with --init-config FILE",
                self.shown()
            ))),
            Err(err) => Err(err),
        }
    }

    /// Tightens a state file readable by others to 0600 (it holds the override tokens).
    fn keep_private(&self) {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(&self.path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    let _ = std::fs::set_permissions(
                        &self.path,
                        std::fs::Permissions::from_mode(0o600),
                    );
                }
            }
        }
    }

    pub fn save(
        &self,
        desired: &Desired,
        fleet: &[KnownEnvoy],
        rollouts: &[Rollout],
    ) -> Result<(), StateError> {
        let io = |err: std::io::Error| StateError::Io(format!("{}: {err}", self.shown()));
        // Through symbolic links: the file they point to is replaced, and the links stay.
        let mut path = self.path.clone();
        for _ in 0..8 {
            let Ok(target) = std::fs::read_link(&path) else {
                break;
            };
            path = match path.parent() {
                Some(parent) if target.is_relative() => parent.join(target),
                _ => target,
            };
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "state".to_string());
        let body = encode(desired, fleet, rollouts, None)?;
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let result = (|| {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&tmp)?;
            file.write_all(&body)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(io)
    }
}

/// A state as stored (a state file, or a store's value): the desired state, the fleet, the rollouts. Refused
/// when one of the rollouts' evidence is not a finite number: JSON has no such numbers (they would be saved as
/// null), and a state that cannot be restarted from is never written.
pub fn encode(
    desired: &Desired,
    fleet: &[KnownEnvoy],
    rollouts: &[Rollout],
    written_by: Option<&str>,
) -> Result<Vec<u8>, StateError> {
    if let Some((rollout, found)) = rollouts
        .iter()
        .map(|r| (r, r.non_finite()))
        .find(|(_, found)| !found.is_empty())
    {
        return Err(StateError::Io(format!(
            "cannot save the state: rollout {}: {} evidence is not a finite number",
            rollout.plan.rollout,
            found.join(", ")
        )));
    }
    let stored = Stored {
        written_by,
        version: desired.version,
        updated_at_unix: desired.updated_at_unix,
        config: &desired.config,
        fleet,
        rollouts,
    };
    let mut body = serde_json::to_vec_pretty(&stored)
        .map_err(|err| StateError::Io(format!("cannot encode the state: {err}")))?;
    body.push(b'\n');
    Ok(body)
}

/// A stored state read back (`shown`: where it was read, for messages). One that does not parse is an error;
/// one whose config this build refuses is [`StateError::SavedConfigRefused`]. A config saved by an older
/// canaryctl is migrated, and older rollouts' evidence recovered, each said in a line of the log.
pub fn decode(bytes: &[u8], shown: &str) -> Result<Saved, StateError> {
    let loaded: Loaded = serde_json::from_slice(bytes).map_err(|err| {
        StateError::Io(format!(
            "{shown}: not a canaryctl state: {}",
            canary_router::text::one_line(&err.to_string(), canary_router::text::MAX_LINE)
        ))
    })?;
    let refused = |reason: String| StateError::SavedConfigRefused {
        path: shown.to_string(),
        version: loaded.version,
        reason,
    };
    let mut loaded_config = loaded.config;
    for line in migrate(&mut loaded_config) {
        eprintln!("canaryctl: {shown}: {line}");
    }
    let config = config::from_value(loaded_config).map_err(|err| refused(err.to_string()))?;
    config.validate().map_err(|err| refused(err.to_string()))?;
    let mut rollouts = loaded.rollouts;
    for rollout in &mut rollouts {
        rollout.findings.number_legacy();
        if let Some(line) = rollout.recover_non_finite(now_unix()) {
            eprintln!("canaryctl: {shown}: {line}");
        }
    }
    Ok(Saved {
        desired: Desired {
            version: loaded.version,
            updated_at_unix: loaded.updated_at_unix,
            config,
        },
        fleet: loaded.fleet,
        rollouts,
    })
}

/// A stored state whose config is refused, with `config` in its place as the next version; its version count,
/// fleet and rollouts are kept.
pub fn recovered(bytes: &[u8], shown: &str, config: RawConfig) -> Result<Saved, StateError> {
    let loaded: Loaded =
        serde_json::from_slice(bytes).map_err(|err| StateError::Io(format!("{shown}: {err}")))?;
    Ok(Saved {
        desired: Desired {
            version: loaded.version + 1,
            updated_at_unix: now_unix(),
            config,
        },
        fleet: loaded.fleet,
        rollouts: loaded.rollouts,
    })
}

/// Brings a config saved by an older canaryctl to today's contract, saying what changed. The removed
/// `stable_by_default_route` is dropped, not translated: it claimed Envoy's default route serves the
/// rollout's stable, which was false after any promotion, and only the operator knows which version that
/// route serves. Without it the filter writes the route header for every request, which is always right.
pub fn migrate(config: &mut serde_json::Value) -> Vec<String> {
    let mut lines = Vec::new();
    let Some(rollouts) = config
        .get_mut("rollouts")
        .and_then(serde_json::Value::as_array_mut)
    else {
        return lines;
    };
    for rollout in rollouts.iter_mut() {
        let Some(fields) = rollout.as_object_mut() else {
            continue;
        };
        if fields.remove("stable_by_default_route").is_some() {
            let name = fields
                .get("name")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("?")
                .to_string();
            lines.push(format!(
                "rollout {}: dropped stable_by_default_route (removed: after a promotion it sent users to \
                 the old version); the filter now writes the route header for every request of it. Name the \
                 version Envoy's default route serves with \"default_route_version\" (canaryctl apply) to \
                 save that write again",
                canary_router::text::quote(&name)
            ));
        }
    }
    lines
}

/// What an edit did, one human-readable line per change.
pub type Changes = Vec<String>;

fn rollout_mut<'c>(
    config: &'c mut RawConfig,
    name: &str,
) -> Result<&'c mut RawRollout, StateError> {
    let known: Vec<String> = config.rollouts.iter().map(|r| r.name.clone()).collect();
    config
        .rollouts
        .iter_mut()
        .find(|r| r.name == name)
        .ok_or_else(|| {
            StateError::Edit(format!(
                "no rollout named {} (rollouts: {})",
                canary_router::text::quote(name),
                known.join(", ")
            ))
        })
}

fn pct(percent: Percent) -> String {
    percent_text(percent.basis_points())
}

/// Set canary percentages of one rollout, each given as the text of a number: `[("v2", "25")]`. A percent
/// the contract refuses gets the filter's own message, at the canary's path.
pub fn set_percents(
    config: &RawConfig,
    rollout: &str,
    percents: &[(String, String)],
) -> Result<(RawConfig, Changes), StateError> {
    if percents.is_empty() {
        return Err(StateError::Edit(
            "nothing to set: give <version>=<percent>".to_string(),
        ));
    }
    let mut next = config.clone();
    let rollout_index = next
        .rollouts
        .iter()
        .position(|r| r.name == rollout)
        .unwrap_or_default();
    let target = rollout_mut(&mut next, rollout)?;
    let mut changes = Changes::new();
    for (version, text) in percents {
        let canaries: Vec<String> = target.canaries.iter().map(|c| c.version.clone()).collect();
        let stable = target.stable.clone();
        let (canary_index, canary) = target
            .canaries
            .iter_mut()
            .enumerate()
            .find(|(_, c)| &c.version == version)
            .ok_or_else(|| {
                if *version == stable {
                    StateError::Edit(format!(
                        "{version} is the stable version of {rollout}: it gets what the canaries do not; \
                         set a canary ({}) or promote one",
                        canaries.join(", ")
                    ))
                } else {
                    StateError::Edit(format!(
                        "{rollout} has no canary {} (canaries: {})",
                        canary_router::text::quote(version),
                        canaries.join(", ")
                    ))
                }
            })?;
        let percent = Percent::from_text(text).ok_or_else(|| {
            StateError::Invalid(
                invalid_percent(
                    format!("rollouts[{rollout_index}].canaries[{canary_index}].percent"),
                    text,
                )
                .to_string(),
            )
        })?;
        if canary.percent != percent {
            changes.push(format!(
                "{rollout}: {version} {} → {}",
                pct(canary.percent),
                pct(percent)
            ));
            canary.percent = percent;
        }
    }
    validate(&next)?;
    Ok((next, changes))
}

/// Blue/green flip: `version` (the rollout's only canary when `None`) becomes stable and takes 100 % of
/// the traffic; the old stable stays as a canary at 0 %, so rules and overrides naming it stay valid and a
/// later `set` can send traffic back to it.
pub fn promote(
    config: &RawConfig,
    rollout: &str,
    version: Option<&str>,
) -> Result<(RawConfig, Changes), StateError> {
    let mut next = config.clone();
    let target = rollout_mut(&mut next, rollout)?;
    let names: Vec<String> = target.canaries.iter().map(|c| c.version.clone()).collect();
    let chosen = match version {
        Some(v) => v.to_string(),
        None if names.len() == 1 => names.first().cloned().unwrap_or_default(),
        None => {
            return Err(StateError::Edit(format!(
                "{rollout} has several canaries ({}): name the one to promote",
                names.join(", ")
            )))
        }
    };
    let position = target
        .canaries
        .iter()
        .position(|c| c.version == chosen)
        .ok_or_else(|| {
            StateError::Edit(format!(
                "{rollout} has no canary {} (canaries: {})",
                canary_router::text::quote(&chosen),
                names.join(", ")
            ))
        })?;
    let old_stable = std::mem::replace(&mut target.stable, chosen.clone());
    let mut changes = vec![format!(
        "{rollout}: stable {old_stable} → {chosen} (now 100%)"
    )];
    changes.extend(zero_canaries(rollout, target, Some(&chosen)));
    if let Some(slot) = target.canaries.get_mut(position) {
        *slot = RawCanary {
            version: old_stable.clone(),
            percent: Percent::ZERO,
        };
    }
    changes.push(format!("{rollout}: {old_stable} kept as a canary at 0%"));
    if let Some(default) = target.default_route_version.as_deref() {
        if default != chosen {
            changes.push(format!(
                "{rollout}: Envoy's default route still serves {default} (default_route_version): {chosen}'s \
                 users get the route header written"
            ));
        }
    }
    validate(&next)?;
    Ok((next, changes))
}

/// Every canary of the rollout to 0 % at once: all users back on stable.
pub fn rollback(config: &RawConfig, rollout: &str) -> Result<(RawConfig, Changes), StateError> {
    let mut next = config.clone();
    let changes = zero_canaries(rollout, rollout_mut(&mut next, rollout)?, None);
    validate(&next)?;
    Ok((next, changes))
}

/// Every canary of `target` to 0 %, saying which changed (`quiet`: a version whose change is told
/// otherwise, e.g. the one being promoted).
fn zero_canaries(rollout: &str, target: &mut RawRollout, quiet: Option<&str>) -> Changes {
    let mut changes = Changes::new();
    for canary in &mut target.canaries {
        if canary.percent != Percent::ZERO && quiet != Some(canary.version.as_str()) {
            changes.push(format!(
                "{rollout}: {} {} → 0%",
                canary.version,
                pct(canary.percent)
            ));
        }
        canary.percent = Percent::ZERO;
    }
    changes
}

/// Replace the whole configuration; the changes are its diff against the current one.
pub fn apply(config: &RawConfig, new: RawConfig) -> Result<(RawConfig, Changes), StateError> {
    validate(&new)?;
    let changes = diff(config, &new);
    Ok((new, changes))
}

/// What a secret shows as in diffs and in the status: its value never leaves canaryctl.
pub const SECRET: &str = "(secret)";
/// A secret that an edit sets or changes, as a diff shows it.
pub const NEW_SECRET: &str = "(new secret)";

/// The configuration as the admin API shows it: every override token replaced by [`SECRET`].
pub fn redacted(config: &RawConfig) -> serde_json::Value {
    let mut value = serde_json::to_value(config).unwrap_or_default();
    for_each_token(&mut value, |token, _| {
        *token = serde_json::Value::from(SECRET)
    });
    value
}

/// Calls `f` with each rollout's override token and the rollout's name.
fn for_each_token(config: &mut serde_json::Value, mut f: impl FnMut(&mut serde_json::Value, &str)) {
    let Some(rollouts) = config.get_mut("rollouts").and_then(|r| r.as_array_mut()) else {
        return;
    };
    for rollout in rollouts {
        let name = rollout
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap_or_default()
            .to_string();
        if let Some(token) = rollout.get_mut("override").and_then(|o| o.get_mut("token")) {
            f(token, &name);
        }
    }
}

/// A readable diff of two configurations: one line per changed JSON path. Override tokens are never
/// shown: an unchanged one shows nothing, a new or changed one shows as [`NEW_SECRET`].
pub fn diff(old: &RawConfig, new: &RawConfig) -> Changes {
    let mut old_value = serde_json::to_value(old).unwrap_or_default();
    let mut new_value = serde_json::to_value(new).unwrap_or_default();
    let mut old_tokens = std::collections::HashMap::new();
    for_each_token(&mut old_value, |token, rollout| {
        old_tokens.insert(rollout.to_string(), token.clone());
        *token = serde_json::Value::from(SECRET);
    });
    for_each_token(&mut new_value, |token, rollout| {
        let same = old_tokens.get(rollout) == Some(&*token);
        *token = serde_json::Value::from(if same { SECRET } else { NEW_SECRET });
    });
    let mut out = Changes::new();
    diff_values("", &old_value, &new_value, &mut out);
    out
}

fn diff_values(path: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Changes) {
    use serde_json::Value;
    let child = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, va) in a {
                match b.get(key) {
                    Some(vb) => diff_values(&child(key), va, vb, out),
                    None => out.push(format!("- {}: {va}", child(key))),
                }
            }
            for (key, vb) in b {
                if !a.contains_key(key) {
                    out.push(format!("+ {}: {vb}", child(key)));
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for i in 0..a.len().max(b.len()) {
                let p = format!("{path}[{i}]");
                match (a.get(i), b.get(i)) {
                    (Some(va), Some(vb)) => diff_values(&p, va, vb, out),
                    (Some(va), None) => out.push(format!("- {p}: {va}")),
                    (None, Some(vb)) => out.push(format!("+ {p}: {vb}")),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => out.push(format!("~ {path}: {a} → {b}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> RawConfig {
        parse_config(json.as_bytes()).unwrap()
    }

    fn set(
        config: &RawConfig,
        rollout: &str,
        pairs: &[(&str, &str)],
    ) -> Result<(RawConfig, Changes), StateError> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(v, p)| (v.to_string(), p.to_string()))
            .collect();
        set_percents(config, rollout, &pairs)
    }

    fn percent(text: &str) -> Percent {
        Percent::from_text(text).unwrap()
    }

    const TWO: &str = r#"{"rollouts":[
        {"name":"web","stable":"v1","canaries":[{"version":"v2","percent":5}],
         "rules":[{"header":"x-group","values":["beta"],"version":"v2"}]},
        {"name":"api","stable":"a","canaries":[{"version":"b","percent":10},{"version":"c","percent":20}]}]}"#;

    #[test]
    fn set_changes_only_the_named_canaries_and_says_so() {
        let (next, changes) = set(&config(TWO), "web", &[("v2", "25")]).unwrap();
        assert_eq!(changes, vec!["web: v2 5% → 25%"]);
        assert_eq!(next.rollouts[0].canaries[0].percent, percent("25"));
        assert_eq!(next.rollouts[1], config(TWO).rollouts[1]);
        let (_, none) = set(&next, "web", &[("v2", "25.00")]).unwrap();
        assert!(none.is_empty(), "setting the same percent changes nothing");
    }

    #[test]
    fn set_refuses_what_the_filter_would_refuse_with_its_text() {
        let err = set(&config(TWO), "api", &[("c", "95")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid config: rollouts[1].canaries: a total of 105% is not allowed: canary percents that add up to at most 100"
        );
        // Float noise from a ramp script (0.1 * 3), a typo-class tail, and a value a float would round to 100.
        for (rollout, version, index, text) in [
            (
                "web",
                "v2",
                "rollouts[0].canaries[0]",
                "0.30000000000000004",
            ),
            ("api", "c", "rollouts[1].canaries[1]", "12.500000001"),
            ("web", "v2", "rollouts[0].canaries[0]", "99.999999999"),
            ("web", "v2", "rollouts[0].canaries[0]", "12.345"),
        ] {
            assert_eq!(
                set(&config(TWO), rollout, &[(version, text)]).unwrap_err().to_string(),
                format!("invalid config: {index}.percent: {text} is not allowed: a number from 0 to 100 with at most two decimals")
            );
        }
        assert_eq!(
            set(&config(TWO), "shop", &[("v2", "1")])
                .unwrap_err()
                .to_string(),
            "no rollout named \"shop\" (rollouts: web, api)"
        );
        assert_eq!(
            set(&config(TWO), "web", &[("v9", "1")])
                .unwrap_err()
                .to_string(),
            "web has no canary \"v9\" (canaries: v2)"
        );
        assert!(set(&config(TWO), "web", &[("v1", "1")])
            .unwrap_err()
            .to_string()
            .starts_with("v1 is the stable version of web"));
    }

    #[test]
    fn promote_flips_stable_and_keeps_the_old_one_at_zero() {
        let (next, changes) = promote(&config(TWO), "web", None).unwrap();
        let web = &next.rollouts[0];
        assert_eq!(web.stable, "v2");
        assert_eq!(
            web.canaries,
            vec![RawCanary {
                version: "v1".into(),
                percent: Percent::ZERO
            }]
        );
        assert_eq!(
            web.rules[0].version, "v2",
            "rules keep naming a valid version"
        );
        assert_eq!(
            changes,
            vec![
                "web: stable v1 → v2 (now 100%)",
                "web: v1 kept as a canary at 0%"
            ]
        );
        assert!(promote(&config(TWO), "api", None)
            .unwrap_err()
            .to_string()
            .contains("several canaries (b, c)"));
        let (api, changes) = promote(&config(TWO), "api", Some("c")).unwrap();
        assert_eq!(api.rollouts[1].stable, "c");
        assert_eq!(
            api.rollouts[1].canaries,
            vec![
                RawCanary {
                    version: "b".into(),
                    percent: Percent::ZERO
                },
                RawCanary {
                    version: "a".into(),
                    percent: Percent::ZERO
                }
            ]
        );
        assert!(
            changes.contains(&"api: b 10% → 0%".to_string()),
            "{changes:?}"
        );
    }

    #[test]
    fn promote_keeps_naming_the_default_route_s_version_and_says_what_that_means() {
        let shipped = config(
            r#"{"rollouts":[{"name":"web","stable":"v1","canaries":[{"version":"v2","percent":10}],
                "default_route_version":"v1"}]}"#,
        );
        let (next, changes) = promote(&shipped, "web", None).unwrap();
        let web = &next.rollouts[0];
        assert_eq!(
            (web.stable.as_str(), web.default_route_version.as_deref()),
            ("v2", Some("v1"))
        );
        let ready = next.validate().unwrap();
        assert_eq!(ready.rollouts[0].default_route, Some(1), "v1, now a canary");
        assert_eq!(
            changes.last().unwrap(),
            "web: Envoy's default route still serves v1 (default_route_version): v2's users get the route header written"
        );
        // Promoted back: the default route's version is stable again, and nothing more is said.
        let (back, changes) = promote(&next, "web", None).unwrap();
        assert_eq!(back.validate().unwrap().rollouts[0].default_route, Some(0));
        assert!(
            !changes.iter().any(|c| c.contains("default route")),
            "{changes:?}"
        );
    }

    #[test]
    fn a_state_saved_with_stable_by_default_route_loads_without_it() {
        let dir = std::env::temp_dir().join(format!("canaryctl-migrate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        std::fs::write(
            &path,
            r#"{"version":7,"updated_at_unix":1,"config":{"rollouts":[{"name":"web","stable":"v2",
                "canaries":[{"version":"v1","percent":0}],"stable_by_default_route":true}]}}"#,
        )
        .unwrap();
        let saved = StateFile::new(&path).load().unwrap().unwrap();
        assert_eq!(saved.desired.version, 7);
        let web = &saved.desired.config.rollouts[0];
        assert_eq!(
            (
                web.stable_by_default_route,
                web.default_route_version.as_deref()
            ),
            (None, None),
            "dropped, never translated to stable"
        );
        let mut value: serde_json::Value = serde_json::from_str(
            r#"{"rollouts":[{"name":"web","stable_by_default_route":false},{"name":"api"}]}"#,
        )
        .unwrap();
        let lines = migrate(&mut value);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("rollout \"web\": dropped stable_by_default_route"),
            "{lines:?}"
        );
        // A config given to apply is not migrated: it is refused, naming the replacement.
        let err = parse_config(
            br#"{"rollouts":[{"name":"web","stable":"v2","canaries":[{"version":"v1","percent":0}],"stable_by_default_route":true}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("\"default_route_version\": \"v2\""), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(unix)]
    #[test]
    fn a_state_behind_a_symbolic_link_is_saved_through_it_and_a_dangling_link_is_refused() {
        let dir = std::env::temp_dir().join(format!("canaryctl-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("volume")).unwrap();
        let link = dir.join("state.json");
        std::os::unix::fs::symlink(dir.join("volume").join("state.json"), &link).unwrap();
        let file = StateFile::new(&link);
        let err = file.load().unwrap_err().to_string();
        assert!(
            err.contains("a symbolic link to")
                && err.contains("which does not exist: refusing to start a new state"),
            "{err}"
        );
        let desired = Desired {
            version: 3,
            updated_at_unix: 1,
            config: config(TWO),
        };
        file.save(&desired, &[], &[]).unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink(),
            "the link stays"
        );
        assert_eq!(file.load().unwrap().unwrap().desired.version, 3);
        assert!(dir.join("volume").join("state.json").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rollback_sends_every_user_of_the_rollout_to_stable() {
        let (next, changes) = rollback(&config(TWO), "api").unwrap();
        assert!(next.rollouts[1]
            .canaries
            .iter()
            .all(|c| c.percent == Percent::ZERO));
        assert_eq!(changes, vec!["api: b 10% → 0%", "api: c 20% → 0%"]);
        assert_eq!(next.rollouts[0], config(TWO).rollouts[0]);
    }

    #[test]
    fn apply_validates_and_diffs() {
        let new = config(
            r#"{"route_header":"x-v","rollouts":[{"name":"web","stable":"v1","canaries":[{"version":"v2","percent":50}]}]}"#,
        );
        let (_, changes) = apply(&config(TWO), new).unwrap();
        assert!(
            changes.contains(&"+ route_header: \"x-v\"".to_string()),
            "{changes:?}"
        );
        assert!(
            changes.contains(&"~ rollouts[0].canaries[0].percent: 5 → 50".to_string()),
            "{changes:?}"
        );
        assert!(
            changes.iter().any(|c| c.starts_with("- rollouts[1]: ")),
            "{changes:?}"
        );
        assert!(
            changes
                .iter()
                .any(|c| c.starts_with("- rollouts[0].rules: ")),
            "{changes:?}"
        );
    }

    #[test]
    fn diffs_and_the_shown_config_never_contain_a_token() {
        let with = |token: &str| {
            config(&format!(
                r#"{{"rollouts":[{{"name":"web","stable":"v1","canaries":[{{"version":"v2","percent":5}}],
                   "override":{{"header":"x-o","token_header":"x-t","token":"{token}"}}}}]}}"#
            ))
        };
        let without = config(
            r#"{"rollouts":[{"name":"web","stable":"v1","canaries":[{"version":"v2","percent":5}]}]}"#,
        );
        let added = diff(&without, &with("hunter2"));
        assert_eq!(added.len(), 1);
        assert!(
            added[0].starts_with("+ rollouts[0].override: ")
                && added[0].contains("\"(new secret)\""),
            "{added:?}"
        );
        assert_eq!(
            diff(&with("hunter2"), &with("hunter3")),
            ["~ rollouts[0].override.token: \"(secret)\" → \"(new secret)\""]
        );
        assert!(diff(&with("hunter2"), &with("hunter2")).is_empty());
        let removed = diff(&with("hunter2"), &without);
        assert_eq!(removed.len(), 1);
        let shown = redacted(&with("hunter2")).to_string();
        for text in added.iter().chain(&removed).chain([&shown]) {
            assert!(!text.contains("hunter"), "{text}");
        }
        assert!(shown.contains("\"token\":\"(secret)\""), "{shown}");
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("canaryctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn known(node: &str) -> KnownEnvoy {
        KnownEnvoy {
            node_id: node.into(),
            cluster: "edge".into(),
            first_seen_unix: 1,
            last_seen_unix: 2,
            acked_version: Some(7),
        }
    }

    #[test]
    fn the_state_file_survives_a_round_trip_is_private_and_refuses_garbage() {
        let dir = temp_dir("state");
        let file = StateFile::new(dir.join("state.json"));
        assert_eq!(file.load().unwrap(), None);
        let desired = Desired {
            version: 7,
            updated_at_unix: 1,
            config: config(TWO),
        };
        file.save(&desired, &[known("front-1")], &[]).unwrap();
        assert_eq!(
            file.load().unwrap(),
            Some(Saved {
                desired: desired.clone(),
                fleet: vec![known("front-1")],
                rollouts: vec![],
            })
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("state.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "the state file holds override tokens");
        }
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left: {leftovers:?}");
        std::fs::write(dir.join("state.json"), b"{\"version\": 1").unwrap();
        assert!(file
            .load()
            .unwrap_err()
            .to_string()
            .contains("not a canaryctl state"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_saved_config_this_build_refuses_is_reported_as_that_and_can_be_recovered() {
        let dir = temp_dir("recover");
        let path = dir.join("state.json");
        // What an older canaryctl saved after accepting float noise: the filter refuses it.
        std::fs::write(
            &path,
            r#"{"version": 12, "updated_at_unix": 5,
               "config": {"rollouts":[{"name":"web","stable":"v1","canaries":[{"version":"v2","percent":0.30000000000000004}]}]},
               "fleet": [{"node_id":"front-1","cluster":"edge","first_seen_unix":1,"last_seen_unix":2,"acked_version":7}]}"#,
        )
        .unwrap();
        let file = StateFile::new(&path);
        let err = file.load().unwrap_err();
        assert!(
            matches!(err, StateError::SavedConfigRefused { version: 12, .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("the config saved as version 12 is refused: rollouts[0].canaries[0].percent: 0.30000000000000004 is not allowed"),
            "{text}"
        );
        assert!(
            text.contains("--recover-config FILE") && !text.contains("not a canaryctl state"),
            "{text}"
        );
        let before = std::fs::read(&path).unwrap();
        assert!(
            file.load().is_err() && std::fs::read(&path).unwrap() == before,
            "loading changes nothing"
        );

        let saved = file.recover(config(TWO)).unwrap();
        assert_eq!(saved.desired.version, 13);
        assert_eq!(saved.fleet, vec![known("front-1")], "the fleet is kept");
        assert_eq!(file.load().unwrap(), Some(saved));
        assert!(
            file.recover(config(TWO))
                .unwrap_err()
                .to_string()
                .contains("is valid"),
            "a valid config is never replaced this way"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
