//! Narrowing early: a slice, or a gather by a rank-1 index, is moved ahead of the op that produced
//! its operand, so that op computes only the part that is used. The typical win is a decoder's
//! prefill, whose `gather(logits, last position)` moves ahead of the LM head, the final norm and
//! the last block's MLP: they run on one row instead of the whole prompt.
//!
//! This is a graph pass, not an e-graph rule, because it only pays when *every* user of the
//! operand takes the same part: that is a property of the graph's uses, which an e-class does not
//! see (with the full value still needed elsewhere, the narrowed copy would be extra work).
//!
//! Moves through: elementwise ops (operands broadcast along the narrowed axis are kept whole),
//! casts, matrix products (row, column and batch axes), reductions over other axes, transposes.
//! Stops at reshapes, broadcasts, concatenations, graph inputs, weights and graph outputs. Assumes
//! and leaves a verified graph; new nodes record the rule `narrow`.

use kiln_ir::{Graph, NodeId, Op, TensorType};

use crate::PassStats;

/// How a value is narrowed along one axis.
#[derive(Clone, PartialEq)]
enum Narrow {
    Slice { start: u64, end: u64 },
    Gather { index: NodeId },
}

impl Narrow {
    /// The narrowing `n` does, if it is one this pass moves.
    fn of(g: &Graph, n: NodeId) -> Option<(Narrow, usize)> {
        match g.node(n).op {
            Op::Slice { axis, start, end } => Some((Narrow::Slice { start, end }, axis)),
            Op::Gather { axis } => {
                let index = g.args(n)[1];
                (g.node(index).ty.rank() == 1).then_some((Narrow::Gather { index }, axis))
            }
            _ => None,
        }
    }

    /// Adds `x` narrowed along `axis`.
    fn apply(&self, g: &mut Graph, x: NodeId, axis: usize, name: &str) -> Option<NodeId> {
        let id = match self {
            Narrow::Slice { start, end } => g.add(
                Op::Slice {
                    axis,
                    start: *start,
                    end: *end,
                },
                &[x],
                format!("{name}/narrow"),
            ),
            Narrow::Gather { index } => g.add(Op::Gather { axis }, &[x, *index], format!("{name}/narrow")),
        }
        .ok()?;
        g.add_rules(id, ["narrow".to_string()]);
        Some(id)
    }
}

/// Narrows each operand of a broadcasting op whose axis `axis` (of the result, rank `rank`) it
/// really has; operands broadcast along it are kept whole.
fn broadcast_args(
    g: &mut Graph,
    args: &[NodeId],
    rank: usize,
    axis: usize,
    n: &Narrow,
    name: &str,
) -> Option<Vec<NodeId>> {
    args.iter()
        .map(|&a| {
            let t = g.node(a).ty.clone();
            match (axis + t.rank()).checked_sub(rank) {
                Some(ax) if !t.shape[ax].is_one() => n.apply(g, a, ax, name),
                _ => Some(a),
            }
        })
        .collect()
}

/// `x` with the narrowing moved inside, or `None` if it cannot move.
fn push(g: &mut Graph, x: NodeId, axis: usize, n: &Narrow) -> Option<NodeId> {
    let node = g.node(x).clone();
    let args = g.args(x);
    let out: &TensorType = &node.ty;
    let rank = out.rank();
    if out.shape[axis].is_one() {
        return None;
    }
    let new_args = match &node.op {
        Op::Unary(_) | Op::Cast { .. } => vec![n.apply(g, args[0], axis, &node.name)?],
        Op::Binary(_) | Op::Compare(_) | Op::Where => broadcast_args(g, &args, rank, axis, n, &node.name)?,
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => {
            let (a, b) = (args[0], args[1]);
            let (ra, rb) = (g.node(a).ty.rank(), g.node(b).ty.rank());
            if axis == rank - 2 {
                let ax = if *transpose_a { ra - 1 } else { ra - 2 };
                vec![n.apply(g, a, ax, &node.name)?, b]
            } else if axis == rank - 1 {
                let ax = if *transpose_b { rb - 2 } else { rb - 1 };
                vec![a, n.apply(g, b, ax, &node.name)?]
            } else {
                broadcast_args(g, &args, rank, axis, n, &node.name)?
            }
        }
        Op::Reduce { axes, keep_dims, .. } => {
            let ax = if *keep_dims {
                axis
            } else {
                (0..g.node(args[0]).ty.rank()).filter(|i| !axes.contains(i)).nth(axis)?
            };
            if axes.contains(&ax) {
                return None;
            }
            vec![n.apply(g, args[0], ax, &node.name)?]
        }
        Op::Transpose { perm } => vec![n.apply(g, args[0], perm[axis], &node.name)?],
        _ => return None,
    };
    if new_args == args {
        return None;
    }
    let id = g.add(node.op.clone(), &new_args, node.name.clone()).ok()?;
    g.add_rules(id, node.rules.iter().cloned().chain(["narrow".to_string()]));
    Some(id)
}

/// Runs the pass.
pub fn run(g: &mut Graph, _: &crate::PipelineOptions) -> PassStats {
    let mut moved = 0;
    loop {
        let mut changed = false;
        let order = g.topo_order().expect("narrow: input is verified");
        for id in order {
            if !g.contains(id) {
                continue;
            }
            let Some((narrow, axis)) = Narrow::of(g, id) else {
                continue;
            };
            let x = g.args(id)[0];
            if g.outputs().iter().any(|o| o.node == x) {
                continue;
            }
            let users = g.users(x);
            let all_same = users
                .iter()
                .all(|u| g.args(*u)[0] == x && Narrow::of(g, *u) == Some((narrow.clone(), axis)));
            if !all_same {
                continue;
            }
            let Some(new) = push(g, x, axis, &narrow) else { continue };
            for u in users {
                g.replace_uses(u, new);
                g.remove(u);
            }
            if g.users(x).is_empty() {
                g.remove(x);
            }
            moved += 1;
            changed = true;
        }
        if !changed {
            break;
        }
    }
    PassStats {
        removed: 0,
        merged: 0,
        notes: if moved > 0 {
            vec![format!(
                "moved {moved} slice/gather node(s) ahead of the ops feeding them"
            )]
        } else {
            vec![]
        },
        fired: Vec::new(),
    }
}
