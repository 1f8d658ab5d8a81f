"""Top-1 of an exported model in onnxruntime beside slimcandle on the same decoded images.

The test split of an image folder is decoded once (PIL) and normalised with the export's own
preprocessing metadata; onnxruntime runs the ONNX file and `slimcandle forward` the checkpoint
on the same tensors, so JPEG decoders do not enter the comparison.

usage: onnx_top1.py MODEL.onnx CKPT.safetensors TEST_FOLDER SLIMCANDLE_BIN
"""
import json, os, subprocess, sys, tempfile
import numpy as np, onnxruntime as ort
from PIL import Image
from safetensors.numpy import save_file, load_file
model, ckpt, root, binary = sys.argv[1:5]
so = ort.SessionOptions(); so.intra_op_num_threads = 1
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
meta = sess.get_modelmeta().custom_metadata_map
pre = json.loads(meta["preprocessing"]); classes = json.loads(meta["class_names"])
mean = np.array(pre["mean"], np.float32).reshape(1, 3, 1, 1); std = np.array(pre["std"], np.float32).reshape(1, 3, 1, 1)
xs, ys = [], []
for ci, c in enumerate(classes):
    for f in sorted(os.listdir(os.path.join(root, c))):
        xs.append(np.asarray(Image.open(os.path.join(root, c, f)).convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0); ys.append(ci)
x = ((np.stack(xs) - mean) / std).astype(np.float32); y = np.array(ys)
chunks = {f"x{i:05d}": np.ascontiguousarray(x[i:i + 1000]) for i in range(0, len(x), 1000)}
name = sess.get_inputs()[0].name
ort_out = np.concatenate([sess.run(None, {name: v})[0] for _, v in sorted(chunks.items())])
with tempfile.TemporaryDirectory() as d:
    save_file(chunks, f"{d}/in.safetensors")
    subprocess.run([binary, "forward", ckpt, f"{d}/in.safetensors", "-o", f"{d}/out.safetensors"], check=True, capture_output=True)
    o = load_file(f"{d}/out.safetensors"); ours = np.concatenate([o[k] for k in sorted(o)])
diff = np.abs(ours - ort_out)
steps = np.unique(np.round(np.abs(np.diff(np.sort(np.unique(ours)))), 7))
step = steps[steps > 0].min() if (steps > 0).any() else 0
t_ort = 100.0 * (ort_out.argmax(1) == y).mean(); t_ours = 100.0 * (ours.argmax(1) == y).mean()
print(f"{os.path.basename(model)}: {len(x)} images; top-1 onnxruntime {t_ort:.2f}%, slimcandle {t_ours:.2f}% "
      f"(diff {t_ort - t_ours:+.2f}); argmax agree {100.0 * (ort_out.argmax(1) == ours.argmax(1)).mean():.2f}%; "
      f"max |diff| {diff.max():.3g}; output step ~{step:.3g}; values within one step {100.0 * (diff <= step * 1.0001 + 1e-6).mean():.2f}%")
