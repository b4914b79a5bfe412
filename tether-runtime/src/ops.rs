//! The ops HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (process is alive) and
//! `/readyz` (ready to do its job, with a JSON detail body). Loopback by default.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::accept::Acceptor;

/// The answer `/readyz` gives.
#[derive(Clone, Debug)]
pub struct Readiness {
    /// 200 when true, 503 when false.
    pub ready: bool,
    /// A JSON body explaining the state.
    pub detail: serde_json::Value,
}

/// Computes readiness on each request.
pub type ReadinessFn = Arc<dyn Fn() -> Readiness + Send + Sync>;

/// The process-wide Prometheus recorder, installed on first use. Call it before anything records
/// (the gateway's and agent's `start` do): metrics recorded with no recorder installed are lost.
///
/// One per process: the gateway and agent each install it in `main`; tests that run several
/// gateways in one process share it, which is why metric values in tests are read as deltas.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0,
                ])
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Histograms buffer every sample until drained: without upkeep an unscraped
            // process grows by each sample it records (~3 MB a minute in a gateway relaying
            // 1,000 calls/s). Prometheus' own scrapes drain them too; this bounds the rest.
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                });
            // Another recorder may already be installed (a test harness); ours still renders
            // what is recorded through it only if it is the global one, so say so.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            handle
        })
        .clone()
}

/// Answers a `POST` to the ops endpoint: the path, the body (at most [`ACTION_BODY_MAX`]
/// bytes, UTF-8), and `(status, body)` back; `None` for a path it does not know (404).
pub type ActionFn = Arc<dyn Fn(&str, &str) -> Option<(u16, String)> + Send + Sync>;

/// The largest `POST` body the ops endpoint reads.
pub const ACTION_BODY_MAX: usize = 4096;

/// Serves the ops endpoint on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, readiness: ReadinessFn, shutdown: CancellationToken) {
    serve_with_actions(listener, readiness, None, shutdown).await
}

/// [`serve`], also answering `POST`s with `actions`. Only a peer on a loopback address may
/// `POST` (whatever address the endpoint is bound to: `metrics.enabled` binds it on the pod's
/// address for scrapes, which must not be able to act): others get 403.
pub async fn serve_with_actions(
    listener: TcpListener,
    readiness: ReadinessFn,
    actions: Option<ActionFn>,
    shutdown: CancellationToken,
) {
    let handle = metrics_handle();
    let mut listener = Acceptor::new(listener, "ops");
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let handle = handle.clone();
        let readiness = readiness.clone();
        let actions = actions.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (handle, readiness, actions) =
                    (handle.clone(), readiness.clone(), actions.clone());
                async move {
                    if req.method() == Method::POST {
                        return Ok::<_, Infallible>(act(req, peer, actions.as_ref()).await);
                    }
                    Ok::<_, Infallible>(route(&req, &handle, &readiness))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

async fn act(
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
    actions: Option<&ActionFn>,
) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    let Some(actions) = actions else {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    };
    if !peer.ip().is_loopback() {
        return text(
            StatusCode::FORBIDDEN,
            "actions are taken only from the agent's own pod (a loopback address)\n",
        );
    }
    let path = req.uri().path().to_owned();
    let body = match http_body_util::Limited::new(req.into_body(), ACTION_BODY_MAX)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the body is above {ACTION_BODY_MAX} bytes\n"),
            );
        }
    };
    let Ok(body) = std::str::from_utf8(&body) else {
        return text(StatusCode::BAD_REQUEST, "the body is not UTF-8\n");
    };
    match actions(&path, body) {
        Some((status, answer)) => text(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &answer,
        ),
        None => text(StatusCode::NOT_FOUND, "no such action\n"),
    }
}

fn route(
    req: &Request<Incoming>,
    metrics: &PrometheusHandle,
    ready: &ReadinessFn,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, &metrics.render());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let r = ready();
            let status = if r.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut body = serde_json::json!({ "ready": r.ready });
            if let (Some(b), serde_json::Value::Object(d)) = (body.as_object_mut(), r.detail) {
                b.extend(d);
            }
            let mut resp = text(status, &format!("{body}\n"));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n",
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *r.status_mut() = status;
    r
}

/// A blocking GET against an ops endpoint: `(status, body)`. Used by exec probes, so the
/// container image needs neither a shell nor curl.
pub fn probe(
    addr: std::net::SocketAddr,
    path: &str,
    timeout: std::time::Duration,
) -> std::io::Result<(u16, String)> {
    request(addr, "GET", path, "", timeout)
}

/// A blocking request against an ops endpoint (`GET`, or `POST` with `body`): `(status,
/// body)`. What the agent's `pause`/`resume` subcommands send.
pub fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    timeout: std::time::Duration,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.take(64 * 1024).read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response")
        })?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
