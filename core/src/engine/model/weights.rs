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
/// candle's quantized matmul. Our kernels read the weights' GGUF blocks in place, so no second copy of them exists;
/// where [`crate::engine::rows16::enabled`] (AVX-512 VNNI with AMX, by default), Q4_K and Q6_K weights are moved
/// at load into the 16-row layout of [`crate::engine::rows16`] (the same bytes; [`Store::Rows16`]).
pub(super) struct Linear {
    pub(super) mm: Store,
    pub(super) n: usize,
    pub(super) k: usize,
    /// A low-rank adapter computed beside the quantized weights (a tuned model's file carries it: [`LowRank`]).
    pub(super) lora: Option<LowRank>,
}

/// Where a layer's weights are kept.
pub(super) enum Store {
    /// As the GGUF has them, in candle's quantized tensor (our kernels read its blocks in place).
    Candle(QMatMul),
    /// Q4_K or Q6_K weights in the 16-row layout ([`crate::engine::rows16`]): the tensor's bytes moved at load, the
    /// tensor dropped. candle's matmul reads only GGUF's layout, so where it is asked for (our kernels turned off
    /// for a comparison: [`super::Transformer::set_own_kernels`], `set_own_prefill`) a copy in that layout is made
    /// the first time and kept — twice the layer's memory, in those comparisons only.
    Rows16 { kind: kernels::Kind, w: Vec<u8>, n: usize, k: usize, candle: std::sync::OnceLock<QMatMul> },
}

/// A LoRA adapter applied at run time: `y = W·x + scale·B·(A·x)`, A r × k and B n × r in f32, exactly as trained.
/// A GGUF carries one beside a weight as `<weight>.lora_a` / `.lora_b` (`copilot-trainer export --beside`).
///
/// The alternative, folding `W + scale·B·A` into W's own 4-bit format (`export`'s default, a plain GGUF), keeps
/// little of a small change: measured on the shipped adapter (rank 16) and the default model's Q4_K weights, the
/// re-quantization error is 5.9× the adapter's whole change (squared norms) and 24 % of the change survives
/// (reports/merge_error.md). Kept beside W, the adapter costs r·(k + n) multiply-adds a row — 1.2 % of the default
/// model's — and 37 MB of file (f16).
pub(crate) struct LowRank {
    pub(crate) a: Vec<f32>,
    pub(crate) b: Vec<f32>,
    pub(crate) r: usize,
    pub(crate) scale: f32,
}

/// Output rows of B per work item of [`LowRank::add_rows`].
const LORA_ROWS: usize = 256;

impl LowRank {
    /// `ys[i][row] += scale·B_i·(A_i·xs[row])` for every layer i of `layers` that has an adapter and every row,
    /// over the pool's threads in two hand-outs (all the `A·x`, then all the `B·t`). Each value is one
    /// [`fastmath::dot`](crate::engine::fastmath::dot) in a fixed order, so a row's result does not depend on the
    /// other rows or the threads (a decoding step's rows must each get what they would get alone).
    fn add_rows(layers: &[&Linear], xs: &[&[f32]], ys: &mut [Vec<f32>]) {
        use crate::engine::fastmath::dot;
        use crate::engine::kernels::Outs;
        let rows = xs.len();
        let adapted: Vec<(usize, &LowRank)> =
            layers.iter().enumerate().filter_map(|(i, l)| l.lora.as_ref().map(|lr| (i, lr))).collect();
        if adapted.is_empty() || rows == 0 {
            return;
        }
        // t[a][row * r + j] = scale · A_j · x_row for the a-th adapted layer.
        let mut t: Vec<Vec<f32>> = adapted.iter().map(|(_, lr)| vec![0f32; rows * lr.r]).collect();
        let firsts: Vec<(usize, usize)> =
            adapted.iter().enumerate().flat_map(|(a, (_, lr))| (0..lr.r).map(move |j| (a, j))).collect();
        let touts = Outs(t.iter_mut().map(|v| v.as_mut_ptr()).collect());
        let (touts, firsts_ref, adapted_ref) = (&touts, &firsts, &adapted);
        candle_core::utils::barrier_pool().execute_chunked(firsts.len(), |range| {
            for &(a, j) in &firsts_ref[range] {
                let (i, lr) = adapted_ref[a];
                let k = layers[i].k;
                let aj = &lr.a[j * k..(j + 1) * k];
                for (row, x) in xs.iter().enumerate() {
                    // SAFETY: row * r + j < rows * r = t[a].len(); the pair (a, j) belongs to this item alone, and
                    // `t` outlives the pool call.
                    unsafe { *touts.0[a].add(row * lr.r + j) = dot(aj, x) * lr.scale };
                }
            }
        });
        let seconds: Vec<(usize, usize)> = adapted
            .iter()
            .enumerate()
            .flat_map(|(a, (i, _))| (0..layers[*i].n).step_by(LORA_ROWS).map(move |start| (a, start)))
            .collect();
        let youts = Outs(adapted.iter().map(|(i, _)| ys[*i].as_mut_ptr()).collect());
        let (youts, seconds_ref, t) = (&youts, &seconds, &t);
        candle_core::utils::barrier_pool().execute_chunked(seconds.len(), |range| {
            for &(a, start) in &seconds_ref[range] {
                let (i, lr) = adapted_ref[a];
                let n = layers[i].n;
                let end = (start + LORA_ROWS).min(n);
                for row in 0..rows {
                    let tr = &t[a][row * lr.r..(row + 1) * lr.r];
                    for o in start..end {
                        // SAFETY: row * n + o < rows * n = ys[i].len(); outputs start..end of layer i belong to this
                        // item alone, and `ys` outlives the pool call.
                        unsafe { *youts.0[a].add(row * n + o) += dot(&lr.b[o * lr.r..(o + 1) * lr.r], tr) };
                    }
                }
            }
        });
    }

