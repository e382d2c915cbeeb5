//! Shared helpers for the black-box tests: run the real `telltale` binary on a
//! free port, talk to it over HTTP, and read its SSE stream.
//!
//! Every wait here is a hang guard with a generous deadline, never a timing
//! assertion: a test fails on a deadline only when something never happens.

#![allow(dead_code)]

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};

/// How long anything may take before the test is considered hung.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Awaits `fut`, panicking with `what` if it never completes.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(PATIENCE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("hung for {PATIENCE:?} waiting for {what}"),
    }
}

/// Polls `check` until it returns `true`, panicking with `what` after [`PATIENCE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A running `telltale` process, killed when dropped.
pub struct Server {
    /// `None` for a [`front`](Self::front): another address of a server.
    child: Option<Child>,
    pub addr: SocketAddr,
    pub base_url: String,
    pub token: String,
    /// The `--operator-token` every test server gets.
    pub operator_token: String,
    pub client: reqwest::Client,
    log: Arc<Mutex<Vec<String>>>,
    extra: Vec<String>,
    simulator: bool,
    /// Environment variables the server process gets.
    env: Vec<(String, String)>,
}

/// The answer of a successful `POST /api/devices/{id}/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Posted {
    pub id: u64,
    pub changed: bool,
}

static SERVERS: AtomicUsize = AtomicUsize::new(0);

impl Server {
    /// Starts a server with no simulator and default options.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts a server with no simulator and `extra` command-line options.
    pub async fn start_with(extra: &[&str]) -> Self {
        Self::launch(extra, false, &[]).await
    }

