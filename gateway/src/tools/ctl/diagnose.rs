//! Why `tetherctl` could not connect to the northbound API, in words a person can act on.
//!
//! tonic reports every failure to connect as `transport error`. When a connection fails, the
//! client dials again the way tonic did (TCP, then TLS with ALPN `h2`, the same CA, name and
//! client certificate) and watches each step: refused, timed out, a certificate not signed by
//! the CA given (which CA signed it), a name the certificate does not carry (which names it
//! does), a server that speaks no TLS or not HTTP/2 (a wrong port), a client certificate the
//! gateway refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::{AlertDescription, CertificateError};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::tools::ctl::Target;

/// How long one step of the diagnosis (and tonic's own connect) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP/2 connection preface and an empty SETTINGS frame: enough for a gateway to answer
/// (or, in TLS 1.3, to refuse the client certificate it has just seen).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Where the default ports are, for messages about a wrong one.
const PORTS: &str = "the gateway's northbound API listens on port 7444 by default (`northbound.listen`); 7443 is the agents' tunnel and 9090 the ops endpoint";

/// Dials `t` step by step and says what fails; `None` when every step worked (the caller
/// then reports tonic's own error).
pub async fn diagnose(
    t: &Target,
    server_name: &str,
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Option<String> {
    let addr = &t.addr;
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host(addr.as_str())).await {
            Err(_) => {
                return Some(format!(
                    "resolving {addr} took longer than {CONNECT_TIMEOUT:?}"
                ));
            }
            Ok(Err(e)) => return Some(format!("cannot resolve {addr}: {e}")),
            Ok(Ok(a)) => a.collect(),
        };
    let Some(&remote) = addrs.first() else {
        return Some(format!("{addr} resolves to no address"));
    };
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(remote))
        .await
    {
        Err(_) => {
            return Some(format!(
                "no answer from {remote} within {CONNECT_TIMEOUT:?}: the host is down or a firewall drops the packets (is the address right?)"
            ));
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Some(format!(
                "connection refused by {remote}: nothing listens there on TCP. Is the gateway running, and is this its northbound port? ({PORTS})"
            ));
        }
        Ok(Err(e)) => return Some(format!("connecting to {remote}: {e}")),
        Ok(Ok(tcp)) => tcp,
    };

    let roots = match roots(ca_pem) {
        Ok(r) => r,
        Err(e) => return Some(format!("the CA bundle {}: {e}", t.ca.display())),
    };
    let seen = match tether_runtime::tls::RecordingVerifier::new(Arc::new(roots)) {
        Ok(v) => v,
        Err(e) => return Some(format!("the CA bundle {}: {e}", t.ca.display())),
    };
    let builder = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(seen.clone());
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let certs = match CertificateDer::pem_slice_iter(cert).collect::<Result<Vec<_>, _>>() {
                Ok(c) if !c.is_empty() => c,
                _ => {
                    return Some(format!("{}: no PEM certificate in it", t.cert.display()));
                }
            };
            let Ok(key) = PrivateKeyDer::from_pem_slice(key) else {
                return Some(format!("{}: no PEM private key in it", t.key.display()));
            };
            match builder.with_client_auth_cert(certs, key) {
                Ok(c) => c,
                Err(e) => {
                    return Some(format!(
                        "the client certificate {} and key {} do not go together: {e}",
                        t.cert.display(),
                        t.key.display()
                    ));
                }
            }
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let Ok(name) = ServerName::try_from(server_name.to_owned()) else {
        return Some(format!(
            "{server_name:?} is not a DNS name or IP address to verify the gateway's certificate against (--server-name)"
        ));
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await;
    let mut tls = match handshake {
        Err(_) => {
            return Some(format!(
                "{remote} accepted the TCP connection but did not complete a TLS handshake within {CONNECT_TIMEOUT:?}: it does not look like a Tether gateway's northbound port ({PORTS})"
            ));
        }
        Ok(Err(e)) => return Some(tls_failure(t, remote, server_name, &e, &seen, ca_pem)),
        Ok(Ok(tls)) => tls,
    };
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Some(format!(
            "{remote} speaks TLS but not HTTP/2 (it chose no ALPN h2): it is not the northbound API ({PORTS})"
        ));
    }
    // TLS 1.3: the gateway judges the client certificate after the client's side of the
    // handshake is done; a refusal arrives as an alert on the first read.
    if tls.write_all(H2_PREFACE).await.is_ok() {
        let mut buf = [0u8; 64];
        if let Ok(Err(e)) = tokio::time::timeout(CONNECT_TIMEOUT, tls.read(&mut buf)).await {
            return Some(tls_failure(t, remote, server_name, &e, &seen, ca_pem));
        }
    }
    None
}

fn roots(ca_pem: &[u8]) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let mut n = 0;
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        let c = c.map_err(|e| format!("not PEM: {e}"))?;
        roots
            .add(c)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
        n += 1;
    }
    if n == 0 {
        return Err("no CERTIFICATE block in it".into());
    }
    Ok(roots)
}

