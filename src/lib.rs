//! Telltale: a live hardware-status dashboard.
//!
//! One codebase, two builds:
//! - [`model`]: the domain types (device, status, events), shared by both.
//! - [`app`]: the Leptos UI. The server renders it with the current values;
//!   the browser hydrates it and keeps it live from the SSE stream.
//! - [`protocol`]: the WebSocket messages of `GET /api/ws`, shared by both.
//! - `server` (feature `ssr`): the axum server. Its `hub` owns all live state
//!   and event ids; `api` takes device reports in and serves reads; `sse`
//!   streams changes; `ws` is the two-way WebSocket (viewers, operators,
//!   device agents); `commands` routes commands to each device's one agent;
//!   `auth` holds the tokens and roles; `simulator` is the built-in device
//!   source (and agent of its devices); `assets` serves the WASM/JS/CSS
//!   embedded in the binary.
//! - `tls` (feature `ssr`): TLS for the connections Telltale makes.
//! - `agent` (feature `ssr`): `telltale agent`, the device agent that reports
//!   the real hardware of the machine it runs on over the WebSocket.
//!
//! Data flows one way: source (ingest, agent) → hub → (SSE | WebSocket |
//! first render); commands flow back: operator → commands → agent.

// The views of the pages are deep types (the hydrate build lays them out).
#![recursion_limit = "256"]

#[cfg(feature = "ssr")]
pub mod agent;
pub mod app;
pub mod model;
pub mod protocol;
#[cfg(feature = "ssr")]
pub mod server;
#[cfg(feature = "ssr")]
pub mod tls;

/// The browser's entry point: hydrate the server-rendered page.
#[cfg(feature = "hydrate")]
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(app::App);
}
