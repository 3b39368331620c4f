//! Loading and running a model.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use kiln_ir::{DType, Tensor};

use crate::input::InputTensor;

use crate::cpu::{CpuArg, Level, Vnni};
use crate::kernels::{self, Buf, KernelFn};
use crate::plan::{Manifest, Step, Storage};
use crate::{artifact, attention};
use crate::{LoadError, RunError};

enum Bytes {
    Map(memmap2::Mmap),
    Owned(Vec<kernels::Align64>, usize),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Owned(v, len) => &kernels::bytes_of(v)[..*len],
        }
    }
}

/// The largest single value a run may allocate (1 TiB).
const MAX_VALUE_BYTES: usize = 1 << 40;

/// Measurements of one run.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunStats {
    /// Bytes of the activation arena (every temporary, with liveness-based reuse).
    pub peak_activation_bytes: usize,
    /// What the same temporaries would take without reuse.
    pub unshared_activation_bytes: usize,
    /// Bytes of weights the steps read: every weight operand, except that a mixture of experts
    /// counts only the experts some row was routed to.
    pub weight_bytes_read: usize,
}

/// Where one run spent its time, by kind of step.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// `(kind, seconds, steps)`, kinds such as `matmul`, `kernel:map`, `transpose`.
    pub by_kind: Vec<(String, f64, usize)>,
}

/// A loaded model, ready to run.
pub struct Model {
    bytes: Bytes,
    manifest: Manifest,
    weights: std::ops::Range<usize>,
    /// Executable copy of the code section; kernels point into it.
    _code: Option<memmap2::Mmap>,
    kernels: Vec<KernelFn>,
    pool: rayon::ThreadPool,
    /// The threads of products, attention and generated kernels (`pool.rs`); rayon's pool runs
    /// the rest.
    spin: crate::pool::Pool,
    /// Whether a step may run the gemm crate, which parallelises on rayon's current pool.
    uses_rayon: bool,
    threads: usize,
    /// Whether quantized products of a few rows quantize their activations to int8.
    int8_activations: bool,
    /// The CPU level kernels dispatch on: the artifact's.
    level: Level,
    /// The integer dot products quantized prefills use: the artifact's, if it allows them.
    vnni: Vnni,
    /// The VNNI form of decode steps' integer dot products (the artifact's; exact either way).
    decode_vnni: Vnni,
    /// Quantized weights packed for the VNNI kernel, by value, on first use (prefills).
    ipacked: Vec<std::sync::OnceLock<crate::igemm::Packed>>,
    /// Activation arenas of finished runs, reused by the next.
    arenas: crate::arena::Arenas,
    /// The weight bytes runs read, worked out at load.
    reads: crate::reads::WeightReads,
    /// Seconds spent in `load` after the file was mapped.
    pub load_seconds: f64,
}

/// Checks that this CPU runs the artifact's code: every feature it records that this runtime
/// knows must be present (unknown names are skipped). Returns the level kernels dispatch on.
fn check_cpu(t: &crate::plan::Target) -> Result<Level, LoadError> {
    let level = t.level();
    // The level's own features too: kernels dispatch on the level, whatever the list says.
    let mut wanted = t.features.clone();
    wanted.extend(
        level
            .features()
            .iter()
            .map(|f| f.to_string())
            .filter(|f| !t.features.contains(f)),
    );
    let missing = crate::cpu::missing(&wanted);
    if missing.is_empty() {
        return Ok(level);
    }
    let name = if t.level.is_empty() {
        "its CPU features"
    } else {
        t.level.as_str()
    };
    Err(LoadError::Target {
        wanted: format!("{name} (code using {})", t.features.join(", ")),
        have: format!(
            "a CPU without {} ({}, which runs up to {}; compile with --cpu {} or lower)",
            missing.join(", "),
            crate::cpu::model_name(),
            Level::host(),
            Level::host()
        ),
    })
}

impl Model {
    /// Maps and validates an artifact file.
    pub fn load(path: &Path) -> Result<Model, LoadError> {
        let map = artifact::map(path)?;
        Model::from_parts(Bytes::Map(map))
    }

