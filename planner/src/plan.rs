//! From a graph to an execution plan: fusion groups become generated kernels, matrix products
//! become GEMM calls, data movement becomes copy steps, and the few remaining small ops (index
//! and mask arithmetic, rotary tables) are evaluated by the reference evaluator at run time.
//!
//! A fusion group is a tree of f32 elementwise ops of one shape, rooted at a node whose value is
//! needed elsewhere; a reduction over the last axis can root a group too, fusing its elementwise
//! producers into the reduction's loop. A node joins a group only if all its users are already in
//! it, so no value is computed twice.

use std::collections::{BTreeMap, HashMap, HashSet};

use kiln_ir::{BinaryOp, CmpOp, DType, Dim, Graph, NodeId, Op, ReduceOp, Tensor, UnaryOp};
use kiln_runtime::plan::{DimExpr, KernelKind, Manifest, Port, Step, Storage, Target, ValueDecl};

use crate::attention::{self, Attentions};
use crate::gemm::{self, Epilogue};
use crate::group::{self, Group};
use crate::CompileError;

/// One expression node inside a kernel.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// Kernel input number `i`.
    Input(usize),
    /// An f32 constant.
    Const(f32),
    /// Unary function.
    Unary(UnaryOp, usize),
    /// Binary arithmetic.
    Binary(BinaryOp, usize, usize),
    /// Comparison producing a condition.
    Compare(CmpOp, usize, usize),
    /// `cond ? a : b`.
    Where(usize, usize, usize),
}

/// What the code generator needs to produce one kernel.
#[derive(Clone, Debug)]
pub struct KernelSpec {
    /// Name (the root node's).
    pub name: String,
    /// Map or reduce-last.
    pub kind: KernelKind,
    /// For `ReduceLast`: which reduction.
    pub reduce: Option<ReduceOp>,
    /// Input element types and whether each is contiguous along the last axis.
    pub inputs: Vec<(DType, bool)>,
    /// Output element type.
    pub output: DType,
    /// Expressions in dependency order; the last is the result (before any reduction).
    pub exprs: Vec<Expr>,
    /// Primitive ops fused.
    pub ops: usize,
}

/// The plan before code generation.
pub struct Planned {
    /// The manifest, with kernel code offsets still zero.
    pub manifest: Manifest,
    /// The weight section.
    pub weights: Vec<u8>,
    /// One spec per manifest kernel.
    pub kernels: Vec<KernelSpec>,
    /// What fusion did (the fusion pass's report).
    pub fusion: kiln_passes::PassStats,
    /// The cost model's estimate of every step, ns (symbolic dims at its extents), for
    /// `kiln compile --report` to set against measured times.
    pub predicted: Vec<f64>,
}

/// The largest tensor a weight-only subgraph may be folded into (elements).
const MAX_FOLD: u64 = 1 << 26;

/// Values of nodes that depend only on weights and constants (not on inputs or symbolic dims),
/// computed with the reference evaluator. Rank-0 constants stay inline in kernels.
fn fold_static(
    graph: &Graph,
    weights: &BTreeMap<String, Tensor>,
    order: &[NodeId],
) -> Result<HashMap<NodeId, Tensor>, CompileError> {
    let mut vals: HashMap<NodeId, kiln_interp::Value> = HashMap::new();
    let mut folded = HashMap::new();
    let bindings = kiln_ir::Bindings::new();
    for &n in order {
        let node = graph.node(n);
        let known = node.ty.shape.iter().all(|d| d.as_known().is_some());
        let size: Option<u64> = node
            .ty
            .shape
            .iter()
            .try_fold(1u64, |a, d| d.as_known().and_then(|k| a.checked_mul(k)));
        match &node.op {
            Op::Param { name, ty } => {
                if let Some(t) = weights.get(name) {
                    vals.insert(n, kiln_interp::Value::from_tensor(t, ty.dtype));
                }
            }
            // Quantized weights stay quantized: the product dequantizes them on the fly.
            Op::Input { .. } | Op::Dequantize { .. } | Op::Densify { .. } | Op::Densify24 { .. } => {}
            op => {
                let args = graph.args(n);
                let ready = !args.is_empty() || matches!(op, Op::Scalar { .. } | Op::Iota { .. });
                if !ready || !known || size.is_none_or(|s| s > MAX_FOLD) || !args.iter().all(|a| vals.contains_key(a)) {
                    continue;
                }
                let operands: Vec<&kiln_interp::Value> = args.iter().map(|a| &vals[a]).collect();
                let v = kiln_interp::eval_op(op, &node.ty, &operands, &bindings)
                    .map_err(|e| CompileError::Internal(format!("folding `{}`: {e}", node.name)))?;
                // Scalars stay inline; anything computed from weights or tables is stored.
                if node.ty.rank() > 0 && !args.is_empty() {
                    folded.insert(n, v.to_tensor());
                }
                vals.insert(n, v);
            }
        }
    }
    Ok(folded)
}

