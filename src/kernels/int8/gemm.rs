//! u8 x i8 -> i32 GEMM with the requantization fused into its output: the kernel of every
//! dense, grouped and 1x1 conv and every linear layer of the int8 engine.
//!
//! `out[r][c] = requantize(sum_k a[r][k] * w[c][k], c)` with `a` the u8 activations (rows =
//! output pixels, channels-last im2col rows or the NHWC input itself for 1x1 convs), `w` the
//! i8 weights of `n` output channels. The input zero point is not subtracted in the loop: the
//! requantization's bias holds `- x_zp * colsum[c]` ([`PackedWeights::column_sums`]), as in
//! MLAS and XNNPACK.
//!
//! The weights are packed once, for the level they will run at:
//! - VNNI: panels of 16 output channels; per group of 4 k, 64 bytes holding the 4 weights of
//!   each channel. `vpdpbusd` multiplies the 4 broadcast activation bytes of a row with them
//!   and adds the four products to each channel's i32 lane, exactly (u8 x i8 products summed
//!   in 32 bits, no intermediate saturation). The micro-kernel keeps a tile of up to 6 rows x
//!   64 channels in 24 registers.
//! - AVX2: `vpmaddubsw` would saturate its 16-bit pair sums (255 * 127 * 2 > 32767), so the
//!   weights are widened to i16 once (panels of 8 channels, pairs of k) and each row's
//!   activation pair is widened to i16 and multiplied with `vpmaddwd`, which sums the two
//!   products into an i32 lane without saturation. Tile: 4 rows x 16 channels.
//! - scalar: the weights as given, `[n][k]`, and a plain loop.
//!
//! Each tile's i32 sums are written to a small stack buffer and requantized row by row with
//! the same level's [`requantize`](super::requantize).

#[cfg(target_arch = "x86_64")]
use super::x86::requantize_avx2;
use super::{Level, Requant, requantize_row};

/// Output channels per VNNI panel (one 512-bit register of i32).
const VNNI_PANEL: usize = 16;
/// Output channels per AVX2 panel (one 256-bit register of i32).
const AVX2_PANEL: usize = 8;
/// The most panels one micro-kernel call covers (its tile width).
const MAX_PANELS: usize = 4;
/// The most rows one micro-kernel call covers.
const MAX_ROWS: usize = 6;
/// Widest tile (in channels) of any level.
const TILE_COLS: usize = VNNI_PANEL * MAX_PANELS;

#[derive(Debug, Clone)]
enum Packed {
    Scalar(Vec<i8>),
    Avx2(Vec<i16>),
    Vnni(Vec<i8>),
}

/// The weights of one GEMM (`n` output channels of `k` values each), packed for one level.
#[derive(Debug, Clone)]
pub struct PackedWeights {
    n: usize,
    k: usize,
    level: Level,
    packed: Packed,
    column_sums: Vec<i32>,
}

impl PackedWeights {
    /// Packs `w` (`[n][k]`, row-major: OIHW flattened per output channel, or channels-last
    /// per output channel for convs read through an NHWC im2col) for `level`.
    pub fn new(w: &[i8], n: usize, k: usize, level: Level) -> Self {
        assert_eq!(w.len(), n * k, "PackedWeights: {n} x {k} weights expected");
        let column_sums = w
            .chunks_exact(k.max(1))
            .map(|row| row.iter().map(|&v| v as i32).sum())
            .take(n)
            .collect::<Vec<i32>>();
        let column_sums = if k == 0 { vec![0; n] } else { column_sums };
        let packed = match level {
            Level::Scalar => Packed::Scalar(w.to_vec()),
            Level::Vnni => {
                let (panels, groups) = (n.div_ceil(VNNI_PANEL), k.div_ceil(4));
                let mut p = vec![0i8; panels * groups * VNNI_PANEL * 4];
                for c in 0..n {
                    let (panel, lane) = (c / VNNI_PANEL, c % VNNI_PANEL);
                    for kk in 0..k {
                        let at = ((panel * groups + kk / 4) * VNNI_PANEL + lane) * 4 + kk % 4;
                        p[at] = w[c * k + kk];
                    }
                }
                Packed::Vnni(p)
            }
            Level::Avx2 => {
                let (panels, pairs) = (n.div_ceil(AVX2_PANEL), k.div_ceil(2));
                let mut p = vec![0i16; panels * pairs * AVX2_PANEL * 2];
                for c in 0..n {
                    let (panel, lane) = (c / AVX2_PANEL, c % AVX2_PANEL);
                    for kk in 0..k {
                        let at = ((panel * pairs + kk / 2) * AVX2_PANEL + lane) * 2 + kk % 2;
                        p[at] = w[c * k + kk] as i16;
                    }
                }
                Packed::Avx2(p)
            }
        };
        PackedWeights {
            n,
            k,
            level,
            packed,
            column_sums,
        }
    }

