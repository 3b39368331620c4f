//! Autoregressive decoding against transformers: greedy tokens from the tiny GPT-2 and Llama
//! references (scripts/make-decode-references.py) must be exactly those transformers produced,
//! and every decode step's logits must match the full-sequence logits. Both the reference
//! interpreter and the CPU backend are checked, one prompt at a time and as a left-padded batch.

mod common;

use kiln_runtime::Decoder;
use std::collections::BTreeMap;

use common::*;
use kiln_ir::Tensor;
use kiln_passes::{optimize, OptLevel};
use kiln_runtime::{Feed, Model, Sampler, Sampling};

const GPT2: &[(&str, &str)] = &[
    ("layers", "2"),
    ("hidden", "64"),
    ("heads", "4"),
    ("vocab", "256"),
    ("max_pos", "64"),
];
const LLAMA: &[(&str, &str)] = LLAMA_TINY;

struct Reference {
    prompts: Vec<Vec<i64>>,
    greedy: Vec<Vec<i64>>,
    /// `[1, n, vocab]` logits of the whole sequence `sequence`.
    logits: Tensor,
    sequence: Vec<i64>,
}

/// Reads the ids lists of `generate.json` (a fixed layout written by the script).
fn reference(dir: &str) -> Reference {
    let text = std::fs::read_to_string(data(&format!("{dir}/generate.json"))).unwrap();
    let lists = |key: &str| -> Vec<Vec<i64>> {
        let start = text.find(&format!("\"{key}\"")).unwrap_or_else(|| panic!("no {key}"));
        let body = &text[start..];
        let open = body.find('[').unwrap();
        let mut depth = 0;
        let mut end = open;
        for (i, c) in body[open..].char_indices() {
            match c {
                '[' => depth += 1,
                ']' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        body[open + 1..end]
            .split(']')
            .filter_map(|row| {
                let row = row.trim_start_matches([',', ' ', '\n', '[']).trim();
                (!row.is_empty()).then(|| row.split(',').map(|x| x.trim().parse().unwrap()).collect())
            })
            .collect()
    };
    let seq = npy(&format!("{dir}/generate_sequence.npy"));
    Reference {
        prompts: lists("prompts"),
        greedy: lists("greedy"),
        logits: npy(&format!("{dir}/generate_logits.npy")),
        sequence: seq.to_f64_vec().into_iter().map(|x| x as i64).collect(),
    }
}

fn lowered(name: &str, o: &[(&str, &str)], dir: &str) -> (kiln_frontend::Lowered, BTreeMap<String, Tensor>) {
    let mut l = spec_with(name, o, true);
    let w = kiln_frontend::weights::load_safetensors(&l, &data(&format!("{dir}/model.safetensors"))).unwrap();
    optimize(&mut l.graph, OptLevel::O2, true).unwrap();
    (l, w)
}

fn compiled(name: &str, o: &[(&str, &str)], dir: &str) -> Model {
    let (l, w) = lowered(name, o, dir);
    let c = kiln_cpu::compile(&l.graph, &w, &l.dims, &kiln_cpu::Options::for_level(2)).unwrap();
    let bytes = kiln_runtime::artifact::encode(&c.manifest, &c.weights, &c.code).unwrap();
    let m = Model::from_bytes(&bytes).unwrap();
    assert!(m.is_decoder());
    m
}

/// Row `pos` of the reference logits.
fn ref_row(r: &Reference, pos: usize) -> Vec<f64> {
    let v = r.logits.shape()[2];
    r.logits.to_f64_vec()[pos * v..(pos + 1) * v].to_vec()
}

fn max_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max)
}

fn check_compiled(name: &str, o: &[(&str, &str)], dir: &str) {
    let r = reference(dir);
    let m = compiled(name, o, dir);
    // One prompt at a time: exactly transformers' greedy tokens.
    for (p, want) in r.prompts.iter().zip(&r.greedy) {
        let mut s = m.session().unwrap();
        let got = s
            .generate(
                std::slice::from_ref(p),
                want.len(),
                &mut Sampler::new(Sampling::default()),
                None,
                &mut |_, _| true,
            )
            .unwrap();
        assert_eq!(&got[0], want, "{dir}: greedy tokens of prompt {p:?}");
    }
    // All prompts as one left-padded batch.
    let mut s = m.session().unwrap();
    let got = s
        .generate(
            &r.prompts,
            r.greedy[0].len(),
            &mut Sampler::new(Sampling::default()),
            None,
            &mut |_, _| true,
        )
        .unwrap();
    assert_eq!(got, r.greedy, "{dir}: batched greedy tokens");
    // Decode-step logits against the full-sequence logits, position by position.
    let plen = r.prompts.last().unwrap().len();
    let mut s = m.session().unwrap();
    let mut logits = s.prefill(&[r.sequence[..plen].to_vec()]).unwrap();
    let mut worst = max_diff(&logits[0], &ref_row(&r, plen - 1));
    for pos in plen..r.sequence.len() {
        logits = s.step(&[r.sequence[pos]]).unwrap();
        worst = worst.max(max_diff(&logits[0], &ref_row(&r, pos)));
    }
    eprintln!("{dir}: decode-step logits vs full-sequence PyTorch logits: max abs error {worst:.2e}");
    assert!(worst <= 1e-4, "{dir}: decode logits differ by {worst:e}");
}

#[test]
fn gpt2_tiny_generates_transformers_tokens() {
    check_compiled("gpt2.ron", GPT2, "gpt2_tiny");
}

#[test]
fn llama_tiny_generates_transformers_tokens() {
    check_compiled("llama.ron", LLAMA, "llama_tiny");
}

