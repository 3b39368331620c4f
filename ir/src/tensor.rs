//! Concrete tensors: what callers pass in and get back, and what checkpoints hold.

use half::{bf16, f16};

use crate::DType;

/// Typed element storage of a [`Tensor`].
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// i64 elements.
    I64(Vec<i64>),
    /// i32 elements.
    I32(Vec<i32>),
    /// i8 elements.
    I8(Vec<i8>),
    /// u8 elements.
    U8(Vec<u8>),
    /// bool elements.
    Bool(Vec<bool>),
}

impl TensorData {
    /// The dtype of the elements.
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
            TensorData::I64(_) => DType::I64,
            TensorData::I32(_) => DType::I32,
            TensorData::I8(_) => DType::I8,
            TensorData::U8(_) => DType::U8,
            TensorData::Bool(_) => DType::Bool,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::BF16(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why bytes could not become a tensor.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    /// The shape's element count and the data length disagree.
    #[error("shape {shape:?} needs {expected} elements, got {got}")]
    Length {
        /// The shape.
        shape: Vec<usize>,
        /// Elements the shape needs.
        expected: usize,
        /// Elements supplied.
        got: usize,
    },
    /// A bool byte was neither 0 nor 1.
    #[error("bool element {index} has byte value {value}, expected 0 or 1")]
    BadBool {
        /// Element index.
        index: usize,
        /// The byte.
        value: u8,
    },
}

/// A dense row-major tensor with a concrete shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
}

impl Tensor {
    /// Builds a tensor, checking that the data fits the shape.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Tensor, TensorError> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(TensorError::Length {
                shape,
                expected,
                got: data.len(),
            });
        }
        Ok(Tensor { shape, data })
    }

    /// An f32 tensor.
    pub fn from_f32(shape: Vec<usize>, v: Vec<f32>) -> Result<Tensor, TensorError> {
        Tensor::new(shape, TensorData::F32(v))
    }

    /// An i64 tensor.
    pub fn from_i64(shape: Vec<usize>, v: Vec<i64>) -> Result<Tensor, TensorError> {
        Tensor::new(shape, TensorData::I64(v))
    }

    /// Decodes little-endian bytes of `dtype` (the layout of safetensors and `.npy` files).
    pub fn from_le_bytes(dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Result<Tensor, TensorError> {
        let n = bytes.len() / dtype.size_bytes();
        if !bytes.len().is_multiple_of(dtype.size_bytes()) {
            return Err(TensorError::Length {
                expected: shape.iter().product(),
                shape,
                got: n,
            });
        }
        fn chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
            b.chunks_exact(N).map(|c| c.try_into().expect("chunk has N bytes"))
        }
        let data = match dtype {
            DType::F32 => TensorData::F32(chunks::<4>(bytes).map(f32::from_le_bytes).collect()),
            DType::F16 => TensorData::F16(chunks::<2>(bytes).map(f16::from_le_bytes).collect()),
            DType::BF16 => TensorData::BF16(chunks::<2>(bytes).map(bf16::from_le_bytes).collect()),
            DType::I64 => TensorData::I64(chunks::<8>(bytes).map(i64::from_le_bytes).collect()),
            DType::I32 => TensorData::I32(chunks::<4>(bytes).map(i32::from_le_bytes).collect()),
            DType::I8 => TensorData::I8(bytes.iter().map(|b| *b as i8).collect()),
            DType::U8 => TensorData::U8(bytes.to_vec()),
            DType::Bool => {
                if let Some((index, &value)) = bytes.iter().enumerate().find(|(_, b)| **b > 1) {
                    return Err(TensorError::BadBool { index, value });
                }
                TensorData::Bool(bytes.iter().map(|b| *b == 1).collect())
            }
        };
        Tensor::new(shape, data)
    }

    /// Encodes the elements as little-endian bytes.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match &self.data {
            TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I8(v) => v.iter().map(|x| *x as u8).collect(),
            TensorData::U8(v) => v.clone(),
            TensorData::Bool(v) => v.iter().map(|x| *x as u8).collect(),
        }
    }

    /// The elements' bytes in host order (every supported host is little-endian).
    pub fn as_bytes(&self) -> &[u8] {
        fn raw<T>(v: &[T]) -> &[u8] {
            // SAFETY: every element type here is plain data without padding (bool is one byte
            // holding 0 or 1, f16/bf16 are transparent u16s), so its bytes may be read as u8.
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        }
        match &self.data {
            TensorData::F32(v) => raw(v),
            TensorData::F16(v) => raw(v),
            TensorData::BF16(v) => raw(v),
            TensorData::I64(v) => raw(v),
            TensorData::I32(v) => raw(v),
            TensorData::I8(v) => raw(v),
            TensorData::U8(v) => raw(v),
            TensorData::Bool(v) => raw(v),
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The dtype.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// The elements.
    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// The shape and the elements, without copying them.
    pub fn into_parts(self) -> (Vec<usize>, TensorData) {
        (self.shape, self.data)
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Every element widened to `f64` (integers exactly up to 2^53, bools as 0/1).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.data {
            TensorData::F32(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            TensorData::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            TensorData::I64(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::I32(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::I8(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::U8(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::Bool(v) => v.iter().map(|x| *x as u8 as f64).collect(),
        }
    }

    /// Builds a tensor of `dtype` from `f64` values, rounding to the dtype (integers truncate
    /// toward zero and saturate; bools are `x != 0`).
    pub fn from_f64(dtype: DType, shape: Vec<usize>, v: &[f64]) -> Result<Tensor, TensorError> {
        let data = match dtype {
            DType::F32 => TensorData::F32(v.iter().map(|x| *x as f32).collect()),
            DType::F16 => TensorData::F16(v.iter().map(|x| f16::from_f64(*x)).collect()),
            DType::BF16 => TensorData::BF16(v.iter().map(|x| bf16::from_f64(*x)).collect()),
            DType::I64 => TensorData::I64(v.iter().map(|x| *x as i64).collect()),
            DType::I32 => TensorData::I32(v.iter().map(|x| *x as i32).collect()),
            DType::I8 => TensorData::I8(v.iter().map(|x| *x as i8).collect()),
            DType::U8 => TensorData::U8(v.iter().map(|x| *x as u8).collect()),
            DType::Bool => TensorData::Bool(v.iter().map(|x| *x != 0.0).collect()),
        };
        Tensor::new(shape, data)
    }

    /// Largest absolute elementwise difference to `other`, or `None` if the shapes differ.
    pub fn max_abs_diff(&self, other: &Tensor) -> Option<f64> {
        if self.shape != other.shape {
            return None;
        }
        let (a, b) = (self.to_f64_vec(), other.to_f64_vec());
        Some(
            a.iter()
                .zip(&b)
                .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() })
                .fold(0.0, f64::max),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_round_trip_every_dtype() {
        for dt in DType::ALL {
            let vals = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0];
            let t = Tensor::from_f64(dt, vec![2, 3], &vals).unwrap();
            let back = Tensor::from_le_bytes(dt, vec![2, 3], &t.to_le_bytes()).unwrap();
            assert_eq!(t, back, "{dt}");
            assert_eq!(back.to_f64_vec(), vals);
        }
    }

    #[test]
    fn length_mismatch_is_an_error() {
        assert!(Tensor::from_f32(vec![2, 2], vec![1.0; 3]).is_err());
        assert!(Tensor::from_le_bytes(DType::Bool, vec![1], &[7]).is_err());
    }
}
