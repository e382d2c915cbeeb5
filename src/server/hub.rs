//! The hub: the one owner of live device state and event ids.
//!
//! Every change goes through [`Hub::apply`]; the SSE route, the page's first
//! render and `GET /api/devices` all read from here, so they always agree.
//!
//! Guarantees:
//! - Event ids are contiguous and only grow. With a [`Store`], every event is
//!   committed to it (event row, device row, readings in one transaction)
//!   before it is published or the caller answered; a failed commit publishes
//!   nothing and uses up no id. On start the hub loads the devices and goes on
//!   from the newest stored id, so ids are never reused across restarts.
//!   Without a store (unit tests), or with an empty one (a fresh data
//!   directory, `--memory`), the first id of a
//!   process is the start time in microseconds, so a client that saw ids from
//!   an earlier run of the server can never mistake the new run's ids for
//!   ones it has seen: its old id is either below the ring (snapshot) or above
//!   the current id (unknown, snapshot).
//! - A subscription's starting point (snapshot or replay) and its live
//!   receiver are taken under the same lock as publishing, so a subscriber
//!   sees every later event exactly once, in order. Replay comes from the
//!   ring, or, for an id older than the ring, from the store (read under the
//!   same lock, so the hand-over to the live receiver has no gap and no
//!   duplicate).
//! - Each event is serialized once, when it is published; subscribers share
//!   it through an `Arc`.
//! - Fan-out is a `tokio::sync::broadcast` channel: the publisher never waits
//!   for a subscriber, and a subscriber that falls more than `client_queue`
//!   events behind is told it lagged and resynchronises with a snapshot.
//!
//! - Alerts and staleness are part of a device's state, kept here under the
//!   same lock: every accepted update re-evaluates the device's alerts
//!   against its limits ([`thresholds`](super::thresholds)) and counts as a
//!   sign of life ([`stale`](super::stale)); a change of either is published
//!   as a status event like any other.
//!
//! - In cluster mode ([`cluster`](super::cluster)) the hub is one replica
//!   of the cluster's state: a change is published to Redis first, as the
//!   next global id, and only if this hub has applied every earlier event
//!   (otherwise it catches up from Redis and computes the change again);
//!   the other instances' events arrive through [`Hub::follow`] and are
//!   applied, stored and fanned out here exactly like local ones.

use super::auth::{self, Session};
use super::cluster::{Append, Broker};
use super::history::{self, Readers};
use super::stale::{StalePolicy, Watch};
use super::store::{Recorded, Store, StoreError, StoredEvent};
use super::thresholds::{MetricLimits, Thresholds, ThresholdsFile, ThresholdsView};
use crate::model::{
    Changed, Device, DeviceId, EventId, FieldError, History, Online, Snapshot, Status, StatusEvent,
    StatusUpdate,
};
use axum::body::Bytes;
use axum::extract::ws::Utf8Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

/// One published change, serialized once for every subscriber.
#[derive(Debug)]
pub struct Published {
    pub id: EventId,
    pub device: DeviceId,
    /// The JSON of a [`StatusEvent`].
    pub json: Box<str>,
    /// The complete SSE frame (`event: status`, `id`, `data`).
    pub sse: Bytes,
    /// The complete WebSocket text frame, a `ServerMessage::Status`.
    pub ws: Utf8Bytes,
}

impl Published {
    fn new(id: EventId, device: DeviceId, json: Box<str>) -> Self {
        Self {
            id,
            sse: super::sse::frame("status", Some(id), &json),
            ws: ws_frame("status", id, &json),
            device,
            json,
        }
    }
}

/// Why [`Hub::apply`] changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The update is not valid for this device.
    #[error("{}", .0.message)]
    Invalid(FieldError),
    /// The change could not be made durable, so it was not made at all.
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Why [`Hub::remove`] removed nothing.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("unknown device `{0}`")]
    Unknown(DeviceId),
    /// Its agent (or the simulator) would register it again at once.
    #[error(
        "`{0}` is connected (its agent or the simulator reports for it): stop that first, \
         or it would come straight back"
    )]
    Connected(DeviceId),
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl From<FieldError> for ApplyError {
    fn from(e: FieldError) -> Self {
        Self::Invalid(e)
    }
}

/// At most this many events are replayed from the store; a client further
/// behind starts from a snapshot (cheaper than replaying them all).
pub const MAX_STORE_REPLAY: u64 = 100_000;

/// What [`Hub::apply`] did: the current event id and whether it was a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub id: EventId,
    pub changed: bool,
}

/// One update of a batch (see [`Hub::apply_all`]), and its place in the
/// request, which an error names: `rack-1`, or `rack-1[2]` in an array.
pub struct Entry {
    pub place: String,
    pub device: DeviceId,
    pub update: StatusUpdate,
}

/// Which devices a subscriber wants; empty means all.
#[derive(Clone, Debug, Default)]
pub struct Filter(BTreeSet<DeviceId>);

impl Filter {
    pub fn new(ids: impl IntoIterator<Item = DeviceId>) -> Self {
        Self(ids.into_iter().collect())
    }

    pub fn matches(&self, id: &DeviceId) -> bool {
        self.0.is_empty() || self.0.contains(id)
    }
}

/// Where a new subscriber starts.
#[derive(Debug)]
pub enum Start {
    /// The full (filtered) state: the client knew nothing, or too little.
    Snapshot(Snapshot),
    /// Exactly the events the client missed, oldest first (possibly none).
    Replay(Vec<Arc<Published>>),
    /// Exactly the events in `after+1 ..= upto`, which the store holds
    /// (all of them, when subscribing): more than [`REPLAY_PAGE`], so they
    /// are read a page at a time with [`Hub::replay_page`] as the client
    /// takes them. A client far behind never holds its whole absence.
    Stored { after: EventId, upto: EventId },
}

/// The most events a replay from the store reads (and holds) at once.
pub const REPLAY_PAGE: u64 = 1_000;

pub struct Subscription {
    pub start: Start,
    pub events: broadcast::Receiver<Arc<Published>>,
}

pub struct Hub {
    state: Mutex<State>,
    ring_capacity: usize,
    client_queue: usize,
    /// Cluster mode: the connection changes are published on, only ever
    /// locked under `state`.
    broker: Option<Mutex<Broker>>,
    /// Cluster mode: why this instance cannot publish right now (Redis is
    /// unreachable, or not yet joined), shown on `/healthz` and the page.
    degraded: watch::Sender<Option<String>>,
    /// Wakes the stale watcher when a deadline moves earlier.
    stale_wake: Notify,
    /// History reads, on connections of their own (pooled): never under
    /// `state`.
    history: Option<Readers>,
    /// Updates waiting for the `state` lock: whoever takes it next applies
    /// them all and records them with one commit (see [`Hub::apply`]).
    waiting: Mutex<Vec<Arc<Waiting>>>,
    /// The store fsyncs each commit.
    fsyncs: bool,
    /// Operator sessions signed out before their end: id → that end (Unix
    /// seconds). Kept in the store and, in cluster mode, shared through
    /// Redis, like limits.
    signed_out: Mutex<HashMap<String, i64>>,
}

/// An update waiting to be applied, and then its result.
struct Waiting {
    device: DeviceId,
    update: StatusUpdate,
    result: Mutex<Option<Result<Applied, ApplyError>>>,
}

/// Changes made under one lock and recorded with one commit (see
/// [`Hub::in_group`]): made in memory at once, so each sees the ones before
/// it; sent to subscribers once recorded; undone if recording fails.
struct Group {
    records: Vec<Recorded>,
    published: Vec<Arc<Published>>,
    /// Signs of life (device, learn from it), noted once recorded: a
    /// group run again must not count them twice.
    heard: Vec<(DeviceId, bool)>,
    /// Each changed device as it was before the group (`None`: new).
    before: BTreeMap<DeviceId, Option<Device>>,
    last_id: EventId,
    fresh: bool,
}

struct State {
    devices: BTreeMap<DeviceId, Device>,
    last_id: EventId,
    /// `last_id` is this process's start time, not an id of any event: a
    /// new hub with nothing stored, which in cluster mode adopts the
    /// cluster's state rather than offering its own.
    fresh: bool,
    sender: broadcast::Sender<Arc<Published>>,
    /// The newest events, ids `last_id - ring.len() + 1 ..= last_id`.
    ring: VecDeque<Arc<Published>>,
    /// Where every event is made durable; `None` for a storeless hub.
    store: Option<Store>,
    thresholds: Thresholds,
    watch: Watch,
    /// How far back an update's `at` may go: raw readings are kept this
    /// long (older ones are folded into minutes, and a reading older still
    /// would miss that).
    readings_kept: Duration,
    /// Open while [`Hub::apply`] applies a group of updates.
    group: Option<Group>,
    /// Cluster mode: this instance's events that may have reached Redis but
    /// whose commit to the store failed; recorded when they come back from
    /// the stream (see [`Hub::apply_remote`]).
    unsure: BTreeSet<EventId>,
}

impl State {
    fn open_group(&mut self) {
        self.group = Some(Group {
            records: Vec::new(),
            published: Vec::new(),
            heard: Vec::new(),
            before: BTreeMap::new(),
            last_id: self.last_id,
            fresh: self.fresh,
        });
    }

    /// Takes back the changes of a group that was not recorded.
    fn undo(&mut self, group: Group) {
        for (id, before) in group.before {
            match before {
                Some(device) => self.devices.insert(id, device),
                None => self.devices.remove(&id),
            };
        }
        self.last_id = group.last_id;
        self.fresh = group.fresh;
    }
}

impl Hub {
    /// `ring_capacity` events are kept for replay; a subscriber may fall
    /// `client_queue` events behind before it is resynchronised.
    pub fn new(ring_capacity: usize, client_queue: usize) -> Self {
        Self::starting_at(now_micros(), ring_capacity, client_queue)
    }

    /// A hub backed by `store`: it starts with the stored devices and goes
    /// on from the newest stored event id.
    pub fn with_store(
        store: Store,
        ring_capacity: usize,
        client_queue: usize,
    ) -> Result<Self, StoreError> {
        let devices = store.devices()?;
        // The newest id ever issued, even when its event was pruned.
        let stored = store.last_event_id()?;
        let mut hub = Self::starting_at(
            stored.unwrap_or_else(now_micros),
            ring_capacity,
            client_queue,
        );
        hub.history = Some(history::readers(store.connector())?);
        hub.fsyncs = store.fsyncs();
        hub.keep_signed_out(store.signed_out(auth::now())?);
        {
            let mut state = hub.lock();
            state.fresh = stored.is_none();
            state.devices = devices.into_iter().map(|d| (d.id.clone(), d)).collect();
            state.store = Some(store);
        }
        Ok(hub)
    }

