//! LoRA adapters in Hugging Face PEFT's on-disk format (`adapter_config.json` + `adapter_model.safetensors`), so
//! an adapter trained here loads in `peft.PeftModel.from_pretrained` and one trained there loads here.
//!
//! Names: PEFT keys tensors by the Transformers module path, e.g.
//! `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (r × in) and `…lora_B.weight` (out × r); the
//! GGUF calls the same weight `blk.3.attn_q.weight`. [`Target`] maps one to the other.
//!
//! Layout: llama.cpp's converter permutes the rows of llama/mistral `q_proj` and `k_proj` (Transformers' rotary
//! layout → GGML's interleaved one). An adapter's B matrix has one row per output row, so it is permuted the same
//! way on the way in and back on the way out; A (one column per input) is untouched. qwen2 keeps Transformers'
//! layout in GGUF, so nothing moves there. Adapters here are held in the GGUF layout.

use crate::tune::lora::LoraConfig;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub use crate::engine::model::Target;

/// What a model needs to place an adapter: its architecture (for the q/k row layout) and head counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub arch: String,
    pub n_head: usize,
    pub n_kv_head: usize,
}

impl Layout {
    /// The GGUF row that Transformers' row `row` of a `target` weight with `n_rows` rows became, or `row` where the
    /// converter keeps the order.
    fn gguf_row(&self, target: Target, row: usize, n_rows: usize) -> usize {
        let heads = match (self.arch.as_str(), target) {
            ("llama" | "mistral", Target::Q) => self.n_head,
            ("llama" | "mistral", Target::K) => self.n_kv_head,
            _ => return row,
        };
        let hd = n_rows / heads;
        let (h, r) = (row / hd, row % hd);
        let (half, j) = (r / (hd / 2), r % (hd / 2));
        h * hd + 2 * j + half
    }

    fn permute_rows(&self, target: Target, b: &Tensor, to_gguf: bool) -> candle_core::Result<Tensor> {
        let n = b.dim(0)?;
        let mut idx = vec![0u32; n];
        for row in 0..n {
            let g = self.gguf_row(target, row, n);
            // to GGUF: gguf row g takes Transformers' row `row`; back: the reverse.
            if to_gguf {
                idx[g] = row as u32;
            } else {
                idx[row] = g as u32;
            }
        }
        if idx.iter().enumerate().all(|(i, &v)| i == v as usize) {
            return Ok(b.clone());
        }
        b.index_select(&Tensor::new(idx.as_slice(), b.device())?, 0)
    }
}

/// A set of trained adapters, in the GGUF layout: `(layer, target) → (A: r × in, B: out × r)`.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: LoraConfig,
    /// `base_model_name_or_path`: the Hub id (or path) of the model the adapter was trained on.
    pub base_model: String,
    pub weights: BTreeMap<(usize, Target), (Tensor, Tensor)>,
}

/// The fields of PEFT's `adapter_config.json` we write and read (others are kept at PEFT's defaults on writing
/// and ignored on reading).
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfig {
    peft_type: String,
    #[serde(default)]
    task_type: Option<String>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    r: usize,
    lora_alpha: f32,
    #[serde(default)]
    lora_dropout: f32,
    target_modules: TargetModules,
    #[serde(default = "bias_none")]
    bias: String,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    inference_mode: bool,
}

fn bias_none() -> String {
    "none".into()
}

/// PEFT writes `target_modules` as a list, and accepts a regex string.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

impl Adapter {
    /// Targets present, in PEFT's order.
    pub fn targets(&self) -> Vec<Target> {
        let mut t: Vec<Target> = self.weights.keys().map(|(_, t)| *t).collect();
        t.sort();
        t.dedup();
        t
    }

    /// Write `dir/adapter_config.json` and `dir/adapter_model.safetensors` (weights in f32, as trained).
    pub fn save(&self, dir: &Path, layout: &Layout) -> candle_core::Result<()> {
        self.save_as(dir, layout, candle_core::DType::F32)
    }

