//! One weight product on the decode path (`gemm_many`), GGUF layout with the lane kernels against the 16-row
//! layout with its kernels ([`copilot_core::engine::rows16`]), random weights, in alternating rounds. Prints GMAC/s
//! for each and the largest difference between the two (they differ only in float summation order).
//! `cargo run --release -p copilot-core --example bench_rows16 -- N K q4k|q6k ROWS...`
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use copilot_core::engine::kernels::{gemm_many, Kind, Matrix, QK_K};
use copilot_core::engine::rows16;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(8960);
    let k: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1536);
    let (dtype, kind) = match args.get(3).map(|s| s.as_str()) {
        Some("q6k") => (GgmlDType::Q6K, Kind::Q6K),
        _ => (GgmlDType::Q4K, Kind::Q4K),
    };
    let counts: Vec<usize> = args.iter().skip(4).filter_map(|s| s.parse().ok()).collect();
    assert!(rows16::available(), "the 16-row kernels need AVX-512 VNNI (and COPILOT_ROWS16 not off)");
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
    let data = QTensor::quantize(&w, dtype).unwrap().data().unwrap().to_vec();
    let sixteen = rows16::interleave(kind, &data, n, k / QK_K);
    let kind16 = rows16::layout_of(kind).expect("a 16-row layout");
    for rows in counts {
        let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let xs: Vec<&[f32]> = xv.chunks_exact(k).collect();
        let gguf = [Matrix { kind, w: &data, n }];
        let ours = [Matrix { kind: kind16, w: &sixteen, n }];
        let (mut y1, mut y2) = (vec![0f32; n * rows], vec![0f32; n * rows]);
        let macs = (n * k * rows) as f64;
        let time = |f: &mut dyn FnMut()| {
            f();
            let reps = (3000 / rows).clamp(5, 100);
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            macs * reps as f64 / t.elapsed().as_secs_f64() / 1e9
        };
        let (mut a, mut b) = (0.0, 0.0);
        for _ in 0..3 {
            a += time(&mut || gemm_many(&gguf, k, &xs, &mut [&mut y1]));
            b += time(&mut || gemm_many(&ours, k, &xs, &mut [&mut y2]));
        }
        let diff = y1.iter().zip(&y2).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        let mag = y1.iter().map(|p| p.abs()).fold(0f32, f32::max);
        println!(
            "{n}x{k} {kind:?}, {rows} rows: GGUF layout {:.1} GMAC/s, 16-row layout {:.1} (largest difference {diff:.2e} of {mag:.1})",
            a / 3.0,
            b / 3.0
        );
    }
}
