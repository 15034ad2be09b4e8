//! Choosing the compute device at run time (`--device cpu|cuda[:N]`).

use burn::tensor::Device;
pub use fedmicse_runtime::DeviceSpec;

use crate::error::{EncoderError, Result};

/// Parses a device name (see [`DeviceSpec`]) and opens the device.
pub fn parse_device(spec: &str) -> Result<Device> {
    device(spec.parse::<DeviceSpec>().map_err(EncoderError::Device)?)
}

/// Opens a device: `cpu` (burn-ndarray), `flex` (burn's pure-Rust CPU backend, when built
/// with the `flex` feature), `cuda:N` (when built with the `cuda` feature). A CUDA device is
/// probed, so a machine without a usable GPU fails here with a clear error rather than at
/// the first kernel.
pub fn device(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(cpu()),
        DeviceSpec::Flex => flex(),
        DeviceSpec::Cuda(index) => cuda(index),
    }
}

/// burn-ndarray, the product's CPU backend (with OpenBLAS matmuls in the default `blas`
/// build). burn 0.22 marks it deprecated in favour of `flex`; both are measured in
/// BENCHMARKS.md, where ndarray + OpenBLAS is the fastest.
#[allow(deprecated)]
pub fn cpu() -> Device {
    Device::ndarray()
}

/// Whether tensors on `device` live in host memory (ndarray or flex): there, host-side work
/// such as drawing dropout masks costs no transfer.
pub fn is_host(device: &Device) -> bool {
    if *device == cpu() {
        return true;
    }
    #[cfg(feature = "flex")]
    if *device == Device::flex() {
        return true;
    }
    false
}

/// The sequence-length multiple inference batches are padded to on `device`: 8 on a GPU
/// (a few repeating shapes instead of one per length, so kernels are compiled and tuned
/// once; multiples of 8 also suit tensor cores), 1 on the CPU, where padding is only extra
/// work. Training batches are not rounded: the AMI term depends on the padded length.
pub fn pad_multiple(device: &Device) -> usize {
    if is_host(device) { 1 } else { 8 }
}

#[cfg(feature = "flex")]
fn flex() -> Result<Device> {
    Ok(Device::flex())
}

#[cfg(not(feature = "flex"))]
fn flex() -> Result<Device> {
    Err(EncoderError::Device(
        "this fedmicse was built without the flex backend (cargo build --features flex)".into(),
    ))
}

/// Where CUDA kernels compiled by cubecl and its autotune results persist between runs:
/// `$FEDMICSE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/fedmicse/kernels`, else
/// `~/.cache/fedmicse/kernels`, else `./.fedmicse-kernels`. A warm cache turns minutes of
/// compiling and tuning at the first training step into seconds.
pub fn kernel_cache_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("FEDMICSE_KERNEL_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("fedmicse/kernels")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/fedmicse/kernels")))
        .unwrap_or_else(|| PathBuf::from(".fedmicse-kernels"))
}

/// Points cubecl's persistent caches (compiled kernels, autotune results) at
/// [`kernel_cache_dir`] and turns kernel caching on, before the first device opens. A
/// `cubecl.toml` that names its own cache folder wins.
#[cfg(feature = "cuda")]
fn configure_kernel_cache() {
    use cubecl_runtime::config::cache::CacheConfig;
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        if matches!(config.environment.path, CacheConfig::Target) {
            let dir = kernel_cache_dir();
            if let Err(e) = std::fs::create_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "kernel cache folder not usable; kernels are compiled every run");
                return;
            }
            tracing::info!(dir = %dir.display(), "CUDA kernel cache");
            config.environment.path = CacheConfig::Directory(dir);
        }
        config.compilation.cache = true;
        // Keeps a configuration someone set earlier in the process.
        CubeClRuntimeConfig::try_set(config);
    });
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Device> {
    configure_kernel_cache();
    // cubecl panics when the driver, NVRTC or the GPU is missing; turn that into an error.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let probe = std::panic::catch_unwind(|| {
        let device = Device::cuda(index);
        let t = burn::tensor::Tensor::<1>::ones([4], &device) * 2.0;
        let sum: f32 = t.sum().into_scalar();
        (device, sum)
    });
    std::panic::set_hook(previous);
    match probe {
        Ok((device, sum)) if sum == 8.0 => Ok(device),
        Ok((_, sum)) => Err(EncoderError::Device(format!(
            "cuda:{index} computed 2·4 = {sum}: the GPU or driver is broken"
        ))),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(EncoderError::Device(format!(
                "cuda:{index} is not usable (no NVIDIA GPU, driver, libnvrtc or CUDA headers?): {msg}"
            )))
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda(_index: usize) -> Result<Device> {
    Err(EncoderError::Device(
        "this fedmicse was built without CUDA support: rebuild with `cargo build --release --features cuda`".into(),
    ))
}

/// Whether CUDA support was compiled in.
pub const CUDA_COMPILED: bool = cfg!(feature = "cuda");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_cache_dir_follows_the_environment() {
        // Only the variable this project owns is set here; the rest of the chain is the
        // documented fallback order.
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: no other test reads or writes this variable.
        unsafe { std::env::set_var("FEDMICSE_KERNEL_CACHE", dir.path()) };
        assert_eq!(kernel_cache_dir(), dir.path());
        unsafe { std::env::remove_var("FEDMICSE_KERNEL_CACHE") };
        assert_ne!(kernel_cache_dir(), dir.path());
    }

    #[test]
    fn parses_names() {
        assert!(parse_device("cpu").is_ok());
        assert!(parse_device("CPU").is_ok());
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("unknown device"), "{e}");
        let e = parse_device("cuda:x").unwrap_err().to_string();
        assert!(e.contains("cuda:N"), "{e}");
        if !CUDA_COMPILED {
            let e = parse_device("cuda").unwrap_err().to_string();
            assert!(e.contains("without CUDA"), "{e}");
        }
    }
}
