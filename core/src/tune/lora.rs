//! LoRA adapters over frozen, quantized base weights (QLoRA-style): the building block of fine-tuning (#5).
//!
//! A layer computes `y = x·Wᵀ + (α/r)·(dropout(x)·Aᵀ)·Bᵀ` where `W` (n × k) stays in its GGUF quantization and
//! is never trained, and `A` (r × k), `B` (n × r) are the trainable f32 matrices. Training needs the gradient with
//! respect to `x` through the frozen product (to reach the adapters of earlier layers): [`FrozenQMatMul`] is that
//! op — candle's quantized matmul forward, and a backward pass that multiplies the incoming gradient by `W`
//! dequantized on the fly (the straight-through gradient of the quantized product; `W` itself gets none).
//!
//! Initialisation follows PEFT's defaults, so adapters mean the same thing here and there: `A` uniform in
//! ±1/√k (PyTorch's Kaiming-uniform with a = √5), `B` zero, so a new adapter leaves the model unchanged. The
//! random numbers come from a seeded generator of our own: the same seed gives the same adapter on any machine.

use crate::engine::kernels::{Kind, Matrix, QK_K};
use crate::engine::prompt_kernels::gemm_prompt;
use crate::tune::tiles::{self, Q8Tiles};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, Var};
use std::sync::Arc;

/// `x·Wᵀ` for a frozen quantized `W`, differentiable with respect to `x`.
///
/// The backward pass needs `∂L/∂x = ∂L/∂y · W`: a product with `W` untransposed, which the quantized layout (blocks
/// along each row of `W`) cannot feed to a quantized dot. Two ways, chosen by `bwd`:
/// - `None`: dequantize `W` to f32 for that product (exact; costs a dequantization of the weight and an f32 matmul
///   every backward pass);
/// - `Some(product)`: `W` transposed and re-quantized to Q8_0 once at load ([`transposed_q8`]), so the backward
///   pass is a quantized matmul like the forward one (8-bit weights — finer than the 4-bit originals — and the
///   incoming gradient rounded to 8 bits per block of 32, as the forward pass rounds activations). 2.2× faster per
///   step on the default 1.5B model with candle's Q8_0 product (measured on the 2-core CI machine;
///   docs/finetuning.md), more with [`Q8Tiles`].
pub struct FrozenQMatMul {
    w: Arc<QTensor>,
    fwd: Product,
    bwd: Option<Product>,
}

impl FrozenQMatMul {
    /// Candle's product forward, the exact (dequantizing) one backward.
    pub fn exact(w: Arc<QTensor>) -> FrozenQMatMul {
        FrozenQMatMul { fwd: Product::Candle(w.clone()), w, bwd: None }
    }

    /// Candle's product forward, the transposed Q8_0 copy of `w` ([`Product::of`]: tiles where the CPU runs them)
    /// backward.
    pub fn with_transposed(w: Arc<QTensor>) -> Result<FrozenQMatMul> {
        let bwd = Some(Product::of(Arc::new(transposed_q8(&w)?))?);
        Ok(FrozenQMatMul { fwd: Product::Candle(w.clone()), w, bwd })
    }
}

/// A frozen weight's product `x·Mᵀ` with no backward pass of its own: candle's quantized matmul; for a Q8_0
/// weight on a CPU with AVX-512 VNNI or AVX2, the same product over [`Q8Tiles`] (see its module: a training step of
/// the bench's model went 5.2× faster with them on VNNI); for Q4_K and Q6_K weights, the inference engine's own prompt
/// kernels over the GGUF blocks ([`gemm_prompt`]: the products the model computes when it reads a prompt).
#[derive(Clone)]
pub enum Product {
    Candle(Arc<QTensor>),
    Tiles(Arc<Q8Tiles>),
    Blocks(Arc<QTensor>, Kind),
    /// Q4_1 rows of whole blocks: [`crate::engine::q4_1`], candle's own values computed faster.
    Q4_1(Arc<QTensor>),
}

