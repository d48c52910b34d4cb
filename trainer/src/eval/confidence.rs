//! `copilot-trainer eval-confidence`: when is the greedy answer alone as good as the vote among several?
//!
//! `copilot.ask` decodes the greedy answer first and samples the other `copilot.candidates − 1` only when that
//! answer does not plan or the model was unsure of one of its tokens (its lowest token probability, `min_p`, below
//! `copilot.confidence_threshold`). This command chooses that threshold on Spider **train** (never on the dev
//! questions it is measured on): for a seeded sample of train questions it decodes the candidates in-process
//! (core's runtime, the same prompt and sampling as the extension, contexts rendered from the SQLite files), runs
//! each on the database's SQLite file, votes as the extension does (largest group of equal results, an answer
//! with rows over an empty one, then the earliest), and for each threshold reports the share of questions the
//! greedy answer would answer alone and the execution accuracy of that rule against always voting.
//!
//! SQLite stands in for PostgreSQL here (the model writes PostgreSQL SQL; a statement SQLite cannot run counts as
//! not planning), so the numbers are for choosing a threshold, not for quoting as accuracy.

use super::exec::Sqlite;
use super::results::{same_result, ResultSet};
use crate::host::{load_avg, machine, utc_now};
use crate::seed::seeded_key;
use crate::spider;
use anyhow::{Context, Result};
use copilot_core::engine::backend::{Backend, GenerateRequest, Sampling};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone)]
pub struct ConfidenceArgs {
    /// The model whose answers are measured, on `--n` train questions (a seeded sample).
    #[command(flatten)]
    pub run: super::InProcess,
    /// Candidates per question, the greedy one first (copilot.candidates).
    #[arg(long, default_value_t = 4)]
    pub candidates: usize,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Time limit per SQLite statement.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// The recommended threshold is the lowest whose accuracy is within this many points of always voting.
    #[arg(long, default_value_t = 0.5)]
    pub max_loss_points: f64,
    /// Output: reports/eval/<name>.json and .md.
    #[arg(long, default_value = "reports/eval/confidence_calibration.json")]
    pub out: PathBuf,
}

/// One question: the greedy answer's confidence and whether it ran, and which answers were right.
#[derive(Debug, Clone, Serialize)]
pub struct Asked {
    pub index: usize,
    pub db_id: String,
    pub min_p: Option<f32>,
    pub greedy_runs: bool,
    pub greedy_correct: bool,
    pub vote_correct: bool,
    /// The greedy answer's result is the vote winner's (so answering with it alone changes nothing).
    pub greedy_in_winning_group: bool,
}

/// The vote over candidates' results (`None` = did not run), as the extension votes: the largest group of equal
/// results (column order free), then a group with rows over an empty one, then the group holding the earliest
/// candidate. Returns the winner's index.
pub fn vote(results: &[Option<ResultSet>]) -> Option<usize> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let Some(r) = r else { continue };
        match groups.iter_mut().find(|g| results[g[0]].as_ref().is_some_and(|o| same_result(o, r, false))) {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    let empty = |g: &Vec<usize>| results[g[0]].as_ref().is_some_and(|r| r.rows.is_empty());
    groups.sort_by_key(|g| (std::cmp::Reverse(g.len()), empty(g), g[0]));
    groups.first().map(|g| g[0])
}

/// Per threshold: the share answered by the greedy answer alone (it ran and `min_p ≥ t`), and the accuracy of
/// answering those with it and the rest by the vote.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub threshold: f32,
    pub greedy_alone: f64,
    pub ex: f64,
    pub ex_vote: f64,
    pub changed: usize,
}

