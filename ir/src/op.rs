//! The closed set of primitive operations and their type rules.
//!
//! Softmax, LayerNorm, RMSNorm, GELU and attention are *not* primitives: the frontend lowers them
//! to these ops, and the optimizer recognises and fuses the patterns (see ARCHITECTURE.md).

use std::fmt;

use crate::fused::Fused;
use crate::moe::{ExpertAct, Gating};
use crate::{DType, Dim, Shape, TensorType};

/// The block of plain CSR (`Op::Densify` of artifacts written before blocks existed).
fn unit_block() -> [u64; 2] {
    [1, 1]
}

/// A scalar constant. Floats are stored as bits so that ops can be compared and hashed exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Literal {
    /// A floating-point value, as the bits of an `f64`.
    Float(u64),
    /// An integer value.
    Int(i64),
    /// A boolean value.
    Bool(bool),
}

impl Literal {
    /// A float literal.
    pub fn float(v: f64) -> Literal {
        Literal::Float(v.to_bits())
    }

    /// Whether the literal is a `dtype` value as written: integers fit integer types whose range
    /// holds them and float types that hold them exactly; floats fit float types; booleans fit
    /// `bool`.
    pub fn fits(self, dtype: DType) -> bool {
        match self {
            Literal::Int(i) => match dtype {
                DType::I64 => true,
                DType::I32 => i32::try_from(i).is_ok(),
                DType::I8 => i8::try_from(i).is_ok(),
                DType::U8 => u8::try_from(i).is_ok(),
                DType::Bool => false,
                DType::F32 => i.unsigned_abs() <= 1 << 24,
                DType::F16 => i.unsigned_abs() <= 1 << 11,
                DType::BF16 => i.unsigned_abs() <= 1 << 8,
            },
            Literal::Float(_) => dtype.is_float(),
            Literal::Bool(_) => dtype == DType::Bool,
        }
    }

    /// The value as an `f64` (booleans as 0 or 1).
    pub fn as_f64(self) -> f64 {
        match self {
            Literal::Float(b) => f64::from_bits(b),
            Literal::Int(i) => i as f64,
            Literal::Bool(b) => b as u8 as f64,
        }
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Literal::Float(b) => {
                let v = f64::from_bits(b);
                if v.is_finite() && v == v.trunc() && v.abs() < 1e15 {
                    write!(f, "{v:.1}")
                } else {
                    write!(f, "{v:e}")
                }
            }
            Literal::Int(i) => write!(f, "{i}"),
            Literal::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// Elementwise binary arithmetic, with numpy broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum BinaryOp {
    /// `a + b`
    Add,
    /// `a - b`
    Sub,
    /// `a * b`
    Mul,
    /// `a / b`
    Div,
    /// `max(a, b)`
    Max,
    /// `min(a, b)`
    Min,
    /// `a ^ b`
    Pow,
}

/// Elementwise comparison, with numpy broadcasting; the result is `bool`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum CmpOp {
    /// `a == b`
    Eq,
    /// `a != b`
    Ne,
    /// `a < b`
    Lt,
    /// `a <= b`
    Le,
    /// `a > b`
    Gt,
    /// `a >= b`
    Ge,
}

/// Elementwise unary function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum UnaryOp {
    /// `-x`
    Neg,
    /// `|x|`
    Abs,
    /// `e^x`
    Exp,
    /// natural logarithm
    Log,
    /// square root
    Sqrt,
    /// `1 / sqrt(x)`
    Rsqrt,
    /// hyperbolic tangent
    Tanh,
    /// the Gauss error function
    Erf,
    /// `1 / (1 + e^-x)`
    Sigmoid,
    /// `max(x, 0)`
    Relu,
    /// `1 / x`
    Recip,
    /// sine
    Sin,
    /// cosine
    Cos,
    /// logical not (bool only)
    Not,
}

/// Reduction over a set of axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ReduceOp {
    /// Sum.
    Sum,
    /// Arithmetic mean.
    Mean,
    /// Maximum.
    Max,
    /// Minimum.
    Min,
}

