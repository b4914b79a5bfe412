//! Transport layer: reaching the gateway through an HTTP CONNECT proxy (TCP fallback only: UDP
//! cannot be proxied).
//!
//! The proxy comes from `proxy.url`, else `HTTPS_PROXY` / `https_proxy`; `proxy.no_proxy`, else
//! `NO_PROXY` / `no_proxy`, lists hosts reached directly. Credentials come from
//! `proxy.username` / `proxy.password` or the URL's user info, are sent as
//! `Proxy-Authorization: Basic`, and never appear in logs or errors ([`Proxy`]'s `Display` and
//! `Debug` show the proxy without them). The CONNECT exchange itself is hyper's HTTP/1.1 client
//! with an upgrade, not hand-written parsing.

use std::net::IpAddr;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::config::{ProxyConfig, ProxyConfigError, ProxySettings};

/// Why CONNECT through the proxy failed. Never shows credentials.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The proxy could not be reached.
    #[error("proxy {proxy}: {source}")]
    Connect {
        /// The proxy, without credentials.
        proxy: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The HTTP exchange with the proxy failed.
    #[error("proxy {proxy}: {source}")]
    Http {
        /// The proxy, without credentials.
        proxy: String,
        /// What hyper said.
        source: hyper::Error,
    },
    /// The CONNECT request could not be built (the target is not an authority).
    #[error("CONNECT {target}: {source}")]
    Request {
        /// The target, `host:port`.
        target: String,
        /// What http said.
        source: http::Error,
    },
    /// The credentials cannot travel in a header.
    #[error("proxy credentials are not valid header text")]
    Credentials,
    /// The exchange failed after the request was sent (or the upgrade to a tunnel did).
    #[error("proxy {proxy}: CONNECT {target}: {source}")]
    Exchange {
        /// The proxy, without credentials.
        proxy: String,
        /// The target, `host:port`.
        target: String,
        /// What hyper said.
        source: hyper::Error,
    },
    /// The proxy asks for credentials, or refused the ones sent (401 or 407).
    #[error(
        "proxy {proxy} refused CONNECT {target}: {status} proxy authentication required ({})",
        if *.sent_credentials {
            "the proxy refused the credentials (check proxy.username and proxy.password, or the credentials in the URL)"
        } else {
            "set proxy.username and proxy.password, or credentials in the URL"
        }
    )]
    AuthenticationRequired {
        /// The proxy, without credentials.
        proxy: String,
        /// The target, `host:port`.
        target: String,
        /// 401 or 407.
        status: u16,
        /// Whether credentials were sent.
        sent_credentials: bool,
    },
    /// The proxy refused the CONNECT.
    #[error("proxy {proxy} refused CONNECT {target}: {status}")]
    Refused {
        /// The proxy, without credentials.
        proxy: String,
        /// The target, `host:port`.
        target: String,
        /// Its answer.
        status: http::StatusCode,
    },
}

/// A proxy to CONNECT through.
#[derive(Clone)]
pub struct Proxy {
    host: String,
    port: u16,
    auth: Option<String>,
    no_proxy: Vec<String>,
}

