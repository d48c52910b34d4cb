//! Our decode kernels (src/kernels.rs) inside the whole forward pass: a small llama-shaped model written as a
//! GGUF with Q4_K and Q6_K weights (the formats of the default Q4_K_M model; the CI's tiny model is Q4_1, which
//! the kernels do not cover), run once on candle's matmuls and once on ours.
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use copilot_core::model::{argmax, Config, KvCache, Transformer};

const EMBD: usize = 256;
const FFN: usize = 512;
const VOCAB: usize = 320;
const LAYERS: usize = 2;

fn weights(shape: (usize, usize), seed: u64, scale: f32) -> Tensor {
    let mut s = seed;
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0 * scale
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn write_model(path: &std::path::Path) {
    let q = |t: Tensor, dt: GgmlDType| QTensor::quantize(&t, dt).unwrap();
    let ones = || QTensor::quantize(&Tensor::ones(EMBD, candle_core::DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
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
    }
    use gguf_file::Value;
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.head_count_kv", Value::U32(2)),
        ("llama.embedding_length", Value::U32(EMBD as u32)),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.context_length", Value::U32(128)),
    ];
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, &tensors).unwrap();
}

fn load(path: &std::path::Path, own: bool) -> Transformer {
    let mut f = std::fs::File::open(path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let cfg = Config::from_gguf(&ct).unwrap();
    let mut m = Transformer::from_gguf(cfg, &ct, &mut f, &Device::Cpu, 0).unwrap();
    m.set_own_kernels(own);
    m
}

#[test]
fn decoding_with_our_kernels_matches_candles_matmul() {
    if !copilot_core::kernels::simd_available() {
        eprintln!("no AVX2 on this CPU: the forward pass uses candle's matmul only, nothing to compare");
        return;
    }
    let dir = std::env::temp_dir().join(format!("copilot-kernels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny-q4k-q6k.gguf");
    write_model(&path);
    let (ours, theirs) = (load(&path, true), load(&path, false));
    assert!(ours.own_kernels() && !theirs.own_kernels());

    let prompt: Vec<u32> = vec![3, 141, 59, 26, 253, 58, 97];
    let (mut kv_a, mut kv_b) = (KvCache::new(), KvCache::new());
    // The prompt's layers (several rows) run on candle's tiled matmul in both; its last row's vocabulary
    // projection and every decoding step (one row) run on ours in `ours`.
    let mut la = ours.forward(&prompt, &mut kv_a).unwrap().to_vec1::<f32>().unwrap();
    let mut lb = theirs.forward(&prompt, &mut kv_b).unwrap().to_vec1::<f32>().unwrap();
    let mut tok = 7u32;
    let mut compared = 0;
    for step in 0..12 {
        let a = Tensor::new(la.as_slice(), &Device::Cpu).unwrap();
        let b = Tensor::new(lb.as_slice(), &Device::Cpu).unwrap();
        let scale = lb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = la.iter().zip(&lb).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        // Same integer products; only the float summation order differs, and each layer re-quantizes its
        // input to 8 bits, which can move a value by one step: logits agree to well under 1 %.
        assert!(diff <= 0.01 * scale, "step {step}: max |diff| {diff} of logit scale {scale}");
        if step > 0 {
            let mut sorted = lb.clone();
            sorted.sort_by(|x, y| y.total_cmp(x));
            if sorted[0] - sorted[1] > 2.0 * diff {
                assert_eq!(argmax(&a).unwrap(), argmax(&b).unwrap(), "step {step}");
                compared += 1;
            }
        }
        // Both continue from the same token, so their caches see the same sequence.
        tok = (tok * 31 + step as u32) % VOCAB as u32;
        la = ours.forward(&[tok], &mut kv_a).unwrap().to_vec1::<f32>().unwrap();
        lb = theirs.forward(&[tok], &mut kv_b).unwrap().to_vec1::<f32>().unwrap();
    }
    assert!(compared >= 6, "too few steps had a clear winner to compare ({compared})");
    // The embedding rows are dequantized on demand (Q4_K table): a token outside the vocabulary is an error
    // that leaves the cache as it was.
    let before = kv_a.len();
    let err = ours.forward(&[VOCAB as u32], &mut kv_a).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    assert_eq!(kv_a.len(), before);
    assert_eq!(kv_a.len(), prompt.len() + 12);
    std::fs::remove_dir_all(&dir).ok();
}