    /// Starts a server with no simulator, `extra` options and `env`.
    pub async fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(extra, false, env).await
    }

    /// Starts a server with the built-in simulator and `extra` options.
    pub async fn start_with_simulator(extra: &[&str]) -> Self {
        Self::launch(extra, true, &[]).await
    }

    /// Starts an instance of the cluster on `redis_url`, with no simulator.
    /// Every instance a test process starts has the same tokens, so a
    /// request may go to any of them.
    pub async fn start_in_cluster(redis_url: &str, extra: &[&str]) -> Self {
        Self::start_in_cluster_with_env(redis_url, extra, &[]).await
    }

    /// [`start_in_cluster`](Self::start_in_cluster), the process getting `env`.
    pub async fn start_in_cluster_with_env(
        redis_url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut args = vec!["--redis-url", redis_url];
        args.extend(extra);
        let pid = std::process::id();
        let token = format!("test-token-{pid}-cluster");
        let operator_token = format!("test-operator-{pid}-cluster");
        Self::launch_as(&args, false, token, operator_token, env).await
    }

    /// Starts a server with tokens of its own.
    async fn launch(extra: &[&str], simulator: bool, env: &[(&str, &str)]) -> Self {
        let n = SERVERS.fetch_add(1, Ordering::Relaxed);
        let token = format!("test-token-{}-{n}", std::process::id());
        let operator_token = format!("test-operator-{}-{n}", std::process::id());
        Self::launch_as(extra, simulator, token, operator_token, env).await
    }

    async fn launch_as(
        extra: &[&str],
        simulator: bool,
        token: String,
        operator_token: String,
        env: &[(&str, &str)],
    ) -> Self {
        let mut server = Self::unstarted(extra, simulator, token, operator_token);
        server.env = owned(env);
        server.spawn("127.0.0.1:0").await;
        server
    }

    fn unstarted(extra: &[&str], simulator: bool, token: String, operator_token: String) -> Self {
        Server {
            child: None,
            addr: ([127, 0, 0, 1], 0).into(),
            base_url: String::new(),
            token,
            operator_token,
            client: reqwest::Client::builder().build().expect("an HTTP client"),
            log: Arc::new(Mutex::new(Vec::new())),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            simulator,
            env: Vec::new(),
        }
    }

    /// Starts the server process on `addr`.
    async fn spawn(&mut self, addr: &str) {
        let (child, addr) = spawn_server(
            addr,
            &self.token,
            &self.operator_token,
            &self.extra,
            self.simulator,
            &self.env,
            self.log.clone(),
        )
        .await;
        self.child = Some(child);
        self.addr = addr;
        self.base_url = format!("http://{addr}");
    }

    /// Kills the server and starts it again on the same address, with the
    /// same tokens and options, and nothing of its state.
    pub async fn restart(&mut self) {
        self.restart_after(Duration::ZERO).await;
    }

    /// [`restart`](Self::restart), `away` after the kill.
    pub async fn restart_after(&mut self, away: Duration) {
        self.child
            .as_mut()
            .expect("a server process")
            .kill()
            .await
            .expect("the server is killed");
        tokio::time::sleep(away).await;
        let addr = self.addr;
        self.spawn(&addr.to_string()).await;
        assert_eq!(addr, self.addr);
    }

    /// This server as reached through a proxy at `addr`: same tokens, no
    /// process of its own.
    pub fn front(&self, addr: SocketAddr) -> Server {
        Server {
            child: None,
            addr,
            base_url: format!("http://{addr}"),
            token: self.token.clone(),
            operator_token: self.operator_token.clone(),
            client: self.client.clone(),
            log: Arc::new(Mutex::new(Vec::new())),
            extra: Vec::new(),
            simulator: false,
            env: Vec::new(),
        }
    }

    /// The URL of `GET /api/ws`, for an agent.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/api/ws", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// A `POST /api/devices/{device}/status` carrying the right token; the
    /// caller adds the body and any other header.
    pub fn post_request(&self, device: &str) -> reqwest::RequestBuilder {
        self.client
            .post(self.url(&format!("/api/devices/{device}/status")))
            .bearer_auth(&self.token)
    }

    /// Posts `body` as JSON and returns the raw answer: status and JSON body.
    pub async fn try_post_status(&self, device: &str, body: &Value) -> (StatusCode, Value) {
        let request = self
            .post_request(device)
            .header("content-type", "application/json")
            .body(body.to_string());
        send_json(request).await
    }

    /// Posts `body` as JSON and insists on a 200.
    pub async fn post_status(&self, device: &str, body: &Value) -> Posted {
        let (status, answer) = self.try_post_status(device, body).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "POST {device} {body} answered {answer}"
        );
        Posted {
            id: answer["id"].as_u64().expect("a numeric event id"),
            changed: answer["changed"].as_bool().expect("a boolean `changed`"),
        }
    }

    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        send_json(self.client.get(self.url(path))).await
    }

    /// `GET /healthz`.
    pub async fn healthz(&self) -> Value {
        let (status, body) = self.get_json("/healthz").await;
        assert_eq!(status, StatusCode::OK, "/healthz answered {body}");
        body
    }

    pub async fn subscribers(&self) -> u64 {
        self.healthz().await["subscribers"]
            .as_u64()
            .expect("a numeric subscriber count")
    }

    /// `GET /api/devices/{id}`: `Some(device)` on 200, `None` on 404.
    pub async fn device(&self, id: &str) -> Option<Value> {
        let (status, body) = self.get_json(&format!("/api/devices/{id}")).await;
        match status {
            StatusCode::OK => Some(body),
            StatusCode::NOT_FOUND => None,
            other => panic!("GET /api/devices/{id} answered {other}: {body}"),
        }
    }

    /// The values of `metric`'s history points of `device` (the last hour).
    pub async fn history_values(&self, device: &str, metric: &str) -> Vec<f64> {
        let (status, history) = self
            .get_json(&format!("/api/devices/{device}/history?metric={metric}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{history}");
        history["points"]
            .as_array()
            .expect("points")
            .iter()
            .map(|p| p["v"].as_f64().expect("a value"))
            .collect()
    }

    /// The ids `GET /api/devices` lists, in its order.
    pub async fn device_ids(&self) -> Vec<String> {
        let (status, body) = self.get_json("/api/devices").await;
        assert_eq!(status, StatusCode::OK, "GET /api/devices answered {body}");
        let devices = body["devices"].as_array().expect("a devices array");
        devices
            .iter()
            .map(|d| d["id"].as_str().expect("a device id").to_owned())
            .collect()
    }

    /// Opens `GET /api/events{query}` and insists on a 200. Once this returns,
    /// the server has taken the subscription: every later event is delivered.
    pub async fn sse(&self, query: &str) -> SseStream {
        self.sse_with(query, &[]).await
    }

    pub async fn sse_with(&self, query: &str, headers: &[(&str, &str)]) -> SseStream {
        let response = self.open_sse(query, headers).await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "GET /api/events{query} was refused"
        );
        SseStream::new(response)
    }

    /// Sends `GET /api/events{query}` and returns the response, whatever its status.
    pub async fn open_sse(&self, query: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut request = self
            .client
            .get(self.url(&format!("/api/events{query}")))
            .header("accept", "text/event-stream");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        within("the SSE response headers", request.send())
            .await
            .expect("GET /api/events")
    }

    /// Opens `GET /api/ws` without saying hello.
    pub async fn ws(&self) -> Ws {
        self.ws_with_bearer(None).await
    }

    /// Opens `GET /api/ws`, with `Authorization: Bearer` when given.
    pub async fn ws_with_bearer(&self, bearer: Option<&str>) -> Ws {
        match bearer {
            Some(token) => {
                self.ws_with_headers(&[("authorization", &format!("Bearer {token}"))])
                    .await
            }
            None => self.ws_with_headers(&[]).await,
        }
    }

    /// Connects to `GET /api/ws` with `headers` on the handshake.
    pub async fn ws_with_headers(&self, headers: &[(&str, &str)]) -> Ws {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
        let mut request = format!("ws://{}/api/ws", self.addr)
            .into_client_request()
            .expect("a WebSocket request");
        for (name, value) in headers {
            request.headers_mut().insert(
                HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
                HeaderValue::from_str(value).expect("a header value"),
            );
        }
        let (stream, _) = within(
            "the WebSocket handshake",
            tokio_tungstenite::connect_async(request),
        )
        .await
        .expect("the WebSocket upgrade succeeds");
        Ws { stream }
    }

    /// Connects and says `hello`; insists on a `welcome`.
    pub async fn ws_as(&self, hello: Value) -> Ws {
        let mut ws = self.ws().await;
        ws.send(&hello).await;
        let welcome = ws.next().await;
        assert_eq!(
            welcome["type"], "welcome",
            "hello {hello} answered {welcome}"
        );
        assert_eq!(welcome["v"], 1);
        ws
    }

    /// A viewer (reading is open by default).
    pub async fn viewer(&self) -> Ws {
        self.ws_as(serde_json::json!({"type": "hello", "v": 1, "role": "viewer"}))
            .await
    }

    /// An operator, with the operator token.
    pub async fn operator(&self) -> Ws {
        self.ws_as(serde_json::json!({
            "type": "hello", "v": 1, "role": "operator", "token": self.operator_token
        }))
        .await
    }

    /// The agent of `device`, with the ingest token (valid for any id).
    pub async fn agent(&self, device: &str) -> Ws {
        self.ws_as(serde_json::json!({
            "type": "hello", "v": 1, "role": "device", "token": self.token, "device": device
        }))
        .await
    }

    /// `POST /api/devices/{device}/commands` with `bearer` (if any).
    pub async fn post_command(
        &self,
        device: &str,
        bearer: Option<&str>,
        body: &Value,
    ) -> (StatusCode, Value) {
        let mut request = self
            .client
            .post(self.url(&format!("/api/devices/{device}/commands")))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        send_json(request).await
    }

    /// `DELETE /api/devices/{device}` with `bearer` (if any).
    pub async fn remove(&self, device: &str, bearer: Option<&str>) -> (StatusCode, Value) {
        let mut request = self
            .client
            .delete(self.url(&format!("/api/devices/{device}")));
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        send_json(request).await
    }

    /// Signs in with the operator token; returns the session cookie as a
    /// `Cookie` header sends it back (`telltale_session=…`).
    pub async fn sign_in(&self) -> String {
        let response = self
            .client
            .post(self.url("/api/session"))
            .header("content-type", "application/json")
            .body(serde_json::json!({ "token": self.operator_token }).to_string())
            .send()
            .await
            .expect("POST /api/session is answered");
        assert_eq!(response.status(), 200, "signing in");
        let set_cookie = response.headers()["set-cookie"].to_str().unwrap();
        set_cookie.split(';').next().unwrap().trim().to_owned()
    }

    /// `DELETE /api/session` with `cookie`.
    pub async fn sign_out(&self, cookie: &str) {
        let response = self
            .client
            .delete(self.url("/api/session"))
            .header("cookie", cookie)
            .send()
            .await
            .expect("DELETE /api/session is answered");
        assert_eq!(response.status(), 204, "signing out");
    }

    /// Whether the page, asked for with `cookie`, is rendered for a
    /// signed-in operator.
    pub async fn signed_in(&self, cookie: &str) -> bool {
        let page = self
            .client
            .get(self.url("/"))
            .header("cookie", cookie)
            .send()
            .await
            .expect("the page is answered")
            .text()
            .await
            .expect("the page reads");
        page.contains("Sign out")
    }

    /// Sends the server process `signal` (`HUP`, `TERM`…).
    /// Waits for the server process to end; its exit code.
    pub async fn exited(&mut self) -> Option<i32> {
        let child = self.child.as_mut().expect("a server process");
        within("the server to exit", child.wait())
            .await
            .expect("the server's status")
            .code()
    }

    pub fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .expect("a running server process");
        let sent = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -{signal} {pid}");
    }

    /// Everything the server printed so far.
    pub fn output(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- telltale output ---\n{}\n---", self.output());
        }
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
    }
}

