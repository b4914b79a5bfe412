//! Feature layer: `Commands/Watch`, a snapshot and then every transition, per caller within
//! `limits.command_watches_per_caller`. Events are shared records as watchers see them (no
//! payload); the API edge turns them into `tether.v1.CommandEvent`s.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc};
use tunnel_proto::AgentId;

use super::record::CommandRecord;
use super::state::lock;
use super::{CommandError, Commands};
use crate::northbound::auth::Caller;

/// What a watch is on.
#[derive(Clone, Debug)]
pub(super) enum WatchTarget {
    /// One command, until its final state.
    Id(String),
    /// Every command of one agent, for as long as the caller reads.
    Agent(AgentId),
}

/// One event of a watch.
#[derive(Clone, Debug)]
pub(super) struct WatchEvent {
    /// The command as watchers see it (without payload).
    pub(super) command: Arc<CommandRecord>,
    /// True for the current state sent first.
    pub(super) initial: bool,
}

/// One open `Commands/Watch` stream of a caller; given back when the stream's task ends.
pub(super) struct WatchSlot {
    commands: Arc<Commands>,
    key: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut w = lock(&self.commands.watches);
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
        let mut w = lock(&self.watches);
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

    /// The current state of what `target` names, then every change after it, while `slot` is
    /// held. A command's events only move forward: each carries a version above the last sent.
    pub(super) async fn watch(
        self: &Arc<Self>,
        target: WatchTarget,
        slot: WatchSlot,
    ) -> Result<mpsc::Receiver<Result<WatchEvent, CommandError>>, CommandError> {
        // Subscribed before the snapshot is read: no change after the snapshot is missed, and
        // one the snapshot already shows is dropped by its version (`seen`) — the same whether
        // the snapshot comes from memory or, across replicas, from PostgreSQL.
        let mut feed = self.state.subscribe();
        let (initial, only_id, only_agent) = match target {
            WatchTarget::Id(id) => {
                let live = match self.state.active(&id) {
                    Some(c) => Some(Arc::new(CommandRecord {
                        payload: Bytes::new(),
                        ..c
                    })),
                    None => self.state.recent(&id),
                };
                // Neither active nor recent: final long ago, and stored.
                let c = match live {
                    Some(c) => c,
                    None => {
                        let c = self
                            .stored(&id)
                            .await?
                            .ok_or_else(|| CommandError::NotFound(id.clone()))?;
                        Arc::new(CommandRecord {
                            payload: Bytes::new(),
                            ..c
                        })
                    }
                };
                (vec![c], Some(id), None)
            }
            WatchTarget::Agent(agent) => {
                let mut cmds: Vec<Arc<CommandRecord>> = self
                    .state
                    .agents
                    .run(&agent, |st| {
                        st.active.values().map(|c| Arc::new(c.view())).collect()
                    })
                    .unwrap_or_default();
                // Another replica delivers them: its unfinished commands from the store.
                if let Some(r) = self.replicated()
                    && !r.holds(&agent)
                {
                    let stored = crate::cluster::commands::unfinished(&r.cluster.pool, &agent)
                        .await
                        .map_err(super::replicated::sql)?;
                    for c in stored {
                        if !cmds.iter().any(|k| k.id == c.id) {
                            cmds.push(Arc::new(c.view()));
                        }
                    }
                }
                cmds.sort_by(|a, b| a.id.cmp(&b.id));
                (cmds, None, Some(agent))
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            // The caller's slot is held for as long as this stream runs.
            let _slot = slot;
            let mut done = false;
            // Versions already sent, of commands not final yet.
            let mut seen: HashMap<String, u64> = initial
                .iter()
                .filter(|c| !c.is_final())
                .map(|c| (c.id.clone(), c.version))
                .collect();
            for c in initial {
                done |= only_id.is_some() && c.is_final();
                let ev = WatchEvent {
                    command: c,
                    initial: true,
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            while !done {
                let c = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    r = feed.recv() => match r {
                        Ok(c) => c,
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            let _ = tx.send(Err(CommandError::WatchLagged { missed })).await;
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
                if seen.get(&c.id).is_some_and(|v| c.version <= *v) {
                    continue;
                }
                if c.is_final() {
                    seen.remove(&c.id);
                } else {
                    seen.insert(c.id.clone(), c.version);
                }
                done = only_id.is_some() && c.is_final();
                let ev = WatchEvent {
                    command: c,
                    initial: false,
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}
