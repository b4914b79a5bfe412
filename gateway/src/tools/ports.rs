//! Dev tooling: loopback ports for processes that are stopped and started again on the same
//! address (the load test's replicas, the tests' gateways).

use std::net::SocketAddr;

/// An address on `ip` whose port is free for both UDP and TCP now and lies below the kernel's
/// ephemeral port range, so that no socket bound to port 0 (by this test or any other running
/// at the same time) can take it later: for a gateway that is stopped and started again on the
/// same address. Ports of the range 10000 up to the ephemeral range, picked at random.
pub fn restartable_port(ip: std::net::IpAddr) -> SocketAddr {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 10_000u16.min(ephemeral.saturating_sub(1_000));
    loop {
        let addr = SocketAddr::new(ip, rand::random_range(low..ephemeral));
        if std::net::UdpSocket::bind(addr).is_ok() && std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
}
