//! Command routing: which agent speaks for which device, and which commands
//! are waiting for an answer.
//!
//! - At most one live agent per device. [`Commands::register`] replaces the
//!   previous agent (its [`AgentLink::replaced`] fires, and the commands
//!   routed to it fail at once); every link carries a generation, so the
//!   cleanup of a replaced agent ([`Commands::unregister`]) never removes
//!   its successor.
//! - A device's `online` flag is changed under the registry's lock, so
//!   "connected" and "gone" events reach the hub in the order they happened.
//! - Each agent has a bounded command queue; a full queue refuses at once.
//! - Commands get the server's own request ids (`c-<n>`): agents never see,
//!   and so can never answer, another operator's request id; operators'
//!   request ids may repeat freely.
//! - A [`Ticket`] ends in exactly one [`Settled`]: the agent's answer, a
//!   failure when the agent goes away, or `timed_out` after the deadline.
//!   Dropping a ticket forgets the command.
//!
//! The simulator registers its devices here like any agent; the WebSocket
//! and `POST /api/devices/{id}/commands` dispatch through the same path.
//!
//! In cluster mode, a command for a device whose agent is connected to
//! another instance is relayed there through Redis ([`Relay`]), and its
//! result comes back to the ticket here: the caller cannot tell.

use super::auth::{Guesses, Session};
use super::cluster::{Broker, Relay};
use super::hub::{Filter, Hub};
use crate::model::DeviceId;
use crate::protocol::{CommandSet, Outcome};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The reason given for a command that sets nothing.
pub const EMPTY_SET: &str = "a command sets at least one of: power_on";

/// One command on its way to an agent.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentCommand {
    /// The server's id for this command; the agent's `result` names it.
    pub request_id: String,
    pub set: CommandSet,
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Settled {
    pub outcome: Outcome,
    pub reason: Option<String>,
}

impl Settled {
    pub fn failed(reason: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Failed,
            reason: Some(reason.into()),
        }
    }
}

/// Why a command could not be routed; it fails at once.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no agent is connected for device `{0}`")]
    NoAgent(DeviceId),
    #[error("the agent of device `{0}` has too many commands queued")]
    Busy(DeviceId),
    #[error("the agent of device `{0}` is on another instance, which cannot be reached now")]
    Unreachable(DeviceId),
}

/// A connected agent's end: its commands, and the signal that it was replaced.
pub struct AgentLink {
    pub device: DeviceId,
    pub generation: u64,
    pub commands: mpsc::Receiver<AgentCommand>,
    /// Cancelled when a newer agent registers for the same device.
    pub replaced: CancellationToken,
}

pub struct Commands {
    hub: Arc<Hub>,
    timeout: Duration,
    queue: usize,
    state: Mutex<State>,
    cluster: Option<Cluster>,
}

/// Cluster mode: this instance's name and its connection for relays.
struct Cluster {
    instance: String,
    broker: Mutex<Broker>,
    /// Where the wrong tokens the other instances saw are counted too.
    guesses: Arc<Guesses>,
}

/// The generation of a command relayed to another instance.
const RELAYED: u64 = u64::MAX;

#[derive(Default)]
struct State {
    next_generation: u64,
    next_request: u64,
    agents: HashMap<DeviceId, Agent>,
    pending: HashMap<String, Pending>,
}

struct Agent {
    generation: u64,
    commands: mpsc::Sender<AgentCommand>,
    replaced: CancellationToken,
}

struct Pending {
    device: DeviceId,
    generation: u64,
    reply: oneshot::Sender<Settled>,
}

impl State {
    /// Tells `old`, no longer the agent of `device`, that it was replaced,
    /// and fails the commands routed to it.
    fn replaced(&mut self, device: &DeviceId, old: Agent, why: &str) {
        old.replaced.cancel();
        self.fail_pending(device, old.generation, why);
    }

