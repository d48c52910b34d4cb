//! `copilot-trainer bench-decode`: what speculative decoding (prompt-lookup drafts, [`copilot_core::engine::draft`])
//! does to decoding real SQL answers — Spider questions with their rendered schema, through core's runtime, once per
//! draft policy. The policies take turns (the first question runs them in the given order, the next one rotated by
//! one, …) so that drift in the machine hits them alike, and every answer is compared with the one decoded without
//! drafts: all candidates, token for token. Prints one JSON object; `scripts/bench-speculative` adds the machine
//! and writes the report.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use copilot_core::engine::backend::{Backend, GenerateRequest, Generation, Sampling};
use copilot_core::engine::draft::{DraftPolicy, DraftStats, History};
use copilot_core::engine::runtime::{LoadOptions, Runtime};
use serde_json::json;
use std::path::PathBuf;

use crate::spider;

#[derive(Args, Debug)]
pub struct BenchDecodeArgs {
    /// The GGUF to decode with.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "../shared/data/spider")]
    pub spider: PathBuf,
    /// Databases whose dev questions are asked (repeat); the first `--per-db` questions of each, in file order.
    #[arg(long = "db", required = true)]
    pub dbs: Vec<String>,
    #[arg(long, default_value_t = 20)]
    pub per_db: usize,
    /// Draft policies to compare, `TOKENS:MIN_NGRAM` (the default kind: from the engine's history of answers, else
    /// by lookup, cut to what pays on this machine), `TOKENS:MIN_NGRAM:lookup` (lookup only, cut to what pays) or
    /// `TOKENS:MIN_NGRAM:fixed` (every lookup drafted in full) (repeat); no drafts is always measured too. Each
    /// policy keeps its own history (of the questions before; the same answers, since every policy decodes the
    /// same tokens).
    #[arg(long = "policy", value_parser = parse_policy)]
    pub policies: Vec<DraftPolicy>,
    /// Answers decoded together per question (1 = the greedy answer only).
    #[arg(long, default_value_t = 1)]
    pub candidates: usize,
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Memory for the schema-prefix cache (0 = off: every prompt pass runs in full).
    #[arg(long, default_value_t = 256)]
    pub prefix_cache_mb: usize,
}

fn parse_policy(s: &str) -> Result<DraftPolicy, String> {
    let (t, n) = s.split_once(':').ok_or_else(|| format!("{s:?}: expected TOKENS:MIN_NGRAM, e.g. 6:2"))?;
    let (n, adapt, history) = match n.split_once(':') {
        None => (n, true, true),
        Some((n, "lookup")) => (n, true, false),
        Some((n, "fixed")) => (n, false, false),
        Some((_, x)) => return Err(format!("{s:?}: {x:?} — the third part can only be \"lookup\" or \"fixed\"")),
    };
    let tokens = t.trim().parse().map_err(|e| format!("{s:?}: tokens: {e}"))?;
    let min_ngram: usize = n.trim().parse().map_err(|e| format!("{s:?}: min n-gram: {e}"))?;
    if min_ngram == 0 {
        return Err(format!("{s:?}: the shortest match is at least one token"));
    }
    Ok(DraftPolicy { tokens, min_ngram, adapt, history })
}

