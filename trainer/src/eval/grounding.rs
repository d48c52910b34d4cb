//! `copilot-trainer eval-grounding`: how well a sentence encoder lets the lexical grounding check see a question's
//! meaning, measured on Spider **train** only, so that `copilot.grounding_similarity` is chosen on training data.
//!
//! Three sets of the same seeded train questions: asked against their own database in Spider's words
//! (answerable), in Spider-Syn's paraphrase (answerable, schema words replaced by synonyms), and asked against
//! another train database that lacks every table their gold SQL reads (unanswerable). A question whose words the
//! schema barely spells (share at most `--threshold`) goes to the model's cannot-answer judge unless it is close
//! in meaning to one of the tables ([`Grounding::closeness`] at least the minimum cosine). For each minimum cosine,
//! the share of each set that still goes to the judge: an unanswerable question must still reach it; an answerable
//! one should not need to.

use super::refusal::pairs;
use crate::host::machine;
use crate::seed::seeded_key;
use crate::spider;
use anyhow::Result;
use copilot_core::engine::embed::{cosine, Embedder};
use copilot_core::sql::suggest::Grounding;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Clone)]
pub struct GroundingArgs {
    /// The sentence encoder: a sentence-transformers folder (`scripts/fetch-model --minilm`) or hf:<repo>/model.safetensors.
    #[arg(long, default_value_t = GroundingArgs::default_embedder())]
    pub embedder: String,
    #[arg(long, default_value = "../shared/data/spider")]
    pub spider: PathBuf,
    /// Questions per set.
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// `copilot.grounding_threshold`: a question whose grounding is at most this goes to the judge.
    #[arg(long, default_value_t = 0.1)]
    pub threshold: f32,
    /// Output: JSON, and Markdown beside it.
    #[arg(long, default_value = "reports/eval/grounding_calibration.json")]
    pub out: PathBuf,
}

impl GroundingArgs {
    /// Where `scripts/fetch-model --minilm` puts the encoder.
    pub fn default_embedder() -> String {
        "/var/lib/copilot/models/all-minilm-l6-v2".into()
    }
}

/// Minimum cosines tried: 0.20, 0.225, … 0.60.
fn grid() -> Vec<f32> {
    (0..=16).map(|i| 0.2 + 0.025 * i as f32).collect()
}