impl Product {
    /// `q`'s product: tiles where `q` is Q8_0 and this CPU runs them (the tiles hold their own copy), the engine's
    /// kernels for Q4_K/Q6_K rows of whole blocks, [`crate::engine::q4_1`] for Q4_1 (candle's bits), else candle's.
    pub fn of(q: Arc<QTensor>) -> Result<Product> {
        let (_, k) = q.shape().dims2()?;
        Ok(match Kind::from_ggml(q.dtype()) {
            Some(kind) if k % QK_K == 0 => Product::Blocks(q, kind),
            _ if q.dtype() == GgmlDType::Q8_0 && tiles::available() => {
                Product::Tiles(Arc::new(Q8Tiles::from_q8_0(&q)?))
            }
            _ if crate::engine::q4_1::covers(q.dtype(), k) => Product::Q4_1(q),
            _ => Product::Candle(q),
        })
    }
}

impl CustomOp1 for Product {
    fn name(&self) -> &'static str {
        "frozen-product"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match self {
            Product::Candle(q) => <QTensor as CustomOp1>::cpu_fwd(q, storage, layout),
            Product::Tiles(t) => t.cpu_fwd(storage, layout),
            Product::Blocks(q, kind) => {
                let (n, k) = q.shape().dims2()?;
                let (x, shape) = tiles::input_rows(storage, layout, k, n)?;
                let w = q.data()?;
                let rows: Vec<&[f32]> = x.chunks_exact(k).collect();
                let mut y = vec![0f32; rows.len() * n];
                gemm_prompt(&[Matrix { kind: *kind, w: &w, n }], k, &rows, &mut [&mut y]);
                Ok((CpuStorage::F32(y), shape))
            }
            Product::Q4_1(q) => {
                let (n, k) = q.shape().dims2()?;
                let (x, shape) = tiles::input_rows(storage, layout, k, n)?;
                let w = q.data()?;
                let rows: Vec<&[f32]> = x.chunks_exact(k).collect();
                let mut y = vec![0f32; rows.len() * n];
                crate::engine::q4_1::products(&[(&w, n)], k, &rows, &mut [&mut y])?;
                Ok((CpuStorage::F32(y), shape))
            }
        }
    }
}

/// `W` (n × k) transposed to k × n and quantized to Q8_0 (needs n to be a multiple of 32).
pub fn transposed_q8(w: &QTensor) -> Result<QTensor> {
    let t = w.dequantize(&w.device())?.t()?.contiguous()?;
    QTensor::quantize(&t, GgmlDType::Q8_0)
}

/// `w` re-blocked as Q8_0 without any rounding, where its format allows: Q4_0 and Q5_0 blocks are a scale and 32
/// small integers (4 or 5 bits), which Q8_0 holds exactly with the same scale. Candle 0.11 has SIMD dot products
/// for Q8_0 but only scalar ones for Q5_0 (most of the weights of the PyPI Qwen2.5-Coder-0.5B file), so training
/// over the widened copy computes the same products faster, for 3 more bits per weight. `None` for other formats.
pub fn widened_q8(w: &QTensor) -> Result<Option<QTensor>> {
    const QK: usize = 32;
    let (from, stride) = match w.dtype() {
        GgmlDType::Q4_0 => (GgmlDType::Q4_0, 2 + QK / 2),
        GgmlDType::Q5_0 => (GgmlDType::Q5_0, 2 + 4 + QK / 2),
        _ => return Ok(None),
    };
    let raw = w.data()?;
    if raw.len() % stride != 0 {
        candle_core::bail!("a {from:?} tensor of {} bytes is not whole blocks", raw.len());
    }
    let mut out = Vec::with_capacity(raw.len() / stride * (2 + QK));
    for block in raw.chunks_exact(stride) {
        out.extend_from_slice(&block[..2]); // the f16 scale, unchanged
        let mut q = [0i8; QK];
        match from {
            GgmlDType::Q4_0 => {
                let qs = &block[2..];
                for j in 0..QK / 2 {
                    q[j] = (qs[j] & 0x0F) as i8 - 8;
                    q[j + QK / 2] = (qs[j] >> 4) as i8 - 8;
                }
            }
            _ => {
                let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                let qs = &block[6..];
                for j in 0..QK / 2 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    q[j] = ((qs[j] & 0x0F) | h0) as i8 - 16;
                    q[j + QK / 2] = ((qs[j] >> 4) | h1) as i8 - 16;
                }
            }
        }
        out.extend(q.iter().map(|&v| v as u8));
    }
    let dims = w.shape().dims().to_vec();
    candle_core::quantized::ggml_file::qtensor_from_ggml(GgmlDType::Q8_0, &out, dims, &w.device()).map(Some)
}

