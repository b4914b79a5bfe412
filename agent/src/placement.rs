//! Session layer: where the sessions to one gateway address should be, as pure decisions the
//! supervisor ([`crate::supervisor`]) acts on.
//!
//! Behind one load-balanced address an agent keeps `connections` sessions on distinct gateway
//! replicas (each `Welcome` names its replica and how many are live); with several addresses,
//! one session each. A session is replaced make-before-break when the gateway asks (`GoAway`:
//! then never on the replica that asked), when the agent's certificate was renewed, when the
//! session is wedged, or when QUIC works again after the TCP fallback (those may land on the
//! same replica). A new session that lands on a replica the agent must avoid is let go and
//! dialed again; the gateway turns most of those away itself, before registering them, since
//! each dial names the replicas to avoid in its `Hello`.

use tether_runtime::transport::Transport;

/// Why a session wants a replacement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replace {
    /// The gateway sent `GoAway`; `avoid`: it named its replica, so the replacement goes to
    /// another.
    Away {
        /// Never on this session's replica.
        avoid: bool,
    },
    /// The certificate it presented was renewed.
    Renewal,
    /// The gateway stopped probing it.
    Wedged,
    /// It runs on the TCP fallback and QUIC works again.
    ToQuic,
}

/// A live session the agent keeps (established, not being retired).
#[derive(Clone, Debug)]
pub struct Held {
    /// The supervisor's attempt id.
    pub id: u64,
    /// Its replica (`Welcome.replica_id`; empty from an older gateway).
    pub replica: String,
    /// Its transport.
    pub transport: Transport,
    /// Whether, and why, it wants a replacement.
    pub replace: Option<Replace>,
}

/// What a dial is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// One more session, towards the target count.
    Fill,
    /// The replacement of the session with this id.
    Replace(u64),
}

/// What to do with a session that was just established.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Landing {
    /// Keep it, and retire the session it replaces (if that is still there).
    Keep {
        /// The session to retire.
        retire: Option<u64>,
    },
    /// It is on a replica the agent must avoid: let it go and dial again.
    Duplicate,
}

/// How many sessions to keep: `connections` behind a single address, as many as there are
/// live replicas at most (`live` 0: the gateway did not say, so one); one per address when
/// the agent has several.
pub fn target(single_address: bool, connections: usize, live: u32) -> usize {
    if !single_address {
        return 1;
    }
    connections.min(live.max(1) as usize).max(1)
}

/// The next dial to make, if any: a replacement first (oldest first), then one more session
/// while fewer than `target` are held.
pub fn next(held: &[Held], target: usize) -> Option<Purpose> {
    if let Some(h) = held
        .iter()
        .filter(|h| h.replace.is_some())
        .min_by_key(|h| h.id)
    {
        return Some(Purpose::Replace(h.id));
    }
    (held.len() < target).then_some(Purpose::Fill)
}

/// The replicas a dial for `purpose` must not land on: those of the sessions held, but the
/// one being replaced when it may be replaced on its own replica.
pub fn avoid(held: &[Held], purpose: Purpose) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for h in held {
        let same_replica_ok = matches!(purpose, Purpose::Replace(id) if id == h.id)
            && !matches!(h.replace, Some(Replace::Away { avoid: true }));
        if h.replica.is_empty() || same_replica_ok || out.contains(&h.replica) {
            continue;
        }
        out.push(h.replica.clone());
    }
    out
}

