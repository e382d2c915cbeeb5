#![cfg(feature = "ssr")]
//! `--viewer-token` closes reading: the page, the event stream, the API's
//! reads and `/metrics` take the viewer (or operator) token, or a session
//! from the sign-in page. `/healthz` and the site's files stay open.

mod common;

use common::Server;
use reqwest::StatusCode;
use reqwest::redirect::Policy;
use serde_json::json;

const VIEWER: &str = "viewer-secret";

/// A client that shows redirects instead of following them.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

/// The `name=value` of the `Set-Cookie` named `name` in `response`.
fn cookie(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| v.split(';').next().unwrap().to_owned())
}

async fn get(server: &Server, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = client().get(server.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_takes_the_viewer_token_or_a_session() {
    let server = Server::start_with(&["--viewer-token", VIEWER]).await;
    server
        .post_status("rig", &json!({ "name": "Secret rig", "temperature": 20.5 }))
        .await;

    for path in [
        "/api/devices",
        "/api/devices/rig",
        "/api/devices/rig/history?metric=temperature",
        "/api/changes",
        "/api/events",
        "/metrics",
    ] {
        let response = get(&server, path, &[]).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("viewer token"),
            "{path}: {body}"
        );
        let viewer = format!("Bearer {VIEWER}");
        let operator = format!("Bearer {}", server.operator_token);
        for token in [&viewer, &operator] {
            let response = get(&server, path, &[("authorization", token)]).await;
            assert_eq!(response.status(), StatusCode::OK, "{path} with {token}");
        }
        let ingest = format!("Bearer {}", server.token);
        let response = get(&server, path, &[("authorization", &ingest)]).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{path}");
    }
    // Open: what a load balancer asks, the site's files, and ingest.
    assert_eq!(get(&server, "/healthz", &[]).await.status(), StatusCode::OK);
    // (Built or not, the site's files are never behind the sign-in.)
    assert_ne!(
        get(&server, "/pkg/telltale.css", &[]).await.status(),
        StatusCode::UNAUTHORIZED
    );

    // A page without a session: the sign-in page, nothing of the devices.
    let response = get(&server, "/devices/rig?range=24h", &[]).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let page = response.text().await.unwrap();
    assert!(page.contains(r#"action="/api/session""#), "{page}");
    assert!(
        page.contains(r#"name="next" value="/devices/rig?range=24h""#),
        "{page}"
    );
    assert!(
        !page.contains("Secret rig") && !page.contains("20.5"),
        "{page}"
    );

    // A wrong token: the sign-in page again, saying so.
    let sign_in = |token: &str, next: &str| {
        client()
            .post(server.url("/api/session"))
            .form(&[("token", token), ("next", next)])
            .send()
    };
    let wrong = sign_in("nope", "/").await.unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(cookie(&wrong, "telltale_viewer").is_none());
    assert!(wrong.text().await.unwrap().contains("wrong token"));

    // The viewer token: a session, and back to the page asked for.
    let signed = sign_in(VIEWER, "/devices/rig?range=24h").await.unwrap();
    assert_eq!(signed.status(), StatusCode::SEE_OTHER);
    assert_eq!(signed.headers()["location"], "/devices/rig?range=24h");
    let set = signed.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax"),
        "{set}"
    );
    let session = cookie(&signed, "telltale_viewer").unwrap();
    for path in [
        "/",
        "/devices/rig",
        "/api/devices",
        "/api/events",
        "/metrics",
    ] {
        let response = get(&server, path, &[("cookie", &session)]).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        if path == "/" {
            assert!(response.text().await.unwrap().contains("Secret rig"));
        }
    }
    // Reading only: no commands, no removal.
    let refused = client()
        .delete(server.url("/api/devices/rig"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let viewer = format!("Bearer {VIEWER}");
    let kept = get(&server, "/api/devices/rig", &[("authorization", &viewer)]).await;
    assert_eq!(kept.status(), StatusCode::OK);

    // Nowhere but this site.
    let away = sign_in(VIEWER, "//evil.example/").await.unwrap();
    assert_eq!(away.headers()["location"], "/");

    // Signing out ends the session for good, even if the cookie is kept.
    let out = client()
        .delete(server.url("/api/session"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::NO_CONTENT);
    assert!(cookie(&out, "telltale_viewer").is_some_and(|c| c == "telltale_viewer="));
    let response = get(&server, "/api/devices", &[("cookie", &session)]).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // The operator token signs in too, as an operator.
    let operator = sign_in(&server.operator_token, "/").await.unwrap();
    assert_eq!(operator.status(), StatusCode::SEE_OTHER);
    let session = cookie(&operator, "telltale_session").unwrap();
    let response = get(&server, "/api/devices", &[("cookie", &session)]).await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_viewer_tokens_count_as_guesses() {
    let server = Server::start_with(&["--viewer-token", VIEWER]).await;
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let response = get(
            &server,
            "/api/devices",
            &[("authorization", "Bearer guess")],
        )
        .await;
        statuses.push(response.status());
    }
    assert_eq!(statuses[0], StatusCode::UNAUTHORIZED);
    assert_eq!(
        statuses.last(),
        Some(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    // A browser without any token is shown the sign-in page, not made to wait.
    let page = get(&server, "/", &[]).await;
    assert_eq!(page.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_viewer_token_reading_is_open_and_the_form_signs_operators_in() {
    let server = Server::start().await;
    for path in ["/", "/api/devices", "/metrics"] {
        assert_eq!(get(&server, path, &[]).await.status(), StatusCode::OK);
    }
    // The page's own sign-in form, before its script runs.
    let signed = client()
        .post(server.url("/api/session"))
        .form(&[("token", server.operator_token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), StatusCode::SEE_OTHER);
    assert_eq!(signed.headers()["location"], "/");
    assert!(cookie(&signed, "telltale_session").is_some());
    let wrong = client()
        .post(server.url("/api/session"))
        .form(&[("token", VIEWER)])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong.text().await.unwrap().contains("wrong operator token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_session_grants_the_websocket_viewer_role_while_it_lasts() {
    let server = Server::start_with(&["--viewer-token", VIEWER, "--ws-ping", "100ms"]).await;
    server
        .post_status("rig", &json!({ "temperature": 20.5 }))
        .await;
    let signed = client()
        .post(server.url("/api/session"))
        .json(&json!({ "token": VIEWER }))
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), StatusCode::OK);
    let session = cookie(&signed, "telltale_viewer").unwrap();
    let this_site = format!("http://{}", server.addr);
    let hello = |role| json!({"type": "hello", "v": 1, "role": role});

    let mut viewer = server
        .ws_with_headers(&[("cookie", &session), ("origin", &this_site)])
        .await;
    viewer.send(&hello("viewer")).await;
    assert_eq!(viewer.expect("welcome").await["role"], "viewer");
    viewer.send(&json!({"type": "subscribe"})).await;
    let snapshot = viewer.expect("snapshot").await;
    assert_eq!(snapshot["data"]["devices"][0]["id"], "rig", "{snapshot}");

    // Reading only; not from another site's page; not without the cookie.
    let other_site = [
        ("cookie", session.as_str()),
        ("origin", "http://evil.example"),
    ];
    for (role, headers) in [
        ("operator", &[("cookie", session.as_str())][..]),
        ("viewer", &other_site[..]),
        ("viewer", &[][..]),
    ] {
        let mut ws = server.ws_with_headers(headers).await;
        ws.send(&hello(role)).await;
        assert_eq!(ws.expect_close().await.0, 4401, "{role} {headers:?}");
    }

    // Signed out, the open connection ends at its next ping.
    server.sign_out(&session).await;
    let (code, reason) = viewer.expect_close().await;
    assert_eq!(code, 4401, "{reason}");
    assert!(reason.contains("signed out"), "{reason}");
}
