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
//! # A load balancer in front of replicas
//!
//! [`LoadBalancer`] is a real layer-4 balancer, as a cloud NLB in front of gateway replicas:
//!
//! ```text
//!  test process (root ns)       lb  tt-<pid>-<n>-lb                  b<k>  tt-<pid>-<n>-b<k>
//!  tl<j> host_addr/30 ──veth── up0 vip/30  (ip_forward = 1)
//!    route backends/27 via vip     b0 ───────────────────veth── eth0 backends[0].addr/30
//!                                  b1 ───────────────────veth── eth0 backends[1].addr/30
//!                                  nftables (ip tether_lb, nat prerouting):
//!                                    ip daddr vip, udp|tcp dport port:
//!                                    jhash of the 5-tuple mod |set| → dnat to a backend
//!                                    (chains be<k>, each counting the flows it sent)
//! ```
//!
//! - Clients (agents) are given only [`LoadBalancer::addr`] (`vip:port`). Each new flow (a
//!   QUIC connection's first datagram from a new source port, a TCP SYN) is hashed to one
//!   backend of the set ([`Spread::FlowHash`], or [`Spread::Random`]); conntrack keeps every
//!   later packet of the flow there and rewrites the replies' source back to the VIP. In-process
//!   agents ([`crate::TestAgent`]) dial it from the test's namespace.
//! - Backend `k` is a namespace of its own with address `backends[k].addr`; run a replica there
//!   with [`LoadBalancer::spawn_gateway`] (tunnel on [`LoadBalancer::backend_addr`], northbound
//!   and ops on free ports of the backend's address, which the test process reaches through a
//!   route via the balancer). [`LoadBalancer::replica_config`] is [`crate::replica_config`]
//!   advertising the peer listener at the backend's address. Backends reach the test process
//!   at `host_addr`: start PostgreSQL there (`LocalPostgresOptions { listen: lb.host_addr, .. }`).
//!   Restart a replica by spawning it again in the same backend once the old process is gone.
//! - [`LoadBalancer::set_backends`] changes the set new flows go to; flows already established
//!   stay where they are (a deregistration with connection draining).
//!   [`LoadBalancer::new_flows`] counts the flows each backend was sent.
//! - Faults: [`LoadBalancer::cut_between`] partitions two backends (their peer link) and
//!   [`LoadBalancer::heal_between`] heals it; [`LoadBalancer::backend_link_down`] makes a
//!   backend vanish from the network (a dead host the balancer still sends flows to).
//!
//! Balancers take their addresses from `198.18.128.0/17` and `198.19.128.0/17` (a `/27` of each
//! per balancer, claimed by creating the root-namespace link `tl<j>`), so they never collide with
//! a [`Topology`] or with each other.
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
/// `/30` blocks available to [`Topology`]: `198.18.0.0/17` (test ↔ cp) and `198.19.0.0/17`
/// (cp ↔ dp), in the range RFC 2544 reserves for network tests, so no real network is
/// shadowed. The upper halves (`198.18.128.0/17`, `198.19.128.0/17`) belong to
/// [`LoadBalancer`].
const BLOCKS: u32 = 1 << 13;
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

/// Numbers the namespaces this process creates (their names carry it).
static COUNTER: AtomicU32 = AtomicU32::new(0);
/// Set once the first harness object of this process has removed stale namespaces.
static CLEANED: OnceLock<()> = OnceLock::new();

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

// === impl LoadBalancer ===

/// Backends a [`LoadBalancer`] can have (its backend links share one `/27`).
pub const MAX_BACKENDS: usize = 8;
/// Address blocks of load balancers: block `j` is `198.18.128.0/17 + 32·j` (the uplink, its
/// first `/30`) and `198.19.128.0/17 + 32·j` (one `/30` per backend).
const LB_BLOCKS: u32 = 1 << 10;