/// `graph` with the fusion rules applied (`kiln_passes::fuse`), extracted with the target's
/// cost model (the CPU's for a target of this machine's architecture, the GPU's otherwise), and
/// what fusion reports.
fn fuse(
    graph: &Graph,
    target: &Target,
    opts: &crate::Options,
) -> Result<(Graph, kiln_passes::PassStats), CompileError> {
    let model = cost_model(target);
    let mut g = graph.clone();
    let stats = kiln_passes::fuse::run(&mut g, &opts.disabled_rules, model);
    if let Some(dir) = &opts.dump_dir {
        let path = dir.join("10-fuse.txt");
        std::fs::write(&path, g.to_text()).map_err(|source| CompileError::Dump {
            path: path.display().to_string(),
            source,
        })?;
    }
    kiln_ir::verify(&g).map_err(|e| CompileError::Internal(format!("the graph is invalid after fusion: {e}")))?;
    Ok((g, stats))
}

/// The cost model of `target`: the CPU's for this machine's architecture, the GPU's otherwise.
fn cost_model(target: &Target) -> kiln_passes::cost::CostModel {
    use kiln_passes::cost::CostModel;
    if target.arch == std::env::consts::ARCH {
        CostModel::cpu()
    } else {
        CostModel::cuda()
    }
}

