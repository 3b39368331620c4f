//! Kernel code generation with Cranelift.
//!
//! Every kernel has the ABI of `kiln_runtime`'s `KernelFn`: it walks `rows` rows of `n` elements;
//! per row, each operand's element offset is read from the offsets table, so any broadcast over
//! leading axes costs nothing in the loop. Along the last axis an input is either contiguous or
//! broadcast (one value per row), as the plan decided from the types. Loops run four f32 lanes at
//! a time (SSE, 128-bit: Cranelift's widest) with a scalar tail; kernels touching `bool` tensors run
//! scalar. exp, tanh, sigmoid and erf are computed inline (range reduction + polynomials, about
//! 1e-7 relative error), so kernels call nothing and the code is position independent: it is
//! stored in the artifact as raw bytes.

use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{
    types, AbiParam, Endianness, Function, InstBuilder, MemFlagsData as MemFlags, Signature, Type, UserFuncName, Value,
};
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use kiln_ir::{BinaryOp, CmpOp, DType, ReduceOp, UnaryOp};
use kiln_runtime::cpu::Level;
use kiln_runtime::plan::KernelKind;

use crate::plan::{Expr, KernelSpec};

/// A Cranelift code generator for one CPU level.
pub struct Codegen {
    isa: OwnedTargetIsa,
    fma: bool,
    /// The level the code is generated for.
    pub level: Level,
}

/// Cranelift's x64 flag for a level feature, where Cranelift has one (it has none for F16C,
/// MOVBE, AVX-512 BW/CD, which its code never needs).
fn cranelift_flag(feature: &str) -> Option<&'static str> {
    Some(match feature {
        "sse3" => "has_sse3",
        "ssse3" => "has_ssse3",
        "sse4.1" => "has_sse41",
        "sse4.2" => "has_sse42",
        "popcnt" => "has_popcnt",
        "cmpxchg16b" => "has_cmpxchg16b",
        "avx" => "has_avx",
        "avx2" => "has_avx2",
        "fma" => "has_fma",
        "bmi1" => "has_bmi1",
        "bmi2" => "has_bmi2",
        "lzcnt" => "has_lzcnt",
        "avx512f" => "has_avx512f",
        "avx512dq" => "has_avx512dq",
        "avx512vl" => "has_avx512vl",
        _ => return None,
    })
}

impl Codegen {
    /// A generator for `level`: Cranelift's ISA flags are the level's preset (x86-64-v2/v3/v4,
    /// or the architecture's baseline for `portable`), never the compiling machine's features.
    pub fn for_level(level: Level) -> Result<Codegen, String> {
        let mut flags = settings::builder();
        flags.set("opt_level", "speed").map_err(|e| e.to_string())?;
        flags.set("is_pic", "true").map_err(|e| e.to_string())?;
        let mut builder = cranelift_native::builder_with_options(false).map_err(|e| e.to_string())?;
        for feature in level.features() {
            // Cranelift's presets leave out `has_avx` (x86-64-v3) and `has_avx512f` (v4), which
            // its FMA and AVX-512 lowerings test: set every flag of the level by hand.
            if let Some(flag) = cranelift_flag(feature) {
                builder
                    .enable(flag)
                    .map_err(|e| format!("Cranelift flag {flag}: {e}"))?;
            }
        }
        let isa = builder.finish(settings::Flags::new(flags)).map_err(|e| e.to_string())?;
        let fma = isa
            .isa_flags()
            .iter()
            .any(|v| v.name == "has_fma" && v.as_bool() == Some(true));
        Ok(Codegen { isa, fma, level })
    }

    /// Generates one kernel's machine code.
    pub fn compile(&self, spec: &KernelSpec) -> Result<Vec<u8>, String> {
        let ptr = types::I64;
        let mut func = Function::with_name_signature(UserFuncName::user(0, 0), {
            let mut sig = Signature::new(self.isa.default_call_conv());
            for _ in 0..4 {
                sig.params.push(AbiParam::new(ptr));
            }
            sig
        });
        let mut fctx = FunctionBuilderContext::new();
        let mut b = FunctionBuilder::new(&mut func, &mut fctx);
        let vector = spec.inputs.iter().all(|(d, _)| *d == DType::F32) && spec.output == DType::F32;
        let mut g = Gen {
            b: &mut b,
            fma: self.fma,
            spec,
        };
        g.body(vector);
        b.seal_all_blocks();
        b.finalize(self.isa.frontend_config());
        let mut ctx = Context::for_function(func);
        let code = ctx
            .compile(&*self.isa, &mut ControlPlane::default())
            .map_err(|e| format!("{:?}", e.inner))?;
        if !code.buffer.relocs().is_empty() {
            return Err(format!(
                "kernel `{}` needs relocations ({:?}), which artifacts cannot carry",
                spec.name,
                code.buffer
                    .relocs()
                    .iter()
                    .map(|r| format!("{:?}", r.target))
                    .collect::<Vec<_>>()
            ));
        }
        Ok(code.code_buffer().to_vec())
    }
}

