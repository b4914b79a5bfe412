//! Wiring: live reload. On SIGHUP, and when the config file or the control file changes
//! (their content is compared every [`POLL`]: a Kubernetes ConfigMap volume swaps a symlink,
//! which no mtime of the file itself shows), the agent loads the config again through the one
//! merge point and applies what can change while running, without dropping a session or a
//! call in flight:
//!
//! - `services` and `default_service` (a service removed or changed ends its calls and streams;
//!   the others go on untouched),
//! - `paused` and `pause_reason`, `control_file` and the control file's content,
//! - `approvals.kinds` (a kind taken off the list lets its waiting commands run),
//! - `log.level`.
//!
//! A config that does not load (or a service that cannot be built) is refused as a whole: the
//! error, naming the key, is logged and written in the ledger, and the running config is kept.
//! Other keys that changed are named in the log as taking effect at the next restart.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_runtime::CancellationToken;

use crate::config::{AgentConfig, ControlFile};
use crate::error::AgentError;
use crate::ledger::{Entry, Ledger};
use crate::pause::{PauseSwitch, Source};
use crate::relay::Services;

/// How often the config file and the control file are read for changes.
pub const POLL: Duration = Duration::from_secs(1);

/// What a reload changes.
#[derive(Debug)]
pub struct Control {
    services: Arc<Services>,
    pause: Arc<PauseSwitch>,
    approvals: Arc<crate::approvals::Approvals>,
    info: Arc<crate::info::Info>,
    ledger: Ledger,
    current: Mutex<AgentConfig>,
    /// The control file's content as last read (`Some(None)`: it could not be read); `None`
    /// before the first read.
    control_text: Mutex<Option<Option<String>>>,
}

impl Control {
    pub(crate) fn new(
        cfg: &AgentConfig,
        services: Arc<Services>,
        pause: Arc<PauseSwitch>,
        approvals: Arc<crate::approvals::Approvals>,
        info: Arc<crate::info::Info>,
        ledger: Ledger,
    ) -> Control {
        Control {
            services,
            pause,
            approvals,
            info,
            ledger,
            current: Mutex::new(cfg.clone()),
            control_text: Mutex::new(None),
        }
    }

    /// The kill switch.
    pub fn pause(&self) -> &Arc<PauseSwitch> {
        &self.pause
    }

    /// The commands waiting for approval, and the decisions.
    pub fn approvals(&self) -> &Arc<crate::approvals::Approvals> {
        &self.approvals
    }

    /// Sets the config's own switch from `cfg` (at start and on reload).
    pub(crate) fn apply_pause(&self, cfg: &AgentConfig) {
        let want = cfg.paused.then(|| cfg.pause_reason.clone());
        if let Err(e) = self.pause.set(Source::Config, want) {
            tracing::error!(error = %e, "could not apply `paused`");
        }
    }

    /// Reads the control file (if one is configured) and applies it when its content
    /// changed. An unreadable or invalid file is refused, naming it, and the last state kept.
    pub fn poll_control_file(&self) -> Result<(), AgentError> {
        let path = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .control_file
            .clone();
        let Some(path) = path else {
            if self
                .pause
                .switches()
                .iter()
                .any(|(s, _)| *s == Source::ControlFile)
            {
                let _ = self.pause.set(Source::ControlFile, None);
            }
            return Ok(());
        };
        let text = std::fs::read_to_string(&path).ok();
        {
            let mut last = self.control_text.lock().unwrap_or_else(|e| e.into_inner());
            if last.as_ref() == Some(&text) {
                return Ok(());
            }
            *last = Some(text);
        }
        if !path.exists() {
            // No file is no pause from it (the chart always mounts one); a file that exists
            // and does not parse is refused.
            tracing::warn!(path = %path.display(), "control_file does not exist: it pauses nothing until it does");
            self.pause
                .set(Source::ControlFile, None)
                .map_err(|source| AgentError::Io {
                    what: "applying the control file".into(),
                    source,
                })?;
            return Ok(());
        }
        let c = ControlFile::read(&path)?;
        let want = c.paused.then_some(c.reason);
        self.pause
            .set(Source::ControlFile, want)
            .map_err(|source| AgentError::Io {
                what: "applying the control file".into(),
                source,
            })?;
        Ok(())
    }

