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
/// head `h / n_rep`. `scores` is scratch of at least `len`. The plain form, one row alone: the reference
/// [`attend_rows`] (which decoding passes run) is tested against bit for bit.
#[cfg(test)]
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

/// Attention of several query rows at once — a decoding pass's rows, each over its own K/V — for the query heads
/// `heads` of each: row r's query `qs[r]` (all heads, `d` wide each) over the first `lens[r]` positions of
/// `views[r]`, into `outs[r]` (the floats of heads `heads`, contiguous). The same bits as [`attend_one`] row by row
/// (the same dot products, softmax and sums in the same order per row and head).
///
/// Why: a pass's rows often continue the same stored positions — requests on one database continue its cached
/// schema prefix, a request's candidates its prompt, drafted rows their sequence — and a row's K/V is read from
/// memory once per row and step (the weights streaming through evict it from cache): 23 MB a row on a 400-token
/// prompt of the default model, against 1.1 GB of weights. Here the rows whose views hold the same base segment
/// (the same floats, at the same place in their positions) read each of its K and V rows once for all of them.
pub fn attend_rows(
    qs: &[&[f32]],
    views: &[&KvView],
    lens: &[usize],
    n_rep: usize,
    heads: std::ops::Range<usize>,
    outs: &mut [&mut [f32]],
    scores: &mut Vec<f32>,
) {
    let n = qs.len();
    assert!(views.len() == n && lens.len() == n && outs.len() == n, "one view, length and output a row");
    let Some(first) = views.first() else { return };
    let (d, nh) = (first.d, heads.len());
    assert!(views.iter().all(|v| v.d == d), "views of different head sizes");
    for ((v, &len), o) in views.iter().zip(lens).zip(outs.iter()) {
        assert!(len <= v.len(), "attending over {len} positions of {}", v.len());
        assert!(o.len() >= nh * d, "an output of {} floats for {nh} heads of {d}", o.len());
    }
    let scale = 1.0 / (d as f32).sqrt();
    // Row r's scores of head hi (the hi-th of `heads`) at `at[r] + hi·lens[r]`, position by position.
    let mut at = Vec::with_capacity(n);
    let mut total = 0;
    for &len in lens {
        at.push(total);
        total += nh * len;
    }
    scores.clear();
    scores.resize(total, 0.0);
    // The base segments, level by level (a row's i-th segment at level i, so each row meets its positions in
    // order), the rows holding the same one (same floats, same first position, same positions used) together.
    struct Group<'v> {
        seg: &'v KvSegment<'v>,
        from: usize,
        take: usize,
        rows: Vec<usize>,
    }
    let mut levels: Vec<Vec<Group>> = Vec::new();
    for (r, (v, &len)) in views.iter().zip(lens).enumerate() {
        let mut from = 0;
        for (i, seg) in v.base.iter().enumerate() {
            let take = seg.len.min(len.saturating_sub(from));
            if take > 0 {
                if levels.len() <= i {
                    levels.resize_with(i + 1, Vec::new);
                }
                let same = |g: &Group| {
                    std::ptr::eq(g.seg.k.as_ptr(), seg.k.as_ptr())
                        && g.seg.len == seg.len
                        && g.from == from
                        && g.take == take
                };
                match levels[i].iter_mut().find(|g| same(g)) {
                    Some(g) => g.rows.push(r),
                    None => levels[i].push(Group { seg, from, take, rows: vec![r] }),
                }
            }
            from += seg.len;
        }
    }
    let head_of = |h: usize| h / n_rep;
    // The query heads of `heads` by the K/V head they read: (K/V head, its query heads here).
    let by_kv: Vec<(usize, std::ops::Range<usize>)> = heads
        .clone()
        .filter(|&h| h == heads.start || head_of(h) != head_of(h - 1))
        .map(|h0| (head_of(h0), h0..heads.end.min((head_of(h0) + 1) * n_rep)))
        .collect();
    // Scores: each K row of a group's segment once, against every row's query heads reading its K/V head.
    for g in levels.iter().flatten() {
        for (kvh, hs) in &by_kv {
            let base = kvh * g.seg.len * d;
            for j in 0..g.take {
                let k = &g.seg.k[base + j * d..base + (j + 1) * d];
                for &r in &g.rows {
                    for h in hs.clone() {
                        let hi = h - heads.start;
                        scores[at[r] + hi * lens[r] + g.from + j] = dot(&qs[r][h * d..(h + 1) * d], k) * scale;
                    }
                }
            }
        }
    }
    // The tails (token-major, a row's own), then each row's softmax.
    let mut z = vec![0f32; n * nh];
    for (r, (v, &len)) in views.iter().zip(lens).enumerate() {
        let tail_from = v.base_len.min(len);
        for (hi, h) in heads.clone().enumerate() {
            let kvh = head_of(h);
            let qh = &qs[r][h * d..(h + 1) * d];
            let s = &mut scores[at[r] + hi * len..at[r] + (hi + 1) * len];
            for (j, x) in s.iter_mut().enumerate().skip(tail_from) {
                let o = ((j - v.base_len) * v.n_kv + kvh) * d;
                *x = dot(qh, &v.tail_k[o..o + d]) * scale;
            }
            let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            z[r * nh + hi] = fastmath::exp_sub_sum(s, max);
        }
    }
    for o in outs.iter_mut() {
        o[..nh * d].fill(0.0);
    }
    // Values: the groups' segments level by level, then the tails — each row's positions in order.
    for g in levels.iter().flatten() {
        for (kvh, hs) in &by_kv {
            let base = kvh * g.seg.len * d;
            for j in 0..g.take {
                let vr = &g.seg.v[base + j * d..base + (j + 1) * d];
                for &r in &g.rows {
                    for h in hs.clone() {
                        let hi = h - heads.start;
                        let p = scores[at[r] + hi * lens[r] + g.from + j];
                        axpy(&mut outs[r][hi * d..(hi + 1) * d], p / z[r * nh + hi], vr);
                    }
                }
            }
        }
    }
    for (r, (v, &len)) in views.iter().zip(lens).enumerate() {
        let tail_from = v.base_len.min(len);
        for (hi, h) in heads.clone().enumerate() {
            let kvh = head_of(h);
            for j in tail_from..len {
                let o = ((j - v.base_len) * v.n_kv + kvh) * d;
                let p = scores[at[r] + hi * len + j];
                axpy(&mut outs[r][hi * d..(hi + 1) * d], p / z[r * nh + hi], &v.tail_v[o..o + d]);
            }
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
    #[test]
    fn rows_attending_together_get_the_bits_of_each_row_alone() {
        // 2 K/V heads, 3 query heads each, d = 16; a shared prefix segment (5 positions) and a second shared one (3),
        // rows with their own tails, one row with a segment of its own, one reading fewer positions (a drafted row
        // of a sequence), and one with no base at all.
        let (n_kv, n_rep, d) = (2, 3, 16);
        let n_head = n_kv * n_rep;
        let mut seed = 7u64;
        let mut noise = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect()
        };
        // Segments laid out (n_kv, len, d); tails (t, n_kv, d).
        let p = (noise(n_kv * 5 * d), noise(n_kv * 5 * d));
        let q2 = (noise(n_kv * 3 * d), noise(n_kv * 3 * d));
        let o = (noise(n_kv * 4 * d), noise(n_kv * 4 * d));
        let tails: Vec<(Vec<f32>, Vec<f32>)> =
            [2usize, 1, 3, 0, 4].iter().map(|&t| (noise(t * n_kv * d), noise(t * n_kv * d))).collect();
        let bases: Vec<Vec<KvSegment>> = vec![
            vec![KvSegment { k: &p.0, v: &p.1, len: 5 }, KvSegment { k: &q2.0, v: &q2.1, len: 3 }],
            vec![KvSegment { k: &p.0, v: &p.1, len: 5 }, KvSegment { k: &q2.0, v: &q2.1, len: 3 }],
            vec![KvSegment { k: &p.0, v: &p.1, len: 5 }, KvSegment { k: &o.0, v: &o.1, len: 4 }],
            vec![KvSegment { k: &p.0, v: &p.1, len: 5 }],
            vec![],
        ];
        let views: Vec<KvView> = bases
            .iter()
            .zip(&tails)
            .map(|(b, (tk, tv))| KvView {
                base: b,
                base_len: b.iter().map(|s| s.len).sum(),
                tail_k: tk,
                tail_v: tv,
                n_kv,
                d,
            })
            .collect();
        // Row 1 reads one position less than it holds; row 3 only the prefix's first 4 (a shorter segment use).
        let lens: Vec<usize> = views.iter().enumerate().map(|(r, v)| v.len() - [0, 1, 0, 1, 0][r]).collect();
        let qs: Vec<Vec<f32>> = (0..views.len()).map(|_| noise(n_head * d)).collect();
        let q_refs: Vec<&[f32]> = qs.iter().map(|q| q.as_slice()).collect();
        let view_refs: Vec<&KvView> = views.iter().collect();
        for heads in [0..n_head, 0..2, 2..5, 4..6] {
            let mut want = vec![vec![f32::NAN; heads.len() * d]; views.len()];
            for (r, v) in views.iter().enumerate() {
                let mut scores = vec![0f32; lens[r]];
                attend_one(&qs[r], v, lens[r], n_rep, heads.clone(), &mut want[r], &mut scores);
            }
            let mut got = vec![vec![f32::NAN; heads.len() * d]; views.len()];
            let mut outs: Vec<&mut [f32]> = got.iter_mut().map(|g| g.as_mut_slice()).collect();
            let mut scores = Vec::new();
            attend_rows(&q_refs, &view_refs, &lens, n_rep, heads.clone(), &mut outs, &mut scores);
            let bits = |x: &[Vec<f32>]| x.iter().flatten().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "heads {heads:?}");
            assert!(got.iter().flatten().all(|f| f.is_finite()));
        }
    }
}
