// Generates the gRPC code from proto/ with a vendored protoc (no system package needed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let proto = "../../proto/fedmicse/v1/federation.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        // Chunk payloads as `bytes::Bytes`: no copies between the socket and the assembler.
        .bytes(".fedmicse.v1.TensorChunk.data")
        .bytes(".fedmicse.v1.MaskedChunk.data")
        .compile_protos(&[proto], &["../../proto"])?;
    Ok(())
}
