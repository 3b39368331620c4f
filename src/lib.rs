//! The `kiln` command line, as a library: `src/main.rs` runs [`main`], and the Python package
//! runs `kiln compile` in process through [`execute`].

mod bisect;
mod generate;
mod predict;
mod quant;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kiln_frontend::{FrontendError, Lowered, Options};
use kiln_ir::{Bindings, Op, Tensor};
use kiln_passes::OptLevel;
use kiln_runtime::plan::{KernelKind, Step};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Compile transformer model specs to fast native code"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate a spec; print its signature, parameter count and a FLOP estimate.
    Check {
        /// The model spec (.ron).
        spec: PathBuf,
        #[command(flatten)]
        spec_opts: SpecOpts,
        /// Also bind and check this safetensors checkpoint.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Symbolic dim values for the FLOP estimate, NAME=VALUE (default: batch=1, others min(bound, 128)).
        #[arg(long = "dim", value_name = "NAME=VALUE")]
        dims: Vec<String>,
    },
    /// Run a compiled model (.kiln), or a spec with the reference interpreter, on .npy inputs.
    Run {
        /// A compiled artifact (.kiln) or a model spec (.ron).
        spec: PathBuf,
        #[command(flatten)]
        spec_opts: SpecOpts,
        #[command(flatten)]
        weights: WeightOpts,
        /// Threads for a compiled model (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// An input, NAME=FILE.npy (repeat for each input).
        #[arg(long = "input", value_name = "NAME=FILE.npy")]
        inputs: Vec<String>,
        /// Where to write outputs: FILE.npy for the first output, or NAME=FILE.npy (repeatable).
        #[arg(long = "output", value_name = "[NAME=]FILE.npy")]
        outputs: Vec<String>,
    },
    /// Find the rewrite rules that make the compiled model disagree with the interpreter: run both,
    /// then halve the rules that fired until disabling the fewest removes the mismatch.
    Bisect {
        /// The model spec (.ron).
        spec: PathBuf,
        #[command(flatten)]
        spec_opts: SpecOpts,
        #[command(flatten)]
        weights: WeightOpts,
        /// An input, NAME=FILE.npy (repeat for each input).
        #[arg(long = "input", value_name = "NAME=FILE.npy")]
        inputs: Vec<String>,
        /// Optimization level, as for `kiln compile`.
        #[arg(short = 'O', value_name = "LEVEL", default_value = "2", value_parser = clap::value_parser!(u8).range(0..=2))]
        opt: u8,
        /// CPU level to compile for, as for `kiln compile`.
        #[arg(long, value_name = "LEVEL", default_value = "native", value_parser = kiln_runtime::cpu::CpuArg::parse)]
        cpu: kiln_runtime::cpu::CpuArg,
        /// An element may differ from the interpreter's by TOL · (1 + |interpreter's|).
        #[arg(long, value_name = "TOL", default_value_t = 1e-3)]
        tol: f64,
        /// Keep this rule disabled throughout (repeatable).
        #[arg(long = "disable-rule", value_name = "NAME")]
        disable_rule: Vec<String>,
    },
    /// Write the spec of a Hugging Face folder (config.json + safetensors): bert, gpt2, llama,
    /// mistral, qwen2. `kiln compile DIR` does this on the fly.
    Import {
        /// The folder.
        dir: PathBuf,
        /// Where to write the spec (default: print it).
        #[arg(short = 'o', long = "output", value_name = "SPEC.ron")]
        output: Option<PathBuf>,
    },
    /// Compile a spec and its weights into one artifact file.
    Compile {
        /// The model spec (.ron), or a Hugging Face folder (its checkpoint and tokenizer.json are
        /// used unless --weights / --tokenizer say otherwise).
        spec: PathBuf,
        #[command(flatten)]
        spec_opts: SpecOpts,
        #[command(flatten)]
        weights: WeightOpts,
        /// Code generation target.
        #[arg(long, value_enum, default_value_t = TargetArg::Cpu)]
        target: TargetArg,
        /// CPU level to compile for: native (the best this machine runs), x86-64-v2, x86-64-v3
        /// (AVX2, FMA), x86-64-v4 (AVX-512) or portable; `+vnni` after v3 or v4 lets quantized
        /// products use AVX-VNNI or AVX-512 VNNI (native does when this CPU has it). The artifact
        /// runs on any CPU with the level's features (and VNNI, if it uses it).
        #[arg(long, value_name = "LEVEL", default_value = "native", value_parser = kiln_runtime::cpu::CpuArg::parse)]
        cpu: kiln_runtime::cpu::CpuArg,
        /// With --target cuda: also write the kernels' MLIR (before lowering to PTX) to this file.
        #[arg(long, value_name = "FILE")]
        dump_mlir: Option<PathBuf>,
        /// Optimization level: 0 (dead code only, no kernel fusion), 1 (+ common subexpressions,
        /// kernel fusion), 2 (+ algebraic simplification by equality saturation).
        #[arg(short = 'O', value_name = "LEVEL", default_value = "2", value_parser = clap::value_parser!(u8).range(0..=2))]
        opt: u8,
        /// Where to write the artifact.
        #[arg(short = 'o', long = "output", value_name = "MODEL.kiln")]
        output: PathBuf,
        /// Write the text IR before and after every pass into this directory.
        #[arg(long, value_name = "DIR")]
        dump_ir: Option<PathBuf>,
        /// Do not apply this rewrite rule (repeatable), to bisect a numeric difference.
        #[arg(long = "disable-rule", value_name = "NAME")]
        disable_rule: Vec<String>,
        /// Quantize the weights of matrix products: int8 (per output channel), int4[:GROUP] or
        /// gptq4[:GROUP] (GROUP 32, 64 or 128; default 128). Prints an accuracy report against f32.
        #[arg(long, value_name = "SCHEME")]
        quantize: Option<kiln_passes::quantize::Scheme>,
        /// Calibration and held-out samples for --quantize: a text file (one sample per line,
        /// tokenized with --tokenizer) or an integer .npy [n, seq] of token ids (negative = padding).
        /// The last quarter of the samples is held out for the accuracy report.
        #[arg(long, value_name = "FILE")]
        calib: Option<PathBuf>,
        /// Prune the weights of matrix products by magnitude: 2:4, a ratio such as 0.9, or
        /// block:RxC:RATIO; each is stored as CSR where measured faster than dense here.
        #[arg(long, value_name = "PATTERN")]
        sparsity: Option<kiln_passes::sparsity::Pattern>,
        /// Keep weights whose name matches this glob in f32 (repeatable), e.g. 'lm_head*'.
        #[arg(long = "quant-exclude", value_name = "PATTERN")]
        quant_exclude: Vec<String>,
        /// With --quantize: prefill products (more than 4 rows) quantize their activations to int8
        /// per row and 128 columns and use VNNI integer products (needs --cpu native on a CPU with
        /// VNNI, or --cpu x86-64-v4+vnni / x86-64-v3+vnni). Faster, less accurate: the report shows it.
        #[arg(long)]
        int8_prefill: bool,
        /// With --quantize: quantize every eligible product with SCHEME. Without it, each product's
        /// f32, int8 and SCHEME forms are measured on this CPU (at 1 row for a decoder, 128 for an
        /// encoder) and the fastest is kept, as extraction from the e-graph holding all three.
        #[arg(long)]
        quant_strict: bool,
        /// A Hugging Face tokenizer.json to carry in the artifact (for `kiln generate --prompt`).
        #[arg(long, value_name = "FILE")]
        tokenizer: Option<PathBuf>,
        /// Print what every pass did (nodes, rules fired, saturation stop reason), the fusion
        /// groups formed, steps per layer, and the cost model's estimate before and after.
        #[arg(long)]
        report: bool,
    },
    /// Generate text (or token ids) with an artifact compiled with `--generate`.
    Generate(generate::GenerateArgs),
    /// Time a compiled model on generated inputs.
    Bench {
        /// The artifact (.kiln).
        model: PathBuf,
        /// Input shapes, NAME=1x128 (repeat for each input).
        #[arg(long = "shape", value_name = "NAME=DIMS")]
        shapes: Vec<String>,
        /// Timed iterations.
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Untimed warm-up iterations.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Print one JSON line instead of text.
        #[arg(long)]
        json: bool,
        /// Also time every step once and print where the time goes.
        #[arg(long)]
        profile: bool,
    },
    /// Print the lowered IR as text or Graphviz DOT.
    Inspect {
        /// The model spec (.ron).
        spec: PathBuf,
        #[command(flatten)]
        spec_opts: SpecOpts,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetArg {
    /// This machine's CPU (Cranelift code, SIMD where the CPU has it).
    Cpu,
    /// NVIDIA GPUs: PTX for sm_80 and sm_90 lowered through MLIR (a kiln built with `--features cuda`).
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Dot,
}

#[derive(Args)]
struct SpecOpts {
    /// Override a config entry, NAME=VALUE (repeatable), e.g. --set layers=2.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// Replace the spec's weight-name prefix.
    #[arg(long)]
    weight_prefix: Option<String>,
    /// Lower for text generation: attention keeps a key/value cache, logits come for the last
    /// position only (decoder specs; run the artifact with `kiln generate`).
    #[arg(long)]
    generate: bool,
}

#[derive(Args)]
#[group(required = false, multiple = false)]
struct WeightOpts {
    /// A safetensors checkpoint.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Deterministic random weights from this seed instead of a checkpoint.
    #[arg(long, value_name = "SEED")]
    random_weights: Option<u64>,
}

fn split_pair<'a>(s: &'a str, what: &str) -> Result<(&'a str, &'a str)> {
    s.split_once('=')
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .ok_or_else(|| anyhow!("{what} `{s}` must look like NAME=VALUE"))
}

