//! Running CUDA artifacts on an NVIDIA GPU (feature `cuda`).
//!
//! The driver is loaded dynamically (cudarc `dynamic-loading`): building needs no CUDA, and a
//! machine without a driver or a GPU gets a [`LoadError::Cuda`] at load, not a crash. [`CudaModel`]
//! uploads the weights once, picks the artifact's PTX module for the device's compute capability,
//! and runs the same plan as the CPU executor: fused kernels (`k{i}`) over the same row offsets
//! table, matrix products and attention through the tiled GEMM kernels, data movement through the
//! strided copy and gather kernels, and `Fallback` steps on the host through the reference
//! evaluator (their operands are copied over and back). Decoding keeps its key/value cache on the
//! GPU ([`CudaSession`], the same [`crate::Decoder`] as the CPU's session).

mod device;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use cudarc::driver::{sys, CudaContext};
use kiln_ir::{DType, Tensor};

use device::{download, Arg, DevMem, Device, Driver, Emulator, Kernel};

use crate::kernels::{self, Buf};
use crate::plan::{KernelKind, Manifest, Step, Storage, GPU_ARCH};
use crate::{artifact, LoadError, RunError};

/// Threads per block of the fused kernels (`kiln_cuda::emit::BLOCK`).
const BLOCK: u32 = 256;
/// Output tile of the GEMM kernels (`kiln_cuda::emit::TILE`).
const TILE: usize = 64;
/// Output tile and threads of the tensor-core GEMM kernels (`kiln_cuda::emit::TC_TILE`,
/// `TC_THREADS`).
const TC_TILE: usize = 128;
const TC_THREADS: u32 = 256;
/// Output tile (rows, columns) and dynamic shared memory of `gemm_wgmma` (`kiln_cuda::emit::WG_BM`,
/// `WG_BN`, `WG_SMEM`).
const WG_TILE: (usize, usize) = (128, 256);
const WG_SMEM: u32 = 4 * 384 * 128 + 1024;

/// Bytes of dynamic shared memory kernel `name` needs at launch (0: static shared memory only).
pub fn dynamic_smem(name: &str) -> u32 {
    if name == "gemm_wgmma" {
        WG_SMEM
    } else {
        0
    }
}
/// Products of fewer rows stay on the SIMT kernel: a 128-row tile would mostly compute padding.
const TC_MIN_ROWS: usize = 32;
/// Products of at most this many rows run on the matrix–vector kernels (`kiln_cuda::emit::GEMV_ROWS`,
/// `GEMV_THREADS`; a block of `gemv_{f32,i8,i4}` covers one column per warp).
const GEMV_ROWS: usize = 4;
const GEMV_THREADS: u32 = 256;
const GEMV_COLS_PER_WARP_BLOCK: usize = 8;
/// Fused attention: query rows per block, threads per block, largest head dimension
/// (`kiln_cuda::emit::FA_ROWS`, `FA_THREADS`, `FA_MAX_DIM`).
const FA_ROWS: usize = 16;
const FA_THREADS: u32 = 128;
const FA_MAX_DIM: usize = 128;
/// Tensor-core fused attention: query rows and threads per block, and the head dimensions it is
/// emitted for (`kiln_cuda::emit::FT_ROWS`, `FT_THREADS`, `FT_DIMS`).
const FT_ROWS: usize = 64;
const FT_THREADS: u32 = 128;
const FT_DIMS: [i64; 3] = [32, 64, 128];
/// Rank the copy kernel walks (`kiln_cuda::emit::COPY_RANK`).
const COPY_RANK: usize = 6;

/// What [`CudaModel::kernel_stats`] reports for one kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KernelStats {
    pub launches: u64,
    /// Host-timed seconds (launch to completion) while profiling.
    pub seconds: f64,
}

/// A CUDA artifact loaded onto a GPU.
pub struct CudaModel {
    manifest: Manifest,
    dev: Rc<dyn Device>,
    weights: DevMem,
    host_weights: Vec<u8>,
    /// Per `SpMatMul`/`SpMatMul24` step: its sparse weight densified (`[n, k]` f32).
    dense: BTreeMap<usize, DevMem>,
    /// `sm_80`, `sm_90`: the PTX module in use.
    pub arch: String,
    /// Whether matrix products of at least [`TC_MIN_ROWS`] rows run on tensor cores (operands
    /// rounded to bf16, f32 accumulation); `KILN_CUDA_MMA=off` at load, or
    /// [`CudaModel::set_tensor_cores`], keeps every product in f32.
    tensor_cores: bool,
    /// Whether products by a weight use Hopper's warpgroup MMA (`gemm_wgmma`) instead of
    /// `gemm_bf16`: opt-in (`KILN_CUDA_WGMMA=on`, [`CudaModel::set_wgmma`]) until it has been
    /// checked on an H100; needs the artifact's sm_90a module and a compute capability 9.0 GPU.
    wgmma: bool,
    /// Whether fused attention uses its tensor-core kernels where they exist (with tensor cores on;
    /// `KILN_CUDA_TC_ATTENTION=off` keeps it on CUDA cores).
    tc_attention: bool,
    /// Products by a weight with fewer rows than this (and at least 32) skip the bf16 copy and its
    /// conversion launch and run on `gemm_tc_*` (`KILN_CUDA_BF16_MIN_ROWS`, default 32): a knob for
    /// a GPU run to measure where the extra launch stops paying.
    bf16_min_rows: usize,
    /// Whether attention runs as one fused kernel (FlashAttention-style, `fa*`) where the artifact
    /// has it and head dimensions are at most 128; `KILN_CUDA_FLASH=off` at load, or
    /// [`CudaModel::set_fused_attention`], keeps the three-launch form (scores GEMM, softmax, GEMM).
    fused_attention: bool,
    /// Device buffers kept between runs, grown on demand: the memory plan's arena, and the
    /// per-run upload (error flag, row offsets tables, inputs).
    arena: RefCell<Option<DevMem>>,
    scratch: RefCell<Option<DevMem>>,
    /// Per step multiplying by a weight on tensor cores: the weight as zero-padded bf16 rows
    /// (`[n, kp]`, `kp` = k rounded up to 8), made on first use; and the left operands' bf16 copy.
    bf16_weights: RefCell<BTreeMap<usize, DevMem>>,
    bf16_rows: RefCell<Option<DevMem>>,
    /// Launches per kernel name since load, and (while profiling) their time.
    launches: RefCell<BTreeMap<String, KernelStats>>,
    profiling: std::cell::Cell<bool>,
    /// The GPU's name.
    pub device: String,
}

fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> LoadError + '_ {
    move |e| LoadError::Cuda(format!("{what}: {e}"))
}

impl CudaModel {
    /// Loads an artifact file onto GPU 0.
    pub fn load(path: &Path) -> Result<CudaModel, LoadError> {
        let map = artifact::map(path)?;
        CudaModel::from_bytes(&map)
    }

    /// Loads an artifact held in memory onto GPU 0.
    pub fn from_bytes(bytes: &[u8]) -> Result<CudaModel, LoadError> {
        let s = artifact::decode(bytes)?;
        let m = s.manifest;
        if m.target.arch != GPU_ARCH {
            return Err(LoadError::Target {
                wanted: m.target.arch.clone(),
                have: "a CUDA GPU (this artifact was compiled for a CPU; run it without --device cuda)".into(),
            });
        }
        crate::validate::manifest(&m, s.weights.len(), s.code.len())?;
        crate::exec::check_packed_weights(&m, &bytes[s.weights.clone()])?;
        // SAFETY: only probes for the driver library.
        if !unsafe { sys::is_culib_present() } {
            return Err(LoadError::Cuda(
                "no CUDA driver on this machine (libcuda.so could not be loaded)".into(),
            ));
        }
        let ctx = CudaContext::new(0).map_err(cuda_err("no usable GPU"))?;
        let (major, minor) = ctx.compute_capability().map_err(cuda_err("compute capability"))?;
        let cc = (major * 10 + minor) as u32;
        let device = ctx.name().unwrap_or_else(|_| "an NVIDIA GPU".into());
        let gpu = m.gpu.as_ref().expect("validated: CUDA artifacts have PTX");
        // The newest architecture the device can run (PTX is forward compatible).
        let chosen = gpu
            .modules
            .iter()
            .filter_map(|x| {
                let sm = x.arch.strip_prefix("sm_")?.parse::<u32>().ok()?;
                (sm <= cc).then_some((sm, x))
            })
            .max_by_key(|(sm, _)| *sm)
            .map(|(_, x)| x)
            .ok_or_else(|| {
                let have: Vec<&str> = gpu.modules.iter().map(|x| x.arch.as_str()).collect();
                LoadError::Cuda(format!(
                    "{device} has compute capability {major}.{minor}; the artifact has PTX for {}",
                    have.join(", ")
                ))
            })?;
        let code = &bytes[s.code.clone()];
        let ptx = &code[chosen.offset as usize..(chosen.offset + chosen.len) as usize];
        if ptx.last() != Some(&0) || ptx[..ptx.len() - 1].contains(&0) {
            return Err(LoadError::Corrupt(format!(
                "the PTX for {} is not one NUL-terminated text",
                chosen.arch
            )));
        }
        // Fused attention kernels are optional: artifacts from before them attend in three launches.
        let flash: Vec<String> = m
            .flash_kernels()
            .into_iter()
            .flat_map(|(k, j)| {
                let tc = FT_DIMS.map(|d| crate::plan::flash_tc_kernel(k, j, d));
                std::iter::once(crate::plan::flash_kernel(k, j)).chain(tc)
            })
            .collect();
        // Kernels that need Hopper's architecture-specific instructions (wgmma) come in a module of
        // their own for exactly compute capability 9.0.
        let extra = match gpu.modules.iter().find(|x| x.arch == "sm_90a") {
            Some(x) if cc == 90 => {
                let p = &code[x.offset as usize..(x.offset + x.len) as usize];
                if p.last() != Some(&0) || p[..p.len() - 1].contains(&0) {
                    return Err(LoadError::Corrupt(
                        "the PTX for sm_90a is not one NUL-terminated text".into(),
                    ));
                }
                Some(p)
            }
            _ => None,
        };
        let mut driver = Driver::load(ctx, ptx, m.kernels.len(), &crate::plan::GPU_FIXED_KERNELS, &flash)
            .map_err(|e| LoadError::Cuda(format!("the driver rejected the PTX for {}: {e}", chosen.arch)))?;
        if let Some(p) = extra {
            driver
                .load_extra(p, &["gemm_wgmma"])
                .map_err(|e| LoadError::Cuda(format!("the driver rejected the PTX for sm_90a: {e}")))?;
        }
        let arch = chosen.arch.clone();
        CudaModel::place(m, bytes[s.weights.clone()].to_vec(), Rc::new(driver), arch, device)
    }