    /// Applies `new` (already loaded and validated): what changed, by key. On an error
    /// nothing changed.
    pub fn apply(&self, new: AgentConfig) -> Result<Vec<String>, AgentError> {
        let mut changed = self.services.reload(&new)?;
        let old = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if old.paused != new.paused || old.pause_reason != new.pause_reason {
            changed.push("paused".into());
            self.apply_pause(&new);
        }
        if old.control_file != new.control_file {
            changed.push("control_file".into());
        }
        if old.approvals != new.approvals {
            changed.push("approvals.kinds".into());
            self.approvals.set_kinds(&new.approvals.kinds);
        }
        if old.log.level != new.log.level {
            match tether_runtime::logging::set_level(&new.log.level) {
                Ok(()) => changed.push("log.level".into()),
                Err(e) => tracing::error!(error = %e, "log.level could not be applied"),
            }
        }
        let fixed = fixed_changes(&old, &new);
        if !fixed.is_empty() {
            tracing::warn!(keys = ?fixed, "these keys changed in the config; they take effect at the next restart");
        }
        *self.info.catalog.lock().unwrap_or_else(|e| e.into_inner()) = self.services.catalog();
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = new;
        if old.control_file
            != self
                .current
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .control_file
        {
            *self.control_text.lock().unwrap_or_else(|e| e.into_inner()) = None;
            if let Err(e) = self.poll_control_file() {
                tracing::error!("the control file is refused, its last state kept: {e}");
            }
        }
        if !changed.is_empty() {
            tracing::info!(changed = ?changed, "config reloaded");
            self.ledger.record(Entry::Reload {
                changed: changed.clone(),
            });
        }
        Ok(changed)
    }

    /// Logs and records a refused config.
    pub fn refuse(&self, error: &dyn std::fmt::Display) {
        tracing::error!("config reload refused, the running config is kept: {error}");
        metrics::counter!("tether_agent_config_reloads_refused_total").increment(1);
        self.ledger.record(Entry::ReloadRefused {
            error: error.to_string(),
        });
    }
}

/// The keys that differ between `old` and `new` and are applied only at start.
fn fixed_changes(old: &AgentConfig, new: &AgentConfig) -> Vec<String> {
    let strip = |c: &AgentConfig| {
        let mut c = c.clone();
        c.services.clear();
        c.default_service.clear();
        c.paused = false;
        c.pause_reason.clear();
        c.control_file = None;
        c.approvals = Default::default();
        c.log.level.clear();
        toml::Value::try_from(&c).ok()
    };
    let (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) = (strip(old), strip(new))
    else {
        return Vec::new();
    };
    let mut keys: Vec<String> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .chain(b.keys().filter(|k| !a.contains_key(*k)).cloned())
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Where the config came from, to load it again.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    /// The config file.
    pub file: PathBuf,
    /// The `--set` flags given at start.
    pub sets: Vec<String>,
}

/// Reloads on SIGHUP and on changes of the config file or the control file until
/// `shutdown`.
pub async fn watch(control: Arc<Control>, source: ConfigSource, shutdown: CancellationToken) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: the config is reloaded only when its file changes");
            None
        }
    };
    let mut last = std::fs::read(&source.file).ok();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        if let Err(e) = control.poll_control_file() {
            // Logged once per change of the file: the content is remembered.
            tracing::error!("the control file is refused, its last state kept: {e}");
        }
        let now = std::fs::read(&source.file).ok();
        if !forced && now == last {
            continue;
        }
        last = now;
        if forced {
            tracing::info!(file = %source.file.display(), "SIGHUP: reloading the config");
        }
        let file = source.file.clone();
        let sets = source.sets.clone();
        let loaded =
            tokio::task::spawn_blocking(move || AgentConfig::load(Some(&file), &sets)).await;
        match loaded {
            Ok(Ok(cfg)) => {
                if let Err(e) = control.apply(cfg) {
                    control.refuse(&e);
                }
            }
            Ok(Err(e)) => control.refuse(&e),
            Err(_) => {}
        }
    }
}
