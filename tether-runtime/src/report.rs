//! An error as one line for a person: its text and every source's, each said once.

/// `e` and each of its sources, joined with `: ` — the whole story of an error whose
/// `Display` is only its outermost layer (tonic's `transport error`, hyper's `client error
/// (Connect)`). A source whose text is already in the line is left out: hyper-util nests
/// `tcp connect error` in `tcp connect error`, tonic and h2 repeat their inner error in their
/// own text.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// What to do about an error binding a socket or opening a file, after what the OS said
/// (empty when there is nothing to add).
pub fn io_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another process listens there: stop it, or set the key named to another address)"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            " (no interface of this host has that address: listen on 0.0.0.0 or one of its own addresses)"
        }
        std::io::ErrorKind::PermissionDenied => {
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE; files need the right owner and mode)"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);

    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn each_part_is_said_once() {
        let refused = E("Connection refused (os error 111)", None);
        let inner = E("tcp connect error", Some(Box::new(refused)));
        let outer = E("tcp connect error", Some(Box::new(inner)));
        let top = E("client error (Connect)", Some(Box::new(outer)));
        assert_eq!(
            chain(&top),
            "client error (Connect): tcp connect error: Connection refused (os error 111)"
        );
    }
}
