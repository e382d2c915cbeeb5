//! The server: every route in one place, and start-up. Only built with `ssr`.

mod api;
mod assets;
pub mod auth;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod db;
mod error;
pub mod history;
pub mod hub;
mod metrics;
pub mod mqtt;
pub mod retention;
mod signin;
mod simulator;
mod sse;
pub mod stale;
pub mod store;
pub mod thresholds;
pub mod webhooks;
pub mod ws;

use crate::app::{App, read_ahead, shell};
use auth::{Auth, Token};
use axum::Router;
use axum::extract::FromRef;
use axum::http::{HeaderValue, header};
use axum::routing::{delete, get, post, put};
use commands::Commands;
use config::Config;
use hub::Hub;
use leptos::config::LeptosOptions;
use leptos::prelude::provide_context;
use leptos_axum::LeptosRoutes;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::compression::CompressionLayer;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

#[derive(Clone, FromRef)]
pub struct AppState {
    pub leptos_options: LeptosOptions,
    pub hub: Arc<Hub>,
    pub auth: Arc<Auth>,
    pub commands: Arc<Commands>,
    /// The dashboard's sparklines, kept between renders.
    pub sparks: Arc<crate::app::SparkCache>,
    pub heartbeat: Duration,
    pub ws: ws::WsConfig,
    /// Cancelled once on shutdown; every endless stream ends on it.
    pub shutdown: CancellationToken,
}

impl AppState {
    /// Counts a wrong token from `ip`: here, and in cluster mode on every
    /// instance.
    pub fn wrong_token(&self, ip: std::net::IpAddr) {
        self.auth.guesses.wrong(ip);
        self.commands.tell_guessed(ip);
    }
}

/// Every route. Tests and `main` build the same router.
pub fn app(state: AppState) -> Router {
    let hub = state.hub.clone();
    let auth = state.auth.clone();
    let options = state.leptos_options.clone();
    // Renders the app once to list its routes (and sets up Leptos' executor),
    // so it needs the same context as a real request. The auth lets the
    // render tell whether the request's cookie is an operator session.
    let context = move || {
        provide_context(hub.clone());
        provide_context(auth.clone());
    };
    let (routes, _) = leptos_axum::generate_route_list_with_exclusions_and_ssg_and_context(
        App,
        None,
        context.clone(),
    );
    // Any other address gets the app's own "not found" page.
    let page = leptos_axum::render_app_to_stream_with_context(context.clone(), {
        let options = options.clone();
        move || shell(options.clone())
    });
    // The routes that check a token: an address that sent too many wrong
    // ones waits (`auth::Guesses`).
    let guarded = Router::new()
        .route("/api/devices/{id}/status", post(api::post_status))
        .route("/api/status", post(api::post_statuses))
        .route("/api/devices/{id}/commands", post(api::post_command))
        .route("/api/devices/{id}/thresholds", put(api::put_thresholds))
        .route("/api/devices/{id}", delete(api::remove_device))
        .route("/api/session", post(api::sign_in).delete(api::sign_out))
        .route("/api/ws", get(ws::upgrade))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::count_guesses,
        ));
    // Reading: open to anyone, unless a viewer token closes it.
    let reading = Router::new()
        .leptos_routes_with_context(&state, routes, context, move || shell(options.clone()))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            read_ahead,
        ))
        .route("/metrics", get(metrics::metrics))
        .route("/api/devices", get(api::list_devices))
        .route("/api/devices/{id}", get(api::get_device))
        .route("/api/devices/{id}/history", get(api::history))
        .route("/api/devices/{id}/history.csv", get(api::history_csv))
        .route("/api/devices/{id}/changes", get(api::device_changes))
        .route("/api/changes", get(api::changes))
        .route("/api/thresholds", get(api::get_thresholds))
        .route("/api/events", get(sse::events))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::require_reader,
        ));
    Router::new()
        .route("/healthz", get(api::healthz))
        .merge(reading)
        .merge(guarded)
        .fallback(move |request| assets::serve(request, page))
        .method_not_allowed_fallback(api::method_not_allowed)
        // The default predicate leaves `text/event-stream` uncompressed, so
        // events are never held back in a compressor's buffer.
        .layer(CompressionLayer::new())
        // No other site may frame the page (its power switches could be
        // clicked through a disguise), nor a response be read as another type.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("frame-ancestors 'none'"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Runs the server until ctrl-c or SIGTERM.
