//! OpenTelemetry traces across the tunnel: the gateway and the agent, each exporting to a real
//! OTLP/gRPC collector, continue the caller's W3C trace context. The trace id is kept end to
//! end and the parent chain is caller → gateway → agent → upstream, for a relayed gRPC call and
//! for a `Streams/Open` TCP stream; a call the caller did not sample is not exported but still
//! carries its context on. A command keeps its Submit call's context, and the agent's span for
//! running it links to that span.

use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use tether_agent::config::ServiceKind;
use tether_api::demo::v1::EchoRequest;
use tether_api::demo::v1::echo_client::EchoClient;
use tether_api::v1::StreamChunk;
use tether_api::v1::streams_client::StreamsClient;
use tether_e2e::*;
use tonic::Code;

const T: Duration = Duration::from_secs(20);
const CALLER_SPAN: &str = "b7ad6b7169203331";

fn traceparent(trace: &str, sampled: bool) -> String {
    format!(
        "00-{trace}-{CALLER_SPAN}-{}",
        if sampled { "01" } else { "00" }
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(s: &CollectedSpan, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    s.span
        .attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Value::StringValue(s)) => Some(s.clone()),
            Some(Value::IntValue(i)) => Some(i.to_string()),
            _ => None,
        })
}

struct Scene {
    pki: Pki,
    gw: TestGateway,
    agent: TestAgent,
    collector: OtlpCollector,
    seen: Seen,
}

async fn scene() -> Scene {
    let collector = OtlpCollector::start().await;
    let pki = Pki::new();
    let mut cfg = TestGateway::config(&pki);
    cfg.telemetry.otlp_endpoint = Some(collector.endpoint.clone());
    let gw = TestGateway::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let (addr, seen) = header_recorder().await;
    let echo = tcp_echo_server().await;
    let mut acfg = agent_config(&pki.agent("acme/a1"), gw.handle.tunnel_addr);
    with_service(
        &mut acfg,
        "default",
        &format!("http://{addr}"),
        ServiceKind::Grpc,
    );
    with_service(&mut acfg, "echo", &echo.to_string(), ServiceKind::Tcp);
    acfg.telemetry.otlp_endpoint = Some(collector.endpoint.clone());
    let agent = TestAgent::start(&acfg);
    wait_until("the agent's session", T, || gw.sessions_of("acme/a1") == 1).await;
    Scene {
        pki,
        gw,
        agent,
        collector,
        seen,
    }
}