    fn starting_at(last_id: EventId, ring_capacity: usize, client_queue: usize) -> Self {
        let (sender, _) = broadcast::channel(client_queue.max(1));
        Self {
            state: Mutex::new(State {
                devices: BTreeMap::new(),
                last_id,
                fresh: true,
                sender,
                ring: VecDeque::with_capacity(ring_capacity),
                store: None,
                thresholds: Thresholds::default(),
                watch: Watch::default(),
                readings_kept: Duration::from_secs(48 * 3600),
                group: None,
                unsure: BTreeSet::new(),
            }),
            ring_capacity,
            client_queue,
            broker: None,
            degraded: watch::Sender::new(None),
            stale_wake: Notify::new(),
            history: None,
            waiting: Mutex::default(),
            fsyncs: false,
            signed_out: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is only changed by code that cannot panic halfway, so a
        // poisoned lock still guards consistent data.
        let mut state = lock(&self.state);
        // A group is closed before the lock is let go, unless applying it
        // panicked: its changes were never recorded, so they are undone.
        if let Some(group) = state.group.take() {
            state.undo(group);
        }
        state
    }

    /// Applies a validated update. A new id registers the device; only a real
    /// change is published, once it is durable. Every accepted update, changed
    /// or not, is a sign of life: it clears `stale` (an event of its own when
    /// nothing else changed), and its alerts are evaluated afresh.
    ///
    /// Group commit: while one update waits for its fsync (and, in cluster
    /// mode, for Redis), the others queue; the next to take the lock
    /// applies every queued update and records them all with one commit
    /// (and one append to the cluster's stream), each answered only once it
    /// is durable.
    pub fn apply(&self, id: &DeviceId, update: &StatusUpdate) -> Result<Applied, ApplyError> {
        if self.fsyncs || self.broker.is_some() {
            // The wait may last another group's fsync: the runtime moves
            // this worker's other tasks elsewhere meanwhile, so any number
            // of updates can wait at once (and be recorded together).
            return tokio::task::block_in_place(|| self.apply_in_group(id, update));
        }
        self.apply_in_group(id, update)
    }

    /// Applies validated updates in order (a device may have several) as
    /// one group: all are recorded with one commit, or none is (an update
    /// its device cannot take, a store that fails). An invalid update names
    /// its field after its place: `rack-1.metrics`, `rack-1[2].at`.
    pub fn apply_all(&self, batch: &[Entry]) -> Result<Vec<Applied>, ApplyError> {
        let run = || {
            let mut state = self.lock();
            let (applied, recorded) = self.in_group_unless(
                &mut state,
                |state| {
                    batch
                        .iter()
                        .map(|entry| {
                            self.apply_to(state, &entry.device, &entry.update).map_err(
                                |e| match e {
                                    ApplyError::Invalid(e) => ApplyError::Invalid(FieldError::new(
                                        format!("{}.{}", entry.place, e.field),
                                        e.message,
                                    )),
                                    e => e,
                                },
                            )
                        })
                        .collect::<Result<Vec<_>, _>>()
                },
                Result::is_err,
            );
            recorded?;
            applied
        };
        if self.fsyncs || self.broker.is_some() {
            tokio::task::block_in_place(run)
        } else {
            run()
        }
    }

    fn apply_in_group(&self, id: &DeviceId, update: &StatusUpdate) -> Result<Applied, ApplyError> {
        let mine = Arc::new(Waiting {
            device: id.clone(),
            update: update.clone(),
            result: Mutex::default(),
        });
        lock(&self.waiting).push(mine.clone());
        let mut state = self.lock();
        if lock(&mine.result).is_none() {
            let group = std::mem::take(&mut *lock(&self.waiting));
            self.apply_group(&mut state, &group);
        }
        let result = lock(&mine.result).take();
        // Only a panic while applying a group leaves a result unset.
        result.unwrap_or_else(|| Err(StoreError::Lost("its group failed halfway".into()).into()))
    }

    /// Applies `group` in order, records its changes with one commit, then
    /// sends them to subscribers; if recording fails, undoes them all and
    /// answers each update with the failure.
    fn apply_group(&self, state: &mut State, group: &[Arc<Waiting>]) {
        let (results, recorded) = self.in_group(state, |state| {
            group
                .iter()
                .map(|w| self.apply_to(state, &w.device, &w.update))
                .collect::<Vec<_>>()
        });
        let failed = recorded.err().map(Arc::new);
        for (waiting, result) in group.iter().zip(results) {
            let result = match &failed {
                Some(e) => result.and(Err(StoreError::Group(e.clone()).into())),
                None => result,
            };
            *lock(&waiting.result) = Some(result);
        }
    }

    /// Runs `changes` with a group open, then records the events they made
    /// with one commit, sends them to subscribers and notes the signs of
    /// life; if recording fails, undoes them all. In cluster mode the events
    /// are published first, as one append to the cluster's stream; when
    /// another instance published first, the hub catches up and runs
    /// `changes` again, on the newer state. Returns what the last run of
    /// `changes` returned, and whether its events were recorded.
    fn in_group<T>(
        &self,
        state: &mut State,
        changes: impl FnMut(&mut State) -> T,
    ) -> (T, Result<(), StoreError>) {
        self.in_group_unless(state, changes, |_| false)
    }

    /// [`in_group`](Self::in_group), but when `abandon` says so of what
    /// `changes` returned, they are undone, not recorded.
    fn in_group_unless<T>(
        &self,
        state: &mut State,
        mut changes: impl FnMut(&mut State) -> T,
        abandon: impl Fn(&T) -> bool,
    ) -> (T, Result<(), StoreError>) {
        const ATTEMPTS: usize = 100;
        let mut attempts = 0;
        loop {
            state.open_group();
            let out = changes(state);
            let done = state.group.take().expect("the group is open");
            if abandon(&out) {
                state.undo(done);
                return (out, Ok(()));
            }
            let error = match self.record_group(state, &done) {
                Ok(()) => {
                    for published in done.published {
                        self.send(state, published);
                    }
                    for (id, learn) in done.heard {
                        self.heard(state, &id, learn);
                    }
                    return (out, Ok(()));
                }
                Err(e) => e,
            };
            state.undo(done);
            match error {
                StoreError::Behind if attempts < ATTEMPTS => {
                    attempts += 1;
                    if let Err(e) = self.catch_up(state) {
                        return (out, Err(e));
                    }
                }
                StoreError::Behind => {
                    let e = "the cluster changed too fast to catch up with";
                    return (out, Err(StoreError::Broker(e.into())));
                }
                e => return (out, Err(e)),
            }
        }
    }

    /// Makes a group's events durable with one commit; in cluster mode,
    /// publishes them through Redis in the same step (see
    /// [`Store::record_all_then`]).
    fn record_group(&self, state: &mut State, done: &Group) -> Result<(), StoreError> {
        if done.records.is_empty() {
            return Ok(());
        }
        let Some(broker) = &self.broker else {
            return match &mut state.store {
                // The commit waits for an fsync: let the runtime move this
                // worker's other tasks elsewhere meanwhile. Without one
                // (`--memory`) the commit takes microseconds, less than
                // handing the worker over would.
                Some(store) if store.fsyncs() => {
                    tokio::task::block_in_place(|| store.record_all(&done.records))
                }
                Some(store) => store.record_all(&done.records),
                None => Ok(()),
            };
        };
        let mut broker = lock(broker);
        let mut sent = false;
        let mut append = || {
            sent = true;
            let events = done.records.iter().map(|r| (r.id, &r.device.id, &*r.json));
            match broker.append(done.last_id, events)? {
                Append::Done => Ok(()),
                Append::Behind => Err(StoreError::Behind),
            }
        };
        // A store or Redis that fails leaves neither with the events. A
        // failure is the callers' 503; whether the instance is degraded is
        // for the follower, which watches Redis, to say.
        let published = tokio::task::block_in_place(|| match state.store.as_mut() {
            Some(store) => store.record_all_then(&done.records, append),
            None => append(),
        });
        match published {
            Err(e) if sent && !matches!(e, StoreError::Behind) => {
                // Redis may have them (a commit that failed, an answer that
                // never came): if so, they come back through the follower,
                // which records them then.
                state.unsure.extend(done.records.iter().map(|r| r.id));
                Err(match e {
                    StoreError::Broker(_) => e,
                    e => StoreError::Unconfirmed(e.to_string()),
                })
            }
            other => other,
        }
    }

    fn apply_to(
        &self,
        state: &mut State,
        id: &DeviceId,
        update: &StatusUpdate,
    ) -> Result<Applied, ApplyError> {
        let previous = state.devices.get(id);
        let now = Utc::now();
        let oldest = now - state.readings_kept;
        // A device registered by its agent's hello has no readings yet:
        // those it kept while away may be older than that hello.
        let last = previous
            .filter(|p| p.status != Status::default())
            .map(|p| p.updated_at);
        let at = update.time(now, oldest, last)?;
        let mut device = previous.cloned().unwrap_or_else(|| Device::new(id.clone()));
        let reported_change = update.apply_to(&mut device)? || previous.is_none();
        // The silence that ends a stale or offline spell is an outage, not
        // the device's report interval.
        let learn = previous.is_some_and(|p| !p.stale && p.online != Some(false));
        device.stale = false;
        state.thresholds.judge(&mut device);
        let changed = previous != Some(&device);
        let applied = if reported_change {
            device.updated_at = at;
            self.publish_as_is(state, device)?
        } else if changed {
            // Only `stale` (or the alerts) changed: the readings are as
            // old as they were, so `updated_at` stays.
            self.publish_as_is(state, device)?
        } else {
            self.tell_heard(id);
            Applied {
                id: state.last_id,
                changed: false,
            }
        };
        self.heard_later(state, id, learn);
        Ok(applied)
    }

    /// Cluster mode: an update that changed nothing publishes no event, so
    /// the other instances are told the device spoke (see [`Self::heard_elsewhere`]).
    /// Best effort: a lost notice costs at most a stale mark, undone by the
    /// device's next report.
    fn tell_heard(&self, id: &DeviceId) {
        let Some(broker) = &self.broker else {
            return;
        };
        if self.degraded().is_some() {
            return;
        }
        let mut broker = broker.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = tokio::task::block_in_place(|| broker.heard(id)) {
            tracing::debug!("telling the cluster {id} spoke: {e}");
        }
    }

    /// Cluster mode: `id` reported to another instance without changing
    /// anything: a sign of life, as if it had reported here.
    pub fn heard_elsewhere(&self, id: &DeviceId) {
        let mut state = self.lock();
        let Some(device) = state.devices.get(id) else {
            return;
        };
        let learn = !device.stale && device.online != Some(false);
        self.heard(&mut state, id, learn);
    }

    /// Runs a change on the state, as a group of its own (see
    /// [`in_group`](Self::in_group)).
    fn write<T, E: From<StoreError>>(
        &self,
        change: impl FnMut(&mut State) -> Result<T, E>,
    ) -> Result<T, E> {
        let (out, recorded) = self.in_group(&mut self.lock(), change);
        recorded?;
        out
    }

    /// [`heard`](Self::heard), once the group open (if any) is recorded.
    fn heard_later(&self, state: &mut State, id: &DeviceId, learn: bool) {
        match &mut state.group {
            Some(group) => group.heard.push((id.clone(), learn)),
            None => self.heard(state, id, learn),
        }
    }

    /// Notes a sign of life from `id` now (see [`Watch::heard`]), and saves
    /// its learned interval when that is new or has moved (a failure to save
    /// is only logged: it is tried again on a later report).
    fn heard(&self, state: &mut State, id: &DeviceId, learn: bool) {
        if state.watch.heard(id, Instant::now(), learn) {
            self.stale_wake.notify_one();
        }
        let Some(interval) = state.watch.to_save(id) else {
            return;
        };
        if let Some(store) = &mut state.store {
            match tokio::task::block_in_place(|| store.save_report_interval(id, interval)) {
                Ok(()) => state.watch.saved(id, interval),
                Err(e) => tracing::warn!("saving the report interval of {id}: {e}"),
            }
        }
    }

    /// Records whether `id` has a live link; publishes a status event when
    /// that changes. An unknown id is registered (an agent said hello before
    /// its first report). Either way the device is no longer stale: a new
    /// link is a sign of life, and a lost one is news of its own.
    pub fn set_online(&self, id: &DeviceId, online: Online) -> Result<Applied, StoreError> {
        self.write(|state| self.set_online_in(state, id, online))
    }

    fn set_online_in(
        &self,
        state: &mut State,
        id: &DeviceId,
        online: Online,
    ) -> Result<Applied, StoreError> {
        let device = match state.devices.get(id) {
            Some(d) if d.online == online => {
                return Ok(Applied {
                    id: state.last_id,
                    changed: false,
                });
            }
            Some(d) => Device {
                online,
                stale: false,
                ..d.clone()
            },
            None => Device {
                online,
                ..Device::new(id.clone())
            },
        };
        // `updated_at` stays the time of its last reported change: a link
        // is no reading (and readings the agent kept meanwhile may follow,
        // each `at` its own time).
        let applied = self.publish_as_is(state, device)?;
        self.heard_later(state, id, false);
        Ok(applied)
    }

    /// Removes device `id`: publishes its last state marked `removed`,
    /// then forgets it (its state, history and learned report interval; its
    /// limits stay, as configuration). A device with a live link is
    /// refused: its agent would register it again at once.
    pub fn remove(&self, id: &DeviceId) -> Result<Applied, RemoveError> {
        self.write(|state| {
            let device = match state.devices.get(id) {
                None => return Err(RemoveError::Unknown(id.clone())),
                Some(d) if d.online == Some(true) => {
                    return Err(RemoveError::Connected(id.clone()));
                }
                Some(d) => Device {
                    updated_at: Utc::now(),
                    ..d.clone()
                },
            };
            Ok(self.publish_event(state, device, true)?)
        })
    }

    /// Stores a changed device under a new event id — durably first, when
    /// there is a store — and sends it to every subscriber, serialized once.
    /// When the store fails, nothing changes. `updated_at` is as the caller
    /// set it: the time of the device's last reported change (a change it
    /// did not report — stale, its link, alerts under new limits — keeps it).
    fn publish_as_is(&self, state: &mut State, device: Device) -> Result<Applied, StoreError> {
        self.publish_event(state, device, false)
    }

    /// Publishes `device`'s state as the next event; with `removed`, its
    /// last state as it is removed.
    fn publish_event(
        &self,
        state: &mut State,
        device: Device,
        removed: bool,
    ) -> Result<Applied, StoreError> {
        debug_assert!(
            state.group.is_some(),
            "changes are made in groups (in_group)"
        );
        if self.broker.is_some()
            && let Some(reason) = self.degraded()
        {
            return Err(StoreError::Broker(reason));
        }
        let id = state.last_id + 1;
        let event = StatusEvent {
            removed,
            ..StatusEvent::from(&device)
        };
        let json: Box<str> = serde_json::to_string(&event)
            .expect("a status always serializes")
            .into();
        self.commit(state, id, device, json, removed);
        Ok(Applied { id, changed: true })
    }

    /// Makes event `id` (the next one) this hub's current state: with a
    /// group open, for the group to record and send; else (another
    /// instance's event, already recorded where it must be) sent to every
    /// subscriber. With `removed`, the event removes the device.
    fn commit(
        &self,
        state: &mut State,
        id: EventId,
        device: Device,
        json: Box<str>,
        removed: bool,
    ) {
        if let Some(group) = &mut state.group {
            // Recorded, and sent, with the rest of the group.
            let before = state.devices.get(&device.id).cloned();
            group.records.push(Recorded {
                id,
                device: device.clone(),
                previous: before.clone(),
                json: json.clone(),
                removed,
            });
            group.before.entry(device.id.clone()).or_insert(before);
        }
        state.last_id = id;
        state.fresh = false;
        let published = Arc::new(Published::new(id, device.id.clone(), json));
        if removed {
            // Should the group be undone, the device is only watched
            // again from its next report.
            state.watch.forget(&device.id);
            state.devices.remove(&device.id);
        } else {
            state.devices.insert(device.id.clone(), device);
        }
        match &mut state.group {
            Some(group) => group.published.push(published),
            None => self.send(state, published),
        }
    }

    /// Keeps a durable event for replay and sends it to every subscriber.
    fn send(&self, state: &mut State, published: Arc<Published>) {
        if state.ring.len() == self.ring_capacity {
            state.ring.pop_front();
        }
        if self.ring_capacity > 0 {
            state.ring.push_back(published.clone());
        }
        // No receivers is fine: nobody is watching.
        let _ = state.sender.send(published);
    }

    /// Takes updates whose `at` is up to `raw` ago: the raw readings'
    /// retention.
    pub fn keep_readings_for(&self, raw: Duration) {
        self.lock().readings_kept = raw;
    }

    /// Starts alerts and staleness: the limits (the file's, plus those set
    /// over the API and kept in the store, which win) and how long devices
    /// may stay silent. Every known device counts as just heard from. A
    /// device whose alerts differ under these limits from the stored ones
    /// (the file changed) is published at once.
    pub fn configure_alerts(
        &self,
        mut thresholds: Thresholds,
        policy: StalePolicy,
    ) -> Result<(), StoreError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut intervals = Vec::new();
        if let Some(store) = &state.store {
            for (device, limits) in store.device_limits()? {
                thresholds.set_own(device, limits);
            }
            intervals = store.report_intervals()?;
        }
        state.thresholds = thresholds;
        state.watch = Watch::new(policy);
        let now = Instant::now();
        for (id, interval) in intervals {
            if state.devices.contains_key(&id) {
                state.watch.seed(&id, interval, now);
            }
        }
        let ids: Vec<DeviceId> = state.devices.keys().cloned().collect();
        for id in &ids {
            self.heard(state, id, false);
        }
        drop(guard);
        self.reevaluate_all()
    }