    /// Fails every command routed to this agent.
    fn fail_pending(&mut self, device: &DeviceId, generation: u64, reason: &str) {
        let gone: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.generation == generation && &p.device == device)
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(p) = self.pending.remove(&id) {
                let _ = p.reply.send(Settled::failed(reason));
            }
        }
    }
}

impl Commands {
    /// Commands time out after `timeout`; each agent queues at most `queue`.
    pub fn new(hub: Arc<Hub>, timeout: Duration, queue: usize) -> Self {
        Self {
            hub,
            timeout,
            queue: queue.max(1),
            state: Mutex::new(State::default()),
            cluster: None,
        }
    }

    /// Cluster mode: agents are announced, and commands relayed, through
    /// `broker`, as `instance`; the wrong tokens each instance sees are
    /// counted in every instance's `guesses`. Start
    /// [`listen`](Self::listen) too.
    pub fn with_cluster(mut self, broker: Broker, guesses: Arc<Guesses>) -> Self {
        self.cluster = Some(Cluster {
            instance: broker.instance().to_owned(),
            broker: Mutex::new(broker),
            guesses,
        });
        self
    }

    /// Cluster mode: tells the other instances that a wrong token came
    /// from `ip` (best effort: a lost notice costs one more guess).
    pub fn tell_guessed(&self, ip: std::net::IpAddr) {
        if let Some(Err(e)) = self.on_cluster(|broker, _| broker.guessed(ip)) {
            tracing::debug!("telling the cluster of a wrong token: {e}");
        }
    }

    /// Cluster mode: runs `f` on the relay connection (blocking).
    fn on_cluster<T>(
        &self,
        f: impl FnOnce(&mut Broker, &str) -> Result<T, super::store::StoreError>,
    ) -> Option<Result<T, super::store::StoreError>> {
        let cluster = self.cluster.as_ref()?;
        let mut broker = cluster.broker.lock().unwrap_or_else(|e| e.into_inner());
        Some(tokio::task::block_in_place(|| {
            f(&mut broker, &cluster.instance)
        }))
    }