    /// Validates an artifact held in memory (the bytes are copied).
    pub fn from_bytes(b: &[u8]) -> Result<Model, LoadError> {
        Model::from_parts(Bytes::Owned(kernels::aligned_copy(b), b.len()))
    }

    fn from_parts(bytes: Bytes) -> Result<Model, LoadError> {
        let start = Instant::now();
        let s = artifact::decode(bytes.as_slice())?;
        let m = s.manifest;
        if m.target.arch != std::env::consts::ARCH {
            return Err(LoadError::Target {
                wanted: m.target.arch.clone(),
                have: std::env::consts::ARCH.to_string(),
            });
        }
        let level = check_cpu(&m.target)?;
        // Decode steps' integer products give the same sums with VNNI, if the artifact records it.
        let decode_vnni = Vnni::from_features(level, &m.target.features);
        // VNNI serves prefills' integer products only if the artifact allows them.
        let vnni = if m.target.int8_prefill { decode_vnni } else { Vnni::None };
        crate::validate::manifest(&m, s.weights.len(), s.code.len())?;
        check_packed_weights(&m, &bytes.as_slice()[s.weights.clone()])?;
        let code_bytes = &bytes.as_slice()[s.code.clone()];
        let (code, kernels) = if m.kernels.is_empty() {
            (None, Vec::new())
        } else {
            let exec = kernels::executable(code_bytes)
                .map_err(|e| LoadError::Corrupt(format!("cannot map code executable: {e}")))?;
            let base = exec.as_ptr();
            let fns = m
                .kernels
                .iter()
                .map(|k| {
                    // SAFETY: the offset was validated to lie in the code section, which holds
                    // functions with the kernel ABI at the offsets the compiler recorded.
                    unsafe { std::mem::transmute::<*const u8, KernelFn>(base.add(k.offset as usize)) }
                })
                .collect();
            (Some(exec), fns)
        };
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let pool = kernels::pool(threads).map_err(LoadError::Corrupt)?;
        let spin = crate::pool::Pool::new(threads).map_err(LoadError::Corrupt)?;
        let uses_rayon = m.steps.iter().any(|s| {
            matches!(
                s,
                Step::MatMul { .. } | Step::QMatMul { .. } | Step::SpMatMul { .. } | Step::SpMatMul24 { .. }
            )
        });
        let values = m.values.len();
        let reads = crate::reads::WeightReads::of(&m);
        Ok(Model {
            bytes,
            manifest: m,
            weights: s.weights,
            _code: code,
            kernels,
            pool,
            spin,
            uses_rayon,
            threads,
            int8_activations: true,
            level,
            vnni,
            decode_vnni,
            ipacked: (0..values).map(|_| std::sync::OnceLock::new()).collect(),
            arenas: Default::default(),
            reads,
            load_seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Touches every page of the weights, so the first run does not pay for page faults (the
    /// weights are memory-mapped: otherwise they are read from the page cache or the disk on
    /// first use). Returns the bytes touched.
    pub fn prefault(&self) -> usize {
        let w = &self.bytes.as_slice()[self.weights.clone()];
        let mut acc = 0u8;
        for page in w.chunks(4096) {
            acc ^= page[0];
        }
        std::hint::black_box(acc);
        w.len()
    }

    /// Sets the number of threads kernels use (default: all cores).
    pub fn set_threads(&mut self, n: usize) -> Result<(), String> {
        let n = n.max(1);
        self.pool = kernels::pool(n)?;
        self.spin = crate::pool::Pool::new(n)?;
        self.threads = n;
        Ok(())
    }

    /// Whether products with quantized weights and at most 4 rows of activations (decode steps)
    /// quantize the activations to int8 in blocks of 32 and use integer dot products (the default,
    /// on CPUs with AVX2), or multiply the exact f32 activations as the interpreter does. The
    /// integer path is faster and adds an error of at most half an activation step per product
    /// term (see `q8.rs`).
    pub fn set_int8_activations(&mut self, on: bool) {
        self.int8_activations = on;
    }

    /// The CPU level the artifact was compiled for, which its kernels dispatch on.
    pub fn level(&self) -> Level {
        self.level
    }

    /// The manifest (signature, plan, kernels).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Runs the model.
    pub fn run<T: InputTensor>(&self, inputs: &BTreeMap<String, T>) -> Result<Vec<(String, Tensor)>, RunError> {
        self.run_with_stats(inputs).map(|(o, _)| o)
    }

    /// Runs the model and reports memory use.
    pub fn run_with_stats<T: InputTensor>(
        &self,
        inputs: &BTreeMap<String, T>,
    ) -> Result<(Vec<(String, Tensor)>, RunStats), RunError> {
        self.run_inner(inputs, None, None)
    }

    /// Runs the model once, timing every step; returns time per kind of step, slowest first.
    pub fn profile(&self, inputs: &BTreeMap<String, Tensor>) -> Result<Profile, RunError> {
        let mut times = vec![0.0f64; self.manifest.steps.len()];
        self.run_inner(inputs, Some(&mut times), None)?;
        Ok(self.profile_of(&times))
    }

    /// Runs the model once, timing every step: seconds per manifest step.
    pub fn step_times(&self, inputs: &BTreeMap<String, Tensor>) -> Result<Vec<f64>, RunError> {
        let mut times = vec![0.0f64; self.manifest.steps.len()];
        self.run_inner(inputs, Some(&mut times), None)?;
        Ok(times)
    }

    /// How a product's activation kernel runs: from its tape at the level's vector width where
    /// that is faster, else the generated code.
    fn post(&self, k: usize) -> crate::gemm::Post {
        let d = &self.manifest.kernels[k];
        match &d.tape {
            Some(t) if d.inputs.len() == 1 && crate::vmap::pays(self.level) => {
                crate::gemm::Post::Tape(t.as_ptr(), t.len(), self.level)
            }
            _ => crate::gemm::Post::Kernel(self.kernels[k]),
        }
    }

    /// Seconds per step, summed by kind of step, slowest first.
    pub(crate) fn profile_of(&self, times: &[f64]) -> Profile {
        let mut by: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for (step, t) in self.manifest.steps.iter().zip(times) {
            let e = by.entry(step_kind(step)).or_default();
            e.0 += t;
            e.1 += 1;
        }
        let mut by_kind: Vec<(String, f64, usize)> = by.into_iter().map(|(k, (t, n))| (k, t, n)).collect();
        by_kind.sort_by(|a, b| b.1.total_cmp(&a.1));
        Profile { by_kind }
    }

    pub(crate) fn run_inner<T: InputTensor>(
        &self,
        inputs: &BTreeMap<String, T>,
        mut times: Option<&mut Vec<f64>>,
        mut cache: Option<&mut crate::session::KvCache>,
    ) -> Result<(Vec<(String, Tensor)>, RunStats), RunError> {
        let m = &self.manifest;
        let syms = self.bind(inputs)?;
        let defaults = crate::input::defaults(m, inputs, &syms)?;
        let shapes: Vec<Vec<usize>> = m
            .values
            .iter()
            .map(|v| v.shape.iter().map(|d| d.eval(&syms)).collect())
            .collect();
        let sizes: Vec<usize> = m
            .values
            .iter()
            .zip(&shapes)
            .map(|(v, s)| s.iter().fold(v.dtype.size_bytes(), |a, d| a.saturating_mul(*d)))
            .collect();
        // A value larger than any machine's memory means the plan and the inputs disagree.
        if let Some((i, s)) = sizes.iter().enumerate().find(|(_, s)| **s > MAX_VALUE_BYTES) {
            return Err(self.step_err(usize::MAX, i, format!("needs a buffer of {s} bytes")));
        }
        let (offsets, arena_len, unshared) = self.plan_memory(&sizes);
        if arena_len > MAX_VALUE_BYTES {
            return Err(RunError::Step {
                step: usize::MAX,
                node: String::new(),
                msg: format!("activations need {arena_len} bytes"),
            });
        }
        let mut arena = self.arenas.take(arena_len).ok_or_else(|| RunError::Step {
            step: usize::MAX,
            node: String::new(),
            msg: format!("cannot allocate {arena_len} bytes of activations"),
        })?;
        let arena_ptr = arena.as_mut_ptr();
        let weights = &self.bytes.as_slice()[self.weights.clone()];
        // Base pointer and byte length of every value.
        let mut bufs: Vec<Buf> = vec![
            Buf {
                ptr: std::ptr::null_mut(),
                len: 0
            };
            m.values.len()
        ];
        for (i, v) in m.values.iter().enumerate() {
            bufs[i] = match &v.storage {
                Storage::Input(n) => {
                    let b = crate::input::input_bytes(m, inputs, &defaults, *n as usize);
                    Buf {
                        ptr: b.as_ptr() as *mut u8,
                        len: b.len(),
                    }
                }
                Storage::Weight { offset, len } => Buf {
                    ptr: weights[*offset as usize..].as_ptr() as *mut u8,
                    len: *len as usize,
                },
                // SAFETY: offsets come from `plan_memory`, which keeps every buffer inside the arena.
                Storage::Temp => Buf {
                    ptr: unsafe { arena_ptr.add(offsets[i]) },
                    len: sizes[i],
                },
                Storage::Alias(src) => {
                    let b = bufs[*src as usize];
                    if b.len != sizes[i] {
                        return Err(self.step_err(
                            usize::MAX,
                            i,
                            format!("reshape of {} bytes into {} bytes", b.len, sizes[i]),
                        ));
                    }
                    b
                }
            };
        }
        // Cache values read in place point into the session's cache.
        if let Some(cache) = cache.as_deref_mut() {
            for (si, step) in m.steps.iter().enumerate() {
                if let Step::CacheAppend {
                    x,
                    out,
                    slot,
                    view: true,
                } = step
                {
                    let xs = &shapes[*x as usize];
                    if xs.len() != 4 {
                        return Err(self.step_err(si, *out as usize, "cache_append of a non-rank-4 value".into()));
                    }
                    bufs[*out as usize] = cache
                        .slot_buf(*slot, xs[0], xs[1], xs[3])
                        .map_err(|msg| self.step_err(si, *out as usize, msg))?;
                }
            }
        }
        let routed = std::sync::atomic::AtomicUsize::new(0);
        let steps = || -> Result<(), RunError> {
            for (si, step) in m.steps.iter().enumerate() {
                let t = Instant::now();
                self.exec(step, &bufs, &shapes, &syms, cache.as_deref_mut(), &routed)
                    .map_err(|msg| {
                        let out = step.out() as usize;
                        RunError::Step {
                            step: si,
                            node: m.values[out].name.clone(),
                            msg,
                        }
                    })?;
                if let Some(times) = times.as_deref_mut() {
                    times[si] += t.elapsed().as_secs_f64();
                }
            }
            Ok(())
        };
        // Handing the loop to rayon's pool costs a thread wake-up per run (up to half a
        // millisecond here): only products through the gemm crate need rayon's pool.
        if self.uses_rayon {
            self.pool.install(|| self.spin.install(steps))?;
        } else {
            self.spin.install(steps)?;
        }
        let mut outs = Vec::new();
        for p in &m.outputs {
            let v = p.value as usize;
            let b = bufs[v];
            // SAFETY: `b` is a live buffer of `b.len` bytes (arena, weights or a caller's input).
            let bytes = unsafe { std::slice::from_raw_parts(b.ptr as *const u8, b.len) };
            let t = Tensor::from_le_bytes(m.values[v].dtype, shapes[v].clone(), bytes)
                .map_err(|e| self.step_err(usize::MAX, v, e.to_string()))?;
            outs.push((p.name.clone(), t));
        }
        drop(arena);
        Ok((
            outs,
            RunStats {
                peak_activation_bytes: arena_len,
                unshared_activation_bytes: unshared,
                weight_bytes_read: self.reads.bytes(&sizes) + routed.into_inner(),
            },
        ))
    }

    fn step_err(&self, step: usize, value: usize, msg: String) -> RunError {
        RunError::Step {
            step,
            node: self
                .manifest
                .values
                .get(value)
                .map(|v| v.name.clone())
                .unwrap_or_default(),
            msg,
        }
    }

    fn bind<T: InputTensor>(&self, inputs: &BTreeMap<String, T>) -> Result<Vec<usize>, RunError> {
        bind(&self.manifest, inputs)
    }

    fn plan_memory(&self, sizes: &[usize]) -> (Vec<usize>, usize, usize) {
        plan_memory(&self.manifest, sizes)
    }
    fn exec(
        &self,
        step: &Step,
        bufs: &[Buf],
        shapes: &[Vec<usize>],
        syms: &[usize],
        cache: Option<&mut crate::session::KvCache>,
        routed: &std::sync::atomic::AtomicUsize,
    ) -> Result<(), String> {
        // An optional operand (a product's bias or accumulator) with its shape.
        let opt = |v: &Option<u32>| v.map(|v| (bufs[v as usize], shapes[v as usize].as_slice()));
        match step {
            Step::CacheAppend { x, out, slot, view } => {
                let Some(cache) = cache else {
                    return Err(
                        "this model keeps a key/value cache: run it through a generation session (`kiln generate`, `Model::session`)"
                            .into(),
                    );
                };
                let (x, out) = (*x as usize, *out as usize);
                cache.append(*slot, (bufs[x], &shapes[x]), (bufs[out], &shapes[out]), *view)
            }
            Step::Kernel {
                kernel,
                kind,
                inputs,
                contiguous,
                out,
                space,
            } => {
                let space: Vec<usize> = space.iter().map(|d| d.eval(syms)).collect();
                let ins: Vec<(Buf, &[usize])> = inputs
                    .iter()
                    .map(|v| (bufs[*v as usize], shapes[*v as usize].as_slice()))
                    .collect();
                kernels::run_kernel(
                    self.kernels[*kernel as usize],
                    *kind,
                    &ins,
                    contiguous,
                    (bufs[*out as usize], &shapes[*out as usize]),
                    &space,
                    &self.manifest.kernels[*kernel as usize],
                    self.threads,
                )
            }
            Step::MatMul {
                a,
                b,
                out,
                ta,
                tb,
                scale,
                bias,
                acc,
            } => kernels::matmul(
                (bufs[*a as usize], &shapes[*a as usize]),
                (bufs[*b as usize], &shapes[*b as usize]),
                (bufs[*out as usize], &shapes[*out as usize]),
                kernels::Epilogue {
                    ta: *ta,
                    tb: *tb,
                    scale: *scale,
                    bias: opt(bias),
                    acc: opt(acc),
                },
                self.threads,
                self.level,
            ),
            Step::PackedMatMul {
                a,
                w,
                kernel,
                out,
                scale,
                bias,
                acc,
                post,
            } => kernels::packed_matmul(
                (bufs[*a as usize], &shapes[*a as usize]),
                (bufs[*w as usize], &shapes[*w as usize], kernel),
                (bufs[*out as usize], &shapes[*out as usize]),
                *scale,
                (opt(bias), opt(acc)),
                post.map(|k| self.post(k as usize)),
                self.threads,
            ),
            Step::QMatMul {
                a,
                codes,
                scales,
                mins,
                bits,
                group,
                out,
                scale,
                bias,
                acc,
            } => {
                let m = &self.manifest;
                let dt = |v: u32| m.values[v as usize].dtype;
                kernels::qmatmul(
                    (bufs[*a as usize], &shapes[*a as usize]),
                    kernels::QWeight {
                        codes: bufs[*codes as usize],
                        scales: (bufs[*scales as usize], dt(*scales)),
                        mins: mins.map(|v| (bufs[v as usize], dt(v))),
                        bits: *bits,
                        group: *group as usize,
                    },
                    (bufs[*out as usize], &shapes[*out as usize]),
                    *scale,
                    opt(bias),
                    opt(acc),
                    (self.int8_activations, &self.ipacked[*codes as usize], self.decode_vnni),
                    self.threads,
                    CpuArg {
                        level: self.level,
                        vnni: self.vnni,
                    },
                )
            }
            Step::SpMatMul24 {
                a,
                vals,
                idx,
                out,
                sparse_rows,
                scale,
                bias,
                acc,
            } => kernels::spmatmul24(
                (bufs[*a as usize], &shapes[*a as usize]),
                (bufs[*vals as usize], bufs[*idx as usize]),
                (bufs[*out as usize], &shapes[*out as usize]),
                usize::try_from(*sparse_rows).unwrap_or(usize::MAX),
                *scale,
                opt(bias),
                opt(acc),
                self.threads,
                self.level,
            ),
            Step::SpMatMul {
                a,
                row_ptr,
                cols,
                vals,
                out,
                sparse_rows,
                block,
                scale,
                bias,
                acc,
            } => kernels::spmatmul(
                (bufs[*a as usize], &shapes[*a as usize]),
                kernels::CsrWeight {
                    row_ptr: bufs[*row_ptr as usize],
                    cols: bufs[*cols as usize],
                    vals: bufs[*vals as usize],
                    block: [
                        usize::try_from(block[0]).unwrap_or(0),
                        usize::try_from(block[1]).unwrap_or(0),
                    ],
                },
                (bufs[*out as usize], &shapes[*out as usize]),
                usize::try_from(*sparse_rows).unwrap_or(usize::MAX),
                *scale,
                opt(bias),
                opt(acc),
                self.threads,
                self.level,
            ),
            Step::Gather { table, idx, out, axis } => {
                let m = &self.manifest;
                kernels::gather(
                    (
                        bufs[*table as usize],
                        &shapes[*table as usize],
                        m.values[*table as usize].dtype,
                    ),
                    (
                        bufs[*idx as usize],
                        &shapes[*idx as usize],
                        m.values[*idx as usize].dtype,
                    ),
                    (bufs[*out as usize], &shapes[*out as usize]),
                    *axis as usize,
                )
            }
            Step::Transpose { x, out, perm } => {
                let es = self.manifest.values[*x as usize].dtype.size_bytes();
                kernels::transpose(
                    (bufs[*x as usize], &shapes[*x as usize]),
                    (bufs[*out as usize], &shapes[*out as usize]),
                    perm,
                    es,
                )
            }
            Step::Slice { x, out, axis, start } => {
                let es = self.manifest.values[*x as usize].dtype.size_bytes();
                kernels::slice(
                    (bufs[*x as usize], &shapes[*x as usize]),
                    (bufs[*out as usize], &shapes[*out as usize]),
                    *axis as usize,
                    *start as usize,
                    es,
                )
            }
            Step::Concat { xs, out, axis } => {
                let es = self.manifest.values[*out as usize].dtype.size_bytes();
                let parts: Vec<(Buf, &[usize])> = xs
                    .iter()
                    .map(|v| (bufs[*v as usize], shapes[*v as usize].as_slice()))
                    .collect();
                kernels::concat(
                    &parts,
                    (bufs[*out as usize], &shapes[*out as usize]),
                    *axis as usize,
                    es,
                )
            }
            Step::Broadcast { x, out } => {
                let es = self.manifest.values[*x as usize].dtype.size_bytes();
                kernels::broadcast(
                    (bufs[*x as usize], &shapes[*x as usize]),
                    (bufs[*out as usize], &shapes[*out as usize]),
                    es,
                )
            }
            Step::Attention {
                q,
                k,
                v,
                out,
                scale,
                kernel,
                logits,
                kernel_inputs,
                contiguous,
                seq_major,
                views,
                cached,
            } => {
                let cap = match (cache, cached.iter().any(|c| *c)) {
                    (Some(c), true) => Some(c.capacity()),
                    (None, true) => {
                        return Err("this step reads the key/value cache; run it in a generation session".into())
                    }
                    _ => None,
                };
                let layout = attention::Layout {
                    contiguous,
                    seq_major: *seq_major,
                    views: *views,
                    cached: [cached[0].then_some(cap).flatten(), cached[1].then_some(cap).flatten()],
                };
                let ins: Vec<Option<(Buf, &[usize])>> = kernel_inputs
                    .iter()
                    .map(|i| i.map(|x| (bufs[x as usize], shapes[x as usize].as_slice())))
                    .collect();
                let softmax = match logits {
                    Some(l) => {
                        let sum = self.manifest.kernels[*l as usize].tape.as_deref();
                        let sum = sum.is_some_and(crate::vmap::is_sum_of_two_inputs);
                        attention::Softmax::Online(self.kernels[*l as usize], sum)
                    }
                    None => attention::Softmax::Rows(self.kernels[*kernel as usize]),
                };
                let operand = |x: &u32| (bufs[*x as usize], shapes[*x as usize].as_slice());
                attention::attention(
                    [operand(q), operand(k), operand(v), operand(out)],
                    *scale,
                    softmax,
                    &ins,
                    &layout,
                    self.threads,
                    self.level,
                )
            }
            Step::Fallback { op, inputs, out } => {
                let m = &self.manifest;
                let arg = |v: &u32| {
                    (
                        bufs[*v as usize],
                        shapes[*v as usize].as_slice(),
                        m.values[*v as usize].dtype,
                    )
                };
                let args: Vec<(Buf, &[usize], DType)> = inputs.iter().map(arg).collect();
                let o = arg(out);
                if let Some(r) = crate::moe::try_moe(op, &args, o, self.threads, self.level) {
                    routed.fetch_add(r?.weight_bytes, std::sync::atomic::Ordering::Relaxed);
                    return Ok(());
                }
                let names: Vec<String> = m.dims.iter().map(|d| d.0.clone()).collect();
                kernels::fallback(op, &args, o, &names, syms)
            }
        }
    }
}

/// A step's kind for profiles: `matmul`, `kernel:map`, `attention`, `transpose`, ...
pub fn step_kind(step: &Step) -> String {
    match step {
        Step::Kernel {
            kind, inputs, space, ..
        } => format!("kernel:{kind:?}:{}in:rank{}", inputs.len(), space.len()),
        Step::MatMul { .. } => "matmul".into(),
        Step::PackedMatMul { kernel, post, .. } => {
            format!("matmul:{kernel}{}", if post.is_some() { "+activation" } else { "" })
        }
        Step::QMatMul { bits, .. } => format!("matmul:int{bits}"),
        Step::SpMatMul { .. } => "matmul:csr".into(),
        Step::SpMatMul24 { .. } => "matmul:2:4".into(),
        Step::Gather { .. } => "gather".into(),
        Step::Transpose { .. } => "transpose".into(),
        Step::Slice { .. } => "slice".into(),
        Step::Concat { .. } => "concat".into(),
        Step::Broadcast { .. } => "broadcast".into(),
        Step::Fallback {
            op: kiln_ir::Op::Moe { .. },
            ..
        } => "moe".into(),
        Step::Fallback { op, .. } => format!("fallback:{}", op.mnemonic()),
        Step::CacheAppend { .. } => "cache".into(),
        Step::Attention { .. } => "attention".into(),
    }
}

/// Packed 2:4 offsets stored in the artifact are checked once, at load (the product masks them,
/// so a bad byte could not reach outside its group, but it would compute garbage).
pub(crate) fn check_packed_weights(m: &Manifest, weights: &[u8]) -> Result<(), LoadError> {
    for (si, step) in m.steps.iter().enumerate() {
        if let Step::SpMatMul24 { idx, .. } = step {
            if let Storage::Weight { offset, len } = m.values[*idx as usize].storage {
                let b = &weights[offset as usize..(offset + len) as usize];
                kernels::check_24_offsets(b).map_err(|e| LoadError::Corrupt(format!("step {si}: {e}")))?;
            }
        }
    }
    Ok(())
}

/// Binds every symbolic dim from the inputs' shapes, checking dtypes, ranks and bounds.
pub(crate) fn bind<T: InputTensor>(m: &Manifest, inputs: &BTreeMap<String, T>) -> Result<Vec<usize>, RunError> {
    for k in inputs.keys() {
        if !m.inputs.iter().any(|p| &p.name == k) {
            let names: Vec<&str> = m.inputs.iter().map(|p| p.name.as_str()).collect();
            return Err(RunError::UnknownInput {
                name: k.clone(),
                expected: names.join(", "),
            });
        }
    }
    let mut syms: Vec<Option<(usize, String)>> = vec![None; m.dims.len()];
    for pass in 0..2 {
        for p in &m.inputs {
            let Some(t) = inputs.get(&p.name) else {
                if p.default.is_some() {
                    continue;
                }
                return Err(RunError::MissingInput(p.name.clone()));
            };
            let v = &m.values[p.value as usize];
            let bad = |msg: String| RunError::BadInput {
                name: p.name.clone(),
                msg,
            };
            if t.dtype() != v.dtype {
                return Err(bad(format!("expected dtype {}, got {}", v.dtype, t.dtype())));
            }
            if t.shape().len() != v.shape.len() {
                return Err(bad(format!(
                    "expected rank {}, got shape {:?}",
                    v.shape.len(),
                    t.shape()
                )));
            }
            for (axis, (d, &n)) in v.shape.iter().zip(t.shape()).enumerate() {
                if pass == 0 && d.coeff == 1 && d.syms.len() == 1 {
                    let s = d.syms[0] as usize;
                    let (name, bound) = &m.dims[s];
                    if n == 0 || n as u64 > *bound {
                        return Err(bad(format!(
                            "axis {axis} is `{name}` = {n}, outside the compiled range 1..={bound}"
                        )));
                    }
                    match &syms[s] {
                        Some((prev, from)) if *prev != n => {
                            return Err(bad(format!(
                                "axis {axis} is `{name}` = {n}, but {from} set `{name}` = {prev}"
                            )))
                        }
                        Some(_) => {}
                        None => syms[s] = Some((n, format!("input `{}` axis {axis}", p.name))),
                    }
                } else if pass == 1 {
                    let vals: Vec<usize> = syms.iter().map(|s| s.as_ref().map_or(0, |x| x.0)).collect();
                    if d.syms.iter().any(|s| syms[*s as usize].is_none()) {
                        return Err(bad(format!("axis {axis} uses a dim no input axis determines")));
                    }
                    if d.eval(&vals) != n {
                        return Err(bad(format!("axis {axis} must be {}, got {n}", d.eval(&vals))));
                    }
                }
            }
        }
    }
    syms.into_iter()
        .enumerate()
        .map(|(i, s)| s.map(|x| x.0).ok_or_else(|| unbound_dim(m, inputs, i)))
        .collect()
}

/// The error for dim `i`, which no supplied input's shape determines.
fn unbound_dim<T: InputTensor>(m: &Manifest, inputs: &BTreeMap<String, T>, i: usize) -> RunError {
    let name = m.dims[i].0.clone();
    let left_out = m.inputs.iter().find(|p| {
        !inputs.contains_key(&p.name)
            && m.values[p.value as usize]
                .shape
                .iter()
                .any(|d| d.syms.contains(&(i as u32)))
    });
    let msg = match left_out {
        Some(p) => format!(
            "only input `{}` determines this dim, and it was left out: pass it to set `{name}`",
            p.name
        ),
        None => "no input determines this dim".into(),
    };
    RunError::BadInput { name, msg }
}
/// Liveness-based first-fit placement of every temporary in one arena.
pub(crate) fn plan_memory(m: &Manifest, sizes: &[usize]) -> (Vec<usize>, usize, usize) {
    let n = m.values.len();
    let root = |mut v: usize| {
        while let Storage::Alias(s) = m.values[v].storage {
            v = s as usize;
        }
        v
    };
    let mut def = vec![usize::MAX; n];
    let mut last = vec![0usize; n];
    for (si, step) in m.steps.iter().enumerate() {
        def[step.out() as usize] = si;
        for v in step.inputs() {
            let r = root(v as usize);
            last[r] = last[r].max(si);
        }
    }
    for p in &m.outputs {
        last[root(p.value as usize)] = usize::MAX;
    }
    let mut offsets = vec![0usize; n];
    let mut live: Vec<(usize, usize, usize)> = Vec::new(); // (offset, size, last use)
    let mut top = 0usize;
    let mut unshared = 0usize;
    let mut order: Vec<usize> = (0..n)
        .filter(|v| matches!(m.values[*v].storage, Storage::Temp))
        .collect();
    order.sort_by_key(|v| def[*v]);
    for v in order {
        let size = sizes[v].div_ceil(64).saturating_mul(64);
        unshared = unshared.saturating_add(size);
        let now = def[v];
        live.retain(|(_, _, l)| *l >= now);
        live.sort_unstable();
        let mut at = 0usize;
        for (o, s, _) in &live {
            if at.saturating_add(size) <= *o {
                break;
            }
            at = at.max(o + s);
        }
        offsets[v] = at;
        top = top.max(at.saturating_add(size));
        live.push((at, size, last[v].max(now)));
    }
    (offsets, top, unshared)
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.manifest.name)
            .field("steps", &self.manifest.steps.len())
            .finish()
    }
}
