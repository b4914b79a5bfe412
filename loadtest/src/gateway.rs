//! Wiring: the gateway under test. Either a real `tether-gateway serve` process this tool starts
//! (config, PKI and data in the report directory, free loopback ports picked at start and kept
//! across a restart) and can `kill -9` and restart, or an existing gateway given by address.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::LoadError;

/// Where the gateway's three listeners are.
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    /// QUIC (UDP).
    pub tunnel: SocketAddr,
    /// Northbound gRPC (TCP).
    pub northbound: SocketAddr,
    /// Ops HTTP (TCP).
    pub ops: SocketAddr,
}

/// Settings of a gateway this tool starts.
#[derive(Clone, Debug)]
pub struct LocalSettings {
    /// The `tether-gateway` binary.
    pub bin: PathBuf,
    /// Directory for config, data and log.
    pub dir: PathBuf,
    /// Trust domain of the PKI in `dir/pki`.
    pub trust_domain: String,
    /// `tunnel.heartbeat_interval`.
    pub heartbeat: Duration,
    /// `RUST_LOG` for the gateway.
    pub log: String,
    /// Extra `--set KEY=VALUE` flags.
    pub sets: Vec<String>,
}

/// A `tether-gateway serve` process.
#[derive(Debug)]
pub struct LocalGateway {
    settings: LocalSettings,
    child: Option<Child>,
    /// Its listeners (fixed after the first start).
    pub addrs: Addrs,
    /// Time from spawn to "gateway listening" of the last start.
    pub last_start: Duration,
}

impl LocalGateway {
    /// Starts the gateway on free loopback ports.
    pub async fn start(settings: LocalSettings) -> Result<LocalGateway, LoadError> {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut gw = LocalGateway {
            settings,
            child: None,
            addrs: Addrs {
                tunnel: any,
                northbound: any,
                ops: any,
            },
            last_start: Duration::ZERO,
        };
        gw.spawn().await?;
        Ok(gw)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    fn config_path(&self) -> PathBuf {
        self.settings.dir.join("gateway.toml")
    }

    fn write_config(&self) -> Result<(), LoadError> {
        let s = &self.settings;
        let pki = s.dir.join("pki");
        let q = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
        let a = &self.addrs;
        let cfg = format!(
            "trust_domain = \"{td}\"\ndata_dir = {data}\n\
             [tls]\nca = {ca}\ncert = {cert}\nkey = {key}\n\
             [tunnel]\nlisten = \"{tunnel}\"\nheartbeat_interval = \"{hb}\"\ndrain_timeout = \"0s\"\n\
             [northbound]\nlisten = \"{nb}\"\n[ops]\nlisten = \"{ops}\"\n\
             # The whole fleet dials from one address: no per-address handshake limit.\n\
             [limits]\nhandshakes_per_second = 1000000\nhandshake_burst = 1000000\n",
            td = s.trust_domain,
            data = q(&s.dir.join("gateway-data")),
            ca = q(&pki.join("ca.pem")),
            cert = q(&pki.join("gateway.pem")),
            key = q(&pki.join("gateway-key.pem")),
            tunnel = a.tunnel,
            hb = humantime::format_duration(s.heartbeat),
            nb = a.northbound,
            ops = a.ops,
        );
        std::fs::write(self.config_path(), cfg)
            .map_err(|e| LoadError::Gateway(format!("writing gateway.toml: {e}")))
    }

    async fn spawn(&mut self) -> Result<(), LoadError> {
        self.write_config()?;
        let started = Instant::now();
        let mut cmd = Command::new(&self.settings.bin);
        cmd.args(["serve", "--log-format", "json", "--config"])
            .arg(self.config_path());
        for s in &self.settings.sets {
            cmd.arg("--set").arg(s);
        }
        let mut child = cmd
            .env("RUST_LOG", &self.settings.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                LoadError::Gateway(format!("starting {}: {e}", self.settings.bin.display()))
            })?;
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut log = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.settings.dir.join("gateway.log"))
            .await
            .map_err(|e| LoadError::Gateway(format!("gateway.log: {e}")))?;
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = log.write_all(line.as_bytes()).await;
                let _ = log.write_all(b"\n").await;
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let fields = v.get("fields").unwrap_or(&v);
                if fields["message"] == "gateway listening" {
                    let addr = |k: &str| fields[k].as_str().and_then(|s| s.parse().ok());
                    return Some((addr("tunnel")?, addr("northbound")?, addr("ops")?));
                }
            }
            None
        })
        .await;
        let (tunnel, northbound, ops) = match found {
            Ok(Some(a)) => a,
            Ok(None) => {
                let _ = log.flush().await;
                return Err(LoadError::Gateway(format!(
                    "the gateway exited before listening; see {}",
                    self.settings.dir.join("gateway.log").display()
                )));
            }
            Err(_) => {
                return Err(LoadError::Gateway(
                    "the gateway did not listen within 30s".into(),
                ));
            }
        };
        self.addrs = Addrs {
            tunnel,
            northbound,
            ops,
        };
        self.last_start = started.elapsed();
        // Keep copying its log so it never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = log.write_all(line.as_bytes()).await;
                let _ = log.write_all(b"\n").await;
            }
            let _ = log.flush().await;
        });
        self.child = Some(child);
        Ok(())
    }

    /// `kill -9`: no drain, no goodbye to the agents.
    pub async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// Starts it again on the same addresses (after [`kill9`](Self::kill9)).
    pub async fn restart(&mut self) -> Result<(), LoadError> {
        self.spawn().await
    }

    /// SIGTERM (the gateway drains), then waits up to 20 s before killing it.
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(Duration::from_secs(20), c.wait())
                .await
                .is_err()
            {
                let _ = c.start_kill();
                let _ = c.wait().await;
            }
        }
    }
}