/// The gateway's and the agent's spans of trace `trace`, once both arrived.
async fn spans_of(c: &OtlpCollector, trace: &str) -> (CollectedSpan, CollectedSpan) {
    let find = || {
        let all: Vec<_> = c
            .spans()
            .into_iter()
            .filter(|s| hex(&s.span.trace_id) == trace)
            .collect();
        let gw = all.iter().find(|s| s.service == "tether-gateway").cloned();
        let agent = all.iter().find(|s| s.service == "tether-agent").cloned();
        gw.zip(agent)
    };
    wait_until(
        "the gateway's and the agent's spans at the collector",
        T,
        || find().is_some(),
    )
    .await;
    find().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_call_is_one_trace_from_caller_through_gateway_and_agent_to_upstream() {
    let s = scene().await;
    let mut echo = EchoClient::new(s.gw.channel(&s.pki.client("ops")).await.unwrap());
    let call = |trace: &'static str, sampled: bool| {
        let mut req = tonic::Request::new(EchoRequest::default());
        req.metadata_mut()
            .insert("tether-agent", "acme/a1".parse().unwrap());
        req.metadata_mut()
            .insert("traceparent", traceparent(trace, sampled).parse().unwrap());
        req
    };
    // Not sampled by the caller first: carried on, never exported.
    let unsampled = "11111111111111111111111111111111";
    let e = echo.unary(call(unsampled, false)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    let sampled = "0af7651916cd43dd8448eb211c80319c";
    let e = echo.unary(call(sampled, true)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");

    let (gw, agent) = spans_of(&s.collector, sampled).await;
    // caller → gateway: a server span whose parent is the caller's span.
    assert_eq!(hex(&gw.span.parent_span_id), CALLER_SPAN);
    assert_eq!(gw.span.kind, SpanKind::Server as i32);
    assert_eq!(gw.span.name, "relay /tether.demo.v1.Echo/Unary");
    assert_eq!(attr(&gw, "tether.agent").as_deref(), Some("acme/a1"));
    assert_eq!(attr(&gw, "tether.tenant").as_deref(), Some("acme"));
    assert_eq!(attr(&gw, "rpc.grpc.status_code").as_deref(), Some("12"));
    let status = gw.span.status.as_ref().expect("a status");
    assert_eq!(status.code, StatusCode::Error as i32);
    // gateway → agent.
    assert_eq!(agent.span.parent_span_id, gw.span.span_id);
    assert_eq!(agent.span.kind, SpanKind::Client as i32);
    assert_eq!(attr(&agent, "tether.service").as_deref(), Some("default"));
    // agent → upstream: the upstream's traceparent has the agent's span as its parent.
    let headers = s.seen.lock().unwrap().clone();
    assert_eq!(headers.len(), 2, "{headers:?}");
    let upstream = headers[1]
        .get("traceparent")
        .expect("the upstream got a traceparent");
    assert_eq!(
        upstream,
        &format!("00-{sampled}-{}-01", hex(&agent.span.span_id)),
        "upstream traceparent"
    );
    // The unsampled call kept its trace id to the upstream, with a new parent and the flag
    // off, and nothing of it was exported (the sampled call, later, has arrived from both).
    let first = headers[0]
        .get("traceparent")
        .expect("traceparent carried on");
    assert!(
        first.starts_with(&format!("00-{unsampled}-")) && first.ends_with("-00"),
        "{first}"
    );
    assert!(!first.contains(CALLER_SPAN), "{first}");
    assert!(
        s.collector
            .spans()
            .iter()
            .all(|x| hex(&x.span.trace_id) != unsampled),
        "an unsampled call was exported"
    );
    s.agent.stop().await;
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_stream_carries_the_trace_context_in_its_stream_header() {
    let s = scene().await;
    let mut streams = StreamsClient::new(s.gw.channel(&s.pki.client("ops")).await.unwrap());
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(StreamChunk {
        data: bytes::Bytes::from_static(b"ping"),
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("tether-agent", "acme/a1".parse().unwrap());
    req.metadata_mut()
        .insert("tether-service", "echo".parse().unwrap());
    req.metadata_mut()
        .insert("traceparent", traceparent(trace, true).parse().unwrap());
    let mut back = streams.open(req).await.expect("open").into_inner();
    let chunk = back.message().await.expect("read").expect("a chunk");
    assert_eq!(&chunk.data[..], b"ping");
    drop(tx);
    let (gw, agent) = spans_of(&s.collector, trace).await;
    assert_eq!(hex(&gw.span.parent_span_id), CALLER_SPAN);
    assert_eq!(gw.span.name, "relay tether.v1.Streams/Open");
    assert_eq!(agent.span.parent_span_id, gw.span.span_id);
    assert_eq!(agent.span.name, "connect echo");
    assert_eq!(
        agent.span.status.as_ref().map(|x| x.code),
        Some(StatusCode::Ok as i32)
    );
    s.agent.stop().await;
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commands_execution_span_on_the_agent_links_to_its_submit() {
    let s = scene().await;
    let mut commands = commands_client(s.gw.channel(&s.pki.client("ops")).await.unwrap());
    let submit_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = tonic::Request::new(submit_req("acme/a1", "echo", "traced"));
    req.metadata_mut().insert(
        "traceparent",
        traceparent(submit_trace, true).parse().unwrap(),
    );
    let id = commands.submit(req).await.expect("submit").into_inner().id;
    let done = wait_final(&mut commands, &id, T).await;
    assert_eq!(
        done.state(),
        tether_api::v1::CommandState::Succeeded,
        "{done:?}"
    );
    // The command keeps the context it was submitted under (both stores keep the record).
    assert_eq!(
        done.trace_context.get("traceparent").map(String::as_str),
        Some(traceparent(submit_trace, true).as_str())
    );

    // The agent's span for running it: a trace of its own, linked to the submit.
    let find = || {
        s.collector.spans().into_iter().find(|x| {
            x.service == "tether-agent" && attr(x, "tether.command.id").as_deref() == Some(&id)
        })
    };
    wait_until("the agent's command span at the collector", T, || {
        find().is_some()
    })
    .await;
    let span = find().unwrap();
    assert_eq!(span.span.name, "command echo");
    assert_eq!(span.span.kind, SpanKind::Consumer as i32);
    assert_eq!(attr(&span, "tether.command.kind").as_deref(), Some("echo"));
    assert_ne!(hex(&span.span.trace_id), submit_trace, "a trace of its own");
    assert!(span.span.parent_span_id.is_empty(), "a root span");
    assert_eq!(span.span.links.len(), 1, "{:?}", span.span.links);
    let link = &span.span.links[0];
    assert_eq!(hex(&link.trace_id), submit_trace);
    assert_eq!(hex(&link.span_id), CALLER_SPAN);
    let status = span.span.status.as_ref().expect("a status");
    assert_eq!(status.code, StatusCode::Ok as i32);
    s.agent.stop().await;
    s.gw.stop().await;
}
