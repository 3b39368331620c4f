//! GEMM throughput of the library kiln's matmul steps call, at the shapes that matter for
//! transformer inference. `cargo run --release -p kiln-runtime --example gemm [threads]`.

use std::time::Instant;

fn time(m: usize, k: usize, n: usize, tb: bool, threads: usize) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0f32; m * n];
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let (b_rs, b_cs) = if tb { (1isize, k as isize) } else { (n as isize, 1isize) };
    let run = |c: &mut Vec<f32>| unsafe {
        gemm::gemm::<f32>(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            b_cs,
            b_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    };
    run(&mut c);
    let mut samples = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let mut reps = 0;
        while t.elapsed().as_secs_f64() < 0.05 {
            run(&mut c);
            reps += 1;
        }
        samples.push(2.0 * (m * n * k) as f64 * reps as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
    println!("gemm crate, f32, {threads} thread(s), median GFLOP/s");
    for (m, k, n) in [
        (128, 384, 1536),
        (128, 1536, 384),
        (128, 384, 384),
        (1024, 1024, 1024),
        (512, 384, 1536),
        (128, 32, 128),
    ] {
        println!(
            "  {m}x{k}x{n}: B row-major {:.1}, B transposed {:.1}",
            time(m, k, n, false, threads),
            time(m, k, n, true, threads)
        );
    }
}
