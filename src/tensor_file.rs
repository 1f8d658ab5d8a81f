//! Reading and writing safetensors files with errors that say what is wrong with the file.
//! We use the `safetensors` crate directly: Candle cannot write a `__metadata__` header, nor
//! read integer types such as I8 that quantized checkpoints need.

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensorError, SafeTensors, tensor::TensorView};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A whole safetensors file, validated, held in memory.
pub struct TensorFile {
    pub path: PathBuf,
    bytes: Vec<u8>,
    header_len: usize,
    pub metadata: HashMap<String, String>,
}

/// Explains a safetensors parse failure in terms of the file, with `len` its size in bytes.
fn explain(err: SafeTensorError, bytes: &[u8]) -> String {
    let len = bytes.len();
    if len < 8 {
        return format!("not a safetensors file (only {len} bytes)");
    }
    let header = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    if let Some(why) = bad_tensor_entry(bytes, header) {
        return why;
    }
    match err {
        SafeTensorError::MetadataIncompleteBuffer | SafeTensorError::InvalidOffset(_) => {
            format!(
                "the file is truncated or corrupt: its tensor table does not match its {len} bytes"
            )
        }
        _ if header > MAX_HEADER_BYTES => "not a safetensors file (no valid header)".to_string(),
        _ if header + 8 > len => format!(
            "the file is truncated: its header alone needs {} bytes, the file has {len}",
            header + 8
        ),
        other => format!("not a valid safetensors file: {other}"),
    }
}

/// Largest JSON header (tensor table plus `__metadata__`) a file may have. A checkpoint of a
/// few hundred tensors has a header of tens of kilobytes; the bound keeps a corrupt length
/// field from making the parser hold and scan a huge string.
pub const MAX_HEADER_BYTES: usize = 16 << 20;

/// The first tensor-table entry whose shape and dtype disagree with its byte range, said in
/// words that name it (the safetensors crate only says that some entry is wrong).
fn bad_tensor_entry(bytes: &[u8], header: usize) -> Option<String> {
    let text = bytes.get(8..8usize.checked_add(header)?)?;
    let table: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(text).ok()?;
    for (name, entry) in &table {
        if name == "__metadata__" {
            continue;
        }
        let bytes_per = match entry.get("dtype")?.as_str()? {
            "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
            "U16" | "I16" | "F16" | "BF16" => 2,
            "U32" | "I32" | "F32" => 4,
            "U64" | "I64" | "F64" => 8,
            _ => continue,
        };
        let shape: Vec<u64> = entry
            .get("shape")?
            .as_array()?
            .iter()
            .map(|d| d.as_u64())
            .collect::<Option<_>>()?;
        let offsets = entry.get("data_offsets")?.as_array()?;
        let (start, end) = (offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?);
        let needed = shape
            .iter()
            .try_fold(bytes_per, |a: u64, &d| a.checked_mul(d));
        if needed != Some(end.saturating_sub(start)) {
            let needed = needed.map_or("more than 2^64".to_string(), |n| n.to_string());
            return Some(format!(
                "tensor `{name}` claims shape {shape:?}, {needed} bytes, but its table entry gives it {} bytes of the file's {}",
                end.saturating_sub(start),
                bytes.len()
            ));
        }
    }
    None
}

impl TensorFile {
    pub fn read(path: &Path) -> Result<TensorFile> {
        // A device or FIFO (`/dev/zero`) would be read without end.
        if path.exists() && !path.is_file() {
            bail!("`{}` is not a regular file", path.display());
        }
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?;
        Self::from_bytes(path, bytes)
    }

    /// Validates `bytes` as the contents of `path` (which is only used in messages): the
    /// fuzz harness and tests read files from memory through this.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<TensorFile> {
        if bytes.len() >= 8 {
            let header = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
            if header > MAX_HEADER_BYTES as u64 && header + 8 <= bytes.len() as u64 {
                bail!(
                    "`{}`: its header is {header} bytes, more than the {MAX_HEADER_BYTES} a tensor file may have",
                    path.display()
                );
            }
        }
        let header_len = match SafeTensors::read_metadata(&bytes)
            .and_then(|_| SafeTensors::deserialize(&bytes))
        {
            Ok(_) => u64::from_le_bytes(bytes[..8].try_into().expect("validated")) as usize,
            Err(e) => bail!("`{}`: {}", path.display(), explain(e, &bytes)),
        };
        let (_, meta) = SafeTensors::read_metadata(&bytes).expect("validated above");
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(TensorFile {
            path: path.to_path_buf(),
            bytes,
            header_len,
            metadata,
        })
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated when read")
    }

    /// Tensor names in file order.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<(usize, String)> = self
            .view()
            .iter()
            .map(|(n, t)| (t.data().as_ptr() as usize, n.to_string()))
            .collect();
        v.sort();
        v.into_iter().map(|(_, n)| n).collect()
    }

    pub fn file_size(&self) -> usize {
        self.bytes.len()
    }

    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// How many tensors of each dtype the file holds, e.g. `{"F32": 314}`.
    pub fn dtype_counts(&self) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for (_, t) in self.view().iter() {
            *counts.entry(format!("{:?}", t.dtype())).or_insert(0) += 1;
        }
        counts
    }

    /// Raw view of one tensor (any dtype).
    pub fn raw(&self, name: &str) -> Result<TensorView<'_>> {
        self.view()
            .tensor(name)
            .map_err(|_| anyhow::anyhow!("`{}` has no tensor named `{name}`", self.path.display()))
    }

    /// One floating-point tensor as F32 on the CPU.
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let view = self.raw(name)?;
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F64 => DType::F64,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => bail!(
                "`{}`: tensor `{name}` has dtype {other:?}, expected a floating-point type",
                self.path.display()
            ),
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?;
        Ok(t.to_dtype(DType::F32)?)
    }

    /// Every floating-point tensor by name, skipping integer bookkeeping such as
    /// `num_batches_tracked`.
    pub fn float_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let view = self.view();
        let mut out = HashMap::new();
        for (name, t) in view.iter() {
            if matches!(
                t.dtype(),
                Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16
            ) {
                out.insert(name.to_string(), self.tensor_f32(name)?);
            }
        }
        Ok(out)
    }
}

/// A tensor ready to be written: dtype, shape and little-endian bytes.
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn from_f32(t: &Tensor) -> Result<RawTensor> {
        let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(RawTensor {
            dtype: Dtype::F32,
            shape: t.dims().to_vec(),
            data,
        })
    }
}

/// Serialises `tensors` with `metadata` and writes the file atomically: a temporary file in the
/// same folder, synced, then renamed over `path`, so a crash never leaves a half-written file.
pub fn write_atomic(
    path: &Path,
    tensors: Vec<(String, RawTensor)>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data)?,
            ))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, Some(metadata))?;
    write_bytes_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail!(
            "cannot write `{}`: folder `{}` does not exist",
            path.display(),
            dir.display()
        );
    }
    let file_name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique per process and per call, so that two threads writing the same path never
    // share (and truncate) one temporary file.
    static NEXT_TMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT_TMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{file_name}.tmp{}-{n}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself reaches the disk only with the folder's entry.
        std::fs::File::open(&dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        bail!("cannot write `{}`: {e}", path.display());
    }
    Ok(())
}

/// SHA-256 of a file's bytes, as lowercase hex: the identity of a checkpoint in run records
/// (a teacher in `config.json`) and in the recipe runner's stage hashes.
pub fn file_sha256(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("cannot read `{}` to hash it", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read `{}` to hash it", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
