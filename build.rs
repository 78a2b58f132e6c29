//! Generates the gRPC code and the file descriptor set (for server reflection)
//! from `proto/`. protoc comes from the `protoc-bin-vendored` crate, so a plain
//! `cargo build` works on a machine with no protobuf tooling installed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/bitsync/v1/manifest.proto",
        "proto/bitsync/v1/federation.proto",
        "proto/bitsync/v1/admin.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // cargo-fuzz sets `--cfg fuzzing` (src/fuzz.rs). Declared here, not in
    // Cargo.toml's [lints]: those are not applied when this crate is built
    // as the dependency of fuzz/, which is its own workspace.
    println!("cargo::rustc-check-cfg=cfg(fuzzing)");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Chunk bytes are taken out of tonic's receive buffer without a copy.
        .bytes(".bitsync.v1.ChunkData.data")
        .file_descriptor_set_path(out.join("bitsync_descriptor.bin"))
        .compile_with_config(config, &protos, &["proto"])?;
    Ok(())
}
