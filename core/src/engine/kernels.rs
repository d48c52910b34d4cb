//! Quantized matrix × vector products for decoding, over the weights' own GGUF blocks.
//!
//! Why our own: decoding one token reads every weight once, so its speed is memory bandwidth divided by bytes per
//! weight. Measured on the 2-core EPYC this project runs on (perf, `examples/bench_engine`), candle 0.11.1 decodes
//! the default Q4_K_M model at 20 tok/s where llama.cpp does 35: its x86 path repacks Q4_K into tiles that carry
//! f32 scales (6 bits a weight instead of 4.5, a third more bytes streamed per token), and its Q6_K dot product,
//! kept compact, runs at ~17 GB/s against ~35 GB/s for a streaming kernel. The kernels here read the compact
//! blocks directly (Q4_K 144 bytes, Q6_K 210 bytes per 256 weights), multiply with integer dot products (AVX-512
//! VNNI `vpdpbusd` where the CPU has it, the same sums from AVX2 `maddubs` + `madd` elsewhere) against the
//! activation quantized to 8 bits per 256-value block (the same Q8_K activation quantization candle and ggml use),
//! laid out so that each 32-bit lane sums one weight sub-block (module `lanes`): a block's scales are then applied once
//! per block and activation row, which is what lets several rows share a pass cheaply.
//!
//! Used for one row of activations (decode, the final projection) and a few (candidates, speculative
//! verification); a prompt's hundreds go through [`crate::engine::prompt_kernels`] where the CPU has AVX-512 VNNI,
//! else through [`gemm_many`] here (which then keeps each group of weight rows in cache while the prompt's rows go
//! past). Either way the GGUF blocks are read in place: candle's tiled matmul, which prompts used before, keeps a
//! second, unpacked copy of every weight (1.33–2.2× its size).
//!
//! Every kernel has a scalar twin written straight from the block layout; tests hold the two together and hold
//! both to candle's dequantization.

use half::f16;

/// Weights per super-block for the k-quants.
pub const QK_K: usize = 256;
/// Bytes of one Q4_K block: d (f16), dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit quants.
pub const Q4K_BYTES: usize = 144;
/// Bytes of one Q6_K block: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, d (f16).
pub const Q6K_BYTES: usize = 210;

/// Weight formats with a kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Q4K,
    Q6K,
    /// Q4_K in the 16-row layout of [`super::rows16`] (the same bytes, 16 rows interleaved; made at load as
    /// [`super::rows16::enabled`] says). Functions of one row refuse it: a row is read back with
    /// [`super::rows16::block`].
    Q4K16,
    /// Q6_K in the 16-row layout, as `Q4K16`.
    Q6K16,
}

impl Kind {
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Kind> {
        use candle_core::quantized::GgmlDType;
        match dtype {
            GgmlDType::Q4K => Some(Kind::Q4K),
            GgmlDType::Q6K => Some(Kind::Q6K),
            _ => None,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            Kind::Q4K | Kind::Q4K16 => Q4K_BYTES,
            Kind::Q6K | Kind::Q6K16 => Q6K_BYTES,
        }
    }

    /// True for the 16-row layouts of [`super::rows16`] (a row's blocks are not contiguous there).
    pub fn rows16(self) -> bool {
        matches!(self, Kind::Q4K16 | Kind::Q6K16)
    }
}

/// One block of 256 activations quantized to int8: `x ≈ d * qs`, with the sums of each 16 consecutive `qs`.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub struct Q8K {
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
    pub d: f32,
}

impl Default for Q8K {
    fn default() -> Q8K {
        Q8K { qs: [0; QK_K], bsums: [0; QK_K / 16], d: 0.0 }
    }
}

/// One block of [`Q8K`] activations arranged for the sub-block-lane kernels (module `lanes`): its 256 values in the
/// order that puts, in every 32-bit lane of the kernels' registers, four values of one weight sub-block, and its
/// 16-value sums in the order of those lanes (for Q4_K's mins and Q6_K's +32 offset). Built once per
/// activation row and pass ([`arrange`]), then read by every weight row of the pass.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub struct Q8KLanes {
    pub qs: [i8; QK_K],
    pub bsums_q4k: [i16; 16],
    pub bsums_q6k: [i16; 16],
    pub d: f32,
}

impl Default for Q8KLanes {
    fn default() -> Q8KLanes {
        Q8KLanes { qs: [0; QK_K], bsums_q4k: [0; 16], bsums_q6k: [0; 16], d: 0.0 }
    }
}

/// Where value `v` of a block goes in [`Q8KLanes::qs`]. Both weight formats load a block's quants as 8 registers
/// of 32 values, register r holding values 32r..32r+32 (Q4_K: the low, then the high nibbles of each 32 bytes;
/// Q6_K: the four quarters of each 128-value half). The kernels transpose each group g of 4 registers (values
/// 128g..128g+128) as 4×4 blocks of 32-bit words within each 128-bit half, so transposed register t of group g
/// holds, in half h (bytes 16h..16h+16) and word p, the 4 values 128g + 32p + 16h + 4t .. +4. Word (h, p) of a
/// group therefore always meets the same 16 consecutive values, 128g + 32p + 16h .. +16: one Q6_K sub-block (16
/// values) or half of one Q4_K sub-block (32 values), and the activations follow the same path.
#[inline(always)]
fn lane_slot(v: usize) -> usize {
    let (g, p, h, t, b) = (v / 128, (v / 32) % 4, (v / 16) % 2, (v / 4) % 4, v % 4);
    32 * (4 * g + t) + 16 * h + 4 * p + b
}

/// [`Q8KLanes`] of one activation block.
pub fn arrange(y: &Q8K) -> Q8KLanes {
    let mut o = Q8KLanes { d: y.d, ..Q8KLanes::default() };
    for (v, &q) in y.qs.iter().enumerate() {
        o.qs[lane_slot(v)] = q;
    }
    // The 16 values of word (h, p) in group g have sum bsums[8g + 2p + h]. Q4_K packs the two groups' words
    // into 16-bit lanes as [g0 h0 p0..3, g1 h0 p0..3, g0 h1 p0..3, g1 h1 p0..3]; Q6_K pairs the two groups'
    // sums of a word in its 32-bit lane (4h + p): [g0, g1] (for `madd` with the weights' [-32·sc0, -32·sc1]).
    for g in 0..2 {
        for h in 0..2 {
            for p in 0..4 {
                let s = y.bsums[8 * g + 2 * p + h];
                o.bsums_q4k[8 * h + 4 * g + p] = s;
                o.bsums_q6k[2 * (4 * h + p) + g] = s;
            }
        }
    }
    o
}

/// Quantize `x` (a multiple of 256 long) block by block: the value of largest magnitude maps to ∓127 (ggml's Q8_K
/// rule, so results match what candle computes for the same activations up to summation order).
pub fn quantize_q8k(x: &[f32], out: &mut Vec<Q8K>) {
    assert_eq!(x.len() % QK_K, 0, "activation length {} is not a multiple of {QK_K}", x.len());
    out.resize(x.len() / QK_K, Q8K::default());
    quantize_q8k_into(x, out);
}

/// [`quantize_q8k`] into blocks already allocated: `out` holds exactly `x.len() / 256` blocks.
fn quantize_q8k_into(x: &[f32], out: &mut [Q8K]) {
    assert_eq!(x.len(), out.len() * QK_K, "{} activations for {} blocks", x.len(), out.len());
    for (xs, slot) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let mut b = Q8K::default();
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xs {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax != 0.0 {
            let iscale = -127.0 / max;
            for (q, &v) in b.qs.iter_mut().zip(xs) {
                *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
            }
            for (s, g) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
                *s = g.iter().map(|&q| q as i16).sum();
            }
            b.d = 1.0 / iscale;
        }
        *slot = b;
    }
}

/// Each of `xs` quantized into the matching row of `act` (resized to `xs[r].len() / 256` blocks) and, unless
/// `lanes` is empty, arranged for the decode kernels into the matching row of `lanes`. A prompt's rows (hundreds ×
/// up to 8,960 values per product) are shared out over candle's thread pool; a few rows (decode, candidates) are
/// done on the calling thread, where handing out would cost more than it saves.
pub(crate) fn quantize_rows(xs: &[&[f32]], act: &mut [Vec<Q8K>], lanes: &mut [Vec<Q8KLanes>]) {
    assert!(lanes.is_empty() || lanes.len() >= xs.len(), "{} rows to arrange into {}", xs.len(), lanes.len());
    for (a, x) in act.iter_mut().zip(xs) {
        assert_eq!(x.len() % QK_K, 0, "activation length {} is not a multiple of {QK_K}", x.len());
        a.resize(x.len() / QK_K, Q8K::default());
    }
    let one = |x: &[f32], a: &mut Vec<Q8K>, l: Option<&mut Vec<Q8KLanes>>| {
        quantize_q8k_into(x, a);
        if let Some(l) = l {
            l.clear();
            l.extend(a.iter().map(arrange));
        }
    };
    if xs.len() <= MAX_ROWS_AT_ONCE {
        let mut lanes = lanes.iter_mut();
        for (a, x) in act.iter_mut().zip(xs) {
            one(x, a, lanes.next());
        }
        return;
    }
    struct Rows(*mut Vec<Q8K>, *mut Vec<Q8KLanes>, bool);
    // SAFETY: each pool work item r writes row r of `act` (and of `lanes`) only (`execute_chunked` hands every
    // index to exactly one worker), no row is read while the pool runs, and both outlive the call (it returns
    // when all are done).
    unsafe impl Sync for Rows {}
    let rows = Rows(act.as_mut_ptr(), lanes.as_mut_ptr(), !lanes.is_empty());
    let rows = &rows;
    candle_core::utils::barrier_pool().execute_chunked(xs.len(), |range| {
        for r in range {
            // SAFETY: r < xs.len() <= act.len() (and <= lanes.len() when arranging, asserted), and row r belongs
            // to this work item alone (see `Rows`).
            let (a, l) = unsafe { (&mut *rows.0.add(r), rows.2.then(|| &mut *rows.1.add(r))) };
            one(xs[r], a, l);
        }
    });
}

pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// The 8 scales and 8 mins (6 bits each) packed into a Q4_K block's 12 scale bytes, unpacked four at a time:
/// bytes 0..8 of the result are the scales, 8..16 the mins. Sub-blocks 0-3 keep their 6 low bits in bytes 0-3
/// (scales) and 4-7 (mins); sub-blocks 4-7 have their low 4 bits in the nibbles of bytes 8-11 and their top 2
/// bits in the spare top bits of bytes 0-3 (scales) and 4-7 (mins).
#[inline(always)]
pub(crate) fn q4k_scales_mins(s: &[u8]) -> [u8; 16] {
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (s0, s1, s2) = (w(0), w(4), w(8));
    let sc_lo = s0 & 0x3f3f_3f3f;
    let mn_lo = s1 & 0x3f3f_3f3f;
    let sc_hi = (s2 & 0x0f0f_0f0f) | (((s0 >> 6) & 0x0303_0303) << 4);
    let mn_hi = ((s2 >> 4) & 0x0f0f_0f0f) | (((s1 >> 6) & 0x0303_0303) << 4);
    let mut out = [0u8; 16];
    for (i, v) in [sc_lo, sc_hi, mn_lo, mn_hi].into_iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// Dot product of one Q4_K row with quantized activations, scalar.
pub fn dot_q4k_scalar(row: &[u8], a: &[Q8K]) -> f32 {
    let mut sum = 0f32;
    for (b, y) in row.chunks_exact(Q4K_BYTES).zip(a) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let sm = q4k_scales_mins(&b[4..16]);
        let (sc, mn) = (&sm[..8], &sm[8..]);
        let qs = &b[16..];
        let mut isum = 0i32;
        for j in 0..4 {
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                let q = qs[32 * j + l];
                lo += (q & 0xF) as i32 * y.qs[64 * j + l] as i32;
                hi += (q >> 4) as i32 * y.qs[64 * j + 32 + l] as i32;
            }
            isum += sc[2 * j] as i32 * lo + sc[2 * j + 1] as i32 * hi;
        }
        let msum: i32 = (0..8).map(|j| mn[j] as i32 * (y.bsums[2 * j] as i32 + y.bsums[2 * j + 1] as i32)).sum();
        sum += y.d * (d * isum as f32 - dmin * msum as f32);
    }
    sum
}

