//! Kernel fusion by equality saturation: the fusion rules add fused ops ([`kiln_ir::Fused`]) to
//! the e-classes of what they replace, and extraction with the target's cost model chooses; the
//! planner lowers the fused ops extraction kept and decides nothing else about them.
//!
//! Fusion runs after the algebraic and layout rules and the weight rewrites (quantization,
//! sparsity), on the final graph, in three saturation stages: products with their epilogues
//! (`fuse_gemm.rs`), then the generated kernels' element-wise trees, reductions and softmax rows
//! (`fuse_kernel.rs`), which never absorb a product, then attention over the fused softmax
//! (`fuse_attention.rs`). Loading records how many nodes read each
//! value: a value read twice is never absorbed, or the fused graph would compute it twice.

use egg::{CostFunction, Id, Language, Runner};
use kiln_ir::{Graph, Op};

use crate::cost::{CostModel, ExtractCost};
use crate::egraph::{self, Loaded, TensorLang};
use crate::layout::node_rule;
use crate::rules::Rule;
use crate::PassStats;

/// The fusion stages' rules, in order.
fn stages() -> [Vec<Rule>; 3] {
    use crate::fuse_kernel as k;
    [
        vec![node_rule(crate::fuse_gemm::NAME, crate::fuse_gemm::fuse_gemm_epilogue)],
        vec![
            node_rule(k::ELEMENTWISE, k::fuse_elementwise),
            node_rule(k::REDUCTION, k::fuse_reduction),
            node_rule(k::SOFTMAX, k::fuse_softmax),
        ],
        vec![node_rule(
            crate::fuse_attention::NAME,
            crate::fuse_attention::fuse_attention,
        )],
    ]
}

/// Every fusion rule.
pub fn rules() -> Vec<Rule> {
    stages().into_iter().flatten().collect()
}

/// Sets every class's use count from the loaded graph: one per distinct reading node, one per
/// output.
fn count_uses(loaded: &mut Loaded) {
    let eg = &mut loaded.egraph;
    let mut uses: std::collections::HashMap<Id, u32> = std::collections::HashMap::new();
    for class in eg.classes() {
        for node in &class.nodes {
            let mut kids: Vec<Id> = node.children().iter().map(|k| eg.find(*k)).collect();
            kids.sort();
            kids.dedup();
            for k in kids {
                *uses.entry(k).or_default() += 1;
            }
        }
    }
    for (_, c) in &loaded.outputs {
        *uses.entry(eg.find(*c)).or_default() += 1;
    }
    let ids: Vec<Id> = eg.classes().map(|c| c.id).collect();
    for id in ids {
        eg[id].data.uses = uses.get(&id).copied().unwrap_or(0);
    }
}

/// Extraction cost for fusion: an e-node's own estimated time plus its operands' costs, each
/// shared among the nodes that read it (a value read by `k` nodes charges each `1/k` of its cost).
/// Summed over a tree this is the tree's cost exactly; over a shared value it counts the value
/// once in total and never grows with the number of paths to it, and a fused op wins exactly
/// when it saves the traffic and overhead of the ops it absorbs.
struct FusionCost<'a>(ExtractCost<'a>);

impl CostFunction<TensorLang> for FusionCost<'_> {
    type Cost = f64;
    fn cost<C: FnMut(Id) -> f64>(&mut self, enode: &TensorLang, mut costs: C) -> f64 {
        let eg = self.0.egraph;
        let own = self.0.own(enode);
        let mut kids: Vec<Id> = enode.children().to_vec();
        kids.sort();
        kids.dedup();
        own + kids
            .into_iter()
            .map(|k| costs(k) / eg[k].data.uses.max(1) as f64)
            .sum::<f64>()
    }
}

/// Runs the fusion rules not in `disabled` on `graph` and extracts the cheapest graph.
pub fn run(graph: &mut Graph, disabled: &[String], model: CostModel) -> PassStats {
    let start = std::time::Instant::now();
    let mut loaded = egraph::load(graph);
    count_uses(&mut loaded);
    let before = loaded.egraph.total_number_of_nodes();
    let mut eg = loaded.egraph;
    let mut fired: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    let mut iterations = 0;
    // The epilogue rule grows a product one op per application (scale, bias, addend); the kernel
    // and attention rules build their whole fused op in one, so one round each is saturation.
    for (stage, rounds) in stages().into_iter().zip([4, 1, 1]) {
        let rules: Vec<Rule> = stage
            .into_iter()
            .filter(|r| !disabled.iter().any(|d| r.name.as_str() == d))
            .collect();
        let runner = Runner::default()
            .with_iter_limit(rounds)
            .with_node_limit(2_000_000)
            .with_time_limit(std::time::Duration::from_secs(30))
            .with_egraph(eg)
            .run(&rules);
        for it in &runner.iterations {
            for (rule, n) in &it.applied {
                *fired.entry(rule.to_string()).or_default() += n;
            }
        }
        iterations += runner.iterations.len();
        eg = runner.egraph;
    }
    let mut notes = vec![format!(
        "e-graph: {before} -> {} nodes in {iterations} iterations (three stages)",
        eg.total_number_of_nodes()
    )];
    let fired_text: Vec<String> = fired.iter().map(|(r, n)| format!("{r} x{n}")).collect();
    if !fired_text.is_empty() {
        notes.push(format!("rules fired: {}", fired_text.join(", ")));
    }
    let outputs = loaded.outputs.iter().map(|(n, c)| (n.clone(), eg.find(*c))).collect();
    let loaded = Loaded {
        egraph: eg,
        outputs,
        ..loaded
    };
    let cost = FusionCost(ExtractCost {
        egraph: &loaded.egraph,
        model,
        own: Default::default(),
    });
    let new = egraph::extract(&loaded, &graph.name, "fuse", cost);
    let removed = graph.len().saturating_sub(new.len());
    *graph = new;
    notes.push(fused_summary(graph));
    notes[0].push_str(&format!(
        ", {:.1} ms with extraction",
        start.elapsed().as_secs_f64() * 1e3
    ));
    PassStats {
        removed,
        merged: 0,
        notes,
        fired: fired.into_keys().collect(),
    }
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
