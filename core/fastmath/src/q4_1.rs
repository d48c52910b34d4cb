//! GGML Q4_1 weight rows against Q8_1 activation rows (ggml's `vec_dot_q4_1_q8_1`), each result bit-identical to
//! candle's `BlockQ4_1::vec_dot`, which for Q4_1 is its scalar reference loop on every CPU.
//!
//! Why here: the engine's own kernels cover the K-quants the shipped models use; any other format goes through
//! candle's quantized matmul, and for Q4_1 — the CI's tiny model (SmolLM2-135M Q4_1) — that is its reference loop,
//! one block at a time for every pair of input and weight rows: 56–78 % of a debug-built runtime test's time (perf,
//! 2026-12-07). The integer part of a block's product is exact whichever way it is summed, so the AVX2 paths sum it
//! with `maddubs`/`madd`; the float part is then computed per block in candle's order (`sumi · d_w · d_x + m_w ·
//! s_x`, added to the row's sum one block after the other, no fused multiply-add), so every value is the same `f32`
//! as before and no answer of a Q4_1 model changes. What pays is [`q4_1_gemm`] taking eight input rows per pass over
//! a weight row (the float work in eight lanes, each weight block loaded once); one row at a time it is about as
//! fast as candle's loop (measured). In this crate so that dev and test builds optimise it (see the crate's
//! documentation).

/// Bytes of one Q4_1 block: f16 scale `d`, f16 minimum `m`, 32 four-bit quants (value `j` in the low nibble of
/// byte `j`, value `16 + j` in its high nibble).
pub const Q4_1_BLOCK: usize = 20;
/// Bytes of one Q8_1 block: f16 scale `d`, f16 `s` (= `d` · the sum of the quants), 32 signed quants.
pub const Q8_1_BLOCK: usize = 36;
/// Values per block (both formats).
pub const QK: usize = 32;

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// `out[j][r]` = weight row `r` of `w` (`n` rows of `blocks` Q4_1 blocks, one after the other) · the Q8_1 row
/// `xs[j]` (`blocks` blocks), for every `r < n` and every activation row `j`.
///
/// With AVX2, activation rows go eight at a time through one pass over the weight rows (each weight block loaded
/// once for the eight, their sums vectorized across the rows: lane `j` computes exactly the scalar sequence of
/// row `j`); one or two rows left over take the single-row loop.
pub fn q4_1_gemm(w: &[u8], blocks: usize, n: usize, xs: &[&[u8]], out: &mut [&mut [f32]]) {
    let row = blocks * Q4_1_BLOCK;
    assert!(w.len() >= n * row, "{} bytes of weights for {n} rows of {blocks} blocks", w.len());
    assert_eq!(xs.len(), out.len());
    for (x, o) in xs.iter().zip(out.iter()) {
        assert_eq!(x.len(), blocks * Q8_1_BLOCK, "an activation row has {blocks} Q8_1 blocks");
        assert!(o.len() >= n, "an output row has room for {n} values");
    }
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    // Rows from `j` on take the one-row loop.
    #[cfg(target_arch = "x86_64")]
    let j = match avx2 {
        // SAFETY: the CPU has AVX2; sizes asserted above.
        true => unsafe { avx2::in_eights(w, blocks, n, xs, out) },
        false => 0,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let j = 0;
    for (x, o) in xs[j..].iter().zip(out[j..].iter_mut()) {
        for (r, v) in o[..n].iter_mut().enumerate() {
            *v = dot_row(avx2, &w[r * row..(r + 1) * row], x);
        }
    }
}

/// One weight row · one activation row: [`avx2::dot`] where `avx2` (the CPU has it), else [`dot_scalar`].
fn dot_row(avx2: bool, w: &[u8], x: &[u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is true only where the CPU has AVX2; the rows hold whole blocks (asserted by the caller).
        return unsafe { avx2::dot(w, x) };
    }
    let _ = avx2;
    dot_scalar(w, x)
}

/// The reference: candle's loop, value by value.
pub fn dot_scalar(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.chunks_exact(Q4_1_BLOCK).zip(x.chunks_exact(Q8_1_BLOCK)) {
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let v0 = (wb[4 + j] & 0x0F) as i32;
            let v1 = (wb[4 + j] >> 4) as i32;
            sumi += v0 * xb[4 + j] as i8 as i32 + v1 * xb[4 + j + QK / 2] as i8 as i32;
        }
        sumf += block_value(sumi, wb, xb);
    }
    sumf
}

