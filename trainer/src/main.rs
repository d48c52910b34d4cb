//! copilot-trainer: datasets, evaluation and fine-tuning for copilot's text-to-SQL models.
//!
//! It uses copilot-core's schema renderer, prompt builder and runtime, so what it prepares and measures is what
//! the extension runs. Subcommands: `data` (Spider rows and databases), `eval`, `eval-wikisql`, `export` (a PEFT
//! LoRA adapter merged into its base GGUF) and `model fetch` (a model from the Hugging Face Hub through hf-hub, or a
//! local file).

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

mod bench;
mod data;
mod eval;
mod export;
use copilot_core::engine::host;
mod model;
mod seed;
mod spider;
mod sqlnorm;
mod train;

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
    /// Evaluate a model on Spider through the extension or core's runtime (execution accuracy, exact-set-match,
    /// hardness, latency) → reports/eval/<run>.{json,md,png}.
    Eval(eval::EvalArgs),
    /// How often copilot.ask refuses questions it cannot answer: Spider dev questions asked against databases that
    /// lack their tables → reports/eval/<run>.{json,md}.
    EvalRefusal(eval::refusal::RefusalArgs),
    /// Calibrate copilot.refusal_threshold on Spider train: the model's P(unanswerable) on answerable and
    /// unanswerable train questions, refusal shares by threshold → reports/eval/judge_calibration.json.
    EvalJudge(eval::refusal::JudgeArgs),
    /// Calibrate copilot.grounding_similarity on Spider train: with a sentence encoder, how many answerable,
    /// paraphrased and unanswerable train questions still go to the cannot-answer judge, by minimum cosine →
    /// reports/eval/grounding_calibration.{json,md}.
    EvalGrounding(eval::grounding::GroundingArgs),
    /// Calibrate copilot.confidence_threshold on Spider train: when the greedy answer alone is as good as the vote
    /// among copilot.candidates → reports/eval/confidence_calibration.{json,md}.
    EvalConfidence(eval::confidence::ConfidenceArgs),
    /// Schema selection without the model: per copilot.context_budget_tokens, how often copilot.context(question)
    /// shows every table the gold query reads, with many schemas visible at once → JSON (scripts/bench-schema).
    EvalContext(eval::context::ContextArgs),
    /// Eval reports side by side (EX, gained/lost against a baseline with McNemar p, latency, pipeline counts)
    /// → <out>.{json,md}.
    EvalCompare(eval::compare::CompareArgs),
    /// WikiSQL logical-form and execution accuracy of predicted SQL (official dev.jsonl + dev.tables.jsonl).
    EvalWikisql {
        #[arg(long)]
        data: std::path::PathBuf,
        #[arg(long)]
        tables: std::path::PathBuf,
        /// JSONL, one {"sql": "..."} per example, in the examples' order.
        #[arg(long)]
        predictions: std::path::PathBuf,
    },
    /// LoRA/QLoRA fine-tuning of a GGUF model from a recipe (TOML) → PEFT adapter, checkpoints, training_summary.json.
    Train(train::TrainArgs),
    /// Speculative decoding on Spider answers: decode speed and draft acceptance per draft policy, every answer
    /// checked token for token against plain decoding → JSON on stdout (scripts/bench-speculative).
    BenchDecode(bench::BenchDecodeArgs),
    /// Fold a PEFT LoRA adapter into its base GGUF (same quantization and metadata) → a GGUF copilot.model loads.
    Export(export::ExportArgs),
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
        Command::Eval(args) => eval::run(&args),
        Command::EvalRefusal(args) => eval::refusal::run(&args),
        Command::EvalJudge(args) => eval::refusal::calibrate(&args),
        Command::EvalGrounding(args) => eval::grounding::run(&args),
        Command::EvalConfidence(args) => eval::confidence::run(&args),
        Command::EvalCompare(args) => eval::compare::run(&args),
        Command::EvalContext(args) => eval::context::run(&args),
        Command::Export(args) => export::run(&args),
        Command::BenchDecode(args) => bench::run(&args),
        Command::Train(args) => train::run(&args),
        Command::EvalWikisql { data, tables, predictions } => eval::wikisql::run_files(&data, &tables, &predictions)
            .map(|s| println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default())),
    };
    if let Err(e) = result {
        eprintln!("copilot-trainer: {e:#}");
        std::process::exit(1);
    }
}