struct Tally {
    policy: DraftPolicy,
    tokens: usize,
    decode_s: f64,
    prefill_s: f64,
    per_question_tok_s: Vec<f64>,
    draft: DraftStats,
    differing: Vec<usize>,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn run(args: &BenchDecodeArgs) -> Result<()> {
    // SAFETY: first thing in the command, before any thread (candle's pools, loaded with the model) exists.
    unsafe { copilot_core::engine::runtime::configure_threads(args.threads) };
    let mut policies = vec![DraftPolicy::OFF];
    policies.extend(args.policies.iter().filter(|p| p.tokens > 0));
    if policies.len() < 2 {
        bail!("give at least one --policy with drafts (e.g. --policy 6:2)");
    }
    let path = copilot_core::engine::source::resolve(&args.model.to_string_lossy(), true)?;
    let opts = LoadOptions { max_context: 8192, prefix_cache_bytes: args.prefix_cache_mb << 20, ..Default::default() };
    let mut rt = Runtime::load(&path, &opts)?;
    let dev = spider::load_dev(&args.spider)?;
    let mut contexts = spider::Contexts::new(&args.spider);
    let mut questions = Vec::new();
    for db in &args.dbs {
        let mine: Vec<_> = dev.iter().filter(|e| &e.db_id == db).take(args.per_db).collect();
        if mine.is_empty() {
            bail!("no dev questions on database {db:?}");
        }
        questions.extend(mine);
    }
    let mut tallies: Vec<Tally> = policies
        .iter()
        .map(|&policy| Tally {
            policy,
            tokens: 0,
            decode_s: 0.0,
            prefill_s: 0.0,
            per_question_tok_s: Vec::new(),
            draft: DraftStats::default(),
            differing: Vec::new(),
        })
        .collect();
    let mut histories: Vec<History> = vec![History::default(); policies.len()];
    let same = |a: &Generation, b: &Generation| a.text == b.text && a.stop == b.stop && a.samples == b.samples;
    for (qi, ex) in questions.iter().enumerate() {
        let ctx = contexts.get(&ex.db_id)?.1.clone();
        let mut req = GenerateRequest {
            schema_context: ctx,
            question: ex.question.clone(),
            max_new_tokens: args.max_new_tokens,
            sampling: Sampling { candidates: args.candidates, ..Sampling::default() },
            ..Default::default()
        };
        let mut outs: Vec<Option<Generation>> = vec![None; policies.len()];
        for k in 0..policies.len() {
            let pi = (qi + k) % policies.len();
            req.sampling.draft = policies[pi];
            rt.set_draft_history(std::mem::take(&mut histories[pi]));
            let g = rt.generate(&req, &|| false).with_context(|| format!("question {}", ex.index))?;
            histories[pi] = rt.take_draft_history();
            outs[pi] = Some(g);
        }
        let outs: Vec<Generation> =
            outs.into_iter().map(|g| g.ok_or_else(|| anyhow!("a policy not run"))).collect::<Result<_>>()?;
        for (t, g) in tallies.iter_mut().zip(&outs) {
            let tokens = g.decoded_rows;
            t.tokens += tokens;
            t.decode_s += g.decode_s;
            t.prefill_s += g.prefill_s;
            if g.decode_s > 0.0 {
                t.per_question_tok_s.push(tokens as f64 / g.decode_s);
            }
            t.draft.add(g.draft);
            if !same(g, &outs[0]) {
                t.differing.push(ex.index);
            }
        }
        eprintln!("bench-decode: {}/{} questions", qi + 1, questions.len());
    }
    let plain_tok_s = tallies[0].tokens as f64 / tallies[0].decode_s.max(1e-9);
    let rows: Vec<serde_json::Value> = tallies
        .iter_mut()
        .map(|t| {
            let tok_s = t.tokens as f64 / t.decode_s.max(1e-9);
            json!({
                "draft_tokens": t.policy.tokens,
                "min_ngram": t.policy.min_ngram,
                "adapt": t.policy.adapt,
                "history": t.policy.tokens > 0 && t.policy.adapt && t.policy.history,
                "tokens": t.tokens,
                "decode_s": t.decode_s,
                "decode_tok_s": tok_s,
                "prefill_s": t.prefill_s,
                "speedup": tok_s / plain_tok_s,
                "per_question_tok_s_p50": percentile(&mut t.per_question_tok_s, 0.5),
                "proposed": t.draft.proposed,
                "accepted": t.draft.accepted,
                "acceptance": t.draft.accepted as f64 / t.draft.proposed.max(1) as f64,
                "draft_passes": t.draft.passes,
                "tokens_per_pass": t.tokens as f64 / (t.tokens - t.draft.accepted).max(1) as f64,
                "answers_differing_from_plain": t.differing,
            })
        })
        .collect();
    let report = json!({
        "model": path.file_name().map(|s| s.to_string_lossy().into_owned()),
        "questions": questions.len(),
        "databases": args.dbs,
        "candidates": args.candidates,
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "policies": rows,
        "row_share_learned": rt.draft_row_share(),
        "identical": tallies.iter().all(|t| t.differing.is_empty()),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !tallies.iter().all(|t| t.differing.is_empty()) {
        bail!("speculative decoding changed some answers (see answers_differing_from_plain)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_bad_ones_say_why() {
        let p = |tokens, min_ngram, adapt, history| DraftPolicy { tokens, min_ngram, adapt, history };
        assert_eq!(parse_policy("6:2").unwrap(), p(6, 2, true, true));
        assert_eq!(parse_policy(" 0 : 1 ").unwrap(), p(0, 1, true, true));
        assert_eq!(parse_policy("8:1:lookup").unwrap(), p(8, 1, true, false));
        assert_eq!(parse_policy("8:1:fixed").unwrap(), p(8, 1, false, false));
        assert!(parse_policy("8:1:fast").unwrap_err().contains("fixed"));
        assert!(parse_policy("6").unwrap_err().contains("TOKENS:MIN_NGRAM"));
        assert!(parse_policy("6:0").unwrap_err().contains("at least one"));
        assert!(parse_policy("x:2").unwrap_err().contains("tokens"));
    }

    #[test]
    fn percentiles_of_nothing_and_of_a_few() {
        assert_eq!(percentile(&mut [], 0.5), 0.0);
        assert_eq!(percentile(&mut [3.0, 1.0, 2.0], 0.5), 2.0);
    }
}