    /// Takes up the thresholds file read again (on SIGHUP): its limits and
    /// `stale_after`s replace those it had before; limits set over the API
    /// stay. A device whose alerts change is published at once, and a
    /// device silent past a deadline that is now shorter becomes stale.
    pub fn reload_file(&self, file: ThresholdsFile) -> Result<(), StoreError> {
        {
            let mut state = self.lock();
            state.thresholds.replace_file(file.thresholds);
            state
                .watch
                .replace_file(file.stale_after, file.device_stale_after);
        }
        self.stale_wake.notify_one();
        self.reevaluate_all()
    }

    /// Judges every device by the limits in force, publishing each whose
    /// alerts change. Stops at the first change that cannot be recorded
    /// (the others would fail alike); in cluster mode the next join of the
    /// cluster goes through them all again.
    fn reevaluate_all(&self) -> Result<(), StoreError> {
        let ids: Vec<DeviceId> = self.lock().devices.keys().cloned().collect();
        for id in &ids {
            self.write(|state| self.reevaluate(state, id))?;
        }
        Ok(())
    }

    /// Replaces `device`'s own limits (kept in the store first, when there
    /// is one), then evaluates it at once: a change of its alerts is
    /// published. The device need not be known yet.
    ///
    /// When the limits are stored but the event cannot be, the error is
    /// returned and the limits stay in force; sending them again publishes
    /// the alerts.
    pub fn set_limits(
        &self,
        device: &DeviceId,
        limits: MetricLimits,
    ) -> Result<Applied, StoreError> {
        if let Some(broker) = &self.broker {
            // Every instance evaluates this device's reports: all must
            // have its limits, or none.
            if let Some(reason) = self.degraded() {
                return Err(StoreError::Broker(reason));
            }
            let mut broker = broker.lock().unwrap_or_else(|e| e.into_inner());
            tokio::task::block_in_place(|| broker.share_limits(device, &limits))?;
        }
        self.keep_limits(device, limits)?;
        self.write(|state| self.reevaluate(state, device))
    }

    /// Cluster mode: another instance set `device`'s own limits, and
    /// publishes what they change. Evaluated here too, on the cluster's
    /// latest state: should this instance have judged a report by the old
    /// limits meanwhile, the correction is published (once in the cluster:
    /// an instance behind catches up first and finds nothing to change).
    pub fn limits_elsewhere(
        &self,
        device: &DeviceId,
        limits: MetricLimits,
    ) -> Result<(), StoreError> {
        self.keep_limits(device, limits)?;
        self.write(|state| self.reevaluate(state, device))
            .map(|_| ())
    }

