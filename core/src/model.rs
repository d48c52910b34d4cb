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

use crate::kernels;
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
        let ours: Option<Vec<_>> = layers.iter().map(|l| l.raw().filter(|_| l.k == k)).collect();
        match ours {
            Some(raw) if own_kernels && x.elem_count() == k && x.device().is_cpu() => {
                let xs = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let data = raw.iter().map(|(qt, _)| qt.data()).collect::<Result<Vec<_>>>()?;
                let mats: Vec<kernels::Matrix> = layers
                    .iter()
                    .zip(&raw)
                    .zip(&data)
                    .map(|((l, (_, kind)), w)| kernels::Matrix { kind: *kind, w, n: l.n })
                    .collect();
                let mut ys: Vec<Vec<f32>> = layers.iter().map(|l| vec![0f32; l.n]).collect();
                let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
                kernels::gemv_many(&mats, k, &xs, &mut outs);
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
            _ => layers.iter().map(|l| l.mm.forward(x)).collect(),
        }
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
            ct.metadata.get(&format!("{arch}.{k}")).ok_or_else(|| candle_core::Error::Msg(format!("cannot find {arch}.{k} in the GGUF metadata")))
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
        let mut get = |name: &str| ct.tensor(reader, name, device);
        let token_embd = Arc::new(get("token_embd.weight")?);
        let embed = Embedding::new(token_embd.clone(), device)?;
        let norm = get("output_norm.weight")?.dequantize(device)?;
        let output = match ct.tensor_infos.contains_key("output.weight") {
            true => Linear::new(Arc::new(get("output.weight")?))?,
            // Tied embeddings (SmolLM2, Qwen2.5 0.5B/1.5B): the output projection is the embedding table, read once.
            false => Linear::new(token_embd)?,
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("blk.{i}");
            let mut bias = |n: &str| -> Result<Option<Tensor>> {
                let name = format!("{p}.{n}.bias");
                if ct.tensor_infos.contains_key(&name) {
                    Ok(Some(get(&name)?.dequantize(device)?))
                } else {
                    Ok(None)
                }
            };
            let (bq, bk, bv) = (bias("attn_q")?, bias("attn_k")?, bias("attn_v")?);
            let mut qmm = |n: &str| -> Result<Linear> { Linear::new(Arc::new(get(&format!("{p}.{n}.weight"))?)) };
            let (wq, wk, wv, wo) = (qmm("attn_q")?, qmm("attn_k")?, qmm("attn_v")?, qmm("attn_output")?);
            let (gate, up, down) = (qmm("ffn_gate")?, qmm("ffn_up")?, qmm("ffn_down")?);
            let attn_norm = get(&format!("{p}.attn_norm.weight"))?.dequantize(device)?;
            let ffn_norm = get(&format!("{p}.ffn_norm.weight"))?.dequantize(device)?;
            layers.push(Layer { attn_norm, wq, wk, wv, bq, bk, bv, wo, ffn_norm, gate, up, down });
        }
        let (cos, sin) = rope_tables(cfg.head_dim, cfg.rope_base, max_positions, device)?;
        Ok(Transformer {
            cfg,
            embed,
            device: device.clone(),
            layers,
            norm,
            output,
            cos,
            sin,
            max_positions,
            own_kernels: kernels::simd_available(),
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
            candle_core::bail!("position {} is past the {} positions this model was loaded for", pos + t, self.max_positions);
        }
        let device = &self.device;
        let mut x = self.embed.lookup(tokens, device)?; // (1, t, n_embd)
        let mask = if t > 1 { Some(causal_mask(t, pos, self.cfg.n_head / self.cfg.n_kv_head, device)?) } else { None };
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let first = cache.layers.is_empty();
        for (i, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.cfg.rms_eps as f32)?;
            let prev = if first { None } else { Some(&cache.layers[i]) };
            let (attn, kv) = self.attention(layer, &h, prev, mask.as_ref(), &cos, &sin)?;
            if first {
                cache.layers.push(kv);
            } else {
                cache.layers[i] = kv;
            }
            x = (x + attn)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, self.cfg.rms_eps as f32)?;
            let gu = Linear::forward_many(&[&layer.gate, &layer.up], &h, self.own_kernels)?;
            let g = candle_nn::ops::silu(&gu[0])?;
            x = (x + layer.down.forward(&(g * &gu[1])?, self.own_kernels)?)?;
        }
        cache.len += t;
        let last = x.i((.., t - 1..t, ..))?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, self.cfg.rms_eps as f32)?;
        self.output.forward(&last, self.own_kernels)?.flatten_all()
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
        for (n_head, n_kv, t, pos) in [(6, 2, 12, 0), (9, 3, 10, 0), (6, 2, 5, 7), (6, 2, 1, 30), (4, 4, 3, 2), (14, 2, 40, 0)] {
            let d = 16;
            let q = Tensor::randn(0f32, 1.0, (1, n_head, t, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (1, n_kv, pos + t, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (1, n_kv, pos + t, d), &dev).unwrap();
            let mask = (t > 1).then(|| causal_mask(t, pos, n_head / n_kv, &dev).unwrap());
            let ours = attend(&q, &k, &v, mask.as_ref(), n_kv).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = naive_attention(&q, &k, &v, pos);
            let err = ours.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-4, "heads {n_head}/{n_kv}, t {t}, pos {pos}: max error {err}");
        }
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
