//! The int8 engine's element-wise, pooling and conversion kernels, on channels-last u8
//! buffers, with the formulas of the int8 conventions (round half to even everywhere).

use super::{int8_dispatch, round_clamp};

/// Quantizes one NCHW f32 sample (`c` planes of `hw` values) into NHWC u8:
/// `q = clamp(round_half_even(x / scale) + zp, 0, 255)` (ONNX `QuantizeLinear`).
pub fn quantize_to_nhwc(
    level: super::Level,
    x: &[f32],
    c: usize,
    hw: usize,
    scale: f32,
    zp: u8,
    out: &mut [u8],
) {
    assert!(
        x.len() >= c * hw && out.len() >= c * hw,
        "quantize: buffer sizes"
    );
    quantize_at(level, x, c, hw, scale, zp, out);
}

/// Pixels per block of [`quantize_to_nhwc`]: each channel's codes are computed along its
/// contiguous plane (vectorised), then interleaved into the block's channels-last bytes.
/// Why: computed in the channels-last order, every value was a strided, scalar store with its
/// own division, 9% of MobileNet V2's int8 time at 224x224.
const QUANTIZE_BLOCK: usize = 64;

#[inline(always)]
fn quantize_body(x: &[f32], c: usize, hw: usize, scale: f32, zp: u8, out: &mut [u8]) {
    let mut codes = [0u8; QUANTIZE_BLOCK];
    for p0 in (0..hw).step_by(QUANTIZE_BLOCK) {
        let len = QUANTIZE_BLOCK.min(hw - p0);
        let block = &mut out[p0 * c..(p0 + len) * c];
        for (ch, plane) in x.chunks_exact(hw).take(c).enumerate() {
            for (q, &v) in codes.iter_mut().zip(&plane[p0..p0 + len]) {
                *q = round_clamp(v / scale, zp as i32, 0, 255);
            }
            for (d, &q) in block[ch..].iter_mut().step_by(c).zip(&codes[..len]) {
                *d = q;
            }
        }
    }
}

int8_dispatch!(fn quantize_at(x: &[f32], c: usize, hw: usize, scale: f32, zp: u8, out: &mut [u8]) => quantize_body);

/// `out = scale * (q - zp)` (the same order of values; ONNX `DequantizeLinear`).
pub fn dequantize(level: super::Level, q: &[u8], scale: f32, zp: u8, out: &mut [f32]) {
    dequantize_at(level, q, scale, zp, out);
}

#[inline(always)]
fn dequantize_body(q: &[u8], scale: f32, zp: u8, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(q) {
        *o = scale * (v as i32 - zp as i32) as f32;
    }
}

int8_dispatch!(fn dequantize_at(q: &[u8], scale: f32, zp: u8, out: &mut [f32]) => dequantize_body);

/// The per-tensor constants of the residual add, folded as onnxruntime's QLinearAdd does
/// (`passes::quant::scheme::add_params` makes them; `docs/quantization.md` has the formula).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AddParams {
    /// `a_scale / y_scale` and `b_scale / y_scale`.
    pub fa: f32,
    pub fb: f32,
    /// `y_zp - fma(fa, a_zp, fb * b_zp)`: the zero points folded into one f32 constant.
    pub offset: f32,
    /// 0, or the output zero point under a fused ReLU.
    pub qmin: u8,
    pub qmax: u8,
}

/// Residual add: `y = clamp(round_half_even(fma(a, fa, fma(b, fb, offset))), qmin, qmax)`, the
/// arithmetic of MLAS's AVX2 QLinearAdd kernel (also what onnxruntime runs on AVX-512
/// machines), so that an exported model's fused graph gives the same codes.
pub fn add(level: super::Level, a: &[u8], b: &[u8], p: &AddParams, out: &mut [u8]) {
    assert!(
        a.len() == b.len() && out.len() == a.len(),
        "add: buffer sizes"
    );
    add_at(level, a, b, p, out);
}

