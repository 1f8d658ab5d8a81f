//! `shapes`: a procedurally generated 10-class image dataset that needs no download.
//!
//! Each image is one shape with random position, scale, rotation (within ±30°, so that no two
//! classes become the same shape rotated), colour and a noisy, shaded background. Image `i` of
//! a split depends only on the seed, the split and `i`, so subsets and sizes never change the
//! content of an image.

use super::Images;
use crate::rng::Rng;

const CLASSES: [&str; 10] = [
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "star",
    "hexagon",
    "crescent",
    "ellipse",
    "semicircle",
];

pub fn class_names() -> Vec<String> {
    CLASSES.iter().map(|s| s.to_string()).collect()
}

/// Whether the point (u, v) in shape coordinates (the shape spans about [-1, 1]) is inside.
fn inside(class: usize, u: f64, v: f64) -> bool {
    let r = (u * u + v * v).sqrt();
    match class {
        0 => r <= 0.9,
        1 => u.abs().max(v.abs()) <= 0.75,
        2 => {
            // Triangle pointing up: below the two slanted edges, above the base.
            v <= 0.7 && v >= -0.9 + 1.85 * u.abs()
        }
        3 => (u.abs() <= 0.28 && v.abs() <= 0.95) || (v.abs() <= 0.28 && u.abs() <= 0.95),
        4 => (0.55..=0.95).contains(&r),
        5 => {
            let theta = v.atan2(u) + std::f64::consts::FRAC_PI_2;
            let spike = (2.5 * theta).cos().abs().powi(3);
            r <= 0.38 + 0.6 * spike
        }
        6 => (u.abs() * 0.866 + v.abs() * 0.5).max(v.abs()) <= 0.82,
        7 => r <= 0.9 && ((u - 0.45).powi(2) + v * v).sqrt() > 0.7,
        8 => (u / 0.95).powi(2) + (v / 0.45).powi(2) <= 1.0,
        _ => r <= 0.95 && v <= 0.1,
    }
}

fn render(rng: &mut Rng, class: usize, size: usize) -> Vec<u8> {
    let s = size as f64;
    let radius = s * (0.28 + 0.16 * rng.uniform());
    let cx = s / 2.0 + (rng.uniform() - 0.5) * (s - 2.0 * radius) * 0.9;
    let cy = s / 2.0 + (rng.uniform() - 0.5) * (s - 2.0 * radius) * 0.9;
    let angle = (rng.uniform() - 0.5) * std::f64::consts::PI / 3.0;
    let (sin, cos) = angle.sin_cos();
    let bg: [f64; 3] = [rng.uniform(), rng.uniform(), rng.uniform()].map(|x| 40.0 + 175.0 * x);
    // A foreground colour far enough from the background to be visible.
    let fg = loop {
        let candidate = [rng.uniform(), rng.uniform(), rng.uniform()].map(|x| 255.0 * x);
        let dist: f64 = candidate
            .iter()
            .zip(&bg)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        if dist > 120.0 {
            break candidate;
        }
    };
    let shade = [(rng.uniform() - 0.5) * 60.0, (rng.uniform() - 0.5) * 60.0];
    let noise = 4.0 + 6.0 * rng.uniform();
    let mut out = vec![0u8; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            // 2x2 supersampling for anti-aliased edges.
            let mut cover = 0.0;
            for (dx, dy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                let (px, py) = ((x as f64 + dx - cx) / radius, (y as f64 + dy - cy) / radius);
                let (u, v) = (cos * px + sin * py, -sin * px + cos * py);
                if inside(class, u, v) {
                    cover += 0.25;
                }
            }
            let gradient = shade[0] * (x as f64 / s - 0.5) + shade[1] * (y as f64 / s - 0.5);
            for c in 0..3 {
                let value =
                    fg[c] * cover + (bg[c] + gradient) * (1.0 - cover) + rng.normal() * noise;
                out[c * size * size + y * size + x] = value.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// `n` images at `size` x `size`, classes in turn; `test` selects an independent stream.
pub fn generate(n: usize, size: usize, seed: u64, test: bool) -> Images {
    use rayon::prelude::*;
    let stream =
        seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ if test { 0xA5A5_0000_0000_0001 } else { 0 };
    let rendered: Vec<(Vec<u8>, u32)> = (0..n)
        .into_par_iter()
        .map(|i| {
            let class = i % CLASSES.len();
            let mut rng = Rng::new(stream ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            (render(&mut rng, class, size), class as u32)
        })
        .collect();
    let mut images = Images::new(size);
    for (img, label) in rendered {
        images.push(&img, label);
    }
    images
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_balanced_and_visible() {
        let a = generate(40, 32, 1, false);
        assert_eq!(a.pixels, generate(40, 32, 1, false).pixels);
        assert_ne!(a.pixels, generate(40, 32, 2, false).pixels);
        assert_ne!(a.pixels, generate(40, 32, 1, true).pixels);
        // A prefix of a larger set is the smaller set.
        assert_eq!(
            generate(20, 32, 1, false).pixels,
            a.pixels[..20 * 3 * 32 * 32]
        );
        assert_eq!(a.labels.iter().filter(|&&l| l == 3).count(), 4);
        // Every image has contrast: the shape is there.
        for i in 0..a.len() {
            let img = a.image(i);
            let (min, max) = img
                .iter()
                .fold((255u8, 0u8), |(lo, hi), &p| (lo.min(p), hi.max(p)));
            assert!(max - min > 60, "image {i} is flat");
        }
    }
}
