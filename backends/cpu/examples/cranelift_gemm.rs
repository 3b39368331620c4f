//! How fast a GEMM can Cranelift generate? A 4x8 register-tiled f32x4 FMA micro-kernel over an
//! 8-column panel of B (kept in L1), compared with the `gemm` crate kiln's matmul steps call.
//! This is the measurement behind ARCHITECTURE.md's GEMM decision:
//! `cargo run --release -p kiln-cpu --example cranelift_gemm`.

use std::time::Instant;

use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, AbiParam, Function, InstBuilder, MemFlagsData, Signature, UserFuncName};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};

/// `fn(a, b, c, m, n, k)`: C[m×n] = A[m×k] · B[k×n], all row-major; m % 4 == 0, n % 8 == 0.
type GemmFn = unsafe extern "C" fn(*const f32, *const f32, *mut f32, i64, i64, i64);

fn build() -> (memmap2::Mmap, GemmFn) {
    let mut flags = settings::builder();
    flags.set("opt_level", "speed").unwrap();
    flags.set("is_pic", "true").unwrap();
    let isa = cranelift_native::builder()
        .unwrap()
        .finish(settings::Flags::new(flags))
        .unwrap();
    let fma = isa
        .isa_flags()
        .iter()
        .any(|f| f.name == "has_fma" && f.as_bool() == Some(true));
    let mut sig = Signature::new(isa.default_call_conv());
    for _ in 0..6 {
        sig.params.push(AbiParam::new(types::I64));
    }
    let mut func = Function::with_name_signature(UserFuncName::user(0, 0), sig);
    let mut fctx = FunctionBuilderContext::new();
    let mut b = FunctionBuilder::new(&mut func, &mut fctx);
    let mem = MemFlagsData::new().with_notrap();
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let p = b.block_params(entry).to_vec();
    let (a, bm, c, m, n, k) = (p[0], p[1], p[2], p[3], p[4], p[5]);
    let j = b.declare_var(types::I64);
    let i = b.declare_var(types::I64);
    let kk = b.declare_var(types::I64);
    let accs: Vec<_> = (0..8).map(|_| b.declare_var(types::F32X4)).collect();
    let zero = b.ins().iconst(types::I64, 0);
    b.def_var(j, zero);
    let (jh, jb, ih, ib, kh, kb, ke, ie, exit) = (
        b.create_block(),
        b.create_block(),
        b.create_block(),
        b.create_block(),
        b.create_block(),
        b.create_block(),
        b.create_block(),
        b.create_block(),
        b.create_block(),
    );
    b.ins().jump(jh, &[]);
    // for j in (0..n).step_by(8)
    b.switch_to_block(jh);
    let jv = b.use_var(j);
    let go = b.ins().icmp(IntCC::SignedLessThan, jv, n);
    b.ins().brif(go, jb, &[], exit, &[]);
    b.switch_to_block(jb);
    b.def_var(i, zero);
    b.ins().jump(ih, &[]);
    // for i in (0..m).step_by(4)
    b.switch_to_block(ih);
    let iv = b.use_var(i);
    let go = b.ins().icmp(IntCC::SignedLessThan, iv, m);
    b.ins().brif(go, ib, &[], ie, &[]);
    b.switch_to_block(ib);
    let fz = b.ins().f32const(0.0);
    let vz = b.ins().splat(types::F32X4, fz);
    for acc in &accs {
        b.def_var(*acc, vz);
    }
    b.def_var(kk, zero);
    b.ins().jump(kh, &[]);
    // for kk in 0..k: acc[r][h] += A[i+r, kk] * B[kk, j+4h..]
    b.switch_to_block(kh);
    let kv = b.use_var(kk);
    let go = b.ins().icmp(IntCC::SignedLessThan, kv, k);
    b.ins().brif(go, kb, &[], ke, &[]);
    b.switch_to_block(kb);
    let kv = b.use_var(kk);
    let iv = b.use_var(i);
    let jv = b.use_var(j);
    let brow = b.ins().imul(kv, n);
    let bidx = b.ins().iadd(brow, jv);
    let boff = b.ins().imul_imm_s(bidx, 4);
    let baddr = b.ins().iadd(bm, boff);
    let b0 = b.ins().load(types::F32X4, mem, baddr, 0);
    let b1 = b.ins().load(types::F32X4, mem, baddr, 16);
    for r in 0..4 {
        let row = b.ins().iadd_imm_s(iv, r);
        let arow = b.ins().imul(row, k);
        let aidx = b.ins().iadd(arow, kv);
        let aoff = b.ins().imul_imm_s(aidx, 4);
        let aaddr = b.ins().iadd(a, aoff);
        let av = b.ins().load(types::F32, mem, aaddr, 0);
        let avv = b.ins().splat(types::F32X4, av);
        for (h, bv) in [b0, b1].into_iter().enumerate() {
            let var = accs[r as usize * 2 + h];
            let acc = b.use_var(var);
            let na = if fma {
                b.ins().fma(avv, bv, acc)
            } else {
                let t = b.ins().fmul(avv, bv);
                b.ins().fadd(t, acc)
            };
            b.def_var(var, na);
        }
    }
    let next = b.ins().iadd_imm_s(kv, 1);
    b.def_var(kk, next);
    b.ins().jump(kh, &[]);
    // store the 4x8 tile
    b.switch_to_block(ke);
    let iv = b.use_var(i);
    let jv = b.use_var(j);
    for r in 0..4i64 {
        let row = b.ins().iadd_imm_s(iv, r);
        let crow = b.ins().imul(row, n);
        let cidx = b.ins().iadd(crow, jv);
        let coff = b.ins().imul_imm_s(cidx, 4);
        let caddr = b.ins().iadd(c, coff);
        for h in 0..2 {
            let v = b.use_var(accs[r as usize * 2 + h]);
            b.ins().store(mem, v, caddr, (16 * h) as i32);
        }
    }
    let next = b.ins().iadd_imm_s(iv, 4);
    b.def_var(i, next);
    b.ins().jump(ih, &[]);
    b.switch_to_block(ie);
    let jv = b.use_var(j);
    let next = b.ins().iadd_imm_s(jv, 8);
    b.def_var(j, next);
    b.ins().jump(jh, &[]);
    b.switch_to_block(exit);
    b.ins().return_(&[]);
    b.seal_all_blocks();
    b.finalize(isa.frontend_config());
    let mut ctx = Context::for_function(func);
    let code = ctx.compile(&*isa, &mut ControlPlane::default()).unwrap();
    assert!(code.buffer.relocs().is_empty());
    let bytes = code.code_buffer().to_vec();
    let mut map = memmap2::MmapMut::map_anon(bytes.len()).unwrap();
    map.copy_from_slice(&bytes);
    let exec = map.make_exec().unwrap();
    // SAFETY: the buffer holds the function just compiled for this CPU, with the GemmFn ABI.
    let f = unsafe { std::mem::transmute::<*const u8, GemmFn>(exec.as_ptr()) };
    (exec, f)
}

