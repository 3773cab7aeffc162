//! The routing decision: which version serves a request. Plain Rust, no proxy-wasm types, so it is
//! tested on the host and shared by every artifact (the `.wasm` filter, native tools).
//!
//! Order (part of the contract): first matching rollout → override → rules → sticky split → assigned or
//! random key. The glue removes the client's route header and writes the decision.

use crate::config::{Config, HostPattern, KeySource, Rollout};
use crate::hash::{bucket, BUCKETS};

/// Read access to one request's headers. The decision asks only for what the matching rollout needs and
/// copies nothing; an implementation that pays per host call should fetch once and serve from memory (the
/// wasm filter reads all request headers in one call).
pub trait Request {
    /// The first value of a request header (`name` is lower-case; `:authority` and `:path` included),
    /// or `None` when absent.
    fn header(&mut self, name: &str) -> Option<&[u8]>;
}

/// Why a request got its version. Also a label of the `canary_router_requests` counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The override header named a version (with the right token, if one is configured).
    Override,
    /// A rule's header or cookie value matched.
    Rule,
    /// The user key's bucket decided.
    Sticky,
    /// No user key: one was drawn, decided, and is set as a cookie on the response.
    Assigned,
    /// No user key and no cookie to assign: decided at random for this request alone.
    Random,
}

impl Reason {
    /// Every reason, in the order used to lay out per-reason counters.
    pub const ALL: [Reason; 5] = [
        Reason::Override,
        Reason::Rule,
        Reason::Sticky,
        Reason::Assigned,
        Reason::Random,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Override => "override",
            Reason::Rule => "rule",
            Reason::Sticky => "sticky",
            Reason::Assigned => "assigned",
            Reason::Random => "random",
        }
    }

    /// Position in [`Reason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The label used for requests no rollout matches.
pub const NO_MATCH: &str = "no_match";

/// The version chosen for a request that a rollout matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Index into [`Config::rollouts`].
    pub rollout: usize,
    /// Index into [`Rollout::versions`] (0 = stable).
    pub version: usize,
    pub reason: Reason,
    /// With `assign_cookie` and no user key: the drawn key, to set as a cookie on the response.
    pub assigned_key: Option<String>,
}

impl Decision {
    /// The version name to write into the route header.
    pub fn version_name<'c>(&self, config: &'c Config) -> &'c str {
        config
            .rollouts
            .get(self.rollout)
            .and_then(|r| r.versions.get(self.version))
            .map(String::as_str)
            .unwrap_or("")
    }

    /// The `set-cookie` value to add to the response, when a key was assigned.
    pub fn set_cookie(&self, config: &Config) -> Option<String> {
        let key = self.assigned_key.as_ref()?;
        let cookie = config.rollouts.get(self.rollout)?.assign_cookie.as_ref()?;
        Some(format!("{}={key}{}", cookie.name, cookie.attributes))
    }
}

