//! `copilot-trainer train --config recipe.toml`: LoRA fine-tuning of a GGUF model on rows from `data prepare`.
//!
//! The run is a pure function of the recipe: rows are shuffled by a generator seeded from `train.seed` (epoch e
//! uses seed + e), adapters start from PEFT's initialisation drawn from the same seed, and the dropout masks of
//! step s come from a generator seeded by (seed, s). So optimizer step s always sees the same rows and masks —
//! whether the run went straight through or was stopped and `--resume`d from a checkpoint (which holds the
//! adapters, AdamW's moments and the step; nothing else is needed to continue exactly).
//!
//! One optimizer step = `batch_size` rows, each its own forward and backward pass (no padding: on a CPU a padded
//! batch only adds work), with gradients summed; the loss is the mean over every completion token of the step
//! (prompt tokens are masked), as Transformers' trainer computes it. With `data.share_prefix`, a step's rows come
//! from one group of rows with the same prompt prefix (the same database schema) and are packed into sequences that
//! compute that prefix once ([`copilot_core::tune::finetune::Packed`]: the same losses and gradients). Gradients are clipped to a global norm,
//! then AdamW steps at the learning rate of a linear warm-up + cosine schedule.
//!
//! Outputs in `output.dir`: `adapter/` (PEFT files; the best validation loss when there is a validation set,
//! else the last step), `checkpoints/step-NNNNNN/`, `train_log.jsonl` (one line per step and per validation),
//! `training_summary.json` and `loss.png`.

pub mod recipe;

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use copilot_core::engine::runtime::TextSide;
use copilot_core::tune::finetune::{learning_rate, AdamW, FinetuneOptions, Packed, TrainableModel};
use copilot_core::tune::lora::Rng;
use copilot_core::tune::peft::Adapter;
use recipe::Recipe;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// The recipe (TOML): model, data, LoRA, schedule, checkpoints, validation, output folder.
    #[arg(long)]
    pub config: PathBuf,
    /// Continue from the latest checkpoint in the output folder.
    #[arg(long)]
    pub resume: bool,
    /// Override train.max_steps (for a quick try of a recipe).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Override output.dir.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Stop after this step, keeping the recipe's schedule (unlike --max-steps, which shortens it): the step is
    /// validated and checkpointed, and the summary written, so a long run can be cut at a given step, shipped,
    /// and reproduced exactly (or continued later with --resume).
    #[arg(long)]
    pub stop_at: Option<usize>,
    /// Start from a saved PEFT adapter (a shipped cut, an `adapter/` folder) at optimizer step --start-step of the
    /// recipe's schedule, with fresh AdamW moments: for continuing a run whose checkpoints are gone. The rows,
    /// dropout masks and learning rates of the steps that follow are the recipe's; only the optimizer's memory of
    /// earlier gradients is new, so the result is reproducible but not the straight run's.
    #[arg(long, value_name = "DIR", conflicts_with = "resume", requires = "start_step")]
    pub init_adapter: Option<PathBuf>,
    /// The recipe step the --init-adapter was taken at.
    #[arg(long, requires = "init_adapter")]
    pub start_step: Option<usize>,
}

/// A tokenized training row: the prompt's tokens then the completion's.
pub struct Example {
    pub tokens: Vec<u32>,
    pub n_prompt: usize,
    /// The schema the prompt was rendered with (`context` of a prepared row), which rows share a prefix by.
    pub context: Option<String>,
}

#[derive(Deserialize)]
struct Row {
    prompt: String,
    completion: String,
    #[serde(default)]
    context: Option<String>,
}

