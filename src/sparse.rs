//! Sparse storage of float tensors in checkpoints (see `docs/checkpoint-format.md`).
//!
//! Magnitude pruning leaves most weights exactly zero but keeps the dense shapes, so a dense
//! file does not shrink. A tensor whose elements are mostly `+0.0` is instead written as a
//! bitmask saying which elements are stored plus the stored values in row-major order. Only
//! the bit pattern of `+0.0` is left out: `-0.0`, NaNs (with their payloads), infinities and
//! subnormals are stored like any other value, so decoding gives back the exact bits.
//!
//! The encoding is lossless and simple to read from any language; it is not an entropy
//! coder. At 80 % zeros a tensor takes 1/8 byte per element for the mask plus 4 bytes per
//! survivor: about 23 % of its dense size.

use crate::tensor_file::{RawTensor, TensorFile};
use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Suffix of the bitmask tensor of sparse tensor `NAME`: `NAME.__sparse_mask`.
pub const MASK_SUFFIX: &str = ".__sparse_mask";
/// Suffix of the stored values of sparse tensor `NAME`: `NAME.__sparse_values`.
pub const VALUES_SUFFIX: &str = ".__sparse_values";
/// `__metadata__` key of the JSON object mapping each sparse tensor's name to its dense shape.
pub const METADATA_KEY: &str = "sparse";
/// Bytes the sparse form must save over the dense data before it is used: it adds two header
/// entries (mask and values) and a `sparse` metadata entry, about 100 bytes plus twice the
/// name, so below this saving the file would not shrink.
pub const MIN_SAVING: usize = 256;

/// Whether an element is stored: every bit pattern but `+0.0`'s.
pub fn is_stored(v: f32) -> bool {
    v.to_bits() != 0
}

/// How many elements of `t` are not `+0.0` (`-0.0` and NaN count as non-zero): the
/// "non-zero params" of a pruned model. Non-f32 tensors are compared after conversion to f32,
/// except f64, which is compared as f64.
pub fn count_nonzero(t: &Tensor) -> Result<usize> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F64 => flat
            .to_vec1::<f64>()?
            .iter()
            .filter(|v| v.to_bits() != 0)
            .count(),
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .filter(|v| is_stored(**v))
            .count(),
        _ => flat
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .filter(|v| is_stored(**v))
            .count(),
    })
}

/// Bytes of the mask for `n` elements: one bit each, rounded up to whole bytes.
pub fn mask_len(n: usize) -> usize {
    n.div_ceil(8)
}

/// Whether `n` elements of which `stored` are not `+0.0` are written sparse: when mask plus
/// values are smaller than the dense data by at least [`MIN_SAVING`] bytes.
pub fn worth_it(n: usize, stored: usize) -> bool {
    mask_len(n) + 4 * stored + MIN_SAVING <= 4 * n
}

/// Splits row-major `values` into the mask (bit `i % 8` of byte `i / 8` set, LSB first, when
/// element `i` is stored) and the stored values in order. Padding bits of the last byte are 0.
pub fn encode(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut mask = vec![0u8; mask_len(values.len())];
    let mut stored = Vec::new();
    for (i, &v) in values.iter().enumerate() {
        if is_stored(v) {
            mask[i / 8] |= 1 << (i % 8);
            stored.push(v);
        }
    }
    (mask, stored)
}

/// Rebuilds `n` row-major elements from a mask and the stored values, checking that they fit
/// together. The error says what is wrong, for the caller to prefix with file and tensor.
pub fn decode(mask: &[u8], stored: &[f32], n: usize) -> Result<Vec<f32>> {
    if mask.len() != mask_len(n) {
        bail!(
            "the mask has {} bytes; {n} elements need {}",
            mask.len(),
            mask_len(n)
        );
    }
    if !n.is_multiple_of(8) && mask[n / 8] >> (n % 8) != 0 {
        bail!("the mask sets padding bits beyond the tensor's {n} elements");
    }
    let set: usize = mask.iter().map(|b| b.count_ones() as usize).sum();
    if set != stored.len() {
        bail!(
            "the mask marks {set} stored elements but there are {} values",
            stored.len()
        );
    }
    let mut out = vec![0f32; n];
    let mut next = stored.iter();
    for (i, slot) in out.iter_mut().enumerate() {
        if (mask[i / 8] >> (i % 8)) & 1 == 1 {
            *slot = *next.next().expect("counted above");
        }
    }
    Ok(out)
}

