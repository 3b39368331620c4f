//! `kiln compile --report`: the cost model's estimate of each step of the final plan set against
//! the step's measured time on this machine (median of five profiled runs, batch 1 and other
//! symbolic dims at 128 — the extents the model assumes), summed by kind of step and for the
//! slowest steps.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_ir::{Graph, Op};
use kiln_passes::cost::CostModel;

/// Tokens per measured run.
const TOKENS: usize = 128;

/// Inputs for one measured run: batch dims 1, other symbolic dims [`TOKENS`] (or their bound, if
/// smaller); token ids, a mask of ones and type ids of zeros for integer inputs, small values for
/// float ones.
fn feed(graph: &Graph, dims: &[(String, u64)]) -> Result<BTreeMap<String, kiln_ir::Tensor>, String> {
    let extent = |s: &str| -> u64 {
        let bound = dims.iter().find(|(n, _)| n == s).map_or(u64::MAX, |d| d.1);
        if s.contains("batch") {
            1
        } else {
            (TOKENS as u64).min(bound)
        }
    };
    let mut out = BTreeMap::new();
    for &i in graph.inputs() {
        let Op::Input { name, ty, .. } = &graph.node(i).op else {
            continue;
        };
        let shape: Vec<usize> = ty
            .shape
            .iter()
            .map(|d| (d.coeff() * d.symbols().iter().map(|s| extent(s)).product::<u64>()) as usize)
            .collect();
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|j| {
                if !ty.dtype.is_int() {
                    ((j % 17) as f64 - 8.0) / 16.0
                } else if name.contains("mask") {
                    1.0
                } else if name.contains("type") {
                    0.0
                } else {
                    (j % 97 + 1) as f64
                }
            })
            .collect();
        let t = kiln_ir::Tensor::from_f64(ty.dtype, shape, &v).map_err(|e| format!("input `{name}`: {e}"))?;
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// Median seconds of every step over five runs after a warm-up.
fn measure(model: &kiln_runtime::Model, feed: &BTreeMap<String, kiln_ir::Tensor>) -> Result<Vec<f64>, String> {
    model.step_times(feed).map_err(|e| e.to_string())?;
    let runs: Vec<Vec<f64>> = (0..5)
        .map(|_| model.step_times(feed).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    Ok((0..runs[0].len())
        .map(|i| {
            let mut t: Vec<f64> = runs.iter().map(|r| r[i]).collect();
            t.sort_by(f64::total_cmp);
            t[2]
        })
        .collect())
}

/// The report's lines: totals, per kind of step, and the slowest steps.
pub fn lines(
    artifact: &Path,
    (graph, dims): (&Graph, &[(String, u64)]),
    predicted: &[f64],
    costs: Option<&CostModel>,
) -> Vec<String> {
    if graph
        .node_ids()
        .any(|n| matches!(graph.node(n).op, Op::CacheAppend { .. }))
    {
        return vec!["steps not measured for a generating artifact (kiln generate --profile times them)".into()];
    }
    let model = match kiln_runtime::Model::load(artifact) {
        Ok(m) => m,
        Err(e) => return vec![format!("steps not measured: {e}")],
    };
    let steps = &model.manifest().steps;
    if steps.len() != predicted.len() {
        return vec![format!(
            "steps not measured: {} estimates for {} steps",
            predicted.len(),
            steps.len()
        )];
    }
    let measured = match feed(graph, dims).and_then(|f| measure(&model, &f)) {
        Ok(m) => m,
        Err(e) => return vec![format!("steps not measured: {e}")],
    };
    let ms = |s: f64| s * 1e3;
    let (p_total, m_total): (f64, f64) = (predicted.iter().sum::<f64>() / 1e9, measured.iter().sum());
    let constants = match costs {
        Some(c) => format!(
            "constants measured here: products {:.0} GFLOP/s, streaming {:.1} GB/s, {:.1} µs per step",
            c.matmul_flops_per_ns,
            c.bytes_per_ns,
            c.op_overhead_ns / 1e3
        ),
        None => "the target's fixed constants".into(),
    };
    let mut out = vec![format!(
        "steps    estimated {:.2} ms ({constants}), measured {:.2} ms (batch 1, sequences of up to {TOKENS}; median of 5 profiled runs); by kind and the slowest steps:",
        ms(p_total),
        ms(m_total)
    )];
    let mut by_kind: BTreeMap<String, (f64, f64, usize)> = BTreeMap::new();
    for (i, s) in steps.iter().enumerate() {
        let e = by_kind.entry(kiln_runtime::step_kind(s)).or_default();
        e.0 += predicted[i] / 1e9;
        e.1 += measured[i];
        e.2 += 1;
    }
    let mut kinds: Vec<_> = by_kind.into_iter().collect();
    kinds.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    for (kind, (p, m, n)) in kinds {
        out.push(format!(
            "steps      {kind:<18} x{n:<4} estimated {:>8.3} ms, measured {:>8.3} ms ({:.2}x)",
            ms(p),
            ms(m),
            p / m.max(1e-12)
        ));
    }
    let mut order: Vec<usize> = (0..steps.len()).collect();
    order.sort_by(|a, b| measured[*b].total_cmp(&measured[*a]));
    for i in order.into_iter().take(8) {
        let name = &model.manifest().values[steps[i].out() as usize].name;
        out.push(format!(
            "steps      #{i:<4} {:<18} {name}: estimated {:.3} ms, measured {:.3} ms",
            kiln_runtime::step_kind(&steps[i]),
            predicted[i] / 1e6,
            ms(measured[i])
        ));
    }
    out
}
