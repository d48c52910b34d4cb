//! AMX tile products over the 16-row layout of [`super::rows16`]: a prompt's products (and, with
//! `COPILOT_AMX=all`, decoding passes of many rows) with the weights as the tiles' second operand.
//!
//! Why: a tile product multiplies A (16 rows × 64 bytes) by B, whose row k holds 4 bytes of each of 16 columns —
//! exactly a 64-byte unit of the 16-row layout, which holds 4 bytes of each of 16 weight rows. So a block's
//! weight tiles come from its units by a mask or a shift (the 4-bit quants; Q6_K's top 2 bits joined) and a 16-bit
//! multiply (the scales), with no transposes; the activations are the first operand, a tile row being 64
//! consecutive quants of one activation row, copied as they are ([`Acts::fill`]). [`super::amx`]'s tiles take
//! GGUF blocks a row at a time, and feeding them the 16-row layout meant rebuilding each block (16 × 16 word
//! transposes), which cost prompts 5–15 % (context.md, 2026-12-07).
//!
//! The integers are [`super::amx`]'s (per block, Q4_K: `I = 8·X + Y` from the scale digits `sc = 8·sh + sl`,
//! `M = Σ min·bsum`; Q6_K: `I = 128·X + Y` from the exact 16-bit `sc·(q − 32)` cut in its top bits and low 7),
//! exact, and the float operations per (weight row, activation row) are the same ones in the same order — so a
//! product has the bits of the 16-row kernels and of the lane kernels' totals formulation (tested), whatever
//! the pass's size.

use super::amx::{Acts, Align64, CHUNKS, ROW_BYTES, TILE_BYTES, TILE_COLS, TILE_ROWS};
use super::kernels::{Kind, Q4K_BYTES, Q6K_BYTES};
use super::rows16;

/// One work item's scratch: the block's weight tiles (`x`, `y`: 4 each, the second operand), the tiles'
/// 32-bit results (`c[0]` from `x`, `c[1]` from `y`; row m = activation row, column n = weight row), and the
/// block's per-row factors and Q4_K min pairs.
#[repr(C, align(64))]
struct Scratch {
    x: [[u8; TILE_BYTES]; CHUNKS],
    y: [[u8; TILE_BYTES]; CHUNKS],
    c: [[[i32; TILE_ROWS]; TILE_COLS]; 2],
    dw: [f32; TILE_ROWS],
    dmin: [f32; TILE_ROWS],
    mins: [[i32; TILE_ROWS]; 4],
}

/// Weight rows `wrows` (one whole group of 16 of the layout) of a `Q4K16` or `Q6K16` matrix `w` (`acts.nb()`
/// blocks a row) against every activation row of `acts` (filled with its 16-row tiles), calling
/// `put(weight row, activation row, value)` for each product.
///
/// Panics unless AMX is available, or when the group or the activations do not fit.
pub(super) fn product(
    kind: Kind,
    w: &[u8],
    wrows: std::ops::Range<usize>,
    acts: &Acts,
    put: impl FnMut(usize, usize, f32),
) {
    assert!(super::amx::available(), "AMX is not available");
    assert!(kind.rows16(), "{kind:?} is not a 16-row layout");
    assert!(wrows.start.is_multiple_of(rows16::ROWS) && wrows.len() == rows16::ROWS, "rows {wrows:?}: not one group");
    let nb = acts.nb();
    let gb = rows16::ROWS * kind.block_bytes();
    let g = wrows.start / rows16::ROWS;
    assert!(w.len() >= (g + 1) * nb * gb, "weights too short for group {g} of {nb} blocks");
    let groups = acts.rows().div_ceil(TILE_COLS);
    assert!(acts.rows_tiles.len() >= groups * nb * CHUNKS * TILE_ROWS, "activations not laid out for these tiles");
    thread_local! {
        static SCRATCH: std::cell::RefCell<Option<Box<Scratch>>> = const { std::cell::RefCell::new(None) };
        static SUMS: std::cell::RefCell<Vec<[f32; TILE_ROWS]>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|s| {
        SUMS.with_borrow_mut(|sums| {
            // SAFETY: all-zero bits are valid for every field (integers and floats).
            let s = s.get_or_insert_with(|| unsafe { Box::new(std::mem::zeroed()) });
            // SAFETY: `available` (asserted) found AMX-TILE/INT8 and AVX-512 F/BW/VL/VNNI and Linux granted the
            // tile state; the group's `nb` blocks are inside `w` and every activation tile inside `acts` (asserted).
            unsafe {
                if kind == Kind::Q6K16 {
                    tiles::<true>(w, g, acts, s, sums, wrows.start, put)
                } else {
                    tiles::<false>(w, g, acts, s, sums, wrows.start, put)
                }
            }
        })
    })
}