struct Gen<'a, 'b> {
    b: &'a mut FunctionBuilder<'b>,
    fma: bool,
    spec: &'a KernelSpec,
}

/// The values of one lane group: f32 (or f32x4) data, or conditions.
#[derive(Clone, Copy)]
enum V {
    F(Value),
    /// Scalar: i8 0/1. Vector: i32x4 all-ones/zero mask.
    C(Value),
}

fn esize(d: DType) -> i64 {
    d.size_bytes() as i64
}

impl Gen<'_, '_> {
    fn data() -> MemFlags {
        MemFlags::new().with_notrap()
    }

    fn body(&mut self, vector: bool) {
        let spec = self.spec;
        let nin = spec.inputs.len();
        let nops = nin as i64 + 1;
        let entry = self.b.create_block();
        self.b.append_block_params_for_function_params(entry);
        self.b.switch_to_block(entry);
        let p = self.b.block_params(entry).to_vec();
        let (rows, n, offs, ptrs) = (p[0], p[1], p[2], p[3]);
        let trusted = MemFlags::trusted();
        let bases: Vec<Value> = (0..=nin)
            .map(|j| self.b.ins().load(types::I64, trusted, ptrs, (8 * j) as i32))
            .collect();

        let r = self.b.declare_var(types::I64);
        let zero = self.b.ins().iconst(types::I64, 0);
        self.b.def_var(r, zero);
        let row_head = self.b.create_block();
        let row_body = self.b.create_block();
        let exit = self.b.create_block();
        self.b.ins().jump(row_head, &[]);

        self.b.switch_to_block(row_head);
        let rv = self.b.use_var(r);
        let more = self
            .b
            .ins()
            .icmp(cranelift_codegen::ir::condcodes::IntCC::SignedLessThan, rv, rows);
        self.b.ins().brif(more, row_body, &[], exit, &[]);

        self.b.switch_to_block(row_body);
        let rv = self.b.use_var(r);
        let row_off = self.b.ins().imul_imm_s(rv, nops * 8);
        let row_ptr = self.b.ins().iadd(offs, row_off);
        let mut addrs = Vec::new();
        for (j, &base) in bases.iter().enumerate() {
            let dt = if j < nin { spec.inputs[j].0 } else { spec.output };
            let o = self.b.ins().load(types::I64, trusted, row_ptr, (8 * j) as i32);
            let bytes = self.b.ins().imul_imm_s(o, esize(dt));
            addrs.push(self.b.ins().iadd(base, bytes));
        }
        // Inputs broadcast along the last axis: one value per row.
        let mut row_scalars: Vec<Option<V>> = vec![None; nin];
        for j in 0..nin {
            if !spec.inputs[j].1 {
                row_scalars[j] = Some(self.load_scalar(spec.inputs[j].0, addrs[j]));
            }
        }
        let row_vectors: Vec<Option<V>> = row_scalars
            .iter()
            .map(|s| match s {
                Some(V::F(v)) if vector => Some(V::F(self.b.ins().splat(types::F32X4, *v))),
                _ => None,
            })
            .collect();

        let out_at = addrs[nin];
        match spec.kind {
            KernelKind::Map => {
                self.sweep(vector, n, |g, iv, vec| {
                    let per = if vec { &row_vectors } else { &row_scalars };
                    let res = g.eval(vec, iv, &addrs, per);
                    g.store_elem(res, out_at, iv);
                });
            }
            KernelKind::ReduceLast => {
                let op = spec.reduce.expect("reductions name their op");
                let mut total = self.reduce_sweep(vector, n, op, &addrs, &row_scalars, &row_vectors, None);
                if op == ReduceOp::Mean {
                    let nf = self.b.ins().fcvt_from_sint(types::F32, n);
                    total = self.b.ins().fdiv(total, nf);
                }
                self.b.ins().store(Self::data(), total, out_at, 0);
            }
            KernelKind::SoftmaxLast => {
                // Three sweeps over the row: max, exp(x - max) stored and summed, scale by 1/sum.
                let max = self.reduce_sweep(vector, n, ReduceOp::Max, &addrs, &row_scalars, &row_vectors, None);
                let sum = self.reduce_sweep(
                    vector,
                    n,
                    ReduceOp::Sum,
                    &addrs,
                    &row_scalars,
                    &row_vectors,
                    Some((max, out_at)),
                );
                let one = self.b.ins().f32const(1.0);
                let inv = self.b.ins().fdiv(one, sum);
                let inv_v = self.b.ins().splat(types::F32X4, inv);
                self.sweep(vector, n, |g, iv, vec| {
                    let off = g.b.ins().imul_imm_s(iv, 4);
                    let at = g.b.ins().iadd(out_at, off);
                    let (ty, k) = if vec { (types::F32X4, inv_v) } else { (types::F32, inv) };
                    let x = g.b.ins().load(ty, Self::data(), at, 0);
                    let y = g.b.ins().fmul(x, k);
                    g.b.ins().store(Self::data(), y, at, 0);
                });
            }
        }
        let rv = self.b.use_var(r);
        let next = self.b.ins().iadd_imm_s(rv, 1);
        self.b.def_var(r, next);
        self.b.ins().jump(row_head, &[]);

        self.b.switch_to_block(exit);
        self.b.ins().return_(&[]);
    }

