//! The attention state after some tokens, owned by the caller.
//!
//! Per layer, K and V live in two parts:
//! - a **base**: one or more segments, each a pair of `(1, n_kv_head, len, head_dim)` tensors written once by a
//!   prompt pass and never changed. Cloning a state shares them (candle tensors are reference-counted), and a
//!   prompt pass that continues a state adds a segment of its own positions only: a cached schema prefix, or one
//!   prompt that several candidates continue, is stored once however many requests continue it (eight sessions on
//!   one 2,000-token schema would otherwise hold eight copies of its 114 MB of K/V);
//! - a **tail** the decoding step appends to in place, token-major (`(t, n_kv_head, head_dim)`): a decoded token
//!   costs one write of its K/V, not a copy of the whole layer (which, with eight candidates on a 300-token
//!   prompt, would move more bytes than the weights).
//!
//! A prompt pass over a state with a tail turns the tail into a segment first (a copy of the tail only).

use candle_core::{DType, Device, Result, Tensor};

use crate::engine::decode::{KvSegment, KvView};

/// Segments past this many are folded, all but the first, into one when a prompt pass adds another (a copy, rare:
/// each prompt pass on a state adds one segment, or two after decoded tokens, and a request makes a few).
const MAX_SEGMENTS: usize = 8;

#[derive(Clone, Default)]
pub(crate) struct LayerKv {
    /// K and V segments in position order, each `(1, n_kv, len, d)`.
    segments: Vec<(Tensor, Tensor)>,
    /// Positions in the segments.
    base_len: usize,
    tail_k: Vec<f32>,
    tail_v: Vec<f32>,
}

/// The floats of a contiguous f32 CPU tensor.
fn floats(t: &Tensor) -> Result<impl std::ops::Deref<Target = candle_core::Storage> + '_> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(_), Some((0, _))) if t.dtype() == DType::F32 => {}
        _ => candle_core::bail!("the K/V cache is not a contiguous f32 tensor on the CPU"),
    }
    Ok(storage)
}

fn slice(storage: &candle_core::Storage) -> Result<&[f32]> {
    match storage {
        candle_core::Storage::Cpu(cpu) => cpu.as_slice::<f32>(),
        _ => candle_core::bail!("the K/V cache is not on the CPU"),
    }
}

impl LayerKv {
    /// A layer holding `k` and `v` as its one segment.
    #[cfg(test)]
    pub(crate) fn from_base(k: Tensor, v: Tensor) -> Result<LayerKv> {
        let (_, _, len, _) = k.dims4()?;
        Ok(LayerKv { segments: vec![(k, v)], base_len: len, tail_k: Vec::new(), tail_v: Vec::new() })
    }

    /// The stored positions as K and V parts in position order (the segments, shared, and the tail as a new
    /// `(1, n_kv, t, d)` pair), for a prompt pass to attend over and extend. Empty for a layer that has seen nothing.
    pub(crate) fn parts(&self, n_kv: usize, d: usize, device: &Device) -> Result<Vec<(Tensor, Tensor)>> {
        let mut parts = self.segments.clone();
        let t = self.tail_k.len() / (n_kv * d);
        if t > 0 {
            let tail = |x: &[f32]| Tensor::from_slice(x, (1, t, n_kv, d), device)?.transpose(1, 2)?.contiguous();
            parts.push((tail(&self.tail_k)?, tail(&self.tail_v)?));
        }
        Ok(parts)
    }

    /// The state after a prompt pass: `parts` (this layer's, from [`LayerKv::parts`]) then the pass's own K/V
    /// `(1, n_kv, t, d)`. Only the new positions are stored anew; past [`MAX_SEGMENTS`] the segments after the first
    /// are folded into one.
    pub(crate) fn extended(mut parts: Vec<(Tensor, Tensor)>, k: Tensor, v: Tensor) -> Result<LayerKv> {
        parts.push((k, v));
        if parts.len() > MAX_SEGMENTS {
            // The first segment stays as it is: it is the one other states share (a cached schema prefix).
            let (ks, vs): (Vec<Tensor>, Vec<Tensor>) = parts.drain(1..).unzip();
            parts.push((Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?));
        }
        let mut base_len = 0;
        for (k, _) in &parts {
            base_len += k.dims4()?.2;
        }
        Ok(LayerKv { segments: parts, base_len, tail_k: Vec::new(), tail_v: Vec::new() })
    }