/// Two instances of a cluster on `redis_url`, started with `args`, and
/// which of them holds a lease: the one whose log says `holder` (waiting
/// until one does), then the other, whose log does not.
pub async fn leader_and_other(redis_url: &str, args: &[&str], holder: &str) -> (Server, Server) {
    let mut two = Vec::new();
    for _ in 0..2 {
        two.push(Server::start_in_cluster(redis_url, args).await);
    }
    let holds = |s: &Server| s.output().contains(holder);
    eventually("an instance to take the lease", || async {
        two.iter().any(holds)
    })
    .await;
    let leader = two.iter().position(holds).expect("a holder");
    let other = two.remove(1 - leader);
    let leader = two.remove(0);
    assert!(!holds(&other), "{}", other.output());
    (leader, other)
}

/// Starts `telltale` on `addr`; returns it once it logs where it listens.
/// Runs the server with `extra` options and `env`, expecting it to refuse
/// to start; returns everything it printed.
pub async fn refused_start(extra: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_telltale"));
    for var in telltale::server::config::Config::env_vars() {
        command.env_remove(var);
    }
    command
        .args(["--addr", "127.0.0.1:0", "--no-simulator"])
        .args(extra)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = within("the server to refuse to start", command.output())
        .await
        .expect("the telltale binary runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{text}");
    assert!(!text.contains("listening on"), "{text}");
    text
}