/// The stored (+32) 6-bit quants at positions l, l+32, l+64, l+96 of one 128-value half of a Q6_K block, whose low
/// 4 bits are in `ql` (64 bytes: positions 0-31 and 64-95 in the nibbles of bytes 0-31, 32-63 and 96-127 in bytes
/// 32-63) and high 2 bits in `qh` (32 bytes, four positions per byte).
#[inline(always)]
pub(crate) fn q6k_quants(ql: &[u8], qh: &[u8], l: usize) -> [u8; 4] {
    [
        (ql[l] & 0xF) | ((qh[l] & 3) << 4),
        (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
        (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
        (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
    ]
}

/// Dot product of one Q6_K row with quantized activations, scalar.
pub fn dot_q6k_scalar(row: &[u8], a: &[Q8K]) -> f32 {
    let mut sum = 0f32;
    for (b, y) in row.chunks_exact(Q6K_BYTES).zip(a) {
        let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], f16_at(b, 208));
        let mut isum = 0i32;
        for h in 0..2 {
            let (ql, qh) = (&ql[64 * h..], &qh[32 * h..]);
            let mut part = [0i32; 8]; // per sub-block of 16 in this half
            for l in 0..32 {
                for (k, q) in q6k_quants(ql, qh, l).into_iter().enumerate() {
                    part[2 * k + l / 16] += (q as i32 - 32) * y.qs[128 * h + 32 * k + l] as i32;
                }
            }
            for (k, p) in part.iter().enumerate() {
                isum += sc[8 * h + k] as i8 as i32 * p;
            }
        }
        sum += y.d * d * isum as f32;
    }
    sum
}

/// Dequantize one row of `kind` blocks into `out` (`out.len()` = 256 × blocks): the embedding lookup reads only
/// the rows of the prompt's tokens instead of keeping the whole table in f32 (0.9 GB for the default model).
pub fn dequantize_row(kind: Kind, row: &[u8], out: &mut [f32]) {
    assert!(!kind.rows16(), "a row of the 16-row layout is not contiguous: read it with rows16::block");
    assert_eq!(out.len() % QK_K, 0);
    assert!(row.len() >= out.len() / QK_K * kind.block_bytes());
    for (b, y) in row.chunks_exact(kind.block_bytes()).zip(out.chunks_exact_mut(QK_K)) {
        match kind {
            Kind::Q4K | Kind::Q4K16 => {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let sm = q4k_scales_mins(&b[4..16]);
                let qs = &b[16..];
                for j in 0..4 {
                    let (d1, m1) = (d * sm[2 * j] as f32, dmin * sm[8 + 2 * j] as f32);
                    let (d2, m2) = (d * sm[2 * j + 1] as f32, dmin * sm[8 + 2 * j + 1] as f32);
                    for l in 0..32 {
                        let q = qs[32 * j + l];
                        y[64 * j + l] = d1 * (q & 0xF) as f32 - m1;
                        y[64 * j + 32 + l] = d2 * (q >> 4) as f32 - m2;
                    }
                }
            }
            Kind::Q6K | Kind::Q6K16 => {
                let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], f16_at(b, 208));
                for h in 0..2 {
                    let (ql, qh) = (&ql[64 * h..], &qh[32 * h..]);
                    for l in 0..32 {
                        for (k, q) in q6k_quants(ql, qh, l).into_iter().enumerate() {
                            let s = sc[8 * h + 2 * k + l / 16] as i8 as f32;
                            y[128 * h + 32 * k + l] = d * s * (q as i32 - 32) as f32;
                        }
                    }
                }
            }
        }
    }
}

