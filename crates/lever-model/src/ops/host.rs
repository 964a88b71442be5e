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

/// Calls `f` with the values of contiguous f32 CPU tensors, borrowed in place (each
/// storage read-locked until `f` returns).
pub(crate) fn with_host<R>(
    ts: &[&Tensor],
    what: &str,
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<R> {
    let held: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(held.len());
    for (s, l) in &held {
        let candle_core::Storage::Cpu(s) = &**s else {
            candle_core::bail!("{what}: expects CPU tensors");
        };
        views.push(f32_slice(s, l, what)?);
    }
    f(&views)
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

/// One product for [`gemm_into`]: dst (m, n) = [dst +] scale · a (m, k) · b (k, n).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gemm {
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
    /// Add the product to what dst holds instead of overwriting it.
    pub(crate) accumulate: bool,
    pub(crate) scale: f32,
    /// Spread over rayon's threads; else on the calling one (for callers that already run
    /// many products in parallel).
    pub(crate) parallel: bool,
}

impl Gemm {
    /// dst = a · b, (m, k) · (k, n), on rayon's threads.
    pub(crate) fn new(m: usize, n: usize, k: usize) -> Self {
        Self {
            m,
            n,
            k,
            accumulate: false,
            scale: 1.0,
            parallel: true,
        }
    }

    /// dst += the product.
    pub(crate) fn accumulate(self) -> Self {
        Self {
            accumulate: true,
            ..self
        }
    }

    /// The product times `scale`.
    pub(crate) fn scaled(self, scale: f32) -> Self {
        Self { scale, ..self }
    }

    /// On the calling thread.
    pub(crate) fn serial(self) -> Self {
        Self {
            parallel: false,
            ..self
        }
    }
}

/// dst (m, n) row-major = [dst +] scale · a (m, k) · b (k, n), as `g` says.
pub(crate) fn gemm_into(dst: &mut [f32], a: Mat, b: Mat, g: Gemm) {
    assert!(dst.len() >= g.m * g.n && a.covers(g.m, g.k) && b.covers(g.k, g.n));
    if g.m == 0 || g.n == 0 {
        return;
    }
    // SAFETY: dst holds m·n initialized values and the inputs cover their shapes (checked
    // above); dst is exclusively borrowed, so it overlaps neither input.
    unsafe { gemm_raw(dst.as_mut_ptr(), a, b, g) }
}

/// scale · a (m, k) · b (k, n) as a new row-major (m, n) buffer that the product writes
/// without a zero fill first (`g.accumulate` must be off): the fills of the training ops'
/// outputs were a fifteenth of a small model's step.
pub(crate) fn gemm_new(a: Mat, b: Mat, g: Gemm) -> Vec<f32> {
    assert!(!g.accumulate && a.covers(g.m, g.k) && b.covers(g.k, g.n));
    let len = g.m * g.n;
    if len == 0 || g.k == 0 {
        return vec![0f32; len];
    }
    let mut dst = Vec::with_capacity(len);
    // SAFETY: the buffer has room for m·n values; without `accumulate` gemm writes every one
    // of them and reads none (read_dst false), so all are initialized before set_len. The
    // inputs cover their shapes (checked above) and cannot overlap the new buffer.
    unsafe {
        gemm_raw(dst.as_mut_ptr(), a, b, g);
        dst.set_len(len);
    }
    dst
}

/// The product into dst as `g` says (dst read only when accumulating).
///
/// # Safety
/// dst must be valid for m·n writes (and reads when `g.accumulate`), overlap neither input,
/// and a, b must cover (m, k) and (k, n).
#[allow(unsafe_code)]
unsafe fn gemm_raw(dst: *mut f32, a: Mat, b: Mat, g: Gemm) {
    let Gemm {
        m,
        n,
        k,
        accumulate: acc,
        scale,
        parallel,
    } = g;
    // SAFETY: the caller's contract.
    // gemm: dst[i·rs + j·cs] = α·dst + β·Σ_l lhs[i·rs + l·cs]·rhs[l·rs + j·cs].
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
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
