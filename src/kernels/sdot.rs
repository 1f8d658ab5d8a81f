//! An f32 matrix multiply as dot products along K, with AVX-512, for the narrow products
//! that [`sgemm`](super::sgemm) cannot fill: fewer than 16 output columns (a 1x1 conv on 2x2
//! or 3x3 planes at batch 1) or a right-hand matrix whose columns, not rows, are contiguous
//! (a 1x1 conv on 1x1 planes, whose weights enter transposed).
//!
//! Why: vectorised along N, a product of 4 columns fills a quarter of each 16-lane vector
//! (about 14 GMAC/s, in our GEMM and in the `gemm` crate alike); those layers were 40% of a
//! batch-1 MobileNet V2 at 32x32. Along K every lane works: `C[i][j] = A[i,:] . Bt[j,:]`
//! with `A`'s rows and `Bt`'s rows (the columns of `B`) contiguous, four rows of each per
//! tile (16 accumulators, 8 loads per 16 FMAs), reduced across lanes once per tile. When
//! `B`'s columns are strided, they are first copied into `Bt` (N x K, at most 15 x K here).

use super::sgemm;

/// Output rows and columns per tile.
const T: usize = 4;

/// Whether the kernel runs here (the CPU has AVX-512).
pub(crate) fn available() -> bool {
    sgemm::available()
}

