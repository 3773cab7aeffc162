//! Properties of the sticky split that users depend on, checked over many keys and configurations.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use canary_router::config::{parse, Config};
use canary_router::decision::{decide, Reason, Request};
use proptest::prelude::*;

/// A request that carries only a user key in `x-user-id`.
struct UserRequest<'a>(&'a str);

impl Request for UserRequest<'_> {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        (name == "x-user-id").then_some(self.0.as_bytes())
    }
}

/// A rollout with sticky keys and the given canary percents (basis points / 100).
fn config(salt: &str, canary_basis_points: &[u32]) -> Config {
    let canaries: Vec<String> = canary_basis_points
        .iter()
        .enumerate()
        .map(|(i, bp)| {
            format!(
                r#"{{"version":"c{i}","percent":{}.{:02}}}"#,
                bp / 100,
                bp % 100
            )
        })
        .collect();
    let json = format!(
        r#"{{"rollouts":[{{"name":"web","stable":"stable","canaries":[{}],
            "sticky":{{"keys":[{{"header":"x-user-id"}}],"salt":"{salt}"}}}}]}}"#,
        canaries.join(",")
    );
    parse(json.as_bytes()).unwrap()
}

/// The version index a user gets; the random source must never matter when a key is present.
fn version(config: &Config, user: &str) -> usize {
    let mut draws = 0;
    let d = decide(config, &mut UserRequest(user), &mut || {
        draws += 1;
        7
    })
    .unwrap();
    assert_eq!(d.reason, Reason::Sticky);
    assert_eq!(draws, 0, "a present key never draws randomness");
    d.version
}

/// Canary percents (in basis points) whose sum is at most 100 %.
fn canary_split() -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(0u32..=10_000, 1..=3)
        .prop_filter("sum at most 100%", |v| v.iter().sum::<u32>() <= 10_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn a_user_keeps_their_version(split in canary_split(), user in "\\PC{1,40}") {
        let c = config("s", &split);
        let first = version(&c, &user);
        for _ in 0..3 {
            prop_assert_eq!(version(&c, &user), first);
        }
    }

    #[test]
    fn raising_a_percent_never_moves_a_user_back_to_stable(
        split in canary_split(),
        which in 0usize..3,
        raise in 1u32..=10_000,
    ) {
        let which = which % split.len();
        let mut raised = split.clone();
        raised[which] = (raised[which] + raise).min(10_000 - (split.iter().sum::<u32>() - split[which]));
        let before = config("web", &split);
        let after = config("web", &raised);
        for i in 0..2_000 {
            let user = format!("user-{i}");
            let (b, a) = (version(&before, &user), version(&after, &user));
            prop_assert!(!(b != 0 && a == 0), "{user} moved canary {b} -> stable ({split:?} -> {raised:?})");
            if split.len() == 1 && b == 1 {
                prop_assert_eq!(a, 1, "with one canary, its users stay as it grows");
            }
        }
    }
}

#[test]
fn each_share_is_within_half_a_point_over_100_000_users() {
    for split in [vec![1250], vec![500, 2500, 0], vec![9999], vec![1, 4999]] {
        let c = config("web-2026-11", &split);
        let mut counts = vec![0u32; split.len() + 1];
        let users = 100_000;
        for i in 0..users {
            counts[version(&c, &format!("user-{i}"))] += 1;
        }
        let stable_bp = 10_000 - split.iter().sum::<u32>();
        let expected: Vec<u32> = std::iter::once(stable_bp)
            .chain(split.iter().copied())
            .collect();
        for (v, (&got, &bp)) in counts.iter().zip(&expected).enumerate() {
            let got_pct = f64::from(got) * 100.0 / f64::from(users);
            let want_pct = f64::from(bp) / 100.0;
            assert!(
                (got_pct - want_pct).abs() <= 0.5,
                "split {split:?}: version {v} got {got_pct:.3}%, configured {want_pct}%"
            );
        }
    }
}

#[test]
fn two_salts_choose_different_cohorts() {
    let (a, b) = (
        config("web-2026-10", &[1000]),
        config("web-2026-11", &[1000]),
    );
    let users: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
    let cohort_a: Vec<&String> = users.iter().filter(|u| version(&a, u) == 1).collect();
    let both = cohort_a.iter().filter(|u| version(&b, u) == 1).count();
    // Independent cohorts overlap by about 10 % of a 10 % cohort; the same cohort would overlap fully.
    let overlap = both as f64 / cohort_a.len() as f64;
    assert!(cohort_a.len() > 1_800, "cohort size {}", cohort_a.len());
    assert!(overlap < 0.2, "cohorts overlap by {:.1}%", overlap * 100.0);
}

/// A request's headers as a host keeps them (names lower case), for `route`.
struct Headers(Vec<(String, Vec<u8>)>);

impl Request for Headers {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

impl canary_router::route::RequestHeaders for Headers {
    fn remove(&mut self, name: &str) {
        self.0.retain(|(k, _)| k != name);
    }
    fn replace(&mut self, name: &str, value: &[u8]) {
        self.remove(name);
        self.0.push((name.to_string(), value.to_vec()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// What Envoy routes on is the written route header, or, when none is written, the default route's
    /// version. Whatever stable is (before or after any promotion), whichever version the config says the
    /// default route serves, and whatever a client sent, that is the version the filter decided.
    #[test]
    fn every_request_reaches_the_decided_version_whatever_stable_and_the_default_route_are(
        split in canary_split(),
        stable_at in 0usize..4,
        default_at in 0usize..5,
        spoof in prop::option::of(prop::sample::select(vec!["v0", "v1", "v2", "v3", ""])),
    ) {
        // Versions v0..v(n), stable one of them (a promotion moves it), the default route's any of them or
        // one the rollout does not have (v4).
        let mut versions: Vec<String> = (0..=split.len()).map(|i| format!("v{i}")).collect();
        let stable = versions.remove(stable_at % versions.len());
        let canaries: Vec<String> = split.iter().zip(&versions).map(|(bp, v)| {
            format!(r#"{{"version":"{v}","percent":{}.{:02}}}"#, bp / 100, bp % 100)
        }).collect();
        let default_route = format!("v{default_at}");
        let json = format!(
            r#"{{"rollouts":[{{"name":"web","stable":"{stable}","canaries":[{}],
                "sticky":{{"keys":[{{"header":"x-user-id"}}]}},"default_route_version":"{default_route}"}}]}}"#,
            canaries.join(",")
        );
        let config = parse(json.as_bytes()).unwrap();
        for i in 0..300 {
            let user = format!("user-{i}");
            let mut headers = Headers(vec![("x-user-id".into(), user.clone().into_bytes())]);
            if let Some(spoof) = spoof {
                headers.0.push(("x-version".into(), spoof.as_bytes().to_vec()));
            }
            let decided = version(&config, &user);
            canary_router::route::route(&config, &mut headers, &mut || 7);
            let written: Vec<&[u8]> = headers.0.iter().filter(|(k, _)| k == "x-version").map(|(_, v)| v.as_slice()).collect();
            prop_assert!(written.len() <= 1, "{user}: {} route headers", written.len());
            let reached = written.first().map_or(default_route.as_str(), |v| std::str::from_utf8(v).unwrap());
            prop_assert_eq!(reached, config.rollouts[0].versions[decided].as_str(), "{}: {}", user, json);
        }
    }
}
