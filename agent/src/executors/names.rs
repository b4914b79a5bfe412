//! Kubernetes naming rules, checked before any API call so a bad payload fails with the field
//! and the rule instead of an API server's 422.
//!
//! The rules are Kubernetes' own (`k8s.io/apimachinery/pkg/util/validation`): DNS-1123 labels and
//! subdomains, DNS-1035 labels, qualified names and label values, environment variable names,
//! Secret data keys and resource quantities.

/// Why a value was refused: the payload field and the rule it breaks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {value:?} is not {rule}")]
pub struct Invalid {
    /// The payload field, e.g. `name` or `env.FOO`.
    pub field: String,
    /// The value refused.
    pub value: String,
    /// The rule, in words.
    pub rule: &'static str,
}

fn invalid(field: &str, value: &str, rule: &'static str) -> Invalid {
    Invalid {
        field: field.to_owned(),
        value: value.to_owned(),
        rule,
    }
}

const DNS1123_LABEL: &str = "a valid DNS-1123 label (at most 63 lowercase letters, digits and '-', \
     starting and ending with a letter or digit)";
const DNS1123_SUBDOMAIN: &str = "a valid DNS-1123 subdomain (at most 253 characters: DNS-1123 labels \
     joined by '.')";
const DNS1035_LABEL: &str = "a valid DNS-1035 label (at most 63 lowercase letters, digits and '-', \
     starting with a letter and ending with a letter or digit)";
const QUALIFIED_NAME: &str = "a valid label key (an optional DNS-1123 subdomain prefix and '/', then \
     at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit)";
const LABEL_VALUE: &str = "a valid label value (empty, or at most 63 letters, digits, '-', '_' and \
     '.', starting and ending with a letter or digit)";
const ENV_NAME: &str = "a valid environment variable name (letters, digits, '_', '-' and '.', not \
     starting with a digit)";
const SECRET_KEY: &str = "a valid Secret key (at most 253 letters, digits, '-', '_' and '.')";
const QUANTITY: &str = "a valid Kubernetes quantity (e.g. 500m, 2, 1.5, 512Mi, 4Gi)";
const IMAGE: &str = "a valid image reference (non-empty, at most 4096 characters, no whitespace)";

fn label_ok(s: &str, max: usize, first: impl Fn(u8) -> bool) -> bool {
    let b = s.as_bytes();
    let inner = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-';
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= max
        && first(b[0])
        && alnum(b[b.len() - 1])
        && b.iter().all(|&c| inner(c))
}

/// A DNS-1123 label: namespaces (environments), Services, container names.
pub fn dns1123_label(field: &str, value: &str) -> Result<(), Invalid> {
    let first = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if label_ok(value, 63, first) {
        Ok(())
    } else {
        Err(invalid(field, value, DNS1123_LABEL))
    }
}

/// A DNS-1123 subdomain: Secrets, Deployments and most object names.
pub fn dns1123_subdomain(field: &str, value: &str) -> Result<(), Invalid> {
    let first = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if value.len() <= 253 && value.split('.').all(|l| label_ok(l, 63, first)) {
        Ok(())
    } else {
        Err(invalid(field, value, DNS1123_SUBDOMAIN))
    }
}

/// A DNS-1035 label: names that become Service names (they must start with a letter).
pub fn dns1035_label(field: &str, value: &str) -> Result<(), Invalid> {
    if label_ok(value, 63, |c| c.is_ascii_lowercase()) {
        Ok(())
    } else {
        Err(invalid(field, value, DNS1035_LABEL))
    }
}

fn name_part_ok(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_alphanumeric();
    !b.is_empty()
        && b.len() <= 63
        && alnum(b[0])
        && alnum(b[b.len() - 1])
        && b.iter()
            .all(|&c| alnum(c) || c == b'-' || c == b'_' || c == b'.')
}

/// A label (or annotation) key: `[prefix/]name`.
pub fn label_key(field: &str, value: &str) -> Result<(), Invalid> {
    let ok = match value.split_once('/') {
        Some((prefix, name)) => dns1123_subdomain(field, prefix).is_ok() && name_part_ok(name),
        None => name_part_ok(value),
    };
    if ok {
        Ok(())
    } else {
        Err(invalid(field, value, QUALIFIED_NAME))
    }
}

/// A label value.
pub fn label_value(field: &str, value: &str) -> Result<(), Invalid> {
    if value.is_empty() || name_part_ok(value) {
        Ok(())
    } else {
        Err(invalid(field, value, LABEL_VALUE))
    }
}

