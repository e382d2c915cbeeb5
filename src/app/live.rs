//! A page's subscription to `/api/events`: one `EventSource` per page, kept
//! open for the life of the page. The dashboard follows every device, a
//! device page only its own (`?device=`); both go through [`connect`], so
//! reconnection and resume live in this one place.
//!
//! Reconnection is the browser's own: after a drop it retries and sends
//! `Last-Event-ID`, and the server replays what was missed. Only when the
//! browser gives up (the server answered with an error) do we open a new
//! `EventSource` ourselves, with backoff and `?last_event_id=`; and when a
//! stream that looks open has said nothing, not even its `ping`, for
//! [`SILENT_PINGS`] heartbeats (its server froze, or a proxy or the network
//! holds the connection open with nobody behind it), since the browser
//! would wait for it for ever, showing frozen values as live.

use crate::model::{DeviceId, EventId, Snapshot, StatusEvent};
use leptos::prelude::*;

/// Heartbeats a stream may miss before the page gives up on it.
#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
const SILENT_PINGS: f64 = 3.0;

/// Whether a stream that was last heard of at `heard_ms` (the page's
/// monotonic clock), its server pinging every `every_ms`, is silent at
/// `now_ms`. Before its first ping the interval is unknown: never.
#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
fn silent(heard_ms: f64, every_ms: Option<u64>, now_ms: f64) -> bool {
    every_ms.is_some_and(|every| now_ms - heard_ms > SILENT_PINGS * every as f64)
}

/// The state of the page's event stream, in the words the page shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    Live,
    Reconnecting,
    Offline,
}

impl Connection {
    pub fn label(self) -> &'static str {
        match self {
            Self::Live => "Live",
            Self::Reconnecting => "Reconnecting…",
            Self::Offline => "Offline",
        }
    }
}

/// The signals every live page keeps: its stream's state, and a clock.
#[derive(Clone, Copy)]
pub struct Feed {
    pub connection: RwSignal<Connection>,
    /// Why the server takes no changes right now (cluster mode, its Redis
    /// unreachable), as its stream says.
    pub degraded: RwSignal<Option<String>>,
    /// The server's time, in milliseconds since the epoch (see
    /// [`Feed::now`]); ticks every second once hydrated, so "updated N s
    /// ago" keeps counting and charts slide.
    pub now_ms: RwSignal<i64>,
    #[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
    clock: StoredValue<Clock>,
}

impl Feed {
    /// Offline until the stream opens; the clock starts at the server's
    /// render time so hydration shows exactly what the server rendered.
    pub fn new(now_ms: i64) -> Self {
        Self {
            connection: RwSignal::new(Connection::Offline),
            degraded: RwSignal::new(None),
            now_ms: RwSignal::new(now_ms),
            clock: StoredValue::new(Clock::default()),
        }
    }

    /// The server's time now, in milliseconds since the epoch, as far as
    /// the page can tell: never the browser's own wall clock, which may be
    /// minutes off, and would put every "updated N s ago", every change's
    /// time and every chart's right edge off with it.
    pub fn now(&self) -> i64 {
        #[cfg(feature = "hydrate")]
        return self.clock.with_value(|c| c.at(browser::monotonic_ms()));
        #[cfg(not(feature = "hydrate"))]
        self.now_ms.get_untracked()
    }

    /// The server stamped `server_ms`: its clock has been there by now.
    #[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
    fn saw(&self, server_ms: i64) {
        #[cfg(feature = "hydrate")]
        self.clock
            .update_value(|c| c.saw(server_ms, browser::monotonic_ms()));
        #[cfg(not(feature = "hydrate"))]
        let _ = server_ms;
    }
}

/// The server's clock, read off the browser's monotonic one (which no
/// change to the machine's time moves) plus an offset. Every time the
/// server sends (the page's render, a device's `updated_at`, which the
/// server never lets run ahead of its clock) is no later than the server's
/// now when it arrives, so each bounds the offset from
/// below; the largest bound seen is the estimate, off by no more than the
/// quickest delivery seen (milliseconds, once a live event came).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Clock {
    offset_ms: Option<f64>,
}

