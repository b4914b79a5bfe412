//! Dev tooling: a throwaway PostgreSQL server on loopback, for `tether-gateway dev --replicas N`
//! and the tests. Not used by `serve`.
//!
//! It runs Debian's `postgresql` server binaries (`/usr/lib/postgresql/<version>/bin`, or
//! `TETHER_PG_BINDIR`): `initdb` into a directory of its own, then `postgres` as a child process
//! on a free loopback port with its socket in that directory. PostgreSQL refuses to run as root,
//! so when this process is root the server runs as the `postgres` user the Debian package
//! creates (the directory is handed to it). Authentication: trust on the Unix socket,
//! SCRAM-SHA-256 over TCP with a random password, so the gateway connects exactly as it would to
//! a real server.
//!
//! Dropping a [`LocalPostgres`] stops the server at once and removes its directory (unless it was
//! given one to keep). A run that was killed leaves a directory whose owner pid is gone: the next
//! start in the same place stops its server and removes it.

use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The database and role every local server has.
pub const DATABASE: &str = "tether";
/// The role the gateway logs in as.
pub const USER: &str = "tether";

/// Why a local PostgreSQL could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalPostgresError {
    /// The server binaries are not installed.
    #[error(
        "PostgreSQL server binaries not found (looked for initdb and postgres in {looked}): install \
         Debian's `postgresql` package (`apt-get install postgresql`; scripts/test does it), or set \
         TETHER_PG_BINDIR to the directory holding them"
    )]
    NotInstalled {
        /// Where it looked.
        looked: String,
    },
    /// This process is root and there is no unprivileged user to run the server as.
    #[error(
        "PostgreSQL refuses to run as root and there is no `postgres` user to run it as (Debian's \
         `postgresql` package creates it)"
    )]
    NoUser,
    /// A step failed; `log` holds the end of what the server or tool printed.
    #[error("local PostgreSQL: {step} failed: {detail}{log}")]
    Failed {
        /// What was being done.
        step: &'static str,
        /// Why.
        detail: String,
        /// The tail of the server's log, when there is one.
        log: String,
    },
}

fn failed(step: &'static str, detail: impl std::fmt::Display) -> LocalPostgresError {
    LocalPostgresError::Failed {
        step,
        detail: detail.to_string(),
        log: String::new(),
    }
}

/// How to start a [`LocalPostgres`].
#[derive(Clone, Debug)]
pub struct LocalPostgresOptions {
    /// Directory for the cluster; `None`: a new one under the system's temp directory, removed
    /// when the server is dropped. A given directory is kept (and reused on the next start).
    pub dir: Option<PathBuf>,
    /// Address the server listens on (`127.0.0.1` by default; `0.0.0.0` to be reachable from a
    /// network namespace).
    pub listen: Ipv4Addr,
    /// `fsync` in the server: on for figures that claim durability, off makes tests faster
    /// (a committed transaction still survives a server crash, not a machine crash).
    pub fsync: bool,
}

impl Default for LocalPostgresOptions {
    fn default() -> Self {
        LocalPostgresOptions {
            dir: None,
            listen: Ipv4Addr::LOCALHOST,
            fsync: false,
        }
    }
}

/// A PostgreSQL server this process started.
#[derive(Debug)]
pub struct LocalPostgres {
    dir: PathBuf,
    keep: bool,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
    listen: Ipv4Addr,
    fsync: bool,
    port: u16,
    password: String,
    child: Option<Child>,
}

/// Directory names of servers this harness started under the temp directory.
const PREFIX: &str = "tether-pg-";
static COUNTER: AtomicU32 = AtomicU32::new(0);

