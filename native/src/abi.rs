//! Our bindings to the Envoy 1.40 dynamic-module ABI (version "v0.2.0"), written from Envoy's `abi.h`:
//! the types, the few Envoy callbacks the filter uses, and a safe wrapper over them. Envoy exports the
//! callbacks from its own binary; they resolve when Envoy loads the module.
//!
//! Everything Envoy hands out (header values) is a borrowed view, valid only during the hook that received
//! it: the wrapper ties those views to a borrow of [`Stream`], which lives only for one hook call.

use std::ffi::c_void;

/// The ABI version this module is built against. Envoy 1.40 compares it with its own and warns on a
/// mismatch (it does not refuse), so the integration tests check the module loads without that warning.
pub const ABI_VERSION: &[u8] = b"v0.2.0\0";

/// A view of memory owned by Envoy.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    pub ptr: *const u8,
    pub length: usize,
}

/// A view of memory owned by the module, for the duration of one call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    pub ptr: *const u8,
    pub length: usize,
}

impl ModuleBuffer {
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            ptr: bytes.as_ptr(),
            length: bytes.len(),
        }
    }

    pub const NULL: Self = Self {
        ptr: std::ptr::null(),
        length: 0,
    };
}

impl EnvoyBuffer {
    /// # Safety
    /// `self` must come from Envoy during the current hook and `'a` must not outlive that hook.
    pub unsafe fn as_slice<'a>(&self) -> Option<&'a [u8]> {
        if self.ptr.is_null() {
            return None;
        }
        // SAFETY: Envoy guarantees `length` readable bytes at `ptr` for the duration of the hook.
        Some(unsafe { std::slice::from_raw_parts(self.ptr, self.length) })
    }
}

/// `envoy_dynamic_module_type_http_header_type`.
pub const REQUEST_HEADER: u32 = 0;
pub const RESPONSE_HEADER: u32 = 2;
/// `..._status_Continue` of every hook that returns a status.
pub const CONTINUE: u32 = 0;
/// `envoy_dynamic_module_type_metrics_result_Success`.
pub const METRICS_SUCCESS: u32 = 0;

/// Envoy's pointer to its filter config object (argument of config hooks).
pub type ConfigEnvoyPtr = *mut c_void;
/// Envoy's pointer to its per-stream filter object (argument of stream hooks).
pub type FilterEnvoyPtr = *mut c_void;

// Only in the shared library: test binaries have no Envoy to resolve these against.
extern "C" {
    pub fn envoy_dynamic_module_callback_http_get_header(
        filter: FilterEnvoyPtr,
        header_type: u32,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter: FilterEnvoyPtr,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_add_header(
        filter: FilterEnvoyPtr,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_clear_route_cache(filter: FilterEnvoyPtr);
    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        counter_id: *mut usize,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
}

/// Logs one line through Envoy's `dynamic_modules` logger, at `level` (`envoy_dynamic_module_type_log_level`:
/// trace 0 to critical 5, as `canary_router::logging::host_level` numbers them).
pub fn log(level: u32, message: &str) {
    // SAFETY: the buffer is valid for the call; Envoy copies what it keeps.
    unsafe { envoy_dynamic_module_callback_log(level, ModuleBuffer::of(message.as_bytes())) }
}

/// Defines a counter on a filter config; `None` if Envoy refuses (the filter then does not count).
pub fn define_counter(config: ConfigEnvoyPtr, name: &str) -> Option<usize> {
    let mut id = 0usize;
    // SAFETY: `config` is the pointer Envoy passed to the config hook that is running; the name buffer
    // and the out-pointer are valid for the call.
    let result = unsafe {
        envoy_dynamic_module_callback_http_filter_config_define_counter(
            config,
            ModuleBuffer::of(name.as_bytes()),
            std::ptr::null(),
            0,
            &mut id,
        )
    };
    (result == METRICS_SUCCESS).then_some(id)
}

/// The Envoy side of one stream, during one hook.
pub struct Stream {
    envoy: FilterEnvoyPtr,
    /// The route header changed, so Envoy's cached route must be dropped.
    route_changed: bool,
}

impl Stream {
    /// # Safety
    /// `envoy` must be the filter pointer Envoy passed to the hook that is running, and the `Stream` must
    /// not outlive that hook.
    pub unsafe fn new(envoy: FilterEnvoyPtr) -> Self {
        Self {
            envoy,
            route_changed: false,
        }
    }

    /// The first value of a header and how many values it has.
    pub fn get(&self, header_type: u32, name: &str) -> (Option<&[u8]>, usize) {
        let mut value = EnvoyBuffer {
            ptr: std::ptr::null(),
            length: 0,
        };
        let mut count = 0usize;
        // SAFETY: `self.envoy` is valid during this hook (see `new`); the key buffer and out-pointers are
        // valid for the call.
        let found = unsafe {
            envoy_dynamic_module_callback_http_get_header(
                self.envoy,
                header_type,
                ModuleBuffer::of(name.as_bytes()),
                &mut value,
                0,
                &mut count,
            )
        };
        if !found {
            return (None, 0);
        }
        // SAFETY: a view Envoy returned in this hook, tied to the borrow of `self`.
        (unsafe { value.as_slice() }, count)
    }

    /// Sets `name` to `value` (replacing every value), or removes it with `None`.
    pub fn set(&mut self, header_type: u32, name: &str, value: Option<&[u8]>) {
        let value = value.map_or(ModuleBuffer::NULL, ModuleBuffer::of);
        // SAFETY: as in `get`.
        let _ = unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.envoy,
                header_type,
                ModuleBuffer::of(name.as_bytes()),
                value,
            )
        };
    }

    /// Adds a value to `name`, keeping the others (for `set-cookie`).
    pub fn add(&mut self, header_type: u32, name: &str, value: &[u8]) {
        // SAFETY: as in `get`.
        let _ = unsafe {
            envoy_dynamic_module_callback_http_add_header(
                self.envoy,
                header_type,
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::of(value),
            )
        };
    }

    /// Marks the route as stale: the route header was changed.
    pub fn route_changed(&mut self) {
        self.route_changed = true;
    }

    /// Drops Envoy's cached route if the route header changed, so the router matches it again.
    pub fn finish(&mut self) {
        if self.route_changed {
            // SAFETY: as in `get`.
            unsafe { envoy_dynamic_module_callback_http_clear_route_cache(self.envoy) };
            self.route_changed = false;
        }
    }

    pub fn increment_counter(&mut self, id: usize) {
        // SAFETY: as in `get`; the id was defined on this stream's filter config.
        let _ = unsafe {
            envoy_dynamic_module_callback_http_filter_increment_counter(
                self.envoy,
                id,
                std::ptr::null(),
                0,
                1,
            )
        };
    }
}
