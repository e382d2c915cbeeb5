#![cfg(feature = "ssr")]
//! `--database-url`: the store in PostgreSQL. Devices, history and event
//! ids outlive a restart, a client resumes across it from the database, and
//! instances starting together on one empty database all come up.
//!
//! Needs a PostgreSQL server: `TELLTALE_TEST_DATABASE_URL`, by default
//! `postgres://postgres@127.0.0.1:5432/test`. Each test works in a schema of
//! its own, dropped at the end.

mod common;

use common::{Schema, Server, admin};
use serde_json::{Value, json};

fn temperatures(history: &Value) -> Vec<f64> {
    history["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| p["v"].as_f64().unwrap())
        .collect()
}

async fn history(server: &Server, device: &str) -> Value {
    let (status, body) = server
        .get_json(&format!("/api/devices/{device}/history?metric=temperature"))
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_history_and_ids_outlive_a_restart() {
    let db = Schema::new();
    // `--memory` (which the test harness adds) gives way to the database.
    let mut server = Server::start_with(&["--database-url", &db.url]).await;
    let first = server
        .post_status("rack-1", &json!({ "temperature": 20.5 }))
        .await;
    let second = server
        .post_status(
            "rack-1",
            &json!({ "temperature": 21.5, "metrics": { "load": 0.5 } }),
        )
        .await;
    assert!(second.id > first.id);
    assert_eq!(
        temperatures(&history(&server, "rack-1").await),
        [20.5, 21.5]
    );

    server.restart().await;

    let device = server
        .device("rack-1")
        .await
        .expect("rack-1 is still there");
    assert_eq!(device["status"]["temperature"], 21.5, "{device}");
    assert_eq!(
        temperatures(&history(&server, "rack-1").await),
        [20.5, 21.5]
    );
    // A client that saw the first event resumes from the database (the
    // restarted server's ring is empty).
    let mut stream = server
        .sse_with("", &[("Last-Event-ID", &first.id.to_string())])
        .await;
    stream.expect_retry().await;
    let replayed = stream.expect_status().await;
    assert_eq!(replayed.id(), second.id);
    // Ids go on upward.
    let third = server
        .post_status("rack-1", &json!({ "temperature": 22.5 }))
        .await;
    assert!(third.id > second.id, "{third:?} after {second:?}");
    assert_eq!(stream.expect_status().await.id(), third.id);
    assert_eq!(
        temperatures(&history(&server, "rack-1").await),
        [20.5, 21.5, 22.5]
    );
    let tables = admin(
        &db.base,
        format!(
            "SELECT table_name FROM information_schema.tables \
             WHERE table_schema = '{}' ORDER BY table_name",
            db.name
        ),
    );
    assert!(tables.contains(&"events".to_owned()), "{tables:?}");
    assert!(
        server.output().contains("store in PostgreSQL"),
        "{}",
        server.output()
    );
    assert!(!server.output().contains("memory only"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_together_on_an_empty_database_all_come_up() {
    let db = Schema::new();
    let args = ["--database-url", db.url.as_str()];
    let (one, two, three) = tokio::join!(
        Server::start_with(&args),
        Server::start_with(&args),
        Server::start_with(&args)
    );
    for server in [&one, &two, &three] {
        server.healthz().await;
    }
    let posted = one.post_status("a", &json!({ "temperature": 1.0 })).await;
    assert!(posted.id > 0);
    let version = admin(
        &db.base,
        format!("SELECT version::TEXT FROM {}.schema_version", db.name),
    );
    assert_eq!(version, ["4"], "every migration ran, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_the_database_stops_cleanly() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let db = Schema::new();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_telltale"));
    for var in telltale::server::config::Config::env_vars() {
        command.env_remove(var);
    }
    let mut child = command
        .args([
            "--addr",
            "127.0.0.1:0",
            "--no-simulator",
            "--ingest-token",
            "t",
        ])
        .args(["--database-url", &db.url])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the telltale binary starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = common::within("the server to listen", async {
        loop {
            let line = stdout.next_line().await.unwrap().expect("a listening line");
            if let Some(rest) = line.split("listening on http://").nth(1) {
                return rest.split_whitespace().next().unwrap().to_owned();
            }
        }
    })
    .await;
    let answer = reqwest::Client::new()
        .post(format!("http://{addr}/api/devices/a/status"))
        .bearer_auth("t")
        .json(&json!({ "temperature": 1.0 }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let output = common::within("the server to stop", child.wait_with_output()).await;
    let output = output.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Dropping the store's connections must not panic (the sync client
    // blocks on a runtime of its own when dropped).
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The certificate PostgreSQL serves (a file this machine can read) and the
/// host name it is for.
fn server_certificate(base: &str) -> (String, String) {
    assert_eq!(
        admin(base, "SHOW ssl".into()),
        ["on"],
        "this test needs PostgreSQL with ssl = on (.ci/setup turns it on)"
    );
    let file = admin(base, "SHOW ssl_cert_file".into()).remove(0);
    let file = std::path::Path::new(&admin(base, "SHOW data_directory".into())[0]).join(file);
    let text = std::process::Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-subject",
            "-ext",
            "subjectAltName",
            "-in",
        ])
        .arg(&file)
        .output()
        .expect("openssl runs");
    let text = String::from_utf8_lossy(&text.stdout);
    let name = text
        .split([',', ' ', '\n'])
        .find_map(|part| part.strip_prefix("DNS:"))
        .or_else(|| text.split("CN = ").nth(1)?.lines().next())
        .unwrap_or_else(|| panic!("no host name in {}: {text}", file.display()));
    (file.display().to_string(), name.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sslmode_require_the_store_speaks_verified_tls() {
    let db = Schema::new();
    let (cert, host) = server_certificate(&db.base);
    let app = format!("telltale_tls_{}", db.name);
    let url = db.url.replace("@127.0.0.1:", &format!("@{host}:"))
        + &format!("&sslmode=require&application_name={app}");
    assert!(
        url.contains(&host),
        "{url}: the test database is not on 127.0.0.1"
    );
    let server =
        Server::start_with_env(&["--database-url", &url], &[("SSL_CERT_FILE", &cert)]).await;
    server
        .post_status("rack-1", &json!({ "temperature": 20.5 }))
        .await;
    assert_eq!(temperatures(&history(&server, "rack-1").await), [20.5]);
    let count = |ssl: bool| {
        admin(
            &db.base,
            format!(
                "SELECT COUNT(*)::TEXT FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.application_name = '{app}' AND s.ssl = {ssl}"
            ),
        )
    };
    assert_ne!(count(true), ["0"], "the store's connections use TLS");
    assert_eq!(count(false), ["0"], "and none goes in the clear");

    // A certificate this machine does not trust stops the start, saying why.
    // (Only it: the platform's store may hold PostgreSQL's certificate.)
    let other = common::SelfSigned::new();
    let empty = tempfile::tempdir().unwrap();
    let trusted = [
        ("SSL_CERT_FILE", other.cert.to_str().unwrap()),
        ("SSL_CERT_DIR", empty.path().to_str().unwrap()),
    ];
    let text = common::refused_start(&["--database-url", &url], &trusted).await;
    assert!(text.contains("--database-url"), "{text}");
    assert!(text.contains("certificate"), "{text}");
    assert!(text.contains("SSL_CERT_FILE"), "{text}");
}
