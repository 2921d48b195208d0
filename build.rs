//! Compiles the few protos envoy-types does not ship (`proto/`), reusing envoy-types' own
//! well-known types so that `Struct` values interoperate with the rest of the xDS messages.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/xds/type/v3/typed_struct.proto",
        "proto/udpa/type/v1/typed_struct.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let includes = protoc_bin_vendored::include_path()?;
    let mut cfg = prost_build::Config::new();
    cfg.protoc_executable(protoc)
        .extern_path(
            ".google.protobuf.Struct",
            "::envoy_types::pb::google::protobuf::Struct",
        )
        .enable_type_names()
        .type_name_domain(["."], "type.googleapis.com");
    cfg.compile_protos(&protos, &[std::path::PathBuf::from("proto"), includes])?;
    Ok(())
}
