//! numpy arrays to model inputs, read in place, and model outputs to numpy arrays, moved.

use kiln_ir::{DType, Tensor, TensorData};
use kiln_runtime::plan::{DimExpr, Manifest};
use kiln_runtime::TensorRef;
use numpy::{IntoPyArray, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// numpy's name for a kiln element type.
pub fn numpy_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::I64 => "int64",
        DType::I32 => "int32",
        DType::I8 => "int8",
        DType::U8 => "uint8",
        DType::Bool => "bool",
    }
}

/// A dim as text: `384`, `seq`, `2*seq`.
pub fn dim_text(d: &DimExpr, dims: &[(String, u64)]) -> String {
    let mut parts: Vec<String> = d.syms.iter().map(|s| dims[*s as usize].0.clone()).collect();
    if d.coeff != 1 || parts.is_empty() {
        parts.insert(0, d.coeff.to_string());
    }
    parts.join("*")
}

/// The declared shape of value `v` as text: `batch, seq, 384`.
fn shape_text(m: &Manifest, v: usize) -> String {
    let dims: Vec<String> = m.values[v].shape.iter().map(|d| dim_text(d, &m.dims)).collect();
    dims.join(", ")
}

/// Input `name` read in place from a C-contiguous, aligned numpy array (the Python side passes
/// `numpy.ascontiguousarray`, which copies only arrays that are not), after checking its dtype
/// and rank against the model's declaration.
pub fn input_ref<'a>(m: &Manifest, name: &str, a: &'a Bound<'_, PyUntypedArray>) -> PyResult<TensorRef<'a>> {
    let port = m.inputs.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = m.inputs.iter().map(|p| p.name.as_str()).collect();
        PyValueError::new_err(format!("no input `{name}` (inputs: {})", names.join(", ")))
    })?;
    let v = port.value as usize;
    let dtype = m.values[v].dtype;
    let want = numpy_dtype(dtype);
    let got = a.dtype().to_string();
    if got != want {
        return Err(PyTypeError::new_err(format!(
            "input `{name}`: expected {want}, got an array of {got}"
        )));
    }
    if a.ndim() != m.values[v].shape.len() {
        return Err(PyValueError::new_err(format!(
            "input `{name}`: expected {} dims ({}), got shape {:?}",
            m.values[v].shape.len(),
            shape_text(m, v),
            a.shape()
        )));
    }
    if !a.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "input `{name}`: the array must be C-contiguous (numpy.ascontiguousarray)"
        )));
    }
    // SAFETY: a C-contiguous array's elements are the `len * itemsize` bytes at its data pointer;
    // `a` borrows the array, so they stay alive (and in place) for the returned view's lifetime.
    let bytes = unsafe {
        let data = (*a.as_array_ptr()).fields.data as *const u8;
        let len = a.len() * dtype.size_bytes();
        if len == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(data, len)
        }
    };
    TensorRef::new(dtype, a.shape().to_vec(), bytes).map_err(|e| PyValueError::new_err(format!("input `{name}`: {e}")))
}

/// A model output as a numpy array that takes over the tensor's elements.
pub fn output_array<'py>(py: Python<'py>, t: Tensor) -> PyResult<Bound<'py, PyAny>> {
    let (shape, data) = t.into_parts();
    let a = match data {
        TensorData::F32(v) => v.into_pyarray(py).reshape(shape)?.into_any(),
        TensorData::I64(v) => v.into_pyarray(py).reshape(shape)?.into_any(),
        TensorData::I32(v) => v.into_pyarray(py).reshape(shape)?.into_any(),
        TensorData::I8(v) => v.into_pyarray(py).reshape(shape)?.into_any(),
        TensorData::U8(v) => v.into_pyarray(py).reshape(shape)?.into_any(),
        TensorData::Bool(v) => v.into_pyarray(py).reshape(shape)?.into_any(),
        other => {
            // f16 and bf16 outputs come back as float32 (numpy has no bfloat16).
            let t = Tensor::new(shape.clone(), other).map_err(|e| PyValueError::new_err(e.to_string()))?;
            let v: Vec<f32> = t.to_f64_vec().into_iter().map(|x| x as f32).collect();
            v.into_pyarray(py).reshape(shape)?.into_any()
        }
    };
    Ok(a)
}
