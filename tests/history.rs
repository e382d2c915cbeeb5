#![cfg(feature = "ssr")]
//! `GET /api/devices/{id}/history`: every change in order from the value in
//! force at `from`, step buckets, CSV, the refusals, and history that
//! survives a restart. Servers run with `--memory` (a temporary store)
//! unless a test gives its own `--data-dir`.

mod common;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use common::Server;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

/// Posts `body` for `device`; returns the time the server gave the change.
async fn post(server: &Server, device: &str, body: Value) -> DateTime<Utc> {
    assert!(server.post_status(device, &body).await.changed);
    let state = server.device(device).await.expect("the device exists");
    let at = state["updated_at"].as_str().expect("an updated_at");
    let at: DateTime<Utc> = at.parse().expect("an RFC 3339 updated_at");
    // The next change gets a later millisecond.
    tokio::time::sleep(Duration::from_millis(3)).await;
    at
}

/// Posts temperatures 10, 20, 30; returns their times.
async fn three_temperatures(server: &Server, device: &str) -> [DateTime<Utc>; 3] {
    let mut times = Vec::new();
    for t in [10.0, 20.0, 30.0] {
        times.push(post(server, device, json!({ "temperature": t })).await);
    }
    times.try_into().unwrap()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `GET /api/devices/{device}/history{query}`, insisting on a 200.
async fn history(server: &Server, device: &str, query: &str) -> Value {
    let (status, body) = server
        .get_json(&format!("/api/devices/{device}/history{query}"))
        .await;
    assert_eq!(status, StatusCode::OK, "history{query} answered {body}");
    body
}

/// The points as `(t, v)`.
fn tv(history: &Value) -> Vec<(i64, f64)> {
    history["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| (p["t"].as_i64().unwrap(), p["v"].as_f64().unwrap()))
        .collect()
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

#[tokio::test]
async fn history_is_every_change_in_order_from_the_value_in_force_at_from() {
    let server = Server::start().await;
    let [t1, t2, t3] = three_temperatures(&server, "lab").await;
    post(&server, "lab", json!({ "metrics": { "fan_rpm": 900 } })).await;

    let from = t1 + TimeDelta::milliseconds(1);
    let to = t3 + TimeDelta::seconds(1);
    let body = history(
        &server,
        "lab",
        &format!("?from={}&to={}", rfc3339(from), rfc3339(to)),
    )
    .await;
    assert_eq!(body["device"], "lab");
    assert_eq!(body["metric"], "temperature");
    assert!(body.get("step_ms").is_none(), "{body}");
    // 10 was in force at `from`: it comes first, placed at `from`.
    assert_eq!(
        tv(&body),
        [(ms(from), 10.0), (ms(t2), 20.0), (ms(t3), 30.0)]
    );
    for p in body["points"].as_array().unwrap() {
        assert!(p.get("min").is_none() && p.get("max").is_none(), "{p}");
    }

    // The defaults: temperature over the last hour up to now.
    assert_eq!(
        tv(&history(&server, "lab", "").await),
        [(ms(t1), 10.0), (ms(t2), 20.0), (ms(t3), 30.0)]
    );
    // Another metric; one that never changed here is empty.
    assert_eq!(
        tv(&history(&server, "lab", "?metric=fan_rpm").await)
            .iter()
            .map(|p| p.1)
            .collect::<Vec<_>>(),
        [900.0]
    );
    assert!(tv(&history(&server, "lab", "?metric=humidity").await).is_empty());
}

#[tokio::test]
async fn a_step_makes_buckets_with_min_mean_and_max() {
    let server = Server::start().await;
    let [t1, _, _] = three_temperatures(&server, "oven").await;
    // Ten-minute buckets around the readings: nothing is known before the
    // first, and nothing yet after now, so there is one bucket.
    let from = t1 - TimeDelta::minutes(10);
    let to = t1 + TimeDelta::minutes(50);
    for step in ["10m", "600", "600.0"] {
        let body = history(
            &server,
            "oven",
            &format!("?from={}&to={}&step={step}", rfc3339(from), rfc3339(to)),
        )
        .await;
        assert_eq!(body["step_ms"], 600_000, "step={step}");
        let points = body["points"].as_array().unwrap();
        assert_eq!(points.len(), 1, "step={step}: {body}");
        let p = &points[0];
        assert_eq!(p["t"], ms(t1), "the bucket that holds the readings");
        assert_eq!(p["min"], 10.0);
        assert_eq!(p["max"], 30.0);
        let v = p["v"].as_f64().unwrap();
        assert!((10.0..=30.0).contains(&v), "a mean of 10, 20, 30: {v}");
    }
}

#[tokio::test]
async fn csv_comes_for_accept_text_csv_and_at_history_csv() {
    let server = Server::start().await;
    let [t1, t2, t3] = three_temperatures(&server, "cellar").await;
    let query = format!(
        "?from={}&to={}",
        rfc3339(t1 - TimeDelta::seconds(1)),
        rfc3339(t3 + TimeDelta::seconds(1))
    );
    let by_accept = server
        .client
        .get(server.url(&format!("/api/devices/cellar/history{query}")))
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    let by_path = server
        .client
        .get(server.url(&format!("/api/devices/cellar/history.csv{query}")))
        .send()
        .await
        .unwrap();
    let mut bodies = Vec::new();
    for response in [by_accept, by_path] {
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"],
            "text/csv; charset=utf-8"
        );
        bodies.push(response.text().await.unwrap());
    }
    assert_eq!(bodies[0], bodies[1]);
    let expected = format!(
        "t,value,min,max\n{},10,,\n{},20,,\n{},30,,\n",
        rfc3339(t1),
        rfc3339(t2),
        rfc3339(t3)
    );
    assert_eq!(bodies[0], expected);
    // Buckets carry their min and max.
    let response = server
        .client
        .get(server.url(&format!("/api/devices/cellar/history.csv{query}&step=1h")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.text().await.unwrap();
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.len(), 2, "{body}");
    assert!(lines[1].ends_with(",10,30"), "{body}");
}

#[tokio::test]
async fn bad_requests_are_refused_naming_the_field() {
    let server = Server::start().await;
    three_temperatures(&server, "rack").await;
    let now = Utc::now();
    let hour_ago = rfc3339(now - TimeDelta::hours(1));
    let now = rfc3339(now);
    let cases = [
        (format!("?from={now}&to={hour_ago}"), "from"),
        (format!("?from={now}&to={now}"), "from"),
        ("?from=yesterday".to_owned(), "from"),
        ("?to=2026-13-01T00:00:00Z".to_owned(), "to"),
        ("?step=often".to_owned(), "step"),
        ("?step=0".to_owned(), "step"),
        ("?step=0s".to_owned(), "step"),
        ("?step=-5".to_owned(), "step"),
        ("?metric=no%20spaces".to_owned(), "metric"),
        ("?step=1ms".to_owned(), "step"),
    ];
    for (query, field) in &cases {
        for path in ["history", "history.csv"] {
            let (status, body) = server
                .get_json(&format!("/api/devices/rack/{path}{query}"))
                .await;
            assert_eq!(
                status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{path}{query}: {body}"
            );
            assert_eq!(body["field"], *field, "{path}{query}: {body}");
        }
    }
    // Too many points says which step would fit: an hour at 1ms is 3.6
    // million points, 10 000 fit at 1s.
    let (_, body) = server.get_json("/api/devices/rack/history?step=1ms").await;
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("10000") && error.contains("1s"), "{error}");

    for device in ["nobody", "Not-An-Id"] {
        let (status, body) = server
            .get_json(&format!("/api/devices/{device}/history"))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{device}: {body}");
        assert!(body["error"].as_str().unwrap().contains(device), "{body}");
    }

    // A range older than anything kept is simply empty.
    let body = history(
        &server,
        "rack",
        "?from=2000-01-01T00:00:00Z&to=2000-01-02T00:00:00%2B01:00&step=1h",
    )
    .await;
    assert_eq!(body["points"], json!([]));
}

#[tokio::test]
async fn from_may_be_a_duration_before_to() {
    let server = Server::start().await;
    let [_, _, last] = three_temperatures(&server, "rack").await;
    let to = rfc3339(last + TimeDelta::seconds(1));
    let to_time: DateTime<Utc> = to.parse().unwrap();
    let body = history(&server, "rack", &format!("?to={to}&from=90m")).await;
    let from: DateTime<Utc> = body["from"].as_str().unwrap().parse().unwrap();
    assert_eq!(from, to_time - TimeDelta::minutes(90));
    assert_eq!(tv(&body).last().map(|p| p.1), Some(30.0));
    // Against now when `to` is left out, as a page's download link asks.
    let body = history(&server, "rack", "?from=24h&step=1m").await;
    let from: DateTime<Utc> = body["from"].as_str().unwrap().parse().unwrap();
    let to: DateTime<Utc> = body["to"].as_str().unwrap().parse().unwrap();
    assert_eq!(to - from, TimeDelta::hours(24));
    // A bare number is not a duration here (is it seconds? a year?).
    let (status, body) = server.get_json("/api/devices/rack/history?from=90").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["field"], "from");
    assert!(body["error"].as_str().unwrap().contains("24h"), "{body}");
}

#[tokio::test]
async fn history_survives_a_restart_on_the_same_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let mut server = Server::start_with(&["--data-dir", path]).await;
    let [t1, t2, t3] = three_temperatures(&server, "attic").await;
    let query = format!("?from={}", rfc3339(t1 - TimeDelta::seconds(1)));
    let expected = [(ms(t1), 10.0), (ms(t2), 20.0), (ms(t3), 30.0)];
    assert_eq!(tv(&history(&server, "attic", &query).await), expected);
    server.restart().await;
    assert_eq!(tv(&history(&server, "attic", &query).await), expected);
}