    /// Emits a loop over `0..n`: four lanes at a time while it can, then one at a time. `f` emits
    /// the body for element `i` (vector or scalar).
    fn sweep(&mut self, vector: bool, n: Value, mut f: impl FnMut(&mut Self, Value, bool)) {
        let i = self.b.declare_var(types::I64);
        let zero = self.b.ins().iconst(types::I64, 0);
        self.b.def_var(i, zero);
        let tail_head = self.b.create_block();
        let tail_body = self.b.create_block();
        let done = self.b.create_block();
        if vector {
            let vhead = self.b.create_block();
            let vbody = self.b.create_block();
            let vend = self.b.ins().band_imm_s(n, !3i64);
            self.b.ins().jump(vhead, &[]);
            self.b.switch_to_block(vhead);
            let iv = self.b.use_var(i);
            let go = self
                .b
                .ins()
                .icmp(cranelift_codegen::ir::condcodes::IntCC::SignedLessThan, iv, vend);
            self.b.ins().brif(go, vbody, &[], tail_head, &[]);
            self.b.switch_to_block(vbody);
            let iv = self.b.use_var(i);
            f(self, iv, true);
            let next = self.b.ins().iadd_imm_s(iv, 4);
            self.b.def_var(i, next);
            self.b.ins().jump(vhead, &[]);
        } else {
            self.b.ins().jump(tail_head, &[]);
        }
        self.b.switch_to_block(tail_head);
        let iv = self.b.use_var(i);
        let go = self
            .b
            .ins()
            .icmp(cranelift_codegen::ir::condcodes::IntCC::SignedLessThan, iv, n);
        self.b.ins().brif(go, tail_body, &[], done, &[]);
        self.b.switch_to_block(tail_body);
        let iv = self.b.use_var(i);
        f(self, iv, false);
        let next = self.b.ins().iadd_imm_s(iv, 1);
        self.b.def_var(i, next);
        self.b.ins().jump(tail_head, &[]);
        self.b.switch_to_block(done);
    }

    fn store_elem(&mut self, v: V, base: Value, iv: Value) {
        match v {
            V::F(x) => {
                let off = self.b.ins().imul_imm_s(iv, 4);
                let at = self.b.ins().iadd(base, off);
                self.b.ins().store(Self::data(), x, at, 0);
            }
            V::C(c) => {
                let at = self.b.ins().iadd(base, iv);
                self.b.ins().store(Self::data(), c, at, 0);
            }
        }
    }

