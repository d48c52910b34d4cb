//! A prompt's weight products on AVX-512 VNNI, over the weights' own GGUF blocks.
//!
//! Why: a prompt multiplies every weight with hundreds of activation rows, so it is bound by arithmetic, not by
//! memory. Candle's quantized matmul gets its speed there from a tiled copy of every weight, built the first time
//! a prompt uses it and kept (1.33–2.2× the weights' size, beside the GGUF blocks decoding reads: 2.2 GB resident
//! for a 1.1 GB model). Our AVX2 decode kernels ([`super::kernels::gemm_many`]) need no copy but are 2.3× slower
//! than that on a prompt. Here each group of 16 weight rows is laid out the way `vpdpbusd` wants it — one 512-bit
//! lane per weight row, 4 consecutive values a lane — block by block, just before use, in a 6 KB tile that the
//! next block overwrites: the layout costs one pass over the weights per prompt (shared by all its rows), and
//! nothing is kept. Each activation row's 4 values are broadcast to the 16 lanes, so one instruction makes 64
//! products for 16 outputs, and a sub-block's scale is applied once per 32 (Q4_K) or 16 (Q6_K) values.
//! AVX-512 VNNI is on every CPU this project has met (the AMD EPYC and the Intel Xeon kinds); elsewhere a prompt
//! takes the AVX2 kernels.
//!
//! Results equal [`super::kernels::dot`]'s up to float summation order (the integer products are the same); a
//! test holds them to it. Several-row decoding steps (candidates, speculative verification) stay on
//! `gemm_many`, whose results are bit-identical however many rows share a pass.

use super::kernels::{self, Kind, Matrix, Outs, Q8K, QK_K};

/// Weight rows in one tile: the 16 lanes of a 512-bit register.
const TILE_ROWS: usize = 16;
/// Activation rows multiplied with a tile in one go (their accumulators stay in registers).
const ACT_ROWS: usize = 8;

/// True when this CPU runs the kernels here (AVX-512 F/BW with VNNI, checked at run time: the build targets
/// x86-64-v3, which has none of them).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One block (256 values) of 16 weight rows, laid out for `vpdpbusd`: `qs[g]` holds values 4g..4g+4 of each row
/// (row r at bytes 4r..4r+4, unsigned: Q4_K's 4-bit values, Q6_K's 6-bit values stored +32); per scale group
/// (8 of 32 values for Q4_K, 16 of 16 for Q6_K) each row's `d·sc` and the factor of the group's activation sum
/// taken off (`dmin·min` for Q4_K; `32·d·sc` for Q6_K). Rows past the matrix's end are zero.
#[repr(C, align(64))]
pub(crate) struct Tile {
    qs: [[u8; 64]; 64],
    scale: [[f32; 16]; 16],
    min: [[f32; 16]; 16],
}

impl Tile {
    fn new() -> Box<Tile> {
        Box::new(Tile { qs: [[0; 64]; 64], scale: [[0.0; 16]; 16], min: [[0.0; 16]; 16] })
    }