    /// `scale·(x·Aᵀ)·Bᵀ` for a tensor of rows (last dimension k) by candle's matmul: a prompt's many rows in two
    /// thin products (equal to [`LowRank::add_rows`] up to float summation order).
    fn delta(&self, x: &Tensor, k: usize, n: usize) -> Result<Tensor> {
        let a = Tensor::from_slice(&self.a, (self.r, k), x.device())?;
        let b = Tensor::from_slice(&self.b, (n, self.r), x.device())?;
        let low = (x.to_dtype(DType::F32)?.broadcast_matmul(&a.t()?)? * self.scale as f64)?;
        low.broadcast_matmul(&b.t()?)?.to_dtype(x.dtype())
    }
}

impl Linear {
    pub(super) fn new(qt: Arc<QTensor>, lora: Option<LowRank>) -> Result<Linear> {
        let (n, k) = qt.shape().dims2()?;
        if let Some(l) = &lora {
            if l.r == 0 || l.a.len() != l.r * k || l.b.len() != n * l.r {
                candle_core::bail!(
                    "a rank-{} adapter of {} + {} values does not fit a {n}×{k} weight",
                    l.r,
                    l.a.len(),
                    l.b.len()
                );
            }
        }
        let sixteen = kernels::Kind::from_ggml(qt.dtype()).and_then(crate::engine::rows16::layout_of);
        let own = sixteen.is_some()
            && qt.device().is_cpu()
            && n.is_multiple_of(crate::engine::rows16::ROWS)
            && k.is_multiple_of(kernels::QK_K)
            && Arc::strong_count(&qt) == 1
            && crate::engine::rows16::enabled();
        if let (true, Some(kind)) = (own, sixteen) {
            let gguf = crate::engine::rows16::gguf_of(kind);
            let w = crate::engine::rows16::interleave(gguf, &qt.data()?, n, k / kernels::QK_K);
            drop(qt);
            let candle = std::sync::OnceLock::new();
            return Ok(Linear { mm: Store::Rows16 { kind, w, n, k, candle }, n, k, lora });
        }
        Ok(Linear { mm: Store::Candle(QMatMul::from_arc(qt)?), n, k, lora })
    }