    /// Reduces the kernel's expression over the row. With `exp_store = (max, out)`, reduces
    /// `exp(x - max)` instead and stores each of those values to `out` (the softmax middle sweep).
    #[allow(clippy::too_many_arguments)]
    fn reduce_sweep(
        &mut self,
        vector: bool,
        n: Value,
        op: ReduceOp,
        addrs: &[Value],
        row_scalars: &[Option<V>],
        row_vectors: &[Option<V>],
        exp_store: Option<(Value, Value)>,
    ) -> Value {
        let init_value = self.reduce_init(op);
        let init = self.b.ins().f32const(init_value);
        let acc_s = self.b.declare_var(types::F32);
        self.b.def_var(acc_s, init);
        let acc_v = self.b.declare_var(types::F32X4);
        let init_v = self.b.ins().splat(types::F32X4, init);
        self.b.def_var(acc_v, init_v);
        let shift = exp_store.map(|(m, _)| (m, self.b.ins().splat(types::F32X4, m)));
        self.sweep(vector, n, |g, iv, vec| {
            let per = if vec { row_vectors } else { row_scalars };
            let V::F(mut x) = g.eval(vec, iv, addrs, per) else {
                unreachable!("reductions are over f32")
            };
            if let (Some((ms, mv)), Some((_, out))) = (shift, exp_store) {
                let d = g.b.ins().fsub(x, if vec { mv } else { ms });
                x = g.exp(vec, d);
                g.store_elem(V::F(x), out, iv);
            }
            let var = if vec { acc_v } else { acc_s };
            let a = g.b.use_var(var);
            let na = g.combine(op, a, x);
            g.b.def_var(var, na);
        });
        let mut total = self.b.use_var(acc_s);
        if vector {
            let v = self.b.use_var(acc_v);
            for lane in 0..4u8 {
                let x = self.b.ins().extractlane(v, lane);
                total = self.combine(op, total, x);
            }
        }
        total
    }

    fn reduce_init(&self, op: ReduceOp) -> f32 {
        match op {
            ReduceOp::Sum | ReduceOp::Mean => 0.0,
            ReduceOp::Max => f32::NEG_INFINITY,
            ReduceOp::Min => f32::INFINITY,
        }
    }

    fn combine(&mut self, op: ReduceOp, a: Value, x: Value) -> Value {
        match op {
            ReduceOp::Sum | ReduceOp::Mean => self.b.ins().fadd(a, x),
            ReduceOp::Max => self.pick(FloatCC::GreaterThan, a, x),
            ReduceOp::Min => self.pick(FloatCC::LessThan, a, x),
        }
    }

    /// `a cc x ? a : x`, for scalars or vectors.
    fn pick(&mut self, cc: FloatCC, a: Value, x: Value) -> Value {
        let c = self.b.ins().fcmp(cc, a, x);
        self.select(c, a, x)
    }

    fn select(&mut self, c: Value, a: Value, x: Value) -> Value {
        let ty = self.b.func.dfg.value_type(a);
        if ty.is_vector() {
            let m = self.b.ins().bitcast(ty, Self::lanes(), c);
            self.b.ins().bitselect(m, a, x)
        } else {
            self.b.ins().select(c, a, x)
        }
    }

    fn lanes() -> MemFlags {
        MemFlags::new().with_endianness(Endianness::Little)
    }

    fn load_scalar(&mut self, dt: DType, at: Value) -> V {
        match dt {
            DType::Bool => {
                let raw = self.b.ins().uload8(types::I32, Self::data(), at, 0);
                let c = self
                    .b
                    .ins()
                    .icmp_imm_s(cranelift_codegen::ir::condcodes::IntCC::NotEqual, raw, 0);
                V::C(c)
            }
            _ => V::F(self.b.ins().load(types::F32, Self::data(), at, 0)),
        }
    }

    fn konst(&mut self, vector: bool, c: f32) -> Value {
        let s = self.b.ins().f32const(c);
        if vector {
            self.b.ins().splat(types::F32X4, s)
        } else {
            s
        }
    }

