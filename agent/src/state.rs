//! Backend: the agent's `state_dir`, the one module that knows what lives in it and how it is
//! written. Enrollment, renewal, the identity and the command record use it; it imports only
//! the config and the certificate checks.
//!
//! | file | written by | what |
//! |---|---|---|
//! | `agent.pem`, `agent-key.pem` | enrollment, renewal | the enrolled or renewed certificate and its key |
//! | `enrollment.json` | enrollment | the SHA-256 of the token the certificate came from |
//! | `gateway-ca.pem` | enrollment, renewal | the CA bundle that came with the last certificate |
//! | `renewed.pem` | renewal | a renewed pair, for a moment: the commit point of a renewal |
//! | `commands.jsonl` | commands | the record of completed commands |
//! | `ledger/ledger-NNNNNN.jsonl` | ledger | the hash-chained ledger (`crate::ledger`) |
//! | `paused.json` | pause | a pause made with `tether-agent pause` (`crate::pause`) |
//! | `ops.addr` | wiring | where the ops endpoint is bound (for `pause`/`resume` with port 0) |
//!
//! The directory is created `0700` and secret files `0600` from creation on; every file but the
//! command record (appended) is written beside and renamed, so a reader never sees half a file.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::certs;
use crate::config::AgentConfig;

/// The enrolled (or renewed) certificate.
pub const CERT_FILE: &str = "agent.pem";
/// Its private key (mode 0600).
pub const KEY_FILE: &str = "agent-key.pem";
/// Which token the certificate came from (its SHA-256), so a restart does not enroll again.
pub const RECORD_FILE: &str = "enrollment.json";
/// The CA bundle that came with the last certificate.
pub const CA_FILE: &str = "gateway-ca.pem";
/// The renewed pair, certificate then key, while it is being installed (the commit point).
pub const RENEWED_FILE: &str = "renewed.pem";
/// The record of completed commands.
pub const COMMANDS_FILE: &str = "commands.jsonl";

/// Why the state directory could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A file or the directory could not be written (created, synced, renamed).
    #[error("{path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A renewal's commit file could not be installed or removed.
    #[error("installing {path}: {source}")]
    Install {
        /// The commit file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// The agent's state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// The directory at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> StateDir {
        StateDir { dir: dir.into() }
    }

    /// The configured `state_dir`, if any.
    pub fn of(cfg: &AgentConfig) -> Option<StateDir> {
        cfg.state_dir.as_deref().map(StateDir::new)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// [`CERT_FILE`] in it.
    pub fn cert(&self) -> PathBuf {
        self.dir.join(CERT_FILE)
    }

    /// [`KEY_FILE`] in it.
    pub fn key(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    /// [`RECORD_FILE`] in it.
    pub fn record(&self) -> PathBuf {
        self.dir.join(RECORD_FILE)
    }

    /// [`CA_FILE`] in it.
    pub fn ca(&self) -> PathBuf {
        self.dir.join(CA_FILE)
    }

    /// [`RENEWED_FILE`] in it.
    pub fn renewed(&self) -> PathBuf {
        self.dir.join(RENEWED_FILE)
    }

    /// [`COMMANDS_FILE`] in it.
    pub fn commands(&self) -> PathBuf {
        self.dir.join(COMMANDS_FILE)
    }

    /// Creates the directory (and its parents), `0700`.
    pub fn create(&self) -> Result<(), StateError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| StateError::Write {
                path: self.dir.clone(),
                source,
            })
    }

    /// Keeps a renewed pair and its CA bundle: the pair is first written as one file (the
    /// commit point), then installed as `agent.pem`/`agent-key.pem`, then that file removed;
    /// [`StateDir::recover_renewal`] finishes what a crash interrupted.
    pub fn save_renewed(
        &self,
        cert_pem: &str,
        key_pem: &str,
        ca_pem: &str,
    ) -> Result<(), StateError> {
        self.create()?;
        if !ca_pem.trim().is_empty() {
            write_file(&self.ca(), ca_pem.as_bytes(), false)?;
        }
        let pair = format!("{}\n{key_pem}", cert_pem.trim_end());
        write_file(&self.renewed(), pair.as_bytes(), true)?;
        self.install(cert_pem, key_pem)
    }

    /// Puts a committed pair in place of `agent.pem`/`agent-key.pem` and drops the commit file.
    fn install(&self, cert_pem: &str, key_pem: &str) -> Result<(), StateError> {
        write_file(&self.key(), key_pem.as_bytes(), true)?;
        write_file(&self.cert(), cert_pem.as_bytes(), false)?;
        let installing = |source| StateError::Install {
            path: self.renewed(),
            source,
        };
        std::fs::remove_file(self.renewed()).map_err(installing)?;
        // The renames are durable once the directory is.
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(installing)
    }

    /// Finishes a renewal interrupted between its commit and its install (see
    /// [`StateDir::save_renewed`]); a commit file that is not a matching pair is removed.
    pub fn recover_renewal(&self) -> Result<(), StateError> {
        let path = self.renewed();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        let split = text
            .find("-----BEGIN PRIVATE KEY-----")
            .unwrap_or(text.len());
        let (cert_pem, key_pem) = text.split_at(split);
        match certs::pair(cert_pem, key_pem) {
            Ok(_) => {
                tracing::info!(file = %path.display(), "finishing a certificate renewal interrupted by a restart");
                self.install(cert_pem, key_pem)
            }
            Err(reason) => {
                tracing::warn!(file = %path.display(), %reason, "removing an unusable renewal file");
                std::fs::remove_file(&path).map_err(|source| StateError::Install { path, source })
            }
        }
    }
}

/// Writes beside and renames, so a reader never sees half a file; `secret` files are 0600
/// from creation on.
pub fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), StateError> {
    let io = |source| StateError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The certificate and key files of a files identity: `tls.cert` and `tls.key`, or the
/// enrolled ones in `state_dir`.
pub fn identity_files(cfg: &AgentConfig) -> (PathBuf, PathBuf) {
    match StateDir::of(cfg) {
        Some(dir) if cfg.enrolled_identity() => (dir.cert(), dir.key()),
        _ => (cfg.tls.cert.clone(), cfg.tls.key.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_enrolled_identity_lives_in_state_dir() {
        let cfg: AgentConfig =
            toml::from_str("gateways = [\"gw:443\"]\nstate_dir = \"s\"\n[tls]\nca = \"ca.pem\"\n")
                .unwrap();
        assert!(cfg.enrolled_identity());
        assert_eq!(identity_files(&cfg).0, Path::new("s/agent.pem"));
    }
}
