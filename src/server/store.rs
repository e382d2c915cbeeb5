//! The durable store: an embedded SQLite database in the data directory.
//!
//! It keeps every device's last state, every status event (the event log
//! that `Last-Event-ID` resumes from after a restart), the readings
//! history, and the alert limits set over the API. Only the [`Hub`](super::hub::Hub) writes to it, under its lock,
//! so event ids and their order have one source.
//!
//! Durability: each event is one transaction (event row, device row,
//! readings), committed before the hub publishes it or anyone is answered.
//! The database runs in WAL mode with `synchronous=FULL`: every commit
//! fsyncs the WAL. `NORMAL` would already survive a crash of the process
//! (kill -9: committed pages sit in the OS cache and reach the file), but
//! after a power loss or kernel crash it may lose the last commits — updates
//! that were already answered 200. "Nothing acknowledged is lost" has to hold
//! for both, so the price is one fsync per event.

use super::thresholds::MetricLimits;
use crate::model::{Device, DeviceId, EventId};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The database file inside the data directory.
pub const FILE_NAME: &str = "telltale.sqlite3";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store: {0}")]
    Sqlite(#[from] rusqlite::Error),
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
    /// Cluster mode: Redis did not answer, so nothing was published.
    #[error("the cluster's Redis is unreachable, so nothing was accepted; retry shortly ({0})")]
    Broker(String),
    /// Cluster mode: another instance published first. The hub catches up
    /// and tries again; this never reaches a client.
    #[error("this instance is behind the cluster")]
    Behind,
}

/// One stored status event: its id, device and `StatusEvent` JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    pub id: EventId,
    pub device: DeviceId,
    pub json: String,
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
];

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

pub struct Store {
    conn: Connection,
    path: PathBuf,
    durability: Durability,
    /// Taken around every write transaction of this process (the hub's
    /// commits, each retention batch), so writers wait on each other here,
    /// woken the moment the other is done, rather than in SQLite's busy
    /// handler, which polls with sleeps of up to 25 ms or more.
    gate: WriteGate,
}

