//! Products with Q4_1 weights (the CI's tiny model; GGML's 32-value blocks of a scale, a minimum and 4-bit
//! quants) that equal candle's own to the bit, several times faster: candle computes them one block at a time
//! for each (input row, weight row) pair; here each input row is quantized to Q8_1 once by candle (what its own
//! product does per row) and [`fastmath::q4_1::q4_1_gemm`] takes up to eight input rows per pass over a weight
//! row, over the pool's threads. Used by the engine's layers ([`crate::engine::model`]) and the trainer's frozen
//! products ([`crate::tune::lora::Product`]).

use crate::engine::fastmath::{self, q4_1};
use crate::engine::kernels::Outs;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};

/// Weight rows per work item.
const ROWS: usize = 64;

/// True when a weight of this format and input width goes through [`products`].
pub fn covers(dtype: GgmlDType, k: usize) -> bool {
    dtype == GgmlDType::Q4_1 && k.is_multiple_of(q4_1::QK)
}

/// `ys[i][r * n_i .. (r + 1) * n_i] = W_i · xs[r]` for Q4_1 matrices `mats[i] = (GGUF blocks of W_i, n_i)`, each
/// `n_i × k`: the same `f32`s as candle's quantized matmul, for any number of rows.
pub fn products(mats: &[(&[u8], usize)], k: usize, xs: &[&[f32]], ys: &mut [&mut [f32]]) -> Result<()> {
    if !k.is_multiple_of(q4_1::QK) {
        candle_core::bail!("a Q4_1 product needs whole blocks of {} per row, not {k} values", q4_1::QK);
    }
    let blocks = k / q4_1::QK;
    for (i, (w, n)) in mats.iter().enumerate() {
        if w.len() != n * blocks * q4_1::Q4_1_BLOCK {
            candle_core::bail!("Q4_1 weights of {} bytes for {n}×{k}", w.len());
        }
        if ys[i].len() != n * xs.len() {
            candle_core::bail!("room for {} values, not {n} × {} rows", ys[i].len(), xs.len());
        }
    }
    if let Some(x) = xs.iter().find(|x| x.len() != k) {
        candle_core::bail!("an input row of {} values for weights {k} wide", x.len());
    }
    let acts = xs
        .iter()
        .map(|x| {
            Ok(QTensor::quantize(&Tensor::from_slice(x, (1, k), &Device::Cpu)?, GgmlDType::Q8_1)?.data()?.into_owned())
        })
        .collect::<Result<Vec<Vec<u8>>>>()?;
    let acts: Vec<&[u8]> = acts.iter().map(|a| a.as_slice()).collect();
    let items: Vec<(usize, usize)> =
        mats.iter().enumerate().flat_map(|(i, (_, n))| (0..*n).step_by(ROWS).map(move |r| (i, r))).collect();
    let outs = Outs(ys.iter_mut().map(|y| y.as_mut_ptr()).collect());
    let (outs, items, acts) = (&outs, &items, &acts);
    candle_core::utils::barrier_pool().execute_chunked(items.len(), |range| {
        for &(i, start) in &items[range] {
            let (w, n) = mats[i];
            let end = (start + ROWS).min(n);
            let w = &w[start * blocks * q4_1::Q4_1_BLOCK..end * blocks * q4_1::Q4_1_BLOCK];
            let mut rows: Vec<&mut [f32]> = (0..acts.len())
                // SAFETY: j * n + end <= xs.len() * n = ys[i].len() (checked above); weight rows start..end of
                // matrix i (for every input row) belong to this work item alone, and `ys` outlives the pool call
                // (`Outs`).
                .map(|j| unsafe { std::slice::from_raw_parts_mut(outs.0[i].add(j * n + start), end - start) })
                .collect();
            fastmath::q4_1::q4_1_gemm(w, blocks, end - start, acts, &mut rows);
        }
    });
    Ok(())
}