/// A container environment variable name.
pub fn env_name(field: &str, value: &str) -> Result<(), Invalid> {
    let b = value.as_bytes();
    let ok_char = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'.';
    if !b.is_empty() && !b[0].is_ascii_digit() && b.iter().all(|&c| ok_char(c)) {
        Ok(())
    } else {
        Err(invalid(field, value, ENV_NAME))
    }
}

/// A key of a Secret's (or ConfigMap's) data.
pub fn secret_key(field: &str, value: &str) -> Result<(), Invalid> {
    let ok_char = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'.';
    if !value.is_empty()
        && value.len() <= 253
        && value != "."
        && value != ".."
        && value.bytes().all(ok_char)
    {
        Ok(())
    } else {
        Err(invalid(field, value, SECRET_KEY))
    }
}

/// A resource quantity: a decimal number with an optional SI, binary or exponent suffix.
pub fn quantity(field: &str, value: &str) -> Result<(), Invalid> {
    let digits_end = value
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || c == '.' || (i == 0 && c == '+')))
        .map_or(value.len(), |(i, _)| i);
    let (number, suffix) = value.split_at(digits_end);
    let number = number.strip_prefix('+').unwrap_or(number);
    let number_ok = !number.is_empty()
        && number.matches('.').count() <= 1
        && !number.starts_with('.')
        && !number.ends_with('.');
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .is_some_and(|e| !e.is_empty() && e.bytes().all(|c| c.is_ascii_digit()));
    if number_ok && suffix_ok {
        Ok(())
    } else {
        Err(invalid(field, value, QUANTITY))
    }
}

/// A container image reference. The registry is the judge of the rest: a reference it cannot
/// pull fails the rollout with the pull error.
pub fn image(field: &str, value: &str) -> Result<(), Invalid> {
    if !value.is_empty() && value.len() <= 4096 && !value.chars().any(char::is_whitespace) {
        Ok(())
    } else {
        Err(invalid(field, value, IMAGE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns1123_labels() {
        for ok in ["a", "team-a", "0abc", &"a".repeat(63)] {
            assert!(dns1123_label("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "Team", "-a", "a-", "a_b", "a.b", &"a".repeat(64), "ä"] {
            let e = dns1123_label("name", bad).unwrap_err();
            assert_eq!(e.field, "name");
            assert!(e.to_string().contains("DNS-1123 label"), "{e}");
        }
    }

    #[test]
    fn subdomains_and_dns1035() {
        assert!(dns1123_subdomain("n", "db.creds-1").is_ok());
        assert!(dns1123_subdomain("n", "db..x").is_err());
        assert!(dns1123_subdomain("n", &format!("{}.a", "a".repeat(252))).is_err());
        assert!(dns1035_label("n", "web").is_ok());
        assert!(dns1035_label("n", "1web").is_err());
    }

    #[test]
    fn label_keys_and_values() {
        assert!(label_key("labels", "team").is_ok());
        assert!(label_key("labels", "example.com/team_1.x").is_ok());
        assert!(label_key("labels", "Example.com/team").is_err());
        assert!(label_key("labels", "a/b/c").is_err());
        assert!(label_key("labels", "-x").is_err());
        assert!(label_value("labels.team", "").is_ok());
        assert!(label_value("labels.team", "Payments_2").is_ok());
        assert!(label_value("labels.team", "a b").is_err());
    }

    #[test]
    fn env_secret_keys_quantities_images() {
        assert!(env_name("env", "DATABASE_URL").is_ok());
        assert!(env_name("env", "1X").is_err());
        assert!(env_name("env", "A=B").is_err());
        assert!(secret_key("keys", "password").is_ok());
        assert!(secret_key("keys", "..").is_err());
        assert!(secret_key("keys", "a/b").is_err());
        for ok in ["1", "500m", "1.5", "512Mi", "4Gi", "1e3", "+2"] {
            assert!(quantity("quota.cpu", ok).is_ok(), "{ok}");
        }
        for bad in ["", "m", "1.2.3", "5 Gi", "5gb", "-1", ".5"] {
            assert!(quantity("quota.cpu", bad).is_err(), "{bad}");
        }
        assert!(image("image", "registry.example.com/app:1.2@sha256:abc").is_ok());
        assert!(image("image", "app latest").is_err());
        assert!(image("image", "").is_err());
    }
}
