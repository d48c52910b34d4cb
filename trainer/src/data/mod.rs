//! `copilot-trainer data …`: dataset commands.

use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

pub mod fetch;
pub mod for_pg;
pub mod load_pg;
pub mod prepare;
pub mod rows;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Download b-mc2/sql-create-context from the Hugging Face Hub (or read --from FILE) into JSONL rows.
    Fetch(fetch::FetchArgs),
    /// Build {question, context, answer, db_id} rows from the Spider files, contexts rendered by core.
    FromSpider(fetch::FromSpiderArgs),
    /// Normalize, filter and split rows into train.jsonl / val.jsonl with prompts rendered by core.
    Prepare(prepare::PrepareArgs),
    /// Copy Spider SQLite databases (schema, keys and rows) into PostgreSQL.
    LoadPg(LoadPgArgs),
    /// Keep the rows whose SQL PostgreSQL runs (on `load-pg`'s copy), repairing SQLite-only GROUP BY by execution.
    ForPostgres(for_pg::ForPgArgs),
}

#[derive(clap::Args)]
pub struct LoadPgArgs {
    /// The Spider folder (holding database/<db_id>/<db_id>.sqlite).
    #[arg(long, default_value = "../shared/data/spider")]
    pub spider: PathBuf,
    /// A db_id to load; repeat for several.
    #[arg(long = "db", required_unless_present = "all")]
    pub dbs: Vec<String>,
    /// Load every database in the Spider folder.
    #[arg(long)]
    pub all: bool,
    /// libpq connection string of the target database.
    #[arg(long, default_value = "host=/var/run/postgresql dbname=postgres")]
    pub pg: String,
    /// `schema`: one schema per db_id in the target database; `public`: the tables go in public (one db only).
    #[arg(long, value_enum, default_value_t = load_pg::Layout::Schema)]
    pub layout: load_pg::Layout,
    /// Drop and recreate what is already there.
    #[arg(long)]
    pub replace: bool,
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::LoadPg(args) => load_pg::run(&args),
        DataCommand::Fetch(args) => fetch::fetch(&args),
        DataCommand::FromSpider(args) => fetch::from_spider(&args),
        DataCommand::Prepare(args) => prepare::run(&args),
        DataCommand::ForPostgres(args) => for_pg::run(&args),
    }
}
