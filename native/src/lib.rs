//! canary-router as a native Envoy dynamic module (`libcanary_router_native.so`, Envoy 1.40 only).
//!
//! The same decision core and configuration contract as the `.wasm` (`canary_router::route`), with no
//! sandbox around it: this code runs inside Envoy's process. So nothing here may unwind into Envoy or
//! abort it. Every hook runs behind [`guard`] (`catch_unwind`, built with `panic = "unwind"` in the
//! `native` profile); a caught panic is logged through Envoy's logger, not printed by the default hook,
//! and its request falls back to the stable route. The workspace lints deny `unwrap`/`expect`/`panic!`
//! and indexing, as for the wasm build, so the guard is a backstop, not a plan.
//!
//! The hooks are `#[no_mangle] extern "C"` functions, exported from the shared library for Envoy to resolve
//! (not Rust API: nothing else may call them). Envoy 1.40 resolves every hook below when it loads the module, including the callout, stream,
//! scheduler and watermark ones this filter never uses: they are present and do nothing.

// `catch_unwind` in every hook is what keeps a bug from aborting Envoy, and `panic = "abort"` makes it
// dead code: refuse to build that way (use the `native` profile: `make native`).
#[cfg(panic = "abort")]
compile_error!(
    "canary-router-native must be built with panic = \"unwind\": with \"abort\", a panic in the module \
     takes Envoy down instead of sending one request to stable. Build it with `make native` \
     (cargo build --profile native -p canary-router-native), not --release."
);

mod abi;

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::ffi::{c_char, c_void};
use std::hash::{BuildHasher, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use abi::{ConfigEnvoyPtr, EnvoyBuffer, FilterEnvoyPtr, Stream, CONTINUE};
use canary_router::config::{self, Config};
use canary_router::decision::Request;
use canary_router::metrics;
use canary_router::route::{route, route_unconfigured, RequestHeaders};

/// A configuration Envoy accepted, shared by every stream created from it.
struct Loaded {
    config: Config,
    /// Counter ids by slot of `metrics::counter_names` (`None`: Envoy refused to define it).
    counters: Vec<Option<usize>>,
}

/// One stream's state between its request and response hooks.
struct Filter {
    loaded: Arc<Loaded>,
    /// `set-cookie` value for the response (with `assign_cookie`).
    cookie: Option<String>,
}

/// The `log` facade's logger for this module: each line to Envoy's `dynamic_modules` logger.
static LOGGER: canary_router::logging::HostLogger =
    canary_router::logging::HostLogger { write: abi::log };

/// Runs a hook body; a panic is caught, logged, and answered with `fallback`.
fn guard<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// The request's headers as our decision core reads and writes them.
struct NativeRequest<'s>(&'s mut Stream);

impl Request for NativeRequest<'_> {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        self.0.get(abi::REQUEST_HEADER, name).0
    }
}

impl RequestHeaders for NativeRequest<'_> {
    fn remove(&mut self, name: &str) {
        if self.0.get(abi::REQUEST_HEADER, name).1 > 0 {
            self.0.set(abi::REQUEST_HEADER, name, None);
            self.0.route_changed();
        }
    }

    fn replace(&mut self, name: &str, value: &[u8]) {
        // Always written, with no lookup first: clients do not normally send the route header, so
        // checking for one that already has this value would cost every request to save a rare re-match.
        self.0.set(abi::REQUEST_HEADER, name, Some(value));
        self.0.route_changed();
    }
}

thread_local! {
    /// splitmix64 state for users without a key (0: not seeded yet). One per worker thread.
    static RANDOM: Cell<u64> = const { Cell::new(0) };
}

