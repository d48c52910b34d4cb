//! Would the sentence encoder choose a question's schema better than the words do? Over the catalog
//! `scripts/bench-schema` builds (the Spider dev databases as schemas plus the `warehouse` distractors, without
//! PostgreSQL), for each dev question: the schema schema selection focuses on by its words
//! (`copilot_core::sql::select`, `Report::schemas`), and the schema whose two tables closest in meaning to the
//! question (all-MiniLM-L6-v2 cosines over the tables as the grounding check writes them) are closest together.
//! Prints one JSON object: how often each is the question's database; how often the words' schemas hold it
//! (`words_schemas_kept_right_pct`) and how often it is among them once the meaning's schema is added
//! (`words_schemas_and_meaning_kept_right_pct`, with the mean number of schemas each way); and the questions where
//! words and meaning disagree. The measurement behind choosing schemas by meaning too (context.md, #18).
//!
//! `cargo run --release -p copilot-core --example select_meaning -- SPIDER_DIR ENCODER_DIR [BUDGET] [DISTRACTORS]`
#[path = "common/spider_catalog.rs"]
mod spider_catalog;

use copilot_core::engine::embed::{cosine, Embedder};
use copilot_core::sql::schema::Catalog;
use copilot_core::sql::select::{select, select_with, Closeness};
use copilot_core::sql::suggest::Grounding;
use std::collections::BTreeMap;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(spider), Some(encoder)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: select_meaning SPIDER_DIR ENCODER_DIR [BUDGET] [DISTRACTORS]");
        std::process::exit(2);
    };
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (budget, distractors) = (arg(3, 1000), arg(4, 300));
    let (dev, catalog) = spider_catalog::load(spider, distractors);
    let tokens = spider_catalog::tokens;
    let mut enc = Embedder::load(encoder).expect("encoder");
    // The tables as sentences, as the grounding check sends them (every table: one grounding per table).
    let sentences: Vec<String> = catalog
        .tables
        .iter()
        .map(|t| {
            let one = Catalog { tables: vec![t.clone()] };
            Grounding::of("tables", &one).map(|g| g.tables[0].clone()).unwrap_or_default()
        })
        .collect();
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let vecs = enc.embed(&refs).expect("embed tables");
    let (mut words_right, mut words_kept, mut meaning_right, mut n) = (0usize, 0usize, 0usize, 0usize);
    let (mut reordered_right, mut pair_kept, mut union_kept, mut union_sizes) = (0usize, 0usize, 0usize, 0usize);
    let (mut union_first_right, mut words_sizes) = (0usize, 0usize);
    let (mut selected_first_right, mut selected_kept_right, mut selected_sizes, mut selected_tables_right) =
        (0usize, 0usize, 0usize, 0usize);
    let mut words_tables_right = 0usize;
    let mut disagree = Vec::new();
    for q in dev.as_array().expect("dev") {
        let (Some(question), Some(db)) = (q["question"].as_str(), q["db_id"].as_str()) else { continue };
        let db = db.to_lowercase();
        n += 1;
        let (by_words_kept, report) = select(&catalog, question, &[], budget, &tokens);
        words_tables_right += usize::from(by_words_kept.tables.iter().any(|t| t.schema == db));
        let by_words = report.schemas.first().cloned().unwrap_or_default();
        words_right += usize::from(by_words == db);
        words_kept += usize::from(report.schemas.contains(&db));
        words_sizes += report.schemas.len().max(1);
        let qv = enc.embed(&[question]).expect("embed question");
        let mut best: BTreeMap<&str, [f32; 2]> = BTreeMap::new();
        for (t, v) in catalog.tables.iter().zip(&vecs) {
            let c = cosine(&qv[0], v);
            let b = best.entry(t.schema.as_str()).or_insert([f32::MIN; 2]);
            if c > b[0] {
                *b = [c, b[0]];
            } else if c > b[1] {
                b[1] = c;
            }
        }
        let by_meaning = best
            .iter()
            .map(|(s, b)| (*s, b[0] + b[1].max(0.0)))
            .fold(("", f32::MIN), |acc, (s, v)| if v > acc.1 { (s, v) } else { acc })
            .0
            .to_string();
        meaning_right += usize::from(by_meaning == db);
        // What selection does with the encoder's scores (as the extension passes them).
        let near: Closeness = catalog
            .tables
            .iter()
            .zip(&vecs)
            .map(|(t, v)| ((t.schema.clone(), t.name.clone()), cosine(&qv[0], v)))
            .collect();
        let (kept, with_meaning) = select_with(&catalog, question, &[], budget, &tokens, true, &near);
        selected_first_right += usize::from(with_meaning.schemas.first() == Some(&db));
        selected_kept_right += usize::from(with_meaning.schemas.contains(&db));
        selected_sizes += with_meaning.schemas.len().max(1);
        selected_tables_right += usize::from(kept.tables.iter().any(|t| t.schema == db));
        let score = |s: &str| best.get(s).map_or(f32::MIN, |b| b[0] + b[1].max(0.0));
        // The words' schemas, the one closer in meaning first.
        let mut ordered = report.schemas.clone();
        ordered.sort_by(|a, b| score(b).total_cmp(&score(a)));
        reordered_right += usize::from(ordered.first() == Some(&db));
        // The words' first schema and the meaning's (the words' second replaced by the meaning's choice).
        let mut pair: Vec<String> = report.schemas.iter().take(1).cloned().collect();
        if !pair.contains(&by_meaning) {
            pair.push(by_meaning.clone());
        }
        pair_kept += usize::from(pair.contains(&db));
        let mut union = report.schemas.clone();
        if !union.contains(&by_meaning) {
            union.push(by_meaning.clone());
        }
        union_kept += usize::from(union.contains(&db));
        union.sort_by(|a, b| score(b).total_cmp(&score(a)));
        union_first_right += usize::from(union.first() == Some(&db));
        union_sizes += union.len();
        if by_meaning != by_words {
            disagree.push(
                serde_json::json!({"db": db, "question": question, "words": report.schemas, "meaning": by_meaning}),
            );
        }
    }
    let pct = |k: usize| 100.0 * k as f64 / n.max(1) as f64;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "command": format!("cargo run --release -p copilot-core --example select_meaning -- {}", args[1..].join(" ")),
            "encoder": encoder,
            "machine": copilot_core::engine::host::machine(),
            "questions": n,
            "tables": catalog.tables.len(),
            "budget_tokens": budget,
            "words_first_schema_right_pct": pct(words_right),
            "words_schemas_kept_right_pct": pct(words_kept),
            "meaning_schema_right_pct": pct(meaning_right),
            "words_schemas_closer_in_meaning_first_right_pct": pct(reordered_right),
            "words_first_and_meaning_kept_right_pct": pct(pair_kept),
            "words_schemas_and_meaning_kept_right_pct": pct(union_kept),
            "words_schemas_and_meaning_mean_schemas": union_sizes as f64 / n.max(1) as f64,
            "words_schemas_and_meaning_closer_first_right_pct": pct(union_first_right),
            "words_mean_schemas": words_sizes as f64 / n.max(1) as f64,
            "words_selection_shows_a_table_of_it_pct": pct(words_tables_right),
            "select_with_meaning_first_schema_right_pct": pct(selected_first_right),
            "select_with_meaning_schemas_kept_right_pct": pct(selected_kept_right),
            "select_with_meaning_mean_schemas": selected_sizes as f64 / n.max(1) as f64,
            "select_with_meaning_shows_a_table_of_it_pct": pct(selected_tables_right),
            "disagreements": disagree,
        }))
        .expect("json")
    );
}