    /// [`Adapter::save`] with the weights stored as `dtype` (F32, F16 or BF16; PEFT loads any of them): F16 halves
    /// a shipped adapter and keeps 11 significant bits, finer than the 4–6-bit weights it is folded into.
    pub fn save_as(&self, dir: &Path, layout: &Layout, dtype: candle_core::DType) -> candle_core::Result<()> {
        use candle_core::DType;
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(err(format!("adapter weights are stored as f32, f16 or bf16, not {dtype:?}")));
        }
        std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        let cfg = PeftConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some(self.base_model.clone()),
            r: self.config.rank,
            lora_alpha: self.config.alpha,
            lora_dropout: self.config.dropout,
            target_modules: TargetModules::List(self.targets().iter().map(|t| t.peft_name().to_string()).collect()),
            bias: "none".into(),
            fan_in_fan_out: false,
            use_rslora: false,
            inference_mode: true,
        };
        let json = serde_json::to_string_pretty(&cfg).map_err(|e| err(e.to_string()))?;
        std::fs::write(dir.join(CONFIG_FILE), json + "\n")
            .map_err(|e| err(format!("cannot write {CONFIG_FILE}: {e}")))?;
        let mut tensors = HashMap::new();
        for ((layer, target), (a, b)) in &self.weights {
            let key = target.peft_key(*layer);
            tensors.insert(format!("{key}.lora_A.weight"), a.to_dtype(dtype)?.contiguous()?);
            let b = layout.permute_rows(*target, b, false)?.to_dtype(dtype)?;
            tensors.insert(format!("{key}.lora_B.weight"), b.contiguous()?);
        }
        candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))
    }

    /// Read a PEFT LoRA adapter folder for a model of `layout`.
    pub fn load(dir: &Path, layout: &Layout, device: &Device) -> candle_core::Result<Adapter> {
        let text = std::fs::read_to_string(dir.join(CONFIG_FILE))
            .map_err(|e| err(format!("cannot read {}: {e}", dir.join(CONFIG_FILE).display())))?;
        let cfg: PeftConfig = serde_json::from_str(&text).map_err(|e| err(format!("{CONFIG_FILE}: {e}")))?;
        if cfg.peft_type != "LORA" {
            return Err(err(format!("{CONFIG_FILE}: peft_type {} is not LORA", cfg.peft_type)));
        }
        if cfg.use_rslora || cfg.fan_in_fan_out || cfg.bias != "none" {
            return Err(err(format!(
                "{CONFIG_FILE}: use_rslora, fan_in_fan_out and trained biases are not supported (bias = {})",
                cfg.bias
            )));
        }
        let tensors = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), device)?;
        let mut weights = BTreeMap::new();
        for (name, a) in &tensors {
            let Some(stem) = name.strip_suffix(".lora_A.weight") else { continue };
            let b =
                tensors.get(&format!("{stem}.lora_B.weight")).ok_or_else(|| err(format!("{name} has no lora_B")))?;
            let parsed =
                stem.split_once(".layers.").and_then(|(_, rest)| rest.split_once('.')).and_then(|(layer, rest)| {
                    Some((layer.parse::<usize>().ok()?, Target::from_name(rest.rsplit('.').next()?)?))
                });
            let (layer, target) = parsed.ok_or_else(|| err(format!("unrecognized adapter tensor {name}")))?;
            if a.dim(0)? != cfg.r || b.dim(1)? != cfg.r {
                return Err(err(format!("{stem}: A {:?} / B {:?} do not have rank {}", a.dims(), b.dims(), cfg.r)));
            }
            let b = layout.permute_rows(target, &b.to_dtype(candle_core::DType::F32)?, true)?;
            weights.insert((layer, target), (a.to_dtype(candle_core::DType::F32)?, b));
        }
        if weights.is_empty() {
            return Err(err(format!("{} holds no LoRA tensors", dir.join(WEIGHTS_FILE).display())));
        }
        Ok(Adapter {
            config: LoraConfig { rank: cfg.r, alpha: cfg.lora_alpha, dropout: cfg.lora_dropout },
            base_model: cfg.base_model_name_or_path.unwrap_or_default(),
            weights,
        })
    }
}

/// What [`merge_into_gguf`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSummary {
    pub tensors: usize,
    /// Weights that had an adapter folded in (beside them or re-quantized, as [`Fold`] says).
    pub merged: usize,
    pub metadata_keys: usize,
    pub bytes: u64,
}

