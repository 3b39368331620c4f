//! MLIR text for every kernel of a CUDA artifact.
//!
//! Kernels are written in the `gpu`, `scf`, `arith`, `math`, `memref` and `llvm` dialects as MLIR
//! text, parsed by melior and lowered to PTX (`crate::ptx`). Text rather than builder calls: the
//! kernels are templates whose structure is fixed and whose shapes come at run time, the text is
//! what `--dump-mlir` shows and what the snapshot tests read, and `mlir-opt-22` accepts it as is.
//!
//! Every kernel takes bare pointers (`!llvm.ptr`, raw device addresses) and `i64`/`f32` scalars,
//! so the runtime launches it with plain 8- and 4-byte arguments. Element offsets are computed in
//! `i64`; loops are `scf.for` over `i64` with grid strides, so any size runs with any grid.

use std::fmt::Write;

mod flash_tc;
pub use flash_tc::{flash_tc, FT_DIMS, FT_ROWS, FT_THREADS};
mod wgmma;
pub use wgmma::{gemm_wgmma, wgmma_module, WG_BM, WG_BN, WG_SMEM};

use kiln_ir::{BinaryOp, CmpOp, DType, ReduceOp, UnaryOp};
use kiln_plan::plan::{Expr, KernelSpec};
use kiln_runtime::plan::KernelKind;

/// Threads per block of the fused (map, reduce, softmax) kernels.
pub const BLOCK: u32 = 256;
/// GEMM tile: `TILE × TILE` outputs per block of `16 × 16` threads, `TILE_K` deep.
pub const TILE: u32 = 64;
/// GEMM tile depth.
pub const TILE_K: u32 = 16;
/// Largest rank the strided copy kernel walks.
pub const COPY_RANK: usize = 6;

/// The right operand of a generated matrix product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BOperand {
    /// f32 with arbitrary strides.
    F32,
    /// i8 codes `[n, k]`, one f32 scale per output row.
    Int8,
    /// 4-bit codes packed `[n, k/2]` in 32-column blocks, f16 scale and minimum per group.
    Int4,
}

/// Names and emits SSA values.
struct Body {
    text: String,
    next: usize,
    indent: usize,
}

impl Body {
    fn new(indent: usize) -> Body {
        Body {
            text: String::new(),
            next: 0,
            indent,
        }
    }

    fn fresh(&mut self) -> String {
        self.next += 1;
        format!("%v{}", self.next)
    }

    fn line(&mut self, s: &str) {
        for _ in 0..self.indent {
            self.text.push_str("  ");
        }
        self.text.push_str(s);
        self.text.push('\n');
    }

    /// Emits `%x = <rhs>` and returns `%x`.
    fn val(&mut self, rhs: &str) -> String {
        let v = self.fresh();
        self.line(&format!("{v} = {rhs}"));
        v
    }

    fn i64c(&mut self, c: i64) -> String {
        self.val(&format!("arith.constant {c} : i64"))
    }

    fn i32c(&mut self, c: i32) -> String {
        self.val(&format!("arith.constant {c} : i32"))
    }

    fn f32c(&mut self, c: f32) -> String {
        self.val(&format!("arith.constant 0x{:08X} : f32", c.to_bits()))
    }

    fn idx(&mut self, op: &str, dim: &str) -> String {
        let i = self.val(&format!("gpu.{op} {dim}"));
        self.val(&format!("arith.index_cast {i} : index to i64"))
    }

    fn ibin(&mut self, op: &str, a: &str, b: &str) -> String {
        self.val(&format!("arith.{op} {a}, {b} : i64"))
    }

    fn fbin(&mut self, op: &str, a: &str, b: &str) -> String {
        self.val(&format!("arith.{op} {a}, {b} : f32"))
    }

    fn icmp(&mut self, pred: &str, a: &str, b: &str) -> String {
        self.val(&format!("arith.cmpi {pred}, {a}, {b} : i64"))
    }

    fn select(&mut self, c: &str, a: &str, b: &str, ty: &str) -> String {
        self.val(&format!("arith.select {c}, {a}, {b} : {ty}"))
    }

    /// `a cmp b ? a : b` — max/min that keep the CPU backend's NaN behaviour.
    fn pick(&mut self, pred: &str, a: &str, b: &str) -> String {
        let c = self.val(&format!("arith.cmpf {pred}, {a}, {b} : f32"));
        self.select(&c, a, b, "f32")
    }

    fn gep(&mut self, base: &str, i: &str, elem: &str) -> String {
        self.val(&format!(
            "llvm.getelementptr {base}[{i}] : (!llvm.ptr, i64) -> !llvm.ptr, {elem}"
        ))
    }

    fn load(&mut self, base: &str, i: &str, elem: &str) -> String {
        let p = self.gep(base, i, elem);
        self.val(&format!("llvm.load {p} : !llvm.ptr -> {elem}"))
    }

    fn store(&mut self, v: &str, base: &str, i: &str, elem: &str) {
        let p = self.gep(base, i, elem);
        self.line(&format!("llvm.store {v}, {p} : {elem}, !llvm.ptr"));
    }

    /// `buf[row · stride + col] = v` in a workgroup buffer of type `ty`.
    fn shared_store(&mut self, v: &str, buf: &str, (row, stride, col): (&str, &str, &str), ty: &str) {
        let slot = self.ibin("muli", row, stride);
        let slot = self.ibin("addi", &slot, col);
        let si = self.val(&format!("arith.index_cast {slot} : i64 to index"));
        self.line(&format!("memref.store {v}, {buf}[{si}] : {ty}"));
    }

    /// Opens `scf.for %iv = lb to ub step st` with `iters` (name, init, type); returns the
    /// induction variable and the loop-carried names. Close with [`Body::end_for`].
    fn begin_for(
        &mut self,
        lb: &str,
        ub: &str,
        step: &str,
        iters: &[(&str, &str)],
    ) -> (String, Vec<String>, Vec<String>) {
        let iv = self.fresh();
        let res = if iters.is_empty() { String::new() } else { self.fresh() };
        let carried: Vec<String> = iters.iter().map(|_| self.fresh()).collect();
        let results: Vec<String> = (0..iters.len()).map(|i| format!("{res}#{i}")).collect();
        let head = if iters.is_empty() {
            format!("scf.for {iv} = {lb} to {ub} step {step} : i64 {{")
        } else {
            let args: Vec<String> = carried
                .iter()
                .zip(iters)
                .map(|(c, (init, _))| format!("{c} = {init}"))
                .collect();
            let tys: Vec<&str> = iters.iter().map(|(_, t)| *t).collect();
            format!(
                "{res}:{} = scf.for {iv} = {lb} to {ub} step {step} iter_args({}) -> ({}) : i64 {{",
                iters.len(),
                args.join(", "),
                tys.join(", ")
            )
        };
        self.line(&head);
        self.indent += 1;
        (iv, carried, results)
    }

    fn end_for(&mut self, yields: &[(&str, &str)]) {
        if !yields.is_empty() {
            let vs: Vec<&str> = yields.iter().map(|(v, _)| *v).collect();
            let ts: Vec<&str> = yields.iter().map(|(_, t)| *t).collect();
            self.line(&format!("scf.yield {} : {}", vs.join(", "), ts.join(", ")));
        }
        self.indent -= 1;
        self.line("}");
    }

    fn begin_if(&mut self, c: &str) {
        self.line(&format!("scf.if {c} {{"));
        self.indent += 1;
    }

    fn end_if(&mut self) {
        self.indent -= 1;
        self.line("}");
    }

    /// Butterfly reduction across a warp; every lane ends with the result.
    fn warp_reduce(&mut self, v: &str, op: ReduceOp) -> String {
        let width = self.i32c(32);
        let mut v = v.to_string();
        for off in [16, 8, 4, 2, 1] {
            let o = self.i32c(off);
            let s = self.fresh();
            let ok = self.fresh();
            self.line(&format!("{s}, {ok} = gpu.shuffle xor {v}, {o}, {width} : f32"));
            v = self.combine(op, &v, &s);
        }
        v
    }

    fn combine(&mut self, op: ReduceOp, a: &str, b: &str) -> String {
        match op {
            ReduceOp::Sum | ReduceOp::Mean => self.fbin("addf", a, b),
            ReduceOp::Max => self.pick("ogt", a, b),
            ReduceOp::Min => self.pick("olt", a, b),
        }
    }

    /// Reduction across the block (`BLOCK` threads); every thread ends with the result. Uses the
    /// 32-float workgroup buffer `%smem`.
    fn block_reduce(&mut self, v: &str, op: ReduceOp, lane: &str, warp: &str) -> String {
        let w = self.warp_reduce(v, op);
        let zero = self.i64c(0);
        let is0 = self.icmp("eq", lane, &zero);
        self.begin_if(&is0);
        let wi = self.val(&format!("arith.index_cast {warp} : i64 to index"));
        self.line(&format!(
            "memref.store {w}, %smem[{wi}] : memref<32xf32, #gpu.address_space<workgroup>>"
        ));
        self.end_if();
        self.line("gpu.barrier");
        let nw = self.i64c((BLOCK / 32) as i64);
        let has = self.icmp("slt", lane, &nw);
        let li = self.val(&format!("arith.index_cast {lane} : i64 to index"));
        // Lanes past the warp count read slot 0 and replace it with the identity.
        let safe = self.select(&has, &li, "%c0_idx", "index");
        let got = self.val(&format!(
            "memref.load %smem[{safe}] : memref<32xf32, #gpu.address_space<workgroup>>"
        ));
        let id = self.f32c(identity(op));
        let t = self.select(&has, &got, &id, "f32");
        let total = self.warp_reduce(&t, op);
        self.line("gpu.barrier");
        total
    }
}

fn identity(op: ReduceOp) -> f32 {
    match op {
        ReduceOp::Sum | ReduceOp::Mean => 0.0,
        ReduceOp::Max => f32::NEG_INFINITY,
        ReduceOp::Min => f32::INFINITY,
    }
}

/// A `gpu.func` with pointer and scalar parameters.
struct Func {
    name: String,
    params: Vec<(String, &'static str)>,
    smem: Vec<(String, String)>,
    /// Extra function attributes (`nvvm.minctasm = 2 : i32`, say).
    attrs: Vec<String>,
    body: Body,
}

impl Func {
    fn new(name: &str) -> Func {
        Func {
            name: name.to_string(),
            params: Vec::new(),
            smem: Vec::new(),
            attrs: Vec::new(),
            body: Body::new(3),
        }
    }

    fn param(&mut self, name: &str, ty: &'static str) -> String {
        self.params.push((name.to_string(), ty));
        format!("%{name}")
    }

    fn ptr(&mut self, name: &str) -> String {
        self.param(name, "!llvm.ptr")
    }

    fn i64(&mut self, name: &str) -> String {
        self.param(name, "i64")
    }

