//! Prototype: Q4_K weights interleaved 16 rows at a time (one 32-bit lane per weight row), rows-across-lanes
//! VNNI kernel in the totals formulation, against `gemm_many` (the lane kernels). GMAC/s.
//! `bench_x16 [N] [K] [ROWS...]`
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use copilot_core::engine::kernels::{gemm_many, quantize_q8k, Kind, Matrix, Q8K};
use std::arch::x86_64::*;
use std::time::Instant;

const QK: usize = 256;
const B4: usize = 144;
const G: usize = 2304;
const MAXR: usize = 4;
static PFD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0); // one block of 16 rows

fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// [rowgroup][block][qs: 32 × (16 rows × 4 bytes) | scales: 3 × (16 × 4) | d: 16 f16 | dmin: 16 f16]
fn interleave(w: &[u8], n: usize, nb: usize) -> Vec<u8> {
    let mut o = vec![0u8; n * nb * B4];
    for g in 0..n / 16 {
        for i in 0..nb {
            let dst = &mut o[(g * nb + i) * G..(g * nb + i + 1) * G];
            for r in 0..16 {
                let b = &w[((g * 16 + r) * nb + i) * B4..][..B4];
                for gq in 0..32 {
                    dst[gq * 64 + 4 * r..gq * 64 + 4 * r + 4].copy_from_slice(&b[16 + 4 * gq..20 + 4 * gq]);
                }
                for k in 0..3 {
                    dst[2048 + k * 64 + 4 * r..2048 + k * 64 + 4 * r + 4].copy_from_slice(&b[4 + 4 * k..8 + 4 * k]);
                }
                dst[2240 + 2 * r..2242 + 2 * r].copy_from_slice(&b[0..2]);
                dst[2272 + 2 * r..2274 + 2 * r].copy_from_slice(&b[2..4]);
            }
        }
    }
    o
}

/// Per activation row and block: bsum pairs (sub 2u, 2u+1) as i16 pairs, 4 dwords.
fn pairs(a: &[Q8K]) -> Vec<[i32; 4]> {
    a.iter()
        .map(|b| {
            let s = |j: usize| (b.bsums[2 * j] as i32 + b.bsums[2 * j + 1] as i32) as i16 as u16 as i32;
            std::array::from_fn(|u| s(2 * u) | (s(2 * u + 1) << 16))
        })
        .collect()
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn group<const R: usize>(w: *const u8, nb: usize, a: [&[Q8K]; R], p: [&[[i32; 4]]; R], out: &mut [[f32; 16]; R]) {
    unsafe {
    let mut acc = [_mm512_setzero_ps(); R];
    let m4 = _mm512_set1_epi8(0x0F);
    for i in 0..nb {
        let blk = w.add(i * G);
        let dist = PFD.load(std::sync::atomic::Ordering::Relaxed);
        if dist > 0 {
            for l in 0..G / 64 {
                _mm_prefetch::<_MM_HINT_T0>(blk.add(dist + 64 * l) as *const i8);
            }
        }
        let s0 = _mm512_loadu_si512(blk.add(2048) as *const _);
        let s1 = _mm512_loadu_si512(blk.add(2112) as *const _);
        let s2 = _mm512_loadu_si512(blk.add(2176) as *const _);
        let c3f = _mm512_set1_epi32(0x3f3f_3f3f);
        let sc_lo = _mm512_and_si512(s0, c3f);
        let mn_lo = _mm512_and_si512(s1, c3f);
        let c0f = _mm512_set1_epi32(0x0f0f_0f0f);
        let c03 = _mm512_set1_epi32(0x0303_0303);
        let sc_hi = _mm512_or_si512(_mm512_and_si512(s2, c0f), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(s0, 6), c03), 4));
        let mn_hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(s2, 4), c0f), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(s1, 6), c03), 4));
        let sc: [__m512i; 8] = std::array::from_fn(|j| {
            let v = if j < 4 { sc_lo } else { sc_hi };
            _mm512_shuffle_epi8(v, shuf([(j % 4) as i8, -1, -1, -1]))
        });
        let mp: [__m512i; 4] = std::array::from_fn(|u| {
            let v = if u < 2 { mn_lo } else { mn_hi };
            let b = 2 * (u % 2) as i8;
            _mm512_shuffle_epi8(v, shuf([b, -1, b + 1, -1]))
        });
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(2240) as *const _));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(2272) as *const _));
        let mut tot = [_mm512_setzero_si512(); R];
        for c in 0..4 {
            let mut slo = [_mm512_setzero_si512(); R];
            let mut shi = [_mm512_setzero_si512(); R];
            for q in 0..8 {
                let gq = 8 * c + q;
                let wv = _mm512_loadu_si512(blk.add(gq * 64) as *const _);
                let lo = _mm512_and_si512(wv, m4);
                let hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m4);
                for r in 0..R {
                    let qs = a[r][i].qs.as_ptr();
                    let al = _mm512_set1_epi32((qs.add(64 * c + 4 * q) as *const i32).read_unaligned());
                    let ah = _mm512_set1_epi32((qs.add(64 * c + 32 + 4 * q) as *const i32).read_unaligned());
                    slo[r] = _mm512_dpbusd_epi32(slo[r], lo, al);
                    shi[r] = _mm512_dpbusd_epi32(shi[r], hi, ah);
                }
            }
            for r in 0..R {
                tot[r] = _mm512_add_epi32(tot[r], _mm512_mullo_epi32(slo[r], sc[2 * c]));
                tot[r] = _mm512_add_epi32(tot[r], _mm512_mullo_epi32(shi[r], sc[2 * c + 1]));
            }
        }
        for r in 0..R {
            let pr = p[r][i];
            let mut m = _mm512_setzero_si512();
            for u in 0..4 {
                m = _mm512_dpwssd_epi32(m, mp[u], _mm512_set1_epi32(pr[u]));
            }
            let t = _mm512_mul_ps(_mm512_cvtepi32_ps(tot[r]), dw);
            let t = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(m), dmin, t);
            acc[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(a[r][i].d), acc[r]);
        }
    }
    for r in 0..R {
        _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
    }
    }
}

