//! Backend: a process's resident memory and CPU time, read from `/proc/<pid>/status` and
//! `/proc/<pid>/stat`, and a sampler that records them (with the fleet's connected count) over
//! time for the report's charts.

use std::sync::atomic::{AtomicU32, Ordering};
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

/// One point of the time series.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Sample {
    /// Seconds since the run started.
    pub t: f64,
    /// Agents the fleet holds a session for.
    pub connected: usize,
    /// Gateway RSS, KiB (0 when unknown).
    pub gateway_rss_kib: u64,
    /// Gateway CPU over the last interval, percent of one core.
    pub gateway_cpu_pct: f64,
    /// This process's (the fleet's and driver's) RSS, KiB.
    pub fleet_rss_kib: u64,
    /// This process's CPU over the last interval, percent of one core.
    pub fleet_cpu_pct: f64,
}

/// Samples the gateway (whose pid may change across a restart) and this process.
#[derive(Clone, Debug)]
pub struct Sampler {
    /// The gateway's pid; 0 when unknown (an external gateway without `--gateway-pid`).
    pub gateway_pid: Arc<AtomicU32>,
    samples: Arc<Mutex<Vec<Sample>>>,
    start: Instant,
}

impl Sampler {
    /// A sampler whose time axis starts now.
    pub fn new(gateway_pid: u32) -> Sampler {
        Sampler {
            gateway_pid: Arc::new(AtomicU32::new(gateway_pid)),
            samples: Default::default(),
            start: Instant::now(),
        }
    }

    /// Seconds since the sampler started.
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Samples every `every` until `stop`; `connected` reads the fleet's count.
    pub async fn run(
        self,
        every: Duration,
        connected: impl Fn() -> usize + Send + 'static,
        stop: tether_runtime::CancellationToken,
    ) {
        let me = std::process::id();
        let mut last_gw: Option<(u32, f64, f64)> = None;
        let mut last_me: Option<(f64, f64)> = None;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let t = self.now();
            let mut s = Sample {
                t,
                connected: connected(),
                ..Default::default()
            };
            let pid = self.gateway_pid.load(Ordering::Relaxed);
            if pid != 0
                && let Some(r) = read(pid)
            {
                s.gateway_rss_kib = r.rss_kib;
                if let Some((p, t0, c0)) = last_gw
                    && p == pid
                    && t > t0
                {
                    s.gateway_cpu_pct = (r.cpu_secs - c0) / (t - t0) * 100.0;
                }
                last_gw = Some((pid, t, r.cpu_secs));
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

    /// Reads the gateway now.
    pub fn gateway_now(&self) -> Option<ProcReading> {
        match self.gateway_pid.load(Ordering::Relaxed) {
            0 => None,
            pid => read(pid),
        }
    }
}

/// The gateway's average CPU (percent of one core) and its RSS at the end, over `window`.
pub async fn measure_window(sampler: &Sampler, window: Duration) -> Option<Window> {
    let a = sampler.gateway_now()?;
    let udp_a = udp_datagrams_received();
    let t = Instant::now();
    tokio::time::sleep(window).await;
    let b = sampler.gateway_now()?;
    let secs = t.elapsed().as_secs_f64();
    Some(Window {
        cpu_pct: (b.cpu_secs - a.cpu_secs) / secs * 100.0,
        rss_kib: b.rss_kib,
        udp_datagrams_per_s: udp_a
            .zip(udp_datagrams_received())
            .map(|(a, b)| b.saturating_sub(a) as f64 / secs),
    })
}

/// What [`measure_window`] measured.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Gateway CPU, percent of one core.
    pub cpu_pct: f64,
    /// Gateway RSS at the end, KiB.
    pub rss_kib: u64,
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
