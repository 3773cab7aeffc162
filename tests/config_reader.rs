//! The configuration reader against serde_json, on mutated documents: it never panics, accepts only
//! documents that are valid JSON, and reads every valid configuration the same as its serde round trip.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use canary_router::config::{parse, parse_raw};
use proptest::prelude::*;

const FULL: &str = r#"{
  "route_header": "X-Version",
  "rollouts": [{
    "name": "web",
    "match": { "hosts": ["Shop.Example.com", "*.example.com"], "path_prefix": "/a\u00e9\"" },
    "stable": "v1",
    "canaries": [{ "version": "v2", "percent": 12.5 }, { "version": "v3", "percent": 1.25e1 }],
    "sticky": { "keys": [{ "header": "X-User-Id" }, { "cookie": "session" }], "salt": "web-2026-11" },
    "assign_cookie": { "name": "canary_id", "max_age_seconds": 2592000 },
    "rules": [
      { "header": "x-user-group", "values": ["beta", "st\\aff"], "version": "v2" },
      { "cookie": "plan", "values": ["enterprise"], "version": "v1" }
    ],
    "override": { "header": "x-version-override", "token_header": "x-override-token", "token": "s3cret" }
  }]
}"#;

/// One edit of a document: delete, duplicate, or replace a byte with one JSON cares about.
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn mutated_documents_are_read_like_serde_json_reads_them(
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4)
    ) {
        let doc = mutate(FULL.as_bytes(), &edits);
        let ours = parse_raw(&doc);
        let theirs = serde_json::from_slice::<serde_json::Value>(&doc);
        if let Ok(raw) = &ours {
            // Accepted: it is valid JSON, and writing it back reads the same.
            prop_assert!(theirs.is_ok(), "accepted invalid JSON: {}", String::from_utf8_lossy(&doc));
            let again = parse_raw(serde_json::to_string(raw).unwrap().as_bytes()).unwrap();
            prop_assert_eq!(&again, raw);
        }
        if theirs.is_err() {
            prop_assert!(ours.is_err());
        }
        // Whatever it is, validation answers without panicking, with one line.
        if let Err(err) = parse(&doc) {
            prop_assert!(!err.to_string().contains('\n') || doc.contains(&b'\n'));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(doc in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse(&doc);
    }
}

#[test]
fn the_unmutated_document_is_valid() {
    let config = parse(FULL.as_bytes()).unwrap();
    assert_eq!(config.rollouts[0].canary_ends, vec![1250, 2500]);
    assert_eq!(
        config.rollouts[0].path_prefix.as_deref(),
        Some("/a\u{e9}\"")
    );
}
