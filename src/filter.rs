//! The proxy-wasm glue, written against the host ABI (0.2.1) directly: read headers in, write the decision
//! out. No routing logic lives here.
//!
//! Why not the proxy-wasm SDK: Envoy calls every callback a module exports, for every request, and the
//! SDK exports all of them and dispatches each through boxed contexts; that alone cost more than the whole
//! decision (see BENCHMARKS.md). This module exports only what the filter uses: memory allocation, VM
//! start, configure, context create and delete (to map a stream to its plugin config and forget both when
//! the host does), request headers and response headers (for the assigned cookie). Nothing here unwraps or
//! panics; a host error reads as "absent".
//!
//! Lifecycle: every root context (one per plugin config) and every stream context is tracked from its
//! `proxy_on_context_create` (roots: `proxy_on_configure`) to its `proxy_on_delete`. A stream is decided by
//! its own root's config only. A stream whose root this VM does not know (its config was refused, or the
//! host broke the lifecycle) goes to stable with no client-chosen header left, and is counted in
//! `canary_router_unconfigured`: never decided by another plugin's config.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::config::{self, Config};
use crate::decision::Request;
use crate::metrics;
use crate::route::{route, route_unconfigured, RequestHeaders};
use crate::streams::{Pending, Streams};

/// The host functions used (proxy-wasm ABI 0.2.1, module "env").
mod host {
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
        pub fn proxy_get_buffer_bytes(
            buffer_type: u32,
            start: usize,
            max_size: usize,
            return_data: *mut *mut u8,
            return_size: *mut usize,
        ) -> u32;
        pub fn proxy_get_header_map_pairs(
            map_type: u32,
            return_data: *mut *mut u8,
            return_size: *mut usize,
        ) -> u32;
        pub fn proxy_replace_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_remove_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
        ) -> u32;
        pub fn proxy_add_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_define_metric(
            metric_type: u32,
            name_data: *const u8,
            name_size: usize,
            return_id: *mut u32,
        ) -> u32;
        pub fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    }

    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    extern "C" {
        /// WASI `random_get`, which Envoy provides to every wasm VM. Returns 0 on success.
        pub fn random_get(buf: *mut u8, len: usize) -> i32;
    }
}

const STATUS_OK: u32 = 0;
const ACTION_CONTINUE: u32 = 0;
const REQUEST_HEADERS: u32 = 0;
const RESPONSE_HEADERS: u32 = 2;
const PLUGIN_CONFIGURATION: u32 = 7;
const COUNTER: u32 = 0;
/// Counts the requests decided with no configuration (an unknown root): they went to stable.
const UNCONFIGURED_COUNTER: &str = "canary_router_unconfigured";

/// Take ownership of a buffer the host allocated through `proxy_on_memory_allocate`.
fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        return Vec::new();
    }
    // SAFETY: the host got `data` from `proxy_on_memory_allocate(size)`, a Vec<u8> of capacity `size`
    // we leaked, and filled `size` bytes of it; it is handed to us once.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

/// One log line to the host's `proxy_log`.
fn proxy_log(level: u32, message: &str) {
    // SAFETY: a pointer and length of a live string; the host only reads it.
    let _ = unsafe { host::proxy_log(level, message.as_ptr(), message.len()) };
}

/// The `log` facade's logger for this VM.
static LOGGER: crate::logging::HostLogger = crate::logging::HostLogger { write: proxy_log };

/// Installs the logger once per VM (later calls change nothing).
fn install_logger() {
    crate::logging::install(&LOGGER);
}

/// A buffer the host returns through out-pointers, allocated with `proxy_on_memory_allocate`; empty when
/// the host call fails.
fn returned_buffer(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Vec<u8> {
    let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
    if call(&mut data, &mut size) == STATUS_OK {
        owned(data, size)
    } else {
        Vec::new()
    }
}

fn plugin_configuration() -> Vec<u8> {
    // SAFETY: the out-pointers point to live locals of `returned_buffer`.
    returned_buffer(|data, size| unsafe {
        host::proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, usize::MAX, data, size)
    })
}

/// `proxy_replace_header_map_value` or `proxy_add_header_map_value`.
type HeaderWrite = unsafe extern "C" fn(u32, *const u8, usize, *const u8, usize) -> u32;

