//! Hopper's warpgroup MMA (`wgmma.mma_async`, `sm_90a`): [`gemm_wgmma`], the large-product GEMM.

use super::*;

/// Output rows per block: two warpgroups of 64.
pub const WG_BM: i64 = 128;
/// Output columns per block: one `m64n256k16` product per warpgroup and k-step.
pub const WG_BN: i64 = 256;
/// Depth of one stage: 64 bf16, one 128-byte row — exactly one 128-byte swizzle atom.
const WG_BK: i64 = 64;
/// Stages of the copy pipeline: tiles `t + 1` and `t + 2` are in flight while tile `t` is
/// multiplied and tile `t - 1`'s products drain (`wgmma.wait_group 1`).
const WG_STAGES: i64 = 4;
/// Tiles the copies run ahead of the products.
const WG_AHEAD: i64 = WG_STAGES - 2;
/// Bytes of one stage: A's 128 rows, then B's 256 rows, of 128 bytes each.
const WG_STAGE: i64 = (WG_BM + WG_BN) * 128;
/// Dynamic shared memory a block of [`gemm_wgmma`] needs: the stages, plus 1024 bytes so that
/// they can start on a 1024-byte boundary (the swizzle pattern is taken from address bits).
pub const WG_SMEM: u32 = (WG_STAGES * WG_STAGE + 1024) as u32;
/// The dynamic shared memory symbol (`.extern .shared`, sized at launch).
const DSMEM: &str = "kiln_dsmem";

