//! Weight products of many activation rows on Intel AMX (the tile unit of Sapphire Rapids and later Xeons), Q4_K
//! and Q6_K weights: prompts, and with `COPILOT_AMX=all` decoding passes of 8+ rows. GGUF rows here; the 16-row
//! layout of [`super::rows16`] in [`super::amx16`] (which [`product`] hands those to).
//!
//! Why: one row of a decoding pass is bound by memory, but a prompt, or a pass of 16–32 rows (several sessions
//! decoded together, each with its candidates), is bound by arithmetic — with AVX-512 VNNI a 32-row pass took 7.3× a
//! one-row pass on the Intel Xeon kind (reports/batch_decode_intel.md). AMX multiplies a 16 × 64 tile of bytes by a
//! 64 × 16 one in one instruction (16,384 products; ~2.7 × 10^12 a second on one core of that machine, measured
//! with a C loop of `tdpbusd`), about 16× what `vpdpbusd` does.
//!
//! In a decoding pass the results must be bit-identical to what the VNNI kernels of [`super::kernels`] give the
//! same row in a pass of any size (candidates and speculative verification rely on it). In their totals
//! formulation (`COPILOT_AMX=all`) those kernels reduce a block's integer sums to two exact totals per weight row
//! and activation row — `I` = Σ sc·q·a over the block's 256 values and
//! `M` = Σ min·bsum over its 8 sub-blocks — and then do `t = I·dw − M·dmin` (fused) and `acc += t·d` (fused).
//! Here the same integers come from tiles, and the same three float operations follow, 16 activation rows at a
//! time in a 512-bit register. A Q4_K value is `sc·q` with a 6-bit scale per 32 values and a 4-bit `q`, and a
//! tile multiplies bytes, so each scale is cut in two digits, `sc = 8·sh + sl` (`sh`, `sl` ≤ 7): the weights go in
//! as two byte tiles `sh·q` and `sl·q` (≤ 105), and `I = 8·X + Y` from their two products — exact integers, so
//! the same `I`; Q6_K's exact 16-bit `sc·(q − 32)` is cut in its top bits and its low 7 (signed tiles). The bytes
//! are made per pass from the GGUF blocks (two 16-bit multiplies per 64 values: both bytes
//! of a 16-bit lane are multiplied at once, as neither product carries into the next byte); nothing is kept.
//!
//! Linux hands AMX's 8 KB of tile state to a process only when asked (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), once;
//! [`available`] asks, and says no wherever the CPU, the kernel or the VM does not grant it (then the VNNI
//! kernels run). By default prompts take the tiles (they need not match the decode kernels' bits, only their
//! values up to float order, as the VNNI prompt tiles did) and decoding passes keep the VNNI kernels in their
//! lane formulation; `COPILOT_AMX=all` sends decoding passes of 8+ rows to the tiles too (see [`for_decode`]),
//! `COPILOT_AMX=off`, or [`set_enabled`], turns the tiles off (for comparisons).

use super::kernels::{f16_at, q4k_scales_mins, Kind, Q4K_BYTES, Q6K_BYTES, Q8K, QK_K};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Activation rows in one tile product (the 16 columns of a tile's 32-bit results).
pub const TILE_COLS: usize = 16;
/// Weight rows in one tile product (a tile's 16 rows); also `gemm_many`'s rows per work item.
pub const TILE_ROWS: usize = 16;
/// Bytes of one tile row: 64 values of one weight row, or 4 values of each of 16 activation rows.
pub(super) const ROW_BYTES: usize = 64;
/// One tile: 16 rows of 64 bytes.
pub(super) const TILE_BYTES: usize = TILE_ROWS * ROW_BYTES;
/// Tiles in one block of 256 values (64 values each).
pub(super) const CHUNKS: usize = QK_K / ROW_BYTES;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// True when the AMX kernels can run on this machine: the CPU has AMX-TILE and AMX-INT8 (and the AVX-512 the
/// float work needs), Linux granted this process the tile state, `COPILOT_AMX` is not `off`, and [`set_enabled`]
/// did not turn it off. The first call asks Linux (once per process). Prompts then take the tiles.
pub fn available() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    ENABLED.load(Ordering::Relaxed) && *GRANTED.get_or_init(detect)
}

