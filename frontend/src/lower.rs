//! Stage 2: resolve names, evaluate config, expand blocks, and emit primitive IR.
//!
//! Layer-level ops (LayerNorm, attention, GELU…) become subgraphs of primitive ops here; node
//! names record where each node came from (`layer.3/attn/scores`). Errors do not stop lowering:
//! the failed binding is marked poisoned, layers that use it are skipped silently, and every
//! independent problem in the file is reported together.

use std::collections::{HashMap, HashSet};

use kiln_ir::{BinaryOp, CmpOp, DType, Dim, Graph, GraphError, Literal, NodeId, Op, ReduceOp, TensorType, UnaryOp};

use crate::ast::{
    BiasField, Block, ConfigValue, DTypeName, FloatExpr, InputDefault, IntExpr, Layer, Layout, Ordered, Rope,
    RopeStyle, Spec,
};
use crate::diag::{Diagnostic, SpecError, SpecPath};
use crate::expr::Env;

mod block_linear;
mod conv;
mod moe;
mod nested;
mod positions;
mod tensors;

/// The largest weight tensor a spec may declare (2^34 elements, 64 GiB of f32).
const MAX_PARAM_ELEMENTS: u64 = 1 << 34;
/// The most applications one `Repeat` may expand to.
const MAX_REPEAT: i64 = 10_000;

/// Options that change how a spec is lowered.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Config overrides, `name = value` (value: integer, float or expression).
    pub overrides: Vec<(String, String)>,
    /// Replaces the spec's `weight_prefix`.
    pub weight_prefix: Option<String>,
    /// Lower for autoregressive decoding: causal attention reads and appends to a key/value cache,
    /// and the logits are computed for the last position only (see [`DECODE_INPUTS`]).
    pub decode: bool,
}

/// The inputs a decoding graph adds to the spec's token ids, all `i64`, filled in by the runtime:
/// `positions [batch, seq]` (position ids of the new tokens), `cache_slots [seq]` (the cache entry
/// each new token goes to), `key_mask [batch, kv]` (1 for cache entries that hold a real token, 0
/// for left padding) and `last_index [1]` (the position whose logits are returned).
pub const DECODE_INPUTS: [&str; 4] = ["positions", "cache_slots", "key_mask", "last_index"];

/// The symbolic dim of a decoding graph's cache length (cached plus new positions).
pub const CACHE_DIM: &str = "kv";

/// The extra inputs of a decoding graph.
#[derive(Clone)]
struct DecodeInputs {
    positions: NodeId,
    slots: NodeId,
    key_mask: NodeId,
    last: NodeId,
    /// The `seq` dim of the token ids.
    seq: Dim,
    /// The cache length.
    kv: Dim,
    next_slot: u32,
}

/// What a parameter is for; decides how random weights are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamRole {
    /// A projection matrix.
    Matrix,
    /// An embedding table.
    Table,
    /// A normalisation scale (near 1).
    Scale,
    /// An additive bias or shift (near 0).
    Bias,
    /// A tensor used as it is (`Param`: class token, position table; small values).
    Tensor,
}

/// A weight the graph needs, and where the spec asked for it.
#[derive(Clone, Debug)]
pub struct ParamDecl {
    /// Full checkpoint name.
    pub name: String,
    /// Expected type.
    pub ty: TensorType,
    /// Where in the spec it is declared.
    pub path: SpecPath,
    /// What it is for.
    pub role: ParamRole,
    /// The graph node.
    pub node: NodeId,
}

/// The result of lowering: the graph and what is needed to bind and explain it.
#[derive(Clone, Debug)]
pub struct Lowered {
    /// The verified graph.
    pub graph: Graph,
    /// Parameters, in first-use order.
    pub params: Vec<ParamDecl>,
    /// Symbolic dims with their upper bounds.
    pub dims: Vec<(String, u64)>,
    /// Glob patterns of checkpoint tensors to ignore.
    pub ignore_weights: Vec<String>,
    /// The spec file name.
    pub file: String,
    /// The spec text.
    pub source: String,
}

impl Lowered {
    /// Builds an error at spec paths, with snippets from this spec.
    pub fn error(&self, diagnostics: Vec<Diagnostic>) -> SpecError {
        SpecError::new(&self.file, &self.source, diagnostics)
    }
}

/// Why one layer could not be lowered.
enum LErr {
    /// A real problem, reported once.
    Diag(Diagnostic),
    /// It uses a binding that already failed; stay quiet.
    Poisoned,
}

impl From<Diagnostic> for LErr {
    fn from(d: Diagnostic) -> LErr {
        LErr::Diag(d)
    }
}

type LResult<T> = Result<T, LErr>;

#[derive(Clone, Copy)]
enum Binding {
    Node(NodeId),
    Poisoned,
}

/// A lexical scope: a body's bindings, chained to the body that called the block.
struct Scope<'p> {
    vars: HashMap<String, Binding>,
    parent: Option<&'p Scope<'p>>,
    env: Env,
    /// Prefix for node names (`layer.3/`).
    prefix: String,
    /// Path of the body being lowered (`body` or `blocks."layer".body`).
    base: SpecPath,
    /// Blocks being expanded, to refuse recursion.
    stack: Vec<String>,
}

impl Scope<'_> {
    fn lookup(&self, name: &str) -> Option<Binding> {
        if let Some(b) = self.vars.get(name) {
            return Some(*b);
        }
        // `qkv.1` of a poisoned Split is poisoned too.
        if let Some((head, _)) = name.rsplit_once('.') {
            if let Some(Binding::Poisoned) = self.vars.get(head) {
                return Some(Binding::Poisoned);
            }
        }
        self.parent.and_then(|p| p.lookup(name))
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.vars.keys().cloned().collect();
        if let Some(p) = self.parent {
            v.extend(p.names());
        }
        v.sort();
        v
    }
}

struct Lowerer<'a> {
    spec: &'a Spec,
    g: Graph,
    diags: Vec<Diagnostic>,
    seen: HashSet<String>,
    params: Vec<ParamDecl>,
    param_index: HashMap<String, usize>,
    weight_prefix: String,
    decode: Option<DecodeInputs>,
}

/// Lowers a parsed spec.
pub fn lower(file: &str, src: &str, spec: &Spec, opts: &Options) -> Result<Lowered, SpecError> {
    let mut l = Lowerer {
        spec,
        g: Graph::new(spec.name.clone()),
        diags: Vec::new(),
        seen: HashSet::new(),
        params: Vec::new(),
        param_index: HashMap::new(),
        weight_prefix: opts.weight_prefix.clone().unwrap_or_else(|| spec.weight_prefix.clone()),
        decode: None,
    };
    let root = SpecPath::default();
    let env = l.config(&root, &opts.overrides);
    let (env, mut dims) = l.dims(&root, env);
    let mut scope = Scope {
        vars: HashMap::new(),
        parent: None,
        env,
        prefix: String::new(),
        base: root.field("body"),
        stack: vec![],
    };
    l.inputs(&root, &mut scope);
    if opts.decode && l.diags.is_empty() {
        if let Some(bound) = l.decode_inputs(&root, &dims) {
            dims.push((CACHE_DIM.to_string(), bound));
        }
    }
    l.body(&spec.body, &mut scope);
    for (name, binding) in &spec.outputs.0 {
        let path = root.field("outputs").key(name);
        match scope.lookup(binding) {
            Some(Binding::Node(id)) => {
                let id = match l.decode.clone() {
                    Some(d) => match l.last_position(id, &d, &path) {
                        Ok(id) => id,
                        Err(e) => {
                            l.report(e);
                            continue;
                        }
                    },
                    None => id,
                };
                if let Err(e) = l.g.add_output(name.clone(), id) {
                    l.report(Diagnostic::at(path, e.to_string()));
                }
            }
            Some(Binding::Poisoned) => {}
            None => {
                let d = undefined(path, binding, &scope);
                l.report(d);
            }
        }
    }
    if spec.outputs.0.is_empty() {
        l.report(Diagnostic::at(root.field("outputs"), "the model has no outputs").label("add at least one"));
    }
    if !l.diags.is_empty() {
        return Err(SpecError::new(file, src, l.diags));
    }
    Ok(Lowered {
        graph: l.g,
        params: l.params,
        dims,
        ignore_weights: spec.ignore_weights.clone(),
        file: file.to_string(),
        source: src.to_string(),
    })
}

fn undefined(path: SpecPath, name: &str, scope: &Scope) -> Diagnostic {
    let names = scope.names();
    let mut d =
        Diagnostic::at(path, format!("undefined name `{name}`")).label("not bound by any earlier layer or input");
    if let Some(s) = crate::suggest(name, names.iter().map(String::as_str)) {
        d = d.note(format!("did you mean `{s}`?"));
    }
    d
}

