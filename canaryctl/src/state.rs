//! The desired state canaryctl serves: one plugin configuration and its version, kept durable in a state
//! file, and the edits operators make to it (set, promote, roll back, apply).
//!
//! Every edit produces a whole new configuration that must pass the filter's own validation (the same
//! Rust code the `.wasm` runs), so nothing the filter would refuse is ever pushed.

use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use canary_router::config::{parse_raw, percent_text, RawCanary, RawConfig, RawRollout};
use serde::{Deserialize, Serialize};

/// The configuration being served and its version (`version_info` on the wire; it only grows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// The state file could not be read or written.
    Io(String),
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Invalid(msg) => write!(f, "invalid config: {msg}"),
            StateError::Edit(msg) | StateError::Io(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for StateError {}

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
    let raw = parse_raw(json).map_err(|err| StateError::Invalid(err.to_string()))?;
    validate(&raw)?;
    Ok(raw)
}

/// The durable state file: written whole to a temporary file, fsynced, renamed over the old one, and the
/// directory fsynced, so a crash leaves either the old state or the new one.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The saved state, `None` when there is no file yet. A file that does not parse or validate is an
    /// error: starting from nothing would silently drop what operators set.
    pub fn load(&self) -> Result<Option<Desired>, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(StateError::Io(format!("{}: {err}", self.path.display()))),
        };
        let desired: Desired = serde_json::from_slice(&bytes).map_err(|err| {
            StateError::Io(format!(
                "{}: not a canaryctl state file: {err}",
                self.path.display()
            ))
        })?;
        validate(&desired.config).map_err(|err| {
            StateError::Io(format!(
                "{}: the saved config is refused: {err}",
                self.path.display()
            ))
        })?;
        Ok(Some(desired))
    }

    pub fn save(&self, desired: &Desired) -> Result<(), StateError> {
        let io = |err: std::io::Error| StateError::Io(format!("{}: {err}", self.path.display()));
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "state".to_string());
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let body = serde_json::to_vec_pretty(desired)
            .map_err(|err| StateError::Io(format!("cannot encode the state: {err}")))?;
        let result = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&body)?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(&dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(io)
    }
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
                "no rollout named {name:?} (rollouts: {})",
                known.join(", ")
            ))
        })
}

fn pct(percent: f64) -> String {
    // Percentages have at most two decimals (validated), so basis points are exact.
    percent_text((percent * 100.0).round().clamp(0.0, 10_000.0) as u32)
}

/// Set canary percentages of one rollout: `[("v2", 25.0)]`.
pub fn set_percents(
    config: &RawConfig,
    rollout: &str,
    percents: &[(String, f64)],
) -> Result<(RawConfig, Changes), StateError> {
    if percents.is_empty() {
        return Err(StateError::Edit(
            "nothing to set: give <version>=<percent>".to_string(),
        ));
    }
    let mut next = config.clone();
    let target = rollout_mut(&mut next, rollout)?;
    let mut changes = Changes::new();
    for (version, percent) in percents {
        let canaries: Vec<String> = target.canaries.iter().map(|c| c.version.clone()).collect();
        let stable = target.stable.clone();
        let canary = target
            .canaries
            .iter_mut()
            .find(|c| &c.version == version)
            .ok_or_else(|| {
                if *version == stable {
                    StateError::Edit(format!(
                        "{version} is the stable version of {rollout}: it gets what the canaries do not; \
                         set a canary ({}) or promote one",
                        canaries.join(", ")
                    ))
                } else {
                    StateError::Edit(format!(
                        "{rollout} has no canary {version:?} (canaries: {})",
                        canaries.join(", ")
                    ))
                }
            })?;
        if canary.percent != *percent {
            changes.push(format!(
                "{rollout}: {version} {} → {}",
                pct(canary.percent),
                pct(*percent)
            ));
            canary.percent = *percent;
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
                "{rollout} has no canary {chosen:?} (canaries: {})",
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
            percent: 0.0,
        };
    }
    changes.push(format!("{rollout}: {old_stable} kept as a canary at 0%"));
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
        if canary.percent != 0.0 && quiet != Some(canary.version.as_str()) {
            changes.push(format!(
                "{rollout}: {} {} → 0%",
                canary.version,
                pct(canary.percent)
            ));
        }
        canary.percent = 0.0;
    }
    changes
}

