//! The `kiln` binary: exit status, stdout and stderr.

mod common;

use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(common::root())
        .output()
        .expect("kiln runs")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn check_prints_params_and_flops() {
    let o = kiln(&["check", "specs/gpt2.ron", "--dim", "seq=128"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("params   124439808"), "{out}");
    assert!(out.contains("FLOP at batch=1, seq=128"), "{out}");
}

#[test]
fn check_binds_a_checkpoint() {
    let o = kiln(&[
        "check",
        "specs/gpt2.ron",
        "--set",
        "layers=2",
        "--set",
        "hidden=64",
        "--set",
        "heads=4",
        "--set",
        "vocab=256",
        "--set",
        "max_pos=64",
        "--weights",
        "tests/data/gpt2_tiny/model.safetensors",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("all 28 bound and checked"), "{out}");
}

#[test]
fn run_writes_npy_and_matches_reference() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out_file = dir.join("logits.npy");
    let o = kiln(&[
        "run",
        "specs/llama.ron",
        "--set",
        "layers=2",
        "--set",
        "hidden=64",
        "--set",
        "heads=4",
        "--set",
        "kv_heads=2",
        "--set",
        "ffn=128",
        "--set",
        "vocab=256",
        "--set",
        "eps=1e-6",
        "--weights",
        "tests/data/llama_tiny/model.safetensors",
        "--input",
        "input_ids=tests/data/llama_tiny/input_ids.npy",
        "--output",
        out_file.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.starts_with("logits: f32 [2, 10, 256]"), "{out}");
    let got = kiln_runtime::npy::read(&out_file).unwrap();
    let err = got.max_abs_diff(&common::npy("llama_tiny/logits.npy")).unwrap();
    assert!(err < 1e-4, "max abs error {err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn run_with_random_weights() {
    let o = kiln(&[
        "run",
        "specs/mlp.ron",
        "--random-weights",
        "7",
        "--input",
        "x=tests/data/mlp_x.npy",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("probs: f32 [3, 10]"), "{out}");
}

#[test]
fn inspect_text_and_dot() {
    let o = kiln(&["inspect", "specs/mlp.ron"]);
    assert!(o.status.success());
    assert!(text(&o).0.starts_with("graph mlp(x: f32[batch, 16]) {"));
    let o = kiln(&["inspect", "specs/mlp.ron", "--format", "dot"]);
    assert!(o.status.success());
    assert!(text(&o).0.starts_with("digraph \"mlp\""));
}

#[test]
fn errors_exit_nonzero_with_message_on_stderr() {
    let cases: &[(&[&str], &str)] = &[
        (&["check", "specs/nope.ron"], "specs/nope.ron: No such file"),
        (
            &["check", "specs/gpt2.ron", "--set", "layer=2"],
            "did you mean `layers`?",
        ),
        (
            &["check", "specs/gpt2.ron", "--dim", "seq=5000"],
            "between 1 and the declared bound 1024",
        ),
        (
            &[
                "run",
                "specs/mlp.ron",
                "--random-weights",
                "1",
                "--input",
                "y=tests/data/mlp_x.npy",
            ],
            "unknown input `y`",
        ),
        (
            &[
                "run",
                "specs/mlp.ron",
                "--random-weights",
                "1",
                "--input",
                "x=tests/data/gpt2_tiny/input_ids.npy",
            ],
            "expected dtype f32, got i64",
        ),
        (
            &[
                "run",
                "specs/mlp.ron",
                "--random-weights",
                "1",
                "--input",
                "x=Cargo.toml",
            ],
            "not a .npy file",
        ),
        (
            &[
                "check",
                "specs/mlp.ron",
                "--weights",
                "tests/data/gpt2_tiny/model.safetensors",
            ],
            "missing from",
        ),
    ];
    for (args, want) in cases {
        let o = kiln(args);
        let (out, err) = text(&o);
        assert!(!o.status.success(), "{args:?} succeeded: {out}");
        assert!(err.contains(want), "{args:?}: expected {want:?} in stderr:\n{err}");
    }
}

#[test]
fn compile_run_and_bench_an_artifact() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-compile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let art = dir.join("gpt2.kiln");
    let tiny = [
        "--set",
        "layers=2",
        "--set",
        "hidden=64",
        "--set",
        "heads=4",
        "--set",
        "vocab=256",
        "--set",
        "max_pos=64",
    ];
    let mut args = vec!["compile", "specs/gpt2.ron"];
    args.extend(tiny);
    args.extend([
        "--weights",
        "tests/data/gpt2_tiny/model.safetensors",
        "-O1",
        "-o",
        art.to_str().unwrap(),
    ]);
    let o = kiln(&args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("generated kernels"), "{out}");
    assert!(
        !out.contains("pass "),
        "the per-pass report is only printed with --report: {out}"
    );
    let logits = dir.join("logits.npy");
    let o = kiln(&[
        "run",
        art.to_str().unwrap(),
        "--input",
        "input_ids=tests/data/gpt2_tiny/input_ids.npy",
        "--output",
        logits.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let got = kiln_runtime::npy::read(&logits).unwrap();
    let e = got.max_abs_diff(&common::npy("gpt2_tiny/logits.npy")).unwrap();
    assert!(e < 1e-4, "compiled GPT-2 vs transformers: {e}");
    let o = kiln(&[
        "bench",
        art.to_str().unwrap(),
        "--shape",
        "input_ids=2x16",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--json",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.trim().starts_with("{\"median_ms\": "), "{out}");
    let o = kiln(&["bench", art.to_str().unwrap(), "--shape", "input_ids=2x65"]);
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("outside the compiled range 1..=64"),
        "{}",
        text(&o).1
    );
    std::fs::write(dir.join("junk.kiln"), b"KILNART\0garbage").unwrap();
    let o = kiln(&["run", dir.join("junk.kiln").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("invalid kiln artifact"), "{}", text(&o).1);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn compile_dumps_ir_and_disables_rules() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-dump-{}", std::process::id()));
    let art = dir.join("m.kiln");
    std::fs::create_dir_all(&dir).unwrap();
    let dump = dir.join("ir");
    let o = kiln(&[
        "compile",
        "specs/mlp.ron",
        "--random-weights",
        "1",
        "-O2",
        "-o",
        art.to_str().unwrap(),
        "--dump-ir",
        dump.to_str().unwrap(),
        "--disable-rule",
        "mul-one",
        "--report",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("stopped: saturated"), "{out}");
    let mut files: Vec<String> = std::fs::read_dir(&dump)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "00-input.txt",
            "01-dce.txt",
            "02-cse.txt",
            "03-dce.txt",
            "04-simplify.txt",
            "05-narrow.txt",
            "06-dce.txt",
            "07-cse.txt",
            "08-merge-projections.txt",
            "09-dce.txt",
            "10-fuse.txt"
        ]
    );
    assert!(std::fs::read_to_string(dump.join("04-simplify.txt"))
        .unwrap()
        .starts_with("graph mlp("));
    let o = kiln(&[
        "compile",
        "specs/mlp.ron",
        "--random-weights",
        "1",
        "-o",
        art.to_str().unwrap(),
        "--disable-rule",
        "mul-uno",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("no rewrite rule is called `mul-uno`"),
        "{}",
        text(&o).1
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `kiln compile` arguments for the tiny GPT-2 checkpoint, for generation with the byte tokenizer.
fn tiny_gpt2_generating<'a>(art: &'a std::path::Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["compile", "specs/gpt2.ron"];
    for s in ["layers=2", "hidden=64", "heads=4", "vocab=256", "max_pos=64"] {
        args.extend(["--set", s]);
    }
    args.extend([
        "--weights",
        "tests/data/gpt2_tiny/model.safetensors",
        "--generate",
        "--tokenizer",
        "tests/data/byte_tokenizer.json",
    ]);
    args.extend_from_slice(extra);
    args.extend(["-o", art.to_str().unwrap()]);
    args
}

#[test]
fn generate_streams_transformers_tokens() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-generate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let art = dir.join("gpt2-gen.kiln");
    let o = kiln(&tiny_gpt2_generating(&art, &[]));
    assert!(o.status.success(), "{}", text(&o).1);
    // The third reference prompt: transformers generated 20 x 63 ('?') then 4 x 88 ('X').
    let ids: Vec<i64> = vec![210, 75, 104, 7, 162, 177, 95, 75, 213, 47, 63];
    let prompt = dir.join("prompt.npy");
    kiln_runtime::npy::write(&prompt, &kiln_ir::Tensor::from_i64(vec![1, ids.len()], ids).unwrap()).unwrap();
    let timing = dir.join("timing.json");
    let o = kiln(&[
        "generate",
        art.to_str().unwrap(),
        "--prompt-ids",
        prompt.to_str().unwrap(),
        "--max-new-tokens",
        "24",
        "--no-stop",
        "--timing-json",
        timing.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.trim_end().ends_with(&format!("{}XXXX", "?".repeat(20))), "{out}");
    assert!(err.contains("to the first token"), "{err}");
    let t = std::fs::read_to_string(&timing).unwrap();
    let want = format!("\"tokens\": [{}, 88, 88, 88, 88]", vec!["63"; 20].join(", "));
    assert!(t.contains(&want), "{t}");
    // Text prompts go through the carried tokenizer; a batch prints one line per prompt.
    let o = kiln(&[
        "generate",
        art.to_str().unwrap(),
        "--prompt",
        "hi",
        "--prompt",
        "kiln",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0.7",
        "--seed",
        "3",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("[0] hi") && out.contains("[1] kiln"), "{out}");
    // A plain artifact cannot generate, and says how to get one that can.
    let plain = dir.join("plain.kiln");
    let o = kiln(&[
        "compile",
        "specs/mlp.ron",
        "--random-weights",
        "1",
        "-o",
        plain.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let o = kiln(&[
        "generate",
        plain.to_str().unwrap(),
        "--prompt-ids",
        prompt.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("compile the spec with `kiln compile --generate`"),
        "{}",
        text(&o).1
    );
    // Over the compiled context.
    let o = kiln(&[
        "generate",
        art.to_str().unwrap(),
        "--prompt-ids",
        prompt.to_str().unwrap(),
        "--max-new-tokens",
        "60",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("exceeds the compiled context of 64"),
        "{}",
        text(&o).1
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn report_and_dump_ir_work_on_every_spec() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let specs: &[(&str, &[&str])] = &[
        ("minilm.ron", &["layers=1"]),
        (
            "gpt2.ron",
            &["layers=2", "hidden=64", "heads=4", "vocab=256", "max_pos=64"],
        ),
        (
            "llama.ron",
            &[
                "layers=2",
                "hidden=64",
                "heads=4",
                "kv_heads=2",
                "ffn=128",
                "vocab=256",
                "max_pos=64",
            ],
        ),
        ("mlp.ron", &[]),
        ("gemm.ron", &["k=96", "n=80"]),
    ];
    for (name, sets) in specs {
        let art = dir.join(format!("{name}.kiln"));
        let dump = dir.join(format!("{name}-ir"));
        let spec = format!("specs/{name}");
        let mut args = vec!["compile", spec.as_str(), "--random-weights", "2", "--report"];
        for s in *sets {
            args.extend(["--set", s]);
        }
        args.extend(["-o", art.to_str().unwrap(), "--dump-ir", dump.to_str().unwrap()]);
        let o = kiln(&args);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{name}: {err}");
        for want in [
            "pass     simplify",
            "stopped: saturated",
            "cost     ",
            "fusion   ",
            "plan     ",
            "steps    estimated ",
        ] {
            assert!(out.contains(want), "{name}: no `{want}` in the report:\n{out}");
        }
        assert!(dump.join("00-input.txt").exists() && dump.join("09-dce.txt").exists());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--quantize` and `--sparsity` end to end through the binary: a decoder (tiny GPT-2, every scheme
/// and pattern, compiled for generation and then generating) and the real MiniLM (GPTQ with the
/// shipped calibration set, then `kiln run`).
#[test]
fn quantize_and_sparsity_flags_end_to_end() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-quant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let calib = dir.join("calib.txt");
    std::fs::write(
        &calib,
        "the cat sat on the mat\nkilns fire clay\na compiler lowers graphs\nbytes are tokens here\n\
         rain in the north\nsmall models decode fast\nquantize the weights\nprune the blocks\n",
    )
    .unwrap();
    let prompt = dir.join("prompt.npy");
    kiln_runtime::npy::write(
        &prompt,
        &kiln_ir::Tensor::from_i64(vec![1, 4], vec![104, 105, 32, 107]).unwrap(),
    )
    .unwrap();
    // int8 and gptq4 strictly (every product takes the scheme); int4 by measured forms (the
    // fastest of f32, int8 and int4 per product, measured at a decoder's one-token step).
    for (flag, value, want) in [
        ("--quantize", "int8", "8 products quantized"),
        ("--quantize", "int4:32", "forms chosen by measured time at 1 row "),
        ("--quantize", "gptq4:32", "GPTQ on 6 calibration samples"),
        ("--sparsity", "2:4", "8 products pruned"),
        ("--sparsity", "0.9", "8 products pruned"),
        ("--sparsity", "block:16x16:0.75", "8 products pruned"),
    ] {
        let art = dir.join("gpt2.kiln");
        let o = kiln(&tiny_gpt2_generating(
            &art,
            &[
                flag,
                value,
                "--calib",
                calib.to_str().unwrap(),
                "--quant-exclude",
                "wte*",
                if flag == "--quantize" && value != "int4:32" {
                    "--quant-strict"
                } else {
                    "--report"
                },
            ],
        ));
        let (out, err) = text(&o);
        assert!(o.status.success(), "{flag} {value}: {err}");
        assert!(out.contains(want), "{flag} {value}: {out}");
        assert!(
            out.contains("accuracy against f32 on 2 held-out samples"),
            "{flag} {value}: {out}"
        );
        assert!(out.contains("next-token KL"), "{flag} {value}: {out}");
        let o = kiln(&[
            "generate",
            art.to_str().unwrap(),
            "--prompt-ids",
            prompt.to_str().unwrap(),
            "--max-new-tokens",
            "5",
            "--no-stop",
        ]);
        assert!(o.status.success(), "{flag} {value}: {}", text(&o).1);
    }
    // The real MiniLM with the shipped calibration set: the report's embedding cosine, then a run.
    let m = common::minilm_dir();
    let art = dir.join("minilm-q4.kiln");
    let o = kiln(&[
        "compile",
        "specs/minilm.ron",
        "--weights",
        m.join("model.safetensors").to_str().unwrap(),
        "--quantize",
        "gptq4:128",
        "--quant-strict",
        "--calib",
        "specs/data/calibration.txt",
        "--tokenizer",
        m.join("tokenizer.json").to_str().unwrap(),
        "-o",
        art.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("24 products quantized"), "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("sentence_embedding: cosine mean"))
        .expect("embedding accuracy");
    let cos: f64 = line
        .split("cosine mean ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(cos >= 0.99, "{line}");
    // The quantized artifact runs and its embeddings stay close to transformers' f32 ones.
    let emb = dir.join("emb.npy");
    let d = "tests/data/minilm";
    let o = kiln(&[
        "run",
        art.to_str().unwrap(),
        "--input",
        &format!("input_ids={d}/padded_input_ids.npy"),
        "--input",
        &format!("attention_mask={d}/padded_attention_mask.npy"),
        "--input",
        &format!("token_type_ids={d}/padded_token_type_ids.npy"),
        "--output",
        &format!("sentence_embedding={}", emb.display()),
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let got = kiln_runtime::npy::read(&emb).unwrap().to_f64_vec();
    let want = common::npy("minilm/padded_sentence_embedding.npy").to_f64_vec();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.chunks(384).zip(want.chunks(384)).enumerate() {
        let dot: f64 = g.iter().zip(w).map(|(a, b)| a * b).sum();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let cos = dot / (norm(g) * norm(w));
        // Measured 0.9925, 0.9844 ("Hello world!": short inputs suffer most) and 0.9949.
        assert!(cos >= 0.98, "sentence {i}: cosine {cos} to transformers' f32 embedding");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bisect_reports_agreement_and_refuses_missing_inputs() {
    let o = kiln(&[
        "bisect",
        "specs/mlp.ron",
        "--random-weights",
        "1",
        "--input",
        "x=tests/data/mlp_x.npy",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("no mismatch"), "{out}");
    let o = kiln(&["bisect", "specs/mlp.ron", "--random-weights", "1"]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("--input NAME=FILE.npy"), "{err}");
    let o = kiln(&[
        "bisect",
        "specs/mlp.ron",
        "--random-weights",
        "1",
        "--input",
        "x=tests/data/mlp_x.npy",
        "--disable-rule",
        "no-such-rule",
    ]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("no rewrite rule is called `no-such-rule`"),
        "{err}"
    );
}

/// `--report` names the fused ops by the rule that made them, and disabling any fusion rule keeps
/// the outputs (more steps, the same logits).
#[test]
fn fusion_rules_are_reported_and_can_be_disabled() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-fusion-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tiny = [
        "--set",
        "layers=2",
        "--set",
        "hidden=64",
        "--set",
        "heads=4",
        "--set",
        "vocab=256",
        "--set",
        "max_pos=64",
    ];
    let mut steps = Vec::new();
    let rules = [
        "fuse-gemm-epilogue",
        "fuse-elementwise",
        "fuse-reduction",
        "fuse-softmax",
        "fuse-attention",
    ];
    let runs = std::iter::once(None).chain(rules.iter().copied().map(Some));
    for (i, disable) in runs.enumerate() {
        let art = dir.join(format!("gpt2-{i}.kiln"));
        let mut args = vec!["compile", "specs/gpt2.ron"];
        args.extend(tiny);
        args.extend([
            "--weights",
            "tests/data/gpt2_tiny/model.safetensors",
            "-o",
            art.to_str().unwrap(),
        ]);
        args.push("--report");
        if let Some(r) = disable {
            args.extend(["--disable-rule", r]);
        }
        let o = kiln(&args);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{err}");
        let fused = out
            .lines()
            .find(|l| l.contains("fused ops:"))
            .expect("a fused-ops line");
        // Attention is made from the fused softmax and absorbs it: the softmax shows only when
        // attention is off, attention only when the softmax is on.
        let on = |r: &str| disable != Some(r);
        for r in rules {
            let shown = match r {
                "fuse-softmax" => on(r) && !on("fuse-attention"),
                "fuse-attention" => on(r) && on("fuse-softmax"),
                _ => on(r),
            };
            assert_eq!(fused.contains(&format!("{r} x")), shown, "{r}: {out}");
        }
        let plan = out.lines().find(|l| l.contains("plan ")).expect("a plan line");
        steps.push(plan.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap());
        let logits = dir.join(format!("logits-{i}.npy"));
        let o = kiln(&[
            "run",
            art.to_str().unwrap(),
            "--input",
            "input_ids=tests/data/gpt2_tiny/input_ids.npy",
            "--output",
            logits.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o).1);
        let got = kiln_runtime::npy::read(&logits).unwrap();
        let e = got.max_abs_diff(&common::npy("gpt2_tiny/logits.npy")).unwrap();
        assert!(e < 1e-4, "{disable:?}: compiled GPT-2 vs transformers: {e}");
    }
    assert!(
        steps[1..].iter().all(|s| *s > steps[0]),
        "every rule saves steps: {steps:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn import_then_compile_a_hugging_face_folder() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = dir.join("mistral.ron");
    let o = kiln(&["import", "tests/data/mistral_tiny", "-o", spec.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let text_of_spec = std::fs::read_to_string(&spec).unwrap();
    assert!(text_of_spec.contains("window: \"window\""), "{text_of_spec}");
    // The folder itself compiles (its checkpoint is the default weights), and runs.
    let art = dir.join("mistral.kiln");
    let o = kiln(&["compile", "tests/data/mistral_tiny", "-o", art.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let out_file = dir.join("logits.npy");
    let o = kiln(&[
        "run",
        art.to_str().unwrap(),
        "--input",
        "input_ids=tests/data/mistral_tiny/input_ids.npy",
        "--output",
        out_file.to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let got = kiln_runtime::npy::read(&out_file).unwrap();
    let e = got.max_abs_diff(&common::npy("mistral_tiny/logits.npy")).unwrap();
    assert!(e < 1e-4, "max abs error {e}");
    // The plan summary names the mixture-of-experts steps (one per layer).
    let o = kiln(&[
        "compile",
        "tests/data/mixtral_tiny",
        "-o",
        dir.join("mixtral.kiln").to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(format!("{out}{err}").contains(" 2 mixture-of-experts, "), "{out}{err}");
    // An unsupported family is refused, naming it.
    let o = kiln(&["import", "tests/data"]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("config.json"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn optional_inputs_may_be_left_out_on_the_command_line() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-optional-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let o = kiln(&["check", "tests/data/bert_tiny"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("attention_mask: i64[batch, seq] (optional, default 1)"),
        "{out}"
    );
    let art = dir.join("bert.kiln");
    let o = kiln(&["compile", "tests/data/bert_tiny", "-o", art.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);
    let o = kiln(&[
        "bench",
        art.to_str().unwrap(),
        "--shape",
        "input_ids=2x7",
        "--iters",
        "2",
    ]);
    assert!(
        o.status.success(),
        "bench without the optional inputs' shapes: {}",
        text(&o).1
    );
    // The artifact and the spec's interpreter, given input_ids only: transformers' defaults.
    for model in [art.to_str().unwrap(), "tests/data/bert_tiny"] {
        let file = dir.join("pooled.npy");
        let o = kiln(&[
            "run",
            model,
            "--input",
            "input_ids=tests/data/bert_tiny/input_ids.npy",
            "--output",
            &format!("pooler_output={}", file.display()),
        ]);
        assert!(o.status.success(), "{model}: {}", text(&o).1);
        let got = kiln_runtime::npy::read(&file).unwrap();
        let e = got
            .max_abs_diff(&common::npy("bert_tiny/defaults_pooler_output.npy"))
            .unwrap();
        assert!(e < 1e-4, "{model}: max abs error {e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