/// A primitive operation. Operand order is part of each variant's contract.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Op {
    /// A named graph input (no operands). The type is declared by the graph.
    Input {
        /// Name the caller binds a tensor to.
        name: String,
        /// Declared type.
        ty: TensorType,
        /// The value of every element when the caller leaves the input out (an optional input,
        /// such as an attention mask of ones); `None`: the input is required.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        default: Option<Literal>,
    },
    /// A named weight (no operands), bound from a checkpoint.
    Param {
        /// Checkpoint name, e.g. `encoder.layer.0.attention.self.query.weight`.
        name: String,
        /// Declared type; parameters always have fully known shapes.
        ty: TensorType,
    },
    /// A rank-0 constant (no operands).
    Scalar {
        /// The value.
        value: Literal,
        /// Its dtype.
        dtype: DType,
    },
    /// `[0, 1, …, len-1]` as a rank-1 tensor (no operands); positions and masks are built from it.
    Iota {
        /// Length, possibly symbolic.
        len: Dim,
        /// Element type (integer or float).
        dtype: DType,
    },
    /// Batched matrix product `a @ b` with numpy `matmul` broadcasting over leading axes.
    /// Operands: `a [.., m, k]` (or `[.., k, m]` if `transpose_a`), `b [.., k, n]` (or
    /// `[.., n, k]` if `transpose_b`). Both operands have rank ≥ 2.
    MatMul {
        /// Use `a`'s last two axes swapped.
        transpose_a: bool,
        /// Use `b`'s last two axes swapped.
        transpose_b: bool,
    },
    /// Elementwise arithmetic on two broadcast-compatible operands of one dtype.
    Binary(BinaryOp),
    /// Elementwise comparison of two broadcast-compatible operands of one dtype.
    Compare(CmpOp),
    /// `where(cond, a, b)`: operands `cond: bool`, `a`, `b` of one dtype, all broadcast together.
    Where,
    /// Elementwise unary function.
    Unary(UnaryOp),
    /// Reduction over `axes` (sorted, unique).
    Reduce {
        /// Which reduction.
        op: ReduceOp,
        /// Axes reduced.
        axes: Vec<usize>,
        /// Keep reduced axes as extent 1.
        keep_dims: bool,
    },
    /// Same elements in row-major order, new shape with the same element count.
    Reshape {
        /// Target shape.
        shape: Shape,
    },
    /// Axis permutation: output axis `i` is input axis `perm[i]`.
    Transpose {
        /// The permutation.
        perm: Vec<usize>,
    },
    /// numpy `broadcast_to`: extents of 1 stretch, new leading axes are added.
    Broadcast {
        /// Target shape.
        shape: Shape,
    },
    /// Elements `start..end` along `axis` (constant bounds).
    Slice {
        /// Axis sliced.
        axis: usize,
        /// First index kept.
        start: u64,
        /// One past the last index kept.
        end: u64,
    },
    /// Concatenation of all operands (at least one) along `axis`; the axis must be of known extent.
    Concat {
        /// Axis joined.
        axis: usize,
    },
    /// `table` indexed along `axis` by integer `indices`: output shape is
    /// `table[..axis] ++ indices ++ table[axis+1..]`. Operands: `table`, `indices`.
    Gather {
        /// Axis of the table that is indexed.
        axis: usize,
    },
    /// Elementwise conversion to another dtype.
    Cast {
        /// Target dtype.
        to: DType,
    },
    /// Weight-only dequantization, `[n, k]` f32 from quantized codes (the backends fuse it into
    /// the matrix product that reads it, so the f32 matrix never exists at run time).
    /// `bits: 8`: operands `q: i8 [n, k]`, `scale: f32 [n, k / group]`; `w = q · scale`.
    /// `bits: 4`: operands `q: u8 [n, k / 2]`, `scale`, `min`: float `[n, k / group]`;
    /// `w = code · scale + min`, codes 0..=15 packed two per byte in blocks of 32 columns: byte
    /// `i` of a block holds column `i` in its low nibble and column `i + 16` in its high nibble.
    Dequantize {
        /// Bits per code (8 or 4).
        bits: u8,
        /// Columns sharing one scale (a multiple of 32 for 4 bits).
        group: u64,
    },
    /// A sparse weight in block-CSR form, as the dense `[n, k]` f32 matrix it stands for (backends
    /// fuse it into the product that reads it). With blocks of `block = [br, bc]` (`[1, 1]`: plain
    /// CSR), operands are `row_ptr: i32 [n / br + 1]`, `cols: i32 [nb]` (block columns, in units
    /// of `bc`) and `vals: f32 [nb · br · bc]`; block row `R` holds blocks
    /// `row_ptr[R]..row_ptr[R + 1]`, and element `(i, j)` of block `p` is `vals[p·br·bc + j·br + i]`
    /// (each block stored column by column, so a kernel reads `br` outputs' weights for one input
    /// column at once).
    Densify {
        /// Rows.
        n: u64,
        /// Columns.
        k: u64,
        /// Products with at most this many rows of activations read the CSR form directly; more
        /// rows densify it a tile at a time (the break-even the compiler measured).
        sparse_rows: u64,
        /// Block height and width.
        #[serde(default = "unit_block")]
        block: [u64; 2],
    },
    /// A 2:4-sparse weight, packed, as the dense `[n, k]` f32 matrix it stands for (backends fuse it
    /// into the product that reads it). Operands: `vals: f32 [n, k/2]` (the two kept values of
    /// every group of four columns, in column order) and `idx: u8 [n, k/4]` (per group, the kept
    /// columns' offsets within it: `first | second << 2`, `first < second`).
    Densify24 {
        /// Rows.
        n: u64,
        /// Columns (a multiple of 4).
        k: u64,
        /// Products with at most this many rows of activations read the packed form directly; more
        /// rows unpack it a tile at a time.
        sparse_rows: u64,
    },
    /// A key/value cache (the one stateful op): appends its operand `[b, h, t, d]` to cache slot
    /// `slot` after the `len - t` entries it already holds, and returns all `len` entries,
    /// `[b, h, len, d]`. The runtime owns the cache and binds `len` (a symbolic dim) to the number
    /// of cached positions after the append.
    CacheAppend {
        /// Which cache (one per layer for keys, one for values).
        slot: u32,
        /// Entries held after the append.
        len: Dim,
    },
    /// A mixture of experts (see `moe.rs`): operands `x [.., d]`, router `logits [.., E]`, then
    /// per expert its weights `gate [f, d]`, `up [f, d]`, `down [d, f]`; result `[.., d]`. Row `r` goes to the `top_k` experts with the highest scores (`gating` of its
    /// logits; ties to the lower index), weighted by those scores (divided by their sum when
    /// `renormalize`): `out[r] = Σ wₑ · downₑ(act(gateₑ·x[r]) ⊙ upₑ·x[r])`.
    Moe {
        /// Experts.
        experts: u32,
        /// Experts per row.
        top_k: u32,
        /// Scores from logits.
        gating: Gating,
        /// Divide the chosen scores by their sum.
        renormalize: bool,
        /// The gate projection's activation.
        act: ExpertAct,
    },
    /// A fused kernel made by a fusion rule: its body over its operands (see [`Fused`]).
    Fused(Box<Fused>),
}