    /// Evaluates the expression list at element `i`.
    fn eval(&mut self, vector: bool, i: Value, addrs: &[Value], per_row: &[Option<V>]) -> V {
        let spec = self.spec;
        let mut vals: Vec<V> = Vec::with_capacity(spec.exprs.len());
        for e in &spec.exprs {
            let v = match e {
                Expr::Input(j) => match per_row[*j] {
                    Some(v) => v,
                    None => {
                        let dt = spec.inputs[*j].0;
                        let off = self.b.ins().imul_imm_s(i, esize(dt));
                        let at = self.b.ins().iadd(addrs[*j], off);
                        if vector {
                            V::F(self.b.ins().load(types::F32X4, Self::data(), at, 0))
                        } else {
                            self.load_scalar(dt, at)
                        }
                    }
                },
                Expr::Const(c) => V::F(self.konst(vector, *c)),
                Expr::Unary(u, a) => V::F(self.unary(vector, *u, f(vals[*a]))),
                Expr::Binary(op, a, c) => V::F(self.binary(*op, f(vals[*a]), f(vals[*c]))),
                Expr::Compare(cc, a, c) => {
                    let cc = match cc {
                        CmpOp::Eq => FloatCC::Equal,
                        CmpOp::Ne => FloatCC::NotEqual,
                        CmpOp::Lt => FloatCC::LessThan,
                        CmpOp::Le => FloatCC::LessThanOrEqual,
                        CmpOp::Gt => FloatCC::GreaterThan,
                        CmpOp::Ge => FloatCC::GreaterThanOrEqual,
                    };
                    V::C(self.b.ins().fcmp(cc, f(vals[*a]), f(vals[*c])))
                }
                Expr::Where(c, a, x) => {
                    let V::C(c) = vals[*c] else {
                        unreachable!("where conditions are conditions")
                    };
                    V::F(self.select(c, f(vals[*a]), f(vals[*x])))
                }
            };
            vals.push(v);
        }
        *vals.last().expect("kernels have at least one expression")
    }

    fn binary(&mut self, op: BinaryOp, a: Value, x: Value) -> Value {
        match op {
            BinaryOp::Add => self.b.ins().fadd(a, x),
            BinaryOp::Sub => self.b.ins().fsub(a, x),
            BinaryOp::Mul => self.b.ins().fmul(a, x),
            BinaryOp::Div => self.b.ins().fdiv(a, x),
            BinaryOp::Max => self.pick(FloatCC::GreaterThan, a, x),
            BinaryOp::Min => self.pick(FloatCC::LessThan, a, x),
            BinaryOp::Pow => unreachable!("pow is not fused"),
        }
    }

    fn mul_add(&mut self, a: Value, x: Value, c: Value) -> Value {
        if self.fma {
            self.b.ins().fma(a, x, c)
        } else {
            let m = self.b.ins().fmul(a, x);
            self.b.ins().fadd(m, c)
        }
    }

    fn int_ty(vector: bool) -> Type {
        if vector {
            types::I32X4
        } else {
            types::I32
        }
    }

    fn bitcast_int(&mut self, vector: bool, x: Value) -> Value {
        let flags = if vector { Self::lanes() } else { MemFlags::new() };
        self.b.ins().bitcast(Self::int_ty(vector), flags, x)
    }

    fn bitcast_float(&mut self, vector: bool, x: Value) -> Value {
        let (ty, flags) = if vector {
            (types::F32X4, Self::lanes())
        } else {
            (types::F32, MemFlags::new())
        };
        self.b.ins().bitcast(ty, flags, x)
    }

    fn iconst32(&mut self, vector: bool, v: i32) -> Value {
        let s = self.b.ins().iconst(types::I32, v as i64);
        if vector {
            self.b.ins().splat(types::I32X4, s)
        } else {
            s
        }
    }

    /// `|x|` with the sign of `s`.
    fn with_sign_of(&mut self, vector: bool, mag: Value, s: Value) -> Value {
        let mi = self.bitcast_int(vector, mag);
        let si = self.bitcast_int(vector, s);
        let sign = self.iconst32(vector, i32::MIN);
        let sb = self.b.ins().band(si, sign);
        let r = self.b.ins().bor(mi, sb);
        self.bitcast_float(vector, r)
    }

