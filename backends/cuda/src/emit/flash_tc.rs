//! Fused attention on tensor cores: [`super::flash`]'s online softmax with both products as
//! `mma.sync.m16n8k16` (bf16 operands, f32 accumulation), FlashAttention-2's register layout.

use super::*;

/// Query rows per block: four warps of 16.
pub const FT_ROWS: i64 = 64;
/// Keys per step of the key loop.
const FT_KEYS: i64 = 64;
/// Threads per block.
pub const FT_THREADS: u32 = 128;
/// The head dimensions (`d = dv`) tensor-core attention kernels are emitted for: the fragments
/// are registers, so the dimension is fixed per kernel (MiniLM's 32, GPT-2's 64).
pub const FT_DIMS: [i64; 3] = [32, 64, 128];

/// `fa{kernel}_{score}_tc{dim}`: [`super::flash`] (same parameters, same launch arguments; grid
/// `(⌈sq / 64⌉, b·h)`, blocks of [`FT_THREADS`]) for `d = dv = dim` on tensor cores.
///
/// Warp `w` owns query rows `16 w …+16` of the block's 64; its Q fragments (bf16, the A layout of
/// `m16n8k16`: lane `l` holds rows `l / 4` and `l / 4 + 8`, columns `2 (l % 4) …`) are loaded from
/// global memory once. Per step of 64 keys, the block stages K and V as bf16 rows (pitch `2 dim +
/// 16` bytes, so the eight rows an `ldmatrix` phase reads fall in eight bank groups); each warp
/// computes its 16 × 64 scores with `ldmatrix.x4` on K (K's rows are the B operand's columns),
/// applies the scale and the softmax kernel's prologue per score (mask bias, causal select: the
/// same row offsets table), updates the running maximum (a max over the four lanes of a row by
/// `shuffle xor 1, 2`), rescales its output accumulators and adds `P · V`, where P is the score
/// accumulators re-packed as A fragments (the C and A layouts agree) and V's B fragments come
/// from `ldmatrix.x4.trans` on V's rows. Each lane keeps partial row sums; they are combined once
/// at the end, when the rows are divided by them and stored.
pub fn flash_tc(spec: &KernelSpec, score: usize, dim: i64, name: &str, out: &mut String) -> Result<(), String> {
    if !FT_DIMS.contains(&dim) {
        return Err(format!("no tensor-core attention kernel for head dimension {dim}"));
    }
    if spec.kind != KernelKind::SoftmaxLast || score >= spec.inputs.len() || spec.output != DType::F32 {
        return Err(format!(
            "kernel `{}` is not an attention softmax over input {score}",
            spec.name
        ));
    }
    let pitch_words = dim / 2 + 4;
    let kv_words = FT_KEYS * pitch_words;
    let lds = format!("memref<{kv_words}xi32, #gpu.address_space<workgroup>>");
    let mut f = Func::new(name);
    // d and dv are `dim` (the runtime launches this kernel only then).
    let params = AttnParams::declare(&mut f, spec);
    let AttnParams {
        sq,
        sk,
        q: [q, _, _, qss],
        k: [k, _, _, kss],
        v: [v, _, _, vss],
        o: [o, _, _, oss],
        scale,
        offs,
        ins,
        ..
    } = &params;
    f.smem.push(("ks".into(), format!("{lds} {{llvm.align = 16 : i64}}")));
    f.smem.push(("vs".into(), format!("{lds} {{llvm.align = 16 : i64}}")));
    let b = &mut f.body;
    b.line("%c0_idx = arith.constant 0 : index");
    let tid = b.idx("thread_id", "x");
    let bx = b.idx("block_id", "x");
    let bh = b.idx("block_id", "y");
    let (c1, c2, c4, c8, c16, c32) = (b.i64c(1), b.i64c(2), b.i64c(4), b.i64c(8), b.i64c(16), b.i64c(32));
    let zero = b.i64c(0);
    let lane = b.ibin("remui", &tid, &c32);
    let warp = b.ibin("divui", &tid, &c32);
    let g = b.ibin("divui", &lane, &c4);
    let t = b.ibin("remui", &lane, &c4);
    let t2 = b.ibin("muli", &t, &c2);
    let fzero = b.f32c(0.0);
    let ninf = b.f32c(f32::NEG_INFINITY);
    let [qb, kb, vb, ob] = params.bases(b, &bh);
    let rows_c = b.i64c(FT_ROWS);
    let row0 = b.ibin("muli", &bx, &rows_c);
    let wrow = b.ibin("muli", &warp, &c16);
    let wrow = b.ibin("addi", &row0, &wrow);
    // This lane's two rows (g and g + 8 of the warp's 16), whether they exist, and their first
    // elements in Q and O.
    let r_lo = b.ibin("addi", &wrow, &g);
    let r_hi = b.ibin("addi", &r_lo, &c8);
    let rows = [r_lo, r_hi];
    let ok: Vec<String> = rows.iter().map(|r| b.icmp("slt", r, sq)).collect();
    let row_at = |b: &mut Body, r: &str, ss: &str, base: &str| -> String {
        let x = b.ibin("muli", r, ss);
        b.ibin("addi", &x, base)
    };
    let q_at: Vec<String> = rows.iter().map(|r| row_at(b, r, qss, &qb)).collect();
    let o_at: Vec<String> = rows.iter().map(|r| row_at(b, r, oss, &ob)).collect();
    // Q's A fragments, one per 16 columns: (row lo, cols 2t..), (hi, 2t..), (lo, 2t+8..), (hi, 2t+8..).
    let mut qf: Vec<Vec<String>> = Vec::new();
    for ks in 0..dim / 16 {
        let mut regs = Vec::new();
        for (half, r) in [(0, 0), (0, 1), (8, 0), (8, 1)] {
            let col = b.i64c(16 * ks + half);
            let col = b.ibin("addi", &col, &t2);
            let at = b.ibin("addi", &q_at[r], &col);
            let lo = guarded_load(b, &ok[r], |b| b.load(q, &at, "f32"));
            let at1 = b.ibin("addi", &at, &c1);
            let hi = guarded_load(b, &ok[r], |b| b.load(q, &at1, "f32"));
            regs.push(pack_bf16(b, &lo, &hi));
        }
        qf.push(regs);
    }
    // Where the softmax kernel's other inputs start for each of the two rows (table rows [b, h, sq]).
    let nops = b.i64c(spec.inputs.len() as i64 + 1);
    let mut starts: Vec<Vec<Option<String>>> = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        let grow = b.ibin("muli", &bh, sq);
        let grow = b.ibin("addi", &grow, row);
        let trow = b.ibin("muli", &grow, &nops);
        let mut per = Vec::new();
        for j in 0..spec.inputs.len() {
            if j == score {
                per.push(None);
                continue;
            }
            let jc = b.i64c(j as i64);
            let at = b.ibin("addi", &trow, &jc);
            let s = guarded(b, &ok[r], "i64", |b| b.load(offs, &at, "i64"), |_| zero.clone());
            per.push(Some(s));
        }
        starts.push(per);
    }
    // ldmatrix row addresses (bytes within a staged buffer) of this lane, per 16-key or 16-column
    // block: K (non-transposed, B operand of S = Q Kᵀ): key (l / 16) · 8 + l % 8, column block
    // 8 ((l / 8) % 2); V (transposed, B operand of O = P V): key 8 ((l / 8) % 2) + l % 8,
    // column block 8 (l / 16).
    let pitch = b.i64c(pitch_words * 4);
    let l8 = b.ibin("remui", &lane, &c8);
    let j2 = b.ibin("divui", &lane, &c8);
    let j2 = b.ibin("remui", &j2, &c2);
    let hi16 = b.ibin("divui", &lane, &c16);
    let k_row = b.ibin("muli", &hi16, &c8);
    let k_row = b.ibin("addi", &k_row, &l8);
    let k_col = b.ibin("muli", &j2, &c16);
    let k_at = b.ibin("muli", &k_row, &pitch);
    let k_at = b.ibin("addi", &k_at, &k_col);
    let v_row = b.ibin("muli", &j2, &c8);
    let v_row = b.ibin("addi", &v_row, &l8);
    let v_col = b.ibin("muli", &hi16, &c16);
    let v_at = b.ibin("muli", &v_row, &pitch);
    let v_at = b.ibin("addi", &v_at, &v_col);
    let shared_addr = |b: &mut Body, buf: &str| -> String {
        let a = b.val(&format!(
            "memref.extract_aligned_pointer_as_index {buf} : {lds} -> index"
        ));
        b.val(&format!("arith.index_cast {a} : index to i64"))
    };
    let ks_base = shared_addr(b, "%ks");
    let vs_base = shared_addr(b, "%vs");
    let k_at = b.ibin("addi", &k_at, &ks_base);
    let v_at = b.ibin("addi", &v_at, &vs_base);
    // The key loop carries each row's running maximum and this lane's partial sum, and the
    // output accumulators (dim / 8 tiles of 4).
    let ntiles = (dim / 8) as usize;
    let mut init: Vec<(String, &str)> = vec![(ninf.clone(), "f32"), (ninf.clone(), "f32")];
    init.push((fzero.clone(), "f32"));
    init.push((fzero.clone(), "f32"));
    for _ in 0..4 * ntiles {
        init.push((fzero.clone(), "f32"));
    }
    let init_ref: Vec<(&str, &str)> = init.iter().map(|(a, ty)| (a.as_str(), *ty)).collect();
    let keys = b.i64c(FT_KEYS);
    let width = b.i32c(32);
    let (t0, carried, results) = b.begin_for(&zero, sk, &keys, &init_ref);
    b.line("gpu.barrier");
    // Stage 64 keys and values as bf16 pairs (zeros past sk).
    let half = b.i64c(dim / 2);
    let pw = b.i64c(pitch_words);
    let nthreads = b.i64c(FT_THREADS as i64);
    for (src, sbase, sstride, buf) in [(&k, &kb, &kss, "%ks"), (&v, &vb, &vss, "%vs")] {
        let n = b.i64c(FT_KEYS * dim / 2);
        let (i, _, _) = b.begin_for(&tid, &n, &nthreads, &[]);
        let j = b.ibin("divui", &i, &half);
        let c = b.ibin("remui", &i, &half);
        let key = b.ibin("addi", &t0, &j);
        let inside = b.icmp("slt", &key, sk);
        let at = b.ibin("muli", &key, sstride);
        let at = b.ibin("addi", &at, sbase);
        let col = b.ibin("muli", &c, &c2);
        let at = b.ibin("addi", &at, &col);
        let lo = guarded_load(b, &inside, |b| b.load(src, &at, "f32"));
        let at1 = b.ibin("addi", &at, &c1);
        let hi = guarded_load(b, &inside, |b| b.load(src, &at1, "f32"));
        let word = pack_bf16(b, &lo, &hi);
        b.shared_store(&word, buf, (&j, &pw, &c), &lds);
        b.end_for(&[]);
    }
    b.line("gpu.barrier");
    let ldm = |b: &mut Body, at: &str, plus: i64, trans: bool| -> Vec<String> {
        let p = b.i64c(plus);
        let a = b.ibin("addi", at, &p);
        let ptr = b.val(&format!("llvm.inttoptr {a} : i64 to !llvm.ptr<3>"));
        let layout = if trans { "col" } else { "row" };
        let r = b.val(&format!(
            "nvvm.ldmatrix {ptr} {{num = 4 : i32, layout = #nvvm.mma_layout<{layout}>, \
             shape = #nvvm.ld_st_matrix_shape<m = 8, n = 8>, eltType = #nvvm.ld_st_matrix_elt_type<b16>}} \
             : (!llvm.ptr<3>) -> !llvm.struct<(i32, i32, i32, i32)>"
        ));
        (0..4)
            .map(|i| {
                b.val(&format!(
                    "llvm.extractvalue {r}[{i}] : !llvm.struct<(i32, i32, i32, i32)>"
                ))
            })
            .collect()
    };
    // S = Q Kᵀ: 8 tiles of 8 keys, 4 accumulators each.
    let mut s_acc: Vec<Vec<String>> = (0..8).map(|_| vec![fzero.clone(); 4]).collect();
    for np in 0..4i64 {
        for (ks, qa) in qf.iter().enumerate() {
            let r = ldm(b, &k_at, 16 * np * pitch_words * 4 + 32 * ks as i64, false);
            for h2 in 0..2usize {
                let ti = 2 * np as usize + h2;
                let d = mma_bf16(b, qa, &r[2 * h2..2 * h2 + 2], &s_acc[ti]);
                s_acc[ti] = d;
            }
        }
    }
    // Scores through the softmax kernel's prologue; -inf past the keys and rows.
    let mut x: Vec<Vec<String>> = Vec::new();
    for (ti, tile) in s_acc.iter().enumerate() {
        let mut xs = Vec::new();
        for (qi, acc) in tile.iter().enumerate() {
            let r = qi / 2;
            let kc = b.i64c(8 * ti as i64 + (qi % 2) as i64);
            let key = b.ibin("addi", &t0, &kc);
            let key = b.ibin("addi", &key, &t2);
            let key_ok = b.icmp("slt", &key, sk);
            let both = b.val(&format!("arith.andi {key_ok}, {} : i1", ok[r]));
            let sv = b.fbin("mulf", acc, scale);
            let prologue = |b: &mut Body| {
                let y = exprs(b, spec, &mut |b: &mut Body, j: usize| {
                    if j == score {
                        return Val::F(sv.clone());
                    }
                    let start = starts[r][j].clone().expect("only the score input has no start");
                    let at = if spec.inputs[j].1 {
                        b.ibin("addi", &start, &key)
                    } else {
                        start
                    };
                    load_elem(b, spec.inputs[j].0, &ins[j], &at)
                });
                y.f().to_string()
            };
            xs.push(guarded(b, &both, "f32", prologue, |_| ninf.clone()));
        }
        x.push(xs);
    }
    // Online softmax per row (r = 0: accumulators 0, 1; r = 1: 2, 3).
    let mut m_new = Vec::new();
    let mut alpha = Vec::new();
    let mut p: Vec<Vec<String>> = vec![Vec::new(); 8];
    let mut l_new = Vec::new();
    for r in 0..2 {
        let mut mx = x[0][2 * r].clone();
        for (ti, xs) in x.iter().enumerate() {
            for qi in [2 * r, 2 * r + 1] {
                if ti == 0 && qi == 2 * r {
                    continue;
                }
                mx = b.pick("ogt", &mx, &xs[qi]);
            }
        }
        // The row's four lanes (l % 4) hold its 64 scores between them.
        for off in [1, 2] {
            let o = b.i32c(off);
            let s = b.fresh();
            let okv = b.fresh();
            b.line(&format!("{s}, {okv} = gpu.shuffle xor {mx}, {o}, {width} : f32"));
            mx = b.pick("ogt", &mx, &s);
        }
        let m = b.pick("ogt", &carried[r], &mx);
        let dead = b.val(&format!("arith.cmpf oeq, {m}, {ninf} : f32"));
        let m_use = b.select(&dead, &fzero, &m, "f32");
        let dm = b.fbin("subf", &carried[r], &m_use);
        let a = b.val(&format!("math.exp {dm} : f32"));
        let mut sum = b.fbin("mulf", &carried[2 + r], &a);
        for (ti, xs) in x.iter().enumerate() {
            for qi in [2 * r, 2 * r + 1] {
                let dx = b.fbin("subf", &xs[qi], &m_use);
                let e = b.val(&format!("math.exp {dx} : f32"));
                sum = b.fbin("addf", &sum, &e);
                p[ti].push(e);
            }
        }
        m_new.push(m);
        alpha.push(a);
        l_new.push(sum);
    }
    // p[ti] was filled row 0's pair then row 1's pair: the accumulator order 0, 1, 2, 3.
    let mut o_acc: Vec<Vec<String>> = (0..ntiles)
        .map(|ti| {
            (0..4)
                .map(|qi| b.fbin("mulf", &carried[4 + 4 * ti + qi], &alpha[qi / 2]))
                .collect()
        })
        .collect();
    // O += P V, 16 keys at a time: P's A fragment from score tiles 2kk and 2kk + 1.
    for kk in 0..4usize {
        let a = [
            pack_bf16(b, &p[2 * kk][0], &p[2 * kk][1]),
            pack_bf16(b, &p[2 * kk][2], &p[2 * kk][3]),
            pack_bf16(b, &p[2 * kk + 1][0], &p[2 * kk + 1][1]),
            pack_bf16(b, &p[2 * kk + 1][2], &p[2 * kk + 1][3]),
        ];
        for np in 0..ntiles / 2 {
            let r = ldm(b, &v_at, 16 * kk as i64 * pitch_words * 4 + 32 * np as i64, true);
            for h2 in 0..2usize {
                let ti = 2 * np + h2;
                let d = mma_bf16(b, &a, &r[2 * h2..2 * h2 + 2], &o_acc[ti]);
                o_acc[ti] = d;
            }
        }
    }
    let mut next: Vec<&str> = vec![&m_new[0], &m_new[1], &l_new[0], &l_new[1]];
    for tile in &o_acc {
        next.extend(tile.iter().map(|s| s.as_str()));
    }
    let yields: Vec<(&str, &str)> = next.iter().map(|v| (*v, "f32")).collect();
    b.end_for(&yields);
    // Whole-row sums, then out[row][8 j + 2t + (0, 1)] = o / l.
    let fone = b.f32c(1.0);
    for r in 0..2 {
        let mut l = results[2 + r].clone();
        for off in [1, 2] {
            let o = b.i32c(off);
            let s = b.fresh();
            let okv = b.fresh();
            b.line(&format!("{s}, {okv} = gpu.shuffle xor {l}, {o}, {width} : f32"));
            l = b.fbin("addf", &l, &s);
        }
        let inv = b.fbin("divf", &fone, &l);
        b.begin_if(&ok[r]);
        for ti in 0..ntiles {
            for e in 0..2 {
                let y = b.fbin("mulf", &results[4 + 4 * ti + 2 * r + e], &inv);
                let col = b.i64c(8 * ti as i64 + e as i64);
                let col = b.ibin("addi", &col, &t2);
                let at = b.ibin("addi", &o_at[r], &col);
                b.store(&y, o, &at, "f32");
            }
        }
        b.end_if();
    }
    f.finish(out);
    Ok(())
}
