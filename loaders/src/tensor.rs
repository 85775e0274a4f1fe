//! Host-side tensors: what a file holds, in the dtype it was stored with.

use half::{bf16, f16};

/// Element types the engine stores. Files may hold others (fp8, integers); those are rejected
/// with the tensor's name when read as one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Owned element data in one of the stored dtypes.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

/// A row-major tensor in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    /// Panics if `data.len()` differs from the product of `shape`: a caller bug, never input.
    pub fn new(shape: Vec<usize>, data: HostData) -> Self {
        let t = HostTensor { shape, data };
        assert_eq!(t.len(), t.shape.iter().product::<usize>(), "HostTensor data does not match shape {:?}", t.shape);
        t
    }

    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self::new(shape, HostData::F32(data))
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            HostData::F32(_) => DType::F32,
            HostData::F16(_) => DType::F16,
            HostData::BF16(_) => DType::BF16,
        }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            HostData::F32(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements widened to f32 (a copy).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// The same values stored as `dtype` (round to nearest even when narrowing).
    pub fn cast(&self, dtype: DType) -> HostTensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let f = self.to_f32();
        let data = match dtype {
            DType::F32 => HostData::F32(f),
            DType::F16 => HostData::F16(f.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => HostData::BF16(f.iter().map(|&x| bf16::from_f32(x)).collect()),
        };
        HostTensor { shape: self.shape.clone(), data }
    }
}

impl HostTensor {
    /// Appends `other`'s rows (first dimension) to this tensor, as when fusing diffusers' split
    /// q/k/v weights into BFL's qkv. Returns `false` and leaves `self` unchanged when either is
    /// 0-d or they differ in dtype or in any dimension but the first: the caller knows the keys
    /// and reports them.
    pub(crate) fn append_rows(&mut self, other: &HostTensor) -> bool {
        let (Some(rows), Some(more)) = (self.shape.first().copied(), other.shape.first().copied()) else {
            return false;
        };
        let Some(total) = rows.checked_add(more) else { return false };
        if self.shape[1..] != other.shape[1..] {
            return false;
        }
        match (&mut self.data, &other.data) {
            (HostData::F32(a), HostData::F32(b)) => a.extend_from_slice(b),
            (HostData::F16(a), HostData::F16(b)) => a.extend_from_slice(b),
            (HostData::BF16(a), HostData::BF16(b)) => a.extend_from_slice(b),
            _ => return false,
        }
        self.shape[0] = total;
        true
    }

    /// Exchanges the first and second half of the rows: diffusers stores the final layer's
    /// modulation as (scale, shift), BFL as (shift, scale). Returns `false` (unchanged) for a
    /// 0-d tensor or an odd number of rows.
    pub(crate) fn swap_row_halves(&mut self) -> bool {
        match self.shape.first() {
            Some(rows) if rows % 2 == 0 => {}
            _ => return false,
        }
        // Rows are contiguous, so the two halves of the rows are the two halves of the data.
        let half = self.len() / 2;
        match &mut self.data {
            HostData::F32(v) => v.rotate_left(half),
            HostData::F16(v) => v.rotate_left(half),
            HostData::BF16(v) => v.rotate_left(half),
        }
        true
    }
}
