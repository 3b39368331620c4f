//! Autoregressive generation. A decoding artifact (`kiln compile --generate`) has one plan that
//! serves as both entry points: the prefill runs it on the whole prompt (`seq` = prompt length),
//! each decode step on one new token per sequence (`seq` = 1); both read the same weights.
//!
//! A [`Session`] owns the key/value cache of one batch of sequences and derives the decoding inputs
//! of every step ([`Feed`]): prompts of different lengths are **left-padded** to a rectangle, so
//! every sequence's next token goes to the same cache entry; `key_mask` hides the padding, and
//! position ids count real tokens only, as transformers does with left padding.
//!
//! Cache layout: one buffer per `cache_append` slot (keys and values of each layer), allocated at
//! the first step as `[batch, heads, capacity, head_dim]` f32, capacity being the compiled bound of
//! the `kv` dim. Appending writes `t` rows per head in place; a head's rows are contiguous, so
//! attention reads each head's keys as one matrix.

use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_ir::Tensor;

use crate::kernels::Buf;
use crate::plan::Step;
use crate::{Model, RunError};

/// The cache dim's name in a decoding graph.
pub const CACHE_DIM: &str = "kv";
/// The decoding inputs, in the order the frontend adds them.
pub const DECODE_INPUTS: [&str; 4] = ["positions", "cache_slots", "key_mask", "last_index"];

struct Slot {
    data: Vec<f32>,
    shape: [usize; 3],
}

/// The key/value cache of one batch of sequences.
pub struct KvCache {
    slots: BTreeMap<u32, Slot>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty cache holding up to `capacity` positions.
    pub fn new(capacity: usize) -> KvCache {
        KvCache {
            slots: BTreeMap::new(),
            len: 0,
            capacity,
        }
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by all slots.
    pub fn bytes(&self) -> usize {
        self.slots.values().map(|s| s.data.len() * 4).sum()
    }

    /// The capacity in positions.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The slot as a buffer `[b, h, capacity, d]`, allocated on first use.
    pub(crate) fn slot_buf(&mut self, slot: u32, b: usize, h: usize, d: usize) -> Result<Buf, String> {
        let s = self.slot(slot, b, h, d)?;
        Ok(Buf {
            ptr: s.data.as_mut_ptr() as *mut u8,
            len: s.data.len() * 4,
        })
    }

    fn slot(&mut self, slot: u32, b: usize, h: usize, d: usize) -> Result<&mut Slot, String> {
        let cap = self.capacity;
        let s = match self.slots.entry(slot) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let n = b
                    .checked_mul(h)
                    .and_then(|n| n.checked_mul(cap))
                    .and_then(|n| n.checked_mul(d))
                    .ok_or("cache size overflows")?;
                e.insert(Slot {
                    data: zeroed(n)?,
                    shape: [b, h, d],
                })
            }
        };
        if s.shape != [b, h, d] {
            return Err(format!("a [{b}, {h}, _, {d}] entry for a cache of {:?}", s.shape));
        }
        Ok(s)
    }

    /// Appends `x [b, h, t, d]` to `slot` after the cached entries and, unless the step reads
    /// the cache in place (`view`), copies all of them to `out [b, h, len, d]`.
    pub(crate) fn append(
        &mut self,
        slot: u32,
        x: (Buf, &[usize]),
        out: (Buf, &[usize]),
        view: bool,
    ) -> Result<(), String> {
        let (xs, os) = (x.1, out.1);
        if xs.len() != 4 || os.len() != 4 || xs[0] != os[0] || xs[1] != os[1] || xs[3] != os[3] {
            return Err(format!("cache_append of {xs:?} into {os:?}"));
        }
        let (b, h, t, d, len) = (xs[0], xs[1], xs[2], xs[3], os[2]);
        if len != self.len + t {
            return Err(format!(
                "the cache holds {} positions and {t} are appended, but the inputs say {len}",
                self.len
            ));
        }
        if len > self.capacity {
            return Err(format!(
                "the cache holds at most {} positions, {len} needed",
                self.capacity
            ));
        }
        if x.0.len < b * h * t * d * 4 || (!view && out.0.len < b * h * len * d * 4) {
            return Err("cache_append buffers are too small".into());
        }
        let cap = self.capacity;
        let past = self.len;
        let s = self.slot(slot, b, h, d)?;
        // SAFETY: the buffer was checked to hold the elements addressed below.
        let xv = unsafe { std::slice::from_raw_parts(x.0.ptr as *const f32, b * h * t * d) };
        for bh in 0..b * h {
            let base = bh * cap * d;
            s.data[base + past * d..base + len * d].copy_from_slice(&xv[bh * t * d..(bh + 1) * t * d]);
        }
        if view {
            return Ok(());
        }
        // SAFETY: the buffer was checked to hold the elements addressed below.
        let ov = unsafe { std::slice::from_raw_parts_mut(out.0.ptr as *mut f32, b * h * len * d) };
        for bh in 0..b * h {
            let base = bh * cap * d;
            ov[bh * len * d..(bh + 1) * len * d].copy_from_slice(&s.data[base..base + len * d]);
        }
        Ok(())
    }
}

