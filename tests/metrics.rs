#![cfg(feature = "ssr")]
//! `GET /metrics`: the devices' current readings and the instance's state,
//! in the formats Prometheus scrapes.

mod common;

use common::{Server, eventually};
use reqwest::StatusCode;
use serde_json::json;
use std::io::Write;

/// A scrape's content type and text.
async fn scrape(server: &Server, accept: Option<&str>) -> (String, String) {
    let mut request = server.client.get(server.url("/metrics"));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    (content_type, response.text().await.unwrap())
}

/// The samples of a scrape: its `name{labels} value` lines.
fn sample_lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with('#')).collect()
}

fn has(samples: &[&str], line: &str) -> bool {
    samples.contains(&line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_shows_every_device_as_the_api_does() {
    let mut limits = tempfile::NamedTempFile::new().unwrap();
    writeln!(limits, "[devices.rack-1]\ntemperature = {{ max = 30 }}").unwrap();
    let server = Server::start_with(&["--thresholds", limits.path().to_str().unwrap()]).await;
    let posted = server
        .post_status(
            "rack-1",
            &json!({
                "name": "Rack \"A\"",
                "temperature": 35.5,
                "humidity": 40,
                "power_on": true,
                "metrics": {"fan.rpm": 1200}
            }),
        )
        .await;
    let agent = server.agent("lamp").await;
    eventually("the lamp's agent is online", || async {
        server
            .device("lamp")
            .await
            .is_some_and(|d| d["online"] == true)
    })
    .await;
    let last = server.healthz().await["event_id"].as_u64().unwrap();
    assert!(last > posted.id);

    let (content_type, text) = scrape(&server, None).await;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let samples = sample_lines(&text);
    for line in [
        r#"telltale_device_info{device="rack-1",name="Rack \"A\""} 1"#,
        r#"telltale_device_info{device="lamp",name="lamp"} 1"#,
        r#"telltale_device_temperature_celsius{device="rack-1"} 35.5"#,
        r#"telltale_device_humidity_percent{device="rack-1"} 40.0"#,
        r#"telltale_device_power_on{device="rack-1"} 1"#,
        r#"telltale_device_metric{device="rack-1",metric="fan.rpm"} 1200.0"#,
        r#"telltale_device_alerts{device="rack-1"} 1"#,
        r#"telltale_device_stale{device="rack-1"} 0"#,
        r#"telltale_device_online{device="lamp"} 1"#,
        "telltale_devices 2",
        &format!("telltale_last_event_id {last}"),
        "telltale_degraded 0",
    ] {
        assert!(has(&samples, line), "no {line:?} in {samples:#?}");
    }
    // An HTTP-fed device has no link to be up or down.
    assert!(
        !samples
            .iter()
            .any(|s| s.starts_with(r#"telltale_device_online{device="rack-1"}"#)),
        "{samples:#?}"
    );

    // The next scrape follows: a reading back within its limits, an agent
    // gone.
    server
        .post_status("rack-1", &json!({ "temperature": 21.0 }))
        .await;
    drop(agent);
    eventually("the lamp's agent is offline", || async {
        server
            .device("lamp")
            .await
            .is_some_and(|d| d["online"] == false)
    })
    .await;
    let (_, text) = scrape(&server, None).await;
    let samples = sample_lines(&text);
    for line in [
        r#"telltale_device_temperature_celsius{device="rack-1"} 21.0"#,
        r#"telltale_device_alerts{device="rack-1"} 0"#,
        r#"telltale_device_online{device="lamp"} 0"#,
    ] {
        assert!(has(&samples, line), "no {line:?} in {samples:#?}");
    }
}

#[tokio::test]
async fn prometheus_gets_openmetrics_when_it_asks() {
    let server = Server::start().await;
    server
        .post_status("rack-1", &json!({ "temperature": 20.0 }))
        .await;
    // What Prometheus sends.
    let accept = "application/openmetrics-text;version=1.0.0;q=0.5,\
                  application/openmetrics-text;version=0.0.1;q=0.4,\
                  text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
    let (content_type, text) = scrape(&server, Some(accept)).await;
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(
        has(
            &sample_lines(&text),
            r#"telltale_device_temperature_celsius{device="rack-1"} 20.0"#
        ),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
}
