//! The plugin configuration: the JSON contract users write, and its validated, ready-to-route form.
//!
//! Two steps, so that nothing invalid can reach the request path:
//! 1. [`RawConfig`] mirrors the JSON exactly. It is read field by field with the small reader in `json.rs`:
//!    unknown or repeated fields are errors, not silent defaults. (Not serde's derive: that, plus the path
//!    tracking the error messages need, was over half of the `.wasm`. serde still writes these structs.)
//! 2. [`RawConfig::validate`] checks every rule of the contract and builds [`Config`]: percentages as integer
//!    bucket ranges, header names lower-cased, rule and override versions resolved to indexes.
//!
//! Every error names the field (as a JSON path), the value and what is allowed, in one line.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

use crate::hash::BUCKETS;
use crate::json::{number_value, quote, Reader};

/// The route header used when `route_header` is absent.
pub const DEFAULT_ROUTE_HEADER: &str = "x-version";

/// Longest accepted rollout name, version name, header name or cookie name.
const MAX_NAME_LEN: usize = 128;

/// Why a configuration was refused. `Display` is the one line the filter logs and `canaryctl` prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The JSON is malformed, has an unknown field, lacks a required one, or has a value of the wrong type.
    #[error("{field}: {message}")]
    Syntax { field: String, message: String },
    /// The JSON has the right shape but a value breaks a rule of the contract.
    #[error("{field}: {value} is not allowed: {allowed}")]
    Invalid {
        field: String,
        value: String,
        allowed: String,
    },
}

fn invalid(field: impl Into<String>, value: impl Into<String>, allowed: &str) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        value: value.into(),
        allowed: allowed.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Step 1: the JSON contract, exactly.
// ---------------------------------------------------------------------------------------------------------

