//! Feature distillation: hint losses between a student's and a teacher's intermediate feature
//! maps, named by graph node (`--feature-kd STUDENT_NODE:TEACHER_NODE[:WEIGHT]`).
//!
//! Two losses, each averaged so that its size does not depend on the batch or map size:
//!
//! - `mse` (FitNets' hint, Romero et al. 2015): `w * mean (s - t)^2` over every value. When
//!   the channel counts differ, the student's map goes through a learned 1x1 conv + batch-norm
//!   adapter first (`adapter.rs`): `w * mean (BN(W s) - t)^2`. The spatial sizes must match.
//! - `at` (attention transfer, Zagoruyko and Komodakis 2017): each map is reduced to its
//!   spatial attention `a = mean_c F_c^2`, normalised to unit L2 norm per sample, and the loss
//!   is `w * mean (q_s - q_t)^2` over samples and positions, as the authors' code computes it.
//!   The channel counts may differ; the spatial sizes must match.
//!
//! The student's gradient of each hint is added to its tap node's gradient in the train-step
//! executor, and flows through the rest of the backward pass from there.

use super::adapter::AdapterSpec;
use crate::graph::{Dims, Graph, NodeId};
use crate::models::edit_distance;
use anyhow::{Context, Result, bail};
use candle_core::{D, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How a student's feature map is compared with the teacher's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum HintLoss {
    /// Mean squared difference of the maps (through a learned adapter when the channel counts
    /// differ).
    #[default]
    Mse,
    /// Attention transfer: normalised spatial attention maps.
    At,
}

impl HintLoss {
    /// The weight of a tap that gives none: 1 for `mse`; 500 for `at` (the authors' code
    /// uses `beta / 2` with `beta = 1000`, attention maps' values being small).
    pub fn default_weight(self) -> f64 {
        match self {
            HintLoss::Mse => 1.0,
            HintLoss::At => 500.0,
        }
    }
}

/// One student node matched with one teacher node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureTap {
    pub student: String,
    pub teacher: String,
    pub weight: f64,
    /// An `mse` tap whose channel counts differ: the learned adapter between them, set by
    /// [`resolve_taps`] (and recorded in `config.json`, so that a resumed run rebuilds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterSpec>,
}

impl FeatureTap {
    /// Parses `STUDENT_NODE:TEACHER_NODE[:WEIGHT]`.
    pub fn parse(text: &str, loss: HintLoss) -> Result<FeatureTap> {
        let usage =
            || format!("--feature-kd `{text}`: expected STUDENT_NODE:TEACHER_NODE[:WEIGHT]");
        let parts: Vec<&str> = text.split(':').collect();
        let (student, teacher, weight) = match parts.as_slice() {
            [s, t] => (*s, *t, loss.default_weight()),
            [s, t, w] => {
                let w: f64 = w.parse().ok().with_context(usage)?;
                (*s, *t, w)
            }
            _ => bail!(usage()),
        };
        if student.is_empty() || teacher.is_empty() {
            bail!(usage());
        }
        if !(weight.is_finite() && weight > 0.0) {
            bail!("--feature-kd `{text}`: the weight must be a positive number");
        }
        Ok(FeatureTap {
            student: student.to_string(),
            teacher: teacher.to_string(),
            weight,
            adapter: None,
        })
    }
}

