//! The execution plan stored in an artifact's manifest.
//!
//! The compiler writes it; [`crate::Model::load`] validates every index in it before anything runs,
//! so the executor may index without further checks.

use kiln_ir::{DType, Literal, Op};
use serde::{Deserialize, Serialize};

/// A dim as a constant times a product of symbols (indices into [`Manifest::dims`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DimExpr {
    /// Constant factor.
    pub coeff: u64,
    /// Symbol indices.
    pub syms: Vec<u32>,
}

impl DimExpr {
    /// Evaluates under concrete symbol values (indexed like `Manifest::dims`).
    pub fn eval(&self, syms: &[usize]) -> usize {
        self.syms
            .iter()
            .fold(self.coeff as usize, |a, s| a.saturating_mul(syms[*s as usize]))
    }
}

/// What the CPU the code was generated for must have.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// `std::env::consts::ARCH` of the compiling machine, e.g. `x86_64`.
    pub arch: String,
    /// CPU features the code uses (`sse4.1`, `fma`, …): exactly those of `level`.
    pub features: Vec<String>,
    /// The CPU level the code was compiled for ([`crate::cpu::Level::name`]); empty in artifacts
    /// that predate levels, whose level is then read from `features`.
    #[serde(default)]
    pub level: String,
    /// Prefill products with quantized weights quantize their activations to int8 and use the
    /// VNNI feature `features` names (`kiln compile --int8-prefill`); otherwise only decode steps
    /// (at most 4 rows) do.
    #[serde(default)]
    pub int8_prefill: bool,
}

impl Target {
    /// The level the code was compiled for: the recorded one, or for artifacts that record none
    /// (or one this runtime does not know) the highest level whose features are all listed.
    pub fn level(&self) -> crate::cpu::Level {
        crate::cpu::Level::by_name(&self.level).unwrap_or_else(|| crate::cpu::Level::from_features(&self.features))
    }
}

/// Where a value's bytes live.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Storage {
    /// The caller's input number `n`.
    Input(u32),
    /// Read-only bytes in the artifact's weight section.
    Weight {
        /// Byte offset within the weight section.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// A buffer the runtime plans.
    Temp,
    /// The same bytes as another value, seen with another shape (a reshape).
    Alias(u32),
}

/// One tensor value of the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueDecl {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<DimExpr>,
    /// Where it lives.
    pub storage: Storage,
    /// The graph node name it came from.
    pub name: String,
}

/// A named input or output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    /// The name callers use.
    pub name: String,
    /// The value.
    pub value: u32,
    /// For an optional input: every element's value when the caller leaves it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Literal>,
}

/// A generated kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelDecl {
    /// Name (the fusion group's root node).
    pub name: String,
    /// Byte offset of its machine code within the code section.
    pub offset: u64,
    /// Byte length of its machine code.
    pub len: u64,
    /// Element types of the inputs it reads, in order.
    pub inputs: Vec<DType>,
    /// Element type it writes.
    pub output: DType,
    /// Primitive ops fused into it.
    pub ops: u32,
    /// Its expressions, where the runtime can evaluate them at full vector width (one-input
    /// Map kernels; `vmap.rs`).
    #[serde(default)]
    pub tape: Option<Vec<crate::vmap::TapeOp>>,
}

/// How a generated kernel walks its iteration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KernelKind {
    /// One output element per iteration element.
    Map,
    /// One output element per row: the last axis is reduced.
    ReduceLast,
    /// Softmax along the last axis of the kernel's expression: one output element per element.
    SoftmaxLast,
}

/// `heads × head_dim` columns starting at `offset` of each row of a `[b, s, W]` value, seen as a
/// `[b, heads, s, head_dim]` attention operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnView {
    /// First column.
    pub offset: u64,
    /// Heads.
    pub heads: u64,
    /// Columns per head.
    pub head_dim: u64,
}

fn unit_block() -> [u64; 2] {
    [1, 1]
}

