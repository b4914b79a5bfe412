//! Agent versions: the oldest a gateway admits (`agents.min_version`) and how an agent's
//! version stands against the gateway's own (the version-skew policy in the README).
//!
//! The policy: a gateway supports agents of its own minor release and of the one before it
//! (`1.4.x` supports `1.4.*` and `1.3.*`; `0.4.x` supports `0.4.*` and `0.3.*`). Upgrade the
//! gateways first, then the agents. Agents outside that range still connect (they are
//! flagged in `Agents/List`, `tetherctl agents list` and the metrics) unless
//! `agents.min_version` refuses them at `Hello`.

use semver::Version;
use tether_api::v1::VersionSkew;

/// This gateway's version.
pub fn gateway_version() -> &'static Version {
    static V: std::sync::LazyLock<Version> = std::sync::LazyLock::new(|| {
        Version::parse(env!("CARGO_PKG_VERSION")).expect("the crate version is a semantic version")
    });
    &V
}

/// How `agent_version` stands against `gateway`.
pub fn skew(gateway: &Version, agent_version: &str) -> VersionSkew {
    let Ok(agent) = Version::parse(agent_version) else {
        return VersionSkew::Unsupported;
    };
    let minor = |v: &Version| (v.major, v.minor);
    if minor(&agent) == minor(gateway) {
        // A newer patch of the same minor release is the same feature set.
        return VersionSkew::Current;
    }
    if agent.major == gateway.major && agent.minor + 1 == gateway.minor {
        return VersionSkew::Behind;
    }
    VersionSkew::Unsupported
}

/// The stable lower-case name of a skew, for metric labels and `tetherctl`.
pub fn skew_name(s: VersionSkew) -> &'static str {
    match s {
        VersionSkew::Current => "current",
        VersionSkew::Behind => "behind",
        VersionSkew::Unsupported => "unsupported",
        VersionSkew::Unspecified => "unknown",
    }
}

/// Which agent versions this gateway admits.
#[derive(Clone, Debug, Default)]
pub struct MinVersion(Option<Version>);

impl MinVersion {
    /// From `agents.min_version` (already validated: an unparsable value admits everyone,
    /// which config loading never lets through).
    pub fn new(min: Option<&str>) -> Self {
        MinVersion(min.and_then(|v| Version::parse(v).ok()))
    }

    /// `None` when an agent announcing `agent_version` may hold a session, else the reason it
    /// may not, for its `Close` frame and log.
    pub fn refusal(&self, agent_version: &str) -> Option<String> {
        let min = self.0.as_ref()?;
        match Version::parse(agent_version) {
            Ok(v) if v >= *min => None,
            Ok(v) => Some(format!(
                "upgrade required: this agent is version {v}, and this gateway admits {min} or newer (agents.min_version); upgrade the agent (its chart's image.tag, or the tether-agent binary)"
            )),
            Err(_) => Some(format!(
                "upgrade required: this agent's version {agent_version:?} is not a semantic version, and this gateway admits {min} or newer (agents.min_version); run a released tether-agent"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_follows_the_one_minor_release_policy() {
        let gw = Version::parse("1.4.2").unwrap();
        assert_eq!(skew(&gw, "1.4.0"), VersionSkew::Current);
        assert_eq!(skew(&gw, "1.4.9"), VersionSkew::Current);
        assert_eq!(skew(&gw, "1.3.7"), VersionSkew::Behind);
        assert_eq!(skew(&gw, "1.2.0"), VersionSkew::Unsupported);
        assert_eq!(skew(&gw, "1.5.0"), VersionSkew::Unsupported);
        assert_eq!(skew(&gw, "0.4.2"), VersionSkew::Unsupported);
        assert_eq!(skew(&gw, "test"), VersionSkew::Unsupported);
        let zero = Version::parse("0.4.0").unwrap();
        assert_eq!(skew(&zero, "0.3.1"), VersionSkew::Behind);
        assert_eq!(skew(&zero, "0.2.9"), VersionSkew::Unsupported);
    }

    #[test]
    fn min_version_refuses_older_and_unparsable_agents_only() {
        let none = MinVersion::new(None);
        assert_eq!(none.refusal("0.0.1"), None);
        let min = MinVersion::new(Some("0.3.0"));
        assert_eq!(min.refusal("0.3.0"), None);
        assert_eq!(min.refusal("0.10.0"), None);
        let old = min.refusal("0.2.9").expect("0.2.9 < 0.3.0");
        assert!(
            old.contains("0.2.9") && old.contains("0.3.0") && old.contains("agents.min_version"),
            "{old}"
        );
        // A pre-release sorts before its release.
        assert!(min.refusal("0.3.0-rc.1").is_some());
        let junk = min.refusal("dev").expect("not a version");
        assert!(junk.contains("\"dev\""), "{junk}");
    }
}