/// True when decoding passes of many rows take the tiles too: [`available`] and `COPILOT_AMX=all`, read once.
/// Not the default: the tiles reproduce the decode kernels' bits only in the totals formulation, which costs the
/// small passes (measured on the Intel Xeon kind, `scripts/bench-batch`: 4 rows 63 → 70 ms, 8 rows 94 → 111 ms)
/// more than the tiles save anywhere but in passes of 12 or more rows (16 rows 177 → 130 ms, 32 rows 344 → 199);
/// several sessions decoded together gained 2.01× → 2.10–2.17× of one session's answers a minute
/// (reports/concurrency_amx_intel.md, context.md 2026-12-07).
pub fn for_decode() -> bool {
    static ALL: OnceLock<bool> = OnceLock::new();
    available() && *ALL.get_or_init(|| std::env::var("COPILOT_AMX").is_ok_and(|v| v.eq_ignore_ascii_case("all")))
}

/// Turn the AMX kernels on or off for the whole process, before the first product (for measurements).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

fn detect() -> bool {
    if std::env::var("COPILOT_AMX").is_ok_and(|v| v.eq_ignore_ascii_case("off") || v == "0") {
        return false;
    }
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        if !avx512 || !super::kernels::simd_available() {
            return false;
        }
        // CPUID leaf 7, sub-leaf 0, EDX: bit 24 AMX-TILE, bit 25 AMX-INT8.
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        if leaf.edx & (3 << 24) != 3 << 24 {
            return false;
        }
        // ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18): fails where the kernel or the VM does not
        // support it (or a thread's signal stack is too small for the larger state), and then nothing uses AMX.
        // SAFETY: the syscall takes two integer arguments and touches no memory of ours.
        let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1023 as libc::c_long, 18 as libc::c_long) };
        rc == 0
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// Where value `p` (0..64) of tile `q` (0..4) of a block lies among the block's 256 values: the order in which
/// the weight bytes come out of a Q4_K block's 128 bytes of nibbles, 64 at a time (bytes 0..64: low nibbles are
/// values 0..32 and 64..96, high nibbles 32..64 and 96..128; bytes 64..128 the same plus 128). Q6_K's values are
/// laid out in the same order (`pack_q6k`), and so are the activations, so every product meets its own value.
const fn value_at(q: usize, p: usize) -> usize {
    128 * (q / 2) + 32 * (q % 2) + p + if p >= 32 { 32 } else { 0 }
}

/// The activation rows of one pass, laid out for the tiles: per group of 16 rows (rows past the pass's last are
/// zero) and block, the 4 tiles of its quants — as the second operand of GGUF weights' tiles (tile `q`, row `kk`,
/// bytes 4n..4n+4: values `value_at(q, 4kk..4kk+4)` of activation row n), and, for the 16-row layout's tiles
/// ([`super::amx16`]), as the first operand (tile `q`, row n: values 64q..64q+64 of activation row n) — the sums
/// of each sub-block pair as 16-bit pairs for `vpdpwssd`, and each row's scale `d`.
#[derive(Default)]
pub struct Acts {
    rows: usize,
    nb: usize,
    /// `groups · nb · CHUNKS` tiles of `TILE_BYTES`, 64-byte aligned (`[u8; 64]` units): the second operand.
    tiles: Vec<Align64>,
    /// The same quants as the first operand (empty unless asked for).
    pub(super) rows_tiles: Vec<Align64>,
    /// Per group and block, 4 registers: lane n = (sum of sub-block 2u, sum of sub-block 2u + 1) of row n.
    pub(super) pairs: Vec<[i32; TILE_COLS]>,
    /// Per group and block: `d` of each row (0 past the last row).
    pub(super) d: Vec<[f32; TILE_COLS]>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Align64(pub(super) [u8; 64]);

/// For each row of a block's 4 activation tiles in order (tile q, row kk: `TILE_ROWS · q + kk`), the first of the
/// 4 block values its 32-bit lanes hold: `value_at(q, 4·kk)`.
const LANE_SOURCES: [u8; CHUNKS * TILE_ROWS] = {
    let mut v = [0u8; CHUNKS * TILE_ROWS];
    let mut i = 0;
    while i < v.len() {
        let (q, p) = (i / TILE_ROWS, 4 * (i % TILE_ROWS));
        v[i] = value_at(q, p) as u8;
        i += 1;
    }
    v
};

/// Four int8 quants as the bytes a tile reads.
#[inline(always)]
fn i8s_as_u8s(q: &[i8]) -> [u8; 4] {
    [q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8]
}

/// 64 int8 quants as the bytes a tile reads.
#[inline(always)]
fn i8s_as_u8s64(q: &[i8]) -> [u8; 64] {
    std::array::from_fn(|j| q[j] as u8)
}

impl Acts {
    /// Activation rows in the pass.
    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    /// Blocks a row.
    pub(super) fn nb(&self) -> usize {
        self.nb
    }

