//! Benchmark variant (e): a stock-SDK proxy-wasm filter that only sets `x-version: v1`.
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(SetHeader) });
}}

struct SetHeader;

impl Context for SetHeader {}

impl HttpContext for SetHeader {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.set_http_request_header("x-version", Some("v1"));
        Action::Continue
    }
}