fn write_header(write: HeaderWrite, map: u32, name: &str, value: &[u8]) {
    // SAFETY: pointers and lengths of live buffers; the host copies them.
    let _ = unsafe { write(map, name.as_ptr(), name.len(), value.as_ptr(), value.len()) };
}

fn replace_header(map: u32, name: &str, value: &[u8]) {
    write_header(host::proxy_replace_header_map_value, map, name, value);
}

fn add_header(map: u32, name: &str, value: &[u8]) {
    write_header(host::proxy_add_header_map_value, map, name, value);
}

fn remove_header(map: u32, name: &str) {
    // SAFETY: as in `write_header`.
    let _ = unsafe { host::proxy_remove_header_map_value(map, name.as_ptr(), name.len()) };
}

fn define_counter(name: &str) -> Option<u32> {
    let mut id = 0u32;
    // SAFETY: as in `write_header`, and an out-pointer to a local.
    let status = unsafe { host::proxy_define_metric(COUNTER, name.as_ptr(), name.len(), &mut id) };
    (status == STATUS_OK).then_some(id)
}

/// A configuration accepted by `on_configure`, with the ids of its counters by slot.
struct Active {
    config: Config,
    counters: Vec<Option<u32>>,
}

/// Everything the VM keeps between calls (one VM per worker thread, so no locking).
#[derive(Default)]
struct State {
    /// Plugin configs by root context id: every live root, until the host deletes it.
    roots: BTreeMap<u32, Rc<Active>>,
    /// Each new stream's root, until its request headers.
    pending: Pending,
    /// `set-cookie` values waiting for their stream's response headers (or its delete).
    cookies: Streams<String>,
    /// The id of `canary_router_unconfigured` (defined the first time it is needed).
    unconfigured: Option<u32>,
    /// splitmix64 state (0: not seeded yet).
    random: u64,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

extern "C" {
    fn __wasm_call_ctors();
}

/// WASI reactor initialisation: run static constructors once, before anything else.
#[no_mangle]
pub extern "C" fn _initialize() {
    // SAFETY: called once by the host when the module is instantiated, as the WASI reactor ABI requires.
    unsafe { __wasm_call_ctors() }
}

/// The ABI this module speaks. At 0.2.1 Envoy clears the route cache when a filter changes a request
/// header, so the route is matched again with the route header we set (newer ABIs do not).
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// The host allocates here the buffers it returns (header values, the plugin configuration).
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut buffer: Vec<u8> = Vec::with_capacity(size);
    let data = buffer.as_mut_ptr();
    std::mem::forget(buffer);
    data
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root_context_id: u32, _vm_configuration_size: usize) -> bool {
    install_logger();
    true
}

/// A plugin config for a root context: validated, or refused (Envoy then keeps the last good one).
#[no_mangle]
pub extern "C" fn proxy_on_configure(
    root_context_id: u32,
    _plugin_configuration_size: usize,
) -> bool {
    install_logger();
    match config::parse(&plugin_configuration()) {
        Ok(config) => {
            let counters: Vec<Option<u32>> = metrics::counter_names(&config)
                .iter()
                .map(|name| define_counter(name))
                .collect();
            log::info!("config accepted: {}", config.summary());
            let active = Rc::new(Active { config, counters });
            STATE.with(|state| state.borrow_mut().roots.insert(root_context_id, active));
            true
        }
        Err(err) => {
            log::error!("config rejected: {err}");
            false
        }
    }
}

/// A new context: a root (root id 0; it is known once configured) or a stream of the plugin config of
/// `root_context_id`.
#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, root_context_id: u32) {
    if root_context_id == 0 {
        return;
    }
    STATE.with(|state| {
        state
            .borrow_mut()
            .pending
            .insert(context_id, root_context_id)
    });
}

/// The host is done with a context: a stream (forget it) or a root (forget its config).
#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        // Context ids are unique across roots and streams: at most one of these holds it.
        state.pending.take(context_id);
        state.cookies.remove(context_id);
        state.roots.remove(&context_id);
    });
}

/// Reads request headers from the host: all of them in one call, the first time one is asked for.
#[derive(Default)]
struct HostRequest {
    pairs: Option<Vec<u8>>,
}

impl Request for HostRequest {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        let pairs = self.pairs.get_or_insert_with(|| {
            // SAFETY: the out-pointers point to live locals of `returned_buffer`.
            returned_buffer(|data, size| unsafe {
                host::proxy_get_header_map_pairs(REQUEST_HEADERS, data, size)
            })
        });
        find_pair(pairs, name.as_bytes())
    }
}

