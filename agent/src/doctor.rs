//! Feature layer: `tether-agent doctor`, the network preflight. It checks, in the order a
//! connection needs them, everything between this agent and its gateways, and says for each
//! what a network or platform team can act on:
//!
//! 1. the agent's certificate (readable, its identity, valid now by this machine's clock);
//! 2. `state_dir` (a directory, writable, not open to group or others);
//! 3. for each gateway: DNS; UDP and the QUIC handshake; TCP (directly, or the proxy from
//!    config or `HTTPS_PROXY`: reachable, CONNECT allowed, authentication) and the TLS
//!    handshake; a certificate not from `tls.ca` names its issuer (a TLS-inspecting middlebox
//!    re-signs with its own CA); then a session (`Hello`/`Welcome`: the gateway accepts this
//!    agent), and this machine's clock against the gateway's.
//!
//! The dials are the agent's own ([`Dialer`]), with the gateway-certificate check wrapped to
//! see what was presented. A session the doctor opens leaves at once (`GoAway`, every stream
//! refused with `REFUSED_STREAM`, which the gateway re-sends elsewhere), so nothing is ever
//! routed to it. An agent that cannot connect after it started runs the same checks, without
//! the session ([`at_start`]; the [`Report`] is in `/readyz` and `AgentInfo`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tether_runtime::tls;
use tether_runtime::transport::Link;
use tunnel_proto::ErrorCode;
use tunnel_proto::message::{Hello, LEAVE};
use tunnel_proto::session::{AgentEvent, AgentSession, AgentSessionConfig};

use crate::config::{AgentConfig, IdentitySource, TransportMode, split_host_port};
use crate::dialer::{DialError, DialFailure, Dialer, TcpFailure};
use crate::identity::Identity;
use crate::proxy::ProxyError;

/// Clock offsets from the gateway's up to this are fine.
const SKEW_OK: Duration = Duration::from_secs(30);
/// Beyond this, certificates issued now (backdated a minute) are refused: a failure.
const SKEW_FAIL: Duration = Duration::from_secs(300);

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Fine.
    Ok,
    /// Works, but something should be looked at.
    Warn,
    /// Broken.
    Fail,
    /// Not checked (an earlier check failed, or it does not apply).
    Skip,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "skip",
        }
    }
}

/// One check: what, how it came out, and what it found or what to do.
#[derive(Clone, Debug)]
pub struct Check {
    /// What was checked (`certificate`, `gw:7443 quic`, ...).
    pub name: String,
    /// How it came out.
    pub verdict: Verdict,
    /// What it found; for a failure, why and what to do.
    pub detail: String,
}

/// Every check, in order, and whether the agent can connect.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The checks.
    pub checks: Vec<Check>,
    /// Where a session was accepted (`<gateway> over quic`), if anywhere.
    pub connected: Vec<String>,
    /// When it was made.
    pub at: Option<SystemTime>,
}

impl Report {
    fn add(&mut self, name: impl Into<String>, verdict: Verdict, detail: impl Into<String>) {
        self.checks.push(Check {
            name: name.into(),
            verdict,
            detail: detail.into(),
        });
    }

    /// True when a session was accepted on some gateway over some transport.
    pub fn can_connect(&self) -> bool {
        !self.connected.is_empty()
    }

    /// The checks that failed, one line each.
    pub fn failures(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| c.verdict == Verdict::Fail)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect()
    }

    /// As `AgentInfo` carries it.
    pub fn to_proto(&self) -> tether_api::agent::v1::Preflight {
        use tether_api::agent::v1::{Preflight, PreflightCheck};
        Preflight {
            at_unix_ms: self
                .at
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64),
            can_connect: self.can_connect(),
            checks: self
                .checks
                .iter()
                .map(|c| PreflightCheck {
                    name: c.name.clone(),
                    verdict: c.verdict.label().to_lowercase(),
                    detail: c.detail.clone(),
                })
                .collect(),
        }
    }

    /// The report as `doctor` prints it.
    pub fn render(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            let _ = writeln!(
                out,
                "{:<4}  {:<width$}  {}",
                c.verdict.label(),
                c.name,
                c.detail
            );
        }
        if self.can_connect() {
            let _ = writeln!(
                out,
                "\nresult: the agent can connect ({})",
                self.connected.join("; ")
            );
        } else {
            let _ = writeln!(
                out,
                "\nresult: the agent cannot connect to any gateway; the FAIL lines above say why"
            );
        }
        out
    }
}

