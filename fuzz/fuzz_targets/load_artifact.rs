//! Fuzzes everything the loader and executor read from an artifact except the machine code: the
//! input is a manifest (RON text), packed with the seed artifact's weights and code. Manifests
//! whose kernel table differs from the seed's are skipped: the kernel table describes the code,
//! which is trusted like a shared library's (a checksum guards it against damage, nothing can
//! guard native code against a hostile author). Any crash here is a bug.
#![no_main]

use std::collections::BTreeMap;

use kiln_ir::{DType, Tensor};
use kiln_runtime::artifact;

const SEED: &[u8] = include_bytes!("../seed/mlp.kiln");

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let seed = artifact::decode(SEED).expect("the seed artifact is valid");
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(manifest) = ron::from_str::<kiln_runtime::plan::Manifest>(text) else {
        return;
    };
    if manifest.kernels != seed.manifest.kernels {
        return;
    }
    let bytes = artifact::encode(&manifest, &SEED[seed.weights.clone()], &SEED[seed.code.clone()]).expect("encodes");
    let Ok(model) = kiln_runtime::Model::from_bytes(&bytes) else {
        return;
    };
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