fn load_spec(path: &Path, o: &SpecOpts) -> Result<Lowered> {
    let mut overrides = Vec::new();
    for s in &o.set {
        let (k, v) = split_pair(s, "--set")?;
        overrides.push((k.to_string(), v.to_string()));
    }
    let opts = Options {
        overrides,
        weight_prefix: o.weight_prefix.clone(),
        decode: o.generate,
    };
    Ok(kiln_frontend::load(path, &opts)?)
}

/// The weights `w` names; without either option, the checkpoint of a Hugging Face folder `spec`.
fn load_weights(spec: &Path, l: &Lowered, w: &WeightOpts) -> Result<BTreeMap<String, Tensor>> {
    match (&w.weights, w.random_weights) {
        (Some(p), _) => Ok(kiln_frontend::weights::load_safetensors(l, p)?),
        (None, Some(seed)) => Ok(kiln_frontend::weights::random(l, seed)),
        (None, None) if kiln_frontend::hf::is_folder(spec) => Ok(kiln_frontend::weights::load_safetensors(l, spec)?),
        (None, None) => bail!("give --weights FILE or --random-weights SEED"),
    }
}

/// `kiln import`: a Hugging Face folder's spec, written to `out` or printed.
fn import(dir: &Path, out: Option<&Path>) -> Result<()> {
    let imported = kiln_frontend::hf::import(dir)?;
    // The spec must lower as written (it is the one `kiln compile DIR` uses).
    kiln_frontend::lower_source(&dir.display().to_string(), &imported.spec, &Options::default())?;
    match out {
        Some(p) => {
            std::fs::write(p, &imported.spec).with_context(|| format!("writing {}", p.display()))?;
            eprintln!(
                "imported {} ({}) to {}; compile with `kiln compile {} --weights {}{}`",
                dir.display(),
                imported.model_type,
                p.display(),
                p.display(),
                imported.checkpoint.display(),
                imported
                    .tokenizer
                    .as_ref()
                    .map_or(String::new(), |t| format!(" --tokenizer {}", t.display()))
            );
        }
        None => print!("{}", imported.spec),
    }
    Ok(())
}