/// True when the AVX2 kernels can run on this CPU.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The decode kernels: one weight row against `R` activation rows at once, lanes by sub-block.
///
/// Per block, the weight quants are unpacked once into 8 registers and transposed (see [`lane_slot`]) so that
/// each 32-bit lane meets values of one sub-block only; then, per activation row, 8 `vpdpbusd` (4 u8 × i8
/// products into each 32-bit lane) sum a whole block into two registers whose lanes are sub-block sums, and the
/// scales are applied to those sums once per block — not once per 32 values, as a kernel whose lanes follow the
/// block's own order must (`maddubs` + `madd` by the scale for every 32 values). On the 2-core EPYC that halves
/// the instructions per row and block, which is what several rows in a pass pay for (see context.md, session
/// 13). Each row's integer sums are exact and its float steps are the same whatever `R` is, so every result is
/// bit-identical to the one-row result. The AVX2 variant forms the same integer sums from `maddubs`, adding its
/// 16-bit results before widening them (exact: the bounds are at `q4k_packed_avx2` and `q6k_scaled_avx2`), so it
/// computes the same bits as the VNNI one with fewer multiplies than widening every `maddubs` (the multiplies were
/// most of a prompt's pass on the Zen 3 measured; context.md, session 24).
///
/// A block is unpacked (`Unpacked`) right before use when weight rows stream past a few activation rows
/// (decoding), and, on CPUs without AVX-512 VNNI, once per prompt pass into a buffer when many groups of
/// activation rows reuse the same weight rows (`unpack_rows`); the products are the same macros either way. (With
/// VNNI, prompts take the prompt kernels, and decode passes of many rows measured faster unpacking in registers
/// per group than through the buffer: `gemm_many`.)
#[cfg(target_arch = "x86_64")]
mod lanes {
    use super::{f16_at, q4k_scales_mins, Q8KLanes, Q4K_BYTES, Q6K_BYTES};
    pub(super) use std::arch::x86_64::__m256;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The value of a product whose sums the kernels left in `v`: eight lane sums, added here — except in the
    /// `totals` variant, which keeps one float in lane 0 (`apply_q4k_totals`, `apply_q6k_totals`).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn finish(totals: bool, v: __m256) -> f32 {
        if totals {
            _mm256_cvtss_f32(v)
        } else {
            // SAFETY: AVX2 by the caller, as `hsum` needs.
            unsafe { hsum(v) }
        }
    }

    /// 4×4 transpose of 32-bit words within each 128-bit half: word p of output t = word t of input p.
    macro_rules! transpose4 {
        ($r0:expr, $r1:expr, $r2:expr, $r3:expr) => {{
            let t0 = _mm256_unpacklo_epi32($r0, $r1);
            let t1 = _mm256_unpackhi_epi32($r0, $r1);
            let t2 = _mm256_unpacklo_epi32($r2, $r3);
            let t3 = _mm256_unpackhi_epi32($r2, $r3);
            [
                _mm256_unpacklo_epi64(t0, t2),
                _mm256_unpackhi_epi64(t0, t2),
                _mm256_unpacklo_epi64(t1, t3),
                _mm256_unpackhi_epi64(t1, t3),
            ]
        }};
    }
    /// VNNI: the two group sums of activation quants `$yq` against a block's transposed quants `$w0` (values
    /// 0-127) and `$w1` (128-255), each 32-bit lane (h, p) (as in [`super::lane_slot`]) the exact sum of its 16
    /// products.
    macro_rules! dpbusd_sums {
        ($w0:expr, $w1:expr, $yq:expr) => {{
            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for t in 0..4 {
                s0 = _mm256_dpbusd_epi32(s0, $w0[t], _mm256_load_si256($yq.add(t)));
                s1 = _mm256_dpbusd_epi32(s1, $w1[t], _mm256_load_si256($yq.add(4 + t)));
            }
            (s0, s1)
        }};
    }
    /// AVX2: one group's 4 `maddubs` (transposed quants `$w` against activation registers `$o..$o + 4` of `$yq`)
    /// added two by two in 16 bits: (t0 + t1, t2 + t3). Each `maddubs` lane is at most 2 · 63 · 127 = 16,002
    /// (Q6_K's stored +32 quants; 3,810 for Q4_K), so nothing saturates or wraps.
    macro_rules! maddubs_pairs {
        ($w:expr, $yq:expr, $o:expr) => {
            (
                _mm256_add_epi16(
                    _mm256_maddubs_epi16($w[0], _mm256_load_si256($yq.add($o))),
                    _mm256_maddubs_epi16($w[1], _mm256_load_si256($yq.add($o + 1))),
                ),
                _mm256_add_epi16(
                    _mm256_maddubs_epi16($w[2], _mm256_load_si256($yq.add($o + 2))),
                    _mm256_maddubs_epi16($w[3], _mm256_load_si256($yq.add($o + 3))),
                ),
            )
        };
    }
    /// Q6_K's two group sums of one activation block against a block's transposed quants `w0` (values 0-127) and
    /// `w1` (128-255), each 32-bit lane (h, p) (as in [`super::lane_slot`]) times its scale in that group (`sc0`,
    /// `sc1`: see [`Unpacked`]) and the two added: exact integers either way. VNNI: `vpdpbusd` sums, then `mullo`
    /// by the scales (`sc >> 16`). AVX2: two `maddubs` results added in 16 bits (a lane of one is at most 2 · 63 ·
    /// 127 = 16,002 with Q6_K's stored +32 quants: two fit, nothing saturates), then `madd` by the scale given
    /// twice — one multiply that widens and scales, where widening by ones and then `mullo` took three.
    macro_rules! q6k_scaled_vnni {
        ($w0:expr, $w1:expr, $y:expr, $sc0:expr, $sc1:expr) => {{
            let (s0, s1) = dpbusd_sums!($w0, $w1, $y.qs.as_ptr() as *const __m256i);
            _mm256_add_epi32(
                _mm256_mullo_epi32(s0, _mm256_srai_epi32($sc0, 16)),
                _mm256_mullo_epi32(s1, _mm256_srai_epi32($sc1, 16)),
            )
        }};
    }
    macro_rules! q6k_scaled_avx2 {
        ($w0:expr, $w1:expr, $y:expr, $sc0:expr, $sc1:expr) => {{
            let yq = $y.qs.as_ptr() as *const __m256i;
            macro_rules! group {
                ($w:expr, $o:expr, $sc:expr) => {{
                    let (a, b) = maddubs_pairs!($w, yq, $o);
                    _mm256_add_epi32(_mm256_madd_epi16(a, $sc), _mm256_madd_epi16(b, $sc))
                }};
            }
            _mm256_add_epi32(group!($w0, 0, $sc0), group!($w1, 4, $sc1))
        }};
    }
    /// Q4_K's two group sums (each lane (h, p) the exact sum of its 16 products) packed as `_mm256_packs_epi32(s0,
    /// s1)` packs them: 16-bit lanes, per 128-bit half [s0's 4 words, s1's 4 words]. VNNI: exactly that. AVX2: the 4
    /// `maddubs` of each group added in 16 bits (≤ 4 · 3,810), then `hadd` sums each word's two 16-bit halves and
    /// packs the two groups in that same order (≤ 30,480: nothing wraps) — the same integers with no `madd` by ones:
    /// 8 multiplies per block and row where the VNNI-shaped sequence takes 16 on AVX2 (measured faster on the Zen 3
    /// although `hadd` alone issues only one per 2 cycles there; context.md, session 24).
    macro_rules! q4k_packed_vnni {
        ($w0:expr, $w1:expr, $y:expr) => {{
            let (s0, s1) = dpbusd_sums!($w0, $w1, $y.qs.as_ptr() as *const __m256i);
            _mm256_packs_epi32(s0, s1)
        }};
    }
    macro_rules! q4k_packed_avx2 {
        ($w0:expr, $w1:expr, $y:expr) => {{
            let yq = $y.qs.as_ptr() as *const __m256i;
            macro_rules! group {
                ($w:expr, $o:expr) => {{
                    let (a, b) = maddubs_pairs!($w, yq, $o);
                    _mm256_add_epi16(a, b)
                }};
            }
            _mm256_hadd_epi16(group!($w0, 0), group!($w1, 4))
        }};
    }

    /// One weight block unpacked for the kernels: its quants transposed (`w[0..4]` values 0-127, `w[4..8]` values
    /// 128-255, see [`super::lane_slot`]) and its scales as the kernels use them — Q4_K: `a` the scales and `b` the
    /// mins as 16-bit lanes, `dw`/`dmin` the block's factors; Q6_K: `a`/`b` each 32-bit lane's scale in the two
    /// groups, as the same 16-bit value twice (for `madd` with 16-bit sums; the 32-bit scale is `a >> 16`), `c`
    /// the pair [-32·sc of group 0, -32·sc of group 1] (the +32 offset, against `bsums_q6k`), `dw` the factor. Made once per block and prompt by [`super::unpack_rows`] so that a prompt's many
    /// groups of activation rows need not unpack each block again (`unpacked`).
    #[derive(Clone, Copy)]
    #[repr(C, align(32))]
    pub struct Unpacked {
        w: [__m256i; 8],
        a: __m256i,
        b: __m256i,
        c: __m256i,
        dw: f32,
        dmin: f32,
    }

    impl Default for Unpacked {
        fn default() -> Unpacked {
            // SAFETY: all-zero bits are valid for every field (integers and floats).
            unsafe { std::mem::zeroed() }
        }
    }

    /// Block `$p` (a pointer to its 144 bytes) of a Q4_K row, unpacked.
    macro_rules! unpack_q4k {
        ($p:expr) => {{
            let b = std::slice::from_raw_parts($p, Q4K_BYTES);
            let m4 = _mm256_set1_epi8(0x0F);
            // Scales and mins of sub-blocks 0-7, each repeated for the two halves (16-bit lanes [s0..s7,
            // s0..s7]: the order `packs` gives the group sums, see `bsums_q4k`).
            let sm = q4k_scales_mins(&b[4..16]);
            let sm = _mm_loadu_si128(sm.as_ptr() as *const __m128i);
            let qs = b.as_ptr().add(16) as *const __m256i;
            let (q0, q1) = (_mm256_loadu_si256(qs), _mm256_loadu_si256(qs.add(1)));
            let (q2, q3) = (_mm256_loadu_si256(qs.add(2)), _mm256_loadu_si256(qs.add(3)));
            let w0 = transpose4!(
                _mm256_and_si256(q0, m4),
                _mm256_and_si256(_mm256_srli_epi16(q0, 4), m4),
                _mm256_and_si256(q1, m4),
                _mm256_and_si256(_mm256_srli_epi16(q1, 4), m4)
            );
            let w1 = transpose4!(
                _mm256_and_si256(q2, m4),
                _mm256_and_si256(_mm256_srli_epi16(q2, 4), m4),
                _mm256_and_si256(q3, m4),
                _mm256_and_si256(_mm256_srli_epi16(q3, 4), m4)
            );
            Unpacked {
                w: [w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3]],
                a: _mm256_cvtepu8_epi16(_mm_unpacklo_epi64(sm, sm)),
                b: _mm256_cvtepu8_epi16(_mm_unpackhi_epi64(sm, sm)),
                c: _mm256_setzero_si256(),
                dw: f16_at(b, 0),
                dmin: f16_at(b, 2),
            }
        }};
    }

    /// Block `$p` (a pointer to its 210 bytes) of a Q6_K row, unpacked.
    macro_rules! unpack_q6k {
        ($p:expr) => {{
            let p = $p;
            let m4 = _mm256_set1_epi8(0x0F);
            let m30 = _mm256_set1_epi8(0x30);
            // Scale of word (h, p) in group g: sub-block 8g + 2p + h.
            let idx0 = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, -1, -1, -1, -1, -1, -1, -1, -1);
            let idx1 = _mm_setr_epi8(8, 10, 12, 14, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
            let sc = _mm_loadu_si128(p.add(192) as *const __m128i);
            // The stored (+32) 6-bit quants of half h: low 4 bits from `ql`, high 2 from `qh`.
            macro_rules! half {
                ($h:expr) => {{
                    let ql0 = _mm256_loadu_si256(p.add(64 * $h) as *const __m256i);
                    let ql1 = _mm256_loadu_si256(p.add(64 * $h + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(p.add(128 + 32 * $h) as *const __m256i);
                    transpose4!(
                        _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30)),
                        _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30)),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30)),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                            _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30)
                        )
                    )
                }};
            }
            let (w0, w1) = (half!(0), half!(1));
            let (sc0, sc1) =
                (_mm256_cvtepi8_epi32(_mm_shuffle_epi8(sc, idx0)), _mm256_cvtepi8_epi32(_mm_shuffle_epi8(sc, idx1)));
            let lo = _mm256_set1_epi32(0xFFFF);
            // [sc, sc] and [-32·sc0, -32·sc1] in the two 16-bit halves of each lane.
            let (m0, m1) =
                (_mm256_mullo_epi32(sc0, _mm256_set1_epi32(-32)), _mm256_mullo_epi32(sc1, _mm256_set1_epi32(-32)));
            Unpacked {
                w: [w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3]],
                a: _mm256_or_si256(_mm256_and_si256(sc0, lo), _mm256_slli_epi32(sc0, 16)),
                b: _mm256_or_si256(_mm256_and_si256(sc1, lo), _mm256_slli_epi32(sc1, 16)),
                c: _mm256_or_si256(_mm256_and_si256(m0, lo), _mm256_slli_epi32(m1, 16)),
                dw: f16_at(std::slice::from_raw_parts(p, Q6K_BYTES), 208),
                dmin: 0.0,
            }
        }};
    }

    /// Unpacked Q4_K block `$u` against block `$i` of `R` activation rows (pointers `$ap`), added to `$acc` (one
    /// 8-lane float sum per activation row: each lane sums its own sub-block halves, reduced by [`hsum`] at the end).
    macro_rules! apply_q4k_lanes {
        ($q4k_packed:ident, $u:expr, $ap:expr, $i:expr, $acc:expr) => {{
            let u: &Unpacked = $u;
            let (w0, w1) = ([u.w[0], u.w[1], u.w[2], u.w[3]], [u.w[4], u.w[5], u.w[6], u.w[7]]);
            let (sc16, mn16) = (u.a, u.b);
            let (dw, dminw) = (_mm256_set1_ps(u.dw), _mm256_set1_ps(u.dmin));
            for r in 0..R {
                let y = &*$ap[r].add($i);
                // |lane| ≤ 16 · 15 · 127: exact in 16 bits.
                let isum = _mm256_madd_epi16($q4k_packed!(w0, w1, y), sc16);
                let bs = _mm256_load_si256(y.bsums_q4k.as_ptr() as *const __m256i);
                let msum = _mm256_madd_epi16(bs, mn16);
                let t = _mm256_mul_ps(_mm256_cvtepi32_ps(isum), dw);
                let t = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum), dminw, t);
                $acc[r] = _mm256_fmadd_ps(t, _mm256_set1_ps(y.d), $acc[r]);
            }
        }};
    }

    /// Unpacked Q4_K block `$u` against block `$i` of `R` activation rows (pointers `$ap`), added to `$acc` (one
    /// float per activation row, in lane 0; the other lanes stay 0) — the formulation of `COPILOT_AMX=all`. A
    /// block's integer sums are reduced to two exact totals per row — `I` = Σ sc·q·a over its 256 values and `M` =
    /// Σ min·bsum over its 8 sub-blocks — and the floats
    /// see only those: `t = I·dw − M·dmin` (fused), `acc += t·d` (fused), block after block. Any kernel that
    /// computes the same two integers (however it sums them: the AMX kernels of [`super::amx`] do it in tiles)
    /// and then these three float operations gets the same bits. Two rows are reduced together where there are two
    /// (`hadd` of both rows' sums at once), the last of an odd count alone.
    macro_rules! apply_q4k_totals {
        ($q4k_packed:ident, $u:expr, $ap:expr, $i:expr, $acc:expr) => {{
            let u: &Unpacked = $u;
            let (w0, w1) = ([u.w[0], u.w[1], u.w[2], u.w[3]], [u.w[4], u.w[5], u.w[6], u.w[7]]);
            let (sc16, mn16) = (u.a, u.b);
            let (dw, dminw) = (_mm_set1_ps(u.dw), _mm_set1_ps(u.dmin));
            // |lane| ≤ 16 · 15 · 127: exact in 16 bits; every sum below is an exact 32-bit integer (|I| ≤ 256 ·
            // 63 · 15 · 127 < 2^25).
            macro_rules! sums {
                ($y:expr) => {{
                    let y: &Q8KLanes = $y;
                    let isum = _mm256_madd_epi16($q4k_packed!(w0, w1, y), sc16);
                    let bs = _mm256_load_si256(y.bsums_q4k.as_ptr() as *const __m256i);
                    (isum, _mm256_madd_epi16(bs, mn16))
                }};
            }
            let mut r = 0;
            while r + 1 < R {
                let (ya, yb) = (&*$ap[r].add($i), &*$ap[r + 1].add($i));
                let ((ia, ma), (ib, mb)) = (sums!(ya), sums!(yb));
                // Per 128-bit half [Ia, Ma, Ib, Mb] over its 4 lanes; the halves added: the totals.
                let s = _mm256_hadd_epi32(_mm256_hadd_epi32(ia, ma), _mm256_hadd_epi32(ib, mb));
                let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                let f = _mm_cvtepi32_ps(s);
                // Lanes 0 and 2: I·dw − M·dmin for rows r and r + 1.
                let t = _mm_fnmadd_ps(_mm_movehdup_ps(f), dminw, _mm_mul_ps(f, dw));
                $acc[r] = _mm256_zextps128_ps256(_mm_fmadd_ss(t, _mm_load_ss(&ya.d), _mm256_castps256_ps128($acc[r])));
                let acc = _mm256_castps256_ps128($acc[r + 1]);
                $acc[r + 1] = _mm256_zextps128_ps256(_mm_fmadd_ss(_mm_movehl_ps(t, t), _mm_load_ss(&yb.d), acc));
                r += 2;
            }
            if r < R {
                let y = &*$ap[r].add($i);
                let (isum, msum) = sums!(y);
                // [I, M, I, M]: the same totals, the same float operations (on lane 0).
                let s = _mm256_hadd_epi32(isum, msum);
                let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                let f = _mm_cvtepi32_ps(_mm_hadd_epi32(s, s));
                let t = _mm_fnmadd_ss(_mm_movehdup_ps(f), dminw, _mm_mul_ss(f, dw));
                $acc[r] = _mm256_zextps128_ps256(_mm_fmadd_ss(t, _mm_load_ss(&y.d), _mm256_castps256_ps128($acc[r])));
            }
        }};
    }

    /// Unpacked Q6_K block `$u` against block `$i` of `R` activation rows, added to `$acc`.
    macro_rules! apply_q6k {
        ($q6k_scaled:ident, $u:expr, $ap:expr, $i:expr, $acc:expr) => {{
            let u: &Unpacked = $u;
            let (w0, w1) = ([u.w[0], u.w[1], u.w[2], u.w[3]], [u.w[4], u.w[5], u.w[6], u.w[7]]);
            let (sc0, sc1, scm) = (u.a, u.b, u.c);
            let dw = _mm256_set1_ps(u.dw);
            for r in 0..R {
                let y = &*$ap[r].add($i);
                // Σ sc·(q − 32)·y per lane: the +32 offset comes off as -32·sc times each 16-value sum.
                let bs = _mm256_load_si256(y.bsums_q6k.as_ptr() as *const __m256i);
                let isum = _mm256_add_epi32($q6k_scaled!(w0, w1, y, sc0, sc1), _mm256_madd_epi16(bs, scm));
                let t = _mm256_mul_ps(_mm256_cvtepi32_ps(isum), dw);
                $acc[r] = _mm256_fmadd_ps(t, _mm256_set1_ps(y.d), $acc[r]);
            }
        }};
    }

    /// Unpacked Q6_K block `$u` against block `$i` of `R` activation rows, added to `$acc` in the formulation the
    /// AMX tiles reproduce (as `apply_q4k_totals`): the block's exact total `I` = Σ sc·(q − 32)·a per row, then
    /// `acc += (I·dw)·d` (fused), one float per row in lane 0.
    macro_rules! apply_q6k_totals {
        ($q6k_scaled:ident, $u:expr, $ap:expr, $i:expr, $acc:expr) => {{
            let u: &Unpacked = $u;
            let (w0, w1) = ([u.w[0], u.w[1], u.w[2], u.w[3]], [u.w[4], u.w[5], u.w[6], u.w[7]]);
            let (sc0, sc1, scm) = (u.a, u.b, u.c);
            let dw = _mm_set1_ps(u.dw);
            // |I| ≤ 256 · 128 · 32 · 127 < 2^31: every sum below is exact.
            macro_rules! sums {
                ($y:expr) => {{
                    let y: &Q8KLanes = $y;
                    let bs = _mm256_load_si256(y.bsums_q6k.as_ptr() as *const __m256i);
                    _mm256_add_epi32($q6k_scaled!(w0, w1, y, sc0, sc1), _mm256_madd_epi16(bs, scm))
                }};
            }
            let mut r = 0;
            while r + 1 < R {
                let (ya, yb) = (&*$ap[r].add($i), &*$ap[r + 1].add($i));
                let s = _mm256_hadd_epi32(sums!(ya), sums!(yb));
                let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                // [Ia, Ib, Ia, Ib].
                let t = _mm_mul_ps(_mm_cvtepi32_ps(_mm_hadd_epi32(s, s)), dw);
                $acc[r] = _mm256_zextps128_ps256(_mm_fmadd_ss(t, _mm_load_ss(&ya.d), _mm256_castps256_ps128($acc[r])));
                let acc = _mm256_castps256_ps128($acc[r + 1]);
                $acc[r + 1] = _mm256_zextps128_ps256(_mm_fmadd_ss(_mm_movehdup_ps(t), _mm_load_ss(&yb.d), acc));
                r += 2;
            }
            if r < R {
                let y = &*$ap[r].add($i);
                let isum = sums!(y);
                let s = _mm256_hadd_epi32(isum, isum);
                let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                let t = _mm_mul_ss(_mm_cvtepi32_ps(_mm_hadd_epi32(s, s)), dw);
                $acc[r] = _mm256_zextps128_ps256(_mm_fmadd_ss(t, _mm_load_ss(&y.d), _mm256_castps256_ps128($acc[r])));
            }
        }};
    }

    macro_rules! kernels {
        ($m:ident, $feat:literal, $q6k_scaled:ident, $q4k_packed:ident, $apply_q4k:ident, $apply_q6k:ident) => {
            pub mod $m {
                use super::*;

                /// Q4_K row · `R` activation rows, added block by block to `sums` (per activation row 8 lane sums
                /// or, in the `totals` variant, one float in lane 0; [`finish`] reads either): a row may come in
                /// pieces of blocks, and the sums see the same operations in the same order either way.
                ///
                /// # Safety
                /// The CPU must have the features named in `target_feature`; `row` holds `a[r].len()` Q4_K blocks
                /// for every `r` (all equal).
                #[target_feature(enable = $feat)]
                pub unsafe fn q4k<const R: usize>(row: &[u8], a: [&[Q8KLanes]; R], sums: &mut [__m256; R]) {
                    let nb = a[0].len();
                    debug_assert!(row.len() >= nb * Q4K_BYTES && a.iter().all(|x| x.len() == nb));
                    // SAFETY: the caller guarantees the CPU features, that `row` holds `nb` blocks and that every
                    // activation row has `nb` blocks, so block i of the row (bytes i·144..(i+1)·144) and block i
                    // of each activation row (through `ap[r].add(i)`, i < nb) are in bounds; `Q8KLanes` is
                    // 32-byte aligned, as the aligned loads of its quants need.
                    unsafe {
                        let ap: [*const Q8KLanes; R] = a.map(|x| x.as_ptr());
                        let mut acc = *sums;
                        for i in 0..nb {
                            let u = unpack_q4k!(row.as_ptr().add(i * Q4K_BYTES));
                            $apply_q4k!($q4k_packed, &u, ap, i, acc);
                        }
                        *sums = acc;
                    }
                }

                /// Q6_K row · `R` activation rows (one 8-lane float sum per activation row, reduced by [`hsum`]
                /// once the row is done).
                ///
                /// # Safety
                /// As [`q4k`], with Q6_K blocks.
                #[target_feature(enable = $feat)]
                pub unsafe fn q6k<const R: usize>(row: &[u8], a: [&[Q8KLanes]; R], sums: &mut [__m256; R]) {
                    let nb = a[0].len();
                    debug_assert!(row.len() >= nb * Q6K_BYTES && a.iter().all(|x| x.len() == nb));
                    // SAFETY: as in `q4k`: block i of the row is bytes i·210..(i+1)·210 and i < nb everywhere.
                    unsafe {
                        let ap: [*const Q8KLanes; R] = a.map(|x| x.as_ptr());
                        let mut acc = *sums;
                        for i in 0..nb {
                            let u = unpack_q6k!(row.as_ptr().add(i * Q6K_BYTES));
                            $apply_q6k!($q6k_scaled, &u, ap, i, acc);
                        }
                        *sums = acc;
                    }
                }

                /// [`q4k`] (or, with `q6`, [`q6k`]) over blocks unpacked beforehand ([`unpack`]): the same
                /// operations in the same order, so the same bits.
                ///
                /// # Safety
                /// The CPU must have the features named in `target_feature`; `u` holds `a[r].len()` blocks for
                /// every `r` (all equal), unpacked from the kind `q6` names.
                #[target_feature(enable = $feat)]
                pub unsafe fn unpacked<const R: usize>(
                    q6: bool,
                    u: &[Unpacked],
                    a: [&[Q8KLanes]; R],
                    sums: &mut [__m256; R],
                ) {
                    let nb = a[0].len();
                    assert!(u.len() >= nb && a.iter().all(|x| x.len() == nb));
                    // SAFETY: block i < nb of every activation row is in bounds (asserted just above).
                    unsafe {
                        let ap: [*const Q8KLanes; R] = a.map(|x| x.as_ptr());
                        let mut acc = *sums;
                        for (i, u) in u[..nb].iter().enumerate() {
                            if q6 {
                                $apply_q6k!($q6k_scaled, u, ap, i, acc);
                            } else {
                                $apply_q4k!($q4k_packed, u, ap, i, acc);
                            }
                        }
                        *sums = acc;
                    }
                }
            }
        };
    }

    kernels!(
        vnni,
        "avx2,fma,avx512f,avx512vl,avx512vnni",
        q6k_scaled_vnni,
        q4k_packed_vnni,
        apply_q4k_lanes,
        apply_q6k
    );
    kernels!(avx2, "avx2,fma", q6k_scaled_avx2, q4k_packed_avx2, apply_q4k_lanes, apply_q6k);
    // With `COPILOT_AMX=all`: the formulation the tiles reproduce (`apply_q4k_totals`, `apply_q6k_totals`).
    kernels!(
        totals,
        "avx2,fma,avx512f,avx512vl,avx512vnni",
        q6k_scaled_vnni,
        q4k_packed_vnni,
        apply_q4k_totals,
        apply_q6k_totals
    );

    /// The blocks of a row of `kind` blocks (`row` holds `out.len()` of them), unpacked into `out`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn unpack(kind: super::Kind, row: &[u8], out: &mut [Unpacked]) {
        assert!(row.len() >= out.len() * kind.block_bytes());
        // SAFETY: block i < out.len() of `row` is in bounds (asserted just above); AVX2 by the caller.
        unsafe {
            match kind {
                super::Kind::Q4K | super::Kind::Q4K16 => {
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = unpack_q4k!(row.as_ptr().add(i * Q4K_BYTES));
                    }
                }
                super::Kind::Q6K | super::Kind::Q6K16 => {
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = unpack_q6k!(row.as_ptr().add(i * Q6K_BYTES));
                    }
                }
            }
        }
    }
}