    /// Loads a CUDA plan onto kiln's GPU emulator instead of a GPU: `python3 EMULATOR --serve`
    /// (`backends/cuda/tests/emulate.py`) runs the kernels' MLIR (`kiln_cuda::plan_mlir`) one
    /// thread at a time, checking every memory access. For tests of the runtime on machines
    /// without a GPU: it is slow (seconds per launch), so only tiny models are practical.
    pub fn emulated(
        manifest: &Manifest,
        weights: Vec<u8>,
        mlir: &str,
        emulator: &Path,
    ) -> Result<CudaModel, LoadError> {
        let mut m = manifest.clone();
        if m.target.arch != GPU_ARCH {
            return Err(LoadError::Target {
                wanted: m.target.arch.clone(),
                have: "a CUDA GPU (emulated)".into(),
            });
        }
        // The MLIR stands where the PTX would, so the manifest is validated as any artifact's.
        m.gpu = Some(crate::plan::GpuCode {
            modules: vec![crate::plan::GpuModule {
                arch: "emulated".into(),
                offset: 0,
                len: mlir.len() as u64 + 1,
            }],
        });
        crate::validate::manifest(&m, weights.len(), mlir.len() + 1)?;
        crate::exec::check_packed_weights(&m, &weights)?;
        let emu = Emulator::start(emulator, mlir).map_err(LoadError::Cuda)?;
        CudaModel::place(
            m,
            weights,
            Rc::new(emu),
            "emulated".into(),
            "kiln's GPU emulator".into(),
        )
    }

    /// Uploads the weights (sparse ones densified) to a device holding the plan's kernels.
    fn place(
        m: Manifest,
        host_weights: Vec<u8>,
        dev: Rc<dyn Device>,
        arch: String,
        device: String,
    ) -> Result<CudaModel, LoadError> {
        let weights = DevMem::upload(&dev, &host_weights).map_err(LoadError::Cuda)?;
        let mut dense = BTreeMap::new();
        for (si, step) in m.steps.iter().enumerate() {
            let Some(d) = densify_step(&m, &host_weights, step) else {
                continue;
            };
            let d = d.map_err(|e| LoadError::Corrupt(format!("step {si}: {e}")))?;
            dense.insert(si, DevMem::upload(&dev, &d).map_err(LoadError::Cuda)?);
        }
        Ok(CudaModel {
            tensor_cores: std::env::var("KILN_CUDA_MMA").map_or(true, |v| v != "off"),
            fused_attention: std::env::var("KILN_CUDA_FLASH").map_or(true, |v| v != "off"),
            wgmma: std::env::var("KILN_CUDA_WGMMA").is_ok_and(|v| v == "on"),
            tc_attention: std::env::var("KILN_CUDA_TC_ATTENTION").map_or(true, |v| v != "off"),
            bf16_min_rows: std::env::var("KILN_CUDA_BF16_MIN_ROWS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(TC_MIN_ROWS),
            arena: RefCell::new(None),
            scratch: RefCell::new(None),
            bf16_weights: RefCell::new(BTreeMap::new()),
            bf16_rows: RefCell::new(None),
            launches: RefCell::new(BTreeMap::new()),
            profiling: std::cell::Cell::new(false),
            arch,
            manifest: m,
            dev,
            weights,
            host_weights,
            dense,
            device,
        })
    }

    /// Runs matrix products of at least 32 rows on tensor cores (bf16 operands, f32 accumulation;
    /// the default unless `KILN_CUDA_MMA=off`) or keeps them all in f32.
    pub fn set_tensor_cores(&mut self, on: bool) {
        self.tensor_cores = on;
    }

    /// Whether matrix products run on tensor cores.
    pub fn tensor_cores(&self) -> bool {
        self.tensor_cores
    }

    /// Uses `gemm_wgmma` for products by a weight where the device has it (see the field). Returns
    /// whether it will be used.
    pub fn set_wgmma(&mut self, on: bool) -> bool {
        self.wgmma = on;
        on && self.dev.has("gemm_wgmma")
    }

    /// Products by a weight with fewer rows than `rows` run on `gemm_tc_*` (register-staged bf16)
    /// instead of converting their left operand for `gemm_bf16` (see the field).
    pub fn set_bf16_min_rows(&mut self, rows: usize) {
        self.bf16_min_rows = rows;
    }

    /// Runs fused attention on its tensor-core kernels where they exist (the default) or on CUDA
    /// cores.
    pub fn set_tc_attention(&mut self, on: bool) {
        self.tc_attention = on;
    }

    /// Runs attention as one fused kernel where possible (the default unless `KILN_CUDA_FLASH=off`)
    /// or always as scores GEMM, softmax kernel and GEMM.
    pub fn set_fused_attention(&mut self, on: bool) {
        self.fused_attention = on;
    }

    /// The manifest (signature, plan, kernels).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// How many times each kernel was launched since load (`gemm_bf16`, `k3`, …): which paths a
    /// model's runs take.
    pub fn launch_counts(&self) -> BTreeMap<String, u64> {
        self.launches
            .borrow()
            .iter()
            .map(|(k, v)| (k.clone(), v.launches))
            .collect()
    }

    /// Times every launch while on: each one is followed by a synchronisation and timed on the
    /// host, so a kernel's time includes its launch latency (a few microseconds) and runs lose
    /// their overlap of host work with the GPU's. Turning it on clears earlier statistics.
    pub fn set_profiling(&self, on: bool) {
        if on {
            self.launches.borrow_mut().clear();
        }
        self.profiling.set(on);
    }

    /// Per kernel name: launches and seconds, since profiling was turned on (see
    /// [`CudaModel::set_profiling`]; seconds are 0 for launches made with it off).
    pub fn kernel_stats(&self) -> BTreeMap<String, KernelStats> {
        self.launches.borrow().clone()
    }

    /// The artifact bytes of value `v` when it is a weight (or a reshape of one).
    fn weight_bytes(&self, v: u32) -> Option<&[u8]> {
        match &self.manifest.values.get(v as usize)?.storage {
            Storage::Weight { offset, len } => self.host_weights.get(*offset as usize..(offset + len) as usize),
            Storage::Alias(src) => self.weight_bytes(*src),
            _ => None,
        }
    }

    /// Runs the model; returns the outputs by name, in declaration order.
    pub fn run(&self, inputs: &BTreeMap<String, Tensor>) -> Result<Vec<(String, Tensor)>, RunError> {
        self.run_inner(inputs, None, true)
    }

    /// Runs the model and waits for it, leaving the outputs on the GPU: what a framework whose
    /// tensors stay on the device is timed doing (`kiln bench` reports both).
    pub fn run_on_device(&self, inputs: &BTreeMap<String, Tensor>) -> Result<(), RunError> {
        self.run_inner(inputs, None, false).map(|_| ())
    }

    /// Starts a generation session: an empty key/value cache on the GPU.
    pub fn session(&self) -> Result<CudaSession<'_>, RunError> {
        let (feed, capacity) = self.manifest.decode_feed()?;
        Ok(CudaSession {
            model: self,
            cache: CudaKvCache {
                dev: self.dev.clone(),
                slots: BTreeMap::new(),
                len: 0,
                capacity,
            },
            feed,
            failed: false,
        })
    }