/// What a run includes.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Open a session after the handshake (`Hello`/`Welcome`, then leave), which proves the
    /// gateway accepts this agent and measures the clock. The agent's own preflight, run while
    /// it cannot connect, stops at the handshake: a session would show in the fleet.
    pub session: bool,
}

/// Runs every check against `cfg`, with a session ([`Options::session`]), as `tether-agent
/// doctor` does.
pub async fn run(cfg: &AgentConfig) -> Report {
    run_with(cfg, Options { session: true }).await
}

/// Runs every check against `cfg`. Never enrolls (a token is used once): an agent that has
/// not enrolled yet is checked for reachability and the gateway's certificate only.
pub async fn run_with(cfg: &AgentConfig, opts: Options) -> Report {
    tls::install_crypto_provider();
    let mut report = Report {
        at: Some(SystemTime::now()),
        ..Default::default()
    };
    let identity = identity(cfg, &mut report).await;
    state_dir(cfg, &mut report);
    let roots = match tls::load_roots(&cfg.tls.ca) {
        Ok(r) => Some(Arc::new(r)),
        Err(e) => {
            report.add(
                "tls.ca",
                Verdict::Fail,
                format!("{e}: the gateway's certificate cannot be checked; set tls.ca to the CA bundle of the gateway's PKI"),
            );
            None
        }
    };
    for gateway in &cfg.gateways {
        check_gateway(
            cfg,
            gateway,
            identity.as_ref(),
            roots.clone(),
            opts,
            &mut report,
        )
        .await;
    }
    report
}

/// The agent's certificate: readable, its identity, valid by this machine's clock.
async fn identity(cfg: &AgentConfig, report: &mut Report) -> Option<Identity> {
    let loaded = match &cfg.identity.source {
        IdentitySource::Files
            if cfg.enrolled_identity() && !crate::state::identity_files(cfg).0.exists() =>
        {
            report.add(
                "certificate",
                Verdict::Warn,
                "not enrolled yet: the agent enrolls with enrollment.token at its first start (the doctor does not spend the token); checking reachability and the gateway's certificate only",
            );
            return None;
        }
        IdentitySource::Files => Identity::from_files(cfg).map_err(|e| e.to_string()),
        IdentitySource::AwsSecretsManager(_) => {
            Identity::load(cfg).await.map_err(|e| e.to_string())
        }
    };
    let identity = match loaded {
        Ok(i) => i,
        Err(e) => {
            report.add(
                "certificate",
                Verdict::Fail,
                format!("{e}; the agent cannot present an identity: fix it before anything below can pass"),
            );
            return None;
        }
    };
    let Some(leaf) = identity.certs.first() else {
        report.add(
            "certificate",
            Verdict::Fail,
            "the certificate file holds no certificate",
        );
        return None;
    };
    match tls::validity(leaf) {
        Ok((not_before, not_after)) => {
            let now = SystemTime::now();
            if now < not_before {
                report.add(
                    "certificate",
                    Verdict::Fail,
                    format!(
                        "{} is not valid until {} ({} from now by this machine's clock): this machine's clock is behind, or the issuer's is ahead; fix the node's time sync (NTP, chrony)",
                        identity.agent,
                        rfc3339(not_before),
                        span(not_before.duration_since(now).unwrap_or_default())
                    ),
                );
            } else if now > not_after {
                report.add(
                    "certificate",
                    Verdict::Fail,
                    format!(
                        "{} expired at {} ({} ago): issue a new one (tether-gateway pki issue-agent) or enroll again with a new token",
                        identity.agent,
                        rfc3339(not_after),
                        span(now.duration_since(not_after).unwrap_or_default())
                    ),
                );
            } else {
                report.add(
                    "certificate",
                    Verdict::Ok,
                    format!(
                        "{}, valid until {} ({} left)",
                        identity.agent,
                        rfc3339(not_after),
                        span(not_after.duration_since(now).unwrap_or_default())
                    ),
                );
            }
        }
        Err(e) => report.add("certificate", Verdict::Fail, e.to_string()),
    }
    Some(identity)
}