/// True when the AVX-512 VNNI variant of the decode kernels can run (else their AVX2 variant, same results).
#[cfg(target_arch = "x86_64")]
fn vnni_available() -> bool {
    simd_available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Dot product of one row of `kind` blocks with quantized activations, on the fastest path this CPU has (with
/// `simd`; without it, the scalar kernels). The SIMD path is `rows_lanes` with one row, so it gives exactly
/// what a pass of several rows gives each of them.
pub fn dot(kind: Kind, row: &[u8], a: &[Q8K], simd: bool) -> f32 {
    assert!(!kind.rows16(), "a row of the 16-row layout is not contiguous: see rows16::dot_scalar");
    assert!(row.len() >= a.len() * kind.block_bytes(), "row of {} bytes for {} blocks", row.len(), a.len());
    #[cfg(target_arch = "x86_64")]
    if simd && simd_available() {
        let lanes: Vec<Q8KLanes> = a.iter().map(arrange).collect();
        let mut out = 0f32;
        rows_lanes(kind, row, row.len(), 0..1, &[&lanes], |_, _, v| out = v);
        return out;
    }
    let _ = simd;
    match kind {
        Kind::Q4K | Kind::Q4K16 => dot_q4k_scalar(row, a),
        Kind::Q6K | Kind::Q6K16 => dot_q6k_scalar(row, a),
    }
}

/// Activation bytes a pass may keep in the L1 cache (32 KB on the CPUs seen) while weight rows stream past them:
/// 8 rows of 1,536 values (18 KB) still run whole, 2 rows of 8,960 (27 KB) go in pieces (measured both ways).
#[cfg(target_arch = "x86_64")]
const L1_ACTS_BYTES: usize = 24 * 1024;
/// Blocks per piece when a pass's activation rows do not fit [`L1_ACTS_BYTES`] (4: 8 rows × 1.5 KB).
#[cfg(target_arch = "x86_64")]
const BLOCKS_PER_PIECE: usize = 4;

/// Weight rows `wrows` of `w` (`row_bytes` each, `kind` blocks) against arranged activation rows `acts` (at most
/// [`MAX_ROWS_AT_ONCE`], all of one width), calling `put(weight row, activation row, value)` for every product.
/// The weights are unpacked once per block for all activation rows. When the activation rows outgrow the L1 cache
/// (long rows, e.g. the 8,960-wide down projection with 2+ rows: 13 KB a row), the weight rows are walked piece by
/// piece — [`BLOCKS_PER_PIECE`] blocks of every weight row, then the next piece — so each piece of the activations
/// stays in L1 while up to [`ROWS_PER_ITEM`] weight rows use it; each product's float sums see the same operations
/// in the same order either way (only where they wait between pieces changes). So every value is bit-identical
/// to what its activation row gets alone, with either variant of the kernels.
///
/// Panics without AVX2 and FMA ([`simd_available`]) or with more than [`ROWS_PER_ITEM`] weight rows.
#[cfg(target_arch = "x86_64")]
pub(crate) fn rows_lanes(
    kind: Kind,
    w: &[u8],
    row_bytes: usize,
    wrows: std::ops::Range<usize>,
    acts: &[&[Q8KLanes]],
    put: impl FnMut(usize, usize, f32),
) {
    rows_lanes_from(kind, w, row_bytes, wrows, acts, Via::default(), put)
}

/// How [`rows_lanes_from`] reads the weight rows: from blocks unpacked beforehand, and in the totals formulation
/// or not whatever `COPILOT_AMX` says (`None`: as it says).
#[cfg(target_arch = "x86_64")]
#[derive(Default, Clone, Copy)]
pub(crate) struct Via<'a> {
    pub(crate) unpacked: Option<&'a [lanes::Unpacked]>,
    pub(crate) totals: Option<bool>,
}

/// [`rows_lanes`], reading the weight rows' blocks from `via.unpacked` when given (and with `via.totals` given, in
/// that formulation or not): [`unpack_rows`] of the same
/// rows (weight row `r`'s block `i` at `(r - wrows.start) * nb + i`), made once for many calls — a prompt's
/// groups of activation rows. The same operations in the same order, so the same bits.
#[cfg(target_arch = "x86_64")]
pub(crate) fn rows_lanes_from(
    kind: Kind,
    w: &[u8],
    row_bytes: usize,
    wrows: std::ops::Range<usize>,
    acts: &[&[Q8KLanes]],
    via: Via,
    put: impl FnMut(usize, usize, f32),
) {
    let Via { unpacked, totals } = via;
    assert!(simd_available(), "the decode kernels need AVX2 and FMA");
    assert!(!kind.rows16(), "the 16-row layout has its own kernels (rows16)");
    assert!(wrows.len() <= ROWS_PER_ITEM, "{} weight rows at once", wrows.len());
    let Some(first) = acts.first() else { return };
    let (nb, bb, n_act) = (first.len(), kind.block_bytes(), acts.len());
    assert!(n_act <= MAX_ROWS_AT_ONCE, "{n_act} activation rows at once");
    assert!(acts.iter().all(|a| a.len() == nb), "activation rows of different widths");
    assert!(row_bytes >= nb * bb && w.len() >= wrows.end * row_bytes, "weights too short for {nb} blocks a row");
    let vnni = vnni_available();
    // Where decoding passes may take the AMX tiles (`COPILOT_AMX=all`; or `totals` given), products take the
    // formulation the tiles reproduce (`apply_q4k_totals`), so a row gets the same bits in a pass of any size;
    // otherwise the lane formulation (one reduction per row, cheaper for small passes).
    let totals = vnni && totals.unwrap_or_else(super::amx::for_decode);
    let piece =
        if n_act >= 2 && n_act * nb * std::mem::size_of::<Q8KLanes>() > L1_ACTS_BYTES { BLOCKS_PER_PIECE } else { nb };
    if let Some(u) = unpacked {
        assert!(u.len() >= wrows.len() * nb, "{} unpacked blocks for {} rows of {nb}", u.len(), wrows.len());
    }
    let job = Job { kind, vnni, totals, w, row_bytes, wrows, nb, piece, unpacked };
    match n_act {
        1 => job.run::<1>(acts, put),
        2 => job.run::<2>(acts, put),
        3 => job.run::<3>(acts, put),
        4 => job.run::<4>(acts, put),
        5 => job.run::<5>(acts, put),
        6 => job.run::<6>(acts, put),
        7 => job.run::<7>(acts, put),
        _ => job.run::<8>(acts, put),
    }
}

/// Weight rows `wrows` of `w` (`row_bytes` each, `nb` blocks of `kind` used) unpacked into `out` (resized), row
/// after row, for [`rows_lanes_from`].
///
/// Panics without AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
fn unpack_rows(
    kind: Kind,
    w: &[u8],
    row_bytes: usize,
    wrows: std::ops::Range<usize>,
    nb: usize,
    out: &mut Vec<lanes::Unpacked>,
) {
    assert!(simd_available(), "the decode kernels need AVX2 and FMA");
    assert!(row_bytes >= nb * kind.block_bytes() && w.len() >= wrows.end * row_bytes);
    out.clear();
    out.resize(wrows.len() * nb, lanes::Unpacked::default());
    for (r, o) in wrows.zip(out.chunks_exact_mut(nb)) {
        // SAFETY: AVX2 and FMA checked just above; the row holds `nb` blocks (asserted).
        unsafe { lanes::unpack(kind, &w[r * row_bytes..(r + 1) * row_bytes], o) };
    }
}

/// One [`rows_lanes`] call, checked, for `N` activation rows.
#[cfg(target_arch = "x86_64")]
struct Job<'a> {
    kind: Kind,
    vnni: bool,
    /// The `totals` formulation (implies `vnni`).
    totals: bool,
    w: &'a [u8],
    row_bytes: usize,
    wrows: std::ops::Range<usize>,
    nb: usize,
    piece: usize,
    unpacked: Option<&'a [lanes::Unpacked]>,
}

