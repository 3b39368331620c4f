//! What a model reads an input from: an owned [`Tensor`], or a [`TensorRef`] that borrows its
//! elements where they already are (the Python package reads numpy arrays in place). Inputs are
//! never copied: plan steps read them from these bytes.

use std::collections::BTreeMap;

use kiln_ir::{DType, Tensor};

use crate::plan::{Manifest, Port};
use crate::RunError;

/// An input's element type, shape and bytes (little-endian, as [`Tensor::as_bytes`]).
pub trait InputTensor {
    /// The element type.
    fn dtype(&self) -> DType;
    /// The shape.
    fn shape(&self) -> &[usize];
    /// The elements, row-major.
    fn bytes(&self) -> &[u8];
}

impl InputTensor for Tensor {
    fn dtype(&self) -> DType {
        Tensor::dtype(self)
    }
    fn shape(&self) -> &[usize] {
        Tensor::shape(self)
    }
    fn bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// Borrowed row-major elements of a tensor.
#[derive(Clone, Debug)]
pub struct TensorRef<'a> {
    dtype: DType,
    shape: Vec<usize>,
    bytes: &'a [u8],
}

impl<'a> TensorRef<'a> {
    /// A view of `bytes` as a `dtype` tensor of `shape`; the bytes must hold exactly that many
    /// elements and start at an address aligned for the element type.
    pub fn new(dtype: DType, shape: Vec<usize>, bytes: &'a [u8]) -> Result<TensorRef<'a>, String> {
        let size = dtype.size_bytes();
        let want = shape.iter().try_fold(size, |a, d| a.checked_mul(*d));
        if want != Some(bytes.len()) {
            return Err(format!(
                "{} bytes do not hold a {dtype} tensor of shape {shape:?}",
                bytes.len()
            ));
        }
        if !(bytes.as_ptr() as usize).is_multiple_of(size) {
            return Err(format!("{dtype} elements must start at a multiple of {size} bytes"));
        }
        Ok(TensorRef { dtype, shape, bytes })
    }
}

impl InputTensor for TensorRef<'_> {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn bytes(&self) -> &[u8] {
        self.bytes
    }
}

/// The optional inputs the caller left out, each a tensor of its declared default over the shape
/// the bound dims `syms` give it; `None` where the caller supplied the input. (`bind` has already
/// refused a missing input without a default.)
pub(crate) fn defaults<T: InputTensor>(
    m: &Manifest,
    inputs: &BTreeMap<String, T>,
    syms: &[usize],
) -> Result<Vec<Option<Tensor>>, RunError> {
    let fill = |p: &Port| -> Result<Option<Tensor>, RunError> {
        let (Some(d), false) = (p.default, inputs.contains_key(&p.name)) else {
            return Ok(None);
        };
        let v = &m.values[p.value as usize];
        let shape: Vec<usize> = v.shape.iter().map(|x| x.eval(syms)).collect();
        let n = shape.iter().product();
        Tensor::from_f64(v.dtype, shape, &vec![d.as_f64(); n])
            .map(Some)
            .map_err(|e| RunError::BadInput {
                name: p.name.clone(),
                msg: format!("filling its default {d}: {e}"),
            })
    };
    m.inputs.iter().map(fill).collect()
}

/// The bytes input `n` is read from: the caller's tensor, or its default.
pub(crate) fn input_bytes<'a, T: InputTensor>(
    m: &Manifest,
    inputs: &'a BTreeMap<String, T>,
    defaults: &'a [Option<Tensor>],
    n: usize,
) -> &'a [u8] {
    match (inputs.get(&m.inputs[n].name), &defaults[n]) {
        (Some(t), _) => t.bytes(),
        (None, Some(d)) => d.as_bytes(),
        (None, None) => &[],
    }
}