/// `state_dir`: a directory the agent can write, closed to group and others.
fn state_dir(cfg: &AgentConfig, report: &mut Report) {
    let Some(dir) = &cfg.state_dir else {
        report.add(
            "state_dir",
            Verdict::Warn,
            "not set: completed command ids are kept in memory only, so a command may run again after a restart; set state_dir to a persistent volume",
        );
        return;
    };
    let shown = dir.display();
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
            let creatable = parent.is_none_or(|p| p.is_dir());
            report.add(
                "state_dir",
                if creatable { Verdict::Warn } else { Verdict::Fail },
                if creatable {
                    format!("{shown} does not exist yet; the agent creates it at start")
                } else {
                    format!("{shown} does not exist, nor does its parent: mount the volume there or set state_dir to a writable path")
                },
            );
            return;
        }
        Err(e) => {
            report.add("state_dir", Verdict::Fail, format!("{shown}: {e}"));
            return;
        }
    };
    if !meta.is_dir() {
        report.add(
            "state_dir",
            Verdict::Fail,
            format!("{shown} is not a directory"),
        );
        return;
    }
    let probe = dir.join(format!(".doctor-{}", std::process::id()));
    if let Err(e) = std::fs::write(&probe, b"") {
        report.add(
            "state_dir",
            Verdict::Fail,
            format!("{shown} is not writable by this user ({e}): give the agent's user (the chart's runAsUser) write access, e.g. with fsGroup"),
        );
        return;
    }
    let _ = std::fs::remove_file(&probe);
    use std::os::unix::fs::PermissionsExt as _;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        report.add(
            "state_dir",
            Verdict::Warn,
            format!(
                "{shown} is mode {mode:03o}: it holds the agent's key when enrolled; chmod 700"
            ),
        );
    } else {
        report.add(
            "state_dir",
            Verdict::Ok,
            format!("{shown}, mode {mode:03o}, writable"),
        );
    }
}