/// An optional input's default as a literal of its `dtype`.
fn input_default(d: InputDefault, dtype: DType) -> Result<Literal, String> {
    let lit = match d {
        InputDefault::Int(v) => Literal::Int(v),
        InputDefault::Float(v) if v.is_finite() => Literal::float(v),
        InputDefault::Float(v) => return Err(format!("default {v} is not a finite number")),
        InputDefault::Bool(v) => Literal::Bool(v),
    };
    match lit {
        _ if !lit.fits(dtype) => Err(format!("default {d} does not fit the input's dtype {dtype}")),
        Literal::Int(v) if dtype.is_float() => Ok(Literal::float(v as f64)),
        _ => Ok(lit),
    }
}

fn dtype(d: DTypeName) -> DType {
    match d {
        DTypeName::F32 => DType::F32,
        DTypeName::F16 => DType::F16,
        DTypeName::Bf16 => DType::BF16,
        DTypeName::I64 => DType::I64,
        DTypeName::I32 => DType::I32,
        DTypeName::I8 => DType::I8,
        DTypeName::U8 => DType::U8,
        DTypeName::Bool => DType::Bool,
    }
}

fn last(ty: &TensorType) -> Option<&Dim> {
    ty.shape.last()
}

impl<'a> Lowerer<'a> {
    /// Whether `m` is an optional graph input whose default keeps every key (a padding mask of
    /// ones): while decoding, the decoder's own key mask stands in for it.
    fn is_padding_input(&self, m: NodeId) -> bool {
        matches!(self.g.node(m).op, Op::Input { default: Some(d), .. } if d.as_f64() != 0.0)
    }

    /// Adds the decoding inputs; returns the cache length bound (the token axis's bound).
    fn decode_inputs(&mut self, root: &SpecPath, dims: &[(String, u64)]) -> Option<u64> {
        // Optional inputs (an attention mask of ones by default) are not fed while decoding.
        let ids: Vec<NodeId> = (self.g.inputs().iter().copied())
            .filter(|i| matches!(self.g.node(*i).op, Op::Input { default: None, .. }))
            .collect();
        let ty = match ids.as_slice() {
            [one] => Some(self.ty(*one)),
            _ => None,
        };
        let bad = |msg: String| {
            Diagnostic::at(root.field("inputs"), msg).note(
                "decoding (`--generate`) needs one required input: integer token ids [batch, seq] with symbolic dims",
            )
        };
        let Some(ty) = ty.filter(|t| t.dtype.is_int() && t.rank() == 2) else {
            self.report(bad(format!(
                "decoding needs exactly one required integer [batch, seq] input, the spec has {}",
                ids.len()
            )));
            return None;
        };
        let sym = |d: &Dim| (d.coeff() == 1 && d.symbols().len() == 1).then(|| d.symbols()[0].clone());
        let (Some(_), Some(seq)) = (sym(&ty.shape[0]), sym(&ty.shape[1])) else {
            self.report(bad(format!(
                "the token ids must be [batch, seq] with symbolic dims, got {ty}"
            )));
            return None;
        };
        if dims.iter().any(|(n, _)| n == CACHE_DIM) {
            self.report(Diagnostic::at(
                root.field("dims").key(CACHE_DIM),
                format!("`{CACHE_DIM}` is the cache length of a decoding graph; rename this dim"),
            ));
            return None;
        }
        let bound = dims.iter().find(|(n, _)| *n == seq).map(|(_, b)| *b)?;
        let (b, s) = (ty.shape[0].clone(), ty.shape[1].clone());
        let kv = Dim::sym(CACHE_DIM);
        let mut input = |name: &str, shape: Vec<Dim>| {
            let ty = TensorType::new(DType::I64, shape);
            self.g.add(Op::input(name, ty), &[], name).ok()
        };
        let positions = input(DECODE_INPUTS[0], vec![b.clone(), s.clone()])?;
        let slots = input(DECODE_INPUTS[1], vec![s.clone()])?;
        let key_mask = input(DECODE_INPUTS[2], vec![b, kv.clone()])?;
        let last = input(DECODE_INPUTS[3], vec![Dim::known(1)])?;
        self.decode = Some(DecodeInputs {
            positions,
            slots,
            key_mask,
            last,
            seq: s,
            kv,
            next_slot: 0,
        });
        Some(bound)
    }

    /// A decoding graph returns `[batch, 1, …]`: the output at `last_index` only.
    fn last_position(&mut self, id: NodeId, d: &DecodeInputs, path: &SpecPath) -> Result<NodeId, Diagnostic> {
        let t = self.ty(id);
        if t.rank() < 2 || t.shape[1] != d.seq {
            return Err(Diagnostic::at(
                path.clone(),
                format!("decoding returns the last position of each output, so outputs must be [batch, seq, …]; this one is {t}"),
            ));
        }
        self.g
            .add(Op::Gather { axis: 1 }, &[id, d.last], "last_position")
            .map_err(|e| Diagnostic::at(path.clone(), e.to_string()))
    }

    fn report(&mut self, d: Diagnostic) {
        // A block expanded N times would otherwise say the same thing N times.
        let key = format!("{}|{:?}", d.message, d.path);
        if self.seen.insert(key) {
            self.diags.push(d);
        }
    }

    fn config(&mut self, root: &SpecPath, overrides: &[(String, String)]) -> Env {
        let mut env = Env::default();
        for (name, _) in overrides {
            if !self.spec.config.0.iter().any(|(n, _)| n == name) {
                let known: Vec<&str> = self.spec.config.0.iter().map(|(n, _)| n.as_str()).collect();
                let mut d = Diagnostic::at(
                    root.field("config"),
                    format!("`--set {name}=…`: the spec has no config entry `{name}`"),
                );
                if let Some(s) = crate::suggest(name, known) {
                    d = d.note(format!("did you mean `{s}`?"));
                }
                self.report(d);
            }
        }
        for (name, value) in &self.spec.config.0 {
            let path = root.field("config").key(name);
            let value = match overrides.iter().rev().find(|(n, _)| n == name) {
                Some((_, v)) => match (v.parse::<i64>(), v.parse::<f64>()) {
                    (Ok(i), _) => ConfigValue::Int(i),
                    (_, Ok(f)) => ConfigValue::Float(f),
                    _ => ConfigValue::Expr(v.clone()),
                },
                None => value.clone(),
            };
            match value {
                ConfigValue::Int(v) => {
                    env.ints.insert(name.clone(), v);
                }
                ConfigValue::Float(v) => {
                    env.floats.insert(name.clone(), v);
                }
                ConfigValue::Expr(e) => match env.int(&e) {
                    Ok(v) => {
                        env.ints.insert(name.clone(), v);
                    }
                    Err(m) => {
                        self.report(Diagnostic::at(path, m).label("in this config entry"));
                        // Keep going with a harmless value so later errors still show.
                        env.ints.insert(name.clone(), 1);
                    }
                },
            }
        }
        env
    }

    fn dims(&mut self, root: &SpecPath, mut env: Env) -> (Env, Vec<(String, u64)>) {
        let mut out = Vec::new();
        for (name, bound) in &self.spec.dims.0 {
            let path = root.field("dims").key(name);
            if env.ints.contains_key(name) || env.floats.contains_key(name) {
                self.report(Diagnostic::at(
                    path.clone(),
                    format!("dim `{name}` has the name of a config entry"),
                ));
            }
            let b = match bound {
                IntExpr::Lit(v) => Ok(*v),
                IntExpr::Expr(e) => env.int(e),
            };
            match b {
                Ok(v) if v > 0 => out.push((name.clone(), v as u64)),
                Ok(v) => self.report(Diagnostic::at(
                    path,
                    format!("dim `{name}` has bound {v}; bounds must be positive"),
                )),
                Err(m) => self.report(Diagnostic::at(path, m)),
            }
            env.dims.push(name.clone());
        }
        (env, out)
    }

    fn inputs(&mut self, root: &SpecPath, scope: &mut Scope) {
        for (name, decl) in &self.spec.inputs.0 {
            let path = root.field("inputs").key(name);
            let mut shape = Vec::new();
            let mut ok = true;
            for d in &decl.shape {
                match self.dim(d, &scope.env) {
                    Ok(d) => shape.push(d),
                    Err(m) => {
                        self.report(
                            Diagnostic::at(path.field("shape"), m)
                                .note("input shapes use names from `dims` and integer expressions"),
                        );
                        ok = false;
                    }
                }
            }
            if !ok {
                scope.vars.insert(name.clone(), Binding::Poisoned);
                continue;
            }
            let ty = TensorType::new(dtype(decl.dtype), shape);
            let default = match decl.default.map(|d| input_default(d, ty.dtype)).transpose() {
                Ok(d) => d,
                Err(m) => {
                    self.report(Diagnostic::at(path.field("default"), m));
                    scope.vars.insert(name.clone(), Binding::Poisoned);
                    continue;
                }
            };
            match self.g.add(
                Op::Input {
                    name: name.clone(),
                    ty,
                    default,
                },
                &[],
                name.clone(),
            ) {
                Ok(id) => {
                    scope.vars.insert(name.clone(), Binding::Node(id));
                }
                Err(e) => self.report(Diagnostic::at(path, e.to_string())),
            }
        }
    }

