//! Our own forward pass for the decoder-only transformers we serve (`qwen2`, `llama`/`mistral` GGUF files), built
//! from candle's tensor ops and quantized matmuls.
//!
//! Why not `candle_transformers::models::quantized_{qwen2,llama}`: their KV cache is a private field of each layer,
//! so the state after a prompt prefix can be neither kept nor restored — and the schema-prefix cache
//! ([`crate::prefix_cache`]) is exactly that. Here the model is immutable (`&self`) and the attention state lives in
//! a [`KvCache`] value owned by the caller: cloning one is cheap (candle tensors are reference-counted and never
//! written in place; a step appends by building new tensors), so a cached prefix can be resumed by any number of
//! questions without being disturbed.
//!
//! Also different from candle's modules, for speed on small CPUs:
//! - grouped-query attention without materializing repeated K/V: the query heads that share a K/V head are
//!   stacked into one matrix, so one matmul per K/V head replaces `n_head / n_kv_head` copies of the cache;
//! - queries are scaled before the score matmul (fewer multiplies than scaling the scores once the context is
//!   longer than a head);
//! - only the last position goes through the final norm and the vocabulary projection;
//! - one row of activations (every decoded token) is multiplied by our own kernels ([`crate::kernels`]) where the
//!   weights are Q4_K or Q6_K, streaming the GGUF blocks as stored; several rows (prefill) use candle's tiled
//!   quantized matmul;
//! - the embedding table stays quantized and only the prompt's rows are dequantized (for the tied models we serve
//!   it is the output projection's table too: one copy, read once).
//!
//! Supported: RoPE in the NeoX layout (qwen2) or the interleaved GGML layout (llama, mistral); optional q/k/v
//! biases; tied output embeddings. Mixture-of-experts and partial rotary dimensions are refused at load.

use crate::{decode, kernels};
use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use std::io::{Read, Seek};
use std::sync::Arc;

/// A quantized linear layer (`y = x · Wᵀ`). One row of activations (decoding) goes through our own kernels
/// ([`crate::kernels`]) when the weights are a format they cover; several rows (prefill) and other formats go
/// through candle's quantized matmul. Both read the same weight bytes (the `QTensor` is shared, not copied).
struct Linear {
    mm: QMatMul,
    n: usize,
    k: usize,
}

impl Linear {
    fn new(qt: Arc<QTensor>) -> Result<Linear> {
        let (n, k) = qt.shape().dims2()?;
        Ok(Linear { mm: QMatMul::from_arc(qt)?, n, k })
    }

    /// The quantized weights and their format, when our decode kernels cover them.
    fn raw(&self) -> Option<(&QTensor, kernels::Kind)> {
        match &self.mm {
            QMatMul::QTensor(qt) if self.k.is_multiple_of(kernels::QK_K) => {
                kernels::Kind::from_ggml(qt.dtype()).map(|kind| (qt.as_ref(), kind))
            }
            _ => None,
        }
    }

    fn forward(&self, x: &Tensor, own_kernels: bool) -> Result<Tensor> {
        Ok(Linear::forward_many(&[self], x, own_kernels)?.remove(0))
    }

    /// The products of several layers that read the same input (q/k/v; gate/up). One row of activations on our
    /// kernels is one pass over the thread pool for all of them; otherwise each goes through candle.
    fn forward_many(layers: &[&Linear], x: &Tensor, own_kernels: bool) -> Result<Vec<Tensor>> {
        let k = layers[0].k;
        if !(own_kernels && x.elem_count() == k && x.device().is_cpu() && Linear::kernels_cover(layers)) {
            return layers.iter().map(|l| l.mm.forward(x)).collect();
        }
        let xs = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let ys = Linear::matvec_many(layers, &xs)?;
        layers
            .iter()
            .zip(ys)
            .map(|(l, y)| {
                let mut shape = x.dims().to_vec();
                if let Some(last) = shape.last_mut() {
                    *last = l.n;
                }
                Tensor::from_vec(y, shape, x.device())
            })
            .collect()
    }

    /// True when our kernels can multiply every one of `layers` (formats they cover, same input width).
    fn kernels_cover(layers: &[&Linear]) -> bool {
        layers.iter().all(|l| l.raw().is_some() && l.k == layers[0].k)
    }

