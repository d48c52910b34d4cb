//! `e^x` in plain arithmetic the compiler vectorizes, for the loops that take an exponential per value: SwiGLU
//! (9 k values per row and layer of the default model), the attention softmax (one per position and head) and the
//! chosen token's probability (one per vocabulary entry, 152 k per generated token).
//!
//! Why not `f32::exp`: it is a call into libm per value, so those loops ran one value at a time — on the
//! calling thread, while the pool's other thread waited at its next barrier. Written out as below the same
//! loops run 8 values per instruction (AVX2) with no call.
//!
//! Why a crate of its own: unoptimised, this arithmetic is slower than libm's call (measured: 2–4× slower at
//! opt-level 0), and copilot-core is built at opt-level 0 in dev and test builds. The loops are therefore
//! functions of this crate (not `#[inline]`: they are compiled here, at the opt-level the workspace's
//! `[profile.dev.package.copilot-fastmath]` gives), and callers pass slices.
//!
//! [`dot`] and [`axpy`] (a decoding step's attention, unoptimised 3–4 % of a debug-built test's time) and
//! [`q4_1`] are here for the same reason; `q4_1` is the Q4_1 product (the CI's tiny model), which candle computes
//! one block at a time, by vector instructions with candle's bits.

pub mod q4_1;

/// `e^x`, to within 2e-7 relative error of the exact value over the normal range of `f32` (the error of Cephes'
/// `expf`, whose reduction and polynomial this is): `x = n·ln 2 + r` with `n` a whole number and `|r| ≤ ln 2 / 2`,
/// `e^r` by a degree-6 polynomial, `2^n` written straight into the exponent bits. `n` is rounded by adding
/// 1.5·2²³ (the float's own rounding to nearest), so no float → int conversion is needed. Inputs are clamped to
/// [-87.3, 88.3], where `e^x` and `2^n` are normal floats: below, the result is ~1.2e-38 instead of a subnormal
/// or 0; above, ~2.2e38 instead of infinity. NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it leaves round(y) in the low mantissa bits
    const LN2_HI: f32 = 0.693_359_4; // ln 2 = LN2_HI + LN2_LO, the high part exact in few bits
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001e-1, which is 0.5 as an f32
    let e_r = p * r * r + r + 1.0;
    // t's bits are ROUND's plus n (|n| ≤ 127 leaves the exponent field alone); 2^n has exponent field n + 127.
    let two_n = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    e_r * two_n
}

/// Σ x over a slice, in 8 independent lanes (one accumulator would serialize every add and stop vectorization).
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let c = x.chunks_exact(8);
    let tail: f32 = c.remainder().iter().sum();
    for v in c {
        for l in 0..8 {
            acc[l] += v[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ a·b over equal-length slices, in 8 independent lanes (the compiler vectorizes it; one accumulator would
/// serialize every add). The engine's attention scores and RMSNorm (`engine::decode`).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `out += p · v`, elementwise (attention's weighted sum of values).
pub fn axpy(out: &mut [f32], p: f32, v: &[f32]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o += p * x;
    }
}

/// `g = silu(g) · u = g / (1 + e^−g) · u`, elementwise (SwiGLU).
pub fn swiglu(g: &mut [f32], u: &[f32]) {
    for (g, u) in g.iter_mut().zip(u) {
        *g = *g / (1.0 + exp(-*g)) * u;
    }
}

/// `x = e^(x − max)` in place; returns Σ of the results (a softmax's numerators and denominator).
pub fn exp_sub_sum(x: &mut [f32], max: f32) -> f32 {
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    sum(x)
}

/// Σ e^(x − max) over a slice, computed in pieces of 1,024 values summed in `f32` lanes (each term is at most 1
/// when `max` is the slice's maximum) and the pieces added in `f64`: a softmax's denominator over a vocabulary.
pub fn sum_exp(x: &[f32], max: f32) -> f64 {
    let mut buf = [0f32; 1024];
    x.chunks(1024)
        .map(|c| {
            let b = &mut buf[..c.len()];
            b.copy_from_slice(c);
            f64::from(exp_sub_sum(b, max))
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_2e7_of_libm_over_the_normal_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn exp_stays_finite_and_positive_past_the_range_and_keeps_nan() {
        for x in [-1e30f32, -1000.0, -88.0, f32::NEG_INFINITY] {
            let e = exp(x);
            assert!(e > 0.0 && e < 2e-38, "exp({x}) = {e}");
        }
        for x in [89.0f32, 1000.0, f32::INFINITY] {
            let e = exp(x);
            assert!(e.is_finite() && e > 1e38, "exp({x}) = {e}");
        }
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn swiglu_and_softmax_numerators_match_their_libm_formulas() {
        let g0: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.11).sin() * 12.0).collect();
        let u: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.07).cos()).collect();
        let mut g = g0.clone();
        swiglu(&mut g, &u);
        for ((got, x), u) in g.iter().zip(&g0).zip(&u) {
            let want = x / (1.0 + (-x).exp()) * u;
            assert!((got - want).abs() <= 1e-6 * want.abs().max(1e-3), "silu({x})·{u}: {got} vs {want}");
        }
        let mut s = g0.clone();
        let max = g0.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z = exp_sub_sum(&mut s, max);
        let want: f64 = g0.iter().map(|&v| f64::from(v - max).exp()).sum();
        assert!((f64::from(z) - want).abs() <= 1e-5 * want, "{z} vs {want}");
        for (got, x) in s.iter().zip(&g0) {
            assert!((f64::from(*got) - f64::from(x - max).exp()).abs() <= 1e-6, "e^({x} - {max})");
        }
    }

    #[test]
    fn sums_match_a_plain_f64_sum_at_every_length() {
        for n in [0usize, 1, 7, 8, 9, 1023, 1024, 1025, 5000] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
            let plain: f64 = x.iter().map(|&v| f64::from(v)).sum();
            assert!((f64::from(sum(&x)) - plain).abs() < 1e-3, "sum, n = {n}");
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let want: f64 = x.iter().map(|&v| f64::from(v - max).exp()).sum();
            let got = sum_exp(&x, max);
            assert!((got - want).abs() <= 1e-6 * want.max(1.0), "sum_exp, n = {n}: {got} vs {want}");
        }
    }
}
