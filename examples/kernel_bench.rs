//! Times `slimcandle::kernels` against the stock Candle compositions they replace, forward
//! alone and forward + backward, on the layer shapes of MobileNet V2/V3 and ShuffleNet.
//!
//! ```sh
//! cargo run --release --example kernel_bench              # ours and stock Candle
//! cargo run --release --example kernel_bench -- --ours    # ours only (stock is slow)
//! cargo run --release --example kernel_bench -- --reps 9 --only depthwise
//! cargo run --release --example kernel_bench -- --reuse-memory   # see kernels::reuse_freed_memory
//! ```
//!
//! Forward + backward feeds a fixed output gradient straight into the layer's output (like
//! PyTorch's `y.backward(dy)`), so it includes Candle's own gradient bookkeeping (a zero tensor
//! plus an add per input; the "autograd floor" rows show its cost alone) but no loss. The last
//! column is the largest difference between ours and stock (output and gradients, relative to
//! the largest value).
//!
//! PyTorch on the same shapes (`python3 torch_bench.py [--reuse-memory]`; median of 5 after a
//! warm-up, 2 threads):
//!
//! ```python
//! import torch, time, sys, ctypes
//! if "--reuse-memory" in sys.argv:
//!     libc = ctypes.CDLL("libc.so.6")
//!     assert libc.mallopt(-3, 1 << 30) == 1 and libc.mallopt(-1, 1 << 30) == 1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
//!     print("allocator: freed memory reused")
//! torch.set_num_threads(2)
//! def bench(f, reps=5):
//!     f(); ts = []
//!     for _ in range(reps):
//!         t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
//!     return sorted(ts)[reps // 2] * 1e3
//! def layer(name, f, inputs):
//!     def fwd():
//!         with torch.no_grad(): f(*inputs)
//!     dy = torch.ones_like(f(*inputs))
//!     def fb():
//!         f(*inputs).backward(dy)
//!     print(f"{name:<36} {bench(fwd):8.1f} {bench(fb):8.1f}")
//! def conv(name, n, cin, cout, hw, k, s, p, g, xgrad=True):
//!     x = torch.randn(n, cin, hw, hw, requires_grad=xgrad)
//!     w = torch.randn(cout, cin // g, k, k, requires_grad=True)
//!     layer(name, lambda x, w: torch.nn.functional.conv2d(x, w, None, s, p, 1, g), (x, w))
//! print(f"{'case':<36} {'fwd':>8} {'f+b':>8}")
//! conv("depthwise 3x3 s1 32x144x56x56", 32, 144, 144, 56, 3, 1, 1, 144)
//! conv("depthwise 3x3 s2 32x144x56x56", 32, 144, 144, 56, 3, 2, 1, 144)
//! conv("depthwise 5x5 s1 32x96x14x14", 32, 96, 96, 14, 5, 1, 2, 96)
//! conv("grouped 1x1 g3 32x240->240 28x28", 32, 240, 240, 28, 1, 1, 0, 3)
//! conv("dense 1x1 64x96->576 14x14", 64, 96, 576, 14, 1, 1, 0, 1)
//! conv("dense 3x3 64x3->32 32x32 (no dx)", 64, 3, 32, 32, 3, 1, 1, 1, xgrad=False)
//! x = torch.randn(64, 96, 32, 32, requires_grad=True)
//! g, b = torch.ones(96, requires_grad=True), torch.zeros(96, requires_grad=True)
//! layer("batch norm train 64x96x32x32", lambda x, g, b: torch.nn.functional.batch_norm(x, None, None, g, b, True, 0.1, 1e-5), (x, g, b))
//! layer("hardswish 64x96x32x32", torch.nn.functional.hardswish, (x,))
//! layer("relu6 64x96x32x32", torch.nn.functional.relu6, (x,))
//! xs = torch.randn(32, 240, 28, 28, requires_grad=True)
//! layer("channel shuffle g3 32x240x28x28", lambda x: torch.nn.functional.channel_shuffle(x, 3), (xs,))
//! ```

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor, Var};
use slimcandle::kernels::{self, reference};
use std::time::Instant;

/// Median wall time of `f` in milliseconds, after one warm-up call.
fn time(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut ts = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        ts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ts.sort_by(f64::total_cmp);
    Ok(ts[ts.len() / 2])
}

