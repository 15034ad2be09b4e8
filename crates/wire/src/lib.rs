//! The fedmicse wire: gRPC services generated from `proto/fedmicse/v1`, tensor streaming
//! (chunking, reassembly, digests), mutual-TLS configuration and certificate tooling.

pub mod certs;
pub mod client;
pub mod convert;
pub mod listen;
pub mod secure;
pub mod tensors;
pub mod tls;

/// Generated protocol types and service stubs (`package fedmicse.v1`).
pub mod pb {
    tonic::include_proto!("fedmicse.v1");
}

pub use fedmicse_tensors::ElementType;
pub use tensors::{Assembler, AssemblyError, CHUNK_BYTES, Limits, chunk_tensors, digest};
pub use tls::{TlsFiles, peer_identity};

/// Largest gRPC message either side accepts. Tensors travel in chunks of
/// [`CHUNK_BYTES`], so this stays at tonic's 4 MiB default plus headroom for the header's
/// tokenizer files; nothing needs a larger limit.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;
