//! The configuration contract under structure-aware fuzzing: generated configurations that are valid,
//! and near-valid ones (one to three edits away: a field dropped, an unknown one added, a value of the
//! wrong type, a hostile string, a percent with one decimal too many, a repeated key). Properties:
//! - every valid configuration is accepted, and written back reads the same;
//! - a percent is accepted exactly when it has at most two decimals and is within 0–100 (an oracle that
//!   knows each generated percent's value);
//! - nothing panics, and every refusal is one line, bounded, naming a field;
//! - the fuzzing reaches deep: most refusals are about a nested field, not the document's first byte.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::expect_used)]

use canary_router::config::{parse, parse_raw};
use canary_router::text::MAX_LINE;
use std::cell::Cell;

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use serde_json::{json, Map, Value};

/// A percent as written, with what the contract says of it: `Some(basis points)` or refused.
#[derive(Debug, Clone)]
struct PercentSpec {
    text: String,
    expected: Option<u32>,
}

fn percent_spec() -> impl Strategy<Value = PercentSpec> {
    let valid = (0u32..=10_000, 0u8..6).prop_map(|(bp, form)| {
        let (whole, frac) = (bp / 100, bp % 100);
        let text = match form {
            0 => format!("{whole}.{frac:02}"),
            1 if frac == 0 => format!("{whole}"),
            1 if frac % 10 == 0 => format!("{whole}.{}", frac / 10),
            2 => format!("{bp}e-2"),
            3 => format!("{whole}.{frac:02}000"),
            // 0.1250e2 = 12.5, 0.1e-1 = 0.01: all the digits after the point, an exponent to place them.
            4 if bp > 0 => format!("0.{bp}e{}", bp.to_string().len() as i32 - 2),
            _ => format!("{whole}.{frac:02}"),
        };
        PercentSpec {
            text,
            expected: Some(bp),
        }
    });
    let invalid =
        (0u32..=10_000, 1u32..=9, 1usize..15, 0u8..4).prop_map(|(bp, digit, zeros, form)| {
            let (whole, frac) = (bp / 100, bp % 100);
            let text = match form {
                // One more decimal, however far out: 12.500000001, 0.30000000000000004.
                0 => format!("{whole}.{frac:02}{}{digit}", "0".repeat(zeros)),
                // Over 100.
                1 => format!("{}", 100 + u64::from(digit) * 10u64.pow(zeros as u32 % 6)),
                // Negative.
                2 => format!("-{whole}.{frac:02}{digit}"),
                // 99.999999999: just under 100, rounds to 100 as a float.
                _ => format!("99.99{}", "9".repeat(zeros)),
            };
            PercentSpec {
                text,
                expected: None,
            }
        });
    prop_oneof![3 => valid, 1 => invalid]
}

/// Names for rollouts, versions, headers: valid, and distinct by an index suffix.
fn token(prefix: &'static str) -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,6}".prop_map(move |s| format!("{prefix}{s}"))
}

/// A valid rollout as JSON, with its canaries' percent specs (all valid, summing to at most 100 %).
fn rollout(index: usize) -> impl Strategy<Value = Value> {
    (
        token("r"),
        token("v"),
        prop::collection::vec(0u32..=5_000, 1..3),
        prop::option::of(prop::collection::vec(token("h"), 0..3)),
        prop::option::of("/[a-z]{0,5}"),
        prop::option::of(token("x-user-")),
        prop::option::of(1u64..=34_560_000),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            move |(name, version, shares, hosts, prefix, key, max_age, rule, over)| {
                let stable = format!("{version}-stable");
                let canaries: Vec<Value> = shares
                    .iter()
                    .enumerate()
                    .map(|(i, bp)| {
                        let text = format!("{}.{:02}", bp / 100, bp % 100);
                        json!({"version": format!("{version}-c{i}"), "percent": number(&text)})
                    })
                    .collect();
                let mut r = Map::new();
                r.insert("name".into(), json!(format!("{name}-{index}")));
                r.insert("stable".into(), json!(stable));
                r.insert("canaries".into(), Value::Array(canaries));
                let mut m = Map::new();
                if let Some(hosts) = hosts {
                    m.insert(
                        "hosts".into(),
                        json!(hosts
                            .iter()
                            .map(|h| format!("{h}.example.com"))
                            .collect::<Vec<_>>()),
                    );
                }
                if let Some(prefix) = prefix {
                    m.insert("path_prefix".into(), json!(prefix));
                }
                if !m.is_empty() {
                    r.insert("match".into(), Value::Object(m));
                }
                if let Some(key) = key {
                    r.insert(
                        "sticky".into(),
                        json!({"keys": [{"header": key}, {"cookie": "session"}]}),
                    );
                }
                if let Some(age) = max_age {
                    r.insert(
                        "assign_cookie".into(),
                        json!({"name": "cid", "max_age_seconds": age}),
                    );
                }
                if rule {
                    r.insert(
                        "rules".into(),
                        json!([{"header": "x-group", "values": ["beta"], "version": stable}]),
                    );
                }
                if over {
                    r.insert(
                        "override".into(),
                        json!({"header": "x-pick", "token_header": "x-token", "token": "s3cret"}),
                    );
                }
                Value::Object(r)
            },
        )
}

