//! Architectures from the papers kiln is built around (../shared/PAPERS.md) against PyTorch
//! references written in scripts/make-paper-references.py: Peri-LN, MatFormer's nested FFN (two
//! widths from one checkpoint) and Monarch Mixer's block-diagonal MLP. Interpreter and compiled
//! logits within 1e-4; compiled greedy generation (KV cache) token-identical.

mod common;

use std::collections::BTreeMap;

use common::*;
use kiln_ir::Tensor;

/// `(spec, reference folder, overrides, logits file, greedy key)`.
type Case = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
    &'static str,
);

const CASES: &[Case] = &[
    ("peri_ln.ron", "peri_ln", &[], "logits.npy", "greedy"),
    ("matformer.ron", "matformer", &[], "logits.npy", "greedy"),
    (
        "matformer.ron",
        "matformer",
        &[("ffn", "32")],
        "logits_ffn32.npy",
        "greedy_ffn32",
    ),
    ("monarch_mlp.ron", "monarch_mlp", &[], "logits.npy", "greedy"),
];

fn weights(l: &kiln_frontend::Lowered, dir: &str) -> BTreeMap<String, Tensor> {
    kiln_frontend::weights::load_safetensors(l, &data(&format!("{dir}/model.safetensors")))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
}

#[test]
fn papers_logits_match_pytorch() {
    for (name, dir, set, logits, _) in CASES {
        let l = spec(name, set);
        let w = weights(&l, dir);
        let ids = npy(&format!("{dir}/input_ids.npy"));
        let want = npy(&format!("{dir}/{logits}"));
        let out = run(&l, &w, &[("input_ids", ids.clone())]);
        assert_close(&format!("{name} {set:?} interpreter"), &out["logits"], &want, 1e-4);
        let m = compile_o2(l, &w);
        let feed: BTreeMap<String, Tensor> = [("input_ids".to_string(), ids)].into_iter().collect();
        let got = m.run(&feed).unwrap_or_else(|e| panic!("{e}")).remove(0).1;
        assert_close(&format!("{name} {set:?} compiled"), &got, &want, 1e-4);
    }
}

#[test]
fn papers_generate_reference_tokens() {
    for (name, dir, set, _, key) in CASES {
        let l = spec_with(name, set, true);
        let w = weights(&l, dir);
        let m = compile_o2(l, &w);
        for (p, want) in id_lists(dir, "prompts").iter().zip(id_lists(dir, key)) {
            let got = greedy(&m, std::slice::from_ref(p), want.len());
            assert_eq!(got[0], want, "{name} {set:?}: greedy tokens of {p:?}");
        }
    }
}

#[test]
fn matformer_artifact_holds_only_the_used_slices() {
    // The slices of `full` weights depend on weights only: they fold at compile time, so the
    // width-32 artifact stores 32 of the 128 hidden units' weights.
    let size = |set: &[(&str, &str)]| {
        let mut l = spec("matformer.ron", set);
        let w = weights(&l, "matformer");
        kiln_passes::optimize(&mut l.graph, kiln_passes::OptLevel::O2, true).unwrap();
        let c = kiln_cpu::compile(&l.graph, &w, &l.dims, &kiln_cpu::Options::for_level(2)).unwrap();
        c.weights.len()
    };
    let (full, small) = (size(&[]), size(&[("ffn", "32")]));
    // Each layer's MLP: up [ffn, 64] + bias + down [64, ffn], f32.
    let saved = 2 * (2 * 64 * (128 - 32) + (128 - 32)) * 4;
    eprintln!("matformer artifact weights: ffn 128 {full} bytes, ffn 32 {small} bytes");
    assert!(full - small >= saved, "{full} - {small} < {saved}");
}