impl RequestHeaders for HostRequest {
    fn remove(&mut self, name: &str) {
        // At ABI 0.2.1 every removal drops Envoy's cached route, even of a header the request does not
        // carry; so only a header that is there is removed. The lookup uses the headers the decision read
        // (read here only when nothing was decided: no config yet).
        if self.header(name).is_some() {
            remove_header(REQUEST_HEADERS, name);
        }
    }

    fn replace(&mut self, name: &str, value: &[u8]) {
        // One call replaces every client-sent value, and makes Envoy match the route again.
        replace_header(REQUEST_HEADERS, name, value);
    }
}

/// The first value of `name` in a serialized header map: a u32 count, then (key size, value size) u32
/// pairs, then each key and value followed by a NUL (proxy-wasm ABI). Malformed input reads as absent.
fn find_pair<'p>(pairs: &'p [u8], name: &[u8]) -> Option<&'p [u8]> {
    let u32_at = |at: usize| -> Option<usize> {
        let bytes: [u8; 4] = pairs.get(at..at + 4)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(bytes)).ok()
    };
    let count = u32_at(0)?;
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    for i in 0..count {
        let key_len = u32_at(4 + i * 8)?;
        let value_len = u32_at(8 + i * 8)?;
        let key = pairs.get(data..data.checked_add(key_len)?)?;
        let value_at = data.checked_add(key_len)?.checked_add(1)?;
        let value = pairs.get(value_at..value_at.checked_add(value_len)?)?;
        if key == name {
            return Some(value);
        }
        data = value_at.checked_add(value_len)?.checked_add(1)?;
    }
    None
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(
    context_id: u32,
    _num_headers: usize,
    _end_of_stream: bool,
) -> u32 {
    let active = STATE.with(|state| {
        let mut state = state.borrow_mut();
        let root = state.pending.take(context_id)?;
        state.roots.get(&root).cloned()
    });
    let Some(active) = active else {
        unconfigured();
        return ACTION_CONTINUE;
    };
    let config = &active.config;
    let routed = route(config, &mut HostRequest::default(), &mut next_random);
    if let Some(cookie) = routed.set_cookie {
        STATE.with(|state| state.borrow_mut().cookies.insert(context_id, cookie));
    }
    if let Some(&Some(id)) = active.counters.get(routed.counter_slot) {
        // SAFETY: a plain call with numbers.
        let _ = unsafe { host::proxy_increment_metric(id, 1) };
    }
    ACTION_CONTINUE
}

/// A stream with no config of its own: stable, with every header of every config this VM knows that a
/// client could pick a version by removed, and counted.
#[cold]
fn unconfigured() {
    let (known, counter) = STATE.with(|state| {
        let mut state = state.borrow_mut();
        let known: Vec<Rc<Active>> = state.roots.values().cloned().collect();
        if state.unconfigured.is_none() {
            state.unconfigured = define_counter(UNCONFIGURED_COUNTER);
        }
        (known, state.unconfigured)
    });
    route_unconfigured(
        &mut HostRequest::default(),
        known.iter().map(|active| &active.config),
    );
    if let Some(id) = counter {
        // SAFETY: a plain call with numbers.
        let _ = unsafe { host::proxy_increment_metric(id, 1) };
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(
    context_id: u32,
    _num_headers: usize,
    _end_of_stream: bool,
) -> u32 {
    let cookie = STATE.with(|state| state.borrow_mut().cookies.remove(context_id));
    if let Some(cookie) = cookie {
        add_header(RESPONSE_HEADERS, "set-cookie", cookie.as_bytes());
    }
    ACTION_CONTINUE
}

/// The next pseudo-random number (splitmix64), seeded once per VM from the host: for users without a key.
fn next_random() -> u64 {
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        if state.random == 0 {
            let mut bytes = [0u8; 8];
            // SAFETY: the host writes exactly `bytes.len()` bytes into a buffer we own for the call.
            let ok = unsafe { host::random_get(bytes.as_mut_ptr(), bytes.len()) } == 0;
            state.random = if ok { u64::from_le_bytes(bytes) } else { 0 } | 1;
        }
        state.random = state.random.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state.random;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}