    fn keep_limits(&self, device: &DeviceId, limits: MetricLimits) -> Result<(), StoreError> {
        let mut state = self.lock();
        if let Some(store) = &mut state.store {
            tokio::task::block_in_place(|| store.set_device_limits(device, &limits))?;
        }
        state.thresholds.set_own(device.clone(), limits);
        Ok(())
    }

    /// Signs `session` out: no instance accepts its cookie again, even
    /// after a restart. Kept here at once; an error means it could not be
    /// stored or shared, so it may hold on this instance only.
    pub fn sign_out(&self, session: &Session) -> Result<(), StoreError> {
        self.keep_signed_out([(session.id.clone(), session.expires)]);
        if let Some(store) = &mut self.lock().store {
            tokio::task::block_in_place(|| store.save_signed_out(session, auth::now()))?;
        }
        if let Some(broker) = &self.broker {
            let mut broker = broker.lock().unwrap_or_else(|e| e.into_inner());
            tokio::task::block_in_place(|| broker.share_signed_out(session))?;
        }
        Ok(())
    }

    /// Cluster mode: another instance signed `session` out.
    pub fn signed_out_elsewhere(&self, session: &Session) -> Result<(), StoreError> {
        self.keep_signed_out([(session.id.clone(), session.expires)]);
        match &mut self.lock().store {
            Some(store) => {
                tokio::task::block_in_place(|| store.save_signed_out(session, auth::now()))
            }
            None => Ok(()),
        }
    }

    /// Whether session `id` was signed out.
    pub fn signed_out(&self, id: &str) -> bool {
        lock(&self.signed_out).contains_key(id)
    }

    fn keep_signed_out(&self, sessions: impl IntoIterator<Item = (String, i64)>) {
        let now = auth::now();
        let mut signed_out = lock(&self.signed_out);
        signed_out.retain(|_, expires| *expires > now);
        signed_out.extend(sessions.into_iter().filter(|(_, expires)| *expires > now));
    }

    /// Every configured limit (`GET /api/thresholds`).
    pub fn thresholds(&self) -> ThresholdsView {
        self.lock().thresholds.view()
    }

    /// `device`'s own limits, if it has any.
    pub fn own_limits(&self, device: &DeviceId) -> Option<MetricLimits> {
        self.lock().thresholds.own(device).cloned()
    }

    /// Publishes `id`'s limits, and the alerts they make, if they changed.
    fn reevaluate(&self, state: &mut State, id: &DeviceId) -> Result<Applied, StoreError> {
        let unchanged = Applied {
            id: state.last_id,
            changed: false,
        };
        let Some(device) = state.devices.get(id) else {
            return Ok(unchanged);
        };
        let mut judged = device.clone();
        state.thresholds.judge(&mut judged);
        if &judged == device {
            return Ok(unchanged);
        }
        self.publish_as_is(state, judged)
    }

    /// Marks stale every device silent past its deadline at `now`; returns
    /// the next deadline, for the watcher ([`stale::run`](super::stale::run))
    /// to sleep until. A device that is offline, already stale, or without a
    /// deadline is not watched. A mark that cannot be stored is retried.
    pub fn mark_stale(&self, now: Instant) -> Option<Instant> {
        const RETRY: Duration = Duration::from_secs(1);
        if self.broker.is_some() && self.degraded().is_some() {
            // Nothing can be published meanwhile: look again later.
            return Some(now + RETRY);
        }
        let mut state = self.lock();
        let state = &mut *state;
        let mut next: Option<Instant> = None;
        let mut due = Vec::new();
        for device in state.devices.values() {
            if device.stale || device.online == Some(false) {
                continue;
            }
            match state.watch.deadline(&device.id) {
                Some(deadline) if deadline <= now => due.push(device.id.clone()),
                Some(deadline) => next = Some(next.map_or(deadline, |n| n.min(deadline))),
                None => {}
            }
        }
        for id in due {
            // Still due after catching up with the cluster (the device may
            // have spoken elsewhere)?
            let (marked, recorded) = self.in_group(state, |state| {
                let device = state.devices.get(&id)?;
                let due = state.watch.deadline(&id).is_some_and(|d| d <= now);
                if device.stale || device.online == Some(false) || !due {
                    return None;
                }
                let device = Device {
                    stale: true,
                    ..device.clone()
                };
                Some(self.publish_as_is(state, device))
            });
            match marked.map(|m| m.and(recorded)) {
                // It spoke elsewhere: look again at once, for its new
                // deadline.
                None => next = Some(now),
                Some(Ok(())) => tracing::info!(
                    "{id} is stale: silent for longer than {}",
                    state
                        .watch
                        .allowed_silence(&id)
                        .map(|d| humantime::format_duration(d).to_string())
                        .unwrap_or_default()
                ),
                Some(Err(e)) => {
                    tracing::error!("marking {id} stale: {e}");
                    let retry = now + RETRY;
                    next = Some(next.map_or(retry, |n| n.min(retry)));
                }
            }
        }
        state.watch.arm(next);
        next
    }

    /// Notified when a deadline moves earlier than the watcher's.
    pub fn stale_wake(&self) -> &Notify {
        &self.stale_wake
    }

    pub fn snapshot(&self, filter: &Filter) -> Snapshot {
        Self::snapshot_of(&self.lock(), filter)
    }

    fn snapshot_of(state: &State, filter: &Filter) -> Snapshot {
        Snapshot {
            event_id: state.last_id,
            devices: state
                .devices
                .values()
                .filter(|d| filter.matches(&d.id))
                .cloned()
                .collect(),
        }
    }

    pub fn device(&self, id: &DeviceId) -> Option<Device> {
        self.lock().devices.get(id).cloned()
    }

    /// Starts a subscription. With the last event id a client saw, it gets
    /// exactly the events after it when the ring, or else the store, still
    /// holds them all; otherwise (no id, too old, or unknown) it starts from
    /// a snapshot.
    pub fn subscribe(&self, last_seen: Option<EventId>, filter: &Filter) -> Subscription {
        let state = self.lock();
        let events = state.sender.subscribe();
        let seen = match last_seen {
            Some(seen)
                if seen <= state.last_id && state.last_id - seen <= state.ring.len() as u64 =>
            {
                let missed = (state.last_id - seen) as usize;
                let replay = state
                    .ring
                    .range(state.ring.len() - missed..)
                    .filter(|e| filter.matches(&e.device))
                    .cloned()
                    .collect();
                return Subscription {
                    start: Start::Replay(replay),
                    events,
                };
            }
            Some(seen) if seen <= state.last_id && state.last_id - seen <= MAX_STORE_REPLAY => seen,
            _ => {
                return Subscription {
                    start: Start::Snapshot(Self::snapshot_of(&state, filter)),
                    events,
                };
            }
        };
        let upto = state.last_id;
        // Read off the lock, so ingest and other subscribers go on: the
        // events up to `upto` are recorded for good (the lock is held
        // through every commit), and the later ones come through `events`.
        drop(state);
        if upto - seen > REPLAY_PAGE && self.store_holds(seen, upto) {
            return Subscription {
                start: Start::Stored { after: seen, upto },
                events,
            };
        }
        match self.replay_from_store(seen, upto) {
            Some(missed) => Subscription {
                start: Start::Replay(
                    missed
                        .into_iter()
                        .filter(|e| filter.matches(&e.device))
                        .map(|e| Arc::new(Published::new(e.id, e.device, e.json.into())))
                        .collect(),
                ),
                events,
            },
            // Not all there (any more): a snapshot, with a receiver taken
            // under the same lock.
            None => self.subscribe(None, filter),
        }
    }

    /// Whether the store holds every event in `seen+1 ..= upto` (ids are
    /// contiguous: as many as there are ids). Blocks on the store.
    fn store_holds(&self, seen: EventId, upto: EventId) -> bool {
        let Some(readers) = &self.history else {
            return false;
        };
        let counted = readers
            .get()
            .map_err(|e| StoreError::Busy(e.to_string()))
            .and_then(|reader| reader.count_between(seen, upto));
        match counted {
            Ok(n) => n == upto - seen,
            Err(e) => {
                tracing::warn!("replay from the store failed: {e}");
                false
            }
        }
    }

    /// The next page of a [`Start::Stored`] replay, not filtered: the
    /// events after `after`, up to `upto`, [`REPLAY_PAGE`] at most, oldest
    /// first. `None` when the store no longer holds them all (retention
    /// removed some while the client was slow) or cannot be read: the
    /// client starts again from a snapshot. Blocks on the store.
    pub fn replay_page(&self, after: EventId, upto: EventId) -> Option<Vec<StoredEvent>> {
        let until = upto.min(after + REPLAY_PAGE);
        let readers = self.history.as_ref()?;
        let read = readers
            .get()
            .map_err(|e| StoreError::Busy(e.to_string()))
            .and_then(|mut reader| reader.events_between(after, until));
        match read {
            Ok(events)
                if events.len() as u64 == until - after
                    && events.first().is_none_or(|e| e.id == after + 1) =>
            {
                Some(events)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!("replay from the store failed: {e}");
                None
            }
        }
    }

    /// Every event in `seen+1 ..= upto`, from the store (on a read
    /// connection: at most [`READERS`](super::history::READERS) replays
    /// read at once), if it holds them all. In cluster mode, when this
    /// instance's store lacks some (it joined later, or was away), they may
    /// still be in the cluster's stream.
    fn replay_from_store(&self, seen: EventId, upto: EventId) -> Option<Vec<StoredEvent>> {
        let missed = upto - seen;
        // Ids are contiguous, so a complete replay starts right after `seen`
        // and has one event per id; anything else means `seen` is older than
        // what is retained.
        let complete = |events: &Vec<StoredEvent>| {
            events.len() as u64 == missed && events.first().is_none_or(|e| e.id == seen + 1)
        };
        if let Some(readers) = &self.history {
            match readers.get().map_err(|e| StoreError::Busy(e.to_string())) {
                Ok(mut reader) => match reader.events_between(seen, upto) {
                    Ok(events) if complete(&events) => return Some(events),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("replay from the store failed: {e}"),
                },
                Err(e) => tracing::warn!("replay from the store failed: {e}"),
            }
        }
        let broker = self.broker.as_ref().filter(|_| self.degraded().is_none())?;
        let mut broker = broker.lock().unwrap_or_else(|e| e.into_inner());
        let (_, mut events) =
            tokio::task::block_in_place(|| broker.since(seen, missed as usize)).ok()?;
        events.retain(|e| e.id <= upto);
        complete(&events).then_some(events)
    }