    /// K and V as `(1, n_kv, len, d)` tensors, every stored position in one pair (a copy unless there is one
    /// segment and no tail). `None` for a layer that has seen nothing.
    #[cfg(test)]
    pub(crate) fn full(&self, n_kv: usize, d: usize, device: &Device) -> Result<Option<(Tensor, Tensor)>> {
        let mut parts = self.parts(n_kv, d, device)?;
        Ok(match parts.len() {
            0 => None,
            1 => parts.pop(),
            _ => {
                let (ks, vs): (Vec<Tensor>, Vec<Tensor>) = parts.into_iter().unzip();
                Some((Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?))
            }
        })
    }

    /// Segments of the base (shared between the states that continue one prompt pass).
    #[cfg(test)]
    pub(crate) fn segments(&self) -> &[(Tensor, Tensor)] {
        &self.segments
    }

    /// Positions stored in the tail.
    pub(crate) fn tail_len(&self, n_kv: usize, d: usize) -> usize {
        self.tail_k.len() / (n_kv * d)
    }

    /// Append one position's K and V (each `n_kv × d`).
    pub(crate) fn push(&mut self, k: &[f32], v: &[f32]) {
        self.tail_k.extend_from_slice(k);
        self.tail_v.extend_from_slice(v);
    }

    /// Drop tail positions past `positions` (undo of [`LayerKv::push`]).
    pub(crate) fn truncate_tail(&mut self, positions: usize, n_kv: usize, d: usize) {
        self.tail_k.truncate(positions * n_kv * d);
        self.tail_v.truncate(positions * n_kv * d);
    }

    /// Run `f` on a plain-slice view of every stored position.
    #[cfg(test)]
    pub(crate) fn with_view<R>(&self, n_kv: usize, d: usize, f: impl FnOnce(&KvView) -> R) -> Result<R> {
        LayerKv::with_views(&[self], n_kv, d, |v| f(&v[0]))
    }

    /// Run `f` on plain-slice views of every stored position of several layers at once (`views[i]` of
    /// `layers[i]`). A segment several layers share (the same tensor) is locked and viewed once.
    pub(crate) fn with_views<R>(
        layers: &[&LayerKv],
        n_kv: usize,
        d: usize,
        f: impl FnOnce(&[KvView]) -> R,
    ) -> Result<R> {
        // Every distinct K or V tensor once, and per layer its segments as (K, V, positions) indices into them.
        let mut tensors: Vec<&Tensor> = Vec::new();
        fn at<'t>(t: &'t Tensor, tensors: &mut Vec<&'t Tensor>) -> usize {
            match tensors.iter().position(|x| x.id() == t.id()) {
                Some(i) => i,
                None => {
                    tensors.push(t);
                    tensors.len() - 1
                }
            }
        }
        let mut parts = Vec::with_capacity(layers.len());
        for l in layers {
            let mut segs = Vec::with_capacity(l.segments.len());
            for (k, v) in &l.segments {
                segs.push((at(k, &mut tensors), at(v, &mut tensors), k.dims4()?.2));
            }
            parts.push(segs);
        }
        let storages = tensors.iter().map(|t| floats(t)).collect::<Result<Vec<_>>>()?;
        let floats_of = storages.iter().map(|s| slice(s)).collect::<Result<Vec<_>>>()?;
        let segments: Vec<Vec<KvSegment>> = parts
            .iter()
            .map(|segs| {
                segs.iter()
                    .map(|&(k, v, len)| KvSegment {
                        k: &floats_of[k][..len * n_kv * d],
                        v: &floats_of[v][..len * n_kv * d],
                        len,
                    })
                    .collect()
            })
            .collect();
        let views: Vec<KvView> = layers
            .iter()
            .zip(&segments)
            .map(|(l, s)| KvView { base: s, base_len: l.base_len, tail_k: &l.tail_k, tail_v: &l.tail_v, n_kv, d })
            .collect();
        Ok(f(&views))
    }

    /// Bytes held, a segment shared with other states counted in each.
    fn bytes(&self) -> usize {
        let base: usize = self.segments.iter().map(|(k, v)| (k.elem_count() + v.elem_count()) * 4).sum();
        base + (self.tail_k.len() + self.tail_v.len()) * 4
    }
}

