//! The cost of decoding several rows in one pass over the weights (`Transformer::step_many`) against the same rows
//! decoded one pass each, on a GGUF file: the measurement behind `copilot.candidates` (and, later, speculative
//! verification and sessions decoded together).
//!
//! A `PROMPT`-token prompt is prefilled once; then, for each k in `KS`, k rows continue it for `GEN` steps, once as
//! one k-row pass per step and once as k single-row passes per step (the same tokens, the same K/V states), in
//! alternating rounds. Prints one JSON object: per k, ms per step both ways, ms per token both ways, and their
//! ratio; and whether both ways chose the same greedy tokens.
//!
//! `cargo run --release -p copilot-core --example bench_batch -- MODEL.gguf [PROMPT] [GEN] [THREADS] [ROUNDS] [KS]`
//!
//! With `COPILOT_BENCH_BATCHED_ONLY=1` the single-row passes are skipped (for profiling the multi-row pass alone);
//! their fields are then 0 and `same_greedy_tokens` is not compared.
use candle_core::quantized::gguf_file;
use candle_core::Device;
use copilot_core::engine::model::{Config, KvCache, Rows, Transformer};
use copilot_core::engine::runtime::configure_threads;
use copilot_core::engine::sample::argmax;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 {
        eprintln!("usage: bench_batch MODEL.gguf [PROMPT_TOKENS] [GEN_STEPS] [THREADS] [ROUNDS] [ROWS,ROWS,…]");
        std::process::exit(2);
    }
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n_prompt, n_gen, threads, rounds) = (arg(2, 256), arg(3, 32), arg(4, 2), arg(5, 3));
    // The numbers of rows decoded together (default 1, 2, 4, 8).
    let levels: Vec<usize> = match args.get(6) {
        Some(s) => s.split(',').map(|k| k.trim().parse().expect("rows: a comma-separated list of counts")).collect(),
        None => vec![1, 2, 4, 8],
    };
    let batched_only = std::env::var("COPILOT_BENCH_BATCHED_ONLY").is_ok_and(|v| v == "1");
    // SAFETY: first thing in main, before any thread exists.
    unsafe { configure_threads(threads) };
    let mut file = std::fs::File::open(&args[1]).expect("open model");
    let ct = gguf_file::Content::read(&mut file).expect("read GGUF");
    let cfg = Config::from_gguf(&ct).expect("config");
    let model = Transformer::from_gguf(cfg, &ct, &mut file, &Device::Cpu, n_prompt + n_gen + 8).expect("load");
    model.prepare(threads).expect("prepare");
    let tokens: Vec<u32> = (0..n_prompt as u32).map(|i| 1000 + (i * 7919) % 20000).collect();
    let mut kv0 = KvCache::new();
    let logits = model.forward(&tokens, &mut kv0).expect("prefill").to_vec1::<f32>().expect("logits");
    let first = argmax(&logits);

    let mut results = Vec::new();
    let mut same_tokens = true;
    for k in levels {
        let (mut batched_ms, mut single_ms) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            // Row r starts from a different token so the rows really differ; each then continues greedily.
            let starts: Vec<u32> = (0..k as u32).map(|r| (first + 97 * r) % 20000 + 1000).collect();
            let run = |batched: bool| -> (f64, Vec<Vec<u32>>) {
                let mut kvs: Vec<KvCache> = vec![kv0.clone(); k];
                let mut next: Vec<[u32; 1]> = starts.iter().map(|&t| [t]).collect();
                let mut chosen = vec![Vec::new(); k];
                let t = Instant::now();
                for _ in 0..n_gen {
                    let out: Vec<Vec<f32>> = if batched {
                        let mut seqs: Vec<Rows> =
                            kvs.iter_mut().zip(&next).map(|(kv, t)| Rows { cache: kv, tokens: t }).collect();
                        model.step_many(&mut seqs).expect("step")
                    } else {
                        kvs.iter_mut()
                            .zip(&next)
                            .map(|(kv, t)| model.forward(t, kv).expect("step").to_vec1::<f32>().expect("logits"))
                            .collect()
                    };
                    for (r, l) in out.iter().enumerate() {
                        next[r] = [argmax(l)];
                        chosen[r].push(next[r][0]);
                    }
                }
                (t.elapsed().as_secs_f64() * 1000.0 / n_gen as f64, chosen)
            };
            let (b, tb) = run(true);
            let (s, ts) = if batched_only { (0.0, tb.clone()) } else { run(false) };
            same_tokens &= tb == ts;
            batched_ms.push(b);
            single_ms.push(s);
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let (b, s) = (med(&mut batched_ms), med(&mut single_ms));
        results.push(format!(
            "{{\"k\": {k}, \"batched_ms_per_step\": {b:.2}, \"single_ms_per_step\": {s:.2}, \
             \"batched_ms_per_token\": {:.2}, \"single_ms_per_token\": {:.2}, \"speedup\": {:.3}}}",
            b / k as f64,
            s / k as f64,
            s / b
        ));
    }
    println!(
        "{{\"prompt_tokens\": {n_prompt}, \"gen_steps\": {n_gen}, \"threads\": {threads}, \"rounds\": {rounds}, \
         \"batched_only\": {batched_only}, \"same_greedy_tokens\": {same_tokens}, \"levels\": [{}]}}",
        results.join(", ")
    );
}