/// The interpreter (ground truth) decodes step by step with a cache and matches PyTorch.
#[test]
fn interpreter_decode_steps_match_pytorch() {
    for (name, o, dir) in [("gpt2.ron", GPT2, "gpt2_tiny"), ("llama.ron", LLAMA, "llama_tiny")] {
        let r = reference(dir);
        let (l, w) = lowered(name, o, dir);
        let mut feed = Feed::new("input_ids", 64);
        let mut cache = kiln_interp::KvCache::default();
        let plen = 5;
        let mut worst = 0.0f64;
        let mut inputs = feed.prefill(&[r.sequence[..plen].to_vec()]).unwrap();
        for pos in plen - 1..r.sequence.len() {
            if pos >= plen {
                inputs = feed.step(&[r.sequence[pos]]).unwrap();
            }
            let out = kiln_interp::run_with_cache(&l.graph, &w, &inputs, &mut cache).unwrap();
            assert_eq!(out[0].1.shape(), &[1, 1, 256]);
            let got: Vec<f32> = out[0].1.to_f64_vec().into_iter().map(|x| x as f32).collect();
            worst = worst.max(max_diff(&got, &ref_row(&r, pos)));
        }
        eprintln!("{dir}: interpreter decode vs PyTorch: max abs error {worst:.2e}");
        assert!(worst <= 1e-4, "{dir}: {worst:e}");
        assert_eq!(cache.len(), r.sequence.len());
    }
}

#[test]
fn sampling_is_reproducible_and_respects_top_k() {
    let m = compiled("gpt2.ron", GPT2, "gpt2_tiny");
    let cfg = Sampling {
        temperature: 1.5,
        top_k: 3,
        top_p: 0.95,
        seed: 7,
    };
    let run = |cfg: Sampling| {
        let mut s = m.session().unwrap();
        s.generate(&[vec![1, 2, 3]], 12, &mut Sampler::new(cfg), None, &mut |_, _| true)
            .unwrap()
            .remove(0)
    };
    let a = run(cfg);
    assert_eq!(a, run(cfg), "same seed, same tokens");
    assert_ne!(a, run(Sampling { seed: 8, ..cfg }), "another seed, other tokens");
    // With top_k = 1 sampling is greedy whatever the temperature.
    let greedy = run(Sampling::default());
    assert_eq!(run(Sampling { top_k: 1, ..cfg }), greedy);
}

#[test]
fn decoding_errors_are_clear() {
    let m = compiled("gpt2.ron", GPT2, "gpt2_tiny");
    let mut s = m.session().unwrap();
    // 60 prompt tokens + 10 new ones exceed the 64 positions compiled.
    let e = s
        .generate(
            &[vec![1; 60]],
            10,
            &mut Sampler::new(Sampling::default()),
            None,
            &mut |_, _| true,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("exceeds the compiled context of 64"), "{e}");
    assert!(s.step(&[1]).unwrap_err().to_string().contains("before the prefill"));
    let e = s.prefill(&[vec![1, 2], vec![]]).unwrap_err().to_string();
    assert!(e.contains("prompt 1 is empty"), "{e}");
    let e = s.prefill(&[vec![1, 300]]).unwrap_err().to_string();
    assert!(e.contains("out of range") || e.contains("index"), "{e}");
    // A plain (non-decoding) artifact says how to get one.
    let l = spec("gpt2.ron", GPT2);
    let w = kiln_frontend::weights::random(&l, 1);
    let c = kiln_cpu::compile(&l.graph, &w, &l.dims, &kiln_cpu::Options::for_level(1)).unwrap();
    let plain = Model::from_bytes(&kiln_runtime::artifact::encode(&c.manifest, &c.weights, &c.code).unwrap()).unwrap();
    let e = plain.session().err().unwrap().to_string();
    assert!(e.contains("kiln compile --generate"), "{e}");
    // Running a decoding artifact outside a session.
    let feed = Feed::new("input_ids", 64).prefill(&[vec![1, 2]]).unwrap();
    let e = m.run(&feed).unwrap_err().to_string();
    assert!(e.contains("generation session"), "{e}");
}

#[test]
fn a_decoder_mask_must_be_an_optional_input_of_ones() {
    // While decoding, the decoder's own key mask replaces an optional padding mask (default 1);
    // any other mask would be silently dropped, so it is refused.
    let src = std::fs::read_to_string(root().join("specs/gpt2.ron")).unwrap();
    let with_mask = |default: &str| {
        src.replacen(
            r#""input_ids": (dtype: i64, shape: ["batch", "seq"]),"#,
            &format!(
                r#""input_ids": (dtype: i64, shape: ["batch", "seq"]),
        "attention_mask": (dtype: i64, shape: ["batch", "seq"], default: {default}),"#
            ),
            1,
        )
        .replacen(
            r#"heads: "heads", causal: true)"#,
            r#"heads: "heads", causal: true, mask: "attention_mask")"#,
            1,
        )
    };
    let opts = kiln_frontend::Options {
        decode: true,
        ..Default::default()
    };
    kiln_frontend::lower_source("gpt2.ron", &with_mask("1"), &opts).unwrap_or_else(|e| panic!("{e}"));
    let e = kiln_frontend::lower_source("gpt2.ron", &with_mask("0"), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("a mask here must be an optional input (default 1)"), "{e}");
}

#[test]
fn encoder_specs_cannot_be_lowered_for_decoding() {
    let opts = kiln_frontend::Options {
        decode: true,
        overrides: vec![("layers".into(), "1".into())],
        ..Default::default()
    };
    let e = kiln_frontend::load(&root().join("specs/minilm.ron"), &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("needs causal attention; this one is bidirectional (an encoder cannot generate)"),
        "{e}"
    );
}