/// How a [`LoadBalancer`] picks the backend of a new flow. Either way the choice is made once,
/// on a flow's first packet: conntrack keeps every later packet of the flow (a QUIC
/// connection's datagrams, a TCP connection's segments) on the same backend, as a cloud
/// network load balancer does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Spread {
    /// A hash of the 5-tuple (`jhash ip saddr . th sport . ip daddr . th dport . meta l4proto`,
    /// seeded at random per balancer), as AWS's NLB and GCP's passthrough balancer do. A client
    /// that redials from a new source port is a new flow, hashed again.
    #[default]
    FlowHash,
    /// `numgen random`: each new flow to a backend drawn at random.
    Random,
}

/// One backend of a [`LoadBalancer`]: a namespace of its own (a pod, a VM), reached through the
/// balancer's namespace.
#[derive(Debug)]
pub struct Backend {
    /// Its namespace: run the replica here ([`LoadBalancer::spawn_gateway`]).
    pub ns: Netns,
    /// Its address (on `eth0`); the balancer forwards flows to it, and the test process reaches
    /// it directly (a route through the balancer's namespace).
    pub addr: Ipv4Addr,
    /// The balancer's address toward it (its default gateway).
    pub gateway: Ipv4Addr,
}

/// A real layer-4 load balancer: a network namespace with an nftables DNAT rule that spreads
/// new UDP and TCP flows to one address and port (the VIP) over the backends in its set, as a
/// cloud network load balancer does, with a namespace per backend behind it. Dropping it
/// deletes all of it. See the module docs for the picture and how tests use it.
#[derive(Debug)]
pub struct LoadBalancer {
    /// The balancer's namespace (it forwards: `ip_forward = 1`).
    pub lb: Netns,
    /// The backends, by index.
    pub backends: Vec<Backend>,
    /// The test process's address toward the balancer: services the backends use (PostgreSQL)
    /// listen here.
    pub host_addr: Ipv4Addr,
    /// The address clients dial (the balancer's own address toward the test process).
    pub vip: Ipv4Addr,
    /// The port balanced, UDP and TCP; backends listen on the same port.
    pub port: u16,
    spread: Spread,
    seed: u32,
    state: std::sync::Mutex<LbState>,
    host_link: String,
}

#[derive(Debug, Default)]
struct LbState {
    /// Backends new flows go to.
    active: Vec<usize>,
    /// Pairs of backends that cannot reach each other.
    cuts: std::collections::BTreeSet<(usize, usize)>,
}

/// Name of the balancer's end of the link to backend `k` (inside the balancer's namespace).
fn backend_link(k: usize) -> String {
    format!("b{k}")
}

