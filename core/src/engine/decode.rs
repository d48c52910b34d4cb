//! The per-token arithmetic of a decoding step on plain slices: RMSNorm, rotary embedding, attention of one query
//! position over the KV cache (SwiGLU and the softmax's exponentials are [`fastmath`]'s).
//!
//! Why not candle's ops, as the prefill path uses: a decoded token is one row of activations, so every op is a few
//! thousand floats, and what costs is the op itself — a tensor allocated per result, a layout check, a dispatch to
//! the thread pool — about thirty times per layer. Measured on the default model (2 threads): 9 % of decode wall
//! time was outside the weight products, most of it that overhead (the pool's second thread spinning meanwhile).
//! These functions write into buffers the step reuses. They compute the same formulas as candle's ops (same
//! epsilon, max-subtracted softmax, RoPE layouts); the sums run in another order, so results agree to float
//! rounding, not bit for bit — [`crate::engine::model`]'s tests hold the two paths together.

use crate::engine::fastmath;

use fastmath::axpy;
/// Σ a·b over equal-length slices, in 8 independent lanes ([`fastmath::dot`]: optimised in debug builds too).
pub use fastmath::dot;

/// `out = x / sqrt(mean(x²) + eps) · w` (RMSNorm, as candle_nn::ops::rms_norm).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = dot(x, x) / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, x), w) in out.iter_mut().zip(x).zip(w) {
        *o = x * r * w;
    }
}

/// Rotary embedding of the heads in `x` (each `cos.len() * 2` wide) at one position whose angle cosines and
/// sines are `cos`, `sin`. `neox`: the two halves of a head rotate together (qwen2); otherwise adjacent pairs
/// (GGML's llama layout) — candle's `rope` and `rope_i`.
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], neox: bool) {
    let half = cos.len();
    for head in x.chunks_exact_mut(2 * half) {
        for i in 0..half {
            let (a, b) = if neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// One segment of a layer's base: K and V laid out `(n_kv, len, d)` (each head's positions contiguous, as a
/// prompt pass writes them).
pub struct KvSegment<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub len: usize,
}

/// The K/V rows of one layer as plain slices: a base of segments in position order (see [`KvSegment`]; the
/// positions of a cached prefix, then of each prompt pass that continued it) followed by a tail laid out
/// `(t, n_kv, d)` (token-major, as decoding appends). Position `j` is in the base when `j < base_len` (the sum of
/// the segments' lengths), else in the tail.
pub struct KvView<'a> {
    pub base: &'a [KvSegment<'a>],
    pub base_len: usize,
    pub tail_k: &'a [f32],
    pub tail_v: &'a [f32],
    pub n_kv: usize,
    pub d: usize,
}

impl<'a> KvView<'a> {
    /// Positions stored.
    pub fn len(&self) -> usize {
        self.base_len + self.tail_k.len() / (self.n_kv * self.d)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The row of K (`k = true`) or V of head `g` at position `j`.
    #[inline]
    fn row(&self, g: usize, j: usize, k: bool) -> &'a [f32] {
        let d = self.d;
        if j >= self.base_len {
            let o = ((j - self.base_len) * self.n_kv + g) * d;
            let tail = if k { self.tail_k } else { self.tail_v };
            return &tail[o..o + d];
        }
        let mut j = j;
        for s in self.base {
            if j < s.len {
                let o = (g * s.len + j) * d;
                let x = if k { s.k } else { s.v };
                return &x[o..o + d];
            }
            j -= s.len;
        }
        unreachable!("position below base_len outside every segment: the segments' lengths do not add up")
    }

    /// Every stored row of K (`k = true`) or V of head `g`, in position order: each segment's rows of `g` (one
    /// contiguous run), then the tail's. What the attention loops read, with no per-row search of the segments.
    pub fn rows(&self, g: usize, k: bool) -> impl Iterator<Item = &'a [f32]> + 'a {
        let (d, n_kv) = (self.d, self.n_kv);
        let tail = if k { self.tail_k } else { self.tail_v };
        let base: &'a [KvSegment<'a>] = self.base;
        base.iter()
            .flat_map(move |s| {
                let x = if k { s.k } else { s.v };
                x[g * s.len * d..(g + 1) * s.len * d].chunks_exact(d)
            })
            .chain(tail.chunks_exact(n_kv * d).map(move |r| &r[g * d..(g + 1) * d]))
    }

    #[inline]
    pub fn k_row(&self, g: usize, j: usize) -> &'a [f32] {
        self.row(g, j, true)
    }

    #[inline]
    pub fn v_row(&self, g: usize, j: usize) -> &'a [f32] {
        self.row(g, j, false)
    }
}