    /// Lay out block `i` of rows `rows` of `m` (at most 16; `row_bytes` per row): the vector path where the CPU
    /// has the prompt kernels, else [`Tile::fill_scalar`] (the two are held equal by a test).
    fn fill(&mut self, m: &Matrix, row_bytes: usize, rows: std::ops::Range<usize>, i: usize) {
        assert!(rows.len() <= TILE_ROWS && rows.end <= m.n);
        assert!(m.w.len() >= rows.end * row_bytes && row_bytes >= (i + 1) * m.kind.block_bytes());
        assert!(i32::try_from(TILE_ROWS * row_bytes).is_ok(), "rows of {row_bytes} bytes");
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: AVX-512 F/BW detected just above; the asserts keep every gathered word inside block i of a
            // row in `rows` (see `vnni::fill`).
            unsafe { vnni::fill(self, m, row_bytes, rows, i) };
            return;
        }
        self.fill_scalar(m, row_bytes, rows, i);
    }

    /// [`Tile::fill`] value by value, straight from the block layouts.
    fn fill_scalar(&mut self, m: &Matrix, row_bytes: usize, rows: std::ops::Range<usize>, i: usize) {
        let bb = m.kind.block_bytes();
        let mut vals = [[0u8; QK_K]; TILE_ROWS];
        for (r, v) in vals.iter_mut().enumerate() {
            let row = rows.start + r;
            if row >= rows.end {
                for g in 0..16 {
                    self.scale[g][r] = 0.0;
                    self.min[g][r] = 0.0;
                }
                continue;
            }
            let b = &m.w[row * row_bytes + i * bb..row * row_bytes + (i + 1) * bb];
            unpack(m.kind, b, v);
            match m.kind {
                Kind::Q4K => {
                    let (d, dmin) = (kernels::f16_at(b, 0), kernels::f16_at(b, 2));
                    let sm = kernels::q4k_scales_mins(&b[4..16]);
                    for g in 0..8 {
                        self.scale[g][r] = d * sm[g] as f32;
                        self.min[g][r] = dmin * sm[8 + g] as f32;
                    }
                }
                Kind::Q6K => {
                    let d = kernels::f16_at(b, 208);
                    for g in 0..16 {
                        let sc = b[192 + g] as i8 as f32;
                        self.scale[g][r] = d * sc;
                        self.min[g][r] = 32.0 * d * sc;
                    }
                }
                Kind::Q4K16 | Kind::Q6K16 => unreachable!("{}", NOT_HERE),
            }
        }
        // The transpose: value group g of row r → lane r of qs[g].
        for (g, q) in self.qs.iter_mut().enumerate() {
            for (r, v) in vals.iter().enumerate() {
                q[4 * r..4 * r + 4].copy_from_slice(&v[4 * g..4 * g + 4]);
            }
        }
    }
}

/// The 256 stored values of one block in natural order (unsigned; Q6_K's +32 kept).
fn unpack(kind: Kind, b: &[u8], out: &mut [u8; QK_K]) {
    match kind {
        Kind::Q4K => {
            let qs = &b[16..144];
            for j in 0..4 {
                for l in 0..32 {
                    out[64 * j + l] = qs[32 * j + l] & 0xF;
                    out[64 * j + 32 + l] = qs[32 * j + l] >> 4;
                }
            }
        }
        Kind::Q6K => {
            let (ql, qh) = (&b[0..128], &b[128..192]);
            for h in 0..2 {
                let (ql, qh) = (&ql[64 * h..], &qh[32 * h..]);
                for l in 0..32 {
                    for (k, q) in kernels::q6k_quants(ql, qh, l).into_iter().enumerate() {
                        out[128 * h + 32 * k + l] = q;
                    }
                }
            }
        }
        Kind::Q4K16 | Kind::Q6K16 => unreachable!("{}", NOT_HERE),
    }
}

/// An activation block's sums as floats: per 16 values (Q6_K's scale groups) and per 32 (Q4_K's).
#[derive(Clone, Copy, Default)]
pub(crate) struct Sums {
    s16: [f32; 16],
    s32: [f32; 8],
}

impl Sums {
    fn of(b: &Q8K) -> Sums {
        let s16 = b.bsums.map(|v| v as f32);
        Sums { s16, s32: std::array::from_fn(|j| s16[2 * j] + s16[2 * j + 1]) }
    }
}

/// A prompt's rows quantized ([`Q8K`] blocks) and their blocks' sums.
type Quantized = (Vec<Vec<Q8K>>, Vec<Vec<Sums>>);

