//! The frozen base's products in training, on AVX-512 VNNI and AVX2: Q8_0 weights laid out once, at load, the way
//! `vpdpbusd` wants them.
//!
//! Why: a training step multiplies every frozen weight with all of the step's tokens three times (the forward
//! pass, its replay under activation checkpointing, and the gradient's way back through `Wᵀ`), so it is bound by
//! arithmetic. The weights that go through Q8_0 — Q4_0/Q5_0 weights widened exactly ([`super::lora::widened_q8`])
//! and every backward product's transposed copy ([`super::lora::transposed_q8`]) — took candle's Q8_0 path, one
//! 32-value dot product per (row, column, block): two thirds of a step's time on the bench's model
//! (`perf`, Qwen2.5-Coder-0.5B, 2-core AMD EPYC). Here each group of 16 weight rows is stored block by block with
//! one 512-bit lane per row and 4 consecutive values per lane (the values +128, unsigned, as `vpdpbusd` reads its
//! first operand), beside the rows' scales; an activation row's 4 values are broadcast to the 16 lanes, so one
//! instruction makes 64 products, and a block's scales are applied once per 32 values. The layout replaces the
//! Q8_0 copy (576 bytes per 16 × 32 values instead of 544), so memory is about what it was.
//!
//! Activations are rounded to 8 bits per block of 32 exactly as candle's Q8_0 product rounds them (scale
//! `max|x| / 127`, kept in f32 rather than f16 here); the weights' offset of 128 is taken off through each
//! activation block's sum. Results equal [`Q8Tiles::matmul_scalar`]'s (the same integers and the same order of
//! blocks; the vector path fuses each block's multiply and add, so the last bits may differ; a test holds them to
//! it).
//!
//! On CPUs with AVX2 but not AVX-512 VNNI the same tiles go through 256-bit registers, half a tile at a time:
//! flipping a stored byte's top bit gives the signed weight, and `vpmaddubsw(|w|, sign(x, w))` multiplies it with
//! the activation as ggml's AVX2 Q8_0 product does (two products a 16-bit pair, each at most 128 · 127, so the pair
//! never saturates), widened by `vpmaddwd` with ones. The integers are the VNNI path's (its +128 offset and the
//! offset's correction cancel exactly), and each block's scaling is the same instructions on the same numbers, so
//! both paths give the same bits (a test checks it where a CPU has both). Before this, AVX2 machines multiplied
//! these weights with candle's one-dot-product-at-a-time path: 71 % of a training step of the default model on a
//! 2-core AMD EPYC Zen 3 (`perf`, 2026-12-06).

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};

/// Weight rows per tile: the 16 lanes of a 512-bit register.
const TILE_ROWS: usize = 16;
/// Values per Q8_0 block.
const QK: usize = 32;
/// Bytes of one Q8_0 block: an f16 scale and 32 signed bytes.
const Q8_0_BYTES: usize = 2 + QK;
/// Activation rows multiplied with a tile in one go (their sums stay in registers).
const ACT_ROWS: usize = 8;
/// Activation rows per work item: with the tile's blocks hot in cache, enough rows to pay for reading them.
const ITEM_ROWS: usize = 64;

/// One block (32 values) of 16 weight rows: `qs[g]` holds values 4g..4g+4 of each row (row r at bytes 4r..4r+4,
/// stored +128), `d` the rows' scales. Rows past the matrix's end hold byte 0 (−128) with scale 0, so they add
/// nothing, and their lanes are never stored.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Block {
    qs: [[u8; 64]; QK / 4],
    d: [f32; TILE_ROWS],
}

/// One activation block: its 32 values rounded to 8 bits, their scale, and −128 × their sum (what the weights'
/// offset adds to the integer dot product).
#[derive(Clone, Copy)]
#[repr(C)]
struct Act {
    q: [i8; QK],
    d: f32,
    offset: i32,
}

/// AVX2 activation rows multiplied with a tile in one go: their sums stay in registers (4 × 2 halves), and the
/// signed and absolute weights of a half block serve all of them.
const AVX2_ROWS: usize = 4;

/// The instructions a tile product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 F/BW with VNNI: the prompt kernels' own check.
    Vnni,
    /// AVX2 with FMA.
    Avx2,
    /// Neither: [`Q8Tiles::matmul_scalar`].
    Scalar,
}