/// Decide which version serves this request; `None` when no rollout matches.
///
/// `random` is called only when there is no user key (at most once per request).
pub fn decide(
    config: &Config,
    request: &mut impl Request,
    random: &mut impl FnMut() -> u64,
) -> Option<Decision> {
    let headers = request;
    let (index, rollout) = config
        .rollouts
        .iter()
        .enumerate()
        .find(|(_, rollout)| matches(rollout, headers))?;

    let mut decision = Decision {
        rollout: index,
        version: 0,
        reason: Reason::Sticky,
        assigned_key: None,
    };

    if let Some(ov) = &rollout.override_ {
        if let Some(wanted) = present(headers.header(&ov.header)) {
            let version = rollout.versions.iter().position(|v| v.as_bytes() == wanted);
            if let Some(version) = version {
                let authorised = match &ov.token {
                    None => true,
                    Some((token_header, token)) => present(headers.header(token_header))
                        .is_some_and(|given| constant_time_eq(given, token.as_bytes())),
                };
                if authorised {
                    decision.version = version;
                    decision.reason = Reason::Override;
                    return Some(decision);
                }
            }
        }
    }

    for rule in &rollout.rules {
        if let Some(value) = value_of(headers, &rule.source) {
            if rule.values.iter().any(|v| v.as_bytes() == value) {
                decision.version = rule.version;
                decision.reason = Reason::Rule;
                return Some(decision);
            }
        }
    }

    let user_bucket = rollout
        .sticky_keys
        .iter()
        .find_map(|source| value_of(headers, source).map(|key| bucket(&rollout.salt, key)));
    let user_bucket = match user_bucket {
        Some(b) => b,
        None if rollout.assign_cookie.is_some() => {
            let key = format!("{:016x}", random());
            let b = bucket(&rollout.salt, key.as_bytes());
            decision.assigned_key = Some(key);
            decision.reason = Reason::Assigned;
            b
        }
        None => {
            decision.reason = Reason::Random;
            // The remainder is below 10 000, so it always fits.
            (random() % BUCKETS) as u32
        }
    };
    decision.version = version_for_bucket(rollout, user_bucket);
    Some(decision)
}

/// Canaries own consecutive bucket ranges from 0 in listed order; every other bucket is stable (0).
pub fn version_for_bucket(rollout: &Rollout, user_bucket: u32) -> usize {
    rollout
        .canary_ends
        .iter()
        .position(|&end| user_bucket < end)
        .map_or(0, |canary| canary + 1)
}

fn matches(rollout: &Rollout, headers: &mut impl Request) -> bool {
    if !rollout.hosts.is_empty() {
        let Some(authority) = present(headers.header(":authority")) else {
            return false;
        };
        let host = host_of(authority);
        if !rollout
            .hosts
            .iter()
            .any(|pattern| host_matches(pattern, host))
        {
            return false;
        }
    }
    if let Some(prefix) = &rollout.path_prefix {
        match present(headers.header(":path")) {
            Some(path) if path.starts_with(prefix.as_bytes()) => {}
            _ => return false,
        }
    }
    true
}

/// The host part of an authority: without port, without a trailing dot. `[::1]:80` → `[::1]`.
pub fn host_of(authority: &[u8]) -> &[u8] {
    let host = if authority.first() == Some(&b'[') {
        match authority.iter().position(|&b| b == b']') {
            Some(end) => authority.get(..=end).unwrap_or(authority),
            None => authority,
        }
    } else {
        match authority.iter().rposition(|&b| b == b':') {
            Some(colon) => authority.get(..colon).unwrap_or(authority),
            None => authority,
        }
    };
    host.strip_suffix(b".").unwrap_or(host)
}

fn host_matches(pattern: &HostPattern, host: &[u8]) -> bool {
    match pattern {
        HostPattern::Exact(exact) => host.eq_ignore_ascii_case(exact.as_bytes()),
        HostPattern::Suffix(suffix) => {
            host.len() > suffix.len()
                && host
                    .get(host.len() - suffix.len()..)
                    .is_some_and(|end| end.eq_ignore_ascii_case(suffix.as_bytes()))
        }
    }
}

/// The value of cookie `name` in a `cookie` header (`a=1; b=2`), without surrounding quotes.
/// First occurrence wins. Never allocates, whatever the header's size.
pub fn cookie_value<'h>(header: &'h [u8], name: &str) -> Option<&'h [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        let (key, value) = (pair.get(..eq)?, pair.get(eq + 1..)?);
        if key.trim_ascii() != name.as_bytes() {
            return None;
        }
        let value = value.trim_ascii();
        Some(
            value
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(value),
        )
    })
}

/// Compare secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An empty value counts as absent (an empty key is no key).
fn present(value: Option<&[u8]>) -> Option<&[u8]> {
    value.filter(|v| !v.is_empty())
}

