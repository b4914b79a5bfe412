//! Test harness: real gateways and real agents on `127.0.0.1:0`, with certificates from a
//! throwaway CA. Waiting is always on an observable condition with a deadline.
//!
//! # Layout
//! - [`Pki`]: a CA in a temp dir, issuing agent and client certificates (good and bad ones);
//! - [`TestGateway`] / [`TestAgent`]: in-process gateway and agent with their shutdown tokens;
//! - [`AgentProcess`]: a real `tether-agent` process, for kill tests;
//! - [`RawAgent`]: a bare QUIC client, for sending what a well-behaved agent never would;
//! - [`hostile`]: an agent holding a real session that floods every command it is given;
//! - [`wait_until`], [`metric`]: observation helpers;
//! - [`fake_apiserver`]: an in-process fake Kubernetes API server for the agent's kube handlers.
//! - [`moto`]: a real AWS Secrets Manager emulator (moto) and a throttling proxy in front of it.
//! - [`netns`]: network namespaces and an nftables firewall around real gateway and agent processes.
//! - [`udp_balancer`]: a round-robin UDP load balancer on loopback in front of replicas.

pub mod fake_apiserver;
pub mod hostile;
pub mod moto;
pub mod netns;
pub mod udp_balancer;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_agent::AgentConfig;
use tether_api::v1::agents_client::AgentsClient;
use tether_gateway::config::{GatewayConfig, TlsConfig};
use tether_gateway::identity::pki::{self, Ca, LeafSpec};
use tether_gateway::tools::ctl::{self, Target};
use tether_gateway::{GatewayHandle, Sockets};
use tether_runtime::CancellationToken;
use tunnel_proto::AgentId;

/// The trust domain of test PKIs.
pub const TD: &str = "test.local";

/// Installs the crypto provider and a test log subscriber (`RUST_LOG` to see it).
pub fn init() {
    tether_runtime::tls::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A bench's positional arguments (cargo's own `--bench` and friends left out), and the
/// two-worker runtime every bench runs on (the machine has two cores).
pub fn bench_setup() -> (Vec<String>, tokio::runtime::Runtime) {
    let args = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    (args, rt)
}

/// The `p` quantile (0..1) of latencies, sorting them in place.
pub fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1))]
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; panics with `what` on timeout.
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Files of one issued certificate.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// CA bundle.
    pub ca: PathBuf,
    /// Certificate.
    pub cert: PathBuf,
    /// Key.
    pub key: PathBuf,
}

/// A throwaway CA.
pub struct Pki {
    /// The directory (deleted on drop).
    pub dir: tempfile::TempDir,
    /// The CA.
    pub ca: Ca,
    n: std::sync::atomic::AtomicU32,
}

impl Pki {
    /// A CA for [`TD`] with a gateway certificate for `localhost` and `127.0.0.1`.
    pub fn new() -> Pki {
        Pki::with_trust_domain(TD)
    }

    /// A CA for another trust domain.
    pub fn with_trust_domain(td: &str) -> Pki {
        init();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = pki::init(
            dir.path(),
            td,
            &["localhost".into(), "127.0.0.1".into()],
            false,
        )
        .expect("pki init");
        Pki {
            dir,
            ca,
            n: Default::default(),
        }
    }

    /// Another CA under the very name of `of`'s CA, with its own key: an impostor that
    /// name matching alone would take for `of`.
    pub fn impostor(of: &Pki) -> Pki {
        use rustls_pki_types::pem::PemObject;
        init();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(of.ca.cert_pem.as_bytes())
            .expect("CA certificate");
        let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parses");
        let mut name = rcgen::DistinguishedName::new();
        for (ty, attr) in [
            (
                rcgen::DnType::OrganizationName,
                x509.subject().iter_organization().next(),
            ),
            (
                rcgen::DnType::CommonName,
                x509.subject().iter_common_name().next(),
            ),
        ] {
            if let Some(v) = attr.and_then(|a| a.as_str().ok()) {
                name.push(ty, v);
            }
        }
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = name;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-signed");
        let dir = tempfile::tempdir().expect("tempdir");
        let td = &of.ca.trust_domain;
        pki::write_file(&dir.path().join("ca.pem"), &cert.pem(), false).expect("write");
        pki::write_file(&dir.path().join("ca-key.pem"), &key.serialize_pem(), true).expect("write");
        pki::write_file(&dir.path().join("trust-domain"), td, false).expect("write");
        let ca = Ca::load(dir.path()).expect("impostor CA");
        Pki {
            dir,
            ca,
            n: Default::default(),
        }
    }

    /// The gateway's TLS config.
    pub fn gateway_tls(&self) -> TlsConfig {
        TlsConfig {
            ca: self.dir.path().join("ca.pem"),
            cert: self.dir.path().join("gateway.pem"),
            key: self.dir.path().join("gateway-key.pem"),
        }
    }

    fn write(&self, issued: &pki::Issued) -> CertFiles {
        let n = self.n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out = self.dir.path().join(format!("issued-{n}"));
        pki::write_issued(&out, "leaf", issued, &self.ca).expect("write cert");
        CertFiles {
            ca: out.join("ca.pem"),
            cert: out.join("leaf.pem"),
            key: out.join("leaf-key.pem"),
        }
    }

    /// A valid agent certificate.
    pub fn agent(&self, id: &str) -> CertFiles {
        let id: AgentId = id.parse().expect("agent id");
        self.write(
            &self
                .ca
                .issue_agent(&id, pki::AGENT_TTL)
                .expect("issue agent"),
        )
    }

    /// A certificate from an arbitrary spec (expired, no URI, ...).
    pub fn leaf(&self, spec: &LeafSpec) -> CertFiles {
        self.write(&self.ca.issue(spec).expect("issue leaf"))
    }

