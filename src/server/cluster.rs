//! Cluster mode (`--redis-url`): several instances share one event stream
//! and one device state through Redis.
//!
//! The design, in three keys:
//! - `telltale:last_id` — the newest event id of the cluster;
//! - `telltale:devices` — a hash of device id → its current `StatusEvent`
//!   JSON (the shared state a new or recovering instance starts from);
//! - `telltale:events` — a Redis Stream of every event, whose entry id is
//!   `<event id>-0`, trimmed to about `--replay-capacity` × 16 entries.
//!
//! An instance publishes with one Lua script that appends events
//! `expected + 1`, `+ 2`, … (a group: the updates that waited together)
//! only if the cluster's newest id is still `expected`, the newest id this
//! instance has applied. So an instance only ever writes a
//! state computed from the complete history, ids are global, contiguous and
//! the same on every instance, and no two instances can interleave half of
//! a change. When another instance published first, the script answers
//! "behind": the hub catches up from the stream and computes its change
//! again (see [`Hub`](super::hub::Hub)).
//!
//! With a store, the events are first written in a transaction that
//! commits only once the script succeeded (see
//! [`Store::record_all_then`](super::store::Store::record_all_then)).
//!
//! Every instance reads the stream
//! ([`Hub::follow`](super::hub::Hub::follow)) and applies each event to its
//! own hub (and its own store) in id order, then fans it out to its own
//! SSE and WebSocket clients: Redis carries each event once per instance,
//! never once per viewer.
//!
//! While Redis is unreachable, an instance keeps serving what it has, says
//! `degraded` on `/healthz`, and refuses writes with 503 (a write needs the
//! next global id, which only Redis gives; an id made up locally would
//! clash with another instance's). A write is acknowledged only once Redis
//! has it, so refusing loses nothing acknowledged. When Redis comes back
//! empty (it keeps nothing on disk), the instance that has seen the newest
//! event puts its state and recent events back ([`Broker::seed`]); the
//! others catch up from there.
//!
//! Commands cross instances the same way: `telltale:agents` maps each
//! device to the instance its agent is connected to; a command for a device
//! whose agent is elsewhere is published on that instance's channel
//! `telltale:commands:<instance>`, and the result comes back on the
//! sender's ([`Relay`]).

use super::auth::{self, Session};
use super::store::{StoreError, StoredEvent};
use super::thresholds::MetricLimits;
use crate::model::{Device, DeviceId, EventId, StatusEvent};
use crate::protocol::{CommandSet, Outcome};
use redis::{Client, Connection, Script, Value};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const LAST_ID: &str = "telltale:last_id";
const DEVICES: &str = "telltale:devices";
const EVENTS: &str = "telltale:events";
const AGENTS: &str = "telltale:agents";
/// Every instance listens here, for [`Relay::Heard`], [`Relay::Limits`],
/// [`Relay::Guessed`] and [`Relay::SignedOut`].
const EVERYONE: &str = "telltale:everyone";
/// A hash of device id → its own limits (JSON), as set over the API.
const LIMITS: &str = "telltale:limits";
/// A sorted set of the operator sessions signed out before their end,
/// scored by that end (Unix seconds).
const SIGNED_OUT: &str = "telltale:signed_out";

/// Each instance's sign of life, set again every second by its sweep
/// ([`Broker::orphans`]) and expiring after [`ALIVE_FOR`]: an instance whose
/// key is gone is gone too, even when its host vanished (or the process
/// froze) without closing its connections to Redis.
fn alive_key(instance: &str) -> String {
    format!("telltale:alive:{instance}")
}

/// How long an instance's sign of life lasts.
const ALIVE_FOR: Duration = Duration::from_secs(10);

/// The channel an instance receives its [`Relay`]s on.
fn inbox(instance: &str) -> String {
    format!("telltale:commands:{instance}")
}

