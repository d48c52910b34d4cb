//! Quantized matrix × vector products for decoding, over the weights' own GGUF blocks.
//!
//! Why our own: decoding one token reads every weight once, so its speed is memory bandwidth divided by bytes per
//! weight. Measured on the 2-core EPYC this project runs on (perf, `examples/bench_engine`), candle 0.11.1 decodes
//! the default Q4_K_M model at 20 tok/s where llama.cpp does 35: its x86 path repacks Q4_K into tiles that carry
//! f32 scales (6 bits a weight instead of 4.5, a third more bytes streamed per token), and its Q6_K dot product,
//! kept compact, runs at ~17 GB/s against ~35 GB/s for a streaming kernel. The kernels here read the compact
//! blocks directly (Q4_K 144 bytes, Q6_K 210 bytes per 256 weights), multiply with AVX2 integer dot products
//! against the activation quantized to 8 bits per 256-value block (the same Q8_K activation quantization candle
//! and ggml use), and apply each sub-block's scale inside the integer pipeline (`madd`), so the only float work is
//! one multiply-add per 256 weights.
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
            Kind::Q4K => Q4K_BYTES,
            Kind::Q6K => Q6K_BYTES,
        }
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

/// Each of `xs` quantized into the matching row of `act` (resized to `xs[r].len() / 256` blocks). A prompt's
/// rows (hundreds × up to 8,960 values per product) are shared out over candle's thread pool; a few rows (decode,
/// candidates) are quantized on the calling thread, where handing out would cost more than it saves.
pub(crate) fn quantize_rows(xs: &[&[f32]], act: &mut [Vec<Q8K>]) {
    for (a, x) in act.iter_mut().zip(xs) {
        assert_eq!(x.len() % QK_K, 0, "activation length {} is not a multiple of {QK_K}", x.len());
        a.resize(x.len() / QK_K, Q8K::default());
    }
    if xs.len() <= MAX_ROWS_AT_ONCE {
        for (a, x) in act.iter_mut().zip(xs) {
            quantize_q8k_into(x, a);
        }
        return;
    }
    struct Rows(*mut Vec<Q8K>);
    // SAFETY: each pool work item r writes row r only (`execute_chunked` hands every index to exactly one
    // worker), no row is read while the pool runs, and `act` outlives the call (it returns when all are done).
    unsafe impl Sync for Rows {}
    let rows = Rows(act.as_mut_ptr());
    let rows = &rows;
    candle_core::utils::barrier_pool().execute_chunked(xs.len(), |range| {
        for r in range {
            // SAFETY: r < xs.len() <= act.len(), and row r belongs to this work item alone (see `Rows`).
            let a = unsafe { &mut *rows.0.add(r) };
            quantize_q8k_into(xs[r], a);
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
    assert_eq!(out.len() % QK_K, 0);
    assert!(row.len() >= out.len() / QK_K * kind.block_bytes());
    for (b, y) in row.chunks_exact(kind.block_bytes()).zip(out.chunks_exact_mut(QK_K)) {
        match kind {
            Kind::Q4K => {
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
            Kind::Q6K => {
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{f16_at, q4k_scales_mins, Q4K_BYTES, Q6K_BYTES, Q8K};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `row` holds `a.len()` Q4_K blocks.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4k(row: &[u8], a: &[Q8K]) -> f32 {
        debug_assert!(row.len() >= a.len() * Q4K_BYTES);
        // SAFETY: the caller guarantees AVX2/FMA and that `row` holds `a.len()` blocks of Q4K_BYTES bytes, so
        // every load below (block i of the row, the 256 quants and 16 sums of activation block i) is in bounds.
        unsafe {
            let m4 = _mm256_set1_epi8(0x0F);
            // Byte shuffles that turn the 16 unpacked scale/min bytes (in both 128-bit lanes) into 16-bit lanes:
            // `spread(j)` repeats scale j in all 16 lanes; `MINS` lays out min0,min0,min1,min1,… (one per bsum).
            let spread = |j: i8| _mm256_set1_epi16(j as i16 | (0x80u16 as i16) << 8);
            let sc_idx = [spread(0), spread(1), spread(2), spread(3), spread(4), spread(5), spread(6), spread(7)];
            let z = -128i8; // 0x80: shuffle writes a zero byte
            #[rustfmt::skip]
            let mins_idx = _mm256_setr_epi8(
                8, z, 8, z, 9, z, 9, z, 10, z, 10, z, 11, z, 11, z,
                12, z, 12, z, 13, z, 13, z, 14, z, 14, z, 15, z, 15, z,
            );
            let mut acc = _mm256_setzero_ps();
            for (i, y) in a.iter().enumerate() {
                let b = &row[i * Q4K_BYTES..(i + 1) * Q4K_BYTES];
                let d = y.d * f16_at(b, 0);
                let dmin = y.d * f16_at(b, 2);
                let sm = q4k_scales_mins(&b[4..16]);
                let sm = _mm256_broadcastsi128_si256(_mm_loadu_si128(sm.as_ptr() as *const __m128i));
                let qs = b.as_ptr().add(16);
                let ys = y.qs.as_ptr();
                let mut isum = _mm256_setzero_si256();
                for j in 0..4 {
                    let q = _mm256_loadu_si256(qs.add(32 * j) as *const __m256i);
                    let lo = _mm256_and_si256(q, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                    let ylo = _mm256_loadu_si256(ys.add(64 * j) as *const __m256i);
                    let yhi = _mm256_loadu_si256(ys.add(64 * j + 32) as *const __m256i);
                    // u8 × i8 pairs → i16 (|·| ≤ 2·15·127), then × the sub-block scale and pairwise → i32.
                    let slo = _mm256_shuffle_epi8(sm, sc_idx[2 * j]);
                    let shi = _mm256_shuffle_epi8(sm, sc_idx[2 * j + 1]);
                    let plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, ylo), slo);
                    let phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, yhi), shi);
                    isum = _mm256_add_epi32(isum, _mm256_add_epi32(plo, phi));
                }
                // The mins: Σ_j min_j · (sum of the activations of sub-block j), from the 16-value sums.
                let bs = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
                let msum = _mm256_madd_epi16(bs, _mm256_shuffle_epi8(sm, mins_idx));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d), acc);
                acc = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_set1_ps(dmin), acc);
            }
            hsum(acc)
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `row` holds `a.len()` Q6_K blocks.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q6k(row: &[u8], a: &[Q8K]) -> f32 {
        debug_assert!(row.len() >= a.len() * Q6K_BYTES);
        // SAFETY: the caller guarantees AVX2/FMA and that `row` holds `a.len()` blocks of Q6K_BYTES bytes, so
        // every load below (block i of the row, the 256 quants and 16 sums of activation block i) is in bounds.
        unsafe {
            let m4 = _mm256_set1_epi8(0x0F);
            let m30 = _mm256_set1_epi8(0x30);
            let mut acc = _mm256_setzero_ps();
            // Byte shuffles that spread scales s, s+1 over 8 lanes each, for the 8 scale pairs of a block.
            let pair =
                |s: i8| _mm_set_epi8(s + 1, s + 1, s + 1, s + 1, s + 1, s + 1, s + 1, s + 1, s, s, s, s, s, s, s, s);
            let idx = [pair(0), pair(2), pair(4), pair(6), pair(8), pair(10), pair(12), pair(14)];
            for (i, y) in a.iter().enumerate() {
                let b = &row[i * Q6K_BYTES..(i + 1) * Q6K_BYTES];
                let p = b.as_ptr();
                let d = y.d * f16_at(b, 208);
                let sc = _mm_loadu_si128(p.add(192) as *const __m128i);
                // Quants are stored +32: Σ sc·(q−32)·y = Σ sc·q·y − 32·Σ sc·bsum.
                let bs = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
                let corr = _mm256_madd_epi16(bs, _mm256_cvtepi8_epi16(sc));
                let mut isum = _mm256_setzero_si256();
                let ys = y.qs.as_ptr();
                for h in 0..2 {
                    let ql0 = _mm256_loadu_si256(p.add(64 * h) as *const __m256i);
                    let ql1 = _mm256_loadu_si256(p.add(64 * h + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(p.add(128 + 32 * h) as *const __m256i);
                    let q = [
                        _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30)),
                        _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30)),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30)),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                            _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
                        ),
                    ];
                    for (k, q) in q.iter().enumerate() {
                        let yk = _mm256_loadu_si256(ys.add(128 * h + 32 * k) as *const __m256i);
                        let s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, idx[4 * h + k]));
                        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(*q, yk), s));
                    }
                }
                let isum = _mm256_sub_epi32(isum, _mm256_slli_epi32(corr, 5));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d), acc);
            }
            hsum(acc)
        }
    }

    /// [`dot_q4k`] of one row against `R` activation rows at once: the weights are unpacked (nibbles, scales and
    /// mins) once per block for all rows, and each row's integer and float steps are exactly those of `dot_q4k`,
    /// in the same order, so every result is bit-identical to the single-row one.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `row` holds `a[r].len()` Q4_K blocks for every `r` (all equal).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4k_rows<const R: usize>(row: &[u8], a: [&[Q8K]; R]) -> [f32; R] {
        let nb = a[0].len();
        debug_assert!(row.len() >= nb * Q4K_BYTES && a.iter().all(|x| x.len() == nb));
        // SAFETY: the caller guarantees AVX2/FMA and that `row` holds `nb` blocks and every activation row `nb`
        // blocks, so every load below (block i of the row, the 256 quants and 16 sums of activation block i) is in
        // bounds.
        unsafe {
            let m4 = _mm256_set1_epi8(0x0F);
            let spread = |j: i8| _mm256_set1_epi16(j as i16 | (0x80u16 as i16) << 8);
            let sc_idx = [spread(0), spread(1), spread(2), spread(3), spread(4), spread(5), spread(6), spread(7)];
            let z = -128i8;
            #[rustfmt::skip]
            let mins_idx = _mm256_setr_epi8(
                8, z, 8, z, 9, z, 9, z, 10, z, 10, z, 11, z, 11, z,
                12, z, 12, z, 13, z, 13, z, 14, z, 14, z, 15, z, 15, z,
            );
            let mut acc = [_mm256_setzero_ps(); R];
            for i in 0..nb {
                let b = &row[i * Q4K_BYTES..(i + 1) * Q4K_BYTES];
                let (dw, dminw) = (f16_at(b, 0), f16_at(b, 2));
                let sm = q4k_scales_mins(&b[4..16]);
                let sm = _mm256_broadcastsi128_si256(_mm_loadu_si128(sm.as_ptr() as *const __m128i));
                let qs = b.as_ptr().add(16);
                let mut isum = [_mm256_setzero_si256(); R];
                for j in 0..4 {
                    let q = _mm256_loadu_si256(qs.add(32 * j) as *const __m256i);
                    let lo = _mm256_and_si256(q, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                    let slo = _mm256_shuffle_epi8(sm, sc_idx[2 * j]);
                    let shi = _mm256_shuffle_epi8(sm, sc_idx[2 * j + 1]);
                    for r in 0..R {
                        let ys = a[r][i].qs.as_ptr();
                        let ylo = _mm256_loadu_si256(ys.add(64 * j) as *const __m256i);
                        let yhi = _mm256_loadu_si256(ys.add(64 * j + 32) as *const __m256i);
                        let plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, ylo), slo);
                        let phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, yhi), shi);
                        isum[r] = _mm256_add_epi32(isum[r], _mm256_add_epi32(plo, phi));
                    }
                }
                let mins = _mm256_shuffle_epi8(sm, mins_idx);
                for r in 0..R {
                    let y = &a[r][i];
                    let (d, dmin) = (y.d * dw, y.d * dminw);
                    let bs = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
                    let msum = _mm256_madd_epi16(bs, mins);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(d), acc[r]);
                    acc[r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_set1_ps(dmin), acc[r]);
                }
            }
            acc.map(|v| hsum(v))
        }
    }

    /// [`dot_q6k`] of one row against `R` activation rows at once (see [`dot_q4k_rows`]; bit-identical per row).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `row` holds `a[r].len()` Q6_K blocks for every `r` (all equal).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q6k_rows<const R: usize>(row: &[u8], a: [&[Q8K]; R]) -> [f32; R] {
        let nb = a[0].len();
        debug_assert!(row.len() >= nb * Q6K_BYTES && a.iter().all(|x| x.len() == nb));
        // SAFETY: as in `dot_q4k_rows`, every load is within block i of the row or of an activation row.
        unsafe {
            let m4 = _mm256_set1_epi8(0x0F);
            let m30 = _mm256_set1_epi8(0x30);
            let mut acc = [_mm256_setzero_ps(); R];
            let pair =
                |s: i8| _mm_set_epi8(s + 1, s + 1, s + 1, s + 1, s + 1, s + 1, s + 1, s + 1, s, s, s, s, s, s, s, s);
            let idx = [pair(0), pair(2), pair(4), pair(6), pair(8), pair(10), pair(12), pair(14)];
            for i in 0..nb {
                let b = &row[i * Q6K_BYTES..(i + 1) * Q6K_BYTES];
                let p = b.as_ptr();
                let dw = f16_at(b, 208);
                let sc = _mm_loadu_si128(p.add(192) as *const __m128i);
                let sc16 = _mm256_cvtepi8_epi16(sc);
                let mut corr = [_mm256_setzero_si256(); R];
                for r in 0..R {
                    let bs = _mm256_loadu_si256(a[r][i].bsums.as_ptr() as *const __m256i);
                    corr[r] = _mm256_madd_epi16(bs, sc16);
                }
                let mut isum = [_mm256_setzero_si256(); R];
                for h in 0..2 {
                    let ql0 = _mm256_loadu_si256(p.add(64 * h) as *const __m256i);
                    let ql1 = _mm256_loadu_si256(p.add(64 * h + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(p.add(128 + 32 * h) as *const __m256i);
                    let q = [
                        _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30)),
                        _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30)),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30)),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                            _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
                        ),
                    ];
                    for (k, q) in q.iter().enumerate() {
                        let s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, idx[4 * h + k]));
                        for r in 0..R {
                            let yk = _mm256_loadu_si256(a[r][i].qs.as_ptr().add(128 * h + 32 * k) as *const __m256i);
                            isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(*q, yk), s));
                        }
                    }
                }
                for r in 0..R {
                    let d = a[r][i].d * dw;
                    let v = _mm256_sub_epi32(isum[r], _mm256_slli_epi32(corr[r], 5));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(d), acc[r]);
                }
            }
            acc.map(|v| hsum(v))
        }
    }
}

