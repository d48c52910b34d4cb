//! What schema selection itself costs (`copilot_core::sql::select`), without PostgreSQL: the catalog bench-schema
//! builds — the Spider dev databases as schemas (from `tables.json`) plus `DISTRACTORS` wide generated `warehouse`
//! tables of 30 columns chained by foreign keys, as `scripts/bench-schema` creates them — and the first `N` dev
//! questions of those databases, each selected at a budget of `BUDGET` estimated tokens (characters / 3, as the
//! extension counts). Prints one JSON object: tables, the full context's characters and render time, and the
//! selection's p50/p95/max milliseconds. `copilot.context(question)` adds the catalog read as the caller to this.
//!
//! `cargo run --release -p copilot-core --example bench_select -- SPIDER_DIR [N] [BUDGET] [DISTRACTORS]`
#[path = "common/spider_catalog.rs"]
mod spider_catalog;

use copilot_core::sql::select::select;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(spider) = args.get(1) else {
        eprintln!("usage: bench_select SPIDER_DIR [QUESTIONS] [BUDGET] [DISTRACTORS]");
        std::process::exit(2);
    };
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n, budget, distractors) = (arg(2, 300), arg(3, 1000), arg(4, 300));
    let (dev, catalog) = spider_catalog::load(spider, distractors);
    let tokens = spider_catalog::tokens;
    let t0 = Instant::now();
    let full = catalog.render(&spider_catalog::render_options()).len();
    let render_ms = t0.elapsed().as_secs_f64() * 1e3;
    let questions: Vec<&str> =
        dev.as_array().expect("dev").iter().filter_map(|q| q["question"].as_str()).take(n).collect();
    let mut ms: Vec<f64> = Vec::with_capacity(questions.len());
    let mut kept = Vec::with_capacity(questions.len());
    for q in &questions {
        let t = Instant::now();
        let (chosen, _) = select(&catalog, q, &[], budget, &tokens);
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        kept.push(chosen.tables.len());
    }
    ms.sort_by(f64::total_cmp);
    kept.sort_unstable();
    let at = |v: &[f64], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    println!(
        "{}",
        serde_json::json!({
            "tables": catalog.tables.len(),
            "full_context_chars": full,
            "full_render_ms": render_ms,
            "questions": questions.len(),
            "budget_tokens": budget,
            "select_ms_p50": at(&ms, 0.5),
            "select_ms_p95": at(&ms, 0.95),
            "select_ms_max": ms.last(),
            "tables_kept_p50": kept[kept.len() / 2],
        })
    );
}
