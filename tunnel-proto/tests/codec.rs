//! Codec properties: every message round-trips, any byte string decodes without panicking.

use proptest::prelude::*;
use tunnel_proto::frame::{FrameDecoder, Limits, decode_frame};
use tunnel_proto::message::*;

fn s() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn metadata() -> impl Strategy<Value = Vec<MetadataEntry>> {
    proptest::collection::vec(
        (s(), proptest::collection::vec(any::<u8>(), 0..32))
            .prop_map(|(key, value)| MetadataEntry { key, value }),
        0..6,
    )
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2048).prop_map(|b| Message::Data(b.into())),
        (any::<u32>(), metadata()).prop_map(|(status, metadata)| Message::ResponseHead(
            ResponseHead { status, metadata }
        )),
        metadata().prop_map(|metadata| Message::Trailers(Trailers { metadata })),
        (any::<bool>(), any::<i32>(), s())
            .prop_map(|(ok, code, message)| Message::OpenResult(OpenResult { ok, code, message })),
        Just(Message::CommandAck(CommandAck::default())),
        s().prop_map(|message| Message::CommandProgress(CommandProgress { message })),
        (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..512),
            s()
        )
            .prop_map(|(succeeded, output, message)| Message::CommandResult(
                CommandResult {
                    succeeded,
                    output,
                    message
                }
            )),
        (
            proptest::collection::vec(any::<u32>(), 0..4),
            s(),
            proptest::collection::vec(s(), 0..4),
            proptest::collection::btree_map(s(), s(), 0..4),
            s(),
            (any::<u32>(), proptest::collection::vec(s(), 0..3))
        )
            .prop_map(
                |(
                    versions,
                    agent_version,
                    capabilities,
                    labels,
                    instance_id,
                    (sessions_held, avoid_replicas),
                )| {
                    Message::Hello(Hello {
                        versions,
                        agent_version,
                        capabilities,
                        labels,
                        instance_id,
                        sessions_held,
                        avoid_replicas,
                        ..Default::default()
                    })
                }
            ),
        (
            any::<u32>(),
            s(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            s(),
            any::<u64>(),
            proptest::collection::vec(s(), 0..3),
            (s(), any::<u32>())
        )
            .prop_map(
                |(
                    version,
                    session_id,
                    hb,
                    mfs,
                    mcs,
                    gateway_id,
                    probe,
                    capabilities,
                    (replica_id, live_replicas),
                )| {
                    Message::Welcome(Welcome {
                        version,
                        session_id,
                        heartbeat_interval_ms: hb,
                        max_frame_size: mfs,
                        max_concurrent_streams: mcs,
                        gateway_id,
                        probe_interval_ms: probe,
                        capabilities,
                        replica_id,
                        live_replicas,
                        server_time_ms: hb.rotate_left(7),
                    })
                }
            ),
        (any::<u64>(), ".{0,600}")
            .prop_map(|(id, csr_pem)| Message::RenewRequest(RenewRequest { id, csr_pem })),
        (any::<u64>(), any::<i32>(), s(), ".{0,600}", ".{0,600}").prop_map(
            |(id, code, message, certificate_pem, ca_pem)| Message::RenewResponse(RenewResponse {
                id,
                code,
                message,
                certificate_pem,
                ca_pem
            })
        ),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, last_rtt_us)| Message::Heartbeat(Heartbeat {
            seq,
            last_rtt_us,
            ..Default::default()
        })),
        (any::<u64>(), any::<u32>()).prop_map(|(seq, live_replicas)| Message::HeartbeatAck(
            HeartbeatAck { seq, live_replicas }
        )),
        (s(), any::<u64>(), s(), 0i32..4).prop_map(|(reason, w, avoid_replica, kind)| {
            Message::GoAway(GoAway {
                reason,
                reconnect_within_ms: w,
                avoid_replica,
                kind,
            })
        }),
        (any::<u32>(), s(), any::<u64>()).prop_map(|(code, reason, retry_after_ms)| {
            Message::Close(Close {
                code,
                reason,
                retry_after_ms,
            })
        }),
        (
            0i32..5,
            s(),
            s(),
            proptest::collection::vec(
                (s(), proptest::collection::vec(any::<u8>(), 0..32))
                    .prop_map(|(key, value)| MetadataEntry { key, value }),
                0..6
            ),
            any::<u64>(),
            proptest::collection::btree_map(s(), s(), 0..3),
            s()
        )
            .prop_map(
                |(kind, service, method, metadata, timeout_ms, trace_context, id)| {
                    Message::StreamHeader(StreamHeader {
                        kind,
                        service,
                        method,
                        metadata,
                        timeout_ms,
                        trace_context,
                        id,
                        ..Default::default()
                    })
                }
            ),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips(msg in message()) {
        let bytes = msg.to_bytes();
        prop_assert_eq!(bytes.len(), msg.encoded_len());
        let (back, used) = decode_frame(&bytes, usize::MAX).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, msg);
    }

    #[test]
    fn streams_of_messages_round_trip_across_any_split(
        msgs in proptest::collection::vec(message(), 1..8),
        cuts in proptest::collection::vec(1usize..64, 1..40),
    ) {
        let mut wire = bytes::BytesMut::new();
        for m in &msgs {
            m.encode(&mut wire);
        }
        let mut dec = FrameDecoder::new(usize::MAX);
        let mut out = Vec::new();
        let mut rest = &wire[..];
        let mut cuts = cuts.into_iter().cycle();
        while !rest.is_empty() {
            let n = cuts.next().unwrap().min(rest.len());
            dec.push(&rest[..n]);
            rest = &rest[n..];
            while let Some(m) = dec.next_message().unwrap() {
                out.push(m);
            }
        }
        prop_assert!(dec.finish().is_ok());
        prop_assert_eq!(out, msgs);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut dec = FrameDecoder::new(Limits::DEFAULT.max_control_frame);
        dec.push(&bytes);
        for _ in 0..bytes.len() + 1 {
            match dec.next_message() {
                Ok(Some(_)) => continue,
                _ => break,
            }
        }
        let _ = decode_frame(&bytes, 16);
    }

    #[test]
    fn decoder_buffers_at_most_one_frame_beyond_the_limit(len in 65_537u32..u32::MAX) {
        let mut dec = FrameDecoder::new(65_536);
        let mut hdr = vec![0x01];
        hdr.extend_from_slice(&len.to_be_bytes());
        dec.push(&hdr);
        let err = dec.next_message().unwrap_err();
        let too_large = matches!(err, tunnel_proto::ProtoError::FrameTooLarge { .. });
        prop_assert!(too_large);
    }
}

