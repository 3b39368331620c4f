//! Kernel fusion by equality saturation: the fusion rules add fused ops ([`kiln_ir::Fused`]) to
//! the e-classes of what they replace, and extraction with the target's cost model chooses; the
//! planner lowers the fused ops extraction kept and decides nothing else about them.
//!
//! Fusion is its own saturation stage, after the algebraic and layout rules and the weight
//! rewrites (quantization, sparsity): it loads the final graph, records how many nodes read each
//! value (a value read twice is never absorbed, or extraction would compute it twice), and runs
//! the fusion rules alone.

use kiln_ir::{Graph, Op};

use crate::egraph::{self, Loaded};
use crate::layout::node_rule;
use crate::rules::Rule;
use crate::simplify::Limits;
use crate::PassStats;

/// Every fusion rule.
pub fn rules() -> Vec<Rule> {
    vec![node_rule(crate::fuse_gemm::NAME, crate::fuse_gemm::fuse_gemm_epilogue)]
}

/// Sets every class's use count from the loaded graph: one per reading e-node, one per output.
fn count_uses(loaded: &mut Loaded) {
    let eg = &mut loaded.egraph;
    let mut uses: std::collections::HashMap<egg::Id, u32> = std::collections::HashMap::new();
    for class in eg.classes() {
        for node in &class.nodes {
            for k in egg::Language::children(node) {
                *uses.entry(eg.find(*k)).or_default() += 1;
            }
        }
    }
    for (_, c) in &loaded.outputs {
        *uses.entry(eg.find(*c)).or_default() += 1;
    }
    let ids: Vec<egg::Id> = eg.classes().map(|c| c.id).collect();
    for id in ids {
        eg[id].data.uses = uses.get(&id).copied().unwrap_or(0);
    }
}

/// Runs the fusion rules not in `disabled` on `graph` and extracts the cheapest graph.
pub fn run(graph: &mut Graph, disabled: &[String], model: crate::cost::CostModel) -> PassStats {
    let rules: Vec<Rule> = rules()
        .into_iter()
        .filter(|r| !disabled.iter().any(|d| r.name.as_str() == d))
        .collect();
    let mut loaded = egraph::load(graph);
    count_uses(&mut loaded);
    let limits = Limits {
        iterations: 8,
        ..Limits::default()
    };
    let mut stats = crate::simplify::saturate(graph, loaded, &rules, limits, model, "fuse");
    stats.notes.push(fused_summary(graph));
    stats
}

/// How many fused ops the graph has, by rule: `fused ops: fuse-gemm-epilogue x36`.
pub fn fused_summary(graph: &Graph) -> String {
    let mut by_rule: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for n in graph.node_ids() {
        if let Op::Fused(f) = &graph.node(n).op {
            *by_rule.entry(f.rule.as_str()).or_default() += 1;
        }
    }
    let parts: Vec<String> = by_rule.iter().map(|(r, n)| format!("{r} x{n}")).collect();
    format!(
        "fused ops: {}",
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(", ")
        }
    )
}
