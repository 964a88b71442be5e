//! Host (CPU) views of candle tensors and the f32 matrix product that lever's fused CPU
//! operations call: the differentiable ops of [`super::grad`], the linear layers' own backward
//! passes (`linear.rs`) and the encoder's fused steps all read and write through these.
#![allow(unsafe_code)]

use candle_core::{CpuStorage, Layout, Result, Tensor};

/// A contiguous f32 CPU storage's values (`what` names the operation in the error).
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expects f32");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: expects a contiguous tensor");
    };
    Ok(&v[a..b])
}

/// A contiguous f32 CPU tensor's storage, held while its values are read in place.
pub(crate) struct HostRows {
    t: Tensor,
}

impl HostRows {
    pub(crate) fn new(t: &Tensor) -> Result<Self> {
        Ok(Self { t: t.contiguous()? })
    }

    /// Calls `f` with the values, borrowed.
    pub(crate) fn with<R>(&self, what: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        let (s, l) = self.t.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*s else {
            candle_core::bail!("{what}: expects a CPU tensor");
        };
        f(f32_slice(s, l, what)?)
    }
}

/// The same, writable (the in-place ops).
pub(crate) fn f32_slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expects f32");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: expects a contiguous tensor");
    };
    Ok(&mut v[a..b])
}

/// A strided matrix: element (i, j) of `data` at i·rs + j·cs.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    pub(crate) fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major (·, cols) matrix.
    pub(crate) fn t(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: cols,
        }
    }

    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// dst (m, n) row-major = [dst +] scale · a (m, k) · b (k, n), on rayon's threads when
/// `parallel`.
#[allow(unsafe_code, clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    acc: bool,
    scale: f32,
    a: Mat,
    b: Mat,
    parallel: bool,
) {
    assert!(dst.len() >= m * n && a.covers(m, k) && b.covers(k, n));
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: every element gemm reads or writes is in bounds (checked above); dst is
    // exclusively borrowed, so it overlaps neither input.
    // gemm: dst[i·rs + j·cs] = α·dst + β·Σ_l lhs[i·rs + l·cs]·rhs[l·rs + j·cs].
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            acc,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            if acc { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            if parallel {
                gemm::Parallelism::Rayon(rayon::current_num_threads())
            } else {
                gemm::Parallelism::None
            },
        );
    }
}
