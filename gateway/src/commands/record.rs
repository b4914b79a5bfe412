//! Feature layer: a command as the gateway keeps it, a domain record.
//!
//! [`CommandRecord`] has a typed state, a typed agent and its payload in [`Bytes`], so a state
//! change, a watcher's event and a store write share the payload instead of copying it. It
//! becomes the `tether.v1.Command` message at two edges only: the API (`api.rs`) and the bytes
//! at rest (`store/codec.rs`, used by the embedded store and by `cluster::commands`).

use std::fmt;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tether_api::v1;
use tunnel_proto::AgentId;

/// Largest result output a watcher's event (and a `List` entry) carries; `Get` has all of it.
pub const EVENT_OUTPUT_MAX: usize = 64 << 10;

/// Where a command is in its life. Queued, Delivered, Running and AwaitingApproval are
/// unfinished; the others are final and never change again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CommandState {
    /// Stored, not delivered yet (the only state Cancel and expiry act on).
    Queued,
    /// Sent to the agent, not acknowledged yet.
    Delivered,
    /// The agent acknowledged it and runs it.
    Running,
    /// The handler succeeded.
    Succeeded,
    /// The handler failed, or delivery gave up.
    Failed,
    /// Not delivered before its TTL.
    Expired,
    /// Cancelled before delivery.
    Cancelled,
    /// Delivered; the agent holds it for its owner's approval (`approvals.kinds`).
    AwaitingApproval,
}

impl CommandState {
    /// Every state, unfinished ones first.
    pub const ALL: [CommandState; 8] = [
        CommandState::Queued,
        CommandState::Delivered,
        CommandState::AwaitingApproval,
        CommandState::Running,
        CommandState::Succeeded,
        CommandState::Failed,
        CommandState::Expired,
        CommandState::Cancelled,
    ];

    /// Final states never change again.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            CommandState::Queued
                | CommandState::Delivered
                | CommandState::Running
                | CommandState::AwaitingApproval
        )
    }

    /// Lower case, as messages and the `state` metric label write it.
    pub fn name(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Delivered => "delivered",
            CommandState::Running => "running",
            CommandState::Succeeded => "succeeded",
            CommandState::Failed => "failed",
            CommandState::Expired => "expired",
            CommandState::Cancelled => "cancelled",
            CommandState::AwaitingApproval => "awaiting_approval",
        }
    }

    /// The state a `tether.v1.CommandState` number names; `None` for `UNSPECIFIED` and numbers
    /// this gateway does not know.
    pub fn from_wire(n: i32) -> Option<CommandState> {
        Some(match v1::CommandState::try_from(n).ok()? {
            v1::CommandState::Unspecified => return None,
            v1::CommandState::Queued => CommandState::Queued,
            v1::CommandState::Delivered => CommandState::Delivered,
            v1::CommandState::Running => CommandState::Running,
            v1::CommandState::Succeeded => CommandState::Succeeded,
            v1::CommandState::Failed => CommandState::Failed,
            v1::CommandState::Expired => CommandState::Expired,
            v1::CommandState::Cancelled => CommandState::Cancelled,
            v1::CommandState::AwaitingApproval => CommandState::AwaitingApproval,
        })
    }

    /// The `tether.v1.CommandState` number (also how PostgreSQL's `state` column stores it).
    pub fn wire(self) -> i32 {
        let s = match self {
            CommandState::Queued => v1::CommandState::Queued,
            CommandState::Delivered => v1::CommandState::Delivered,
            CommandState::Running => v1::CommandState::Running,
            CommandState::Succeeded => v1::CommandState::Succeeded,
            CommandState::Failed => v1::CommandState::Failed,
            CommandState::Expired => v1::CommandState::Expired,
            CommandState::Cancelled => v1::CommandState::Cancelled,
            CommandState::AwaitingApproval => v1::CommandState::AwaitingApproval,
        };
        s as i32
    }
}

impl fmt::Display for CommandState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a command ended: what the handler wrote and said (or why the gateway gave up).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// At most `commands.max_output` bytes.
    pub output: Bytes,
    /// For people; at most 4 KiB (cut with a marker beyond).
    pub message: String,
}

impl Outcome {
    /// An outcome with no output: the gateway's own message (cancelled, expired, gave up).
    pub fn message(message: impl Into<String>) -> Outcome {
        Outcome {
            output: Bytes::new(),
            message: message.into(),
        }
    }
}

/// One command: what was submitted, where it is, and how it ended.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandRecord {
    /// Opaque, unguessable, sorting in submission order (assigned by the store).
    pub id: String,
    /// The agent that runs it.
    pub agent: AgentId,
    /// The handler the agent runs.
    pub kind: String,
    /// What the handler gets; shared, never copied, between states, writes and the delivery.
    pub payload: Bytes,
    /// The payload's type, for the handler.
    pub content_type: String,
    /// One command per `(agent, idempotency_key)` when not empty.
    pub idempotency_key: String,
    /// Commands of one agent with the same key run one after another.
    pub ordering_key: String,
    /// Where it is.
    pub state: CommandState,
    /// Deliveries started.
    pub attempts: u32,
    /// When it was submitted.
    pub created: Option<SystemTime>,
    /// The first delivery.
    pub delivered: Option<SystemTime>,
    /// The agent's first acknowledgement or progress.
    pub started: Option<SystemTime>,
    /// When it reached a final state.
    pub finished: Option<SystemTime>,
    /// When it expires if never delivered.
    pub expires: Option<SystemTime>,
    /// How it ended (final states).
    pub result: Option<Outcome>,
    /// The last progress lines of the latest attempt (see `push_progress`).
    pub progress: Vec<String>,
    /// Grows with every change (a transition, a progress line).
    pub version: u64,
    /// The trace context of the Submit call (`traceparent`, `tracestate`), handed to the
    /// agent with each delivery.
    pub trace_context: std::collections::BTreeMap<String, String>,
}