    /// A valid control-plane client certificate.
    pub fn client(&self, name: &str) -> CertFiles {
        self.write(
            &self
                .ca
                .issue_client(name, pki::CLIENT_TTL)
                .expect("issue client"),
        )
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// A gateway running in this process.
pub struct TestGateway {
    /// Its handle (registry, addresses).
    pub handle: GatewayHandle,
    /// Cancel to shut it down.
    pub shutdown: CancellationToken,
    _data: Option<tempfile::TempDir>,
}

impl TestGateway {
    /// The default test config: heartbeat 500 ms, no drain wait, no per-address handshake limit
    /// to speak of.
    pub fn config(pki: &Pki) -> GatewayConfig {
        let mut cfg: GatewayConfig = toml::from_str(&format!(
            "trust_domain = \"{TD}\"\n[tls]\nca = \"x\"\ncert = \"x\"\nkey = \"x\"\n"
        ))
        .expect("minimal config");
        cfg.trust_domain = pki.ca.trust_domain.clone();
        cfg.tls = pki.gateway_tls();
        cfg.tunnel.heartbeat_interval = Duration::from_millis(500);
        cfg.tunnel.drain_timeout = Duration::ZERO;
        cfg.commands.retry_backoff = Duration::from_millis(50);
        cfg.commands.max_retry_backoff = Duration::from_millis(500);
        // Every test agent dials from 127.0.0.1: one source address standing for many hosts.
        cfg.limits.handshakes_per_second = 100_000;
        cfg.limits.handshake_burst = 100_000;
        cfg
    }

    /// Starts on free loopback ports.
    pub async fn start(pki: &Pki) -> TestGateway {
        Self::start_with(Self::config(pki), "127.0.0.1:0".parse().expect("addr")).await
    }

    /// Starts with `cfg`, its tunnel bound to `tunnel` (port 0 for any).
    /// Without a `data_dir` in `cfg`, the command store goes to a temp dir that lives as long
    /// as the gateway.
    pub async fn start_with(mut cfg: GatewayConfig, tunnel: SocketAddr) -> TestGateway {
        let data = match cfg.data_dir {
            Some(_) => None,
            None => {
                let d = tempfile::tempdir().expect("data dir");
                cfg.data_dir = Some(d.path().to_owned());
                Some(d)
            }
        };
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        // A gateway restarted on the port of one just stopped (in this process) may find the
        // old UDP socket still open for a moment: quinn closes it once its endpoint driver task
        // has run to its end, after `stop` returned. Retry while the address is in use.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let sockets = loop {
            match Sockets::bind_addrs(tunnel, any, any) {
                Ok(s) => break s,
                Err(tether_gateway::GatewayError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse
                        && tunnel.port() != 0
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("bind gateway sockets: {e:?}"),
            }
        };
        let shutdown = CancellationToken::new();
        let handle = tether_gateway::start(cfg, sockets, shutdown.clone())
            .await
            .expect("gateway start");
        TestGateway {
            handle,
            shutdown,
            _data: data,
        }
    }

    /// Shuts down and waits.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.handle.wait().await;
    }

    /// Live session count of an agent.
    pub fn sessions_of(&self, id: &str) -> usize {
        let id: AgentId = id.parse().expect("agent id");
        self.handle
            .registry
            .get(&id)
            .map_or(0, |a| a.sessions.len())
    }

    /// Session ids of an agent.
    pub fn session_ids(&self, id: &str) -> Vec<String> {
        let id: AgentId = id.parse().expect("agent id");
        self.handle
            .registry
            .get(&id)
            .map(|a| a.sessions.iter().map(|s| s.session_id.clone()).collect())
            .unwrap_or_default()
    }

    /// The built `tetherctl`, pointed at this gateway's northbound API as the caller of
    /// `files` (TLS name `localhost`, no dev.json); add the subcommand.
    pub fn tetherctl(&self, files: &CertFiles) -> std::process::Command {
        tetherctl_at(self.handle.northbound_addr, files)
    }

    /// A northbound client authenticated as control-plane caller `name`.
    pub async fn client(&self, pki: &Pki, name: &str) -> AgentsClient<tonic::transport::Channel> {
        let files = pki.client(name);
        AgentsClient::new(self.channel(&files).await.expect("northbound connect"))
    }

    /// A northbound channel with the given client certificate.
    pub async fn channel(&self, files: &CertFiles) -> Result<tonic::transport::Channel, String> {
        ctl::connect(&Target {
            addr: self.handle.northbound_addr.to_string(),
            ca: files.ca.clone(),
            cert: files.cert.clone(),
            key: files.key.clone(),
            server_name: Some("localhost".into()),
        })
        .await
    }
}

/// An agent config dialing `gateway` with `files`.
pub fn agent_config(files: &CertFiles, gateway: SocketAddr) -> AgentConfig {
    let mut cfg: AgentConfig = toml::from_str(&format!(
        "gateways = [\"{gateway}\"]\nserver_name = \"localhost\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[reconnect]\ninitial_backoff = \"200ms\"\nmax_backoff = \"1s\"\nconnect_timeout = \"1s\"\n",
        files.ca.display(),
        files.cert.display(),
        files.key.display()
    ))
    .expect("agent config");
    cfg.labels.insert("suite".into(), "e2e".into());
    // The ledger is kept (in memory without a state_dir), but not copied to stdout: in-process
    // agents would print every record into the test's own output.
    cfg.ledger.stdout = false;
    cfg
}

/// An agent running in this process.
pub struct TestAgent {
    /// Its handle.
    pub handle: tether_agent::AgentHandle,
    /// Cancel to stop it.
    pub shutdown: CancellationToken,
}

impl TestAgent {
    /// Starts an agent with `cfg` (no ops listener).
    pub fn start(cfg: &AgentConfig) -> TestAgent {
        let shutdown = CancellationToken::new();
        let handle = tether_agent::start(cfg, None, shutdown.clone()).expect("agent start");
        TestAgent { handle, shutdown }
    }

    /// Starts an agent with an ops endpoint on a free loopback port.
    pub fn start_with_ops(cfg: &AgentConfig) -> TestAgent {
        let shutdown = CancellationToken::new();
        let ops = std::net::TcpListener::bind("127.0.0.1:0").expect("bind ops");
        let handle = tether_agent::start(cfg, Some(ops), shutdown.clone()).expect("agent start");
        TestAgent { handle, shutdown }
    }

    /// True once the agent holds no session and its last established one ended for a reason
    /// containing `what` (redials that fail afterwards do not change it).
    pub fn disconnected_because(&self, what: &str) -> bool {
        let status = &self.handle.status;
        !status.connected() && status.last_session_end().is_some_and(|e| e.contains(what))
    }

    /// Stops and waits.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.handle.wait().await;
    }
}

