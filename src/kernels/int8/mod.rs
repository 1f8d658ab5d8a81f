//! Integer (uint8 activation x int8 weight) CPU kernels for the int8 engine (`crate::int8`).
//!
//! The arithmetic is fixed by `docs/quantization.md` (the scheme shared with the quantization
//! pass): activations are u8 with a per-tensor zero point, weights are symmetric i8 per output
//! channel, accumulation is exact in i32, and every result is requantized with one f32
//! multiply, round half to even, the output zero point and a clamp ([`Requant`]).
//!
//! Layout: every activation buffer is channels-last (NHWC, one sample's pixels in row-major
//! order, each pixel's channels contiguous), as in onnxruntime's MLAS. Why: a 1x1 conv is then
//! a plain GEMM with the pixels as rows and the input channels as the reduction (no im2col at
//! all), a dense k x k conv's im2col rows are runs of contiguous channel bytes, the depthwise
//! conv vectorises across channels (each tap is one vector multiply-add, whatever the plane
//! size, which matters for the 7x7 and 4x4 planes of small inputs), and the per-channel
//! requantization runs along contiguous output rows.
//!
//! | module | kernels |
//! |---|---|
//! | `gemm.rs` | u8 x i8 -> i32 GEMM with packed weights and the fused requantization; AVX-512 VNNI (`vpdpbusd`), AVX2 (exact: widened to i16, `vpmaddwd`), scalar |
//! | `conv.rs` | direct depthwise conv, im2col to u8 with zero-point padding |
//! | `elementwise.rs` | residual add, max / average / global average pooling, lookup tables, SE channel multiply, quantize and dequantize, channel copies |
//!
//! Every kernel takes the instruction-set [`Level`] explicitly: the engine passes [`level()`],
//! the tests run every level the CPU has and compare it with [`Level::Scalar`] for exact
//! equality. Integer arithmetic is exact in any order and the requantization uses the same
//! f32 operations in every path, so the paths are bit-identical by construction; the tests
//! check it.

pub mod conv;
pub mod elementwise;
pub mod gemm;

/// Instruction-set level of the int8 kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Plain Rust, baseline x86-64 (or any other target): the reference.
    Scalar,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512 F/BW/VL with VNNI (`vpdpbusd`).
    Vnni,
}

impl Level {
    /// Every level this CPU can run, the scalar reference first.
    pub fn available() -> Vec<Level> {
        let mut v = vec![Level::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Level::Avx2);
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    v.push(Level::Vnni);
                }
            }
        }
        v
    }
}

/// The best level this CPU supports (detected once), capped by `SLIMCANDLE_SIMD`
/// (`baseline` or `avx2`, as for the float kernels), which exists to test and time the others.
pub fn level() -> Level {
    static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = *Level::available().last().expect("scalar is always there");
        match std::env::var("SLIMCANDLE_SIMD")
            .unwrap_or_default()
            .as_str()
        {
            "baseline" => Level::Scalar,
            "avx2" if best == Level::Vnni => Level::Avx2,
            _ => best,
        }
    })
}

/// `int8_dispatch!(vis fn name(args) => body);` defines `name(level, args)`, which runs the
/// generic `#[inline(always)]` function `body(args)` compiled for `level`: with AVX2 or
/// AVX-512 enabled the compiler vectorises the integer loops and the f32 requantization.
macro_rules! int8_dispatch {
    ($vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(level: $crate::kernels::int8::Level, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn vnni($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                match level {
                    // SAFETY: a level other than Scalar comes from `Level::available`, which
                    // detected these target features.
                    $crate::kernels::int8::Level::Vnni => return unsafe { vnni($($arg),*) },
                    $crate::kernels::int8::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::kernels::int8::Level::Scalar => {}
                }
            }
            $body($($arg),*)
        }
    };
}

pub(crate) use int8_dispatch;

/// The per-output-channel requantization of a conv or linear layer:
/// `y = clamp(round_half_even((acc + bias[c]) as f32 * mult[c]) + zp, qmin, qmax)`.
///
/// `bias` already holds what the kernel's raw accumulator misses: for the GEMM (which sums
/// `x_q * w_q` without the input zero point) `bias_q[c] - x_zp * sum_k w_q[c][k]`, for the
/// depthwise conv (which subtracts the zero point itself) `bias_q[c]`.
#[derive(Debug, Clone, Copy)]
pub struct Requant<'a> {
    pub mult: &'a [f32],
    pub bias: &'a [i32],
    pub zp: i32,
    pub qmin: i32,
    pub qmax: i32,
}

