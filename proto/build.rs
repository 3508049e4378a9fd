//! Compiles `halo/v1/halo.proto` with protox (pure Rust, so no `protoc` is needed) and generates
//! the prost messages and tonic client/server with tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "halo/v1/halo.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