    /// `ys[i] = layers[i] · x` for one row `x` on the CPU: one pass of our kernels over the thread pool when they
    /// cover every layer, else candle's matmul layer by layer.
    fn matvec_many(layers: &[&Linear], x: &[f32]) -> Result<Vec<Vec<f32>>> {
        let k = layers[0].k;
        if !Linear::kernels_cover(layers) {
            let x = Tensor::from_slice(x, (1, x.len()), &Device::Cpu)?;
            return layers.iter().map(|l| l.mm.forward(&x)?.flatten_all()?.to_vec1::<f32>()).collect();
        }
        let raw: Vec<_> = layers.iter().filter_map(|l| l.raw()).collect();
        let data = raw.iter().map(|(qt, _)| qt.data()).collect::<Result<Vec<_>>>()?;
        let mats: Vec<kernels::Matrix> = layers
            .iter()
            .zip(&raw)
            .zip(&data)
            .map(|((l, (_, kind)), w)| kernels::Matrix { kind: *kind, w, n: l.n })
            .collect();
        let mut ys: Vec<Vec<f32>> = layers.iter().map(|l| vec![0f32; l.n]).collect();
        let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
        kernels::gemv_many(&mats, k, x, &mut outs);
        Ok(ys)
    }
}

/// The token embedding table. Kept in its quantized form where our kernels can dequantize single rows (the table
/// is shared with the output projection when the model ties them, so it costs no memory of its own); other
/// formats are dequantized to f32 once at load.
pub(crate) enum Embedding {
    Rows { qt: Arc<QTensor>, kind: kernels::Kind, dim: usize },
    Dense(Tensor),
}

impl Embedding {
    pub(crate) fn new(qt: Arc<QTensor>, device: &Device) -> Result<Embedding> {
        let (_, dim) = qt.shape().dims2()?;
        match kernels::Kind::from_ggml(qt.dtype()) {
            Some(kind) if dim.is_multiple_of(kernels::QK_K) && device.is_cpu() => Ok(Embedding::Rows { qt, kind, dim }),
            _ => Ok(Embedding::Dense(qt.dequantize(device)?)),
        }
    }

    /// Rows of `tokens`, shape `(1, t, dim)`.
    pub(crate) fn lookup(&self, tokens: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Embedding::Dense(table) => table.index_select(&Tensor::new(tokens, device)?, 0)?.unsqueeze(0),
            Embedding::Rows { qt, kind, dim } => {
                let data = qt.data()?;
                let rows = qt.shape().dims2()?.0;
                let row_bytes = dim / kernels::QK_K * kind.block_bytes();
                let mut out = vec![0f32; tokens.len() * dim];
                for (&tok, y) in tokens.iter().zip(out.chunks_exact_mut(*dim)) {
                    let r = tok as usize;
                    if r >= rows {
                        candle_core::bail!("token id {tok} is outside the vocabulary of {rows}");
                    }
                    kernels::dequantize_row(*kind, &data[r * row_bytes..(r + 1) * row_bytes], y);
                }
                Tensor::from_vec(out, (1, tokens.len(), *dim), device)
            }
        }
    }
}

/// Keep freed memory in the process for reuse instead of handing it back to the kernel after every forward pass.
///
/// Each step of the model allocates fresh tensors of up to a few MB (the FFN's intermediate activations, attention
/// scores). glibc serves blocks above its mmap threshold (128 KB, raised on the fly only when such a block is
/// freed, up to 32 MB) with fresh `mmap`s, so every forward pass page-faults and zeroes them again: measured 7 % of
/// prefill time in `clear_page`, and a 16 % prefill slowdown (254 → 214 tok/s) depending on the allocation history
/// of the load. Fixing the threshold at its 32 MB maximum and trimming only above 256 MB makes that reuse
/// deterministic. Process-wide, once; in PostgreSQL this runs in the background worker, whose own allocations
/// (memory contexts) are small and unaffected.
pub(crate) fn keep_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes glibc's allocation policy; it is called before the model allocates its
        // working memory and takes plain integer arguments.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        }
    });
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub arch: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub n_embd: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
    /// True for the NeoX rotary layout (halves rotated), false for GGML's interleaved pairs.
    pub rope_neox: bool,
    pub context_length: usize,
}