/// `ys[i][r * n_i + j] = mats[i].row(j) · xs[r]` for a prompt's rows (see the module's note). Falls back to
/// [`kernels::gemm_many`] where the CPU lacks AVX-512 VNNI or there are only a few rows.
pub fn gemm_prompt(mats: &[Matrix], k: usize, xs: &[&[f32]], ys: &mut [&mut [f32]]) {
    if xs.len() <= ACT_ROWS || !available() {
        return kernels::gemm_many(mats, k, xs, ys);
    }
    // Where the CPU has AMX, a prompt goes to the AMX tiles (`super::amx`): measured on the Intel Xeon kind with
    // `examples/bench_prompt` at 342 rows, Q4_K 8,960 × 1,536 646–681 GMAC/s against 412 for the VNNI tiles here,
    // Q6_K 1,536 × 8,960 340–379 against 208; at 24 and 64 rows about even.
    if super::amx::available() {
        return kernels::gemm_prompt_tiles(mats, k, xs, ys);
    }
    // Matrices in the 16-row layout (`rows16`) take its kernels, many rows as well as a few: on the Intel Xeon they
    // ran an 8,960 × 1,536 product of 16 rows at 300 GMAC/s, where these tiles ran 316 (`examples/bench_x16`,
    // `bench_prompt`), and the tiles read GGUF rows.
    if mats.iter().any(|m| m.kind.rows16()) {
        let (sixteen, other): (Vec<usize>, Vec<usize>) = (0..mats.len()).partition(|&i| mats[i].kind.rows16());
        let mut ys: Vec<Option<&mut [f32]>> = ys.iter_mut().map(|y| Some(&mut **y)).collect();
        let mut take = |idx: &[usize]| -> (Vec<Matrix>, Vec<&mut [f32]>) {
            let m = idx.iter().map(|&i| mats[i]).collect();
            let y = idx.iter().map(|&i| ys[i].take().expect("each output once")).collect();
            (m, y)
        };
        let (m16, mut y16) = take(&sixteen);
        let (mo, mut yo) = take(&other);
        kernels::gemm_many(&m16, k, xs, &mut y16);
        if !mo.is_empty() {
            gemm_vnni(&mo, k, xs, &mut yo);
        }
        return;
    }
    gemm_vnni(mats, k, xs, ys)
}

/// Why the VNNI prompt tiles never see a matrix of the 16-row layout: [`gemm_prompt`] sends those to
/// [`kernels::gemm_many`] (the 16-row kernels), and the tiles read GGUF rows.
const NOT_HERE: &str = "the 16-row layout does not reach the VNNI prompt tiles";

/// [`gemm_prompt`] on the AVX-512 VNNI tiles here, whatever the CPU's AMX.
fn gemm_vnni(mats: &[Matrix], k: usize, xs: &[&[f32]], ys: &mut [&mut [f32]]) {
    assert!(mats.iter().all(|m| !m.kind.rows16()), "{NOT_HERE}");
    assert_eq!(k % QK_K, 0, "k = {k} is not a multiple of {QK_K}");
    assert!(xs.iter().all(|x| x.len() == k), "every input row must have {k} columns");
    assert_eq!(mats.len(), ys.len());
    let rows = xs.len();
    let nb = k / QK_K;
    let mut first = Vec::with_capacity(mats.len() + 1);
    first.push(0);
    for (m, y) in mats.iter().zip(ys.iter()) {
        assert_eq!(y.len(), m.n * rows);
        assert!(m.w.len() >= m.n * nb * m.kind.block_bytes(), "weights of {} bytes for {}×{k}", m.w.len(), m.n);
        first.push(first.last().unwrap() + m.n.div_ceil(TILE_ROWS));
    }
    thread_local! {
        /// The quantized rows and their sums, kept between calls (a prompt makes ~100 of them).
        static ACT: std::cell::RefCell<Quantized> =
            const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }
    ACT.with(|cell| {
        let (act, sums) = &mut *cell.borrow_mut();
        let have = act.len();
        act.resize_with(rows.max(have), Vec::new);
        sums.resize_with(rows.max(have), Vec::new);
        kernels::quantize_rows(xs, &mut act[..rows], &mut []);
        for (s, a) in sums.iter_mut().zip(act.iter()).take(rows) {
            s.clear();
            s.extend(a.iter().map(Sums::of));
        }
        products(mats, nb, &first, &act[..rows], &sums[..rows], ys);
    });
}