/// Suffix of the 4-bit gaps of gap-coded int8 tensor `NAME`: `NAME.__sparse_gaps`.
pub const GAPS_SUFFIX: &str = ".__sparse_gaps";
/// The largest gap one 4-bit entry holds.
pub const MAX_GAP: u8 = 15;

/// Relative-index (gap) coding of int8 codes, as Deep Compression stores pruned weights: each
/// stored code records in 4 bits how many zero codes precede it since the previous stored one.
/// A run of more than 15 zeros is split by fillers, stored zero codes with gap 15, and the
/// zeros after the last non-zero code are covered the same way, the last filler's gap sized to
/// end exactly at the tensor's end; so the entries cover every element and each covers at
/// most 16, which bounds the elements a file can describe (see `checkpoint::check_params_fit`).
/// Gap `i` is the low nibble of byte `i / 2` for even `i` and the high nibble for odd `i`; with
/// an odd entry count the last high nibble is padding, 0. The encoding of a tensor is unique.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapCoded {
    /// The nibbles, packed two per byte: `ceil(values.len() / 2)` bytes.
    pub gaps: Vec<u8>,
    /// One code per entry: the non-zero codes in row-major order, with the fillers' zeros.
    pub values: Vec<i8>,
}

/// Bytes of the gaps for `entries` entries: two per byte, rounded up.
pub fn gaps_len(entries: usize) -> usize {
    entries.div_ceil(2)
}

/// How many entries (stored codes plus fillers) the gap coding of `codes` has, without
/// building it: what a writer compares with the bitmask's size.
pub fn gap_entries(codes: &[i8]) -> usize {
    let (mut entries, mut run) = (0usize, 0usize);
    for &c in codes {
        if c == 0 {
            run += 1;
        } else {
            entries += run / 16 + 1;
            run = 0;
        }
    }
    entries + run.div_ceil(16)
}

/// Bytes the gap coding of `codes` takes: one per entry plus the packed gaps.
pub fn gap_coded_len(codes: &[i8]) -> usize {
    let e = gap_entries(codes);
    e + gaps_len(e)
}

/// Gap-codes row-major `codes` ([`GapCoded`] gives the layout).
pub fn encode_gaps(codes: &[i8]) -> GapCoded {
    let mut nibbles: Vec<u8> = Vec::new();
    let mut values: Vec<i8> = Vec::new();
    let mut run = 0usize;
    for &c in codes {
        if c == 0 {
            run += 1;
            continue;
        }
        while run > MAX_GAP as usize {
            nibbles.push(MAX_GAP);
            values.push(0);
            run -= 16;
        }
        nibbles.push(run as u8);
        values.push(c);
        run = 0;
    }
    // Trailing zeros: fillers of 16, then one covering the rest (1 to 16 zeros).
    while run > 0 {
        let covered = run.min(16);
        nibbles.push((covered - 1) as u8);
        values.push(0);
        run -= covered;
    }
    let mut gaps = vec![0u8; gaps_len(nibbles.len())];
    for (i, g) in nibbles.iter().enumerate() {
        gaps[i / 2] |= g << (4 * (i % 2));
    }
    GapCoded { gaps, values }
}

/// Rebuilds `n` row-major codes from gap-coded entries, refusing anything [`encode_gaps`]
/// would not have written. The error says what is wrong, for the caller to prefix with file
/// and tensor.
pub fn decode_gaps(gaps: &[u8], values: &[i8], n: usize) -> Result<Vec<i8>> {
    let k = values.len();
    if gaps.len() != gaps_len(k) {
        bail!(
            "the gaps have {} bytes; {k} values need {}",
            gaps.len(),
            gaps_len(k)
        );
    }
    if k % 2 == 1 && gaps[k / 2] >> 4 != 0 {
        bail!("the padding nibble after the last of {k} gaps is not 0");
    }
    // Each entry covers at least one element: more entries than elements cannot fit.
    if k > n {
        bail!("{k} entries cannot fit in the tensor's {n} elements");
    }
    let mut out = vec![0i8; n];
    let mut pos = 0usize;
    for (i, &v) in values.iter().enumerate() {
        let gap = (gaps[i / 2] >> (4 * (i % 2))) & 0x0f;
        if v == 0 && gap != MAX_GAP && i + 1 != k {
            bail!(
                "entry {i} is a filler (code 0) with gap {gap}; a filler before the last entry has gap {MAX_GAP}"
            );
        }
        pos += gap as usize;
        if pos >= n {
            bail!("entry {i} (gap {gap}) lands on element {pos}, past the tensor's {n} elements");
        }
        out[pos] = v;
        pos += 1;
    }
    if pos != n {
        bail!("the {k} entries cover {pos} of the tensor's {n} elements");
    }
    Ok(out)
}