/// A message between instances about a command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Relay {
    /// For the instance the device's agent is connected to.
    Command {
        from: String,
        request_id: String,
        device: DeviceId,
        set: CommandSet,
    },
    /// Back to the instance the command came from.
    Result {
        request_id: String,
        outcome: Outcome,
        reason: Option<String>,
    },
    /// To every instance: a device reported without changing anything (no
    /// event), a sign of life the others' stale watchers must count too.
    Heard { from: String, device: DeviceId },
    /// To every instance: a device's own limits were set over the API.
    Limits {
        from: String,
        device: DeviceId,
        limits: MetricLimits,
    },
    /// For the instance the device's agent was connected to: a newer agent
    /// took the device over on another instance.
    Replaced { device: DeviceId },
    /// To every instance: a wrong token came from `ip`, which every
    /// instance counts (see [`Guesses`](super::auth::Guesses)), so a
    /// cluster behind a load balancer allows no more guesses than one
    /// instance.
    Guessed { from: String, ip: std::net::IpAddr },
    /// To every instance: an operator session was signed out.
    SignedOut {
        from: String,
        session: String,
        expires: i64,
    },
}

/// Makes `ARGV[2]` the instance of device `ARGV[1]`'s agent; returns the
/// one before, if any.
const CLAIM: &str = r"
local before = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return before
";
static CLAIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM));

/// Removes a device's agent entry only if it is still this instance's.
const RELEASE: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
";
static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE));

/// Holds the lease `KEYS[1]` for instance `ARGV[1]` for `ARGV[2]` ms more:
/// renews it when this instance holds it, takes it when nobody does;
/// returns whether this instance holds it now.
const HOLD: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
";
static HOLD_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(HOLD));

/// Gives the lease `KEYS[1]` up if instance `ARGV[1]` holds it.
const GIVE_UP: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";
static GIVE_UP_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(GIVE_UP));

/// How long connecting, or any one command, may take before Redis counts
/// as unreachable.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Publishes events if the cluster's newest id is still the expected one.
/// KEYS: last_id, devices, events. ARGV: expected id, max stream length,
/// then (id, device id, event JSON) for each event, with ids following the
/// expected one (computed in Rust: the script only compares strings, so no
/// id passes through Lua's doubles). Returns 1, or the cluster's newest id
/// when it is not the expected one. A removal (`"removed":true`, which in
/// a status event's JSON can only be its top-level flag: names and keys are
/// strings, whose quotes are escaped, and no other field is a `true` under
/// that key) deletes the device from the state.
const APPEND: &str = r#"
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return cur end
for i = 3, #ARGV, 3 do
  if string.find(ARGV[i + 2], '"removed":true', 1, true) then
    redis.call('HDEL', KEYS[2], ARGV[i + 1])
  else
    redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i + 2])
  end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], ARGV[i] .. '-0', 'd', ARGV[i + 1], 'j', ARGV[i + 2])
end
redis.call('SET', KEYS[1], ARGV[#ARGV - 2])
return 1
"#;

/// Puts an instance's state into a Redis that has less than it (new, or
/// restarted empty). KEYS as APPEND. ARGV: the instance's newest id, max
/// stream length, '1' when the instance is new itself (it then only starts
/// a new cluster, never overrides one), the number of devices, then
/// (device, JSON) pairs, then (id, device, JSON) triples of its recent
/// events, oldest first. Only events newer than what the stream holds are
/// added.
const SEED: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur and (ARGV[3] == '1' or tonumber(cur) >= tonumber(ARGV[1])) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
local n = tonumber(ARGV[4])
for i = 0, n - 1 do
  redis.call('HSET', KEYS[2], ARGV[5 + 2 * i], ARGV[6 + 2 * i])
end
local top = tonumber(cur or '0')
local newest = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
if #newest > 0 then top = math.max(top, tonumber(string.match(newest[1][1], '^(%d+)'))) end
local i = 5 + 2 * n
while i + 2 <= #ARGV do
  if tonumber(ARGV[i]) > top then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], ARGV[i] .. '-0', 'd', ARGV[i + 1], 'j', ARGV[i + 2])
  end
  i = i + 3
end
return 1
";

/// What [`Broker::append`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Append {
    Done,
    /// Another instance published first: the cluster is further on.
    Behind,
}

/// One connection to Redis (reconnected on the next call after a failure).
pub struct Broker {
    client: Client,
    conn: Option<Connection>,
    /// This instance's name in the cluster, random per process.
    instance: String,
    /// How many events the stream keeps (approximately, at least).
    max_len: usize,
}