impl CustomOp1 for FrozenQMatMul {
    fn name(&self) -> &'static str {
        "frozen-qmatmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.fwd.cpu_fwd(storage, layout)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        match &self.bwd {
            // ∂L/∂x = ∂L/∂y · W = ∂L/∂y · (Wᵀ)ᵀ: a quantized matmul against the transposed copy.
            Some(wt) => Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(wt)?)),
            // ∂L/∂x = ∂L/∂y · W, with W (n × k) dequantized for this product only.
            None => {
                let w = self.w.dequantize(arg.device())?;
                Ok(Some(grad_res.broadcast_matmul(&w)?))
            }
        }
    }
}

/// A frozen base weight: kept quantized ([`FrozenQMatMul`], the QLoRA setting) or, when memory allows and speed
/// matters more, dequantized once to f32 (`dense`) so both passes are plain f32 matmuls. Either way it gets no
/// gradient of its own; the quantized weights are kept for merging.
#[derive(Clone)]
pub struct Frozen {
    pub q: Arc<QTensor>,
    /// The forward product: candle's over `q`, or [`Product::of`] `q` (widened where it is Q4_0/Q5_0) — see
    /// [`Frozen::quantized_q8_backward`].
    fwd: Product,
    /// The product with the Q8_0 copy of Wᵀ for the backward pass (see [`FrozenQMatMul`]); `None` = dequantize
    /// on the fly.
    bwd: Option<Product>,
    dense: Option<Tensor>,
}

impl Frozen {
    /// Quantized, with the exact backward pass (dequantizing on the fly).
    pub fn quantized(q: Arc<QTensor>) -> Frozen {
        Frozen { fwd: Product::Candle(q.clone()), q, bwd: None, dense: None }
    }

    /// Quantized, with a transposed Q8_0 copy for fast backward passes (falls back to the exact pass where the
    /// output width is not a multiple of 32). Q4_0/Q5_0 weights compute forward as the same weights in Q8_0
    /// ([`widened_q8`], exact), Q8_0 products go through [`Q8Tiles`] where the CPU has AVX-512 VNNI or AVX2, Q4_K/Q6_K
    /// forward products through the engine's prompt kernels ([`Product::Blocks`]); `q`
    /// stays as given (the weights merged into, and what the exact backward pass dequantizes) beside the tiles'
    /// own copies — for a Q5_0 weight 94 bytes per 32 values where the widened Q8_0 copies took 68 (measured:
    /// 2.99 vs 2.84 GB peak on the 0.5B bench, still under PyTorch's 5.6 GB).
    pub fn quantized_q8_backward(q: Arc<QTensor>) -> Result<Frozen> {
        let (n, _) = q.shape().dims2()?;
        let fwd = match widened_q8(&q)? {
            Some(wide) => Product::of(Arc::new(wide))?,
            None => Product::of(q.clone())?,
        };
        let bwd = match n % 32 {
            0 => Some(Product::of(Arc::new(transposed_q8(&q)?))?),
            _ => None,
        };
        Ok(Frozen { q, fwd, bwd, dense: None })
    }

    /// `q` dequantized once to f32.
    pub fn dense(q: Arc<QTensor>) -> Result<Frozen> {
        let w = q.dequantize(&q.device())?;
        Ok(Frozen { fwd: Product::Candle(q.clone()), q, bwd: None, dense: Some(w) })
    }

    /// `x·Wᵀ`, differentiable with respect to `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.dense {
            Some(w) => x.broadcast_matmul(&w.t()?),
            None => x.contiguous()?.apply_op1(FrozenQMatMul {
                w: self.q.clone(),
                fwd: self.fwd.clone(),
                bwd: self.bwd.clone(),
            }),
        }
    }
}

/// A small seeded generator (SplitMix64) for adapter initialisation and dropout masks.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Rank, scaling and dropout of an adapter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
}

impl LoraConfig {
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }
}

/// One adapted linear layer.
pub struct LoraLinear {
    base: Frozen,
    pub a: Var,
    pub b: Var,
    cfg: LoraConfig,
}

impl LoraLinear {
    /// A fresh adapter on `base` (n × k): `A` uniform in ±1/√k from `rng`, `B` zero.
    pub fn new(base: Arc<QTensor>, cfg: LoraConfig, rng: &mut Rng) -> Result<LoraLinear> {
        LoraLinear::on(Frozen::quantized(base), cfg, rng)
    }