/// Block `blk` of 16 Q4_K rows as the tiles' second operand: tile t (values 64t..64t + 64) row k < 8 is the low
/// nibbles of unit 8t + k (values 64t + 4k.., sub-block 2t), row k ≥ 8 the high nibbles of unit 8t + k − 8
/// (values 64t + 32 + 4(k − 8).., sub-block 2t + 1); `x` = `sh·q`, `y` = `sl·q` per row's scale `sc = 8·sh + sl`.
/// Also the rows' factors and min pairs.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI; `blk` points to a whole 16-row Q4_K block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn weights_q4k(blk: *const u8, s: &mut Scratch) {
    use std::arch::x86_64::*;
    // SAFETY: loads inside the block (the caller's contract); aligned stores of whole 64-byte tile rows of `s`.
    unsafe {
        let (sc, mins) = rows16::q4k_scales16(blk);
        for (u, m) in mins.iter().enumerate() {
            _mm512_storeu_si512(s.mins[u].as_mut_ptr() as *mut _, *m);
        }
        _mm512_storeu_ps(s.dw.as_mut_ptr(), _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(rows16::Q4_D_AT) as *const _)));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(rows16::Q4_DMIN_AT) as *const _));
        _mm512_storeu_ps(s.dmin.as_mut_ptr(), dmin);
        // A row's scale digit in both 16-bit halves of its word: both bytes of a half are multiplied at once, and
        // neither product (≤ 7 · 15) carries into the next byte.
        let both = |v: __m512i| _mm512_or_si512(v, _mm512_slli_epi32(v, 16));
        let sh: [__m512i; 8] = std::array::from_fn(|j| both(_mm512_srli_epi32(sc[j], 3)));
        let sl: [__m512i; 8] = std::array::from_fn(|j| both(_mm512_and_si512(sc[j], _mm512_set1_epi32(7))));
        let m4 = _mm512_set1_epi8(0x0F);
        for t in 0..CHUNKS {
            for k in 0..8 {
                let unit = _mm512_loadu_si512(blk.add((8 * t + k) * 64) as *const _);
                let lo = _mm512_and_si512(unit, m4);
                let hi = _mm512_and_si512(_mm512_srli_epi16(unit, 4), m4);
                let at = |tile: &mut [u8; TILE_BYTES], row: usize| tile.as_mut_ptr().add(row * ROW_BYTES) as *mut _;
                _mm512_store_si512(at(&mut s.x[t], k), _mm512_mullo_epi16(lo, sh[2 * t]));
                _mm512_store_si512(at(&mut s.y[t], k), _mm512_mullo_epi16(lo, sl[2 * t]));
                _mm512_store_si512(at(&mut s.x[t], 8 + k), _mm512_mullo_epi16(hi, sh[2 * t + 1]));
                _mm512_store_si512(at(&mut s.y[t], 8 + k), _mm512_mullo_epi16(hi, sl[2 * t + 1]));
            }
        }
    }
}

