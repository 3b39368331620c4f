//! The `kiln` command line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kiln_frontend::{FrontendError, Lowered, Options};
use kiln_ir::{Bindings, Op, Tensor};

#[derive(Parser)]
#[command(name = "kiln", version, about = "Compile transformer model specs to fast native code")]
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
    /// Run a model on .npy inputs with the reference interpreter.
    Run {
        /// The model spec (.ron).
        spec: PathBuf,
        #[command(flatten)]
        spec_opts: SpecOpts,
        #[command(flatten)]
        weights: WeightOpts,
        /// An input, NAME=FILE.npy (repeat for each input).
        #[arg(long = "input", value_name = "NAME=FILE.npy")]
        inputs: Vec<String>,
        /// Where to write outputs: FILE.npy for the first output, or NAME=FILE.npy (repeatable).
        #[arg(long = "output", value_name = "[NAME=]FILE.npy")]
        outputs: Vec<String>,
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
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct WeightOpts {
    /// A safetensors checkpoint.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Deterministic random weights from this seed instead of a checkpoint.
    #[arg(long, value_name = "SEED")]
    random_weights: Option<u64>,
}

fn split_pair<'a>(s: &'a str, what: &str) -> Result<(&'a str, &'a str)> {
    s.split_once('=').filter(|(a, b)| !a.is_empty() && !b.is_empty()).ok_or_else(|| anyhow!("{what} `{s}` must look like NAME=VALUE"))
}

fn load_spec(path: &Path, o: &SpecOpts) -> Result<Lowered> {
    let mut overrides = Vec::new();
    for s in &o.set {
        let (k, v) = split_pair(s, "--set")?;
        overrides.push((k.to_string(), v.to_string()));
    }
    let opts = Options { overrides, weight_prefix: o.weight_prefix.clone() };
    Ok(kiln_frontend::load(path, &opts)?)
}

fn load_weights(l: &Lowered, w: &WeightOpts) -> Result<BTreeMap<String, Tensor>> {
    match (&w.weights, w.random_weights) {
        (Some(p), _) => Ok(kiln_frontend::weights::load_safetensors(l, p)?),
        (None, Some(seed)) => Ok(kiln_frontend::weights::random(l, seed)),
        (None, None) => bail!("give --weights FILE or --random-weights SEED"),
    }
}

fn signature(l: &Lowered) -> (Vec<String>, Vec<String>) {
    let g = &l.graph;
    let ins = g
        .inputs()
        .iter()
        .filter_map(|i| match &g.node(*i).op {
            Op::Input { name, ty } => Some(format!("{name}: {ty}")),
            _ => None,
        })
        .collect();
    let outs = g.outputs().iter().map(|o| format!("{}: {}", o.name, g.node(o.node).ty)).collect();
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
        b.insert(name.clone(), if name == "batch" { 1 } else { (*bound).min(128) as usize });
    }
    for d in dims {
        let (k, v) = split_pair(d, "--dim")?;
        let Some((_, bound)) = l.dims.iter().find(|(n, _)| n == k) else {
            let known: Vec<&str> = l.dims.iter().map(|(n, _)| n.as_str()).collect();
            bail!("--dim {k}: the spec declares no dim `{k}` (it has: {})", known.join(", "));
        };
        let v: usize = v.parse().with_context(|| format!("--dim {k}: `{v}` is not a positive integer"))?;
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
    println!("  params   {params} ({}parameters in {} tensors, {:.1} MiB as f32)", human(params as f64), l.params.len(), params as f64 * 4.0 / 1048576.0);
    println!("  graph    {} primitive ops", l.graph.len());
    println!("  work     {}FLOP at {}", human(flops as f64), at.join(", "));
    if weights.is_some() {
        println!("  weights  all {} bound and checked", l.params.len());
    }
    Ok(())
}

fn run(spec: &Path, o: &SpecOpts, w: &WeightOpts, inputs: &[String], outputs: &[String]) -> Result<()> {
    let l = load_spec(spec, o)?;
    let weights = load_weights(&l, w)?;
    let mut feed = BTreeMap::new();
    for s in inputs {
        let (k, f) = split_pair(s, "--input")?;
        feed.insert(k.to_string(), kiln_runtime::npy::read(f)?);
    }
    let results = kiln_interp::run(&l.graph, &weights, &feed)?;
    for (name, t) in &results {
        let v = t.to_f64_vec();
        let head: Vec<String> = v.iter().take(4).map(|x| format!("{x:.5}")).collect();
        println!("{name}: {} {:?} [{}{}]", t.dtype(), t.shape(), head.join(", "), if v.len() > 4 { ", …" } else { "" });
    }
    for s in outputs {
        let (name, file) = match s.split_once('=') {
            Some((n, f)) => (n.to_string(), f.to_string()),
            None => (results.first().map(|r| r.0.clone()).unwrap_or_default(), s.clone()),
        };
        let Some((_, t)) = results.iter().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = results.iter().map(|r| r.0.as_str()).collect();
            bail!("--output {s}: the model has no output `{name}` (it has: {})", names.join(", "));
        };
        kiln_runtime::npy::write(&file, t)?;
        eprintln!("wrote {name} to {file}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Check { spec, spec_opts, weights, dims } => check(spec, spec_opts, weights.as_deref(), dims),
        Cmd::Run { spec, spec_opts, weights, inputs, outputs } => run(spec, spec_opts, weights, inputs, outputs),
        Cmd::Inspect { spec, spec_opts, format } => load_spec(spec, spec_opts).map(|l| match format {
            Format::Text => print!("{}", l.graph.to_text()),
            Format::Dot => print!("{}", l.graph.to_dot()),
        }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Spec errors are already rendered with their own `error:` headers and snippets.
            match e.downcast_ref::<FrontendError>() {
                Some(FrontendError::Spec(s)) => eprint!("{s}"),
                _ => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}
