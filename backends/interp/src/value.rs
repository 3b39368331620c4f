//! The interpreter's working representation of a tensor.

use half::{bf16, f16};
use kiln_ir::{DType, Tensor};

/// A concrete tensor inside the interpreter: every element held as `f64` (integers exactly up to
/// 2^53, bools as 0/1), tagged with the dtype it stands for.
#[derive(Clone, Debug)]
pub struct Value {
    /// Element type the values are rounded to.
    pub dtype: DType,
    /// Concrete shape.
    pub shape: Vec<usize>,
    /// Row-major elements.
    pub data: Vec<f64>,
}

impl Value {
    /// Widens a tensor (already checked to be of `dtype`).
    pub fn from_tensor(t: &Tensor, dtype: DType) -> Value {
        Value {
            dtype,
            shape: t.shape().to_vec(),
            data: t.to_f64_vec(),
        }
    }

    /// Narrows back to a tensor of the value's dtype.
    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_f64(self.dtype, self.shape.clone(), &self.data).expect("value data matches its shape")
    }

    /// Builds a value, rounding every element to what `dtype` can hold.
    pub fn rounded(dtype: DType, shape: Vec<usize>, mut data: Vec<f64>) -> Value {
        for x in &mut data {
            *x = round_to(dtype, *x);
        }
        Value { dtype, shape, data }
    }
}

/// Rounds `x` to the nearest value of `dtype` (integers: toward zero, wrapping as a cast would).
pub fn round_to(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F32 => x as f32 as f64,
        DType::F16 => f16::from_f64(x).to_f64(),
        DType::BF16 => bf16::from_f64(x).to_f64(),
        DType::I64 => x as i64 as f64,
        DType::I32 => x as i64 as i32 as f64,
        DType::I8 => x as i64 as i8 as f64,
        DType::U8 => x as i64 as u8 as f64,
        DType::Bool => (x != 0.0) as u8 as f64,
    }
}
