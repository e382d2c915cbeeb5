//! The sign-in page: what a page address shows, instead of the page, when
//! reading takes a viewer token (`--viewer-token`) and the browser has no
//! session yet. A plain form, working without JavaScript: it posts the
//! token to `POST /api/session`, which answers with a session cookie and a
//! redirect back to the page that was asked for.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use html_escape::encode_double_quoted_attribute as attr;

/// The sign-in page, with `status`, returning to `next` once signed in,
/// and saying `error` if there is one.
pub fn page(status: StatusCode, next: &str, error: Option<&str>) -> Response {
    let next = safe_next(next);
    let error = error
        .map(|e| {
            format!(
                r#"<p class="session-error" role="alert" data-testid="session-error">{}</p>"#,
                html_escape::encode_text(e)
            )
        })
        .unwrap_or_default();
    let html = format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in · Telltale</title>
<link rel="stylesheet" href="/pkg/telltale.css">
</head>
<body>
<header class="top"><h1>Telltale</h1></header>
<main class="session sign-in-page">
<form method="post" action="/api/session" data-testid="viewer-sign-in">
<p>This dashboard needs a token to be read.</p>
<label><span>Token</span>
<input type="password" name="token" autocomplete="current-password" required autofocus data-testid="viewer-token">
</label>
<input type="hidden" name="next" value="{next}">
<button type="submit">Sign in</button>
{error}
</form>
</main>
</body>
</html>
"#,
        next = attr(next),
    );
    let mut response = (status, Html(html)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Where to go once signed in: `next` when it is a path of this site,
/// else the dashboard. (`//host/…` and `/\host` would leave it.)
pub fn safe_next(next: &str) -> &str {
    let local = next.starts_with('/') && !next.starts_with("//") && !next.starts_with("/\\");
    // A `Location` header holds visible ASCII only (the page's own `next`
    // is always so); anything else, hand-made, goes home.
    let printable = next.bytes().all(|b| b.is_ascii_graphic());
    if local && printable { next } else { "/" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_of_this_site_are_returned_to() {
        assert_eq!(
            safe_next("/devices/rack-1?range=24h"),
            "/devices/rack-1?range=24h"
        );
        for elsewhere in [
            "//evil.example/",
            "/\\evil.example",
            "https://evil.example/",
            "",
            "/caf\u{e9}",
            "/a b",
            "/a\tb",
            "/\r\nSet-Cookie: x=y",
        ] {
            assert_eq!(safe_next(elsewhere), "/", "{elsewhere}");
        }
    }

    #[tokio::test]
    async fn the_page_escapes_what_it_repeats() {
        let response = page(
            StatusCode::UNAUTHORIZED,
            "/?q=\"><script>",
            Some("<b>wrong</b>"),
        );
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            body.contains(r#"value="/?q=&quot;&gt;&lt;script&gt;""#),
            "{body}"
        );
        assert!(body.contains("&lt;b&gt;wrong&lt;/b&gt;"), "{body}");
        assert!(!body.contains("<script>"));
    }
}