    /// A fresh adapter on a frozen base of either kind.
    pub fn on(base: Frozen, cfg: LoraConfig, rng: &mut Rng) -> Result<LoraLinear> {
        let (n, k) = base.q.shape().dims2()?;
        if cfg.rank == 0 || cfg.rank > n.min(k) {
            candle_core::bail!("LoRA rank {} is not in 1..={} for a {n}×{k} weight", cfg.rank, n.min(k));
        }
        if !(0.0..1.0).contains(&cfg.dropout) {
            candle_core::bail!("LoRA dropout {} is not in [0, 1)", cfg.dropout);
        }
        let device = base.q.device();
        let bound = 1.0 / (k as f32).sqrt();
        let a: Vec<f32> = (0..cfg.rank * k).map(|_| (rng.uniform() * 2.0 - 1.0) * bound).collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.rank, k), &device)?)?;
        let b = Var::zeros((n, cfg.rank), DType::F32, &device)?;
        Ok(LoraLinear { base, a, b, cfg })
    }

    /// An adapter with given matrices (loading a saved one).
    pub fn with_weights(base: Arc<QTensor>, a: Tensor, b: Tensor, cfg: LoraConfig) -> Result<LoraLinear> {
        let base = Frozen::quantized(base);
        let (a, b) = fitted(&base, &a, &b, cfg.rank)?;
        Ok(LoraLinear { base, a, b, cfg })
    }

    /// Replace A and B (resuming from a checkpoint); shapes must fit.
    pub fn set_weights(&mut self, a: &Tensor, b: &Tensor) -> Result<()> {
        (self.a, self.b) = fitted(&self.base, a, b, self.cfg.rank)?;
        Ok(())
    }

    pub fn config(&self) -> LoraConfig {
        self.cfg
    }

    /// `x·Wᵀ + scale·(dropout(x)·Aᵀ)·Bᵀ`. Dropout applies only when `rng` is given (training), with a mask
    /// drawn from it, so a seeded run is repeatable.
    pub fn forward(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        let xd = match rng {
            Some(rng) if self.cfg.dropout > 0.0 => {
                let p = self.cfg.dropout;
                let keep: Vec<f32> =
                    (0..x.elem_count()).map(|_| if rng.uniform() < p { 0.0 } else { 1.0 / (1.0 - p) }).collect();
                (x * Tensor::from_vec(keep, x.shape(), x.device())?)?
            }
            _ => x.clone(),
        };
        let low = xd.broadcast_matmul(&self.a.as_tensor().t()?)?;
        let delta = (low.broadcast_matmul(&self.b.as_tensor().t()?)? * self.cfg.scale() as f64)?;
        y + delta
    }

    /// The base weight with the adapter folded in, quantized back to the base's format (see [`merge`]).
    pub fn merged(&self) -> Result<QTensor> {
        merge(&self.base.q, self.a.as_tensor(), self.b.as_tensor(), self.cfg.scale())
    }

    pub fn base_dtype(&self) -> GgmlDType {
        self.base.q.dtype()
    }
}

/// A and B as f32 variables, if their shapes fit `base` at rank `r`.
fn fitted(base: &Frozen, a: &Tensor, b: &Tensor, r: usize) -> Result<(Var, Var)> {
    let (n, k) = base.q.shape().dims2()?;
    if a.dims() != [r, k] || b.dims() != [n, r] {
        candle_core::bail!("adapter shapes A {:?}, B {:?} do not fit a {n}×{k} weight at rank {r}", a.dims(), b.dims());
    }
    Ok((Var::from_tensor(&a.to_dtype(DType::F32)?)?, Var::from_tensor(&b.to_dtype(DType::F32)?)?))
}

/// `W + scale·B·A` for a quantized `W` (n × k) and an adapter `A` (r × k), `B` (n × r), quantized back to `W`'s
/// own format.
///
/// Deterministic to the bit on any x86-64 or other machine: `scripts/fetch-model` builds the shipped default model
/// this way on the user's machine and checks it against a recorded sha256. So `B·A` is not a `matmul` (the gemm
/// crate picks AVX2 or AVX-512 kernels at run time, which may sum in other orders) but [`fixed_order_delta`];
/// candle's dequantization and quantization are scalar code, and Rust never fuses a multiply and an add.
pub fn merge(base: &QTensor, a: &Tensor, b: &Tensor, scale: f32) -> Result<QTensor> {
    let w = base.dequantize(&base.device())?;
    let delta = fixed_order_delta(a, b, scale)?;
    QTensor::quantize(&(w + delta)?, base.dtype())
}

