//! Our decoding step (src/kernels.rs for the weight products, src/decode.rs for the rest) inside the whole forward
//! pass: a small model written as a GGUF with Q4_K and Q6_K weights (the formats of the default Q4_K_M model; the
//! CI's tiny model is Q4_1, which the kernels do not cover), in both layouts we serve — `llama` (interleaved RoPE)
//! and `qwen2` (NeoX RoPE, q/k/v biases) — run once on candle's ops and matmuls and once on ours.
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use copilot_core::engine::model::{argmax, Config, KvCache, Transformer};

mod common;
use common::{write_model_arch, VOCAB};

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
    if !copilot_core::engine::kernels::simd_available() {
        eprintln!("no AVX2 on this CPU: the forward pass uses candle's matmul only, nothing to compare");
        return;
    }
    let dir = std::env::temp_dir().join(format!("copilot-kernels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for arch in ["llama", "qwen2"] {
        let path = dir.join(format!("tiny-{arch}-q4k-q6k.gguf"));
        write_model_arch(&path, arch);
        compare(&path, arch);
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn compare(path: &std::path::Path, arch: &str) {
    let (ours, theirs) = (load(path, true), load(path, false));
    assert!(ours.own_kernels() && !theirs.own_kernels());

    let prompt: Vec<u32> = vec![3, 141, 59, 26, 253, 58, 97];
    let (mut kv_a, mut kv_b) = (KvCache::new(), KvCache::new());
    // The prompt's layers (several rows) run on candle's tiled matmul in both; its last row's vocabulary
    // projection and every decoding step (one row) run on ours in `ours`, with the cache growing from the prompt's
    // (so the step reads K/V that prefill wrote).
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
        assert!(diff <= 0.01 * scale, "{arch} step {step}: max |diff| {diff} of logit scale {scale}");
        if step > 0 {
            let mut sorted = lb.clone();
            sorted.sort_by(|x, y| y.total_cmp(x));
            if sorted[0] - sorted[1] > 2.0 * diff {
                assert_eq!(argmax(&a).unwrap(), argmax(&b).unwrap(), "{arch} step {step}");
                compared += 1;
            }
        }
        // Both continue from the same token, so their caches see the same sequence.
        tok = (tok * 31 + step as u32) % VOCAB as u32;
        la = ours.forward(&[tok], &mut kv_a).unwrap().to_vec1::<f32>().unwrap();
        lb = theirs.forward(&[tok], &mut kv_b).unwrap().to_vec1::<f32>().unwrap();
    }
    assert!(compared >= 6, "{arch}: too few steps had a clear winner to compare ({compared})");
    // The embedding rows are dequantized on demand (Q4_K table): a token outside the vocabulary is an error
    // that leaves the cache as it was.
    let before = kv_a.len();
    let err = ours.forward(&[VOCAB as u32], &mut kv_a).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    assert_eq!(kv_a.len(), before);
    assert_eq!(kv_a.len(), prompt.len() + 12);
}

#[test]
fn preparing_the_weights_at_load_changes_no_logit() {
    // `prepare` makes candle rewrite each weight into its tiled layout at load instead of at the first prompt: the
    // same rewrite, so a prepared model must compute exactly what an unprepared one computes.
    let dir = std::env::temp_dir().join(format!("copilot-prepare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny-qwen2-q4k-q6k.gguf");
    write_model_arch(&path, "qwen2");
    let (prepared, lazy) = (load(&path, true), load(&path, true));
    prepared.prepare(2).unwrap();
    let prompt: Vec<u32> = vec![5, 77, 12, 190, 3, 44, 250, 9];
    let (mut kv_a, mut kv_b) = (KvCache::new(), KvCache::new());
    let a = prepared.forward(&prompt, &mut kv_a).unwrap().to_vec1::<f32>().unwrap();
    let b = lazy.forward(&prompt, &mut kv_b).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a, b);
    // And again over the cached prompt (several rows after a prefix, then one).
    let a = prepared.forward(&[17, 18, 19], &mut kv_a).unwrap().to_vec1::<f32>().unwrap();
    let b = lazy.forward(&[17, 18, 19], &mut kv_b).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a, b);
    std::fs::remove_dir_all(&dir).ok();
}
