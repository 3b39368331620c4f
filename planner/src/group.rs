//! Fusion groups: the generated kernels the planner lowers. Each is a fused op a fusion rule made
//! (`fuse-elementwise`, `fuse-reduction`, `fuse-softmax`; its body is the kernel's expression)
//! or a single op a kernel computes (an element-wise op, a reduction over the last axis) that no
//! rule absorbed.

use std::collections::{HashMap, HashSet};

use kiln_ir::fused::{Arg, BodyNode};
use kiln_ir::{DType, Graph, NodeId, Op, ReduceOp, TensorType};
use kiln_passes::fuse_kernel as rules;
use kiln_runtime::plan::KernelKind;

use crate::plan::{Expr, KernelSpec};
use crate::CompileError;

#[derive(Clone, Copy, PartialEq, Debug)]
enum GroupKind {
    Map,
    Reduce(ReduceOp),
    Softmax,
}

/// One generated kernel: what it computes and reads.
pub(crate) struct Group {
    /// The type of what the kernel's expression computes (the value, or what it reduces).
    pub space: TensorType,
    pub spec: KernelSpec,
    /// The nodes the kernel reads, in the order of its inputs.
    pub leaves: Vec<NodeId>,
}

/// The nodes of one kernel's expression inside a graph.
struct Members {
    /// The node whose value the kernel writes.
    root: NodeId,
    /// The node whose value the kernel's expression computes (the root, or what it reduces).
    top: NodeId,
    kind: GroupKind,
    members: HashSet<NodeId>,
}

/// Whether `id` can live inside a generated kernel.
pub(crate) fn fusible(g: &Graph, id: NodeId) -> bool {
    let args: Vec<&TensorType> = g.args(id).iter().map(|a| &g.node(*a).ty).collect();
    rules::in_kernel(&g.node(id).op, &args, &g.node(id).ty)
}

pub(crate) fn is_f32_scalar(g: &Graph, id: NodeId) -> Option<f32> {
    match &g.node(id).op {
        Op::Scalar {
            value,
            dtype: DType::F32,
        } => Some(value.as_f64() as f32),
        _ => None,
    }
}

fn reduce_last(g: &Graph, id: NodeId) -> Option<ReduceOp> {
    match &g.node(id).op {
        Op::Reduce { op, axes, .. } => {
            let x = &g.node(g.args(id)[0]).ty;
            (x.dtype == DType::F32 && axes.len() == 1 && axes[0] + 1 == x.rank()).then_some(*op)
        }
        _ => None,
    }
}

/// The kernel computing node `n`, if one does: its fused body, or the op alone.
pub(crate) fn group(g: &Graph, n: NodeId) -> Result<Option<Group>, CompileError> {
    if let Op::Fused(f) = &g.node(n).op {
        return fused(g, n, f);
    }
    let (top, kind) = if fusible(g, n) {
        (n, GroupKind::Map)
    } else if let Some(op) = reduce_last(g, n) {
        (g.args(n)[0], GroupKind::Reduce(op))
    } else {
        return Ok(None);
    };
    let m = Members {
        root: n,
        top,
        kind,
        members: HashSet::from([n]),
    };
    let (spec, leaves) = kernel_spec(g, &m)?;
    Ok(Some(Group {
        space: g.node(top).ty.clone(),
        spec,
        leaves,
    }))
}

/// A fused body as a graph: an input per operand type, a node per body node (in order).
fn body_graph(types: &[TensorType], body: &[BodyNode]) -> Result<(Graph, Vec<NodeId>, Vec<NodeId>), String> {
    let mut g = Graph::new("body");
    let mut at: Vec<NodeId> = Vec::new();
    for (i, ty) in types.iter().enumerate() {
        let op = Op::input(format!("#{i}"), ty.clone());
        at.push(g.add(op, &[], format!("#{i}")).map_err(|e| e.to_string())?);
    }
    let mut nodes: Vec<NodeId> = Vec::new();
    for (j, b) in body.iter().enumerate() {
        let args: Vec<NodeId> = b
            .args
            .iter()
            .map(|a| match *a {
                Arg::Operand(o) => at[o as usize],
                Arg::Node(k) => nodes[k as usize],
            })
            .collect();
        nodes.push(g.add(b.op.clone(), &args, format!("%{j}")).map_err(|e| e.to_string())?);
    }
    if nodes.is_empty() {
        return Err("empty body".into());
    }
    Ok((g, at, nodes))
}