/// Dot product of one row of `kind` blocks with quantized activations, on the fastest path this CPU has.
pub fn dot(kind: Kind, row: &[u8], a: &[Q8K], simd: bool) -> f32 {
    assert!(row.len() >= a.len() * kind.block_bytes(), "row of {} bytes for {} blocks", row.len(), a.len());
    #[cfg(target_arch = "x86_64")]
    if simd && simd_available() {
        // SAFETY: AVX2 and FMA were detected at run time just above, and the row holds `a.len()` blocks (asserted).
        return unsafe {
            match kind {
                Kind::Q4K => avx2::dot_q4k(row, a),
                Kind::Q6K => avx2::dot_q6k(row, a),
            }
        };
    }
    let _ = simd;
    match kind {
        Kind::Q4K => dot_q4k_scalar(row, a),
        Kind::Q6K => dot_q6k_scalar(row, a),
    }
}

/// [`dot`] of one weight row against several activation rows, into `out` (one value per activation row): the
/// weights are unpacked once for up to four rows at a time. Bit-identical to calling [`dot`] row by row.
pub fn dot_rows(kind: Kind, row: &[u8], acts: &[&[Q8K]], simd: bool, out: &mut [f32]) {
    assert_eq!(acts.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if simd && simd_available() && acts.len() > 1 {
        let nb = acts[0].len();
        assert!(acts.iter().all(|a| a.len() == nb), "activation rows of different widths");
        assert!(row.len() >= nb * kind.block_bytes(), "row of {} bytes for {nb} blocks", row.len());
        let mut start = 0;
        while start < acts.len() {
            let n = (acts.len() - start).min(4);
            let a = &acts[start..start + n];
            let o = &mut out[start..start + n];
            // SAFETY: AVX2 and FMA were detected at run time just above; every activation row has `nb` blocks and
            // the weight row holds `nb` blocks (asserted).
            unsafe {
                match (kind, n) {
                    (Kind::Q4K, 4) => o.copy_from_slice(&avx2::dot_q4k_rows(row, [a[0], a[1], a[2], a[3]])),
                    (Kind::Q4K, 3) => o.copy_from_slice(&avx2::dot_q4k_rows(row, [a[0], a[1], a[2]])),
                    (Kind::Q4K, 2) => o.copy_from_slice(&avx2::dot_q4k_rows(row, [a[0], a[1]])),
                    (Kind::Q6K, 4) => o.copy_from_slice(&avx2::dot_q6k_rows(row, [a[0], a[1], a[2], a[3]])),
                    (Kind::Q6K, 3) => o.copy_from_slice(&avx2::dot_q6k_rows(row, [a[0], a[1], a[2]])),
                    (Kind::Q6K, 2) => o.copy_from_slice(&avx2::dot_q6k_rows(row, [a[0], a[1]])),
                    (_, _) => o[0] = dot(kind, row, a[0], simd),
                }
            }
            start += n;
        }
        return;
    }
    for (o, a) in out.iter_mut().zip(acts) {
        *o = dot(kind, row, a, simd);
    }
}

/// Which pass a product belongs to: a decoding step of one or a few rows, whose results must not depend on how
/// many rows share it ([`gemm_many`]), or a prompt ([`crate::engine::prompt_kernels::gemm_prompt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Step,
    Prompt,
}