    fn run_inner(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        mut cache: Option<&mut CudaKvCache>,
        fetch: bool,
    ) -> Result<Vec<(String, Tensor)>, RunError> {
        let m = &self.manifest;
        let fail = |step: usize, value: usize, msg: String| RunError::Step {
            step,
            node: m.values.get(value).map(|v| v.name.clone()).unwrap_or_default(),
            msg,
        };
        self.dev.bind().map_err(|e| fail(usize::MAX, usize::MAX, e))?;
        let syms = crate::exec::bind(m, inputs)?;
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
        let (offsets, arena_len, _) = crate::exec::plan_memory(m, &sizes);
        let dev = &self.dev;
        // Fallback steps whose operands the host already has (inputs, weights, earlier such steps:
        // index and mask arithmetic) are evaluated now and travel with the upload, so they cost no
        // synchronisation at their place in the plan.
        let mut early: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        let mut done = vec![false; m.steps.len()];
        for (si, step) in m.steps.iter().enumerate() {
            let Step::Fallback { op, inputs: args, out } = step else {
                continue;
            };
            let known: Option<Vec<Vec<u8>>> = args
                .iter()
                .map(|v| self.host_bytes(*v, sizes[*v as usize], (inputs, &defaults), &early))
                .collect();
            let Some(known) = known else { continue };
            let value = host_eval(m, op, args, known, (&shapes, &sizes), *out, &syms)
                .map_err(|e| fail(si, *out as usize, e))?;
            early.insert(*out, value);
            done[si] = true;
        }
        // One upload per run: the error flag, every step's row offsets table, the inputs, the
        // values evaluated early.
        let mut host = vec![0u8; 16];
        let pad = |host: &mut Vec<u8>| host.resize(host.len().div_ceil(16) * 16, 0);
        let mut tables: Vec<Option<Table>> = Vec::with_capacity(m.steps.len());
        for (si, step) in m.steps.iter().enumerate() {
            let t = self
                .table(step, &shapes, &sizes, &syms)
                .map_err(|e| fail(si, step.out() as usize, e))?;
            tables.push(t.map(|(rows, n, offs)| {
                pad(&mut host);
                let at = host.len();
                host.extend(offs.iter().flat_map(|x| x.to_le_bytes()));
                Table { at, rows, n }
            }));
        }
        let mut input_at = Vec::with_capacity(m.inputs.len());
        for n in 0..m.inputs.len() {
            pad(&mut host);
            input_at.push(host.len());
            host.extend_from_slice(crate::input::input_bytes(m, inputs, &defaults, n));
        }
        let mut early_at = BTreeMap::new();
        for (v, bytes) in &early {
            pad(&mut host);
            early_at.insert(*v as usize, host.len());
            host.extend_from_slice(bytes);
        }
        let grown = |slot: &RefCell<Option<DevMem>>, len: usize| -> Result<u64, String> {
            let mut slot = slot.borrow_mut();
            if slot.as_ref().is_none_or(|b| b.len < len) {
                *slot = None;
                *slot = Some(DevMem::alloc(dev, len.next_power_of_two())?);
            }
            Ok(slot.as_ref().map_or(0, |b| b.ptr))
        };
        let arena = grown(&self.arena, arena_len).map_err(|e| fail(usize::MAX, usize::MAX, e))?;
        let scratch = grown(&self.scratch, host.len()).map_err(|e| fail(usize::MAX, usize::MAX, e))?;
        dev.write(scratch, &host).map_err(|e| fail(usize::MAX, usize::MAX, e))?;
        let mut addr = vec![0u64; m.values.len()];
        // Views of the cache have no arena space of their own (the plan sized them at capacity).
        for (i, v) in m.values.iter().enumerate() {
            addr[i] = match &v.storage {
                Storage::Input(n) => scratch + input_at[*n as usize] as u64,
                Storage::Weight { offset, .. } => self.weights.ptr + offset,
                Storage::Temp => early_at
                    .get(&i)
                    .map_or(arena + offsets[i] as u64, |at| scratch + *at as u64),
                Storage::Alias(src) => addr[*src as usize],
            };
        }
        // Cache values read in place point into the session's cache.
        if let Some(c) = cache.as_deref_mut() {
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
                        return Err(fail(si, *out as usize, "cache_append of a non-rank-4 value".into()));
                    }
                    addr[*out as usize] = c
                        .slot(*slot, xs[0], xs[1], xs[3])
                        .map_err(|e| fail(si, *out as usize, e))?;
                }
            }
        }
        let mut run = Run {
            model: self,
            addr,
            shapes: &shapes,
            sizes: &sizes,
            syms: &syms,
            scratch,
            tables,
            keep: Vec::new(),
            cache,
        };
        for (si, step) in m.steps.iter().enumerate() {
            if !done[si] {
                run.step(si, step).map_err(|msg| fail(si, step.out() as usize, msg))?;
            }
        }
        self.dev.synchronize().map_err(|e| fail(usize::MAX, usize::MAX, e))?;
        let flag = download(&**dev, scratch, 4).map_err(|e| fail(usize::MAX, usize::MAX, e))?;
        if flag != [0, 0, 0, 0] {
            return Err(fail(usize::MAX, usize::MAX, "a gather index is out of range".into()));
        }
        let mut outs = Vec::new();
        for p in m.outputs.iter().filter(|_| fetch) {
            let v = p.value as usize;
            let bytes = download(&**dev, run.addr[v], sizes[v]).map_err(|e| fail(usize::MAX, v, e))?;
            let t = Tensor::from_le_bytes(m.values[v].dtype, shapes[v].clone(), &bytes)
                .map_err(|e| fail(usize::MAX, v, e.to_string()))?;
            outs.push((p.name.clone(), t));
        }
        Ok(outs)
    }
}

impl std::fmt::Debug for CudaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaModel({} on {}, {})", self.manifest.name, self.device, self.arch)
    }
}

impl CudaModel {
    /// The bytes of value `v` (`len` of them) if the host has them before the run starts: an
    /// input, a weight, a value evaluated early, or an alias of one.
    fn host_bytes(
        &self,
        mut v: u32,
        len: usize,
        (inputs, defaults): (&BTreeMap<String, Tensor>, &[Option<Tensor>]),
        early: &BTreeMap<u32, Vec<u8>>,
    ) -> Option<Vec<u8>> {
        let bytes: &[u8] = loop {
            match &self.manifest.values[v as usize].storage {
                Storage::Input(n) => break crate::input::input_bytes(&self.manifest, inputs, defaults, *n as usize),
                Storage::Weight { offset, len } => break &self.host_weights[*offset as usize..(offset + len) as usize],
                Storage::Alias(src) => v = *src,
                Storage::Temp => break early.get(&v)?,
            }
        };
        bytes.get(..len).map(<[u8]>::to_vec)
    }
}

/// Where a step's row offsets table sits in its run's upload, and its rows and columns.
struct Table {
    at: usize,
    rows: usize,
    n: usize,
}

impl CudaModel {
    /// The row offsets table (rows, columns, entries) of a step that launches a generated kernel:
    /// a fused kernel, or attention's softmax (also what the fused attention kernel reads).
    fn table(
        &self,
        step: &Step,
        shapes: &[Vec<usize>],
        sizes: &[usize],
        syms: &[usize],
    ) -> Result<Option<(usize, usize, Vec<i64>)>, String> {
        // Only lengths and shapes matter to the table, not addresses.
        let buf = |len: usize| Buf {
            ptr: std::ptr::null_mut(),
            len,
        };
        let value = |v: u32| (buf(sizes[v as usize]), shapes[v as usize].as_slice());
        match step {
            Step::Kernel {
                kernel,
                kind,
                inputs,
                contiguous,
                out,
                space,
            } => {
                let space: Vec<usize> = space.iter().map(|d| d.eval(syms)).collect();
                let ins: Vec<(Buf, &[usize])> = inputs.iter().map(|v| value(*v)).collect();
                let decl = &self.manifest.kernels[*kernel as usize];
                let (rows, n, _, offs) = kernels::row_offsets(*kind, &ins, contiguous, value(*out), &space, decl)?;
                Ok(Some((rows, n, offs)))
            }
            Step::Attention {
                q,
                k,
                kernel,
                kernel_inputs,
                contiguous,
                seq_major,
                views,
                ..
            } => {
                let (qs, _) = crate::attention::attn_layout(&shapes[*q as usize], seq_major[0], views[0])?;
                let (ks, _) = crate::attention::attn_layout(&shapes[*k as usize], seq_major[1], views[1])?;
                let space = [qs[0], qs[1], qs[2], ks[2]];
                if elems(&space) == 0 {
                    return Ok(None);
                }
                let scores = buf(4 * elems(&space));
                let ins: Vec<(Buf, &[usize])> = kernel_inputs
                    .iter()
                    .map(|i| match i {
                        None => (scores, &space[..]),
                        Some(x) => value(*x),
                    })
                    .collect();
                let decl = &self.manifest.kernels[*kernel as usize];
                let (rows, n, _, offs) = kernels::row_offsets(
                    KernelKind::SoftmaxLast,
                    &ins,
                    contiguous,
                    (scores, &space),
                    &space,
                    decl,
                )?;
                Ok(Some((rows, n, offs)))
            }
            _ => Ok(None),
        }
    }
}

/// A sparse weight (block CSR: `[row_ptr, cols, vals]`; packed 2:4: `[vals, idx]`) as the dense
/// `[n, k]` f32 matrix it stands for, by the reference evaluator's `Densify`/`Densify24`, which
/// checks its indices (`k` from the product's left operand).
/// A sparse product step's weight as dense f32 `[n, k]` bytes; `None` for other steps.
fn densify_step(m: &Manifest, w: &[u8], step: &Step) -> Option<Result<Vec<u8>, String>> {
    Some(match step {
        Step::SpMatMul {
            row_ptr,
            cols,
            vals,
            a,
            block,
            ..
        } => densify(m, w, &[*row_ptr, *cols, *vals], *a, Some(*block)),
        Step::SpMatMul24 { a, vals, idx, .. } => densify(m, w, &[*vals, *idx], *a, None),
        _ => return None,
    })
}

