//! A model's weights as read from its GGUF file, and the quantized linear layer and embedding table built on them.

use crate::engine::kernels;
use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};
use std::io::{Read, Seek};
use std::sync::Arc;

use super::Config;

/// The seven projections of a layer, with their names in GGUF files and in Transformers/PEFT (`target_modules`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];

    /// PEFT / Transformers module name (`q_proj`, …).
    pub fn peft_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// GGUF tensor stem (`attn_q`, …).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Target::Q => "attn_q",
            Target::K => "attn_k",
            Target::V => "attn_v",
            Target::O => "attn_output",
            Target::Gate => "ffn_gate",
            Target::Up => "ffn_up",
            Target::Down => "ffn_down",
        }
    }

    pub(crate) fn parent(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            Target::Gate | Target::Up | Target::Down => "mlp",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.peft_name() == name || t.gguf_name() == name)
    }

    /// PEFT's key prefix for this target in layer `layer`.
    pub fn peft_key(self, layer: usize) -> String {
        format!("base_model.model.model.layers.{layer}.{}.{}", self.parent(), self.peft_name())
    }
}

/// A quantized linear layer (`y = x · Wᵀ`). Rows of activations go through our own kernels
/// ([`crate::engine::kernels`]) when the weights are a format they cover — one row (decoding) and, unless the
/// model was told otherwise ([`super::Transformer::set_own_prefill`]), several (a prompt); other formats go through
/// candle's quantized matmul. Our kernels read the weights' GGUF blocks in place, so no second copy of them exists.
pub(super) struct Linear {
    pub(super) mm: QMatMul,
    pub(super) n: usize,
    pub(super) k: usize,
}

impl Linear {
    pub(super) fn new(qt: Arc<QTensor>) -> Result<Linear> {
        let (n, k) = qt.shape().dims2()?;
        Ok(Linear { mm: QMatMul::from_arc(qt)?, n, k })
    }

    /// The quantized weights and their format, when our decode kernels cover them.
    fn raw(&self) -> Option<(&QTensor, kernels::Kind)> {
        match &self.mm {
            QMatMul::QTensor(qt) if self.k.is_multiple_of(kernels::QK_K) => {
                kernels::Kind::from_ggml(qt.dtype()).map(|kind| (qt.as_ref(), kind))
            }
            _ => None,
        }
    }

    /// The weights, when they are Q4_1 with whole blocks per row: [`crate::engine::q4_1`] computes candle's bits.
    fn q4_1(&self) -> Option<&QTensor> {
        match &self.mm {
            QMatMul::QTensor(qt) if crate::engine::q4_1::covers(qt.dtype(), self.k) => Some(qt),
            _ => None,
        }
    }

    pub(super) fn forward(&self, x: &Tensor, own_kernels: bool) -> Result<Tensor> {
        Ok(Linear::forward_many(&[self], x, own_kernels)?.remove(0))
    }

    /// The products of several layers that read the same input (q/k/v; gate/up), for every row of `x` (its last
    /// dimension is the layers' input width). With `own_kernels`, on the CPU, for formats our kernels cover, all
    /// rows of all layers are one pass over the weights ([`Linear::matmul_rows`]); otherwise each layer goes
    /// through candle's quantized matmul (which keeps a tiled copy of a weight once several rows have used it).
    pub(super) fn forward_many(layers: &[&Linear], x: &Tensor, own_kernels: bool) -> Result<Vec<Tensor>> {
        let k = layers[0].k;
        let ours = Linear::kernels_cover(layers) || Linear::q4_1_covers(layers);
        if !(own_kernels && x.device().is_cpu() && x.dims().last() == Some(&k) && ours) {
            return layers.iter().map(|l| l.mm.forward(x)).collect();
        }
        let xs = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let rows: Vec<&[f32]> = xs.chunks_exact(k).collect();
        let ys = Linear::products(layers, &rows, kernels::Pass::Prompt)?;
        layers
            .iter()
            .zip(ys)
            .map(|(l, y)| {
                let mut shape = x.dims().to_vec();
                if let Some(last) = shape.last_mut() {
                    *last = l.n;
                }
                Tensor::from_vec(y, shape, x.device())
            })
            .collect()
    }

    /// True when our kernels can multiply every one of `layers` (formats they cover, same input width).
    pub(super) fn kernels_cover(layers: &[&Linear]) -> bool {
        layers.iter().all(|l| l.raw().is_some() && l.k == layers[0].k)
    }

    /// True when every one of `layers` is Q4_1 with the same input width ([`Linear::q4_1_products`]).
    pub(super) fn q4_1_covers(layers: &[&Linear]) -> bool {
        layers.iter().all(|l| l.q4_1().is_some() && l.k == layers[0].k)
    }