/// Path of a workspace binary (built by `cargo test --workspace` / `nextest run --workspace`),
/// or of the one in `$TETHER_E2E_BIN_DIR` when that is set (to run a test against other
/// builds, e.g. release binaries of two commits for before/after figures).
pub fn binary(name: &str) -> PathBuf {
    let dir = match std::env::var_os("TETHER_E2E_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("current exe");
            // target/debug/deps/<test> → target/debug/<name>
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .to_owned()
        }
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo nextest run --workspace` (or `cargo test --workspace`) so every binary is built",
        p.display()
    );
    p
}

/// A real `tether-agent` process.
pub struct AgentProcess {
    /// The child.
    pub child: tokio::process::Child,
    logs: LogLines,
    /// Its stdout: the ledger's JSON lines.
    pub stdout: LogLines,
    _dir: tempfile::TempDir,
}

/// A child process's log lines, collected as it writes them.
#[derive(Clone, Debug)]
pub struct LogLines {
    lines: Arc<std::sync::Mutex<Vec<String>>>,
    /// True once the stream being collected has ended.
    ended: tokio::sync::watch::Receiver<bool>,
}

impl Default for LogLines {
    /// Lines pushed by hand; never "ended".
    fn default() -> Self {
        LogLines {
            lines: Arc::default(),
            ended: tokio::sync::watch::channel(false).1,
        }
    }
}

impl LogLines {
    /// Reads `stream` to its end in a task, keeping every line.
    pub fn collect(stream: impl tokio::io::AsyncRead + Unpin + Send + 'static) -> LogLines {
        let (ended, rx) = tokio::sync::watch::channel(false);
        let logs = LogLines {
            lines: Arc::default(),
            ended: rx,
        };
        let sink = logs.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                sink.push(line);
            }
            ended.send_replace(true);
        });
        logs
    }

    /// Waits until the collected stream has ended (the process closed it, usually by
    /// exiting), so that [`text`](Self::text) holds every line it wrote.
    pub async fn ended(&self) {
        // An error means the collecting task is gone: nothing more will come either way.
        let _ = self.ended.clone().wait_for(|e| *e).await;
    }

    fn push(&self, line: String) {
        self.lines.lock().expect("log lines").push(line);
    }

    /// Everything so far, one line each.
    pub fn text(&self) -> String {
        self.lines.lock().expect("log lines").join("\n")
    }
}

impl AgentProcess {
    /// Writes `cfg` to a file and runs `tether-agent run --config` on it.
    pub fn spawn(cfg: &AgentConfig) -> AgentProcess {
        Self::spawn_with(cfg, tokio::process::Command::new(binary("tether-agent")))
    }

    /// Runs it with extra environment variables (e.g. `RUST_LOG`, AWS credentials), keeping
    /// its log ([`logs`](Self::logs)).
    pub fn spawn_env(cfg: &AgentConfig, env: &[(&str, &str)]) -> AgentProcess {
        let mut command = tokio::process::Command::new(binary("tether-agent"));
        command.envs(env.iter().copied());
        Self::spawn_with(cfg, command)
    }

    /// What it logged so far.
    pub fn logs(&self) -> String {
        self.logs.text()
    }

    /// Waits up to `timeout` for the process to exit and for its log to be read to the end;
    /// panics if it does not exit in time.
    pub async fn exit_within(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("tether-agent still running after {timeout:?}"))
            .expect("wait for tether-agent");
        self.logs.ended().await;
        status
    }

    /// The same, inside network namespace `ns`.
    pub fn spawn_netns(cfg: &AgentConfig, ns: &netns::Netns) -> AgentProcess {
        Self::spawn_with(cfg, ns.command(binary("tether-agent")))
    }

    /// Inside network namespace `ns` with extra environment variables (e.g. `RUST_LOG`,
    /// `HTTPS_PROXY`), keeping its log ([`logs`](Self::logs)).
    pub fn spawn_netns_env(
        cfg: &AgentConfig,
        ns: &netns::Netns,
        env: &[(&str, &str)],
    ) -> AgentProcess {
        let mut command = ns.command(binary("tether-agent"));
        command.envs(env.iter().copied());
        Self::spawn_with(cfg, command)
    }

    /// The config file it runs with (`tether-agent … --config` for its other subcommands).
    pub fn config_path(&self) -> PathBuf {
        self._dir.path().join("agent.toml")
    }

    /// Writes `cfg` over its config file (as `spawn` wrote it), for the agent to reload.
    pub fn rewrite_config(&self, cfg: &AgentConfig) {
        write_agent_config(&self.config_path(), cfg);
    }

    fn spawn_with(cfg: &AgentConfig, mut command: tokio::process::Command) -> AgentProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        write_agent_config(&path, cfg);
        if !command.as_std().get_envs().any(|(k, _)| k == "RUST_LOG") {
            command.env("RUST_LOG", "warn");
        }
        let mut child = command
            .args(["run", "--config"])
            .arg(&path)
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tether-agent");
        let logs = LogLines::collect(child.stderr.take().expect("stderr"));
        let stdout = LogLines::collect(child.stdout.take().expect("stdout"));
        AgentProcess {
            child,
            logs,
            stdout,
            _dir: dir,
        }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.child.id().expect("child running") as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("kill");
    }
}

/// Writes an agent config file as [`AgentProcess`] runs it: the ops endpoint on a free
/// loopback port (the agent writes where to `state_dir/ops.addr`).
pub fn write_agent_config(path: &Path, cfg: &AgentConfig) {
    let mut cfg = cfg.clone();
    cfg.ops.listen = "127.0.0.1:0".parse().expect("addr");
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, toml::to_string(&cfg).expect("serialize agent config"))
        .expect("write config");
    // Renamed into place, as a ConfigMap volume does: a reader never sees half a file.
    std::fs::rename(&tmp, path).expect("install config");
}

/// Reads a counter or gauge from this process's metrics (0 when absent). Labels as `k="v"`.
pub fn metric(name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = tether_runtime::ops::metrics_handle().render();
    let want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && want.iter().all(|w| rest.contains(w.as_str())))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A bare QUIC client with an agent certificate, to misbehave on purpose.
pub struct RawAgent {
    /// The endpoint.
    pub endpoint: quinn::Endpoint,
}

impl RawAgent {
    /// A client presenting `files` (or no certificate) and offering `alpn`.
    pub fn new(files: &CertFiles, with_cert: bool, alpn: &[u8]) -> RawAgent {
        init();
        let roots = tether_runtime::tls::load_roots(&files.ca).expect("roots");
        let b = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_root_certificates(roots);
        let mut tls = if with_cert {
            b.with_client_auth_cert(
                tether_runtime::tls::load_certs("cert", &files.cert).expect("cert"),
                tether_runtime::tls::load_key(&files.key).expect("key"),
            )
            .expect("client auth")
        } else {
            b.with_no_client_auth()
        };
        tls.alpn_protocols = vec![alpn.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
        let mut endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        RawAgent { endpoint }
    }

    /// Connects, opens the control stream, writes `bytes`, and returns how the gateway ended
    /// the connection (waits up to 10 s).
    pub async fn send_and_wait_close(
        &self,
        gateway: SocketAddr,
        bytes: &[u8],
    ) -> Result<quinn::ConnectionError, String> {
        let conn = self
            .endpoint
            .connect(gateway, "localhost")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let work = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open_bi: {e}"))?;
            if let Err(e) = send.write_all(bytes).await {
                return match e {
                    quinn::WriteError::ConnectionLost(c) => Ok(c),
                    other => Err(format!("write: {other}")),
                };
            }
            let mut buf = [0u8; 1024];
            loop {
                match recv.read(&mut buf).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return Ok(conn.closed().await),
                    Err(quinn::ReadError::ConnectionLost(e)) => return Ok(e),
                    Err(e) => return Err(format!("read: {e}")),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), work)
            .await
            .map_err(|_| "gateway did not close the connection within 10s".to_string())?
    }
}

/// A gateway that completes `Hello`/`Welcome`, announces end-to-end probes every
/// `probe_interval` and answers heartbeats, but never probes: to an agent, a wedged gateway.
pub struct SilentGateway {
    /// Where it listens (UDP).
    pub addr: SocketAddr,
    sessions: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentGateway {
    /// Starts one with `pki`'s gateway certificate on a free loopback port.
    pub async fn start(pki: &Pki, probe_interval: Duration) -> SilentGateway {
        use tunnel_proto::session::{GatewaySession, GatewaySessionConfig};
        init();
        let cfg = TestGateway::config(pki);
        let material = tether_gateway::tls::TlsMaterial::load(&cfg.tls).expect("TLS material");
        let tls =
            tether_gateway::tunnel::tls::tls_config(&cfg, &material, Arc::default()).expect("tls");
        let server = tether_gateway::tunnel::tls::server_config(&cfg, tls).expect("server config");
        let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().expect("addr"))
            .expect("endpoint");
        let addr = endpoint.local_addr().expect("addr");
        let sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = sessions.clone();
        let task = tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                        return;
                    };
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let mut sc = GatewaySessionConfig::new("silent".into());
                    sc.heartbeat_interval = Duration::from_secs(1);
                    sc.probe_interval = probe_interval;
                    let mut session = GatewaySession::new(sc, Instant::now());
                    let mut buf = vec![0u8; 4096];
                    loop {
                        while let Some(b) = session.poll_transmit() {
                            if send.write_all(&b).await.is_err() {
                                return;
                            }
                        }
                        while session.poll_event().is_some() {}
                        if session.is_closed() {
                            return;
                        }
                        let at = session
                            .poll_timeout()
                            .unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
                        tokio::select! {
                            r = recv.read(&mut buf) => match r {
                                Ok(Some(n)) => session.handle_input(&buf[..n], Instant::now()),
                                _ => return,
                            },
                            _ = tokio::time::sleep_until(at.into()) => session.handle_timeout(Instant::now()),
                        }
                    }
                });
            }
        });
        SilentGateway {
            addr,
            sessions,
            task,
        }
    }

    /// Sessions established so far.
    pub fn sessions(&self) -> usize {
        self.sessions.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for SilentGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The QUIC application close code of a connection error, if it was an application close.
pub fn app_close_code(e: &quinn::ConnectionError) -> Option<u64> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => Some(c.error_code.into()),
        _ => None,
    }
}

// === Relay helpers ===

pub use tether_gateway::tools::demo::{EchoService, Observed};

/// The demo upstream (Echo, health, reflection) on a free loopback port.
pub struct DemoUpstream {
    /// Where it listens (plain HTTP/2).
    pub addr: SocketAddr,
    /// What it observed.
    pub observed: Arc<Observed>,
    shutdown: CancellationToken,
}

impl DemoUpstream {
    /// Starts it.
    pub async fn start() -> DemoUpstream {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        Self::serve(l)
    }

    /// Starts it on `listener` (bound elsewhere, e.g. in a network namespace).
    pub fn start_on(listener: std::net::TcpListener) -> DemoUpstream {
        listener.set_nonblocking(true).expect("nonblocking");
        Self::serve(tokio::net::TcpListener::from_std(listener).expect("tokio listener"))
    }

    fn serve(l: tokio::net::TcpListener) -> DemoUpstream {
        let addr = l.local_addr().expect("addr");
        let echo = EchoService::default();
        let observed = echo.observed.clone();
        let shutdown = CancellationToken::new();
        tokio::spawn(tether_gateway::tools::demo::serve(
            l,
            echo,
            shutdown.clone(),
        ));
        DemoUpstream {
            addr,
            observed,
            shutdown,
        }
    }

    /// `http://addr`, for a service map.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for DemoUpstream {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Adds an allow-listed service to an agent config.
pub fn with_service(
    cfg: &mut AgentConfig,
    name: &str,
    address: &str,
    kind: tether_agent::config::ServiceKind,
) {
    cfg.services.insert(
        name.to_owned(),
        tether_agent::config::ServiceConfig {
            address: address.to_owned(),
            kind,
            ca: None,
            server_name: None,
        },
    );
}

/// Adds `tether-agent` / `tether-service` metadata to every call.
#[derive(Clone, Debug)]
pub struct Route {
    agent: Option<String>,
    service: Option<String>,
}

impl Route {
    /// Routes to `agent` (raw text, so tests can send malformed ids), optionally a service.
    pub fn new(agent: Option<&str>, service: Option<&str>) -> Route {
        Route {
            agent: agent.map(str::to_owned),
            service: service.map(str::to_owned),
        }
    }
}

impl tonic::service::Interceptor for Route {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(a) = &self.agent {
            req.metadata_mut()
                .insert("tether-agent", a.parse().expect("ascii agent id"));
        }
        if let Some(s) = &self.service {
            req.metadata_mut()
                .insert("tether-service", s.parse().expect("ascii service"));
        }
        Ok(req)
    }
}