impl Config {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Config> {
        let arch = match ct.metadata.get("general.architecture") {
            Some(v) => v.to_string()?.clone(),
            None => candle_core::bail!("the GGUF has no general.architecture"),
        };
        let rope_neox = match arch.as_str() {
            "qwen2" => true,
            "llama" | "mistral" => false,
            other => candle_core::bail!("architecture \"{other}\" is not supported (supported: qwen2, llama, mistral)"),
        };
        let get = |k: &str| -> Result<&gguf_file::Value> {
            ct.metadata
                .get(&format!("{arch}.{k}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("cannot find {arch}.{k} in the GGUF metadata")))
        };
        let n_head = get("attention.head_count")?.to_u32()? as usize;
        let n_kv_head = get("attention.head_count_kv").and_then(|v| v.to_u32()).map(|v| v as usize).unwrap_or(n_head);
        let n_embd = get("embedding_length")?.to_u32()? as usize;
        let n_layer = get("block_count")?.to_u32()? as usize;
        let rms_eps = get("attention.layer_norm_rms_epsilon")?.to_f32()? as f64;
        let rope_base = get("rope.freq_base").and_then(|v| v.to_f32()).unwrap_or(10_000.0);
        let context_length = get("context_length").and_then(|v| v.to_u32()).map(|v| v as usize).unwrap_or(4096);
        if n_head == 0 || n_kv_head == 0 || !n_embd.is_multiple_of(n_head) || !n_head.is_multiple_of(n_kv_head) {
            candle_core::bail!("inconsistent attention shape: {n_head} heads, {n_kv_head} K/V heads, width {n_embd}");
        }
        let head_dim = n_embd / n_head;
        if let Ok(d) = get("rope.dimension_count").and_then(|v| v.to_u32()) {
            if d as usize != head_dim {
                candle_core::bail!("partial rotary embeddings ({d} of {head_dim} dimensions) are not supported");
            }
        }
        if get("expert_count").and_then(|v| v.to_u32()).unwrap_or(0) > 1 {
            candle_core::bail!("mixture-of-experts models are not supported");
        }
        Ok(Config { arch, n_layer, n_head, n_kv_head, head_dim, n_embd, rms_eps, rope_base, rope_neox, context_length })
    }
}

/// One layer's tensors as every loader of a GGUF model reads them: norms and optional q/k/v biases dequantized,
/// the seven projection weights as stored, in [`crate::peft::Target::ALL`] order (q, k, v, o, gate, up, down).
pub(crate) struct LayerWeights {
    pub attn_norm: Tensor,
    pub ffn_norm: Tensor,
    pub bq: Option<Tensor>,
    pub bk: Option<Tensor>,
    pub bv: Option<Tensor>,
    pub proj: [Arc<QTensor>; 7],
}

/// A model's tensors as read from its GGUF: the embedding table, the final norm, the vocabulary projection (the
/// embedding table itself when the model ties them: one copy) and the layers. The inference pass
/// ([`Transformer::from_gguf`]) and the training pass (`crate::finetune`) both start from this.
pub(crate) struct Weights {
    pub token_embd: Arc<QTensor>,
    pub norm: Tensor,
    pub output: Arc<QTensor>,
    pub layers: Vec<LayerWeights>,
}

impl Weights {
    pub(crate) fn read<R: Read + Seek>(
        cfg: &Config,
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Weights> {
        let mut get = |name: &str| ct.tensor(reader, name, device);
        let token_embd = Arc::new(get("token_embd.weight")?);
        let norm = get("output_norm.weight")?.dequantize(device)?;
        let output = match ct.tensor_infos.contains_key("output.weight") {
            true => Arc::new(get("output.weight")?),
            // Tied embeddings (SmolLM2, Qwen2.5 0.5B/1.5B): the output projection is the embedding table, read once.
            false => token_embd.clone(),
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("blk.{i}");
            let mut bias = |n: &str| -> Result<Option<Tensor>> {
                let name = format!("{p}.{n}.bias");
                match ct.tensor_infos.contains_key(&name) {
                    true => Ok(Some(get(&name)?.dequantize(device)?)),
                    false => Ok(None),
                }
            };
            let (bq, bk, bv) = (bias("attn_q")?, bias("attn_k")?, bias("attn_v")?);
            let mut proj = Vec::with_capacity(7);
            for t in crate::peft::Target::ALL {
                proj.push(Arc::new(get(&format!("{p}.{}.weight", t.gguf_name()))?));
            }
            let proj: [Arc<QTensor>; 7] =
                proj.try_into().map_err(|_| candle_core::Error::Msg("seven projections".into()))?;
            let attn_norm = get(&format!("{p}.attn_norm.weight"))?.dequantize(device)?;
            let ffn_norm = get(&format!("{p}.ffn_norm.weight"))?.dequantize(device)?;
            layers.push(LayerWeights { attn_norm, ffn_norm, bq, bk, bv, proj });
        }
        Ok(Weights { token_embd, norm, output, layers })
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
    wo: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// The norms' weights and the biases again as plain vectors, for the decoding step ([`Transformer::step`]).
    v: LayerVectors,
}

struct LayerVectors {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
}

/// The attention state after some tokens: per layer, K and V of shape `(1, n_kv_head, len, head_dim)`.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
}

impl KvCache {
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Tokens seen so far: the position the next token takes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A state of `tokens` positions holding `bytes_per_token` bytes each (one layer of zeros), for cache tests.
    #[cfg(test)]
    pub(crate) fn synthetic(bytes_per_token: usize, tokens: usize) -> KvCache {
        let d = bytes_per_token / 8;
        let z = Tensor::zeros((1, 1, tokens, d), DType::F32, &Device::Cpu).expect("zeros");
        KvCache { layers: vec![(z.clone(), z)], len: tokens }
    }

