//! proto/ → Rust (tonic-prost-build) plus the descriptor set for server reflection.
//! protox parses the .proto files in pure Rust, so no system `protoc` is needed.

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/stocksblitz/user/v1/common.proto",
        "proto/stocksblitz/user/v1/auth.proto",
        "proto/stocksblitz/user/v1/user.proto",
        "proto/stocksblitz/user/v1/account.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("user_v1_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Methods whose feature is not built answer UNIMPLEMENTED.
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
