//! `copilot-trainer eval`: measure answers on Spider, through the extension (the product path) or through core's
//! runtime in-process (quick experiments), with the same scoring.
//!
//! Two phases. **Ask** (resumable): each question's prediction, latency and token counts are appended to
//! `<out>/<run>.asked.jsonl` as soon as they exist; a rerun skips the questions already there. **Score** (cheap,
//! always redone from the asked file): gold runs on Spider's SQLite file and the prediction on PostgreSQL over the
//! same rows (read-only transaction, per-query timeout), then execution accuracy, exact match after
//! normalization, no-values exact match, valid SQL, schema adherence and Spider exact-set-match are computed, and
//! `<run>.json` (summary + every question), `<run>.md` and `<run>.png` are written.

pub mod report;
pub mod results;
pub mod spider_match;
pub mod wikisql;

use crate::spider::{self, Contexts, Example};
use crate::sqlnorm;
use anyhow::{anyhow, bail, Context, Result};
use copilot_core::backend::{Backend, GenerateRequest};
use copilot_core::gate;
use copilot_core::schema::quote_ident;
use indicatif::{ProgressBar, ProgressStyle};
use results::{Cell, ResultSet};
use serde::{Deserialize, Serialize};
use spider_match::{Hardness, Schema};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{info, warn};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// `SELECT copilot.ask(…)` in a database where `data load-pg` loaded the Spider databases (one schema each).
    Extension,
    /// core's runtime in this process, with the context rendered from the SQLite files.
    Core,
    /// No model: the gold SQL itself, normalized as `data prepare` writes it. Measures the harness's ceiling — how
    /// often Spider's SQLite gold gives the same result on the PostgreSQL copy.
    Gold,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    Dev,
    Train,
}

#[derive(clap::Args, Clone)]
pub struct EvalArgs {
    #[arg(long, value_enum)]
    pub via: Via,
    /// libpq connection string of the database holding the loaded Spider schemas (predictions run there; with
    /// `--via extension` the questions are asked there too).
    #[arg(long, default_value = "host=/var/run/postgresql dbname=copilot_eval")]
    pub pg: String,
    /// The GGUF for `--via core`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A name for the model in the report (default: the model file's name, or the extension's copilot.model).
    #[arg(long)]
    pub label: Option<String>,
    #[arg(long, default_value = "../shared/data/spider")]
    pub spider: PathBuf,
    #[arg(long, value_enum, default_value_t = Split::Dev)]
    pub split: Split,
    /// Only these databases (repeat).
    #[arg(long = "db")]
    pub dbs: Vec<String>,
    /// A fixed sample of N questions, stratified by hardness (seeded).
    #[arg(long)]
    pub sample: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// At most N questions (after sampling), in file order.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Run name: output files are <out>/<run>.{asked.jsonl,json,md,png}.
    #[arg(long)]
    pub run: String,
    #[arg(long, default_value = "reports/eval")]
    pub out: PathBuf,
    /// Per-query timeout for executing gold and predicted SQL.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// `--via core`: inference threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// `--via core`: the most tokens generated (the extension's copilot.max_new_tokens default).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Ignore earlier answers in the asked file and start over.
    #[arg(long)]
    pub fresh: bool,
    /// Do not ask anything: score what the asked file holds.
    #[arg(long)]
    pub score_only: bool,
}

/// What asking produced for one question (one line of `<run>.asked.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Asked {
    pub index: usize,
    pub prediction: Option<String>,
    pub ask_error: Option<String>,
    pub latency_s: f64,
    pub prompt_tokens: Option<i64>,
    pub generated_tokens: Option<i64>,
    pub decode_tok_s: Option<f64>,
}

