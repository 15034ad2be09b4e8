//! NVPTX target. Only the PTX version table survives in the stub: `cubecl-cuda` reads it at
//! run time (cache namespaces, compilation options) even when the C++ backend compiles.

pub mod ptx_version;
