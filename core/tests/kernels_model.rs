//! Our decoding step (src/kernels.rs for the weight products, src/decode.rs for the rest) inside the whole forward
//! pass: a small model written as a GGUF with Q4_K and Q6_K weights (the formats of the default Q4_K_M model; the
//! CI's tiny model is Q4_1, which the kernels do not cover), in both layouts we serve — `llama` (interleaved RoPE)
//! and `qwen2` (NeoX RoPE, q/k/v biases) — run once on candle's ops and matmuls and once on ours.
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use copilot_core::engine::model::{argmax, Config, KvCache, Rows, Transformer};

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
    // In `ours` every product runs on our kernels: the prompt's (several rows), its last row's vocabulary
    // projection and every decoding step (one row), with the cache growing from the prompt's (so the step reads
    // K/V that prefill wrote); in `theirs` all run on candle's matmul.
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

/// A prompt's products on our kernels (the default) against candle's tiled matmul (the layout of before), with
/// decoding on ours in both: the same integer products per row, so the prompt's logits and the decoding that
/// follows agree to float summation order; and only the candle side needs `prepare`.
#[test]
fn prompts_on_our_kernels_match_candles_tiled_matmul() {
    if !copilot_core::engine::kernels::simd_available() {
        eprintln!("no AVX2 on this CPU: prompts use candle's matmul only, nothing to compare");
        return;
    }
    let dir = std::env::temp_dir().join(format!("copilot-prompt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for arch in ["llama", "qwen2"] {
        let path = dir.join(format!("tiny-{arch}-prompt.gguf"));
        write_model_arch(&path, arch);
        let (ours, mut tiled) = (load(&path, true), load(&path, true));
        tiled.set_own_prefill(false);
        assert!(ours.prefill_on_own_kernels() && !tiled.prefill_on_own_kernels());
        tiled.prepare(2).unwrap();
        ours.prepare(2).unwrap(); // nothing to do: no weight of this model goes through candle's matmul
                                  // A long prompt (more rows than one pass of the kernels takes at once), then a second prompt over the
                                  // cached one, then decoding steps.
        let prompt: Vec<u32> = (0..45u32).map(|i| (i * 37 + 11) % VOCAB as u32).collect();
        let (mut kv_a, mut kv_b) = (KvCache::new(), KvCache::new());
        for (i, part) in [&prompt[..], &[17, 18, 19][..], &[23][..], &[29][..]].into_iter().enumerate() {
            let a = ours.forward(part, &mut kv_a).unwrap().to_vec1::<f32>().unwrap();
            let b = tiled.forward(part, &mut kv_b).unwrap().to_vec1::<f32>().unwrap();
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            // Each layer re-quantizes its input to 8 bits, so a float-order difference can move a value by one
            // step, and here the K/V of 45+ positions differ that way too (the decoding test above starts from the
            // same K/V in both): within 2 % of the logit scale (as for a cache built by decoding vs by a prompt).
            eprintln!("{arch} part {i}: max |diff| {diff} of logit scale {scale}");
            assert!(diff <= 0.02 * scale, "{arch} part {i}: max |diff| {diff} of logit scale {scale}");
        }
        assert_eq!(kv_a.len(), prompt.len() + 5);
        assert_eq!(kv_a.len(), kv_b.len());
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A prompt on our kernels is the same products as the rows one at a time: each row's projections are
/// bit-identical however many rows share the pass (only attention's float order differs from a decoding step), so
/// splitting a prompt into pieces changes no logit beyond that.
#[test]
fn a_prompt_split_into_pieces_gives_the_same_logits() {
    let dir = std::env::temp_dir().join(format!("copilot-pieces-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny-qwen2-pieces.gguf");
    write_model_arch(&path, "qwen2");
    let m = load(&path, true);
    let prompt: Vec<u32> = (0..30u32).map(|i| (i * 53 + 7) % VOCAB as u32).collect();
    let whole = m.forward(&prompt, &mut KvCache::new()).unwrap().to_vec1::<f32>().unwrap();
    let mut kv = KvCache::new();
    let mut last = Vec::new();
    for piece in prompt.chunks(9) {
        last = m.forward(piece, &mut kv).unwrap().to_vec1::<f32>().unwrap();
    }
    let scale = whole.iter().fold(0f32, |s, v| s.max(v.abs()));
    let diff = whole.iter().zip(&last).fold(0f32, |s, (p, q)| s.max((p - q).abs()));
    assert!(diff <= 1e-3 * scale, "pieces vs whole: {diff} of {scale}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A state that continues a cached prompt (the schema prefix every request on that schema shares) stores only its
/// own positions, as segments after the prefix's. Built that way — a prefix, then nine prompt pieces, more than the
/// segment limit (past which all but the first are folded) — a state must decode as the same positions computed in
/// one pass do: the same tokens stepped, then another prompt pass (after decoded tokens, whose tail becomes a
/// segment) and more steps, logits within the float-order difference of a prompt in pieces. (Pieces of nine rows
/// or more: shorter prompt passes take the decoding kernels, whose 8-bit activations differ from a long pass's by
/// more than float order on this random model, with or without segments.)
#[test]
fn a_continued_prompt_shares_the_prefix_and_decodes_like_one_pass() {
    let dir = std::env::temp_dir().join(format!("copilot-segments-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny-qwen2-segments.gguf");
    write_model_arch(&path, "qwen2");
    let m = load(&path, true);
    let tokens: Vec<u32> = (0..101u32).map(|i| (i * 31 + 11) % VOCAB as u32).collect();
    let mut prefix = KvCache::new();
    m.forward(&tokens[..20], &mut prefix).unwrap();
    let mut pieces = prefix.clone();
    for piece in tokens[20..].chunks(9) {
        m.forward(piece, &mut pieces).unwrap();
    }
    let mut one = KvCache::new();
    m.forward(&tokens, &mut one).unwrap();
    assert_eq!((pieces.len(), pieces.bytes()), (one.len(), one.bytes()), "every position stored once");
    assert_eq!(pieces.bytes_shared_with(&prefix), prefix.bytes(), "the prefix's K/V is shared, not copied");
    assert_eq!(one.bytes_shared_with(&prefix), 0);
    let more: [&[u32]; 5] = [&[7], &[99], &[5, 6, 8], &[42], &[3]];
    for part in more {
        let a = m.forward(part, &mut pieces).unwrap().to_vec1::<f32>().unwrap();
        let b = m.forward(part, &mut one).unwrap().to_vec1::<f32>().unwrap();
        let scale = b.iter().fold(0f32, |s, v| s.max(v.abs()));
        let diff = a.iter().zip(&b).fold(0f32, |s, (p, q)| s.max((p - q).abs()));
        assert!(diff <= 1e-3 * scale, "after {part:?}: segmented vs one pass {diff} of {scale}");
    }
    assert_eq!(pieces.bytes_shared_with(&prefix), prefix.bytes(), "still shared after more prompt passes");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_prefix_prefilled_in_chunks_is_shared_whole_once_merged() {
    // The runtime prefills a long schema prefix in chunks, one segment each. Continuations fold past eight segments
    // all but the first into one: unmerged, the prefix's later chunks are then copied into every request.
    let dir = std::env::temp_dir().join(format!("copilot-merge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny-qwen2-merge.gguf");
    write_model_arch(&path, "qwen2");
    let m = load(&path, true);
    let tokens: Vec<u32> = (0..120u32).map(|i| (i * 17 + 5) % VOCAB as u32).collect();
    let (head, rest) = tokens.split_at(30);
    let chunked = |merge: bool| {
        let mut prefix = KvCache::new();
        for chunk in head.chunks(10) {
            m.forward(chunk, &mut prefix).unwrap();
        }
        if merge {
            prefix.merge_segments_from(0).unwrap();
        }
        let mut cont = prefix.clone();
        let mut logits = Vec::new();
        for piece in rest.chunks(10) {
            logits = m.forward(piece, &mut cont).unwrap().to_vec1::<f32>().unwrap();
        }
        (prefix, cont, logits)
    };
    let (merged, cont, a) = chunked(true);
    let (unmerged, cont_unmerged, b) = chunked(false);
    assert_eq!(merged.segment_count(), 1);
    assert_eq!(cont.bytes_shared_with(&merged), merged.bytes(), "all of the prefix shared");
    assert!(
        cont_unmerged.bytes_shared_with(&unmerged) < unmerged.bytes(),
        "unmerged, the fold copies part of the prefix (else this test shows nothing)"
    );
    assert_eq!(a, b, "merging moves no float");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn preparing_the_weights_at_load_changes_no_logit() {
    // `prepare` makes candle rewrite each weight into its tiled layout at load instead of at the first prompt: the
    // same rewrite, so a prepared model must compute exactly what an unprepared one computes. (Prompts on
    // candle's matmul: with ours there is nothing to prepare.)
    let dir = std::env::temp_dir().join(format!("copilot-prepare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny-qwen2-q4k-q6k.gguf");
    write_model_arch(&path, "qwen2");
    let (mut prepared, mut lazy) = (load(&path, true), load(&path, true));
    prepared.set_own_prefill(false);
    lazy.set_own_prefill(false);
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

/// The multi-row pass (`Transformer::step_many`) is the primitive behind several candidates, speculative
/// verification and several sessions decoded together: whatever shares a pass, each row must get exactly the
/// logits it would get alone — bit for bit, so greedy decoding gives the same tokens batched or not.
#[test]
fn several_rows_in_one_pass_equal_one_row_at_a_time() {
    let dir = std::env::temp_dir().join(format!("copilot-rows-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for arch in ["llama", "qwen2"] {
        let path = dir.join(format!("tiny-{arch}-rows.gguf"));
        write_model_arch(&path, arch);
        let m = load(&path, true);
        let mut kv0 = KvCache::new();
        m.forward(&[3, 141, 59, 26, 253, 58, 97], &mut kv0).unwrap();
        // Three sequences continuing one prompt (candidates), four steps, different tokens each.
        let mut single: Vec<KvCache> = vec![kv0.clone(); 3];
        let mut batched: Vec<KvCache> = vec![kv0.clone(); 3];
        for step in 0..4u32 {
            let toks: Vec<[u32; 1]> = (0..3u32).map(|s| [(17 + 31 * s + 7 * step) % VOCAB as u32]).collect();
            let want: Vec<Vec<f32>> = single
                .iter_mut()
                .zip(&toks)
                .map(|(kv, t)| m.forward(t, kv).unwrap().to_vec1::<f32>().unwrap())
                .collect();
            let mut seqs: Vec<Rows> =
                batched.iter_mut().zip(&toks).map(|(kv, t)| Rows { cache: kv, tokens: t }).collect();
            let got = m.step_many(&mut seqs).unwrap();
            assert_eq!(got, want, "{arch} step {step}: batched rows differ from single rows");
        }
        assert!(batched.iter().zip(&single).all(|(a, b)| a.len() == b.len()));
        // Several positions of one sequence in one pass (a draft to verify): row j sees the rows before it.
        let draft = [11u32, 12, 13];
        let mut one_by_one = kv0.clone();
        let want: Vec<Vec<f32>> =
            draft.iter().map(|t| m.forward(&[*t], &mut one_by_one).unwrap().to_vec1::<f32>().unwrap()).collect();
        let mut together = kv0.clone();
        let got = m.step_many(&mut [Rows { cache: &mut together, tokens: &draft }]).unwrap();
        assert_eq!(got, want, "{arch}: a multi-position pass differs from single steps");
        // Mixed: a two-position row group beside a one-position one, after the above.
        let (mut a1, mut b1) = (together.clone(), batched[0].clone());
        let want_a: Vec<Vec<f32>> =
            [5u32, 6].iter().map(|t| m.forward(&[*t], &mut a1).unwrap().to_vec1::<f32>().unwrap()).collect();
        let want_b = m.forward(&[9], &mut b1).unwrap().to_vec1::<f32>().unwrap();
        let (mut a2, mut b2) = (together.clone(), batched[0].clone());
        let got = m
            .step_many(&mut [Rows { cache: &mut a2, tokens: &[5, 6] }, Rows { cache: &mut b2, tokens: &[9] }])
            .unwrap();
        assert_eq!(got, vec![want_a[0].clone(), want_a[1].clone(), want_b]);
        // A prompt pass after decoded positions folds them in: the same logits as on a cache built by prompts.
        let mut folded = a2.clone();
        let mut fresh = KvCache::new();
        let all: Vec<u32> = [3u32, 141, 59, 26, 253, 58, 97, 11, 12, 13, 5, 6].to_vec();
        m.forward(&all, &mut fresh).unwrap();
        let x = m.forward(&[40, 41], &mut folded).unwrap().to_vec1::<f32>().unwrap();
        let y = m.forward(&[40, 41], &mut fresh).unwrap().to_vec1::<f32>().unwrap();
        let scale = y.iter().fold(0f32, |s, v| s.max(v.abs()));
        let diff = x.iter().zip(&y).fold(0f32, |s, (p, q)| s.max((p - q).abs()));
        // K/V written by decoding steps vs by a prompt pass: attention's float order differs slightly.
        assert!(diff <= 0.02 * scale, "{arch}: folded tail {diff} of {scale}");
        // A bad token anywhere fails the whole pass and leaves every state as it was.
        let (mut p, mut q) = (b2.clone(), a2.clone());
        let (lp, lq) = (p.len(), q.len());
        let bad = [VOCAB as u32];
        assert!(m
            .step_many(&mut [Rows { cache: &mut p, tokens: &[1] }, Rows { cache: &mut q, tokens: &bad }])
            .is_err());
        assert_eq!((p.len(), q.len()), (lp, lq));
        let again = m.forward(&[1], &mut p).unwrap().to_vec1::<f32>().unwrap();
        let mut ref_p = b2.clone();
        assert_eq!(again, m.forward(&[1], &mut ref_p).unwrap().to_vec1::<f32>().unwrap());
    }
    std::fs::remove_dir_all(&dir).ok();
}
