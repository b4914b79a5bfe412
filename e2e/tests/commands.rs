//! Durable commands: the real gateway and real agents (in-process, and as processes for the kill
//! tests) over real QUIC. Bad input, results and progress, ordering for an offline agent,
//! idempotency under concurrency, cancel and expiry, and `kill -9` of the agent and the gateway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_api::v1::{
    CancelCommandRequest, Command, CommandState, ListCommandsRequest, WatchCommandsRequest,
    watch_commands_request,
};
use tether_e2e::*;
use tokio_stream::StreamExt;
use tonic::Code;

const T: Duration = Duration::from_secs(30);
const AGENT: &str = "acme/eu-1";

struct Scene {
    _pki: Pki,
    gw: TestGateway,
    cfg: tether_agent::AgentConfig,
    agent: Option<TestAgent>,
    client: CommandsClient,
}

async fn scene_with(handlers: Arc<Handlers>) -> Scene {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let cfg = agent_config(&pki.agent(AGENT), gw.handle.tunnel_addr);
    let agent = TestAgent::start_with_handlers(&cfg, handlers);
    wait_until("agent connected", T, || gw.sessions_of(AGENT) == 1).await;
    let client = gw.commands(&pki).await;
    Scene {
        _pki: pki,
        gw,
        cfg,
        agent: Some(agent),
        client,
    }
}

async fn scene() -> Scene {
    scene_with(test_handlers()).await
}

async fn submit(client: &mut CommandsClient, req: tether_api::v1::SubmitCommandRequest) -> String {
    client.submit(req).await.expect("submit").into_inner().id
}

