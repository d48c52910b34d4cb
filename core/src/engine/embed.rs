//! Sentence embeddings: a BERT-family encoder (all-MiniLM-L6-v2 by default) run on the CPU, mean-pooled and
//! normalised, so that the cosine of two texts' vectors says how close their meanings are.
//!
//! The engine uses it to tell whether a question speaks of what the schema holds when its words are not the
//! schema's words ("musicians" for a `singer` table, "automobiles" for `cars_data`): see
//! [`crate::sql::suggest::Grounding`]. The weights are read from a sentence-transformers folder (`config.json`,
//! `tokenizer.json`, `model.safetensors`), named by path or as `hf:<owner>/<repo>/model.safetensors`
//! ([`crate::engine::source`]); `scripts/fetch-model --minilm` puts one in place offline.
//!
//! The forward pass is ours (small, one job); `tests` check it against candle-transformers' BERT.

use crate::error::CoreError;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What `config.json` says about a BERT encoder (the fields we use).
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "one")]
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "gelu")]
    pub hidden_act: String,
}

fn one() -> usize {
    1
}
fn eps() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
}

/// The encoder and its tokenizer, with a cache of the texts already embedded (schema words recur on every question).
pub struct Embedder {
    words: Embedding,
    positions: Embedding,
    types: Embedding,
    norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    max_positions: usize,
    tokenizer: tokenizers::Tokenizer,
    cache: HashMap<String, Vec<f32>>,
    /// Where the weights came from, for the engine's status.
    pub origin: String,
}

/// Texts kept in the cache at most (a few hundred schemas' words); past it the cache is emptied and refilled.
const CACHE_ENTRIES: usize = 50_000;