    fn dim(&self, d: &IntExpr, env: &Env) -> Result<Dim, String> {
        match d {
            IntExpr::Lit(v) if *v > 0 => Ok(Dim::known(*v as u64)),
            IntExpr::Lit(v) => Err(format!("dimension {v} must be positive")),
            IntExpr::Expr(e) => env.dim(e),
        }
    }

    fn body(&mut self, body: &Ordered<Layer>, scope: &mut Scope) {
        for (name, layer) in &body.0 {
            let path = scope.base.key(name);
            if scope.vars.contains_key(name) {
                self.report(
                    Diagnostic::at(path.clone(), format!("`{name}` is already bound in this body"))
                        .label("second binding"),
                );
                continue;
            }
            match self.layer(name, layer, &path, scope) {
                Ok(outs) => {
                    for (n, id) in outs {
                        scope.vars.insert(n, Binding::Node(id));
                    }
                }
                Err(LErr::Diag(d)) => {
                    self.report(d);
                    scope.vars.insert(name.clone(), Binding::Poisoned);
                }
                Err(LErr::Poisoned) => {
                    scope.vars.insert(name.clone(), Binding::Poisoned);
                }
            }
        }
    }

    // ----- small helpers -----

    fn get(&self, scope: &Scope, path: &SpecPath, field: &str, name: &str) -> LResult<NodeId> {
        match scope.lookup(name) {
            Some(Binding::Node(id)) => Ok(id),
            Some(Binding::Poisoned) => Err(LErr::Poisoned),
            None => Err(undefined(path.field(field), name, scope).into()),
        }
    }

    fn ty(&self, id: NodeId) -> TensorType {
        self.g.node(id).ty.clone()
    }

    fn int(&self, e: &IntExpr, env: &Env, path: &SpecPath, field: &str) -> LResult<i64> {
        match e {
            IntExpr::Lit(v) => Ok(*v),
            IntExpr::Expr(s) => env.int(s).map_err(|m| Diagnostic::at(path.field(field), m).into()),
        }
    }

    fn pos(&self, e: &IntExpr, env: &Env, path: &SpecPath, field: &str) -> LResult<u64> {
        let v = self.int(e, env, path, field)?;
        if v <= 0 {
            return Err(Diagnostic::at(path.field(field), format!("`{field}` is {v}, but must be positive")).into());
        }
        Ok(v as u64)
    }

    fn float(&self, e: &FloatExpr, env: &Env, path: &SpecPath, field: &str) -> LResult<f64> {
        match e {
            FloatExpr::Lit(v) => Ok(*v),
            FloatExpr::Expr(s) => env.float(s).map_err(|m| Diagnostic::at(path.field(field), m).into()),
        }
    }

    fn axis(&self, axis: i64, rank: usize, path: &SpecPath, field: &str) -> LResult<usize> {
        let a = if axis < 0 { axis + rank as i64 } else { axis };
        if a < 0 || a >= rank as i64 {
            return Err(Diagnostic::at(
                path.field(field),
                format!("axis {axis} is out of range for a tensor of rank {rank}"),
            )
            .into());
        }
        Ok(a as usize)
    }

    fn add(&mut self, op: Op, args: &[NodeId], name: String, path: &SpecPath, kind: &str) -> LResult<NodeId> {
        self.g.add(op, args, name).map_err(|e| {
            let msg = match e {
                GraphError::Type { source, .. } => format!("{kind}: {source}"),
                other => format!("{kind}: {other}"),
            };
            Diagnostic::at(path.clone(), msg).label("shapes do not fit here").into()
        })
    }

    fn scalar(&mut self, v: f64, dt: DType, name: &str) -> NodeId {
        let value = if dt.is_float() {
            Literal::float(v)
        } else {
            Literal::Int(v as i64)
        };
        self.g
            .add(Op::Scalar { value, dtype: dt }, &[], format!("{name}/const"))
            .expect("a scalar of a numeric dtype is well typed")
    }

    fn param(
        &mut self,
        template: &str,
        shape: &[u64],
        role: ParamRole,
        env: &Env,
        path: &SpecPath,
        field: &str,
    ) -> LResult<NodeId> {
        let name = env
            .template(template)
            .map_err(|m| Diagnostic::at(path.field(field), m))?;
        let name = format!("{}{name}", self.weight_prefix);
        let elements = shape.iter().try_fold(1u64, |a, d| a.checked_mul(*d));
        if elements.is_none_or(|n| n > MAX_PARAM_ELEMENTS) {
            return Err(Diagnostic::at(
                path.field(field),
                format!("weight `{name}` would have shape {shape:?}, more than {MAX_PARAM_ELEMENTS} elements"),
            )
            .into());
        }
        let ty = TensorType::new(DType::F32, shape.iter().map(|d| Dim::known(*d)).collect());
        if let Some(&i) = self.param_index.get(&name) {
            let p = &self.params[i];
            if p.ty != ty {
                return Err(Diagnostic::at(
                    path.field(field),
                    format!("weight `{name}` is used as {ty} here but as {} elsewhere", p.ty),
                )
                .note(format!("first used at {}", p.path))
                .into());
            }
            return Ok(p.node);
        }
        let node = self
            .g
            .add(
                Op::Param {
                    name: name.clone(),
                    ty: ty.clone(),
                },
                &[],
                name.clone(),
            )
            .expect("params have no operands");
        self.param_index.insert(name.clone(), self.params.len());
        self.params.push(ParamDecl {
            name,
            ty,
            path: path.field(field),
            role,
            node,
        });
        Ok(node)
    }

    fn bin(
        &mut self,
        op: BinaryOp,
        a: NodeId,
        b: NodeId,
        name: String,
        path: &SpecPath,
        kind: &str,
    ) -> LResult<NodeId> {
        self.add(Op::Binary(op), &[a, b], name, path, kind)
    }

    fn un(&mut self, op: UnaryOp, a: NodeId, name: String, path: &SpecPath, kind: &str) -> LResult<NodeId> {
        self.add(Op::Unary(op), &[a], name, path, kind)
    }

    fn float_input(&self, id: NodeId, path: &SpecPath, field: &str, kind: &str) -> LResult<TensorType> {
        let t = self.ty(id);
        if !t.dtype.is_float() {
            return Err(Diagnostic::at(
                path.field(field),
                format!("{kind} needs a float tensor, but this is {t}"),
            )
            .into());
        }
        Ok(t)
    }

    fn weight_names(
        &self,
        param: &Option<String>,
        weight: &Option<String>,
        bias: &Option<BiasField>,
        path: &SpecPath,
        kind: &str,
    ) -> LResult<(String, Option<String>)> {
        let w = match (param, weight) {
            (Some(p), None) => format!("{p}.weight"),
            (None, Some(w)) => w.clone(),
            (Some(_), Some(_)) => {
                return Err(Diagnostic::at(
                    path.field("weight"),
                    format!("{kind} takes `param` (a name prefix) or `weight` (a full name), not both"),
                )
                .into())
            }
            (None, None) => {
                return Err(Diagnostic::at(
                    path.clone(),
                    format!(
                    "{kind} needs `param: \"prefix\"` (binds prefix.weight and prefix.bias) or `weight: \"full.name\"`"
                ),
                )
                .into())
            }
        };
        let b = match (bias, param) {
            (Some(BiasField::Name(n)), _) => Some(n.clone()),
            (Some(BiasField::Flag(false)), _) => None,
            (Some(BiasField::Flag(true)) | None, Some(p)) => Some(format!("{p}.bias")),
            (None, None) => None,
            (Some(BiasField::Flag(true)), None) => {
                return Err(Diagnostic::at(
                    path.field("bias"),
                    "`bias: true` needs `param` to name the bias; write `bias: \"full.name\"`",
                )
                .into())
            }
        };
        Ok((w, b))
    }

    fn check_last(&self, x: NodeId, want: u64, path: &SpecPath, field: &str, kind: &str, what: &str) -> LResult<()> {
        let t = self.ty(x);
        if last(&t) != Some(&Dim::known(want)) {
            return Err(Diagnostic::at(
                path.field(field),
                format!("{kind} expects the last axis of its input to be {what} = {want}, but this is {t}"),
            )
            .label("shape mismatch")
            .into());
        }
        Ok(())
    }

    // ----- layers -----

