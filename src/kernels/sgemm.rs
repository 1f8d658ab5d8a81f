//! An f32 matrix multiply with an AVX-512 micro-kernel of our own, for the products whose
//! right-hand matrix has contiguous rows: `C = A B` (or `C += A B`), `B` K x N with unit
//! column stride, `C` row-major. That is every convolution's forward product in NCHW
//! (`Y = W cols`, or `Y = W X` for a 1x1 convolution) and the input-gradient product
//! (`dcols = W^T dY`).
//!
//! Why: the `gemm` crate is built here for baseline x86-64, so it runs its AVX2 micro-kernel
//! (8-wide) on CPUs with AVX-512 (16-wide, two FMA units on the server cores we run on); at
//! batch 1 that micro-kernel was 53-58% of a MobileNet V2 forward pass. Its `x86-v4` feature
//! brought less (5-10%) and five minutes of build time. The shapes of small CNNs are narrow
//! (K = 8 to 1,280 input channels), where packing the operands on every call, as a general
//! GEMM does, costs a visible share; this kernel reads both in place.
//!
//! Blocking, for each column panel of [`NR`] = 32 columns (two vectors): every row block of
//! [`MR`] = 12 rows runs the whole K loop with its 12 x 32 tile of `C` in 24 registers; per
//! k, two loads of `B`'s row and 12 broadcasts of `A`'s values, 24 FMAs. The panel of `B`
//! (K x 32 values) stays in L1/L2 while every row block passes over it, so `B` comes from
//! memory once. The last panel's last vector is masked, so any N works without a copy.
//! Threads take contiguous runs of panels, on the spinning team (`team.rs`): the callers that
//! ask for threads are the batch-1 layers, whose jobs come back to back.
//!
//! [`matmul`](super::gemm::matmul) sends a product here when the CPU has AVX-512 and the
//! product has at least a vector of columns ([`worthwhile`]); everything else stays on
//! the `gemm` crate.

use super::{cpu::SharedMut, team};

/// Rows of `C` per micro-tile (12 x 2 accumulator registers).
pub(crate) const MR: usize = 12;
/// Columns of `C` per micro-tile: two 16-float vectors.
pub(crate) const NR: usize = 32;

/// Whether this CPU runs the kernel (AVX-512F, unless `SLIMCANDLE_SIMD` caps the level).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::simd::level() == super::simd::Level::Avx512
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether a product with `n` columns is better here than in the `gemm` crate: at least one
/// full vector of columns.
pub(crate) fn worthwhile(n: usize) -> bool {
    n >= 16
}

/// `C = A B` or, with `accumulate`, `C += A B`. `A` is `m x k` with element (i, p) at
/// `a[i * a_rs + p * a_cs]`, `B` is `k x n` with row `p` at `b[p * ldb..p * ldb + n]`, `C`
/// has row `i` at `c[i * ldc..i * ldc + n]`. `threads` > 1 splits the column panels over
/// the team of spinning threads. Panics if an operand is too short or the CPU lacks AVX-512.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    shape: (usize, usize, usize),
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    sgemm_rows(
        shape,
        a,
        a_strides,
        b,
        BRows::Strided(ldb),
        c,
        ldc,
        accumulate,
        threads,
    );
}

/// Where each row of `B` starts in its buffer (the row's first of `n` contiguous values).
#[derive(Clone, Copy)]
pub(crate) enum BRows<'a> {
    /// Row `p` at `p * ldb`: a row-major matrix.
    Strided(usize),
    /// Row `p` at `offsets[p]`: rows that are shifted, overlapping views of one buffer, as an
    /// implicit-GEMM convolution's taps over its padded input
    /// ([`conv_implicit`](super::conv_implicit)), which then needs no column matrix.
    At(&'a [usize]),
    /// `B` given transposed: element `(p, j)` at `p + j * ldb`, so that `C = A X^T` for a
    /// row-major `X` (n x k). Each panel is transposed into the packed buffer as it is
    /// packed; this is the weight gradient's product `dW = dY cols^T`.
    Transposed(usize),
    /// `B` packed once by [`pack_panels`], panel by panel: the tiles read each panel's rows
    /// one after the other. For constant right-hand matrices (the channels-last
    /// convolutions' weights, packed once per `infer::Engine`).
    Panels,
}

/// Values of a `k x n` matrix packed by [`pack_panels`]: `n` rounded up to whole panels.
pub(crate) fn panels_len(k: usize, n: usize) -> usize {
    n.div_ceil(NR) * NR * k
}

/// Packs the `k x n` matrix `b` (row `p` at `b[p * ldb..p * ldb + n]`) into `out`
/// ([`panels_len`] values) for [`BRows::Panels`]: column panel `t` (columns `t NR..`) as `k`
/// rows of `NR` values from `t k NR`, the columns past `n` zero. Why: a row-major `B` puts
/// a panel's `k` rows of 128 bytes a row stride apart; at strides of 1 or 2 KiB (256 or 512
/// output channels) they fall on 8 or 4 of L1's 64 sets, so a panel of 256 rows (32 KiB)
/// cannot stay in L1 while the row tiles pass over it, and each row is a separate stream
/// for the prefetchers. Packed, a panel is one sequential run.
pub(crate) fn pack_panels(b: &[f32], ldb: usize, (k, n): (usize, usize), out: &mut [f32]) {
    assert!(
        out.len() >= panels_len(k, n),
        "pack_panels: output too short"
    );
    assert!(
        k == 0 || n == 0 || (k - 1) * ldb + n <= b.len(),
        "pack_panels: B too short"
    );
    for (t, panel) in out
        .chunks_exact_mut(k * NR)
        .take(n.div_ceil(NR))
        .enumerate()
    {
        let (j0, cols) = (t * NR, NR.min(n - t * NR));
        for (p, row) in panel.chunks_exact_mut(NR).enumerate() {
            row[..cols].copy_from_slice(&b[p * ldb + j0..][..cols]);
            row[cols..].fill(0.0);
        }
    }
}