    /// Lay out `act` (each row `nb` blocks; reuses this value's memory): the tiles GGUF weights take where `gguf`,
    /// those the 16-row layout's take where `rows16`.
    pub fn fill(&mut self, act: &[&[Q8K]], gguf: bool, rows16: bool) {
        let nb = act.first().map_or(0, |a| a.len());
        assert!(act.iter().all(|a| a.len() == nb), "activation rows of different widths");
        let groups = act.len().div_ceil(TILE_COLS);
        self.rows = act.len();
        self.nb = nb;
        self.tiles.clear();
        if gguf {
            self.tiles.resize(groups * nb * CHUNKS * (TILE_BYTES / 64), Align64([0; 64]));
        }
        self.rows_tiles.clear();
        if rows16 {
            self.rows_tiles.resize(groups * nb * CHUNKS * (TILE_BYTES / 64), Align64([0; 64]));
        }
        self.pairs.clear();
        self.pairs.resize(groups * nb * 4, [0; TILE_COLS]);
        self.d.clear();
        self.d.resize(groups * nb, [0.0; TILE_COLS]);
        for (n, row) in act.iter().enumerate() {
            let (g, col) = (n / TILE_COLS, n % TILE_COLS);
            for (i, b) in row.iter().enumerate() {
                let gb = g * nb + i;
                if gguf {
                    // Tile q's row kk (one 64-byte unit) takes, at bytes 4·col.., values value_at(q, 4kk..4kk + 4):
                    // consecutive in the block (value_at is +1 per byte within a 32-bit lane), so one 4-byte copy.
                    let units = &mut self.tiles[gb * CHUNKS * TILE_ROWS..(gb + 1) * CHUNKS * TILE_ROWS];
                    for (unit, &v) in units.iter_mut().zip(LANE_SOURCES.iter()) {
                        let v = v as usize;
                        unit.0[4 * col..4 * col + 4].copy_from_slice(&i8s_as_u8s(&b.qs[v..v + 4]));
                    }
                }
                if rows16 {
                    // Tile q's row col: values 64q..64q + 64, as they are.
                    for q in 0..CHUNKS {
                        let unit = &mut self.rows_tiles[(gb * CHUNKS + q) * TILE_ROWS + col];
                        unit.0.copy_from_slice(&i8s_as_u8s64(&b.qs[64 * q..64 * q + 64]));
                    }
                }
                for u in 0..4 {
                    let s = |j: usize| (b.bsums[2 * j] as i32 + b.bsums[2 * j + 1] as i32) as i16 as u16 as i32;
                    self.pairs[gb * 4 + u][col] = s(2 * u) | (s(2 * u + 1) << 16);
                }
                self.d[gb][col] = b.d;
            }
        }
    }
}

/// The tile layout `ldtilecfg` reads (palette 1): all 8 tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
pub(super) struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
    reserved2: [u8; 16],
}

const CONFIG: TileConfig = {
    let mut colsb = [0u16; 16];
    let mut rows = [0u8; 16];
    let mut t = 0;
    while t < 8 {
        colsb[t] = ROW_BYTES as u16;
        rows[t] = TILE_ROWS as u8;
        t += 1;
    }
    TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb, rows, reserved2: [0; 16] }
};

/// Load [`CONFIG`] into this thread's tile unit and return the configuration that was there (all zeros when the
/// tiles were not configured): another user of the tiles in this thread (candle's quantized matmul configures them
/// once per thread and counts on the configuration staying) gets it back from [`restore`].
///
/// # Safety
/// AMX-TILE present and the tile state granted to this process.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn configure() -> TileConfig {
    use std::arch::asm;
    let mut saved =
        TileConfig { palette: 0, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16], reserved2: [0; 16] };
    // SAFETY: `sttilecfg` writes the 64 bytes of `saved` (64-byte aligned, as `TileConfig` is); CONFIG is a valid
    // palette-1 configuration (8 tiles of 16 × 64 bytes) and outlives the instruction; AMX by the caller.
    unsafe {
        asm!("sttilecfg [{}]", in(reg) &mut saved, options(nostack, preserves_flags));
        asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly, preserves_flags));
    }
    saved
}