impl<'a> Requant<'a> {
    /// The same requantization for channels `[start, start + len)`.
    pub fn channels(&self, start: usize, len: usize) -> Requant<'a> {
        Requant {
            mult: &self.mult[start..start + len],
            bias: &self.bias[start..start + len],
            ..*self
        }
    }
}

/// The conventions' formula, literally, for one value: the reference of every path.
pub fn requantize_one(acc: i32, bias: i32, mult: f32, zp: i32, qmin: i32, qmax: i32) -> u8 {
    let v = (acc.wrapping_add(bias) as f32 * mult).round_ties_even() as i32;
    v.saturating_add(zp).clamp(qmin, qmax) as u8
}

/// `out[i] = requantize(acc[i])` for channels `0..acc.len()` of `rq`: the fused output stage
/// of the GEMM and the depthwise conv, with the instructions of `level`.
///
/// Clamping in f32 to `[qmin - zp, qmax - zp]` before rounding gives the same result as the
/// formula (rounding is monotone and the bounds are integers) and keeps the conversion to i32
/// in range; the SIMD paths round with `vcvtps2dq` (nearest even in the default mode).
#[inline]
pub(crate) fn requantize(level: Level, acc: &[i32], rq: &Requant, out: &mut [u8]) {
    let n = acc.len();
    assert!(
        rq.mult.len() >= n && rq.bias.len() >= n && out.len() >= n,
        "requantize"
    );
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level was detected (`Level::available`); lengths checked above.
        Level::Vnni => unsafe { x86::requantize_avx512(acc, rq, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { x86::requantize_avx2(acc, rq, out) },
        _ => requantize_row(acc, rq, out),
    }
}

/// The scalar requantization (also the AVX2 path's remainder).
#[inline(always)]
pub(crate) fn requantize_row(acc: &[i32], rq: &Requant, out: &mut [u8]) {
    let n = acc.len();
    let (mult, bias, out) = (&rq.mult[..n], &rq.bias[..n], &mut out[..n]);
    let lo = (rq.qmin - rq.zp) as f32;
    let hi = (rq.qmax - rq.zp) as f32;
    for i in 0..n {
        let v = (acc[i].wrapping_add(bias[i]) as f32 * mult[i])
            .max(lo)
            .min(hi);
        out[i] = (round_small(v) + rq.zp) as u8;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Requant, requantize_row};
    use std::arch::x86_64::*;

    /// 16 channels per step, the last step masked.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) unsafe fn requantize_avx512(acc: &[i32], rq: &Requant, out: &mut [u8]) {
        let n = acc.len();
        let lo = _mm512_set1_ps((rq.qmin - rq.zp) as f32);
        let hi = _mm512_set1_ps((rq.qmax - rq.zp) as f32);
        let zp = _mm512_set1_epi32(rq.zp);
        let mut i = 0;
        while i < n {
            let m = (n - i).min(16);
            let mask: __mmask16 = if m == 16 { 0xffff } else { (1u16 << m) - 1 };
            // SAFETY: the masked lanes are within the n values of every slice.
            unsafe {
                let a = _mm512_maskz_loadu_epi32(mask, acc.as_ptr().add(i));
                let b = _mm512_maskz_loadu_epi32(mask, rq.bias.as_ptr().add(i));
                let s = _mm512_maskz_loadu_ps(mask, rq.mult.as_ptr().add(i));
                let v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a, b)), s);
                let v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
                let q = _mm512_add_epi32(_mm512_cvtps_epi32(v), zp);
                _mm512_mask_cvtepi32_storeu_epi8(out.as_mut_ptr().add(i) as *mut _, mask, q);
            }
            i += 16;
        }
    }

    /// 8 channels per step, the remainder scalar.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn requantize_avx2(acc: &[i32], rq: &Requant, out: &mut [u8]) {
        let n = acc.len();
        let lo = _mm256_set1_ps((rq.qmin - rq.zp) as f32);
        let hi = _mm256_set1_ps((rq.qmax - rq.zp) as f32);
        let zp = _mm256_set1_epi32(rq.zp);
        let full = n / 8 * 8;
        for i in (0..full).step_by(8) {
            // SAFETY: i + 8 <= n for every slice.
            unsafe {
                let a = _mm256_loadu_si256(acc.as_ptr().add(i) as *const _);
                let b = _mm256_loadu_si256(rq.bias.as_ptr().add(i) as *const _);
                let s = _mm256_loadu_ps(rq.mult.as_ptr().add(i));
                let v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a, b)), s);
                let v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
                let q = _mm256_add_epi32(_mm256_cvtps_epi32(v), zp);
                let w = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
                let bytes = _mm_packus_epi16(w, w);
                _mm_storel_epi64(out.as_mut_ptr().add(i) as *mut _, bytes);
            }
        }
        let tail = rq.channels(full, n - full);
        requantize_row(&acc[full..], &tail, &mut out[full..n]);
    }
}