/// The work of [`gemm_prompt`] once its rows are quantized: items of 16 weight rows (`first[i]` is matrix i's
/// first item) over candle's pool; per item, block by block, a [`Tile`] against every activation row.
fn products(mats: &[Matrix], nb: usize, first: &[usize], act: &[Vec<Q8K>], sums: &[Vec<Sums>], ys: &mut [&mut [f32]]) {
    let rows = act.len();
    let total = *first.last().unwrap();
    let outs = Outs(ys.iter_mut().map(|y| y.as_mut_ptr()).collect());
    let (outs, first) = (&outs, &first);
    candle_core::utils::barrier_pool().execute_chunked(total, |items| {
        let mut tile = Tile::new();
        let mut acc = vec![[0f32; TILE_ROWS]; rows];
        for item in items {
            let mi = first.partition_point(|&f| f <= item) - 1;
            let m = &mats[mi];
            let row_bytes = nb * m.kind.block_bytes();
            let start = (item - first[mi]) * TILE_ROWS;
            let end = (start + TILE_ROWS).min(m.n);
            acc.iter_mut().for_each(|a| *a = [0.0; TILE_ROWS]);
            for i in 0..nb {
                tile.fill(m, row_bytes, start..end, i);
                let mut j = 0;
                while j < rows {
                    let n = tile_rows(m.kind, &tile, i, &act[j..], &sums[j..], &mut acc[j..]);
                    j += n;
                }
            }
            for (a, out) in acc.iter().enumerate() {
                for (r, v) in out.iter().enumerate().take(end - start) {
                    // SAFETY: a * m.n + start + r < rows * m.n = ys[mi].len(), and weight rows start..end of
                    // matrix mi (for every input row) belong to this item alone (see `Outs`).
                    unsafe { *outs.0[mi].add(a * m.n + start + r) = *v };
                }
            }
        }
    });
}

