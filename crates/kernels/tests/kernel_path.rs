//! `VLLM_CPU_KERNEL=avx2` makes the 4-bit and k-quant matmuls run their AVX2 kernels (how
//! that path is measured and tested on a machine that has AVX-512 VNNI): the whole product
//! through the public API against the exact product with the dequantized weights. A process
//! of its own, because the path is chosen once per process.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use vllm_kernels::kquant::{KFormat, KMatrix};
use vllm_kernels::q4::{Q4Format, Q4Matrix};

fn check(y: &[f32], w: &[f32], x: &[f32], rows: usize, cols: usize, m: usize, what: &str) {
    for j in 0..m {
        for r in 0..rows {
            let exact: f32 = (0..cols).map(|i| x[j * cols + i] * w[r * cols + i]).sum();
            let norm: f32 = (0..cols).map(|i| (x[j * cols + i] * w[r * cols + i]).abs()).sum();
            let got = y[j * rows + r];
            assert!((got - exact).abs() <= 0.01 * norm + 1e-5, "{what} m={m} [{j}, {r}]: {got} vs {exact}");
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_avx2_path_runs_when_asked_and_is_exact_to_the_blocks() {
    // Set before any kernel runs; this binary has no other test.
    std::env::set_var("VLLM_CPU_KERNEL", "avx2");
    let (rows, cols) = (80, 512);
    let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1013) as f32 - 500.0) / 700.0).collect();
    for m in [1, 3, 8] {
        let x: Vec<f32> = (0..m * cols).map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0).collect();
        for format in [Q4Format::Q4_0, Q4Format::Q4_1] {
            let q = Q4Matrix::quantize(format, &w, rows, cols).unwrap();
            check(&q.matmul(&x, m), &q.dequantize(), &x, rows, cols, m, &format!("{format:?}"));
        }
        let t = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap();
        for (format, ty) in
            [(KFormat::Q4K, GgmlDType::Q4K), (KFormat::Q5K, GgmlDType::Q5K), (KFormat::Q6K, GgmlDType::Q6K)]
        {
            let q = QTensor::quantize(&t, ty).unwrap();
            let k = KMatrix::from_gguf(format, &q.data().unwrap(), rows, cols).unwrap();
            check(&k.matmul(&x, m), &k.dequantize(), &x, rows, cols, m, &format!("{format:?}"));
        }
    }
    assert_eq!(vllm_kernels::cpu_kernel_path(), "avx2");
}
