//! kiln's planner, shared by every backend: a verified graph becomes a `Manifest` — fusion
//! groups (elementwise trees, reductions, softmax rows), GEMM epilogues, blocked attention, value
//! and weight layout — plus one [`plan::KernelSpec`] per generated kernel, which each backend
//! lowers its own way (`kiln-cpu` with Cranelift, `kiln-cuda` through MLIR). Neither backend
//! depends on the other.

mod attention;
mod gemm;
mod group;
pub mod plan;

use kiln_runtime::cpu::{Level, Vnni};
use kiln_runtime::plan::Manifest;

/// Why a graph could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// A parameter has no weight.
    #[error("no weight for parameter `{0}`")]
    MissingWeight(String),
    /// A weight does not fit its parameter.
    #[error("weight `{name}` is {got}, the graph expects {expected}")]
    BadWeight {
        /// Weight name.
        name: String,
        /// Declared type.
        expected: String,
        /// What was supplied.
        got: String,
    },
    /// The backend could not generate a kernel (Cranelift or MLIR).
    #[error("code generation failed: {0}")]
    Codegen(String),
    /// A bug in kiln.
    #[error("internal compiler error: {0}")]
    Internal(String),
    /// An IR dump (`--dump-ir`) could not be written.
    #[error("writing {path}: {source}")]
    Dump {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The artifact could not be written.
    #[error("{0}")]
    Write(#[from] kiln_runtime::LoadError),
}

/// How to compile.
#[derive(Clone, Debug)]
pub struct Options {
    /// Fuse elementwise chains, reductions, softmax and matmul epilogues into kernels. Without
    /// it every primitive op is its own step (the -O0 baseline).
    pub fuse: bool,
    /// The optimization level, recorded in the manifest.
    pub opt_level: String,
    /// A `tokenizer.json` to carry in the artifact.
    pub tokenizer: Option<String>,
    /// The CPU level to compile for (`--cpu`; default: the best this machine runs).
    pub cpu: Level,
    /// The integer dot-product extension quantized products may use (recorded as a feature).
    pub vnni: Vnni,
    /// Let prefill products with quantized weights quantize their activations (with VNNI).
    pub int8_prefill: bool,
    /// Fusion rules not to apply (`--disable-rule`), by name.
    pub disabled_rules: Vec<String>,
    /// Where `--dump-ir` writes the passes' graphs: the fused graph joins them (`10-fuse.txt`).
    pub dump_dir: Option<std::path::PathBuf>,
    /// Constants measured on this machine for the steps' estimates (`--report`); `None`: the
    /// target's fixed model. Fusion always extracts with the fixed model, so a plan never depends
    /// on how a machine's timings came out.
    pub measured_costs: Option<kiln_passes::cost::CostModel>,
}

impl Options {
    /// The options for `-O<level>`.
    pub fn for_level(level: u8) -> Options {
        Options {
            fuse: level > 0,
            opt_level: format!("O{level}"),
            tokenizer: None,
            cpu: Level::host(),
            vnni: Vnni::host(Level::host()),
            int8_prefill: false,
            disabled_rules: Vec::new(),
            dump_dir: None,
            measured_costs: None,
        }
    }
}

/// An artifact's pieces.
pub struct Compiled {
    /// The manifest.
    pub manifest: Manifest,
    /// The weight section.
    pub weights: Vec<u8>,
    /// The code section.
    pub code: Vec<u8>,
    /// What fusion did: the rules that fired and the fused ops extraction kept, by rule.
    pub fusion: kiln_passes::PassStats,
    /// The cost model's estimate of every manifest step, ns (symbolic dims at its extents).
    pub predicted: Vec<f64>,
}
