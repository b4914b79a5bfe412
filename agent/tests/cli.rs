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

#[test]
fn pause_and_resume_say_where_they_looked_when_no_agent_runs() {
    // A free port: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (_d, p) = config(&format!("[ops]\nlisten = \"127.0.0.1:{port}\"\n"));
    for (args, what) in [
        (vec!["pause", "--reason", "incident"], "pause"),
        (vec!["resume"], "resume"),
    ] {
        let mut args = args;
        args.extend(["--config", p.to_str().unwrap()]);
        let o = agent(&args, &[]);
        assert_eq!(o.status.code(), Some(1), "{what}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains(&format!("127.0.0.1:{port}")) && e.contains("agent's pod"),
            "{what}: {e}"
        );
    }
}

#[test]
fn ledger_commands_need_state_dir_and_say_so() {
    let (_d, p) = config("");
    for sub in ["verify", "tail"] {
        let o = agent(&["ledger", sub, "--config", p.to_str().unwrap()], &[]);
        assert_eq!(o.status.code(), Some(64), "{sub}: {}", stderr(&o));
        assert!(stderr(&o).contains("state_dir"), "{sub}: {}", stderr(&o));
    }
}

#[test]
fn ledger_verify_of_a_missing_ledger_fails_saying_so() {
    let (d, p) = config("");
    std::fs::create_dir_all(d.path().join("state")).unwrap();
    let o = agent(
        &[
            "ledger",
            "verify",
            "--config",
            p.to_str().unwrap(),
            "--set",
            "state_dir=state",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("no ledger records"), "{}", stderr(&o));
}

#[test]
fn bad_control_keys_exit_64_naming_the_key() {
    for (extra, key) in [
        ("[ledger]\nmax_files = 1\n", "ledger.max_files"),
        ("[ledger]\nmax_file_bytes = 10\n", "ledger.max_file_bytes"),
        ("[ledger]\nretention = 3\n", "retention"),
        ("[log]\nlevel = \"info,=\"\n", "log.level"),
        (
            "[services.ops]\naddress = \"127.0.0.1:9091\"\nkind = \"tcp\"\n",
            "services.ops.address",
        ),
    ] {
        let (_d, p) = config(extra);
        let o = agent(
            &["run", "--config", p.to_str().unwrap(), "--check-config"],
            &[],
        );
        assert_eq!(o.status.code(), Some(64), "{extra}: {}", stderr(&o));
        assert!(stderr(&o).contains(key), "{extra}: {}", stderr(&o));
    }
    let (_d, p) = config("");
    let o = agent(
        &[
            "run",
            "--config",
            p.to_str().unwrap(),
            "--check-config",
            "--set",
            "paused=\"yes\"",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains("key paused"), "{}", stderr(&o));
}

#[test]
fn a_control_file_that_cannot_be_read_stops_the_start_naming_it() {
    let (d, p) = config("");
    std::fs::write(d.path().join("control.toml"), "paused = maybe\n").unwrap();
    let o = agent(
        &[
            "run",
            "--config",
            p.to_str().unwrap(),
            "--set",
            "control_file=control.toml",
            "--set",
            "ops.listen=127.0.0.1:0",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("control_file") && e.contains("control.toml"),
        "{e}"
    );
}