/// A channel through the gateway with routing metadata.
pub type Routed = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Route>;

/// An Echo client that reaches the demo upstream through the gateway and `agent`.
pub async fn echo_via(
    gw: &TestGateway,
    pki: &Pki,
    route: Route,
) -> tether_api::demo::v1::echo_client::EchoClient<Routed> {
    let ch = gw
        .channel(&pki.client("api"))
        .await
        .expect("northbound connect");
    tether_api::demo::v1::echo_client::EchoClient::with_interceptor(ch, route)
        .max_decoding_message_size(16 << 20)
}

/// An Echo request carrying `message`.
pub fn echo_req(message: &str) -> tether_api::demo::v1::EchoRequest {
    tether_api::demo::v1::EchoRequest {
        message: message.into(),
        ..Default::default()
    }
}

/// Makes one call of each shape through `echo` and checks the answers: unary, server
/// streaming (5 replies in order), client streaming (3 requests folded into one reply), and
/// bidi with each reply arriving while the request stream is still open.
pub async fn call_every_shape(echo: &mut tether_api::demo::v1::echo_client::EchoClient<Routed>) {
    use tokio_stream::StreamExt;
    let t = Duration::from_secs(30);
    let r = echo.unary(echo_req("unary")).await.expect("unary");
    assert_eq!(r.into_inner().message, "unary");
    let mut stream = echo
        .server_stream(tether_api::demo::v1::EchoRequest {
            message: "s".into(),
            repeat: 5,
            ..Default::default()
        })
        .await
        .expect("server stream")
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.next().await {
        got.push(m.expect("server stream reply").index);
    }
    assert_eq!(got, vec![0, 1, 2, 3, 4]);
    let resp = echo
        .client_stream(tokio_stream::iter(["a", "b", "c"].map(echo_req)))
        .await
        .expect("client stream")
        .into_inner();
    assert_eq!((resp.message.as_str(), resp.index), ("abc", 3));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = echo
        .bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("bidi")
        .into_inner();
    for i in 0..3 {
        tx.send(echo_req(&format!("m{i}"))).await.expect("send");
        let m = tokio::time::timeout(t, replies.next())
            .await
            .expect("bidi reply in time")
            .expect("bidi reply")
            .expect("bidi reply ok");
        assert_eq!(m.message, format!("m{i}"));
    }
    drop(tx);
    assert!(replies.next().await.is_none());
}