    fn finish(mut self, out: &mut String) {
        self.body.line("gpu.return");
        let params: Vec<String> = self.params.iter().map(|(n, t)| format!("%{n}: {t}")).collect();
        let wg = if self.smem.is_empty() {
            String::new()
        } else {
            let v: Vec<String> = self.smem.iter().map(|(n, t)| format!("%{n} : {t}")).collect();
            format!(" workgroup({})", v.join(", "))
        };
        let attrs = if self.attrs.is_empty() {
            String::new()
        } else {
            format!(" attributes {{{}}}", self.attrs.join(", "))
        };
        let _ = writeln!(
            out,
            "    gpu.func @{}({}){wg} kernel{attrs} {{",
            self.name,
            params.join(", ")
        );
        out.push_str(&self.body.text);
        out.push_str("    }\n");
    }
}

/// A fused kernel: `(rows, n, offs, in_0 … in_k, out)`, `offs` holding `rows × (k + 2)` i64 element
/// offsets (every operand's row start), as the CPU kernels take them.
///
/// Launch: `Map` — blocks of [`BLOCK`] threads over columns (grid x) and rows (grid y, strided);
/// `ReduceLast` and `SoftmaxLast` — one block of [`BLOCK`] threads per row (grid y, strided).
pub fn fused(spec: &KernelSpec, name: &str, out: &mut String) -> Result<(), String> {
    let mut f = Func::new(name);
    let rows = f.i64("rows");
    let n = f.i64("n");
    let offs = f.ptr("offs");
    let ins: Vec<String> = (0..spec.inputs.len()).map(|i| f.ptr(&format!("in{i}"))).collect();
    let dst = f.ptr("out");
    for (d, _) in &spec.inputs {
        if !matches!(d, DType::F32 | DType::Bool) {
            return Err(format!(
                "kernel `{}` reads {d}, which CUDA kernels do not take",
                spec.name
            ));
        }
    }
    if !matches!(spec.output, DType::F32 | DType::Bool) {
        return Err(format!("kernel `{}` writes {}", spec.name, spec.output));
    }
    let reduce = spec.kind != KernelKind::Map;
    if reduce {
        f.smem
            .push(("smem".into(), "memref<32xf32, #gpu.address_space<workgroup>>".into()));
    }
    let b = &mut f.body;
    let nops = spec.inputs.len() as i64 + 1;
    let tid = b.idx("thread_id", "x");
    let by = b.idx("block_id", "y");
    let gy = b.idx("grid_dim", "y");
    let bx = b.idx("block_id", "x");
    let gx = b.idx("grid_dim", "x");
    b.line("%c0_idx = arith.constant 0 : index");
    let block = b.i64c(BLOCK as i64);
    let nops_c = b.i64c(nops);
    let (r, _, _) = b.begin_for(&by, &rows, &gy, &[]);
    let row_base = b.ibin("muli", &r, &nops_c);
    let mut starts = Vec::new();
    for j in 0..=spec.inputs.len() {
        let jc = b.i64c(j as i64);
        let at = b.ibin("addi", &row_base, &jc);
        starts.push(b.load(&offs, &at, "i64"));
    }
    // Inputs broadcast along the last axis: one value per row, loaded once.
    let mut row_vals: Vec<Option<Val>> = vec![None; spec.inputs.len()];
    for (j, (d, contiguous)) in spec.inputs.iter().enumerate() {
        if !contiguous {
            row_vals[j] = Some(load_elem(b, *d, &ins[j], &starts[j]));
        }
    }
    let eval = |b: &mut Body, c: &str| -> Val {
        exprs(b, spec, &mut |b: &mut Body, j: usize| match &row_vals[j] {
            Some(v) => v.clone(),
            None => {
                let at = b.ibin("addi", &starts[j], c);
                load_elem(b, spec.inputs[j].0, &ins[j], &at)
            }
        })
    };
    let out_start = starts[spec.inputs.len()].clone();
    match spec.kind {
        KernelKind::Map => {
            let bxb = b.ibin("muli", &bx, &block);
            let first = b.ibin("addi", &bxb, &tid);
            let stride = b.ibin("muli", &gx, &block);
            let (c, _, _) = b.begin_for(&first, &n, &stride, &[]);
            let v = eval(b, &c);
            let at = b.ibin("addi", &out_start, &c);
            store_elem(b, &v, &dst, &at);
            b.end_for(&[]);
        }
        KernelKind::ReduceLast | KernelKind::SoftmaxLast => {
            let c32 = b.i64c(32);
            let lane = b.ibin("remui", &tid, &c32);
            let warp = b.ibin("divui", &tid, &c32);
            let sweep = |b: &mut Body, op: ReduceOp, shift: Option<&str>| -> String {
                let init = b.f32c(identity(op));
                let (c, acc, res) = b.begin_for(&tid, &n, &block, &[(&init, "f32")]);
                let mut x = eval(b, &c).f().to_string();
                if let Some(m) = shift {
                    let d = b.fbin("subf", &x, m);
                    x = b.val(&format!("math.exp {d} : f32"));
                    let at = b.ibin("addi", &out_start, &c);
                    b.store(&x, &dst, &at, "f32");
                }
                let next = b.combine(op, &acc[0], &x);
                b.end_for(&[(&next, "f32")]);
                b.block_reduce(&res[0], op, &lane, &warp)
            };
            if spec.kind == KernelKind::ReduceLast {
                let op = spec.reduce.ok_or("reduction kernel without its op")?;
                let mut total = sweep(b, op, None);
                if op == ReduceOp::Mean {
                    let nf = b.val(&format!("arith.sitofp {n} : i64 to f32"));
                    total = b.fbin("divf", &total, &nf);
                }
                let zero = b.i64c(0);
                let first = b.icmp("eq", &tid, &zero);
                b.begin_if(&first);
                b.store(&total, &dst, &out_start, "f32");
                b.end_if();
            } else {
                let max = sweep(b, ReduceOp::Max, None);
                let sum = sweep(b, ReduceOp::Sum, Some(&max));
                let one = b.f32c(1.0);
                let inv = b.fbin("divf", &one, &sum);
                // Each thread rescales the elements it wrote itself: no barrier needed.
                let (c, _, _) = b.begin_for(&tid, &n, &block, &[]);
                let at = b.ibin("addi", &out_start, &c);
                let x = b.load(&dst, &at, "f32");
                let y = b.fbin("mulf", &x, &inv);
                b.store(&y, &dst, &at, "f32");
                b.end_for(&[]);
            }
        }
    }
    b.end_for(&[]);
    f.finish(out);
    Ok(())
}

/// Most rows a matrix–vector kernel (`gemv_*`) takes: decoding's products.
pub const GEMV_ROWS: i64 = 4;
/// Threads per block of the matrix–vector kernels (8 warps).
pub const GEMV_THREADS: u32 = 256;

/// This thread's partial sums `Σ_k a[r, k] · b[k, col]` over `k = start, start + step, …` for rows
/// `r < GEMV_ROWS` (zero past `m`): the row index constants and the sums.
fn gemv_partials(
    b: &mut Body,
    p: &GemmParams,
    bases: &GemmBases,
    col: &str,
    (start, step): (&str, &str),
) -> (Vec<String>, Vec<String>) {
    let zero = b.f32c(0.0);
    let rows: Vec<String> = (0..GEMV_ROWS).map(|r| b.i64c(r)).collect();
    let init: Vec<(&str, &str)> = rows.iter().map(|_| (zero.as_str(), "f32")).collect();
    let (kk, acc, res) = b.begin_for(start, &p.k, step, &init);
    let bv = p.load_operand(b, bases, false, col, &kk);
    let mut next = Vec::new();
    for (r, a) in rows.iter().zip(&acc) {
        let av = p.load_operand(b, bases, true, r, &kk);
        next.push(b.val(&format!("math.fma {av}, {bv}, {a} : f32")));
    }
    let nref: Vec<(&str, &str)> = next.iter().map(|x| (x.as_str(), "f32")).collect();
    b.end_for(&nref);
    (rows, res)
}

/// Matrix–vector product for at most [`GEMV_ROWS`] rows with a right operand stored k-fast (a
/// `[n, k]` weight, and every int8/int4 one): one warp per output column, lanes striding along k
/// (coalesced reads of the weight row), a butterfly sum, lane 0 storing through the GEMM epilogue.
/// Same parameters as [`gemm`]. Launch: grid `(ceil(n / 8), 1, batches)`, blocks of 256.
pub fn gemv(kind: BOperand, name: &str, out: &mut String) {
    let mut f = Func::new(name);
    let p = GemmParams::declare(&mut f, kind);
    let b = &mut f.body;
    b.line("%c0_idx = arith.constant 0 : index");
    let bases = p.bases(b);
    let tid = b.idx("thread_id", "x");
    let bx = b.idx("block_id", "x");
    let c32 = b.i64c(32);
    let lane = b.ibin("remui", &tid, &c32);
    let warp = b.ibin("divui", &tid, &c32);
    let wpb = b.i64c(GEMV_THREADS as i64 / 32);
    let col = b.ibin("muli", &bx, &wpb);
    let col = b.ibin("addi", &col, &warp);
    let (rows, res) = gemv_partials(b, &p, &bases, &col, (&lane, &c32));
    let sums: Vec<String> = res.iter().map(|x| b.warp_reduce(x, ReduceOp::Sum)).collect();
    let z = b.i64c(0);
    let first = b.icmp("eq", &lane, &z);
    b.begin_if(&first);
    for (r, v) in rows.iter().zip(&sums) {
        p.store_output(b, &bases, r, &col, v);
    }
    b.end_if();
    f.finish(out);
}

/// Matrix–vector product for at most [`GEMV_ROWS`] rows with an f32 right operand stored n-fast
/// (a `[k, n]` weight, GPT-2's layout): lane `i` of every warp owns column `32·block + i`
/// (coalesced across the warp), the 8 warps split k between them and their partial sums meet in
/// shared memory. Same parameters as [`gemm`]. Launch: grid `(ceil(n / 32), 1, batches)`, blocks
/// of 256.
pub fn gemv_cols(name: &str, out: &mut String) {
    let warps = GEMV_THREADS as i64 / 32;
    let red_len = warps * GEMV_ROWS * 32;
    let red_ty = format!("memref<{red_len}xf32, #gpu.address_space<workgroup>>");
    let mut f = Func::new(name);
    let p = GemmParams::declare(&mut f, BOperand::F32);
    f.smem.push(("red".into(), red_ty.clone()));
    let b = &mut f.body;
    b.line("%c0_idx = arith.constant 0 : index");
    let bases = p.bases(b);
    let tid = b.idx("thread_id", "x");
    let bx = b.idx("block_id", "x");
    let c32 = b.i64c(32);
    let lane = b.ibin("remui", &tid, &c32);
    let warp = b.ibin("divui", &tid, &c32);
    let col = b.ibin("muli", &bx, &c32);
    let col = b.ibin("addi", &col, &lane);
    let nw = b.i64c(warps);
    let zero = b.f32c(0.0);
    let (rows, res) = gemv_partials(b, &p, &bases, &col, (&warp, &nw));
    // red[(warp · ROWS + r) · 32 + lane] = partial; warp 0 adds them up.
    let nrows = b.i64c(GEMV_ROWS);
    let wr = b.ibin("muli", &warp, &nrows);
    for (r, v) in rows.iter().zip(&res) {
        let slot = b.ibin("addi", &wr, r);
        b.shared_store(v, "%red", (&slot, &c32, &lane), &red_ty);
    }
    b.line("gpu.barrier");
    let z = b.i64c(0);
    let first = b.icmp("eq", &warp, &z);
    b.begin_if(&first);
    for r in &rows {
        let mut sum = zero.clone();
        for w in 0..warps {
            let slot = b.i64c(w * GEMV_ROWS);
            let slot = b.ibin("addi", &slot, r);
            let at = b.ibin("muli", &slot, &c32);
            let at = b.ibin("addi", &at, &lane);
            let at = b.val(&format!("arith.index_cast {at} : i64 to index"));
            let x = b.val(&format!("memref.load %red[{at}] : {red_ty}"));
            sum = b.fbin("addf", &sum, &x);
        }
        p.store_output(b, &bases, r, &col, &sum);
    }
    b.end_if();
    f.finish(out);
}

/// Query rows per block of the fused attention kernel (4 per warp).
pub const FA_ROWS: i64 = 16;
/// Keys per step of the fused attention kernel (one per lane).
pub const FA_KEYS: i64 = 32;
/// Threads per block of the fused attention kernel.
pub const FA_THREADS: u32 = 128;
/// Largest head dimension (of queries/keys and of values) the fused attention kernel takes.
pub const FA_MAX_DIM: i64 = 128;

/// The parameters of the fused attention kernels, in launch order (see [`flash`]): each operand as
/// (pointer, batch, head and position strides).
struct AttnParams {
    sq: String,
    sk: String,
    d: String,
    dv: String,
    h: String,
    q: [String; 4],
    k: [String; 4],
    v: [String; 4],
    o: [String; 4],
    scale: String,
    offs: String,
    ins: Vec<String>,
}

impl AttnParams {
    fn declare(f: &mut Func, spec: &KernelSpec) -> AttnParams {
        let (sq, sk, d, dv, h) = (f.i64("sq"), f.i64("sk"), f.i64("d"), f.i64("dv"), f.i64("h"));
        let operand = |f: &mut Func, n: &str| -> [String; 4] {
            [
                f.ptr(n),
                f.i64(&format!("{n}sb")),
                f.i64(&format!("{n}sh")),
                f.i64(&format!("{n}ss")),
            ]
        };
        let (q, k, v, o) = (operand(f, "q"), operand(f, "k"), operand(f, "v"), operand(f, "o"));
        let scale = f.param("scale", "f32");
        let offs = f.ptr("offs");
        let ins = (0..spec.inputs.len()).map(|i| f.ptr(&format!("in{i}"))).collect();
        AttnParams {
            sq,
            sk,
            d,
            dv,
            h,
            q,
            k,
            v,
            o,
            scale,
            offs,
            ins,
        }
    }

