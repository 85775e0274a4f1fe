//! Subcommands. Each lives in its own file and returns an error for main to print.

mod ae;
mod bench;
mod degrade;
mod eval;
mod forward;
mod info;
mod kernels;
mod kernels_training;
mod model;
mod plan;
mod selftest;
mod train;
mod upscale;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "engine",
    version,
    about = "ASASR image super-resolution engine: a FLUX-architecture rectified-flow transformer on the CPU and NVIDIA GPUs"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Ae(ae::Args),
    Bench(bench::Args),
    Degrade(degrade::Args),
    Eval(eval::Args),
    Forward(forward::Args),
    Info(info::Args),
    Kernels(kernels::Args),
    Model(model::Args),
    Plan(plan::Args),
    Selftest(selftest::Args),
    Train(Box<train::Args>),
    Upscale(upscale::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Ae(a) => ae::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Degrade(a) => degrade::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Forward(a) => forward::run(a),
        Command::Info(a) => info::run(a),
        Command::Kernels(a) => kernels::run(a),
        Command::Model(a) => model::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Selftest(a) => selftest::run(a),
        Command::Train(a) => train::run(*a),
        Command::Upscale(a) => upscale::run(a),
    }
}

/// Prints `e` as one line on stderr, `error: ` and `prefix` first, in one write (several ranks
/// and their launcher share the stream).
pub fn print_error(prefix: &str, e: &anyhow::Error) {
    // `{:#}` joins the context chain on one line: "outer: inner: root cause".
    let line = format!("error: {prefix}{}\n", format!("{e:#}").replace('\n', " "));
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
}

/// Bytes as a human-readable size.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// A count with a metric suffix (parameters).
pub fn human_count(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}
