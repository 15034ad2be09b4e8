//! How the kernels meet burn-ndarray and the machine: tensors as host slices and back,
//! zeroed buffers, work split over rayon tasks, AVX2 where the CPU has it, and OpenBLAS kept
//! to one thread.

use std::borrow::Cow;

use burn::backend::TensorMetadata;
use burn::backend::ndarray::NdArrayTensor;
use ndarray::{ArcArray, IxDyn};
use rayon::prelude::*;

/// Runs `f` compiled for AVX2 and FMA where the CPU has them (the element-wise loops are
/// then 8 lanes wide instead of SSE2's 4), as is elsewhere.
#[inline(always)]
pub(super) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        static HAS_AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *HAS_AVX2.get_or_init(|| {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }) {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Rows per task for the GEMMs: one block per rayon thread, so each core runs one large
/// single-threaded GEMM (OpenBLAS's own thread pool is set to one thread, see
/// [`single_threaded_blas`]; its spinning workers cost ~15 % of a step next to rayon's).
pub(super) fn row_block(rows: usize) -> usize {
    single_threaded_blas();
    rows.div_ceil(rayon::current_num_threads()).max(1)
}

/// Makes OpenBLAS single-threaded, once: the fused GEMMs parallelise over rayon instead.
fn single_threaded_blas() {
    #[cfg(feature = "blas")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            unsafe extern "C" {
                fn openblas_set_num_threads(num_threads: std::ffi::c_int);
            }
            // SAFETY: OpenBLAS documents this as callable at any time; it sets the thread
            // count of the calls that start afterwards.
            unsafe { openblas_set_num_threads(1) };
        });
    }
}

/// Work per rayon task: small enough to share two cores evenly, large enough that
/// scheduling costs nothing next to it.
pub(super) const TASK_ELEMENTS: usize = 16 * 1024;

/// Applies `f` to matching blocks of `y` and `x`, blocks spread over rayon tasks.
pub(super) fn par_elementwise(y: &mut [f32], x: &[f32], f: impl Fn(&mut [f32], &[f32]) + Sync) {
    y.par_chunks_mut(TASK_ELEMENTS)
        .zip(x.par_chunks(TASK_ELEMENTS))
        .for_each(|(y, x)| simd(|| f(y, x)));
}

/// [`par_elementwise`] with two inputs.
pub(super) fn par_elementwise2(
    y: &mut [f32],
    a: &[f32],
    b: &[f32],
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) {
    y.par_chunks_mut(TASK_ELEMENTS)
        .zip(a.par_chunks(TASK_ELEMENTS))
        .zip(b.par_chunks(TASK_ELEMENTS))
        .for_each(|((y, a), b)| simd(|| f(y, a, b)));
}

/// Applies `f` to each row of `n` elements, rows spread over rayon tasks.
pub(super) fn par_rows(y: &mut [f32], x: &[f32], n: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) {
    let chunk = (TASK_ELEMENTS / n).max(1) * n;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(y, x)| simd(|| y.chunks_mut(n).zip(x.chunks(n)).for_each(|(y, x)| f(y, x))));
}

/// [`par_rows`] with two inputs.
pub(super) fn par_rows2(
    y: &mut [f32],
    a: &[f32],
    b: &[f32],
    n: usize,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) {
    let chunk = (TASK_ELEMENTS / n).max(1) * n;
    y.par_chunks_mut(chunk)
        .zip(a.par_chunks(chunk))
        .zip(b.par_chunks(chunk))
        .for_each(|((y, a), b)| {
            simd(|| {
                for ((y, a), b) in y.chunks_mut(n).zip(a.chunks(n)).zip(b.chunks(n)) {
                    f(y, a, b)
                }
            })
        });
}

/// The shape and the elements, in row-major order, of an f32 ndarray tensor: borrowed when
/// already contiguous, copied otherwise (a transposed view, say).
pub(super) fn host(t: &NdArrayTensor) -> (Vec<usize>, Cow<'_, [f32]>) {
    let NdArrayTensor::F32(storage) = t else {
        panic!("fused kernels take f32 tensors, got {:?}", t.dtype());
    };
    let view = storage.view();
    let shape = view.shape().to_vec();
    let data = match view.to_slice() {
        Some(slice) => Cow::Borrowed(slice),
        None => Cow::Owned(view.iter().copied().collect()),
    };
    (shape, data)
}

/// The elements of an f32 ndarray tensor in row-major order, as [`host`] gives them.
pub(super) fn elements(t: &NdArrayTensor) -> Cow<'_, [f32]> {
    host(t).1
}

/// A zeroed output buffer, zeroed (and its fresh pages faulted in) by all rayon threads:
/// `vec![0.0; n]` would do it on the calling thread while the others wait.
pub(crate) fn zeros(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    (0..n).into_par_iter().map(|_| 0.0).collect_into_vec(&mut v);
    v
}

/// An f32 ndarray tensor of `shape` owning `data` (row-major; no copy).
pub(super) fn tensor(shape: Vec<usize>, data: Vec<f32>) -> NdArrayTensor {
    let array = ArcArray::from_shape_vec(IxDyn(&shape), data).expect("shape matches the data");
    NdArrayTensor::from(array)
}
