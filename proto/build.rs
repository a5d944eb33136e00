//! Generates the `dpu.v1` messages and services with a vendored `protoc`, so a fresh machine needs no system
//! protobuf compiler. The encoded file descriptor set is embedded for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "dpu/v1/agent.proto",
        "dpu/v1/resource.proto",
        "dpu/v1/storage.proto",
        "dpu/v1/mesh.proto",
        "dpu/v1/fabric.proto",
        "dpu/v1/image.proto",
        "dpu/v1/crypto.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("dpu_v1_descriptor.bin"))
        .compile_with_config(config, &protos, &["."])?;
    Ok(())
}
