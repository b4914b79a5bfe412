//! Feature layer: the server-sent event streams behind the console's live parts.
//!
//! Each stream follows a `Watch` of the gRPC API (as the viewer, so with its tenant checks),
//! gathers what changed for a quarter of a second, then sends the fragments that changed,
//! rendered by the templates the page used: `row` (a fleet row, `<id>\n<html>`), `remove`
//! (an agent that no longer passes the page's filters), `replace` (`<element id>\n<html>`),
//! `command` (a row of the commands list, `<command id>\n<html>`).
//! `console.js` applies them. Two things no watch follows are looked at every
//! [`COMMANDS_REFRESH`] instead: the commands list without an agent filter (`Commands/Watch`
//! follows one command or one agent, not a fleet), and an agent's relayed calls and bytes (a
//! look at its in-memory counters; the detail is sent again only when they moved).

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::time::{Duration, SystemTime};

use askama::Template;
use axum::extract::{Path, Query, State as Shared};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tether_api::v1;
use tether_api::v1::agents_server::Agents as _;
use tether_api::v1::commands_server::Commands as _;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;

use crate::console::views::{
    AgentCommands, AgentDetail, AgentRow, CommandDetail, CommandFilter, CommandRow,
    CommandRowFragment, Counts, CountsFragment, Facts, FleetFilter, RowFragment, agent_commands,
    agent_row, as_caller, facts_of, fleet_list, list_commands, status_page,
};
use crate::console::{State, Viewer};
use crate::northbound::auth::Caller;
use crate::relay::Relay;

/// Changes arriving within this long of the first are sent together.
const GATHER: Duration = Duration::from_millis(250);

/// How often the commands list without an agent filter asks `Commands/List` again:
/// `Commands/Watch` follows one command or one agent, not a whole fleet.
pub const COMMANDS_REFRESH: Duration = Duration::from_secs(2);

/// One update the page applies: the event's name and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// `row`, `remove`, `replace` or `command`.
    pub kind: &'static str,
    /// What `console.js` reads: a target, a newline, the fragment.
    pub data: String,
}

impl Update {
    fn event(&self) -> Event {
        Event::default().event(self.kind).data(&self.data)
    }

    /// The bytes this update takes on the wire (as `text/event-stream`, before HTTP framing).
    pub fn wire_len(&self) -> usize {
        let lines = self.data.split('\n').count();
        "event: \n".len() + self.kind.len() + lines * "data: \n".len() + self.data.len()
            - (lines - 1)
            + 1
    }
}

fn clean(html: String) -> String {
    // A carriage return cannot travel in an event's data.
    if html.contains('\r') {
        html.replace('\r', "")
    } else {
        html
    }
}

/// The update for one agent on a fleet page with filters `f`.
pub fn row_update(agent: &v1::Agent, f: &FleetFilter, relay: &Relay, now: SystemTime) -> Update {
    if f.matches(&Facts::new(agent, now)) {
        let row = AgentRow::new(agent, now).with_relay(relay);
        let html = RowFragment { r: &row }.render().unwrap_or_default();
        Update {
            kind: "row",
            data: format!("{}\n{}", row.id, clean(html)),
        }
    } else {
        Update {
            kind: "remove",
            data: agent.id.clone(),
        }
    }
}

