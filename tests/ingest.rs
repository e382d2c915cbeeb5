#![cfg(feature = "ssr")]
//! `POST /api/devices/{id}/status` and the reads: what is accepted, what is
//! refused (and then changes nothing), and what a change shows.

mod common;

use common::{Server, SseStream};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Largest accepted body, in bytes.
const MAX_BODY: usize = 16 * 1024;

/// Everything a refused request could have changed.
struct World {
    devices: Value,
    health: Value,
}

async fn world(server: &Server) -> World {
    let (status, devices) = server.get_json("/api/devices").await;
    assert_eq!(status, StatusCode::OK);
    let mut health = server.healthz().await;
    health.as_object_mut().unwrap().remove("subscribers");
    World { devices, health }
}

/// Sends `request` and checks the refusal: its status, a JSON body with an
/// `error` message and, where given, the faulty `field`.
async fn refused(
    request: reqwest::RequestBuilder,
    status: StatusCode,
    field: Option<&str>,
) -> reqwest::header::HeaderMap {
    let response = request.send().await.expect("an answer");
    let headers = response.headers().clone();
    let got = response.status();
    let text = response.text().await.expect("a body");
    assert_eq!(got, status, "body: {text}");
    assert!(
        headers
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap().starts_with("application/json")),
        "a JSON error: {headers:?}"
    );
    let body: Value = serde_json::from_str(&text).expect("a JSON error body");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "an error message: {body}"
    );
    assert_eq!(body["field"].as_str(), field, "the faulty field: {body}");
    headers
}