/// What a checkpoint holds besides the adapter and the optimizer moments.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    step: usize,
    tokens_seen: u64,
    /// Tokens the forward passes computed (fewer than `tokens_seen` when shared prefixes are packed).
    #[serde(default)]
    computed_tokens: u64,
    wall_s: f64,
    best_val: Option<f64>,
    best_step: Option<usize>,
    evals_since_best: usize,
    /// Largest resident set of the run so far, across resumes.
    #[serde(default)]
    peak_rss_bytes: Option<u64>,
    /// Where a run started with --init-adapter began: the adapter folder and the step it was taken at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    warm_start: Option<WarmStart>,
    history: Vec<LogLine>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WarmStart {
    adapter: String,
    /// sha256 of its adapter_model.safetensors.
    adapter_sha256: String,
    step: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LogLine {
    step: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    computed_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    step_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens_per_s: Option<f64>,
    elapsed_s: f64,
}

pub fn read_examples(path: &Path, text: &TextSide, max_seq_len: usize) -> Result<(Vec<Example>, usize)> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    let mut too_long = 0;
    for (i, line) in std::io::BufRead::lines(std::io::BufReader::new(f)).enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let row: Row = serde_json::from_str(&line).with_context(|| {
            format!("{}:{}: not a prepared row (run `copilot-trainer data prepare`)", path.display(), i + 1)
        })?;
        let mut tokens = text.encode(&row.prompt)?;
        let n_prompt = tokens.len();
        let completion = text.encode(&row.completion)?;
        if n_prompt == 0 || completion.is_empty() {
            bail!("{}:{}: empty prompt or completion", path.display(), i + 1);
        }
        tokens.extend(completion);
        if tokens.len() > max_seq_len {
            too_long += 1;
            continue;
        }
        out.push(Example { tokens, n_prompt, context: row.context });
    }
    Ok((out, too_long))
}

fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// The rows of optimizer step `step`: positions step·b .. step·b + b of the endless sequence of epochs, each a
/// seeded permutation of the rows.
pub fn step_rows(step: usize, batch: usize, n: usize, seed: u64, shuffle: bool) -> Vec<usize> {
    if !shuffle {
        return (step * batch..(step + 1) * batch).map(|p| p % n).collect();
    }
    let mut out = Vec::with_capacity(batch);
    let mut cached: Option<(usize, Vec<usize>)> = None;
    for p in step * batch..(step + 1) * batch {
        let epoch = p / n;
        if cached.as_ref().map(|c| c.0) != Some(epoch) {
            cached = Some((epoch, shuffled(n, seed.wrapping_add(epoch as u64))));
        }
        out.push(cached.as_ref().expect("set above").1[p % n]);
    }
    out
}

/// Rows grouped by the schema their prompt was rendered with, in order of first appearance (rows without one are
/// groups of their own).
pub fn groups_of(examples: &[Example]) -> Vec<Vec<usize>> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, e) in examples.iter().enumerate() {
        match e.context.as_deref().and_then(|c| index.get(c).copied()) {
            Some(g) => groups[g].push(i),
            None => {
                if let Some(c) = e.context.as_deref() {
                    index.insert(c, groups.len());
                }
                groups.push(vec![i]);
            }
        }
    }
    groups
}

