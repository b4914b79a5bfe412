//! Writes the hand-made seeds of the fuzz targets to `fuzz/corpus/<target>/`: real messages,
//! real CSRs and real tokens, valid and near-valid. Run after changing the protocol:
//!
//! ```text
//! cargo run -p tether-fuzz --example gen_corpus
//! ```
//!
//! Seeds are named for what they are; files the fuzzer added (hash names) are left alone. Keys
//! and CSRs are generated afresh, so the CSR seeds change at every run (the JWT seeds too: ECDSA
//! signatures are randomised).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use tether_fuzz::{IDENTITY, JWT_AUDIENCE, JWT_ISSUER, TOKEN_PLACEHOLDER, pem_of};
use tunnel_proto::message::*;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("corpus directory");
    std::fs::write(d.join(name), bytes).expect("corpus file");
}

fn header(kind: StreamKind) -> StreamHeader {
    StreamHeader {
        kind: kind as i32,
        service: "greeter".into(),
        method: "/helloworld.Greeter/SayHello".into(),
        metadata: vec![
            MetadataEntry {
                key: "x-request-id".into(),
                value: b"abc".to_vec(),
            },
            MetadataEntry {
                key: "authorization-bin".into(),
                value: vec![0, 1, 2, 255],
            },
        ],
        timeout_ms: 1500,
        trace_context: BTreeMap::from([(
            "traceparent".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        )]),
        id: "cmd-1".into(),
        caller: "mtls:api".into(),
        attempt: 1,
    }
}

fn frames(split: u8, msgs: &[Message]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(split);
    for m in msgs {
        m.encode(&mut b);
    }
    b.to_vec()
}

fn csr(params: rcgen::CertificateParams, key: &rcgen::KeyPair) -> Vec<u8> {
    params.serialize_request(key).expect("csr").der().to_vec()
}

fn with_uris(uris: &[&str]) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    for u in uris {
        p.subject_alt_names
            .push(rcgen::SanType::URI((*u).try_into().expect("uri")));
    }
    p
}