fn json_post(
    server: &Server,
    device: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::RequestBuilder {
    server
        .post_request(device)
        .header("content-type", "application/json")
        .body(body)
}

/// The next event on `stream` is a change posted now: nothing came before it.
async fn expect_next_is_fresh(server: &Server, stream: &mut SseStream, after: u64) {
    let posted = server
        .post_status("sentinel", &json!({ "power_on": false }))
        .await;
    assert_eq!(posted.id, after + 1, "a refused request made an event");
    let record = stream.expect_status().await;
    assert_eq!(record.id(), posted.id, "an unexpected event: {record:?}");
    assert_eq!(record.json()["device"], "sentinel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_answer_the_right_error_and_change_nothing() {
    let server = Server::start().await;
    let before_any = server
        .post_status(
            "dev-1",
            &json!({ "name": "Dev 1", "temperature": 20.5, "humidity": 40.5, "power_on": true,
                     "metrics": { "fan": 900.5 } }),
        )
        .await;
    let mut stream = server.sse("").await;
    stream.expect_start().await;
    let before = world(&server).await;
    let good = json!({ "temperature": 99.5 }).to_string();

    // 400: malformed JSON, trailing garbage, an empty body.
    for body in [
        r#"{"temperature": 21.5"#,
        r#"{"temperature": 21.5} x"#,
        "",
        "{temperature: 1}",
    ] {
        refused(
            json_post(&server, "dev-1", body),
            StatusCode::BAD_REQUEST,
            None,
        )
        .await;
    }

    // 401: no token, a wrong token, a token of another length, another scheme.
    let url = server.url("/api/devices/dev-1/status");
    let no_token = server
        .client
        .post(&url)
        .header("content-type", "application/json")
        .body(good.clone());
    let headers = refused(no_token, StatusCode::UNAUTHORIZED, None).await;
    assert_eq!(headers["www-authenticate"], "Bearer");
    let wrong: String = server
        .token
        .chars()
        .map(|c| if c == 'x' { 'y' } else { 'x' })
        .collect();
    for auth in [
        format!("Bearer {wrong}"),
        format!("Bearer {}x", server.token),
        "Bearer ".to_owned(),
        format!("Basic {}", server.token),
        server.token.clone(),
    ] {
        let request = server
            .client
            .post(&url)
            .header("authorization", auth)
            .header("content-type", "application/json")
            .body(good.clone());
        refused(request, StatusCode::UNAUTHORIZED, None).await;
    }
    // Nor may a refused token create a device.
    let request = server
        .client
        .post(server.url("/api/devices/ghost/status"))
        .bearer_auth(&wrong)
        .header("content-type", "application/json")
        .body(good.clone());
    refused(request, StatusCode::UNAUTHORIZED, None).await;

    // 413: one byte over the limit, declared or streamed in chunks. The body
    // is valid JSON, so only the size can be the reason. The rest of it is
    // not read, so the answer closes the connection: a client that reused it
    // would find it closed under its next request.
    let oversized = format!("{{\"temperature\": 99.5{}}}", " ".repeat(MAX_BODY));
    assert!(oversized.len() > MAX_BODY);
    let headers = refused(
        json_post(&server, "dev-1", oversized.clone()),
        StatusCode::PAYLOAD_TOO_LARGE,
        None,
    )
    .await;
    assert_eq!(headers["connection"], "close");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = oversized
        .as_bytes()
        .chunks(1000)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let streamed = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    refused(
        json_post(&server, "dev-1", streamed),
        StatusCode::PAYLOAD_TOO_LARGE,
        None,
    )
    .await;

    // 415: no content type, or another one.
    refused(
        server.post_request("dev-1").body(good.clone()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        None,
    )
    .await;
    for content_type in ["text/plain", "application/x-www-form-urlencoded", "json"] {
        let request = server
            .post_request("dev-1")
            .header("content-type", content_type)
            .body(good.clone());
        refused(request, StatusCode::UNSUPPORTED_MEDIA_TYPE, None).await;
    }

    // 422: wrong types, values out of range, unknown fields, a bad device id.
    let invalid = [
        (json!({ "temperature": "hot" }), "temperature"),
        (json!({ "temperature": 21.5, "humidity": 101 }), "humidity"),
        (json!({ "humidity": -0.5 }), "humidity"),
        (json!({ "temperature": -300 }), "temperature"),
        (json!({ "power_on": "yes" }), "power_on"),
        (json!({ "name": 7 }), "name"),
        (json!({ "name": "   " }), "name"),
        (json!({ "temprature": 21.5 }), "temprature"),
        (json!({ "temperature": 21.5, "colour": "red" }), "colour"),
        (json!({ "metrics": { "fan": "fast" } }), "metrics.fan"),
        (
            json!({ "metrics": { "bad name": 1.5 } }),
            "metrics.bad name",
        ),
        (json!({ "metrics": [1.5] }), "metrics"),
    ];
    for (body, field) in invalid {
        refused(
            json_post(&server, "dev-1", body.to_string()),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some(field),
        )
        .await;
    }
    let long_id = "x".repeat(65);
    for bad_id in [
        "Dev-1",
        "dev%201",
        "dev.1",
        "d%C3%A9v",
        "d%FFv",
        long_id.as_str(),
    ] {
        refused(
            json_post(&server, bad_id, good.clone()),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("id"),
        )
        .await;
    }

    // 404: a device nobody reported.
    // Not even UTF-8 (`%FF`): the same answers, in JSON.
    for unknown in ["ghost", "Not-An-Id", "gh%FFost"] {
        for path in ["", "/history", "/changes"] {
            let url = server.url(&format!("/api/devices/{unknown}{path}"));
            refused(server.client.get(url), StatusCode::NOT_FOUND, None).await;
        }
    }

    // Nothing changed: same devices, same values, same times, same event id...
    let after = world(&server).await;
    assert_eq!(after.devices, before.devices);
    assert_eq!(after.health, before.health);
    assert_eq!(after.devices["event_id"], before_any.id);
    assert_eq!(server.device("ghost").await, None);
    // ...and no event was sent.
    expect_next_is_fresh(&server, &mut stream, before_any.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_exactly_the_limit_is_accepted() {
    let server = Server::start().await;
    let body = json!({ "temperature": 21.5 }).to_string();
    let padded = format!("{body}{}", " ".repeat(MAX_BODY - body.len()));
    assert_eq!(padded.len(), MAX_BODY);
    let response = json_post(&server, "edge", padded).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let device = server.device("edge").await.expect("the device exists");
    assert_eq!(device["status"]["temperature"], json!(21.5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_content_type_variants_are_accepted() {
    let server = Server::start().await;
    for (i, content_type) in [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/merge-patch+json",
    ]
    .into_iter()
    .enumerate()
    {
        let response = server
            .post_request("typed")
            .header("content-type", content_type)
            .body(json!({ "temperature": i as f64 + 0.5 }).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{content_type}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_changes_nothing_answers_changed_false_and_sends_no_event() {
    let server = Server::start().await;
    let full = json!({ "name": "Dev", "temperature": 20.5, "humidity": 40.5, "power_on": true,
                       "metrics": { "fan": 900.5, "load": 0.25 } });
    let first = server.post_status("dev", &full).await;
    assert!(first.changed);
    let mut stream = server.sse("").await;
    let snapshot = stream.expect_start().await;
    assert_eq!(snapshot.id, first.id);
    let device = server.device("dev").await.unwrap();

    for same in [
        full.clone(),
        json!({}),
        json!({ "temperature": 20.5 }),
        json!({ "metrics": { "load": 0.25 } }),
        json!({ "metrics": {} }),
        // Names are trimmed before they are compared.
        json!({ "name": "  Dev " }),
    ] {
        let posted = server.post_status("dev", &same).await;
        assert_eq!(
            posted,
            common::Posted {
                id: first.id,
                changed: false
            },
            "{same}"
        );
    }
    // Not even the time moved.
    assert_eq!(server.device("dev").await.unwrap(), device);
    assert_eq!(server.healthz().await["event_id"], first.id);
    expect_next_is_fresh(&server, &mut stream, first.id).await;

    // A real change of one field is a change, and the others stay.
    let changed = server
        .post_status("dev", &json!({ "humidity": 41.5 }))
        .await;
    assert_eq!(
        changed,
        common::Posted {
            id: first.id + 2,
            changed: true
        }
    );
    let record = stream.expect_status().await;
    assert_eq!(record.id(), changed.id);
    assert_eq!(
        record.json()["status"],
        json!({ "temperature": 20.5, "humidity": 41.5, "power_on": true,
                "metrics": { "fan": 900.5, "load": 0.25 } })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_device_appears_everywhere() {
    let server = Server::start().await;
    let (_, empty) = server.get_json("/api/devices").await;
    assert_eq!(empty["devices"], json!([]));
    assert_eq!(server.healthz().await["devices"], 0);
    let mut live = server.sse("").await;
    assert_eq!(live.expect_start().await.data["devices"], json!([]));

    // Reporting nothing still registers the device, named after its id.
    let bare = server.post_status("bare-1", &json!({})).await;
    assert!(bare.changed);
    let posted = server
        .post_status(
            "boiler_2",
            &json!({ "name": "Boiler 2", "temperature": 61.5, "metrics": { "pressure": 1.75 } }),
        )
        .await;
    assert!(posted.changed);
    assert_eq!(posted.id, bare.id + 1);

    let (status, list) = server.get_json("/api/devices").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["event_id"], posted.id);
    let devices = list["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    let boiler = devices.iter().find(|d| d["id"] == "boiler_2").unwrap();
    assert_eq!(boiler["name"], "Boiler 2");
    assert_eq!(
        boiler["status"],
        json!({ "temperature": 61.5, "humidity": null, "power_on": null,
                "metrics": { "pressure": 1.75 } })
    );
    let bare_device = devices.iter().find(|d| d["id"] == "bare-1").unwrap();
    assert_eq!(bare_device["name"], "bare-1");
    assert_eq!(
        bare_device["status"],
        json!({ "temperature": null, "humidity": null, "power_on": null, "metrics": {} })
    );
    assert_eq!(server.device("boiler_2").await.as_ref(), Some(boiler));

    let health = server.healthz().await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["devices"], 2);
    assert_eq!(health["event_id"], posted.id);

    // A new stream's snapshot shows the same as the list.
    let mut fresh = server.sse("").await;
    let snapshot = fresh.expect_start().await;
    assert_eq!(snapshot.id, posted.id);
    assert_eq!(snapshot.data["devices"], list["devices"]);

    // The stream that was already open was told about both.
    let first = live.expect_status().await;
    assert_eq!(first.id(), bare.id);
    assert_eq!(first.json()["device"], "bare-1");
    let second = live.expect_status().await;
    assert_eq!(second.id(), posted.id);
    let data = second.json();
    assert_eq!(data["device"], "boiler_2");
    assert_eq!(data["name"], "Boiler 2");
    assert_eq!(data["status"], boiler["status"]);
    assert_eq!(data["updated_at"], boiler["updated_at"]);
}

/// A JSON array is not a status update, though serde would read `[21.5]`
/// as `{"temperature": 21.5}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_array_body_is_refused() {
    let server = Server::start().await;
    server
        .post_status("dev", &json!({ "temperature": 20.5 }))
        .await;
    let (status, body) = server.try_post_status("dev", &json!([21.5, 50.5])).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "answered {body}");
    let device = server.device("dev").await.unwrap();
    assert_eq!(device["status"]["temperature"], json!(20.5));
}

/// Updates with new metric names must not pile up without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_carries_at_most_32_metrics() {
    let server = Server::start().await;
    let batch = |b: usize| -> serde_json::Map<String, Value> {
        (0..32)
            .map(|m| (format!("b{b}_m{m}"), json!(1.5)))
            .collect()
    };
    let (status, body) = server
        .try_post_status("dev", &json!({ "metrics": batch(0) }))
        .await;
    assert_eq!(status, StatusCode::OK, "answered {body}");
    let (status, body) = server
        .try_post_status("dev", &json!({ "metrics": batch(1) }))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "answered {body}");
    assert_eq!(body["field"], "metrics");
    let device = server.device("dev").await.unwrap();
    let count = device["status"]["metrics"].as_object().unwrap().len();
    assert_eq!(count, 32, "the refused update changed nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_addresses_and_wrong_methods_get_an_answer_that_says_so() {
    let server = Server::start().await;
    // Under /api/: a JSON error, as from every endpoint.
    let (status, body) = server.get_json("/api/nothing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body["error"],
        "no such API endpoint: GET /api/nothing (see the API in README.md)"
    );
    let (status, body) = server.get_json("/api/devices/lamp/status").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        body["error"],
        "GET is not allowed on /api/devices/lamp/status"
    );
    // The WebSocket endpoint, asked without a handshake, says what it wants.
    let (status, body) = server.get_json("/api/ws").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("WebSocket only"), "{error}");
    // Anywhere else: the app's own page, with a way back.
    for path in ["/nothing", "/devices"] {
        let response = reqwest::get(server.url(path)).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        let html = response.text().await.unwrap();
        assert!(html.contains("There is no such page."), "{path}: {html}");
        assert!(html.contains(r#"href="/""#), "{path}: {html}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_other_site_may_frame_a_page_nor_sniff_a_response() {
    let server = Server::start().await;
    for path in ["/", "/devices/lamp", "/api/devices", "/healthz", "/nothing"] {
        let response = reqwest::get(server.url(path)).await.unwrap();
        let headers = response.headers();
        assert_eq!(
            headers["content-security-policy"], "frame-ancestors 'none'",
            "{path}"
        );
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
    }
}