    fn layer(
        &mut self,
        name: &str,
        layer: &Layer,
        path: &SpecPath,
        scope: &mut Scope,
    ) -> LResult<Vec<(String, NodeId)>> {
        let kind = layer.kind();
        let n = format!("{}{name}", scope.prefix);
        let one = |id: NodeId| Ok(vec![(name.to_string(), id)]);
        match layer {
            Layer::Embedding { ids, weight, rows, dim } => {
                let rows = self.pos(rows, &scope.env, path, "rows")?;
                let dim = self.pos(dim, &scope.env, path, "dim")?;
                let i = self.get(scope, path, "ids", ids)?;
                let it = self.ty(i);
                if !it.dtype.is_int() {
                    return Err(Diagnostic::at(
                        path.field("ids"),
                        format!("Embedding ids must be integers, but `{ids}` is {it}"),
                    )
                    .into());
                }
                let w = self.param(weight, &[rows, dim], ParamRole::Table, &scope.env, path, "weight")?;
                one(self.add(Op::Gather { axis: 0 }, &[w, i], n, path, kind)?)
            }
            Layer::Positions {
                of,
                axis: _,
                padding_idx: Some(pad),
            } => {
                let pad = self.int(pad, &scope.env, path, "padding_idx")?;
                let x = self.get(scope, path, "of", of)?;
                one(self.padded_positions(x, pad, &n, path)?)
            }
            Layer::Positions { of, axis, .. } => {
                let x = self.get(scope, path, "of", of)?;
                let t = self.ty(x);
                let ax = self.axis(*axis, t.rank(), path, "axis")?;
                if let Some(d) = &self.decode {
                    // Decoding: the runtime supplies each token's position (cached tokens come first).
                    if t.rank() == 2 && ax == 1 && t.shape[1] == d.seq {
                        return one(d.positions);
                    }
                    return Err(Diagnostic::at(
                        path.field("of"),
                        format!("when decoding, positions are those of the token ids [batch, seq]; `{of}` is {t}"),
                    )
                    .into());
                }
                one(self.add(
                    Op::Iota {
                        len: t.shape[ax].clone(),
                        dtype: DType::I64,
                    },
                    &[],
                    n,
                    path,
                    kind,
                )?)
            }
            Layer::Linear {
                x,
                param,
                weight,
                bias,
                in_features,
                out_features,
                layout,
                full,
            } => {
                // Config fields first: their errors do not depend on earlier layers having lowered.
                let fin = self.pos(in_features, &scope.env, path, "in_features")?;
                let fout = self.pos(out_features, &scope.env, path, "out_features")?;
                let (shape, tb) = match layout {
                    Layout::OutIn => ([fout, fin], true),
                    Layout::InOut => ([fin, fout], false),
                };
                let stored = self.full_shape(full, shape, &scope.env, path)?;
                let xi = self.get(scope, path, "x", x)?;
                self.float_input(xi, path, "x", kind)?;
                self.check_last(xi, fin, path, "x", kind, "in_features")?;
                let (wn, bn) = self.weight_names(param, weight, bias, path, kind)?;
                let wfield = if param.is_some() { "param" } else { "weight" };
                let w = self.param(&wn, &stored, ParamRole::Matrix, &scope.env, path, wfield)?;
                let w = self.leading(w, &shape, &format!("{n}/weight"), path)?;
                let mut y = self.add(
                    Op::MatMul {
                        transpose_a: false,
                        transpose_b: tb,
                    },
                    &[xi, w],
                    format!("{n}/matmul"),
                    path,
                    kind,
                )?;
                if let Some(bn) = bn {
                    let bfield = if matches!(bias, Some(BiasField::Name(_))) {
                        "bias"
                    } else {
                        wfield
                    };
                    let out_axis = usize::from(*layout == Layout::InOut);
                    let b = self.param(&bn, &[stored[out_axis]], ParamRole::Bias, &scope.env, path, bfield)?;
                    let b = self.leading(b, &[fout], &format!("{n}/bias_used"), path)?;
                    y = self.bin(BinaryOp::Add, y, b, format!("{n}/bias"), path, kind)?;
                }
                one(y)
            }
            Layer::BlockLinear { .. } => one(self.block_linear(layer, &n, path, scope)?),
            Layer::Moe { .. } => one(self.moe(layer, &n, path, scope)?),
            Layer::LayerNorm {
                x,
                param,
                weight,
                bias,
                dim,
                eps,
            } => {
                let d = self.pos(dim, &scope.env, path, "dim")?;
                let eps = self.float(eps, &scope.env, path, "eps")?;
                let xi = self.get(scope, path, "x", x)?;
                let t = self.float_input(xi, path, "x", kind)?;
                self.check_last(xi, d, path, "x", kind, "dim")?;
                let (wn, bn) = self.weight_names(param, weight, bias, path, kind)?;
                let wfield = if param.is_some() { "param" } else { "weight" };
                let ax = vec![t.rank() - 1];
                let mean = self.add(
                    Op::Reduce {
                        op: ReduceOp::Mean,
                        axes: ax.clone(),
                        keep_dims: true,
                    },
                    &[xi],
                    format!("{n}/mean"),
                    path,
                    kind,
                )?;
                let xc = self.bin(BinaryOp::Sub, xi, mean, format!("{n}/center"), path, kind)?;
                let sq = self.bin(BinaryOp::Mul, xc, xc, format!("{n}/square"), path, kind)?;
                let var = self.add(
                    Op::Reduce {
                        op: ReduceOp::Mean,
                        axes: ax,
                        keep_dims: true,
                    },
                    &[sq],
                    format!("{n}/var"),
                    path,
                    kind,
                )?;
                let e = self.scalar(eps, t.dtype, &format!("{n}/eps"));
                let ve = self.bin(BinaryOp::Add, var, e, format!("{n}/var_eps"), path, kind)?;
                let r = self.un(UnaryOp::Rsqrt, ve, format!("{n}/rstd"), path, kind)?;
                let y = self.bin(BinaryOp::Mul, xc, r, format!("{n}/normalize"), path, kind)?;
                let w = self.param(&wn, &[d], ParamRole::Scale, &scope.env, path, wfield)?;
                let mut y = self.bin(BinaryOp::Mul, y, w, format!("{n}/scale"), path, kind)?;
                if let Some(bn) = bn {
                    let bfield = if matches!(bias, Some(BiasField::Name(_))) {
                        "bias"
                    } else {
                        wfield
                    };
                    let b = self.param(&bn, &[d], ParamRole::Bias, &scope.env, path, bfield)?;
                    y = self.bin(BinaryOp::Add, y, b, format!("{n}/shift"), path, kind)?;
                }
                one(y)
            }
            Layer::RMSNorm {
                x,
                param,
                weight,
                dim,
                eps,
            } => {
                let d = self.pos(dim, &scope.env, path, "dim")?;
                let eps = self.float(eps, &scope.env, path, "eps")?;
                let xi = self.get(scope, path, "x", x)?;
                let t = self.float_input(xi, path, "x", kind)?;
                self.check_last(xi, d, path, "x", kind, "dim")?;
                let (wn, _) = self.weight_names(param, weight, &Some(BiasField::Flag(false)), path, kind)?;
                let wfield = if param.is_some() { "param" } else { "weight" };
                let sq = self.bin(BinaryOp::Mul, xi, xi, format!("{n}/square"), path, kind)?;
                let ms = self.add(
                    Op::Reduce {
                        op: ReduceOp::Mean,
                        axes: vec![t.rank() - 1],
                        keep_dims: true,
                    },
                    &[sq],
                    format!("{n}/mean_square"),
                    path,
                    kind,
                )?;
                let e = self.scalar(eps, t.dtype, &format!("{n}/eps"));
                let me = self.bin(BinaryOp::Add, ms, e, format!("{n}/ms_eps"), path, kind)?;
                let r = self.un(UnaryOp::Rsqrt, me, format!("{n}/rrms"), path, kind)?;
                let y = self.bin(BinaryOp::Mul, xi, r, format!("{n}/normalize"), path, kind)?;
                let w = self.param(&wn, &[d], ParamRole::Scale, &scope.env, path, wfield)?;
                one(self.bin(BinaryOp::Mul, y, w, format!("{n}/scale"), path, kind)?)
            }
            Layer::Gelu { x } => {
                let xi = self.get(scope, path, "x", x)?;
                let t = self.float_input(xi, path, "x", kind)?;
                let c = self.scalar(std::f64::consts::FRAC_1_SQRT_2, t.dtype, &n);
                let xs = self.bin(BinaryOp::Mul, xi, c, format!("{n}/scale"), path, kind)?;
                let e = self.un(UnaryOp::Erf, xs, format!("{n}/erf"), path, kind)?;
                let one_ = self.scalar(1.0, t.dtype, &n);
                let e1 = self.bin(BinaryOp::Add, e, one_, format!("{n}/add_one"), path, kind)?;
                let half = self.scalar(0.5, t.dtype, &n);
                let hx = self.bin(BinaryOp::Mul, xi, half, format!("{n}/half_x"), path, kind)?;
                one(self.bin(BinaryOp::Mul, hx, e1, format!("{n}/gelu"), path, kind)?)
            }
            Layer::GeluTanh { x } => {
                let xi = self.get(scope, path, "x", x)?;
                let t = self.float_input(xi, path, "x", kind)?;
                let x2 = self.bin(BinaryOp::Mul, xi, xi, format!("{n}/x2"), path, kind)?;
                let x3 = self.bin(BinaryOp::Mul, x2, xi, format!("{n}/x3"), path, kind)?;
                let k = self.scalar(0.044715, t.dtype, &n);
                let kx3 = self.bin(BinaryOp::Mul, x3, k, format!("{n}/cubic"), path, kind)?;
                let inner = self.bin(BinaryOp::Add, xi, kx3, format!("{n}/inner"), path, kind)?;
                let c = self.scalar((2.0 / std::f64::consts::PI).sqrt(), t.dtype, &n);
                let s = self.bin(BinaryOp::Mul, inner, c, format!("{n}/scaled"), path, kind)?;
                let th = self.un(UnaryOp::Tanh, s, format!("{n}/tanh"), path, kind)?;
                let one_ = self.scalar(1.0, t.dtype, &n);
                let t1 = self.bin(BinaryOp::Add, th, one_, format!("{n}/add_one"), path, kind)?;
                let half = self.scalar(0.5, t.dtype, &n);
                let hx = self.bin(BinaryOp::Mul, xi, half, format!("{n}/half_x"), path, kind)?;
                one(self.bin(BinaryOp::Mul, hx, t1, format!("{n}/gelu"), path, kind)?)
            }
            Layer::Silu { x } => {
                let xi = self.get(scope, path, "x", x)?;
                self.float_input(xi, path, "x", kind)?;
                let s = self.un(UnaryOp::Sigmoid, xi, format!("{n}/sigmoid"), path, kind)?;
                one(self.bin(BinaryOp::Mul, xi, s, format!("{n}/silu"), path, kind)?)
            }
            Layer::Relu { x } | Layer::Tanh { x } | Layer::Sigmoid { x } => {
                let xi = self.get(scope, path, "x", x)?;
                self.float_input(xi, path, "x", kind)?;
                let op = match layer {
                    Layer::Relu { .. } => UnaryOp::Relu,
                    Layer::Tanh { .. } => UnaryOp::Tanh,
                    _ => UnaryOp::Sigmoid,
                };
                one(self.un(op, xi, n, path, kind)?)
            }
            Layer::Softmax { x, axis } => {
                let xi = self.get(scope, path, "x", x)?;
                let t = self.float_input(xi, path, "x", kind)?;
                let ax = self.axis(*axis, t.rank(), path, "axis")?;
                one(self.softmax(xi, ax, &n, path)?)
            }
            Layer::Add { a, b } | Layer::Sub { a, b } | Layer::Mul { a, b } => {
                let ai = self.get(scope, path, "a", a)?;
                let bi = self.get(scope, path, "b", b)?;
                let op = match layer {
                    Layer::Add { .. } => BinaryOp::Add,
                    Layer::Sub { .. } => BinaryOp::Sub,
                    _ => BinaryOp::Mul,
                };
                one(self.bin(op, ai, bi, n, path, kind)?)
            }
            Layer::Scale { x, by } => {
                let xi = self.get(scope, path, "x", x)?;
                let t = self.float_input(xi, path, "x", kind)?;
                let by = self.float(by, &scope.env, path, "by")?;
                let c = self.scalar(by, t.dtype, &n);
                one(self.bin(BinaryOp::Mul, xi, c, n, path, kind)?)
            }
            Layer::Attention {
                q,
                k,
                v,
                heads,
                kv_heads,
                causal,
                mask,
                rope,
                scale,
                window,
            } => {
                let h = self.pos(heads, &scope.env, path, "heads")?;
                let window = match window {
                    Some(_) if !*causal => {
                        return Err(Diagnostic::at(
                            path.field("window"),
                            "a sliding window needs causal attention (`causal: true`)",
                        )
                        .into())
                    }
                    Some(w) => Some(self.pos(w, &scope.env, path, "window")?),
                    None => None,
                };
                let kvh = match kv_heads {
                    Some(e) => self.pos(e, &scope.env, path, "kv_heads")?,
                    None => h,
                };
                let scale = match scale {
                    Some(s) => Some(self.float(s, &scope.env, path, "scale")?),
                    None => None,
                };
                let qi = self.get(scope, path, "q", q)?;
                let ki = self.get(scope, path, "k", k)?;
                let vi = self.get(scope, path, "v", v)?;
                let mi = match mask {
                    Some(m) => Some(self.get(scope, path, "mask", m)?),
                    None => None,
                };
                let a = AttnArgs {
                    q: qi,
                    k: ki,
                    v: vi,
                    mask: mi,
                    heads: h,
                    kv_heads: kvh,
                    causal: *causal,
                    rope: rope.clone(),
                    scale,
                    window,
                };
                one(self.attention(a, &n, path, &scope.env)?)
            }
            Layer::Conv { .. } => one(self.conv(layer, &n, path, scope)?),
            Layer::Concat { xs, axis } => one(self.concat(xs, *axis, &n, path, scope)?),
            Layer::Param { weight, shape } => one(self.param_layer(weight, shape, path, scope)?),
            Layer::SoftCap { x, cap } => one(self.soft_cap(x, cap, &n, path, scope)?),
            Layer::Split { x, parts, sizes, axis } => {
                let xi = self.get(scope, path, "x", x)?;
                let t = self.ty(xi);
                let ax = self.axis(*axis, t.rank(), path, "axis")?;
                let Some(extent) = t.shape[ax].as_known() else {
                    return Err(Diagnostic::at(
                        path.field("axis"),
                        format!("Split along a symbolic axis ({}) is not supported", t.shape[ax]),
                    )
                    .into());
                };
                let sizes: Vec<u64> = match (parts, sizes) {
                    (Some(p), None) => {
                        let p = self.pos(p, &scope.env, path, "parts")?;
                        if extent % p != 0 {
                            return Err(Diagnostic::at(
                                path.field("parts"),
                                format!(
                                    "axis {ax} of {t} has extent {extent}, which does not split into {p} equal parts"
                                ),
                            )
                            .into());
                        }
                        vec![extent / p; p as usize]
                    }
                    (None, Some(s)) => {
                        let mut v = Vec::new();
                        for e in s {
                            v.push(self.pos(e, &scope.env, path, "sizes")?);
                        }
                        if v.iter().sum::<u64>() != extent {
                            return Err(Diagnostic::at(
                                path.field("sizes"),
                                format!(
                                    "sizes {v:?} add up to {}, but axis {ax} of {t} has extent {extent}",
                                    v.iter().sum::<u64>()
                                ),
                            )
                            .into());
                        }
                        v
                    }
                    _ => {
                        return Err(
                            Diagnostic::at(path.clone(), "Split needs exactly one of `parts` or `sizes`").into(),
                        )
                    }
                };
                let mut out = Vec::new();
                let mut start = 0;
                for (i, s) in sizes.iter().enumerate() {
                    let id = self.add(
                        Op::Slice {
                            axis: ax,
                            start,
                            end: start + s,
                        },
                        &[xi],
                        format!("{n}.{i}"),
                        path,
                        kind,
                    )?;
                    out.push((format!("{name}.{i}"), id));
                    start += s;
                }
                Ok(out)
            }
            Layer::Slice { x, axis, start, end } => {
                let xi = self.get(scope, path, "x", x)?;
                let t = self.ty(xi);
                let ax = self.axis(*axis, t.rank(), path, "axis")?;
                let s = self.int(start, &scope.env, path, "start")?;
                let e = self.int(end, &scope.env, path, "end")?;
                if s < 0 || e <= s {
                    return Err(Diagnostic::at(path.clone(), format!("Slice {s}..{e} is empty or negative")).into());
                }
                if t.shape[ax].as_known().is_none() {
                    return one(self.slice_symbolic(xi, ax, (s as u64, e as u64), &n, path)?);
                }
                one(self.add(
                    Op::Slice {
                        axis: ax,
                        start: s as u64,
                        end: e as u64,
                    },
                    &[xi],
                    n,
                    path,
                    kind,
                )?)
            }
            Layer::MatMul { a, b, transpose_b } => {
                let ai = self.get(scope, path, "a", a)?;
                let bi = self.get(scope, path, "b", b)?;
                one(self.add(
                    Op::MatMul {
                        transpose_a: false,
                        transpose_b: *transpose_b,
                    },
                    &[ai, bi],
                    n,
                    path,
                    kind,
                )?)
            }
            Layer::Reshape { x, shape } => {
                let xi = self.get(scope, path, "x", x)?;
                let mut dims = Vec::new();
                for d in shape {
                    dims.push(
                        self.dim(d, &scope.env)
                            .map_err(|m| Diagnostic::at(path.field("shape"), m))?,
                    );
                }
                one(self.add(Op::Reshape { shape: dims }, &[xi], n, path, kind)?)
            }
            Layer::Transpose { x, perm } => {
                let xi = self.get(scope, path, "x", x)?;
                let r = self.ty(xi).rank();
                let mut p = Vec::new();
                for a in perm {
                    p.push(self.axis(*a, r, path, "perm")?);
                }
                one(self.add(Op::Transpose { perm: p }, &[xi], n, path, kind)?)
            }
            Layer::Mean { x, axes, keep_dims } => {
                let xi = self.get(scope, path, "x", x)?;
                let t = self.float_input(xi, path, "x", kind)?;
                let mut ax = Vec::new();
                for a in axes {
                    ax.push(self.axis(*a, t.rank(), path, "axes")?);
                }
                ax.sort_unstable();
                ax.dedup();
                one(self.add(
                    Op::Reduce {
                        op: ReduceOp::Mean,
                        axes: ax,
                        keep_dims: *keep_dims,
                    },
                    &[xi],
                    n,
                    path,
                    kind,
                )?)
            }
            Layer::MeanPool { x, mask } => {
                let xi = self.get(scope, path, "x", x)?;
                let mi = self.get(scope, path, "mask", mask)?;
                let t = self.float_input(xi, path, "x", kind)?;
                let mt = self.ty(mi);
                if t.rank() != 3 || mt.rank() != 2 || mt.shape[..] != t.shape[..2] {
                    return Err(Diagnostic::at(
                        path.clone(),
                        format!("MeanPool needs x [batch, seq, d] and mask [batch, seq]; got {t} and {mt}"),
                    )
                    .into());
                }
                let mf = self.add(Op::Cast { to: t.dtype }, &[mi], format!("{n}/mask_float"), path, kind)?;
                let mut s3 = mt.shape.clone();
                s3.push(Dim::known(1));
                let m3 = self.add(Op::Reshape { shape: s3 }, &[mf], format!("{n}/mask3"), path, kind)?;
                let xm = self.bin(BinaryOp::Mul, xi, m3, format!("{n}/masked"), path, kind)?;
                let num = self.add(
                    Op::Reduce {
                        op: ReduceOp::Sum,
                        axes: vec![1],
                        keep_dims: false,
                    },
                    &[xm],
                    format!("{n}/sum"),
                    path,
                    kind,
                )?;
                let den = self.add(
                    Op::Reduce {
                        op: ReduceOp::Sum,
                        axes: vec![1],
                        keep_dims: false,
                    },
                    &[m3],
                    format!("{n}/count"),
                    path,
                    kind,
                )?;
                let tiny = self.scalar(1e-9, t.dtype, &n);
                let den = self.bin(BinaryOp::Max, den, tiny, format!("{n}/clamp"), path, kind)?;
                one(self.bin(BinaryOp::Div, num, den, format!("{n}/mean"), path, kind)?)
            }
            Layer::L2Normalize { x } => {
                let xi = self.get(scope, path, "x", x)?;
                let t = self.float_input(xi, path, "x", kind)?;
                let sq = self.bin(BinaryOp::Mul, xi, xi, format!("{n}/square"), path, kind)?;
                let ss = self.add(
                    Op::Reduce {
                        op: ReduceOp::Sum,
                        axes: vec![t.rank() - 1],
                        keep_dims: true,
                    },
                    &[sq],
                    format!("{n}/sum_square"),
                    path,
                    kind,
                )?;
                let norm = self.un(UnaryOp::Sqrt, ss, format!("{n}/norm"), path, kind)?;
                let tiny = self.scalar(1e-12, t.dtype, &n);
                let norm = self.bin(BinaryOp::Max, norm, tiny, format!("{n}/clamp"), path, kind)?;
                one(self.bin(BinaryOp::Div, xi, norm, format!("{n}/normalize"), path, kind)?)
            }
            Layer::Repeat { block, x, times, index } => {
                let mut cur = self.get(scope, path, "x", x)?;
                let times = self.int(times, &scope.env, path, "times")?;
                if !(0..=MAX_REPEAT).contains(&times) {
                    return Err(Diagnostic::at(
                        path.field("times"),
                        format!("cannot repeat {times} times (0 to {MAX_REPEAT})"),
                    )
                    .into());
                }
                let b = self.block(block, path, scope)?;
                for i in 0..times {
                    let mut env = scope.env.clone();
                    env.ints.insert(index.clone(), i);
                    cur = self.expand(block, b, cur, env, format!("{n}.{i}/"), scope)?;
                }
                one(cur)
            }
            Layer::Call { block, x, vars } => {
                let xi = self.get(scope, path, "x", x)?;
                let b = self.block(block, path, scope)?;
                let mut env = scope.env.clone();
                for (k, e) in &vars.0 {
                    let v = self.int(e, &scope.env, &path.field("vars"), k)?;
                    env.ints.insert(k.clone(), v);
                }
                one(self.expand(block, b, xi, env, format!("{n}/"), scope)?)
            }
        }
    }