/// A dial for `purpose` established a session on `replica`.
pub fn land(held: &[Held], purpose: Purpose, replica: &str) -> Landing {
    let replaced = match purpose {
        Purpose::Replace(id) => held.iter().find(|h| h.id == id).map(|h| h.id),
        Purpose::Fill => None,
    };
    // An older gateway names no replica: nothing to compare, the session is kept.
    if replica.is_empty() {
        return Landing::Keep { retire: replaced };
    }
    if avoid(held, purpose).iter().any(|r| r == replica) {
        return Landing::Duplicate;
    }
    Landing::Keep { retire: replaced }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(id: u64, replica: &str, replace: Option<Replace>) -> Held {
        Held {
            id,
            replica: replica.into(),
            transport: Transport::Quic,
            replace,
        }
    }

    #[test]
    fn the_target_is_connections_within_the_live_replicas_behind_one_address() {
        assert_eq!(target(true, 2, 3), 2);
        assert_eq!(target(true, 2, 1), 1);
        assert_eq!(target(true, 3, 2), 2);
        assert_eq!(target(true, 2, 0), 1, "an older gateway says nothing");
        assert_eq!(
            target(false, 2, 3),
            1,
            "several addresses: one session each"
        );
        assert_eq!(target(true, 1, 5), 1);
    }

    #[test]
    fn a_second_session_goes_to_another_replica() {
        let h = [held(1, "r1#1", None)];
        assert_eq!(next(&h, 2), Some(Purpose::Fill));
        assert_eq!(avoid(&h, Purpose::Fill), ["r1#1"]);
        assert_eq!(land(&h, Purpose::Fill, "r1#1"), Landing::Duplicate);
        assert_eq!(
            land(&h, Purpose::Fill, "r2#1"),
            Landing::Keep { retire: None }
        );
        // Another process of the same name is another replica (a restart).
        assert_eq!(
            land(&h, Purpose::Fill, "r1#2"),
            Landing::Keep { retire: None }
        );
        let two = [held(1, "r1#1", None), held(2, "r2#1", None)];
        assert_eq!(next(&two, 2), None);
    }

    #[test]
    fn a_go_away_replacement_avoids_the_replica_that_asked_and_the_others_held() {
        let h = [
            held(1, "r1#1", Some(Replace::Away { avoid: true })),
            held(2, "r2#1", None),
        ];
        assert_eq!(next(&h, 2), Some(Purpose::Replace(1)));
        let mut a = avoid(&h, Purpose::Replace(1));
        a.sort();
        assert_eq!(a, ["r1#1", "r2#1"]);
        assert_eq!(land(&h, Purpose::Replace(1), "r1#1"), Landing::Duplicate);
        assert_eq!(land(&h, Purpose::Replace(1), "r2#1"), Landing::Duplicate);
        assert_eq!(
            land(&h, Purpose::Replace(1), "r3#1"),
            Landing::Keep { retire: Some(1) }
        );
        // A GoAway without a replica to avoid (an older gateway) may land anywhere but on the
        // other sessions' replicas.
        let h = [
            held(1, "r1#1", Some(Replace::Away { avoid: false })),
            held(2, "r2#1", None),
        ];
        assert_eq!(avoid(&h, Purpose::Replace(1)), ["r2#1"]);
        assert_eq!(
            land(&h, Purpose::Replace(1), "r1#1"),
            Landing::Keep { retire: Some(1) }
        );
    }

    #[test]
    fn a_renewal_or_a_move_to_quic_may_land_on_the_same_replica() {
        for why in [Replace::Renewal, Replace::Wedged, Replace::ToQuic] {
            let h = [held(1, "r1#1", Some(why)), held(2, "r2#1", None)];
            assert_eq!(avoid(&h, Purpose::Replace(1)), ["r2#1"]);
            assert_eq!(
                land(&h, Purpose::Replace(1), "r1#1"),
                Landing::Keep { retire: Some(1) }
            );
        }
    }

    #[test]
    fn a_replacement_whose_session_ended_meanwhile_fills_its_place() {
        let h = [held(2, "r2#1", None)];
        assert_eq!(
            land(&h, Purpose::Replace(1), "r3#1"),
            Landing::Keep { retire: None }
        );
    }

    #[test]
    fn replacements_come_first_oldest_first() {
        let h = [
            held(5, "a", Some(Replace::Renewal)),
            held(3, "b", Some(Replace::Renewal)),
        ];
        assert_eq!(next(&h, 5), Some(Purpose::Replace(3)));
    }

    #[test]
    fn an_older_gateway_names_no_replica_and_its_sessions_are_kept_as_before() {
        let h = [held(1, "", Some(Replace::Away { avoid: false }))];
        assert!(avoid(&h, Purpose::Replace(1)).is_empty());
        assert_eq!(
            land(&h, Purpose::Replace(1), ""),
            Landing::Keep { retire: Some(1) }
        );
    }
}