/// A block's float value from its integer sum, in candle's order of operations.
#[inline(always)]
fn block_value(sumi: i32, wb: &[u8], xb: &[u8]) -> f32 {
    sumi as f32 * f16(&wb[0..2]) * f16(&xb[0..2]) + f16(&wb[2..4]) * f16(&xb[2..4])
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{block_value, Q4_1_BLOCK, Q8_1_BLOCK};
    use std::arch::x86_64::*;

    /// [`eight`] over `xs` in groups of up to eight while three or more rows are left; returns how many rows it
    /// did (the rest, at most two, are the one-row loop's).
    ///
    /// # Safety
    /// As [`eight`].
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn in_eights(w: &[u8], blocks: usize, n: usize, xs: &[&[u8]], out: &mut [&mut [f32]]) -> usize {
        let mut j = 0;
        while xs.len() - j >= 3 {
            let take = (xs.len() - j).min(8);
            // SAFETY: as this function's contract.
            unsafe { eight(w, blocks, n, &xs[j..j + take], &mut out[j..j + take]) };
            j += take;
        }
        j
    }

    /// Up to eight activation rows (`xs.len()` in 1..=8) against weight rows `0..n`: for each weight row and
    /// block, the eight rows' integer sums (`maddubs` + `madd`, then a transposing `hadd` tree, exact), then in
    /// eight float lanes `sumi · d_w · d_x + m_w · s_x` added to each row's sum — per lane the scalar sequence
    /// (separate multiplies and adds, no FMA), so every value has [`super::dot_scalar`]'s bits. Missing rows are
    /// computed on row 0's data and dropped.
    ///
    /// # Safety
    /// The CPU must have AVX2; `w` holds `n` rows of `blocks` blocks, each of `xs` `blocks` blocks, each of `out`
    /// at least `n` values.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn eight(w: &[u8], blocks: usize, n: usize, xs: &[&[u8]], out: &mut [&mut [f32]]) {
        debug_assert!((1..=8).contains(&xs.len()) && xs.len() == out.len());
        let lanes: [&[u8]; 8] = std::array::from_fn(|j| xs.get(j).copied().unwrap_or(xs[0]));
        // Each block's activation scale and s, as floats, lane j = row j (converted once, not once per weight row).
        let mut dx = vec![0f32; blocks * 8];
        let mut sx = vec![0f32; blocks * 8];
        for b in 0..blocks {
            for (j, x) in lanes.iter().enumerate() {
                dx[b * 8 + j] = super::f16(&x[b * Q8_1_BLOCK..]);
                sx[b * 8 + j] = super::f16(&x[b * Q8_1_BLOCK + 2..]);
            }
        }
        let low = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut sums = [0f32; 8];
        for r in 0..n {
            let wr = &w[r * blocks * Q4_1_BLOCK..(r + 1) * blocks * Q4_1_BLOCK];
            let mut acc = _mm256_setzero_ps();
            for (b, wb) in wr.chunks_exact(Q4_1_BLOCK).enumerate() {
                // SAFETY: `wb` has 20 bytes (16 read from offset 4); every lane's block b has 36 bytes (32 read from
                // offset 4); `dx`/`sx` have 8 floats at b * 8.
                unsafe {
                    let q = _mm_loadu_si128(wb.as_ptr().add(4) as *const __m128i);
                    let v = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low));
                    let p = |j: usize| {
                        let y = _mm256_loadu_si256(lanes[j].as_ptr().add(b * Q8_1_BLOCK + 4) as *const __m256i);
                        _mm256_madd_epi16(_mm256_maddubs_epi16(v, y), ones)
                    };
                    let t0 = _mm256_hadd_epi32(p(0), p(1));
                    let t1 = _mm256_hadd_epi32(p(2), p(3));
                    let t2 = _mm256_hadd_epi32(p(4), p(5));
                    let t3 = _mm256_hadd_epi32(p(6), p(7));
                    // Lanes: rows 0..4's sums of the low 128 bits, then of the high 128 bits; likewise rows 4..8.
                    let u0 = _mm256_hadd_epi32(t0, t1);
                    let u1 = _mm256_hadd_epi32(t2, t3);
                    let s = _mm256_add_epi32(
                        _mm256_permute2x128_si256(u0, u1, 0x20),
                        _mm256_permute2x128_si256(u0, u1, 0x31),
                    );
                    let dw = _mm256_set1_ps(super::f16(&wb[0..2]));
                    let mw = _mm256_set1_ps(super::f16(&wb[2..4]));
                    let dxv = _mm256_loadu_ps(dx.as_ptr().add(b * 8));
                    let sxv = _mm256_loadu_ps(sx.as_ptr().add(b * 8));
                    let v = _mm256_add_ps(
                        _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s), dw), dxv),
                        _mm256_mul_ps(mw, sxv),
                    );
                    acc = _mm256_add_ps(acc, v);
                }
            }
            // SAFETY: `sums` has 8 floats.
            unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), acc) };
            for (o, s) in out.iter_mut().zip(sums) {
                o[r] = s;
            }
        }
    }

    /// [`super::dot_scalar`]'s value, the integer sums by AVX2.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot(w: &[u8], x: &[u8]) -> f32 {
        let low = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut sumf = 0f32;
        for (wb, xb) in w.chunks_exact(Q4_1_BLOCK).zip(x.chunks_exact(Q8_1_BLOCK)) {
            // SAFETY: `wb` has 20 bytes (16 read from offset 4) and `xb` 36 (32 read from offset 4): unaligned loads
            // within the slices.
            let (q, y) = unsafe {
                (
                    _mm_loadu_si128(wb.as_ptr().add(4) as *const __m128i),
                    _mm256_loadu_si256(xb.as_ptr().add(4) as *const __m256i),
                )
            };
            // Values 0..16 (low nibbles) then 16..32 (high nibbles), as the activation's quants are laid out.
            let v = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low));
            // Unsigned 0..15 × signed −128..127: a pair's sum is at most 2·15·128 in magnitude, no saturation.
            let s = _mm256_madd_epi16(_mm256_maddubs_epi16(v, y), ones);
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            sumf += block_value(_mm_cvtsi128_si32(s), wb, xb);
        }
        sumf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes (xorshift), so the test needs no dependency.
    fn bytes(n: usize, seed: &mut u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                (*seed >> 24) as u8
            })
            .collect()
    }

    /// Blocks with finite scales of either sign and every quant pattern.
    fn blocks(n: usize, size: usize, seed: &mut u64) -> Vec<u8> {
        let mut b = bytes(n * size, seed);
        for (i, blk) in b.chunks_exact_mut(size).enumerate() {
            let d = half::f16::from_f32((i % 7) as f32 * 0.013 - 0.04).to_le_bytes();
            let m = half::f16::from_f32((i % 5) as f32 * -0.21 + 0.3).to_le_bytes();
            blk[..4].copy_from_slice(&[d[0], d[1], m[0], m[1]]);
        }
        b
    }

    #[test]
    fn every_path_gives_the_reference_bits() {
        let mut seed = 0x9E37_79B9_7F4A_7C15;
        for blocks_per_row in [1, 2, 18, 48] {
            let n = 5;
            let w = blocks(n * blocks_per_row, Q4_1_BLOCK, &mut seed);
            // 1, 2: the single-row loop; 3..=8: one group of eight lanes; 9..=17: groups and leftovers.
            for rows in [1, 2, 3, 7, 8, 9, 11, 17] {
                let xs: Vec<Vec<u8>> = (0..rows).map(|_| blocks(blocks_per_row, Q8_1_BLOCK, &mut seed)).collect();
                let refs: Vec<&[u8]> = xs.iter().map(|x| x.as_slice()).collect();
                let mut out = vec![vec![0f32; n]; rows];
                let mut outs: Vec<&mut [f32]> = out.iter_mut().map(|o| o.as_mut_slice()).collect();
                q4_1_gemm(&w, blocks_per_row, n, &refs, &mut outs);
                for (j, o) in out.iter().enumerate() {
                    for (r, v) in o.iter().enumerate() {
                        let row = &w[r * blocks_per_row * Q4_1_BLOCK..(r + 1) * blocks_per_row * Q4_1_BLOCK];
                        let want = dot_scalar(row, &xs[j]);
                        assert_eq!(v.to_bits(), want.to_bits(), "{blocks_per_row} blocks, {rows} rows: ({j}, {r})");
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_quants_sum_exactly() {
        // Every weight quant 15, every activation quant −128 then 127: the integer sums are ±15·128·32-ish, exact.
        let one = half::f16::from_f32(1.0).to_le_bytes();
        let zero = half::f16::from_f32(0.0).to_le_bytes();
        let mut w = vec![0xFFu8; Q4_1_BLOCK];
        w[..4].copy_from_slice(&[one[0], one[1], zero[0], zero[1]]);
        for (q, want) in [(0x80u8, -15.0 * 128.0 * 32.0), (0x7F, 15.0 * 127.0 * 32.0)] {
            let mut x = vec![q; Q8_1_BLOCK];
            x[..4].copy_from_slice(&[one[0], one[1], zero[0], zero[1]]);
            for rows in [1, 4] {
                let xs = vec![x.as_slice(); rows];
                let mut out = vec![[0f32]; rows];
                let mut outs: Vec<&mut [f32]> = out.iter_mut().map(|o| o.as_mut_slice()).collect();
                q4_1_gemm(&w, 1, 1, &xs, &mut outs);
                assert!(out.iter().all(|o| o[0] == want), "{rows} rows");
            }
            assert_eq!(dot_scalar(&w, &x), want);
        }
    }
}