/// One step of the plan, run in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Step {
    /// A generated kernel. `inputs` are broadcast to `space` (the output for `Map`, the reduced
    /// input for `ReduceLast`); `contiguous[i]` says whether input `i` advances along the last axis
    /// (otherwise it is broadcast along it), as the code was generated.
    Kernel {
        /// Index into [`Manifest::kernels`].
        kernel: u32,
        /// Iteration pattern.
        kind: KernelKind,
        /// Values read.
        inputs: Vec<u32>,
        /// Per input: strided along the last axis (`true`) or broadcast (`false`).
        contiguous: Vec<bool>,
        /// Value written.
        out: u32,
        /// Shape iterated.
        space: Vec<DimExpr>,
    },
    /// Batched f32 matrix product with numpy broadcasting, and a fused epilogue:
    /// `out = acc + bias + scale * (a @ b)`.
    MatMul {
        /// Left operand.
        a: u32,
        /// Right operand.
        b: u32,
        /// Result.
        out: u32,
        /// Transpose the left operand.
        ta: bool,
        /// Transpose the right operand.
        tb: bool,
        /// Multiplies the product.
        scale: f32,
        /// A `[n]` vector added to every row.
        bias: Option<u32>,
        /// A tensor of the result's shape added to it (a residual connection).
        acc: Option<u32>,
    },
    /// A product by a weight packed at compile time for a microkernel: `out = scale · (a @ B) +
    /// bias + acc`, `a [.., m, k]` row-major, `B [k, n]` stored as `w` — the kernel's panels,
    /// `[⌈n / nr⌉, k, nr]` (see `kiln_runtime::gemm`).
    PackedMatMul {
        /// Left operand `[.., m, k]`.
        a: u32,
        /// The packed weight `[panels, k, nr]`.
        w: u32,
        /// The microkernel it was packed for (`gemm::REGISTRY`).
        kernel: String,
        /// Result `[.., m, n]`.
        out: u32,
        /// Multiplies the product.
        scale: f32,
        /// A `[n]` vector added to every row.
        bias: Option<u32>,
        /// A tensor of the result's shape added to it.
        acc: Option<u32>,
        /// A generated one-input elementwise kernel applied in place to each block of the result
        /// while it is in cache (an activation): the value it computed is an alias of `out`.
        #[serde(default)]
        post: Option<u32>,
    },
    /// A product with a quantized right operand (`Dequantize` fused in): `out = acc + bias + scale *
    /// (a @ wᵀ)`, `w [n, k]` dequantized on the fly from `codes` and `scales` (and `mins` for 4 bits),
    /// never stored in f32.
    QMatMul {
        /// Left operand `[.., m, k]`, f32.
        a: u32,
        /// Codes: i8 `[n, k]` (8 bits) or packed u8 `[n, k/2]` (4 bits).
        codes: u32,
        /// `[n, k / group]` scales.
        scales: u32,
        /// `[n, k / group]` minimums (4 bits).
        mins: Option<u32>,
        /// Bits per code.
        bits: u8,
        /// Columns per scale.
        group: u64,
        /// Result `[.., m, n]`.
        out: u32,
        /// Multiplies the product.
        scale: f32,
        /// A `[n]` vector added to every row.
        bias: Option<u32>,
        /// A tensor of the result's shape added to it.
        acc: Option<u32>,
    },
    /// A product with a CSR weight (`Densify` fused in): `out = acc + bias + scale * (a @ wᵀ)`;
    /// at most `sparse_rows` rows of `a` read the nonzeros directly, more densify tiles for the GEMM.
    SpMatMul {
        /// Left operand `[.., m, k]`, f32.
        a: u32,
        /// i32 `[n + 1]` row offsets.
        row_ptr: u32,
        /// i32 `[nnz]` columns.
        cols: u32,
        /// f32 `[nnz]` values.
        vals: u32,
        /// Result `[.., m, n]`.
        out: u32,
        /// Break-even rows.
        sparse_rows: u64,
        /// Block height and width of the block-CSR weight (`[1, 1]`: plain CSR).
        #[serde(default = "unit_block")]
        block: [u64; 2],
        /// Multiplies the product.
        scale: f32,
        /// A `[n]` vector added to every row.
        bias: Option<u32>,
        /// A tensor of the result's shape added to it.
        acc: Option<u32>,
    },
    /// A product with a packed 2:4 weight (`Densify24` fused in): `out = acc + bias + scale * (a @
    /// wᵀ)`; at most `sparse_rows` rows of `a` read the packed values directly, more unpack tiles
    /// for the GEMM.
    SpMatMul24 {
        /// Left operand `[.., m, k]`, f32.
        a: u32,
        /// f32 `[n, k/2]` kept values.
        vals: u32,
        /// u8 `[n, k/4]` kept offsets per group of four columns.
        idx: u32,
        /// Result `[.., m, n]`.
        out: u32,
        /// Break-even rows.
        sparse_rows: u64,
        /// Multiplies the product.
        scale: f32,
        /// A `[n]` vector added to every row.
        bias: Option<u32>,
        /// A tensor of the result's shape added to it.
        acc: Option<u32>,
    },
    /// Rows of a table picked by integer ids.
    Gather {
        /// Table.
        table: u32,
        /// Indices.
        idx: u32,
        /// Result.
        out: u32,
        /// Table axis indexed.
        axis: u32,
    },
    /// Axis permutation.
    Transpose {
        /// Source.
        x: u32,
        /// Result.
        out: u32,
        /// Output axis `i` is input axis `perm[i]`.
        perm: Vec<u32>,
    },
    /// A sub-range of one axis.
    Slice {
        /// Source.
        x: u32,
        /// Result.
        out: u32,
        /// Axis.
        axis: u32,
        /// First index.
        start: u64,
    },
    /// Concatenation along an axis.
    Concat {
        /// Sources.
        xs: Vec<u32>,
        /// Result.
        out: u32,
        /// Axis.
        axis: u32,
    },
    /// numpy broadcast, materialised.
    Broadcast {
        /// Source.
        x: u32,
        /// Result.
        out: u32,
    },
    /// Attention without materialising the score matrix: per batch and head, blocks of query
    /// rows get `scale * q kᵀ` (GEMM into a cache-sized buffer), the softmax kernel (whose input
    /// `None` is that score block and `Some(v)` a value broadcast to `[b, h, sq, sk]`, such as a
    /// mask bias), and `@ v` (GEMM into the output rows).
    Attention {
        /// Queries `[b, h, sq, d]`.
        q: u32,
        /// Keys `[b, h, sk, d]`.
        k: u32,
        /// Values `[b, h, sk, dv]`.
        v: u32,
        /// Result `[b, h, sq, dv]`.
        out: u32,
        /// Multiplies the scores.
        scale: f32,
        /// The softmax kernel (kind `SoftmaxLast`).
        kernel: u32,
        /// The same kernel's elementwise prologue alone (kind `Map`: the logits the softmax
        /// normalises), for runtimes that run the softmax themselves, online over key blocks.
        #[serde(default)]
        logits: Option<u32>,
        /// The kernel's inputs: `None` for the score block, `Some(value)` otherwise.
        kernel_inputs: Vec<Option<u32>>,
        /// Per kernel input: contiguous along the key axis (`true`) or one value per row.
        contiguous: Vec<bool>,
        /// For q, k, v and out: stored `[b, s, h, d]` (the head split's transpose folded in)
        /// instead of `[b, h, s, d]`.
        seq_major: [bool; 4],
        /// For q, k and v: read as columns of a wider `[b, s, W]` value (a merged projection).
        views: [Option<ColumnView>; 3],
        /// For k and v: read in place from the key/value cache (`[b, h, capacity, d]`).
        #[serde(default)]
        cached: [bool; 2],
    },
    /// Appends `x [b, h, t, d]` to the session's key/value cache `slot` and writes the cache's
    /// first `len` entries (`out [b, h, len, d]`). Only runs inside a decoding session.
    CacheAppend {
        /// The new entries.
        x: u32,
        /// Every entry, old and new.
        out: u32,
        /// Cache slot.
        slot: u32,
        /// `out` is the cache itself (`[b, h, capacity, d]`, the first `len` rows of each head
        /// valid): the only reader is an attention step that reads it in place.
        #[serde(default)]
        view: bool,
    },
    /// Any other op, run by the reference interpreter's evaluator (small tensors only: index and
    /// mask arithmetic, rotary tables).
    Fallback {
        /// The op.
        op: Op,
        /// Operands.
        inputs: Vec<u32>,
        /// Result.
        out: u32,
    },
}