/// The id of the node called `name`, or an error naming the closest names.
pub fn find_node(graph: &Graph, name: &str, whose: &str) -> Result<NodeId> {
    if let Some(id) = graph.nodes.iter().position(|n| n.name == name) {
        return Ok(id);
    }
    let mut names: Vec<&str> = graph.nodes.iter().map(|n| n.name.as_str()).collect();
    names.sort_by_key(|n| (edit_distance(name, n), *n));
    bail!(
        "--feature-kd: the {whose} has no node `{name}`; nearest: {} (`slimcandle inspect` lists them)",
        names
            .iter()
            .take(3)
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Checks that the maps of `s` (student) and `t` (teacher) can be compared by `loss`, and
/// returns the adapter an `mse` hint needs between different channel counts.
pub fn check_shapes(
    tap: &FeatureTap,
    s: Dims,
    t: Dims,
    loss: HintLoss,
) -> Result<Option<AdapterSpec>> {
    let what = format!("--feature-kd `{}:{}`", tap.student, tap.teacher);
    if (s.h, s.w) != (t.h, t.w) {
        bail!(
            "{what}: the student's map is {}x{} but the teacher's is {}x{}; tap nodes of the same spatial size (for example after a pooling node)",
            s.h,
            s.w,
            t.h,
            t.w
        );
    }
    // Same channels: the plain hint (an adapter would only add a learned map that the
    // student's own layers can already be), as FitNets does when the shapes agree.
    Ok(
        (loss == HintLoss::Mse && s.c != t.c).then_some(AdapterSpec {
            student_channels: s.c,
            teacher_channels: t.c,
        }),
    )
}

/// The student's tap nodes, each checked against the teacher's map size (`teacher_dims`, in
/// the taps' order) at the student's input size `input`; sets each tap's
/// [`FeatureTap::adapter`].
pub fn resolve_taps(
    graph: &Graph,
    input: [usize; 2],
    taps: &mut [FeatureTap],
    loss: HintLoss,
    teacher_dims: &[Dims],
) -> Result<Vec<NodeId>> {
    let dims = graph.infer_shapes(input[0], input[1])?;
    taps.iter_mut()
        .zip(teacher_dims)
        .map(|(tap, &t)| {
            let id = find_node(graph, &tap.student, "student")?;
            tap.adapter = check_shapes(tap, dims[id], t, loss)?;
            Ok(id)
        })
        .collect()
}

/// The graph up to and including `node`, whose output it becomes (same node ids, so dropout
/// masks drawn by node id are the same as in the whole graph).
pub fn truncated(graph: &Graph, node: NodeId) -> Graph {
    Graph {
        nodes: graph.nodes[..=node].to_vec(),
        output: node,
    }
}

/// Per sample, `a = mean_c F_c^2` over the `plane` positions, its L2 norm (at least 1e-12,
/// as PyTorch's `F.normalize`), and `q = a / norm`.
fn attention(f: &[f32], n: usize, c: usize, plane: usize) -> (Vec<f64>, Vec<f64>) {
    let mut q = vec![0f64; n * plane];
    let mut norms = vec![0f64; n];
    for s in 0..n {
        let a = &mut q[s * plane..(s + 1) * plane];
        for ch in 0..c {
            let map = &f[(s * c + ch) * plane..(s * c + ch + 1) * plane];
            for (av, &v) in a.iter_mut().zip(map) {
                *av += (v as f64) * (v as f64) / c as f64;
            }
        }
        let norm = a.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        a.iter_mut().for_each(|v| *v /= norm);
        norms[s] = norm;
    }
    (q, norms)
}

/// `weight * mean (v - t)^2` over maps `v` and `t` of the same shape, with `v` overwritten by
/// its gradient `2 weight (v - t) / len`: the `mse` hint, and the adapter's on its output.
/// One plane per task (maps reach tens of millions of values); the planes' sums are added
/// in order, so the total does not depend on the thread count.
pub fn mse_into_grad(v: &mut [f32], t: &[f32], plane: usize, weight: f64) -> f64 {
    let scale = weight / v.len() as f64;
    let sums: Vec<f64> = v
        .par_chunks_mut(plane.max(1))
        .zip(t.par_chunks(plane.max(1)))
        .map(|(vs, ts)| {
            let mut sum = 0f64;
            for (dv, &tv) in vs.iter_mut().zip(ts) {
                let d = *dv as f64 - tv as f64;
                sum += d * d;
                *dv = (2.0 * scale * d) as f32;
            }
            sum
        })
        .collect();
    scale * sums.iter().sum::<f64>()
}

/// The hint loss of the student's map `s` (N x `cs` x `plane`) against the teacher's `t`
/// (N x `ct` x `plane`), times `weight`, and its gradient with respect to `s`.
#[allow(clippy::too_many_arguments)]
pub fn hint_loss_grad(
    loss: HintLoss,
    s: &[f32],
    t: &[f32],
    n: usize,
    (cs, ct): (usize, usize),
    plane: usize,
    weight: f64,
) -> Result<(f64, Vec<f32>)> {
    if s.len() != n * cs * plane || t.len() != n * ct * plane {
        bail!(
            "feature maps of {} and {} values do not have the shapes given",
            s.len(),
            t.len()
        );
    }
    match loss {
        HintLoss::Mse => {
            if cs != ct {
                bail!(
                    "the plain mse hint needs maps of the same shape ({cs} and {ct} channels; an adapter maps between them)"
                );
            }
            let mut grad = s.to_vec();
            let loss = mse_into_grad(&mut grad, t, plane, weight);
            Ok((loss, grad))
        }
        HintLoss::At => {
            let (qs, norms) = attention(s, n, cs, plane);
            let (qt, _) = attention(t, n, ct, plane);
            let scale = weight / (n * plane) as f64;
            let mut total = 0f64;
            let mut grad = vec![0f32; s.len()];
            for (smp, norm) in norms.iter().enumerate() {
                let range = smp * plane..(smp + 1) * plane;
                let (q, r) = (&qs[range.clone()], &qt[range]);
                // dL/dq, then through the normalisation: dL/da = (g - q (q . g)) / |a|.
                let g: Vec<f64> = q
                    .iter()
                    .zip(r)
                    .map(|(a, b)| {
                        total += (a - b) * (a - b);
                        2.0 * scale * (a - b)
                    })
                    .collect();
                let qg: f64 = q.iter().zip(&g).map(|(a, b)| a * b).sum();
                let da: Vec<f64> = g
                    .iter()
                    .zip(q)
                    .map(|(gv, qv)| (gv - qv * qg) / norm)
                    .collect();
                // a = mean_c F_c^2: dL/dF = dL/da * 2 F / C.
                for ch in 0..cs {
                    let at = (smp * cs + ch) * plane;
                    for (j, d) in da.iter().enumerate() {
                        grad[at + j] = (d * 2.0 * s[at + j] as f64 / cs as f64) as f32;
                    }
                }
            }
            Ok((scale * total, grad))
        }
    }
}

/// [`hint_loss_grad`]'s loss on Candle tensors (N x C x H x W), for the autograd path; no
/// gradient flows into the teacher's map.
pub fn hint_loss(loss: HintLoss, s: &Tensor, t: &Tensor, weight: f64) -> Result<Tensor> {
    let t = t.detach();
    Ok(match loss {
        HintLoss::Mse => ((s - &t)?.sqr()?.mean_all()? * weight)?,
        HintLoss::At => {
            let at = |f: &Tensor| -> Result<Tensor> {
                let a = f.sqr()?.mean(1)?.flatten_from(1)?;
                let norm = a.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
                Ok(a.broadcast_div(&norm)?)
            };
            ((at(s)? - at(&t)?)?.sqr()?.mean_all()? * weight)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    fn random(seed: u64, len: usize) -> Vec<f32> {
        Rng::new(seed).normals(len)
    }

    /// Both losses' gradients against central differences, and the Candle composition's
    /// loss and autograd gradient against the one-pass version.
    #[test]
    fn hint_gradients_match_finite_differences_and_autograd() {
        let (n, plane) = (2, 6);
        for (loss, cs, ct) in [(HintLoss::Mse, 3, 3), (HintLoss::At, 3, 5)] {
            let s = random(1, n * cs * plane);
            let t = random(2, n * ct * plane);
            let (value, grad) = hint_loss_grad(loss, &s, &t, n, (cs, ct), plane, 2.0).unwrap();
            let f = |s: &[f32]| {
                hint_loss_grad(loss, s, &t, n, (cs, ct), plane, 2.0)
                    .unwrap()
                    .0
            };
            let h = 1e-2f32;
            for i in 0..s.len() {
                let (mut up, mut down) = (s.clone(), s.clone());
                up[i] += h;
                down[i] -= h;
                let fd = (f(&up) - f(&down)) / (up[i] - down[i]) as f64;
                assert!(
                    (grad[i] as f64 - fd).abs() < 1e-4 * fd.abs().max(1.0),
                    "{loss:?} {i}: {} vs {fd}",
                    grad[i]
                );
            }
            let dims = |c: usize| (n, c, 2, 3);
            let sv =
                Var::from_tensor(&Tensor::from_vec(s.clone(), dims(cs), &Device::Cpu).unwrap())
                    .unwrap();
            let tt = Tensor::from_vec(t.clone(), dims(ct), &Device::Cpu).unwrap();
            let l = hint_loss(loss, sv.as_tensor(), &tt, 2.0).unwrap();
            let got = l.to_scalar::<f32>().unwrap() as f64;
            assert!(
                (got - value).abs() < 1e-5 * value.max(1e-3),
                "{loss:?}: {got} vs {value}"
            );
            let g: Vec<f32> = l
                .backward()
                .unwrap()
                .get(sv.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in g.iter().zip(&grad) {
                assert!((a - b).abs() < 1e-5, "{loss:?}: autograd {a} vs {b}");
            }
        }
    }

    #[test]
    fn taps_parse_and_bad_ones_are_refused() {
        let t = FeatureTap::parse("features.3:features.6:0.5", HintLoss::Mse).unwrap();
        assert_eq!(
            (t.student.as_str(), t.teacher.as_str(), t.weight),
            ("features.3", "features.6", 0.5)
        );
        assert_eq!(
            FeatureTap::parse("a:b", HintLoss::At).unwrap().weight,
            500.0
        );
        for bad in ["a", "a:b:c:d", ":b", "a:b:x", "a:b:-1"] {
            let e = FeatureTap::parse(bad, HintLoss::Mse)
                .unwrap_err()
                .to_string();
            assert!(e.contains("--feature-kd"), "{bad}: {e}");
        }
    }
}