/// The chunks (≤ `batch` rows of one group) of epoch `epoch`, in the order their steps take them: each group's rows
/// shuffled and cut into chunks, then the chunks shuffled — all seeded by (seed, epoch), so a step's rows are a
/// function of the step number as with [`step_rows`].
fn epoch_chunks(groups: &[Vec<usize>], batch: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<Vec<usize>> {
    let epoch_seed = seed.wrapping_add(epoch as u64);
    let mut chunks = Vec::new();
    for (g, rows) in groups.iter().enumerate() {
        let order: Vec<usize> = match shuffle {
            true => shuffled(rows.len(), epoch_seed ^ (g as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .into_iter()
                .map(|i| rows[i])
                .collect(),
            false => rows.clone(),
        };
        chunks.extend(order.chunks(batch).map(<[usize]>::to_vec));
    }
    match shuffle {
        true => shuffled(chunks.len(), epoch_seed).into_iter().map(|i| std::mem::take(&mut chunks[i])).collect(),
        false => chunks,
    }
}

/// How optimizer steps take their rows: any `batch` rows, or `batch` rows of one group (`data.share_prefix`).
pub enum Batches {
    Rows { n: usize },
    Groups { groups: Vec<Vec<usize>> },
}

impl Batches {
    pub fn steps_per_epoch(&self, batch: usize) -> usize {
        match self {
            Batches::Rows { n } => n.div_ceil(batch),
            Batches::Groups { groups } => groups.iter().map(|g| g.len().div_ceil(batch)).sum(),
        }
    }

    pub fn rows(&self, step: usize, batch: usize, seed: u64, shuffle: bool) -> Vec<usize> {
        match self {
            Batches::Rows { n } => step_rows(step, batch, *n, seed, shuffle),
            Batches::Groups { groups } => {
                let per_epoch = self.steps_per_epoch(batch);
                epoch_chunks(groups, batch, seed, step / per_epoch, shuffle).swap_remove(step % per_epoch)
            }
        }
    }
}

/// The sequences a forward pass computes for `rows`: alone each, or (sharing prefixes) packed greedily in order,
/// a packed sequence holding at most `pack_tokens` tokens.
pub fn pack(examples: &[Example], rows: &[usize], share_prefix: bool, pack_tokens: usize) -> Result<Vec<Packed>> {
    let one = |group: &[usize]| -> candle_core::Result<Packed> {
        let refs: Vec<(&[u32], usize)> =
            group.iter().map(|&i| (examples[i].tokens.as_slice(), examples[i].n_prompt)).collect();
        Packed::new(&refs)
    };
    if !share_prefix {
        return Ok(rows.iter().map(|&i| one(&[i])).collect::<candle_core::Result<_>>()?);
    }
    let mut out = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for &i in rows {
        current.push(i);
        if current.len() > 1 && one(&current)?.len() > pack_tokens {
            current.pop();
            out.push(one(&current)?);
            current = vec![i];
        }
    }
    if !current.is_empty() {
        out.push(one(&current)?);
    }
    Ok(out)
}

fn step_seed(seed: u64, step: usize) -> u64 {
    Rng::new(seed ^ 0xD1B5_4A32_D192_ED03).next_u64().wrapping_add(step as u64)
}

/// Mean completion-token loss over `packs` (no dropout, no update).
pub fn mean_loss(model: &TrainableModel, packs: &[Packed]) -> Result<f64> {
    let (mut sum, mut n) = (0f64, 0usize);
    for p in packs {
        sum += model.packed_nll_value(p)?;
        n += p.completion_tokens();
    }
    Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
}

/// The validation set as the steps see rows: alone, or grouped by schema in chunks of `batch`, packed.
pub fn validation_packs(val: &[Example], batch: usize, share_prefix: bool, pack_tokens: usize) -> Result<Vec<Packed>> {
    let mut out = Vec::new();
    for chunk in epoch_chunks(&groups_of(val), batch, 0, 0, false) {
        out.extend(pack(val, &chunk, share_prefix, pack_tokens)?);
    }
    Ok(out)
}

/// What one optimizer step did.
pub struct StepOutcome {
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens of the step's rows.
    pub tokens: usize,
    /// Tokens its forward passes computed (fewer when prefixes are shared).
    pub computed_tokens: usize,
}

/// One optimizer step over `packs`: summed gradients of the mean completion-token loss, clipped, then AdamW.
pub fn train_step(
    model: &TrainableModel,
    vars: &[(String, Var)],
    opt: &mut AdamW,
    packs: &[Packed],
    lr: f64,
    max_grad_norm: f64,
    rng: &mut Rng,
) -> Result<StepOutcome> {
    let total: usize = packs.iter().map(Packed::completion_tokens).sum();
    let mut grads: Option<Vec<Tensor>> = None;
    let mut loss = 0f64;
    for p in packs {
        let (l, g) = model.packed_backward(p, Some(rng), 1.0 / total as f64)?;
        loss += l;
        grads = Some(match grads.take() {
            Some(acc) => acc.iter().zip(&g).map(|(a, b)| a + b).collect::<candle_core::Result<_>>()?,
            None => g,
        });
    }
    let grads = match grads {
        Some(g) => g,
        None => vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<_>>()?,
    };
    let mut sq = 0f64;
    for g in &grads {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if !norm.is_finite() {
        bail!("the gradient is not finite (norm {norm}); lower train.learning_rate");
    }
    let grads = if max_grad_norm > 0.0 && norm > max_grad_norm {
        let s = max_grad_norm / norm;
        grads.iter().map(|g| g * s).collect::<candle_core::Result<Vec<_>>>()?
    } else {
        grads
    };
    opt.step(vars, &grads, lr)?;
    Ok(StepOutcome {
        loss,
        grad_norm: norm,
        tokens: packs.iter().map(Packed::row_tokens).sum(),
        computed_tokens: packs.iter().map(Packed::len).sum(),
    })
}

fn checkpoint_dirs(out: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(out.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join("state.json").is_file().then(|| (step, e.path()))
        })
        .collect();
    v.sort();
    v
}

fn save_checkpoint(
    out: &Path,
    model: &TrainableModel,
    opt: &AdamW,
    state: &State,
    base_model: &str,
    keep: usize,
) -> Result<()> {
    let dir = out.join("checkpoints").join(format!("step-{:06}", state.step));
    let tmp = out.join("checkpoints").join(format!(".step-{:06}.part", state.step));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    model.adapter(base_model)?.save(&tmp, &model.layout())?;
    let vars = model.vars();
    let st: HashMap<String, Tensor> = opt.state(&vars).into_iter().collect();
    candle_core::safetensors::save(&st, tmp.join("optimizer.safetensors"))?;
    std::fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(state)?)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    let all = checkpoint_dirs(out);
    for (_, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}

fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let mut recipe = Recipe::load(&args.config)?;
    if let Some(s) = args.max_steps {
        recipe.train.max_steps = s;
    }
    if let Some(o) = &args.out {
        recipe.output.dir = o.clone();
    }
    let out = recipe.output.dir.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let threads = match recipe.train.threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    };
    // SAFETY: nothing has started a thread yet in this command (the model and its pools come next).
    unsafe { copilot_core::engine::runtime::configure_threads(threads) };
    let base = copilot_core::engine::source::resolve(&recipe.model.base, true)?;
    let text = TextSide::load(&base)?;
    let (mut train, train_too_long) = read_examples(&recipe.data.train, &text, recipe.data.max_seq_len)?;
    if recipe.data.max_train_rows > 0 && train.len() > recipe.data.max_train_rows {
        let keep = shuffled(train.len(), recipe.train.seed ^ 0x5EED);
        let mut picked: Vec<usize> = keep.into_iter().take(recipe.data.max_train_rows).collect();
        picked.sort_unstable();
        let mut all: Vec<Option<Example>> = train.into_iter().map(Some).collect();
        train = picked.into_iter().map(|i| all[i].take().expect("each index once")).collect();
    }
    if train.is_empty() {
        bail!("no training rows in {} fit data.max_seq_len = {}", recipe.data.train.display(), recipe.data.max_seq_len);
    }
    let mut val = match &recipe.data.val {
        Some(p) => read_examples(p, &text, recipe.data.max_seq_len)?.0,
        None => Vec::new(),
    };
    if recipe.data.max_val_rows > 0 {
        val.truncate(recipe.data.max_val_rows);
    }
    let batch = recipe.train.batch_size;
    let share = recipe.data.share_prefix;
    let pack_tokens = recipe.pack_tokens();
    let batches = match share {
        true => Batches::Groups { groups: groups_of(&train) },
        false => Batches::Rows { n: train.len() },
    };
    let steps_per_epoch = batches.steps_per_epoch(batch);
    let val_packs = validation_packs(&val, batch, share, pack_tokens)?;
    let by_epochs = (recipe.train.epochs * steps_per_epoch as f64).ceil() as usize;
    let total_steps = match recipe.train.max_steps {
        0 => by_epochs,
        m if recipe.train.epochs > 0.0 => m.min(by_epochs),
        m => m,
    }
    .max(1);
    let max_len = train.iter().chain(&val).map(|e| e.tokens.len()).max().unwrap_or(1);
    let opts = FinetuneOptions {
        targets: recipe.targets()?,
        lora: recipe.lora_config(),
        base: recipe.base_mode()?,
        seed: recipe.train.seed,
        max_positions: max_len,
    };
    let load_start = Instant::now();
    let mut model = TrainableModel::load(&base, opts).with_context(|| format!("cannot load {}", base.display()))?;
    let load_s = load_start.elapsed().as_secs_f64();
    let vars = model.vars();
    let mut opt = AdamW::new(&vars, recipe.train.weight_decay)?;
    let mut state = State {
        step: 0,
        tokens_seen: 0,
        computed_tokens: 0,
        wall_s: 0.0,
        best_val: None,
        best_step: None,
        evals_since_best: 0,
        peak_rss_bytes: None,
        warm_start: None,
        history: vec![],
    };
    let base_model = recipe.model.base_model_id.clone();
    if args.resume {
        let Some((_, dir)) = checkpoint_dirs(&out).pop() else {
            bail!("--resume: no checkpoint in {}", out.join("checkpoints").display());
        };
        let adapter = Adapter::load(&dir, &model.layout(), &candle_core::Device::Cpu)?;
        model.load_adapter(&adapter)?;
        let vars = model.vars();
        state = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
        let st = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &candle_core::Device::Cpu)?;
        opt.restore(&vars, &st, state.step as u64)?;
        tracing::info!("resumed from {} (step {})", dir.display(), state.step);
    }
    if let (Some(dir), Some(step)) = (&args.init_adapter, args.start_step) {
        if step >= total_steps {
            bail!("--start-step {step}: the recipe has {total_steps} steps");
        }
        if checkpoint_dirs(&out).pop().is_some() {
            bail!(
                "--init-adapter: {} already holds checkpoints (continue them with --resume, or choose another --out)",
                out.display()
            );
        }
        let adapter = Adapter::load(dir, &model.layout(), &candle_core::Device::Cpu)
            .with_context(|| format!("--init-adapter {}", dir.display()))?;
        model.load_adapter(&adapter).with_context(|| format!("--init-adapter {}", dir.display()))?;
        let bytes = std::fs::read(dir.join("adapter_model.safetensors"))?;
        state.step = step;
        state.warm_start = Some(WarmStart {
            adapter: dir.display().to_string(),
            adapter_sha256: {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(&bytes))
            },
            step,
        });
        tracing::info!("starting from the adapter in {} at step {step}, with fresh optimizer moments", dir.display());
    }
    let vars = model.vars();
    tracing::info!(
        "{} training rows ({} over {} tokens skipped), {} validation rows; {} steps of {} sequences; {} trainable parameters; {} threads; base {} loaded in {:.1} s",
        train.len(),
        train_too_long,
        recipe.data.max_seq_len,
        val.len(),
        total_steps,
        batch,
        model.trainable_parameters(),
        threads,
        model.options().base.name(),
        load_s
    );
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(out.join("train_log.jsonl"))?;
    let adapter_dir = out.join("adapter");
    let t = &recipe.train;
    let bar = indicatif::ProgressBar::new(total_steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .expect("a valid template"),
    );
    bar.set_position(state.step as u64);
    let run_start = Instant::now();
    let wall_before = state.wall_s;
    let mut stopped_early = false;
    let first_val = state.history.iter().find_map(|l| l.val_loss);
    let validate = |model: &TrainableModel, state: &mut State, log: &mut std::fs::File, elapsed: f64| -> Result<bool> {
        if val.is_empty() {
            return Ok(false);
        }
        let v = mean_loss(model, &val_packs)?;
        let line = LogLine {
            step: state.step,
            loss: None,
            val_loss: Some(v),
            lr: None,
            grad_norm: None,
            tokens: None,
            computed_tokens: None,
            step_s: None,
            tokens_per_s: None,
            elapsed_s: elapsed,
        };
        writeln!(log, "{}", serde_json::to_string(&line)?)?;
        state.history.push(line);
        if state.best_val.is_none_or(|b| v < b) {
            state.best_val = Some(v);
            state.best_step = Some(state.step);
            state.evals_since_best = 0;
            model.adapter(&base_model)?.save(&adapter_dir, &model.layout())?;
        } else {
            state.evals_since_best += 1;
        }
        Ok(recipe.validation.patience > 0 && state.evals_since_best >= recipe.validation.patience)
    };
    if (state.step == 0 || args.init_adapter.is_some()) && first_val.is_none() {
        validate(&model, &mut state, &mut log, 0.0)?;
    }
    let stop_at = args.stop_at.unwrap_or(total_steps).min(total_steps);
    while state.step < stop_at {
        let step_start = Instant::now();
        let rows = batches.rows(state.step, batch, t.seed, recipe.data.shuffle);
        let packs = pack(&train, &rows, share, pack_tokens)?;
        let lr = learning_rate(state.step, total_steps, t.warmup_steps, t.learning_rate, t.min_lr_ratio);
        let mut rng = Rng::new(step_seed(t.seed, state.step));
        let done = train_step(&model, &vars, &mut opt, &packs, lr, t.max_grad_norm, &mut rng)?;
        let (loss, norm, tokens) = (done.loss, done.grad_norm, done.tokens);
        state.step += 1;
        state.tokens_seen += tokens as u64;
        state.computed_tokens += done.computed_tokens as u64;
        let step_s = step_start.elapsed().as_secs_f64();
        let tps = tokens as f64 / step_s;
        let elapsed = wall_before + run_start.elapsed().as_secs_f64();
        let line = LogLine {
            step: state.step,
            loss: Some(loss),
            val_loss: None,
            lr: Some(lr),
            grad_norm: Some(norm),
            tokens: Some(tokens),
            computed_tokens: Some(done.computed_tokens),
            step_s: Some(step_s),
            tokens_per_s: Some(tps),
            elapsed_s: elapsed,
        };
        writeln!(log, "{}", serde_json::to_string(&line)?)?;
        state.history.push(line);
        bar.set_message(format!("loss {loss:.4}  {tps:.0} tok/s  lr {lr:.2e}"));
        bar.set_position(state.step as u64);
        let last = state.step == total_steps;
        let cut = state.step == stop_at;
        let due = (recipe.validation.every > 0 && state.step.is_multiple_of(recipe.validation.every)) || last || cut;
        if due && validate(&model, &mut state, &mut log, elapsed)? && !last {
            stopped_early = true;
            tracing::info!("validation loss has not improved for {} validations: stopping", recipe.validation.patience);
        }
        state.wall_s = wall_before + run_start.elapsed().as_secs_f64();
        state.peak_rss_bytes = state.peak_rss_bytes.max(peak_rss_bytes());
        let every = recipe.checkpoint.every;
        if (every > 0 && state.step.is_multiple_of(every)) || last || cut || stopped_early {
            save_checkpoint(&out, &model, &opt, &state, &base_model, recipe.checkpoint.keep)?;
        }
        if stopped_early {
            break;
        }
    }
    bar.finish();
    if val.is_empty() {
        model.adapter(&base_model)?.save(&adapter_dir, &model.layout())?;
    }
    state.wall_s = wall_before + run_start.elapsed().as_secs_f64();
    let losses: Vec<f64> = state.history.iter().filter_map(|l| l.loss).collect();
    let vals: Vec<f64> = state.history.iter().filter_map(|l| l.val_loss).collect();
    let tail = |v: &[f64]| -> Option<f64> {
        let k = v.len().min(10);
        (k > 0).then(|| v[v.len() - k..].iter().sum::<f64>() / k as f64)
    };
    let summary = serde_json::json!({
        "recipe": recipe,
        "recipe_file": args.config.display().to_string(),
        "base": base.display().to_string(),
        "hardware": {
            "cpu": crate::host::cpu_model().unwrap_or_else(|| "unknown".into()),
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "gpu": null,
        },
        "threads": threads,
        "base_mode": model.options().base.name(),
        "trainable_parameters": model.trainable_parameters(),
        "train_rows": train.len(),
        "train_rows_over_max_seq_len": train_too_long,
        "val_rows": val.len(),
        "batch_size": batch,
        "steps": state.step,
        "total_steps_planned": total_steps,
        "epochs": state.step as f64 / steps_per_epoch as f64,
        "lr_schedule": {
            "kind": "linear warm-up, cosine decay",
            "peak": t.learning_rate,
            "warmup_steps": t.warmup_steps,
            "min_lr_ratio": t.min_lr_ratio,
            "weight_decay": t.weight_decay,
            "max_grad_norm": t.max_grad_norm,
        },
        "tokens_seen": state.tokens_seen,
        "wall_s": state.wall_s,
        "tokens_per_s": state.tokens_seen as f64 / state.wall_s.max(1e-9),
        "share_prefix": share,
        "pack_tokens": pack_tokens,
        "computed_tokens": state.computed_tokens,
        "computed_tokens_per_s": state.computed_tokens as f64 / state.wall_s.max(1e-9),
        "load_s": load_s,
        "peak_rss_bytes": state.peak_rss_bytes.max(peak_rss_bytes()),
        "train_loss_first": losses.first(),
        "train_loss_last10_mean": tail(&losses),
        "val_loss_first": vals.first(),
        "val_loss_best": state.best_val,
        "best_step": state.best_step,
        "stopped_early": stopped_early,
        "warm_start": state.warm_start,
        "stopped_at": args.stop_at.filter(|_| state.step < total_steps && !stopped_early).map(|_| state.step),
        "adapter": adapter_dir.display().to_string(),
    });
    std::fs::write(out.join("training_summary.json"), serde_json::to_vec_pretty(&summary)?)?;
    if let Err(e) = plot_loss(&state.history, &out.join("loss.png"), &recipe.model.base_model_id) {
        tracing::warn!("no loss chart: {e:#}");
    }
    println!(
        "trained {} steps ({} tokens, {:.0} s, {:.1} tok/s); train loss {} → {}; val loss {} → best {}; adapter in {}",
        state.step,
        state.tokens_seen,
        state.wall_s,
        state.tokens_seen as f64 / state.wall_s.max(1e-9),
        losses.first().map(|v| format!("{v:.4}")).unwrap_or("-".into()),
        tail(&losses).map(|v| format!("{v:.4}")).unwrap_or("-".into()),
        vals.first().map(|v| format!("{v:.4}")).unwrap_or("-".into()),
        state.best_val.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
        adapter_dir.display()
    );
    Ok(())
}

