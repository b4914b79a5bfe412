//! Feature layer: the kill switch. The customer pauses the control plane's access without
//! uninstalling: the sessions stay up (so the vendor sees the state and the reason), every
//! relayed call and TCP stream is refused with `FAILED_PRECONDITION` ("paused by the data
//! plane's owner: <reason>"), the open ones are ended, and command deliveries are held
//! unacknowledged, so the commands stay with the gateway until the agent resumes.
//!
//! Three switches, any of which pauses: `paused` in the config file ([`Source::Config`]), the
//! control file the chart mounts from a ConfigMap ([`Source::ControlFile`]), and `tether-agent
//! pause` on the pod ([`Source::Ops`], through the loopback ops endpoint; kept in
//! `state_dir/paused.json`, so a restart does not resume). Turning one off leaves the others:
//! `tether-agent resume` cannot undo a pause written in the config or the ConfigMap. The
//! gateway has no way to turn any of them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::ledger::{Entry, Ledger};

/// The file under `state_dir` holding a pause made with `tether-agent pause`.
pub const PAUSED_FILE: &str = "paused.json";

/// The message every refused call and stream carries.
pub fn refusal(reason: &str) -> String {
    format!("paused by the data plane's owner: {reason}")
}

/// A switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `tether-agent pause` (the ops endpoint).
    Ops,
    /// `paused` in the config file.
    Config,
    /// `control_file`.
    ControlFile,
}