    /// The first element of q, k, v and o for block row `bh` (batch `bh / h`, head `bh % h`).
    fn bases(&self, b: &mut Body, bh: &str) -> [String; 4] {
        let bi = b.ibin("divui", bh, &self.h);
        let hi = b.ibin("remui", bh, &self.h);
        [&self.q, &self.k, &self.v, &self.o].map(|[_, sb, sh, _]| {
            let x = b.ibin("muli", &bi, sb);
            let y = b.ibin("muli", &hi, sh);
            b.ibin("addi", &x, &y)
        })
    }
}

/// Fused attention (FlashAttention-2's schedule on CUDA cores): `out = softmax(prologue(scale ·
/// q kᵀ)) v` without materialising the scores. `spec` is the attention step's softmax kernel;
/// its expressions (mask bias, causal select) are evaluated per score with input `score` standing
/// for the score itself and the others read through the same row offsets table the softmax kernel
/// takes (rows `[b, h, sq]`, columns the keys).
///
/// Parameters: `(sq, sk, d, dv, h, q, qsb, qsh, qss, k, ksb, ksh, kss, v, vsb, vsh, vss, o, osb,
/// osh, oss, scale, offs, in_0 … in_n)`: element strides per batch, head and position (unit along
/// the head dimension), `d, dv <= FA_MAX_DIM`. Launch: grid `(ceil(sq / FA_ROWS), b·h)`, blocks of
/// `FA_THREADS`. Each block stages its `FA_ROWS` query rows in shared memory once, then walks the
/// keys `FA_KEYS` at a time: keys and values staged in shared memory, one key per lane, four query
/// rows per warp; the running maximum, denominator and four output columns per lane (`dv <= 128`)
/// per row are carried through the key loop (online softmax), and each row is divided by its
/// denominator once at the end.
pub fn flash(spec: &KernelSpec, score: usize, name: &str, out: &mut String) -> Result<(), String> {
    if spec.kind != KernelKind::SoftmaxLast || score >= spec.inputs.len() {
        return Err(format!(
            "kernel `{}` is not an attention softmax over input {score}",
            spec.name
        ));
    }
    if spec.output != DType::F32 || spec.inputs[score] != (DType::F32, true) {
        return Err(format!("kernel `{}`: the scores must be contiguous f32", spec.name));
    }
    for (d, _) in &spec.inputs {
        if !matches!(d, DType::F32 | DType::Bool) {
            return Err(format!(
                "kernel `{}` reads {d}, which CUDA kernels do not take",
                spec.name
            ));
        }
    }
    const RPW: i64 = FA_ROWS / (FA_THREADS as i64 / 32);
    const QP: i64 = FA_MAX_DIM + 1;
    let (qs_len, ks_len, vs_len) = (FA_ROWS * QP, FA_KEYS * QP, FA_KEYS * FA_MAX_DIM);
    let qs_ty = format!("memref<{qs_len}xf32, #gpu.address_space<workgroup>>");
    let ks_ty = format!("memref<{ks_len}xf32, #gpu.address_space<workgroup>>");
    let vs_ty = format!("memref<{vs_len}xf32, #gpu.address_space<workgroup>>");
    let mut f = Func::new(name);
    let params = AttnParams::declare(&mut f, spec);
    let AttnParams {
        sq,
        sk,
        d,
        dv,
        q: [q, _, _, qss],
        k: [k, _, _, kss],
        v: [v, _, _, vss],
        o: [o, _, _, oss],
        scale,
        offs,
        ins,
        ..
    } = &params;
    let (sq, sk, d, dv) = (sq.as_str(), sk.as_str(), d.as_str(), dv.as_str());
    f.smem.push(("qs".into(), qs_ty.clone()));
    f.smem.push(("ks".into(), ks_ty.clone()));
    f.smem.push(("vs".into(), vs_ty.clone()));
    let b = &mut f.body;
    b.line("%c0_idx = arith.constant 0 : index");
    let tid = b.idx("thread_id", "x");
    let bx = b.idx("block_id", "x");
    let bh = b.idx("block_id", "y");
    let c32 = b.i64c(32);
    let lane = b.ibin("remui", &tid, &c32);
    let warp = b.ibin("divui", &tid, &c32);
    let zero = b.i64c(0);
    let one = b.i64c(1);
    let nthreads = b.i64c(FA_THREADS as i64);
    let qp = b.i64c(QP);
    let vp = b.i64c(FA_MAX_DIM);
    let fzero = b.f32c(0.0);
    let ninf = b.f32c(f32::NEG_INFINITY);
    // This block's first query row; each operand's base element.
    let [qb, kb, vb, ob] = params.bases(b, &bh);
    let rows_c = b.i64c(FA_ROWS);
    let row0 = b.ibin("muli", &bx, &rows_c);
    // Stage the query rows: qs[r · QP + c] (zeros past sq).
    let qn = b.ibin("muli", &rows_c, d);
    let (i, _, _) = b.begin_for(&tid, &qn, &nthreads, &[]);
    let r = b.ibin("divui", &i, d);
    let c = b.ibin("remui", &i, d);
    let row = b.ibin("addi", &row0, &r);
    let ok = b.icmp("slt", &row, sq);
    let x = guarded_load(b, &ok, |b| {
        let at = b.ibin("muli", &row, qss);
        let at = b.ibin("addi", &at, &c);
        let at = b.ibin("addi", &at, &qb);
        b.load(q, &at, "f32")
    });
    b.shared_store(&x, "%qs", (&r, &qp, &c), &qs_ty);
    b.end_for(&[]);
    // The key loop: per row the running maximum, denominator and four output columns.
    let keys = b.i64c(FA_KEYS);
    let per_row = 2 + 4;
    let mut init: Vec<(String, &str)> = Vec::new();
    for _ in 0..RPW {
        init.push((ninf.clone(), "f32"));
        for _ in 0..5 {
            init.push((fzero.clone(), "f32"));
        }
    }
    let init_ref: Vec<(&str, &str)> = init.iter().map(|(a, t)| (a.as_str(), *t)).collect();
    let (t0, carried, results) = b.begin_for(&zero, sk, &keys, &init_ref);
    b.line("gpu.barrier");
    // Stage this step's keys and values (zeros past sk).
    for (src, sbase, sstride, width, buf, ty, pitch) in [
        (&k, &kb, &kss, d, "%ks", &ks_ty, &qp),
        (&v, &vb, &vss, dv, "%vs", &vs_ty, &vp),
    ] {
        let n = b.ibin("muli", &keys, width);
        let (i, _, _) = b.begin_for(&tid, &n, &nthreads, &[]);
        let j = b.ibin("divui", &i, width);
        let c = b.ibin("remui", &i, width);
        let key = b.ibin("addi", &t0, &j);
        let ok = b.icmp("slt", &key, sk);
        let x = guarded_load(b, &ok, |b| {
            let at = b.ibin("muli", &key, sstride);
            let at = b.ibin("addi", &at, &c);
            let at = b.ibin("addi", &at, sbase);
            b.load(src, &at, "f32")
        });
        b.shared_store(&x, buf, (&j, pitch, &c), ty);
        b.end_for(&[]);
    }
    b.line("gpu.barrier");
    let key = b.ibin("addi", &t0, &lane);
    let key_ok = b.icmp("slt", &key, sk);
    let nops = b.i64c(spec.inputs.len() as i64 + 1);
    let width = b.i32c(32);
    let mut next: Vec<String> = Vec::new();
    for rr in 0..RPW {
        let st = &carried[rr as usize * per_row..(rr as usize + 1) * per_row];
        let rw = b.i64c(rr);
        let wr = b.i64c(RPW);
        let lr = b.ibin("muli", &warp, &wr);
        let lr = b.ibin("addi", &lr, &rw);
        let row = b.ibin("addi", &row0, &lr);
        let row_ok = b.icmp("slt", &row, sq);
        // s = scale · q[row] · k[key]
        let (c, acc, dot) = b.begin_for(&zero, d, &one, &[(&fzero, "f32")]);
        let qi = b.ibin("muli", &lr, &qp);
        let qi = b.ibin("addi", &qi, &c);
        let qi = b.val(&format!("arith.index_cast {qi} : i64 to index"));
        let qv = b.val(&format!("memref.load %qs[{qi}] : {qs_ty}"));
        let ki = b.ibin("muli", &lane, &qp);
        let ki = b.ibin("addi", &ki, &c);
        let ki = b.val(&format!("arith.index_cast {ki} : i64 to index"));
        let kv = b.val(&format!("memref.load %ks[{ki}] : {ks_ty}"));
        let fma = b.val(&format!("math.fma {qv}, {kv}, {} : f32", acc[0]));
        b.end_for(&[(&fma, "f32")]);
        let s = b.fbin("mulf", &dot[0], scale);
        // The softmax kernel's prologue on this score (-inf past the keys and rows).
        let both = b.val(&format!("arith.andi {key_ok}, {row_ok} : i1"));
        let xr = b.fresh();
        b.line(&format!("{xr} = scf.if {both} -> (f32) {{"));
        b.indent += 1;
        let grow = b.ibin("muli", &bh, sq);
        let grow = b.ibin("addi", &grow, &row);
        let trow = b.ibin("muli", &grow, &nops);
        let x = exprs(b, spec, &mut |b: &mut Body, j: usize| {
            if j == score {
                return Val::F(s.clone());
            }
            let jc = b.i64c(j as i64);
            let at = b.ibin("addi", &trow, &jc);
            let start = b.load(offs, &at, "i64");
            let at = if spec.inputs[j].1 {
                b.ibin("addi", &start, &key)
            } else {
                start
            };
            load_elem(b, spec.inputs[j].0, &ins[j], &at)
        });
        b.line(&format!("scf.yield {} : f32", x.f()));
        b.indent -= 1;
        b.line("} else {");
        b.indent += 1;
        b.line(&format!("scf.yield {ninf} : f32"));
        b.indent -= 1;
        b.line("}");
        // Online softmax: the new maximum, the old terms' rescale, this step's terms.
        let (m_old, l_old) = (&st[0], &st[1]);
        let tmax = b.warp_reduce(&xr, ReduceOp::Max);
        let m_new = b.pick("ogt", m_old, &tmax);
        let dead = b.val(&format!("arith.cmpf oeq, {m_new}, {ninf} : f32"));
        let m_use = b.select(&dead, &fzero, &m_new, "f32");
        let dx = b.fbin("subf", &xr, &m_use);
        let p = b.val(&format!("math.exp {dx} : f32"));
        let dm = b.fbin("subf", m_old, &m_use);
        let alpha = b.val(&format!("math.exp {dm} : f32"));
        let psum = b.warp_reduce(&p, ReduceOp::Sum);
        let l_new = b.val(&format!("math.fma {l_old}, {alpha}, {psum} : f32"));
        let scaled: Vec<String> = (0..4).map(|u| b.fbin("mulf", &st[2 + u], &alpha)).collect();
        let sref: Vec<(&str, &str)> = scaled.iter().map(|x| (x.as_str(), "f32")).collect();
        // o[u] += Σ_j p_j · v[j][lane + 32u]: p_j from lane j.
        let (j, acc, o_new) = b.begin_for(&zero, &keys, &one, &sref);
        let j32 = b.val(&format!("arith.trunci {j} : i64 to i32"));
        let pj = b.fresh();
        let okj = b.fresh();
        b.line(&format!("{pj}, {okj} = gpu.shuffle idx {p}, {j32}, {width} : f32"));
        let vrow = b.ibin("muli", &j, &vp);
        let mut sums = Vec::new();
        for u in 0..4 {
            let cu = b.i64c(32 * u);
            let col = b.ibin("addi", &lane, &cu);
            let vi = b.ibin("addi", &vrow, &col);
            let vi = b.val(&format!("arith.index_cast {vi} : i64 to index"));
            let vv = b.val(&format!("memref.load %vs[{vi}] : {vs_ty}"));
            sums.push(b.val(&format!("math.fma {pj}, {vv}, {} : f32", acc[u as usize])));
        }
        let yref: Vec<(&str, &str)> = sums.iter().map(|x| (x.as_str(), "f32")).collect();
        b.end_for(&yref);
        next.push(m_new);
        next.push(l_new);
        next.extend(o_new);
    }
    let nref: Vec<(&str, &str)> = next.iter().map(|x| (x.as_str(), "f32")).collect();
    b.end_for(&nref);
    // out[row][lane + 32u] = o[u] / l
    for rr in 0..RPW {
        let st = &results[rr as usize * per_row..(rr as usize + 1) * per_row];
        let rw = b.i64c(rr);
        let wr = b.i64c(RPW);
        let lr = b.ibin("muli", &warp, &wr);
        let lr = b.ibin("addi", &lr, &rw);
        let row = b.ibin("addi", &row0, &lr);
        let row_ok = b.icmp("slt", &row, sq);
        b.begin_if(&row_ok);
        let fone = b.f32c(1.0);
        let inv = b.fbin("divf", &fone, &st[1]);
        let orow = b.ibin("muli", &row, oss);
        let orow = b.ibin("addi", &orow, &ob);
        for u in 0..4 {
            let cu = b.i64c(32 * u);
            let col = b.ibin("addi", &lane, &cu);
            let col_ok = b.icmp("slt", &col, dv);
            b.begin_if(&col_ok);
            let y = b.fbin("mulf", &st[2 + u as usize], &inv);
            let at = b.ibin("addi", &orow, &col);
            b.store(&y, o, &at, "f32");
            b.end_if();
        }
        b.end_if();
    }
    f.finish(out);
    Ok(())
}

/// A kernel's expressions, inputs read through `input`; returns the last.
fn exprs(b: &mut Body, spec: &KernelSpec, input: &mut dyn FnMut(&mut Body, usize) -> Val) -> Val {
    let mut vals: Vec<Val> = Vec::with_capacity(spec.exprs.len());
    for e in &spec.exprs {
        let v = match e {
            Expr::Input(j) => input(b, *j),
            Expr::Const(x) => Val::F(b.f32c(*x)),
            Expr::Unary(u, a) => Val::F(unary(b, *u, vals[*a].f())),
            Expr::Binary(op, a, x) => Val::F(binary(b, *op, vals[*a].f(), vals[*x].f())),
            Expr::Compare(cc, a, x) => {
                let p = match cc {
                    CmpOp::Eq => "oeq",
                    CmpOp::Ne => "une",
                    CmpOp::Lt => "olt",
                    CmpOp::Le => "ole",
                    CmpOp::Gt => "ogt",
                    CmpOp::Ge => "oge",
                };
                Val::C(b.val(&format!("arith.cmpf {p}, {}, {} : f32", vals[*a].f(), vals[*x].f())))
            }
            Expr::Where(c, a, x) => {
                let Val::C(c) = &vals[*c] else {
                    unreachable!("where conditions are conditions")
                };
                Val::F(b.select(c, vals[*a].f(), vals[*x].f(), "f32"))
            }
        };
        vals.push(v);
    }
    vals.pop().expect("kernels have at least one expression")
}

#[derive(Clone)]
enum Val {
    F(String),
    C(String),
}

impl Val {
    fn f(&self) -> &str {
        match self {
            Val::F(v) => v,
            Val::C(_) => unreachable!("conditions are only used by where"),
        }
    }
}

fn load_elem(b: &mut Body, d: DType, base: &str, at: &str) -> Val {
    match d {
        DType::Bool => {
            let raw = b.load(base, at, "i8");
            let z = b.val("arith.constant 0 : i8");
            Val::C(b.val(&format!("arith.cmpi ne, {raw}, {z} : i8")))
        }
        _ => Val::F(b.load(base, at, "f32")),
    }
}

fn store_elem(b: &mut Body, v: &Val, base: &str, at: &str) {
    match v {
        Val::F(x) => b.store(x, base, at, "f32"),
        Val::C(c) => {
            let x = b.val(&format!("arith.extui {c} : i1 to i8"));
            b.store(&x, base, at, "i8");
        }
    }
}

fn unary(b: &mut Body, u: UnaryOp, x: &str) -> String {
    match u {
        UnaryOp::Neg => b.val(&format!("arith.negf {x} : f32")),
        UnaryOp::Abs => b.val(&format!("math.absf {x} : f32")),
        UnaryOp::Exp => b.val(&format!("math.exp {x} : f32")),
        UnaryOp::Sqrt => b.val(&format!("math.sqrt {x} : f32")),
        UnaryOp::Rsqrt => {
            let s = b.val(&format!("math.sqrt {x} : f32"));
            let one = b.f32c(1.0);
            b.fbin("divf", &one, &s)
        }
        UnaryOp::Tanh => b.val(&format!("math.tanh {x} : f32")),
        UnaryOp::Erf => b.val(&format!("math.erf {x} : f32")),
        UnaryOp::Sigmoid => {
            let nx = b.val(&format!("arith.negf {x} : f32"));
            let e = b.val(&format!("math.exp {nx} : f32"));
            let one = b.f32c(1.0);
            let d = b.fbin("addf", &one, &e);
            b.fbin("divf", &one, &d)
        }
        UnaryOp::Relu => {
            let z = b.f32c(0.0);
            b.pick("ogt", x, &z)
        }
        UnaryOp::Recip => {
            let one = b.f32c(1.0);
            b.fbin("divf", &one, x)
        }
        UnaryOp::Log => b.val(&format!("math.log {x} : f32")),
        UnaryOp::Sin => b.val(&format!("math.sin {x} : f32")),
        UnaryOp::Cos => b.val(&format!("math.cos {x} : f32")),
        UnaryOp::Not => unreachable!("not is not fused over f32"),
    }
}

fn binary(b: &mut Body, op: BinaryOp, x: &str, y: &str) -> String {
    match op {
        BinaryOp::Add => b.fbin("addf", x, y),
        BinaryOp::Sub => b.fbin("subf", x, y),
        BinaryOp::Mul => b.fbin("mulf", x, y),
        BinaryOp::Div => b.fbin("divf", x, y),
        BinaryOp::Max => b.pick("ogt", x, y),
        BinaryOp::Min => b.pick("olt", x, y),
        BinaryOp::Pow => b.val(&format!("math.powf {x}, {y} : f32")),
    }
}

/// `if c { load } else { 0 }` as a value.
fn guarded_load(b: &mut Body, c: &str, load: impl FnOnce(&mut Body) -> String) -> String {
    guarded(b, c, "f32", load, |b| b.f32c(0.0))
}

/// `if c { then } else { other }` as a value of type `ty` (each branch emitted in its region).
fn guarded(
    b: &mut Body,
    c: &str,
    ty: &str,
    then: impl FnOnce(&mut Body) -> String,
    other: impl FnOnce(&mut Body) -> String,
) -> String {
    let r = b.fresh();
    b.line(&format!("{r} = scf.if {c} -> ({ty}) {{"));
    b.indent += 1;
    let v = then(b);
    b.line(&format!("scf.yield {v} : {ty}"));
    b.indent -= 1;
    b.line("} else {");
    b.indent += 1;
    let z = other(b);
    b.line(&format!("scf.yield {z} : {ty}"));
    b.indent -= 1;
    b.line("}");
    r
}

fn f16_to_f32(b: &mut Body, base: &str, at: &str) -> String {
    let raw = b.load(base, at, "i16");
    let h = b.val(&format!("arith.bitcast {raw} : i16 to f16"));
    b.val(&format!("arith.extf {h} : f16 to f32"))
}

/// Batched matrix product with strides and the plan's epilogue:
/// `c[z1, z2, m, n] = acc + bias[n] + scale · Σ_k a[z1, z2, m, k] · b[z1, z2, k, n]`.
///
/// Parameters: `m, n, k, zb` (the grid's z runs over `z1 · zb + z2`), `a, sa1, sa2, sam, sak`, the
/// right operand (`F32`: `b, sb1, sb2, sbk, sbn`; `Int8`: `codes [n, k], scales [n]`; `Int4`:
/// `codes [n, k/2], scales, mins [n, k/group] f16, group`), `c, sc1, sc2, scm`, `scale: f32`,
/// `bias, has_bias`, `acc, sacc1, sacc2, saccm, has_acc`. All strides are in elements; `c`'s
/// columns are contiguous.
///
/// Launch: blocks of 256 threads in one dimension (the kernel reads `thread_id.x` only), grid
/// `(⌈n / 64⌉, ⌈m / 64⌉, z1 · zb)`. Each block computes a 64 × 64 tile through shared memory, 16
/// columns of `k` at a time; each thread a 4 × 4 set of outputs strided by 16 (conflict-free shared
/// reads, coalesced stores).
pub fn gemm(kind: BOperand, name: &str, out: &mut String) {
    let mut f = Func::new(name);
    let p = GemmParams::declare(&mut f, kind);
    let lds = format!("memref<{}xf32, #gpu.address_space<workgroup>>", TILE_K * (TILE + 1));
    f.smem.push(("as".into(), lds.clone()));
    f.smem.push(("bs".into(), lds.clone()));
    let b = &mut f.body;
    let tid = b.idx("thread_id", "x");
    let bx = b.idx("block_id", "x");
    let by = b.idx("block_id", "y");
    let (c16, c64, c65) = (b.i64c(16), b.i64c(TILE as i64), b.i64c(TILE as i64 + 1));
    let zero = b.i64c(0);
    let tx = b.ibin("remui", &tid, &c16);
    let ty = b.ibin("divui", &tid, &c16);
    let n0 = b.ibin("muli", &bx, &c64);
    let m0 = b.ibin("muli", &by, &c64);
    let bases = p.bases(b);
    let fzero = b.f32c(0.0);
    let inits: Vec<(&str, &str)> = (0..16).map(|_| (fzero.as_str(), "f32")).collect();
    let (k0, accs, results) = b.begin_for(&zero, &p.k, &c16, &inits);
    // Stage the tiles: 1024 elements of each operand, four per thread, the coalesced way round.
    for l in 0..4 {
        let off = b.i64c(256 * l);
        let e = b.ibin("addi", &tid, &off);
        for is_a in [true, false] {
            let kfast = if is_a { &bases.a_kfast } else { &bases.b_kfast };
            let (oo, kk) = stage_slot(b, &e, kfast, &c16, &c64);
            let gk = b.ibin("addi", &k0, &kk);
            let go = b.ibin("addi", if is_a { &m0 } else { &n0 }, &oo);
            let v = p.load_operand(b, &bases, is_a, &go, &gk);
            b.shared_store(&v, if is_a { "%as" } else { "%bs" }, (&kk, &c65, &oo), &lds);
        }
    }
    b.line("gpu.barrier");
    let mut acc_now: Vec<String> = accs.clone();
    for kk in 0..TILE_K as i64 {
        let row = b.i64c(kk * (TILE as i64 + 1));
        let mut av = Vec::new();
        let mut bv = Vec::new();
        for i in 0..4 {
            let d = b.i64c(16 * i);
            let ai = b.ibin("addi", &ty, &d);
            let ai = b.ibin("addi", &row, &ai);
            let ai = b.val(&format!("arith.index_cast {ai} : i64 to index"));
            av.push(b.val(&format!("memref.load %as[{ai}] : {lds}")));
            let bi = b.ibin("addi", &tx, &d);
            let bi = b.ibin("addi", &row, &bi);
            let bi = b.val(&format!("arith.index_cast {bi} : i64 to index"));
            bv.push(b.val(&format!("memref.load %bs[{bi}] : {lds}")));
        }
        for i in 0..4 {
            for j in 0..4 {
                let cur = acc_now[i * 4 + j].clone();
                acc_now[i * 4 + j] = b.val(&format!("math.fma {}, {}, {cur} : f32", av[i], bv[j]));
            }
        }
    }
    b.line("gpu.barrier");
    let ys: Vec<(&str, &str)> = acc_now.iter().map(|v| (v.as_str(), "f32")).collect();
    b.end_for(&ys);
    for i in 0..4 {
        for j in 0..4 {
            let (di, dj) = (b.i64c(16 * i), b.i64c(16 * j));
            let r = b.ibin("addi", &ty, &di);
            let r = b.ibin("addi", &m0, &r);
            let col = b.ibin("addi", &tx, &dj);
            let col = b.ibin("addi", &n0, &col);
            p.store_output(b, &bases, &r, &col, &results[(i * 4 + j) as usize]);
        }
    }
    f.finish(out);
}

/// Tensor-core GEMM tile: `TC_TILE × TC_TILE` outputs per block of [`TC_THREADS`] threads.
pub const TC_TILE: u32 = 128;
/// Threads per tensor-core GEMM block (8 warps).
pub const TC_THREADS: u32 = 256;
/// Depth of one staged tile of the tensor-core GEMM.
const TC_K: i64 = 32;
/// Shared-memory row stride in 32-bit words (16 bf16 pairs + 4 words of padding), so that the
/// fragment reads of a warp (8 rows × 4 words) hit 32 different banks.
const TC_ROW_WORDS: i64 = 20;

/// `gemm_tc_{f32,i8,i4}`: the same parameters and result as [`gemm`] (any strides, batches,
/// scale, bias, accumulator), computed on tensor cores: operands are rounded to bf16 as they are
/// staged (f32's range, 8 bits of precision) and multiplied with `mma.sync.m16n8k16` (`nvvm.mma.sync`)
/// into f32 accumulators.
///
/// Launch: blocks of [`TC_THREADS`] threads, grid `(⌈n / 128⌉, ⌈m / 128⌉, z1 · zb)`. Each block
/// stages 128 × 32 slices of both operands in shared memory as bf16 pairs (two consecutive `k` in
/// one word, rows padded to [`TC_ROW_WORDS`]); warp `w` computes rows `64 (w / 4)…+64` and columns
/// `32 (w % 4)…+32` as 4 × 4 tiles of 16 × 8, with the PTX fragment layouts: lane `l` holds rows
/// `l / 4` and `l / 4 + 8`, column pairs `2 (l % 4)` of A and C, and column `l / 4` of B.
pub fn gemm_tc(kind: BOperand, name: &str, out: &mut String) {
    let mut f = Func::new(name);
    let p = GemmParams::declare(&mut f, kind);
    let words = TC_TILE as i64 * TC_ROW_WORDS;
    let lds = format!("memref<{words}xi32, #gpu.address_space<workgroup>>");
    f.smem.push(("as".into(), lds.clone()));
    f.smem.push(("bs".into(), lds.clone()));
    let b = &mut f.body;
    let tid = b.idx("thread_id", "x");
    let bx = b.idx("block_id", "x");
    let by = b.idx("block_id", "y");
    let (c2, c4, c16, c32) = (b.i64c(2), b.i64c(4), b.i64c(16), b.i64c(32));
    let (ctile, cdepth, crow) = (b.i64c(TC_TILE as i64), b.i64c(TC_K), b.i64c(TC_ROW_WORDS));
    let zero = b.i64c(0);
    let lane = b.ibin("remui", &tid, &c32);
    let warp = b.ibin("divui", &tid, &c32);
    let g = b.ibin("divui", &lane, &c4);
    let t = b.ibin("remui", &lane, &c4);
    let wm = b.ibin("divui", &warp, &c4);
    let wn = b.ibin("remui", &warp, &c4);
    let n0 = b.ibin("muli", &bx, &ctile);
    let m0 = b.ibin("muli", &by, &ctile);
    let bases = p.bases(b);
    // Word offsets (within a staged slice) of this lane's fragments, independent of k.
    let frag = |b: &mut Body, first_row: &str, i: i64| -> String {
        let r = b.i64c(i);
        let r = b.ibin("addi", first_row, &r);
        let r = b.ibin("addi", &r, &g);
        let w = b.ibin("muli", &r, &crow);
        b.ibin("addi", &w, &t)
    };
    let (c64, c32w) = (b.i64c(64), b.i64c(32));
    let a_row0 = b.ibin("muli", &wm, &c64);
    let b_row0 = b.ibin("muli", &wn, &c32w);
    let a_off: Vec<String> = (0..4).map(|mi| frag(b, &a_row0, 16 * mi)).collect();
    let b_off: Vec<String> = (0..4).map(|ni| frag(b, &b_row0, 8 * ni)).collect();
    let fzero = b.f32c(0.0);
    let inits: Vec<(&str, &str)> = (0..64).map(|_| (fzero.as_str(), "f32")).collect();
    let (k0, accs, results) = b.begin_for(&zero, &p.k, &cdepth, &inits);
    // Stage: 128 rows × 16 pairs of each operand, eight pairs per thread; consecutive threads walk
    // whichever of (row, k) is contiguous in memory.
    for l in 0..8 {
        let off = b.i64c(TC_THREADS as i64 * l);
        let e = b.ibin("addi", &tid, &off);
        for is_a in [true, false] {
            let kfast = if is_a { &bases.a_kfast } else { &bases.b_kfast };
            let (row, kw) = stage_slot(b, &e, kfast, &c16, &ctile);
            let go = b.ibin("addi", if is_a { &m0 } else { &n0 }, &row);
            let kk = b.ibin("muli", &kw, &c2);
            let gk = b.ibin("addi", &k0, &kk);
            let lo = p.load_operand(b, &bases, is_a, &go, &gk);
            let one = b.i64c(1);
            let gk1 = b.ibin("addi", &gk, &one);
            let hi = p.load_operand(b, &bases, is_a, &go, &gk1);
            let word = pack_bf16(b, &lo, &hi);
            b.shared_store(&word, if is_a { "%as" } else { "%bs" }, (&row, &crow, &kw), &lds);
        }
    }
    b.line("gpu.barrier");
    let mut acc_now: Vec<String> = accs.clone();
    let eight_rows = b.i64c(8 * TC_ROW_WORDS);
    for ks in 0..TC_K / 16 {
        let kw0 = b.i64c(ks * 8);
        let read = |b: &mut Body, buf: &str, at: &str, plus: &str| -> String {
            let i = b.ibin("addi", at, &kw0);
            let i = b.ibin("addi", &i, plus);
            let i = b.val(&format!("arith.index_cast {i} : i64 to index"));
            b.val(&format!("memref.load {buf}[{i}] : {lds}"))
        };
        let mut af = Vec::new();
        for o in &a_off {
            let r8 = b.ibin("addi", o, &eight_rows);
            af.push([
                read(b, "%as", o, &zero),
                read(b, "%as", &r8, &zero),
                read(b, "%as", o, &c4),
                read(b, "%as", &r8, &c4),
            ]);
        }
        let bf: Vec<[String; 2]> = b_off
            .iter()
            .map(|o| [read(b, "%bs", o, &zero), read(b, "%bs", o, &c4)])
            .collect();
        for (mi, a) in af.iter().enumerate() {
            for (ni, bb) in bf.iter().enumerate() {
                let at = (mi * 4 + ni) * 4;
                let d = mma_bf16(b, a, bb, &acc_now[at..at + 4]);
                acc_now[at..at + 4].clone_from_slice(&d);
            }
        }
    }
    b.line("gpu.barrier");
    let ys: Vec<(&str, &str)> = acc_now.iter().map(|v| (v.as_str(), "f32")).collect();
    b.end_for(&ys);
    // Accumulator q of tile (mi, ni): row g + 8 (q / 2), column 2 t + q % 2.
    let r0 = b.ibin("addi", &m0, &a_row0);
    let r0 = b.ibin("addi", &r0, &g);
    let t2 = b.ibin("muli", &t, &c2);
    let col0 = b.ibin("addi", &n0, &b_row0);
    let col0 = b.ibin("addi", &col0, &t2);
    store_warp_tile(b, &p, &bases, (&r0, &col0), &results);
    f.finish(out);
}

/// Depth of one stage of [`gemm_bf16`].
const BF_K: i64 = 32;
/// Stages of [`gemm_bf16`]'s copy pipeline: tile `t + 2` is in flight while tile `t` is multiplied.
const BF_STAGES: i64 = 3;
/// Bytes of one operand's slice in one stage: 128 rows of 32 bf16 (64 bytes, four 16-byte chunks).
const BF_SLICE: i64 = TC_TILE as i64 * BF_K * 2;

/// `gemm_bf16`: [`gemm_tc`] for operands already in bf16 (the runtime converts activations with
/// [`to_bf16`] and keeps a bf16 copy of each weight), with the copies off the critical path. The
/// parameters are [`gemm`]'s (`BOperand::F32` order) with `a` and `b` pointing at bf16 data and
/// these requirements, which the runtime guarantees: both operands are `k`-contiguous (`sak` and
/// `sbk` are ignored and taken as 1), `k`, the row pitches `sam`, `sbn` and the batch strides are
/// multiples of 8 elements, and `a`, `b` are 16-byte aligned (so every 8-element chunk is one
/// aligned 16-byte copy, and chunks past `k` are zero because the copies are zero-padded).
///
/// Launch as [`gemm_tc`]: blocks of [`TC_THREADS`], grid `(⌈n / 128⌉, ⌈m / 128⌉, z1 · zb)`. Each
/// block runs a [`BF_STAGES`]-stage `cp.async` pipeline over 128 × 32 slices of both operands (48 KB of
/// shared memory; rows out of range and chunks past `k` are zero-filled by the copy itself); each
/// warp reads its fragments with `ldmatrix.x4` and multiplies them with `mma.sync.m16n8k16` into a
/// 64 × 32 block of f32 accumulators (warp `w`: rows `64 (w / 4)`, columns `32 (w % 4)`). A slice
/// row is four 16-byte chunks, stored at chunk `c ^ ((row / 2) % 4)` so that the eight row
/// addresses of an `ldmatrix` phase fall in eight different bank groups.
pub fn gemm_bf16(name: &str, out: &mut String) {
    bf16_pipeline(name, out)
}

fn bf16_pipeline(name: &str, out: &mut String) {
    let mut f = Func::new(name);
    let p = GemmParams::declare(&mut f, BOperand::F32);
    let words = BF_STAGES * 2 * BF_SLICE / 4;
    let lds = format!("memref<{words}xi32, #gpu.address_space<workgroup>>");
    f.smem.push(("sm".into(), format!("{lds} {{llvm.align = 16 : i64}}")));
    // Two blocks per SM: at most 128 registers a thread.
    f.attrs.push(format!("nvvm.maxntid = array<i32: {TC_THREADS}, 1, 1>"));
    f.attrs.push("nvvm.minctasm = 2 : i32".into());
    let (sbn, pb) = (p.bops[4].clone(), p.bops[0].clone());
    let b = &mut f.body;
    let tid = b.idx("thread_id", "x");
    let bx = b.idx("block_id", "x");
    let by = b.idx("block_id", "y");
    let (c1, c2, c3, c4, c8, c16) = (b.i64c(1), b.i64c(2), b.i64c(3), b.i64c(4), b.i64c(8), b.i64c(16));
    let (c32, c64) = (b.i64c(32), b.i64c(64));
    let ctile = b.i64c(TC_TILE as i64);
    let zero = b.i64c(0);
    let lane = b.ibin("remui", &tid, &c32);
    let warp = b.ibin("divui", &tid, &c32);
    let wm = b.ibin("divui", &warp, &c4);
    let wn = b.ibin("remui", &warp, &c4);
    let n0 = b.ibin("muli", &bx, &ctile);
    let m0 = b.ibin("muli", &by, &ctile);
    let bases = p.bases(b);
    let base = b.val(&format!("memref.extract_aligned_pointer_as_index %sm : {lds} -> index"));
    let sbase = b.val(&format!("arith.index_cast {base} : index to i64"));
    // The byte offset of chunk `c` of slice row `row`.
    let swizzled = |b: &mut Body, row: &str, c: &str| -> String {
        let x = b.ibin("shrui", row, &c1);
        let x = b.ibin("andi", &x, &c3);
        let c = b.ibin("xori", c, &x);
        let c = b.ibin("muli", &c, &c16);
        let r = b.ibin("muli", row, &c64);
        b.ibin("addi", &r, &c)
    };
    // This thread's copies: chunks `tid` and `tid + 256` of each operand's slice: rows `tid / 4`
    // and `tid / 4 + 64`, chunk `tid % 4`, at the same swizzled position 4096 bytes apart (the
    // swizzle depends on row / 2 % 4 only); B's slice follows A's.
    let row = b.ibin("divui", &tid, &c4);
    let c = b.ibin("remui", &tid, &c4);
    let kc = b.ibin("muli", &c, &c8);
    let dst0 = swizzled(b, &row, &c);
    let half_rows = b.i64c(TC_TILE as i64 / 2);
    // (operand pointer, element offset of row `row`, pitch, rows present) per operand.
    let ops: Vec<(String, String, String, String)> = [true, false]
        .iter()
        .map(|&is_a| {
            let g = b.ibin("addi", if is_a { &m0 } else { &n0 }, &row);
            let pitch = if is_a { p.sam.clone() } else { sbn.clone() };
            let at = b.ibin("muli", &g, &pitch);
            let at = b.ibin("addi", &at, if is_a { &bases.a } else { &bases.b });
            let lim = if is_a { &p.m } else { &p.n };
            let left = b.ibin("subi", lim, &g);
            (if is_a { p.a.clone() } else { pb.clone() }, at, pitch, left)
        })
        .collect();
    let stage_bytes = b.i64c(2 * BF_SLICE);
    // Issues the copies of k-tile `kt` into stage `stage`.
    let issue = |b: &mut Body, kt: &str, stage: &str| {
        let k0 = b.ibin("muli", kt, &c32);
        let gk = b.ibin("addi", &k0, &kc);
        let in_k = b.icmp("slt", &gk, &p.k);
        let sb = b.ibin("muli", stage, &stage_bytes);
        let sb = b.ibin("addi", &sb, &sbase);
        let sb = b.ibin("addi", &sb, &dst0);
        for (oi, (ptr, at, pitch, left)) in ops.iter().enumerate() {
            for l in 0..2i64 {
                let dl = b.i64c(l * TC_TILE as i64 / 2);
                let present = b.icmp("slt", &dl, left);
                let ok = b.val(&format!("arith.andi {in_k}, {present} : i1"));
                let mut src = b.ibin("addi", at, &gk);
                if l == 1 {
                    let d = b.ibin("muli", pitch, &half_rows);
                    src = b.ibin("addi", &src, &d);
                }
                let off = b.i64c(oi as i64 * BF_SLICE + l * 64 * TC_TILE as i64 / 2);
                let dst = b.ibin("addi", &sb, &off);
                cp_async16(b, ptr, &src, &ok, &dst);
            }
        }
    };
    // Fragment addresses (bytes within a stage) of this lane's ldmatrix rows, per 16-deep step,
    // as a base and constant offsets (rows 16 apart share the swizzle).
    // A, matrix j = lane / 8 of an x4: rows (j % 2) · 8 + lane % 8 = lane % 16, chunk j / 2.
    // B ([n, k] rows), matrix j: rows (j / 2) · 8 + lane % 8, chunk j % 2: two 8-column tiles.
    let l16 = b.ibin("remui", &lane, &c16);
    let hi = b.ibin("divui", &lane, &c16);
    let l8 = b.ibin("remui", &lane, &c8);
    let j2 = b.ibin("divui", &lane, &c8);
    let j2 = b.ibin("remui", &j2, &c2);
    let a_row0 = b.ibin("muli", &wm, &c64);
    let a_row0 = b.ibin("addi", &a_row0, &l16);
    let b_row0 = b.ibin("muli", &wn, &c32);
    let b_hi = b.ibin("muli", &hi, &c8);
    let b_row0 = b.ibin("addi", &b_row0, &b_hi);
    let b_row0 = b.ibin("addi", &b_row0, &l8);
    let mut a_at = Vec::new();
    let mut b_at = Vec::new();
    for ks in 0..BF_K / 16 {
        let kc = b.i64c(2 * ks);
        let ca = b.ibin("addi", &kc, &hi);
        let cb = b.ibin("addi", &kc, &j2);
        a_at.push(swizzled(b, &a_row0, &ca));
        b_at.push(swizzled(b, &b_row0, &cb));
    }
    let c31 = b.i64c(BF_K - 1);
    let kt_n = b.ibin("addi", &p.k, &c31);
    let kt_n = b.ibin("divui", &kt_n, &c32);
    for s in 0..BF_STAGES - 1 {
        let sv = b.i64c(s);
        let has = b.icmp("slt", &sv, &kt_n);
        b.begin_if(&has);
        issue(b, &sv, &sv);
        b.end_if();
        b.line("nvvm.cp.async.commit.group");
    }
    let fzero = b.f32c(0.0);
    let inits: Vec<(&str, &str)> = (0..64).map(|_| (fzero.as_str(), "f32")).collect();
    let (kt, accs, results) = b.begin_for(&zero, &kt_n, &c1, &inits);
    // Tile kt has landed (at most the newest group, tile kt + 1, is still in flight) and every
    // warp is done with tile kt - 1, whose stage the next copies overwrite.
    b.line(&format!("nvvm.cp.async.wait.group {}", BF_STAGES - 2));
    b.line("gpu.barrier");
    let sb = refill(
        b,
        (&kt, &kt_n),
        (BF_STAGES - 1, BF_STAGES),
        (&stage_bytes, &sbase),
        &issue,
    );
    let mut acc_now: Vec<String> = accs.clone();
    let ldm = |b: &mut Body, at: &str, plus: i64| -> Vec<String> {
        let ad = b.ibin("addi", &sb, at);
        let plus = b.i64c(plus);
        let ad = b.ibin("addi", &ad, &plus);
        let ptr = b.val(&format!("llvm.inttoptr {ad} : i64 to !llvm.ptr<3>"));
        let r = b.val(&format!(
            "nvvm.ldmatrix {ptr} {{num = 4 : i32, layout = #nvvm.mma_layout<row>, \
             shape = #nvvm.ld_st_matrix_shape<m = 8, n = 8>, eltType = #nvvm.ld_st_matrix_elt_type<b16>}} \
             : (!llvm.ptr<3>) -> !llvm.struct<(i32, i32, i32, i32)>"
        ));
        (0..4)
            .map(|q| {
                b.val(&format!(
                    "llvm.extractvalue {r}[{q}] : !llvm.struct<(i32, i32, i32, i32)>"
                ))
            })
            .collect()
    };
    for ks in 0..(BF_K / 16) as usize {
        // B's two loads (rows 16 apart), then A's four one at a time, each used at once.
        let bq: Vec<Vec<String>> = (0..2).map(|nj| ldm(b, &b_at[ks], BF_SLICE + 16 * 64 * nj)).collect();
        // Tile ni = 2 nj + h takes registers 2h, 2h + 1 of B's nj-th load.
        let bf: Vec<[String; 2]> = (0..4)
            .map(|ni| [bq[ni / 2][2 * (ni % 2)].clone(), bq[ni / 2][2 * (ni % 2) + 1].clone()])
            .collect();
        for mi in 0..4 {
            let a = ldm(b, &a_at[ks], 16 * 64 * mi as i64);
            for (ni, bb) in bf.iter().enumerate() {
                let at = (mi * 4 + ni) * 4;
                let d = mma_bf16(b, &a, bb, &acc_now[at..at + 4]);
                acc_now[at..at + 4].clone_from_slice(&d);
            }
        }
    }
    let ys: Vec<(&str, &str)> = acc_now.iter().map(|v| (v.as_str(), "f32")).collect();
    b.end_for(&ys);
    b.line("nvvm.cp.async.wait.group 0");
    // Accumulator q of tile (mi, ni): row g + 8 (q / 2), column 2 t + q % 2 (as in gemm_tc).
    let g = b.ibin("divui", &lane, &c4);
    let t = b.ibin("remui", &lane, &c4);
    let r0 = b.ibin("muli", &wm, &c64);
    let r0 = b.ibin("addi", &r0, &m0);
    let r0 = b.ibin("addi", &r0, &g);
    let t2 = b.ibin("muli", &t, &c2);
    let col0 = b.ibin("muli", &wn, &c32);
    let col0 = b.ibin("addi", &col0, &n0);
    let col0 = b.ibin("addi", &col0, &t2);
    store_warp_tile(b, &p, &bases, (&r0, &col0), &results);
    f.finish(out);
}

/// One 16-byte `cp.async` from element `src` of the bf16 operand `ptr` to the shared address
/// `dst` (bytes); where `ok` is false it copies nothing and zero-fills the 16 bytes (reading from
/// the operand's first element, which always exists).
fn cp_async16(b: &mut Body, ptr: &str, src: &str, ok: &str, dst: &str) {
    let zero = b.i64c(0);
    let (c16, c0) = (b.i32c(16), b.i32c(0));
    let src = b.select(ok, src, &zero, "i64");
    let size = b.select(ok, &c16, &c0, "i32");
    let src = b.gep(ptr, &src, "i16");
    let src = b.val(&format!("llvm.addrspacecast {src} : !llvm.ptr to !llvm.ptr<1>"));
    let dst = b.val(&format!("llvm.inttoptr {dst} : i64 to !llvm.ptr<3>"));
    b.line(&format!(
        "nvvm.cp.async.shared.global {dst}, {src}, 16, cache = cg, {size} : !llvm.ptr<3>, !llvm.ptr<1>, i32"
    ));
}

/// The pipelined GEMMs' refill, once the stage it overwrites is free: issues k-tile `kt + ahead`
/// (where there is one) into stage `(kt + ahead) % stages` and commits the group — an empty one
/// past the last tile, so that group counts stay one per tile — and returns the shared address
/// of tile `kt`'s stage.
fn refill(
    b: &mut Body,
    (kt, kt_n): (&str, &str),
    (ahead, stages): (i64, i64),
    (stage_bytes, sbase): (&str, &str),
    issue: &dyn Fn(&mut Body, &str, &str),
) -> String {
    let ahead = b.i64c(ahead);
    let next = b.ibin("addi", kt, &ahead);
    let has = b.icmp("slt", &next, kt_n);
    let cst = b.i64c(stages);
    b.begin_if(&has);
    let ns = b.ibin("remui", &next, &cst);
    issue(b, &next, &ns);
    b.end_if();
    b.line("nvvm.cp.async.commit.group");
    let stage = b.ibin("remui", kt, &cst);
    let sb = b.ibin("muli", &stage, stage_bytes);
    b.ibin("addi", &sb, sbase)
}

/// `d = a · b + c` on one `m16n8k16` bf16 tile (`nvvm.mma.sync`); returns d's four registers.
fn mma_bf16(b: &mut Body, a: &[String], bb: &[String], c: &[String]) -> Vec<String> {
    let d = b.val(&format!(
        "nvvm.mma.sync A[{}] B[{}] C[{}] {{layoutA = #nvvm.mma_layout<row>, \
         layoutB = #nvvm.mma_layout<col>, multiplicandAPtxType = #nvvm.mma_type<bf16>, \
         multiplicandBPtxType = #nvvm.mma_type<bf16>, shape = #nvvm.shape<m = 16, n = 8, k = 16>}} \
         : (i32, i32, f32) -> !llvm.struct<(f32, f32, f32, f32)>",
        a.join(", "),
        bb.join(", "),
        c.join(", ")
    ));
    (0..4)
        .map(|q| {
            b.val(&format!(
                "llvm.extractvalue {d}[{q}] : !llvm.struct<(f32, f32, f32, f32)>"
            ))
        })
        .collect()
}

/// `to_bf16(rows, k, kp, src, srow, sk, dst)`: `dst[r, j] = bf16(src[r · srow + j · sk])` for
/// `j < k` and 0 for `k ≤ j < kp` (`kp` even): an f32 operand of any layout as the zero-padded,
/// row-major bf16 copy [`gemm_bf16`] reads. One thread per pair of elements; launch as `copy`.
pub fn to_bf16(out: &mut String) {
    let mut f = Func::new("to_bf16");
    let (rows, k, kp) = (f.i64("rows"), f.i64("k"), f.i64("kp"));
    let src = f.ptr("src");
    let (srow, sk) = (f.i64("srow"), f.i64("sk"));
    let dst = f.ptr("dst");
    let b = &mut f.body;
    let (first, stride) = grid_1d(b);
    let (one, two) = (b.i64c(1), b.i64c(2));
    let half = b.ibin("divui", &kp, &two);
    let total = b.ibin("muli", &rows, &half);
    let (w, _, _) = b.begin_for(&first, &total, &stride, &[]);
    let r = b.ibin("divui", &w, &half);
    let j = b.ibin("remui", &w, &half);
    let j = b.ibin("muli", &j, &two);
    let row = b.ibin("muli", &r, &srow);
    let mut pair = Vec::new();
    let j1 = b.ibin("addi", &j, &one);
    for d in [&j, &j1] {
        let inside = b.icmp("slt", d, &k);
        let at = b.ibin("muli", d, &sk);
        let at = b.ibin("addi", &at, &row);
        pair.push(guarded_load(b, &inside, |b| b.load(&src, &at, "f32")));
    }
    let word = pack_bf16(b, &pair[0], &pair[1]);
    b.store(&word, &dst, &w, "i32");
    b.end_for(&[]);
    f.finish(out);
}

/// The epilogue of a warp's 64 × 32 tile of `m16n8` accumulators: accumulator q of tile (mi, ni)
/// is row `r0 + 16 mi + 8 (q / 2)`, column `col0 + 8 ni + q % 2` (`r0`, `col0`: the lane's first).
fn store_warp_tile(b: &mut Body, p: &GemmParams, bases: &GemmBases, (r0, col0): (&str, &str), results: &[String]) {
    for mi in 0..4 {
        for ni in 0..4 {
            for q in 0..4 {
                let dr = b.i64c(16 * mi + 8 * (q / 2));
                let dc = b.i64c(8 * ni + q % 2);
                let r = b.ibin("addi", r0, &dr);
                let col = b.ibin("addi", col0, &dc);
                p.store_output(b, bases, &r, &col, &results[((mi * 4 + ni) * 4 + q) as usize]);
            }
        }
    }
}

/// Where staging element `e` of a tile `rows` long and `depth` deep goes: `(row, k)`. When the
/// operand is contiguous along `k` (`kfast`) consecutive elements walk `k`, otherwise rows, so
/// that consecutive threads read consecutive addresses either way.
fn stage_slot(b: &mut Body, e: &str, kfast: &str, depth: &str, rows: &str) -> (String, String) {
    let ek = b.ibin("remui", e, depth);
    let dk = b.ibin("divui", e, depth);
    let er = b.ibin("remui", e, rows);
    let dr = b.ibin("divui", e, rows);
    let row = b.select(kfast, &dk, &er, "i64");
    let k = b.select(kfast, &ek, &dr, "i64");
    (row, k)
}

/// Two f32 values rounded to bf16 and packed into one word, `lo` in the low half (the PTX order
/// of a `.bf16x2` fragment register).
fn pack_bf16(b: &mut Body, lo: &str, hi: &str) -> String {
    let half = |b: &mut Body, v: &str| -> String {
        let h = b.val(&format!("arith.truncf {v} : f32 to bf16"));
        let i = b.val(&format!("arith.bitcast {h} : bf16 to i16"));
        b.val(&format!("arith.extui {i} : i16 to i32"))
    };
    let l = half(b, lo);
    let h = half(b, hi);
    let sixteen = b.i32c(16);
    let h = b.val(&format!("arith.shli {h}, {sixteen} : i32"));
    b.val(&format!("arith.ori {l}, {h} : i32"))
}

/// The parameters every GEMM kernel takes, in launch order (see [`gemm`]).
struct GemmParams {
    kind: BOperand,
    m: String,
    n: String,
    k: String,
    zb: String,
    a: String,
    sa1: String,
    sa2: String,
    sam: String,
    sak: String,
    bops: Vec<String>,
    c: String,
    sc1: String,
    sc2: String,
    scm: String,
    scale: String,
    bias: String,
    has_bias: String,
    acc: String,
    sacc1: String,
    sacc2: String,
    saccm: String,
    has_acc: String,
}

/// Per-block values the operand loads and the epilogue share.
struct GemmBases {
    a: String,
    b: String,
    c: String,
    acc: String,
    a_kfast: String,
    b_kfast: String,
    want_bias: String,
    want_acc: String,
}

impl GemmParams {
    fn declare(f: &mut Func, kind: BOperand) -> GemmParams {
        let (m, n, k, zb) = (f.i64("m"), f.i64("n"), f.i64("k"), f.i64("zb"));
        let (a, sa1, sa2, sam, sak) = (f.ptr("a"), f.i64("sa1"), f.i64("sa2"), f.i64("sam"), f.i64("sak"));
        let bops: Vec<String> = match kind {
            BOperand::F32 => vec![f.ptr("b"), f.i64("sb1"), f.i64("sb2"), f.i64("sbk"), f.i64("sbn")],
            BOperand::Int8 => vec![f.ptr("codes"), f.ptr("scales")],
            BOperand::Int4 => vec![f.ptr("codes"), f.ptr("scales"), f.ptr("mins"), f.i64("group")],
        };
        let (c, sc1, sc2, scm) = (f.ptr("c"), f.i64("sc1"), f.i64("sc2"), f.i64("scm"));
        let scale = f.param("scale", "f32");
        let (bias, has_bias) = (f.ptr("bias"), f.i64("has_bias"));
        let (acc, sacc1, sacc2, saccm, has_acc) = (
            f.ptr("acc"),
            f.i64("sacc1"),
            f.i64("sacc2"),
            f.i64("saccm"),
            f.i64("has_acc"),
        );
        GemmParams {
            kind,
            m,
            n,
            k,
            zb,
            a,
            sa1,
            sa2,
            sam,
            sak,
            bops,
            c,
            sc1,
            sc2,
            scm,
            scale,
            bias,
            has_bias,
            acc,
            sacc1,
            sacc2,
            saccm,
            has_acc,
        }
    }