/// `gemm_wgmma`: [`gemm_bf16`]'s product (same parameters and operand requirements: bf16 rows,
/// `k`-contiguous, pitches multiples of 8 elements, 16-byte aligned) on Hopper's warpgroup MMA.
///
/// Launch: blocks of [`TC_THREADS`] (two warpgroups), grid `(⌈n / 256⌉, ⌈m / 128⌉, z1 · zb)`, and
/// [`WG_SMEM`] bytes of dynamic shared memory (more than the default 48 KB: the function's
/// maximum must be raised first). Each block runs a [`WG_STAGES`]-stage `cp.async` pipeline over
/// 64-deep slices (A: 128 rows, B: 256 rows of 128 bytes; rows out of range and chunks past `k`
/// are zero-filled by the copies) in the canonical K-major 128-byte-swizzle layout: chunk `c` of
/// row `r` at chunk `c ^ (r % 8)`, 8-row groups 1024 bytes apart. Per slice each warpgroup issues
/// four `wgmma.mma_async.m64n256k16` (its 64 rows of A by all 256 rows of B, read through matrix
/// descriptors) into 128 f32 accumulators a thread, commits them as one group and waits until at
/// most that group is in flight, so the products of one slice overlap the copies and barrier of
/// the next. A stage is overwritten two iterations after its products were issued, when the
/// barrier has ordered every warpgroup's wait for them before the copies.
///
/// Accumulator `4 j + q` of thread (warp `w` of its warpgroup, lane `l`) is row
/// `16 w + l / 4 + 8 (q / 2)`, column `8 j + 2 (l % 4) + q % 2` of the warpgroup's 64 × 256 tile.
pub fn gemm_wgmma(name: &str, out: &mut String) {
    let mut f = Func::new(name);
    let p = GemmParams::declare(&mut f, BOperand::F32);
    f.attrs.push(format!("nvvm.maxntid = array<i32: {TC_THREADS}, 1, 1>"));
    let acc_ty = format!("!llvm.struct<({})>", vec!["f32"; (WG_BN / 2) as usize].join(", "));
    let (sbn, pb) = (p.bops[4].clone(), p.bops[0].clone());
    let b = &mut f.body;
    let tid = b.idx("thread_id", "x");
    let bx = b.idx("block_id", "x");
    let by = b.idx("block_id", "y");
    let (c1, c2, c4, c8, c16) = (b.i64c(1), b.i64c(2), b.i64c(4), b.i64c(8), b.i64c(16));
    let (c32, c64, c128) = (b.i64c(32), b.i64c(64), b.i64c(128));
    let zero = b.i64c(0);
    let lane = b.ibin("remui", &tid, &c32);
    let warp = b.ibin("divui", &tid, &c32);
    let wg = b.ibin("divui", &warp, &c4);
    let cbn = b.i64c(WG_BN);
    let cbm = b.i64c(WG_BM);
    let n0 = b.ibin("muli", &bx, &cbn);
    let m0 = b.ibin("muli", &by, &cbm);
    let bases = p.bases(b);
    // The stages start at the first 1024-byte boundary of the dynamic shared memory.
    let dsm = b.val(&format!("llvm.mlir.addressof @{DSMEM} : !llvm.ptr<3>"));
    let raw = b.val(&format!("llvm.ptrtoint {dsm} : !llvm.ptr<3> to i64"));
    let (c1023, cmask) = (b.i64c(1023), b.i64c(-1024));
    let sbase = b.ibin("addi", &raw, &c1023);
    let sbase = b.ibin("andi", &sbase, &cmask);
    // This thread's copies: chunk `tid % 8` of rows `tid / 8 + 32 i` of each operand's slice, all
    // at the same swizzled chunk (the swizzle depends on row % 8 only), 4096 bytes apart.
    let row = b.ibin("divui", &tid, &c8);
    let c = b.ibin("remui", &tid, &c8);
    let kc = b.ibin("muli", &c, &c8);
    let r8 = b.ibin("remui", &row, &c8);
    let sw = b.ibin("xori", &c, &r8);
    let sw = b.ibin("muli", &sw, &c16);
    let dst0 = b.ibin("muli", &row, &c128);
    let dst0 = b.ibin("addi", &dst0, &sw);
    // (operand pointer, element offset of row `row`, pitch × 32, rows present, copies, byte offset
    // of the slice in a stage) per operand.
    let ops: Vec<(String, String, String, String, i64, i64)> = [true, false]
        .iter()
        .map(|&is_a| {
            let g = b.ibin("addi", if is_a { &m0 } else { &n0 }, &row);
            let pitch = if is_a { p.sam.clone() } else { sbn.clone() };
            let at = b.ibin("muli", &g, &pitch);
            let at = b.ibin("addi", &at, if is_a { &bases.a } else { &bases.b });
            let step = b.ibin("muli", &pitch, &c32);
            let lim = if is_a { &p.m } else { &p.n };
            let left = b.ibin("subi", lim, &g);
            let (ptr, rows, off) = if is_a {
                (p.a.clone(), WG_BM, 0)
            } else {
                (pb.clone(), WG_BN, WG_BM * 128)
            };
            (ptr, at, step, left, rows / 32, off)
        })
        .collect();
    let stage_bytes = b.i64c(WG_STAGE);
    let cbk = b.i64c(WG_BK);
    // Issues the copies of k-tile `kt` into stage `stage`.
    let issue = |b: &mut Body, kt: &str, stage: &str| {
        let k0 = b.ibin("muli", kt, &cbk);
        let gk = b.ibin("addi", &k0, &kc);
        let in_k = b.icmp("slt", &gk, &p.k);
        let sb = b.ibin("muli", stage, &stage_bytes);
        let sb = b.ibin("addi", &sb, &sbase);
        let sb = b.ibin("addi", &sb, &dst0);
        for (ptr, at, step, left, copies, off) in &ops {
            let mut src = b.ibin("addi", at, &gk);
            for l in 0..*copies {
                if l > 0 {
                    src = b.ibin("addi", &src, step);
                }
                let dl = b.i64c(32 * l);
                let present = b.icmp("slt", &dl, left);
                let ok = b.val(&format!("arith.andi {in_k}, {present} : i1"));
                let o = b.i64c(off + 32 * 128 * l);
                let dst = b.ibin("addi", &sb, &o);
                cp_async16(b, ptr, &src, &ok, &dst);
            }
        }
    };
    let c63 = b.i64c(WG_BK - 1);
    let kt_n = b.ibin("addi", &p.k, &c63);
    let kt_n = b.ibin("divui", &kt_n, &cbk);
    for s in 0..WG_AHEAD {
        let sv = b.i64c(s);
        let has = b.icmp("slt", &sv, &kt_n);
        b.begin_if(&has);
        issue(b, &sv, &sv);
        b.end_if();
        b.line("nvvm.cp.async.commit.group");
    }
    let acc0 = b.val(&format!("llvm.mlir.zero : {acc_ty}"));
    // Warpgroup wg multiplies rows 64 wg… of A's slice (64 rows of 128 bytes) by all of B's.
    let wg_rows = b.i64c(64 * 128);
    let a_off = b.ibin("muli", &wg, &wg_rows);
    let b_off = b.i64c(WG_BM * 128);
    let (kt, accs, results) = b.begin_for(&zero, &kt_n, &c1, &[(acc0.as_str(), acc_ty.as_str())]);
    // Tile kt has landed (tiles after it may still be in flight); the fence makes this thread's
    // copies visible to the async proxy wgmma reads through, and the barrier makes everyone's
    // visible — and orders every warpgroup's wait for tile kt - 2's products before the copies
    // below overwrite its stage.
    b.line(&format!("nvvm.cp.async.wait.group {}", WG_AHEAD - 1));
    b.line("nvvm.fence.proxy {kind = #nvvm.proxy_kind<async.shared>, space = #nvvm.shared_space<cta>}");
    b.line("gpu.barrier");
    let sb = refill(b, (&kt, &kt_n), (WG_AHEAD, WG_STAGES), (&stage_bytes, &sbase), &issue);
    let a0 = b.ibin("addi", &sb, &a_off);
    let b0 = b.ibin("addi", &sb, &b_off);
    b.line("nvvm.wgmma.fence.aligned");
    let mut acc = accs[0].clone();
    for ks in 0..WG_BK / 16 {
        // k-step ks starts 32 bytes further into each row; the hardware applies the swizzle to
        // the address it forms.
        let dk = b.i64c(32 * ks);
        let aa = b.ibin("addi", &a0, &dk);
        let ba = b.ibin("addi", &b0, &dk);
        let da = wgmma_desc(b, &aa);
        let db = wgmma_desc(b, &ba);
        acc = b.val(&format!(
            "nvvm.wgmma.mma_async {da}, {db}, {acc}, #nvvm.shape<m = 64, n = {WG_BN}, k = 16>, \
             D [<f32>, #nvvm.wgmma_scale_out<one>], A [<bf16>, #nvvm.wgmma_scale_in<one>, <row>], \
             B [<bf16>, #nvvm.wgmma_scale_in<one>, <col>] : {acc_ty} -> {acc_ty}"
        ));
    }
    b.line("nvvm.wgmma.commit.group.sync.aligned");
    // At most this tile's products in flight: tile kt - 1's have finished reading their stage.
    b.line("nvvm.wgmma.wait.group.sync.aligned 1");
    b.end_for(&[(&acc, &acc_ty)]);
    b.line("nvvm.wgmma.wait.group.sync.aligned 0");
    b.line("nvvm.cp.async.wait.group 0");
    let g = b.ibin("divui", &lane, &c4);
    let t = b.ibin("remui", &lane, &c4);
    let w4 = b.ibin("remui", &warp, &c4);
    let r0 = b.ibin("muli", &wg, &c64);
    let r0 = b.ibin("addi", &r0, &m0);
    let rw = b.ibin("muli", &w4, &c16);
    let r0 = b.ibin("addi", &r0, &rw);
    let r0 = b.ibin("addi", &r0, &g);
    let t2 = b.ibin("muli", &t, &c2);
    let col0 = b.ibin("addi", &n0, &t2);
    for j in 0..WG_BN / 8 {
        for q in 0..4 {
            let v = b.val(&format!("llvm.extractvalue {}[{}] : {acc_ty}", results[0], 4 * j + q));
            let dr = b.i64c(8 * (q / 2));
            let dc = b.i64c(8 * j + q % 2);
            let r = b.ibin("addi", &r0, &dr);
            let col = b.ibin("addi", &col0, &dc);
            p.store_output(b, &bases, &r, &col, &v);
        }
    }
    f.finish(out);
}