#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
impl Clock {
    /// The server stamped `server_ms`, which arrived at `local_ms`.
    fn saw(&mut self, server_ms: i64, local_ms: f64) {
        let bound = server_ms as f64 - local_ms;
        self.offset_ms = Some(self.offset_ms.map_or(bound, |o| o.max(bound)));
    }

    /// The server's time at `local_ms`.
    fn at(&self, local_ms: f64) -> i64 {
        (local_ms + self.offset_ms.unwrap_or_default()).round() as i64
    }
}

/// What a page does with the events of its stream.
#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
pub trait Follower: Clone + 'static {
    /// The full state (of the followed devices): the stream started afresh.
    fn snapshot(&self, snapshot: Snapshot);
    /// One device changed, in event `id`.
    fn status(&self, id: EventId, event: StatusEvent);
}

/// Starts the stream once the page is hydrated, resuming after `rendered_at`
/// (the event id the server rendered), and closes it when the page goes.
/// `device` limits the stream to one device.
pub fn connect<F: Follower>(
    feed: Feed,
    device: Option<DeviceId>,
    rendered_at: EventId,
    follower: F,
) {
    #[cfg(feature = "hydrate")]
    {
        use send_wrapper::SendWrapper;
        use std::time::Duration;

        // Effects run only in the browser, after hydration.
        Effect::new(move |_| {
            feed.saw(feed.now_ms.get_untracked());
            let live = SendWrapper::new(browser::Live::start(
                feed,
                device.clone(),
                rendered_at,
                follower.clone(),
            ));
            let watched = std::rc::Rc::clone(&live);
            let tick = move || {
                watched.watch();
                feed.now_ms.set(feed.now());
            };
            tick();
            let clock = set_interval_with_handle(tick, Duration::from_secs(1)).ok();
            on_cleanup(move || {
                live.close();
                if let Some(clock) = clock {
                    clock.clear();
                }
            });
        });
    }
    #[cfg(not(feature = "hydrate"))]
    let _ = (feed, device, rendered_at, follower);
}

/// The stream's address: resumes after `last_id`, for one device or all.
#[cfg_attr(not(feature = "hydrate"), allow(dead_code))]
fn url(device: Option<&DeviceId>, last_id: EventId) -> String {
    match device {
        Some(id) => format!("/api/events?device={id}&last_event_id={last_id}"),
        None => format!("/api/events?last_event_id={last_id}"),
    }
}

#[cfg(feature = "hydrate")]
mod browser {
    use super::{Connection, Feed, Follower, silent, url};
    use crate::model::{DeviceId, EventId, Health, Ping, Snapshot, StatusEvent};
    use leptos::prelude::{GetUntracked, Set, set_timeout};
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;
    use std::time::Duration;
    use wasm_bindgen::JsCast;
    use wasm_bindgen::closure::Closure;
    use web_sys::{Event, EventSource, MessageEvent};

    const MAX_BACKOFF_MS: f64 = 30_000.0;

    pub struct Live<F> {
        feed: Feed,
        device: Option<DeviceId>,
        follower: F,
        last_id: Cell<EventId>,
        backoff_ms: Cell<f64>,
        closed: Cell<bool>,
        source: RefCell<Option<Source>>,
        /// When the stream last said anything (monotonic ms), and how
        /// often its server pings, once a ping told.
        heard_ms: Cell<f64>,
        ping_every_ms: Cell<Option<u64>>,
    }

    /// An open `EventSource` and the callbacks it holds.
    struct Source {
        events: EventSource,
        _on_open: Closure<dyn FnMut(Event)>,
        _on_error: Closure<dyn FnMut(Event)>,
        _on_snapshot: Closure<dyn FnMut(MessageEvent)>,
        _on_status: Closure<dyn FnMut(MessageEvent)>,
        _on_health: Closure<dyn FnMut(MessageEvent)>,
        _on_ping: Closure<dyn FnMut(MessageEvent)>,
    }

