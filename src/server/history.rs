//! History reads: one metric of one device over a time range, and a
//! device's recorded changes, from the store, on a connection of their own
//! (never under the hub's lock).
//!
//! Where the data is: raw readings (one row per change, `readings`) for the
//! recent past, and per-minute rows (`readings_1m`: min, avg, max, count and
//! the minute's last value) for times the retention task has folded, which
//! are those before `meta.folded_until`. A read takes one snapshot of both
//! (one read transaction, which WAL lets run beside the writer), so a fold
//! running meanwhile is seen either wholly or not at all. Raw rows still
//! below `folded_until` (a fold cut in batches, or a clock that went back)
//! are folded into their minute on the fly.
//!
//! Readings are step data: a value holds from its time until the next one.
//! So the first point is the value in force at `from` (the last reading at
//! or before it, placed at `from`), and a bucket of `step` carries the
//! minimum and maximum of every value that held in it and their mean
//! weighted by how long each held.

use super::db::{Arg, Conn, Row, TxKind};
use super::store::{Connector, FOLDED_UNTIL, StoreError};
use crate::model::{Change, Changed, DeviceId, EventId, History, Point};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

/// Most points one read returns; beyond it the read is refused with the
/// step that would fit.
pub const MAX_POINTS: usize = 10_000;
/// The width of a downsampled row.
pub const MINUTE_MS: i64 = 60_000;

/// The start of the minute `t` (ms) falls in.
pub fn minute_of(t: i64) -> i64 {
    t.div_euclid(MINUTE_MS) * MINUTE_MS
}

/// The smallest step (a whole number of seconds) that splits `span_ms` into
/// at most [`MAX_POINTS`] buckets.
pub fn fitting_step_ms(span_ms: i64) -> i64 {
    let step = (span_ms.max(1) + MAX_POINTS as i64 - 1) / MAX_POINTS as i64;
    (step + 999) / 1000 * 1000
}

/// How many buckets of `step_ms` cover `from ..= to`.
pub fn buckets(from_ms: i64, to_ms: i64, step_ms: i64) -> i64 {
    ((to_ms - from_ms).max(1) - 1) / step_ms + 1
}

/// What is known at one time: a raw reading, or a folded minute.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    t: i64,
    /// The reading, or the minute's mean.
    v: f64,
    min: f64,
    max: f64,
    /// The value in force after the sample: the reading, or the minute's last.
    last: f64,
    /// A folded minute (holds `v` until the minute's end, then `last`), not
    /// a reading.
    minute: bool,
    /// The end of a folded minute.
    until: i64,
}

impl Sample {
    fn reading(t: i64, v: f64) -> Self {
        Self {
            t,
            v,
            min: v,
            max: v,
            last: v,
            minute: false,
            until: t,
        }
    }

    /// The same, placed at `t`.
    fn at(self, t: i64) -> Self {
        Self { t, ..self }
    }

    fn point(&self) -> Point {
        Point {
            t: self.t,
            v: self.v,
            min: self.minute.then_some(self.min),
            max: self.minute.then_some(self.max),
        }
    }
}

/// A per-minute aggregate being built (the retention task folds with it too).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Minute {
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub count: i64,
    pub last: f64,
}

impl Minute {
    pub fn of(v: f64) -> Self {
        Self {
            min: v,
            max: v,
            sum: v,
            count: 1,
            last: v,
        }
    }

    /// Adds a later reading.
    pub fn add(&mut self, v: f64) {
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v;
        self.count += 1;
        self.last = v;
    }

    /// Adds `later`, whose readings all came after this one's.
    pub fn merge(&mut self, later: &Minute) {
        self.min = self.min.min(later.min);
        self.max = self.max.max(later.max);
        self.sum += later.sum;
        self.count += later.count;
        self.last = later.last;
    }

    pub fn avg(&self) -> f64 {
        self.sum / self.count as f64
    }

    /// The minute starting at `minute` as a sample.
    fn sample(&self, minute: i64) -> Sample {
        Sample {
            t: minute,
            v: self.avg(),
            min: self.min,
            max: self.max,
            last: self.last,
            minute: true,
            until: minute + MINUTE_MS,
        }
    }
}

