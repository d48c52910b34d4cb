//! The training recipe: one TOML file says everything a run depends on, so a run is repeated by naming it.

use anyhow::{bail, Context, Result};
use copilot_core::tune::finetune::BaseMode;
use copilot_core::tune::lora::LoraConfig;
use copilot_core::tune::peft::Target;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub data: DataSection,
    pub lora: LoraSection,
    pub train: TrainSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub validation: ValidationSection,
    pub output: OutputSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The base GGUF: a path or `hf:<repo>/<file>` (resolved as copilot.model resolves it).
    pub base: String,
    /// The Transformers model the GGUF was converted from, written as `base_model_name_or_path` (PEFT) and
    /// `base_model` (model card).
    pub base_model_id: String,
    /// `quantized` (QLoRA: the base stays in its GGUF quantization; backward passes through a transposed Q8_0
    /// copy), `quantized-exact` (backward through the weight dequantized on the fly: slower, less memory) or `f32`
    /// (dequantized once at load).
    #[serde(default = "default_base_mode")]
    pub base_mode: String,
}

fn default_base_mode() -> String {
    "quantized".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// `train.jsonl` written by `copilot-trainer data prepare` (prompt and completion rendered by core).
    pub train: PathBuf,
    /// `val.jsonl` from the same run; optional (no validation, no early stopping without it).
    #[serde(default)]
    pub val: Option<PathBuf>,
    /// Longest prompt + completion in tokens; longer rows are skipped (and counted).
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Use at most this many training rows (0 = all), taken after a seeded shuffle.
    #[serde(default)]
    pub max_train_rows: usize,
    /// Validate on at most this many rows (0 = all), the same ones every time.
    #[serde(default)]
    pub max_val_rows: usize,
    /// Shuffle the rows every epoch (seeded); off keeps the file's order (benchmarks compare step by step).
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Put rows that begin with the same prompt — in text-to-SQL, the same database's schema (the prepared row's
    /// `context`) — in the same optimizer steps and compute that shared prefix once per packed sequence. Exact: each
    /// row still attends only to the prefix and to itself, at its own positions (only dropout masks on the prefix are
    /// shared). A step then holds rows of one database; with Spider's schemas a step computes ~4× fewer tokens.
    #[serde(default)]
    pub share_prefix: bool,
    /// With `share_prefix`, the most tokens one packed sequence may hold (0 = `max_seq_len`); a step's rows that do
    /// not fit go into further sequences. Bounds the memory of the activations kept for the backward pass.
    #[serde(default)]
    pub pack_tokens: usize,
    /// The Hub dataset the rows come from, for the model card.
    #[serde(default)]
    pub dataset_id: Option<String>,
}

fn yes() -> bool {
    true
}

fn default_max_seq_len() -> usize {
    1024
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    pub rank: usize,
    pub alpha: f32,
    #[serde(default)]
    pub dropout: f32,
    /// Any of q, k, v, o, gate, up, down (PEFT's q_proj … down_proj names are accepted too).
    pub targets: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    #[serde(default = "one")]
    pub epochs: f64,
    /// Stop after this many optimizer steps (0 = as many as `epochs` make).
    #[serde(default)]
    pub max_steps: usize,
    /// Sequences per optimizer step. Each sequence is its own forward/backward pass (no padding) and the
    /// gradients are accumulated, so this is the effective batch.
    pub batch_size: usize,
    pub learning_rate: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    /// The cosine decay ends at learning_rate × min_lr_ratio.
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    #[serde(default = "one")]
    pub max_grad_norm: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Threads for the tensor ops (0 = every core).
    #[serde(default)]
    pub threads: usize,
}

fn one() -> f64 {
    1.0
}

fn default_min_lr_ratio() -> f64 {
    0.1
}

fn default_seed() -> u64 {
    42
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Save adapter + optimizer state every this many steps (0 = only at the end).
    #[serde(default)]
    pub every: usize,
    /// Keep this many most recent checkpoints.
    #[serde(default = "default_keep")]
    pub keep: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection { every: 0, keep: default_keep() }
    }
}

