//! `kiln generate`: text generation with a decoding artifact, streaming tokens as they come.

use kiln_runtime::Decoder;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use kiln_runtime::{Sampler, Sampling};
use tokenizers::Tokenizer;

/// Command-line options of `kiln generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A decoding artifact (`kiln compile --generate`).
    pub model: PathBuf,
    /// A prompt as text (repeat for a batch); needs a tokenizer.
    #[arg(long, conflicts_with = "prompt_ids")]
    pub prompt: Vec<String>,
    /// Prompts as token ids: an integer .npy of shape [n] or [batch, n]; negative ids at the start
    /// of a row are padding (prompts of different lengths).
    #[arg(long, value_name = "FILE.npy")]
    pub prompt_ids: Option<PathBuf>,
    /// A `tokenizer.json` (default: the one the artifact carries).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Tokens to generate per prompt.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample among the K most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample among the most likely tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop a sequence at this token id (default: the tokenizer's end-of-text token, if any).
    #[arg(long)]
    pub stop: Option<i64>,
    /// Never stop early, even at an end-of-text token.
    #[arg(long)]
    pub no_stop: bool,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Time every step of the decode loop and print where a decode step spends its time.
    #[arg(long)]
    pub profile: bool,
    /// Write timings and tokens as JSON: {"prefill_ms", "decode_ms": [per token], "tokens"}, and
    /// on the CPU the mean weight bytes a decode step read ("weight_bytes_per_step") and the
    /// artifact's ("weight_bytes_stored").
    #[arg(long, value_name = "FILE")]
    pub timing_json: Option<PathBuf>,
}

fn load_tokenizer(args: &GenerateArgs, manifest: &kiln_runtime::plan::Manifest) -> Result<Option<Tokenizer>> {
    let parse = |text: &str, from: &str| {
        Tokenizer::from_bytes(text.as_bytes()).map_err(|e| anyhow!("{from}: not a valid tokenizer.json: {e}"))
    };
    match (&args.tokenizer, &manifest.tokenizer) {
        (Some(p), _) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Ok(Some(parse(&text, &p.display().to_string())?))
        }
        (None, Some(t)) => Ok(Some(parse(t, "the artifact's tokenizer")?)),
        (None, None) => Ok(None),
    }
}

fn prompts_from_npy(path: &Path) -> Result<Vec<Vec<i64>>> {
    let t = kiln_runtime::npy::read(path)?;
    if !t.dtype().is_int() {
        bail!("{}: prompt ids must be integers, got {}", path.display(), t.dtype());
    }
    let v: Vec<i64> = t.to_f64_vec().into_iter().map(|x| x as i64).collect();
    let rows: Vec<Vec<i64>> = match t.shape() {
        [n] => vec![v[..*n].to_vec()],
        [b, n] => (0..*b).map(|i| v[i * n..(i + 1) * n].to_vec()).collect(),
        s => bail!(
            "{}: prompt ids must be [n] or [batch, n], got shape {s:?}",
            path.display()
        ),
    };
    rows.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let start = r.iter().position(|x| *x >= 0).unwrap_or(r.len());
            if r[start..].iter().any(|x| *x < 0) {
                bail!("{}: row {i} has a negative id after its first token", path.display());
            }
            Ok(r[start..].to_vec())
        })
        .collect()
}

/// Runs `kiln generate`.
pub fn generate(args: &GenerateArgs) -> Result<()> {
    let not_decoder = || {
        anyhow!(
            "{}: this artifact cannot generate (it has no key/value cache); compile the spec with `kiln compile --generate`",
            args.model.display()
        )
    };
    match crate::load_artifact(&args.model)? {
        crate::Loaded::Cpu(mut model) => {
            if let Some(t) = args.threads {
                model.set_threads(t).map_err(|e| anyhow!(e))?;
            }
            if !model.is_decoder() {
                return Err(not_decoder());
            }
            // Fault the mapped weights in now, so the time to first token is the model's, not the disk's.
            model.prefault();
            let mut session = model.session()?;
            if args.profile {
                session.enable_profile();
            }
            drive(args, model.manifest(), &mut session)
        }
        #[cfg(feature = "cuda-runtime")]
        crate::Loaded::Cuda(model) => {
            if !model.manifest().is_decoder() {
                return Err(not_decoder());
            }
            eprintln!("generating on {} ({})", model.device, model.arch);
            let mut session = model.session()?;
            drive(args, model.manifest(), &mut session)
        }
    }
}

