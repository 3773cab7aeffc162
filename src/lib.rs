//! canary-router: canary routing for Envoy.
//!
//! For each request the filter removes any client-sent route header, decides which version serves the
//! request (override, user-group rules, sticky percentage split) and writes that version into the route
//! header; Envoy's route table then sends the request to the version's cluster.
//!
//! The crate is split so the logic is plain, host-testable Rust:
//! - [`config`]: the JSON contract (serde) and its validation; [`percent`]: the fixed-point percentage;
//!   [`text`]: user values in one-line error messages,
//! - [`decision`]: the routing decision, and [`route`]: writing it into the request, for both builds,
//! - [`hash`]: the specified sticky hash, [`logging`]: the `log` facade's levels as both hosts number them,
//! - [`streams`]: the glue's per-stream state, bounded without wholesale clears,
//! - `filter` (wasm32 only): the proxy-wasm glue (our own thin ABI 0.2.1 layer) that reads headers in and
//!   writes the decision out. The native build (`native/`, an Envoy dynamic module) is the other glue.

pub mod config;
pub mod decision;
pub mod hash;
pub mod logging;
pub mod metrics;
pub mod percent;
pub mod route;
pub mod streams;
pub mod text;

#[cfg(target_arch = "wasm32")]
mod filter;
