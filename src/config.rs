//! The plugin configuration: the JSON contract users write, and its validated, ready-to-route form.
//!
//! Two steps, so that nothing invalid can reach the request path:
//! 1. [`RawConfig`] mirrors the JSON exactly, through serde's derive: unknown or repeated fields are errors,
//!    not silent defaults, and `serde_path_to_error` names where an error is. The filter, the native module,
//!    canaryctl and the tools all read and write the contract through these types.
//! 2. [`RawConfig::validate`] checks every rule of the contract and builds [`Config`]: percentages as integer
//!    bucket ranges, header names lower-cased, rule and override versions resolved to indexes.
//!
//! Every error names the field (as a JSON path), the value (JSON-quoted, cut when long) and what is
//! allowed, in one line. Parsing runs once per configuration, never per request.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt::Write as _;

use crate::hash::BUCKETS;
pub use crate::percent::Percent;
use crate::percent::ALLOWED as PERCENT_ALLOWED;
use crate::text::{one_line, quote};

/// The route header used when `route_header` is absent.
pub const DEFAULT_ROUTE_HEADER: &str = "x-version";

/// Longest accepted rollout name, version name, header name or cookie name.
const MAX_NAME_LEN: usize = 128;

/// The longest `assign_cookie.max_age_seconds`: browsers cap cookie lifetimes at 400 days.
const MAX_AGE_LIMIT: u64 = 400 * 24 * 3600;

/// What `assign_cookie.max_age_seconds` may be, as error messages say it.
const MAX_AGE_ALLOWED: &str = "from 1 to 34560000 (400 days); leave it out for a session cookie";

/// The path of the whole document in error messages.
const ROOT: &str = "config";

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

impl ConfigError {
    /// The JSON path of the field at fault (`config` for the whole document).
    pub fn field(&self) -> &str {
        match self {
            ConfigError::Syntax { field, .. } | ConfigError::Invalid { field, .. } => field,
        }
    }
}

/// A contract violation at `field`; `value` is shown as given (quote strings with [`quote`] first).
fn invalid(field: impl Into<String>, value: impl Into<String>, allowed: &str) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        value: value.into(),
        allowed: allowed.to_string(),
    }
}

/// The error a percent that breaks the contract gets, at `field` (the same text wherever it is checked).
pub fn invalid_percent(field: impl Into<String>, text: &str) -> ConfigError {
    invalid(field, crate::text::quote_value(text), PERCENT_ALLOWED)
}

// ---------------------------------------------------------------------------------------------------------
// Step 1: the JSON contract, exactly.
// ---------------------------------------------------------------------------------------------------------

