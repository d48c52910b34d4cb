//! The model as the trainer sees it: the same GGUF, the same architecture as [`crate::engine::model`], run forward over a
//! whole sequence with LoRA adapters on chosen projections, and differentiable back to those adapters.
//!
//! Why a second forward pass and not [`crate::engine::model::Transformer`]: the inference pass is built for one thing —
//! speed of a single decode step — with our own kernels, candle's fused ops (RMSNorm, RoPE, softmax) and a KV
//! cache. None of those fused ops has a backward pass in candle 0.11, and a training step needs every op between
//! the loss and the adapters to have one. So this pass keeps exactly the same arithmetic (same weights, same
//! rotary tables, same grouped-query layout, same epsilon; checked against the inference pass by a test) written
//! with differentiable ops: RMSNorm, RoPE, attention's masked softmax and SwiGLU as single ops with hand-written gradients
//! ([`crate::tune::fused`]), and each frozen projection kept quantized with a backward pass of its own
//! ([`crate::tune::lora::FrozenQMatMul`], the QLoRA setting: through a transposed Q8_0 copy, or exactly through the
//! weight dequantized on the fly) or dequantized to f32 once at load ([`BaseMode::F32`]).
//!
//! Only the adapters' A and B are variables: the embedding table, norms, biases and base weights get no gradient,
//! and the embedding rows enter as constants. The loss is the mean negative log-likelihood of the completion
//! tokens only (the prompt is context, not a target), and only the positions that predict a completion token go
//! through the vocabulary projection — for text-to-SQL prompts that is a tenth of the sequence.

use crate::engine::alloc::keep_freed_memory;
use crate::engine::model::{rope_tables, Config, Embedding, Weights};
use crate::tune::fused;
use crate::tune::lora::{widened_q8, Frozen, LoraConfig, LoraLinear, Rng};
use crate::tune::peft::{Adapter, Layout, Target};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// How the frozen base weights are held during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseMode {
    /// As stored in the GGUF (4-bit for Q4_K_M): QLoRA. The backward pass multiplies by a transposed Q8_0 copy of
    /// each weight made at load (+1 byte per parameter; see [`crate::tune::lora::FrozenQMatMul`]).
    Quantized,
    /// As stored, with the exact backward pass: each weight dequantized on the fly (slower, no extra memory).
    QuantizedExact,
    /// Dequantized to f32 once at load: about 4 bytes per parameter, no per-step dequantization.
    F32,
}

impl BaseMode {
    pub fn parse(s: &str) -> Option<BaseMode> {
        match s {
            "quantized" | "4bit" | "qlora" => Some(BaseMode::Quantized),
            "quantized-exact" => Some(BaseMode::QuantizedExact),
            "f32" | "dense" => Some(BaseMode::F32),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BaseMode::Quantized => "quantized",
            BaseMode::QuantizedExact => "quantized-exact",
            BaseMode::F32 => "f32",
        }
    }
}

/// What to adapt and how.
#[derive(Debug, Clone)]
pub struct FinetuneOptions {
    pub targets: Vec<Target>,
    pub lora: LoraConfig,
    pub base: BaseMode,
    /// Seeds the adapters' initialisation (dropout masks come from the training loop's own generator).
    pub seed: u64,
    /// Longest sequence (prompt + completion) the rotary tables are built for.
    pub max_positions: usize,
}

/// A projection: frozen, or frozen with an adapter.
enum Proj {
    Frozen(Frozen),
    Adapted(LoraLinear),
}

