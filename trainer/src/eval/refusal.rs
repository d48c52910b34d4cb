//! `copilot-trainer eval-refusal`: how often `copilot.ask` refuses a question it cannot answer.
//!
//! The unanswerable set is built from Spider dev: each question is asked against **another** dev database, one
//! that has none of the tables its gold query reads (chosen by a seeded hash, so the set is the same everywhere).
//! A correct refusal is `copilot.ask` raising P0002 (cannot answer); the report also counts 22000 (the model wrote
//! no SQL) and answers returned anyway. The false-refusal rate on answerable questions comes from the ordinary
//! `eval` report (its `refusals`), measured with the same settings.

use super::exec::pg_error;
use super::spider_match::SpiderTables;
use crate::host::{load_avg, machine, utc_now};
use crate::seed::seeded_key;
use crate::spider;
use anyhow::{bail, Context, Result};
use copilot_core::sql::schema::quote_ident;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Clone)]
pub struct RefusalArgs {
    #[arg(long, default_value = "host=/var/run/postgresql dbname=copilot_eval")]
    pub pg: String,
    #[arg(long, default_value = "../shared/data/spider")]
    pub spider: PathBuf,
    /// Questions in the set.
    #[arg(long, default_value_t = 300)]
    pub n: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long)]
    pub run: String,
    #[arg(long, default_value = "reports/eval")]
    pub out: PathBuf,
    /// A setting for the asking session, `name=value` (repeat).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub settings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Case {
    pub index: usize,
    pub question: String,
    /// The database the question belongs to, and the one it was asked against.
    pub from_db: String,
    pub asked_db: String,
    /// `refused` (P0002), `no_sql` (22000), `answered`, or `error` (another SQLSTATE).
    pub outcome: String,
    pub detail: String,
    pub latency_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RefusalReport {
    pub run: String,
    pub selection: String,
    pub command: String,
    pub machine: String,
    pub load_avg_start: String,
    pub load_avg_end: String,
    pub started_utc: String,
    pub settings: Vec<String>,
    pub n: usize,
    pub refused: usize,
    pub no_sql: usize,
    pub answered: usize,
    pub errors: usize,
    pub refusal_rate: f64,
    pub cases: Vec<Case>,
}

/// Lower-case table names of a database.
fn tables(t: &SpiderTables) -> BTreeSet<String> {
    t.table_names_original.iter().map(|n| n.to_lowercase()).collect()
}

/// Pair each of `n` seeded questions of `all` with a database of the same split lacking every table its gold SQL
/// names (seeded choice among them).
pub fn pairs(
    root: &std::path::Path,
    all: &[spider::Example],
    n: usize,
    seed: u64,
) -> Result<Vec<(spider::Example, String)>> {
    let schemas = spider::load_tables(root)?;
    let dbs: Vec<String> = {
        let mut v: Vec<String> = all
            .iter()
            .map(|e| e.db_id.clone())
            .filter(|d| spider::sqlite_path(root, d).is_file())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        v.sort();
        v
    };
    let names: BTreeMap<String, BTreeSet<String>> =
        dbs.iter().filter_map(|d| Some((d.clone(), tables(schemas.get(d)?)))).collect();
    let mut chosen: Vec<(spider::Example, String)> = Vec::new();
    let mut order: Vec<&spider::Example> = all.iter().filter(|e| names.contains_key(&e.db_id)).collect();
    order.sort_by_key(|e| seeded_key(seed, &e.index.to_string()));
    for e in order.into_iter().take(n) {
        let words: BTreeSet<String> = e
            .query
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .map(|w| w.to_lowercase())
            .filter(|w| !w.is_empty())
            .collect();
        let own = &names[&e.db_id];
        let needed: BTreeSet<&String> = own.iter().filter(|t| words.contains(*t)).collect();
        let mut others: Vec<&String> = names
            .iter()
            .filter(|(d, t)| **d != e.db_id && needed.iter().all(|n| !t.contains(*n)))
            .map(|(d, _)| d)
            .collect();
        others.sort_by_key(|d| seeded_key(seed, &format!("{}:{d}", e.index)));
        if let Some(d) = others.first() {
            chosen.push((e.clone(), (*d).clone()));
        }
    }
    chosen.sort_by_key(|(e, _)| e.index);
    Ok(chosen)
}

