//! `C = A B^T` (or `C += A B^T`) where `A` (m x k) and `B` (n x k) both have contiguous rows:
//! the weight gradient of a convolution, `dW = dY cols^T`, whose inner dimension is the
//! output plane (times the samples of a batched run) and whose operands are the gradient and
//! the column matrix as they lie in memory.
//!
//! Why a kernel of its own: [`sgemm`](super::sgemm) needs `B` with contiguous rows along N,
//! which `cols^T` does not have, so these products went to the `gemm` crate, whose AVX2
//! micro-kernel (8 lanes, plus packing both operands) was 15-18% of a SqueezeNet training
//! step on this AVX-512 machine. Here each output is a dot product along K: a 4 x 4 tile of
//! `C` keeps 16 vector accumulators, and each step of 16 values of K costs 8 loads and 16
//! FMAs, straight from both operands; the lanes are summed once per block of K.
//!
//! The sums run along K in 16 interleaved lanes (then across them), not one after another:
//! this is for training's gradients only. The products whose rounding the int8 simulation
//! depends on go through [`matmul`](super::gemm::matmul), which keeps K's order.
//!
//! Blocking: K in blocks of [`KC`] values (a tile's 8 rows of a block, 64 KB, stay in L1/L2
//! while the 16 vectors of each step stream in), and within a block the rows of `A` in runs
//! of [`MC`] (about 256 KB) that every 4 rows of `B` pass over.

use super::{cpu::SharedMut, team};

/// Rows of `A` (and of `C`) per tile.
const TR: usize = 4;
/// Rows of `B` (columns of `C`) per tile.
const TC: usize = 4;
/// Values of K per block: the accumulators are summed across their lanes once per block.
const KC: usize = 2048;
/// Rows of `A` per run within a block of K.
const MC: usize = 32;

/// Whether this CPU runs the kernel (AVX-512F, unless `SLIMCANDLE_SIMD` caps the level).
pub(crate) fn available() -> bool {
    super::sgemm::available()
}

