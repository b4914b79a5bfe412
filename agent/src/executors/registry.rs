//! `registry.create` and `registry.delete`: container repositories in the customer's AWS ECR,
//! where the vendor's CI pushes the builds the `deploy` command then runs.
//!
//! A repository Tether manages carries the tag `app.kubernetes.io/managed-by=tether`, set when
//! it is created; one without it is never modified or deleted. Names, principals and tags are
//! checked against ECR's and IAM's rules (and `registry.name_prefix`) before any AWS call.
//! `registry.create` is declarative: the payload is the repository's whole intent, and running
//! it again with other settings converges (scanning, tag mutability, lifecycle policy,
//! Tether's statements of the repository policy, the payload's tags) and changes nothing that
//! already matches. No credential crosses the tunnel: the agent calls ECR with its own AWS
//! identity, and the result carries names and ARNs only.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::names::Invalid;
use super::{Backends, MANAGED_BY, MANAGED_BY_VALUE, output, parse};
use crate::commands::ProgressSink;
use crate::config::PrincipalArn;
use crate::ecr::{EcrError, NewRepository};

/// `Sid` of the repository policy statement letting `push_principals` push (and pull).
pub const PUSH_SID: &str = "TetherPush";
/// `Sid` of the repository policy statement letting `registry.pull_principals` pull.
pub const PULL_SID: &str = "TetherPull";
/// What a pusher may do: push, and pull (CI reads layers back for its build cache).
pub const PUSH_ACTIONS: &[&str] = &[
    "ecr:BatchCheckLayerAvailability",
    "ecr:BatchGetImage",
    "ecr:CompleteLayerUpload",
    "ecr:GetDownloadUrlForLayer",
    "ecr:InitiateLayerUpload",
    "ecr:PutImage",
    "ecr:UploadLayerPart",
];
/// What a puller (the cluster's nodes) may do.
pub const PULL_ACTIONS: &[&str] = &[
    "ecr:BatchCheckLayerAvailability",
    "ecr:BatchGetImage",
    "ecr:GetDownloadUrlForLayer",
];

/// ECR allows 50 tags per repository; one is Tether's.
const MAX_TAGS: usize = 49;
/// Principals per statement: far below ECR's 10,240-character policy limit.
const MAX_PUSH_PRINCIPALS: usize = 50;

const REPOSITORY_NAME: &str = "a valid ECR repository name (2 to 256 characters: runs of \
     lowercase letters and digits joined by single '.', '_' or '-', in path components joined \
     by '/')";
const TAG_KEY: &str = "a valid tag key (1 to 128 letters, digits, spaces and _ . : / = + - @, \
     not starting with aws:)";
const TAG_VALUE: &str = "a valid tag value (at most 256 letters, digits, spaces and \
     _ . : / = + - @)";

fn yes() -> bool {
    true
}

/// `registry.create` payload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    /// Scan images for vulnerabilities when pushed (default: on).
    #[serde(default = "yes")]
    scan_on_push: bool,
    /// Refuse pushing an existing tag again (default: on: a tag names one build for good).
    #[serde(default = "yes")]
    immutable_tags: bool,
    /// Expire all but the newest N images (default: keep everything).
    #[serde(default)]
    keep_last: Option<u32>,
    /// Who may push (the vendor's CI role, by ARN; cross-account works).
    #[serde(default)]
    push_principals: Vec<PrincipalArn>,
    /// Tags added to the repository (never removed: tags the customer added stay).
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

/// `registry.create` result.
#[derive(Debug, Serialize)]
struct Created {
    name: String,
    /// What `docker push` is given: `<account>.dkr.ecr.<region>.amazonaws.com/<name>`.
    repository_uri: String,
    repository_arn: String,
    /// False when the repository already existed (the command converged it).
    created: bool,
    /// What this run changed on it after creating or finding it; empty: it already matched.
    changed: Vec<&'static str>,
}

/// `registry.delete` payload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Delete {
    name: String,
    /// Delete the repository's images too (default: refuse while it holds any).
    #[serde(default)]
    force: bool,
}

/// `registry.delete` result.
#[derive(Debug, Serialize)]
struct Deleted {
    name: String,
    /// False when there was nothing to delete (already gone: the command is idempotent).
    deleted: bool,
}