fn densify(m: &Manifest, w: &[u8], parts: &[u32], a: u32, block: Option<[u64; 2]>) -> Result<Vec<u8>, String> {
    let mut operands = Vec::new();
    for &v in parts {
        let decl = &m.values[v as usize];
        let Storage::Weight { offset, len } = decl.storage else {
            return Err("a sparse weight that is not stored in the artifact".into());
        };
        if decl.shape.iter().any(|d| !d.syms.is_empty()) {
            return Err("a sparse weight whose shape is not fixed".into());
        }
        let shape: Vec<usize> = decl.shape.iter().map(|d| d.eval(&[])).collect();
        operands.push((&w[offset as usize..(offset + len) as usize], shape, decl.dtype));
    }
    // The evaluator only reads its operands.
    let args: Vec<(Buf, &[usize], DType)> = operands
        .iter()
        .map(|(bytes, shape, dt)| {
            let buf = Buf {
                ptr: bytes.as_ptr() as *mut u8,
                len: bytes.len(),
            };
            (buf, shape.as_slice(), *dt)
        })
        .collect();
    let k = m.values[a as usize]
        .shape
        .last()
        .filter(|d| d.syms.is_empty())
        .map(|d| d.coeff)
        .ok_or("a sparse product whose inner dimension is not fixed")?;
    let (op, n) = match block {
        Some(block) => {
            let blocks = args[0]
                .1
                .first()
                .and_then(|r| r.checked_sub(1))
                .ok_or("empty row offsets")?;
            let n = blocks as u64 * block[0];
            (
                kiln_ir::Op::Densify {
                    n,
                    k,
                    sparse_rows: 0,
                    block,
                },
                n,
            )
        }
        None => {
            let n = args[0].1.first().copied().unwrap_or(0) as u64;
            (kiln_ir::Op::Densify24 { n, k, sparse_rows: 0 }, n)
        }
    };
    let mut out = vec![0u8; (n * k * 4) as usize];
    let rb = Buf {
        ptr: out.as_mut_ptr(),
        len: out.len(),
    };
    kernels::fallback(&op, &args, (rb, &[n as usize, k as usize], DType::F32), &[], &[])?;
    Ok(out)
}

/// A weight as [`Run::gemm_bf16`] reads it: `n` rows of `k` values (`w(row, kk)`) rounded to the
/// nearest bf16 (ties to even, as the GPU's `cvt.rn.bf16.f32`), each padded with zeros to a
/// multiple of 8 (16 bytes).
fn bf16_rows(n: usize, k: usize, w: impl Fn(usize, usize) -> f32) -> Vec<u8> {
    let kp = k.div_ceil(8) * 8;
    let mut out = vec![0u8; 2 * n * kp];
    for r in 0..n {
        for kk in 0..k {
            let h = bf16_bits(w(r, kk));
            out[2 * (r * kp + kk)..][..2].copy_from_slice(&h.to_le_bytes());
        }
    }
    out
}

fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

fn elems(s: &[usize]) -> usize {
    s.iter().product()
}

fn row_major(s: &[usize]) -> Vec<usize> {
    let mut st = vec![0; s.len()];
    let mut acc = 1;
    for i in (0..s.len()).rev() {
        st[i] = acc;
        acc *= s[i];
    }
    st
}

fn grid_1d(total: usize) -> (u32, u32, u32) {
    (total.div_ceil(BLOCK as usize).clamp(1, 1 << 20) as u32, 1, 1)
}

/// One run's state.
struct Run<'a> {
    model: &'a CudaModel,
    addr: Vec<u64>,
    shapes: &'a [Vec<usize>],
    sizes: &'a [usize],
    syms: &'a [usize],
    /// The run's upload (its first word the gather kernels' error flag) and each step's row offsets
    /// table in it.
    scratch: u64,
    tables: Vec<Option<Table>>,
    /// Device buffers that launched kernels may still read (score blocks).
    keep: Vec<DevMem>,
    /// The session's key/value cache, when decoding.
    cache: Option<&'a mut CudaKvCache>,
}