pub fn run(args: &RefusalArgs) -> Result<()> {
    let started_utc = utc_now();
    let load_avg_start = load_avg();
    let t0 = Instant::now();
    let set = pairs(&args.spider, &spider::load_dev(&args.spider)?, args.n, args.seed)?;
    if set.is_empty() {
        bail!("no questions selected");
    }
    let mut client = postgres::Client::connect(&args.pg, postgres::NoTls)
        .with_context(|| format!("cannot connect to PostgreSQL ({})", args.pg))?;
    for s in &args.settings {
        let (name, value) = s.split_once('=').with_context(|| format!("--set {s}: expected NAME=VALUE"))?;
        client.execute("SELECT set_config($1, $2, false)", &[&name.trim(), &value.trim()])?;
    }
    let mut cases = Vec::with_capacity(set.len());
    for (i, (e, db)) in set.iter().enumerate() {
        client.batch_execute(&format!("SET search_path = {}", quote_ident(&db.to_lowercase())))?;
        let t = Instant::now();
        let (outcome, detail) = match client.query_one("SELECT copilot.ask($1)", &[&e.question]) {
            Ok(r) => ("answered".to_string(), r.get::<_, String>(0)),
            Err(err) => {
                let code = err.as_db_error().map(|d| d.code().code().to_string()).unwrap_or_default();
                let outcome = match code.as_str() {
                    "P0002" => "refused",
                    "22000" => "no_sql",
                    _ => "error",
                };
                (outcome.to_string(), pg_error(&err))
            }
        };
        cases.push(Case {
            index: e.index,
            question: e.question.clone(),
            from_db: e.db_id.clone(),
            asked_db: db.clone(),
            outcome,
            detail,
            latency_s: t.elapsed().as_secs_f64(),
        });
        if (i + 1) % 25 == 0 {
            eprintln!("{}/{} asked", i + 1, set.len());
        }
    }
    let count = |o: &str| cases.iter().filter(|c| c.outcome == o).count();
    let n = cases.len();
    let report = RefusalReport {
        run: args.run.clone(),
        selection: format!(
            "{n} Spider dev questions (seed {}), each asked against another dev database that has none of the tables \
             its gold SQL reads",
            args.seed
        ),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine(),
        load_avg_start,
        load_avg_end: load_avg(),
        started_utc,
        settings: args.settings.clone(),
        n,
        refused: count("refused"),
        no_sql: count("no_sql"),
        answered: count("answered"),
        errors: count("error"),
        refusal_rate: count("refused") as f64 / n as f64,
        cases,
    };
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join(format!("{}.json", args.run));
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    let mut md = std::fs::File::create(args.out.join(format!("{}.md", args.run)))?;
    writeln!(md, "# Refusals on unanswerable questions: {}\n", report.run)?;
    writeln!(
        md,
        "{}.\n\nMachine: {}; load {} → {}; {:.0} s. Command: `{}`.\n",
        report.selection,
        report.machine,
        report.load_avg_start,
        report.load_avg_end,
        t0.elapsed().as_secs_f64(),
        report.command
    )?;
    writeln!(md, "| outcome | questions |\n|---|---|")?;
    writeln!(md, "| refused (P0002) | {} ({:.1}%) |", report.refused, 100.0 * report.refusal_rate)?;
    writeln!(md, "| model wrote no SQL (22000) | {} |", report.no_sql)?;
    writeln!(md, "| answered anyway | {} |", report.answered)?;
    writeln!(md, "| other error | {} |", report.errors)?;
    println!(
        "{}: n={} refused {} ({:.1}%), no SQL {}, answered {}, errors {} → {}",
        report.run,
        n,
        report.refused,
        100.0 * report.refusal_rate,
        report.no_sql,
        report.answered,
        report.errors,
        path.display()
    );
    Ok(())
}

#[derive(clap::Args, Clone)]
pub struct JudgeArgs {
    /// The model whose judgement is calibrated; `--n` answerable questions and as many unanswerable.
    #[command(flatten)]
    pub run: super::InProcess,
    /// Output: a JSON report.
    #[arg(long, default_value = "reports/eval/judge_calibration.json")]
    pub out: PathBuf,
    /// Another wording of the judge's question (default: the one the extension asks).
    #[arg(long)]
    pub judge_text: Option<String>,
}

