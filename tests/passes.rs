//! Passes keep the graph valid and its outputs unchanged (checked by the interpreter).

mod common;

use common::*;
use kiln_passes::{optimize, OptLevel};

/// The config of `tests/data/gpt2_tiny`.
const GPT2_TINY: [(&str, &str); 5] = [
    ("layers", "2"),
    ("hidden", "64"),
    ("heads", "4"),
    ("vocab", "256"),
    ("max_pos", "64"),
];

#[test]
fn pipelines_preserve_gpt2_tiny_outputs() {
    let l = spec("gpt2.ron", &GPT2_TINY);
    let w = kiln_frontend::weights::load_safetensors(&l, &data("gpt2_tiny/model.safetensors"))
        .unwrap_or_else(|e| panic!("{e}"));
    let ids = npy("gpt2_tiny/input_ids.npy");
    let before = run(&l, &w, &[("input_ids", ids.clone())]);
    for level in [OptLevel::O0, OptLevel::O1] {
        let mut opt = l.clone();
        let report = optimize(&mut opt.graph, level, true).unwrap_or_else(|e| panic!("{e}"));
        let after = run(&opt, &w, &[("input_ids", ids.clone())]);
        assert_eq!(after["logits"], before["logits"], "{level:?} changed the logits");
        if level == OptLevel::O1 {
            let cse = report.iter().find(|r| r.pass == "cse").expect("cse ran");
            // Each attention builds its own scalar constants and causal iotas; CSE shares them.
            assert!(cse.stats.merged > 0, "CSE found nothing to merge");
            assert!(opt.graph.len() < l.graph.len());
        }
    }
}

#[test]
fn every_spec_lowers_and_survives_every_pipeline() {
    for name in ["minilm.ron", "gpt2.ron", "llama.ron", "mlp.ron"] {
        let l = spec(name, &[]);
        for level in [OptLevel::O0, OptLevel::O1] {
            let mut g = l.graph.clone();
            optimize(&mut g, level, true).unwrap_or_else(|e| panic!("{name} {level:?}: {e}"));
            assert_eq!(g.outputs().len(), l.graph.outputs().len());
        }
    }
}

#[test]
fn ir_text_of_mlp_after_o1() {
    let mut l = spec("mlp.ron", &[]);
    optimize(&mut l.graph, OptLevel::O1, true).unwrap_or_else(|e| panic!("{e}"));
    insta::assert_snapshot!(l.graph.to_text());
}

/// The IR after every pipeline, for every spec (one layer, small widths so the snapshots stay
/// readable). A change here in review must be explainable.
#[test]
fn ir_snapshots_after_each_pipeline() {
    let specs: &[(&str, &[(&str, &str)])] = &[
        (
            "minilm.ron",
            &[
                ("layers", "1"),
                ("hidden", "32"),
                ("heads", "2"),
                ("ffn", "64"),
                ("vocab", "100"),
                ("max_pos", "16"),
            ],
        ),
        (
            "gpt2.ron",
            &[
                ("layers", "1"),
                ("hidden", "32"),
                ("heads", "2"),
                ("vocab", "100"),
                ("max_pos", "16"),
            ],
        ),
        (
            "llama.ron",
            &[
                ("layers", "1"),
                ("hidden", "32"),
                ("heads", "4"),
                ("kv_heads", "2"),
                ("ffn", "64"),
                ("vocab", "100"),
            ],
        ),
        ("mlp.ron", &[]),
    ];
    for (name, overrides) in specs {
        let l = spec(name, overrides);
        for level in [OptLevel::O0, OptLevel::O1, OptLevel::O2] {
            let mut g = l.graph.clone();
            optimize(&mut g, level, true).unwrap_or_else(|e| panic!("{e}"));
            let stem = name.trim_end_matches(".ron");
            insta::assert_snapshot!(format!("ir_{stem}_{level:?}"), g.to_text());
        }
    }
}

/// `kiln bisect` finds a deliberately wrong rule planted for this test alone (`exp a → a`, which
/// extraction prefers because it is cheaper), names the node where the optimized graph first
/// departs from the lowered one, and finds nothing wrong without it.
#[test]
fn bisect_names_a_planted_wrong_rule() {
    let l = spec("gpt2.ron", &GPT2_TINY);
    let w = kiln_frontend::weights::load_safetensors(&l, &data("gpt2_tiny/model.safetensors"))
        .unwrap_or_else(|e| panic!("{e}"));
    let inputs = std::collections::BTreeMap::from([("input_ids".to_string(), npy("gpt2_tiny/input_ids.npy"))]);
    let case = |extra: Vec<kiln_passes::rules::PatternRule>| kiln_cpu::bisect::Case {
        graph: &l.graph,
        weights: &w,
        dims: &l.dims,
        inputs: &inputs,
        level: OptLevel::O2,
        pipeline: kiln_passes::PipelineOptions {
            extra_rules: extra,
            ..Default::default()
        },
        options: kiln_cpu::Options::for_level(2),
        tol: 1e-4,
    };
    let clean = kiln_cpu::bisect::bisect(&case(vec![])).unwrap_or_else(|e| panic!("{e}"));
    assert!(clean.mismatch.is_none(), "{clean:?}");
    let planted = kiln_passes::rules::PatternRule {
        name: "plant-exp-identity".into(),
        lhs: "(exp ?a)".into(),
        rhs: "?a".into(),
    };
    // Correct rules that fire everywhere, so the wrong one has company to be told apart from.
    let harmless = [
        ("plant-add-commutes", "(add ?a ?b)", "(add ?b ?a)"),
        ("plant-mul-commutes", "(mul ?a ?b)", "(mul ?b ?a)"),
    ];
    let mut rules: Vec<_> = harmless
        .iter()
        .map(|(n, l, r)| kiln_passes::rules::PatternRule {
            name: n.to_string(),
            lhs: l.to_string(),
            rhs: r.to_string(),
        })
        .collect();
    rules.insert(1, planted);
    let r = kiln_cpu::bisect::bisect(&case(rules)).unwrap_or_else(|e| panic!("{e}"));
    let m = r.mismatch.as_ref().expect("the planted rule breaks the softmax");
    assert_eq!(m.output, "logits", "{r:?}");
    assert!(
        r.fired.len() >= 3 && r.fired.contains(&"plant-exp-identity".to_string()),
        "{r:?}"
    );
    assert_eq!(r.culprits, vec!["plant-exp-identity".to_string()], "{r:?}");
    eprintln!("{r:?}");
    let d = r.divergence.as_ref().expect("a node diverges");
    assert!(
        d.node.starts_with("h.0/") && d.node.ends_with("/exp"),
        "first divergence at {d:?}"
    );
}
