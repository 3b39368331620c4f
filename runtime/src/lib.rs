//! kiln's runtime: loads a compiled artifact and runs it.
//!
//! ```no_run
//! # use std::collections::BTreeMap;
//! let model = kiln_runtime::Model::load("minilm.kiln".as_ref())?;
//! let mut inputs = BTreeMap::new();
//! inputs.insert("input_ids".to_string(), kiln_runtime::npy::read("ids.npy")?);
//! let outputs = model.run(&inputs)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Architecture invariant: this crate depends on `kiln-ir` (types) and `kiln-interp` (the
//! evaluator for the few small ops with no kernel) only — never on the frontend, the optimizer or
//! a code generator. Loading copies the artifact's machine code into executable memory; it never
//! compiles anything.

mod arena;
pub mod artifact;
mod attention;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod exec;
pub mod gemm;
mod igemm;
mod input;
mod kernels;
pub mod measure;
pub mod moe;
pub mod npy;
pub mod plan;
pub mod pool;
mod q8;
mod reads;
mod reduce;
pub mod session;
pub mod softmax;
mod validate;
pub mod vmap;

pub use exec::{step_kind, Model, Profile, RunStats};
pub use input::{InputTensor, TensorRef};
pub use kernels::{measure_sparse, measure_sparse24};
pub use kiln_ir::{DType, Tensor};
pub use session::{Decoder, Feed, KvCache, Sampler, Sampling, Session};

/// Why an artifact could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid artifact.
    #[error("invalid kiln artifact: {0}")]
    Corrupt(String),
    /// The artifact has a format version this runtime does not read.
    #[error("artifact format version {found}, but this runtime reads version {supported}; recompile the model with this kiln")]
    Version {
        /// Version in the file.
        found: u32,
        /// Version this runtime reads.
        supported: u32,
    },
    /// The GPU or its driver cannot run the artifact.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// The artifact was compiled for another machine.
    #[error("artifact was compiled for {wanted}, but this machine is {have}; recompile it here")]
    Target {
        /// What the artifact needs.
        wanted: String,
        /// What this machine has.
        have: String,
    },
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A required input is missing.
    #[error("missing input `{0}`")]
    MissingInput(String),
    /// An input the model does not have.
    #[error("unknown input `{name}` (the model's inputs are: {expected})")]
    UnknownInput {
        /// The name given.
        name: String,
        /// The model's inputs.
        expected: String,
    },
    /// An input does not fit the declared type or the compiled bounds.
    #[error("input `{name}`: {msg}")]
    BadInput {
        /// The input.
        name: String,
        /// What does not fit.
        msg: String,
    },
    /// A step failed (for example an embedding index out of range).
    #[error("step {step} (`{node}`): {msg}")]
    Step {
        /// Step number.
        step: usize,
        /// The graph node it computes.
        node: String,
        /// What went wrong.
        msg: String,
    },
}
