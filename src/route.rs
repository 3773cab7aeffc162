//! What the filter does to one request, whatever runs it: the proxy-wasm glue (`filter.rs`) and the native
//! Envoy dynamic module (`native/`) both call [`route`], so both artifacts write exactly the same headers.

use crate::config::{Config, DEFAULT_ROUTE_HEADER};
use crate::decision::{decide, Request};
use crate::metrics;

/// The request's headers as the host exposes them: read (through [`Request`]) and written.
pub trait RequestHeaders: Request {
    /// Removes every value of `name` (lower case). A request without that header is left untouched: each
    /// glue checks first in its own cheapest way, because any removal makes Envoy match the route again.
    fn remove(&mut self, name: &str);
    /// Sets `name` to `value`, replacing every value a client sent.
    fn replace(&mut self, name: &str, value: &[u8]);
}

/// What is left to do once the request headers are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The slot of [`metrics::counter_names`] to count this request in.
    pub counter_slot: usize,
    /// A `set-cookie` value for the response (with `assign_cookie`, for a user who had no key).
    pub set_cookie: Option<String>,
}

/// Decides which version serves the request and writes it into the route header. A request no rollout
/// matches loses any client-sent route header, so Envoy's default (stable) route serves it; a client can
/// never pick the version through that header. The override and token headers of every rollout are
/// removed from every request, honoured or not, whichever rollout matched: none reaches an upstream.
pub fn route(
    config: &Config,
    headers: &mut impl RequestHeaders,
    random: &mut impl FnMut() -> u64,
) -> Routed {
    let decision = decide(config, headers, random);
    let counter_slot = metrics::counter_slot(config, decision.as_ref());
    for name in &config.strip_headers {
        headers.remove(name);
    }
    let Some(d) = decision else {
        headers.remove(&config.route_header);
        return Routed {
            counter_slot,
            set_cookie: None,
        };
    };
    // The version Envoy's default route serves (the rollout names it), and no client-sent route header to
    // replace: the default route already serves it and adds the header, so nothing is written and Envoy
    // matches no route again. Any other version, whatever stable is, is written.
    let as_routed = config
        .rollouts
        .get(d.rollout)
        .is_some_and(|r| r.default_route == Some(d.version))
        && headers.header(&config.route_header).is_none();
    if !as_routed {
        headers.replace(&config.route_header, d.version_name(config).as_bytes());
    }
    Routed {
        counter_slot,
        set_cookie: d.set_cookie(config),
    }
}

