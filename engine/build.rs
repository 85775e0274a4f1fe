//! Turns the CUDA kernels in `cuda/*.cu` into PTX in `ptx/` and embeds that PTX in the binary.
//!
//! nvcc is optional: when it is found (env `NVCC`, then `tools/.venv-cuda` made by
//! `tools/setup-cuda.sh`, then `PATH`) every kernel file is recompiled and `ptx/` is rewritten
//! where the output changed; otherwise the committed `ptx/` is used as it is, so a plain
//! `cargo build` works with no CUDA anywhere. CI recompiles and fails when the committed PTX is
//! stale (`tools/ptx-check.sh`).
//!
//! Architecture: portable kernels are compiled for `compute_80` (PTX, JIT-compiled by the driver
//! for Ampere and newer); a file named `*_sm90a.cu` holds Hopper-only code (wgmma, TMA) and is
//! compiled for `compute_90a`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let cuda_dir = root.join("cuda");
    let ptx_dir = root.join("ptx");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-changed={}", cuda_dir.display());
    println!("cargo:rerun-if-changed={}", ptx_dir.display());

    let sources = kernel_sources(&cuda_dir);
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
    }
    // Headers shared by kernel files.
    for header in files_with_extension(&cuda_dir, "cuh") {
        println!("cargo:rerun-if-changed={}", header.display());
    }

    if let Some(nvcc) = find_nvcc(&root) {
        for src in &sources {
            compile(&nvcc, src, &ptx_dir, &cuda_dir);
        }
    }

    let mut table = String::from("/// Every kernel module's PTX by name (`cuda/<name>.cu`), embedded at build time.\n");
    table.push_str("pub const MODULES: &[(&str, &str)] = &[\n");
    for src in &sources {
        let name = src.file_stem().unwrap().to_str().unwrap();
        let ptx = ptx_dir.join(format!("{name}.ptx"));
        if !ptx.is_file() {
            panic!(
                "{} has no compiled {}: install nvcc with tools/setup-cuda.sh (or set NVCC) and build again",
                src.display(),
                ptx.display()
            );
        }
        println!("cargo:rerun-if-changed={}", ptx.display());
        table.push_str(&format!("    ({name:?}, include_str!({:?})),\n", ptx.display().to_string()));
    }
    table.push_str("];\n");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("kernels.rs");
    fs::write(out, table).unwrap();
}

fn files_with_extension(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == ext)).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

fn kernel_sources(cuda_dir: &Path) -> Vec<PathBuf> {
    files_with_extension(cuda_dir, "cu")
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    let venv_lib = root.join("tools/.venv-cuda/lib");
    if let Ok(entries) = fs::read_dir(&venv_lib) {
        for e in entries.flatten() {
            let nvcc = e.path().join("site-packages/nvidia/cu13/bin/nvcc");
            if nvcc.is_file() {
                return Some(nvcc);
            }
        }
    }
    env::var_os("PATH").and_then(|path| env::split_paths(&path).map(|d| d.join("nvcc")).find(|p| p.is_file()))
}

/// Compiles one kernel file to PTX, rewriting `ptx/<name>.ptx` only when its content changes (so
/// that an unchanged kernel never looks modified to git or to cargo).
fn compile(nvcc: &Path, src: &Path, ptx_dir: &Path, cuda_dir: &Path) {
    let name = src.file_stem().unwrap().to_str().unwrap();
    let arch = if name.ends_with("_sm90a") { "compute_90a" } else { "compute_80" };
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let tmp = out_dir.join(format!("{name}.ptx"));
    // Relative paths and no line info keep the PTX independent of where the checkout lives.
    let output = Command::new(nvcc)
        .current_dir(cuda_dir)
        .args(["--ptx", "-O3", "-std=c++17", "-arch", arch, "-o"])
        .arg(&tmp)
        .arg(src.file_name().unwrap())
        .output()
        .unwrap_or_else(|e| panic!("cannot run nvcc at {}: {e}", nvcc.display()));
    if !output.status.success() {
        panic!("nvcc failed on {}:\n{}", src.display(), String::from_utf8_lossy(&output.stderr));
    }
    let fresh = fs::read(&tmp).unwrap();
    let dest = ptx_dir.join(format!("{name}.ptx"));
    if fs::read(&dest).ok().as_deref() != Some(fresh.as_slice()) {
        fs::create_dir_all(ptx_dir).unwrap();
        let staged = ptx_dir.join(format!(".{name}.ptx.tmp"));
        fs::write(&staged, &fresh).unwrap();
        fs::rename(&staged, &dest).unwrap();
    }
}