/// The checks of one gateway address.
async fn check_gateway(
    cfg: &AgentConfig,
    gateway: &str,
    identity: Option<&Identity>,
    roots: Option<Arc<rustls::RootCertStore>>,
    opts: Options,
    report: &mut Report,
) {
    let Some((host, port)) = split_host_port(gateway) else {
        report.add(
            gateway,
            Verdict::Fail,
            "not host:port (gateways entries look like gw.example.com:7443)",
        );
        return;
    };
    let timeout = cfg.reconnect.connect_timeout;
    // DNS.
    let resolved = tokio::time::timeout(timeout, tokio::net::lookup_host(gateway)).await;
    let addrs: Vec<SocketAddr> = match resolved {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => {
            report.add(
                format!("{gateway} dns"),
                Verdict::Fail,
                format!("cannot resolve {host}: {e}: check the cluster's DNS (and that the name is public or in a zone the cluster resolves)"),
            );
            Vec::new()
        }
        Err(_) => {
            report.add(
                format!("{gateway} dns"),
                Verdict::Fail,
                format!("resolving {host} took longer than {timeout:?}: the cluster's DNS does not answer"),
            );
            Vec::new()
        }
    };
    if !addrs.is_empty() {
        let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
        report.add(format!("{gateway} dns"), Verdict::Ok, shown.join(", "));
    }
    let Some(roots) = roots else {
        return;
    };
    let dns_ok = !addrs.is_empty();
    let hello = opts.session.then(|| hello(cfg));
    let mut presented: Vec<(&'static str, Option<String>)> = Vec::new();

    // UDP and QUIC.
    if cfg.transport.mode != TransportMode::Tcp {
        let name = format!("{gateway} quic");
        if !dns_ok {
            report.add(name, Verdict::Skip, "the name does not resolve");
        } else {
            let inspect = Inspect::new(roots.clone());
            match Dialer::inspecting(cfg, identity, inspect.0.clone()) {
                Ok(dialer) => {
                    let dial = tokio::time::timeout(timeout, dialer.dial(gateway)).await;
                    let outcome = match dial {
                        Ok(Ok((endpoint, link))) => {
                            let s = session(&link, hello.clone(), timeout).await;
                            link.close(ErrorCode::NO_ERROR, b"doctor: check done");
                            let _ =
                                tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle())
                                    .await;
                            Ok(s)
                        }
                        Ok(Err(e)) => Err(dial_failure(&e, &inspect, &roots)),
                        Err(_) => Err(format!(
                            "no answer over UDP within {timeout:?} (reconnect.connect_timeout): UDP to {host} port {port} is blocked on the way (allow egress UDP {port} to the gateway); the agent falls back to TCP on the same port"
                        )),
                    };
                    presented.push(("quic", inspect.issuer()));
                    report_transport(report, gateway, "quic", identity.is_some(), outcome);
                }
                Err(e) => report.add(name, Verdict::Fail, e.to_string()),
            }
        }
    }

    // TCP (and the proxy), TLS.
    if cfg.transport.mode != TransportMode::Quic {
        let name = format!("{gateway} tcp");
        let inspect = Inspect::new(roots.clone());
        match Dialer::inspecting(cfg, identity, inspect.0.clone()) {
            Ok(dialer) => {
                let proxy = dialer.proxy_for(host).map(|p| p.to_string());
                if proxy.is_none() && !dns_ok {
                    report.add(name, Verdict::Skip, "the name does not resolve");
                } else {
                    let dial = tokio::time::timeout(timeout, dialer.dial_tcp(gateway)).await;
                    let outcome = match dial {
                        Ok(Ok(link)) => {
                            if let Some(p) = &proxy {
                                report.add(
                                    format!("{gateway} proxy"),
                                    Verdict::Ok,
                                    format!("{p} allows CONNECT {gateway}"),
                                );
                            }
                            let s = session(&link, hello.clone(), timeout).await;
                            link.close(ErrorCode::NO_ERROR, b"doctor: check done");
                            let _ =
                                tokio::time::timeout(Duration::from_secs(1), link.closed()).await;
                            Ok(s)
                        }
                        Ok(Err(e)) => {
                            if let Some(p) = &proxy {
                                proxy_check(report, gateway, p, &e);
                            }
                            Err(dial_failure(&e, &inspect, &roots))
                        }
                        Err(_) => Err(match &proxy {
                            Some(p) => format!(
                                "no TLS handshake through proxy {p} within {timeout:?}: the proxy or what lies behind it does not pass the connection on"
                            ),
                            None => format!(
                                "no answer over TCP within {timeout:?}: TCP to {host} port {port} is dropped on the way (allow egress TCP {port} to the gateway, or set proxy.url if egress must go through a proxy)"
                            ),
                        }),
                    };
                    presented.push(("tcp", inspect.issuer()));
                    report_transport(report, gateway, "tcp", identity.is_some(), outcome);
                }
            }
            Err(e) => report.add(name, Verdict::Fail, e.to_string()),
        }
    }

    // A certificate from tls.ca on one path and another issuer on the other: something on
    // that path re-signs TLS.
    if let [(a, Some(ia)), (b, Some(ib))] = presented.as_slice()
        && ia != ib
    {
        report.add(
            format!("{gateway} middlebox"),
            Verdict::Fail,
            format!(
                "over {a} the gateway's certificate is issued by {ia}, over {b} by {ib}: a TLS-inspecting proxy or firewall on one path re-signs the connection; exempt {host}:{port} from TLS inspection (the agent pins the gateway's CA)"
            ),
        );
    }
}

