//! The durable store: an embedded SQLite database in the data directory,
//! or (`--database-url`) a PostgreSQL database, which several instances may
//! share. Both go through one code path ([`db`](super::db)): each query is
//! written once, and the hub, history reads and retention do not know which
//! backend they use.
//!
//! It keeps every device's last state, every status event (the event log
//! that `Last-Event-ID` resumes from after a restart), the readings
//! history, and the alert limits set over the API. Only the [`Hub`](super::hub::Hub) writes to it, under its lock,
//! so event ids and their order have one source.
//!
//! Durability: each event is recorded in one transaction (event row,
//! device row, readings) — or with the other updates that waited meanwhile,
//! in one transaction of theirs (the hub's group commit) — committed before
//! the hub publishes it or anyone is answered.
//! The database runs in WAL mode with `synchronous=FULL`: every commit
//! fsyncs the WAL. `NORMAL` would already survive a crash of the process
//! (kill -9: committed pages sit in the OS cache and reach the file), but
//! after a power loss or kernel crash it may lose the last commits — updates
//! that were already answered 200. "Nothing acknowledged is lost" has to hold
//! for both, so the price is one fsync per commit. On PostgreSQL a commit
//! returns once the server has made it durable (`synchronous_commit=on`, its
//! default); only retention's own connection turns that off.

use super::auth::Session;
use super::db::{Arg, Conn, TxKind};
use super::thresholds::MetricLimits;
use crate::model::{Change, Device, DeviceId, EventId};
use rusqlite::{Connection, OptionalExtension};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The database file inside the data directory.
pub const FILE_NAME: &str = "telltale.sqlite3";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the store (PostgreSQL): {}", postgres_reason(.0))]
    Postgres(#[from] postgres::Error),
    /// The connection to PostgreSQL broke inside a transaction: it is rolled
    /// back; the next use connects again.
    /// TLS to PostgreSQL (`sslmode=require`) could not be set up or failed.
    #[error("the store (PostgreSQL): {0}")]
    Tls(String),
    #[error("the store (PostgreSQL): the connection was lost during a transaction")]
    ConnectionLost,
    #[error("the store's data directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("the store holds a device that does not read back: {0}")]
    Corrupt(String),
    #[error("the store's schema version {0} is newer than this build knows (up to {1})")]
    TooNew(i64, i64),
    /// A history read would give more than `limit` points; a step of
    /// `fits_step_ms` or more would fit.
    #[error(
        "more than {limit} points: ask for a step of at least {}",
        humantime::format_duration(std::time::Duration::from_millis(*.fits_step_ms as u64))
    )]
    TooManyPoints { limit: usize, fits_step_ms: i64 },
    /// A group of changes recorded together failed as a whole (see
    /// [`Store::record_all`]): every change of the group gets this.
    #[error(transparent)]
    Group(std::sync::Arc<StoreError>),
    /// An update was left unanswered (a panic while applying its group):
    /// nothing is known of its fate.
    #[error("the update was not applied: {0}")]
    Lost(String),
    /// No read connection came free in time.
    #[error("the store is busy: {0}")]
    Busy(String),
    /// Cluster mode: Redis did not answer, so nothing was published.
    #[error("the cluster's Redis is unreachable, so nothing was accepted; retry shortly ({0})")]
    Broker(String),
    /// Cluster mode: another instance published first. The hub catches up
    /// and tries again; this never reaches a client.
    #[error("this instance is behind the cluster")]
    Behind,
    /// Cluster mode: the change reached the cluster's stream, so every
    /// instance shows it, but the store did not confirm its commit. It is
    /// recorded (if it was not) once the store answers again.
    #[error(
        "the change was published, but the store did not confirm it was stored ({0}); \
         it is stored as soon as the store answers again"
    )]
    Unconfirmed(String),
}

/// What PostgreSQL said, rather than the client's bare "db error".
fn postgres_reason(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

impl StoreError {
    /// Whether a row clashed with one already there (a primary key or a
    /// unique constraint).
    fn is_duplicate(&self) -> bool {
        match self {
            Self::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.extended_code,
                rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                    | rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            ),
            Self::Postgres(e) => e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION),
            _ => false,
        }
    }
}

/// One stored status event: its id, device and `StatusEvent` JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    pub id: EventId,
    pub device: DeviceId,
    pub json: String,
}

/// The events with ids in `after+1 ..= upto` on `conn`, oldest first.
pub(crate) fn events_between(
    conn: &Conn,
    after: EventId,
    upto: EventId,
) -> Result<Vec<StoredEvent>, StoreError> {
    let rows = conn.query(
        "SELECT id, device, json FROM events WHERE id > ?1 AND id <= ?2 ORDER BY id",
        &[Arg::I64(after as i64), Arg::I64(upto as i64)],
    )?;
    let mut events = Vec::with_capacity(rows.len());
    for r in rows {
        let id = r.i64(0)?;
        let device = DeviceId::parse(&r.string(1)?)
            .map_err(|e| StoreError::Corrupt(format!("event {id}: {e}")))?;
        events.push(StoredEvent {
            id: id as EventId,
            device,
            json: r.string(2)?,
        });
    }
    Ok(events)
}

/// Schema migrations, in order; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    // 1: devices, the event log, readings.
    "CREATE TABLE devices (
         id TEXT PRIMARY KEY NOT NULL,
         name TEXT NOT NULL,
         status_json TEXT NOT NULL,
         online INTEGER,            -- NULL: never had a link; 0/1
         updated_at TEXT NOT NULL   -- RFC 3339
     );
     CREATE TABLE events (
         id INTEGER PRIMARY KEY NOT NULL,
         device TEXT NOT NULL,
         json TEXT NOT NULL
     );
     CREATE TABLE readings (
         device TEXT NOT NULL,
         metric TEXT NOT NULL,
         ts INTEGER NOT NULL,       -- milliseconds since the Unix epoch
         value REAL NOT NULL
     );
     CREATE INDEX readings_by_device_metric_ts ON readings (device, metric, ts);",
    // 2: a device's stale flag and alerts (so the snapshot after a restart
    // is what the last events said), and alert limits set over the API.
    "ALTER TABLE devices ADD COLUMN stale INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE devices ADD COLUMN alerts_json TEXT NOT NULL DEFAULT '{}';
     CREATE TABLE device_limits (
         device TEXT PRIMARY KEY NOT NULL,
         limits_json TEXT NOT NULL  -- {metric: {min, max}}; '{}': none of its own
     );
     -- each device's learned report interval, saved when it is first
     -- learned or has moved, so a restart need not learn it again before it
     -- can mark the device stale
     CREATE TABLE report_intervals (
         device TEXT PRIMARY KEY NOT NULL,
         interval_ms INTEGER NOT NULL
     );",
    // 3: history — event times (for pruning), the last id ever issued (so ids
    // go on upward after every event was pruned), and the per-minute table
    // raw readings are folded into.
    "ALTER TABLE events ADD COLUMN ts INTEGER NOT NULL DEFAULT 0; -- ms since the epoch
     UPDATE events SET ts = COALESCE(
         CAST(unixepoch(json_extract(json, '$.updated_at'), 'subsec') * 1000 AS INTEGER), 0);
     CREATE TABLE meta (
         key TEXT PRIMARY KEY NOT NULL,
         value INTEGER NOT NULL
     );
     INSERT INTO meta (key, value) SELECT 'last_event_id', MAX(id) FROM events
         HAVING MAX(id) IS NOT NULL;
     CREATE TABLE readings_1m (
         device TEXT NOT NULL,
         metric TEXT NOT NULL,
         minute INTEGER NOT NULL,   -- its start, ms since the epoch
         min REAL NOT NULL,
         avg REAL NOT NULL,
         max REAL NOT NULL,
         count INTEGER NOT NULL,
         last REAL NOT NULL,        -- the minute's last reading: in force after it
         UNIQUE (device, metric, minute)
     );",
    // 4: operator sessions signed out before their end.
    SIGNED_OUT_TABLE,
    // 5: what each event changed besides readings.
    CHANGES_TABLE,
    // 6: a device's own limits as its last event had them.
    DEVICE_LIMITS_COLUMN,
];

/// A device's own limits as its last event had them (`Device::limits`), so
/// a start publishes only the limits that changed meanwhile (the file's);
/// filled from the limits set over the API.
const DEVICE_LIMITS_COLUMN: &str =
    "ALTER TABLE devices ADD COLUMN limits_json TEXT NOT NULL DEFAULT '{}';
     UPDATE devices SET limits_json = (SELECT l.limits_json FROM device_limits l
         WHERE l.device = devices.id)
         WHERE id IN (SELECT device FROM device_limits);";

