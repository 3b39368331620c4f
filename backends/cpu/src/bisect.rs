//! `kiln bisect`: which rewrite rules make the compiled model disagree with the interpreter.
//!
//! The reference is the interpreter on the lowered, unoptimized graph. The model is optimized,
//! compiled (fusion rules included) and run as `kiln compile` would. On a mismatch beyond the tolerance, the rules that
//! fired are halved — the mismatch checked with one half disabled, then with the other — down to
//! the smallest set whose disabling removes it (when neither half alone does, both stay: the
//! culprits then interact). Then the optimized graph, rules on, is run on the interpreter with
//! every node kept, and the first node (in execution order) whose value differs from the node of
//! the same name in the lowered graph is reported with the rules that fired in its pass.

use std::collections::{BTreeMap, BTreeSet};

use kiln_ir::{Graph, Op, Tensor};
use kiln_passes::{OptLevel, PipelineOptions};

/// What to check.
pub struct Case<'a> {
    /// The lowered graph, not optimized.
    pub graph: &'a Graph,
    /// Its weights.
    pub weights: &'a BTreeMap<String, Tensor>,
    /// Dimension bounds, as `kiln compile` takes them.
    pub dims: &'a [(String, u64)],
    /// The inputs to run.
    pub inputs: &'a BTreeMap<String, Tensor>,
    /// The optimization pipeline.
    pub level: OptLevel,
    /// Its options (rules disabled by the user stay disabled; planted rules join).
    pub pipeline: PipelineOptions,
    /// Code generation options.
    pub options: crate::Options,
    /// An element may differ from the reference by `tol · (1 + |reference|)`.
    pub tol: f64,
}

/// The worst element of the outputs against the reference.
#[derive(Clone, Debug)]
pub struct Mismatch {
    /// Output name.
    pub output: String,
    /// Flat index of the element.
    pub index: usize,
    /// Its reference and compiled values.
    pub values: (f64, f64),
}

/// The first node of the optimized graph whose value differs from the lowered graph's.
#[derive(Clone, Debug)]
pub struct Divergence {
    /// Node name.
    pub node: String,
    /// Its largest absolute difference.
    pub max_diff: f64,
}

/// What bisecting found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// With every rule on: the worst element beyond tolerance, if any.
    pub mismatch: Option<Mismatch>,
    /// The rules that fired, with every rule on.
    pub fired: Vec<String>,
    /// The smallest set found whose disabling removes the mismatch (empty: no rule is to blame
    /// — it stays with every fired rule disabled, or there is no mismatch).
    pub culprits: Vec<String>,
    /// Compile-and-run checks made.
    pub runs: usize,
    /// Where the optimized graph first departs from the lowered one.
    pub divergence: Option<Divergence>,
}

/// Bisects the rules of `c` (see the module documentation).
pub fn bisect(c: &Case) -> Result<Report, String> {
    let reference = kiln_interp::run(c.graph, c.weights, c.inputs).map_err(|e| format!("interpreter: {e}"))?;
    let mut report = Report::default();
    let (mismatch, fired) = check(c, &reference, &[])?;
    report.runs = 1;
    report.fired = fired.clone();
    report.mismatch = mismatch;
    if report.mismatch.is_none() {
        return Ok(report);
    }
    report.runs += 1;
    if check(c, &reference, &fired)?.0.is_some() {
        return Ok(report);
    }
    let mut set = fired;
    while set.len() > 1 {
        let (a, b) = set.split_at(set.len() / 2);
        let (a, b) = (a.to_vec(), b.to_vec());
        report.runs += 1;
        if check(c, &reference, &a)?.0.is_none() {
            set = a;
            continue;
        }
        report.runs += 1;
        if check(c, &reference, &b)?.0.is_none() {
            set = b;
            continue;
        }
        break;
    }
    report.culprits = set;
    report.divergence = first_divergence(c)?;
    Ok(report)
}

/// Optimizes with `disabled` rules off, compiles, runs; the worst element beyond tolerance and the
/// rules that fired.
fn check(
    c: &Case,
    reference: &[(String, Tensor)],
    disabled: &[String],
) -> Result<(Option<Mismatch>, Vec<String>), String> {
    let mut g = c.graph.clone();
    let mut opts = c.pipeline.clone();
    opts.disabled_rules.extend(disabled.iter().cloned());
    let reports = kiln_passes::optimize_with(&mut g, c.level, &opts).map_err(|e| e.to_string())?;
    let fired: BTreeSet<String> = reports.iter().flat_map(|r| r.stats.fired.iter().cloned()).collect();
    let mut options = c.options.clone();
    options.disabled_rules.extend(disabled.iter().cloned());
    let compiled = crate::compile(&g, c.weights, c.dims, &options).map_err(|e| e.to_string())?;
    let fired: BTreeSet<String> = fired.into_iter().chain(compiled.fusion.fired.iter().cloned()).collect();
    let bytes = kiln_runtime::artifact::encode(&compiled.manifest, &compiled.weights, &compiled.code)?;
    let model = kiln_runtime::Model::from_bytes(&bytes).map_err(|e| e.to_string())?;
    let out = model.run(c.inputs).map_err(|e| e.to_string())?;
    Ok((worst(reference, &out, c.tol)?, fired.into_iter().collect()))
}

