//! A k x k convolution as an implicit GEMM: the product reads its taps from the padded input
//! itself, with no column matrix.
//!
//! Why: im2col writes (C_in k k) x (H_out W_out) values, nine times the input for a 3x3
//! convolution, that the GEMM then reads back from memory. At batch 1 on 224x224 inputs that
//! was most of SqueezeNet 1.1's time outside its 1x1 convolutions: its 3x3 expands at 55x55
//! (18% of a forward pass, 50 GMAC/s against 118 for its 1x1 classifier) and the 3-channel
//! stride-2 stem (12%, 28 GMAC/s).
//!
//! How: the input is copied once into zero-padded planes of width `wq`; for stride `s` each
//! channel is split into `s x s` phase planes (phase `(py, px)` holds padded pixel
//! `(s i + py, s j + px)` at `(i, j)`), so that a stride-`s` tap becomes a plain shift within
//! one phase plane. Tap `(ci, ky, kx)` of output pixel `(y, x)` then sits at
//! `offset(ci, ky, kx) + y wq + x`: for every tap the output pixels are one contiguous run of
//! the buffer, on a grid `wq` wide. So the convolution is `Y' = W B` where row `p` of `B`
//! starts at `offset(p)` ([`BRows::At`]); `Y'` has `wq - wo` extra columns per output row
//! (reads that run into the next row), dropped when the rows are copied out. The sums are in
//! the taps' order, the same as [`im2col`](super::im2col)'s rows, so the result is bit for
//! bit the im2col path's.

use super::{
    conv::ConvGeom,
    cpu::SharedMut,
    im2col::valid_range,
    sgemm::{self, BRows},
    team,
};
use std::ops::Range;

/// Where one group's implicit GEMM finds its taps: the phase planes' geometry and the rows of `B`.
pub(crate) struct Taps {
    /// The stride: phase planes per channel are `s x s`.
    s: usize,
    /// Zero padding on each side of the input plane.
    pad: usize,
    /// Input channels of the group.
    cig: usize,
    /// Output channels of the group.
    cog: usize,
    /// Input plane rows.
    h: usize,
    /// Input plane columns.
    w: usize,
    /// Output plane rows.
    ho: usize,
    /// Output plane columns.
    wo: usize,
    /// Rows of each phase plane.
    hq: usize,
    /// Width of each phase plane, and of the grid the product is computed on.
    wq: usize,
    /// Values of the phase planes of all the group's channels: `cig s s hq wq`.
    input_len: usize,
    /// Where each row of `B` starts in the phase planes, one per tap, in the weight's
    /// `(ci, ky, kx)` order.
    offsets: Vec<usize>,
}

/// The most the extra columns may add to a product, as `wq / wo` <= `WASTE_NUM / WASTE_DEN`.
/// 3x3 convolutions of 13x13 planes (15 / 13) qualify; 5x5 planes (7 / 5) stay on im2col.
const WASTE_NUM: usize = 5;
const WASTE_DEN: usize = 4;

impl Taps {
    /// The layout for one group of `g`, or `None` where im2col stays the better path: no
    /// AVX-512 kernel, a 1x1 convolution, output rows whose extra columns would cost more than
    /// a quarter of the product, or fewer than a vector of columns.
    pub(crate) fn of(g: &ConvGeom) -> Option<Taps> {
        if !sgemm::available() || g.k == 1 {
            return None;
        }
        let (s, k, d) = (g.stride, g.k, g.dil);
        let shift = (k - 1) * d / s;
        let (hq, wq) = (g.ho + shift, g.wo + shift);
        let layout = Taps {
            s,
            pad: g.pad,
            cig: g.c_in / g.groups,
            cog: g.c_out / g.groups,
            h: g.h,
            w: g.w,
            ho: g.ho,
            wo: g.wo,
            hq,
            wq,
            input_len: (g.c_in / g.groups) * s * s * hq * wq,
            offsets: Vec::new(),
        };
        // Also where the im2col path's product would not be ours (fewer than a vector of
        // output values per plane), so that the two paths give the same bits; and where
        // some phase plane would be filled but never read (the taps' offsets `ky d` meet
        // every residue mod `s` only when `gcd(d, s)` = 1 and `k` >= `s`).
        let gcd = |mut a: usize, mut b: usize| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let phases_unread = s > 1 && (gcd(d, s) > 1 || k < s);
        if wq * WASTE_DEN > g.wo * WASTE_NUM
            || !sgemm::worthwhile(g.ho * g.wo)
            || !sgemm::worthwhile(layout.columns())
            || phases_unread
        {
            return None;
        }
        let plane = hq * wq;
        let mut offsets = Vec::with_capacity(layout.cig * k * k);
        for ci in 0..layout.cig {
            for ky in 0..k {
                let (py, sy) = ((ky * d) % s, ky * d / s);
                for kx in 0..k {
                    let (px, sx) = ((kx * d) % s, kx * d / s);
                    offsets.push(((ci * s + py) * s + px) * plane + sy * wq + sx);
                }
            }
        }
        Some(Taps { offsets, ..layout })
    }