/// [`sgemm`] with `B`'s rows wherever `rows` says (see [`BRows`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_rows(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    rows: BRows,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    assert!(available(), "sgemm needs AVX-512");
    if !has_work("sgemm", (m, n, k), c, ldc, accumulate) {
        return;
    }
    // Checked arithmetic: a wrapped sum would pass the checks that keep the kernel in bounds.
    let a_end = ((m - 1).checked_mul(a_rs))
        .zip((k - 1).checked_mul(a_cs))
        .and_then(|(r, c)| r.checked_add(c));
    assert!(a_end.is_some_and(|e| e < a.len()), "sgemm: A too short");
    let b_end = match rows {
        BRows::Strided(ldb) => (k - 1).checked_mul(ldb).and_then(|r| r.checked_add(n)),
        BRows::At(offsets) => {
            assert!(offsets.len() >= k, "sgemm: fewer row offsets than K");
            offsets[..k]
                .iter()
                .copied()
                .max()
                .and_then(|r| r.checked_add(n))
        }
        BRows::Transposed(ldb) => (n - 1).checked_mul(ldb).and_then(|r| r.checked_add(k)),
        BRows::Panels => Some(panels_len(k, n)),
    };
    assert!(b_end.is_some_and(|e| e <= b.len()), "sgemm: B too short");
    if !packs_a((m, n), (a_rs, a_cs)) {
        let a = ARef::Strided(a, a_rs, a_cs);
        run_panels((m, n, k), a, b, rows, c, ldc, accumulate, threads);
        return;
    }
    let mut packed = PACKED_A.with(|p| p.take());
    pack_a(a, (m, k), (a_rs, a_cs), &mut packed);
    run_panels(
        (m, n, k),
        ARef::Packed(&packed),
        b,
        rows,
        c,
        ldc,
        accumulate,
        threads,
    );
    PACKED_A.with(|p| p.replace(packed));
}

/// Where an implicit-GEMM convolution's left-hand matrix finds its rows in a zero-padded
/// channels-last input: element `(i, p)`, with `p = t cg + ci` (tap `t`, channel `ci`), at
/// `a[offsets[t] + i rs + ci]`. Row `i` is an output pixel of one output row (`rs` = the
/// stride times C), tap `t`'s offset the kernel position's shift in the padded input.
#[derive(Clone, Copy)]
pub(crate) struct Taps<'a> {
    pub offsets: &'a [usize],
    pub rs: usize,
    pub cg: usize,
}

/// `C = A B` (or `C += A B`) with `A` read in place through `taps` (see [`Taps`]; `K` =
/// taps x `cg`) and `B` packed by [`pack_panels`]: a convolution's product with no column
/// matrix. `A` is never packed (its rows are not strided), so the tiles broadcast from it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_taps(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    taps: Taps,
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    assert!(available(), "sgemm needs AVX-512");
    assert_eq!(
        k,
        taps.offsets.len() * taps.cg,
        "sgemm_taps: K is taps x channels"
    );
    if !has_work("sgemm", (m, n, k), c, ldc, accumulate) {
        return;
    }
    let a_end = taps
        .offsets
        .iter()
        .max()
        .and_then(|o| (m - 1).checked_mul(taps.rs).and_then(|r| r.checked_add(*o)))
        .and_then(|e| e.checked_add(taps.cg));
    assert!(
        a_end.is_some_and(|e| e <= a.len()),
        "sgemm_taps: A too short"
    );
    assert!(panels_len(k, n) <= b.len(), "sgemm_taps: B too short");
    run_panels(
        (m, n, k),
        ARef::Taps(a, taps),
        b,
        BRows::Panels,
        c,
        ldc,
        accumulate,
        threads,
    );
}

/// The fewest column panels for which a product packs `A` ([`pack_a`]): each panel reads
/// all of `A` again, so the packing (about a sixteenth of a panel's pass) pays from a few
/// panels on. Measured on one core (same process, alternating): 1587 x 64 x 144 (two panels)
/// lost 20% with the packing and gained 15% without it; 336 x 1,000 x 512 and
/// 128 x 2,048 x 288 gained 2-5% with it; 64 x 4,096 x 16 gained 24%.
const PACK_A_PANELS: usize = 8;

