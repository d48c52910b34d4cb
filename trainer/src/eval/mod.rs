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

mod askers;
pub mod compare;
pub mod confidence;
pub mod context;
pub(crate) mod exec;
pub mod grounding;
pub mod refusal;
mod run;
pub(crate) mod score;

pub use run::run;

use serde::{Deserialize, Serialize};
use spider_match::Hardness;
use std::collections::BTreeMap;
use std::path::PathBuf;

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
    /// Spider-Syn's paraphrases of the dev questions (synonyms for schema words), same databases and gold.
    DevSyn,
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
    /// Only the questions at these positions of the split's file (comma-separated or repeated; the `index` of a
    /// report's records), e.g. to ask again the questions an earlier run refused.
    #[arg(long = "index", value_delimiter = ',')]
    pub indexes: Vec<usize>,
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
    /// Split each database's questions: this share of them (chosen by a seeded hash of their position) is the
    /// taught half and only the others are asked. `copilot.examples` is emptied first (`--via extension`).
    #[arg(long)]
    pub teach_share: Option<f64>,
    /// With `--teach-share`: store the taught questions with their gold SQL through `copilot.teach` before asking
    /// (without it, the same questions are asked with no verified examples — the baseline).
    #[arg(long, requires = "teach_share")]
    pub teach: bool,
    /// `--via extension`: a setting for the asking session, `name=value` (repeat), e.g. `copilot.candidates=1`.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub settings: Vec<String>,
    /// `--via extension`: ask with all of these schemas visible at once (`copilot.schemas` = the list, search_path =
    /// `public`), so the model is not told which database a question is about — the large-schema benchmark
    /// (scripts/bench-schema). Predictions run with the same search_path, and the tables
    /// `copilot.context(question)` chose are scored against the gold query's (gold-table recall).
    #[arg(long, value_name = "SCHEMA,SCHEMA,…")]
    pub schemas: Option<String>,
}

/// A model run in-process (core's runtime) over a seeded sample of Spider **train** (eval-judge, eval-confidence):
/// settings are chosen on training data, never on the dev questions they are measured on.
#[derive(clap::Args, Clone)]
pub struct InProcess {
    /// The GGUF asked (in-process, core's runtime).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "../shared/data/spider")]
    pub spider: PathBuf,
    /// Questions asked (per set, where there are two).
    #[arg(long, default_value_t = 300)]
    pub n: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

impl InProcess {
    /// Set the inference threads. Call first in the command, before any thread exists.
    pub fn configure_threads(&self) {
        if self.threads > 0 {
            // SAFETY: the caller runs this first in the command, before any thread exists.
            unsafe { copilot_core::engine::runtime::configure_threads(self.threads) };
        }
    }

    /// Spider train's questions whose SQLite file exists.
    pub fn train(&self) -> anyhow::Result<Vec<crate::spider::Example>> {
        Ok(crate::spider::load_train(&self.spider)?
            .into_iter()
            .filter(|e| crate::spider::sqlite_path(&self.spider, &e.db_id).is_file())
            .collect())
    }

    /// The model, loaded as the engine serves it (8192 tokens, a 256 MB prefix cache), and its resolved path.
    pub fn runtime(&self) -> anyhow::Result<(PathBuf, copilot_core::engine::runtime::Runtime)> {
        let path = copilot_core::engine::source::resolve(&self.model.to_string_lossy(), true)?;
        let opts = copilot_core::engine::runtime::LoadOptions {
            max_context: 8192,
            prefix_cache_bytes: 256 << 20,
            ..Default::default()
        };
        let rt = copilot_core::engine::runtime::Runtime::load(&path, &opts)?;
        Ok((path, rt))
    }
}

/// What `copilot.ask_verbose` reported about how an answer was chosen (extension route).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Pipeline {
    /// Candidates decoded on the first try, and how many of them planned.
    pub candidates: usize,
    pub planned: usize,
    pub repairs: usize,
    pub decision: String,
    pub margin: usize,
    pub refused: bool,
    /// The greedy answer was returned alone (copilot.confidence_threshold): no other candidate was decoded.
    #[serde(default)]
    pub greedy_alone: bool,
    /// Where the answer returned came from (ask_verbose's `source` of the winner: `greedy`, `sample 2, missing table
    /// joined`, `repair 1`, …); absent when nothing was returned, or in reports made before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub winner_source: Option<String>,
    /// The candidates that did not plan: what each was (SQL, or the model's text when it held none) and why
    /// not, in the gate's or PostgreSQL's words — what a failure analysis needs when nothing was returned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<Rejected>,
}

/// A candidate that did not plan (from `copilot.ask_verbose`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rejected {
    pub source: String,
    pub sql: String,
    pub error: String,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<Pipeline>,
    /// With `--schemas`: the tables (`schema.table`, lowercase) `copilot.context(question)` showed the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_tables: Option<Vec<String>>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<Pipeline>,
    /// With `--schemas`: whether every table the gold query reads was in the context (None: the gold query's
    /// tables could not be parsed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gold_tables_shown: Option<bool>,
    /// With `--schemas`: how many tables the context showed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_tables: Option<usize>,
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
    /// Answer pipeline (extension route): asks that needed a repair, of those how many were answered, asks decided
    /// by a vote among several result groups and their mean margin, and refusals.
    #[serde(default)]
    pub repaired_asks: usize,
    #[serde(default)]
    pub repaired_answered: usize,
    #[serde(default)]
    pub voted: usize,
    #[serde(default)]
    pub mean_vote_margin: Option<f64>,
    #[serde(default)]
    pub refusals: usize,
    /// Asks answered by the greedy answer alone (copilot.confidence_threshold).
    #[serde(default)]
    pub greedy_alone: usize,
    /// With `--schemas`: the share of questions whose context showed every table the gold query reads, over the
    /// questions whose gold tables parsed (`table_recall_n`), and the median count of tables shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_recall: Option<f64>,
    #[serde(default)]
    pub table_recall_n: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_tables_p50: Option<usize>,
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
