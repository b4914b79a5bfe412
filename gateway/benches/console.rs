//! The console with 10,000 agents: server-side render time of the fleet page and the bytes of
//! each live update, through the console's own code (`console::views`, `console::live`) over
//! a synthetic fleet shaped like `Agents/List`'s answer (20 tenants, two labels each, 10 %
//! offline, 5 % one minor release behind).
//!
//! `cargo bench -p tether-gateway --bench console` (figures in docs/PERFORMANCE.md).

use std::time::{Duration, Instant, SystemTime};

use tether_api::v1;
use tether_gateway::console::live::{counts_update, row_update};
use tether_gateway::console::views::{FleetFilter, facts_of, render_fleet};
use tether_gateway::northbound::auth::{Caller, CallerKind, TenantScope};
use tether_gateway::relay::Relay;
use tether_gateway::tunnel::registry::Registry;

const AGENTS: usize = 10_000;
const RUNS: usize = 30;

fn fleet(now: SystemTime) -> Vec<v1::Agent> {
    (0..AGENTS)
        .map(|i| {
            let tenant = format!("tenant-{:02}", i % 20);
            let name = format!("agent-{i:05}");
            let id = format!("{tenant}/{name}");
            let online = i % 10 != 0;
            let behind = i % 20 == 1;
            let sessions = if online {
                vec![v1::Session {
                    session_id: format!("019fb6e3-{i}"),
                    agent: id.clone(),
                    remote_addr: format!(
                        "10.{}.{}.{}:{}",
                        i / 65536 % 256,
                        i / 256 % 256,
                        i % 256,
                        40000 + i % 20000
                    ),
                    transport: if i % 7 == 0 { "tcp" } else { "quic" }.into(),
                    connected_at: Some((now - Duration::from_secs(i as u64 * 3)).into()),
                    agent_version: if behind { "0.0.9" } else { "0.1.0" }.into(),
                    labels: [
                        (
                            "region".to_owned(),
                            ["eu-west", "us-east", "ap-south"][i % 3].to_owned(),
                        ),
                        ("cluster".to_owned(), format!("k8s-{}", i % 50)),
                    ]
                    .into_iter()
                    .collect(),
                    capabilities: vec!["relay".into(), "tcp".into(), "commands".into()],
                    rtt: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 1_200_000,
                    }),
                    instance_id: format!("agent-{i:08x}"),
                    protocol_version: 1,
                    certificate_expires: Some((now + Duration::from_secs(86_400)).into()),
                    replica: String::new(),
                    version_skew: if behind {
                        v1::VersionSkew::Behind
                    } else {
                        v1::VersionSkew::Current
                    } as i32,
                    proxy: v1::ProxyUse::ProxyDirect as i32,
                    services: ["billing", "inventory"]
                        .into_iter()
                        .map(|n| v1::AgentService {
                            name: n.into(),
                            kind: "grpc".into(),
                        })
                        .collect(),
                    sessions_wanted: 1,
                    ..Default::default()
                }]
            } else {
                vec![]
            };
            v1::Agent {
                id,
                tenant,
                name,
                connected: online,
                sessions,
                last_seen: Some((now - Duration::from_secs(600)).into()),
                ..Default::default()
            }
        })
        .collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::with_capacity(RUNS);
    let mut out = None;
    for _ in 0..RUNS {
        let t = Instant::now();
        out = Some(std::hint::black_box(f()));
        times.push(t.elapsed());
    }
    (median(times), out.expect("ran"))
}

fn main() {
    let now = SystemTime::now();
    let agents = fleet(now);
    // Every agent has had calls, one in 50 a failing one.
    let relay = Relay::with_stream_limit(std::sync::Arc::new(Registry::default()), 256);
    for (i, a) in agents.iter().enumerate() {
        let id = a.id.parse().expect("agent id");
        relay.outcomes().record(&id, tonic::Code::Ok);
        relay.outcomes().agent(&id).to_agent(512);
        relay.outcomes().agent(&id).from_agent(4096);
        if i % 50 == 0 {
            relay.outcomes().record(&id, tonic::Code::Unavailable);
        }
    }
    let caller = Caller {
        name: "ops".into(),
        kind: CallerKind::Mtls,
        tenants: TenantScope::All,
    };
    let all = FleetFilter::default();
    let narrow = FleetFilter {
        tenant: "tenant-07".into(),
        status: "online".into(),
        label: "region=eu-west".into(),
        ..FleetFilter::default()
    };
    let last_page = FleetFilter {
        page: Some(AGENTS / 50),
        ..FleetFilter::default()
    };

    // What `Agents/List` hands the console: building 10,000 `v1::Agent` values (here a
    // clone of them, which allocates what building them from the registry does).
    let (list_t, _) = time(|| agents.clone());
    let (facts_t, _) = time(|| facts_of(&agents, now).len());
    let (page_t, page) = time(|| render_fleet(&caller, &agents, &all, &relay, now));
    let (narrow_t, narrow_page) = time(|| render_fleet(&caller, &agents, &narrow, &relay, now));
    let (last_t, _) = time(|| render_fleet(&caller, &agents, &last_page, &relay, now));
    // One live batch on an open fleet page: the changed agent's row and the counts (the
    // watch's batch reads the list once).
    let changed = &agents[1234];
    let (batch_t, (row, counts)) = time(|| {
        (
            row_update(changed, &all, &relay, now),
            counts_update(&facts_of(&agents, now), &all),
        )
    });
    let removed = row_update(&agents[1230], &narrow, &relay, now);

    println!("console with {AGENTS} agents, median of {RUNS} runs");
    let line =
        |what: &str, t: Duration, extra: String| println!("  {what:<44} {:>8.2} ms{extra}", ms(t));
    line(
        "the List answer (a copy of 10,000 agents)",
        list_t,
        String::new(),
    );
    line(
        "status, skew and order of the List answer",
        facts_t,
        String::new(),
    );
    line(
        "fleet page 1 (50 rows, counts)",
        page_t,
        format!("  {} bytes", page.len()),
    );
    line(
        "fleet page, 3 filters",
        narrow_t,
        format!("  {} bytes", narrow_page.len()),
    );
    line("fleet page, last page", last_t, String::new());
    line("one live batch (1 row, counts)", batch_t, String::new());
    for (what, u) in [
        ("row", &row),
        ("remove (filtered out)", &removed),
        ("counts", &counts),
    ] {
        println!(
            "  live update: {what:<31} {:>8} bytes on the wire",
            u.wire_len()
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
