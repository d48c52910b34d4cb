//! A prompt's weight product three ways on one matrix (random weights, `ROWS` activation rows): our AVX-512 VNNI
//! prompt kernels, our AVX2 step kernels (`gemm_many`) and candle's quantized matmul (tiled copy built first).
//! Prints GMAC/s for each. `cargo run --release -p copilot-core --example bench_prompt -- [N] [K] [ROWS] [q4k|q6k]`
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use copilot_core::engine::kernels::{gemm_many, Kind, Matrix};
use copilot_core::engine::prompt_kernels::gemm_prompt;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n, k, rows) = (arg(1, 8960), arg(2, 1536), arg(3, 342));
    let (dtype, kind) = match args.get(4).map(|s| s.as_str()) {
        Some("q6k") => (GgmlDType::Q6K, Kind::Q6K),
        _ => (GgmlDType::Q4K, Kind::Q4K),
    };
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
    let qt = QTensor::quantize(&w, dtype).unwrap();
    let data = qt.data().unwrap().to_vec();
    let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let xs: Vec<&[f32]> = xv.chunks_exact(k).collect();
    let macs = (n * k * rows) as f64;
    let mats = [Matrix { kind, w: &data, n }];
    let mut y = vec![0f32; n * rows];
    let time = |f: &mut dyn FnMut()| {
        f();
        let t = Instant::now();
        let reps = (3000 / rows).clamp(3, 50);
        for _ in 0..reps {
            f();
        }
        macs * reps as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    let prompt = time(&mut || gemm_prompt(&mats, k, &xs, &mut [&mut y]));
    let step = time(&mut || gemm_many(&mats, k, &xs, &mut [&mut y]));
    let mm = QMatMul::from_qtensor(qt).unwrap();
    let cand = time(&mut || {
        mm.forward(&x).unwrap();
    });
    println!(
        "{n}x{k} {kind:?}, {rows} rows: prompt kernels {prompt:.1} GMAC/s, step kernels {step:.1}, candle {cand:.1}"
    );
}
