//! The reference interpreter: executes any verified [`Graph`] in plain Rust.
//!
//! It is the ground truth every backend and every rewrite is checked against, so it favours
//! clarity and accuracy over speed: floats are computed in `f64` and rounded to the node's dtype
//! after every op (so an f32 graph sees f32 storage rounding, as a backend would), while matrix
//! products and reductions accumulate in `f64`.
//!
//! Assumes the graph passed [`kiln_ir::verify`]. Everything a caller supplies (inputs, weights)
//! is checked and reported as an [`InterpError`]; nothing a caller supplies can make it panic.

mod eval;
mod moe;
mod value;

use std::collections::{BTreeMap, HashMap};

use kiln_ir::{Bindings, Graph, Literal, NodeId, Op, Tensor};

pub use value::Value;

/// Evaluates one primitive op (not an input or param) on concrete values; `out` is its output type
/// and `bindings` give the symbolic dims. Used by runtimes for ops they have no kernel for.
pub fn eval_op(op: &Op, out: &kiln_ir::TensorType, args: &[&Value], bindings: &Bindings) -> Result<Value, String> {
    if matches!(op, Op::Input { .. } | Op::Param { .. }) {
        return Err("inputs and params are not evaluated by eval_op".into());
    }
    eval::eval(op, out, args, bindings)
}

/// Why a graph could not be executed with the given inputs and weights.
#[derive(Debug, thiserror::Error)]
pub enum InterpError {
    /// A declared input was not supplied.
    #[error("missing input `{0}`")]
    MissingInput(String),
    /// An input was supplied that the graph does not declare.
    #[error("unknown input `{name}` (the graph's inputs are: {expected})")]
    UnknownInput {
        /// The supplied name.
        name: String,
        /// The declared names.
        expected: String,
    },
    /// A supplied input does not fit the declared type.
    #[error("input `{name}`: {msg}")]
    BadInput {
        /// Input name.
        name: String,
        /// What does not fit.
        msg: String,
    },
    /// A weight is missing or does not fit its declared type.
    #[error("weight `{name}`: {msg}")]
    BadWeight {
        /// Weight name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// A node failed at run time (for example an embedding index out of range).
    #[error("node `{node}` ({op}): {msg}")]
    Node {
        /// Node name.
        node: String,
        /// Op mnemonic.
        op: &'static str,
        /// What went wrong.
        msg: String,
    },
}

/// The state of a decoding graph's key/value caches between runs: the entries of every slot.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    slots: BTreeMap<u32, Value>,
}

impl KvCache {
    /// Cached positions (0 before the first run).
    pub fn len(&self) -> usize {
        self.slots.values().next().map_or(0, |v| v.shape[2])
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&mut self, slot: u32, new: &Value, len: usize) -> Result<Value, String> {
        let t = new.shape[2];
        let past = self.slots.get(&slot).map_or(0, |v| v.shape[2]);
        if past + t != len {
            return Err(format!(
                "the cache holds {past} positions and {t} are appended, but the inputs say {len}"
            ));
        }
        let (b, h, d) = (new.shape[0], new.shape[1], new.shape[3]);
        if let Some(old) = self.slots.get(&slot) {
            if old.shape[0] != b || old.shape[1] != h || old.shape[3] != d {
                return Err(format!("appending {:?} to a cache of {:?}", new.shape, old.shape));
            }
        }
        let mut data = Vec::with_capacity(b * h * len * d);
        for bh in 0..b * h {
            if let Some(old) = self.slots.get(&slot) {
                data.extend_from_slice(&old.data[bh * past * d..(bh + 1) * past * d]);
            }
            data.extend_from_slice(&new.data[bh * t * d..(bh + 1) * t * d]);
        }
        let v = Value {
            dtype: new.dtype,
            shape: vec![b, h, len, d],
            data,
        };
        self.slots.insert(slot, v.clone());
        Ok(v)
    }
}

