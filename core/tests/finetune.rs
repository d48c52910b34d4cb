//! The trainable forward pass on a Q4_K/Q6_K model written by the test: it computes what the inference pass
//! computes, its gradients reach the adapters of every layer correctly (finite differences), and a few rows are
//! learned to near-zero loss.
use candle_core::quantized::gguf_file;
use candle_core::{Device, IndexOp, Tensor};
use copilot_core::engine::model::{Config, KvCache, Transformer};
use copilot_core::tune::finetune::{learning_rate, AdamW, BaseMode, FinetuneOptions, Packed, TrainableModel};
use copilot_core::tune::lora::{LoraConfig, Rng};
use copilot_core::tune::peft::{Adapter, Target};

mod common;

fn model_file(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("copilot-finetune-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("tiny.gguf");
    common::write_model(&p);
    p
}

fn opts(base: BaseMode, targets: &[Target], rank: usize) -> FinetuneOptions {
    FinetuneOptions {
        targets: targets.to_vec(),
        lora: LoraConfig { rank, alpha: 2.0 * rank as f32, dropout: 0.0 },
        base,
        seed: 7,
        max_positions: 64,
    }
}

#[test]
fn a_fresh_adapter_computes_what_the_inference_pass_computes() {
    let path = model_file("parity");
    let tokens: Vec<u32> = vec![3, 17, 250, 9, 41, 41, 300, 2, 77];
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let inf = Transformer::from_gguf(Config::from_gguf(&ct).unwrap(), &ct, &mut f, &Device::Cpu, 0).unwrap();
    // Inference logits of every prefix's last token (the KV cache carries the earlier ones).
    let mut cache = KvCache::new();
    let mut want = Vec::new();
    for &t in &tokens {
        want.push(inf.forward(&[t], &mut cache).unwrap());
    }
    for mode in [BaseMode::Quantized, BaseMode::QuantizedExact, BaseMode::F32] {
        let m = TrainableModel::load(&path, opts(mode, &[Target::Q, Target::V, Target::Down], 4)).unwrap();
        let got = m.logits(&tokens).unwrap();
        assert_eq!(got.dims(), &[tokens.len(), common::VOCAB]);
        for (i, w) in want.iter().enumerate() {
            let g = got.i(i).unwrap();
            let scale = w.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let d = (g - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            // Both quantize activations for the quantized products (Q8_K) in different groupings; the f32 base skips
            // that rounding altogether. Either way the difference is rounding, not arithmetic.
            assert!(d < 0.03 * scale, "{mode:?} position {i}: max |Δ| {d} vs logit scale {scale}");
        }
    }
}

#[test]
fn gradients_through_the_whole_model_match_finite_differences() {
    // f32 base: the loss is then a smooth function of the adapter, so central differences are a true reference (a
    // quantized product rounds its input activations to 8 bits, which makes the loss piecewise constant at the
    // scale of a finite-difference step).
    let path = model_file("fd");
    let mut m =
        TrainableModel::load(&path, opts(BaseMode::F32, &[Target::Q, Target::K, Target::O, Target::Up], 2)).unwrap();
    perturbed(&mut m, 3);
    let tokens: Vec<u32> = vec![5, 90, 12, 200, 33, 7, 140, 61];
    let loss = |m: &TrainableModel| m.completion_nll(&tokens, 4, None).unwrap().0;
    let grads = loss(&m).backward().unwrap();

    let vars = m.vars();
    let mut checked = 0;
    for (name, var) in &vars {
        // A few entries of each variable in the first and the last layer: the gradient has crossed every layer
        // above it (attention, RoPE, RMSNorm, the FFN) to get there.
        if !(name.starts_with("blk.0.") || name.starts_with(&format!("blk.{}.", common::LAYERS - 1))) {
            continue;
        }
        let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let orig = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in [0, orig.len() / 2, orig.len() - 1] {
            let h = 1e-2f32;
            let at = |d: f32| -> f64 {
                let mut v = orig.clone();
                v[i] += d;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                loss(&m).to_scalar::<f32>().unwrap() as f64
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
            var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
            let analytic = g[i] as f64;
            assert!(
                (analytic - numeric).abs() <= 2e-3 + 2e-2 * numeric.abs(),
                "{name}[{i}]: backprop {analytic} vs finite difference {numeric}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 24, "checked {checked} entries");
}

/// Every B given some weight (B starts at zero, so a fresh adapter would give A no gradient at all).
fn perturbed(m: &mut TrainableModel, seed: u64) {
    let mut a = m.adapter("t").unwrap();
    let mut rng = Rng::new(seed);
    for (_, (_, b)) in a.weights.iter_mut() {
        let v: Vec<f32> = (0..b.elem_count()).map(|_| (rng.uniform() - 0.5) * 0.2).collect();
        *b = Tensor::from_vec(v, b.shape(), &Device::Cpu).unwrap();
    }
    m.load_adapter(&a).unwrap();
}

#[test]
fn packed_rows_have_the_losses_and_gradients_they_have_alone() {
    // Three rows over the same "schema" prefix (and different lengths of their own), as data prepare makes them
    // for three questions about one database; a fourth row shares nothing with them.
    let schema: Vec<u32> = vec![3, 17, 250, 9, 41, 41, 300, 2];
    let row = |own: &[u32]| schema.iter().chain(own).copied().collect::<Vec<u32>>();
    let rows: Vec<(Vec<u32>, usize)> =
        vec![(row(&[77, 5, 90, 12, 200]), 10), (row(&[78, 6, 33, 7]), 9), (row(&[79, 80, 81, 140, 61, 62, 63]), 11)];
    for mode in [BaseMode::F32, BaseMode::QuantizedExact, BaseMode::Quantized] {
        let mut m = TrainableModel::load(&model_file("packed"), opts(mode, &Target::ALL, 2)).unwrap();
        perturbed(&mut m, 11);
        let vars = m.vars();
        let mut alone = 0f32;
        let mut want: Vec<Tensor> = vars.iter().map(|(_, v)| v.zeros_like().unwrap()).collect();
        for (t, p) in &rows {
            let (l, _) = m.completion_nll(t, *p, None).unwrap();
            alone += l.to_scalar::<f32>().unwrap();
            let g = l.backward().unwrap();
            for (w, (_, v)) in want.iter_mut().zip(&vars) {
                *w = (&*w + g.get(v.as_tensor()).unwrap()).unwrap();
            }
        }
        let refs: Vec<(&[u32], usize)> = rows.iter().map(|(t, p)| (t.as_slice(), *p)).collect();
        let packed = Packed::new(&refs).unwrap();
        // The schema is computed once: its 8 tokens plus each row's own tokens.
        assert_eq!(packed.len(), 8 + (5 + 4 + 7));
        assert_eq!(packed.completion_tokens(), 3 + 3 + 4);
        let (l, n) = m.packed_nll(&packed, None).unwrap();
        assert_eq!(n, 10);
        let l_packed = l.to_scalar::<f32>().unwrap();
        assert!((l_packed - alone).abs() < 1e-4 * alone.abs(), "{mode:?}: packed loss {l_packed} vs {alone} alone");
        let g = l.backward().unwrap();
        for ((name, v), w) in vars.iter().zip(&want) {
            let got = g.get(v.as_tensor()).unwrap();
            let scale = w.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
            let d = (got - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            // f32 and the exact quantized backward: float summation order only. Quantized: the Q8_0 backward
            // rounds each position's incoming gradient to 8 bits per block, and a shared prefix position receives
            // the three rows' gradients summed before that rounding instead of after (1.2 % of the scale at most
            // on this model).
            let tol = if mode == BaseMode::Quantized { 3e-2 } else { 1e-4 };
            assert!(d <= tol * scale, "{mode:?} {name}: max |Δ| {d} vs gradient scale {scale}");
        }
        // Rows with nothing in common pack too (the prefix is empty): each still sees only itself.
        let other: Vec<u32> = vec![120, 121, 122, 123, 124, 125];
        let (lo, _) = m.completion_nll(&other, 3, None).unwrap();
        let (l2, _) =
            m.packed_nll(&Packed::new(&[(rows[0].0.as_slice(), 10), (other.as_slice(), 3)]).unwrap(), None).unwrap();
        let (l0, _) = m.completion_nll(&rows[0].0, 10, None).unwrap();
        let sum = lo.to_scalar::<f32>().unwrap() + l0.to_scalar::<f32>().unwrap();
        let l2 = l2.to_scalar::<f32>().unwrap();
        // f32: summation order only. Quantized bases round activations to 8 bits, so a last-bit difference in the
        // attention (other matrix shapes) can flip a rounding: 3.5e-4 relative measured for the exact backward.
        let tol = if mode == BaseMode::F32 { 1e-4 } else { 2e-3 };
        assert!((l2 - sum).abs() < tol * sum.abs(), "{mode:?}: unrelated rows packed {l2} vs {sum}");
    }
}

#[test]
fn checkpointed_backward_gives_the_full_graphs_loss_and_gradients_with_the_same_dropout() {
    let schema: Vec<u32> = vec![3, 17, 250, 9, 41, 41, 300, 2];
    let a: Vec<u32> = schema.iter().chain(&[77, 5, 90, 12, 200]).copied().collect();
    let b: Vec<u32> = schema.iter().chain(&[78, 6, 33, 7]).copied().collect();
    let packed = Packed::new(&[(a.as_slice(), 10), (b.as_slice(), 9)]).unwrap();
    for mode in [BaseMode::F32, BaseMode::Quantized] {
        let mut o = opts(mode, &Target::ALL, 2);
        o.lora.dropout = 0.2;
        let mut m = TrainableModel::load(&model_file("ckpt"), o).unwrap();
        perturbed(&mut m, 5);
        let vars = m.vars();
        let (l, _) = m.packed_nll(&packed, Some(&mut Rng::new(99))).unwrap();
        let want_loss = l.to_scalar::<f32>().unwrap() as f64 * 0.25;
        let g = (l * 0.25).unwrap().backward().unwrap();
        let (loss, grads) = m.packed_backward(&packed, Some(&mut Rng::new(99)), 0.25).unwrap();
        assert!((loss - want_loss).abs() < 1e-5 * want_loss.abs(), "{mode:?}: {loss} vs {want_loss}");
        assert_eq!(grads.len(), vars.len());
        for ((name, v), got) in vars.iter().zip(&grads) {
            let w = g.get(v.as_tensor()).unwrap();
            let scale = w.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(scale > 0.0, "{mode:?} {name}: no gradient in the reference");
            let d = (got - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d <= 1e-4 * scale, "{mode:?} {name}: max |Δ| {d} vs gradient scale {scale}");
        }
        // Other dropout masks give another gradient (so the comparison above did replay the masks).
        let (_, other) = m.packed_backward(&packed, Some(&mut Rng::new(100)), 0.25).unwrap();
        let d = (&other[0] - &grads[0]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d > 0.0, "{mode:?}: dropout had no effect");
        // Without gradients: the same loss as the graph's, no dropout.
        let (plain, _) = m.packed_nll(&packed, None).unwrap();
        let v = m.packed_nll_value(&packed).unwrap();
        assert!((v - plain.to_scalar::<f32>().unwrap() as f64).abs() < 1e-5 * v.abs());
    }
}

#[test]
fn a_tiny_model_overfits_a_handful_of_rows() {
    let path = model_file("overfit");
    let m = TrainableModel::load(&path, opts(BaseMode::Quantized, &Target::ALL, 8)).unwrap();
    let rows: Vec<(Vec<u32>, usize)> = vec![
        (vec![10, 11, 12, 13, 14, 200, 201, 202], 5),
        (vec![20, 21, 22, 23, 24, 25, 150, 151, 152], 6),
        (vec![30, 31, 32, 99, 98, 97, 96], 3),
        (vec![40, 41, 42, 43, 5, 6, 7], 4),
    ];
    let vars = m.vars();
    let mut opt = AdamW::new(&vars, 0.0).unwrap();
    let mean = |m: &TrainableModel| -> f64 {
        let (mut s, mut n) = (0f64, 0usize);
        for (t, p) in &rows {
            let (l, k) = m.completion_nll(t, *p, None).unwrap();
            s += l.to_scalar::<f32>().unwrap() as f64;
            n += k;
        }
        s / n as f64
    };
    let before = mean(&m);
    let steps = 300;
    for step in 0..steps {
        let total: usize = rows.iter().map(|(t, p)| t.len() - p).sum();
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        for (t, p) in &rows {
            let (l, _) = m.completion_nll(t, *p, None).unwrap();
            let g = (l / total as f64).unwrap().backward().unwrap();
            for (slot, (_, v)) in acc.iter_mut().zip(&vars) {
                let gv = g.get(v.as_tensor()).unwrap().clone();
                *slot = Some(match slot.take() {
                    Some(a) => (a + gv).unwrap(),
                    None => gv,
                });
            }
        }
        let grads: Vec<Tensor> = acc.into_iter().map(|g| g.unwrap()).collect();
        opt.step(&vars, &grads, learning_rate(step, steps, 10, 1e-2, 0.1)).unwrap();
    }
    let after = mean(&m);
    assert!(before > 3.0, "an untrained model is near chance (ln 320 ≈ 5.8): {before}");
    assert!(after < 0.05, "loss {before:.3} → {after:.4} after {steps} steps");

    // The trained adapter survives the PEFT round trip exactly and, loaded into a fresh model, gives the same loss.
    let dir = path.parent().unwrap().join("adapter");
    m.adapter("test/tiny").unwrap().save(&dir, &m.layout()).unwrap();
    let back = Adapter::load(&dir, &m.layout(), &Device::Cpu).unwrap();
    let mut fresh = TrainableModel::load(&path, opts(BaseMode::Quantized, &Target::ALL, 8)).unwrap();
    assert!(mean(&fresh) > 3.0);
    fresh.load_adapter(&back).unwrap();
    assert!((mean(&fresh) - after).abs() < 1e-5, "reloaded adapter: {} vs {after}", mean(&fresh));
}

#[test]
fn bad_training_inputs_are_refused() {
    let path = model_file("refuse");
    assert!(TrainableModel::load(&path, opts(BaseMode::Quantized, &[], 2)).is_err(), "no targets");
    assert!(TrainableModel::load(&path, opts(BaseMode::Quantized, &[Target::Q], 0)).is_err(), "rank 0");
    let m = TrainableModel::load(&path, opts(BaseMode::Quantized, &[Target::Q], 2)).unwrap();
    assert!(m.completion_nll(&[1, 2, 3], 0, None).is_err(), "no prompt");
    assert!(m.completion_nll(&[1, 2, 3], 3, None).is_err(), "no completion");
    assert!(m.completion_nll(&vec![1; 65], 3, None).is_err(), "longer than max_positions");
    assert!(m.completion_nll(&[1, 2, 999], 2, None).is_err(), "token outside the vocabulary");
    assert!(Packed::new(&[]).is_err(), "nothing to pack");
    assert!(Packed::new(&[(&[1, 2, 3], 2), (&[1, 2, 4], 3)]).is_err(), "one packed row without a completion");
    // An adapter for other targets does not load silently.
    let other = TrainableModel::load(&path, opts(BaseMode::Quantized, &[Target::V], 2)).unwrap();
    let mut m = m;
    assert!(m.load_adapter(&other.adapter("x").unwrap()).is_err());
}
