//! The interpreter against outputs PyTorch/transformers produced (scripts/make-references.py).

mod common;

use common::*;

const GPT2_TINY: &[(&str, &str)] = &[
    ("layers", "2"),
    ("hidden", "64"),
    ("heads", "4"),
    ("vocab", "256"),
    ("max_pos", "64"),
];

#[test]
fn gpt2_tiny_logits_match_transformers() {
    let l = spec("gpt2.ron", GPT2_TINY);
    let w = kiln_frontend::weights::load_safetensors(&l, &data("gpt2_tiny/model.safetensors"))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = run(&l, &w, &[("input_ids", npy("gpt2_tiny/input_ids.npy"))]);
    assert_close("gpt2 logits", &out["logits"], &npy("gpt2_tiny/logits.npy"), 1e-4);
}

#[test]
fn llama_tiny_logits_match_transformers() {
    let l = spec("llama.ron", LLAMA_TINY);
    let w = kiln_frontend::weights::load_safetensors(&l, &data("llama_tiny/model.safetensors"))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = run(&l, &w, &[("input_ids", npy("llama_tiny/input_ids.npy"))]);
    assert_close("llama logits", &out["logits"], &npy("llama_tiny/logits.npy"), 1e-4);
}

fn minilm_case(prefix: &str) {
    let l = spec("minilm.ron", &[]);
    let w = kiln_frontend::weights::load_safetensors(&l, &minilm_dir().join("model.safetensors"))
        .unwrap_or_else(|e| panic!("{e}"));
    let inputs = [
        ("input_ids", npy(&format!("minilm/{prefix}_input_ids.npy"))),
        ("attention_mask", npy(&format!("minilm/{prefix}_attention_mask.npy"))),
        ("token_type_ids", npy(&format!("minilm/{prefix}_token_type_ids.npy"))),
    ];
    let out = run(&l, &w, &inputs);
    let want = npy(&format!("minilm/{prefix}_last_hidden_state.npy"));
    assert_close(
        &format!("minilm {prefix} last_hidden_state"),
        &out["last_hidden_state"],
        &want,
        1e-4,
    );
    if prefix == "padded" {
        let want = npy("minilm/padded_sentence_embedding.npy");
        assert_close(
            "minilm padded sentence_embedding",
            &out["sentence_embedding"],
            &want,
            1e-5,
        );
    }
}

#[test]
fn minilm_single_sentence_matches_pytorch() {
    minilm_case("single");
}

#[test]
fn minilm_padded_batch_matches_pytorch() {
    minilm_case("padded");
}

#[test]
fn tiny_gpt2_is_the_same_spec_as_gpt2_small() {
    // The full-size spec is what users compile; the tiny one differs only by config overrides.
    let full = spec("gpt2.ron", &[]);
    assert_eq!(
        kiln_ir::param_count(&full.graph),
        124_439_808,
        "GPT-2 small has 124,439,808 parameters"
    );
    let tiny = spec("gpt2.ron", GPT2_TINY);
    // 12 tensors per block plus wte, wpe and ln_f's two.
    assert_eq!(full.params.len(), 12 * 12 + 4);
    assert_eq!(tiny.params.len(), 2 * 12 + 4);
}

#[test]
fn minilm_compiled_for_cpu_matches_pytorch() {
    let mut l = spec("minilm.ron", &[]);
    let w = kiln_frontend::weights::load_safetensors(&l, &minilm_dir().join("model.safetensors"))
        .unwrap_or_else(|e| panic!("{e}"));
    kiln_passes::optimize(&mut l.graph, kiln_passes::OptLevel::O1, true).unwrap_or_else(|e| panic!("{e}"));
    let path = std::env::temp_dir().join(format!("kiln-minilm-{}.kiln", std::process::id()));
    kiln_cpu::compile_to_file(&l.graph, &w, &l.dims, &kiln_cpu::Options::for_level(1), &path)
        .unwrap_or_else(|e| panic!("{e}"));
    let model = kiln_runtime::Model::load(&path).unwrap_or_else(|e| panic!("{e}"));
    std::fs::remove_file(&path).ok();
    for prefix in ["single", "padded"] {
        let inputs = ["input_ids", "attention_mask", "token_type_ids"]
            .iter()
            .map(|n| (n.to_string(), npy(&format!("minilm/{prefix}_{n}.npy"))))
            .collect();
        let out: std::collections::BTreeMap<String, kiln_ir::Tensor> = model
            .run(&inputs)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .collect();
        let want = npy(&format!("minilm/{prefix}_last_hidden_state.npy"));
        assert_close(
            &format!("compiled minilm {prefix} last_hidden_state"),
            &out["last_hidden_state"],
            &want,
            1e-4,
        );
    }
}

fn compiled_logits(name: &str, overrides: &[(&str, &str)], dir: &str) -> kiln_ir::Tensor {
    let mut l = spec(name, overrides);
    let w = kiln_frontend::weights::load_safetensors(&l, &data(&format!("{dir}/model.safetensors")))
        .unwrap_or_else(|e| panic!("{e}"));
    kiln_passes::optimize(&mut l.graph, kiln_passes::OptLevel::O1, true).unwrap_or_else(|e| panic!("{e}"));
    let c =
        kiln_cpu::compile(&l.graph, &w, &l.dims, &kiln_cpu::Options::for_level(2)).unwrap_or_else(|e| panic!("{e}"));
    let bytes = kiln_runtime::artifact::encode(&c.manifest, &c.weights, &c.code).unwrap();
    let model = kiln_runtime::Model::from_bytes(&bytes).unwrap_or_else(|e| panic!("{e}"));
    let inputs = [("input_ids".to_string(), npy(&format!("{dir}/input_ids.npy")))]
        .into_iter()
        .collect();
    model.run(&inputs).unwrap_or_else(|e| panic!("{e}")).remove(0).1
}

#[test]
fn gpt2_and_llama_compiled_for_cpu_match_transformers() {
    let g = compiled_logits("gpt2.ron", GPT2_TINY, "gpt2_tiny");
    assert_close("compiled gpt2 logits", &g, &npy("gpt2_tiny/logits.npy"), 1e-4);
    let l = compiled_logits("llama.ron", LLAMA_TINY, "llama_tiny");
    assert_close("compiled llama logits", &l, &npy("llama_tiny/logits.npy"), 1e-4);
}