    /// Memory held by the state, in bytes.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()).sum()
    }
}

/// A loaded model: immutable weights; the caller owns the [`KvCache`].
pub struct Transformer {
    cfg: Config,
    embed: Embedding,
    device: Device,
    layers: Vec<Layer>,
    norm: Tensor,
    norm_v: Vec<f32>,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    max_positions: usize,
    /// Decode with our kernels (on by default; off = candle's matmul everywhere, for comparisons).
    own_kernels: bool,
}

impl Transformer {
    /// Load the weights of `cfg` (read from the same `ct`) from `reader`. Rotary tables are built for
    /// `max_positions` positions (0 = the model's context length; never more than it).
    pub fn from_gguf<R: Read + Seek>(
        cfg: Config,
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        max_positions: usize,
    ) -> Result<Transformer> {
        keep_freed_memory();
        let max_positions = match max_positions {
            0 => cfg.context_length,
            n => n.min(cfg.context_length),
        };
        let w = Weights::read(&cfg, ct, reader, device)?;
        let embed = Embedding::new(w.token_embd, device)?;
        let (norm, output) = (w.norm, Linear::new(w.output)?);
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in w.layers {
            let [wq, wk, wv, wo, gate, up, down] = l.proj.map(Linear::new);
            let (wq, wk, wv, wo, gate, up, down) = (wq?, wk?, wv?, wo?, gate?, up?, down?);
            let vec = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_vec1::<f32>()).transpose();
            let v = LayerVectors {
                attn_norm: l.attn_norm.to_vec1()?,
                ffn_norm: l.ffn_norm.to_vec1()?,
                bq: vec(&l.bq)?,
                bk: vec(&l.bk)?,
                bv: vec(&l.bv)?,
            };
            let LayerWeights { attn_norm, ffn_norm, bq, bk, bv, .. } = l;
            layers.push(Layer { attn_norm, wq, wk, wv, bq, bk, bv, wo, ffn_norm, gate, up, down, v });
        }
        let (cos, sin) = rope_tables(cfg.head_dim, cfg.rope_base, max_positions, device)?;
        Ok(Transformer {
            cfg,
            embed,
            device: device.clone(),
            layers,
            norm_v: norm.to_vec1()?,
            norm,
            output,
            cos,
            sin,
            max_positions,
            own_kernels: kernels::simd_available(),
        })
    }

    /// Make the first prompt after a load as fast as the next ones. candle's quantized matmul rewrites a weight
    /// into its tiled layout the first time a product of several rows (a prompt) uses it — lazily, on the calling
    /// thread, and kept for later calls. For the default model that was 3 s (measured: first 248-token prefill
    /// 3.9 s, the next 0.98 s), paid by the first question after every start. This runs one two-row product through
    /// every layer weight now, the weights shared out over `threads` threads, so the rewrite is done at load and
    /// in parallel. The vocabulary projection is left alone: only single rows (ours) ever reach it. Threads started
    /// here inherit the caller's signal mask (in the server: everything blocked).
    pub fn prepare(&self, threads: usize) -> Result<()> {
        if !self.device.is_cpu() {
            return Ok(());
        }
        let all: Vec<&Linear> =
            self.layers.iter().flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]).collect();
        let threads = threads.clamp(1, all.len().max(1));
        std::thread::scope(|s| {
            let all = &all;
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || -> Result<()> {
                        for l in all.iter().skip(t).step_by(threads) {
                            l.mm.forward(&Tensor::zeros((2, l.k), DType::F32, &Device::Cpu)?)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().unwrap_or_else(|_| candle_core::bail!("a preparing thread panicked")))
        })
    }