/// The kernel of a body over operands of `types`: its spec, and per kernel input the operand
/// it reads.
fn body_kernel(
    types: &[TensorType],
    body: &[BodyNode],
    rule: &str,
) -> Result<(KernelSpec, Vec<usize>, TensorType, GroupKind), String> {
    let (g, at, nodes) = body_graph(types, body)?;
    let root = *nodes.last().expect("body_graph refuses an empty body");
    let (top, kind) = match rule {
        rules::ELEMENTWISE => (root, GroupKind::Map),
        rules::REDUCTION => match &g.node(root).op {
            Op::Reduce { op, .. } => (g.args(root)[0], GroupKind::Reduce(*op)),
            _ => return Err("a reduction's body ends in a reduction".into()),
        },
        _ => {
            let max = nodes
                .iter()
                .find(|m| matches!(g.node(**m).op, Op::Reduce { op: ReduceOp::Max, .. }))
                .ok_or("a softmax body has a maximum")?;
            (g.args(*max)[0], GroupKind::Softmax)
        }
    };
    let m = Members {
        root,
        top,
        kind,
        members: nodes.iter().copied().collect(),
    };
    let (spec, leaves) = kernel_spec(&g, &m).map_err(|e| e.to_string())?;
    let index: HashMap<NodeId, usize> = at.iter().enumerate().map(|(i, a)| (*a, i)).collect();
    let leaves = leaves
        .iter()
        .map(|l| index.get(l).copied().ok_or("a kernel input that is no operand"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((spec, leaves, g.node(top).ty.clone(), kind))
}

/// The kernel of a fused op made by one of the kernel rules.
fn fused(g: &Graph, n: NodeId, f: &kiln_ir::Fused) -> Result<Option<Group>, CompileError> {
    let rule = f.rule.as_str();
    if ![rules::ELEMENTWISE, rules::REDUCTION, rules::SOFTMAX].contains(&rule) {
        return Ok(None);
    }
    let operands = g.args(n);
    let types: Vec<TensorType> = operands.iter().map(|a| g.node(*a).ty.clone()).collect();
    let (mut spec, leaves, space, _) = body_kernel(&types, &f.body, rule)
        .map_err(|e| CompileError::Internal(format!("fused `{}`: {e}", g.node(n).name)))?;
    spec.name = g.node(n).name.clone();
    Ok(Some(Group {
        space,
        spec,
        leaves: leaves.into_iter().map(|i| operands[i]).collect(),
    }))
}

/// A fused attention (`fuse-attention`), as the planner lowers it.
pub(crate) struct Attention {
    /// Multiplies `q kᵀ`.
    pub scale: f32,
    /// The softmax kernel over the scores.
    pub spec: KernelSpec,
    /// Per kernel input: `None` for the scores, else the node it reads.
    pub inputs: Vec<Option<NodeId>>,
}

/// The parts of node `n`, if it is a fused attention: its body is the scores product (with a
/// scale), the softmax over them, and the product by `v` (operands `q, k, v`, then the
/// softmax's others).
pub(crate) fn attention(g: &Graph, n: NodeId) -> Result<Option<Attention>, CompileError> {
    let Op::Fused(f) = &g.node(n).op else { return Ok(None) };
    if f.rule != kiln_passes::fuse_attention::NAME {
        return Ok(None);
    }
    let bad = |e: String| CompileError::Internal(format!("fused attention `{}`: {e}", g.node(n).name));
    let operands = g.args(n);
    let types: Vec<TensorType> = operands.iter().map(|a| g.node(*a).ty.clone()).collect();
    let scaled = matches!(f.body.get(1).map(|b| &b.op), Some(Op::Scalar { .. }));
    let (scale, scores) = match (scaled, f.body.get(1)) {
        (
            true,
            Some(BodyNode {
                op: Op::Scalar { value, .. },
                ..
            }),
        ) => (value.as_f64() as f32, 2),
        _ => (1.0, 0),
    };
    let end = f
        .body
        .len()
        .checked_sub(1)
        .filter(|e| *e > scores)
        .ok_or_else(|| bad("a short body".into()))?;
    // The softmax alone, over operands (scores, operand 3, operand 4, …).
    let remap = |a: &Arg| match *a {
        Arg::Node(j) if j as usize == scores => Ok(Arg::Operand(0)),
        Arg::Node(j) if j as usize > scores => Ok(Arg::Node(j - scores as u32 - 1)),
        Arg::Operand(o) if o >= 3 => Ok(Arg::Operand(o - 2)),
        other => Err(format!("the softmax reads {other:?}")),
    };
    let sub: Vec<BodyNode> = f.body[scores + 1..end]
        .iter()
        .map(|b| {
            Ok(BodyNode {
                op: b.op.clone(),
                args: b.args.iter().map(remap).collect::<Result<_, String>>()?,
            })
        })
        .collect::<Result<_, String>>()
        .map_err(bad)?;
    let body_types = f.types(&types.iter().collect::<Vec<_>>()).map_err(|e| bad(e.0))?;
    let sub_types: Vec<TensorType> = std::iter::once(body_types[scores].clone())
        .chain(types[3..].iter().cloned())
        .collect();
    let (mut spec, leaves, _, _) = body_kernel(&sub_types, &sub, rules::SOFTMAX).map_err(bad)?;
    spec.name = g.node(n).name.clone();
    let inputs = leaves.into_iter().map(|i| (i > 0).then(|| operands[i + 2])).collect();
    Ok(Some(Attention { scale, spec, inputs }))
}

/// The expression tree of a group rooted at `root`, and the graph nodes feeding its inputs.
fn kernel_spec(g: &Graph, group: &Members) -> Result<(KernelSpec, Vec<NodeId>), CompileError> {
    let (root, top) = (group.root, group.top);
    let reduce = match group.kind {
        GroupKind::Reduce(op) => Some(op),
        _ => None,
    };
    let space = g.node(top).ty.shape.clone();
    let mut exprs = Vec::new();
    let mut memo: HashMap<NodeId, usize> = HashMap::new();
    let mut leaves: Vec<NodeId> = Vec::new();
    let mut inputs = Vec::new();
    let mut ops = match group.kind {
        GroupKind::Map => 0,
        GroupKind::Reduce(_) => 1,
        GroupKind::Softmax => 5,
    };
    // Iterative post-order over the group's expression tree.
    let mut stack = vec![(top, false)];
    while let Some((n, expanded)) = stack.pop() {
        if memo.contains_key(&n) {
            continue;
        }
        let inside = group.members.contains(&n);
        if let Some(c) = is_f32_scalar(g, n) {
            memo.insert(n, exprs.len());
            exprs.push(Expr::Const(c));
            continue;
        }
        if !inside {
            let ty = &g.node(n).ty;
            let last_in = ty.shape.last();
            let last_space = space.last();
            let contiguous = ty.rank() > 0 && last_in == last_space && !last_in.is_some_and(|d| d.is_one());
            memo.insert(n, exprs.len());
            exprs.push(Expr::Input(leaves.len()));
            leaves.push(n);
            inputs.push((ty.dtype, contiguous));
            continue;
        }
        let args = g.args(n);
        if !expanded {
            stack.push((n, true));
            for a in args.iter().rev() {
                stack.push((*a, false));
            }
            continue;
        }
        let a = |i: usize| memo[&args[i]];
        let e = match &g.node(n).op {
            Op::Unary(u) => Expr::Unary(*u, a(0)),
            Op::Binary(b) => Expr::Binary(*b, a(0), a(1)),
            Op::Compare(c) => Expr::Compare(*c, a(0), a(1)),
            Op::Where => Expr::Where(a(0), a(1), a(2)),
            other => {
                return Err(CompileError::Internal(format!(
                    "`{}` ({}) in a fusion group",
                    g.node(n).name,
                    other.mnemonic()
                )))
            }
        };
        ops += 1;
        memo.insert(n, exprs.len());
        exprs.push(e);
    }
    let output = g.node(root).ty.dtype;
    let spec = KernelSpec {
        name: g.node(root).name.clone(),
        kind: match group.kind {
            GroupKind::Map => KernelKind::Map,
            GroupKind::Reduce(_) => KernelKind::ReduceLast,
            GroupKind::Softmax => KernelKind::SoftmaxLast,
        },
        reduce,
        inputs,
        output,
        exprs,
        ops,
    };
    Ok((spec, leaves))
}
