# Packages the filter as an OCI image for Istio's WasmPlugin and Envoy Gateway's image-based Wasm code source:
# a single layer holding plugin.wasm (the "compat" layout both read).
#
#   make wasm
#   docker build -t registry.example.com/canary-router:0.1.0 .
#   docker push registry.example.com/canary-router:0.1.0
FROM scratch
COPY target/wasm32-wasip1/release/canary_router.wasm ./plugin.wasm