    /// Use our decode kernels (the default where the CPU has AVX2) or candle's matmul for every product.
    pub fn set_own_kernels(&mut self, on: bool) {
        self.own_kernels = on;
    }

    pub fn own_kernels(&self) -> bool {
        self.own_kernels
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Run `tokens` at positions `cache.len()..`, append their K/V to `cache`, and return the logits of the last
    /// token (shape `(vocab,)`).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let t = tokens.len();
        let pos = cache.len;
        if t == 0 {
            candle_core::bail!("forward on no tokens");
        }
        if pos + t > self.max_positions {
            candle_core::bail!(
                "position {} is past the {} positions this model was loaded for",
                pos + t,
                self.max_positions
            );
        }
        if t == 1 && self.own_kernels && self.device.is_cpu() {
            return self.step(tokens[0], cache);
        }
        let device = &self.device;
        let mut x = self.embed.lookup(tokens, device)?; // (1, t, n_embd)
        let mask = if t > 1 { Some(causal_mask(t, pos, self.cfg.n_head / self.cfg.n_kv_head, device)?) } else { None };
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        // As in `step`: the cache changes only once the whole pass has succeeded.
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.cfg.rms_eps as f32)?;
            let (attn, kv) = self.attention(layer, &h, cache.layers.get(i), mask.as_ref(), &cos, &sin)?;
            layers.push(kv);
            x = (x + attn)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, self.cfg.rms_eps as f32)?;
            let gu = Linear::forward_many(&[&layer.gate, &layer.up], &h, self.own_kernels)?;
            let g = candle_nn::ops::silu(&gu[0])?;
            x = (x + layer.down.forward(&(g * &gu[1])?, self.own_kernels)?)?;
        }
        let last = x.i((.., t - 1..t, ..))?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, self.cfg.rms_eps as f32)?;
        let logits = self.output.forward(&last, self.own_kernels)?.flatten_all()?;
        cache.layers = layers;
        cache.len += t;
        Ok(logits)
    }

    /// One token at position `cache.len()` (decoding), computed on plain vectors: our kernels for the weight
    /// products ([`Linear::matvec_many`]) and [`crate::decode`] for the rest, instead of some thirty candle ops
    /// per layer. The K/V cache keeps its tensor form `(1, n_kv_head, len, d)` so prefill and the prefix cache
    /// read it unchanged; appending one position copies each layer's cache once, as `Tensor::cat` would.
    fn step(&self, token: u32, cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.cfg;
        let (d, pos, eps) = (c.head_dim, cache.len, c.rms_eps as f32);
        let (n_rep, len) = (c.n_head / c.n_kv_head, cache.len + 1);
        let mut x = self.embed.lookup(&[token], &self.device)?.flatten_all()?.to_vec1::<f32>()?;
        let cos = self.cos.i(pos)?.to_vec1::<f32>()?;
        let sin = self.sin.i(pos)?.to_vec1::<f32>()?;
        let mut h = vec![0f32; c.n_embd];
        let mut attn = vec![0f32; c.n_head * d];
        // The new cache is built aside and replaces the old one only when every layer is done, so an error leaves
        // `cache` as it was.
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            decode::rms_norm(&x, &layer.v.attn_norm, eps, &mut h);
            let mut qkv = Linear::matvec_many(&[&layer.wq, &layer.wk, &layer.wv], &h)?;
            for (y, b) in qkv.iter_mut().zip([&layer.v.bq, &layer.v.bk, &layer.v.bv]) {
                if let Some(b) = b {
                    y.iter_mut().zip(b).for_each(|(y, b)| *y += b);
                }
            }
            let [mut q, mut k, v] =
                <[Vec<f32>; 3]>::try_from(qkv).map_err(|_| candle_core::Error::Msg("q/k/v".into()))?;
            decode::rope(&mut q, &cos, &sin, c.rope_neox);
            decode::rope(&mut k, &cos, &sin, c.rope_neox);
            // The layer's cache with this position appended, laid out (n_kv_head, len, d).
            let (k_all, v_all) = match cache.layers.get(i) {
                None => (k, v),
                Some((pk, pv)) => (append_position(pk, &k, c.n_kv_head, d)?, append_position(pv, &v, c.n_kv_head, d)?),
            };
            attend_heads(&q, &k_all, &v_all, len, d, n_rep, c.n_head, &mut attn);
            let shape = (1, c.n_kv_head, len, d);
            layers.push((Tensor::from_vec(k_all, shape, &self.device)?, Tensor::from_vec(v_all, shape, &self.device)?));
            let o = Linear::matvec_many(&[&layer.wo], &attn)?;
            x.iter_mut().zip(&o[0]).for_each(|(x, o)| *x += o);
            decode::rms_norm(&x, &layer.v.ffn_norm, eps, &mut h);
            let mut gu = Linear::matvec_many(&[&layer.gate, &layer.up], &h)?;
            let up = gu.pop().expect("two products");
            let mut g = gu.pop().expect("two products");
            decode::swiglu(&mut g, &up);
            let down = Linear::matvec_many(&[&layer.down], &g)?;
            x.iter_mut().zip(&down[0]).for_each(|(x, y)| *x += y);
        }
        decode::rms_norm(&x.clone(), &self.norm_v, eps, &mut x);
        let logits = Linear::matvec_many(&[&self.output], &x)?.pop().expect("one product");
        let logits = Tensor::from_vec(logits, self.output.n, &self.device)?;
        cache.layers = layers;
        cache.len += 1;
        Ok(logits)
    }

    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        prev: Option<&(Tensor, Tensor)>,
        mask: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let c = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let qkv = Linear::forward_many(&[&layer.wq, &layer.wk, &layer.wv], x, self.own_kernels)?;
        let shape = |y: &Tensor, bias: &Option<Tensor>, heads: usize| -> Result<Tensor> {
            let y = match bias {
                Some(bias) => y.broadcast_add(bias)?,
                None => y.clone(),
            };
            y.reshape((b, t, heads, c.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let rope = |y: &Tensor| -> Result<Tensor> {
            if c.rope_neox {
                candle_nn::rotary_emb::rope(y, cos, sin)
            } else {
                candle_nn::rotary_emb::rope_i(y, cos, sin)
            }
        };
        let q = rope(&shape(&qkv[0], &layer.bq, c.n_head)?)?;
        let k = rope(&shape(&qkv[1], &layer.bk, c.n_kv_head)?)?;
        let v = shape(&qkv[2], &layer.bv, c.n_kv_head)?;
        let (k, v) = match prev {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        // Grouped-query attention: the n_rep query heads that share K/V head j are heads j*n_rep .. j*n_rep+n_rep-1,
        // so (b, n_head, t, d) reshapes, without a copy, into (b, n_kv_head, n_rep * t, d).
        let y = attend(&q, &k, &v, mask, c.n_kv_head)?; // (b, n_head, t, d)
        let y = y.transpose(1, 2)?.reshape((b, t, c.n_embd))?;
        Ok((layer.wo.forward(&y, self.own_kernels)?, (k, v)))
    }
}

/// Scaled dot-product attention of `q` (b, n_head, t, d) over `k`, `v` (b, n_kv_head, kv, d); returns
/// (b, n_head, t, d). Grouped-query attention without materializing repeated K/V: the n_rep query heads that share
/// K/V head j are heads j*n_rep .. j*n_rep+n_rep-1, so `q` reshapes, without a copy, into (b, n_kv_head, n_rep*t, d).
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, n_kv_head: usize) -> Result<Tensor> {
    let (b, n_head, t, d) = q.dims4()?;
    let n_rep = n_head / n_kv_head;
    let q = (q * (1.0 / (d as f64).sqrt()))?.reshape((b, n_kv_head, n_rep * t, d))?;
    let mut att = q.matmul(&k.t()?)?;
    if let Some(mask) = mask {
        att = att.broadcast_add(mask)?;
    }
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    att.matmul(v)?.reshape((b, n_head, t, d))
}

/// `cache` (a contiguous `(1, n_kv, len, d)` f32 tensor on the CPU) with one more position, `new` (`n_kv × d`),
/// as a flat `(n_kv, len + 1, d)` vector.
fn append_position(cache: &Tensor, new: &[f32], n_kv: usize, d: usize) -> Result<Vec<f32>> {
    let (storage, layout) = cache.storage_and_layout();
    let old = match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(cpu), Some((a, b))) => &cpu.as_slice::<f32>()?[a..b],
        _ => candle_core::bail!("the K/V cache is not a contiguous f32 tensor on the CPU"),
    };
    let len = old.len() / (n_kv * d);
    let mut out = Vec::with_capacity(n_kv * (len + 1) * d);
    for (g, row) in new.chunks_exact(d).enumerate() {
        out.extend_from_slice(&old[g * len * d..(g + 1) * len * d]);
        out.extend_from_slice(row);
    }
    Ok(out)
}

