//! Feature layer: `Commands/Watch`, a snapshot and then every transition, per caller within
//! `limits.command_watches_per_caller`.

use std::pin::Pin;
use std::sync::Arc;

use tether_api::v1;
use tether_api::v1::Command;
use tokio::sync::broadcast;
use tokio_stream::Stream;
use tonic::Status;
use tunnel_proto::AgentId;

use super::store::is_final;
use super::{CommandError, Commands, for_event};
use crate::northbound::auth::Caller;

/// The stream a `Commands/Watch` call answers with.
pub(super) type EventStream = Pin<Box<dyn Stream<Item = Result<v1::CommandEvent, Status>> + Send>>;

/// One open `Commands/Watch` stream of a caller; given back when the stream's task ends.
pub(super) struct WatchSlot {
    commands: Arc<Commands>,
    key: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut w = self
            .commands
            .watches
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = w.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                w.remove(&self.key);
            }
        }
    }
}

impl Commands {
    /// Caps `Commands/Watch` streams per caller (`limits.command_watches_per_caller`);
    /// unlimited until set.
    pub fn set_watch_limit(&self, limit: u32) {
        self.watch_limit
            .store(limit, std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes one of `caller`'s watch slots, or refuses when it holds them all.
    pub(super) fn watch_slot(self: &Arc<Self>, caller: &Caller) -> Result<WatchSlot, CommandError> {
        let limit = self.watch_limit.load(std::sync::atomic::Ordering::Relaxed);
        // Names are unique per kind: a certificate's `<name>` and a token's `sub` may coincide.
        let key = format!("{}:{}", caller.kind.as_str(), caller.name);
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let n = w.get(&key).copied().unwrap_or(0);
        if n >= limit {
            drop(w);
            crate::metrics::count_rejection(crate::metrics::Limit::CommandWatchesPerCaller);
            return Err(CommandError::TooManyWatches {
                caller: caller.name.clone(),
                limit,
            });
        }
        w.insert(key.clone(), n + 1);
        Ok(WatchSlot {
            commands: self.clone(),
            key,
        })
    }

    pub(super) fn watch(
        self: &Arc<Self>,
        target: Option<v1::watch_commands_request::Target>,
        slot: WatchSlot,
    ) -> Result<EventStream, CommandError> {
        use v1::watch_commands_request::Target;
        // Snapshot and subscription under the state lock (events are sent under it too): no
        // transition is missed or seen twice between the two.
        let (mut feed, initial, only_id, only_agent) = match target {
            Some(Target::Id(id)) => {
                let st = self.lock();
                let live = st.active.get(&id).or_else(|| st.recent.get(&id)).cloned();
                let feed = st.events.subscribe();
                drop(st);
                // Neither active nor recent: final long ago, and stored.
                let c = match live {
                    Some(c) => c,
                    None => self
                        .store
                        .get(&id)?
                        .ok_or_else(|| CommandError::NotFound(id.clone()))?,
                };
                (feed, vec![c], Some(id), None)
            }
            Some(Target::Agent(agent)) => {
                let agent: AgentId = agent
                    .parse()
                    .map_err(|e| CommandError::Invalid(format!("agent {agent:?}: {e}")))?;
                let agent = agent.to_string();
                let st = self.lock();
                let mut cmds: Vec<Command> = st
                    .active
                    .values()
                    .filter(|c| c.agent == agent)
                    .map(for_event)
                    .collect();
                let feed = st.events.subscribe();
                drop(st);
                cmds.sort_by(|a, b| a.id.cmp(&b.id));
                (feed, cmds, None, Some(agent))
            }
            None => {
                return Err(CommandError::Invalid(
                    "watch needs an id or an agent".into(),
                ));
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            // The caller's slot is held for as long as this stream runs.
            let _slot = slot;
            let mut done = false;
            for mut c in initial {
                c.payload.clear();
                done |= only_id.is_some() && is_final(c.state);
                if tx
                    .send(Ok(v1::CommandEvent {
                        command: Some(c),
                        initial: true,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            while !done {
                let c = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    r = feed.recv() => match r {
                        Ok(c) => c,
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let _ = tx.send(Err(Status::resource_exhausted(format!("watch fell {n} events behind")))).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                };
                if only_id.as_ref().is_some_and(|id| *id != c.id)
                    || only_agent.as_ref().is_some_and(|a| *a != c.agent)
                {
                    continue;
                }
                done = only_id.is_some() && is_final(c.state);
                if tx
                    .send(Ok(v1::CommandEvent {
                        command: Some(c),
                        initial: false,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}