static APPEND_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(APPEND));
static SEED_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SEED));

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        // The redis crate keeps the TLS error inside an I/O error it does
        // not give out: it is known by its words.
        let e = e.to_string();
        Self::Broker(if e.contains("UnknownIssuer") {
            format!("TLS: {e} ({})", crate::tls::UNTRUSTED)
        } else {
            e
        })
    }
}

impl Broker {
    /// A broker for `url` (`redis://host:port/db`); connects on first use.
    pub fn new(url: &str, max_len: usize) -> Result<Self, StoreError> {
        Ok(Self {
            client: Client::open(url)?,
            conn: None,
            instance: format!("{:016x}", rand::random::<u64>()),
            max_len: max_len.max(1),
        })
    }

    /// A second broker on the same Redis, with its own connection.
    pub fn another(&self) -> Self {
        Self {
            client: self.client.clone(),
            conn: None,
            instance: self.instance.clone(),
            max_len: self.max_len,
        }
    }

    /// Runs `f` on the connection, connecting first when there is none. A
    /// failed call drops the connection; when it was an old connection
    /// that broke (Redis restarted since), `f` runs once more on a new one.
    /// That is safe for every call here: reads, and scripts that check the
    /// cluster's newest id before they write.
    fn with<T>(
        &mut self,
        read_timeout: Duration,
        mut f: impl FnMut(&mut Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut retried = false;
        loop {
            let reused = self.conn.is_some();
            let conn = match &mut self.conn {
                Some(conn) => conn,
                None => {
                    let conn = self.client.get_connection_with_timeout(TIMEOUT)?;
                    conn.set_write_timeout(Some(TIMEOUT))?;
                    self.conn.insert(conn)
                }
            };
            match conn
                .set_read_timeout(Some(read_timeout))
                .and_then(|()| f(conn))
            {
                Ok(value) => return Ok(value),
                Err(e) => {
                    self.conn = None;
                    let broken = e.is_io_error() || e.is_connection_dropped();
                    if !(reused && broken) || std::mem::replace(&mut retried, true) {
                        return Err(e.into());
                    }
                }
            }
        }
    }

    /// This instance's name in the cluster.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Tells the other instances that `device` reported, unchanged.
    pub fn heard(&mut self, device: &DeviceId) -> Result<(), StoreError> {
        let relay = Relay::Heard {
            from: self.instance.clone(),
            device: device.clone(),
        };
        self.tell_everyone(&relay, |_| {})
    }

    /// Tells the other instances that a wrong token came from `ip`.
    pub fn guessed(&mut self, ip: std::net::IpAddr) -> Result<(), StoreError> {
        let relay = Relay::Guessed {
            from: self.instance.clone(),
            ip,
        };
        self.tell_everyone(&relay, |_| {})
    }

    /// Keeps `device`'s own limits for every instance (and those that join
    /// later), and tells the others at once.
    pub fn share_limits(
        &mut self,
        device: &DeviceId,
        limits: &MetricLimits,
    ) -> Result<(), StoreError> {
        let relay = Relay::Limits {
            from: self.instance.clone(),
            device: device.clone(),
            limits: limits.clone(),
        };
        let json = serde_json::to_string(limits).expect("limits serialize");
        self.tell_everyone(&relay, |pipe| {
            pipe.cmd("HSET")
                .arg(LIMITS)
                .arg(device.as_str())
                .arg(&json)
                .ignore();
        })
    }

    /// Every device's own limits set over the API, in the whole cluster.
    pub fn all_limits(&mut self) -> Result<Vec<(DeviceId, MetricLimits)>, StoreError> {
        let all: Vec<(String, String)> =
            self.with(TIMEOUT, |c| redis::cmd("HGETALL").arg(LIMITS).query(c))?;
        all.into_iter()
            .map(|(device, json)| {
                let corrupt = |e: String| StoreError::Corrupt(format!("{LIMITS} {device}: {e}"));
                Ok((
                    DeviceId::parse(&device).map_err(|e| corrupt(e.to_string()))?,
                    serde_json::from_str(&json).map_err(|e| corrupt(e.to_string()))?,
                ))
            })
            .collect()
    }

    /// Keeps `session` signed out for every instance (and those that join
    /// later; forgetting those that have ended), and tells the others at once.
    pub fn share_signed_out(&mut self, session: &Session) -> Result<(), StoreError> {
        let relay = Relay::SignedOut {
            from: self.instance.clone(),
            session: session.id.clone(),
            expires: session.expires,
        };
        self.tell_everyone(&relay, |pipe| {
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(SIGNED_OUT)
                .arg("-inf")
                .arg(auth::now())
                .ignore();
            pipe.cmd("ZADD")
                .arg(SIGNED_OUT)
                .arg(session.expires)
                .arg(&session.id)
                .ignore();
        })
    }

    /// The operator sessions signed out in the whole cluster that have not
    /// ended.
    pub fn signed_out(&mut self) -> Result<Vec<Session>, StoreError> {
        let all: Vec<(String, i64)> = self.with(TIMEOUT, |c| {
            redis::cmd("ZRANGE")
                .arg(SIGNED_OUT)
                .arg(auth::now() + 1)
                .arg("+inf")
                .arg("BYSCORE")
                .arg("WITHSCORES")
                .query(c)
        })?;
        Ok(all
            .into_iter()
            .map(|(id, expires)| Session { id, expires })
            .collect())
    }

    /// Publishes `relay` to every instance, in one transaction with what
    /// `keep` adds to it.
    fn tell_everyone(
        &mut self,
        relay: &Relay,
        keep: impl Fn(&mut redis::Pipeline),
    ) -> Result<(), StoreError> {
        let payload = serde_json::to_string(relay).expect("a relay serializes");
        self.with(TIMEOUT, |c| {
            let mut pipe = redis::pipe();
            pipe.atomic();
            keep(&mut pipe);
            pipe.cmd("PUBLISH").arg(EVERYONE).arg(&payload).ignore();
            pipe.query::<()>(c)
        })
    }

    /// Checks that Redis answers.
    pub fn ping(&mut self) -> Result<(), StoreError> {
        self.with(TIMEOUT, |c| redis::cmd("PING").query::<String>(c).map(drop))
    }

    /// The cluster's newest event id, `None` for a Redis that holds none.
    pub fn last_id(&mut self) -> Result<Option<EventId>, StoreError> {
        let id: Option<String> = self.with(TIMEOUT, |c| redis::cmd("GET").arg(LAST_ID).query(c))?;
        id.map(|s| parse_id(&s)).transpose()
    }

    /// Publishes `events` (id, device, JSON), whose ids follow `expected`,
    /// in one step, if the cluster's newest id is still `expected`.
    pub fn append<'a>(
        &mut self,
        expected: EventId,
        events: impl IntoIterator<Item = (EventId, &'a DeviceId, &'a str)>,
    ) -> Result<Append, StoreError> {
        let max_len = self.max_len;
        let events: Vec<_> = events.into_iter().collect();
        let reply: Value = self.with(TIMEOUT, |c| {
            let mut call = APPEND_SCRIPT.key(LAST_ID);
            call.key(DEVICES).key(EVENTS);
            call.arg(expected.to_string()).arg(max_len);
            for (id, device, json) in &events {
                call.arg(id.to_string()).arg(device.as_str()).arg(*json);
            }
            call.invoke(c)
        })?;
        Ok(match reply {
            Value::Int(1) => Append::Done,
            _ => Append::Behind,
        })
    }

