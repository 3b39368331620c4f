//! Loads arbitrary bytes as an artifact and, if they load, runs the model on small inputs.
//! The trailer checksum is recomputed first, so mutations reach the manifest parser, the
//! validator and the executor instead of stopping at the CRC.
#![no_main]

use std::collections::BTreeMap;

use kiln_ir::{DType, Tensor};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    if bytes.len() >= 72 {
        let end = bytes.len() - 8;
        let crc = crc32fast::hash(&bytes[..end]);
        bytes[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        bytes[end + 4..].copy_from_slice(b"KEND");
    }
    let Ok(model) = kiln_runtime::Model::from_bytes(&bytes) else { return };
    let m = model.manifest();
    let syms: Vec<usize> = m.dims.iter().map(|(_, bound)| (*bound).min(3) as usize).collect();
    let mut feed = BTreeMap::new();
    for p in &m.inputs {
        let v = &m.values[p.value as usize];
        let shape: Vec<usize> = v.shape.iter().map(|d| d.eval(&syms).min(64)).collect();
        let n: usize = shape.iter().product();
        if n > 1 << 16 {
            return;
        }
        let t = match v.dtype {
            DType::F32 => Tensor::from_f32(shape, vec![0.5; n]),
            DType::I64 => Tensor::from_i64(shape, vec![1; n]),
            other => Tensor::from_f64(other, shape, &vec![1.0; n]),
        };
        if let Ok(t) = t {
            feed.insert(p.name.clone(), t);
        }
    }
    let _ = model.run(&feed);
});