#[cfg(target_arch = "x86_64")]
impl Job<'_> {
    /// Blocks `kc..ke` of weight row `r` against the same blocks of `acts`, added to `sums`.
    #[inline(always)]
    fn blocks<const N: usize>(
        &self,
        r: usize,
        kc: usize,
        ke: usize,
        acts: &[&[Q8KLanes]],
        sums: &mut [lanes::__m256; N],
    ) {
        let a: [&[Q8KLanes]; N] = std::array::from_fn(|j| &acts[j][kc..ke]);
        if let Some(u) = self.unpacked {
            let at = (r - self.wrows.start) * self.nb;
            let u = &u[at + kc..at + ke];
            let q6 = self.kind == Kind::Q6K;
            // SAFETY: as below; `u` holds ke − kc blocks like every `a[j]`, unpacked from this matrix's kind.
            unsafe {
                if self.totals {
                    lanes::totals::unpacked(q6, u, a, sums)
                } else if self.vnni {
                    lanes::vnni::unpacked(q6, u, a, sums)
                } else {
                    lanes::avx2::unpacked(q6, u, a, sums)
                }
            }
            return;
        }
        let bb = self.kind.block_bytes();
        let row = &self.w[r * self.row_bytes + kc * bb..r * self.row_bytes + ke * bb];
        // SAFETY: `rows_lanes` checked AVX2 and FMA, and `vnni` is set only where `vnni_available` found AVX-512
        // F/VL/VNNI; `row` and every `a[j]` hold ke − kc blocks (sliced just above).
        unsafe {
            match (self.kind, self.vnni) {
                (Kind::Q4K | Kind::Q4K16, true) if self.totals => lanes::totals::q4k(row, a, sums),
                (Kind::Q4K | Kind::Q4K16, true) => lanes::vnni::q4k(row, a, sums),
                (Kind::Q4K | Kind::Q4K16, false) => lanes::avx2::q4k(row, a, sums),
                (Kind::Q6K | Kind::Q6K16, true) if self.totals => lanes::totals::q6k(row, a, sums),
                (Kind::Q6K | Kind::Q6K16, true) => lanes::vnni::q6k(row, a, sums),
                (Kind::Q6K | Kind::Q6K16, false) => lanes::avx2::q6k(row, a, sums),
            }
        }
    }

    fn run<const N: usize>(&self, acts: &[&[Q8KLanes]], mut put: impl FnMut(usize, usize, f32)) {
        let (nb, piece, bb, row_bytes) = (self.nb, self.piece, self.kind.block_bytes(), self.row_bytes);
        if piece == nb {
            // Whole rows, streamed a row or two ahead.
            for r in self.wrows.clone() {
                if self.unpacked.is_none() {
                    prefetch(self.w, (r + PREFETCH_ROWS) * row_bytes, row_bytes);
                }
                // SAFETY: an all-zero bit pattern is a valid __m256 (eight 0.0f32).
                let mut sums: [lanes::__m256; N] = unsafe { std::mem::zeroed() };
                self.blocks(r, 0, nb, acts, &mut sums);
                for (j, s) in sums.iter().enumerate() {
                    // SAFETY: AVX2 was checked by `rows_lanes`.
                    put(r, j, unsafe { lanes::finish(self.totals, *s) });
                }
            }
            return;
        }
        // SAFETY: an all-zero bit pattern is a valid __m256 (eight 0.0f32).
        let mut sums: [[lanes::__m256; N]; ROWS_PER_ITEM] = unsafe { std::mem::zeroed() };
        let mut kc = 0;
        while kc < nb {
            let ke = (kc + piece).min(nb);
            let end = self.wrows.end;
            for (i, r) in self.wrows.clone().enumerate() {
                // Ask for the weights needed two rows ahead: this piece of row r + 2, or past the item's last
                // rows, the next piece of its first rows (wrapping within the item, however few rows it has).
                let (start, len) = (self.wrows.start, self.wrows.len());
                let (ahead, at) = if r + PREFETCH_ROWS < end {
                    (r + PREFETCH_ROWS, kc)
                } else {
                    (start + (r + PREFETCH_ROWS - start) % len, ke)
                };
                if at < nb && self.unpacked.is_none() {
                    prefetch(self.w, ahead * row_bytes + at * bb, (at + piece).min(nb).saturating_sub(at) * bb);
                }
                self.blocks(r, kc, ke, acts, &mut sums[i]);
            }
            kc = ke;
        }
        for (r, sums) in self.wrows.clone().zip(&sums) {
            for (j, s) in sums.iter().enumerate() {
                // SAFETY: AVX2 was checked by `rows_lanes`.
                put(r, j, unsafe { lanes::finish(self.totals, *s) });
            }
        }
    }
}

/// Which pass a product belongs to: a decoding step of one or a few rows, whose results must not depend on how
/// many rows share it ([`gemm_many`]), or a prompt ([`crate::engine::prompt_kernels::gemm_prompt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Step,
    Prompt,
}

/// One weight matrix for [`gemm_many`]: `n` rows of `kind` blocks in `w` (row-major, as in GGUF; or, for the
/// 16-row kinds, groups of 16 rows interleaved as [`super::rows16`] lays them out).
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub kind: Kind,
    pub w: &'a [u8],
    pub n: usize,
}

