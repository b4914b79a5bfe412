//! Config loading: one merge point for file, then `TETHER_*` environment, then flags.
//!
//! A binary describes its config as a serde struct (`deny_unknown_fields`) plus the list of its
//! keys ([`Keys`]). Every key `a.b_c` can be set in the TOML file, as `TETHER_A_B_C` in the
//! environment, and as `--set a.b_c=VALUE` on the command line. Environment and flag values are
//! read as TOML values when they parse as one (`true`, `5`, `["a", "b"]`, `{ k = "v" }`) and as
//! plain strings otherwise (`0.0.0.0:7443`, `10s`). Errors name the key and where it came from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// The exit code for invalid configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Prefix of environment variables that set config keys.
pub const ENV_PREFIX: &str = "TETHER_";

/// Why a config could not be loaded. Always the operator's to fix; retrying does not help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A `--set` flag is not `key=value`.
    #[error("--set {0:?} is not of the form key=value")]
    SetForm(String),
    /// A key that does not exist was set through the environment or a flag.
    #[error("unknown config key {key:?} (from {origin})")]
    UnknownKey {
        /// The key.
        key: String,
        /// Where it came from.
        origin: String,
    },
    /// A key has a value of the wrong type or form, or is unknown in the file.
    #[error("config key {key}{origin}: {message}")]
    Invalid {
        /// The key, dotted.
        key: String,
        /// ` (from TETHER_X)` or empty.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// An invalid value for `key`, for `validate()` implementations.
    pub fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_owned(),
            origin: String::new(),
            message: message.into(),
        }
    }
}

/// The keys a config has, dotted (`tunnel.listen`). A key whose value is a table (`labels`) is
/// listed once and set as a whole from the environment or flags.
pub type Keys = &'static [&'static str];

/// Semantic checks that serde cannot express.
pub trait Validate {
    /// Checks the values; the error names the key.
    fn validate(&self) -> Result<(), ConfigError>;
}

/// The env var name for a key: `tunnel.heartbeat_interval` → `TETHER_TUNNEL_HEARTBEAT_INTERVAL`.
pub fn env_name(key: &str) -> String {
    let mut s = String::from(ENV_PREFIX);
    s.extend(key.chars().map(|c| {
        if c == '.' || c == '-' {
            '_'
        } else {
            c.to_ascii_uppercase()
        }
    }));
    s
}

/// Loads a config: `file` (optional), then `env` (pass `std::env::vars()`), then `sets`
/// (`key=value` strings from `--set`), then `validate()`.
pub fn load<T: DeserializeOwned + Validate>(
    keys: Keys,
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    sets: &[String],
) -> Result<T, ConfigError> {
    let mut table = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            text.parse::<toml::Table>()
                .map_err(|e| ConfigError::Syntax {
                    path: path.to_owned(),
                    message: e.to_string().trim().replace('\n', " "),
                })?
        }
        None => toml::Table::new(),
    };
    let mut origins: BTreeMap<String, String> = BTreeMap::new();
    let by_env: BTreeMap<String, &str> = keys.iter().map(|k| (env_name(k), *k)).collect();
    for (name, value) in env {
        if !name.starts_with(ENV_PREFIX) {
            continue;
        }
        match by_env.get(&name) {
            Some(key) => {
                set_path(&mut table, key, parse_value(&value));
                origins.insert((*key).to_owned(), format!(" (from {name})"));
            }
            // Other TETHER_* variables may belong to the other binary or to tools: not ours to
            // reject, but worth a line when it looks like a typo of one of our keys.
            None => {
                tracing::debug!(variable = %name, "ignoring environment variable that is not a config key")
            }
        }
    }
    for set in sets {
        let (key, value) = set
            .split_once('=')
            .ok_or_else(|| ConfigError::SetForm(set.clone()))?;
        let key = key.trim();
        if !keys.contains(&key) {
            return Err(ConfigError::UnknownKey {
                key: key.to_owned(),
                origin: format!("--set {set}"),
            });
        }
        set_path(&mut table, key, parse_value(value));
        origins.insert(key.to_owned(), format!(" (from --set {key}=...)"));
    }
    let value = toml::Value::Table(table);
    let cfg: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let key = e.path().to_string();
        let origin = origins.get(&key).cloned().unwrap_or_default();
        let key = if key == "." {
            "(top level)".to_owned()
        } else {
            key
        };
        // toml adds a second line ("in `section`") that repeats the key path: one line only.
        let mut message = e
            .into_inner()
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        if file.is_none() && message.starts_with("missing field") {
            message.push_str(
                ": no config file was given; pass --config <file> (or set the key with TETHER_<KEY> or --set key=value)",
            );
        }
        ConfigError::Invalid {
            key,
            origin,
            message,
        }
    })?;
    cfg.validate()?;
    Ok(cfg)
}

fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn set_path(table: &mut toml::Table, key: &str, value: toml::Value) {
    let mut parts = key.split('.').peekable();
    let mut cur = table;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            cur.insert(part.to_owned(), value);
            return;
        }
        let entry = cur
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        cur = entry.as_table_mut().expect("just made a table");
    }
}

/// Resolves `p` against `base` (the config file's directory) when it is relative.
pub fn resolve(base: Option<&Path>, p: &Path) -> PathBuf {
    match base {
        Some(b) if p.is_relative() => b.join(p),
        _ => p.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::io::Write;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[serde(default)]
        tunnel: Tunnel,
        #[serde(default)]
        labels: BTreeMap<String, String>,
    }

    #[derive(Debug, Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Tunnel {
        listen: Option<std::net::SocketAddr>,
        retries: Option<u32>,
    }

    impl Validate for Cfg {
        fn validate(&self) -> Result<(), ConfigError> {
            if self.tunnel.retries == Some(0) {
                return Err(ConfigError::invalid("tunnel.retries", "must be at least 1"));
            }
            Ok(())
        }
    }

    const KEYS: Keys = &["tunnel.listen", "tunnel.retries", "labels"];

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let f = file("[tunnel]\nlisten = \"127.0.0.1:1\"\nretries = 2\n");
        let env = [
            (
                "TETHER_TUNNEL_LISTEN".to_string(),
                "127.0.0.1:2".to_string(),
            ),
            ("TETHER_TUNNEL_RETRIES".to_string(), "3".to_string()),
            (
                "TETHER_LABELS".to_string(),
                "{ region = \"eu\" }".to_string(),
            ),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let cfg: Cfg = load(KEYS, Some(f.path()), env, &["tunnel.retries=4".into()]).unwrap();
        assert_eq!(cfg.tunnel.listen.unwrap().port(), 2);
        assert_eq!(cfg.tunnel.retries, Some(4));
        assert_eq!(cfg.labels["region"], "eu");
    }

    #[test]
    fn unknown_key_in_file_is_named() {
        let f = file("[tunnel]\nlisten = \"127.0.0.1:1\"\nlistne = 1\n");
        let err = load::<Cfg>(KEYS, Some(f.path()), [], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("tunnel") && err.contains("listne"), "{err}");
    }

    #[test]
    fn bad_value_from_env_names_key_and_variable() {
        let env = [("TETHER_TUNNEL_LISTEN".to_string(), "nope".to_string())];
        let err = load::<Cfg>(KEYS, None, env, &[]).unwrap_err().to_string();
        assert!(err.contains("tunnel.listen"), "{err}");
        assert!(err.contains("TETHER_TUNNEL_LISTEN"), "{err}");
    }

    #[test]
    fn unknown_set_key_and_bad_form_are_rejected() {
        let err = load::<Cfg>(KEYS, None, [], &["tunnel.nope=1".into()]).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownKey { .. }), "{err}");
        let err = load::<Cfg>(KEYS, None, [], &["tunnel.listen".into()]).unwrap_err();
        assert!(matches!(err, ConfigError::SetForm(_)), "{err}");
    }

    #[test]
    fn validate_runs_after_merge() {
        let err = load::<Cfg>(KEYS, None, [], &["tunnel.retries=0".into()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config key tunnel.retries: must be at least 1"
        );
    }

    #[test]
    fn env_names_are_derived_from_keys() {
        assert_eq!(
            env_name("tunnel.heartbeat_interval"),
            "TETHER_TUNNEL_HEARTBEAT_INTERVAL"
        );
    }
}
