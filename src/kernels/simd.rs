//! Run-time selection of the instruction set for the hand-written loops.
//!
//! Why: the crate is built for baseline x86-64 (SSE2), so plain loops vectorise 4 floats wide
//! and without fused multiply-add. The hot loops are written once as `#[inline(always)]`
//! generic bodies over [`Madd`]; [`simd_dispatch!`] compiles each body a second and third time
//! with AVX2+FMA and AVX-512 enabled and picks the best one the CPU offers when it is called.

/// Multiply-add `a * b + c`, fused where the instruction set has FMA.
pub(crate) trait Madd {
    fn madd(a: f32, b: f32, c: f32) -> f32;
}

/// Fused multiply-add. Only used inside functions compiled with the `fma` target feature,
/// where `mul_add` is one instruction (elsewhere it would be a slow libm call).
pub(crate) struct Fused;

impl Madd for Fused {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// Separate multiply and add, for CPUs without FMA.
pub(crate) struct Separate;

impl Madd for Separate {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// The AVX-512 mask (`__mmask16`) of the first `n` of 16 lanes, all 16 from `n` = 16 on: the
/// masked loads and stores of a vector loop's last, partial vector.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline]
pub(crate) fn first_lanes(n: usize) -> u16 {
    if n >= 16 { u16::MAX } else { (1u16 << n) - 1 }
}

/// The best instruction set level this CPU supports (detected once, then cached), capped by
/// the environment variable `SLIMCANDLE_SIMD` (`baseline`, `avx2`), which exists to test and
/// time the other variants.
pub(crate) fn level() -> Level {
    static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = std::env::var("SLIMCANDLE_SIMD").unwrap_or_default();
        if cap == "baseline" {
            return Level::Baseline;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512 =
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl");
            if avx2 && avx512 && cap != "avx2" {
                return Level::Avx512;
            }
            if avx2 {
                return Level::Avx2;
            }
        }
        Level::Baseline
    })
}

/// `simd_dispatch!(vis fn name(args) => body);` defines `name`, which calls the generic
/// `body::<M: Madd>(args)` compiled for the best instruction set available at run time.
macro_rules! simd_dispatch {
    ($vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) => $body:ident) => {
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) {
                    $body::<$crate::kernels::simd::Fused>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    $body::<$crate::kernels::simd::Fused>($($arg),*)
                }
                match $crate::kernels::simd::level() {
                    // SAFETY: `level()` reported these target features as present.
                    $crate::kernels::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::kernels::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::kernels::simd::Level::Baseline => {}
                }
            }
            $body::<$crate::kernels::simd::Separate>($($arg),*)
        }
    };
}

pub(crate) use simd_dispatch;
