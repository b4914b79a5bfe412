//! gRPC-over-HTTP/2 details both ends of the relay need: metadata ↔ headers, `grpc-timeout`.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use tunnel_proto::message::MetadataEntry;

/// Headers that belong to one HTTP hop and are never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "host",
    "content-length",
];

/// Headers addressed to Tether itself, consumed by the gateway.
pub const TETHER_AGENT: &str = "tether-agent";
/// See [`TETHER_AGENT`].
pub const TETHER_SERVICE: &str = "tether-service";

/// Metadata worth forwarding: everything but hop-by-hop headers, `grpc-timeout` (carried as the
/// stream's deadline) and Tether's own routing headers.
pub fn headers_to_metadata(h: &HeaderMap) -> Vec<MetadataEntry> {
    h.iter()
        .filter(|(k, _)| {
            let k = k.as_str();
            !HOP_BY_HOP.contains(&k)
                && k != "grpc-timeout"
                && k != TETHER_AGENT
                && k != TETHER_SERVICE
        })
        .map(|(k, v)| MetadataEntry {
            key: k.as_str().to_owned(),
            value: v.as_bytes().to_vec(),
        })
        .collect()
}

/// Appends metadata entries to a header map, skipping names or values HTTP/2 would refuse and
/// hop-by-hop headers.
pub fn metadata_to_headers(m: &[MetadataEntry], into: &mut HeaderMap) {
    for e in m {
        if HOP_BY_HOP.contains(&e.key.as_str()) {
            continue;
        }
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(e.key.as_bytes()),
            HeaderValue::from_bytes(&e.value),
        ) {
            into.append(k, v);
        }
    }
}

/// Parses a `grpc-timeout` value (`1H`, `5M`, `30S`, `100m`, `250u`, `1000n`).
pub fn parse_grpc_timeout(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (n, unit) = s.split_at(s.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes a timeout as `grpc-timeout` (milliseconds, at most 8 digits as the spec allows).
pub fn encode_grpc_timeout(d: Duration) -> HeaderValue {
    let ms = d.as_millis().clamp(1, 99_999_999);
    HeaderValue::from_str(&format!("{ms}m")).expect("digits and a unit are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_round_trips_and_rejects_garbage() {
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(
            parse_grpc_timeout(&v("100m")),
            Some(Duration::from_millis(100))
        );
        assert_eq!(parse_grpc_timeout(&v("2S")), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_grpc_timeout(&v("1H")),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(parse_grpc_timeout(&v("5x")), None);
        assert_eq!(parse_grpc_timeout(&v("m")), None);
        assert_eq!(
            parse_grpc_timeout(&encode_grpc_timeout(Duration::from_millis(1500))),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn routing_and_hop_by_hop_headers_are_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert("tether-agent", HeaderValue::from_static("a/b"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("grpc-timeout", HeaderValue::from_static("1S"));
        h.insert("x-custom", HeaderValue::from_static("v"));
        let m = headers_to_metadata(&h);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].key, "x-custom");
        let mut back = HeaderMap::new();
        metadata_to_headers(&m, &mut back);
        assert_eq!(back["x-custom"], "v");
    }
}
