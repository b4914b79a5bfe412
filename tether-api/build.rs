//! Compiles the northbound `.proto` files with protox (pure Rust): no system `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "tether/v1/agents.proto",
            "tether/v1/streams.proto",
            "tether/v1/commands.proto",
            "tether/v1/enrollment.proto",
            "tether/v1/callers.proto",
            "tether/v1/console.proto",
            "tether/agent/v1/agent_info.proto",
            "tether/demo/v1/echo.proto",
        ],
        ["proto"],
    )?;
    // Kept for gRPC server reflection (the dev demo upstream serves it).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // A relayed TCP stream's bytes as `bytes::Bytes`: decoded without a copy out of the
        // transport's buffer, and handed to the tunnel and back as they are.
        .bytes(".tether.v1.StreamChunk.data")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
