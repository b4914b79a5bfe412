//! Wiring: the gateway under test. Either real `tether-gateway serve` processes this tool starts
//! (config, PKI and data in the report directory, free loopback ports picked at start and kept
//! across a restart) and can `kill -9`, stop and restart: one on its embedded store, or
//! `--replicas N` of them on a local PostgreSQL; or an existing gateway given by address.

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
    /// `tunnel.drain_timeout`: how long a stopped gateway drains its agents.
    pub drain: Duration,
    /// Replica settings, when this gateway is one of several on PostgreSQL.
    pub replica: Option<ReplicaSettings>,
}

/// One replica among several sharing a PostgreSQL.
#[derive(Clone, Debug)]
pub struct ReplicaSettings {
    /// `store.dsn`.
    pub dsn: String,
    /// `cluster.replica_id`; also names its config, data and log in the report directory.
    pub id: String,
    /// `cluster.peer_listen` (a free loopback port per replica), also advertised.
    pub peer: SocketAddr,
    /// `cluster.peer_cert` and `cluster.peer_key`: its peer certificate
    /// (`spiffe://<trust-domain>/gateway/<id>`), which turns the peer links on.
    pub peer_tls: (PathBuf, PathBuf),
}

/// A `tether-gateway serve` process.
#[derive(Debug)]
pub struct LocalGateway {
    settings: LocalSettings,
    child: Option<Child>,
    /// Its listeners (fixed after the first start).
    pub addrs: Addrs,
    /// Time from spawn to ready (`/readyz` 200) of the last start.
    pub last_start: Duration,
}

impl LocalGateway {
    /// Starts the gateway on free loopback ports, kept across restarts.
    pub async fn start(settings: LocalSettings) -> Result<LocalGateway, LoadError> {
        // Ports a restart can bind again: below the ephemeral range, where no socket bound
        // to port 0 meanwhile (the fleet's, another process's) can take them.
        let port = || tether_gateway::tools::ports::restartable_port([127, 0, 0, 1].into());
        let mut gw = LocalGateway {
            settings,
            child: None,
            addrs: Addrs {
                tunnel: port(),
                northbound: port(),
                ops: port(),
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

    /// The replica id, or `gateway` for a lone gateway: names its files.
    pub fn name(&self) -> &str {
        self.settings
            .replica
            .as_ref()
            .map_or("gateway", |r| r.id.as_str())
    }

    fn config_path(&self) -> PathBuf {
        self.settings.dir.join(format!("{}.toml", self.name()))
    }

    fn log_path(&self) -> PathBuf {
        self.settings.dir.join(format!("{}.log", self.name()))
    }

    fn write_config(&self) -> Result<(), LoadError> {
        let s = &self.settings;
        let pki = s.dir.join("pki");
        let q = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
        let a = &self.addrs;
        let cfg = format!(
            "trust_domain = \"{td}\"\ndata_dir = {data}\n\
             [tls]\nca = {ca}\ncert = {cert}\nkey = {key}\n\
             [tunnel]\nlisten = \"{tunnel}\"\nheartbeat_interval = \"{hb}\"\ndrain_timeout = \"{drain}\"\n\
             [northbound]\nlisten = \"{nb}\"\n[ops]\nlisten = \"{ops}\"\n\
             # The whole fleet dials from one address: no per-address handshake limit.\n\
             [limits]\nhandshakes_per_second = 1000000\nhandshake_burst = 1000000\n",
            td = s.trust_domain,
            data = q(&s.dir.join(match &s.replica {
                Some(r) => format!("{}-data", r.id),
                None => "gateway-data".to_owned(),
            })),
            ca = q(&pki.join("ca.pem")),
            cert = q(&pki.join("gateway.pem")),
            key = q(&pki.join("gateway-key.pem")),
            tunnel = a.tunnel,
            hb = humantime::format_duration(s.heartbeat),
            drain = humantime::format_duration(s.drain),
            nb = a.northbound,
            ops = a.ops,
        );
        let cfg = match &s.replica {
            None => cfg,
            Some(r) => format!(
                "{cfg}[store]\ndsn = {dsn}\n\
                 [cluster]\nreplica_id = {id}\npeer_listen = \"{peer}\"\nadvertise = \"{peer}\"\n\
                 peer_cert = {cert}\npeer_key = {key}\n",
                dsn = toml::Value::String(r.dsn.clone()),
                id = toml::Value::String(r.id.clone()),
                peer = r.peer,
                cert = q(&r.peer_tls.0),
                key = q(&r.peer_tls.1),
            ),
        };
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
            .open(self.log_path())
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
                    "{} exited before listening; see {}",
                    self.name(),
                    self.log_path().display()
                )));
            }
            Err(_) => {
                return Err(LoadError::Gateway(format!(
                    "{} did not listen within 30s; see {}",
                    self.name(),
                    self.log_path().display()
                )));
            }
        };
        self.addrs = Addrs {
            tunnel,
            northbound,
            ops,
        };
        // Keep copying its log so it never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = log.write_all(line.as_bytes()).await;
                let _ = log.write_all(b"\n").await;
            }
            let _ = log.flush().await;
        });
        self.child = Some(child);
        // In rotation only once ready, as a load balancer honouring `/readyz` puts it: a
        // restarted replica is ready once its peer links are up.
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let r = ops_get(ops, "/readyz").await;
            if matches!(r, Some((200, _))) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(LoadError::Gateway(format!(
                    "{} was not ready within {READY_WITHIN:?}: {}; see {}",
                    self.name(),
                    r.map_or_else(|| "/readyz did not answer".to_owned(), |(_, t)| t),
                    self.log_path().display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.last_start = started.elapsed();
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

    /// SIGTERM (the gateway drains for `drain`), then waits until it exits, killing it after
    /// the drain and 20 s more. Returns how long it took to exit and whether it had to be
    /// killed.
    pub async fn stop(&mut self) -> (Duration, bool) {
        let started = Instant::now();
        let Some(mut c) = self.child.take() else {
            return (Duration::ZERO, false);
        };
        if let Some(pid) = c.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let grace = self.settings.drain + Duration::from_secs(20);
        let killed = tokio::time::timeout(grace, c.wait()).await.is_err();
        if killed {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
        (started.elapsed(), killed)
    }
}

/// How long a started gateway may take to be ready (`/readyz` 200) after it listens.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// `GET path` from an ops listener: the status code and the whole response; `None` when it
/// cannot be read.
async fn ops_get(ops: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(ops))
        .await
        .ok()?
        .ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut body))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&body).into_owned();
    let code = text.get(9..12)?.parse().ok()?;
    Some((code, text))
}