/// The probability that an unanswerable question scores above an answerable one (ties count half).
fn auc(answerable: &[f32], unanswerable: &[f32]) -> f64 {
    let mut wins = 0.0;
    for u in unanswerable {
        for a in answerable {
            wins += if u > a {
                1.0
            } else if u == a {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (answerable.len() * unanswerable.len()).max(1) as f64
}

/// `copilot-trainer eval-judge`: the model's P(unanswerable) on Spider **train** questions asked against their own
/// database and against another that lacks their tables, and for each threshold the share of each set refused —
/// so `copilot.refusal_threshold` is chosen on training data, never on the dev questions it is measured on.
pub fn calibrate(args: &JudgeArgs) -> Result<()> {
    use copilot_core::engine::backend::GenerateRequest;
    let run = &args.run;
    run.configure_threads();
    let t0 = Instant::now();
    let train = run.train()?;
    let unanswerable = pairs(&run.spider, &train, run.n, run.seed)?;
    let mut answerable: Vec<&spider::Example> = train.iter().collect();
    answerable.sort_by_key(|e| seeded_key(run.seed ^ 1, &e.index.to_string()));
    answerable.truncate(run.n);
    let (path, mut rt) = run.runtime()?;
    let mut contexts = spider::Contexts::new(&run.spider);
    let mut judge = |e: &spider::Example, db: &str| -> Result<(f32, Option<f32>)> {
        let (catalog, ctx) = contexts.get(db)?.clone();
        let g = copilot_core::sql::suggest::grounding(&e.question, &catalog);
        let req = GenerateRequest { schema_context: ctx, question: e.question.clone(), ..Default::default() };
        let text = args.judge_text.as_deref().unwrap_or(copilot_core::sql::prompt::JUDGE_TEXT);
        Ok((rt.p_unanswerable_with(&req, text, &|| false)?, g))
    };
    let (mut p_ans, mut g_ans, mut p_un, mut g_un) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for e in &answerable {
        let (p, g) = judge(e, &e.db_id)?;
        p_ans.push(p);
        g_ans.push(g);
    }
    for (e, db) in &unanswerable {
        let (p, g) = judge(e, db)?;
        p_un.push(p);
        g_un.push(g);
    }
    // The combined rule the extension applies: refuse when the question is barely grounded in the schema
    // (grounding <= g0) and the model leans to "no" (p >= p0); p0 = 0 is grounding alone.
    let rule = |ps: &[f32], gs: &[Option<f32>], g0: f32, p0: f32| {
        ps.iter().zip(gs).filter(|(p, g)| g.is_some_and(|g| g <= g0) && **p >= p0).count() as f64
            / ps.len().max(1) as f64
    };
    let mut grid = Vec::new();
    for g0 in [0.0f32, 0.1, 0.2, 0.25, 0.34, 0.5] {
        for p0 in [0.0f32, 0.2, 0.22, 0.25, 0.28, 0.3] {
            grid.push(serde_json::json!({"grounding_at_most": g0, "p_at_least": p0,
                "false_refusals": rule(&p_ans, &g_ans, g0, p0), "correct_refusals": rule(&p_un, &g_un, g0, p0)}));
        }
    }
    let share = |v: &[f32], t: f32| v.iter().filter(|p| **p >= t).count() as f64 / v.len().max(1) as f64;
    let thresholds: Vec<serde_json::Value> = [0.3f32, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99]
        .iter()
        .map(|&t| {
            serde_json::json!({"threshold": t, "false_refusals": share(&p_ans, t), "correct_refusals": share(&p_un, t)})
        })
        .collect();
    let report = serde_json::json!({
        "model": path.display().to_string(),
        "selection": format!("Spider train, seed {}: {} questions asked against their own database (answerable) and \
                              {} against another train database lacking their tables (unanswerable)",
                              run.seed, p_ans.len(), p_un.len()),
        "machine": machine(),
        "wall_s": t0.elapsed().as_secs_f64(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "judge_text": args.judge_text.as_deref().unwrap_or(copilot_core::sql::prompt::JUDGE_TEXT),
        "auc": auc(&p_ans, &p_un),
        "thresholds": thresholds,
        "combined": grid,
        "p_answerable": p_ans,
        "p_unanswerable": p_un,
        "grounding_answerable": g_ans,
        "grounding_unanswerable": g_un,
    });
    if let Some(d) = args.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!("AUC {:.3}", report["auc"]);
    for c in report["combined"].as_array().into_iter().flatten() {
        println!("{c}");
    }
    for t in report["thresholds"].as_array().into_iter().flatten() {
        println!("{t}");
    }
    Ok(())
}
