//! Micro-measurements of kiln's own product kernels, for the compiler's choice among a weight's
//! forms: the least of three medians (see [`median_ns`]), each few-row (decoding) run after the
//! caches were flushed, since such products stream their weights from memory.

use crate::cpu::CpuArg;
use crate::kernels::{self, Buf, QWeight};
use kiln_ir::DType;

/// A product kernel, as the compiler names the forms of a weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProductKernel {
    /// f32 weights packed for the level's microkernel.
    F32,
    /// Weight-only quantized codes: int8 (one f32 scale per output channel) or int4 (f16 scale and
    /// minimum per group of `group` columns).
    Quantized {
        /// 8 or 4.
        bits: u8,
        /// Columns per scale.
        group: usize,
    },
}

impl std::str::FromStr for ProductKernel {
    type Err = String;
    /// `f32`, `int8`, `int4:G`.
    fn from_str(s: &str) -> Result<ProductKernel, String> {
        match s.split_once(':') {
            None if s == "f32" => Ok(ProductKernel::F32),
            None if s == "int8" => Ok(ProductKernel::Quantized { bits: 8, group: 0 }),
            Some(("int4", g)) => g
                .parse()
                .map(|group| ProductKernel::Quantized { bits: 4, group })
                .map_err(|_| format!("`{s}`: bad group")),
            _ => Err(format!("no product kernel `{s}` (f32, int8, int4:G)")),
        }
    }
}

/// The least of three medians of `f`, each over at least 5 runs and 20 ms (at most 101 runs),
/// after three warm-up runs; `cold` flushes the caches before each run. On a shared virtual
/// machine a whole window can run at half speed (the other vCPU descheduled): the least median is
/// the kernel's own time, and is what tells two forms apart.
pub(crate) fn median_ns(cold: bool, f: &dyn Fn() -> Result<(), String>) -> Result<f64, String> {
    for _ in 0..3 {
        f()?;
    }
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let mut t = Vec::new();
        let start = std::time::Instant::now();
        while t.len() < 5 || (start.elapsed().as_millis() < 20 && t.len() < 101) {
            if cold {
                kernels::evict_caches();
            }
            let s = std::time::Instant::now();
            f()?;
            t.push(s.elapsed().as_secs_f64() * 1e9);
        }
        t.sort_by(f64::total_cmp);
        best = best.min(t[t.len() / 2]);
    }
    Ok(best)
}

fn buf<T>(v: &[T]) -> Buf {
    Buf {
        ptr: v.as_ptr() as *mut u8,
        len: std::mem::size_of_val(v),
    }
}

/// Median nanoseconds of an `m`-row product `[m, k] @ [n, k]ᵀ` run by `kernel` for `cpu` on
/// `threads` threads (weights of arbitrary values: these kernels' time does not depend on them).
pub fn product_ns(
    kernel: ProductKernel,
    m: usize,
    n: usize,
    k: usize,
    threads: usize,
    cpu: CpuArg,
) -> Result<f64, String> {
    if !cpu.level.runs_here() {
        return Err(format!("this CPU cannot run {} code", cpu.level.name()));
    }
    // The threads a model runs on: rayon's pool for the rest, spinning workers for the product
    // (as in a model's run, they are awake when the next step comes).
    let pool = kernels::pool(threads)?;
    let spin = crate::pool::Pool::new(threads)?;
    let a: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
    let out = vec![0f32; m * n];
    let (sa, so) = ([m, k], [m, n]);
    let cold = m <= 4;
    spin.install(|| {
        pool.install(|| match kernel {
            ProductKernel::F32 => {
                let kern = crate::gemm::MicroKernel::for_level(cpu.level);
                let w: Vec<f32> = (0..n * k).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
                let packed = crate::gemm::pack(kern, &w, k, n, true);
                let ws = [n.div_ceil(kern.nr), k, kern.nr];
                median_ns(cold, &|| {
                    kernels::packed_matmul(
                        (buf(&a), &sa),
                        (buf(&packed), &ws, kern.name),
                        (buf(&out), &so),
                        1.0,
                        (None, None),
                        None,
                        threads,
                    )
                })
            }
            ProductKernel::Quantized { bits, group } => {
                let group = if bits == 8 { k } else { group };
                if group == 0 || !k.is_multiple_of(group) {
                    return Err(format!("{k} columns do not split into groups of {group}"));
                }
                let codes: Vec<u8> = (0..n * k * bits as usize / 8).map(|i| (i * 37 % 251) as u8).collect();
                let groups = n * (k / group);
                // int8: f32 scales 0.01; int4: f16 scales 0.01 and minimums -0.05.
                let s32 = vec![0.01f32; groups];
                let (s16, m16) = (vec![0x211Fu16; groups], vec![0xAA66u16; groups]);
                let weight = || QWeight {
                    codes: buf(&codes),
                    scales: if bits == 8 {
                        (buf(&s32), DType::F32)
                    } else {
                        (buf(&s16), DType::F16)
                    },
                    mins: (bits == 4).then(|| (buf(&m16), DType::F16)),
                    bits,
                    group,
                };
                let packed = std::sync::OnceLock::new();
                median_ns(cold, &|| {
                    kernels::qmatmul(
                        (buf(&a), &sa),
                        weight(),
                        (buf(&out), &so),
                        1.0,
                        None,
                        None,
                        // As a default artifact runs them: few-row products on int8 activations
                        // (VNNI where `cpu` has it), prefills on dequantized tiles.
                        (true, &packed, cpu.vnni),
                        threads,
                        CpuArg {
                            vnni: crate::cpu::Vnni::None,
                            ..cpu
                        },
                    )
                })
            }
        })
    })
}