fn owned(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn spawn_server(
    addr: &str,
    token: &str,
    operator_token: &str,
    extra: &[String],
    simulator: bool,
    env: &[(String, String)],
    log: Arc<Mutex<Vec<String>>>,
) -> (Child, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_telltale"));
    command
        .args([
            "--addr",
            addr,
            "--ingest-token",
            token,
            "--operator-token",
            operator_token,
            "--simulator",
            if simulator { "on" } else { "off" },
        ])
        .args(extra)
        // Memory only, unless the test gives a data directory of its own:
        // never a `telltale-data` folder in the working directory.
        .args((!extra.iter().any(|a| a == "--data-dir")).then_some("--memory"))
        .env("RUST_LOG", "info,tower_http=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for var in telltale::server::config::Config::env_vars() {
        command.env_remove(var);
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
    let mut child = command.spawn().expect("the telltale binary starts");
    drain(child.stderr.take().expect("piped stderr"), log.clone());
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();

    let addr = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = stdout.next_line().await.expect("server stdout is readable") {
            log.lock().unwrap().push(line.clone());
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                return Some(addr.parse::<SocketAddr>().expect("a socket address"));
            }
        }
        None
    })
    .await;
    let addr = match addr {
        Ok(Some(addr)) => addr,
        Ok(None) => panic!(
            "the server exited before listening; output:\n{}",
            log.lock().unwrap().join("\n")
        ),
        Err(_) => panic!(
            "the server did not start listening; output:\n{}",
            log.lock().unwrap().join("\n")
        ),
    };
    // Keep reading so the pipe never fills and blocks the server's logging.
    drain_lines(stdout, log);
    (child, addr)
}

/// A `telltale agent` process, killed when dropped; its output is kept.
pub struct AgentProcess {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// The tasks reading its output; done once it exited and all is read.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl AgentProcess {
    /// Starts `telltale agent` with `args` and a clean environment: no
    /// option from the environment, and for `wss://` the platform's trust
    /// store, whatever `SSL_CERT_FILE` or `SSL_CERT_DIR` this process has.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// [`start`](Self::start), with the environment variables `env` set.
    pub fn start_with_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_telltale"));
        command
            .arg("agent")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for var in telltale::server::config::Config::env_vars() {
            command.env_remove(var);
        }
        command
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR")
            .envs(env.iter().copied());
        let mut child = command.spawn().expect("the telltale binary starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let readers = vec![
            drain(child.stderr.take().expect("piped stderr"), log.clone()),
            drain_lines(stdout, log.clone()),
        ];
        Self {
            child,
            log,
            readers,
        }
    }

    /// Waits for the agent to exit on its own; returns its exit code.
    pub async fn exit_code(&mut self) -> Option<i32> {
        let code = within("the agent to exit", self.child.wait())
            .await
            .expect("the agent can be waited for")
            .code();
        // Its last words may still be in the pipes: read them all.
        for reader in self.readers.drain(..) {
            let _ = within("the agent's output to end", reader).await;
        }
        code
    }

    /// Kills the agent (SIGKILL: no goodbye) and waits for it.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("the agent is killed");
    }

    /// Asks the agent to stop (SIGTERM) and returns its exit code.
    pub async fn terminate(&mut self) -> Option<i32> {
        let pid = self.child.id().expect("the agent is running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM {pid}");
        self.exit_code().await
    }

    /// Everything the agent printed so far.
    pub fn output(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- telltale agent output ---\n{}\n---", self.output());
        }
        let _ = self.child.start_kill();
    }
}