fn signature(l: &Lowered) -> (Vec<String>, Vec<String>) {
    let g = &l.graph;
    let ins = g
        .inputs()
        .iter()
        .filter_map(|i| match &g.node(*i).op {
            Op::Input { name, ty, default } => Some(match default {
                Some(d) => format!("{name}: {ty} (optional, default {d})"),
                None => format!("{name}: {ty}"),
            }),
            _ => None,
        })
        .collect();
    let outs = g
        .outputs()
        .iter()
        .map(|o| format!("{}: {}", o.name, g.node(o.node).ty))
        .collect();
    (ins, outs)
}

fn human(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.2} G", n / 1e9),
        n if n >= 1e6 => format!("{:.2} M", n / 1e6),
        n if n >= 1e3 => format!("{:.2} K", n / 1e3),
        n => format!("{n:.0} "),
    }
}

fn check(spec: &Path, o: &SpecOpts, weights: Option<&Path>, dims: &[String]) -> Result<()> {
    let l = load_spec(spec, o)?;
    if let Some(w) = weights {
        kiln_frontend::weights::load_safetensors(&l, w)?;
    }
    let mut b = Bindings::new();
    for (name, bound) in &l.dims {
        b.insert(
            name.clone(),
            if name == "batch" { 1 } else { (*bound).min(128) as usize },
        );
    }
    for d in dims {
        let (k, v) = split_pair(d, "--dim")?;
        let Some((_, bound)) = l.dims.iter().find(|(n, _)| n == k) else {
            let known: Vec<&str> = l.dims.iter().map(|(n, _)| n.as_str()).collect();
            bail!(
                "--dim {k}: the spec declares no dim `{k}` (it has: {})",
                known.join(", ")
            );
        };
        let v: usize = v
            .parse()
            .with_context(|| format!("--dim {k}: `{v}` is not a positive integer"))?;
        if v == 0 || v as u64 > *bound {
            bail!("--dim {k}={v}: must be between 1 and the declared bound {bound}");
        }
        b.insert(k.to_string(), v);
    }
    let (ins, outs) = signature(&l);
    let params = kiln_ir::param_count(&l.graph);
    let flops = kiln_ir::estimate_flops(&l.graph, &b).map_err(|s| anyhow!("no value for dim `{s}`"))?;
    let at: Vec<String> = b.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("{}: ok", spec.display());
    println!("  model    {}", l.graph.name);
    println!("  inputs   {}", ins.join(", "));
    println!("  outputs  {}", outs.join(", "));
    println!(
        "  params   {params} ({}parameters in {} tensors, {:.1} MiB as f32)",
        human(params as f64),
        l.params.len(),
        params as f64 * 4.0 / 1048576.0
    );
    println!("  graph    {} primitive ops", l.graph.len());
    println!("  work     {}FLOP at {}", human(flops as f64), at.join(", "));
    if weights.is_some() {
        println!("  weights  all {} bound and checked", l.params.len());
    }
    Ok(())
}

fn is_artifact(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == kiln_runtime::artifact::MAGIC
}

/// A loaded artifact: for this CPU, or for a GPU. One lives per command, so the variants' sizes
/// do not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Loaded {
    Cpu(kiln_runtime::Model),
    #[cfg(feature = "cuda-runtime")]
    Cuda(kiln_runtime::cuda::CudaModel),
}

