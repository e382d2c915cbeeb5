//! The page's subscription to `/api/events`: one `EventSource` for all
//! devices, kept open for the life of the dashboard.
//!
//! Reconnection is the browser's own: after a drop it retries and sends
//! `Last-Event-ID`, and the server replays what was missed. Only when the
//! browser gives up (the server answered with an error) do we open a new
//! `EventSource` ourselves, with backoff and `?last_event_id=`.

use super::dashboard::Board;
use crate::model::EventId;

/// Starts the stream once the page is hydrated, resuming after `rendered_at`
/// (the event id the server rendered), and closes it when the page goes.
pub fn connect(board: Board, rendered_at: EventId) {
    #[cfg(feature = "hydrate")]
    {
        use leptos::prelude::*;
        use send_wrapper::SendWrapper;
        use std::time::Duration;

        // Effects run only in the browser, after hydration.
        Effect::new(move |_| {
            let live = SendWrapper::new(browser::Live::start(board, rendered_at));
            let tick = move || board.now_ms.set(js_sys::Date::now() as i64);
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
    let _ = (board, rendered_at);
}

#[cfg(feature = "hydrate")]
mod browser {
    use super::super::dashboard::{Board, Connection};
    use crate::model::{EventId, Snapshot, StatusEvent};
    use leptos::prelude::{Set, set_timeout};
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;
    use std::time::Duration;
    use wasm_bindgen::JsCast;
    use wasm_bindgen::closure::Closure;
    use web_sys::{Event, EventSource, MessageEvent};

    const MAX_BACKOFF_MS: f64 = 30_000.0;

    pub struct Live {
        board: Board,
        last_id: Cell<EventId>,
        backoff_ms: Cell<f64>,
        closed: Cell<bool>,
        source: RefCell<Option<Source>>,
    }

    /// An open `EventSource` and the callbacks it holds.
    struct Source {
        events: EventSource,
        _on_open: Closure<dyn FnMut(Event)>,
        _on_error: Closure<dyn FnMut(Event)>,
        _on_snapshot: Closure<dyn FnMut(MessageEvent)>,
        _on_status: Closure<dyn FnMut(MessageEvent)>,
    }

    impl Live {
        pub fn start(board: Board, last_id: EventId) -> Rc<Self> {
            let live = Rc::new(Self {
                board,
                last_id: Cell::new(last_id),
                backoff_ms: Cell::new(1_000.0),
                closed: Cell::new(false),
                source: RefCell::new(None),
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

        fn open(self: &Rc<Self>) {
            if self.closed.get() {
                return;
            }
            let url = format!("/api/events?last_event_id={}", self.last_id.get());
            let events = match EventSource::new(&url) {
                Ok(events) => events,
                Err(e) => {
                    web_sys::console::error_2(&"Telltale: cannot open the event stream".into(), &e);
                    self.board.connection.set(Connection::Offline);
                    return;
                }
            };

            let live = self.clone();
            let on_open = Closure::<dyn FnMut(Event)>::new(move |_| {
                live.backoff_ms.set(1_000.0);
                live.board.connection.set(Connection::Live);
            });
            let live = self.clone();
            let on_error = Closure::<dyn FnMut(Event)>::new(move |_| live.on_error());
            let live = self.clone();
            let on_snapshot = Closure::<dyn FnMut(MessageEvent)>::new(move |e: MessageEvent| {
                if let Some(snapshot) = parse::<Snapshot>(&e) {
                    live.last_id.set(snapshot.event_id);
                    live.board.apply_snapshot(snapshot);
                }
            });
            let live = self.clone();
            let on_status = Closure::<dyn FnMut(MessageEvent)>::new(move |e: MessageEvent| {
                if let Some(status) = parse::<StatusEvent>(&e) {
                    if let Ok(id) = e.last_event_id().parse() {
                        live.last_id.set(id);
                    }
                    live.board.apply_status(status);
                }
            });
            events.set_onopen(Some(on_open.as_ref().unchecked_ref()));
            events.set_onerror(Some(on_error.as_ref().unchecked_ref()));
            let _ = events
                .add_event_listener_with_callback("snapshot", on_snapshot.as_ref().unchecked_ref());
            let _ = events
                .add_event_listener_with_callback("status", on_status.as_ref().unchecked_ref());

            let old = self.source.borrow_mut().replace(Source {
                events,
                _on_open: on_open,
                _on_error: on_error,
                _on_snapshot: on_snapshot,
                _on_status: on_status,
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
                self.board.connection.set(Connection::Reconnecting);
                return;
            }
            self.board.connection.set(Connection::Offline);
            let backoff = self.backoff_ms.get();
            self.backoff_ms.set((backoff * 2.0).min(MAX_BACKOFF_MS));
            let delay = backoff * (0.5 + js_sys::Math::random());
            let live = self.clone();
            set_timeout(move || live.open(), Duration::from_millis(delay as u64));
        }
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
