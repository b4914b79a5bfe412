//! OpenTelemetry traces: a span per relayed call or stream, continuing the caller's W3C trace
//! context (`traceparent`, `tracestate`) and handing the next hop a context whose parent is
//! that span, exported over OTLP/gRPC.
//!
//! Without an endpoint ([`Telemetry::disabled`]) nothing is created or exported: a call's trace
//! context passes through unchanged, as before tracing existed, at the cost of a map copy.
//!
//! Spans leave the hot path at once: the processor hands each finished span to a bounded
//! channel (a full channel drops the span and counts it in
//! `tether_telemetry_spans_dropped_total`), and a task on the process's runtime batches them
//! (up to [`BATCH`] spans or [`BATCH_DELAY`]) to the exporter. The SDK's own batch processor
//! exports from a thread without a tokio reactor, which the tonic exporter needs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use opentelemetry::KeyValue;
pub use opentelemetry::trace::SpanKind;

/// Spans per export.
pub const BATCH: usize = 512;
/// Longest a finished span waits for its batch.
pub const BATCH_DELAY: Duration = Duration::from_millis(500);
/// Finished spans waiting for export; beyond, new ones are dropped (and counted).
pub const QUEUE: usize = 8192;

/// `[telemetry]` of the gateway's and the agent's config.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector, `http://host:4317`; unset: no spans, no export, no cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Share of calls that arrive without a trace context to start a sampled trace for (0 to
    /// 1). A call with a context follows its sampled flag (parent-based sampling).
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            sample_ratio: 1.0,
        }
    }
}

impl TelemetryConfig {
    /// What is wrong with it, as `(key under [telemetry], message)`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err((
                "sample_ratio",
                format!("{} is outside 0 to 1", self.sample_ratio),
            ));
        }
        if let Some(e) = &self.otlp_endpoint {
            let Ok(uri) = e.parse::<http::Uri>() else {
                return Err((
                    "otlp_endpoint",
                    format!("{e:?} is not a URL: write it as http://host:4317"),
                ));
            };
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                return Err((
                    "otlp_endpoint",
                    format!(
                        "{e:?} must be an http:// URL with a host (OTLP over gRPC to a collector beside this process, e.g. http://127.0.0.1:4317; TLS to a remote collector is not supported yet)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The process's tracer, or nothing. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Telemetry {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
}

/// Why the exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("the OTLP exporter for {endpoint} could not be built: {reason}")]
pub struct TelemetryError {
    endpoint: String,
    reason: String,
}

impl Telemetry {
    /// No spans, no export.
    pub const fn disabled() -> Telemetry {
        Telemetry { inner: None }
    }

    /// Spans of `service` (`tether-gateway`, `tether-agent`), instance `instance`, exported to
    /// `cfg.otlp_endpoint` when set. Call inside the tokio runtime that will export.
    pub fn new(
        cfg: &TelemetryConfig,
        service: &'static str,
        instance: &str,
    ) -> Result<Telemetry, TelemetryError> {
        let Some(endpoint) = &cfg.otlp_endpoint else {
            return Ok(Telemetry::disabled());
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| TelemetryError {
                endpoint: endpoint.clone(),
                reason: e.to_string(),
            })?;
        let resource = Resource::builder_empty()
            .with_service_name(service)
            .with_attributes([
                KeyValue::new("service.instance.id", instance.to_owned()),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build();
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(export_loop(
            exporter,
            resource.clone(),
            rx,
            endpoint.clone(),
        ));
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sample_ratio,
            ))))
            .with_span_processor(ChannelProcessor {
                tx: Mutex::new(Some(tx)),
            })
            .build();
        let tracer = provider.tracer(service);
        Ok(Telemetry {
            inner: Some(Arc::new(Inner { tracer, provider })),
        })
    }

    /// True when spans are made.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// A span named `name` of `kind`, child of the context in `incoming` (`traceparent`,
    /// `tracestate`; a new trace without one), with `attributes`.
    pub fn span(
        &self,
        name: String,
        kind: SpanKind,
        incoming: &BTreeMap<String, String>,
        attributes: Vec<KeyValue>,
    ) -> CallSpan {
        let Some(inner) = &self.inner else {
            return CallSpan {
                cx: None,
                incoming: incoming.clone(),
            };
        };
        let parent = TraceContextPropagator::new().extract(&Map(incoming));
        let span = inner
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&inner.tracer, &parent);
        CallSpan {
            cx: Some(parent.with_span(span)),
            incoming: BTreeMap::new(),
        }
    }

    /// A span named `name` of `kind` starting a trace of its own, linked to the context in
    /// `linked` (`traceparent`, `tracestate`; no link without one): work that runs later than
    /// the call that asked for it, as a command does. Sampled by the ratio, or as the linked
    /// context was.
    pub fn linked_span(
        &self,
        name: String,
        kind: SpanKind,
        linked: &BTreeMap<String, String>,
        attributes: Vec<KeyValue>,
    ) -> CallSpan {
        let Some(inner) = &self.inner else {
            return CallSpan::none();
        };
        let link = TraceContextPropagator::new()
            .extract(&Map(linked))
            .span()
            .span_context()
            .clone();
        let mut builder = inner
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes);
        if link.is_valid() {
            builder = builder.with_links(vec![opentelemetry::trace::Link::with_context(link)]);
        }
        let span = builder.start_with_context(&inner.tracer, &Context::new());
        CallSpan {
            cx: Some(Context::new().with_span(span)),
            incoming: BTreeMap::new(),
        }
    }

    /// Exports what is queued and stops (at shutdown).
    pub fn shutdown(&self) {
        if let Some(inner) = &self.inner {
            let _ = inner.provider.shutdown();
        }
    }
}

