//! The CUDA backend's kernels for every bundled spec: the MLIR they are emitted as and, with the
//! `mlir` feature and a CUDA toolkit's `ptxas` (PyPI `nvidia-cuda-nvcc-cu12`), the PTX they lower
//! to, assembled for every architecture an artifact carries. No GPU needed.

use std::path::PathBuf;

use kiln_frontend::{Lowered, Options};
use kiln_passes::OptLevel;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every spec at -O0 and -O2, and the decoders in decoding mode, with small sizes.
fn cases() -> Vec<(String, Lowered, OptLevel)> {
    let mut out = Vec::new();
    for (spec, set, decode) in [
        ("mlp.ron", vec![], false),
        ("gemm.ron", vec![("k", "96"), ("n", "80")], false),
        (
            "minilm.ron",
            vec![
                ("layers", "2"),
                ("vocab", "500"),
                ("hidden", "64"),
                ("heads", "4"),
                ("ffn", "128"),
            ],
            false,
        ),
        (
            "gpt2.ron",
            vec![
                ("layers", "2"),
                ("vocab", "500"),
                ("hidden", "64"),
                ("heads", "4"),
                ("max_pos", "64"),
            ],
            false,
        ),
        (
            "gpt2.ron",
            vec![
                ("layers", "2"),
                ("vocab", "500"),
                ("hidden", "64"),
                ("heads", "4"),
                ("max_pos", "64"),
            ],
            true,
        ),
        (
            "llama.ron",
            vec![
                ("layers", "2"),
                ("vocab", "500"),
                ("hidden", "64"),
                ("heads", "4"),
                ("kv_heads", "2"),
                ("ffn", "128"),
                ("max_pos", "64"),
            ],
            true,
        ),
    ] {
        for level in [OptLevel::O0, OptLevel::O2] {
            let opts = Options {
                overrides: set.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                weight_prefix: None,
                decode,
            };
            let mut l = kiln_frontend::load(&root().join("specs").join(spec), &opts).unwrap_or_else(|e| panic!("{e}"));
            kiln_passes::optimize(&mut l.graph, level, true).unwrap();
            out.push((
                format!("{spec}{} {level:?}", if decode { " --generate" } else { "" }),
                l,
                level,
            ));
        }
    }
    out
}

fn plan(l: &Lowered, level: OptLevel) -> (kiln_cpu::plan::Planned, String) {
    let w = kiln_frontend::weights::random(l, 1);
    let opts = kiln_cpu::Options::for_level(if level == OptLevel::O0 { 0 } else { 2 });
    kiln_cuda::plan_mlir(&l.graph, &w, &l.dims, &opts).unwrap()
}

#[test]
fn every_spec_emits_one_gpu_func_per_fusion_group() {
    let dump = std::env::var_os("KILN_DUMP_MLIR").map(PathBuf::from);
    for (name, l, level) in cases() {
        let (planned, mlir) = plan(&l, level);
        if let Some(d) = &dump {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join(format!("{}.mlir", name.replace([' ', '/'], "_"))), &mlir).unwrap();
        }
        for i in 0..planned.kernels.len() {
            assert!(
                mlir.contains(&format!("gpu.func @k{i}(")),
                "{name}: kernel k{i} missing"
            );
        }
        for k in kiln_cuda::emit::fixed_kernels() {
            assert!(mlir.contains(&format!("gpu.func @{k}(")), "{name}: {k} missing");
        }
        let flash = planned.manifest.flash_kernels();
        for &(k, j) in &flash {
            let fa = kiln_runtime::plan::flash_kernel(k, j);
            assert!(mlir.contains(&format!("gpu.func @{fa}(")), "{name}: {fa} missing");
            for dim in kiln_cuda::emit::FT_DIMS {
                let tc = kiln_runtime::plan::flash_tc_kernel(k, j, dim);
                assert!(mlir.contains(&format!("gpu.func @{tc}(")), "{name}: {tc} missing");
            }
        }
        let attention = planned.manifest.steps.iter().filter(|s| s.flash().is_some()).count();
        assert!(
            attention == 0 || !flash.is_empty(),
            "{name}: attention without a fused kernel"
        );
        assert_eq!(
            mlir.matches("gpu.func").count(),
            planned.kernels.len()
                + flash.len() * (1 + kiln_cuda::emit::FT_DIMS.len())
                + kiln_cuda::emit::fixed_kernels().len()
        );
    }
}