    /// [`Self::fill`] of one channel at stride 2 (the stems): each input row is padded once
    /// into a buffer, whose even and odd values are then phase columns 0 and 1 of the same
    /// phase row, split 16 at a time ([`deinterleave`]). Why: the gather per phase plane,
    /// one value at a time and each input row read twice, was a third of a 224x224 stem's
    /// time (MobileNet V3 small b8: the stem 13.5% of the pass, its fill 4.7%).
    /// `row` (`2 wq` values, zero outside the input row's place) is the padded row, shared
    /// by the channels of one fill.
    fn fill_stride_two(&self, src: &[f32], planes: &mut [f32], row: &mut [f32]) {
        let (hq, wq, h, w, pad) = (self.hq, self.wq, self.h, self.w, self.pad);
        let plane = hq * wq;
        let used = w.min(2 * wq - pad.min(2 * wq));
        for py in 0..2 {
            let rows = valid_range(hq, h, 2, py as isize - pad as isize);
            let (even, odd) = planes[2 * py * plane..(2 * py + 2) * plane].split_at_mut(plane);
            for i in 0..hq {
                let (e, o) = (
                    &mut even[i * wq..(i + 1) * wq],
                    &mut odd[i * wq..(i + 1) * wq],
                );
                if !rows.contains(&i) {
                    e.fill(0.0);
                    o.fill(0.0);
                    continue;
                }
                let r = 2 * i + py - pad;
                row[pad..pad + used].copy_from_slice(&src[r * w..r * w + used]);
                deinterleave(row, e, o);
            }
        }
    }

    /// Columns of the product: every output row `wq` wide but the last, which stops at `wo`
    /// (so no read runs past the phase plane).
    fn columns(&self) -> usize {
        (self.ho - 1) * self.wq + self.wo
    }

    /// Whether the product is the output itself (no extra columns to drop).
    fn in_place(&self) -> bool {
        self.wq == self.wo
    }

    /// Scratch values one group needs: its phase planes and, unless the product is written in
    /// place, the product `wq` wide.
    pub(crate) fn scratch_len(&self) -> usize {
        self.input_len
            + if self.in_place() {
                0
            } else {
                self.cog * self.ho * self.wq
            }
    }

