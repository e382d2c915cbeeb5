//! Retention: raw readings are kept for `--retention`, then folded into
//! per-minute rows (min, avg, max, count, last) kept for
//! `--downsampled-retention`, as are the devices' recorded changes (power,
//! link, alerts: few rows); events older than the raw window are pruned
//! (a client that far behind resumes from a snapshot, as the hub already
//! does for an id the store no longer holds).
//!
//! It runs in the background on its own connection, in small batches: each
//! batch is one short transaction of at most `batch` rows, and between
//! batches the hub's writes get their turn (both take the store's write
//! gate), so an ingest waits for at most one batch.
//!
//! Which rows go: the oldest first, in the order they were written (rowid,
//! event id), up to the first one that is still young. Readings and events
//! are written in time order, so this is "everything older than the
//! cutoff" without an index on time; after a clock that went back, a few
//! rows wait behind a younger one until it expires too.
//!
//! Folding is idempotent: a raw row is folded and deleted in the same
//! transaction, so it is counted once however often, or however
//! interrupted, retention runs.

use super::db::{Arg, Conn, TxKind};
use super::history::{MINUTE_MS, Minute, minute_of};
use super::store::{FOLDED_UNTIL, Store, StoreError, WriteGate};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long each kind of data is kept.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Raw readings and events.
    pub raw: Duration,
    /// Per-minute rows and recorded changes.
    pub downsampled: Duration,
    /// Most rows one transaction touches.
    pub batch: usize,
}

/// The default batch: a few milliseconds of work (100,000 readings and
/// 100,000 events took 1 s in 100 batches, the longest 7 ms, on 2 cores).
pub const BATCH: usize = 2_000;

/// The advisory lock a PostgreSQL retention batch holds ("RETAIN" in ASCII).
const RETENTION_LOCK: i64 = 0x5245_5441_494e;

/// What one run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Raw readings folded into minutes (and deleted).
    pub folded: u64,
    /// Per-minute rows deleted.
    pub minutes: u64,
    /// Events deleted.
    pub events: u64,
    /// Recorded changes deleted (rows: an event's changes each).
    pub changes: u64,
    /// The longest batch (the longest an ingest could have waited).
    pub longest_batch: Duration,
}

pub struct Retention {
    conn: Conn,
    gate: WriteGate,
    policy: Policy,
}

impl Retention {
    /// Retention for `store`, on a connection of its own.
    pub fn new(store: &Store, policy: Policy) -> Result<Self, StoreError> {
        let conn = store.connect()?;
        match &conn {
            Conn::Sqlite(c) => {
                // Its commits need no fsync of their own: they acknowledge
                // nothing, a crash can only undo whole batches (which the
                // next run redoes), and the hub's next fsynced commit makes
                // them durable with it. The fsync was most of a batch's
                // time, so this is what keeps an ingest's wait behind a batch
                // short.
                let sync: i64 = c.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
                if sync > 1 {
                    c.pragma_update(None, "synchronous", "NORMAL")?;
                }
                // Checkpoints (copying the WAL into the database, with an
                // fsync) are run after each batch, outside the write gate,
                // where they block no writer, rather than inside a commit.
                c.pragma_update(None, "wal_autocheckpoint", 0)?;
            }
            // The same reasoning: its commits need not wait for the flush.
            Conn::Postgres(_) => conn.setup("SET synchronous_commit = off")?,
        }
        Ok(Self {
            conn,
            gate: store.write_gate(),
            policy,
        })
    }

    /// One run as of `now_ms` (ms since the epoch).
    pub fn run(&mut self, now_ms: i64) -> Result<Pruned, StoreError> {
        let raw_cutoff = now_ms - self.policy.raw.as_millis() as i64;
        let minute_cutoff = minute_of(now_ms - self.policy.downsampled.as_millis() as i64);
        let mut pruned = Pruned::default();
        // Only whole minutes are folded, so a minute is never split between
        // raw and folded for longer than one run.
        let fold_cutoff = minute_of(raw_cutoff);
        pruned.folded = self.all_batches(&mut pruned, |tx, b| fold(tx, b, fold_cutoff))?;
        pruned.minutes = self.all_batches(&mut pruned, |tx, b| {
            delete_prefix(tx, b, "readings_1m", "rowid", "minute", minute_cutoff)
        })?;
        pruned.events = self.all_batches(&mut pruned, |tx, b| {
            delete_prefix(tx, b, "events", "id", "ts", raw_cutoff)
        })?;
        pruned.changes = self.all_batches(&mut pruned, |tx, b| {
            delete_prefix(tx, b, "changes", "id", "ts", minute_cutoff)
        })?;
        Ok(pruned)
    }