pub fn run(args: &GroundingArgs) -> Result<()> {
    let t0 = Instant::now();
    let has_db = |e: &spider::Example| spider::sqlite_path(&args.spider, &e.db_id).is_file();
    let train: Vec<spider::Example> = spider::load_train(&args.spider)?.into_iter().filter(has_db).collect();
    let syn: std::collections::HashMap<usize, spider::Example> =
        spider::load_train_syn(&args.spider)?.into_iter().map(|e| (e.index, e)).collect();
    let mut order: Vec<&spider::Example> = train.iter().collect();
    order.sort_by_key(|e| seeded_key(args.seed ^ 1, &e.index.to_string()));
    // Paraphrases that differ from the original (some rows have no synonym to substitute).
    let answerable: Vec<(&spider::Example, &spider::Example)> = order
        .into_iter()
        .filter_map(|e| syn.get(&e.index).filter(|s| s.question != e.question).map(|s| (e, s)))
        .take(args.n)
        .collect();
    let unanswerable = pairs(&args.spider, &train, args.n, args.seed)?;
    let mut asked: [Vec<(String, String)>; 3] = [vec![], vec![], vec![]];
    for (e, s) in &answerable {
        asked[0].push((e.question.clone(), e.db_id.clone()));
        asked[1].push((s.question.clone(), s.db_id.clone()));
    }
    for (e, db) in &unanswerable {
        asked[2].push((e.question.clone(), db.clone()));
    }
    let mut embedder = Embedder::load(&args.embedder)?;
    let mut contexts = spider::Contexts::new(&args.spider);
    // Per question: None when its words ground it (never judged), else its closeness to the closest table.
    let mut closeness: [Vec<Option<f32>>; 3] = [vec![], vec![], vec![]];
    for (set, qs) in asked.iter().enumerate() {
        for (q, db) in qs {
            let Some(g) = Grounding::of(q, &contexts.get(db)?.0) else { continue };
            if g.share() > args.threshold {
                closeness[set].push(None);
                continue;
            }
            let tables: Vec<&str> = g.tables.iter().map(String::as_str).collect();
            let qv = embedder.embed(&[q.as_str()])?;
            let tv = embedder.embed(&tables)?;
            closeness[set].push(g.closeness(|_, _| tv.iter().map(|t| cosine(&qv[0], t)).collect()));
        }
    }
    // Share of a set put to the judge at minimum cosine `min` (above 1: spelling alone).
    let to_judge = |set: usize, min: f32| -> f64 {
        let c = &closeness[set];
        c.iter().filter(|x| x.is_some_and(|x| x < min)).count() as f64 / c.len().max(1) as f64
    };
    let lexical: Vec<f64> = (0..3).map(|i| to_judge(i, 2.0)).collect();
    let grid = grid();
    let rows: Vec<serde_json::Value> = grid
        .iter()
        .map(|&m| {
            serde_json::json!({"min_similarity": m, "answerable_to_judge": to_judge(0, m),
                "paraphrased_to_judge": to_judge(1, m), "unanswerable_to_judge": to_judge(2, m)})
        })
        .collect();
    // The cosine that spares the most paraphrased questions the judge net of the unanswerable ones it stops
    // sending there (each of those is a refusal the judge can no longer make); a tie goes to the higher cosine.
    let gain = |m: f32| (lexical[1] - to_judge(1, m)) - (lexical[2] - to_judge(2, m));
    let recommended = grid.iter().copied().filter(|&m| gain(m) > 0.0).fold(None, |best: Option<f32>, m| match best {
        Some(b) if gain(b) > gain(m) + 1e-9 => Some(b),
        _ => Some(m),
    });
    let report = serde_json::json!({
        "embedder": args.embedder,
        "selection": format!("Spider train, seed {}: {} questions with a Spider-Syn paraphrase, asked against their own \
            database in both wordings, and {} asked against another train database lacking their tables",
            args.seed, closeness[0].len(), closeness[2].len()),
        "threshold": args.threshold,
        "machine": machine(),
        "wall_s": t0.elapsed().as_secs_f64(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "spelling_alone": {"answerable_to_judge": lexical[0], "paraphrased_to_judge": lexical[1],
            "unanswerable_to_judge": lexical[2]},
        "by_meaning": rows,
        "recommended_min_similarity": recommended,
        "closeness": {"answerable": closeness[0], "paraphrased": closeness[1], "unanswerable": closeness[2]},
    });
    if let Some(d) = args.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    let mut md = format!(
        "# Grounding by meaning: calibration on Spider train\n\n{}.\nEncoder: `{}`. A question goes to the model's \
         cannot-answer judge when at most {:.0} % of its content words are spelled by the schema and it is not close \
         in meaning to any table (cosine between the question and the table's sentence, `name: column, column, …`, \
         below the minimum). Command: `{}`; {} ({:.0} s).\n\n| minimum cosine | answerable to the judge | \
         paraphrased to the judge | unanswerable to the judge |\n|---|---:|---:|---:|\n| (spelling alone) | {:.1} % \
         | {:.1} % | {:.1} % |\n",
        report["selection"].as_str().unwrap_or_default(),
        args.embedder,
        100.0 * args.threshold,
        report["command"].as_str().unwrap_or_default(),
        report["machine"].as_str().unwrap_or_default(),
        t0.elapsed().as_secs_f64(),
        100.0 * lexical[0],
        100.0 * lexical[1],
        100.0 * lexical[2],
    );
    for &m in &grid {
        md += &format!(
            "| {m:.3} | {:.1} % | {:.1} % | {:.1} % |\n",
            100.0 * to_judge(0, m),
            100.0 * to_judge(1, m),
            100.0 * to_judge(2, m)
        );
    }
    md += &match recommended {
        Some(m) => format!(
            "\nRecommended `copilot.grounding_similarity` = **{m:.3}**: the cosine at which the most paraphrased \
             questions are spared the judge net of the unanswerable ones that stop reaching it ({:+.1} points).\n",
            100.0 * gain(m)
        ),
        None => {
            "\nAt no cosine in the grid do more paraphrased questions leave the judge than unanswerable ones.\n".into()
        }
    };
    std::fs::write(args.out.with_extension("md"), md)?;
    println!("spelling alone: {lexical:?}; recommended: {recommended:?}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On real Spider train files and the real encoder (`scripts/fetch-model --minilm`; fails loudly without):
    /// the report holds the three sets, and a higher minimum cosine never sends fewer questions to the judge.
    #[test]
    fn the_calibration_reports_each_set_and_is_monotone_in_the_minimum_cosine() {
        let spider = std::env::var("COPILOT_SPIDER")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/spider"));
        let out = std::env::temp_dir().join(format!("copilot-grounding-{}.json", std::process::id()));
        let embedder = std::env::var("COPILOT_EMBEDDER").unwrap_or_else(|_| GroundingArgs::default_embedder());
        let args = GroundingArgs { embedder, spider, n: 40, seed: 7, threshold: 0.1, out: out.clone() };
        run(&args).expect("needs ../shared/data/spider and scripts/fetch-model --minilm");
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert!(out.with_extension("md").is_file());
        let rows = r["by_meaning"].as_array().unwrap();
        assert_eq!(rows.len(), grid().len());
        for key in ["answerable_to_judge", "paraphrased_to_judge", "unanswerable_to_judge"] {
            let alone = r["spelling_alone"][key].as_f64().unwrap();
            let mut last = 0.0;
            for row in rows {
                let v = row[key].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&v) && v >= last && v <= alone, "{key}: {v} after {last}, alone {alone}");
                last = v;
            }
        }
        // Questions about another database's tables go to the judge far more often than questions about their own.
        let alone = &r["spelling_alone"];
        assert!(
            alone["unanswerable_to_judge"].as_f64().unwrap() > alone["answerable_to_judge"].as_f64().unwrap() + 0.3
        );
        // Every question with a content word is scored (a few may have none, or no database lacking their tables).
        let scored = r["closeness"]["unanswerable"].as_array().unwrap().len();
        assert!((30..=40).contains(&scored), "{scored} unanswerable questions scored of 40");
        std::fs::remove_file(&out).ok();
        std::fs::remove_file(out.with_extension("md")).ok();
    }
}
