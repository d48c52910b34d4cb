//! Benchmark (not a test): candidates decoded with twin rows run once a pass against each row run on its own.
//! `bench_twins MODEL.gguf SCHEMA.sql QUESTIONS.txt [threads] [rounds] [candidates]` asks every question (one a line)
//! with `candidates` rows (the greedy one and sampled ones, the engine's default sampling and drafts), both ways in
//! alternating order per round, and prints one JSON line: decode seconds per way (the median round), the share of
//! decoded tokens a twin's row computed, and whether both ways gave every candidate the same text.
use copilot_core::engine::backend::{Backend, GenerateRequest, Sampling};
use copilot_core::engine::runtime::{configure_threads, LoadOptions, Runtime};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: bench_twins MODEL.gguf SCHEMA.sql QUESTIONS.txt [THREADS] [ROUNDS] [CANDIDATES]");
        std::process::exit(2);
    }
    let arg = |i: usize, d: usize| args.get(i).and_then(|t| t.parse().ok()).unwrap_or(d);
    // SAFETY: first thing in main, before any thread exists.
    unsafe { configure_threads(arg(4, 2)) };
    let (rounds, candidates) = (arg(5, 3), arg(6, 4));
    let schema = std::fs::read_to_string(&args[2]).expect("read schema file");
    let questions: Vec<String> = std::fs::read_to_string(&args[3])
        .expect("read questions")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    let mut rt = Runtime::load(std::path::Path::new(&args[1]), &LoadOptions::default()).expect("load model");
    rt.set_prefix_cache_bytes(256 << 20);
    let mut decode = [Vec::new(), Vec::new()];
    let mut texts: [Vec<Vec<String>>; 2] = [Vec::new(), Vec::new()];
    let (mut rows, mut twins) = (0usize, 0usize);
    for round in 0..rounds {
        let order = if round % 2 == 0 { [false, true] } else { [true, false] };
        for share in order {
            rt.set_share_twins(share);
            let mut seconds = 0.0;
            let mut got = Vec::new();
            for q in &questions {
                let req = GenerateRequest {
                    schema_context: schema.clone(),
                    question: q.clone(),
                    max_new_tokens: 128,
                    sampling: Sampling { candidates, ..Sampling::default() },
                    ..Default::default()
                };
                let g = rt.generate(&req, &|| false).expect("generate");
                seconds += g.decode_s;
                got.push(g.candidates().into_iter().map(|c| c.text).collect::<Vec<_>>());
                if share {
                    rows += g.decoded_rows;
                    twins += g.twin_rows;
                }
            }
            decode[usize::from(share)].push(seconds);
            texts[usize::from(share)] = got;
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (each, once) = (median(&mut decode[0]), median(&mut decode[1]));
    println!(
        "{}",
        serde_json::json!({
            "questions": questions.len(),
            "candidates": candidates,
            "rounds": rounds,
            "decode_s_each_row_its_own": each,
            "decode_s_twins_once": once,
            "speedup": each / once,
            "twin_share_of_decoded_tokens": twins as f64 / rows.max(1) as f64,
            "same_candidates": texts[0] == texts[1],
        })
    );
}