/// What a checkpoint writer stores for a set of tensors.
pub struct Encoded {
    /// Each tensor either dense or, where [`worth_it`], as its mask and values.
    pub tensors: Vec<(String, RawTensor)>,
    /// The `sparse` metadata value; `None` when every tensor is dense.
    pub metadata: Option<String>,
}

/// The share of the file's dense float bytes that sparse storage must save before a file uses
/// it at all. Below it the file stays a plain safetensors state dict that any loader reads
/// (an unpruned import whose few biases happen to be zero); a pruned model saves far more.
pub const MIN_FILE_SAVING: f64 = 0.01;

/// Whether a file of `dense_bytes` of float data that sparse storage would shrink by `saving`
/// bytes is written in the sparse format.
pub fn file_worth_it(dense_bytes: usize, saving: usize) -> bool {
    saving >= MIN_SAVING && saving as f64 >= MIN_FILE_SAVING * dense_bytes as f64
}

/// Encodes `tensors` (as f32) for writing, choosing dense or sparse storage for each: sparse
/// where it pays for the tensor ([`worth_it`]), and only when it pays for the file
/// ([`file_worth_it`]); otherwise every tensor is dense.
pub fn encode_tensors(tensors: Vec<(String, Tensor)>) -> Result<Encoded> {
    let mut flat = Vec::with_capacity(tensors.len());
    let (mut dense_bytes, mut saving) = (0usize, 0usize);
    for (name, t) in tensors {
        if name.ends_with(MASK_SUFFIX) || name.ends_with(VALUES_SUFFIX) {
            bail!(
                "cannot save tensor `{name}`: names ending in `{MASK_SUFFIX}` or `{VALUES_SUFFIX}` are reserved for sparse storage"
            );
        }
        let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let stored = values.iter().filter(|v| is_stored(**v)).count();
        dense_bytes += 4 * values.len();
        if worth_it(values.len(), stored) {
            saving += 4 * values.len() - mask_len(values.len()) - 4 * stored;
        }
        flat.push((name, t, values, stored));
    }
    let file_sparse = file_worth_it(dense_bytes, saving);
    let mut out = Vec::with_capacity(flat.len());
    let mut shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (name, t, values, stored) in flat {
        if !(file_sparse && worth_it(values.len(), stored)) {
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            out.push((
                name,
                RawTensor {
                    dtype: Dtype::F32,
                    shape: t.dims().to_vec(),
                    data,
                },
            ));
            continue;
        }
        let (mask, stored) = encode(&values);
        out.push((
            format!("{name}{MASK_SUFFIX}"),
            RawTensor {
                dtype: Dtype::U8,
                shape: vec![mask.len()],
                data: mask,
            },
        ));
        out.push((
            format!("{name}{VALUES_SUFFIX}"),
            RawTensor {
                dtype: Dtype::F32,
                shape: vec![stored.len()],
                data: stored.iter().flat_map(|v| v.to_le_bytes()).collect(),
            },
        ));
        shapes.insert(name, t.dims().to_vec());
    }
    let metadata =
        (!shapes.is_empty()).then(|| serde_json::to_string(&shapes).expect("shapes serialise"));
    Ok(Encoded {
        tensors: out,
        metadata,
    })
}

