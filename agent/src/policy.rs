//! What the cluster's operator lets the control plane reach through the data-plane commands:
//! the Secrets Manager secrets `secret.sync` may read (`[secrets]`) and the destinations the
//! workloads of an environment may send to (`[environments]`).
//!
//! A leaf like [`crate::config`]: data, parsing and matching, imported by `config` and by the
//! executors, importing neither. The control plane cannot change any of it: it lives in the
//! agent's configuration, in the customer's cluster.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

// === secret patterns ===

/// The prefix that makes a secret id, or a pattern, an ARN.
const ARN_PREFIX: &str = "arn:";

/// Longest pattern accepted: Secrets Manager's own limit on a secret id.
const MAX_PATTERN: usize = 2048;

/// One entry of `secrets.allow`: a pattern of Secrets Manager secret **names**, or of secret
/// **ARNs** when it starts with `arn:`.
///
/// Semantics, exactly: `*` matches any run of characters, also none, except `:`; `?` matches
/// exactly one character except `:`; every other character matches itself, case-sensitively;
/// the pattern must match the whole id. Wildcards never cross `:`, so in an ARN they stay
/// within one segment, as in IAM policies (`…:secret:tether/apps/*` cannot reach another
/// account or region through the name). Within a name they do cross `/`: `tether/apps/*`
/// matches `tether/apps/web/db`.
///
/// A name pattern matches only ids given as a name, which Secrets Manager looks up in the
/// agent's own account and region; an ARN pattern matches only ids given as an ARN, which may
/// name a secret of another account. So `tether/apps/*` does not let a command name
/// `arn:aws:secretsmanager:…:secret:tether/apps/db-AbCdEf`, whose account could be anyone's:
/// list an ARN pattern for that form too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretPattern(String);

impl SecretPattern {
    /// Whether this is an ARN pattern.
    pub fn is_arn(&self) -> bool {
        self.0.starts_with(ARN_PREFIX)
    }

    /// Whether `secret_id` (a name or an ARN, as a `secret.sync` payload gives it) matches.
    pub fn matches(&self, secret_id: &str) -> bool {
        if self.is_arn() != secret_id.starts_with(ARN_PREFIX) {
            return false;
        }
        let (mut pat, mut id) = (self.0.split(':'), secret_id.split(':'));
        loop {
            match (pat.next(), id.next()) {
                (Some(p), Some(s)) if segment_matches(p.as_bytes(), s.as_bytes()) => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

/// Wildcard match of one `:`-free segment: `*` any run, `?` one character. Greedy with one
/// backtracking point (the last `*`), which is exact for these two wildcards and linear in
/// practice.
fn segment_matches(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        match pat.get(p) {
            Some(b'*') => {
                star = Some((p, i));
                p += 1;
            }
            Some(&c) if c == b'?' || c == s[i] => {
                p += 1;
                i += 1;
            }
            _ => match star {
                // The last `*` takes one more character and the rest is tried again.
                Some((sp, si)) => {
                    star = Some((sp, si + 1));
                    p = sp + 1;
                    i = si + 1;
                }
                None => return false,
            },
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

impl FromStr for SecretPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > MAX_PATTERN {
            return Err(format!("{s:?}: a pattern is 1 to {MAX_PATTERN} characters"));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || "/_+=.@-:*?".contains(c);
        if let Some(c) = s.chars().find(|&c| !allowed(c)) {
            return Err(format!(
                "{s:?}: {c:?} cannot appear in a secret name or ARN; a pattern has letters, digits, \
                 /_+=.@- (a name), ':' (an ARN) and the wildcards * and ?"
            ));
        }
        if s.starts_with(ARN_PREFIX) {
            let seg: Vec<&str> = s.split(':').collect();
            let shape = seg.len() == 7
                && seg[2] == "secretsmanager"
                && seg[5] == "secret"
                && seg.iter().all(|x| !x.is_empty());
            if !shape {
                return Err(format!(
                    "{s:?}: an ARN pattern is arn:<partition>:secretsmanager:<region>:<account>:secret:<name> \
                     (wildcards allowed within a segment, e.g. \
                     arn:aws:secretsmanager:eu-west-1:123456789012:secret:tether/apps/*)"
                ));
            }
        } else if s.contains(':') {
            return Err(format!(
                "{s:?}: a secret name cannot contain ':'; an ARN pattern starts with arn:"
            ));
        }
        Ok(SecretPattern(s.to_owned()))
    }
}

impl fmt::Display for SecretPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for SecretPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

// === egress ===

/// `environments.egress`: who decides where an environment's workloads may send to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// The command decides (`environment.create`'s `egress`, default `allow`: no egress policy).
    #[default]
    Allow,
    /// Every environment denies egress except to the cluster's DNS and the listed destinations,
    /// and no command can loosen it.
    Deny,
}

impl fmt::Display for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Egress::Allow => "allow",
            Egress::Deny => "deny",
        })
    }
}