/// Put back what [`configure`] found: the configuration, or, if there was none, release the tile state.
///
/// # Safety
/// `saved` comes from [`configure`] on this thread; the tile registers are not read again before the next
/// [`configure`].
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn restore(saved: &TileConfig) {
    use std::arch::asm;
    // SAFETY: a configuration `sttilecfg` stored is valid for `ldtilecfg`; `tilerelease` only drops tile state.
    unsafe {
        if saved.palette != 0 {
            asm!("ldtilecfg [{}]", in(reg) saved, options(nostack, readonly, preserves_flags));
        } else {
            asm!("tilerelease", options(nostack, nomem, preserves_flags));
        }
    }
}

/// One work item's scratch: the block's weight bytes as tiles (`x`: `sh·q`, `y`: `sl·q`, 4 tiles each), the
/// tiles' 32-bit results, per weight row its block factors and min pairs, and the float sums.
#[repr(C, align(64))]
struct Scratch {
    x: [[u8; TILE_BYTES]; CHUNKS],
    y: [[u8; TILE_BYTES]; CHUNKS],
    cx: [[i32; TILE_COLS]; TILE_ROWS],
    cy: [[i32; TILE_COLS]; TILE_ROWS],
    dw: [f32; TILE_ROWS],
    dmin: [f32; TILE_ROWS],
    mins: [[i32; 4]; TILE_ROWS],
}

/// Weight rows `wrows` (at most 16) of a `kind` matrix `w` (`row_bytes` a row, `acts.nb` blocks used) against
/// every activation row of `acts`, calling `put(weight row, activation row, value)` for each product: the bits
/// [`super::kernels`]'s decode kernels give where [`for_decode`] holds (see the module's doc).
///
/// Panics unless [`available`] (or with more than 16 weight rows, or weights too short).
pub fn product(
    kind: Kind,
    w: &[u8],
    row_bytes: usize,
    wrows: std::ops::Range<usize>,
    acts: &Acts,
    put: impl FnMut(usize, usize, f32),
) {
    assert!(available(), "AMX is not available");
    if kind.rows16() {
        return super::amx16::product(kind, w, wrows, acts, put);
    }
    assert!(wrows.len() <= TILE_ROWS, "{} weight rows at once", wrows.len());
    assert!(!acts.tiles.is_empty() || acts.rows == 0 || acts.nb == 0, "activations not laid out for GGUF tiles");
    assert!(row_bytes >= acts.nb * kind.block_bytes() && w.len() >= wrows.end * row_bytes, "weights too short");
    thread_local! {
        static SCRATCH: std::cell::RefCell<Option<Box<Scratch>>> = const { std::cell::RefCell::new(None) };
        static SUMS: std::cell::RefCell<Vec<[f32; TILE_COLS]>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|s| {
        SUMS.with_borrow_mut(|sums| {
            // SAFETY: all-zero bits are valid for every field (integers and floats).
            let s = s.get_or_insert_with(|| unsafe { Box::new(std::mem::zeroed()) });
            // SAFETY: `available` (asserted) found AMX-TILE/INT8 and AVX-512 F/BW/VL/VNNI and Linux granted the
            // tile state; the asserts above keep every weight block read inside `w`.
            unsafe {
                match kind {
                    Kind::Q4K => tiles::<false>(w, row_bytes, wrows, acts, s, sums, put),
                    Kind::Q6K => tiles::<true>(w, row_bytes, wrows, acts, s, sums, put),
                    Kind::Q4K16 | Kind::Q6K16 => unreachable!("handed to amx16 above"),
                }
            }
        })
    })
}

/// 16-bit lanes 0..16 set to `ja`, lanes 16..32 to `jb`: an index vector for `vpermw`, or per-lane shift counts.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn pick(ja: i16, jb: i16) -> std::arch::x86_64::__m512i {
    let mut v = [ja; 32];
    v[16..].fill(jb);
    // SAFETY: [i16; 32] and __m512i have the same size; any bits are a valid __m512i.
    unsafe { std::mem::transmute::<[i16; 32], std::arch::x86_64::__m512i>(v) }
}

