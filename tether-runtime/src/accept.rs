//! Transport layer: taking connections off a TCP listener without spinning when `accept` fails.
//!
//! `accept(2)` fails for two kinds of reasons. A connection that went away before it was taken
//! (`ECONNABORTED`, or a network error Linux reports on the new socket) concerns that
//! connection only: the next one is taken at once. A process out of file descriptors
//! (`EMFILE`, `ENFILE`) or kernel memory (`ENOBUFS`, `ENOMEM`) is not helped by retrying: the
//! pending connection stays queued, the listener stays readable, and a loop that retries at
//! once runs at 100% CPU and logs every failure (seen on the northbound port: 2.7 GB of log in
//! a minute). So after such a failure [`Acceptor`] waits, [`FIRST_PAUSE`] doubling up to
//! [`MAX_PAUSE`], and logs at most one line per [`LOG_EVERY`] with the number of failures
//! since the previous line; a connection taken again resets both and says so.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use tokio::net::{TcpListener, TcpStream};

use crate::logging::LogThrottle;

/// The first pause after a failure that retrying at once cannot cure.
pub const FIRST_PAUSE: Duration = Duration::from_millis(10);

/// The longest pause: a listener out of file descriptors takes a connection again within this
/// of one being freed.
pub const MAX_PAUSE: Duration = Duration::from_secs(1);

/// At most one warning per listener this often while `accept` keeps failing.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Failures retried at once in a row before even those are paced: an error this module does
/// not know to be transient must not spin either.
const MAX_IMMEDIATE: u32 = 64;

/// A TCP listener whose [`accept`](Acceptor::accept) never fails: see the module docs.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    what: &'static str,
    hint: &'static str,
    pause: Duration,
    immediate: u32,
    failures: u64,
    log: LogThrottle,
}

impl Acceptor {
    /// Takes connections off `listener`; `what` names it in logs ("northbound", "ops", ...).
    pub fn new(listener: TcpListener, what: &'static str) -> Acceptor {
        Acceptor {
            listener,
            what,
            hint: "raise the process's open-file limit (ulimit -n, systemd LimitNOFILE)",
            pause: FIRST_PAUSE,
            immediate: 0,
            failures: 0,
            log: LogThrottle::new(LOG_EVERY),
        }
    }

    /// What the warning tells the operator to do when file descriptors run out.
    pub fn with_hint(mut self, hint: &'static str) -> Acceptor {
        self.hint = hint;
        self
    }

    /// The listener's address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection. Cancel-safe: dropped while pausing, the next call pauses again
    /// (the pause only grows until a connection is taken).
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    if self.failures > 0 {
                        tracing::info!(
                            listener = self.what,
                            failures = self.failures,
                            "accepting connections again"
                        );
                    }
                    self.pause = FIRST_PAUSE;
                    self.immediate = 0;
                    self.failures = 0;
                    self.log = LogThrottle::new(LOG_EVERY);
                    return accepted;
                }
                Err(e) => {
                    self.failures += 1;
                    let starved = out_of_resources(&e);
                    if !starved && self.immediate < MAX_IMMEDIATE {
                        self.immediate += 1;
                        tracing::debug!(listener = self.what, error = %e,
                            "a connection went away before it was accepted");
                        continue;
                    }
                    if let Some(held_back) = self.log.allow(Instant::now()) {
                        let hint = if starved {
                            self.hint
                        } else {
                            "retrying with a pause"
                        };
                        tracing::warn!(listener = self.what, error = %e, pause = ?self.pause,
                            failures_since_last_warning = held_back,
                            "accepting a connection failed: {hint}");
                    }
                    tokio::time::sleep(self.pause).await;
                    self.pause = (self.pause * 2).min(MAX_PAUSE);
                }
            }
        }
    }
}

/// True for the failures retrying cannot cure until something else frees a resource.
fn out_of_resources(e: &std::io::Error) -> bool {
    e.raw_os_error().is_some_and(|code| {
        [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM]
            .iter()
            .any(|errno| *errno as i32 == code)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_resource_exhaustion_is_paced_at_once() {
        for errno in [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM] {
            assert!(out_of_resources(&std::io::Error::from_raw_os_error(
                errno as i32
            )));
        }
        for errno in [Errno::ECONNABORTED, Errno::EPROTO, Errno::ENETDOWN] {
            assert!(!out_of_resources(&std::io::Error::from_raw_os_error(
                errno as i32
            )));
        }
    }
}