impl Kernel {
    /// The fastest kernel this CPU runs (detected at run time).
    pub fn best() -> Kernel {
        [Kernel::Vnni, Kernel::Avx2].into_iter().find(|k| k.runs_here()).unwrap_or(Kernel::Scalar)
    }

    /// True when this CPU has the instructions this kernel is compiled for.
    pub fn runs_here(self) -> bool {
        match self {
            Kernel::Vnni => crate::engine::prompt_kernels::available(),
            // The engine's own AVX2 check (AVX2 and FMA, x86-64 only).
            Kernel::Avx2 => crate::engine::kernels::simd_available(),
            Kernel::Scalar => true,
        }
    }
}

/// True when this CPU multiplies the tiles with vector instructions (AVX-512 VNNI or AVX2), so they are worth
/// laying out.
pub fn available() -> bool {
    Kernel::best() != Kernel::Scalar
}

/// A Q8_0 weight (n × k) laid out in tiles of 16 rows: `blocks[t * nb + b]` is block b of tile t.
pub struct Q8Tiles {
    n: usize,
    k: usize,
    blocks: Vec<Block>,
}

/// A raw pointer that the pool's workers write through at disjoint places (see each use).
pub(crate) struct Shared<T>(pub(crate) *mut T);
// SAFETY: every use hands each written element to exactly one work item, reads nothing while the pool runs, and
// the pointee outlives the pool call (it returns only when all workers are done).
unsafe impl<T> Sync for Shared<T> {}

impl Q8Tiles {
    /// `w` (a Q8_0 tensor, n × k) laid out in tiles.
    pub fn from_q8_0(w: &QTensor) -> Result<Q8Tiles> {
        if w.dtype() != GgmlDType::Q8_0 {
            candle_core::bail!("Q8_0 tiles from a {:?} tensor", w.dtype());
        }
        let (n, k) = w.shape().dims2()?;
        if k == 0 || k % QK != 0 {
            candle_core::bail!("a Q8_0 weight {n}×{k} is not whole blocks");
        }
        let raw = w.data()?;
        let nb = k / QK;
        if raw.len() != n * nb * Q8_0_BYTES {
            candle_core::bail!("a Q8_0 weight {n}×{k} of {} bytes", raw.len());
        }
        let empty = Block { qs: [[0; 64]; QK / 4], d: [0.0; TILE_ROWS] };
        let tiles = n.div_ceil(TILE_ROWS);
        let mut blocks = vec![empty; tiles * nb];
        for row in 0..n {
            let (t, r) = (row / TILE_ROWS, row % TILE_ROWS);
            for b in 0..nb {
                let src = &raw[(row * nb + b) * Q8_0_BYTES..(row * nb + b + 1) * Q8_0_BYTES];
                let dst = &mut blocks[t * nb + b];
                dst.d[r] = half::f16::from_le_bytes([src[0], src[1]]).to_f32();
                for (j, &q) in src[2..].iter().enumerate() {
                    dst.qs[j / 4][4 * r + j % 4] = (q as i8 as i32 + 128) as u8;
                }
            }
        }
        Ok(Q8Tiles { n, k, blocks })
    }

