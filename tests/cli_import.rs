//! Dense imports stay plain (issue #14): importing any shared fixture without pruning writes a
//! plain safetensors state dict — the torchvision keys (but the `num_batches_tracked`
//! counters, which PyTorch fills in), every tensor F32 with the fixture's exact values, no
//! sparse entries — that PyTorch loads strictly into the torchvision model when it is here.

mod common;

use common::{FIXTURES, s, slimcandle, stderr};
use std::collections::BTreeMap;
use std::path::Path;

/// The tensors of a safetensors file: name to (dtype, raw little-endian bytes).
fn tensors(path: &Path) -> BTreeMap<String, (safetensors::Dtype, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| (name, (view.dtype(), view.data().to_vec())))
        .collect()
}

fn metadata(path: &Path) -> std::collections::HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

#[test]
fn unpruned_imports_of_every_fixture_are_plain_state_dicts() {
    let Some(fixtures) = common::shared_dir("fixtures") else {
        return;
    };
    let dir = common::temp_dir("cli-import-plain");
    let mut written = Vec::new();
    for name in FIXTURES {
        let source = fixtures.join(format!("{name}.safetensors"));
        let out = dir.join(format!("{name}.ckpt.safetensors"));
        let o = slimcandle(&["import", "--arch", name, s(&source), "-o", s(&out)]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let want: BTreeMap<_, _> = tensors(&source)
            .into_iter()
            .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
            .collect();
        let got = tensors(&out);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{name}: the keys are the state dict's"
        );
        for (key, (dtype, data)) in &got {
            assert_eq!(*dtype, safetensors::Dtype::F32, "{name}: {key}");
            assert!(
                data == &want[key].1,
                "{name}: {key} differs from the fixture"
            );
        }
        let meta = metadata(&out);
        assert_eq!(
            meta.get("format_version").map(String::as_str),
            Some("1"),
            "{name}"
        );
        assert!(!meta.contains_key("sparse"), "{name}");
        written.push((name, out));
    }
    strict_torchvision_load(&written);
    std::fs::remove_dir_all(&dir).ok();
}

/// `load_state_dict(strict=True)` into the torchvision model of each fixture torchvision has,
/// when `python3` with torch and torchvision is here (skipped with a reason otherwise).
fn strict_torchvision_load(files: &[(&str, std::path::PathBuf)]) {
    // torchvision has no MobileNet V1 or ShuffleNet V1.
    let list: Vec<String> = files
        .iter()
        .filter(|(name, _)| !name.starts_with("mobilenet_v1") && !name.starts_with("shufflenet_v1"))
        .map(|(name, path)| format!("({name:?}, {:?})", path.to_str().unwrap()))
        .collect();
    let script = format!(
        r#"
import torchvision
from safetensors.torch import load_file
for name, path in [{}]:
    sd = load_file(path)
    classes = sd["classifier.1.weight" if name.startswith("squeezenet") else
                 "classifier.3.weight" if name.startswith("mobilenet_v3") else
                 "classifier.1.weight" if name.startswith("mobilenet_v2") else "fc.weight"].shape[0]
    model = getattr(torchvision.models, name)(weights=None, num_classes=classes)
    model.load_state_dict(sd, strict=True)
    print("loaded", name)
"#,
        list.join(", ")
    );
    let Ok(o) = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
    else {
        eprintln!("skipping the strict PyTorch load: no python3");
        return;
    };
    let err = String::from_utf8_lossy(&o.stderr);
    if err.contains("ModuleNotFoundError") {
        eprintln!(
            "skipping the strict PyTorch load: python3 lacks torch, torchvision or safetensors"
        );
        return;
    }
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "strict load failed:\n{out}\n{err}");
    assert_eq!(out.lines().count(), list.len(), "{out}");
}
