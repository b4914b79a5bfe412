//! Backend layer: a [`CommandRecord`]'s bytes at rest, in both stores (the embedded redb file
//! and PostgreSQL's `record` column and feed events): the `tether.v1.Command` protobuf, so fields
//! added later load from older records, and an older gateway reads a newer one's.

use std::time::SystemTime;

use bytes::Bytes;
use prost::Message as _;
use tether_api::v1;

use super::StoreError;
use crate::commands::record::{CommandRecord, CommandState, Outcome};

/// Which large parts of a record its bytes carry.
#[derive(Clone, Copy, Debug)]
pub struct Parts {
    /// The payload.
    pub payload: bool,
    /// The result's output (its message always goes).
    pub output: bool,
}

fn ts(t: Option<SystemTime>) -> Option<prost_types::Timestamp> {
    t.map(Into::into)
}

/// The record's bytes, with the parts asked for.
pub fn encode(c: &CommandRecord, parts: Parts) -> Vec<u8> {
    v1::Command {
        id: c.id.clone(),
        agent: c.agent.to_string(),
        kind: c.kind.clone(),
        payload: if parts.payload {
            c.payload.to_vec()
        } else {
            Vec::new()
        },
        content_type: c.content_type.clone(),
        idempotency_key: c.idempotency_key.clone(),
        ordering_key: c.ordering_key.clone(),
        state: c.state.wire(),
        attempts: c.attempts,
        created: ts(c.created),
        delivered: ts(c.delivered),
        started: ts(c.started),
        finished: ts(c.finished),
        expires: ts(c.expires),
        result: c.result.as_ref().map(|r| v1::CommandResult {
            output: if parts.output {
                r.output.to_vec()
            } else {
                Vec::new()
            },
            message: r.message.clone(),
        }),
        progress: c.progress.clone(),
        version: c.version,
        trace_context: c
            .trace_context
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
    .encode_to_vec()
}

/// The record `bytes` hold (stored under `id`: named when they are corrupt).
pub fn decode(id: &str, bytes: &[u8]) -> Result<CommandRecord, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        id: id.to_owned(),
        detail,
    };
    let c = v1::Command::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    let time = |field: &str, t: Option<prost_types::Timestamp>| {
        t.map(SystemTime::try_from)
            .transpose()
            .map_err(|e| corrupt(format!("{field}: {e}")))
    };
    Ok(CommandRecord {
        agent: c
            .agent
            .parse()
            .map_err(|e| corrupt(format!("agent {:?}: {e}", c.agent)))?,
        state: CommandState::from_wire(c.state)
            .ok_or_else(|| corrupt(format!("state {} is not a command state", c.state)))?,
        created: time("created", c.created)?,
        delivered: time("delivered", c.delivered)?,
        started: time("started", c.started)?,
        finished: time("finished", c.finished)?,
        expires: time("expires", c.expires)?,
        id: c.id,
        kind: c.kind,
        payload: Bytes::from(c.payload),
        content_type: c.content_type,
        idempotency_key: c.idempotency_key,
        ordering_key: c.ordering_key,
        attempts: c.attempts,
        result: c.result.map(|r| Outcome {
            output: Bytes::from(r.output),
            message: r.message,
        }),
        progress: c.progress,
        version: c.version,
        trace_context: c.trace_context.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn full() -> CommandRecord {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        CommandRecord {
            id: "t0123".into(),
            agent: "acme/eu-1".parse().unwrap(),
            kind: "deploy".into(),
            payload: Bytes::from_static(b"payload"),
            content_type: "application/json".into(),
            idempotency_key: "k".into(),
            ordering_key: "o".into(),
            state: CommandState::Succeeded,
            attempts: 2,
            created: Some(t),
            delivered: Some(t + Duration::from_millis(1)),
            started: Some(t + Duration::from_millis(2)),
            finished: Some(t + Duration::from_millis(3)),
            expires: Some(t + Duration::from_secs(60)),
            result: Some(Outcome {
                output: Bytes::from_static(b"out"),
                message: "ok".into(),
            }),
            progress: vec!["a".into(), "b".into()],
            version: 5,
            trace_context: [(
                "traceparent".to_owned(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
            )]
            .into(),
        }
    }

    #[test]
    fn a_record_round_trips_with_the_parts_asked_for() {
        let c = full();
        let all = Parts {
            payload: true,
            output: true,
        };
        assert_eq!(decode(&c.id, &encode(&c, all)).unwrap(), c);
        let bare = decode(
            &c.id,
            &encode(
                &c,
                Parts {
                    payload: false,
                    output: false,
                },
            ),
        )
        .unwrap();
        assert!(bare.payload.is_empty());
        assert!(bare.result.as_ref().unwrap().output.is_empty());
        assert_eq!(bare.result.unwrap().message, "ok");
    }

    #[test]
    fn bytes_written_as_the_api_message_load_and_bad_ones_name_the_record() {
        // What gateways before the domain record stored: the message itself.
        let old = v1::Command {
            id: "x".into(),
            agent: "acme/eu-1".into(),
            state: v1::CommandState::Queued as i32,
            ..Default::default()
        };
        let c = decode("x", &old.encode_to_vec()).unwrap();
        assert_eq!((c.state, c.agent.tenant()), (CommandState::Queued, "acme"));
        for bad in [
            v1::Command {
                agent: "no-slash".into(),
                state: 1,
                ..Default::default()
            },
            v1::Command {
                agent: "acme/eu-1".into(),
                state: 0,
                ..Default::default()
            },
        ] {
            match decode("bad", &bad.encode_to_vec()) {
                Err(StoreError::Corrupt { id, .. }) => assert_eq!(id, "bad"),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            decode("junk", &[0xff, 0xff, 0xff]),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