/// The trace context of a request's headers (`traceparent`, `tracestate`), for [`Telemetry::span`].
pub fn context_of(headers: &http::HeaderMap) -> BTreeMap<String, String> {
    ["traceparent", "tracestate"]
        .iter()
        .filter_map(|k| Some(((*k).to_owned(), headers.get(*k)?.to_str().ok()?.to_owned())))
        .collect()
}

/// One call's span; ended by [`CallSpan::end`] or, without a status, when dropped.
#[derive(Debug)]
pub struct CallSpan {
    cx: Option<Context>,
    /// Without a tracer: the incoming context, handed on unchanged.
    incoming: BTreeMap<String, String>,
}

impl CallSpan {
    /// A span that records nothing and hands no context on.
    pub fn none() -> CallSpan {
        CallSpan {
            cx: None,
            incoming: BTreeMap::new(),
        }
    }

    /// The trace context for the next hop: this span as its parent (or, with tracing off, the
    /// incoming context unchanged).
    pub fn context(&self) -> BTreeMap<String, String> {
        match &self.cx {
            Some(cx) => {
                let mut out = BTreeMap::new();
                TraceContextPropagator::new().inject_context(cx, &mut MapMut(&mut out));
                out
            }
            None => self.incoming.clone(),
        }
    }

    /// Adds an attribute.
    pub fn set(&self, kv: KeyValue) {
        if let Some(cx) = &self.cx {
            cx.span().set_attribute(kv);
        }
    }

    /// Ends the span with a gRPC status code (`0` OK; anything else an error with `message`).
    pub fn end(mut self, grpc_code: i32, message: &str) {
        if let Some(cx) = self.cx.take() {
            let span = cx.span();
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", i64::from(grpc_code)));
            span.set_status(if grpc_code == 0 {
                Status::Ok
            } else {
                Status::error(message.to_owned())
            });
            span.end();
        }
    }
}

impl Drop for CallSpan {
    fn drop(&mut self) {
        if let Some(cx) = self.cx.take() {
            cx.span().end();
        }
    }
}

struct Map<'a>(&'a BTreeMap<String, String>);

impl Extractor for Map<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

struct MapMut<'a>(&'a mut BTreeMap<String, String>);

impl Injector for MapMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

/// Hands finished spans to the export task; never blocks.
#[derive(Debug)]
struct ChannelProcessor {
    tx: Mutex<Option<mpsc::Sender<SpanData>>>,
}

impl SpanProcessor for ChannelProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = tx.as_ref()
            && tx.try_send(span).is_err()
        {
            metrics::counter!("tether_telemetry_spans_dropped_total").increment(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        // Closing the channel lets the export task send what is queued and end.
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        Ok(())
    }
}

async fn export_loop(
    mut exporter: opentelemetry_otlp::SpanExporter,
    resource: Resource,
    mut rx: mpsc::Receiver<SpanData>,
    endpoint: String,
) {
    exporter.set_resource(&resource);
    let mut failing = false;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        match exporter.export(batch).await {
            Ok(()) => {
                metrics::counter!("tether_telemetry_spans_exported_total").increment(n);
                if failing {
                    tracing::info!(%endpoint, "exporting spans again");
                    failing = false;
                }
            }
            Err(e) => {
                metrics::counter!("tether_telemetry_export_failures_total").increment(1);
                if !failing {
                    tracing::warn!(%endpoint, error = %e,
                        "could not export spans to the OTLP collector (telemetry.otlp_endpoint); spans are dropped until it answers");
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_hands_the_incoming_context_on_unchanged() {
        let incoming: BTreeMap<String, String> = [(
            "traceparent".to_owned(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
        )]
        .into();
        let span = Telemetry::disabled().span("x".into(), SpanKind::Server, &incoming, vec![]);
        assert_eq!(span.context(), incoming);
        span.end(0, "");
    }

    #[test]
    fn config_checks_name_the_key() {
        let bad = |e: &str| TelemetryConfig {
            otlp_endpoint: Some(e.into()),
            ..Default::default()
        };
        assert!(TelemetryConfig::default().check().is_ok());
        assert!(bad("http://127.0.0.1:4317").check().is_ok());
        assert_eq!(
            bad("https://c:4317").check().unwrap_err().0,
            "otlp_endpoint"
        );
        assert_eq!(
            bad("127.0.0.1:4317").check().unwrap_err().0,
            "otlp_endpoint"
        );
        let ratio = TelemetryConfig {
            sample_ratio: 1.5,
            ..Default::default()
        };
        assert_eq!(ratio.check().unwrap_err().0, "sample_ratio");
    }
}
