#![cfg(feature = "ssr")]
//! `POST /api/session` and `DELETE /api/session`: the page's operator
//! sign-in, and the session cookie as operator rights for HTTP commands.

mod common;

use common::Server;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// `POST /api/session` with `token`: status, `Set-Cookie` (if any), body.
async fn sign_in(server: &Server, token: &str) -> (StatusCode, Option<String>, Value) {
    let response = server
        .client
        .post(server.url("/api/session"))
        .header("content-type", "application/json")
        .body(json!({ "token": token }).to_string())
        .send()
        .await
        .expect("POST /api/session is answered");
    let status = response.status();
    let cookie = set_cookie(&response);
    let body = response.json().await.unwrap_or(Value::Null);
    (status, cookie, body)
}

fn set_cookie(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().expect("an ASCII cookie").to_owned())
}

/// `name=value` of a `Set-Cookie` header, as a `Cookie` header sends it back.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().trim().to_owned()
}

/// `POST /api/devices/{device}/commands` with only a `Cookie` header.
async fn command_with_cookie(
    server: &Server,
    device: &str,
    cookie: &str,
    on: bool,
) -> (StatusCode, Value) {
    let response = server
        .client
        .post(server.url(&format!("/api/devices/{device}/commands")))
        .header("content-type", "application/json")
        .header("cookie", cookie)
        .body(json!({"set": {"power_on": on}}).to_string())
        .send()
        .await
        .expect("the command is answered");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A simulator device's power state, once it has one.
async fn power_of(server: &Server, id: &str) -> bool {
    loop {
        if let Some(d) = server.device(id).await
            && let Some(on) = d["status"]["power_on"].as_bool()
        {
            return on;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_a_401_and_sets_no_cookie() {
    let server = Server::start().await;
    for token in ["nope", "", server.token.as_str()] {
        let (status, cookie, body) = sign_in(&server, token).await;
        assert_eq!(status, 401, "token {token:?}: {body}");
        assert_eq!(cookie, None);
        assert_eq!(body["error"], "wrong operator token");
    }
    // A form (the sign-in page's) is refused the same way, with the page
    // that says so (tests/reading.rs signs in with forms).
    let response = server
        .client
        .post(server.url("/api/session"))
        .form(&[("token", "nope")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(set_cookie(&response).is_none());
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("wrong operator token")
    );
    // Neither JSON nor a form: refused before the token is even read.
    let response = server
        .client
        .post(server.url("/api/session"))
        .header("content-type", "text/plain")
        .body(server.operator_token.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    assert!(set_cookie(&response).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_token_sets_an_http_only_strict_cookie_without_the_token() {
    let server = Server::start().await;
    let (status, cookie, body) = sign_in(&server, &server.operator_token.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"role": "operator"}));
    let cookie = cookie.expect("a Set-Cookie header");
    assert!(cookie.starts_with("telltale_session="), "{cookie}");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie} lacks {attribute}");
    }
    // Plain http on 127.0.0.1: a `Secure` cookie would be dropped.
    assert!(!cookie.contains("Secure"), "{cookie}");
    assert!(!cookie.contains(&server.operator_token), "{cookie}");
    let value = cookie_pair(&cookie);
    assert!(value.len() > "telltale_session=".len() + 30, "{value}");

    // With `--secure-cookie on` (behind https) the cookie says so.
    let secure = Server::start_with(&["--secure-cookie", "on"]).await;
    let (_, cookie, _) = sign_in(&secure, &secure.operator_token.clone()).await;
    assert!(cookie.unwrap().contains("Secure"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cookie_authorises_commands_and_a_bogus_one_does_not() {
    let server = Server::start_with_simulator(&["--simulator-interval", "10s"]).await;
    let before = power_of(&server, "greenhouse").await;
    let (_, cookie, _) = sign_in(&server, &server.operator_token.clone()).await;
    let cookie = cookie_pair(&cookie.unwrap());

    // Another cookie alongside is fine.
    let (status, body) =
        command_with_cookie(&server, "greenhouse", &format!("a=b; {cookie}"), !before).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"outcome": "applied"}));
    assert_eq!(power_of(&server, "greenhouse").await, !before);

    for bogus in [
        "telltale_session=bogus".to_owned(),
        "telltale_session=".to_owned(),
        format!("telltale_session={}", server.operator_token),
        "other=1".to_owned(),
    ] {
        let (status, body) = command_with_cookie(&server, "greenhouse", &bogus, before).await;
        assert_eq!(status, 401, "{bogus}: {body}");
    }
    assert_eq!(power_of(&server, "greenhouse").await, !before);

    // A bearer token still works, and a wrong one is not rescued by the cookie.
    let (status, _) = server
        .post_command(
            "greenhouse",
            Some(&server.operator_token.clone()),
            &json!({"set": {"power_on": before}}),
        )
        .await;
    assert_eq!(status, 200);
    let response = server
        .client
        .post(server.url("/api/devices/greenhouse/commands"))
        .header("content-type", "application/json")
        .header("cookie", &cookie)
        .bearer_auth("wrong")
        .body(json!({"set": {"power_on": !before}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    // CSRF guard: with the cookie, a non-JSON body is still refused.
    let response = server
        .client
        .post(server.url("/api/devices/greenhouse/commands"))
        .header("content-type", "text/plain")
        .header("cookie", &cookie)
        .body(json!({"set": {"power_on": !before}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    assert_eq!(power_of(&server, "greenhouse").await, before);

    // A refused command's reason reaches the page as the error.
    server
        .post_status("http-only", &json!({"power_on": true}))
        .await;
    let (status, body) = command_with_cookie(&server, "http-only", &cookie, false).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("no agent"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_out_ends_the_session() {
    let server = Server::start_with_simulator(&["--simulator-interval", "10s"]).await;
    let before = power_of(&server, "freezer").await;
    let (_, cookie, _) = sign_in(&server, &server.operator_token.clone()).await;
    let cookie = cookie_pair(&cookie.unwrap());
    let (status, _) = command_with_cookie(&server, "freezer", &cookie, !before).await;
    assert_eq!(status, 200);

    let response = server
        .client
        .delete(server.url("/api/session"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let cleared = set_cookie(&response).expect("the cookie is cleared");
    assert!(cleared.starts_with("telltale_session=;"), "{cleared}");
    assert!(cleared.contains("Max-Age=0"), "{cleared}");

    // The old cookie, sent again anyway, grants nothing.
    let (status, body) = command_with_cookie(&server, "freezer", &cookie, before).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("sign in again"),
        "{body}"
    );
    assert_eq!(power_of(&server, "freezer").await, !before);

    // Signing out again (or without a session) is harmless.
    let response = server
        .client
        .delete(server.url("/api/session"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_outlive_a_restart_and_sign_outs_do_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let mut server = Server::start_with(&["--data-dir", path]).await;
    let (kept, ended) = (server.sign_in().await, server.sign_in().await);
    assert_ne!(kept, ended);
    server.sign_out(&ended).await;
    assert!(server.signed_in(&kept).await);
    assert!(!server.signed_in(&ended).await);
    server.restart().await;
    assert!(server.signed_in(&kept).await, "a restart signs nobody out");
    assert!(!server.signed_in(&ended).await, "nor anyone back in");
    // Signing in again ends the session the browser had.
    let response = server
        .client
        .post(server.url("/api/session"))
        .header("content-type", "application/json")
        .header("cookie", &kept)
        .body(json!({ "token": server.operator_token }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(!server.signed_in(&kept).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_renders_switches_only_for_a_live_session() {
    let server = Server::start_with_simulator(&["--simulator-interval", "10s"]).await;
    power_of(&server, "greenhouse").await;
    let page = |cookie: Option<String>| {
        let mut request = server.client.get(server.url("/"));
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        async move { request.send().await.unwrap().text().await.unwrap() }
    };
    let anonymous = page(None).await;
    assert!(anonymous.contains("data-device=\"greenhouse\""));
    assert!(!anonymous.contains("power-switch"));
    assert!(anonymous.contains("Operator token"));

    let (_, cookie, _) = sign_in(&server, &server.operator_token.clone()).await;
    let cookie = cookie_pair(&cookie.unwrap());
    let signed_in = page(Some(cookie.clone())).await;
    assert_eq!(signed_in.matches("data-testid=\"power-switch\"").count(), 3);
    assert!(signed_in.contains("Sign out"));
    assert!(!signed_in.contains(&server.operator_token));

    let bogus = page(Some("telltale_session=bogus".into())).await;
    assert!(!bogus.contains("power-switch"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cookie_grants_the_websocket_operator_role_to_this_sites_pages_only() {
    let server = Server::start().await;
    let cookie = server.sign_in().await;
    let this_site = format!("http://{}", server.addr);
    let hello = json!({"type": "hello", "v": 1, "role": "operator"});
    let mut signed_in = server
        .ws_with_headers(&[("cookie", &cookie), ("origin", &this_site)])
        .await;
    signed_in.send(&hello).await;
    let welcome = signed_in.expect("welcome").await;
    assert_eq!(welcome["role"], "operator", "{welcome}");

    // Another site's page, no cookie, or a signed-out cookie: refused.
    let other_site = [
        ("cookie", cookie.as_str()),
        ("origin", "http://evil.example"),
    ];
    for headers in [&other_site[..], &[("origin", this_site.as_str())][..]] {
        let mut ws = server.ws_with_headers(headers).await;
        ws.send(&hello).await;
        assert_eq!(ws.expect_close().await.0, 4401, "{headers:?}");
    }
    server.sign_out(&cookie).await;
    let mut ws = server.ws_with_headers(&[("cookie", &cookie)]).await;
    ws.send(&hello).await;
    assert_eq!(ws.expect_close().await.0, 4401);

    // The connection that had the role from the session loses it with the
    // session: its next command closes it.
    let command = json!({"type": "command", "device": "rack-1",
        "set": {"power_on": true}, "request_id": "after-sign-out"});
    signed_in.send(&command).await;
    let (code, reason) = signed_in.expect_close().await;
    assert_eq!(code, 4401, "{reason}");
    assert!(reason.contains("signed out"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_sends_too_many_wrong_tokens_waits_and_is_told_so() {
    let server = Server::start().await;
    let sign_in_from = |token: String, from: Option<&'static str>| {
        let mut request = server
            .client
            .post(server.url("/api/session"))
            .header("content-type", "application/json")
            .body(json!({ "token": token }).to_string());
        if let Some(from) = from {
            request = request.header("x-forwarded-for", from);
        }
        async move { request.send().await.expect("an answer") }
    };
    // Ten wrong tokens at once are allowed, and the one that goes past.
    for i in 0..=telltale::server::auth::GUESSES {
        let response = sign_in_from(format!("guess-{i}"), None).await;
        assert_eq!(response.status(), 401, "guess {i}");
    }
    // Then even the right token waits, on every route that checks one.
    let response = sign_in_from(server.operator_token.clone(), None).await;
    assert_eq!(response.status(), 429);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=6).contains(&retry), "Retry-After: {retry}");
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("too many wrong tokens"),
        "{body}"
    );
    let (status, _) = server
        .try_post_status("a", &json!({ "temperature": 1.0 }))
        .await;
    assert_eq!(status, 429);
    // Reading needs no token, and another client (behind a proxy on this
    // machine) has its own allowance.
    assert_eq!(server.get_json("/api/devices").await.0, 200);
    let response = sign_in_from(server.operator_token.clone(), Some("203.0.113.9")).await;
    assert_eq!(response.status(), 200);
}