/// `GET /metrics` from an ops listener; `None` when it cannot be read.
pub async fn metrics_text(ops: SocketAddr) -> Option<String> {
    ops_get(ops, "/metrics")
        .await
        .and_then(|(code, text)| (code == 200).then_some(text))
}

/// The counter of streams a replica forwarded to a peer (`direction="out"`; the receiving
/// replica counts the same stream `in`).
pub const FORWARDED: &str = "tether_gateway_peer_forwarded_streams_total";

/// Streams this replica forwarded to peers, from its `/metrics` text: `None` when it exports no
/// peer-link metric at all (a gateway without peer links, or with them off), else the sum of
/// [`FORWARDED`]'s `direction="out"` series (0 when it forwarded nothing since its start).
pub fn forwarded_out(text: &str) -> Option<f64> {
    let series = |l: &&str| !l.starts_with('#');
    if !text
        .lines()
        .filter(series)
        .any(|l| l.starts_with("tether_gateway_peer_"))
    {
        return None;
    }
    Some(
        text.lines()
            .filter(series)
            .filter(|l| l.starts_with(FORWARDED) && l.contains("direction=\"out\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
            .sum(),
    )
}

/// Sums, per metric name, the samples of every family `wanted` accepts (Prometheus text
/// format; comment lines skipped).
pub fn metric_sums(
    text: &str,
    wanted: impl Fn(&str) -> bool,
) -> std::collections::BTreeMap<String, f64> {
    let mut sums = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        if !name.starts_with("tether_") || !wanted(name) {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            *sums.entry(name.to_owned()).or_default() += v;
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_add_up_series_and_skip_comments() {
        let text = "HTTP/1.1 200 OK\r\n\r\n# TYPE tether_gateway_relay_calls_total counter\n\
                    tether_gateway_relay_calls_total{kind=\"unary\"} 3\n\
                    tether_gateway_relay_calls_total{kind=\"stream\"} 4\n\
                    other_total 9\n";
        let all = metric_sums(text, |_| true);
        assert_eq!(all["tether_gateway_relay_calls_total"], 7.0);
        assert!(!all.contains_key("other_total"));
        assert_eq!(
            forwarded_out(text),
            None,
            "no peer-link metric: no peer links"
        );
    }

    #[test]
    fn forwarded_streams_are_the_out_series_only() {
        let peers = "# TYPE tether_gateway_peer_up gauge\n\
                     tether_gateway_peer_up{peer=\"r2\"} 1\n\
                     tether_gateway_peer_forwarded_streams_total{peer=\"r2\",direction=\"out\"} 5\n\
                     tether_gateway_peer_forwarded_streams_total{peer=\"r3\",direction=\"out\"} 2\n\
                     tether_gateway_peer_forwarded_streams_total{peer=\"r2\",direction=\"in\"} 9\n";
        assert_eq!(forwarded_out(peers), Some(7.0));
        // Peer links up, nothing forwarded since the start.
        assert_eq!(
            forwarded_out("tether_gateway_peer_up{peer=\"r2\"} 1\n"),
            Some(0.0)
        );
    }
}