// === Rules ===

fn invalid(field: &str, value: &str, rule: &'static str) -> Invalid {
    Invalid {
        field: field.to_owned(),
        value: value.to_owned(),
        rule,
    }
}

/// ECR's rule for repository names (the API's pattern
/// `(?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)*[a-z0-9]+(?:[._-][a-z0-9]+)*`, 2 to 256 characters).
fn repository_name(field: &str, value: &str) -> Result<(), Invalid> {
    let run = |r: &str| {
        !r.is_empty()
            && r.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    let ok = (2..=256).contains(&value.len())
        && value
            .split('/')
            .all(|component| component.split(['.', '_', '-']).all(run));
    if ok {
        Ok(())
    } else {
        Err(invalid(field, value, REPOSITORY_NAME))
    }
}

fn tag_char(c: char) -> bool {
    c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c)
}

fn tag(key: &str, value: &str) -> Result<(), Invalid> {
    let field = format!("tags.{key}");
    let chars = key.chars().count();
    if !(1..=128).contains(&chars)
        || !key.chars().all(tag_char)
        || key.to_ascii_lowercase().starts_with("aws:")
    {
        return Err(invalid("tags", key, TAG_KEY));
    }
    if value.chars().count() > 256 || !value.chars().all(tag_char) {
        return Err(invalid(&field, value, TAG_VALUE));
    }
    if key == MANAGED_BY && value != MANAGED_BY_VALUE {
        return Err(invalid(
            &field,
            value,
            "allowed: Tether sets this tag to `tether`",
        ));
    }
    Ok(())
}

/// The name, checked against ECR's rule and then against `registry.name_prefix`.
fn check_name(kind: &str, name: &str, prefix: &str) -> Result<(), String> {
    repository_name("name", name).map_err(|e| format!("{kind}: {e}"))?;
    if !name.starts_with(prefix) {
        return Err(format!(
            "{kind}: `name`: {name:?} does not start with {prefix:?}: this agent's \
             registry.name_prefix limits the repositories it manages (the customer's setting; \
             nothing was changed)"
        ));
    }
    Ok(())
}

impl Create {
    fn validate(&self, prefix: &str) -> Result<(), String> {
        check_name("registry.create", &self.name, prefix)?;
        let bad = |e: Invalid| format!("registry.create: {e}");
        if self.keep_last == Some(0) {
            return Err(bad(invalid(
                "keep_last",
                "0",
                "allowed: keep at least 1 image, or leave keep_last out to keep every image",
            )));
        }
        if self.push_principals.len() > MAX_PUSH_PRINCIPALS {
            return Err(format!(
                "registry.create: `push_principals`: {} principals; at most {MAX_PUSH_PRINCIPALS}",
                self.push_principals.len()
            ));
        }
        if self.tags.len() > MAX_TAGS {
            return Err(format!(
                "registry.create: `tags`: {} tags; at most {MAX_TAGS} (ECR allows 50 per \
                 repository and one is Tether's {MANAGED_BY})",
                self.tags.len()
            ));
        }
        for (k, v) in &self.tags {
            tag(k, v).map_err(bad)?;
        }
        Ok(())
    }
}

// === Policies ===

/// The lifecycle policy keeping the newest `n` images (tagged or not) and expiring the rest.
fn lifecycle_policy(n: u32) -> Value {
    json!({
        "rules": [{
            "rulePriority": 1,
            "description": format!("tether: keep the last {n} images"),
            "selection": {
                "tagStatus": "any",
                "countType": "imageCountMoreThan",
                "countNumber": n,
            },
            "action": { "type": "expire" },
        }],
    })
}

fn statement(sid: &str, principals: &BTreeSet<&str>, actions: &[&str]) -> Value {
    json!({
        "Sid": sid,
        "Effect": "Allow",
        "Principal": { "AWS": principals },
        "Action": actions,
    })
}

