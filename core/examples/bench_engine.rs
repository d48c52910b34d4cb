//! Prefill and decode speed of our runtime on a GGUF file, measured the way llama.cpp's `llama-bench` measures
//! (so `scripts/bench-engine` can put the two side by side):
//! - prefill: `PROMPT` tokens in one forward pass from an empty KV cache, tokens/s;
//! - decode: `GEN` single-token forward passes from an empty KV cache, tokens/s.
//!
//! Each is repeated `REPS` times after one warm-up; prints one JSON object with the means and standard deviations.
//! `COPILOT_KERNELS=candle` measures candle's matmuls alone (our decode kernels off), for comparison;
//! `COPILOT_PREFILL=candle` keeps our decode kernels but runs prompts on candle's tiled matmul (the layout before
//! prompts moved to our kernels, which keeps a second copy of the weights).
//!
//! Also reports the process's resident size (`/proc/self/status`) after the load and at the end, and its peak.
//!
//! `cargo run --release -p copilot-core --example bench_engine -- MODEL.gguf [PROMPT] [GEN] [THREADS] [REPS]`
use candle_core::quantized::gguf_file;
use candle_core::Device;
use copilot_core::engine::model::{Config, KvCache, Transformer};
use copilot_core::engine::runtime::configure_threads;
use std::time::Instant;

fn stats(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 {
        eprintln!("usage: bench_engine MODEL.gguf [PROMPT_TOKENS] [GEN_TOKENS] [THREADS] [REPS]");
        std::process::exit(2);
    }
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n_prompt, n_gen, threads, reps) = (arg(2, 342), arg(3, 64), arg(4, 2), arg(5, 3));
    // SAFETY: first thing in main, before any thread exists.
    unsafe { configure_threads(threads) };
    let t0 = Instant::now();
    let mut file = std::fs::File::open(&args[1]).expect("open model");
    let ct = gguf_file::Content::read(&mut file).expect("read GGUF");
    let cfg = Config::from_gguf(&ct).expect("config");
    let mut model = Transformer::from_gguf(cfg, &ct, &mut file, &Device::Cpu, n_prompt + n_gen + 8).expect("load");
    if std::env::var("COPILOT_KERNELS").as_deref() == Ok("candle") {
        model.set_own_kernels(false);
    }
    if std::env::var("COPILOT_PREFILL").as_deref() == Ok("candle") {
        model.set_own_prefill(false);
    }
    // As the runtime loads (the first prompt's weight rewrite done at load, in parallel).
    model.prepare(threads).expect("prepare");
    let load_s = t0.elapsed().as_secs_f64();
    let rss_load = status_mb("VmRSS");
    // Token ids that are ordinary text in every vocabulary we serve (llama-bench uses random ids; the work per
    // token does not depend on which).
    let tokens: Vec<u32> = (0..n_prompt as u32).map(|i| 1000 + (i * 7919) % 20000).collect();

    let mut prefill = Vec::new();
    let mut first_prefill_s = 0.0;
    for r in 0..=reps {
        let mut kv = KvCache::new();
        let t = Instant::now();
        model.forward(&tokens, &mut kv).expect("prefill");
        if r == 0 {
            first_prefill_s = t.elapsed().as_secs_f64();
        }
        if r > 0 {
            prefill.push(n_prompt as f64 / t.elapsed().as_secs_f64());
        }
    }
    let mut decode = Vec::new();
    for r in 0..=reps {
        let mut kv = KvCache::new();
        let mut tok = 1000u32;
        let t = Instant::now();
        for _ in 0..n_gen {
            let logits = model.forward(&[tok], &mut kv).expect("decode");
            tok = copilot_core::engine::model::argmax(&logits).expect("argmax");
        }
        if r > 0 {
            decode.push(n_gen as f64 / t.elapsed().as_secs_f64());
        }
    }
    let (p, ps) = stats(&prefill);
    let (d, ds) = stats(&decode);
    let file_mb = std::fs::metadata(&args[1]).map(|m| m.len() as f64 / 1048576.0).unwrap_or(0.0);
    let (rss_end, rss_peak) = (status_mb("VmRSS"), status_mb("VmHWM"));
    println!(
        "{{\"kernels\": \"{}\", \"prefill_kernels\": \"{}\", \"prompt_tokens\": {n_prompt}, \"gen_tokens\": {n_gen}, \"threads\": {threads}, \"reps\": {reps}, \
         \"load_s\": {load_s:.3}, \"first_prefill_s\": {first_prefill_s:.3}, \"prefill_tok_s\": {p:.2}, \"prefill_tok_s_sd\": {ps:.2}, \
         \"decode_tok_s\": {d:.2}, \"decode_tok_s_sd\": {ds:.2}, \"model_file_mb\": {file_mb:.1}, \"rss_after_load_mb\": {rss_load:.1}, \
         \"rss_end_mb\": {rss_end:.1}, \"rss_peak_mb\": {rss_peak:.1}}}",
        if model.own_kernels() { "copilot" } else { "candle" },
        if model.prefill_on_own_kernels() { "copilot" } else { "candle" }
    );
}

/// A `/proc/self/status` size field (`VmRSS`, `VmHWM`) in MiB; 0 where there is no such file (not Linux).
fn status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}
