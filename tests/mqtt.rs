#![cfg(feature = "ssr")]
//! Devices over MQTT (`--mqtt`), through a private `mosquitto` per test:
//! reports, refusals, the online flag and its Last Will, commands and their
//! answers, and what was published while Telltale was away.

mod common;

use common::{SelfSigned, Server, eventually, within};
use reqwest::StatusCode;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A `mosquitto` on a free port of its own, killed when dropped; with
/// [`start_tls`](Self::start_tls), also a TLS listener.
struct Mosquitto {
    _child: Child,
    _dir: tempfile::TempDir,
    port: u16,
    tls_port: Option<u16>,
}

impl Mosquitto {
    async fn start() -> Self {
        Self::start_as(None).await
    }

    /// Plain on `port` (for the test's devices), TLS with `cert` on `tls_port`.
    async fn start_tls(cert: &SelfSigned) -> Self {
        Self::start_as(Some(cert)).await
    }

    async fn start_as(cert: Option<&SelfSigned>) -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let conf = dir.path().join("mosquitto.conf");
        // Run by root, mosquitto would become the user `mosquitto`, which
        // cannot read the key in this test's private directory.
        let mut text = format!(
            "user root\nper_listener_settings false\nallow_anonymous true\npersistence false\n\
             listener {port} 127.0.0.1\n"
        );
        let tls_port = cert.map(|cert| {
            let tls_port = free_port();
            text += &format!(
                "listener {tls_port} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
                cert.cert.display(),
                cert.key.display()
            );
            tls_port
        });
        std::fs::write(&conf, text).expect("the config is written");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto starts (Debian's package mosquitto; .ci/setup installs it)");
        for port in std::iter::once(port).chain(tls_port) {
            eventually("mosquitto listens", || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            })
            .await;
        }
        Mosquitto {
            _child: child,
            _dir: dir,
            port,
            tls_port,
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

/// A device's MQTT connection: what arrives on its subscriptions comes out
/// of `received` as (topic, JSON). Dropping it cuts the connection without
/// a goodbye, so the broker publishes its Last Will.
struct Device {
    id: String,
    client: AsyncClient,
    received: mpsc::UnboundedReceiver<(String, Value)>,
    task: JoinHandle<()>,
}

impl Device {
    /// Connects as `id`, with `online` = `false` (retained) as its Last
    /// Will, subscribed to its `set` and `error` topics.
    async fn connect(broker: &Mosquitto, id: &str) -> Self {
        let mut options = MqttOptions::new(format!("device-{id}"), "127.0.0.1", broker.port);
        options.set_last_will(LastWill::new(
            format!("telltale/{id}/online"),
            "false",
            QoS::AtLeastOnce,
            true,
        ));
        options.set_max_packet_size(64 * 1024, 2 * 1024 * 1024);
        let (client, mut events) = AsyncClient::new(options, 64);
        for topic in ["set", "error"] {
            client
                .subscribe(format!("telltale/{id}/{topic}"), QoS::AtLeastOnce)
                .await
                .expect("subscribes");
        }
        let (sender, received) = mpsc::unbounded_channel();
        let (subscribed, mut acks) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let json =
                            serde_json::from_slice(&p.payload).expect("the server sends JSON");
                        let _ = sender.send((p.topic, json));
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed.send(());
                    }
                    Ok(_) => {}
                    Err(e) => panic!("the device's MQTT connection failed: {e}"),
                }
            }
        });
        for _ in 0..2 {
            within("the device's subscriptions", acks.recv()).await;
        }
        Device {
            id: id.to_owned(),
            client,
            received,
            task,
        }
    }

    async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .expect("published");
    }

    /// Publishes `json` on its own topic `level` (not retained).
    async fn send(&self, level: &str, json: Value) {
        let topic = format!("telltale/{}/{level}", self.id);
        self.publish(&topic, json.to_string(), false).await;
    }

    /// The next message on one of its topics.
    async fn next(&mut self) -> (String, Value) {
        within("a message to the device", self.received.recv())
            .await
            .expect("the device's connection is up")
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn server_on(broker: &Mosquitto, extra: &[&str]) -> Server {
    let url = broker.url();
    let mut args = vec!["--mqtt", url.as_str()];
    args.extend(extra);
    let server = Server::start_with(&args).await;
    eventually("the server's MQTT connection", || async {
        server.output().contains("MQTT: connected")
    })
    .await;
    server
}

#[tokio::test]
async fn reports_over_mqtt_reach_the_stream_and_bad_ones_are_answered() {
    let broker = Mosquitto::start().await;
    let server = server_on(&broker, &[]).await;
    let mut sse = server.sse("").await;
    sse.expect_start().await;
    let mut device = Device::connect(&broker, "attic").await;

    device
        .publish(
            "telltale/attic/status",
            json!({"temperature": 21.5, "name": "Attic", "metrics": {"co2": 640}}).to_string(),
            false,
        )
        .await;
    let event = sse.expect_status().await.json();
    assert_eq!(event["device"], "attic");
    assert_eq!(event["name"], "Attic");
    assert_eq!(event["status"]["temperature"], 21.5);
    assert_eq!(event["status"]["metrics"]["co2"], 640.0);

    // Each refusal is told to the device, and changes nothing.
    let refused = [
        (
            "attic",
            r#"{"temperature": "warm"}"#.to_owned(),
            "temperature",
        ),
        ("attic", r#"{"humidity": 140}"#.to_owned(), "humidity"),
        ("attic", r#"{"temprature": 1}"#.to_owned(), "temprature"),
        ("attic", "[1, 2]".to_owned(), ""),
    ];
    for (id, payload, field) in refused {
        device
            .publish(&format!("telltale/{id}/status"), payload.clone(), false)
            .await;
        let (topic, error) = device.next().await;
        assert_eq!(topic, "telltale/attic/error", "{payload}");
        assert_eq!(error["field"], field, "{payload}: {error}");
        assert!(!error["error"].as_str().unwrap().is_empty());
    }
    let said = [
        ("status", b"{not json".to_vec(), "malformed JSON"),
        ("status", vec![b' '; 17 * 1024], "larger than 16384 bytes"),
        // Far larger than any report: refused the same way, not dropped
        // with the connection (the broker would bring it again, forever).
        ("status", vec![b' '; 1024 * 1024], "larger than 16384 bytes"),
        ("online", b"perhaps".to_vec(), "true or false"),
    ];
    for (level, payload, says) in said {
        device
            .publish(&format!("telltale/attic/{level}"), payload, false)
            .await;
        let (_, error) = device.next().await;
        let text = error["error"].as_str().unwrap();
        assert!(text.contains(says), "{level}: {error}");
    }

    // A bad id is answered on its own topic.
    let mut stranger = Device::connect(&broker, "Not_An_Id").await;
    stranger
        .publish("telltale/Not_An_Id/status", r#"{"temperature": 1}"#, false)
        .await;
    let (topic, error) = stranger.next().await;
    assert_eq!(topic, "telltale/Not_An_Id/error");
    assert_eq!(error["field"], "id");

    // The connection and the server are unharmed: the next report is taken.
    device
        .publish("telltale/attic/status", r#"{"humidity": 40}"#, false)
        .await;
    let event = sse.expect_status().await.json();
    assert_eq!(event["status"]["humidity"], 40.0);
    assert_eq!(event["status"]["temperature"], 21.5);
    assert_eq!(server.device_ids().await, ["attic"]);
}

#[tokio::test]
async fn an_online_device_takes_commands_and_its_last_will_takes_it_offline() {
    let broker = Mosquitto::start().await;
    let server = server_on(&broker, &["--command-timeout", "2s"]).await;
    let mut device = Device::connect(&broker, "pump").await;
    device
        .publish("telltale/pump/status", r#"{"power_on": true}"#, true)
        .await;

    // Reporting alone makes no link: a command has nowhere to go.
    eventually("the pump is known", || async {
        server.device("pump").await.is_some()
    })
    .await;
    let off = json!({"set": {"power_on": false}});
    let (status, body) = server
        .post_command("pump", Some(&server.operator_token), &off)
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    device.publish("telltale/pump/online", "true", true).await;
    eventually("the pump is online", || async {
        server.device("pump").await.unwrap()["online"] == true
    })
    .await;

    // The command goes out on `set`; the device applies it, reports, and
    // answers on `result`; the operator hears `applied`.
    let command = {
        let server = &server;
        let off = off.clone();
        async move {
            server
                .post_command("pump", Some(&server.operator_token), &off)
                .await
        }
    };
    let device_side = async {
        let (topic, command) = device.next().await;
        assert_eq!(topic, "telltale/pump/set");
        assert_eq!(command["set"], json!({"power_on": false}));
        let request_id = command["request_id"].as_str().unwrap().to_owned();
        device
            .publish("telltale/pump/status", r#"{"power_on": false}"#, true)
            .await;
        let answer = json!({"request_id": request_id, "outcome": "applied"});
        device.send("result", answer).await;
        request_id
    };
    let ((status, body), request_id) = tokio::join!(command, device_side);
    assert_eq!(
        (status, &body),
        (StatusCode::OK, &json!({"outcome": "applied"}))
    );
    assert_eq!(
        server.device("pump").await.unwrap()["status"]["power_on"],
        false
    );

    // A refusal comes back with the device's reason.
    let on = json!({"set": {"power_on": true}});
    let command = server.post_command("pump", Some(&server.operator_token), &on);
    let device_side = async {
        let (_, command) = device.next().await;
        let answer = json!({"request_id": command["request_id"], "outcome": "failed",
                            "reason": "the pressure is too low"});
        device.send("result", answer).await;
    };
    let ((status, body), ()) = tokio::join!(command, device_side);
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("the pressure is too low")
    );

    // An answer to no waiting command is refused, by name.
    let answer = json!({"request_id": request_id, "outcome": "applied"});
    device.send("result", answer).await;
    let (topic, error) = device.next().await;
    assert_eq!(topic, "telltale/pump/error");
    assert_eq!(error["field"], "request_id");

    // Cut off without a goodbye: the broker publishes its Last Will, and
    // the pump goes offline; commands fail at once again.
    drop(device);
    eventually("the pump is offline", || async {
        server.device("pump").await.unwrap()["online"] == false
    })
    .await;
    let (status, body) = server
        .post_command("pump", Some(&server.operator_token), &on)
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("no agent"),
        "{body}"
    );
}

#[tokio::test]
async fn reports_published_while_telltale_is_away_are_taken_when_it_is_back() {
    let broker = Mosquitto::start().await;
    let url = format!("{}?client_id=telltale-away-test", broker.url());
    let first = Server::start_with(&["--mqtt", &url]).await;
    eventually("the first server's MQTT connection", || async {
        first.output().contains("MQTT: connected")
    })
    .await;
    // Its session (and subscriptions) stay with the broker.
    drop(first);

    let device = Device::connect(&broker, "well").await;
    for level in 1..=5 {
        device
            .publish(
                "telltale/well/status",
                json!({"metrics": {"level": level}}).to_string(),
                false,
            )
            .await;
    }
    let second = Server::start_with(&["--mqtt", &url]).await;
    eventually("every report is taken", || async {
        second
            .device("well")
            .await
            .is_some_and(|d| d["status"]["metrics"]["level"] == 5.0)
    })
    .await;
    assert_eq!(
        second.history_values("well", "level").await,
        [1.0, 2.0, 3.0, 4.0, 5.0],
        "in order, each once"
    );
}

#[tokio::test]
async fn retained_reports_and_links_are_taken_by_a_new_session() {
    let broker = Mosquitto::start().await;
    let device = Device::connect(&broker, "gate").await;
    device
        .publish(
            "telltale/gate/status",
            r#"{"name": "Gate", "power_on": true}"#,
            true,
        )
        .await;
    device.publish("telltale/gate/online", "true", true).await;

    // A Telltale the broker has never seen: it learns the device's state
    // and link from the retained messages.
    let server = server_on(&broker, &[]).await;
    eventually("the gate, online", || async {
        server
            .device("gate")
            .await
            .is_some_and(|d| d["online"] == true && d["name"] == "Gate")
    })
    .await;
}

#[tokio::test]
async fn a_bad_mqtt_url_stops_the_start() {
    for (args, says) in [
        (
            vec!["--mqtt", "http://broker:1883"],
            "expected mqtt://HOST:PORT",
        ),
        (
            vec!["--mqtt", "mqtt://broker?qos=1"],
            "unknown or empty URL parameter `qos`",
        ),
        (
            vec!["--mqtt", "mqtt://broker", "--mqtt-topic", "a/+"],
            "no + or #",
        ),
    ] {
        let output = common::refused_start(&args, &[]).await;
        assert!(output.contains(says), "{args:?}: {output}");
    }
}

#[tokio::test]
async fn reports_the_store_cannot_take_come_again_until_it_can() {
    let broker = Mosquitto::start().await;
    let mut redis = common::Redis::start().await;
    let url = broker.url();
    let server = Server::start_in_cluster(&redis.url(), &["--mqtt", &url]).await;
    eventually("the server's MQTT connection", || async {
        server.output().contains("MQTT: connected")
    })
    .await;
    let device = Device::connect(&broker, "boiler").await;
    let temperature = |t: f64| json!({ "temperature": t }).to_string();
    device
        .publish("telltale/boiler/status", temperature(60.0), false)
        .await;
    let temperature_is = |t: f64| {
        let server = &server;
        move || async move {
            server
                .device("boiler")
                .await
                .is_some_and(|d| d["status"]["temperature"] == t)
        }
    };
    eventually("the first report", temperature_is(60.0)).await;

    // Redis goes away: the instance takes no change, and keeps the reports.
    redis.stop().await;
    eventually("the instance to say it is degraded", || async {
        server.get_json("/healthz").await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    for t in [61.0, 62.0] {
        device
            .publish("telltale/boiler/status", temperature(t), false)
            .await;
    }
    eventually("a report is refused", || async {
        server.output().contains("connecting again")
    })
    .await;
    assert!(temperature_is(60.0)().await);

    redis.resume().await;
    eventually("the kept reports are taken", temperature_is(62.0)).await;
    assert_eq!(
        server.history_values("boiler", "temperature").await,
        [60.0, 61.0, 62.0],
        "in order, each once"
    );
}

#[tokio::test]
async fn mqtts_checks_the_brokers_certificate() {
    let certificate = SelfSigned::new();
    let broker = Mosquitto::start_tls(&certificate).await;
    let url = format!("mqtts://localhost:{}", broker.tls_port.unwrap());
    let trusted = certificate.cert.to_str().unwrap();
    let server = Server::start_with_env(&["--mqtt", &url], &[("SSL_CERT_FILE", trusted)]).await;
    eventually("the connection over TLS", || async {
        server.output().contains("MQTT: connected")
    })
    .await;
    let device = Device::connect(&broker, "vault").await;
    device
        .publish("telltale/vault/status", r#"{"humidity": 35}"#, false)
        .await;
    eventually("the report over TLS", || async {
        server
            .device("vault")
            .await
            .is_some_and(|d| d["status"]["humidity"] == 35.0)
    })
    .await;

    // Trusting another certificate, it takes nothing, and says why.
    let other = SelfSigned::new();
    let untrusting = Server::start_with_env(
        &["--mqtt", &url],
        &[("SSL_CERT_FILE", other.cert.to_str().unwrap())],
    )
    .await;
    eventually("the refusal is logged", || async {
        untrusting
            .output()
            .contains("not signed by a CA this machine trusts")
    })
    .await;
    assert!(!untrusting.output().contains("MQTT: connected"));
}

#[tokio::test]
async fn in_a_cluster_one_instance_takes_the_messages_and_another_takes_over() {
    let broker = Mosquitto::start().await;
    let redis = common::Redis::start().await;
    let url = broker.url();
    let (leader, other) =
        common::leader_and_other(&redis.url(), &["--mqtt", &url], "MQTT: connected").await;

    let mut sse = other.sse("").await;
    sse.expect_start().await;
    let device = Device::connect(&broker, "silo").await;
    let level = |l: f64| json!({ "metrics": { "level": l } });
    device.send("status", level(1.0)).await;
    let event = sse.expect_status().await.json();
    assert_eq!(event["status"]["metrics"]["level"], 1.0);

    // The leader dies holding the lease; what is published meanwhile waits
    // in the broker for the next one.
    drop(leader);
    for l in [2.0, 3.0] {
        device.send("status", level(l)).await;
    }
    for l in [2.0, 3.0] {
        let event = sse.expect_status().await.json();
        assert_eq!(event["status"]["metrics"]["level"], l, "{event}");
    }
    assert!(other.output().contains("MQTT: connected"));
}

#[tokio::test]
async fn a_stopping_instance_gives_its_lease_up() {
    let broker = Mosquitto::start().await;
    let redis = common::Redis::start().await;
    let url = broker.url();
    let mut server = Server::start_in_cluster(&redis.url(), &["--mqtt", &url]).await;
    eventually("the MQTT connection", || async {
        server.output().contains("MQTT: connected")
    })
    .await;
    let holder = || -> Option<String> {
        let mut redis = redis::Client::open(redis.url())
            .and_then(|c| c.get_connection())
            .expect("Redis answers");
        redis::cmd("GET")
            .arg("telltale:lease:mqtt")
            .query(&mut redis)
            .expect("GET")
    };
    assert!(holder().is_some());
    server.signal("TERM");
    assert_eq!(server.exited().await, Some(0), "{}", server.output());
    assert_eq!(holder(), None, "the next instance need not wait");
}
