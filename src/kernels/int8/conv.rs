//! Convolution pieces of the int8 engine on channels-last (NHWC) u8 buffers: the direct
//! depthwise conv, and im2col for the dense and grouped convs that the GEMM then runs.

use super::{Level, Requant, int8_dispatch, requantize};

/// The geometry of a square-kernel conv on one sample (symmetric padding, dilation 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub h: usize,
    pub w: usize,
    /// Input channels (all groups).
    pub c: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvShape {
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }

    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }

    /// Whether the conv reads its input directly as GEMM rows (1x1, stride 1, no padding).
    pub fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }

    /// The input row (or column) of output position `o` and tap `t`, if inside the input.
    #[inline(always)]
    fn source(&self, o: usize, t: usize, len: usize) -> Option<usize> {
        (o * self.stride + t)
            .checked_sub(self.pad)
            .filter(|&i| i < len)
    }

    /// The first input row (or column) of output position `o`'s window, if the whole window
    /// lies inside the input (`len` long): then its taps need no bounds checks.
    #[inline(always)]
    fn window_inside(&self, o: usize, len: usize) -> Option<usize> {
        (o * self.stride)
            .checked_sub(self.pad)
            .filter(|&i| i + self.k <= len)
    }
}

/// Channels per block of the VNNI depthwise kernel (one AVX-512 register of bytes).
const DW_VNNI_BLOCK: usize = 64;

/// A depthwise conv packed once for the level it will run at: its weights, its input zero
/// point and its requantization (owned, since the VNNI kernel folds the zero point into the
/// bias and reorders both to its lanes).
#[derive(Debug, Clone)]
pub struct DepthwiseWeights {
    c: usize,
    k: usize,
    /// The input's zero point.
    zp: u8,
    /// Per channel, in the kernel's order (see [`DwPacked`]).
    mult: Vec<f32>,
    bias: Vec<i32>,
    out_zp: i32,
    qmin: i32,
    qmax: i32,
    packed: DwPacked,
}

#[derive(Debug, Clone)]
enum DwPacked {
    /// Scalar and AVX2: `[k * k][c]` widened to i16, for the zero-point-subtracted 16-bit
    /// products (MLAS's `qdwconv`); the requantization in channel order.
    Widened(Vec<i16>),
    /// VNNI: per block of 64 channels and group of 4 taps, four 64-byte vectors, vector `j`
    /// holding at byte `16 * l + 4 * e + t` the weight of tap `4 * g + t` of channel
    /// `64 * block + 16 * l + 4 * j + e` (zero past the channels and the taps): the order in
    /// which two rounds of byte and word unpacking interleave four taps' pixels (see
    /// `depthwise_vnni`). The requantization is in the order of the four accumulators
    /// (accumulator `j` lane `4 * l + e` is channel `16 * l + 4 * j + e` of the block; zero
    /// in padding lanes), its bias less `zp * sum w`; `pad` is a row of `c` zero-point bytes
    /// that taps on the padding read.
    Quads { w: Vec<i8>, pad: Vec<u8> },
}