/// Raw pointers to outputs that candle's pool threads write at disjoint places (here: the rows of each product;
/// in `model::attend_pass`: the heads of every row of one attention step). Users hand out work so that every
/// output element belongs to exactly one work item, and take the pointers from `&mut [f32]`s that outlive the pool
/// call.
pub(crate) struct Outs(pub(crate) Vec<*mut f32>);
// SAFETY: under the contract above no element is written by two threads, none is read while written, and every
// pointer stays valid until the pool call returns (it returns only when all workers are done).
unsafe impl Sync for Outs {}

/// Activation rows one weight row is multiplied with in one go (`rows_lanes`): the kernels keep one 8-lane sum
/// per activation row in a register, and the AVX-512 variant has 32 of them.
const MAX_ROWS_AT_ONCE: usize = 8;

/// Rows from which a decoding pass's products of `kind` go to the AMX tiles with `COPILOT_AMX=all` (`amx`): the
/// tiles pay for laying out 16 weight rows per block whatever the number of activation rows. Measured on the
/// Intel Xeon kind with `examples/bench_prompt N K ROWS KIND` (GMAC/s, tiles vs the VNNI kernels): Q4_K 8,960 ×
/// 1,536: 4 rows 100 vs 121, 8 rows 165 vs 149, 32 rows 486 vs 140; Q6_K 151,936 × 1,536 (the output layer,
/// bound by memory): 8 rows 123 vs 167, 12 rows 139 vs 122, 32 rows 348 vs 154. Through the whole model
/// (`bench_batch`, 8-row passes) tiles for both kinds from 8 rows took 107–109 ms, Q6_K from 12 rows 114.
#[cfg(target_arch = "x86_64")]
fn amx_min_rows(kind: Kind) -> usize {
    match kind {
        Kind::Q4K | Kind::Q6K | Kind::Q4K16 | Kind::Q6K16 => 8,
    }
}

/// How many weight rows ahead [`gemm_many`] asks the CPU to load a whole row (a row of the default model is
/// 0.9–5 KB): its cache lines are then requested together, not one by one as the dot product reaches them.
/// Measured on the 2-core Intel Xeon (decode of the default model, 8 questions): no prefetch 11.0 tok/s; the row
/// itself just before use 15.8; 1 ahead 16.8; 2 ahead 17.0; 4 ahead 16.3; 8 ahead 15.6.
const PREFETCH_ROWS: usize = 2;

/// Ask the CPU to bring `w[at..at + len]` (clipped to `w`) towards the cache, a line at a time. A hint only: no
/// result depends on it.
#[inline]
pub(crate) fn prefetch(w: &[u8], at: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let end = (at + len).min(w.len());
        let mut i = at;
        while i < end {
            // SAFETY: `i < w.len()`, so the address is inside `w`; a prefetch reads nothing and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().add(i) as *const i8) };
            i += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, at, len);
}

/// Rows handed to a thread at a time: enough work to hide the hand-out, few enough to balance 2 threads.
const ROWS_PER_ITEM: usize = 16;
// A work item is one group of the 16-row layout.
const _: () = assert!(ROWS_PER_ITEM == super::rows16::ROWS);

/// `y = W · x` for `W` of `n` rows × `k` columns stored as `kind` blocks in `w`.
pub fn gemv(kind: Kind, w: &[u8], n: usize, k: usize, x: &[f32], y: &mut [f32]) {
    gemm_many(&[Matrix { kind, w, n }], k, &[x], &mut [y]);
}

/// `ys[i] = mats[i] · x` for matrices that share the input `x` (k columns each): q/k/v, or gate/up.
pub fn gemv_many(mats: &[Matrix], k: usize, x: &[f32], ys: &mut [&mut [f32]]) {
    gemm_many(mats, k, &[x], ys);
}

/// Several rows of activations through matrices that share them: `ys[i][r * n_i + j] = mats[i].row(j) · xs[r]`.
///
/// Decoding is bound by memory bandwidth: every weight is read once per pass, whatever the number of rows. Here
/// each weight row is read once and multiplied with every input row while it is in the L1 cache (a Q4_K row of
/// the default model is 0.9–5 KB), so R rows cost about one pass over the weights plus R times the arithmetic —
/// the primitive behind several candidates, speculative verification and several sessions decoded together.
/// Each input row is quantized once; all rows of all matrices go to candle's CPU thread pool (the one its own
/// matmuls use, so the two never compete) in one hand-out, so a layer pays for one barrier. Every output element
/// is the same dot product as with one row, so results do not depend on how many rows share the pass.
pub fn gemm_many(mats: &[Matrix], k: usize, xs: &[&[f32]], ys: &mut [&mut [f32]]) {
    gemm(mats, k, xs, ys, false)
}

/// A prompt's products on the AMX tiles (every weight item, every row), where [`super::amx::available`]: results
/// equal [`gemm_many`]'s up to float summation order (the totals formulation), as the VNNI prompt tiles' do.
pub(crate) fn gemm_prompt_tiles(mats: &[Matrix], k: usize, xs: &[&[f32]], ys: &mut [&mut [f32]]) {
    gemm(mats, k, xs, ys, true)
}