pub async fn run(config: Config) -> std::io::Result<()> {
    let listener = bind(config.addr)?;
    let addr = listener.local_addr()?;
    let mut leptos_options = LeptosOptions::builder()
        .output_name("telltale")
        .site_addr(addr)
        .build();
    // `cargo leptos watch` tells the page where its live-reload socket is.
    if let Some(port) = std::env::var("LEPTOS_RELOAD_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        leptos_options.reload_port = port;
    }
    let operator = token_or_random("operator", config.operator_token.as_deref());
    let viewer = config
        .viewer_token
        .as_deref()
        .filter(|t| !t.is_empty())
        .map(Token::new);
    let auth = Arc::new(Auth {
        ingest: token_or_random("ingest", config.ingest_token.as_deref()),
        sessions: auth::Sessions::new(&operator),
        viewer_sessions: viewer.as_ref().map(auth::Sessions::viewers),
        guesses: Arc::default(),
        operator,
        viewer,
        devices: config
            .device_tokens
            .iter()
            .map(|(id, t)| (id.clone(), Token::new(t.as_str())))
            .collect(),
        secure_cookie: config.secure_cookie,
    });
    // A bad thresholds file stops the start, before anything is opened.
    let file = match &config.thresholds {
        Some(path) => thresholds::ThresholdsFile::load(path).map_err(std::io::Error::other)?,
        None => thresholds::ThresholdsFile::default(),
    };
    let shutdown = CancellationToken::new();
    let policy = retention::Policy {
        raw: config.retention,
        downsampled: config.downsampled_retention,
        batch: retention::BATCH,
    };
    let mqtt = config
        .mqtt
        .as_deref()
        .map(|url| mqtt::prepare(url, &config.mqtt_topic))
        .transpose()
        .map_err(std::io::Error::other)?;
    // `--memory` is a store too, in a temporary directory removed when
    // this function returns, that promises nothing across restarts.
    // `--database-url` puts it in PostgreSQL instead of either.
    let memory_dir = if config.database_url.is_some() {
        if config.memory {
            tracing::info!("--database-url given: --memory is not used");
        }
        None
    } else if config.memory {
        tracing::info!("memory only (--memory): nothing is kept across restarts");
        Some(store::MemoryDir::new().map_err(std::io::Error::other)?)
    } else {
        None
    };
    let opened = match &config.database_url {
        // Its calls block on the network off the async workers (see
        // `db::off_runtime`).
        Some(url) => store::Store::open_postgres(url),
        None => match &memory_dir {
            Some(m) => store::Store::open_with(m.path(), store::Durability::Off),
            None => store::Store::open_with(&config.data_dir, store::Durability::Full),
        },
    };
    let where_ = match (&config.database_url, &memory_dir) {
        (Some(_), _) => "--database-url".to_owned(),
        (None, Some(m)) => m.path().display().to_string(),
        (None, None) => config.data_dir.display().to_string(),
    };
    let (hub, retention, described, webhooks) = opened
        .and_then(|s| {
            let described = s.describe();
            let retention = retention::Retention::new(&s, policy)?;
            let webhooks = webhooks::prepare(&config.webhooks, &s);
            let hub = Hub::with_store(s, config.replay_capacity, config.client_queue as usize)?;
            Ok((hub, retention, described, webhooks))
        })
        .map_err(|e| std::io::Error::other(format!("{where_}: {e}")))?;
    let webhooks = webhooks.map_err(std::io::Error::other)?;
    match (&config.database_url, &memory_dir) {
        (Some(_), _) => tracing::info!("store in PostgreSQL, {described}"),
        (None, None) => tracing::info!("data directory {}", config.data_dir.display()),
        (None, Some(_)) => {}
    }
    let broker = match &config.redis_url {
        // Ten rings' worth: a client that reconnects to another instance
        // after a while still resumes from the stream.
        Some(url) => Some(
            cluster::Broker::new(url, config.replay_capacity.saturating_mul(10))
                .map_err(|e| std::io::Error::other(format!("--redis-url: {e}")))?,
        ),
        None => None,
    };
    let hub = match &broker {
        Some(broker) => {
            let broker = broker.another();
            let hub = Arc::new(hub.with_broker(broker.another()));
            let (follower, stop) = (hub.clone(), shutdown.clone());
            std::thread::Builder::new()
                .name("cluster".into())
                .spawn(move || follower.follow(broker, stop))?;
            tracing::info!("cluster mode: events go through Redis");
            // Join before taking any change, so this instance's first
            // write is based on the cluster's state.
            let joined = tokio::time::Instant::now() + Duration::from_secs(5);
            while hub.degraded().is_some() && tokio::time::Instant::now() < joined {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            hub
        }
        None => Arc::new(hub),
    };
    tokio::spawn(retention::run_every(
        retention,
        config.retention_interval,
        shutdown.clone(),
    ));
    hub.keep_readings_for(config.retention);
    hub.configure_alerts(
        file.thresholds,
        stale::StalePolicy {
            floor: config.stale_floor,
            fixed: config.stale_after,
            file_default: file.stale_after,
            per_device: file.device_stale_after,
        },
    )
    .or_else(|e| match e {
        // Redis is away: the alerts are published once it is back.
        store::StoreError::Broker(_) => {
            tracing::warn!("alerts not re-evaluated: {e}");
            Ok(())
        }
        e => Err(std::io::Error::other(format!("{where_}: {e}"))),
    })?;
    tokio::spawn(stale::run(hub.clone(), shutdown.clone()));
    // In a cluster on one PostgreSQL, where the webhooks' places are
    // shared, the instances given them take turns (a lease in Redis).
    let webhooks_lease = broker
        .as_ref()
        .filter(|_| config.database_url.is_some())
        .map(|b| b.another());
    // Tasks that let go of what they hold at shutdown (leases, links).
    let mut finishing = Vec::new();
    finishing.extend(webhooks::start(webhooks, &hub, webhooks_lease, &shutdown));
    #[cfg(unix)]
    if let Some(path) = &config.thresholds {
        // Taken before listening: SIGHUP's default would end the process.
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(reload_on_hangup(
            hub.clone(),
            path.clone(),
            hangups,
            shutdown.clone(),
        ));
    }
    let mut commands = Commands::new(
        hub.clone(),
        config.command_timeout,
        config.client_queue as usize,
    );
    if let Some(broker) = &broker {
        commands = commands.with_cluster(broker.another(), auth.guesses.clone());
    }
    let commands = Arc::new(commands);
    tokio::spawn(
        commands
            .clone()
            .offline_unless_back(config.agent_timeout, shutdown.clone()),
    );
    // In a cluster, the instances with --mqtt take turns (a lease in Redis).
    let mqtt_lease = broker.as_ref().map(|b| b.another());
    if let Some(broker) = broker {
        tokio::spawn(commands.clone().sweep(shutdown.clone()));
        let (relays, stop) = (commands.clone(), shutdown.clone());
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("relays".into())
            .spawn(move || {
                let _entered = runtime.enter();
                relays.listen(broker, stop)
            })?;
    }
    if config.simulator_enabled() {
        tokio::spawn(simulator::run(
            hub.clone(),
            commands.clone(),
            config.simulator_interval,
            shutdown.clone(),
        ));
    }
    if let Some(bridge) = mqtt {
        finishing.push(mqtt::start(bridge, &hub, &commands, mqtt_lease, &shutdown));
    }
    let state = AppState {
        leptos_options,
        hub,
        auth,
        commands,
        sparks: Arc::default(),
        heartbeat: config.heartbeat,
        ws: ws::WsConfig {
            ping: config.ws_ping,
            silence: config.agent_timeout,
        },
        shutdown: shutdown.clone(),
    };
    tracing::info!("listening on http://{addr}");
    // Small messages go out at once: with Nagle on, a WebSocket `result`
    // written right after its `ack` waited ~40 ms for the peer's delayed ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
    });
    // One router for all connections: `app(state)` alone is cloned per
    // connection, ~10 KiB each that an idle SSE client would hold.
    axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    })
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    for task in finishing {
        if tokio::time::timeout_at(deadline, task).await.is_err() {
            tracing::warn!("stopped before letting go of everything (3 s)");
        }
    }
    drop(memory_dir);
    Ok(())
}

