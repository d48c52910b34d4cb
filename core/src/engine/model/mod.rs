//! Our own forward pass for the decoder-only transformers we serve (`qwen2`, `llama`/`mistral` GGUF files), built
//! from candle's tensor ops and quantized matmuls.
//!
//! Why not `candle_transformers::models::quantized_{qwen2,llama}`: their KV cache is a private field of each layer,
//! so the state after a prompt prefix can be neither kept nor restored — and the schema-prefix cache
//! ([`crate::engine::prefix_cache`]) is exactly that. Here the model is immutable (`&self`) and the attention state lives in
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
//! - one row of activations (every decoded token) is multiplied by our own kernels ([`crate::engine::kernels`]) where the
//!   weights are Q4_K or Q6_K, streaming the GGUF blocks as stored; several rows (prefill) use candle's tiled
//!   quantized matmul;
//! - the embedding table stays quantized and only the prompt's rows are dequantized (for the tied models we serve
//!   it is the output projection's table too: one copy, read once).
//!
//! Supported: RoPE in the NeoX layout (qwen2) or the interleaved GGML layout (llama, mistral); optional q/k/v
//! biases; tied output embeddings. Mixture-of-experts and partial rotary dimensions are refused at load.

mod config;
mod kv;
mod prefill;
mod step;
mod weights;

pub use config::Config;
pub use kv::KvCache;
pub use step::Rows;
pub use weights::{adapter_tensor, lora_names, Target, LORA_ALPHA_KEY};
pub(crate) use weights::{Embedding, LayerWeights, Weights};

use crate::engine::alloc::keep_freed_memory;
use crate::engine::kernels;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Module, Result, Tensor, D};
use std::io::{Read, Seek};
use weights::Linear;

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
    /// Prompts (several rows) through our kernels too (on by default with them): candle's matmul would keep a
    /// tiled copy of every weight a prompt uses, 1.33–2.2× the weights' own size, beside the GGUF blocks decoding
    /// reads. Off = prompts on candle's tiled matmul (the layout of before; for comparisons).
    own_prefill: bool,
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
        let (norm, output) = (w.norm, Linear::new(w.output, None)?);
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in w.layers {
            let [wq, wk, wv, wo, gate, up, down] = {
                let mut lora = l.lora.into_iter();
                l.proj.map(|p| Linear::new(p, lora.next().flatten()))
            };
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
            own_prefill: true,
        })
    }

    /// Make the first prompt after a load as fast as the next ones. candle's quantized matmul rewrites a weight
    /// into its tiled layout the first time a product of several rows (a prompt) uses it — lazily, on the calling
    /// thread, and kept for later calls. For the default model that was 3 s (measured: first 248-token prefill
    /// 3.9 s, the next 0.98 s), paid by the first question after every start. This runs one two-row product through
    /// every layer weight now, the weights shared out over `threads` threads, so the rewrite is done at load and
    /// in parallel. The vocabulary projection is left alone: only single rows (ours) ever reach it. Threads started
    /// here inherit the caller's signal mask (in the server: everything blocked).
    ///
    /// Weights whose prompts go through our kernels ([`Transformer::prefill_on_own_kernels`]; Q4_1 through
    /// [`crate::engine::q4_1`]) are left alone: candle never multiplies several rows with them, so
    /// preparing them would only build the copy we avoid.
    pub fn prepare(&self, threads: usize) -> Result<()> {
        if !self.device.is_cpu() {
            return Ok(());
        }
        let ours = self.prefill_on_own_kernels();
        let all: Vec<&Linear> = self
            .layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down])
            .filter(|l| !(ours && (Linear::kernels_cover(&[l]) || Linear::q4_1_covers(&[l]))))
            .collect();
        if all.is_empty() {
            return Ok(());
        }
        let threads = threads.clamp(1, all.len().max(1));
        std::thread::scope(|s| {
            let all = &all;
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || -> Result<()> {
                        for l in all.iter().skip(t).step_by(threads) {
                            l.candle()?.forward(&Tensor::zeros((2, l.k), DType::F32, &Device::Cpu)?)?;
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

    /// Prompts through our kernels (the default) or candle's tiled matmul (see the field's note). Decoding is
    /// not affected; with our kernels off ([`Transformer::set_own_kernels`]) prompts are candle's either way.
    pub fn set_own_prefill(&mut self, on: bool) {
        self.own_prefill = on;
    }

    /// True when a prompt's products run on our kernels (for the formats they cover).
    pub fn prefill_on_own_kernels(&self) -> bool {
        self.own_kernels && self.own_prefill && self.device.is_cpu()
    }

    pub fn on_cpu(&self) -> bool {
        self.device.is_cpu()
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
pub(super) mod reference {
    use candle_core::Tensor;

    /// Plain attention with K/V repeated per query head, computed element by element.
    pub(in crate::engine::model) fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, pos: usize) -> Vec<f32> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;

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