    fn block(&self, name: &str, path: &SpecPath, scope: &Scope) -> LResult<&'a Block> {
        let spec: &'a Spec = self.spec;
        match spec.blocks.0.iter().find(|(n, _)| n == name) {
            Some((_, b)) => {
                if scope.stack.iter().any(|s| s == name) {
                    return Err(Diagnostic::at(
                        path.field("block"),
                        format!("block `{name}` calls itself (through {})", scope.stack.join(" → ")),
                    )
                    .into());
                }
                Ok(b)
            }
            None => {
                let mut d =
                    Diagnostic::at(path.field("block"), format!("undefined block `{name}`")).label("no such block");
                if let Some(s) = crate::suggest(name, spec.blocks.0.iter().map(|(n, _)| n.as_str())) {
                    d = d.note(format!("did you mean `{s}`?"));
                }
                Err(d.into())
            }
        }
    }

    /// Lowers one application of a block to `x`, returning its output.
    fn expand(
        &mut self,
        name: &str,
        b: &'a Block,
        x: NodeId,
        env: Env,
        prefix: String,
        parent: &Scope,
    ) -> LResult<NodeId> {
        let mut stack = parent.stack.clone();
        stack.push(name.to_string());
        let base = SpecPath::default().field("blocks").key(name);
        let mut inner = Scope {
            vars: HashMap::new(),
            parent: Some(parent),
            env,
            prefix,
            base: base.field("body"),
            stack,
        };
        inner.vars.insert(b.input.clone(), Binding::Node(x));
        let before = self.diags.len();
        let seen_before = self.seen.len();
        self.body(&b.body, &mut inner);
        match inner.lookup(&b.output) {
            Some(Binding::Node(id)) => Ok(id),
            Some(Binding::Poisoned) => Err(LErr::Poisoned),
            None => {
                let d = undefined(base.field("output"), &b.output, &inner);
                if self.diags.len() == before && self.seen.len() == seen_before {
                    Err(d.into())
                } else {
                    Err(LErr::Poisoned)
                }
            }
        }
    }

    fn softmax(&mut self, x: NodeId, ax: usize, n: &str, path: &SpecPath) -> LResult<NodeId> {
        let kind = "Softmax";
        let m = self.add(
            Op::Reduce {
                op: ReduceOp::Max,
                axes: vec![ax],
                keep_dims: true,
            },
            &[x],
            format!("{n}/max"),
            path,
            kind,
        )?;
        let d = self.bin(BinaryOp::Sub, x, m, format!("{n}/shift"), path, kind)?;
        let e = self.un(UnaryOp::Exp, d, format!("{n}/exp"), path, kind)?;
        let s = self.add(
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![ax],
                keep_dims: true,
            },
            &[e],
            format!("{n}/sum"),
            path,
            kind,
        )?;
        self.bin(BinaryOp::Div, e, s, format!("{n}/softmax"), path, kind)
    }

    /// `[b, s, h*d]` to `[b, h, s, d]`.
    fn split_heads(&mut self, x: NodeId, h: u64, d: u64, n: &str, path: &SpecPath) -> LResult<NodeId> {
        let t = self.ty(x);
        let shape = vec![t.shape[0].clone(), t.shape[1].clone(), Dim::known(h), Dim::known(d)];
        let r = self.add(
            Op::Reshape { shape },
            &[x],
            format!("{n}/split_heads"),
            path,
            "Attention",
        )?;
        self.add(
            Op::Transpose { perm: vec![0, 2, 1, 3] },
            &[r],
            format!("{n}/heads_first"),
            path,
            "Attention",
        )
    }

    /// Rotary embedding of `x [b, h, s, d]` on its first `rd` features.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &mut self,
        x: NodeId,
        d: u64,
        rd: u64,
        theta: f64,
        style: RopeStyle,
        n: &str,
        path: &SpecPath,
    ) -> LResult<NodeId> {
        let kind = "Attention";
        let t = self.ty(x);
        let dt = t.dtype;
        let seq = t.shape[2].clone();
        let half = rd / 2;
        // inv_freq[j] = 1 / theta^(2j / rd), as transformers computes it.
        let j = self.add(
            Op::Iota {
                len: Dim::known(half),
                dtype: dt,
            },
            &[],
            format!("{n}/rope_j"),
            path,
            kind,
        )?;
        let two_over = self.scalar(2.0 / rd as f64, dt, n);
        let ex = self.bin(BinaryOp::Mul, j, two_over, format!("{n}/rope_exponent"), path, kind)?;
        let th = self.scalar(theta, dt, n);
        let p = self.bin(BinaryOp::Pow, th, ex, format!("{n}/rope_pow"), path, kind)?;
        let inv = self.un(UnaryOp::Recip, p, format!("{n}/inv_freq"), path, kind)?;
        // Positions as a column: [seq, 1] (all rows alike), or [batch, 1, seq, 1] when decoding.
        let pos2 = match self.decode.as_ref().map(|d| d.positions) {
            Some(p) => {
                let b = self.ty(p).shape[0].clone();
                let pf = self.add(Op::Cast { to: dt }, &[p], format!("{n}/rope_pos"), path, kind)?;
                self.add(
                    Op::Reshape {
                        shape: vec![b, Dim::known(1), seq.clone(), Dim::known(1)],
                    },
                    &[pf],
                    format!("{n}/rope_pos_col"),
                    path,
                    kind,
                )?
            }
            None => {
                let pos = self.add(
                    Op::Iota {
                        len: seq.clone(),
                        dtype: dt,
                    },
                    &[],
                    format!("{n}/rope_pos"),
                    path,
                    kind,
                )?;
                self.add(
                    Op::Reshape {
                        shape: vec![seq.clone(), Dim::known(1)],
                    },
                    &[pos],
                    format!("{n}/rope_pos_col"),
                    path,
                    kind,
                )?
            }
        };
        let freqs = self.bin(BinaryOp::Mul, pos2, inv, format!("{n}/rope_freqs"), path, kind)?;
        let fshape = self.ty(freqs).shape;
        let flast = fshape.len() - 1;
        let (xr, xpass) = if rd < d {
            let a = self.add(
                Op::Slice {
                    axis: 3,
                    start: 0,
                    end: rd,
                },
                &[x],
                format!("{n}/rope_part"),
                path,
                kind,
            )?;
            let b = self.add(
                Op::Slice {
                    axis: 3,
                    start: rd,
                    end: d,
                },
                &[x],
                format!("{n}/rope_pass"),
                path,
                kind,
            )?;
            (a, Some(b))
        } else {
            (x, None)
        };
        let rotated = match style {
            RopeStyle::Half => {
                let emb = self.add(
                    Op::Concat { axis: flast },
                    &[freqs, freqs],
                    format!("{n}/rope_emb"),
                    path,
                    kind,
                )?;
                let cos = self.un(UnaryOp::Cos, emb, format!("{n}/rope_cos"), path, kind)?;
                let sin = self.un(UnaryOp::Sin, emb, format!("{n}/rope_sin"), path, kind)?;
                let x1 = self.add(
                    Op::Slice {
                        axis: 3,
                        start: 0,
                        end: half,
                    },
                    &[xr],
                    format!("{n}/rope_x1"),
                    path,
                    kind,
                )?;
                let x2 = self.add(
                    Op::Slice {
                        axis: 3,
                        start: half,
                        end: rd,
                    },
                    &[xr],
                    format!("{n}/rope_x2"),
                    path,
                    kind,
                )?;
                let nx2 = self.un(UnaryOp::Neg, x2, format!("{n}/rope_neg_x2"), path, kind)?;
                let rot = self.add(
                    Op::Concat { axis: 3 },
                    &[nx2, x1],
                    format!("{n}/rope_rotate_half"),
                    path,
                    kind,
                )?;
                let a = self.bin(BinaryOp::Mul, xr, cos, format!("{n}/rope_xcos"), path, kind)?;
                let b = self.bin(BinaryOp::Mul, rot, sin, format!("{n}/rope_rsin"), path, kind)?;
                self.bin(BinaryOp::Add, a, b, format!("{n}/rope"), path, kind)?
            }
            RopeStyle::Interleaved => {
                let mut s5 = t.shape[..3].to_vec();
                s5.push(Dim::known(half));
                s5.push(Dim::known(2));
                let x5 = self.add(Op::Reshape { shape: s5 }, &[xr], format!("{n}/rope_pairs"), path, kind)?;
                let xe = self.add(
                    Op::Slice {
                        axis: 4,
                        start: 0,
                        end: 1,
                    },
                    &[x5],
                    format!("{n}/rope_even"),
                    path,
                    kind,
                )?;
                let xo = self.add(
                    Op::Slice {
                        axis: 4,
                        start: 1,
                        end: 2,
                    },
                    &[x5],
                    format!("{n}/rope_odd"),
                    path,
                    kind,
                )?;
                let mut f3shape = fshape.clone();
                f3shape.push(Dim::known(1));
                let f3 = self.add(
                    Op::Reshape { shape: f3shape },
                    &[freqs],
                    format!("{n}/rope_freqs3"),
                    path,
                    kind,
                )?;
                let cos = self.un(UnaryOp::Cos, f3, format!("{n}/rope_cos"), path, kind)?;
                let sin = self.un(UnaryOp::Sin, f3, format!("{n}/rope_sin"), path, kind)?;
                let ec = self.bin(BinaryOp::Mul, xe, cos, format!("{n}/rope_ec"), path, kind)?;
                let os = self.bin(BinaryOp::Mul, xo, sin, format!("{n}/rope_os"), path, kind)?;
                let oc = self.bin(BinaryOp::Mul, xo, cos, format!("{n}/rope_oc"), path, kind)?;
                let es = self.bin(BinaryOp::Mul, xe, sin, format!("{n}/rope_es"), path, kind)?;
                let ne = self.bin(BinaryOp::Sub, ec, os, format!("{n}/rope_new_even"), path, kind)?;
                let no = self.bin(BinaryOp::Add, oc, es, format!("{n}/rope_new_odd"), path, kind)?;
                let c = self.add(Op::Concat { axis: 4 }, &[ne, no], format!("{n}/rope_join"), path, kind)?;
                let mut s4 = t.shape[..3].to_vec();
                s4.push(Dim::known(rd));
                self.add(Op::Reshape { shape: s4 }, &[c], format!("{n}/rope"), path, kind)?
            }
        };
        match xpass {
            Some(p) => self.add(
                Op::Concat { axis: 3 },
                &[rotated, p],
                format!("{n}/rope_full"),
                path,
                kind,
            ),
            None => Ok(rotated),
        }
    }

    fn attention(&mut self, a: AttnArgs, n: &str, path: &SpecPath, env: &Env) -> LResult<NodeId> {
        let kind = "Attention";
        let (qt, kt, vt) = (self.ty(a.q), self.ty(a.k), self.ty(a.v));
        for (t, f) in [(&qt, "q"), (&kt, "k"), (&vt, "v")] {
            if t.rank() != 3 || !t.dtype.is_float() {
                return Err(Diagnostic::at(
                    path.field(f),
                    format!("Attention expects `{f}` as a float [batch, seq, heads*head_dim] tensor, got {t}"),
                )
                .into());
            }
        }
        let Some(qd) = qt.shape[2].as_known() else {
            return Err(Diagnostic::at(
                path.field("q"),
                format!("the feature axis of `q` must be a constant, got {qt}"),
            )
            .into());
        };
        if qd % a.heads != 0 {
            return Err(Diagnostic::at(
                path.field("heads"),
                format!("the query has {qd} features, which do not split into {} heads", a.heads),
            )
            .into());
        }
        if !a.heads.is_multiple_of(a.kv_heads) {
            return Err(Diagnostic::at(
                path.field("kv_heads"),
                format!("heads = {} is not a multiple of kv_heads = {}", a.heads, a.kv_heads),
            )
            .into());
        }
        let d = qd / a.heads;
        for (t, f) in [(&kt, "k"), (&vt, "v")] {
            if t.shape[2] != Dim::known(a.kv_heads * d) {
                return Err(Diagnostic::at(
                    path.field(f),
                    format!(
                        "`{f}` must have kv_heads * head_dim = {} * {d} = {} features, got {t}",
                        a.kv_heads,
                        a.kv_heads * d
                    ),
                )
                .label("shape mismatch")
                .into());
            }
        }
        if kt.shape[..2] != vt.shape[..2] || qt.shape[0] != kt.shape[0] {
            return Err(Diagnostic::at(
                path.clone(),
                format!("q {qt}, k {kt} and v {vt} disagree on batch or sequence axes"),
            )
            .into());
        }
        let mut q = self.split_heads(a.q, a.heads, d, &format!("{n}/q"), path)?;
        let mut k = self.split_heads(a.k, a.kv_heads, d, &format!("{n}/k"), path)?;
        let mut v = self.split_heads(a.v, a.kv_heads, d, &format!("{n}/v"), path)?;
        if let Some(r) = &a.rope {
            let theta = self.float(&r.theta, env, &path.field("rope"), "theta")?;
            let rd = match &r.dim {
                Some(e) => self.pos(e, env, &path.field("rope"), "dim")?,
                None => d,
            };
            if rd > d || rd % 2 != 0 {
                return Err(Diagnostic::at(
                    path.field("rope").field("dim"),
                    format!("rotary dim {rd} must be even and at most head_dim = {d}"),
                )
                .into());
            }
            q = self.rope(q, d, rd, theta, r.style, &format!("{n}/q"), path)?;
            k = self.rope(k, d, rd, theta, r.style, &format!("{n}/k"), path)?;
        }
        let mut mask = a.mask;
        let mut causal_rows = None;
        if let Some(dec) = self.decode.clone() {
            let why = if !a.causal {
                Some("decoding (`--generate`) needs causal attention; this one is bidirectional (an encoder cannot generate)")
            } else if a.mask.is_some_and(|m| !self.is_padding_input(m)) {
                Some("decoding (`--generate`) masks padding itself: a mask here must be an optional input (default 1)")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(Diagnostic::at(path.clone(), why).into());
            }
            // Keys and values of the new tokens join the cache; attention reads all of it.
            for (x, tag) in [(&mut k, "k"), (&mut v, "v")] {
                let slot = self.decode.as_ref().map_or(0, |d| d.next_slot);
                *x = self.add(
                    Op::CacheAppend {
                        slot,
                        len: dec.kv.clone(),
                    },
                    &[*x],
                    format!("{n}/{tag}_cache"),
                    path,
                    kind,
                )?;
                self.decode.as_mut().expect("decoding").next_slot += 1;
            }
            mask = Some(dec.key_mask);
            causal_rows = Some(dec.slots);
        }
        let key_len = self.ty(k).shape[2].clone();
        if a.kv_heads != a.heads {
            // Grouped-query attention: query head j reads kv head j / (heads / kv_heads).
            let rep = a.heads / a.kv_heads;
            let (b, s) = (kt.shape[0].clone(), key_len.clone());
            let s5 = vec![
                b.clone(),
                Dim::known(a.kv_heads),
                Dim::known(1),
                s.clone(),
                Dim::known(d),
            ];
            let e5 = vec![
                b.clone(),
                Dim::known(a.kv_heads),
                Dim::known(rep),
                s.clone(),
                Dim::known(d),
            ];
            let s4 = vec![b, Dim::known(a.heads), s, Dim::known(d)];
            for (x, tag) in [(&mut k, "k"), (&mut v, "v")] {
                let r = self.add(
                    Op::Reshape { shape: s5.clone() },
                    &[*x],
                    format!("{n}/{tag}_group"),
                    path,
                    kind,
                )?;
                let e = self.add(
                    Op::Broadcast { shape: e5.clone() },
                    &[r],
                    format!("{n}/{tag}_repeat"),
                    path,
                    kind,
                )?;
                *x = self.add(
                    Op::Reshape { shape: s4.clone() },
                    &[e],
                    format!("{n}/{tag}_shared"),
                    path,
                    kind,
                )?;
            }
        }
        let dt = qt.dtype;
        let scores = self.add(
            Op::MatMul {
                transpose_a: false,
                transpose_b: true,
            },
            &[q, k],
            format!("{n}/scores"),
            path,
            kind,
        )?;
        let sc = self.scalar(a.scale.unwrap_or(1.0 / (d as f64).sqrt()), dt, n);
        let mut scores = self.bin(BinaryOp::Mul, scores, sc, format!("{n}/scaled"), path, kind)?;
        // Masks become one additive bias, as in transformers: 0 where a key may be attended, the
        // lowest finite f32 elsewhere (exp() makes those 0). The bias depends only on the inputs,
        // so every layer shares it after CSE, and the per-layer work stays pure f32 arithmetic.
        let lowest = self.scalar(f32::MIN as f64, dt, n);
        let zero_f = self.scalar(0.0, dt, n);
        let mut bias: Option<NodeId> = None;
        if a.causal {
            let (sq, sk) = (qt.shape[1].clone(), key_len.clone());
            // Query i sits at cache entry `cache_slots[i]` when decoding, at i otherwise.
            let rows = match causal_rows {
                Some(r) => r,
                None => self.add(
                    Op::Iota {
                        len: sq.clone(),
                        dtype: DType::I64,
                    },
                    &[],
                    format!("{n}/causal_rows"),
                    path,
                    kind,
                )?,
            };
            let rows = self.add(
                Op::Reshape {
                    shape: vec![sq, Dim::known(1)],
                },
                &[rows],
                format!("{n}/causal_rows_col"),
                path,
                kind,
            )?;
            let cols = self.add(
                Op::Iota {
                    len: sk,
                    dtype: DType::I64,
                },
                &[],
                format!("{n}/causal_cols"),
                path,
                kind,
            )?;
            let keep = self.add(
                Op::Compare(CmpOp::Ge),
                &[rows, cols],
                format!("{n}/causal_keep"),
                path,
                kind,
            )?;
            let inner = match a.window {
                Some(w) => self.window_bias(rows, cols, w, [zero_f, lowest], n, path)?,
                None => zero_f,
            };
            bias = Some(self.add(
                Op::Where,
                &[keep, inner, lowest],
                format!("{n}/causal_bias"),
                path,
                kind,
            )?);
        }
        if let Some(m) = mask {
            let mt = self.ty(m);
            if mt.rank() != 2 || mt.shape[0] != kt.shape[0] || mt.shape[1] != key_len {
                return Err(Diagnostic::at(
                    path.field("mask"),
                    format!(
                        "the padding mask must be [batch, seq] = [{}, {}], got {mt}",
                        kt.shape[0], key_len
                    ),
                )
                .into());
            }
            let zero = self.scalar(0.0, mt.dtype, &format!("{n}/mask"));
            let keep = self.add(Op::Compare(CmpOp::Ne), &[m, zero], format!("{n}/mask_keep"), path, kind)?;
            let shape = vec![mt.shape[0].clone(), Dim::known(1), Dim::known(1), mt.shape[1].clone()];
            let keep = self.add(Op::Reshape { shape }, &[keep], format!("{n}/mask_bcast"), path, kind)?;
            let inner = bias.unwrap_or(zero_f);
            bias = Some(self.add(Op::Where, &[keep, inner, lowest], format!("{n}/mask_bias"), path, kind)?);
        }
        if let Some(b) = bias {
            scores = self.bin(BinaryOp::Add, scores, b, format!("{n}/masked"), path, kind)?;
        }
        let p = self.softmax(scores, 3, &format!("{n}/probs"), path)?;
        let o = self.add(
            Op::MatMul {
                transpose_a: false,
                transpose_b: false,
            },
            &[p, v],
            format!("{n}/context"),
            path,
            kind,
        )?;
        let o = self.add(
            Op::Transpose { perm: vec![0, 2, 1, 3] },
            &[o],
            format!("{n}/seq_first"),
            path,
            kind,
        )?;
        let shape = vec![qt.shape[0].clone(), qt.shape[1].clone(), Dim::known(qd)];
        self.add(Op::Reshape { shape }, &[o], format!("{n}/merge_heads"), path, kind)
    }
}