/// The element furthest beyond tolerance, over outputs matched by name.
fn worst(reference: &[(String, Tensor)], got: &[(String, Tensor)], tol: f64) -> Result<Option<Mismatch>, String> {
    let mut worst: Option<(f64, Mismatch)> = None;
    for (name, want) in reference {
        let Some((_, have)) = got.iter().find(|(n, _)| n == name) else {
            return Err(format!("the compiled model has no output `{name}`"));
        };
        if want.shape() != have.shape() {
            return Err(format!(
                "output `{name}`: shape {:?}, the interpreter's {:?}",
                have.shape(),
                want.shape()
            ));
        }
        for (i, (w, h)) in want.to_f64_vec().into_iter().zip(have.to_f64_vec()).enumerate() {
            let excess = if w.is_nan() != h.is_nan() {
                f64::INFINITY
            } else {
                (w - h).abs() / (1.0 + w.abs())
            };
            if excess > tol && worst.as_ref().is_none_or(|(e, _)| excess > *e) {
                let m = Mismatch {
                    output: name.clone(),
                    index: i,
                    values: (w, h),
                };
                worst = Some((excess, m));
            }
        }
    }
    Ok(worst.map(|(_, m)| m))
}

/// Runs the lowered and the optimized graph (every rule on) on the interpreter, every node of a
/// shared name an output, and returns the first optimized node, in execution order, that differs.
fn first_divergence(c: &Case) -> Result<Option<Divergence>, String> {
    let mut opt = c.graph.clone();
    kiln_passes::optimize_with(&mut opt, c.level, &c.pipeline).map_err(|e| e.to_string())?;
    if c.options.fuse {
        let model = kiln_passes::cost::CostModel::cpu();
        kiln_passes::fuse::run(&mut opt, &c.options.disabled_rules, model);
    }
    // Only names that are unique in both graphs identify a node.
    let unique = |g: &Graph| -> BTreeMap<String, Option<kiln_ir::NodeId>> {
        let mut m: BTreeMap<String, Option<kiln_ir::NodeId>> = BTreeMap::new();
        for n in g.node_ids() {
            m.entry(g.node(n).name.clone())
                .and_modify(|e| *e = None)
                .or_insert(Some(n));
        }
        m
    };
    let in_opt = unique(&opt);
    let names: BTreeMap<String, kiln_ir::NodeId> = unique(c.graph)
        .into_iter()
        .filter_map(|(name, n)| Some((name.clone(), n?)).filter(|_| matches!(in_opt.get(&name), Some(Some(_)))))
        .collect();
    let order = opt
        .topo_order()
        .map_err(|_| "the optimized graph has a cycle".to_string())?;
    let shared: Vec<(kiln_ir::NodeId, kiln_ir::NodeId)> = order
        .into_iter()
        .filter(|n| !matches!(opt.node(*n).op, Op::Param { .. } | Op::Input { .. }))
        .filter_map(|n| names.get(&opt.node(n).name).map(|r| (n, *r)))
        .filter(|(n, r)| opt.node(*n).ty == c.graph.node(*r).ty)
        .collect();
    let (mut a, mut b) = (c.graph.clone(), opt.clone());
    for (i, (n, r)) in shared.iter().enumerate() {
        a.add_output(format!("bisect.{i}"), *r).map_err(|e| e.to_string())?;
        b.add_output(format!("bisect.{i}"), *n).map_err(|e| e.to_string())?;
    }
    let run = |g: &Graph| kiln_interp::run(g, c.weights, c.inputs).map_err(|e| format!("interpreter: {e}"));
    let (ra, rb) = (run(&a)?, run(&b)?);
    let skip = c.graph.outputs().len();
    for (i, ((_, x), (_, y))) in ra
        .iter()
        .skip(skip)
        .zip(rb.iter().skip(opt.outputs().len()))
        .enumerate()
    {
        let (x, y) = (x.to_f64_vec(), y.to_f64_vec());
        let beyond = x
            .iter()
            .zip(&y)
            .any(|(p, q)| (p - q).abs() > c.tol * (1.0 + p.abs()) || p.is_nan() != q.is_nan());
        if beyond {
            let max_diff = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max);
            let node = opt.node(shared[i].0).name.clone();
            return Ok(Some(Divergence { node, max_diff }));
        }
    }
    Ok(None)
}
