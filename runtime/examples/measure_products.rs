//! Times kiln's product kernels as the compiler's weight-form choice measures them:
//! `cargo run --release -p kiln-runtime --example measure_products [threads] [MxNxK…]`.

use kiln_runtime::cpu::CpuArg;
use kiln_runtime::measure::{product_ns, ProductKernel};

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads = args.first().and_then(|a| a.parse().ok()).unwrap_or(2);
    let mut shapes: Vec<[usize; 3]> = args
        .iter()
        .skip(1)
        .filter_map(|s| {
            let v: Vec<usize> = s.split('x').filter_map(|x| x.parse().ok()).collect();
            (v.len() == 3).then(|| [v[0], v[1], v[2]])
        })
        .collect();
    if shapes.is_empty() {
        shapes = vec![
            [128, 1152, 384],
            [128, 1536, 384],
            [128, 384, 1536],
            [1, 2304, 768],
            [1, 3072, 768],
        ];
    }
    let cpu = CpuArg::host();
    println!(
        "{} ({cpu}), {threads} thread(s): µs per product, three measurements each",
        kiln_runtime::cpu::model_name()
    );
    for [m, n, k] in shapes {
        for (name, kernel) in [
            ("f32", ProductKernel::F32),
            ("int8", ProductKernel::Quantized { bits: 8, group: 0 }),
            ("int4:128", ProductKernel::Quantized { bits: 4, group: 128 }),
        ] {
            let t: Vec<String> = (0..3)
                .map(|_| product_ns(kernel, m, n, k, threads, cpu).map(|ns| format!("{:.1}", ns / 1e3)))
                .collect::<Result<_, _>>()?;
            let gflops = 2.0 * (m * n * k) as f64 / product_ns(kernel, m, n, k, threads, cpu)?;
            println!("  {m}x{n}x{k} {name:<9} {} ({gflops:.0} GFLOP/s)", t.join(" / "));
        }
    }
    Ok(())
}