    fn exp(&mut self, vector: bool, x: Value) -> Value {
        use kiln_runtime::softmax::{LN2_HI, LN2_LO, LOG2_E, MAGIC, OVER, TAYLOR, UNDER};
        let lo = self.konst(vector, UNDER);
        let hi = self.konst(vector, OVER);
        let under = self.b.ins().fcmp(FloatCC::LessThan, x, lo);
        let x = self.pick(FloatCC::GreaterThan, x, lo);
        let x = self.pick(FloatCC::LessThan, x, hi);
        let log2e = self.konst(vector, LOG2_E);
        let magic = self.konst(vector, MAGIC); // 1.5 * 2^23: adding it rounds to an integer
        let t = self.mul_add(x, log2e, magic);
        let nf = self.b.ins().fsub(t, magic);
        let ln2_hi = self.konst(vector, LN2_HI);
        let ln2_lo = self.konst(vector, LN2_LO);
        let r = self.mul_add(nf, ln2_hi, x);
        let r = self.mul_add(nf, ln2_lo, r);
        // e^r on |r| <= ln2/2, Taylor to degree 7.
        let mut p = self.konst(vector, TAYLOR[0]);
        for c in &TAYLOR[1..] {
            let cv = self.konst(vector, *c);
            p = self.mul_add(p, r, cv);
        }
        let ti = self.bitcast_int(vector, t);
        let mi = self.iconst32(vector, kiln_runtime::softmax::EXP_BIAS_BITS);
        let e = self.b.ins().isub(ti, mi);
        let e = self.b.ins().ishl_imm_u(e, 23);
        let scale = self.bitcast_float(vector, e);
        let res = self.b.ins().fmul(p, scale);
        let zero = self.konst(vector, 0.0);
        self.select(under, zero, res)
    }

    fn unary(&mut self, vector: bool, u: UnaryOp, x: Value) -> Value {
        match u {
            UnaryOp::Neg => self.b.ins().fneg(x),
            UnaryOp::Abs => self.b.ins().fabs(x),
            UnaryOp::Sqrt => self.b.ins().sqrt(x),
            UnaryOp::Rsqrt => {
                let s = self.b.ins().sqrt(x);
                let one = self.konst(vector, 1.0);
                self.b.ins().fdiv(one, s)
            }
            UnaryOp::Recip => {
                let one = self.konst(vector, 1.0);
                self.b.ins().fdiv(one, x)
            }
            UnaryOp::Relu => {
                let zero = self.konst(vector, 0.0);
                self.pick(FloatCC::GreaterThan, x, zero)
            }
            UnaryOp::Exp => self.exp(vector, x),
            UnaryOp::Sigmoid => {
                let nx = self.b.ins().fneg(x);
                let e = self.exp(vector, nx);
                let one = self.konst(vector, 1.0);
                let d = self.b.ins().fadd(one, e);
                self.b.ins().fdiv(one, d)
            }
            UnaryOp::Tanh => {
                // tanh|x| = (1 - e^-2|x|) / (1 + e^-2|x|), then the sign of x.
                let a = self.b.ins().fabs(x);
                let m2 = self.konst(vector, -2.0);
                let y = self.b.ins().fmul(a, m2);
                let t = self.exp(vector, y);
                let one = self.konst(vector, 1.0);
                let num = self.b.ins().fsub(one, t);
                let den = self.b.ins().fadd(one, t);
                let q = self.b.ins().fdiv(num, den);
                self.with_sign_of(vector, q, x)
            }
            UnaryOp::Erf => {
                // Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), with the sign of x.
                let a = self.b.ins().fabs(x);
                let p = self.konst(vector, 0.327_591_1);
                let one = self.konst(vector, 1.0);
                let d = self.mul_add(p, a, one);
                let t = self.b.ins().fdiv(one, d);
                let cs = [1.061_405_4, -1.453_152_1, 1.421_413_8, -0.284_496_72, 0.254_829_6];
                let mut poly = self.konst(vector, cs[0]);
                for c in &cs[1..] {
                    let cv = self.konst(vector, *c);
                    poly = self.mul_add(poly, t, cv);
                }
                poly = self.b.ins().fmul(poly, t);
                let a2 = self.b.ins().fmul(a, a);
                let na2 = self.b.ins().fneg(a2);
                let e = self.exp(vector, na2);
                let pe = self.b.ins().fmul(poly, e);
                let y = self.b.ins().fsub(one, pe);
                self.with_sign_of(vector, y, x)
            }
            UnaryOp::Log | UnaryOp::Sin | UnaryOp::Cos | UnaryOp::Not => unreachable!("not fused"),
        }
    }
}

fn f(v: V) -> Value {
    match v {
        V::F(x) => x,
        V::C(_) => unreachable!("conditions are only used by where"),
    }
}
