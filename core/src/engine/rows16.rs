//! Q4_K weights laid out 16 rows at a time, and the decode kernels over that layout (AVX-512 VNNI).
//!
//! Why: GGUF stores a weight row's blocks one after another, so a kernel that reads one row at a time finds, in
//! every 32-bit lane of its registers, values of one row — and must add its lanes together (a horizontal reduction)
//! once per row and block, or keep 8 float sums per row (the lane kernels of [`super::kernels`]). Here the 16
//! rows of a work item are interleaved, 4 bytes of each row at a time ([`interleave`]): one 512-bit load holds the
//! same 8 values of 16 rows, lane `r` belonging to row `r`, and one `vpdpbusd` against 4 activation bytes
//! broadcast to every lane adds 4 products to each of 16 rows' sums. No lane is ever added to another, the scales
//! and factors come 16 rows to a register, and a weight byte serves every activation row of the pass from a
//! register. Measured on the 2-core Intel Xeon (AVX-512 VNNI), an 8,960 × 1,536 product against the lane
//! kernels (`examples/bench_x16`, GMAC/s): weights in cache 1 row 94 vs 52, 4 rows 254 vs 124, 8 rows 294 vs 158,
//! 16 rows 300 vs 154; weights streamed from memory (a 354 MB matrix) 1 row 53 vs 41, 4 rows 153 vs 115, 8 rows
//! 196 vs 155 — see context.md, session 32.
//!
//! The same bytes, only moved: a group of 16 rows × `nb` blocks takes exactly the bytes of those 16 GGUF rows, so
//! a matrix's size, and the engine's memory, do not change. Each product is computed in the **totals
//! formulation** of the lane kernels' `totals` variant and of the AMX tiles ([`super::amx`]): per block the exact
//! integers `I = Σ sc·q·a` and `M = Σ min·bsum`, then `t = I·dw − M·dmin` (fused), `acc += t·d` (fused), block
//! after block — so a row's result is the same bits whatever else shares the pass, and the same bits those
//! kernels give (tested).

use super::kernels::{f16_at, q4k_scales_mins, Q4K_BYTES, Q8K};
use std::sync::OnceLock;

/// Weight rows interleaved together (the 16 lanes of a 512-bit register of 32-bit words).
pub const ROWS: usize = 16;
/// Bytes of one block of 16 rows: the rows' 4-bit quants, 4 bytes of each row at a time (32 × 64 bytes), then
/// their packed scales the same way (3 × 64 bytes), then the 16 factors `d` and the 16 `dmin` (f16).
const GROUP_BLOCK: usize = ROWS * Q4K_BYTES;
const SCALES_AT: usize = 2048;
const D_AT: usize = SCALES_AT + 3 * 64;
const DMIN_AT: usize = D_AT + 2 * ROWS;
/// Activation rows multiplied with one group of weight rows at once (their sums stay in registers).
const AT_ONCE: usize = 4;
/// How far ahead of use (bytes: two blocks of 16 rows) the kernel asks for the weights. The interleaved groups
/// are read in address order, but on the Intel Xeon the CPU's own prefetcher kept only 21 of the 25–30 GB/s two
/// threads can read (a 354 MB matrix, one activation row: 38 GMAC/s without, 53 with one or two blocks ahead).
const PREFETCH_AHEAD: usize = 2 * GROUP_BLOCK;