impl std::fmt::Display for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}:{}", self.host, self.port)?;
        if self.auth.is_some() {
            f.write_str(" (with credentials)")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("proxy", &self.to_string())
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

impl Proxy {
    /// The proxy configured in `cfg`, else in the environment (`env` gives a variable's
    /// value); `None` when there is none. Errors name the key or variable, never credentials.
    pub fn from_config(
        cfg: &ProxyConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Proxy>, ProxyConfigError> {
        Ok(cfg.resolve(env)?.map(Proxy::new))
    }

    /// A proxy as configured.
    pub fn new(settings: ProxySettings) -> Proxy {
        Proxy {
            host: settings.host,
            port: settings.port,
            auth: settings.credentials.map(|(u, p)| basic(&u, &p)),
            no_proxy: settings.no_proxy,
        }
    }

    /// True when `host` is to be reached through this proxy (not listed in `no_proxy`).
    pub fn applies_to(&self, host: &str) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let ip: Option<IpAddr> = host.parse().ok();
        !self.no_proxy.iter().any(|entry| {
            if entry == "*" {
                return true;
            }
            if let (Some(ip), Some((net, bits))) = (ip, entry.split_once('/')) {
                return in_cidr(ip, net, bits);
            }
            let entry = entry.trim_start_matches("*.").trim_start_matches('.');
            host == entry || host.ends_with(&format!(".{entry}"))
        })
    }

    /// Opens a TCP connection to the proxy and asks it to CONNECT to `target` (`host:port`).
    pub async fn connect(
        &self,
        target: &str,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, ProxyError> {
        let proxy = || self.to_string();
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| ProxyError::Connect {
                proxy: proxy(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|source| ProxyError::Http {
                proxy: proxy(),
                source,
            })?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let mut req = http::Request::connect(target)
            .header(http::header::HOST, target)
            .body(Empty::<Bytes>::new())
            .map_err(|source| ProxyError::Request {
                target: target.to_owned(),
                source,
            })?;
        if let Some(auth) = &self.auth {
            let value = http::HeaderValue::from_str(auth).map_err(|_| ProxyError::Credentials)?;
            req.headers_mut()
                .insert(http::header::PROXY_AUTHORIZATION, value);
        }
        let exchange = |source| ProxyError::Exchange {
            proxy: proxy(),
            target: target.to_owned(),
            source,
        };
        let resp = sender.send_request(req).await.map_err(exchange)?;
        match resp.status() {
            s if s.is_success() => {}
            // 407 is the standard answer; some proxies (tinyproxy) answer wrong credentials
            // with 401 instead.
            s @ (http::StatusCode::PROXY_AUTHENTICATION_REQUIRED
            | http::StatusCode::UNAUTHORIZED) => {
                return Err(ProxyError::AuthenticationRequired {
                    proxy: proxy(),
                    target: target.to_owned(),
                    status: s.as_u16(),
                    sent_credentials: self.auth.is_some(),
                });
            }
            status => {
                return Err(ProxyError::Refused {
                    proxy: proxy(),
                    target: target.to_owned(),
                    status,
                });
            }
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(exchange)?;
        Ok(TokioIo::new(upgraded))
    }
}

fn in_cidr(ip: IpAddr, net: &str, bits: &str) -> bool {
    let (Ok(net), Ok(bits)) = (net.parse::<IpAddr>(), bits.parse::<u32>()) else {
        return false;
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// `Basic base64(user:pass)`.
fn basic(user: &str, pass: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: Option<&str>) -> ProxyConfig {
        ProxyConfig {
            url: url.map(str::to_owned),
            ..Default::default()
        }
    }

    #[test]
    fn config_wins_over_environment_and_credentials_never_show() {
        let env = |k: &str| match k {
            "HTTPS_PROXY" => Some("http://env-proxy:3128".to_owned()),
            "NO_PROXY" => Some(".internal, 10.0.0.0/8".to_owned()),
            _ => None,
        };
        let p = Proxy::from_config(&cfg(Some("http://al%40ice:s3cret@proxy.corp:8080")), env)
            .unwrap()
            .unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 8080));
        assert_eq!(p.auth.as_deref(), Some(basic("al@ice", "s3cret").as_str()));
        let shown = format!("{p} {p:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("al@ice"),
            "{shown}"
        );
        assert!(!p.applies_to("gw.internal") && !p.applies_to("10.1.2.3"));
        assert!(p.applies_to("gw.example.com") && p.applies_to("192.168.1.1"));

        let from_env = Proxy::from_config(&cfg(None), env).unwrap().unwrap();
        assert_eq!(from_env.host, "env-proxy");
        assert!(Proxy::from_config(&cfg(None), |_| None).unwrap().is_none());
    }

    #[test]
    fn bad_proxies_are_named_without_their_credentials() {
        let e = Proxy::from_config(&cfg(Some("https://u:pw@p:443")), |_| None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("proxy.url") && e.contains("not an http:// proxy"),
            "{e}"
        );
        assert!(!e.contains("pw"), "{e}");
        let e = Proxy::from_config(&cfg(Some("http://u:pw@p:notaport")), |_| None)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("pw") && e.contains("host:port"), "{e}");
    }

    #[test]
    fn basic_auth_is_standard_base64() {
        assert_eq!(
            basic("Aladdin", "open sesame"),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(basic("a", ""), "Basic YTo=");
    }

    #[test]
    fn no_proxy_forms() {
        let p = Proxy::from_config(
            &ProxyConfig {
                url: Some("http://p:1".into()),
                no_proxy: Some("example.com,*.svc,::1/128".into()),
                ..Default::default()
            },
            |_| None,
        )
        .unwrap()
        .unwrap();
        assert!(!p.applies_to("example.com") && !p.applies_to("a.example.com"));
        assert!(!p.applies_to("x.svc") && !p.applies_to("[::1]"));
        assert!(p.applies_to("notexample.com"));
    }
}
