//! Backend layer: the gateway's `data_dir`, kept private to the gateway's user.
//!
//! It holds command payloads and outputs (`commands.redb`), the revocation list and enrollment
//! token hashes (`identity.redb`) and the QUIC stateless-reset key: none of it is for other
//! local users. The directory is created `0700` before any store opens in it (so a file is
//! never reachable by others, whatever mode its library gives it), and at every start the
//! directory is tightened to `0700` and each file in it to `0600`, each change logged: a
//! `data_dir` created by an older gateway (`0755`, files `0644`) is fixed by the next start.
//! A directory the gateway's user does not own (the mount point of a Kubernetes volume, owned
//! by root with the pod's `fsGroup`) cannot be changed: that is logged, and the files in it are
//! still tightened.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Mode of the directory.
pub const DIR_MODE: u32 = 0o700;
/// Mode of each file in it.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and missing parents) with mode `0700`, or tightens it to `0700` when it
/// exists with a looser mode. Call before opening any store in it.
pub fn prepare(dir: &Path) -> std::io::Result<()> {
    match std::fs::metadata(dir) {
        Ok(_) => tighten(dir, DIR_MODE, Found::AtStart),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir),
        Err(e) => Err(e),
    }
}

/// Whether a tightening is worth a warning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Files found at start, before any store opened: a looser mode was left by someone else.
    AtStart,
    /// Files the stores have just created with the process's umask: expected, logged at debug.
    JustCreated,
}

/// Tightens every regular file directly in `dir` to `0600`: call it before the stores open
/// (files an older gateway left open, [`Found::AtStart`]) and after (the files redb has just
/// created with the process's umask, [`Found::JustCreated`]).
pub fn tighten_files(dir: &Path, found: Found) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            tighten(&entry.path(), FILE_MODE, found)?;
        }
    }
    Ok(())
}

/// Clears the bits of `path`'s mode beyond `wanted` (setuid and the like included), logging
/// the change; leaves a stricter mode alone.
fn tighten(path: &Path, wanted: u32, found: Found) -> std::io::Result<()> {
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o7777;
    if mode & !wanted == 0 {
        return Ok(());
    }
    let new = mode & wanted;
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(new)) {
        Ok(()) => {}
        // Not ours to change: a volume's mount point owned by root (Kubernetes' fsGroup
        // volumes are). Its contents are still ours, and tightened.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:04o}"),
                error = %e,
                "cannot make gateway state private to the gateway's user (it does not own it): \
                 give data_dir to that user, or keep it on a volume no one else mounts"
            );
            return Ok(());
        }
        Err(e) => return Err(e),
    }
    let (path, from, to) = (path.display(), format!("{mode:04o}"), format!("{new:04o}"));
    match found {
        Found::AtStart => tracing::warn!(%path, from, to,
            "tightened the permissions of gateway state: it is readable by the gateway's user only"),
        Found::JustCreated => tracing::debug!(%path, from, to, "new gateway state made private"),
    }
    Ok(())
}

// === One gateway per data_dir ===

/// The lock file in `data_dir`.
pub const LOCK_FILE: &str = "gateway.lock";

/// Holds `data_dir` for this process (an exclusive `flock` on [`LOCK_FILE`], released when
/// dropped or when the process dies, however it dies).
#[derive(Debug)]
pub struct DirLock {
    _file: nix::fcntl::Flock<std::fs::File>,
}

/// Why `data_dir` could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another gateway process holds it.
    #[error(
        "data_dir {dir} is in use by another tether-gateway process{pid}: two gateways cannot \
         share an embedded store (data_dir) — stop the other one, give this one its own \
         data_dir, or run replicas on PostgreSQL (store.dsn)"
    )]
    InUse {
        /// The directory.
        dir: String,
        /// `" (pid N)"` when the holder wrote it.
        pid: String,
    },
    /// The lock file could not be opened.
    #[error("data_dir {dir}: cannot open {LOCK_FILE}: {source}")]
    Io {
        /// The directory.
        dir: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Takes `dir` for this process, or says which process has it. The kernel releases the lock
/// when the holder exits, `kill -9` included: a stale lock file never blocks a start.
pub fn lock(dir: &Path) -> Result<DirLock, LockError> {
    use std::io::{Read as _, Seek as _, Write as _};
    use std::os::unix::fs::OpenOptionsExt as _;
    let shown = dir.display().to_string();
    let io = |source| LockError::Io {
        dir: shown.clone(),
        source,
    };
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(&path)
        .map_err(io)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut held) => {
            held.set_len(0).map_err(io)?;
            held.rewind().map_err(io)?;
            writeln!(held, "{}", std::process::id()).map_err(io)?;
            Ok(DirLock { _file: held })
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut s = String::new();
            let _ = file.read_to_string(&mut s);
            let pid = s
                .trim()
                .parse::<u32>()
                .map(|p| format!(" (pid {p})"))
                .unwrap_or_default();
            Err(LockError::InUse { dir: shown, pid })
        }
        Err((_, e)) => Err(io(std::io::Error::from(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_is_held_by_one_holder_at_a_time_and_the_refusal_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        let e = lock(dir.path()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("(pid {})", std::process::id())) && msg.contains("store.dsn"),
            "{msg}"
        );
        drop(held);
        lock(dir.path()).expect("free again once the holder let go");
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_new_data_dir_is_0700_and_an_old_one_is_tightened_with_its_files() {
        let root = tempfile::tempdir().unwrap();
        let new = root.path().join("a/b/data");
        prepare(&new).unwrap();
        assert_eq!(mode(&new), 0o700);

        let old = root.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = old.join("commands.redb");
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let strict = old.join("quic-reset-key");
        std::fs::write(&strict, b"k").unwrap();
        std::fs::set_permissions(&strict, std::fs::Permissions::from_mode(0o400)).unwrap();
        prepare(&old).unwrap();
        tighten_files(&old, Found::AtStart).unwrap();
        assert_eq!(mode(&old), 0o700);
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&strict), 0o400, "a stricter mode is left alone");
    }
}
