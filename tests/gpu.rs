//! The CUDA backend against the CPU reference on a real GPU: the self-test's checks as Rust
//! tests, ignored where there is no GPU. Run them with
//! `cargo test --release --test gpu -- --ignored` (or through `tools/device-check.sh`).

use engine::backend::cuda::CudaBackend;
use engine::selftest::{
    attention_backward_kernel_checks, attention_kernel_checks, backward_model_check, backward_op_checks, model_check, op_checks,
    render_table,
};

fn gpu() -> CudaBackend {
    CudaBackend::new(0).expect("a CUDA GPU")
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn every_op_matches_the_cpu() {
    let checks = op_checks(&gpu(), 11).unwrap();
    let table = render_table(&checks);
    println!("{table}");
    assert!(checks.iter().all(|c| c.passed()), "{table}");
}

/// On Hopper: the portable and the sm90a attention kernels, each forced (no checks elsewhere).
#[test]
#[ignore = "needs a CUDA GPU"]
fn every_attention_kernel_matches_the_cpu() {
    let checks = attention_kernel_checks(&gpu(), 12).unwrap();
    let failed = checks.iter().filter(|c| !c.passed()).count();
    assert_eq!(failed, 0, "{}", render_table(&checks));
}

/// The SIMT and the tensor-core attention backward, each forced.
#[test]
#[ignore = "needs a CUDA GPU"]
fn every_attention_backward_kernel_matches_the_cpu() {
    let checks = attention_backward_kernel_checks(&gpu(), 16).unwrap();
    let table = render_table(&checks);
    println!("{table}");
    assert!(!checks.is_empty() && checks.iter().all(|c| c.passed()), "{table}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn flux_tiny_forward_matches_the_cpu() {
    let c = model_check(&gpu(), "flux-tiny", (6, 5), 12).unwrap();
    assert!(c.passed(), "{c:?}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn flux_small_forward_matches_the_cpu() {
    let c = model_check(&gpu(), "flux-small", (16, 16), 13).unwrap();
    assert!(c.passed(), "{c:?}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn out_of_memory_is_a_typed_error_not_a_panic() {
    use engine::backend::error::DeviceOutOfMemory;
    use engine::Backend;
    // 2^40 bf16 elements (2 TiB): beyond any card.
    let Err(err) = gpu().placeholder(&[1 << 20, 1 << 20], loaders::DType::BF16) else { panic!("a 2 TiB allocation succeeded") };
    let oom = err.downcast_ref::<DeviceOutOfMemory>().unwrap_or_else(|| panic!("not an out-of-memory error: {err:#}"));
    assert_eq!(oom.bytes, 1 << 41);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn every_backward_op_matches_the_cpu() {
    let checks = backward_op_checks(&gpu(), 14).unwrap();
    let table = render_table(&checks);
    println!("{table}");
    assert!(checks.iter().all(|c| c.passed()), "{table}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn flux_tiny_training_backward_matches_the_cpu() {
    let checks = backward_model_check(&gpu(), "flux-tiny", (6, 5), 15).unwrap();
    let table = render_table(&checks);
    println!("{table}");
    assert!(checks.iter().all(|c| c.passed()), "{table}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn training_kernels_match_the_cpu() {
    let checks = engine::selftest::training_checks(&gpu(), 14).unwrap();
    let table = render_table(&checks);
    println!("{table}");
    assert!(checks.iter().all(|c| c.passed()), "{table}");
}