/// Block `blk` of 16 Q6_K rows as the tiles' second operand: tile T = 2h + o (values 128h + 64o..+64) row k < 8
/// holds values 128h + 64o + 4k.. (low or, for o = 1, high nibbles of ql unit 16h + k with qh bits 4o..4o + 2),
/// row k ≥ 8 values 128h + 64o + 32 + 4(k − 8).. (ql unit 16h + k, qh bits 4o + 2..4o + 4); each value's exact
/// 16-bit `sc·(q − 32)` cut in `x` = its top bits (`>> 7`, −32..32) and `y` = its low 7. Also the rows' factors.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI; `blk` points to a whole 16-row Q6_K block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn weights_q6k(blk: *const u8, s: &mut Scratch) {
    use std::arch::x86_64::*;
    // SAFETY: loads inside the block (the caller's contract); aligned stores of whole 64-byte tile rows of `s`.
    unsafe {
        let (sc, _) = rows16::q6k_scales16(blk);
        _mm512_storeu_ps(s.dw.as_mut_ptr(), _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(rows16::Q6_D_AT) as *const _)));
        // Bytes widened to 16 bits by `unpacklo`/`unpackhi` take, in 128-bit lane L, rows 4L, 4L + 1 (lo) or
        // 4L + 2, 4L + 3 (hi), 4 values each: the scale of each row (the low half of its 32-bit lane) repeated so.
        let index = |first: i16| {
            let mut v = [0i16; 32];
            for (j, x) in v.iter_mut().enumerate() {
                *x = 8 * (j / 8) as i16 + first + 2 * ((j % 8) / 4) as i16;
            }
            // SAFETY: [i16; 32] and __m512i have the same size; any bits are a valid __m512i.
            std::mem::transmute::<[i16; 32], __m512i>(v)
        };
        let (lo_idx, hi_idx) = (index(0), index(4));
        let (m4, m3, lo7, offset) =
            (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x03), _mm512_set1_epi16(127), _mm512_set1_epi16(32));
        let zero = _mm512_setzero_si512();
        for t in 0..CHUNKS {
            let (h, o) = (t / 2, t % 2);
            for k in 0..TILE_ROWS {
                let (w, second) = (k % 8, k / 8);
                let ql = _mm512_loadu_si512(blk.add(64 * (16 * h + 8 * second + w)) as *const _);
                let qh = _mm512_loadu_si512(blk.add(rows16::Q6_QH_AT + 64 * (8 * h + w)) as *const _);
                let low = if o == 0 { ql } else { _mm512_srli_epi16(ql, 4) };
                let shift = _mm_cvtsi32_si128((4 * o + 2 * second) as i32);
                let top = _mm512_and_si512(_mm512_srl_epi16(qh, shift), m3);
                let q = _mm512_or_si512(_mm512_and_si512(low, m4), _mm512_slli_epi16(top, 4));
                let scale = sc[8 * h + 4 * o + 2 * second + w / 4];
                let prod = |words: __m512i, idx: __m512i| {
                    _mm512_mullo_epi16(_mm512_sub_epi16(words, offset), _mm512_permutexvar_epi16(idx, scale))
                };
                // |sc·(q − 32)| ≤ 128 · 32: exact in 16 bits; its top bits and low 7 pack to bytes unsaturated.
                let (p0, p1) =
                    (prod(_mm512_unpacklo_epi8(q, zero), lo_idx), prod(_mm512_unpackhi_epi8(q, zero), hi_idx));
                let x = _mm512_packs_epi16(_mm512_srai_epi16(p0, 7), _mm512_srai_epi16(p1, 7));
                let y = _mm512_packs_epi16(_mm512_and_si512(p0, lo7), _mm512_and_si512(p1, lo7));
                _mm512_store_si512(s.x[t].as_mut_ptr().add(k * ROW_BYTES) as *mut _, x);
                _mm512_store_si512(s.y[t].as_mut_ptr().add(k * ROW_BYTES) as *mut _, y);
            }
        }
    }
}