/// Runs `graph` on named `inputs` with `weights`, returning the outputs in declaration order.
/// A decoding graph starts from an empty cache (a prefill).
pub fn run(
    graph: &Graph,
    weights: &BTreeMap<String, Tensor>,
    inputs: &BTreeMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>, InterpError> {
    run_with_cache(graph, weights, inputs, &mut KvCache::default())
}

/// Runs a decoding graph one step further: its `cache_append` ops append to `cache`.
pub fn run_with_cache(
    graph: &Graph,
    weights: &BTreeMap<String, Tensor>,
    inputs: &BTreeMap<String, Tensor>,
    cache: &mut KvCache,
) -> Result<Vec<(String, Tensor)>, InterpError> {
    let bindings = bind_inputs(graph, inputs)?;
    let order = graph.topo_order().map_err(|n| InterpError::Node {
        node: graph.node(n).name.clone(),
        op: graph.node(n).op.mnemonic(),
        msg: "graph has a cycle (it was not verified)".into(),
    })?;
    // Free each value after its last use so memory tracks the live set, not the whole graph.
    let mut remaining: HashMap<NodeId, usize> = HashMap::new();
    for &id in &order {
        for a in graph.args(id) {
            *remaining.entry(a).or_default() += 1;
        }
    }
    for o in graph.outputs() {
        *remaining.entry(o.node).or_default() += 1;
    }
    let mut values: HashMap<NodeId, Value> = HashMap::new();
    for &id in &order {
        let node = graph.node(id);
        let args = graph.args(id);
        let v = match &node.op {
            Op::Input { name, ty, default } => match (inputs.get(name), default) {
                (Some(t), _) => Value::from_tensor(t, ty.dtype),
                (None, Some(d)) => Value::from_tensor(&filled(name, ty, *d, &bindings)?, ty.dtype),
                (None, None) => return Err(InterpError::MissingInput(name.clone())),
            },
            Op::Param { name, ty } => {
                let t = weights.get(name).ok_or_else(|| InterpError::BadWeight {
                    name: name.clone(),
                    msg: "not supplied".into(),
                })?;
                let want: Vec<usize> = ty.shape.iter().map(|d| d.as_known().unwrap_or(0) as usize).collect();
                if t.dtype() != ty.dtype || t.shape() != want.as_slice() {
                    return Err(InterpError::BadWeight {
                        name: name.clone(),
                        msg: format!("expected {ty}, got {}{:?}", t.dtype(), t.shape()),
                    });
                }
                Value::from_tensor(t, ty.dtype)
            }
            Op::CacheAppend { slot, len } => {
                let len = len.eval(&bindings).map_err(|msg| InterpError::Node {
                    node: node.name.clone(),
                    op: node.op.mnemonic(),
                    msg,
                })?;
                cache
                    .append(*slot, &values[&args[0]], len)
                    .map_err(|msg| InterpError::Node {
                        node: node.name.clone(),
                        op: node.op.mnemonic(),
                        msg,
                    })?
            }
            op => {
                let operands: Vec<&Value> = args.iter().map(|a| &values[a]).collect();
                eval::eval(op, &node.ty, &operands, &bindings).map_err(|msg| InterpError::Node {
                    node: node.name.clone(),
                    op: node.op.mnemonic(),
                    msg,
                })?
            }
        };
        values.insert(id, v);
        for a in args {
            let r = remaining.get_mut(&a).expect("every operand was counted");
            *r -= 1;
            if *r == 0 {
                values.remove(&a);
            }
        }
    }
    graph
        .outputs()
        .iter()
        .map(|o| {
            let v = &values[&o.node];
            Ok((o.name.clone(), v.to_tensor()))
        })
        .collect()
}

/// Optional input `name`, left out: its default `d` over the shape `bindings` give `ty`.
fn filled(name: &str, ty: &kiln_ir::TensorType, d: Literal, bindings: &Bindings) -> Result<Tensor, InterpError> {
    let bad = |msg: String| InterpError::BadInput {
        name: name.to_string(),
        msg,
    };
    let shape = ty
        .shape
        .iter()
        .map(|x| x.eval(bindings))
        .collect::<Result<Vec<usize>, String>>()
        .map_err(|s| bad(format!("left out, but only this input determines `{s}`: pass it")))?;
    let n = shape.iter().product();
    Tensor::from_f64(ty.dtype, shape, &vec![d.as_f64(); n]).map_err(|e| bad(format!("filling its default {d}: {e}")))
}

/// Checks inputs against the declared types and binds the symbolic dims they determine.
pub fn bind_inputs(graph: &Graph, inputs: &BTreeMap<String, Tensor>) -> Result<Bindings, InterpError> {
    let declared: Vec<(&str, &kiln_ir::TensorType, bool)> = graph
        .inputs()
        .iter()
        .filter_map(|i| match &graph.node(*i).op {
            Op::Input { name, ty, default } => Some((name.as_str(), ty, default.is_some())),
            _ => None,
        })
        .collect();
    for name in inputs.keys() {
        if !declared.iter().any(|(n, _, _)| n == name) {
            let expected: Vec<&str> = declared.iter().map(|(n, _, _)| *n).collect();
            return Err(InterpError::UnknownInput {
                name: name.clone(),
                expected: expected.join(", "),
            });
        }
    }
    let mut bindings = Bindings::new();
    let mut origin: BTreeMap<String, String> = BTreeMap::new();
    // Single-symbol axes bind first; products and constants are checked once everything is bound.
    for pass in 0..2 {
        for (name, ty, optional) in &declared {
            let Some(t) = inputs.get(*name) else {
                if *optional {
                    continue;
                }
                return Err(InterpError::MissingInput(name.to_string()));
            };
            let bad = |msg: String| InterpError::BadInput {
                name: name.to_string(),
                msg,
            };
            if t.dtype() != ty.dtype {
                return Err(bad(format!("expected dtype {}, got {}", ty.dtype, t.dtype())));
            }
            if t.shape().len() != ty.rank() {
                return Err(bad(format!(
                    "expected shape {ty} (rank {}), got {:?}",
                    ty.rank(),
                    t.shape()
                )));
            }
            for (axis, (d, &actual)) in ty.shape.iter().zip(t.shape()).enumerate() {
                let syms = d.symbols();
                if pass == 0 && syms.len() == 1 && d.as_known().is_none() && d == &kiln_ir::Dim::sym(syms[0].clone()) {
                    let s = &syms[0];
                    match bindings.get(s) {
                        Some(&prev) if prev != actual => {
                            return Err(bad(format!(
                                "axis {axis} is `{s}` = {actual}, but {} already set `{s}` = {prev}",
                                origin[s]
                            )))
                        }
                        Some(_) => {}
                        None => {
                            if actual == 0 {
                                return Err(bad(format!("axis {axis} (`{s}`) has extent 0")));
                            }
                            bindings.insert(s.clone(), actual);
                            origin.insert(s.clone(), format!("input `{name}` axis {axis}"));
                        }
                    }
                } else if pass == 1 {
                    match d.eval(&bindings) {
                        Ok(v) if v == actual => {}
                        Ok(v) => return Err(bad(format!("axis {axis} must be {d} = {v}, got {actual}"))),
                        Err(s) => {
                            return Err(bad(format!(
                                "axis {axis} ({d}) uses `{s}`, which no input axis determines"
                            )))
                        }
                    }
                }
            }
        }
    }
    Ok(bindings)
}
