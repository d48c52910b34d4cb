//! `copilot-trainer export`: fold a PEFT LoRA adapter into its base GGUF, producing a GGUF with the base's
//! quantization and metadata (tokenizer, chat template) that `SET copilot.model` loads like any other.

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file;
use copilot_core::model::Config;
use copilot_core::peft::{merge_into_gguf, Adapter, Layout};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The base model: a GGUF path or `hf:<owner>/<repo>/<file>`.
    #[arg(long)]
    pub base: String,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where to write the merged GGUF.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &ExportArgs) -> Result<()> {
    let base = copilot_core::source::resolve(&args.base, true)?;
    let mut f = std::fs::File::open(&base).with_context(|| format!("cannot open {}", base.display()))?;
    let ct = gguf_file::Content::read(&mut f).with_context(|| format!("{} is not a readable GGUF file", base.display()))?;
    let cfg = Config::from_gguf(&ct)?;
    let layout = Layout { arch: cfg.arch.clone(), n_head: cfg.n_head, n_kv_head: cfg.n_kv_head };
    let adapter = Adapter::load(&args.adapter, &layout, &candle_core::Device::Cpu)
        .with_context(|| format!("cannot load the adapter in {}", args.adapter.display()))?;
    tracing::info!(
        "merging a rank-{} adapter ({} weights, trained on {}) into {}",
        adapter.config.rank,
        adapter.weights.len(),
        if adapter.base_model.is_empty() { "an unnamed base" } else { &adapter.base_model },
        base.display()
    );
    let s = merge_into_gguf(&base, &adapter, &args.out)?;
    println!(
        "{}",
        serde_json::json!({
            "out": args.out, "base": base, "tensors": s.tensors, "merged": s.merged,
            "metadata_keys": s.metadata_keys, "bytes": s.bytes
        })
    );
    Ok(())
}
