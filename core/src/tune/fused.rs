//! The training pass's element-wise layers as single ops with hand-written gradients: attention's masked softmax,
//! RMSNorm and SwiGLU.
//!
//! Why: composed from candle's ops, each of these materialises one tensor per elementary step (the softmax: mask
//! add, row max, subtract, exp, row sum, divide), and its gradient as many again, each op on one thread. For the
//! attention of a packed batch's shared prefix (a database's schema, often 1,000–2,000 tokens) those tensors are
//! `n_head · t²` floats per layer — ~100 MB each at 1,500 tokens, over glibc's mmap threshold, so every one is
//! fresh zeroed pages. `perf` on the full recipe's steps put candle's element-wise ops at ~12 % of a step and the
//! kernel's page zeroing at another 11 %. Here each layer is one op: the forward pass reads its inputs once and
//! writes its output, the backward pass writes the inputs' gradients in one pass, rows shared out on the pool's
//! threads. The softmax also computes nothing for the keys a row may not see (half of a causal square): they are
//! exact zeros, as the composed version's `exp(-1e9)` made them.
//!
//! Each op computes what the composed version computes, up to the order of float operations within a row (tests
//! hold both values and gradients to it).

use super::tiles::Shared;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// The f32 elements of a contiguous CPU tensor.
fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{what} takes f32, not {:?}", storage.dtype()) };
    let Some((from, to)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what} needs a contiguous input, not {layout:?}")
    };
    Ok(&data[from..to])
}

/// The length of the last dimension of `layout`'s shape.
fn width(layout: &Layout) -> usize {
    layout.shape().dims().last().copied().unwrap_or(1)
}

/// Run `f(r, rows)` over every row `r` of `parts.len()` output buffers of rows of `width` floats: `rows[p]` is
/// row `r` of `parts[p]`. Rows are shared out among the pool's threads.
fn for_rows<const P: usize>(parts: [&mut [f32]; P], width: usize, f: impl Fn(usize, [&mut [f32]; P]) + Sync) {
    let n = parts[0].len() / width.max(1);
    debug_assert!(parts.iter().all(|p| p.len() == n * width));
    let at: [Shared<f32>; P] = parts.map(|p| Shared(p.as_mut_ptr()));
    let at = &at;
    candle_core::utils::barrier_pool().execute_chunked(n, |range| {
        for r in range {
            // SAFETY: row r of each buffer (floats r·width..(r+1)·width, inside it: r < n) is handed to this work
            // item alone, nothing else reads the buffers while the pool runs, and they outlive the call.
            let rows =
                std::array::from_fn(|p| unsafe { std::slice::from_raw_parts_mut(at[p].0.add(r * width), width) });
            f(r, rows);
        }
    });
}

/// The softmax over the last dimension of one attention span's scores `(…, n_rep·len, shared + len)`: row `r`
/// (query `r mod len` of the span) sees the `shared` prefix keys and its own keys up to itself; the keys it may not
/// see get probability 0. The same as adding [`super::finetune`]'s span mask (−1e9 where hidden) and taking the
/// softmax, with a backward pass.
pub fn span_softmax(scores: &Tensor, len: usize, shared: usize) -> Result<Tensor> {
    if len == 0 {
        candle_core::bail!("a span of no queries");
    }
    scores.apply_op1(SpanSoftmax { len, shared })
}

#[derive(Clone, Copy)]
struct SpanSoftmax {
    len: usize,
    shared: usize,
}

impl SpanSoftmax {
    /// Keys row `r` sees.
    fn seen(&self, r: usize) -> usize {
        self.shared + r % self.len + 1
    }

    fn check(&self, layout: &Layout) -> Result<usize> {
        let keys = self.shared + self.len;
        let dims = layout.shape().dims();
        let rows = if dims.len() >= 2 { dims[dims.len() - 2] } else { 0 };
        if width(layout) != keys || rows == 0 || rows % self.len != 0 {
            candle_core::bail!(
                "span scores {:?} are not (…, n_rep·{}, {} + {})",
                layout.shape(),
                self.len,
                self.shared,
                self.len
            );
        }
        Ok(keys)
    }
}