#[inline(always)]
fn add_body(a: &[u8], b: &[u8], p: &AddParams, out: &mut [u8]) {
    let (lo, hi) = (p.qmin as i32, p.qmax as i32);
    for i in 0..out.len() {
        // `mul_add` is one rounding, as `_mm256_fmadd_ps` (a vector FMA at the AVX2 and
        // AVX-512 levels; a correctly rounded library call at the scalar level).
        let v = (a[i] as f32).mul_add(p.fa, (b[i] as f32).mul_add(p.fb, p.offset));
        out[i] = round_clamp(v, 0, lo, hi);
    }
}

int8_dispatch!(fn add_at(a: &[u8], b: &[u8], p: &AddParams, out: &mut [u8]) => add_body);

/// `out[i] = t[x[i]]`: activations by table (`passes::quant::scheme::lookup_table`), and
/// copies whose input and output qparams differ.
pub fn lookup(t: &[u8; 256], x: &[u8], out: &mut [u8]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = t[v as usize];
    }
}

/// Squeeze-and-excitation multiply of one sample: `x` is `pixels x c`, `s` the `c` gates;
/// `y = clamp(round_half_even((x - x_zp) * (s - s_zp) as f32 * mult) + y_zp)` with
/// `mult = x_scale * s_scale / y_scale`.
#[allow(clippy::too_many_arguments)]
pub fn channel_mul(
    level: super::Level,
    x: &[u8],
    c: usize,
    s: &[u8],
    x_zp: u8,
    s_zp: u8,
    mult: f32,
    y_zp: u8,
    out: &mut [u8],
) {
    assert!(
        s.len() >= c && out.len() == x.len() && x.len().is_multiple_of(c.max(1)),
        "channel mul"
    );
    channel_mul_at(level, x, c, s, x_zp, s_zp, mult, y_zp, out);
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn channel_mul_body(
    x: &[u8],
    c: usize,
    s: &[u8],
    x_zp: u8,
    s_zp: u8,
    mult: f32,
    y_zp: u8,
    out: &mut [u8],
) {
    let s = &s[..c];
    for (xs, ys) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
        for i in 0..c {
            let prod = (xs[i] as i32 - x_zp as i32) * (s[i] as i32 - s_zp as i32);
            ys[i] = round_clamp(prod as f32 * mult, y_zp as i32, 0, 255);
        }
    }
}

int8_dispatch!(fn channel_mul_at(x: &[u8], c: usize, s: &[u8], x_zp: u8, s_zp: u8, mult: f32, y_zp: u8, out: &mut [u8]) => channel_mul_body);