impl DepthwiseWeights {
    /// Packs OIHW weights (`[c][1][k][k]`) for `level`, for inputs of zero point `zp`
    /// requantized by `rq` (its bias is `bias_q`, without any zero-point correction).
    pub fn new(w: &[i8], c: usize, k: usize, level: Level, zp: u8, rq: &Requant) -> Self {
        assert_eq!(
            w.len(),
            c * k * k,
            "depthwise weights: {c} x {k} x {k} expected"
        );
        assert!(
            rq.mult.len() >= c && rq.bias.len() >= c,
            "depthwise: requantization of {c} channels expected"
        );
        let kk = k * k;
        let (packed, mult, bias) = match level {
            Level::Vnni => {
                let (blocks, groups) = (c.div_ceil(DW_VNNI_BLOCK), kk.div_ceil(4));
                let mut p = vec![0i8; blocks * groups * 4 * DW_VNNI_BLOCK];
                let mut mult = vec![0f32; blocks * DW_VNNI_BLOCK];
                let mut bias = vec![0i32; blocks * DW_VNNI_BLOCK];
                for ch in 0..c {
                    let (block, r) = (ch / DW_VNNI_BLOCK, ch % DW_VNNI_BLOCK);
                    let (l, j, e) = (r / 16, r % 16 / 4, r % 4);
                    let mut sum = 0i32;
                    for tap in 0..kk {
                        let (g, t) = (tap / 4, tap % 4);
                        let vector = (block * groups + g) * 4 + j;
                        let v = w[ch * kk + tap];
                        p[vector * DW_VNNI_BLOCK + 16 * l + 4 * e + t] = v;
                        sum = sum.wrapping_add(v as i32);
                    }
                    let at = block * DW_VNNI_BLOCK + 16 * j + 4 * l + e;
                    mult[at] = rq.mult[ch];
                    // Wrapping, as the sums are: the total is exact modulo 2^32 either way.
                    bias[at] = rq.bias[ch].wrapping_sub((zp as i32).wrapping_mul(sum));
                }
                let pad = vec![zp; c];
                (DwPacked::Quads { w: p, pad }, mult, bias)
            }
            Level::Avx2 | Level::Scalar => {
                let mut out = vec![0i16; c * kk];
                for ch in 0..c {
                    for t in 0..kk {
                        out[t * c + ch] = w[ch * kk + t] as i16;
                    }
                }
                (
                    DwPacked::Widened(out),
                    rq.mult[..c].to_vec(),
                    rq.bias[..c].to_vec(),
                )
            }
        };
        DepthwiseWeights {
            c,
            k,
            zp,
            mult,
            bias,
            out_zp: rq.zp,
            qmin: rq.qmin,
            qmax: rq.qmax,
            packed,
        }
    }

    /// The requantization, in the kernel's channel order.
    fn requant(&self) -> Requant<'_> {
        Requant {
            mult: &self.mult,
            bias: &self.bias,
            zp: self.out_zp,
            qmin: self.qmin,
            qmax: self.qmax,
        }
    }
}

/// A thread's reusable memory for [`depthwise`].
#[derive(Debug, Default)]
pub struct DepthwiseScratch {
    /// Widened path: sums of the last, partial block of channels.
    acc: Vec<i32>,
    /// VNNI path: one output pixel's tap addresses, and each tap's offset in a window.
    taps: Vec<usize>,
    rel: Vec<usize>,
}