/// The update of the fleet page's counts.
pub fn counts_update(fleet: &[Facts<'_>], f: &FleetFilter) -> Update {
    let matching = fleet.iter().filter(|r| f.matches(r)).count();
    let html = CountsFragment {
        counts: Counts::of(fleet, matching),
    }
    .render()
    .unwrap_or_default();
    Update {
        kind: "replace",
        data: format!("counts\n{}", clean(html)),
    }
}

fn replace(target: &str, html: String) -> Update {
    Update {
        kind: "replace",
        data: format!("{target}\n{}", clean(html)),
    }
}

type Tx = mpsc::Sender<Result<Event, Infallible>>;

fn sse(rx: mpsc::Receiver<Result<Event, Infallible>>) -> Response {
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn send_all(tx: &Tx, updates: impl IntoIterator<Item = Update>) -> bool {
    for u in updates {
        if tx.send(Ok(u.event())).await.is_err() {
            return false;
        }
    }
    true
}

/// Waits for the next item of `next`, then takes whatever else comes within [`GATHER`].
async fn gather<T>(
    first: T,
    mut more: impl FnMut() -> Option<T>,
    wait: impl std::future::Future<Output = ()>,
) -> Vec<T> {
    let mut items = vec![first];
    wait.await;
    while let Some(x) = more() {
        items.push(x);
    }
    items
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct Since {
    /// When the page was rendered (Unix ms): sessions that connected after it are sent.
    since: u64,
}

fn ms(t: &Option<prost_types::Timestamp>) -> u64 {
    t.and_then(|t| SystemTime::try_from(t).ok())
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Forwards a watch's events into a channel the gathering loop can drain without waiting.
fn pump<T: Send + 'static>(
    mut stream: impl tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send + Unpin + 'static,
) -> mpsc::UnboundedReceiver<T> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(ev)) = stream.next().await {
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
    rx
}

/// `GET /ui/events/fleet?<filters>&since=<ms>`: rows of agents that connect or disconnect,
/// and the counts.
pub(super) async fn fleet(
    Shared(console): Shared<State>,
    Viewer(caller): Viewer,
    Query(f): Query<FleetFilter>,
    Query(since): Query<Since>,
) -> Response {
    // Subscribed before the answer's head goes out: once the page sees the stream open, no
    // change is missed.
    let watch = match console
        .agents
        .watch(as_caller(
            &caller,
            v1::WatchAgentsRequest {
                tenant: f.tenant.clone(),
                agent: String::new(),
            },
        ))
        .await
    {
        Ok(w) => w.into_inner(),
        Err(s) => return status_page(s),
    };
    let mut events = pump(watch);
    let (tx, rx) = mpsc::channel(64);
    let shutdown = console.shutdown.clone();
    tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                ev = events.recv() => match ev { Some(ev) => ev, None => return },
            };
            let batch = gather(first, || events.try_recv().ok(), tokio::time::sleep(GATHER)).await;
            let changed: BTreeSet<String> = batch
                .into_iter()
                .filter(|ev: &v1::AgentEvent| {
                    !ev.initial
                        || ev
                            .session
                            .as_ref()
                            .is_some_and(|s| ms(&s.connected_at) >= since.since)
                })
                .map(|ev| ev.agent)
                .collect();
            if changed.is_empty() {
                continue;
            }
            let Ok(agents) = fleet_list(&console, &caller).await else {
                return;
            };
            let now = SystemTime::now();
            let mut updates: Vec<Update> = agents
                .iter()
                .filter(|a| changed.contains(&a.id))
                .map(|a| row_update(a, &f, &console.relay, now))
                .collect();
            updates.push(counts_update(&facts_of(&agents, now), &f));
            if !send_all(&tx, updates).await {
                return;
            }
        }
    });
    sse(rx)
}

async fn agent_updates(
    console: &State,
    caller: &Caller,
    id: &str,
    what: (bool, bool),
) -> Vec<Update> {
    let mut updates = Vec::new();
    if what.0
        && let Ok(r) = agent_row(console, caller, id).await
    {
        let html = AgentDetail { r: &r }.render().unwrap_or_default();
        updates.push(replace("agent-detail", html));
    }
    if what.1
        && let Ok(commands) = agent_commands(console, caller, id).await
    {
        let html = AgentCommands { commands }.render().unwrap_or_default();
        updates.push(replace("agent-commands", html));
    }
    updates
}

/// `GET /ui/events/agents/{tenant}/{name}`: the agent's detail and its commands.
pub(super) async fn agent(
    Shared(console): Shared<State>,
    Viewer(caller): Viewer,
    Path((tenant, name)): Path<(String, String)>,
) -> Response {
    let id = format!("{tenant}/{name}");
    let sessions = console
        .agents
        .watch(as_caller(
            &caller,
            v1::WatchAgentsRequest {
                tenant: String::new(),
                agent: id.clone(),
            },
        ))
        .await;
    let commands = console
        .commands
        .watch(as_caller(
            &caller,
            v1::WatchCommandsRequest {
                target: Some(v1::watch_commands_request::Target::Agent(id.clone())),
            },
        ))
        .await;
    let (sessions, commands) = match (sessions, commands) {
        (Ok(s), Ok(c)) => (s.into_inner(), c.into_inner()),
        (Err(s), _) | (_, Err(s)) => return status_page(s),
    };
    let (mut sessions, mut commands) = (pump(sessions), pump(commands));
    let (tx, rx) = mpsc::channel(16);
    let shutdown = console.shutdown.clone();
    tokio::spawn(async move {
        // The first events are the state the page was rendered from, or newer: refresh both.
        let mut what = (true, true);
        let counters = |console: &State| {
            let open = id
                .parse::<tunnel_proto::AgentId>()
                .map_or(0, |a| console.relay.open_streams(&a));
            (console.relay.outcomes().traffic(&id), open)
        };
        let mut counted = counters(&console);
        loop {
            if what.0 || what.1 {
                tokio::time::sleep(GATHER).await;
                while sessions.try_recv().is_ok() {
                    what.0 = true;
                }
                while commands.try_recv().is_ok() {
                    what.1 = true;
                }
                if what.0 {
                    counted = counters(&console);
                }
                if !send_all(&tx, agent_updates(&console, &caller, &id, what).await).await {
                    return;
                }
            }
            what = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                ev = sessions.recv() => match ev { Some(_) => (true, false), None => return },
                ev = commands.recv() => match ev { Some(_) => (false, true), None => return },
                _ = tokio::time::sleep(COMMANDS_REFRESH) => (counters(&console) != counted, false),
            };
        }
    });
    sse(rx)
}

