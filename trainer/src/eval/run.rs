//! `eval`'s two phases: ask (resumable) and score (always redone), then the report.

use super::askers::{make_asker, read_asked, Asker};
use super::exec::Sqlite;
use super::score::{score_one, summarize};
use super::spider_match::{self, Hardness, Schema};
use super::{report, EvalArgs, Report, Split, Via};
use crate::host::{load_avg, machine, utc_now};
use crate::seed::seeded_key;
use crate::spider::{self, Contexts, Example};
use anyhow::{anyhow, bail, Context, Result};
use copilot_core::sql::schema::quote_ident;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// A sample of `n` stratified by hardness: each level gets its share (largest remainders), chosen by seeded
/// hash order; returned in file order.
pub fn stratified_sample(items: &[(usize, Option<Hardness>)], n: usize, seed: u64) -> Vec<usize> {
    if n >= items.len() {
        return items.iter().map(|x| x.0).collect();
    }
    let mut groups: BTreeMap<Option<Hardness>, Vec<usize>> = BTreeMap::new();
    for (i, h) in items {
        groups.entry(*h).or_default().push(*i);
    }
    let total = items.len() as f64;
    let mut quotas: Vec<(Option<Hardness>, usize, f64)> = groups
        .iter()
        .map(|(h, v)| {
            let exact = n as f64 * v.len() as f64 / total;
            (*h, exact.floor() as usize, exact - exact.floor())
        })
        .collect();
    let mut left = n - quotas.iter().map(|q| q.1).sum::<usize>();
    let mut order: Vec<usize> = (0..quotas.len()).collect();
    order.sort_by(|a, b| quotas[*b].2.partial_cmp(&quotas[*a].2).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(b)));
    for i in order {
        if left == 0 {
            break;
        }
        quotas[i].1 += 1;
        left -= 1;
    }
    let mut picked = Vec::with_capacity(n);
    for (h, quota, _) in quotas {
        let mut v = groups[&h].clone();
        v.sort_by_key(|i| seeded_key(seed, &i.to_string()));
        picked.extend(v.into_iter().take(quota));
    }
    picked.sort_unstable();
    picked
}

/// A question's Spider hardness, when its gold query parses against its database's schema.
pub(super) fn hardness_of(e: &Example, schemas: &HashMap<String, Schema>) -> Option<Hardness> {
    schemas.get(&e.db_id).and_then(|s| spider_match::parse(&e.query, s).ok()).map(|t| spider_match::hardness(&t))
}

/// Questions with their hardness (when the gold parses).
type Selected = Vec<(Example, Option<Hardness>)>;

/// The questions of a run — executable ones (their SQLite file exists), filtered, sampled, limited — and a line
/// saying which.
fn select_questions(args: &EvalArgs, schemas: &HashMap<String, Schema>) -> Result<(Selected, Vec<Example>, String)> {
    let all = match args.split {
        Split::Dev => spider::load_dev(&args.spider)?,
        Split::DevSyn => spider::load_dev_syn(&args.spider)?,
        Split::Train => spider::load_train(&args.spider)?,
    };
    let total = all.len();
    let mut items: Vec<(Example, Option<Hardness>)> = all
        .into_iter()
        .filter(|e| spider::sqlite_path(&args.spider, &e.db_id).is_file())
        .filter(|e| args.dbs.is_empty() || args.dbs.contains(&e.db_id))
        .filter(|e| args.indexes.is_empty() || args.indexes.contains(&e.index))
        .map(|e| {
            let h = hardness_of(&e, schemas);
            (e, h)
        })
        .collect();
    let mut taught = Vec::new();
    if let Some(share) = args.teach_share {
        let (t, rest) = teach_split(items, share, args.seed);
        taught = t;
        items = rest;
    }
    let executable = items.len() + taught.len();
    let split = match args.split {
        Split::Dev => "dev",
        Split::DevSyn => "dev (Spider-Syn paraphrases)",
        Split::Train => "train",
    };
    let mut desc = format!("Spider {split}: {executable} executable questions (of {total})");
    if !args.dbs.is_empty() {
        desc.push_str(&format!(" on {}", args.dbs.join(", ")));
    }
    if !args.indexes.is_empty() {
        desc.push_str(&format!(", only the {} at positions given by --index", items.len() + taught.len()));
    }
    if let Some(share) = args.teach_share {
        desc.push_str(&format!(
            "; {} of each database's questions (seed {}) taught ({} questions{}), the other {} asked",
            share,
            args.seed,
            taught.len(),
            if args.teach { ", stored with copilot.teach" } else { ", NOT stored: the baseline" },
            items.len()
        ));
    }
    if let Some(n) = args.sample {
        let keys: Vec<(usize, Option<Hardness>)> = items.iter().map(|(e, h)| (e.index, *h)).collect();
        let keep: HashSet<usize> = stratified_sample(&keys, n, args.seed).into_iter().collect();
        items.retain(|(e, _)| keep.contains(&e.index));
        desc.push_str(&format!(", a sample of {} stratified by hardness (seed {})", items.len(), args.seed));
    }
    if let Some(l) = args.limit {
        items.truncate(l);
        desc.push_str(&format!(", the first {}", items.len()));
    }
    Ok((items, taught, desc))
}