/// Operator sessions signed out before their end (`expires`: Unix
/// seconds), so no start accepts their cookie again.
const SIGNED_OUT_TABLE: &str = "CREATE TABLE signed_out (
         session TEXT PRIMARY KEY NOT NULL,
         expires BIGINT NOT NULL
     );";

/// What each event changed besides readings (power, link, staleness,
/// alerts, name: [`Change::between`]), one row per event that changed any
/// of them; kept for the downsampled history's time. Events recorded before
/// this table existed have none.
const CHANGES_TABLE: &str = "CREATE TABLE changes (
         id BIGINT PRIMARY KEY NOT NULL, -- the event's
         device TEXT NOT NULL,
         ts BIGINT NOT NULL,             -- when it was recorded, ms since the epoch
         json TEXT NOT NULL              -- [Change, ...]
     );
     CREATE INDEX changes_by_device ON changes (device, id);";

/// The PostgreSQL schema, in order; the `schema_version` table holds how
/// many were applied. Its own list (the SQLite one carries the upgrades of
/// older files): the same tables and columns, with PostgreSQL's types, and
/// a `rowid` on the readings tables so queries ordering by it read the same.
const PG_MIGRATIONS: &[&str] = &[
    // 1: everything SQLite's three migrations make.
    "CREATE TABLE devices (
         id TEXT PRIMARY KEY NOT NULL,
         name TEXT NOT NULL,
         status_json TEXT NOT NULL,
         online BOOLEAN,
         updated_at TEXT NOT NULL,
         stale BOOLEAN NOT NULL DEFAULT FALSE,
         alerts_json TEXT NOT NULL DEFAULT '{}'
     );
     CREATE TABLE events (
         id BIGINT PRIMARY KEY NOT NULL,
         device TEXT NOT NULL,
         json TEXT NOT NULL,
         ts BIGINT NOT NULL DEFAULT 0
     );
     CREATE TABLE readings (
         rowid BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
         device TEXT NOT NULL,
         metric TEXT NOT NULL,
         ts BIGINT NOT NULL,
         value DOUBLE PRECISION NOT NULL
     );
     CREATE INDEX readings_by_device_metric_ts ON readings (device, metric, ts);
     CREATE TABLE device_limits (
         device TEXT PRIMARY KEY NOT NULL,
         limits_json TEXT NOT NULL
     );
     CREATE TABLE report_intervals (
         device TEXT PRIMARY KEY NOT NULL,
         interval_ms BIGINT NOT NULL
     );
     CREATE TABLE meta (
         key TEXT PRIMARY KEY NOT NULL,
         value BIGINT NOT NULL
     );
     CREATE TABLE readings_1m (
         rowid BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
         device TEXT NOT NULL,
         metric TEXT NOT NULL,
         minute BIGINT NOT NULL,
         min DOUBLE PRECISION NOT NULL,
         avg DOUBLE PRECISION NOT NULL,
         max DOUBLE PRECISION NOT NULL,
         count BIGINT NOT NULL,
         last DOUBLE PRECISION NOT NULL,
         UNIQUE (device, metric, minute)
     );",
    // 2: as SQLite's 4.
    SIGNED_OUT_TABLE,
    // 3: as SQLite's 5.
    CHANGES_TABLE,
    // 4: as SQLite's 6.
    DEVICE_LIMITS_COLUMN,
];

/// The advisory lock the PostgreSQL migrations run under, so instances
/// starting together migrate one after the other ("TELLTALE" in ASCII).
const PG_MIGRATION_LOCK: i64 = 0x5445_4c4c_5441_4c45;

/// `meta` keys.
pub(crate) const LAST_EVENT_ID: &str = "last_event_id";
/// Raw readings older than this (ms) have been folded into `readings_1m`.
pub(crate) const FOLDED_UNTIL: &str = "folded_until";

/// How hard a commit tries to reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL`: every commit is fsynced before it returns.
    Full,
    /// `synchronous=OFF`: for a store that promises nothing across restarts
    /// (`--memory`).
    Off,
}

/// Where the store's database is.
#[derive(Clone)]
enum Backend {
    Sqlite {
        path: PathBuf,
        durability: Durability,
    },
    /// PostgreSQL: a commit returns once it is durable on the server
    /// (`synchronous_commit` as the server has it, `on` by default).
    Postgres(Box<postgres::Config>),
}

pub struct Store {
    conn: Conn,
    backend: Backend,
    /// Taken around every write transaction of this process (the hub's
    /// commits, each retention batch), so writers wait on each other here,
    /// woken the moment the other is done, rather than in SQLite's busy
    /// handler, which polls with sleeps of up to 25 ms or more.
    gate: WriteGate,
}

/// Opens connections to one store's database ([`Store::connector`]).
#[derive(Clone)]
pub struct Connector(Backend);

impl Connector {
    pub fn connect(&self) -> Result<Conn, StoreError> {
        match &self.0 {
            Backend::Sqlite { path, durability } => Ok(Conn::Sqlite(connect(path, *durability)?)),
            Backend::Postgres(config) => Conn::postgres(config),
        }
    }
}

/// See [`Store`]'s `gate`.
pub type WriteGate = Arc<Mutex<()>>;

/// Keeps the value already stored if it is larger: two instances sharing a
/// database may commit their events out of order.
const SAVE_LAST_ID: &str = "INSERT INTO meta (key, value) VALUES (?1, ?2)
     ON CONFLICT (key) DO UPDATE SET value =
         CASE WHEN excluded.value > meta.value THEN excluded.value ELSE meta.value END";

