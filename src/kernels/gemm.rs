//! A bounds-checked, strided f32 matrix multiply on top of the `gemm` crate (the one Candle's
//! CPU matmul uses).
//!
//! Why not `Tensor::matmul`: the convolution kernels multiply sub-matrices of larger buffers
//! (one group of one sample, a transposed weight) into sub-matrices of their output, possibly
//! accumulating, from inside a parallel loop. Strided views over slices do that without
//! copies or tensor allocations.

use super::sgemm;
pub(crate) use gemm::Parallelism;

/// A read-only `rows x cols` matrix: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// Panics if an element lies outside `data`.
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < data.len(),
            "matrix {rows}x{cols} (strides {rs}, {cs}) exceeds its {} values",
            data.len()
        );
        MatRef {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// A row-major matrix over the start of `data`.
    pub(crate) fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    pub(crate) fn n_rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn n_cols(&self) -> usize {
        self.cols
    }

    /// The transpose (no copy).
    pub(crate) fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// A writable row-major `rows x cols` matrix over the start of `data`.
pub(crate) struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
}

impl<'a> MatMut<'a> {
    /// Panics if `data` is too short.
    pub(crate) fn rows(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        assert!(
            rows * cols <= data.len(),
            "output matrix exceeds its buffer"
        );
        MatMut { data, rows, cols }
    }
}

/// `dst = a * b`, or `dst += a * b` when `accumulate`: on our AVX-512 kernel ([`sgemm`])
/// when the CPU has AVX-512, `b` has contiguous rows and the product is wide enough, else
/// on the `gemm` crate. Both sum each output along K in order, one FMA after another, as
/// onnxruntime and tract do: the int8 simulation (`passes::quant`) rounds these sums, and
/// another order moved its outputs by up to 7 quantization steps from tract's run of the
/// same QDQ export (a dot-product kernel along K, tried for narrow products, was dropped
/// for that).
pub(crate) fn matmul(dst: MatMut, accumulate: bool, a: MatRef, b: MatRef, par: Parallelism) {
    let (m, n, k) = (dst.rows, dst.cols, a.cols);
    assert!(
        a.rows == m && b.rows == k && b.cols == n,
        "matmul shapes: {}x{} * {}x{} into {m}x{n}",
        a.rows,
        a.cols,
        b.rows,
        b.cols
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.data[..m * n].fill(0.0);
        }
        return;
    }
    if b.cs == 1 && sgemm::available() && sgemm::worthwhile(n) {
        let threads = threads_of(par);
        sgemm::sgemm(
            (m, n, k),
            a.data,
            (a.rs, a.cs),
            b.data,
            b.rs,
            dst.data,
            n,
            accumulate,
            threads,
        );
        return;
    }
    // SAFETY: every index the product touches lies inside the slices (checked by the
    // constructors), `dst` is uniquely borrowed and so cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// `dst = a * b^T`, or `dst += a * b^T` with `accumulate`, for training's weight gradients
/// (`dW = dY cols^T`, both operands as they lie in memory): on [`sgemm`] with `B` read
/// transposed ([`BRows::Transposed`](sgemm::BRows): each panel transposed as it is packed)
/// when the CPU has AVX-512, both operands have contiguous rows and `b` has at least a
/// vector of rows; else on [`matmul`]. Sums along K in order, as [`matmul`]'s.
pub(crate) fn matmul_bt(dst: MatMut, accumulate: bool, a: MatRef, b: MatRef, par: Parallelism) {
    let (m, n, k) = (dst.rows, dst.cols, a.cols);
    assert!(
        a.rows == m && b.rows == n && b.cols == k,
        "matmul_bt shapes: {}x{} * ({}x{})^T into {m}x{n}",
        a.rows,
        a.cols,
        b.rows,
        b.cols
    );
    if a.cs == 1 && b.cs == 1 && sgemm::available() && sgemm::worthwhile(n) {
        sgemm::sgemm_rows(
            (m, n, k),
            a.data,
            (a.rs, 1),
            b.data,
            sgemm::BRows::Transposed(b.rs),
            dst.data,
            n,
            accumulate,
            threads_of(par),
        );
        return;
    }
    matmul(dst, accumulate, a, b.t(), par);
}

/// The threads a `Parallelism` asks our kernels for (they split over the spinning team, not
/// through the `gemm` crate's rayon parallelism).
fn threads_of(par: Parallelism) -> usize {
    match par {
        Parallelism::Rayon(0) => rayon::current_num_threads(),
        Parallelism::Rayon(t) => t,
        _ => 1,
    }
}

/// Rayon parallelism for one large product, none inside an already parallel loop.
pub(crate) fn parallelism(inside_parallel_loop: bool) -> Parallelism {
    let threads = rayon::current_num_threads();
    if inside_parallel_loop || threads <= 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads)
    }
}