/// Split each database's questions: the `share` of them with the smallest seeded hash of their position is taught,
/// the rest asked. Deterministic, and the same split with or without `--teach`.
fn teach_split(items: Selected, share: f64, seed: u64) -> (Vec<Example>, Selected) {
    let hash = |i: usize| {
        let mut z = (i as u64) ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut by_db: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, (e, _)) in items.iter().enumerate() {
        by_db.entry(e.db_id.clone()).or_default().push(i);
    }
    let mut teach: HashSet<usize> = HashSet::new();
    for positions in by_db.values_mut() {
        positions.sort_by_key(|&p| hash(items[p].0.index));
        let n = (share.clamp(0.0, 1.0) * positions.len() as f64).round() as usize;
        teach.extend(positions.iter().take(n));
    }
    let (mut taught, mut rest) = (Vec::new(), Vec::new());
    for (i, item) in items.into_iter().enumerate() {
        if teach.contains(&i) {
            taught.push(item.0);
        } else {
            rest.push(item);
        }
    }
    (taught, rest)
}

/// Empty `copilot.examples`, then (with `teach`) store every taught question with its gold SQL as the caller of
/// `pg`, each in its database's schema. Returns (stored, refused by copilot.teach).
fn teach_all(pg: &mut postgres::Client, taught: &[Example], teach: bool) -> Result<(usize, usize)> {
    pg.batch_execute("DELETE FROM copilot.examples").context("cannot empty copilot.examples")?;
    if !teach {
        return Ok((0, 0));
    }
    let (mut stored, mut refused) = (0, 0);
    for e in taught {
        pg.batch_execute(&format!("SET search_path = {}", quote_ident(&e.db_id.to_lowercase())))?;
        match pg.query_one("SELECT copilot.teach($1, $2)", &[&e.question, &e.query]) {
            Ok(_) => stored += 1,
            Err(err) => {
                refused += 1;
                warn!(
                    "teach refused {} ({}): {}",
                    e.index,
                    e.db_id,
                    err.as_db_error().map_or(err.to_string(), |d| d.message().to_string())
                );
            }
        }
    }
    pg.batch_execute("RESET search_path")?;
    Ok((stored, refused))
}