/// One weight matrix for [`gemm_many`]: `n` rows of `kind` blocks in `w` (row-major, as in GGUF).
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub kind: Kind,
    pub w: &'a [u8],
    pub n: usize,
}

/// Raw pointers to outputs that candle's pool threads write at disjoint places (here: the rows of each product;
/// in `model::attend_heads`: the heads of one attention step). Users hand out work so that every output element
/// belongs to exactly one work item, and take the pointers from `&mut [f32]`s that outlive the pool call.
pub(crate) struct Outs(pub(crate) Vec<*mut f32>);
// SAFETY: under the contract above no element is written by two threads, none is read while written, and every
// pointer stays valid until the pool call returns (it returns only when all workers are done).
unsafe impl Sync for Outs {}

/// Activation rows one weight row is multiplied with in one go ([`dot_rows`] takes up to four at a time; more
/// would spill the accumulators out of the 16 AVX2 registers).
const MAX_ROWS_AT_ONCE: usize = 8;

/// How many weight rows ahead [`gemm_many`] asks the CPU to load a whole row (a row of the default model is
/// 0.9–5 KB): its cache lines are then requested together, not one by one as the dot product reaches them.
/// Measured on the 2-core Intel Xeon (decode of the default model, 8 questions): no prefetch 11.0 tok/s; the row
/// itself just before use 15.8; 1 ahead 16.8; 2 ahead 17.0; 4 ahead 16.3; 8 ahead 15.6.
const PREFETCH_ROWS: usize = 2;