/// A failed handshake (or the alert after it) in words.
fn tls_failure(
    t: &Target,
    remote: SocketAddr,
    server_name: &str,
    e: &std::io::Error,
    seen: &tether_runtime::tls::RecordingVerifier,
    ca_pem: &[u8],
) -> String {
    let rustls_err = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    let ca = t.ca.display();
    match rustls_err {
        Some(rustls::Error::InvalidCertificate(c)) => {
            let facts = seen.presented().map(|d| Facts::of(&d));
            match c {
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    let names = facts
                        .as_ref()
                        .map(|f| f.names.join(", "))
                        .unwrap_or_default();
                    let first = facts
                        .as_ref()
                        .and_then(|f| f.names.first().cloned())
                        .unwrap_or_else(|| "<name>".into());
                    format!(
                        "the gateway's certificate is not valid for the name {server_name:?}: it names {}. Connect by one of those names, or keep the address and pass --server-name {first}",
                        if names.is_empty() {
                            "nothing".into()
                        } else {
                            names
                        }
                    )
                }
                CertificateError::UnknownIssuer
                | CertificateError::BadSignature
                | CertificateError::InvalidPurpose => {
                    let issuer = facts
                        .as_ref()
                        .map(|f| f.issuer.clone())
                        .unwrap_or_else(|| "an unknown issuer".into());
                    format!(
                        "the gateway's certificate is not trusted: it was issued by \"{issuer}\", and the CA bundle {ca} (--ca) holds {}. Pass the CA that issued the gateway's certificate (`tether-gateway pki init` writes it as ca.pem; `tether-gateway dev` as .tether/pki/ca.pem)",
                        ca_subjects(ca_pem)
                    )
                }
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => format!(
                    "the gateway's certificate is outside its validity period ({}); is this machine's clock right? The gateway needs a new certificate (`tether-gateway pki issue-server`) otherwise",
                    facts
                        .as_ref()
                        .map(|f| f.validity.clone())
                        .unwrap_or_else(|| c.to_string())
                ),
                other => format!("the gateway's certificate was refused: {other}"),
            }
        }
        Some(rustls::Error::AlertReceived(alert)) => match alert {
            AlertDescription::NoApplicationProtocol => format!(
                "{remote} speaks TLS but not HTTP/2 gRPC (it refused ALPN h2): this looks like the gateway's tunnel port, not its northbound API ({PORTS})"
            ),
            AlertDescription::CertificateRequired => {
                "the gateway wants a client certificate: pass --cert and --key (`tether-gateway pki issue-client <name>` writes them), or --token for a gateway with [auth] keys".to_owned()
            }
            AlertDescription::CertificateRevoked => format!(
                "the gateway refused the client certificate {} as revoked: issue a new one (`tether-gateway pki issue-client <name>`)",
                t.cert.display()
            ),
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::AccessDenied
            | AlertDescription::CertificateExpired => format!(
                "the gateway refused the client certificate {} ({alert:?}): is it issued by the gateway's CA (`tether-gateway pki issue-client <name>`), unexpired and not revoked?",
                if t.cert.as_os_str().is_empty() {
                    "(none given)".into()
                } else {
                    t.cert.display().to_string()
                }
            ),
            other => format!("the gateway ended the TLS handshake with the alert {other:?}"),
        },
        Some(rustls::Error::InvalidMessage(_))
        | Some(rustls::Error::InappropriateMessage { .. }) => {
            format!(
                "{remote} does not speak TLS (its answer is not a TLS handshake): is this the ops port or another service? ({PORTS})"
            )
        }
        Some(other) => format!("TLS with {remote} failed: {other}"),
        None if matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
        ) =>
        {
            format!(
                "{remote} closed the connection during the TLS handshake: it is not a Tether gateway's northbound API, or it refused this client ({PORTS})"
            )
        }
        None => format!("TLS with {remote} failed: {e}"),
    }
}

/// What the diagnosis shows of a certificate.
struct Facts {
    names: Vec<String>,
    issuer: String,
    validity: String,
}

impl Facts {
    fn of(der: &[u8]) -> Facts {
        let Ok((_, x)) = x509_parser::parse_x509_certificate(der) else {
            return Facts {
                names: Vec::new(),
                issuer: "(unparseable certificate)".into(),
                validity: String::new(),
            };
        };
        let mut names = Vec::new();
        if let Ok(Some(san)) = x.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => names.push(d.to_string()),
                    x509_parser::extensions::GeneralName::IPAddress(b) => {
                        if let Ok(a) = <[u8; 4]>::try_from(*b) {
                            names.push(std::net::IpAddr::from(a).to_string());
                        } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                            names.push(std::net::IpAddr::from(a).to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        let v = x.validity();
        Facts {
            names,
            issuer: x.issuer().to_string(),
            validity: format!(
                "valid from {} until {}",
                v.not_before
                    .to_rfc2822()
                    .unwrap_or_else(|_| v.not_before.to_string()),
                v.not_after
                    .to_rfc2822()
                    .unwrap_or_else(|_| v.not_after.to_string())
            ),
        }
    }
}

fn ca_subjects(ca_pem: &[u8]) -> String {
    let names: Vec<String> = CertificateDer::pem_slice_iter(ca_pem)
        .filter_map(Result::ok)
        .map(|der| {
            x509_parser::parse_x509_certificate(der.as_ref())
                .map(|(_, c)| format!("\"{}\"", c.subject()))
                .unwrap_or_else(|_| "(a certificate that does not parse)".into())
        })
        .collect();
    names.join(" and ")
}
