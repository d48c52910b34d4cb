//! The decoding step: one token on plain vectors — our kernels for the weight products, [`crate::engine::decode`]
//! for the rest.

use super::{KvCache, Transformer};
use crate::engine::model::weights::Linear;
use crate::engine::{decode, kernels};
use candle_core::{IndexOp, Result, Tensor};

impl Transformer {
    /// One token at position `cache.len()` (decoding), computed on plain vectors: our kernels for the weight
    /// products ([`Linear::matvec_many`]) and [`crate::engine::decode`] for the rest, instead of some thirty candle ops
    /// per layer. The K/V cache keeps its tensor form `(1, n_kv_head, len, d)` so prefill and the prefix cache
    /// read it unchanged; appending one position copies each layer's cache once, as `Tensor::cat` would.
    pub(super) fn step(&self, token: u32, cache: &mut KvCache) -> Result<Tensor> {
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

#[cfg(test)]
mod tests {
    use super::super::reference::naive_attention;
    use super::*;
    use candle_core::Device;

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
}