/// What the proxy said, as its own line.
fn proxy_check(report: &mut Report, gateway: &str, proxy: &str, e: &DialError) {
    let DialFailure::Tcp(TcpFailure::Proxy(p)) = &e.failure else {
        report.add(
            format!("{gateway} proxy"),
            Verdict::Ok,
            format!("{proxy} allows CONNECT {gateway}"),
        );
        return;
    };
    let detail = match p {
        ProxyError::Connect { source, .. } => format!(
            "cannot reach proxy {proxy}: {source}: check proxy.url (or HTTPS_PROXY) and that the proxy runs"
        ),
        ProxyError::AuthenticationRequired {
            sent_credentials, ..
        } => {
            if *sent_credentials {
                format!(
                    "proxy {proxy} refused the credentials sent: check the user and password in proxy.url"
                )
            } else {
                format!(
                    "proxy {proxy} requires authentication: put the credentials in proxy.url (http://user:password@host:port)"
                )
            }
        }
        ProxyError::Refused { status, .. } => format!(
            "proxy {proxy} refused CONNECT {gateway} ({status}): allow CONNECT to {gateway} in the proxy's rules (ports other than 443 are often refused)"
        ),
        other => other.to_string(),
    };
    report.add(format!("{gateway} proxy"), Verdict::Fail, detail);
}

/// What came of a session attempt over a transport that connected.
struct SessionOutcome {
    /// `Welcome`'s replica and round trip (`None`: no session was asked for), or why there
    /// was none.
    result: Result<Option<(String, Duration)>, String>,
    /// How far this machine's clock is ahead of the gateway's (negative: behind).
    skew: Option<f64>,
}

fn report_transport(
    report: &mut Report,
    gateway: &str,
    transport: &str,
    has_identity: bool,
    outcome: Result<SessionOutcome, String>,
) {
    let name = format!("{gateway} {transport}");
    match outcome {
        Err(why) => report.add(name, Verdict::Fail, why),
        Ok(SessionOutcome { result: Ok(None), .. }) => {
            report.add(name, Verdict::Ok, "TLS handshake ok (certificate from tls.ca)");
            report.connected.push(format!("{gateway} over {transport}"));
        }
        Ok(SessionOutcome {
            result: Ok(Some((replica, rtt))),
            skew,
        }) => {
            report.add(
                name,
                Verdict::Ok,
                format!(
                    "TLS handshake ok (certificate from tls.ca); session accepted by {replica} in {:.1} ms",
                    rtt.as_secs_f64() * 1e3
                ),
            );
            report.connected.push(format!("{gateway} over {transport}"));
            if let Some(s) = skew {
                clock(report, gateway, s);
            }
        }
        Ok(SessionOutcome { result: Err(why), .. }) if !has_identity => report.add(
            name,
            Verdict::Warn,
            format!("TLS handshake ok (certificate from tls.ca); no session without the agent's certificate ({why})"),
        ),
        Ok(SessionOutcome { result: Err(why), .. }) => report.add(
            name,
            Verdict::Fail,
            format!("TLS handshake ok, but the gateway did not accept a session: {why}"),
        ),
    }
}

/// The clock check, once per gateway.
fn clock(report: &mut Report, gateway: &str, skew_s: f64) {
    let name = format!("{gateway} clock");
    if report.checks.iter().any(|c| c.name == name) {
        return;
    }
    // Whole seconds, rounded: a clock ten minutes off reads "10m 0s", not "9m 59s".
    let off = Duration::from_secs(skew_s.abs().round() as u64);
    let way = if skew_s > 0.0 { "ahead of" } else { "behind" };
    if off <= SKEW_OK {
        report.add(
            name,
            Verdict::Ok,
            format!("within {:.1} s of the gateway's", skew_s.abs()),
        );
    } else {
        report.add(
            name,
            if off > SKEW_FAIL { Verdict::Fail } else { Verdict::Warn },
            format!(
                "this machine's clock is {} {way} the gateway's: certificates are refused near their validity's edges (new ones are backdated only a minute) and tokens may look expired; fix the node's time sync (NTP, chrony)",
                span(off)
            ),
        );
    }
}

