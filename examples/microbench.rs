//! Host micro-benchmark of the decision core (ns per decision) and of config validation (µs per
//! config): `cargo run --release --example microbench`. Timed over many iterations, medians of rounds.
use std::hint::black_box;
use std::time::Instant;

use canary_router::config::parse;
use canary_router::decision::{decide, Request};

/// Headers of a realistic request: a user id and a cookie, no group header.
struct Headers<'a> {
    user: &'a [u8],
}

impl Request for Headers<'_> {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        match name {
            "x-user-id" => Some(self.user),
            "cookie" => Some(b"theme=dark; session=abc"),
            _ => None,
        }
    }
}

fn median_ns(rounds: usize, iterations: u32, mut f: impl FnMut(u32)) -> f64 {
    let mut samples: Vec<f64> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for i in 0..iterations {
                f(i);
            }
            start.elapsed().as_nanos() as f64 / f64::from(iterations)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples.get(rounds / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let text = std::fs::read("envoy/plugin-config.json").unwrap_or_default();
    let Ok(config) = parse(&text) else {
        eprintln!("envoy/plugin-config.json does not parse: run from the repository root");
        std::process::exit(2);
    };
    let users: Vec<Vec<u8>> = (0..1000)
        .map(|i| format!("user-{i}").into_bytes())
        .collect();
    let decision_ns = median_ns(9, 200_000, |i| {
        let user = users
            .get(i as usize % users.len())
            .map(Vec::as_slice)
            .unwrap_or_default();
        black_box(decide(black_box(&config), &mut Headers { user }, &mut || 7));
    });
    let validation_ns = median_ns(9, 2_000, |_| {
        black_box(parse(black_box(&text)).is_ok());
    });
    println!("| host micro-benchmark | median |");
    println!("| --- | ---: |");
    println!("| decision, shipped config (rule miss, sticky header hit) | {decision_ns:.0} ns |");
    println!(
        "| parse + validate envoy/plugin-config.json | {:.1} µs |",
        validation_ns / 1000.0
    );
}