/// The rows of `page` that differ from what `sent` holds (all of them the first time), as
/// `command` updates; `sent` is brought up to date.
pub fn command_rows(page: &[CommandRow], sent: &mut HashMap<String, String>) -> Vec<Update> {
    let mut updates = Vec::new();
    for c in page {
        let html = clean(CommandRowFragment { c }.render().unwrap_or_default());
        if sent.get(&c.id) != Some(&html) {
            updates.push(Update {
                kind: "command",
                data: format!("{}\n{html}", c.id),
            });
            sent.insert(c.id.clone(), html);
        }
    }
    updates
}

/// `GET /ui/events/commands?<filters>`: rows of the commands list that appear or change. With
/// an agent filter, each change of that agent's commands (`Commands/Watch`) asks for the
/// page's rows again; without, every [`COMMANDS_REFRESH`].
pub(super) async fn commands(
    Shared(console): Shared<State>,
    Viewer(caller): Viewer,
    Query(f): Query<CommandFilter>,
) -> Response {
    // The page's rows as they are now, sent first: a page whose stream reconnects (or whose
    // rows changed between its render and this stream) is brought up to date; then only what
    // changes.
    let mut sent = HashMap::new();
    let first = match list_commands(&console, &caller, &f).await {
        Ok((rows, _)) => command_rows(&rows, &mut sent),
        Err(refused) => return refused,
    };
    let mut changes = if f.agent.is_empty() {
        None
    } else {
        let watch = console
            .commands
            .watch(as_caller(
                &caller,
                v1::WatchCommandsRequest {
                    target: Some(v1::watch_commands_request::Target::Agent(f.agent.clone())),
                },
            ))
            .await;
        match watch {
            Ok(w) => Some(pump(w.into_inner())),
            Err(s) => return status_page(s),
        }
    };
    let (tx, rx) = mpsc::channel(16);
    let shutdown = console.shutdown.clone();
    tokio::spawn(async move {
        if !send_all(&tx, first).await {
            return;
        }
        loop {
            let changed = async {
                match &mut changes {
                    Some(events) => {
                        events.recv().await?;
                        tokio::time::sleep(GATHER).await;
                        while events.try_recv().is_ok() {}
                        Some(())
                    }
                    None => {
                        tokio::time::sleep(COMMANDS_REFRESH).await;
                        Some(())
                    }
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                c = changed => if c.is_none() { return },
            }
            // A List that fails (a store hiccup) is asked again at the next change or tick.
            let Ok((rows, _)) = list_commands(&console, &caller, &f).await else {
                continue;
            };
            if !send_all(&tx, command_rows(&rows, &mut sent)).await {
                return;
            }
        }
    });
    sse(rx)
}

/// `GET /ui/events/commands/{id}`: the command's detail at every transition and progress line.
pub(super) async fn command(
    Shared(console): Shared<State>,
    Viewer(caller): Viewer,
    Path(id): Path<String>,
) -> Response {
    let watch = match console
        .commands
        .watch(as_caller(
            &caller,
            v1::WatchCommandsRequest {
                target: Some(v1::watch_commands_request::Target::Id(id)),
            },
        ))
        .await
    {
        Ok(w) => w.into_inner(),
        Err(s) => return status_page(s),
    };
    let mut events = pump(watch);
    let (tx, rx) = mpsc::channel(16);
    let shutdown = console.shutdown.clone();
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                ev = events.recv() => match ev { Some(ev) => ev, None => return },
            };
            let Some(c) = ev.command else { continue };
            let row = CommandRow::new(&c);
            let html = CommandDetail { c: &row }.render().unwrap_or_default();
            if !send_all(&tx, [replace("command-detail", html)]).await {
                return;
            }
        }
    });
    sse(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_len_counts_every_data_line() {
        let u = Update {
            kind: "row",
            data: "a\nbc".into(),
        };
        // "event: row\n" + "data: a\n" + "data: bc\n" + "\n"
        assert_eq!(u.wire_len(), 11 + 8 + 9 + 1);
    }

    #[test]
    fn the_commands_list_is_sent_the_rows_that_appeared_or_changed_only() {
        let cmd = |id: &str, state: v1::CommandState| {
            CommandRow::new(&v1::Command {
                id: id.into(),
                agent: "acme/a".into(),
                kind: "echo".into(),
                state: state as i32,
                ..Default::default()
            })
        };
        let mut sent = HashMap::new();
        let first = [cmd("t1", v1::CommandState::Running)];
        assert_eq!(command_rows(&first, &mut sent).len(), 1);
        assert!(
            command_rows(&first, &mut sent).is_empty(),
            "nothing changed"
        );
        let later = [
            cmd("t1", v1::CommandState::Succeeded),
            cmd("t2", v1::CommandState::Queued),
        ];
        let u = command_rows(&later, &mut sent);
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].kind, "command");
        assert!(
            u[0].data.starts_with("t1\n<tr data-command=\"t1\""),
            "{}",
            u[0].data
        );
        assert!(u[0].data.contains("succeeded"), "{}", u[0].data);
        assert!(u[1].data.starts_with("t2\n"), "{}", u[1].data);
    }
}