/// One scored question.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub index: usize,
    pub db_id: String,
    pub question: String,
    pub gold: String,
    pub hardness: Option<Hardness>,
    pub prediction: Option<String>,
    pub ask_error: Option<String>,
    pub latency_s: f64,
    pub prompt_tokens: Option<i64>,
    pub decode_tok_s: Option<f64>,
    pub valid_sql: bool,
    pub schema_ok: bool,
    pub exact: bool,
    pub exact_novalues: bool,
    pub exact_set: bool,
    pub ex: bool,
    pub exec_error: Option<String>,
    pub gold_rows: Option<usize>,
    pub pred_rows: Option<usize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Bucket {
    pub n: usize,
    pub ex: f64,
    pub exact_set: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub ex: f64,
    pub exact: f64,
    pub exact_novalues: f64,
    pub exact_set: f64,
    pub valid_sql: f64,
    pub schema_ok: f64,
    pub ask_errors: usize,
    pub exec_errors: usize,
    pub latency_p50_s: f64,
    pub latency_p95_s: f64,
    pub decode_tok_s_p50: Option<f64>,
    pub prompt_tokens_p50: Option<i64>,
    pub by_hardness: BTreeMap<String, Bucket>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub run: String,
    pub via: Via,
    pub model: String,
    pub model_sha256: Option<String>,
    pub selection: String,
    pub command: String,
    pub machine: String,
    pub load_avg_start: String,
    pub load_avg_end: String,
    pub started_utc: String,
    pub wall_s: f64,
    /// Databases whose context through the extension differed from the one core renders for training.
    pub context_mismatches: Vec<String>,
    pub summary: Summary,
    pub records: Vec<Record>,
}

/// The CPU's model name from /proc/cpuinfo.
pub fn cpu_model() -> Option<String> {
    std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
    })
}

pub fn machine() -> String {
    let cpu = cpu_model().unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0)))
        .unwrap_or(0);
    format!("{cpu}, {cores} cores, {:.0} GB RAM", mem as f64 / 1048576.0)
}

pub fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// A seeded, machine-independent order: sha256(seed:index).
pub fn seeded_key(seed: u64, key: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!("{seed}:{key}").as_bytes());
    h.finalize().into()
}

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

// ---------------------------------------------------------------------------------------------------------------
// Execution.

pub struct Sqlite {
    conns: HashMap<String, rusqlite::Connection>,
    root: PathBuf,
}

impl Sqlite {
    pub fn new(root: &Path) -> Sqlite {
        Sqlite { conns: HashMap::new(), root: root.to_path_buf() }
    }

    pub fn run(&mut self, db: &str, sql: &str, timeout: Duration) -> Result<ResultSet, String> {
        if !self.conns.contains_key(db) {
            let c = rusqlite::Connection::open_with_flags(
                spider::sqlite_path(&self.root, db),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .map_err(|e| e.to_string())?;
            self.conns.insert(db.to_string(), c);
        }
        let conn = &self.conns[db];
        let start = Instant::now();
        conn.progress_handler(10_000, Some(move || start.elapsed() > timeout));
        let out = (|| {
            let mut stmt = conn.prepare(sql)?;
            let columns = stmt.column_count();
            let mut rows = Vec::new();
            let mut q = stmt.query([])?;
            while let Some(r) = q.next()? {
                rows.push((0..columns).map(|i| r.get_ref(i).map(Cell::from_sqlite)).collect::<Result<Vec<_>, _>>()?);
            }
            Ok::<_, rusqlite::Error>(ResultSet { columns, rows })
        })();
        conn.progress_handler(0, None::<fn() -> bool>);
        out.map_err(|e| e.to_string())
    }
}

fn pg_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}