/// A wgmma shared-memory matrix descriptor for a K-major slice at shared address `addr` in the
/// 128-byte swizzle layout: start address / 16 (bits 0–13), leading byte offset 1 (unused by
/// K-major swizzled layouts; bits 16–29), stride byte offset 1024 / 16 between 8-row groups (bits
/// 32–45), swizzle mode 1 = 128 bytes (bits 62–63).
fn wgmma_desc(b: &mut Body, addr: &str) -> String {
    let mask = b.i64c(0x3FFFF);
    let a = b.ibin("andi", addr, &mask);
    let four = b.i64c(4);
    let a = b.ibin("shrui", &a, &four);
    let fixed = b.i64c((1i64 << 16) | ((1024i64 >> 4) << 32) | (1i64 << 62));
    b.ibin("ori", &a, &fixed)
}

/// The MLIR module of the `sm_90a`-only kernels ([`gemm_wgmma`]) and the dynamic shared memory
/// symbol they use.
pub fn wgmma_module() -> String {
    let mut out = String::from("module attributes {gpu.container_module} {\n  gpu.module @kiln {\n");
    let _ = writeln!(
        out,
        "    llvm.mlir.global external @{DSMEM}() {{addr_space = 3 : i32, alignment = 1024 : i64}} : !llvm.array<0 x i8>"
    );
    gemm_wgmma("gemm_wgmma", &mut out);
    out.push_str("  }\n}\n");
    out
}
