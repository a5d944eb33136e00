//! Generates containerd's snapshots service (`containerd.services.snapshots.v1`) and its mount type
//! (`containerd.types`) with a vendored `protoc`, so a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/containerd/types/mount.proto", "proto/containerd/services/snapshots/v1/snapshots.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(config, &protos, &["proto"])?;
    Ok(())
}