    impl<F: Follower> Live<F> {
        pub fn start(
            feed: Feed,
            device: Option<DeviceId>,
            last_id: EventId,
            follower: F,
        ) -> Rc<Self> {
            let live = Rc::new(Self {
                feed,
                device,
                follower,
                last_id: Cell::new(last_id),
                backoff_ms: Cell::new(1_000.0),
                closed: Cell::new(false),
                source: RefCell::new(None),
                heard_ms: Cell::new(monotonic_ms()),
                ping_every_ms: Cell::new(None),
            });
            live.open();
            live
        }

        pub fn close(&self) {
            self.closed.set(true);
            if let Some(source) = self.source.borrow_mut().take() {
                source.events.close();
            }
        }

        /// Called every second: a stream silent for too long is given up
        /// and opened again, resuming after the last event it brought.
        pub fn watch(self: &Rc<Self>) {
            let live = self.feed.connection.get_untracked() == Connection::Live;
            if live
                && silent(
                    self.heard_ms.get(),
                    self.ping_every_ms.get(),
                    monotonic_ms(),
                )
            {
                web_sys::console::warn_1(
                    &"Telltale: the event stream went silent; opening another".into(),
                );
                self.feed.connection.set(Connection::Reconnecting);
                self.open();
            }
        }

        /// The stream said something: it is alive.
        fn heard(&self) {
            self.heard_ms.set(monotonic_ms());
        }

        fn open(self: &Rc<Self>) {
            if self.closed.get() {
                return;
            }
            // The interval a ping told stays: a stream that opens and then
            // says nothing is watched from the start.
            self.heard();
            let events = match EventSource::new(&url(self.device.as_ref(), self.last_id.get())) {
                Ok(events) => events,
                Err(e) => {
                    web_sys::console::error_2(&"Telltale: cannot open the event stream".into(), &e);
                    self.feed.connection.set(Connection::Offline);
                    return;
                }
            };

            let live = self.clone();
            let on_open = Closure::<dyn FnMut(Event)>::new(move |_| {
                live.heard();
                live.backoff_ms.set(1_000.0);
                live.feed.connection.set(Connection::Live);
                // A server says so first thing when it is degraded.
                live.feed.degraded.set(None);
            });
            let live = self.clone();
            let on_ping = Closure::<dyn FnMut(MessageEvent)>::new(move |e: MessageEvent| {
                live.heard();
                if let Some(ping) = parse::<Ping>(&e) {
                    live.ping_every_ms.set(Some(ping.every));
                    live.feed.saw(ping.now);
                }
            });
            let live = self.clone();
            let on_health = Closure::<dyn FnMut(MessageEvent)>::new(move |e: MessageEvent| {
                live.heard();
                if let Some(health) = parse::<Health>(&e) {
                    live.feed.degraded.set(health.degraded);
                }
            });
            let live = self.clone();
            let on_error = Closure::<dyn FnMut(Event)>::new(move |_| live.on_error());
            let live = self.clone();
            let on_snapshot = Closure::<dyn FnMut(MessageEvent)>::new(move |e: MessageEvent| {
                live.heard();
                if let Some(snapshot) = parse::<Snapshot>(&e) {
                    if let Some(latest) = snapshot.devices.iter().map(|d| d.updated_at).max() {
                        live.feed.saw(latest.timestamp_millis());
                    }
                    live.last_id.set(snapshot.event_id);
                    live.follower.snapshot(snapshot);
                }
            });
            let live = self.clone();
            let on_status = Closure::<dyn FnMut(MessageEvent)>::new(move |e: MessageEvent| {
                live.heard();
                if let Some(status) = parse::<StatusEvent>(&e) {
                    if let Ok(id) = e.last_event_id().parse() {
                        live.last_id.set(id);
                    }
                    live.feed.saw(status.updated_at.timestamp_millis());
                    live.follower.status(live.last_id.get(), status);
                }
            });
            events.set_onopen(Some(on_open.as_ref().unchecked_ref()));
            events.set_onerror(Some(on_error.as_ref().unchecked_ref()));
            let _ = events
                .add_event_listener_with_callback("snapshot", on_snapshot.as_ref().unchecked_ref());
            let _ = events
                .add_event_listener_with_callback("status", on_status.as_ref().unchecked_ref());
            let _ = events
                .add_event_listener_with_callback("health", on_health.as_ref().unchecked_ref());
            let _ =
                events.add_event_listener_with_callback("ping", on_ping.as_ref().unchecked_ref());

            let old = self.source.borrow_mut().replace(Source {
                events,
                _on_open: on_open,
                _on_error: on_error,
                _on_snapshot: on_snapshot,
                _on_status: on_status,
                _on_health: on_health,
                _on_ping: on_ping,
            });
            if let Some(old) = old {
                old.events.close();
            }
        }

