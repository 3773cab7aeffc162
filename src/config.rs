//! The plugin configuration: the JSON contract users write, and its validated, ready-to-route form.
//!
//! Two steps, so that nothing invalid can reach the request path:
//! 1. [`RawConfig`] mirrors the JSON exactly (`deny_unknown_fields`, so a typo is an error, not a silent default).
//! 2. [`RawConfig::validate`] checks every rule of the contract and builds [`Config`]: percentages as integer
//!    bucket ranges, header names lower-cased, rule and override versions resolved to indexes.
//!
//! Every error names the field (as a JSON path), the value and what is allowed, in one line.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

use crate::hash::BUCKETS;

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

/// A string value as it appears in the JSON, quoted and escaped, so that empty or odd values are visible.
fn quoted(value: &str) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| format!("{value:?}"))
}

// ---------------------------------------------------------------------------------------------------------
// Step 1: the JSON contract, exactly.
// ---------------------------------------------------------------------------------------------------------

/// The plugin configuration as written by users (see the README's configuration reference).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route_header: Option<String>,
    pub rollouts: Vec<RawRollout>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RawRule>,
    #[serde(rename = "override", skip_serializing_if = "Option::is_none")]
    pub override_: Option<RawOverride>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCanary {
    pub version: String,
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSticky {
    pub keys: Vec<RawKey>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
}

/// `{"header": "x-user-id"}` or `{"cookie": "session"}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum RawKey {
    Header(String),
    Cookie(String),
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAssignCookie {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    pub values: Vec<String>,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
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
    // serde would read a struct from an array too, with a baffling message; say what is expected.
    let text = json.trim_ascii();
    if !text.is_empty() && !text.starts_with(b"{") {
        let shown = String::from_utf8_lossy(text.get(..40).unwrap_or(text)).into_owned();
        return Err(invalid("config", shown, "a JSON object"));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let raw: RawConfig =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|err| ConfigError::Syntax {
            field: path_text(&err.path().to_string()),
            message: err.inner().to_string(),
        })?;
    deserializer.end().map_err(|err| ConfigError::Syntax {
        field: "config".to_string(),
        message: err.to_string(),
    })?;
    Ok(raw)
}

/// serde_path_to_error writes the root as "."; say "config" instead.
fn path_text(path: &str) -> String {
    if path == "." || path.is_empty() {
        "config".to_string()
    } else {
        path.to_string()
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
                    quoted(&rollout.name),
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

impl RawRollout {
    fn validate(&self, at: &str, route_header: &str) -> Result<Rollout, ConfigError> {
        let name = rollout_name(&format!("{at}.name"), &self.name)?;

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
                            quoted(p),
                            "a path that starts with \"/\"",
                        ))
                    }
                };
                (hosts, prefix)
            }
        };

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
                    quoted(&version),
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

        let mut sticky_keys = Vec::new();
        let salt = match &self.sticky {
            None => name.clone(),
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
                    None => name.clone(),
                    Some(salt) if !salt.is_empty() => salt.clone(),
                    Some(salt) => {
                        return Err(invalid(
                            format!("{at}.sticky.salt"),
                            quoted(salt),
                            "a non-empty string (leave it out to use the rollout name)",
                        ))
                    }
                }
            }
        };

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
                        format!("header {} and cookie {}", quoted(h), quoted(c)),
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
            let version = version_index(&format!("{field}.version"), &rule.version, &versions)?;
            rules.push(Rule {
                source,
                values: rule.values.clone(),
                version,
            });
        }

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
                                quoted(&th),
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
                            format!("absent while token_header is {}", quoted(th)),
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
            quoted(name),
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
            quoted(name),
            "1 to 128 visible ASCII characters (a valid header value, no spaces)",
        ))
    }
}

fn version_index(field: &str, name: &str, versions: &[String]) -> Result<usize, ConfigError> {
    versions.iter().position(|v| v == name).ok_or_else(|| {
        invalid(
            field,
            quoted(name),
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
            quoted(name),
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
            quoted(&name),
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
            quoted(name),
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
            quoted(host),
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
            percent.to_string(),
            "a number from 0 to 100 with at most two decimals",
        ));
    }
    // In range 0..=10000 by the check above, so the conversion is exact.
    Ok(rounded as u32)
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
            "rollouts: EOF while parsing a list at line 1 column 14"
        );
        assert_eq!(
            err(""),
            "config: EOF while parsing a value at line 1 column 0"
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
            "rollout: unknown field `rollout`, expected `route_header` or `rollouts` at line 1 column 10"
        );
        assert_eq!(
            err(r#"{}"#),
            "config: missing field `rollouts` at line 1 column 2"
        );
        assert_eq!(
            err(r#"{"rollouts":[{"name":"w","stable":"v1","canaries":[{"version":"v2","percent":"5"}]}]}"#),
            "rollouts[0].canaries[0].percent: invalid type: string \"5\", expected f64 at line 1 column 80"
        );
        assert_eq!(
            err(r#"{"rollouts":[{"name":"w","stable":"v1","canaries":[{"version":"v2","percent":5,"weight":1}]}]}"#),
            "rollouts[0].canaries[0].weight: unknown field `weight`, expected `version` or `percent` at line 1 column 87"
        );
        assert_eq!(
            err(r#"{"rollouts":[{"name":"w","stable":"v1","canaries":[],"sticky":{"keys":[{"query":"u"}]}}]}"#),
            "rollouts[0].sticky.keys[0]: unknown variant `query`, expected `header` or `cookie` at line 1 column 79"
        );
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
