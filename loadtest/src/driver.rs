//! The driver: talks to the gateway's northbound API only, as a control plane would — relayed
//! unary calls and server streams to agents (`tether.demo.v1.Echo`, routed with
//! `tether-agent`), durable commands (`tether.v1.Commands`) and the agent list
//! (`tether.v1.Agents`) — over a few HTTP/2 connections with a client certificate.

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

/// A pool of northbound connections.
#[derive(Debug)]
pub struct Driver {
    channels: Vec<Channel>,
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
    /// Failed calls.
    pub fn failed(&self) -> usize {
        self.calls - self.ok
    }
}

/// A latency histogram, 1 µs to 10 min at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

impl Driver {
    /// Opens `connections` northbound connections to `addr` with `files`.
    pub async fn connect(
        addr: &str,
        server_name: &str,
        files: &ClientFiles,
        connections: usize,
    ) -> Result<Driver, LoadError> {
        let target = tether_gateway::tools::ctl::Target {
            addr: addr.to_owned(),
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
                    .map_err(LoadError::Driver)?,
            );
        }
        Ok(Driver {
            channels,
            next: AtomicUsize::new(0),
        })
    }

    fn channel(&self) -> Channel {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        self.channels[i].clone()
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

    /// One relayed unary call to `agent`'s echo service.
    pub async fn unary(&self, agent: &str, timeout: Duration) -> Result<(), tonic::Status> {
        let mut c = EchoClient::new(self.channel());
        let msg = EchoRequest {
            message: "ping".into(),
            ..Default::default()
        };
        c.unary(Self::routed(agent, msg, timeout)).await.map(|_| ())
    }

    /// A relayed server stream of `count` messages of `size` bytes from `agent`; returns the
    /// bytes received.
    pub async fn bulk(
        &self,
        agent: &str,
        count: u32,
        size: u32,
        timeout: Duration,
    ) -> Result<u64, tonic::Status> {
        let mut c = EchoClient::new(self.channel()).max_decoding_message_size(16 << 20);
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

    /// Agents of `tenant` the gateway lists as connected.
    pub async fn connected_agents(&self, tenant: &str) -> Result<usize, tonic::Status> {
        let mut c = v1::agents_client::AgentsClient::new(self.channel())
            .max_decoding_message_size(64 << 20);
        let r = c
            .list(v1::ListAgentsRequest {
                tenant: tenant.to_owned(),
                connected_only: true,
            })
            .await?;
        Ok(r.into_inner().agents.len())
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
    let mut b = Batch {
        calls,
        ok: 0,
        errors: BTreeMap::new(),
        samples: Vec::new(),
        latency: histogram(),
        elapsed: Duration::ZERO,
    };
    while let Some((took, r)) = results.next().await {
        b.latency.saturating_record(took.as_micros().max(1) as u64);
        match r {
            Ok(()) => b.ok += 1,
            Err(s) => {
                *b.errors.entry(format!("{:?}", s.code())).or_default() += 1;
                if b.samples.len() < 5 {
                    b.samples.push(format!("{:?}: {}", s.code(), s.message()));
                }
            }
        }
        tick();
    }
    b.elapsed = start.elapsed();
    b
}