/// A JSON number kept exactly as written (serde_json's arbitrary_precision).
fn number(text: &str) -> Value {
    Value::Number(text.parse().unwrap())
}

fn valid_config() -> impl Strategy<Value = Value> {
    (rollout(0), prop::option::of(rollout(1)), any::<bool>()).prop_map(|(a, b, header)| {
        let mut config = Map::new();
        if header {
            config.insert("route_header".into(), json!("x-canary"));
        }
        config.insert(
            "rollouts".into(),
            Value::Array(std::iter::once(a).chain(b).collect()),
        );
        Value::Object(config)
    })
}

/// One edit of a configuration's JSON tree.
#[derive(Debug, Clone)]
enum Edit {
    DropKey(usize),
    UnknownKey(usize),
    WrongType(usize, u8),
    HostileString(usize, u8),
    Percent(usize, PercentSpec),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<usize>().prop_map(Edit::DropKey),
        any::<usize>().prop_map(Edit::UnknownKey),
        (any::<usize>(), any::<u8>()).prop_map(|(at, kind)| Edit::WrongType(at, kind)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, kind)| Edit::HostileString(at, kind)),
        (any::<usize>(), percent_spec()).prop_map(|(at, spec)| Edit::Percent(at, spec)),
    ]
}

/// Every JSON pointer in the tree, in document order.
fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                pointers(v, format!("{at}/{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                pointers(v, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn pick(list: &[String], at: usize) -> Option<String> {
    (!list.is_empty()).then(|| list[at % list.len()].clone())
}

fn hostile(kind: u8) -> String {
    match kind % 6 {
        0 => "a\nb".to_string(),
        1 => "\u{2028}line".to_string(),
        2 => "x".repeat(3_000),
        3 => "\u{0}\u{1b}[31m".to_string(),
        4 => String::new(),
        _ => "v 2\"'".to_string(),
    }
}

/// Applies an edit; returns what the edit did to percents (pointer, spec) when it set one.
fn apply(config: &mut Value, edit: &Edit) -> Option<(String, PercentSpec)> {
    let mut all = Vec::new();
    pointers(config, String::new(), &mut all);
    let objects: Vec<String> = all
        .iter()
        .filter(|p| config.pointer(p).unwrap().is_object())
        .cloned()
        .collect();
    let leaves: Vec<String> = all.iter().filter(|p| !p.is_empty()).cloned().collect();
    match edit {
        Edit::DropKey(at) => {
            let target = pick(&leaves, *at)?;
            let (parent, key) = target.rsplit_once('/').unwrap();
            match config.pointer_mut(parent).unwrap() {
                Value::Object(map) => {
                    map.remove(key);
                }
                Value::Array(items) => {
                    let i: usize = key.parse().unwrap();
                    items.remove(i);
                }
                _ => {}
            }
        }
        Edit::UnknownKey(at) => {
            let target = pick(&objects, *at)?;
            if let Some(Value::Object(map)) = config.pointer_mut(&target) {
                map.insert("weight".into(), json!(1));
            }
        }
        Edit::WrongType(at, kind) => {
            let target = pick(&leaves, *at)?;
            let value = match kind % 6 {
                0 => json!("5"),
                1 => json!(7),
                2 => json!(true),
                3 => Value::Null,
                4 => json!([1]),
                _ => json!({}),
            };
            *config.pointer_mut(&target).unwrap() = value;
        }
        Edit::HostileString(at, kind) => {
            let strings: Vec<&String> = leaves
                .iter()
                .filter(|p| config.pointer(p).unwrap().is_string())
                .collect();
            if !strings.is_empty() {
                let target = strings[*at % strings.len()].clone();
                *config.pointer_mut(&target).unwrap() = json!(hostile(*kind));
            }
        }
        Edit::Percent(at, spec) => {
            let percents: Vec<&String> =
                leaves.iter().filter(|p| p.ends_with("/percent")).collect();
            if !percents.is_empty() {
                let target = percents[*at % percents.len()].clone();
                *config.pointer_mut(&target).unwrap() = number(&spec.text);
                return Some((target, spec.clone()));
            }
        }
    }
    None
}

fn check_one_line(message: &str) {
    assert!(
        !message.contains(['\n', '\r', '\u{2028}', '\u{2029}'])
            && !message.chars().any(char::is_control),
        "not one line: {message:?}"
    );
    assert!(
        message.chars().count() <= MAX_LINE,
        "{} chars: {message}",
        message.chars().count()
    );
    let (field, rest) = message.split_once(": ").unwrap_or_default();
    assert!(
        !field.is_empty() && !rest.is_empty(),
        "names no field: {message}"
    );
}

#[test]
fn generated_valid_configs_are_accepted_and_read_back_the_same() {
    let mut runner = TestRunner::new(RunnerConfig::with_cases(1_000));
    runner
        .run(&valid_config(), |config| {
            let text = config.to_string();
            let raw = parse_raw(text.as_bytes())
                .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
            raw.validate()
                .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
            let again = parse_raw(serde_json::to_string(&raw).unwrap().as_bytes()).unwrap();
            prop_assert_eq!(again, raw);
            Ok(())
        })
        .unwrap();
}

#[test]
fn percents_are_accepted_exactly_when_the_contract_allows_them() {
    let mut runner = TestRunner::new(RunnerConfig::with_cases(4_000));
    runner
        .run(&percent_spec(), |spec| {
            let text = format!(
                r#"{{"rollouts":[{{"name":"w","stable":"v1","canaries":[{{"version":"v2","percent":{}}}]}}]}}"#,
                spec.text
            );
            match (parse(text.as_bytes()), spec.expected) {
                (Ok(config), Some(bp)) => prop_assert_eq!(config.rollouts[0].canary_basis_points[0], bp),
                (Err(err), None) => {
                    let message = err.to_string();
                    check_one_line(&message);
                    prop_assert!(
                        message.starts_with("rollouts[0].canaries[0].percent: ")
                            && message.contains("is not allowed: a number from 0 to 100 with at most two decimals"),
                        "{}",
                        message
                    );
                }
                (got, expected) => prop_assert!(false, "{}: got {:?}, expected {:?}", spec.text, got.map(|_| ()), expected),
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn near_valid_configs_never_panic_and_are_refused_in_one_line_naming_the_field() {
    let mut runner = TestRunner::new(RunnerConfig::with_cases(3_000));
    let strategy = (
        valid_config(),
        prop::collection::vec(edit(), 1..4),
        any::<bool>(),
    );
    let (accepted, nested, refused) = (Cell::new(0u32), Cell::new(0u32), Cell::new(0u32));
    runner
        .run(&strategy, |(mut config, edits, repeat_key)| {
            // The last percent written at each place is the one the document holds.
            let mut percent_edits = std::collections::BTreeMap::new();
            for e in &edits {
                percent_edits.extend(apply(&mut config, e));
            }
            let mut text = config.to_string();
            if repeat_key {
                // serde_json's Map cannot hold a repeated key: repeat one in the text.
                text = text.replacen("\"name\":", "\"name\":\"again\",\"name\":", 1);
            }
            match parse(text.as_bytes()) {
                Ok(parsed) => {
                    accepted.set(accepted.get() + 1);
                    prop_assert!(
                        !text.contains("\"weight\""),
                        "an unknown field was accepted: {}",
                        text
                    );
                    // Every edited percent that survived is read as its exact value.
                    for (pointer, spec) in percent_edits {
                        if config
                            .pointer(&pointer)
                            .and_then(Value::as_number)
                            .is_some_and(|n| n.as_str() == spec.text)
                        {
                            prop_assert!(spec.expected.is_some(), "{} was accepted", spec.text);
                        }
                    }
                    let raw = parse_raw(text.as_bytes()).unwrap();
                    prop_assert_eq!(
                        parse(serde_json::to_string(&raw).unwrap().as_bytes()).unwrap(),
                        parsed
                    );
                }
                Err(err) => {
                    refused.set(refused.get() + 1);
                    let message = err.to_string();
                    check_one_line(&message);
                    if err.field() != "config" {
                        nested.set(nested.get() + 1);
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    // The fuzzing is worth something only if it gets past the first byte: most refusals are about a
    // nested field, and some edited configurations are still valid (e.g. an optional field dropped).
    let (accepted, nested, refused) = (accepted.get(), nested.get(), refused.get());
    assert!(
        refused > 1_000 && accepted > 100,
        "accepted {accepted}, refused {refused}"
    );
    assert!(
        f64::from(nested) / f64::from(refused) > 0.8,
        "only {nested} of {refused} refusals name a nested field"
    );
}

/// One edit of a document's bytes: delete, insert or replace a byte JSON cares about.
fn mutate(doc: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
    const BYTES: &[u8] = b"{}[],:\"\\0123456789.-+eEnulltrue \n\xff\x01";
    let mut out = doc.to_vec();
    for &(at, kind, byte) in edits {
        if out.is_empty() {
            break;
        }
        let at = at % out.len();
        let byte = BYTES[byte as usize % BYTES.len()];
        match kind % 3 {
            0 => {
                out.remove(at);
            }
            1 => out.insert(at, byte),
            _ => out[at] = byte,
        }
    }
    out
}

/// A one-line document (so that a line break in an error can only come from the reader).
const FULL: &str = r#"{"route_header":"X-Version","rollouts":[{"name":"web","match":{"hosts":["Shop.Example.com","*.example.com"],"path_prefix":"/a\u00e9\""},"stable":"v1","canaries":[{"version":"v2","percent":12.5},{"version":"v3","percent":1.25e1}],"sticky":{"keys":[{"header":"X-User-Id"},{"cookie":"session"}],"salt":"web-2026-11"},"assign_cookie":{"name":"canary_id","max_age_seconds":2592000},"rules":[{"header":"x-user-group","values":["beta","st\\aff"],"version":"v2"},{"cookie":"plan","values":["enterprise"],"version":"v1"}],"override":{"header":"x-version-override","token_header":"x-override-token","token":"s3cret"}}]}"#;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn byte_edits_of_a_valid_document_are_read_as_json_and_refused_in_one_line(
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4)
    ) {
        let doc = mutate(FULL.as_bytes(), &edits);
        let ours = parse_raw(&doc);
        let theirs = serde_json::from_slice::<Value>(&doc);
        if let Ok(raw) = &ours {
            prop_assert!(theirs.is_ok(), "accepted invalid JSON: {}", String::from_utf8_lossy(&doc));
            let again = parse_raw(serde_json::to_string(raw).unwrap().as_bytes()).unwrap();
            prop_assert_eq!(&again, raw);
        }
        if let Err(err) = parse(&doc) {
            check_one_line(&err.to_string());
        }
    }
}

#[test]
fn the_unmutated_document_is_valid() {
    let config = parse(FULL.as_bytes()).unwrap();
    assert!(!FULL.contains('\n'));
    assert_eq!(config.rollouts[0].canary_ends, vec![1250, 2500]);
    assert_eq!(
        config.rollouts[0].path_prefix.as_deref(),
        Some("/a\u{e9}\"")
    );
}