impl LocalPostgres {
    /// Creates (or reuses) the cluster and starts the server; returns once it accepts
    /// connections.
    pub fn start(opts: LocalPostgresOptions) -> Result<LocalPostgres, LocalPostgresError> {
        let bin = bindir()?;
        let run_as = run_as()?;
        let (dir, keep) = match opts.dir {
            Some(d) => (d, true),
            None => {
                remove_stale();
                let n = COUNTER.fetch_add(1, Ordering::Relaxed);
                let d = std::env::temp_dir().join(format!("{PREFIX}{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&d);
                (d, false)
            }
        };
        std::fs::create_dir_all(&dir).map_err(|e| failed("creating the directory", e))?;
        let mut pg = LocalPostgres {
            dir,
            keep,
            bin,
            run_as,
            listen: opts.listen,
            fsync: opts.fsync,
            port: 0,
            password: String::new(),
            child: None,
        };
        pg.init()?;
        pg.launch(None)?;
        pg.create_database()?;
        Ok(pg)
    }

    /// `postgres://tether:<password>@<host>:<port>/tether`.
    pub fn dsn(&self) -> String {
        format!(
            "postgres://{USER}:{}@{}:{}/{DATABASE}",
            self.password,
            self.host(),
            self.port
        )
    }

    /// The DSN without the password (give [`LocalPostgres::password`] another way).
    pub fn dsn_without_password(&self) -> String {
        format!("postgres://{USER}@{}:{}/{DATABASE}", self.host(), self.port)
    }

    fn host(&self) -> Ipv4Addr {
        if self.listen.is_unspecified() {
            Ipv4Addr::LOCALHOST
        } else {
            self.listen
        }
    }

    /// The role's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs one SQL statement on the project's database with psql (for tests that need to
    /// see or shape what the replicas share); its tuples-only output.
    pub fn sql(&self, statement: &str) -> Result<String, LocalPostgresError> {
        let out = self
            .command("psql")
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", DATABASE])
            .args(["-v", "ON_ERROR_STOP=1", "-qtA", "-c"])
            .arg(statement)
            .output()
            .map_err(|e| failed("running psql", e))?;
        if !out.status.success() {
            return Err(failed("psql", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The cluster's directory (data in `data/`, the server's log in `postgres.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the server: `immediate` is a crash (SIGQUIT: no checkpoint, the next start
    /// recovers from the WAL), otherwise a fast shutdown (SIGINT: sessions are cut, then a
    /// checkpoint).
    pub fn stop(&mut self, immediate: bool) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let sig = if immediate {
            nix::sys::signal::Signal::SIGQUIT
        } else {
            nix::sys::signal::Signal::SIGINT
        };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Starts the server again after [`LocalPostgres::stop`], on the same port.
    pub fn restart(&mut self) -> Result<(), LocalPostgresError> {
        self.stop(false);
        self.launch(Some(self.port))
    }

    /// Starts the server again after [`LocalPostgres::stop`] (on the same port).
    pub fn start_again(&mut self) -> Result<(), LocalPostgresError> {
        if self.child.is_some() {
            return Ok(());
        }
        self.launch(Some(self.port))
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn command(&self, tool: &str) -> Command {
        let mut c = Command::new(self.bin.join(tool));
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt as _;
            c.uid(uid).gid(gid);
        }
        // Keep the server's locale and timezone out of the caller's environment.
        c.env("LC_ALL", "C").env("TZ", "UTC").stdin(Stdio::null());
        c
    }

    /// `initdb` once; the password is kept beside the data (`password`, 0600).
    fn init(&mut self) -> Result<(), LocalPostgresError> {
        let pwfile = self.dir.join("password");
        if self.data().join("PG_VERSION").exists() {
            self.password = std::fs::read_to_string(&pwfile)
                .map_err(|e| failed("reading the cluster's password file", e))?
                .trim()
                .to_owned();
            return self.chown();
        }
        let _ = std::fs::remove_dir_all(self.data());
        self.password = random_password();
        write_private(&pwfile, &self.password).map_err(|e| failed("writing the password", e))?;
        self.chown()?;
        let mut init = self.command("initdb");
        init.arg("-D")
            .arg(self.data())
            .args(["-U", USER, "-E", "UTF8", "--locale=C", "--no-instructions"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()));
        if !self.fsync {
            init.arg("--no-sync");
        }
        let out = init
            .output()
            .map_err(|e| failed("running initdb", format!("{}: {e}", self.bin.display())))?;
        if !out.status.success() {
            return Err(failed(
                "initdb",
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ));
        }
        if !self.listen.is_loopback() {
            // initdb lets in loopback clients only; a server listening elsewhere is meant to be
            // reached from there (a network namespace), with the same password.
            let hba = self.data().join("pg_hba.conf");
            let mut text =
                std::fs::read_to_string(&hba).map_err(|e| failed("reading pg_hba.conf", e))?;
            text.push_str("host all all 0.0.0.0/0 scram-sha-256\n");
            std::fs::write(&hba, text).map_err(|e| failed("writing pg_hba.conf", e))?;
        }
        Ok(())
    }

    /// Hands the directory to the user the server runs as.
    fn chown(&self) -> Result<(), LocalPostgresError> {
        let Some((uid, gid)) = self.run_as else {
            return Ok(());
        };
        chown_tree(&self.dir, uid, gid).map_err(|e| failed("handing the directory to postgres", e))
    }

    fn launch(&mut self, port: Option<u16>) -> Result<(), LocalPostgresError> {
        // A previous server of this directory (a killed run) still holds it: stop it.
        stop_postmaster(&self.data());
        // A chosen free port can be taken by someone else before the server binds it: choose
        // again. A given port (a restart) is tried once.
        let attempts = if port.is_some() { 1 } else { 5 };
        let mut last = None;
        for _ in 0..attempts {
            let p = match port {
                Some(p) => p,
                None => free_port(self.listen).map_err(|e| failed("finding a free port", e))?,
            };
            match self.spawn(p) {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| failed("starting postgres", "no attempt made")))
    }

    fn spawn(&mut self, port: u16) -> Result<(), LocalPostgresError> {
        let log = std::fs::File::create(self.log_path())
            .map_err(|e| failed("creating the server log", e))?;
        if let Some((uid, gid)) = self.run_as {
            let _ = nix::unistd::chown(
                &self.log_path(),
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            );
        }
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&self.dir)
            .args(["-c", &format!("listen_addresses={}", self.listen)])
            .args([
                "-c",
                &format!("fsync={}", if self.fsync { "on" } else { "off" }),
            ])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=64MB"])
            .args(["-c", "unix_socket_permissions=0700"])
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd
            .spawn()
            .map_err(|e| failed("starting postgres", format!("{}: {e}", self.bin.display())))?;
        self.child = Some(child);
        self.port = port;
        match self.wait_ready() {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stop(true);
                Err(e)
            }
        }
    }

    /// Waits for the postmaster to say `ready` in `postmaster.pid` (as `pg_ctl -w` does).
    fn wait_ready(&mut self) -> Result<(), LocalPostgresError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let pidfile = self.data().join("postmaster.pid");
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(LocalPostgresError::Failed {
                    step: "starting postgres",
                    detail: format!("the server exited ({status})"),
                    log: self.log_tail(),
                });
            }
            if let Ok(s) = std::fs::read_to_string(&pidfile)
                && s.lines().nth(7).is_some_and(|l| l.trim() == "ready")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LocalPostgresError::Failed {
                    step: "starting postgres",
                    detail: "not ready within 60 s".into(),
                    log: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn create_database(&self) -> Result<(), LocalPostgresError> {
        let out = self
            .command("psql")
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", "postgres"])
            .args(["-v", "ON_ERROR_STOP=1", "-qtA", "-c"])
            .arg(format!(
                "SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"
            ))
            .output()
            .map_err(|e| failed("running psql", e))?;
        if !out.status.success() {
            return Err(failed("psql", String::from_utf8_lossy(&out.stderr)));
        }
        if String::from_utf8_lossy(&out.stdout).trim() == "1" {
            return Ok(());
        }
        let out = self
            .command("createdb")
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", USER, DATABASE])
            .output()
            .map_err(|e| failed("running createdb", e))?;
        if !out.status.success() {
            return Err(failed("createdb", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.log_path()) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        if tail.is_empty() {
            tail
        } else {
            format!("\nserver log ({}):\n{tail}", self.log_path().display())
        }
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        self.stop(!self.keep);
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

// === Helpers ===

/// The directory of `initdb` and `postgres`: `TETHER_PG_BINDIR`, else the newest
/// `/usr/lib/postgresql/<version>/bin`.
fn bindir() -> Result<PathBuf, LocalPostgresError> {
    let has_tools = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(d) = std::env::var_os("TETHER_PG_BINDIR") {
        let d = PathBuf::from(d);
        return if has_tools(&d) {
            Ok(d)
        } else {
            Err(LocalPostgresError::NotInstalled {
                looked: format!("TETHER_PG_BINDIR={}", d.display()),
            })
        };
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has_tools(d))
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, d)| d)
        .ok_or(LocalPostgresError::NotInstalled {
            looked: "/usr/lib/postgresql/*/bin".into(),
        })
}

/// The uid and gid to run the server as: `None` when this process is not root.
fn run_as() -> Result<Option<(u32, u32)>, LocalPostgresError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(None);
    }
    match nix::unistd::User::from_name("postgres") {
        Ok(Some(u)) => Ok(Some((u.uid.as_raw(), u.gid.as_raw()))),
        _ => Err(LocalPostgresError::NoUser),
    }
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        if ty.is_dir() {
            chown_tree(&entry.path(), uid, gid)?;
        } else if !ty.is_symlink() {
            std::os::unix::fs::chown(entry.path(), Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())
}

fn random_password() -> String {
    use rand::Rng as _;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

/// A port nobody listens on now (the server binds it a moment later; a lost race is retried).
fn free_port(ip: Ipv4Addr) -> std::io::Result<u16> {
    Ok(TcpListener::bind(SocketAddr::from((ip, 0)))?
        .local_addr()?
        .port())
}

/// Stops the postmaster named in `data/postmaster.pid` if it still runs (left by a killed run).
fn stop_postmaster(data: &Path) {
    let Ok(s) = std::fs::read_to_string(data.join("postmaster.pid")) else {
        return;
    };
    let Some(pid) = s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()) else {
        return;
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT).is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while nix::sys::signal::kill(pid, None).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes the temp-directory clusters of processes that are gone, stopping their servers.
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        stop_postmaster(&entry.path().join("data"));
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SELECT 1` over TCP with the password, as a client of the server would.
    fn select_one(pg: &LocalPostgres) -> Result<String, String> {
        let out = Command::new(bindir().unwrap().join("psql"))
            .arg(pg.dsn_without_password())
            .args(["-qtA", "-c", "SELECT 1"])
            .env("PGPASSWORD", pg.password())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    #[test]
    fn a_local_server_accepts_its_password_refuses_others_and_survives_a_restart() {
        let mut pg =
            LocalPostgres::start(LocalPostgresOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(select_one(&pg).unwrap(), "1");
        let wrong = Command::new(bindir().unwrap().join("psql"))
            .arg(pg.dsn_without_password())
            .args(["-qtA", "-c", "SELECT 1"])
            .env("PGPASSWORD", "not-the-password")
            .output()
            .unwrap();
        assert!(!wrong.status.success(), "a wrong password must be refused");
        assert!(
            String::from_utf8_lossy(&wrong.stderr).contains("password authentication failed"),
            "{}",
            String::from_utf8_lossy(&wrong.stderr)
        );
        let port = pg.port();
        pg.stop(true);
        assert!(select_one(&pg).is_err(), "stopped");
        pg.start_again().unwrap();
        assert_eq!(pg.port(), port);
        assert_eq!(select_one(&pg).unwrap(), "1");
        let dir = pg.dir().to_owned();
        drop(pg);
        assert!(!dir.exists(), "a temporary cluster is removed");
    }
}
