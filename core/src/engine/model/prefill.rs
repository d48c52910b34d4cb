//! The prompt pass: several tokens at once — candle's tensor ops for attention and norms, our kernels for the
//! projections (every weight read once for all the prompt's rows; candle's tiled matmul when told so).

use super::kv::LayerKv;
use super::{KvCache, Layer, Transformer};
use crate::engine::model::weights::Linear;
use crate::engine::{fastmath, kernels};
use candle_core::{DType, Device, IndexOp, Result, Tensor};

impl Transformer {
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
        let ours = self.prefill_on_own_kernels();
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.cfg.rms_eps as f32)?;
            let prev = match cache.layers.get(i) {
                Some(l) => l.parts(self.cfg.n_kv_head, self.cfg.head_dim, device)?,
                None => Vec::new(),
            };
            let (attn, (k, v)) = self.attention(layer, &h, &prev, mask.as_ref(), (&cos, &sin), ours)?;
            layers.push(LayerKv::extended(prev, k, v)?);
            x = (x + attn)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, self.cfg.rms_eps as f32)?;
            let gu = Linear::forward_many(&[&layer.gate, &layer.up], &h, ours)?;
            let g = swiglu_rows(&gu[0], &gu[1])?;
            x = (x + layer.down.forward(&g, ours)?)?;
        }
        let last = x.i((.., t - 1..t, ..))?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, self.cfg.rms_eps as f32)?;
        let logits = self.output.forward(&last, self.own_kernels)?.flatten_all()?;
        cache.layers = layers;
        cache.len += t;
        Ok(logits)
    }

    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        prev: &[(Tensor, Tensor)],
        mask: Option<&Tensor>,
        (cos, sin): (&Tensor, &Tensor),
        own_kernels: bool,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let c = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let qkv = Linear::forward_many(&[&layer.wq, &layer.wk, &layer.wv], x, own_kernels)?;
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
        // Attention reads every position in one pair (a copy made for this pass and dropped after it); the state
        // keeps only this pass's own K/V as a new segment.
        let y = if prev.is_empty() {
            attend(&q, &k, &v, mask, c.n_kv_head)?
        } else {
            let ks: Vec<&Tensor> = prev.iter().map(|(k, _)| k).chain([&k]).collect();
            let vs: Vec<&Tensor> = prev.iter().map(|(_, v)| v).chain([&v]).collect();
            attend(&q, &Tensor::cat(&ks, 2)?, &Tensor::cat(&vs, 2)?, mask, c.n_kv_head)?
        }; // (b, n_head, t, d); grouped-query attention as `attend` describes
        let y = y.transpose(1, 2)?.reshape((b, t, c.n_embd))?;
        Ok((layer.wo.forward(&y, own_kernels)?, (k, v)))
    }
}

/// `silu(gate) · up` for a prompt's rows: [`fastmath::swiglu`], as the decoding step computes it,
/// shared out over the pool's threads. candle's `silu` and `mul`, used before, ran ~9 k libm exponentials per row
/// and layer on the calling thread while the other waited. Off the CPU or in another dtype, candle's ops.
fn swiglu_rows(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !gate.device().is_cpu() || gate.dtype() != DType::F32 || up.dtype() != DType::F32 {
        return candle_nn::ops::silu(gate)? * up;
    }
    if gate.shape() != up.shape() {
        candle_core::bail!("swiglu: gate {:?} and up {:?} differ in shape", gate.shape(), up.shape());
    }
    let shape = gate.shape().clone();
    let mut g = gate.flatten_all()?.to_vec1::<f32>()?;
    let u = up.flatten_all()?.to_vec1::<f32>()?;
    const PIECE: usize = 4096;
    let len = g.len();
    let dst = kernels::Outs(vec![g.as_mut_ptr()]);
    let (dst, u) = (&dst, &u);
    candle_core::utils::barrier_pool().execute_chunked(len.div_ceil(PIECE), |pieces| {
        let (a, b) = (pieces.start * PIECE, (pieces.end * PIECE).min(len));
        // SAFETY: `execute_chunked` hands each piece range to exactly one thread, so floats `a..b` of `g` are
        // written by this call alone and read by no other; `g` outlives the pool call, which returns only when
        // every piece is done (the contract of `kernels::Outs`).
        let g = unsafe { std::slice::from_raw_parts_mut(dst.0[0].add(a), b - a) };
        fastmath::swiglu(g, &u[a..b]);
    });
    Tensor::from_vec(g, shape, gate.device())
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

#[cfg(test)]
mod tests {
    use super::super::reference::naive_attention;
    use super::*;

    #[test]
    fn swiglu_rows_matches_candles_silu_times_up_on_the_pool() {
        let dev = Device::Cpu;
        // 37 rows of 1,000: 9 pieces of 4,096 and a short last one, so several threads' pieces and the edge.
        let g = (Tensor::randn(0f32, 3.0, (1, 37, 1000), &dev).unwrap() * 4.0).unwrap();
        let u = Tensor::randn(0f32, 1.0, (1, 37, 1000), &dev).unwrap();
        let got = swiglu_rows(&g, &u).unwrap();
        assert_eq!(got.dims(), &[1, 37, 1000]);
        let want = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
        let (got, want) = (got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap());
        let want = want.to_vec1::<f32>().unwrap();
        let worst = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs() / b.abs().max(1e-3)));
        assert!(worst < 1e-5, "worst relative difference {worst}");
        let bad = Tensor::zeros((1, 37, 999), candle_core::DType::F32, &dev).unwrap();
        assert!(swiglu_rows(&g, &bad).is_err(), "shapes that differ are an error, not a short read");
    }

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
}
