//! Dead features: when the weight `W2 [n2, n1]` of a product `y = h @ W2ᵀ` has input columns that
//! are entirely zero (after pruning), the features `h[.., j]` it ignores need not be computed. If `h`
//! comes from a product `x @ W1ᵀ` through elementwise ops only (bias, activation), the rows `j` of
//! `W1`, the entries `j` of every bias vector on the way and the columns `j` of `W2` are dropped,
//! so both products shrink.
//!
//! A graph pass over weight values, not an e-graph rule: whether a column is zero is a property of
//! the checkpoint, which the e-graph does not hold. Runs after pruning; new nodes record `shrink`.

use std::collections::{BTreeMap, HashMap, HashSet};

use kiln_ir::{DType, Dim, Graph, NodeId, Op, Tensor};

fn param_f32<'a>(g: &Graph, n: NodeId, weights: &'a BTreeMap<String, Tensor>) -> Option<(&'a str, Vec<f32>)> {
    match &g.node(n).op {
        Op::Param { name, ty } if ty.dtype == DType::F32 => {
            let t = weights.get(name)?;
            let (k, v) = weights.get_key_value(name)?;
            let _ = t;
            Some((k.as_str(), v.to_f64_vec().into_iter().map(|x| x as f32).collect()))
        }
        _ => None,
    }
}

fn new_param(
    g: &mut Graph,
    weights: &mut BTreeMap<String, Tensor>,
    name: String,
    shape: Vec<usize>,
    v: Vec<f32>,
) -> NodeId {
    let ty = kiln_ir::TensorType::new(DType::F32, shape.iter().map(|d| Dim::known(*d as u64)).collect());
    weights.insert(name.clone(), Tensor::from_f32(shape, v).expect("shape matches"));
    let id = g
        .add(Op::Param { name: name.clone(), ty }, &[], name)
        .expect("params type-check");
    g.add_rules(id, ["shrink".to_string()]);
    id
}

/// Runs the pass; returns how many features were removed, per product.
pub fn run(g: &mut Graph, weights: &mut BTreeMap<String, Tensor>) -> Vec<(String, usize, usize)> {
    let mut done = Vec::new();
    let order = g.topo_order().unwrap_or_default();
    for c in order {
        if !g.contains(c) {
            continue;
        }
        let Op::MatMul {
            transpose_a: false,
            transpose_b: true,
        } = g.node(c).op
        else {
            continue;
        };
        let (h, w2n) = (g.args(c)[0], g.args(c)[1]);
        let Some((w2name, w2)) = param_f32(g, w2n, weights) else {
            continue;
        };
        let w2name = w2name.to_string();
        let wt = g.node(w2n).ty.clone();
        let (Some(n2), Some(n1)) = (wt.shape[0].as_known(), wt.shape[1].as_known()) else {
            continue;
        };
        let (n2, n1) = (n2 as usize, n1 as usize);
        let keep: Vec<usize> = (0..n1).filter(|j| (0..n2).any(|r| w2[r * n1 + j] != 0.0)).collect();
        if keep.len() == n1 || keep.is_empty() {
            continue;
        }
        // The elementwise region between the producing product and `h`.
        let mut region: Vec<NodeId> = Vec::new();
        let mut seen = HashSet::new();
        let mut stack = vec![h];
        let mut producer = None;
        let mut ok = true;
        while let Some(n) = stack.pop() {
            if !seen.insert(n) {
                continue;
            }
            let node = g.node(n);
            let last = node.ty.shape.last().and_then(|d| d.as_known());
            match &node.op {
                Op::MatMul {
                    transpose_a: false,
                    transpose_b: true,
                } if last == Some(n1 as u64) && param_f32(g, g.args(n)[1], weights).is_some() => {
                    ok &= producer.is_none_or(|p| p == n);
                    producer = Some(n);
                }
                Op::Unary(_) | Op::Binary(_) | Op::Where | Op::Compare(_) if last == Some(n1 as u64) => {
                    region.push(n);
                    for a in g.args(n) {
                        let t = &g.node(a).ty;
                        if t.rank() == 0 {
                            continue;
                        }
                        if t.rank() == 1 && param_f32(g, a, weights).is_some() {
                            continue;
                        }
                        stack.push(a);
                    }
                }
                _ => ok = false,
            }
        }
        let Some(p) = producer.filter(|_| ok) else { continue };
        // Nothing outside may see the region's full-width values.
        let inside: HashSet<NodeId> = region.iter().copied().chain([p]).collect();
        let outputs: HashSet<NodeId> = g.outputs().iter().map(|o| o.node).collect();
        if inside
            .iter()
            .any(|n| outputs.contains(n) || g.users(*n).iter().any(|u| !inside.contains(u) && *u != c))
        {
            continue;
        }
        // Shrink: the producer's weight rows, the bias vectors, the consumer's columns.
        let (x, w1n) = (g.args(p)[0], g.args(p)[1]);
        let (w1name, w1) = param_f32(g, w1n, weights).expect("checked above");
        let w1name = w1name.to_string();
        let k1 = w1.len() / n1;
        let w1k: Vec<f32> = keep
            .iter()
            .flat_map(|j| w1[j * k1..(j + 1) * k1].iter().copied())
            .collect();
        let w2k: Vec<f32> = (0..n2)
            .flat_map(|r| keep.iter().map(move |j| (r, *j)))
            .map(|(r, j)| w2[r * n1 + j])
            .collect();
        let nk = keep.len();
        let w1new = new_param(g, weights, format!("{w1name}.shrunk"), vec![nk, k1], w1k);
        let w2new = new_param(g, weights, format!("{w2name}.shrunk"), vec![n2, nk], w2k);
        let mut map: HashMap<NodeId, NodeId> = HashMap::new();
        let pnew = g
            .add(g.node(p).op.clone(), &[x, w1new], g.node(p).name.clone())
            .expect("narrower product");
        g.add_rules(pnew, ["shrink".to_string()]);
        map.insert(p, pnew);
        let topo: Vec<NodeId> = g
            .topo_order()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| region.contains(n))
            .collect();
        for n in topo {
            let mut args = Vec::new();
            for a in g.args(n) {
                if let Some(m) = map.get(&a) {
                    args.push(*m);
                } else if g.node(a).ty.rank() == 1 {
                    let (bname, b) = param_f32(g, a, weights).expect("checked above");
                    let bname = format!("{bname}.shrunk");
                    let bk: Vec<f32> = keep.iter().map(|j| b[*j]).collect();
                    args.push(new_param(g, weights, bname, vec![nk], bk));
                } else {
                    args.push(a);
                }
            }
            let m = g
                .add(g.node(n).op.clone(), &args, g.node(n).name.clone())
                .expect("narrower elementwise op");
            g.add_rules(m, ["shrink".to_string()]);
            map.insert(n, m);
        }
        let cnew = g
            .add(g.node(c).op.clone(), &[map[&h], w2new], g.node(c).name.clone())
            .expect("narrower product");
        g.add_rules(cnew, ["shrink".to_string()]);
        g.replace_uses(c, cnew);
        done.push((g.node(c).name.clone(), n1, nk));
    }
    crate::dce::run(g, &crate::PipelineOptions::default());
    done
}