/// The pages read the history while they render (sparklines, charts): the
/// first HTML carries it, and a render that reads it must not break.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_render_with_their_history() {
    let server = Server::start().await;
    three_temperatures(&server, "rack-1").await;
    // The chart has each reading; the sparkline, a point a minute.
    for (path, points) in [("/devices/rack-1", ["3"].as_slice()), ("/", &["1", "2"])] {
        let response = server.client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let page = response.text().await.unwrap();
        assert!(
            points
                .iter()
                .any(|n| page.contains(&format!("data-points=\"{n}\""))),
            "{path}: {page}"
        );
    }
}

#[tokio::test]
async fn readings_kept_while_away_arrive_later_at_their_own_times() {
    let server = Server::start_with(&["--retention", "2h"]).await;
    let now = Utc::now();
    let ago = |minutes| now - TimeDelta::minutes(minutes);
    let mut stream = server.sse("?device=probe").await;
    stream.expect_start().await;
    for (minutes, t) in [(30, 10.0), (20, 11.0), (10, 12.0)] {
        let body = json!({ "temperature": t, "at": rfc3339(ago(minutes)) });
        assert!(server.post_status("probe", &body).await.changed);
    }
    // Each change is at its reading's time, live and in the history.
    for minutes in [30, 20, 10] {
        let event = stream.expect_status().await.json();
        let at: DateTime<Utc> = event["updated_at"].as_str().unwrap().parse().unwrap();
        assert_eq!(ms(at), ms(ago(minutes)), "{event}");
    }
    let query = format!("?metric=temperature&from={}", rfc3339(ago(60)));
    let times = [30, 20, 10].map(|m| ms(ago(m)));
    assert_eq!(
        tv(&history(&server, "probe", &query).await),
        [(times[0], 10.0), (times[1], 11.0), (times[2], 12.0)]
    );

    // Refused, naming `at`, changing nothing: out of order, far ahead of
    // the server's clock, older than the raw readings kept, not a time.
    let refusals = [
        json!({ "temperature": 9.0, "at": rfc3339(ago(15)) }),
        json!({ "temperature": 9.0, "at": rfc3339(now + TimeDelta::minutes(5)) }),
        json!({ "temperature": 9.0, "at": rfc3339(ago(180)) }),
        json!({ "temperature": 9.0, "at": "yesterday" }),
        json!({ "temperature": 9.0, "at": 1_700_000_000 }),
    ];
    for body in refusals {
        let (status, answer) = server.try_post_status("probe", &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        assert_eq!(answer["field"], "at", "{answer}");
    }
    assert_eq!(
        server.device("probe").await.unwrap()["status"]["temperature"],
        12.0
    );

    // A clock a little ahead is taken as the server's now; without `at`,
    // it is now anyway.
    let ahead = json!({ "temperature": 13.0, "at": rfc3339(Utc::now() + TimeDelta::seconds(30)) });
    server.post_status("probe", &ahead).await;
    let at: DateTime<Utc> = server.device("probe").await.unwrap()["updated_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(at <= Utc::now(), "{at} is ahead of the server's clock");
}
