//! The hyper-parameters of a model, read from its GGUF metadata before any tensor is.

use candle_core::quantized::gguf_file;
use candle_core::Result;

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub arch: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub n_embd: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
    /// True for the NeoX rotary layout (halves rotated), false for GGML's interleaved pairs.
    pub rope_neox: bool,
    pub context_length: usize,
}

impl Config {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Config> {
        let arch = match ct.metadata.get("general.architecture") {
            Some(v) => v.to_string()?.clone(),
            None => candle_core::bail!("the GGUF has no general.architecture"),
        };
        let rope_neox = match arch.as_str() {
            "qwen2" => true,
            "llama" | "mistral" => false,
            other => candle_core::bail!("architecture \"{other}\" is not supported (supported: qwen2, llama, mistral)"),
        };
        let get = |k: &str| -> Result<&gguf_file::Value> {
            ct.metadata
                .get(&format!("{arch}.{k}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("cannot find {arch}.{k} in the GGUF metadata")))
        };
        let n_head = get("attention.head_count")?.to_u32()? as usize;
        let n_kv_head = get("attention.head_count_kv").and_then(|v| v.to_u32()).map(|v| v as usize).unwrap_or(n_head);
        let n_embd = get("embedding_length")?.to_u32()? as usize;
        let n_layer = get("block_count")?.to_u32()? as usize;
        let rms_eps = get("attention.layer_norm_rms_epsilon")?.to_f32()? as f64;
        let rope_base = get("rope.freq_base").and_then(|v| v.to_f32()).unwrap_or(10_000.0);
        let context_length = get("context_length").and_then(|v| v.to_u32()).map(|v| v as usize).unwrap_or(4096);
        if n_head == 0 || n_kv_head == 0 || !n_embd.is_multiple_of(n_head) || !n_head.is_multiple_of(n_kv_head) {
            candle_core::bail!("inconsistent attention shape: {n_head} heads, {n_kv_head} K/V heads, width {n_embd}");
        }
        let head_dim = n_embd / n_head;
        if let Ok(d) = get("rope.dimension_count").and_then(|v| v.to_u32()) {
            if d as usize != head_dim {
                candle_core::bail!("partial rotary embeddings ({d} of {head_dim} dimensions) are not supported");
            }
        }
        if get("expert_count").and_then(|v| v.to_u32()).unwrap_or(0) > 1 {
            candle_core::bail!("mixture-of-experts models are not supported");
        }
        Ok(Config { arch, n_layer, n_head, n_kv_head, head_dim, n_embd, rms_eps, rope_base, rope_neox, context_length })
    }
}