/// A `readings_1m` row `minute, min, avg, max, count, last` as (minute, aggregate).
fn minute_row(r: &Row) -> Result<(i64, Minute), StoreError> {
    let count = r.i64(4)?;
    Ok((
        r.i64(0)?,
        Minute {
            min: r.f64(1)?,
            sum: r.f64(2)? * count as f64,
            max: r.f64(3)?,
            count,
            last: r.f64(5)?,
        },
    ))
}

/// History reads at once at most, each on a read connection of its own.
pub const READERS: u32 = 4;

/// Read connections to the store, pooled (r2d2), so reads run side by side
/// (SQLite's WAL and PostgreSQL both let them) rather than in turn.
pub type Readers = r2d2::Pool<ReadConnections>;

/// Opens the [`Readers`]' connections.
pub struct ReadConnections(Connector);

impl r2d2::ManageConnection for ReadConnections {
    type Connection = Reader;
    type Error = StoreError;

    fn connect(&self) -> Result<Reader, StoreError> {
        Reader::new(self.0.connect()?)
    }

    /// A PostgreSQL connection that broke is made again on its next use.
    fn is_valid(&self, _: &mut Reader) -> Result<(), StoreError> {
        Ok(())
    }

    fn has_broken(&self, _: &mut Reader) -> bool {
        false
    }
}

/// The read connections of `connector`'s database: one at once, up to
/// [`READERS`]. A read waits up to 5 s for one to come free.
pub fn readers(connector: Connector) -> Result<Readers, StoreError> {
    r2d2::Pool::builder()
        .max_size(READERS)
        .min_idle(Some(1))
        .connection_timeout(std::time::Duration::from_secs(5))
        .test_on_check_out(false)
        .build(ReadConnections(connector))
        .map_err(|e| StoreError::Busy(e.to_string()))
}

/// The changes of rows of the `changes` table (`id, device, ts, json`), in
/// the rows' order.
pub(crate) fn changes_of(rows: Vec<Row>) -> Result<Vec<Changed>, StoreError> {
    let mut all = Vec::new();
    for row in rows {
        let id = row.i64(0)?;
        let corrupt = |e: String| StoreError::Corrupt(format!("the changes of event {id}: {e}"));
        let device = DeviceId::parse(&row.string(1)?).map_err(|e| corrupt(e.to_string()))?;
        let at = DateTime::from_timestamp_millis(row.i64(2)?).unwrap_or_default();
        let changes: Vec<Change> =
            serde_json::from_str(&row.string(3)?).map_err(|e| corrupt(e.to_string()))?;
        all.extend(changes.into_iter().map(|change| Changed {
            id: id as EventId,
            device: device.clone(),
            at,
            change,
        }));
    }
    Ok(all)
}

/// The read side of the store: its own connection.
pub struct Reader {
    conn: Conn,
}

impl Reader {
    pub fn new(conn: Conn) -> Result<Self, StoreError> {
        conn.setup(if conn.is_postgres() {
            "SET default_transaction_read_only = on"
        } else {
            "PRAGMA query_only = true"
        })?;
        Ok(Self { conn })
    }

    #[cfg(test)]
    pub(crate) fn conn_for_tests(&self) -> &Conn {
        &self.conn
    }

    /// The stored events with ids in `after+1 ..= upto`, oldest first.
    pub fn events_between(
        &mut self,
        after: crate::model::EventId,
        upto: crate::model::EventId,
    ) -> Result<Vec<super::store::StoredEvent>, StoreError> {
        super::store::events_between(&self.conn, after, upto)
    }

    /// How many events with ids in `after+1 ..= upto` are stored.
    pub fn count_between(&self, after: EventId, upto: EventId) -> Result<u64, StoreError> {
        let row = self.conn.query_opt(
            "SELECT COUNT(*) FROM events WHERE id > ?1 AND id <= ?2",
            &[Arg::I64(after as i64), Arg::I64(upto as i64)],
        )?;
        Ok(row.map(|r| r.i64(0)).transpose()?.unwrap_or(0) as u64)
    }