/// `n` zero floats from the allocator's zeroed memory: the OS maps zero pages lazily, so a cache
/// sized for the whole context costs only the pages the positions in use touch.
fn zeroed(n: usize) -> Result<Vec<f32>, String> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(n).map_err(|_| format!("a cache of {n} floats is too large"))?;
    // SAFETY: the layout has a non-zero size; the pointer is checked; a Vec built from an
    // allocation of exactly `n` zeroed f32s with the global allocator owns it correctly.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut f32;
        if p.is_null() {
            return Err(format!("cannot allocate a cache of {n} floats"));
        }
        Ok(Vec::from_raw_parts(p, n, n))
    }
}

/// Derives the inputs of each decoding step for a left-padded batch.
#[derive(Clone, Debug)]
pub struct Feed {
    ids: String,
    pads: Vec<usize>,
    len: usize,
    capacity: usize,
    pad_id: i64,
}

impl Feed {
    /// A feed for a graph whose token-id input is called `ids`, with a cache of `capacity`.
    pub fn new(ids: &str, capacity: usize) -> Feed {
        Feed {
            ids: ids.to_string(),
            pads: Vec::new(),
            len: 0,
            capacity,
            pad_id: 0,
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.pads.len()
    }

    /// Inputs of the prefill: the prompts, left-padded.
    pub fn prefill(&mut self, prompts: &[Vec<i64>]) -> Result<BTreeMap<String, Tensor>, String> {
        if !self.is_empty() {
            return Err("the session already holds a prefilled batch".into());
        }
        if prompts.is_empty() {
            return Err("no prompts".into());
        }
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            return Err(format!("prompt {i} is empty; every prompt needs at least one token"));
        }
        let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
        self.pads = prompts.iter().map(|p| t - p.len()).collect();
        let mut ids = Vec::with_capacity(prompts.len() * t);
        for (p, pad) in prompts.iter().zip(&self.pads) {
            ids.extend(std::iter::repeat_n(self.pad_id, *pad));
            ids.extend_from_slice(p);
        }
        self.inputs(ids, t)
    }

    /// Inputs of one decode step: one new token per sequence.
    pub fn step(&mut self, tokens: &[i64]) -> Result<BTreeMap<String, Tensor>, String> {
        if self.is_empty() {
            return Err("decode step before the prefill".into());
        }
        if tokens.len() != self.batch() {
            return Err(format!("{} tokens for a batch of {}", tokens.len(), self.batch()));
        }
        self.inputs(tokens.to_vec(), 1)
    }