/// Block `i` of `tile` against the first 8, 4, 2 or 1 of `act` (as many as there are, up to 8), added to their
/// accumulators; returns how many rows it took.
fn tile_rows(
    kind: Kind,
    tile: &Tile,
    i: usize,
    act: &[Vec<Q8K>],
    sums: &[Vec<Sums>],
    acc: &mut [[f32; TILE_ROWS]],
) -> usize {
    let n = match act.len() {
        8.. => 8,
        4..=7 => 4,
        2 | 3 => 2,
        _ => 1,
    };
    assert!(n <= act.len() && n <= sums.len() && n <= acc.len() && act[..n].iter().all(|a| a.len() > i));
    assert!(sums[..n].iter().all(|s| s.len() > i));
    #[cfg(target_arch = "x86_64")]
    {
        let a = |m: usize| &act[m][i];
        let s = |m: usize| &sums[m][i];
        let (head, _) = acc.split_at_mut(n);
        // SAFETY: only reached through `gemm_prompt` after `available()` (AVX-512 F/BW/VNNI detected at run
        // time; the tests call it under the same check); every reference is to a whole value of its type.
        unsafe {
            match (kind, n) {
                (Kind::Q4K, 8) => vnni::rows::<8, 8>(tile, std::array::from_fn(a), std::array::from_fn(s), head),
                (Kind::Q4K, 4) => vnni::rows::<4, 8>(tile, std::array::from_fn(a), std::array::from_fn(s), head),
                (Kind::Q4K, 2) => vnni::rows::<2, 8>(tile, std::array::from_fn(a), std::array::from_fn(s), head),
                (Kind::Q4K, _) => vnni::rows::<1, 8>(tile, std::array::from_fn(a), std::array::from_fn(s), head),
                (Kind::Q6K, 8) => vnni::rows::<8, 16>(tile, std::array::from_fn(a), std::array::from_fn(s), head),
                (Kind::Q6K, 4) => vnni::rows::<4, 16>(tile, std::array::from_fn(a), std::array::from_fn(s), head),
                (Kind::Q6K, 2) => vnni::rows::<2, 16>(tile, std::array::from_fn(a), std::array::from_fn(s), head),
                (Kind::Q6K, _) => vnni::rows::<1, 16>(tile, std::array::from_fn(a), std::array::from_fn(s), head),
                (Kind::Q4K16 | Kind::Q6K16, _) => unreachable!("{}", NOT_HERE),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the prompt kernels run on x86-64 only ({kind:?}, {} rows of tile {:p})", acc.len(), tile);
    n
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Sums, Tile, TILE_ROWS};
    use crate::engine::kernels::{Kind, Matrix, Q8K};
    use std::arch::x86_64::*;

    /// 64 bytes at `off` in block i of each of the 16 rows (zero for rows past the tile's `n`), transposed: word
    /// w of the result holds word w of every row, row r in lane r (a 16 × 16 transpose of 32-bit words in four
    /// rounds of shuffles: pairs of rows, fours, then 128-bit lanes twice).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn words16(base: *const u8, row_bytes: usize, n: usize, off: usize) -> [__m512i; 16] {
        let r: [__m512i; 16] = std::array::from_fn(|i| {
            if i < n {
                // SAFETY: the caller guarantees that bytes off..off+64 of each of the first `n` rows are readable.
                unsafe { _mm512_loadu_si512(base.add(i * row_bytes + off) as *const _) }
            } else {
                _mm512_setzero_si512()
            }
        });
        let t: [__m512i; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_epi32(a, b)
            } else {
                _mm512_unpackhi_epi32(a, b)
            }
        });
        // u[4q + c]: rows 4q..4q+4, words c, c+4, c+8, c+12 in its four 128-bit lanes.
        let u: [__m512i; 16] = std::array::from_fn(|i| {
            let (q, c) = (i / 4, i % 4);
            let (a, b) = (t[4 * q + c / 2], t[4 * q + 2 + c / 2]);
            if c % 2 == 0 {
                _mm512_unpacklo_epi64(a, b)
            } else {
                _mm512_unpackhi_epi64(a, b)
            }
        });
        let mut out = [_mm512_setzero_si512(); 16];
        for c in 0..4 {
            let x0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0b10_00_10_00);
            let x1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0b11_01_11_01);
            let y0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0b10_00_10_00);
            let y1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0b11_01_11_01);
            out[c] = _mm512_shuffle_i32x4(x0, y0, 0b10_00_10_00);
            out[c + 8] = _mm512_shuffle_i32x4(x0, y0, 0b11_01_11_01);
            out[c + 4] = _mm512_shuffle_i32x4(x1, y1, 0b10_00_10_00);
            out[c + 12] = _mm512_shuffle_i32x4(x1, y1, 0b11_01_11_01);
        }
        out
    }

    /// [`Tile::fill`] on 16 rows at once: the values' words transposed in registers ([`words16`]) — lane r of
    /// word w is word w of row r, which is the tile's layout — then unpacked with 16 rows per instruction; the
    /// few scale words are gathered (rows past `rows.end` masked off, read as zero).
    ///
    /// # Safety
    /// The CPU must support AVX-512 F and BW; `m.w` holds rows `rows` (≤ 16) of `row_bytes` bytes with at least
    /// `i + 1` blocks each, and 16 · `row_bytes` fits an `i32`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn fill(t: &mut Tile, m: &Matrix, row_bytes: usize, rows: std::ops::Range<usize>, i: usize) {
        let bb = m.kind.block_bytes();
        let mask: __mmask16 = ((1u32 << rows.len()) - 1) as __mmask16;
        let idx = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(row_bytes as i32),
        );
        // SAFETY: lane r (r < rows.len(), the others masked) reads bytes off..off+4 of block i of row rows.start + r,
        // and every `off` below is at most the block's size − 4; stores are into `t`'s arrays, in bounds.
        unsafe {
            let base = m.w.as_ptr().add(rows.start * row_bytes + i * bb);
            let word = |off: usize| {
                _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), mask, idx, base.add(off) as *const _)
            };
            let mut store = |g: usize, v: __m512i| _mm512_store_si512(t.qs[g].as_mut_ptr() as *mut _, v);
            let m4 = _mm512_set1_epi32(0x0F0F_0F0F);
            let m2 = _mm512_set1_epi32(0x0303_0303);
            let f16lo = |v: __m512i| _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
            let f16hi = |v: __m512i| _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
            let byte = |v: __m512i, k: u32| {
                _mm512_cvtepi32_ps(_mm512_and_si512(
                    _mm512_srlv_epi32(v, _mm512_set1_epi32(8 * k as i32)),
                    _mm512_set1_epi32(0xFF),
                ))
            };
            match m.kind {
                Kind::Q4K => {
                    // Quant word w of run j (bytes 16 + 32j + 4w, w < 8): low nibbles are values 64j + 4w..,
                    // group 16j + w; high nibbles 32 values later, group + 8.
                    for half in 0..2 {
                        let v = words16(base, row_bytes, rows.len(), 16 + 64 * half);
                        for (x, v) in v.into_iter().enumerate() {
                            let (j, w) = (2 * half + x / 8, x % 8);
                            store(16 * j + w, _mm512_and_si512(v, m4));
                            store(16 * j + 8 + w, _mm512_and_si512(_mm512_srli_epi32(v, 4), m4));
                        }
                    }
                    let dd = word(0);
                    let (d, dmin) = (f16lo(dd), f16hi(dd));
                    let (s0, s1, s2) = (word(4), word(8), word(12));
                    let m6 = _mm512_set1_epi32(0x3F3F_3F3F);
                    let sc_lo = _mm512_and_si512(s0, m6);
                    let mn_lo = _mm512_and_si512(s1, m6);
                    let sc_hi = _mm512_or_si512(
                        _mm512_and_si512(s2, m4),
                        _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(s0, 6), m2), 4),
                    );
                    let mn_hi = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi32(s2, 4), m4),
                        _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(s1, 6), m2), 4),
                    );
                    for g in 0..8 {
                        let (sc, mn) = if g < 4 { (sc_lo, mn_lo) } else { (sc_hi, mn_hi) };
                        let k = (g % 4) as u32;
                        _mm512_store_ps(t.scale[g].as_mut_ptr(), _mm512_mul_ps(d, byte(sc, k)));
                        _mm512_store_ps(t.min[g].as_mut_ptr(), _mm512_mul_ps(dmin, byte(mn, k)));
                    }
                }
                Kind::Q6K => {
                    // Half h: low-bit words A (ql[64h + 4lw]) and B (ql[64h + 32 + 4lw]), high-bit word H
                    // (qh[32h + 4lw]) make groups 32h + lw, +8, +16, +24 (values +0, +32, +64, +96).
                    let ql = [words16(base, row_bytes, rows.len(), 0), words16(base, row_bytes, rows.len(), 64)];
                    let qh = words16(base, row_bytes, rows.len(), 128);
                    for h in 0..2 {
                        for lw in 0..8 {
                            let (a, b, hb) = (ql[h][lw], ql[h][8 + lw], qh[8 * h + lw]);
                            let hi = |shift: u32| {
                                _mm512_slli_epi32(
                                    _mm512_and_si512(_mm512_srlv_epi32(hb, _mm512_set1_epi32(shift as i32)), m2),
                                    4,
                                )
                            };
                            let g = 32 * h + lw;
                            store(g, _mm512_or_si512(_mm512_and_si512(a, m4), hi(0)));
                            store(g + 8, _mm512_or_si512(_mm512_and_si512(b, m4), hi(2)));
                            store(g + 16, _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(a, 4), m4), hi(4)));
                            store(g + 24, _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(b, 4), m4), hi(6)));
                        }
                    }
                    // d is the last 2 bytes of the block: the high half of the word at 206.
                    let d = f16hi(word(206));
                    let d32 = _mm512_mul_ps(d, _mm512_set1_ps(32.0));
                    for w in 0..4 {
                        let v = word(192 + 4 * w);
                        for k in 0..4 {
                            // Signed byte k: to the top of the lane, then an arithmetic shift back.
                            let sc = _mm512_cvtepi32_ps(_mm512_srai_epi32(
                                _mm512_sllv_epi32(v, _mm512_set1_epi32(24 - 8 * k)),
                                24,
                            ));
                            let g = 4 * w + k as usize;
                            _mm512_store_ps(t.scale[g].as_mut_ptr(), _mm512_mul_ps(d, sc));
                            _mm512_store_ps(t.min[g].as_mut_ptr(), _mm512_mul_ps(d32, sc));
                        }
                    }
                }
                Kind::Q4K16 | Kind::Q6K16 => unreachable!("{}", super::NOT_HERE),
            }
        }
    }

    /// One block of a tile against `M` activation rows, with `S` scale groups (8 for Q4_K, 16 for Q6_K):
    /// `acc[m][r] += d_m · Σ_groups (d·sc[r] · Σ_v q[r][v]·y_m[v] − min[r] · Σ_v y_m[v])`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, BW and VNNI; `acc` has `M` rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn rows<const M: usize, const S: usize>(
        t: &Tile,
        a: [&Q8K; M],
        s: [&Sums; M],
        acc: &mut [[f32; TILE_ROWS]],
    ) {
        let per = 64 / S; // value groups of 4 per scale group
                          // SAFETY: the caller guarantees the CPU features; every pointer is into `t`, an `a[m]` (4 bytes at 4g <
                          // 256) or an `acc` row (16 floats), all whole values.
        unsafe {
            let mut blk = [_mm512_setzero_ps(); M];
            for g0 in 0..S {
                let mut isum = [_mm512_setzero_si512(); M];
                for g in g0 * per..(g0 + 1) * per {
                    let w = _mm512_load_si512(t.qs[g].as_ptr() as *const _);
                    for m in 0..M {
                        let y4 = std::ptr::read_unaligned(a[m].qs.as_ptr().add(4 * g) as *const i32);
                        isum[m] = _mm512_dpbusd_epi32(isum[m], w, _mm512_set1_epi32(y4));
                    }
                }
                let sc = _mm512_load_ps(t.scale[g0].as_ptr());
                let mn = _mm512_load_ps(t.min[g0].as_ptr());
                for m in 0..M {
                    let bs = if S == 8 { s[m].s32[g0] } else { s[m].s16[g0] };
                    blk[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[m]), sc, blk[m]);
                    blk[m] = _mm512_fnmadd_ps(mn, _mm512_set1_ps(bs), blk[m]);
                }
            }
            for m in 0..M {
                let p = acc[m].as_mut_ptr();
                _mm512_storeu_ps(p, _mm512_fmadd_ps(blk[m], _mm512_set1_ps(a[m].d), _mm512_loadu_ps(p)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn quantized(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> Vec<u8> {
        kernels::tests::quantized_spread(dtype, n, k, seed, 3.0).0
    }

    fn rows(r: usize, k: usize, seed: u64) -> Vec<Vec<f32>> {
        (0..r)
            .map(|i| {
                (0..k)
                    .map(|j| (((j * 7 + i * 13 + seed as usize) % 23) as f32 - 11.0) * 0.37 + (j % 5) as f32 * 0.01)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_tile_holds_every_value_of_its_rows() {
        // Whatever the CPU: value v of row r, read back from the tile's layout and scaled by its group's scale and
        // min, is what candle-checked dequantization gives; rows past the matrix's end are zero.
        for (dtype, kind, groups) in [(GgmlDType::Q4K, Kind::Q4K, 8), (GgmlDType::Q6K, Kind::Q6K, 16)] {
            let (n, k) = (13, 512);
            let w = quantized(dtype, n, k, 3);
            let row_bytes = k / QK_K * kind.block_bytes();
            let m = Matrix { kind, w: &w, n };
            let (mut tile, mut scalar) = (Tile::new(), Tile::new());
            for i in 0..k / QK_K {
                tile.fill(&m, row_bytes, 0..n, i);
                scalar.fill_scalar(&m, row_bytes, 0..n, i);
                assert_eq!(tile.qs, scalar.qs, "{kind:?} block {i}: vector and scalar layouts differ");
                assert_eq!(tile.scale, scalar.scale, "{kind:?} block {i}");
                assert_eq!(tile.min, scalar.min, "{kind:?} block {i}");
                for r in 0..16 {
                    let mut deq = vec![0f32; k];
                    if r < n {
                        kernels::dequantize_row(kind, &w[r * row_bytes..(r + 1) * row_bytes], &mut deq);
                    }
                    for v in 0..QK_K {
                        let g = v / (QK_K / groups);
                        let q = tile.qs[v / 4][4 * r + v % 4] as f32;
                        let got = q * tile.scale[g][r] - tile.min[g][r];
                        let want = deq[i * QK_K + v];
                        assert!(
                            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                            "{kind:?} row {r} value {v}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn prompt_products_match_the_decode_kernels() {
        if !available() {
            eprintln!("no AVX-512 VNNI on this CPU: gemm_prompt falls back to gemm_many, which its own tests hold");
            return;
        }
        // Q4_K and Q6_K matrices sharing one input (as q/k/v do), 27 rows (three groups of 8 and a short one),
        // weight rows not a multiple of the 16 handed out at a time.
        let k = 768;
        let (n4, n6) = (37, 21);
        let w4 = quantized(GgmlDType::Q4K, n4, k, 11);
        let w6 = quantized(GgmlDType::Q6K, n6, k, 12);
        let xs = rows(27, k, 9);
        let x_refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let mats = [Matrix { kind: Kind::Q4K, w: &w4, n: n4 }, Matrix { kind: Kind::Q6K, w: &w6, n: n6 }];
        let (mut y4, mut y6) = (vec![f32::NAN; n4 * 27], vec![f32::NAN; n6 * 27]);
        gemm_vnni(&mats, k, &x_refs, &mut [&mut y4, &mut y6]);
        for (r, x) in xs.iter().enumerate() {
            let mut a = Vec::new();
            kernels::quantize_q8k(x, &mut a);
            for (m, y) in mats.iter().zip([&y4, &y6]) {
                let rb = k / QK_K * m.kind.block_bytes();
                for j in 0..m.n {
                    let want = kernels::dot(m.kind, &m.w[j * rb..(j + 1) * rb], &a, false);
                    let got = y[r * m.n + j];
                    assert!(
                        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "{:?} row {j}, input {r}: {got} vs {want}",
                        m.kind
                    );
                }
            }
        }
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        if !available() {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to check");
            return;
        }
        // Every weight at its largest stored value and every activation at ±127: the 32-bit lanes of vpdpbusd
        // (up to 32 products of ≤ 63·127 each per scale group) and the float sums must hold.
        let k = 512;
        for (dtype, kind) in [(GgmlDType::Q4K, Kind::Q4K), (GgmlDType::Q6K, Kind::Q6K)] {
            let t = Tensor::from_vec(vec![7.5f32; 16 * k], (16, k), &Device::Cpu).unwrap();
            let w = QTensor::quantize(&t, dtype).unwrap().data().unwrap().to_vec();
            let xs: Vec<Vec<f32>> =
                (0..9).map(|r| (0..k).map(|j| if (j + r) % 2 == 0 { 100.0 } else { -100.0 }).collect()).collect();
            let x_refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
            let mut y = vec![0f32; 16 * 9];
            gemm_prompt(&[Matrix { kind, w: &w, n: 16 }], k, &x_refs, &mut [&mut y]);
            for (r, x) in xs.iter().enumerate() {
                let mut a = Vec::new();
                kernels::quantize_q8k(x, &mut a);
                let want = kernels::dot(kind, &w[..k / QK_K * kind.block_bytes()], &a, false);
                assert!((y[r * 16] - want).abs() <= 1e-3 * want.abs().max(1.0), "{kind:?}: {} vs {want}", y[r * 16]);
            }
        }
    }
}
