//! Batches: seeded order, augmentation and normalisation, prepared on a background thread so
//! that compute does not wait for data.
//!
//! Everything random about batch `b` of epoch `e` comes from `(seed, e, b)` alone, so a run
//! resumed at any batch sees exactly the data an uninterrupted run would have.

use super::Images;
use crate::rng::Rng;
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

/// Training-time augmentation, as torchvision's RandomCrop(padding) + RandomHorizontalFlip.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    /// Zero padding on each side before a random crop back to the original size (0: none).
    pub crop_padding: usize,
    pub hflip: bool,
}

pub struct Batch {
    /// N x 3 x S x S, normalised.
    pub x: Tensor,
    pub labels: Vec<u32>,
    /// Position of this batch in the epoch.
    pub index: usize,
}

impl Batch {
    pub fn label_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::new(self.labels.as_slice(), &Device::Cpu)?)
    }
}

/// How one epoch's batches are drawn.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    pub batch_size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub augment: Option<Augment>,
    /// `Some((seed, epoch))` shuffles; `None` keeps dataset order (evaluation).
    pub shuffle: Option<(u64, usize)>,
    /// First batch to produce (to resume mid-epoch).
    pub start_batch: usize,
}

impl EpochPlan {
    /// Batches in dataset order, normalised, without augmentation: what evaluation and
    /// calibration read.
    pub fn in_order(batch_size: usize, mean: [f32; 3], std: [f32; 3]) -> EpochPlan {
        EpochPlan {
            batch_size,
            mean,
            std,
            augment: None,
            shuffle: None,
            start_batch: 0,
        }
    }
}

pub struct BatchLoader {
    rx: Receiver<Result<Batch>>,
    worker: Option<JoinHandle<()>>,
    pub num_batches: usize,
}

fn mix(seed: u64, a: u64, b: u64) -> u64 {
    Rng::new(seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
        .next_u64()
}

/// Copies image `i` into `out` (CHW floats), cropping, flipping and normalising.
fn fill_image(
    images: &Images,
    i: usize,
    rng: Option<&mut Rng>,
    aug: Option<Augment>,
    plan: &EpochPlan,
    out: &mut [f32],
) {
    let s = images.size;
    let img = images.image(i);
    let (mut dy, mut dx, mut flip) = (0isize, 0isize, false);
    if let (Some(rng), Some(aug)) = (rng, aug) {
        let p = aug.crop_padding;
        if p > 0 {
            dy = rng.below(2 * p + 1) as isize - p as isize;
            dx = rng.below(2 * p + 1) as isize - p as isize;
        }
        flip = aug.hflip && rng.uniform() < 0.5;
    }
    for c in 0..3 {
        let (m, sd) = (plan.mean[c], plan.std[c]);
        let zero = (0.0 - m) / sd;
        for y in 0..s {
            let sy = y as isize + dy;
            for x in 0..s {
                let xx = if flip { s - 1 - x } else { x };
                let sx = xx as isize + dx;
                out[c * s * s + y * s + x] =
                    if sy < 0 || sx < 0 || sy >= s as isize || sx >= s as isize {
                        zero
                    } else {
                        (img[c * s * s + sy as usize * s + sx as usize] as f32 / 255.0 - m) / sd
                    };
            }
        }
    }
}

impl BatchLoader {
    pub fn new(images: Arc<Images>, plan: EpochPlan) -> BatchLoader {
        let n = images.len();
        let num_batches = n.div_ceil(plan.batch_size.max(1));
        let (tx, rx) = sync_channel(2);
        let worker = std::thread::spawn(move || {
            let mut order: Vec<usize> = (0..n).collect();
            if let Some((seed, epoch)) = plan.shuffle {
                Rng::new(mix(seed, epoch as u64, u64::MAX)).shuffle(&mut order);
            }
            let per_image = images.image_bytes();
            for b in plan.start_batch..num_batches {
                let idx = &order[b * plan.batch_size..((b + 1) * plan.batch_size).min(n)];
                let mut data = vec![0f32; idx.len() * per_image];
                let mut rng = plan
                    .shuffle
                    .map(|(seed, epoch)| Rng::new(mix(seed, epoch as u64, b as u64)));
                for (k, &i) in idx.iter().enumerate() {
                    fill_image(
                        &images,
                        i,
                        rng.as_mut(),
                        plan.augment,
                        &plan,
                        &mut data[k * per_image..(k + 1) * per_image],
                    );
                }
                let s = images.size;
                let batch = Tensor::from_vec(data, (idx.len(), 3, s, s), &Device::Cpu)
                    .map_err(anyhow::Error::from)
                    .map(|x| Batch {
                        x,
                        labels: idx.iter().map(|&i| images.labels[i]).collect(),
                        index: b,
                    });
                if tx.send(batch).is_err() {
                    return; // The consumer stopped early.
                }
            }
        });
        BatchLoader {
            rx,
            worker: Some(worker),
            num_batches,
        }
    }
}

impl Iterator for BatchLoader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        match self.rx.recv() {
            Ok(b) => Some(b),
            Err(_) => {
                if let Some(w) = self.worker.take() {
                    let _ = w.join();
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images() -> Arc<Images> {
        let mut imgs = Images::new(4);
        for i in 0..10u8 {
            imgs.push(&[i * 20; 48], u32::from(i % 3));
        }
        Arc::new(imgs)
    }

    fn plan(shuffle: Option<(u64, usize)>, start: usize) -> EpochPlan {
        EpochPlan {
            batch_size: 4,
            mean: [0.5; 3],
            std: [0.25; 3],
            augment: Some(Augment {
                crop_padding: 1,
                hflip: true,
            }),
            shuffle,
            start_batch: start,
        }
    }

    #[test]
    fn batches_cover_the_data_and_resume_exactly() {
        let full: Vec<Batch> = BatchLoader::new(images(), plan(Some((7, 2)), 0))
            .map(|b| b.unwrap())
            .collect();
        assert_eq!(
            full.iter().map(|b| b.labels.len()).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        let resumed: Vec<Batch> = BatchLoader::new(images(), plan(Some((7, 2)), 1))
            .map(|b| b.unwrap())
            .collect();
        assert_eq!(resumed.len(), 2);
        for (a, b) in full[1..].iter().zip(&resumed) {
            assert_eq!(a.labels, b.labels);
            let d = (&a.x - &b.x)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0);
        }
        let other_epoch: Vec<u32> = BatchLoader::new(images(), plan(Some((7, 3)), 0))
            .flat_map(|b| b.unwrap().labels)
            .collect();
        assert_ne!(
            other_epoch,
            full.iter()
                .flat_map(|b| b.labels.clone())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn evaluation_order_is_dataset_order_and_normalised() {
        let mut p = plan(None, 0);
        p.augment = None;
        let b = BatchLoader::new(images(), p).next().unwrap().unwrap();
        assert_eq!(b.labels, vec![0, 1, 2, 0]);
        let v: Vec<f32> = b.x.flatten_all().unwrap().to_vec1().unwrap();
        assert!((v[0] - (0.0 - 0.5) / 0.25).abs() < 1e-6);
        assert!((v[48] - (20.0 / 255.0 - 0.5) / 0.25).abs() < 1e-6);
    }
}