impl Step {
    /// The value the step writes.
    pub fn out(&self) -> u32 {
        match self {
            Step::Kernel { out, .. }
            | Step::MatMul { out, .. }
            | Step::PackedMatMul { out, .. }
            | Step::QMatMul { out, .. }
            | Step::SpMatMul { out, .. }
            | Step::SpMatMul24 { out, .. }
            | Step::Gather { out, .. }
            | Step::Transpose { out, .. }
            | Step::Slice { out, .. }
            | Step::Concat { out, .. }
            | Step::Broadcast { out, .. }
            | Step::Fallback { out, .. }
            | Step::CacheAppend { out, .. }
            | Step::Attention { out, .. } => *out,
        }
    }

    /// The values the step reads.
    pub fn inputs(&self) -> Vec<u32> {
        match self {
            Step::Kernel { inputs, .. } | Step::Fallback { inputs, .. } => inputs.clone(),
            Step::MatMul { a, b, bias, acc, .. } | Step::PackedMatMul { a, w: b, bias, acc, .. } => {
                [*a, *b].into_iter().chain(*bias).chain(*acc).collect()
            }
            Step::QMatMul {
                a,
                codes,
                scales,
                mins,
                bias,
                acc,
                ..
            } => [*a, *codes, *scales]
                .into_iter()
                .chain(*mins)
                .chain(*bias)
                .chain(*acc)
                .collect(),
            Step::SpMatMul {
                a,
                row_ptr,
                cols,
                vals,
                bias,
                acc,
                ..
            } => [*a, *row_ptr, *cols, *vals]
                .into_iter()
                .chain(*bias)
                .chain(*acc)
                .collect(),
            Step::SpMatMul24 {
                a,
                vals,
                idx,
                bias,
                acc,
                ..
            } => [*a, *vals, *idx].into_iter().chain(*bias).chain(*acc).collect(),
            Step::Gather { table, idx, .. } => vec![*table, *idx],
            Step::Transpose { x, .. }
            | Step::Slice { x, .. }
            | Step::Broadcast { x, .. }
            | Step::CacheAppend { x, .. } => {
                vec![*x]
            }
            Step::Concat { xs, .. } => xs.clone(),
            Step::Attention {
                q, k, v, kernel_inputs, ..
            } => [*q, *k, *v]
                .into_iter()
                .chain(kernel_inputs.iter().flatten().copied())
                .collect(),
        }
    }
}

