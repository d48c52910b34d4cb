//! `data prepare`: normalize, filter and split rows into `train.jsonl` / `val.jsonl`, with the prompt and
//! completion rendered by core exactly as the runtime will see them, and `data_report.json`.
//!
//! Per row, in order (the first failing check names the reason it is dropped):
//! `empty_question`, `unparseable_context` (the CREATE TABLE statements do not parse), `unparseable_sql`,
//! `not_a_query` (core's gate refuses it: not one read-only SELECT), `unknown_names` (a table or column that is not
//! in the context), `duplicate_question` (same question, case- and space-insensitive, over the same context),
//! `over_token_budget` (prompt + completion longer than `--max-tokens`).
//! The answer is normalized with the rules in `sqlnorm` (docs/evaluation.md). The validation split takes the
//! rows with the smallest sha256(seed:question␟context): identical on every machine and independent of row order.

use super::rows::{self, Row};
use crate::seed::seeded_key;
use crate::sqlnorm::{self, catalog_from_context};
use anyhow::{bail, Context, Result};
use copilot_core::engine::runtime::TextSide;
use copilot_core::sql::gate;
use copilot_core::sql::prompt::{build_prompt, ChatTemplate};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct PrepareArgs {
    /// Row files (JSON, JSONL or Parquet of {question, context, answer[, db_id]}); repeat to combine.
    #[arg(long = "input", required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output folder for train.jsonl, val.jsonl and data_report.json.
    #[arg(long, default_value = "data/prepared")]
    pub out: PathBuf,
    /// The GGUF whose tokenizer and chat template render and count the rows (only its header is read).
    #[arg(long)]
    pub model: PathBuf,
    /// Longest prompt + completion, in tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Share of rows in the validation split.
    #[arg(long, default_value_t = 0.08)]
    pub val_fraction: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Prepared {
    pub question: String,
    pub context: String,
    /// The normalized SQL.
    pub answer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_id: Option<String>,
    /// The prompt as the runtime renders it (ends with the assistant's "```sql\n" primer).
    pub prompt: String,
    /// What the model should generate after the prompt: the SQL, ";", the closing fence, end of turn.
    pub completion: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct DataReport {
    pub inputs: Vec<String>,
    pub model: String,
    pub rows_in: usize,
    pub kept: usize,
    pub dropped: BTreeMap<String, usize>,
    pub answers_changed_by_normalization: usize,
    pub train: usize,
    pub val: usize,
    pub val_fraction: f64,
    pub seed: u64,
    pub max_tokens: usize,
    pub prompt_tokens_p50: usize,
    pub prompt_tokens_p95: usize,
    pub prompt_tokens_max: usize,
    pub completion_tokens_p50: usize,
    pub completion_tokens_max: usize,
    pub train_sha256: String,
    pub val_sha256: String,
}

/// The completion text for an answer: what the runtime's stop rules end on (`;`), then the fence and end of turn
/// the chat format expects.
pub fn completion(sql: &str, template: &ChatTemplate) -> String {
    format!("{sql};\n```{}", template.eos_token)
}

pub enum Outcome {
    Kept(Box<Prepared>, bool),
    Dropped(&'static str),
}

/// Check and render one row. `seen` holds the duplicate keys so far.
pub fn prepare_row(row: &Row, text: &TextSide, max_tokens: usize, seen: &mut HashSet<String>) -> Result<Outcome> {
    let question = row.question.trim();
    if question.is_empty() {
        return Ok(Outcome::Dropped("empty_question"));
    }
    let Some(catalog) = catalog_from_context(&row.context) else { return Ok(Outcome::Dropped("unparseable_context")) };
    let known = sqlnorm::known_names(&catalog);
    let Some(sql) = sqlnorm::normalize(&row.answer, Some(&known)) else {
        return Ok(Outcome::Dropped("unparseable_sql"));
    };
    let Ok(checked) = gate::check(&sql) else { return Ok(Outcome::Dropped("not_a_query")) };
    if !gate::unknown_names(&checked, &catalog).is_empty() {
        return Ok(Outcome::Dropped("unknown_names"));
    }
    let key = format!(
        "{}\u{1f}{}",
        question.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase(),
        row.context.trim()
    );
    if !seen.insert(key) {
        return Ok(Outcome::Dropped("duplicate_question"));
    }
    let prompt = build_prompt(&text.template, &row.context, question)?.text();
    let completion = completion(&sql, &text.template);
    let prompt_tokens = text.encode(&prompt)?.len();
    let completion_tokens = text.encode(&completion)?.len();
    if prompt_tokens + completion_tokens > max_tokens {
        return Ok(Outcome::Dropped("over_token_budget"));
    }
    let changed = sql != row.answer.trim().trim_end_matches(';').trim();
    Ok(Outcome::Kept(
        Box::new(Prepared {
            question: question.to_string(),
            context: row.context.clone(),
            answer: sql,
            db_id: row.db_id.clone(),
            prompt,
            completion,
            prompt_tokens,
            completion_tokens,
        }),
        changed,
    ))
}

/// Split indices into (train, val): the `fraction` of rows with the smallest seeded hash go to val.
pub fn split(keys: &[String], fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let n_val = ((keys.len() as f64) * fraction).round() as usize;
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by_key(|&i| seeded_key(seed, &keys[i]));
    let val: HashSet<usize> = order.into_iter().take(n_val).collect();
    let (mut t, mut v) = (Vec::new(), Vec::new());
    for i in 0..keys.len() {
        if val.contains(&i) {
            v.push(i)
        } else {
            t.push(i)
        }
    }
    (t, v)
}

fn p(sorted: &[usize], q: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub fn run(args: &PrepareArgs) -> Result<()> {
    if !(0.0..1.0).contains(&args.val_fraction) {
        bail!("--val-fraction must be in [0, 1)");
    }
    let text = TextSide::load(&args.model).with_context(|| format!("cannot read {}", args.model.display()))?;
    let mut report = DataReport {
        inputs: args.inputs.iter().map(|p| p.display().to_string()).collect(),
        model: args.model.display().to_string(),
        val_fraction: args.val_fraction,
        seed: args.seed,
        max_tokens: args.max_tokens,
        ..Default::default()
    };
    let mut all: Vec<Row> = Vec::new();
    for p in &args.inputs {
        all.extend(rows::read(p)?);
    }
    report.rows_in = all.len();
    let bar = indicatif::ProgressBar::new(all.len() as u64);
    let mut seen = HashSet::new();
    let mut kept: Vec<Prepared> = Vec::new();
    for row in &all {
        match prepare_row(row, &text, args.max_tokens, &mut seen)? {
            Outcome::Kept(p, changed) => {
                report.answers_changed_by_normalization += usize::from(changed);
                kept.push(*p);
            }
            Outcome::Dropped(reason) => *report.dropped.entry(reason.to_string()).or_default() += 1,
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    report.kept = kept.len();
    let keys: Vec<String> = kept.iter().map(|r| format!("{}\u{1f}{}", r.question, r.context)).collect();
    let (ti, vi) = split(&keys, args.val_fraction, args.seed);
    let train: Vec<&Prepared> = ti.iter().map(|&i| &kept[i]).collect();
    let val: Vec<&Prepared> = vi.iter().map(|&i| &kept[i]).collect();
    report.train = train.len();
    report.val = val.len();
    let mut pt: Vec<usize> = kept.iter().map(|r| r.prompt_tokens).collect();
    let mut ct: Vec<usize> = kept.iter().map(|r| r.completion_tokens).collect();
    pt.sort_unstable();
    ct.sort_unstable();
    report.prompt_tokens_p50 = p(&pt, 0.5);
    report.prompt_tokens_p95 = p(&pt, 0.95);
    report.prompt_tokens_max = pt.last().copied().unwrap_or(0);
    report.completion_tokens_p50 = p(&ct, 0.5);
    report.completion_tokens_max = ct.last().copied().unwrap_or(0);
    std::fs::create_dir_all(&args.out)?;
    let tp = args.out.join("train.jsonl");
    let vp = args.out.join("val.jsonl");
    rows::write_jsonl(&tp, &train)?;
    rows::write_jsonl(&vp, &val)?;
    report.train_sha256 = copilot_core::engine::source::sha256_file(&tp)?;
    report.val_sha256 = copilot_core::engine::source::sha256_file(&vp)?;
    std::fs::write(args.out.join("data_report.json"), serde_json::to_string_pretty(&report)?)?;
    println!(
        "{} rows in, {} kept ({} train, {} val), dropped {:?} → {}",
        report.rows_in,
        report.kept,
        report.train,
        report.val,
        report.dropped,
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_seeded_stable_and_sized() {
        let keys: Vec<String> = (0..1000).map(|i| format!("q{i}")).collect();
        let (t, v) = split(&keys, 0.08, 42);
        assert_eq!((t.len(), v.len()), (920, 80));
        assert_eq!(split(&keys, 0.08, 42).1, v);
        assert_ne!(split(&keys, 0.08, 7).1, v);
        // independent of row order: reversed input, same validation rows
        let rev: Vec<String> = keys.iter().rev().cloned().collect();
        let mut v_rev: Vec<String> = split(&rev, 0.08, 42).1.iter().map(|&i| rev[i].clone()).collect();
        let mut v_keys: Vec<String> = v.iter().map(|&i| keys[i].clone()).collect();
        v_rev.sort();
        v_keys.sort();
        assert_eq!(v_rev, v_keys);
    }

    fn tiny() -> TextSide {
        let p = std::env::var_os("COPILOT_TEST_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/copilot/models/smollm2-135m-instruct-q4_1.gguf"));
        assert!(p.is_file(), "test model {} is missing: run scripts/fetch-model --tiny", p.display());
        TextSide::load(&p).unwrap()
    }

    fn row(q: &str, ctx: &str, a: &str) -> Row {
        Row { question: q.into(), context: ctx.into(), answer: a.into(), db_id: None }
    }

    #[test]
    fn every_drop_reason_and_a_kept_row() {
        let t = tiny();
        let ctx = "CREATE TABLE head (name VARCHAR, born_state VARCHAR, age VARCHAR)";
        let mut seen = HashSet::new();
        let reason = |o: Outcome| match o {
            Outcome::Dropped(r) => r,
            Outcome::Kept(..) => "kept",
        };
        let mut go = |r: Row, max: usize| reason(prepare_row(&r, &t, max, &mut seen).unwrap());
        assert_eq!(go(row("  ", ctx, "SELECT name FROM head"), 1024), "empty_question");
        assert_eq!(go(row("q1", "CREATE TABL head", "SELECT name FROM head"), 1024), "unparseable_context");
        assert_eq!(go(row("q2", ctx, "SELEC name FROM"), 1024), "unparseable_sql");
        assert_eq!(go(row("q3", ctx, "DELETE FROM head"), 1024), "not_a_query");
        assert_eq!(go(row("q4", ctx, "SELECT salary FROM head"), 1024), "unknown_names");
        assert_eq!(go(row("q5", ctx, "SELECT name FROM head"), 20), "over_token_budget");
        assert_eq!(
            go(row("Who is from California?", ctx, "SELECT name FROM head WHERE born_state = \"California\""), 1024),
            "kept"
        );
        assert_eq!(go(row("who is  from CALIFORNIA?", ctx, "SELECT name FROM head"), 1024), "duplicate_question");
    }

    #[test]
    fn kept_rows_render_with_the_runtime_prompt_and_a_stop_ending_completion() {
        let t = tiny();
        let ctx = "CREATE TABLE head (name VARCHAR, born_state VARCHAR)";
        let r = row("Who is from California?", ctx, "select NAME from head where born_state = \"California\";");
        let Outcome::Kept(p, changed) = prepare_row(&r, &t, 1024, &mut HashSet::new()).unwrap() else {
            panic!("dropped")
        };
        assert!(changed);
        assert_eq!(p.answer, "SELECT name FROM head WHERE born_state = 'California'");
        assert_eq!(p.prompt, build_prompt(&t.template, ctx, "Who is from California?").unwrap().text());
        assert!(p.prompt.ends_with("```sql\n"));
        assert!(p.completion.starts_with("SELECT name FROM head WHERE born_state = 'California';\n```"));
        assert!(p.completion.ends_with(&t.template.eos_token) && !t.template.eos_token.is_empty());
        assert_eq!(p.prompt_tokens, t.encode(&p.prompt).unwrap().len());
    }
}
