//! What the exponentials of one generated token cost, libm's `f32::exp`/`f64::exp` (as the engine computed them
//! until 2026-12-06) against [`fastmath`] (as it computes them now), on this machine, one thread:
//! - the chosen token's probability over the default model's 151,936 logits (`sample::token_prob`, once per row and
//!   generated token);
//! - SwiGLU over 8,960 values in each of 28 layers (`fastmath::swiglu`; a prompt pays the same per token);
//! - the attention softmax over 500 positions for 12 heads in each of 28 layers (`fastmath::exp_sub_sum` in
//!   `decode::attend_rows`).
//!
//! The fast side calls the engine's own functions; the libm side is the code they replaced.
//!
//! Prints one JSON object per round (milliseconds per generated token).
//! `cargo run --release -p copilot-core --example bench_fastmath --no-default-features [ROUNDS]`
use copilot_core::engine::fastmath;
use std::hint::black_box;
use std::time::Instant;

fn token_prob_libm(logits: &[f32], token: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    (f64::from(logits[token] - max).exp() / total) as f32
}

fn token_prob_fast(logits: &[f32], token: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (f64::from(fastmath::exp(logits[token] - max)) / fastmath::sum_exp(logits, max)) as f32
}

fn swiglu_libm(g: &mut [f32], u: &[f32]) {
    for (g, u) in g.iter_mut().zip(u) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

fn softmax_libm(s: &mut [f32], max: f32) -> f32 {
    let mut z = 0f32;
    for s in s.iter_mut() {
        *s = (*s - max).exp();
        z += *s;
    }
    z
}

/// Milliseconds per call of `f`, over `n` calls.
fn ms(n: usize, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_secs_f64() * 1e3 / n as f64
}

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let logits: Vec<f32> = (0..151_936).map(|i| (i as f32 * 0.37).sin() * 8.0).collect();
    let g0: Vec<f32> = (0..8960).map(|i| (i as f32 * 0.11).sin() * 4.0).collect();
    let u: Vec<f32> = (0..8960).map(|i| (i as f32 * 0.07).cos()).collect();
    let s0: Vec<f32> = (0..500).map(|i| (i as f32 * 0.13).sin() * 3.0).collect();
    let (mut g, mut s) = (g0.clone(), s0.clone());
    let n = 200;
    for round in 1..=rounds {
        let prob = [
            ms(n, || {
                black_box(token_prob_libm(black_box(&logits), 7));
            }),
            ms(n, || {
                black_box(token_prob_fast(black_box(&logits), 7));
            }),
        ];
        let mut swiglu = [0.0; 2];
        for (i, f) in [swiglu_libm as fn(&mut [f32], &[f32]), fastmath::swiglu].into_iter().enumerate() {
            swiglu[i] = 28.0
                * ms(n, || {
                    g.copy_from_slice(&g0);
                    f(black_box(&mut g), &u);
                });
        }
        let mut softmax = [0.0; 2];
        for (i, f) in [softmax_libm as fn(&mut [f32], f32) -> f32, fastmath::exp_sub_sum].into_iter().enumerate() {
            softmax[i] = 28.0
                * 12.0
                * ms(n, || {
                    s.copy_from_slice(&s0);
                    black_box(f(black_box(&mut s), 3.0));
                });
        }
        let r = |x: f64| (x * 1000.0).round() / 1000.0;
        println!(
            "{{\"round\": {round}, \"token_prob_ms\": {{\"libm\": {}, \"fast\": {}}}, \"swiglu_28_layers_ms\": {{\"libm\": {}, \
             \"fast\": {}}}, \"softmax_28x12x500_ms\": {{\"libm\": {}, \"fast\": {}}}}}",
            r(prob[0]),
            r(prob[1]),
            r(swiglu[0]),
            r(swiglu[1]),
            r(softmax[0]),
            r(softmax[1])
        );
    }
}