/// Loads an artifact for whichever target it was compiled for.
pub(crate) fn load_artifact(path: &Path) -> Result<Loaded> {
    let map = kiln_runtime::artifact::map(path)?;
    let arch = kiln_runtime::artifact::decode(&map)?.manifest.target.arch;
    drop(map);
    if arch == kiln_runtime::plan::GPU_ARCH {
        #[cfg(feature = "cuda-runtime")]
        return Ok(Loaded::Cuda(kiln_runtime::cuda::CudaModel::load(path)?));
        #[cfg(not(feature = "cuda-runtime"))]
        bail!(
            "{}: a CUDA artifact, and this kiln was built without CUDA support (cargo build --release --features cuda, \
             or --features cuda-runtime to run only)",
            path.display()
        );
    }
    Ok(Loaded::Cpu(kiln_runtime::Model::load(path)?))
}

fn run(
    spec: &Path,
    o: &SpecOpts,
    w: &WeightOpts,
    threads: Option<usize>,
    inputs: &[String],
    outputs: &[String],
) -> Result<()> {
    let mut feed = BTreeMap::new();
    for s in inputs {
        let (k, f) = split_pair(s, "--input")?;
        feed.insert(k.to_string(), kiln_runtime::npy::read(f)?);
    }
    let results = if is_artifact(spec) {
        if w.weights.is_some() || w.random_weights.is_some() || !o.set.is_empty() {
            bail!("{}: a compiled model carries its weights and config; --weights, --random-weights and --set apply to specs", spec.display());
        }
        match load_artifact(spec)? {
            Loaded::Cpu(mut model) => {
                if let Some(t) = threads {
                    model.set_threads(t).map_err(|e| anyhow!(e))?;
                }
                model.run(&feed)?
            }
            #[cfg(feature = "cuda-runtime")]
            Loaded::Cuda(model) => {
                eprintln!("running on {} ({})", model.device, model.arch);
                model.run(&feed)?
            }
        }
    } else {
        let l = load_spec(spec, o)?;
        let weights = load_weights(spec, &l, w)?;
        kiln_interp::run(&l.graph, &weights, &feed)?
    };
    for (name, t) in &results {
        let v = t.to_f64_vec();
        let head: Vec<String> = v.iter().take(4).map(|x| format!("{x:.5}")).collect();
        println!(
            "{name}: {} {:?} [{}{}]",
            t.dtype(),
            t.shape(),
            head.join(", "),
            if v.len() > 4 { ", …" } else { "" }
        );
    }
    for s in outputs {
        let (name, file) = match s.split_once('=') {
            Some((n, f)) => (n.to_string(), f.to_string()),
            None => (results.first().map(|r| r.0.clone()).unwrap_or_default(), s.clone()),
        };
        let Some((_, t)) = results.iter().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = results.iter().map(|r| r.0.as_str()).collect();
            bail!(
                "--output {s}: the model has no output `{name}` (it has: {})",
                names.join(", ")
            );
        };
        kiln_runtime::npy::write(&file, t)?;
        eprintln!("wrote {name} to {file}");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn compile(
    spec: &Path,
    o: &SpecOpts,
    w: &WeightOpts,
    (target, cpu): (TargetArg, kiln_runtime::cpu::CpuArg),
    dump_mlir: Option<&Path>,
    opt: u8,
    out: &Path,
    popts: &kiln_passes::PipelineOptions,
    show_report: bool,
    tokenizer: Option<&Path>,
    q: &quant::QuantArgs,
) -> Result<()> {
    if q.int8_prefill && q.scheme.is_none() {
        bail!("--int8-prefill applies to quantized products: give --quantize");
    }
    if q.int8_prefill && cpu.vnni == kiln_runtime::cpu::Vnni::None {
        bail!(
            "--int8-prefill needs VNNI: --cpu {cpu} has none (this CPU: {}; use --cpu native on a CPU with \
             avx512vnni or avxvnni, or --cpu x86-64-v4+vnni / x86-64-v3+vnni)",
            kiln_runtime::cpu::CpuArg::host()
        );
    }
    // A Hugging Face folder's tokenizer comes along unless another is given.
    let folder_tokenizer = kiln_frontend::hf::is_folder(spec)
        .then(|| spec.join("tokenizer.json"))
        .filter(|p| p.is_file());
    let tokenizer = match tokenizer.or(folder_tokenizer.as_deref()) {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            tokenizers::Tokenizer::from_bytes(text.as_bytes())
                .map_err(|e| anyhow!("{}: not a valid tokenizer.json: {e}", p.display()))?;
            Some(text)
        }
        None => None,
    };
    let start = Instant::now();
    let mut l = load_spec(spec, o)?;
    let mut weights = load_weights(spec, &l, w)?;
    let t_front = start.elapsed();
    let level = match opt {
        0 => OptLevel::O0,
        1 => OptLevel::O1,
        _ => OptLevel::O2,
    };
    let nodes = l.graph.len();
    let model = popts.cost_model();
    let cost_before = model.graph_ns(&l.graph);
    let report = kiln_passes::optimize_with(&mut l.graph, level, popts)?;
    let cost_after = model.graph_ns(&l.graph);
    let quant_lines = quant::run(
        q,
        &mut l.graph,
        &mut weights,
        &l.dims,
        tokenizer.as_deref(),
        show_report,
    )?;
    let t_opt = start.elapsed() - t_front;
    let copts = kiln_cpu::Options {
        tokenizer,
        cpu: cpu.level,
        vnni: cpu.vnni,
        int8_prefill: q.int8_prefill,
        disabled_rules: popts.disabled_rules.clone(),
        dump_dir: popts.dump_dir.clone(),
        measured_costs: match target {
            TargetArg::Cpu if show_report && cpu.level.runs_here() => {
                let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
                kiln_cpu::costs::model(cpu, threads).ok()
            }
            _ => None,
        },
        ..kiln_cpu::Options::for_level(opt)
    };
    let compiled = match target {
        TargetArg::Cpu => {
            if dump_mlir.is_some() {
                bail!("--dump-mlir shows the CUDA kernels: it needs --target cuda");
            }
            kiln_cpu::compile_to_file(&l.graph, &weights, &l.dims, &copts, out)?
        }
        TargetArg::Cuda => {
            if let Some(p) = dump_mlir {
                let (_, mlir) = kiln_cuda::plan_mlir(&l.graph, &weights, &l.dims, &copts)?;
                std::fs::write(p, mlir).with_context(|| format!("writing {}", p.display()))?;
            }
            let c = kiln_cuda::compile(&l.graph, &weights, &l.dims, &copts)?.compiled;
            kiln_runtime::artifact::write(out, &c.manifest, &c.weights, &c.code)?;
            c
        }
    };
    let total = start.elapsed();
    let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    let m = &compiled.manifest;
    println!(
        "compiled {} to {} ({:.1} MiB)",
        spec.display(),
        out.display(),
        size as f64 / 1048576.0
    );
    println!("  graph    {nodes} ops lowered, {} after -O{opt}", l.graph.len());
    for line in &quant_lines {
        println!("  {line}");
    }
    if show_report {
        print_pass_report(&report);
        println!(
            "  cost     {:.2} ms -> {:.2} ms estimated by the {} cost model (symbolic dims at {}, no fusion)",
            cost_before / 1e6,
            cost_after / 1e6,
            model.name,
            model.symbol_extent
        );
    }
    if opt == 0 {
        println!("  note     -O0: no kernel fusion, every primitive op is its own step");
    }
    let mut summary = plan_summary(&m.steps, &m.kernels);
    summary.distinct = m.kernels.len();
    println!("  plan     {}", summary.line());
    if show_report {
        for line in &compiled.fusion.notes {
            println!("  fuse     {line}");
        }
        for line in summary.groups() {
            println!("  fusion   {line}");
        }
        if let Some((layer, per)) = steps_per_layer(m) {
            println!("  layer    {layer}: {}", per.line());
        }
        if matches!(target, TargetArg::Cpu) && cpu.level.runs_here() {
            for line in predict::lines(
                out,
                (&l.graph, &l.dims),
                &compiled.predicted,
                copts.measured_costs.as_ref(),
            ) {
                println!("  {line}");
            }
        }
    }
    if let Some(g) = &m.gpu {
        let archs: Vec<String> = g
            .modules
            .iter()
            .map(|x| format!("{} ({} KiB)", x.arch, x.len / 1024))
            .collect();
        println!("  code     PTX for {}", archs.join(", "));
    } else {
        println!(
            "  code     {} bytes for {} ({})",
            compiled.code.len(),
            m.target.level,
            m.target.features.join(" ")
        );
    }
    println!(
        "  time     {:.0} ms (frontend + weights {:.0} ms, passes {:.0} ms, codegen + write {:.0} ms)",
        total.as_secs_f64() * 1e3,
        t_front.as_secs_f64() * 1e3,
        t_opt.as_secs_f64() * 1e3,
        (total - t_front - t_opt).as_secs_f64() * 1e3
    );
    Ok(())
}