    /// Batch offsets of this block (`block_id.z = z1 · zb + z2`) and the layout flags.
    fn bases(&self, b: &mut Body) -> GemmBases {
        let bz = b.idx("block_id", "z");
        let (zero, one) = (b.i64c(0), b.i64c(1));
        let z1 = b.ibin("divui", &bz, &self.zb);
        let z2 = b.ibin("remui", &bz, &self.zb);
        let base = |b: &mut Body, s1: &str, s2: &str| -> String {
            let x = b.ibin("muli", &z1, s1);
            let y = b.ibin("muli", &z2, s2);
            b.ibin("addi", &x, &y)
        };
        let a = base(b, &self.sa1, &self.sa2);
        let bb = if self.kind == BOperand::F32 {
            base(b, &self.bops[1], &self.bops[2])
        } else {
            zero.clone()
        };
        let c = base(b, &self.sc1, &self.sc2);
        let acc = base(b, &self.sacc1, &self.sacc2);
        let a_kfast = b.icmp("eq", &self.sak, &one);
        let b_kfast = match self.kind {
            BOperand::F32 => b.icmp("eq", &self.bops[3], &one),
            _ => b.val("arith.constant true"),
        };
        let want_bias = b.icmp("ne", &self.has_bias, &zero);
        let want_acc = b.icmp("ne", &self.has_acc, &zero);
        GemmBases {
            a,
            b: bb,
            c,
            acc,
            a_kfast,
            b_kfast,
            want_bias,
            want_acc,
        }
    }