impl Store {
    /// Opens (creating it and the directory if need be) the durable store in
    /// `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, Durability::Full)
    }

    /// Opens the store in `dir` with the given durability.
    pub fn open_with(dir: &Path, durability: Durability) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE_NAME);
        let conn = connect(&path, durability)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!("the store could not switch to WAL mode (it is in {mode} mode)");
        }
        let mut store = Self {
            conn: Conn::Sqlite(conn),
            backend: Backend::Sqlite { path, durability },
            gate: WriteGate::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Opens the store in the PostgreSQL database at `url`
    /// (`postgres://user:password@host:port/database?options=…`), creating
    /// its tables if need be. Several instances may share one database.
    pub fn open_postgres(url: &str) -> Result<Self, StoreError> {
        let config: postgres::Config = url.parse()?;
        let conn = Conn::postgres(&config)?;
        // A commit is durable before it returns: unless the database was
        // set up to wait for more (a standby), it waits for the local flush.
        let sync = conn
            .query_opt("SELECT current_setting('synchronous_commit')", &[])?
            .map(|r| r.string(0))
            .transpose()?;
        if sync.as_deref() == Some("off") {
            tracing::info!("synchronous_commit is off in the database; the store turns it on");
            conn.setup("SET synchronous_commit = on")?;
        }
        let mut store = Self {
            conn,
            backend: Backend::Postgres(Box::new(config)),
            gate: WriteGate::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Another connection to the same database, for work that must not wait
    /// for the hub's lock: history reads, retention. Readers run beside the
    /// writer (SQLite's WAL, PostgreSQL's MVCC); SQLite writers take turns
    /// (each waits up to 5 s).
    pub fn connect(&self) -> Result<Conn, StoreError> {
        self.connector().connect()
    }

    /// What opens more connections to this store's database, apart from it.
    pub fn connector(&self) -> Connector {
        Connector(self.backend.clone())
    }

    /// Whether a commit waits for the disk, or the network (it does unless
    /// `--memory`): the hub then lets the runtime move other tasks off the
    /// committing thread.
    pub fn fsyncs(&self) -> bool {
        match &self.backend {
            Backend::Sqlite { durability, .. } => *durability == Durability::Full,
            Backend::Postgres(_) => true,
        }
    }

    /// Whether other instances may write to this database too (PostgreSQL).
    pub fn shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// The lock every writer of this process takes around its transaction.
    pub fn write_gate(&self) -> WriteGate {
        self.gate.clone()
    }

    /// What the store is, for messages: the SQLite file, or PostgreSQL's
    /// host and database (never the password).
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Sqlite { path, .. } => path.display().to_string(),
            Backend::Postgres(config) => describe_postgres(config),
        }
    }

    /// The newest event id ever recorded, even if that event was pruned.
    pub fn last_event_id(&self) -> Result<Option<EventId>, StoreError> {
        let recorded = self
            .conn
            .query_opt(
                "SELECT value FROM meta WHERE key = ?1",
                &[Arg::Str(LAST_EVENT_ID)],
            )?
            .map(|r| r.i64(0))
            .transpose()?;
        let newest = self.id_range()?.map(|(_, newest)| newest);
        Ok(recorded.map(|id| id as EventId).max(newest))
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        match &mut self.conn {
            Conn::Sqlite(conn) => {
                let known = MIGRATIONS.len() as i64;
                let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
                if version > known {
                    return Err(StoreError::TooNew(version, known));
                }
                for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                    let tx = conn.transaction()?;
                    tx.execute_batch(sql)?;
                    tx.pragma_update(None, "user_version", i as i64 + 1)?;
                    tx.commit()?;
                }
                Ok(())
            }
            Conn::Postgres(_) => self.conn.transaction(TxKind::Write, |tx| {
                // Instances starting together wait here for each other; the
                // lock goes with the transaction.
                tx.query(
                    "SELECT pg_advisory_xact_lock(?1)::TEXT",
                    &[Arg::I64(PG_MIGRATION_LOCK)],
                )?;
                tx.batch("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
                let version = pg_version(tx)?;
                let known = PG_MIGRATIONS.len() as i64;
                if version > known {
                    return Err(StoreError::TooNew(version, known));
                }
                for sql in PG_MIGRATIONS.iter().skip(version as usize) {
                    tx.batch(sql)?;
                }
                tx.execute("DELETE FROM schema_version", &[])?;
                tx.execute(
                    "INSERT INTO schema_version (version) VALUES (?1)",
                    &[Arg::I64(version.max(known))],
                )?;
                Ok(())
            }),
        }
    }

    /// Every stored device, by id.
    pub fn devices(&self) -> Result<Vec<Device>, StoreError> {
        let rows = self.conn.query(
            "SELECT id, name, status_json, online, updated_at, stale, alerts_json, limits_json
             FROM devices ORDER BY id",
            &[],
        )?;
        let mut devices = Vec::new();
        for r in rows {
            let id = r.string(0)?;
            let (status, updated_at) = (r.string(2)?, r.string(4)?);
            let (alerts, limits) = (r.string(6)?, r.string(7)?);
            let corrupt = |what: &str| StoreError::Corrupt(format!("{id}: {what}"));
            devices.push(Device {
                id: DeviceId::parse(&id).map_err(&corrupt)?,
                status: serde_json::from_str(&status).map_err(|e| corrupt(&e.to_string()))?,
                online: r.opt_bool(3)?,
                stale: r.bool(5)?,
                alerts: serde_json::from_str(&alerts).map_err(|e| corrupt(&e.to_string()))?,
                limits: serde_json::from_str(&limits).map_err(|e| corrupt(&e.to_string()))?,
                updated_at: updated_at
                    .parse()
                    .map_err(|e: chrono::ParseError| corrupt(&e.to_string()))?,
                name: r.string(1)?,
            });
        }
        Ok(devices)
    }

    /// The newest and oldest stored event ids, if there are any.
    pub fn id_range(&self) -> Result<Option<(EventId, EventId)>, StoreError> {
        let Some(r) = self
            .conn
            .query_opt("SELECT MIN(id), MAX(id) FROM events", &[])?
        else {
            return Ok(None);
        };
        Ok(match (r.opt_i64(0)?, r.opt_i64(1)?) {
            (Some(oldest), Some(newest)) => Some((oldest as EventId, newest as EventId)),
            _ => None,
        })
    }

    /// Records event `id` — `device`'s new state, as the `StatusEvent` JSON
    /// `json` — in one transaction: the event row, the device row, and a
    /// reading for each number that differs from `previous` (so the history
    /// holds every change, with the time it was made).
    ///
    /// On a shared database two instances may record (distinct) events at
    /// once: the last id kept is the larger one, whichever commits last.
    pub fn record(
        &mut self,
        id: EventId,
        device: &Device,
        previous: Option<&Device>,
        json: &str,
    ) -> Result<(), StoreError> {
        let row = EventRow {
            id,
            device,
            previous,
            json,
            removed: false,
        };
        self.record_rows(&[row])
    }

    /// Cluster mode: records `events` as [`record_all`](Self::record_all)
    /// does, but commits only once `publish` (their append to the cluster's
    /// stream) succeeded, so the store never holds an event the cluster
    /// lacks, nor (but for a failed commit, which the caller must note) the
    /// reverse. An event id already in the store (another instance recorded
    /// it first: on a shared database its uncommitted row is waited for) is
    /// [`StoreError::Behind`], before anything is published.
    pub fn record_all_then(
        &mut self,
        events: &[Recorded],
        publish: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let _gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        let rows: Vec<_> = events.iter().map(Recorded::row).collect();
        self.conn.transaction(TxKind::Write, |tx| {
            insert_events(tx, &rows).map_err(|e| {
                if e.is_duplicate() {
                    StoreError::Behind
                } else {
                    e
                }
            })?;
            publish()
        })
    }

    /// Records `event` as [`record_all`](Self::record_all) does, unless the
    /// store has it already: for an event whose commit failed, which may
    /// have been made durable all the same (or, on a shared database, an
    /// event of the same id that another instance recorded).
    pub fn record_missing(&mut self, event: &Recorded) -> Result<(), StoreError> {
        match self.record_all(std::slice::from_ref(event)) {
            Err(e) if e.is_duplicate() => Ok(()),
            done => done,
        }
    }

    /// Records several events, in id order, as [`record`](Self::record)
    /// does one, in one transaction: all or none, at the cost of one commit
    /// (one fsync).
    pub fn record_all(&mut self, events: &[Recorded]) -> Result<(), StoreError> {
        let rows: Vec<_> = events.iter().map(Recorded::row).collect();
        self.record_rows(&rows)
    }

    fn record_rows(&mut self, rows: &[EventRow]) -> Result<(), StoreError> {
        let _gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        self.conn
            .transaction(TxKind::Write, |tx| insert_events(tx, rows))
    }

    /// Cluster mode: takes the cluster's state, as of event `last_id`, in
    /// place of this store's devices. The events stay (history); the ones
    /// in between are missing, which a replay notices.
    pub fn adopt(&mut self, last_id: EventId, devices: &[Device]) -> Result<(), StoreError> {
        let _gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        self.conn.transaction(TxKind::Write, |tx| {
            tx.execute("DELETE FROM devices", &[])?;
            save_devices(tx, &devices.iter().collect::<Vec<_>>())?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[Arg::Str(LAST_EVENT_ID), Arg::I64(last_id as i64)],
            )?;
            Ok(())
        })
    }

    /// The stored events with ids in `after+1 ..= upto`, oldest first.
    pub fn events_between(
        &self,
        after: EventId,
        upto: EventId,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        events_between(&self.conn, after, upto)
    }

    /// The stored readings of one device's metric, `(ts ms, value)` oldest
    /// first.
    pub fn readings(&self, device: &DeviceId, metric: &str) -> Result<Vec<(i64, f64)>, StoreError> {
        self.conn
            .query(
                "SELECT ts, value FROM readings WHERE device = ?1 AND metric = ?2
                 ORDER BY ts, rowid",
                &[Arg::Str(device.as_str()), Arg::Str(metric)],
            )?
            .iter()
            .map(|r| Ok((r.i64(0)?, r.f64(1)?)))
            .collect()
    }

    /// The alert limits set over the API, by device.
    pub fn device_limits(&self) -> Result<Vec<(DeviceId, MetricLimits)>, StoreError> {
        let rows = self.conn.query(
            "SELECT device, limits_json FROM device_limits ORDER BY device",
            &[],
        )?;
        let mut all = Vec::new();
        for r in rows {
            let (id, limits) = (r.string(0)?, r.string(1)?);
            let corrupt = |what: &str| StoreError::Corrupt(format!("limits of {id}: {what}"));
            all.push((
                DeviceId::parse(&id).map_err(&corrupt)?,
                serde_json::from_str(&limits).map_err(|e| corrupt(&e.to_string()))?,
            ));
        }
        Ok(all)
    }

    /// Replaces `device`'s limits set over the API (`{}`: none of its own).
    pub fn set_device_limits(
        &mut self,
        device: &DeviceId,
        limits: &MetricLimits,
    ) -> Result<(), StoreError> {
        let _gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        let json = serde_json::to_string(limits).expect("limits always serialize");
        self.conn.execute(
            "INSERT INTO device_limits (device, limits_json) VALUES (?1, ?2)
             ON CONFLICT (device) DO UPDATE SET limits_json = excluded.limits_json",
            &[Arg::Str(device.as_str()), Arg::Str(&json)],
        )?;
        Ok(())
    }

    /// The sessions signed out that have not ended by `now` (Unix seconds).
    pub fn signed_out(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = self.conn.query(
            "SELECT session, expires FROM signed_out WHERE expires > ?1",
            &[Arg::I64(now)],
        )?;
        rows.iter().map(|r| Ok((r.string(0)?, r.i64(1)?))).collect()
    }

    /// Keeps `session` signed out, forgetting those that have ended by `now`.
    pub fn save_signed_out(&mut self, session: &Session, now: i64) -> Result<(), StoreError> {
        let _gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        self.conn.transaction(TxKind::Write, |tx| {
            tx.execute(
                "DELETE FROM signed_out WHERE expires <= ?1",
                &[Arg::I64(now)],
            )?;
            tx.execute(
                "INSERT INTO signed_out (session, expires) VALUES (?1, ?2)
                 ON CONFLICT (session) DO NOTHING",
                &[Arg::Str(&session.id), Arg::I64(session.expires)],
            )?;
            Ok(())
        })
    }

    /// The saved learned report intervals, by device.
    pub fn report_intervals(&self) -> Result<Vec<(DeviceId, Duration)>, StoreError> {
        let rows = self.conn.query(
            "SELECT device, interval_ms FROM report_intervals ORDER BY device",
            &[],
        )?;
        let mut all = Vec::new();
        for r in rows {
            let (id, ms) = (r.string(0)?, r.i64(1)?);
            let id = DeviceId::parse(&id)
                .map_err(|e| StoreError::Corrupt(format!("report interval of {id}: {e}")))?;
            all.push((id, Duration::from_millis(ms.max(0) as u64)));
        }
        Ok(all)
    }

    /// Saves `device`'s learned report interval.
    pub fn save_report_interval(
        &mut self,
        device: &DeviceId,
        interval: Duration,
    ) -> Result<(), StoreError> {
        let ms = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX);
        let _gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        self.conn.execute(
            "INSERT INTO report_intervals (device, interval_ms) VALUES (?1, ?2)
             ON CONFLICT (device) DO UPDATE SET interval_ms = excluded.interval_ms",
            &[Arg::Str(device.as_str()), Arg::I64(ms)],
        )?;
        Ok(())
    }

    /// The schema version (for tests and diagnostics): SQLite's
    /// `user_version`, PostgreSQL's `schema_version` (each counts its own
    /// list of migrations).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        match &self.conn {
            Conn::Sqlite(conn) => Ok(conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .optional()?
                .unwrap_or(0)),
            Conn::Postgres(_) => pg_version(&self.conn),
        }
    }
}