/// The runtime looks up exactly the fixed kernels the emitter writes, and launches `gemm_wgmma`
/// with the dynamic shared memory it was written for.
#[test]
fn fixed_kernels_agree_with_the_runtime() {
    assert_eq!(kiln_cuda::emit::fixed_kernels(), kiln_runtime::plan::GPU_FIXED_KERNELS);
    assert_eq!(kiln_runtime::cuda::dynamic_smem("gemm_wgmma"), kiln_cuda::emit::WG_SMEM);
    assert_eq!(kiln_runtime::cuda::dynamic_smem("gemm_bf16"), 0);
}

/// The kernels of the MLP spec as MLIR text: a change to the emitter shows up here.
#[test]
fn mlp_kernels_snapshot() {
    let (_, l, level) = cases().into_iter().nth(1).unwrap();
    let (planned, _) = plan(&l, level);
    let mut text = String::new();
    for (i, s) in planned.kernels.iter().enumerate() {
        kiln_cuda::emit::fused(s, &format!("k{i}"), &mut text).unwrap();
    }
    insta::assert_snapshot!(text);
}

#[cfg(feature = "mlir")]
#[test]
fn every_spec_lowers_to_ptx_that_ptxas_accepts() {
    let toolkit = match kiln_cuda::ptx::toolkit() {
        Ok(t) if t.join("bin/ptxas").is_file() => t,
        other => {
            // CI sets KILN_REQUIRE_PTXAS: there, a missing toolkit is a failure, not a skip.
            assert!(
                std::env::var_os("KILN_REQUIRE_PTXAS").is_none(),
                "no CUDA toolkit with ptxas: {other:?}"
            );
            eprintln!("skipped: no ptxas ({other:?}); pip install nvidia-cuda-nvcc-cu12");
            return;
        }
    };
    for (name, l, level) in cases() {
        let (_, mlir) = plan(&l, level);
        for arch in kiln_cuda::ptx::ARCHS {
            let ptx =
                kiln_cuda::ptx::to_ptx(&mlir, arch, &toolkit).unwrap_or_else(|e| panic!("{name} {}: {e}", arch.chip));
            assert!(!ptx.contains(".extern"), "{name}: unresolved functions in the PTX");
            let info = kiln_cuda::ptx::ptxas(&ptx, arch.chip, &toolkit)
                .unwrap_or_else(|e| panic!("{name}: ptxas -arch={} rejects the PTX:\n{e}", arch.chip));
            // No kernel may spill registers to local memory (the tensor-core GEMM sits near 250).
            let spills: Vec<&str> = info
                .lines()
                .filter(|l| l.contains("bytes spill stores") && !l.contains(" 0 bytes spill stores"))
                .collect();
            assert!(spills.is_empty(), "{name} {}: register spills:\n{info}", arch.chip);
            if std::env::var_os("KILN_PTXAS_REPORT").is_some() {
                eprintln!("{name} {}:\n{info}", arch.chip);
            }
            assert!(info.contains("gemm_tc_f32"), "{name}: no tensor-core GEMM in:\n{info}");
        }
    }
}

