//! `data fetch` (b-mc2/sql-create-context from the Hugging Face Hub, or a local file) and `data from-spider`
//! (rows of the same shape built from the Spider files, with contexts rendered by core from the real schemas).

use super::rows::{self, Row};
use crate::spider::{self, Contexts};
use anyhow::{anyhow, Context, Result};
use std::path::{Path, PathBuf};
use tracing::{info, warn};

#[derive(clap::Args)]
pub struct FetchArgs {
    /// The dataset on the Hub.
    #[arg(long, default_value = "b-mc2/sql-create-context")]
    pub repo: String,
    /// The file in the dataset repository.
    #[arg(long, default_value = "sql_create_context_v4.json")]
    pub file: String,
    /// Use this local file (JSON, JSONL or Parquet of {question, context, answer}) instead of the Hub.
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// Where to write the rows (JSONL).
    #[arg(long, default_value = "data/sql-create-context.jsonl")]
    pub out: PathBuf,
}

/// The dataset file through hf-hub: the local Hugging Face cache first, then a download.
fn from_hub(repo: &str, file: &str) -> Result<PathBuf> {
    use hf_hub::{Cache, Repo, RepoType};
    let r = Repo::new(repo.to_string(), RepoType::Dataset);
    if let Some(p) = Cache::from_env().repo(r.clone()).get(file) {
        info!("{repo}/{file} from the Hugging Face cache");
        return Ok(p);
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| anyhow!("cannot set up the Hugging Face client: {e}"))?;
    api.repo(r).get(file).map_err(|e| {
        anyhow!(
            "the Hugging Face Hub is unreachable or refused {repo}/{file} ({e}); download the file where the Hub \
             is reachable and pass it with --from FILE"
        )
    })
}

pub fn fetch(args: &FetchArgs) -> Result<()> {
    let path = match &args.from {
        Some(p) => p.clone(),
        None => from_hub(&args.repo, &args.file)?,
    };
    let rows = rows::read(&path)?;
    rows::write_jsonl(&args.out, &rows)?;
    println!("{} rows from {} → {}", rows.len(), path.display(), args.out.display());
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SpiderSplit {
    Train,
    Dev,
}

#[derive(clap::Args)]
pub struct FromSpiderArgs {
    #[arg(long, default_value = "../shared/data/spider")]
    pub spider: PathBuf,
    /// train: spider-syn/train_spider.json (7000, field SpiderQuestion); dev: dev.json.
    #[arg(long, value_enum, default_value_t = SpiderSplit::Train)]
    pub split: SpiderSplit,
    #[arg(long, default_value = "data/spider-train.jsonl")]
    pub out: PathBuf,
}

/// Databases whose file is absent, with how many questions they lost.
pub type Missing = Vec<(String, usize)>;

/// Rows for every question whose database file exists; the others are counted and named.
pub fn spider_rows(root: &Path, split: SpiderSplit) -> Result<(Vec<Row>, Missing)> {
    let examples = match split {
        SpiderSplit::Train => spider::load_train(root)?,
        SpiderSplit::Dev => spider::load_dev(root)?,
    };
    let mut contexts = Contexts::new(root);
    let mut rows = Vec::with_capacity(examples.len());
    let mut missing: Vec<(String, usize)> = Vec::new();
    for e in examples {
        if !spider::sqlite_path(root, &e.db_id).is_file() {
            match missing.iter_mut().find(|m| m.0 == e.db_id) {
                Some(m) => m.1 += 1,
                None => missing.push((e.db_id.clone(), 1)),
            }
            continue;
        }
        let ctx = contexts.get(&e.db_id).with_context(|| format!("database {}", e.db_id))?.1.clone();
        rows.push(Row { question: e.question, context: ctx, answer: e.query, db_id: Some(e.db_id) });
    }
    Ok((rows, missing))
}

pub fn from_spider(args: &FromSpiderArgs) -> Result<()> {
    let (rows, missing) = spider_rows(&args.spider, args.split)?;
    for (db, n) in &missing {
        warn!("{db}: no SQLite file, {n} questions left out");
    }
    rows::write_jsonl(&args.out, &rows)?;
    println!(
        "{} rows → {} ({} questions left out: their database file is absent)",
        rows.len(),
        args.out.display(),
        missing.iter().map(|m| m.1).sum::<usize>()
    );
    Ok(())
}
