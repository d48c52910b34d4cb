//! `copilot-trainer export` end to end: a PEFT adapter folder and a Q4_K/Q6_K GGUF in, a merged GGUF out that
//! loads; a broken adapter is a clear error and writes nothing.
use candle_core::quantized::gguf_file;
use candle_core::Device;
use copilot_core::engine::model::{Config, KvCache, Transformer};
use copilot_core::tune::lora::LoraConfig;
use copilot_core::tune::peft::{Adapter, Layout, Target};
use std::collections::BTreeMap;
use std::process::Command;

#[path = "../../core/tests/common/mod.rs"]
mod common;

#[test]
fn export_merges_a_peft_adapter_into_a_loadable_gguf() {
    let dir = std::env::temp_dir().join(format!("copilot-trainer-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join("base.gguf");
    common::write_model(&base);
    let mut weights = BTreeMap::new();
    let e = common::EMBD;
    weights.insert((0, Target::Q), (common::weights((2, e), 1, 0.1), common::weights((e, 2), 2, 0.3)));
    weights.insert((1, Target::Up), (common::weights((2, e), 3, 0.1), common::weights((common::FFN, 2), 4, 0.3)));
    let adapter =
        Adapter { config: LoraConfig { rank: 2, alpha: 4.0, dropout: 0.0 }, base_model: "test/tiny".into(), weights };
    let adapter_dir = dir.join("adapter");
    adapter.save(&adapter_dir, &Layout { arch: "llama".into(), n_head: 4, n_kv_head: 2 }).unwrap();

    let out = dir.join("merged.gguf");
    let bin = env!("CARGO_BIN_EXE_copilot-trainer");
    let run = Command::new(bin)
        .args(["export", "--base"])
        .arg(&base)
        .arg("--adapter")
        .arg(&adapter_dir)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "export failed: {}", String::from_utf8_lossy(&run.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(summary["merged"], 2);

    let mut f = std::fs::File::open(&out).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    assert_eq!(ct.metadata["copilot.lora.rank"].to_u32().unwrap(), 2);
    // By default a plain GGUF: the base's tensors only, adapted ones re-quantized.
    let cb = gguf_file::Content::read(&mut std::fs::File::open(&base).unwrap()).unwrap();
    assert!(!ct.metadata.contains_key("copilot.lora.fold"));
    assert_eq!(ct.tensor_infos.len(), cb.tensor_infos.len());
    assert!(!ct.tensor_infos.keys().any(|n| n.contains("lora")));
    let cfg = Config::from_gguf(&ct).unwrap();
    let m = Transformer::from_gguf(cfg, &ct, &mut f, &Device::Cpu, 0).unwrap();
    let logits = m.forward(&[1, 2, 3], &mut KvCache::new()).unwrap().to_vec1::<f32>().unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));

    // --beside: A and B next to each adapted weight, and the file loads and computes.
    let beside = dir.join("beside.gguf");
    let run = Command::new(bin)
        .args(["export", "--beside", "--no-card", "--base"])
        .arg(&base)
        .arg("--adapter")
        .arg(&adapter_dir)
        .arg("--out")
        .arg(&beside)
        .output()
        .unwrap();
    assert!(run.status.success(), "export --beside failed: {}", String::from_utf8_lossy(&run.stderr));
    let mut f = std::fs::File::open(&beside).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    assert_eq!(ct.metadata["copilot.lora.fold"].to_string().unwrap(), "beside");
    assert_eq!(ct.tensor_infos.len(), cb.tensor_infos.len() + 4);
    for name in ["blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b", "blk.1.ffn_up.weight.lora_b"] {
        assert!(ct.tensor_infos.contains_key(name), "{name}");
    }
    let cfg = Config::from_gguf(&ct).unwrap();
    let m = Transformer::from_gguf(cfg, &ct, &mut f, &Device::Cpu, 0).unwrap();
    let beside_logits = m.forward(&[1, 2, 3], &mut KvCache::new()).unwrap().to_vec1::<f32>().unwrap();
    assert!(beside_logits.iter().all(|v| v.is_finite()));
    assert_ne!(beside_logits, logits, "the two folds are different files computing slightly different logits");

    // A tuned model is not a base to train on: `train` is refused with the reason (the adapter is already in it).
    let opts = copilot_core::tune::finetune::FinetuneOptions {
        targets: vec![Target::Q],
        lora: LoraConfig { rank: 2, alpha: 4.0, dropout: 0.0 },
        base: copilot_core::tune::finetune::BaseMode::F32,
        seed: 1,
        max_positions: 64,
    };
    let e = copilot_core::tune::finetune::TrainableModel::load(&beside, opts).err().expect("refused").to_string();
    assert!(e.contains("carries its adapter"), "{e}");

    // A folder that is not an adapter: exit 1, a message naming it, no output file.
    let bad_out = dir.join("bad.gguf");
    let run = Command::new(bin)
        .args(["export", "--base"])
        .arg(&base)
        .args(["--adapter", "/nonexistent-adapter", "--out"])
        .arg(&bad_out)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("/nonexistent-adapter"), "{err}");
    assert!(!bad_out.exists());
    std::fs::remove_dir_all(&dir).ok();
}