impl Run<'_> {
    /// An f32 reduction over contiguous axes (mean pooling over the sequence, say) on the GPU
    /// (`reduce_axis_*`); `false` where the op is something else, for the host to evaluate.
    fn reduce_on_device(&self, op: &kiln_ir::Op, inputs: &[u32], out: u32) -> Result<bool, String> {
        let kiln_ir::Op::Reduce { op, axes, .. } = op else {
            return Ok(false);
        };
        let [x] = inputs else { return Ok(false) };
        let s = &self.shapes[*x as usize];
        let contiguous = axes.windows(2).all(|w| w[1] == w[0] + 1);
        if self.dtype(*x) != DType::F32 || self.dtype(out) != DType::F32 || axes.is_empty() || !contiguous {
            return Ok(false);
        }
        let (first, last) = (axes[0], axes[axes.len() - 1]);
        if last >= s.len() {
            return Err(format!("reduction over axis {last} of a rank-{} value", s.len()));
        }
        let (outer, r, inner) = (elems(&s[..first]), elems(&s[first..=last]), elems(&s[last + 1..]));
        if r == 0 || elems(&self.shapes[out as usize]) != outer * inner {
            return Ok(false);
        }
        let total = outer * inner;
        if total == 0 {
            return Ok(true);
        }
        let (name, scale) = match op {
            kiln_ir::ReduceOp::Sum => ("reduce_axis_sum", 1.0),
            kiln_ir::ReduceOp::Mean => ("reduce_axis_sum", 1.0 / r as f32),
            kiln_ir::ReduceOp::Max => ("reduce_axis_max", 1.0),
            kiln_ir::ReduceOp::Min => ("reduce_axis_min", 1.0),
        };
        let args = [
            Arg::I(total as i64),
            Arg::I(r as i64),
            Arg::I(inner as i64),
            Arg::F(scale),
            Arg::P(self.addr[*x as usize]),
            Arg::P(self.addr[out as usize]),
        ];
        self.launch(Kernel::Fixed(name), grid_1d(total), (BLOCK, 1, 1), &args)?;
        Ok(true)
    }

    /// `sin`/`cos` of an f32 value on the GPU (`unary_*_f32`); `false` for other ops.
    fn unary_on_device(&self, op: &kiln_ir::Op, inputs: &[u32], out: u32) -> Result<bool, String> {
        let name = match op {
            kiln_ir::Op::Unary(kiln_ir::UnaryOp::Sin) => "unary_sin_f32",
            kiln_ir::Op::Unary(kiln_ir::UnaryOp::Cos) => "unary_cos_f32",
            _ => return Ok(false),
        };
        let [x] = inputs else { return Ok(false) };
        if self.dtype(*x) != DType::F32
            || self.dtype(out) != DType::F32
            || self.shapes[*x as usize] != self.shapes[out as usize]
        {
            return Ok(false);
        }
        let total = elems(&self.shapes[out as usize]);
        if total > 0 {
            let args = [
                Arg::I(total as i64),
                Arg::P(self.addr[*x as usize]),
                Arg::P(self.addr[out as usize]),
            ];
            self.launch(Kernel::Fixed(name), grid_1d(total), (BLOCK, 1, 1), &args)?;
        }
        Ok(true)
    }

    fn dtype(&self, v: u32) -> DType {
        self.model.manifest.values[v as usize].dtype
    }

    fn launch(&self, k: Kernel, grid: (u32, u32, u32), block: (u32, u32, u32), args: &[Arg]) -> Result<(), String> {
        let t = self.model.profiling.get().then(std::time::Instant::now);
        self.model.dev.launch(k, grid, block, args)?;
        let seconds = match t {
            Some(t) => {
                self.model.dev.synchronize()?;
                t.elapsed().as_secs_f64()
            }
            None => 0.0,
        };
        let mut stats = self.model.launches.borrow_mut();
        let e = stats.entry(k.name()).or_default();
        e.launches += 1;
        e.seconds += seconds;
        Ok(())
    }

    /// Whether a product of `rows` rows against a weight runs on [`Run::gemm_bf16`].
    fn bf16_applies(&self, rows: usize) -> bool {
        self.model.tensor_cores
            && rows >= TC_MIN_ROWS.max(self.model.bf16_min_rows)
            && rows > GEMV_ROWS
            && self.model.dev.has("gemm_bf16")
    }

    /// Step `si`'s weight as bf16 rows on the device, uploaded on first use (`make` gives the bytes).
    fn weight_bf16(&self, si: usize, make: impl FnOnce() -> Result<Vec<u8>, String>) -> Result<u64, String> {
        let mut map = self.model.bf16_weights.borrow_mut();
        if let Some(d) = map.get(&si) {
            return Ok(d.ptr);
        }
        let d = DevMem::upload(&self.model.dev, &make()?)?;
        let ptr = d.ptr;
        map.insert(si, d);
        Ok(ptr)
    }

    /// `c = acc + bias + scale · a @ wᵀ` on tensor cores with bf16 operands already in place for
    /// the weight (`w`: `[n, kp]` bf16 rows, see [`bf16_rows`]): `a` (`rows × k` f32 with strides
    /// `(sam, sak)`) becomes zero-padded bf16 rows (`to_bf16`), then `gemm_bf16` multiplies.
    #[allow(clippy::too_many_arguments)]
    fn gemm_bf16(
        &mut self,
        (rows, n, k): (usize, usize, usize),
        a: (u64, usize, usize),
        w: u64,
        c: u64,
        scale: f32,
        bias: Option<u64>,
        acc: Option<u64>,
    ) -> Result<(), String> {
        if rows == 0 || n == 0 {
            return Ok(());
        }
        if rows.div_ceil(TC_TILE) > 65535 {
            return Err(format!("a product of {rows} rows exceeds the launch grid"));
        }
        let kp = k.div_ceil(8) * 8;
        let need = rows * kp * 2;
        let abf = {
            let mut slot = self.model.bf16_rows.borrow_mut();
            if slot.as_ref().is_none_or(|b| b.len < need) {
                // Launches already queued may still read the old buffer.
                if let Some(old) = slot.take() {
                    self.keep.push(old);
                }
                *slot = Some(DevMem::alloc(&self.model.dev, need.next_power_of_two())?);
            }
            slot.as_ref().map_or(0, |b| b.ptr)
        };
        let conv = [
            Arg::I(rows as i64),
            Arg::I(k as i64),
            Arg::I(kp as i64),
            Arg::P(a.0),
            Arg::I(a.1 as i64),
            Arg::I(a.2 as i64),
            Arg::P(abf),
        ];
        self.launch(Kernel::Fixed("to_bf16"), grid_1d(rows * kp / 2), (BLOCK, 1, 1), &conv)?;
        let (kp, n64) = (kp as i64, n as i64);
        let args = [
            Arg::I(rows as i64),
            Arg::I(n64),
            Arg::I(kp),
            Arg::I(1),
            Arg::P(abf),
            Arg::I(0),
            Arg::I(0),
            Arg::I(kp),
            Arg::I(1),
            Arg::P(w),
            Arg::I(0),
            Arg::I(0),
            Arg::I(1),
            Arg::I(kp),
            Arg::P(c),
            Arg::I(0),
            Arg::I(0),
            Arg::I(n64),
            Arg::F(scale),
            Arg::P(bias.unwrap_or(c)),
            Arg::I(bias.is_some() as i64),
            Arg::P(acc.unwrap_or(c)),
            Arg::I(0),
            Arg::I(0),
            Arg::I(n64),
            Arg::I(acc.is_some() as i64),
        ];
        let (kernel, (tm, tn)) = if self.model.wgmma && self.model.dev.has("gemm_wgmma") {
            ("gemm_wgmma", WG_TILE)
        } else {
            ("gemm_bf16", (TC_TILE, TC_TILE))
        };
        let grid = (n.div_ceil(tn) as u32, rows.div_ceil(tm) as u32, 1);
        self.launch(Kernel::Fixed(kernel), grid, (TC_THREADS, 1, 1), &args)
    }

    /// Step `si`'s row offsets table: rows, columns and its device address.
    fn table(&self, si: usize) -> Result<(usize, usize, u64), String> {
        let t = self.tables[si]
            .as_ref()
            .ok_or("a generated kernel without its row offsets table")?;
        Ok((t.rows, t.n, self.scratch + t.at as u64))
    }

    /// `dst[Σ i t] = src[Σ i s]` over `shape` (rank ≤ 6 after dropping unit axes).
    fn copy(&self, es: usize, shape: &[usize], src: (u64, &[usize]), dst: (u64, &[usize])) -> Result<(), String> {
        let total = elems(shape);
        if total == 0 {
            return Ok(());
        }
        let keep: Vec<usize> = (0..shape.len()).filter(|i| shape[*i] != 1).collect();
        if keep.len() > COPY_RANK {
            return Err(format!("a copy over {} axes (at most {COPY_RANK})", keep.len()));
        }
        let pad = COPY_RANK - keep.len();
        let mut d = [1i64; COPY_RANK];
        let mut s = [0i64; COPY_RANK];
        let mut t = [0i64; COPY_RANK];
        for (j, &i) in keep.iter().enumerate() {
            d[pad + j] = shape[i] as i64;
            s[pad + j] = src.1[i] as i64;
            t[pad + j] = dst.1[i] as i64;
        }
        let ty = match es {
            1 => "copy_i8",
            2 => "copy_i16",
            4 => "copy_i32",
            8 => "copy_i64",
            _ => return Err(format!("no copy kernel for {es}-byte elements")),
        };
        let mut args = vec![Arg::I(total as i64)];
        args.extend(d.iter().chain(&s).chain(&t).map(|x| Arg::I(*x)));
        args.push(Arg::P(src.0));
        args.push(Arg::P(dst.0));
        self.launch(Kernel::Fixed(ty), grid_1d(total), (BLOCK, 1, 1), &args)
    }

    /// A GEMM launch: `c[z1, z2] = acc + bias + scale · a[z1, z2] @ b[z1, z2]`.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        kernel: &str,
        (m, n, k): (usize, usize, usize),
        (z1, z2): (usize, usize),
        a: (u64, [usize; 4]),
        b: &[Arg],
        c: (u64, [usize; 3]),
        scale: f32,
        bias: Option<u64>,
        acc: Option<(u64, [usize; 3])>,
    ) -> Result<(), String> {
        if m == 0 || n == 0 || z1 * z2 == 0 {
            return Ok(());
        }
        if z1 * z2 > 65535 || m.div_ceil(TILE) > 65535 {
            return Err(format!(
                "a product of {z1}x{z2} batches of {m} rows exceeds the launch grid"
            ));
        }
        let mut args = vec![
            Arg::I(m as i64),
            Arg::I(n as i64),
            Arg::I(k as i64),
            Arg::I(z2 as i64),
            Arg::P(a.0),
        ];
        args.extend(a.1.iter().map(|x| Arg::I(*x as i64)));
        args.extend_from_slice(b);
        args.push(Arg::P(c.0));
        args.extend(c.1.iter().map(|x| Arg::I(*x as i64)));
        args.push(Arg::F(scale));
        args.push(Arg::P(bias.unwrap_or(c.0)));
        args.push(Arg::I(bias.is_some() as i64));
        let (accp, accs) = acc.unwrap_or((c.0, [0, 0, 0]));
        args.push(Arg::P(accp));
        args.extend(accs.iter().map(|x| Arg::I(*x as i64)));
        args.push(Arg::I(acc.is_some() as i64));
        if m <= GEMV_ROWS {
            // Decoding's few rows: one warp per column for k-fast right operands (every quantized
            // weight), one lane per column for n-fast f32 ones.
            let (kf, nf) = match b {
                [_, _, _, Arg::I(sbk), Arg::I(sbn)] => (*sbk == 1, *sbn == 1),
                _ => (true, false),
            };
            let pick = match kernel {
                "gemm_i8" => Some(("gemv_i8", GEMV_COLS_PER_WARP_BLOCK)),
                "gemm_i4" => Some(("gemv_i4", GEMV_COLS_PER_WARP_BLOCK)),
                _ if kf => Some(("gemv_f32", GEMV_COLS_PER_WARP_BLOCK)),
                _ if nf => Some(("gemv_cols_f32", 32)),
                _ => None,
            };
            if let Some((name, cols)) = pick {
                let grid = (n.div_ceil(cols) as u32, 1, (z1 * z2) as u32);
                return self.launch(Kernel::Fixed(name), grid, (GEMV_THREADS, 1, 1), &args);
            }
        }
        if self.model.tensor_cores && m >= TC_MIN_ROWS {
            let grid = (n.div_ceil(TC_TILE) as u32, m.div_ceil(TC_TILE) as u32, (z1 * z2) as u32);
            let tc = match kernel {
                "gemm_i8" => "gemm_tc_i8",
                "gemm_i4" => "gemm_tc_i4",
                _ => "gemm_tc_f32",
            };
            return self.launch(Kernel::Fixed(tc), grid, (TC_THREADS, 1, 1), &args);
        }
        let grid = (n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, (z1 * z2) as u32);
        self.launch(Kernel::Fixed(kernel), grid, (256, 1, 1), &args)
    }

    fn step(&mut self, si: usize, step: &Step) -> Result<(), String> {
        let mm = &self.model.manifest;
        match step {
            Step::Kernel {
                kernel,
                kind,
                inputs,
                out,
                ..
            } => {
                let (rows, n, table) = self.table(si)?;
                if rows == 0 || n == 0 {
                    return Ok(());
                }
                let mut args = vec![Arg::I(rows as i64), Arg::I(n as i64), Arg::P(table)];
                args.extend(inputs.iter().map(|v| Arg::P(self.addr[*v as usize])));
                args.push(Arg::P(self.addr[*out as usize]));
                let ry = rows.min(65535) as u32;
                let grid = match kind {
                    KernelKind::Map => (n.div_ceil(BLOCK as usize).min(65535) as u32, ry, 1),
                    KernelKind::ReduceLast | KernelKind::SoftmaxLast => (1, ry, 1),
                };
                self.launch(Kernel::Fused(*kernel as usize), grid, (BLOCK, 1, 1), &args)
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
            } => {
                let (sa, sb, so) = (
                    &self.shapes[*a as usize],
                    &self.shapes[*b as usize],
                    &self.shapes[*out as usize],
                );
                let (ra, rb, ro) = (sa.len(), sb.len(), so.len());
                if ra < 2 || rb < 2 || ro < 2 {
                    return Err("matrix products need rank ≥ 2".into());
                }
                let (m, n) = (so[ro - 2], so[ro - 1]);
                let k = if *ta { sa[ra - 2] } else { sa[ra - 1] };
                let kb = if *tb { sb[rb - 1] } else { sb[rb - 2] };
                let (am, bn) = (
                    if *ta { sa[ra - 1] } else { sa[ra - 2] },
                    if *tb { sb[rb - 2] } else { sb[rb - 1] },
                );
                if kb != k || am != m || bn != n {
                    return Err(format!("shapes {sa:?} @ {sb:?} -> {so:?} do not multiply"));
                }
                if let Some(acc) = acc {
                    if &self.shapes[*acc as usize] != so {
                        return Err("the accumulated tensor does not have the result's shape".into());
                    }
                }
                if let Some(bias) = bias {
                    if self.shapes[*bias as usize] != [n] {
                        return Err(format!(
                            "bias of shape {:?} for {n} columns",
                            self.shapes[*bias as usize]
                        ));
                    }
                }
                let batch = &so[..ro - 2];
                let sta = kernels::bstrides(&sa[..ra - 2], batch)?;
                let stb = kernels::bstrides(&sb[..rb - 2], batch)?;
                let sto = row_major(batch);
                let (sam, sak) = if *ta { (1, sa[ra - 1]) } else { (sa[ra - 1], 1) };
                let (sbk, sbn) = if *tb { (1, sb[rb - 1]) } else { (sb[rb - 1], 1) };
                // Whether the left operand's batches are laid out like the output's (axes of one
                // element, whose strides bstrides reports as 0, do not count): one matrix of rows.
                let same = (0..batch.len()).all(|i| batch[i] == 1 || sta[i] == sto[i]);
                // Against a weight, with the left operand one matrix of rows: bf16 tensor cores.
                let flat = batch.is_empty() || (!*ta && same);
                let rows = elems(batch) * m;
                if flat && stb.iter().all(|s| *s == 0) && self.bf16_applies(rows) {
                    if let Some(wb) = self.model.weight_bytes(*b) {
                        if wb.len() < 4 * ((k.max(1) - 1) * sbk + (n.max(1) - 1) * sbn + 1) {
                            return Err(format!("the weight of {sb:?} has {} bytes", wb.len()));
                        }
                        let w = self.weight_bf16(si, || {
                            Ok(bf16_rows(n, k, |col, kk| {
                                let at = 4 * (kk * sbk + col * sbn);
                                f32::from_le_bytes([wb[at], wb[at + 1], wb[at + 2], wb[at + 3]])
                            }))
                        })?;
                        return self.gemm_bf16(
                            (rows, n, k),
                            (self.addr[*a as usize], sam, sak),
                            w,
                            self.addr[*out as usize],
                            *scale,
                            bias.map(|v| self.addr[v as usize]),
                            acc.map(|v| self.addr[v as usize]),
                        );
                    }
                }
                // A batch of row-major left operands against one right operand (a weight): one
                // product over all their rows, so the row tiles fill (and tensor cores apply).
                if !*ta && !batch.is_empty() && stb.iter().all(|s| *s == 0) && same {
                    let b_args = [
                        Arg::P(self.addr[*b as usize]),
                        Arg::I(0),
                        Arg::I(0),
                        Arg::I(sbk as i64),
                        Arg::I(sbn as i64),
                    ];
                    let out_addr = self.addr[*out as usize];
                    return self.gemm(
                        "gemm_f32",
                        (elems(batch) * m, n, k),
                        (1, 1),
                        (self.addr[*a as usize], [0, 0, sam, sak]),
                        &b_args,
                        (out_addr, [0, 0, n]),
                        *scale,
                        bias.map(|v| self.addr[v as usize]),
                        acc.map(|v| (self.addr[v as usize], [0, 0, n])),
                    );
                }
                let (amat, bmat, omat) = (sa[ra - 2] * sa[ra - 1], sb[rb - 2] * sb[rb - 1], m * n);
                // The last two batch axes go to the grid; any before them loop here.
                let nb = batch.len();
                let split = nb.saturating_sub(2);
                let inner: Vec<usize> = (split..nb).collect();
                let pick = |st: &[usize], mat: usize, j: usize| -> usize { inner.get(j).map_or(0, |&i| st[i] * mat) };
                let zdim = |j: usize| inner.get(j).map_or(1, |&i| batch[i]);
                let (z1, z2) = if inner.len() == 2 {
                    (zdim(0), zdim(1))
                } else {
                    (1, zdim(0))
                };
                let zs = |st: &[usize], mat: usize| -> (usize, usize) {
                    if inner.len() == 2 {
                        (pick(st, mat, 0), pick(st, mat, 1))
                    } else {
                        (0, pick(st, mat, 0))
                    }
                };
                let (a1, a2) = zs(&sta, amat);
                let (b1, b2) = zs(&stb, bmat);
                let (o1, o2) = zs(&sto, omat);
                let outer = elems(&batch[..split]);
                for o in 0..outer {
                    // Element offsets of this outer batch index.
                    let mut rem = o;
                    let (mut oa, mut ob, mut oo) = (0, 0, 0);
                    for i in (0..split).rev() {
                        let ix = rem % batch[i];
                        rem /= batch[i];
                        oa += ix * sta[i] * amat;
                        ob += ix * stb[i] * bmat;
                        oo += ix * sto[i] * omat;
                    }
                    let b_args = [
                        Arg::P(self.addr[*b as usize] + 4 * ob as u64),
                        Arg::I(b1 as i64),
                        Arg::I(b2 as i64),
                        Arg::I(sbk as i64),
                        Arg::I(sbn as i64),
                    ];
                    self.gemm(
                        "gemm_f32",
                        (m, n, k),
                        (z1, z2),
                        (self.addr[*a as usize] + 4 * oa as u64, [a1, a2, sam, sak]),
                        &b_args,
                        (self.addr[*out as usize] + 4 * oo as u64, [o1, o2, n]),
                        *scale,
                        bias.map(|v| self.addr[v as usize]),
                        acc.map(|v| (self.addr[v as usize] + 4 * oo as u64, [o1, o2, n])),
                    )?;
                }
                Ok(())
            }
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
                let sa = &self.shapes[*a as usize];
                let sc = &self.shapes[*codes as usize];
                let k = *sa.last().ok_or("a rank-0 product operand")?;
                let n = sc.first().copied().unwrap_or(0);
                let rows = elems(sa) / k.max(1);
                let want_cols = if *bits == 8 { k } else { k / 2 };
                if sc.len() != 2 || sc[1] != want_cols || elems(&self.shapes[*out as usize]) != rows * n {
                    return Err(format!(
                        "quantized product {sa:?} x codes {sc:?} does not fit its output"
                    ));
                }
                let mut b_args = vec![Arg::P(self.addr[*codes as usize]), Arg::P(self.addr[*scales as usize])];
                let kernel = if *bits == 8 {
                    "gemm_i8"
                } else {
                    if *group == 0 || k % *group as usize != 0 || k % 32 != 0 {
                        return Err(format!("int4 groups of {group} do not tile {k} columns"));
                    }
                    let mins = mins.ok_or("int4 codes without minimums")?;
                    b_args.push(Arg::P(self.addr[mins as usize]));
                    b_args.push(Arg::I(*group as i64));
                    "gemm_i4"
                };
                self.gemm(
                    kernel,
                    (rows, n, k),
                    (1, 1),
                    (self.addr[*a as usize], [0, 0, k, 1]),
                    &b_args,
                    (self.addr[*out as usize], [0, 0, n]),
                    *scale,
                    bias.map(|v| self.addr[v as usize]),
                    acc.map(|v| (self.addr[v as usize], [0, 0, n])),
                )
            }
            Step::PackedMatMul { kernel, .. } => Err(format!(
                "step {si} is a CPU product packed for `{kernel}`: this artifact was compiled for a CPU"
            )),
            Step::SpMatMul {
                a,
                out,
                scale,
                bias,
                acc,
                ..
            }
            | Step::SpMatMul24 {
                a,
                out,
                scale,
                bias,
                acc,
                ..
            } => {
                let sa = &self.shapes[*a as usize];
                let k = *sa.last().ok_or("a rank-0 product operand")?;
                let rows = elems(sa) / k.max(1);
                let dense = self
                    .model
                    .dense
                    .get(&si)
                    .ok_or("a sparse product without its dense copy")?;
                let n = dense.len / 4 / k.max(1);
                if elems(&self.shapes[*out as usize]) != rows * n {
                    return Err(format!("sparse product {sa:?} x [{n}, {k}] does not fit its output"));
                }
                if self.bf16_applies(rows) {
                    let w = self.weight_bf16(si, || {
                        let d = densify_step(&self.model.manifest, &self.model.host_weights, step)
                            .expect("a sparse product")?;
                        Ok(bf16_rows(n, k, |col, kk| {
                            let at = 4 * (col * k + kk);
                            f32::from_le_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]])
                        }))
                    })?;
                    return self.gemm_bf16(
                        (rows, n, k),
                        (self.addr[*a as usize], k, 1),
                        w,
                        self.addr[*out as usize],
                        *scale,
                        bias.map(|v| self.addr[v as usize]),
                        acc.map(|v| self.addr[v as usize]),
                    );
                }
                let b_args = [Arg::P(dense.ptr), Arg::I(0), Arg::I(0), Arg::I(1), Arg::I(k as i64)];
                self.gemm(
                    "gemm_f32",
                    (rows, n, k),
                    (1, 1),
                    (self.addr[*a as usize], [0, 0, k, 1]),
                    &b_args,
                    (self.addr[*out as usize], [0, 0, n]),
                    *scale,
                    bias.map(|v| self.addr[v as usize]),
                    acc.map(|v| (self.addr[v as usize], [0, 0, n])),
                )
            }
            Step::Gather { table, idx, out, axis } => {
                let ts = &self.shapes[*table as usize];
                let axis = *axis as usize;
                if axis >= ts.len() {
                    return Err("gather axis out of range".into());
                }
                let (outer, len, inner) = (elems(&ts[..axis]), ts[axis], elems(&ts[axis + 1..]));
                let nidx = elems(&self.shapes[*idx as usize]);
                let es = self.dtype(*table).size_bytes();
                if self.sizes[*out as usize] != outer * nidx * inner * es {
                    return Err("gather output has the wrong size".into());
                }
                let ty = match es {
                    1 => "i8",
                    2 => "i16",
                    4 => "i32",
                    8 => "i64",
                    _ => return Err(format!("no gather kernel for {es}-byte elements")),
                };
                let ix = match self.dtype(*idx) {
                    DType::I32 => "i32",
                    DType::I64 => "i64",
                    d => return Err(format!("gather indices of type {d}")),
                };
                let total = outer * nidx * inner;
                if total == 0 {
                    return Ok(());
                }
                let args = [
                    Arg::I(outer as i64),
                    Arg::I(nidx as i64),
                    Arg::I(inner as i64),
                    Arg::I(len as i64),
                    Arg::P(self.addr[*table as usize]),
                    Arg::P(self.addr[*idx as usize]),
                    Arg::P(self.addr[*out as usize]),
                    Arg::P(self.scratch),
                ];
                self.launch(
                    Kernel::Fixed(&format!("gather_{ty}_{ix}")),
                    grid_1d(total),
                    (BLOCK, 1, 1),
                    &args,
                )
            }
            Step::Transpose { x, out, perm } => {
                let (xs, os) = (&self.shapes[*x as usize], &self.shapes[*out as usize]);
                if perm.len() != xs.len() || os.len() != xs.len() {
                    return Err("transpose rank mismatch".into());
                }
                let xst = row_major(xs);
                let src: Vec<usize> = perm.iter().map(|p| xst[*p as usize]).collect();
                if perm.iter().enumerate().any(|(i, p)| os[i] != xs[*p as usize]) {
                    return Err(format!("transpose of {xs:?} by {perm:?} is not {os:?}"));
                }
                let es = self.dtype(*x).size_bytes();
                self.copy(
                    es,
                    os,
                    (self.addr[*x as usize], &src),
                    (self.addr[*out as usize], &row_major(os)),
                )
            }
            Step::Slice { x, out, axis, start } => {
                let (xs, os) = (&self.shapes[*x as usize], &self.shapes[*out as usize]);
                let axis = *axis as usize;
                if axis >= xs.len() || os.len() != xs.len() || *start as usize + os[axis] > xs[axis] {
                    return Err(format!("slice of {xs:?} at {start} is not {os:?}"));
                }
                let xst = row_major(xs);
                let es = self.dtype(*x).size_bytes();
                let base = self.addr[*x as usize] + (*start as usize * xst[axis] * es) as u64;
                self.copy(es, os, (base, &xst), (self.addr[*out as usize], &row_major(os)))
            }
            Step::Concat { xs, out, axis } => {
                let os = &self.shapes[*out as usize];
                let axis = *axis as usize;
                let ost = row_major(os);
                let es = self.dtype(*out).size_bytes();
                let mut at = 0usize;
                for x in xs {
                    let ps = &self.shapes[*x as usize];
                    if ps.len() != os.len() || axis >= ps.len() || at + ps[axis] > os[axis] {
                        return Err(format!("concatenation part {ps:?} does not fit {os:?}"));
                    }
                    let dst = self.addr[*out as usize] + (at * ost[axis] * es) as u64;
                    self.copy(es, ps, (self.addr[*x as usize], &row_major(ps)), (dst, &ost))?;
                    at += ps[axis];
                }
                if at != os[axis] {
                    return Err("concatenation parts do not fill the result".into());
                }
                Ok(())
            }
            Step::Broadcast { x, out } => {
                let (xs, os) = (&self.shapes[*x as usize], &self.shapes[*out as usize]);
                let src = kernels::bstrides(xs, os)?;
                let es = self.dtype(*x).size_bytes();
                self.copy(
                    es,
                    os,
                    (self.addr[*x as usize], &src),
                    (self.addr[*out as usize], &row_major(os)),
                )
            }
            Step::Attention {
                q,
                k,
                v,
                out,
                scale,
                kernel,
                kernel_inputs,
                seq_major,
                views,
                cached,
                ..
            } => {
                let (qs, qst) = crate::attention::attn_layout(&self.shapes[*q as usize], seq_major[0], views[0])?;
                let (ks, mut kst) = crate::attention::attn_layout(&self.shapes[*k as usize], seq_major[1], views[1])?;
                let (vs, mut vst) = crate::attention::attn_layout(&self.shapes[*v as usize], seq_major[2], views[2])?;
                // Keys and values read in place from the cache: [b, h, capacity, d].
                for (i, (st, sh)) in [(&mut kst, ks), (&mut vst, vs)].into_iter().enumerate() {
                    if cached[i] {
                        let cap = self
                            .cache
                            .as_ref()
                            .map(|c| c.capacity)
                            .ok_or("cached attention outside a session")?;
                        if seq_major[i + 1] || sh[2] > cap {
                            return Err("keys or values cannot be read from the cache".into());
                        }
                        *st = (0, sh[1] * cap * sh[3], cap * sh[3], sh[3]);
                    }
                }
                let (os, ost) = crate::attention::attn_layout(&self.shapes[*out as usize], seq_major[3], None)?;
                let (b, h, sq, d) = (qs[0], qs[1], qs[2], qs[3]);
                let (sk, dv) = (ks[2], vs[3]);
                if ks != [b, h, sk, d] || vs != [b, h, sk, dv] || os != [b, h, sq, dv] {
                    return Err(format!(
                        "attention shapes q {qs:?}, k {ks:?}, v {vs:?}, out {os:?} do not fit"
                    ));
                }
                if b * h * sq * sk == 0 {
                    return Ok(());
                }
                let space = [b, h, sq, sk];
                let (rows, n, table) = self.table(si)?;
                if rows != b * h * sq || n != sk {
                    return Err(format!(
                        "the attention softmax's table has {rows}x{n} entries for {space:?}"
                    ));
                }
                let flash = step.flash().map(|(k, j)| crate::plan::flash_kernel(k, j));
                // Decoding's few query rows would leave most of a 16-row block idle and give the
                // GPU only b·h blocks; there the two products run as matrix–vector kernels.
                let fused = self.model.fused_attention && sq > GEMV_ROWS && d <= FA_MAX_DIM && dv <= FA_MAX_DIM;
                if let Some(name) = flash.filter(|n| fused && self.model.dev.has(n)) {
                    // One fused kernel; the offsets table is the softmax kernel's (the score block
                    // itself is never stored, so its entries go unread).
                    if b * h > 65535 || sq.div_ceil(FA_ROWS) > 1 << 20 {
                        return Err(format!(
                            "attention over {b}x{h} heads of {sq} rows exceeds the launch grid"
                        ));
                    }
                    let mut args: Vec<Arg> = [sq, sk, d, dv, h].iter().map(|x| Arg::I(*x as i64)).collect();
                    for (val, st) in [(*q, qst), (*k, kst), (*v, vst), (*out, ost)] {
                        args.push(Arg::P(self.addr[val as usize] + 4 * st.0 as u64));
                        args.extend([st.1, st.2, st.3].iter().map(|x| Arg::I(*x as i64)));
                    }
                    args.push(Arg::F(*scale));
                    args.push(Arg::P(table));
                    // The score input's pointer is never read: any valid address will do.
                    args.extend(
                        kernel_inputs
                            .iter()
                            .map(|i| Arg::P(i.map_or(table, |x| self.addr[x as usize]))),
                    );
                    // On tensor cores where the head dimension has a kernel and the rows fill a
                    // 64-row block at least halfway.
                    let (kk, j) = step.flash().expect("a fused attention kernel has a name");
                    let tc = crate::plan::flash_tc_kernel(kk, j, d as i64);
                    if self.model.tensor_cores
                        && self.model.tc_attention
                        && d == dv
                        && FT_DIMS.contains(&(d as i64))
                        && sq >= FT_ROWS / 2
                        && self.model.dev.has(&tc)
                    {
                        let grid = (sq.div_ceil(FT_ROWS) as u32, (b * h) as u32, 1);
                        return self.launch(Kernel::Fixed(&tc), grid, (FT_THREADS, 1, 1), &args);
                    }
                    let grid = (sq.div_ceil(FA_ROWS) as u32, (b * h) as u32, 1);
                    return self.launch(Kernel::Fixed(&name), grid, (FA_THREADS, 1, 1), &args);
                }
                let scores = DevMem::alloc(&self.model.dev, 4 * elems(&space))?;
                // scores[b, h] = scale · q[b, h] k[b, h]ᵀ
                let b_args = [
                    Arg::P(self.addr[*k as usize] + 4 * kst.0 as u64),
                    Arg::I(kst.1 as i64),
                    Arg::I(kst.2 as i64),
                    Arg::I(1),
                    Arg::I(kst.3 as i64),
                ];
                self.gemm(
                    "gemm_f32",
                    (sq, sk, d),
                    (b, h),
                    (self.addr[*q as usize] + 4 * qst.0 as u64, [qst.1, qst.2, qst.3, 1]),
                    &b_args,
                    (scores.ptr, [h * sq * sk, sq * sk, sk]),
                    *scale,
                    None,
                    None,
                )?;
                // The softmax kernel in place over the scores, reading any mask inputs.
                let mut args = vec![Arg::I(rows as i64), Arg::I(n as i64), Arg::P(table)];
                args.extend(
                    kernel_inputs
                        .iter()
                        .map(|i| Arg::P(i.map_or(scores.ptr, |x| self.addr[x as usize]))),
                );
                args.push(Arg::P(scores.ptr));
                self.launch(
                    Kernel::Fused(*kernel as usize),
                    (1, rows.min(65535) as u32, 1),
                    (BLOCK, 1, 1),
                    &args,
                )?;
                // out[b, h] = p[b, h] v[b, h]
                let b_args = [
                    Arg::P(self.addr[*v as usize] + 4 * vst.0 as u64),
                    Arg::I(vst.1 as i64),
                    Arg::I(vst.2 as i64),
                    Arg::I(vst.3 as i64),
                    Arg::I(1),
                ];
                self.gemm(
                    "gemm_f32",
                    (sq, dv, sk),
                    (b, h),
                    (scores.ptr, [h * sq * sk, sq * sk, sk, 1]),
                    &b_args,
                    (self.addr[*out as usize] + 4 * ost.0 as u64, [ost.1, ost.2, ost.3]),
                    1.0,
                    None,
                    None,
                )?;
                self.keep.push(scores);
                Ok(())
            }
            Step::CacheAppend { x, out, slot, view } => {
                let Some(cache) = self.cache.as_deref_mut() else {
                    return Err(
                        "this model keeps a key/value cache: run it through a generation session (`kiln generate`, `CudaModel::session`)"
                            .into(),
                    );
                };
                let (xs, os) = (self.shapes[*x as usize].clone(), self.shapes[*out as usize].clone());
                if xs.len() != 4 || os.len() != 4 || xs[0] != os[0] || xs[1] != os[1] || xs[3] != os[3] {
                    return Err(format!("cache_append of {xs:?} into {os:?}"));
                }
                let (b, h, t, d, len) = (xs[0], xs[1], xs[2], xs[3], os[2]);
                if len != cache.len + t || len > cache.capacity {
                    return Err(format!(
                        "the cache holds {} of {} positions and {t} are appended, but the inputs say {len}",
                        cache.len, cache.capacity
                    ));
                }
                let (cap, past) = (cache.capacity, cache.len);
                let base = cache.slot(*slot, b, h, d)?;
                // New rows after the cached ones: [b·h, t, d] into [b·h, cap, d] at row `past`.
                let shape = [b * h, t, d];
                let dst = base + (past * d * 4) as u64;
                self.copy(
                    4,
                    &shape,
                    (self.addr[*x as usize], &[t * d, d, 1]),
                    (dst, &[cap * d, d, 1]),
                )?;
                if !view {
                    let shape = [b * h, len, d];
                    self.copy(
                        4,
                        &shape,
                        (base, &[cap * d, d, 1]),
                        (self.addr[*out as usize], &[len * d, d, 1]),
                    )?;
                }
                Ok(())
            }
            Step::Fallback { op, inputs, out } if self.reduce_on_device(op, inputs, *out)? => Ok(()),
            Step::Fallback { op, inputs, out } if self.unary_on_device(op, inputs, *out)? => Ok(()),
            Step::Fallback { op, inputs, out } => {
                // On the host: copy the operands over, evaluate, copy the result back.
                self.model.dev.synchronize()?;
                let mut host: Vec<Vec<u8>> = Vec::new();
                for v in inputs {
                    host.push(match mm.values[*v as usize].storage {
                        Storage::Weight { offset, len } => {
                            self.model.host_weights[offset as usize..(offset + len) as usize].to_vec()
                        }
                        _ => download(&*self.model.dev, self.addr[*v as usize], self.sizes[*v as usize])?,
                    });
                }
                let o = *out as usize;
                let value = host_eval(mm, op, inputs, host, (self.shapes, self.sizes), *out, self.syms)?;
                if !value.is_empty() {
                    // The output value's device buffer holds `sizes[o]` bytes.
                    self.model.dev.write(self.addr[o], &value)?;
                }
                Ok(())
            }
        }
    }
}