    /// [`Linear::products`] for Q4_1 layers ([`crate::engine::q4_1::products`]: candle's bits).
    fn q4_1_products(layers: &[&Linear], xs: &[&[f32]]) -> Result<Vec<Vec<f32>>> {
        let data = layers.iter().filter_map(|l| l.q4_1()).map(|qt| qt.data()).collect::<Result<Vec<_>>>()?;
        let mats: Vec<(&[u8], usize)> = data.iter().zip(layers).map(|(w, l)| (w.as_ref(), l.n)).collect();
        let mut ys: Vec<Vec<f32>> = layers.iter().map(|l| vec![0f32; l.n * xs.len()]).collect();
        let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
        crate::engine::q4_1::products(&mats, layers[0].k, xs, &mut outs)?;
        Ok(ys)
    }

    /// `ys[i][r * n_i .. (r + 1) * n_i] = layers[i] · xs[r]` for rows on the CPU: our kernels in one pass over
    /// the weights for all rows when they cover every layer ([`kernels::gemm_many`]; Q4_1 layers
    /// [`Linear::q4_1_products`]), else candle's matmul one row at a time — either way each row gets exactly the
    /// products it would get alone, so batching rows never changes a result.
    pub(super) fn matmul_rows(layers: &[&Linear], xs: &[&[f32]]) -> Result<Vec<Vec<f32>>> {
        Linear::products(layers, xs, kernels::Pass::Step)
    }

    /// [`Linear::matmul_rows`] for a decoding step (`Pass::Step`: bit-identical per row however many share it) or
    /// a prompt (`Pass::Prompt`: [`crate::engine::prompt_kernels`] where the CPU has them; equal up to float
    /// summation order).
    fn products(layers: &[&Linear], xs: &[&[f32]], pass: kernels::Pass) -> Result<Vec<Vec<f32>>> {
        let k = layers[0].k;
        if Linear::q4_1_covers(layers) {
            return Linear::q4_1_products(layers, xs);
        }
        if !Linear::kernels_cover(layers) {
            let mut ys: Vec<Vec<f32>> = layers.iter().map(|l| Vec::with_capacity(l.n * xs.len())).collect();
            for x in xs {
                let x = Tensor::from_slice(x, (1, x.len()), &Device::Cpu)?;
                for (l, y) in layers.iter().zip(ys.iter_mut()) {
                    y.extend(l.mm.forward(&x)?.flatten_all()?.to_vec1::<f32>()?);
                }
            }
            return Ok(ys);
        }
        let raw: Vec<_> = layers.iter().filter_map(|l| l.raw()).collect();
        let data = raw.iter().map(|(qt, _)| qt.data()).collect::<Result<Vec<_>>>()?;
        let mats: Vec<kernels::Matrix> = layers
            .iter()
            .zip(&raw)
            .zip(&data)
            .map(|((l, (_, kind)), w)| kernels::Matrix { kind: *kind, w, n: l.n })
            .collect();
        let mut ys: Vec<Vec<f32>> = layers.iter().map(|l| vec![0f32; l.n * xs.len()]).collect();
        let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
        match pass {
            kernels::Pass::Step => kernels::gemm_many(&mats, k, xs, &mut outs),
            kernels::Pass::Prompt => crate::engine::prompt_kernels::gemm_prompt(&mats, k, xs, &mut outs),
        }
        Ok(ys)
    }
}

/// The token embedding table. Kept in its quantized form where our kernels can dequantize single rows (the table
/// is shared with the output projection when the model ties them, so it costs no memory of its own); other
/// formats are dequantized to f32 once at load.
pub(crate) enum Embedding {
    Rows { qt: Arc<QTensor>, kind: kernels::Kind, dim: usize },
    Dense(Tensor),
}

impl Embedding {
    pub(crate) fn new(qt: Arc<QTensor>, device: &Device) -> Result<Embedding> {
        let (_, dim) = qt.shape().dims2()?;
        match kernels::Kind::from_ggml(qt.dtype()) {
            Some(kind) if dim.is_multiple_of(kernels::QK_K) && device.is_cpu() => Ok(Embedding::Rows { qt, kind, dim }),
            _ => Ok(Embedding::Dense(qt.dequantize(device)?)),
        }
    }

    /// Rows of `tokens`, shape `(1, t, dim)`.
    pub(crate) fn lookup(&self, tokens: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Embedding::Dense(table) => table.index_select(&Tensor::new(tokens, device)?, 0)?.unsqueeze(0),
            Embedding::Rows { qt, kind, dim } => {
                let data = qt.data()?;
                let rows = qt.shape().dims2()?.0;
                let row_bytes = dim / kernels::QK_K * kind.block_bytes();
                let mut out = vec![0f32; tokens.len() * dim];
                for (&tok, y) in tokens.iter().zip(out.chunks_exact_mut(*dim)) {
                    let r = tok as usize;
                    if r >= rows {
                        candle_core::bail!("token id {tok} is outside the vocabulary of {rows}");
                    }
                    kernels::dequantize_row(*kind, &data[r * row_bytes..(r + 1) * row_bytes], y);
                }
                Tensor::from_vec(out, (1, tokens.len(), *dim), device)
            }
        }
    }
}