/// Run a predicted query in a read-only transaction that is rolled back, with a statement timeout.
pub fn run_pg(client: &mut postgres::Client, db: &str, sql: &str, timeout: Duration) -> Result<ResultSet, String> {
    let mut tx = client.build_transaction().read_only(true).start().map_err(|e| pg_error(&e))?;
    tx.batch_execute(&format!(
        "SET LOCAL search_path = {}; SET LOCAL statement_timeout = {}",
        quote_ident(&db.to_lowercase()),
        timeout.as_millis()
    ))
    .map_err(|e| pg_error(&e))?;
    let stmt = tx.prepare(sql).map_err(|e| pg_error(&e))?;
    let types: Vec<String> = stmt.columns().iter().map(|c| c.type_().name().to_string()).collect();
    let msgs = tx.simple_query(sql).map_err(|e| pg_error(&e))?;
    let mut rows = Vec::new();
    for m in msgs {
        if let postgres::SimpleQueryMessage::Row(r) = m {
            rows.push((0..types.len()).map(|i| Cell::from_pg_text(r.get(i), &types[i])).collect());
        }
    }
    let _ = tx.rollback();
    Ok(ResultSet { columns: types.len(), rows })
}

// ---------------------------------------------------------------------------------------------------------------

fn read_asked(path: &Path) -> Result<HashMap<usize, Asked>> {
    let mut out = HashMap::new();
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(out) };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Asked>(line) {
            Ok(a) => {
                out.insert(a.index, a);
            }
            // A line cut short by an interrupted run: ignore it, the question is asked again.
            Err(e) => warn!("{}:{}: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

trait Asker {
    fn label(&self) -> String;
    fn sha256(&mut self) -> Option<String>;
    fn ask(&mut self, ex: &Example, context: &str) -> Asked;
    fn context(&mut self, _db: &str) -> Option<String> {
        None
    }
}

struct ExtensionAsker {
    client: postgres::Client,
    current_db: String,
}

impl Asker for ExtensionAsker {
    fn label(&self) -> String {
        "copilot.model".into()
    }
    fn sha256(&mut self) -> Option<String> {
        self.client
            .query_one("SELECT model_sha256 FROM copilot.status()", &[])
            .ok()
            .and_then(|r| r.get::<_, Option<String>>(0))
    }
    fn context(&mut self, db: &str) -> Option<String> {
        self.use_db(db).ok()?;
        self.client.query_one("SELECT copilot.context()", &[]).ok().map(|r| r.get(0))
    }
    fn ask(&mut self, ex: &Example, _context: &str) -> Asked {
        let mut a = Asked {
            index: ex.index,
            prediction: None,
            ask_error: None,
            latency_s: 0.0,
            prompt_tokens: None,
            generated_tokens: None,
            decode_tok_s: None,
        };
        if let Err(e) = self.use_db(&ex.db_id) {
            a.ask_error = Some(e);
            return a;
        }
        let t0 = Instant::now();
        match self.client.query_one("SELECT copilot.ask($1)", &[&ex.question]) {
            Ok(r) => a.prediction = Some(r.get(0)),
            Err(e) => a.ask_error = Some(pg_error(&e)),
        }
        a.latency_s = t0.elapsed().as_secs_f64();
        if let Ok(r) =
            self.client.query_one("SELECT last_prompt_tokens::int8, last_decode_tok_s FROM copilot.status()", &[])
        {
            a.prompt_tokens = r.get(0);
            a.decode_tok_s = r.get(1);
        }
        a
    }
}

impl ExtensionAsker {
    fn use_db(&mut self, db: &str) -> Result<(), String> {
        if self.current_db != db {
            self.client
                .batch_execute(&format!("SET search_path = {}", quote_ident(&db.to_lowercase())))
                .map_err(|e| pg_error(&e))?;
            self.current_db = db.to_string();
        }
        Ok(())
    }
}

struct CoreAsker {
    rt: copilot_core::runtime::Runtime,
    path: PathBuf,
    max_new_tokens: usize,
}

impl Asker for CoreAsker {
    fn label(&self) -> String {
        self.path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }
    fn sha256(&mut self) -> Option<String> {
        copilot_core::source::sha256_file(&self.path).ok()
    }
    fn ask(&mut self, ex: &Example, context: &str) -> Asked {
        let req = GenerateRequest {
            schema_context: context.to_string(),
            question: ex.question.clone(),
            max_new_tokens: self.max_new_tokens,
        };
        let t0 = Instant::now();
        let out = self.rt.generate(&req, &|| false);
        let latency_s = t0.elapsed().as_secs_f64();
        match out {
            Ok(g) => Asked {
                index: ex.index,
                ask_error: g.sql.is_none().then(|| format!("the model's answer contains no SQL query: {}", g.text)),
                prediction: g.sql.clone(),
                latency_s,
                prompt_tokens: Some(g.prompt_tokens as i64),
                generated_tokens: Some(g.generated_tokens as i64),
                decode_tok_s: Some(g.decode_tok_s()),
            },
            Err(e) => Asked {
                index: ex.index,
                prediction: None,
                ask_error: Some(e.to_string()),
                latency_s,
                prompt_tokens: None,
                generated_tokens: None,
                decode_tok_s: None,
            },
        }
    }
}

struct GoldAsker;

impl Asker for GoldAsker {
    fn label(&self) -> String {
        "gold".into()
    }
    fn sha256(&mut self) -> Option<String> {
        None
    }
    fn ask(&mut self, ex: &Example, context: &str) -> Asked {
        let known = crate::data::prepare::catalog_from_context(context).map(|c| sqlnorm::known_names(&c));
        let prediction = sqlnorm::normalize(&ex.query, known.as_ref());
        Asked {
            index: ex.index,
            ask_error: prediction.is_none().then(|| "gold does not parse".to_string()),
            prediction,
            latency_s: 0.0,
            prompt_tokens: None,
            generated_tokens: None,
            decode_tok_s: None,
        }
    }
}

/// The questions of a run: executable ones (their SQLite file exists), filtered, sampled, limited.
fn select_questions(
    args: &EvalArgs,
    schemas: &HashMap<String, Schema>,
) -> Result<(Vec<(Example, Option<Hardness>)>, String)> {
    let all = match args.split {
        Split::Dev => spider::load_dev(&args.spider)?,
        Split::Train => spider::load_train(&args.spider)?,
    };
    let total = all.len();
    let mut items: Vec<(Example, Option<Hardness>)> = all
        .into_iter()
        .filter(|e| spider::sqlite_path(&args.spider, &e.db_id).is_file())
        .filter(|e| args.dbs.is_empty() || args.dbs.contains(&e.db_id))
        .map(|e| {
            let h = schemas
                .get(&e.db_id)
                .and_then(|s| spider_match::parse(&e.query, s).ok())
                .map(|t| spider_match::hardness(&t));
            (e, h)
        })
        .collect();
    let executable = items.len();
    let split = match args.split {
        Split::Dev => "dev",
        Split::Train => "train",
    };
    let mut desc = format!("Spider {split}: {executable} executable questions (of {total})");
    if !args.dbs.is_empty() {
        desc.push_str(&format!(" on {}", args.dbs.join(", ")));
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
    Ok((items, desc))
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let started_utc = utc_now();
    let load_avg_start = load_avg();
    let t0 = Instant::now();
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let tables = spider::load_tables(&args.spider)?;
    let schemas: HashMap<String, Schema> = tables.iter().map(|(k, v)| (k.clone(), Schema::from_spider(v))).collect();
    let (items, selection) = select_questions(args, &schemas)?;
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

    let mut asker: Option<Box<dyn Asker>> = match (args.score_only, args.via) {
        (true, _) => None,
        (false, Via::Extension) => {
            let client = postgres::Client::connect(&args.pg, postgres::NoTls)
                .with_context(|| format!("cannot connect to PostgreSQL ({})", args.pg))?;
            Some(Box::new(ExtensionAsker { client, current_db: String::new() }))
        }
        (false, Via::Core) => {
            let path = args.model.clone().ok_or_else(|| anyhow!("--via core needs --model FILE"))?;
            let path = copilot_core::source::resolve(&path.to_string_lossy(), true)?;
            copilot_core::runtime::configure_threads(args.threads);
            // The same prefix cache as the extension's default (256 MB): answers do not depend on it, speed does.
            let opts = copilot_core::runtime::LoadOptions { max_context: 8192, prefix_cache_bytes: 256 << 20 };
            let rt = copilot_core::runtime::Runtime::load(&path, &opts)?;
            Some(Box::new(CoreAsker { rt, path, max_new_tokens: args.max_new_tokens }))
        }
        (false, Via::Gold) => Some(Box::new(GoldAsker)),
    };
    let model = match (&args.label, &asker, args.via) {
        (Some(l), _, _) => l.clone(),
        (None, Some(a), Via::Core) => a.label(),
        (None, _, Via::Extension) => pg
            .query_one("SELECT current_setting('copilot.model')", &[])
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_else(|_| "copilot.model".into()),
        (None, _, Via::Gold) => "gold SQL (normalized)".into(),
        (None, _, _) => args.model.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
    };

    // Phase 1: ask.
    let mut context_mismatches = Vec::new();
    let todo: Vec<&(Example, Option<Hardness>)> = items.iter().filter(|(e, _)| !asked.contains_key(&e.index)).collect();
    if let (Some(asker), false) = (asker.as_mut(), todo.is_empty()) {
        info!(
            "asking {} questions ({} already answered in {})",
            todo.len(),
            items.len() - todo.len(),
            asked_path.display()
        );
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&asked_path)?;
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
                        context_mismatches.push(ex.db_id.clone());
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
    }

    // Phase 2: score.
    let mut sqlite = Sqlite::new(&args.spider);
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut records = Vec::with_capacity(items.len());
    for (ex, h) in &items {
        let Some(a) = asked.get(&ex.index) else { continue };
        let (catalog, _) = contexts.get(&ex.db_id)?.clone();
        records.push(score_one(ex, *h, a, &catalog, schemas.get(&ex.db_id), &mut sqlite, &mut pg, timeout));
    }
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
    let sha = asker.as_mut().and_then(|a| a.sha256());
    let mut report = Report {
        run: args.run.clone(),
        via: args.via,
        model,
        model_sha256: sha,
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
    // Rescoring keeps what the asking run measured: its model, command, machine load, start and wall time.
    if args.score_only {
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

fn has_order_by(sql: &str) -> bool {
    use sqlparser::ast::Statement;
    let parsed =
        sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::SQLiteDialect {}, sql.trim().trim_end_matches(';'));
    matches!(parsed.as_deref(), Ok([Statement::Query(q)]) if q.order_by.is_some())
}

#[allow(clippy::too_many_arguments)]
pub fn score_one(
    ex: &Example,
    hardness: Option<Hardness>,
    a: &Asked,
    catalog: &copilot_core::schema::Catalog,
    schema: Option<&Schema>,
    sqlite: &mut Sqlite,
    pg: &mut postgres::Client,
    timeout: Duration,
) -> Record {
    let known = sqlnorm::known_names(catalog);
    let mut r = Record {
        index: ex.index,
        db_id: ex.db_id.clone(),
        question: ex.question.clone(),
        gold: ex.query.clone(),
        hardness,
        prediction: a.prediction.clone(),
        ask_error: a.ask_error.clone(),
        latency_s: a.latency_s,
        prompt_tokens: a.prompt_tokens,
        decode_tok_s: a.decode_tok_s,
        valid_sql: false,
        schema_ok: false,
        exact: false,
        exact_novalues: false,
        exact_set: false,
        ex: false,
        exec_error: None,
        gold_rows: None,
        pred_rows: None,
    };
    let gold_rs = sqlite.run(&ex.db_id, &ex.query, timeout);
    if let Ok(g) = &gold_rs {
        r.gold_rows = Some(g.rows.len());
    }
    let Some(pred) = a.prediction.as_deref() else { return r };
    let rejection = match gate::check(pred) {
        Ok(checked) => {
            r.valid_sql = true;
            r.schema_ok = gate::unknown_names(&checked, catalog).is_empty();
            None
        }
        Err(e) => Some(e),
    };
    let n = |s: &str| sqlnorm::normalize(s, Some(&known));
    r.exact = matches!((n(pred), n(&ex.query)), (Some(p), Some(g)) if p == g);
    let m = |s: &str| sqlnorm::mask_values(s, Some(&known));
    r.exact_novalues = matches!((m(pred), m(&ex.query)), (Some(p), Some(g)) if p == g);
    if let Some(s) = schema {
        r.exact_set = spider_match::exact_set_match(pred, &ex.query, s).unwrap_or(false);
    }
    if let Some(e) = rejection {
        r.exec_error = Some(format!("not run: {e}"));
        return r;
    }
    match run_pg(pg, &ex.db_id, pred, timeout) {
        Ok(p) => {
            r.pred_rows = Some(p.rows.len());
            match &gold_rs {
                Ok(g) => r.ex = results::same_result(g, &p, has_order_by(&ex.query)),
                Err(e) => r.exec_error = Some(format!("gold failed on SQLite: {e}")),
            }
        }
        Err(e) => r.exec_error = Some(e),
    }
    r
}

pub fn summarize(records: &[Record]) -> Summary {
    let n = records.len();
    let frac = |f: &dyn Fn(&Record) -> bool| {
        if n == 0 {
            0.0
        } else {
            records.iter().filter(|r| f(r)).count() as f64 / n as f64
        }
    };
    let mut lat: Vec<f64> =
        records.iter().filter(|r| r.ask_error.is_none() || r.prediction.is_some()).map(|r| r.latency_s).collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let mut tps: Vec<f64> =
        records.iter().filter_map(|r| r.decode_tok_s).filter(|x| x.is_finite() && *x > 0.0).collect();
    tps.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let mut pt: Vec<i64> = records.iter().filter_map(|r| r.prompt_tokens).collect();
    pt.sort_unstable();
    let mut by_hardness = BTreeMap::new();
    for h in Hardness::ALL {
        let rs: Vec<&Record> = records.iter().filter(|r| r.hardness == Some(h)).collect();
        if rs.is_empty() {
            continue;
        }
        let k = rs.len() as f64;
        by_hardness.insert(
            h.as_str().to_string(),
            Bucket {
                n: rs.len(),
                ex: rs.iter().filter(|r| r.ex).count() as f64 / k,
                exact_set: rs.iter().filter(|r| r.exact_set).count() as f64 / k,
            },
        );
    }
    Summary {
        n,
        ex: frac(&|r| r.ex),
        exact: frac(&|r| r.exact),
        exact_novalues: frac(&|r| r.exact_novalues),
        exact_set: frac(&|r| r.exact_set),
        valid_sql: frac(&|r| r.valid_sql),
        schema_ok: frac(&|r| r.schema_ok),
        ask_errors: records.iter().filter(|r| r.ask_error.is_some()).count(),
        exec_errors: records.iter().filter(|r| r.exec_error.is_some()).count(),
        latency_p50_s: percentile(&lat, 50.0),
        latency_p95_s: percentile(&lat, 95.0),
        decode_tok_s_p50: (!tps.is_empty()).then(|| percentile(&tps, 50.0)),
        prompt_tokens_p50: (!pt.is_empty()).then(|| pt[(pt.len() - 1) / 2]),
        by_hardness,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn utc_format() {
        let s = utc_now();
        assert_eq!(s.len(), 20);
        assert!(s.starts_with("20") && s.ends_with('Z'));
    }

    #[test]
    fn percentiles() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&v, 50.0), 3.0);
        assert_eq!(percentile(&v, 95.0), 5.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
