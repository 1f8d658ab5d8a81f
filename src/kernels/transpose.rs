//! Matrix transposition in tiles, for the layout changes of the channels-last executor
//! (NCHW <-> NHWC activations, weights into the products' right-hand matrices).
//!
//! Why: a plain double loop writes (or reads) one value per cache line when the matrix is
//! wider than a few lines; rearranging MobileNet V1's weights that way took 4.5 ms a call,
//! a fifth of a 96x96 batch. Tiles of 16 x 16 keep both sides' lines in L1.

/// Tile side.
const TILE: usize = 16;

/// `dst` (cols x rows, row-major) = transpose of `src` (rows x cols, row-major).
pub(crate) fn transpose(src: &[f32], (rows, cols): (usize, usize), dst: &mut [f32]) {
    assert!(
        src.len() >= rows * cols && dst.len() >= rows * cols,
        "transpose: sizes"
    );
    #[cfg(target_arch = "x86_64")]
    let whole = if super::simd::level() == super::simd::Level::Avx512 {
        // SAFETY: AVX-512F is present and both buffers hold rows x cols values (checked).
        unsafe { x86::whole_tiles(src, (rows, cols), dst) };
        (rows / TILE * TILE, cols / TILE * TILE)
    } else {
        (0, 0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let whole = (0, 0);
    // The tiles left: all of them, or the partial ones at the right and bottom edges.
    for r0 in (0..rows).step_by(TILE) {
        let r1 = (r0 + TILE).min(rows);
        for c0 in (0..cols).step_by(TILE) {
            let c1 = (c0 + TILE).min(cols);
            if r1 <= whole.0 && c1 <= whole.1 {
                continue;
            }
            for r in r0..r1 {
                let line = &src[r * cols..];
                for c in c0..c1 {
                    dst[c * rows + r] = line[c];
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::TILE;
    use std::arch::x86_64::*;

    /// The whole 16 x 16 tiles of the transposition, each in registers ([`tile`]).
    ///
    /// # Safety
    /// AVX-512F; `src` and `dst` hold `rows x cols` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn whole_tiles(src: &[f32], (rows, cols): (usize, usize), dst: &mut [f32]) {
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
        for r0 in (0..rows / TILE * TILE).step_by(TILE) {
            for c0 in (0..cols / TILE * TILE).step_by(TILE) {
                // SAFETY: rows r0..r0+16 and columns c0..c0+16 lie within both matrices.
                unsafe {
                    let from = (sp.add(r0 * cols + c0), cols);
                    tile(from, (16, 16), (dp.add(c0 * rows + r0), rows));
                }
            }
        }
    }

    /// Transposes a tile of up to 16 x 16 in registers: the `valid.0` rows of `valid.1`
    /// values at `src` (row `i` at `src.0 + i src.1`) become `valid.1` rows at `dst` (row `j`
    /// at `dst.0 + j dst.1`) of 16 values each, the values past `valid.0` zero. Sixteen rows
    /// loaded, four rounds of shuffles, the rows stored.
    ///
    /// # Safety
    /// AVX-512F; `valid` at most (16, 16); the source rows readable for `valid.1` values and
    /// the destination rows writable for 16.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) unsafe fn tile(
        (sp, s_stride): (*const f32, usize),
        (rows, lanes): (usize, usize),
        (dp, d_stride): (*mut f32, usize),
    ) {
        let mask = crate::kernels::simd::first_lanes(lanes);
        // SAFETY: the reads and writes stay within the rows the caller vouches for.
        unsafe {
            let r: [__m512; 16] = std::array::from_fn(|i| {
                if i < rows {
                    _mm512_maskz_loadu_ps(mask, sp.add(i * s_stride))
                } else {
                    _mm512_setzero_ps()
                }
            });
            let t: [__m512; 16] = std::array::from_fn(|i| {
                let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
                if i % 2 == 0 {
                    _mm512_unpacklo_ps(a, b)
                } else {
                    _mm512_unpackhi_ps(a, b)
                }
            });
            let u: [__m512; 16] = std::array::from_fn(|i| {
                // Groups of four: (t0, t2) low, (t0, t2) high, (t1, t3) low, high.
                let g = i / 4 * 4;
                let (a, b) = match i % 4 {
                    0 | 1 => (t[g], t[g + 2]),
                    _ => (t[g + 1], t[g + 3]),
                };
                if i % 2 == 0 {
                    _mm512_shuffle_ps::<0x44>(a, b)
                } else {
                    _mm512_shuffle_ps::<0xEE>(a, b)
                }
            });
            let v: [__m512; 16] = std::array::from_fn(|i| {
                let g = i / 8 * 8;
                let (a, b) = (u[g + i % 4], u[g + i % 4 + 4]);
                if i % 8 < 4 {
                    _mm512_shuffle_f32x4::<0x88>(a, b)
                } else {
                    _mm512_shuffle_f32x4::<0xDD>(a, b)
                }
            });
            for i in 0..lanes {
                let (a, b) = (v[i % 8], v[i % 8 + 8]);
                let out = if i < 8 {
                    _mm512_shuffle_f32x4::<0x88>(a, b)
                } else {
                    _mm512_shuffle_f32x4::<0xDD>(a, b)
                };
                _mm512_storeu_ps(dp.add(i * d_stride), out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_any_shape() {
        for (rows, cols) in [
            (1, 1),
            (3, 40),
            (17, 16),
            (33, 5),
            (64, 64),
            (0, 7),
            (16, 16),
            (48, 80),
            (35, 50),
        ] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            transpose(&src, (rows, cols), &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(dst[c * rows + r], src[r * cols + c]);
                }
            }
        }
    }
}
