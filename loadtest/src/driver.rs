//! The driver: talks to the gateway's northbound API only, as a control plane would — relayed
//! unary calls and server streams to agents (`tether.demo.v1.Echo`, routed with
//! `tether-agent`), durable commands (`tether.v1.Commands`), the agent list
//! (`tether.v1.Agents`) and console login links (`tether.v1.Console`) — over a few HTTP/2
//! connections with a client certificate to each gateway replica. A relayed call goes to the replica the caller names (`via`): the one
//! holding the agent's session, or another that must forward it.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use tether_api::demo::v1::EchoRequest;
use tether_api::demo::v1::echo_client::EchoClient;
use tether_api::v1;
use tonic::transport::Channel;

use crate::LoadError;
use crate::identities::ClientFiles;

/// A pool of northbound connections, per replica.
#[derive(Debug)]
pub struct Driver {
    replicas: Vec<Vec<Channel>>,
    next: AtomicUsize,
}

/// Outcome of a batch of calls.
#[derive(Debug)]
pub struct Batch {
    /// Calls made.
    pub calls: usize,
    /// Calls that succeeded.
    pub ok: usize,
    /// Failures by gRPC code.
    pub errors: BTreeMap<String, usize>,
    /// A few failure messages, for the report.
    pub samples: Vec<String>,
    /// Latency of every call (successful or not), microseconds.
    pub latency: Histogram<u64>,
    /// From the first call's start to the last call's end.
    pub elapsed: Duration,
}

impl Batch {
    /// A batch of no calls yet, to [`record`](Self::record) into.
    pub fn new() -> Batch {
        Batch {
            calls: 0,
            ok: 0,
            errors: BTreeMap::new(),
            samples: Vec::new(),
            latency: histogram(),
            elapsed: Duration::ZERO,
        }
    }

    /// Failed calls.
    pub fn failed(&self) -> usize {
        self.calls - self.ok
    }

    /// Counts one call that took `took` and ended with `r`.
    pub fn record<T>(&mut self, took: Duration, r: &Result<T, tonic::Status>) {
        self.calls += 1;
        self.latency
            .saturating_record(took.as_micros().max(1) as u64);
        match r {
            Ok(_) => self.ok += 1,
            Err(s) => {
                *self.errors.entry(format!("{:?}", s.code())).or_default() += 1;
                if self.samples.len() < 5 {
                    self.samples
                        .push(format!("{:?}: {}", s.code(), s.message()));
                }
            }
        }
    }
}

impl Default for Batch {
    fn default() -> Batch {
        Batch::new()
    }
}

/// A latency histogram, 1 µs to 10 min at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

impl Driver {
    /// Opens `connections` northbound connections to each of `addrs` (one per replica) with
    /// `files`.
    pub async fn connect(
        addrs: &[String],
        server_name: &str,
        files: &ClientFiles,
        connections: usize,
    ) -> Result<Driver, LoadError> {
        let mut replicas = Vec::new();
        for addr in addrs {
            let target = tether_gateway::tools::ctl::Target {
                addr: addr.clone(),
                ca: files.ca.clone(),
                cert: files.cert.clone(),
                key: files.key.clone(),
                server_name: Some(server_name.to_owned()),
            };
            let mut channels = Vec::new();
            for _ in 0..connections.max(1) {
                channels.push(
                    tether_gateway::tools::ctl::connect(&target)
                        .await
                        .map_err(|e| LoadError::Driver(format!("{addr}: {e}")))?,
                );
            }
            replicas.push(channels);
        }
        if replicas.is_empty() {
            return Err(LoadError::Driver("no northbound address".into()));
        }
        Ok(Driver {
            replicas,
            next: AtomicUsize::new(0),
        })
    }

    /// Replicas the driver reaches.
    pub fn replicas(&self) -> usize {
        self.replicas.len()
    }

    /// A connection to any replica (round robin over all of them).
    fn channel(&self) -> Channel {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let r = &self.replicas[i % self.replicas.len()];
        r[(i / self.replicas.len()) % r.len()].clone()
    }

    /// A connection to replica `via`.
    fn channel_to(&self, via: usize) -> Channel {
        let r = &self.replicas[via % self.replicas.len()];
        r[self.next.fetch_add(1, Ordering::Relaxed) % r.len()].clone()
    }

    fn routed<T>(agent: &str, msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert(
            "tether-agent",
            agent.parse().expect("agent ids are ASCII metadata"),
        );
        req.set_timeout(timeout);
        req
    }

    /// One relayed unary call to `agent`'s echo service, through replica `via`.
    pub async fn unary(
        &self,
        via: usize,
        agent: &str,
        timeout: Duration,
    ) -> Result<(), tonic::Status> {
        let mut c = EchoClient::new(self.channel_to(via));
        let msg = EchoRequest {
            message: "ping".into(),
            ..Default::default()
        };
        c.unary(Self::routed(agent, msg, timeout)).await.map(|_| ())
    }