/// A TCP upstream that echoes everything and half-closes after the client half-closes.
pub async fn tcp_echo_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind tcp echo");
    tcp_echo_serve(l)
}

/// The same echo on `listener` (bound elsewhere, e.g. in a network namespace).
pub fn tcp_echo_on(listener: std::net::TcpListener) -> SocketAddr {
    listener.set_nonblocking(true).expect("nonblocking");
    tcp_echo_serve(tokio::net::TcpListener::from_std(listener).expect("tokio listener"))
}

fn tcp_echo_serve(l: tokio::net::TcpListener) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = s.into_split();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if wr.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = wr.shutdown().await;
            });
        }
    });
    addr
}

/// File descriptors a process holds (entries of `/proc/<pid>/fd`).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc fd")
        .count()
}

/// CPU time a process has used, user and system, in clock ticks (`/proc/<pid>/stat`).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // After the command name in parentheses: state is field 3, utime and stime 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc status")
}

/// A real `tether-gateway serve` process on free loopback ports.
pub struct GatewayProcess {
    /// The child.
    pub child: tokio::process::Child,
    /// Tunnel (UDP) address.
    pub tunnel: SocketAddr,
    /// Northbound address.
    pub northbound: SocketAddr,
    /// Ops (metrics, health) address.
    pub ops: SocketAddr,
    logs: LogLines,
    _dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// Starts one with `pki` and reads its bound addresses from its JSON log.
    pub async fn spawn(pki: &Pki) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        Self::spawn_in(pki, dir, &data, [any; 3], None, "info", "").await
    }

    /// As [`spawn`](Self::spawn), with `extra` appended to its config file (new TOML tables,
    /// e.g. `[limits]`).
    pub async fn spawn_configured(pki: &Pki, extra: &str) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        Self::spawn_in(pki, dir, &data, [any; 3], None, "info", extra).await
    }

    /// As [`spawn_configured`](Self::spawn_configured), keeping its state in `data_dir` (a
    /// restart on the same directory finds it again).
    pub async fn spawn_configured_in(pki: &Pki, data_dir: &Path, extra: &str) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        Self::spawn_in(pki, dir, data_dir, [any; 3], None, "info", extra).await
    }

    /// As [`spawn_configured`](Self::spawn_configured), allowed at most `nofile` open files
    /// (soft and hard limit, set by util-linux `prlimit` before it starts).
    pub async fn spawn_limited(pki: &Pki, extra: &str, nofile: u64) -> GatewayProcess {
        let prlimit = ["/usr/bin/prlimit", "/bin/prlimit"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("prlimit (util-linux) is missing: apt-get install util-linux");
        let mut command = tokio::process::Command::new(prlimit);
        command
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(binary("tether-gateway"));
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        Self::spawn_command(pki, dir, &data, [any; 3], command, "info", extra).await
    }

    /// Starts one inside network namespace `ns`: its tunnel on `tunnel`, northbound and ops on
    /// free ports of `api` (port 0 for any).
    pub async fn spawn_netns(
        pki: &Pki,
        ns: &netns::Netns,
        tunnel: SocketAddr,
        api: std::net::IpAddr,
    ) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let api = SocketAddr::new(api, 0);
        Self::spawn_in(pki, dir, &data, [tunnel, api, api], Some(ns), "info", "").await
    }

    /// As [`spawn_netns`](Self::spawn_netns), with `extra` appended to its config file.
    pub async fn spawn_netns_configured(
        pki: &Pki,
        ns: &netns::Netns,
        tunnel: SocketAddr,
        api: std::net::IpAddr,
        extra: &str,
    ) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let api = SocketAddr::new(api, 0);
        Self::spawn_in(pki, dir, &data, [tunnel, api, api], Some(ns), "info", extra).await
    }

    /// As [`spawn_configured_at`](Self::spawn_configured_at), with `env` set (`TETHER_*` keys
    /// override the config file, e.g. `TETHER_TUNNEL_DRAIN_TIMEOUT`).
    pub async fn spawn_env_at(
        pki: &Pki,
        tunnel: SocketAddr,
        extra: &str,
        env: &[(&str, &str)],
    ) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut command = tokio::process::Command::new(binary("tether-gateway"));
        command.envs(env.iter().copied());
        Self::spawn_command(pki, dir, &data, [tunnel, any, any], command, "info", extra).await
    }

    /// As [`spawn_configured`](Self::spawn_configured), its tunnel on `tunnel`.
    pub async fn spawn_configured_at(pki: &Pki, tunnel: SocketAddr, extra: &str) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        Self::spawn_in(pki, dir, &data, [tunnel, any, any], None, "info", extra).await
    }

    /// Starts one keeping its command store in `data_dir`, its tunnel on `tunnel` (port 0 for
    /// any; a restart passes the previous address so agents find it again).
    pub async fn spawn_with(pki: &Pki, data_dir: &Path, tunnel: SocketAddr) -> GatewayProcess {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let dir = tempfile::tempdir().expect("tempdir");
        Self::spawn_in(pki, dir, data_dir, [tunnel, any, any], None, "info", "").await
    }

    /// As [`spawn_with`](Self::spawn_with), logging at `rust_log` (a tracing filter).
    pub async fn spawn_logging(
        pki: &Pki,
        data_dir: &Path,
        tunnel: SocketAddr,
        rust_log: &str,
    ) -> GatewayProcess {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let dir = tempfile::tempdir().expect("tempdir");
        Self::spawn_in(pki, dir, data_dir, [tunnel, any, any], None, rust_log, "").await
    }

    /// `listen`: tunnel, northbound, ops.
    async fn spawn_in(
        pki: &Pki,
        dir: tempfile::TempDir,
        data_dir: &Path,
        listen: [SocketAddr; 3],
        ns: Option<&netns::Netns>,
        rust_log: &str,
        extra: &str,
    ) -> GatewayProcess {
        let command = match ns {
            Some(ns) => ns.command(binary("tether-gateway")),
            None => tokio::process::Command::new(binary("tether-gateway")),
        };
        Self::spawn_command(pki, dir, data_dir, listen, command, rust_log, extra).await
    }

    /// Runs `command` (the gateway binary, or a wrapper running it) with a config of `listen`
    /// plus `extra`.
    async fn spawn_command(
        pki: &Pki,
        dir: tempfile::TempDir,
        data_dir: &Path,
        listen: [SocketAddr; 3],
        mut command: tokio::process::Command,
        rust_log: &str,
        extra: &str,
    ) -> GatewayProcess {
        use tokio::io::AsyncBufReadExt;
        let [mut tunnel, northbound, ops] = listen;
        // Restartable on the same port: one below the ephemeral range, which no socket bound
        // to port 0 elsewhere (another test's agent, say) can take while it is stopped.
        if tunnel.port() == 0 && tunnel.ip().is_loopback() {
            tunnel = restartable_port(tunnel.ip());
        }
        let tls = pki.gateway_tls();
        let cfg = format!(
            "trust_domain = \"{}\"\ndata_dir = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[tunnel]\nlisten = \"{tunnel}\"\nheartbeat_interval = \"500ms\"\ndrain_timeout = \"0s\"\n[northbound]\nlisten = \"{northbound}\"\n[ops]\nlisten = \"{ops}\"\n[commands]\nretry_backoff = \"50ms\"\nmax_retry_backoff = \"500ms\"\n",
            pki.ca.trust_domain,
            data_dir.display(),
            tls.ca.display(),
            tls.cert.display(),
            tls.key.display()
        );
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, cfg + extra).expect("write gateway config");
        let mut child = command
            .args(["serve", "--log-format", "json", "--config"])
            .arg(&path)
            .env("RUST_LOG", rust_log)
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tether-gateway");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let logs = LogLines::default();
        let found = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(line)) = lines.next_line().await {
                logs.push(line.clone());
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if v["message"] == "gateway listening" {
                    let addr = |k: &str| {
                        v[k].as_str()
                            .and_then(|s| s.parse().ok())
                            .expect("address in log")
                    };
                    return Some((addr("tunnel"), addr("northbound"), addr("ops")));
                }
            }
            None
        })
        .await
        .unwrap_or_else(|_| panic!("gateway started within 20s; its log:\n{}", logs.text()))
        .unwrap_or_else(|| {
            panic!(
                "gateway exited before printing its addresses; its log:\n{}",
                logs.text()
            )
        });
        // Keep reading its log so it never blocks on a full pipe.
        let sink = logs.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.push(line);
            }
        });
        GatewayProcess {
            child,
            tunnel: found.0,
            northbound: found.1,
            ops: found.2,
            logs,
            _dir: dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// What it logged so far (JSON lines).
    pub fn logs(&self) -> String {
        self.logs.text()
    }

    /// A metric from its `/metrics`, summed over the series whose labels contain `label`
    /// (`k="v"`, or empty for all).
    pub fn metric(&self, name: &str, label: &str) -> f64 {
        let (status, body) =
            tether_runtime::ops::probe(self.ops, "/metrics", Duration::from_secs(5))
                .expect("scrape the gateway's /metrics");
        assert_eq!(status, 200);
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                let series = l.split(' ').next().unwrap_or("");
                series.split('{').next() == Some(name) && series.contains(label)
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// A northbound channel with `files`.
    pub async fn channel(&self, files: &CertFiles) -> tonic::transport::Channel {
        ctl::connect(&Target {
            addr: self.northbound.to_string(),
            ca: files.ca.clone(),
            cert: files.cert.clone(),
            key: files.key.clone(),
            server_name: Some("localhost".into()),
        })
        .await
        .expect("connect to gateway process")
    }
}

/// Config tables (to append with [`GatewayProcess::spawn_configured`]) that make a gateway
/// process replica `id` of a cluster on the PostgreSQL at `dsn`: liveness renewed every 200 ms
/// and expiring after 1.5 s, so tests see a dead replica go within seconds.
pub fn replica_config(dsn: &str, id: &str) -> String {
    format!(
        "[store]\ndsn = \"{dsn}\"\nconnect_timeout = \"20s\"\n[cluster]\nreplica_id = \"{id}\"\nadvertise = \"127.0.0.1:7445\"\nheartbeat_interval = \"200ms\"\nliveness_timeout = \"1500ms\"\n"
    )
}

impl AgentProcess {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }
}