    fn inputs(&mut self, ids: Vec<i64>, t: usize) -> Result<BTreeMap<String, Tensor>, String> {
        let (b, past) = (self.batch(), self.len);
        let len = past + t;
        if len > self.capacity {
            return Err(format!(
                "the context would reach {len} positions, but the model was compiled for at most {}",
                self.capacity
            ));
        }
        let mut positions = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * len);
        for &pad in &self.pads {
            positions.extend((past..len).map(|s| s.saturating_sub(pad) as i64));
            mask.extend((0..len).map(|s| (s >= pad) as i64));
        }
        let tensor = |shape: Vec<usize>, v: Vec<i64>| Tensor::from_i64(shape, v).map_err(|e| e.to_string());
        let mut m = BTreeMap::new();
        m.insert(self.ids.clone(), tensor(vec![b, t], ids)?);
        m.insert(DECODE_INPUTS[0].into(), tensor(vec![b, t], positions)?);
        m.insert(
            DECODE_INPUTS[1].into(),
            tensor(vec![t], (past..len).map(|s| s as i64).collect())?,
        );
        m.insert(DECODE_INPUTS[2].into(), tensor(vec![b, len], mask)?);
        m.insert(DECODE_INPUTS[3].into(), tensor(vec![1], vec![t as i64 - 1])?);
        self.len = len;
        Ok(m)
    }
}

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 (or below) picks the most likely token (greedy); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// Random seed.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Picks tokens from logits (greedy, or temperature / top-k / top-p sampling), reproducibly.
pub struct Sampler {
    cfg: Sampling,
    state: u64,
}

impl Sampler {
    /// A sampler; the same settings and seed give the same tokens.
    pub fn new(cfg: Sampling) -> Sampler {
        Sampler {
            cfg,
            state: cfg.seed ^ 0x853C_49E6_748F_EA9B,
        }
    }

    fn uniform(&mut self) -> f64 {
        // splitmix64
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next token for one row of logits.
    pub fn pick(&mut self, logits: &[f32]) -> i64 {
        let argmax = || {
            let mut best = 0;
            for (i, v) in logits.iter().enumerate() {
                if *v > logits[best] || (logits[best].is_nan() && !v.is_nan()) {
                    best = i;
                }
            }
            best as i64
        };
        if self.cfg.temperature <= 0.0 || logits.len() < 2 {
            return argmax();
        }
        let mut idx: Vec<usize> = (0..logits.len()).filter(|i| logits[*i].is_finite()).collect();
        if idx.is_empty() {
            return argmax();
        }
        idx.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b)));
        if self.cfg.top_k > 0 {
            idx.truncate(self.cfg.top_k);
        }
        let t = self.cfg.temperature as f64;
        let top = logits[idx[0]] as f64;
        let mut p: Vec<f64> = idx.iter().map(|i| ((logits[*i] as f64 - top) / t).exp()).collect();
        let sum: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= sum);
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = p
                .iter()
                .position(|x| {
                    acc += x;
                    acc >= self.cfg.top_p as f64
                })
                .map_or(p.len(), |i| i + 1);
            idx.truncate(keep);
            p.truncate(keep);
            let s: f64 = p.iter().sum();
            p.iter_mut().for_each(|x| *x /= s);
        }
        let mut r = self.uniform();
        for (i, x) in idx.iter().zip(&p) {
            if r < *x {
                return *i as i64;
            }
            r -= x;
        }
        *idx.last().expect("at least one candidate") as i64
    }
}

/// The model a [`Session`] runs: borrowed, or shared where the session must own its model (a
/// Python generator outlives any borrow).
enum ModelRef<'m> {
    Borrowed(&'m Model),
    Shared(Arc<Model>),
}

impl std::ops::Deref for ModelRef<'_> {
    type Target = Model;
    fn deref(&self) -> &Model {
        match self {
            ModelRef::Borrowed(m) => m,
            ModelRef::Shared(m) => m,
        }
    }
}

/// One batch of sequences being generated by a decoding model.
pub struct Session<'m> {
    model: ModelRef<'m>,
    cache: KvCache,
    feed: Feed,
    failed: bool,
    /// Seconds per plan step summed over decode steps, and how many, when profiling.
    profile: Option<(Vec<f64>, usize)>,
    /// Weight bytes the decode steps read (`RunStats::weight_bytes_read`), summed, and how many.
    decode_reads: (usize, usize),
}

impl crate::plan::Manifest {
    /// Whether this artifact was compiled for generation (it keeps a key/value cache).
    pub fn is_decoder(&self) -> bool {
        self.steps.iter().any(|s| matches!(s, Step::CacheAppend { .. }))
    }

    /// The longest context (prompt plus generated tokens) a decoding model was compiled for.
    pub fn context_capacity(&self) -> Option<usize> {
        self.dims.iter().find(|(n, _)| n == CACHE_DIM).map(|(_, b)| *b as usize)
    }

