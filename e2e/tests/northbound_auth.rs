//! The northbound API only serves control-plane identities of our trust domain, and with an
//! `[auth]` policy each caller only the tenants it is given: every method and the relay deny
//! the others with PERMISSION_DENIED (a command named by id: NOT_FOUND, as for an unused id),
//! audited.

use std::time::Duration;

use tether_agent::config::ServiceKind;
use tether_api::demo::v1::echo_client::EchoClient;
use tether_api::v1::agents_client::AgentsClient;
use tether_api::v1::enrollment_client::EnrollmentClient;
use tether_api::v1::streams_client::StreamsClient;
use tether_api::v1::watch_commands_request::Target;
use tether_api::v1::{
    CancelCommandRequest, CreateTokenRequest, GetAgentRequest, GetCommandRequest,
    ListAgentsRequest, ListCommandsRequest, RevokeAgentRequest, StreamChunk, WatchAgentsRequest,
    WatchCommandsRequest,
};
use tether_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_identity_cannot_call_the_northbound_api() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let ch = gw
        .channel(&pki.agent("acme/sneaky"))
        .await
        .expect("TLS itself succeeds");
    let e = AgentsClient::new(ch)
        .list(ListAgentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("agent identity"), "{}", e.message());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_from_another_ca_cannot_connect() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let other = Pki::with_trust_domain("other.local");
    let mut files = other.client("api");
    files.ca = pki.dir.path().join("ca.pem");
    let result = async {
        let ch = gw.channel(&files).await?;
        AgentsClient::new(ch)
            .list(ListAgentsRequest::default())
            .await
            .map_err(|e| e.to_string())
    };
    let r = tokio::time::timeout(Duration::from_secs(10), result)
        .await
        .expect("no hang");
    assert!(r.is_err(), "a foreign CA's certificate must not be served");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_caller_is_served() {
    let pki = Pki::new();
    let gw = TestGateway::start(&pki).await;
    let mut api = gw.client(&pki, "api").await;
    let r = api
        .list(ListAgentsRequest::default())
        .await
        .expect("served");
    assert!(r.into_inner().agents.is_empty());
    gw.stop().await;
}

// === Tenant scoping (mTLS callers) ===

const T: Duration = Duration::from_secs(20);

/// A gateway with `[auth]`: `billing` acts for `acme`, `ops` for every tenant; agents
/// `acme/a1` and `globex/g1` connected, each with the demo gRPC upstream as its default service
/// and a TCP echo service `tcp`.
struct Scoped {
    pki: Pki,
    gw: TestGateway,
    agents: Vec<TestAgent>,
    _upstream: DemoUpstream,
}

