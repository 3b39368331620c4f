//! The spec language's syntax tree, as deserialised from RON.
//!
//! A spec is one `Model(...)` value. Tensor references, config expressions and weight-name
//! templates are plain strings here; `resolve`/`lower` give them meaning.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// A map that keeps the order its entries were written in, and rejects repeated keys.
#[derive(Clone, Debug)]
pub struct Ordered<T>(pub Vec<(String, T)>);

impl<T> Default for Ordered<T> {
    fn default() -> Self {
        Ordered(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map from quoted names to entries, like { \"name\": ... }")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(String, T)> = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    if out.iter().any(|(x, _)| *x == k) {
                        return Err(de::Error::custom(format!("`{k}` is defined twice")));
                    }
                    let v = m.next_value()?;
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// A scalar as RON wrote it, before a field decides what it may be.
enum Raw {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Raw;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number, a string or a boolean")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Raw, E> {
                Ok(Raw::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Raw, E> {
                i64::try_from(v)
                    .map(Raw::Int)
                    .map_err(|_| E::custom("integer too large"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Raw, E> {
                Ok(Raw::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Raw, E> {
                Ok(Raw::Str(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Raw, E> {
                Ok(Raw::Bool(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// Implements `Deserialize` for a field type by converting a [`Raw`] scalar, with `expected`
/// naming what the field accepts.
macro_rules! from_raw {
    ($ty:ty, $expected:literal, |$raw:ident| $convert:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let $raw = Raw::deserialize(d)?;
                let converted: Option<$ty> = $convert;
                converted.ok_or_else(|| de::Error::custom(concat!("expected ", $expected)))
            }
        }
    };
}

/// An integer written as a literal or as an expression over config names (`"hidden / heads"`).
#[derive(Clone, Debug, PartialEq)]
pub enum IntExpr {
    /// A literal.
    Lit(i64),
    /// Expression text.
    Expr(String),
}

from_raw!(
    IntExpr,
    "an integer or an expression string like \"hidden / heads\"",
    |raw| match raw {
        Raw::Int(v) => Some(IntExpr::Lit(v)),
        Raw::Str(s) => Some(IntExpr::Expr(s)),
        _ => None,
    }
);

/// A number written as a literal or as a config name/expression (`"eps"`).
#[derive(Clone, Debug, PartialEq)]
pub enum FloatExpr {
    /// A literal.
    Lit(f64),
    /// Expression text.
    Expr(String),
}

from_raw!(FloatExpr, "a number or a config name like \"eps\"", |raw| match raw {
    Raw::Int(v) => Some(FloatExpr::Lit(v as f64)),
    Raw::Float(v) => Some(FloatExpr::Lit(v)),
    Raw::Str(s) => Some(FloatExpr::Expr(s)),
    Raw::Bool(_) => None,
});

/// A config entry: an integer, a float, or an integer expression over earlier entries.
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigValue {
    /// An integer.
    Int(i64),
    /// A float (epsilons, rotary base…).
    Float(f64),
    /// An integer expression.
    Expr(String),
}

from_raw!(
    ConfigValue,
    "an integer, a float, or an expression string",
    |raw| match raw {
        Raw::Int(v) => Some(ConfigValue::Int(v)),
        Raw::Float(v) => Some(ConfigValue::Float(v)),
        Raw::Str(s) => Some(ConfigValue::Expr(s)),
        Raw::Bool(_) => None,
    }
);

/// `bias: true | false | "explicit.name"`.
#[derive(Clone, Debug, PartialEq)]
pub enum BiasField {
    /// Whether the layer has a bias named after its `param`.
    Flag(bool),
    /// An explicit weight-name template.
    Name(String),
}

from_raw!(BiasField, "true, false, or a weight name", |raw| match raw {
    Raw::Bool(b) => Some(BiasField::Flag(b)),
    Raw::Str(s) => Some(BiasField::Name(s)),
    _ => None,
});

/// One integer for every axis (`3`, `"patch"`), or one per axis (`[2, 3]`).
#[derive(Clone, Debug, PartialEq)]
pub enum PerAxis {
    /// The same value on every axis.
    One(IntExpr),
    /// A value per axis, in axis order.
    Each(Vec<IntExpr>),
}

impl<'de> Deserialize<'de> for PerAxis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PerAxis;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer or expression for every axis, or a list of one per axis")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PerAxis, E> {
                Ok(PerAxis::One(IntExpr::Lit(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PerAxis, E> {
                i64::try_from(v)
                    .map(|v| PerAxis::One(IntExpr::Lit(v)))
                    .map_err(|_| E::custom("integer too large"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PerAxis, E> {
                Ok(PerAxis::One(IntExpr::Expr(v.to_string())))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<PerAxis, A::Error> {
                let mut out = Vec::new();
                while let Some(e) = seq.next_element::<IntExpr>()? {
                    out.push(e);
                }
                Ok(PerAxis::Each(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Element types as written in specs.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum DTypeName {
    F32,
    F16,
    Bf16,
    I64,
    I32,
    I8,
    U8,
    Bool,
}

/// A whole model spec.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename = "Model")]
pub struct Spec {
    /// Model name.
    pub name: String,
    /// Named constants; later entries may use earlier ones.
    #[serde(default)]
    pub config: Ordered<ConfigValue>,
    /// Symbolic dims and their upper bounds (`"seq": "max_pos"`).
    #[serde(default)]
    pub dims: Ordered<IntExpr>,
    /// Graph inputs.
    pub inputs: Ordered<InputDecl>,
    /// Prepended to every weight name (`"transformer."` for checkpoints saved from a wrapper).
    #[serde(default)]
    pub weight_prefix: String,
    /// Checkpoint tensors the model does not use (glob patterns with `*`).
    #[serde(default)]
    pub ignore_weights: Vec<String>,
    /// Reusable blocks.
    #[serde(default)]
    pub blocks: Ordered<Block>,
    /// The model's layers, in order; each entry binds a name.
    pub body: Ordered<Layer>,
    /// Graph outputs: output name to the binding it returns.
    pub outputs: Ordered<String>,
}

/// A graph input's declared type.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputDecl {
    /// Element type.
    pub dtype: DTypeName,
    /// Axes: dim names from `dims`, or integer expressions.
    pub shape: Vec<IntExpr>,
    /// Makes the input optional: a caller may leave it out, and every element is then this value
    /// (`default: 1` for an attention mask of ones, `default: 0` for token type ids).
    #[serde(default)]
    pub default: Option<InputDefault>,
}

/// An optional input's element value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum InputDefault {
    /// An integer (also fits a float input).
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
}

from_raw!(InputDefault, "a number, true or false", |raw| match raw {
    Raw::Int(v) => Some(InputDefault::Int(v)),
    Raw::Float(v) => Some(InputDefault::Float(v)),
    Raw::Bool(v) => Some(InputDefault::Bool(v)),
    Raw::Str(_) => None,
});

impl fmt::Display for InputDefault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InputDefault::Int(v) => write!(f, "{v}"),
            InputDefault::Float(v) => write!(f, "{v}"),
            InputDefault::Bool(v) => write!(f, "{v}"),
        }
    }
}

/// A reusable sequence of layers with one carried input and one output.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Block {
    /// Name the carried tensor has inside the block.
    #[serde(default = "default_block_input")]
    pub input: String,
    /// The block's layers.
    pub body: Ordered<Layer>,
    /// The binding the block returns.
    pub output: String,
}

fn default_block_input() -> String {
    "x".into()
}

fn default_axis() -> i64 {
    -1
}

fn default_index() -> String {
    "i".into()
}

fn default_seq_axis() -> i64 {
    1
}

/// Linear weight layout: PyTorch `nn.Linear` stores `[out, in]`; GPT-2's `Conv1D` stores `[in, out]`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
pub enum Layout {
    /// `[out_features, in_features]`.
    #[default]
    OutIn,
    /// `[in_features, out_features]`.
    InOut,
}

/// How a mixture of experts scores its router logits.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
pub enum MoeScores {
    /// A softmax over all experts.
    #[default]
    Softmax,
    /// A sigmoid per expert.
    Sigmoid,
}

/// The activation of an expert's gate projection.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
pub enum MoeAct {
    /// SwiGLU.
    #[default]
    Silu,
    /// GeGLU, exact GELU.
    Gelu,
    /// GeGLU, tanh-approximated GELU.
    GeluTanh,
    /// ReGLU.
    Relu,
}

fn default_true() -> bool {
    true
}

/// Rotary position embedding options.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rope {
    /// Base of the frequencies.
    #[serde(default = "default_theta")]
    pub theta: FloatExpr,
    /// Rotated features per head (default: all).
    #[serde(default)]
    pub dim: Option<IntExpr>,
    /// `Half` rotates the two halves of each head (Llama, GPT-NeoX); `Interleaved` rotates pairs
    /// of adjacent features (GPT-J).
    #[serde(default)]
    pub style: RopeStyle,
}

fn default_theta() -> FloatExpr {
    FloatExpr::Lit(10000.0)
}

/// How rotary embeddings pair features.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
pub enum RopeStyle {
    /// `x[..d/2]` with `x[d/2..]`.
    #[default]
    Half,
    /// `x[2j]` with `x[2j+1]`.
    Interleaved,
}

/// One layer-level operation. Each binds the name it is written under.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub enum Layer {
    /// Rows of a `[rows, dim]` table picked by integer ids.
    Embedding {
        ids: String,
        weight: String,
        rows: IntExpr,
        dim: IntExpr,
    },
    /// `0..extent` of one axis of a tensor, as i64 (position ids).
    Positions {
        of: String,
        #[serde(default = "default_seq_axis")]
        axis: i64,
        /// RoBERTa: count only tokens other than this id, from `padding_idx + 1`; padding
        /// tokens take position `padding_idx`.
        #[serde(default)]
        padding_idx: Option<IntExpr>,
    },
    /// `x @ Wᵀ + b` over the last axis.
    Linear {
        x: String,
        #[serde(default)]
        param: Option<String>,
        #[serde(default)]
        weight: Option<String>,
        #[serde(default)]
        bias: Option<BiasField>,
        in_features: IntExpr,
        out_features: IntExpr,
        #[serde(default)]
        layout: Layout,
        /// The checkpoint tensor's shape when larger (MatFormer): the layer uses its leading
        /// `[out_features, in_features]` block (`[in, out]` for `InOut`) and bias entries.
        #[serde(default)]
        full: Option<Vec<IntExpr>>,
    },
    /// A block-diagonal product (Monarch): `blocks` independent `Linear`s over consecutive
    /// slices of the last axis; weight `[blocks, out_features / blocks, in_features / blocks]`.
    BlockLinear {
        x: String,
        #[serde(default)]
        param: Option<String>,
        #[serde(default)]
        weight: Option<String>,
        #[serde(default)]
        bias: Option<BiasField>,
        blocks: IntExpr,
        in_features: IntExpr,
        out_features: IntExpr,
    },
    /// Layer normalisation over the last axis, with scale and shift.
    LayerNorm {
        x: String,
        #[serde(default)]
        param: Option<String>,
        #[serde(default)]
        weight: Option<String>,
        #[serde(default)]
        bias: Option<BiasField>,
        dim: IntExpr,
        eps: FloatExpr,
    },
    /// Root-mean-square normalisation over the last axis, with scale.
    RMSNorm {
        x: String,
        #[serde(default)]
        param: Option<String>,
        #[serde(default)]
        weight: Option<String>,
        dim: IntExpr,
        eps: FloatExpr,
    },
    /// GELU, exact (erf) form.
    Gelu { x: String },
    /// GELU, tanh approximation (GPT-2's `gelu_new`).
    GeluTanh { x: String },
    /// `x * sigmoid(x)`.
    Silu { x: String },
    /// `max(x, 0)`.
    Relu { x: String },
    /// Hyperbolic tangent.
    Tanh { x: String },
    /// Logistic sigmoid.
    Sigmoid { x: String },
    /// Softmax along an axis.
    Softmax {
        x: String,
        #[serde(default = "default_axis")]
        axis: i64,
    },
    /// `a + b` (broadcasting); residual connections.
    Add { a: String, b: String },
    /// `a - b` (broadcasting).
    Sub { a: String, b: String },
    /// `a * b` (broadcasting); gating.
    Mul { a: String, b: String },
    /// `x * by`.
    Scale { x: String, by: FloatExpr },
    /// Multi-head attention over projected `q`, `k`, `v` of shape `[batch, seq, heads*head_dim]`.
    Attention {
        q: String,
        k: String,
        v: String,
        heads: IntExpr,
        #[serde(default)]
        kv_heads: Option<IntExpr>,
        #[serde(default)]
        causal: bool,
        /// A `[batch, seq]` input, nonzero where a key may be attended.
        #[serde(default)]
        mask: Option<String>,
        #[serde(default)]
        rope: Option<Rope>,
        /// Defaults to `1/sqrt(head_dim)`.
        #[serde(default)]
        scale: Option<FloatExpr>,
        /// Sliding-window attention (Mistral): a causal query at position `i` attends keys at
        /// `i - window < j <= i`.
        #[serde(default)]
        window: Option<IntExpr>,
    },
    /// Convolution over the 1 or 2 trailing spatial axes of `x [batch, channels, ...]`, PyTorch's
    /// `ConvNd`: weight `[out_channels, in_channels / groups, *kernel]`, zero padding.
    Conv {
        x: String,
        #[serde(default)]
        param: Option<String>,
        #[serde(default)]
        weight: Option<String>,
        #[serde(default)]
        bias: Option<BiasField>,
        in_channels: IntExpr,
        out_channels: IntExpr,
        kernel: PerAxis,
        #[serde(default)]
        stride: Option<PerAxis>,
        #[serde(default)]
        padding: Option<PerAxis>,
        #[serde(default)]
        groups: Option<IntExpr>,
    },
    /// Joins tensors along an axis; extents of 1 on the other axes stretch (a class token).
    Concat {
        xs: Vec<String>,
        #[serde(default = "default_axis")]
        axis: i64,
    },
    /// A learned tensor used as it is (class token, position table).
    Param { weight: String, shape: Vec<IntExpr> },
    /// A mixture of experts (Mixtral): each row of `x [.., dim]` goes to the `top_k` experts with
    /// the highest scores of its router `logits [.., experts]` (a tensor, usually a `Linear`), and
    /// the experts' SwiGLU-style blocks `down(act(gate·x) ⊙ up·x)` are summed, weighted by those
    /// scores. `gate`, `up`, `down` are weight names with an `{e}` hole for the expert's index
    /// (`[ffn, dim]`, `[ffn, dim]`, `[dim, ffn]`); only the routed rows go through each expert.
    Moe {
        x: String,
        logits: String,
        experts: IntExpr,
        top_k: IntExpr,
        dim: IntExpr,
        ffn: IntExpr,
        gate: String,
        up: String,
        down: String,
        #[serde(default)]
        scores: MoeScores,
        #[serde(default = "default_true")]
        renormalize: bool,
        #[serde(default)]
        act: MoeAct,
    },
    /// `cap * tanh(x / cap)`: logit soft-capping (Gemma 2).
    SoftCap { x: String, cap: FloatExpr },
    /// Splits along an axis into `parts` equal pieces or pieces of `sizes`; bound as `name.0`, `name.1`…
    Split {
        x: String,
        #[serde(default)]
        parts: Option<IntExpr>,
        #[serde(default)]
        sizes: Option<Vec<IntExpr>>,
        #[serde(default = "default_axis")]
        axis: i64,
    },
    /// Elements `start..end` of one axis.
    Slice {
        x: String,
        axis: i64,
        start: IntExpr,
        end: IntExpr,
    },
    /// `a @ b` (optionally `a @ bᵀ`), batched.
    MatMul {
        a: String,
        b: String,
        #[serde(default)]
        transpose_b: bool,
    },
    /// New shape, same elements; dims by name or expression.
    Reshape { x: String, shape: Vec<IntExpr> },
    /// Axis permutation.
    Transpose { x: String, perm: Vec<i64> },
    /// Mean over axes.
    Mean {
        x: String,
        axes: Vec<i64>,
        #[serde(default)]
        keep_dims: bool,
    },
    /// Mean of `x [batch, seq, d]` over the positions where `mask [batch, seq]` is nonzero
    /// (sentence-transformers pooling).
    MeanPool { x: String, mask: String },
    /// `x / max(‖x‖₂, 1e-12)` over the last axis.
    L2Normalize { x: String },
    /// Applies a block `times` times, feeding each output to the next; `index` counts from 0.
    Repeat {
        block: String,
        x: String,
        times: IntExpr,
        #[serde(default = "default_index")]
        index: String,
    },
    /// Applies a block once, with integer variables for its weight names.
    Call {
        block: String,
        x: String,
        #[serde(default)]
        vars: Ordered<IntExpr>,
    },
}

impl Layer {
    /// The RON variant name, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Embedding { .. } => "Embedding",
            Layer::Positions { .. } => "Positions",
            Layer::Linear { .. } => "Linear",
            Layer::LayerNorm { .. } => "LayerNorm",
            Layer::RMSNorm { .. } => "RMSNorm",
            Layer::Gelu { .. } => "Gelu",
            Layer::GeluTanh { .. } => "GeluTanh",
            Layer::Silu { .. } => "Silu",
            Layer::Relu { .. } => "Relu",
            Layer::Tanh { .. } => "Tanh",
            Layer::Sigmoid { .. } => "Sigmoid",
            Layer::Softmax { .. } => "Softmax",
            Layer::Add { .. } => "Add",
            Layer::Sub { .. } => "Sub",
            Layer::Mul { .. } => "Mul",
            Layer::Scale { .. } => "Scale",
            Layer::Attention { .. } => "Attention",
            Layer::BlockLinear { .. } => "BlockLinear",
            Layer::Conv { .. } => "Conv",
            Layer::Concat { .. } => "Concat",
            Layer::Param { .. } => "Param",
            Layer::Moe { .. } => "Moe",
            Layer::SoftCap { .. } => "SoftCap",
            Layer::Split { .. } => "Split",
            Layer::Slice { .. } => "Slice",
            Layer::MatMul { .. } => "MatMul",
            Layer::Reshape { .. } => "Reshape",
            Layer::Transpose { .. } => "Transpose",
            Layer::Mean { .. } => "Mean",
            Layer::MeanPool { .. } => "MeanPool",
            Layer::L2Normalize { .. } => "L2Normalize",
            Layer::Repeat { .. } => "Repeat",
            Layer::Call { .. } => "Call",
        }
    }
}