/// Training loss per step (and its running mean) with validation loss, against steps.
fn plot_loss(history: &[LogLine], path: &Path, title: &str) -> Result<()> {
    use plotters::prelude::*;
    crate::eval::report::register_font()?;
    let train: Vec<(f64, f64)> = history.iter().filter_map(|l| Some((l.step as f64, l.loss?))).collect();
    let val: Vec<(f64, f64)> = history.iter().filter_map(|l| Some((l.step as f64, l.val_loss?))).collect();
    let k = 10usize;
    let smooth: Vec<(f64, f64)> = (0..train.len())
        .map(|i| {
            let lo = i.saturating_sub(k - 1);
            let w = &train[lo..=i];
            (train[i].0, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
        })
        .collect();
    let xmax = train.iter().chain(&val).map(|p| p.0).fold(1.0, f64::max);
    let ymax = train.iter().chain(&val).map(|p| p.1).fold(0.1, f64::max) * 1.05;
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title} — LoRA fine-tuning loss"), ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc("loss (nats / completion token)")
        .label_style(("sans-serif", 15))
        .draw()?;
    let light = RGBColor(150, 180, 220);
    let blue = RGBColor(52, 101, 164);
    let orange = RGBColor(204, 121, 56);
    chart
        .draw_series(LineSeries::new(train.iter().copied(), light))?
        .label("train (step)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], light));
    chart
        .draw_series(LineSeries::new(smooth, blue.stroke_width(2)))?
        .label("train (mean of 10)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], blue.stroke_width(2)));
    if !val.is_empty() {
        chart
            .draw_series(LineSeries::new(val.iter().copied(), orange.stroke_width(2)).point_size(3))?
            .label("validation")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], orange.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(schema: &str, own: &[u32]) -> Example {
        // Rows of one schema share its prompt tokens (as the rendered prompts do); the last own token is the answer.
        let mut tokens: Vec<u32> = schema.bytes().map(u32::from).collect();
        tokens.extend(own);
        Example { n_prompt: tokens.len() - 1, tokens, context: Some(schema.to_string()) }
    }

    fn rows() -> Vec<Example> {
        let mut v = Vec::new();
        for (i, schema) in ["CREATE TABLE a (x int);", "CREATE TABLE b (y int, z text);", "t"].iter().enumerate() {
            for q in 0..(3 + 2 * i as u32) {
                v.push(row(schema, &[900 + q, 1000 + q]));
            }
        }
        v.push(Example { tokens: vec![1, 2, 3], n_prompt: 2, context: None });
        v
    }

    #[test]
    fn grouped_steps_take_every_row_once_per_epoch_from_one_schema_each() {
        let ex = rows();
        let groups = groups_of(&ex);
        assert_eq!(groups.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 5, 7, 1]);
        let b = Batches::Groups { groups: groups.clone() };
        let per_epoch = b.steps_per_epoch(2);
        assert_eq!(per_epoch, 2 + 3 + 4 + 1);
        for epoch in 0..2 {
            let mut seen: Vec<usize> = Vec::new();
            for step in epoch * per_epoch..(epoch + 1) * per_epoch {
                let r = b.rows(step, 2, 42, true);
                assert!(!r.is_empty() && r.len() <= 2);
                assert!(groups.iter().any(|g| r.iter().all(|i| g.contains(i))), "step {step} mixes schemas: {r:?}");
                assert_eq!(r, b.rows(step, 2, 42, true), "a step's rows are a function of the step");
                seen.extend(r);
            }
            seen.sort_unstable();
            assert_eq!(seen, (0..ex.len()).collect::<Vec<_>>(), "epoch {epoch}");
        }
        let order = |seed| (0..per_epoch).map(|s| b.rows(s, 2, seed, true)).collect::<Vec<_>>();
        assert_ne!(order(42), order(43), "the seed shuffles");
        assert_ne!(order(42), (per_epoch..2 * per_epoch).map(|s| b.rows(s, 2, 42, true)).collect::<Vec<_>>());
    }

    #[test]
    fn packing_shares_the_prefix_and_respects_the_token_bound() {
        let ex = rows();
        let g = &groups_of(&ex)[1];
        let alone = pack(&ex, g, false, 1024).unwrap();
        assert_eq!(alone.len(), 5);
        let schema_len = ex[g[0]].n_prompt - 1;
        let packed = pack(&ex, g, true, 1024).unwrap();
        assert_eq!(packed.len(), 1);
        assert_eq!(packed[0].len(), schema_len + 2 * 5, "the schema once, then each row's question and answer");
        assert_eq!(packed[0].row_tokens(), alone.iter().map(Packed::len).sum::<usize>());
        assert_eq!(packed[0].completion_tokens(), 5);
        // A bound of the schema plus two rows' own tokens: three sequences (2 + 2 + 1 rows).
        let tight = pack(&ex, g, true, schema_len + 4).unwrap();
        assert_eq!(tight.iter().map(Packed::completion_tokens).collect::<Vec<_>>(), vec![2, 2, 1]);
        assert!(tight.iter().all(|p| p.len() <= schema_len + 4));
        // Validation: every row once, rows of one schema together.
        let v = validation_packs(&ex, 8, true, 1024).unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v.iter().map(Packed::completion_tokens).sum::<usize>(), ex.len());
    }
}