/// Positions × heads below which one decoding step's attention runs on the calling thread: under it the hand-out
/// to the pool costs more than the arithmetic.
const PARALLEL_ATTENTION: usize = 4096;

/// Attention of one query position, all `n_head` heads of `q` into `out`, over `len` cached positions of `k`, `v`
/// (`(n_kv_head, len, d)`); the heads are shared out over candle's CPU thread pool when the context is long.
#[allow(clippy::too_many_arguments)]
fn attend_heads(q: &[f32], k: &[f32], v: &[f32], len: usize, d: usize, n_rep: usize, n_head: usize, out: &mut [f32]) {
    if len * n_head < PARALLEL_ATTENTION {
        let mut scores = vec![0f32; len];
        decode::attend_one(q, k, v, len, d, n_rep, 0..n_head, out, &mut scores);
        return;
    }
    // Each head range is handed to exactly one thread by `execute_chunked` and writes only its own heads' floats:
    // the contract of `kernels::Outs`.
    let dst = kernels::Outs(vec![out.as_mut_ptr()]);
    let dst = &dst;
    candle_core::utils::barrier_pool().execute_chunked(n_head, |heads| {
        let mut scores = vec![0f32; len];
        // SAFETY: heads `heads` own floats `heads.start * d .. heads.end * d` of `out` alone, and `out` outlives
        // the pool call.
        let o = unsafe { std::slice::from_raw_parts_mut(dst.0[0].add(heads.start * d), heads.len() * d) };
        decode::attend_one(q, k, v, len, d, n_rep, heads, o, &mut scores);
    });
}