    /// `y[r·n + j] = row j of the weight · x[r·k..(r+1)·k]` for every row r of `x` (m × k), with this CPU's best
    /// [`Kernel`].
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) {
        self.matmul_with(Kernel::best(), x, y)
    }

    /// [`Q8Tiles::matmul`] with the given kernel, which must run here (panics otherwise).
    pub fn matmul_with(&self, kernel: Kernel, x: &[f32], y: &mut [f32]) {
        let (n, k, nb) = (self.n, self.k, self.k / QK);
        assert_eq!(x.len() % k, 0, "{} inputs are not rows of {k}", x.len());
        let m = x.len() / k;
        assert_eq!(y.len(), m * n, "outputs for {m} rows of {n}");
        assert!(kernel.runs_here(), "the {kernel:?} kernel does not run on this CPU");
        if kernel == Kernel::Scalar {
            return self.matmul_scalar(x, y);
        }
        let pool = candle_core::utils::barrier_pool();
        let mut acts = vec![Act { q: [0; QK], d: 0.0, offset: 0 }; m * nb];
        let to = Shared(acts.as_mut_ptr());
        let to = &to;
        pool.execute_chunked(m, |rows| {
            for r in rows {
                // SAFETY: row r's nb blocks (inside `acts`, which holds m·nb) belong to this work item alone.
                let out = unsafe { std::slice::from_raw_parts_mut(to.0.add(r * nb), nb) };
                quantize_row(&x[r * k..(r + 1) * k], out);
            }
        });
        let tiles = n.div_ceil(TILE_ROWS);
        let groups = m.div_ceil(ITEM_ROWS);
        let out = Shared(y.as_mut_ptr());
        let (out, acts) = (&out, &acts);
        // Items tile-major: a worker walking a range of them keeps one tile's blocks hot for all its row groups.
        pool.execute_chunked(tiles * groups, |items| {
            for item in items {
                let (t, g) = (item / groups, item % groups);
                let tile = &self.blocks[t * nb..(t + 1) * nb];
                let lanes = (n - t * TILE_ROWS).min(TILE_ROWS);
                let mut r = g * ITEM_ROWS;
                let end = (r + ITEM_ROWS).min(m);
                let most = if kernel == Kernel::Vnni { ACT_ROWS } else { AVX2_ROWS };
                while r < end {
                    let take = match (end - r).min(most) {
                        ACT_ROWS.. => ACT_ROWS,
                        4..=7 => 4,
                        2 | 3 => 2,
                        _ => 1,
                    };
                    let act = |j: usize| &acts[(r + j) * nb..(r + j + 1) * nb];
                    // SAFETY: columns t·16 .. t·16 + lanes of rows r..r + take (inside `y`: r + take ≤ m, and
                    // t·16 + lanes ≤ n) belong to this item alone.
                    let dst = |j: usize| unsafe { out.0.add((r + j) * n + t * TILE_ROWS) };
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the kernel's instructions were detected (`runs_here` above); every `act(j)` holds the
                    // tile's nb blocks and every `dst(j)` has `lanes` writable floats.
                    unsafe {
                        use std::array::from_fn;
                        match (kernel, take) {
                            (Kernel::Vnni, 8) => vnni::rows::<8>(tile, from_fn(act), from_fn(dst), lanes),
                            (Kernel::Vnni, 4) => vnni::rows::<4>(tile, from_fn(act), from_fn(dst), lanes),
                            (Kernel::Vnni, 2) => vnni::rows::<2>(tile, from_fn(act), from_fn(dst), lanes),
                            (Kernel::Vnni, _) => vnni::rows::<1>(tile, from_fn(act), from_fn(dst), lanes),
                            (Kernel::Avx2, 4) => avx2::rows::<4>(tile, from_fn(act), from_fn(dst), lanes),
                            (Kernel::Avx2, 2) => avx2::rows::<2>(tile, from_fn(act), from_fn(dst), lanes),
                            (Kernel::Avx2, _) => avx2::rows::<1>(tile, from_fn(act), from_fn(dst), lanes),
                            (Kernel::Scalar, _) => unreachable!("the scalar kernel returned above"),
                        }
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    unreachable!("the tiles' kernels run on x86-64 only ({}, {:p})", lanes, dst(0));
                    r += take;
                }
            }
        });
    }

    /// [`Q8Tiles::matmul`] one product at a time, from the same 8-bit activations: the reference the vector path
    /// are held to, and the path of CPUs with neither AVX-512 VNNI nor AVX2.
    pub fn matmul_scalar(&self, x: &[f32], y: &mut [f32]) {
        let (n, k, nb) = (self.n, self.k, self.k / QK);
        assert_eq!(x.len() % k, 0, "{} inputs are not rows of {k}", x.len());
        let m = x.len() / k;
        assert_eq!(y.len(), m * n, "outputs for {m} rows of {n}");
        let mut acts = vec![Act { q: [0; QK], d: 0.0, offset: 0 }; nb];
        for r in 0..m {
            quantize_row(&x[r * k..(r + 1) * k], &mut acts);
            for j in 0..n {
                let (t, lane) = (j / TILE_ROWS, j % TILE_ROWS);
                let mut sum = 0f32;
                for (b, a) in acts.iter().enumerate() {
                    let block = &self.blocks[t * nb + b];
                    let mut dot = a.offset;
                    for (v, &q) in a.q.iter().enumerate() {
                        dot += block.qs[v / 4][4 * lane + v % 4] as i32 * q as i32;
                    }
                    sum += dot as f32 * (block.d[lane] * a.d);
                }
                y[r * n + j] = sum;
            }
        }
    }
}

/// One row of activations rounded to 8 bits per block of 32, as candle's Q8_0 rounds them.
fn quantize_row(x: &[f32], out: &mut [Act]) {
    for (a, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in a.q.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        a.d = d;
        a.offset = -128 * sum;
    }
}

