//! The proxy-wasm glue: read headers in, write the decision out. No routing logic lives here.
//!
//! Host calls go through `proxy_wasm::hostcalls` and their errors are ignored or mapped to "absent",
//! never unwrapped: a trap would fail the request (503) and, without FAIL_RELOAD, the worker's VM.

use std::cell::Cell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use crate::config::{self, Config};
use crate::decision::{decide, Request};
use crate::metrics;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(CanaryRoot { active: None }) });
}}

/// A log line through the host; a failure to log is not worth failing a request for.
fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// A configuration accepted by `on_configure`, with the ids of its counters by slot (`None`: the host
/// refused to define that counter; it is then skipped, never confused with another id).
struct Active {
    config: Config,
    counters: Vec<Option<u32>>,
}

/// One per plugin configuration and worker; Envoy makes new ones on every config update.
struct CanaryRoot {
    active: Option<Rc<Active>>,
}

impl Context for CanaryRoot {}

impl RootContext for CanaryRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        match config::parse(&bytes) {
            Ok(config) => {
                let counters = metrics::counter_names(&config)
                    .iter()
                    .map(|name| hostcalls::define_metric(MetricType::Counter, name).ok())
                    .collect();
                log(
                    LogLevel::Info,
                    &format!("config accepted: {}", config.summary()),
                );
                self.active = Some(Rc::new(Active { config, counters }));
                true
            }
            Err(err) => {
                // Returning false makes Envoy refuse this config; under ECDS the last good one keeps serving.
                log(LogLevel::Error, &format!("config rejected: {err}"));
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Never None: the SDK panics on None. Without a config the stream only removes the route header.
        Some(Box::new(CanaryStream {
            active: self.active.clone(),
            set_cookie: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Reads request headers from the host, on demand.
struct HostRequest;

impl Request for HostRequest {
    fn header(&mut self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }
}

struct CanaryStream {
    active: Option<Rc<Active>>,
    /// A `set-cookie` value to add to the response (an assigned sticky key).
    set_cookie: Option<String>,
}

impl Context for CanaryStream {}

impl HttpContext for CanaryStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(active) = &self.active else {
            remove_request_header(config::DEFAULT_ROUTE_HEADER);
            return Action::Continue;
        };
        let config = &active.config;
        let decision = decide(config, &mut HostRequest, &mut next_random);
        match &decision {
            None => remove_request_header(&config.route_header),
            Some(d) => {
                if let Some(ov) = config
                    .rollouts
                    .get(d.rollout)
                    .and_then(|r| r.override_.as_ref())
                {
                    if d.remove_override_header {
                        remove_request_header(&ov.header);
                    }
                    if let (true, Some((token_header, _))) = (d.remove_token_header, &ov.token) {
                        remove_request_header(token_header);
                    }
                }
                // Replaces every client-sent value. At proxy-wasm ABI 0.2.1 (this SDK) Envoy clears the
                // route cache on a request header change, so the route is matched again with this value;
                // the real-Envoy tests prove it.
                let _ = hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    &config.route_header,
                    Some(d.version_name(config)),
                );
                self.set_cookie = d.set_cookie(config);
            }
        }
        if let Some(&Some(id)) = active
            .counters
            .get(metrics::counter_slot(config, decision.as_ref()))
        {
            let _ = hostcalls::increment_metric(id, 1);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(cookie) = self.set_cookie.take() {
            let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, "set-cookie", &cookie);
        }
        Action::Continue
    }
}

fn remove_request_header(name: &str) {
    let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
}

thread_local! {
    /// splitmix64 state, seeded once per VM from the host's random source.
    static RANDOM_STATE: Cell<u64> = const { Cell::new(0) };
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    /// WASI `random_get`, which Envoy provides to every wasm VM. Returns 0 on success.
    fn random_get(buf: *mut u8, len: usize) -> i32;
}

fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: the host writes exactly `bytes.len()` bytes into a buffer we own for the call's duration.
    let ok = unsafe { random_get(bytes.as_mut_ptr(), bytes.len()) } == 0;
    let from_host = if ok { u64::from_le_bytes(bytes) } else { 0 };
    let now = hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    from_host ^ now ^ 0x9e37_79b9_7f4a_7c15
}

/// The next pseudo-random number (splitmix64): for keys of users who have none.
fn next_random() -> u64 {
    RANDOM_STATE.with(|state| {
        let mut s = state.get();
        if s == 0 {
            s = seed();
        }
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}