/// No decision: no configuration for this stream (the wasm glue), or a caught failure (the native build).
/// The request goes to the default (stable) route with nothing a client could pick a version by: the
/// default route header, and the route, override and token headers of every configuration `known` (the
/// ones this VM or stream has seen), are removed.
pub fn route_unconfigured<'c>(
    headers: &mut impl RequestHeaders,
    known: impl IntoIterator<Item = &'c Config>,
) {
    headers.remove(DEFAULT_ROUTE_HEADER);
    for config in known {
        if config.route_header != DEFAULT_ROUTE_HEADER {
            headers.remove(&config.route_header);
        }
        for name in &config.strip_headers {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    /// Headers in a list, as a host keeps them; names lower case.
    #[derive(Default)]
    struct Fake(Vec<(String, Vec<u8>)>);

    impl Request for Fake {
        fn header(&mut self, name: &str) -> Option<&[u8]> {
            self.0
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_slice())
        }
    }

    impl RequestHeaders for Fake {
        fn remove(&mut self, name: &str) {
            self.0.retain(|(k, _)| k != name);
        }
        fn replace(&mut self, name: &str, value: &[u8]) {
            self.remove(name);
            self.0.push((name.to_string(), value.to_vec()));
        }
    }

    fn fake(headers: &[(&str, &str)]) -> Fake {
        Fake(
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        )
    }

    const CONFIG: &str = r#"{"rollouts":[{"name":"web","match":{"path_prefix":"/app"},"stable":"v1",
        "canaries":[{"version":"v2","percent":0}],
        "sticky":{"keys":[{"header":"x-user-id"}]},
        "assign_cookie":{"name":"cid"},
        "override":{"header":"x-pick","token_header":"x-token","token":"t"}}]}"#;

    #[test]
    fn spoofed_route_headers_are_replaced_and_honoured_overrides_removed() {
        let config = parse(CONFIG.as_bytes()).unwrap();
        let mut h = fake(&[
            (":path", "/app"),
            ("x-version", "v2"),
            ("x-version", "v3"),
            ("x-pick", "v2"),
            ("x-token", "t"),
            ("x-user-id", "u1"),
        ]);
        let routed = route(&config, &mut h, &mut || 7);
        assert_eq!(h.header("x-version"), Some(&b"v2"[..]));
        assert_eq!(h.0.iter().filter(|(k, _)| k == "x-version").count(), 1);
        assert_eq!(h.header("x-pick"), None);
        assert_eq!(h.header("x-token"), None);
        assert_eq!(routed.set_cookie, None);
        assert_eq!(
            metrics::counter_names(&config)[routed.counter_slot],
            "canary_router_requests.rollout.web.version.v2.reason.override"
        );
    }

    #[test]
    fn a_user_without_a_key_gets_stable_and_a_cookie() {
        let config = parse(CONFIG.as_bytes()).unwrap();
        let mut h = fake(&[(":path", "/app/x"), ("x-version", "v2")]);
        let routed = route(&config, &mut h, &mut || 0x1234);
        assert_eq!(h.header("x-version"), Some(&b"v1"[..]));
        let cookie = routed.set_cookie.unwrap();
        assert!(cookie.starts_with("cid="), "{cookie}");
    }

    #[test]
    fn unmatched_and_unconfigured_requests_lose_the_route_header() {
        let config = parse(CONFIG.as_bytes()).unwrap();
        let mut h = fake(&[(":path", "/other"), ("x-version", "v2")]);
        let routed = route(&config, &mut h, &mut || 1);
        assert_eq!(h.header("x-version"), None);
        assert_eq!(routed.counter_slot, 0);
        let mut h = fake(&[("x-version", "v2")]);
        route_unconfigured(&mut h, []);
        assert!(h.0.is_empty());
    }

    /// Two rollouts, only the first with an override and a token; a custom route header.
    const TWO: &str = r#"{"route_header":"x-canary","rollouts":[
        {"name":"admin","match":{"path_prefix":"/admin"},"stable":"a1","canaries":[{"version":"a2","percent":0}],
         "override":{"header":"x-pick","token_header":"x-token","token":"t"}},
        {"name":"web","match":{"path_prefix":"/web"},"stable":"v1","canaries":[{"version":"v2","percent":100}]}]}"#;

    #[test]
    fn override_and_token_headers_of_every_rollout_never_go_upstream() {
        let config = parse(TWO.as_bytes()).unwrap();
        for path in ["/web", "/other", "/admin"] {
            let mut h = fake(&[
                (":path", path),
                ("x-pick", "v2"),
                ("x-token", "t"),
                ("x-canary", "a2"),
            ]);
            route(&config, &mut h, &mut || 3);
            assert_eq!(h.header("x-pick"), None, "{path}");
            assert_eq!(h.header("x-token"), None, "{path}");
            let route_values: Vec<_> = h.0.iter().filter(|(k, _)| k == "x-canary").collect();
            match path {
                "/web" => assert_eq!(route_values, [&("x-canary".to_string(), b"v2".to_vec())]),
                "/admin" => assert_eq!(route_values, [&("x-canary".to_string(), b"a1".to_vec())]),
                _ => assert!(route_values.is_empty(), "{route_values:?}"),
            }
        }
    }

    #[test]
    fn without_a_decision_no_header_a_client_could_pick_by_survives() {
        let config = parse(TWO.as_bytes()).unwrap();
        let mut h = fake(&[
            (":path", "/web"),
            ("x-canary", "v2"),
            ("x-version", "v2"),
            ("x-pick", "a2"),
            ("x-token", "t"),
            ("x-user-id", "u"),
        ]);
        route_unconfigured(&mut h, [&config]);
        let left: Vec<&str> = h.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(left, [":path", "x-user-id"]);
    }

    #[test]
    fn only_the_default_route_s_version_is_left_as_routed_whatever_stable_is() {
        let json = |stable: &str, canary: &str, default_route: Option<&str>| {
            let field = default_route
                .map(|v| format!(r#","default_route_version":"{v}""#))
                .unwrap_or_default();
            format!(
                r#"{{"rollouts":[{{"name":"web","stable":"{stable}","canaries":[{{"version":"{canary}","percent":50}}],
                    "sticky":{{"keys":[{{"header":"x-user-id"}}]}}{field}}}]}}"#
            )
        };
        let config = parse(json("v1", "v2", Some("v1")).as_bytes()).unwrap();
        let web = &config.rollouts[0];
        assert_eq!(web.default_route, Some(0));
        let user = |canary: bool| {
            (0..)
                .map(|i| format!("u{i}"))
                .find(|u| {
                    let b = crate::hash::bucket(&web.salt, u.as_bytes());
                    (crate::decision::version_for_bucket(web, b) == 1) == canary
                })
                .unwrap()
        };
        // The same users in every config below: the bucket depends on the salt (the rollout name) only.
        let (bucket_stable, bucket_canary) = (user(false), user(true));
        // v1 is stable and the default route's: nothing written for its users (the default route adds it).
        let mut h = fake(&[(":path", "/"), ("x-user-id", &bucket_stable)]);
        route(&config, &mut h, &mut || 0);
        assert_eq!(h.header("x-version"), None);
        // Canary: written. A spoofed header on a stable user: replaced, never kept.
        let mut h = fake(&[("x-user-id", &bucket_canary)]);
        route(&config, &mut h, &mut || 0);
        assert_eq!(h.header("x-version"), Some(&b"v2"[..]));
        for spoof in ["v2", "v1", ""] {
            let mut h = fake(&[("x-user-id", &bucket_stable), ("x-version", spoof)]);
            route(&config, &mut h, &mut || 0);
            let values: Vec<_> = h.0.iter().filter(|(k, _)| k == "x-version").collect();
            assert_eq!(
                values,
                [&("x-version".to_string(), b"v1".to_vec())],
                "{spoof:?}"
            );
        }
        // Promoted (v2 stable, v1 a canary), Envoy's routes unchanged: v2's users get the header written, and
        // only v1's, the default route's, are left as routed.
        let promoted = parse(json("v2", "v1", Some("v1")).as_bytes()).unwrap();
        let mut h = fake(&[("x-user-id", &bucket_stable)]);
        route(&promoted, &mut h, &mut || 0);
        assert_eq!(h.header("x-version"), Some(&b"v2"[..]), "the new stable");
        let mut h = fake(&[("x-user-id", &bucket_canary)]);
        route(&promoted, &mut h, &mut || 0);
        assert_eq!(h.header("x-version"), None, "v1: the default route's");
        // Not said, or a version the rollout does not have: every version is written.
        for default_route in [None, Some("v0")] {
            let config = parse(json("v1", "v2", default_route).as_bytes()).unwrap();
            assert_eq!(config.rollouts[0].default_route, None);
            let mut h = fake(&[("x-user-id", &bucket_stable)]);
            route(&config, &mut h, &mut || 0);
            assert_eq!(h.header("x-version"), Some(&b"v1"[..]), "{default_route:?}");
        }
        assert_eq!(
            serde_json::to_string(
                &crate::config::parse_raw(json("v1", "v2", None).as_bytes()).unwrap()
            )
            .unwrap(),
            r#"{"rollouts":[{"name":"web","stable":"v1","canaries":[{"version":"v2","percent":50}],"sticky":{"keys":[{"header":"x-user-id"}]}}]}"#,
            "absent is not written back"
        );
    }

    #[test]
    fn the_removed_stable_by_default_route_is_refused_naming_its_replacement() {
        for flag in ["true", "false"] {
            let json = format!(
                r#"{{"rollouts":[{{"name":"web","stable":"v2","canaries":[{{"version":"v1","percent":0}}],
                    "stable_by_default_route":{flag}}}]}}"#
            );
            let err = parse(json.as_bytes()).unwrap_err().to_string();
            assert_eq!(
                err,
                r#"rollouts[0].stable_by_default_route: removed (after a promotion it sent users to the old version): name the version Envoy's default route serves instead, "default_route_version": "v2""#
            );
        }
    }
}