/// Why a dial failed, in words, with the certificate the gateway presented when this agent
/// did not trust it.
fn dial_failure(e: &DialError, inspect: &Inspect, roots: &rustls::RootCertStore) -> String {
    let base = e.to_string();
    match inspect.refusal() {
        Some((rustls::CertificateError::UnknownIssuer, issuer, subject))
        | Some((rustls::CertificateError::BadSignature, issuer, subject)) => {
            let trusted: Vec<String> = roots
                .roots
                .iter()
                .map(|r| tls::anchor_name(r.subject.as_ref()))
                .collect();
            format!(
                "the certificate presented ({subject}) is issued by {issuer}, which is not a CA in tls.ca ({}). If {issuer} is your organisation's TLS inspection CA, a middlebox intercepts the connection: exempt the gateway from inspection. Otherwise tls.ca is not the gateway PKI's CA bundle",
                trusted.join("; ")
            )
        }
        Some((
            rustls::CertificateError::NotValidYet
            | rustls::CertificateError::NotValidYetContext { .. },
            _,
            subject,
        )) => format!(
            "the gateway's certificate ({subject}) is not valid yet by this machine's clock ({}): this machine's clock is probably behind; fix the node's time sync (NTP, chrony)",
            rfc3339(SystemTime::now())
        ),
        Some((
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
            _,
            subject,
        )) => format!(
            "the gateway's certificate ({subject}) has expired by this machine's clock ({}): either the gateway's certificate needs renewing, or this machine's clock is ahead",
            rfc3339(SystemTime::now())
        ),
        Some((other, _, subject)) => {
            format!("this agent refused the gateway's certificate ({subject}): {other:?}. {base}")
        }
        None => base,
    }
}

/// The `Hello` of a doctor session: this agent's, offering only `leave`.
fn hello(cfg: &AgentConfig) -> Hello {
    Hello {
        versions: tunnel_proto::SUPPORTED_VERSIONS.to_vec(),
        agent_version: crate::VERSION.to_owned(),
        capabilities: vec![LEAVE.to_owned()],
        labels: cfg.labels.clone(),
        instance_id: format!(
            "{}-doctor",
            cfg.instance_id
                .clone()
                .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
                .unwrap_or_else(|| "agent".into())
        ),
        sessions_held: 0,
        avoid_replicas: Vec::new(),
        ..Default::default()
    }
}

/// `Hello`, then `Welcome` (or the gateway's refusal), then leaves: nothing is ever routed to
/// this session, and every stream the gateway opens on it is refused (`REFUSED_STREAM`: it
/// re-sends elsewhere).
async fn session(link: &Link, hello: Option<Hello>, timeout: Duration) -> SessionOutcome {
    let fail = |why: String| SessionOutcome {
        result: Err(why),
        skew: None,
    };
    let Some(hello) = hello else {
        return SessionOutcome {
            result: Ok(None),
            skew: None,
        };
    };
    // Over QUIC the agent opens the control stream; over HTTP/2 the gateway's first stream is.
    let control = match link {
        Link::Quic(_) => link.open().await.map_err(|e| e.to_string()),
        Link::H2(_) => tokio::time::timeout(timeout, link.accept())
            .await
            .ok()
            .flatten()
            .ok_or_else(|| format!("the gateway opened no control stream within {timeout:?}")),
    };
    let control = match control {
        Ok(c) => c,
        Err(e) => return fail(format!("control stream: {e}")),
    };
    // Every other stream the gateway opens is refused: nothing reaches this session.
    let refuse = {
        let link = link.clone();
        tokio::spawn(async move {
            while let Some((mut send, mut recv)) = link.accept().await {
                send.reset(ErrorCode::REFUSED_STREAM);
                recv.stop(ErrorCode::REFUSED_STREAM);
            }
        })
    };
    let outcome = tokio::time::timeout(timeout, handshake(control, hello))
        .await
        .unwrap_or_else(|_| fail(format!("no Welcome within {timeout:?}")));
    refuse.abort();
    outcome
}

