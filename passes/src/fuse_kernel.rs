//! The fusion rules whose fused ops become generated kernels:
//!
//! - `fuse-elementwise`: an f32 element-wise op absorbs the element-wise trees that compute its
//!   operands (one generated loop instead of one per op);
//! - `fuse-reduction`: a reduction over the last axis absorbs the element-wise tree that
//!   computes its operand (the reduction's prologue);
//! - `fuse-softmax`: `e / sum(e)` with `e = exp(x - max(x))`, all over the last axis, becomes one
//!   row kernel, with the element-wise tree computing `x` as its prologue.
//!
//! A class is absorbed only if one node reads it (a value read twice is computed once and
//! stored), it has the consumer's shape, it holds an op a kernel can compute ([`in_kernel`]) and
//! no product (`fuse-gemm-epilogue`'s, which runs first), and it depends on an input (values of
//! weights alone are computed at compile time). Each rule builds the whole tree in one
//! application, through the classes' element-wise nodes.

use std::collections::HashMap;

use egg::Id;
use kiln_ir::fused::{Arg, BodyNode};
use kiln_ir::{BinaryOp, DType, Fused, Literal, Op, ReduceOp, Shape, TensorType, UnaryOp};

use crate::egraph::TensorEGraph;
use crate::layout::{nodes, ty, Build};

/// `fuse-elementwise`.
pub const ELEMENTWISE: &str = "fuse-elementwise";
/// `fuse-reduction`.
pub const REDUCTION: &str = "fuse-reduction";
/// `fuse-softmax`.
pub const SOFTMAX: &str = "fuse-softmax";

/// Whether a generated kernel computes `op` on operands of types `args` (f32 arithmetic, the
/// unary functions the code generator has, comparisons of f32 for a select).
pub fn in_kernel(op: &Op, args: &[&TensorType], out: &TensorType) -> bool {
    let f32_args = || args.iter().all(|a| a.dtype == DType::F32);
    match op {
        Op::Binary(b) => out.dtype == DType::F32 && *b != BinaryOp::Pow,
        Op::Unary(u) => out.dtype == DType::F32 && kernel_unary(*u),
        Op::Compare(_) => f32_args(),
        Op::Where => out.dtype == DType::F32,
        _ => false,
    }
}

fn kernel_unary(u: UnaryOp) -> bool {
    matches!(
        u,
        UnaryOp::Neg
            | UnaryOp::Abs
            | UnaryOp::Exp
            | UnaryOp::Sqrt
            | UnaryOp::Rsqrt
            | UnaryOp::Tanh
            | UnaryOp::Erf
            | UnaryOp::Sigmoid
            | UnaryOp::Relu
            | UnaryOp::Recip
    )
}

/// The node of class `id` a kernel can compute, with its operand classes, if the class holds no
/// product (fused or not). Fused ops of the kernel rules in the class are passed over: the tree
/// is built through the plain nodes.
fn kernel_node(eg: &TensorEGraph, id: Id) -> Option<(Op, Vec<Id>)> {
    let mut found = None;
    for (op, kids) in nodes(eg, id) {
        match &*op {
            Op::MatMul { .. } => return None,
            Op::Fused(f) if f.rule == crate::fuse_gemm::NAME => return None,
            _ if found.is_none() => {
                let tys: Option<Vec<&TensorType>> = kids.iter().map(|k| ty(eg, *k)).collect();
                let ok = tys.is_some_and(|t| ty(eg, id).is_some_and(|o| in_kernel(&op, &t, o)));
                if ok {
                    found = Some((op.into_owned(), kids.to_vec()));
                }
            }
            _ => {}
        }
    }
    found
}

/// A body under construction: operands and nodes, each class entered once.
struct Body<'a> {
    eg: &'a TensorEGraph,
    operands: Vec<Id>,
    nodes: Vec<BodyNode>,
    seen: HashMap<Id, Arg>,
}