    /// One metric of one device over `from ..= to`, oldest first: the value
    /// in force at `from` (placed at `from`), then every change, with
    /// folded minutes (min/avg/max) for times older than the raw retention.
    /// With `step_ms`, points are buckets of that width (see
    /// [`history`]). More than
    /// [`MAX_POINTS`](super::history::MAX_POINTS) points is
    /// `StoreError::TooManyPoints`. A `step_ms` of 0 or less is no step;
    /// `from` after `to` gives no points. Without a store there is no
    /// history: no points.
    ///
    /// Reads on one of the store's read connections, never under the hub's
    /// lock, so ingest goes on meanwhile; it does block the calling thread
    /// for the query (from async code, run it with `spawn_blocking`). Not
    /// `block_in_place` here: a page's render calls it, and Leptos' reactive
    /// arena is then found missing later in the same render (a panic, an
    /// empty response).
    pub fn history(
        &self,
        device: &DeviceId,
        metric: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        step_ms: Option<i64>,
    ) -> Result<History, StoreError> {
        match &self.history {
            Some(readers) => readers
                .get()
                .map_err(|e| StoreError::Busy(e.to_string()))?
                .history(device, metric, from, to, step_ms, Utc::now()),
            None => Ok(History {
                device: device.clone(),
                metric: metric.to_owned(),
                from,
                to,
                step_ms: step_ms.filter(|s| *s > 0),
                points: Vec::new(),
            }),
        }
    }