async fn scoped() -> Scoped {
    let pki = Pki::new();
    let mut cfg = TestGateway::config(&pki);
    cfg.auth = Some(
        toml::from_str(
            r#"
            [[callers]]
            name = "billing"
            tenants = ["acme"]
            [[callers]]
            name = "ops"
            tenants = ["*"]
            "#,
        )
        .expect("auth config"),
    );
    let gw = TestGateway::start_with(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let upstream = DemoUpstream::start().await;
    let echo = tcp_echo_server().await;
    let mut agents = Vec::new();
    for id in ["acme/a1", "globex/g1"] {
        let mut cfg = agent_config(&pki.agent(id), gw.handle.tunnel_addr);
        with_service(&mut cfg, "default", &upstream.url(), ServiceKind::Grpc);
        with_service(&mut cfg, "tcp", &echo.to_string(), ServiceKind::Tcp);
        agents.push(TestAgent::start(&cfg));
        wait_until("agent connected", T, || gw.sessions_of(id) == 1).await;
    }
    Scoped {
        pki,
        gw,
        agents,
        _upstream: upstream,
    }
}

impl Scoped {
    async fn channel(&self, caller: &str) -> tonic::transport::Channel {
        self.gw
            .channel(&self.pki.client(caller))
            .await
            .expect("northbound connect")
    }

    async fn stop(self) {
        for a in self.agents {
            a.stop().await;
        }
        self.gw.stop().await;
    }
}

fn denied<T: std::fmt::Debug>(r: Result<T, tonic::Status>, what: &str) -> String {
    let e = r.expect_err(what);
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{what}: {e:?}");
    e.message().to_owned()
}

async fn relay_unary(ch: tonic::transport::Channel, agent: &str) -> Result<String, tonic::Status> {
    let mut echo = EchoClient::with_interceptor(ch, Route::new(Some(agent), None));
    let req = tether_api::demo::v1::EchoRequest {
        message: "hi".into(),
        ..Default::default()
    };
    Ok(echo.unary(req).await?.into_inner().message)
}

async fn stream_open(ch: tonic::transport::Channel, agent: &str) -> Result<Vec<u8>, tonic::Status> {
    let mut client = StreamsClient::with_interceptor(ch, Route::new(Some(agent), Some("tcp")));
    let reqs = tokio_stream::iter([StreamChunk {
        data: b"ping".to_vec().into(),
    }]);
    let mut inbound = client.open(reqs).await?.into_inner();
    let mut got = Vec::new();
    while let Some(c) = inbound.message().await? {
        got.extend_from_slice(&c.data);
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_of_one_tenant_is_denied_every_method_on_another_and_audited() {
    let audit = AuditLog::install();
    let s = scoped().await;
    let billing = s.channel("billing").await;
    let ops = s.channel("ops").await;
    let mut agents = AgentsClient::new(billing.clone());
    let mut cmds = commands_client(billing.clone());
    let mut ops_cmds = commands_client(ops.clone());

    // A command of the other tenant, queued by an all-tenants caller.
    let theirs = ops_cmds
        .submit(submit_req("globex/g1", "echo", "theirs"))
        .await
        .expect("ops submits for globex")
        .into_inner()
        .id;
    let theirs_final = wait_final(&mut ops_cmds, &theirs, T).await;

    // --- tether.v1.Agents ---
    let list = agents
        .list(ListAgentsRequest::default())
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<_> = list.agents.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["acme/a1"], "List shows only the caller's tenants");
    denied(
        agents
            .list(ListAgentsRequest {
                tenant: "globex".into(),
                connected_only: false,
            })
            .await,
        "List of globex",
    );
    let existing = denied(
        agents
            .get(GetAgentRequest {
                agent: "globex/g1".into(),
            })
            .await,
        "Get of globex/g1",
    );
    let ghost = denied(
        agents
            .get(GetAgentRequest {
                agent: "globex/ghost".into(),
            })
            .await,
        "Get of an unknown globex agent",
    );
    assert_eq!(existing, ghost, "the denial leaks nothing about existence");
    assert!(existing.contains("\"globex\""), "{existing}");
    assert!(!existing.contains("g1"), "{existing}");
    denied(
        agents
            .watch(WatchAgentsRequest {
                tenant: "globex".into(),
                agent: String::new(),
            })
            .await,
        "Watch of globex",
    );
    denied(
        agents
            .watch(WatchAgentsRequest {
                tenant: String::new(),
                agent: "globex/g1".into(),
            })
            .await,
        "Watch of globex/g1",
    );

    denied(
        agents
            .revoke(RevokeAgentRequest {
                agent: "globex/g1".into(),
                reason: "x".into(),
            })
            .await,
        "Revoke of globex/g1",
    );
    denied(
        agents
            .revoke(RevokeAgentRequest {
                agent: "globex/ghost".into(),
                reason: "x".into(),
            })
            .await,
        "Revoke of an unknown globex agent",
    );
    assert_eq!(
        s.gw.sessions_of("globex/g1"),
        1,
        "the denied Revoke closed nothing"
    );

    // --- tether.v1.Enrollment ---
    let mut enrollment = EnrollmentClient::new(billing.clone());
    let token_req = |tenant: &str| CreateTokenRequest {
        tenant: tenant.into(),
        agent: "new".into(),
        ..Default::default()
    };
    denied(
        enrollment.create_token(token_req("globex")).await,
        "CreateToken for globex",
    );
    let e = enrollment
        .create_token(token_req("acme"))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::FailedPrecondition,
        "own tenant gets past the check (enrollment is off here): {e:?}"
    );

    // --- tether.v1.Commands ---
    denied(
        cmds.submit(submit_req("globex/g1", "echo", "x")).await,
        "Submit to globex/g1",
    );
    denied(
        cmds.submit(submit_req("globex/ghost", "echo", "x")).await,
        "Submit to an unknown globex agent",
    );
    // A command named by id: the answer of an id nobody uses (the id changed, so the message
    // is compared with the ids swapped), so ids tell nothing of other tenants.
    let last = if theirs.ends_with('0') { '1' } else { '0' };
    let unused = format!("{}{last}", &theirs[..theirs.len() - 1]);
    let hidden = |r: Result<_, tonic::Status>, missing: Result<_, tonic::Status>, what: &str| {
        let (e, m) = (r.expect_err(what), missing.expect_err(what));
        assert_eq!(e.code(), tonic::Code::NotFound, "{what}: {e:?}");
        assert_eq!(
            (e.code(), e.message().replace(&theirs, "<id>")),
            (m.code(), m.message().replace(&unused, "<id>")),
            "{what}: another tenant's id is answered like an unused one"
        );
        assert!(!e.message().contains("globex"), "{what}: {e:?}");
    };
    hidden(
        cmds.get(GetCommandRequest { id: theirs.clone() })
            .await
            .map(|_| ()),
        cmds.get(GetCommandRequest { id: unused.clone() })
            .await
            .map(|_| ()),
        "Get of a globex command",
    );
    denied(
        cmds.list(ListCommandsRequest {
            agent: "globex/g1".into(),
            ..Default::default()
        })
        .await,
        "List of globex/g1's commands",
    );
    denied(
        cmds.watch(WatchCommandsRequest {
            target: Some(Target::Agent("globex/g1".into())),
        })
        .await,
        "Watch of globex/g1's commands",
    );
    hidden(
        cmds.watch(WatchCommandsRequest {
            target: Some(Target::Id(theirs.clone())),
        })
        .await
        .map(|_| ()),
        cmds.watch(WatchCommandsRequest {
            target: Some(Target::Id(unused.clone())),
        })
        .await
        .map(|_| ()),
        "Watch of a globex command",
    );
    hidden(
        cmds.cancel(CancelCommandRequest { id: theirs.clone() })
            .await
            .map(|_| ()),
        cmds.cancel(CancelCommandRequest { id: unused.clone() })
            .await
            .map(|_| ()),
        "Cancel of a globex command",
    );
    let after = ops_cmds
        .get(GetCommandRequest { id: theirs.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        after.state, theirs_final.state,
        "the denied Cancel changed nothing"
    );

    // --- Streams and the relay ---
    denied(
        stream_open(billing.clone(), "globex/g1").await,
        "Streams/Open to globex/g1",
    );
    denied(
        relay_unary(billing.clone(), "globex/g1").await,
        "relay to globex/g1",
    );
    let relay_ghost = denied(
        relay_unary(billing.clone(), "globex/ghost").await,
        "relay to an unknown globex agent",
    );
    assert!(relay_ghost.contains("\"globex\""), "{relay_ghost}");

    // --- The same methods on the caller's own tenant work ---
    agents
        .get(GetAgentRequest {
            agent: "acme/a1".into(),
        })
        .await
        .expect("Get of acme/a1");
    let e = agents
        .get(GetAgentRequest {
            agent: "acme/ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::NotFound,
        "own tenant: NOT_FOUND as before"
    );
    let mine = cmds
        .submit(submit_req("acme/a1", "echo", "mine"))
        .await
        .expect("Submit to acme/a1")
        .into_inner()
        .id;
    let done = wait_final(&mut cmds, &mine, T).await;
    assert_eq!(done.result.unwrap().output, b"mine");
    let listed = cmds
        .list(ListCommandsRequest::default())
        .await
        .expect("List")
        .into_inner();
    let listed: Vec<_> = listed.commands.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(
        listed,
        [mine.as_str()],
        "List shows only the caller's tenants"
    );
    let mut w = cmds
        .watch(WatchCommandsRequest {
            target: Some(Target::Id(mine.clone())),
        })
        .await
        .expect("Watch of own command")
        .into_inner();
    assert!(w.message().await.unwrap().is_some());
    let e = cmds
        .cancel(CancelCommandRequest { id: mine.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let mut watch = agents
        .watch(WatchAgentsRequest::default())
        .await
        .expect("Watch")
        .into_inner();
    let first = watch.message().await.unwrap().expect("initial event");
    assert_eq!(first.agent, "acme/a1");
    assert_eq!(
        stream_open(billing.clone(), "acme/a1").await.unwrap(),
        b"ping"
    );
    assert_eq!(relay_unary(billing.clone(), "acme/a1").await.unwrap(), "hi");
    // The all-tenants caller reaches both.
    assert_eq!(relay_unary(ops.clone(), "globex/g1").await.unwrap(), "hi");

    // --- Every denial is an audit event, and counted ---
    let denials = audit.matching(&[
        ("caller", "billing"),
        ("decision", "deny"),
        ("tenant", "globex"),
    ]);
    let methods: std::collections::BTreeSet<_> =
        denials.iter().map(|e| e["method"].as_str()).collect();
    for m in [
        "tether.v1.Agents/List",
        "tether.v1.Agents/Get",
        "tether.v1.Agents/Watch",
        "tether.v1.Agents/Revoke",
        "tether.v1.Enrollment/CreateToken",
        "tether.v1.Commands/Submit",
        "tether.v1.Commands/Get",
        "tether.v1.Commands/List",
        "tether.v1.Commands/Watch",
        "tether.v1.Commands/Cancel",
        "tether.v1.Streams/Open",
        "relay",
    ] {
        assert!(methods.contains(m), "no audit event for {m}: {denials:#?}");
        assert!(
            metric("tether_gateway_authz_denials_total", &[("method", m)]) >= 1.0,
            "{m} not counted"
        );
    }
    assert_eq!(denials.len(), 18, "one event per denial: {denials:#?}");
    assert!(denials.iter().all(|e| e["kind"] == "mtls"));
    assert!(
        denials
            .iter()
            .any(|e| e["agent"] == "globex/ghost" && e["method"] == "tether.v1.Agents/Get")
    );
    // Successful mutating calls are audited too.
    assert_eq!(
        audit
            .matching(&[
                ("caller", "billing"),
                ("decision", "allow"),
                ("method", "tether.v1.Commands/Submit"),
                ("agent", "acme/a1"),
            ])
            .len(),
        1
    );
    assert_eq!(
        audit
            .matching(&[
                ("caller", "ops"),
                ("decision", "allow"),
                ("tenant", "globex")
            ])
            .len(),
        1,
        "ops's Submit"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_caller_missing_from_the_policy_is_denied() {
    let audit = AuditLog::install();
    let s = scoped().await;
    let stranger = s.channel("stranger").await;
    let e = AgentsClient::new(stranger.clone())
        .list(ListAgentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("auth.callers"), "{}", e.message());
    denied(relay_unary(stranger, "acme/a1").await, "relay");
    assert_eq!(
        audit
            .matching(&[("caller", "stranger"), ("decision", "deny")])
            .len(),
        2
    );
    // Agent identities stay refused with scoping on.
    let ch = s.gw.channel(&s.pki.agent("acme/a1")).await.unwrap();
    let e = AgentsClient::new(ch)
        .list(ListAgentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("agent identity"), "{}", e.message());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_caller_lists_its_commands_across_pages() {
    let s = scoped().await;
    let mut ops = commands_client(s.channel("ops").await);
    let mut billing = commands_client(s.channel("billing").await);
    let mut mine = Vec::new();
    for i in 0..7 {
        let agent = if i % 2 == 0 { "acme/a1" } else { "globex/g1" };
        let id = ops
            .submit(submit_req(agent, "echo", format!("{i}")))
            .await
            .unwrap()
            .into_inner()
            .id;
        if agent == "acme/a1" {
            mine.push(id);
        }
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = billing
            .list(ListCommandsRequest {
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.commands.len() <= 2);
        seen.extend(page.commands.into_iter().map(|c| c.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, mine);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_auth_config_exits_64_naming_the_key() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let tls = pki.gateway_tls();
    let base = format!(
        "trust_domain = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        pki.ca.trust_domain,
        tls.ca.display(),
        tls.cert.display(),
        tls.key.display()
    );
    let cases = [
        (
            "[[auth.callers]]\nname = \"billing\"\ntenants = []\n",
            "auth.callers[0].tenants",
        ),
        (
            "[[auth.callers]]\nname = \"billing\"\ntenants = [\"*\", \"acme\"]\n",
            "auth.callers[0].tenants",
        ),
        (
            "[auth]\njwks_file = \"jwks.json\"\naudience = \"tether\"\n",
            "auth.issuer",
        ),
        (
            "[auth]\njwks_url = \"http://idp.example.com/jwks\"\nissuer = \"i\"\naudience = \"a\"\n",
            "auth.jwks_url",
        ),
        (
            "[auth]\njwks_file = \"missing.json\"\nissuer = \"i\"\naudience = \"a\"\n",
            "auth.jwks_file",
        ),
        ("[auth]\nissuer = \"i\"\n", "auth.issuer"),
    ];
    for (extra, key) in cases {
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, format!("{base}{extra}")).unwrap();
        let out = std::process::Command::new(binary("tether-gateway"))
            .args(["serve", "--check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{extra}: {err}");
        assert!(err.contains(key), "{extra}: want {key} in {err}");
    }
}