/// The next pseudo-random number, seeded per thread from the OS (through std's randomly keyed hasher).
fn next_random() -> u64 {
    RANDOM.with(|state| {
        let mut s = state.get();
        if s == 0 {
            s = RandomState::new().build_hasher().finish() | 1;
        }
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

// ------------------------------------------------------------------------------------------------------
// The hooks this filter uses.
// ------------------------------------------------------------------------------------------------------

/// Called once when Envoy loads the module: returns the ABI version it was built against.
#[no_mangle]
extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    guard((), || {
        canary_router::logging::install(&LOGGER);
        // A panic caught by `guard` must not print through the default hook (stderr, no context).
        std::panic::set_hook(Box::new(|info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(no message)");
            let place = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            log::error!(
                "canary-router: internal error, request sent to stable: {message} ({place})"
            );
        }));
    });
    abi::ABI_VERSION.as_ptr().cast()
}

/// A new filter configuration: validated by the same code as the `.wasm`. Null refuses it, and Envoy
/// keeps the last good one (ECDS) or fails to start (inline).
#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: ConfigEnvoyPtr,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    guard(std::ptr::null(), || {
        // SAFETY: both views come from Envoy for the duration of this hook and are not kept.
        let (name, json) = unsafe { (name.as_slice(), config.as_slice()) };
        let name = String::from_utf8_lossy(name.unwrap_or(b"canary-router"));
        match config::parse(json.unwrap_or(b"")) {
            Ok(config) => {
                let counters = metrics::counter_names(&config)
                    .iter()
                    .map(|counter| abi::define_counter(config_envoy, counter))
                    .collect();
                log::info!("{name}: config accepted: {}", config.summary());
                Arc::into_raw(Arc::new(Loaded { config, counters })).cast()
            }
            Err(err) => {
                log::error!("{name}: config rejected: {err}");
                std::ptr::null()
            }
        }
    })
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    guard((), || {
        if !config.is_null() {
            // SAFETY: made by `Arc::into_raw` in config_new; Envoy destroys each config once, after
            // every filter created from it.
            drop(unsafe { Arc::from_raw(config.cast::<Loaded>()) });
        }
    })
}

/// A new stream: it holds its config until it ends, even if a new config arrives meanwhile.
#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const c_void,
    _filter_envoy: FilterEnvoyPtr,
) -> *mut c_void {
    guard(std::ptr::null_mut(), || {
        if config.is_null() {
            return std::ptr::null_mut();
        }
        let config = config.cast::<Loaded>();
        // SAFETY: a live pointer from `Arc::into_raw` (config_destroy has not run: this config is in use);
        // one more strong count for the stream, released in filter_destroy.
        let loaded = unsafe {
            Arc::increment_strong_count(config);
            Arc::from_raw(config)
        };
        Box::into_raw(Box::new(Filter {
            loaded,
            cookie: None,
        }))
        .cast()
    })
}

/// The decision: route header written, cached route dropped if it changed, one count.
#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy: FilterEnvoyPtr,
    filter: *mut c_void,
    _end_of_stream: bool,
) -> u32 {
    let decided = guard(false, || {
        // SAFETY: from `Box::into_raw` in filter_new, used only by this stream's hooks, one at a time.
        let Some(filter) = (unsafe { filter.cast::<Filter>().as_mut() }) else {
            return false;
        };
        // SAFETY: Envoy's pointer for this hook; `stream` does not outlive it.
        let mut stream = unsafe { Stream::new(filter_envoy) };
        #[cfg(canary_router_native_panic_test)]
        if stream.get(abi::REQUEST_HEADER, "x-canary-router-panic").1 > 0 {
            #[allow(clippy::panic)]
            {
                panic!("deliberate panic (test build)");
            }
        }
        let config = &filter.loaded.config;
        let routed = route(config, &mut NativeRequest(&mut stream), &mut next_random);
        stream.finish();
        if let Some(&Some(id)) = filter.loaded.counters.get(routed.counter_slot) {
            stream.increment_counter(id);
        }
        filter.cookie = routed.set_cookie;
        true
    });
    if !decided {
        // No decision (a caught panic): the client may not pick the version, so stable serves it, with
        // the stream's own route, override and token headers removed too.
        guard((), || {
            // SAFETY: as above.
            let config = unsafe { filter.cast::<Filter>().as_ref() }.map(|f| &f.loaded.config);
            // SAFETY: as above.
            let mut stream = unsafe { Stream::new(filter_envoy) };
            route_unconfigured(&mut NativeRequest(&mut stream), config);
            stream.finish();
        });
    }
    CONTINUE
}

