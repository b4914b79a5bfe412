//! Real network namespaces and a real nftables firewall around a gateway and an agent: a
//! control-plane namespace (the gateway) and a data-plane namespace (the agent and its
//! upstreams) joined by a veth pair, plus a second veth from the test's own namespace into the
//! control plane, standing for the control-plane network the northbound API and ops are
//! reached on.
//!
//! ```text
//!  test process (root ns)         cp  tt-<pid>-<n>-cp                dp  tt-<pid>-<n>-dp
//!  tt<i> 198.18.x.y+1/30 ──veth── up0 198.18.x.y+2/30
//!                                 dp0 198.19.x.y+1/30 ──veth── cp0 198.19.x.y+2/30
//!                                                              nftables (inet tether_fw):
//!                                                              in:  lo, established/related
//!                                                              out: lo, established/related,
//!                                                                   udp+tcp to gateway:port
//! ```
//!
//! The data plane has no route to the test's network and the control plane does not forward
//! (a new namespace starts with `ip_forward = 0`), so the only way into the data plane is the
//! veth from the control plane, and its firewall drops whatever it did not ask for.
//!
//! Every `/30` comes from an index `i` claimed atomically by creating the root-namespace link
//! `tt<i>` (the kernel refuses a second one), so parallel tests, in one process or many, never
//! share addresses. Namespaces are named `tt-<pid>-<n>-{cp,dp}` and deleted on drop (also when
//! a test panics); the first [`Topology`] of a process removes those left by crashed runs whose
//! process is gone.
//!
//! [`Topology::firewall_egress`] installs the same firewall with other egress (e.g. only TCP to
//! an HTTP proxy, so the gateway itself is unreachable); [`Tinyproxy`] is a real HTTP CONNECT
//! proxy (Debian's `tinyproxy`) to run in the control plane for it.
//!
//! Faults ([`Topology::set_loss`], [`Topology::block_udp`]) sit in `netdev` ingress chains on
//! both ends of the cp–dp veth, so a dropped packet vanishes on the wire: the sender's
//! `sendmsg` still succeeds, as it would behind a lossy link or a firewall in the network.
//!
//! Everything here needs root (`CAP_NET_ADMIN`, `CAP_SYS_ADMIN`), `ip` (iproute2) and `nft`
//! (nftables); [`Topology::new`] says which one is missing ([`Tinyproxy::start`] likewise for
//! `tinyproxy`).

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Prefix of every namespace this harness creates.
const PREFIX: &str = "tt-";
/// `/30` blocks available: `198.18.0.0/16` (test ↔ cp) and `198.19.0.0/16` (cp ↔ dp), the
/// range RFC 2544 reserves for network tests, so no real network is shadowed.
const BLOCKS: u32 = 1 << 14;
/// Name of the dp's end of the cp–dp veth (inside dp).
pub const DP_LINK: &str = "cp0";
/// Name of the cp's end of the cp–dp veth (inside cp).
pub const CP_LINK: &str = "dp0";
/// Name of the cp's end of the test ↔ cp veth (inside cp).
const CP_UPLINK: &str = "up0";

// === Tools ===

