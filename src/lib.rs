//! Telltale: a live hardware-status dashboard.
//!
//! One codebase, two builds:
//! - [`model`]: the domain types (device, status, events), shared by both.
//! - [`app`]: the Leptos UI. The server renders it with the current values;
//!   the browser hydrates it and keeps it live from the SSE stream.
//! - `server` (feature `ssr`): the axum server. Its `hub` owns all live state
//!   and event ids; `api` takes device reports in and serves reads; `sse`
//!   streams changes; `simulator` is the built-in device source; `assets`
//!   serves the WASM/JS/CSS embedded in the binary.
//!
//! Data flows one way: source → ingest → hub → (SSE | first render).

pub mod app;
pub mod model;
#[cfg(feature = "ssr")]
pub mod server;

/// The browser's entry point: hydrate the server-rendered page.
#[cfg(feature = "hydrate")]
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(app::App);
}