thread_local! {
    /// Each thread's packed `A` ([`pack_a`]), kept between calls.
    static PACKED_A: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Whether a product of `m` rows and `n` columns with `A` at strides `a_strides` packs `A`:
/// from [`PACK_A_PANELS`] panels, with a row block or more, for the two layouts that
/// [`pack_a`] copies with vector moves (rows or columns of `A` contiguous).
fn packs_a((m, n): (usize, usize), (rs, cs): (usize, usize)) -> bool {
    n.div_ceil(NR) >= PACK_A_PANELS && m >= MR && (cs == 1 || rs == 1)
}

/// Values of an `m x k` matrix packed by [`pack_a`]: whole row blocks of `MR` rows, and the
/// slack that the packing's 16-value stores may write past the last.
fn packed_a_len(m: usize, k: usize) -> usize {
    m.div_ceil(MR) * MR * k + 16
}

/// Packs `A` (`m x k`, element `(i, p)` at `a[i rs + p cs]`, with `cs` or `rs` 1) for the
/// micro-kernel: each block of `MR` rows as `k` runs of `MR` values (column by column), the
/// rows past `m` zero. Why: a tile then reads its twelve rows' values at constant offsets
/// from one pointer that steps by `MR` values per column, where a strided `A` took a chain
/// of twelve dependent address additions per column (the kernel's critical path). The
/// products' sums are unchanged, term for term.
fn pack_a(a: &[f32], (m, k): (usize, usize), (rs, cs): (usize, usize), packed: &mut Vec<f32>) {
    assert!(
        cs == 1 || rs == 1,
        "pack_a: rows or columns of A contiguous"
    );
    // Every value the kernel reads is written below (the transposes write zeros for the
    // rows past `m`; the copies clear them), so the buffer is not cleared first.
    packed.resize(packed_a_len(m, k), 0.0);
    let dst = packed.as_mut_ptr();
    for i0 in (0..m).step_by(MR) {
        let rows = MR.min(m - i0);
        if cs == 1 {
            for p0 in (0..k).step_by(16) {
                let lanes = 16.min(k - p0);
                // SAFETY: AVX-512 (the caller's `available()`); rows i0.. (`rows` of them)
                // are readable for `lanes` values from p0 (the caller checked A's extent);
                // packed column p (p0 <= p < p0 + lanes) is written for 16 values from
                // `i0 k + p MR`: within the block's `k MR` values but for the last column's
                // 4 past it, which the next column (written later) or the slack of
                // `packed_a_len` takes.
                unsafe {
                    let from = (a.as_ptr().add(i0 * rs + p0), rs);
                    let to = (dst.add(i0 * k + p0 * MR), MR);
                    super::transpose::x86::tile(from, (rows, lanes), to);
                }
            }
        } else {
            // Columns contiguous: column p's values of rows i0.. are one run.
            let block = &mut packed[i0 * k..(i0 + MR) * k];
            for (p, run) in block.chunks_exact_mut(MR).enumerate() {
                run[..rows].copy_from_slice(&a[p * cs + i0..][..rows]);
                run[rows..].fill(0.0);
            }
        }
    }
}

/// How `A` is stored: row-major at strides `(rs, cs)`, or packed by [`pack_a`].
#[derive(Clone, Copy)]
enum ARef<'a> {
    Strided(&'a [f32], usize, usize),
    Packed(&'a [f32]),
    Taps(&'a [f32], Taps<'a>),
}

/// The panels of a product on the team (or this thread); the operands checked by the caller.
#[allow(clippy::too_many_arguments)]
fn run_panels(
    (m, n, k): (usize, usize, usize),
    a: ARef,
    b: &[f32],
    rows: BRows,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    let panels = n.div_ceil(NR);
    let c_shared = SharedMut::new(c);
    let run = &|panels: std::ops::Range<usize>| {
        let c = (c_shared.as_ptr(), ldc);
        // SAFETY: every tile reads `A` and `k` rows of `B` within the checked bounds and
        // writes rows < m and columns < n of `C` (checked above); tasks take disjoint
        // panels, so no two write the same element, and `c` outlives them.
        unsafe {
            match a {
                ARef::Strided(a, rs, cs) => {
                    let a = x86::AStrided(a.as_ptr(), rs, cs);
                    panels_of(a, (m, n, k), b, rows, c, accumulate, panels)
                }
                ARef::Packed(a) => {
                    let a = x86::APacked(a.as_ptr(), k);
                    panels_of(a, (m, n, k), b, rows, c, accumulate, panels)
                }
                ARef::Taps(a, taps) => {
                    let a = x86::ATaps::new(a.as_ptr(), taps.offsets, taps.rs, taps.cg);
                    panels_of(a, (m, n, k), b, rows, c, accumulate, panels)
                }
            }
        }
    };
    if threads <= 1 {
        run(0..panels);
    } else {
        team::run_parts(panels, threads, run);
    }
}

/// [`x86::panels`] with `B` read as `rows` says.
///
/// # Safety
/// As `x86::panels`: the operands' extents checked by the caller.
unsafe fn panels_of<A: x86::ARead>(
    a: A,
    shape: (usize, usize, usize),
    b: &[f32],
    rows: BRows,
    c: (*mut f32, usize),
    accumulate: bool,
    panels: std::ops::Range<usize>,
) {
    // SAFETY: the caller's.
    unsafe {
        match rows {
            BRows::Strided(ldb) => {
                let b = x86::Strided(b.as_ptr(), ldb);
                x86::panels(shape, a, b, c, accumulate, panels)
            }
            BRows::At(offsets) => {
                let b = x86::Table(b.as_ptr(), offsets.as_ptr());
                x86::panels(shape, a, b, c, accumulate, panels)
            }
            BRows::Transposed(ldb) => {
                let b = x86::Transposed(b.as_ptr(), ldb);
                x86::panels(shape, a, b, c, accumulate, panels)
            }
            BRows::Panels => {
                let b = x86::PanelMajor(b.as_ptr(), shape.2);
                x86::panels(shape, a, b, c, accumulate, panels)
            }
        }
    }
}

/// Checks that `C` (m rows of n values, `ldc` apart) fits in `c` and settles the products
/// with nothing to multiply: none when `m` or `n` is 0; with `k` = 0, `C = 0` (or, with
/// `accumulate`, `C` unchanged). Returns whether a product remains to compute.
fn has_work(
    who: &str,
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) -> bool {
    if m == 0 || n == 0 {
        return false;
    }
    assert!(
        ldc >= n && (m - 1) * ldc + n <= c.len(),
        "{who}: C too short"
    );
    if k == 0 {
        if !accumulate {
            for row in c.chunks_mut(ldc).take(m) {
                row[..n].fill(0.0);
            }
        }
        return false;
    }
    true
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use crate::kernels::simd::first_lanes;
    use std::arch::x86_64::*;

    /// How a tile finds row `p` of `B` (from the panel's first column): monomorphised, so
    /// the strided case compiles to the pointer step it always was.
    pub(super) trait RowAt: Copy {
        /// Row `p`'s first value.
        ///
        /// # Safety
        /// `p < k`, and the row within `B` (checked by the caller).
        unsafe fn at(self, p: usize) -> *const f32;
        /// The same rows, `j` columns further on.
        ///
        /// # Safety
        /// Column `j` within every row.
        unsafe fn at_column(self, j: usize) -> Self;
        /// The same rows from row `p` on.
        ///
        /// # Safety
        /// `p < k`.
        unsafe fn at_row(self, p: usize) -> Self;
        /// Whether a product of `m` rows packs the panels ([`pack_panel`]): when more than
        /// two row blocks read each panel and its rows lie a page (4 KiB) or more apart.
        fn packed(self, m: usize) -> bool;
        /// Whether the first row block of a panel prefetches the next panel's rows: they
        /// are `k` streams a row stride apart, unless `B` is packed panel by panel, where
        /// prefetching them was slower (MobileNet V1 0.5's 2x2 512 -> 512 products at batch
        /// 1: 28-31 us against 25).
        fn prefetches(self) -> bool {
            true
        }
        /// Copies the `k` rows of the panel's `cols` (<= `NR`) columns into `packed`, `NR`
        /// values apart.
        ///
        /// # Safety
        /// `k` rows and `cols` columns within `B`; `packed` holds `k NR` values.
        #[target_feature(enable = "avx512f")]
        unsafe fn pack(self, k: usize, cols: usize, packed: &mut [f32]) {
            unsafe { pack_panel(k, self, cols, packed) }
        }
    }

    /// How a tile reads `A`'s values: monomorphised like [`RowAt`], so that a packed `A`
    /// is read at constant offsets from one pointer.
    pub(super) trait ARead: Copy {
        /// Row `r`'s value (from the tile's first row) at the current column.
        ///
        /// # Safety
        /// Row and column within `A`.
        unsafe fn value(self, r: usize) -> f32;
        /// The same rows, one column on (past the last one only if it is not read).
        fn next(self) -> Self;
        /// The row block from row `i0` (a multiple of `MR`) on, at the same column.
        ///
        /// # Safety
        /// `i0` within `A`.
        unsafe fn rows_from(self, i0: usize) -> Self;
        /// The same rows, `p` columns on (the K blocks of a packed `B`).
        fn skip_columns(self, p: usize) -> Self;
        /// What the tile's inner loop reads the columns from the current one with, and how
        /// many columns that reader covers before `A`'s layout jumps (`usize::MAX`: none):
        /// the taps of an implicit convolution, each a plain strided run.
        type Run: ARead;
        fn run(self) -> (Self::Run, usize);
    }

    /// `A`'s element `(i, p)` at `base + i rs + p cs`.
    #[derive(Clone, Copy)]
    pub(super) struct AStrided(pub *const f32, pub usize, pub usize);

    impl ARead for AStrided {
        #[inline(always)]
        unsafe fn value(self, r: usize) -> f32 {
            unsafe { *self.0.add(r * self.1) }
        }
        #[inline(always)]
        fn next(self) -> Self {
            AStrided(self.0.wrapping_add(self.2), self.1, self.2)
        }
        #[inline(always)]
        unsafe fn rows_from(self, i0: usize) -> Self {
            AStrided(unsafe { self.0.add(i0 * self.1) }, self.1, self.2)
        }
        #[inline(always)]
        fn skip_columns(self, p: usize) -> Self {
            AStrided(self.0.wrapping_add(p * self.2), self.1, self.2)
        }
        type Run = Self;
        #[inline(always)]
        fn run(self) -> (Self, usize) {
            (self, usize::MAX)
        }
    }

    /// `A` packed by [`pack_a`](super::pack_a): row block `t` (rows `t MR..`) at
    /// `base + t MR k`, its element `(r, p)` at `p MR + r`; `.1` is K.
    #[derive(Clone, Copy)]
    pub(super) struct APacked(pub *const f32, pub usize);

    impl ARead for APacked {
        #[inline(always)]
        unsafe fn value(self, r: usize) -> f32 {
            unsafe { *self.0.add(r) }
        }
        #[inline(always)]
        fn next(self) -> Self {
            APacked(self.0.wrapping_add(MR), self.1)
        }
        #[inline(always)]
        unsafe fn rows_from(self, i0: usize) -> Self {
            APacked(unsafe { self.0.add(i0 * self.1) }, self.1)
        }
        #[inline(always)]
        fn skip_columns(self, p: usize) -> Self {
            APacked(self.0.wrapping_add(p * MR), self.1)
        }
        type Run = Self;
        #[inline(always)]
        fn run(self) -> (Self, usize) {
            (self, usize::MAX)
        }
    }

    /// `A` read in place through a convolution's taps ([`Taps`](super::Taps)): the current
    /// column is channel `cg - left` of tap `t`, at `cur` for the tile's first row. Why the
    /// tap and the channels left rather than one column index: the tile asks for a run per
    /// tap, and deriving tap and channel by division there made SqueezeNet's 55x55 expands
    /// (16-channel runs) 40-90% slower (review, alternating laps).
    #[derive(Clone, Copy)]
    pub(super) struct ATaps {
        /// The tile's first row at tap offset 0.
        row: *const f32,
        cur: *const f32,
        offsets: *const usize,
        taps: usize,
        t: usize,
        left: usize,
        rs: usize,
        cg: usize,
    }

    impl ATaps {
        pub(super) fn new(base: *const f32, offsets: &[usize], rs: usize, cg: usize) -> Self {
            let first = offsets.first().copied().unwrap_or(0);
            ATaps {
                row: base,
                cur: base.wrapping_add(first),
                offsets: offsets.as_ptr(),
                taps: offsets.len(),
                t: 0,
                left: cg,
                rs,
                cg,
            }
        }

        /// Column `p` (from the first) of the same rows.
        #[inline(always)]
        fn at_column(self, p: usize) -> Self {
            let (t, ci) = (p / self.cg, p % self.cg);
            let cur = if t < self.taps {
                // SAFETY: t < taps, within the offsets.
                self.row.wrapping_add(unsafe { *self.offsets.add(t) } + ci)
            } else {
                self.row
            };
            ATaps {
                cur,
                t,
                left: self.cg - ci,
                ..self
            }
        }
    }

    impl ARead for ATaps {
        #[inline(always)]
        unsafe fn value(self, r: usize) -> f32 {
            unsafe { *self.cur.add(r * self.rs) }
        }
        #[inline(always)]
        fn next(self) -> Self {
            if self.left > 1 {
                return ATaps {
                    cur: self.cur.wrapping_add(1),
                    left: self.left - 1,
                    ..self
                };
            }
            self.at_column((self.t + 1) * self.cg)
        }
        #[inline(always)]
        unsafe fn rows_from(self, i0: usize) -> Self {
            let shift = i0 * self.rs;
            ATaps {
                row: self.row.wrapping_add(shift),
                cur: self.cur.wrapping_add(shift),
                ..self
            }
        }
        #[inline(always)]
        fn skip_columns(self, p: usize) -> Self {
            self.at_column(self.t * self.cg + (self.cg - self.left) + p)
        }
        type Run = AStrided;
        #[inline(always)]
        fn run(self) -> (AStrided, usize) {
            (AStrided(self.cur, self.rs, 1), self.left)
        }
    }

    /// Row `p` at `base + p * ldb`.
    #[derive(Clone, Copy)]
    pub(super) struct Strided(pub *const f32, pub usize);

    /// Row `p` at `base + offsets[p]`.
    #[derive(Clone, Copy)]
    pub(super) struct Table(pub *const f32, pub *const usize);

    impl RowAt for Strided {
        #[inline(always)]
        unsafe fn at(self, p: usize) -> *const f32 {
            unsafe { self.0.add(p * self.1) }
        }
        #[inline(always)]
        unsafe fn at_column(self, j: usize) -> Self {
            Strided(unsafe { self.0.add(j) }, self.1)
        }
        fn packed(self, m: usize) -> bool {
            m > 2 * MR && self.1 >= 1024
        }
        #[inline(always)]
        unsafe fn at_row(self, p: usize) -> Self {
            Strided(unsafe { self.0.add(p * self.1) }, self.1)
        }
    }

    impl RowAt for Table {
        #[inline(always)]
        unsafe fn at(self, p: usize) -> *const f32 {
            unsafe { self.0.add(*self.1.add(p)) }
        }
        #[inline(always)]
        unsafe fn at_column(self, j: usize) -> Self {
            Table(unsafe { self.0.add(j) }, self.1)
        }
        fn packed(self, _: usize) -> bool {
            false
        }
        #[inline(always)]
        unsafe fn at_row(self, p: usize) -> Self {
            Table(self.0, unsafe { self.1.add(p) })
        }
    }

    /// `B` packed by [`pack_panels`](super::pack_panels): panel `t` at `base + t k NR`, its
    /// row `p` at `+ p NR`; `.1` is K.
    #[derive(Clone, Copy)]
    pub(super) struct PanelMajor(pub *const f32, pub usize);

    impl RowAt for PanelMajor {
        #[inline(always)]
        unsafe fn at(self, p: usize) -> *const f32 {
            unsafe { self.0.add(p * NR) }
        }
        /// `j` is a panel's first column (a multiple of `NR`): the tiles start at panels.
        #[inline(always)]
        unsafe fn at_column(self, j: usize) -> Self {
            debug_assert!(j.is_multiple_of(NR));
            PanelMajor(unsafe { self.0.add(j / NR * self.1 * NR) }, self.1)
        }
        fn packed(self, _: usize) -> bool {
            false
        }
        fn prefetches(self) -> bool {
            false
        }
        #[inline(always)]
        unsafe fn at_row(self, p: usize) -> Self {
            PanelMajor(unsafe { self.0.add(p * NR) }, self.1)
        }
    }

    /// `B` transposed: element `(p, j)` at `base + p + j * ldb`. Always packed: the packing
    /// transposes 16 x 16 tiles in registers, and the tiles then read the packed panel.
    #[derive(Clone, Copy)]
    pub(super) struct Transposed(pub *const f32, pub usize);

    impl RowAt for Transposed {
        unsafe fn at(self, _: usize) -> *const f32 {
            unreachable!("a transposed B is read only through its packed panels")
        }
        #[inline(always)]
        unsafe fn at_column(self, j: usize) -> Self {
            Transposed(unsafe { self.0.add(j * self.1) }, self.1)
        }
        #[inline(always)]
        unsafe fn at_row(self, p: usize) -> Self {
            Transposed(unsafe { self.0.add(p) }, self.1)
        }
        fn packed(self, _: usize) -> bool {
            true
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn pack(self, k: usize, cols: usize, packed: &mut [f32]) {
            assert!(packed.len() >= k * NR && cols <= NR);
            let dst = packed.as_mut_ptr();
            for j0 in (0..cols).step_by(16) {
                let rows = 16.min(cols - j0);
                for p0 in (0..k).step_by(16) {
                    let lanes = 16.min(k - p0);
                    // SAFETY: rows j0.. of B^T (columns of the panel) for `lanes` values
                    // from p0 lie within B (the caller's contract); the packed rows p0.. for
                    // 16 values from j0 <= 16 lie within `packed` (asserted).
                    unsafe {
                        let from = (self.0.add(j0 * self.1 + p0), self.1);
                        let to = (dst.add(p0 * NR + j0), NR);
                        crate::kernels::transpose::x86::tile(from, (rows, lanes), to);
                    }
                }
            }
        }
    }

    /// Runs the column panels `panels` of the product (see `sgemm` for the operands).
    ///
    /// # Safety
    /// AVX-512F must be present; `a` holds the `m x k` matrix at strides `(rs, cs)`, `b`
    /// finds `k` rows of `n` readable values, and `c` has rows of `n` writable values at
    /// stride `ldc` for `m` rows.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn panels<A: ARead, B: RowAt>(
        (m, n, k): (usize, usize, usize),
        a: A,
        b: B,
        c: (*mut f32, usize),
        accumulate: bool,
        panels: std::ops::Range<usize>,
    ) {
        let pack = b.packed(m);
        let mut packed = if pack {
            PACKED.with(|p| p.take())
        } else {
            Vec::new()
        };
        if pack && packed.len() < KC * NR {
            packed.resize(KC * NR, 0.0);
        }
        for p in panels {
            let j0 = p * NR;
            // SAFETY (the pointer arithmetic below): within the operands, see `sgemm`.
            let cols = NR.min(n - j0);
            let bp = unsafe { b.at_column(j0) };
            unsafe {
                if pack {
                    // In runs of KC rows, so that the packed panel stays in L1.
                    for k0 in (0..k).step_by(KC) {
                        let kc = KC.min(k - k0);
                        bp.at_row(k0).pack(kc, cols, &mut packed);
                        let bp = Strided(packed.as_ptr(), NR);
                        let a = a.skip_columns(k0);
                        let acc = accumulate || k0 > 0;
                        panel((m, kc), a, bp, cols, (c.0.add(j0), c.1), acc, false);
                    }
                } else {
                    let prefetch = b.prefetches();
                    panel(
                        (m, k),
                        a,
                        bp,
                        cols,
                        (c.0.add(j0), c.1),
                        accumulate,
                        prefetch,
                    );
                }
            }
        }
        if pack {
            PACKED.with(|p| p.replace(packed));
        }
    }

    /// Rows of `B` per packed panel: the panel then fits in L1 (KC x 32 values).
    const KC: usize = 256;

    thread_local! {
        /// Each thread's packed panel of `B`, kept between calls.
        static PACKED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    }

    /// Copies the panel's `k` rows of `cols` values (from `bp`) into `packed`, `NR` apart.
    /// Why: a product whose `B` rows lie a page or more apart (the training step's column
    /// matrices of 32 samples side by side: 2,048 values a row) maps each panel's rows onto
    /// a few cache sets and a TLB entry each, so the panel could not stay in L1/L2 while the
    /// row blocks pass over it. One core, SqueezeNet's 8x8 3x3 expand 64 -> 256 over 32
    /// samples (256 x 2,048 x 576): 27-30 GMAC/s unpacked, 63 packed, against 74-79 for a
    /// product of that size with contiguous rows (same runs).
    ///
    /// # Safety
    /// `bp` finds `k` rows of `cols` (<= `NR`) readable values; `packed` holds `k NR`.
    #[target_feature(enable = "avx512f")]
    unsafe fn pack_panel<B: RowAt>(k: usize, bp: B, cols: usize, packed: &mut [f32]) {
        let (lo, hi) = (first_lanes(cols), first_lanes(cols.saturating_sub(16)));
        for (p, dst) in packed.chunks_exact_mut(NR).take(k).enumerate() {
            unsafe {
                let src = bp.at(p);
                let d = dst.as_mut_ptr();
                _mm512_storeu_ps(d, _mm512_maskz_loadu_ps(lo, src));
                if hi != 0 {
                    _mm512_storeu_ps(d.add(16), _mm512_maskz_loadu_ps(hi, src.add(16)));
                }
            }
        }
    }

    /// One column panel of `cols` columns: every row block's tile over it. With `prefetch`,
    /// the first row block prefetches the next panel's rows of `B`.
    ///
    /// # Safety
    /// As [`panels`], with `bp` and `cp` at the panel's first column.
    #[target_feature(enable = "avx512f")]
    unsafe fn panel<A: ARead, B: RowAt>(
        (m, k): (usize, usize),
        a: A,
        bp: B,
        cols: usize,
        (cp0, ldc): (*mut f32, usize),
        acc: bool,
        prefetch: bool,
    ) {
        // The last vector's lanes: all 16, or the columns left.
        let last = cols - if cols > 16 { 16 } else { 0 };
        let mask = first_lanes(last);
        for i0 in (0..m).step_by(MR) {
            let rows = MR.min(m - i0);
            let a = unsafe { a.rows_from(i0) };
            let cp = unsafe { cp0.add(i0 * ldc) };
            // The first row block of a panel prefetches the next panel's rows of `B`.
            unsafe {
                match (rows, cols > 16, prefetch && i0 == 0) {
                    (12, true, true) => tile::<12, 2, true, _, _>(k, a, bp, cp, ldc, mask, acc),
                    (12, true, false) => tile::<12, 2, false, _, _>(k, a, bp, cp, ldc, mask, acc),
                    (12, false, true) => tile::<12, 1, true, _, _>(k, a, bp, cp, ldc, mask, acc),
                    (12, false, false) => tile::<12, 1, false, _, _>(k, a, bp, cp, ldc, mask, acc),
                    (r, true, true) => short::<2, true, _, _>(r, k, a, bp, cp, ldc, mask, acc),
                    (r, true, false) => short::<2, false, _, _>(r, k, a, bp, cp, ldc, mask, acc),
                    (r, false, true) => short::<1, true, _, _>(r, k, a, bp, cp, ldc, mask, acc),
                    (r, false, false) => short::<1, false, _, _>(r, k, a, bp, cp, ldc, mask, acc),
                }
            }
        }
    }

    /// The tile of a last row block of fewer than [`MR`] rows.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn short<const V: usize, const PF: bool, A: ARead, B: RowAt>(
        rows: usize,
        k: usize,
        a: A,
        bp: B,
        cp: *mut f32,
        ldc: usize,
        mask: __mmask16,
        acc: bool,
    ) {
        unsafe {
            match rows {
                1 => tile::<1, V, PF, _, _>(k, a, bp, cp, ldc, mask, acc),
                2 => tile::<2, V, PF, _, _>(k, a, bp, cp, ldc, mask, acc),
                3 => tile::<3, V, PF, _, _>(k, a, bp, cp, ldc, mask, acc),
                4 => tile::<4, V, PF, _, _>(k, a, bp, cp, ldc, mask, acc),
                5 => tile::<5, V, PF, _, _>(k, a, bp, cp, ldc, mask, acc),
                6 => tile::<6, V, PF, _, _>(k, a, bp, cp, ldc, mask, acc),
                7 => tile::<7, V, PF, _, _>(k, a, bp, cp, ldc, mask, acc),
                8 => tile::<8, V, PF, _, _>(k, a, bp, cp, ldc, mask, acc),
                9 => tile::<9, V, PF, _, _>(k, a, bp, cp, ldc, mask, acc),
                10 => tile::<10, V, PF, _, _>(k, a, bp, cp, ldc, mask, acc),
                11 => tile::<11, V, PF, _, _>(k, a, bp, cp, ldc, mask, acc),
                _ => unreachable!("row blocks have 1 to MR rows"),
            }
        }
    }

    /// One `R x (16 V)` tile of `C`: the whole K loop in registers, then one store (adding
    /// to `C` with `acc`). The last vector's columns are `mask`. `A`'s values, read through
    /// `a`, are broadcast in place, or from the packed copy of a product of eight panels or
    /// more ([`PACK_A_PANELS`](super::PACK_A_PANELS)): packing on every call cost 16% of a
    /// batch-1 forward pass when it was done for every product, more than it saved.
    /// With `PF` (the first row block of each panel), it also prefetches the next panel's
    /// rows of `B`: a panel's K rows are K streams a row stride apart, more than the
    /// hardware prefetchers follow, and `B` is a fresh activation, not yet in cache.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const R: usize, const V: usize, const PF: bool, A: ARead, B: RowAt>(
        k: usize,
        a: A,
        b: B,
        cp: *mut f32,
        ldc: usize,
        mask: __mmask16,
        acc: bool,
    ) {
        unsafe {
            let mut sum = [[_mm512_setzero_ps(); V]; R];
            let mut a = a;
            let mut p0 = 0;
            while p0 < k {
                // The columns up to where `A`'s layout jumps (all of them but for taps).
                let (mut ar, len) = a.run();
                let end = k.min(p0.saturating_add(len));
                for p in p0..end {
                    let bp = b.at(p);
                    let mut bv = [_mm512_setzero_ps(); V];
                    for (v, vec) in bv.iter_mut().enumerate() {
                        *vec = if v + 1 == V {
                            _mm512_maskz_loadu_ps(mask, bp.add(16 * v))
                        } else {
                            _mm512_loadu_ps(bp.add(16 * v))
                        };
                    }
                    for (r, row) in sum.iter_mut().enumerate() {
                        let s = _mm512_set1_ps(ar.value(r));
                        for v in 0..V {
                            row[v] = _mm512_fmadd_ps(s, bv[v], row[v]);
                        }
                    }
                    if PF {
                        // The same row of the next panel, two cache lines (never faults, even
                        // past the end of `B`).
                        // (`wrapping_add`: the address may lie past `B`, which a prefetch may
                        // name but `add` may not.)
                        _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(NR) as *const i8);
                        _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(NR + 16) as *const i8);
                    }
                    ar = ar.next();
                }
                a = a.skip_columns(end - p0);
                p0 = end;
            }
            for (r, row) in sum.iter().enumerate() {
                let out = cp.add(r * ldc);
                for (v, &val) in row.iter().enumerate() {
                    let at = out.add(16 * v);
                    if v + 1 == V {
                        let val = if acc {
                            _mm512_add_ps(val, _mm512_maskz_loadu_ps(mask, at))
                        } else {
                            val
                        };
                        _mm512_mask_storeu_ps(at, mask, val);
                    } else {
                        let val = if acc {
                            _mm512_add_ps(val, _mm512_loadu_ps(at))
                        } else {
                            val
                        };
                        _mm512_storeu_ps(at, val);
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub(super) trait ARead {}
    pub(super) struct AStrided(pub *const f32, pub usize, pub usize);
    pub(super) struct APacked(pub *const f32, pub usize);
    pub(super) struct ATaps;
    impl ATaps {
        pub(super) fn new(_: *const f32, _: &[usize], _: usize, _: usize) -> Self {
            ATaps
        }
    }
    impl ARead for AStrided {}
    impl ARead for APacked {}
    impl ARead for ATaps {}
    pub(super) struct Strided(pub *const f32, pub usize);
    pub(super) struct Table(pub *const f32, pub *const usize);
    pub(super) struct Transposed(pub *const f32, pub usize);
    pub(super) struct PanelMajor(pub *const f32, pub usize);

    pub(super) unsafe fn panels<A, B>(
        _: (usize, usize, usize),
        _: A,
        _: B,
        _: (*mut f32, usize),
        _: bool,
        _: std::ops::Range<usize>,
    ) {
        unreachable!("sgemm::available() is false off x86-64")
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
        (rs, cs): (usize, usize),
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += a[i * rs + p * cs] as f64 * b[p * ldb + j] as f64;
                }
                let out = &mut c[i * ldc + j];
                *out = if accumulate {
                    *out + s as f32
                } else {
                    s as f32
                };
            }
        }
    }

    /// `ours` within rounding of `want` on C's `n` columns, and the padding columns past
    /// them still `c0`'s.
    fn assert_close(
        (m, n, k): (usize, usize, usize),
        (ours, want, c0): (&[f32], &[f32], &[f32]),
        ldc: usize,
        case: &str,
    ) {
        for i in 0..m {
            for j in 0..ldc {
                let (o, w) = (ours[i * ldc + j], want[i * ldc + j]);
                if j >= n {
                    // Padding columns are not written.
                    assert_eq!(o.to_bits(), c0[i * ldc + j].to_bits());
                } else {
                    assert!(
                        (o - w).abs() <= 1e-5 * (k as f32).sqrt() * 4.0,
                        "m {m} n {n} k {k} {case}: C[{i}][{j}] = {o}, reference {w}"
                    );
                }
            }
        }
    }

    /// Rows of `B` a page or more apart, with more than two row blocks: the panels are
    /// packed, in runs of `KC` rows (K of 300 and 600 take two and three runs).
    #[test]
    fn packed_panels_match_the_reference() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        for &m in &[25, 37, 60] {
            for &n in &[7, 17, 33, 100] {
                for &k in &[5, 256, 300, 600] {
                    for &(accumulate, threads) in &[(false, 1), (true, 2)] {
                        let (ldb, ldc) = (1024 + 3, n + 5);
                        let a = Rng::new(1).normals(m * k);
                        let b = Rng::new(2).normals(k * ldb);
                        let c0 = Rng::new(3).normals(m * ldc);
                        let (mut ours, mut want) = (c0.clone(), c0.clone());
                        let shape = (m, n, k);
                        let strides = (k, 1);
                        sgemm(
                            shape, &a, strides, &b, ldb, &mut ours, ldc, accumulate, threads,
                        );
                        reference(shape, &a, strides, &b, ldb, &mut want, ldc, accumulate);
                        assert_close(shape, (&ours, &want, &c0), ldc, &format!("{accumulate}"));
                    }
                }
            }
        }
    }

    /// `B` given transposed (`C = A X^T`): every panel transposed as it is packed, with
    /// partial 16 x 16 tiles on both sides (n and k not multiples of 16) and K over one to
    /// three runs of `KC`.
    #[test]
    fn transposed_b_matches_the_reference() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        for &m in &[1, 13, 40] {
            for &n in &[16, 17, 33, 58, 100] {
                for &k in &[1, 15, 16, 100, 300, 600] {
                    for &(accumulate, threads) in &[(false, 1), (true, 2)] {
                        let (ldx, ldc) = (k + 3, n + 5);
                        let a = Rng::new(1).normals(m * k);
                        let x = Rng::new(2).normals(n * ldx);
                        // X^T as a row-major k x n matrix, for the reference.
                        let mut b = vec![0f32; k * n];
                        for p in 0..k {
                            for j in 0..n {
                                b[p * n + j] = x[j * ldx + p];
                            }
                        }
                        let c0 = Rng::new(3).normals(m * ldc);
                        let (mut ours, mut want) = (c0.clone(), c0.clone());
                        let (shape, strides) = ((m, n, k), (k, 1));
                        let rows = BRows::Transposed(ldx);
                        sgemm_rows(
                            shape, &a, strides, &x, rows, &mut ours, ldc, accumulate, threads,
                        );
                        reference(shape, &a, strides, &b, n, &mut want, ldc, accumulate);
                        assert_close(shape, (&ours, &want, &c0), ldc, &format!("{accumulate}"));
                    }
                }
            }
        }
    }

    #[test]
    fn matches_the_reference_on_edge_shapes() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let mut cases = 0;
        for &m in &[1, 2, 5, 11, 12, 13, 24, 25, 37] {
            for &n in &[1, 7, 15, 16, 17, 31, 32, 33, 49, 64, 100] {
                for &k in &[1, 3, 8, 27, 64] {
                    for &(transposed, accumulate, threads) in
                        &[(false, false, 1), (true, true, 2), (false, true, 3)]
                    {
                        let (ldb, ldc) = (n + 3, n + 5);
                        // A row-major (lda = k + 2) or a transposed view of a k x m matrix.
                        let (a, strides) = if transposed {
                            (Rng::new(1).normals(k * (m + 1)), (1, m + 1))
                        } else {
                            (Rng::new(1).normals(m * (k + 2)), (k + 2, 1))
                        };
                        let b = Rng::new(2).normals(k * ldb);
                        let c0 = Rng::new(3).normals(m * ldc);
                        let (mut ours, mut want) = (c0.clone(), c0.clone());
                        let shape = (m, n, k);
                        sgemm(
                            shape, &a, strides, &b, ldb, &mut ours, ldc, accumulate, threads,
                        );
                        reference(shape, &a, strides, &b, ldb, &mut want, ldc, accumulate);
                        let case = format!("({transposed}, {accumulate})");
                        assert_close(shape, (&ours, &want, &c0), ldc, &case);
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 9 * 11 * 5 * 3);
    }

    /// One row of `B` may come with any stride (a 1 x n view): it is never read past `n`.
    #[test]
    fn a_single_row_of_b_ignores_its_stride() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let (a, b) = (Rng::new(4).normals(13), Rng::new(5).normals(40));
        let (mut ours, mut want) = (vec![0f32; 13 * 40], vec![0f32; 13 * 40]);
        sgemm((13, 40, 1), &a, (1, 1), &b, 0, &mut ours, 40, false, 2);
        reference((13, 40, 1), &a, (1, 1), &b, 0, &mut want, 40, false);
        assert_eq!(ours, want);
    }

    /// Rows of `B` at arbitrary, overlapping offsets of one buffer equal the same rows
    /// copied out into a row-major matrix.
    #[test]
    fn rows_at_offsets_match_the_copied_rows() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        for &(m, n, k) in &[(13, 50, 9), (5, 17, 27), (24, 100, 4), (1, 16, 1)] {
            let buf = Rng::new(6).normals(n + 40);
            let offsets: Vec<usize> = (0..k).map(|p| (p * 7 + p * p) % 41).collect();
            let mut copied = vec![0f32; k * n];
            for (p, &off) in offsets.iter().enumerate() {
                copied[p * n..(p + 1) * n].copy_from_slice(&buf[off..off + n]);
            }
            let a = Rng::new(7).normals(m * k);
            let (mut ours, mut want) = (vec![0f32; m * n], vec![0f32; m * n]);
            let rows = BRows::At(&offsets);
            sgemm_rows((m, n, k), &a, (k, 1), &buf, rows, &mut ours, n, false, 2);
            sgemm((m, n, k), &a, (k, 1), &copied, n, &mut want, n, false, 1);
            assert_eq!(ours, want, "m {m} n {n} k {k}");
        }
    }

    /// Products of eight panels or more pack `A` (rows or columns contiguous): against the
    /// reference, and bit for bit against the same `A` read in place (stored with a column
    /// stride of 2, which is not packed), with B row-major, transposed and at offsets.
    #[test]
    fn packed_a_matches_the_reference_and_the_unpacked_kernel() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        for &(m, n, k) in &[(12, 256, 1), (13, 257, 17), (37, 300, 40), (25, 512, 300)] {
            for &(transposed_a, accumulate, threads) in
                &[(false, false, 1), (true, true, 2), (false, true, 2)]
            {
                let case = format!("m {m} n {n} k {k} A^T {transposed_a} acc {accumulate}");
                let values = Rng::new(8).normals(m * k);
                // The same matrix three ways: rows contiguous, columns contiguous, and
                // every value two apart (read in place).
                let mut a_t = vec![0f32; m * k];
                let mut spread = vec![0f32; 2 * m * k];
                for i in 0..m {
                    for p in 0..k {
                        a_t[p * m + i] = values[i * k + p];
                        spread[2 * (i * k + p)] = values[i * k + p];
                    }
                }
                let (a, strides) = if transposed_a {
                    (&a_t, (1, m))
                } else {
                    (&values, (k, 1))
                };
                assert!(packs_a((m, n), strides) && !packs_a((m, n), (2 * k, 2)));
                let ldc = n + 3;
                let b = Rng::new(9).normals(k * n);
                let c0 = Rng::new(10).normals(m * ldc);
                let (mut ours, mut unpacked, mut want) = (c0.clone(), c0.clone(), c0.clone());
                let shape = (m, n, k);
                sgemm(
                    shape, a, strides, &b, n, &mut ours, ldc, accumulate, threads,
                );
                sgemm(
                    shape,
                    &spread,
                    (2 * k, 2),
                    &b,
                    n,
                    &mut unpacked,
                    ldc,
                    accumulate,
                    1,
                );
                reference(shape, &values, (k, 1), &b, n, &mut want, ldc, accumulate);
                assert_close(shape, (&ours, &want, &c0), ldc, &case);
                assert!(ours == unpacked, "{case}: packed and unpacked A differ");
                // B transposed (n x k row-major) and B at row offsets.
                let mut b_t = vec![0f32; n * k];
                for p in 0..k {
                    for j in 0..n {
                        b_t[j * k + p] = b[p * n + j];
                    }
                }
                let offsets: Vec<usize> = (0..k).map(|p| p * n).collect();
                for rows in [BRows::Transposed(k), BRows::At(&offsets)] {
                    let mut other = c0.clone();
                    let b = if matches!(rows, BRows::Transposed(_)) {
                        &b_t
                    } else {
                        &b
                    };
                    sgemm_rows(shape, a, strides, b, rows, &mut other, ldc, accumulate, 1);
                    assert_close(shape, (&other, &want, &c0), ldc, &case);
                }
            }
        }
    }

    /// `B` packed panel by panel ([`pack_panels`], columns past `n` zero): against the
    /// reference, and bit for bit against the same `B` read row-major (the same sums in the
    /// same order), with row blocks short and whole, `A` packed and not, and two threads.
    #[test]
    fn panel_major_b_matches_the_row_major_kernel() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        for &(m, n, k) in &[
            (1, 16, 1),
            (5, 17, 7),
            (16, 256, 256),
            (4, 500, 33),
            (37, 70, 300),
        ] {
            for &(accumulate, threads) in &[(false, 1), (true, 2)] {
                let case = format!("m {m} n {n} k {k} acc {accumulate} threads {threads}");
                let ldb = n + 3;
                let (a, b) = (Rng::new(11).normals(m * k), Rng::new(12).normals(k * ldb));
                let mut packed = vec![f32::NAN; panels_len(k, n)];
                pack_panels(&b, ldb, (k, n), &mut packed);
                let ldc = n + 2;
                let c0 = Rng::new(13).normals(m * ldc);
                let (mut ours, mut row_major, mut want) = (c0.clone(), c0.clone(), c0.clone());
                let shape = (m, n, k);
                let rows = BRows::Panels;
                sgemm_rows(
                    shape,
                    &a,
                    (k, 1),
                    &packed,
                    rows,
                    &mut ours,
                    ldc,
                    accumulate,
                    threads,
                );
                sgemm(
                    shape,
                    &a,
                    (k, 1),
                    &b,
                    ldb,
                    &mut row_major,
                    ldc,
                    accumulate,
                    1,
                );
                reference(shape, &a, (k, 1), &b, ldb, &mut want, ldc, accumulate);
                assert_close(shape, (&ours, &want, &c0), ldc, &case);
                assert!(
                    ours == row_major,
                    "{case}: panel-major and row-major B differ"
                );
            }
        }
        // The padding columns of the last panel are zero.
        let mut packed = vec![f32::NAN; panels_len(3, 40)];
        pack_panels(&Rng::new(14).normals(3 * 40), 40, (3, 40), &mut packed);
        let last = &packed[3 * NR..];
        assert!(
            last.chunks(NR)
                .all(|row| row[8..].iter().all(|&v| v == 0.0))
        );
    }

    #[test]
    fn k_zero_clears_or_keeps() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let mut c = vec![1.0f32; 6];
        sgemm((2, 3, 0), &[], (0, 0), &[], 3, &mut c, 3, true, 1);
        assert_eq!(c, vec![1.0; 6]);
        sgemm((2, 3, 0), &[], (0, 0), &[], 3, &mut c, 3, false, 1);
        assert_eq!(c, vec![0.0; 6]);
    }
}