/// `C = A B` or, with `accumulate`, `C += A B`: `A` is `m x k` with row `i` at
/// `a[i * lda..i * lda + k]`; `B` is `k x n` with element (p, j) at `b[p * rs + j * cs]`;
/// `C` has row `i` at `c[i * ldc..i * ldc + n]`. Panics if an operand is too short or the CPU
/// lacks AVX-512.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sdot(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    lda: usize,
    b: &[f32],
    (rs, cs): (usize, usize),
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert!(available(), "sdot needs AVX-512");
    if m == 0 || n == 0 || k == 0 {
        assert!(
            k > 0 || accumulate,
            "sdot: an empty product is the caller's to clear"
        );
        return;
    }
    assert!((m - 1) * lda + k <= a.len(), "sdot: A too short");
    assert!((k - 1) * rs + (n - 1) * cs < b.len(), "sdot: B too short");
    assert!(
        ldc >= n && (m - 1) * ldc + n <= c.len(),
        "sdot: C too short"
    );
    // `B`'s columns as contiguous rows: in place when they already are.
    let packed;
    let (bt, ldbt) = if rs == 1 {
        (b, cs)
    } else {
        packed = (0..n)
            .flat_map(|j| (0..k).map(move |p| b[p * rs + j * cs]))
            .collect::<Vec<f32>>();
        (&packed[..], k)
    };
    // SAFETY: AVX-512 is present (asserted); every row read lies within the checked bounds
    // (`bt` rows: `(n - 1) * ldbt + k` values, by the check on `B` or by construction).
    unsafe { x86::all(m, n, k, a, lda, bt, ldbt, c, ldc, accumulate) }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::T;
    use std::arch::x86_64::*;

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn all(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        lda: usize,
        bt: &[f32],
        ldbt: usize,
        c: &mut [f32],
        ldc: usize,
        acc: bool,
    ) {
        // The last 1-16 values of each row: a masked load.
        let tail = k - (k - 1) / 16 * 16;
        let mask: __mmask16 = if tail == 16 {
            0xffff
        } else {
            (1u16 << tail) - 1
        };
        let ops = (a.as_ptr(), lda, bt.as_ptr(), ldbt, k, mask);
        for i0 in (0..m).step_by(T) {
            for j0 in (0..n).step_by(T) {
                let (rows, cols) = ((m - i0).min(T), (n - j0).min(T));
                let out = &mut c[i0 * ldc + j0..];
                // SAFETY: rows i0.. and j0.. exist for the tile's size (the caller's bounds).
                unsafe {
                    match (rows == T, cols == T) {
                        (true, true) => tile::<T, T>(ops, i0, j0, out, ldc, acc),
                        (true, false) => narrow::<T>(cols, ops, i0, j0, out, ldc, acc),
                        (false, true) => short::<T>(rows, ops, i0, j0, out, ldc, acc),
                        (false, false) => {
                            for i in 0..rows {
                                for j in 0..cols {
                                    let o = &mut out[i * ldc + j..];
                                    tile::<1, 1>(ops, i0 + i, j0 + j, o, ldc, acc);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    type Ops = (*const f32, usize, *const f32, usize, usize, __mmask16);

    /// A tile of fewer than `T` columns.
    #[target_feature(enable = "avx512f")]
    unsafe fn narrow<const R: usize>(
        cols: usize,
        ops: Ops,
        i0: usize,
        j0: usize,
        out: &mut [f32],
        ldc: usize,
        acc: bool,
    ) {
        for j in 0..cols {
            // SAFETY: as for `tile`.
            unsafe { tile::<R, 1>(ops, i0, j0 + j, &mut out[j..], ldc, acc) }
        }
    }

    /// A tile of fewer than `T` rows.
    #[target_feature(enable = "avx512f")]
    unsafe fn short<const P: usize>(
        rows: usize,
        ops: Ops,
        i0: usize,
        j0: usize,
        out: &mut [f32],
        ldc: usize,
        acc: bool,
    ) {
        for i in 0..rows {
            // SAFETY: as for `tile`.
            unsafe { tile::<1, P>(ops, i0 + i, j0, &mut out[i * ldc..], ldc, acc) }
        }
    }

    /// `out[i][j] (+)= A[i0 + i] . Bt[j0 + j]` for an `R x P` tile: the K loop in 16-lane
    /// vectors (the last one masked), then one reduction per output.
    ///
    /// # Safety
    /// AVX-512F; rows `i0..i0 + R` of `A` and `j0..j0 + P` of `Bt` hold `k` values, and `out`
    /// has `R` rows of `P` values at stride `ldc` (checked by slicing).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize, const P: usize>(
        (a, lda, bt, ldbt, k, mask): Ops,
        i0: usize,
        j0: usize,
        out: &mut [f32],
        ldc: usize,
        acc: bool,
    ) {
        let mut sum = [[_mm512_setzero_ps(); P]; R];
        let full = (k - 1) / 16;
        unsafe {
            let arow = |i: usize| a.add((i0 + i) * lda);
            let brow = |j: usize| bt.add((j0 + j) * ldbt);
            for q in 0..=full {
                let (at, m) = (q * 16, if q == full { mask } else { 0xffff });
                let mut bv = [_mm512_setzero_ps(); P];
                for (j, v) in bv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(m, brow(j).add(at));
                }
                for (i, row) in sum.iter_mut().enumerate() {
                    let av = _mm512_maskz_loadu_ps(m, arow(i).add(at));
                    for j in 0..P {
                        row[j] = _mm512_fmadd_ps(av, bv[j], row[j]);
                    }
                }
            }
        }
        for (i, row) in sum.iter().enumerate() {
            let o = &mut out[i * ldc..i * ldc + P];
            for (j, &v) in row.iter().enumerate() {
                let s = _mm512_reduce_add_ps(v);
                o[j] = if acc { o[j] + s } else { s };
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn all(
        _: usize,
        _: usize,
        _: usize,
        _: &[f32],
        _: usize,
        _: &[f32],
        _: usize,
        _: &mut [f32],
        _: usize,
        _: bool,
    ) {
        unreachable!("sdot::available() is false off x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Against a plain triple loop in f64, for both layouts of `B`, both write modes, and
    /// sizes around the tile and vector edges.
    #[test]
    fn matches_the_reference_on_edge_shapes() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        for &m in &[1, 3, 4, 5, 9] {
            for &n in &[1, 2, 4, 7, 9, 15] {
                for &k in &[1, 15, 16, 17, 40, 160] {
                    for &(columns_contiguous, accumulate) in &[(false, false), (true, true)] {
                        let lda = k + 3;
                        let a = Rng::new(1).normals(m * lda);
                        // B as k x n: rows contiguous (rs = n + 1, cs = 1) or columns
                        // contiguous (rs = 1, cs = k + 2).
                        let (rs, cs) = if columns_contiguous {
                            (1, k + 2)
                        } else {
                            (n + 1, 1)
                        };
                        let b = Rng::new(2).normals(k * rs.max(1) + n * cs + 1);
                        let ldc = n + 2;
                        let c0 = Rng::new(3).normals(m * ldc);
                        let mut ours = c0.clone();
                        sdot((m, n, k), &a, lda, &b, (rs, cs), &mut ours, ldc, accumulate);
                        for i in 0..m {
                            for j in 0..ldc {
                                let got = ours[i * ldc + j];
                                if j >= n {
                                    assert_eq!(got.to_bits(), c0[i * ldc + j].to_bits());
                                    continue;
                                }
                                let mut s = 0f64;
                                for p in 0..k {
                                    s += a[i * lda + p] as f64 * b[p * rs + j * cs] as f64;
                                }
                                let want = if accumulate {
                                    c0[i * ldc + j] + s as f32
                                } else {
                                    s as f32
                                };
                                assert!(
                                    (got - want).abs() <= 1e-5 * (k as f32).sqrt() * 4.0,
                                    "m {m} n {n} k {k} ({columns_contiguous}): C[{i}][{j}] = \
                                     {got}, reference {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