/// The repository policy wanted: the statements of `existing` that are not Tether's, then
/// Tether's push and pull statements. `None`: no statement at all (no policy).
fn repository_policy(
    existing: Option<&str>,
    push: &[PrincipalArn],
    pull: &[PrincipalArn],
) -> Result<Option<Value>, String> {
    let mut version = Value::from("2012-10-17");
    let mut statements = Vec::new();
    if let Some(text) = existing {
        let doc: Value = serde_json::from_str(text)
            .map_err(|e| format!("its repository policy is not JSON ({e})"))?;
        if let Some(v) = doc.get("Version") {
            version = v.clone();
        }
        statements = match doc.get("Statement") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(s @ Value::Object(_)) => vec![s.clone()],
            Some(other) => {
                return Err(format!(
                    "its repository policy's Statement is neither a statement nor a list: {other}"
                ));
            }
        };
    }
    statements.retain(|s| {
        !matches!(
            s.get("Sid").and_then(Value::as_str),
            Some(PUSH_SID | PULL_SID)
        )
    });
    fn set(p: &[PrincipalArn]) -> BTreeSet<&str> {
        p.iter().map(PrincipalArn::as_str).collect()
    }
    if !push.is_empty() {
        statements.push(statement(PUSH_SID, &set(push), PUSH_ACTIONS));
    }
    if !pull.is_empty() {
        statements.push(statement(PULL_SID, &set(pull), PULL_ACTIONS));
    }
    Ok((!statements.is_empty()).then(|| json!({ "Version": version, "Statement": statements })))
}

/// A policy document in a form where equal meaning is equal value: one-element lists and
/// their element, and lists in any order, compare equal (ECR and IAM rewrite both).
fn normalized(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let v = match (k.as_str(), v) {
                        ("Statement", Value::Object(_)) => Value::Array(vec![normalized(v)]),
                        (
                            "Action" | "NotAction" | "Resource" | "AWS" | "Service",
                            Value::String(_),
                        ) => Value::Array(vec![v.clone()]),
                        (
                            "Action" | "NotAction" | "Resource" | "AWS" | "Service",
                            Value::Array(a),
                        ) => {
                            let mut a = a.clone();
                            a.sort_by_key(Value::to_string);
                            Value::Array(a)
                        }
                        _ => normalized(v),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalized).collect()),
        other => other.clone(),
    }
}

/// Whether a stored policy text means `want`.
fn same_policy(have: Option<&str>, want: &Value) -> bool {
    have.and_then(|h| serde_json::from_str::<Value>(h).ok())
        .is_some_and(|h| normalized(&h) == normalized(want))
}

fn not_managed(name: &str) -> String {
    format!(
        "repository {name:?} is not managed by tether (it lacks the tag \
         {MANAGED_BY}={MANAGED_BY_VALUE}); nothing was changed"
    )
}

fn is_managed(tags: &BTreeMap<String, String>) -> bool {
    tags.get(MANAGED_BY).is_some_and(|v| v == MANAGED_BY_VALUE)
}

// === Handlers ===