/// Weight row `m` of the tiles from Q4_K block `p` (144 bytes): `x` = `sh·q`, `y` = `sl·q` (`sc = 8·sh + sl`),
/// in the order of `value_at`; its factors and min pairs.
///
/// # Safety
/// AVX-512 F/BW/VL; `p` points to a whole Q4_K block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
unsafe fn pack_q4k(p: *const u8, s: &mut Scratch, m: usize) {
    use std::arch::x86_64::*;
    // SAFETY: `p` holds 144 bytes (the caller's contract); the stores write row m (< 16) of `s`'s tiles, which
    // are 64-byte aligned (`Scratch` is, and every tile row is 64 bytes).
    unsafe {
        let b = std::slice::from_raw_parts(p, Q4K_BYTES);
        s.dw[m] = f16_at(b, 0);
        s.dmin[m] = f16_at(b, 2);
        let sm = q4k_scales_mins(&b[4..16]);
        // 16-bit lanes: scales 0..8, mins 0..8; the mins' half is the 4 (min 2u, min 2u + 1) pairs `vpdpwssd`
        // takes.
        let smw = _mm256_cvtepu8_epi16(_mm_loadu_si128(sm.as_ptr() as *const __m128i));
        _mm_storeu_si128(s.mins[m].as_mut_ptr() as *mut __m128i, _mm256_extracti128_si256(smw, 1));
        let sh = _mm512_castsi256_si512(_mm256_srli_epi16(smw, 3));
        let sl = _mm512_castsi256_si512(_mm256_and_si256(smw, _mm256_set1_epi16(7)));
        let m4 = _mm512_set1_epi8(0x0F);
        let q0 = _mm512_loadu_si512(p.add(16) as *const _);
        let q1 = _mm512_loadu_si512(p.add(80) as *const _);
        let nib = [
            _mm512_and_si512(q0, m4),
            _mm512_and_si512(_mm512_srli_epi16(q0, 4), m4),
            _mm512_and_si512(q1, m4),
            _mm512_and_si512(_mm512_srli_epi16(q1, 4), m4),
        ];
        // Tile t's first 32 values belong to sub-block `ja`, the next 32 to `jb` (see `value_at`).
        let sub = [pick(0, 2), pick(1, 3), pick(4, 6), pick(5, 7)];
        for t in 0..CHUNKS {
            // Both bytes of a 16-bit lane times the same digit (≤ 7 · 15 = 105 each: no carry).
            let x = _mm512_mullo_epi16(nib[t], _mm512_permutexvar_epi16(sub[t], sh));
            let y = _mm512_mullo_epi16(nib[t], _mm512_permutexvar_epi16(sub[t], sl));
            _mm512_store_si512(s.x[t].as_mut_ptr().add(m * ROW_BYTES) as *mut _, x);
            _mm512_store_si512(s.y[t].as_mut_ptr().add(m * ROW_BYTES) as *mut _, y);
        }
    }
}

/// Weight row `m` of the tiles from Q6_K block `p` (210 bytes): each value's `sc·(q − 32)` (16-bit, exact) cut in
/// `x` = its top bits (`>> 7`, −32..31) and `y` = its low 7 bits, in the order of `value_at`; its factor.
///
/// # Safety
/// AVX-512 F/BW/VL; `p` points to a whole Q6_K block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
unsafe fn pack_q6k(p: *const u8, s: &mut Scratch, m: usize) {
    use std::arch::x86_64::*;
    // SAFETY: as in `pack_q4k`, with a 210-byte block: ql at 0..128, qh at 128..192, scales at 192..208, d at 208.
    unsafe {
        s.dw[m] = f16_at(std::slice::from_raw_parts(p, Q6K_BYTES), 208);
        let sc = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192) as *const __m128i)));
        let (m4, m3) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x03));
        let lo7 = _mm512_set1_epi16(127);
        let offset = _mm512_set1_epi16(32);
        // Index vector for `vpermw`: the 8 16-bit lanes of 128-bit lane L take lane `j[L]` of the source.
        let lanes = |j0: i16, j1: i16, j2: i16, j3: i16| {
            let mut v = [0i16; 32];
            for (l, j) in [j0, j1, j2, j3].into_iter().enumerate() {
                v[8 * l..8 * l + 8].fill(j);
            }
            // SAFETY: [i16; 32] and __m512i have the same size.
            std::mem::transmute::<[i16; 32], __m512i>(v)
        };
        for t in 0..2 {
            // Half t: values 128t..128t + 128 from ql[64t..64t + 64] and qh[32t..32t + 32].
            let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(128 + 32 * t) as *const __m256i));
            for sh in 0..2 {
                // Tile 2t + sh: values 128t + 32sh + l (low nibbles of ql[64t + 32sh + l], qh bits 2sh) and
                // 128t + 32sh + 64 + l (high nibbles, qh bits 2sh + 4), l < 32.
                let ql = _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(64 * t + 32 * sh) as *const __m256i));
                let lowq = _mm512_and_si512(_mm512_srlv_epi16(ql, pick(0, 4)), m4);
                let shift = 2 * sh as i16;
                let highq = _mm512_and_si512(_mm512_srlv_epi16(qh, pick(shift, shift + 4)), m3);
                let q = _mm512_or_si512(lowq, _mm512_slli_epi16(highq, 4));
                // Widened to 16 bits by `unpacklo`/`unpackhi` (bytes 0..8 / 8..16 of each 128-bit lane), which
                // `packs` undoes after the arithmetic: lane L holds tile values 16L..16L + 16, one sub-block of 16
                // (j0, j0 + 1, j0 + 4, j0 + 5 for L = 0..4), so one scale per lane serves both halves.
                let j0 = (8 * t + 2 * sh) as i16;
                let scale = _mm512_permutexvar_epi16(lanes(j0, j0 + 1, j0 + 4, j0 + 5), sc);
                let zero = _mm512_setzero_si512();
                // |sc·(q − 32)| ≤ 128 · 32: exact in 16 bits; its top bits (−32..31) and low 7 bits (0..127)
                // pack to bytes without saturating.
                let prod = |words: __m512i| _mm512_mullo_epi16(_mm512_sub_epi16(words, offset), scale);
                let (p0, p1) = (prod(_mm512_unpacklo_epi8(q, zero)), prod(_mm512_unpackhi_epi8(q, zero)));
                let x = _mm512_packs_epi16(_mm512_srai_epi16(p0, 7), _mm512_srai_epi16(p1, 7));
                let y = _mm512_packs_epi16(_mm512_and_si512(p0, lo7), _mm512_and_si512(p1, lo7));
                _mm512_store_si512(s.x[2 * t + sh].as_mut_ptr().add(m * ROW_BYTES) as *mut _, x);
                _mm512_store_si512(s.y[2 * t + sh].as_mut_ptr().add(m * ROW_BYTES) as *mut _, y);
            }
        }
    }
}