/// Polls `ip -j link show` until every `(ns, device)` is up, or fails after `timeout`.
fn wait_links_up(links: &[(&Netns, &str)], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut all = true;
        for (ns, dev) in links {
            let out = ns.ip(&["-j", "link", "show", dev])?;
            let v: serde_json::Value =
                serde_json::from_str(&out).context("parsing `ip -j link show` output")?;
            all &= v[0]["operstate"] == "UP";
        }
        if all {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("links {links:?} not up after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl LoadBalancer {
    /// A balancer of `port` (UDP and TCP) over `n` backends (1 to [`MAX_BACKENDS`]), every
    /// one in the set, spreading by [`Spread::FlowHash`].
    pub fn new(n: usize, port: u16) -> Result<LoadBalancer> {
        Self::with_spread(n, port, Spread::FlowHash)
    }

    /// As [`new`](Self::new), choosing backends by `spread`.
    pub fn with_spread(n: usize, port: u16, spread: Spread) -> Result<LoadBalancer> {
        if !(1..=MAX_BACKENDS).contains(&n) {
            bail!("a load balancer has 1 to {MAX_BACKENDS} backends, not {n}");
        }
        tools()?;
        CLEANED.get_or_init(remove_stale);
        let pid = std::process::id();
        let n_lb = COUNTER.fetch_add(1, Ordering::Relaxed);
        let lb = Netns::create(format!("{PREFIX}{pid}-{n_lb}-lb"))
            .context("creating the load balancer's network namespace")?;
        let mut backend_ns = Vec::new();
        for k in 0..n {
            backend_ns.push(
                Netns::create(format!("{PREFIX}{pid}-{n_lb}-b{k}"))
                    .with_context(|| format!("creating backend {k}'s network namespace"))?,
            );
        }
        // Claim a block as Topology does, with links `tl<j>` (a namespace of claims of its own).
        let start = (pid.wrapping_mul(16).wrapping_add(n_lb * 3)) % LB_BLOCKS;
        let mut claimed = None;
        for k in 0..LB_BLOCKS {
            let j = (start + k) % LB_BLOCKS;
            let link = format!("tl{j}");
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
                lb.name(),
            ]) {
                Ok(_) => {
                    claimed = Some((j, link));
                    break;
                }
                Err(e) if format!("{e}").contains("File exists") => continue,
                Err(e) => {
                    return Err(e.context("creating the veth from the test into the balancer"));
                }
            }
        }
        let (j, host_link) = claimed.context("no free load balancer address block")?;
        let up = u32::from(Ipv4Addr::new(198, 18, 128, 0)) + 32 * j;
        let down = u32::from(Ipv4Addr::new(198, 19, 128, 0)) + 32 * j;
        let backends = backend_ns
            .into_iter()
            .enumerate()
            .map(|(k, ns)| Backend {
                ns,
                gateway: Ipv4Addr::from(down + 4 * k as u32 + 1),
                addr: Ipv4Addr::from(down + 4 * k as u32 + 2),
            })
            .collect();
        let balancer = LoadBalancer {
            lb,
            backends,
            host_addr: Ipv4Addr::from(up + 1),
            vip: Ipv4Addr::from(up + 2),
            port,
            spread,
            seed: rand_seed(),
            state: std::sync::Mutex::new(LbState {
                active: (0..n).collect(),
                cuts: Default::default(),
            }),
            host_link,
        };
        balancer
            .wire(Ipv4Addr::from(down))
            .context("wiring the load balancer")?;
        Ok(balancer)
    }

    fn wire(&self, backend_net: Ipv4Addr) -> Result<()> {
        let lb = &self.lb;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", self.host_addr),
            "dev",
            &self.host_link,
        ])?;
        ip(&["link", "set", &self.host_link, "up"])?;
        lb.ip(&["addr", "add", &format!("{}/30", self.vip), "dev", CP_UPLINK])?;
        lb.ip(&["link", "set", CP_UPLINK, "up"])?;
        // It routes between the test and the backends, and between backends.
        lb.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))?
            .context("setting net.ipv4.ip_forward in the balancer's namespace")?;
        let mut links = vec![(lb, CP_UPLINK)];
        let names: Vec<String> = (0..self.backends.len()).map(backend_link).collect();
        for (k, b) in self.backends.iter().enumerate() {
            let link = &names[k];
            lb.ip(&[
                "link",
                "add",
                link,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                b.ns.name(),
            ])?;
            lb.ip(&["addr", "add", &format!("{}/30", b.gateway), "dev", link])?;
            lb.ip(&["link", "set", link, "up"])?;
            b.ns.ip(&["addr", "add", &format!("{}/30", b.addr), "dev", "eth0"])?;
            b.ns.ip(&["link", "set", "eth0", "up"])?;
            links.push((&b.ns, "eth0"));
        }
        wait_links_up(&links, Duration::from_secs(10))?;
        for b in &self.backends {
            b.ns.ip(&["route", "add", "default", "via", &b.gateway.to_string()])?;
        }
        // The test process reaches every backend (northbound, ops) through the balancer.
        ip(&[
            "route",
            "add",
            &format!("{backend_net}/27"),
            "via",
            &self.vip.to_string(),
            "dev",
            &self.host_link,
        ])?;
        let chains: String = (0..self.backends.len())
            .map(|k| {
                format!(
                    "\tchain be{k} {{\n\t\tcounter dnat to {}\n\t}}\n",
                    self.backends[k].addr
                )
            })
            .collect();
        lb.nft(&format!(
            "table ip tether_lb {{\n\
             {chains}\
             \tchain none {{\n\t\tcounter drop\n\t}}\n\
             \tchain prerouting {{\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             \t}}\n\
             }}\n\
             table inet tether_lb_faults {{\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t}}\n\
             }}\n"
        ))?;
        self.apply()
    }

    /// Rewrites the balancing rule and the cuts from the state, in one transaction.
    fn apply(&self) -> Result<()> {
        let st = self.state.lock().expect("load balancer state");
        let matcher = format!(
            "ip daddr {} meta l4proto {{ tcp, udp }} th dport {}",
            self.vip, self.port
        );
        let choose = match st.active.as_slice() {
            [] => "jump none".to_owned(),
            [only] => format!("jump be{only}"),
            many => {
                let m = many.len();
                let pick = match self.spread {
                    Spread::FlowHash => format!(
                        "jhash ip saddr . th sport . ip daddr . th dport . meta l4proto mod {m} seed {:#x}",
                        self.seed
                    ),
                    Spread::Random => format!("numgen random mod {m}"),
                };
                let map: Vec<String> = many
                    .iter()
                    .enumerate()
                    .map(|(i, k)| format!("{i} : jump be{k}"))
                    .collect();
                format!("{pick} vmap {{ {} }}", map.join(", "))
            }
        };
        let cuts: String = st
            .cuts
            .iter()
            .flat_map(|&(a, b)| [(a, b), (b, a)])
            .map(|(a, b)| {
                format!(
                    "add rule inet tether_lb_faults forward ip saddr {} ip daddr {} counter drop\n",
                    self.backends[a].addr, self.backends[b].addr
                )
            })
            .collect();
        self.lb.nft(&format!(
            "flush chain ip tether_lb prerouting\n\
             add rule ip tether_lb prerouting {matcher} {choose}\n\
             flush chain inet tether_lb_faults forward\n\
             {cuts}"
        ))?;
        Ok(())
    }

    /// `vip:port`: the one address clients (agents) are given.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.vip, self.port))
    }

    /// `addr:port` of backend `k`: where its server listens (UDP and TCP) for the flows the
    /// balancer sends it.
    pub fn backend_addr(&self, k: usize) -> SocketAddr {
        SocketAddr::from((self.backends[k].addr, self.port))
    }

    /// Sends new flows only to `backends` (indices; empty: new flows are dropped, counted in
    /// [`LoadBalancer::refused_flows`]). Flows already established stay on their backend, as
    /// with a cloud balancer's deregistration (connection draining): a removed backend keeps
    /// its sessions until they end, and gets no new ones.
    pub fn set_backends(&self, backends: &[usize]) -> Result<()> {
        if let Some(k) = backends.iter().find(|k| **k >= self.backends.len()) {
            bail!(
                "backend {k} does not exist (the balancer has {})",
                self.backends.len()
            );
        }
        let mut set = backends.to_vec();
        set.sort_unstable();
        set.dedup();
        self.state.lock().expect("load balancer state").active = set;
        self.apply()
    }

    /// The backends new flows go to now.
    pub fn active(&self) -> Vec<usize> {
        self.state
            .lock()
            .expect("load balancer state")
            .active
            .clone()
    }

    /// New flows sent to each backend so far, by index (the nat chain sees only the first
    /// packet of a flow, so its counter counts flows).
    pub fn new_flows(&self) -> Result<Vec<u64>> {
        let counts = self.chain_counters()?;
        Ok((0..self.backends.len())
            .map(|k| counts.get(&format!("be{k}")).copied().unwrap_or(0))
            .collect())
    }

    /// New flows dropped because the set was empty.
    pub fn refused_flows(&self) -> Result<u64> {
        Ok(self.chain_counters()?.get("none").copied().unwrap_or(0))
    }

    fn chain_counters(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        let nft = tools()?.nft.to_str().context("nft path is not UTF-8")?;
        let out = self
            .lb
            .exec(nft, &["-j", "list", "table", "ip", "tether_lb"])?;
        let v: serde_json::Value =
            serde_json::from_str(&out).context("parsing `nft -j list table` output")?;
        let mut counts = std::collections::BTreeMap::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            let rule = &item["rule"];
            let Some(chain) = rule["chain"].as_str() else {
                continue;
            };
            for expr in rule["expr"].as_array().into_iter().flatten() {
                if let Some(p) = expr["counter"]["packets"].as_u64() {
                    *counts.entry(chain.to_owned()).or_default() += p;
                }
            }
        }
        Ok(counts)
    }

    /// Drops every packet between backends `a` and `b`, both ways (a network partition between
    /// two replicas: their peer link); flows from clients and to the test process still pass.
    pub fn cut_between(&self, a: usize, b: usize) -> Result<()> {
        let n = self.backends.len();
        if a >= n || b >= n || a == b {
            bail!("cannot cut backends {a} and {b} (the balancer has {n})");
        }
        self.state
            .lock()
            .expect("load balancer state")
            .cuts
            .insert((a.min(b), a.max(b)));
        self.apply()
    }

    /// Lets packets between backends `a` and `b` through again.
    pub fn heal_between(&self, a: usize, b: usize) -> Result<()> {
        self.state
            .lock()
            .expect("load balancer state")
            .cuts
            .remove(&(a.min(b), a.max(b)));
        self.apply()
    }

    /// Takes the link to backend `k` down at the balancer's end: packets to and from it vanish
    /// (a dead host or a cut cable; the balancer still sends it the new flows it hashes there,
    /// as a balancer whose health check has not noticed yet does).
    pub fn backend_link_down(&self, k: usize) -> Result<()> {
        self.lb
            .ip(&["link", "set", &backend_link(k), "down"])
            .map(drop)
    }

    /// Brings the link to backend `k` back (and its default route, which went with it).
    pub fn backend_link_up(&self, k: usize) -> Result<()> {
        let b = &self.backends[k];
        self.lb.ip(&["link", "set", &backend_link(k), "up"])?;
        wait_links_up(
            &[(&self.lb, backend_link(k).as_str()), (&b.ns, "eth0")],
            Duration::from_secs(10),
        )?;
        b.ns.ip(&["route", "replace", "default", "via", &b.gateway.to_string()])
            .map(drop)
    }

    /// Config tables making a gateway replica `id` on the PostgreSQL at `dsn` (see
    /// [`crate::replica_config`]), advertising its peer listener at backend `k`'s address,
    /// where the other replicas reach it.
    pub fn replica_config(&self, k: usize, dsn: &str, id: &str) -> String {
        let mut t: toml::Table = crate::replica_config(dsn, id)
            .parse()
            .expect("replica_config is TOML");
        let peer_port = t
            .get("cluster")
            .and_then(|c| c.get("advertise"))
            .and_then(|a| a.as_str())
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .unwrap_or(7445);
        if let Some(toml::Value::Table(c)) = t.get_mut("cluster") {
            c.insert(
                "advertise".into(),
                toml::Value::String(format!("{}:{peer_port}", self.backends[k].addr)),
            );
        }
        toml::to_string(&t).expect("TOML serializes")
    }

    /// Starts a `tether-gateway serve` process in backend `k`'s namespace: its tunnel on
    /// [`backend_addr(k)`](Self::backend_addr), northbound and ops on free ports of the
    /// backend's address (the test process reaches them), `extra` appended to its config
    /// (e.g. [`LoadBalancer::replica_config`]). Call it again after the process exits to
    /// restart the replica at the same address.
    pub async fn spawn_gateway(
        &self,
        k: usize,
        pki: &crate::Pki,
        extra: &str,
    ) -> crate::GatewayProcess {
        crate::GatewayProcess::spawn_netns_configured(
            pki,
            &self.backends[k].ns,
            self.backend_addr(k),
            self.backends[k].addr.into(),
            extra,
        )
        .await
    }
}

/// A seed for the flow hash, different per balancer and run.
fn rand_seed() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() as u32
}

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        // The route goes with the link; the namespaces (and the backend links with them) go
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