fn print_pass_report(report: &[kiln_passes::PassReport]) {
    for r in report {
        println!(
            "  pass     {:<17} {:>6} -> {:<6} removed {:<5} merged {:<5} {:.1} ms",
            r.pass,
            r.nodes_before,
            r.nodes_after,
            r.stats.removed,
            r.stats.merged,
            r.time.as_secs_f64() * 1e3
        );
        for n in &r.stats.notes {
            println!("             {n}");
        }
    }
}

/// Counts of plan steps by kind.
#[derive(Default)]
struct PlanSummary {
    steps: usize,
    kernels: BTreeMap<&'static str, (usize, u32)>,
    distinct: usize,
    matmuls: usize,
    epilogues: usize,
    attention: usize,
    experts: usize,
    other: usize,
}

impl PlanSummary {
    fn line(&self) -> String {
        let calls: usize = self.kernels.values().map(|(n, _)| n).sum();
        let fused: u32 = self.kernels.values().map(|(_, f)| f).sum();
        format!(
            "{} steps: {calls} kernel calls ({fused} ops fused){}, {} matmuls, {} attention, {}{} other",
            self.steps,
            if self.distinct > 0 {
                format!(" of {} distinct generated kernels", self.distinct)
            } else {
                String::new()
            },
            self.matmuls,
            self.attention,
            if self.experts > 0 {
                format!("{} mixture-of-experts, ", self.experts)
            } else {
                String::new()
            },
            self.other
        )
    }

