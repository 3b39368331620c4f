//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use kiln_frontend::{Lowered, Options};
use kiln_ir::Tensor;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file under `tests/data`.
pub fn data(rel: &str) -> PathBuf {
    root().join("tests/data").join(rel)
}

/// Reads a committed `.npy` reference.
pub fn npy(rel: &str) -> Tensor {
    kiln_runtime::npy::read(data(rel)).unwrap_or_else(|e| panic!("reading reference {rel}: {e}"))
}

/// Lowers a spec from `specs/` with config overrides.
pub fn spec(name: &str, overrides: &[(&str, &str)]) -> Lowered {
    spec_with(name, overrides, false)
}

/// Lowers a spec from `specs/`, for decoding (`--generate`) when `decode` is set.
pub fn spec_with(name: &str, overrides: &[(&str, &str)], decode: bool) -> Lowered {
    let opts = Options {
        overrides: overrides.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        weight_prefix: None,
        decode,
    };
    kiln_frontend::load(&root().join("specs").join(name), &opts).unwrap_or_else(|e| panic!("{e}"))
}

/// The directory `scripts/fetch-minilm.sh` fills.
pub fn minilm_dir() -> PathBuf {
    let cache = std::env::var_os("KILN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/kiln"));
    let dir = cache.join("all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").exists(),
        "the MiniLM checkpoint is not in {}; run `bash scripts/fetch-minilm.sh` first (scripts/test does)",
        dir.display()
    );
    dir
}

/// Runs the interpreter and returns the outputs by name.
pub fn run(l: &Lowered, weights: &BTreeMap<String, Tensor>, inputs: &[(&str, Tensor)]) -> BTreeMap<String, Tensor> {
    let feed = inputs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    kiln_interp::run(&l.graph, weights, &feed)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .collect()
}

/// Asserts `got` matches `want` within `tol` max abs error, reporting the error seen.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let err = got.max_abs_diff(want).expect("same shape");
    eprintln!("{what}: max abs error {err:.3e} (tolerance {tol:.0e})");
    assert!(err <= tol, "{what}: max abs error {err:e} exceeds {tol:e}");
}

/// A tiny deterministic generator (splitmix64), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The tiny Llama shape of `tests/data/llama_tiny` (and of every family in
/// scripts/make-family-references.py), with the 128-position bound decoding needs.
pub const LLAMA_TINY: &[(&str, &str)] = &[
    ("layers", "2"),
    ("hidden", "64"),
    ("heads", "4"),
    ("kv_heads", "2"),
    ("ffn", "128"),
    ("vocab", "256"),
    ("eps", "1e-6"),
    ("max_pos", "128"),
];

/// The lists of ids under `key` in a reference's `generate.json` (one list per line, as the
/// scripts write it).
pub fn id_lists(dir: &str, key: &str) -> Vec<Vec<i64>> {
    let text = std::fs::read_to_string(data(&format!("{dir}/generate.json"))).unwrap();
    let start = text
        .find(&format!("\"{key}\": ["))
        .unwrap_or_else(|| panic!("{dir}: no {key}"));
    text[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.trim_start().starts_with('['))
        .map(|l| {
            let l = l.trim().trim_end_matches(',').trim_matches(['[', ']']);
            l.split(',').map(|x| x.trim().parse().unwrap()).collect()
        })
        .collect()
}

/// `l` optimized at -O2, compiled for the CPU at level 2, encoded and loaded.
pub fn compile_o2(mut l: Lowered, w: &BTreeMap<String, Tensor>) -> kiln_runtime::Model {
    kiln_passes::optimize(&mut l.graph, kiln_passes::OptLevel::O2, true).unwrap_or_else(|e| panic!("{e}"));
    let c = kiln_cpu::compile(&l.graph, w, &l.dims, &kiln_cpu::Options::for_level(2)).unwrap_or_else(|e| panic!("{e}"));
    let bytes = kiln_runtime::artifact::encode(&c.manifest, &c.weights, &c.code).unwrap();
    kiln_runtime::Model::from_bytes(&bytes).unwrap_or_else(|e| panic!("{e}"))
}

/// Greedy generation of `n` tokens for `prompts` as one (left-padded) batch on a fresh session.
pub fn greedy(m: &kiln_runtime::Model, prompts: &[Vec<i64>], n: usize) -> Vec<Vec<i64>> {
    use kiln_runtime::{Decoder, Sampler, Sampling};
    m.session()
        .unwrap()
        .generate(prompts, n, &mut Sampler::new(Sampling::default()), None, &mut |_, _| {
            true
        })
        .unwrap_or_else(|e| panic!("generate: {e}"))
}
