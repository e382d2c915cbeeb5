#![cfg(feature = "ssr")]
//! `--webhook URL`: every recorded change POSTed to the URL, in order,
//! sent again until it answers 2xx, and not lost across a restart.

mod common;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use common::{Nginx, SelfSigned, Server};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A webhook receiver on a free port: what it took, and whether it takes.
#[derive(Clone, Default)]
struct Receiver {
    /// The bodies it answered 200.
    taken: Arc<Mutex<Vec<Value>>>,
    /// Refused while set (503).
    down: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
}

impl Receiver {
    /// Listens; returns its address (its URL is `http://{addr}/hook`).
    async fn listen(&self) -> SocketAddr {
        async fn hook(State(r): State<Receiver>, Json(body): Json<Value>) -> StatusCode {
            if r.down.load(Ordering::SeqCst) {
                r.refused.fetch_add(1, Ordering::SeqCst);
                return StatusCode::SERVICE_UNAVAILABLE;
            }
            r.taken.lock().unwrap().push(body);
            StatusCode::OK
        }
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// Listens; returns its URL.
    async fn start(&self) -> String {
        format!("http://{}/hook", self.listen().await)
    }

    /// `(device, name, kind)` of every change taken, in order.
    fn changes(&self) -> Vec<(String, String, String)> {
        let taken = self.taken.lock().unwrap();
        taken
            .iter()
            .flat_map(|body| body["changes"].as_array().cloned().unwrap_or_default())
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
                (s("device"), s("name"), s("kind"))
            })
            .collect()
    }

    fn texts(&self) -> Vec<String> {
        let taken = self.taken.lock().unwrap();
        taken
            .iter()
            .map(|b| b["text"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

fn change(device: &str, name: &str, kind: &str) -> (String, String, String) {
    (device.into(), name.into(), kind.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_posted_in_order_and_sent_again_until_taken() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    // (Not stale between two posts: that would be a change too.)
    let server = Server::start_with(&["--webhook", &url, "--stale-after", "1h"]).await;
    server
        .post_status("fridge", &json!({"name": "Fridge", "power_on": true}))
        .await;
    common::eventually("the first change is taken", || async {
        receiver.changes() == [change("fridge", "Fridge", "registered")]
    })
    .await;
    // A reading is no change: nothing is posted for it.
    server
        .post_status("fridge", &json!({"temperature": 4.0}))
        .await;

    receiver.down.store(true, Ordering::SeqCst);
    server
        .post_status("fridge", &json!({"power_on": false}))
        .await;
    common::eventually("the refused change is sent again", || async {
        receiver.refused.load(Ordering::SeqCst) >= 2
    })
    .await;
    receiver.down.store(false, Ordering::SeqCst);
    common::eventually("the refused change is taken", || async {
        receiver.changes().len() >= 2
    })
    .await;
    assert_eq!(
        receiver.changes(),
        [
            change("fridge", "Fridge", "registered"),
            change("fridge", "Fridge", "power"),
        ],
        "each once, in order"
    );
    assert_eq!(
        receiver.texts(),
        ["Fridge: First seen", "Fridge: Power off"]
    );
    common::eventually("the log says the URL takes changes again", || async {
        server.output().contains("/…: takes changes again")
    })
    .await;
    let taken = receiver.taken.lock().unwrap().clone();
    let power = &taken[1]["changes"][0];
    assert_eq!(power["on"], false, "{power}");
    assert!(power["id"].is_u64() && power["at"].is_string(), "{power}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_goes_on_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    goes_on_after_a_restart(&["--data-dir", dir.path().to_str().unwrap()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_goes_on_where_it_stopped_in_postgresql() {
    let db = common::Schema::new();
    goes_on_after_a_restart(&["--database-url", &db.url]).await;
}

/// With the store `store` gives: changes made while the URL refuses are
/// taken once it takes them again, after a restart.
async fn goes_on_after_a_restart(store: &[&str]) {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let mut args = store.to_vec();
    args.extend(["--webhook", &url, "--stale-after", "1h"]);
    let mut server = Server::start_with(&args).await;
    server
        .post_status("oven", &json!({"name": "Oven", "power_on": true}))
        .await;
    common::eventually("the first change is taken", || async {
        receiver.changes().len() == 1
    })
    .await;
    receiver.down.store(true, Ordering::SeqCst);
    server
        .post_status("oven", &json!({"power_on": false}))
        .await;
    server
        .post_status("oven", &json!({"name": "Big oven"}))
        .await;
    common::eventually("a try was refused", || async {
        receiver.refused.load(Ordering::SeqCst) >= 1
    })
    .await;
    server.restart().await;
    receiver.down.store(false, Ordering::SeqCst);
    common::eventually("the changes made before the restart are taken", || async {
        receiver.changes().len() >= 3
    })
    .await;
    assert_eq!(
        receiver.changes(),
        [
            change("oven", "Oven", "registered"),
            change("oven", "Big oven", "power"),
            change("oven", "Big oven", "renamed"),
        ]
    );
}

#[tokio::test]
async fn a_url_that_is_not_http_stops_the_start() {
    let text = common::refused_start(&["--memory", "--webhook", "ftp://example.org/x"], &[]).await;
    assert!(
        text.contains("--webhook ftp://example.org/x: not an http:// or https:// URL"),
        "{text}"
    );
    let text = common::refused_start(&["--memory", "--webhook", "no url"], &[]).await;
    assert!(text.contains("--webhook no url: not a URL"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_url_must_show_a_trusted_certificate() {
    let receiver = Receiver::default();
    let certificate = SelfSigned::new();
    let nginx = Nginx::start_tls(&[receiver.listen().await], &certificate).await;
    let url = format!("https://localhost:{}/hook", nginx.addr.port());
    let args = ["--webhook", &url, "--stale-after", "1h"];
    let trusted = certificate.cert.to_str().unwrap();
    let server = Server::start_with_env(&args, &[("SSL_CERT_FILE", trusted)]).await;
    server
        .post_status("kettle", &json!({"power_on": true}))
        .await;
    common::eventually("the change is taken over https", || async {
        receiver.changes() == [change("kettle", "kettle", "registered")]
    })
    .await;

    // A server that trusts another certificate sends nothing, and says why.
    let other = SelfSigned::new();
    let untrusting =
        Server::start_with_env(&args, &[("SSL_CERT_FILE", other.cert.to_str().unwrap())]).await;
    untrusting
        .post_status("teapot", &json!({"power_on": true}))
        .await;
    common::eventually("the refusal is logged", || async {
        untrusting.output().contains("invalid peer certificate")
    })
    .await;
    let output = untrusting.output();
    assert!(
        output.contains("is not signed by a CA this machine trusts"),
        "{output}"
    );
    // The URL's path (a chat webhook's secret) stays out of the log.
    let origin = format!(
        "webhook https://localhost:{}/…: no answer",
        nginx.addr.port()
    );
    assert!(output.contains(&origin), "{output}");
    assert!(!output.contains("/hook"), "{output}");
    assert!(
        receiver
            .changes()
            .iter()
            .all(|(device, ..)| device != "teapot"),
        "{:?}",
        receiver.changes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_on_postgresql_the_instances_take_turns() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let db = common::Schema::new();
    let redis = common::Redis::start().await;
    let args = [
        "--database-url",
        &db.url,
        "--webhook",
        &url,
        "--stale-after",
        "1h",
    ];
    let sends = "takes the webhooks work";
    let (leader, other) = common::leader_and_other(&redis.url(), &args, sends).await;

    other
        .post_status("kettle", &json!({"power_on": true}))
        .await;
    common::eventually("the first change, sent by the one", || async {
        receiver.changes() == [change("kettle", "kettle", "registered")]
    })
    .await;

    // It dies: the other goes on from the place it kept, losing nothing
    // (a batch it had sent but not yet marked may come twice).
    drop(leader);
    other
        .post_status("teapot", &json!({"power_on": true}))
        .await;
    other
        .post_status("kettle", &json!({"power_on": false}))
        .await;
    let expected = [
        change("kettle", "kettle", "registered"),
        change("teapot", "teapot", "registered"),
        change("kettle", "kettle", "power"),
    ];
    common::eventually("the later changes, sent by the other", || async {
        let mut firsts = receiver.changes();
        let mut seen = std::collections::HashSet::new();
        firsts.retain(|c| seen.insert(c.clone()));
        firsts == expected
    })
    .await;
    assert!(other.output().contains(sends));
}