/// Direct depthwise conv of one sample:
/// `out[p][c] = requantize(sum_taps (x - zp) * w[t][c])`, with the zero point and the
/// requantization `w` was packed with.
///
/// Why direct: each channel has its own filter, so there is nothing for a GEMM to share.
/// - Scalar and AVX2: values are widened to 16 bits with the zero point subtracted (`x - zp`
///   in [-255, 255], the product with a weight in [-127, 127] fits i16 exactly) and summed
///   in i32 (as MLAS's `qdwconv`); each tap is one pass over the pixel's channels, which the
///   compiler vectorises. Taps that fall on padding add `(zp - zp) * w = 0` and are skipped.
/// - VNNI: the bytes of four taps are interleaved so that one `vpdpbusd` adds four taps'
///   `x * w` products of 16 channels exactly in i32, and the zero point is taken out through
///   the bias (`- zp * sum w`, as the GEMM does), padding taps reading zero-point bytes. The
///   integers are the same; there are about five times fewer instructions per tap.
pub fn depthwise(
    level: Level,
    x: &[u8],
    s: &ConvShape,
    w: &DepthwiseWeights,
    out: &mut [u8],
    scratch: &mut DepthwiseScratch,
) {
    let (ho, wo, c) = (s.out_h(), s.out_w(), s.c);
    assert!(
        x.len() >= s.h * s.w * c && out.len() >= ho * wo * c,
        "depthwise: buffer sizes"
    );
    assert!(
        w.c == c && w.k == s.k,
        "depthwise: weights for {} channels of {}x{}, not {c} of {}x{}",
        w.c,
        w.k,
        w.k,
        s.k,
        s.k
    );
    let rq = w.requant();
    match &w.packed {
        DwPacked::Widened(wide) => {
            scratch.acc.resize(c, 0);
            depthwise_at(level, level, x, s, w.zp, wide, &rq, out, &mut scratch.acc);
        }
        #[cfg(target_arch = "x86_64")]
        DwPacked::Quads { w: quads, pad } => {
            assert!(level == Level::Vnni, "depthwise: VNNI weights at {level:?}");
            // SAFETY: VNNI weights are only packed for a level `Level::available` reported;
            // the buffer sizes were checked above.
            unsafe { x86::depthwise_vnni(x, s, quads, pad, &rq, out, scratch) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        DwPacked::Quads { .. } => unreachable!("only x86-64 packs for VNNI"),
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn depthwise_body(
    lv: Level,
    x: &[u8],
    s: &ConvShape,
    zp: u8,
    w: &[i16],
    rq: &Requant,
    out: &mut [u8],
    acc: &mut [i32],
) {
    let (ho, wo, c, k) = (s.out_h(), s.out_w(), s.c, s.k);
    let acc = &mut acc[..c];
    let zp = zp as i16;
    // One output pixel's taps: (input pixel offset, weight row offset) of those inside.
    let mut taps: Vec<(usize, usize)> = Vec::with_capacity(k * k);
    for oy in 0..ho {
        for ox in 0..wo {
            taps.clear();
            for ky in 0..k {
                let Some(iy) = s.source(oy, ky, s.h) else {
                    continue;
                };
                for kx in 0..k {
                    if let Some(ix) = s.source(ox, kx, s.w) {
                        taps.push(((iy * s.w + ix) * c, (ky * k + kx) * c));
                    }
                }
            }
            let o = (oy * wo + ox) * c;
            // Blocks of channels whose sums stay in registers over all taps. When `c` is not
            // a multiple of the block, the last block overlaps the one before it (the
            // overlapping channels are computed twice, identically).
            let mut c0 = 0;
            while c0 < c && c >= DW_BLOCK {
                c0 = c0.min(c - DW_BLOCK);
                let mut sums = [0i32; DW_BLOCK];
                for &(xo, wo) in &taps {
                    let xs = &x[xo + c0..][..DW_BLOCK];
                    let ws = &w[wo + c0..][..DW_BLOCK];
                    for i in 0..DW_BLOCK {
                        sums[i] += (xs[i] as i16 - zp).wrapping_mul(ws[i]) as i32;
                    }
                }
                let rqb = rq.channels(c0, DW_BLOCK);
                requantize(lv, &sums, &rqb, &mut out[o + c0..o + c0 + DW_BLOCK]);
                c0 += DW_BLOCK;
            }
            if c0 < c {
                let rest = &mut acc[c0..];
                rest.fill(0);
                for &(xo, wo) in &taps {
                    let xs = &x[xo + c0..xo + c];
                    let ws = &w[wo + c0..wo + c];
                    for i in 0..rest.len() {
                        rest[i] += (xs[i] as i16 - zp).wrapping_mul(ws[i]) as i32;
                    }
                }
                let rqb = rq.channels(c0, c - c0);
                requantize(lv, rest, &rqb, &mut out[o + c0..o + c]);
            }
        }
    }
}

/// Channels per register-resident block of the depthwise sums (two AVX-512 registers).
const DW_BLOCK: usize = 32;

int8_dispatch!(fn depthwise_at(lv: Level, x: &[u8], s: &ConvShape, zp: u8, w: &[i16], rq: &Requant, out: &mut [u8], acc: &mut [i32]) => depthwise_body);

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ConvShape, DW_VNNI_BLOCK, DepthwiseScratch, Requant};
    use std::arch::x86_64::*;

    /// The VNNI depthwise conv of one sample (see [`super::depthwise`]): `rq` in the
    /// kernel's lane order, `pad` the zero-point row.
    ///
    /// Per output pixel and block of 64 channels, for each group of 4 taps: the 4 taps' 64
    /// input bytes are interleaved by `vpunpck{l,h}bw` then `vpunpck{l,h}wd` into 4 vectors
    /// whose 32-bit lanes hold one channel's 4 tap bytes (vector `j`, lane `4 * l + e`:
    /// channel `16 * l + 4 * j + e`), and `vpdpbusd` adds their products with the weights
    /// packed in that order. After requantization, `vpackusdw` and `vpackuswb` of the four
    /// vectors put the bytes back in channel order. A last block of at most 32 channels (the
    /// 96 and 144 channels of MobileNet V2's widest planes) runs the same steps on 256-bit
    /// vectors, whose lanes are the first two of the 512-bit layout.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn depthwise_vnni(
        x: &[u8],
        s: &ConvShape,
        w: &[i8],
        pad: &[u8],
        rq: &Requant,
        out: &mut [u8],
        scratch: &mut DepthwiseScratch,
    ) {
        let (ho, wo, c, k) = (s.out_h(), s.out_w(), s.c, s.k);
        let groups = (k * k).div_ceil(4);
        let pad = pad.as_ptr() as usize;
        let x0 = x.as_ptr() as usize;
        let params = BlockParams {
            lo: (rq.qmin - rq.zp) as f32,
            hi: (rq.qmax - rq.zp) as f32,
            zp: rq.zp,
            bias: rq.bias.as_ptr(),
            mult: rq.mult.as_ptr(),
            w: w.as_ptr(),
            groups,
        };
        // Each tap's offset from the window's top-left pixel, for windows wholly inside.
        let rel = &mut scratch.rel;
        rel.clear();
        rel.extend((0..k * k).map(|t| (t / k * s.w + t % k) * c));
        let taps = &mut scratch.taps;
        taps.clear();
        taps.resize(groups * 4, pad);
        for oy in 0..ho {
            let iy0 = s.window_inside(oy, s.h);
            for ox in 0..wo {
                let ix0 = s.window_inside(ox, s.w);
                if let (Some(iy), Some(ix)) = (iy0, ix0) {
                    let base = x0 + (iy * s.w + ix) * c;
                    for (t, r) in taps.iter_mut().zip(rel.iter()) {
                        *t = base + r;
                    }
                } else {
                    for ky in 0..k {
                        let iy = s.source(oy, ky, s.h);
                        for kx in 0..k {
                            taps[ky * k + kx] = match (iy, s.source(ox, kx, s.w)) {
                                (Some(iy), Some(ix)) => x0 + (iy * s.w + ix) * c,
                                _ => pad,
                            };
                        }
                    }
                }
                let o = out.as_mut_ptr().wrapping_add((oy * wo + ox) * c);
                let mut cb = 0;
                while cb < c {
                    let m = c - cb;
                    // SAFETY: every tap address is a pixel of `x` or the zero-point row, each
                    // `c` bytes long, and the output pixel has `c` bytes at `o`; the masks
                    // keep every access within `c`; `bias`, `mult` and `w` hold whole blocks.
                    unsafe {
                        if m > 32 {
                            block64(&params, taps, cb, m.min(64), o);
                        } else {
                            block32(&params, taps, cb, m, o);
                        }
                    }
                    cb += DW_VNNI_BLOCK;
                }
            }
        }
    }

    /// What every block of one depthwise conv shares.
    struct BlockParams {
        lo: f32,
        hi: f32,
        zp: i32,
        bias: *const i32,
        mult: *const f32,
        w: *const i8,
        groups: usize,
    }

    /// Channels `cb..cb + m` (`m` in 1..=64) of one output pixel.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn block64(t: &BlockParams, taps: &[usize], cb: usize, m: usize, o: *mut u8) {
        let mask: __mmask64 = if m >= 64 { !0 } else { (1u64 << m) - 1 };
        let mut acc = [_mm512_setzero_si512(); 4];
        let wb = cb / DW_VNNI_BLOCK * t.groups * 4 * DW_VNNI_BLOCK;
        for g in 0..t.groups {
            // SAFETY: see `depthwise_vnni`.
            unsafe {
                let load =
                    |i: usize| _mm512_maskz_loadu_epi8(mask, (taps[4 * g + i] + cb) as *const i8);
                let (a, b, c, d) = (load(0), load(1), load(2), load(3));
                let ab_lo = _mm512_unpacklo_epi8(a, b);
                let ab_hi = _mm512_unpackhi_epi8(a, b);
                let cd_lo = _mm512_unpacklo_epi8(c, d);
                let cd_hi = _mm512_unpackhi_epi8(c, d);
                let q = [
                    _mm512_unpacklo_epi16(ab_lo, cd_lo),
                    _mm512_unpackhi_epi16(ab_lo, cd_lo),
                    _mm512_unpacklo_epi16(ab_hi, cd_hi),
                    _mm512_unpackhi_epi16(ab_hi, cd_hi),
                ];
                let wv = t.w.add(wb + g * 4 * DW_VNNI_BLOCK);
                for (j, (aj, qj)) in acc.iter_mut().zip(q).enumerate() {
                    let wj = _mm512_loadu_si512(wv.add(j * DW_VNNI_BLOCK) as *const _);
                    *aj = _mm512_dpbusd_epi32(*aj, qj, wj);
                }
            }
        }
        let (lo, hi, zp) = (
            _mm512_set1_ps(t.lo),
            _mm512_set1_ps(t.hi),
            _mm512_set1_epi32(t.zp),
        );
        let mut r = [_mm512_setzero_si512(); 4];
        for (j, (rj, aj)) in r.iter_mut().zip(acc).enumerate() {
            // SAFETY: `bias` and `mult` hold whole blocks of 64 values.
            unsafe {
                let at = cb + 16 * j;
                let b = _mm512_loadu_si512(t.bias.add(at) as *const _);
                let v = _mm512_cvtepi32_ps(_mm512_add_epi32(aj, b));
                let v = _mm512_mul_ps(v, _mm512_loadu_ps(t.mult.add(at)));
                let v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
                *rj = _mm512_add_epi32(_mm512_cvtps_epi32(v), zp);
            }
        }
        // Values are in [qmin, qmax] within [0, 255]: the packs do not saturate.
        let bytes = _mm512_packus_epi16(
            _mm512_packus_epi32(r[0], r[1]),
            _mm512_packus_epi32(r[2], r[3]),
        );
        // SAFETY: the output pixel has the masked channels at `o + cb`.
        unsafe { _mm512_mask_storeu_epi8(o.add(cb) as *mut i8, mask, bytes) };
    }

    /// [`block64`] on 256-bit vectors for the last `m` (1..=32) channels.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn block32(t: &BlockParams, taps: &[usize], cb: usize, m: usize, o: *mut u8) {
        let mask: __mmask32 = if m >= 32 { !0 } else { (1u32 << m) - 1 };
        let mut acc = [_mm256_setzero_si256(); 4];
        let wb = cb / DW_VNNI_BLOCK * t.groups * 4 * DW_VNNI_BLOCK;
        for g in 0..t.groups {
            // SAFETY: see `depthwise_vnni`.
            unsafe {
                let load =
                    |i: usize| _mm256_maskz_loadu_epi8(mask, (taps[4 * g + i] + cb) as *const i8);
                let (a, b, c, d) = (load(0), load(1), load(2), load(3));
                let ab_lo = _mm256_unpacklo_epi8(a, b);
                let ab_hi = _mm256_unpackhi_epi8(a, b);
                let cd_lo = _mm256_unpacklo_epi8(c, d);
                let cd_hi = _mm256_unpackhi_epi8(c, d);
                let q = [
                    _mm256_unpacklo_epi16(ab_lo, cd_lo),
                    _mm256_unpackhi_epi16(ab_lo, cd_lo),
                    _mm256_unpacklo_epi16(ab_hi, cd_hi),
                    _mm256_unpackhi_epi16(ab_hi, cd_hi),
                ];
                let wv = t.w.add(wb + g * 4 * DW_VNNI_BLOCK);
                for (j, (aj, qj)) in acc.iter_mut().zip(q).enumerate() {
                    let wj = _mm256_loadu_si256(wv.add(j * DW_VNNI_BLOCK) as *const _);
                    *aj = _mm256_dpbusd_epi32(*aj, qj, wj);
                }
            }
        }
        let (lo, hi, zp) = (
            _mm256_set1_ps(t.lo),
            _mm256_set1_ps(t.hi),
            _mm256_set1_epi32(t.zp),
        );
        let mut r = [_mm256_setzero_si256(); 4];
        for (j, (rj, aj)) in r.iter_mut().zip(acc).enumerate() {
            // SAFETY: as in `block64`; the first 8 lanes of accumulator `j`'s 16.
            unsafe {
                let at = cb + 16 * j;
                let b = _mm256_loadu_si256(t.bias.add(at) as *const _);
                let v = _mm256_cvtepi32_ps(_mm256_add_epi32(aj, b));
                let v = _mm256_mul_ps(v, _mm256_loadu_ps(t.mult.add(at)));
                let v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
                *rj = _mm256_add_epi32(_mm256_cvtps_epi32(v), zp);
            }
        }
        let bytes = _mm256_packus_epi16(
            _mm256_packus_epi32(r[0], r[1]),
            _mm256_packus_epi32(r[2], r[3]),
        );
        // SAFETY: as in `block64`.
        unsafe { _mm256_mask_storeu_epi8(o.add(cb) as *mut i8, mask, bytes) };
    }
}

