//! Algebraic simplification by equality saturation.
//!
//! Loads the graph into an e-graph (`egraph.rs`), applies the algebraic rules (`rules.rs`) with
//! explicit iteration, node and time limits, and extracts the cheapest equivalent graph. Assumes a
//! verified graph; leaves a verified graph whose outputs equal the input's up to floating-point
//! reassociation. Reports which rules fired and why saturation stopped — a limit is reported,
//! never hidden. Fusion is a later stage of its own (`fuse.rs`).

use std::time::Duration;

use egg::{Rewrite, Runner, StopReason};
use kiln_ir::Graph;

use crate::cost::{CostModel, ExtractCost};
use crate::egraph::{self, TensorAnalysis, TensorLang};
use crate::PassStats;

/// Limits of one saturation run.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Rule-application rounds.
    pub iterations: usize,
    /// E-nodes.
    pub nodes: usize,
    /// Wall time.
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            iterations: 12,
            nodes: 200_000,
            time: Duration::from_secs(3),
        }
    }
}

/// Runs `rules` on `graph` and replaces it by the cheapest equivalent.
pub fn run_rules(
    graph: &mut Graph,
    rules: &[Rewrite<TensorLang, TensorAnalysis>],
    limits: Limits,
    model: CostModel,
) -> PassStats {
    let loaded = egraph::load(graph);
    saturate(graph, loaded, rules, limits, model, "simplify")
}

/// Runs `rules` on the loaded `graph` and replaces it by the cheapest equivalent; nodes the rules
/// made without naming one record `pass`.
pub fn saturate(
    graph: &mut Graph,
    loaded: egraph::Loaded,
    rules: &[Rewrite<TensorLang, TensorAnalysis>],
    limits: Limits,
    model: CostModel,
    pass: &str,
) -> PassStats {
    let before = loaded.egraph.total_number_of_nodes();
    let runner = Runner::default()
        .with_iter_limit(limits.iterations)
        .with_node_limit(limits.nodes)
        .with_time_limit(limits.time)
        .with_egraph(loaded.egraph)
        .run(rules);
    let mut fired: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for it in &runner.iterations {
        for (rule, n) in &it.applied {
            *fired.entry(rule.to_string()).or_default() += n;
        }
    }
    let stop = match &runner.stop_reason {
        Some(StopReason::Saturated) => "saturated".to_string(),
        Some(StopReason::IterationLimit(n)) => format!("iteration limit ({n})"),
        Some(StopReason::NodeLimit(n)) => format!("node limit ({n})"),
        Some(StopReason::TimeLimit(t)) => format!("time limit ({t:.1} s)"),
        Some(StopReason::Other(s)) => s.clone(),
        None => "not run".into(),
    };
    let mut notes = vec![format!(
        "e-graph: {before} -> {} nodes in {} iterations, stopped: {stop}",
        runner.egraph.total_number_of_nodes(),
        runner.iterations.len()
    )];
    let fired_names: Vec<String> = fired.keys().cloned().collect();
    let fired_text: Vec<String> = fired.iter().map(|(r, n)| format!("{r} x{n}")).collect();
    if !fired_text.is_empty() {
        notes.push(format!("rules fired: {}", fired_text.join(", ")));
    }
    let outputs = loaded
        .outputs
        .iter()
        .map(|(n, c)| (n.clone(), runner.egraph.find(*c)))
        .collect();
    let loaded = egraph::Loaded {
        egraph: runner.egraph,
        outputs,
        ..loaded
    };
    let cost = ExtractCost {
        egraph: &loaded.egraph,
        model,
        own: Default::default(),
    };
    let new = egraph::extract(&loaded, &graph.name, pass, cost);
    let removed = graph.len().saturating_sub(new.len());
    *graph = new;
    PassStats {
        removed,
        merged: 0,
        notes,
        fired: fired_names,
    }
}

/// The pass: the algebraic and layout rule sets, less any disabled rules, with default limits,
/// extracted with the target's cost model.
pub fn run(graph: &mut Graph, opts: &crate::PipelineOptions) -> PassStats {
    let rules: Vec<_> = crate::rules::all()
        .into_iter()
        .chain(opts.extra_rules.iter().filter_map(|r| r.rule().ok()))
        .filter(|r| !opts.disabled_rules.iter().any(|d| r.name.as_str() == d))
        .collect();
    run_rules(graph, &rules, Limits::default(), opts.cost_model())
}
