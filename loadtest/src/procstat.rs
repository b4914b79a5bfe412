//! Backend: a process's resident memory and CPU time, read from `/proc/<pid>/status` and
//! `/proc/<pid>/stat`, and a sampler that records them for every gateway replica and this
//! process (with the fleet's connected count, per replica) over time for the report's charts.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Clock ticks per second of `utime`/`stime` in `/proc/<pid>/stat` (`USER_HZ`, 100 on every
/// Linux architecture this runs on).
const TICKS_PER_SEC: f64 = 100.0;

/// One reading of a process.
#[derive(Clone, Copy, Debug)]
pub struct ProcReading {
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// User + system CPU time so far, seconds.
    pub cpu_secs: f64,
}

/// Reads `pid`'s RSS and CPU time; `None` when the process is gone.
pub fn read(pid: u32) -> Option<ProcReading> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the man page (utime, stime); `rest` starts at field 3.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(ProcReading {
        rss_kib,
        cpu_secs: (utime + stime) as f64 / TICKS_PER_SEC,
    })
}

/// One replica at one point of the time series.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ReplicaPoint {
    /// Its RSS, KiB (0 when unknown or not running).
    pub rss_kib: u64,
    /// Its CPU over the last interval, percent of one core.
    pub cpu_pct: f64,
    /// Agents of the fleet with a session on it.
    pub connected: usize,
}

/// One point of the time series.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    /// Seconds since the run started.
    pub t: f64,
    /// Agents the fleet holds a session for.
    pub connected: usize,
    /// Gateway RSS, KiB (0 when unknown), every replica together.
    pub gateway_rss_kib: u64,
    /// Gateway CPU over the last interval, percent of one core, every replica together.
    pub gateway_cpu_pct: f64,
    /// Each replica (one entry for a lone gateway).
    pub replicas: Vec<ReplicaPoint>,
    /// This process's (the fleet's and driver's) RSS, KiB.
    pub fleet_rss_kib: u64,
    /// This process's CPU over the last interval, percent of one core.
    pub fleet_cpu_pct: f64,
}

/// What the fleet reports at each sample: agents connected, in all and per replica.
pub type Placement = (usize, Vec<usize>);

/// Samples the gateway replicas (whose pids change across restarts) and this process.
#[derive(Clone, Debug)]
pub struct Sampler {
    /// Each replica's pid; 0 when unknown (not running, or an external gateway without
    /// `--gateway-pid`).
    pids: Arc<Mutex<Vec<u32>>>,
    samples: Arc<Mutex<Vec<Sample>>>,
    start: Instant,
}

impl Sampler {
    /// A sampler of the replicas with these pids, whose time axis starts now.
    pub fn new(gateway_pids: Vec<u32>) -> Sampler {
        Sampler {
            pids: Arc::new(Mutex::new(gateway_pids)),
            samples: Default::default(),
            start: Instant::now(),
        }
    }

    /// Replica `k` runs as `pid` now (0: not running).
    pub fn set_pid(&self, k: usize, pid: u32) {
        if let Some(p) = self.pids.lock().expect("pids").get_mut(k) {
            *p = pid;
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.pids.lock().expect("pids").clone()
    }

    /// Seconds since the sampler started.
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Samples every `every` until `stop`; `connected` reads the fleet's counts.
    pub async fn run(
        self,
        every: Duration,
        connected: impl Fn() -> Placement + Send + 'static,
        stop: tether_runtime::CancellationToken,
    ) {
        let me = std::process::id();
        let mut last_gw: Vec<Option<(u32, f64, f64)>> = Vec::new();
        let mut last_me: Option<(f64, f64)> = None;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let t = self.now();
            let (total, by_replica) = connected();
            let mut s = Sample {
                t,
                connected: total,
                ..Default::default()
            };
            let pids = self.pids();
            last_gw.resize(pids.len(), None);
            for (k, pid) in pids.into_iter().enumerate() {
                let mut point = ReplicaPoint {
                    connected: by_replica.get(k).copied().unwrap_or(0),
                    ..Default::default()
                };
                if pid != 0
                    && let Some(r) = read(pid)
                {
                    point.rss_kib = r.rss_kib;
                    if let Some((p, t0, c0)) = last_gw[k]
                        && p == pid
                        && t > t0
                    {
                        point.cpu_pct = (r.cpu_secs - c0) / (t - t0) * 100.0;
                    }
                    last_gw[k] = Some((pid, t, r.cpu_secs));
                }
                s.gateway_rss_kib += point.rss_kib;
                s.gateway_cpu_pct += point.cpu_pct;
                s.replicas.push(point);
            }
            if let Some(r) = read(me) {
                s.fleet_rss_kib = r.rss_kib;
                if let Some((t0, c0)) = last_me
                    && t > t0
                {
                    s.fleet_cpu_pct = (r.cpu_secs - c0) / (t - t0) * 100.0;
                }
                last_me = Some((t, r.cpu_secs));
            }
            self.samples.lock().expect("samples").push(s);
        }
    }