/// The attention state after some tokens (see the module documentation).
#[derive(Clone, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    pub(crate) len: usize,
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
        KvCache { layers: vec![LayerKv::from_base(z.clone(), z).expect("4 dims")], len: tokens }
    }

    /// Forget every position from `len` on (a rejected draft). Only positions added by the decoding step (the
    /// tail) can be forgotten; `len` below the prompt pass's base, or past the end, is a bug.
    pub(crate) fn rewind(&mut self, len: usize) {
        assert!(len <= self.len, "rewind to {len} past the end ({})", self.len);
        for l in &mut self.layers {
            assert!(len >= l.base_len, "rewind to {len} into the prompt's base ({})", l.base_len);
            let tail = self.len - l.base_len;
            if let Some(per) = l.tail_k.len().checked_div(tail) {
                l.tail_k.truncate((len - l.base_len) * per);
                l.tail_v.truncate((len - l.base_len) * per);
            }
        }
        self.len = len;
    }

    /// Make this state equal to `src`, a continuation of it: the same base and this state's positions, then more
    /// in the tail. Only the positions this state lacks are copied (a candidate row whose twin ran the pass for
    /// both). Panics when `src` is not such a continuation (a bug of the caller).
    pub(crate) fn catch_up(&mut self, src: &KvCache) {
        assert!(src.len >= self.len, "catch up to {} positions from {}", src.len, self.len);
        assert_eq!(self.layers.len(), src.layers.len(), "states of different models");
        for (l, s) in self.layers.iter_mut().zip(&src.layers) {
            assert_eq!(l.base_len, s.base_len, "states with different bases");
            assert_eq!(l.segments.len(), s.segments.len(), "states with different bases");
            assert!(l.tail_k.len() <= s.tail_k.len(), "the source's tail is shorter");
            l.tail_k.extend_from_slice(&s.tail_k[l.tail_k.len()..]);
            l.tail_v.extend_from_slice(&s.tail_v[l.tail_v.len()..]);
        }
        self.len = src.len;
    }

    /// Segments in each layer's base (every layer has as many).
    pub fn segment_count(&self) -> usize {
        self.layers.first().map_or(0, |l| l.segments.len())
    }

    /// Store each layer's segments from index `first` on as one segment (a copy of those positions only; the
    /// segments before `first`, shared with other states, stay as they are). A prompt pass run in chunks adds a
    /// segment per chunk: merged, a long cached schema prefix is one segment, so the requests continuing it stay
    /// under the fold ([`MAX_SEGMENTS`], which keeps only the first segment) and share all of it, not just its
    /// first chunk.
    pub fn merge_segments_from(&mut self, first: usize) -> Result<()> {
        for l in &mut self.layers {
            if l.segments.len() > first + 1 {
                let (ks, vs): (Vec<Tensor>, Vec<Tensor>) = l.segments.drain(first..).unzip();
                l.segments.push((Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?));
            }
        }
        Ok(())
    }

    /// Memory held by the state, in bytes (a base shared with other states is counted in each).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::bytes).sum()
    }

    /// Bytes of this state's base that `other` holds too (the same segments, stored once): all of a cached
    /// prefix's bytes for a state that continued it.
    pub fn bytes_shared_with(&self, other: &KvCache) -> usize {
        let seg_bytes = |(k, v): &(Tensor, Tensor)| (k.elem_count() + v.elem_count()) * 4;
        self.layers
            .iter()
            .zip(&other.layers)
            .map(|(a, b)| {
                let theirs: Vec<_> = b.segments.iter().map(|(k, _)| k.id()).collect();
                a.segments.iter().filter(|(k, _)| theirs.contains(&k.id())).map(seg_bytes).sum::<usize>()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment of `len` positions: K counts up from `from` (head-major, as stored), V is K negated.
    fn segment(n_kv: usize, d: usize, from: f32, len: usize) -> (Tensor, Tensor) {
        let k = Tensor::arange(from, from + (n_kv * len * d) as f32, &Device::Cpu)
            .unwrap()
            .reshape((1, n_kv, len, d))
            .unwrap();
        (k.clone(), (k * -1.0).unwrap())
    }

    #[test]
    fn a_tail_folds_into_the_base_in_position_order() {
        let (n_kv, d) = (2, 3);
        // Base: 2 positions, laid out (n_kv, len, d): head 0 = 0..6, head 1 = 6..12.
        let base = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((1, n_kv, 2, d)).unwrap();
        let mut l = LayerKv::from_base(base.clone(), (base * 10.0).unwrap()).unwrap();
        // Two decoded positions, token-major: (head 0, head 1) each.
        l.push(&[100.0, 101.0, 102.0, 200.0, 201.0, 202.0], &[0.0; 6]);
        l.push(&[110.0, 111.0, 112.0, 210.0, 211.0, 212.0], &[0.0; 6]);
        assert_eq!(l.tail_len(n_kv, d), 2);
        let (k, _) = l.full(n_kv, d, &Device::Cpu).unwrap().unwrap();
        let want = [
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 100.0, 101.0, 102.0, 110.0, 111.0, 112.0, // head 0
            6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 200.0, 201.0, 202.0, 210.0, 211.0, 212.0, // head 1
        ];
        assert_eq!(k.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        // The view reads the same rows without folding.
        l.with_view(n_kv, d, |v| {
            assert_eq!(v.k_row(1, 1), &[9.0, 10.0, 11.0]);
            assert_eq!(v.k_row(1, 3), &[210.0, 211.0, 212.0]);
            assert_eq!(v.k_row(0, 2), &[100.0, 101.0, 102.0]);
        })
        .unwrap();
        l.truncate_tail(1, n_kv, d);
        assert_eq!(l.tail_len(n_kv, d), 1);
    }

    #[test]
    fn cloning_shares_the_base_and_copies_only_the_tail() {
        let base = Tensor::zeros((1, 1, 4, 2), DType::F32, &Device::Cpu).unwrap();
        let a = KvCache { layers: vec![LayerKv::from_base(base.clone(), base).unwrap()], len: 4 };
        let mut b = a.clone();
        b.layers[0].push(&[1.0, 2.0], &[3.0, 4.0]);
        b.len += 1;
        assert_eq!(a.layers[0].tail_len(1, 2), 0, "a continuation never changes the state it started from");
        assert_eq!((a.bytes(), b.bytes()), (64, 80));
    }

    #[test]
    fn a_prompt_pass_adds_a_segment_and_shares_the_ones_before() {
        let (n_kv, d) = (1, 2);
        let seg = |from: f32, len: usize| segment(n_kv, d, from, len);
        let (k0, v0) = seg(0.0, 3);
        let prefix = KvCache { layers: vec![LayerKv::from_base(k0, v0).unwrap()], len: 3 };
        // A continuation: one decoded position in the tail, then a prompt pass of two more positions.
        let mut cont = prefix.clone();
        cont.layers[0].push(&[100.0, 101.0], &[-100.0, -101.0]);
        cont.len += 1;
        let parts = cont.layers[0].parts(n_kv, d, &Device::Cpu).unwrap();
        assert_eq!(parts.len(), 2, "the segment, then the tail as a pair of its own");
        let (k2, v2) = seg(200.0, 2);
        cont.layers[0] = LayerKv::extended(parts, k2, v2).unwrap();
        cont.len += 2;
        let l = &cont.layers[0];
        assert_eq!((l.segments().len(), l.base_len, l.tail_len(n_kv, d)), (3, 6, 0));
        assert_eq!(cont.bytes_shared_with(&prefix), prefix.bytes(), "the prefix is stored once");
        assert_eq!(prefix.bytes_shared_with(&cont), prefix.bytes());
        assert_eq!(cont.bytes(), 6 * 2 * d * 4);
        // Every position reads back in order, whichever segment holds it.
        l.with_view(n_kv, d, |v| {
            let rows: Vec<f32> = (0..6).flat_map(|j| v.k_row(0, j).to_vec()).collect();
            assert_eq!(rows, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 100.0, 101.0, 200.0, 201.0, 202.0, 203.0]);
            assert_eq!(v.v_row(0, 3), &[-100.0, -101.0]);
        })
        .unwrap();
        let (k, _) = l.full(n_kv, d, &Device::Cpu).unwrap().unwrap();
        assert_eq!(k.flatten_all().unwrap().to_vec1::<f32>().unwrap()[6..8], [100.0, 101.0]);
        // Past MAX_SEGMENTS, one pass folds all segments but the first into one, with the same rows.
        let mut many = LayerKv::default();
        for i in 0..=MAX_SEGMENTS {
            let (k, v) = seg(10.0 * i as f32, 1);
            many = LayerKv::extended(many.parts(n_kv, d, &Device::Cpu).unwrap(), k, v).unwrap();
        }
        assert_eq!((many.segments().len(), many.base_len), (2, MAX_SEGMENTS + 1));
        assert_eq!(many.segments()[0].0.dims4().unwrap().2, 1, "the first segment kept as it was");
        many.with_view(n_kv, d, |v| assert_eq!(v.k_row(0, MAX_SEGMENTS), &[80.0, 81.0])).unwrap();
    }

    #[test]
    fn merging_a_chunked_pass_keeps_its_rows_and_the_shared_segments() {
        let (n_kv, d) = (2, 2);
        let seg = |from: f32, len: usize| segment(n_kv, d, from, len);
        let (k0, v0) = seg(0.0, 2);
        let prefix = KvCache { layers: vec![LayerKv::from_base(k0, v0).unwrap()], len: 2 };
        // A pass of three chunks (1, 3 and 2 positions) continuing the prefix.
        let mut kv = prefix.clone();
        for (from, len) in [(100.0, 1), (200.0, 3), (300.0, 2)] {
            let (k, v) = seg(from, len);
            kv.layers[0] = LayerKv::extended(kv.layers[0].parts(n_kv, d, &Device::Cpu).unwrap(), k, v).unwrap();
            kv.len += len;
        }
        let rows = |kv: &KvCache| {
            kv.layers[0]
                .with_view(n_kv, d, |v| {
                    let mut all = Vec::new();
                    for g in 0..n_kv {
                        for j in 0..kv.len {
                            all.extend_from_slice(v.k_row(g, j));
                            all.extend_from_slice(v.v_row(g, j));
                        }
                    }
                    all
                })
                .unwrap()
        };
        let before = rows(&kv);
        assert_eq!(kv.segment_count(), 4);
        kv.merge_segments_from(prefix.segment_count()).unwrap();
        assert_eq!(kv.segment_count(), 2, "the prefix, then the pass as one segment");
        assert_eq!(kv.layers[0].base_len, 8);
        assert_eq!(rows(&kv), before, "every row of every head in the same place");
        assert_eq!(kv.bytes_shared_with(&prefix), prefix.bytes(), "the prefix still shared, not copied");
        // Nothing to merge: one segment from `first` on, or none.
        kv.merge_segments_from(1).unwrap();
        kv.merge_segments_from(5).unwrap();
        assert_eq!(kv.segment_count(), 2);
        assert_eq!(rows(&kv), before);
    }

    #[test]
    fn catching_up_copies_only_the_missing_positions() {
        let base = Tensor::zeros((1, 1, 4, 2), DType::F32, &Device::Cpu).unwrap();
        let mut a = KvCache { layers: vec![LayerKv::from_base(base.clone(), base).unwrap()], len: 4 };
        a.layers[0].push(&[1.0, 2.0], &[3.0, 4.0]);
        a.len += 1;
        let mut b = a.clone();
        for p in [5.0, 7.0] {
            a.layers[0].push(&[p, p + 1.0], &[-p, -p - 1.0]);
            a.len += 1;
        }
        b.catch_up(&a);
        assert_eq!(b.len(), 7);
        assert_eq!(b.layers[0].tail_k, a.layers[0].tail_k);
        assert_eq!(b.layers[0].tail_v, [3.0, 4.0, -5.0, -6.0, -7.0, -8.0]);
        b.catch_up(&a);
        assert_eq!(b.layers[0].tail_k.len(), 6, "already equal: nothing copied");
        let behind = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut c = a.clone();
            c.layers[0].push(&[0.0, 0.0], &[0.0, 0.0]);
            c.len += 1;
            c.catch_up(&b)
        }));
        assert!(behind.is_err(), "a source behind the state is a bug");
    }

    #[test]
    fn rewinding_forgets_decoded_positions_only() {
        let base = Tensor::zeros((1, 1, 4, 2), DType::F32, &Device::Cpu).unwrap();
        let mut c = KvCache { layers: vec![LayerKv::from_base(base.clone(), base).unwrap(); 2], len: 4 };
        for p in 0..3 {
            for l in &mut c.layers {
                l.push(&[p as f32, 1.0], &[2.0, 3.0]);
            }
            c.len += 1;
        }
        c.rewind(5);
        assert_eq!((c.len(), c.layers[0].tail_len(1, 2), c.layers[1].tail_len(1, 2)), (5, 1, 1));
        c.layers[0].with_view(1, 2, |v| assert_eq!(v.k_row(0, 4), &[0.0, 1.0])).unwrap();
        c.rewind(5);
        c.rewind(4);
        assert_eq!((c.len(), c.bytes()), (4, 128));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || c.rewind(3)));
        assert!(r.is_err(), "the prompt's positions cannot be rewound");
    }
}