/// What a raw gRPC call got back.
#[derive(Debug)]
pub struct RawReply {
    /// Response headers.
    pub headers: http::HeaderMap,
    /// Body bytes.
    pub body: Vec<u8>,
    /// Trailers (or the headers, for a trailers-only response).
    pub trailers: http::HeaderMap,
}

impl RawReply {
    /// The `grpc-status`, from trailers or a trailers-only response.
    pub fn grpc_status(&self) -> Option<i32> {
        self.trailers
            .get("grpc-status")
            .or_else(|| self.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok()?.parse().ok())
    }
}

/// A gRPC call over a bare HTTP/2 client (h2 on rustls) with no timer of its own, so what comes
/// back is exactly what the gateway sent. `message` is an encoded protobuf request.
pub async fn raw_grpc_call(
    addr: SocketAddr,
    files: &CertFiles,
    path: &str,
    headers: &[(&str, &str)],
    message: &[u8],
) -> RawReply {
    let roots = tether_runtime::tls::load_roots(&files.ca).expect("roots");
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            tether_runtime::tls::load_certs("cert", &files.cert).expect("cert"),
            tether_runtime::tls::load_key(&files.key).expect("key"),
        )
        .expect("client auth");
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .expect("TLS");
    let (mut client, conn) = h2::client::handshake(stream).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut req = http::Request::post(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (resp, mut send) = client
        .send_request(req.body(()).expect("request"), false)
        .expect("send");
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    send.send_data(framed.into(), true).expect("send body");
    let resp = resp.await.expect("response");
    let (parts, mut body) = resp.into_parts();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body chunk");
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.expect("trailers").unwrap_or_default();
    RawReply {
        headers: parts.headers,
        body: bytes,
        trailers,
    }
}