    /// Cluster mode: receives the relays addressed to this instance until
    /// `shutdown` (blocking: run it on a thread of its own).
    pub fn listen(self: &Arc<Self>, broker: Broker, shutdown: CancellationToken) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let runtime = tokio::runtime::Handle::current();
        broker.listen(
            |relay| {
                let commands = self.clone();
                runtime.spawn(async move { commands.relayed(relay).await });
            },
            // Redis may have restarted empty: announce our agents again.
            || {
                let devices: Vec<DeviceId> = self.lock().agents.keys().cloned().collect();
                let mut broker = cluster.broker.lock().unwrap_or_else(|e| e.into_inner());
                for device in devices {
                    if let Err(e) = broker.claim_agent(&device, &cluster.instance) {
                        tracing::warn!("announcing the agent of {device}: {e}");
                    }
                }
            },
            &shutdown,
        );
    }

    /// At start: a device the store left online (its agent was connected
    /// when the server stopped) whose agent is not back after `grace` goes
    /// offline. Otherwise it would show online for good, with no agent to
    /// take its commands, and could not be removed. In cluster mode one
    /// that an agent on another instance holds stays online.
    pub async fn offline_unless_back(
        self: Arc<Self>,
        grace: Duration,
        shutdown: CancellationToken,
    ) {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(grace) => {}
        }
        let snapshot = self.hub.snapshot(&Filter::default());
        let online = snapshot.devices.iter().filter(|d| d.online == Some(true));
        for device in online.map(|d| &d.id) {
            // Under the agents' lock, which `register` holds while it puts
            // its device online: an agent arriving now keeps it so.
            let state = self.lock();
            if state.agents.contains_key(device) {
                continue;
            }
            // Held elsewhere, or not known: the sweep looks after it.
            if let Some(Ok(Some(_)) | Err(_)) = self.on_cluster(|b, _| b.agent_of(device)) {
                continue;
            }
            match self.hub.set_online(device, Some(false)) {
                Ok(_) => tracing::info!("{device}: its agent did not come back after the restart"),
                Err(e) => {
                    tracing::error!("{device} is offline, but that could not be recorded: {e}")
                }
            }
            drop(state);
        }
    }

    /// Cluster mode: once a second, until `shutdown`, withdraws the agents
    /// of instances that are gone ([`Broker::orphans`], seen twice in a
    /// row, so a relay connection that is only reconnecting is spared) and
    /// marks their devices offline: once for the cluster, by the instance
    /// whose withdrawal succeeds. And puts back this instance's own agents
    /// that another one withdrew meanwhile (Redis was away from it for
    /// longer than a reconnect).
    pub async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        let mut suspects = BTreeSet::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let orphans = match self.on_cluster(|b, _| b.orphans()) {
                Some(Ok(found)) => found.into_iter().collect(),
                Some(Err(e)) => {
                    tracing::debug!("looking for agents of instances gone: {e}");
                    continue;
                }
                None => return,
            };
            for (device, instance) in suspects.intersection(&orphans) {
                match self.on_cluster(|b, _| b.release_agent(device, instance)) {
                    Some(Ok(true)) => {
                        tracing::info!("the agent of {device} was on an instance that is gone");
                        if let Err(e) = self.hub.set_online(device, Some(false)) {
                            tracing::error!(
                                "{device} is offline, but that could not be recorded: {e}"
                            );
                        }
                    }
                    Some(Err(e)) => tracing::warn!("withdrawing the agent of {device}: {e}"),
                    _ => {}
                }
            }
            suspects = orphans;
            let mine: Vec<DeviceId> = self.lock().agents.keys().cloned().collect();
            for device in mine {
                if self
                    .hub
                    .device(&device)
                    .is_some_and(|d| d.online == Some(false))
                    && let Some(Ok(_)) = self.on_cluster(|b, me| b.claim_agent(&device, me))
                    && let Err(e) = self.hub.set_online(&device, Some(true))
                {
                    tracing::warn!("{device} is online again, but that could not be recorded: {e}");
                }
            }
        }
    }

    /// A relay from another instance: a command for one of our agents (its
    /// result goes back), or the result of one of our relayed commands.
    async fn relayed(self: Arc<Self>, relay: Relay) {
        match relay {
            Relay::Result {
                request_id,
                outcome,
                reason,
            } => {
                let mut state = self.lock();
                if state
                    .pending
                    .get(&request_id)
                    .is_some_and(|p| p.generation == RELAYED)
                    && let Some(p) = state.pending.remove(&request_id)
                {
                    let _ = p.reply.send(Settled { outcome, reason });
                }
            }
            Relay::Heard { device, .. } => self.hub.heard_elsewhere(&device),
            Relay::Guessed { ip, .. } => {
                if let Some(cluster) = &self.cluster {
                    cluster.guesses.wrong(ip);
                }
            }
            Relay::Replaced { device } => {
                let mut state = self.lock();
                // A notice that took its time: an agent connected here
                // since, and announced itself after the one that sent it
                // (claims are ordered in Redis, and ours are made under this
                // lock), is the newer; it stays. When Redis cannot say, the
                // notice is believed.
                if state.agents.contains_key(&device)
                    && let Some(Ok(true)) = self.on_cluster(|b, me| {
                        Ok(b.agent_of(&device)?.is_some_and(|holder| holder == me))
                    })
                {
                    tracing::info!(
                        "{device}: a late notice of a replaced agent, about an older one"
                    );
                    return;
                }
                // Still online, through the newer agent: no event here.
                if let Some(old) = state.agents.remove(&device) {
                    let why = "the device's agent was replaced by a newer one, on another instance";
                    state.replaced(&device, old, why);
                }
            }
            Relay::SignedOut {
                session, expires, ..
            } => {
                let session = Session {
                    id: session,
                    expires,
                };
                if let Err(e) = self.hub.signed_out_elsewhere(&session) {
                    tracing::error!("keeping a session signed out elsewhere: {e}");
                }
            }
            Relay::Limits { device, limits, .. } => {
                if let Err(e) = self.hub.limits_elsewhere(&device, limits) {
                    tracing::error!("keeping the limits of {device} set elsewhere: {e}");
                }
            }
            Relay::Command {
                from,
                request_id,
                device,
                set,
            } => {
                let settled = match self.dispatch_here(&device, set) {
                    Ok(ticket) => ticket.outcome().await,
                    Err(refused) => Settled::failed(refused.to_string()),
                };
                let result = Relay::Result {
                    request_id,
                    outcome: settled.outcome,
                    reason: settled.reason,
                };
                if let Some(Err(e)) = self.on_cluster(|b, _| b.relay(&from, &result)) {
                    tracing::warn!("a command's result could not go back to {from}: {e}");
                }
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Makes the caller the one agent of `device` (online from now on),
    /// replacing any earlier agent.
    pub fn register(&self, device: &DeviceId) -> AgentLink {
        let mut state = self.lock();
        state.next_generation += 1;
        let generation = state.next_generation;
        let (sender, commands) = mpsc::channel(self.queue);
        let replaced = CancellationToken::new();
        let agent = Agent {
            generation,
            commands: sender,
            replaced: replaced.clone(),
        };
        if let Some(old) = state.agents.insert(device.clone(), agent) {
            state.replaced(
                device,
                old,
                "the device's agent was replaced by a newer one",
            );
        }
        // Announced before it shows as online anywhere: a command sent on
        // seeing it online finds its way. An agent of it on another
        // instance is told it was replaced.
        let claimed = self.on_cluster(|b, me| {
            let before = b.claim_agent(device, me)?;
            match before.filter(|other| other != me) {
                Some(other) => b.relay(
                    &other,
                    &Relay::Replaced {
                        device: device.clone(),
                    },
                ),
                None => Ok(true),
            }
        });
        if let Some(Err(e)) = claimed {
            tracing::warn!("the agent of {device} is not announced to the cluster: {e}");
        }
        if let Err(e) = self.hub.set_online(device, Some(true)) {
            tracing::error!("{device} is online, but that could not be recorded: {e}");
        }
        AgentLink {
            device: device.clone(),
            generation,
            commands,
            replaced,
        }
    }

    /// The agent of `link` went away: its device goes offline, unless a
    /// newer agent has taken its place. Returns whether it was still current.
    pub fn unregister(&self, link: &AgentLink) -> bool {
        let mut state = self.lock();
        let current = state
            .agents
            .get(&link.device)
            .is_some_and(|a| a.generation == link.generation);
        if current {
            state.agents.remove(&link.device);
            state.fail_pending(
                &link.device,
                link.generation,
                "the device's agent disconnected",
            );
            // Withdrawn before it shows as offline anywhere: a command
            // sent on seeing it offline fails at once, wherever it is sent.
            // Unless a newer agent holds the device on another instance
            // already (its notice is on its way here): it stays online.
            let elsewhere = match self.on_cluster(|b, me| b.release_agent(&link.device, me)) {
                Some(Ok(released)) => !released,
                Some(Err(e)) => {
                    tracing::warn!("the agent of {} is still announced: {e}", link.device);
                    false
                }
                None => false,
            };
            if elsewhere {
                return true;
            }
            if let Err(e) = self.hub.set_online(&link.device, Some(false)) {
                tracing::error!(
                    "{} is offline, but that could not be recorded: {e}",
                    link.device
                );
            }
        }
        current
    }

    pub fn is_connected(&self, device: &DeviceId) -> bool {
        self.lock().agents.contains_key(device)
    }

    /// Routes a command to the device's agent, here or (cluster mode) on
    /// another instance. Refused at once when there is none or its queue is
    /// full.
    pub fn dispatch(
        self: &Arc<Self>,
        device: &DeviceId,
        set: CommandSet,
    ) -> Result<Ticket, Refused> {
        match self.dispatch_here(device, set.clone()) {
            Err(Refused::NoAgent(_)) if self.cluster.is_some() => self.relay(device, set),
            routed => routed,
        }
    }

    /// Relays a command to the instance that has the device's agent.
    fn relay(self: &Arc<Self>, device: &DeviceId, set: CommandSet) -> Result<Ticket, Refused> {
        let unreachable = |e| {
            tracing::warn!("relaying a command for {device}: {e}");
            Refused::Unreachable(device.clone())
        };
        let owner = self
            .on_cluster(|b, me| Ok(b.agent_of(device)?.filter(|owner| owner != me)))
            .expect("cluster mode")
            .map_err(unreachable)?
            .ok_or_else(|| Refused::NoAgent(device.clone()))?;
        let (request_id, ticket) = {
            let mut state = self.lock();
            state.next_request += 1;
            let instance = &self.cluster.as_ref().expect("cluster mode").instance;
            let request_id = format!("{instance}-c-{}", state.next_request);
            let (reply, answer) = oneshot::channel();
            state.pending.insert(
                request_id.clone(),
                Pending {
                    device: device.clone(),
                    generation: RELAYED,
                    reply,
                },
            );
            let ticket = Ticket {
                request_id: request_id.clone(),
                answer,
                commands: self.clone(),
            };
            (request_id, ticket)
        };
        let relay = |b: &mut Broker, me: &str| {
            let command = Relay::Command {
                from: me.to_owned(),
                request_id,
                device: device.clone(),
                set,
            };
            b.relay(&owner, &command)
        };
        match self.on_cluster(relay).expect("cluster mode") {
            Ok(true) => Ok(ticket),
            // Nobody listens there: that instance is gone, and its agent.
            Ok(false) => Err(Refused::NoAgent(device.clone())),
            Err(e) => Err(unreachable(e)),
        }
    }

    /// Routes a command to the device's agent on this instance.
    fn dispatch_here(
        self: &Arc<Self>,
        device: &DeviceId,
        set: CommandSet,
    ) -> Result<Ticket, Refused> {
        let mut state = self.lock();
        let Some(agent) = state.agents.get(device) else {
            return Err(Refused::NoAgent(device.clone()));
        };
        let generation = agent.generation;
        let sender = agent.commands.clone();
        let request_id = format!("c-{}", state.next_request + 1);
        sender
            .try_send(AgentCommand {
                request_id: request_id.clone(),
                set,
            })
            .map_err(|_| Refused::Busy(device.clone()))?;
        state.next_request += 1;
        let (reply, answer) = oneshot::channel();
        state.pending.insert(
            request_id.clone(),
            Pending {
                device: device.clone(),
                generation,
                reply,
            },
        );
        Ok(Ticket {
            request_id,
            answer,
            commands: self.clone(),
        })
    }

    /// An agent's answer to one of its commands. Refused when no such
    /// command is waiting for this agent (unknown, timed out, or another's).
    pub fn settle(
        &self,
        device: &DeviceId,
        generation: u64,
        request_id: &str,
        settled: Settled,
    ) -> Result<(), &'static str> {
        let mut state = self.lock();
        match state.pending.get(request_id) {
            Some(p) if p.generation == generation && &p.device == device => {}
            _ => return Err("no command with this request_id is waiting for an answer"),
        }
        if let Some(p) = state.pending.remove(request_id) {
            let _ = p.reply.send(settled);
        }
        Ok(())
    }

    /// Commands waiting for an answer.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }
}

/// A routed command, waiting for its outcome.
pub struct Ticket {
    request_id: String,
    answer: oneshot::Receiver<Settled>,
    commands: Arc<Commands>,
}

impl Ticket {
    /// The agent's answer, a failure if it went away, or `timed_out`.
    pub async fn outcome(mut self) -> Settled {
        match tokio::time::timeout(self.commands.timeout, &mut self.answer).await {
            Ok(Ok(settled)) => settled,
            Ok(Err(_)) => Settled::failed("the device's agent went away"),
            Err(_) => Settled {
                outcome: Outcome::TimedOut,
                reason: Some(format!(
                    "no answer within {}",
                    humantime::format_duration(self.commands.timeout)
                )),
            },
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.commands.lock().pending.remove(&self.request_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::hub::Hub;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    fn power(on: bool) -> CommandSet {
        CommandSet { power_on: Some(on) }
    }

    fn setup(timeout: Duration) -> (Arc<Hub>, Arc<Commands>) {
        let hub = Arc::new(Hub::new(16, 16));
        let commands = Arc::new(Commands::new(hub.clone(), timeout, 4));
        (hub, commands)
    }

    #[tokio::test]
    async fn a_routed_command_is_answered_by_its_agent() {
        let (hub, commands) = setup(Duration::from_secs(60));
        let mut link = commands.register(&id("a"));
        assert_eq!(hub.device(&id("a")).unwrap().online, Some(true));
        let ticket = commands.dispatch(&id("a"), power(false)).unwrap();
        let cmd = link.commands.recv().await.unwrap();
        assert_eq!(cmd.set, power(false));
        commands
            .settle(
                &link.device,
                link.generation,
                &cmd.request_id,
                Settled {
                    outcome: Outcome::Applied,
                    reason: None,
                },
            )
            .unwrap();
        assert_eq!(ticket.outcome().await.outcome, Outcome::Applied);
        assert_eq!(commands.pending(), 0);
        // A second answer to the same command is refused.
        assert!(
            commands
                .settle(
                    &link.device,
                    link.generation,
                    &cmd.request_id,
                    Settled::failed("late")
                )
                .is_err()
        );
    }

    #[tokio::test]
    async fn no_agent_is_refused_at_once() {
        let (_, commands) = setup(Duration::from_secs(60));
        assert_eq!(
            commands.dispatch(&id("a"), power(true)).err(),
            Some(Refused::NoAgent(id("a")))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_command_times_out_and_is_forgotten() {
        let (_, commands) = setup(Duration::from_secs(5));
        let _link = commands.register(&id("a"));
        let ticket = commands.dispatch(&id("a"), power(true)).unwrap();
        assert_eq!(commands.pending(), 1);
        assert_eq!(ticket.outcome().await.outcome, Outcome::TimedOut);
        assert_eq!(commands.pending(), 0);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let (_, commands) = setup(Duration::from_secs(60));
        let _link = commands.register(&id("a"));
        let tickets: Vec<_> = (0..4)
            .map(|_| commands.dispatch(&id("a"), power(true)).unwrap())
            .collect();
        assert_eq!(
            commands.dispatch(&id("a"), power(true)).err(),
            Some(Refused::Busy(id("a")))
        );
        drop(tickets);
        assert_eq!(commands.pending(), 0);
    }

    #[tokio::test]
    async fn a_newer_agent_replaces_the_older_and_its_cleanup_keeps_the_newer() {
        let (hub, commands) = setup(Duration::from_secs(60));
        let first = commands.register(&id("a"));
        let ticket = commands.dispatch(&id("a"), power(true)).unwrap();
        let mut second = commands.register(&id("a"));
        assert!(first.replaced.is_cancelled());
        assert!(!second.replaced.is_cancelled());
        // The command routed to the replaced agent fails at once.
        assert_eq!(ticket.outcome().await.outcome, Outcome::Failed);
        // The older agent's late cleanup leaves the newer one in place, online.
        assert!(!commands.unregister(&first));
        assert!(commands.is_connected(&id("a")));
        assert_eq!(hub.device(&id("a")).unwrap().online, Some(true));
        let ticket = commands.dispatch(&id("a"), power(false)).unwrap();
        let cmd = second.commands.recv().await.unwrap();
        // The replaced agent cannot answer for its successor.
        assert!(
            commands
                .settle(
                    &first.device,
                    first.generation,
                    &cmd.request_id,
                    Settled::failed("x")
                )
                .is_err()
        );
        assert!(commands.unregister(&second));
        assert!(!commands.is_connected(&id("a")));
        assert_eq!(hub.device(&id("a")).unwrap().online, Some(false));
        assert_eq!(ticket.outcome().await.outcome, Outcome::Failed);
    }
}