/// [`product`]'s work, for Q4_K (`Q6` false) or Q6_K blocks.
///
/// # Safety
/// AMX-TILE, AMX-INT8 and AVX-512 F/BW/VL/VNNI present and the tile state granted; at most 16 weight rows;
/// `w` holds `wrows.end` rows of `row_bytes` ≥ `acts.nb` blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tiles<const Q6: bool>(
    w: &[u8],
    row_bytes: usize,
    wrows: std::ops::Range<usize>,
    acts: &Acts,
    s: &mut Scratch,
    sums: &mut Vec<[f32; TILE_COLS]>,
    mut put: impl FnMut(usize, usize, f32),
) {
    use std::arch::asm;
    use std::arch::x86_64::*;
    let (nb, mrows) = (acts.nb, wrows.len());
    let bb = if Q6 { Q6K_BYTES } else { Q4K_BYTES };
    let groups = acts.rows.div_ceil(TILE_COLS);
    sums.clear();
    sums.resize(groups * TILE_ROWS, [0.0; TILE_COLS]);
    if mrows < TILE_ROWS {
        // Rows past the matrix's end multiply as zeros (their results are not read).
        for t in 0..CHUNKS {
            s.x[t][mrows * ROW_BYTES..].fill(0);
            s.y[t][mrows * ROW_BYTES..].fill(0);
        }
    }
    let stride = ROW_BYTES;
    // SAFETY: AMX present and granted (the caller's contract); restored below, before returning.
    let saved = unsafe { configure() };
    // Ask for the weights two blocks ahead of use (all of this item's rows), and past this item's last block the
    // next item's first blocks (the pool hands out neighbouring items in order): the tiles take a block of 16 rows
    // at a time, which the CPU's own prefetcher does not follow.
    let ahead = |i: usize| {
        let (rows, at) = if i < nb { (wrows.clone(), i) } else { (wrows.end..wrows.end + TILE_ROWS, i - nb) };
        if at < nb {
            for r in rows {
                super::kernels::prefetch(w, r * row_bytes + at * bb, bb);
            }
        }
    };
    ahead(0);
    ahead(1);
    for i in 0..nb {
        ahead(i + 2);
        for m in 0..mrows {
            // SAFETY: row wrows.start + m < wrows.end holds `nb` blocks (the caller's contract): bytes
            // i·bb..(i+1)·bb of it are in `w`; AVX-512 by the caller.
            unsafe {
                let p = w.as_ptr().add((wrows.start + m) * row_bytes + i * bb);
                if Q6 {
                    pack_q6k(p, s, m)
                } else {
                    pack_q4k(p, s, m)
                }
            }
        }
        for g in 0..groups {
            let gb = g * nb + i;
            let bt = acts.tiles[gb * CHUNKS * (TILE_BYTES / 64)..].as_ptr() as *const u8;
            // SAFETY: tmm0/tmm1 collect X and Y of this block for 16 weight rows × 16 activation rows; each
            // `tileloadd` reads 16 rows of 64 bytes at stride 64 from a 1 KB tile inside `s.x`, `s.y` (4 tiles
            // each) or `acts.tiles` (the 4 tiles of group g, block i); the stores write the 1 KB `cx`, `cy`.
            // Nothing else in this process uses the tile registers. Q4_K's weight bytes are unsigned (`tdpbusd`),
            // Q6_K's signed (`tdpbssd`); the activations are signed either way.
            unsafe {
                macro_rules! block {
                    ($dp:literal) => {
                        asm!(
                            "tilezero tmm0",
                            "tilezero tmm1",
                            "tileloadd tmm2, [{x} + {st}]",
                            "tileloadd tmm3, [{y} + {st}]",
                            "tileloadd tmm4, [{b} + {st}]",
                            concat!($dp, " tmm0, tmm2, tmm4"),
                            concat!($dp, " tmm1, tmm3, tmm4"),
                            "tileloadd tmm5, [{x} + {st} + 1024]",
                            "tileloadd tmm6, [{y} + {st} + 1024]",
                            "tileloadd tmm7, [{b} + {st} + 1024]",
                            concat!($dp, " tmm0, tmm5, tmm7"),
                            concat!($dp, " tmm1, tmm6, tmm7"),
                            "tileloadd tmm2, [{x} + {st} + 2048]",
                            "tileloadd tmm3, [{y} + {st} + 2048]",
                            "tileloadd tmm4, [{b} + {st} + 2048]",
                            concat!($dp, " tmm0, tmm2, tmm4"),
                            concat!($dp, " tmm1, tmm3, tmm4"),
                            "tileloadd tmm5, [{x} + {st} + 3072]",
                            "tileloadd tmm6, [{y} + {st} + 3072]",
                            "tileloadd tmm7, [{b} + {st} + 3072]",
                            concat!($dp, " tmm0, tmm5, tmm7"),
                            concat!($dp, " tmm1, tmm6, tmm7"),
                            "tilestored [{cx} + {st}], tmm0",
                            "tilestored [{cy} + {st}], tmm1",
                            x = in(reg) s.x.as_ptr(),
                            y = in(reg) s.y.as_ptr(),
                            b = in(reg) bt,
                            cx = in(reg) s.cx.as_mut_ptr(),
                            cy = in(reg) s.cy.as_mut_ptr(),
                            st = in(reg) stride,
                            options(nostack, preserves_flags)
                        )
                    };
                }
                if Q6 {
                    block!("tdpbssd");
                } else {
                    block!("tdpbusd");
                }
            }
            // SAFETY: plain loads and stores of 64-byte arrays (unaligned forms) inside `s`, `acts` and `sums`.
            unsafe {
                let d = _mm512_loadu_ps(acts.d[gb].as_ptr());
                let pairs = &acts.pairs[gb * 4..gb * 4 + 4];
                let pr: [__m512i; 4] = std::array::from_fn(|u| _mm512_loadu_si512(pairs[u].as_ptr() as *const _));
                for m in 0..mrows {
                    let cx = _mm512_loadu_si512(s.cx[m].as_ptr() as *const _);
                    let cy = _mm512_loadu_si512(s.cy[m].as_ptr() as *const _);
                    let at = sums[g * TILE_ROWS + m].as_mut_ptr();
                    let t = if Q6 {
                        // I = 128·X + Y: Σ sc·(q − 32)·a, exact.
                        let total = _mm512_add_epi32(_mm512_slli_epi32(cx, 7), cy);
                        _mm512_mul_ps(_mm512_cvtepi32_ps(total), _mm512_set1_ps(s.dw[m]))
                    } else {
                        // I = 8·X + Y: Σ sc·q·a; M = Σ min·bsum.
                        let total = _mm512_add_epi32(_mm512_slli_epi32(cx, 3), cy);
                        let mn = s.mins[m];
                        let mut ms = _mm512_setzero_si512();
                        for u in 0..4 {
                            ms = _mm512_dpwssd_epi32(ms, pr[u], _mm512_set1_epi32(mn[u]));
                        }
                        let t = _mm512_mul_ps(_mm512_cvtepi32_ps(total), _mm512_set1_ps(s.dw[m]));
                        _mm512_fnmadd_ps(_mm512_cvtepi32_ps(ms), _mm512_set1_ps(s.dmin[m]), t)
                    };
                    _mm512_storeu_ps(at, _mm512_fmadd_ps(t, d, _mm512_loadu_ps(at)));
                }
            }
        }
    }
    // SAFETY: `saved` came from `configure` above; our tile registers are not read again.
    unsafe { restore(&saved) };
    for g in 0..groups {
        for m in 0..mrows {
            let cols = TILE_COLS.min(acts.rows - g * TILE_COLS);
            for (col, &v) in sums[g * TILE_ROWS + m].iter().enumerate().take(cols) {
                put(wrows.start + m, g * TILE_COLS + col, v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tiles<const Q6: bool>(
    _: &[u8],
    _: usize,
    _: std::ops::Range<usize>,
    _: &Acts,
    _: &mut Scratch,
    _: &mut Vec<[f32; TILE_COLS]>,
    _: impl FnMut(usize, usize, f32),
) {
    unreachable!("AMX is x86-64 only")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::kernels::tests::quantized_spread;
    use crate::engine::kernels::{arrange, quantize_q8k, rows_lanes_from, Q8KLanes, Via};
    use candle_core::quantized::GgmlDType;

    /// Activation rows of `k` values: smooth ones, one with a few spikes (quants at ±127 beside tiny ones), and
    /// one of zeros (scale 0). (The 16-row kernels' tests use them too.)
    pub(crate) fn rows(k: usize, count: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut s = seed;
        (0..count)
            .map(|r| {
                (0..k)
                    .map(|i| {
                        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let v = (s >> 33) as f32 / (1u64 << 31) as f32 - 0.5;
                        match r % 5 {
                            3 => 0.0,
                            4 if i % 97 == 0 => 40.0 * v.signum(),
                            _ => v * (1.0 + r as f32),
                        }
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn tiles_give_the_bits_of_the_decode_kernels() {
        if !available() {
            // Not a pass: this CPU (or kernel, or VM) has no AMX, so `gemm_many` never calls these kernels here.
            eprintln!("AMX not available on this machine: the tile kernels cannot run (and are never used) here");
            return;
        }
        let k = 1536;
        let nb = k / QK_K;
        for (dtype, kind) in [(GgmlDType::Q4K, Kind::Q4K), (GgmlDType::Q6K, Kind::Q6K)] {
            let row_bytes = nb * kind.block_bytes();
            for spread in [2.0, 50.0] {
                // 19 weight rows: a full item of 16 and a short one of 3.
                let n = 19;
                let (w, _) = quantized_spread(dtype, n, k, 7, spread);
                for count in [1, 8, 16, 17, 33] {
                    let xs = rows(k, count, 11 + count as u64);
                    let act: Vec<Vec<Q8K>> = xs
                        .iter()
                        .map(|x| {
                            let mut a = Vec::new();
                            quantize_q8k(x, &mut a);
                            a
                        })
                        .collect();
                    let lanes: Vec<Vec<Q8KLanes>> = act.iter().map(|a| a.iter().map(arrange).collect()).collect();
                    let refs: Vec<&[Q8K]> = act.iter().map(|a| a.as_slice()).collect();
                    let mut acts = Acts::default();
                    acts.fill(&refs, true, false);
                    let (mut tiles, mut kernels) = (vec![f32::NAN; n * count], vec![f32::NAN; n * count]);
                    for start in (0..n).step_by(TILE_ROWS) {
                        let wrows = start..(start + TILE_ROWS).min(n);
                        product(kind, &w, row_bytes, wrows.clone(), &acts, |r, j, v| tiles[j * n + r] = v);
                        for from in (0..count).step_by(8) {
                            let group: Vec<&[Q8KLanes]> =
                                lanes[from..(from + 8).min(count)].iter().map(|l| l.as_slice()).collect();
                            // The decode kernels in the formulation the tiles reproduce (`COPILOT_AMX=all`).
                            let via = Via { totals: Some(true), ..Via::default() };
                            rows_lanes_from(kind, &w, row_bytes, wrows.clone(), &group, via, |r, j, v| {
                                kernels[(from + j) * n + r] = v
                            });
                        }
                    }
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&tiles), bits(&kernels), "{kind:?}, spread {spread}, {count} activation rows");
                    assert!(tiles.iter().all(|v| v.is_finite()));
                    // Every fifth activation row is zeros; the others give non-zero products.
                    let zero_rows = (count + 1) / 5;
                    assert_eq!(tiles.iter().filter(|v| **v == 0.0).count(), n * zero_rows, "{kind:?}, {count} rows");
                }
            }
        }
    }
}