/// The sm_90a module (`gemm_wgmma`: cp.async pipeline into dynamic shared memory, proxy fence,
/// `wgmma.mma_async` kept in flight) lowers and assembles for sm_90a with no spills, within one
/// 256-thread block's register budget, and without ptxas serialising the wgmma pipeline.
#[cfg(feature = "mlir")]
#[test]
fn wgmma_module_assembles_for_sm_90a() {
    let Ok(toolkit) = kiln_cuda::ptx::toolkit() else {
        assert!(std::env::var_os("KILN_REQUIRE_PTXAS").is_none(), "no CUDA toolkit");
        return;
    };
    if !toolkit.join("bin/ptxas").is_file() {
        assert!(std::env::var_os("KILN_REQUIRE_PTXAS").is_none(), "no ptxas");
        return;
    }
    let arch = kiln_cuda::ptx::HOPPER_A;
    let ptx = kiln_cuda::ptx::to_ptx(&kiln_cuda::emit::wgmma_module(), arch, &toolkit).unwrap();
    assert!(ptx.contains(".target sm_90a"), "{ptx}");
    assert_eq!(
        ptx.matches("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16")
            .count(),
        4
    );
    assert!(ptx.contains("fence.proxy.async.shared::cta"));
    assert!(ptx.contains(".extern .shared .align 1024 .b8 kiln_dsmem[]"), "{ptx}");
    assert!(ptx.contains("wgmma.wait_group.sync.aligned \t1;"), "{ptx}");
    let info = kiln_cuda::ptx::ptxas(&ptx, arch.chip, &toolkit).unwrap_or_else(|e| panic!("{e}"));
    if std::env::var_os("KILN_PTXAS_REPORT").is_some() {
        eprintln!("{info}");
    }
    assert!(info.contains(" 0 bytes spill stores"), "{info}");
    // ptxas keeps wgmma asynchronous only if nothing touches the accumulators between the products
    // and their wait; otherwise it serialises them and says so (C7515, "Potential Performance Loss").
    assert!(!info.contains("serialized"), "{info}");
    let regs: u32 = info
        .split("Used ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("{info}"));
    assert!(regs <= 255, "{regs} registers: {info}");
}

/// A CUDA artifact loads only where a driver and a GPU are: elsewhere the error says so. With a
/// GPU, every output matches the interpreter. A damaged PTX table is refused before the driver is
/// asked anything.
#[cfg(feature = "mlir")]
#[test]
fn cuda_artifacts_run_or_explain() {
    use kiln_runtime::cuda::CudaModel;
    use kiln_runtime::LoadError;
    if kiln_cuda::ptx::toolkit().is_err() {
        assert!(std::env::var_os("KILN_REQUIRE_PTXAS").is_none(), "no CUDA toolkit");
        eprintln!("skipped: no libdevice");
        return;
    }
    let (_, l, _) = cases().into_iter().nth(1).unwrap();
    let w = kiln_frontend::weights::random(&l, 1);
    let c = kiln_cuda::compile(&l.graph, &w, &l.dims, &kiln_cpu::Options::for_level(2))
        .unwrap()
        .compiled;
    let bytes = kiln_runtime::artifact::encode(&c.manifest, &c.weights, &c.code).unwrap();
    let mut bad = c.manifest.clone();
    bad.gpu.as_mut().unwrap().modules[1].offset += 16;
    let damaged = kiln_runtime::artifact::encode(&bad, &c.weights, &c.code).unwrap();
    match CudaModel::from_bytes(&damaged) {
        Err(LoadError::Corrupt(msg)) => assert!(msg.contains("PTX for sm_90"), "{msg}"),
        other => panic!("a misplaced PTX module loaded: {other:?}"),
    }
    match CudaModel::from_bytes(&bytes) {
        Err(LoadError::Cuda(msg)) => {
            assert!(msg.contains("driver") || msg.contains("GPU"), "{msg}");
            eprintln!("no GPU here: {msg}");
        }
        Err(e) => panic!("{e}"),
        Ok(model) => {
            let x = kiln_ir::Tensor::from_f32(vec![3, 16], (0..48).map(|i| (i as f32 * 0.37).sin()).collect()).unwrap();
            let feed: std::collections::BTreeMap<String, kiln_ir::Tensor> = [("x".to_string(), x)].into();
            let got = model.run(&feed).unwrap();
            let want = kiln_interp::run(&l.graph, &w, &feed).unwrap();
            for ((name, g), (_, r)) in got.iter().zip(&want) {
                let (g, r) = (g.to_f64_vec(), r.to_f64_vec());
                let err = g.iter().zip(&r).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
                assert!(err < 1e-4, "{name}: max |diff| {err}");
            }
        }
    }
}

/// Runs `tests/emulate.py` with `args`; `None` (the test skips) where there is no python3, unless
/// KILN_REQUIRE_EMULATOR is set.
fn emulate(args: &[&std::ffi::OsStr]) -> Option<std::process::Output> {
    let run = std::process::Command::new("python3")
        .arg(root().join("backends/cuda/tests/emulate.py"))
        .args(args)
        .output();
    match run {
        Ok(o) => Some(o),
        Err(e) => {
            assert!(
                std::env::var_os("KILN_REQUIRE_EMULATOR").is_none(),
                "python3 is needed to emulate the kernels: {e}"
            );
            eprintln!("skipped: no python3 ({e})");
            None
        }
    }
}

/// The fixed kernels — GEMMs (SIMT and tensor-core; f32, int8 and int4 right operands), matrix–vector
/// products (both weight layouts), reductions over a middle axis, the strided
/// copy (transposes) and the bounds-checked gather — compute the right results on an emulated GPU: `tests/emulate.py` interprets the emitted MLIR thread by
/// thread (barriers and warp-collective `mma.sync` with PTX's fragment layouts), launching each
/// kernel as `kiln_runtime::cuda` does, on partial tiles, batches and both operand layouts. Needs
/// python3; `scripts/test` sets KILN_REQUIRE_EMULATOR so that CI cannot skip it.
#[test]
#[cfg_attr(feature = "mlir", ignore = "the same check runs in the plain test pass")]
fn fixed_kernels_compute_on_an_emulated_gpu() {
    // The sm_90a module's kernel (gemm_wgmma) too: the emulator reads every gpu.func of the text.
    let module = kiln_cuda::emit::module(&[], &[]).unwrap() + &kiln_cuda::emit::wgmma_module();
    let dir = std::env::temp_dir().join(format!("kiln-emulate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("module.mlir");
    std::fs::write(&file, module).unwrap();
    let run = emulate(&[file.as_os_str()]);
    let _ = std::fs::remove_dir_all(&dir);
    let Some(o) = run else { return };
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    eprintln!("{out}");
    assert!(
        o.status.success(),
        "emulated kernels differ from the reference:\n{out}{err}"
    );
    assert_eq!(out.matches("ok  ").count(), 25, "{out}");
}

/// Every distinct fused kernel of the bundled specs at -O0 and -O2 (map, reduce and softmax rows,
/// inputs broadcast along rows or not), run on the emulated GPU (`tests/emulate.py`) with the
/// runtime's launch shape and offsets table, equals the reference interpreter applied to the
/// kernel's expressions.
#[test]
#[cfg_attr(feature = "mlir", ignore = "the same check runs in the plain test pass")]
fn fused_kernels_compute_on_an_emulated_gpu() {
    use kiln_cpu::plan::Expr;
    use kiln_interp::Value;
    use kiln_ir::{DType, Dim, Op, ReduceOp, TensorType};
    use kiln_runtime::plan::KernelKind;

    let (rows, n) = (2usize, 37usize);
    let mut seen = std::collections::BTreeSet::new();
    let mut specs = Vec::new();
    for (_, l, level) in cases() {
        let (planned, _) = plan(&l, level);
        for k in planned.kernels {
            let mut key = format!("{:?}{:?}{:?}{:?}{:?}", k.kind, k.reduce, k.inputs, k.output, k.exprs);
            key.retain(|c| !c.is_whitespace());
            if seen.insert(key) {
                specs.push(k);
            }
        }
    }
    let module = kiln_cuda::emit::module(&specs, &[]).unwrap();
    let ty = |d: DType, shape: &[usize]| TensorType::new(d, shape.iter().map(|x| Dim::known(*x as u64)).collect());
    let bind = kiln_ir::Bindings::new();
    let eval = |op: Op, d: DType, shape: &[usize], args: &[&Value]| -> Value {
        kiln_interp::eval_op(&op, &ty(d, shape), args, &bind).unwrap()
    };
    let mut seed = 11u64;
    let mut rnd = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as f64 / (1u64 << 31) as f64 * 4.0 - 2.0
    };
    let mut jobs = Vec::new();
    let mut wants = Vec::new();
    for (i, k) in specs.iter().enumerate() {
        // Inputs: [rows, n] where contiguous, one value per row otherwise.
        let mut vals: Vec<Value> = Vec::new();
        let mut bufs = Vec::new();
        for (j, (d, contiguous)) in k.inputs.iter().enumerate() {
            let shape = if *contiguous { vec![rows, n] } else { vec![rows, 1] };
            let count = shape.iter().product::<usize>();
            let data: Vec<f64> = (0..count)
                .map(|_| {
                    if *d == DType::Bool {
                        (rnd() > 0.0) as u8 as f64
                    } else {
                        rnd()
                    }
                })
                .collect();
            let (t, text) = if *d == DType::Bool { ("i8", "i") } else { ("f32", "f") };
            let list: Vec<String> = data
                .iter()
                .map(|x| {
                    if text == "i" {
                        format!("{}", *x as i64)
                    } else {
                        format!("{:e}", *x as f32)
                    }
                })
                .collect();
            bufs.push(format!("\"in{j}\": [\"{t}\", [{}]]", list.join(",")));
            vals.push(Value::rounded(*d, shape, data));
        }
        // The reference: the expressions through the interpreter, then the row operation.
        let mut ex: Vec<Value> = Vec::new();
        for e in &k.exprs {
            let v = match e {
                Expr::Input(j) => eval(
                    Op::Broadcast {
                        shape: vec![Dim::known(rows as u64), Dim::known(n as u64)],
                    },
                    vals[*j].dtype,
                    &[rows, n],
                    &[&vals[*j]],
                ),
                Expr::Const(c) => Value::rounded(DType::F32, vec![rows, n], vec![*c as f64; rows * n]),
                Expr::Unary(u, a) => eval(Op::Unary(*u), DType::F32, &[rows, n], &[&ex[*a]]),
                Expr::Binary(op, a, b) => eval(Op::Binary(*op), ex[*a].dtype, &[rows, n], &[&ex[*a], &ex[*b]]),
                Expr::Compare(op, a, b) => eval(Op::Compare(*op), DType::Bool, &[rows, n], &[&ex[*a], &ex[*b]]),
                Expr::Where(c, a, b) => eval(Op::Where, ex[*a].dtype, &[rows, n], &[&ex[*c], &ex[*a], &ex[*b]]),
            };
            ex.push(v);
        }
        let last = ex.last().unwrap();
        let want = match k.kind {
            KernelKind::Map => last.clone(),
            KernelKind::ReduceLast => eval(
                Op::Reduce {
                    op: k.reduce.unwrap(),
                    axes: vec![1],
                    keep_dims: false,
                },
                DType::F32,
                &[rows],
                &[last],
            ),
            KernelKind::SoftmaxLast => {
                let red = |op| Op::Reduce {
                    op,
                    axes: vec![1],
                    keep_dims: true,
                };
                let mx = eval(red(ReduceOp::Max), DType::F32, &[rows, 1], &[last]);
                let sh = eval(Op::Binary(kiln_ir::BinaryOp::Sub), DType::F32, &[rows, n], &[last, &mx]);
                let e = eval(Op::Unary(kiln_ir::UnaryOp::Exp), DType::F32, &[rows, n], &[&sh]);
                let s = eval(red(ReduceOp::Sum), DType::F32, &[rows, 1], &[&e]);
                eval(Op::Binary(kiln_ir::BinaryOp::Div), DType::F32, &[rows, n], &[&e, &s])
            }
        };
        // The launch, as kiln_runtime::cuda runs a Kernel step: offsets of every operand's rows.
        let nops = k.inputs.len() + 1;
        let mut offs = Vec::new();
        for r in 0..rows {
            for (_, contiguous) in &k.inputs {
                offs.push(if *contiguous { r * n } else { r });
            }
            offs.push(if k.kind == KernelKind::ReduceLast { r } else { r * n });
        }
        assert_eq!(offs.len(), rows * nops);
        let offs: Vec<String> = offs.iter().map(|x| x.to_string()).collect();
        bufs.push(format!("\"offs\": [\"i64\", [{}]]", offs.join(",")));
        let mut params = vec![
            format!("{{\"i\": {rows}}}"),
            format!("{{\"i\": {n}}}"),
            "{\"buf\": \"offs\"}".into(),
        ];
        for j in 0..k.inputs.len() {
            params.push(format!("{{\"buf\": \"in{j}\"}}"));
        }
        params.push("{\"buf\": \"out\"}".into());
        let grid = match k.kind {
            KernelKind::Map => format!("[{}, {rows}, 1]", n.div_ceil(kiln_cuda::emit::BLOCK as usize)),
            _ => format!("[1, {rows}, 1]"),
        };
        let ot = if k.output == DType::Bool { "i8" } else { "f32" };
        jobs.push(format!(
            "{{\"kernel\": \"k{i}\", \"grid\": {grid}, \"block\": [{}, 1, 1], \"params\": [{}], \"buffers\": {{{}}}, \"out\": [\"out\", \"{ot}\", {}]}}",
            kiln_cuda::emit::BLOCK,
            params.join(", "),
            bufs.join(", "),
            want.data.len()
        ));
        wants.push(want);
    }
    let dir = std::env::temp_dir().join(format!("kiln-emulate-fused-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("module.mlir"), &module).unwrap();
    std::fs::write(dir.join("jobs.json"), format!("[{}]", jobs.join(",\n"))).unwrap();
    let (module_file, jobs_file) = (dir.join("module.mlir"), dir.join("jobs.json"));
    let Some(o) = emulate(&[module_file.as_os_str(), "--launches".as_ref(), jobs_file.as_os_str()]) else {
        return;
    };
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "emulation failed:\n{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    // `[[..], [..]]`: one list of output values per launch.
    let body = out.trim().trim_start_matches("[[").trim_end_matches("]]");
    let got: Vec<Vec<f64>> = body
        .split("], [")
        .map(|l| {
            l.split(", ")
                .filter(|x| !x.is_empty())
                .map(|x| x.parse::<f64>().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(got.len(), specs.len());
    for (i, ((g, w), k)) in got.iter().zip(&wants).zip(&specs).enumerate() {
        assert_eq!(g.len(), w.data.len(), "k{i}");
        for (e, (a, b)) in g.iter().zip(&w.data).enumerate() {
            let ok = (a - b).abs() <= 1e-5 * b.abs().max(1.0) || (a.is_nan() && b.is_nan());
            assert!(
                ok,
                "k{i} ({:?} {:?}, {} ops): element {e} is {a}, want {b}",
                k.kind, k.exprs, k.ops
            );
        }
    }
    let count = |kind| specs.iter().filter(|k| k.kind == kind).count();
    eprintln!(
        "{} distinct fused kernels ({} map, {} reduce, {} softmax) agree with the interpreter",
        specs.len(),
        count(KernelKind::Map),
        count(KernelKind::ReduceLast),
        count(KernelKind::SoftmaxLast)
    );
    // Each kind must be exercised, or this test checks less than it says.
    assert!(count(KernelKind::Map) > 0 && count(KernelKind::ReduceLast) > 0 && count(KernelKind::SoftmaxLast) > 0);
}