    /// candle's matmul over these weights (for a layer in the 16-row layout, over a copy in GGUF's, made once).
    pub(super) fn candle(&self) -> Result<&QMatMul> {
        match &self.mm {
            Store::Candle(mm) => Ok(mm),
            Store::Rows16 { kind, w, n, k, candle } => {
                if let Some(mm) = candle.get() {
                    return Ok(mm);
                }
                let gguf = crate::engine::rows16::deinterleave(*kind, w, *n, k / kernels::QK_K);
                let dtype = match crate::engine::rows16::gguf_of(*kind) {
                    kernels::Kind::Q4K => candle_core::quantized::GgmlDType::Q4K,
                    _ => candle_core::quantized::GgmlDType::Q6K,
                };
                let qt =
                    candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, &gguf, vec![*n, *k], &Device::Cpu)?;
                let mm = QMatMul::from_arc(Arc::new(qt))?;
                Ok(candle.get_or_init(|| mm))
            }
        }
    }

    /// candle's product for a tensor of rows, with the adapter's change added.
    fn candle_forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.candle()?.forward(x)?;
        match &self.lora {
            Some(l) => y + l.delta(x, self.k, self.n)?,
            None => Ok(y),
        }
    }

    /// The weights' format, when our decode kernels cover them.
    fn raw(&self) -> Option<kernels::Kind> {
        match &self.mm {
            Store::Candle(QMatMul::QTensor(qt)) if self.k.is_multiple_of(kernels::QK_K) => {
                kernels::Kind::from_ggml(qt.dtype())
            }
            Store::Rows16 { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// The weights' bytes, as our kernels read them (for a format [`Linear::raw`] names).
    fn bytes(&self) -> Result<std::borrow::Cow<'_, [u8]>> {
        match &self.mm {
            Store::Candle(QMatMul::QTensor(qt)) => qt.data(),
            Store::Rows16 { w, .. } => Ok(std::borrow::Cow::Borrowed(w)),
            Store::Candle(_) => candle_core::bail!("weights that are not quantized have no blocks"),
        }
    }

    /// The weights, when they are Q4_1 with whole blocks per row: [`crate::engine::q4_1`] computes candle's bits.
    fn q4_1(&self) -> Option<&QTensor> {
        match &self.mm {
            Store::Candle(QMatMul::QTensor(qt)) if crate::engine::q4_1::covers(qt.dtype(), self.k) => Some(qt),
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
            return layers.iter().map(|l| l.candle_forward(x)).collect();
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
    /// summation order). Adapters ([`LowRank`]) are added after the weights' products: row by row in a step, by
    /// candle's matmul in a prompt.
    fn products(layers: &[&Linear], xs: &[&[f32]], pass: kernels::Pass) -> Result<Vec<Vec<f32>>> {
        let mut ys = Linear::weight_products(layers, xs, pass)?;
        match pass {
            kernels::Pass::Step => LowRank::add_rows(layers, xs, &mut ys),
            kernels::Pass::Prompt if layers.iter().any(|l| l.lora.is_some()) => {
                // The layers share their input (q/k/v; gate/up): one tensor of it for all.
                let x = Tensor::from_vec(xs.concat(), (xs.len(), layers[0].k), &Device::Cpu)?;
                for (l, y) in layers.iter().zip(ys.iter_mut()) {
                    let Some(lora) = &l.lora else { continue };
                    let d = lora.delta(&x, l.k, l.n)?.flatten_all()?.to_vec1::<f32>()?;
                    y.iter_mut().zip(d).for_each(|(y, d)| *y += d);
                }
            }
            kernels::Pass::Prompt => {}
        }
        Ok(ys)
    }

    /// [`Linear::products`] without the adapters.
    fn weight_products(layers: &[&Linear], xs: &[&[f32]], pass: kernels::Pass) -> Result<Vec<Vec<f32>>> {
        let k = layers[0].k;
        if Linear::q4_1_covers(layers) {
            return Linear::q4_1_products(layers, xs);
        }
        if !Linear::kernels_cover(layers) {
            let mut ys: Vec<Vec<f32>> = layers.iter().map(|l| Vec::with_capacity(l.n * xs.len())).collect();
            for x in xs {
                let x = Tensor::from_slice(x, (1, x.len()), &Device::Cpu)?;
                for (l, y) in layers.iter().zip(ys.iter_mut()) {
                    y.extend(l.candle()?.forward(&x)?.flatten_all()?.to_vec1::<f32>()?);
                }
            }
            return Ok(ys);
        }
        let raw: Vec<_> = layers.iter().filter_map(|l| l.raw()).collect();
        let data = layers.iter().map(|l| l.bytes()).collect::<Result<Vec<_>>>()?;
        let mats: Vec<kernels::Matrix> = layers
            .iter()
            .zip(&raw)
            .zip(&data)
            .map(|((l, kind), w)| kernels::Matrix { kind: *kind, w, n: l.n })
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
/// the seven projection weights as stored, in [`Target::ALL`] order (q, k, v, o, gate, up, down), and the
/// adapters a tuned model's file carries beside them ([`LowRank`], same order).
pub(crate) struct LayerWeights {
    pub attn_norm: Tensor,
    pub ffn_norm: Tensor,
    pub bq: Option<Tensor>,
    pub bk: Option<Tensor>,
    pub bv: Option<Tensor>,
    pub proj: [Arc<QTensor>; 7],
    pub lora: [Option<LowRank>; 7],
}

/// The names of an adapter's tensors beside the weight `weight` in a GGUF file (llama.cpp's names for LoRA
/// adapters: `blk.0.attn_q.weight.lora_a` is A, r × k; `.lora_b` is B, n × r, rows in the GGUF's order).
pub fn lora_names(weight: &str) -> (String, String) {
    (format!("{weight}.lora_a"), format!("{weight}.lora_b"))
}

/// The first adapter tensor `ct` carries beside its weights ([`lora_names`]), if any: such a file is a tuned model,
/// not a base to train on or fold another adapter into.
pub fn adapter_tensor(ct: &gguf_file::Content) -> Option<&str> {
    ct.tensor_infos.keys().map(String::as_str).find(|n| n.ends_with(".lora_a") || n.ends_with(".lora_b"))
}

/// The metadata key holding the adapters' alpha (scale = alpha / rank), written by `peft::merge_into_gguf`.
pub const LORA_ALPHA_KEY: &str = "copilot.lora.alpha";

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
        let lora_alpha = ct.metadata.get(LORA_ALPHA_KEY);
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
            let mut lora = Vec::with_capacity(7);
            for t in Target::ALL {
                let name = format!("{p}.{}.weight", t.gguf_name());
                let (na, nb) = lora_names(&name);
                lora.push(match (ct.tensor_infos.contains_key(&na), ct.tensor_infos.contains_key(&nb)) {
                    (false, false) => None,
                    (true, true) => {
                        let (a, b) = (get(&na)?.dequantize(device)?, get(&nb)?.dequantize(device)?);
                        let (r, _) = a.dims2()?;
                        let alpha = lora_alpha
                            .ok_or_else(|| {
                                candle_core::Error::Msg(format!("{na} is there but {LORA_ALPHA_KEY} is not"))
                            })?
                            .to_f32()?;
                        if r == 0 || b.dims2()?.1 != r {
                            candle_core::bail!("{na} {:?} and {nb} {:?} do not share a rank", a.dims(), b.dims());
                        }
                        let flat = |t: Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
                        Some(LowRank { a: flat(a)?, b: flat(b)?, r, scale: alpha / r as f32 })
                    }
                    _ => candle_core::bail!("{name} has only one of {na} and {nb}"),
                });
                proj.push(Arc::new(get(&name)?));
            }
            let proj: [Arc<QTensor>; 7] =
                proj.try_into().map_err(|_| candle_core::Error::Msg("seven projections".into()))?;
            let lora: [Option<LowRank>; 7] =
                lora.try_into().map_err(|_| candle_core::Error::Msg("seven projections".into()))?;
            let attn_norm = get(&format!("{p}.attn_norm.weight"))?.dequantize(device)?;
            let ffn_norm = get(&format!("{p}.ffn_norm.weight"))?.dequantize(device)?;
            layers.push(LayerWeights { attn_norm, ffn_norm, bq, bk, bv, proj, lora });
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
        Linear::new(Arc::new(QTensor::quantize(&t, GgmlDType::Q4_1).unwrap()), None).unwrap()
    }

    /// A weight with an adapter beside it computes `W·x + scale·B·(A·x)`: in a decoding step each row gets the
    /// same bits however many rows share the pass, and step, prompt and candle's path all agree with the sum
    /// computed in f64 from the dequantized weights.
    #[test]
    fn an_adapter_beside_the_weights_adds_its_product() {
        let (n, k, r) = (40, 256, 3);
        let w: Vec<f32> = (0..n * k).map(|i| (((i * 37) % 101) as f32 / 50.0 - 1.0) * 0.3).collect();
        let qt = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), GgmlDType::Q4K).unwrap();
        let deq = qt.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let a: Vec<f32> = (0..r * k).map(|i| ((i * 13) % 17) as f32 / 17.0 - 0.5).collect();
        let b: Vec<f32> = (0..n * r).map(|i| ((i * 7) % 11) as f32 / 11.0 - 0.4).collect();
        let lora = LowRank { a: a.clone(), b: b.clone(), r, scale: 2.0 };
        let l = Linear::new(Arc::new(qt), Some(lora)).unwrap();
        let xs: Vec<Vec<f32>> =
            (0..4).map(|s| (0..k).map(|i| ((i * 5 + s * 3) % 23) as f32 / 23.0 - 0.5).collect()).collect();
        let rows: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let want: Vec<f64> = xs
            .iter()
            .flat_map(|x| {
                let t: Vec<f64> =
                    (0..r).map(|j| (0..k).map(|i| a[j * k + i] as f64 * x[i] as f64).sum::<f64>() * 2.0).collect();
                let (deq, b) = (&deq, &b);
                (0..n).map(move |o| {
                    (0..k).map(|i| deq[o * k + i] as f64 * x[i] as f64).sum::<f64>()
                        + (0..r).map(|j| b[o * r + j] as f64 * t[j]).sum::<f64>()
                })
            })
            .collect();
        let close = |got: &[f32], what: &str| {
            for (g, w) in got.iter().zip(&want) {
                // The weights' product rounds its input to 8 bits (Q8_K): about 1 % of a product this size.
                assert!((*g as f64 - w).abs() <= 0.02 * w.abs().max(1.0), "{what}: {g} vs {w}");
            }
        };
        let step = Linear::matmul_rows(&[&l], &rows).unwrap().remove(0);
        close(&step, "step");
        let without = Linear::weight_products(&[&l], &rows, kernels::Pass::Step).unwrap().remove(0);
        assert!(step.iter().zip(&without).any(|(p, q)| (p - q).abs() > 0.1), "the adapter changes the product");
        for (i, x) in rows.iter().enumerate() {
            let alone = Linear::matmul_rows(&[&l], &[x]).unwrap().remove(0);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&alone), bits(&step[i * n..(i + 1) * n]), "row {i} alone");
        }
        // Beside a layer without an adapter (q/k/v, gate/up share their input): each gets its own product.
        let wp: Vec<f32> = (0..8 * k).map(|i| ((i * 11) % 29) as f32 / 29.0 - 0.5).collect();
        let plain = Tensor::from_vec(wp, (8, k), &Device::Cpu).unwrap();
        let plain = Linear::new(Arc::new(QTensor::quantize(&plain, GgmlDType::Q4K).unwrap()), None).unwrap();
        let both = Linear::matmul_rows(&[&plain, &l], &rows).unwrap();
        assert_eq!(both[1], step, "with another layer in the pass");
        assert_eq!(both[0], Linear::weight_products(&[&plain], &rows, kernels::Pass::Step).unwrap()[0]);
        let x = Tensor::from_vec(xs.concat(), (1, 4, k), &Device::Cpu).unwrap();
        for own in [true, false] {
            let y = Linear::forward_many(&[&l], &x, own).unwrap().remove(0);
            assert_eq!(y.dims(), &[1, 4, n]);
            close(&y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), if own { "prompt" } else { "candle" });
        }
        // An adapter of the wrong shape is refused at load.
        let qt = QTensor::quantize(&Tensor::zeros((n, k), DType::F32, &Device::Cpu).unwrap(), GgmlDType::Q4K).unwrap();
        let bad = LowRank { a: vec![0.0; r * k], b: vec![0.0; n * r + 1], r, scale: 1.0 };
        assert!(Linear::new(Arc::new(qt), Some(bad)).is_err());
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
                let want = l.candle().unwrap().forward(&Tensor::from_slice(x, (1, k), &Device::Cpu).unwrap()).unwrap();
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
        let odd = Linear {
            mm: Store::Candle(QMatMul::Tensor(Tensor::zeros((2, 20), DType::F32, &Device::Cpu).unwrap())),
            n: 2,
            k: 20,
            lora: None,
        };
        assert!(!Linear::q4_1_covers(&[&odd]));
    }
}