    fn groups(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .kernels
            .iter()
            .map(|(k, (n, f))| format!("{n} {k} kernel calls fusing {f} ops"))
            .collect();
        v.push(format!(
            "{} of {} matmuls carry a fused epilogue (scale, bias or residual)",
            self.epilogues, self.matmuls
        ));
        v.push(format!(
            "{} attention steps (scores, mask, softmax and @v in one blocked step)",
            self.attention
        ));
        v
    }
}

fn plan_summary<'a>(
    steps: impl IntoIterator<Item = &'a Step>,
    kernels: &[kiln_runtime::plan::KernelDecl],
) -> PlanSummary {
    let mut s = PlanSummary::default();
    for st in steps {
        s.steps += 1;
        match st {
            Step::Kernel { kernel, kind, .. } => {
                let k = match kind {
                    KernelKind::Map => "elementwise",
                    KernelKind::ReduceLast => "row-reduction",
                    KernelKind::SoftmaxLast => "softmax",
                };
                let e = s.kernels.entry(k).or_default();
                e.0 += 1;
                e.1 += kernels[*kernel as usize].ops;
            }
            Step::MatMul { scale, bias, acc, .. }
            | Step::PackedMatMul { scale, bias, acc, .. }
            | Step::QMatMul { scale, bias, acc, .. }
            | Step::SpMatMul { scale, bias, acc, .. } => {
                s.matmuls += 1;
                if *scale != 1.0 || bias.is_some() || acc.is_some() {
                    s.epilogues += 1;
                }
            }
            Step::Attention { .. } => s.attention += 1,
            Step::Fallback { op: Op::Moe { .. }, .. } => s.experts += 1,
            _ => s.other += 1,
        }
    }
    s
}

/// The steps of the first repeated layer (values named `NAME.0/…`), if the model has layers.
fn steps_per_layer(m: &kiln_runtime::plan::Manifest) -> Option<(String, PlanSummary)> {
    let layer_of = |v: u32| -> Option<String> {
        let name = &m.values[v as usize].name;
        let (head, _) = name.split_once('/')?;
        let (_, idx) = head.rsplit_once('.')?;
        idx.parse::<u32>().ok().map(|_| head.to_string())
    };
    let first = m.steps.iter().find_map(|s| layer_of(s.out()))?;
    let steps = m.steps.iter().filter(|s| layer_of(s.out()).as_deref() == Some(&first));
    Some((first.clone(), plan_summary(steps, &m.kernels)))
}