impl Proj {
    fn forward(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        match self {
            Proj::Frozen(f) => f.forward(x),
            Proj::Adapted(l) => l.forward(x, rng),
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    /// In [`Target::ALL`] order: q, k, v, o, gate, up, down.
    proj: Vec<Proj>,
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
}

/// A GGUF model with trainable LoRA adapters.
pub struct TrainableModel {
    cfg: Config,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Frozen,
    cos: Tensor,
    sin: Tensor,
    opts: FinetuneOptions,
    device: Device,
}

fn idx(t: Target) -> usize {
    Target::ALL.iter().position(|&x| x == t).expect("a target of ALL")
}

impl TrainableModel {
    /// Load `path` and put fresh adapters (PEFT's initialisation, seeded) on `opts.targets` of every layer.
    pub fn load(path: &Path, opts: FinetuneOptions) -> Result<TrainableModel> {
        if opts.targets.is_empty() {
            candle_core::bail!("no target projections: name at least one of q, k, v, o, gate, up, down");
        }
        keep_freed_memory();
        let device = Device::Cpu;
        let mut f = std::fs::File::open(path)
            .map_err(|e| candle_core::Error::Msg(format!("cannot open {}: {e}", path.display())))?;
        let ct = gguf_file::Content::read(&mut f)
            .map_err(|e| candle_core::Error::Msg(format!("{} is not a readable GGUF file: {e}", path.display())))?;
        if let Some(name) = crate::engine::model::adapter_tensor(&ct) {
            candle_core::bail!(
                "{} is a tuned model that carries its adapter beside the weights ({name}): train on its base model \
                 (and continue from the adapter with --init-adapter)",
                path.display()
            );
        }
        let cfg = Config::from_gguf(&ct)?;
        let w = Weights::read(&cfg, &ct, &mut f, &device)?;
        let embed = Embedding::new(w.token_embd, &device)?;
        let norm = w.norm;
        let frozen = |q: Arc<candle_core::quantized::QTensor>| -> Result<Frozen> {
            match opts.base {
                // Widens Q4_0/Q5_0 for its forward product itself (and lays Q8_0 out in tiles).
                BaseMode::Quantized => Frozen::quantized_q8_backward(q),
                // Q4_0/Q5_0 weights compute as the same weights in Q8_0 (exact; see `widened_q8`).
                BaseMode::QuantizedExact => Ok(Frozen::quantized(match widened_q8(&q)? {
                    Some(wide) => Arc::new(wide),
                    None => q,
                })),
                BaseMode::F32 => Frozen::dense(q),
            }
        };
        // In f32 mode the vocabulary projection is dense too, so the loss is a smooth function of the adapters
        // (a quantized product rounds its input activations to 8 bits: piecewise constant at fine scales).
        let output = frozen(w.output)?;
        let mut rng = Rng::new(opts.seed);
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in w.layers {
            let mut proj = Vec::with_capacity(7);
            for (t, q) in Target::ALL.into_iter().zip(l.proj) {
                let base = frozen(q)?;
                proj.push(match opts.targets.contains(&t) {
                    true => Proj::Adapted(LoraLinear::on(base, opts.lora, &mut rng)?),
                    false => Proj::Frozen(base),
                });
            }
            layers.push(Layer { attn_norm: l.attn_norm, ffn_norm: l.ffn_norm, proj, bq: l.bq, bk: l.bk, bv: l.bv });
        }
        let max_positions = opts.max_positions.clamp(1, cfg.context_length);
        let (cos, sin) = rope_tables(cfg.head_dim, cfg.rope_base, max_positions, &device)?;
        Ok(TrainableModel { cfg, embed, layers, norm, output, cos, sin, opts, device })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn options(&self) -> &FinetuneOptions {
        &self.opts
    }

    pub fn layout(&self) -> Layout {
        Layout { arch: self.cfg.arch.clone(), n_head: self.cfg.n_head, n_kv_head: self.cfg.n_kv_head }
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    fn adapted(&self) -> impl Iterator<Item = (usize, Target, &LoraLinear)> {
        self.layers.iter().enumerate().flat_map(|(i, l)| {
            Target::ALL.into_iter().zip(&l.proj).filter_map(move |(t, p)| match p {
                Proj::Adapted(a) => Some((i, t, a)),
                Proj::Frozen(_) => None,
            })
        })
    }

    /// The trainable variables with stable names (`blk.{layer}.{target}.lora_a` / `lora_b`), in a fixed order.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        for (i, t, a) in self.adapted() {
            v.push((format!("blk.{i}.{}.lora_a", t.gguf_name()), a.a.clone()));
            v.push((format!("blk.{i}.{}.lora_b", t.gguf_name()), a.b.clone()));
        }
        v
    }

    /// Number of trainable parameters.
    pub fn trainable_parameters(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The adapters as they stand, for saving in PEFT format.
    pub fn adapter(&self, base_model: &str) -> Result<Adapter> {
        let mut weights = BTreeMap::new();
        for (i, t, a) in self.adapted() {
            weights.insert((i, t), (a.a.as_tensor().copy()?, a.b.as_tensor().copy()?));
        }
        Ok(Adapter { config: self.opts.lora, base_model: base_model.to_string(), weights })
    }

    /// Replace the adapters by `adapter`'s (resuming); it must cover exactly the projections being trained.
    pub fn load_adapter(&mut self, adapter: &Adapter) -> Result<()> {
        if adapter.config.rank != self.opts.lora.rank {
            candle_core::bail!("the adapter has rank {}, the recipe {}", adapter.config.rank, self.opts.lora.rank);
        }
        let have: Vec<(usize, Target)> = self.adapted().map(|(i, t, _)| (i, t)).collect();
        let given: Vec<(usize, Target)> = adapter.weights.keys().copied().collect();
        if have != given {
            candle_core::bail!(
                "the adapter covers {} projections, the recipe trains {} (different targets?)",
                given.len(),
                have.len()
            );
        }
        for ((i, t), (a, b)) in &adapter.weights {
            match &mut self.layers[*i].proj[idx(*t)] {
                Proj::Adapted(l) => l.set_weights(a, b)?,
                Proj::Frozen(_) => unreachable!("checked above"),
            }
        }
        Ok(())
    }

    /// Hidden states after the final norm, shape `(1, t, n_embd)`, of one plain sequence (positions 0..t, causal),
    /// with the whole graph kept. Dropout applies when `rng` is given.
    pub fn hidden(&self, tokens: &[u32], rng: Option<&mut Rng>) -> Result<Tensor> {
        let t = tokens.len();
        let p = Packed {
            tokens: tokens.to_vec(),
            positions: (0..t as u32).collect(),
            segments: vec![0; t],
            targets: vec![],
            row_tokens: t,
        };
        fused::rms_norm(&self.blocks(&p, rng, true)?, &self.norm, self.cfg.rms_eps)
    }

    /// The residual stream of `p` after the last block; without `keep_graph` each block's output is detached, so
    /// nothing is kept for a backward pass.
    fn blocks(&self, p: &Packed, mut rng: Option<&mut Rng>, keep_graph: bool) -> Result<Tensor> {
        let ctx = self.context(p)?;
        let mut x = self.embed.lookup(&p.tokens, &self.device)?;
        for layer in &self.layers {
            x = self.block(layer, &x, &ctx, rng.as_deref_mut())?;
            if !keep_graph {
                x = x.detach();
            }
        }
        Ok(x)
    }

    /// What every layer of a packed sequence's forward pass shares: rotary tables at the rows' own positions and
    /// the attention spans.
    fn context(&self, p: &Packed) -> Result<Context> {
        let longest = p.positions.iter().max().map_or(0, |&q| q as usize + 1);
        if p.tokens.is_empty() || longest > self.max_positions() {
            candle_core::bail!(
                "a sequence of {longest} positions does not fit the {} positions of this run",
                self.max_positions()
            );
        }
        let at = Tensor::new(p.positions.as_slice(), &self.device)?;
        let spans = spans_of(&p.segments).into_iter().map(|(start, len, shared)| Span { start, len, shared }).collect();
        let rope = fused::RopeTables::new(&self.cos.index_select(&at, 0)?, &self.sin.index_select(&at, 0)?)?;
        Ok(Context { rope: Arc::new(rope), spans })
    }

    /// One transformer block: `x` (1, t, n_embd) → the residual stream after it.
    fn block(&self, layer: &Layer, x: &Tensor, ctx: &Context, mut rng: Option<&mut Rng>) -> Result<Tensor> {
        let c = &self.cfg;
        let t = x.dim(1)?;
        let n_rep = c.n_head / c.n_kv_head;
        let h = fused::rms_norm(x, &layer.attn_norm, c.rms_eps)?;
        let mut p = |i: usize, x: &Tensor| layer.proj[i].forward(x, rng.as_deref_mut());
        let (q, k, v) = (p(0, &h)?, p(1, &h)?, p(2, &h)?);
        let biased = |y: Tensor, bias: &Option<Tensor>| match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
        // Heads (1, n, t, d): q and k rotated (q also scaled by 1/√d) in one op each, v transposed.
        let scale = (1.0 / (c.head_dim as f64).sqrt()) as f32;
        let q = fused::rope_heads(&biased(q, &layer.bq)?, c.n_head, &ctx.rope, c.rope_neox, scale)?;
        let k = fused::rope_heads(&biased(k, &layer.bk)?, c.n_kv_head, &ctx.rope, c.rope_neox, 1.0)?;
        let v = biased(v, &layer.bv)?.reshape((1, t, c.n_kv_head, c.head_dim))?.transpose(1, 2)?.contiguous()?;
        // Attention span by span (the shared prefix, then each row's own tokens), each against the keys it may see:
        // the prefix's, and its own. Exact, and the score matrices hold Σ len·(prefix + len) entries instead of t².
        // Within a span, grouped-query attention as in the inference pass: the n_rep query heads sharing K/V head j
        // are stacked into one (n_rep·len) × d matrix.
        let mut ys = Vec::with_capacity(ctx.spans.len());
        for span in &ctx.spans {
            let own = |x: &Tensor| x.narrow(2, span.start, span.len);
            let (ks, vs) = match span.shared {
                0 => (own(&k)?, own(&v)?),
                n => (
                    Tensor::cat(&[&k.narrow(2, 0, n)?, &own(&k)?], 2)?,
                    Tensor::cat(&[&v.narrow(2, 0, n)?, &own(&v)?], 2)?,
                ),
            };
            let qs = own(&q)?.reshape((1, c.n_kv_head, n_rep * span.len, c.head_dim))?;
            let att = fused::span_softmax(&qs.matmul(&ks.t()?)?, span.len, span.shared)?;
            ys.push(att.matmul(&vs.contiguous()?)?.reshape((1, c.n_head, span.len, c.head_dim))?);
        }
        let y = match ys.len() {
            1 => ys.pop().expect("one span"),
            _ => Tensor::cat(&ys, 2)?,
        };
        let y = y.transpose(1, 2)?.reshape((1, t, c.n_embd))?;
        let x = (x + p(3, &y)?)?;
        let h = fused::rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
        let g = p(4, &h)?;
        let u = p(5, &h)?;
        x + p(6, &fused::swiglu(&g, &u)?)?
    }

    /// Summed NLL of `p`'s completion tokens from the last block's output `x` (final norm, the predicting positions
    /// only through the vocabulary projection).
    fn head_nll(&self, x: &Tensor, p: &Packed) -> Result<Tensor> {
        let h = fused::rms_norm(x, &self.norm, self.cfg.rms_eps)?.squeeze(0)?;
        let (at, targets): (Vec<u32>, Vec<u32>) = p.targets.iter().copied().unzip();
        let h = h.index_select(&Tensor::new(at.as_slice(), &self.device)?, 0)?;
        let logits = self.output.forward(&h)?;
        let targets = Tensor::new(targets.as_slice(), &self.device)?;
        let logp = log_softmax_last_dim(&logits)?;
        logp.gather(&targets.unsqueeze(1)?, 1)?.sum_all()?.neg()
    }

    /// Logits of every position, shape `(t, vocab)` (for tests and small models: the full vocabulary projection).
    pub fn logits(&self, tokens: &[u32]) -> Result<Tensor> {
        self.output.forward(&self.hidden(tokens, None)?.squeeze(0)?)
    }

    /// Sum of the negative log-likelihoods of the completion tokens `tokens[n_prompt..]` given everything before
    /// them, and their count. (A sum, so the training loop can weight every completion token of a batch equally.)
    pub fn completion_nll(&self, tokens: &[u32], n_prompt: usize, rng: Option<&mut Rng>) -> Result<(Tensor, usize)> {
        self.packed_nll(&Packed::new(&[(tokens, n_prompt)])?, rng)
    }

    /// [`TrainableModel::completion_nll`] of every row of `p`, summed, in one forward pass over the packed sequence,
    /// the whole graph kept (every layer's activations: for tests and short sequences; training uses
    /// [`TrainableModel::packed_backward`]).
    pub fn packed_nll(&self, p: &Packed, rng: Option<&mut Rng>) -> Result<(Tensor, usize)> {
        Ok((self.head_nll(&self.blocks(p, rng, true)?, p)?, p.targets.len()))
    }

    /// The summed NLL of `p` without keeping any graph (validation): each block's output is detached.
    pub fn packed_nll_value(&self, p: &Packed) -> Result<f64> {
        Ok(self.head_nll(&self.blocks(p, None, false)?, p)?.detach().to_scalar::<f32>()? as f64)
    }

    /// `scale ×` the summed NLL of `p` and its gradient with respect to every variable (in [`TrainableModel::vars`]
    /// order), with activation checkpointing per layer: the forward pass keeps only each block's input; the
    /// backward pass recomputes one block at a time (replaying its dropout masks) and pulls the gradient through
    /// it. Memory holds one block's activations instead of all of them, for one more forward pass of compute.
    pub fn packed_backward(&self, p: &Packed, rng: Option<&mut Rng>, scale: f64) -> Result<(f64, Vec<Tensor>)> {
        let ctx = self.context(p)?;
        let mut rng = rng;
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut rngs = Vec::with_capacity(self.layers.len());
        let mut x = self.embed.lookup(&p.tokens, &self.device)?;
        for layer in &self.layers {
            rngs.push(rng.as_deref().cloned());
            let next = self.block(layer, &x, &ctx, rng.as_deref_mut())?.detach();
            inputs.push(std::mem::replace(&mut x, next));
        }
        let top = Var::from_tensor(&x)?;
        let loss = (self.head_nll(top.as_tensor(), p)? * scale)?;
        let value = loss.to_scalar::<f32>()? as f64;
        let grads = loss.backward()?;
        let mut upstream = grads
            .get(top.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("no gradient reached the last block".into()))?;
        drop(grads);
        let vars = self.vars();
        let mut out: Vec<Option<Tensor>> = vec![None; vars.len()];
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let input = Var::from_tensor(&inputs[i])?;
            let mut replay = rngs[i].take();
            let y = self.block(layer, input.as_tensor(), &ctx, replay.as_mut())?;
            // d/dθ Σ y ⊙ upstream = upstream · ∂y/∂θ: the chain rule through this block.
            let grads = (y * &upstream)?.sum_all()?.backward()?;
            for (slot, (name, v)) in out.iter_mut().zip(&vars) {
                if name.starts_with(&format!("blk.{i}.")) {
                    *slot = grads.get(v.as_tensor()).cloned();
                }
            }
            if i > 0 {
                upstream = grads
                    .get(input.as_tensor())
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg(format!("no gradient reached block {i}'s input")))?;
            }
        }
        let out = out
            .into_iter()
            .zip(&vars)
            .map(|(g, (_, v))| g.map(Ok).unwrap_or_else(|| v.zeros_like()))
            .collect::<Result<Vec<_>>>()?;
        Ok((value, out))
    }
}

/// What every block of a sequence's pass uses.
struct Context {
    rope: Arc<fused::RopeTables>,
    spans: Vec<Span>,
}

/// A run of tokens of one segment: its queries see the first `shared` tokens (the prefix) and themselves, causally.
struct Span {
    start: usize,
    len: usize,
    shared: usize,
}

/// Training rows that begin with the same prompt tokens (in text-to-SQL: the same database's schema), laid out as
/// one sequence — the common prefix once, then each row's remaining tokens — so the prefix is computed once for
/// all of them. Each row's tokens keep their own positions and see only the prefix and themselves, so every row's
/// loss (and its gradient) is the one it would have alone; only dropout masks on the prefix are shared.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    tokens: Vec<u32>,
    /// Each token's position in its own row.
    positions: Vec<u32>,
    /// 0: the shared prefix; i ≥ 1: the i-th row's own tokens.
    segments: Vec<u32>,
    /// (index in `tokens` of the position that predicts it, completion token).
    targets: Vec<(u32, u32)>,
    /// Tokens of the rows packed (what they would have computed one by one).
    row_tokens: usize,
}