/// Evaluates a `Fallback` step's op on the host: `host` holds its operands' bytes.
fn host_eval(
    m: &Manifest,
    op: &kiln_ir::Op,
    inputs: &[u32],
    mut host: Vec<Vec<u8>>,
    (shapes, sizes): (&[Vec<usize>], &[usize]),
    out: u32,
    syms: &[usize],
) -> Result<Vec<u8>, String> {
    let args: Vec<(Buf, &[usize], DType)> = inputs
        .iter()
        .zip(host.iter_mut())
        .map(|(v, h)| {
            (
                Buf {
                    ptr: h.as_mut_ptr(),
                    len: h.len(),
                },
                shapes[*v as usize].as_slice(),
                m.values[*v as usize].dtype,
            )
        })
        .collect();
    let o = out as usize;
    let mut value = vec![0u8; sizes[o]];
    let names: Vec<String> = m.dims.iter().map(|d| d.0.clone()).collect();
    let rb = Buf {
        ptr: value.as_mut_ptr(),
        len: value.len(),
    };
    kernels::fallback(op, &args, (rb, &shapes[o], m.values[o].dtype), &names, syms)?;
    Ok(value)
}

/// The key/value cache of one batch of sequences, on the GPU: per slot one zeroed
/// `[b, h, capacity, d]` f32 buffer, allocated at first use.
pub struct CudaKvCache {
    dev: Rc<dyn Device>,
    slots: BTreeMap<u32, (DevMem, [usize; 3])>,
    len: usize,
    capacity: usize,
}