fn gflops(m: usize, k: usize, n: usize, mut run: impl FnMut()) -> f64 {
    run();
    let mut s = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let mut reps = 0;
        while t.elapsed().as_secs_f64() < 0.05 {
            run();
            reps += 1;
        }
        s.push(2.0 * (m * n * k * reps) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

fn main() {
    let (_code, f) = build();
    println!("f32 GEMM, one thread, median GFLOP/s");
    for (m, k, n) in [(128, 384, 1536), (128, 384, 384), (1024, 1024, 1024)] {
        let a: Vec<f32> = (0..m * k).map(|x| (x % 13) as f32 * 0.01).collect();
        let bm: Vec<f32> = (0..k * n).map(|x| (x % 7) as f32 * 0.01).collect();
        let mut c = vec![0f32; m * n];
        let mut c2 = vec![0f32; m * n];
        // SAFETY: shapes match the buffers; m % 4 == 0 and n % 8 == 0.
        let cl = gflops(m, k, n, || unsafe {
            f(a.as_ptr(), bm.as_ptr(), c.as_mut_ptr(), m as i64, n as i64, k as i64)
        });
        let lib = gflops(m, k, n, || unsafe {
            gemm::gemm::<f32>(
                m,
                n,
                k,
                c2.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                bm.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        });
        let err = c.iter().zip(&c2).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        println!("  {m}x{k}x{n}: cranelift 4x8 f32x4 tile {cl:.1}, gemm crate {lib:.1} (max diff {err:.1e})");
    }
}