/// True when the 16-row layout and its kernels can be used: AVX-512 F/BW/VL/VNNI (with AVX2 and FMA), and
/// `COPILOT_ROWS16` is not `off` (read once; for comparisons).
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        if std::env::var("COPILOT_ROWS16").is_ok_and(|v| v.eq_ignore_ascii_case("off") || v == "0") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            super::kernels::simd_available()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Where byte `b` (0..144) of block `i` of row `r` of a GGUF Q4_K matrix lies in the 16-row layout (`nb` blocks
/// a row): the group's block `(r / 16)·nb + i`, then the field — quants `4·gq + j` at `64·gq + 4·(r % 16) + j`,
/// packed scales `4k + j` at `2048 + 64k + 4·(r % 16) + j`, `d` and `dmin` at `2240 + 2·(r % 16)` and
/// `2272 + 2·(r % 16)`.
#[inline]
fn place(nb: usize, r: usize, i: usize, b: usize) -> usize {
    let (g, m) = (r / ROWS, r % ROWS);
    let base = (g * nb + i) * GROUP_BLOCK;
    base + match b {
        0..2 => D_AT + 2 * m + b,
        2..4 => DMIN_AT + 2 * m + (b - 2),
        4..16 => SCALES_AT + 64 * ((b - 4) / 4) + 4 * m + (b - 4) % 4,
        _ => 64 * ((b - 16) / 4) + 4 * m + (b - 16) % 4,
    }
}

/// A GGUF Q4_K matrix of `n` rows (a multiple of 16) × `nb` blocks in the 16-row layout (the same bytes).
pub fn interleave(w: &[u8], n: usize, nb: usize) -> Vec<u8> {
    assert!(n.is_multiple_of(ROWS), "{n} rows is not a multiple of {ROWS}");
    assert!(w.len() >= n * nb * Q4K_BYTES, "weights of {} bytes for {n} rows of {nb} blocks", w.len());
    let mut out = vec![0u8; n * nb * Q4K_BYTES];
    for r in 0..n {
        for i in 0..nb {
            let block = &w[(r * nb + i) * Q4K_BYTES..(r * nb + i + 1) * Q4K_BYTES];
            // Fields move 4 bytes at a time (2 for the factors), so copy by word.
            for b in (0..4).step_by(2) {
                let at = place(nb, r, i, b);
                out[at..at + 2].copy_from_slice(&block[b..b + 2]);
            }
            for b in (4..Q4K_BYTES).step_by(4) {
                let at = place(nb, r, i, b);
                out[at..at + 4].copy_from_slice(&block[b..b + 4]);
            }
        }
    }
    out
}

/// Block `i` of row `r` in GGUF's layout, read from a matrix in the 16-row layout (`nb` blocks a row).
pub fn block(w: &[u8], nb: usize, r: usize, i: usize) -> [u8; Q4K_BYTES] {
    let mut out = [0u8; Q4K_BYTES];
    for b in (0..4).step_by(2) {
        let at = place(nb, r, i, b);
        out[b..b + 2].copy_from_slice(&w[at..at + 2]);
    }
    for b in (4..Q4K_BYTES).step_by(4) {
        let at = place(nb, r, i, b);
        out[b..b + 4].copy_from_slice(&w[at..at + 4]);
    }
    out
}

/// The whole matrix back in GGUF's layout (for candle's matmul, which reads only that).
pub fn deinterleave(w: &[u8], n: usize, nb: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * nb * Q4K_BYTES);
    for r in 0..n {
        for i in 0..nb {
            out.extend_from_slice(&block(w, nb, r, i));
        }
    }
    out
}

/// Per activation row and block, the sums of its 4 pairs of sub-blocks (sub-blocks 2u and 2u + 1, 32 values
/// each) as 16-bit pairs in a 32-bit word — the form `vpdpwssd` multiplies with the weights' min pairs.
pub fn min_pairs(a: &[Q8K], out: &mut Vec<[i32; 4]>) {
    out.clear();
    out.extend(a.iter().map(|b| {
        // |sum of 32 quants| ≤ 32 · 127: exact in 16 bits.
        let s = |j: usize| (b.bsums[2 * j] as i32 + b.bsums[2 * j + 1] as i32) as i16 as u16 as i32;
        std::array::from_fn(|u| s(2 * u) | (s(2 * u + 1) << 16))
    }));
}