impl Lowerer<'_> {
    /// A sliding window's part of the attention bias: `zero` where query row `i` may see key `j`
    /// (`i - j < window`), `lowest` elsewhere. `rows` is `[seq, 1]` and `cols` `[kv]`, both i64.
    fn window_bias(
        &mut self,
        rows: NodeId,
        cols: NodeId,
        window: u64,
        [zero, lowest]: [NodeId; 2],
        n: &str,
        path: &SpecPath,
    ) -> LResult<NodeId> {
        let kind = "Attention";
        let back = self.bin(BinaryOp::Sub, rows, cols, format!("{n}/window_distance"), path, kind)?;
        let w = self.scalar(window as f64, DType::I64, &format!("{n}/window"));
        let inside = self.add(
            Op::Compare(CmpOp::Lt),
            &[back, w],
            format!("{n}/window_keep"),
            path,
            kind,
        )?;
        self.add(
            Op::Where,
            &[inside, zero, lowest],
            format!("{n}/window_bias"),
            path,
            kind,
        )
    }
}

struct AttnArgs {
    q: NodeId,
    k: NodeId,
    v: NodeId,
    mask: Option<NodeId>,
    heads: u64,
    kv_heads: u64,
    causal: bool,
    rope: Option<Rope>,
    scale: Option<f64>,
    window: Option<u64>,
}