impl Source {
    /// As written in the ledger and `/readyz`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Ops => "ops",
            Source::Config => "config",
            Source::ControlFile => "control_file",
        }
    }

    /// What turns it off, for people.
    pub fn how_to_resume(self) -> &'static str {
        match self {
            Source::Ops => "`tether-agent resume` on the agent's pod",
            Source::Config => "`paused = false` in the agent's config file (key `paused`)",
            Source::ControlFile => {
                "`paused = false` in the control file (`control_file`; the chart's ConfigMap <release>-control)"
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    reason: String,
}

/// The switches, and the effective state as a watch: relay and executor subscribe to it.
#[derive(Debug)]
pub struct PauseSwitch {
    on: Mutex<BTreeMap<Source, String>>,
    tx: watch::Sender<Option<Arc<str>>>,
    persist: Option<PathBuf>,
    ledger: Ledger,
}

impl PauseSwitch {
    /// Not paused, unless `state_dir` holds a pause made with `tether-agent pause`.
    pub fn new(state_dir: Option<&std::path::Path>, ledger: Ledger) -> PauseSwitch {
        let persist = state_dir.map(|d| d.join(PAUSED_FILE));
        let mut on = BTreeMap::new();
        if let Some(p) = &persist
            && let Ok(text) = std::fs::read_to_string(p)
        {
            match serde_json::from_str::<Persisted>(&text) {
                Ok(v) => {
                    on.insert(Source::Ops, v.reason);
                }
                // Unreadable: the safe side is paused.
                Err(e) => {
                    on.insert(
                        Source::Ops,
                        format!("{} is unreadable ({e}); paused to be safe", p.display()),
                    );
                }
            }
        }
        let effective = effective(&on);
        if let Some(r) = &effective {
            tracing::warn!(reason = %r, "the agent starts paused (tether-agent pause): every relayed call and stream is refused until `tether-agent resume`");
        }
        PauseSwitch {
            on: Mutex::new(on),
            tx: watch::channel(effective).0,
            persist,
            ledger,
        }
    }

    /// The reason, while paused.
    pub fn reason(&self) -> Option<Arc<str>> {
        self.tx.borrow().clone()
    }

    /// Follows the effective state.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<str>>> {
        self.tx.subscribe()
    }

    /// The switches that are on, with their reasons.
    pub fn switches(&self) -> Vec<(Source, String)> {
        self.lock().iter().map(|(s, r)| (*s, r.clone())).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Source, String>> {
        self.on.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Turns `source` on (with `reason`) or off (`None`). Returns the switches still on.
    /// A pause through the ops endpoint is written to `state_dir` first: an error there
    /// leaves the state unchanged.
    pub fn set(
        &self,
        source: Source,
        reason: Option<String>,
    ) -> Result<Vec<(Source, String)>, std::io::Error> {
        let mut on = self.lock();
        let before = on.get(&source).cloned();
        if before == reason {
            return Ok(on.iter().map(|(s, r)| (*s, r.clone())).collect());
        }
        if source == Source::Ops
            && let Some(path) = &self.persist
        {
            match &reason {
                Some(r) => {
                    let json =
                        serde_json::to_vec(&Persisted { reason: r.clone() }).expect("serializes");
                    let tmp = path.with_extension("json.tmp");
                    std::fs::write(&tmp, json)?;
                    std::fs::rename(&tmp, path)?;
                }
                None => match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                },
            }
        }
        match &reason {
            Some(r) => {
                on.insert(source, r.clone());
            }
            None => {
                on.remove(&source);
            }
        }
        let effective = effective(&on);
        match &reason {
            Some(r) => {
                tracing::warn!(source = source.as_str(), reason = %r, "paused: every relayed call and stream is refused, commands are held");
                self.ledger.record(Entry::Pause {
                    reason: r.clone(),
                    source: source.as_str().into(),
                });
            }
            None => {
                let still = effective.is_some();
                tracing::warn!(
                    source = source.as_str(),
                    still_paused = still,
                    "{}",
                    if still {
                        "one pause switch turned off; another still holds the agent paused"
                    } else {
                        "resumed: relayed calls, streams and commands are served again"
                    }
                );
                self.ledger.record(Entry::Resume {
                    source: source.as_str().into(),
                    still_paused: still,
                });
            }
        }
        metrics::gauge!("tether_agent_paused").set(if effective.is_some() { 1.0 } else { 0.0 });
        self.tx.send_replace(effective);
        Ok(on.iter().map(|(s, r)| (*s, r.clone())).collect())
    }
}

fn effective(on: &BTreeMap<Source, String>) -> Option<Arc<str>> {
    let (_, reason) = on.iter().next()?;
    let reason = if reason.trim().is_empty() {
        "no reason given"
    } else {
        reason.as_str()
    };
    Some(Arc::from(reason))
}

/// Waits until `rx` says the agent is not paused (at once when it is not). `false` when the
/// switch is gone (the agent stopping).
pub async fn resumed(rx: &mut watch::Receiver<Option<Arc<str>>>) -> bool {
    rx.wait_for(Option::is_none).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_switch_pauses_and_resume_turns_off_only_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let p = PauseSwitch::new(Some(dir.path()), Ledger::disabled());
        assert!(p.reason().is_none());
        p.set(Source::Config, Some("audit".into())).unwrap();
        p.set(Source::Ops, Some("incident 7".into())).unwrap();
        assert_eq!(p.reason().as_deref(), Some("incident 7"));
        assert!(dir.path().join(PAUSED_FILE).exists());
        // A restart keeps the ops pause.
        let again = PauseSwitch::new(Some(dir.path()), Ledger::disabled());
        assert_eq!(again.reason().as_deref(), Some("incident 7"));
        let left = p.set(Source::Ops, None).unwrap();
        assert_eq!(left, vec![(Source::Config, "audit".to_owned())]);
        assert_eq!(p.reason().as_deref(), Some("audit"));
        assert!(!dir.path().join(PAUSED_FILE).exists());
        p.set(Source::Config, None).unwrap();
        assert!(p.reason().is_none());
        p.set(Source::ControlFile, Some(" ".into())).unwrap();
        assert_eq!(p.reason().as_deref(), Some("no reason given"));
        assert_eq!(refusal("x"), "paused by the data plane's owner: x");
    }

    #[test]
    fn an_unreadable_pause_file_starts_paused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(PAUSED_FILE), "{not json").unwrap();
        let p = PauseSwitch::new(Some(dir.path()), Ledger::disabled());
        assert!(p.reason().unwrap().contains("unreadable"));
    }
}