/// Weight rows `wrows` (one group: `wrows.start` a multiple of 16, at most 16 rows) of a matrix in the 16-row
/// layout (`nb` blocks a row) against activation rows `a` (each `nb` blocks, with their [`min_pairs`] in `p`),
/// calling `put(weight row, activation row, value)` for every product.
///
/// Panics unless [`available`], or when the group or the activations do not fit.
pub fn product(
    w: &[u8],
    nb: usize,
    wrows: std::ops::Range<usize>,
    a: &[&[Q8K]],
    p: &[&[[i32; 4]]],
    mut put: impl FnMut(usize, usize, f32),
) {
    assert!(available(), "the 16-row kernels need AVX-512 VNNI");
    assert!(wrows.start.is_multiple_of(ROWS) && wrows.len() <= ROWS, "weight rows {wrows:?} are not one group");
    let g = wrows.start / ROWS;
    assert!(w.len() >= (g + 1) * nb * GROUP_BLOCK, "weights too short for group {g} of {nb} blocks");
    assert!(a.len() == p.len() && a.iter().zip(p).all(|(a, p)| a.len() == nb && p.len() == nb), "activations");
    let group = &w[g * nb * GROUP_BLOCK..(g + 1) * nb * GROUP_BLOCK];
    let mut from = 0;
    while from < a.len() {
        let take = (a.len() - from).min(AT_ONCE);
        let mut out = [[0f32; ROWS]; AT_ONCE];
        macro_rules! run {
            ($r:literal) => {{
                let aa: [&[Q8K]; $r] = std::array::from_fn(|j| a[from + j]);
                let pp: [&[[i32; 4]]; $r] = std::array::from_fn(|j| p[from + j]);
                let mut o = [[0f32; ROWS]; $r];
                // SAFETY: `available` (asserted) found AVX-512 F/BW/VL/VNNI, AVX2 and FMA; `group` holds `nb`
                // blocks of 16 rows and every activation row `nb` blocks (asserted above).
                unsafe { kernel::<$r>(group, w, nb, aa, pp, &mut o) };
                out[..$r].copy_from_slice(&o);
            }};
        }
        match take {
            1 => run!(1),
            2 => run!(2),
            3 => run!(3),
            _ => run!(4),
        }
        for (j, o) in out[..take].iter().enumerate() {
            for (m, &v) in o.iter().enumerate().take(wrows.len()) {
                put(wrows.start + m, from + j, v);
            }
        }
        from += take;
    }
}

/// 64 bytes for `vpshufb`: in every 32-bit word, byte `j` takes byte `p[j]` of the same word (−1: zero).
const fn within_words(p: [i8; 4]) -> [i8; 64] {
    let mut v = [0i8; 64];
    let mut i = 0;
    while i < 64 {
        let (word, j) = (i / 4, i % 4);
        v[i] = if p[j] < 0 { -1 } else { p[j] + 4 * (word % 4) as i8 };
        i += 1;
    }
    v
}

/// Byte j of each word alone (scale j of a word of 4 scales).
static PICK_BYTE: [[i8; 64]; 4] =
    [within_words([0, -1, -1, -1]), within_words([1, -1, -1, -1]), within_words([2, -1, -1, -1]), within_words([3, -1, -1, -1])];
/// Bytes (0, 1) and (2, 3) of each word as two 16-bit halves (a pair of mins).
static PICK_PAIR: [[i8; 64]; 2] = [within_words([0, -1, 1, -1]), within_words([2, -1, 3, -1])];

