//! An OTLP/gRPC trace collector on a free loopback port that keeps count of the spans it
//! receives, for measuring the relay with tracing on (`scripts/bench-forward` with
//! `GATEWAY_ENV`/`AGENT_ENV` naming its endpoint). Prints the endpoint on its first line, then
//! the span count every 5 s until killed.
//!
//! ```text
//! cargo run --release -p tether-e2e --example otlp_sink
//! ```

use std::time::Duration;

#[tokio::main]
async fn main() {
    let c = tether_e2e::OtlpCollector::start().await;
    println!("{}", c.endpoint);
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        eprintln!("spans received: {}", c.spans().len());
    }
}