/// [`gemm_many`], or with `prompt` [`gemm_prompt_tiles`].
fn gemm(mats: &[Matrix], k: usize, xs: &[&[f32]], ys: &mut [&mut [f32]], prompt: bool) {
    assert_eq!(k % QK_K, 0, "k = {k} is not a multiple of {QK_K}");
    assert!(xs.iter().all(|x| x.len() == k), "every input row must have {k} columns");
    assert_eq!(mats.len(), ys.len());
    let rows = xs.len();
    // Work items: each matrix's weight rows in groups of ROWS_PER_ITEM; `first[i]` is matrix i's first item.
    let mut first = Vec::with_capacity(mats.len() + 1);
    first.push(0);
    for (m, y) in mats.iter().zip(ys.iter()) {
        assert_eq!(y.len(), m.n * rows);
        let row_bytes = k / QK_K * m.kind.block_bytes();
        assert!(m.w.len() >= m.n * row_bytes, "weights of {} bytes for {}×{k}", m.w.len(), m.n);
        first.push(first.last().unwrap() + m.n.div_ceil(ROWS_PER_ITEM));
    }
    let total = *first.last().unwrap();
    thread_local! {
        static ACT: std::cell::RefCell<Vec<Vec<Q8K>>> = const { std::cell::RefCell::new(Vec::new()) };
        static LANES: std::cell::RefCell<Vec<Vec<Q8KLanes>>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    #[cfg(target_arch = "x86_64")]
    thread_local! {
        /// A work item's weight blocks unpacked (`unpack_rows`), on the pool thread that runs it.
        static UNPACKED: std::cell::RefCell<Vec<lanes::Unpacked>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    #[cfg(target_arch = "x86_64")]
    thread_local! {
        /// The pass's activation rows laid out for the AMX tiles, when the pass takes them.
        static AMX_ACTS: std::cell::RefCell<super::amx::Acts> = std::cell::RefCell::new(super::amx::Acts::default());
    }
    thread_local! {
        /// Per activation row, the sums in pairs the 16-row kernels take (`rows16::pairs`).
        static PAIRS: std::cell::RefCell<Vec<Vec<super::rows16::Pairs>>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    ACT.with_borrow_mut(|act| {
        LANES.with_borrow_mut(|lanes| {
            let simd = simd_available();
            #[cfg(target_arch = "x86_64")]
            let vnni = simd && vnni_available();
            // Items go to the AMX tiles where the CPU has them: every item of a prompt, and with `COPILOT_AMX=all`
            // those of decoding passes of 8+ rows (the same bits as the VNNI kernels then run: `amx`'s doc).
            #[cfg(target_arch = "x86_64")]
            let amx = |kind: Kind| {
                simd && if prompt {
                    super::amx::available()
                } else {
                    rows >= amx_min_rows(kind) && super::amx::for_decode()
                }
            };
            #[cfg(not(target_arch = "x86_64"))]
            let amx = |_: Kind| false;
            // Which layouts of the activations the pass's matrices read: the lane kernels' (GGUF matrices off
            // the tiles, with AVX2), the 16-row kernels' pairs (16-row matrices off the tiles), the tiles' own.
            let simd_lanes = simd && mats.iter().any(|m| !m.kind.rows16() && !amx(m.kind));
            let sixteen = mats.iter().any(|m| m.kind.rows16() && !amx(m.kind));
            let have = act.len();
            act.resize_with(rows.max(have), Vec::new);
            let have = lanes.len();
            lanes.resize_with(if simd_lanes { rows.max(have) } else { have }, Vec::new);
            quantize_rows(xs, &mut act[..rows], if simd_lanes { &mut lanes[..rows] } else { &mut [] });
            let act: &[Vec<Q8K>] = &act[..rows];
            let act_refs: Vec<&[Q8K]> = act.iter().map(|a| a.as_slice()).collect();
            let lane_refs: Vec<&[Q8KLanes]> =
                if simd_lanes { lanes[..rows].iter().map(|l| l.as_slice()).collect() } else { Vec::new() };
            let (act_refs, lane_refs) = (&act_refs, &lane_refs);
            // Matrices in the 16-row layout (`rows16`) take each activation row's sums in pairs beside its blocks.
            let mut pairs = PAIRS.take();
            if sixteen {
                pairs.resize_with(rows.max(pairs.len()), Vec::new);
                for (p, a) in pairs.iter_mut().zip(act) {
                    super::rows16::pairs(a, p);
                }
            }
            let pair_refs: Vec<&[super::rows16::Pairs]> =
                if sixteen { pairs[..rows].iter().map(|p| p.as_slice()).collect() } else { Vec::new() };
            let pair_refs = &pair_refs;
            let outs = Outs(ys.iter_mut().map(|y| y.as_mut_ptr()).collect());
            let outs = &outs;
            let first = &first;
            #[cfg(target_arch = "x86_64")]
            let mut amx_acts = AMX_ACTS.take();
            #[cfg(target_arch = "x86_64")]
            if mats.iter().any(|m| amx(m.kind)) {
                let gguf = mats.iter().any(|m| amx(m.kind) && !m.kind.rows16());
                let sixteen = mats.iter().any(|m| amx(m.kind) && m.kind.rows16());
                amx_acts.fill(act_refs, gguf, sixteen);
            }
            candle_core::utils::barrier_pool().execute_chunked(total, |items| {
                for item in items {
                    let mi = first.partition_point(|&f| f <= item) - 1;
                    let m = &mats[mi];
                    let row_bytes = k / QK_K * m.kind.block_bytes();
                    let start = (item - first[mi]) * ROWS_PER_ITEM;
                    let wrows = start..(start + ROWS_PER_ITEM).min(m.n);
                    // Input rows `from..` against this item's weight rows: value (weight row r, input row j).
                    let put = |from: usize| {
                        move |r: usize, j: usize, v: f32| {
                            // SAFETY: (from + j) * m.n + r < rows * m.n = ys[mi].len(), and weight row r of matrix
                            // mi (for every input row) belongs to this item alone (see `Outs`).
                            unsafe { *outs.0[mi].add((from + j) * m.n + r) = v };
                        }
                    };
                    // A few input rows (decode, candidates, several sessions): all of them against each weight
                    // row as it streams through. More (a prompt, where the prompt kernels are not available): input
                    // rows in groups outside, this item's weight rows inside, so the item's weights (16 rows, 14–80
                    // KB for the default model) stay in cache while the prompt's rows go past them.
                    // With more than one group of input rows, on a CPU without AVX-512 VNNI (where a prompt
                    // comes here), the item's weight blocks are unpacked once (`unpack_rows`) instead of once per
                    // group: measured +2 % prefill on a Zen 3. With VNNI (where only decode passes of 9 or more
                    // rows come here: prompts take the prompt kernels) each group reads the blocks itself: on an
                    // Intel Xeon a pass of 12 rows took 142 ms that way against 200 ms unpacking once, 16 rows
                    // 178 vs 239, 32 rows 348 vs 390, 64 rows 691 vs 742 (`bench_batch`, binaries alternating) —
                    // writing and reading back the unpacked blocks cost more than unpacking in registers again.
                    #[cfg(target_arch = "x86_64")]
                    if amx(m.kind) {
                        super::amx::product(m.kind, m.w, row_bytes, wrows.clone(), &amx_acts, put(0));
                        continue;
                    }
                    if m.kind.rows16() {
                        // Items are groups of 16 weight rows, as the layout's groups are.
                        super::rows16::product(m.kind, m.w, k / QK_K, wrows.clone(), act_refs, pair_refs, put(0));
                        continue;
                    }
                    #[cfg(target_arch = "x86_64")]
                    if simd {
                        if rows <= MAX_ROWS_AT_ONCE || vnni {
                            for from in (0..rows).step_by(MAX_ROWS_AT_ONCE) {
                                let acts = &lane_refs[from..(from + MAX_ROWS_AT_ONCE).min(rows)];
                                rows_lanes(m.kind, m.w, row_bytes, wrows.clone(), acts, put(from));
                            }
                            continue;
                        }
                        UNPACKED.with_borrow_mut(|u| {
                            unpack_rows(m.kind, m.w, row_bytes, wrows.clone(), k / QK_K, u);
                            for from in (0..rows).step_by(MAX_ROWS_AT_ONCE) {
                                let acts = &lane_refs[from..(from + MAX_ROWS_AT_ONCE).min(rows)];
                                let via = Via { unpacked: Some(u), totals: None };
                                rows_lanes_from(m.kind, m.w, row_bytes, wrows.clone(), acts, via, put(from));
                            }
                        });
                        continue;
                    }
                    for from in (0..rows).step_by(MAX_ROWS_AT_ONCE) {
                        let to = (from + MAX_ROWS_AT_ONCE).min(rows);
                        let _ = lane_refs;
                        let put = put(from);
                        for r in wrows.clone() {
                            let w = &m.w[r * row_bytes..(r + 1) * row_bytes];
                            prefetch(m.w, (r + PREFETCH_ROWS) * row_bytes, row_bytes);
                            for (j, a) in act_refs[from..to].iter().enumerate() {
                                put(r, j, dot(m.kind, w, a, false));
                            }
                        }
                    }
                }
            });
            #[cfg(target_arch = "x86_64")]
            AMX_ACTS.set(amx_acts);
            PAIRS.set(pairs);
        })
    });
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Weights of a plausible spread quantized by candle, their raw blocks, and candle's dequantization.
    fn quantized(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        quantized_spread(dtype, n, k, seed, 0.2)
    }

    /// [`quantized`] with values spread over `spread` (uniform, centred on 0).
    pub(crate) fn quantized_spread(
        dtype: GgmlDType,
        n: usize,
        k: usize,
        seed: u64,
        spread: f32,
    ) -> (Vec<u8>, Vec<f32>) {
        let dev = Device::Cpu;
        let mut s = seed;
        let vals: Vec<f32> = (0..n * k)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * spread
            })
            .collect();
        let t = Tensor::from_vec(vals, (n, k), &dev).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let raw = q.data().unwrap().to_vec();
        let deq = q.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (raw, deq)
    }

    fn activations(k: usize, seed: u64) -> Vec<f32> {
        (0..k).map(|i| ((i as f32 * 0.37 + seed as f32).sin() * 3.0) + if i % 97 == 0 { 9.0 } else { 0.0 }).collect()
    }

    /// Dequantized weights · dequantized activations, in f64: what every kernel must compute.
    fn reference(deq: &[f32], a: &[Q8K], k: usize, row: usize) -> f64 {
        let mut s = 0f64;
        for (j, w) in deq[row * k..(row + 1) * k].iter().enumerate() {
            let b = &a[j / QK_K];
            s += *w as f64 * (b.d as f64 * b.qs[j % QK_K] as f64);
        }
        s
    }

    #[test]
    fn row_dequantization_matches_candle() {
        for (dtype, kind) in [(GgmlDType::Q4K, Kind::Q4K), (GgmlDType::Q6K, Kind::Q6K)] {
            let (n, k) = (4, 768);
            let (raw, deq) = quantized(dtype, n, k, 21);
            let row_bytes = k / QK_K * kind.block_bytes();
            for r in 0..n {
                let mut out = vec![f32::NAN; k];
                dequantize_row(kind, &raw[r * row_bytes..(r + 1) * row_bytes], &mut out);
                // Same formula in the same order as candle's: bit-identical, so the lookup changes no logit.
                assert_eq!(out, deq[r * k..(r + 1) * k], "{kind:?} row {r}");
            }
        }
    }

    #[test]
    fn q8k_quantization_round_trips_within_half_a_step() {
        let x = activations(512, 3);
        let mut q = Vec::new();
        quantize_q8k(&x, &mut q);
        assert_eq!(q.len(), 2);
        for (i, v) in x.iter().enumerate() {
            let b = &q[i / QK_K];
            let back = b.d * b.qs[i % QK_K] as f32;
            assert!((back - v).abs() <= b.d.abs() * 0.5 + 1e-6, "x[{i}] = {v}, back {back}");
        }
        for b in &q {
            for g in 0..16 {
                assert_eq!(b.bsums[g], b.qs[16 * g..16 * g + 16].iter().map(|&v| v as i16).sum::<i16>());
            }
            assert!(b.qs.iter().any(|&v| v == -127 || v == 127));
        }
        let mut z = Vec::new();
        quantize_q8k(&[0.0; 256], &mut z);
        assert_eq!(z[0].d, 0.0);
        assert!(z[0].qs.iter().all(|&v| v == 0));
    }

    #[test]
    fn kernels_match_candles_dequantization() {
        for (dtype, kind) in [(GgmlDType::Q4K, Kind::Q4K), (GgmlDType::Q6K, Kind::Q6K)] {
            for (n, k, seed) in [(3, 256, 1), (5, 1536, 2), (2, 8960, 3)] {
                let (raw, deq) = quantized(dtype, n, k, seed);
                let x = activations(k, seed);
                let mut a = Vec::new();
                quantize_q8k(&x, &mut a);
                let row_bytes = k / QK_K * kind.block_bytes();
                assert_eq!(raw.len(), n * row_bytes);
                for r in 0..n {
                    let want = reference(&deq, &a, k, r);
                    let row = &raw[r * row_bytes..(r + 1) * row_bytes];
                    let scale = deq[r * k..(r + 1) * k].iter().zip(&x).map(|(w, x)| (w * x).abs() as f64).sum::<f64>();
                    for simd in [false, true] {
                        let got = dot(kind, row, &a, simd) as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * scale + 1e-6,
                            "{kind:?} {n}×{k} row {r} simd {simd}: {got} vs {want} (scale {scale})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn simd_and_scalar_agree_on_extreme_values() {
        // Largest quants and activations: the integer pipeline must not saturate.
        for kind in [Kind::Q4K, Kind::Q6K] {
            let blocks = 4;
            let mut row = vec![0xFFu8; blocks * kind.block_bytes()];
            for b in 0..blocks {
                let o = b * kind.block_bytes();
                let d = f16::from_f32(0.01).to_bits().to_le_bytes();
                match kind {
                    Kind::Q4K | Kind::Q4K16 => {
                        row[o..o + 2].copy_from_slice(&d);
                        row[o + 2..o + 4].copy_from_slice(&d);
                    }
                    Kind::Q6K | Kind::Q6K16 => {
                        // scales ±127 (int8), d last.
                        for s in 0..16 {
                            row[o + 192 + s] = if s % 3 == 1 { 0x81 } else { 127 };
                        }
                        row[o + 208..o + 210].copy_from_slice(&d);
                    }
                }
            }
            let x: Vec<f32> = (0..blocks * QK_K).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
            let mut a = Vec::new();
            quantize_q8k(&x, &mut a);
            let (s, v) = (dot(kind, &row, &a, false), dot(kind, &row, &a, true));
            assert!(s.is_finite() && s != 0.0, "{kind:?}: scalar {s}, simd {v}");
            assert!((s - v).abs() <= 1e-4 * s.abs(), "{kind:?}: scalar {s} vs simd {v}");
        }
    }

    #[test]
    fn gemv_many_matches_separate_products() {
        let k = 512;
        let (q4, _) = quantized(GgmlDType::Q4K, 33, k, 11);
        let (q6, _) = quantized(GgmlDType::Q6K, 17, k, 12);
        let (q4b, _) = quantized(GgmlDType::Q4K, 5, k, 13);
        let x = activations(k, 5);
        let mats = [
            Matrix { kind: Kind::Q4K, w: &q4, n: 33 },
            Matrix { kind: Kind::Q6K, w: &q6, n: 17 },
            Matrix { kind: Kind::Q4K, w: &q4b, n: 5 },
        ];
        let (mut a, mut b, mut c) = (vec![f32::NAN; 33], vec![f32::NAN; 17], vec![f32::NAN; 5]);
        gemv_many(&mats, k, &x, &mut [&mut a, &mut b, &mut c]);
        for (m, got) in mats.iter().zip([&a, &b, &c]) {
            let mut want = vec![0f32; m.n];
            gemv(m.kind, m.w, m.n, k, &x, &mut want);
            assert_eq!(got, &want);
        }
    }

    #[test]
    fn several_rows_give_exactly_what_each_row_gives_alone() {
        let k = 512;
        let (q4, _) = quantized(GgmlDType::Q4K, 37, k, 21);
        let (q6, _) = quantized(GgmlDType::Q6K, 19, k, 22);
        let mats = [Matrix { kind: Kind::Q4K, w: &q4, n: 37 }, Matrix { kind: Kind::Q6K, w: &q6, n: 19 }];
        let xs: Vec<Vec<f32>> = (0..5).map(|r| activations(k, 30 + r)).collect();
        let rows: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let (mut a, mut b) = (vec![f32::NAN; 37 * 5], vec![f32::NAN; 19 * 5]);
        gemm_many(&mats, k, &rows, &mut [&mut a, &mut b]);
        for (r, x) in xs.iter().enumerate() {
            let (mut ya, mut yb) = (vec![0f32; 37], vec![0f32; 19]);
            gemv_many(&mats, k, x, &mut [&mut ya, &mut yb]);
            // Bit for bit: batching must not change an answer.
            assert_eq!(&a[r * 37..(r + 1) * 37], ya.as_slice(), "row {r}, Q4_K");
            assert_eq!(&b[r * 19..(r + 1) * 19], yb.as_slice(), "row {r}, Q6_K");
        }
    }

    #[test]
    fn prompt_sized_passes_give_what_each_row_gives_alone() {
        // More rows than one group (a prompt's pass, or a decode pass of several sessions' rows): on a CPU without
        // AVX-512 VNNI each work item's weight blocks are unpacked once and every group of rows reads them
        // (`unpack_rows`), with VNNI each group reads them in place; short rows run whole, long ones (8,960) in
        // pieces. Both must
        // give each row, bit for bit, what it gets alone — with quants at their extremes too (15 for Q4_K, 63 for
        // Q6_K, against ±127 activations: the largest 16-bit sums the AVX2 kernels form).
        for (k, count, spread) in [(512, 21, 0.2), (8960, 11, 0.2), (512, 9, 50.0)] {
            let (q4, _) = quantized_spread(GgmlDType::Q4K, 37, k, 23, spread);
            let (q6, _) = quantized_spread(GgmlDType::Q6K, 19, k, 24, spread);
            let mats = [Matrix { kind: Kind::Q4K, w: &q4, n: 37 }, Matrix { kind: Kind::Q6K, w: &q6, n: 19 }];
            let xs: Vec<Vec<f32>> = (0..count)
                .map(|r| {
                    if r % 4 == 3 {
                        (0..k).map(|i| if i % 5 == 0 { -1.0 } else { 1.0 }).collect()
                    } else {
                        activations(k, 40 + r as u64)
                    }
                })
                .collect();
            let rows: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
            let (mut a, mut b) = (vec![f32::NAN; 37 * count], vec![f32::NAN; 19 * count]);
            gemm_many(&mats, k, &rows, &mut [&mut a, &mut b]);
            for (r, x) in xs.iter().enumerate() {
                let (mut ya, mut yb) = (vec![0f32; 37], vec![0f32; 19]);
                gemv_many(&mats, k, x, &mut [&mut ya, &mut yb]);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a[r * 37..(r + 1) * 37]), bits(&ya), "k {k}, row {r} of {count}, Q4_K");
                assert_eq!(bits(&b[r * 19..(r + 1) * 19]), bits(&yb), "k {k}, row {r} of {count}, Q6_K");
                assert!(ya.iter().chain(&yb).all(|v| v.is_finite()) && ya.iter().any(|v| *v != 0.0));
            }
        }
    }

    #[test]
    fn arranged_lanes_hold_one_sub_block_each() {
        // Every value lands in a distinct slot, and the 16 values that share a 32-bit word pair (h, p) of a group
        // are consecutive (one Q6_K sub-block, half a Q4_K one), with their sum where the kernels look for it.
        let mut y = Q8K::default();
        for (v, q) in y.qs.iter_mut().enumerate() {
            *q = ((v * 37 % 255) as i32 - 127) as i8; // -127..=127, spread over the block
        }
        for (s, g) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
            *s = g.iter().map(|&q| q as i16).sum();
        }
        let l = arrange(&y);
        let mut seen = [false; QK_K];
        for v in 0..QK_K {
            assert!(!std::mem::replace(&mut seen[lane_slot(v)], true), "slot of {v} taken twice");
            assert_eq!(l.qs[lane_slot(v)], y.qs[v]);
        }
        for g in 0..2 {
            for h in 0..2 {
                for p in 0..4 {
                    // Word (h, p) of the 4 transposed registers of group g.
                    let vals: Vec<usize> = (0..4)
                        .flat_map(|t| (0..4).map(move |b| 32 * (4 * g + t) + 16 * h + 4 * p + b))
                        .map(|slot| (0..QK_K).find(|&v| lane_slot(v) == slot).unwrap())
                        .collect();
                    let lo = *vals.iter().min().unwrap();
                    assert_eq!(lo % 16, 0);
                    assert!(vals.iter().all(|&v| v - lo < 16), "group {g} word ({h}, {p}): {vals:?}");
                    let sum: i32 = vals.iter().map(|&v| y.qs[v] as i32).sum();
                    assert_eq!(l.bsums_q6k[2 * (4 * h + p) + g] as i32, sum);
                    assert_eq!(l.bsums_q4k[8 * h + 4 * g + p] as i32, sum);
                }
            }
        }
    }

    /// `rows_lanes` over weight rows of `kind`, returning values[activation row][weight row].
    #[cfg(target_arch = "x86_64")]
    fn lanes_products(kind: Kind, w: &[u8], n: usize, k: usize, xs: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let row_bytes = k / QK_K * kind.block_bytes();
        let lanes: Vec<Vec<Q8KLanes>> = xs
            .iter()
            .map(|x| {
                let mut a = Vec::new();
                quantize_q8k(x, &mut a);
                a.iter().map(arrange).collect()
            })
            .collect();
        let refs: Vec<&[Q8KLanes]> = lanes.iter().map(|l| l.as_slice()).collect();
        let mut out = vec![vec![f32::NAN; n]; xs.len()];
        for start in (0..n).step_by(ROWS_PER_ITEM) {
            rows_lanes(kind, w, row_bytes, start..(start + ROWS_PER_ITEM).min(n), &refs, |r, j, v| out[j][r] = v);
        }
        out
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn long_rows_in_pieces_give_what_each_row_gives_alone() {
        if !simd_available() {
            eprintln!("no AVX2: the SIMD kernels are not built for this CPU");
            return;
        }
        // 8,960 columns: 2+ activation rows outgrow L1 and the weight rows are walked in pieces; one row is not.
        let k = 8960;
        for (dtype, kind) in [(GgmlDType::Q4K, Kind::Q4K), (GgmlDType::Q6K, Kind::Q6K)] {
            let n = 19;
            let (raw, _) = quantized(dtype, n, k, 41);
            let xs: Vec<Vec<f32>> = (0..8).map(|r| activations(k, 50 + r)).collect();
            assert!(2 * (k / QK_K) * std::mem::size_of::<Q8KLanes>() > L1_ACTS_BYTES, "the test must take pieces");
            for count in [8, 5, 2] {
                let together = lanes_products(kind, &raw, n, k, &xs[..count]);
                for (j, x) in xs[..count].iter().enumerate() {
                    let alone = lanes_products(kind, &raw, n, k, std::slice::from_ref(x));
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&together[j]), bits(&alone[0]), "{kind:?}: {count} rows, row {j}");
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vnni_and_avx2_variants_compute_the_same_bits() {
        if !vnni_available() {
            eprintln!("no AVX-512 VNNI on this CPU: only the AVX2 variant runs here");
            return;
        }
        for (dtype, kind) in [(GgmlDType::Q4K, Kind::Q4K), (GgmlDType::Q6K, Kind::Q6K)] {
            let k = 1536;
            let (raw, _) = quantized_spread(dtype, 3, k, 61, 2.0);
            let lanes: Vec<Vec<Q8KLanes>> = (0..3)
                .map(|r| {
                    let mut a = Vec::new();
                    quantize_q8k(&activations(k, 70 + r), &mut a);
                    a.iter().map(arrange).collect()
                })
                .collect();
            let row_bytes = k / QK_K * kind.block_bytes();
            for r in 0..3 {
                let row = &raw[r * row_bytes..(r + 1) * row_bytes];
                let a: [&[Q8KLanes]; 3] = std::array::from_fn(|j| lanes[j].as_slice());
                // SAFETY: AVX2/FMA and AVX-512 F/VL/VNNI were detected above; the row and the activation rows hold
                // k / 256 blocks each.
                let (v, x) = unsafe {
                    let mut v: [lanes::__m256; 3] = std::mem::zeroed();
                    let mut x: [lanes::__m256; 3] = std::mem::zeroed();
                    match kind {
                        Kind::Q4K | Kind::Q4K16 => {
                            lanes::vnni::q4k(row, a, &mut v);
                            lanes::avx2::q4k(row, a, &mut x);
                        }
                        Kind::Q6K | Kind::Q6K16 => {
                            lanes::vnni::q6k(row, a, &mut v);
                            lanes::avx2::q6k(row, a, &mut x);
                        }
                    }
                    (v.map(|s| lanes::hsum(s)), x.map(|s| lanes::hsum(s)))
                };
                assert_eq!(v.map(f32::to_bits), x.map(f32::to_bits), "{kind:?} row {r}");
                assert!(v.iter().all(|s| s.is_finite() && *s != 0.0));
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn unpacked_blocks_give_the_bits_of_blocks_read_in_place() {
        // `gemm_many` unpacks a work item's blocks once only on CPUs without AVX-512 VNNI (a prompt's many groups
        // of rows); this checks that path against reading the blocks in place on whatever CPU runs the tests (the
        // VNNI variant here where the CPU has it, the AVX2 one elsewhere), with quants at their extremes too.
        assert!(simd_available(), "the decode kernels need AVX2 and FMA (every CPU this project runs on has them)");
        for spread in [2.0, 50.0] {
            for (dtype, kind) in [(GgmlDType::Q4K, Kind::Q4K), (GgmlDType::Q6K, Kind::Q6K)] {
                let (k, n, rows) = (1536, ROWS_PER_ITEM, 5);
                let (raw, _) = quantized_spread(dtype, n, k, 81, spread);
                let lanes: Vec<Vec<Q8KLanes>> = (0..rows)
                    .map(|r| {
                        let mut a = Vec::new();
                        quantize_q8k(&activations(k, 90 + r as u64), &mut a);
                        a.iter().map(arrange).collect()
                    })
                    .collect();
                let acts: Vec<&[Q8KLanes]> = lanes.iter().map(|l| l.as_slice()).collect();
                let row_bytes = k / QK_K * kind.block_bytes();
                let mut u = Vec::new();
                unpack_rows(kind, &raw, row_bytes, 0..n, k / QK_K, &mut u);
                let (mut in_place, mut via) = (vec![f32::NAN; n * rows], vec![f32::NAN; n * rows]);
                rows_lanes_from(kind, &raw, row_bytes, 0..n, &acts, Via::default(), |r, j, v| in_place[j * n + r] = v);
                let from = Via { unpacked: Some(&u), totals: None };
                rows_lanes_from(kind, &raw, row_bytes, 0..n, &acts, from, |r, j, v| via[j * n + r] = v);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&via), bits(&in_place), "{kind:?}, spread {spread}");
                assert!(via.iter().all(|v| v.is_finite()) && via.iter().any(|v| *v != 0.0), "{kind:?}");
            }
        }
    }

    #[test]
    fn q4k_scale_unpacking_follows_the_bit_layout() {
        // Scales 0-3 / mins 0-3: low 6 bits of bytes 0-3 / 4-7; scales 4-7 / mins 4-7: low / high nibble of
        // bytes 8-11 plus the top 2 bits of bytes 0-3 / 4-7.
        let s: [u8; 12] = [0xC1, 0x42, 0x83, 0x04, 0x45, 0x86, 0xC7, 0x08, 0x9A, 0xBC, 0xDE, 0xF0];
        let sm = q4k_scales_mins(&s);
        for j in 0..4 {
            assert_eq!(sm[j], s[j] & 63, "scale {j}");
            assert_eq!(sm[8 + j], s[j + 4] & 63, "min {j}");
            assert_eq!(sm[4 + j], (s[j + 8] & 0xF) | ((s[j] >> 6) << 4), "scale {}", j + 4);
            assert_eq!(sm[12 + j], (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4), "min {}", j + 4);
        }
    }

    #[test]
    fn gemv_matches_row_by_row_dots() {
        for (dtype, kind) in [(GgmlDType::Q4K, Kind::Q4K), (GgmlDType::Q6K, Kind::Q6K)] {
            let (n, k) = (37, 512); // not a multiple of the rows per work item
            let (raw, _) = quantized(dtype, n, k, 9);
            let x = activations(k, 4);
            let mut y = vec![f32::NAN; n];
            gemv(kind, &raw, n, k, &x, &mut y);
            let mut a = Vec::new();
            quantize_q8k(&x, &mut a);
            let row_bytes = k / QK_K * kind.block_bytes();
            for (r, v) in y.iter().enumerate() {
                assert_eq!(*v, dot(kind, &raw[r * row_bytes..(r + 1) * row_bytes], &a, true), "{kind:?} row {r}");
            }
        }
    }
}