/// The tensors `file` stores sparse, with their dense shapes, from its `sparse` metadata
/// entry (empty when there is none).
pub fn sparse_shapes(file: &TensorFile) -> Result<BTreeMap<String, Vec<usize>>> {
    match file.metadata.get(METADATA_KEY) {
        None => Ok(BTreeMap::new()),
        Some(text) => serde_json::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "`{}`: metadata entry `{METADATA_KEY}` is not a JSON object of tensor shapes: {e}",
                file.path.display()
            )
        }),
    }
}

/// The base tensor name of a mask or values tensor, `None` for other names.
fn sparse_base(name: &str) -> Option<&str> {
    name.strip_suffix(MASK_SUFFIX)
        .or_else(|| name.strip_suffix(VALUES_SUFFIX))
}

/// Every floating-point tensor of `file` as dense F32, sparse ones decoded, integer
/// bookkeeping such as `num_batches_tracked` skipped. Any inconsistency in the sparse data is
/// an error naming the file and the tensor.
pub fn read_dense(file: &TensorFile) -> Result<HashMap<String, Tensor>> {
    let shown = file.path.display();
    let shapes = sparse_shapes(file)?;
    let names = file.names();
    let present: HashSet<&str> = names.iter().map(String::as_str).collect();
    let mut out = HashMap::new();
    for name in &names {
        if let Some(base) = sparse_base(name) {
            if !shapes.contains_key(base) {
                bail!(
                    "`{shown}`: tensor `{name}` holds sparse data of `{base}`, but metadata entry `{METADATA_KEY}` does not list `{base}`"
                );
            }
            continue;
        }
        if shapes.contains_key(name.as_str()) {
            bail!(
                "`{shown}`: tensor `{name}` is stored both dense and sparse (metadata entry `{METADATA_KEY}` lists it)"
            );
        }
        if matches!(
            file.raw(name)?.dtype(),
            Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16
        ) {
            out.insert(name.clone(), file.tensor_f32(name)?);
        }
    }
    for (name, shape) in &shapes {
        let mask_name = format!("{name}{MASK_SUFFIX}");
        let values_name = format!("{name}{VALUES_SUFFIX}");
        let missing: Vec<&str> = [&mask_name, &values_name]
            .into_iter()
            .filter(|n| !present.contains(n.as_str()))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            bail!(
                "`{shown}`: sparse tensor `{name}` is listed in metadata entry `{METADATA_KEY}`, but the file has no `{}`",
                missing.join("` or `")
            );
        }
        let values = decode_one(file, &mask_name, &values_name, shape)
            .map_err(|e| anyhow::anyhow!("`{shown}`: sparse tensor `{name}` is corrupt: {e}"))?;
        out.insert(
            name.clone(),
            Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?,
        );
    }
    Ok(out)
}