fn default_keep() -> usize {
    2
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationSection {
    /// Validation loss every this many steps (0 = only at the end).
    #[serde(default)]
    pub every: usize,
    /// Stop when the validation loss has not improved for this many validations in a row (0 = never).
    #[serde(default)]
    pub patience: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Run folder: adapter/, checkpoints/, train_log.jsonl, training_summary.json, loss.png.
    pub dir: PathBuf,
}

impl Recipe {
    pub fn load(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        // Relative paths in a recipe are relative to the directory the trainer runs in (the repository root in the
        // documented commands), like every other copilot-trainer path argument.
        let r: Recipe = toml::from_str(&text).with_context(|| format!("{} is not a valid recipe", path.display()))?;
        r.check()?;
        Ok(r)
    }

    pub fn check(&self) -> Result<()> {
        self.targets()?;
        self.base_mode()?;
        let t = &self.train;
        if t.batch_size == 0 {
            bail!("train.batch_size must be at least 1");
        }
        if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
            bail!("train.learning_rate must be a positive number");
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            bail!("train.min_lr_ratio must be in [0, 1]");
        }
        if t.epochs <= 0.0 && t.max_steps == 0 {
            bail!("set train.epochs > 0 or train.max_steps > 0");
        }
        if self.lora.rank == 0 {
            bail!("lora.rank must be at least 1");
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            bail!("lora.dropout must be in [0, 1)");
        }
        if self.data.max_seq_len < 2 {
            bail!("data.max_seq_len must be at least 2");
        }
        if self.data.pack_tokens != 0 && self.data.pack_tokens < self.data.max_seq_len {
            bail!("data.pack_tokens must be 0 or at least data.max_seq_len (a row must fit a packed sequence)");
        }
        Ok(())
    }

    pub fn targets(&self) -> Result<Vec<Target>> {
        let mut out = Vec::new();
        for name in &self.lora.targets {
            let t = match name.as_str() {
                "q" => Some(Target::Q),
                "k" => Some(Target::K),
                "v" => Some(Target::V),
                "o" => Some(Target::O),
                "gate" => Some(Target::Gate),
                "up" => Some(Target::Up),
                "down" => Some(Target::Down),
                other => Target::from_name(other),
            };
            match t {
                Some(t) if !out.contains(&t) => out.push(t),
                Some(_) => {}
                None => bail!("unknown LoRA target \"{name}\" (use q, k, v, o, gate, up, down)"),
            }
        }
        if out.is_empty() {
            bail!("lora.targets is empty");
        }
        out.sort();
        Ok(out)
    }

    pub fn base_mode(&self) -> Result<BaseMode> {
        BaseMode::parse(&self.model.base_mode).with_context(|| {
            format!("model.base_mode \"{}\" is not one of quantized, quantized-exact, f32", self.model.base_mode)
        })
    }

    /// The longest packed sequence (see [`DataSection::pack_tokens`]).
    pub fn pack_tokens(&self) -> usize {
        match self.data.pack_tokens {
            0 => self.data.max_seq_len,
            n => n,
        }
    }

    pub fn lora_config(&self) -> LoraConfig {
        LoraConfig { rank: self.lora.rank, alpha: self.lora.alpha, dropout: self.lora.dropout }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_recipes_parse_and_check() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let r = Recipe::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                assert!(!r.targets().unwrap().is_empty());
                n += 1;
            }
        }
        assert!(n >= 2, "both recipes found");
    }

    #[test]
    fn recipe_mistakes_are_refused() {
        let good = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/qwen2.5-coder-1.5b-spider-cpu.toml"),
        )
        .unwrap();
        let parse = |t: &str| -> Result<Recipe> {
            let r: Recipe = toml::from_str(t)?;
            r.check()?;
            Ok(r)
        };
        assert!(parse(&good).is_ok());
        for (from, to) in [
            ("rank = 16", "rank = 0"),
            ("dropout = 0.05", "dropout = 1.0"),
            ("targets = [\"q\", \"k\", \"v\", \"o\"]", "targets = []"),
            ("targets = [\"q\", \"k\", \"v\", \"o\"]", "targets = [\"attention\"]"),
            ("base_mode = \"quantized\"", "base_mode = \"int2\""),
            ("min_lr_ratio = 0.1", "min_lr_ratio = 2.0"),
            ("max_seq_len = 512", "max_seq_len = 1"),
            ("epochs = 1", "epochs = 0"),
            ("max_seq_len = 512", "max_seq_len = 512\npack_tokens = 100"),
            ("learning_rate = 2e-4", "learning_rate = 2e-4\nlearning_rat = 1.0"),
        ] {
            assert!(good.contains(from), "{from}");
            assert!(parse(&good.replacen(from, to, 1)).is_err(), "accepted: {to}");
        }
    }
}
