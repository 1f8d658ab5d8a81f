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
}

/// Depthwise weights from OIHW (`[c][1][k][k]`) to the kernel's `[k * k][c]` in i16.
pub fn depthwise_weights(w: &[i8], c: usize, k: usize) -> Vec<i16> {
    assert_eq!(
        w.len(),
        c * k * k,
        "depthwise weights: {c} x {k} x {k} expected"
    );
    let mut out = vec![0i16; c * k * k];
    for ch in 0..c {
        for t in 0..k * k {
            out[t * c + ch] = w[ch * k * k + t] as i16;
        }
    }
    out
}

/// Direct depthwise conv of one sample: `out[p][c] = requantize(sum_taps (x - zp) * w[t][c])`.
///
/// Why direct: each channel has its own filter, so there is nothing for a GEMM to share.
/// Values are widened to 16 bits with the zero point subtracted (`x - zp` in [-255, 255], the
/// product with a weight in [-127, 127] fits i16 exactly) and summed in i32 (as MLAS's
/// `qdwconv`); each tap is one pass over the pixel's channels, which the compiler vectorises.
/// Taps that fall on padding add `(zp - zp) * w = 0` and are skipped. `acc` is scratch of at
/// least `c` values.
#[allow(clippy::too_many_arguments)]
pub fn depthwise(
    level: Level,
    x: &[u8],
    s: &ConvShape,
    zp: u8,
    w: &[i16],
    rq: &Requant,
    out: &mut [u8],
    acc: &mut [i32],
) {
    let (ho, wo, c) = (s.out_h(), s.out_w(), s.c);
    assert!(
        x.len() >= s.h * s.w * c && out.len() >= ho * wo * c,
        "depthwise: buffer sizes"
    );
    assert!(
        w.len() >= s.k * s.k * c && acc.len() >= c,
        "depthwise: weight sizes"
    );
    depthwise_at(level, level, x, s, zp, w, rq, out, acc);
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
pub fn im2col(x: &[u8], s: &ConvShape, c0: usize, cg: usize, zp: u8, cols: &mut [u8]) {
    let (ho, wo, k) = (s.out_h(), s.out_w(), s.k);
    let row = k * k * cg;
    assert!(cols.len() >= ho * wo * row, "im2col: buffer too small");
    for oy in 0..ho {
        for ox in 0..wo {
            let dst = &mut cols[(oy * wo + ox) * row..][..row];
            for ky in 0..k {
                let iy = s.source(oy, ky, s.h);
                for kx in 0..k {
                    let d = &mut dst[(ky * k + kx) * cg..][..cg];
                    match (iy, s.source(ox, kx, s.w)) {
                        (Some(iy), Some(ix)) => {
                            d.copy_from_slice(&x[(iy * s.w + ix) * s.c + c0..][..cg]);
                        }
                        _ => d.fill(zp),
                    }
                }
            }
        }
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
            for (zp, qmin) in [(0u8, 0), (131, 131)] {
                let rq = Requant {
                    mult: &mult,
                    bias: &bias,
                    zp: zp as i32,
                    qmin,
                    qmax: 255,
                };
                let want = reference(&x, &s, zp, &wt, &rq);
                let packed = depthwise_weights(&wt, c, k);
                for level in Level::available() {
                    let mut out = vec![0u8; want.len()];
                    let mut acc = vec![0i32; c];
                    depthwise(level, &x, &s, zp, &packed, &rq, &mut out, &mut acc);
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
            let packed = depthwise_weights(&wt, 20, 5);
            for level in Level::available() {
                let mut out = vec![0u8; 25 * 20];
                let mut acc = vec![0i32; 20];
                depthwise(level, &x, &s, 0, &packed, &rq, &mut out, &mut acc);
                // The centre pixel sees all 25 taps.
                assert!(out[12 * 20..13 * 20].iter().all(|&v| v == 9), "{level:?}");
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