impl<'a> Body<'a> {
    fn new(eg: &'a TensorEGraph) -> Body<'a> {
        Body {
            eg,
            operands: Vec::new(),
            nodes: Vec::new(),
            seen: HashMap::new(),
        }
    }

    fn push(&mut self, op: Op, args: Vec<Arg>) -> Arg {
        self.nodes.push(BodyNode { op, args });
        Arg::Node(self.nodes.len() as u32 - 1)
    }

    /// Class `c` as an operand of the body.
    fn operand(&mut self, c: Id) -> Arg {
        let c = self.eg.find(c);
        if let Some(a) = self.seen.get(&c) {
            return *a;
        }
        let a = Arg::Operand(self.operands.len() as u32);
        self.operands.push(c);
        self.seen.insert(c, a);
        a
    }

    /// Class `c`, computed inside the body if it may be absorbed into a kernel over `space`
    /// (read `reads` times by the body), inlined as a constant if it is an f32 scalar, else an
    /// operand.
    fn value(&mut self, c: Id, space: &Shape, reads: u32) -> Arg {
        let c = self.eg.find(c);
        if let Some(a) = self.seen.get(&c) {
            return *a;
        }
        let d = &self.eg[c].data;
        if let (Some(v), Some(t)) = (d.konst, &d.ty) {
            if t.rank() == 0 && t.dtype == DType::F32 {
                let op = Op::Scalar {
                    value: Literal::float(v),
                    dtype: DType::F32,
                };
                let a = self.push(op, vec![]);
                self.seen.insert(c, a);
                return a;
            }
        }
        let absorb = d.uses == reads && !d.fixed && d.ty.as_ref().is_some_and(|t| &t.shape == space);
        match kernel_node(self.eg, c).filter(|_| absorb) {
            Some((op, kids)) => {
                let args = self.args(&kids, space);
                let a = self.push(op, args);
                self.seen.insert(c, a);
                a
            }
            None => self.operand(c),
        }
    }

    /// The operands of a node inside the body.
    fn args(&mut self, kids: &[Id], space: &Shape) -> Vec<Arg> {
        kids.iter().map(|k| self.value(*k, space, 1)).collect()
    }

    /// Whether any node was absorbed (besides constants).
    fn absorbed(&self) -> bool {
        self.nodes.iter().any(|n| !matches!(n.op, Op::Scalar { .. }))
    }

    fn finish(self, rule: &str) -> Build {
        let f = Fused {
            rule: rule.to_string(),
            operands: self.operands.len() as u32,
            body: self.nodes,
        };
        Build::Node(
            Op::Fused(Box::new(f)),
            self.operands.into_iter().map(Build::Class).collect(),
        )
    }
}

fn space(eg: &TensorEGraph, id: Id) -> Option<Shape> {
    ty(eg, id).map(|t| t.shape.clone())
}

/// `fuse-elementwise`: the element-wise op with every operand tree it may absorb.
pub fn fuse_elementwise(eg: &TensorEGraph, op: &Op, kids: &[Id]) -> Vec<Build> {
    let tys: Option<Vec<&TensorType>> = kids.iter().map(|k| ty(eg, *k)).collect();
    let Some(tys) = tys else { return vec![] };
    let Ok(out) = op.infer(&tys) else { return vec![] };
    if !in_kernel(op, &tys, &out) {
        return vec![];
    }
    let mut body = Body::new(eg);
    let args = body.args(kids, &out.shape);
    if !body.absorbed() {
        return vec![];
    }
    body.push(op.clone(), args);
    vec![body.finish(ELEMENTWISE)]
}

/// The reduction over the last axis `op` is, if it is one of f32 values.
fn last_axis(eg: &TensorEGraph, op: &Op, x: Id, want: Option<ReduceOp>) -> bool {
    let Op::Reduce { op: r, axes, .. } = op else {
        return false;
    };
    let ok = ty(eg, x).is_some_and(|t| t.dtype == DType::F32 && axes.len() == 1 && axes[0] + 1 == t.rank());
    ok && want.is_none_or(|w| w == *r)
}

/// `fuse-reduction`: a reduction over the last axis with the tree computing its operand.
pub fn fuse_reduction(eg: &TensorEGraph, op: &Op, kids: &[Id]) -> Vec<Build> {
    let [x] = kids else { return vec![] };
    let Some(space) = space(eg, *x) else { return vec![] };
    if !last_axis(eg, op, *x, None) {
        return vec![];
    }
    let mut body = Body::new(eg);
    let arg = body.value(*x, &space, 1);
    if !body.absorbed() {
        return vec![];
    }
    body.push(op.clone(), vec![arg]);
    vec![body.finish(REDUCTION)]
}

/// The one node of class `id` that satisfies `f`, with its operand classes, if the class is read
/// `uses` times.
fn only_node(eg: &TensorEGraph, id: Id, uses: u32, f: impl Fn(&Op, &[Id]) -> bool) -> Option<(Op, Vec<Id>)> {
    if eg[id].data.uses != uses {
        return None;
    }
    nodes(eg, id)
        .find(|(op, kids)| f(op, kids))
        .map(|(op, kids)| (op.into_owned(), kids.to_vec()))
}

/// `fuse-softmax`: `div(e, sum(e))`, `e = exp(sub(x, max(x)))`, over the last axis, with keep_dims
/// reductions, every intermediate read only by the pattern.
pub fn fuse_softmax(eg: &TensorEGraph, op: &Op, kids: &[Id]) -> Vec<Build> {
    let (Op::Binary(BinaryOp::Div), [e, s]) = (op, kids) else {
        return vec![];
    };
    let keep = |o: &Op| matches!(o, Op::Reduce { keep_dims: true, .. });
    let Some((sum, _)) = only_node(eg, *s, 1, |o, k| {
        k == [*e] && keep(o) && last_axis(eg, o, *e, Some(ReduceOp::Sum))
    }) else {
        return vec![];
    };
    let Some((exp, ek)) = only_node(eg, *e, 2, |o, _| *o == Op::Unary(UnaryOp::Exp)) else {
        return vec![];
    };
    let Some((sub, dk)) = only_node(eg, ek[0], 1, |o, k| *o == Op::Binary(BinaryOp::Sub) && k[0] != k[1]) else {
        return vec![];
    };
    let (x, m) = (dk[0], dk[1]);
    let Some((max, _)) = only_node(eg, m, 1, |o, k| {
        k == [x] && keep(o) && last_axis(eg, o, x, Some(ReduceOp::Max))
    }) else {
        return vec![];
    };
    let (Some(xs), Some(out)) = (space(eg, x), ty(eg, *e)) else {
        return vec![];
    };
    if xs != out.shape {
        return vec![];
    }
    let mut body = Body::new(eg);
    let xa = body.value(x, &xs, 2);
    let ma = body.push(max, vec![xa]);
    let da = body.push(sub, vec![xa, ma]);
    let ea = body.push(exp, vec![da]);
    let sa = body.push(sum, vec![ea]);
    body.push(Op::Binary(BinaryOp::Div), vec![ea, sa]);
    vec![body.finish(SOFTMAX)]
}