/// The version in PostgreSQL's `schema_version` (0: none yet).
fn pg_version(conn: &Conn) -> Result<i64, StoreError> {
    Ok(conn
        .query_opt("SELECT MAX(version) FROM schema_version", &[])?
        .map(|r| r.opt_i64(0))
        .transpose()?
        .flatten()
        .unwrap_or(0))
}

/// `host:port/database` of a PostgreSQL configuration.
fn describe_postgres(config: &postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().unwrap_or("");
    format!("postgres://{host}:{port}/{db}")
}

/// Inserts or replaces the rows of `devices` (distinct ids).
fn save_devices(tx: &Conn, devices: &[&Device]) -> Result<(), StoreError> {
    let texts: Vec<_> = devices
        .iter()
        .map(|d| {
            (
                serde_json::to_string(&d.status).expect("a status always serializes"),
                serde_json::to_string(&d.alerts).expect("alerts always serialize"),
                serde_json::to_string(&d.limits).expect("limits always serialize"),
                d.updated_at.to_rfc3339(),
            )
        })
        .collect();
    let mut args = Vec::with_capacity(devices.len() * 8);
    for (d, (status, alerts, limits, updated_at)) in devices.iter().zip(&texts) {
        args.extend([
            Arg::Str(d.id.as_str()),
            Arg::Str(&d.name),
            Arg::Str(status),
            Arg::OptBool(d.online),
            Arg::Str(updated_at),
            Arg::Bool(d.stale),
            Arg::Str(alerts),
            Arg::Str(limits),
        ]);
    }
    insert_rows(
        tx,
        "INSERT INTO devices
             (id, name, status_json, online, updated_at, stale, alerts_json, limits_json)",
        "ON CONFLICT (id) DO UPDATE SET name = excluded.name,
             status_json = excluded.status_json, online = excluded.online,
             updated_at = excluded.updated_at, stale = excluded.stale,
             alerts_json = excluded.alerts_json, limits_json = excluded.limits_json",
        8,
        &args,
    )
}

/// Runs `head VALUES (…), (…) … tail` for rows of `width` arguments each,
/// many rows a statement: a group's rows cost a few round trips to
/// PostgreSQL, not one each. Statements take 1, 2, 4, … or [`ROWS`] rows,
/// so only a few distinct ones are prepared (and cached).
fn insert_rows(
    tx: &Conn,
    head: &str,
    tail: &str,
    width: usize,
    args: &[Arg],
) -> Result<(), StoreError> {
    const ROWS: usize = 32;
    let mut rest = args;
    while !rest.is_empty() {
        let rows = (rest.len() / width).min(ROWS);
        let rows = 1 << rows.ilog2();
        let values: Vec<String> = (0..rows)
            .map(|r| {
                let cells: Vec<String> =
                    (1..=width).map(|c| format!("?{}", r * width + c)).collect();
                format!("({})", cells.join(", "))
            })
            .collect();
        let sql = format!("{head} VALUES {} {tail}", values.join(", "));
        let (now, later) = rest.split_at(rows * width);
        tx.execute(&sql, now)?;
        rest = later;
    }
    Ok(())
}