#[inline(always)]
fn shuf(p: [i8; 4]) -> __m512i {
    let mut v = [0i8; 64];
    for d in 0..16 {
        for b in 0..4 {
            v[4 * d + b] = if p[b] < 0 { -1 } else { p[b] + 4 * (d % 4) as i8 };
        }
    }
    unsafe { std::mem::transmute::<[i8; 64], __m512i>(v) }
}

fn run_x16(x16: &[u8], n: usize, nb: usize, act: &[Vec<Q8K>], prs: &[Vec<[i32; 4]>], y: &mut [f32]) {
    let rows = act.len();
    let yp = y.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(n / 16, |items| {
        for g in items {
            let w = unsafe { x16.as_ptr().add(g * nb * G) };
            let mut from = 0;
            while from < rows {
                let take = (rows - from).min(MAXR);
                macro_rules! go {
                    ($r:literal) => {{
                        let a: [&[Q8K]; $r] = std::array::from_fn(|j| act[from + j].as_slice());
                        let p: [&[[i32; 4]]; $r] = std::array::from_fn(|j| prs[from + j].as_slice());
                        let mut out = [[0f32; 16]; $r];
                        unsafe { group::<$r>(w, nb, a, p, &mut out) };
                        for j in 0..$r {
                            for l in 0..16 {
                                unsafe { *(yp as *mut f32).add((from + j) * n + g * 16 + l) = out[j][l] };
                            }
                        }
                    }};
                }
                match take {
                    1 => go!(1),
                    2 => go!(2),
                    3 => go!(3),
                    4 => go!(4),
                    5 => go!(5),
                    6 => go!(6),
                    7 => go!(7),
                    _ => go!(8),
                }
                from += take;
            }
        }
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(8960);
    let k: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1536);
    let rowss: Vec<usize> = args.iter().skip(3).filter_map(|s| s.parse().ok()).collect();
    let nb = k / QK;
    PFD.store(std::env::var("PF").ok().and_then(|v| v.parse().ok()).unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
    let qt = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
    let data = qt.data().unwrap().to_vec();
    let x16 = interleave(&data, n, nb);
    for rows in rowss {
        let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let xs: Vec<&[f32]> = xv.chunks_exact(k).collect();
        let act: Vec<Vec<Q8K>> = xs
            .iter()
            .map(|x| {
                let mut a = Vec::new();
                quantize_q8k(x, &mut a);
                a
            })
            .collect();
        let prs: Vec<Vec<[i32; 4]>> = act.iter().map(|a| pairs(a)).collect();
        let mats = [Matrix { kind: Kind::Q4K, w: &data, n }];
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
        let mut lanes = 0.0;
        let mut x16r = 0.0;
        let mut prod = 0.0;
        let mats16 = [Matrix { kind: Kind::Q4K16, w: &x16, n }];
        let mut y3 = vec![0f32; n * rows];
        for _ in 0..3 {
            lanes += time(&mut || gemm_many(&mats, k, &xs, &mut [&mut y1]));
            x16r += time(&mut || run_x16(&x16, n, nb, &act, &prs, &mut y2));
            prod += time(&mut || gemm_many(&mats16, k, &xs, &mut [&mut y3]));
        }
        println!("  gemm_many over Q4K16: {:.1} GMAC/s", prod / 3.0);
        let err = y1.iter().zip(&y2).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let mag = y1.iter().map(|a| a.abs()).fold(0f32, f32::max);
        println!("{n}x{k} {rows} rows: lanes {:.1} GMAC/s, x16 {:.1}  (max diff {err:.3e} of {mag:.2})", lanes / 3.0, x16r / 3.0);
    }
}
