//! The site's static files (WASM, JS, CSS, favicon), embedded in the binary.
//!
//! cargo-leptos writes them to `target/site`. A release build embeds that
//! folder, including the `.br`/`.gz` files cargo-leptos precompresses, so
//! the binary runs on its own from any directory; a debug build reads the
//! folder from disk on each request, so `cargo leptos watch` serves fresh files.

use super::error::ApiError;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rust_embed::RustEmbed;

#[derive(RustEmbed)]
#[folder = "target/site"]
#[allow_missing = true]
struct Site;

/// Serves a file of the site; anything else is a 404: a JSON error under
/// `/api/`, else the app's own "not found" page, rendered by `page`.
pub async fn serve<F: Future<Output = Response>>(
    request: Request,
    page: impl FnOnce(Request) -> F,
) -> Response {
    let path = request.uri().path().trim_start_matches('/');
    let Some(file) = Site::get(path) else {
        if path == "api" || path.starts_with("api/") {
            let endpoint = format!("{} /{path}", request.method());
            return ApiError::NoEndpoint(endpoint).into_response();
        }
        return page(request).await;
    };
    let headers = request.headers();
    let etag = format!("\"{}\"", hex(&file.metadata.sha256_hash()));
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    let accepts = |encoding: &str| {
        headers
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with(encoding)))
    };
    let precompressed = [("br", ".br"), ("gzip", ".gz")]
        .into_iter()
        .filter(|(encoding, _)| accepts(encoding))
        .find_map(|(encoding, ext)| Site::get(&format!("{path}{ext}")).map(|f| (encoding, f)));
    let mime = file.metadata.mimetype().to_owned();
    let (encoding, body) = match precompressed {
        Some((encoding, f)) => (Some(encoding), f.data),
        None => (None, file.data),
    };
    let mut response = body.into_owned().into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&mime) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Some(encoding) = encoding {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(encoding));
        h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    // File names carry no hash: revalidate every time, cheaply, by ETag.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    response
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
