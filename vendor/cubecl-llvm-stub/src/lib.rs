//! Stub of `cubecl-llvm` 0.11.3 (see README.md).
//!
//! `cubecl-cuda` 0.11.3 depends on `cubecl-llvm` unconditionally, and the real crate downloads
//! and links a prebuilt LLVM in its build script. This crate keeps exactly the public items
//! `cubecl-cuda` names, with the upstream types, derives and (where it is plain Rust that runs
//! on the CUDA C++ path too) the upstream logic, and replaces the LLVM code generation with a
//! [`CompilationError`](cubecl_core::CompilationError). Use `cubecl-cuda` with its `cpp`
//! feature, which makes the CUDA C++ -> NVRTC backend the default one.
#![forbid(unsafe_code)]

extern crate alloc;

pub mod cpu;
#[cfg(feature = "nvptx")]
pub mod nvptx;
pub mod shared;
pub mod target;

pub use cpu::PlironEngine;
#[cfg(feature = "amdgpu")]
pub use shared::AmdGpuModule;
#[cfg(feature = "nvptx")]
pub use shared::NvptxModule;
pub use shared::{PlironArtifact, PlironCompiler, PlironOptions};
pub use target::LlvmTarget;

/// Why every LLVM compilation fails in this build.
pub const STUB_REASON: &str = "the LLVM (pliron) backend of CubeCL is not available in this build: \
     `cubecl-llvm` is replaced by a local stub (vendor/cubecl-llvm-stub) so that no LLVM has to \
     be downloaded at build time. Kernels are compiled by the CUDA C++ -> NVRTC backend, which \
     `cubecl-cuda`'s `cpp` feature makes the default; make sure that feature is enabled.";