/// The plugin configuration as written by users (see docs/configuration.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct RawConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_header: Option<String>,
    #[serde(deserialize_with = "objects")]
    pub rollouts: Vec<RawRollout>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct RawRollout {
    pub name: String,
    #[serde(
        rename = "match",
        default,
        deserialize_with = "optional_object",
        skip_serializing_if = "Option::is_none"
    )]
    pub match_: Option<RawMatch>,
    pub stable: String,
    #[serde(deserialize_with = "objects")]
    pub canaries: Vec<RawCanary>,
    #[serde(
        default,
        deserialize_with = "optional_object",
        skip_serializing_if = "Option::is_none"
    )]
    pub sticky: Option<RawSticky>,
    #[serde(
        default,
        deserialize_with = "optional_object",
        skip_serializing_if = "Option::is_none"
    )]
    pub assign_cookie: Option<RawAssignCookie>,
    #[serde(
        default,
        deserialize_with = "objects_or_null",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub rules: Vec<RawRule>,
    #[serde(
        rename = "override",
        default,
        deserialize_with = "optional_object",
        skip_serializing_if = "Option::is_none"
    )]
    pub override_: Option<RawOverride>,
    /// The version Envoy's default route serves (a request of this rollout with no route header), when that
    /// route also adds the route header itself: the filter then writes nothing for users it keeps on that
    /// version (see [`Rollout::default_route`]). It names a version, not "stable", so a promotion, which
    /// changes stable but not Envoy's routes, can never make the two disagree. Absent: the filter always
    /// writes the route header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_route_version: Option<String>,
    /// Removed: it said "the default route serves stable", which a promotion made false (every user went to
    /// the old version). Still read, so that a config carrying it is refused with a line that names its
    /// replacement instead of "unknown field"; never written.
    #[serde(default, skip_serializing)]
    pub stable_by_default_route: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct RawMatch {
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct RawCanary {
    pub version: String,
    pub percent: Percent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct RawSticky {
    #[serde(deserialize_with = "objects")]
    pub keys: Vec<RawKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
}

/// `{"header": "x-user-id"}` or `{"cookie": "session"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "KeyFields", into = "KeyFields")]
pub enum RawKey {
    Header(String),
    Cookie(String),
}

/// A sticky key as written: one of two fields (checked when it becomes a [`RawKey`]).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
struct KeyFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cookie: Option<String>,
}

impl TryFrom<KeyFields> for RawKey {
    type Error = &'static str;

    fn try_from(fields: KeyFields) -> Result<Self, Self::Error> {
        match (fields.header, fields.cookie) {
            (Some(header), None) => Ok(RawKey::Header(header)),
            (None, Some(cookie)) => Ok(RawKey::Cookie(cookie)),
            (Some(_), Some(_)) => Err("a key has one kind: `header` or `cookie`, not both"),
            (None, None) => Err("a key needs `header` or `cookie`"),
        }
    }
}

impl From<RawKey> for KeyFields {
    fn from(key: RawKey) -> Self {
        match key {
            RawKey::Header(header) => KeyFields {
                header: Some(header),
                cookie: None,
            },
            RawKey::Cookie(cookie) => KeyFields {
                header: None,
                cookie: Some(cookie),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct RawAssignCookie {
    pub name: String,
    #[serde(
        default,
        deserialize_with = "max_age",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_age_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct RawRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    pub values: Vec<String>,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub struct RawOverride {
    pub header: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// A list that may be written as `null`, the same as leaving it out.
fn null_as_empty<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

/// A struct of the contract read from a JSON object only. serde's derive also reads a struct from an array
/// of its fields in order (`["web", null, "v1", …]`), which is not the contract.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(std::marker::PhantomData<T>);

        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectVisitor<T> {
            type Value = T;

            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("an object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }

        deserializer
            .deserialize_map(ObjectVisitor(std::marker::PhantomData))
            .map(Object)
    }
}

fn objects<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let items = Vec::<Object<T>>::deserialize(deserializer)?;
    Ok(items.into_iter().map(|Object(item)| item).collect())
}

fn objects_or_null<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let items = null_as_empty::<D, Object<T>>(deserializer)?;
    Ok(items.into_iter().map(|Object(item)| item).collect())
}

fn optional_object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Object<T>>::deserialize(deserializer)?.map(|Object(item)| item))
}

/// `max_age_seconds`: a whole number of seconds, refused with the contract's rule otherwise.
fn max_age<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let text = number.as_str();
    match text.parse::<u64>() {
        Ok(seconds) if (1..=MAX_AGE_LIMIT).contains(&seconds) => Ok(Some(seconds)),
        _ => Err(serde::de::Error::custom(format!(
            "{} is not allowed: {MAX_AGE_ALLOWED}",
            crate::text::cut(text)
        ))),
    }
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
    /// Every override and token header of every rollout (lower case, each once): removed from every
    /// request, so none reaches an upstream, whichever rollout matched.
    pub strip_headers: Vec<String>,
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
    /// The index in [`Rollout::versions`] of the version Envoy's default route serves
    /// (`default_route_version`). A request decided for that version that carried no route header is left
    /// as it is: Envoy already matched it to the default route, which serves that version and adds the
    /// route header. No header write, and no route re-match, for most of the traffic. None: always write.
    pub default_route: Option<usize>,
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
    format!("{}%", crate::percent::decimal(basis_points))
}

/// Parse and validate a plugin configuration.
pub fn parse(json: &[u8]) -> Result<Config, ConfigError> {
    parse_raw(json)?.validate()
}

/// Parse a plugin configuration into its raw, editable form, without the contract checks of
/// [`RawConfig::validate`] (tools that edit a config validate the result).
pub fn parse_raw(json: &[u8]) -> Result<RawConfig, ConfigError> {
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let Object(raw) = serde_path_to_error::deserialize(&mut deserializer).map_err(from_serde)?;
    deserializer.end().map_err(|err| syntax(ROOT, &err))?;
    Ok(raw)
}

/// A configuration held in a JSON value (canaryctl's state file and API bodies): the same contract and
/// messages as [`parse_raw`], without positions.
pub fn from_value(value: serde_json::Value) -> Result<RawConfig, ConfigError> {
    let Object(raw) = serde_path_to_error::deserialize(value).map_err(from_serde)?;
    Ok(raw)
}

/// A serde error at its path, as one line.
fn from_serde<E: std::fmt::Display>(err: serde_path_to_error::Error<E>) -> ConfigError {
    let path = err.path().to_string();
    // "." is the document itself, "?" a key that could not be read, "" an empty key of the document.
    let field = if path == "." || path == "?" || path.is_empty() {
        ROOT
    } else {
        path.as_str()
    };
    syntax(field, err.inner())
}

/// A syntax error as one line of at most [`MAX_LINE`](crate::text::MAX_LINE) characters.
fn syntax(field: &str, message: &impl std::fmt::Display) -> ConfigError {
    let field = one_line(&crate::text::cut(field), crate::text::MAX_SHOWN + 1);
    let room = crate::text::MAX_LINE.saturating_sub(field.chars().count() + 2);
    ConfigError::Syntax {
        message: one_line(&message.to_string(), room),
        field,
    }
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
        let strip_headers = strip_headers(&rollouts);
        Ok(Config {
            route_header,
            rollouts,
            strip_headers,
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
        let default_route = self.validate_default_route(at, &versions)?;
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
            default_route,
        })
    }

    /// Which version Envoy's default route serves, as an index into `versions` (None: a version this
    /// rollout does not have, or not said). The removed `stable_by_default_route` is refused here.
    #[inline(never)]
    fn validate_default_route(
        &self,
        at: &str,
        versions: &[String],
    ) -> Result<Option<usize>, ConfigError> {
        if self.stable_by_default_route.is_some() {
            let example = self
                .default_route_version
                .as_deref()
                .unwrap_or(&self.stable);
            return Err(ConfigError::Syntax {
                field: format!("{at}.stable_by_default_route"),
                message: format!(
                    "removed (after a promotion it sent users to the old version): name the version \
                     Envoy's default route serves instead, \"default_route_version\": {}",
                    quote(example)
                ),
            });
        }
        let Some(name) = &self.default_route_version else {
            return Ok(None);
        };
        let name = version_name(&format!("{at}.default_route_version"), name)?;
        Ok(versions.iter().position(|v| *v == name))
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
            let bp = canary.percent.basis_points();
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
                    if age == 0 || age > MAX_AGE_LIMIT {
                        return Err(invalid(
                            format!("{at}.assign_cookie.max_age_seconds"),
                            age.to_string(),
                            MAX_AGE_ALLOWED,
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

/// Every override and token header of every rollout, each once.
fn strip_headers(rollouts: &[Rollout]) -> Vec<String> {
    let mut headers: Vec<String> = Vec::new();
    let named = rollouts
        .iter()
        .filter_map(|r| r.override_.as_ref())
        .flat_map(|o| std::iter::once(&o.header).chain(o.token.as_ref().map(|(header, _)| header)));
    for header in named {
        if !headers.contains(header) {
            headers.push(header.clone());
        }
    }
    headers
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
    fn malformed_json_is_refused_with_its_position() {
        for (json, expected) in [
            (
                "{\"rollouts\": [",
                "rollouts: EOF while parsing a list at line 1 column 14",
            ),
            ("", "config: EOF while parsing a value at line 1 column 0"),
            (
                r#"{"rollouts":[]} trailing"#,
                "config: trailing characters at line 1 column 17",
            ),
            (
                "[1]",
                "config: invalid type: sequence, expected an object at line 1 column 0",
            ),
            (
                "  \"x\"",
                "config: invalid type: string \"x\", expected an object at line 1 column 5",
            ),
            (
                "7",
                "config: invalid type: integer `7`, expected an object at line 1 column 1",
            ),
            // A struct written as an array of its fields, which serde's derive alone would accept.
            (
                r#"{"rollouts":[["w",null,"v1",[{"version":"v2","percent":5}]]]}"#,
                "rollouts[0]: invalid type: sequence, expected an object at line 1 column 13",
            ),
            (
                r#"{"rollouts":[5]}"#,
                "rollouts[0]: invalid type: integer `5`, expected an object at line 1 column 14",
            ),
        ] {
            assert_eq!(err(json), expected, "config: {json}");
        }
    }

    #[test]
    fn unknown_missing_and_mistyped_fields_are_named() {
        for (json, expected) in [
            (
                r#"{"rollout":[]}"#,
                "rollout: unknown field `rollout`, expected `route_header` or `rollouts` at line 1 column 10",
            ),
            (r#"{}"#, "config: missing field `rollouts` at line 1 column 2"),
            (r#"{"rollouts":null}"#, "rollouts: invalid type: null, expected a sequence at line 1 column 16"),
            (
                r#"{"rollouts":[{"name":"w","stable":"v1","canaries":[{"version":"v2","percent":"5"}]}]}"#,
                "rollouts[0].canaries[0].percent: invalid type: string \"5\", expected a JSON number at line 1 column 80",
            ),
            (
                r#"{"rollouts":[{"name":"w","stable":"v1","canaries":[{"version":"v2","percent":5,"weight":1}]}]}"#,
                "rollouts[0].canaries[0].weight: unknown field `weight`, expected `version` or `percent` at line 1 column 87",
            ),
            (
                r#"{"rollouts":[{"name":"w","stable":"v1","canaries":[],"sticky":{"keys":[{"query":"u"}]}}]}"#,
                "rollouts[0].sticky.keys[0].query: unknown field `query`, expected `header` or `cookie` at line 1 column 79",
            ),
        ] {
            assert_eq!(err(json), expected, "config: {json}");
        }
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
                "rollouts[0]: duplicate field `name` at line 1 column 31",
            ),
            (
                canary(r#","sticky":{"keys":[{}]}"#),
                "rollouts[0].sticky.keys[0]: a key needs `header` or `cookie` at line 1 column 101",
            ),
            (
                canary(r#","sticky":{"keys":[{"header":"a","cookie":"b"}]}"#),
                "rollouts[0].sticky.keys[0]: a key has one kind: `header` or `cookie`, not both at line 1 column 126",
            ),
            (
                r#"{"rollouts":[{"name":"w","stable":"v1","canaries":[{"version":"v2","percent":1e400}]}]}"#.to_string(),
                "rollouts[0].canaries[0].percent: 1e+400 is not allowed: a number from 0 to 100 with at most two decimals at line 1 column 83",
            ),
            (
                r#"{"rollouts":[{"name":"w","stable":"v1","canaries":[{"version":"v2","percent":0.0000001}]}]}"#.to_string(),
                "rollouts[0].canaries[0].percent: 0.0000001 is not allowed: a number from 0 to 100 with at most two decimals at line 1 column 87",
            ),
            (
                canary(r#","assign_cookie":{"name":"c","max_age_seconds":-1}"#),
                "rollouts[0].assign_cookie.max_age_seconds: -1 is not allowed: from 1 to 34560000 (400 days); leave it out for a session cookie at line 1 column 130",
            ),
            (
                canary(r#","assign_cookie":{"name":"c","max_age_seconds":1.5}"#),
                "rollouts[0].assign_cookie.max_age_seconds: 1.5 is not allowed: from 1 to 34560000 (400 days); leave it out for a session cookie at line 1 column 131",
            ),
            (
                canary(r#","assign_cookie":{"name":"c","max_age_seconds":true}"#),
                "rollouts[0].assign_cookie.max_age_seconds: invalid type: boolean `true`, expected a JSON number at line 1 column 131",
            ),
            (
                canary(r#","rules":[{"header":"x-g","values":["a",7],"version":"v2"}]"#),
                "rollouts[0].rules[0].values[1]: invalid type: integer `7`, expected a string at line 1 column 121",
            ),
            (
                canary(r#","rules":{}"#),
                "rollouts[0].rules: invalid type: map, expected a sequence at line 1 column 89",
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
    fn user_text_in_errors_stays_on_one_line_and_is_cut() {
        let long = "k".repeat(5_000);
        for json in [
            "{\"rollouts\":[],\"a\nb\":1}".to_string(),
            format!(r#"{{"rollouts":[],"{long}":1}}"#),
            format!(
                r#"{{"rollouts":[{{"name":"w","stable":"v1","canaries":[{{"version":"v2","percent":"{long}\n"}}]}}]}}"#
            ),
            "\"\u{2028}\"".to_string(),
            // Documents that are not an object, with line breaks and bytes that are not UTF-8.
            "[1,\n2]".to_string(),
            "\n\"a\\nb\"\n".to_string(),
            "nul\nl".to_string(),
            "{\"rollouts\":[{\"name\":\"a\\nb\",\"stable\":\"v1\",\"canaries\":[]}]}".to_string(),
            format!(r#"{{"rollouts":[{{"name":"w","stable":"{long}","canaries":[]}}]}}"#),
        ] {
            let message = err(&json);
            assert!(
                !message.contains('\n') && !message.contains('\u{2028}'),
                "{message:?}"
            );
            assert!(
                message.chars().count() <= crate::text::MAX_LINE,
                "{} chars: {message}",
                message.len()
            );
        }
        for bytes in [
            &b"\xff\xfe{\n"[..],
            b"{\"rollouts\":[{\"name\":\"\xff\n\"}]}",
        ] {
            let message = parse(bytes).unwrap_err().to_string();
            assert!(!message.contains('\n'), "{message:?}");
        }
        assert_eq!(
            err("{\"rollouts\":[{\"name\":\"a\\nb\",\"stable\":\"v1\",\"canaries\":[]}]}"),
            "rollouts[0].name: \"a\\nb\" is not allowed: 1 to 128 letters, digits, '_' or '-'"
        );
    }

    #[test]
    fn percents_are_read_from_their_text_and_refused_unless_exact() {
        // The issue's cases: float noise from a ramp script, a typo-class tail, a value that f64 would round
        // to 100 (every user to the canary), and numbers no float holds exactly.
        for (text, shown) in [
            ("0.30000000000000004", "0.30000000000000004"),
            ("12.500000001", "12.500000001"),
            ("99.999999999", "99.999999999"),
            ("12.500000000000000000001", "12.500000000000000000001"),
            ("1.25e41", "1.25e+41"),
            ("1e99999999999999999999", "1e+99999999999999999999"),
        ] {
            let json = format!(
                r#"{{"rollouts":[{{"name":"w","stable":"v1","canaries":[{{"version":"v2","percent":{text}}}]}}]}}"#
            );
            let message = parse_raw(json.as_bytes()).unwrap_err().to_string();
            assert_eq!(
                message,
                format!(
                    "rollouts[0].canaries[0].percent: {shown} is not allowed: a number from 0 to 100 with at most two decimals at line 1 column {}",
                    json.len() - 4
                )
            );
        }
        // Exact two-decimal values pass however written, and are written back as the same value.
        for (text, basis_points, written) in [
            ("12.5", 1250, "12.5"),
            ("12.50", 1250, "12.5"),
            ("1.25e1", 1250, "12.5"),
            ("100", 10_000, "100"),
        ] {
            let json = format!(
                r#"{{"rollouts":[{{"name":"w","stable":"v1","canaries":[{{"version":"v2","percent":{text}}}]}}]}}"#
            );
            let raw = parse_raw(json.as_bytes()).unwrap();
            assert_eq!(
                raw.rollouts[0].canaries[0].percent.basis_points(),
                basis_points
            );
            assert_eq!(
                serde_json::to_string(&raw).unwrap(),
                json.replace(&format!(":{text}}}"), &format!(":{written}}}"))
            );
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
                "rollouts[0].canaries[0].percent: 100.5 is not allowed: a number from 0 to 100 with at most two decimals at line 1 column 85",
            ),
            (
                r#"{"rollouts":[{"name":"web","stable":"v1","canaries":[{"version":"v2","percent":-1}]}]}"#
                    .to_string(),
                "rollouts[0].canaries[0].percent: -1 is not allowed: a number from 0 to 100 with at most two decimals at line 1 column 82",
            ),
            (
                r#"{"rollouts":[{"name":"web","stable":"v1","canaries":[{"version":"v2","percent":12.345}]}]}"#
                    .to_string(),
                "rollouts[0].canaries[0].percent: 12.345 is not allowed: a number from 0 to 100 with at most two decimals at line 1 column 86",
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
                "rollouts[0].assign_cookie.max_age_seconds: 0 is not allowed: from 1 to 34560000 (400 days); leave it out for a session cookie at line 1 column 134",
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