/// Pooling windows on one NHWC sample: input `h x w x c`, output `ho x wo x c`.
#[derive(Debug, Clone, Copy)]
pub struct PoolShape {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl PoolShape {
    /// The input rows (or columns) `[start, end)` of output `o`'s window, clipped.
    fn window(&self, o: usize, len: usize) -> (usize, usize) {
        let start = (o * self.stride) as isize - self.pad as isize;
        let end = (start + self.k as isize).min(len as isize);
        (start.max(0) as usize, end.max(0) as usize)
    }
}

/// Max pooling (padding never wins, as in PyTorch); the qparams pass through.
pub fn max_pool(level: super::Level, x: &[u8], s: &PoolShape, out: &mut [u8]) {
    assert!(
        x.len() >= s.h * s.w * s.c && out.len() >= s.ho * s.wo * s.c,
        "max pool"
    );
    max_pool_at(level, x, s, out);
}

#[inline(always)]
fn max_pool_body(x: &[u8], s: &PoolShape, out: &mut [u8]) {
    let c = s.c;
    for oy in 0..s.ho {
        let (y0, y1) = s.window(oy, s.h);
        for ox in 0..s.wo {
            let (x0, x1) = s.window(ox, s.w);
            let o = &mut out[(oy * s.wo + ox) * c..][..c];
            o.fill(0);
            for iy in y0..y1 {
                for ix in x0..x1 {
                    let v = &x[(iy * s.w + ix) * c..][..c];
                    for i in 0..c {
                        o[i] = o[i].max(v[i]);
                    }
                }
            }
        }
    }
}

int8_dispatch!(fn max_pool_at(x: &[u8], s: &PoolShape, out: &mut [u8]) => max_pool_body);

/// Average pooling with zero padding counted in the divisor:
/// `y = clamp(round_half_even((sum - k*k*zp) as f32 * mult) + y_zp)` over each window, padding
/// counted as the zero point, `mult = in_scale / out_scale / (k*k) as f32`. With `k`, `stride`
/// and the window covering the whole plane this is the global average pool. `acc` is scratch
/// of `c` values.
#[allow(clippy::too_many_arguments)]
pub fn avg_pool(
    level: super::Level,
    x: &[u8],
    s: &PoolShape,
    in_zp: u8,
    mult: f32,
    y_zp: u8,
    out: &mut [u8],
    acc: &mut [i32],
) {
    assert!(
        x.len() >= s.h * s.w * s.c && out.len() >= s.ho * s.wo * s.c,
        "avg pool"
    );
    assert!(acc.len() >= s.c, "avg pool scratch");
    avg_pool_at(level, x, s, in_zp, mult, y_zp, out, acc);
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn avg_pool_body(
    x: &[u8],
    s: &PoolShape,
    in_zp: u8,
    mult: f32,
    y_zp: u8,
    out: &mut [u8],
    acc: &mut [i32],
) {
    let c = s.c;
    let acc = &mut acc[..c];
    for oy in 0..s.ho {
        let (y0, y1) = s.window(oy, s.h);
        for ox in 0..s.wo {
            let (x0, x1) = s.window(ox, s.w);
            // The window's sum minus k*k zero points: in-bounds values minus their zero
            // points (padding contributes zp - zp = 0).
            let inside = ((y1 - y0) * (x1 - x0)) as i32;
            acc.fill(-inside * in_zp as i32);
            for iy in y0..y1 {
                for ix in x0..x1 {
                    let v = &x[(iy * s.w + ix) * c..][..c];
                    for i in 0..c {
                        acc[i] += v[i] as i32;
                    }
                }
            }
            let o = &mut out[(oy * s.wo + ox) * c..][..c];
            for i in 0..c {
                o[i] = round_clamp(acc[i] as f32 * mult, y_zp as i32, 0, 255);
            }
        }
    }
}

int8_dispatch!(fn avg_pool_at(x: &[u8], s: &PoolShape, in_zp: u8, mult: f32, y_zp: u8, out: &mut [u8], acc: &mut [i32]) => avg_pool_body);

#[cfg(test)]
mod tests {
    use super::super::Level;
    use super::super::testing::{bytes, floats};
    use super::*;
    use crate::rng::Rng;

    fn rq(v: f32, zp: i32, lo: i32, hi: i32) -> u8 {
        ((v.round_ties_even() as i32).saturating_add(zp)).clamp(lo, hi) as u8
    }

    #[test]
    fn quantize_and_dequantize_match_the_formulas() {
        let mut rng = Rng::new(4);
        let (c, hw) = (5, 150);
        let mut x = floats(&mut rng, c * hw, -3.0, 3.0);
        // Exact ties and far-out values.
        x[0] = 0.5 * 0.02;
        x[1] = 1.5 * 0.02;
        x[2] = 1e9;
        x[3] = -1e9;
        let (scale, zp) = (0.02f32, 117u8);
        let mut want = vec![0u8; c * hw];
        for ch in 0..c {
            for p in 0..hw {
                want[p * c + ch] = rq(x[ch * hw + p] / scale, zp as i32, 0, 255);
            }
        }
        let q = bytes(&mut rng, 300);
        let want_f: Vec<f32> = q
            .iter()
            .map(|&v| scale * (v as i32 - zp as i32) as f32)
            .collect();
        for level in Level::available() {
            let mut got = vec![0u8; c * hw];
            quantize_to_nhwc(level, &x, c, hw, scale, zp, &mut got);
            assert_eq!(got, want, "quantize {level:?}");
            let mut f = vec![0f32; 300];
            dequantize(level, &q, scale, zp, &mut f);
            assert_eq!(f, want_f, "dequantize {level:?}");
        }
    }

    #[test]
    fn add_matches_the_formula_including_the_worst_cases() {
        use crate::passes::quant::{QParams, scheme};
        let mut rng = Rng::new(5);
        let mut a = bytes(&mut rng, 203);
        let mut b = bytes(&mut rng, 203);
        a[..4].copy_from_slice(&[255, 0, 255, 0]);
        b[..4].copy_from_slice(&[255, 0, 0, 255]);
        let q = |scale, zero_point| QParams { scale, zero_point };
        for p in [
            scheme::add_params(q(0.07, 10), q(0.13, 200), q(0.1, 90), 0, 255),
            scheme::add_params(q(0.2, 0), q(0.05, 0), q(0.1, 40), 40, 255),
        ] {
            // The scalar reference (the simulation's), against every kernel level.
            let want: Vec<u8> = (0..a.len()).map(|i| scheme::add(a[i], b[i], &p)).collect();
            for level in Level::available() {
                let mut got = vec![0u8; a.len()];
                add(level, &a, &b, &p, &mut got);
                assert_eq!(got, want, "{level:?}");
            }
        }
    }

    #[test]
    fn table_and_channel_mul_match_the_formulas() {
        let mut t = [0u8; 256];
        t.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = 255 - i as u8);
        let mut out = [0u8; 3];
        lookup(&t, &[0, 7, 255], &mut out);
        assert_eq!(out, [255, 248, 0]);

        let mut rng = Rng::new(6);
        let c = 37;
        let mut x = bytes(&mut rng, c * 11);
        let mut s = bytes(&mut rng, c);
        x[0] = 255;
        s[0] = 255;
        let (xz, sz, m, yz) = (3u8, 0u8, 3.1e-4f32, 5u8);
        let want: Vec<u8> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let prod = (v as i32 - xz as i32) * (s[i % c] as i32 - sz as i32);
                rq(prod as f32 * m, yz as i32, 0, 255)
            })
            .collect();
        for level in Level::available() {
            let mut got = vec![0u8; x.len()];
            channel_mul(level, &x, c, &s, xz, sz, m, yz, &mut got);
            assert_eq!(got, want, "{level:?}");
        }
    }

    #[test]
    fn pools_match_direct_window_loops() {
        let mut rng = Rng::new(7);
        for &(h, w, c, k, stride, pad, ceil) in &[
            (7, 7, 5, 3, 2, 1, false),
            (8, 9, 33, 3, 2, 0, true),
            (4, 4, 64, 2, 2, 0, false),
            (7, 7, 17, 7, 7, 0, false),
            (5, 3, 3, 3, 1, 1, false),
        ] {
            let out_len = |n: usize| {
                let span = n + 2 * pad - k;
                let mut o = if ceil {
                    span.div_ceil(stride)
                } else {
                    span / stride
                } + 1;
                if ceil && (o - 1) * stride >= n + pad {
                    o -= 1;
                }
                o
            };
            let s = PoolShape {
                h,
                w,
                c,
                k,
                stride,
                pad,
                ho: out_len(h),
                wo: out_len(w),
            };
            let x = bytes(&mut rng, h * w * c);
            let (zp, yz, m) = (60u8, 12u8, 0.9 / (k * k) as f32);
            let mut want_max = vec![0u8; s.ho * s.wo * c];
            let mut want_avg = vec![0u8; s.ho * s.wo * c];
            for oy in 0..s.ho {
                for ox in 0..s.wo {
                    for ch in 0..c {
                        let (mut mx, mut sum) = (0u8, 0i32);
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * stride + ky) as isize - pad as isize;
                                let ix = (ox * stride + kx) as isize - pad as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    let v = x[(iy as usize * w + ix as usize) * c + ch];
                                    mx = mx.max(v);
                                    sum += v as i32;
                                } else {
                                    sum += zp as i32;
                                }
                            }
                        }
                        let o = (oy * s.wo + ox) * c + ch;
                        want_max[o] = mx;
                        want_avg[o] = rq(
                            (sum - (k * k) as i32 * zp as i32) as f32 * m,
                            yz as i32,
                            0,
                            255,
                        );
                    }
                }
            }
            for level in Level::available() {
                let mut got = vec![0u8; want_max.len()];
                max_pool(level, &x, &s, &mut got);
                assert_eq!(got, want_max, "max {h}x{w}x{c} k{k} {level:?}");
                if !ceil {
                    let mut acc = vec![0i32; c];
                    avg_pool(level, &x, &s, zp, m, yz, &mut got, &mut acc);
                    assert_eq!(got, want_avg, "avg {h}x{w}x{c} k{k} {level:?}");
                }
            }
        }
    }
}
