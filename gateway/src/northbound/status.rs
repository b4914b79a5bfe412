//! The one place where the gateway's typed errors become gRPC statuses, for every northbound
//! service, the agent-facing `Enroll` and the renewal answers alike. The caller's mistakes are
//! `INVALID_ARGUMENT`, `NOT_FOUND`, `FAILED_PRECONDITION` or `PERMISSION_DENIED`; limits are
//! `RESOURCE_EXHAUSTED`; what retrying may fix on the gateway's or the agent's side is
//! `UNAVAILABLE` (or `DEADLINE_EXCEEDED`); a failure of the gateway itself is `INTERNAL`. The
//! message is the error's own text, which says what failed and what to do.

use tonic::Status;

use crate::commands::CommandError;
use crate::identity::callers::CallerRevokeError;
use crate::identity::enrollment::EnrollError;
use crate::identity::revocation::RevokeError;
use crate::peer::forwarder::ForwardError;
use crate::relay::RelayError;

impl From<CommandError> for Status {
    fn from(e: CommandError) -> Status {
        let msg = e.to_string();
        match e {
            CommandError::UnknownAgent(_) | CommandError::NotFound(_) => Status::not_found(msg),
            CommandError::Invalid(_) | CommandError::PayloadTooLarge { .. } => {
                Status::invalid_argument(msg)
            }
            CommandError::TooLate { .. } => Status::failed_precondition(msg),
            CommandError::TooManyPending { .. }
            | CommandError::TooManyWatches { .. }
            | CommandError::WatchLagged { .. } => Status::resource_exhausted(msg),
            CommandError::Store(_) | CommandError::Unavailable(_) => Status::unavailable(msg),
        }
    }
}

impl From<&EnrollError> for Status {
    fn from(e: &EnrollError) -> Status {
        let msg = e.to_string();
        match e {
            EnrollError::Disabled => Status::failed_precondition(msg),
            EnrollError::BadIdentity(_) | EnrollError::BadTtl { .. } | EnrollError::Csr(_) => {
                Status::invalid_argument(msg)
            }
            EnrollError::Token(_) => Status::unauthenticated(msg),
            EnrollError::Revoked(_) => Status::permission_denied(msg),
            EnrollError::Expired(_) => Status::unauthenticated(msg),
            EnrollError::TooSoon(_)
            | EnrollError::Busy(_)
            | EnrollError::TooManyPending(_)
            | EnrollError::CreationRate(_) => Status::resource_exhausted(msg),
            EnrollError::Store(_) => Status::unavailable(msg),
            EnrollError::Issue(_) => Status::internal(msg),
        }
    }
}

impl From<EnrollError> for Status {
    fn from(e: EnrollError) -> Status {
        Status::from(&e)
    }
}

impl From<RevokeError> for Status {
    fn from(e: RevokeError) -> Status {
        let msg = e.to_string();
        match e {
            RevokeError::UnknownAgent(_) => Status::not_found(msg),
            RevokeError::ReasonTooLong(_) => Status::invalid_argument(msg),
            RevokeError::Store(_) => Status::unavailable(msg),
        }
    }
}

impl From<CallerRevokeError> for Status {
    fn from(e: CallerRevokeError) -> Status {
        let msg = e.to_string();
        match e {
            CallerRevokeError::Nothing | CallerRevokeError::Invalid(_) => {
                Status::invalid_argument(msg)
            }
            CallerRevokeError::Store(_) => Status::unavailable(msg),
        }
    }
}

impl From<RelayError> for Status {
    fn from(e: RelayError) -> Status {
        let msg = e.to_string();
        match e {
            RelayError::NoAgent
            | RelayError::AgentNotText
            | RelayError::BadAgent(_)
            | RelayError::ServiceNotText => Status::invalid_argument(msg),
            RelayError::UnknownAgent(_) => Status::not_found(msg),
            RelayError::NotConnected(_)
            | RelayError::Moving(_)
            | RelayError::ConnectionLost { .. }
            | RelayError::Header { .. } => Status::unavailable(msg),
            RelayError::TooManyStreams { .. } | RelayError::NoFreeStream(_) => {
                Status::resource_exhausted(msg)
            }
            RelayError::DeadlineWaitingForStream(_) => Status::deadline_exceeded(msg),
            RelayError::Forward(e) => match e {
                ForwardError::NoSession { known: false, .. } => Status::not_found(msg),
                ForwardError::Busy { .. } => Status::resource_exhausted(msg),
                ForwardError::Deadline(_) => Status::deadline_exceeded(msg),
                _ => Status::unavailable(msg),
            },
        }
    }
}
