//! Staleness: a device that has gone quiet for longer than its reports
//! allow is marked `stale`, so the page never shows old values as if they
//! were current.
//!
//! How long is too long, most specific first:
//! 1. `stale_after` in the device's `[devices.ID]` section of the thresholds
//!    file, else in its `[defaults]`;
//! 2. `--stale-after`, for every device;
//! 3. otherwise, three of the device's report intervals, learned from the
//!    gaps between its accepted reports (changed or not): the median of the
//!    last [`KEEP_GAPS`] gaps, at least `--stale-floor` (1 s), once
//!    [`LEARN_FROM`] gaps are known. Reports closer together than the floor
//!    are one burst (a device posting each reading on its own, an array,
//!    an agent sending what it kept while away): a gap is measured from
//!    the report that began the last one, so a burst of any length is one
//!    sample, not a run of near-zero gaps that would pull the median to the
//!    floor and the device stale between every two of its reports. The
//!    median shrugs off one long pause. A device with no interval yet is
//!    never stale.
//!
//! A stale device's next report clears the flag. The gap that ends a stale
//! or offline spell is an outage, not the device's cadence, and is not
//! learned. A device whose agent is gone (`online: false`) is not marked
//! stale: offline already says more.
//!
//! Report times live in memory only: a restart counts as hearing from every
//! device, so none is marked stale for the time the server was down. A
//! learned interval is saved to the store when it is first learned and
//! whenever it has moved by more than a quarter ([`Watch::to_save`]), and
//! taken up again at start, so a device that died while the server was down
//! still goes stale after three intervals; new gaps soon outweigh the saved
//! interval. A device that was stale stays stale (the flag is stored) until
//! it reports.
//!
//! The hub owns the bookkeeping ([`Watch`]) under its lock, so a report and a
//! stale mark can never cross; [`run`] sleeps until the earliest deadline and
//! asks the hub to mark the devices that are due.

use super::hub::Hub;
use crate::model::DeviceId;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A device silent for this many of its report intervals is stale.
pub const MISSED_REPORTS: u32 = 3;
/// Gaps kept per device to learn its interval from.
pub const KEEP_GAPS: usize = 16;
/// Gaps needed before an interval is learned.
pub const LEARN_FROM: usize = 2;
/// The default shortest learned interval (`--stale-floor`).
pub const DEFAULT_FLOOR: Duration = Duration::from_secs(1);

/// How long each device may stay silent.
#[derive(Clone, Debug, PartialEq)]
pub struct StalePolicy {
    /// The shortest learned report interval.
    pub floor: Duration,
    /// `--stale-after`: a fixed deadline for every device.
    pub fixed: Option<Duration>,
    /// The thresholds file's `[defaults]` `stale_after`.
    pub file_default: Option<Duration>,
    /// The thresholds file's `[devices.ID]` `stale_after`s.
    pub per_device: BTreeMap<DeviceId, Duration>,
}

impl Default for StalePolicy {
    fn default() -> Self {
        Self {
            floor: DEFAULT_FLOOR,
            fixed: None,
            file_default: None,
            per_device: BTreeMap::new(),
        }
    }
}

/// When each device was last heard from, and its recent report gaps.
#[derive(Debug, Default)]
pub struct Watch {
    policy: StalePolicy,
    heard: HashMap<DeviceId, Heard>,
    /// The intervals last saved to the store (or taken up from it).
    saved: HashMap<DeviceId, Duration>,
    /// The deadline the watcher task sleeps until, if any.
    armed: Option<Instant>,
}

#[derive(Debug)]
struct Heard {
    last: Instant,
    /// The report the next gap is measured from: the first of a burst.
    since: Instant,
    gaps: VecDeque<Duration>,
}

