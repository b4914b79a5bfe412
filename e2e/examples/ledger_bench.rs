//! The ledger on its own: how fast its writer thread takes records (hashing, chaining, signed
//! checkpoints every 1,000, files rotated at 64 MiB, no stdout copy) and how fast `verify`
//! reads them back, with the bytes each call record takes.
//!
//! ```sh
//! cargo run --release -p tether-e2e --example ledger_bench -- [RECORDS]   # default 1000000
//! ```
//!
//! Prints one line of JSON. The records are relayed-call records as the relay writes them
//! (caller, tenant, service, method, status, bytes, start, duration).

use std::time::{Instant, SystemTime};

use tether_agent::config::LedgerConfig;
use tether_agent::ledger::{self, Entry, Relayed, Signer};

fn main() -> anyhow::Result<()> {
    tether_runtime::tls::install_crypto_provider();
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let key = rcgen::KeyPair::generate()?;
    let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let cfg = LedgerConfig {
        stdout: false,
        ..Default::default()
    };
    let (handle, writer) = ledger::start(
        &cfg,
        Some(dir.path().to_owned()),
        Signer::new(&der)?,
        "bench/a1".into(),
    )?;
    let started = Instant::now();
    let mut queued_ns = 0u128;
    for i in 0..n {
        let entry = Entry::Call(Relayed {
            caller: "mtls:control-plane".into(),
            tenant: "bench".into(),
            service: "echo".into(),
            method: "/tether.demo.v1.Echo/Unary".into(),
            status: "Ok".into(),
            bytes_in: 1029 + (i % 7),
            bytes_out: 1034,
            start: SystemTime::now(),
            duration_ms: 0.412,
        });
        let t = Instant::now();
        handle.record(entry);
        queued_ns += t.elapsed().as_nanos();
        // The producer outruns the writer: it waits whenever 50,000 records are queued, so
        // the bounded queue (65,536) never overflows and the writer never runs dry.
        while handle.pending() >= 50_000 {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
    drop(handle);
    writer.join();
    let write_s = started.elapsed().as_secs_f64();
    let files = ledger::list(dir.path())?;
    let bytes: u64 = files
        .iter()
        .map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let started = Instant::now();
    let report = ledger::verify(dir.path(), Some("bench/a1"))?;
    let verify_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(report.faults.is_empty(), "faults: {:?}", report.faults);
    anyhow::ensure!(
        report.records >= n,
        "records were dropped: {} of {n}",
        report.records
    );
    println!(
        "{}",
        serde_json::json!({
            "records": report.records,
            "checkpoints": report.checkpoints,
            "files": report.files,
            "bytes": bytes,
            "bytes_per_record": bytes as f64 / report.records as f64,
            "queue_ns_per_record": queued_ns as f64 / n as f64,
            "writer_records_per_s": n as f64 / write_s,
            "verify_records_per_s": report.records as f64 / verify_s,
            "verify_s": verify_s,
        })
    );
    Ok(())
}