/// One layer's tensors as every loader of a GGUF model reads them: norms and optional q/k/v biases dequantized,
/// the seven projection weights as stored, in [`Target::ALL`] order (q, k, v, o, gate, up, down).
pub(crate) struct LayerWeights {
    pub attn_norm: Tensor,
    pub ffn_norm: Tensor,
    pub bq: Option<Tensor>,
    pub bk: Option<Tensor>,
    pub bv: Option<Tensor>,
    pub proj: [Arc<QTensor>; 7],
}

/// A model's tensors as read from its GGUF: the embedding table, the final norm, the vocabulary projection (the
/// embedding table itself when the model ties them: one copy) and the layers. The inference pass
/// ([`Transformer::from_gguf`]) and the training pass (`crate::tune::finetune`) both start from this.
pub(crate) struct Weights {
    pub token_embd: Arc<QTensor>,
    pub norm: Tensor,
    pub output: Arc<QTensor>,
    pub layers: Vec<LayerWeights>,
}

impl Weights {
    pub(crate) fn read<R: Read + Seek>(
        cfg: &Config,
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Weights> {
        let mut get = |name: &str| ct.tensor(reader, name, device);
        let token_embd = Arc::new(get("token_embd.weight")?);
        let norm = get("output_norm.weight")?.dequantize(device)?;
        let output = match ct.tensor_infos.contains_key("output.weight") {
            true => Arc::new(get("output.weight")?),
            // Tied embeddings (SmolLM2, Qwen2.5 0.5B/1.5B): the output projection is the embedding table, read once.
            false => token_embd.clone(),
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("blk.{i}");
            let mut bias = |n: &str| -> Result<Option<Tensor>> {
                let name = format!("{p}.{n}.bias");
                match ct.tensor_infos.contains_key(&name) {
                    true => Ok(Some(get(&name)?.dequantize(device)?)),
                    false => Ok(None),
                }
            };
            let (bq, bk, bv) = (bias("attn_q")?, bias("attn_k")?, bias("attn_v")?);
            let mut proj = Vec::with_capacity(7);
            for t in Target::ALL {
                proj.push(Arc::new(get(&format!("{p}.{}.weight", t.gguf_name()))?));
            }
            let proj: [Arc<QTensor>; 7] =
                proj.try_into().map_err(|_| candle_core::Error::Msg("seven projections".into()))?;
            let attn_norm = get(&format!("{p}.attn_norm.weight"))?.dequantize(device)?;
            let ffn_norm = get(&format!("{p}.ffn_norm.weight"))?.dequantize(device)?;
            layers.push(LayerWeights { attn_norm, ffn_norm, bq, bk, bv, proj });
        }
        Ok(Weights { token_embd, norm, output, layers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    /// A Q4_1 layer of `n` rows × `k` from deterministic values of either sign.
    fn q4_1_layer(n: usize, k: usize, seed: u32) -> Linear {
        let w: Vec<f32> =
            (0..n * k).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect();
        let t = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        Linear::new(Arc::new(QTensor::quantize(&t, GgmlDType::Q4_1).unwrap())).unwrap()
    }

    /// Q4_1 products through `fastmath::q4_1` are candle's own values to the bit — in a decoding step (any number of
    /// rows, layers sharing the input) and in a prompt — so a Q4_1 model answers exactly as before.
    #[test]
    fn q4_1_products_are_candles_bits() {
        // 4 blocks a row (candle's debug build asserts an even number). 70 and 130 rows: work items of 64 rows
        // with a remainder; 3 rows: fewer than one item.
        let k = 128;
        let layers = [q4_1_layer(70, k, 1), q4_1_layer(130, k, 2), q4_1_layer(3, k, 3)];
        let refs: Vec<&Linear> = layers.iter().collect();
        assert!(Linear::q4_1_covers(&refs) && !Linear::kernels_cover(&refs));
        let xs: Vec<Vec<f32>> =
            (0..5).map(|r| (0..k).map(|i| ((i * 7 + r * 13) % 31) as f32 * 0.37 - 5.0 + r as f32).collect()).collect();
        let rows: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let ys = Linear::matmul_rows(&refs, &rows).unwrap();
        for (l, y) in layers.iter().zip(&ys) {
            for (r, x) in rows.iter().enumerate() {
                let want = l.mm.forward(&Tensor::from_slice(x, (1, k), &Device::Cpu).unwrap()).unwrap();
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = &y[r * l.n..(r + 1) * l.n];
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(got), bits(&want), "layer of {} rows, input row {r}", l.n);
            }
        }
        // A prompt: several rows at once, ours against candle's own multi-row product.
        let x = Tensor::from_vec(xs.concat(), (1, 5, k), &Device::Cpu).unwrap();
        let ours = Linear::forward_many(&refs, &x, true).unwrap();
        let theirs = Linear::forward_many(&refs, &x, false).unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(a.dims(), b.dims());
            let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
        }
        // Not a whole block per row: candle's path, as before.
        let odd =
            Linear { mm: QMatMul::Tensor(Tensor::zeros((2, 20), DType::F32, &Device::Cpu).unwrap()), n: 2, k: 20 };
        assert!(!Linear::q4_1_covers(&[&odd]));
    }
}