fn drain_lines<R: AsyncRead + Unpin + Send + 'static>(
    mut lines: tokio::io::Lines<BufReader<R>>,
    log: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            log.lock().unwrap().push(line);
        }
    })
}

fn drain(
    pipe: impl AsyncRead + Unpin + Send + 'static,
    log: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    drain_lines(BufReader::new(pipe).lines(), log)
}

async fn send_json(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = within("an HTTP answer", request.send())
        .await
        .expect("the request is answered");
    let status = response.status();
    let bytes = within("an HTTP body", response.bytes())
        .await
        .expect("the body is readable");
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "a {status} answer with a body that is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, body)
}

/// One dispatched SSE record. Comment-only blocks (heartbeats) are skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseRecord {
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: String,
    pub retry: Option<u64>,
}

impl SseRecord {
    pub fn event(&self) -> &str {
        self.event.as_deref().unwrap_or("message")
    }

    /// The numeric `id:` of the record.
    pub fn id(&self) -> u64 {
        self.id
            .as_deref()
            .unwrap_or_else(|| panic!("record without an id: {self:?}"))
            .parse()
            .unwrap_or_else(|_| panic!("record with a non-numeric id: {self:?}"))
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("record data is not JSON ({e}): {self:?}"))
    }

    pub fn is_snapshot(&self) -> bool {
        self.event() == "snapshot"
    }

    pub fn is_status(&self) -> bool {
        self.event() == "status"
    }
}

/// A minimal `text/event-stream` parser: feed bytes, take records.
#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
    current: SseRecord,
    has_field: bool,
    data_lines: Vec<String>,
    ready: VecDeque<SseRecord>,
    /// Heartbeats (`ping` events, which are not handed out as records)
    /// seen so far, and the data of the latest.
    pub pings: usize,
    pub last_ping: Option<serde_json::Value>,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8(line).expect("SSE is UTF-8");
            self.line(&line);
        }
    }

    fn line(&mut self, line: &str) {
        if line.is_empty() {
            if self.has_field {
                let mut record = std::mem::take(&mut self.current);
                record.data = std::mem::take(&mut self.data_lines).join("\n");
                if record.event.as_deref() == Some("ping") {
                    self.pings += 1;
                    self.last_ping = Some(serde_json::from_str(&record.data).expect("a JSON ping"));
                } else {
                    self.ready.push_back(record);
                }
            }
            self.has_field = false;
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        self.has_field = true;
        match field {
            "event" => self.current.event = Some(value.to_owned()),
            "id" => self.current.id = Some(value.to_owned()),
            "data" => self.data_lines.push(value.to_owned()),
            "retry" => self.current.retry = value.parse().ok(),
            _ => {}
        }
    }

    pub fn pop(&mut self) -> Option<SseRecord> {
        self.ready.pop_front()
    }
}

/// An open SSE response read through reqwest.
pub struct SseStream {
    pub headers: HeaderMap,
    response: reqwest::Response,
    parser: SseParser,
}

/// The `snapshot` event: its id and its JSON data.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub id: u64,
    pub data: Value,
}

impl Snapshot {
    pub fn device_ids(&self) -> Vec<String> {
        self.data["devices"]
            .as_array()
            .expect("a device list")
            .iter()
            .map(|d| d["id"].as_str().expect("a device id").to_owned())
            .collect()
    }

    pub fn device(&self, id: &str) -> Option<&Value> {
        self.data["devices"]
            .as_array()
            .expect("a device list")
            .iter()
            .find(|d| d["id"] == id)
    }
}