    /// Every sample so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().expect("samples").clone()
    }

    /// Reads every replica now, summed; `None` when none is known to run.
    pub fn gateway_now(&self) -> Option<ProcReading> {
        let each: Vec<ProcReading> = self.replicas_now().into_iter().flatten().collect();
        (!each.is_empty()).then(|| ProcReading {
            rss_kib: each.iter().map(|r| r.rss_kib).sum(),
            cpu_secs: each.iter().map(|r| r.cpu_secs).sum(),
        })
    }

    /// Reads each replica now (`None`: not running or unknown).
    pub fn replicas_now(&self) -> Vec<Option<ProcReading>> {
        self.pids()
            .into_iter()
            .map(|pid| if pid == 0 { None } else { read(pid) })
            .collect()
    }
}

/// The gateway's average CPU (percent of one core) and its RSS at the end, over `window`, in
/// all and per replica.
pub async fn measure_window(sampler: &Sampler, window: Duration) -> Option<Window> {
    let a = sampler.replicas_now();
    let udp_a = udp_datagrams_received();
    let t = Instant::now();
    tokio::time::sleep(window).await;
    let b = sampler.replicas_now();
    let secs = t.elapsed().as_secs_f64();
    let per_replica: Vec<Option<(f64, u64)>> = a
        .iter()
        .zip(&b)
        .map(|(a, b)| {
            let (a, b) = (a.as_ref()?, b.as_ref()?);
            Some(((b.cpu_secs - a.cpu_secs) / secs * 100.0, b.rss_kib))
        })
        .collect();
    let known: Vec<(f64, u64)> = per_replica.iter().flatten().copied().collect();
    if known.is_empty() {
        return None;
    }
    Some(Window {
        cpu_pct: known.iter().map(|k| k.0).sum(),
        rss_kib: known.iter().map(|k| k.1).sum(),
        per_replica,
        udp_datagrams_per_s: udp_a
            .zip(udp_datagrams_received())
            .map(|(a, b)| b.saturating_sub(a) as f64 / secs),
    })
}

/// What [`measure_window`] measured.
#[derive(Clone, Debug)]
pub struct Window {
    /// Gateway CPU, percent of one core, every replica together.
    pub cpu_pct: f64,
    /// Gateway RSS at the end, KiB, every replica together.
    pub rss_kib: u64,
    /// Each replica's (CPU %, RSS KiB at the end); `None` for one that restarted or was not
    /// running.
    pub per_replica: Vec<Option<(f64, u64)>>,
    /// UDP datagrams received per second by this network namespace (on loopback each datagram
    /// between fleet and gateway is counted once, whichever way it went).
    pub udp_datagrams_per_s: Option<f64>,
}

/// `Udp: InDatagrams` of this network namespace (`/proc/net/snmp`).
pub fn udp_datagrams_received() -> Option<u64> {
    udp_counter("InDatagrams")
}

/// `Udp: RcvbufErrors` of this network namespace: datagrams dropped because a socket's receive
/// buffer was full.
pub fn udp_receive_buffer_drops() -> Option<u64> {
    udp_counter("RcvbufErrors")
}

fn udp_counter(name: &str) -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// Datagrams dropped so far by the IPv4 UDP socket bound to `port` (the last column of
/// `/proc/net/udp`); `None` when no such socket exists.
pub fn udp_socket_drops(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/udp").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local_port = f.get(1)?.rsplit(':').next()?;
        (u16::from_str_radix(local_port, 16).ok()? == port)
            .then(|| f.last()?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let r = read(std::process::id()).expect("own /proc entry");
        assert!(r.rss_kib > 0);
        assert!(r.cpu_secs >= 0.0);
    }

    #[test]
    fn reads_udp_counters() {
        let before = udp_datagrams_received().expect("/proc/net/snmp has Udp: InDatagrams");
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"x", rx.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 4];
        rx.recv(&mut buf).unwrap();
        assert!(udp_datagrams_received().unwrap() > before);
        assert!(udp_receive_buffer_drops().is_some());
        let port = rx.local_addr().unwrap().port();
        assert_eq!(
            udp_socket_drops(port),
            Some(0),
            "a socket that dropped nothing"
        );
    }
}