/// The plugin configuration as written by users (see the README's configuration reference).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RawConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route_header: Option<String>,
    pub rollouts: Vec<RawRollout>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RawRollout {
    pub name: String,
    #[serde(rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_: Option<RawMatch>,
    pub stable: String,
    pub canaries: Vec<RawCanary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sticky: Option<RawSticky>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assign_cookie: Option<RawAssignCookie>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RawRule>,
    #[serde(rename = "override", skip_serializing_if = "Option::is_none")]
    pub override_: Option<RawOverride>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RawMatch {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RawCanary {
    pub version: String,
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RawSticky {
    pub keys: Vec<RawKey>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
}

/// `{"header": "x-user-id"}` or `{"cookie": "session"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RawKey {
    Header(String),
    Cookie(String),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RawAssignCookie {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RawRule {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    pub values: Vec<String>,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RawOverride {
    pub header: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

// ---------------------------------------------------------------------------------------------------------
// Step 2: the validated form the decision uses.
// ---------------------------------------------------------------------------------------------------------

/// A validated configuration. Built only by [`parse`] / [`RawConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Lower-case name of the header the decision is written to.
    pub route_header: String,
    pub rollouts: Vec<Rollout>,
}

/// One rollout, ready to route: versions by index (0 = stable), canary shares as bucket ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    pub name: String,
    /// Empty: any host.
    pub hosts: Vec<HostPattern>,
    pub path_prefix: Option<String>,
    /// `versions[0]` is stable, `versions[1..]` are the canaries in listed order.
    pub versions: Vec<String>,
    /// `canary_ends[i]` is the exclusive end of canary `versions[i + 1]`'s bucket range; ranges are
    /// consecutive from bucket 0, so canary i owns `canary_ends[i-1]..canary_ends[i]`.
    pub canary_ends: Vec<u32>,
    /// The configured percentages in basis points (1/100 of a percent), per canary, for logs and tools.
    pub canary_basis_points: Vec<u32>,
    /// Where the user key is looked for, in order; with `assign_cookie`, its cookie comes last.
    pub sticky_keys: Vec<KeySource>,
    pub salt: String,
    pub assign_cookie: Option<AssignCookie>,
    pub rules: Vec<Rule>,
    pub override_: Option<Override>,
}

/// A host pattern, lower-case, without port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// `*.example.com` is stored as `.example.com`: any host that ends with it (not `example.com` itself).
    Suffix(String),
}

/// Where a request value comes from. Header names are lower-case; cookie names are case-sensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Header(String),
    Cookie(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub source: KeySource,
    pub values: Vec<String>,
    /// Index into [`Rollout::versions`].
    pub version: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    /// Lower-case name of the header that names the version.
    pub header: String,
    /// `(token_header, token)`: when set, the override is honoured only with this token.
    pub token: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignCookie {
    pub name: String,
    pub max_age_seconds: Option<u64>,
    /// Everything after `name=value` in the `set-cookie` header, prepared once.
    pub attributes: String,
}

impl Config {
    /// True when some rollout matches on hosts, so the request's `:authority` must be read.
    pub fn needs_authority(&self) -> bool {
        self.rollouts.iter().any(|r| !r.hosts.is_empty())
    }

    /// One line for the log: the route header, then each rollout with its versions and shares.
    pub fn summary(&self) -> String {
        let mut out = format!("route_header {}", self.route_header);
        for rollout in &self.rollouts {
            let _ = write!(out, "; rollout {}:", rollout.name);
            let canary_total: u32 = rollout.canary_basis_points.iter().sum();
            let stable = rollout.versions.first().map(String::as_str).unwrap_or("");
            let _ = write!(
                out,
                " {stable} {} (stable)",
                percent_text(BUCKETS as u32 - canary_total)
            );
            for (version, bp) in rollout
                .versions
                .iter()
                .skip(1)
                .zip(&rollout.canary_basis_points)
            {
                let _ = write!(out, ", {version} {}", percent_text(*bp));
            }
        }
        out
    }
}

/// Basis points as a percentage without trailing zeros: 1250 → "12.5%".
pub fn percent_text(basis_points: u32) -> String {
    let whole = basis_points / 100;
    let frac = basis_points % 100;
    if frac == 0 {
        format!("{whole}%")
    } else if frac % 10 == 0 {
        format!("{whole}.{}%", frac / 10)
    } else {
        format!("{whole}.{frac:02}%")
    }
}

/// Parse and validate a plugin configuration.
pub fn parse(json: &[u8]) -> Result<Config, ConfigError> {
    parse_raw(json)?.validate()
}

/// Parse a plugin configuration into its raw, editable form, without the contract checks of
/// [`RawConfig::validate`] (tools that edit a config validate the result).
pub fn parse_raw(json: &[u8]) -> Result<RawConfig, ConfigError> {
    // Say plainly that an object is expected, rather than "invalid type: array".
    let text = json.trim_ascii();
    if !text.is_empty() && !text.starts_with(b"{") {
        let shown = String::from_utf8_lossy(text.get(..40).unwrap_or(text)).into_owned();
        return Err(invalid("config", shown, "a JSON object"));
    }
    let mut reader = Reader::new(json);
    let raw = read_config(&mut reader, ROOT)?;
    reader.end().map_err(|message| syntax(ROOT, message))?;
    Ok(raw)
}

/// Tools that embed a configuration in their own serde types (canaryctl's state file) read it through
/// the same reader and contract as the filter. Positions in errors then refer to the re-serialized text.
impl<'de> Deserialize<'de> for RawConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        parse_raw(value.to_string().as_bytes()).map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Reading the JSON into the raw structs: one function per object of the contract. Field paths are built
// as the reader descends ("rollouts[0].canaries[1].percent"), so every error names where it is.
// ---------------------------------------------------------------------------------------------------------

/// The path of the whole document in error messages.
const ROOT: &str = "config";

fn syntax(field: &str, message: String) -> ConfigError {
    ConfigError::Syntax {
        field: field.to_string(),
        message,
    }
}

fn child(at: &str, key: &str) -> String {
    if at == ROOT {
        key.to_string()
    } else {
        format!("{at}.{key}")
    }
}

/// serde's wording for the known names: "`a`", "`a` or `b`", "one of `a`, `b`, `c`".
fn expected_names(names: &[&str]) -> String {
    match names {
        [one] => format!("`{one}`"),
        [a, b] => format!("`{a}` or `{b}`"),
        _ => format!(
            "one of {}",
            names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Reads an object whose known fields are `fields`, calling `read` with each present field's index and
/// path. Unknown and repeated fields are errors. Returns which fields were present, as a bit set.
#[inline(never)]
fn read_object(
    r: &mut Reader,
    at: &str,
    fields: &[&str],
    mut read: impl FnMut(&mut Reader, usize, &str) -> Result<(), ConfigError>,
) -> Result<(), ConfigError> {
    r.begin_object("an object")
        .map_err(|message| syntax(at, message))?;
    let mut seen: u32 = 0;
    let mut first = true;
    while let Some(key) = r
        .next_key(&mut first)
        .map_err(|message| syntax(at, message))?
    {
        let path = child(at, &key);
        let Some(index) = fields.iter().position(|f| *f == key) else {
            let message = format!("unknown field `{key}`, expected {}", expected_names(fields));
            return Err(syntax(&path, r.key_error(&message)));
        };
        if seen & (1 << index) != 0 {
            return Err(syntax(
                &path,
                r.key_error(&format!("duplicate field `{key}`")),
            ));
        }
        seen |= 1 << index;
        read(r, index, &path)?;
    }
    Ok(())
}

/// A required field, or "missing field" at the object's path.
fn required<T>(r: &Reader, at: &str, name: &str, value: Option<T>) -> Result<T, ConfigError> {
    value.ok_or_else(|| syntax(at, r.error(&format!("missing field `{name}`"))))
}

#[inline(never)]
fn read_array<T>(
    r: &mut Reader,
    at: &str,
    mut read: impl FnMut(&mut Reader, &str) -> Result<T, ConfigError>,
) -> Result<Vec<T>, ConfigError> {
    r.begin_array("an array")
        .map_err(|message| syntax(at, message))?;
    let mut items = Vec::new();
    let mut first = true;
    while r
        .next_element(&mut first)
        .map_err(|message| syntax(at, message))?
    {
        items.push(read(r, &format!("{at}[{}]", items.len()))?);
    }
    Ok(items)
}

#[inline(never)]
fn read_string(r: &mut Reader, at: &str) -> Result<String, ConfigError> {
    r.string("a string").map_err(|message| syntax(at, message))
}

#[inline(never)]
fn read_strings(r: &mut Reader, at: &str) -> Result<Vec<String>, ConfigError> {
    read_array(r, at, read_string)
}

/// An optional field: `null` is the same as leaving it out.
#[inline(never)]
fn read_optional<T>(
    r: &mut Reader,
    at: &str,
    read: impl FnOnce(&mut Reader, &str) -> Result<T, ConfigError>,
) -> Result<Option<T>, ConfigError> {
    if r.null() {
        Ok(None)
    } else {
        read(r, at).map(Some)
    }
}

#[inline(never)]
fn read_percent(r: &mut Reader, at: &str) -> Result<f64, ConfigError> {
    let text = r
        .number("a number")
        .map_err(|message| syntax(at, message))?;
    // A number f64 cannot hold exactly is never a valid percentage (over 100, or more than two decimals).
    if let Some(value) = number_value(text) {
        Ok(value)
    } else {
        Err(invalid(
            at,
            text,
            "a number from 0 to 100 with at most two decimals",
        ))
    }
}

#[inline(never)]
fn read_seconds(r: &mut Reader, at: &str) -> Result<u64, ConfigError> {
    let expected = "a whole number of seconds";
    let text = r.number(expected).map_err(|message| syntax(at, message))?;
    text.parse::<u64>().map_err(|_| {
        invalid(
            at,
            text,
            "from 1 to 34560000 (400 days); leave it out for a session cookie",
        )
    })
}

#[inline(never)]
fn read_config(r: &mut Reader, at: &str) -> Result<RawConfig, ConfigError> {
    let (mut route_header, mut rollouts) = (None, None);
    read_object(r, at, &["route_header", "rollouts"], |r, field, path| {
        match field {
            0 => route_header = read_optional(r, path, read_string)?,
            _ => rollouts = Some(read_array(r, path, read_rollout)?),
        }
        Ok(())
    })?;
    Ok(RawConfig {
        route_header,
        rollouts: required(r, at, "rollouts", rollouts)?,
    })
}

#[inline(never)]
fn read_rollout(r: &mut Reader, at: &str) -> Result<RawRollout, ConfigError> {
    let (mut name, mut match_, mut stable, mut canaries) = (None, None, None, None);
    let (mut sticky, mut assign_cookie, mut rules, mut override_) = (None, None, Vec::new(), None);
    let fields = [
        "name",
        "match",
        "stable",
        "canaries",
        "sticky",
        "assign_cookie",
        "rules",
        "override",
    ];
    read_object(r, at, &fields, |r, field, path| {
        match field {
            0 => name = Some(read_string(r, path)?),
            1 => match_ = read_optional(r, path, read_match)?,
            2 => stable = Some(read_string(r, path)?),
            3 => canaries = Some(read_array(r, path, read_canary)?),
            4 => sticky = read_optional(r, path, read_sticky)?,
            5 => assign_cookie = read_optional(r, path, read_assign_cookie)?,
            6 => {
                rules = read_optional(r, path, |r, at| read_array(r, at, read_rule))?
                    .unwrap_or_default()
            }
            _ => override_ = read_optional(r, path, read_override)?,
        }
        Ok(())
    })?;
    Ok(RawRollout {
        name: required(r, at, "name", name)?,
        match_,
        stable: required(r, at, "stable", stable)?,
        canaries: required(r, at, "canaries", canaries)?,
        sticky,
        assign_cookie,
        rules,
        override_,
    })
}

#[inline(never)]
fn read_match(r: &mut Reader, at: &str) -> Result<RawMatch, ConfigError> {
    let (mut hosts, mut path_prefix) = (Vec::new(), None);
    read_object(r, at, &["hosts", "path_prefix"], |r, field, path| {
        match field {
            0 => hosts = read_optional(r, path, read_strings)?.unwrap_or_default(),
            _ => path_prefix = read_optional(r, path, read_string)?,
        }
        Ok(())
    })?;
    Ok(RawMatch { hosts, path_prefix })
}

#[inline(never)]
fn read_canary(r: &mut Reader, at: &str) -> Result<RawCanary, ConfigError> {
    let (mut version, mut percent) = (None, None);
    read_object(r, at, &["version", "percent"], |r, field, path| {
        match field {
            0 => version = Some(read_string(r, path)?),
            _ => percent = Some(read_percent(r, path)?),
        }
        Ok(())
    })?;
    Ok(RawCanary {
        version: required(r, at, "version", version)?,
        percent: required(r, at, "percent", percent)?,
    })
}

#[inline(never)]
fn read_sticky(r: &mut Reader, at: &str) -> Result<RawSticky, ConfigError> {
    let (mut keys, mut salt) = (None, None);
    read_object(r, at, &["keys", "salt"], |r, field, path| {
        match field {
            0 => keys = Some(read_array(r, path, read_key)?),
            _ => salt = read_optional(r, path, read_string)?,
        }
        Ok(())
    })?;
    Ok(RawSticky {
        keys: required(r, at, "keys", keys)?,
        salt,
    })
}

/// `{"header": "x-user-id"}` or `{"cookie": "session"}`: exactly one of the two.
#[inline(never)]
fn read_key(r: &mut Reader, at: &str) -> Result<RawKey, ConfigError> {
    let mut key = None;
    let kinds = ["header", "cookie"];
    r.begin_object("an object")
        .map_err(|message| syntax(at, message))?;
    let mut first = true;
    while let Some(kind) = r
        .next_key(&mut first)
        .map_err(|message| syntax(at, message))?
    {
        if key.is_some() {
            let message = format!(
                "unexpected `{kind}`: a key has one kind, {}",
                expected_names(&kinds)
            );
            return Err(syntax(at, r.key_error(&message)));
        }
        let path = child(at, &kind);
        key = Some(match kind.as_str() {
            "header" => RawKey::Header(read_string(r, &path)?),
            "cookie" => RawKey::Cookie(read_string(r, &path)?),
            _ => {
                let message = format!(
                    "unknown variant `{kind}`, expected {}",
                    expected_names(&kinds)
                );
                return Err(syntax(at, r.key_error(&message)));
            }
        });
    }
    key.ok_or_else(|| {
        syntax(
            at,
            r.error("invalid value: empty object, expected `header` or `cookie`"),
        )
    })
}

#[inline(never)]
fn read_assign_cookie(r: &mut Reader, at: &str) -> Result<RawAssignCookie, ConfigError> {
    let (mut name, mut max_age_seconds) = (None, None);
    read_object(r, at, &["name", "max_age_seconds"], |r, field, path| {
        match field {
            0 => name = Some(read_string(r, path)?),
            _ => max_age_seconds = read_optional(r, path, read_seconds)?,
        }
        Ok(())
    })?;
    Ok(RawAssignCookie {
        name: required(r, at, "name", name)?,
        max_age_seconds,
    })
}

#[inline(never)]
fn read_rule(r: &mut Reader, at: &str) -> Result<RawRule, ConfigError> {
    let (mut header, mut cookie, mut values, mut version) = (None, None, None, None);
    read_object(
        r,
        at,
        &["header", "cookie", "values", "version"],
        |r, field, path| {
            match field {
                0 => header = read_optional(r, path, read_string)?,
                1 => cookie = read_optional(r, path, read_string)?,
                2 => values = Some(read_strings(r, path)?),
                _ => version = Some(read_string(r, path)?),
            }
            Ok(())
        },
    )?;
    Ok(RawRule {
        header,
        cookie,
        values: required(r, at, "values", values)?,
        version: required(r, at, "version", version)?,
    })
}

#[inline(never)]
fn read_override(r: &mut Reader, at: &str) -> Result<RawOverride, ConfigError> {
    let (mut header, mut token_header, mut token) = (None, None, None);
    read_object(
        r,
        at,
        &["header", "token_header", "token"],
        |r, field, path| {
            match field {
                0 => header = Some(read_string(r, path)?),
                1 => token_header = read_optional(r, path, read_string)?,
                _ => token = read_optional(r, path, read_string)?,
            }
            Ok(())
        },
    )?;
    Ok(RawOverride {
        header: required(r, at, "header", header)?,
        token_header,
        token,
    })
}

impl RawConfig {
    /// Check every rule of the contract and build the ready-to-route form.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let route_header = match &self.route_header {
            Some(name) => header_name("route_header", name)?,
            None => DEFAULT_ROUTE_HEADER.to_string(),
        };
        if self.rollouts.is_empty() {
            return Err(invalid("rollouts", "[]", "at least one rollout"));
        }
        // Test support only: a build with `--cfg canary_router_simulate_old_release` acts like an older
        // release that predates `assign_cookie`, so a real filter/control-plane version skew (the control
        // plane accepts, the filter refuses) can be tested end to end. Never set in a shipped build.
        #[cfg(canary_router_simulate_old_release)]
        if let Some(i) = self.rollouts.iter().position(|r| r.assign_cookie.is_some()) {
            return Err(ConfigError::Syntax {
                field: format!("rollouts[{i}].assign_cookie"),
                message: "unknown field `assign_cookie` (this build simulates a release that predates it)"
                    .to_string(),
            });
        }
        let mut rollouts: Vec<Rollout> = Vec::with_capacity(self.rollouts.len());
        for (index, raw) in self.rollouts.iter().enumerate() {
            let rollout = raw.validate(&format!("rollouts[{index}]"), &route_header)?;
            if rollouts.iter().any(|r| r.name == rollout.name) {
                return Err(invalid(
                    format!("rollouts[{index}].name"),
                    quote(&rollout.name),
                    "a name no other rollout has",
                ));
            }
            rollouts.push(rollout);
        }
        Ok(Config {
            route_header,
            rollouts,
        })
    }
}

/// A rollout's versions and how traffic is split between them (fields as in [`Rollout`]).
struct Split {
    versions: Vec<String>,
    canary_ends: Vec<u32>,
    canary_basis_points: Vec<u32>,
}

impl RawRollout {
    // Each part is its own function, not inlined into one: V8 keeps memory in proportion to the largest
    // functions it compiles, and one 10 KB function cost the .wasm megabytes of RSS (see BENCHMARKS.md).
    fn validate(&self, at: &str, route_header: &str) -> Result<Rollout, ConfigError> {
        let name = rollout_name(&format!("{at}.name"), &self.name)?;
        let (hosts, path_prefix) = self.validate_match(at)?;
        let Split {
            versions,
            canary_ends,
            canary_basis_points,
        } = self.validate_canaries(at)?;
        let (mut sticky_keys, salt) = self.validate_sticky(at, &name, route_header)?;
        let assign_cookie = self.validate_assign_cookie(at, &mut sticky_keys)?;
        let rules = self.validate_rules(at, route_header, &versions)?;
        let override_ = self.validate_override(at, route_header)?;
        Ok(Rollout {
            name,
            hosts,
            path_prefix,
            versions,
            canary_ends,
            canary_basis_points,
            sticky_keys,
            salt,
            assign_cookie,
            rules,
            override_,
        })
    }

    #[inline(never)]
    fn validate_match(&self, at: &str) -> Result<(Vec<HostPattern>, Option<String>), ConfigError> {
        let (hosts, path_prefix) = match &self.match_ {
            None => (Vec::new(), None),
            Some(m) => {
                let mut hosts = Vec::with_capacity(m.hosts.len());
                for (i, host) in m.hosts.iter().enumerate() {
                    hosts.push(host_pattern(&format!("{at}.match.hosts[{i}]"), host)?);
                }
                let prefix = match &m.path_prefix {
                    None => None,
                    Some(p) if p.starts_with('/') && !p.bytes().any(|b| b.is_ascii_control()) => {
                        Some(p.clone())
                    }
                    Some(p) => {
                        return Err(invalid(
                            format!("{at}.match.path_prefix"),
                            quote(p),
                            "a path that starts with \"/\"",
                        ))
                    }
                };
                (hosts, prefix)
            }
        };

        Ok((hosts, path_prefix))
    }

    /// Stable and canaries: the versions (stable first) and each canary's bucket range end and share.
    #[inline(never)]
    fn validate_canaries(&self, at: &str) -> Result<Split, ConfigError> {
        let mut versions = vec![version_name(&format!("{at}.stable"), &self.stable)?];
        if self.canaries.is_empty() {
            return Err(invalid(
                format!("{at}.canaries"),
                "[]",
                "at least one canary version",
            ));
        }
        let mut canary_ends = Vec::with_capacity(self.canaries.len());
        let mut canary_basis_points = Vec::with_capacity(self.canaries.len());
        let mut end: u32 = 0;
        for (i, canary) in self.canaries.iter().enumerate() {
            let version = version_name(&format!("{at}.canaries[{i}].version"), &canary.version)?;
            if versions.contains(&version) {
                return Err(invalid(
                    format!("{at}.canaries[{i}].version"),
                    quote(&version),
                    "a version named only once in a rollout (stable and canaries)",
                ));
            }
            versions.push(version);
            let bp = basis_points(&format!("{at}.canaries[{i}].percent"), canary.percent)?;
            end += bp;
            canary_basis_points.push(bp);
            canary_ends.push(end);
        }
        if end > BUCKETS as u32 {
            return Err(invalid(
                format!("{at}.canaries"),
                format!("a total of {}", percent_text(end)),
                "canary percents that add up to at most 100",
            ));
        }

        Ok(Split {
            versions,
            canary_ends,
            canary_basis_points,
        })
    }

    /// The sticky keys and the salt (the rollout name by default).
    #[inline(never)]
    fn validate_sticky(
        &self,
        at: &str,
        name: &str,
        route_header: &str,
    ) -> Result<(Vec<KeySource>, String), ConfigError> {
        let mut sticky_keys = Vec::new();
        let salt = match &self.sticky {
            None => name.to_string(),
            Some(sticky) => {
                if sticky.keys.is_empty() {
                    return Err(invalid(
                        format!("{at}.sticky.keys"),
                        "[]",
                        "at least one {\"header\": …} or {\"cookie\": …} key",
                    ));
                }
                for (i, key) in sticky.keys.iter().enumerate() {
                    let field = format!("{at}.sticky.keys[{i}]");
                    let source = match key {
                        RawKey::Header(h) => KeySource::Header(request_header_name(
                            &format!("{field}.header"),
                            h,
                            route_header,
                        )?),
                        RawKey::Cookie(c) => {
                            KeySource::Cookie(cookie_name(&format!("{field}.cookie"), c)?)
                        }
                    };
                    sticky_keys.push(source);
                }
                match &sticky.salt {
                    None => name.to_string(),
                    Some(salt) if !salt.is_empty() => salt.clone(),
                    Some(salt) => {
                        return Err(invalid(
                            format!("{at}.sticky.salt"),
                            quote(salt),
                            "a non-empty string (leave it out to use the rollout name)",
                        ))
                    }
                }
            }
        };

        Ok((sticky_keys, salt))
    }

    /// The assigned cookie; its cookie becomes the last sticky key.
    #[inline(never)]
    fn validate_assign_cookie(
        &self,
        at: &str,
        sticky_keys: &mut Vec<KeySource>,
    ) -> Result<Option<AssignCookie>, ConfigError> {
        let assign_cookie = match &self.assign_cookie {
            None => None,
            Some(ac) => {
                let cookie = cookie_name(&format!("{at}.assign_cookie.name"), &ac.name)?;
                let mut attributes = String::new();
                if let Some(age) = ac.max_age_seconds {
                    // Browsers cap cookie lifetimes at 400 days; more is a mistake, not a wish.
                    const MAX_AGE_LIMIT: u64 = 400 * 24 * 3600;
                    if age == 0 || age > MAX_AGE_LIMIT {
                        return Err(invalid(
                            format!("{at}.assign_cookie.max_age_seconds"),
                            age.to_string(),
                            "from 1 to 34560000 (400 days); leave it out for a session cookie",
                        ));
                    }
                    let _ = write!(attributes, "; Max-Age={age}");
                }
                attributes.push_str("; Path=/; HttpOnly; SameSite=Lax");
                // The assigned cookie is read back as the last sticky key, so the next request sticks.
                let source = KeySource::Cookie(cookie.clone());
                if !sticky_keys.contains(&source) {
                    sticky_keys.push(source);
                }
                Some(AssignCookie {
                    name: cookie,
                    max_age_seconds: ac.max_age_seconds,
                    attributes,
                })
            }
        };

        Ok(assign_cookie)
    }

    #[inline(never)]
    fn validate_rules(
        &self,
        at: &str,
        route_header: &str,
        versions: &[String],
    ) -> Result<Vec<Rule>, ConfigError> {
        let mut rules = Vec::with_capacity(self.rules.len());
        for (i, rule) in self.rules.iter().enumerate() {
            let field = format!("{at}.rules[{i}]");
            let source = match (&rule.header, &rule.cookie) {
                (Some(h), None) => KeySource::Header(request_header_name(
                    &format!("{field}.header"),
                    h,
                    route_header,
                )?),
                (None, Some(c)) => KeySource::Cookie(cookie_name(&format!("{field}.cookie"), c)?),
                (Some(h), Some(c)) => {
                    return Err(invalid(
                        field,
                        format!("header {} and cookie {}", quote(h), quote(c)),
                        "exactly one of \"header\" or \"cookie\"",
                    ))
                }
                (None, None) => {
                    return Err(invalid(
                        field,
                        "neither header nor cookie",
                        "exactly one of \"header\" or \"cookie\"",
                    ))
                }
            };
            if rule.values.is_empty() {
                return Err(invalid(
                    format!("{field}.values"),
                    "[]",
                    "at least one value",
                ));
            }
            for (j, value) in rule.values.iter().enumerate() {
                if value.is_empty() {
                    return Err(invalid(
                        format!("{field}.values[{j}]"),
                        "\"\"",
                        "a non-empty string",
                    ));
                }
            }
            let version = version_index(&format!("{field}.version"), &rule.version, versions)?;
            rules.push(Rule {
                source,
                values: rule.values.clone(),
                version,
            });
        }

        Ok(rules)
    }

    #[inline(never)]
    fn validate_override(
        &self,
        at: &str,
        route_header: &str,
    ) -> Result<Option<Override>, ConfigError> {
        let override_ = match &self.override_ {
            None => None,
            Some(o) => {
                let header =
                    request_header_name(&format!("{at}.override.header"), &o.header, route_header)?;
                let token = match (&o.token_header, &o.token) {
                    (None, None) => None,
                    (Some(th), Some(token)) => {
                        let th = request_header_name(
                            &format!("{at}.override.token_header"),
                            th,
                            route_header,
                        )?;
                        if th == header {
                            return Err(invalid(
                                format!("{at}.override.token_header"),
                                quote(&th),
                                "a header other than override.header",
                            ));
                        }
                        if token.is_empty() {
                            return Err(invalid(
                                format!("{at}.override.token"),
                                "\"\"",
                                "a non-empty secret (leave token and token_header out for no token)",
                            ));
                        }
                        Some((th, token.clone()))
                    }
                    (Some(th), None) => {
                        return Err(invalid(
                            format!("{at}.override.token"),
                            format!("absent while token_header is {}", quote(th)),
                            "token and token_header given together, or neither",
                        ))
                    }
                    (None, Some(_)) => {
                        return Err(invalid(
                            format!("{at}.override.token_header"),
                            "absent while token is set",
                            "token and token_header given together, or neither",
                        ))
                    }
                };
                Some(Override { header, token })
            }
        };

        Ok(override_)
    }
}

/// Rollout names appear in metric names and log lines: letters, digits, `_` and `-`.
fn rollout_name(field: &str, name: &str) -> Result<String, ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(name.to_string())
    } else {
        Err(invalid(
            field,
            quote(name),
            "1 to 128 letters, digits, '_' or '-'",
        ))
    }
}

/// A version is written as a header value and matched by Envoy's route table: visible ASCII, no spaces.
fn version_name(field: &str, name: &str) -> Result<String, ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(name.to_string())
    } else {
        Err(invalid(
            field,
            quote(name),
            "1 to 128 visible ASCII characters (a valid header value, no spaces)",
        ))
    }
}

fn version_index(field: &str, name: &str, versions: &[String]) -> Result<usize, ConfigError> {
    versions.iter().position(|v| v == name).ok_or_else(|| {
        invalid(
            field,
            quote(name),
            &format!("one of this rollout's versions ({})", versions.join(", ")),
        )
    })
}

/// RFC 9110 token characters: what header names and cookie names are made of.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A header name, lower-cased. Pseudo-headers (`:path`) are not headers a user routes on.
fn header_name(field: &str, name: &str) -> Result<String, ConfigError> {
    if !name.is_empty() && name.len() <= MAX_NAME_LEN && name.bytes().all(is_token_byte) {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(invalid(
            field,
            quote(name),
            "a header name: 1 to 128 letters, digits or !#$%&'*+-.^_`|~",
        ))
    }
}

/// A header read from the request. It may not be the route header: clients never pick the version.
fn request_header_name(field: &str, name: &str, route_header: &str) -> Result<String, ConfigError> {
    let name = header_name(field, name)?;
    if name == route_header {
        return Err(invalid(
            field,
            quote(&name),
            "a header other than the route header (it is removed from every request)",
        ));
    }
    Ok(name)
}

fn cookie_name(field: &str, name: &str) -> Result<String, ConfigError> {
    if !name.is_empty() && name.len() <= MAX_NAME_LEN && name.bytes().all(is_token_byte) {
        Ok(name.to_string())
    } else {
        Err(invalid(
            field,
            quote(name),
            "a cookie name: 1 to 128 letters, digits or !#$%&'*+-.^_`|~",
        ))
    }
}

fn host_pattern(field: &str, host: &str) -> Result<HostPattern, ConfigError> {
    let lower = host.to_ascii_lowercase();
    let (wildcard, rest) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let ok = !rest.is_empty()
        && rest.len() <= 253
        && !rest.starts_with('.')
        && !rest.ends_with('.')
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !ok {
        return Err(invalid(
            field,
            quote(host),
            "a host name without port (\"shop.example.com\") or a \"*.\" suffix (\"*.example.com\")",
        ));
    }
    Ok(if wildcard {
        HostPattern::Suffix(format!(".{rest}"))
    } else {
        HostPattern::Exact(rest.to_string())
    })
}

/// A percentage in [0, 100] with at most two decimals, as basis points (12.5 → 1250).
fn basis_points(field: &str, percent: f64) -> Result<u32, ConfigError> {
    let scaled = percent * 100.0;
    let rounded = scaled.round();
    if !(0.0..=100.0).contains(&percent) || (scaled - rounded).abs() > 1e-6 {
        return Err(invalid(
            field,
            number_text(percent),
            "a number from 0 to 100 with at most two decimals",
        ));
    }
    // In range 0..=10000 by the check above, so the conversion is exact.
    Ok(rounded as u32)
}

/// A number for an error message, without pulling in the float formatter (17 KB of the `.wasm`): up to
/// six decimals, trailing zeros dropped; scientific notation for very large or very small magnitudes.
fn number_text(value: f64) -> String {
    if !value.is_finite() {
        return "a non-finite number".to_string();
    }
    let sign = if value < 0.0 { "-" } else { "" };
    let (mut mantissa, mut exponent) = (value.abs(), 0_i32);
    let scientific = mantissa >= 1e12 || (mantissa != 0.0 && mantissa < 1e-6);
    if scientific {
        while mantissa >= 10.0 {
            mantissa /= 10.0;
            exponent += 1;
        }
        while mantissa < 1.0 {
            mantissa *= 10.0;
            exponent -= 1;
        }
    }
    // Below 1e12, so the scaled value fits a u64 exactly enough to show six decimals.
    let micros = (mantissa * 1e6).round() as u64;
    let mut text = format!("{sign}{}", micros / 1_000_000);
    let fraction = micros % 1_000_000;
    if fraction != 0 {
        let digits = format!("{fraction:06}");
        text.push('.');
        text.push_str(digits.trim_end_matches('0'));
    }
    if scientific {
        let _ = write!(text, "e{exponent}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        parse(json.as_bytes()).unwrap_err().to_string()
    }

    const FULL: &str = r#"{
      "route_header": "X-Version",
      "rollouts": [{
        "name": "web",
        "match": { "hosts": ["Shop.Example.com", "*.example.com"], "path_prefix": "/" },
        "stable": "v1",
        "canaries": [{ "version": "v2", "percent": 12.5 }],
        "sticky": { "keys": [{ "header": "X-User-Id" }, { "cookie": "session" }], "salt": "web-2026-11" },
        "assign_cookie": { "name": "canary_id", "max_age_seconds": 2592000 },
        "rules": [
          { "header": "x-user-group", "values": ["beta", "staff"], "version": "v2" },
          { "cookie": "plan", "values": ["enterprise"], "version": "v1" }
        ],
        "override": { "header": "x-version-override", "token_header": "x-override-token", "token": "s3cret" }
      }]
    }"#;

    #[test]
    fn the_documented_example_is_accepted_and_prepared() {
        let config = parse(FULL.as_bytes()).unwrap();
        assert_eq!(config.route_header, "x-version");
        let web = &config.rollouts[0];
        assert_eq!(
            web.hosts,
            vec![
                HostPattern::Exact("shop.example.com".into()),
                HostPattern::Suffix(".example.com".into())
            ]
        );
        assert_eq!(web.versions, vec!["v1", "v2"]);
        assert_eq!(web.canary_ends, vec![1250]);
        assert_eq!(web.salt, "web-2026-11");
        assert_eq!(
            web.sticky_keys,
            vec![
                KeySource::Header("x-user-id".into()),
                KeySource::Cookie("session".into()),
                KeySource::Cookie("canary_id".into()),
            ]
        );
        assert_eq!(
            web.assign_cookie.as_ref().unwrap().attributes,
            "; Max-Age=2592000; Path=/; HttpOnly; SameSite=Lax"
        );
        assert_eq!(web.rules[0].version, 1);
        assert_eq!(web.rules[1].source, KeySource::Cookie("plan".into()));
        assert_eq!(web.rules[1].version, 0);
        let o = web.override_.as_ref().unwrap();
        assert_eq!(o.header, "x-version-override");
        assert_eq!(
            o.token,
            Some(("x-override-token".to_string(), "s3cret".to_string()))
        );
        assert_eq!(
            config.summary(),
            "route_header x-version; rollout web: v1 87.5% (stable), v2 12.5%"
        );
    }

    #[test]
    fn defaults_apply_when_optional_fields_are_absent() {
        let config =
            parse(br#"{"rollouts":[{"name":"api","stable":"a","canaries":[{"version":"b","percent":0}]}]}"#)
                .unwrap();
        assert_eq!(config.route_header, DEFAULT_ROUTE_HEADER);
        let api = &config.rollouts[0];
        assert!(api.hosts.is_empty() && api.path_prefix.is_none());
        assert_eq!(api.salt, "api", "salt defaults to the rollout name");
        assert!(api.sticky_keys.is_empty() && api.rules.is_empty());
        assert!(api.assign_cookie.is_none() && api.override_.is_none());
        assert!(!config.needs_authority());
    }

    #[test]
    fn percentages_become_consecutive_bucket_ranges() {
        let config = parse(
            br#"{"rollouts":[{"name":"r","stable":"s","canaries":[
                {"version":"a","percent":0.01},{"version":"b","percent":0},{"version":"c","percent":99.99}]}]}"#,
        )
        .unwrap();
        assert_eq!(config.rollouts[0].canary_ends, vec![1, 1, 10000]);
        assert_eq!(
            config.summary(),
            "route_header x-version; rollout r: s 0% (stable), a 0.01%, b 0%, c 99.99%"
        );
    }

    #[test]
    fn two_decimal_percentages_are_exact() {
        for (p, bp) in [
            (0.29, 29),
            (33.33, 3333),
            (57.01, 5701),
            (100.0, 10000),
            (0.07, 7),
        ] {
            assert_eq!(basis_points("p", p).unwrap(), bp, "{p}");
        }
    }

    #[test]
    fn malformed_json_is_refused_with_its_position() {
        assert_eq!(
            err("{\"rollouts\": ["),
            "rollouts: EOF while parsing a list at line 1 column 15"
        );
        assert_eq!(
            err(""),
            "config: EOF while parsing a value at line 1 column 1"
        );
        assert_eq!(
            err(r#"{"rollouts":[]} trailing"#),
            "config: trailing characters at line 1 column 17"
        );
        assert_eq!(err("[1]"), "config: [1] is not allowed: a JSON object");
        assert_eq!(
            err("  \"x\""),
            "config: \"x\" is not allowed: a JSON object"
        );
    }

    #[test]
    fn unknown_missing_and_mistyped_fields_are_named() {
        assert_eq!(
            err(r#"{"rollout":[]}"#),
            "rollout: unknown field `rollout`, expected `route_header` or `rollouts` at line 1 column 2"
        );
        assert_eq!(
            err(r#"{}"#),
            "config: missing field `rollouts` at line 1 column 3"
        );
        assert_eq!(
            err(r#"{"rollouts":[{"name":"w","stable":"v1","canaries":[{"version":"v2","percent":"5"}]}]}"#),
            "rollouts[0].canaries[0].percent: invalid type: string \"5\", expected a number at line 1 column 78"
        );
        assert_eq!(
            err(r#"{"rollouts":[{"name":"w","stable":"v1","canaries":[{"version":"v2","percent":5,"weight":1}]}]}"#),
            "rollouts[0].canaries[0].weight: unknown field `weight`, expected `version` or `percent` at line 1 column 80"
        );
        assert_eq!(
            err(r#"{"rollouts":[{"name":"w","stable":"v1","canaries":[],"sticky":{"keys":[{"query":"u"}]}}]}"#),
            "rollouts[0].sticky.keys[0]: unknown variant `query`, expected `header` or `cookie` at line 1 column 73"
        );
    }

    #[test]
    fn repeated_fields_odd_keys_and_numbers_are_refused() {
        let canary = |extra: &str| {
            format!(
                r#"{{"rollouts":[{{"name":"w","stable":"v1","canaries":[{{"version":"v2","percent":5}}]{extra}}}]}}"#
            )
        };
        for (json, expected) in [
            (
                r#"{"rollouts":[{"name":"w","name":"x"}]}"#.to_string(),
                "rollouts[0].name: duplicate field `name` at line 1 column 26",
            ),
            (
                canary(r#","sticky":{"keys":[{}]}"#),
                "rollouts[0].sticky.keys[0]: invalid value: empty object, expected `header` or `cookie` at line 1 column 102",
            ),
            (
                canary(r#","sticky":{"keys":[{"header":"a","cookie":"b"}]}"#),
                "rollouts[0].sticky.keys[0]: unexpected `cookie`: a key has one kind, `header` or `cookie` at line 1 column 114",
            ),
            (
                r#"{"rollouts":[{"name":"w","stable":"v1","canaries":[{"version":"v2","percent":1e400}]}]}"#.to_string(),
                "rollouts[0].canaries[0].percent: 1e400 is not allowed: a number from 0 to 100 with at most two decimals",
            ),
            (
                r#"{"rollouts":[{"name":"w","stable":"v1","canaries":[{"version":"v2","percent":0.0000001}]}]}"#.to_string(),
                "rollouts[0].canaries[0].percent: 1e-7 is not allowed: a number from 0 to 100 with at most two decimals",
            ),
            (
                canary(r#","assign_cookie":{"name":"c","max_age_seconds":-1}"#),
                "rollouts[0].assign_cookie.max_age_seconds: -1 is not allowed: from 1 to 34560000 (400 days); leave it out for a session cookie",
            ),
            (
                canary(r#","assign_cookie":{"name":"c","max_age_seconds":true}"#),
                "rollouts[0].assign_cookie.max_age_seconds: invalid type: boolean, expected a whole number of seconds at line 1 column 128",
            ),
            (
                canary(r#","rules":[{"header":"x-g","values":["a",7],"version":"v2"}]"#),
                "rollouts[0].rules[0].values[1]: invalid type: number 7, expected a string at line 1 column 121",
            ),
        ] {
            assert_eq!(err(&json), expected, "config: {json}");
        }
        // `null` for an optional field is the same as leaving it out.
        let with_nulls = canary(
            r#","match":null,"rules":null,"sticky":null,"assign_cookie":null,"override":null"#,
        )
        .replacen('{', r#"{"route_header":null,"#, 1);
        assert_eq!(
            parse(with_nulls.as_bytes()).unwrap(),
            parse(canary("").as_bytes()).unwrap()
        );
    }

    #[test]
    fn percents_that_f64_cannot_hold_exactly_are_refused_as_written() {
        // Found by the round-trip proptest: an approximated 1.25e41 was written back as a different f64.
        for text in [
            "1.25e41",
            "12.500000000000000000001",
            "1e99999999999999999999",
            "0.30000000000000004",
        ] {
            let json = format!(
                r#"{{"rollouts":[{{"name":"w","stable":"v1","canaries":[{{"version":"v2","percent":{text}}}]}}]}}"#
            );
            assert_eq!(
                parse_raw(json.as_bytes()).unwrap_err().to_string(),
                format!("rollouts[0].canaries[0].percent: {text} is not allowed: a number from 0 to 100 with at most two decimals")
            );
        }
    }

    #[test]
    fn numbers_in_messages_are_shown_readably() {
        for (value, text) in [
            (100.5, "100.5"),
            (-1.0, "-1"),
            (12.345, "12.345"),
            (0.0, "0"),
            (1e300, "1e300"),
            (2.5e-9, "2.5e-9"),
            (f64::INFINITY, "a non-finite number"),
        ] {
            assert_eq!(number_text(value), text);
        }
    }

    fn rollout(extra: &str) -> String {
        format!(
            r#"{{"rollouts":[{{"name":"web","stable":"v1","canaries":[{{"version":"v2","percent":10}}]{extra}}}]}}"#
        )
    }

    #[test]
    fn contract_violations_name_field_value_and_rule() {
        let cases: &[(String, &str)] = &[
            (
                r#"{"rollouts":[]}"#.to_string(),
                "rollouts: [] is not allowed: at least one rollout",
            ),
            (
                r#"{"rollouts":[{"name":"web","stable":"v1","canaries":[{"version":"v2","percent":100.5}]}]}"#
                    .to_string(),
                "rollouts[0].canaries[0].percent: 100.5 is not allowed: a number from 0 to 100 with at most two decimals",
            ),
            (
                r#"{"rollouts":[{"name":"web","stable":"v1","canaries":[{"version":"v2","percent":-1}]}]}"#
                    .to_string(),
                "rollouts[0].canaries[0].percent: -1 is not allowed: a number from 0 to 100 with at most two decimals",
            ),
            (
                r#"{"rollouts":[{"name":"web","stable":"v1","canaries":[{"version":"v2","percent":12.345}]}]}"#
                    .to_string(),
                "rollouts[0].canaries[0].percent: 12.345 is not allowed: a number from 0 to 100 with at most two decimals",
            ),
            (
                r#"{"rollouts":[{"name":"web","stable":"v1","canaries":[{"version":"v2","percent":60},{"version":"v3","percent":40.5}]}]}"#
                    .to_string(),
                "rollouts[0].canaries: a total of 100.5% is not allowed: canary percents that add up to at most 100",
            ),
            (
                r#"{"rollouts":[{"name":"web","stable":"v1","canaries":[]}]}"#.to_string(),
                "rollouts[0].canaries: [] is not allowed: at least one canary version",
            ),
            (
                r#"{"rollouts":[{"name":"web","stable":"v1","canaries":[{"version":"v1","percent":1}]}]}"#
                    .to_string(),
                "rollouts[0].canaries[0].version: \"v1\" is not allowed: a version named only once in a rollout (stable and canaries)",
            ),
            (
                r#"{"rollouts":[{"name":"web","stable":"","canaries":[{"version":"v2","percent":1}]}]}"#
                    .to_string(),
                "rollouts[0].stable: \"\" is not allowed: 1 to 128 visible ASCII characters (a valid header value, no spaces)",
            ),
            (
                r#"{"rollouts":[{"name":"web","stable":"v1","canaries":[{"version":"v 2","percent":1}]}]}"#
                    .to_string(),
                "rollouts[0].canaries[0].version: \"v 2\" is not allowed: 1 to 128 visible ASCII characters (a valid header value, no spaces)",
            ),
            (
                r#"{"rollouts":[{"name":"web","stable":"v1","canaries":[{"version":"v2","percent":1}]},{"name":"web","stable":"v1","canaries":[{"version":"v2","percent":1}]}]}"#
                    .to_string(),
                "rollouts[1].name: \"web\" is not allowed: a name no other rollout has",
            ),
            (
                r#"{"rollouts":[{"name":"web.app","stable":"v1","canaries":[{"version":"v2","percent":1}]}]}"#
                    .to_string(),
                "rollouts[0].name: \"web.app\" is not allowed: 1 to 128 letters, digits, '_' or '-'",
            ),
            (
                r#"{"route_header":"x version","rollouts":[]}"#.to_string(),
                "route_header: \"x version\" is not allowed: a header name: 1 to 128 letters, digits or !#$%&'*+-.^_`|~",
            ),
            (
                rollout(r#","match":{"hosts":["shop.example.com:8080"]}"#),
                "rollouts[0].match.hosts[0]: \"shop.example.com:8080\" is not allowed: a host name without port (\"shop.example.com\") or a \"*.\" suffix (\"*.example.com\")",
            ),
            (
                rollout(r#","match":{"hosts":["*"]}"#),
                "rollouts[0].match.hosts[0]: \"*\" is not allowed: a host name without port (\"shop.example.com\") or a \"*.\" suffix (\"*.example.com\")",
            ),
            (
                rollout(r#","match":{"path_prefix":"api"}"#),
                "rollouts[0].match.path_prefix: \"api\" is not allowed: a path that starts with \"/\"",
            ),
            (
                rollout(r#","rules":[{"header":"x-group","values":["beta"],"version":"v3"}]"#),
                "rollouts[0].rules[0].version: \"v3\" is not allowed: one of this rollout's versions (v1, v2)",
            ),
            (
                rollout(r#","rules":[{"header":"x-group","cookie":"g","values":["beta"],"version":"v2"}]"#),
                "rollouts[0].rules[0]: header \"x-group\" and cookie \"g\" is not allowed: exactly one of \"header\" or \"cookie\"",
            ),
            (
                rollout(r#","rules":[{"values":["beta"],"version":"v2"}]"#),
                "rollouts[0].rules[0]: neither header nor cookie is not allowed: exactly one of \"header\" or \"cookie\"",
            ),
            (
                rollout(r#","rules":[{"header":"x-group","values":[],"version":"v2"}]"#),
                "rollouts[0].rules[0].values: [] is not allowed: at least one value",
            ),
            (
                rollout(r#","rules":[{"header":"X-Version","values":["v2"],"version":"v2"}]"#),
                "rollouts[0].rules[0].header: \"x-version\" is not allowed: a header other than the route header (it is removed from every request)",
            ),
            (
                rollout(r#","sticky":{"keys":[]}"#),
                "rollouts[0].sticky.keys: [] is not allowed: at least one {\"header\": …} or {\"cookie\": …} key",
            ),
            (
                rollout(r#","sticky":{"keys":[{"cookie":"a b"}]}"#),
                "rollouts[0].sticky.keys[0].cookie: \"a b\" is not allowed: a cookie name: 1 to 128 letters, digits or !#$%&'*+-.^_`|~",
            ),
            (
                rollout(r#","sticky":{"keys":[{"header":"x-user"}],"salt":""}"#),
                "rollouts[0].sticky.salt: \"\" is not allowed: a non-empty string (leave it out to use the rollout name)",
            ),
            (
                rollout(r#","assign_cookie":{"name":"cid","max_age_seconds":0}"#),
                "rollouts[0].assign_cookie.max_age_seconds: 0 is not allowed: from 1 to 34560000 (400 days); leave it out for a session cookie",
            ),
            (
                rollout(r#","override":{"header":"x-o","token":"t"}"#),
                "rollouts[0].override.token_header: absent while token is set is not allowed: token and token_header given together, or neither",
            ),
            (
                rollout(r#","override":{"header":"x-o","token_header":"x-t"}"#),
                "rollouts[0].override.token: absent while token_header is \"x-t\" is not allowed: token and token_header given together, or neither",
            ),
            (
                rollout(r#","override":{"header":"x-o","token_header":"X-O","token":"t"}"#),
                "rollouts[0].override.token_header: \"x-o\" is not allowed: a header other than override.header",
            ),
            (
                rollout(r#","override":{"header":"x-o","token_header":"x-t","token":""}"#),
                "rollouts[0].override.token: \"\" is not allowed: a non-empty secret (leave token and token_header out for no token)",
            ),
        ];
        for (json, expected) in cases {
            assert_eq!(&err(json), expected, "config: {json}");
        }
    }

    #[test]
    fn assign_cookie_without_max_age_is_a_session_cookie() {
        let config = parse(rollout(r#","assign_cookie":{"name":"cid"}"#).as_bytes()).unwrap();
        let ac = config.rollouts[0].assign_cookie.as_ref().unwrap();
        assert_eq!(ac.attributes, "; Path=/; HttpOnly; SameSite=Lax");
        assert_eq!(
            config.rollouts[0].sticky_keys,
            vec![KeySource::Cookie("cid".into())]
        );
    }

    #[test]
    fn a_raw_config_written_back_reads_the_same() {
        let raw = parse_raw(FULL.as_bytes()).unwrap();
        let text = serde_json::to_string(&raw).unwrap();
        assert_eq!(parse_raw(text.as_bytes()).unwrap(), raw);
        assert!(!text.contains("null"), "absent fields stay absent: {text}");
        let minimal = r#"{"rollouts":[{"name":"api","stable":"a","canaries":[{"version":"b","percent":12.5}]}]}"#;
        assert_eq!(
            serde_json::to_string(&parse_raw(minimal.as_bytes()).unwrap()).unwrap(),
            minimal
        );
    }

    #[test]
    fn percent_text_drops_trailing_zeros() {
        assert_eq!(percent_text(0), "0%");
        assert_eq!(percent_text(1250), "12.5%");
        assert_eq!(percent_text(1), "0.01%");
        assert_eq!(percent_text(10000), "100%");
    }
}