/// Additive causal mask for `t` new tokens at positions `pos..pos+t` over `pos + t` keys, repeated for the
/// `n_rep` query heads stacked per K/V head: shape `(n_rep * t, pos + t)`.
pub(crate) fn causal_mask(t: usize, pos: usize, n_rep: usize, device: &Device) -> Result<Tensor> {
    let kv = pos + t;
    let mut m = Vec::with_capacity(n_rep * t * kv);
    for _ in 0..n_rep {
        for i in 0..t {
            m.extend((0..kv).map(|j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }));
        }
    }
    Tensor::from_vec(m, (n_rep * t, kv), device)
}

pub(crate) fn rope_tables(head_dim: usize, base: f32, positions: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..head_dim).step_by(2).map(|i| 1f32 / base.powf(i as f32 / head_dim as f32)).collect();
    let inv = Tensor::new(inv.as_slice(), device)?.reshape((1, head_dim / 2))?;
    let idx = Tensor::arange(0, positions as u32, device)?.to_dtype(DType::F32)?.reshape((positions, 1))?;
    let freqs = idx.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Index of the largest logit (greedy decoding).
pub fn argmax(logits: &Tensor) -> Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_hides_only_future_positions() {
        let m = causal_mask(2, 3, 2, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m.len(), 4);
        let inf = f32::NEG_INFINITY;
        // token at position 3 sees keys 0..=3; position 4 sees 0..=4; repeated for the second stacked head.
        assert_eq!(m[0], vec![0.0, 0.0, 0.0, 0.0, inf]);
        assert_eq!(m[1], vec![0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(m[2], m[0]);
        assert_eq!(m[3], m[1]);
    }

    /// Plain attention with K/V repeated per query head, computed element by element.
    fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, pos: usize) -> Vec<f32> {
        let (_, n_head, t, d) = q.dims4().unwrap();
        let (_, n_kv, kv, _) = k.dims4().unwrap();
        let (q, k, v) = (q.to_vec3_i(), k.to_vec3_i(), v.to_vec3_i());
        let mut out = vec![0f32; n_head * t * d];
        for h in 0..n_head {
            let g = h / (n_head / n_kv);
            for i in 0..t {
                let scores: Vec<f32> = (0..kv)
                    .map(|j| {
                        if j > pos + i {
                            f32::NEG_INFINITY
                        } else {
                            (0..d).map(|x| q[h][i][x] * k[g][j][x]).sum::<f32>() / (d as f32).sqrt()
                        }
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for x in 0..d {
                    out[(h * t + i) * d + x] = (0..kv).map(|j| e[j] / z * v[g][j][x]).sum();
                }
            }
        }
        out
    }

    trait To3 {
        fn to_vec3_i(&self) -> Vec<Vec<Vec<f32>>>;
    }
    impl To3 for Tensor {
        fn to_vec3_i(&self) -> Vec<Vec<Vec<f32>>> {
            self.squeeze(0).unwrap().to_vec3::<f32>().unwrap()
        }
    }

    #[test]
    fn grouped_attention_matches_the_naive_definition() {
        let dev = Device::Cpu;
        // (heads, kv heads, new tokens, cached tokens): prefill, prefill after a prefix, decode; GQA and MHA.
        for (n_head, n_kv, t, pos) in
            [(6, 2, 12, 0), (9, 3, 10, 0), (6, 2, 5, 7), (6, 2, 1, 30), (4, 4, 3, 2), (14, 2, 40, 0)]
        {
            let d = 16;
            let q = Tensor::randn(0f32, 1.0, (1, n_head, t, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (1, n_kv, pos + t, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (1, n_kv, pos + t, d), &dev).unwrap();
            let mask = (t > 1).then(|| causal_mask(t, pos, n_head / n_kv, &dev).unwrap());
            let ours =
                attend(&q, &k, &v, mask.as_ref(), n_kv).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = naive_attention(&q, &k, &v, pos);
            let err = ours.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-4, "heads {n_head}/{n_kv}, t {t}, pos {pos}: max error {err}");
        }
    }

    #[test]
    fn decoding_attention_matches_the_naive_definition_inline_and_on_the_pool() {
        let dev = Device::Cpu;
        // (heads, kv heads, cached positions incl. the new one): below and above PARALLEL_ATTENTION.
        for (n_head, n_kv, len) in [(6, 2, 1), (6, 2, 40), (12, 2, 400), (8, 8, 700)] {
            let d = 16;
            let q = Tensor::randn(0f32, 1.0, (1, n_head, 1, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (1, n_kv, len, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (1, n_kv, len, d), &dev).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut out = vec![f32::NAN; n_head * d];
            attend_heads(&flat(&q), &flat(&k), &flat(&v), len, d, n_head / n_kv, n_head, &mut out);
            let want = naive_attention(&q, &k, &v, len - 1);
            let err = out.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-4, "heads {n_head}/{n_kv}, {len} positions: max error {err}");
            assert_eq!(len * n_head >= PARALLEL_ATTENTION, len >= 400, "the cases must cover both branches");
        }
    }

    #[test]
    fn appending_a_position_keeps_each_head_contiguous() {
        let (n_kv, d) = (2, 3);
        let old = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((1, n_kv, 2, d)).unwrap();
        let out = append_position(&old, &[100.0, 101.0, 102.0, 200.0, 201.0, 202.0], n_kv, d).unwrap();
        let want =
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 100.0, 101.0, 102.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 200.0, 201.0, 202.0];
        assert_eq!(out, want);
        // A non-contiguous view is refused rather than read in the wrong order.
        let view = old.transpose(2, 3).unwrap();
        assert!(append_position(&view, &[0.0; 6], n_kv, d).is_err());
    }

    #[test]
    fn rope_tables_start_at_identity() {
        let (cos, sin) = rope_tables(4, 10_000.0, 3, &Device::Cpu).unwrap();
        assert_eq!(cos.dims(), &[3, 2]);
        assert_eq!(cos.i(0).unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 1.0]);
        assert_eq!(sin.i(0).unwrap().to_vec1::<f32>().unwrap(), vec![0.0, 0.0]);
        // position 1, frequency 0: angle 1 rad.
        assert!((sin.i((1, 0)).unwrap().to_scalar::<f32>().unwrap() - 1f32.sin()).abs() < 1e-6);
    }
}