/// [`product`]'s work for group `g` of the matrix (first weight row `first`), Q4_K (`Q6` false) or Q6_K.
///
/// # Safety
/// AMX-TILE, AMX-INT8 and AVX-512 F/BW/VL/VNNI present and the tile state granted; `w` holds group `g`'s
/// `acts.nb()` blocks and `acts` its 16-row tiles for every activation group.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tiles<const Q6: bool>(
    w: &[u8],
    g: usize,
    acts: &Acts,
    s: &mut Scratch,
    sums: &mut Vec<[f32; TILE_ROWS]>,
    first: usize,
    mut put: impl FnMut(usize, usize, f32),
) {
    use std::arch::asm;
    use std::arch::x86_64::*;
    let nb = acts.nb();
    let gb = rows16::ROWS * if Q6 { Q6K_BYTES } else { Q4K_BYTES };
    let groups = acts.rows().div_ceil(TILE_COLS);
    sums.clear();
    sums.resize(groups * TILE_COLS, [0.0; TILE_ROWS]);
    let group = &w[g * nb * gb..(g + 1) * nb * gb];
    // SAFETY: AMX present and granted (the caller's contract); restored below, before returning.
    let saved = unsafe { super::amx::configure() };
    for i in 0..nb {
        // SAFETY: block i < nb of the group is inside `w` (the caller's contract); the prefetch stays in `w`.
        unsafe {
            let blk = group.as_ptr().add(i * gb);
            rows16::prefetch_ahead(blk, gb, w);
            if Q6 {
                weights_q6k(blk, s)
            } else {
                weights_q4k(blk, s)
            }
        }
        // SAFETY: plain loads of 64-byte arrays inside `s`.
        let (dw, dmin, mins) = unsafe {
            (
                _mm512_loadu_ps(s.dw.as_ptr()),
                _mm512_loadu_ps(s.dmin.as_ptr()),
                std::array::from_fn::<__m512i, 4, _>(|u| _mm512_loadu_si512(s.mins[u].as_ptr() as *const _)),
            )
        };
        for ag in 0..groups {
            let gbk = ag * nb + i;
            let a: &[Align64] = &acts.rows_tiles[gbk * CHUNKS * TILE_ROWS..(gbk + 1) * CHUNKS * TILE_ROWS];
            // SAFETY: tmm0/tmm1 collect X and Y of this block for 16 activation rows × 16 weight rows; each
            // `tileloadd` reads 16 rows of 64 bytes at stride 64 from a 1 KB tile inside `s.x`, `s.y` (4 tiles
            // each) or `a` (the 4 tiles of activation group ag, block i); the stores write the 1 KB `c[0]`, `c[1]`.
            // Nothing else in this process uses the tile registers between `configure` and `restore`. The
            // activations are signed; Q4_K's weight bytes unsigned (`tdpbsud`), Q6_K's signed (`tdpbssd`).
            unsafe {
                macro_rules! block {
                    ($dp:literal) => {
                        asm!(
                            "tilezero tmm0",
                            "tilezero tmm1",
                            "tileloadd tmm2, [{x} + {st}]",
                            "tileloadd tmm3, [{y} + {st}]",
                            "tileloadd tmm4, [{a} + {st}]",
                            concat!($dp, " tmm0, tmm4, tmm2"),
                            concat!($dp, " tmm1, tmm4, tmm3"),
                            "tileloadd tmm5, [{x} + {st} + 1024]",
                            "tileloadd tmm6, [{y} + {st} + 1024]",
                            "tileloadd tmm7, [{a} + {st} + 1024]",
                            concat!($dp, " tmm0, tmm7, tmm5"),
                            concat!($dp, " tmm1, tmm7, tmm6"),
                            "tileloadd tmm2, [{x} + {st} + 2048]",
                            "tileloadd tmm3, [{y} + {st} + 2048]",
                            "tileloadd tmm4, [{a} + {st} + 2048]",
                            concat!($dp, " tmm0, tmm4, tmm2"),
                            concat!($dp, " tmm1, tmm4, tmm3"),
                            "tileloadd tmm5, [{x} + {st} + 3072]",
                            "tileloadd tmm6, [{y} + {st} + 3072]",
                            "tileloadd tmm7, [{a} + {st} + 3072]",
                            concat!($dp, " tmm0, tmm7, tmm5"),
                            concat!($dp, " tmm1, tmm7, tmm6"),
                            "tilestored [{cx} + {st}], tmm0",
                            "tilestored [{cy} + {st}], tmm1",
                            x = in(reg) s.x.as_ptr(),
                            y = in(reg) s.y.as_ptr(),
                            a = in(reg) a.as_ptr(),
                            cx = in(reg) s.c[0].as_mut_ptr(),
                            cy = in(reg) s.c[1].as_mut_ptr(),
                            st = in(reg) ROW_BYTES,
                            options(nostack, preserves_flags)
                        )
                    };
                }
                if Q6 {
                    block!("tdpbssd");
                } else {
                    block!("tdpbsud");
                }
            }
            let count = TILE_COLS.min(acts.rows() - ag * TILE_COLS);
            // SAFETY: plain loads and stores of 64-byte arrays (unaligned forms) inside `s`, `acts` and `sums`.
            unsafe {
                for m in 0..count {
                    let cx = _mm512_loadu_si512(s.c[0][m].as_ptr() as *const _);
                    let cy = _mm512_loadu_si512(s.c[1][m].as_ptr() as *const _);
                    let at = sums[ag * TILE_COLS + m].as_mut_ptr();
                    let t = if Q6 {
                        // I = 128·X + Y: Σ sc·(q − 32)·a, exact.
                        let total = _mm512_add_epi32(_mm512_slli_epi32(cx, 7), cy);
                        _mm512_mul_ps(_mm512_cvtepi32_ps(total), dw)
                    } else {
                        // I = 8·X + Y: Σ sc·q·a; M = Σ min·bsum.
                        let total = _mm512_add_epi32(_mm512_slli_epi32(cx, 3), cy);
                        let mut ms = _mm512_setzero_si512();
                        for (u, mn) in mins.iter().enumerate() {
                            ms = _mm512_dpwssd_epi32(ms, *mn, _mm512_set1_epi32(acts.pairs[gbk * 4 + u][m]));
                        }
                        let t = _mm512_mul_ps(_mm512_cvtepi32_ps(total), dw);
                        _mm512_fnmadd_ps(_mm512_cvtepi32_ps(ms), dmin, t)
                    };
                    let d = _mm512_set1_ps(acts.d[gbk][m]);
                    _mm512_storeu_ps(at, _mm512_fmadd_ps(t, d, _mm512_loadu_ps(at)));
                }
            }
        }
    }
    // SAFETY: `saved` came from `configure` above; our tile registers are not read again.
    unsafe { super::amx::restore(&saved) };
    for (row, sum) in sums.iter().enumerate().take(acts.rows()) {
        for (n, &v) in sum.iter().enumerate() {
            put(first + n, row, v);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tiles<const Q6: bool>(
    _: &[u8],
    _: usize,
    _: &Acts,
    _: &mut Scratch,
    _: &mut Vec<[f32; TILE_ROWS]>,
    _: usize,
    _: impl FnMut(usize, usize, f32),
) {
    unreachable!("AMX is x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::amx::tests::rows;
    use crate::engine::kernels::tests::quantized_spread;
    use crate::engine::kernels::{quantize_q8k, Q8K, QK_K};
    use candle_core::quantized::GgmlDType;

    #[test]
    fn tiles_over_the_16_row_layout_give_the_bits_of_its_kernels() {
        if !super::super::amx::available() || !rows16::available() {
            // Not a pass: without AMX (or AVX-512 VNNI) these tiles are never used on this machine.
            eprintln!("AMX not available on this machine: the 16-row tiles cannot run (and are never used) here");
            return;
        }
        let k = 1536;
        let nb = k / QK_K;
        for (dtype, gguf, sixteen) in
            [(GgmlDType::Q4K, Kind::Q4K, Kind::Q4K16), (GgmlDType::Q6K, Kind::Q6K, Kind::Q6K16)]
        {
            for spread in [2.0, 50.0] {
                // Two groups of 16 weight rows.
                let n = 32;
                let (w, _) = quantized_spread(dtype, n, k, 5, spread);
                let x = rows16::interleave(gguf, &w, n, nb);
                for count in [1, 3, 16, 17, 40] {
                    let xs = rows(k, count, 23 + count as u64);
                    let act: Vec<Vec<Q8K>> = xs
                        .iter()
                        .map(|x| {
                            let mut a = Vec::new();
                            quantize_q8k(x, &mut a);
                            a
                        })
                        .collect();
                    let refs: Vec<&[Q8K]> = act.iter().map(|a| a.as_slice()).collect();
                    let pairs: Vec<Vec<rows16::Pairs>> = act
                        .iter()
                        .map(|a| {
                            let mut p = Vec::new();
                            rows16::pairs(a, &mut p);
                            p
                        })
                        .collect();
                    let pair_refs: Vec<&[rows16::Pairs]> = pairs.iter().map(|p| p.as_slice()).collect();
                    let mut acts = Acts::default();
                    acts.fill(&refs, false, true);
                    let (mut tiles, mut kernels) = (vec![f32::NAN; n * count], vec![f32::NAN; n * count]);
                    for start in (0..n).step_by(rows16::ROWS) {
                        let wrows = start..start + rows16::ROWS;
                        super::super::amx::product(sixteen, &x, 0, wrows.clone(), &acts, |r, j, v| {
                            tiles[j * n + r] = v
                        });
                        rows16::product(sixteen, &x, nb, wrows, &refs, &pair_refs, |r, j, v| kernels[j * n + r] = v);
                    }
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&tiles), bits(&kernels), "{sixteen:?}, spread {spread}, {count} activation rows");
                    assert!(tiles.iter().all(|v| v.is_finite()));
                    // Every fifth activation row is zeros; the others give non-zero products.
                    let zero_rows = (count + 1) / 5;
                    assert_eq!(tiles.iter().filter(|v| **v == 0.0).count(), n * zero_rows, "{sixteen:?}, {count} rows");
                }
            }
        }
    }
}
