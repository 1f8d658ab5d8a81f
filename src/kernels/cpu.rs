//! Access to the f32 CPU storage behind Candle tensors, shared by every kernel.
//!
//! The public functions make their inputs contiguous before applying a custom op, so the ops
//! only ever see one contiguous f32 slice per argument; anything else is a bug and errors.

use candle_core::{CpuStorage, DType, Layout, Result, Tensor, bail};

/// Whether the fast kernels apply: every tensor is f32 on the CPU. Anything else runs the
/// stock Candle composition (`reference.rs`).
pub(crate) fn all_cpu_f32(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// The contiguous f32 values that `layout` describes in `storage`.
pub(crate) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: expected an f32 tensor")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: expected a contiguous tensor"),
    }
}

/// One output buffer that several threads write in disjoint parts, where the parts are not
/// consecutive chunks (e.g. all the N x H x W planes of one channel), so `par_chunks_mut`
/// cannot split it.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: only hands out sub-slices through `part`, whose callers guarantee disjointness.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    pub(crate) fn new(data: &mut [f32]) -> Self {
        SharedMut {
            ptr: data.as_mut_ptr(),
            len: data.len(),
        }
    }

    /// A buffer not yet written, for kernels that write every value through [`as_ptr`]
    /// (never through [`part`], which would reference unwritten values).
    ///
    /// [`as_ptr`]: SharedMut::as_ptr
    /// [`part`]: SharedMut::part
    pub(crate) fn uninit(data: &mut [std::mem::MaybeUninit<f32>]) -> Self {
        SharedMut {
            ptr: data.as_mut_ptr().cast(),
            len: data.len(),
        }
    }

    /// The length of the buffer given to `new`.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The start of the buffer given to `new`, for kernels that write disjoint strided
    /// tiles through raw pointers.
    pub(crate) fn as_ptr(&self) -> *mut f32 {
        self.ptr
    }

    /// `data[start..start + len]` of the buffer given to `new`.
    ///
    /// # Safety
    /// The buffer must outlive the returned slice, and no two live slices may overlap.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn part(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.len, "SharedMut part out of bounds");
        // SAFETY: in bounds (checked above); disjointness and lifetime are the caller's.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// Splits a packed gradient buffer `[a | b | ...]` (as returned by one backward op) into
/// tensors of the given shapes; `None` where a part was not requested. The first part is a
/// view; later (small) parts are copied so that they never keep the whole buffer alive.
pub(crate) fn unpack(packed: &Tensor, parts: &[(bool, &[usize])]) -> Result<Vec<Option<Tensor>>> {
    let mut offset = 0;
    let mut out = Vec::with_capacity(parts.len());
    for &(wanted, shape) in parts {
        if !wanted {
            out.push(None);
            continue;
        }
        let len: usize = shape.iter().product();
        let part = packed.narrow(0, offset, len)?;
        out.push(Some(if offset == 0 {
            part.reshape(shape)?
        } else {
            // Not `Tensor::copy`, which clones the whole underlying buffer.
            Tensor::from_vec(part.to_vec1::<f32>()?, shape, packed.device())?
        }));
        offset += len;
    }
    Ok(out)
}