/// Plans `graph` (already verified and optimized) with its weights.
pub fn plan(
    graph: &Graph,
    weights: &BTreeMap<String, Tensor>,
    dims: &[(String, u64)],
    target: Target,
    opts: &crate::Options,
) -> Result<Planned, CompileError> {
    let fused_graph;
    let (graph, fusion) = if opts.fuse {
        let (g, notes) = fuse(graph, &target, opts)?;
        fused_graph = g;
        (&fused_graph, notes)
    } else {
        (graph, kiln_passes::PassStats::default())
    };
    let opt_level = opts.opt_level.as_str();
    let order = graph
        .topo_order()
        .map_err(|_| CompileError::Internal("graph has a cycle".into()))?;
    let outputs: HashSet<NodeId> = graph.outputs().iter().map(|o| o.node).collect();
    let users: HashMap<NodeId, Vec<NodeId>> = order.iter().map(|&n| (n, graph.users(n))).collect();

    // 0a. Weight-only subgraphs (concatenated projections, rotary frequency tables) are computed
    //     now, with the reference evaluator, and stored as weights.
    let folded = fold_static(graph, weights, &order)?;
    let fold_boundary: HashSet<NodeId> = folded
        .keys()
        .copied()
        .filter(|n| outputs.contains(n) || users[n].iter().any(|u| !folded.contains_key(u)))
        .collect();

    // 0. Matrix products, with the epilogues `fuse-gemm-epilogue` fused into them.
    let epi: HashMap<NodeId, Epilogue> = order
        .iter()
        .filter(|n| !folded.contains_key(n))
        .filter_map(|&n| gemm::epilogue(graph, n).map(|e| (n, e)))
        .collect();
    let special = |n: NodeId| epi.contains_key(&n) || folded.contains_key(&n);
    // Products whose right operand is a dequantized weight read the codes directly.
    let dequant_of = |e: &Epilogue| gemm::stored_weight(graph, e, &users, &outputs);

    // 1. Generated kernels: the fused ops the kernel rules made, and single ops a kernel computes.
    let mut group_of: HashMap<NodeId, usize> = HashMap::new();
    let mut groups: Vec<Group> = Vec::new();
    for &x in &order {
        if special(x) {
            continue;
        }
        if let Some(g) = group::group(graph, x)? {
            group_of.insert(x, groups.len());
            groups.push(g);
        }
    }

    // 1b. Attention steps, with the layouts they read in place.
    let Attentions {
        plans: attn,
        skip: attn_skip,
        cache_views,
    } = attention::plan(graph, &order, &users, &outputs)?;

    // 2. Which nodes need a value: outputs, group leaves, operands of everything else.
    let eff_args = |n: NodeId| -> Vec<NodeId> {
        match epi.get(&n) {
            Some(e) => gemm::operands(graph, e, dequant_of(e)),
            None => graph.args(n),
        }
    };
    let mut needed: HashSet<NodeId> = outputs.clone();
    let model = opts.measured_costs.unwrap_or_else(|| cost_model(&target));
    let mut predicted = Vec::new();
    for &n in &order {
        if attn_skip.contains(&n) || folded.contains_key(&n) {
            continue;
        }
        if let Some(a) = attn.get(&n) {
            needed.extend([a.q, a.k, a.v]);
            needed.extend(a.leaves.iter().copied());
            continue;
        }
        match group_of.get(&n) {
            Some(&gi) => needed.extend(groups[gi].leaves.iter().copied()),
            None => needed.extend(eff_args(n)),
        }
    }

    // 3. Values and steps, in topological order.
    let sym_index: HashMap<&str, u32> = dims
        .iter()
        .enumerate()
        .map(|(i, (n, _))| (n.as_str(), i as u32))
        .collect();
    let dim_expr = |d: &Dim| -> Result<DimExpr, CompileError> {
        let mut syms = Vec::new();
        for s in d.symbols() {
            syms.push(
                *sym_index
                    .get(s.as_str())
                    .ok_or_else(|| CompileError::Internal(format!("dim `{s}` has no declared bound")))?,
            );
        }
        Ok(DimExpr { coeff: d.coeff(), syms })
    };
    let shape_expr = |s: &[Dim]| s.iter().map(&dim_expr).collect::<Result<Vec<_>, _>>();

    let mut values: Vec<ValueDecl> = Vec::new();
    let mut value_of: HashMap<NodeId, u32> = HashMap::new();
    let mut steps = Vec::new();
    let mut kernels = Vec::new();
    let mut kernel_decls = Vec::new();
    let mut wbytes: Vec<u8> = Vec::new();
    let mut inputs = Vec::new();
    for &n in &order {
        if attn_skip.contains(&n) || (!needed.contains(&n) && !group_of.contains_key(&n)) {
            continue;
        }
        if folded.contains_key(&n) && !fold_boundary.contains(&n) {
            continue;
        }
        let node = graph.node(n);
        let args = graph.args(n);
        let mut decl = ValueDecl {
            dtype: node.ty.dtype,
            shape: shape_expr(&node.ty.shape)?,
            storage: Storage::Temp,
            name: node.name.clone(),
        };
        let vid = values.len() as u32;
        let val = |a: &NodeId| {
            value_of.get(a).copied().ok_or_else(|| {
                CompileError::Internal(format!(
                    "operand `{}` of `{}` has no value",
                    graph.node(*a).name,
                    node.name
                ))
            })
        };
        match &node.op {
            Op::Input { name, default, .. } => {
                decl.storage = Storage::Input(inputs.len() as u32);
                inputs.push(Port {
                    name: name.clone(),
                    value: vid,
                    default: *default,
                });
            }
            _ if folded.contains_key(&n) => {
                let t = &folded[&n];
                while !wbytes.len().is_multiple_of(kiln_runtime::artifact::ALIGN) {
                    wbytes.push(0);
                }
                decl.storage = Storage::Weight {
                    offset: wbytes.len() as u64,
                    len: t.as_bytes().len() as u64,
                };
                wbytes.extend_from_slice(t.as_bytes());
            }
            Op::Param { name, ty } => {
                let t = weights
                    .get(name)
                    .ok_or_else(|| CompileError::MissingWeight(name.clone()))?;
                let want: Vec<usize> = ty.shape.iter().map(|d| d.as_known().unwrap_or(0) as usize).collect();
                if t.dtype() != ty.dtype || t.shape() != want.as_slice() {
                    return Err(CompileError::BadWeight {
                        name: name.clone(),
                        expected: ty.to_string(),
                        got: format!("{}{:?}", t.dtype(), t.shape()),
                    });
                }
                while !wbytes.len().is_multiple_of(kiln_runtime::artifact::ALIGN) {
                    wbytes.push(0);
                }
                decl.storage = Storage::Weight {
                    offset: wbytes.len() as u64,
                    len: t.as_bytes().len() as u64,
                };
                wbytes.extend_from_slice(t.as_bytes());
            }
            _ if attn.contains_key(&n) => {
                let a = &attn[&n];
                let spec = a.parts.spec.clone();
                let kernel_inputs = a
                    .parts
                    .inputs
                    .iter()
                    .map(|l| l.as_ref().map(&val).transpose())
                    .collect::<Result<Vec<_>, _>>()?;
                let contiguous = spec.inputs.iter().map(|i| i.1).collect();
                let name = spec.name.clone();
                let k = intern_kernel(&mut kernels, &mut kernel_decls, spec, name, 2);
                steps.push(Step::Attention {
                    q: val(&a.q)?,
                    k: val(&a.k)?,
                    v: val(&a.v)?,
                    out: vid,
                    scale: a.parts.scale,
                    kernel: k,
                    logits: None,
                    kernel_inputs,
                    contiguous,
                    seq_major: a.seq_major,
                    views: a.views,
                    cached: a.cached,
                });
            }
            _ if epi.contains_key(&n) => {
                let e = &epi[&n];
                steps.push(gemm::step(graph, e, dequant_of(e), vid, &val)?);
            }
            Op::Reshape { .. } => decl.storage = Storage::Alias(val(&args[0])?),
            Op::Gather { axis } if matches!(graph.node(args[1]).ty.dtype, DType::I64 | DType::I32) => {
                steps.push(Step::Gather {
                    table: val(&args[0])?,
                    idx: val(&args[1])?,
                    out: vid,
                    axis: *axis as u32,
                })
            }
            Op::Transpose { perm } => steps.push(Step::Transpose {
                x: val(&args[0])?,
                out: vid,
                perm: perm.iter().map(|p| *p as u32).collect(),
            }),
            Op::Slice { axis, start, .. } => steps.push(Step::Slice {
                x: val(&args[0])?,
                out: vid,
                axis: *axis as u32,
                start: *start,
            }),
            Op::Concat { axis } => steps.push(Step::Concat {
                xs: args.iter().map(&val).collect::<Result<_, _>>()?,
                out: vid,
                axis: *axis as u32,
            }),
            Op::Broadcast { .. } => steps.push(Step::Broadcast {
                x: val(&args[0])?,
                out: vid,
            }),
            Op::CacheAppend { slot, .. } if node.ty.dtype == DType::F32 => steps.push(Step::CacheAppend {
                x: val(&args[0])?,
                out: vid,
                slot: *slot,
                view: cache_views.contains(&n),
            }),
            _ if group_of.contains_key(&n) => {
                let g = &groups[group_of[&n]];
                let (spec, leaves) = (g.spec.clone(), g.leaves.clone());
                let space = g.space.shape.clone();
                let (kind, contiguous) = (spec.kind, spec.inputs.iter().map(|i| i.1).collect());
                let k = intern_kernel(&mut kernels, &mut kernel_decls, spec, node.name.clone(), 0);
                steps.push(Step::Kernel {
                    kernel: k,
                    kind,
                    inputs: leaves.iter().map(&val).collect::<Result<_, _>>()?,
                    contiguous,
                    out: vid,
                    space: shape_expr(&space)?,
                });
            }
            op => steps.push(Step::Fallback {
                op: op.clone(),
                inputs: args.iter().map(&val).collect::<Result<_, _>>()?,
                out: vid,
            }),
        }
        if predicted.len() < steps.len() {
            let tys: Vec<&kiln_ir::TensorType> = args.iter().map(|a| &graph.node(*a).ty).collect();
            predicted.resize(steps.len(), model.op_ns(&node.op, &tys, &node.ty));
        }
        values.push(decl);
        value_of.insert(n, vid);
    }
    let outputs = graph
        .outputs()
        .iter()
        .map(|o| {
            Ok(Port {
                default: None,
                name: o.name.clone(),
                value: *value_of
                    .get(&o.node)
                    .ok_or_else(|| CompileError::Internal(format!("output `{}` has no value", o.name)))?,
            })
        })
        .collect::<Result<Vec<_>, CompileError>>()?;
    let manifest = Manifest {
        name: graph.name.clone(),
        target,
        dims: dims.to_vec(),
        inputs,
        outputs,
        values,
        kernels: kernel_decls,
        steps,
        opt_level: opt_level.to_string(),
        tokenizer: None,
        gpu: None,
    };
    Ok(Planned {
        manifest,
        weights: wbytes,
        kernels,
        fusion,
        predicted,
    })
}

