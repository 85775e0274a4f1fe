//! A tensor is a backend's storage plus a row-major shape. Every tensor is contiguous: ops that
//! change layout (narrow, concat, the attention head split) produce new tensors, so kernels never
//! deal with strides.

use crate::backend::Backend;
use loaders::DType;

pub struct Tensor<B: Backend> {
    storage: B::Storage,
    shape: Vec<usize>,
}

impl<B: Backend> Tensor<B> {
    /// Backends build tensors; the element count of `storage` must equal the shape's product.
    pub fn from_storage(storage: B::Storage, shape: Vec<usize>) -> Self {
        Tensor { storage, shape }
    }

    pub fn storage(&self) -> &B::Storage {
        &self.storage
    }

    /// The storage to write in place (the optimiser's update of master weights and moments).
    pub fn storage_mut(&mut self) -> &mut B::Storage {
        &mut self.storage
    }

    pub fn into_storage(self) -> B::Storage {
        self.storage
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Size of dimension `i`; negative indices count from the end.
    pub fn dim(&self, i: isize) -> usize {
        let r = self.shape.len() as isize;
        let j = if i < 0 { r + i } else { i };
        self.shape[j as usize]
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        B::storage_dtype(&self.storage)
    }

    /// The same data seen with another shape of the same element count (free: no copy).
    pub fn reshape(self, shape: &[usize]) -> anyhow::Result<Self> {
        let n: usize = shape.iter().product();
        anyhow::ensure!(
            n == self.elem_count(),
            "cannot reshape {:?} ({} elements) to {:?} ({} elements)",
            self.shape,
            self.elem_count(),
            shape,
            n
        );
        Ok(Tensor { storage: self.storage, shape: shape.to_vec() })
    }
}

impl<B: Backend> Clone for Tensor<B>
where
    B::Storage: Clone,
{
    fn clone(&self) -> Self {
        Tensor { storage: self.storage.clone(), shape: self.shape.clone() }
    }
}

impl<B: Backend> std::fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {})", self.shape, self.dtype())
    }
}
