//! Folding a LoRA adapter into a GGUF (`peft::merge_into_gguf`): the merged file keeps the base's metadata and
//! formats, loads, and computes what base + adapter computes — exactly beside the weights (`Fold::Beside`, the
//! default), within the error quantization itself makes when re-quantized (`Fold::Requantize`).
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use copilot_core::engine::model::{Config, KvCache, Transformer};
use copilot_core::tune::lora::LoraConfig;
use copilot_core::tune::peft::{merge_into_gguf, Adapter, Fold, Target};
use std::collections::BTreeMap;
use std::path::Path;

mod common;
use common::{weights, write_model, EMBD, FFN};

fn logits(path: &Path) -> Vec<f32> {
    let mut f = std::fs::File::open(path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let cfg = Config::from_gguf(&ct).unwrap();
    let m = Transformer::from_gguf(cfg, &ct, &mut f, &Device::Cpu, 0).unwrap();
    m.forward(&[3, 141, 59, 26, 253, 58, 97], &mut KvCache::new()).unwrap().to_vec1::<f32>().unwrap()
}

/// A copy of `base` whose adapted weights are stored as f32 — `deq(W)` plus, when `adapter` is given, the exact
/// `scale·B·A` — so the products are computed without any re-quantization.
fn f32_copy(base: &Path, adapter: Option<&Adapter>, out: &Path) {
    let mut f = std::fs::File::open(base).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut tensors = Vec::new();
    for name in ct.tensor_infos.keys() {
        let qt = ct.tensor(&mut f, name, &Device::Cpu).unwrap();
        let target = ["blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.1.ffn_down.weight"].contains(&name.as_str());
        let qt = if target {
            let mut w = qt.dequantize(&Device::Cpu).unwrap();
            if let Some(a) = adapter {
                let layer = name[4..5].parse::<usize>().unwrap();
                let t = Target::from_name(name.split('.').nth(2).unwrap()).unwrap();
                let (la, lb) = &a.weights[&(layer, t)];
                w = (w + (lb.matmul(la).unwrap() * a.config.scale() as f64).unwrap()).unwrap();
            }
            QTensor::quantize(&w, GgmlDType::F32).unwrap()
        } else {
            qt
        };
        tensors.push((name.clone(), qt));
    }
    let meta: Vec<(&str, &gguf_file::Value)> = ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(out).unwrap(), &meta, &refs).unwrap();
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn a_merged_gguf_keeps_the_base_and_computes_base_plus_adapter() {
    let dir = std::env::temp_dir().join(format!("copilot-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join("base.gguf");
    write_model(&base);

    let cfg = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0 };
    let ab = |n: usize, k: usize, seed: u64| (weights((cfg.rank, k), seed, 0.1), weights((n, cfg.rank), seed + 1, 0.3));
    let mut w = BTreeMap::new();
    w.insert((0, Target::Q), ab(EMBD, EMBD, 11));
    w.insert((0, Target::V), ab(EMBD / 2, EMBD, 13));
    w.insert((1, Target::Down), ab(EMBD, FFN, 15));
    let adapter = Adapter { config: cfg, base_model: "test/tiny-llama".into(), weights: w };

    let merged = dir.join("merged.gguf");
    let s = merge_into_gguf(&base, &adapter, &merged, Fold::Requantize).unwrap();
    assert_eq!(s.merged, 3);
    let beside = dir.join("beside.gguf");
    let sb = merge_into_gguf(&base, &adapter, &beside, Fold::Beside).unwrap();
    assert_eq!((sb.merged, sb.tensors), (3, s.tensors + 6), "two tensors beside each adapted weight");

    // Same tensors, names, shapes and formats; untouched ones byte for byte; all metadata plus ours. Beside the
    // weights, every base tensor is byte for byte the base's, and A and B are there as trained (f32 here: these
    // values are not all f16 values).
    let (mut fb, mut fm, mut fs) = (
        std::fs::File::open(&base).unwrap(),
        std::fs::File::open(&merged).unwrap(),
        std::fs::File::open(&beside).unwrap(),
    );
    let (cb, cm, cs) = (
        gguf_file::Content::read(&mut fb).unwrap(),
        gguf_file::Content::read(&mut fm).unwrap(),
        gguf_file::Content::read(&mut fs).unwrap(),
    );
    assert_eq!(s.tensors, cb.tensor_infos.len());
    for (name, info) in &cb.tensor_infos {
        let other = &cm.tensor_infos[name];
        assert_eq!((info.ggml_dtype, info.shape.dims()), (other.ggml_dtype, other.shape.dims()), "{name}");
        let (tb, tm) =
            (cb.tensor(&mut fb, name, &Device::Cpu).unwrap(), cm.tensor(&mut fm, name, &Device::Cpu).unwrap());
        let adapted = ["blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.1.ffn_down.weight"].contains(&name.as_str());
        assert_eq!(tb.data().unwrap() == tm.data().unwrap(), !adapted, "{name}: changed iff adapted");
        let ts = cs.tensor(&mut fs, name, &Device::Cpu).unwrap();
        assert_eq!((ts.dtype(), ts.data().unwrap()), (tb.dtype(), tb.data().unwrap()), "{name} kept beside");
        if adapted {
            let layer = name[4..5].parse::<usize>().unwrap();
            let (la, lb) = &adapter.weights[&(layer, Target::from_name(name.split('.').nth(2).unwrap()).unwrap())];
            for (suffix, want) in [("lora_a", la), ("lora_b", lb)] {
                let t = cs.tensor(&mut fs, &format!("{name}.{suffix}"), &Device::Cpu).unwrap();
                assert_eq!(t.dtype(), GgmlDType::F32, "{name}.{suffix}");
                let got = t.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(got, want.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{name}.{suffix}");
            }
        }
    }
    for (k, v) in &cb.metadata {
        assert_eq!(format!("{:?}", cm.metadata[k]), format!("{v:?}"), "metadata {k}");
        assert_eq!(format!("{:?}", cs.metadata[k]), format!("{v:?}"), "metadata {k}");
    }
    assert_eq!(cm.metadata["copilot.lora.rank"].to_u32().unwrap(), 4);
    assert_eq!(cm.metadata["copilot.lora.base_model"].to_string().unwrap(), "test/tiny-llama");
    assert!(!cm.metadata.contains_key("copilot.lora.fold"), "a re-quantized merge is as it always was");
    assert_eq!(cs.metadata["copilot.lora.fold"].to_string().unwrap(), "beside");

    // Logits: the merged models against base + adapter computed exactly in f32. The tolerance is what quantizing
    // those weights costs the base model itself (base in Q4_K/Q6_K vs the same weights in f32).
    let (base_f32, exact) = (dir.join("base-f32.gguf"), dir.join("exact.gguf"));
    f32_copy(&base, None, &base_f32);
    f32_copy(&base, Some(&adapter), &exact);
    let (l_base, l_base_f32, l_exact, l_merged, l_beside) =
        (logits(&base), logits(&base_f32), logits(&exact), logits(&merged), logits(&beside));
    let quant_err = max_diff(&l_base, &l_base_f32);
    let merge_err = max_diff(&l_merged, &l_exact);
    let beside_err = max_diff(&l_beside, &l_exact);
    let effect = max_diff(&l_exact, &l_base_f32);
    eprintln!("quantization error {quant_err}, merge error {merge_err}, beside {beside_err}, adapter effect {effect}");
    assert!(merge_err <= 2.0 * quant_err + 1e-4, "merged vs base+adapter {merge_err}; quantization alone {quant_err}");
    assert!(effect > 2.0 * merge_err, "the adapter's effect {effect} must stand out of the merge error {merge_err}");
    // Beside the weights nothing is rounded but what the base's own products round: within the base's
    // quantization error of the exact model, and closer to it than the re-quantized merge.
    assert!(
        beside_err <= quant_err * 1.5 + 1e-4,
        "beside vs base+adapter {beside_err}; quantization alone {quant_err}"
    );
    assert!(beside_err < merge_err, "beside {beside_err} vs re-quantized {merge_err}");

    // A file that already carries an adapter is not a base: refused, nothing written.
    let twice = dir.join("twice.gguf");
    let e = merge_into_gguf(&beside, &adapter, &twice, Fold::Beside).unwrap_err().to_string();
    assert!(e.contains("already carries an adapter"), "{e}");
    assert!(!twice.exists());

    // An adapter for another model is refused, and nothing is written.
    let mut wrong = adapter.clone();
    wrong.weights.insert((7, Target::Q), wrong.weights[&(0, Target::Q)].clone());
    let bad = dir.join("bad.gguf");
    let e = merge_into_gguf(&base, &wrong, &bad, Fold::Beside).unwrap_err().to_string();
    assert!(e.contains("another base model"), "{e}");
    assert!(!bad.exists());
    std::fs::remove_dir_all(&dir).ok();
}