pub fn sweep(asked: &[Asked], thresholds: &[f32]) -> Vec<Row> {
    let n = asked.len().max(1) as f64;
    let ex_vote = asked.iter().filter(|a| a.vote_correct).count() as f64 / n;
    thresholds
        .iter()
        .map(|&t| {
            let alone = |a: &Asked| a.greedy_runs && a.min_p.is_some_and(|p| p >= t);
            let ex = asked.iter().filter(|a| if alone(a) { a.greedy_correct } else { a.vote_correct }).count();
            Row {
                threshold: t,
                greedy_alone: asked.iter().filter(|a| alone(a)).count() as f64 / n,
                ex: ex as f64 / n,
                ex_vote,
                changed: asked.iter().filter(|a| alone(a) && !a.greedy_in_winning_group).count(),
            }
        })
        .collect()
}

/// The lowest threshold whose accuracy is within `max_loss_points` of always voting (1.0 if none is).
pub fn recommend(rows: &[Row], max_loss_points: f64) -> f32 {
    rows.iter().filter(|r| 100.0 * (r.ex_vote - r.ex) <= max_loss_points).map(|r| r.threshold).fold(1.0f32, f32::min)
}

pub fn run(args: &ConfidenceArgs) -> Result<()> {
    let run = &args.run;
    run.configure_threads();
    let t0 = Instant::now();
    let load_start = load_avg();
    let mut train = run.train()?;
    train.sort_by_key(|e| seeded_key(run.seed, &e.index.to_string()));
    train.truncate(run.n);
    // Grouped by database, so each schema prefix is prefilled once (the prefix cache), as in a session.
    train.sort_by(|a, b| (&a.db_id, a.index).cmp(&(&b.db_id, b.index)));
    let (path, mut rt) = run.runtime()?;
    let mut contexts = spider::Contexts::new(&run.spider);
    let mut sqlite = Sqlite::new(&run.spider);
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut asked = Vec::new();
    for (i, e) in train.iter().enumerate() {
        let ctx = contexts.get(&e.db_id)?.1.clone();
        let req = GenerateRequest {
            schema_context: ctx,
            question: e.question.clone(),
            max_new_tokens: args.max_new_tokens,
            sampling: Sampling { candidates: args.candidates.max(1), ..Sampling::default() },
            ..Default::default()
        };
        let g = rt.generate(&req, &|| false).with_context(|| format!("train question {}", e.index))?;
        let results: Vec<Option<ResultSet>> = g
            .candidates()
            .iter()
            .map(|c| c.sql.as_deref().and_then(|sql| sqlite.run(&e.db_id, sql, timeout).ok()))
            .collect();
        let gold = sqlite.run(&e.db_id, &e.query, timeout).ok();
        let ordered = super::score::has_order_by(&e.query);
        let correct = |r: &Option<ResultSet>| matches!((&gold, r), (Some(g), Some(p)) if same_result(g, p, ordered));
        let winner = vote(&results);
        let a = Asked {
            index: e.index,
            db_id: e.db_id.clone(),
            min_p: g.min_p,
            greedy_runs: results[0].is_some(),
            greedy_correct: correct(&results[0]),
            vote_correct: winner.is_some_and(|w| correct(&results[w])),
            greedy_in_winning_group: match (winner, &results[0]) {
                (Some(w), Some(r0)) => results[w].as_ref().is_some_and(|rw| same_result(rw, r0, false)),
                _ => false,
            },
        };
        eprintln!(
            "[{}/{}] {} min_p {:.3} greedy {} vote {}",
            i + 1,
            train.len(),
            e.db_id,
            a.min_p.unwrap_or(f32::NAN),
            a.greedy_correct,
            a.vote_correct
        );
        asked.push(a);
    }
    let thresholds = [0.0f32, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];
    let rows = sweep(&asked, &thresholds);
    let recommended = recommend(&rows, args.max_loss_points);
    let report = serde_json::json!({
        "model": path.display().to_string(),
        "selection": format!("Spider train, seed {}: {} questions (SQLite file present), {} candidates each",
                             run.seed, asked.len(), args.candidates),
        "machine": machine(),
        "load_avg_start": load_start,
        "load_avg_end": load_avg(),
        "finished_utc": utc_now(),
        "wall_s": t0.elapsed().as_secs_f64(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "max_loss_points": args.max_loss_points,
        "recommended_threshold": recommended,
        "thresholds": rows,
        "questions": asked,
    });
    if let Some(d) = args.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    let mut md = std::fs::File::create(args.out.with_extension("md"))?;
    writeln!(
        md,
        "# Greedy alone or a vote: copilot.confidence_threshold on Spider train\n\n{}.\n\nModel `{}`. Machine: {}; \
         load {} → {}; {:.0} s. Command: `{}`.\n\nExecuted on the SQLite files (a stand-in for PostgreSQL: for \
         choosing the threshold, not an accuracy to quote). Recommended: **{recommended}** (the lowest threshold \
         within {} points of always voting).\n",
        report["selection"].as_str().unwrap_or_default(),
        path.display(),
        report["machine"].as_str().unwrap_or_default(),
        load_start,
        load_avg(),
        t0.elapsed().as_secs_f64(),
        report["command"].as_str().unwrap_or_default(),
        args.max_loss_points
    )?;
    writeln!(md, "| min_p ≥ | greedy alone | EX | EX always voting | answers not the vote's |\n|---|---|---|---|---|")?;
    for r in &rows {
        writeln!(
            md,
            "| {} | {:.1} % | {:.1} % | {:.1} % | {} |",
            r.threshold,
            100.0 * r.greedy_alone,
            100.0 * r.ex,
            100.0 * r.ex_vote,
            r.changed
        )?;
    }
    println!("recommended copilot.confidence_threshold: {recommended}");
    for r in &rows {
        println!("{}", serde_json::to_string(r)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::results::Cell;

    fn rs(v: &[&str]) -> Option<ResultSet> {
        Some(ResultSet { columns: 1, rows: v.iter().map(|s| vec![Cell::Text(s.to_string())]).collect() })
    }

    #[test]
    fn the_vote_is_the_extensions() {
        // Largest group wins.
        assert_eq!(vote(&[rs(&["a"]), rs(&["b"]), rs(&["b"]), None]), Some(1));
        // A tie goes to rows over an empty result, then to the earliest.
        assert_eq!(vote(&[rs(&[]), rs(&["b"])]), Some(1));
        assert_eq!(vote(&[rs(&["a"]), rs(&["b"])]), Some(0));
        // Row order is free; nothing ran, no winner.
        assert_eq!(vote(&[rs(&["x", "y"]), rs(&["a"]), rs(&["y", "x"])]), Some(0));
        assert_eq!(vote(&[None, None]), None);
    }

    fn a(min_p: f32, greedy: bool, vote: bool, same: bool) -> Asked {
        Asked {
            index: 0,
            db_id: String::new(),
            min_p: Some(min_p),
            greedy_runs: true,
            greedy_correct: greedy,
            vote_correct: vote,
            greedy_in_winning_group: same,
        }
    }

    #[test]
    fn the_sweep_counts_what_the_greedy_answer_alone_would_change() {
        // Sure and right; unsure and wrong where the vote is right; sure and wrong where the vote is right.
        let asked = [a(0.9, true, true, true), a(0.1, false, true, false), a(0.6, false, true, false)];
        let rows = sweep(&asked, &[0.0, 0.5, 0.95]);
        assert_eq!(rows[0].greedy_alone, 1.0);
        assert!((rows[0].ex - 1.0 / 3.0).abs() < 1e-9 && (rows[0].ex_vote - 1.0).abs() < 1e-9);
        assert_eq!(rows[0].changed, 2);
        assert!((rows[1].ex - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!((rows[2].ex, rows[2].greedy_alone, rows[2].changed), (1.0, 0.0, 0));
        // Only 0.95 is within a point of always voting.
        assert_eq!(recommend(&rows, 1.0), 0.95);
        assert_eq!(recommend(&rows, 40.0), 0.5);
    }
}
