//! The `tether-agent` binary: config errors exit 64 naming the key.

use std::process::{Command, Output};

fn agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tether-agent"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run tether-agent")
}

/// A config with `extra`, beside the CA bundle, certificate and key it names (`--check-config`
/// reads them, as `run` does).
fn config(extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let (d, p) = config_without_files(extra);
    identity_files(d.path());
    (d, p)
}

/// A config with `extra` naming files that do not exist.
fn config_without_files(extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("agent.toml");
    std::fs::write(&p, format!("gateways = [\"gw.example:443\"]\n[tls]\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"k.pem\"\n{extra}")).unwrap();
    (d, p)
}

/// A throwaway CA (`ca.pem`) and an agent certificate of it (`a.pem`, `k.pem`) in `dir`.
fn identity_files(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::URI(
        "spiffe://td.example/tenant/acme/agent/cli"
            .try_into()
            .unwrap(),
    )];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
    std::fs::write(dir.join("a.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("k.pem"), key.serialize_pem()).unwrap();
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn valid_config_checks_ok() {
    let (_d, p) = config("[labels]\nregion = \"eu\"\n");
    let o = agent(
        &["run", "--config", p.to_str().unwrap(), "--check-config"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("config ok; identity acme/cli"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn check_config_reads_the_files_run_reads() {
    let (_d, p) = config_without_files("");
    let o = agent(
        &["run", "--config", p.to_str().unwrap(), "--check-config"],
        &[],
    );
    assert_eq!(o.status.code(), Some(64));
    let e = stderr(&o);
    assert!(e.contains("tls.ca") && e.contains("ca.pem"), "{e}");
}

#[test]
fn unknown_key_exits_64_naming_the_key() {
    let (_d, p) = config("[reconnect]\nmax_backof = \"1s\"\n");
    let o = agent(
        &["run", "--config", p.to_str().unwrap(), "--check-config"],
        &[],
    );
    assert_eq!(o.status.code(), Some(64));
    let e = stderr(&o);
    assert!(e.contains("max_backof") && e.contains("reconnect"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

#[test]
fn gateway_without_port_exits_64_naming_the_key() {
    let (_d, p) = config("");
    let o = agent(
        &["run", "--config", p.to_str().unwrap(), "--check-config"],
        &[("TETHER_GATEWAYS", "[\"gw.example\"]")],
    );
    assert_eq!(o.status.code(), Some(64));
    let e = stderr(&o);
    assert!(e.contains("gateways") && e.contains("host:port"), "{e}");
}

#[test]
fn bad_duration_from_flag_exits_64_naming_the_key() {
    let (_d, p) = config("");
    let o = agent(
        &[
            "run",
            "--config",
            p.to_str().unwrap(),
            "--check-config",
            "--set",
            "reconnect.connect_timeout=soon",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(64));
    assert!(
        stderr(&o).contains("reconnect.connect_timeout"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn missing_certificate_exits_64_naming_the_file() {
    let (_d, p) = config_without_files("");
    let o = agent(&["run", "--config", p.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("ca.pem"), "{}", stderr(&o));
}

#[test]
fn probe_fails_clearly_when_no_agent_runs() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let (_d, p) = config(&format!("[ops]\nlisten = \"{addr}\"\n"));
    let o = agent(&["probe", "--config", p.to_str().unwrap(), "--ready"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(&addr.to_string()), "{}", stderr(&o));
}

#[test]
fn bad_connections_exit_64_naming_the_key() {
    let (_d, p) = config("");
    for (value, why) in [
        ("0", "between 1 and 16"),
        ("40", "between 1 and 16"),
        ("many", ""),
    ] {
        let o = agent(
            &["run", "--config", p.to_str().unwrap(), "--check-config"],
            &[("TETHER_CONNECTIONS", value)],
        );
        assert_eq!(o.status.code(), Some(64), "{value}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains("connections") && e.contains(why), "{value}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{e}");
    }
    let o = agent(
        &["run", "--config", p.to_str().unwrap(), "--check-config"],
        &[("TETHER_CONNECTIONS", "3")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn run_without_a_config_file_says_to_pass_one() {
    let o = agent(&["run", "--check-config"], &[]);
    assert_eq!(o.status.code(), Some(64));
    let e = stderr(&o);
    assert!(e.contains("gateways") && e.contains("pass --config"), "{e}");
}