    /// Output channels.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Reduction length.
    pub fn k(&self) -> usize {
        self.k
    }

    /// `sum_k w[c][k]` per output channel, for the input zero point's correction.
    pub fn column_sums(&self) -> &[i32] {
        &self.column_sums
    }
}

/// `out[r * ldc + c] = requantize(sum_k a[r * lda + k] * w[c][k])` for `r < m`, `c < n`.
///
/// `rq` covers the `n` channels of `w` (its bias includes the zero-point correction). The
/// level is the one the weights were packed for.
pub fn gemm(
    a: &[u8],
    m: usize,
    lda: usize,
    w: &PackedWeights,
    rq: &Requant,
    out: &mut [u8],
    ldc: usize,
) {
    let (n, k) = (w.n, w.k);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        a.len() >= (m - 1) * lda + k,
        "gemm: activation rows out of bounds"
    );
    assert!(
        out.len() >= (m - 1) * ldc + n,
        "gemm: output rows out of bounds"
    );
    assert!(
        rq.mult.len() >= n && rq.bias.len() >= n,
        "gemm: requant too short"
    );
    match &w.packed {
        Packed::Scalar(p) => gemm_scalar(a, m, lda, p, n, k, rq, out, ldc),
        #[cfg(target_arch = "x86_64")]
        Packed::Vnni(p) => {
            debug_assert_eq!(w.level, Level::Vnni);
            // SAFETY: VNNI weights are only packed for a level `Level::available` reported,
            // and the bounds were checked above.
            unsafe { x86::gemm_vnni(a, m, lda, p, n, k, rq, out, ldc) }
        }
        #[cfg(target_arch = "x86_64")]
        Packed::Avx2(p) => {
            debug_assert_eq!(w.level, Level::Avx2);
            // SAFETY: as above, for AVX2.
            unsafe { x86::gemm_avx2(a, m, lda, p, n, k, rq, out, ldc) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only x86-64 packs for SIMD levels"),
    }
}

/// The reference: one dot product per output value.
#[allow(clippy::too_many_arguments)]
fn gemm_scalar(
    a: &[u8],
    m: usize,
    lda: usize,
    w: &[i8],
    n: usize,
    k: usize,
    rq: &Requant,
    out: &mut [u8],
    ldc: usize,
) {
    let mut acc = vec![0i32; n];
    for r in 0..m {
        let row = &a[r * lda..r * lda + k];
        for (c, s) in acc.iter_mut().enumerate() {
            let wc = &w[c * k..(c + 1) * k];
            *s = row.iter().zip(wc).map(|(&x, &v)| x as i32 * v as i32).sum();
        }
        requantize_row(&acc, rq, &mut out[r * ldc..r * ldc + n]);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// The 4 bytes `a[at..at + 4]` as one little-endian i32, zero beyond `end` (the row's
    /// last group of k when k is not a multiple of 4; its weights are zero there too).
    #[inline(always)]
    unsafe fn quad(a: *const u8, at: usize, end: usize) -> i32 {
        if at + 4 <= end {
            // SAFETY: in bounds (the caller's row is `end` bytes long).
            unsafe { (a.add(at) as *const i32).read_unaligned() }
        } else {
            let mut b = [0u8; 4];
            for (i, v) in b.iter_mut().enumerate().take(end - at) {
                // SAFETY: at + i < end.
                *v = unsafe { *a.add(at + i) };
            }
            i32::from_le_bytes(b)
        }
    }

    /// The 2 bytes `a[at..at + 2]` widened to two i16 in one i32, zero beyond `end`.
    #[inline(always)]
    unsafe fn pair(a: *const u8, at: usize, end: usize) -> i32 {
        // SAFETY: at < end (the caller's row is `end` bytes long).
        let lo = unsafe { *a.add(at) } as i32;
        let hi = if at + 1 < end {
            // SAFETY: at + 1 < end.
            (unsafe { *a.add(at + 1) }) as i32
        } else {
            0
        };
        lo | (hi << 16)
    }

    /// An `R` x `16 * P` tile, requantized in registers: rows at `a + r * lda` (`k` bytes
    /// each), panels at `b + p * panel_len`, output row `r` at `out + r * ldc`, `cols`
    /// (at most `16 * P`, more than `16 * (P - 1)`) channels of `rq`.
    ///
    /// Why fused: with the small `k` of a MobileNet's 1x1 convs, storing the i32 sums and
    /// reading them back for a separate requantization cost as much as the multiplications
    /// (a store-forwarding stall per row). The arithmetic is `requantize`'s AVX-512 path, lane
    /// for lane.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_vnni<const R: usize, const P: usize>(
        a: *const u8,
        lda: usize,
        k: usize,
        b: *const i8,
        panel_len: usize,
        rq: &Requant,
        out: *mut u8,
        ldc: usize,
        cols: usize,
    ) {
        let mut c = [[_mm512_setzero_si512(); P]; R];
        let step = |c: &mut [[__m512i; P]; R], g: usize, quad_of: &dyn Fn(usize) -> i32| {
            let mut bv = [_mm512_setzero_si512(); P];
            for (p, v) in bv.iter_mut().enumerate() {
                // SAFETY: the panel holds `k.div_ceil(4)` blocks of 64 bytes.
                *v = unsafe { _mm512_loadu_si512(b.add(p * panel_len + g * 64) as *const _) };
            }
            for (r, cr) in c.iter_mut().enumerate() {
                let av = _mm512_set1_epi32(quad_of(r));
                for p in 0..P {
                    cr[p] = _mm512_dpbusd_epi32(cr[p], av, bv[p]);
                }
            }
        };
        let full = k / 4;
        for g in 0..full {
            // SAFETY: row r has k >= 4 * g + 4 bytes.
            step(&mut c, g, &|r| unsafe {
                (a.add(r * lda + g * 4) as *const i32).read_unaligned()
            });
        }
        if !k.is_multiple_of(4) {
            // SAFETY: row r has k bytes.
            step(&mut c, full, &|r| unsafe {
                quad(a.add(r * lda), full * 4, k)
            });
        }
        let lo = _mm512_set1_ps((rq.qmin - rq.zp) as f32);
        let hi = _mm512_set1_ps((rq.qmax - rq.zp) as f32);
        let zp = _mm512_set1_epi32(rq.zp);
        for p in 0..P {
            let m = (cols - p * VNNI_PANEL).min(VNNI_PANEL);
            let mask: __mmask16 = if m == 16 { 0xffff } else { (1u16 << m) - 1 };
            // SAFETY: the masked lanes are within the `cols` channels of `rq` and of each
            // output row (checked by `gemm`).
            unsafe {
                let bias = _mm512_maskz_loadu_epi32(mask, rq.bias.as_ptr().add(p * VNNI_PANEL));
                let mult = _mm512_maskz_loadu_ps(mask, rq.mult.as_ptr().add(p * VNNI_PANEL));
                for (r, cr) in c.iter().enumerate() {
                    let v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(cr[p], bias)), mult);
                    let v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
                    let q = _mm512_add_epi32(_mm512_cvtps_epi32(v), zp);
                    let o = out.add(r * ldc + p * VNNI_PANEL);
                    _mm512_mask_cvtepi32_storeu_epi8(o as *mut _, mask, q);
                }
            }
        }
    }

    /// The AVX2 tile: `R` x `8 * P`.
    #[target_feature(enable = "avx2,fma")]
    #[inline(never)]
    unsafe fn tile_avx2<const R: usize, const P: usize>(
        a: *const u8,
        lda: usize,
        k: usize,
        b: *const i16,
        panel_len: usize,
        acc: &mut [[i32; TILE_COLS]; MAX_ROWS],
    ) {
        let mut c = [[_mm256_setzero_si256(); P]; R];
        let step = |c: &mut [[__m256i; P]; R], q: usize, pair_of: &dyn Fn(usize) -> i32| {
            let mut bv = [_mm256_setzero_si256(); P];
            for (p, v) in bv.iter_mut().enumerate() {
                // SAFETY: the panel holds `k.div_ceil(2)` blocks of 16 i16.
                *v = unsafe { _mm256_loadu_si256(b.add(p * panel_len + q * 16) as *const _) };
            }
            for (r, cr) in c.iter_mut().enumerate() {
                let av = _mm256_set1_epi32(pair_of(r));
                for p in 0..P {
                    cr[p] = _mm256_add_epi32(cr[p], _mm256_madd_epi16(av, bv[p]));
                }
            }
        };
        let full = k / 2;
        for q in 0..full {
            step(&mut c, q, &|r| {
                // SAFETY: row r has k >= 2 * q + 2 bytes.
                let v = unsafe { (a.add(r * lda + q * 2) as *const u16).read_unaligned() } as i32;
                (v & 0xff) | ((v >> 8) << 16)
            });
        }
        if !k.is_multiple_of(2) {
            // SAFETY: row r has k bytes.
            step(&mut c, full, &|r| unsafe {
                pair(a.add(r * lda), full * 2, k)
            });
        }
        for r in 0..R {
            for p in 0..P {
                // SAFETY: 8 i32 fit at column 8 * p < TILE_COLS.
                unsafe {
                    _mm256_storeu_si256(acc[r][p * AVX2_PANEL..].as_mut_ptr() as *mut _, c[r][p])
                };
            }
        }
    }

    /// Calls `$tile::<R, P>` for run-time `rows` and `panels` (1..=max each).
    macro_rules! tile_call {
        ($tile:ident, $rows:expr, $panels:expr, $($arg:expr),*) => {
            match ($rows, $panels) {
                (1, 1) => $tile::<1, 1>($($arg),*), (1, 2) => $tile::<1, 2>($($arg),*),
                (1, 3) => $tile::<1, 3>($($arg),*), (1, _) => $tile::<1, 4>($($arg),*),
                (2, 1) => $tile::<2, 1>($($arg),*), (2, 2) => $tile::<2, 2>($($arg),*),
                (2, 3) => $tile::<2, 3>($($arg),*), (2, _) => $tile::<2, 4>($($arg),*),
                (3, 1) => $tile::<3, 1>($($arg),*), (3, 2) => $tile::<3, 2>($($arg),*),
                (3, 3) => $tile::<3, 3>($($arg),*), (3, _) => $tile::<3, 4>($($arg),*),
                (4, 1) => $tile::<4, 1>($($arg),*), (4, 2) => $tile::<4, 2>($($arg),*),
                (4, 3) => $tile::<4, 3>($($arg),*), (4, _) => $tile::<4, 4>($($arg),*),
                (5, 1) => $tile::<5, 1>($($arg),*), (5, 2) => $tile::<5, 2>($($arg),*),
                (5, 3) => $tile::<5, 3>($($arg),*), (5, _) => $tile::<5, 4>($($arg),*),
                (6, 1) => $tile::<6, 1>($($arg),*), (6, 2) => $tile::<6, 2>($($arg),*),
                (6, 3) => $tile::<6, 3>($($arg),*), (_, _) => $tile::<6, 4>($($arg),*),
            }
        };
    }

    /// The AVX2 tile's shapes: up to 4 rows and 2 panels (8 accumulators in 16 registers).
    macro_rules! tile_call_avx2 {
        ($tile:ident, $rows:expr, $panels:expr, $($arg:expr),*) => {
            match ($rows, $panels) {
                (1, 1) => $tile::<1, 1>($($arg),*), (1, _) => $tile::<1, 2>($($arg),*),
                (2, 1) => $tile::<2, 1>($($arg),*), (2, _) => $tile::<2, 2>($($arg),*),
                (3, 1) => $tile::<3, 1>($($arg),*), (3, _) => $tile::<3, 2>($($arg),*),
                (4, 1) => $tile::<4, 1>($($arg),*), (_, _) => $tile::<4, 2>($($arg),*),
            }
        };
    }

    /// Column blocks outside (a block's weights stay in cache), row tiles inside.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_vnni(
        a: &[u8],
        m: usize,
        lda: usize,
        p: &[i8],
        n: usize,
        k: usize,
        rq: &Requant,
        out: &mut [u8],
        ldc: usize,
    ) {
        let panel_len = k.div_ceil(4) * 64;
        let panels = n.div_ceil(VNNI_PANEL);
        for p0 in (0..panels).step_by(MAX_PANELS) {
            let np = (panels - p0).min(MAX_PANELS);
            let c0 = p0 * VNNI_PANEL;
            let cols = (n - c0).min(np * VNNI_PANEL);
            let rqc = rq.channels(c0, cols);
            let b = p[p0 * panel_len..].as_ptr();
            for r0 in (0..m).step_by(MAX_ROWS) {
                let rows = (m - r0).min(MAX_ROWS);
                let ar = a[r0 * lda..].as_ptr();
                let o = out[r0 * ldc + c0..].as_mut_ptr();
                // SAFETY: rows r0..r0 + rows of `a` hold k bytes and of `out` hold `c0 + cols`
                // (checked by `gemm`).
                unsafe {
                    tile_call!(
                        tile_vnni, rows, np, ar, lda, k, b, panel_len, &rqc, o, ldc, cols
                    )
                };
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_avx2(
        a: &[u8],
        m: usize,
        lda: usize,
        p: &[i16],
        n: usize,
        k: usize,
        rq: &Requant,
        out: &mut [u8],
        ldc: usize,
    ) {
        const PANELS: usize = 2;
        const ROWS: usize = 4;
        let panel_len = k.div_ceil(2) * 16;
        let mut acc = [[0i32; TILE_COLS]; MAX_ROWS];
        let panels = n.div_ceil(AVX2_PANEL);
        for p0 in (0..panels).step_by(PANELS) {
            let np = (panels - p0).min(PANELS);
            let c0 = p0 * AVX2_PANEL;
            let cols = (n - c0).min(np * AVX2_PANEL);
            let rqc = rq.channels(c0, cols);
            let b = p[p0 * panel_len..].as_ptr();
            for r0 in (0..m).step_by(ROWS) {
                let rows = (m - r0).min(ROWS);
                let ar = a[r0 * lda..].as_ptr();
                // SAFETY: as for VNNI.
                unsafe { tile_call_avx2!(tile_avx2, rows, np, ar, lda, k, b, panel_len, &mut acc) };
                for (r, sums) in acc.iter().enumerate().take(rows) {
                    let o = (r0 + r) * ldc + c0;
                    // SAFETY: the CPU has AVX2; lengths are `cols`.
                    unsafe { requantize_avx2(&sums[..cols], &rqc, &mut out[o..o + cols]) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{bytes, floats, ints, weights};
    use super::super::{Level, Requant, requantize_one};
    use super::*;
    use crate::rng::Rng;

    /// The conventions' formula evaluated value by value.
    fn reference(
        a: &[u8],
        m: usize,
        lda: usize,
        w: &[i8],
        n: usize,
        k: usize,
        rq: &Requant,
    ) -> Vec<u8> {
        let mut out = vec![0u8; m * n];
        for r in 0..m {
            for c in 0..n {
                let acc: i32 = (0..k)
                    .map(|i| a[r * lda + i] as i32 * w[c * k + i] as i32)
                    .sum();
                out[r * n + c] =
                    requantize_one(acc, rq.bias[c], rq.mult[c], rq.zp, rq.qmin, rq.qmax);
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        a: &[u8],
        m: usize,
        lda: usize,
        w: &[i8],
        n: usize,
        k: usize,
        rq: &Requant,
        what: &str,
    ) {
        let want = reference(a, m, lda, w, n, k, rq);
        for level in Level::available() {
            let packed = PackedWeights::new(w, n, k, level);
            // A wider output (ldc > n) whose extra bytes must stay untouched.
            let ldc = n + 3;
            let mut out = vec![7u8; m * ldc];
            gemm(a, m, lda, &packed, rq, &mut out, ldc);
            for r in 0..m {
                assert_eq!(
                    &out[r * ldc..r * ldc + n],
                    &want[r * n..(r + 1) * n],
                    "{what}, {level:?}, row {r}"
                );
                assert!(
                    out[r * ldc + n..(r + 1) * ldc].iter().all(|&v| v == 7),
                    "{what}: wrote past n"
                );
            }
        }
    }

    #[test]
    fn every_level_matches_the_reference_on_edge_sizes() {
        let mut rng = Rng::new(1);
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 16, 4),
            (7, 17, 5),
            (6, 64, 64),
            (13, 65, 3),
            (5, 100, 27),
            (19, 33, 144),
            (2, 130, 9),
            (12, 8, 2),
            (3, 160, 960),
            (4, 1, 7),
        ] {
            let lda = k + 2;
            let a = bytes(&mut rng, m * lda);
            let w = weights(&mut rng, n * k);
            let mult = floats(&mut rng, n, 1e-4, 2e-2);
            let bias = ints(&mut rng, n, -5000, 5000);
            let rq = Requant {
                mult: &mult,
                bias: &bias,
                zp: 100,
                qmin: 0,
                qmax: 255,
            };
            check(&a, m, lda, &w, n, k, &rq, &format!("{m}x{n}x{k}"));
            let rq = Requant {
                zp: 20,
                qmin: 20,
                qmax: 200,
                ..rq
            };
            check(&a, m, lda, &w, n, k, &rq, &format!("{m}x{n}x{k} relu"));
        }
    }

    #[test]
    fn worst_case_values_do_not_saturate() {
        // x = 255 everywhere, w = +127 or -127 everywhere: every pair sum is 2 * 255 * 127,
        // which `vpmaddubsw` would saturate. Multiplier 1 / k and bias 0 make the sum visible.
        let (m, n, k) = (9, 40, 75);
        let a = vec![255u8; m * k];
        for sign in [127i8, -127] {
            let w: Vec<i8> = (0..n * k)
                .map(|i| if i % 3 == 0 { sign } else { 127 })
                .collect();
            let mult = vec![1.0 / (k as f32 * 127.0); n];
            let bias = vec![0; n];
            let rq = Requant {
                mult: &mult,
                bias: &bias,
                zp: 128,
                qmin: 0,
                qmax: 255,
            };
            check(&a, m, k, &w, n, k, &rq, &format!("worst case {sign}"));
            // And the raw sum itself, exactly: 255 * sum_k w through a multiplier of 1
            // around a bias that brings it near zero.
            let total: i32 = w[..k].iter().map(|&v| 255 * v as i32).sum();
            let bias = vec![-total + 5; n];
            let mult = vec![1.0; n];
            let rq = Requant {
                mult: &mult,
                bias: &bias,
                zp: 0,
                qmin: 0,
                qmax: 255,
            };
            for level in Level::available() {
                let packed = PackedWeights::new(&w, n, k, level);
                let mut out = vec![0u8; m * n];
                gemm(&a, m, k, &packed, &rq, &mut out, n);
                assert!(
                    out.iter().all(|&v| v == 5),
                    "{level:?}: the sum is not exact"
                );
            }
        }
    }

    #[test]
    fn column_sums_are_the_weight_sums() {
        let w: Vec<i8> = vec![1, -2, 3, 127, -127, 0];
        let p = PackedWeights::new(&w, 2, 3, Level::Scalar);
        assert_eq!(p.column_sums(), &[2, 0]);
    }
}
