//! Layout rewrites: rules that look inside `Other` e-nodes (transposes, reshapes, broadcasts and
//! matrix products), which egg's patterns cannot express because the op's attributes live in the
//! [`OpTable`](crate::egraph::OpTable).
//!
//! A [`NodeRule`] is a function from one e-node (its op and operand classes) to equivalent
//! expressions over existing e-classes. It is wrapped as an egg searcher and applier, so it runs in
//! the same saturation as the algebraic rules and is reported, disabled and tracked like them. The
//! applier refuses any right-hand side whose inferred type differs from the matched class's: a
//! rule can fail to fire, never change a type.
//!
//! Every rule is checked by execution in `tests/rules.rs`.

use std::borrow::Cow;

use egg::{Applier, Id, Language, PatternAst, Rewrite, SearchMatches, Searcher, Subst, Symbol, Var};
use kiln_ir::{Op, TensorType, UnaryOp};

use crate::egraph::{TensorAnalysis, TensorEGraph, TensorLang};
use crate::rules::Rule;

/// An expression to add: an existing e-class, or an op over sub-expressions.
#[derive(Clone, Debug)]
pub enum Build {
    /// An existing e-class.
    Class(Id),
    /// A new node.
    Node(Op, Vec<Build>),
}

/// Finds equivalent forms of one e-node: `(egraph, op, operand classes) -> alternatives`.
pub type NodeFn = fn(&TensorEGraph, &Op, &[Id]) -> Vec<Build>;

/// A rewrite written as a Rust function over one e-node.
#[derive(Clone)]
pub struct NodeRule {
    f: NodeFn,
}

pub(crate) fn ty(eg: &TensorEGraph, id: Id) -> Option<&TensorType> {
    eg[id].data.ty.as_ref()
}

/// The (op, operands) of every node of class `id`.
pub(crate) fn nodes(eg: &TensorEGraph, id: Id) -> impl Iterator<Item = (Cow<'_, Op>, &[Id])> {
    eg[id].nodes.iter().map(|n| (eg.analysis.op_of(n), n.children()))
}

impl Searcher<TensorLang, TensorAnalysis> for NodeRule {
    fn search_eclass_with_limit(
        &self,
        eg: &TensorEGraph,
        eclass: Id,
        limit: usize,
    ) -> Option<SearchMatches<'_, TensorLang>> {
        if limit == 0 {
            return None;
        }
        let hit = nodes(eg, eclass).any(|(op, kids)| !(self.f)(eg, &op, kids).is_empty());
        hit.then(|| SearchMatches {
            eclass,
            substs: vec![Subst::default()],
            ast: None,
        })
    }

    fn vars(&self) -> Vec<Var> {
        vec![]
    }
}

/// Adds `b`, or `None` if some node of it does not type-check.
fn add(eg: &mut TensorEGraph, b: &Build) -> Option<Id> {
    match b {
        Build::Class(c) => Some(*c),
        Build::Node(op, args) => {
            let ids = args.iter().map(|a| add(eg, a)).collect::<Option<Vec<Id>>>()?;
            let tys: Option<Vec<&TensorType>> = ids.iter().map(|i| ty(eg, *i)).collect();
            op.infer(&tys?).ok()?;
            let node = TensorLang::from_op(op, ids, &mut eg.analysis.table);
            Some(eg.add(node))
        }
    }
}

impl Applier<TensorLang, TensorAnalysis> for NodeRule {
    fn apply_one(
        &self,
        eg: &mut TensorEGraph,
        eclass: Id,
        _subst: &Subst,
        _ast: Option<&PatternAst<TensorLang>>,
        rule: Symbol,
    ) -> Vec<Id> {
        let found: Vec<Build> = {
            let eg: &TensorEGraph = eg;
            nodes(eg, eclass)
                .flat_map(|(op, kids)| (self.f)(eg, &op, kids))
                .collect()
        };
        let want = eg[eclass].data.ty.clone();
        let mut changed = Vec::new();
        for b in &found {
            let Some(id) = add(eg, b) else { continue };
            if want.is_none() || eg[id].data.ty != want {
                continue;
            }
            if eg.union_trusted(eclass, id, rule) {
                eg.analysis
                    .provenance
                    .entry(eclass)
                    .or_default()
                    .insert(rule.to_string());
                changed.push(eclass);
            }
        }
        changed
    }
}

/// A [`Rule`] from a node function.
pub fn node_rule(name: &str, f: NodeFn) -> Rule {
    Rewrite::new(name, NodeRule { f }, NodeRule { f }).expect("node rules bind no variables")
}

