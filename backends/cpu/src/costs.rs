//! Measured kernel times, cached by (CPU model, level, build, threads, kernel, shape) in memory and on
//! disk, `$KILN_CACHE/costs/<cpu model>.v<VERSION>.tsv` (default `~/.cache/kiln`): the first compile on a
//! machine measures, later ones read the same numbers and so choose the same forms.
//! `KILN_COST_CACHE=off` measures afresh and writes nothing.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use kiln_runtime::cpu::CpuArg;
use kiln_runtime::measure::ProductKernel;

static TABLE: Mutex<Option<HashMap<String, f64>>> = Mutex::new(None);

/// Bumped when how kernels are measured changes: older files are then ignored.
const VERSION: u32 = 4;

/// The cache file of this CPU, unless caching is off.
fn file() -> Option<PathBuf> {
    if std::env::var("KILN_COST_CACHE").as_deref() == Ok("off") {
        return None;
    }
    let root = std::env::var_os("KILN_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kiln")))?;
    let model: String = kiln_runtime::cpu::model_name()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    Some(root.join("costs").join(format!("{model}.v{VERSION}.tsv")))
}

fn load() -> HashMap<String, f64> {
    let text = file().and_then(|f| std::fs::read_to_string(f).ok()).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (key, ns) = l.rsplit_once('\t')?;
            Some((key.to_string(), ns.parse().ok()?))
        })
        .collect()
}

/// The time recorded under `key`, or `measure()`'s, recorded. Measurements run one at a time.
pub fn cached(key: String, measure: impl FnOnce() -> Result<f64, String>) -> Result<f64, String> {
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let table = table.get_or_insert_with(load);
    if let Some(ns) = table.get(&key) {
        return Ok(*ns);
    }
    let ns = measure()?;
    table.insert(key.clone(), ns);
    if let Some(f) = file() {
        // A cache that cannot be written costs only a measurement next time.
        let _ = f.parent().map(std::fs::create_dir_all);
        if let Ok(mut out) = std::fs::OpenOptions::new().create(true).append(true).open(&f) {
            let _ = out.write_all(format!("{key}\t{ns}\n").as_bytes());
        }
    }
    Ok(ns)
}

/// The key of a measurement: level, threads, kernel, rows, shape, and what else decides the time
/// (nonzeros of a sparse weight).
pub fn key(cpu: CpuArg, threads: usize, kernel: &str, [m, n, k]: [usize; 3], extra: usize) -> String {
    // Kernels built without optimisation run several times slower: their times are kept apart.
    let build = if cfg!(debug_assertions) { "debug" } else { "release" };
    format!("{cpu}\t{build}\t{threads}\t{kernel}\t{m}\t{n}\t{k}\t{extra}")
}

/// Median ns of an `m`-row product with an `[n, k]` weight in form `kernel` (`f32`, `int8`,
/// `int4:G`), measured once per machine.
pub fn product_ns(kernel: &str, [m, n, k]: [usize; 3], threads: usize, cpu: CpuArg) -> Result<f64, String> {
    let pk: ProductKernel = kernel.parse()?;
    cached(key(cpu, threads, kernel, [m, n, k], 0), || {
        kiln_runtime::measure::product_ns(pk, m, n, k, threads, cpu)
    })
}

/// The CPU cost model with its product rate, streaming bandwidth and per-step overhead measured
/// on kiln's own kernels here (`cpu` must run on this machine): a 128x1536x384 f32 product, a
/// one-row int8 product over 16 MiB of codes, and a 1x16x16 product.
pub fn model(cpu: CpuArg, threads: usize) -> Result<kiln_passes::cost::CostModel, String> {
    let gemm = product_ns("f32", [128, 1536, 384], threads, cpu)?;
    let stream = product_ns("int8", [1, 4096, 4096], threads, cpu)?;
    let tiny = product_ns("f32", [1, 16, 16], threads, cpu)?;
    Ok(kiln_passes::cost::CostModel {
        matmul_flops_per_ns: 2.0 * 128.0 * 1536.0 * 384.0 / gemm,
        bytes_per_ns: (4096.0 * 4096.0) / stream,
        op_overhead_ns: tiny,
        ..kiln_passes::cost::CostModel::cpu()
    })
}