/// With `assign_cookie`: the drawn key goes back to the user as a cookie.
#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter_envoy: FilterEnvoyPtr,
    filter: *mut c_void,
    _end_of_stream: bool,
) -> u32 {
    guard(CONTINUE, || {
        // SAFETY: as in request_headers.
        let Some(filter) = (unsafe { filter.cast::<Filter>().as_mut() }) else {
            return CONTINUE;
        };
        if let Some(cookie) = filter.cookie.take() {
            // SAFETY: as in request_headers.
            let mut stream = unsafe { Stream::new(filter_envoy) };
            stream.add(abi::RESPONSE_HEADER, "set-cookie", cookie.as_bytes());
        }
        CONTINUE
    })
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter: *mut c_void) {
    guard((), || {
        if !filter.is_null() {
            // SAFETY: from `Box::into_raw` in filter_new; Envoy destroys each filter once.
            drop(unsafe { Box::from_raw(filter.cast::<Filter>()) });
        }
    })
}

// ------------------------------------------------------------------------------------------------------
// Hooks Envoy 1.40 requires but this filter has no use for: no body, trailers, callouts, streams,
// schedulers or per-route configs. They do nothing and let everything continue.
// ------------------------------------------------------------------------------------------------------

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _: FilterEnvoyPtr,
    _: *mut c_void,
    _: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _: FilterEnvoyPtr,
    _: *mut c_void,
) -> u32 {
    CONTINUE
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _: FilterEnvoyPtr,
    _: *mut c_void,
    _: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _: FilterEnvoyPtr,
    _: *mut c_void,
) -> u32 {
    CONTINUE
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _: FilterEnvoyPtr,
    _: *mut c_void,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _: FilterEnvoyPtr,
    _: *mut c_void,
    _response_code: u32,
    _details: EnvoyBuffer,
    _reset_imminent: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _: FilterEnvoyPtr,
    _: *mut c_void,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _: FilterEnvoyPtr,
    _: *mut c_void,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _: FilterEnvoyPtr,
    _: *mut c_void,
    _event_id: u64,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _: ConfigEnvoyPtr,
    _: *const c_void,
    _event_id: u64,
) {
}

/// Per-route configuration is not part of the contract: refused (null).
#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: EnvoyBuffer,
    _config: EnvoyBuffer,
) -> *const c_void {
    log::error!(
        "canary-router: per-route configuration is not supported; configure the filter itself"
    );
    std::ptr::null()
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(_: *const c_void) {}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _: FilterEnvoyPtr,
    _: *mut c_void,
    _callout_id: u64,
    _result: u32,
    _headers: *const c_void,
    _headers_size: usize,
    _body: *const EnvoyBuffer,
    _body_size: usize,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _: FilterEnvoyPtr,
    _: *mut c_void,
    _stream: u64,
    _headers: *const c_void,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _: FilterEnvoyPtr,
    _: *mut c_void,
    _stream: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _: FilterEnvoyPtr,
    _: *mut c_void,
    _stream: u64,
    _trailers: *const c_void,
    _trailers_size: usize,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _: FilterEnvoyPtr,
    _: *mut c_void,
    _stream: u64,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _: FilterEnvoyPtr,
    _: *mut c_void,
    _stream: u64,
    _reason: u32,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _: ConfigEnvoyPtr,
    _: *const c_void,
    _callout_id: u64,
    _result: u32,
    _headers: *const c_void,
    _headers_size: usize,
    _body: *const EnvoyBuffer,
    _body_size: usize,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_headers(
    _: ConfigEnvoyPtr,
    _: *const c_void,
    _stream: u64,
    _headers: *const c_void,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_data(
    _: ConfigEnvoyPtr,
    _: *const c_void,
    _stream: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_trailers(
    _: ConfigEnvoyPtr,
    _: *const c_void,
    _stream: u64,
    _trailers: *const c_void,
    _trailers_size: usize,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_complete(
    _: ConfigEnvoyPtr,
    _: *const c_void,
    _stream: u64,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_reset(
    _: ConfigEnvoyPtr,
    _: *const c_void,
    _stream: u64,
    _reason: u32,
) {
}