/// Why an op cannot be applied to operands of the given types.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TypeError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, TypeError> {
    Err(TypeError(msg.into()))
}

fn fmt_shape(s: &[Dim]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// numpy broadcasting of several shapes.
pub(crate) fn broadcast_shapes(shapes: &[&Shape]) -> Result<Shape, TypeError> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let mut d = Dim::known(1);
        for s in shapes {
            let Some(off) = (i + s.len()).checked_sub(rank) else {
                continue;
            };
            let e = &s[off];
            if e.is_one() {
                continue;
            }
            if d.is_one() {
                d = e.clone();
            } else if *e != d {
                let all: Vec<String> = shapes.iter().map(|s| fmt_shape(s)).collect();
                return err(format!(
                    "shapes {} do not broadcast (axis {i}: {d} vs {e})",
                    all.join(" and ")
                ));
            }
        }
        out.push(d);
    }
    Ok(out)
}

impl Op {
    /// A required graph input (no default): the caller must bind it.
    pub fn input(name: impl Into<String>, ty: TensorType) -> Op {
        Op::Input {
            name: name.into(),
            ty,
            default: None,
        }
    }
}

impl Op {
    /// Number of operands the op takes, or `None` for variadic ops (`Concat`).
    pub fn arity(&self) -> Option<usize> {
        Some(match self {
            Op::Input { .. } | Op::Param { .. } | Op::Scalar { .. } | Op::Iota { .. } => 0,
            Op::MatMul { .. } | Op::Binary(_) | Op::Compare(_) | Op::Gather { .. } => 2,
            Op::Where => 3,
            Op::Unary(_)
            | Op::Reduce { .. }
            | Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::Broadcast { .. }
            | Op::Slice { .. }
            | Op::Cast { .. }
            | Op::CacheAppend { .. } => 1,
            Op::Densify { .. } => 3,
            Op::Densify24 { .. } => 2,
            Op::Moe { experts, .. } => 2 + 3 * *experts as usize,
            Op::Dequantize { bits, .. } => {
                if *bits == 4 {
                    3
                } else {
                    2
                }
            }
            Op::Concat { .. } => return None,
            Op::Fused(f) => f.operands as usize,
        })
    }