/// The protocol of a NetworkPolicy port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP (the default when ports are given).
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

/// A network in CIDR form with no host bits set (`10.0.0.0/16`, `fd00::/8`), as a NetworkPolicy
/// `ipBlock` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let net: IpNet = s
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR such as 10.0.0.0/16 or fd00::/8"))?;
        if net.trunc() != net {
            return Err(format!(
                "{s:?} has host bits set: did you mean {}?",
                net.trunc()
            ));
        }
        Ok(Cidr(net))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One destination an environment's workloads may send to: `cidr`, and `ports` of `protocol`.
/// No `ports` and no `protocol`: every port and protocol; `protocol` alone: every port of it;
/// `ports` without `protocol`: those TCP ports.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    /// Destination network.
    pub cidr: Cidr,
    /// Destination ports (1–65535); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// `TCP` (default with ports), `UDP` or `SCTP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

/// What traffic a rule admits to its network.
#[derive(Debug, PartialEq, Eq)]
enum Traffic {
    All,
    Protocol(Protocol),
    Ports(Protocol, BTreeSet<u16>),
}

impl EgressRule {
    fn traffic(&self) -> Traffic {
        match (self.ports.is_empty(), self.protocol) {
            (true, None) => Traffic::All,
            (true, Some(p)) => Traffic::Protocol(p),
            (false, p) => {
                Traffic::Ports(p.unwrap_or_default(), self.ports.iter().copied().collect())
            }
        }
    }

    /// Checks what serde cannot: ports are 1–65535. The error says what is wrong with the
    /// rule; the caller names where it is.
    pub fn check(&self) -> Result<(), String> {
        if self.ports.contains(&0) {
            return Err("port 0 is not a port: ports are 1 to 65535".into());
        }
        Ok(())
    }

    /// Whether everything this rule admits is also admitted by `bound`: its network inside
    /// `bound`'s, its traffic a subset of `bound`'s.
    pub fn within(&self, bound: &EgressRule) -> bool {
        if !bound.cidr.0.contains(&self.cidr.0) {
            return false;
        }
        match (bound.traffic(), self.traffic()) {
            (Traffic::All, _) => true,
            (Traffic::Protocol(b), Traffic::Protocol(s) | Traffic::Ports(s, _)) => b == s,
            (Traffic::Ports(b, bp), Traffic::Ports(s, sp)) => b == s && sp.is_subset(&bp),
            _ => false,
        }
    }

