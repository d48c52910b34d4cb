//! Q4_K and Q6_K weights laid out 16 rows at a time, and decode kernels over that layout (AVX-512 VNNI). The
//! default where the CPU also has AMX; `COPILOT_ROWS16=on` elsewhere, `=off` keeps GGUF's layout ([`enabled`]).
//!
//! Why: GGUF stores a weight row's blocks one after another, so a kernel that reads one row at a time finds, in
//! every 32-bit lane of its registers, values of one row — and must add its lanes together (a horizontal reduction)
//! once per row and block, or keep 8 float sums per row (the lane kernels of [`super::kernels`]). Here the 16
//! rows of a work item are interleaved, 4 bytes of each row at a time ([`interleave`]): one 512-bit load holds the
//! same 8 values of 16 rows, lane `r` belonging to row `r`, and one `vpdpbusd` against 4 activation bytes
//! broadcast to every lane adds 4 products to each of 16 rows' sums. No lane is ever added to another, the scales
//! and factors come 16 rows to a register, and a weight byte serves every activation row of the pass from a
//! register. Measured on the 2-core Intel Xeon (AVX-512 VNNI), one product on the decode path against the lane
//! kernels (`examples/bench_rows16 N K KIND ROWS…`, GMAC/s, weights in the 300 MB L3): Q4_K 8,960 × 1,536 1 row
//! 94 vs 53, 8 rows 223 vs 135, 16 rows 249 vs 138; Q6_K 151,936 × 1,536 (the output layer) 56 vs 46, 144 vs
//! 139, 153 vs 133; a 354 MB Q4_K matrix streamed from memory, 1 row 53 vs 41, 8 rows 196 vs 155.
//! Through the whole engine the gain is smaller — the products are about half of a decoding pass; prompts on the
//! AMX tiles read the layout as the tiles' second operand ([`super::amx16`]): see [`enabled`].
//!
//! The same bytes, only moved: a group of 16 rows × `nb` blocks takes exactly the bytes of those 16 GGUF rows, so
//! a matrix's size, and the engine's memory, do not change. Each product is computed in the **totals
//! formulation** of the lane kernels' `totals` variant and of the AMX tiles ([`super::amx`]): per block the exact
//! integers (Q4_K: `I = Σ sc·q·a` and `M = Σ min·bsum`; Q6_K: `I = Σ sc·(q − 32)·a`), then the same float
//! operations (`t = I·dw − M·dmin` fused, `acc += t·d` fused), block after block — so a row's result is the same
//! bits whatever else shares the pass, and the same bits those kernels give (tested).

use super::kernels::{f16_at, q4k_scales_mins, Kind, Q4K_BYTES, Q6K_BYTES, Q8K};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// Weight rows interleaved together (the 16 lanes of a 512-bit register of 32-bit words).
pub const ROWS: usize = 16;
/// Q4_K, one block of 16 rows (2,304 bytes): the rows' 4-bit quants, 4 bytes of each row at a time (32 × 64
/// bytes), then their packed scales the same way (3 × 64 bytes), then the 16 factors `d` and the 16 `dmin` (f16).
pub(super) const Q4_SCALES_AT: usize = 2048;
pub(super) const Q4_D_AT: usize = Q4_SCALES_AT + 3 * 64;
pub(super) const Q4_DMIN_AT: usize = Q4_D_AT + 2 * ROWS;
/// Q6_K, one block of 16 rows (3,360 bytes): the low 4 bits of the quants (32 × 64 bytes), their high 2 bits (16 ×
/// 64), the 16 signed scales (4 × 64), the 16 factors `d` (f16) — each field 4 bytes of each row at a time.
pub(super) const Q6_QH_AT: usize = 2048;
pub(super) const Q6_SCALES_AT: usize = Q6_QH_AT + 16 * 64;
pub(super) const Q6_D_AT: usize = Q6_SCALES_AT + 4 * 64;
/// Activation rows multiplied with one group of weight rows at once (their sums stay in registers).
const AT_ONCE: usize = 4;
/// How far ahead of use (in blocks of 16 rows) the kernels ask for the weights. The interleaved groups are read
/// in address order, but on the Intel Xeon the CPU's own prefetcher kept only 21 of the 25–30 GB/s two threads
/// can read (a 354 MB matrix, one activation row: 38 GMAC/s without, 53 with one or two blocks ahead).
const PREFETCH_BLOCKS: usize = 2;