    /// The step-input builder of a decoding artifact, and its capacity.
    pub(crate) fn decode_feed(&self) -> Result<(Feed, usize), RunError> {
        let not = |msg: &str| RunError::BadInput {
            name: "model".into(),
            msg: msg.into(),
        };
        if !self.is_decoder() {
            return Err(not(
                "this artifact has no key/value cache; compile the spec with `kiln compile --generate`",
            ));
        }
        let capacity = self
            .context_capacity()
            .ok_or_else(|| not("a decoding artifact without a `kv` dim"))?;
        let ids: Vec<&str> = self
            .inputs
            .iter()
            .map(|p| p.name.as_str())
            .filter(|n| !DECODE_INPUTS.contains(n))
            .collect();
        let [ids] = ids.as_slice() else {
            return Err(not("a decoding artifact needs exactly one token-id input"));
        };
        Ok((Feed::new(ids, capacity), capacity))
    }
}

impl Model {
    /// Whether this artifact was compiled for generation (it keeps a key/value cache).
    pub fn is_decoder(&self) -> bool {
        self.manifest().is_decoder()
    }

    /// The longest context (prompt plus generated tokens) a decoding model was compiled for.
    pub fn context_capacity(&self) -> Option<usize> {
        self.manifest().context_capacity()
    }

    /// Starts a generation session (an empty cache).
    pub fn session(&self) -> Result<Session<'_>, RunError> {
        Session::start(ModelRef::Borrowed(self))
    }

    /// Starts a generation session that shares the model instead of borrowing it.
    pub fn shared_session(model: Arc<Model>) -> Result<Session<'static>, RunError> {
        Session::start(ModelRef::Shared(model))
    }
}

impl<'m> Session<'m> {
    fn start(model: ModelRef<'m>) -> Result<Session<'m>, RunError> {
        let (feed, capacity) = model.manifest().decode_feed()?;
        Ok(Session {
            model,
            cache: KvCache::new(capacity),
            feed,
            failed: false,
            profile: None,
            decode_reads: (0, 0),
        })
    }
}

/// Next-token logits, one row per sequence, from a decoding plan's outputs (the first is the
/// logits of each sequence's last position).
pub(crate) fn logits_rows(outs: &[(String, Tensor)], batch: usize) -> Result<Vec<Vec<f32>>, RunError> {
    let logits = &outs[0].1;
    let v = logits.to_f32_vec().ok_or_else(|| RunError::BadInput {
        name: outs[0].0.clone(),
        msg: format!("expected f32 logits, got {}", logits.dtype()),
    })?;
    let row = v.len() / batch.max(1);
    Ok(v.chunks(row.max(1)).map(|c| c.to_vec()).collect())
}

/// A generation session on some device: what [`Decoder::generate`] drives.
pub trait Decoder {
    /// Runs the prompts (left-padded to one length); returns each one's next-token logits.
    fn prefill(&mut self, prompts: &[Vec<i64>]) -> Result<Vec<Vec<f32>>, RunError>;

    /// Feeds one token per sequence; returns each one's next-token logits.
    fn step(&mut self, tokens: &[i64]) -> Result<Vec<Vec<f32>>, RunError>;

    /// The longest context this session can hold.
    fn capacity(&self) -> usize;

    /// Positions cached so far (padding included).
    fn len(&self) -> usize;

    /// Whether nothing was run yet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by the key/value cache.
    fn cache_bytes(&self) -> usize;

    /// Mean time per decode step by kind of step, where the session profiles.
    fn decode_profile(&self) -> Option<crate::Profile> {
        None
    }

    /// Mean weight bytes a decode step read so far (a mixture of experts counts only the experts
    /// its tokens were routed to), where the session measures it.
    fn decode_weight_bytes(&self) -> Option<f64> {
        None
    }