impl CustomOp1 for Q8Tiles {
    fn name(&self) -> &'static str {
        "q8-tiles"
    }

    /// `x·Wᵀ` for an f32 `x` (…, k), contiguous: (…, n).
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, shape) = input_rows(storage, layout, self.k, self.n)?;
        let mut y = vec![0f32; x.len() / self.k * self.n];
        self.matmul(x, &mut y);
        Ok((CpuStorage::F32(y), shape))
    }
}

/// The f32 rows of a product's input `x` (…, k), contiguous, and the output's shape (…, n): what a frozen
/// product's `cpu_fwd` checks before it multiplies.
pub(crate) fn input_rows<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    k: usize,
    n: usize,
) -> Result<(&'a [f32], Shape)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("a frozen product multiplies f32 inputs, not {:?}", storage.dtype())
    };
    let Some((from, to)) = layout.contiguous_offsets() else {
        candle_core::bail!("a frozen product needs a contiguous input, not {layout:?}")
    };
    let mut dims = layout.shape().dims().to_vec();
    if dims.pop() != Some(k) {
        candle_core::bail!("an input {:?} does not end in the weight's {k} columns", layout.shape());
    }
    dims.push(n);
    Ok((&data[from..to], Shape::from(dims)))
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Act, Block, QK, TILE_ROWS};
    use std::arch::x86_64::*;

    /// The tile's blocks against R activation rows: `out[j][lane]` = weight row (tile's first + lane) · row j, for
    /// the first `lanes` lanes.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and VNNI; every `acts[j]` has `tile.len()` blocks; every `out[j]` has `lanes` (≤ 16)
    /// writable floats.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) unsafe fn rows<const R: usize>(tile: &[Block], acts: [&[Act]; R], out: [*mut f32; R], lanes: usize) {
        let mut sums = [_mm512_setzero_ps(); R];
        for (b, block) in tile.iter().enumerate() {
            // SAFETY: `Block` is 64-byte aligned and its arrays are whole registers.
            let w: [__m512i; QK / 4] =
                std::array::from_fn(|g| unsafe { _mm512_load_si512(block.qs[g].as_ptr() as *const _) });
            // SAFETY: as above.
            let dw = unsafe { _mm512_load_ps(block.d.as_ptr()) };
            for j in 0..R {
                // SAFETY: b < tile.len() ≤ acts[j].len() (the caller's contract).
                let a = unsafe { acts[j].get_unchecked(b) };
                let mut acc = _mm512_set1_epi32(a.offset);
                for (g, wg) in w.iter().enumerate() {
                    // SAFETY: bytes 4g..4g+4 of the block's 32 values.
                    let four = unsafe { std::ptr::read_unaligned(a.q.as_ptr().add(4 * g) as *const i32) };
                    acc = _mm512_dpbusd_epi32(acc, *wg, _mm512_set1_epi32(four));
                }
                sums[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(dw, _mm512_set1_ps(a.d)), sums[j]);
            }
        }
        let mask: __mmask16 = if lanes >= TILE_ROWS { 0xFFFF } else { (1u16 << lanes) - 1 };
        for j in 0..R {
            // SAFETY: the first `lanes` floats at out[j] are writable (the caller's contract); the mask writes
            // no others.
            unsafe { _mm512_mask_storeu_ps(out[j], mask, sums[j]) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Act, Block, QK, TILE_ROWS};
    use std::arch::x86_64::*;

    /// [`super::vnni::rows`] on AVX2: the tile's blocks against R activation rows, `out[j][lane]` = weight row
    /// (tile's first + lane) · row j, for the first `lanes` lanes; the same integers and the same scaling
    /// instructions, so the same bits.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; every `acts[j]` has `tile.len()` blocks; every `out[j]` has `lanes` (≤ 16)
    /// writable floats.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows<const R: usize>(tile: &[Block], acts: [&[Act]; R], out: [*mut f32; R], lanes: usize) {
        let top = _mm256_set1_epi8(i8::MIN);
        let ones = _mm256_set1_epi16(1);
        let mut sums = [[_mm256_setzero_ps(); 2]; R];
        for (b, block) in tile.iter().enumerate() {
            // SAFETY: b < tile.len() ≤ acts[j].len() (the caller's contract).
            let a: [&Act; R] = std::array::from_fn(|j| unsafe { acts[j].get_unchecked(b) });
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            for g in 0..QK / 4 {
                // Values 4g..4g+4 of each activation row, broadcast to the 8 lanes.
                let x: [__m256i; R] = std::array::from_fn(|j| {
                    // SAFETY: bytes 4g..4g+4 of the block's 32 values.
                    _mm256_set1_epi32(unsafe { std::ptr::read_unaligned(a[j].q.as_ptr().add(4 * g) as *const i32) })
                });
                // Rows 0..8 of the tile in the first half of `qs[g]`, rows 8..16 in the second.
                for (h, half) in block.qs[g].chunks_exact(32).enumerate() {
                    // SAFETY: `Block` is 64-byte aligned, so each 32-byte half of `qs[g]` is aligned.
                    let stored = unsafe { _mm256_load_si256(half.as_ptr() as *const __m256i) };
                    let w = _mm256_xor_si256(stored, top);
                    let w_abs = _mm256_abs_epi8(w);
                    for (acc_j, &x_j) in acc.iter_mut().zip(&x) {
                        let pairs = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(x_j, w));
                        acc_j[h] = _mm256_add_epi32(acc_j[h], _mm256_madd_epi16(pairs, ones));
                    }
                }
            }
            for (h, d_half) in block.d.chunks_exact(8).enumerate() {
                // SAFETY: `d` starts 64-byte aligned, so each half is aligned.
                let dw = unsafe { _mm256_load_ps(d_half.as_ptr()) };
                for ((sum_j, acc_j), a_j) in sums.iter_mut().zip(&acc).zip(&a) {
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(a_j.d));
                    sum_j[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc_j[h]), scale, sum_j[h]);
                }
            }
        }
        for (sum_j, &out_j) in sums.iter().zip(&out) {
            let mut all = [0f32; TILE_ROWS];
            // SAFETY: `all` holds 16 floats.
            unsafe {
                _mm256_storeu_ps(all.as_mut_ptr(), sum_j[0]);
                _mm256_storeu_ps(all.as_mut_ptr().add(8), sum_j[1]);
            }
            // SAFETY: the first `lanes` (≤ 16) floats at out_j are writable (the caller's contract).
            unsafe { std::ptr::copy_nonoverlapping(all.as_ptr(), out_j, lanes) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tune::lora::Rng;
    use candle_core::{Device, Tensor};

    fn values(len: usize, rng: &mut Rng, scale: f32) -> Vec<f32> {
        (0..len).map(|_| (rng.uniform() * 2.0 - 1.0) * scale).collect()
    }

    fn q8(n: usize, k: usize, rng: &mut Rng) -> QTensor {
        let w = Tensor::from_vec(values(n * k, rng, 0.3), (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()
    }

    #[test]
    fn the_layout_keeps_every_value_and_scale() {
        let mut rng = Rng::new(3);
        let w = q8(37, 96, &mut rng);
        let tiles = Q8Tiles::from_q8_0(&w).unwrap();
        let dense = w.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let nb = 96 / QK;
        assert_eq!(tiles.blocks.len(), 3 * nb, "37 rows make 3 tiles");
        for (j, row) in dense.iter().enumerate() {
            for (v, &want) in row.iter().enumerate() {
                let block = &tiles.blocks[(j / 16) * nb + v / QK];
                let q = block.qs[(v % QK) / 4][4 * (j % 16) + v % 4] as i32 - 128;
                assert_eq!(q as f32 * block.d[j % 16], want, "row {j}, value {v}");
            }
        }
        let pad = &tiles.blocks[2 * nb];
        assert!(pad.d[5..].iter().all(|&d| d == 0.0), "rows past the end have no scale");
    }

    #[test]
    fn the_vector_paths_give_the_scalar_products_for_any_shape() {
        // Every kernel this CPU runs (the scalar one always; AVX2 on any x86-64-v3 CPU, VNNI where present).
        let kernels: Vec<Kernel> =
            [Kernel::Vnni, Kernel::Avx2, Kernel::Scalar].into_iter().filter(|k| k.runs_here()).collect();
        let mut rng = Rng::new(7);
        // Rows of 1..=70 activations (every R of both kernels and a partial last item), tiles with 16, 13, 5 and 1
        // rows (13: a partial tile reaching into the second half of AVX2's two registers);
        // weights spanning the whole 8-bit range (each block holds its ±127).
        for (n, k, m) in
            [(16, 32, 1), (37, 96, 70), (129, 64, 9), (1, 32, 3), (48, 4864 / 4, 13), (21, 256, 7), (29, 64, 6)]
        {
            let tiles = Q8Tiles::from_q8_0(&q8(n, k, &mut rng)).unwrap();
            let x = values(m * k, &mut rng, 2.0);
            let mut slow = vec![f32::NAN; m * n];
            tiles.matmul_scalar(&x, &mut slow);
            let mut vector: Option<Vec<f32>> = None;
            for &kernel in &kernels {
                let mut fast = vec![f32::NAN; m * n];
                tiles.matmul_with(kernel, &x, &mut fast);
                for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{kernel:?} {n}×{k}, {m} rows, at {i}: {a} vs {b}"
                    );
                }
                if kernel == Kernel::Scalar {
                    continue;
                }
                // The vector kernels compute the same integers and scale them with the same instructions.
                match &vector {
                    Some(first) => assert!(
                        first.iter().zip(&fast).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{kernel:?} differs from the other vector kernel's bits ({n}×{k}, {m} rows)"
                    ),
                    None => vector = Some(fast),
                }
            }
        }
        if !Kernel::Vnni.runs_here() {
            eprintln!("no AVX-512 VNNI on this CPU: the VNNI and AVX2 kernels' bits are compared on CPUs with both");
        }
    }

    #[test]
    fn extreme_weights_and_activations_do_not_saturate() {
        // Every weight ±127 (or the padding's −128 with scale 0) against activations of ±127: the largest 16-bit
        // pair AVX2's `vpmaddubsw` forms. The products must be the exact integers, scaled.
        let k = 64;
        for (n, sign) in [(16, 1.0f32), (19, -1.0)] {
            let w: Vec<f32> = (0..n * k).map(|i| if i % 3 == 0 { -sign } else { sign }).collect();
            let w = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), GgmlDType::Q8_0).unwrap();
            let tiles = Q8Tiles::from_q8_0(&w).unwrap();
            let x: Vec<f32> = (0..5 * k).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 } * sign).collect();
            let mut slow = vec![f32::NAN; 5 * n];
            tiles.matmul_scalar(&x, &mut slow);
            for kernel in [Kernel::Vnni, Kernel::Avx2].into_iter().filter(|k| k.runs_here()) {
                let mut fast = vec![f32::NAN; 5 * n];
                tiles.matmul_with(kernel, &x, &mut fast);
                for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{kernel:?}, n {n}, at {i}: {a} vs {b}");
                }
            }
            // What the integers are: row j · activation row r over k values of ±1 (scales 1/127 · 1/127 · 127²).
            let dense = w.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
            for r in 0..5 {
                for j in 0..n {
                    let want: f32 = (0..k).map(|v| dense[j][v] * x[r * k + v]).sum();
                    assert!((slow[r * n + j] - want).abs() < 1e-3, "row {j}, activations {r}");
                }
            }
        }
    }

    #[test]
    fn products_are_the_dequantized_products_to_8_bit_rounding() {
        let mut rng = Rng::new(11);
        let (n, k, m) = (40, 128, 6);
        let w = q8(n, k, &mut rng);
        let tiles = Q8Tiles::from_q8_0(&w).unwrap();
        let x = Tensor::from_vec(values(m * k, &mut rng, 1.0), (2, m / 2, k), &Device::Cpu).unwrap();
        let got = x.apply_op1_no_bwd(&tiles).unwrap();
        assert_eq!(got.dims(), &[2, m / 2, n]);
        let want = x.broadcast_matmul(&w.dequantize(&Device::Cpu).unwrap().t().unwrap()).unwrap();
        let err = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 0.02 * scale, "largest error {err} against products up to {scale}");
        assert!(err > 0.0, "the activations are rounded, so some product differs");
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mut rng = Rng::new(5);
        let w = Tensor::from_vec(values(32 * 256, &mut rng, 1.0), (32, 256), &Device::Cpu).unwrap();
        let q4k = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        assert!(Q8Tiles::from_q8_0(&q4k).is_err(), "only Q8_0 is laid out");
        let tiles = Q8Tiles::from_q8_0(&QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap();
        let wrong = Tensor::zeros((3, 128), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(wrong.apply_op1_no_bwd(&tiles).is_err(), "128 columns against a 256-column weight");
        let strided = Tensor::zeros((256, 3), candle_core::DType::F32, &Device::Cpu).unwrap().t().unwrap();
        assert!(strided.apply_op1_no_bwd(&tiles).is_err(), "a transposed view is not contiguous");
    }
}