fn parse_dims(s: &str) -> Result<(String, Vec<usize>)> {
    let (k, v) = split_pair(s, "--shape")?;
    let dims = v
        .split('x')
        .map(|d| d.parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--shape {s}: dims must look like 1x128"))?;
    Ok((k.to_string(), dims))
}

/// Deterministic inputs for benchmarking: masks all ones, token types zero, ids small.
fn bench_input(name: &str, dtype: kiln_ir::DType, shape: Vec<usize>) -> Result<Tensor> {
    use kiln_ir::DType;
    let n: usize = shape.iter().product();
    Ok(match dtype {
        DType::F32 => Tensor::from_f32(shape, (0..n).map(|k| ((k * 37) % 200) as f32 / 100.0 - 1.0).collect())?,
        DType::I64 if name.contains("mask") => Tensor::from_i64(shape, vec![1; n])?,
        DType::I64 if name.contains("type") => Tensor::from_i64(shape, vec![0; n])?,
        DType::I64 => Tensor::from_i64(shape, (0..n).map(|k| ((k * 31) % 100) as i64 + 1).collect())?,
        other => bail!("cannot generate benchmark inputs of dtype {other} (input `{name}`)"),
    })
}

/// Synthetic inputs of the given shapes (`NAME=D0xD1…`) for every input of the model; an
/// optional input without a shape is left out (the run fills its default).
fn bench_feed(m: &kiln_runtime::plan::Manifest, shapes: &[String]) -> Result<BTreeMap<String, Tensor>> {
    let mut given: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for s in shapes {
        let (k, d) = parse_dims(s)?;
        given.insert(k, d);
    }
    let mut feed = BTreeMap::new();
    for p in &m.inputs {
        let v = &m.values[p.value as usize];
        if p.default.is_some() && !given.contains_key(&p.name) {
            continue;
        }
        let shape = given.remove(&p.name).ok_or_else(|| {
            anyhow!(
                "--shape {}=…: missing (inputs: {})",
                p.name,
                m.inputs.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
            )
        })?;
        feed.insert(p.name.clone(), bench_input(&p.name, v.dtype, shape)?);
    }
    if let Some(k) = given.keys().next() {
        bail!("--shape {k}: the model has no such input");
    }
    Ok(feed)
}

/// `kiln bench` on a GPU: wall time of whole runs (inputs copied over, outputs copied back), and of
/// runs that leave the outputs on the GPU;
/// `--profile` then times each kernel over as many more runs (a synchronisation after every
/// launch, host-timed: launch latency included).
#[cfg(feature = "cuda-runtime")]
fn bench_cuda(
    model: &kiln_runtime::cuda::CudaModel,
    shapes: &[String],
    iters: usize,
    warmup: usize,
    json: bool,
    profile: bool,
) -> Result<()> {
    let feed = bench_feed(model.manifest(), shapes)?;
    for _ in 0..warmup.max(1) {
        model.run(&feed)?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        model.run(&feed)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    // The same runs leaving the outputs on the GPU (as device-resident frameworks are timed).
    let mut resident = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        model.run_on_device(&feed)?;
        resident.push(t.elapsed().as_secs_f64() * 1e3);
    }
    resident.sort_by(|a, b| a.total_cmp(b));
    let resident_ms = resident[resident.len() / 2];
    // Per kernel: milliseconds and launches per run.
    let mut kernels: Vec<(String, f64, f64)> = Vec::new();
    if profile {
        model.set_profiling(true);
        let runs = iters.max(1);
        for _ in 0..runs {
            model.run(&feed)?;
        }
        model.set_profiling(false);
        let r = runs as f64;
        kernels = model
            .kernel_stats()
            .into_iter()
            .map(|(k, s)| (k, s.seconds * 1e3 / r, s.launches as f64 / r))
            .collect();
        kernels.sort_by(|a, b| b.1.total_cmp(&a.1));
    }
    if json {
        let ks: Vec<String> = kernels
            .iter()
            .map(|(k, ms, n)| format!("\"{k}\": {{\"ms\": {ms:.5}, \"launches\": {n}}}"))
            .collect();
        println!(
            "{{\"median_ms\": {:.4}, \"p10_ms\": {:.4}, \"p90_ms\": {:.4}, \"device_resident_median_ms\": {resident_ms:.4}, \"iters\": {}, \"device\": \"{}\", \"arch\": \"{}\", \"kernels\": {{{}}}}}",
            q(0.5),
            q(0.1),
            q(0.9),
            times.len(),
            model.device,
            model.arch,
            ks.join(", ")
        );
    } else {
        println!(
            "{} on {} ({}): median {:.3} ms (p10 {:.3}, p90 {:.3}) over {} runs",
            model.manifest().name,
            model.device,
            model.arch,
            q(0.5),
            q(0.1),
            q(0.9),
            times.len()
        );
        println!("  outputs left on the GPU (no download): median {resident_ms:.3} ms");
        if profile {
            let total: f64 = kernels.iter().map(|k| k.1).sum();
            println!(
                "  kernels (mean per run over {} profiled runs; total {total:.3} ms):",
                iters.max(1)
            );
            for (k, ms, n) in &kernels {
                println!(
                    "    {k:<24} {ms:9.4} ms {:5.1}%  {n} launches",
                    100.0 * ms / total.max(1e-12)
                );
            }
        }
    }
    Ok(())
}

fn bench(
    path: &Path,
    shapes: &[String],
    iters: usize,
    warmup: usize,
    threads: Option<usize>,
    json: bool,
    profile: bool,
) -> Result<()> {
    let t0 = Instant::now();
    // Without `cuda-runtime` the match has one arm (clippy would make it a `let`).
    #[allow(clippy::infallible_destructuring_match)]
    let mut model = match load_artifact(path)? {
        Loaded::Cpu(m) => m,
        #[cfg(feature = "cuda-runtime")]
        Loaded::Cuda(m) => return bench_cuda(&m, shapes, iters, warmup, json, profile),
    };
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    if let Some(t) = threads {
        model.set_threads(t).map_err(|e| anyhow!(e))?;
    }
    let m = model.manifest().clone();
    let feed = bench_feed(&m, shapes)?;
    let mut peak = 0;
    for _ in 0..warmup {
        peak = model.run_with_stats(&feed)?.1.peak_activation_bytes;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        let (_, stats) = model.run_with_stats(&feed)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        peak = stats.peak_activation_bytes;
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    let batch = feed
        .values()
        .next()
        .and_then(|t| t.shape().first().copied())
        .unwrap_or(1);
    let (median, p10, p90) = (q(0.5), q(0.1), q(0.9));
    let level = model.level();
    let cpu = kiln_runtime::cpu::model_name();
    if json {
        let features: Vec<String> = m.target.features.iter().map(|f| format!("\"{f}\"")).collect();
        println!(
            "{{\"median_ms\": {median:.4}, \"p10_ms\": {p10:.4}, \"p90_ms\": {p90:.4}, \"iters\": {}, \"threads\": {}, \"peak_activation_bytes\": {peak}, \"load_ms\": {load_ms:.3}, \"level\": \"{level}\", \"features\": [{}], \"cpu\": \"{}\"}}",
            times.len(), threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
            features.join(", "), cpu.replace('\\', "\\\\").replace('"', "\\\"")
        );
    } else {
        println!("{}: {} iterations", path.display(), times.len());
        println!("  target      {level} on {cpu}");
        println!("  latency     median {median:.3} ms (p10 {p10:.3}, p90 {p90:.3})");
        println!(
            "  throughput  {:.1} inferences/s ({} per batch)",
            batch as f64 * 1e3 / median,
            batch
        );
        println!("  memory      {:.2} MiB peak activations", peak as f64 / 1048576.0);
        println!(
            "  load        {load_ms:.1} ms (of which validation and code mapping {:.1} ms)",
            model.load_seconds * 1e3
        );
    }
    if profile {
        let mut runs: Vec<kiln_runtime::Profile> = Vec::new();
        for _ in 0..5 {
            runs.push(model.profile(&feed)?);
        }
        // Median over runs, per kind.
        let first = &runs[0];
        let total: f64 = first.by_kind.iter().map(|k| k.1).sum();
        println!("  profile (one run, by kind of step; total {:.2} ms):", total * 1e3);
        for (kind, _, n) in &first.by_kind {
            let mut ts: Vec<f64> = runs
                .iter()
                .map(|r| r.by_kind.iter().find(|k| &k.0 == kind).map_or(0.0, |k| k.1))
                .collect();
            ts.sort_by(|a, b| a.total_cmp(b));
            println!("    {:>8.3} ms  {:>4} steps  {kind}", ts[ts.len() / 2] * 1e3, n);
        }
    }
    Ok(())
}

/// The error and its causes, leaving out a cause whose text the message above it already quotes
/// (kiln's error types name their source in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

/// Runs the command line (`std::env::args`), printing an error as the command line does.
pub fn main() -> ExitCode {
    match dispatch(&Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", render(&e));
            ExitCode::FAILURE
        }
    }
}

/// Runs `kiln ARGS…` in this process (`args` without the program's name): the Python package's
/// way to `kiln compile`. An error comes back as the text the command line prints.
pub fn execute(args: &[String]) -> Result<(), String> {
    let argv = std::iter::once("kiln".to_string()).chain(args.iter().cloned());
    let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
    dispatch(&cli).map_err(|e| render(&e))
}

/// An error as the command line prints it: spec errors with their own `error:` headers and
/// snippets, others as `error: ` and the chain of causes.
fn render(e: &anyhow::Error) -> String {
    match e.downcast_ref::<FrontendError>() {
        Some(FrontendError::Spec(s)) => s.to_string().trim_end().to_string(),
        _ => format!("error: {}", error_chain(e)),
    }
}

/// Runs one parsed command.
fn dispatch(cli: &Cli) -> Result<()> {
    match &cli.cmd {
        Cmd::Check {
            spec,
            spec_opts,
            weights,
            dims,
        } => check(spec, spec_opts, weights.as_deref(), dims),
        Cmd::Run {
            spec,
            spec_opts,
            weights,
            threads,
            inputs,
            outputs,
        } => run(spec, spec_opts, weights, *threads, inputs, outputs),
        Cmd::Bisect {
            spec,
            spec_opts,
            weights,
            inputs,
            opt,
            cpu,
            tol,
            disable_rule,
        } => bisect::run(
            spec,
            spec_opts,
            weights,
            &bisect::Args {
                inputs,
                opt: *opt,
                cpu: *cpu,
                tol: *tol,
                disabled: disable_rule,
            },
        ),
        Cmd::Import { dir, output } => import(dir, output.as_deref()),
        Cmd::Compile {
            spec,
            spec_opts,
            weights,
            target,
            cpu,
            dump_mlir,
            opt,
            output,
            dump_ir,
            disable_rule,
            report,
            tokenizer,
            quantize,
            calib,
            quant_exclude,
            int8_prefill,
            quant_strict,
            sparsity,
        } => {
            let popts = kiln_passes::PipelineOptions {
                verify_each: cfg!(debug_assertions),
                disabled_rules: disable_rule.clone(),
                dump_dir: dump_ir.clone(),
                target: Some(match target {
                    TargetArg::Cpu => "cpu",
                    TargetArg::Cuda => "cuda",
                }),
                ..Default::default()
            };
            let q = quant::QuantArgs {
                scheme: *quantize,
                sparsity: *sparsity,
                calib: calib.clone(),
                exclude: quant_exclude.clone(),
                int8_prefill: *int8_prefill,
                strict: *quant_strict,
                // Forms are measured on the CPU the artifact is for.
                cpu: matches!(target, TargetArg::Cpu).then_some(*cpu),
            };
            compile(
                spec,
                spec_opts,
                weights,
                (*target, *cpu),
                dump_mlir.as_deref(),
                *opt,
                output,
                &popts,
                *report,
                tokenizer.as_deref(),
                &q,
            )
        }
        Cmd::Bench {
            model,
            shapes,
            iters,
            warmup,
            threads,
            json,
            profile,
        } => bench(model, shapes, *iters, *warmup, *threads, *json, *profile),
        Cmd::Generate(args) => generate::generate(args),
        Cmd::Inspect {
            spec,
            spec_opts,
            format,
        } => load_spec(spec, spec_opts).map(|l| match format {
            Format::Text => print!("{}", l.graph.to_text()),
            Format::Dot => print!("{}", l.graph.to_dot()),
        }),
    }
}