/// Replace the whole configuration; the changes are its diff against the current one.
pub fn apply(config: &RawConfig, new: RawConfig) -> Result<(RawConfig, Changes), StateError> {
    validate(&new)?;
    let changes = diff(config, &new);
    Ok((new, changes))
}

/// A readable diff of two configurations: one line per changed JSON path.
pub fn diff(old: &RawConfig, new: &RawConfig) -> Changes {
    let old = serde_json::to_value(old).unwrap_or_default();
    let new = serde_json::to_value(new).unwrap_or_default();
    let mut out = Changes::new();
    diff_values("", &old, &new, &mut out);
    out
}

fn diff_values(path: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Changes) {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, va) in a {
                let p = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match b.get(key) {
                    Some(vb) => diff_values(&p, va, vb, out),
                    None => out.push(format!("- {p}: {va}")),
                }
            }
            for (key, vb) in b {
                if !a.contains_key(key) {
                    let p = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    out.push(format!("+ {p}: {vb}"));
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

    const TWO: &str = r#"{"rollouts":[
        {"name":"web","stable":"v1","canaries":[{"version":"v2","percent":5}],
         "rules":[{"header":"x-group","values":["beta"],"version":"v2"}]},
        {"name":"api","stable":"a","canaries":[{"version":"b","percent":10},{"version":"c","percent":20}]}]}"#;

    #[test]
    fn set_changes_only_the_named_canaries_and_says_so() {
        let (next, changes) = set_percents(&config(TWO), "web", &[("v2".into(), 25.0)]).unwrap();
        assert_eq!(changes, vec!["web: v2 5% → 25%"]);
        assert_eq!(next.rollouts[0].canaries[0].percent, 25.0);
        assert_eq!(next.rollouts[1], config(TWO).rollouts[1]);
        let (_, none) = set_percents(&next, "web", &[("v2".into(), 25.0)]).unwrap();
        assert!(none.is_empty(), "setting the same percent changes nothing");
    }

    #[test]
    fn set_refuses_what_the_filter_would_refuse_with_its_text() {
        let err = set_percents(&config(TWO), "api", &[("c".into(), 95.0)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid config: rollouts[1].canaries: a total of 105% is not allowed: canary percents that add up to at most 100"
        );
        let err = set_percents(&config(TWO), "web", &[("v2".into(), 12.345)]).unwrap_err();
        assert!(
            err.to_string().contains("percent: 12.345 is not allowed"),
            "{err}"
        );
        assert_eq!(
            set_percents(&config(TWO), "shop", &[("v2".into(), 1.0)])
                .unwrap_err()
                .to_string(),
            "no rollout named \"shop\" (rollouts: web, api)"
        );
        assert_eq!(
            set_percents(&config(TWO), "web", &[("v9".into(), 1.0)])
                .unwrap_err()
                .to_string(),
            "web has no canary \"v9\" (canaries: v2)"
        );
        assert!(set_percents(&config(TWO), "web", &[("v1".into(), 1.0)])
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
                percent: 0.0
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
                    percent: 0.0
                },
                RawCanary {
                    version: "a".into(),
                    percent: 0.0
                }
            ]
        );
        assert!(
            changes.contains(&"api: b 10% → 0%".to_string()),
            "{changes:?}"
        );
    }

    #[test]
    fn rollback_sends_every_user_of_the_rollout_to_stable() {
        let (next, changes) = rollback(&config(TWO), "api").unwrap();
        assert!(next.rollouts[1].canaries.iter().all(|c| c.percent == 0.0));
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
            changes.contains(&"~ rollouts[0].canaries[0].percent: 5.0 → 50.0".to_string()),
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
    fn the_state_file_survives_a_round_trip_and_refuses_garbage() {
        let dir = std::env::temp_dir().join(format!("canaryctl-state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = StateFile::new(dir.join("state.json"));
        assert_eq!(file.load().unwrap(), None);
        let desired = Desired {
            version: 7,
            updated_at_unix: 1,
            config: config(TWO),
        };
        file.save(&desired).unwrap();
        assert_eq!(file.load().unwrap(), Some(desired));
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
            .contains("not a canaryctl state file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