/// Conv weights from OIHW (`[o][ci][k][k]`) to `[o][k][k][ci]`: the order of the channels-last
/// im2col rows that [`im2col`] writes.
pub fn gemm_weights(w: &[i8], o: usize, ci: usize, k: usize) -> Vec<i8> {
    assert_eq!(
        w.len(),
        o * ci * k * k,
        "conv weights: {o} x {ci} x {k} x {k} expected"
    );
    let mut out = vec![0i8; w.len()];
    for oc in 0..o {
        for c in 0..ci {
            for t in 0..k * k {
                out[(oc * k * k + t) * ci + c] = w[(oc * ci + c) * k * k + t];
            }
        }
    }
    out
}

/// The im2col rows of one sample for input channels `[c0, c0 + cg)`: one row of `k * k * cg`
/// bytes per output pixel (taps in row-major order, each tap's `cg` channels contiguous),
/// padding filled with the zero point (the quantized 0.0). `cols` holds at least
/// `out_h * out_w * k * k * cg` bytes.
///
/// When the group is all the channels, a kernel row inside the input is one run of
/// `k * cg` contiguous bytes, copied at once; short runs (the 9 bytes of a 3x3 tap row on an
/// RGB stem) are copied without a `memcpy` call, which cost more than the stem's GEMM.
pub fn im2col(x: &[u8], s: &ConvShape, c0: usize, cg: usize, zp: u8, cols: &mut [u8]) {
    let (ho, wo, k) = (s.out_h(), s.out_w(), s.k);
    let row = k * k * cg;
    assert!(cols.len() >= ho * wo * row, "im2col: buffer too small");
    let whole = cg == s.c;
    for oy in 0..ho {
        for ox in 0..wo {
            let dst = &mut cols[(oy * wo + ox) * row..][..row];
            let inside = s.window_inside(ox, s.w);
            for ky in 0..k {
                let iy = s.source(oy, ky, s.h);
                let drow = &mut dst[ky * k * cg..][..k * cg];
                match (iy, inside) {
                    (None, _) => fill_short(drow, zp),
                    (Some(iy), Some(ix)) if whole => {
                        copy_short(drow, &x[(iy * s.w + ix) * s.c..][..k * cg]);
                    }
                    (Some(iy), _) => {
                        for kx in 0..k {
                            let d = &mut drow[kx * cg..][..cg];
                            match s.source(ox, kx, s.w) {
                                Some(ix) => copy_short(d, &x[(iy * s.w + ix) * s.c + c0..][..cg]),
                                None => fill_short(d, zp),
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `dst.copy_from_slice(src)`, with the short lengths done by two overlapping fixed-size
/// moves instead of a library call.
#[inline(always)]
fn copy_short(dst: &mut [u8], src: &[u8]) {
    let n = dst.len();
    let src = &src[..n];
    if n >= 16 {
        dst.copy_from_slice(src);
    } else if n >= 8 {
        dst[..8].copy_from_slice(&src[..8]);
        dst[n - 8..].copy_from_slice(&src[n - 8..]);
    } else if n >= 4 {
        dst[..4].copy_from_slice(&src[..4]);
        dst[n - 4..].copy_from_slice(&src[n - 4..]);
    } else if n >= 2 {
        dst[..2].copy_from_slice(&src[..2]);
        dst[n - 2..].copy_from_slice(&src[n - 2..]);
    } else if n == 1 {
        dst[0] = src[0];
    }
}

/// `dst.fill(v)`, short lengths as in [`copy_short`].
#[inline(always)]
fn fill_short(dst: &mut [u8], v: u8) {
    let n = dst.len();
    if n >= 16 {
        dst.fill(v);
    } else {
        copy_short(dst, &[v; 16][..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{bytes, floats, ints, weights};
    use super::super::{Level, requantize_one};
    use super::*;
    use crate::rng::Rng;

    /// The conventions' depthwise conv on NHWC, value by value.
    fn reference(x: &[u8], s: &ConvShape, zp: u8, w_oihw: &[i8], rq: &Requant) -> Vec<u8> {
        let (ho, wo, c, k) = (s.out_h(), s.out_w(), s.c, s.k);
        let mut out = vec![0u8; ho * wo * c];
        for oy in 0..ho {
            for ox in 0..wo {
                for ch in 0..c {
                    let mut acc = 0i32;
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                            let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                            let inside =
                                iy >= 0 && ix >= 0 && (iy as usize) < s.h && (ix as usize) < s.w;
                            let v = if inside {
                                x[(iy as usize * s.w + ix as usize) * c + ch]
                            } else {
                                zp
                            };
                            acc += (v as i32 - zp as i32) * w_oihw[ch * k * k + ky * k + kx] as i32;
                        }
                    }
                    out[(oy * wo + ox) * c + ch] =
                        requantize_one(acc, rq.bias[ch], rq.mult[ch], rq.zp, rq.qmin, rq.qmax);
                }
            }
        }
        out
    }

    #[test]
    fn depthwise_matches_the_reference_at_every_level() {
        let mut rng = Rng::new(2);
        for &(h, w, c, k, stride) in &[
            (5, 5, 1, 3, 1),
            (7, 6, 17, 3, 2),
            (4, 4, 32, 3, 1),
            (9, 9, 40, 5, 2),
            (8, 7, 72, 5, 1),
            (2, 2, 96, 3, 1),
            (1, 1, 33, 3, 1),
            (3, 5, 65, 5, 2),
            (6, 6, 130, 3, 1),
            (5, 5, 64, 7, 1),
            (4, 3, 200, 3, 2),
            (3, 3, 128, 1, 1),
        ] {
            let s = ConvShape {
                h,
                w,
                c,
                k,
                stride,
                pad: k / 2,
            };
            let x = bytes(&mut rng, h * w * c);
            let wt = weights(&mut rng, c * k * k);
            let mult = floats(&mut rng, c, 1e-3, 5e-2);
            let bias = ints(&mut rng, c, -3000, 3000);
            for (zp, qmin) in [(0u8, 0), (131, 131), (255, 0)] {
                let rq = Requant {
                    mult: &mult,
                    bias: &bias,
                    zp: zp as i32,
                    qmin,
                    qmax: 255,
                };
                let want = reference(&x, &s, zp, &wt, &rq);
                for level in Level::available() {
                    let packed = DepthwiseWeights::new(&wt, c, k, level, zp, &rq);
                    let mut out = vec![0u8; want.len()];
                    let mut scratch = DepthwiseScratch::default();
                    depthwise(level, &x, &s, &packed, &mut out, &mut scratch);
                    assert_eq!(out, want, "{h}x{w}x{c} k{k} s{stride} zp {zp} {level:?}");
                }
            }
        }
    }

    #[test]
    fn depthwise_worst_case_is_exact() {
        // x = 255 with zp 0 and w = 127 over 25 taps: 25 * 255 * 127, far beyond i16.
        let s = ConvShape {
            h: 5,
            w: 5,
            c: 20,
            k: 5,
            stride: 1,
            pad: 2,
        };
        let x = vec![255u8; 25 * 20];
        for sign in [127i8, -127] {
            let wt = vec![sign; 20 * 25];
            let total = 25 * 255 * sign as i32;
            let bias = vec![-total + 9; 20];
            let mult = vec![1.0f32; 20];
            let rq = Requant {
                mult: &mult,
                bias: &bias,
                zp: 0,
                qmin: 0,
                qmax: 255,
            };
            for level in Level::available() {
                let packed = DepthwiseWeights::new(&wt, 20, 5, level, 0, &rq);
                let mut out = vec![0u8; 25 * 20];
                let mut scratch = DepthwiseScratch::default();
                depthwise(level, &x, &s, &packed, &mut out, &mut scratch);
                // The centre pixel sees all 25 taps.
                assert!(out[12 * 20..13 * 20].iter().all(|&v| v == 9), "{level:?}");
            }
        }
    }

    #[test]
    fn im2col_matches_the_tap_by_tap_definition() {
        // Whole-row copies (one group), short and long runs, padding on every side, strides.
        let mut rng = Rng::new(4);
        for &(h, w, c, k, stride, pad, groups) in &[
            (7, 7, 3, 3, 2, 1, 1),
            (6, 5, 3, 3, 1, 1, 1),
            (5, 6, 1, 3, 1, 1, 1),
            (9, 8, 2, 5, 2, 2, 1),
            (4, 4, 16, 3, 1, 1, 1),
            (5, 5, 6, 1, 2, 0, 1),
            (6, 6, 6, 3, 1, 1, 3),
            (3, 3, 3, 3, 1, 0, 1),
        ] {
            let s = ConvShape {
                h,
                w,
                c,
                k,
                stride,
                pad,
            };
            let cg = c / groups;
            let x = bytes(&mut rng, h * w * c);
            let (ho, wo) = (s.out_h(), s.out_w());
            let row = k * k * cg;
            for g in 0..groups {
                let mut want = vec![0u8; ho * wo * row];
                for oy in 0..ho {
                    for ox in 0..wo {
                        for ky in 0..k {
                            for kx in 0..k {
                                for ci in 0..cg {
                                    let iy = (oy * stride + ky) as isize - pad as isize;
                                    let ix = (ox * stride + kx) as isize - pad as isize;
                                    let inside = iy >= 0
                                        && ix >= 0
                                        && (iy as usize) < h
                                        && (ix as usize) < w;
                                    want[(oy * wo + ox) * row + (ky * k + kx) * cg + ci] = if inside
                                    {
                                        x[(iy as usize * w + ix as usize) * c + g * cg + ci]
                                    } else {
                                        99
                                    };
                                }
                            }
                        }
                    }
                }
                let mut got = vec![7u8; want.len()];
                im2col(&x, &s, g * cg, cg, 99, &mut got);
                assert_eq!(got, want, "{h}x{w}x{c} k{k} s{stride} p{pad} group {g}");
            }
        }
    }

    #[test]
    fn im2col_rows_with_gemm_weights_give_the_direct_conv() {
        // A grouped 3x3 conv computed as im2col + dot products with the reordered weights
        // equals the direct definition on NHWC with zero-point padding.
        let mut rng = Rng::new(3);
        let s = ConvShape {
            h: 5,
            w: 4,
            c: 6,
            k: 3,
            stride: 2,
            pad: 1,
        };
        let (groups, o) = (2, 4);
        let (cg, og) = (s.c / groups, o / groups);
        let zp = 77u8;
        let x = bytes(&mut rng, s.h * s.w * s.c);
        let w = weights(&mut rng, o * cg * 9);
        let (ho, wo) = (s.out_h(), s.out_w());
        let mut cols = vec![0u8; ho * wo * 9 * cg];
        for g in 0..groups {
            im2col(&x, &s, g * cg, cg, zp, &mut cols);
            let wg = gemm_weights(&w[g * og * cg * 9..(g + 1) * og * cg * 9], og, cg, 3);
            for p in 0..ho * wo {
                for oc in 0..og {
                    let got: i32 = (0..9 * cg)
                        .map(|i| {
                            (cols[p * 9 * cg + i] as i32 - zp as i32) * wg[oc * 9 * cg + i] as i32
                        })
                        .sum();
                    let (oy, ox) = (p / wo, p % wo);
                    let mut want = 0;
                    for ci in 0..cg {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let iy = (oy * 2 + ky) as isize - 1;
                                let ix = (ox * 2 + kx) as isize - 1;
                                if iy < 0 || ix < 0 || iy >= 5 || ix >= 4 {
                                    continue;
                                }
                                let v = x[(iy as usize * 4 + ix as usize) * 6 + g * cg + ci] as i32;
                                want += (v - zp as i32)
                                    * w[((g * og + oc) * cg + ci) * 9 + ky * 3 + kx] as i32;
                            }
                        }
                    }
                    assert_eq!(got, want, "group {g} pixel {p} channel {oc}");
                }
            }
        }
    }
}