/// A handler that records every payload it runs, in order, then succeeds.
fn recording(handlers: &Handlers, kind: &str) -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    handlers.register(kind, move |payload: bytes::Bytes, _p: ProgressSink| {
        s.lock()
            .unwrap()
            .push(String::from_utf8_lossy(&payload).into_owned());
        async move { Ok(payload) }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_refuses_bad_input_with_the_right_status() {
    let mut s = scene().await;
    let c = &mut s.client;

    let e = c
        .submit(submit_req("acme/nobody", "echo", "x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("acme/nobody"), "{e:?}");

    let e = c
        .submit(submit_req("not-an-agent-id", "echo", "x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    let e = c.submit(submit_req(AGENT, "", "x")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("kind"), "{e:?}");

    let e = c
        .submit(submit_req(AGENT, "echo", vec![0u8; (4 << 20) + 1]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("4194304") && e.message().contains("commands.max_payload"),
        "{e:?}"
    );

    let mut r = submit_req(AGENT, "echo", "x");
    r.ttl = Some(prost_types::Duration {
        seconds: -1,
        nanos: 0,
    });
    let e = c.submit(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Names and keys are stored and listed with the command: bounded too.
    for field in ["kind", "idempotency_key", "ordering_key", "content_type"] {
        let mut r = submit_req(AGENT, "echo", "x");
        let long = "k".repeat(1025);
        match field {
            "kind" => r.kind = long,
            "idempotency_key" => r.idempotency_key = long,
            "ordering_key" => r.ordering_key = long,
            _ => r.content_type = long,
        }
        let e = c.submit(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{e:?}");
    }

    // A payload exactly at the limit is accepted; echoed, it is an output above
    // commands.max_output (1 MiB by default), which the agent reports as a failure.
    let id = submit(c, submit_req(AGENT, "echo", vec![7u8; 4 << 20])).await;
    let done = wait_final(c, &id, T).await;
    assert_eq!(done.state(), CommandState::Failed);
    let r = done.result.unwrap();
    assert!(
        r.output.is_empty() && r.message.contains("commands.max_output"),
        "{}",
        r.message
    );
    // An output exactly at that limit comes back whole.
    let id = submit(c, submit_req(AGENT, "echo", vec![7u8; 1 << 20])).await;
    let done = wait_final(c, &id, T).await;
    assert_eq!(done.state(), CommandState::Succeeded);
    assert_eq!(done.result.unwrap().output, vec![7u8; 1 << 20]);

    let e = c
        .get(tether_api::v1::GetCommandRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_kind_fails_and_the_agent_keeps_running() {
    let mut s = scene().await;
    let id = submit(&mut s.client, submit_req(AGENT, "launch-rockets", "now")).await;
    let done = wait_final(&mut s.client, &id, T).await;
    assert_eq!(done.state(), CommandState::Failed);
    assert_eq!(
        done.result.unwrap().message,
        "unsupported kind launch-rockets"
    );
    assert_eq!(done.attempts, 1);

    let id = submit(&mut s.client, submit_req(AGENT, "echo", "still here")).await;
    let done = wait_final(&mut s.client, &id, T).await;
    assert_eq!(done.state(), CommandState::Succeeded);
    assert_eq!(done.result.unwrap().output, b"still here");
    assert_eq!(s.gw.sessions_of(AGENT), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_fails_the_command_and_the_agent_keeps_running() {
    let mut s = scene().await;
    let id = submit(&mut s.client, submit_req(AGENT, "panic", "boom")).await;
    let done = wait_final(&mut s.client, &id, T).await;
    assert_eq!(done.state(), CommandState::Failed);
    assert_eq!(done.result.unwrap().message, "handler panicked: boom");

    let id = submit(&mut s.client, submit_req(AGENT, "echo", "after the panic")).await;
    assert_eq!(
        wait_final(&mut s.client, &id, T).await.state(),
        CommandState::Succeeded
    );
    assert_eq!(s.gw.sessions_of(AGENT), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_shows_each_transition_and_progress_then_succeeded() {
    let mut s = scene().await;
    let id = submit(&mut s.client, submit_req(AGENT, "sleep", r#"{"ms": 500}"#)).await;
    let mut events = s
        .client
        .watch(WatchCommandsRequest {
            target: Some(watch_commands_request::Target::Id(id.clone())),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen: Vec<Command> = Vec::new();
    let mut initial = None;
    while let Some(ev) = tokio::time::timeout(T, events.next())
        .await
        .expect("watch event in time")
    {
        let ev = ev.expect("event");
        initial.get_or_insert(ev.initial);
        seen.push(ev.command.unwrap());
    }
    assert_eq!(initial, Some(true));
    let last = seen.last().unwrap();
    assert_eq!(last.state(), CommandState::Succeeded);
    assert_eq!(last.result.as_ref().unwrap().output, b"slept 500 ms");
    assert!(
        last.created.is_some()
            && last.delivered.is_some()
            && last.started.is_some()
            && last.finished.is_some()
    );
    // Progress arrived while running, before the end.
    let running_with_progress = seen
        .iter()
        .filter(|c| c.state() == CommandState::Running && !c.progress.is_empty())
        .count();
    assert!(
        running_with_progress >= 3,
        "progress events: {running_with_progress}"
    );
    assert_eq!(last.progress.last().unwrap(), "slept 500 of 500 ms");
    assert!(
        metric(
            "tether_gateway_command_submit_to_completed_seconds_count",
            &[]
        ) >= 1.0
    );
    // States only move forward.
    let order = |c: &Command| c.state() as i32;
    assert!(
        seen.windows(2).all(|w| order(&w[0]) <= order(&w[1])),
        "{:?}",
        seen.iter().map(|c| c.state()).collect::<Vec<_>>()
    );
}

/// A handler that reports its lines faster than they can be sent and returns at once: every
/// line still reaches the record, before the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reported_just_before_the_end_is_kept() {
    let handlers = test_handlers();
    handlers.register("chatty", |_: bytes::Bytes, p: ProgressSink| async move {
        for i in 1..=15 {
            p.report(format!("line {i}"));
        }
        Ok(bytes::Bytes::from_static(b"done"))
    });
    let mut s = scene_with(handlers).await;
    for _ in 0..5 {
        let id = submit(&mut s.client, submit_req(AGENT, "chatty", "")).await;
        let c = wait_final(&mut s.client, &id, T).await;
        assert_eq!(c.state(), CommandState::Succeeded);
        let want: Vec<String> = (1..=15).map(|i| format!("line {i}")).collect();
        assert_eq!(c.progress, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_agent_gets_100_queued_commands_in_order_on_connect() {
    let handlers = test_handlers();
    let seen = recording(&handlers, "record");
    let mut s = scene_with(handlers.clone()).await;
    s.agent.take().unwrap().stop().await;
    wait_until("agent gone", T, || s.gw.sessions_of(AGENT) == 0).await;

    let mut ids = Vec::new();
    for i in 0..100 {
        ids.push(submit(&mut s.client, submit_req(AGENT, "record", i.to_string())).await);
    }
    let queued = s
        .client
        .list(ListCommandsRequest {
            agent: AGENT.into(),
            state: CommandState::Queued as i32,
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(queued.commands.len(), 100);
    assert!(seen.lock().unwrap().is_empty());
    assert_eq!(
        metric("tether_gateway_commands", &[("state", "queued")]),
        100.0
    );

    let _agent = TestAgent::start_with_handlers(&s.cfg, handlers);
    for id in &ids {
        assert_eq!(
            wait_final(&mut s.client, id, T).await.state(),
            CommandState::Succeeded
        );
    }
    let want: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    assert_eq!(*seen.lock().unwrap(), want);
    assert_eq!(
        metric("tether_gateway_commands", &[("state", "queued")]),
        0.0
    );
    assert!(
        metric(
            "tether_gateway_command_submit_to_delivered_seconds_count",
            &[]
        ) >= 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parallel_submits_with_one_key_make_one_command() {
    let handlers = test_handlers();
    let seen = recording(&handlers, "record");
    let s = scene_with(handlers).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut c = s.client.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = submit_req(AGENT, "record", "once");
            r.idempotency_key = "deploy-42".into();
            c.submit(r).await.expect("submit").into_inner()
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    let mut created = 0;
    for t in tasks {
        let r = t.await.unwrap();
        created += usize::from(r.created);
        ids.insert(r.id);
    }
    assert_eq!((ids.len(), created), (1, 1), "{ids:?}");
    let mut c = s.client.clone();
    let id = ids.into_iter().next().unwrap();
    assert_eq!(
        wait_final(&mut c, &id, T).await.state(),
        CommandState::Succeeded
    );
    let all = c
        .list(ListCommandsRequest {
            agent: AGENT.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.commands.len(), 1);
    assert_eq!(*seen.lock().unwrap(), vec!["once".to_string()]);

    // Same key again after completion: still the same command, nothing runs.
    let mut r = submit_req(AGENT, "record", "once");
    r.idempotency_key = "deploy-42".into();
    let again = c.submit(r).await.unwrap().into_inner();
    assert_eq!((again.id.as_str(), again.created), (id.as_str(), false));
    // Another agent's key space is separate; an unknown agent is still refused.
    let mut r = submit_req("acme/other", "record", "once");
    r.idempotency_key = "deploy-42".into();
    assert_eq!(c.submit(r).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_works_only_before_delivery_and_ttl_expires_undelivered_commands() {
    let mut s = scene().await;
    // Delivered: too late.
    let id = submit(&mut s.client, submit_req(AGENT, "sleep", "300")).await;
    wait_final(&mut s.client, &id, T).await;
    let e = s
        .client
        .cancel(CancelCommandRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("already"), "{e:?}");

    s.agent.take().unwrap().stop().await;
    wait_until("agent gone", T, || s.gw.sessions_of(AGENT) == 0).await;

    let id = submit(&mut s.client, submit_req(AGENT, "echo", "never")).await;
    let c = s
        .client
        .cancel(CancelCommandRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.state(), CommandState::Cancelled);

    let mut r = submit_req(AGENT, "echo", "too late");
    r.ttl = Some(prost_types::Duration {
        seconds: 0,
        nanos: 300_000_000,
    });
    let expiring = submit(&mut s.client, r).await;
    let started = Instant::now();
    let c = wait_final(&mut s.client, &expiring, T).await;
    assert_eq!(c.state(), CommandState::Expired);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(metric("tether_gateway_command_expirations_total", &[]), 1.0);

    // Reconnecting delivers neither.
    let handlers = test_handlers();
    let seen = recording(&handlers, "echo");
    let _agent = TestAgent::start_with_handlers(&s.cfg, handlers);
    wait_until("agent back", T, || s.gw.sessions_of(AGENT) == 1).await;
    let id2 = submit(&mut s.client, submit_req(AGENT, "echo", "marker")).await;
    wait_final(&mut s.client, &id2, T).await;
    assert_eq!(*seen.lock().unwrap(), vec!["marker".to_string()]);
    assert_eq!(
        s.client
            .get(tether_api::v1::GetCommandRequest { id })
            .await
            .unwrap()
            .into_inner()
            .state(),
        CommandState::Cancelled
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_by_state_and_kind_and_paginates() {
    let mut s = scene().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(submit(&mut s.client, submit_req(AGENT, "echo", format!("{i}"))).await);
    }
    let failed = submit(&mut s.client, submit_req(AGENT, "nope", "x")).await;
    for id in ids.iter().chain([&failed]) {
        wait_final(&mut s.client, id, T).await;
    }
    let mut got = Vec::new();
    let mut token = String::new();
    loop {
        let page = s
            .client
            .list(ListCommandsRequest {
                agent: AGENT.into(),
                kind: "echo".into(),
                page_size: 3,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.commands.len() <= 3);
        got.extend(page.commands.into_iter().map(|c| c.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(got, ids);
    let f = s
        .client
        .list(ListCommandsRequest {
            state: CommandState::Failed as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        f.commands.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        vec![failed]
    );
    // Time range: created at or after `from`, before `to`.
    let future =
        prost_types::Timestamp::from(std::time::SystemTime::now() + Duration::from_secs(60));
    let past = prost_types::Timestamp::from(std::time::SystemTime::now() - Duration::from_secs(60));
    let none = s
        .client
        .list(ListCommandsRequest {
            from: Some(future),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.commands.is_empty());
    let all = s
        .client
        .list(ListCommandsRequest {
            from: Some(past),
            to: Some(future),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.commands.len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_mid_handler_gets_the_command_redelivered_and_it_completes() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let state = tempfile::tempdir().unwrap();
    let mut cfg = agent_config(&pki.agent(AGENT), gw.handle.tunnel_addr);
    cfg.state_dir = Some(state.path().to_owned());
    let agent = AgentProcess::spawn(&cfg);
    wait_until("agent connected", T, || gw.sessions_of(AGENT) == 1).await;
    let mut client = gw.commands(&pki).await;

    let id = submit(&mut client, submit_req(AGENT, "sleep", "3000")).await;
    let deadline = Instant::now() + T;
    loop {
        let c = client
            .get(tether_api::v1::GetCommandRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        if c.state() == CommandState::Running && !c.progress.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "never running: {c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.signal(nix::sys::signal::Signal::SIGKILL);
    wait_until("dead agent's session gone", T, || {
        gw.sessions_of(AGENT) == 0
    })
    .await;

    let _again = AgentProcess::spawn(&cfg);
    let done = wait_final(&mut client, &id, T).await;
    assert_eq!(done.state(), CommandState::Succeeded, "{done:?}");
    assert_eq!(done.result.unwrap().output, b"slept 3000 ms");
    assert!(done.attempts >= 2, "attempts {}", done.attempts);
    assert!(metric("tether_gateway_command_redeliveries_total", &[]) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_gateway_with_1000_commands_in_flight_loses_none_and_runs_each_at_most_once() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let gw = GatewayProcess::spawn_with(&pki, data.path(), "127.0.0.1:0".parse().unwrap()).await;
    let tunnel = gw.tunnel;

    // In-process agent whose handler counts executions per payload.
    let runs: Arc<Mutex<HashMap<String, u32>>> = Default::default();
    let handlers = test_handlers();
    let r = runs.clone();
    handlers.register("count", move |payload: bytes::Bytes, _p: ProgressSink| {
        let r = r.clone();
        async move {
            *r.lock()
                .unwrap()
                .entry(String::from_utf8_lossy(&payload).into_owned())
                .or_default() += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(payload)
        }
    });
    let state = tempfile::tempdir().unwrap();
    let mut cfg = agent_config(&pki.agent(AGENT), tunnel);
    cfg.state_dir = Some(state.path().to_owned());
    let _agent = TestAgent::start_with_handlers(&cfg, handlers);
    let files = pki.client("api");
    let client = commands_client(gw.channel(&files).await);
    // The agent must be known before Submit accepts commands for it.
    tether_e2e::wait_connected(gw.channel(&files).await, AGENT, T).await;

    // 1,000 commands from 50 tasks over 16 ordering keys, all acknowledged.
    let accepted: Arc<Mutex<Vec<(String, String)>>> = Default::default();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (mut c, accepted, next) = (client.clone(), accepted.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= 1000 {
                    return;
                }
                let mut r = submit_req(AGENT, "count", i.to_string());
                r.ordering_key = format!("k{}", i % 16);
                let id = c.submit(r).await.expect("submit").into_inner().id;
                accepted.lock().unwrap().push((id, i.to_string()));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(accepted.lock().unwrap().len(), 1000);
    // More Submits keep arriving while the gateway dies: the acknowledged ones are promised too.
    let late = {
        let (mut c, accepted) = (client.clone(), accepted.clone());
        tokio::spawn(async move {
            for i in 1000.. {
                let mut r = submit_req(AGENT, "count", i.to_string());
                r.ordering_key = format!("k{}", i % 16);
                match c.submit(r).await {
                    Ok(resp) => accepted
                        .lock()
                        .unwrap()
                        .push((resp.into_inner().id, i.to_string())),
                    // The gateway died under this call: not acknowledged, so not promised.
                    Err(_) => return,
                }
            }
        })
    };
    wait_until("some commands ran", T, || runs.lock().unwrap().len() >= 100).await;
    let mut gw = gw;
    gw.child.start_kill().unwrap(); // SIGKILL
    gw.child.wait().await.unwrap();
    let ran_at_kill = runs.lock().unwrap().len();
    late.await.unwrap();
    let accepted = accepted.lock().unwrap().clone();
    assert!(
        ran_at_kill < 900,
        "killed too late: {ran_at_kill} of 1000 already ran"
    );

    let gw2 = GatewayProcess::spawn_with(&pki, data.path(), tunnel).await;
    let mut client = commands_client(gw2.channel(&files).await);
    for (id, payload) in &accepted {
        let c = wait_final(&mut client, id, Duration::from_secs(60)).await;
        assert_eq!(c.state(), CommandState::Succeeded, "{c:?}");
        assert_eq!(c.result.unwrap().output, payload.as_bytes());
    }
    let runs = runs.lock().unwrap();
    for (_, payload) in &accepted {
        assert_eq!(
            runs.get(payload),
            Some(&1),
            "payload {payload} ran {:?} times",
            runs.get(payload)
        );
    }
    assert!(runs.values().all(|n| *n == 1), "some command ran twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tetherctl_submits_watches_progress_live_and_lists() {
    let s = scene().await;
    let files = s._pki.client("api");
    let ctl = |args: &[&str]| {
        let mut c = tokio::process::Command::from(s.gw.tetherctl(&files));
        c.arg("commands").args(args).kill_on_drop(true);
        c
    };
    let out = tokio::time::timeout(
        T,
        ctl(&["submit", AGENT, "sleep", "400", "--watch"]).output(),
    )
    .await
    .unwrap()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    let id = lines[0].trim().to_owned();
    let pos = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{text}"))
    };
    assert!(
        pos("progress  slept 40 of 400 ms") < pos("SUCCEEDED"),
        "{text}"
    );
    assert!(
        pos("progress  slept 400 of 400 ms") < pos("SUCCEEDED"),
        "{text}"
    );
    assert!(
        lines.last().unwrap().contains("SUCCEEDED")
            && lines.last().unwrap().contains("slept 400 ms"),
        "{text}"
    );

    let out = ctl(&["get", &id, "-o", "json"]).output().await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["state"], "succeeded");
    assert_eq!(v["output"], "slept 400 ms");

    let out = ctl(&["list", "--agent", AGENT, "--state", "succeeded"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().nth(1).is_some_and(|l| l.starts_with(&id)),
        "{text}"
    );

    let out = ctl(&["cancel", &id]).output().await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("FailedPrecondition"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_ordering_keys_run_in_parallel_up_to_max_in_flight() {
    let pki = Pki::new();
    let mut cfg = TestGateway::config(&pki);
    cfg.commands.max_in_flight = 3;
    let gw = TestGateway::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let (now, peak) = (
        Arc::new(std::sync::atomic::AtomicU32::new(0)),
        Arc::new(std::sync::atomic::AtomicU32::new(0)),
    );
    let handlers = test_handlers();
    let (n, p) = (now.clone(), peak.clone());
    handlers.register("busy", move |payload: bytes::Bytes, _s: ProgressSink| {
        let (n, p) = (n.clone(), p.clone());
        async move {
            let cur = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            p.fetch_max(cur, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            n.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            Ok(payload)
        }
    });
    let _agent = TestAgent::start_with_handlers(
        &agent_config(&pki.agent(AGENT), gw.handle.tunnel_addr),
        handlers,
    );
    wait_until("agent connected", T, || gw.sessions_of(AGENT) == 1).await;
    let mut client = gw.commands(&pki).await;
    let mut ids = Vec::new();
    for i in 0..9 {
        let mut r = submit_req(AGENT, "busy", "x");
        r.ordering_key = format!("k{i}");
        ids.push(submit(&mut client, r).await);
    }
    for id in &ids {
        assert_eq!(
            wait_final(&mut client, id, T).await.state(),
            CommandState::Succeeded
        );
    }
    assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_commands_survive_a_gateway_kill_and_arrive_in_order_when_the_agent_connects() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let gw = GatewayProcess::spawn_with(&pki, data.path(), "127.0.0.1:0".parse().unwrap()).await;
    let tunnel = gw.tunnel;
    let handlers = test_handlers();
    let seen = recording(&handlers, "record");
    let cfg = agent_config(&pki.agent(AGENT), tunnel);
    let files = pki.client("api");
    // Known to the gateway: connected once, then gone.
    let agent = TestAgent::start_with_handlers(&cfg, handlers.clone());
    tether_e2e::wait_connected(gw.channel(&files).await, AGENT, T).await;
    agent.stop().await;
    let mut client = commands_client(gw.channel(&files).await);
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(submit(&mut client, submit_req(AGENT, "record", i.to_string())).await);
    }
    let mut gw = gw;
    gw.child.start_kill().unwrap();
    gw.child.wait().await.unwrap();

    let gw2 = GatewayProcess::spawn_with(&pki, data.path(), tunnel).await;
    let mut client = commands_client(gw2.channel(&files).await);
    // The new process has never seen the agent connect; its stored commands make it known.
    ids.push(submit(&mut client, submit_req(AGENT, "record", "3")).await);
    for id in &ids {
        let c = client
            .get(tether_api::v1::GetCommandRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(c.state(), CommandState::Queued);
    }
    let _agent = TestAgent::start_with_handlers(&cfg, handlers);
    for id in &ids {
        assert_eq!(
            wait_final(&mut client, id, T).await.state(),
            CommandState::Succeeded
        );
    }
    assert_eq!(*seen.lock().unwrap(), vec!["0", "1", "2", "3"]);
}
