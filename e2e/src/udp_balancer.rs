//! A round-robin UDP load balancer on loopback, in front of gateway replicas' QUIC listeners,
//! for tests where agents know one address only: each new flow (client address) goes to the
//! next backend that is up, and stays with it, as a cloud network load balancer does. Not a
//! fake: a real forwarder of real datagrams (a tiny NAT: one socket per flow towards the
//! backend, replies sent back from the front address). Marking a backend down stops new flows
//! to it, as a load balancer's health check or deregistration does; flows already on it go on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_runtime::CancellationToken;
use tokio::net::UdpSocket;

/// A flow with no datagram either way for this long is forgotten.
const FLOW_IDLE: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Backends {
    list: Vec<(SocketAddr, bool)>,
    next: usize,
    /// Flows sent to each backend so far.
    flows: HashMap<SocketAddr, usize>,
}

/// See the module docs. Stops when dropped.
#[derive(Debug)]
pub struct UdpBalancer {
    /// The one address agents dial.
    pub addr: SocketAddr,
    backends: Arc<Mutex<Backends>>,
    stop: CancellationToken,
}

impl UdpBalancer {
    /// Starts one on a free loopback port in front of `backends` (all up).
    pub async fn start(backends: &[SocketAddr]) -> UdpBalancer {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind balancer"));
        let addr = front.local_addr().expect("balancer address");
        let backends = Arc::new(Mutex::new(Backends {
            list: backends.iter().map(|b| (*b, true)).collect(),
            next: 0,
            flows: HashMap::new(),
        }));
        let stop = CancellationToken::new();
        tokio::spawn(run(front, backends.clone(), stop.clone()));
        UdpBalancer {
            addr,
            backends,
            stop,
        }
    }

    /// New flows go to `backend` (`up`) or not; a backend not listed yet is added.
    pub fn set_up(&self, backend: SocketAddr, up: bool) {
        let mut b = self.backends.lock().expect("balancer lock");
        match b.list.iter_mut().find(|(a, _)| *a == backend) {
            Some(entry) => entry.1 = up,
            None => b.list.push((backend, up)),
        }
    }

    /// Flows sent to `backend` so far.
    pub fn flows_to(&self, backend: SocketAddr) -> usize {
        let b = self.backends.lock().expect("balancer lock");
        b.flows.get(&backend).copied().unwrap_or(0)
    }
}

impl Drop for UdpBalancer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn pick(backends: &Mutex<Backends>) -> Option<SocketAddr> {
    let mut b = backends.lock().expect("balancer lock");
    let n = b.list.len();
    for _ in 0..n {
        let i = b.next % n;
        b.next = b.next.wrapping_add(1);
        if b.list[i].1 {
            let addr = b.list[i].0;
            *b.flows.entry(addr).or_default() += 1;
            return Some(addr);
        }
    }
    None
}

async fn run(front: Arc<UdpSocket>, backends: Arc<Mutex<Backends>>, stop: CancellationToken) {
    let mut flows: HashMap<SocketAddr, (Arc<UdpSocket>, CancellationToken)> = HashMap::new();
    let (gone_tx, mut gone_rx) = tokio::sync::mpsc::unbounded_channel::<SocketAddr>();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, client) = tokio::select! {
            _ = stop.cancelled() => break,
            Some(client) = gone_rx.recv() => {
                flows.remove(&client);
                continue;
            }
            r = front.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(_) => continue,
            },
        };
        if let std::collections::hash_map::Entry::Vacant(slot) = flows.entry(client) {
            let Some(backend) = pick(&backends) else {
                continue;
            };
            let Ok(sock) = UdpSocket::bind("127.0.0.1:0").await else {
                continue;
            };
            if sock.connect(backend).await.is_err() {
                continue;
            }
            let sock = Arc::new(sock);
            let flow_stop = stop.child_token();
            tokio::spawn(replies(
                sock.clone(),
                front.clone(),
                client,
                flow_stop.clone(),
                gone_tx.clone(),
            ));
            slot.insert((sock, flow_stop));
        }
        if let Some((sock, _)) = flows.get(&client) {
            let _ = sock.send(&buf[..n]).await;
        }
    }
    for (_, (_, s)) in flows {
        s.cancel();
    }
}

/// Backend → client for one flow, until it idles out or the balancer stops.
async fn replies(
    sock: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    stop: CancellationToken,
    gone: tokio::sync::mpsc::UnboundedSender<SocketAddr>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let r = tokio::select! {
            _ = stop.cancelled() => break,
            r = tokio::time::timeout(FLOW_IDLE, sock.recv(&mut buf)) => r,
        };
        match r {
            Ok(Ok(n)) => {
                let _ = front.send_to(&buf[..n], client).await;
            }
            // A dead backend answers with ICMP port unreachable: keep the flow (a restarted
            // backend on the same port takes it again), as a load balancer would.
            Ok(Err(_)) => continue,
            Err(_) => break,
        }
    }
    let _ = gone.send(client);
}
