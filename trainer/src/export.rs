//! `copilot-trainer export`: fold a PEFT LoRA adapter into its base GGUF, producing a GGUF with the base's
//! quantization and metadata (tokenizer, chat template) that `SET copilot.model` loads like any other, and next to
//! it a model card (`README.md` with the Hub's YAML front matter), so the folder is ready for `hf upload`. By
//! default the adapter is folded into the weights (`peft::Fold::Requantize`: a plain GGUF); `--beside` keeps the
//! base's tensors and stores the adapter next to them, applied exactly by our engine (`peft::Fold::Beside`).

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file;
use copilot_core::engine::model::Config;
use copilot_core::tune::peft::{merge_into_gguf, Adapter, Fold, Layout};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The base model: a GGUF path or `hf:<owner>/<repo>/<file>`.
    #[arg(long)]
    pub base: String,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where to write the merged GGUF (its folder also gets the model card, README.md).
    #[arg(long)]
    pub out: PathBuf,
    /// Eval reports (`reports/eval/<run>.json`) of the merged model whose metrics go into the card; repeat for
    /// several. The first is the headline.
    #[arg(long = "eval")]
    pub evals: Vec<PathBuf>,
    /// The run's training_summary.json (default: next to the adapter folder, if there).
    #[arg(long)]
    pub training_summary: Option<PathBuf>,
    /// The license written in the card (the base model's license applies to a fine-tune of it).
    #[arg(long, default_value = "apache-2.0")]
    pub license: String,
    /// Write no model card.
    #[arg(long)]
    pub no_card: bool,
    /// Keep the base's tensors byte for byte and store the adapter's A and B beside each adapted weight
    /// (`<weight>.lora_a` / `.lora_b`), applied exactly at run time by our engine; other engines (llama.cpp) do not
    /// read such a file. Without it the adapter is folded into the weights, re-quantized to their formats: a plain
    /// GGUF any engine loads, though 4-bit rounding keeps only part of the adapter's change.
    #[arg(long)]
    pub beside: bool,
    /// Also write the adapter to this folder in PEFT's format with its weights as `--adapter-dtype` (the folder
    /// to ship, e.g. under models/), and fold in exactly that copy — so the merged GGUF is the one
    /// `scripts/fetch-model` rebuilds from the folder.
    #[arg(long)]
    pub save_adapter: Option<PathBuf>,
    /// The weights' format in `--save-adapter`'s copy: f16 (half the bytes), bf16 or f32.
    #[arg(long, default_value = "f16", value_parser = ["f16", "bf16", "f32"])]
    pub adapter_dtype: String,
}

pub fn run(args: &ExportArgs) -> Result<()> {
    let base = copilot_core::engine::source::resolve(&args.base, true)?;
    let mut f = std::fs::File::open(&base).with_context(|| format!("cannot open {}", base.display()))?;
    let ct =
        gguf_file::Content::read(&mut f).with_context(|| format!("{} is not a readable GGUF file", base.display()))?;
    let cfg = Config::from_gguf(&ct)?;
    let layout = Layout { arch: cfg.arch.clone(), n_head: cfg.n_head, n_kv_head: cfg.n_kv_head };
    let mut adapter = Adapter::load(&args.adapter, &layout, &candle_core::Device::Cpu)
        .with_context(|| format!("cannot load the adapter in {}", args.adapter.display()))?;
    if let Some(dir) = &args.save_adapter {
        let dtype = match args.adapter_dtype.as_str() {
            "f16" => candle_core::DType::F16,
            "bf16" => candle_core::DType::BF16,
            _ => candle_core::DType::F32,
        };
        if dir.canonicalize().ok().is_some_and(|d| args.adapter.canonicalize().ok() == Some(d)) {
            anyhow::bail!("--save-adapter {} is the adapter being read", dir.display());
        }
        adapter
            .save_as(dir, &layout, dtype)
            .with_context(|| format!("cannot write the adapter to {}", dir.display()))?;
        adapter = Adapter::load(dir, &layout, &candle_core::Device::Cpu)
            .with_context(|| format!("cannot read back the adapter in {}", dir.display()))?;
    }
    tracing::info!(
        "merging a rank-{} adapter ({} weights, trained on {}) into {}",
        adapter.config.rank,
        adapter.weights.len(),
        if adapter.base_model.is_empty() { "an unnamed base" } else { &adapter.base_model },
        base.display()
    );
    let fold = if args.beside { Fold::Beside } else { Fold::Requantize };
    let s = merge_into_gguf(&base, &adapter, &args.out, fold)?;
    let card = match args.no_card {
        true => None,
        false => {
            let summary_path = args.training_summary.clone().or_else(|| {
                let p = args.adapter.parent()?.join("training_summary.json");
                p.is_file().then_some(p)
            });
            let summary: Option<serde_json::Value> = match &summary_path {
                Some(p) => Some(serde_json::from_slice(
                    &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
                )?),
                None => None,
            };
            let mut evals = Vec::new();
            for p in &args.evals {
                let r: crate::eval::Report =
                    serde_json::from_slice(&std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?)
                        .with_context(|| format!("{} is not an eval report", p.display()))?;
                evals.push(r);
            }
            let file = args.out.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
            let text = model_card(&adapter, &cfg.arch, &file, summary.as_ref(), &evals, &args.license, fold);
            let path = args
                .out
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."))
                .join("README.md");
            std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
            Some(path)
        }
    };
    println!(
        "{}",
        serde_json::json!({
            "out": args.out, "base": base, "tensors": s.tensors, "merged": s.merged,
            "metadata_keys": s.metadata_keys, "bytes": s.bytes, "model_card": card
        })
    );
    Ok(())
}