/// True when the 16-row kernels can run on this CPU: AVX-512 F/BW/VL/VNNI, with AVX2 and FMA.
pub fn available() -> bool {
    static CPU: OnceLock<bool> = OnceLock::new();
    *CPU.get_or_init(|| {
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

/// 0: as `COPILOT_ROWS16` says; 1: off; 2: on ([`set_enabled`]).
static FORCED: AtomicU8 = AtomicU8::new(0);

/// True when models loaded from now on move their Q4_K and Q6_K layers into the 16-row layout: [`available`],
/// and `COPILOT_ROWS16=on` in the environment (read once), or, with no such setting, where the CPU has AMX too
/// ([`super::amx::available`]); `COPILOT_ROWS16=off`, or [`set_enabled`], decides otherwise. The default on AMX
/// CPUs since 2026-12-08, when prompts on the tiles began to read the layout as it is ([`super::amx16`]) instead
/// of rebuilding GGUF blocks from it (elsewhere prompts take the 16-row kernels, not measured against the VNNI
/// prompt tiles on a whole model, e.g. on an AMD Zen 4: opt-in there): measured on the Intel Xeon kind, alternating (`examples/bench_engine MODEL 342
/// 16 2 2`), prefill 80–92 → 95–108 tok/s and one-row decoding 11.5–12.2 → 11.2–14.4 tok/s; decoding passes
/// (`examples/bench_batch`, ms a pass) 1 row 97–98 → 77–79, 8 rows 226–256 → 217–241, 12 rows 364–374 → 283–298
/// (context.md, 2026-12-08).
pub fn enabled() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    available()
        && match FORCED.load(Ordering::Relaxed) {
            1 => false,
            2 => true,
            _ => *ENV.get_or_init(|| match std::env::var("COPILOT_ROWS16") {
                Ok(v) if v.eq_ignore_ascii_case("on") => true,
                Ok(v) if v.eq_ignore_ascii_case("off") => false,
                _ => super::amx::available(),
            }),
        }
}

/// Move (or not) the layers of models loaded from now on into the 16-row layout (where [`available`]), whatever
/// `COPILOT_ROWS16` says (for tests and measurements).
pub fn set_enabled(on: bool) {
    FORCED.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// The 16-row layout of a GGUF format (`Q4K` → `Q4K16`, `Q6K` → `Q6K16`), and back ([`gguf_of`]).
pub fn layout_of(kind: Kind) -> Option<Kind> {
    match kind {
        Kind::Q4K => Some(Kind::Q4K16),
        Kind::Q6K => Some(Kind::Q6K16),
        Kind::Q4K16 | Kind::Q6K16 => None,
    }
}

/// The GGUF format a 16-row layout holds.
pub fn gguf_of(kind: Kind) -> Kind {
    match kind {
        Kind::Q4K | Kind::Q4K16 => Kind::Q4K,
        Kind::Q6K | Kind::Q6K16 => Kind::Q6K,
    }
}

/// Where byte `b` of block `i` of row `r` of a GGUF matrix of `kind` (Q4_K or Q6_K; `nb` blocks a row) lies in the
/// 16-row layout: the group's block `(r / 16)·nb + i`, then the field's place — every field moves 4 bytes of a
/// row at a time (the f16 factors 2), row `r % 16` of the field's 64-byte units.
#[inline]
fn place(kind: Kind, nb: usize, r: usize, i: usize, b: usize) -> usize {
    let (g, m) = (r / ROWS, r % ROWS);
    let unit = |start: usize, at: usize| start + 64 * (at / 4) + 4 * m + at % 4;
    match gguf_of(kind) {
        Kind::Q4K => {
            (g * nb + i) * ROWS * Q4K_BYTES
                + match b {
                    0..2 => Q4_D_AT + 2 * m + b,
                    2..4 => Q4_DMIN_AT + 2 * m + (b - 2),
                    4..16 => unit(Q4_SCALES_AT, b - 4),
                    _ => unit(0, b - 16),
                }
        }
        _ => {
            (g * nb + i) * ROWS * Q6K_BYTES
                + match b {
                    0..128 => unit(0, b),
                    128..192 => unit(Q6_QH_AT, b - 128),
                    192..208 => unit(Q6_SCALES_AT, b - 192),
                    _ => Q6_D_AT + 2 * m + (b - 208),
                }
        }
    }
}

/// The pieces a block moves in: (first byte, length) — 4 bytes, and 2 for the f16 factors.
fn pieces(kind: Kind) -> impl Iterator<Item = (usize, usize)> {
    let q4 = gguf_of(kind) == Kind::Q4K;
    let words = if q4 { (4..Q4K_BYTES).step_by(4) } else { (0..208).step_by(4) };
    let halves = if q4 { vec![(0, 2), (2, 2)] } else { vec![(208, 2)] };
    halves.into_iter().chain(words.map(|b| (b, 4)))
}

/// A GGUF matrix of `kind` (Q4_K or Q6_K), `n` rows (a multiple of 16) × `nb` blocks, in the 16-row layout (the
/// same bytes).
pub fn interleave(kind: Kind, w: &[u8], n: usize, nb: usize) -> Vec<u8> {
    let bb = kind.block_bytes();
    assert!(n.is_multiple_of(ROWS), "{n} rows is not a multiple of {ROWS}");
    assert!(w.len() >= n * nb * bb, "weights of {} bytes for {n} rows of {nb} blocks", w.len());
    let mut out = vec![0u8; n * nb * bb];
    for r in 0..n {
        for i in 0..nb {
            let block = &w[(r * nb + i) * bb..(r * nb + i + 1) * bb];
            for (b, len) in pieces(kind) {
                let at = place(kind, nb, r, i, b);
                out[at..at + len].copy_from_slice(&block[b..b + len]);
            }
        }
    }
    out
}

/// Block `i` of row `r` in GGUF's layout (into `out[..block_bytes]`), read from a matrix of `kind` in the 16-row
/// layout (`nb` blocks a row).
pub fn block(kind: Kind, w: &[u8], nb: usize, r: usize, i: usize, out: &mut [u8]) {
    for (b, len) in pieces(kind) {
        let at = place(kind, nb, r, i, b);
        out[b..b + len].copy_from_slice(&w[at..at + len]);
    }
}

/// The whole matrix back in GGUF's layout (for candle's matmul, which reads only that).
pub fn deinterleave(kind: Kind, w: &[u8], n: usize, nb: usize) -> Vec<u8> {
    let bb = kind.block_bytes();
    let mut out = vec![0u8; n * nb * bb];
    for r in 0..n {
        for i in 0..nb {
            block(kind, w, nb, r, i, &mut out[(r * nb + i) * bb..(r * nb + i + 1) * bb]);
        }
    }
    out
}

/// What the kernels take per activation row and block beside its quants: sums of its quants in pairs, as 16-bit
/// halves of a 32-bit word (the form `vpdpwssd` multiplies with the weights' pairs) — `[0..4]` Q4_K's, the sums
/// of sub-blocks (2u, 2u + 1) of 32 values (against the mins); `[4..12]` Q6_K's, pair `2k + j` the sums of 16-value
/// sub-blocks (4k + j, 4k + j + 2) (against the scales, for the quants' +32 offset).
pub type Pairs = [i32; 12];

/// [`Pairs`] of every block of an activation row.
pub fn pairs(a: &[Q8K], out: &mut Vec<Pairs>) {
    out.clear();
    out.extend(a.iter().map(|b| {
        let pair = |x: i32, y: i32| (x as i16 as u16 as i32) | (y << 16);
        // |sum of 32 quants| ≤ 32 · 127: exact in 16 bits.
        let s = |j: usize| b.bsums[2 * j] as i32 + b.bsums[2 * j + 1] as i32;
        std::array::from_fn(|x| {
            if x < 4 {
                pair(s(2 * x), s(2 * x + 1))
            } else {
                let (k, j) = ((x - 4) / 2, (x - 4) % 2);
                pair(b.bsums[4 * k + j] as i32, b.bsums[4 * k + j + 2] as i32)
            }
        })
    }));
}

/// Weight rows `wrows` (one group: `wrows.start` a multiple of 16, at most 16 rows) of a matrix of `kind`
/// (`Q4K16` or `Q6K16`; `nb` blocks a row) against activation rows `a` (each `nb` blocks, with their [`pairs`] in
/// `p`), calling `put(weight row, activation row, value)` for every product.
///
/// Panics unless [`available`], or when the group or the activations do not fit.
pub fn product(
    kind: Kind,
    w: &[u8],
    nb: usize,
    wrows: std::ops::Range<usize>,
    a: &[&[Q8K]],
    p: &[&[Pairs]],
    mut put: impl FnMut(usize, usize, f32),
) {
    assert!(available(), "the 16-row kernels need AVX-512 VNNI");
    assert!(matches!(kind, Kind::Q4K16 | Kind::Q6K16), "{kind:?} is not a 16-row layout");
    assert!(wrows.start.is_multiple_of(ROWS) && wrows.len() <= ROWS, "weight rows {wrows:?} are not one group");
    let gb = ROWS * kind.block_bytes();
    let g = wrows.start / ROWS;
    assert!(w.len() >= (g + 1) * nb * gb, "weights too short for group {g} of {nb} blocks");
    assert!(a.len() == p.len() && a.iter().zip(p).all(|(a, p)| a.len() == nb && p.len() == nb), "activations");
    let group = &w[g * nb * gb..(g + 1) * nb * gb];
    let mut from = 0;
    while from < a.len() {
        let take = (a.len() - from).min(AT_ONCE);
        let mut out = [[0f32; ROWS]; AT_ONCE];
        macro_rules! run {
            ($r:literal) => {{
                let aa: [&[Q8K]; $r] = std::array::from_fn(|j| a[from + j]);
                let pp: [&[Pairs]; $r] = std::array::from_fn(|j| p[from + j]);
                let mut o = [[0f32; ROWS]; $r];
                // SAFETY: `available` (asserted) found AVX-512 F/BW/VL/VNNI, AVX2 and FMA; `group` holds `nb`
                // blocks of 16 rows of `kind` and every activation row `nb` blocks (asserted above).
                unsafe {
                    if kind == Kind::Q4K16 {
                        q4k::<$r>(group, w, nb, aa, pp, &mut o)
                    } else {
                        q6k::<$r>(group, w, nb, aa, pp, &mut o)
                    }
                };
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
static PICK_BYTE: [[i8; 64]; 4] = [
    within_words([0, -1, -1, -1]),
    within_words([1, -1, -1, -1]),
    within_words([2, -1, -1, -1]),
    within_words([3, -1, -1, -1]),
];
/// Bytes (0, 1) and (2, 3) of each word as two 16-bit halves (a pair of mins).
static PICK_PAIR: [[i8; 64]; 2] = [within_words([0, -1, 1, -1]), within_words([2, -1, 3, -1])];

/// Ask for the 16 rows' block `PREFETCH_BLOCKS` ahead of `blk` (`gb` bytes a block), if it is inside `whole`.
///
/// # Safety
/// None beyond the target features: a prefetch reads nothing and cannot fault; the address stays in `whole`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn prefetch_ahead(blk: *const u8, gb: usize, whole: &[u8]) {
    use std::arch::x86_64::*;
    let ahead = blk as usize + PREFETCH_BLOCKS * gb;
    if ahead + gb <= whole.as_ptr() as usize + whole.len() {
        for l in 0..gb / 64 {
            // SAFETY: a hint only, inside `whole` (checked just above).
            unsafe { _mm_prefetch::<_MM_HINT_T0>((ahead + 64 * l) as *const i8) };
        }
    }
}

/// The 16 rows' packed Q4_K scales of block `blk` (3 words each in the 16-row layout), unpacked as
/// `q4k_scales_mins` unpacks one row's: scale j of every row as a 32-bit lane (`[j]` of the first), and the min
/// pairs (2u, 2u + 1) as 16-bit halves (`[u]` of the second).
///
/// # Safety
/// AVX-512 F/BW; `blk` points to a whole 16-row Q4_K block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
pub(super) unsafe fn q4k_scales16(
    blk: *const u8,
) -> ([std::arch::x86_64::__m512i; 8], [std::arch::x86_64::__m512i; 4]) {
    use std::arch::x86_64::*;
    // SAFETY: three 64-byte loads inside the block's scales (the caller's contract) and of the static tables.
    unsafe {
        let pick: [__m512i; 4] = std::array::from_fn(|j| _mm512_loadu_si512(PICK_BYTE[j].as_ptr() as *const _));
        let pair: [__m512i; 2] = std::array::from_fn(|u| _mm512_loadu_si512(PICK_PAIR[u].as_ptr() as *const _));
        let (c3f, c0f, c03) =
            (_mm512_set1_epi32(0x3f3f_3f3f), _mm512_set1_epi32(0x0f0f_0f0f), _mm512_set1_epi32(0x0303_0303));
        // Scales 0-3, 4-7 and mins 0-3, 4-7 as the bytes of 4 registers.
        let s0 = _mm512_loadu_si512(blk.add(Q4_SCALES_AT) as *const _);
        let s1 = _mm512_loadu_si512(blk.add(Q4_SCALES_AT + 64) as *const _);
        let s2 = _mm512_loadu_si512(blk.add(Q4_SCALES_AT + 128) as *const _);
        let sc_lo = _mm512_and_si512(s0, c3f);
        let mn_lo = _mm512_and_si512(s1, c3f);
        let top = |s: __m512i| _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(s, 6), c03), 4);
        let sc_hi = _mm512_or_si512(_mm512_and_si512(s2, c0f), top(s0));
        let mn_hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(s2, 4), c0f), top(s1));
        let sc = std::array::from_fn(|j| _mm512_shuffle_epi8(if j < 4 { sc_lo } else { sc_hi }, pick[j % 4]));
        let mins = std::array::from_fn(|u| _mm512_shuffle_epi8(if u < 2 { mn_lo } else { mn_hi }, pair[u % 2]));
        (sc, mins)
    }
}

/// The 16 rows' signed Q6_K scales of block `blk` (4 words each in the 16-row layout): scale s of every row as a
/// 32-bit lane, and the 4 words as loaded.
///
/// # Safety
/// AVX-512 F/BW; `blk` points to a whole 16-row Q6_K block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
pub(super) unsafe fn q6k_scales16(
    blk: *const u8,
) -> ([std::arch::x86_64::__m512i; 16], [std::arch::x86_64::__m512i; 4]) {
    use std::arch::x86_64::*;
    // SAFETY: four 64-byte loads inside the block's scales (the caller's contract).
    unsafe {
        let sw: [__m512i; 4] = std::array::from_fn(|k| _mm512_loadu_si512(blk.add(Q6_SCALES_AT + 64 * k) as *const _));
        let sc = std::array::from_fn(|s| {
            let up = _mm_cvtsi32_si128(24 - 8 * (s % 4) as i32);
            _mm512_srai_epi32(_mm512_sll_epi32(sw[s / 4], up), 24)
        });
        (sc, sw)
    }
}

/// One group's Q4_K blocks against `R` activation rows: `out[r][m]` = row m's product with activation row r.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI, AVX2 and FMA; `group` holds `nb` blocks of 16 Q4_K rows in the 16-row layout (a piece
/// of `whole`, used only to keep prefetch addresses inside the matrix) and every `a[r]`, `p[r]` `nb` blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4k<const R: usize>(
    group: &[u8],
    whole: &[u8],
    nb: usize,
    a: [&[Q8K]; R],
    p: [&[Pairs]; R],
    out: &mut [[f32; ROWS]; R],
) {
    use std::arch::x86_64::*;
    const GB: usize = ROWS * Q4K_BYTES;
    // SAFETY: every load below reads inside block i < nb of `group` (the caller's contract: `nb` blocks of GB
    // bytes) or inside activation block i < nb of `a[r]`; prefetches stay inside `whole`.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        let m4 = _mm512_set1_epi8(0x0F);
        for i in 0..nb {
            let blk = group.as_ptr().add(i * GB);
            // The pool hands out neighbouring groups in order: the next group's first blocks come in too.
            prefetch_ahead(blk, GB, whole);
            let (sc, mins) = q4k_scales16(blk);
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(Q4_D_AT) as *const _));
            let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(Q4_DMIN_AT) as *const _));
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