    /// Puts `last_id`, `devices` and the `recent` events into Redis if it
    /// holds an older id (or none). Returns whether it did.
    pub fn seed(
        &mut self,
        last_id: EventId,
        devices: &[Device],
        recent: &[StoredEvent],
        new: bool,
    ) -> Result<bool, StoreError> {
        let max_len = self.max_len;
        let seeded: i64 = self.with(TIMEOUT, |c| {
            let mut call = SEED_SCRIPT.key(LAST_ID);
            call.key(DEVICES).key(EVENTS);
            call.arg(last_id.to_string())
                .arg(max_len)
                .arg(if new { "1" } else { "0" })
                .arg(devices.len());
            for d in devices {
                call.arg(d.id.as_str())
                    .arg(serde_json::to_string(&StatusEvent::from(d)).expect("serializes"));
            }
            for e in recent {
                call.arg(e.id.to_string())
                    .arg(e.device.as_str())
                    .arg(&e.json);
            }
            call.invoke(c)
        })?;
        Ok(seeded == 1)
    }

    /// Every device of the cluster, at [`last_id`](Self::last_id) (read both
    /// in one transaction so they agree).
    pub fn state(&mut self) -> Result<(Option<EventId>, Vec<Device>), StoreError> {
        let (id, devices): (Option<String>, Vec<(String, String)>) = self.with(TIMEOUT, |c| {
            redis::pipe()
                .atomic()
                .cmd("GET")
                .arg(LAST_ID)
                .cmd("HGETALL")
                .arg(DEVICES)
                .query(c)
        })?;
        let id = id.map(|s| parse_id(&s)).transpose()?;
        let devices = devices
            .into_iter()
            .map(|(key, json)| {
                serde_json::from_str::<StatusEvent>(&json)
                    .map(StatusEvent::into_device)
                    .map_err(|e| StoreError::Corrupt(format!("{DEVICES} {key}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok((id, devices))
    }

    /// Up to `count` events after `after`, oldest first, from the stream,
    /// and the cluster's newest id at that moment (read together, so an
    /// empty answer with a newer id means the stream lost events).
    pub fn since(
        &mut self,
        after: EventId,
        count: usize,
    ) -> Result<(Option<EventId>, Vec<StoredEvent>), StoreError> {
        type Entries = Vec<(String, Vec<String>)>;
        let (head, entries): (Option<String>, Entries) = self.with(TIMEOUT, |c| {
            redis::pipe()
                .atomic()
                .cmd("GET")
                .arg(LAST_ID)
                .cmd("XRANGE")
                .arg(EVENTS)
                .arg(format!("{}-0", after + 1))
                .arg("+")
                .arg("COUNT")
                .arg(count)
                .query(c)
        })?;
        Ok((
            head.map(|h| parse_id(&h)).transpose()?,
            entries
                .into_iter()
                .map(parse_entry)
                .collect::<Result<_, _>>()?,
        ))
    }

    /// Waits up to `block` for events after `after` (at most `count`).
    pub fn follow(
        &mut self,
        after: EventId,
        count: usize,
        block: Duration,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        type Reply = Option<Vec<(String, Vec<(String, Vec<String>)>)>>;
        let reply: Reply = self.with(block + TIMEOUT, |c| {
            redis::cmd("XREAD")
                .arg("COUNT")
                .arg(count)
                .arg("BLOCK")
                .arg(block.as_millis() as u64)
                .arg("STREAMS")
                .arg(EVENTS)
                .arg(format!("{after}-0"))
                .query(c)
        })?;
        reply
            .into_iter()
            .flatten()
            .flat_map(|(_, entries)| entries)
            .map(parse_entry)
            .collect()
    }
}

fn parse_id(s: &str) -> Result<EventId, StoreError> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("{LAST_ID} holds {s:?}, not an event id")))
}

impl Broker {
    /// Holds `work`'s lease (`telltale:lease:<work>`) for `ttl` more, if no
    /// other instance holds it: whether this instance may do that work now.
    /// With no `ttl`, gives it up if this instance holds it: the next holder
    /// need not wait for it to run out.
    pub fn lease(&mut self, work: &str, ttl: Option<Duration>) -> Result<bool, StoreError> {
        let key = format!("telltale:lease:{work}");
        let instance = self.instance.clone();
        self.with(TIMEOUT, |c| match ttl {
            Some(ttl) => HOLD_SCRIPT
                .key(&key)
                .arg(&instance)
                .arg(ttl.as_millis() as u64)
                .invoke(c),
            None => GIVE_UP_SCRIPT
                .key(&key)
                .arg(&instance)
                .invoke::<i64>(c)
                .map(|_| false),
        })
    }

    /// Notes that `device`'s agent is connected to `instance`; returns the
    /// instance it was connected to before, if any.
    pub fn claim_agent(
        &mut self,
        device: &DeviceId,
        instance: &str,
    ) -> Result<Option<String>, StoreError> {
        self.with(TIMEOUT, |c| {
            CLAIM_SCRIPT
                .key(AGENTS)
                .arg(device.as_str())
                .arg(instance)
                .invoke(c)
        })
    }

    /// Renews this instance's sign of life, and returns the agents
    /// announced by other instances that are gone, by device. Gone: nobody
    /// listens on its inbox any more (the kernel closes a dead process's
    /// connection, and Redis drops its subscription with it), or its sign
    /// of life ran out (its host vanished, or it froze).
    pub fn orphans(&mut self) -> Result<Vec<(DeviceId, String)>, StoreError> {
        let me = alive_key(&self.instance);
        let (agents,): (Vec<(String, String)>,) = self.with(TIMEOUT, |c| {
            redis::pipe()
                .pset_ex(&me, 1, ALIVE_FOR.as_millis() as u64)
                .ignore()
                .hgetall(AGENTS)
                .query(c)
        })?;
        let others: BTreeSet<&str> = agents
            .iter()
            .map(|(_, instance)| instance.as_str())
            .filter(|instance| *instance != self.instance)
            .collect();
        if others.is_empty() {
            return Ok(Vec::new());
        }
        let inboxes: Vec<String> = others.iter().map(|i| inbox(i)).collect();
        let alive: Vec<String> = others.iter().map(|i| alive_key(i)).collect();
        let (listeners, signs): (Vec<(String, i64)>, Vec<Option<String>>) =
            self.with(TIMEOUT, |c| {
                redis::pipe()
                    .cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg(&inboxes)
                    .mget(&alive)
                    .query(c)
            })?;
        let gone: BTreeSet<&str> = others
            .iter()
            .zip(listeners.iter().zip(&signs))
            .filter(|(_, ((_, listening), sign))| *listening == 0 || sign.is_none())
            .map(|(instance, _)| *instance)
            .collect();
        Ok(agents
            .iter()
            .filter(|(_, instance)| gone.contains(instance.as_str()))
            .filter_map(|(device, instance)| {
                Some((DeviceId::parse(device).ok()?, instance.clone()))
            })
            .collect())
    }

    /// Forgets `device`'s agent, if it is still `instance`'s; returns
    /// whether it was.
    pub fn release_agent(&mut self, device: &DeviceId, instance: &str) -> Result<bool, StoreError> {
        self.with(TIMEOUT, |c| {
            RELEASE_SCRIPT
                .key(AGENTS)
                .arg(device.as_str())
                .arg(instance)
                .invoke::<i64>(c)
                .map(|n| n > 0)
        })
    }

    /// The instance `device`'s agent is connected to, if any.
    pub fn agent_of(&mut self, device: &DeviceId) -> Result<Option<String>, StoreError> {
        self.with(TIMEOUT, |c| {
            redis::cmd("HGET").arg(AGENTS).arg(device.as_str()).query(c)
        })
    }

    /// Sends `relay` to `instance`; returns whether it is listening.
    pub fn relay(&mut self, instance: &str, relay: &Relay) -> Result<bool, StoreError> {
        let payload = serde_json::to_string(relay).expect("a relay serializes");
        let receivers: i64 = self.with(TIMEOUT, |c| {
            redis::cmd("PUBLISH")
                .arg(inbox(instance))
                .arg(&payload)
                .query(c)
        })?;
        Ok(receivers > 0)
    }

    /// Receives the relays for this instance (and those for every instance,
    /// but its own), handing each to `deliver`, until
    /// `shutdown`; reconnects with backoff. `subscribed` runs each time the
    /// subscription is (re)made: Redis may have lost everything meanwhile.
    pub fn listen(
        &self,
        deliver: impl Fn(Relay),
        subscribed: impl Fn(),
        shutdown: &CancellationToken,
    ) {
        const WAIT: Duration = Duration::from_millis(500);
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let listened = (|| -> redis::RedisResult<()> {
                let mut conn = self.client.get_connection_with_timeout(TIMEOUT)?;
                let mut pubsub = conn.as_pubsub();
                pubsub.subscribe(&[inbox(&self.instance), EVERYONE.to_owned()])?;
                pubsub.set_read_timeout(Some(WAIT))?;
                subscribed();
                backoff = Duration::from_millis(100);
                while !shutdown.is_cancelled() {
                    match pubsub.get_message() {
                        Ok(message) => {
                            let payload: String = message.get_payload()?;
                            match serde_json::from_str(&payload) {
                                Ok(
                                    Relay::Heard { from, .. }
                                    | Relay::Limits { from, .. }
                                    | Relay::SignedOut { from, .. }
                                    | Relay::Guessed { from, .. },
                                ) if from == self.instance => {}
                                Ok(relay) => deliver(relay),
                                Err(e) => tracing::warn!("a relay that does not read: {e}"),
                            }
                        }
                        Err(e) if e.is_timeout() => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            })();
            if let Err(e) = listened {
                tracing::debug!("the command relay lost Redis: {e}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A stream entry `<id>-0` with fields `d` (device) and `j` (JSON).
fn parse_entry((id, fields): (String, Vec<String>)) -> Result<StoredEvent, StoreError> {
    let corrupt = || StoreError::Corrupt(format!("{EVENTS} entry {id}"));
    let event_id = id
        .strip_suffix("-0")
        .and_then(|n| n.parse().ok())
        .ok_or_else(corrupt)?;
    let mut device = None;
    let mut json = None;
    for pair in fields.chunks_exact(2) {
        match pair[0].as_str() {
            "d" => device = DeviceId::parse(&pair[1]).ok(),
            "j" => json = Some(pair[1].clone()),
            _ => {}
        }
    }
    Ok(StoredEvent {
        id: event_id,
        device: device.ok_or_else(corrupt)?,
        json: json.ok_or_else(corrupt)?,
    })
}

/// How long a lease lasts unless renewed: an instance that dies holding one
/// is followed by another within about this long.
const LEASE: Duration = Duration::from_secs(5);
/// How often a lease is renewed, or sought.
const RENEW: Duration = Duration::from_secs(1);

/// Runs some work on one instance of the cluster at a time: the one
/// holding the lease `telltale:lease:<work>`. `start` is called each time
/// this instance takes the lease, with a token that is cancelled when it
/// loses it (or at shutdown); its task is awaited before the lease is
/// sought again. While Redis is away, a lease counts as held until it would
/// have run out. At shutdown it is given up.
pub async fn take_turns(
    lease: Broker,
    work: &'static str,
    shutdown: CancellationToken,
    mut start: impl FnMut(CancellationToken) -> JoinHandle<()>,
) {
    let lease = Arc::new(Mutex::new(lease));
    let mut running: Option<(CancellationToken, JoinHandle<()>)> = None;
    let mut renewed = Instant::now();
    let mut tick = tokio::time::interval(RENEW);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => break,
        }
        let broker = lease.clone();
        let held = tokio::task::spawn_blocking(move || {
            broker
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .lease(work, Some(LEASE))
        })
        .await;
        let held = match held {
            Ok(Ok(held)) => held,
            Ok(Err(e)) => {
                tracing::debug!("the {work} lease: {e}");
                running.is_some() && renewed.elapsed() < LEASE - RENEW
            }
            Err(_) => false,
        };
        if held {
            renewed = Instant::now();
        }
        running = match (held, running.take()) {
            (true, None) => {
                tracing::info!("this instance takes the {work} work (its lease is free)");
                let stop = shutdown.child_token();
                Some((stop.clone(), start(stop)))
            }
            (false, Some((stop, task))) => {
                tracing::warn!("the {work} lease is lost: another instance takes the work");
                stop.cancel();
                let _ = task.await;
                None
            }
            (_, still) => still,
        };
    }
    if let Some((stop, task)) = running {
        stop.cancel();
        let _ = task.await;
        // Shutting down: the next holder takes over at once.
        let given_up = tokio::task::spawn_blocking(move || {
            lease
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .lease(work, None)
        })
        .await;
        if let Ok(Err(e)) = given_up {
            tracing::warn!("the {work} lease is not given up (it runs out): {e}");
        }
    }
}
