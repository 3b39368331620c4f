//! Hugging Face folders compiled without a hand-written spec: `kiln_frontend::load(DIR)` imports
//! `config.json` (hf/), binds the folder's checkpoint, and must reproduce transformers' outputs
//! (the tiny references of scripts/make-references.py and make-family-references.py, MiniLM's
//! real checkpoint); the decoders generate transformers' greedy tokens. Bad folders are errors
//! that name the field.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use kiln_frontend::Options;
use kiln_ir::Tensor;
use kiln_runtime::Model;

fn load(dir: &Path, decode: bool) -> kiln_frontend::Lowered {
    let opts = Options {
        decode,
        ..Options::default()
    };
    kiln_frontend::load(dir, &opts).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn weights(l: &kiln_frontend::Lowered, dir: &Path) -> BTreeMap<String, Tensor> {
    kiln_frontend::weights::load_safetensors(l, dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn compiled(dir: &Path, decode: bool) -> Model {
    let l = load(dir, decode);
    let w = weights(&l, dir);
    compile_o2(l, &w)
}

const DECODERS: [&str; 8] = [
    "gpt2_tiny",
    "llama_tiny",
    "mistral_tiny",
    "qwen2_tiny",
    "phi3_tiny",
    "gpt_neox_tiny",
    "gpt_neox_sequential_tiny",
    "mixtral_tiny",
];

#[test]
fn imported_decoders_match_transformers_logits() {
    for dir in DECODERS {
        let path = data(dir);
        let l = load(&path, false);
        let w = weights(&l, &path);
        let out = run(&l, &w, &[("input_ids", npy(&format!("{dir}/input_ids.npy")))]);
        assert_close(
            &format!("imported {dir} logits"),
            &out["logits"],
            &npy(&format!("{dir}/logits.npy")),
            1e-4,
        );
    }
}

/// Max abs difference of `got` and `want` ([batch, seq, vocab]) over the tokens `mask` keeps.
fn real_token_error(got: &Tensor, want: &Tensor, mask: &Tensor) -> f64 {
    assert_eq!(got.shape(), want.shape());
    let vocab = got.shape()[2];
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    let real = mask.to_f64_vec();
    (0..g.len())
        .filter(|i| real[i / vocab] != 0.0)
        .map(|i| (g[i] - w[i]).abs())
        .fold(0.0, f64::max)
}

#[test]
fn imported_decoders_mask_padding_as_transformers() {
    // A left-padded batch with its attention_mask, as transformers' forward takes it (positions
    // from 0, padded keys hidden); real tokens' logits compared, interpreter and compiled.
    for dir in DECODERS {
        let path = data(dir);
        let l = load(&path, false);
        let w = weights(&l, &path);
        let inputs = [
            ("input_ids", npy(&format!("{dir}/input_ids.npy"))),
            ("attention_mask", npy(&format!("{dir}/attention_mask.npy"))),
        ];
        let want = npy(&format!("{dir}/masked_logits.npy"));
        let interp = run(&l, &w, &inputs);
        let feed: BTreeMap<String, Tensor> = inputs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let m = compile_o2(l, &w);
        let out = m.run(&feed).unwrap_or_else(|e| panic!("{dir}: {e}"));
        for (what, got) in [("interpreter", &interp["logits"]), ("compiled", &out[0].1)] {
            let e = real_token_error(got, &want, &inputs[1].1);
            eprintln!("imported {dir}, padded batch, {what}: max abs error {e:.3e} over real tokens");
            assert!(e < 1e-4, "imported {dir}, padded batch, {what}: {e:e}");
        }
    }
}

#[test]
fn imported_decoders_generate_transformers_tokens() {
    for dir in DECODERS {
        let m = compiled(&data(dir), true);
        let (prompts, greedy) = (id_lists(dir, "prompts"), id_lists(dir, "greedy"));
        for (p, want) in prompts.iter().zip(&greedy) {
            let got = common::greedy(&m, std::slice::from_ref(p), want.len());
            assert_eq!(&got[0], want, "imported {dir}: greedy tokens of {p:?}");
        }
    }
}

#[test]
fn imported_minilm_matches_pytorch() {
    let dir = minilm_dir();
    let m = compiled(&dir, false);
    let feed: BTreeMap<String, Tensor> = ["input_ids", "attention_mask", "token_type_ids"]
        .iter()
        .map(|n| (n.to_string(), npy(&format!("minilm/padded_{n}.npy"))))
        .collect();
    let out = m.run(&feed).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["last_hidden_state", "pooler_output"]);
    for (name, got) in &out {
        let want = npy(&format!("minilm/padded_{name}.npy"));
        assert_close(&format!("imported minilm {name}"), got, &want, 1e-4);
    }
}

#[test]
fn imported_vit_matches_transformers() {
    // ViTModel: last_hidden_state and the pooler; ViTForImageClassification: tensors under
    // `vit.`, no pooler, a classifier over the class token.
    let cases: [(&str, &[&str]); 2] = [
        ("vit_tiny", &["last_hidden_state", "pooler_output"]),
        ("vit_classifier_tiny", &["logits"]),
    ];
    for (dir, outputs) in cases {
        let m = compiled(&data(dir), false);
        let feed: BTreeMap<String, Tensor> = [("pixel_values".to_string(), npy(&format!("{dir}/pixel_values.npy")))]
            .into_iter()
            .collect();
        let got: BTreeMap<String, Tensor> = m
            .run(&feed)
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .into_iter()
            .collect();
        for name in outputs {
            let want = npy(&format!("{dir}/{name}.npy"));
            assert_close(&format!("imported {dir} {name}"), &got[*name], &want, 1e-4);
        }
    }
}

#[test]
fn imported_distilbert_matches_transformers() {
    // The second row is padding after 6 tokens: every position, padded ones too, as transformers.
    let dir = "distilbert_tiny";
    let m = compiled(&data(dir), false);
    let feed: BTreeMap<String, Tensor> = ["input_ids", "attention_mask"]
        .iter()
        .map(|n| (n.to_string(), npy(&format!("{dir}/{n}.npy"))))
        .collect();
    let out = m.run(&feed).unwrap_or_else(|e| panic!("{e}"));
    let want = npy(&format!("{dir}/last_hidden_state.npy"));
    assert_close("imported distilbert last_hidden_state", &out[0].1, &want, 1e-4);
}

#[test]
fn imported_roberta_matches_transformers() {
    // Positions count real tokens only, from padding_idx + 1: rows padded on the right and on the
    // left give each real token the position transformers gives it.
    let dir = "roberta_tiny";
    let path = data(dir);
    let feed: BTreeMap<String, Tensor> = ["input_ids", "attention_mask", "token_type_ids"]
        .iter()
        .map(|n| (n.to_string(), npy(&format!("{dir}/{n}.npy"))))
        .collect();
    let l = load(&path, false);
    let w = weights(&l, &path);
    let inputs: Vec<(&str, Tensor)> = feed.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let interp = run(&l, &w, &inputs);
    let m = compile_o2(l, &w);
    let out = m.run(&feed).unwrap_or_else(|e| panic!("{e}"));
    for (name, got) in &out {
        let want = npy(&format!("{dir}/{name}.npy"));
        assert_close(
            &format!("imported roberta {name}, interpreter"),
            &interp[name],
            &want,
            1e-4,
        );
        assert_close(&format!("imported roberta {name}, compiled"), got, &want, 1e-4);
    }
    assert_eq!(out.len(), 2, "last_hidden_state and pooler_output");
}

#[test]
fn imported_bert_matches_transformers_with_and_without_optional_inputs() {
    // attention_mask and token_type_ids are optional, as in transformers: left out, the mask is
    // all ones and the types all zeros. The reference was made both ways (two token types here,
    // so a wrong default would show).
    let dir = "bert_tiny";
    let path = data(dir);
    let l = load(&path, false);
    let w = weights(&l, &path);
    let m = compile_o2(l.clone(), &w);
    let all = ["input_ids", "attention_mask", "token_type_ids"];
    for (given, prefix) in [(&all[..], ""), (&all[..1], "defaults_")] {
        let inputs: Vec<(&str, Tensor)> = given.iter().map(|n| (*n, npy(&format!("{dir}/{n}.npy")))).collect();
        let feed: BTreeMap<String, Tensor> = inputs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let interp = run(&l, &w, &inputs);
        let out: BTreeMap<String, Tensor> = m.run(&feed).unwrap_or_else(|e| panic!("{e}")).into_iter().collect();
        for name in ["last_hidden_state", "pooler_output"] {
            let want = npy(&format!("{dir}/{prefix}{name}.npy"));
            let what = format!("imported bert {name} given {given:?}");
            assert_close(&format!("{what}, interpreter"), &interp[name], &want, 1e-4);
            assert_close(&format!("{what}, compiled"), &out[name], &want, 1e-4);
        }
    }
}

/// A folder holding `config` (JSON text) and a copy of the reference `base`'s checkpoint.
fn folder(base: &str, name: &str, config: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-import-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    std::fs::copy(
        data(&format!("{base}/model.safetensors")),
        dir.join("model.safetensors"),
    )
    .unwrap();
    dir
}

/// The error of importing the Qwen2 reference's config with `from` replaced by `to`.
fn error_of(name: &str, from: &str, to: &str) -> String {
    error_in("qwen2_tiny", name, from, to)
}

/// The error of importing the reference `base`'s config with `from` replaced by `to`.
fn error_in(base: &str, name: &str, from: &str, to: &str) -> String {
    let config = std::fs::read_to_string(data(&format!("{base}/config.json"))).unwrap();
    assert!(config.contains(from), "case does not apply: {from}");
    let dir = folder(base, name, &config.replacen(from, to, 1));
    let err = match kiln_frontend::load(&dir, &Options::default()) {
        Ok(_) => panic!("{name}: expected an error"),
        Err(e) => e.to_string(),
    };
    std::fs::remove_dir_all(&dir).ok();
    err.replace(&dir.display().to_string(), "DIR")
}

#[test]
fn import_errors_name_the_field() {
    insta::assert_snapshot!(
        "unsupported_model_type",
        error_of("type", r#""model_type": "qwen2""#, r#""model_type": "t5""#)
    );
    insta::assert_snapshot!(
        "rope_scaling",
        error_of(
            "rope",
            r#""rope_type": "default""#,
            r#""rope_type": "yarn", "factor": 4.0"#
        )
    );
    insta::assert_snapshot!(
        "unknown_field",
        error_of(
            "field",
            r#""hidden_act": "silu","#,
            r#""hidden_act": "silu", "logit_softcapping": 30.0,"#
        )
    );
    insta::assert_snapshot!("missing_field", error_of("missing", r#""num_hidden_layers": 2,"#, ""));
    insta::assert_snapshot!(
        "activation",
        error_of("act", r#""hidden_act": "silu""#, r#""hidden_act": "gelu""#)
    );
    insta::assert_snapshot!(
        "per_layer_windows",
        error_of(
            "window",
            r#""use_sliding_window": false"#,
            r#""use_sliding_window": true"#
        )
    );
}

#[test]
fn mixtral_import_errors_name_the_field() {
    insta::assert_snapshot!(
        "mixtral_top_k",
        error_in(
            "mixtral_tiny",
            "top_k",
            r#""num_experts_per_tok": 2"#,
            r#""num_experts_per_tok": 9"#
        )
    );
    // Qwen2-MoE-style shared experts are another model type; an unknown field is refused.
    insta::assert_snapshot!(
        "mixtral_unknown_field",
        error_in(
            "mixtral_tiny",
            "shared",
            r#""num_local_experts": 8,"#,
            r#""num_local_experts": 8, "shared_expert_intermediate_size": 64,"#
        )
    );
    // A config with more experts than the checkpoint holds: the weights do not load.
    let config = std::fs::read_to_string(data("mixtral_tiny/config.json")).unwrap();
    let dir = folder(
        "mixtral_tiny",
        "experts",
        &config.replacen(r#""num_local_experts": 8"#, r#""num_local_experts": 9"#, 1),
    );
    let l = kiln_frontend::load(&dir, &Options::default()).unwrap_or_else(|e| panic!("{e}"));
    let err = match kiln_frontend::weights::load_safetensors(&l, &dir) {
        Ok(_) => panic!("nine experts loaded from a checkpoint of eight"),
        Err(e) => e.to_string().replace(&dir.display().to_string(), "DIR"),
    };
    std::fs::remove_dir_all(&dir).ok();
    insta::assert_snapshot!("mixtral_missing_expert", err);
}

#[test]
fn vit_import_errors_name_the_field() {
    insta::assert_snapshot!(
        "vit_uneven_patches",
        error_in("vit_tiny", "patches", r#""patch_size": 8"#, r#""patch_size": 6"#)
    );
    insta::assert_snapshot!(
        "neox_tied_head",
        error_in(
            "gpt_neox_tiny",
            "neox_tied",
            r#""tie_word_embeddings": false"#,
            r#""tie_word_embeddings": true"#
        )
    );
    insta::assert_snapshot!(
        "vit_pooler_activation",
        error_in(
            "vit_tiny",
            "pool_act",
            r#""pooler_act": "tanh""#,
            r#""pooler_act": "softsign""#
        )
    );
}

#[test]
fn sharded_bf16_checkpoint_binds() {
    // Two shards of the tiny Llama in bfloat16, listed by an index: the import finds the names
    // in the index, the loader reads both shards and widens bf16 to f32 exactly.
    let src = data("llama_tiny");
    let dir = std::env::temp_dir().join(format!("kiln-import-{}-shards", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let rounded: BTreeMap<String, Vec<u8>> = names
        .iter()
        .map(|n| {
            let v = st.tensor(n).unwrap();
            let b = v
                .data()
                .chunks_exact(4)
                .flat_map(|c| half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes());
            (n.clone(), b.collect())
        })
        .collect();
    let mut map = Vec::new();
    for (k, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{k:05}-of-00002.safetensors");
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| {
                let shape = st.tensor(n).unwrap().shape().to_vec();
                let v = safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, shape, &rounded[n]).unwrap();
                (n.clone(), v)
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        map.extend(part.iter().map(|n| format!("\"{n}\": \"{file}\"")));
    }
    let index = format!("{{\"metadata\": {{}}, \"weight_map\": {{{}}}}}", map.join(", "));
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    let l = load(&dir, false);
    let w = weights(&l, &dir);
    let f32w = weights(&l, &src);
    assert_eq!(w.len(), f32w.len());
    for (n, t) in &w {
        let (a, b) = (t.to_f64_vec(), f32w[n].to_f64_vec());
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| ((x - y) / y.abs().max(1e-30)).abs())
            .fold(0.0, f64::max);
        assert!(worst <= 1.0 / 256.0, "{n}: bf16 off by {worst:e} relative");
        assert!(
            a.iter().all(|x| half::bf16::from_f64(*x).to_f64() == *x),
            "{n}: not widened exactly"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