/// One group's Q6_K blocks against `R` activation rows, as [`q4k`]: per block the exact `I = Σ sc·(q − 32)·a` —
/// the 16-value sub-block sums of the stored quants (0..63) times their scales, less 32 × the scales against
/// the activations' sub-block sums — then `acc += (I·dw)·d` (fused), the lane kernels' totals formulation.
///
/// # Safety
/// As [`q4k`], with Q6_K blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q6k<const R: usize>(
    group: &[u8],
    whole: &[u8],
    nb: usize,
    a: [&[Q8K]; R],
    p: [&[Pairs]; R],
    out: &mut [[f32; ROWS]; R],
) {
    use std::arch::x86_64::*;
    const GB: usize = ROWS * Q6K_BYTES;
    // SAFETY: as in `q4k`: every load inside block i < nb of `group` (GB bytes a block) or of `a[r]`.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        let (m4, m3) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x03));
        for i in 0..nb {
            let blk = group.as_ptr().add(i * GB);
            prefetch_ahead(blk, GB, whole);
            // Word k of each row holds its signed scales 4k..4k + 4: scale s as a 32-bit lane, and the pairs
            // (4k + j, 4k + j + 2) as 16-bit halves (as `Pairs` pairs the activations' sums).
            let (sc, sw) = q6k_scales16(blk);
            let sc_pairs: [__m512i; 8] = std::array::from_fn(|v| {
                let w = sw[v / 2];
                if v % 2 == 0 {
                    _mm512_srai_epi16(_mm512_slli_epi16(w, 8), 8)
                } else {
                    _mm512_srai_epi16(w, 8)
                }
            });
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(Q6_D_AT) as *const _));
            // Half t (values 128t..), quarter k of it (32 values from 128t + 32k), 4 values at 4·lq (lq < 8):
            // sub-block 8t + 2k + lq / 4. |sub-block sum| ≤ 16 · 63 · 127 and |I| < 2^31: exact integers.
            let mut total = [_mm512_setzero_si512(); R];
            for t in 0..2 {
                for hs in 0..2 {
                    let mut sums = [[_mm512_setzero_si512(); 4]; R];
                    for lq in 4 * hs..4 * hs + 4 {
                        let qa = _mm512_loadu_si512(blk.add(64 * (16 * t + lq)) as *const _);
                        let qb = _mm512_loadu_si512(blk.add(64 * (16 * t + 8 + lq)) as *const _);
                        let qh = _mm512_loadu_si512(blk.add(Q6_QH_AT + 64 * (8 * t + lq)) as *const _);
                        let high = |shift: u32| {
                            let h = _mm512_and_si512(_mm512_srl_epi16(qh, _mm_cvtsi32_si128(shift as i32)), m3);
                            _mm512_slli_epi16(h, 4)
                        };
                        let q = [
                            _mm512_or_si512(_mm512_and_si512(qa, m4), high(0)),
                            _mm512_or_si512(_mm512_and_si512(qb, m4), high(2)),
                            _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(qa, 4), m4), high(4)),
                            _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(qb, 4), m4), high(6)),
                        ];
                        for r in 0..R {
                            let qs = a[r].get_unchecked(i).qs.as_ptr().add(128 * t + 4 * lq);
                            for (k, qk) in q.iter().enumerate() {
                                let av = _mm512_set1_epi32((qs.add(32 * k) as *const i32).read_unaligned());
                                sums[r][k] = _mm512_dpbusd_epi32(sums[r][k], *qk, av);
                            }
                        }
                    }
                    for r in 0..R {
                        for (k, s) in sums[r].iter().enumerate() {
                            total[r] = _mm512_add_epi32(total[r], _mm512_mullo_epi32(*s, sc[8 * t + 2 * k + hs]));
                        }
                    }
                }
            }
            for r in 0..R {
                // Less 32 · Σ sc·bsum (the stored quants' +32), then the totals formulation's float operations.
                let pr = p[r].get_unchecked(i);
                let mut o = _mm512_setzero_si512();
                for (v, scp) in sc_pairs.iter().enumerate() {
                    o = _mm512_dpwssd_epi32(o, *scp, _mm512_set1_epi32(pr[4 + v]));
                }
                let total = _mm512_sub_epi32(total[r], _mm512_slli_epi32(o, 5));
                let t = _mm512_mul_ps(_mm512_cvtepi32_ps(total), dw);
                acc[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(a[r].get_unchecked(i).d), acc[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn q4k<const R: usize>(
    _: &[u8],
    _: &[u8],
    _: usize,
    _: [&[Q8K]; R],
    _: [&[Pairs]; R],
    _: &mut [[f32; ROWS]; R],
) {
    unreachable!("the 16-row kernels are x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn q6k<const R: usize>(
    _: &[u8],
    _: &[u8],
    _: usize,
    _: [&[Q8K]; R],
    _: [&[Pairs]; R],
    _: &mut [[f32; ROWS]; R],
) {
    unreachable!("the 16-row kernels are x86-64 only")
}

/// Row `r` of a matrix of `kind` (`Q4K16` or `Q6K16`, `nb` blocks a row) against one activation row, in the
/// scalar form of the totals formulation (the integers summed in any order, the same float operations): the
/// reference the tests hold the kernels to.
pub fn dot_scalar(kind: Kind, w: &[u8], nb: usize, r: usize, a: &[Q8K]) -> f32 {
    let mut acc = 0f32;
    let mut b = [0u8; Q6K_BYTES];
    for (i, y) in a.iter().enumerate().take(nb) {
        block(kind, w, nb, r, i, &mut b);
        if gguf_of(kind) == Kind::Q4K {
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
        } else {
            let (ql, qh, sc, dw) = (&b[0..128], &b[128..192], &b[192..208], f16_at(&b, 208));
            let mut total = 0i32;
            for h in 0..2 {
                for l in 0..32 {
                    for (k, q) in super::kernels::q6k_quants(&ql[64 * h..], &qh[32 * h..], l).into_iter().enumerate() {
                        let v = 128 * h + 32 * k + l;
                        total += sc[v / 16] as i8 as i32 * (q as i32 - 32) * y.qs[v] as i32;
                    }
                }
            }
            acc = (total as f32 * dw).mul_add(y.d, acc);
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::tests::quantized_spread;
    use crate::engine::kernels::{arrange, quantize_q8k, rows_lanes_from, Kind, Q8KLanes, Via, QK_K};
    use candle_core::quantized::GgmlDType;

    /// `amx`'s test rows (smooth, spiked, zero), quantized.
    fn act_rows(k: usize, count: usize, seed: u64) -> Vec<Vec<Q8K>> {
        crate::engine::amx::tests::rows(k, count, seed)
            .iter()
            .map(|x| {
                let mut a = Vec::new();
                quantize_q8k(x, &mut a);
                a
            })
            .collect()
    }

    #[test]
    fn the_layout_moves_every_byte_and_moves_it_back() {
        let (n, k) = (48, 768);
        let nb = k / QK_K;
        for (dtype, kind) in [(GgmlDType::Q4K, Kind::Q4K), (GgmlDType::Q6K, Kind::Q6K)] {
            let bb = kind.block_bytes();
            let (w, _) = quantized_spread(dtype, n, k, 3, 2.0);
            let x = interleave(kind, &w, n, nb);
            assert_eq!(x.len(), n * nb * bb);
            assert_ne!(x, w[..x.len()], "the layout moved nothing");
            let sixteen = layout_of(kind).expect("a layout");
            assert_eq!(deinterleave(sixteen, &x, n, nb), w[..n * nb * bb]);
            for (r, i) in [(0, 0), (17, 2), (47, 1)] {
                let mut b = vec![0u8; bb];
                block(sixteen, &x, nb, r, i, &mut b);
                assert_eq!(b, w[(r * nb + i) * bb..][..bb], "{kind:?} row {r} block {i}");
            }
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
        for (dtype, kind) in [(GgmlDType::Q4K, Kind::Q4K), (GgmlDType::Q6K, Kind::Q6K)] {
            let sixteen = layout_of(kind).expect("a layout");
            for spread in [2.0, 50.0] {
                let n = 32;
                let (w, _) = quantized_spread(dtype, n, k, 9, spread);
                let x = interleave(kind, &w, n, nb);
                let row_bytes = nb * kind.block_bytes();
                for count in [1, 3, 4, 5, 9, 17] {
                    let act = act_rows(k, count, 5 + count as u64);
                    let ps: Vec<Vec<Pairs>> = act
                        .iter()
                        .map(|a| {
                            let mut p = Vec::new();
                            pairs(a, &mut p);
                            p
                        })
                        .collect();
                    let a: Vec<&[Q8K]> = act.iter().map(|a| a.as_slice()).collect();
                    let p: Vec<&[Pairs]> = ps.iter().map(|p| p.as_slice()).collect();
                    let mut ours = vec![f32::NAN; n * count];
                    for start in (0..n).step_by(ROWS) {
                        product(sixteen, &x, nb, start..start + ROWS, &a, &p, |r, j, v| ours[j * n + r] = v);
                    }
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    let what = format!("{kind:?}, {count} rows, spread {spread}");
                    // Each activation row alone gives the same bits as in the pass of `count` rows.
                    for j in 0..count {
                        let mut alone = vec![f32::NAN; n];
                        for start in (0..n).step_by(ROWS) {
                            let (aj, pj) = (&a[j..j + 1], &p[j..j + 1]);
                            product(sixteen, &x, nb, start..start + ROWS, aj, pj, |r, _, v| alone[r] = v);
                        }
                        assert_eq!(bits(&alone), bits(&ours[j * n..(j + 1) * n]), "row {j} alone: {what}");
                    }
                    // The lane kernels' totals variant, over the GGUF layout, gives the same bits, and so does the
                    // scalar form of the formulation.
                    let lanes: Vec<Vec<Q8KLanes>> = act.iter().map(|a| a.iter().map(arrange).collect()).collect();
                    let mut theirs = vec![f32::NAN; n * count];
                    for start in (0..n).step_by(ROWS) {
                        for from in (0..count).step_by(8) {
                            let group: Vec<&[Q8KLanes]> =
                                lanes[from..(from + 8).min(count)].iter().map(|l| l.as_slice()).collect();
                            let via = Via { totals: Some(true), ..Via::default() };
                            rows_lanes_from(kind, &w, row_bytes, start..start + ROWS, &group, via, |r, j, v| {
                                theirs[(from + j) * n + r] = v
                            });
                        }
                    }
                    assert_eq!(bits(&ours), bits(&theirs), "{what}");
                    for j in 0..count {
                        for r in [0, 5, 16, 31] {
                            let scalar = dot_scalar(sixteen, &x, nb, r, &act[j]);
                            assert_eq!(scalar.to_bits(), ours[j * n + r].to_bits(), "scalar, row {r}: {what}");
                        }
                    }
                    assert!(ours.iter().all(|v| v.is_finite()));
                    let zero_rows = (count + 1) / 5;
                    assert_eq!(ours.iter().filter(|v| **v == 0.0).count(), n * zero_rows, "{what}");
                }
            }
        }
    }

    #[test]
    fn extreme_values_stay_exact() {
        if !available() {
            eprintln!("no AVX-512 VNNI here: the 16-row kernels cannot run (and are never used) on this machine");
            return;
        }
        // Largest quants, largest scales (Q6_K: ±128 as stored bytes allow, mixed signs) and activations of ±127:
        // the integers must neither wrap nor saturate, so the kernels still agree with the scalar form.
        let (n, nb) = (16, 2);
        for kind in [Kind::Q4K, Kind::Q6K] {
            let bb = kind.block_bytes();
            let mut w = vec![0xFFu8; n * nb * bb];
            let d = half::f16::from_f32(0.01).to_bits().to_le_bytes();
            for blk in w.chunks_exact_mut(bb) {
                if kind == Kind::Q4K {
                    blk[0..2].copy_from_slice(&d);
                    blk[2..4].copy_from_slice(&d);
                } else {
                    for s in 0..16 {
                        blk[192 + s] = if s % 3 == 1 { 0x80 } else { 127 };
                    }
                    blk[208..210].copy_from_slice(&d);
                }
            }
            let x = interleave(kind, &w, n, nb);
            let sixteen = layout_of(kind).expect("a layout");
            for sign in [1.0f32, -1.0] {
                let xs: Vec<f32> = (0..nb * QK_K).map(|i| sign * if i % 7 == 3 { -1.0 } else { 1.0 }).collect();
                let mut act = Vec::new();
                quantize_q8k(&xs, &mut act);
                let mut p = Vec::new();
                pairs(&act, &mut p);
                let mut ours = vec![f32::NAN; n];
                product(sixteen, &x, nb, 0..n, &[&act], &[&p], |r, _, v| ours[r] = v);
                for (r, v) in ours.iter().enumerate() {
                    assert_eq!(v.to_bits(), dot_scalar(sixteen, &x, nb, r, &act).to_bits(), "{kind:?} row {r}");
                    assert!(v.is_finite() && *v != 0.0);
                }
            }
        }
    }
}