impl Watch {
    pub fn new(policy: StalePolicy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    /// Takes the thresholds file's `stale_after`s, the file read again.
    pub fn replace_file(
        &mut self,
        file_default: Option<Duration>,
        per_device: BTreeMap<DeviceId, Duration>,
    ) {
        self.policy.file_default = file_default;
        self.policy.per_device = per_device;
    }

    /// A sign of life from `device` at `now`. With `learn`, the silence
    /// since the last burst began is a sample of its report interval, once
    /// it is at least the floor. Returns whether the watcher must wake up:
    /// the device's deadline is now earlier than the one it sleeps until.
    pub fn heard(&mut self, device: &DeviceId, now: Instant, learn: bool) -> bool {
        match self.heard.get_mut(device) {
            Some(h) => {
                let gap = now.checked_duration_since(h.since);
                match gap.filter(|_| learn) {
                    Some(gap) if gap >= self.policy.floor => {
                        if h.gaps.len() == KEEP_GAPS {
                            h.gaps.pop_front();
                        }
                        h.gaps.push_back(gap);
                        h.since = now;
                    }
                    // Within a burst: it goes on.
                    Some(_) => {}
                    // After an outage: a new start.
                    None => h.since = now,
                }
                h.last = now;
            }
            None => {
                self.heard.insert(
                    device.clone(),
                    Heard {
                        last: now,
                        since: now,
                        gaps: VecDeque::new(),
                    },
                );
            }
        }
        match (self.deadline(device), self.armed) {
            (Some(deadline), Some(armed)) => deadline < armed,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// Takes up an interval learned before a restart: it counts as
    /// [`LEARN_FROM`] gaps of that length, which new gaps soon outweigh.
    pub fn seed(&mut self, device: &DeviceId, interval: Duration, now: Instant) {
        self.heard.insert(
            device.clone(),
            Heard {
                last: now,
                since: now,
                gaps: std::iter::repeat_n(interval, LEARN_FROM).collect(),
            },
        );
        self.saved.insert(device.clone(), interval);
    }

    /// The device's learned interval, if it should be saved: it is new, or
    /// more than a quarter away from the one saved.
    pub fn to_save(&self, device: &DeviceId) -> Option<Duration> {
        let interval = self.interval(device)?;
        match self.saved.get(device) {
            Some(saved) if interval.abs_diff(*saved) <= *saved / 4 => None,
            _ => Some(interval),
        }
    }

    /// Notes that `interval` is now saved for `device`.
    pub fn saved(&mut self, device: &DeviceId, interval: Duration) {
        self.saved.insert(device.clone(), interval);
    }

    /// The device's learned report interval, if enough gaps are known.
    pub fn interval(&self, device: &DeviceId) -> Option<Duration> {
        let h = self.heard.get(device)?;
        if h.gaps.len() < LEARN_FROM {
            return None;
        }
        let mut gaps: Vec<Duration> = h.gaps.iter().copied().collect();
        gaps.sort_unstable();
        Some(gaps[gaps.len() / 2].max(self.policy.floor))
    }

    /// How long the device may stay silent before it is stale.
    pub fn allowed_silence(&self, device: &DeviceId) -> Option<Duration> {
        self.policy
            .per_device
            .get(device)
            .copied()
            .or(self.policy.file_default)
            .or(self.policy.fixed)
            .or_else(|| Some(self.interval(device)? * MISSED_REPORTS))
    }

    /// When the device becomes stale if it stays silent.
    pub fn deadline(&self, device: &DeviceId) -> Option<Instant> {
        Some(self.heard.get(device)?.last + self.allowed_silence(device)?)
    }

    /// Forgets `device` (it was removed): a later report starts afresh.
    pub fn forget(&mut self, device: &DeviceId) {
        self.heard.remove(device);
        self.saved.remove(device);
    }

    /// Records the deadline the watcher now sleeps until.
    pub fn arm(&mut self, next: Option<Instant>) {
        self.armed = next;
    }
}

/// Marks devices stale as their deadlines pass, until `shutdown`. Sleeps
/// until the earliest deadline; the hub wakes it when a deadline moves
/// earlier than that.
pub async fn run(hub: Arc<Hub>, shutdown: CancellationToken) {
    loop {
        let next = hub.mark_stale(Instant::now());
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {}
            () = hub.stale_wake().notified() => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Reports of `device` at `t0 + each offset`, learning every gap.
    fn reports(watch: &mut Watch, device: &str, t0: Instant, offsets: &[u64]) {
        for &o in offsets {
            watch.heard(&id(device), t0 + ms(o), true);
        }
    }

    fn floor(floor: Duration) -> StalePolicy {
        StalePolicy {
            floor,
            ..StalePolicy::default()
        }
    }

    #[test]
    fn learns_the_median_gap_once_two_are_known() {
        let mut w = Watch::new(floor(ms(10)));
        let t0 = Instant::now();
        reports(&mut w, "a", t0, &[0, 100]);
        assert_eq!(w.interval(&id("a")), None, "one gap is not enough");
        assert_eq!(
            w.deadline(&id("a")),
            None,
            "never stale without an interval"
        );
        reports(&mut w, "a", t0, &[200, 205, 305, 1305, 1405]);
        // Gaps 100, 100, 105 (205 is within the floor of 200: a burst),
        // 1000 (a pause), 100: median 100.
        assert_eq!(w.interval(&id("a")), Some(ms(100)));
        assert_eq!(w.allowed_silence(&id("a")), Some(ms(300)));
        assert_eq!(w.deadline(&id("a")), Some(t0 + ms(1705)));
    }

    #[test]
    fn the_floor_bounds_the_interval_and_old_gaps_are_forgotten() {
        let mut w = Watch::new(floor(ms(50)));
        let t0 = Instant::now();
        let fast: Vec<u64> = (0..=200).step_by(10).collect();
        reports(&mut w, "a", t0, &fast);
        assert_eq!(w.interval(&id("a")), Some(ms(50)), "10 ms gaps, floored");
        let slow: Vec<u64> = (1..=KEEP_GAPS as u64).map(|i| 200 + i * 200).collect();
        reports(&mut w, "a", t0, &slow);
        assert_eq!(w.interval(&id("a")), Some(ms(200)));
    }

    #[test]
    fn a_burst_is_one_sample_whatever_its_length() {
        let mut w = Watch::new(floor(ms(1000)));
        let t0 = Instant::now();
        // Every 5 s, five readings posted one by one, a few ms apart.
        let bursts: Vec<u64> = (0..6)
            .flat_map(|i| (0..5).map(move |j| i * 5000 + j * 3))
            .collect();
        reports(&mut w, "a", t0, &bursts);
        assert_eq!(w.interval(&id("a")), Some(ms(5000)));
        // Silence is counted from the last report of the burst.
        assert_eq!(w.deadline(&id("a")), Some(t0 + ms(25_012 + 15_000)));
        // What an agent kept for two minutes, sent back to back, does not
        // make the device's interval the floor.
        let catch_up: Vec<u64> = (0..24).map(|j| 120_000 + j).collect();
        reports(&mut w, "a", t0, &catch_up);
        assert_eq!(w.interval(&id("a")), Some(ms(5000)));
    }

    #[test]
    fn a_gap_that_is_not_learned_only_restarts_the_clock() {
        let mut w = Watch::new(floor(ms(1)));
        let t0 = Instant::now();
        reports(&mut w, "a", t0, &[0, 10, 20]);
        // Back after an outage: heard, but the outage is not its cadence.
        w.heard(&id("a"), t0 + ms(5000), false);
        assert_eq!(w.interval(&id("a")), Some(ms(10)));
        assert_eq!(w.deadline(&id("a")), Some(t0 + ms(5030)));
    }

    #[test]
    fn configured_deadlines_win_over_learning_most_specific_first() {
        let t0 = Instant::now();
        let mut policy = floor(ms(1));
        policy.fixed = Some(ms(700));
        let mut w = Watch::new(policy.clone());
        w.heard(&id("a"), t0, false);
        assert_eq!(
            w.deadline(&id("a")),
            Some(t0 + ms(700)),
            "no learning needed"
        );
        policy.file_default = Some(ms(500));
        policy.per_device.insert(id("b"), ms(200));
        let mut w = Watch::new(policy);
        reports(&mut w, "a", t0, &[0, 10, 20]);
        reports(&mut w, "b", t0, &[0, 10, 20]);
        assert_eq!(w.allowed_silence(&id("a")), Some(ms(500)));
        assert_eq!(w.allowed_silence(&id("b")), Some(ms(200)));
    }

    #[test]
    fn a_seeded_interval_counts_until_new_gaps_outweigh_it() {
        let mut w = Watch::new(floor(ms(1)));
        let t0 = Instant::now();
        w.seed(&id("a"), ms(100), t0);
        assert_eq!(w.deadline(&id("a")), Some(t0 + ms(300)));
        assert_eq!(w.to_save(&id("a")), None, "it came from the store");
        reports(&mut w, "a", t0, &[10, 20, 30]);
        assert_eq!(w.interval(&id("a")), Some(ms(10)));
        assert_eq!(w.to_save(&id("a")), Some(ms(10)));
        w.saved(&id("a"), ms(10));
        reports(&mut w, "a", t0, &[42, 54]);
        assert_eq!(w.interval(&id("a")), Some(ms(12)));
        assert_eq!(w.to_save(&id("a")), None, "within a quarter");
    }

    #[test]
    fn the_watcher_is_woken_only_for_an_earlier_deadline() {
        let mut w = Watch::new(StalePolicy {
            fixed: Some(ms(100)),
            ..StalePolicy::default()
        });
        let t0 = Instant::now();
        assert!(w.heard(&id("a"), t0, true), "nothing armed yet");
        w.arm(w.deadline(&id("a")));
        assert!(!w.heard(&id("a"), t0 + ms(50), true), "later than armed");
        assert!(w.heard(&id("b"), t0 - ms(50), true), "earlier than armed");
    }
}