/// `v.round_ties_even() as i32` for `|v| <= 2^22`: adding 1.5 * 2^23 rounds `v` to an
/// integer in the default (nearest-even) mode and leaves it in the low mantissa bits, where
/// an integer subtraction reads it. Why: unlike `round_ties_even` and the saturating `as i32`,
/// this is one vector add and one vector subtract at every level; the clamps before it keep
/// `|v| <= 255`.
#[inline(always)]
fn round_small(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    ((v + MAGIC).to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32)
}

/// `round_half_even(v) + zp` clamped to `[qmin, qmax]`, for element-wise kernels (the same
/// clamp-first form as [`requantize_row`]).
#[inline(always)]
pub(crate) fn round_clamp(v: f32, zp: i32, qmin: i32, qmax: i32) -> u8 {
    let v = v.max((qmin - zp) as f32).min((qmax - zp) as f32);
    (round_small(v) + zp) as u8
}

#[cfg(test)]
pub(crate) mod testing {
    //! Seeded test data for the kernel tests.
    use crate::rng::Rng;

    pub fn bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
        (0..n).map(|_| (rng.uniform() * 256.0) as u8).collect()
    }

    /// Weights in [-127, 127].
    pub fn weights(rng: &mut Rng, n: usize) -> Vec<i8> {
        (0..n)
            .map(|_| ((rng.uniform() * 255.0) as i32 - 127) as i8)
            .collect()
    }

    pub fn floats(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n)
            .map(|_| lo + (hi - lo) * rng.uniform() as f32)
            .collect()
    }

    pub fn ints(rng: &mut Rng, n: usize, lo: i32, hi: i32) -> Vec<i32> {
        (0..n)
            .map(|_| lo + ((hi - lo) as f64 * rng.uniform()) as i32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requantize_row_matches_the_formula_at_every_level() {
        // Values around the rounding ties, the clamps and far outside them.
        let acc: Vec<i32> = (-40..40)
            .map(|i| i * 7)
            .chain([i32::MAX - 10, i32::MIN + 10, 1 << 28, -(1 << 28)])
            .collect();
        let n = acc.len();
        let mult: Vec<f32> = (0..n).map(|i| [0.5f32, 0.25, 1.5, 3.0e-3][i % 4]).collect();
        let bias: Vec<i32> = (0..n).map(|i| (i as i32 % 5) - 2).collect();
        for (zp, qmin, qmax) in [(0, 0, 255), (128, 0, 255), (3, 3, 255), (10, 10, 40)] {
            let rq = Requant {
                mult: &mult,
                bias: &bias,
                zp,
                qmin,
                qmax,
            };
            let want: Vec<u8> = (0..n)
                .map(|i| requantize_one(acc[i], bias[i], mult[i], zp, qmin, qmax))
                .collect();
            for level in Level::available() {
                for len in [n, 1, 7, 8, 15, 17, 33] {
                    let mut got = vec![0u8; len];
                    requantize(level, &acc[..len], &rq, &mut got);
                    assert_eq!(got, want[..len], "{level:?}, zp {zp}, {len} values");
                }
            }
        }
    }
}