fn decode_one(
    file: &TensorFile,
    mask_name: &str,
    values_name: &str,
    shape: &[usize],
) -> Result<Vec<f32>> {
    let Some(n) = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
        bail!("its shape {shape:?} is too large");
    };
    let mask = file.raw(mask_name)?;
    if mask.dtype() != Dtype::U8 {
        bail!("`{mask_name}` has dtype {:?}, expected U8", mask.dtype());
    }
    if mask.shape() != [mask_len(n)] {
        bail!(
            "`{mask_name}` has shape {:?}; a {shape:?} tensor of {n} elements needs [{}]",
            mask.shape(),
            mask_len(n)
        );
    }
    let values = file.raw(values_name)?;
    if values.dtype() != Dtype::F32 {
        bail!(
            "`{values_name}` has dtype {:?}, expected F32",
            values.dtype()
        );
    }
    if values.shape().len() != 1 {
        bail!(
            "`{values_name}` has shape {:?}, expected one dimension",
            values.shape()
        );
    }
    let stored: Vec<f32> = values
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    decode(mask.data(), &stored, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn bits_are_lsb_first_and_padding_is_zero() {
        // n = 11: not a multiple of 8, the last byte has 5 padding bits.
        let mut v = vec![0f32; 11];
        v[0] = 1.0;
        v[3] = -2.0;
        v[8] = 3.0;
        v[10] = 4.0;
        let (mask, stored) = encode(&v);
        assert_eq!(mask, vec![0b0000_1001, 0b0000_0101]);
        assert_eq!(stored, vec![1.0, -2.0, 3.0, 4.0]);
        assert_eq!(bits(&decode(&mask, &stored, 11).unwrap()), bits(&v));
    }

    #[test]
    fn all_zero_and_none_zero() {
        for n in [0, 1, 7, 8, 9, 16, 17] {
            let zeros = vec![0f32; n];
            let (mask, stored) = encode(&zeros);
            assert_eq!(mask, vec![0u8; n.div_ceil(8)], "n = {n}");
            assert!(stored.is_empty());
            assert_eq!(bits(&decode(&mask, &stored, n).unwrap()), bits(&zeros));

            let full: Vec<f32> = (0..n).map(|i| i as f32 + 0.5).collect();
            let (mask, stored) = encode(&full);
            assert_eq!(mask.len(), n.div_ceil(8));
            let set: u32 = mask.iter().map(|b| b.count_ones()).sum();
            assert_eq!(set as usize, n, "n = {n}");
            if !n.is_multiple_of(8) {
                assert_eq!(mask[n / 8] >> (n % 8), 0, "padding bits stay clear");
            }
            assert_eq!(bits(&stored), bits(&full));
            assert_eq!(bits(&decode(&mask, &stored, n).unwrap()), bits(&full));
        }
    }

    #[test]
    fn only_positive_zero_is_dropped() {
        let nan = f32::from_bits(0x7fc0_1234);
        let v = [
            0.0,
            -0.0,
            nan,
            f32::INFINITY,
            f32::from_bits(1),
            0.0,
            -1.5,
            0.0,
            0.0,
        ];
        let (mask, stored) = encode(&v);
        assert_eq!(
            bits(&stored),
            bits(&[-0.0, nan, f32::INFINITY, f32::from_bits(1), -1.5])
        );
        assert_eq!(bits(&decode(&mask, &stored, v.len()).unwrap()), bits(&v));
        let t = Tensor::new(&v, &Device::Cpu).unwrap();
        assert_eq!(count_nonzero(&t).unwrap(), 5);
    }

    #[test]
    fn decode_rejects_inconsistent_parts() {
        let err = |m: &[u8], s: &[f32], n| decode(m, s, n).unwrap_err().to_string();
        assert!(err(&[0, 0], &[], 20).contains("has 2 bytes; 20 elements need 3"));
        assert!(err(&[0b0010_0000], &[1.0], 5).contains("padding bits"));
        assert!(err(&[0b0000_0011], &[1.0], 8).contains("marks 2 stored elements but there are 1"));
        assert!(err(&[0b0000_0001], &[1.0, 2.0], 8).contains("there are 2 values"));
    }

    /// Random codes with zeros at `zero_rate`, plus a few long zero runs.
    fn random_codes(rng: &mut crate::rng::Rng, n: usize, zero_rate: f64) -> Vec<i8> {
        let mut v: Vec<i8> = (0..n)
            .map(|_| {
                if rng.uniform() < zero_rate {
                    0
                } else {
                    // Every non-zero code, -128 included (the encoding does not care).
                    let c = (rng.uniform() * 256.0) as i32 - 128;
                    if c == 0 { 1 } else { c as i8 }
                }
            })
            .collect();
        if n > 100 {
            let start = (rng.uniform() * (n - 100) as f64) as usize;
            let len = (rng.uniform() * 100.0) as usize;
            v[start..start + len].fill(0);
        }
        v
    }

    #[test]
    fn gap_coding_round_trips_exactly() {
        let mut rng = crate::rng::Rng::new(11);
        let mut cases: Vec<Vec<i8>> = Vec::new();
        for n in [0, 1, 2, 15, 16, 17, 31, 32, 33, 100, 1000, 4097] {
            cases.push(vec![0; n]);
            cases.push((0..n).map(|i| (i % 127) as i8 + 1).collect());
            for rate in [0.3, 0.8, 0.95, 0.999] {
                cases.push(random_codes(&mut rng, n, rate));
            }
        }
        // Runs around the filler boundary, inside and at the end.
        for run in [14, 15, 16, 17, 31, 32, 33, 48, 200] {
            let mut v = vec![5i8; 3];
            v.extend(std::iter::repeat_n(0, run));
            v.push(-7);
            cases.push(v.clone());
            v.pop();
            cases.push(v.clone());
            let mut front = vec![0i8; run];
            front.push(1);
            cases.push(front);
        }
        for codes in cases {
            let n = codes.len();
            let coded = encode_gaps(&codes);
            assert_eq!(coded.values.len(), gap_entries(&codes), "{codes:?}");
            assert_eq!(coded.values.len() + coded.gaps.len(), gap_coded_len(&codes));
            assert_eq!(coded.gaps.len(), gaps_len(coded.values.len()));
            let nonzero = codes.iter().filter(|&&c| c != 0).count();
            let fillers = coded.values.iter().filter(|&&c| c == 0).count();
            assert_eq!(coded.values.len(), nonzero + fillers);
            assert_eq!(decode_gaps(&coded.gaps, &coded.values, n).unwrap(), codes);
        }
    }

    #[test]
    fn gap_nibbles_are_low_first_and_fillers_cover_long_runs() {
        // [3, 0, 0, -1, then 16 zeros, 2, then 5 zeros]: entries (0, 3), (2, -1), a filler
        // (15, 0) for 16 zeros, (0, 2), and a last filler (4, 0) for the 5 trailing zeros.
        let mut codes = vec![3i8, 0, 0, -1];
        codes.extend([0; 16]);
        codes.push(2);
        codes.extend([0; 5]);
        let coded = encode_gaps(&codes);
        assert_eq!(coded.values, vec![3, -1, 0, 2, 0]);
        assert_eq!(
            coded.gaps,
            vec![0x20, 0x0f, 0x04],
            "low nibble first, padding 0"
        );
        // 15 zeros fit one gap; 16 need a filler.
        let mut fifteen = vec![0i8; 15];
        fifteen.push(9);
        assert_eq!(encode_gaps(&fifteen).gaps, vec![0x0f]);
        let mut sixteen = vec![0i8; 16];
        sixteen.push(9);
        assert_eq!(encode_gaps(&sixteen).values, vec![0, 9]);
        assert_eq!(encode_gaps(&sixteen).gaps, vec![0x0f]);
        // All zeros: one entry per 16, the last sized to the end.
        let zeros = encode_gaps(&[0; 40]);
        assert_eq!(zeros.values, vec![0, 0, 0]);
        assert_eq!(zeros.gaps, vec![0xff, 0x07]);
    }

    #[test]
    fn gap_decoding_rejects_what_the_writer_never_writes() {
        let err = |g: &[u8], v: &[i8], n| decode_gaps(g, v, n).unwrap_err().to_string();
        assert!(err(&[0x00], &[1, 2, 3], 8).contains("have 1 bytes; 3 values need 2"));
        assert!(err(&[0x00, 0x00], &[1], 8).contains("have 2 bytes; 1 values need 1"));
        assert!(err(&[0x10], &[1], 8).contains("padding nibble"));
        assert!(err(&[0x00], &[1, 2], 1).contains("2 entries cannot fit"));
        assert!(err(&[0x09], &[1], 8).contains("lands on element 9, past the tensor's 8"));
        assert!(err(&[0x70], &[1, 1], 8).contains("entry 1 (gap 7) lands on element 8"));
        assert!(err(&[0x00], &[1], 8).contains("cover 1 of the tensor's 8 elements"));
        // A zero code before the last entry must be a full filler.
        assert!(err(&[0x03], &[0, 1], 5).contains("entry 0 is a filler (code 0) with gap 3"));
        assert!(decode_gaps(&[0x0f], &[0, 1], 17).is_ok());
        assert!(
            decode_gaps(&[0x30], &[1, 0], 5).is_ok(),
            "a last filler of any gap"
        );
        assert!(decode_gaps(&[], &[], 0).unwrap().is_empty());
        assert!(err(&[], &[], 3).contains("cover 0 of the tensor's 3"));
    }

    #[test]
    fn sparse_only_when_it_saves_enough() {
        assert!(!worth_it(0, 0));
        assert!(!worth_it(32, 0), "a small all-zero bias stays dense");
        // The boundary docs/checkpoint-format.md states for all-zero tensors.
        assert!(!worth_it(66, 0));
        assert!(worth_it(67, 0));
        assert!(worth_it(1000, 0));
        assert!(worth_it(10_000, 2000));
        assert!(!worth_it(10_000, 9700));
    }
}