    /// Fills the phase planes of input channels `channels` (into `dst`, which starts at the
    /// first of them) from `x`, the group's input planes: every value written, zero where a
    /// tap meets padding.
    fn fill(&self, x: &[f32], dst: &mut [f32], channels: Range<usize>) {
        let (s, hq, wq) = (self.s, self.hq, self.wq);
        let (h, w) = (self.h, self.w);
        let pad = self.pad as isize;
        // Stride 2: padded columns 0 .. 2 wq, the input row at `pad` and zeros around it
        // (each row overwrites only its own place).
        let mut padded_row = vec![0f32; if s == 2 { 2 * wq } else { 0 }];
        for (ci, planes) in channels.zip(dst.chunks_exact_mut(s * s * hq * wq)) {
            let src = &x[ci * h * w..(ci + 1) * h * w];
            if s == 2 {
                self.fill_stride_two(src, planes, &mut padded_row);
                continue;
            }
            for (phase, plane) in planes.chunks_exact_mut(hq * wq).enumerate() {
                let (py, px) = (phase / s, phase % s);
                let rows = valid_range(hq, h, s, py as isize - pad);
                let cols = valid_range(wq, w, s, px as isize - pad);
                // Source column of phase column `cols.start`.
                let c0 = (s * cols.start + px).wrapping_sub(self.pad);
                for (i, out) in plane.chunks_exact_mut(wq).enumerate() {
                    if !rows.contains(&i) || cols.is_empty() {
                        out.fill(0.0);
                        continue;
                    }
                    let r = s * i + py - self.pad;
                    let row = &src[r * w..(r + 1) * w];
                    out[..cols.start].fill(0.0);
                    out[cols.end..].fill(0.0);
                    let inside = &mut out[cols.clone()];
                    if s == 1 {
                        inside.copy_from_slice(&row[c0..c0 + inside.len()]);
                    } else {
                        for (j, v) in inside.iter_mut().enumerate() {
                            *v = row[c0 + s * j];
                        }
                    }
                }
            }
        }
    }
}

/// `even[j] = row[2 j]`, `odd[j] = row[2 j + 1]` for `j < even.len()` (`row` holds twice
/// that many values): with AVX-512, 16 of each per two loads and two permutes.
fn deinterleave(row: &[f32], even: &mut [f32], odd: &mut [f32]) {
    let n = even.len();
    assert!(
        odd.len() == n && row.len() >= 2 * n,
        "deinterleave: lengths"
    );
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    if sgemm::available() {
        // SAFETY: AVX-512F is present; the loads read row[2 j .. 2 j + 32] and the stores
        // write 16 values from `j`, both within bounds while j + 16 <= n.
        unsafe { j = x86::deinterleave(row, even, odd) };
    }
    for k in j..n {
        even[k] = row[2 * k];
        odd[k] = row[2 * k + 1];
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The vector part of [`super::deinterleave`]: whole runs of 16 outputs; returns how
    /// many outputs it wrote.
    ///
    /// # Safety
    /// AVX-512F; `row` holds `2 even.len()` values, `odd` as many as `even`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn deinterleave(row: &[f32], even: &mut [f32], odd: &mut [f32]) -> usize {
        let n = even.len();
        let mut j = 0;
        unsafe {
            let ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            while j + 16 <= n {
                let a = _mm512_loadu_ps(row.as_ptr().add(2 * j));
                let b = _mm512_loadu_ps(row.as_ptr().add(2 * j + 16));
                _mm512_storeu_ps(even.as_mut_ptr().add(j), _mm512_permutex2var_ps(a, ev, b));
                _mm512_storeu_ps(odd.as_mut_ptr().add(j), _mm512_permutex2var_ps(a, od, b));
                j += 16;
            }
        }
        j
    }
}

