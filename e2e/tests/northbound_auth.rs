//! The northbound API only serves control-plane identities of our trust domain.

use std::time::Duration;

use tether_api::v1::ListAgentsRequest;
use tether_api::v1::agents_client::AgentsClient;
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