pub fn run(args: &EvalArgs) -> Result<()> {
    if args.via == Via::Core && !args.score_only {
        // SAFETY: first thing in the command, before any thread (a PostgreSQL client, candle's pools) exists.
        unsafe { copilot_core::engine::runtime::configure_threads(args.threads) };
    }
    let started_utc = utc_now();
    let load_avg_start = load_avg();
    let t0 = Instant::now();
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let tables = spider::load_tables(&args.spider)?;
    let schemas: HashMap<String, Schema> = tables.iter().map(|(k, v)| (k.clone(), Schema::from_spider(v))).collect();
    let (items, taught, mut selection) = select_questions(args, &schemas)?;
    if items.is_empty() {
        bail!("no questions selected");
    }
    info!("{selection}");
    let asked_path = args.out.join(format!("{}.asked.jsonl", args.run));
    if args.fresh {
        let _ = std::fs::remove_file(&asked_path);
    }
    let mut asked = read_asked(&asked_path)?;
    let mut contexts = Contexts::new(&args.spider);
    let mut pg = postgres::Client::connect(&args.pg, postgres::NoTls)
        .with_context(|| format!("cannot connect to PostgreSQL ({})", args.pg))?;
    if args.teach_share.is_some() && !args.score_only {
        if args.via != Via::Extension {
            bail!("--teach-share needs --via extension");
        }
        let (stored, refused) = teach_all(&mut pg, &taught, args.teach)?;
        if args.teach {
            selection.push_str(&format!(
                " ({stored} stored, {refused} refused by copilot.teach: their gold SQL does not plan on PostgreSQL)"
            ));
        }
    }
    let mut asker = if args.score_only { None } else { Some(make_asker(args)?) };
    let model = model_label(args, asker.as_deref(), &mut pg);

    let context_mismatches = match asker.as_mut() {
        Some(a) => ask_all(a.as_mut(), &items, &mut asked, &asked_path, &mut contexts)?,
        None => Vec::new(),
    };
    let records = score_all(args, &items, &asked, &mut contexts, &schemas, &mut pg)?;
    let summary = summarize(&records);
    let selection = if records.len() < items.len() {
        format!(
            "{selection}; {} of these {} answered so far (incomplete run: rerun the same command to resume)",
            records.len(),
            items.len()
        )
    } else {
        selection
    };
    let mut report = Report {
        run: args.run.clone(),
        via: args.via,
        model,
        model_sha256: asker.as_mut().and_then(|a| a.sha256()),
        selection,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine(),
        load_avg_start,
        load_avg_end: load_avg(),
        started_utc,
        wall_s: t0.elapsed().as_secs_f64(),
        context_mismatches,
        summary,
        records,
    };
    if args.score_only {
        keep_earlier_measurements(args, &mut report);
    }
    report::write(&report, &args.out)?;
    let s = &report.summary;
    println!(
        "{}: n={} EX {:.1}% exact-set {:.1}% exact {:.1}% valid {:.1}% p50 {:.2}s p95 {:.2}s → {}",
        report.run,
        s.n,
        100.0 * s.ex,
        100.0 * s.exact_set,
        100.0 * s.exact,
        100.0 * s.valid_sql,
        s.latency_p50_s,
        s.latency_p95_s,
        args.out.join(format!("{}.json", report.run)).display()
    );
    Ok(())
}

/// The model's name in the report: `--label`, the file's name, the extension's `copilot.model`, or "gold".
fn model_label(args: &EvalArgs, asker: Option<&dyn Asker>, pg: &mut postgres::Client) -> String {
    match (&args.label, asker, args.via) {
        (Some(l), _, _) => l.clone(),
        (None, Some(a), Via::Core) => a.label(),
        (None, _, Via::Extension) => pg
            .query_one("SELECT current_setting('copilot.model')", &[])
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_else(|_| "copilot.model".into()),
        (None, _, Via::Gold) => "gold SQL (normalized)".into(),
        (None, _, _) => args.model.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
    }
}

