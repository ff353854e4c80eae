//! Compiles `proto/` without a system `protoc`: protox parses the files and
//! tonic-prost-build generates the Rust code from the descriptor set.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = "../proto";
    let file = "../proto/datasaver/v1/datasaver.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], [proto_root])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
