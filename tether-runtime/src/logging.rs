//! The `tracing` subscriber: human text or JSON lines, filtered by `RUST_LOG` or a level; and
//! [`LogThrottle`], for lines a peer could make the process write as fast as it likes.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?} is neither text nor json")),
        }
    }
}

/// The `[log]` section both binaries share.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(skip_serializing)]
    pub format: LogFormat,
    /// A tracing filter (`info`, `tether_gateway=debug`); `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Installs the global subscriber (once; later calls are ignored, which suits tests).
/// `RUST_LOG` wins over `level` when set (either way quinn's socket layer is quiet, see
/// [`default_filter`]). Colours only on a terminal: a log file or a
/// collector gets plain text.
pub fn init(format: LogFormat, level: &str) {
    use std::io::IsTerminal as _;
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| level.to_owned());
    let filter = EnvFilter::new(default_filter(&spec));
    let ansi = std::io::stderr().is_terminal();
    // A log line that cannot be written (stderr a pipe whose reader is gone) is dropped:
    // tracing-subscriber would report it with `eprintln!`, which panics on that same broken
    // pipe, inside whichever task logged (the signal handler's: SIGTERM then did nothing).
    // The filter is reloadable ([`set_level`]).
    let reload: Reload = match format {
        LogFormat::Text => {
            let builder = tracing_subscriber::fmt()
                .with_ansi(ansi)
                .log_internal_errors(false)
                .with_writer(std::io::stderr)
                .with_env_filter(filter)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_err() {
                return;
            }
            Box::new(move |level: &str| {
                let f = EnvFilter::try_new(default_filter(level)).map_err(|e| e.to_string())?;
                handle.reload(f).map_err(|e| e.to_string())
            })
        }
        LogFormat::Json => {
            let builder = tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_ansi(ansi)
                .log_internal_errors(false)
                .with_writer(std::io::stderr)
                .with_env_filter(filter)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_err() {
                return;
            }
            Box::new(move |level: &str| {
                let f = EnvFilter::try_new(default_filter(level)).map_err(|e| e.to_string())?;
                handle.reload(f).map_err(|e| e.to_string())
            })
        }
    };
    let _ = RELOAD.set(reload);
}

type Reload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
static RELOAD: std::sync::OnceLock<Reload> = std::sync::OnceLock::new();

/// Replaces the level filter [`init`] installed (a reloaded `log.level`), unless `RUST_LOG`
/// is set (it wins, as at start). Does nothing when `init` did not install the subscriber.
pub fn set_level(level: &str) -> Result<(), String> {
    if std::env::var("RUST_LOG").is_ok_and(|s| !s.trim().is_empty()) {
        return Ok(());
    }
    match RELOAD.get() {
        Some(reload) => reload(level),
        None => Ok(()),
    }
}

/// Whether `level` is a filter [`init`] and [`set_level`] accept.
pub fn check_level(level: &str) -> Result<(), String> {
    EnvFilter::try_new(default_filter(level))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `level` as a filter, with quinn's socket layer (`quinn_udp`) at `error` unless `level`
/// names it: its warnings (`sendmsg error: … Connection refused`, one per ICMP error) repeat
/// what the agent and gateway report themselves in words, once per dial.
fn default_filter(level: &str) -> String {
    if level.contains("quinn_udp") {
        level.to_owned()
    } else {
        format!("{level},quinn_udp=error")
    }
}

/// Lets one log line through per interval and counts the ones held back, for events a peer
/// or a failing resource can repeat at any rate (a refusal per connection, an `accept` that
/// keeps failing): the log says it happened and how often, and cannot fill a disk.
#[derive(Debug)]
pub struct LogThrottle {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl LogThrottle {
    /// At most one line per `every`.
    pub fn new(every: Duration) -> LogThrottle {
        LogThrottle {
            every,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(n)`: write the line now, saying that `n` were held back since the previous one;
    /// `None`: hold this one back.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quinn_udp_warnings_are_off_unless_named() {
        assert_eq!(default_filter("info"), "info,quinn_udp=error");
        assert_eq!(default_filter("quinn_udp=warn"), "quinn_udp=warn");
    }

    #[test]
    fn one_line_per_interval_and_the_count_of_the_rest() {
        let mut t = LogThrottle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.allow(t0), Some(0));
        for s in 1..10 {
            assert_eq!(t.allow(t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(t.allow(t0 + Duration::from_secs(10)), Some(9));
        assert_eq!(t.allow(t0 + Duration::from_secs(11)), None);
        assert_eq!(t.allow(t0 + Duration::from_secs(30)), Some(1));
    }
}