/// The non-empty value of a header or cookie.
fn value_of<'r>(headers: &'r mut impl Request, source: &KeySource) -> Option<&'r [u8]> {
    match source {
        KeySource::Header(name) => present(headers.header(name)),
        KeySource::Cookie(name) => {
            let header = present(headers.header("cookie"))?;
            present(cookie_value(header, name))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use std::collections::HashMap;

    /// A request with fixed headers that records which names the decision asked for.
    #[derive(Default)]
    struct FakeRequest {
        headers: HashMap<String, Vec<u8>>,
        asked: Vec<String>,
    }

    impl FakeRequest {
        fn with(pairs: &[(&str, &str)]) -> Self {
            let mut r = Self::default();
            for (k, v) in pairs {
                r.headers.insert(k.to_string(), v.as_bytes().to_vec());
            }
            r
        }
    }

    impl Request for FakeRequest {
        fn header(&mut self, name: &str) -> Option<&[u8]> {
            self.asked.push(name.to_string());
            self.headers.get(name).map(Vec::as_slice)
        }
    }

    const CONFIG: &str = r#"{
      "rollouts": [{
        "name": "web",
        "match": { "hosts": ["shop.example.com", "*.example.com"], "path_prefix": "/" },
        "stable": "v1",
        "canaries": [{ "version": "v2", "percent": 30 }],
        "sticky": { "keys": [{ "header": "x-user-id" }, { "cookie": "session" }] },
        "assign_cookie": { "name": "canary_id", "max_age_seconds": 60 },
        "rules": [
          { "header": "x-user-group", "values": ["beta", "staff"], "version": "v2" },
          { "cookie": "plan", "values": ["enterprise"], "version": "v1" }
        ],
        "override": { "header": "x-version-override", "token_header": "x-override-token", "token": "s3cret" }
      }, {
        "name": "api",
        "match": { "path_prefix": "/api" },
        "stable": "a1",
        "canaries": [{ "version": "a2", "percent": 100 }]
      }]
    }"#;

    fn config() -> Config {
        parse(CONFIG.as_bytes()).unwrap()
    }

    fn run(config: &Config, pairs: &[(&str, &str)]) -> Option<Decision> {
        decide(config, &mut FakeRequest::with(pairs), &mut || 42)
    }

    fn version_of(config: &Config, pairs: &[(&str, &str)]) -> (String, Option<Reason>) {
        match run(config, pairs) {
            Some(d) => (d.version_name(config).to_string(), Some(d.reason)),
            None => (String::new(), None),
        }
    }

    /// A user key whose bucket lands in the canary (`want_canary`) or in stable, for this config.
    fn key_in(config: &Config, rollout: usize, want_canary: bool) -> String {
        let r = &config.rollouts[rollout];
        (0..)
            .map(|i| format!("user-{i}"))
            .find(|k| (version_for_bucket(r, bucket(&r.salt, k.as_bytes())) != 0) == want_canary)
            .unwrap()
    }

    #[test]
    fn no_matching_rollout_means_no_decision() {
        let c = config();
        assert_eq!(
            run(&c, &[(":authority", "other.org"), (":path", "/")]),
            None
        );
        assert_eq!(
            run(&c, &[(":path", "/")]),
            None,
            "no authority: no host match"
        );
    }

    #[test]
    fn hosts_match_case_insensitively_without_port_and_by_suffix() {
        let c = config();
        for host in [
            "shop.example.com",
            "SHOP.Example.COM:8443",
            "a.example.com",
            "a.b.example.com.",
        ] {
            assert_eq!(
                run(&c, &[(":authority", host), (":path", "/")]).map(|d| d.rollout),
                Some(0),
                "{host}"
            );
        }
        for host in ["example.com", "shop.example.com.evil.org", "xexample.com"] {
            assert_eq!(
                run(&c, &[(":authority", host), (":path", "/api/x")]).map(|d| d.rollout),
                Some(1),
                "{host} falls through to the next rollout"
            );
        }
    }

    #[test]
    fn host_of_strips_ports_and_keeps_ipv6_literals() {
        assert_eq!(host_of(b"a.b:80"), b"a.b");
        assert_eq!(host_of(b"[::1]:8080"), b"[::1]");
        assert_eq!(host_of(b"[::1]"), b"[::1]");
        assert_eq!(host_of(b"a.b."), b"a.b");
        assert_eq!(host_of(b""), b"");
        assert_eq!(host_of(b":"), b"");
    }

    #[test]
    fn path_prefix_is_required_when_configured() {
        let c = config();
        assert_eq!(run(&c, &[(":authority", "x.org"), (":path", "/ap")]), None);
        assert_eq!(
            version_of(&c, &[(":authority", "x.org"), (":path", "/api/v1")]),
            ("a2".into(), Some(Reason::Random)),
            "the api rollout has no keys, so its choice is random (and 100% canary)"
        );
    }

    const SHOP: (&str, &str) = (":authority", "shop.example.com");
    const ROOT: (&str, &str) = (":path", "/");

    #[test]
    fn override_with_the_right_token_wins_over_everything() {
        let c = config();
        let d = run(
            &c,
            &[
                SHOP,
                ROOT,
                ("x-version-override", "v2"),
                ("x-override-token", "s3cret"),
                ("x-user-group", "enterprise-not"),
                ("cookie", "plan=enterprise"),
            ],
        )
        .unwrap();
        assert_eq!((d.version_name(&c), d.reason), ("v2", Reason::Override));
    }

    #[test]
    fn override_without_or_with_a_wrong_token_is_ignored() {
        let c = config();
        let stable_user = key_in(&c, 0, false);
        for token in [None, Some("wrong"), Some("s3cre"), Some("")] {
            let mut pairs = vec![
                SHOP,
                ROOT,
                ("x-version-override", "v2"),
                ("x-user-id", stable_user.as_str()),
            ];
            if let Some(t) = token {
                pairs.push(("x-override-token", t));
            }
            let d = run(&c, &pairs).unwrap();
            assert_eq!(
                (d.version_name(&c), d.reason),
                ("v1", Reason::Sticky),
                "{token:?}"
            );
        }
    }

    #[test]
    fn override_naming_an_unknown_version_is_ignored() {
        let c = config();
        let d = run(
            &c,
            &[
                SHOP,
                ROOT,
                ("x-version-override", "v9"),
                ("x-override-token", "s3cret"),
            ],
        )
        .unwrap();
        assert_ne!(d.reason, Reason::Override);
    }

    #[test]
    fn override_without_a_token_configured() {
        let c = parse(
            br#"{"rollouts":[{"name":"w","stable":"v1","canaries":[{"version":"v2","percent":0}],
                "override":{"header":"x-pick"}}]}"#,
        )
        .unwrap();
        let d = run(&c, &[("x-pick", "v2")]).unwrap();
        assert_eq!((d.version_name(&c), d.reason), ("v2", Reason::Override));
    }

    #[test]
    fn rules_decide_in_order_before_the_split() {
        let c = config();
        let stable_user = key_in(&c, 0, false);
        let canary_user = key_in(&c, 0, true);
        assert_eq!(
            version_of(
                &c,
                &[
                    SHOP,
                    ROOT,
                    ("x-user-group", "staff"),
                    ("x-user-id", &stable_user)
                ]
            ),
            ("v2".into(), Some(Reason::Rule))
        );
        assert_eq!(
            version_of(
                &c,
                &[
                    SHOP,
                    ROOT,
                    ("cookie", "a=1; plan=enterprise"),
                    ("x-user-id", &canary_user)
                ]
            ),
            ("v1".into(), Some(Reason::Rule))
        );
        // The first rule wins when both match.
        assert_eq!(
            version_of(
                &c,
                &[
                    SHOP,
                    ROOT,
                    ("x-user-group", "beta"),
                    ("cookie", "plan=enterprise")
                ]
            ),
            ("v2".into(), Some(Reason::Rule))
        );
        // Values compare exactly.
        assert_eq!(
            version_of(
                &c,
                &[
                    SHOP,
                    ROOT,
                    ("x-user-group", "Beta"),
                    ("x-user-id", &stable_user)
                ]
            ),
            ("v1".into(), Some(Reason::Sticky))
        );
    }

    #[test]
    fn the_first_present_sticky_key_decides() {
        let c = config();
        let stable_user = key_in(&c, 0, false);
        let canary_user = key_in(&c, 0, true);
        let cookie = format!("session={canary_user}");
        assert_eq!(
            version_of(
                &c,
                &[SHOP, ROOT, ("x-user-id", &stable_user), ("cookie", &cookie)]
            ),
            ("v1".into(), Some(Reason::Sticky))
        );
        assert_eq!(
            version_of(&c, &[SHOP, ROOT, ("x-user-id", ""), ("cookie", &cookie)]),
            ("v2".into(), Some(Reason::Sticky)),
            "an empty header is no key"
        );
        let assigned = format!("canary_id={canary_user}");
        assert_eq!(
            version_of(&c, &[SHOP, ROOT, ("cookie", &assigned)]),
            ("v2".into(), Some(Reason::Sticky)),
            "the assigned cookie is read back as the last key"
        );
    }

    #[test]
    fn without_a_key_a_key_is_assigned_and_its_cookie_sticks() {
        let c = config();
        let mut draws = 0;
        let d = decide(&c, &mut FakeRequest::with(&[SHOP, ROOT]), &mut || {
            draws += 1;
            0xdead_beef
        })
        .unwrap();
        assert_eq!(draws, 1);
        assert_eq!(d.reason, Reason::Assigned);
        assert_eq!(d.assigned_key.as_deref(), Some("00000000deadbeef"));
        assert_eq!(
            d.set_cookie(&c).unwrap(),
            "canary_id=00000000deadbeef; Max-Age=60; Path=/; HttpOnly; SameSite=Lax"
        );
        let back = run(&c, &[SHOP, ROOT, ("cookie", "canary_id=00000000deadbeef")]).unwrap();
        assert_eq!((back.version, back.reason), (d.version, Reason::Sticky));
        assert_eq!(back.assigned_key, None);
    }

    #[test]
    fn without_a_key_or_a_cookie_to_assign_the_choice_is_random() {
        let c = parse(br#"{"rollouts":[{"name":"w","stable":"v1","canaries":[{"version":"v2","percent":50}]}]}"#)
            .unwrap();
        let pick = |n: u64| decide(&c, &mut FakeRequest::default(), &mut || n).unwrap();
        assert_eq!((pick(4999).version, pick(4999).reason), (1, Reason::Random));
        assert_eq!(pick(5000).version, 0);
        assert_eq!(pick(14_999).version, 1, "taken modulo 10 000");
        assert_eq!(pick(15_000).version, 0);
    }

    #[test]
    fn headers_are_read_only_when_needed() {
        let c = config();
        let mut req = FakeRequest::with(&[SHOP, ROOT, ("cookie", "session=abc")]);
        decide(&c, &mut req, &mut || 0).unwrap();
        // Only what this request needed: host and path (match), the override header, the rules' header
        // and cookie, the sticky header and cookie. No token (the override header was absent).
        let mut asked = req.asked.clone();
        asked.sort();
        asked.dedup();
        assert_eq!(
            asked,
            vec![
                ":authority",
                ":path",
                "cookie",
                "x-user-group",
                "x-user-id",
                "x-version-override"
            ]
        );
        // The override token is read only when the override header names a version.
        assert!(!req.asked.contains(&"x-override-token".to_string()));

        // A rollout without hosts, path, keys or rules reads nothing at all.
        let bare = parse(br#"{"rollouts":[{"name":"w","stable":"v1","canaries":[{"version":"v2","percent":5}]}]}"#)
            .unwrap();
        let mut req = FakeRequest::with(&[SHOP]);
        decide(&bare, &mut req, &mut || 0).unwrap();
        assert!(req.asked.is_empty(), "{:?}", req.asked);
    }

    #[test]
    fn cookie_parsing_is_lenient_and_exact_on_names() {
        let h = b"a=1;b=2 ;  session=\"xyz\"; sessionx=no; session=second";
        assert_eq!(cookie_value(h, "a"), Some(&b"1"[..]));
        assert_eq!(cookie_value(h, "b"), Some(&b"2"[..]));
        assert_eq!(cookie_value(h, "session"), Some(&b"xyz"[..]));
        assert_eq!(cookie_value(h, "Session"), None);
        assert_eq!(cookie_value(b"novalue; =x; ;;", "novalue"), None);
        assert_eq!(cookie_value(b"k=", "k"), Some(&b""[..]));
        assert_eq!(cookie_value(b"k=\"", "k"), Some(&b"\""[..]));
        assert_eq!(
            cookie_value(b"\xff\xfe=\x80; k=\xc3", "k"),
            Some(&b"\xc3"[..])
        );
    }

    #[test]
    fn constant_time_eq_compares_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn hostile_values_never_fail_and_fall_back_sanely() {
        let c = config();
        let web = &c.rollouts[0];
        let huge = "k=v; ".repeat(20_000);
        let binary = String::from_utf8_lossy(&[0xff, 0x00, 0x80]).to_string();
        // A drawn key (the random source returns 42) decides for users without one.
        let drawn = version_for_bucket(web, bucket(&web.salt, format!("{:016x}", 42).as_bytes()));
        for (pairs, expected) in [
            // 20 000 cookies, none of them the session cookie: no key, one is assigned.
            (
                vec![SHOP, ROOT, ("cookie", huge.as_str())],
                Some((drawn, Reason::Assigned)),
            ),
            // Bytes that are not UTF-8 (here U+FFFD and a NUL) are a key like any other.
            (
                vec![SHOP, ROOT, ("x-user-id", binary.as_str())],
                Some((
                    version_for_bucket(web, bucket(&web.salt, binary.as_bytes())),
                    Reason::Sticky,
                )),
            ),
            // An empty override is no override; an empty key is no key.
            (
                vec![SHOP, ROOT, ("x-version-override", "")],
                Some((drawn, Reason::Assigned)),
            ),
            (
                vec![SHOP, ROOT, ("x-user-id", "")],
                Some((drawn, Reason::Assigned)),
            ),
            (
                vec![SHOP, ROOT, ("cookie", ";;;==;")],
                Some((drawn, Reason::Assigned)),
            ),
            // A broken IPv6 authority matches no host pattern; "/" is not the api rollout's prefix.
            (vec![(":authority", "[::1"), ROOT], None),
        ] {
            let got = run(&c, &pairs).map(|d| {
                assert_eq!(d.rollout, 0);
                (d.version, d.reason)
            });
            assert_eq!(
                got,
                expected,
                "{:?}",
                pairs.iter().map(|(k, v)| (k, v.len())).collect::<Vec<_>>()
            );
        }
        let mut req = FakeRequest::default();
        req.headers
            .insert(":authority".into(), b"shop.example.com".to_vec());
        req.headers.insert(":path".into(), b"/".to_vec());
        req.headers
            .insert("x-user-id".into(), vec![0xff, 0xfe, 0x00]);
        let d = decide(&c, &mut req, &mut || 0).unwrap();
        assert_eq!(d.reason, Reason::Sticky, "raw bytes are a valid key");
        assert_eq!(
            d.version,
            version_for_bucket(web, bucket(&web.salt, &[0xff, 0xfe, 0x00]))
        );
    }
}