/// Is `perm` the identity?
fn is_identity(perm: &[usize]) -> bool {
    perm.iter().enumerate().all(|(i, p)| i == *p)
}

/// Does `perm` swap the last two axes and keep the others?
fn swaps_last_two(perm: &[usize]) -> bool {
    let r = perm.len();
    r >= 2 && perm[r - 2] == r - 1 && perm[r - 1] == r - 2 && is_identity(&perm[..r - 2])
}

/// `transpose(transpose(x, p1), p2) = transpose(x, p1∘p2)`, or `x` when that is the identity.
fn transpose_transpose(eg: &TensorEGraph, op: &Op, kids: &[Id]) -> Vec<Build> {
    let Op::Transpose { perm: p2 } = op else { return vec![] };
    nodes(eg, kids[0])
        .filter_map(|(inner, ik)| match &*inner {
            Op::Transpose { perm: p1 } => {
                let perm: Vec<usize> = p2.iter().map(|&i| p1[i]).collect();
                Some(if is_identity(&perm) {
                    Build::Class(ik[0])
                } else {
                    Build::Node(Op::Transpose { perm }, vec![Build::Class(ik[0])])
                })
            }
            _ => None,
        })
        .collect()
}

/// `transpose(x, identity) = x`.
fn transpose_identity(_: &TensorEGraph, op: &Op, kids: &[Id]) -> Vec<Build> {
    match op {
        Op::Transpose { perm } if is_identity(perm) => vec![Build::Class(kids[0])],
        _ => vec![],
    }
}

/// A transpose of the last two axes of a matmul operand becomes the matmul's transpose flag.
fn transpose_into_matmul(eg: &TensorEGraph, op: &Op, kids: &[Id]) -> Vec<Build> {
    let Op::MatMul {
        transpose_a,
        transpose_b,
    } = *op
    else {
        return vec![];
    };
    let mut out = Vec::new();
    for (i, (ta, tb)) in [(!transpose_a, transpose_b), (transpose_a, !transpose_b)]
        .into_iter()
        .enumerate()
    {
        for (inner, ik) in nodes(eg, kids[i]) {
            if matches!(&*inner, Op::Transpose { perm } if swaps_last_two(perm)) {
                let mut args = vec![Build::Class(kids[0]), Build::Class(kids[1])];
                args[i] = Build::Class(ik[0]);
                out.push(Build::Node(
                    Op::MatMul {
                        transpose_a: ta,
                        transpose_b: tb,
                    },
                    args,
                ));
            }
        }
    }
    out
}

/// `reshape(reshape(x)) = reshape(x)`, and a reshape to the operand's own shape is the operand.
fn reshape_reshape(eg: &TensorEGraph, op: &Op, kids: &[Id]) -> Vec<Build> {
    let Op::Reshape { shape } = op else { return vec![] };
    let mut out = Vec::new();
    if ty(eg, kids[0]).is_some_and(|t| &t.shape == shape) {
        out.push(Build::Class(kids[0]));
    }
    for (inner, ik) in nodes(eg, kids[0]) {
        if matches!(&*inner, Op::Reshape { .. }) {
            if ty(eg, ik[0]).is_some_and(|t| &t.shape == shape) {
                out.push(Build::Class(ik[0]));
            } else {
                out.push(Build::Node(
                    Op::Reshape { shape: shape.clone() },
                    vec![Build::Class(ik[0])],
                ));
            }
        }
    }
    out
}

/// A unary function of a broadcast is the broadcast of the function, computed on fewer elements:
/// `f(broadcast(x)) = broadcast(f(x))`.
fn broadcast_hoist(eg: &TensorEGraph, op: &Op, kids: &[Id]) -> Vec<Build> {
    let unary = matches!(op, Op::Unary(u) if *u != UnaryOp::Not) || matches!(op, Op::Cast { .. });
    if !unary {
        return vec![];
    }
    nodes(eg, kids[0])
        .filter_map(|(inner, ik)| match &*inner {
            Op::Broadcast { shape } => Some(Build::Node(
                Op::Broadcast { shape: shape.clone() },
                vec![Build::Node(op.clone(), vec![Build::Class(ik[0])])],
            )),
            _ => None,
        })
        .collect()
}

/// The layout rule set.
pub fn layout() -> Vec<Rule> {
    vec![
        node_rule("transpose-transpose", transpose_transpose),
        node_rule("transpose-identity", transpose_identity),
        node_rule("transpose-into-matmul", transpose_into_matmul),
        node_rule("reshape-reshape", reshape_reshape),
        node_rule("broadcast-hoist", broadcast_hoist),
    ]
}