#[test]
fn stream_header_kind_is_typed() {
    let h = StreamHeader {
        kind: StreamKind::Tcp as i32,
        ..Default::default()
    };
    assert_eq!(h.stream_kind(), StreamKind::Tcp);
    let h = StreamHeader {
        kind: 99,
        ..Default::default()
    };
    assert_eq!(h.stream_kind(), StreamKind::Unspecified);
}

#[test]
fn data_header_matches_the_data_frame_encoding() {
    let payload = bytes::Bytes::from_static(b"hello world");
    let whole = Message::Data(payload.clone()).to_bytes();
    let mut split = tunnel_proto::frame::data_header(payload.len()).to_vec();
    split.extend_from_slice(&payload);
    assert_eq!(&whole[..], &split[..]);
}

#[test]
fn status_trailers_percent_encode_the_message() {
    let t = Trailers::status(14, "upstream 100% down\n");
    assert_eq!(t.grpc_status(), Some(14));
    let msg = t.metadata.iter().find(|m| m.key == "grpc-message").unwrap();
    assert_eq!(msg.value, b"upstream 100%25 down%0A");
}

proptest! {
    /// Progress lines and result messages are cut to their caps: never longer than the cap,
    /// unchanged when within it, otherwise the original's head (at a character boundary) and a
    /// marker naming exactly how many bytes were cut.
    #[test]
    fn truncated_text_keeps_its_head_within_the_cap_and_says_how_much_was_cut(
        text in "(\\PC|\u{1F600}|é){0,3000}",
        max in 0usize..2100,
    ) {
        let mut t = text.clone();
        truncate_text(&mut t, max);
        prop_assert!(t.len() <= max || text.len() <= max);
        if text.len() <= max {
            prop_assert_eq!(&t, &text);
        } else {
            prop_assert!(t.len() <= max);
            match t.rfind(" \u{2026} [+") {
                Some(at) if t.ends_with(" bytes]") => {
                    let head = &t[..at];
                    prop_assert!(text.starts_with(head));
                    let cut: usize = t[at..]
                        .trim_start_matches(" \u{2026} [+")
                        .trim_end_matches(" bytes]")
                        .parse()
                        .unwrap();
                    prop_assert_eq!(head.len() + cut, text.len());
                    // Nothing is given up beyond a partial character and the marker's spare
                    // digits.
                    let slack = max - t.len();
                    prop_assert!(slack < 4 + 20, "{} bytes unused", slack);
                }
                _ => {
                    // Too small for a marker: the head alone.
                    prop_assert!(max < 40, "no marker with max {}", max);
                    prop_assert!(text.starts_with(t.as_str()));
                }
            }
        }
    }
}

#[test]
fn the_caps_leave_a_line_readable() {
    let mut line = "x".repeat(128 << 10);
    truncate_text(&mut line, COMMAND_PROGRESS_LINE_MAX);
    assert!(line.len() <= COMMAND_PROGRESS_LINE_MAX);
    assert!(line.ends_with(&format!(
        " \u{2026} [+{} bytes]",
        (128 << 10) - line.find(' ').unwrap()
    )));
    let mut short = "rollout 2/3".to_owned();
    truncate_text(&mut short, COMMAND_MESSAGE_MAX);
    assert_eq!(short, "rollout 2/3");
}
