//! A small llama-shaped GGUF with Q4_K and Q6_K weights (the formats of the default Q4_K_M model), written by the
//! tests that need a model in those formats (the CI's tiny model is Q4_1).
#![allow(dead_code)]
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

pub const EMBD: usize = 256;
pub const FFN: usize = 512;
pub const VOCAB: usize = 320;
pub const LAYERS: usize = 2;

pub fn weights(shape: (usize, usize), seed: u64, scale: f32) -> Tensor {
    let mut s = seed;
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0 * scale
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub fn write_model(path: &std::path::Path) {
    write_model_arch(path, "llama")
}

/// The same model as a `llama` (interleaved RoPE, no biases) or a `qwen2` file (NeoX RoPE, q/k/v biases, as the
/// default Qwen2.5 model).
pub fn write_model_arch(path: &std::path::Path, arch: &str) {
    let q = |t: Tensor, dt: GgmlDType| QTensor::quantize(&t, dt).unwrap();
    let ones = || {
        QTensor::quantize(&Tensor::ones(EMBD, candle_core::DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap()
    };
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), q(weights((VOCAB, EMBD), 1, 1.0), GgmlDType::Q4K)),
        ("output_norm.weight".into(), ones()),
        ("output.weight".into(), q(weights((VOCAB, EMBD), 2, 0.2), GgmlDType::Q6K)),
    ];
    for l in 0..LAYERS {
        let s = 100 * (l as u64 + 1);
        let p = format!("blk.{l}");
        tensors.push((format!("{p}.attn_norm.weight"), ones()));
        tensors.push((format!("{p}.ffn_norm.weight"), ones()));
        tensors.push((format!("{p}.attn_q.weight"), q(weights((EMBD, EMBD), s + 1, 0.1), GgmlDType::Q4K)));
        tensors.push((format!("{p}.attn_k.weight"), q(weights((EMBD / 2, EMBD), s + 2, 0.1), GgmlDType::Q4K)));
        tensors.push((format!("{p}.attn_v.weight"), q(weights((EMBD / 2, EMBD), s + 3, 0.1), GgmlDType::Q6K)));
        tensors.push((format!("{p}.attn_output.weight"), q(weights((EMBD, EMBD), s + 4, 0.1), GgmlDType::Q4K)));
        tensors.push((format!("{p}.ffn_gate.weight"), q(weights((FFN, EMBD), s + 5, 0.1), GgmlDType::Q4K)));
        tensors.push((format!("{p}.ffn_up.weight"), q(weights((FFN, EMBD), s + 6, 0.1), GgmlDType::Q4K)));
        tensors.push((format!("{p}.ffn_down.weight"), q(weights((EMBD, FFN), s + 7, 0.1), GgmlDType::Q6K)));
        if arch == "qwen2" {
            for (i, (n, rows)) in [("attn_q", EMBD), ("attn_k", EMBD / 2), ("attn_v", EMBD / 2)].into_iter().enumerate()
            {
                let b = weights((1, rows), s + 10 + i as u64, 0.5).flatten_all().unwrap();
                tensors.push((format!("{p}.{n}.bias"), QTensor::quantize(&b, GgmlDType::F32).unwrap()));
            }
        }
    }
    use gguf_file::Value;
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.attention.head_count"), Value::U32(4)),
        (format!("{arch}.attention.head_count_kv"), Value::U32(2)),
        (format!("{arch}.embedding_length"), Value::U32(EMBD as u32)),
        (format!("{arch}.block_count"), Value::U32(LAYERS as u32)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (format!("{arch}.rope.freq_base"), Value::F32(10_000.0)),
        (format!("{arch}.context_length"), Value::U32(128)),
    ];
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, &tensors).unwrap();
}
