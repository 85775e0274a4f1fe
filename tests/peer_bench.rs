//! `tools/peer-bench`'s own checks (its comparison and refusal logic, without PyTorch), run with
//! the rest of the suite so that CI covers them. They need only a python3 on the PATH, which CI's
//! kernel gate needs as well.

use std::process::Command;

#[test]
fn the_peer_bench_passes_its_own_checks() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new("python3")
        .arg(root.join("tools/peer-bench/test_peer_bench.py"))
        .output()
        .expect("python3 must be on the PATH to run tools/peer-bench's checks");
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