impl CustomOp1 for SpanSoftmax {
    fn name(&self) -> &'static str {
        "span-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let keys = self.check(layout)?;
        let x = contiguous(storage, layout, "span softmax")?;
        let mut p = vec![0f32; x.len()];
        for_rows([&mut p], keys, |r, [out]| {
            let n = self.seen(r);
            let x = &x[r * keys..r * keys + n];
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &v) in out.iter_mut().zip(x) {
                *o = (v - max).exp();
                sum += *o;
            }
            out[..n].iter_mut().for_each(|o| *o /= sum);
        });
        Ok((CpuStorage::F32(p), layout.shape().clone()))
    }

    /// dx = p ⊙ (g − Σ g ⊙ p) over the keys a row sees (p is 0 elsewhere, and so is dx).
    fn bwd(&self, _scores: &Tensor, p: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(p.apply_op2_no_bwd(&grad.contiguous()?, &SpanSoftmaxGrad(*self))?))
    }
}

struct SpanSoftmaxGrad(SpanSoftmax);

impl CustomOp2 for SpanSoftmaxGrad {
    fn name(&self) -> &'static str {
        "span-softmax-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let keys = self.0.check(l1)?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("span softmax gradient {:?} for probabilities {:?}", l2.shape(), l1.shape());
        }
        let (p, g) = (contiguous(s1, l1, "span softmax")?, contiguous(s2, l2, "span softmax")?);
        let mut dx = vec![0f32; p.len()];
        for_rows([&mut dx], keys, |r, [out]| {
            let n = self.0.seen(r);
            let (p, g) = (&p[r * keys..r * keys + n], &g[r * keys..r * keys + n]);
            let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
            for ((o, &p), &g) in out.iter_mut().zip(p).zip(g) {
                *o = p * (g - dot);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// RMSNorm over the last dimension, `x / sqrt(mean(x²) + eps) ⊙ alpha`, with a backward pass for `x` (`alpha` is
/// a constant here: the trainer never adapts the norms).
pub fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f64) -> Result<Tensor> {
    let alpha = alpha.flatten_all()?.to_vec1::<f32>()?;
    if x.dims().last() != Some(&alpha.len()) {
        candle_core::bail!("RMSNorm of {:?} with {} weights", x.shape(), alpha.len());
    }
    x.apply_op1(RmsNorm { alpha, eps: eps as f32 })
}

struct RmsNorm {
    alpha: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    /// sqrt(mean(x²) + eps) of one row.
    fn rms(&self, x: &[f32]) -> f32 {
        (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + self.eps).sqrt()
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let k = self.alpha.len();
        if width(layout) != k {
            candle_core::bail!("RMSNorm of {:?} with {k} weights", layout.shape());
        }
        let x = contiguous(storage, layout, "RMSNorm")?;
        let mut y = vec![0f32; x.len()];
        for_rows([&mut y], k, |r, [out]| {
            let x = &x[r * k..(r + 1) * k];
            let s = self.rms(x);
            for ((o, &v), &a) in out.iter_mut().zip(x).zip(&self.alpha) {
                *o = v / s * a;
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    /// With s = sqrt(mean(x²) + eps) and h = g ⊙ alpha: dx = h / s − x · (Σ h ⊙ x) / (k · s³).
    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &RmsNormGrad(self))?))
    }
}

struct RmsNormGrad<'a>(&'a RmsNorm);

impl CustomOp2 for RmsNormGrad<'_> {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let k = self.0.alpha.len();
        if width(l1) != k || l1.shape() != l2.shape() {
            candle_core::bail!("RMSNorm gradient {:?} for {:?} with {k} weights", l2.shape(), l1.shape());
        }
        let (x, g) = (contiguous(s1, l1, "RMSNorm")?, contiguous(s2, l2, "RMSNorm")?);
        let mut dx = vec![0f32; x.len()];
        for_rows([&mut dx], k, |r, [out]| {
            let (x, g) = (&x[r * k..(r + 1) * k], &g[r * k..(r + 1) * k]);
            let s = self.0.rms(x);
            let hx: f32 = x.iter().zip(g).zip(&self.0.alpha).map(|((x, g), a)| g * a * x).sum();
            let c = hx / (k as f32 * s * s * s);
            for (((o, &x), &g), &a) in out.iter_mut().zip(x).zip(g).zip(&self.0.alpha) {
                *o = g * a / s - x * c;
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// SwiGLU's product `silu(g) ⊙ u`, with a backward pass for both.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.shape() != u.shape() {
        candle_core::bail!("SwiGLU of {:?} and {:?}", g.shape(), u.shape());
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
}

struct SwiGlu;

/// silu(v) and σ(v).
fn silu(v: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + (-v).exp());
    (v * s, s)
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (contiguous(s1, l1, "SwiGLU")?, contiguous(s2, l2, "SwiGLU")?);
        if l1.shape() != l2.shape() {
            candle_core::bail!("SwiGLU of {:?} and {:?}", l1.shape(), l2.shape());
        }
        let k = width(l1);
        let mut y = vec![0f32; g.len()];
        for_rows([&mut y], k, |r, [out]| {
            let (g, u) = (&g[r * k..(r + 1) * k], &u[r * k..(r + 1) * k]);
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = silu(g).0 * u;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// dg = grad ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g))), du = grad ⊙ silu(g).
    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = g.apply_op3_no_bwd(u, &grad.contiguous()?, &SwiGluGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// (g, u, grad) → dg and du stacked (shape (2, …)).
struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
            candle_core::bail!("SwiGLU gradient {:?} for {:?} and {:?}", l3.shape(), l1.shape(), l2.shape());
        }
        let (g, u) = (contiguous(s1, l1, "SwiGLU")?, contiguous(s2, l2, "SwiGLU")?);
        let grad = contiguous(s3, l3, "SwiGLU")?;
        let k = width(l1);
        let mut d = vec![0f32; 2 * g.len()];
        let (dg, du) = d.split_at_mut(g.len());
        for_rows([dg, du], k, |r, [dg, du]| {
            let at = r * k..(r + 1) * k;
            let (g, u, grad) = (&g[at.clone()], &u[at.clone()], &grad[at]);
            for i in 0..k {
                let (y, s) = silu(g[i]);
                dg[i] = grad[i] * u[i] * (s + y * (1.0 - s));
                du[i] = grad[i] * y;
            }
        });
        let mut dims = vec![2];
        dims.extend_from_slice(l1.shape().dims());
        Ok((CpuStorage::F32(d), Shape::from(dims)))
    }
}

/// The rotary tables at a packed sequence's positions: `cos[p·half + i]`, `sin[p·half + i]` for token p.
pub struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl RopeTables {
    /// From the tables' rows at the sequence's positions, (t, half).
    pub fn new(cos: &Tensor, sin: &Tensor) -> Result<RopeTables> {
        let half = cos.dim(1)?;
        Ok(RopeTables { cos: cos.flatten_all()?.to_vec1()?, sin: sin.flatten_all()?.to_vec1()?, half })
    }

    fn tokens(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }
}

/// A projection's output `(1, t, n·d)` split into `n` heads of `d`, rotated by the tables and multiplied by
/// `scale`: `(1, n, t, d)`, contiguous. The same as reshaping to heads, transposing, rotating (NeoX's halves, or
/// GGML's adjacent pairs) and scaling, in one pass, with a backward pass.
pub fn rope_heads(x: &Tensor, n: usize, tables: &std::sync::Arc<RopeTables>, neox: bool, scale: f32) -> Result<Tensor> {
    let d = 2 * tables.half;
    let t = tables.tokens();
    if x.dims() != [1, t, n * d] {
        candle_core::bail!("rotary heads of {:?}: not (1, {t}, {n}·{d})", x.shape());
    }
    x.contiguous()?.apply_op1(Rope { tables: tables.clone(), n, neox, scale })
}

struct Rope {
    tables: std::sync::Arc<RopeTables>,
    n: usize,
    neox: bool,
    scale: f32,
}

impl Rope {
    /// `out = R·x·scale` for one head's vector at token `p`, or with `inverse`, `Rᵀ·x·scale` (the gradient).
    fn rotate(&self, p: usize, x: &[f32], out: &mut [f32], inverse: bool) {
        let half = self.tables.half;
        let (cos, sin) = (&self.tables.cos[p * half..(p + 1) * half], &self.tables.sin[p * half..(p + 1) * half]);
        for i in 0..half {
            let (a, b) = if self.neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
            let (c, s) = (cos[i], if inverse { -sin[i] } else { sin[i] });
            out[a] = (x[a] * c - x[b] * s) * self.scale;
            out[b] = (x[a] * s + x[b] * c) * self.scale;
        }
    }
}

impl Rope {
    /// Every head vector of `src` rotated into the other layout: token-major `(1, t, n·d)` → head-major
    /// `(1, n, t, d)`, or with `inverse` (the gradient) rotated back, head-major → token-major.
    fn relayout(&self, src: &[f32], inverse: bool) -> Vec<f32> {
        let (n, d, t) = (self.n, 2 * self.tables.half, self.tables.tokens());
        let mut out = vec![0f32; src.len()];
        for_rows([&mut out], d, |r, [row]| {
            // Head h at token p is row h·t + p head-major and row p·n + h token-major.
            let (h, p) = if inverse { (r % n, r / n) } else { (r / t, r % t) };
            let from = if inverse { h * t + p } else { p * n + h };
            self.rotate(p, &src[from * d..(from + 1) * d], row, inverse);
        });
        out
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-heads"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, d, t) = (self.n, 2 * self.tables.half, self.tables.tokens());
        if layout.shape().elem_count() != t * n * d {
            candle_core::bail!("rotary heads of {:?}: not (1, {t}, {n}·{d})", layout.shape());
        }
        let y = self.relayout(contiguous(storage, layout, "rotary heads")?, false);
        Ok((CpuStorage::F32(y), Shape::from((1, n, t, d))))
    }

    /// The rotation is orthogonal: the gradient is the upstream gradient rotated back (and scaled), in the input's
    /// layout.
    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = RopeGrad(self, x.shape().clone());
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

struct RopeGrad<'a>(&'a Rope, Shape);

impl CustomOp1 for RopeGrad<'_> {
    fn name(&self) -> &'static str {
        "rope-heads-grad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = self.0;
        let (n, d, t) = (op.n, 2 * op.tables.half, op.tables.tokens());
        if layout.shape().dims() != [1, n, t, d] {
            candle_core::bail!("rotary heads' gradient {:?}: not (1, {n}, {t}, {d})", layout.shape());
        }
        let dx = op.relayout(contiguous(storage, layout, "rotary heads")?, true);
        Ok((CpuStorage::F32(dx), self.1.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tune::lora::Rng;
    use candle_core::{Device, Var, D};

    fn random(shape: &[usize], rng: &mut Rng, scale: f32) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Value and gradient (for a random upstream gradient `w`) of `f` at `x`.
    fn value_and_grad(f: impl Fn(&Tensor) -> Result<Tensor>, x: &Tensor, w: &Tensor) -> (Tensor, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let y = f(v.as_tensor()).unwrap();
        let grads = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
        (y, grads.get(v.as_tensor()).unwrap().clone())
    }

    /// The composed version: the span mask (as `finetune` built it), then softmax from candle's ops.
    fn composed_softmax(x: &Tensor, len: usize, shared: usize) -> Result<Tensor> {
        let keys = shared + len;
        let rows = x.dim(D::Minus2)?;
        let m: Vec<f32> =
            (0..rows).flat_map(|r| (0..keys).map(move |j| if j <= shared + r % len { 0f32 } else { -1e9 })).collect();
        let x = x.broadcast_add(&Tensor::from_vec(m, (rows, keys), x.device())?)?;
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    #[test]
    fn the_span_softmax_and_its_gradient_are_the_masked_softmax_s() {
        let mut rng = Rng::new(7);
        // (1, n_kv, n_rep·len, shared + len): a prefix span (shared 0) and a row's span over a prefix.
        for (n_rep, len, shared) in [(3, 5, 0), (2, 4, 6), (1, 1, 9), (4, 33, 0)] {
            let x = random(&[1, 2, n_rep * len, shared + len], &mut rng, 4.0);
            let w = random(&[1, 2, n_rep * len, shared + len], &mut rng, 1.0);
            let (y, gx) = value_and_grad(|x| span_softmax(x, len, shared), &x, &w);
            let (y0, gx0) = value_and_grad(|x| composed_softmax(x, len, shared), &x, &w);
            assert!(max_diff(&y, &y0) < 1e-6, "values ({n_rep}, {len}, {shared})");
            assert!(max_diff(&gx, &gx0) < 1e-6, "gradients ({n_rep}, {len}, {shared})");
            // What a row may not see is an exact zero, and every row sums to 1.
            let p = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let keys = shared + len;
            for (r, row) in p.chunks(keys).enumerate() {
                let seen = shared + r % len + 1;
                assert!(row[seen..].iter().all(|&v| v == 0.0), "row {r} sees only its first {seen} keys");
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn rms_norm_and_its_gradient_are_the_composed_ones() {
        let mut rng = Rng::new(3);
        let alpha = random(&[48], &mut rng, 2.0);
        let composed = |x: &Tensor| -> Result<Tensor> {
            let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
            x.broadcast_div(&(ms + 1e-6)?.sqrt()?)?.broadcast_mul(&alpha)
        };
        let x = random(&[1, 7, 48], &mut rng, 3.0);
        let w = random(&[1, 7, 48], &mut rng, 1.0);
        let (y, gx) = value_and_grad(|x| rms_norm(x, &alpha, 1e-6), &x, &w);
        let (y0, gx0) = value_and_grad(composed, &x, &w);
        assert!(max_diff(&y, &y0) < 1e-5);
        assert!(max_diff(&gx, &gx0) < 1e-5);
    }

    #[test]
    fn swiglu_and_its_gradients_are_the_composed_ones() {
        let mut rng = Rng::new(5);
        let (g, u) = (random(&[1, 6, 40], &mut rng, 6.0), random(&[1, 6, 40], &mut rng, 2.0));
        let w = random(&[1, 6, 40], &mut rng, 1.0);
        let grads = |f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| {
            let (vg, vu) = (Var::from_tensor(&g).unwrap(), Var::from_tensor(&u).unwrap());
            let y = f(vg.as_tensor(), vu.as_tensor()).unwrap();
            let gr = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (y, gr.get(vg.as_tensor()).unwrap().clone(), gr.get(vu.as_tensor()).unwrap().clone())
        };
        let (y, dg, du) = grads(&|g, u| swiglu(g, u));
        let (y0, dg0, du0) = grads(&|g, u| g.silu()? * u);
        assert!(max_diff(&y, &y0) < 1e-5);
        assert!(max_diff(&dg, &dg0) < 1e-5);
        assert!(max_diff(&du, &du0) < 1e-5);
    }

    #[test]
    fn rotary_heads_and_their_gradient_are_the_composed_ones() {
        let mut rng = Rng::new(11);
        let (t, n, d) = (5, 3, 8);
        let (cos, sin) = crate::engine::model::rope_tables(d, 10_000.0, 9, &Device::Cpu).unwrap();
        // A packed sequence's positions: a prefix 0..3, then a row's own tokens at 3, 4 again.
        let at = Tensor::new(&[0u32, 1, 2, 3, 4][..], &Device::Cpu).unwrap();
        let (cos, sin) = (cos.index_select(&at, 0).unwrap(), sin.index_select(&at, 0).unwrap());
        let tables = std::sync::Arc::new(RopeTables::new(&cos, &sin).unwrap());
        for neox in [true, false] {
            let x = random(&[1, t, n * d], &mut rng, 2.0);
            let w = random(&[1, n, t, d], &mut rng, 1.0);
            let composed = |x: &Tensor| -> Result<Tensor> {
                let h = x.reshape((1, t, n, d))?.transpose(1, 2)?.contiguous()?;
                let r = if neox {
                    candle_nn::rotary_emb::rope(&h, &cos, &sin)?
                } else {
                    candle_nn::rotary_emb::rope_i(&h, &cos, &sin)?
                };
                r * 0.5
            };
            let y0 = composed(&x).unwrap();
            let (y, gx) = value_and_grad(|x| rope_heads(x, n, &tables, neox, 0.5), &x, &w);
            assert_eq!(y.dims(), &[1, n, t, d]);
            assert!(max_diff(&y, &y0) < 1e-5, "values, neox {neox}");
            // The rotation is orthogonal: the gradient is w rotated back, in x's layout; check it against finite
            // differences of Σ w ⊙ y.
            let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let g = gx.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in [0, 7, 13, 29, xv.len() - 1] {
                let at = |e: f32| {
                    let mut v = xv.clone();
                    v[i] += e;
                    let x = Tensor::from_vec(v, (1, t, n * d), &Device::Cpu).unwrap();
                    (composed(&x).unwrap() * &w).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
                };
                let numeric = (at(1e-2) - at(-1e-2)) / 2e-2;
                assert!((numeric - g[i]).abs() < 1e-3, "gradient {i}: {} vs {numeric}", g[i]);
            }
        }
        assert!(rope_heads(&random(&[1, t, n * d + 1], &mut rng, 1.0), n, &tables, true, 1.0).is_err());
        assert!(rope_heads(&random(&[1, t + 1, n * d], &mut rng, 1.0), n, &tables, true, 1.0).is_err());
    }

    #[test]
    fn bad_shapes_are_refused() {
        let x = Tensor::zeros((1, 2, 6, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(span_softmax(&x, 3, 1).is_err(), "5 keys are not 1 shared + 3 own");
        assert!(span_softmax(&x, 4, 1).is_err(), "6 rows are not whole spans of 4");
        assert!(span_softmax(&x, 0, 5).is_err());
        let flat = Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(span_softmax(&flat, 4, 1).is_err(), "one dimension has no rows");
        assert!(rms_norm(&x, &Tensor::ones(4, candle_core::DType::F32, &Device::Cpu).unwrap(), 1e-6).is_err());
        let u = Tensor::zeros((1, 2, 6, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(swiglu(&x, &u).is_err());
    }
}