        fn on_error(self: &Rc<Self>) {
            let gave_up = self
                .source
                .borrow()
                .as_ref()
                .is_some_and(|s| s.events.ready_state() == EventSource::CLOSED);
            if !gave_up {
                // The browser is already retrying, with Last-Event-ID.
                self.feed.connection.set(Connection::Reconnecting);
                return;
            }
            self.feed.connection.set(Connection::Offline);
            let backoff = self.backoff_ms.get();
            self.backoff_ms.set((backoff * 2.0).min(MAX_BACKOFF_MS));
            let delay = backoff * (0.5 + js_sys::Math::random());
            let live = self.clone();
            set_timeout(move || live.open(), Duration::from_millis(delay as u64));
        }
    }

    /// Milliseconds on the page's monotonic clock (`performance.now()`).
    pub fn monotonic_ms() -> f64 {
        web_sys::window()
            .and_then(|w| w.performance())
            .map_or(0.0, |p| p.now())
    }

    fn parse<T: serde::de::DeserializeOwned>(e: &MessageEvent) -> Option<T> {
        let data = e.data().as_string()?;
        match serde_json::from_str(&data) {
            Ok(value) => Some(value),
            Err(err) => {
                web_sys::console::error_1(&format!("Telltale: unreadable event: {err}").into());
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_is_the_servers_by_the_latest_bound_it_saw() {
        let mut clock = Clock::default();
        // Rendered at 10 000 on the server; hydrated 800 ms later.
        clock.saw(10_000, 800.0);
        assert_eq!(clock.at(1_800.0), 11_000);
        // An event stamped 10 500 arrives at once at 900: the render took
        // 400 ms to arrive, so the server is 400 ms later than thought.
        clock.saw(10_500, 900.0);
        assert_eq!(clock.at(1_800.0), 11_400);
        // A replayed, older event moves nothing.
        clock.saw(2_000, 1_000.0);
        assert_eq!(clock.at(1_800.0), 11_400);
        // Before any bound, the local clock is all there is.
        assert_eq!(Clock::default().at(5.4), 5);
    }

    #[test]
    fn a_stream_is_silent_after_missing_three_pings_once_it_said_how_often() {
        assert!(
            !silent(1_000.0, None, 1_000_000.0),
            "interval not yet known"
        );
        assert!(!silent(1_000.0, Some(15_000), 46_000.0));
        assert!(silent(1_000.0, Some(15_000), 46_001.0));
        assert!(silent(0.0, Some(1_000), 3_500.0));
    }

    #[test]
    fn the_stream_follows_one_device_or_all_and_resumes() {
        assert_eq!(url(None, 7), "/api/events?last_event_id=7");
        let id = DeviceId::parse("rack-1").unwrap();
        assert_eq!(
            url(Some(&id), 7),
            "/api/events?device=rack-1&last_event_id=7"
        );
    }
}