    /// Runs `work` batch after batch (see [`batch`](Self::batch)) until it
    /// has no more to do; returns how many rows it did.
    fn all_batches(
        &mut self,
        pruned: &mut Pruned,
        mut work: impl FnMut(&Conn, usize) -> Result<(u64, bool), StoreError>,
    ) -> Result<u64, StoreError> {
        let mut rows = 0;
        loop {
            let (n, more) = self.batch(pruned, &mut work)?;
            rows += n;
            if !more {
                return Ok(rows);
            }
        }
    }

    /// Runs `work` in one transaction under the write gate; returns what it
    /// did: (rows, whether there may be more to do).
    fn batch(
        &mut self,
        pruned: &mut Pruned,
        work: impl FnOnce(&Conn, usize) -> Result<(u64, bool), StoreError>,
    ) -> Result<(u64, bool), StoreError> {
        let started = Instant::now();
        let done = {
            let _gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
            let batch = self.policy.batch;
            self.conn.transaction(TxKind::WriteNow, |tx| {
                if tx.is_postgres() {
                    // Instances sharing the database take turns, batch by
                    // batch: two folding the same rows at once would count
                    // them twice. The lock goes with the transaction, and the
                    // one that waited reads what is left once it has it.
                    tx.query(
                        "SELECT pg_advisory_xact_lock(?1)::TEXT",
                        &[Arg::I64(RETENTION_LOCK)],
                    )?;
                }
                work(tx, batch)
            })?
        };
        pruned.longest_batch = pruned.longest_batch.max(started.elapsed());
        if done.0 > 0
            && let Conn::Sqlite(c) = &self.conn
        {
            c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        }
        if done.1 {
            // Let a writer that waited on the gate go first.
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(done)
    }
}

/// Folds the oldest raw readings older than `cutoff` (at most `batch`) into
/// their minutes and deletes them. Returns (rows folded, more to do).
fn fold(tx: &Conn, batch: usize, cutoff: i64) -> Result<(u64, bool), StoreError> {
    let rows = tx.query(
        "SELECT rowid, device, metric, ts, value FROM readings ORDER BY rowid LIMIT ?1",
        &[Arg::I64(batch as i64)],
    )?;
    let mut minutes: BTreeMap<(String, String, i64), Minute> = BTreeMap::new();
    let (mut n, mut read, mut last) = (0u64, 0usize, None);
    for r in rows {
        let (rowid, ts, value) = (r.i64(0)?, r.i64(3)?, r.f64(4)?);
        read += 1;
        if ts >= cutoff {
            break;
        }
        minutes
            .entry((r.string(1)?, r.string(2)?, minute_of(ts)))
            .and_modify(|m| m.add(value))
            .or_insert_with(|| Minute::of(value));
        n += 1;
        last = Some((rowid, ts));
    }
    let Some((last_rowid, last_ts)) = last else {
        return Ok((0, false));
    };
    for ((device, metric, minute), m) in &minutes {
        tx.execute(
            "INSERT INTO readings_1m (device, metric, minute, min, avg, max, count, last)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (device, metric, minute) DO UPDATE SET
                 min = CASE WHEN excluded.min < readings_1m.min
                     THEN excluded.min ELSE readings_1m.min END,
                 max = CASE WHEN excluded.max > readings_1m.max
                     THEN excluded.max ELSE readings_1m.max END,
                 avg = (readings_1m.avg * readings_1m.count + excluded.avg * excluded.count)
                     / (readings_1m.count + excluded.count),
                 count = readings_1m.count + excluded.count,
                 last = excluded.last",
            &[
                Arg::Str(device),
                Arg::Str(metric),
                Arg::I64(*minute),
                Arg::F64(m.min),
                Arg::F64(m.avg()),
                Arg::F64(m.max),
                Arg::I64(m.count),
                Arg::F64(m.last),
            ],
        )?;
    }
    tx.execute(
        "DELETE FROM readings WHERE rowid <= ?1",
        &[Arg::I64(last_rowid)],
    )?;
    // Reads take everything before this from the minutes (and fold any raw
    // leftover of the last minute on the fly).
    tx.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value =
             CASE WHEN excluded.value > meta.value THEN excluded.value ELSE meta.value END",
        &[
            Arg::Str(FOLDED_UNTIL),
            Arg::I64(minute_of(last_ts) + MINUTE_MS),
        ],
    )?;
    let more = n as usize == read && read == batch;
    Ok((n, more))
}

