//! Attention steps: each fused attention (`fuse-attention`) becomes a blocked step. Its layouts
//! are read in place: head-split transposes feeding only it and the head-merge transpose after it
//! become strides, q/k/v that are column ranges of a merged projection become column views, and
//! keys and values appended to the cache and read by nothing else are read from the cache.

use std::collections::{HashMap, HashSet};

use kiln_ir::{Graph, NodeId, Op};

use crate::group;
use crate::CompileError;

/// One attention step: the fused attention's parts, its operands (possibly seen through a
/// folded head-split transpose or a column view), and the other inputs of its softmax kernel.
pub(crate) struct AttnPlan {
    /// The fused attention's scale, softmax kernel and that kernel's inputs (`None`: the scores).
    pub parts: group::Attention,
    pub q: NodeId,
    pub k: NodeId,
    pub v: NodeId,
    pub seq_major: [bool; 4],
    pub views: [Option<kiln_runtime::plan::ColumnView>; 3],
    pub leaves: Vec<NodeId>,
    /// k and v read in place from the key/value cache.
    pub cached: [bool; 2],
}

/// The attention steps of a graph, keyed by the node whose value each writes; the nodes they
/// make unnecessary; the cache appends read in place.
pub(crate) struct Attentions {
    pub plans: HashMap<NodeId, AttnPlan>,
    pub skip: HashSet<NodeId>,
    pub cache_views: HashSet<NodeId>,
}

/// Plans every fused attention of `graph`.
pub(crate) fn plan(
    graph: &Graph,
    order: &[NodeId],
    users: &HashMap<NodeId, Vec<NodeId>>,
    outputs: &HashSet<NodeId>,
) -> Result<Attentions, CompileError> {
    let mut attn: HashMap<NodeId, AttnPlan> = HashMap::new(); // keyed by the node it computes
    let mut attn_skip: HashSet<NodeId> = HashSet::new();
    for &pv in order {
        let Some(parts) = group::attention(graph, pv)? else {
            continue;
        };
        let args = graph.args(pv);
        let (q, k, v) = (args[0], args[1], args[2]);
        let s = pv;
        // Head-split transposes feeding only this attention, and the head merge after it, are
        // folded into the step as strides.
        let fold = |x: NodeId, consumer: NodeId| match &graph.node(x).op {
            Op::Transpose { perm } if perm[..] == [0, 2, 1, 3] && users[&x] == [consumer] && !outputs.contains(&x) => {
                (graph.args(x)[0], true)
            }
            _ => (x, false),
        };
        let ((qn, qsm), (kn, ksm), (vn, vsm)) = if q == k {
            // q and k stay as they are; v too when it is the same value (`Attention(q: "x",
            // k: "x", v: "x")`): folding it would skip the value q and k still read.
            let vf = if v == q { (v, false) } else { fold(v, pv) };
            ((q, false), (k, false), vf)
        } else {
            (fold(q, s), fold(k, s), fold(v, pv))
        };
        let (emit, osm) = match users[&pv][..] {
            [t] if !outputs.contains(&pv)
                && matches!(&graph.node(t).op, Op::Transpose { perm } if perm[..] == [0, 2, 1, 3]) =>
            {
                (t, true)
            }
            _ => (pv, false),
        };
        for (folded, node) in [(qsm, q), (ksm, k), (vsm, v)] {
            if folded {
                attn_skip.insert(node);
            }
        }
        // A folded operand that is the head split of a column slice of a wider [b, s, W] value
        // (a merged projection, GPT-2's c_attn) is read in place.
        let mut views = [None; 3];
        let mut srcs = [qn, kn, vn];
        for (i, (src, folded)) in [(qn, qsm), (kn, ksm), (vn, vsm)].into_iter().enumerate() {
            if !folded || !matches!(graph.node(src).op, Op::Reshape { .. }) || users[&src].len() != 1 {
                continue;
            }
            let sl = graph.args(src)[0];
            let (st, ht) = (&graph.node(sl).ty, &graph.node(src).ty);
            let Op::Slice { axis, start, .. } = graph.node(sl).op else {
                continue;
            };
            if axis != 2
                || st.rank() != 3
                || ht.rank() != 4
                || users[&sl].len() != 1
                || outputs.contains(&sl)
                || st.shape[..2] != ht.shape[..2]
            {
                continue;
            }
            let (Some(hh), Some(dd)) = (ht.shape[2].as_known(), ht.shape[3].as_known()) else {
                continue;
            };
            views[i] = Some(kiln_runtime::plan::ColumnView {
                offset: start,
                heads: hh,
                head_dim: dd,
            });
            srcs[i] = graph.args(sl)[0];
            attn_skip.insert(src);
            attn_skip.insert(sl);
        }
        let [qn, kn, vn] = srcs;
        if emit != pv {
            attn_skip.insert(pv);
        }
        let leaves = parts.inputs.iter().flatten().copied().collect();
        attn.insert(
            emit,
            AttnPlan {
                parts,
                q: qn,
                k: kn,
                v: vn,
                seq_major: [qsm, ksm, vsm, osm],
                views,
                leaves,
                cached: [false; 2],
            },
        );
    }
    let cache_views = cache_reads(graph, users, outputs, &mut attn);
    Ok(Attentions {
        plans: attn,
        skip: attn_skip,
        cache_views,
    })
}

/// Keys and values that come straight from the cache and feed nothing but their attention step
/// are read from the cache in place (no per-step copy of the whole cache): marks the steps and
/// returns the cache appends.
fn cache_reads(
    graph: &Graph,
    users: &HashMap<NodeId, Vec<NodeId>>,
    outputs: &HashSet<NodeId>,
    attn: &mut HashMap<NodeId, AttnPlan>,
) -> HashSet<NodeId> {
    let mut cache_views: HashSet<NodeId> = HashSet::new();
    for a in attn.values_mut() {
        for (i, (node, sm)) in [(a.k, a.seq_major[1]), (a.v, a.seq_major[2])].into_iter().enumerate() {
            if !sm
                && a.views[i + 1].is_none()
                && a.k != a.v
                && matches!(graph.node(node).op, Op::CacheAppend { .. })
                && users[&node].len() == 1
                && !outputs.contains(&node)
            {
                a.cached[i] = true;
                cache_views.insert(node);
            }
        }
    }

    cache_views
}