    /// The last `limit` changes recorded for `device`, or for every
    /// device, newest first.
    pub fn changes(
        &mut self,
        device: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<Changed>, StoreError> {
        let limit_arg = Arg::I64(limit as i64);
        let rows = match device {
            Some(device) => self.conn.query(
                "SELECT id, device, ts, json FROM changes WHERE device = ?1
                 ORDER BY id DESC LIMIT ?2",
                &[Arg::Str(device.as_str()), limit_arg],
            )?,
            None => self.conn.query(
                "SELECT id, device, ts, json FROM changes ORDER BY id DESC LIMIT ?1",
                &[limit_arg],
            )?,
        };
        let mut all = changes_of(rows)?;
        all.truncate(limit);
        Ok(all)
    }

    /// See [`Hub::history`](super::hub::Hub::history). `now` bounds the
    /// buckets: none is made for a time still to come.
    pub fn history(
        &mut self,
        device: &DeviceId,
        metric: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        step_ms: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<History, StoreError> {
        let step_ms = step_ms.filter(|s| *s > 0);
        let (lo, hi) = (from.timestamp_millis(), to.timestamp_millis());
        let history = |points| History {
            device: device.clone(),
            metric: metric.to_owned(),
            from,
            to,
            step_ms,
            points,
        };
        if lo > hi {
            return Ok(history(Vec::new()));
        }
        if let Some(step) = step_ms
            && buckets(lo, hi, step) > MAX_POINTS as i64
        {
            return Err(StoreError::TooManyPoints {
                limit: MAX_POINTS,
                fits_step_ms: fitting_step_ms(hi - lo),
            });
        }
        let dev = Arg::Str(device.as_str());
        let metric_arg = Arg::Str(metric);
        let (lo_arg, hi_arg) = (Arg::I64(lo), Arg::I64(hi));
        // One snapshot of both tables (a fold running meanwhile is seen
        // wholly or not at all).
        let (before, minutes, raw) = self.conn.transaction(TxKind::Snapshot, |tx| {
            let folded_until = tx
                .query_opt(
                    "SELECT value FROM meta WHERE key = ?1",
                    &[Arg::Str(FOLDED_UNTIL)],
                )?
                .map(|r| r.i64(0))
                .transpose()?
                .unwrap_or(i64::MIN);

            // The value in force at `from`: the later of the last raw reading
            // and the last folded minute at or before it.
            let raw_before = tx
                .query_opt(
                    "SELECT ts, value FROM readings WHERE device = ?1 AND metric = ?2 AND ts <= ?3
                     ORDER BY ts DESC, rowid DESC LIMIT 1",
                    &[dev, metric_arg, lo_arg],
                )?
                .map(|r| Ok::<_, StoreError>((r.i64(0)?, r.f64(1)?)))
                .transpose()?;
            let minute_before = tx
                .query_opt(
                    "SELECT minute, min, avg, max, count, last FROM readings_1m
                     WHERE device = ?1 AND metric = ?2 AND minute <= ?3
                     ORDER BY minute DESC LIMIT 1",
                    &[dev, metric_arg, lo_arg],
                )?
                .map(|r| minute_row(&r))
                .transpose()?;
            let before = match (raw_before, minute_before) {
                (Some((t, v)), Some((m, _))) if t >= m => Some(Sample::reading(lo, v)),
                // `from` within a folded minute: that minute is what is known.
                (_, Some((m, minute))) if m + MINUTE_MS > lo => Some(minute.sample(m).at(lo)),
                (_, Some((_, minute))) => Some(Sample::reading(lo, minute.last)),
                (raw, None) => raw.map(|(_, v)| Sample::reading(lo, v)),
            };

            // The folded past, per minute, with any raw leftovers merged in.
            let mut minutes: BTreeMap<i64, Minute> = BTreeMap::new();
            for r in tx.query(
                "SELECT minute, min, avg, max, count, last FROM readings_1m
                 WHERE device = ?1 AND metric = ?2 AND minute > ?3 AND minute <= ?4
                 ORDER BY minute",
                &[dev, metric_arg, lo_arg, hi_arg],
            )? {
                let (minute, m) = minute_row(&r)?;
                minutes.insert(minute, m);
            }
            let folded = Arg::I64(folded_until);
            for r in tx.query(
                "SELECT ts, value FROM readings WHERE device = ?1 AND metric = ?2
                 AND ts > ?3 AND ts <= ?4 AND ts < ?5 ORDER BY ts, rowid",
                &[dev, metric_arg, lo_arg, hi_arg, folded],
            )? {
                let (t, v) = (r.i64(0)?, r.f64(1)?);
                minutes
                    .entry(minute_of(t))
                    .and_modify(|m| m.add(v))
                    .or_insert_with(|| Minute::of(v));
            }
            let raw = tx.query(
                "SELECT ts, value FROM readings WHERE device = ?1 AND metric = ?2
                 AND ts > ?3 AND ts <= ?4 AND ts >= ?5 ORDER BY ts, rowid",
                &[dev, metric_arg, lo_arg, hi_arg, folded],
            )?;
            Ok((before, minutes, raw))
        })?;
        // A minute that began at or before `from` is shown just after it.
        let mut samples = minutes.iter().map(|(&t, m)| m.sample(t).at(t.max(lo + 1)));
        let mut rows = raw.into_iter();
        let mut next = || -> Result<Option<Sample>, StoreError> {
            if let Some(s) = samples.next() {
                return Ok(Some(s));
            }
            Ok(match rows.next() {
                Some(r) => Some(Sample::reading(r.i64(0)?, r.f64(1)?)),
                None => None,
            })
        };
        let points = match step_ms {
            None => {
                let mut points: Vec<Point> = before.iter().map(Sample::point).collect();
                while let Some(s) = next()? {
                    if points.len() == MAX_POINTS {
                        return Err(StoreError::TooManyPoints {
                            limit: MAX_POINTS,
                            fits_step_ms: fitting_step_ms(hi - lo),
                        });
                    }
                    points.push(s.point());
                }
                points
            }
            Some(step) => {
                let mut b = Bucketer::new(lo, hi.min(now.timestamp_millis()), hi, step, before);
                while let Some(s) = next()? {
                    b.add(s);
                }
                b.finish()
            }
        };
        Ok(history(points))
    }
}

/// Builds the `step` buckets of `from ..= to` from samples in time order.
struct Bucketer {
    from: i64,
    /// Nothing is known after this (`to`, or now if earlier).
    end: i64,
    step: i64,
    n: i64,
    buckets: Vec<Option<Acc>>,
    /// The value in force, since when, and its sample (for minutes).
    held: Option<(i64, Sample)>,
}

#[derive(Clone, Copy)]
struct Acc {
    weighted: f64,
    weight: i64,
    min: f64,
    max: f64,
    last: f64,
}

impl Bucketer {
    fn new(from: i64, end: i64, to: i64, step: i64, before: Option<Sample>) -> Self {
        let n = buckets(from, to, step);
        Self {
            from,
            end,
            step,
            n,
            buckets: vec![None; n as usize],
            held: before.map(|s| (from, s)),
        }
    }

    fn bucket(&self, t: i64) -> usize {
        ((t - self.from) / self.step).clamp(0, self.n - 1) as usize
    }

    /// `v` (within `min ..= max`) held over `t0 .. t1`; a zero-length
    /// span still counts for the minimum and maximum.
    fn span(&mut self, t0: i64, t1: i64, v: f64, min: f64, max: f64) {
        let t1 = t1.min(self.end);
        if t0 > self.end {
            return;
        }
        let mut t = t0;
        loop {
            let k = self.bucket(t);
            let bucket_end = if k as i64 == self.n - 1 {
                i64::MAX
            } else {
                self.from + (k as i64 + 1) * self.step
            };
            let upto = t1.min(bucket_end);
            let w = (upto - t).max(0);
            let acc = self.buckets[k].get_or_insert(Acc {
                weighted: 0.0,
                weight: 0,
                min,
                max,
                last: v,
            });
            acc.weighted += v * w as f64;
            acc.weight += w;
            acc.min = acc.min.min(min);
            acc.max = acc.max.max(max);
            acc.last = v;
            if upto >= t1 {
                return;
            }
            t = upto;
        }
    }

    /// Ends the span of the value held so far at `until`.
    fn close(&mut self, until: i64) {
        let Some((since, s)) = self.held else { return };
        if s.minute {
            self.span(since, until.min(s.until), s.v, s.min, s.max);
            if until > s.until {
                self.span(s.until.max(since), until, s.last, s.last, s.last);
            }
        } else {
            self.span(since, until, s.v, s.v, s.v);
        }
    }

    fn add(&mut self, s: Sample) {
        self.close(s.t);
        self.held = Some((s.t, s));
    }

    fn finish(mut self) -> Vec<Point> {
        self.close(self.end);
        let (from, step) = (self.from, self.step);
        self.buckets
            .into_iter()
            .enumerate()
            .filter_map(|(k, acc)| {
                let acc = acc?;
                Some(Point {
                    t: from + k as i64 * step,
                    v: if acc.weight > 0 {
                        acc.weighted / acc.weight as f64
                    } else {
                        acc.last
                    },
                    min: Some(acc.min),
                    max: Some(acc.max),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(before: Option<f64>, samples: &[Sample], from: i64, to: i64, step: i64) -> Vec<Point> {
        let mut b = Bucketer::new(from, to, to, step, before.map(|v| Sample::reading(from, v)));
        for s in samples {
            b.add(*s);
        }
        b.finish()
    }

    fn p(t: i64, v: f64, min: f64, max: f64) -> Point {
        Point {
            t,
            v,
            min: Some(min),
            max: Some(max),
        }
    }

    #[test]
    fn buckets_weigh_each_value_by_how_long_it_held() {
        // 10 holds from before 0 until 250, then 20 until 750, then 40.
        let s = [Sample::reading(250, 20.0), Sample::reading(750, 40.0)];
        assert_eq!(
            run(Some(10.0), &s, 0, 1000, 500),
            [p(0, 15.0, 10.0, 20.0), p(500, 30.0, 20.0, 40.0)]
        );
    }

    #[test]
    fn nothing_known_yet_is_no_bucket_and_a_quiet_bucket_carries_the_value() {
        let s = [Sample::reading(1500, 5.0)];
        assert_eq!(
            run(None, &s, 0, 4000, 1000),
            [
                p(1000, 5.0, 5.0, 5.0),
                p(2000, 5.0, 5.0, 5.0),
                p(3000, 5.0, 5.0, 5.0)
            ]
        );
    }

    #[test]
    fn a_value_replaced_at_once_still_counts_for_min_and_max() {
        let s = [Sample::reading(100, 99.0), Sample::reading(100, 1.0)];
        assert_eq!(run(None, &s, 0, 200, 200), [p(0, 1.0, 1.0, 99.0)]);
    }

    #[test]
    fn a_minute_holds_its_mean_then_its_last_value() {
        let m = Minute {
            min: 1.0,
            max: 9.0,
            sum: 8.0,
            count: 2,
            last: 2.0,
        };
        let s = [m.sample(0)];
        // 4 over the minute, then 2 over the next.
        assert_eq!(
            run(None, &s, 0, 2 * MINUTE_MS, 2 * MINUTE_MS),
            [p(0, 3.0, 1.0, 9.0)]
        );
    }

    #[test]
    fn step_sizes_that_fit() {
        assert_eq!(buckets(0, 3_600_000, 60_000), 60);
        assert_eq!(buckets(0, 3_600_001, 60_000), 61);
        assert_eq!(buckets(0, 1, i64::MAX), 1);
        assert_eq!(fitting_step_ms(3_600_000), 1000);
        assert_eq!(fitting_step_ms(30 * 86_400_000), 260_000);
        assert!(buckets(0, 30 * 86_400_000, 260_000) <= MAX_POINTS as i64);
        assert_eq!(minute_of(119_999), 60_000);
        assert_eq!(minute_of(-1), -60_000);
    }
}