impl SseStream {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            headers: response.headers().clone(),
            response,
            parser: SseParser::default(),
        }
    }

    /// The next record, or `None` when the stream ends. No deadline.
    pub async fn next_record(&mut self) -> Option<SseRecord> {
        loop {
            if let Some(record) = self.parser.pop() {
                return Some(record);
            }
            match self.response.chunk().await {
                Ok(Some(bytes)) => self.parser.push(&bytes),
                Ok(None) => return None,
                Err(e) => panic!("the SSE stream failed: {e}"),
            }
        }
    }

    /// Heartbeats (`ping` events) read so far.
    pub fn pings(&self) -> usize {
        self.parser.pings
    }

    /// Reads until `n` heartbeats have arrived in all; returns the latest.
    pub async fn wait_for_pings(&mut self, n: usize) -> serde_json::Value {
        within("heartbeats", async {
            while self.parser.pings < n {
                match self.response.chunk().await {
                    Ok(Some(bytes)) => self.parser.push(&bytes),
                    Ok(None) => panic!("the SSE stream ended"),
                    Err(e) => panic!("the SSE stream failed: {e}"),
                }
            }
        })
        .await;
        self.parser.last_ping.clone().expect("a ping")
    }

    /// The next record; panics if the stream ends or hangs.
    pub async fn next(&mut self) -> SseRecord {
        within("the next SSE record", self.next_record())
            .await
            .expect("the SSE stream ended")
    }

    /// The `retry:` record that opens every stream; returns its value.
    pub async fn expect_retry(&mut self) -> u64 {
        let record = self.next().await;
        record
            .retry
            .unwrap_or_else(|| panic!("expected a retry record, got {record:?}"))
    }

    pub async fn expect_snapshot(&mut self) -> Snapshot {
        let record = self.next().await;
        assert!(record.is_snapshot(), "expected a snapshot, got {record:?}");
        Snapshot {
            id: record.id(),
            data: record.json(),
        }
    }

    /// The opening of a fresh stream: `retry`, then a snapshot.
    pub async fn expect_start(&mut self) -> Snapshot {
        self.expect_retry().await;
        self.expect_snapshot().await
    }

    pub async fn expect_status(&mut self) -> SseRecord {
        let record = self.next().await;
        assert!(
            record.is_status(),
            "expected a status event, got {record:?}"
        );
        record
    }
}

/// An SSE client on a raw socket with a tiny receive buffer, for clients that
/// stop reading. It only sends the request; reading is up to the test.
pub struct RawSse {
    reader: BufReader<TcpStream>,
    parser: SseParser,
    head_read: bool,
    ended: bool,
}

impl RawSse {
    pub async fn connect(addr: SocketAddr, path: &str) -> Self {
        let socket = TcpSocket::new_v4().expect("a socket");
        socket
            .set_recv_buffer_size(4096)
            .expect("a small receive buffer");
        let mut stream = within("a TCP connection", socket.connect(addr))
            .await
            .expect("connects");
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("the request is sent");
        Self {
            reader: BufReader::new(stream),
            parser: SseParser::default(),
            head_read: false,
            ended: false,
        }
    }

    /// The next record, decoding the chunked body; panics if the stream ends or hangs.
    pub async fn next(&mut self) -> SseRecord {
        within("the next raw SSE record", async {
            loop {
                if let Some(record) = self.parser.pop() {
                    return record;
                }
                assert!(!self.ended, "the raw SSE stream ended");
                self.read_chunk().await;
            }
        })
        .await
    }

    async fn read_chunk(&mut self) {
        if !self.head_read {
            let mut status = String::new();
            self.reader
                .read_line(&mut status)
                .await
                .expect("a status line");
            assert!(
                status.starts_with("HTTP/1.1 200"),
                "unexpected status line {status:?}"
            );
            let mut chunked = false;
            loop {
                let mut line = String::new();
                self.reader
                    .read_line(&mut line)
                    .await
                    .expect("a header line");
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
            }
            assert!(chunked, "expected a chunked SSE body");
            self.head_read = true;
            return;
        }
        let mut size = String::new();
        let n = self
            .reader
            .read_line(&mut size)
            .await
            .expect("a chunk size");
        assert!(n > 0, "the connection closed mid-stream");
        let size = size.trim_end().split(';').next().unwrap_or_default();
        let size = usize::from_str_radix(size, 16).expect("a hex chunk size");
        if size == 0 {
            self.ended = true;
            return;
        }
        let mut chunk = vec![0; size + 2];
        self.reader
            .read_exact(&mut chunk)
            .await
            .expect("a whole chunk");
        assert_eq!(&chunk[size..], b"\r\n", "a chunk ends with CRLF");
        self.parser.push(&chunk[..size]);
    }
}

/// A full status update for `i`, with values that differ for every `i`.
pub fn full_update(name: &str, i: u32) -> Value {
    let x = f64::from(i);
    serde_json::json!({
        "name": name,
        "temperature": 20.5 + x,
        "humidity": (40.25 + x) % 100.0,
        "power_on": i.is_multiple_of(2),
        "metrics": { "load": 0.125 + x },
    })
}