/// One group's blocks against `R` activation rows: `out[r][m]` = row m's product with activation row r.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI, AVX2 and FMA; `group` holds `nb` blocks of 16 rows in the 16-row layout (a piece of
/// `whole`, used only to keep prefetch addresses inside the matrix) and every `a[r]`, `p[r]` `nb` blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn kernel<const R: usize>(
    group: &[u8],
    whole: &[u8],
    nb: usize,
    a: [&[Q8K]; R],
    p: [&[[i32; 4]]; R],
    out: &mut [[f32; ROWS]; R],
) {
    use std::arch::x86_64::*;
    // Where the next groups' bytes are (the pool hands out neighbouring groups in order): prefetched ahead.
    let whole_end = whole.as_ptr() as usize + whole.len();
    // SAFETY: every load below reads inside block i < nb of `group` (the caller's contract: `nb` blocks of
    // GROUP_BLOCK bytes) or inside activation block i < nb of `a[r]`; prefetches are clipped to `whole`.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        let m4 = _mm512_set1_epi8(0x0F);
        let pick: [__m512i; 4] = std::array::from_fn(|j| _mm512_loadu_si512(PICK_BYTE[j].as_ptr() as *const _));
        let pair: [__m512i; 2] = std::array::from_fn(|u| _mm512_loadu_si512(PICK_PAIR[u].as_ptr() as *const _));
        let (c3f, c0f, c03) =
            (_mm512_set1_epi32(0x3f3f_3f3f), _mm512_set1_epi32(0x0f0f_0f0f), _mm512_set1_epi32(0x0303_0303));
        for i in 0..nb {
            let blk = group.as_ptr().add(i * GROUP_BLOCK);
            let ahead = blk as usize + PREFETCH_AHEAD;
            if ahead + GROUP_BLOCK <= whole_end {
                for l in 0..GROUP_BLOCK / 64 {
                    _mm_prefetch::<_MM_HINT_T0>((ahead + 64 * l) as *const i8);
                }
            }
            // The 16 rows' packed scales (3 words each), unpacked as `q4k_scales_mins` does one row's: scales
            // 0-3, 4-7 and mins 0-3, 4-7 as the bytes of 4 registers.
            let s0 = _mm512_loadu_si512(blk.add(SCALES_AT) as *const _);
            let s1 = _mm512_loadu_si512(blk.add(SCALES_AT + 64) as *const _);
            let s2 = _mm512_loadu_si512(blk.add(SCALES_AT + 128) as *const _);
            let sc_lo = _mm512_and_si512(s0, c3f);
            let mn_lo = _mm512_and_si512(s1, c3f);
            let top = |s: __m512i| _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(s, 6), c03), 4);
            let sc_hi = _mm512_or_si512(_mm512_and_si512(s2, c0f), top(s0));
            let mn_hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(s2, 4), c0f), top(s1));
            // Scale j of every row as a 32-bit lane; min pairs (2u, 2u + 1) as 16-bit pairs.
            let sc: [__m512i; 8] = std::array::from_fn(|j| _mm512_shuffle_epi8(if j < 4 { sc_lo } else { sc_hi }, pick[j % 4]));
            let mins: [__m512i; 4] =
                std::array::from_fn(|u| _mm512_shuffle_epi8(if u < 2 { mn_lo } else { mn_hi }, pair[u % 2]));
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(D_AT) as *const _));
            let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(DMIN_AT) as *const _));
            // I = Σ sc·q·a per row: per 64 values (4-byte group gq: low nibbles are values 64c + 4q.., sub-block
            // 2c; high nibbles 64c + 32 + 4q.., sub-block 2c + 1) the exact sub-block sums, then times the scale.
            // |sub-block sum| ≤ 32 · 15 · 127 and |I| ≤ 256 · 63 · 15 · 127 < 2^25: every integer is exact.
            let mut total = [_mm512_setzero_si512(); R];
            for c in 0..4 {
                let (mut lo_sum, mut hi_sum) = ([_mm512_setzero_si512(); R], [_mm512_setzero_si512(); R]);
                for q in 0..8 {
                    let wv = _mm512_loadu_si512(blk.add((8 * c + q) * 64) as *const _);
                    let lo = _mm512_and_si512(wv, m4);
                    let hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m4);
                    for r in 0..R {
                        let qs = a[r].get_unchecked(i).qs.as_ptr();
                        let al = _mm512_set1_epi32((qs.add(64 * c + 4 * q) as *const i32).read_unaligned());
                        let ah = _mm512_set1_epi32((qs.add(64 * c + 32 + 4 * q) as *const i32).read_unaligned());
                        lo_sum[r] = _mm512_dpbusd_epi32(lo_sum[r], lo, al);
                        hi_sum[r] = _mm512_dpbusd_epi32(hi_sum[r], hi, ah);
                    }
                }
                for r in 0..R {
                    total[r] = _mm512_add_epi32(total[r], _mm512_mullo_epi32(lo_sum[r], sc[2 * c]));
                    total[r] = _mm512_add_epi32(total[r], _mm512_mullo_epi32(hi_sum[r], sc[2 * c + 1]));
                }
            }
            for r in 0..R {
                // M = Σ min·bsum per row, then the totals formulation's three float operations.
                let pr = p[r].get_unchecked(i);
                let mut m = _mm512_setzero_si512();
                for (u, mn) in mins.iter().enumerate() {
                    m = _mm512_dpwssd_epi32(m, *mn, _mm512_set1_epi32(pr[u]));
                }
                let t = _mm512_mul_ps(_mm512_cvtepi32_ps(total[r]), dw);
                let t = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(m), dmin, t);
                acc[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(a[r].get_unchecked(i).d), acc[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel<const R: usize>(
    _: &[u8],
    _: &[u8],
    _: usize,
    _: [&[Q8K]; R],
    _: [&[[i32; 4]]; R],
    _: &mut [[f32; ROWS]; R],
) {
    unreachable!("the 16-row kernels are x86-64 only")
}

/// Row `r` of a matrix in the 16-row layout against one activation row, in the scalar form of the totals
/// formulation (the integers summed in any order, the same float operations): the reference the tests hold the
/// kernels to, and the product where no 16-row kernel runs.
pub fn dot_scalar(w: &[u8], nb: usize, r: usize, a: &[Q8K]) -> f32 {
    let mut acc = 0f32;
    for (i, y) in a.iter().enumerate().take(nb) {
        let b = block(w, nb, r, i);
        let (dw, dmin) = (f16_at(&b, 0), f16_at(&b, 2));
        let sm = q4k_scales_mins(&b[4..16]);
        let (mut total, mut m) = (0i32, 0i32);
        for j in 0..8 {
            // Sub-block j: values 32j..32j + 32 (chunk j / 2, low nibbles for even j, high for odd).
            let (c, high) = (j / 2, j % 2 == 1);
            let mut s = 0i32;
            for l in 0..32 {
                let byte = b[16 + 32 * c + l];
                let q = if high { byte >> 4 } else { byte & 0x0F };
                s += q as i32 * y.qs[32 * j + l] as i32;
            }
            total += sm[j] as i32 * s;
            m += sm[8 + j] as i32 * (y.bsums[2 * j] as i32 + y.bsums[2 * j + 1] as i32);
        }
        let t = total as f32 * dw;
        let t = (-(m as f32)).mul_add(dmin, t);
        acc = t.mul_add(y.d, acc);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::tests::quantized_spread;
    use crate::engine::kernels::{arrange, quantize_q8k, rows_lanes_from, Kind, Q8KLanes, Via, QK_K};
    use candle_core::quantized::GgmlDType;

    fn act_rows(k: usize, count: usize, seed: u64) -> Vec<Vec<Q8K>> {
        let mut s = seed;
        (0..count)
            .map(|r| {
                let x: Vec<f32> = (0..k)
                    .map(|i| {
                        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let v = (s >> 33) as f32 / (1u64 << 31) as f32 - 0.5;
                        match r % 5 {
                            3 => 0.0,
                            4 if i % 97 == 0 => 40.0 * v.signum(),
                            _ => v * (1.0 + r as f32),
                        }
                    })
                    .collect();
                let mut a = Vec::new();
                quantize_q8k(&x, &mut a);
                a
            })
            .collect()
    }

    #[test]
    fn the_layout_moves_every_byte_and_moves_it_back() {
        let (n, k) = (48, 768);
        let nb = k / QK_K;
        let (w, _) = quantized_spread(GgmlDType::Q4K, n, k, 3, 2.0);
        let x = interleave(&w, n, nb);
        assert_eq!(x.len(), w.len());
        assert_ne!(x, w[..x.len()], "the layout moved nothing");
        assert_eq!(deinterleave(&x, n, nb), w[..n * nb * Q4K_BYTES]);
        for (r, i) in [(0, 0), (17, 2), (47, 1)] {
            assert_eq!(block(&x, nb, r, i)[..], w[(r * nb + i) * Q4K_BYTES..][..Q4K_BYTES]);
        }
    }

    #[test]
    fn kernels_give_the_bits_of_the_totals_formulation_in_a_pass_of_any_size() {
        if !available() {
            // Not a pass: without AVX-512 VNNI the 16-row layout is never made, so nothing here runs on this CPU.
            eprintln!("no AVX-512 VNNI here: the 16-row kernels cannot run (and are never used) on this machine");
            return;
        }
        let k = 1536;
        let nb = k / QK_K;
        for spread in [2.0, 50.0] {
            let n = 32;
            let (w, _) = quantized_spread(GgmlDType::Q4K, n, k, 9, spread);
            let x = interleave(&w, n, nb);
            let row_bytes = nb * Q4K_BYTES;
            for count in [1, 3, 4, 5, 9, 17] {
                let act = act_rows(k, count, 5 + count as u64);
                let pairs: Vec<Vec<[i32; 4]>> = act
                    .iter()
                    .map(|a| {
                        let mut p = Vec::new();
                        min_pairs(a, &mut p);
                        p
                    })
                    .collect();
                let a: Vec<&[Q8K]> = act.iter().map(|a| a.as_slice()).collect();
                let p: Vec<&[[i32; 4]]> = pairs.iter().map(|p| p.as_slice()).collect();
                let mut ours = vec![f32::NAN; n * count];
                for start in (0..n).step_by(ROWS) {
                    product(&x, nb, start..start + ROWS, &a, &p, |r, j, v| ours[j * n + r] = v);
                }
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                // Each activation row alone gives the same bits as in the pass of `count` rows.
                for j in 0..count {
                    let mut alone = vec![f32::NAN; n];
                    for start in (0..n).step_by(ROWS) {
                        product(&x, nb, start..start + ROWS, &a[j..j + 1], &p[j..j + 1], |r, _, v| alone[r] = v);
                    }
                    assert_eq!(bits(&alone), bits(&ours[j * n..(j + 1) * n]), "row {j} of {count}, spread {spread}");
                }
                // The lane kernels' totals variant, over the GGUF layout, gives the same bits, and the scalar form
                // of the formulation too.
                let lanes: Vec<Vec<Q8KLanes>> = act.iter().map(|a| a.iter().map(arrange).collect()).collect();
                let mut theirs = vec![f32::NAN; n * count];
                for start in (0..n).step_by(ROWS) {
                    for from in (0..count).step_by(8) {
                        let group: Vec<&[Q8KLanes]> =
                            lanes[from..(from + 8).min(count)].iter().map(|l| l.as_slice()).collect();
                        let via = Via { totals: Some(true), ..Via::default() };
                        rows_lanes_from(Kind::Q4K, &w, row_bytes, start..start + ROWS, &group, via, |r, j, v| {
                            theirs[(from + j) * n + r] = v
                        });
                    }
                }
                assert_eq!(bits(&ours), bits(&theirs), "{count} rows, spread {spread}");
                for j in 0..count {
                    for r in [0, 5, 16, 31] {
                        assert_eq!(dot_scalar(&x, nb, r, &act[j]).to_bits(), ours[j * n + r].to_bits(), "scalar");
                    }
                }
                assert!(ours.iter().all(|v| v.is_finite()));
                let zero_rows = (count + 1) / 5;
                assert_eq!(ours.iter().filter(|v| **v == 0.0).count(), n * zero_rows, "{count} rows");
            }
        }
    }
}