    /// A short lower-case mnemonic, used by the text form.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Scalar { .. } => "scalar",
            Op::Iota { .. } => "iota",
            Op::MatMul { .. } => "matmul",
            Op::Binary(b) => match b {
                BinaryOp::Add => "add",
                BinaryOp::Sub => "sub",
                BinaryOp::Mul => "mul",
                BinaryOp::Div => "div",
                BinaryOp::Max => "max",
                BinaryOp::Min => "min",
                BinaryOp::Pow => "pow",
            },
            Op::Compare(c) => match c {
                CmpOp::Eq => "eq",
                CmpOp::Ne => "ne",
                CmpOp::Lt => "lt",
                CmpOp::Le => "le",
                CmpOp::Gt => "gt",
                CmpOp::Ge => "ge",
            },
            Op::Where => "where",
            Op::Unary(u) => match u {
                UnaryOp::Neg => "neg",
                UnaryOp::Abs => "abs",
                UnaryOp::Exp => "exp",
                UnaryOp::Log => "log",
                UnaryOp::Sqrt => "sqrt",
                UnaryOp::Rsqrt => "rsqrt",
                UnaryOp::Tanh => "tanh",
                UnaryOp::Erf => "erf",
                UnaryOp::Sigmoid => "sigmoid",
                UnaryOp::Relu => "relu",
                UnaryOp::Recip => "recip",
                UnaryOp::Sin => "sin",
                UnaryOp::Cos => "cos",
                UnaryOp::Not => "not",
            },
            Op::Reduce { op, .. } => match op {
                ReduceOp::Sum => "reduce_sum",
                ReduceOp::Mean => "reduce_mean",
                ReduceOp::Max => "reduce_max",
                ReduceOp::Min => "reduce_min",
            },
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Broadcast { .. } => "broadcast",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Gather { .. } => "gather",
            Op::CacheAppend { .. } => "cache_append",
            Op::Dequantize { .. } => "dequantize",
            Op::Densify { .. } => "densify",
            Op::Densify24 { .. } => "densify_2_4",
            Op::Cast { .. } => "cast",
            Op::Moe { .. } => "moe",
            Op::Fused(_) => "fused",
        }
    }

    /// The op's attributes in the text form (`axes=[2] keep_dims`), empty if it has none.
    pub fn attrs(&self) -> String {
        match self {
            Op::Input { name, .. } | Op::Param { name, .. } => format!("{name:?}"),
            Op::Scalar { value, dtype } => format!("{value}:{dtype}"),
            Op::Iota { len, dtype } => format!("len={len} {dtype}"),
            Op::MatMul {
                transpose_a,
                transpose_b,
            } => {
                let mut s = Vec::new();
                if *transpose_a {
                    s.push("ta");
                }
                if *transpose_b {
                    s.push("tb");
                }
                s.join(" ")
            }
            Op::Reduce { axes, keep_dims, .. } => {
                format!("axes={axes:?}{}", if *keep_dims { " keep_dims" } else { "" })
            }
            Op::Reshape { shape } | Op::Broadcast { shape } => fmt_shape(shape),
            Op::Transpose { perm } => format!("perm={perm:?}"),
            Op::Slice { axis, start, end } => format!("axis={axis} {start}..{end}"),
            Op::Concat { axis } | Op::Gather { axis } => format!("axis={axis}"),
            Op::CacheAppend { slot, len } => format!("slot={slot} len={len}"),
            Op::Dequantize { bits, group } => format!("bits={bits} group={group}"),
            Op::Densify {
                n,
                k,
                sparse_rows,
                block: [1, 1],
            }
            | Op::Densify24 { n, k, sparse_rows } => format!("n={n} k={k} sparse_rows={sparse_rows}"),
            Op::Densify {
                n,
                k,
                sparse_rows,
                block: [r, c],
            } => format!("n={n} k={k} sparse_rows={sparse_rows} block={r}x{c}"),
            Op::Cast { to } => format!("to={to}"),
            Op::Moe {
                experts,
                top_k,
                gating,
                renormalize,
                act,
            } => format!(
                "experts={experts} top_k={top_k} {gating}{} act={}",
                if *renormalize { " renormalize" } else { "" },
                act.name()
            ),
            Op::Fused(f) => f.attrs(),
            Op::Binary(_) | Op::Compare(_) | Op::Where | Op::Unary(_) => String::new(),
        }
    }

    /// Computes the output type from the operand types, or explains why they do not fit.
    pub fn infer(&self, args: &[&TensorType]) -> Result<TensorType, TypeError> {
        if let Some(n) = self.arity() {
            if args.len() != n {
                return err(format!("{} takes {n} operand(s), got {}", self.mnemonic(), args.len()));
            }
        } else if args.is_empty() {
            return err(format!("{} takes at least one operand", self.mnemonic()));
        }
        match self {
            Op::Input { ty, .. } | Op::Param { ty, .. } => Ok(ty.clone()),
            Op::Scalar { value, dtype } => {
                let ok = match value {
                    Literal::Float(_) => dtype.is_float(),
                    Literal::Int(_) => dtype.is_int() || dtype.is_float(),
                    Literal::Bool(_) => *dtype == DType::Bool,
                };
                if !ok {
                    return err(format!("literal {value} cannot have dtype {dtype}"));
                }
                Ok(TensorType::new(*dtype, vec![]))
            }
            Op::Iota { len, dtype } => {
                if !(dtype.is_int() || dtype.is_float()) {
                    return err(format!("iota needs a numeric dtype, got {dtype}"));
                }
                Ok(TensorType::new(*dtype, vec![len.clone()]))
            }
            Op::MatMul {
                transpose_a,
                transpose_b,
            } => {
                let (a, b) = (args[0], args[1]);
                if a.dtype != b.dtype || !a.dtype.is_float() {
                    return err(format!("matmul needs two float operands of one dtype, got {a} and {b}"));
                }
                if a.rank() < 2 || b.rank() < 2 {
                    return err(format!("matmul operands need rank >= 2, got {a} and {b}"));
                }
                let (ra, rb) = (a.rank(), b.rank());
                let (m, ka) = if *transpose_a {
                    (&a.shape[ra - 1], &a.shape[ra - 2])
                } else {
                    (&a.shape[ra - 2], &a.shape[ra - 1])
                };
                let (kb, n) = if *transpose_b {
                    (&b.shape[rb - 1], &b.shape[rb - 2])
                } else {
                    (&b.shape[rb - 2], &b.shape[rb - 1])
                };
                if ka != kb {
                    return err(format!(
                        "matmul contraction mismatch: {a}{} has k = {ka}, {b}{} has k = {kb}",
                        if *transpose_a { "ᵀ" } else { "" },
                        if *transpose_b { "ᵀ" } else { "" }
                    ));
                }
                let batch_a: Shape = a.shape[..ra - 2].to_vec();
                let batch_b: Shape = b.shape[..rb - 2].to_vec();
                let mut shape = broadcast_shapes(&[&batch_a, &batch_b])?;
                shape.push(m.clone());
                shape.push(n.clone());
                Ok(TensorType::new(a.dtype, shape))
            }
            Op::Binary(b) => {
                let (x, y) = (args[0], args[1]);
                if x.dtype != y.dtype {
                    return err(format!(
                        "{} needs operands of one dtype, got {x} and {y}",
                        self.mnemonic()
                    ));
                }
                if x.dtype == DType::Bool {
                    return err(format!("{} is not defined on bool", self.mnemonic()));
                }
                if *b == BinaryOp::Pow && !x.dtype.is_float() {
                    return err(format!("pow needs float operands, got {}", x.dtype));
                }
                Ok(TensorType::new(x.dtype, broadcast_shapes(&[&x.shape, &y.shape])?))
            }
            Op::Compare(_) => {
                let (x, y) = (args[0], args[1]);
                if x.dtype != y.dtype {
                    return err(format!(
                        "{} needs operands of one dtype, got {x} and {y}",
                        self.mnemonic()
                    ));
                }
                Ok(TensorType::new(DType::Bool, broadcast_shapes(&[&x.shape, &y.shape])?))
            }
            Op::Where => {
                let (c, x, y) = (args[0], args[1], args[2]);
                if c.dtype != DType::Bool {
                    return err(format!("where needs a bool condition, got {c}"));
                }
                if x.dtype != y.dtype {
                    return err(format!("where needs branches of one dtype, got {x} and {y}"));
                }
                Ok(TensorType::new(
                    x.dtype,
                    broadcast_shapes(&[&c.shape, &x.shape, &y.shape])?,
                ))
            }
            Op::Unary(u) => {
                let x = args[0];
                let ok = match u {
                    UnaryOp::Not => x.dtype == DType::Bool,
                    UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu => x.dtype != DType::Bool,
                    _ => x.dtype.is_float(),
                };
                if !ok {
                    return err(format!("{} is not defined on {}", self.mnemonic(), x.dtype));
                }
                Ok(x.clone())
            }
            Op::Reduce { op, axes, keep_dims } => {
                let x = args[0];
                if x.dtype == DType::Bool || (*op == ReduceOp::Mean && !x.dtype.is_float()) {
                    return err(format!("{} is not defined on {}", self.mnemonic(), x.dtype));
                }
                if axes.is_empty() || axes.windows(2).any(|w| w[0] >= w[1]) || axes.iter().any(|&a| a >= x.rank()) {
                    return err(format!(
                        "reduce axes {axes:?} must be sorted, unique and below the rank of {x}"
                    ));
                }
                let mut shape = Vec::new();
                for (i, d) in x.shape.iter().enumerate() {
                    if axes.contains(&i) {
                        if *keep_dims {
                            shape.push(Dim::known(1));
                        }
                    } else {
                        shape.push(d.clone());
                    }
                }
                Ok(TensorType::new(x.dtype, shape))
            }
            Op::Reshape { shape } => {
                let x = args[0];
                let (from, to) = (Dim::product(&x.shape), Dim::product(shape));
                if from != to {
                    return err(format!(
                        "cannot reshape {x} ({from} elements) to {} ({to} elements)",
                        fmt_shape(shape)
                    ));
                }
                Ok(TensorType::new(x.dtype, shape.clone()))
            }
            Op::Transpose { perm } => {
                let x = args[0];
                let mut seen = vec![false; x.rank()];
                if perm.len() != x.rank()
                    || perm
                        .iter()
                        .any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true))
                {
                    return err(format!("{perm:?} is not a permutation of the axes of {x}"));
                }
                Ok(TensorType::new(
                    x.dtype,
                    perm.iter().map(|&p| x.shape[p].clone()).collect(),
                ))
            }
            Op::Broadcast { shape } => {
                let x = args[0];
                let b = broadcast_shapes(&[&x.shape, shape])?;
                if &b != shape {
                    return err(format!("cannot broadcast {x} to {}", fmt_shape(shape)));
                }
                Ok(TensorType::new(x.dtype, shape.clone()))
            }
            Op::Slice { axis, start, end } => {
                let x = args[0];
                let Some(d) = x.shape.get(*axis) else {
                    return err(format!("slice axis {axis} out of range for {x}"));
                };
                let Some(n) = d.as_known() else {
                    return err(format!(
                        "slice along symbolic axis {axis} ({d}) of {x} is not supported"
                    ));
                };
                if start >= end || *end > n {
                    return err(format!("slice {start}..{end} out of range for axis {axis} of {x}"));
                }
                let mut shape = x.shape.clone();
                shape[*axis] = Dim::known(end - start);
                Ok(TensorType::new(x.dtype, shape))
            }
            Op::Concat { axis } => {
                let first = args[0];
                if *axis >= first.rank() {
                    return err(format!("concat axis {axis} out of range for {first}"));
                }
                let mut total = 0u64;
                for a in args {
                    if a.dtype != first.dtype || a.rank() != first.rank() {
                        return err(format!("concat operands {first} and {a} differ in dtype or rank"));
                    }
                    for (i, (x, y)) in a.shape.iter().zip(&first.shape).enumerate() {
                        if i != *axis && x != y {
                            return err(format!("concat operands {first} and {a} differ on axis {i}"));
                        }
                    }
                    match a.shape[*axis].as_known() {
                        Some(n) => total += n,
                        None => return err(format!("concat along symbolic axis {axis} of {a} is not supported")),
                    }
                }
                let mut shape = first.shape.clone();
                shape[*axis] = Dim::known(total);
                Ok(TensorType::new(first.dtype, shape))
            }
            Op::Gather { axis } => {
                let (t, idx) = (args[0], args[1]);
                if !idx.dtype.is_int() {
                    return err(format!("gather indices must be integers, got {idx}"));
                }
                if *axis >= t.rank() {
                    return err(format!("gather axis {axis} out of range for {t}"));
                }
                let mut shape = t.shape[..*axis].to_vec();
                shape.extend(idx.shape.iter().cloned());
                shape.extend(t.shape[axis + 1..].iter().cloned());
                Ok(TensorType::new(t.dtype, shape))
            }
            Op::Cast { to } => Ok(TensorType::new(*to, args[0].shape.clone())),
            Op::Dequantize { bits, group } => {
                let (q, s) = (args[0], args[1]);
                let known = |t: &TensorType| -> Option<(u64, u64)> {
                    (t.rank() == 2).then(|| Some((t.shape[0].as_known()?, t.shape[1].as_known()?)))?
                };
                let (Some((n, qc)), Some((sn, groups))) = (known(q), known(s)) else {
                    return err(format!(
                        "dequantize takes constant-shape rank-2 codes and scales, got {q} and {s}"
                    ));
                };
                let k = groups * group;
                let want_q = match bits {
                    8 => (DType::I8, k),
                    4 if group % 32 == 0 => (DType::U8, k / 2),
                    _ => {
                        return err(format!(
                            "dequantize: {bits} bits with groups of {group} is not supported"
                        ))
                    }
                };
                if q.dtype != want_q.0 || qc != want_q.1 || sn != n || !s.dtype.is_float() || *group == 0 {
                    return err(format!(
                        "dequantize bits={bits} group={group}: codes {q} and scales {s} do not describe one [{n}, {k}] matrix"
                    ));
                }
                if *bits == 4 && args[2] != s {
                    return err(format!("dequantize: mins {} must match scales {s}", args[2]));
                }
                Ok(TensorType::new(DType::F32, vec![Dim::known(n), Dim::known(k)]))
            }
            Op::Densify {
                n, k, block: [br, bc], ..
            } => {
                let (rp, cols, vals) = (args[0], args[1], args[2]);
                let nnz = cols.shape.first().and_then(|d| d.as_known());
                let ok = *br > 0
                    && *bc > 0
                    && n % br == 0
                    && k % bc == 0
                    && rp.dtype == DType::I32
                    && cols.dtype == DType::I32
                    && vals.dtype == DType::F32
                    && rp.shape == [Dim::known(n / br + 1)]
                    && cols.rank() == 1
                    && vals.rank() == 1
                    && nnz.is_some()
                    && vals.shape[0].as_known() == nnz.map(|b| b * br * bc);
                if !ok {
                    return err(format!(
                        "densify n={n} k={k} block={br}x{bc} takes i32 [{}] row pointers, i32 [nb] block columns and f32 [nb·{}] values, got {rp}, {cols}, {vals}",
                        n / br.max(&1) + 1,
                        br * bc
                    ));
                }
                Ok(TensorType::new(DType::F32, vec![Dim::known(*n), Dim::known(*k)]))
            }
            Op::Densify24 { n, k, .. } => {
                let (vals, idx) = (args[0], args[1]);
                if k % 4 != 0
                    || vals.dtype != DType::F32
                    || idx.dtype != DType::U8
                    || vals.shape != [Dim::known(*n), Dim::known(k / 2)]
                    || idx.shape != [Dim::known(*n), Dim::known(k / 4)]
                {
                    return err(format!(
                        "densify_2_4 n={n} k={k} takes f32 [{n}, {}] values and u8 [{n}, {}] offsets (k a multiple of 4), got {vals}, {idx}",
                        k / 2,
                        k / 4
                    ));
                }
                Ok(TensorType::new(DType::F32, vec![Dim::known(*n), Dim::known(*k)]))
            }
            Op::CacheAppend { len, .. } => {
                let t = args[0];
                if t.rank() != 4 || !t.dtype.is_float() {
                    return err(format!("cache_append takes a float [b, h, t, d] operand, got {t}"));
                }
                let mut shape = t.shape.clone();
                shape[2] = len.clone();
                Ok(TensorType::new(t.dtype, shape))
            }
            Op::Moe { experts, top_k, .. } => crate::moe::infer(*experts, *top_k, args),
            Op::Fused(f) => f.infer(args),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(dtype: DType, dims: &[&str]) -> TensorType {
        TensorType::new(
            dtype,
            dims.iter()
                .map(|d| d.parse::<u64>().map(Dim::known).unwrap_or_else(|_| Dim::sym(*d)))
                .collect(),
        )
    }

    #[test]
    fn matmul_broadcasts_batch_axes() {
        let a = t(DType::F32, &["batch", "seq", "384"]);
        let w = t(DType::F32, &["1536", "384"]);
        let out = Op::MatMul {
            transpose_a: false,
            transpose_b: true,
        }
        .infer(&[&a, &w])
        .unwrap();
        assert_eq!(out.to_string(), "f32[batch, seq, 1536]");
        let bad = Op::MatMul {
            transpose_a: false,
            transpose_b: false,
        }
        .infer(&[&a, &w])
        .unwrap_err();
        assert!(bad.0.contains("contraction mismatch"), "{bad}");
    }

    #[test]
    fn binary_broadcast_and_mismatch() {
        let a = t(DType::F32, &["batch", "seq", "384"]);
        let b = t(DType::F32, &["384"]);
        assert_eq!(Op::Binary(BinaryOp::Add).infer(&[&a, &b]).unwrap(), a);
        let c = t(DType::F32, &["batch", "seq", "1536"]);
        let e = Op::Binary(BinaryOp::Add).infer(&[&a, &c]).unwrap_err();
        assert!(e.0.contains("do not broadcast"), "{e}");
    }

    #[test]
    fn reshape_checks_symbolic_element_count() {
        let a = t(DType::F32, &["batch", "seq", "384"]);
        let ok = Op::Reshape {
            shape: vec![Dim::sym("batch"), Dim::sym("seq"), Dim::known(12), Dim::known(32)],
        };
        assert!(ok.infer(&[&a]).is_ok());
        let bad = Op::Reshape {
            shape: vec![Dim::sym("batch"), Dim::known(12), Dim::known(32)],
        };
        assert!(bad.infer(&[&a]).is_err());
    }

    #[test]
    fn gather_shapes() {
        let table = t(DType::F32, &["30522", "384"]);
        let ids = t(DType::I64, &["batch", "seq"]);
        let out = Op::Gather { axis: 0 }.infer(&[&table, &ids]).unwrap();
        assert_eq!(out.to_string(), "f32[batch, seq, 384]");
    }
}