    /// Generates up to `max_new` tokens for every prompt, calling `on_token(step, tokens)` after
    /// each step (it returns `false` to stop early). Stops a sequence at `stop` (kept in the
    /// output). Returns the generated tokens of each prompt.
    fn generate(
        &mut self,
        prompts: &[Vec<i64>],
        max_new: usize,
        sampler: &mut Sampler,
        stop: Option<i64>,
        on_token: &mut dyn FnMut(usize, &[i64]) -> bool,
    ) -> Result<Vec<Vec<i64>>, RunError> {
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if longest + max_new.saturating_sub(1) > self.capacity() {
            return Err(RunError::BadInput {
                name: "max_new_tokens".into(),
                msg: format!(
                    "a {longest}-token prompt plus {max_new} new tokens exceeds the compiled context of {}",
                    self.capacity()
                ),
            });
        }
        let mut out: Vec<Vec<i64>> = vec![Vec::new(); prompts.len()];
        let mut done = vec![false; prompts.len()];
        if max_new == 0 {
            return Ok(out);
        }
        let mut logits = self.prefill(prompts)?;
        for step in 0..max_new {
            let next: Vec<i64> = logits.iter().map(|l| sampler.pick(l)).collect();
            for (i, t) in next.iter().enumerate() {
                if !done[i] {
                    out[i].push(*t);
                    done[i] = stop == Some(*t);
                }
            }
            if !on_token(step, &next) || done.iter().all(|d| *d) || step + 1 == max_new {
                break;
            }
            logits = self.step(&next)?;
        }
        Ok(out)
    }
}

impl Session<'_> {
    /// Times every plan step of the decode steps that follow (see [`Decoder::decode_profile`]).
    pub fn enable_profile(&mut self) {
        self.profile = Some((vec![0.0; self.model.manifest().steps.len()], 0));
    }

    /// Runs the prompts like [`Decoder::prefill`] and returns every output of the plan as it is.
    pub fn prefill_outputs(&mut self, prompts: &[Vec<i64>]) -> Result<Vec<(String, Tensor)>, RunError> {
        let inputs = self.feed.prefill(prompts).map_err(|msg| RunError::BadInput {
            name: "prompts".into(),
            msg,
        })?;
        self.run_raw(inputs)
    }

    fn run_raw(&mut self, inputs: BTreeMap<String, Tensor>) -> Result<Vec<(String, Tensor)>, RunError> {
        if self.failed {
            return Err(RunError::BadInput {
                name: "session".into(),
                msg: "an earlier step failed and left the cache inconsistent; start a new session".into(),
            });
        }
        self.failed = true;
        let decode_step = !self.cache.is_empty();
        let times = match &mut self.profile {
            Some((t, n)) if decode_step => {
                *n += 1;
                Some(t)
            }
            _ => None,
        };
        let (outs, stats) = self.model.run_inner(&inputs, times, Some(&mut self.cache))?;
        if decode_step {
            self.decode_reads.0 += stats.weight_bytes_read;
            self.decode_reads.1 += 1;
        }
        self.cache.len = self.feed.len();
        self.failed = false;
        Ok(outs)
    }
}

impl Decoder for Session<'_> {
    fn prefill(&mut self, prompts: &[Vec<i64>]) -> Result<Vec<Vec<f32>>, RunError> {
        let outs = self.prefill_outputs(prompts)?;
        logits_rows(&outs, self.feed.batch())
    }

    fn step(&mut self, tokens: &[i64]) -> Result<Vec<Vec<f32>>, RunError> {
        let inputs = self.feed.step(tokens).map_err(|msg| RunError::BadInput {
            name: "tokens".into(),
            msg,
        })?;
        let outs = self.run_raw(inputs)?;
        logits_rows(&outs, self.feed.batch())
    }

    fn capacity(&self) -> usize {
        self.feed.capacity
    }

    fn len(&self) -> usize {
        self.feed.len()
    }

    fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    fn decode_weight_bytes(&self) -> Option<f64> {
        let (bytes, n) = self.decode_reads;
        (n > 0).then(|| bytes as f64 / n as f64)
    }

    fn decode_profile(&self) -> Option<crate::Profile> {
        let (times, n) = self.profile.as_ref()?;
        if *n == 0 {
            return None;
        }
        let mean: Vec<f64> = times.iter().map(|t| t / *n as f64).collect();
        Some(self.model.profile_of(&mean))
    }
}

pub(crate) trait ToF32 {
    fn to_f32_vec(&self) -> Option<Vec<f32>>;
}

impl ToF32 for Tensor {
    fn to_f32_vec(&self) -> Option<Vec<f32>> {
        (self.dtype() == kiln_ir::DType::F32).then(|| self.to_f64_vec().into_iter().map(|x| x as f32).collect())
    }
}
