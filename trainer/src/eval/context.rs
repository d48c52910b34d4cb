//! `eval-context`: how well schema selection keeps what each question needs, without asking the model.
//!
//! With every loaded Spider schema (and any distractor schema) visible at once, each question's
//! `copilot.context(question)` is read at each budget: is every table the gold query reads among the tables shown
//! (gold-table recall)? And every column the gold query names, in those tables (gold-column recall: a table shown
//! without the column asked for fails the question as surely as a missing table)? How many tables, how many
//! characters (the extension estimates tokens as characters / 3), and how long does `context()` take (catalog read,
//! scoring, selection — what every ask pays before the model)?

use super::askers::{context_columns, context_tables};
use super::run::{hardness_of, stratified_sample};
use super::score::{gold_columns, gold_tables};
use super::spider_match::{self, Schema};
use crate::host::{load_avg, machine, utc_now};
use crate::spider;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;
use tracing::info;

#[derive(clap::Args, Clone)]
pub struct ContextArgs {
    /// libpq connection string of the database holding the loaded Spider schemas.
    #[arg(long)]
    pub pg: String,
    #[arg(long, default_value = "../shared/data/spider")]
    pub spider: PathBuf,
    /// The schemas shown at once (`copilot.context` reads them with search_path = public).
    #[arg(long, value_name = "SCHEMA,SCHEMA,…")]
    pub schemas: String,
    /// `copilot.context_budget_tokens` values to measure (0 = what `copilot.max_context_tokens` leaves).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub budgets: Vec<i64>,
    /// A fixed sample of N dev questions, stratified by hardness (seeded; the same questions `eval --sample N`
    /// asks).
    #[arg(long)]
    pub sample: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Write the JSON here (default: stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Miss {
    db_id: String,
    question: String,
    gold_tables: Vec<String>,
    /// Gold tables not shown, then gold columns (`schema.table.column`) of shown tables that were dropped.
    missing: Vec<String>,
    tables_shown: usize,
}

#[derive(Debug, Serialize)]
struct AtBudget {
    budget_tokens: i64,
    questions: usize,
    /// Questions whose gold tables parsed (the recall's denominator).
    scored: usize,
    recall: f64,
    /// Questions whose every gold table is shown with every column the gold query names (of `scored`).
    column_recall: f64,
    tables_p50: usize,
    tables_p95: usize,
    chars_p50: usize,
    chars_p95: usize,
    context_ms_p50: f64,
    context_ms_p95: f64,
    misses: Vec<Miss>,
}

#[derive(Debug, Serialize)]
struct ContextReport {
    command: String,
    machine: String,
    load_avg_start: String,
    load_avg_end: String,
    started_utc: String,
    schemas: usize,
    tables_total: usize,
    full_context_chars: usize,
    full_context_ms: f64,
    budgets: Vec<AtBudget>,
}

fn pctl<T: Copy + PartialOrd>(v: &mut [T], p: f64) -> Option<T> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    (!v.is_empty()).then(|| v[(((v.len() - 1) as f64) * p / 100.0).round() as usize])
}

pub fn run(args: &ContextArgs) -> Result<()> {
    let started_utc = utc_now();
    let load_avg_start = load_avg();
    let tables = spider::load_tables(&args.spider)?;
    let schemas: HashMap<String, Schema> = tables.iter().map(|(k, v)| (k.clone(), Schema::from_spider(v))).collect();
    let mut items: Vec<(spider::Example, Option<spider_match::Hardness>)> = spider::load_dev(&args.spider)?
        .into_iter()
        .filter(|e| spider::sqlite_path(&args.spider, &e.db_id).is_file())
        .map(|e| {
            let h = hardness_of(&e, &schemas);
            (e, h)
        })
        .collect();
    if let Some(n) = args.sample {
        let keys: Vec<_> = items.iter().map(|(e, h)| (e.index, *h)).collect();
        let keep: std::collections::HashSet<usize> = stratified_sample(&keys, n, args.seed).into_iter().collect();
        items.retain(|(e, _)| keep.contains(&e.index));
    }
    if items.is_empty() {
        bail!("no questions selected");
    }
    let mut pg = postgres::Client::connect(&args.pg, postgres::NoTls)
        .with_context(|| format!("cannot connect to PostgreSQL ({})", args.pg))?;
    pg.execute("SELECT set_config('copilot.schemas', $1, false)", &[&args.schemas])?;
    // Qualified names, so each table shown says its schema; the tables chosen are the same either way.
    pg.batch_execute("SET search_path = public; SET copilot.bare_table_names = off")?;
    let t0 = Instant::now();
    let full: String = pg.query_one("SELECT copilot.context()", &[])?.get(0);
    let full_context_ms = t0.elapsed().as_secs_f64() * 1e3;
    let tables_total = context_tables(&full, "public").len();
    info!("{} tables, {} characters in the full context", tables_total, full.len());
    let mut budgets = Vec::new();
    for &b in &args.budgets {
        pg.execute("SELECT set_config('copilot.context_budget_tokens', $1, false)", &[&b.to_string()])?;
        let (mut tabs, mut chars, mut ms, mut hits, mut whole, mut scored, mut misses) =
            (Vec::new(), Vec::new(), Vec::new(), 0usize, 0usize, 0usize, Vec::new());
        for (ex, _) in &items {
            let t = Instant::now();
            let ctx: String = pg
                .query_one("SELECT copilot.context($1)", &[&ex.question])
                .with_context(|| format!("copilot.context({:?})", ex.question))?
                .get(0);
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            let shown = context_tables(&ctx, "public");
            tabs.push(shown.len());
            chars.push(ctx.len());
            let Some(gold) = gold_tables(ex, schemas.get(&ex.db_id)) else { continue };
            scored += 1;
            let mut missing: Vec<String> = gold.iter().filter(|t| !shown.contains(t)).cloned().collect();
            let tables_missing = missing.len();
            let columns = context_columns(&ctx, "public");
            missing.extend(gold_columns(ex, schemas.get(&ex.db_id)).unwrap_or_default().into_iter().filter(|c| {
                !columns.contains(c) && c.rsplit_once('.').is_some_and(|(t, _)| shown.contains(&t.to_string()))
            }));
            if tables_missing == 0 {
                hits += 1;
            }
            if missing.is_empty() {
                whole += 1;
            } else {
                misses.push(Miss {
                    db_id: ex.db_id.clone(),
                    question: ex.question.clone(),
                    gold_tables: gold,
                    missing,
                    tables_shown: shown.len(),
                });
            }
        }
        let at = AtBudget {
            budget_tokens: b,
            questions: items.len(),
            scored,
            recall: if scored == 0 { 0.0 } else { hits as f64 / scored as f64 },
            column_recall: if scored == 0 { 0.0 } else { whole as f64 / scored as f64 },
            tables_p50: pctl(&mut tabs, 50.0).unwrap_or(0),
            tables_p95: pctl(&mut tabs, 95.0).unwrap_or(0),
            chars_p50: pctl(&mut chars, 50.0).unwrap_or(0),
            chars_p95: pctl(&mut chars, 95.0).unwrap_or(0),
            context_ms_p50: pctl(&mut ms, 50.0).unwrap_or(0.0),
            context_ms_p95: pctl(&mut ms, 95.0).unwrap_or(0.0),
            misses,
        };
        info!(
            "budget {b}: recall {:.1}% ({} of {scored}), with every gold column {:.1}%, tables p50 {}, chars p50 {}, \
             context() p50 {:.0} ms",
            100.0 * at.recall,
            hits,
            100.0 * at.column_recall,
            at.tables_p50,
            at.chars_p50,
            at.context_ms_p50
        );
        budgets.push(at);
    }
    let report = ContextReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine(),
        load_avg_start,
        load_avg_end: load_avg(),
        started_utc,
        schemas: args.schemas.split(',').filter(|s| !s.trim().is_empty()).count(),
        tables_total,
        full_context_chars: full.len(),
        full_context_ms,
        budgets,
    };
    let json = serde_json::to_string_pretty(&report)?;
    match &args.out {
        Some(p) => std::fs::write(p, json).with_context(|| format!("cannot write {}", p.display()))?,
        None => println!("{json}"),
    }
    Ok(())
}