/// How [`merge_into_gguf`] puts an adapter into a GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    /// Beside the weights (`export --beside`): the base's tensors byte for byte, and each adapted weight's A and B as
    /// tensors next to it (`….weight.lora_a` / `.lora_b`, f16 when every value is one, else f32), which our engine
    /// applies at run time — the tuned model exactly as trained. Other engines do not know these tensors.
    Beside,
    /// Into the weights (`export`'s default): `W + (α/r)·B·A` re-quantized to W's own format — a plain GGUF any
    /// engine loads, but on 4-bit weights the rounding keeps little of a small change (reports/merge_error.md).
    Requantize,
}

/// Fold `adapter` into the GGUF at `base` and write the result to `out`, as `fold` says. Every base tensor keeps
/// its name, shape and quantization, and all the base's metadata is kept — architecture, tokenizer, chat
/// template — so the file loads wherever the base does (`SET copilot.model`). Adds `copilot.lora.*` keys recording
/// the adapter's base model, rank and alpha (and `copilot.lora.fold = "beside"` for that fold). Deterministic to the bit: `scripts/fetch-model`
/// checks the result against a recorded sha256.
pub fn merge_into_gguf(base: &Path, adapter: &Adapter, out: &Path, fold: Fold) -> candle_core::Result<MergeSummary> {
    use candle_core::quantized::{gguf_file, QTensor};
    let mut f = std::fs::File::open(base).map_err(|e| err(format!("cannot open {}: {e}", base.display())))?;
    let ct = gguf_file::Content::read(&mut f)
        .map_err(|e| err(format!("{} is not a readable GGUF file: {e}", base.display())))?;
    let device = Device::Cpu;
    let mut names: Vec<(&String, u64)> = ct.tensor_infos.iter().map(|(n, i)| (n, i.offset)).collect();
    names.sort_by_key(|(_, off)| *off);
    if let Some(name) = crate::engine::model::adapter_tensor(&ct) {
        return Err(err(format!(
            "{} already carries an adapter ({name}): fold into its base model instead",
            base.display()
        )));
    }
    let mut used = 0;
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for (name, _) in names {
        let qt = ct.tensor(&mut f, name, &device)?;
        let key = name.strip_prefix("blk.").and_then(|rest| rest.split_once('.')).and_then(|(layer, rest)| {
            Some((layer.parse::<usize>().ok()?, Target::from_name(rest.strip_suffix(".weight")?)?))
        });
        let qt = match key.and_then(|k| adapter.weights.get(&k).map(|w| (k, w))) {
            Some(((layer, target), (a, b))) => {
                let (n, k) = qt.shape().dims2()?;
                if a.dims() != [adapter.config.rank, k] || b.dims() != [n, adapter.config.rank] {
                    return Err(err(format!(
                        "adapter for layer {layer} {} has A {:?}, B {:?}; the base weight {name} is {n}×{k}",
                        target.peft_name(),
                        a.dims(),
                        b.dims()
                    )));
                }
                used += 1;
                match fold {
                    Fold::Requantize => crate::tune::lora::merge(&qt, a, b, adapter.config.scale())?,
                    Fold::Beside => {
                        let (na, nb) = crate::engine::model::lora_names(name);
                        tensors.push((name.clone(), qt));
                        tensors.push((na, stored_exactly(a)?));
                        tensors.push((nb, stored_exactly(b)?));
                        continue;
                    }
                }
            }
            None => qt,
        };
        tensors.push((name.clone(), qt));
    }
    if used != adapter.weights.len() {
        return Err(err(format!(
            "the adapter has {} weights but only {used} match tensors of {} (another base model?)",
            adapter.weights.len(),
            base.display()
        )));
    }
    use gguf_file::Value;
    // The writer lays tensors out at its own 32-byte alignment; a base's own `general.alignment` would misdescribe it.
    let mut meta: Vec<(String, Value)> = ct
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.alignment")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.push(("copilot.lora.base_model".into(), Value::String(adapter.base_model.clone())));
    meta.push(("copilot.lora.rank".into(), Value::U32(adapter.config.rank as u32)));
    meta.push((crate::engine::model::LORA_ALPHA_KEY.into(), Value::F32(adapter.config.alpha)));
    // Only the new fold is marked: a re-quantized merge stays byte for byte what it was before folds had names
    // (the shipped default's sha256 in scripts/models.tsv).
    if fold == Fold::Beside {
        meta.push(("copilot.lora.fold".into(), Value::String("beside".into())));
    }
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tmp = out.with_extension("gguf.part");
    {
        let file = std::fs::File::create(&tmp).map_err(|e| err(format!("cannot create {}: {e}", tmp.display())))?;
        let mut w = std::io::BufWriter::new(file);
        gguf_file::write(&mut w, &meta_refs, &tensor_refs)?;
        std::io::Write::flush(&mut w)?;
    }
    std::fs::rename(&tmp, out).map_err(|e| err(format!("cannot write {}: {e}", out.display())))?;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(MergeSummary { tensors: tensors.len(), merged: used, metadata_keys: meta.len(), bytes })
}