/// Deletes the oldest rows of `table` (by `key`) whose `time` is before
/// `cutoff`, at most `batch`. Returns (rows deleted, more to do).
fn delete_prefix(
    tx: &Conn,
    batch: usize,
    table: &str,
    key: &str,
    time: &str,
    cutoff: i64,
) -> Result<(u64, bool), StoreError> {
    let rows = tx.query(
        &format!("SELECT {key}, {time} FROM {table} ORDER BY {key} LIMIT ?1"),
        &[Arg::I64(batch as i64)],
    )?;
    let (mut n, mut read, mut last) = (0u64, 0usize, None);
    for r in rows {
        let (k, t) = (r.i64(0)?, r.i64(1)?);
        read += 1;
        if t >= cutoff {
            break;
        }
        n += 1;
        last = Some(k);
    }
    let Some(last) = last else {
        return Ok((0, false));
    };
    tx.execute(
        &format!("DELETE FROM {table} WHERE {key} <= ?1"),
        &[Arg::I64(last)],
    )?;
    Ok((n, n as usize == read && read == batch))
}

/// Runs retention now and then every `interval` until `shutdown`, each run
/// on a blocking thread. A failed run is logged and tried again next time.
pub async fn run_every(mut retention: Retention, interval: Duration, shutdown: CancellationToken) {
    loop {
        let now = chrono::Utc::now().timestamp_millis();
        let done = tokio::task::spawn_blocking(move || {
            let result = retention.run(now);
            (retention, result)
        })
        .await;
        let Ok((back, result)) = done else {
            tracing::error!("the retention task panicked; retention stopped");
            return;
        };
        retention = back;
        match result {
            Ok(p) if p.folded + p.minutes + p.events + p.changes > 0 => tracing::info!(
                "retention: folded {} readings into minutes, pruned {} minutes, {} events \
                 and {} events' changes (longest batch {:?})",
                p.folded,
                p.minutes,
                p.events,
                p.changes,
                p.longest_batch
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("retention failed, trying again later: {e}"),
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Device, DeviceId, Point, Status, StatusUpdate};
    use crate::server::history::Reader;
    use crate::server::hub::Hub;
    use crate::server::store::testing::PgSchema;
    use chrono::{DateTime, Utc};

    /// A whole minute, so minutes below are easy to name.
    const BASE: i64 = 1_764_000_000_000;
    const S: i64 = 1_000;
    const MIN: i64 = 60 * S;
    const HOUR: i64 = 60 * MIN;
    const DAY: i64 = 24 * HOUR;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    fn device(id: &str, t: f64, ms: i64) -> Device {
        Device {
            status: Status {
                temperature: Some(t),
                ..Status::default()
            },
            updated_at: at(ms),
            ..Device::new(DeviceId::parse(id).unwrap())
        }
    }

    /// Events 1..=6: device `a` at 10, 20, 30 in minute BASE, 5 in the next,
    /// 99 half an hour before BASE + 2h; `b` at 7 in minute BASE.
    fn filled(dir: &std::path::Path) -> Store {
        fill(Store::open(dir).unwrap())
    }

    fn fill(mut store: Store) -> Store {
        let writes = [
            ("a", 10.0, BASE),
            ("a", 20.0, BASE + 10 * S),
            ("b", 7.0, BASE + 20 * S),
            ("a", 30.0, BASE + 50 * S),
            ("a", 5.0, BASE + 70 * S),
            ("a", 99.0, BASE + 90 * MIN),
        ];
        for (i, (id, t, ms)) in writes.into_iter().enumerate() {
            // No `previous`: every value is a reading.
            store
                .record(i as u64 + 1, &device(id, t, ms), None, "{}")
                .unwrap();
        }
        store
    }

    fn retention(store: &Store, batch: usize) -> Retention {
        Retention::new(
            store,
            Policy {
                raw: Duration::from_secs(3600),
                downsampled: Duration::from_secs(86_400),
                batch,
            },
        )
        .unwrap()
    }

    type MinuteRow = (String, i64, f64, f64, f64, i64, f64);

    fn minutes(store: &Store) -> Vec<MinuteRow> {
        let conn = store.connect().unwrap();
        conn.query(
            "SELECT device, minute, min, avg, max, count, last FROM readings_1m
             WHERE metric = 'temperature' ORDER BY device, minute",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.string(0).unwrap(),
                r.i64(1).unwrap(),
                r.f64(2).unwrap(),
                r.f64(3).unwrap(),
                r.f64(4).unwrap(),
                r.i64(5).unwrap(),
                r.f64(6).unwrap(),
            )
        })
        .collect()
    }

    fn raw(store: &Store, id: &str) -> Vec<(i64, f64)> {
        store
            .readings(&DeviceId::parse(id).unwrap(), "temperature")
            .unwrap()
    }

    fn point(t: i64, v: f64, range: Option<(f64, f64)>) -> Point {
        Point {
            t,
            v,
            min: range.map(|r| r.0),
            max: range.map(|r| r.1),
        }
    }

    #[test]
    fn old_readings_fold_into_their_minutes_in_small_batches_once() {
        let dir = tempfile::tempdir().unwrap();
        folds_in_small_batches_once(filled(dir.path()));
    }

    #[test]
    fn postgres_old_readings_fold_into_their_minutes_in_small_batches_once() {
        let db = PgSchema::new();
        folds_in_small_batches_once(fill(db.open()));
    }

    #[test]
    fn postgres_instances_folding_at_once_count_each_reading_once() {
        let db = PgSchema::new();
        let store = fill(db.open());
        let stores: Vec<Store> = (0..4).map(|_| db.open()).collect();
        let folded: u64 = std::thread::scope(|s| {
            let runs: Vec<_> = stores
                .into_iter()
                .map(|other| s.spawn(move || retention(&other, 1).run(BASE + 2 * HOUR).unwrap()))
                .collect();
            runs.into_iter().map(|r| r.join().unwrap().folded).sum()
        });
        assert_eq!(folded, 5);
        assert_eq!(
            minutes(&store),
            [
                ("a".into(), BASE, 10.0, 20.0, 30.0, 3, 30.0),
                ("a".into(), BASE + MIN, 5.0, 5.0, 5.0, 1, 5.0),
                ("b".into(), BASE, 7.0, 7.0, 7.0, 1, 7.0),
            ]
        );
    }

    fn folds_in_small_batches_once(store: Store) {
        // Batches of 3 split minute BASE of `a` between two transactions.
        let mut r = retention(&store, 3);
        let pruned = r.run(BASE + 2 * HOUR).unwrap();
        assert_eq!(
            (pruned.folded, pruned.minutes, pruned.events),
            (5, 0, 5),
            "{pruned:?}"
        );
        let expected: Vec<MinuteRow> = vec![
            ("a".into(), BASE, 10.0, 20.0, 30.0, 3, 30.0),
            ("a".into(), BASE + MIN, 5.0, 5.0, 5.0, 1, 5.0),
            ("b".into(), BASE, 7.0, 7.0, 7.0, 1, 7.0),
        ];
        assert_eq!(minutes(&store), expected);
        // Only the young reading is still raw, and only the young event kept.
        assert_eq!(raw(&store, "a"), [(BASE + 90 * MIN, 99.0)]);
        assert!(raw(&store, "b").is_empty());
        assert_eq!(store.id_range().unwrap(), Some((6, 6)));
        // Running again changes nothing.
        let again = r.run(BASE + 2 * HOUR).unwrap();
        assert_eq!((again.folded, again.minutes, again.events), (0, 0, 0));
        assert_eq!(minutes(&store), expected);
        assert_eq!(raw(&store, "a").len(), 1);
    }

    #[test]
    fn history_joins_folded_minutes_and_raw_readings() {
        let dir = tempfile::tempdir().unwrap();
        history_joins(filled(dir.path()));
    }

    #[test]
    fn postgres_history_joins_folded_minutes_and_raw_readings() {
        let db = PgSchema::new();
        history_joins(fill(db.open()));
    }

    fn history_joins(store: Store) {
        retention(&store, BATCH).run(BASE + 2 * HOUR).unwrap();
        let mut reader = Reader::new(store.connect().unwrap()).unwrap();
        let a = DeviceId::parse("a").unwrap();
        let mut read = |from: i64, to: i64, step: Option<i64>| {
            reader
                .history(
                    &a,
                    "temperature",
                    at(from),
                    at(to),
                    step,
                    at(BASE + 2 * HOUR),
                )
                .unwrap()
                .points
        };
        // From within the first folded minute: that minute, the next, then raw.
        assert_eq!(
            read(BASE + 5 * S, BASE + 2 * HOUR, None),
            [
                point(BASE + 5 * S, 20.0, Some((10.0, 30.0))),
                point(BASE + MIN, 5.0, Some((5.0, 5.0))),
                point(BASE + 90 * MIN, 99.0, None),
            ]
        );
        // From after the folded minutes: their last value is in force.
        assert_eq!(
            read(BASE + HOUR, BASE + 2 * HOUR, None),
            [
                point(BASE + HOUR, 5.0, None),
                point(BASE + 90 * MIN, 99.0, None)
            ]
        );
        // Hour buckets: 20 for a minute then 5; then 5 for half an hour, 99.
        assert_eq!(
            read(BASE, BASE + 2 * HOUR, Some(HOUR)),
            [
                point(BASE, 5.25, Some((5.0, 30.0))),
                point(BASE + HOUR, 52.0, Some((5.0, 99.0)))
            ]
        );
        // Before anything was known: nothing.
        assert!(read(BASE - HOUR, BASE - MIN, None).is_empty());
    }

    #[test]
    fn a_raw_reading_left_behind_a_fold_joins_its_minute() {
        let dir = tempfile::tempdir().unwrap();
        left_behind_joins(filled(dir.path()));
    }

    #[test]
    fn postgres_a_raw_reading_left_behind_a_fold_joins_its_minute() {
        let db = PgSchema::new();
        left_behind_joins(fill(db.open()));
    }

    fn left_behind_joins(mut store: Store) {
        retention(&store, BATCH).run(BASE + 2 * HOUR).unwrap();
        // A clock that went back: a reading in an already folded minute.
        store
            .record(7, &device("a", 50.0, BASE + 30 * S), None, "{}")
            .unwrap();
        let mut reader = Reader::new(store.connect().unwrap()).unwrap();
        let points = reader
            .history(
                &DeviceId::parse("a").unwrap(),
                "temperature",
                at(BASE - MIN),
                at(BASE + 2 * MIN),
                None,
                at(BASE + 2 * HOUR),
            )
            .unwrap()
            .points;
        assert_eq!(
            points,
            [
                point(BASE, 27.5, Some((10.0, 50.0))),
                point(BASE + MIN, 5.0, Some((5.0, 5.0)))
            ]
        );
    }

    #[test]
    fn everything_expires_and_ids_go_on_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        expires_and_ids_go_on(|| Store::open(dir.path()).unwrap());
    }

    #[test]
    fn postgres_everything_expires_and_ids_go_on_after_a_reopen() {
        let db = PgSchema::new();
        expires_and_ids_go_on(|| db.open());
    }

    #[test]
    fn changes_stay_as_long_as_minutes() {
        let dir = tempfile::tempdir().unwrap();
        changes_stay(Store::open(dir.path()).unwrap());
    }

    #[test]
    fn postgres_changes_stay_as_long_as_minutes() {
        let db = PgSchema::new();
        changes_stay(db.open());
    }

    /// Changes are timed when recorded (now): each event's `Registered`.
    fn changes_stay(store: Store) {
        let store = fill(store);
        let now = chrono::Utc::now().timestamp_millis();
        let mut r = retention(&store, 4);
        let pruned = r.run(now + DAY - MIN).unwrap();
        assert_eq!((pruned.events, pruned.changes), (6, 0), "{pruned:?}");
        let pruned = r.run(now + DAY + 2 * MIN).unwrap();
        assert_eq!(pruned.changes, 6, "{pruned:?}");
    }

    fn expires_and_ids_go_on(open: impl Fn() -> Store) {
        {
            let store = fill(open());
            let mut r = retention(&store, 2);
            r.run(BASE + 2 * HOUR).unwrap();
            // A day later the minutes expire too, and the last reading and
            // event with them.
            let pruned = r.run(BASE + DAY + 3 * HOUR).unwrap();
            assert_eq!((pruned.folded, pruned.events), (1, 1), "{pruned:?}");
            assert_eq!(pruned.minutes, 4, "{pruned:?}");
            assert!(minutes(&store).is_empty());
            assert!(raw(&store, "a").is_empty());
            assert_eq!(store.id_range().unwrap(), None);
        }
        let hub = Hub::with_store(open(), 8, 8).unwrap();
        assert_eq!(hub.stats(), (6, 2));
        let update = StatusUpdate {
            temperature: Some(1.0),
            ..Default::default()
        };
        let a = DeviceId::parse("a").unwrap();
        assert_eq!(hub.apply(&a, &update).unwrap().id, 7);
    }
}