/// The `status` object that [`full_update`] leaves on a device.
pub fn full_status(i: u32) -> Value {
    let update = full_update("", i);
    serde_json::json!({
        "temperature": update["temperature"],
        "humidity": update["humidity"],
        "power_on": update["power_on"],
        "metrics": update["metrics"],
    })
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client of `GET /api/ws` speaking JSON text frames.
pub struct Ws {
    stream: WsStream,
}

impl Ws {
    pub async fn send(&mut self, message: &Value) {
        self.send_text(message.to_string()).await;
    }

    pub async fn send_text(&mut self, text: String) {
        use futures::SinkExt;
        within("a WebSocket send", self.stream.send(WsMessage::text(text)))
            .await
            .expect("the message is sent");
    }

    /// Pings every `every` until the server closes the connection (`Ok`
    /// with its close code, `None` when it just ended), or `at_most` has
    /// passed (`Err`).
    pub async fn ping_until_closed(
        &mut self,
        every: Duration,
        at_most: Duration,
    ) -> Result<Option<u16>, ()> {
        use futures::{SinkExt, StreamExt};
        let end = tokio::time::Instant::now() + at_most;
        while tokio::time::Instant::now() < end {
            if self
                .stream
                .send(WsMessage::Ping(Default::default()))
                .await
                .is_err()
            {
                return Ok(None);
            }
            let next_ping = tokio::time::Instant::now() + every;
            loop {
                match tokio::time::timeout_at(next_ping, self.stream.next()).await {
                    Err(_) => break,
                    Ok(Some(Ok(WsMessage::Close(frame)))) => {
                        return Ok(frame.map(|f| u16::from(f.code)));
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(_)) | None) => return Ok(None),
                }
            }
        }
        Err(())
    }

    /// The next frame that is not a ping or pong; `None` when the stream ends.
    async fn next_frame(&mut self) -> Option<WsMessage> {
        use futures::StreamExt;
        loop {
            match within("the next WebSocket frame", self.stream.next()).await {
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                Some(Ok(frame)) => return Some(frame),
                Some(Err(e)) => panic!("the WebSocket failed: {e}"),
                None => return None,
            }
        }
    }

    /// The next JSON message; panics on a close or a non-text frame.
    pub async fn next(&mut self) -> Value {
        match self.next_frame().await {
            Some(WsMessage::Text(text)) => serde_json::from_str(text.as_str())
                .unwrap_or_else(|e| panic!("a message that is not JSON ({e}): {text}")),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    /// The next message, which must be of `kind`.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let message = self.next().await;
        assert_eq!(message["type"], kind, "expected a {kind}, got {message}");
        message
    }

    /// Reads until the connection ends; returns the close code, if a close
    /// frame could still be read (a client that stopped reading may find the
    /// socket already gone once it tries to answer the queued pings).
    pub async fn closed(&mut self) -> Option<u16> {
        use futures::StreamExt;
        loop {
            match within("the end of the WebSocket", self.stream.next()).await {
                Some(Ok(WsMessage::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Reads until the server closes; returns the close code and reason.
    /// Panics if anything but a close frame comes first.
    pub async fn expect_close(&mut self) -> (u16, String) {
        match self.next_frame().await {
            Some(WsMessage::Close(Some(frame))) => {
                (u16::from(frame.code), frame.reason.to_string())
            }
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// An operator's `command` message setting `power_on`.
pub fn command(device: &str, power_on: bool, request_id: &str) -> Value {
    json!({"type": "command", "device": device, "set": {"power_on": power_on}, "request_id": request_id})
}

/// Answers the next command the agent receives; returns it.
pub async fn answer_next_command(agent: &mut Ws, device: &str, apply: bool) -> Value {
    let command = agent.expect("command").await;
    assert_eq!(command["device"], device);
    if apply {
        let on = command["set"]["power_on"].clone();
        agent
            .send(&json!({"type": "status", "device": device, "update": {"power_on": on}}))
            .await;
    }
    agent
        .send(&json!({
            "type": "result",
            "request_id": command["request_id"],
            "outcome": if apply { "applied" } else { "failed" },
            "reason": if apply { Value::Null } else { json!("relay stuck") },
        }))
        .await;
    command
}

pub use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A private `redis-server` on a free port, for cluster tests: it keeps
/// nothing on disk, and the test may stop and start it again.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    /// Speaks TLS only, with this certificate and key.
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Redis {
    pub async fn start() -> Self {
        Self::start_as(None).await
    }

    /// A Redis that speaks TLS only (`rediss://localhost:…`), with `cert`.
    pub async fn start_tls(cert: &SelfSigned) -> Self {
        Self::start_as(Some((cert.cert.clone(), cert.key.clone()))).await
    }

    async fn start_as(tls: Option<(std::path::PathBuf, std::path::PathBuf)>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut redis = Redis {
            child: None,
            port,
            tls,
        };
        redis.resume().await;
        redis
    }

    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("rediss://localhost:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// Kills it: everything it held is gone.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("redis-server is killed");
        }
    }

    /// Starts it (again, empty) on the same port; returns once it answers
    /// (with TLS: once it listens).
    pub async fn resume(&mut self) {
        let port = self.port.to_string();
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &port]),
            Some((cert, key)) => command
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key),
        };
        let child = command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server starts (apt-get install redis-server)");
        self.child = Some(child);
        let (port, tls) = (self.port, self.tls.is_some());
        within("redis-server to answer PING", async move {
            loop {
                if let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)).await {
                    let mut pong = [0u8; 7];
                    if tls
                        || tcp.write_all(b"PING\r\n").await.is_ok()
                            && tcp.read_exact(&mut pong).await.is_ok()
                            && &pong == b"+PONG\r\n"
                    {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
}

/// A certificate for `localhost` and 127.0.0.1, self-signed (by the
/// `openssl` command), and its key, as PEM files. Each has a subject of its
/// own, so that no other certificate (another test's, or a `CN=localhost`
/// snakeoil in the system store) passes for its issuer.
pub struct SelfSigned {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SelfSigned {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let name = dir.path().file_name().expect("a named directory");
        let subject = format!("/O=Telltale tests/CN={}", name.to_string_lossy());
        let output = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", &subject])
            .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
            // A server certificate, not a CA: rustls refuses a CA as a server.
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl runs");
        assert!(
            output.status.success(),
            "openssl made no certificate: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        SelfSigned {
            cert,
            key,
            _dir: dir,
        }
    }
}

/// nginx, configured by `tests/nginx/telltale.conf` (the example the README
/// gives), in front of `upstreams`, on a free port.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    /// Listening with TLS (`ssl`)?
    tls: bool,
    _dir: tempfile::TempDir,
}

impl Nginx {
    pub async fn start(upstreams: &[SocketAddr]) -> Self {
        Self::launch(upstreams, None).await
    }

    /// [`start`](Self::start), terminating TLS with `certificate`, the
    /// way the README's note on `wss://` says.
    pub async fn start_tls(upstreams: &[SocketAddr], certificate: &SelfSigned) -> Self {
        Self::launch(upstreams, Some(certificate)).await
    }

    async fn launch(upstreams: &[SocketAddr], tls: Option<&SelfSigned>) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let example = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/nginx/telltale.conf"
        ))
        .expect("the nginx example");
        let servers: String = upstreams
            .iter()
            .map(|a| format!("    server {a} max_fails=1 fail_timeout=2s;\n"))
            .collect();
        let mut site = String::new();
        let mut listed = false;
        for line in example.lines() {
            if line.trim_start().starts_with("server 127.0.0.1:") {
                if !std::mem::replace(&mut listed, true) {
                    site.push_str(&servers);
                }
            } else if line.trim() == "listen 8080;" {
                match tls {
                    None => site.push_str(&format!("    listen 127.0.0.1:{port};\n")),
                    Some(c) => site.push_str(&format!(
                        "    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {};\n    \
                         ssl_certificate_key {};\n",
                        c.cert.display(),
                        c.key.display()
                    )),
                }
            } else {
                site.push_str(line);
                site.push('\n');
            }
        }
        assert!(listed, "the example lists its upstream servers");
        // Readable by nginx's workers (`nobody` when started as root).
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("the directory is readable");
        let d = dir.path().display();
        let main = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             {site}\n}}\n"
        );
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, main).expect("nginx.conf is written");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("nginx starts (apt-get install nginx)");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        within("nginx to listen", async {
            while TcpStream::connect(addr).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        Nginx {
            child,
            addr,
            tls: tls.is_some(),
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr)
    }

    /// `GET /api/ws` through nginx, by the name its certificate is for.
    pub fn ws_url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://localhost:{}/api/ws", self.addr.port())
    }
}

/// A fresh schema in the test database; `url` makes it the search path.
pub struct Schema {
    pub url: String,
    pub base: String,
    pub name: String,
}

impl Schema {
    pub fn new() -> Self {
        let base = std::env::var("TELLTALE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let name = format!("it_{}_{}", std::process::id(), rand_suffix());
        admin(&base, format!("CREATE SCHEMA {name}"));
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-csearch_path%3D{name}");
        Self { url, base, name }
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        admin(
            &self.base,
            format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
        );
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// Runs `sql` on the test database, on a thread of its own (the sync client
/// must not block a runtime's thread).
pub fn admin(url: &str, sql: String) -> Vec<String> {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap_or_else(|e| {
            panic!(
                "these tests need PostgreSQL at {url} \
                 (set TELLTALE_TEST_DATABASE_URL to another): {e}"
            )
        });
        client
            .simple_query(&sql)
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .collect()
    })
    .join()
    .unwrap()
}