/// One sample and group: `block` (the group's `cog` output planes, every value overwritten)
/// = `wg` (its filters, `cig k k` values per output channel) convolved with `xg` (its input
/// planes), using `scratch` ([`Taps::scratch_len`] values, contents arbitrary). Calls
/// `post(first_channel, planes)` on each part of `block` right after it is computed. With
/// `on_team`, the phase planes are filled by input channel and the product split by output
/// channel over the spinning team (the batch-1 path, as in `conv_gemm`); otherwise
/// everything runs on this thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_group(
    l: &Taps,
    xg: &[f32],
    wg: &[f32],
    block: &mut [f32],
    scratch: &mut [f32],
    on_team: bool,
    post: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let (input, wide) = scratch[..l.scratch_len()].split_at_mut(l.input_len);
    let per_channel = l.s * l.s * l.hq * l.wq;
    if on_team {
        let shared = SharedMut::new(input);
        team::run_parts(l.cig, team::size(), &|channels| {
            // SAFETY: tasks take disjoint channel ranges, hence disjoint phase planes.
            let part =
                unsafe { shared.part(channels.start * per_channel, channels.len() * per_channel) };
            l.fill(xg, part, channels);
        });
    } else {
        l.fill(xg, input, 0..l.cig);
    }
    let input = &*input;
    let kdim = l.offsets.len();
    let (plane, wide_plane) = (l.ho * l.wo, l.ho * l.wq);
    let product = |rows: Range<usize>, out: &mut [f32], wide: &mut [f32]| {
        let a = &wg[rows.start * kdim..rows.end * kdim];
        let shape = (rows.len(), l.columns(), kdim);
        let b = BRows::At(&l.offsets);
        if l.in_place() {
            sgemm::sgemm_rows(shape, a, (kdim, 1), input, b, out, plane, false, 1);
        } else {
            sgemm::sgemm_rows(shape, a, (kdim, 1), input, b, wide, wide_plane, false, 1);
            for (dst, src) in out
                .chunks_exact_mut(plane)
                .zip(wide.chunks_exact(wide_plane))
            {
                for (o, w) in dst.chunks_exact_mut(l.wo).zip(src.chunks(l.wq)) {
                    o.copy_from_slice(&w[..l.wo]);
                }
            }
        }
        post(rows.start, out);
    };
    if on_team {
        let (out, wide) = (SharedMut::new(block), SharedMut::new(wide));
        let wide_len = if l.in_place() { 0 } else { wide_plane };
        team::run_parts(l.cog, team::size(), &|rows| {
            // SAFETY: tasks take disjoint output channels, hence disjoint planes of `block`
            // and of the wide product, both of which outlive the job.
            let (o, w) = unsafe {
                (
                    out.part(rows.start * plane, rows.len() * plane),
                    wide.part(rows.start * wide_len, rows.len() * wide_len),
                )
            };
            product(rows, o, w);
        });
    } else {
        product(0..l.cog, block, wide);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::im2col::im2col;
    use crate::rng::Rng;
    use std::sync::Mutex;

    /// The scalar reference: the convolution's definition, in f64, for one group.
    fn reference(g: &ConvGeom, x: &[f32], w: &[f32]) -> Vec<f32> {
        let (cig, cog) = (g.c_in / g.groups, g.c_out / g.groups);
        let mut y = vec![0f32; cog * g.ho * g.wo];
        for co in 0..cog {
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    let mut s = 0f64;
                    for ci in 0..cig {
                        for ky in 0..g.k {
                            for kx in 0..g.k {
                                let iy = (oy * g.stride + ky * g.dil) as isize - g.pad as isize;
                                let ix = (ox * g.stride + kx * g.dil) as isize - g.pad as isize;
                                if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                    continue;
                                }
                                let xv = x[(ci * g.h + iy as usize) * g.w + ix as usize];
                                let wv = w[((co * cig + ci) * g.k + ky) * g.k + kx];
                                s += xv as f64 * wv as f64;
                            }
                        }
                    }
                    y[(co * g.ho + oy) * g.wo + ox] = s as f32;
                }
            }
        }
        y
    }

    /// The im2col path with the same kernel: the implicit GEMM must equal it bit for bit.
    fn via_im2col(g: &ConvGeom, x: &[f32], w: &[f32]) -> Vec<f32> {
        let (cig, cog) = (g.c_in / g.groups, g.c_out / g.groups);
        let (kdim, p) = (cig * g.k * g.k, g.ho * g.wo);
        let mut cols = vec![0f32; kdim * p];
        im2col(g, cig, x, &mut cols);
        let mut y = vec![0f32; cog * p];
        sgemm::sgemm((cog, p, kdim), w, (kdim, 1), &cols, p, &mut y, p, false, 1);
        y
    }

    #[test]
    fn matches_the_reference_and_the_im2col_path() {
        if !sgemm::available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let mut checked = 0;
        // (c_in, c_out, h, w, k, stride, pad, dil): stride 1 and 2 stems and expands, a
        // stride 3, dilation, no padding, wide padding, non-square planes, 13x13 planes.
        let cases = [
            (16, 64, 20, 20, 3, 1, 1, 1),
            (3, 24, 33, 31, 3, 2, 1, 1),
            (3, 13, 40, 40, 3, 2, 0, 1),
            (5, 7, 25, 29, 5, 1, 2, 1),
            (4, 9, 31, 30, 3, 3, 1, 1),
            (6, 14, 26, 26, 3, 1, 2, 2),
            (8, 12, 13, 13, 3, 1, 1, 1),
            (2, 30, 20, 24, 2, 2, 0, 1),
            (7, 5, 19, 22, 4, 2, 3, 1),
            // Padding as wide as the kernel; dilation 3 with stride 2.
            (3, 6, 20, 20, 3, 1, 3, 1),
            (4, 6, 30, 34, 3, 2, 2, 3),
        ];
        for &(c_in, c_out, h, w, k, stride, pad, dil) in &cases {
            let g =
                ConvGeom::new(&[1, c_in, h, w], &[c_out, c_in, k, k], stride, pad, dil, 1).unwrap();
            let taps = Taps::of(&g).unwrap_or_else(|| panic!("{g:?} should run implicitly"));
            let x = Rng::new(1).normals(c_in * h * w);
            let wt = Rng::new(2).normals(c_out * c_in * k * k);
            let want = reference(&g, &x, &wt);
            let im2col_y = via_im2col(&g, &x, &wt);
            for on_team in [false, true] {
                // Arbitrary scratch contents, as with_scratch leaves them.
                let mut scratch = vec![f32::NAN; taps.scratch_len()];
                let mut y = vec![f32::NAN; c_out * g.ho * g.wo];
                let parts = Mutex::new(Vec::new());
                forward_group(
                    &taps,
                    &x,
                    &wt,
                    &mut y,
                    &mut scratch,
                    on_team,
                    &|c0, part| parts.lock().unwrap().push((c0, part.len())),
                );
                for (i, (&ours, &r)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (ours - r).abs() <= 1e-4 * (1.0 + r.abs()),
                        "{g:?}: y[{i}] = {ours}, reference {r}"
                    );
                }
                let same = y
                    .iter()
                    .zip(&im2col_y)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{g:?}: differs from the im2col path");
                // The epilogue saw every output plane exactly once.
                let mut parts = parts.into_inner().unwrap();
                parts.sort();
                let mut next = 0;
                for (c0, len) in parts {
                    assert_eq!(c0, next, "{g:?}: parts");
                    next += len / (g.ho * g.wo);
                }
                assert_eq!(next, c_out, "{g:?}: parts");
                checked += 1;
            }
        }
        assert_eq!(checked, cases.len() * 2);
    }

    #[test]
    fn deinterleave_splits_even_and_odd_values() {
        for n in 0..50 {
            let row: Vec<f32> = (0..2 * n + 3).map(|v| v as f32).collect();
            let (mut even, mut odd) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            deinterleave(&row, &mut even, &mut odd);
            for j in 0..n {
                assert_eq!(
                    (even[j], odd[j]),
                    (row[2 * j], row[2 * j + 1]),
                    "n {n} j {j}"
                );
            }
        }
    }

    #[test]
    fn small_or_wasteful_rows_stay_on_im2col() {
        let geom = |h, k, stride, pad| {
            ConvGeom::new(&[1, 8, h, h], &[8, 8, k, k], stride, pad, 1, 1).unwrap()
        };
        // 1x1: no taps to shift; 5x5 output planes: 7 / 5 of the work.
        assert!(Taps::of(&geom(9, 1, 1, 0)).is_none());
        assert!(Taps::of(&geom(5, 3, 1, 1)).is_none());
        // A 3x5 output (15 values, 17 columns 6 wide): im2col's product would go to the
        // gemm crate, so this one stays there too.
        let g = ConvGeom::new(&[1, 8, 7, 11], &[8, 8, 3, 3], 2, 0, 1, 1).unwrap();
        assert_eq!((g.ho, g.wo), (3, 5));
        assert!(Taps::of(&g).is_none());
        // Stride 2 with dilation 2: only one of the four phase planes would be read.
        let g = ConvGeom::new(&[1, 8, 40, 40], &[8, 8, 3, 3], 2, 2, 2, 1).unwrap();
        assert!(Taps::of(&g).is_none());
        if sgemm::available() {
            assert!(Taps::of(&geom(13, 3, 1, 1)).is_some());
        }
    }
}