/// See [`Store`]'s `gate`.
pub type WriteGate = Arc<Mutex<()>>;

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
            conn,
            path,
            durability,
            gate: WriteGate::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Another connection to the same database, for work that must not wait
    /// for the hub's lock: history reads, retention. WAL lets readers run
    /// beside the writer; writers take turns (each waits up to 5 s).
    pub fn connect(&self) -> Result<Connection, StoreError> {
        connect(&self.path, self.durability)
    }

    /// Whether a commit waits for the disk (it does unless `--memory`).
    pub fn fsyncs(&self) -> bool {
        self.durability == Durability::Full
    }

    /// The lock every writer of this process takes around its transaction.
    pub fn write_gate(&self) -> WriteGate {
        self.gate.clone()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The newest event id ever recorded, even if that event was pruned.
    pub fn last_event_id(&self) -> Result<Option<EventId>, StoreError> {
        let recorded: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [LAST_EVENT_ID],
                |r| r.get(0),
            )
            .optional()?;
        let newest = self.id_range()?.map(|(_, newest)| newest);
        Ok(recorded.map(|id| id as EventId).max(newest))
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let known = MIGRATIONS.len() as i64;
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > known {
            return Err(StoreError::TooNew(version, known));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Every stored device, by id.
    pub fn devices(&self) -> Result<Vec<Device>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, name, status_json, online, updated_at, stale, alerts_json
             FROM devices ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<bool>>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, bool>(5)?,
                r.get::<_, String>(6)?,
            ))
        })?;
        let mut devices = Vec::new();
        for row in rows {
            let (id, name, status, online, updated_at, stale, alerts) = row?;
            let corrupt = |what: &str| StoreError::Corrupt(format!("{id}: {what}"));
            devices.push(Device {
                id: DeviceId::parse(&id).map_err(&corrupt)?,
                status: serde_json::from_str(&status).map_err(|e| corrupt(&e.to_string()))?,
                online,
                stale,
                alerts: serde_json::from_str(&alerts).map_err(|e| corrupt(&e.to_string()))?,
                updated_at: updated_at
                    .parse()
                    .map_err(|e: chrono::ParseError| corrupt(&e.to_string()))?,
                name,
            });
        }
        Ok(devices)
    }

    /// The newest and oldest stored event ids, if there are any.
    pub fn id_range(&self) -> Result<Option<(EventId, EventId)>, StoreError> {
        let range: (Option<i64>, Option<i64>) =
            self.conn
                .query_row("SELECT MIN(id), MAX(id) FROM events", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
        Ok(match range {
            (Some(oldest), Some(newest)) => Some((oldest as EventId, newest as EventId)),
            _ => None,
        })
    }

    /// Records event `id` — `device`'s new state, as the `StatusEvent` JSON
    /// `json` — in one transaction: the event row, the device row, and a
    /// reading for each number that differs from `previous` (so the history
    /// holds every change, with the time it was made).
    pub fn record(
        &mut self,
        id: EventId,
        device: &Device,
        previous: Option<&Device>,
        json: &str,
    ) -> Result<(), StoreError> {
        let _gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        let tx = self.conn.transaction()?;
        // The event's time is its device's `updated_at` (a stale mark keeps
        // an older one: retention may then prune it early, and a resume
        // from before it falls back to a snapshot, never to a gap).
        let ts = device.updated_at.timestamp_millis();
        tx.prepare_cached("INSERT INTO events (id, device, json, ts) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![id as i64, device.id.as_str(), json, ts])?;
        tx.prepare_cached(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )?
        .execute(params![LAST_EVENT_ID, id as i64])?;
        save_device(&tx, device)?;
        {
            let mut reading = tx.prepare_cached(
                "INSERT INTO readings (device, metric, ts, value) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let old = previous.map(|d| &d.status);
            let mut changed = |metric: &str, now: Option<f64>, before: Option<f64>| match now {
                Some(value) if Some(value) != before => reading
                    .execute(params![device.id.as_str(), metric, ts, value])
                    .map(drop),
                _ => Ok(()),
            };
            let s = &device.status;
            changed(
                "temperature",
                s.temperature,
                old.and_then(|o| o.temperature),
            )?;
            changed("humidity", s.humidity, old.and_then(|o| o.humidity))?;
            for (name, &value) in &s.metrics {
                let before = old.and_then(|o| o.metrics.get(name).copied());
                changed(name, Some(value), before)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Cluster mode: takes the cluster's state, as of event `last_id`, in
    /// place of this store's devices. The events stay (history); the ones
    /// in between are missing, which a replay notices.
    pub fn adopt(&mut self, last_id: EventId, devices: &[Device]) -> Result<(), StoreError> {
        let _gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM devices", [])?;
        for device in devices {
            save_device(&tx, device)?;
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![LAST_EVENT_ID, last_id as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The stored events with ids in `after+1 ..= upto`, oldest first.
    pub fn events_between(
        &self,
        after: EventId,
        upto: EventId,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, device, json FROM events WHERE id > ?1 AND id <= ?2 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![after as i64, upto as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut events = Vec::new();
        for row in rows {
            let (id, device, json) = row?;
            let device = DeviceId::parse(&device)
                .map_err(|e| StoreError::Corrupt(format!("event {id}: {e}")))?;
            events.push(StoredEvent {
                id: id as EventId,
                device,
                json,
            });
        }
        Ok(events)
    }

    /// The stored readings of one device's metric, `(ts ms, value)` oldest
    /// first.
    pub fn readings(&self, device: &DeviceId, metric: &str) -> Result<Vec<(i64, f64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT ts, value FROM readings WHERE device = ?1 AND metric = ?2 ORDER BY ts, rowid",
        )?;
        let rows = stmt.query_map(params![device.as_str(), metric], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The alert limits set over the API, by device.
    pub fn device_limits(&self) -> Result<Vec<(DeviceId, MetricLimits)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT device, limits_json FROM device_limits ORDER BY device")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut all = Vec::new();
        for row in rows {
            let (id, limits) = row?;
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
        self.conn
            .prepare_cached(
                "INSERT INTO device_limits (device, limits_json) VALUES (?1, ?2)
                 ON CONFLICT (device) DO UPDATE SET limits_json = excluded.limits_json",
            )?
            .execute(params![
                device.as_str(),
                serde_json::to_string(limits).expect("limits always serialize"),
            ])?;
        Ok(())
    }

    /// The saved learned report intervals, by device.
    pub fn report_intervals(&self) -> Result<Vec<(DeviceId, Duration)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT device, interval_ms FROM report_intervals ORDER BY device")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut all = Vec::new();
        for row in rows {
            let (id, ms) = row?;
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
        self.conn
            .prepare_cached(
                "INSERT INTO report_intervals (device, interval_ms) VALUES (?1, ?2)
                 ON CONFLICT (device) DO UPDATE SET interval_ms = excluded.interval_ms",
            )?
            .execute(params![device.as_str(), ms])?;
        Ok(())
    }

    /// The schema version (for tests and diagnostics).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .optional()?
            .unwrap_or(0))
    }
}

/// A connection to the database at `path` with this crate's settings.
/// Inserts or replaces `device`'s row.
fn save_device(tx: &rusqlite::Transaction, device: &Device) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO devices (id, name, status_json, online, updated_at, stale, alerts_json)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (id) DO UPDATE SET name = excluded.name,
             status_json = excluded.status_json, online = excluded.online,
             updated_at = excluded.updated_at, stale = excluded.stale,
             alerts_json = excluded.alerts_json",
    )?
    .execute(params![
        device.id.as_str(),
        device.name,
        serde_json::to_string(&device.status).expect("a status always serializes"),
        device.online,
        device.updated_at.to_rfc3339(),
        device.stale,
        serde_json::to_string(&device.alerts).expect("alerts always serialize"),
    ])
    .map(drop)
}

fn connect(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Status;
    use chrono::Utc;

    fn device(id: &str, t: f64) -> Device {
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
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn writes_read_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/data");
        {
            let mut store = Store::open(&path).unwrap();
            assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
            assert_eq!(store.id_range().unwrap(), None);
            let a1 = device("a", 20.0);
            store.record(10, &a1, None, r#"{"n":10}"#).unwrap();
            store
                .record(11, &device("b", 5.0), None, r#"{"n":11}"#)
                .unwrap();
            let mut a2 = device("a", 21.0);
            a2.status.metrics.insert("load".into(), 2.0); // unchanged
            store.record(12, &a2, Some(&a1), r#"{"n":12}"#).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.id_range().unwrap(), Some((10, 12)));
        let devices = store.devices().unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].id.as_str(), "a");
        assert_eq!(devices[0].status.temperature, Some(21.0));
        assert_eq!(devices[0].online, Some(false));
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
        let temps: Vec<f64> = store
            .readings(&a, "temperature")
            .unwrap()
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(temps, [20.0, 21.0]);
        assert_eq!(store.readings(&a, "load").unwrap().len(), 1, "only changes");
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
        store.record(1, &d, Some(&a), "{}").unwrap();
        let limits = MetricLimits::from([("temperature".to_owned(), limits)]);
        store.set_device_limits(&d.id, &limits).unwrap();
        store.set_device_limits(&d.id, &limits).unwrap();
        let back = store.devices().unwrap().remove(0);
        assert_eq!((back.stale, &back.alerts), (true, &d.alerts));
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
            .prepare("SELECT ts FROM events ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ts, [1_795_608_000_250, 0], "an undated event is the oldest");
    }

    #[test]
    fn the_last_id_outlives_the_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.last_event_id().unwrap(), None);
        store.record(7, &device("a", 1.0), None, "{}").unwrap();
        store.conn.execute("DELETE FROM events", []).unwrap();
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
        let mode: String = store
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = store
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL");
    }
}
