//! The stub keeps the items cubecl-cuda 0.11.3 names, with the upstream behaviour where it is
//! plain Rust.

use cubecl_core::Compiler;
use cubecl_llvm::{LlvmTarget, PlironCompiler, PlironOptions};

#[test]
fn cpu_target_tags_as_upstream() {
    let compiler = PlironCompiler::default();
    assert_eq!(compiler.target, LlvmTarget::Cpu);
    assert_eq!(compiler.lang_tag(), "mlir");
    assert_eq!(compiler.extension(), "plir");
    let options = PlironOptions::default();
    assert!(options.arch.is_none() && !options.grid_constants);
}

#[cfg(feature = "nvptx")]
#[test]
fn nvptx_surface_used_by_cubecl_cuda() {
    use cubecl_llvm::nvptx::ptx_version::PtxVersion;

    let compiler = PlironCompiler {
        target: LlvmTarget::Nvptx,
    };
    assert_eq!(compiler.lang_tag(), "llvm");
    assert_eq!(compiler.extension(), "ll");

    // Same construction as cubecl-cuda's `CudaCompiler::compile`.
    let options = PlironOptions {
        arch: None,
        sm_arch: None,
        ptx_version: PtxVersion::for_driver(13000),
        grid_constants: true,
        ..Default::default()
    };
    assert_eq!(options.ptx_version.unwrap().to_string(), "ptx90");
    assert_eq!(PtxVersion::for_driver(12080).unwrap().to_string(), "ptx87");
    assert_eq!(PtxVersion::for_driver(9000), None);
}