    /// A relayed server stream of `count` messages of `size` bytes from `agent`, through
    /// replica `via`; returns the bytes received.
    pub async fn bulk(
        &self,
        via: usize,
        agent: &str,
        count: u32,
        size: u32,
        timeout: Duration,
    ) -> Result<u64, tonic::Status> {
        let mut c = EchoClient::new(self.channel_to(via)).max_decoding_message_size(16 << 20);
        let msg = EchoRequest {
            message: "bulk".into(),
            repeat: count,
            size,
            ..Default::default()
        };
        let mut stream = c
            .server_stream(Self::routed(agent, msg, timeout))
            .await?
            .into_inner();
        let mut bytes = 0u64;
        while let Some(m) = stream.message().await? {
            bytes += m.payload.len() as u64;
        }
        Ok(bytes)
    }

    /// Submits one command; returns its id.
    pub async fn submit(
        &self,
        agent: &str,
        kind: &str,
        payload: Vec<u8>,
    ) -> Result<String, tonic::Status> {
        let mut c = v1::commands_client::CommandsClient::new(self.channel());
        let r = c
            .submit(v1::SubmitCommandRequest {
                agent: agent.to_owned(),
                kind: kind.to_owned(),
                payload,
                content_type: "text/plain".into(),
                ..Default::default()
            })
            .await?;
        Ok(r.into_inner().id)
    }

    /// Every command created at or after `from` in `state` (all pages).
    pub async fn list_commands(
        &self,
        from: std::time::SystemTime,
        state: v1::CommandState,
    ) -> Result<Vec<v1::Command>, tonic::Status> {
        let mut c = v1::commands_client::CommandsClient::new(self.channel())
            .max_decoding_message_size(64 << 20);
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = c
                .list(v1::ListCommandsRequest {
                    state: state as i32,
                    from: Some(from.into()),
                    page_size: 1000,
                    page_token: token,
                    ..Default::default()
                })
                .await?
                .into_inner();
            out.extend(page.commands);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            token = page.next_page_token;
        }
    }

    /// A single-use console login link from replica `via`
    /// (`tether.v1.Console/CreateLoginLink`, as `tetherctl console` asks for it): its path,
    /// `/ui/login?code=…`.
    pub async fn login_link(&self, via: usize) -> Result<String, tonic::Status> {
        let link = v1::console_client::ConsoleClient::new(self.channel_to(via))
            .create_login_link(v1::CreateLoginLinkRequest {})
            .await?
            .into_inner();
        Ok(link.path)
    }

    /// Agents of `tenant` the gateway lists as connected.
    pub async fn connected_agents(&self, tenant: &str) -> Result<usize, tonic::Status> {
        Ok(self.list_connected(tenant).await?.len())
    }

    /// Sessions of `tenant`'s agents per replica id, as the gateway lists them (every replica
    /// lists every replica's sessions).
    pub async fn sessions_by_replica(
        &self,
        tenant: &str,
    ) -> Result<BTreeMap<String, usize>, tonic::Status> {
        let mut by = BTreeMap::new();
        for a in self.list_connected(tenant).await? {
            for s in a.sessions {
                let r = if s.replica.is_empty() {
                    "gateway".to_owned()
                } else {
                    s.replica
                };
                *by.entry(r).or_default() += 1;
            }
        }
        Ok(by)
    }

    async fn list_connected(&self, tenant: &str) -> Result<Vec<v1::Agent>, tonic::Status> {
        let mut c = v1::agents_client::AgentsClient::new(self.channel())
            .max_decoding_message_size(64 << 20);
        let r = c
            .list(v1::ListAgentsRequest {
                tenant: tenant.to_owned(),
                connected_only: true,
            })
            .await?;
        Ok(r.into_inner().agents)
    }
}

/// Runs `call` once per target with at most `concurrency` in flight; `tick` is called after
/// each call (progress bars).
pub async fn batch<T, F, Fut>(
    targets: Vec<T>,
    concurrency: usize,
    call: F,
    tick: impl Fn(),
) -> Batch
where
    F: Fn(T) -> Fut,
    Fut: Future<Output = Result<(), tonic::Status>>,
{
    let calls = targets.len();
    let start = Instant::now();
    let mut results = futures::stream::iter(targets.into_iter().map(|t| {
        let fut = call(t);
        async move {
            let t0 = Instant::now();
            let r = fut.await;
            (t0.elapsed(), r)
        }
    }))
    .buffer_unordered(concurrency.max(1));
    let mut b = Batch::new();
    while let Some((took, r)) = results.next().await {
        b.record(took, &r);
        tick();
    }
    debug_assert_eq!(b.calls, calls);
    b.elapsed = start.elapsed();
    b
}
