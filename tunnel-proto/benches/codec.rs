//! Encode/decode throughput of the control and stream-header frames.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tunnel_proto::frame::FrameDecoder;
use tunnel_proto::message::*;

fn header() -> Message {
    Message::StreamHeader(StreamHeader {
        kind: StreamKind::Rpc as i32,
        service: "default".into(),
        method: "/demo.Echo/Unary".into(),
        metadata: (0..8)
            .map(|i| MetadataEntry {
                key: format!("x-custom-{i}"),
                value: b"some-metadata-value".to_vec(),
            })
            .collect(),
        timeout_ms: 5000,
        trace_context: [(
            "traceparent".to_string(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string(),
        )]
        .into(),
        id: String::new(),
        caller: "mtls:control-plane".into(),
        attempt: 0,
    })
}

fn bench(c: &mut Criterion) {
    let hb = Message::Heartbeat(Heartbeat {
        seq: 12345,
        last_rtt_us: 250,
        ..Default::default()
    });
    let hdr = header();
    let mut g = c.benchmark_group("codec");
    for (name, msg) in [("heartbeat", &hb), ("stream_header", &hdr)] {
        g.throughput(Throughput::Bytes(msg.encoded_len() as u64));
        g.bench_function(format!("encode/{name}"), |b| {
            let mut buf = BytesMut::with_capacity(4096);
            b.iter(|| {
                buf.clear();
                black_box(msg).encode(&mut buf);
            })
        });
        let bytes = msg.to_bytes();
        g.bench_function(format!("decode/{name}"), |b| {
            let mut dec = FrameDecoder::new(1 << 20);
            b.iter(|| {
                dec.push(black_box(&bytes));
                black_box(dec.next_message().unwrap().unwrap());
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
