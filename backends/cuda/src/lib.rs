//! kiln's CUDA backend.
//!
//! The CUDA target uses the shared planner (`kiln_plan::plan`): the same fusion groups, GEMM
//! epilogues, attention steps and memory plan, so both targets run the same manifest steps and a
//! fusion decision is made once. What differs is the code: every fusion group becomes a `gpu.func`
//! (`emit::fused`), and a fixed set of kernels (`emit::fixed_kernels`: tiled GEMM for f32, int8
//! and int4 right operands, strided copy, gather) serves the other steps. The module is lowered
//! with MLIR (melior, feature `mlir`) to PTX for every architecture in [`ptx::ARCHS`], and the
//! artifact's code section holds those PTX modules. `kiln_runtime`'s `cuda` feature runs them.

pub mod emit;
#[cfg(feature = "mlir")]
pub mod ptx;

use std::collections::BTreeMap;

use kiln_ir::{Graph, Tensor};
use kiln_plan::{CompileError, Compiled, Options};
use kiln_runtime::plan::{Target, GPU_ARCH};

/// The GPU architectures a CUDA artifact carries PTX for.
pub const CHIPS: [&str; 2] = ["sm_80", "sm_90"];

/// A CUDA compilation: the artifact's pieces and the MLIR they came from.
pub struct CudaCompiled {
    /// Manifest, weights and PTX.
    pub compiled: Compiled,
    /// The MLIR module the PTX was lowered from.
    pub mlir: String,
}

/// Plans `graph` and emits its kernels as MLIR text, without lowering them.
pub fn plan_mlir(
    graph: &Graph,
    weights: &BTreeMap<String, Tensor>,
    dims: &[(String, u64)],
    opts: &Options,
) -> Result<(kiln_plan::plan::Planned, String), CompileError> {
    let target = Target {
        arch: GPU_ARCH.to_string(),
        features: CHIPS.iter().map(|c| c.to_string()).collect(),
        level: String::new(),
        int8_prefill: false,
    };
    let planned = kiln_plan::plan::plan(graph, weights, dims, target, opts)?;
    let mlir = emit::module(&planned.kernels, &planned.manifest.flash_kernels()).map_err(CompileError::Codegen)?;
    Ok((planned, mlir))
}

/// Compiles `graph` for CUDA GPUs: PTX for every architecture in [`CHIPS`].
#[cfg(feature = "mlir")]
pub fn compile(
    graph: &Graph,
    weights: &BTreeMap<String, Tensor>,
    dims: &[(String, u64)],
    opts: &Options,
) -> Result<CudaCompiled, CompileError> {
    let (planned, mlir) = plan_mlir(graph, weights, dims, opts)?;
    let toolkit = ptx::toolkit().map_err(CompileError::Codegen)?;
    let mut manifest = planned.manifest;
    manifest.tokenizer = opts.tokenizer.clone();
    let mut code = Vec::new();
    let mut modules = Vec::new();
    // Every architecture's module, then the sm_90a-only kernels (loaded beside sm_90's on a 9.0 GPU).
    let wgmma = emit::wgmma_module();
    let sources = ptx::ARCHS
        .iter()
        .map(|a| (*a, mlir.as_str()))
        .chain([(ptx::HOPPER_A, wgmma.as_str())]);
    for (arch, source) in sources {
        let text =
            ptx::to_ptx(source, arch, &toolkit).map_err(|e| CompileError::Codegen(format!("{}: {e}", arch.chip)))?;
        while code.len() % 16 != 0 {
            code.push(0);
        }
        let offset = code.len() as u64;
        code.extend_from_slice(text.as_bytes());
        code.push(0);
        modules.push(kiln_runtime::plan::GpuModule {
            arch: arch.chip.to_string(),
            offset,
            len: code.len() as u64 - offset,
        });
    }
    for k in &mut manifest.kernels {
        k.offset = 0;
        k.len = 0;
    }
    manifest.gpu = Some(kiln_runtime::plan::GpuCode { modules });
    Ok(CudaCompiled {
        compiled: Compiled {
            manifest,
            weights: planned.weights,
            code,
            fusion: planned.fusion,
            predicted: planned.predicted,
        },
        mlir,
    })
}

/// Without MLIR there is no PTX: says how to get it.
#[cfg(not(feature = "mlir"))]
pub fn compile(
    _graph: &Graph,
    _weights: &BTreeMap<String, Tensor>,
    _dims: &[(String, u64)],
    _opts: &Options,
) -> Result<CudaCompiled, CompileError> {
    Err(CompileError::Codegen(
        "this kiln was built without the CUDA backend's MLIR lowering: rebuild with `--features cuda` \
         (needs Debian's libmlir-22-dev and llvm-22-dev)"
            .into(),
    ))
}
