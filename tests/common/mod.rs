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