impl Packed {
    /// Pack `rows` (tokens, number of prompt tokens). The shared prefix is the rows' longest common prompt prefix,
    /// less one token, so each row's first completion token is predicted from its own segment.
    pub fn new(rows: &[(&[u32], usize)]) -> Result<Packed> {
        let Some(&(first, _)) = rows.first() else { candle_core::bail!("nothing to pack") };
        for &(tokens, n_prompt) in rows {
            let t = tokens.len();
            if n_prompt == 0 || n_prompt >= t {
                candle_core::bail!(
                    "a training row needs a prompt and a completion ({n_prompt} of {t} tokens are prompt)"
                );
            }
        }
        let mut shared = rows.iter().map(|&(_, n)| n - 1).min().unwrap_or(0);
        for &(tokens, _) in &rows[1..] {
            shared = shared.min(first.iter().zip(tokens).take_while(|(a, b)| a == b).count());
        }
        let own: usize = rows.iter().map(|&(t, _)| t.len() - shared).sum();
        let mut p = Packed {
            tokens: Vec::with_capacity(shared + own),
            positions: Vec::with_capacity(shared + own),
            segments: Vec::with_capacity(shared + own),
            targets: Vec::new(),
            row_tokens: rows.iter().map(|&(t, _)| t.len()).sum(),
        };
        p.tokens.extend_from_slice(&first[..shared]);
        p.positions.extend(0..shared as u32);
        p.segments.resize(shared, 0);
        for (r, &(tokens, n_prompt)) in rows.iter().enumerate() {
            let offset = p.tokens.len();
            p.tokens.extend_from_slice(&tokens[shared..]);
            p.positions.extend(shared as u32..tokens.len() as u32);
            p.segments.resize(p.tokens.len(), r as u32 + 1);
            // Row position k-1 predicts completion token k; it sits at offset + (k-1-shared) in the packing.
            p.targets.extend((n_prompt..tokens.len()).map(|k| ((offset + k - 1 - shared) as u32, tokens[k])));
        }
        Ok(p)
    }