impl Embedder {
    /// Load from a sentence-transformers folder, its `model.safetensors`, or `hf:<owner>/<repo>/model.safetensors`.
    pub fn load(spec: &str) -> Result<Embedder, CoreError> {
        let path =
            if Path::new(spec).is_dir() { PathBuf::from(spec) } else { crate::engine::source::resolve(spec, false)? };
        let dir: PathBuf = if path.is_dir() { path } else { path.parent().map(Path::to_path_buf).unwrap_or_default() };
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| {
                CoreError::Model(format!("embedding model: cannot read {}: {e}", dir.join(name).display()))
            })
        };
        let cfg: BertConfig = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| CoreError::Model(format!("embedding model: {}/config.json: {e}", dir.display())))?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(read("tokenizer.json")?)
            .map_err(|e| CoreError::Tokenizer(format!("embedding model: {}/tokenizer.json: {e}", dir.display())))?;
        // Some tokenizer.json files pad every text to a fixed length (this model's: 128): we pad per batch ourselves.
        let mut tokenizer = tokenizer;
        tokenizer.with_padding(None);
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(CoreError::Model(format!("embedding model: no {}", weights.display())));
        }
        // SAFETY: the file is mapped read-only and only read while the VarBuilder copies the tensors out of it; we
        // do not write it, and a file changed under us gives wrong numbers, not undefined behaviour in our code.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &Device::Cpu)? };
        let mut e = Embedder::from_weights(&cfg, vb, tokenizer)?;
        e.origin = spec.to_string();
        Ok(e)
    }

    /// The size of the weights file `spec` names, when it is a local folder or file (what loading it will add to
    /// the engine's memory, about once for the mapped file and once for the tensors).
    pub fn weights_bytes(spec: &str) -> Option<u64> {
        let p = Path::new(spec);
        let file = if p.is_dir() { p.join("model.safetensors") } else { p.to_path_buf() };
        std::fs::metadata(file).ok().map(|m| m.len())
    }

    /// Build from weights named as in a sentence-transformers BERT (`embeddings.*`, `encoder.layer.N.*`, optionally
    /// under `bert.`).
    pub fn from_weights(
        cfg: &BertConfig,
        vb: VarBuilder,
        tokenizer: tokenizers::Tokenizer,
    ) -> Result<Embedder, CoreError> {
        if cfg.hidden_act != "gelu" {
            return Err(CoreError::Model(format!("embedding model: activation {:?} is not supported", cfg.hidden_act)));
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(CoreError::Model("embedding model: hidden size is not a multiple of the heads".into()));
        }
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") { vb.pp("bert") } else { vb };
        let h = cfg.hidden_size;
        let e = vb.pp("embeddings");
        let words = embedding(cfg.vocab_size, h, e.pp("word_embeddings"))?;
        let positions = embedding(cfg.max_position_embeddings, h, e.pp("position_embeddings"))?;
        let types = embedding(cfg.type_vocab_size, h, e.pp("token_type_embeddings"))?;
        let norm = layer_norm(h, cfg.layer_norm_eps, e.pp("LayerNorm"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let a = l.pp("attention");
                Ok(Layer {
                    query: linear(h, h, a.pp("self.query"))?,
                    key: linear(h, h, a.pp("self.key"))?,
                    value: linear(h, h, a.pp("self.value"))?,
                    attn_out: linear(h, h, a.pp("output.dense"))?,
                    attn_norm: layer_norm(h, cfg.layer_norm_eps, a.pp("output.LayerNorm"))?,
                    up: linear(h, cfg.intermediate_size, l.pp("intermediate.dense"))?,
                    down: linear(cfg.intermediate_size, h, l.pp("output.dense"))?,
                    out_norm: layer_norm(h, cfg.layer_norm_eps, l.pp("output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>, candle_core::Error>>()?;
        Ok(Embedder {
            words,
            positions,
            types,
            norm,
            layers,
            heads: cfg.num_attention_heads,
            max_positions: cfg.max_position_embeddings,
            tokenizer,
            cache: HashMap::new(),
            origin: String::new(),
        })
    }

    /// The encoder's last hidden states for a padded batch of token ids, `[batch, tokens, hidden]`.
    pub fn hidden_states(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor, CoreError> {
        let (b, t) = ids.dims2()?;
        let pos = Tensor::arange(0u32, t as u32, &Device::Cpu)?.unsqueeze(0)?.broadcast_as((b, t))?;
        let zeros = Tensor::zeros((b, t), DType::U32, &Device::Cpu)?;
        let mut x = self.norm.forward(
            &self.words.forward(ids)?.add(&self.positions.forward(&pos)?)?.add(&self.types.forward(&zeros)?)?,
        )?;
        let hidden = x.dim(2)?;
        let d = hidden / self.heads;
        // 0 where a token may be attended to, a large negative number at padding: [b, 1, 1, t].
        let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((b, 1, 1, t))?;
        let scale = 1.0 / (d as f64).sqrt();
        for l in &self.layers {
            let split = |y: Tensor| -> Result<Tensor, candle_core::Error> {
                y.reshape((b, t, self.heads, d))?.transpose(1, 2)?.contiguous()
            };
            let q = split(l.query.forward(&x)?)?;
            let k = split(l.key.forward(&x)?)?;
            let v = split(l.value.forward(&x)?)?;
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
            let att = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, hidden))?;
            let a = l.attn_norm.forward(&(l.attn_out.forward(&ctx)? + &x)?)?;
            let up = l.up.forward(&a)?.gelu_erf()?;
            x = l.out_norm.forward(&(l.down.forward(&up)? + &a)?)?;
        }
        Ok(x)
    }

    /// Token ids for each text ([CLS] … [SEP]), cut to the model's positions.
    fn encode(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, CoreError> {
        texts
            .iter()
            .map(|t| {
                let enc = self.tokenizer.encode(*t, true).map_err(|e| CoreError::Tokenizer(e.to_string()))?;
                let mask = enc.get_attention_mask();
                let mut ids: Vec<u32> =
                    enc.get_ids().iter().zip(mask).filter(|(_, m)| **m == 1).map(|(i, _)| *i).collect();
                if ids.len() > self.max_positions {
                    let last = ids[ids.len() - 1];
                    ids.truncate(self.max_positions);
                    ids[self.max_positions - 1] = last;
                }
                Ok(ids)
            })
            .collect()
    }

    /// Mean-pooled, unit-length vectors for `texts`, computed as one padded batch (no cache).
    pub fn embed_uncached(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, CoreError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let ids = self.encode(texts)?;
        let t = ids.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let b = ids.len();
        let mut flat = vec![0u32; b * t];
        let mut mask = vec![0u32; b * t];
        for (i, row) in ids.iter().enumerate() {
            flat[i * t..i * t + row.len()].copy_from_slice(row);
            mask[i * t..i * t + row.len()].iter_mut().for_each(|m| *m = 1);
        }
        let ids = Tensor::from_vec(flat, (b, t), &Device::Cpu)?;
        let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu)?;
        let x = self.hidden_states(&ids, &mask)?;
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = x.broadcast_mul(&m)?.sum(1)?;
        let counts = m.sum(1)?.clamp(1.0, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norm)?.to_vec2::<f32>()?)
    }

    /// [`Embedder::embed_uncached`] through the cache: only texts not seen before are run, in batches of 64.
    pub fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, CoreError> {
        let mut missing: Vec<&str> = texts.iter().copied().filter(|t| !self.cache.contains_key(*t)).collect();
        missing.sort_unstable();
        missing.dedup();
        if self.cache.len() + missing.len() > CACHE_ENTRIES {
            self.cache.clear();
            missing = texts.to_vec();
            missing.sort_unstable();
            missing.dedup();
        }
        for chunk in missing.chunks(64) {
            for (t, v) in chunk.iter().zip(self.embed_uncached(chunk)?) {
                self.cache.insert((*t).to_string(), v);
            }
        }
        Ok(texts.iter().map(|t| self.cache[*t].clone()).collect())
    }

    /// Texts embedded and kept.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }
}

/// Cosine of two unit vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    /// A WordPiece tokenizer over a tiny vocabulary, as a BERT tokenizer.json would build it.
    fn tiny_tokenizer() -> tokenizers::Tokenizer {
        let vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "singer", "concert", "car", "##s", "name", "age", "the"];
        let vocab: serde_json::Map<String, serde_json::Value> =
            vocab.iter().enumerate().map(|(i, w)| (w.to_string(), serde_json::json!(i))).collect();
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                           "strip_accents": null, "lowercase": true},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                                   "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
            "decoder": null,
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100, "vocab": vocab}
        });
        tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).unwrap()
    }

    fn tiny_config() -> BertConfig {
        BertConfig {
            vocab_size: 11,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 32,
            max_position_embeddings: 8,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_act: "gelu".into(),
        }
    }

    /// Random weights under the sentence-transformers names, shared by our encoder and the reference.
    fn random_weights() -> VarMap {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let reference = candle_transformers::models::bert::BertModel::load(vb, &reference_config());
        reference.unwrap();
        // LayerNorm weights start at 1 and biases at 0: move them so the test sees them used.
        for (name, var) in vm.data().lock().unwrap().iter() {
            if name.contains("LayerNorm") {
                let t = var.as_tensor();
                let noise = Tensor::randn(0f32, 0.1, t.shape(), &Device::Cpu).unwrap();
                var.set(&(t + noise).unwrap()).unwrap();
            }
        }
        vm
    }

    fn reference_config() -> candle_transformers::models::bert::Config {
        let c = tiny_config();
        serde_json::from_value(serde_json::json!({
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "max_position_embeddings": c.max_position_embeddings,
            "type_vocab_size": c.type_vocab_size, "initializer_range": 0.02, "layer_norm_eps": c.layer_norm_eps,
            "pad_token_id": 0, "position_embedding_type": "absolute", "use_cache": false, "model_type": "bert"
        }))
        .unwrap()
    }

    #[test]
    fn the_encoder_matches_candle_transformers_bert_on_a_padded_batch() {
        let vm = random_weights();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let ours = Embedder::from_weights(&tiny_config(), vb.clone(), tiny_tokenizer()).unwrap();
        let reference = candle_transformers::models::bert::BertModel::load(vb, &reference_config()).unwrap();
        let ids = Tensor::new(&[[2u32, 4, 7, 9, 3], [2, 6, 3, 0, 0]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
        let a = ours.hidden_states(&ids, &mask).unwrap();
        let b = reference.forward(&ids, &ids.zeros_like().unwrap(), Some(&mask)).unwrap();
        // Compare where the mask is 1 (padding positions are never pooled).
        for (row, len) in [(0usize, 5usize), (1, 3)] {
            let x = a.get(row).unwrap().narrow(0, 0, len).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let y = b.get(row).unwrap().narrow(0, 0, len).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let worst = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "row {row}: largest difference {worst}");
        }
    }

    #[test]
    fn vectors_are_unit_length_cached_and_independent_of_their_batch() {
        let vm = random_weights();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let mut e = Embedder::from_weights(&tiny_config(), vb, tiny_tokenizer()).unwrap();
        let alone = e.embed_uncached(&["singers"]).unwrap();
        let batch = e.embed(&["the concert name", "singers", "singers"]).unwrap();
        assert_eq!(e.cached(), 2);
        for v in &batch {
            assert!((cosine(v, v) - 1.0).abs() < 1e-5);
        }
        // Padding to a longer neighbour does not change a text's vector.
        assert!(alone[0].iter().zip(&batch[1]).all(|(a, b)| (a - b).abs() < 1e-5));
        assert_eq!(batch[1], batch[2]);
        assert!(cosine(&batch[0], &batch[1]) < 0.9999);
        // A text longer than the positions is cut, not refused.
        let long = "singer ".repeat(40);
        assert_eq!(e.embed(&[long.as_str()]).unwrap()[0].len(), 16);
    }

    #[test]
    fn a_folder_without_weights_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("copilot-embed-missing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = Embedder::load(dir.to_str().unwrap()).err().unwrap().to_string();
        assert!(e.contains("config.json"), "{e}");
        std::fs::write(dir.join("config.json"), "{\"vocab_size\": 3}").unwrap();
        let e = Embedder::load(dir.to_str().unwrap()).err().unwrap().to_string();
        assert!(e.contains("config.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
