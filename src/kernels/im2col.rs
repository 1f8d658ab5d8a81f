//! im2col and its adjoint col2im, for one group of one sample.
//!
//! Why: a k x k convolution becomes one GEMM against a column matrix whose row
//! `(ci * k + ky) * k + kx` holds, for every output position, the input value that tap meets
//! (zero in the padding). The input gradient is the adjoint: a GEMM into a column matrix,
//! then col2im adds every column entry back onto the input position it came from. This
//! replaces Candle's `conv_transpose2d` loop.

use super::conv::ConvGeom;

/// Output positions `o` in `0..out_len` with `0 <= start + o * stride < in_len`, as a range.
pub(crate) fn valid_range(
    out_len: usize,
    in_len: usize,
    stride: usize,
    start: isize,
) -> std::ops::Range<usize> {
    let lo = if start >= 0 {
        0
    } else {
        ((-start) as usize).div_ceil(stride)
    };
    let hi = if start >= in_len as isize {
        0
    } else {
        ((in_len as isize - 1 - start) as usize / stride + 1).min(out_len)
    };
    lo.min(hi)..hi
}

/// Fills `cols` ((`cig` k k) x (ho wo), row-major) from `x`, the `cig` input planes of one
/// group of one sample.
pub(crate) fn im2col(g: &ConvGeom, cig: usize, x: &[f32], cols: &mut [f32]) {
    im2col_strided(g, cig, x, cols, g.ho * g.wo);
}

/// [`im2col`] into rows `row_len` values apart (the sample's ho wo columns of a column
/// matrix shared by several samples, which `cols` starts at).
pub(crate) fn im2col_strided(
    g: &ConvGeom,
    cig: usize,
    x: &[f32],
    cols: &mut [f32],
    row_len: usize,
) {
    let (k, s, p, d) = (g.k, g.stride, g.pad as isize, g.dil);
    let (h, w, ho, wo) = (g.h, g.w, g.ho, g.wo);
    let plane = ho * wo;
    for ci in 0..cig {
        let src = &x[ci * h * w..(ci + 1) * h * w];
        for ky in 0..k {
            let rows = valid_range(ho, h, s, (ky * d) as isize - p);
            for kx in 0..k {
                let row = (ci * k + ky) * k + kx;
                let dst = &mut cols[row * row_len..row * row_len + plane];
                let x0 = (kx * d) as isize - p;
                let cs = valid_range(wo, w, s, x0);
                for oy in 0..ho {
                    let out = &mut dst[oy * wo..(oy + 1) * wo];
                    if !rows.contains(&oy) || cs.is_empty() {
                        out.fill(0.0);
                        continue;
                    }
                    let iy = (oy * s + ky * d) as isize - p;
                    let in_row = &src[iy as usize * w..(iy as usize + 1) * w];
                    out[..cs.start].fill(0.0);
                    out[cs.end..].fill(0.0);
                    let first = (cs.start * s) as isize + x0;
                    let first = first as usize;
                    if s == 1 {
                        out[cs.clone()].copy_from_slice(&in_row[first..first + cs.len()]);
                    } else {
                        for (o, v) in out[cs.clone()]
                            .iter_mut()
                            .zip(in_row[first..].iter().step_by(s))
                        {
                            *o = *v;
                        }
                    }
                }
            }
        }
    }
}

/// Adds every entry of `cols` (laid out as by [`im2col`]) onto the input position it was
/// taken from in `dx`, the `cig` input-gradient planes of one group of one sample.
pub(crate) fn col2im(g: &ConvGeom, cig: usize, cols: &[f32], dx: &mut [f32]) {
    col2im_strided(g, cig, cols, dx, g.ho * g.wo);
}

/// [`col2im`] from rows `row_len` values apart (as [`im2col_strided`] writes them).
pub(crate) fn col2im_strided(
    g: &ConvGeom,
    cig: usize,
    cols: &[f32],
    dx: &mut [f32],
    row_len: usize,
) {
    let (k, s, p, d) = (g.k, g.stride, g.pad as isize, g.dil);
    let (h, w, ho, wo) = (g.h, g.w, g.ho, g.wo);
    for ci in 0..cig {
        let dst = &mut dx[ci * h * w..(ci + 1) * h * w];
        for ky in 0..k {
            let rows = valid_range(ho, h, s, (ky * d) as isize - p);
            for kx in 0..k {
                let row = (ci * k + ky) * k + kx;
                let src = &cols[row * row_len..];
                let x0 = (kx * d) as isize - p;
                let cs = valid_range(wo, w, s, x0);
                if cs.is_empty() {
                    continue;
                }
                let first = ((cs.start * s) as isize + x0) as usize;
                for oy in rows.clone() {
                    let iy = ((oy * s + ky * d) as isize - p) as usize;
                    let out_row = &mut dst[iy * w..(iy + 1) * w];
                    let col = &src[oy * wo + cs.start..oy * wo + cs.end];
                    if s == 1 {
                        for (o, v) in out_row[first..first + cs.len()].iter_mut().zip(col) {
                            *o += *v;
                        }
                    } else {
                        for (o, v) in out_row[first..].iter_mut().step_by(s).zip(col) {
                            *o += *v;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_range_matches_brute_force() {
        for out_len in 0..6 {
            for in_len in 0..7 {
                for stride in 1..4 {
                    for start in -5isize..8 {
                        let want: Vec<usize> = (0..out_len)
                            .filter(|&o| {
                                (0..in_len as isize).contains(&(start + (o * stride) as isize))
                            })
                            .collect();
                        let got: Vec<usize> = valid_range(out_len, in_len, stride, start).collect();
                        assert_eq!(
                            got, want,
                            "out {out_len} in {in_len} s {stride} start {start}"
                        );
                    }
                }
            }
        }
    }
}