// === Commands helpers ===

pub use tether_agent::commands::{Handlers, ProgressSink};
use tether_api::v1::{Command, CommandState};

/// A `tether.v1.Commands` client.
pub type CommandsClient =
    tether_api::v1::commands_client::CommandsClient<tonic::transport::Channel>;

/// A Commands client over `channel`, taking replies as large as any payload.
pub fn commands_client(channel: tonic::transport::Channel) -> CommandsClient {
    CommandsClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

impl TestGateway {
    /// A Commands client authenticated as control-plane caller `api`.
    pub async fn commands(&self, pki: &Pki) -> CommandsClient {
        commands_client(
            self.channel(&pki.client("api"))
                .await
                .expect("northbound connect"),
        )
    }
}

impl TestAgent {
    /// Starts an agent (no ops listener) with its own command handler registry.
    pub fn start_with_handlers(cfg: &AgentConfig, handlers: Arc<Handlers>) -> TestAgent {
        let shutdown = CancellationToken::new();
        let handle = tether_agent::start_with_handlers(cfg, None, shutdown.clone(), handlers)
            .expect("agent start");
        TestAgent { handle, shutdown }
    }
}

/// The built-in handlers plus the test-only `panic` kind (panics with the payload as message).
pub fn test_handlers() -> Arc<Handlers> {
    let h = Handlers::with_builtins();
    h.register(
        "panic",
        |payload: bytes::Bytes, _p: ProgressSink| async move {
            let msg = String::from_utf8_lossy(&payload).into_owned();
            if !msg.is_empty() {
                panic!("{msg}");
            }
            Ok(payload)
        },
    );
    Arc::new(h)
}

/// A Submit request with the usual defaults.
pub fn submit_req(
    agent: &str,
    kind: &str,
    payload: impl Into<Vec<u8>>,
) -> tether_api::v1::SubmitCommandRequest {
    tether_api::v1::SubmitCommandRequest {
        agent: agent.to_owned(),
        kind: kind.to_owned(),
        payload: payload.into(),
        content_type: "text/plain".into(),
        ..Default::default()
    }
}

/// Polls `Agents/Get` on `channel` until `agent` is connected (or panics after `timeout`).
pub async fn wait_connected(channel: tonic::transport::Channel, agent: &str, timeout: Duration) {
    let mut agents = tether_api::v1::agents_client::AgentsClient::new(channel);
    let deadline = Instant::now() + timeout;
    loop {
        let got = agents
            .get(tether_api::v1::GetAgentRequest {
                agent: agent.to_owned(),
            })
            .await;
        if got.is_ok_and(|a| a.into_inner().connected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "agent {agent} not connected after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True for Succeeded, Failed, Expired and Cancelled.
pub fn is_final(c: &Command) -> bool {
    matches!(
        c.state(),
        CommandState::Succeeded
            | CommandState::Failed
            | CommandState::Expired
            | CommandState::Cancelled
    )
}

/// Polls `Get` until the command is in a final state (or panics after `timeout`).
pub async fn wait_final(client: &mut CommandsClient, id: &str, timeout: Duration) -> Command {
    wait_command(client, id, timeout, "final", is_final).await
}

/// Polls `Commands/Get` until command `id` is in `state` (or panics after `timeout`, naming the
/// state it stayed in).
pub async fn wait_command_state(
    client: &mut CommandsClient,
    id: &str,
    state: tether_api::v1::CommandState,
    timeout: Duration,
) -> Command {
    wait_command(client, id, timeout, state.as_str_name(), |c| {
        c.state() == state
    })
    .await
}

async fn wait_command(
    client: &mut CommandsClient,
    id: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Command) -> bool,
) -> Command {
    let deadline = Instant::now() + timeout;
    loop {
        let c = client
            .get(tether_api::v1::GetCommandRequest { id: id.to_owned() })
            .await
            .expect("get command")
            .into_inner();
        if done(&c) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "command {id} not {what} after {timeout:?}: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === Audit events ===

/// The audit events (tracing target `tether::audit`) of gateways running in this process, each
/// as its fields (`caller`, `kind`, `method`, `tenant`, `agent`, `decision`, `reason`, ...).
#[derive(Clone, Debug, Default)]
pub struct AuditLog(Arc<std::sync::Mutex<Vec<std::collections::BTreeMap<String, String>>>>);

impl AuditLog {
    /// The process's audit log: installs a global subscriber that keeps audit events and
    /// prints the rest as [`init`] does. Call it before anything logs (before [`Pki::new`]).
    pub fn install() -> AuditLog {
        use tracing_subscriber::Layer as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        static LOG: std::sync::OnceLock<AuditLog> = std::sync::OnceLock::new();
        LOG.get_or_init(|| {
            let log = AuditLog::default();
            let fmt = tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
                );
            let audit = log
                .clone()
                .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                    m.target() == tether_gateway::northbound::auth::AUDIT_TARGET
                }));
            let _ = tracing_subscriber::registry()
                .with(fmt)
                .with(audit)
                .try_init();
            log
        })
        .clone()
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<std::collections::BTreeMap<String, String>> {
        self.0.lock().expect("audit log").clone()
    }

    /// The events whose fields include all of `want`.
    pub fn matching(
        &self,
        want: &[(&str, &str)],
    ) -> Vec<std::collections::BTreeMap<String, String>> {
        self.events()
            .into_iter()
            .filter(|e| want.iter().all(|(k, v)| e.get(*k).is_some_and(|x| x == v)))
            .collect()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for AuditLog {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Fields(std::collections::BTreeMap<String, String>);
        impl tracing::field::Visit for Fields {
            fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
                self.0.insert(f.name().to_owned(), v.to_owned());
            }
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                self.0.insert(f.name().to_owned(), format!("{v:?}"));
            }
        }
        let mut fields = Fields(Default::default());
        event.record(&mut fields);
        self.0.lock().expect("audit log").push(fields.0);
    }
}

// === Replicas with peer links ===

impl Pki {
    /// A gateway replica's peer certificate (`spiffe://<td>/gateway/<replica>`).
    pub fn peer(&self, replica: &str) -> CertFiles {
        self.write(
            &self
                .ca
                .issue_gateway(replica, pki::PEER_TTL)
                .expect("issue peer"),
        )
    }
}

/// Config tables (to append with [`GatewayProcess::spawn_configured`]) that make a gateway
/// process replica `id` of a cluster on the PostgreSQL at `dsn`, linked to its peers: its peer
/// listener on a free port of `peer_ip` (advertised as bound), its peer certificate from `pki`,
/// liveness renewed every 200 ms and expiring after 1.5 s, peers probed every 200 ms.
pub fn peer_replica_config(dsn: &str, id: &str, pki: &Pki, peer_ip: std::net::IpAddr) -> String {
    let peer = pki.peer(id);
    format!(
        "[store]\ndsn = \"{dsn}\"\nconnect_timeout = \"20s\"\n[cluster]\nreplica_id = \"{id}\"\npeer_listen = \"{}\"\npeer_cert = \"{}\"\npeer_key = \"{}\"\nheartbeat_interval = \"200ms\"\nliveness_timeout = \"1500ms\"\n",
        SocketAddr::new(peer_ip, 0),
        peer.cert.display(),
        peer.key.display()
    )
}

impl GatewayProcess {
    /// Where its peer listener is bound (from its `gateway listening` log line).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.logs().lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            if v["message"] != "gateway listening" {
                return None;
            }
            v["peer"].as_str()?.parse().ok()
        })
    }

    /// True when its link to `peer` is up (`tether_gateway_peer_up`).
    pub fn peer_up(&self, peer: &str) -> bool {
        self.metric("tether_gateway_peer_up", &format!("peer=\"{peer}\"")) >= 1.0
    }

    /// Streams it forwarded to `peer` (`out`, every attempt) or carried for `peer` (`in`).
    pub fn forwarded(&self, peer: &str, direction: &str) -> f64 {
        self.metric_with(
            "tether_gateway_peer_forwarded_streams_total",
            &[
                &format!("peer=\"{peer}\""),
                &format!("direction=\"{direction}\""),
            ],
        )
    }

    /// A metric from its `/metrics`, summed over the series whose labels contain every one of
    /// `labels` (`k="v"` each).
    pub fn metric_with(&self, name: &str, labels: &[&str]) -> f64 {
        let (status, body) =
            tether_runtime::ops::probe(self.ops, "/metrics", Duration::from_secs(5))
                .expect("scrape the gateway's /metrics");
        assert_eq!(status, 200);
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                let series = l.split(' ').next().unwrap_or("");
                series.split('{').next() == Some(name) && labels.iter().all(|x| series.contains(x))
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }
}