pub(super) async fn create(
    b: &Backends,
    payload: Bytes,
    progress: ProgressSink,
) -> Result<Bytes, String> {
    let req: Create = parse("registry.create", &payload)?;
    req.validate(&b.registry.name_prefix)?;
    let err = |e: EcrError| format!("registry.create: {e}");
    let ecr = b.ecr().await;
    let name = req.name.as_str();
    let mut tags = req.tags.clone();
    tags.insert(MANAGED_BY.into(), MANAGED_BY_VALUE.into());
    let new = NewRepository {
        name,
        scan_on_push: req.scan_on_push,
        immutable_tags: req.immutable_tags,
        tags: &tags,
    };

    let (repo, created) = match ecr.describe(name).await.map_err(err)? {
        Some(repo) => (repo, false),
        None => match ecr.create(&new).await.map_err(err)? {
            Some(repo) => {
                progress.report(format!("created repository {name} ({})", repo.uri));
                (repo, true)
            }
            // Created meanwhile (a concurrent command, an earlier delivery of this one):
            // converge it like any existing repository, if it is ours.
            None => {
                let repo = ecr.describe(name).await.map_err(err)?.ok_or_else(|| {
                    format!(
                        "registry.create: repository {name:?} was reported to exist, then not \
                         found (deleted meanwhile?); retrying the command can help"
                    )
                })?;
                (repo, false)
            }
        },
    };
    let mut changed = Vec::new();
    if !created {
        let current = ecr.tags(&repo).await.map_err(err)?;
        if !is_managed(&current) {
            return Err(format!("registry.create: {}", not_managed(name)));
        }
        if repo.scan_on_push != req.scan_on_push {
            ecr.set_scan_on_push(name, req.scan_on_push)
                .await
                .map_err(err)?;
            progress.report(format!("scan_on_push set to {}", req.scan_on_push));
            changed.push("scan_on_push");
        }
        // ECR's `*_WITH_EXCLUSION` forms (set outside Tether) converge to the plain one asked.
        if repo.immutable_tags() != req.immutable_tags
            || !matches!(repo.tag_mutability.as_str(), "MUTABLE" | "IMMUTABLE")
        {
            ecr.set_immutable_tags(name, req.immutable_tags)
                .await
                .map_err(err)?;
            progress.report(format!("immutable_tags set to {}", req.immutable_tags));
            changed.push("immutable_tags");
        }
        let missing: BTreeMap<String, String> = tags
            .iter()
            .filter(|(k, v)| current.get(*k) != Some(v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !missing.is_empty() {
            ecr.tag(&repo, &missing).await.map_err(err)?;
            progress.report(format!(
                "tags set: {}",
                missing.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
            changed.push("tags");
        }
    }

    // A new repository has no policies yet: nothing to read.
    let have = if created {
        None
    } else {
        ecr.lifecycle_policy(name).await.map_err(err)?
    };
    match req.keep_last {
        Some(n) => {
            let want = lifecycle_policy(n);
            if !same_policy(have.as_deref(), &want) {
                ecr.put_lifecycle_policy(name, &want.to_string())
                    .await
                    .map_err(err)?;
                progress.report(format!("lifecycle policy: keep the last {n} images"));
                changed.push("lifecycle_policy");
            }
        }
        None if have.is_some() => {
            ecr.delete_lifecycle_policy(name).await.map_err(err)?;
            progress.report("lifecycle policy removed: every image is kept");
            changed.push("lifecycle_policy");
        }
        None => {}
    }

    let have = if created {
        None
    } else {
        ecr.repository_policy(name).await.map_err(err)?
    };
    let want = repository_policy(
        have.as_deref(),
        &req.push_principals,
        &b.registry.pull_principals,
    )
    .map_err(|e| format!("registry.create: repository {name:?}: {e}; fix or delete it"))?;
    match want {
        Some(want) if !same_policy(have.as_deref(), &want) => {
            ecr.set_repository_policy(name, &want.to_string())
                .await
                .map_err(err)?;
            progress.report(format!(
                "repository policy: {} may push, {} may pull",
                req.push_principals.len(),
                b.registry.pull_principals.len()
            ));
            changed.push("repository_policy");
        }
        None if have.is_some() => {
            ecr.delete_repository_policy(name).await.map_err(err)?;
            progress.report("repository policy removed: nobody is granted access by it");
            changed.push("repository_policy");
        }
        _ => {}
    }
    if !created && changed.is_empty() {
        progress.report(format!(
            "repository {name} already as asked: nothing changed"
        ));
    }
    output(&Created {
        name: name.to_owned(),
        repository_uri: repo.uri,
        repository_arn: repo.arn,
        created,
        changed,
    })
}

pub(super) async fn delete(
    b: &Backends,
    payload: Bytes,
    progress: ProgressSink,
) -> Result<Bytes, String> {
    let req: Delete = parse("registry.delete", &payload)?;
    check_name("registry.delete", &req.name, &b.registry.name_prefix)?;
    let err = |e: EcrError| format!("registry.delete: {e}");
    let ecr = b.ecr().await;
    let name = req.name.as_str();
    let Some(repo) = ecr.describe(name).await.map_err(err)? else {
        progress.report(format!(
            "repository {name} does not exist: nothing to delete"
        ));
        return output(&Deleted {
            name: name.to_owned(),
            deleted: false,
        });
    };
    if !is_managed(&ecr.tags(&repo).await.map_err(err)?) {
        return Err(format!("registry.delete: {}", not_managed(name)));
    }
    // Without force, ECR itself refuses a repository holding images, atomically: no image can
    // slip in between a check here and the delete.
    let deleted = ecr.delete(name, req.force).await.map_err(err)?;
    progress.report(match (deleted, req.force) {
        (true, true) => format!("repository {name} deleted with its images"),
        (true, false) => format!("repository {name} deleted (it held no images)"),
        (false, _) => format!("repository {name} was deleted meanwhile: nothing to delete"),
    });
    output(&Deleted {
        name: name.to_owned(),
        deleted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arn(s: &str) -> PrincipalArn {
        s.parse().expect("ARN")
    }

    #[test]
    fn repository_names_follow_ecrs_pattern() {
        for ok in [
            "ab",
            "tether/web",
            "tether/team-a/api_v2.1",
            "a1/b2/c3",
            "0tether",
            &"a".repeat(256),
        ] {
            repository_name("name", ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "a",
            "",
            "Tether/web",
            "/tether",
            "tether/",
            "tether//web",
            "tether/-web",
            "tether/web-",
            "tether/we--b",
            "tether/we._b",
            "tether web",
            "tether:web",
            "tether/wéb",
            &"a".repeat(257),
        ] {
            let e = repository_name("name", bad).expect_err(bad);
            assert_eq!(e.field, "name");
            assert!(e.to_string().contains("ECR repository name"), "{e}");
        }
    }

    #[test]
    fn names_outside_the_prefix_are_refused_naming_the_setting() {
        check_name("registry.create", "tether/web", "tether/").expect("inside");
        check_name("registry.create", "tether/web", "").expect("no prefix");
        let e = check_name("registry.create", "other/web", "tether/").unwrap_err();
        assert!(
            e.contains("registry.name_prefix") && e.contains("\"tether/\""),
            "{e}"
        );
        let e = check_name("registry.delete", "Other", "").unwrap_err();
        assert!(e.starts_with("registry.delete: `name`"), "{e}");
    }

    #[test]
    fn tags_follow_ecrs_rules_and_cannot_take_the_management_tag() {
        tag("team", "payments").expect("plain");
        tag("cost-center:id", "a b/c=d+e-f@g_h.i").expect("every allowed character");
        tag("équipe", "données").expect("unicode letters");
        tag("empty", "").expect("empty value");
        tag(MANAGED_BY, MANAGED_BY_VALUE).expect("the same value is allowed");
        for (k, v, field) in [
            ("aws:createdBy", "x", "tags"),
            ("AWS:x", "x", "tags"),
            ("", "x", "tags"),
            ("a{b}", "x", "tags"),
            ("k", "semi;colon", "tags.k"),
            (
                MANAGED_BY,
                "someone-else",
                "tags.app.kubernetes.io/managed-by",
            ),
        ] {
            assert_eq!(tag(k, v).expect_err(k).field, field, "{k}={v}");
        }
        assert!(tag(&"k".repeat(129), "").is_err());
        assert!(tag("k", &"v".repeat(257)).is_err());
    }

    #[test]
    fn the_repository_policy_keeps_other_statements_and_replaces_tethers() {
        let push = [arn("arn:aws:iam::111122223333:role/vendor-ci")];
        let pull = [arn("arn:aws:iam::123456789012:role/eks-nodes")];
        let fresh = repository_policy(None, &push, &pull).unwrap().unwrap();
        assert_eq!(
            fresh,
            json!({"Version": "2012-10-17", "Statement": [
                {"Sid": PUSH_SID, "Effect": "Allow",
                 "Principal": {"AWS": ["arn:aws:iam::111122223333:role/vendor-ci"]},
                 "Action": PUSH_ACTIONS},
                {"Sid": PULL_SID, "Effect": "Allow",
                 "Principal": {"AWS": ["arn:aws:iam::123456789012:role/eks-nodes"]},
                 "Action": PULL_ACTIONS},
            ]})
        );
        assert!(repository_policy(None, &[], &[]).unwrap().is_none());

        // The customer's own statement stays; Tether's old push statement is replaced.
        let theirs = json!({"Sid": "LambdaPull", "Effect": "Allow",
                            "Principal": {"Service": "lambda.amazonaws.com"},
                            "Action": "ecr:BatchGetImage"});
        let existing = json!({"Version": "2008-10-17", "Statement": [
            theirs,
            {"Sid": PUSH_SID, "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::999999999999:root"},
             "Action": PUSH_ACTIONS},
        ]})
        .to_string();
        let merged = repository_policy(Some(&existing), &push, &[])
            .unwrap()
            .unwrap();
        assert_eq!(merged["Version"], "2008-10-17");
        assert_eq!(merged["Statement"].as_array().unwrap().len(), 2);
        assert_eq!(merged["Statement"][0], theirs);
        assert_eq!(merged["Statement"][1]["Sid"], PUSH_SID);
        // Nothing of Tether's left: only theirs.
        let only_theirs = repository_policy(Some(&existing), &[], &[])
            .unwrap()
            .unwrap();
        assert_eq!(only_theirs["Statement"], json!([theirs]));
        // A single statement written as an object counts too.
        let single = json!({"Statement": theirs}).to_string();
        assert_eq!(
            repository_policy(Some(&single), &[], &[]).unwrap().unwrap()["Statement"],
            json!([theirs])
        );
        let e = repository_policy(Some("{nope"), &push, &[]).unwrap_err();
        assert!(e.contains("not JSON"), "{e}");
    }

    #[test]
    fn policies_that_mean_the_same_compare_equal() {
        let want = json!({"Version": "2012-10-17", "Statement": [{"Sid": PUSH_SID, "Effect": "Allow",
            "Principal": {"AWS": ["arn:aws:iam::1:role/a"]}, "Action": ["ecr:PutImage", "ecr:BatchGetImage"]}]});
        // As ECR may give it back: reformatted, keys reordered, a one-element list as a string,
        // lists reordered.
        let stored = r#"{
            "Statement" : {"Action": ["ecr:BatchGetImage", "ecr:PutImage"], "Effect": "Allow",
                           "Principal": {"AWS": "arn:aws:iam::1:role/a"}, "Sid": "TetherPush"},
            "Version" : "2012-10-17" }"#;
        assert!(same_policy(Some(stored), &want));
        assert!(!same_policy(None, &want));
        assert!(!same_policy(Some("not json"), &want));
        let other = stored.replace("role/a", "role/b");
        assert!(!same_policy(Some(&other), &want));
        assert!(same_policy(
            Some(&lifecycle_policy(30).to_string()),
            &lifecycle_policy(30)
        ));
        assert!(!same_policy(
            Some(&lifecycle_policy(30).to_string()),
            &lifecycle_policy(31)
        ));
    }

    #[test]
    fn payloads_are_checked_before_anything_else() {
        let create = |v: Value| -> Result<(), String> {
            let c: Create = parse("registry.create", v.to_string().as_bytes())?;
            c.validate("tether/")
        };
        create(json!({"name": "tether/web"})).expect("minimal");
        create(
            json!({"name": "tether/web", "scan_on_push": false, "immutable_tags": false,
                      "keep_last": 30, "push_principals": ["arn:aws:iam::111122223333:role/ci"],
                      "tags": {"team": "shop"}}),
        )
        .expect("everything");
        for (payload, want) in [
            (json!({"name": "tether/Web"}), "`name`"),
            (json!({"name": "web"}), "registry.name_prefix"),
            (json!({"name": "tether/web", "keep_last": 0}), "`keep_last`"),
            (
                json!({"name": "tether/web", "keep_last": -1}),
                "field `keep_last`",
            ),
            (
                json!({"name": "tether/web", "push_principals": ["*"]}),
                "field `push_principals[0]`: \"*\" is not an IAM principal ARN",
            ),
            (
                json!({"name": "tether/web", "tags": {"aws:x": "y"}}),
                "`tags`",
            ),
            (
                json!({"name": "tether/web", "mutable": true}),
                "unknown field `mutable`",
            ),
            (json!({"scan_on_push": true}), "missing field `name`"),
        ] {
            let e = create(payload.clone()).expect_err(&payload.to_string());
            assert!(e.starts_with("registry.create: "), "{e}");
            assert!(e.contains(want), "{payload}: {e}");
        }
        let many: BTreeMap<String, String> =
            (0..50).map(|i| (format!("k{i}"), String::new())).collect();
        let e = create(json!({"name": "tether/web", "tags": many})).unwrap_err();
        assert!(e.contains("at most 49"), "{e}");
    }
}