/// YAML needs quoting for anything but plain words.
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The Hub model card: YAML front matter (base_model, datasets, license, tags, model-index with the eval
/// metrics) and a body with the training set-up, the measured results and how to use the file from psql.
pub fn model_card(
    adapter: &Adapter,
    arch: &str,
    gguf_file: &str,
    summary: Option<&serde_json::Value>,
    evals: &[crate::eval::Report],
    license: &str,
    fold: Fold,
) -> String {
    use std::fmt::Write as _;
    let g = |path: &[&str]| -> Option<&serde_json::Value> {
        let mut v = summary?;
        for k in path {
            v = v.get(*k)?;
        }
        Some(v)
    };
    let dataset = g(&["recipe", "data", "dataset_id"]).and_then(|v| v.as_str()).map(str::to_string);
    let base_model = if adapter.base_model.is_empty() { "unknown" } else { adapter.base_model.as_str() };
    let name = gguf_file.trim_end_matches(".gguf");
    let mut y = String::from("---\n");
    let _ = writeln!(y, "base_model: {}", yaml_str(base_model));
    let _ = writeln!(y, "base_model_relation: finetune");
    let _ = writeln!(y, "license: {}", yaml_str(license));
    if let Some(d) = &dataset {
        let _ = writeln!(y, "datasets:\n- {}", yaml_str(d));
    }
    let _ = writeln!(y, "library_name: gguf\npipeline_tag: text-generation");
    let _ = writeln!(y, "tags:\n- text-to-sql\n- sql\n- postgresql\n- lora\n- gguf\n- copilot\n- {}", yaml_str(arch));
    if !evals.is_empty() {
        let _ = writeln!(y, "model-index:\n- name: {}\n  results:", yaml_str(name));
        for r in evals {
            let _ = writeln!(y, "  - task:\n      type: text-to-sql\n      name: Text-to-SQL");
            let _ = writeln!(
                y,
                "    dataset:\n      type: spider\n      name: {}\n      split: dev",
                yaml_str(&format!("Spider dev ({}, n={})", r.selection, r.summary.n))
            );
            let _ = writeln!(y, "    metrics:");
            let _ = writeln!(
                y,
                "    - type: execution_accuracy\n      value: {:.1}\n      name: Execution accuracy (%)",
                100.0 * r.summary.ex
            );
            let _ = writeln!(
                y,
                "    - type: exact_set_match\n      value: {:.1}\n      name: Exact-set-match (%)",
                100.0 * r.summary.exact_set
            );
        }
    }
    y.push_str("---\n\n");
    let _ = writeln!(y, "# {name}\n");
    let how = match fold {
        Fold::Beside => {
            "with the base GGUF's tensors kept byte for byte and the adapter's A and B stored beside each weight \
             (`<weight>.lora_a`, `.lora_b`, as trained), applied at run time by copilot's engine; other GGUF runtimes \
             do not read those tensors (`copilot-trainer export` without `--beside` writes a plain GGUF for them)"
        }
        Fold::Requantize => {
            "merged into the base GGUF's weights, re-quantized to their own formats, so it loads in any GGUF runtime \
             (4-bit rounding keeps only part of the adapter's change)"
        }
    };
    let _ = writeln!(
        y,
        "A text-to-SQL fine-tune of [{base_model}](https://huggingface.co/{base_model}): a LoRA adapter (rank {}, alpha {}) \
         trained with `copilot-trainer`, {how}; metadata (tokenizer, chat template) as the base's. Made for copilot, \
         the PostgreSQL extension that turns questions into SQL inside the database.\n",
        adapter.config.rank, adapter.config.alpha
    );
    if !evals.is_empty() {
        let _ = writeln!(y, "## Evaluation\n\n| run | questions | execution accuracy | exact-set-match | p50 latency |\n|---|---:|---:|---:|---:|");
        for r in evals {
            let _ = writeln!(
                y,
                "| {} | {} | {:.1} % | {:.1} % | {:.2} s |",
                r.run,
                r.summary.n,
                100.0 * r.summary.ex,
                100.0 * r.summary.exact_set,
                r.summary.latency_p50_s
            );
        }
        let _ = writeln!(
            y,
            "\nMeasured with `copilot-trainer eval --via extension` (the product path) on {}.\n",
            evals[0].machine
        );
    }
    if summary.is_some() {
        let _ = writeln!(y, "## Training\n\n| | |\n|---|---|");
        let row = |y: &mut String, k: &str, v: Option<String>| {
            if let Some(v) = v {
                let _ = writeln!(y, "| {k} | {v} |");
            }
        };
        let num = |p: &[&str]| g(p).map(|v| v.to_string().trim_matches('"').to_string());
        row(&mut y, "dataset", dataset.clone());
        row(&mut y, "targets", g(&["recipe", "lora", "targets"]).map(|v| v.to_string()));
        row(
            &mut y,
            "rank / alpha / dropout",
            Some(format!("{} / {} / {}", adapter.config.rank, adapter.config.alpha, adapter.config.dropout)),
        );
        row(&mut y, "base weights", num(&["base_mode"]));
        row(&mut y, "training rows", num(&["train_rows"]));
        row(
            &mut y,
            "steps × batch",
            num(&["steps"]).map(|st| format!("{st} × {}", num(&["batch_size"]).unwrap_or_default())),
        );
        row(&mut y, "epochs", g(&["epochs"]).and_then(|v| v.as_f64()).map(|e| format!("{e:.2}")));
        row(
            &mut y,
            "learning rate",
            num(&["lr_schedule", "peak"]).map(|p| {
                format!(
                    "{p}, linear warm-up {} steps, cosine to ×{}",
                    num(&["lr_schedule", "warmup_steps"]).unwrap_or_default(),
                    num(&["lr_schedule", "min_lr_ratio"]).unwrap_or_default()
                )
            }),
        );
        row(&mut y, "max sequence length", num(&["recipe", "data", "max_seq_len"]));
        row(&mut y, "seed", num(&["recipe", "train", "seed"]));
        row(&mut y, "tokens seen", num(&["tokens_seen"]));
        row(
            &mut y,
            "train loss (first → last 10)",
            match (
                g(&["train_loss_first"]).and_then(|v| v.as_f64()),
                g(&["train_loss_last10_mean"]).and_then(|v| v.as_f64()),
            ) {
                (Some(a), Some(b)) => Some(format!("{a:.3} → {b:.3}")),
                _ => None,
            },
        );
        row(
            &mut y,
            "validation loss (first → best)",
            match (g(&["val_loss_first"]).and_then(|v| v.as_f64()), g(&["val_loss_best"]).and_then(|v| v.as_f64())) {
                (Some(a), Some(b)) => Some(format!("{a:.3} → {b:.3}")),
                _ => None,
            },
        );
        row(
            &mut y,
            "hardware",
            g(&["hardware", "cpu"]).map(|c| {
                format!(
                    "{} ({} cores, {} threads), no GPU",
                    c.as_str().unwrap_or("?"),
                    num(&["hardware", "cores"]).unwrap_or_default(),
                    num(&["threads"]).unwrap_or_default()
                )
            }),
        );
        row(&mut y, "wall time", g(&["wall_s"]).and_then(|v| v.as_f64()).map(|w| format!("{:.0} min", w / 60.0)));
        row(
            &mut y,
            "peak memory",
            g(&["peak_rss_bytes"]).and_then(|v| v.as_f64()).map(|b| format!("{:.1} GB", b / 1e9)),
        );
        y.push('\n');
    }
    let _ = writeln!(
        y,
        "## Use from PostgreSQL\n\n```sql\n-- postgresql.conf: shared_preload_libraries = 'copilot'; copilot.model = '/path/to/{gguf_file}'\n\
         SELECT copilot.ask('how many singers are from France?');\nSELECT * FROM copilot.run('how many singers are from France?');\n```\n\n\
         `copilot.model` also takes `hf:<owner>/<repo>/{gguf_file}` once this folder is on the Hub.\n\n\
         ## Publish\n\n```sh\nhf upload <owner>/{name} <this folder>\n```\n"
    );
    y
}
