//! The decoding step: one token on plain vectors — our kernels for the weight products, [`crate::engine::decode`]
//! for the rest.

use super::kv::LayerKv;
use super::{KvCache, Transformer};
#[cfg(test)]
use crate::engine::decode::KvSegment;
use crate::engine::decode::KvView;
use crate::engine::model::weights::Linear;
use crate::engine::{decode, fastmath, kernels};
use candle_core::{IndexOp, Result, Tensor};

/// One sequence's share of a multi-row pass: its state, and the tokens to run at positions `cache.len()..`.
pub struct Rows<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
}

impl Transformer {
    /// One token at position `cache.len()` (decoding): [`Transformer::step_many`] with one row.
    pub(super) fn step(&self, token: u32, cache: &mut KvCache) -> Result<Tensor> {
        let mut logits = self.step_many(&mut [Rows { cache, tokens: &[token] }])?;
        Tensor::from_vec(logits.pop().expect("one row"), self.output.n, &self.device)
    }

    /// Several rows through one pass over the weights, computed on plain vectors: our kernels for the weight
    /// products ([`Linear::matmul_rows`], every weight read once for all rows) and [`crate::engine::decode`] for
    /// the rest. Rows may be the next token of several sequences (candidates, sessions) or several positions of
    /// one (a draft to verify): a row attends to its sequence's state and to the rows of its sequence before it.
    /// Returns the logits of every row, in order. Each row's arithmetic is the same as in a pass of its own, so
    /// results do not depend on what shares the pass. On an error every state is left as it was.
    pub fn step_many(&self, seqs: &mut [Rows<'_>]) -> Result<Vec<Vec<f32>>> {
        let c = &self.cfg;
        let (d, n_kv) = (c.head_dim, c.n_kv_head);
        let n_rep = c.n_head / n_kv;
        // Every row: (sequence, position), sequences' rows in position order.
        let mut rows: Vec<(usize, usize)> = Vec::new();
        let mut tokens: Vec<u32> = Vec::new();
        for (si, s) in seqs.iter().enumerate() {
            for (j, &t) in s.tokens.iter().enumerate() {
                rows.push((si, s.cache.len + j));
                tokens.push(t);
            }
        }
        if rows.is_empty() {
            candle_core::bail!("a pass needs at least one token");
        }
        if let Some(&(_, p)) = rows.iter().find(|(_, p)| *p >= self.max_positions) {
            candle_core::bail!(
                "position {} is past the {} positions this model was loaded for",
                p + 1,
                self.max_positions
            );
        }
        let n = rows.len();
        let embedded = self.embed.lookup(&tokens, &self.device)?.flatten_all()?.to_vec1::<f32>()?;
        let mut xs: Vec<Vec<f32>> = embedded.chunks_exact(c.n_embd).map(|r| r.to_vec()).collect();
        let rope: Vec<(Vec<f32>, Vec<f32>)> = rows
            .iter()
            .map(|&(_, p)| Ok((self.cos.i(p)?.to_vec1::<f32>()?, self.sin.i(p)?.to_vec1::<f32>()?)))
            .collect::<Result<_>>()?;
        // Where each sequence's tail stood, so a failed pass can be undone.
        let n_layers = self.layers.len();
        for s in seqs.iter_mut() {
            if s.cache.layers.is_empty() {
                s.cache.layers = vec![LayerKv::default(); n_layers];
            }
        }
        let before: Vec<usize> = seqs.iter().map(|s| s.cache.layers[0].tail_len(n_kv, d)).collect();
        let result = self.rows_pass(seqs, &rows, &mut xs, &rope, n_rep);
        match result {
            Ok(logits) => {
                for s in seqs.iter_mut() {
                    s.cache.len += s.tokens.len();
                }
                debug_assert_eq!(logits.len(), n);
                Ok(logits)
            }
            Err(e) => {
                for (s, &t) in seqs.iter_mut().zip(&before) {
                    s.cache.layers.iter_mut().for_each(|l| l.truncate_tail(t, n_kv, d));
                }
                Err(e)
            }
        }
    }

    fn rows_pass(
        &self,
        seqs: &mut [Rows<'_>],
        rows: &[(usize, usize)],
        xs: &mut [Vec<f32>],
        rope: &[(Vec<f32>, Vec<f32>)],
        n_rep: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.cfg;
        let (d, eps, n_kv) = (c.head_dim, c.rms_eps as f32, c.n_kv_head);
        let n = rows.len();
        let mut hs = vec![vec![0f32; c.n_embd]; n];
        let mut attn = vec![vec![0f32; c.n_head * d]; n];
        for (i, layer) in self.layers.iter().enumerate() {
            for (h, x) in hs.iter_mut().zip(xs.iter()) {
                decode::rms_norm(x, &layer.v.attn_norm, eps, h);
            }
            let h_rows: Vec<&[f32]> = hs.iter().map(|h| h.as_slice()).collect();
            let mut qkv = Linear::matmul_rows(&[&layer.wq, &layer.wk, &layer.wv], &h_rows)?;
            let widths = [c.n_head * d, n_kv * d, n_kv * d];
            for ((y, b), w) in qkv.iter_mut().zip([&layer.v.bq, &layer.v.bk, &layer.v.bv]).zip(widths) {
                if let Some(b) = b {
                    y.chunks_exact_mut(w).for_each(|y| y.iter_mut().zip(b).for_each(|(y, b)| *y += b));
                }
            }
            let [mut q, mut k, v] =
                <[Vec<f32>; 3]>::try_from(qkv).map_err(|_| candle_core::Error::Msg("q/k/v".into()))?;
            for (r, (cos, sin)) in rope.iter().enumerate() {
                decode::rope(&mut q[r * widths[0]..(r + 1) * widths[0]], cos, sin, c.rope_neox);
                decode::rope(&mut k[r * widths[1]..(r + 1) * widths[1]], cos, sin, c.rope_neox);
            }
            // Append every row's K/V to its sequence (rows of a sequence are in position order), then attend.
            for (r, &(si, _)) in rows.iter().enumerate() {
                let kr = &k[r * widths[1]..(r + 1) * widths[1]];
                let vr = &v[r * widths[1]..(r + 1) * widths[1]];
                seqs[si].cache.layers[i].push(kr, vr);
            }
            // All rows together: rows continuing the same stored positions read them once (`attend_rows`).
            let layers: Vec<&LayerKv> = seqs.iter().map(|s| &s.cache.layers[i]).collect();
            let q_rows: Vec<&[f32]> = q.chunks_exact(widths[0]).collect();
            let lens: Vec<usize> = rows.iter().map(|&(_, pos)| pos + 1).collect();
            LayerKv::with_views(&layers, n_kv, d, |views| {
                let views: Vec<&KvView> = rows.iter().map(|&(si, _)| &views[si]).collect();
                attend_pass(&q_rows, &views, &lens, n_rep, c.n_head, &mut attn);
            })?;
            let a_rows: Vec<&[f32]> = attn.iter().map(|a| a.as_slice()).collect();
            let o = Linear::matmul_rows(&[&layer.wo], &a_rows)?;
            for (r, x) in xs.iter_mut().enumerate() {
                x.iter_mut().zip(&o[0][r * c.n_embd..(r + 1) * c.n_embd]).for_each(|(x, o)| *x += o);
            }
            for (h, x) in hs.iter_mut().zip(xs.iter()) {
                decode::rms_norm(x, &layer.v.ffn_norm, eps, h);
            }
            let h_rows: Vec<&[f32]> = hs.iter().map(|h| h.as_slice()).collect();
            let mut gu = Linear::matmul_rows(&[&layer.gate, &layer.up], &h_rows)?;
            let up = gu.pop().expect("two products");
            let mut g = gu.pop().expect("two products");
            let ff = layer.up.n;
            for (g, u) in g.chunks_exact_mut(ff).zip(up.chunks_exact(ff)) {
                fastmath::swiglu(g, u);
            }
            let g_rows: Vec<&[f32]> = g.chunks_exact(ff).collect();
            let down = Linear::matmul_rows(&[&layer.down], &g_rows)?;
            for (r, x) in xs.iter_mut().enumerate() {
                x.iter_mut().zip(&down[0][r * c.n_embd..(r + 1) * c.n_embd]).for_each(|(x, y)| *x += y);
            }
        }
        for x in xs.iter_mut() {
            decode::rms_norm(&x.clone(), &self.norm_v, eps, x);
        }
        let x_rows: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let logits = Linear::matmul_rows(&[&self.output], &x_rows)?.pop().expect("one product");
        Ok(logits.chunks_exact(self.output.n).map(|l| l.to_vec()).collect())
    }
}

/// Positions × heads below which one decoding step's attention runs on the calling thread: under it the hand-out
/// to the pool costs more than the arithmetic.
const PARALLEL_ATTENTION: usize = 4096;

/// Attention of every row of a pass, all `n_head` heads of each (`qs[r]`) into `outs[r]`, row r over the first
/// `lens[r]` positions of `views[r]` ([`decode::attend_rows`]); the heads are shared out over candle's CPU thread
/// pool when the pass's positions × heads are many.
fn attend_pass(qs: &[&[f32]], views: &[&KvView], lens: &[usize], n_rep: usize, n_head: usize, outs: &mut [Vec<f32>]) {
    let Some(first) = views.first() else { return };
    let d = first.d;
    let work: usize = lens.iter().sum::<usize>() * n_head;
    if work < PARALLEL_ATTENTION {
        let mut scores = Vec::new();
        let mut o: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        decode::attend_rows(qs, views, lens, n_rep, 0..n_head, &mut o, &mut scores);
        return;
    }
    // Each head range is handed to exactly one thread by `execute_chunked` and writes only its own heads' floats
    // of every row: the contract of `kernels::Outs`.
    let dst = kernels::Outs(outs.iter_mut().map(|o| o.as_mut_ptr()).collect());
    let dst = &dst;
    candle_core::utils::barrier_pool().execute_chunked(n_head, |heads| {
        let mut scores = Vec::new();
        let mut o: Vec<&mut [f32]> = dst
            .0
            .iter()
            // SAFETY: heads `heads` own floats `heads.start * d .. heads.end * d` of every row's output alone,
            // each output holds `n_head * d` floats, and the outputs outlive the pool call.
            .map(|&p| unsafe { std::slice::from_raw_parts_mut(p.add(heads.start * d), heads.len() * d) })
            .collect();
        decode::attend_rows(qs, views, lens, n_rep, heads, &mut o, &mut scores);
    });
}

/// [`attend_pass`] for one row (the tests' entry).
#[cfg(test)]
fn attend_heads(q: &[f32], kv: &KvView, len: usize, n_rep: usize, n_head: usize, out: &mut [f32]) {
    let mut outs = vec![vec![0f32; n_head * kv.d]];
    attend_pass(&[q], &[kv], &[len], n_rep, n_head, &mut outs);
    out.copy_from_slice(&outs[0]);
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
            let (kf, vf) = (flat(&k), flat(&v));
            let one = [KvSegment { k: &kf, v: &vf, len }];
            let kv = KvView { base: &one, base_len: len, tail_k: &[], tail_v: &[], n_kv, d };
            attend_heads(&flat(&q), &kv, len, n_head / n_kv, n_head, &mut out);
            let want = naive_attention(&q, &k, &v, len - 1);
            let err = out.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-4, "heads {n_head}/{n_kv}, {len} positions: max error {err}");
            assert_eq!(len * n_head >= PARALLEL_ATTENTION, len >= 400, "the cases must cover both branches");
        }
    }
}
