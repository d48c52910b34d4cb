//! copilot-trainer: datasets, evaluation and fine-tuning for copilot's text-to-SQL models.
//!
//! It uses copilot-core's schema renderer, prompt builder and runtime, so what it prepares and measures is what
//! the extension runs. Subcommands so far: `data load-pg` (Spider SQLite databases into PostgreSQL) and
//! `model fetch` (a model from the Hugging Face Hub through hf-hub, or a local file).

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

mod data;
mod model;

#[derive(Parser)]
#[command(name = "copilot-trainer", version, about = "Datasets, evaluation and fine-tuning for copilot")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Datasets: load Spider databases into PostgreSQL.
    Data {
        #[command(subcommand)]
        command: data::DataCommand,
    },
    /// Models: fetch a GGUF from the Hub (or check a local one).
    Model {
        #[command(subcommand)]
        command: model::ModelCommand,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Data { command } => data::run(command),
        Command::Model { command } => model::run(command),
    };
    if let Err(e) = result {
        eprintln!("copilot-trainer: {e:#}");
        std::process::exit(1);
    }
}