    /// The last `limit` changes recorded for `device`, or for every device,
    /// newest first (see [`Change`](crate::model::Change)); blocking, as
    /// [`history`](Self::history).
    pub fn changes(
        &self,
        device: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<Changed>, StoreError> {
        match &self.history {
            Some(readers) => readers
                .get()
                .map_err(|e| StoreError::Busy(e.to_string()))?
                .changes(device, limit),
            None => Ok(Vec::new()),
        }
    }

    /// How many subscriptions are open right now.
    pub fn subscribers(&self) -> usize {
        self.lock().sender.receiver_count()
    }

    /// Cluster mode: publish through `broker` (see
    /// [`cluster`](super::cluster)). Until [`follow`](Self::follow) has
    /// joined the cluster, the hub is degraded and refuses changes.
    pub fn with_broker(mut self, broker: Broker) -> Self {
        self.broker = Some(Mutex::new(broker));
        self.degraded
            .send_replace(Some("not yet joined to the cluster".into()));
        self
    }

    /// Cluster mode: why this instance cannot accept changes right now.
    pub fn degraded(&self) -> Option<String> {
        self.degraded.borrow().clone()
    }

    /// Follows [`degraded`](Self::degraded) as it changes.
    pub fn health(&self) -> watch::Receiver<Option<String>> {
        self.degraded.subscribe()
    }

    fn set_degraded(&self, reason: Option<String>) {
        self.degraded.send_if_modified(|degraded| {
            let news = match (&*degraded, &reason) {
                (None, Some(why)) => {
                    tracing::warn!("degraded: {why}");
                    true
                }
                (Some(_), None) => {
                    tracing::info!("joined the cluster");
                    true
                }
                // A new reason is kept (`/healthz` says the latest: "not
                // yet joined" gives way to why), but only a change of
                // state is news to the page.
                (Some(before), Some(why)) => {
                    if before != why {
                        tracing::warn!("degraded: {why}");
                    }
                    false
                }
                (None, None) => false,
            };
            *degraded = reason;
            news
        });
    }

    /// Catches up with the cluster on the publishing connection.
    fn catch_up(&self, state: &mut State) -> Result<(), StoreError> {
        let Some(broker) = &self.broker else {
            return Ok(());
        };
        let mut broker = broker.lock().unwrap_or_else(|e| e.into_inner());
        tokio::task::block_in_place(|| self.sync(state, &mut broker))
    }

    /// Brings this hub level with the cluster: applies the events it
    /// missed, or, when the stream no longer holds them all, adopts the
    /// cluster's state. A Redis that holds less than this hub (new, or
    /// restarted empty) is given this hub's state first.
    fn sync(&self, state: &mut State, broker: &mut Broker) -> Result<(), StoreError> {
        const BATCH: usize = 1024;
        let head = broker.last_id()?;
        if head.is_none_or(|h| h < state.last_id && !state.fresh) {
            let devices: Vec<Device> = state.devices.values().cloned().collect();
            let recent: Vec<StoredEvent> = state
                .ring
                .iter()
                .map(|p| StoredEvent {
                    id: p.id,
                    device: p.device.clone(),
                    json: p.json.to_string(),
                })
                .collect();
            if broker.seed(state.last_id, &devices, &recent, state.fresh)? {
                tracing::info!(
                    "Redis held events up to {head:?} only: gave it this instance's state, \
                     up to event {}",
                    state.last_id
                );
                // This hub's ids are the cluster's now.
                state.fresh = false;
                return Ok(());
            }
        }
        if state.fresh {
            return self.adopt(state, broker);
        }
        loop {
            let (head, events) = broker.since(state.last_id, BATCH)?;
            let connects = match events.first() {
                Some(first) => first.id == state.last_id + 1,
                // Level, unless the stream lost what follows our last id.
                None => head.is_none_or(|h| h <= state.last_id),
            };
            if !connects {
                return self.adopt(state, broker);
            }
            if events.is_empty() {
                return Ok(());
            }
            self.apply_remote(state, events)?;
        }
    }

    /// Takes the cluster's state as this hub's. The events in between are
    /// lost to this hub's subscribers, so they are all cut off: each client
    /// reconnects and, its last id now unknown here, starts from a snapshot.
    fn adopt(&self, state: &mut State, broker: &mut Broker) -> Result<(), StoreError> {
        let (Some(head), devices) = broker.state()? else {
            return Err(StoreError::Broker("Redis lost the cluster's state".into()));
        };
        if let Some(store) = state.store.as_mut().filter(|s| !s.shared()) {
            tokio::task::block_in_place(|| store.adopt(head, &devices))?;
        }
        if !state.fresh {
            tracing::warn!(
                "fell behind the cluster's stream (had event {}, cluster at {head}): \
                 took the cluster's state",
                state.last_id
            );
        }
        if !state.unsure.is_empty() {
            tracing::warn!(
                "events {:?}, whose commit failed, may be missing from the store: \
                 the cluster's stream no longer has them",
                state.unsure
            );
            state.unsure.clear();
        }
        state.devices = devices.into_iter().map(|d| (d.id.clone(), d)).collect();
        state.last_id = head;
        state.fresh = false;
        state.ring.clear();
        state.sender = broadcast::channel(self.client_queue.max(1)).0;
        let ids: Vec<DeviceId> = state.devices.keys().cloned().collect();
        for id in &ids {
            self.heard(state, id, false);
        }
        Ok(())
    }

    /// Applies the cluster's events that follow this hub's last one, in
    /// order; those it has already are skipped. `Behind` when one is
    /// missing (after applying those before it). They are recorded
    /// together, one transaction (one fsync) for the lot, not one each:
    /// an instance keeps up with the others' rate at its own.
    fn apply_remote(&self, state: &mut State, events: Vec<StoredEvent>) -> Result<(), StoreError> {
        struct Taken {
            learn: bool,
            spoke: bool,
            unsure: bool,
        }
        let mut next = state.last_id;
        let mut behind = false;
        let (mut recorded, mut taken) = (Vec::new(), Vec::new());
        // Each device as of the events taken so far (`None`: removed).
        let mut latest: HashMap<DeviceId, Option<Device>> = HashMap::new();
        for event in events {
            if event.id <= next {
                continue;
            }
            if event.id != next + 1 {
                behind = true;
                break;
            }
            next = event.id;
            let status = serde_json::from_str::<StatusEvent>(&event.json)
                .map_err(|e| StoreError::Corrupt(format!("event {}: {e}", event.id)))?;
            let removed = status.removed;
            let device = status.into_device();
            let previous = match latest.get(&device.id) {
                Some(latest) => latest.clone(),
                None => state.devices.get(&device.id).cloned(),
            };
            // As in `apply`: a report after a quiet spell teaches nothing.
            let learn = previous.as_ref().is_some_and(|p| {
                !p.stale && p.online != Some(false) && p.updated_at != device.updated_at
            });
            taken.push(Taken {
                learn,
                spoke: !device.stale && !removed,
                unsure: state.unsure.contains(&event.id),
            });
            latest.insert(device.id.clone(), (!removed).then(|| device.clone()));
            recorded.push(Recorded {
                id: event.id,
                device,
                previous,
                json: event.json.into(),
                removed,
            });
        }
        while !recorded.is_empty() {
            // The instance that published an event recorded it, when the
            // store is the cluster's own (PostgreSQL); this one's own, too,
            // unless its commit failed: such an event is recorded alone,
            // unless the store has it already. Each run is applied once
            // recorded. (On the follower's thread, or under `catch_up`'s
            // `block_in_place`.)
            let unsure = taken[0].unsure;
            let run = match unsure {
                true => 1,
                false => taken.iter().take_while(|t| !t.unsure).count(),
            };
            if let Some(store) = state.store.as_mut() {
                match unsure {
                    true => store.record_missing(&recorded[0])?,
                    false if !store.shared() => store.record_all(&recorded[..run])?,
                    false => {}
                }
            }
            for (event, taken) in recorded.drain(..run).zip(taken.drain(..run)) {
                state.unsure.remove(&event.id);
                let id = event.device.id.clone();
                self.commit(state, event.id, event.device, event.json, event.removed);
                if taken.spoke {
                    self.heard(state, &id, taken.learn);
                }
            }
        }
        match behind {
            true => Err(StoreError::Behind),
            false => Ok(()),
        }
    }

    /// Cluster mode: joins the cluster, then applies its events as they
    /// come, until `shutdown`. Runs on a thread of its own (it blocks on
    /// Redis). While Redis is unreachable the hub is degraded and this
    /// retries, with backoff, catching up without a gap when it answers.
    pub fn follow(&self, mut broker: Broker, shutdown: CancellationToken) {
        const WAIT: Duration = Duration::from_millis(500);
        const MAX_BACKOFF: Duration = Duration::from_secs(5);
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            // Ping first, outside the lock: while Redis is away, readers
            // of this hub never wait on it.
            let joined = broker.ping().and_then(|()| {
                let mut state = self.lock();
                self.sync(&mut state, &mut broker)
            });
            if let Err(e) = joined {
                self.set_degraded(Some(why(&e)));
                let jitter = rand::random_range(0..=backoff.as_millis() as u64 / 2);
                std::thread::sleep(backoff + Duration::from_millis(jitter));
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            // Limits set while this instance was away.
            match broker.all_limits() {
                Ok(all) => {
                    for (device, limits) in all {
                        if let Err(e) = self.keep_limits(&device, limits) {
                            tracing::error!("keeping the limits of {device}: {e}");
                        }
                    }
                }
                Err(e) => tracing::warn!("reading the cluster's limits: {e}"),
            }
            // Sessions signed out while this instance was away.
            match broker.signed_out() {
                Ok(all) => {
                    for session in all {
                        if let Err(e) = self.signed_out_elsewhere(&session) {
                            tracing::error!("keeping a signed-out session: {e}");
                        }
                    }
                }
                Err(e) => tracing::warn!("reading the cluster's signed-out sessions: {e}"),
            }
            self.set_degraded(None);
            // Limits that changed (the file's at start or on SIGHUP, or
            // the cluster's above) while events could not be published.
            if let Err(e) = self.reevaluate_all() {
                tracing::warn!("alerts not re-evaluated on joining the cluster: {e}");
            }
            backoff = Duration::from_millis(100);
            while !shutdown.is_cancelled() {
                let after = self.lock().last_id;
                let applied = broker.follow(after, 1024, WAIT).and_then(|events| {
                    let mut state = self.lock();
                    match self.apply_remote(&mut state, events) {
                        Err(StoreError::Behind) => self.sync(&mut state, &mut broker),
                        other => other,
                    }
                });
                if let Err(e) = applied {
                    self.set_degraded(Some(why(&e)));
                    break;
                }
            }
        }
    }

    /// The current event id and number of devices.
    pub fn stats(&self) -> (EventId, usize) {
        let state = self.lock();
        (state.last_id, state.devices.len())
    }
}

/// Locks a mutex whose holders cannot leave its data half changed.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// What went wrong with Redis, for `/healthz` and the errors of refused
/// changes.
fn why(e: &StoreError) -> String {
    match e {
        StoreError::Broker(reason) => reason.clone(),
        e => e.to_string(),
    }
}

fn now_micros() -> EventId {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A WebSocket `snapshot` or `status` message built around already
/// serialized data: `{"type":…,"id":…,"data":…}` (see `protocol::ServerMessage`).
pub fn ws_frame(kind: &str, id: EventId, data: &str) -> Utf8Bytes {
    format!(r#"{{"type":"{kind}","id":{id},"data":{data}}}"#).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MAX_METRICS;
    use tokio::sync::broadcast::error::TryRecvError;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    fn temp(t: f64) -> StatusUpdate {
        StatusUpdate {
            temperature: Some(t),
            ..Default::default()
        }
    }

    fn replay_ids(start: &Start) -> Vec<EventId> {
        match start {
            Start::Replay(events) => events.iter().map(|e| e.id).collect(),
            Start::Snapshot(_) => panic!("expected a replay, got a snapshot"),
            Start::Stored { .. } => panic!("expected a replay at once, got a paged one"),
        }
    }

    #[test]
    fn ids_grow_by_one_per_change_and_only_changes_publish() {
        let hub = Hub::starting_at(100, 8, 8);
        let mut sub = hub.subscribe(None, &Filter::default());
        assert_eq!(
            hub.apply(&id("a"), &temp(1.0)).unwrap(),
            Applied {
                id: 101,
                changed: true
            }
        );
        assert_eq!(
            hub.apply(&id("a"), &temp(1.0)).unwrap(),
            Applied {
                id: 101,
                changed: false
            }
        );
        assert_eq!(
            hub.apply(&id("b"), &StatusUpdate::default()).unwrap(),
            Applied {
                id: 102,
                changed: true
            }
        );
        assert_eq!(
            hub.apply(&id("a"), &temp(2.0)).unwrap(),
            Applied {
                id: 103,
                changed: true
            }
        );
        let got: Vec<_> = std::iter::from_fn(|| sub.events.try_recv().ok())
            .map(|e| (e.id, e.device.to_string()))
            .collect();
        assert_eq!(
            got,
            [(101, "a".into()), (102, "b".into()), (103, "a".into())]
        );
        assert!(matches!(sub.events.try_recv(), Err(TryRecvError::Empty)));
    }

    fn entry(device: &str, update: StatusUpdate) -> Entry {
        Entry {
            place: device.into(),
            device: id(device),
            update,
        }
    }

    #[test]
    fn a_batch_is_applied_whole_or_not_at_all() {
        let hub = Hub::starting_at(100, 8, 8);
        let mut sub = hub.subscribe(None, &Filter::default());
        hub.apply(&id("a"), &temp(1.0)).unwrap();
        let applied = hub
            .apply_all(&[
                entry("b", temp(2.0)),
                entry("a", temp(1.0)),
                entry("c", temp(3.0)),
            ])
            .unwrap();
        assert_eq!(
            applied
                .iter()
                .map(|a| (a.id, a.changed))
                .collect::<Vec<_>>(),
            [(102, true), (102, false), (103, true)]
        );

        // `a` cannot take 32 more metrics: nothing of the batch is kept.
        let many = StatusUpdate {
            metrics: Some((0..MAX_METRICS).map(|i| (format!("m{i}"), 1.0)).collect()),
            ..Default::default()
        };
        hub.apply(&id("a"), &many).unwrap();
        let refused = hub.apply_all(&[
            entry("d", temp(4.0)),
            entry(
                "a",
                StatusUpdate {
                    metrics: Some([("one.more".to_string(), 1.0)].into()),
                    ..Default::default()
                },
            ),
        ]);
        match refused {
            Err(ApplyError::Invalid(e)) => assert_eq!(e.field, "a.metrics"),
            other => panic!("expected a.metrics refused, got {other:?}"),
        }
        assert_eq!(hub.device(&id("d")), None);
        assert_eq!(hub.stats(), (104, 3));
        let got: Vec<_> = std::iter::from_fn(|| sub.events.try_recv().ok())
            .map(|e| (e.id, e.device.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                (101, "a".into()),
                (102, "b".into()),
                (103, "c".into()),
                (104, "a".into())
            ]
        );
    }

    #[test]
    fn new_hub_ids_start_above_any_earlier_run() {
        let earlier = Hub::new(8, 8);
        for t in 0..100 {
            earlier.apply(&id("a"), &temp(t as f64)).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        assert!(Hub::new(8, 8).stats().0 > earlier.stats().0);
    }

    #[test]
    fn replays_exactly_the_missed_events_in_order() {
        let hub = Hub::starting_at(0, 8, 8);
        for t in 1..=5 {
            hub.apply(&id("a"), &temp(t as f64)).unwrap();
        }
        assert_eq!(
            replay_ids(&hub.subscribe(Some(2), &Filter::default()).start),
            [3, 4, 5]
        );
        assert_eq!(
            replay_ids(&hub.subscribe(Some(5), &Filter::default()).start),
            Vec::<u64>::new()
        );
        assert_eq!(
            replay_ids(&hub.subscribe(Some(0), &Filter::default()).start),
            [1, 2, 3, 4, 5]
        );
    }

    #[test]
    fn replay_respects_the_filter() {
        let hub = Hub::starting_at(0, 8, 8);
        hub.apply(&id("a"), &temp(1.0)).unwrap();
        hub.apply(&id("b"), &temp(1.0)).unwrap();
        hub.apply(&id("a"), &temp(2.0)).unwrap();
        let sub = hub.subscribe(Some(0), &Filter::new([id("a")]));
        assert_eq!(replay_ids(&sub.start), [1, 3]);
    }

    #[test]
    fn ring_overflow_falls_back_to_a_snapshot() {
        let hub = Hub::starting_at(0, 3, 8);
        for t in 1..=5 {
            hub.apply(&id("a"), &temp(t as f64)).unwrap();
        }
        // The ring holds 3, 4, 5: a client that saw 2 missed only those.
        assert_eq!(
            replay_ids(&hub.subscribe(Some(2), &Filter::default()).start),
            [3, 4, 5]
        );
        // A client that saw 1 missed 2, which is gone: snapshot.
        let Start::Snapshot(snap) = hub.subscribe(Some(1), &Filter::default()).start else {
            panic!("expected a snapshot");
        };
        assert_eq!(snap.event_id, 5);
        assert_eq!(snap.devices[0].status.temperature, Some(5.0));
    }

    #[test]
    fn unknown_future_id_gets_a_snapshot() {
        let hub = Hub::starting_at(10, 8, 8);
        hub.apply(&id("a"), &temp(1.0)).unwrap();
        assert!(matches!(
            hub.subscribe(Some(999), &Filter::default()).start,
            Start::Snapshot(Snapshot { event_id: 11, .. })
        ));
    }

    #[test]
    fn snapshot_is_filtered_and_current() {
        let hub = Hub::starting_at(0, 8, 8);
        hub.apply(&id("a"), &temp(1.0)).unwrap();
        hub.apply(&id("b"), &temp(2.0)).unwrap();
        let snap = hub.snapshot(&Filter::new([id("b")]));
        assert_eq!(snap.event_id, 2);
        assert_eq!(snap.devices.len(), 1);
        assert_eq!(snap.devices[0].id, id("b"));
    }

    #[test]
    fn a_lagging_subscriber_is_told_and_others_are_not_held_back() {
        let hub = Hub::starting_at(0, 8, 2);
        let mut slow = hub.subscribe(None, &Filter::default());
        for t in 1..=5 {
            hub.apply(&id("a"), &temp(t as f64)).unwrap();
        }
        assert!(matches!(
            slow.events.try_recv(),
            Err(TryRecvError::Lagged(3))
        ));
        let mut fresh = hub.subscribe(None, &Filter::default());
        hub.apply(&id("a"), &temp(6.0)).unwrap();
        assert_eq!(fresh.events.try_recv().unwrap().id, 6);
    }

    #[test]
    fn each_event_is_serialized_once_as_a_status_event() {
        let hub = Hub::starting_at(0, 8, 8);
        hub.apply(&id("a"), &temp(21.5)).unwrap();
        let Start::Replay(events) = hub.subscribe(Some(0), &Filter::default()).start else {
            panic!("expected a replay");
        };
        let ev: StatusEvent = serde_json::from_str(&events[0].json).unwrap();
        assert_eq!(ev.device, id("a"));
        assert_eq!(ev.name, "a");
        assert_eq!(ev.status.temperature, Some(21.5));
    }

    #[test]
    fn the_websocket_frame_is_a_server_status_message() {
        use crate::protocol::ServerMessage;
        let hub = Hub::starting_at(0, 8, 8);
        hub.apply(&id("a"), &temp(21.5)).unwrap();
        let Start::Replay(events) = hub.subscribe(Some(0), &Filter::default()).start else {
            panic!("expected a replay");
        };
        let ServerMessage::Status { id: event_id, data } =
            serde_json::from_str(events[0].ws.as_str()).unwrap()
        else {
            panic!("expected a status message");
        };
        assert_eq!(event_id, 1);
        assert_eq!(data.status.temperature, Some(21.5));
    }

    #[test]
    fn online_changes_are_events_and_repeats_are_not() {
        let hub = Hub::starting_at(0, 8, 8);
        assert!(hub.set_online(&id("a"), Some(true)).unwrap().changed);
        assert!(!hub.set_online(&id("a"), Some(true)).unwrap().changed);
        hub.apply(&id("a"), &temp(1.0)).unwrap();
        assert_eq!(hub.device(&id("a")).unwrap().online, Some(true));
        assert_eq!(
            hub.set_online(&id("a"), Some(false)).unwrap(),
            Applied {
                id: 3,
                changed: true
            }
        );
        let Start::Replay(events) = hub.subscribe(Some(2), &Filter::default()).start else {
            panic!("expected a replay");
        };
        let ev: StatusEvent = serde_json::from_str(&events[0].json).unwrap();
        assert_eq!(ev.online, Some(false));
        assert_eq!(ev.status.temperature, Some(1.0));
    }

    fn limits(max: f64) -> MetricLimits {
        MetricLimits::from([(
            "temperature".to_owned(),
            crate::model::Limits {
                min: None,
                max: Some(max),
            },
        )])
    }

    fn last_event(hub: &Hub) -> StatusEvent {
        let seen = hub.stats().0 - 1;
        let Start::Replay(events) = hub.subscribe(Some(seen), &Filter::default()).start else {
            panic!("expected a replay");
        };
        serde_json::from_str(&events[0].json).unwrap()
    }

    #[test]
    fn alerts_are_events_and_follow_new_limits_at_once() {
        let hub = Hub::starting_at(0, 8, 8);
        hub.configure_alerts(Thresholds::default(), StalePolicy::default())
            .unwrap();
        // Limits for a device that has not reported yet: nothing to publish.
        assert!(!hub.set_limits(&id("a"), limits(30.0)).unwrap().changed);
        hub.apply(&id("a"), &temp(25.0)).unwrap();
        let first = last_event(&hub);
        assert!(first.alerts.is_empty());
        assert_eq!(first.limits, limits(30.0));
        assert_eq!(hub.apply(&id("a"), &temp(31.0)).unwrap().id, 2);
        let ev = last_event(&hub);
        assert_eq!(ev.alerts["temperature"].value, 31.0);
        assert_eq!(ev.alerts["temperature"].limits.max, Some(30.0));
        // Back inside: cleared.
        hub.apply(&id("a"), &temp(30.0)).unwrap();
        assert!(last_event(&hub).alerts.is_empty());
        // New limits re-evaluate at once, without moving `updated_at`.
        let before = hub.device(&id("a")).unwrap();
        assert_eq!(
            hub.set_limits(&id("a"), limits(20.0)).unwrap(),
            Applied {
                id: 4,
                changed: true
            }
        );
        let after = hub.device(&id("a")).unwrap();
        assert_eq!(after.alerts["temperature"].value, 30.0);
        assert_eq!(after.updated_at, before.updated_at);
        assert_eq!(last_event(&hub).limits, limits(20.0));
        // The same limits again change nothing.
        assert!(!hub.set_limits(&id("a"), limits(20.0)).unwrap().changed);
        assert_eq!(hub.thresholds().devices[&id("a")], limits(20.0));
        // Limits that change no alert are news too: every page draws them.
        assert!(hub.set_limits(&id("a"), limits(40.0)).unwrap().changed);
        assert!(hub.set_limits(&id("a"), limits(45.0)).unwrap().changed);
        let ev = last_event(&hub);
        assert_eq!((ev.limits, ev.alerts.len()), (limits(45.0), 0));
        // Cleared, the defaults apply: none here.
        assert!(
            hub.set_limits(&id("a"), MetricLimits::new())
                .unwrap()
                .changed
        );
        assert!(last_event(&hub).limits.is_empty());
    }

    #[test]
    fn a_silent_device_goes_stale_and_any_report_clears_it() {
        let hub = Hub::starting_at(0, 8, 8);
        let policy = StalePolicy {
            fixed: Some(Duration::from_secs(10)),
            ..StalePolicy::default()
        };
        hub.configure_alerts(Thresholds::default(), policy).unwrap();
        assert_eq!(hub.mark_stale(Instant::now()), None, "nobody to watch");
        hub.apply(&id("a"), &temp(1.0)).unwrap();
        let updated_at = hub.device(&id("a")).unwrap().updated_at;
        let now = Instant::now();
        let next = hub.mark_stale(now).expect("a deadline");
        assert!(next > now + Duration::from_secs(9));
        // Past the deadline: stale, published, `updated_at` kept.
        assert_eq!(hub.mark_stale(next), None, "a stale device is not watched");
        let ev = last_event(&hub);
        assert!(ev.stale);
        assert_eq!(ev.updated_at, updated_at);
        assert_eq!(hub.stats().0, 2);
        // The same values again: not a change of readings, but of `stale`.
        assert_eq!(
            hub.apply(&id("a"), &temp(1.0)).unwrap(),
            Applied {
                id: 3,
                changed: true
            }
        );
        let ev = last_event(&hub);
        assert!(!ev.stale);
        assert_eq!(ev.updated_at, updated_at);
        assert!(!hub.apply(&id("a"), &temp(1.0)).unwrap().changed);
    }

    #[test]
    fn an_offline_device_is_not_marked_stale() {
        let hub = Hub::starting_at(0, 8, 8);
        let policy = StalePolicy {
            fixed: Some(Duration::from_millis(1)),
            ..StalePolicy::default()
        };
        hub.configure_alerts(Thresholds::default(), policy).unwrap();
        hub.set_online(&id("a"), Some(true)).unwrap();
        let later = Instant::now() + Duration::from_secs(1);
        hub.mark_stale(later);
        assert!(hub.device(&id("a")).unwrap().stale);
        // Going offline clears it, and an offline device is left alone.
        hub.set_online(&id("a"), Some(false)).unwrap();
        assert!(!hub.device(&id("a")).unwrap().stale);
        assert_eq!(hub.mark_stale(later + Duration::from_secs(1)), None);
        assert!(!hub.device(&id("a")).unwrap().stale);
    }

    #[test]
    fn dropped_subscriptions_are_released() {
        let hub = Hub::starting_at(0, 8, 8);
        let a = hub.subscribe(None, &Filter::default());
        let b = hub.subscribe(None, &Filter::default());
        assert_eq!(hub.subscribers(), 2);
        drop(a);
        drop(b);
        assert_eq!(hub.subscribers(), 0);
    }

    fn stored_hub(dir: &std::path::Path, ring: usize) -> Hub {
        Hub::with_store(Store::open(dir).unwrap(), ring, 8).unwrap()
    }

    #[test]
    fn a_long_absence_is_replayed_from_the_store_a_page_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let hub = stored_hub(dir.path(), 2);
        let seen = hub.apply(&id("x"), &temp(0.0)).unwrap().id;
        for round in 0..21 {
            let batch: Vec<Entry> = (0..50)
                .map(|i| Entry {
                    place: i.to_string(),
                    device: id(&format!("d{i}")),
                    update: temp(f64::from(round * 50 + i)),
                })
                .collect();
            hub.apply_all(&batch).unwrap();
        }
        let upto = hub.stats().0;
        assert_eq!(upto - seen, 1_050);
        let sub = hub.subscribe(Some(seen), &Filter::new([id("d7")]));
        let Start::Stored { after, upto: until } = sub.start else {
            panic!("expected a paged replay, got {:?}", sub.start);
        };
        assert_eq!((after, until), (seen, upto));
        let first = hub.replay_page(seen, upto).unwrap();
        assert_eq!(first.len() as u64, REPLAY_PAGE);
        let rest = hub.replay_page(first.last().unwrap().id, upto).unwrap();
        let ids: Vec<EventId> = first.iter().chain(&rest).map(|e| e.id).collect();
        assert_eq!(ids, (seen + 1..=upto).collect::<Vec<_>>());
        // A short absence is read at once, as it was.
        let start = hub.subscribe(Some(upto - 3), &Filter::default()).start;
        assert_eq!(replay_ids(&start), [upto - 2, upto - 1, upto]);
        // From before anything stored: the store cannot hold them all.
        assert!(matches!(
            hub.subscribe(Some(seen - 2_000), &Filter::default()).start,
            Start::Snapshot(_)
        ));
    }

    #[test]
    fn a_stored_hub_goes_on_from_the_newest_stored_id_with_its_devices() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let hub = stored_hub(dir.path(), 8);
            let first = hub.apply(&id("a"), &temp(1.0)).unwrap().id;
            hub.apply(&id("a"), &temp(2.0)).unwrap();
            hub.set_online(&id("b"), Some(true)).unwrap();
            first
        };
        let hub = stored_hub(dir.path(), 8);
        assert_eq!(hub.stats(), (first + 2, 2));
        assert_eq!(hub.device(&id("a")).unwrap().status.temperature, Some(2.0));
        assert_eq!(hub.device(&id("b")).unwrap().online, Some(true));
        assert_eq!(hub.apply(&id("a"), &temp(3.0)).unwrap().id, first + 3);
        // An unchanged update is still no event after a restart.
        assert!(!hub.apply(&id("a"), &temp(3.0)).unwrap().changed);
    }

    #[test]
    fn a_removal_is_an_event_that_forgets_the_device_until_it_reports_again() {
        let dir = tempfile::tempdir().unwrap();
        let hub = stored_hub(dir.path(), 8);
        hub.apply(&id("a"), &temp(1.0)).unwrap();
        hub.set_online(&id("b"), Some(true)).unwrap();
        let unchanged = hub.stats();
        assert!(matches!(
            hub.remove(&id("b")),
            Err(RemoveError::Connected(_))
        ));
        assert!(matches!(hub.remove(&id("c")), Err(RemoveError::Unknown(_))));
        assert_eq!(hub.stats(), unchanged, "refusals publish nothing");
        let mut sub = hub.subscribe(None, &Filter::default());
        let removed = hub.remove(&id("a")).unwrap();
        assert_eq!(removed.id, unchanged.0 + 1);
        let event: StatusEvent =
            serde_json::from_str(&sub.events.try_recv().unwrap().json).unwrap();
        assert!(event.removed);
        assert_eq!(event.status.temperature, Some(1.0), "its last state");
        assert_eq!(hub.device(&id("a")), None);
        assert_eq!(hub.stats(), (removed.id, 1));
        // The store forgot it too.
        drop((hub, sub));
        let hub = stored_hub(dir.path(), 8);
        assert_eq!((hub.device(&id("a")), hub.stats()), (None, (removed.id, 1)));
        // A report registers it anew.
        assert!(hub.apply(&id("a"), &temp(1.0)).unwrap().changed);
        assert!(!last_event(&hub).removed);
    }

    fn waiting(device: &str, t: f64) -> Arc<Waiting> {
        Arc::new(Waiting {
            device: id(device),
            update: temp(t),
            result: Mutex::default(),
        })
    }

    fn result_of(waiting: &Waiting) -> Result<Applied, ApplyError> {
        lock(&waiting.result).take().expect("answered")
    }

    #[test]
    fn a_group_is_recorded_with_one_commit_then_sent_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let hub = stored_hub(dir.path(), 8);
        let start = hub.apply(&id("a"), &temp(1.0)).unwrap().id;
        let mut sub = hub.subscribe(None, &Filter::default());
        let group = [
            waiting("a", 2.0),
            waiting("b", 5.0),
            waiting("a", 2.0),
            waiting("a", 3.0),
        ];
        hub.apply_group(&mut hub.lock(), &group);
        let ids: Vec<_> = group.iter().map(|w| result_of(w).unwrap()).collect();
        // Each sees the ones before it: the repeat of 2.0 changes nothing.
        assert_eq!(
            ids,
            [
                Applied {
                    id: start + 1,
                    changed: true
                },
                Applied {
                    id: start + 2,
                    changed: true
                },
                Applied {
                    id: start + 2,
                    changed: false
                },
                Applied {
                    id: start + 3,
                    changed: true
                },
            ]
        );
        for want in start + 1..=start + 3 {
            assert_eq!(sub.events.try_recv().unwrap().id, want);
        }
        drop(hub);
        let hub = stored_hub(dir.path(), 0);
        assert_eq!(hub.stats(), (start + 3, 2));
        assert_eq!(hub.device(&id("a")).unwrap().status.temperature, Some(3.0));
        let replayed = hub.subscribe(Some(start), &Filter::default());
        assert_eq!(
            replay_ids(&replayed.start),
            [start + 1, start + 2, start + 3]
        );
    }

