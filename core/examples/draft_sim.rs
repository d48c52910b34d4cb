//! Offline: how many passes drafts would take on a model's recorded answers, without running the model. Reads an
//! evaluation's answers (`reports/eval/RUN.asked.jsonl`, in the order asked), tokenizes each with the model's
//! tokenizer (plus the end token) and replays greedy decoding as the runtime does: after every chosen token a draft
//! is proposed and kept as far as it matches the recorded answer. The prompt is not replayed (drafts from the
//! answer so far and from [`History`] only), so it measures what the history adds, not prompt lookup.
//! Prints tokens per pass, the share of drafted tokens kept and the speed-up a pass of `1 + r·drafted` costs
//! implies, for a row costing `ROW_SHARE` of a pass (0.25 measured on a 2-core Zen 3, ~0.1 on a Xeon at 11 GB/s).
//!
//! `cargo run --release -p copilot-core --example draft_sim -- MODEL.gguf ANSWERS.asked.jsonl [ROW_SHARE]`
use copilot_core::engine::draft::{lookup, DraftPolicy, History};
use std::io::BufRead;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: draft_sim MODEL.gguf ANSWERS.asked.jsonl [ROW_SHARE]");
        std::process::exit(2);
    }
    let model = std::path::Path::new(&args[1]);
    let mut f = std::fs::File::open(model).expect("model");
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).expect("gguf");
    let tok = copilot_core::engine::tokenizer::load(model, &ct).expect("tokenizer");
    let end = tok.token_to_id("<|im_end|>").or_else(|| tok.token_to_id("</s>")).expect("an end token");
    let r: f64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0.25);
    let answers: Vec<Vec<u32>> = std::io::BufReader::new(std::fs::File::open(&args[2]).expect("answers"))
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l.ok()?).ok()?;
            let mut ids = tok.encode(v["prediction"].as_str()?, false).ok()?.get_ids().to_vec();
            ids.push(end);
            Some(ids)
        })
        .collect();
    let steps: usize = answers.iter().map(|a| a.len() - 1).sum();
    println!("{} answers, {steps} tokens after the first, row share {r}", answers.len());
    let lookup_only = DraftPolicy { tokens: 8, min_ngram: 1, adapt: false, history: false };
    for (name, with_history) in [("answer lookup, 8 tokens", false), ("history (adaptive)", true)] {
        let mut history = History::default();
        let (mut passes, mut cost, mut drafted, mut kept) = (0usize, 0f64, 0usize, 0usize);
        for a in &answers {
            // The first token comes with the prompt's pass; each later pass carries the chosen token and a draft.
            // Tokens are learned as they are chosen (the runtime does so before drafting the next ones).
            let mut i = 1;
            let mut learned = 0;
            while i < a.len() {
                for j in learned..i {
                    history.learn(&[], &a[..j], a[j]);
                }
                learned = i;
                let d = if with_history {
                    history.draft(&[], &a[..i], 8.min(a.len() - i), r).map(|d| d.0)
                } else {
                    lookup(&[], &a[..i], lookup_only, a.len() - i).map(|d| d.0)
                }
                .unwrap_or_default();
                let ok = d.iter().zip(&a[i..]).take_while(|(x, y)| x == y).count();
                passes += 1;
                cost += 1.0 + r * d.len() as f64;
                drafted += d.len();
                kept += ok;
                i += 1 + ok;
            }
            for j in learned..a.len() - 1 {
                history.learn(&[], &a[..j], a[j]);
            }
        }
        println!(
            "{name:24} passes {passes:6}  tokens/pass {:.2}  kept share {:.2}  speed-up {:.2}x",
            steps as f64 / passes as f64,
            kept as f64 / drafted.max(1) as f64,
            steps as f64 / cost
        );
    }
}