/// The index of a kernel computing `spec`: an identical earlier one (every layer of a model needs
/// the same kernels) or a new one.
pub fn intern_kernel(
    kernels: &mut Vec<KernelSpec>,
    decls: &mut Vec<kiln_runtime::plan::KernelDecl>,
    spec: KernelSpec,
    name: String,
    extra_ops: u32,
) -> u32 {
    let same = |k: &KernelSpec| {
        k.kind == spec.kind
            && k.reduce == spec.reduce
            && k.inputs == spec.inputs
            && k.output == spec.output
            && k.exprs == spec.exprs
    };
    if let Some(i) = kernels.iter().position(same) {
        return i as u32;
    }
    decls.push(kiln_runtime::plan::KernelDecl {
        name,
        offset: 0,
        len: 0,
        inputs: spec.inputs.iter().map(|i| i.0).collect(),
        output: spec.output,
        ops: spec.ops as u32 + extra_ops,
        tape: tape(&spec),
    });
    kernels.push(spec);
    (kernels.len() - 1) as u32
}

/// An f32 Map kernel's expressions as a tape (`kiln_runtime::vmap`), if every expression is one
/// the runtime evaluates: it runs one-input tapes at full vector width and recognises some forms
/// of several inputs.
fn tape(spec: &KernelSpec) -> Option<Vec<kiln_runtime::vmap::TapeOp>> {
    use kiln_runtime::vmap::{supports_binary, supports_unary, TapeOp, MAX_TAPE};
    let f32s = spec.inputs.iter().all(|i| i.0 == DType::F32) && spec.output == DType::F32;
    if spec.kind != KernelKind::Map || spec.inputs.is_empty() || !f32s || spec.exprs.len() > MAX_TAPE {
        return None;
    }
    let idx = |i: usize| u16::try_from(i).ok();
    spec.exprs
        .iter()
        .map(|e| match *e {
            Expr::Input(0) => Some(TapeOp::Input),
            Expr::Input(i) => Some(TapeOp::Arg(idx(i)?)),
            Expr::Const(c) => Some(TapeOp::Const(c)),
            Expr::Unary(u, a) if supports_unary(u) => Some(TapeOp::Unary(u, idx(a)?)),
            Expr::Binary(b, x, y) if supports_binary(b) => Some(TapeOp::Binary(b, idx(x)?, idx(y)?)),
            _ => None,
        })
        .collect()
}
