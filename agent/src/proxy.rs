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

use crate::config::{ProxyConfig, redact_url as redacted};

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
    ) -> Result<Option<Proxy>, String> {
        let var = |a: &str, b: &str| env(a).or_else(|| env(b)).filter(|v| !v.trim().is_empty());
        let (url, source) = match &cfg.url {
            Some(u) => (u.clone(), "proxy.url".to_owned()),
            None => match (env("HTTPS_PROXY"), env("https_proxy")) {
                (Some(u), _) if !u.trim().is_empty() => (u, "HTTPS_PROXY".into()),
                (_, Some(u)) if !u.trim().is_empty() => (u, "https_proxy".into()),
                _ => return Ok(None),
            },
        };
        let no_proxy = cfg
            .no_proxy
            .clone()
            .or_else(|| var("NO_PROXY", "no_proxy"))
            .unwrap_or_default();
        let url = url.trim();
        let rest = if let Some(r) = url.strip_prefix("http://") {
            r
        } else if url.contains("://") {
            return Err(format!(
                "{source}: {} is not an http:// proxy (the agent speaks plain HTTP CONNECT to \
                 its proxy; the tunnel inside is TLS)",
                redacted(url)
            ));
        } else {
            url
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (host, port) = match crate::config::split_host_port(hostport) {
            Some((h, p)) => (h.to_owned(), p),
            None if !hostport.is_empty() && !hostport.contains(':') => (hostport.to_owned(), 80),
            None => {
                return Err(format!(
                    "{source}: {} has no valid host:port",
                    redacted(url)
                ));
            }
        };
        let from_url = userinfo.map(|u| match u.split_once(':') {
            Some((user, pass)) => (percent_decode(user), percent_decode(pass)),
            None => (percent_decode(u), String::new()),
        });
        let creds = match (&cfg.username, &cfg.password) {
            (Some(u), p) => Some((u.clone(), p.clone().unwrap_or_default())),
            (None, Some(_)) => {
                return Err("proxy.password is set without proxy.username".into());
            }
            (None, None) => from_url,
        };
        let auth = creds.map(|(u, p)| basic(&u, &p));
        Ok(Some(Proxy {
            host,
            port,
            auth,
            no_proxy: no_proxy
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect(),
        }))
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
    pub async fn connect(&self, target: &str) -> Result<TokioIo<hyper::upgrade::Upgraded>, String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("proxy {self}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("proxy {self}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let mut req = http::Request::connect(target)
            .header(http::header::HOST, target)
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("CONNECT {target}: {e}"))?;
        if let Some(auth) = &self.auth {
            let value = http::HeaderValue::from_str(auth)
                .map_err(|_| "proxy credentials are not valid header text".to_owned())?;
            req.headers_mut()
                .insert(http::header::PROXY_AUTHORIZATION, value);
        }
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("proxy {self}: CONNECT {target}: {e}"))?;
        match resp.status() {
            s if s.is_success() => {}
            // 407 is the standard answer; some proxies (tinyproxy) answer wrong credentials
            // with 401 instead.
            http::StatusCode::PROXY_AUTHENTICATION_REQUIRED | http::StatusCode::UNAUTHORIZED => {
                let what = if self.auth.is_some() {
                    "the proxy refused the credentials (check proxy.username and proxy.password, \
                     or the credentials in the URL)"
                } else {
                    "set proxy.username and proxy.password, or credentials in the URL"
                };
                return Err(format!(
                    "proxy {self} refused CONNECT {target}: {} proxy authentication required ({what})",
                    resp.status().as_u16()
                ));
            }
            s => return Err(format!("proxy {self} refused CONNECT {target}: {s}")),
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| format!("proxy {self}: CONNECT {target}: {e}"))?;
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

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
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
        let e = Proxy::from_config(&cfg(Some("https://u:pw@p:443")), |_| None).unwrap_err();
        assert!(
            e.contains("proxy.url") && e.contains("not an http:// proxy"),
            "{e}"
        );
        assert!(!e.contains("pw"), "{e}");
        let e = Proxy::from_config(&cfg(Some("http://u:pw@p:notaport")), |_| None).unwrap_err();
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