type Layer = dyn Fn(&[Tensor]) -> Result<Tensor>;

struct Case {
    name: &'static str,
    /// Shapes of the inputs, and whether each one gets a gradient.
    inputs: Vec<(Vec<usize>, bool)>,
    ours: Box<Layer>,
    stock: Box<Layer>,
}

fn conv_case(
    name: &'static str,
    (n, c_in, c_out, hw): (usize, usize, usize, usize),
    (k, stride, pad, groups): (usize, usize, usize, usize),
    x_grad: bool,
) -> Case {
    Case {
        name,
        inputs: vec![
            (vec![n, c_in, hw, hw], x_grad),
            (vec![c_out, c_in / groups, k, k], true),
        ],
        ours: Box::new(move |t| kernels::conv2d(&t[0], &t[1], stride, pad, 1, groups)),
        stock: Box::new(move |t| reference::conv2d(&t[0], &t[1], stride, pad, 1, groups)),
    }
}

/// Feeds a fixed output gradient into backward, like PyTorch's `y.backward(dy)`: the op's
/// value is a dummy scalar and its backward returns `dy` as is, so that timings do not include
/// a loss and its gradient.
struct SeedGrad(Tensor);

impl CustomOp1 for SeedGrad {
    fn name(&self) -> &'static str {
        "seed-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from_dims(&[])))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

/// One case's inputs, as plain tensors and as tracked ones (variables where a gradient is
/// wanted), and an output gradient.
struct Inputs {
    plain: Vec<Tensor>,
    tracked: Vec<Tensor>,
    vars: Vec<Option<Var>>,
    dy: Tensor,
}

impl Inputs {
    fn new(case: &Case) -> Result<Self> {
        let dev = Device::Cpu;
        let plain: Vec<Tensor> = case
            .inputs
            .iter()
            .map(|(shape, _)| Tensor::randn(0f32, 1f32, shape.as_slice(), &dev))
            .collect::<Result<_>>()?;
        let vars: Vec<Option<Var>> = plain
            .iter()
            .zip(&case.inputs)
            .map(|(t, (_, grad))| grad.then(|| Var::from_tensor(t)).transpose())
            .collect::<Result<_>>()?;
        let tracked = plain
            .iter()
            .zip(&vars)
            .map(|(t, v)| v.as_ref().map_or(t.clone(), |v| v.as_tensor().clone()))
            .collect();
        let dy = (case.ours)(&plain)?.randn_like(0.0, 1.0)?;
        Ok(Inputs {
            plain,
            tracked,
            vars,
            dy,
        })
    }
}

/// (forward ms, forward + backward ms).
fn time_layer(layer: &Layer, inputs: &Inputs, reps: usize) -> Result<(f64, f64)> {
    let fwd = time(reps, || layer(&inputs.plain).map(drop))?;
    let both = time(reps, || {
        let y = layer(&inputs.tracked)?;
        y.apply_op1(SeedGrad(inputs.dy.clone()))?
            .backward()
            .map(drop)
    })?;
    Ok((fwd, both))
}

/// The output and the input gradients, flattened.
fn results(layer: &Layer, inputs: &Inputs) -> Result<Vec<Vec<f32>>> {
    let y = layer(&inputs.tracked)?;
    let grads = y.apply_op1(SeedGrad(inputs.dy.clone()))?.backward()?;
    let mut out = vec![y.flatten_all()?.to_vec1()?];
    for var in inputs.vars.iter().flatten() {
        out.push(grads.get(var).expect("gradient").flatten_all()?.to_vec1()?);
    }
    Ok(out)
}

/// Largest `|a - b| / max |b|` over the output and the gradients.
fn max_rel_err(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            let scale = b.iter().fold(f32::MIN_POSITIVE, |m, v| m.max(v.abs()));
            let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            err / scale
        })
        .fold(0f32, f32::max)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let with_stock = !args.iter().any(|a| a == "--ours");
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(5);
    let stock_reps = reps.min(2);
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    if args.iter().any(|a| a == "--reuse-memory") {
        assert!(kernels::reuse_freed_memory(), "glibc only");
        println!("allocator: freed memory reused (kernels::reuse_freed_memory)");
    }

    let mut cases = vec![
        conv_case(
            "depthwise 3x3 s1 32x144x56x56",
            (32, 144, 144, 56),
            (3, 1, 1, 144),
            true,
        ),
        conv_case(
            "depthwise 3x3 s2 32x144x56x56",
            (32, 144, 144, 56),
            (3, 2, 1, 144),
            true,
        ),
        conv_case(
            "depthwise 5x5 s1 32x96x14x14",
            (32, 96, 96, 14),
            (5, 1, 2, 96),
            true,
        ),
        conv_case(
            "grouped 1x1 g3 32x240->240 28x28",
            (32, 240, 240, 28),
            (1, 1, 0, 3),
            true,
        ),
        conv_case(
            "dense 1x1 64x96->576 14x14",
            (64, 96, 576, 14),
            (1, 1, 0, 1),
            true,
        ),
        conv_case(
            "dense 3x3 64x3->32 32x32 (no dx)",
            (64, 3, 32, 32),
            (3, 1, 1, 1),
            false,
        ),
    ];
    let bn_shape = vec![64, 96, 32, 32];
    cases.push(Case {
        name: "batch norm train 64x96x32x32",
        inputs: vec![(bn_shape.clone(), true), (vec![96], true), (vec![96], true)],
        ours: Box::new(|t| Ok(kernels::batch_norm_train(&t[0], &t[1], &t[2], 1e-5)?.0)),
        stock: Box::new(|t| Ok(reference::batch_norm_train(&t[0], &t[1], &t[2], 1e-5)?.0)),
    });
    cases.push(Case {
        name: "hardswish 64x96x32x32",
        inputs: vec![(bn_shape.clone(), true)],
        ours: Box::new(|t| kernels::hardswish(&t[0])),
        stock: Box::new(|t| reference::hardswish(&t[0])),
    });
    cases.push(Case {
        name: "relu6 64x96x32x32",
        inputs: vec![(bn_shape, true)],
        ours: Box::new(|t| kernels::relu6(&t[0])),
        stock: Box::new(|t| reference::relu6(&t[0])),
    });
    cases.push(Case {
        name: "channel shuffle g3 32x240x28x28",
        inputs: vec![(vec![32, 240, 28, 28], true)],
        ours: Box::new(|t| kernels::channel_shuffle(&t[0], 3)),
        stock: Box::new(|t| reference::channel_shuffle(&t[0], 3)),
    });

    // Not a kernel: what Candle's autograd costs around any op (the output gradient is added
    // to a fresh zero tensor, and so is the input gradient), for reading the rows above.
    for (name, shape) in [
        ("autograd floor: affine 32x144x56x56", vec![32, 144, 56, 56]),
        ("autograd floor: affine 64x96x32x32", vec![64, 96, 32, 32]),
    ] {
        cases.push(Case {
            name,
            inputs: vec![(shape, true)],
            ours: Box::new(|t| t[0].affine(1.0, 0.0)),
            stock: Box::new(|t| t[0].affine(1.0, 0.0)),
        });
    }

    println!(
        "{} threads; median of {reps} (stock: {stock_reps}) after a warm-up; ms",
        rayon::current_num_threads()
    );
    println!(
        "{:<34} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8}",
        "case", "ours fwd", "ours f+b", "stock fwd", "stock f+b", "speedup", "max err"
    );
    for case in &cases {
        if only
            .as_ref()
            .is_some_and(|o| !case.name.contains(o.as_str()))
        {
            continue;
        }
        let inputs = Inputs::new(case)?;
        let (fwd, both) = time_layer(case.ours.as_ref(), &inputs, reps)?;
        if with_stock {
            let (sf, sb) = time_layer(case.stock.as_ref(), &inputs, stock_reps)?;
            let err = max_rel_err(
                &results(case.ours.as_ref(), &inputs)?,
                &results(case.stock.as_ref(), &inputs)?,
            );
            println!(
                "{:<34} {fwd:>8.1} {both:>8.1} {sf:>9.1} {sb:>9.1} {:>7.1}x {err:>8.1e}",
                case.name,
                sb / both
            );
        } else {
            println!("{:<34} {fwd:>8.1} {both:>8.1}", case.name);
        }
    }
    Ok(())
}