    #[test]
    fn a_group_left_open_by_a_panic_is_undone_by_the_next_lock() {
        let hub = Hub::new(8, 8);
        let start = hub.apply(&id("a"), &temp(1.0)).unwrap().id;
        let mut sub = hub.subscribe(None, &Filter::default());
        {
            let mut state = hub.lock();
            state.open_group();
            hub.apply_to(&mut state, &id("a"), &temp(2.0)).unwrap();
            hub.apply_to(&mut state, &id("b"), &temp(3.0)).unwrap();
            // A panic here would let the lock go with the group open.
        }
        assert_eq!(hub.stats(), (start, 1));
        assert_eq!(hub.device(&id("a")).unwrap().status.temperature, Some(1.0));
        assert!(sub.events.try_recv().is_err(), "nothing was sent");
        assert_eq!(hub.apply(&id("a"), &temp(4.0)).unwrap().id, start + 1);
    }

    #[test]
    fn a_group_that_cannot_be_recorded_changes_nothing_and_fails_every_update() {
        let dir = tempfile::tempdir().unwrap();
        let hub = stored_hub(dir.path(), 8);
        let start = hub.apply(&id("a"), &temp(1.0)).unwrap().id;
        // The group's second event id is taken behind the hub's back, so
        // recording the group fails halfway.
        rusqlite::Connection::open(dir.path().join(super::super::store::FILE_NAME))
            .unwrap()
            .execute(
                "INSERT INTO events (id, device, json) VALUES (?1, 'x', '{}')",
                [(start + 2) as i64],
            )
            .unwrap();
        let mut sub = hub.subscribe(None, &Filter::default());
        let before = hub.snapshot(&Filter::default());
        let group = [waiting("a", 2.0), waiting("new", 5.0)];
        hub.apply_group(&mut hub.lock(), &group);
        for w in &group {
            assert!(matches!(
                result_of(w),
                Err(ApplyError::Store(StoreError::Group(_)))
            ));
        }
        assert!(sub.events.try_recv().is_err(), "nothing is sent");
        assert_eq!(hub.snapshot(&Filter::default()), before);
        assert_eq!(hub.stats(), (start, 1));
        // The next update takes the next id, as if the group never was.
        assert_eq!(hub.apply(&id("a"), &temp(4.0)).unwrap().id, start + 1);
    }