/// `scale·B·A` (n × k) summed over the rank in one fixed order for every element: `((b₀a₀ + b₁a₁) + …)·scale`,
/// each step an f32 multiply then an f32 add.
pub fn fixed_order_delta(a: &Tensor, b: &Tensor, scale: f32) -> Result<Tensor> {
    let (r, k) = a.dims2()?;
    let (n, rb) = b.dims2()?;
    if rb != r {
        candle_core::bail!("B {:?} and A {:?} do not share a rank", b.dims(), a.dims());
    }
    let a = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; n * k];
    for (i, row) in out.chunks_exact_mut(k).enumerate() {
        for (j, bj) in b[i * r..(i + 1) * r].iter().enumerate() {
            for (o, &aj) in row.iter_mut().zip(&a[j * k..(j + 1) * k]) {
                *o += bj * aj;
            }
        }
        for o in row.iter_mut() {
            *o *= scale;
        }
    }
    Tensor::from_vec(out, (n, k), &candle_core::Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensor(shape: (usize, usize), rng: &mut Rng, scale: f32) -> Tensor {
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| (rng.uniform() * 2.0 - 1.0) * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn q4_0_and_q5_0_widen_to_q8_0_exactly() {
        let mut rng = Rng::new(21);
        let w = tensor((8, 64), &mut rng, 0.7);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q5_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let wide = widened_q8(&q).unwrap().expect("widened");
            assert_eq!(wide.dtype(), GgmlDType::Q8_0);
            assert_eq!(wide.shape().dims(), &[8, 64]);
            let a = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = wide.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(a, b, "{dtype:?}: the same weights, bit for bit");
            assert!(a.iter().any(|&v| v != 0.0));
            // And the same products: both formats multiply activations rounded to Q8_0 blocks.
            let x = tensor((3, 64), &mut rng, 1.0);
            let y0 = Frozen::quantized(Arc::new(q)).forward(&x).unwrap();
            let y1 = Frozen::quantized(Arc::new(wide)).forward(&x).unwrap();
            let d = (&y0 - &y1).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "{dtype:?}: products differ by {d}");
        }
        assert!(widened_q8(&QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap().is_none());
        assert!(widened_q8(&QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap().is_none(), "an offset format");
    }

    fn base(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> Arc<QTensor> {
        Arc::new(QTensor::quantize(&tensor((n, k), &mut Rng::new(seed), 0.5), dtype).unwrap())
    }

    /// L = Σ y ⊙ g for a fixed g: its gradient with respect to y is g.
    fn loss(layer: &LoraLinear, x: &Tensor, g: &Tensor) -> Tensor {
        (layer.forward(x, None).unwrap() * g).unwrap().sum_all().unwrap()
    }

    /// Central finite difference of `loss` with respect to element `i` of `v` (a Var of `layer` or the input).
    fn numeric(f: &dyn Fn() -> f32, v: &Var, i: usize, h: f32) -> f32 {
        let orig = v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let set = |delta: f32| {
            let mut w = orig.clone();
            w[i] += delta;
            v.set(&Tensor::from_vec(w, v.shape(), v.device()).unwrap()).unwrap();
        };
        set(h);
        let up = f();
        set(-h);
        let down = f();
        set(0.0);
        (up - down) / (2.0 * h)
    }

    fn assert_close(analytic: f32, numeric: f32, what: &str) {
        let tol = 2e-2 * analytic.abs().max(numeric.abs()).max(1e-2);
        assert!((analytic - numeric).abs() <= tol, "{what}: analytic {analytic} vs finite difference {numeric}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        // An f32 base keeps the forward pass exact, so finite differences are meaningful for x as well.
        let (n, k, r) = (6, 256, 3);
        let mut rng = Rng::new(7);
        let cfg = LoraConfig { rank: r, alpha: 6.0, dropout: 0.0 };
        let layer = LoraLinear::new(base(GgmlDType::F32, n, k, 1), cfg, &mut rng).unwrap();
        // B starts at zero (A's gradient would be zero too): give it values so every path is exercised.
        layer.b.set(&tensor((n, r), &mut rng, 0.3)).unwrap();
        let x = Var::from_tensor(&tensor((2, k), &mut rng, 1.0)).unwrap();
        let g = tensor((2, n), &mut rng, 1.0);
        let grads = loss(&layer, x.as_tensor(), &g).backward().unwrap();
        let f = || loss(&layer, x.as_tensor(), &g).to_scalar::<f32>().unwrap();
        for (name, v) in [("A", &layer.a), ("B", &layer.b), ("x", &x)] {
            let ga = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
            let ga = ga.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in [0, 1, ga.len() / 2, ga.len() - 1] {
                assert_close(ga[i], numeric(&f, v, i, 1e-2), &format!("∂L/∂{name}[{i}]"));
            }
        }
    }

    #[test]
    fn the_quantized_base_passes_the_dequantized_weight_gradient() {
        let (n, k) = (8, 512);
        let w = base(GgmlDType::Q4K, n, k, 3);
        let x = Var::from_tensor(&tensor((3, k), &mut Rng::new(4), 1.0)).unwrap();
        let g = tensor((3, n), &mut Rng::new(5), 1.0);
        let y = x.as_tensor().apply_op1(FrozenQMatMul::exact(w.clone())).unwrap();
        let grad = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let got = grad.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want =
            g.matmul(&w.dequantize(&Device::Cpu).unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn the_q8_backward_is_the_exact_gradient_to_8_bit_rounding() {
        let (n, k) = (64, 512);
        let w = base(GgmlDType::Q4K, n, k, 3);
        let x = Var::from_tensor(&tensor((5, k), &mut Rng::new(4), 1.0)).unwrap();
        let g = tensor((5, n), &mut Rng::new(5), 1.0);
        let grad_with = |op: FrozenQMatMul| {
            let y = x.as_tensor().apply_op1(op).unwrap();
            let gs = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            gs.get(x.as_tensor()).unwrap().clone()
        };
        let exact = grad_with(FrozenQMatMul::exact(w.clone()));
        let q8 = grad_with(FrozenQMatMul::with_transposed(w.clone()).unwrap());
        let err = (&q8 - &exact).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        let norm = exact.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        assert!(err / norm < 0.02, "relative error {}", err / norm);
        assert!(err > 0.0, "the q8 path was taken (it rounds)");
    }

    #[test]
    fn every_forward_product_computes_what_candles_does() {
        // Q4_K/Q6_K through the engine's kernels (a few rows, and more than a tile's 8), Q8_0 through the tiles
        // where the CPU runs them, Q4_1 through `engine::q4_1` (candle's bits exactly): each against candle's own
        // quantized product.
        let k = 512;
        for (dtype, n) in [(GgmlDType::Q4K, 40), (GgmlDType::Q6K, 17), (GgmlDType::Q8_0, 33), (GgmlDType::Q4_1, 8)] {
            let w = base(dtype, n, k, 9);
            let product = Product::of(w.clone()).unwrap();
            let want_kind = match dtype {
                GgmlDType::Q4K | GgmlDType::Q6K => "blocks",
                GgmlDType::Q8_0 if tiles::available() => "tiles",
                GgmlDType::Q4_1 => "q4_1",
                _ => "candle",
            };
            let kind = match &product {
                Product::Candle(_) => "candle",
                Product::Tiles(_) => "tiles",
                Product::Blocks(..) => "blocks",
                Product::Q4_1(_) => "q4_1",
            };
            assert_eq!(kind, want_kind, "{dtype:?}");
            for m in [1, 3, 20] {
                let x = tensor((m, k), &mut Rng::new(m as u64), 1.0);
                let got = x.apply_op1_no_bwd(&product).unwrap();
                let want = x.apply_op1_no_bwd(w.as_ref()).unwrap();
                let err = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                // Candle rounds Q8_0 activations' scales to f16 and the tiles keep f32: a little more there.
                let tol = match kind {
                    "tiles" => 0.01,
                    "q4_1" => 0.0,
                    _ => 1e-4,
                };
                assert!(err <= tol * scale, "{dtype:?}, {m} rows: largest difference {err} against {scale}");
            }
        }
    }

    #[test]
    fn the_merge_delta_sums_in_one_fixed_order_and_equals_the_product() {
        let mut rng = Rng::new(5);
        let a = tensor((4, 96), &mut rng, 0.3);
        let b = tensor((40, 4), &mut rng, 0.3);
        let d = fixed_order_delta(&a, &b, 2.0).unwrap();
        let av = a.to_vec2::<f32>().unwrap();
        let bv = b.to_vec2::<f32>().unwrap();
        let dv = d.to_vec2::<f32>().unwrap();
        for i in 0..40 {
            for j in 0..96 {
                let mut s = 0f32;
                for (bi, ar) in bv[i].iter().zip(&av) {
                    s += bi * ar[j];
                }
                assert_eq!(dv[i][j].to_bits(), (s * 2.0).to_bits(), "element {i},{j}: the order is the rank's");
            }
        }
        let m = (b.matmul(&a).unwrap() * 2.0).unwrap();
        let err = (&d - &m).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-5, "the fixed-order delta is B·A·scale: {err}");
        assert!(fixed_order_delta(&a, &tensor((40, 3), &mut rng, 1.0), 1.0).is_err(), "ranks must agree");
    }

    #[test]
    fn a_new_adapter_changes_nothing_and_a_merged_one_matches_base_plus_adapter() {
        let (n, k, r) = (16, 512, 4);
        let mut rng = Rng::new(11);
        let cfg = LoraConfig { rank: r, alpha: 8.0, dropout: 0.1 };
        let w0 = tensor((n, k), &mut Rng::new(9), 0.5);
        let w = Arc::new(QTensor::quantize(&w0, GgmlDType::Q4K).unwrap());
        let layer = LoraLinear::new(w.clone(), cfg, &mut rng).unwrap();
        let x = tensor((4, k), &mut rng, 1.0);
        let plain = x.apply_op1(FrozenQMatMul::exact(w.clone())).unwrap();
        let fresh = layer.forward(&x, None).unwrap();
        assert_eq!(plain.to_vec2::<f32>().unwrap(), fresh.to_vec2::<f32>().unwrap(), "B = 0: the adapter is a no-op");

        layer.b.set(&tensor((n, r), &mut rng, 0.5)).unwrap();
        let adapted = layer.forward(&x, None).unwrap();
        let merged = layer.merged().unwrap();
        assert_eq!(merged.dtype(), GgmlDType::Q4K);
        let folded = x.apply_op1(FrozenQMatMul::exact(Arc::new(merged))).unwrap();
        let (a, b) = (
            adapted.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            folded.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let max_diff = |p: &[f32], q: &[f32]| p.iter().zip(q).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        let diff = max_diff(&a, &b);
        // Folding ΔW in means quantizing W + ΔW to 4.5 bits once more: the error must be of the size that
        // quantizing W cost in the first place (measured on the same input), not more.
        let exact = x.matmul(&w0.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let quant_err = max_diff(&plain.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &exact);
        assert!(diff <= 2.0 * quant_err, "merged vs base + adapter: max |diff| {diff}; quantizing W cost {quant_err}");
        let delta = max_diff(&a, &plain.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert!(delta > diff, "the adapter's effect ({delta}) must exceed the merge error ({diff})");
    }

    #[test]
    fn dropout_is_seeded_and_off_at_inference() {
        let (n, k) = (4, 256);
        let cfg = LoraConfig { rank: 2, alpha: 4.0, dropout: 0.5 };
        let layer = LoraLinear::new(base(GgmlDType::F32, n, k, 2), cfg, &mut Rng::new(1)).unwrap();
        layer.b.set(&tensor((n, 2), &mut Rng::new(3), 1.0)).unwrap();
        let x = tensor((1, k), &mut Rng::new(4), 1.0);
        let run = |seed| layer.forward(&x, Some(&mut Rng::new(seed))).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
        assert_eq!(
            layer.forward(&x, None).unwrap().to_vec2::<f32>().unwrap(),
            layer.forward(&x, None).unwrap().to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn bad_configurations_are_refused() {
        let w = base(GgmlDType::F32, 4, 256, 1);
        for (rank, dropout) in [(0, 0.0), (5, 0.0), (2, 1.0), (2, -0.1)] {
            let cfg = LoraConfig { rank, alpha: 1.0, dropout };
            assert!(LoraLinear::new(w.clone(), cfg, &mut Rng::new(1)).is_err(), "rank {rank}, dropout {dropout}");
        }
        let cfg = LoraConfig { rank: 2, alpha: 1.0, dropout: 0.0 };
        let a = Tensor::zeros((3, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((4, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(LoraLinear::with_weights(w, a, b, cfg).is_err());
    }
}