    /// Whether this rule is within one of `bounds`.
    pub fn within_any(&self, bounds: &[EgressRule]) -> bool {
        bounds.iter().any(|b| self.within(b))
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.traffic() {
            Traffic::All => write!(f, "{} (all ports)", self.cidr),
            Traffic::Protocol(p) => write!(f, "{} ({p:?}, all ports)", self.cidr),
            Traffic::Ports(p, ports) => {
                let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
                write!(f, "{} ({p:?} {})", self.cidr, ports.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> SecretPattern {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn name_patterns_match_whole_names_and_cross_slashes() {
        let p = pat("tether/apps/*");
        assert!(p.matches("tether/apps/db"));
        assert!(p.matches("tether/apps/web/db"));
        assert!(p.matches("tether/apps/"));
        assert!(!p.matches("tether/app"));
        assert!(!p.matches("other/tether/apps/db"), "anchored at the start");
        assert!(!p.matches("Tether/apps/db"), "case-sensitive");
        let exact = pat("prod/db");
        assert!(exact.matches("prod/db"));
        assert!(!exact.matches("prod/db2") && !exact.matches("prod/d"));
        let q = pat("db-??");
        assert!(q.matches("db-ab") && !q.matches("db-a") && !q.matches("db-abc"));
        let mid = pat("a*b*c");
        assert!(mid.matches("abc") && mid.matches("aXbYbZc") && !mid.matches("aXbY"));
        assert!(pat("*").matches("anything/at.all"));
    }

    #[test]
    fn a_name_pattern_never_matches_an_arn_nor_an_arn_pattern_a_name() {
        let arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:tether/apps/db-AbCdEf";
        assert!(!pat("*").matches(arn));
        assert!(!pat("tether/apps/*").matches(arn));
        let p = pat("arn:aws:secretsmanager:eu-west-1:123456789012:secret:tether/apps/*");
        assert!(p.matches(arn));
        assert!(!p.matches("tether/apps/db"));
        // A partial ARN (no random suffix) is an ARN too.
        assert!(p.matches("arn:aws:secretsmanager:eu-west-1:123456789012:secret:tether/apps/db"));
    }

    #[test]
    fn wildcards_in_an_arn_stay_within_their_segment() {
        let p = pat("arn:aws:secretsmanager:eu-west-1:123456789012:secret:apps/*");
        // Another account, another region, another service: refused.
        for other in [
            "arn:aws:secretsmanager:eu-west-1:999999999999:secret:apps/db-AbCdEf",
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:apps/db-AbCdEf",
            "arn:aws:ssm:eu-west-1:123456789012:secret:apps/db",
            "arn:aws:secretsmanager:eu-west-1:123456789012:secret:apps/db:extra",
        ] {
            assert!(!p.matches(other), "{other}");
        }
        let any_region = pat("arn:aws:secretsmanager:*:123456789012:secret:apps/db-??????");
        assert!(
            any_region
                .matches("arn:aws:secretsmanager:us-east-1:123456789012:secret:apps/db-AbCdEf")
        );
        assert!(
            !any_region.matches(
                "arn:aws:secretsmanager:us-east-1:123456789012:secret:apps/db-admin-AbCdEf"
            )
        );
    }

    #[test]
    fn malformed_patterns_are_refused_saying_why() {
        for (bad, why) in [
            ("", "1 to 2048"),
            ("apps/ db", "cannot appear"),
            ("apps/[a-z]", "cannot appear"),
            ("apps:db", "cannot contain ':'"),
            (
                "arn:aws:secretsmanager:*:secret:apps/*",
                "an ARN pattern is",
            ),
            ("arn:aws:ssm:eu-west-1:1:secret:x", "an ARN pattern is"),
            (
                "arn:aws:secretsmanager:eu-west-1:1:parameter:x",
                "an ARN pattern is",
            ),
            (
                "arn:aws:secretsmanager:eu-west-1:1:secret:",
                "an ARN pattern is",
            ),
        ] {
            let e = bad.parse::<SecretPattern>().unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    /// The matcher against a regex built from the documented semantics, on random inputs.
    #[test]
    fn matching_agrees_with_the_documented_semantics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        let alphabet = b"ab/:*?";
        let ids = b"ab/:";
        for _ in 0..20_000 {
            let p: String = (0..rng.random_range(0..8))
                .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
                .collect();
            let s: String = (0..rng.random_range(0..8))
                .map(|_| ids[rng.random_range(0..ids.len())] as char)
                .collect();
            // The regex: `*` → `[^:]*`, `?` → `[^:]`, the rest literal, anchored.
            let re: String = p
                .chars()
                .map(|c| match c {
                    '*' => "[^:]*".to_owned(),
                    '?' => "[^:]".to_owned(),
                    c => c.to_string(),
                })
                .collect();
            let want = simple_regex_match(&re, &s);
            let got = SecretPattern(p.clone()).matches(&s);
            assert_eq!(got, want, "pattern {p:?} id {s:?}");
        }
    }

    /// A tiny backtracking matcher for the regexes above (literals, `[^:]`, `[^:]*`), so the
    /// oracle shares no code with the matcher under test.
    fn simple_regex_match(re: &str, s: &str) -> bool {
        fn go(re: &[u8], s: &[u8]) -> bool {
            if re.is_empty() {
                return s.is_empty();
            }
            if re.starts_with(b"[^:]*") {
                let rest = &re[5..];
                let mut i = 0;
                loop {
                    if go(rest, &s[i..]) {
                        return true;
                    }
                    if i == s.len() || s[i] == b':' {
                        return false;
                    }
                    i += 1;
                }
            }
            if re.starts_with(b"[^:]") {
                return !s.is_empty() && s[0] != b':' && go(&re[4..], &s[1..]);
            }
            !s.is_empty() && s[0] == re[0] && go(&re[1..], &s[1..])
        }
        go(re.as_bytes(), s.as_bytes())
    }

    fn rule(cidr: &str, ports: &[u16], protocol: Option<Protocol>) -> EgressRule {
        EgressRule {
            cidr: cidr.parse().unwrap(),
            ports: ports.to_vec(),
            protocol,
        }
    }

    #[test]
    fn cidrs_must_be_networks() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert!("fd00::/8".parse::<Cidr>().is_ok());
        let e = "10.1.2.3/8".parse::<Cidr>().unwrap_err();
        assert!(e.contains("did you mean 10.0.0.0/8"), "{e}");
        assert!(
            "10.1.2.3"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("not a CIDR")
        );
    }

    #[test]
    fn a_rule_is_within_a_bound_only_when_its_network_and_traffic_are() {
        use Protocol::*;
        let db = rule("10.0.0.0/16", &[5432, 6432], None);
        assert!(rule("10.0.1.0/24", &[5432], None).within(&db));
        assert!(rule("10.0.1.0/24", &[5432], Some(Tcp)).within(&db));
        assert!(
            !rule("10.0.1.0/24", &[5432], Some(Udp)).within(&db),
            "other protocol"
        );
        assert!(
            !rule("10.0.1.0/24", &[5432, 22], None).within(&db),
            "a port more"
        );
        assert!(!rule("10.0.1.0/24", &[], None).within(&db), "every port");
        assert!(
            !rule("10.0.1.0/24", &[], Some(Tcp)).within(&db),
            "every TCP port"
        );
        assert!(
            !rule("10.0.0.0/8", &[5432], None).within(&db),
            "a wider network"
        );
        assert!(
            !rule("10.1.0.0/16", &[5432], None).within(&db),
            "another network"
        );
        assert!(
            !rule("fd00::/8", &[5432], None).within(&db),
            "another family"
        );
        let all = rule("10.0.0.0/8", &[], None);
        assert!(rule("10.2.0.0/16", &[], Some(Udp)).within(&all));
        assert!(rule("10.2.0.0/16", &[1], None).within(&all));
        let udp = rule("10.0.0.0/8", &[], Some(Udp));
        assert!(rule("10.2.0.0/16", &[53], Some(Udp)).within(&udp));
        assert!(!rule("10.2.0.0/16", &[53], None).within(&udp));
        assert!(!rule("10.2.0.0/16", &[], None).within(&udp));
        assert!(rule("10.0.3.0/24", &[6432], None).within_any(&[udp, db]));
        assert!(rule("0.0.0.0/0", &[0], None).check().is_err());
    }
}