async fn handshake(
    (mut send, mut recv): (
        tether_runtime::transport::SendStream,
        tether_runtime::transport::RecvStream,
    ),
    hello: Hello,
) -> SessionOutcome {
    let fail = |why: String| SessionOutcome {
        result: Err(why),
        skew: None,
    };
    let started = Instant::now();
    let sent_at = SystemTime::now();
    let mut session = AgentSession::new(AgentSessionConfig::new(hello), Instant::now());
    loop {
        while let Some(b) = session.poll_transmit() {
            if let Err(e) = send.write_all_chunks(&mut [b]).await {
                return fail(format!("writing Hello: {e}"));
            }
        }
        while let Some(ev) = session.poll_event() {
            match ev {
                AgentEvent::Established(w) => {
                    let rtt = started.elapsed();
                    session.leave("doctor: check done");
                    while let Some(b) = session.poll_transmit() {
                        let _ = send.write_all_chunks(&mut [b]).await;
                    }
                    let skew = (w.server_time_ms > 0).then(|| {
                        let mid = sent_at + rtt / 2;
                        let here = mid
                            .duration_since(UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs_f64();
                        here - w.server_time_ms as f64 / 1e3
                    });
                    let replica = if w.replica_id.is_empty() {
                        w.gateway_id
                    } else {
                        w.replica_id
                    };
                    return SessionOutcome {
                        result: Ok(Some((format!("gateway {replica}"), rtt))),
                        skew,
                    };
                }
                AgentEvent::Closed(c) => {
                    return fail(format!(
                        "the gateway closed the session: {} {}",
                        c.code, c.reason
                    ));
                }
                _ => {}
            }
        }
        match recv.read_chunk(64 * 1024).await {
            Ok(Some(data)) => session.handle_input(&data, Instant::now()),
            Ok(None) => session.handle_eof(Instant::now()),
            Err(e) => return fail(format!("the gateway ended the session: {e}")),
        }
    }
}

/// The usual check of the gateway's certificate (`tls.ca`), noting what was presented and
/// why it was refused.
#[derive(Clone)]
struct Inspect(Arc<tls::RecordingVerifier>);

impl Inspect {
    fn new(roots: Arc<rustls::RootCertStore>) -> Inspect {
        Inspect(
            tls::RecordingVerifier::new(roots).expect("a non-empty root store builds a verifier"),
        )
    }

    /// The issuer of the certificate presented, if one was.
    fn issuer(&self) -> Option<String> {
        let leaf = self.0.presented()?;
        tls::issuer_and_subject(&leaf).ok().map(|(i, _)| i)
    }

    /// Why the presented certificate was refused, with its issuer and subject.
    fn refusal(&self) -> Option<(rustls::CertificateError, String, String)> {
        let refused = self.0.refused()?;
        let (issuer, subject) = tls::issuer_and_subject(&self.0.presented()?).ok()?;
        Some((refused, issuer, subject))
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A duration as a person reads it: `10m 3s`, `23h 59m`, `89d`.
fn span(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d", s / 86_400),
    }
}

/// While the agent has had no session since it started, for twice `reconnect.connect_timeout`
/// and a second: runs the preflight (handshakes only, no session), logs what failed and keeps
/// the report for `/readyz` and `AgentInfo`; again every five minutes until a session is up.
/// Once the agent has connected, it is not run again: a later disconnection is reported by
/// the sessions themselves.
pub async fn at_start(
    cfg: AgentConfig,
    status: Arc<crate::status::AgentStatus>,
    shutdown: tether_runtime::CancellationToken,
) {
    let started = Instant::now();
    let grace = cfg.reconnect.connect_timeout * 2 + Duration::from_secs(1);
    let mut wait = grace;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if status.ever_connected() {
            return;
        }
        let report = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = run_with(&cfg, Options { session: false }) => r,
        };
        if status.ever_connected() {
            return;
        }
        if report.can_connect() {
            tracing::info!(
                "no session to any gateway yet, but the network preflight completed a handshake with one; the agent keeps dialing"
            );
        } else {
            tracing::warn!(
                failures = ?report.failures(),
                "no session to any gateway {} after start: the network preflight (the checks of `tether-agent doctor`) found the failures listed; /readyz shows them too",
                span(started.elapsed())
            );
        }
        status.set_preflight(report);
        wait = Duration::from_secs(300);
    }
}