    /// Tokens in the packed sequence (what a forward pass computes).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Tokens of the rows packed, as if each were computed alone.
    pub fn row_tokens(&self) -> usize {
        self.row_tokens
    }

    /// Completion tokens (the loss's terms).
    pub fn completion_tokens(&self) -> usize {
        self.targets.len()
    }
}

/// The spans of a packed sequence as (start, len, keys before it): the shared prefix (segment 0, at the start) sees
/// only itself; every later run of one segment sees the prefix and itself.
fn spans_of(segments: &[u32]) -> Vec<(usize, usize, usize)> {
    let prefix = segments.iter().take_while(|&&s| s == 0).count();
    let mut out = Vec::new();
    if prefix > 0 {
        out.push((0, prefix, 0));
    }
    let mut start = prefix;
    while start < segments.len() {
        let len = segments[start..].iter().take_while(|&&s| s == segments[start]).count();
        out.push((start, len, prefix));
        start += len;
    }
    out
}

/// Log-softmax over the last dimension; the row maximum is a constant shift (it cancels in the gradient), so it is
/// detached rather than differentiated.
fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let d = x.broadcast_sub(&max)?;
    d.broadcast_sub(&d.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// AdamW (decoupled weight decay) with its moments held as tensors, so a checkpoint can save and restore them.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken (for bias correction).
    pub t: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(vars: &[(String, Var)], weight_decay: f64) -> Result<AdamW> {
        let zeros = |v: &Var| Tensor::zeros(v.shape(), DType::F32, v.device());
        Ok(AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            m: vars.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?,
            v: vars.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?,
        })
    }

    /// One update of every variable with its gradient `grads[i]` at learning rate `lr`.
    pub fn step(&mut self, vars: &[(String, Var)], grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (i, ((_, var), g)) in vars.iter().zip(grads).enumerate() {
            self.m[i] = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let mhat = (&self.m[i] / c1)?;
            let vhat = (&self.v[i] / c2)?;
            let update = (mhat / (vhat.sqrt()? + self.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// The moments by name (`<var>.m`, `<var>.v`) for a checkpoint.
    pub fn state(&self, vars: &[(String, Var)]) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (name, _)) in vars.iter().enumerate() {
            out.push((format!("{name}.m"), self.m[i].clone()));
            out.push((format!("{name}.v"), self.v[i].clone()));
        }
        out
    }

    /// Restore moments saved by [`AdamW::state`] at step `t`.
    pub fn restore(
        &mut self,
        vars: &[(String, Var)],
        state: &std::collections::HashMap<String, Tensor>,
        t: u64,
    ) -> Result<()> {
        for (i, (name, var)) in vars.iter().enumerate() {
            for (slot, suffix) in [(&mut self.m[i], "m"), (&mut self.v[i], "v")] {
                let key = format!("{name}.{suffix}");
                let s = state
                    .get(&key)
                    .ok_or_else(|| candle_core::Error::Msg(format!("the checkpoint has no optimizer state {key}")))?;
                if s.dims() != var.dims() {
                    candle_core::bail!("optimizer state {key} is {:?}, the variable {:?}", s.dims(), var.dims());
                }
                *slot = s.to_dtype(DType::F32)?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warm-up over `warmup` steps to `peak`, then
/// cosine decay to `peak · min_ratio` at the last step.
pub fn learning_rate(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    let floor = peak * min_ratio;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_warms_up_then_decays_by_a_cosine() {
        let lr = |s| learning_rate(s, 100, 10, 1e-3, 0.1);
        assert!((lr(0) - 1e-4).abs() < 1e-12);
        assert!((lr(9) - 1e-3).abs() < 1e-12);
        assert!((lr(10) - 1e-3).abs() < 1e-12, "peak right after warm-up");
        assert!((lr(55) - (1e-4 + 0.9e-3 * 0.5)).abs() < 1e-9, "half way down at the middle of the decay");
        assert!((lr(100) - 1e-4).abs() < 1e-12, "ends at the floor");
        assert!((1..100).all(|s| s < 10 || lr(s) <= lr(s - 1)), "monotone after warm-up");
    }

    #[test]
    fn adamw_takes_the_textbook_first_step() {
        // With bias correction, Adam's first step moves each weight by lr·sign(g) (|g| ≫ eps); decay shrinks first.
        let v = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
        let vars = vec![("w".to_string(), v.clone())];
        let mut opt = AdamW::new(&vars, 0.1).unwrap();
        opt.step(&vars, &[Tensor::new(&[0.5f32, -3.0], &Device::Cpu).unwrap()], 0.01).unwrap();
        let got = v.as_tensor().to_vec1::<f32>().unwrap();
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        assert_eq!(opt.t, 1);
    }

    #[test]
    fn packing_lays_out_the_shared_prefix_once_with_each_rows_own_positions() {
        let p = Packed::new(&[(&[1, 2, 3, 4, 5][..], 3), (&[1, 2, 3, 6][..], 3), (&[1, 2, 7, 8][..], 3)]).unwrap();
        // Common prompt prefix [1, 2] (the third row's prompt diverges at its third token).
        assert_eq!(p.tokens, vec![1, 2, 3, 4, 5, 3, 6, 7, 8]);
        assert_eq!(p.positions, vec![0, 1, 2, 3, 4, 2, 3, 2, 3]);
        assert_eq!(p.segments, vec![0, 0, 1, 1, 1, 2, 2, 3, 3]);
        // Completion tokens 4, 5 (row 1), 6 (row 2), 8 (row 3), each predicted by the token before it in its row.
        assert_eq!(p.targets, vec![(2, 4), (3, 5), (5, 6), (7, 8)]);
        // A prompt wholly shared still leaves each row one prompt token of its own.
        let q = Packed::new(&[(&[1, 2, 3, 9][..], 3), (&[1, 2, 3, 8][..], 3)]).unwrap();
        assert_eq!(q.tokens, vec![1, 2, 3, 9, 3, 8]);
        assert_eq!(q.targets, vec![(2, 9), (4, 8)]);
    }

    #[test]
    fn spans_show_the_prefix_and_each_rows_own_past() {
        assert_eq!(spans_of(&[0, 0, 1, 1, 1, 2]), vec![(0, 2, 0), (2, 3, 2), (5, 1, 2)]);
        assert_eq!(spans_of(&[0, 0, 0]), vec![(0, 3, 0)], "a plain sequence: one causal span");
        assert_eq!(spans_of(&[1, 1, 2]), vec![(0, 2, 0), (2, 1, 0)], "no prefix: each row sees itself");
    }

    #[test]
    fn differentiable_ops_match_candles_fused_ones() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 4, 6, 8), &dev).unwrap();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "{what}: max difference {d}");
        };
        let alpha = Tensor::randn(0f32, 1.0, 8, &dev).unwrap();
        close(
            &fused::rms_norm(&x, &alpha, 1e-6).unwrap(),
            &candle_nn::ops::rms_norm(&x, &alpha, 1e-6).unwrap(),
            "rms_norm",
        );
        close(&log_softmax_last_dim(&x).unwrap(), &candle_nn::ops::log_softmax(&x, D::Minus1).unwrap(), "log_softmax");
    }
}
