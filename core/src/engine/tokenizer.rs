//! The tokenizer of a GGUF model: a `tokenizer.json` beside the model file when there is one, else built from the
//! GGUF metadata (`tokenizer.ggml.*`).
//!
//! GPT-2-style byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`: Qwen2, SmolLM, Llama 3) are rebuilt
//! with the `tokenizers` crate: vocabulary and merges from the metadata, the pre-tokenizer chosen by
//! `tokenizer.ggml.pre`, and every control / user-defined token (`token_type` 3 or 4, e.g. `<|im_start|>`)
//! registered as special so the chat template's markers encode to single tokens. SentencePiece vocabularies
//! (`"llama"`: Mistral, Llama 2) need the model's `tokenizer.json`.

use crate::error::CoreError;
use candle_core::quantized::gguf_file::{Content, Value};
use std::path::{Path, PathBuf};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Qwen2's pre-tokenizer pattern (from its `tokenizer.json`): like GPT-4's, digits one at a time.
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's pattern: digits in groups of up to three.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Where a tokenizer.json for `model` would be: `<model>.tokenizer.json`, then `tokenizer.json` in its folder.
pub fn sidecar_paths(model: &Path) -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from(format!("{}.tokenizer.json", model.display()))];
    if let Some(dir) = model.parent() {
        v.push(dir.join("tokenizer.json"));
    }
    v
}

fn md<'a>(ct: &'a Content, key: &str) -> Option<&'a Value> {
    ct.metadata.get(key)
}

fn md_strings(ct: &Content, key: &str) -> Result<Vec<String>, CoreError> {
    let v = md(ct, key)
        .ok_or_else(|| CoreError::Tokenizer(format!("the GGUF has no {key}")))?
        .to_vec()
        .map_err(|e| CoreError::Tokenizer(format!("{key}: {e}")))?;
    v.iter().map(|x| x.to_string().cloned().map_err(|e| CoreError::Tokenizer(format!("{key}: {e}")))).collect()
}

/// Load the tokenizer for a model: the sidecar `tokenizer.json` if present, else from GGUF metadata.
pub fn load(model_path: &Path, ct: &Content) -> Result<Tokenizer, CoreError> {
    for p in sidecar_paths(model_path) {
        if p.is_file() {
            return Tokenizer::from_file(&p)
                .map_err(|e| CoreError::Tokenizer(format!("cannot read {}: {e}", p.display())));
        }
    }
    from_gguf(ct)
}

/// Build a byte-level BPE tokenizer from GGUF metadata.
pub fn from_gguf(ct: &Content) -> Result<Tokenizer, CoreError> {
    let model = md(ct, "tokenizer.ggml.model").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    if model != "gpt2" {
        return Err(CoreError::Tokenizer(format!(
            "the GGUF's tokenizer is \"{model}\" (SentencePiece); put the model's tokenizer.json beside the file \
             (as <file>.tokenizer.json or tokenizer.json)"
        )));
    }
    let tokens = md_strings(ct, "tokenizer.ggml.tokens")?;
    let merges_raw = md_strings(ct, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match md(ct, "tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
        Some(v) => v.iter().map(|x| x.to_i32().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges: Vec<(String, String)> = merges_raw
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| CoreError::Tokenizer(format!("bad merge rule {m:?}")))
        })
        .collect::<Result<_, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| CoreError::Tokenizer(format!("cannot build BPE: {e}")))?;
    let mut tok = Tokenizer::new(bpe);

    let pre = md(ct, "tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let byte_level = ByteLevel::new(false, false, false);
    let split = |pattern: &str| -> Result<PreTokenizerWrapper, CoreError> {
        let s = Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| CoreError::Tokenizer(format!("pre-tokenizer pattern: {e}")))?;
        Ok(PreTokenizerWrapper::Split(s))
    };
    let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
        "qwen2" | "deepseek-coder" => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![split(QWEN2_PATTERN)?, byte_level.into()]))
        }
        "llama-bpe" | "llama3" | "smaug-bpe" => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![split(LLAMA3_PATTERN)?, byte_level.into()]))
        }
        "smollm" | "starcoder" | "refact" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            ByteLevel::new(false, false, true).into(),
        ])),
        // GPT-2's own regex, inside ByteLevel.
        _ => ByteLevel::new(false, false, true).into(),
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevelDecoder::default()));

    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter())
        .filter(|(_, ty)| **ty == 3 || **ty == 4)
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| CoreError::Tokenizer(format!("cannot register special tokens: {e}")))?;
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_candidates() {
        let v = sidecar_paths(Path::new("/m/x.gguf"));
        assert_eq!(v, vec![PathBuf::from("/m/x.gguf.tokenizer.json"), PathBuf::from("/m/tokenizer.json")]);
    }
}
