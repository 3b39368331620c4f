//! Passes keep the graph valid and its outputs unchanged (checked by the interpreter).

mod common;

use common::*;
use kiln_passes::{optimize, OptLevel};

#[test]
fn pipelines_preserve_gpt2_tiny_outputs() {
    let overrides = [
        ("layers", "2"),
        ("hidden", "64"),
        ("heads", "4"),
        ("vocab", "256"),
        ("max_pos", "64"),
    ];
    let l = spec("gpt2.ron", &overrides);
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