/// A connection to the database at `path` with this crate's settings.
fn connect(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    // Room for every statement, the sizes of `insert_rows` included.
    conn.set_prepared_statement_cache_capacity(64);
    // Another writer (the retention task, or a second server on the same
    // directory) holding the write lock is waited for a little, then an error.
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let sync = match durability {
        Durability::Full => "FULL",
        Durability::Off => "OFF",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    Ok(conn)
}

/// The data directory of `--memory`: a fresh temporary directory, removed
/// when this is dropped (the server's normal exit). One killed with -9 is
/// left behind; the next memory-mode server removes it: each directory holds
/// a lock file that its process keeps locked while it runs.
pub struct MemoryDir {
    dir: tempfile::TempDir,
    _lock: std::fs::File,
}

/// Prefix of the memory-mode directories in the system's temporary directory.
const MEMORY_PREFIX: &str = "telltale-memory-";
const MEMORY_LOCK: &str = "lock";

impl MemoryDir {
    pub fn new() -> Result<Self, StoreError> {
        Self::sweep(&std::env::temp_dir());
        let dir = tempfile::Builder::new().prefix(MEMORY_PREFIX).tempdir()?;
        let lock = std::fs::File::create(dir.path().join(MEMORY_LOCK))?;
        lock.lock()?;
        Ok(Self { dir, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Removes the memory directories of servers that are gone (their lock
    /// file is no longer locked). Best effort: errors are ignored.
    fn sweep(tmp: &Path) {
        let Ok(entries) = std::fs::read_dir(tmp) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let ours = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(MEMORY_PREFIX));
            let Ok(lock) = std::fs::File::open(path.join(MEMORY_LOCK)) else {
                continue;
            };
            // A directory just made by a server starting right now is not
            // locked yet: leave anything younger than a minute alone.
            let young = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < std::time::Duration::from_secs(60));
            if ours && !young && lock.try_lock().is_ok() {
                tracing::debug!("removing {}, left by a server that is gone", path.display());
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

/// An event to record: see [`Store::record_all`].
pub struct Recorded {
    pub id: EventId,
    pub device: Device,
    /// The device's state before this event.
    pub previous: Option<Device>,
    pub json: Box<str>,
    /// The event removes the device (`device` is its last state): its
    /// state, history and learned report interval go.
    pub removed: bool,
}

impl Recorded {
    fn row(&self) -> EventRow<'_> {
        EventRow {
            id: self.id,
            device: &self.device,
            previous: self.previous.as_ref(),
            json: &self.json,
            removed: self.removed,
        }
    }
}

/// An event as [`insert_events`] writes it.
struct EventRow<'a> {
    id: EventId,
    device: &'a Device,
    /// The device's state before this event.
    previous: Option<&'a Device>,
    json: &'a str,
    removed: bool,
}

/// The rows of `events`, in id order (see [`Store::record`]): each event,
/// the last id, each device's newest state, and the readings that changed,
/// each kind in as few statements as [`insert_rows`] takes. A removal
/// deletes its device's rows (limits stay: they are configuration, like
/// the thresholds file's); a later event of the same id registers it anew.
fn insert_events(tx: &Conn, events: &[EventRow]) -> Result<(), StoreError> {
    let Some(last) = events.last() else {
        return Ok(());
    };
    // An event's time is its device's `updated_at` (a stale mark keeps an
    // older one: retention may then prune it early, and a resume from
    // before it falls back to a snapshot, never to a gap).
    let ts = |e: &EventRow| e.device.updated_at.timestamp_millis();
    let mut args = Vec::with_capacity(events.len() * 4);
    for e in events {
        args.extend([
            Arg::I64(e.id as i64),
            Arg::Str(e.device.id.as_str()),
            Arg::Str(e.json),
            Arg::I64(ts(e)),
        ]);
    }
    insert_rows(
        tx,
        "INSERT INTO events (id, device, json, ts)",
        "",
        4,
        &args,
    )?;
    tx.execute(
        SAVE_LAST_ID,
        &[Arg::Str(LAST_EVENT_ID), Arg::I64(last.id as i64)],
    )?;
    // Each device's newest event, and the index of its last removal.
    let mut newest: Vec<&EventRow> = Vec::new();
    let mut removed: HashMap<&DeviceId, usize> = HashMap::new();
    for (i, e) in events.iter().enumerate().rev() {
        if !newest.iter().any(|n| n.device.id == e.device.id) {
            newest.push(e);
        }
        if e.removed {
            removed.entry(&e.device.id).or_insert(i);
        }
    }
    for device in removed.keys() {
        for delete in [
            "DELETE FROM devices WHERE id = ?1",
            "DELETE FROM readings WHERE device = ?1",
            "DELETE FROM readings_1m WHERE device = ?1",
            "DELETE FROM report_intervals WHERE device = ?1",
            "DELETE FROM changes WHERE device = ?1",
        ] {
            tx.execute(delete, &[Arg::Str(device.as_str())])?;
        }
    }
    let newest: Vec<&Device> = newest
        .into_iter()
        .filter(|e| !e.removed)
        .map(|e| e.device)
        .collect();
    save_devices(tx, &newest)?;
    // A device's events up to its removal: their history went with it.
    let gone = |i: usize, e: &EventRow| removed.get(&e.device.id).is_some_and(|&r| i <= r);
    let mut args = Vec::new();
    for (i, e) in events.iter().enumerate() {
        if gone(i, e) {
            continue;
        }
        let old = e.previous.map(|d| &d.status);
        let s = &e.device.status;
        let numbers = [
            (
                "temperature",
                s.temperature,
                old.and_then(|o| o.temperature),
            ),
            ("humidity", s.humidity, old.and_then(|o| o.humidity)),
        ]
        .into_iter()
        .chain(s.metrics.iter().map(|(name, &value)| {
            let before = old.and_then(|o| o.metrics.get(name).copied());
            (name.as_str(), Some(value), before)
        }));
        for (metric, now, before) in numbers {
            if let Some(value) = now.filter(|v| Some(*v) != before) {
                args.extend([
                    Arg::Str(e.device.id.as_str()),
                    Arg::Str(metric),
                    Arg::I64(ts(e)),
                    Arg::F64(value),
                ]);
            }
        }
    }
    insert_rows(
        tx,
        "INSERT INTO readings (device, metric, ts, value)",
        "",
        4,
        &args,
    )?;
    let changed: Vec<(&EventRow, String)> = events
        .iter()
        .enumerate()
        .filter(|&(i, e)| !gone(i, e))
        .filter_map(|(_, e)| {
            let changes = Change::between(e.previous, e.device);
            (!changes.is_empty()).then(|| {
                (
                    e,
                    serde_json::to_string(&changes).expect("changes serialize"),
                )
            })
        })
        .collect();
    // A change's time is when it was recorded, not `updated_at`: a device
    // goes stale long after its last report.
    let now = chrono::Utc::now().timestamp_millis();
    let mut args = Vec::with_capacity(changed.len() * 4);
    for (e, json) in &changed {
        args.extend([
            Arg::I64(e.id as i64),
            Arg::Str(e.device.id.as_str()),
            Arg::I64(now),
            Arg::Str(json),
        ]);
    }
    insert_rows(
        tx,
        "INSERT INTO changes (id, device, ts, json)",
        "",
        4,
        &args,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Status;
    use chrono::Utc;
    use std::collections::BTreeMap;

    /// The temperatures recorded for `id`, oldest first.
    fn temperatures(store: &Store, id: &DeviceId) -> Vec<f64> {
        let readings = store.readings(id, "temperature").unwrap();
        readings.into_iter().map(|(_, v)| v).collect()
    }

    pub(super) fn device(id: &str, t: f64) -> Device {
        Device {
            id: DeviceId::parse(id).unwrap(),
            name: format!("Device {id}"),
            status: Status {
                temperature: Some(t),
                humidity: None,
                power_on: Some(true),
                metrics: [("load".to_owned(), t / 10.0)].into(),
            },
            online: Some(false),
            stale: false,
            alerts: Default::default(),
            limits: Default::default(),
            updated_at: Utc::now(),
        }
    }

    /// What either backend does alike: events, devices and readings
    /// recorded, then read back from the store `open` opens again. Returns
    /// that store.
    pub(crate) fn records_read_back_after_reopening(open: impl Fn() -> Store) -> Store {
        let a1 = device("a", 20.0);
        {
            let mut store = open();
            assert_eq!(store.id_range().unwrap(), None);
            assert_eq!(store.last_event_id().unwrap(), None);
            store.record(10, &a1, None, r#"{"n":10}"#).unwrap();
            store
                .record(11, &device("b", 5.0), None, r#"{"n":11}"#)
                .unwrap();
            let mut a2 = device("a", 21.0);
            a2.online = None;
            a2.stale = true;
            a2.status.metrics.insert("load".into(), 2.0); // unchanged
            store.record(12, &a2, Some(&a1), r#"{"n":12}"#).unwrap();
            // The same id twice fails, and leaves nothing behind.
            assert!(store.record(12, &a1, None, "{}").is_err());
            let session = |id: &str, expires| Session {
                id: id.into(),
                expires,
            };
            store.save_signed_out(&session("s1", 2_000), 1_000).unwrap();
            store.save_signed_out(&session("s0", 1_500), 1_000).unwrap();
            store.save_signed_out(&session("s1", 2_000), 1_000).unwrap();
            // Forgets those ended by now: s0.
            store.save_signed_out(&session("s2", 3_000), 1_600).unwrap();
        }
        let store = open();
        assert_eq!(store.id_range().unwrap(), Some((10, 12)));
        assert_eq!(store.last_event_id().unwrap(), Some(12));
        let devices = store.devices().unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].id.as_str(), "a");
        assert_eq!(devices[0].status.temperature, Some(21.0));
        assert_eq!((devices[0].online, devices[0].stale), (None, true));
        assert_eq!(devices[1].online, Some(false));
        assert_eq!(devices[0].name, "Device a");
        let events = store.events_between(10, 12).unwrap();
        assert_eq!(
            events
                .iter()
                .map(|e| (e.id, e.json.as_str()))
                .collect::<Vec<_>>(),
            [(11, r#"{"n":11}"#), (12, r#"{"n":12}"#)]
        );
        assert_eq!(events[0].device.as_str(), "b");
        let a = DeviceId::parse("a").unwrap();
        assert_eq!(temperatures(&store, &a), [20.0, 21.0]);
        assert_eq!(store.readings(&a, "load").unwrap().len(), 1, "only changes");
        let mut signed_out = store.signed_out(1_000).unwrap();
        signed_out.sort();
        assert_eq!(signed_out, [("s1".into(), 2_000), ("s2".into(), 3_000)]);
        assert_eq!(store.signed_out(2_000).unwrap(), [("s2".into(), 3_000)]);
        store
    }

    /// What either backend does alike in cluster mode: an event is kept
    /// only if it was published, an id already stored is `Behind` before
    /// anything is published, and an unsure event is recorded once.
    pub(crate) fn records_only_what_was_published(mut store: Store) {
        let (a1, a2) = (device("a", 1.0), device("a", 2.0));
        let event = |id, device: &Device, previous: Option<&Device>, json: &str| Recorded {
            id,
            device: device.clone(),
            previous: previous.cloned(),
            json: json.into(),
            removed: false,
        };
        let first = [event(1, &a1, None, r#"{"n":1}"#)];
        store.record_all_then(&first, || Ok(())).unwrap();
        // Redis refused: nothing of events 2 and 3 is kept.
        let (b, c) = (device("b", 5.0), device("c", 6.0));
        let two = [event(2, &b, None, "{}"), event(3, &c, None, "{}")];
        let refused = store.record_all_then(&two, || Err(StoreError::Broker("gone".into())));
        assert!(matches!(refused, Err(StoreError::Broker(_))), "{refused:?}");
        assert_eq!(store.id_range().unwrap(), Some((1, 1)));
        assert_eq!(store.devices().unwrap().len(), 1);
        // An id already there: behind, and not published.
        let again = [event(1, &a2, Some(&a1), "{}")];
        let again = store.record_all_then(&again, || panic!("published"));
        assert!(matches!(again, Err(StoreError::Behind)), "{again:?}");
        // An unsure event: kept if missing, left as it is if there.
        store
            .record_missing(&event(1, &a2, Some(&a1), "{}"))
            .unwrap();
        store
            .record_missing(&event(2, &a2, Some(&a1), r#"{"n":2}"#))
            .unwrap();
        store
            .record_missing(&event(2, &a2, Some(&a1), "{}"))
            .unwrap();
        let events = store.events_between(0, 2).unwrap();
        let jsons: Vec<_> = events.iter().map(|e| e.json.as_str()).collect();
        assert_eq!(jsons, [r#"{"n":1}"#, r#"{"n":2}"#]);
        assert_eq!(store.devices().unwrap()[0].status.temperature, Some(2.0));
        assert_eq!(store.readings(&a1.id, "temperature").unwrap().len(), 2);
    }

    /// A group larger than one statement's rows: every event, each
    /// device's newest state, and every changed reading.
    pub(crate) fn records_a_large_group(mut store: Store) {
        let mut before: BTreeMap<&str, Device> = BTreeMap::new();
        let mut events = Vec::new();
        for i in 0..37u64 {
            let name = ["a", "b", "c"][i as usize % 3];
            // `load` (temperature / 10) changes with it; every 4th repeats.
            let t = (i / 4 * 4) as f64;
            let device = device(name, t);
            let previous = before.insert(name, device.clone());
            events.push(Recorded {
                id: 100 + i,
                device,
                previous,
                json: format!(r#"{{"n":{i}}}"#).into(),
                removed: false,
            });
        }
        store.record_all(&events).unwrap();
        assert_eq!(store.id_range().unwrap(), Some((100, 136)));
        assert_eq!(store.last_event_id().unwrap(), Some(136));
        let stored = store.events_between(0, 200).unwrap();
        assert_eq!(stored.len(), 37);
        assert!(stored.iter().zip(&events).all(|(s, e)| s.json == *e.json));
        let devices = store.devices().unwrap();
        let temps: Vec<_> = devices.iter().map(|d| d.status.temperature).collect();
        assert_eq!(temps, [Some(36.0), Some(32.0), Some(32.0)]);
        for (name, last) in [("a", 36.0), ("b", 32.0), ("c", 32.0)] {
            let id = DeviceId::parse(name).unwrap();
            let readings = temperatures(&store, &id);
            let want: Vec<f64> = events
                .iter()
                .filter(|e| e.device.id == id)
                .filter(|e| {
                    e.previous.as_ref().and_then(|p| p.status.temperature)
                        != e.device.status.temperature
                })
                .map(|e| e.device.status.temperature.unwrap())
                .collect();
            assert_eq!(readings, want, "{name}");
            assert_eq!(readings.last(), Some(&last));
            assert_eq!(store.readings(&id, "load").unwrap().len(), want.len());
        }
    }

    /// The changes recorded for `id`, newest first.
    fn changes(store: &Store, id: &DeviceId, limit: usize) -> Vec<(EventId, Change)> {
        let mut reader = crate::server::history::Reader::new(store.connect().unwrap()).unwrap();
        let changes = reader.changes(Some(id), limit).unwrap();
        assert!(changes.iter().all(|c| &c.device == id));
        changes.into_iter().map(|c| (c.id, c.change)).collect()
    }

    pub(crate) fn records_changes_besides_readings(mut store: Store) {
        let a1 = device("a", 1.0);
        let mut a2 = device("a", 1.0);
        a2.status.power_on = Some(false);
        a2.name = "Aye".into();
        let a3 = device("a", 2.0);
        let rows = [(1, &a1, None), (2, &a2, Some(&a1)), (3, &a3, Some(&a2))];
        for (id, device, previous) in rows {
            store.record(id, device, previous, "{}").unwrap();
        }
        let b = device("b", 9.0);
        store.record(4, &b, None, "{}").unwrap();
        let power_on = Change::Power { on: true };
        let renamed = |name: &str| Change::Renamed { name: name.into() };
        let a = &a1.id;
        assert_eq!(
            changes(&store, a, 10),
            [
                (3, renamed("Device a")),
                (3, power_on.clone()),
                (2, renamed("Aye")),
                (2, Change::Power { on: false }),
                (1, Change::Registered),
            ]
        );
        assert_eq!(changes(&store, a, 3).len(), 3, "a limit counts changes");
        assert_eq!(changes(&store, &b.id, 10), [(4, Change::Registered)]);
        // Every device's, newest first.
        let mut reader = crate::server::history::Reader::new(store.connect().unwrap()).unwrap();
        let all: Vec<_> = reader
            .changes(None, 4)
            .unwrap()
            .into_iter()
            .map(|c| (c.id, c.device.to_string(), c.change))
            .collect();
        assert_eq!(
            all,
            [
                (4, "b".into(), Change::Registered),
                (3, "a".into(), renamed("Device a")),
                (3, "a".into(), power_on),
                (2, "a".into(), renamed("Aye")),
            ]
        );
    }

    /// A removal deletes its device's state, history and learned
    /// interval; in the same group, a later event registers it afresh.
    pub(crate) fn removes_a_device_with_its_history(mut store: Store) {
        let event = |id, device: &Device, previous: Option<&Device>, removed| Recorded {
            id,
            device: device.clone(),
            previous: previous.cloned(),
            json: "{}".into(),
            removed,
        };
        let (a1, a2, a3, b) = (
            device("a", 1.0),
            device("a", 2.0),
            device("a", 3.0),
            device("b", 9.0),
        );
        store
            .record_all(&[event(1, &a1, None, false), event(2, &b, None, false)])
            .unwrap();
        store
            .save_report_interval(&a1.id, Duration::from_secs(5))
            .unwrap();
        store
            .record_all(&[
                event(3, &a2, Some(&a1), false),
                event(4, &a2, Some(&a2), true),
                event(5, &a3, None, false),
            ])
            .unwrap();
        assert_eq!(temperatures(&store, &a1.id), [3.0]);
        assert_eq!(temperatures(&store, &b.id), [9.0]);
        let temps: Vec<_> = store
            .devices()
            .unwrap()
            .iter()
            .map(|d| d.status.temperature)
            .collect();
        assert_eq!(temps, [Some(3.0), Some(9.0)]);
        assert_eq!(store.report_intervals().unwrap(), []);
        // Its changes before the removal went too: it starts anew.
        assert_eq!(changes(&store, &a1.id, 10), [(5, Change::Registered)]);
        store.record_all(&[event(6, &a3, Some(&a3), true)]).unwrap();
        assert!(temperatures(&store, &a1.id).is_empty());
        assert!(changes(&store, &a1.id, 10).is_empty());
        assert_eq!(changes(&store, &b.id, 10), [(2, Change::Registered)]);
        let devices = store.devices().unwrap();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].id, b.id);
        // The event log keeps the removals, for a resume.
        assert_eq!(store.events_between(0, 6).unwrap().len(), 6);
        assert_eq!(store.last_event_id().unwrap(), Some(6));
    }

    #[test]
    fn changes_besides_readings_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        records_changes_besides_readings(Store::open(dir.path()).unwrap());
    }

    #[test]
    fn a_removal_takes_the_device_and_its_history() {
        let dir = tempfile::tempdir().unwrap();
        removes_a_device_with_its_history(Store::open(dir.path()).unwrap());
    }

    #[test]
    fn a_large_group_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        records_a_large_group(Store::open(dir.path()).unwrap());
    }

    #[test]
    fn only_published_events_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        records_only_what_was_published(Store::open(dir.path()).unwrap());
    }

    #[test]
    fn history_reads_run_side_by_side_each_on_its_own_connection() {
        use crate::server::history::{READERS, readers};
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let d = device("a", 1.5);
        store.record(1, &d, None, "{}").unwrap();
        let readers = readers(store.connector()).unwrap();
        let mut held: Vec<_> = (0..READERS).map(|_| readers.get().unwrap()).collect();
        assert_eq!(readers.state().connections, READERS);
        let now = Utc::now() + chrono::Duration::seconds(1);
        for reader in &mut held {
            let from = now - chrono::Duration::hours(1);
            let history = reader
                .history(&d.id, "temperature", from, now, None, now)
                .unwrap();
            assert_eq!(history.points.last().map(|p| p.v), Some(1.5));
        }
    }

    #[test]
    fn writes_read_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/data");
        let store = records_read_back_after_reopening(|| Store::open(&path).unwrap());
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
    }

    #[test]
    fn an_event_id_is_never_stored_twice() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.record(1, &device("a", 1.0), None, "{}").unwrap();
        assert!(store.record(1, &device("a", 2.0), None, "{}").is_err());
        // The failed transaction left nothing behind.
        assert_eq!(store.devices().unwrap()[0].status.temperature, Some(1.0));
    }

    #[test]
    fn a_version_5_store_gives_its_devices_the_limits_set_over_the_api() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
            for sql in &MIGRATIONS[..5] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 5).unwrap();
            conn.execute_batch(
                "INSERT INTO devices (id, name, status_json, online, updated_at) VALUES
                     ('a', 'A', '{}', NULL, '2026-11-25T12:00:00Z'),
                     ('b', 'B', '{}', NULL, '2026-11-25T12:00:00Z');
                 INSERT INTO device_limits VALUES ('a', '{\"temperature\":{\"max\":30.0}}');",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let devices = store.devices().unwrap();
        assert_eq!(devices[0].limits["temperature"].max, Some(30.0));
        assert!(devices[1].limits.is_empty());
    }

    #[test]
    fn a_version_1_store_migrates_and_keeps_its_devices() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO devices (id, name, status_json, online, updated_at)
                 VALUES ('a', 'A', '{\"temperature\":1.0}', NULL, '2026-11-25T12:00:00Z')",
                [],
            )
            .unwrap();
        }
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let a = store.devices().unwrap().remove(0);
        assert_eq!((a.stale, a.alerts.len()), (false, 0));
        assert_eq!(a.status.temperature, Some(1.0));
        assert!(store.device_limits().unwrap().is_empty());
        // Stale, alerts and limits read back as written.
        let mut d = device("a", 40.0);
        d.stale = true;
        let limits = crate::model::Limits {
            min: None,
            max: Some(30.0),
        };
        d.alerts.insert(
            "temperature".into(),
            crate::model::Alert {
                value: 40.0,
                limits,
            },
        );
        let limits = MetricLimits::from([("temperature".to_owned(), limits)]);
        d.limits = limits.clone();
        store.record(1, &d, Some(&a), "{}").unwrap();
        store.set_device_limits(&d.id, &limits).unwrap();
        store.set_device_limits(&d.id, &limits).unwrap();
        let back = store.devices().unwrap().remove(0);
        assert_eq!((back.stale, &back.alerts), (true, &d.alerts));
        assert_eq!(back.limits, limits);
        assert_eq!(store.device_limits().unwrap(), [(d.id.clone(), limits)]);
        store
            .save_report_interval(&d.id, Duration::from_millis(1))
            .unwrap();
        store
            .save_report_interval(&d.id, Duration::from_millis(2500))
            .unwrap();
        assert_eq!(
            store.report_intervals().unwrap(),
            [(d.id.clone(), Duration::from_millis(2500))]
        );
    }

    #[test]
    fn migration_3_dates_the_old_events_and_keeps_the_last_id() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO events (id, device, json) VALUES (41, 'a', ?1), (42, 'a', '{}')",
                [r#"{"updated_at":"2026-11-25T12:00:00.250Z"}"#],
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        assert_eq!(store.last_event_id().unwrap(), Some(42));
        let ts: Vec<i64> = store
            .conn
            .query("SELECT ts FROM events ORDER BY id", &[])
            .unwrap()
            .iter()
            .map(|r| r.i64(0).unwrap())
            .collect();
        assert_eq!(ts, [1_795_608_000_250, 0], "an undated event is the oldest");
    }

    #[test]
    fn the_last_id_outlives_the_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.last_event_id().unwrap(), None);
        store.record(7, &device("a", 1.0), None, "{}").unwrap();
        store.conn.execute("DELETE FROM events", &[]).unwrap();
        assert_eq!(store.id_range().unwrap(), None);
        assert_eq!(store.last_event_id().unwrap(), Some(7));
    }

    #[test]
    fn a_memory_dir_goes_on_drop_and_a_dead_servers_is_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let mine = MemoryDir::new().unwrap();
        let path = mine.path().to_owned();
        assert!(path.join(MEMORY_LOCK).exists());
        drop(mine);
        assert!(!path.exists());
        // One left by a killed server: unlocked, older than a minute.
        let old = tmp.path().join(format!("{MEMORY_PREFIX}dead"));
        std::fs::create_dir(&old).unwrap();
        std::fs::File::create(old.join(MEMORY_LOCK)).unwrap();
        // A live one: locked.
        let live = tmp.path().join(format!("{MEMORY_PREFIX}live"));
        std::fs::create_dir(&live).unwrap();
        let held = std::fs::File::create(live.join(MEMORY_LOCK)).unwrap();
        held.lock().unwrap();
        let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for dir in [&old, &live] {
            std::fs::File::open(dir)
                .unwrap()
                .set_modified(long_ago)
                .unwrap();
        }
        MemoryDir::sweep(tmp.path());
        assert!(!old.exists());
        assert!(live.exists());
    }

    #[test]
    fn runs_in_wal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let Conn::Sqlite(conn) = &store.conn else {
            unreachable!()
        };
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL");
        assert!(!store.shared());
    }
}