/// Tokenizes the prompts, generates, streams or prints the text, and reports timings.
fn drive(args: &GenerateArgs, manifest: &kiln_runtime::plan::Manifest, session: &mut dyn Decoder) -> Result<()> {
    let tok = load_tokenizer(args, manifest)?;
    let prompts: Vec<Vec<i64>> = match (&args.prompt_ids, &args.prompt) {
        (Some(p), _) => prompts_from_npy(p)?,
        (None, texts) if !texts.is_empty() => {
            let Some(tok) = &tok else {
                bail!("--prompt needs a tokenizer: give --tokenizer FILE, or compile with --tokenizer to carry one");
            };
            texts
                .iter()
                .map(|t| {
                    tok.encode(t.as_str(), true)
                        .map(|e| e.get_ids().iter().map(|i| *i as i64).collect())
                        .map_err(|e| anyhow!("tokenizing {t:?}: {e}"))
                })
                .collect::<Result<_>>()?
        }
        _ => bail!("give --prompt TEXT or --prompt-ids FILE.npy"),
    };
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        bail!("prompt {i} has no tokens");
    }
    let stop = if args.no_stop {
        None
    } else {
        args.stop.or_else(|| {
            let t = tok.as_ref()?;
            ["<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>"]
                .iter()
                .find_map(|s| t.token_to_id(s))
                .map(|i| i as i64)
        })
    };
    let mut sampler = Sampler::new(Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    });
    let batch = prompts.len();
    let stream = batch == 1;
    let out = std::io::stdout();
    let mut shown = String::new();
    let mut so_far: Vec<i64> = Vec::new();
    if stream {
        if let Some(t) = &tok {
            let ids: Vec<u32> = prompts[0].iter().map(|i| *i as u32).collect();
            let text = t.decode(&ids, true).unwrap_or_default();
            print!("{text}");
        }
    }
    let start = Instant::now();
    let mut marks: Vec<f64> = Vec::new();
    let mut last = start;
    let generated = session.generate(&prompts, args.max_new_tokens, &mut sampler, stop, &mut |_, next| {
        let now = Instant::now();
        marks.push(now.duration_since(last).as_secs_f64() * 1e3);
        last = now;
        if stream {
            so_far.push(next[0]);
            let mut o = out.lock();
            match &tok {
                Some(t) => {
                    let ids: Vec<u32> = so_far.iter().map(|i| *i as u32).collect();
                    let text = t.decode(&ids, true).unwrap_or_default();
                    // Print only what is new (a token can complete a multi-byte character later).
                    if text.starts_with(&shown) && !text.ends_with('\u{FFFD}') {
                        let _ = write!(o, "{}", &text[shown.len()..]);
                        shown = text;
                    }
                }
                None => {
                    let _ = write!(o, "{} ", next[0]);
                }
            }
            let _ = o.flush();
        }
        true
    })?;
    let total = start.elapsed().as_secs_f64() * 1e3;
    if stream {
        if let Some(t) = &tok {
            let ids: Vec<u32> = so_far.iter().map(|i| *i as u32).collect();
            let text = t.decode(&ids, true).unwrap_or_default();
            if text.len() > shown.len() && text.starts_with(&shown) {
                print!("{}", &text[shown.len()..]);
            }
        }
        println!();
    } else {
        for (i, (p, g)) in prompts.iter().zip(&generated).enumerate() {
            match &tok {
                Some(t) => {
                    let all: Vec<u32> = p.iter().chain(g).map(|x| *x as u32).collect();
                    println!("[{i}] {}", t.decode(&all, true).unwrap_or_default());
                }
                None => println!("[{i}] {:?}", g),
            }
        }
    }
    let prefill_ms = marks.first().copied().unwrap_or(total);
    let decode: Vec<f64> = marks.iter().skip(1).copied().collect();
    let mut sorted = decode.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    eprintln!(
        "prefill  {batch} x {longest} tokens: {prefill_ms:.1} ms to the first token{}",
        match median {
            Some(m) => format!(
                "; decode {} steps, median {m:.2} ms/step = {:.1} tokens/s per sequence",
                decode.len(),
                1e3 / m
            ),
            None => String::new(),
        }
    );
    eprintln!(
        "cache    {:.1} MiB for {} of {} positions",
        session.cache_bytes() as f64 / 1048576.0,
        session.len(),
        session.capacity()
    );
    let stored: u64 = manifest
        .values
        .iter()
        .map(|v| match v.storage {
            kiln_runtime::plan::Storage::Weight { len, .. } => len,
            _ => 0,
        })
        .sum();
    if let Some(b) = session.decode_weight_bytes() {
        eprintln!(
            "weights  {:.2} MiB read per decode step, of {:.2} MiB stored",
            b / 1048576.0,
            stored as f64 / 1048576.0
        );
    }
    if let Some(p) = session.decode_profile() {
        let total: f64 = p.by_kind.iter().map(|k| k.1).sum();
        eprintln!("profile  mean decode step {:.2} ms by kind of step:", total * 1e3);
        for (kind, t, n) in &p.by_kind {
            eprintln!("  {:>8.3} ms  {n:>4} steps  {kind}", t * 1e3);
        }
    }
    if let Some(path) = &args.timing_json {
        let list = |v: &[f64]| v.iter().map(|x| format!("{x:.4}")).collect::<Vec<_>>().join(", ");
        let toks: Vec<String> = generated[0].iter().map(|t| t.to_string()).collect();
        let json = format!(
            "{{\"prefill_ms\": {prefill_ms:.4}, \"decode_ms\": [{}], \"tokens\": [{}], \"batch\": {batch}, \"prompt_tokens\": {longest}{}}}\n",
            list(&decode),
            toks.join(", "),
            match session.decode_weight_bytes() {
                Some(b) => format!(
                    ", \"weight_bytes_per_step\": {b:.0}, \"weight_bytes_stored\": {stored}, \"level\": \"{}\"",
                    manifest.target.level().name()
                ),
                None => String::new(),
            }
        );
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
