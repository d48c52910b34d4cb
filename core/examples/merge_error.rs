//! What folding a LoRA adapter into 4-bit weights costs: for every adapted weight of a GGUF model, the change the
//! adapter makes (`δ = scale·B·A`), the error of re-quantizing `W + δ` to W's own format (what `copilot-trainer
//! export --requantize` writes), and how much of δ the rounded weights keep. Writes reports/merge_error.{json,md}.
//!
//!   cargo run --release -p copilot-core --example merge_error -- BASE.gguf ADAPTER_DIR [REPORT_NAME]
//!
//! Why it matters: `peft::Fold::Beside` (the default) keeps W as stored and applies the adapter at run time.
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{Device, Tensor};
use copilot_core::tune::peft::{Adapter, Layout};
use std::collections::BTreeMap;

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
}

#[derive(Default)]
struct Sums {
    weights: usize,
    delta: f64,
    requant_err: f64,
    requant_base_err: f64,
    kept: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: merge_error BASE.gguf ADAPTER_DIR [REPORT_NAME]");
        std::process::exit(2);
    }
    let (base, adir) = (&args[1], std::path::Path::new(&args[2]));
    let report = args.get(3).map(String::as_str).unwrap_or("merge_error");
    let mut f = std::fs::File::open(base).expect("open the base");
    let ct = gguf_file::Content::read(&mut f).expect("read the base");
    let cfg = copilot_core::engine::model::Config::from_gguf(&ct).expect("a model we serve");
    let layout = Layout { arch: cfg.arch.clone(), n_head: cfg.n_head, n_kv_head: cfg.n_kv_head };
    let ad = Adapter::load(adir, &layout, &Device::Cpu).expect("load the adapter");
    let mut by_format: BTreeMap<String, Sums> = BTreeMap::new();
    let mut by_target: BTreeMap<String, Sums> = BTreeMap::new();
    for ((layer, target), (a, b)) in &ad.weights {
        let name = format!("blk.{layer}.{}.weight", target.gguf_name());
        let qt = ct.tensor(&mut f, &name, &Device::Cpu).expect("the adapted weight");
        let w = qt.dequantize(&Device::Cpu).unwrap();
        let d = copilot_core::tune::lora::fixed_order_delta(a, b, ad.config.scale()).unwrap();
        let target_w = (&w + &d).unwrap();
        let merged = QTensor::quantize(&target_w, qt.dtype()).unwrap().dequantize(&Device::Cpu).unwrap();
        let again = QTensor::quantize(&w, qt.dtype()).unwrap().dequantize(&Device::Cpu).unwrap();
        let (e, e0) = ((&merged - &target_w).unwrap(), (&again - &w).unwrap());
        let kept = dot(&(&merged - &w).unwrap(), &d);
        for s in [
            by_format.entry(format!("{:?}", qt.dtype())).or_default(),
            by_target.entry(target.peft_name().to_string()).or_default(),
        ] {
            s.weights += 1;
            s.delta += dot(&d, &d);
            s.requant_err += dot(&e, &e);
            s.requant_base_err += dot(&e0, &e0);
            s.kept += kept;
        }
    }
    let rows = |m: &BTreeMap<String, Sums>| -> Vec<serde_json::Value> {
        m.iter()
            .map(|(k, s)| {
                serde_json::json!({
                    "group": k, "weights": s.weights, "delta_sq": s.delta, "requantize_err_sq": s.requant_err,
                    "requantize_base_alone_err_sq": s.requant_base_err,
                    "err_over_delta": s.requant_err / s.delta, "delta_kept": s.kept / s.delta,
                })
            })
            .collect()
    };
    let (fmt_rows, tgt_rows) = (rows(&by_format), rows(&by_target));
    let json = serde_json::json!({
        "base": base, "adapter": adir, "rank": ad.config.rank, "alpha": ad.config.alpha,
        "machine": copilot_core::engine::host::machine(),
        "command": format!("cargo run --release -p copilot-core --example merge_error -- {}", args[1..].join(" ")),
        "note": "Squared Frobenius norms summed over the group's weights. delta_sq: the adapter's change scale·B·A; \
                 requantize_err_sq: |Q(W+δ) − (W+δ)|² with candle's quantizer for W's own format (export \
                 --requantize); requantize_base_alone_err_sq: |Q(W) − W|², what re-quantizing the unchanged base \
                 already costs; delta_kept: ⟨Q(W+δ) − W, δ⟩ / |δ|², the share of the change the rounded weights keep.",
        "by_format": fmt_rows, "by_target": tgt_rows,
    });
    std::fs::create_dir_all("reports").unwrap();
    std::fs::write(format!("reports/{report}.json"), serde_json::to_string_pretty(&json).unwrap() + "\n").unwrap();
    let mut md = format!(
        "# Folding the adapter into the weights by re-quantizing\n\nBase `{base}`, adapter `{}` (rank {}, alpha {}).\n\
         Command: `{}`. Machine: {} (the figures are arithmetic, not timings: any machine gives them).\n\n{}\n\n| group | weights | \\|δ\\|² | \\|Q(W+δ)−(W+δ)\\|² | err / \\|δ\\|² | \\|Q(W)−W\\|² | δ kept |\n|---|---|---|---|---|---|---|\n",
        adir.display(),
        ad.config.rank,
        ad.config.alpha,
        json["command"].as_str().unwrap(),
        json["machine"].as_str().unwrap(),
        json["note"].as_str().unwrap()
    );
    for r in fmt_rows.iter().chain(&tgt_rows) {
        md += &format!(
            "| {} | {} | {:.3} | {:.3} | {:.2} | {:.3} | {:.2} |\n",
            r["group"].as_str().unwrap(),
            r["weights"],
            r["delta_sq"].as_f64().unwrap(),
            r["requantize_err_sq"].as_f64().unwrap(),
            r["err_over_delta"].as_f64().unwrap(),
            r["requantize_base_alone_err_sq"].as_f64().unwrap(),
            r["delta_kept"].as_f64().unwrap()
        );
    }
    std::fs::write(format!("reports/{report}.md"), md).unwrap();
    println!("{}", serde_json::to_string_pretty(&json["by_format"]).unwrap());
}