impl Step {
    /// For an attention step: its softmax kernel and which of that kernel's inputs is the score
    /// block — what the CUDA target's fused attention kernel [`flash_kernel`] is made of.
    pub fn flash(&self) -> Option<(u32, usize)> {
        match self {
            Step::Attention {
                kernel, kernel_inputs, ..
            } => kernel_inputs.iter().position(|i| i.is_none()).map(|j| (*kernel, j)),
            _ => None,
        }
    }
}

/// The CUDA entry point of the fused attention over softmax kernel `kernel` whose input `score`
/// is the score block.
pub fn flash_kernel(kernel: u32, score: usize) -> String {
    format!("fa{kernel}_{score}")
}

/// The tensor-core variant of [`flash_kernel`] for head dimension `dim` (`d = dv`).
pub fn flash_tc_kernel(kernel: u32, score: usize, dim: i64) -> String {
    format!("fa{kernel}_{score}_tc{dim}")
}

/// Everything about an artifact except its bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Model name.
    pub name: String,
    /// Required CPU.
    pub target: Target,
    /// Symbolic dims with their upper bounds.
    pub dims: Vec<(String, u64)>,
    /// Inputs, in declaration order.
    pub inputs: Vec<Port>,
    /// Outputs, in declaration order.
    pub outputs: Vec<Port>,
    /// All values.
    pub values: Vec<ValueDecl>,
    /// Generated kernels.
    pub kernels: Vec<KernelDecl>,
    /// The program.
    pub steps: Vec<Step>,
    /// Optimization level it was compiled at, for reports.
    pub opt_level: String,
    /// A Hugging Face `tokenizer.json` carried for text generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// For a CUDA artifact (target arch [`GPU_ARCH`]): the PTX modules in the code section. The
    /// kernels then have no code of their own: kernel `i` is the PTX entry `k{i}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuCode>,
}

impl Manifest {
    /// The fused attention kernels a CUDA artifact carries: one per distinct [`Step::flash`].
    pub fn flash_kernels(&self) -> Vec<(u32, usize)> {
        let mut v: Vec<(u32, usize)> = self.steps.iter().filter_map(Step::flash).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// The plan-independent kernels every CUDA artifact carries (`kiln_cuda::emit` writes them).
pub const GPU_FIXED_KERNELS: [&str; 29] = [
    "gemm_f32",
    "gemm_i8",
    "gemm_i4",
    "gemm_tc_f32",
    "gemm_tc_i8",
    "gemm_tc_i4",
    "gemm_bf16",
    "to_bf16",
    "gemv_f32",
    "gemv_i8",
    "gemv_i4",
    "gemv_cols_f32",
    "reduce_axis_sum",
    "reduce_axis_max",
    "reduce_axis_min",
    "unary_sin_f32",
    "unary_cos_f32",
    "copy_i8",
    "copy_i16",
    "copy_i32",
    "copy_i64",
    "gather_i8_i32",
    "gather_i8_i64",
    "gather_i16_i32",
    "gather_i16_i64",
    "gather_i32_i32",
    "gather_i32_i64",
    "gather_i64_i32",
    "gather_i64_i64",
];

/// The `Target::arch` of CUDA artifacts.
pub const GPU_ARCH: &str = "nvptx64";

/// The PTX of a CUDA artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuCode {
    /// One module per GPU architecture, each holding every kernel of the plan and the fixed ones.
    pub modules: Vec<GpuModule>,
}

/// One PTX module: NUL-terminated text at `offset..offset + len` of the code section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuModule {
    /// `sm_80`, `sm_90`, …
    pub arch: String,
    /// Byte offset in the code section.
    pub offset: u64,
    /// Byte length, the terminating NUL included.
    pub len: u64,
}