pub use tether_gateway::tools::ports::restartable_port;

/// The built `tetherctl`, pointed at the northbound API at `northbound` as the caller of
/// `files` (TLS name `localhost`, no dev.json); add the subcommand.
pub fn tetherctl_at(northbound: SocketAddr, files: &CertFiles) -> std::process::Command {
    let mut c = std::process::Command::new(binary("tetherctl"));
    c.arg("--northbound")
        .arg(northbound.to_string())
        .arg("--ca")
        .arg(&files.ca)
        .arg("--cert")
        .arg(&files.cert)
        .arg("--key")
        .arg(&files.key)
        .args(["--server-name", "localhost", "--dev-json", "/nonexistent"]);
    c
}

/// A loopback port nothing listens on (TCP and UDP), below the ephemeral range so that no
/// socket bound to port 0 (nor a TCP dial connecting to itself) takes it meanwhile.
pub fn closed_port() -> SocketAddr {
    restartable_port([127, 0, 0, 1].into())
}

/// Request headers a [`header_recorder`] saw, one map per request.
pub type Seen = std::sync::Arc<std::sync::Mutex<Vec<std::collections::HashMap<String, String>>>>;

/// A gRPC upstream (h2c) that records each request's headers and answers UNIMPLEMENTED.
pub async fn header_recorder() -> (std::net::SocketAddr, Seen) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Seen = Default::default();
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let headers = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                            .collect();
                        sink.lock().unwrap().push(headers);
                        async move {
                            let resp = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .header("grpc-status", "12")
                                .body(http_body_util::Empty::<bytes::Bytes>::new())
                                .unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
    (addr, seen)
}

/// A span an [`OtlpCollector`] received: the exporting service (`service.name`) and the span.
#[derive(Clone, Debug)]
pub struct CollectedSpan {
    /// `service.name` of the resource that exported it.
    pub service: String,
    /// The span as exported.
    pub span: opentelemetry_proto::tonic::trace::v1::Span,
}

/// An OTLP/gRPC trace collector on a free loopback port (opentelemetry-proto's tonic
/// `TraceService`), keeping every span it receives.
pub struct OtlpCollector {
    /// `http://127.0.0.1:port`, for `telemetry.otlp_endpoint`.
    pub endpoint: String,
    spans: std::sync::Arc<std::sync::Mutex<Vec<CollectedSpan>>>,
    shutdown: CancellationToken,
}

#[derive(Clone, Default)]
struct Collect(std::sync::Arc<std::sync::Mutex<Vec<CollectedSpan>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collect
{
    async fn export(
        &self,
        req: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let mut out = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s),
                    ) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    out.push(CollectedSpan {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

impl OtlpCollector {
    /// Starts listening.
    pub async fn start() -> OtlpCollector {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind collector");
        let endpoint = format!("http://{}", l.local_addr().expect("addr"));
        let collect = Collect::default();
        let spans = collect.0.clone();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(
                    opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(collect),
                )
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(l),
                    stop.cancelled_owned(),
                )
                .await;
        });
        OtlpCollector {
            endpoint,
            spans,
            shutdown,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for OtlpCollector {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