struct Tools {
    ip: PathBuf,
    nft: PathBuf,
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

/// `ip` and `nft`, found once; an error says exactly what is missing.
fn tools() -> Result<&'static Tools> {
    static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
    TOOLS
        .get_or_init(|| {
            let mut missing = Vec::new();
            let ip = which("ip");
            if ip.is_none() {
                missing.push("the `ip` binary (Debian package iproute2)");
            }
            let nft = which("nft");
            if nft.is_none() {
                missing.push("the `nft` binary (Debian package nftables)");
            }
            if !missing.is_empty() {
                return Err(format!(
                    "network-namespace tests cannot run: {} not found in PATH, /usr/sbin or /sbin \
                     (scripts/test installs them with apt-get when run as root)",
                    missing.join(" and ")
                ));
            }
            match euid() {
                Some(0) => {}
                Some(uid) => {
                    return Err(format!(
                        "network-namespace tests cannot run: they need root (CAP_NET_ADMIN and \
                         CAP_SYS_ADMIN to create namespaces, veth links and nftables rules), \
                         but the effective uid is {uid}; run them as root, as CI does"
                    ));
                }
                None => return Err("cannot read the effective uid from /proc/self/status".into()),
            }
            Ok(Tools {
                ip: ip.expect("checked"),
                nft: nft.expect("checked"),
            })
        })
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

/// Runs `program args…` (with `stdin` when given) and returns its stdout; a failure names the
/// command line and carries its stderr.
fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let line = format!(
        "`{} {}`",
        program.file_name().unwrap_or_default().to_string_lossy(),
        args.join(" ")
    );
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {line}"))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(input.as_bytes())
            .with_context(|| format!("writing the input of {line}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {line}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut msg = format!("{line} failed ({}): {}", out.status, stderr.trim());
        if let Some(script) = stdin {
            msg.push_str(&format!("\ninput was:\n{script}"));
        }
        bail!(msg);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(&tools()?.ip, args, None)
}

// === impl Netns ===

/// One network namespace (`/run/netns/<name>`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> Result<Netns> {
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <name> args…`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs an nftables script (`nft -f -`) in this namespace, as one transaction.
    pub fn nft(&self, script: &str) -> Result<String> {
        let t = tools()?;
        let nft = t.nft.to_str().context("nft path is not UTF-8")?;
        run(
            &t.ip,
            &["netns", "exec", &self.name, nft, "-f", "-"],
            Some(script),
        )
    }

    /// Runs `program args…` in this namespace to completion and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command that runs `program` in this namespace (`ip netns exec <name> program`, which
    /// execs it: the child's pid is the program's). Add arguments, environment, `kill_on_drop`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> tokio::process::Command {
        let ip = tools().map_or_else(|_| PathBuf::from("ip"), |t| t.ip.clone());
        let mut cmd = tokio::process::Command::new(ip);
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns what it returns.
    /// Sockets `f` creates belong to this namespace for their whole life, wherever they are
    /// used afterwards (a listener handed to the test's runtime keeps serving in here). Only
    /// that thread moves: the test's own threads stay where they are. A panic in `f` is
    /// resumed here.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            let t = s.spawn(|| -> Result<R> {
                let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("setns into {path}"))?;
                Ok(f())
            });
            t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("netns: could not delete {}: {e:#}", self.name);
        }
    }
}

// === Stale namespaces ===

/// Deletes namespaces of this harness whose process is gone (a crashed or killed run), and
/// any carrying this process's pid (a reused pid: none of ours exists yet when this runs).
/// Processes still inside one (an orphaned gateway or agent of that run) are killed first,
/// by pid, so the namespace and its veth links really go away.
fn remove_stale() {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
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
        if pid != me && Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(pids) = ip(&["netns", "pids", &name]) {
            for p in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // Another process may be cleaning the same one: losing that race is fine.
        let _ = ip(&["netns", "del", &name]);
    }
}

// === impl Topology ===

/// One kind of packet the data plane's firewall lets out ([`Topology::firewall_egress`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Egress {
    /// New UDP flows to this address and port.
    Udp(SocketAddr),
    /// New TCP connections to this address and port.
    Tcp(SocketAddr),
}

/// A `/30`: network address + 1 and + 2.
fn block(base: [u8; 2], i: u32) -> (Ipv4Addr, Ipv4Addr) {
    let n = u32::from(Ipv4Addr::new(base[0], base[1], 0, 0)) + 4 * i;
    (Ipv4Addr::from(n + 1), Ipv4Addr::from(n + 2))
}

/// The control-plane and data-plane namespaces, their links and the data plane's firewall.
/// Dropping it deletes all of it.
#[derive(Debug)]
pub struct Topology {
    /// The control-plane namespace: the gateway runs here.
    pub cp: Netns,
    /// The data-plane namespace: the agent and its upstreams run here.
    pub dp: Netns,
    /// The test process's address on the control-plane network.
    pub host_addr: Ipv4Addr,
    /// The control plane's address on the control-plane network: northbound and ops listen
    /// here, reachable from the test process.
    pub api_addr: Ipv4Addr,
    /// The control plane's address toward the data plane: the gateway's tunnel listens here.
    pub cp_addr: Ipv4Addr,
    /// The data plane's address.
    pub dp_addr: Ipv4Addr,
    host_link: String,
}

impl Topology {
    /// Builds both namespaces, both veth pairs with addresses from a `/30` no other test
    /// uses, loopback up, and the fault chains (empty). No firewall yet: see
    /// [`Topology::firewall`].
    pub fn new() -> Result<Topology> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        static CLEANED: OnceLock<()> = OnceLock::new();
        tools()?;
        CLEANED.get_or_init(remove_stale);

        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let cp = Netns::create(format!("{PREFIX}{pid}-{n}-cp"))
            .context("creating the control-plane network namespace")?;
        let dp = Netns::create(format!("{PREFIX}{pid}-{n}-dp"))
            .context("creating the data-plane network namespace")?;

        // Claim a block: creating `tt<i>` in the root namespace fails if another test holds i.
        let start = (pid.wrapping_mul(64).wrapping_add(n * 7)) % BLOCKS;
        let mut claimed = None;
        for k in 0..256 {
            let i = (start + k) % BLOCKS;
            let link = format!("tt{i}");
            match ip(&[
                "link",
                "add",
                &link,
                "type",
                "veth",
                "peer",
                "name",
                CP_UPLINK,
                "netns",
                cp.name(),
            ]) {
                Ok(_) => {
                    claimed = Some((i, link));
                    break;
                }
                Err(e) if format!("{e}").contains("File exists") => continue,
                Err(e) => return Err(e.context("creating the veth from the test into cp")),
            }
        }
        let (i, host_link) = claimed.context("no free address block after 256 tries")?;
        let (host_addr, api_addr) = block([198, 18], i);
        let (cp_addr, dp_addr) = block([198, 19], i);
        let topo = Topology {
            cp,
            dp,
            host_addr,
            api_addr,
            cp_addr,
            dp_addr,
            host_link,
        };
        topo.wire().context("wiring the namespaces")?;
        Ok(topo)
    }

    fn wire(&self) -> Result<()> {
        let (cp, dp) = (&self.cp, &self.dp);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", self.host_addr),
            "dev",
            &self.host_link,
        ])?;
        ip(&["link", "set", &self.host_link, "up"])?;
        cp.ip(&[
            "addr",
            "add",
            &format!("{}/30", self.api_addr),
            "dev",
            CP_UPLINK,
        ])?;
        cp.ip(&["link", "set", CP_UPLINK, "up"])?;
        cp.ip(&[
            "link",
            "add",
            CP_LINK,
            "type",
            "veth",
            "peer",
            "name",
            DP_LINK,
            "netns",
            dp.name(),
        ])?;
        cp.ip(&[
            "addr",
            "add",
            &format!("{}/30", self.cp_addr),
            "dev",
            CP_LINK,
        ])?;
        cp.ip(&["link", "set", CP_LINK, "up"])?;
        dp.ip(&[
            "addr",
            "add",
            &format!("{}/30", self.dp_addr),
            "dev",
            DP_LINK,
        ])?;
        dp.ip(&["link", "set", DP_LINK, "up"])?;
        // Fault chains, one per direction, at the receiving end of the veth.
        for (ns, dev) in [(cp, CP_LINK), (dp, DP_LINK)] {
            ns.nft(&format!(
                "table netdev tether_faults {{\n\
                 \tchain loss {{ type filter hook ingress device \"{dev}\" priority -10; policy accept; }}\n\
                 \tchain block {{ type filter hook ingress device \"{dev}\" priority -5; policy accept; }}\n\
                 }}\n"
            ))?;
        }
        self.wait_link_up(Duration::from_secs(10))
    }

    /// Installs the data plane's firewall: inbound, only loopback and what the data plane
    /// initiated (established/related); outbound, only loopback, established/related, and UDP
    /// and TCP to `gateway` (TCP too: the TCP fallback uses the same port). Nothing forwarded.
    pub fn firewall(&self, gateway: SocketAddr) -> Result<()> {
        self.firewall_egress(&[Egress::Udp(gateway), Egress::Tcp(gateway)])
    }

    /// The same firewall letting out only `allowed` (besides loopback and established/related):
    /// e.g. `[Egress::Tcp(proxy)]` for a data plane that reaches the world only through an HTTP
    /// proxy, so UDP and TCP to the gateway itself are dropped. Replaces any firewall
    /// installed before, in one transaction.
    pub fn firewall_egress(&self, allowed: &[Egress]) -> Result<()> {
        let rules: String = allowed
            .iter()
            .map(|e| {
                let (proto, to) = match *e {
                    Egress::Udp(a) => ("udp", a),
                    Egress::Tcp(a) => ("tcp", a),
                };
                let family = if to.is_ipv4() { "ip" } else { "ip6" };
                format!(
                    "\t\t{family} daddr {} {proto} dport {} accept\n",
                    to.ip(),
                    to.port()
                )
            })
            .collect();
        // `add` + `delete` first: the script replaces a previous firewall instead of adding
        // rules to it, and works when there was none.
        self.dp.nft(&format!(
            "add table inet tether_fw\n\
             delete table inet tether_fw\n\
             table inet tether_fw {{\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter; policy drop;\n\
             \t\tiif \"lo\" accept\n\
             \t\tct state established,related accept\n\
             \t}}\n\
             \tchain output {{\n\
             \t\ttype filter hook output priority filter; policy drop;\n\
             \t\toif \"lo\" accept\n\
             \t\tct state established,related accept\n\
             {rules}\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy drop;\n\
             \t}}\n\
             }}\n"
        ))?;
        Ok(())
    }

    /// Removes the data plane's firewall.
    pub fn firewall_off(&self) -> Result<()> {
        self.dp.nft("delete table inet tether_fw\n").map(drop)
    }

    /// The data plane's ruleset as `nft list ruleset` prints it.
    pub fn dp_ruleset(&self) -> Result<String> {
        let nft = tools()?.nft.to_str().context("nft path is not UTF-8")?;
        self.dp.exec(nft, &["list", "ruleset"])
    }

    /// Drops `percent` % of the packets crossing the cp–dp veth, in each direction, at random
    /// (`numgen random mod 100 < percent drop`, counted); 0 removes the loss.
    pub fn set_loss(&self, percent: u8) -> Result<()> {
        assert!(percent <= 100, "loss of {percent}%");
        let rule = if percent == 0 {
            String::new()
        } else {
            format!(
                "add rule netdev tether_faults loss numgen random mod 100 < {percent} counter drop\n"
            )
        };
        for ns in [&self.cp, &self.dp] {
            ns.nft(&format!("flush chain netdev tether_faults loss\n{rule}"))?;
        }
        Ok(())
    }

    /// Packets the loss rules dropped so far, both directions together.
    pub fn loss_dropped(&self) -> Result<u64> {
        let nft = tools()?.nft.to_str().context("nft path is not UTF-8")?;
        let mut total = 0;
        for ns in [&self.cp, &self.dp] {
            let out = ns.exec(
                nft,
                &["-j", "list", "chain", "netdev", "tether_faults", "loss"],
            )?;
            let v: serde_json::Value =
                serde_json::from_str(&out).context("parsing `nft -j list chain` output")?;
            for item in v["nftables"].as_array().into_iter().flatten() {
                for expr in item["rule"]["expr"].as_array().into_iter().flatten() {
                    total += expr["counter"]["packets"].as_u64().unwrap_or(0);
                }
            }
        }
        Ok(total)
    }

    /// Drops every UDP packet crossing the cp–dp veth, both ways (a network that lets no QUIC
    /// through); TCP still passes.
    pub fn block_udp(&self) -> Result<()> {
        for ns in [&self.cp, &self.dp] {
            ns.nft(
                "flush chain netdev tether_faults block\n\
                 add rule netdev tether_faults block ip protocol udp drop\n\
                 add rule netdev tether_faults block ip6 nexthdr udp drop\n",
            )?;
        }
        Ok(())
    }

    /// Lets UDP through again.
    pub fn unblock_udp(&self) -> Result<()> {
        for ns in [&self.cp, &self.dp] {
            ns.nft("flush chain netdev tether_faults block\n")?;
        }
        Ok(())
    }

    /// Takes the cp–dp link down: the cp end is set down, so the dp end loses its carrier.
    /// Addresses and routes stay; packets in either direction vanish (no error, no ICMP).
    pub fn link_down(&self) -> Result<()> {
        self.cp.ip(&["link", "set", CP_LINK, "down"]).map(drop)
    }

    /// Brings the cp–dp link back and waits until both ends report it up.
    pub fn link_up(&self) -> Result<()> {
        self.cp.ip(&["link", "set", CP_LINK, "up"])?;
        self.wait_link_up(Duration::from_secs(10))
    }

    fn wait_link_up(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let up = |ns: &Netns, dev: &str| -> Result<bool> {
                let out = ns.ip(&["-j", "link", "show", dev])?;
                let v: serde_json::Value =
                    serde_json::from_str(&out).context("parsing `ip -j link show` output")?;
                Ok(v[0]["operstate"] == "UP")
            };
            if up(&self.cp, CP_LINK)? && up(&self.dp, DP_LINK)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the cp–dp veth is not up after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting one end deletes the pair; the namespaces (and the cp–dp pair with them) go
        // when the fields drop.
        if let Err(e) = ip(&["link", "del", &self.host_link]) {
            eprintln!("netns: could not delete {}: {e:#}", self.host_link);
        }
    }
}

// === Port scan ===

/// What [`scan`] found, per protocol.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// TCP ports that accepted a connection.
    pub tcp_open: Vec<u16>,
    /// TCP ports that answered with a reset.
    pub tcp_refused: usize,
    /// TCP ports that answered nothing before the wait ran out.
    pub tcp_silent: usize,
    /// UDP ports that sent a datagram back.
    pub udp_replied: Vec<u16>,
    /// UDP ports that drew an ICMP port unreachable.
    pub udp_unreachable: usize,
    /// UDP ports from which nothing came back.
    pub udp_silent: usize,
    /// Probes that failed locally (socket, bind, send): a scan with any is no evidence.
    pub errors: Vec<String>,
    /// How long the scan took.
    pub elapsed: Duration,
}

enum Probe {
    Open,
    Refused,
    Silent,
    Error(String),
}

async fn probe_tcp(addr: SocketAddr, wait: Duration) -> Probe {
    match tokio::time::timeout(wait, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Probe::Open,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Probe::Refused,
        Ok(Err(e)) => Probe::Error(format!("tcp {addr}: {e}")),
        Err(_) => Probe::Silent,
    }
}

async fn probe_udp(addr: SocketAddr, wait: Duration) -> Probe {
    let any: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let attempt = async {
        // Connected, so an ICMP port unreachable comes back as ECONNREFUSED on this socket.
        let s = tokio::net::UdpSocket::bind(any).await?;
        s.connect(addr).await?;
        s.send(b"tether-scan").await?;
        std::io::Result::Ok(s)
    };
    let s = match attempt.await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Probe::Refused,
        Err(e) => return Probe::Error(format!("udp {addr}: {e}")),
    };
    let mut buf = [0u8; 64];
    match tokio::time::timeout(wait, s.recv(&mut buf)).await {
        Ok(Ok(_)) => Probe::Open,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Probe::Refused,
        Ok(Err(e)) => Probe::Error(format!("udp {addr}: {e}")),
        Err(_) => Probe::Silent,
    }
}

/// Probes in flight at once (each holds one socket).
const SCAN_CONCURRENCY: usize = 8192;

/// Probes every TCP port (a full connect) and every UDP port (one datagram each, on a connected
/// socket so an ICMP port unreachable is seen) of `target`, waiting up to `wait` for each
/// answer. Blocking, on its own single-threaded runtime: call it inside [`Netns::run`] to scan
/// from a namespace.
pub fn scan(target: IpAddr, wait: Duration) -> Result<ScanReport> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("scan runtime")?;
    rt.block_on(async move {
        let started = Instant::now();
        let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(SCAN_CONCURRENCY));
        let mut probes = tokio::task::JoinSet::new();
        let mut report = ScanReport::default();
        for port in 1..=u16::MAX {
            for tcp in [true, false] {
                let permit = limit.clone().acquire_owned().await?;
                let addr = SocketAddr::new(target, port);
                probes.spawn(async move {
                    let _permit = permit;
                    let r = if tcp {
                        probe_tcp(addr, wait).await
                    } else {
                        probe_udp(addr, wait).await
                    };
                    (tcp, port, r)
                });
            }
            while let Some(done) = probes.try_join_next() {
                tally(&mut report, done?);
            }
        }
        while let Some(done) = probes.join_next().await {
            tally(&mut report, done?);
        }
        report.tcp_open.sort_unstable();
        report.udp_replied.sort_unstable();
        report.elapsed = started.elapsed();
        Ok(report)
    })
}

fn tally(r: &mut ScanReport, (tcp, port, probe): (bool, u16, Probe)) {
    match (tcp, probe) {
        (true, Probe::Open) => r.tcp_open.push(port),
        (true, Probe::Refused) => r.tcp_refused += 1,
        (true, Probe::Silent) => r.tcp_silent += 1,
        (false, Probe::Open) => r.udp_replied.push(port),
        (false, Probe::Refused) => r.udp_unreachable += 1,
        (false, Probe::Silent) => r.udp_silent += 1,
        (_, Probe::Error(e)) => r.errors.push(e),
    }
}

/// Listening sockets in `ns` (`ss -lntuH`): `(netid, local address:port)` pairs.
pub fn listeners(ns: &Netns) -> Result<Vec<(String, String)>> {
    let out = ns.exec("ss", &["-lntuH"])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.first()?.to_string(), f.get(4)?.to_string()))
        })
        .collect())
}

/// True when an `ss` local address (`127.0.0.1:80`, `[::1]:80`, `127.0.0.53%lo:53`,
/// `*:80`) is a loopback address.
pub fn is_loopback_listener(local: &str) -> bool {
    let Some((host, _port)) = local.rsplit_once(':') else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = host.split('%').next().unwrap_or(host);
    host.parse::<IpAddr>().is_ok_and(|a| a.is_loopback())
}

/// TCP ports process `pid` listens on in `ns` (`ss -lntpH`), as local addresses.
pub fn tcp_listeners_of(ns: &Netns, pid: u32) -> Result<Vec<SocketAddr>> {
    let out = ns.exec("ss", &["-lntpH"])?;
    let tag = format!("pid={pid},");
    Ok(out
        .lines()
        .filter(|l| l.contains(&tag))
        .filter_map(|l| l.split_whitespace().nth(3)?.parse().ok())
        .collect())
}

// === HTTP CONNECT proxy ===

/// A real HTTP CONNECT proxy, Debian's `tinyproxy`, running in the foreground (`-d`) inside a
/// namespace with a config of its own, Basic authentication required. Killed on drop.
#[derive(Debug)]
pub struct Tinyproxy {
    /// Where it listens.
    pub addr: SocketAddr,
    child: tokio::process::Child,
    stdout: crate::LogLines,
    stderr: crate::LogLines,
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    /// Starts tinyproxy in `ns` on `listen` (port 0: a free port of that address), serving
    /// clients from `allow` (an address or CIDR), allowing CONNECT only to `connect_port`,
    /// and only with the Basic credentials `user` / `password`. Returns once it listens; an
    /// error says what is missing (the binary, or why it did not start).
    pub async fn start(
        ns: &Netns,
        listen: SocketAddr,
        allow: &str,
        connect_port: u16,
        user: &str,
        password: &str,
    ) -> Result<Tinyproxy> {
        let bin = which("tinyproxy").context(
            "the HTTP CONNECT proxy test cannot run: the `tinyproxy` binary (Debian package \
             tinyproxy) is not in PATH, /usr/sbin or /usr/bin (scripts/test installs it with \
             apt-get when run as root)",
        )?;
        let addr = if listen.port() == 0 {
            // Nothing else binds in a test's own namespace, so the port stays free.
            let probe = ns
                .run(|| std::net::TcpListener::bind(listen))?
                .with_context(|| format!("finding a free port on {listen} in {}", ns.name()))?;
            probe.local_addr()?
        } else {
            listen
        };
        let dir = tempfile::tempdir().context("tinyproxy config dir")?;
        let conf = dir.path().join("tinyproxy.conf");
        // No LogFile or Syslog: with -d it logs to stdout. LogLevel Connect logs each client
        // and its request line (the CONNECT and its target), nothing of the headers.
        std::fs::write(
            &conf,
            format!(
                "Port {port}\n\
                 Listen {ip}\n\
                 Timeout 600\n\
                 MaxClients 64\n\
                 Allow {allow}\n\
                 ConnectPort {connect_port}\n\
                 BasicAuth {user} {password}\n\
                 LogLevel Connect\n",
                port = addr.port(),
                ip = addr.ip(),
            ),
        )
        .context("writing the tinyproxy config")?;
        let mut child = ns
            .command(&bin)
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} in {}", bin.display(), ns.name()))?;
        let stdout = crate::LogLines::collect(child.stdout.take().context("tinyproxy stdout")?);
        let stderr = crate::LogLines::collect(child.stderr.take().context("tinyproxy stderr")?);
        let mut proxy = Tinyproxy {
            addr,
            child,
            stdout,
            stderr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let want = addr.to_string();
        loop {
            if let Some(status) = proxy.child.try_wait()? {
                bail!(
                    "tinyproxy exited ({status}) instead of listening on {addr}:\n{}",
                    proxy.logs()
                );
            }
            if listeners(ns)?
                .iter()
                .any(|(netid, local)| netid == "tcp" && *local == want)
            {
                return Ok(proxy);
            }
            if Instant::now() >= deadline {
                bail!(
                    "tinyproxy is not listening on {addr} after 10 s:\n{}",
                    proxy.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What it logged so far (stdout, then stderr).
    pub fn logs(&self) -> String {
        let (out, err) = (self.stdout.text(), self.stderr.text());
        if err.is_empty() {
            out
        } else {
            format!("{out}\n{err}")
        }
    }
}