/// Test databases: a fresh PostgreSQL schema per test.
#[cfg(test)]
pub(crate) mod testing {
    use super::Store;

    /// The server the tests use (`TELLTALE_TEST_DATABASE_URL`, by default
    /// the local one).
    pub fn base_url() -> String {
        std::env::var("TELLTALE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    }

    /// A schema of its own in the test database, dropped with this; its
    /// `url` makes it every connection's search path.
    pub struct PgSchema {
        pub url: String,
        base: String,
        name: String,
    }

    impl PgSchema {
        pub fn new() -> Self {
            let base = base_url();
            let name = format!("t_{:016x}", rand::random::<u64>());
            admin(&base)
                .batch_execute(&format!("CREATE SCHEMA {name}"))
                .unwrap();
            let sep = if base.contains('?') { '&' } else { '?' };
            let url = format!("{base}{sep}options=-csearch_path%3D{name}");
            Self { url, base, name }
        }

        pub fn open(&self) -> Store {
            Store::open_postgres(&self.url).unwrap()
        }
    }

    impl Drop for PgSchema {
        fn drop(&mut self) {
            let _ = admin(&self.base)
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
        }
    }

    fn admin(url: &str) -> postgres::Client {
        postgres::Client::connect(url, postgres::NoTls).unwrap_or_else(|e| {
            panic!(
                "the PostgreSQL tests need a server at {url} \
                 (set TELLTALE_TEST_DATABASE_URL to another): {e}"
            )
        })
    }

    mod tests {
        use super::*;
        use crate::model::{Device, DeviceId};
        use crate::server::db::TxKind;
        use crate::server::history::Reader;
        use crate::server::store::tests::{
            device, records_a_large_group, records_changes_besides_readings,
            records_only_what_was_published, records_read_back_after_reopening,
            removes_a_device_with_its_history,
        };
        use crate::server::store::{PG_MIGRATIONS, StoreError};
        use chrono::Utc;
        use std::time::Duration;

        #[test]
        fn writes_read_back_after_reopening() {
            let db = PgSchema::new();
            assert!(db.open().shared() && db.open().fsyncs());
            let mut store = records_read_back_after_reopening(|| db.open());
            assert_eq!(store.schema_version().unwrap(), PG_MIGRATIONS.len() as i64);
            let a1 = device("a", 20.0);
            let a = a1.id.clone();
            // Ids go on upward after a reopen, even once the events are gone.
            store.record(13, &a1, None, "{}").unwrap();
            store.conn.execute("DELETE FROM events", &[]).unwrap();
            assert_eq!(db.open().last_event_id().unwrap(), Some(13));
            // Limits and report intervals.
            let limits = crate::server::thresholds::MetricLimits::from([(
                "temperature".to_owned(),
                crate::model::Limits {
                    min: Some(1.0),
                    max: None,
                },
            )]);
            store.set_device_limits(&a, &limits).unwrap();
            store.set_device_limits(&a, &limits).unwrap();
            assert_eq!(store.device_limits().unwrap(), [(a.clone(), limits)]);
            store
                .save_report_interval(&a, Duration::from_millis(1))
                .unwrap();
            store
                .save_report_interval(&a, Duration::from_millis(2500))
                .unwrap();
            assert_eq!(
                store.report_intervals().unwrap(),
                [(a.clone(), Duration::from_millis(2500))]
            );
            // Adopting another state replaces the devices.
            store.adopt(20, &[device("c", 1.0)]).unwrap();
            assert_eq!(store.devices().unwrap()[0].id.as_str(), "c");
            assert_eq!(store.last_event_id().unwrap(), Some(20));
        }

        #[test]
        fn only_published_events_are_recorded() {
            records_only_what_was_published(PgSchema::new().open());
        }

        #[test]
        fn a_large_group_is_recorded() {
            records_a_large_group(PgSchema::new().open());
        }

        #[test]
        fn a_removal_takes_the_device_and_its_history() {
            removes_a_device_with_its_history(PgSchema::new().open());
        }

        #[test]
        fn changes_besides_readings_are_recorded() {
            records_changes_besides_readings(PgSchema::new().open());
        }

        #[test]
        fn an_instance_recording_an_id_another_holds_waits_then_is_behind() {
            let db = PgSchema::new();
            let (mut one, mut two) = (db.open(), db.open());
            let (holding, held) = std::sync::mpsc::channel();
            let (release, released) = std::sync::mpsc::channel::<()>();
            let event = |id, name| crate::server::store::Recorded {
                id,
                device: device(name, 1.0),
                previous: None,
                json: "{}".into(),
                removed: false,
            };
            std::thread::scope(|s| {
                s.spawn(move || {
                    one.record_all_then(&[event(7, "a")], || {
                        holding.send(()).unwrap();
                        released.recv().unwrap();
                        Ok(())
                    })
                    .unwrap();
                });
                held.recv().unwrap();
                let waiting = s.spawn(|| {
                    two.record_all_then(&[event(7, "b")], || {
                        panic!("published an id another instance holds")
                    })
                });
                std::thread::sleep(Duration::from_millis(200));
                assert!(!waiting.is_finished(), "did not wait for the other commit");
                release.send(()).unwrap();
                let second = waiting.join().unwrap();
                assert!(matches!(second, Err(StoreError::Behind)), "{second:?}");
            });
            let events = db.open().events_between(0, 10).unwrap();
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].device.as_str(), "a");
        }

        #[test]
        fn the_last_id_only_goes_up_when_instances_commit_out_of_order() {
            let db = PgSchema::new();
            let (mut one, mut two) = (db.open(), db.open());
            two.record(2, &device("b", 1.0), None, "{}").unwrap();
            one.record(1, &device("a", 1.0), None, "{}").unwrap();
            assert_eq!(one.last_event_id().unwrap(), Some(2));
            // Distinct ids from many threads at once: all recorded.
            std::thread::scope(|s| {
                for t in 0..4u64 {
                    let db = &db;
                    s.spawn(move || {
                        let mut store = db.open();
                        for i in 0..10 {
                            let id = 100 + t * 10 + i;
                            store
                                .record(id, &device(&format!("d{t}"), i as f64), None, "{}")
                                .unwrap();
                        }
                    });
                }
            });
            assert_eq!(one.events_between(99, 1000).unwrap().len(), 40);
            assert_eq!(one.last_event_id().unwrap(), Some(139));
        }

        #[test]
        fn a_history_read_sees_the_readings() {
            let db = PgSchema::new();
            let mut store = db.open();
            let base = Utc::now() - chrono::Duration::minutes(10);
            let mut previous: Option<Device> = None;
            for (i, t) in [1.0, 2.0, 3.0].into_iter().enumerate() {
                let mut d = device("a", t);
                d.updated_at = base + chrono::Duration::seconds(i as i64);
                store
                    .record(i as u64 + 1, &d, previous.as_ref(), "{}")
                    .unwrap();
                previous = Some(d);
            }
            let mut reader = Reader::new(store.connect().unwrap()).unwrap();
            let a = DeviceId::parse("a").unwrap();
            let history = reader
                .history(
                    &a,
                    "temperature",
                    base - chrono::Duration::seconds(1),
                    Utc::now(),
                    None,
                    Utc::now(),
                )
                .unwrap();
            let values: Vec<f64> = history.points.iter().map(|p| p.v).collect();
            assert_eq!(values, [1.0, 2.0, 3.0]);
            // The reader's connection writes nothing.
            assert!(
                reader
                    .conn_for_tests()
                    .execute("DELETE FROM readings", &[])
                    .is_err()
            );
        }

        #[test]
        fn instances_starting_together_migrate_once() {
            let db = PgSchema::new();
            let versions: Vec<i64> = std::thread::scope(|s| {
                let starts: Vec<_> = (0..6)
                    .map(|_| s.spawn(|| db.open().schema_version().unwrap()))
                    .collect();
                starts.into_iter().map(|t| t.join().unwrap()).collect()
            });
            assert_eq!(versions, [PG_MIGRATIONS.len() as i64; 6]);
            let store = db.open();
            let rows = store
                .conn
                .query("SELECT COUNT(*)::BIGINT FROM schema_version", &[])
                .unwrap();
            assert_eq!(rows[0].i64(0).unwrap(), 1);
        }

        #[test]
        fn a_lost_connection_is_made_again() {
            let db = PgSchema::new();
            let mut store = db.open();
            store.record(1, &device("a", 1.0), None, "{}").unwrap();
            let pid = store
                .conn
                .query("SELECT pg_backend_pid()::BIGINT", &[])
                .unwrap()[0]
                .i64(0)
                .unwrap();
            super::admin(&db.base)
                .execute("SELECT pg_terminate_backend($1)", &[&(pid as i32)])
                .unwrap();
            // Lost inside a transaction: an error, never the rest of the
            // transaction on a new connection.
            let lost = store.conn.transaction(TxKind::Write, |tx| {
                tx.execute("INSERT INTO meta (key, value) VALUES ('x', 1)", &[])?;
                super::admin(&db.base)
                    .execute("SELECT pg_terminate_backend($1)", &[&(pid as i32)])
                    .unwrap();
                while !matches!(
                    tx.execute("INSERT INTO meta (key, value) VALUES ('y', 1)", &[]),
                    Err(StoreError::ConnectionLost)
                ) {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Ok(())
            });
            assert!(lost.is_err());
            // The first use may find the connection gone; the next one
            // connects again.
            let mut id = 2;
            while store.record(id, &device("a", 2.0), None, "{}").is_err() {
                id += 1;
                assert!(id < 5, "the store did not connect again");
            }
            assert_eq!(store.last_event_id().unwrap(), Some(id));
            // Nothing of the broken transaction was written.
            let keys = store
                .conn
                .query("SELECT key FROM meta ORDER BY key", &[])
                .unwrap();
            assert_eq!(keys.len(), 1, "{keys:?}");
        }

        #[test]
        fn commits_wait_for_the_flush_even_where_the_database_does_not() {
            let db = PgSchema::new();
            let url = format!("{}%20-csynchronous_commit%3Doff", db.url);
            let plain = super::admin(&url)
                .query_one("SELECT current_setting('synchronous_commit')", &[])
                .unwrap()
                .get::<_, String>(0);
            assert_eq!(plain, "off", "the URL turns it off");
            let store = Store::open_postgres(&url).unwrap();
            let rows = store
                .conn
                .query("SELECT current_setting('synchronous_commit')", &[])
                .unwrap();
            assert_eq!(rows[0].string(0).unwrap(), "on");
        }

        #[test]
        fn a_missing_server_is_a_clear_error() {
            let e = Store::open_postgres("postgres://nobody@127.0.0.1:1/nothing")
                .err()
                .unwrap();
            assert!(e.to_string().contains("PostgreSQL"), "{e}");
        }
    }
}