impl CommandRecord {
    /// A queued command, version 1, not stored yet (no id).
    pub fn queued(new: NewCommand, created: SystemTime, expires: Option<SystemTime>) -> Self {
        CommandRecord {
            id: String::new(),
            agent: new.agent,
            kind: new.kind,
            payload: new.payload,
            content_type: new.content_type,
            idempotency_key: new.idempotency_key,
            ordering_key: new.ordering_key,
            state: CommandState::Queued,
            attempts: 0,
            created: Some(created),
            delivered: None,
            started: None,
            finished: None,
            expires,
            result: None,
            progress: Vec::new(),
            version: 0,
            trace_context: new.trace_context,
        }
    }

    /// True once the command reached a final state.
    pub fn is_final(&self) -> bool {
        self.state.is_final()
    }

    /// The command as watchers and `List` see it: no payload (not even shared: the watchers'
    /// buffer must not keep payloads alive after their command finished), no output above
    /// [`EVENT_OUTPUT_MAX`].
    pub fn view(&self) -> CommandRecord {
        CommandRecord {
            id: self.id.clone(),
            agent: self.agent.clone(),
            kind: self.kind.clone(),
            payload: Bytes::new(),
            content_type: self.content_type.clone(),
            idempotency_key: self.idempotency_key.clone(),
            ordering_key: self.ordering_key.clone(),
            state: self.state,
            attempts: self.attempts,
            created: self.created,
            delivered: self.delivered,
            started: self.started,
            finished: self.finished,
            expires: self.expires,
            result: self.result.as_ref().map(|r| Outcome {
                output: if r.output.len() > EVENT_OUTPUT_MAX {
                    Bytes::new()
                } else {
                    r.output.clone()
                },
                message: r.message.clone(),
            }),
            progress: self.progress.clone(),
            version: self.version,
            trace_context: self.trace_context.clone(),
        }
    }
}

/// What a Submit asks for, once the API edge has parsed it.
#[derive(Clone, Debug)]
pub struct NewCommand {
    /// The agent (its tenant already checked against the caller's).
    pub agent: AgentId,
    /// The handler.
    pub kind: String,
    /// What the handler gets.
    pub payload: Bytes,
    /// The payload's type.
    pub content_type: String,
    /// One command per `(agent, idempotency_key)` when not empty.
    pub idempotency_key: String,
    /// Lane within the agent.
    pub ordering_key: String,
    /// Expires if not delivered within this (none: never).
    pub ttl: Option<Duration>,
    /// The Submit call's trace context (`traceparent`, `tracestate`; empty without one).
    pub trace_context: std::collections::BTreeMap<String, String>,
}

/// Unix milliseconds, as the stores index times (floor, also before 1970).
pub fn unix_ms(t: SystemTime) -> i64 {
    let ts = prost_types::Timestamp::from(t);
    ts.seconds * 1000 + i64::from(ts.nanos) / 1_000_000
}

/// The time `ms` Unix milliseconds name.
pub fn from_unix_ms(ms: i64) -> SystemTime {
    let abs = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        SystemTime::UNIX_EPOCH + abs
    } else {
        SystemTime::UNIX_EPOCH - abs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_maps_to_its_wire_number_and_back_and_only_the_four_ends_are_final() {
        for s in CommandState::ALL {
            assert_eq!(CommandState::from_wire(s.wire()), Some(s));
            // Succeeded..=Cancelled end a command; AwaitingApproval (8) came later, unfinished.
            assert_eq!(
                s.is_final(),
                (v1::CommandState::Succeeded as i32..=v1::CommandState::Cancelled as i32)
                    .contains(&s.wire()),
                "{s}"
            );
            assert_eq!(
                v1::CommandState::try_from(s.wire())
                    .unwrap()
                    .as_str_name()
                    .to_lowercase(),
                s.name()
            );
        }
        assert_eq!(CommandState::from_wire(0), None);
        assert_eq!(CommandState::from_wire(99), None);
    }

    #[test]
    fn a_view_shares_nothing_of_the_payload_and_leaves_out_a_large_output() {
        let new = NewCommand {
            agent: "t/a".parse().unwrap(),
            kind: "k".into(),
            payload: Bytes::from(vec![7; 1 << 20]),
            content_type: String::new(),
            idempotency_key: String::new(),
            ordering_key: String::new(),
            ttl: None,
            trace_context: Default::default(),
        };
        let mut c = CommandRecord::queued(new, SystemTime::now(), None);
        c.result = Some(Outcome {
            output: Bytes::from(vec![1; EVENT_OUTPUT_MAX + 1]),
            message: "m".into(),
        });
        let v = c.view();
        assert!(v.payload.is_empty());
        assert_eq!(v.result.as_ref().unwrap().output.len(), 0);
        assert_eq!(v.result.unwrap().message, "m");
        c.result = Some(Outcome {
            output: Bytes::from(vec![1; EVENT_OUTPUT_MAX]),
            message: String::new(),
        });
        assert_eq!(c.view().result.unwrap().output.len(), EVENT_OUTPUT_MAX);
    }

    #[test]
    fn unix_ms_round_trips_and_floors_before_1970() {
        for ms in [0, 1, 1_700_000_000_123, -1, -1500] {
            assert_eq!(unix_ms(from_unix_ms(ms)), ms);
        }
        let just_before = SystemTime::UNIX_EPOCH - Duration::from_micros(500);
        assert_eq!(unix_ms(just_before), -1);
    }
}
