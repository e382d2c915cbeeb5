#![cfg(feature = "ssr")]
//! Cluster mode: several instances on one Redis (a private `redis-server`
//! per test) share one stream, one set of event ids and one state.

mod common;

use common::{
    Nginx, Redis, Schema, SelfSigned, Server, SseStream, Ws, admin, answer_next_command, command,
    eventually, within,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

async fn instances(redis: &Redis, n: usize) -> Vec<Server> {
    let mut servers = Vec::new();
    for _ in 0..n {
        servers.push(Server::start_in_cluster(&redis.url(), &[]).await);
    }
    servers
}

/// An SSE stream on each of `servers`, and the event id their snapshots all
/// start from (the instances agree on where the cluster is).
async fn streams_from_one_start(servers: &[Server]) -> (Vec<SseStream>, u64) {
    let mut streams = Vec::new();
    let mut start = None;
    for server in servers {
        let mut stream = server.sse("").await;
        let snapshot = stream.expect_start().await;
        assert_eq!(*start.get_or_insert(snapshot.id), snapshot.id);
        streams.push(stream);
    }
    (streams, start.expect("some servers"))
}

/// The next `n` status events of `stream`, as (id, device, temperature).
async fn statuses(stream: &mut SseStream, n: usize) -> Vec<(u64, String, f64)> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let record = stream.expect_status().await;
        let data = record.json();
        seen.push((
            record.id(),
            data["device"].as_str().unwrap().to_owned(),
            data["status"]["temperature"].as_f64().unwrap(),
        ));
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_on_one_instance_reaches_every_client_of_every_instance_once_in_order() {
    let redis = Redis::start().await;
    let servers = instances(&redis, 3).await;
    let (mut streams, start) = streams_from_one_start(&servers).await;
    let mut viewers = Vec::new();
    for server in &servers {
        let mut viewer = server.viewer().await;
        viewer.send(&json!({"type": "subscribe"})).await;
        assert_eq!(viewer.expect("snapshot").await["id"], json!(start));
        viewers.push(viewer);
    }
    // Posts to every instance in turn, some concurrently.
    let mut posted = Vec::new();
    for round in 0..10 {
        let posts = servers.iter().enumerate().map(|(i, server)| async move {
            let temp = f64::from(round * 10 + i as u32);
            let answer = server
                .post_status(&format!("dev-{i}"), &json!({ "temperature": temp }))
                .await;
            assert!(answer.changed);
            (answer.id, format!("dev-{i}"), temp)
        });
        posted.extend(futures::future::join_all(posts).await);
    }
    posted.sort_by_key(|p| p.0);
    let first = start + 1;
    let ids: Vec<u64> = posted.iter().map(|p| p.0).collect();
    assert_eq!(
        ids,
        (first..first + 30).collect::<Vec<_>>(),
        "global ids, one per change, no gap"
    );
    for stream in &mut streams {
        assert_eq!(statuses(stream, 30).await, posted);
    }
    for viewer in &mut viewers {
        for (id, device, temp) in &posted {
            let status = viewer.expect("status").await;
            assert_eq!(status["id"], json!(id));
            assert_eq!(status["data"]["device"], json!(device));
            assert_eq!(status["data"]["status"]["temperature"], json!(temp));
        }
    }
    // The same state everywhere.
    let (_, reference) = servers[0].get_json("/api/devices").await;
    for server in &servers[1..] {
        assert_eq!(server.get_json("/api/devices").await.1, reference);
    }
    assert_eq!(reference["event_id"], json!(first + 29));
}

#[tokio::test(flavor = "multi_thread")]
async fn many_writers_on_every_instance_at_once_get_one_id_each_in_one_order() {
    // Each instance writes the updates that wait together as one group (one
    // commit, one append to Redis); groups of different instances race for
    // the same ids, and the losers catch up and compute theirs again.
    let redis = Redis::start().await;
    let servers = instances(&redis, 3).await;
    let (mut streams, start) = streams_from_one_start(&servers).await;
    const WRITERS: usize = 18;
    const EACH: usize = 10;
    let writers = (0..WRITERS).map(|w| {
        let server = &servers[w % servers.len()];
        async move {
            let mut acked = Vec::new();
            for n in 0..EACH {
                // Half to a device every writer shares.
                let device = match n % 2 {
                    0 => "shared".to_owned(),
                    _ => format!("own-{w}"),
                };
                let temp = (w * 100 + n) as f64;
                let answer = server
                    .post_status(&device, &json!({ "temperature": temp }))
                    .await;
                assert!(answer.changed);
                acked.push((answer.id, device, temp));
            }
            acked
        }
    });
    let mut posted: Vec<_> = futures::future::join_all(writers)
        .await
        .into_iter()
        .flatten()
        .collect();
    posted.sort_by_key(|p| p.0);
    let first = start + 1;
    let ids: Vec<u64> = posted.iter().map(|p| p.0).collect();
    let all = (WRITERS * EACH) as u64;
    assert_eq!(ids, (first..first + all).collect::<Vec<_>>());
    for stream in &mut streams {
        assert_eq!(statuses(stream, all as usize).await, posted);
    }
    let (_, reference) = servers[0].get_json("/api/devices").await;
    for server in &servers[1..] {
        assert_eq!(server.get_json("/api/devices").await.1, reference);
    }
    let last_shared = posted.iter().rev().find(|p| p.1 == "shared").unwrap().2;
    let shared = servers[2].device("shared").await.unwrap();
    assert_eq!(shared["status"]["temperature"], json!(last_shared));
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_on_every_instance_at_once_keep_together_in_one_order() {
    // A batch is one group: its events get ids one after another, however
    // the instances race.
    let redis = Redis::start().await;
    let servers = instances(&redis, 3).await;
    let (mut streams, start) = streams_from_one_start(&servers).await;
    const BATCHES: usize = 6;
    const EACH: usize = 5;
    let posts = (0..BATCHES).map(|b| {
        let server = &servers[b % servers.len()];
        async move {
            let temp = |d: usize| (b * 100 + d) as f64;
            let body: serde_json::Map<String, Value> = (0..EACH)
                .map(|d| (format!("b{b}-d{d}"), json!({ "temperature": temp(d) })))
                .collect();
            let response = server
                .client
                .post(server.url("/api/status"))
                .bearer_auth(&server.token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let answer: Value = response.json().await.unwrap();
            (0..EACH)
                .map(|d| {
                    let device = format!("b{b}-d{d}");
                    let id = answer["devices"][&device]["id"].as_u64().unwrap();
                    (id, device, temp(d))
                })
                .collect::<Vec<_>>()
        }
    });
    let batches = futures::future::join_all(posts).await;
    for batch in &batches {
        let ids: Vec<u64> = batch.iter().map(|p| p.0).collect();
        assert_eq!(ids, (ids[0]..ids[0] + EACH as u64).collect::<Vec<_>>());
    }
    let mut posted: Vec<_> = batches.into_iter().flatten().collect();
    posted.sort_by_key(|p| p.0);
    let all = (BATCHES * EACH) as u64;
    let ids: Vec<u64> = posted.iter().map(|p| p.0).collect();
    assert_eq!(ids, (start + 1..=start + all).collect::<Vec<_>>());
    for stream in &mut streams {
        assert_eq!(statuses(stream, all as usize).await, posted);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_of_a_killed_instance_resumes_on_another_without_gap_or_duplicate() {
    let redis = Redis::start().await;
    let mut servers = instances(&redis, 2).await;
    let survivor = servers.pop().unwrap();
    let doomed = servers.pop().unwrap();
    let mut stream = doomed.sse("").await;
    stream.expect_start().await;
    for i in 0..5 {
        doomed
            .post_status("probe", &json!({ "temperature": f64::from(i) }))
            .await;
    }
    let seen = statuses(&mut stream, 5).await;
    let last_seen = seen.last().unwrap().0;
    drop(stream);
    drop(doomed);
    let mut missed = Vec::new();
    for i in 5..12 {
        let temp = f64::from(i);
        let id = survivor
            .post_status("probe", &json!({ "temperature": temp }))
            .await
            .id;
        missed.push((id, "probe".to_owned(), temp));
    }
    let mut resumed = survivor
        .sse_with("", &[("last-event-id", &last_seen.to_string())])
        .await;
    resumed.expect_retry().await;
    assert_eq!(statuses(&mut resumed, missed.len()).await, missed);
    assert_eq!(missed[0].0, last_seen + 1);
}

/// Posts a new temperature to one of `servers` in turn until `stop`;
/// returns every acknowledged (id, device, temperature) and how many posts
/// were refused with 503.
async fn publish_until(
    servers: &[Server],
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Vec<(u64, String, f64)>, usize) {
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0u32.. {
        if *stop.borrow() {
            break;
        }
        let server = &servers[i as usize % servers.len()];
        let device = format!("load-{}", i % 3);
        let temp = f64::from(i);
        let (status, body) = server
            .try_post_status(&device, &json!({ "temperature": temp }))
            .await;
        match status {
            StatusCode::OK => acked.push((body["id"].as_u64().unwrap(), device, temp)),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(
                    body["error"].as_str().unwrap().contains("Redis"),
                    "a refusal says why: {body}"
                );
                refused += 1;
            }
            other => panic!("POST answered {other}: {body}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    (acked, refused)
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_going_away_loses_no_acknowledged_update() {
    let mut redis = Redis::start().await;
    let servers = instances(&redis, 2).await;
    let start = servers[0].healthz().await["event_id"].as_u64().unwrap();
    // Viewers on either transport are told the instance is degraded, and
    // then that it is back.
    let mut sse = servers[1].sse("").await;
    let sse_health = tokio::spawn(async move {
        let mut told = Vec::new();
        // Up to the first `null` after a reason.
        while told.last().is_none_or(Value::is_string) {
            let record = sse.next().await;
            if record.event() == "health" {
                told.push(record.json()["degraded"].clone());
            }
        }
        told
    });
    let mut ws = servers[1].viewer().await;
    ws.send(&json!({"type": "subscribe"})).await;
    let ws_health = tokio::spawn(async move {
        let mut told = Vec::new();
        while told.last().is_none_or(Value::is_string) {
            let message = ws.next().await;
            if message["type"] == "health" {
                told.push(message["data"]["degraded"].clone());
            }
        }
        told
    });
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = async {
        let servers = &servers;
        let (acked, refused) = publish_until(servers, stopped).await;
        (acked, refused)
    };
    let outage = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        // Redis dies, losing all it held, and comes back empty.
        redis.stop().await;
        for server in &servers {
            eventually("the instance to say it is degraded", || async {
                let (status, body) = server.get_json("/healthz").await;
                status == StatusCode::SERVICE_UNAVAILABLE && body["status"] == "degraded"
            })
            .await;
        }
        // Reading goes on from the last known state.
        let (status, devices) = servers[1].get_json("/api/devices").await;
        assert_eq!(status, StatusCode::OK);
        assert!(!devices["devices"].as_array().unwrap().is_empty());
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        redis.resume().await;
        for server in &servers {
            eventually("the instance to rejoin", || async {
                server.get_json("/healthz").await.0 == StatusCode::OK
            })
            .await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        stop.send(true).unwrap();
    };
    let ((acked, refused), ()) = tokio::join!(load, outage);
    for told in [sse_health.await.unwrap(), ws_health.await.unwrap()] {
        assert!(told[0].is_string(), "first told degraded, then: {told:?}");
        assert_eq!(told.last(), Some(&Value::Null), "{told:?}");
    }
    assert!(refused > 0, "writes during the outage are refused");
    assert!(
        acked.len() > 20,
        "only {} updates went through",
        acked.len()
    );
    let last = acked.iter().map(|a| a.0).max().unwrap();
    // Every instance holds every acknowledged update, under its id.
    for server in &servers {
        let mut stream = server
            .sse_with("", &[("last-event-id", &start.to_string())])
            .await;
        stream.expect_retry().await;
        let mut events = BTreeMap::new();
        within("the replay up to the last acknowledged id", async {
            while events.last_key_value().is_none_or(|(id, _)| *id < last) {
                let record = stream.expect_status().await;
                let data: Value = record.json();
                events.insert(
                    record.id(),
                    (
                        data["device"].as_str().unwrap().to_owned(),
                        data["status"]["temperature"].as_f64().unwrap(),
                    ),
                );
            }
        })
        .await;
        for (id, device, temp) in &acked {
            assert_eq!(
                events.get(id),
                Some(&(device.clone(), *temp)),
                "acknowledged event {id} missing on {}",
                server.base_url
            );
        }
    }
    // And both agree on the current state.
    assert_eq!(
        servers[0].get_json("/api/devices").await.1,
        servers[1].get_json("/api/devices").await.1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn through_nginx_clients_see_every_change_once_and_outlive_an_instance() {
    let redis = Redis::start().await;
    let mut servers = instances(&redis, 3).await;
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let nginx = Nginx::start(&addrs).await;
    let front = servers[0].front(nginx.addr);
    let mut stream = front.sse("").await;
    let start = stream.expect_start().await.id;
    let mut viewer = front.viewer().await;
    viewer.send(&json!({"type": "subscribe"})).await;
    viewer.expect("snapshot").await;
    let post = |i: u32| {
        let front = &front;
        async move {
            let temp = f64::from(i);
            let id = front
                .post_status("front", &json!({ "temperature": temp }))
                .await
                .id;
            (id, "front".to_owned(), temp)
        }
    };
    let mut posted = Vec::new();
    for i in 0..9 {
        posted.push(post(i).await);
    }
    // Round robin spread the posts over the instances; the ids still follow
    // one another, and every client sees each change once, in order.
    let ids: Vec<u64> = posted.iter().map(|p| p.0).collect();
    assert_eq!(ids, (start + 1..=start + 9).collect::<Vec<_>>());
    assert_eq!(statuses(&mut stream, 9).await, posted);
    for (id, _, temp) in &posted {
        let status = viewer.expect("status").await;
        assert_eq!(status["id"], json!(id));
        assert_eq!(status["data"]["status"]["temperature"], json!(temp));
    }
    // An instance dies: nginx sends what follows to the others, and a
    // client resumes from its last id wherever it lands.
    let last_seen = posted.last().unwrap().0;
    drop(stream);
    drop(servers.remove(0));
    let mut missed = Vec::new();
    for i in 9..15 {
        missed.push(post(i).await);
    }
    let mut resumed = front
        .sse_with("", &[("last-event-id", &last_seen.to_string())])
        .await;
    resumed.expect_retry().await;
    assert_eq!(statuses(&mut resumed, missed.len()).await, missed);
    assert_eq!(missed[0].0, last_seen + 1);
    // An operator and an agent, each wherever nginx sends them: the command
    // goes through, and its result comes back.
    let mut agent = front.agent("relay").await;
    let mut operator = front.operator().await;
    operator
        .send(&json!({"type": "command", "device": "relay",
                      "set": {"power_on": true}, "request_id": "n-1"}))
        .await;
    assert_eq!(operator.expect("ack").await["request_id"], "n-1");
    let command = agent.expect("command").await;
    agent
        .send(
            &json!({"type": "result", "request_id": command["request_id"],
                      "outcome": "applied"}),
        )
        .await;
    assert_eq!(operator.expect("result").await["outcome"], "applied");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_on_one_instance_reaches_the_agent_on_another_and_its_result_comes_back() {
    let redis = Redis::start().await;
    let servers = instances(&redis, 2).await;
    let (near, far) = (&servers[0], &servers[1]);
    let mut agent = far.agent("lamp").await;
    agent
        .send(&json!({"type": "status", "device": "lamp", "update": {"power_on": true}}))
        .await;
    eventually("the agent's report on the other instance", || async {
        near.device("lamp")
            .await
            .is_some_and(|d| d["status"]["power_on"] == true && d["online"] == true)
    })
    .await;
    let mut operator = near.operator().await;
    for (i, apply) in [(1, true), (2, false)] {
        let request_id = format!("r-{i}");
        operator
            .send(&json!({"type": "command", "device": "lamp",
                          "set": {"power_on": false}, "request_id": request_id}))
            .await;
        assert_eq!(
            operator.expect("ack").await["request_id"],
            json!(request_id)
        );
        let command = agent.expect("command").await;
        assert_eq!(command["set"], json!({"power_on": false}));
        if apply {
            agent
                .send(&json!({"type": "status", "device": "lamp",
                              "update": {"power_on": false}}))
                .await;
        }
        agent
            .send(
                &json!({"type": "result", "request_id": command["request_id"],
                          "outcome": if apply { "applied" } else { "failed" },
                          "reason": if apply { Value::Null } else { json!("relay stuck") }}),
            )
            .await;
        let result = operator.expect("result").await;
        assert_eq!(result["request_id"], json!(request_id));
        if apply {
            assert_eq!(result["outcome"], "applied", "{result}");
            assert_eq!(
                near.device("lamp").await.unwrap()["status"]["power_on"],
                false
            );
        } else {
            assert_eq!(result["outcome"], "failed", "{result}");
            assert_eq!(result["reason"], "relay stuck");
        }
    }
    // Once the agent is gone, a command fails at once, from either side.
    drop(agent);
    eventually("the agent's departure on the other instance", || async {
        near.device("lamp")
            .await
            .is_some_and(|d| d["online"] == false)
    })
    .await;
    operator
        .send(&json!({"type": "command", "device": "lamp",
                      "set": {"power_on": true}, "request_id": "r-3"}))
        .await;
    let result = operator.expect("result").await;
    assert_eq!(result["outcome"], "failed");
    assert!(
        result["reason"].as_str().unwrap().contains("no agent"),
        "{result}"
    );
}

/// An agent for `device` on `host`, once its report is seen on `watcher`
/// (so no event of it is still on its way), and `watcher`'s stream of that
/// device, started.
async fn agent_watched(host: &Server, watcher: &Server, device: &str) -> (Ws, SseStream) {
    let mut agent = host.agent(device).await;
    agent
        .send(&json!({"type": "status", "device": device, "update": {"power_on": true}}))
        .await;
    eventually("the agent's device online, as reported", || async {
        watcher
            .device(device)
            .await
            .is_some_and(|d| d["online"] == true && d["status"]["power_on"] == true)
    })
    .await;
    let mut stream = watcher.sse(&format!("?device={device}")).await;
    stream.expect_start().await;
    (agent, stream)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_device_of_an_agent_on_an_instance_that_dies_goes_offline_once() {
    let redis = Redis::start().await;
    let mut servers = instances(&redis, 3).await;
    let (_agent, mut stream) = agent_watched(&servers[2], &servers[0], "far-1").await;

    // The instance dies with its agent's connection; nobody tells the others.
    drop(servers.pop());
    let offline = stream.expect_status().await;
    assert_eq!(offline.json()["online"], false, "{:?}", offline.json());
    for server in &servers {
        assert_eq!(server.device("far-1").await.unwrap()["online"], false);
        let (status, body) = server
            .post_command(
                "far-1",
                Some(&server.operator_token.clone()),
                &json!({"set": {"power_on": false}}),
            )
            .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    }
    // Once, though both survivors saw it: no second event.
    let again = tokio::time::timeout(Duration::from_secs(3), stream.expect_status()).await;
    assert!(
        again.is_err(),
        "a second event: {:?}",
        again.map(|e| e.json())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_device_of_an_agent_on_a_frozen_instance_goes_offline_and_back_when_it_thaws() {
    let redis = Redis::start().await;
    // The test's agent answers no pings: long enough for the freeze.
    let mut servers = Vec::new();
    for _ in 0..2 {
        let patient = ["--agent-timeout", "60s"];
        servers.push(Server::start_in_cluster(&redis.url(), &patient).await);
    }
    let (_agent, mut stream) = agent_watched(&servers[1], &servers[0], "far-2").await;

    // Frozen, its connections stay open (Redis still counts its
    // subscription, as it would for a host that vanished without a word),
    // but it no longer renews its sign of life.
    servers[1].signal("STOP");
    let offline = stream.expect_status().await;
    servers[1].signal("CONT");
    assert_eq!(offline.json()["online"], false, "{:?}", offline.json());
    // Thawed, it still has the agent's connection, and says so.
    let online = stream.expect_status().await;
    assert_eq!(online.json()["online"], true, "{:?}", online.json());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_agent_on_another_instance_replaces_the_older_which_is_told() {
    let redis = Redis::start().await;
    let servers = instances(&redis, 2).await;
    let mut older = servers[0].agent("lamp").await;
    eventually("the older agent online on both", || async {
        servers[1]
            .device("lamp")
            .await
            .is_some_and(|d| d["online"] == true)
    })
    .await;
    let mut newer = servers[1].agent("lamp").await;
    let (code, reason) = older.expect_close().await;
    assert_eq!(code, 4409, "{reason}");
    // Commands from either instance reach the newer agent, and the device
    // never went offline.
    for (i, server) in servers.iter().enumerate() {
        let mut operator = server.operator().await;
        let request_id = format!("r-{i}");
        operator.send(&command("lamp", true, &request_id)).await;
        assert_eq!(
            operator.expect("ack").await["request_id"],
            json!(request_id)
        );
        answer_next_command(&mut newer, "lamp", true).await;
        assert_eq!(operator.expect("result").await["outcome"], "applied");
        assert_eq!(server.device("lamp").await.unwrap()["online"], true);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_notice_of_replacement_leaves_the_newer_agent_in_place() {
    // Agents of one device reconnecting to two instances at once: the
    // notice that an older agent sent to this instance arrives after a
    // newer agent connected here. It must not close the newer one (the
    // other instance closes its own, told by this one), or no agent would
    // be left while the device shows online.
    let redis = Redis::start().await;
    let servers = instances(&redis, 2).await;
    let (mut agent, _) = agent_watched(&servers[1], &servers[0], "gate").await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let holder: String = redis::cmd("HGET")
        .arg("telltale:agents")
        .arg("gate")
        .query(&mut conn)
        .unwrap();
    let late = json!({"kind": "replaced", "device": "gate"}).to_string();
    let listening: usize = redis::cmd("PUBLISH")
        .arg(format!("telltale:commands:{holder}"))
        .arg(late)
        .query(&mut conn)
        .unwrap();
    assert_eq!(listening, 1, "the agent's instance listens for relays");

    let mut operator = servers[0].operator().await;
    operator.send(&command("gate", false, "late-1")).await;
    assert_eq!(operator.expect("ack").await["request_id"], "late-1");
    answer_next_command(&mut agent, "gate", true).await;
    assert_eq!(operator.expect("result").await["outcome"], "applied");
    for server in &servers {
        assert_eq!(server.device("gate").await.unwrap()["online"], true);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unchanged_report_to_one_instance_keeps_the_device_fresh_on_all() {
    let redis = Redis::start().await;
    let mut servers = Vec::new();
    for _ in 0..2 {
        servers.push(Server::start_in_cluster(&redis.url(), &["--stale-after", "1s"]).await);
    }
    let (reported_to, other) = (&servers[0], &servers[1]);
    let body = json!({ "temperature": 5.0 });
    reported_to.post_status("steady", &body).await;
    // The same reading every 300 ms for 3 s: no event, but a sign of life.
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!reported_to.post_status("steady", &body).await.changed);
    }
    for server in &servers {
        let device = server.device("steady").await.unwrap();
        assert_ne!(device["stale"], true, "{device}");
    }
    // Silence is noticed everywhere all the same.
    eventually(
        "the silent device to be stale on the other instance",
        || async { other.device("steady").await.unwrap()["stale"] == true },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_set_on_one_instance_hold_on_every_instance() {
    let redis = Redis::start().await;
    let servers = instances(&redis, 2).await;
    let (set_on, other) = (&servers[0], &servers[1]);
    set_on
        .post_status("oven", &json!({ "temperature": 20.0 }))
        .await;
    let (status, body) = send_json_put(
        set_on,
        "/api/devices/oven/thresholds",
        &json!({ "temperature": { "max": 30.0 } }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A reading over the limit, reported to the *other* instance, alerts.
    other
        .post_status("oven", &json!({ "temperature": 35.0 }))
        .await;
    for server in &servers {
        eventually("the alert on every instance", || async {
            server.device("oven").await.unwrap()["alerts"]["temperature"].is_object()
        })
        .await;
        let oven = server.device("oven").await.unwrap();
        assert_eq!(oven["limits"]["temperature"]["max"], 30.0, "{oven}");
    }
    // The limits were news once in the cluster, whoever published it.
    let kinds = change_kinds(other, "oven").await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "limits").count(),
        1,
        "{kinds:?}"
    );
    let (_, thresholds) = other.get_json("/api/thresholds").await;
    assert_eq!(
        thresholds["devices"]["oven"]["temperature"]["max"],
        json!(30.0),
        "{thresholds}"
    );
    // An instance that joins later has them too.
    let late = Server::start_in_cluster(&redis.url(), &[]).await;
    late.post_status("oven", &json!({ "temperature": 36.0 }))
        .await;
    assert!(late.device("oven").await.unwrap()["alerts"]["temperature"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_read_again_while_redis_is_away_are_applied_once_it_is_back() {
    let mut redis = Redis::start().await;
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), "[devices.oven]\ntemperature = { max = 30 }\n").unwrap();
    let path = file.path().to_str().unwrap();
    let server = Server::start_in_cluster(&redis.url(), &["--thresholds", path]).await;
    server
        .post_status("oven", &json!({ "temperature": 35.0 }))
        .await;
    let alert = || async { server.device("oven").await.unwrap()["alerts"]["temperature"].clone() };
    assert_eq!(alert().await["max"], 30.0);

    redis.stop().await;
    eventually("degraded", || async {
        server.get_json("/healthz").await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    std::fs::write(file.path(), "[devices.oven]\ntemperature = { max = 40 }\n").unwrap();
    server.signal("HUP");
    eventually("the reload in the log", || async {
        server.output().contains("thresholds file read again, but")
    })
    .await;
    // Nothing can be published meanwhile: the alert stands.
    assert!(alert().await.is_object());
    redis.resume().await;
    eventually("the alert cleared once the cluster is back", || async {
        alert().await.is_null()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_removed_on_one_instance_is_gone_from_every_instance_and_a_later_one() {
    let redis = Redis::start().await;
    let servers = instances(&redis, 2).await;
    let (removed_on, other) = (&servers[0], &servers[1]);
    removed_on
        .post_status("old-rig", &json!({ "temperature": 20.0 }))
        .await;
    other
        .post_status("kept", &json!({ "temperature": 5.0 }))
        .await;
    // Each instance records the changes it follows in its own store.
    eventually("the other instance recorded the registration", || async {
        change_kinds(other, "old-rig").await == ["registered"]
    })
    .await;
    let (mut streams, _) = streams_from_one_start(&servers).await;
    let (status, body) = removed_on
        .remove("old-rig", Some(&removed_on.operator_token))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for (server, stream) in servers.iter().zip(&mut streams) {
        let record = stream.expect_status().await;
        assert_eq!(record.id(), body["id"].as_u64().unwrap());
        assert_eq!(record.json()["removed"], true);
        assert_eq!(server.device("old-rig").await, None);
        let (status, _) = server.get_json("/api/devices/old-rig/changes").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    // The cluster's shared state forgot it: a new instance never sees it.
    let late = Server::start_in_cluster(&redis.url(), &[]).await;
    assert_eq!(late.device_ids().await, ["kept"]);
    // Removed once: the other instance has nothing left to remove.
    let (status, _) = other.remove("old-rig", Some(&other.operator_token)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_signed_in_on_one_instance_is_signed_in_on_all_until_signed_out() {
    let redis = Redis::start().await;
    let servers = instances(&redis, 2).await;
    let (kept, ended) = (servers[0].sign_in().await, servers[0].sign_in().await);
    for server in &servers {
        assert!(server.signed_in(&kept).await);
        assert!(server.signed_in(&ended).await);
    }
    servers[1].sign_out(&ended).await;
    for server in &servers {
        eventually("the sign-out on every instance", || async {
            !server.signed_in(&ended).await
        })
        .await;
        assert!(server.signed_in(&kept).await);
    }
    // An instance that joins later knows the sign-out too.
    let late = Server::start_in_cluster(&redis.url(), &[]).await;
    assert!(late.signed_in(&kept).await);
    assert!(!late.signed_in(&ended).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_share_one_stream_over_tls_to_redis() {
    let cert = SelfSigned::new();
    let redis = Redis::start_tls(&cert).await;
    assert!(redis.url().starts_with("rediss://"));
    let env = [("SSL_CERT_FILE", cert.cert.to_str().unwrap())];
    let a = Server::start_in_cluster_with_env(&redis.url(), &[], &env).await;
    let b = Server::start_in_cluster_with_env(&redis.url(), &[], &env).await;
    let mut stream = b.sse("").await;
    stream.expect_start().await;
    let posted = a
        .post_status("tls-1", &json!({ "temperature": 20.0 }))
        .await;
    let event = stream.expect_status().await;
    assert_eq!(
        (event.id(), event.json()["device"].as_str()),
        (posted.id, Some("tls-1"))
    );
    assert_eq!(b.healthz().await["status"], "ok");

    // An instance that does not trust the certificate cannot join, says
    // why, and accepts nothing.
    let other = SelfSigned::new();
    let env = [("SSL_CERT_FILE", other.cert.to_str().unwrap())];
    let stranger = Server::start_in_cluster_with_env(&redis.url(), &[], &env).await;
    let (status, health) = stranger.get_json("/healthz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{health}");
    assert_eq!(health["status"], "degraded", "{health}");
    let reason = health["reason"].as_str().unwrap();
    assert!(
        reason.contains("certificate") && reason.contains("SSL_CERT_FILE"),
        "{health}"
    );
    let (status, _) = stranger
        .try_post_status("tls-1", &json!({ "temperature": 21.0 }))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

async fn send_json_put(server: &Server, path: &str, body: &Value) -> (StatusCode, Value) {
    let response = within(
        "a PUT answer",
        server
            .client
            .put(server.url(path))
            .bearer_auth(&server.operator_token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send(),
    )
    .await
    .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The kinds of `device`'s recorded changes on `server`, newest first.
async fn change_kinds(server: &Server, device: &str) -> Vec<String> {
    let (_, body) = server
        .get_json(&format!("/api/devices/{device}/changes"))
        .await;
    let list = body["changes"].as_array().cloned().unwrap_or_default();
    let kinds = list.iter().map(|c| c["kind"].as_str().unwrap().to_owned());
    kinds.collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_on_one_postgresql_share_one_history_that_outlives_them() {
    let redis = Redis::start().await;
    let db = Schema::new();
    let args = ["--database-url", db.url.as_str()];
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(Server::start_in_cluster(&redis.url(), &args).await);
    }
    // Each instance takes some of the readings.
    let mut ids = Vec::new();
    for (i, temp) in [10.0, 11.0, 12.0, 13.0, 14.0, 15.0].into_iter().enumerate() {
        let posted = servers[i % 3]
            .post_status("shared", &json!({ "temperature": temp }))
            .await;
        ids.push(posted.id);
    }
    // And a power switch, known on one instance, changed on another.
    servers[1]
        .post_status("shared", &json!({ "power_on": true }))
        .await;
    servers[2]
        .post_status("shared", &json!({ "power_on": false }))
        .await;
    let history = |server: &Server| {
        let url = server.url("/api/devices/shared/history?metric=temperature");
        let client = server.client.clone();
        async move {
            let body: Value = client.get(url).send().await.unwrap().json().await.unwrap();
            body["points"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["v"].as_f64().unwrap())
                .collect::<Vec<_>>()
        }
    };
    let all = vec![10.0, 11.0, 12.0, 13.0, 14.0, 15.0];
    for server in &servers {
        eventually("every reading in every instance's history", || async {
            history(server).await == all
        })
        .await;
        eventually("the same changes on every instance", || async {
            change_kinds(server, "shared").await == ["power", "registered"]
        })
        .await;
    }
    // Every instance gone, Redis too: a new one has the whole history, and
    // ids go on from the last.
    drop(servers);
    drop(redis);
    let redis = Redis::start().await;
    let reborn = Server::start_in_cluster(&redis.url(), &args).await;
    assert_eq!(history(&reborn).await, all);
    assert_eq!(
        change_kinds(&reborn, "shared").await,
        ["power", "registered"]
    );
    let next = reborn
        .post_status("shared", &json!({ "temperature": 16.0 }))
        .await;
    assert!(next.id > *ids.iter().max().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_the_database_refuses_is_published_nowhere_and_one_it_fails_to_commit_is_stored_later()
 {
    let redis = Redis::start().await;
    let db = Schema::new();
    let args = ["--database-url", db.url.as_str()];
    let (a, b) = (
        Server::start_in_cluster(&redis.url(), &args).await,
        Server::start_in_cluster(&redis.url(), &args).await,
    );
    let first = a.post_status("rack", &json!({ "temperature": 1.0 })).await;
    let mut stream = b
        .sse_with("", &[("last-event-id", &first.id.to_string())])
        .await;
    stream.expect_retry().await;
    let sql = |sql: &str| admin(&db.base, sql.replace("{schema}", &db.name));

    // PostgreSQL refuses the row: a 503 that says nothing changed, and
    // nothing did, anywhere.
    sql("ALTER TABLE {schema}.events ADD CONSTRAINT refuse CHECK (id < 0) NOT VALID");
    let (status, body) = a
        .try_post_status("rack", &json!({ "temperature": 2.0 }))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("nothing changed"), "{error}");
    sql("ALTER TABLE {schema}.events DROP CONSTRAINT refuse");

    // PostgreSQL takes the row but fails the commit (a deferred check),
    // after Redis took the event: a 503 that says it was published, the
    // change on every instance, and the writer degraded until it has
    // stored the event.
    sql("CREATE TABLE {schema}.nowhere (id TEXT PRIMARY KEY);
         ALTER TABLE {schema}.events ADD CONSTRAINT later FOREIGN KEY (device)
             REFERENCES {schema}.nowhere (id) DEFERRABLE INITIALLY DEFERRED NOT VALID");
    let (status, body) = a
        .try_post_status("rack", &json!({ "temperature": 3.0 }))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("was published"), "{error}");
    assert!(!error.contains("nothing changed"), "{error}");
    let seen = stream.expect_status().await;
    assert_eq!(seen.id(), first.id + 1, "the refused change took no id");
    assert_eq!(seen.json()["status"]["temperature"], 3.0);
    eventually("the writer to say it is degraded", || async {
        a.get_json("/healthz").await.1["status"] == "degraded"
    })
    .await;
    let stored = || {
        sql(&format!(
            "SELECT count(*) FROM {{schema}}.events WHERE id = {}",
            seen.id()
        ))
    };
    assert_eq!(stored(), ["0"]);
    sql("ALTER TABLE {schema}.events DROP CONSTRAINT later");
    eventually("the writer to store the event and recover", || async {
        a.get_json("/healthz").await.1["status"] == "ok"
    })
    .await;
    assert_eq!(stored(), ["1"]);

    // The history is whole, and ids go on.
    let next = a.post_status("rack", &json!({ "temperature": 4.0 })).await;
    assert_eq!(next.id, seen.id() + 1);
    assert_eq!(stream.expect_status().await.id(), next.id);
    let (_, history) = b
        .get_json("/api/devices/rack/history?metric=temperature")
        .await;
    let temperatures: Vec<f64> = history["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["v"].as_f64().unwrap())
        .collect();
    assert_eq!(temperatures, [1.0, 3.0, 4.0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_tokens_spread_over_instances_count_on_every_one() {
    let redis = Redis::start().await;
    let servers = instances(&redis, 2).await;
    // Relays reach only the instances already listening (Redis pub/sub).
    let client = redis::Client::open(redis.url()).unwrap();
    eventually("both instances to listen for relays", || async {
        let mut conn = client.get_connection().unwrap();
        let listening: Vec<(String, usize)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("telltale:everyone")
            .query(&mut conn)
            .unwrap();
        listening[0].1 == servers.len()
    })
    .await;
    let body = json!({ "temperature": 1.0 });
    let post = |server: &Server, token: &str| {
        server
            .client
            .post(server.url("/api/devices/d/status"))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    // Eleven wrong tokens, spread over both: neither instance alone saw
    // more than its allowance of ten, but the cluster did.
    for i in 0..11 {
        let status = post(&servers[i % 2], "wrong").await.unwrap().status();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    for server in &servers {
        eventually("the address to be refused on every instance", || async {
            post(server, &server.token).await.unwrap().status() == StatusCode::TOO_MANY_REQUESTS
        })
        .await;
    }
}
