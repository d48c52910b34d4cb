//! `data for-postgres`: training rows whose SQL PostgreSQL runs.
//!
//! Spider's gold SQL is written for SQLite. On PostgreSQL copies of the train databases (`data load-pg`), 537 of
//! the 6,904 train questions' gold fails (reports/eval/gold_train_on_postgres.json), 387 of them because a column
//! is selected that is neither grouped nor aggregated — SQLite takes it from some row of the group, PostgreSQL
//! refuses it (42803). A model trained on those rows learns to write queries PostgreSQL refuses: it is the largest
//! single cause of the tuned default's unplannable dev answers. This command runs each row's answer (normalized
//! as `data prepare` writes it) on the PostgreSQL copy of its database:
//! - it runs: kept as normalized;
//! - 42803: the column PostgreSQL names is added to a GROUP BY list (each one in the query tried in turn, up to
//!   [`MAX_ADDED`] columns; `copilot_core::sql::hint::add_group_column`, the rewrite the extension offers as a
//!   candidate). The rewrite is kept only when PostgreSQL then runs it and returns the same result as
//!   SQLite for the original answer (as the eval scores: rows, and their order when the query orders them);
//! - anything else, or a rewrite that changes the result: the row is dropped, counted by reason.
//!
//! Rows without a `db_id` pass unchanged (there is nothing to run them on). Nothing here knows Spider's
//! databases: the rule is PostgreSQL's own error and the check is execution.

use super::rows::{self, Row};
use crate::eval::exec::{run_pg, Sqlite};
use crate::eval::results::same_result;
use crate::sqlnorm;
use anyhow::{Context, Result};
use copilot_core::sql::hint::{add_group_column, ungrouped_column};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The most columns added to GROUP BY lists for one answer.
pub const MAX_ADDED: usize = 4;

#[derive(clap::Args)]
pub struct ForPgArgs {
    /// Rows (from `data from-spider`).
    #[arg(long)]
    pub input: PathBuf,
    /// The rows kept, answers normalized (JSONL).
    #[arg(long)]
    pub out: PathBuf,
    /// The Spider folder (its SQLite files give the result a rewrite must keep).
    #[arg(long, default_value = "../shared/data/spider")]
    pub spider: PathBuf,
    /// libpq connection string of the database `data load-pg` filled (one schema per db_id).
    #[arg(long)]
    pub pg: String,
    /// Where to write the counts (JSON); default: next to --out, `<out>.report.json`.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
}

/// What happened to the rows.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub command: String,
    pub machine: String,
    pub rows_in: usize,
    /// Ran on PostgreSQL as written (normalized).
    pub ran: usize,
    /// Rewritten (columns added to GROUP BY) and checked against SQLite's result.
    pub repaired: usize,
    /// No db_id: passed unchanged.
    pub unchecked: usize,
    /// Dropped, by reason: the SQLSTATE PostgreSQL gave, `repair_changed_result`, `unparseable_sql`, …
    pub dropped: BTreeMap<String, usize>,
    pub kept: usize,
    /// A few rewrites, before and after, for the reader.
    pub examples: Vec<(String, String)>,
}

/// The outcome for one row: `Ok(answer)` to keep (normalized, perhaps rewritten; `true` when rewritten), or the
/// reason it is dropped.
fn check_row(
    row: &Row,
    db: &str,
    pg: &mut postgres::Client,
    sqlite: &mut Sqlite,
    timeout: Duration,
) -> Result<(String, bool), String> {
    let known = sqlnorm::catalog_from_context(&row.context).map(|c| sqlnorm::known_names(&c));
    let Some(sql) = sqlnorm::normalize(&row.answer, known.as_ref()) else { return Err("unparseable_sql".into()) };
    let mut current = sql.clone();
    let mut error = match run_pg(pg, db, &current, timeout) {
        Ok(_) => return Ok((sql, false)),
        Err(e) => e,
    };
    for _ in 0..MAX_ADDED {
        let Some(column) = error.strip_prefix("42803: ").and_then(ungrouped_column) else { break };
        // The GROUP BY list the column belongs to: the first rewrite PostgreSQL no longer refuses this way.
        let mut next = None;
        for nth in 0.. {
            let Some(candidate) = add_group_column(&current, &column, nth) else { break };
            match run_pg(pg, db, &candidate, timeout) {
                Ok(result) => {
                    next = Some((candidate, Ok(result)));
                    break;
                }
                Err(e) if e != error => {
                    next = Some((candidate, Err(e)));
                    break;
                }
                Err(_) => {}
            }
        }
        let Some((candidate, outcome)) = next else { break };
        current = candidate;
        match outcome {
            Ok(result) => {
                let gold = sqlite.run(db, &row.answer, timeout).map_err(|_| "sqlite_failed".to_string())?;
                let ordered = crate::eval::score::has_order_by(&row.answer);
                return if same_result(&gold, &result, ordered) {
                    Ok((current, true))
                } else {
                    Err("repair_changed_result".into())
                };
            }
            Err(e) => error = e,
        }
    }
    Err(error.split(':').next().unwrap_or("error").to_string())
}

pub fn run(args: &ForPgArgs) -> Result<()> {
    let input = rows::read(&args.input)?;
    let mut pg = postgres::Client::connect(&args.pg, postgres::NoTls)
        .with_context(|| format!("cannot connect to PostgreSQL ({})", args.pg))?;
    let mut sqlite = Sqlite::new(&args.spider);
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: copilot_core::engine::host::machine(),
        rows_in: input.len(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(input.len());
    for row in input {
        let Some(db) = row.db_id.clone() else {
            report.unchecked += 1;
            out.push(row);
            continue;
        };
        match check_row(&row, &db, &mut pg, &mut sqlite, timeout) {
            Ok((answer, repaired)) => {
                if repaired {
                    report.repaired += 1;
                    if report.examples.len() < 20 {
                        report.examples.push((row.answer.clone(), answer.clone()));
                    }
                } else {
                    report.ran += 1;
                }
                out.push(Row { answer, ..row });
            }
            Err(why) => *report.dropped.entry(why).or_default() += 1,
        }
    }
    report.kept = out.len();
    rows::write_jsonl(&args.out, &out)?;
    let report_path = args.report.clone().unwrap_or_else(|| args.out.with_extension("report.json"));
    std::fs::write(&report_path, serde_json::to_string_pretty(&report)?)?;
    println!(
        "{} rows: {} ran on PostgreSQL, {} repaired (GROUP BY), {} unchecked, {} dropped {:?} → {} ({})",
        report.rows_in,
        report.ran,
        report.repaired,
        report.unchecked,
        report.rows_in - report.kept,
        report.dropped,
        args.out.display(),
        report_path.display()
    );
    Ok(())
}