    #[test]
    fn limits_stale_and_alerts_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let policy = || StalePolicy {
            fixed: Some(Duration::from_secs(10)),
            ..StalePolicy::default()
        };
        {
            let hub = stored_hub(dir.path(), 8);
            hub.configure_alerts(Thresholds::default(), policy())
                .unwrap();
            hub.set_limits(&id("a"), limits(30.0)).unwrap();
            hub.apply(&id("a"), &temp(31.0)).unwrap();
            hub.apply(&id("b"), &temp(1.0)).unwrap();
            hub.mark_stale(Instant::now() + Duration::from_secs(11));
            assert!(hub.device(&id("b")).unwrap().stale);
            hub.apply(&id("a"), &temp(31.0)).unwrap();
            assert!(!hub.device(&id("a")).unwrap().stale);
        }
        let hub = stored_hub(dir.path(), 8);
        hub.configure_alerts(Thresholds::default(), policy())
            .unwrap();
        let last = hub.stats().0;
        assert_eq!(hub.thresholds().devices[&id("a")], limits(30.0));
        let a = hub.device(&id("a")).unwrap();
        assert_eq!(a.alerts["temperature"].value, 31.0);
        assert!(!a.stale);
        assert!(hub.device(&id("b")).unwrap().stale, "until it reports");
        // Nothing changed, so nothing was published at start.
        assert_eq!(hub.stats().0, last);
        // Restarted hubs count every device as just heard.
        assert!(hub.mark_stale(Instant::now()).is_some());
        assert!(!hub.device(&id("a")).unwrap().stale);
    }

    #[test]
    fn learned_intervals_are_taken_up_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let policy = || StalePolicy {
            floor: Duration::from_millis(1),
            ..StalePolicy::default()
        };
        {
            let hub = stored_hub(dir.path(), 8);
            hub.configure_alerts(Thresholds::default(), policy())
                .unwrap();
            for _ in 0..3 {
                hub.apply(&id("a"), &temp(1.0)).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let hub = stored_hub(dir.path(), 8);
        let start = Instant::now();
        hub.configure_alerts(Thresholds::default(), policy())
            .unwrap();
        let deadline = hub
            .mark_stale(start)
            .expect("a deadline without new reports");
        assert!(deadline > start && deadline < start + Duration::from_secs(1));
        hub.mark_stale(deadline);
        assert!(hub.device(&id("a")).unwrap().stale);
    }

    #[test]
    fn replays_from_the_store_what_the_ring_no_longer_holds() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let hub = stored_hub(dir.path(), 2);
            let first = hub.apply(&id("a"), &temp(1.0)).unwrap().id;
            for t in 2..=5 {
                hub.apply(&id(if t % 2 == 0 { "b" } else { "a" }), &temp(t as f64))
                    .unwrap();
            }
            // Only the last two are in the ring; the rest come from the store.
            assert_eq!(
                replay_ids(&hub.subscribe(Some(first), &Filter::default()).start),
                [first + 1, first + 2, first + 3, first + 4]
            );
            first
        };
        // After a restart the ring is empty: all of it comes from the store.
        let hub = stored_hub(dir.path(), 2);
        let mut sub = hub.subscribe(Some(first + 1), &Filter::new([id("a")]));
        assert_eq!(replay_ids(&sub.start), [first + 2, first + 4]);
        let Start::Replay(events) = &sub.start else {
            unreachable!()
        };
        let ev: StatusEvent = serde_json::from_str(&events[1].json).unwrap();
        assert_eq!(ev.status.temperature, Some(5.0));
        assert!(
            events[1]
                .ws
                .as_str()
                .contains(&format!(r#""id":{}"#, first + 4))
        );
        // Then live, with nothing lost or repeated between the two.
        hub.apply(&id("a"), &temp(6.0)).unwrap();
        assert_eq!(sub.events.try_recv().unwrap().id, first + 5);
        assert!(matches!(sub.events.try_recv(), Err(TryRecvError::Empty)));
        // Older than anything stored, or from the future: a snapshot.
        assert!(matches!(
            hub.subscribe(Some(first - 2), &Filter::default()).start,
            Start::Snapshot(_)
        ));
        assert!(matches!(
            hub.subscribe(Some(first + 99), &Filter::default()).start,
            Start::Snapshot(_)
        ));
        // Exactly at the oldest stored event's predecessor: everything.
        assert_eq!(
            replay_ids(&hub.subscribe(Some(first - 1), &Filter::default()).start).len(),
            6
        );
    }
}
