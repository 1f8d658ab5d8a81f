use anyhow::{Context, Result, bail};
use clap::Args;
use slimcandle::checkpoint;
use slimcandle::exec::check_input;
use slimcandle::tensor_file::{RawTensor, TensorFile, write_atomic};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Args)]
pub struct ForwardArgs {
    /// Checkpoint to run.
    checkpoint: PathBuf,
    /// safetensors file whose 4-D float tensors (N x C x H x W) are the inputs.
    input: PathBuf,
    /// Where to write the outputs, under the input tensors' names.
    #[arg(short, long)]
    output: PathBuf,
    /// Print JSON instead of text: the output file and each tensor's input and output shape.
    #[arg(long)]
    json: bool,
}

/// A model's eval-mode forward pass on one batch.
type Forward<'a> = Box<dyn Fn(&candle_core::Tensor) -> Result<candle_core::Tensor> + 'a>;

pub fn run(args: ForwardArgs) -> Result<()> {
    super::check_output_is_not_input(&args.output, &[&args.checkpoint, &args.input])?;
    super::output::check(&args.output, "-o", super::output::Kind::File)?;
    // A float model runs folded; an int8 one through the int8 forward pass.
    let model = match checkpoint::load_any(&args.checkpoint)? {
        checkpoint::AnyModel::Float(m) => {
            checkpoint::AnyModel::Float(slimcandle::passes::fold_batch_norm(&m)?)
        }
        int8 => int8,
    };
    let graph = model.graph();
    // The int8 engine is planned (weights packed) once for all the file's tensors.
    let run: Forward<'_> = match &model {
        checkpoint::AnyModel::Float(m) => {
            let engine = m.engine();
            Box::new(move |x| engine.forward(x))
        }
        checkpoint::AnyModel::Int8(q) => {
            let engine = slimcandle::int8::Engine::new(q)?;
            Box::new(move |x| engine.forward_tensor(x))
        }
    };
    let inputs = TensorFile::read(&args.input)?;
    let mut outputs = Vec::new();
    let mut shapes = Vec::new();
    let names = inputs.names();
    let bar = super::progress::bar(names.len(), "running", "tensors");
    for name in names {
        bar.inc(1);
        let view = inputs.raw(&name)?;
        let is_float = matches!(
            view.dtype(),
            safetensors::Dtype::F32
                | safetensors::Dtype::F64
                | safetensors::Dtype::F16
                | safetensors::Dtype::BF16
        );
        if view.shape().len() != 4 || !is_float {
            eprintln!(
                "skipping `{name}`: {:?} {:?} is not a 4-D float tensor",
                view.dtype(),
                view.shape()
            );
            continue;
        }
        let x = inputs.tensor_f32(&name)?;
        check_input(graph, x.dims())
            .with_context(|| format!("`{}`: tensor `{name}`", args.input.display()))?;
        let y = run(&x)?;
        bar.suspend(|| eprintln!("{name}: {:?} -> {:?}", x.dims(), y.dims()));
        shapes.push(serde_json::json!({
            "name": name,
            "input_shape": x.dims(),
            "output_shape": y.dims(),
        }));
        outputs.push((name, RawTensor::from_f32(&y)?));
    }
    bar.finish_and_clear();
    if outputs.is_empty() {
        bail!(
            "`{}` holds no 4-D float tensor to run",
            args.input.display()
        );
    }
    let count = outputs.len();
    let mut metadata = HashMap::new();
    metadata.insert(
        "checkpoint".to_string(),
        args.checkpoint.display().to_string(),
    );
    super::output::create_parent(&args.output)?;
    write_atomic(&args.output, outputs, metadata)?;
    if args.json {
        super::print_json(&serde_json::json!({ "output": args.output, "tensors": shapes }));
    } else {
        println!(
            "wrote {count} output tensor(s) to {}",
            args.output.display()
        );
    }
    Ok(())
}