impl CudaKvCache {
    /// The slot's device address, allocating it (zeroed) on first use.
    fn slot(&mut self, slot: u32, b: usize, h: usize, d: usize) -> Result<u64, String> {
        if let Some((m, shape)) = self.slots.get(&slot) {
            if *shape != [b, h, d] {
                return Err(format!("a [{b}, {h}, _, {d}] entry for a cache of {shape:?}"));
            }
            return Ok(m.ptr);
        }
        let bytes = b
            .checked_mul(h)
            .and_then(|n| n.checked_mul(self.capacity))
            .and_then(|n| n.checked_mul(d))
            .and_then(|n| n.checked_mul(4))
            .ok_or("cache size overflows")?;
        let m = DevMem::zeroed(&self.dev, bytes)?;
        let ptr = m.ptr;
        self.slots.insert(slot, (m, [b, h, d]));
        Ok(ptr)
    }

    fn bytes(&self) -> usize {
        self.slots.values().map(|(m, _)| m.len).sum()
    }
}

/// A generation session on the GPU (see [`crate::Session`] for the CPU's).
pub struct CudaSession<'m> {
    model: &'m CudaModel,
    cache: CudaKvCache,
    feed: crate::Feed,
    failed: bool,
}

impl CudaSession<'_> {
    fn run_raw(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<Vec<(String, Tensor)>, RunError> {
        if self.failed {
            return Err(RunError::BadInput {
                name: "session".into(),
                msg: "an earlier step failed and left the cache inconsistent; start a new session".into(),
            });
        }
        self.failed = true;
        let outs = self.model.run_inner(&inputs, Some(&mut self.cache), true)?;
        self.cache.len = self.feed.len();
        self.failed = false;
        Ok(outs)
    }
}

impl crate::Decoder for CudaSession<'_> {
    fn prefill(&mut self, prompts: &[Vec<i64>]) -> Result<Vec<Vec<f32>>, RunError> {
        let inputs = self.feed.prefill(prompts).map_err(|msg| RunError::BadInput {
            name: "prompts".into(),
            msg,
        })?;
        let outs = self.run_raw(inputs)?;
        crate::session::logits_rows(&outs, self.feed.batch())
    }

    fn step(&mut self, tokens: &[i64]) -> Result<Vec<Vec<f32>>, RunError> {
        let inputs = self.feed.step(tokens).map_err(|msg| RunError::BadInput {
            name: "tokens".into(),
            msg,
        })?;
        let outs = self.run_raw(inputs)?;
        crate::session::logits_rows(&outs, self.feed.batch())
    }

    fn capacity(&self) -> usize {
        self.cache.capacity
    }

    fn len(&self) -> usize {
        self.feed.len()
    }

    fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }
}