/// Attention of one query position for the query heads `heads` (each `d` wide, contiguous in `q` and `out`) over
/// the first `len` positions of `kv` (the query's own position is the last of them); query head `h` reads K/V
/// head `h / n_rep`. `scores` is scratch of at least `len`.
pub fn attend_one(
    q: &[f32],
    kv: &KvView,
    len: usize,
    n_rep: usize,
    heads: std::ops::Range<usize>,
    out: &mut [f32],
    scores: &mut [f32],
) {
    let d = kv.d;
    assert!(len <= kv.len(), "attending over {len} positions of {}", kv.len());
    let scale = 1.0 / (d as f32).sqrt();
    for (hi, h) in heads.enumerate() {
        let g = h / n_rep;
        let qh = &q[h * d..(h + 1) * d];
        let s = &mut scores[..len];
        let mut max = f32::NEG_INFINITY;
        for (s, k) in s.iter_mut().zip(kv.rows(g, true)) {
            *s = dot(qh, k) * scale;
            max = max.max(*s);
        }
        let z = fastmath::exp_sub_sum(s, max);
        let o = &mut out[hi * d..(hi + 1) * d];
        o.fill(0.0);
        for (&p, v) in s.iter().zip(kv.rows(g, false)) {
            axpy(o, p / z, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_a_plain_sum_at_every_length() {
        for n in [0, 1, 7, 8, 9, 64, 131] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-5, "n = {n}");
        }
    }

    #[test]
    fn rope_rotates_pairs_by_their_angle() {
        // One head of 4: frequencies 0 and 1 at angles 0.5 and 0.25.
        let (cos, sin) = ([0.5f32.cos(), 0.25f32.cos()], [0.5f32.sin(), 0.25f32.sin()]);
        let mut neox = [1.0, 2.0, 3.0, 4.0];
        rope(&mut neox, &cos, &sin, true);
        // Pairs (0, 2) and (1, 3).
        let want = [
            1.0 * cos[0] - 3.0 * sin[0],
            2.0 * cos[1] - 4.0 * sin[1],
            1.0 * sin[0] + 3.0 * cos[0],
            2.0 * sin[1] + 4.0 * cos[1],
        ];
        assert_eq!(neox, want);
        let mut inter = [1.0, 2.0, 3.0, 4.0];
        rope(&mut inter, &cos, &sin, false);
        // Pairs (0, 1) and (2, 3).
        let want = [
            1.0 * cos[0] - 2.0 * sin[0],
            1.0 * sin[0] + 2.0 * cos[0],
            3.0 * cos[1] - 4.0 * sin[1],
            3.0 * sin[1] + 4.0 * cos[1],
        ];
        assert_eq!(inter, want);
    }

    #[test]
    fn rms_norm_scales_to_unit_root_mean_square() {
        let x = [3.0f32, -4.0, 0.0, 0.0];
        let mut out = [0f32; 4];
        rms_norm(&x, &[1.0, 2.0, 1.0, 1.0], 0.0, &mut out);
        // rms = sqrt(25 / 4) = 2.5
        assert_eq!(out, [1.2, -3.2, 0.0, 0.0]);
    }

    #[test]
    fn one_position_attention_is_a_softmax_weighted_mean() {
        // One K/V head shared by two query heads, d = 2, three cached positions.
        let (d, len) = (2, 3);
        let k = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
        let v = [10.0f32, 0.0, 0.0, 10.0, 5.0, 5.0];
        let q = [2.0f32, 0.0, 0.0, 0.0];
        let mut out = [0f32; 4];
        let mut scores = [0f32; 3];
        let one = [KvSegment { k: &k, v: &v, len }];
        let kv = KvView { base: &one, base_len: len, tail_k: &[], tail_v: &[], n_kv: 1, d };
        attend_one(&q, &kv, len, 2, 0..2, &mut out, &mut scores);
        let s = 2.0 / 2f32.sqrt();
        let e = [s.exp(), 1.0, s.exp()];
        let z: f32 = e.iter().sum();
        let want0 = [(10.0 * e[0] + 5.0 * e[2]) / z, (10.0 * e[1] + 5.0 * e[2]) / z];
        assert!((out[0] - want0[0]).abs() < 1e-5 && (out[1] - want0[1]).abs() < 1e-5, "{out:?}");
        // A zero query attends uniformly: the plain mean of V.
        assert!((out[2] - 5.0).abs() < 1e-5 && (out[3] - 5.0).abs() < 1e-5, "{out:?}");
        // The same positions split between a base and a token-major tail give the same result, and a shorter
        // `len` hides the later positions.
        let first = [KvSegment { k: &k[..2], v: &v[..2], len: 1 }];
        let split = KvView { base: &first, base_len: 1, tail_k: &k[2..], tail_v: &v[2..], n_kv: 1, d };
        let mut out2 = [0f32; 4];
        attend_one(&q, &split, len, 2, 0..2, &mut out2, &mut scores);
        assert_eq!(out, out2);
        // And split over two segments and no tail (with one head, `(n_kv, len, d)` is position-major too).
        let two = [KvSegment { k: &k[..4], v: &v[..4], len: 2 }, KvSegment { k: &k[4..], v: &v[4..], len: 1 }];
        let segmented = KvView { base: &two, base_len: 3, tail_k: &[], tail_v: &[], n_kv: 1, d };
        let mut out3 = [0f32; 4];
        attend_one(&q, &segmented, len, 2, 0..2, &mut out3, &mut scores);
        assert_eq!(out, out3);
        attend_one(&q, &split, 1, 2, 0..2, &mut out2, &mut scores);
        assert_eq!(&out2[2..], &[10.0, 0.0], "only position 0 visible");
    }
}