/// `C = A B^T`, or with `accumulate` `C += A B^T`. Row `i` of `A` is `a[i * lda..][..k]`,
/// row `j` of `B` is `b[j * ldb..][..k]`, row `i` of `C` is `c[i * ldc..][..n]`. `threads` > 1
/// splits the rows of `C` over the spinning team (`team.rs`). Panics if an operand is too short or the CPU
/// lacks AVX-512.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_nt(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    assert!(available(), "gemm_nt needs AVX-512");
    if !super::sgemm::has_work("gemm_nt", (m, n, k), c, ldc, accumulate) {
        return;
    }
    assert!(
        lda >= k && (m - 1) * lda + k <= a.len(),
        "gemm_nt: A too short"
    );
    assert!(
        ldb >= k && (n - 1) * ldb + k <= b.len(),
        "gemm_nt: B too short"
    );
    let c_shared = SharedMut::new(c);
    let run = |rows: std::ops::Range<usize>| {
        // SAFETY: AVX-512F is present (asserted); the tiles read rows < m of `A` and < n of
        // `B`, `k` values each, and write rows `rows` (< m) and columns < n of `C`, all
        // within the bounds checked above; parallel runs take disjoint rows of `C`, and `c`
        // outlives them.
        unsafe {
            x86::rows(
                (n, k),
                (a, lda),
                (b, ldb),
                (c_shared.as_ptr(), ldc),
                accumulate,
                rows,
            )
        }
    };
    // Whole tiles of rows per thread, on the spinning team as `sgemm`'s panels.
    let tiles = m.div_ceil(TR);
    if threads <= 1 {
        run(0..m);
    } else {
        team::run_parts(tiles, threads, &|t| run(t.start * TR..(t.end * TR).min(m)));
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{KC, MC, TC, TR};
    use crate::kernels::simd::first_lanes;
    use std::arch::x86_64::*;

    /// Rows `rows` of `C` (see [`gemm_nt`](super::gemm_nt) for the operands).
    ///
    /// # Safety
    /// AVX-512F must be present; `a` holds rows `rows` of `k` values at stride `lda`, `b`
    /// holds `n` rows of `k` values at stride `ldb`, `c` is writable for rows `rows` and
    /// columns `< n` at stride `ldc`, and no other thread writes those rows.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows(
        (n, k): (usize, usize),
        (a, lda): (&[f32], usize),
        (b, ldb): (&[f32], usize),
        (c, ldc): (*mut f32, usize),
        accumulate: bool,
        rows: std::ops::Range<usize>,
    ) {
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            // The first block writes `C` (unless accumulating), the others add to it.
            let add = accumulate || k0 > 0;
            for i1 in (rows.start..rows.end).step_by(MC) {
                let i_end = (i1 + MC).min(rows.end);
                for j0 in (0..n).step_by(TC) {
                    let cols = TC.min(n - j0);
                    // SAFETY (pointer arithmetic): rows < m of `A`, < n of `B`, values
                    // k0..k0 + kc < k; see the function's contract.
                    let bp = unsafe { b.as_ptr().add(j0 * ldb + k0) };
                    for i0 in (i1..i_end).step_by(TR) {
                        let r = TR.min(i_end - i0);
                        let ap = unsafe { a.as_ptr().add(i0 * lda + k0) };
                        let cp = unsafe { c.add(i0 * ldc + j0) };
                        let t = Tile {
                            kc,
                            ap,
                            lda,
                            bp,
                            ldb,
                            cp,
                            ldc,
                            add,
                        };
                        unsafe {
                            match (r, cols) {
                                (4, 4) => t.run::<4, 4>(),
                                (4, 3) => t.run::<4, 3>(),
                                (4, 2) => t.run::<4, 2>(),
                                (4, 1) => t.run::<4, 1>(),
                                (3, 4) => t.run::<3, 4>(),
                                (3, 3) => t.run::<3, 3>(),
                                (3, 2) => t.run::<3, 2>(),
                                (3, 1) => t.run::<3, 1>(),
                                (2, 4) => t.run::<2, 4>(),
                                (2, 3) => t.run::<2, 3>(),
                                (2, 2) => t.run::<2, 2>(),
                                (2, 1) => t.run::<2, 1>(),
                                (1, 4) => t.run::<1, 4>(),
                                (1, 3) => t.run::<1, 3>(),
                                (1, 2) => t.run::<1, 2>(),
                                (1, 1) => t.run::<1, 1>(),
                                _ => unreachable!("tiles have 1 to {TR} x 1 to {TC} outputs"),
                            }
                        }
                    }
                }
            }
        }
    }

    /// One tile's operands: `R` rows of `A` from `ap`, `C` rows of `B` from `bp`, `kc`
    /// values each; the `R x C` outputs at `cp`, written or (with `add`) added to.
    struct Tile {
        kc: usize,
        ap: *const f32,
        lda: usize,
        bp: *const f32,
        ldb: usize,
        cp: *mut f32,
        ldc: usize,
        add: bool,
    }

    impl Tile {
        /// 16 values of K (the lanes of `mask`) from every row, into the accumulators.
        ///
        /// # Safety
        /// AVX-512F; the operands as described on [`Tile`], `p + 16 <= kc` or the lanes of
        /// `mask` within `kc`.
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn step<const R: usize, const C: usize>(
            &self,
            p: usize,
            mask: __mmask16,
            sum: &mut [[__m512; C]; R],
        ) {
            unsafe {
                let mut bv = [_mm512_setzero_ps(); C];
                for (j, v) in bv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(mask, self.bp.add(j * self.ldb + p));
                }
                for (i, row) in sum.iter_mut().enumerate() {
                    let av = _mm512_maskz_loadu_ps(mask, self.ap.add(i * self.lda + p));
                    for j in 0..C {
                        row[j] = _mm512_fmadd_ps(av, bv[j], row[j]);
                    }
                }
            }
        }

        /// # Safety
        /// AVX-512F; the operands as described on [`Tile`].
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn run<const R: usize, const C: usize>(&self) {
            unsafe {
                let mut sum = [[_mm512_setzero_ps(); C]; R];
                let full = self.kc / 16 * 16;
                for p in (0..full).step_by(16) {
                    self.step(p, 0xffff, &mut sum);
                }
                if full < self.kc {
                    self.step(full, first_lanes(self.kc - full), &mut sum);
                }
                for (i, row) in sum.iter().enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        let out = self.cp.add(i * self.ldc + j);
                        let s = _mm512_reduce_add_ps(v);
                        *out = if self.add { *out + s } else { s };
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub(super) unsafe fn rows(
        _: (usize, usize),
        _: (&[f32], usize),
        _: (&[f32], usize),
        _: (*mut f32, usize),
        _: bool,
        _: std::ops::Range<usize>,
    ) {
        unreachable!("gemm_nt::available() is false off x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The scalar reference: a plain triple loop in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        (m, n, k): (usize, usize, usize),
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|p| a[i * lda + p] as f64 * b[j * ldb + p] as f64)
                    .sum();
                let out = &mut c[i * ldc + j];
                *out = if accumulate {
                    *out + s as f32
                } else {
                    s as f32
                };
            }
        }
    }

    fn random(len: usize, rng: &mut Rng) -> Vec<f32> {
        (0..len).map(|_| rng.uniform() as f32 * 2.0 - 1.0).collect()
    }

    #[test]
    fn matches_the_reference_on_edge_shapes() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let mut rng = Rng::new(11);
        // Edge tiles in both directions, K tails, K blocks (2048 + tail), runs of rows.
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 7),
            (4, 4, 16),
            (5, 9, 33),
            (16, 27, 100),
            (37, 6, 2049),
            (70, 13, 4100),
            (8, 64, 1024),
        ] {
            for &(accumulate, threads) in &[(false, 1), (true, 1), (false, 2), (true, 3)] {
                // Strides wider than the rows, as in a sub-matrix.
                let (lda, ldb, ldc) = (k + 3, k + 1, n + 2);
                let a = random(m * lda, &mut rng);
                let b = random(n * ldb, &mut rng);
                let c0 = random(m * ldc, &mut rng);
                let (mut got, mut want) = (c0.clone(), c0.clone());
                gemm_nt(
                    (m, n, k),
                    &a,
                    lda,
                    &b,
                    ldb,
                    &mut got,
                    ldc,
                    accumulate,
                    threads,
                );
                reference((m, n, k), &a, lda, &b, ldb, &mut want, ldc, accumulate);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (k as f32).sqrt() * (1.0 + w.abs());
                    assert!(
                        (g - w).abs() <= tol,
                        "{m}x{n}x{k} acc {accumulate} threads {threads}: C[{i}] {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn empty_inner_dimension_clears_or_keeps_c() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let mut c = vec![1.5f32; 6];
        gemm_nt((2, 3, 0), &[], 0, &[], 0, &mut c, 3, true, 1);
        assert_eq!(c, vec![1.5; 6]);
        gemm_nt((2, 3, 0), &[], 0, &[], 0, &mut c, 3, false, 1);
        assert_eq!(c, vec![0.0; 6]);
    }
}