/// Phase 1: ask every question not yet in the asked file, appending each answer as it arrives. Returns the
/// databases whose context, as the asker sees it, differs from the one core renders for training.
fn ask_all(
    asker: &mut dyn Asker,
    items: &[(Example, Option<Hardness>)],
    asked: &mut HashMap<usize, super::Asked>,
    asked_path: &std::path::Path,
    contexts: &mut Contexts,
) -> Result<Vec<String>> {
    let mut mismatches = Vec::new();
    let todo: Vec<&(Example, Option<Hardness>)> = items.iter().filter(|(e, _)| !asked.contains_key(&e.index)).collect();
    if todo.is_empty() {
        return Ok(mismatches);
    }
    info!(
        "asking {} questions ({} already answered in {})",
        todo.len(),
        items.len() - todo.len(),
        asked_path.display()
    );
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(asked_path)?;
    let bar = ProgressBar::new(todo.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {elapsed_precise} eta {eta} {msg}")
            .map_err(|e| anyhow!("{e}"))?,
    );
    let mut checked_ctx: HashSet<String> = HashSet::new();
    for (ex, _) in todo {
        let ctx = contexts.get(&ex.db_id)?.1.clone();
        if checked_ctx.insert(ex.db_id.clone()) {
            if let Some(theirs) = asker.context(&ex.db_id) {
                if theirs != ctx {
                    warn!("{}: copilot.context() differs from the context core renders for training", ex.db_id);
                    mismatches.push(ex.db_id.clone());
                }
            }
        }
        let a = asker.ask(ex, &ctx);
        bar.set_message(format!("{} {:.1}s", ex.db_id, a.latency_s));
        writeln!(file, "{}", serde_json::to_string(&a)?)?;
        file.flush()?;
        asked.insert(a.index, a);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(mismatches)
}

/// Phase 2: score every answered question (gold on SQLite, the prediction on PostgreSQL).
fn score_all(
    args: &EvalArgs,
    items: &[(Example, Option<Hardness>)],
    asked: &HashMap<usize, super::Asked>,
    contexts: &mut Contexts,
    schemas: &HashMap<String, Schema>,
    pg: &mut postgres::Client,
) -> Result<Vec<super::Record>> {
    let mut sqlite = Sqlite::new(&args.spider);
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut records = Vec::with_capacity(items.len());
    for (ex, h) in items {
        let Some(a) = asked.get(&ex.index) else { continue };
        let (catalog, _) = contexts.get(&ex.db_id)?.clone();
        // With --schemas the question was asked with every schema visible: its answer runs the same way.
        let search_path = if args.schemas.is_some() { "public" } else { ex.db_id.as_str() };
        records.push(score_one(ex, *h, a, &catalog, schemas.get(&ex.db_id), &mut sqlite, pg, timeout, search_path));
    }
    Ok(records)
}

/// Rescoring (`--score-only`) keeps what the asking run measured: its model, command, machine, load, start and
/// wall time.
fn keep_earlier_measurements(args: &EvalArgs, report: &mut Report) {
    let earlier = std::fs::read_to_string(args.out.join(format!("{}.json", args.run)))
        .ok()
        .and_then(|t| serde_json::from_str::<Report>(&t).ok());
    if let Some(e) = earlier {
        report.model = e.model;
        report.model_sha256 = e.model_sha256;
        report.command = e.command;
        report.machine = e.machine;
        report.load_avg_start = e.load_avg_start;
        report.load_avg_end = e.load_avg_end;
        report.started_utc = e.started_utc;
        report.wall_s = e.wall_s;
        report.context_mismatches = e.context_mismatches;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teach_split_takes_the_share_of_each_database_deterministically() {
        let ex = |i: usize, db: &str| {
            (Example { index: i, db_id: db.into(), question: format!("q{i}"), query: "SELECT 1".into() }, None)
        };
        let items: Selected = (0..40).map(|i| ex(i, if i < 10 { "a" } else { "b" })).collect();
        let (taught, rest) = teach_split(items.clone(), 0.5, 42);
        assert_eq!(taught.iter().filter(|e| e.db_id == "a").count(), 5);
        assert_eq!(taught.iter().filter(|e| e.db_id == "b").count(), 15);
        assert_eq!(taught.len() + rest.len(), 40);
        assert!(rest.iter().all(|(r, _)| taught.iter().all(|t| t.index != r.index)), "disjoint");
        let again = teach_split(items.clone(), 0.5, 42).0;
        assert_eq!(
            taught.iter().map(|e| e.index).collect::<Vec<_>>(),
            again.iter().map(|e| e.index).collect::<Vec<_>>()
        );
        assert_ne!(
            taught.iter().map(|e| e.index).collect::<Vec<_>>(),
            teach_split(items, 0.5, 7).0.iter().map(|e| e.index).collect::<Vec<_>>()
        );
    }

    #[test]
    fn stratified_sample_keeps_shares_and_is_deterministic() {
        let mut items = Vec::new();
        for i in 0..100 {
            let h = match i % 10 {
                0..=1 => Hardness::Easy,
                2..=6 => Hardness::Medium,
                7..=8 => Hardness::Hard,
                _ => Hardness::Extra,
            };
            items.push((i, Some(h)));
        }
        let a = stratified_sample(&items, 30, 42);
        assert_eq!(a.len(), 30);
        assert_eq!(a, stratified_sample(&items, 30, 42));
        assert_ne!(a, stratified_sample(&items, 30, 7));
        let count = |h: Hardness| a.iter().filter(|i| items[**i].1 == Some(h)).count();
        assert_eq!(
            (count(Hardness::Easy), count(Hardness::Medium), count(Hardness::Hard), count(Hardness::Extra)),
            (6, 15, 6, 3)
        );
        assert!(a.windows(2).all(|w| w[0] < w[1]));
    }
}