/// `t` as an f16 GGUF tensor when every value survives the round trip through f16 (an adapter saved in f16, as
/// the shipped one is), else as f32: either way the engine reads back exactly the values trained.
fn stored_exactly(t: &Tensor) -> candle_core::Result<candle_core::quantized::QTensor> {
    use candle_core::quantized::{GgmlDType, QTensor};
    let t = t.to_dtype(candle_core::DType::F32)?;
    let back = t.to_dtype(candle_core::DType::F16)?.to_dtype(candle_core::DType::F32)?;
    let exact = t
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .zip(back.flatten_all()?.to_vec1::<f32>()?)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    QTensor::quantize(&t, if exact { GgmlDType::F16 } else { GgmlDType::F32 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tune::lora::Rng;
    use candle_core::DType;

    fn t(shape: (usize, usize), seed: u64) -> Tensor {
        let mut rng = Rng::new(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.uniform() - 0.5).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn adapter() -> Adapter {
        let mut weights = BTreeMap::new();
        // q: 4 heads × 8 dims = 32 rows; k: 2 heads × 8 = 16; down: 32 × 64.
        weights.insert((0, Target::Q), (t((4, 32), 1), t((32, 4), 2)));
        weights.insert((0, Target::K), (t((4, 32), 3), t((16, 4), 4)));
        weights.insert((1, Target::Down), (t((4, 64), 5), t((32, 4), 6)));
        Adapter {
            config: LoraConfig { rank: 4, alpha: 8.0, dropout: 0.05 },
            base_model: "Qwen/Qwen2.5-Coder-1.5B-Instruct".into(),
            weights,
        }
    }

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("copilot-peft-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn adapters_round_trip_in_peft_format() {
        for arch in ["qwen2", "llama"] {
            let layout = Layout { arch: arch.into(), n_head: 4, n_kv_head: 2 };
            let a = adapter();
            let d = dir(arch);
            a.save(&d, &layout).unwrap();
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.join(CONFIG_FILE)).unwrap()).unwrap();
            assert_eq!(cfg["peft_type"], "LORA");
            assert_eq!(cfg["r"], 4);
            assert_eq!(cfg["lora_alpha"], 8.0);
            assert_eq!(cfg["base_model_name_or_path"], "Qwen/Qwen2.5-Coder-1.5B-Instruct");
            assert_eq!(cfg["target_modules"], serde_json::json!(["q_proj", "k_proj", "down_proj"]));
            let raw = candle_core::safetensors::load(d.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
            let mut names: Vec<&String> = raw.keys().collect();
            names.sort();
            assert_eq!(
                names,
                [
                    "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",
                    "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight",
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                    "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight",
                    "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight",
                ]
            );
            let back = Adapter::load(&d, &layout, &Device::Cpu).unwrap();
            assert_eq!(back.config, a.config);
            assert_eq!(back.base_model, a.base_model);
            assert_eq!(back.weights.len(), a.weights.len());
            for (key, (wa, wb)) in &a.weights {
                let (ba, bb) = &back.weights[key];
                assert_eq!(wa.to_vec2::<f32>().unwrap(), ba.to_vec2::<f32>().unwrap(), "{arch} {key:?} A");
                assert_eq!(wb.to_vec2::<f32>().unwrap(), bb.to_vec2::<f32>().unwrap(), "{arch} {key:?} B");
            }
            // On disk, llama's q/k B rows are in Transformers' order; qwen2's and down_proj's are as held.
            let disk_qb =
                raw["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].to_vec2::<f32>().unwrap();
            let held_qb = a.weights[&(0, Target::Q)].1.to_vec2::<f32>().unwrap();
            assert_eq!(disk_qb == held_qb, arch == "qwen2", "{arch}: q_proj B layout on disk");
            std::fs::remove_dir_all(&d).ok();
        }
    }

    #[test]
    fn adapters_store_in_half_precision_and_load_back_as_the_rounded_weights() {
        let layout = Layout { arch: "qwen2".into(), n_head: 4, n_kv_head: 2 };
        let a = adapter();
        let (full, half) = (dir("f32"), dir("f16"));
        a.save(&full, &layout).unwrap();
        a.save_as(&half, &layout, DType::F16).unwrap();
        let raw = candle_core::safetensors::load(half.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
        assert!(raw.values().all(|t| t.dtype() == DType::F16), "stored as f16");
        let size = |d: &Path| std::fs::metadata(d.join(WEIGHTS_FILE)).unwrap().len();
        assert!(size(&half) * 10 < size(&full) * 6, "f16 file {} vs f32 {}", size(&half), size(&full));
        let back = Adapter::load(&half, &layout, &Device::Cpu).unwrap();
        for (key, (wa, wb)) in &a.weights {
            let (ba, bb) = &back.weights[key];
            for (w, b) in [(wa, ba), (wb, bb)] {
                let rounded = w.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
                assert_eq!(
                    b.to_vec2::<f32>().unwrap(),
                    rounded.to_vec2::<f32>().unwrap(),
                    "{key:?}: f16 of the weight"
                );
                let rel = ((w - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap())
                    / w.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(rel < 1e-3, "{key:?}: f16 rounding cost {rel}");
            }
        }
        assert!(a.save_as(&dir("q8"), &layout, DType::U8).is_err(), "only float formats");
        std::fs::remove_dir_all(&full).ok();
        std::fs::remove_dir_all(&half).ok();
    }

    #[test]
    fn llama_rows_follow_the_converters_permutation() {
        // One head of 8: Transformers' rows 0..4 are the first rotary half, 4..8 the second; GGML interleaves them.
        let layout = Layout { arch: "llama".into(), n_head: 1, n_kv_head: 1 };
        let got: Vec<usize> = (0..8).map(|r| layout.gguf_row(Target::Q, r, 8)).collect();
        assert_eq!(got, vec![0, 2, 4, 6, 1, 3, 5, 7]);
        assert_eq!(layout.gguf_row(Target::V, 3, 8), 3, "v_proj is not permuted");
        let qwen = Layout { arch: "qwen2".into(), n_head: 1, n_kv_head: 1 };
        assert_eq!(qwen.gguf_row(Target::Q, 1, 8), 1);
    }

    #[test]
    fn foreign_or_broken_adapters_are_refused_clearly() {
        let layout = Layout { arch: "qwen2".into(), n_head: 4, n_kv_head: 2 };
        let d = dir("broken");
        adapter().save(&d, &layout).unwrap();
        let cfg_path = d.join(CONFIG_FILE);
        let orig = std::fs::read_to_string(&cfg_path).unwrap();
        for (from, to, expect) in [
            ("\"LORA\"", "\"IA3\"", "not LORA"),
            ("\"use_rslora\": false", "\"use_rslora\": true", "not supported"),
            ("\"r\": 4", "\"r\": 8", "do not have rank"),
        ] {
            std::fs::write(&cfg_path, orig.replace(from, to)).unwrap();
            let e = Adapter::load(&d, &layout, &Device::Cpu).unwrap_err().to_string();
            assert!(e.contains(expect), "{from} → {to}: {e}");
        }
        std::fs::write(&cfg_path, &orig).unwrap();
        std::fs::remove_file(d.join(WEIGHTS_FILE)).unwrap();
        assert!(Adapter::load(&d, &layout, &Device::Cpu).is_err());
        std::fs::remove_dir_all(&d).ok();
    }
}