fn prefixed(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(bytes);
    v
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn main() {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");

    // control_message: one real message of every type, and a few broken payloads.
    let hello = Hello {
        versions: vec![1, 2],
        agent_version: "0.1.0".into(),
        capabilities: vec!["relay".into(), "tcp".into(), "commands".into()],
        labels: BTreeMap::from([("region".to_owned(), "eu-west-1".to_owned())]),
        instance_id: "i-1".into(),
        sessions_held: 1,
        avoid_replicas: vec!["r1#3".into()],
        paused: true,
        pause_reason: "audit".into(),
        proxy: tunnel_proto::message::Proxy::Http as i32,
        services: vec![tunnel_proto::message::ServiceEntry {
            name: "billing".into(),
            kind: "grpc".into(),
        }],
        sessions_wanted: 2,
        gateway_addresses: 1,
    };
    let welcome = Welcome {
        version: 1,
        session_id: "s-1".into(),
        heartbeat_interval_ms: 15_000,
        max_frame_size: 65_536,
        max_concurrent_streams: 1024,
        gateway_id: "gw-1".into(),
        probe_interval_ms: 30_000,
        ..Default::default()
    };
    let messages = [
        Message::Hello(hello.clone()),
        Message::Welcome(welcome.clone()),
        Message::Heartbeat(Heartbeat {
            seq: 7,
            last_rtt_us: 1200,
            paused: true,
            pause_reason: "audit".into(),
            services_changed: true,
            services: vec![tunnel_proto::message::ServiceEntry {
                name: "db".into(),
                kind: "tcp".into(),
            }],
        }),
        Message::HeartbeatAck(HeartbeatAck {
            seq: 7,
            live_replicas: 3,
        }),
        Message::GoAway(GoAway {
            reason: "draining".into(),
            reconnect_within_ms: 30_000,
            avoid_replica: "r1#3".into(),
            kind: tunnel_proto::message::GoAwayKind::Drain as i32,
        }),
        Message::Close(Close {
            code: 15,
            reason: "busy".into(),
            retry_after_ms: 1500,
        }),
        Message::StreamHeader(header(StreamKind::Rpc)),
        Message::Data(Bytes::from_static(b"\0\0\0\0\x05hello")),
        Message::ResponseHead(ResponseHead {
            status: 200,
            metadata: header(StreamKind::Rpc).metadata,
        }),
        Message::Trailers(Trailers::status(5, "not found: caf\u{e9} 100%")),
        Message::OpenResult(OpenResult {
            ok: false,
            code: 7,
            message: "denied".into(),
        }),
        Message::CommandAck(CommandAck::default()),
        Message::CommandProgress(CommandProgress {
            message: "half way".into(),
        }),
        Message::CommandResult(CommandResult {
            succeeded: true,
            output: b"ok".to_vec(),
            message: String::new(),
        }),
        Message::RenewRequest(RenewRequest {
            id: 1,
            csr_pem:
                "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
        }),
        Message::RenewResponse(RenewResponse {
            id: 1,
            code: 7,
            message: "agent revoked".into(),
            ..Default::default()
        }),
    ];
    for m in &messages {
        let sel = m.frame_type();
        let frame = m.to_bytes();
        write(
            &dir,
            "control_message",
            &m.name().to_lowercase(),
            &prefixed(sel, &frame[5..]),
        );
    }
    let mut bad_utf8 = hello.encode_to_vec();
    let at = bad_utf8
        .windows(5)
        .position(|w| w == b"0.1.0")
        .expect("version string");
    bad_utf8[at] = 0xff;
    write(
        &dir,
        "control_message",
        "hello_bad_utf8",
        &prefixed(1, &bad_utf8),
    );
    write(
        &dir,
        "control_message",
        "hello_truncated_varint",
        &[1, 0x08, 0xff],
    );
    let old = Welcome {
        version: 99,
        ..welcome.clone()
    };
    write(
        &dir,
        "control_message",
        "welcome_unknown_version",
        &prefixed(2, &old.encode_to_vec()),
    );

    // gateway_session: an agent's control stream from the start (no split byte: the body
    // reads 7 bytes at a time).
    let stream = |msgs: &[Message]| frames(0, msgs)[1..].to_vec();
    write(
        &dir,
        "gateway_session",
        "hello_heartbeats_close",
        &stream(&[
            messages[0].clone(),
            messages[2].clone(),
            Message::Heartbeat(Heartbeat {
                seq: 8,
                last_rtt_us: 0,
                ..Default::default()
            }),
            messages[5].clone(),
        ]),
    );
    write(
        &dir,
        "gateway_session",
        "hello_unknown_version",
        &stream(&[Message::Hello(Hello {
            versions: vec![7],
            ..hello.clone()
        })]),
    );
    write(
        &dir,
        "gateway_session",
        "hello_renew_twice",
        &stream(&[
            messages[0].clone(),
            messages[messages.len() - 2].clone(),
            messages[messages.len() - 2].clone(),
        ]),
    );
    write(
        &dir,
        "gateway_session",
        "hello_twice",
        &stream(&[messages[0].clone(), messages[0].clone()]),
    );

    // agent_session: a gateway that offers renewal answers the agent's request (id 1).
    write(
        &dir,
        "agent_session",
        "welcome_renew_answered",
        &stream(&[
            Message::Welcome(Welcome {
                capabilities: vec![tunnel_proto::message::RENEW.into()],
                ..welcome.clone()
            }),
            Message::HeartbeatAck(HeartbeatAck {
                seq: 1,
                live_replicas: 0,
            }),
            Message::RenewResponse(RenewResponse {
                id: 1,
                code: 7,
                message: "agent revoked".into(),
                ..Default::default()
            }),
            messages[5].clone(),
        ]),
    );

    // stream_header: a gateway-opened stream of each kind, then what follows it.
    let data = Message::Data(Bytes::from_static(b"\0\0\0\0\x05hello"));
    for (name, kind) in [
        ("rpc", StreamKind::Rpc),
        ("tcp", StreamKind::Tcp),
        ("command", StreamKind::Command),
        ("probe", StreamKind::Probe),
        ("unspecified", StreamKind::Unspecified),
    ] {
        let h = Message::StreamHeader(header(kind));
        write(&dir, "stream_header", name, &frames(4, &[h, data.clone()]));
    }
    let mut unknown = header(StreamKind::Rpc);
    unknown.kind = 42;
    unknown.timeout_ms = u64::MAX;
    write(
        &dir,
        "stream_header",
        "unknown_kind_huge_deadline",
        &frames(1, &[Message::StreamHeader(unknown)]),
    );
    let mut bad_meta = header(StreamKind::Rpc);
    bad_meta.metadata.push(MetadataEntry {
        key: "Bad Name\n".into(),
        value: b"v\r\nx".to_vec(),
    });
    bad_meta.metadata.push(MetadataEntry {
        key: "grpc-timeout".into(),
        value: b"99999999H".to_vec(),
    });
    bad_meta.method = "not a path".into();
    write(
        &dir,
        "stream_header",
        "bad_metadata_and_method",
        &frames(255, &[Message::StreamHeader(bad_meta)]),
    );
    write(
        &dir,
        "stream_header",
        "responses",
        &frames(
            3,
            &[
                Message::StreamHeader(header(StreamKind::Rpc)),
                messages[8].clone(),
                data.clone(),
                messages[9].clone(),
            ],
        ),
    );
    write(&dir, "stream_header", "data_first", &frames(2, &[data]));
    write(
        &dir,
        "stream_header",
        "oversized",
        &[1, 0x10, 0xff, 0xff, 0xff, 0xff],
    );

    // The stream machines. First byte: reads of `1 + (b & 0x3f)` bytes (times 64 with 0x40),
    // and 0x80 for a reset instead of FIN.
    let hello_data = || Message::Data(Bytes::from_static(b"hello"));
    let ok = || {
        Message::OpenResult(OpenResult {
            ok: true,
            ..Default::default()
        })
    };
    let head = || {
        Message::ResponseHead(ResponseHead {
            status: 200,
            metadata: vec![],
        })
    };
    let trailers = || Message::Trailers(Trailers::status(0, ""));
    let result = |output: &[u8]| {
        Message::CommandResult(CommandResult {
            succeeded: true,
            output: output.to_vec(),
            message: "done".into(),
        })
    };
    // agent_stream: every kind with what follows it, and what breaks it.
    for (name, kind, split) in [
        ("rpc", StreamKind::Rpc, 3),
        ("command", StreamKind::Command, 0x41),
        ("probe", StreamKind::Probe, 7),
        ("unspecified", StreamKind::Unspecified, 1),
    ] {
        let h = Message::StreamHeader(header(kind));
        write(
            &dir,
            "agent_stream",
            name,
            &frames(split, &[h, hello_data(), hello_data()]),
        );
    }
    let mut tcp = frames(5, &[Message::StreamHeader(header(StreamKind::Tcp))]);
    tcp.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
    write(&dir, "agent_stream", "tcp_raw_bytes", &tcp);
    write(
        &dir,
        "agent_stream",
        "rpc_reset",
        &frames(
            0x82,
            &[Message::StreamHeader(header(StreamKind::Rpc)), hello_data()],
        ),
    );
    write(
        &dir,
        "agent_stream",
        "rpc_then_trailers",
        &frames(
            9,
            &[Message::StreamHeader(header(StreamKind::Rpc)), trailers()],
        ),
    );
    write(
        &dir,
        "agent_stream",
        "data_first",
        &frames(2, &[hello_data()]),
    );
    let mut big = frames(0x7f, &[Message::StreamHeader(header(StreamKind::Command))]);
    for _ in 0..2 {
        big.extend_from_slice(&Message::Data(Bytes::from(vec![7u8; 3000])).to_bytes());
    }
    write(&dir, "agent_stream", "command_payload_above_4k", &big);
    let mut cut = frames(
        4,
        &[Message::StreamHeader(header(StreamKind::Rpc)), hello_data()],
    );
    cut.truncate(cut.len() - 2);
    write(&dir, "agent_stream", "rpc_fin_inside_a_frame", &cut);

    // rpc_response: a whole answer, trailers-only, and answers out of order or cut short.
    let rpc_seeds: [(&str, u8, Vec<Message>); 5] = [
        (
            "head_body_trailers",
            3,
            vec![head(), hello_data(), trailers()],
        ),
        (
            "trailers_only",
            1,
            vec![Message::Trailers(Trailers::status(5, "not found"))],
        ),
        ("data_before_head", 2, vec![hello_data(), trailers()]),
        ("two_heads", 0x45, vec![head(), head(), trailers()]),
        ("ends_after_head", 0x80, vec![head(), hello_data()]),
    ];
    for (name, split, msgs) in rpc_seeds {
        write(&dir, "rpc_response", name, &frames(split, &msgs));
    }

    // tcp_answer: opened with the service's first bytes, refused, or not an answer.
    let mut opened = frames(6, &[ok()]);
    opened.extend_from_slice(b"SSH-2.0-OpenSSH_9.6\r\n");
    write(&dir, "tcp_answer", "opened_with_bytes", &opened);
    write(
        &dir,
        "tcp_answer",
        "refused",
        &frames(
            1,
            &[Message::OpenResult(OpenResult {
                ok: false,
                code: 14,
                message: "connection refused".into(),
            })],
        ),
    );
    write(&dir, "tcp_answer", "trailers", &frames(3, &[trailers()]));
    write(&dir, "tcp_answer", "nothing", &[0]);

    // command_report: the second byte is the output limit / 16.
    let report = |split: u8, limit: u8, msgs: &[Message]| {
        let mut v = frames(split, msgs);
        v.insert(1, limit);
        v
    };
    let ack = || Message::CommandAck(CommandAck::default());
    let progress = || {
        Message::CommandProgress(CommandProgress {
            message: "step 1 of 2".into(),
        })
    };
    write(
        &dir,
        "command_report",
        "inline_output",
        &report(5, 16, &[ack(), progress(), result(b"ok")]),
    );
    write(
        &dir,
        "command_report",
        "streamed_output",
        &report(
            0x43,
            64,
            &[
                ack(),
                Message::Data(Bytes::from(vec![1u8; 600])),
                result(b"tail"),
            ],
        ),
    );
    write(
        &dir,
        "command_report",
        "output_above_limit",
        &report(
            7,
            1,
            &[
                ack(),
                Message::Data(Bytes::from(vec![1u8; 40])),
                result(b""),
            ],
        ),
    );
    write(
        &dir,
        "command_report",
        "unsupported",
        &report(2, 16, &[trailers()]),
    );
    write(
        &dir,
        "command_report",
        "result_before_ack",
        &report(1, 16, &[result(b"")]),
    );
    write(
        &dir,
        "command_report",
        "reset_after_ack",
        &report(0x81, 16, &[ack(), progress()]),
    );

    // peer_frame: a header (even first byte) or an answer (odd) on a peer link.
    {
        use tether_gateway::peer::wire::{self, AnswerCode, PeerAnswer, PeerHeader, PeerKind};
        let forward = PeerHeader {
            version: wire::VERSION,
            kind: PeerKind::Forward as u32,
            agent: "acme/a".into(),
            caller: "billing".into(),
            timeout_ms: 1500,
            stream_kind: "grpc".into(),
        };
        let ping = PeerHeader {
            version: wire::VERSION,
            kind: PeerKind::Ping as u32,
            ..Default::default()
        };
        let framed = |mode: u8, f: bytes::Bytes| [&[mode][..], &f[..]].concat();
        write(
            &dir,
            "peer_frame",
            "forward",
            &framed(0, wire::encode(&forward)),
        );
        write(&dir, "peer_frame", "ping", &framed(0, wire::encode(&ping)));
        write(
            &dir,
            "peer_frame",
            "answer_ok",
            &framed(1, wire::encode(&PeerAnswer::new(AnswerCode::Ok, ""))),
        );
        write(
            &dir,
            "peer_frame",
            "answer_not_here",
            &framed(
                1,
                wire::encode(&PeerAnswer::new(
                    AnswerCode::NotHere,
                    "no session of acme/a",
                )),
            ),
        );
        write(&dir, "peer_frame", "too_large", &[0, 0, 1, 0, 0, 8, 1]);
    }

    // probe_answer.
    write(&dir, "probe_answer", "answered", &frames(1, &[ok()]));
    write(
        &dir,
        "probe_answer",
        "not_ok",
        &frames(
            2,
            &[Message::OpenResult(OpenResult {
                ok: false,
                code: 12,
                message: String::new(),
            })],
        ),
    );
    write(&dir, "probe_answer", "trailers", &frames(3, &[trailers()]));
    write(
        &dir,
        "probe_answer",
        "oversized",
        &[0, 0x0d, 0xff, 0xff, 0, 0],
    );

    // csr_check: real requests, valid and each refusal; DER (mode 0) and PEM text (mode 1).
    let key = rcgen::KeyPair::generate().expect("p256 key");
    let ok = csr(with_uris(&[IDENTITY]), &key);
    write(&dir, "csr_check", "valid_p256_der", &prefixed(0, &ok));
    write(
        &dir,
        "csr_check",
        "valid_p256_pem",
        &prefixed(1, pem_of(&ok).as_bytes()),
    );
    write(
        &dir,
        "csr_check",
        "valid_no_san_der",
        &prefixed(0, &csr(with_uris(&[]), &key)),
    );
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519 key");
    write(
        &dir,
        "csr_check",
        "valid_ed25519_der",
        &prefixed(0, &csr(with_uris(&[IDENTITY]), &ed)),
    );
    let other = "spiffe://fuzz.test/tenant/globex/agent/a";
    write(
        &dir,
        "csr_check",
        "other_identity",
        &prefixed(0, &csr(with_uris(&[other]), &key)),
    );
    write(
        &dir,
        "csr_check",
        "extra_uri",
        &prefixed(0, &csr(with_uris(&[IDENTITY, other]), &key)),
    );
    let mut dns = with_uris(&[IDENTITY]);
    dns.subject_alt_names.push(rcgen::SanType::DnsName(
        "evil.example".try_into().expect("dns"),
    ));
    write(
        &dir,
        "csr_check",
        "extra_dns",
        &prefixed(0, &csr(dns, &key)),
    );
    let mut ca = with_uris(&[IDENTITY]);
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    write(&dir, "csr_check", "ca", &prefixed(0, &csr(ca, &key)));
    let mut signing = with_uris(&[]);
    signing.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyCertSign,
    ];
    write(
        &dir,
        "csr_check",
        "key_cert_sign",
        &prefixed(0, &csr(signing, &key)),
    );
    let mut eku = with_uris(&[IDENTITY]);
    eku.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    eku.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    write(
        &dir,
        "csr_check",
        "valid_usages",
        &prefixed(0, &csr(eku, &key)),
    );
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("p384 key");
    write(
        &dir,
        "csr_check",
        "p384",
        &prefixed(0, &csr(with_uris(&[IDENTITY]), &p384)),
    );
    let mut tampered = ok.clone();
    let n = tampered.len();
    tampered[n - 10] ^= 1;
    write(&dir, "csr_check", "bad_signature", &prefixed(0, &tampered));
    write(
        &dir,
        "csr_check",
        "not_pem",
        b"\x01not a certificate request",
    );

    // enroll_request: EnrollRequest protobufs with the placeholder token (a pending token).
    let req = |token: &str, csr_pem: String| {
        tether_api::v1::EnrollRequest {
            token: token.into(),
            csr_pem,
        }
        .encode_to_vec()
    };
    write(
        &dir,
        "enroll_request",
        "valid",
        &req(TOKEN_PLACEHOLDER, pem_of(&ok)),
    );
    write(
        &dir,
        "enroll_request",
        "valid_ed25519",
        &req(TOKEN_PLACEHOLDER, pem_of(&csr(with_uris(&[]), &ed))),
    );
    write(
        &dir,
        "enroll_request",
        "unknown_token",
        &req(
            "tet1_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            pem_of(&ok),
        ),
    );
    write(
        &dir,
        "enroll_request",
        "not_a_token",
        &req("hello", pem_of(&ok)),
    );
    write(
        &dir,
        "enroll_request",
        "other_identity",
        &req(TOKEN_PLACEHOLDER, pem_of(&csr(with_uris(&[other]), &key))),
    );
    write(
        &dir,
        "enroll_request",
        "garbage_csr",
        &req(
            TOKEN_PLACEHOLDER,
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
        ),
    );

    // bearer_token: `authorization` values: good tokens and each refusal.
    let pkcs8 = {
        use rustls_pki_types::pem::PemObject as _;
        rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(include_bytes!(
            "../fixtures/jwt-key.pem"
        ))
        .expect("the fixture key")
    };
    let signing_key = jsonwebtoken::EncodingKey::from_ec_der(pkcs8.secret_pkcs8_der());
    let far = 4_102_444_800u64; // 2100-01-01
    let sign = |kid: Option<&str>, claims: serde_json::Value| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&h, &claims, &signing_key).expect("signed token")
    };
    let claims = |sub: &str, tenants: serde_json::Value, exp: u64| {
        serde_json::json!({
            "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": sub, "exp": exp, "nbf": 0,
            "tenants": tenants,
        })
    };
    let bearer = |t: &str| format!("Bearer {t}").into_bytes();
    let tok = |name: &str, t: String| write(&dir, "bearer_token", name, &bearer(&t));
    tok(
        "valid",
        sign(
            Some("fuzz-1"),
            claims("ops", serde_json::json!(["acme"]), far),
        ),
    );
    tok(
        "valid_scope_intersected",
        sign(
            Some("fuzz-1"),
            claims("ops", serde_json::json!(["acme", "globex"]), far),
        ),
    );
    tok(
        "valid_other_sub_string_claim",
        sign(
            Some("fuzz-1"),
            claims("ci", serde_json::json!("globex"), far),
        ),
    );
    tok(
        "valid_no_kid",
        sign(None, claims("ci", serde_json::json!(["acme"]), far)),
    );
    tok(
        "no_tenants",
        sign(Some("fuzz-1"), claims("ci", serde_json::json!([]), far)),
    );
    tok(
        "bad_tenant_name",
        sign(
            Some("fuzz-1"),
            claims("ci", serde_json::json!(["A/../b"]), far),
        ),
    );
    tok(
        "expired",
        sign(
            Some("fuzz-1"),
            claims("ops", serde_json::json!(["acme"]), 1000),
        ),
    );
    let mut wrong_aud = claims("ops", serde_json::json!(["acme"]), far);
    wrong_aud["aud"] = "someone-else".into();
    tok("wrong_audience", sign(Some("fuzz-1"), wrong_aud));
    tok(
        "unknown_kid",
        sign(
            Some("other"),
            claims("ops", serde_json::json!(["acme"]), far),
        ),
    );
    let body = b64(claims("ops", serde_json::json!(["acme"]), far)
        .to_string()
        .as_bytes());
    tok(
        "alg_none",
        format!("{}.{body}.", b64(br#"{"alg":"none","typ":"JWT"}"#)),
    );
    tok(
        "alg_hs256",
        format!(
            "{}.{body}.{}",
            b64(br#"{"alg":"HS256","typ":"JWT","kid":"fuzz-1"}"#),
            b64(&[7; 32])
        ),
    );
    tok("not_a_jwt", "a.b".into());
    write(&dir, "bearer_token", "basic", b"Basic dXNlcjpwYXNz");
    write(&dir, "bearer_token", "empty_bearer", b"Bearer ");
    // relay_metadata: `tether-agent` values, good and each refusal.
    for (name, v) in [
        ("valid", &b"acme/eu-1"[..]),
        ("dotted", b"acme.prod/a_b-c"),
        ("no_slash", b"acme"),
        ("two_slashes", b"acme/a/b"),
        ("empty_tenant", b"/a"),
        ("dash_first", b"-acme/a"),
        ("sixty_four", &[b'a'; 64][..]),
        ("utf8", "ac\u{e9}me/a".as_bytes()),
    ] {
        write(&dir, "relay_metadata", name, v);
    }
    let mut long = vec![b't'; 8 << 10];
    long.extend_from_slice(b"/a");
    write(&dir, "relay_metadata", "long_tenant", &long);
    println!("seeds written under {}", dir.display());
}
