//! Model families beyond GPT-2 and Llama against transformers (scripts/make-family-references.py):
//! the interpreter and the compiled model reproduce the logits, and the compiled decoder
//! generates transformers' greedy tokens, one prompt at a time and as a left-padded batch.

mod common;

use std::collections::BTreeMap;

use common::*;
use kiln_ir::Tensor;

/// Config overrides, `(name, value)`.
type Overrides = &'static [(&'static str, &'static str)];

/// GPT-NeoX's tiny shape (no key/value heads; LayerNorm epsilon).
const NEOX_TINY: Overrides = &[
    ("layers", "2"),
    ("hidden", "64"),
    ("heads", "4"),
    ("ffn", "128"),
    ("vocab", "256"),
    ("max_pos", "128"),
];

/// `(spec, reference folder, tiny shape, further overrides)`.
const FAMILIES: &[(&str, &str, Overrides, Overrides)] = &[
    (
        "mistral.ron",
        "mistral_tiny",
        LLAMA_TINY,
        &[("window", "4"), ("rope_theta", "10000.0")],
    ),
    ("qwen2.ron", "qwen2_tiny", LLAMA_TINY, &[("rope_theta", "10000.0")]),
    ("phi3.ron", "phi3_tiny", LLAMA_TINY, &[]),
    (
        "mixtral.ron",
        "mixtral_tiny",
        LLAMA_TINY,
        &[("ffn", "32"), ("rope_theta", "10000.0")],
    ),
    ("gpt_neox.ron", "gpt_neox_tiny", NEOX_TINY, &[]),
];

fn overrides(base: Overrides, extra: Overrides) -> Vec<(&'static str, &'static str)> {
    base.iter().chain(extra).copied().collect()
}

fn weights(l: &kiln_frontend::Lowered, dir: &str) -> BTreeMap<String, Tensor> {
    kiln_frontend::weights::load_safetensors(l, &data(&format!("{dir}/model.safetensors")))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
}

#[test]
fn families_logits_match_transformers() {
    for (name, dir, base, extra) in FAMILIES {
        let o = overrides(base, extra);
        let l = spec(name, &o);
        let w = weights(&l, dir);
        let ids = npy(&format!("{dir}/input_ids.npy"));
        let want = npy(&format!("{dir}/logits.npy"));
        let out = run(&l, &w, &[("input_ids", ids.clone())]);
        assert_close(&format!("{dir} interpreter logits"), &out["logits"], &want, 1e-4);
        let m = compile_o2(l, &w);
        let feed: BTreeMap<String, Tensor> = [("input_ids".to_string(), ids)].into_iter().collect();
        let got = m.run(&feed).unwrap_or_else(|e| panic!("{e}")).remove(0).1;
        assert_close(&format!("{dir} compiled logits"), &got, &want, 1e-4);
    }
}

#[test]
fn families_generate_transformers_tokens() {
    for (name, dir, base, extra) in FAMILIES {
        let l = spec_with(name, &overrides(base, extra), true);
        let w = weights(&l, dir);
        let m = compile_o2(l, &w);
        let (prompts, greedy) = (id_lists(dir, "prompts"), id_lists(dir, "greedy"));
        assert_eq!(prompts.len(), 3, "{dir}: generate.json");
        let n = greedy[0].len();
        for (p, want) in prompts.iter().zip(&greedy) {
            assert_eq!(
                &common::greedy(&m, std::slice::from_ref(p), n)[0],
                want,
                "{dir}: greedy tokens of {p:?}"
            );
        }
        assert_eq!(
            common::greedy(&m, &prompts, n),
            greedy,
            "{dir}: greedy tokens of the left-padded batch"
        );
    }
}
