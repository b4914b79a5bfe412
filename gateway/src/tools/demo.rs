//! Backend used by `dev`, tests and benches: the demo upstream that `tether-gateway dev` runs
//! behind its dev agent. It serves `tether.demo.v1.Echo` (all four call shapes),
//! `grpc.health.v1.Health` and server reflection, so stock gRPC tools work through the relay.
//!
//! It records what callers cannot see from outside — calls the caller cancelled — so tests can
//! check that a cancellation reached the upstream.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tether_api::demo::v1::echo_server::{Echo, EchoServer};
use tether_api::demo::v1::{EchoRequest, EchoResponse};
use tether_runtime::CancellationToken;
use tokio::sync::{Notify, mpsc};
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status, Streaming};

/// What the demo upstream observed.
#[derive(Debug, Default)]
pub struct Observed {
    /// Calls started.
    pub calls: AtomicU64,
    /// Calls the caller went away from before they completed.
    pub cancelled: AtomicU64,
    /// Notified on every cancellation.
    pub on_cancel: Notify,
    /// Server-stream messages handed to the transport (for flow-control tests).
    pub sent: AtomicU64,
}

impl Observed {
    fn cancel(&self) {
        self.cancelled.fetch_add(1, Ordering::SeqCst);
        self.on_cancel.notify_waiters();
    }
}

/// Counts a call as cancelled if it is dropped before `done`.
struct CallGuard {
    observed: Arc<Observed>,
    done: bool,
}

impl CallGuard {
    fn new(observed: &Arc<Observed>) -> Self {
        observed.calls.fetch_add(1, Ordering::SeqCst);
        CallGuard {
            observed: observed.clone(),
            done: false,
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.done {
            self.observed.cancel();
        }
    }
}

/// The echo service.
#[derive(Debug, Clone, Default)]
pub struct EchoService {
    /// Shared observations.
    pub observed: Arc<Observed>,
}

fn seen<T>(req: &Request<T>) -> Vec<String> {
    let mut v: Vec<String> = req
        .metadata()
        .iter()
        .filter_map(|kv| match kv {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) if k.as_str().starts_with("x-") => {
                Some(format!("{}={}", k.as_str(), v.to_str().unwrap_or("")))
            }
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn failure(r: &EchoRequest) -> Option<Status> {
    (r.fail_with_code != 0).then(|| {
        let mut s = Status::new(Code::from_i32(r.fail_with_code as i32), r.message.clone());
        s.metadata_mut().insert(
            "x-echo-trailer",
            MetadataValue::from_static("failed-on-purpose"),
        );
        s
    })
}

fn reply(r: &EchoRequest, index: u32, seen_metadata: Vec<String>) -> EchoResponse {
    let payload = if r.size > 0 {
        vec![b'x'; r.size as usize]
    } else {
        r.payload.clone()
    };
    EchoResponse {
        message: r.message.clone(),
        index,
        payload,
        seen_metadata,
    }
}

fn with_initial<T>(mut resp: Response<T>) -> Response<T> {
    resp.metadata_mut()
        .insert("x-echo-initial", MetadataValue::from_static("yes"));
    resp
}

type RespStream = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let mut guard = CallGuard::new(&self.observed);
        let seen = seen(&req);
        let r = req.into_inner();
        if r.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(r.delay_ms))).await;
        }
        guard.done = true;
        if let Some(s) = failure(&r) {
            return Err(s);
        }
        Ok(with_initial(Response::new(reply(&r, 0, seen))))
    }

    type ServerStreamStream = RespStream;

    async fn server_stream(
        &self,
        req: Request<EchoRequest>,
    ) -> Result<Response<RespStream>, Status> {
        let seen = seen(&req);
        let r = req.into_inner();
        if let Some(s) = failure(&r) {
            return Err(s);
        }
        let guard = CallGuard::new(&self.observed);
        // Small buffer: a slow caller slows this producer (that is the flow-control test).
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut guard = guard; // move the whole guard, not just its field
            for i in 0..r.repeat.max(1) {
                if r.delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(u64::from(r.delay_ms))).await;
                }
                let m = reply(&r, i, if i == 0 { seen.clone() } else { Vec::new() });
                if tx.send(Ok(m)).await.is_err() {
                    return; // guard drops undone: counted as cancelled
                }
                guard.observed.sent.fetch_add(1, Ordering::SeqCst);
            }
            guard.done = true;
        });
        Ok(with_initial(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))))
    }

    async fn client_stream(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        let mut guard = CallGuard::new(&self.observed);
        let seen = seen(&req);
        let mut stream = req.into_inner();
        let mut joined = String::new();
        let mut bytes = Vec::new();
        let mut n = 0;
        while let Some(r) = stream.next().await {
            let r = r?;
            if let Some(s) = failure(&r) {
                guard.done = true;
                return Err(s);
            }
            joined.push_str(&r.message);
            bytes.extend_from_slice(&r.payload);
            n += 1;
        }
        guard.done = true;
        Ok(with_initial(Response::new(EchoResponse {
            message: joined,
            index: n,
            payload: bytes,
            seen_metadata: seen,
        })))
    }

    type BidiStreamStream = RespStream;

    async fn bidi_stream(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<RespStream>, Status> {
        let guard = CallGuard::new(&self.observed);
        let seen = seen(&req);
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut guard = guard; // move the whole guard, not just its field
            let mut i = 0;
            loop {
                let r = match inbound.next().await {
                    Some(Ok(r)) => r,
                    Some(Err(_)) => return,
                    None => {
                        guard.done = true;
                        return;
                    }
                };
                if let Some(s) = failure(&r) {
                    guard.done = true;
                    let _ = tx.send(Err(s)).await;
                    return;
                }
                let m = reply(&r, i, if i == 0 { seen.clone() } else { Vec::new() });
                i += 1;
                if tx.send(Ok(m)).await.is_err() {
                    return;
                }
            }
        });
        Ok(with_initial(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))))
    }
}

/// Serves Echo, health and reflection on `listener` (plain HTTP/2) until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    echo: EchoService,
    shutdown: CancellationToken,
) {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<EchoServer<EchoService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tether_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the generated descriptors are valid");
    // `Server::tcp_nodelay` only applies to listeners tonic binds itself; set it per socket.
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        s.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    let r = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(EchoServer::new(echo))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "demo upstream failed");
    }
}