/// The configured token, or a random one printed once (for this run only).
fn token_or_random(kind: &str, configured: Option<&str>) -> Token {
    match configured {
        Some(t) if !t.is_empty() => Token::new(t),
        _ => {
            let token = Token::random();
            tracing::info!(
                "no {kind} token configured; this run's token is {}",
                token.as_str()
            );
            token
        }
    }
}

/// Binds with a deep accept queue (tokio's default holds 128), so thousands
/// of browsers reconnecting after a restart are not turned away for a second.
fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Reads the thresholds file at `path` again on each SIGHUP, until
/// `shutdown`. A file that does not read keeps the limits in force, and
/// says why.
#[cfg(unix)]
async fn reload_on_hangup(
    hub: Arc<Hub>,
    path: std::path::PathBuf,
    mut hangups: tokio::signal::unix::Signal,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            Some(()) = hangups.recv() => {}
        }
        match thresholds::ThresholdsFile::load(&path) {
            Ok(file) => match hub.reload_file(file) {
                Ok(()) => tracing::info!("SIGHUP: thresholds file {} read again", path.display()),
                Err(e) => tracing::error!("SIGHUP: thresholds file read again, but: {e}"),
            },
            Err(e) => tracing::error!("SIGHUP: {e}; the limits in force stay"),
        }
    }
}

/// Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