/// Ask the CPU to bring `w[at..at + len]` (clipped to `w`) towards the cache, a line at a time. A hint only: no
/// result depends on it.
#[inline]
fn prefetch(w: &[u8], at: usize, len: usize) {
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
    }
    ACT.with(|act| {
        let mut act = act.borrow_mut();
        let have = act.len();
        act.resize_with(rows.max(have), Vec::new);
        quantize_rows(xs, &mut act[..rows]);
        let act: &[Vec<Q8K>] = &act[..rows];
        let act_refs: Vec<&[Q8K]> = act.iter().map(|a| a.as_slice()).collect();
        let act_refs = &act_refs;
        let simd = simd_available();
        let outs = Outs(ys.iter_mut().map(|y| y.as_mut_ptr()).collect());
        let outs = &outs;
        let first = &first;
        candle_core::utils::barrier_pool().execute_chunked(total, |items| {
            for item in items {
                let mi = first.partition_point(|&f| f <= item) - 1;
                let m = &mats[mi];
                let row_bytes = k / QK_K * m.kind.block_bytes();
                let start = (item - first[mi]) * ROWS_PER_ITEM;
                let mut vals = [0f32; MAX_ROWS_AT_ONCE];
                // A few input rows (decode, candidates): the weights stream through, a row or two ahead
                // (`prefetch`). More (a prompt, where the prompt kernels are not available): input rows outside,
                // this item's weight rows inside, so the item's weights (16 rows, 14–80 KB for the default model)
                // stay in cache while the prompt's rows go past them.
                if act_refs.len() <= MAX_ROWS_AT_ONCE {
                    for r in start..(start + ROWS_PER_ITEM).min(m.n) {
                        let w = &m.w[r * row_bytes..(r + 1) * row_bytes];
                        prefetch(m.w, (r + PREFETCH_ROWS) * row_bytes, row_bytes);
                        let v = &mut vals[..act_refs.len()];
                        dot_rows(m.kind, w, act_refs, simd, v);
                        for (j, v) in v.iter().enumerate() {
                            // SAFETY: j * m.n + r < rows * m.n = ys[mi].len(), and weight row r of matrix mi (for
                            // every input row) belongs to this item alone (see `Outs`).
                            unsafe { *outs.0[mi].add(j * m.n + r) = *v };
                        }
                    }
                    continue;
                }
                for (chunk, acts) in act_refs.chunks(MAX_ROWS_AT_ONCE).enumerate() {
                    for r in start..(start + ROWS_PER_ITEM).min(m.n) {
                        let w = &m.w[r * row_bytes..(r + 1) * row_bytes];
                        let v = &mut vals[..acts.len()];
                        dot_rows(m.kind, w, acts, simd, v);
                        for (jj, v) in v.iter().enumerate() {
                            let j = chunk * MAX_ROWS_AT_ONCE + jj;
                            // SAFETY: j * m.n + r < rows * m.n = ys[mi].len(), and weight row r of matrix mi (for
                            // every input row) belongs to this item alone (see `Outs`).
                            unsafe { *outs.0[mi].add(j * m.n + r) = *v };
                        }
                    }
                }
            }
        });
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
                    Kind::Q4K => {
                        row[o..o + 2].copy_from_slice(&d);
                        row[o + 2..o + 4].copy_from_slice(&d);
                    }
                    Kind::Q6K => {
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