    /// `a[go, gk]` (`is_a`) or `b[gk, go]`, zero outside the operand.
    fn load_operand(&self, b: &mut Body, bases: &GemmBases, is_a: bool, go: &str, gk: &str) -> String {
        let in_k = b.icmp("slt", gk, &self.k);
        let in_o = b.icmp("slt", go, if is_a { &self.m } else { &self.n });
        let inside = b.val(&format!("arith.andi {in_k}, {in_o} : i1"));
        guarded_load(b, &inside, |b| {
            if is_a {
                let x = b.ibin("muli", go, &self.sam);
                let y = b.ibin("muli", gk, &self.sak);
                let xy = b.ibin("addi", &x, &y);
                let at = b.ibin("addi", &bases.a, &xy);
                b.load(&self.a, &at, "f32")
            } else {
                load_b(b, self.kind, &self.bops, &bases.b, go, gk, &self.k)
            }
        })
    }

    /// `c[r, col] = scale · v + bias[col] + acc[r, col]` when `(r, col)` is inside the output.
    fn store_output(&self, b: &mut Body, bases: &GemmBases, r: &str, col: &str, v: &str) {
        let ir = b.icmp("slt", r, &self.m);
        let ic = b.icmp("slt", col, &self.n);
        let inside = b.val(&format!("arith.andi {ir}, {ic} : i1"));
        b.begin_if(&inside);
        let mut v = b.fbin("mulf", v, &self.scale);
        let bv = guarded_load(b, &bases.want_bias, |b| b.load(&self.bias, col, "f32"));
        v = b.fbin("addf", &v, &bv);
        let av = guarded_load(b, &bases.want_acc, |b| {
            let x = b.ibin("muli", r, &self.saccm);
            let x = b.ibin("addi", &x, col);
            let at = b.ibin("addi", &bases.acc, &x);
            b.load(&self.acc, &at, "f32")
        });
        v = b.fbin("addf", &v, &av);
        let x = b.ibin("muli", r, &self.scm);
        let x = b.ibin("addi", &x, col);
        let at = b.ibin("addi", &bases.c, &x);
        b.store(&v, &self.c, &at, "f32");
        b.end_if();
    }
}

/// One element `b[k = gk, n = gn]` of the right operand.
fn load_b(b: &mut Body, kind: BOperand, ops: &[String], base: &str, gn: &str, gk: &str, k: &str) -> String {
    match kind {
        BOperand::F32 => {
            let x = b.ibin("muli", gk, &ops[3]);
            let y = b.ibin("muli", gn, &ops[4]);
            let xy = b.ibin("addi", &x, &y);
            let at = b.ibin("addi", base, &xy);
            b.load(&ops[0], &at, "f32")
        }
        BOperand::Int8 => {
            let row = b.ibin("muli", gn, k);
            let at = b.ibin("addi", &row, gk);
            let q = b.load(&ops[0], &at, "i8");
            let qf = b.val(&format!("arith.sitofp {q} : i8 to f32"));
            let s = b.load(&ops[1], gn, "f32");
            b.fbin("mulf", &qf, &s)
        }
        BOperand::Int4 => {
            // Byte i of a 32-column block holds column i (low nibble) and column i + 16 (high).
            let (c2, c16, c32) = (b.i64c(2), b.i64c(16), b.i64c(32));
            let half = b.ibin("divui", k, &c2);
            let row = b.ibin("muli", gn, &half);
            let blk = b.ibin("divui", gk, &c32);
            let blk = b.ibin("muli", &blk, &c16);
            let within = b.ibin("remui", gk, &c32);
            let lo = b.ibin("remui", &within, &c16);
            let at = b.ibin("addi", &row, &blk);
            let at = b.ibin("addi", &at, &lo);
            let byte = b.load(&ops[0], &at, "i8");
            let byte = b.val(&format!("arith.extui {byte} : i8 to i32"));
            let is_hi = b.icmp("sge", &within, &c16);
            let four = b.val("arith.constant 4 : i32");
            let shifted = b.val(&format!("arith.shrui {byte}, {four} : i32"));
            let sel = b.select(&is_hi, &shifted, &byte, "i32");
            let mask = b.val("arith.constant 15 : i32");
            let code = b.val(&format!("arith.andi {sel}, {mask} : i32"));
            let codef = b.val(&format!("arith.uitofp {code} : i32 to f32"));
            let groups = b.ibin("divui", k, &ops[3]);
            let g = b.ibin("divui", gk, &ops[3]);
            let gi = b.ibin("muli", gn, &groups);
            let gi = b.ibin("addi", &gi, &g);
            let s = f16_to_f32(b, &ops[1], &gi);
            let mn = f16_to_f32(b, &ops[2], &gi);
            b.val(&format!("math.fma {codef}, {s}, {mn} : f32"))
        }
    }
}

/// Element types the data-movement kernels exist for, by size in bytes.
pub const COPY_TYPES: [(usize, &str); 4] = [(1, "i8"), (2, "i16"), (4, "i32"), (8, "i64")];

/// `copy_{ty}(total, d0…d5, s0…s5, t0…t5, src, dst)`: for every index `i` of a `[d0, …, d5]`
/// space (row-major), `dst[Σ iₐ tₐ] = src[Σ iₐ sₐ]`. Transposes, slices, concatenation parts,
/// broadcasts and cache appends are this kernel with different strides. Launch: 1-D, any grid.
pub fn copy(ty: &str, out: &mut String) {
    let mut f = Func::new(&format!("copy_{ty}"));
    let total = f.i64("total");
    let d: Vec<String> = (0..COPY_RANK).map(|i| f.i64(&format!("d{i}"))).collect();
    let s: Vec<String> = (0..COPY_RANK).map(|i| f.i64(&format!("s{i}"))).collect();
    let t: Vec<String> = (0..COPY_RANK).map(|i| f.i64(&format!("t{i}"))).collect();
    let (src, dst) = (f.ptr("src"), f.ptr("dst"));
    let b = &mut f.body;
    let (first, stride) = grid_1d(b);
    let (i, _, _) = b.begin_for(&first, &total, &stride, &[]);
    let mut rem = i.clone();
    let mut so = b.i64c(0);
    let mut to = so.clone();
    for ax in (0..COPY_RANK).rev() {
        let ia = b.ibin("remui", &rem, &d[ax]);
        rem = b.ibin("divui", &rem, &d[ax]);
        let x = b.ibin("muli", &ia, &s[ax]);
        so = b.ibin("addi", &so, &x);
        let y = b.ibin("muli", &ia, &t[ax]);
        to = b.ibin("addi", &to, &y);
    }
    let v = b.load(&src, &so, ty);
    b.store(&v, &dst, &to, ty);
    b.end_for(&[]);
    f.finish(out);
}

/// `reduce_axis_{sum,max,min}`: `out[o, c] = scale · ⊕_j x[o, j, c]` over `x` viewed as
/// `[outer, r, inner]` (a reduction over contiguous axes that are not the last, such as mean
/// pooling over the sequence; `scale` is 1, or 1/r for a mean; max and min ignore it). Parameters
/// `(total = outer · inner, r, inner, scale, x, out)`; one thread per output, neighbours reading
/// neighbouring columns. Launch as `copy`.
pub fn reduce_axis(op: ReduceOp, out: &mut String) {
    let name = match op {
        ReduceOp::Max => "reduce_axis_max",
        ReduceOp::Min => "reduce_axis_min",
        ReduceOp::Sum | ReduceOp::Mean => "reduce_axis_sum",
    };
    let mut f = Func::new(name);
    let (total, r, inner) = (f.i64("total"), f.i64("r"), f.i64("inner"));
    let scale = f.param("scale", "f32");
    let (x, dst) = (f.ptr("x"), f.ptr("out"));
    let b = &mut f.body;
    let (first, stride) = grid_1d(b);
    let (i, _, _) = b.begin_for(&first, &total, &stride, &[]);
    let o = b.ibin("divui", &i, &inner);
    let c = b.ibin("remui", &i, &inner);
    let base = b.ibin("muli", &o, &r);
    let base = b.ibin("muli", &base, &inner);
    let base = b.ibin("addi", &base, &c);
    let init = b.f32c(identity(op));
    let (zero, one) = (b.i64c(0), b.i64c(1));
    let (j, acc, res) = b.begin_for(&zero, &r, &one, &[(&init, "f32")]);
    let at = b.ibin("muli", &j, &inner);
    let at = b.ibin("addi", &at, &base);
    let v = b.load(&x, &at, "f32");
    let next = b.combine(op, &acc[0], &v);
    b.end_for(&[(&next, "f32")]);
    let y = if matches!(op, ReduceOp::Sum | ReduceOp::Mean) {
        b.fbin("mulf", &res[0], &scale)
    } else {
        res[0].clone()
    };
    b.store(&y, &dst, &i, "f32");
    b.end_for(&[]);
    f.finish(out);
}

/// `unary_{sin,cos}_f32`: `out[i] = f(x[i])` for the elementwise functions the plan leaves unfused
/// (Llama's rotary tables). Parameters `(total, x, out)`. Launch as `copy`.
pub fn unary_map(u: UnaryOp, name: &str, out: &mut String) {
    let mut f = Func::new(name);
    let total = f.i64("total");
    let (x, dst) = (f.ptr("x"), f.ptr("out"));
    let b = &mut f.body;
    let (first, stride) = grid_1d(b);
    let (i, _, _) = b.begin_for(&first, &total, &stride, &[]);
    let v = b.load(&x, &i, "f32");
    let y = unary(b, u, &v);
    b.store(&y, &dst, &i, "f32");
    b.end_for(&[]);
    f.finish(out);
}

fn grid_1d(b: &mut Body) -> (String, String) {
    let tid = b.idx("thread_id", "x");
    let bx = b.idx("block_id", "x");
    let bd = b.idx("block_dim", "x");
    let gx = b.idx("grid_dim", "x");
    let x = b.ibin("muli", &bx, &bd);
    let first = b.ibin("addi", &x, &tid);
    let stride = b.ibin("muli", &gx, &bd);
    (first, stride)
}

/// `gather_{ty}_{ix}(outer, nidx, inner, axis_len, table, idx, out, err)`: `out[o, p, c] =
/// table[o, idx[p], c]`; an index outside `0..axis_len` writes zeros and sets `*err` (i32) to 1,
/// which the runtime turns into an error. Launch: 1-D, any grid.
pub fn gather(ty: &str, ix: &str, out: &mut String) {
    let mut f = Func::new(&format!("gather_{ty}_{ix}"));
    let (outer, nidx, inner, axis_len) = (f.i64("outer"), f.i64("nidx"), f.i64("inner"), f.i64("axis_len"));
    let (table, idx, dst, err) = (f.ptr("table"), f.ptr("idx"), f.ptr("out"), f.ptr("err"));
    let b = &mut f.body;
    let (first, stride) = grid_1d(b);
    let per = b.ibin("muli", &nidx, &inner);
    let total = b.ibin("muli", &outer, &per);
    let (i, _, _) = b.begin_for(&first, &total, &stride, &[]);
    let o = b.ibin("divui", &i, &per);
    let rem = b.ibin("remui", &i, &per);
    let p = b.ibin("divui", &rem, &inner);
    let c = b.ibin("remui", &rem, &inner);
    let raw = b.load(&idx, &p, ix);
    let id = if ix == "i64" {
        raw
    } else {
        b.val(&format!("arith.extsi {raw} : {ix} to i64"))
    };
    let zero = b.i64c(0);
    let lo = b.icmp("sge", &id, &zero);
    let hi = b.icmp("slt", &id, &axis_len);
    let ok = b.val(&format!("arith.andi {lo}, {hi} : i1"));
    let safe = b.select(&ok, &id, &zero, "i64");
    let row = b.ibin("muli", &o, &axis_len);
    let row = b.ibin("addi", &row, &safe);
    let at = b.ibin("muli", &row, &inner);
    let at = b.ibin("addi", &at, &c);
    let v = b.load(&table, &at, ty);
    let z = b.val(&format!("arith.constant 0 : {ty}"));
    let v = b.select(&ok, &v, &z, ty);
    b.store(&v, &dst, &i, ty);
    let bad = b.val("arith.constant true");
    let bad = b.val(&format!("arith.xori {ok}, {bad} : i1"));
    b.begin_if(&bad);
    let one = b.i32c(1);
    let z0 = b.i64c(0);
    b.store(&one, &err, &z0, "i32");
    b.end_if();
    b.end_for(&[]);
    f.finish(out);
}

/// The names of the fixed (plan-independent) kernels every CUDA artifact carries.
pub fn fixed_kernels() -> Vec<String> {
    let mut v = vec!["gemm_f32".to_string(), "gemm_i8".into(), "gemm_i4".into()];
    v.extend(["gemm_tc_f32".to_string(), "gemm_tc_i8".into(), "gemm_tc_i4".into()]);
    v.extend(["gemm_bf16".to_string(), "to_bf16".into()]);
    v.extend([
        "gemv_f32".to_string(),
        "gemv_i8".into(),
        "gemv_i4".into(),
        "gemv_cols_f32".into(),
    ]);
    v.extend([
        "reduce_axis_sum".to_string(),
        "reduce_axis_max".into(),
        "reduce_axis_min".into(),
    ]);
    v.extend(["unary_sin_f32".to_string(), "unary_cos_f32".into()]);
    for (_, t) in COPY_TYPES {
        v.push(format!("copy_{t}"));
    }
    for (_, t) in COPY_TYPES {
        for ix in ["i32", "i64"] {
            v.push(format!("gather_{t}_{ix}"));
        }
    }
    v
}

/// The whole module: the plan's fused kernels (`k0`, `k1`, …), its fused attention kernels
/// (`flash`: softmax kernel and score input, see `Manifest::flash_kernels`) and the fixed kernels.
pub fn module(specs: &[KernelSpec], flash_kernels: &[(u32, usize)]) -> Result<String, String> {
    let mut out = String::from("module attributes {gpu.container_module} {\n  gpu.module @kiln {\n");
    for (i, s) in specs.iter().enumerate() {
        fused(s, &format!("k{i}"), &mut out)?;
    }
    for &(k, score) in flash_kernels {
        let spec = specs
            .get(k as usize)
            .ok_or_else(|| format!("attention names kernel {k}, which does not exist"))?;
        flash(spec, score, &kiln_runtime::plan::flash_kernel(k, score), &mut out)?;
        for dim in FT_DIMS {
            flash_tc(
                spec,
                score,
                dim,
                &kiln_runtime::plan::flash_tc_kernel(k, score, dim),
                &mut out,
            )?;
        }
    }
    gemm(BOperand::F32, "gemm_f32", &mut out);
    gemm(BOperand::Int8, "gemm_i8", &mut out);
    gemm(BOperand::Int4, "gemm_i4", &mut out);
    gemm_tc(BOperand::F32, "gemm_tc_f32", &mut out);
    gemm_tc(BOperand::Int8, "gemm_tc_i8", &mut out);
    gemm_tc(BOperand::Int4, "gemm_tc_i4", &mut out);
    gemm_bf16("gemm_bf16", &mut out);
    to_bf16(&mut out);
    gemv(BOperand::F32, "gemv_f32", &mut out);
    gemv(BOperand::Int8, "gemv_i8", &mut out);
    gemv(BOperand::Int4, "gemv_i4", &mut out);
    gemv_cols("gemv_cols_f32", &mut out);
    for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
        reduce_axis(op, &mut out);
    }
    unary_map(UnaryOp::Sin, "unary_sin_f32", &mut out);
    unary_map(UnaryOp::Cos, "unary_cos_f32", &mut out);
    for (_, t) in COPY_TYPES {
        copy(t, &mut out);
    }
    for (_, t) in COPY_TYPES {
        for ix in ["i32", "i64"] {
            gather(t, ix, &mut out);
        }
    }
    out.push_str("  }\n}\n");
    Ok(out)
}
