//! Choosing the compute device at run time (`--device cpu|cuda[:N]`).

use burn::tensor::Device;

use crate::error::{EncoderError, Result};

/// Parses a device name: `cpu` (burn-ndarray), `flex` (burn's pure-Rust CPU backend, when
/// built with the `flex` feature), `cuda` or `cuda:N` (when built with the `cuda` feature).
/// A CUDA device is probed, so a machine without a usable GPU fails here with a clear error
/// rather than at the first kernel.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" | "ndarray" => Ok(cpu()),
        "flex" => flex(),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let index = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse::<usize>().map_err(|_| {
                    EncoderError::Device(format!("{spec:?}: expected cuda:N with N a GPU index"))
                })?,
            };
            cuda(index)
        }
        _ => Err(EncoderError::Device(format!(
            "unknown device {spec:?}: expected cpu, cuda or cuda:N"
        ))),
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

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Device> {
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
