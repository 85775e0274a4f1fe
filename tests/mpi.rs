//! Data-parallel training on CPU ranks under `mpirun` (a build with `--features mpi`; needs Open
//! MPI's `mpirun` on PATH, as `.ci/run` installs it): N ranks train what one process trains with
//! the N-times batch, resume with the same rank count and refuse another, refuse differing
//! settings or data by rank, and a rank that dies or hangs stops the run within the timeout with
//! the last checkpoint intact. The world's own exchanges (the NCCL id's broadcast among them)
//! run under mpirun too, in this test binary.

mod common;
use common::{engine, s};

use loaders::image::{self, Image};
use loaders::safetensors::Checkpoint;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// One mpirun at a time: concurrent launches on a loaded machine are a failure of their own.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LAUNCHES: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LAUNCHES.lock().unwrap_or_else(|e| e.into_inner())
}

/// `mpirun` with what a test machine needs: as root if need be, more ranks than cores allowed,
/// no binding (ranks share the cores).
fn mpirun(ranks: usize) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "--bind-to", "none", "-np", &ranks.to_string()])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // Waiting ranks yield the core to working ones.
        .env("OMPI_MCA_mpi_yield_when_idle", "1");
    cmd
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn write_data(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (k, (w, h)) in [(72usize, 64usize), (64, 68), (80, 72)].into_iter().enumerate() {
        let data = (0..w * h * 3).map(|i| ((i * (31 + k) + i / (3 * w) * 7) % 97) as f32 / 96.0).collect();
        image::write_png(&dir.join(format!("{k}.png")), &Image::new(w, h, 3, data), false).unwrap();
    }
}

/// `engine train` arguments with small defaults; a flag in `extra` replaces its default.
fn train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--data", s(data), "--out", s(out), "--log", s(&out.with_extension("jsonl")), "--device", "cpu"]
        .map(String::from)
        .to_vec();
    let defaults = [("--max-steps", "3"), ("--batch", "2"), ("--crop", "32"), ("--rank", "2"), ("--lr", "1e-2"), ("--seed", "5")];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// `engine train` as `ranks` ranks under mpirun.
fn train_ranks(ranks: usize, data: &Path, out: &Path, extra: &[&str]) -> Output {
    mpirun(ranks).arg(env!("CARGO_BIN_EXE_engine")).args(train_args(data, out, extra)).output().expect("mpirun runs")
}

/// `engine train` as one process.
fn train_one(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let args = train_args(data, out, extra);
    engine(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn column(log: &Path, key: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(log).unwrap();
    text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[key].as_f64().unwrap()).collect()
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let file = Checkpoint::open(path).unwrap();
    file.names().map(|n| (n.to_string(), file.read(n).unwrap().to_f32())).collect()
}

/// `||got - want|| / ||want||`; a tensor that never moved (zero) must stay zero.
fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    let diff = norm(&mut got.iter().zip(want).map(|(&g, &w)| g as f64 - w as f64));
    match norm(&mut want.iter().map(|&w| w as f64)) {
        0.0 => diff,
        scale => diff / scale,
    }
}

/// Two CPU ranks with --batch 2 train the adapter one process trains with --batch 4: the same
/// samples, t, noise and negatives, only the order of the sums differs. The first step's
/// gradient norm shows the draws are the same (to 1e-6); after it AdamW, which normalises each
/// update, turns rounding in small gradient entries into larger relative changes of those
/// entries, so the adapters are compared as tensors (1e-4 of their norm) and the losses to 1e-5.
/// The preference case uses a beta (500) at which the S-DPO loss, a sigmoid of beta times energy
/// differences, does not amplify them past that.
#[test]
fn two_ranks_train_what_one_process_trains_with_the_double_batch() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_data(&data);
    let sft = dir.path().join("sft");
    ok(train_one(&data, &sft, &[]));
    let sft_lora = sft.join("lora.safetensors");
    let dpo = ["--stage", "dpo", "--sft-lora", s(&sft_lora), "--negatives", "reference", "--negative-steps", "2"];
    let cases: [(&str, Vec<&str>); 3] = [
        ("sft", vec![]),
        ("sft-accumulated", vec!["--grad-accum", "2", "--augment"]),
        ("dpo", [&dpo[..], &["--sobolev-s", "0", "--beta", "500", "--lr", "1e-4"]].concat()),
    ];
    for (name, extra) in cases {
        let (one, two) = (dir.path().join(format!("{name}-one")), dir.path().join(format!("{name}-two")));
        let with_batch = |batch: &'static str| [extra.clone(), vec!["--batch", batch]].concat();
        ok(train_one(&data, &one, &with_batch("4")));
        let out = ok(train_ranks(2, &data, &two, &with_batch("2")));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("2 ranks") && stdout.contains("global batch 2 ranks x 2 x"), "{name}: {stdout}");
        assert_eq!(stdout.matches("wrote ").count(), 1, "{name}: rank 0 alone reports: {stdout}");

        let (log_one, log_two) = (one.with_extension("jsonl"), two.with_extension("jsonl"));
        let (a, b) = (column(&log_one, "grad_norm")[0], column(&log_two, "grad_norm")[0]);
        assert!((a - b).abs() <= 1e-6 * a, "{name}: the first gradient norm is {a} with one process, {b} with two ranks");
        let (a, b) = (column(&log_one, "loss"), column(&log_two, "loss"));
        assert_eq!(a.len(), 3, "{name}");
        for (step, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "{name}: step {}: loss {a} with one process, {b} with two ranks", step + 1);
        }
        assert_eq!(column(&log_two, "global_batch")[0], [4.0, 8.0][(name == "sft-accumulated") as usize], "{name}");
        let (a, b) = (tensors(&one.join("lora.safetensors")), tensors(&two.join("lora.safetensors")));
        assert_eq!(a.len(), b.len());
        for ((name_a, a), (name_b, b)) in a.iter().zip(&b) {
            assert_eq!(name_a, name_b);
            let err = relative_error(b, a);
            assert!(err <= 1e-4, "{name}: {name_a}: relative error {err}");
        }
        // Only rank 0 wrote: one log, and no file of rank 1 beside the outputs.
        let written: Vec<String> =
            std::fs::read_dir(&two).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(written.len(), 2, "{name}: {written:?}");
    }
    // What ranks that each drew rank 0's share would train differs far beyond these tolerances.
    let half = dir.path().join("half");
    ok(train_one(&data, &half, &["--batch", "2"]));
    let (a, b) = (column(&half.with_extension("jsonl"), "grad_norm")[0], column(&dir.path().join("sft-one.jsonl"), "grad_norm")[0]);
    assert!((a - b).abs() > 1e-3 * b, "{a} {b}");
}

/// A two-rank run stopped at step 2 and resumed with two ranks ends as the straight run does;
/// resuming with another rank count is refused, by name.
#[test]
fn resume_with_two_ranks_continues_the_curve_and_another_count_is_refused() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_data(&data);
    let (straight, split) = (dir.path().join("straight"), dir.path().join("split"));
    ok(train_ranks(2, &data, &straight, &["--max-steps", "4"]));
    ok(train_ranks(2, &data, &split, &["--max-steps", "2"]));
    ok(train_ranks(2, &data, &split, &["--max-steps", "4", "--resume"]));
    for file in ["lora.safetensors", "checkpoint.safetensors"] {
        assert_eq!(std::fs::read(straight.join(file)).unwrap(), std::fs::read(split.join(file)).unwrap(), "{file}");
    }
    assert_eq!(column(&straight.with_extension("jsonl"), "loss"), column(&split.with_extension("jsonl"), "loss"));

    let out = train_one(&data, &split, &["--max-steps", "6", "--resume"]);
    common::assert_fails_with(&out, &["--resume", "checkpoint.safetensors", "2 ranks", "1 rank (one process)"]);
    let out = train_ranks(3, &data, &split, &["--max-steps", "6", "--resume"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("2 ranks") && stderr.contains("3 ranks"), "{stderr}");
    assert_eq!(stderr.matches("error:").count(), 1, "rank 0 alone reports an agreed failure: {stderr}");
}

/// Every rank compares its settings and its data listing with rank 0's: a difference stops the
/// run, naming the rank, the key or the file, and both values.
#[test]
fn ranks_with_differing_settings_or_data_are_refused_by_name() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_data(&data);
    let engine = env!("CARGO_BIN_EXE_engine");
    let out = dir.path().join("out");
    let rank = |lr: &str| [vec![engine.to_string()], train_args(&data, &out, &["--lr", lr])].concat();
    // mpirun's colon syntax: one rank with each command line.
    let output = mpirun(1).args(rank("1e-2")).arg(":").args(["-np", "1"]).args(rank("2e-2")).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("error: rank 1: its settings differ from rank 0's: 'lr' is 0.02 here but 0.01 on rank 0"), "{stderr}");
    assert!(!out.exists(), "nothing is written");

    // The same relative --data path, seen from two folders whose data differ in one file.
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    write_data(&a.join("data"));
    write_data(&b.join("data"));
    image::write_png(&b.join("data/1.png"), &Image::new(8, 8, 3, vec![0.5; 192]), true).unwrap();
    let rank = |wdir: &Path| {
        let args = train_args(Path::new("data"), &out, &[]);
        [vec!["-wdir".to_string(), s(wdir).to_string(), engine.to_string()], args].concat()
    };
    let output = mpirun(1).args(rank(&a)).arg(":").args(["-np", "1"]).args(rank(&b)).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("error: rank 1: its settings differ from rank 0's: the data differ: 1.png is"), "{stderr}");
}

/// The pid of rank `rank` among the descendants of `parent` (Open MPI names each rank in its
/// environment).
fn rank_pid(parent: u32, rank: usize) -> Option<u32> {
    let ppid = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat[stat.rfind(')')? + 2..].split_whitespace().nth(1)?.parse().ok()
    };
    let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).find(|&pid| {
        let mut p = pid;
        let descends = std::iter::from_fn(|| {
            p = ppid(p)?;
            Some(p)
        })
        .take(8)
        .any(|a| a == parent);
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        descends && environ.split(|&b| b == 0).any(|v| v == wanted.as_bytes())
    })
}

/// Waits for `child` up to `limit`; kills it if it is still running then.
fn wait_at_most(mut child: Child, limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    while started.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    (child.wait_with_output().unwrap(), started.elapsed())
}

/// A long two-rank run, saving every step, with rank 1 sent `signal` as soon as rank 0 has logged
/// step `after`: then rank 1 is computing its next step (it left the step's exchanges before
/// rank 0 could log it), so rank 0 meets it missing at the next check-in. mpirun's output, how
/// long it took to end after the signal, and the output folder.
fn signal_rank_one(dir: &Path, signal: i32, after: usize, extra: &[&str]) -> (Output, Duration, PathBuf) {
    let data = dir.join("data");
    write_data(&data);
    let out = dir.join("out");
    let log = out.with_extension("jsonl");
    let args = train_args(&data, &out, &[&["--max-steps", "100000", "--save-every", "1"], LONG_STEPS, extra].concat());
    let mut child = mpirun(2).arg(env!("CARGO_BIN_EXE_engine")).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    let logged = || std::fs::read_to_string(&log).map_or(0, |t| t.lines().count());
    let mut pid = None;
    while logged() < after {
        if child.try_wait().unwrap().is_some() || started.elapsed() > Duration::from_secs(120) {
            let (output, _) = wait_at_most(child, Duration::ZERO);
            panic!("the run did not reach step {after}: {}", String::from_utf8_lossy(&output.stderr));
        }
        pid = pid.or_else(|| rank_pid(child.id(), 1));
        std::thread::sleep(Duration::from_millis(1));
    }
    let pid = pid.or_else(|| rank_pid(child.id(), 1)).expect("rank 1's process");
    // SAFETY: signals a process of this test's own run.
    unsafe { libc::kill(pid as i32, signal) };
    let (output, took) = wait_at_most(child, Duration::from_secs(90));
    // SAFETY: as above; the process may be gone already.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    (output, took, out)
}

/// 64-pixel crops: a step long enough to signal rank 1 inside it.
const LONG_STEPS: &[&str] = &["--crop", "64"];

/// The checkpoint a stopped run left: whole, at a step the log reached, and resumable.
fn assert_checkpoint_resumes(dir: &Path, out: &Path) {
    let file = Checkpoint::open(&out.join("checkpoint.safetensors")).expect("the checkpoint reads");
    let step: u64 = file.metadata()["step"].parse().unwrap();
    assert!(step >= 2, "step {step}");
    for name in file.names() {
        file.read(name).unwrap();
    }
    let target = (step + 1).to_string();
    ok(train_ranks(2, &dir.join("data"), out, &[&["--max-steps", &target, "--resume"], LONG_STEPS].concat()));
}

/// Rank 1 killed mid-run: mpirun ends the other rank, non-zero, and the last checkpoint is whole
/// and resumes.
#[test]
fn a_killed_rank_ends_the_run_and_the_last_checkpoint_resumes() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let (output, took, out) = signal_rank_one(dir.path(), libc::SIGKILL, 3, &[]);
    assert!(!output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(took < Duration::from_secs(60), "the run took {took:?} to end");
    assert_checkpoint_resumes(dir.path(), &out);
}

/// Rank 1 stopped (hung) mid-run: rank 0 names it within the timeout and the run ends non-zero;
/// the last checkpoint is whole and resumes.
#[test]
fn a_hung_rank_is_named_within_the_timeout() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let (output, took, out) = signal_rank_one(dir.path(), libc::SIGSTOP, 3, &["--peer-timeout", "3"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(took < Duration::from_secs(40), "the run took {took:?} to end: {stderr}");
    assert!(stderr.contains("error: rank 0: rank 1 did not reach step") && stderr.contains("within 3 s"), "{stderr}");
    assert_checkpoint_resumes(dir.path(), &out);
}

/// A stop request that reaches rank 1 alone (SIGUSR1, what mpirun passes to every rank and
/// `scancel --signal=USR1` sends) stops both ranks after the same step, with a checkpoint of that
/// step, reported once; the run resumes from it.
#[test]
fn a_stop_request_on_one_rank_stops_every_rank_after_the_same_step() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let (output, took, out) = signal_rank_one(dir.path(), libc::SIGUSR1, 3, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && took < Duration::from_secs(60), "{stderr}");
    assert_eq!(stderr.matches("error: interrupted after step").count(), 1, "{stderr}");
    let steps = column(&out.with_extension("jsonl"), "step");
    let file = Checkpoint::open(&out.join("checkpoint.safetensors")).unwrap();
    assert_eq!(file.metadata()["step"], steps.last().unwrap().to_string(), "the checkpoint is of the last step");
    assert!(stderr.contains(&format!("interrupted after step {}", steps.last().unwrap())), "{stderr}");
    assert_checkpoint_resumes(dir.path(), &out);
}

/// `engine bench --train` on two CPU ranks: every rank times the steps with the gradients
/// averaged; rank 0 alone reports, with the all-reduce's share and the scaling efficiency.
#[test]
fn bench_under_mpirun_reports_the_all_reduce() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let args =
        ["bench", "--shape", "flux-tiny", "--random-weights", "--res", "64", "--steps", "2", "--train", "--rank", "4", "--device", "cpu"];
    let out = ok(mpirun(2).arg(env!("CARGO_BIN_EXE_engine")).args(args).args(["--json", s(&json)]).output().unwrap());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().filter(|l| l.starts_with("device ")).count(), 1, "rank 0 alone reports: {stdout}");
    assert!(stdout.contains("through MPI over 2 rank(s)") && stdout.contains("efficiency over 2 rank(s)"), "{stdout}");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!((doc["ranks"].as_u64(), doc["collective"].as_str()), (Some(2), Some("MPI")));
    let (reduce, step) = (doc["allreduce_seconds_per_step"].as_f64().unwrap(), doc["seconds_per_step"].as_f64().unwrap());
    assert!(reduce > 0.0 && reduce < step, "{reduce} s of a {step} s step");
    let efficiency = doc["scaling_efficiency"].as_f64().unwrap();
    assert!((efficiency - (1.0 - reduce / step)).abs() < 1e-12);
    // One process reduces nothing.
    let one = ok(engine(&args));
    assert!(!String::from_utf8_lossy(&one.stdout).contains("allreduce"));
}

/// The world's exchanges on every rank of an mpirun (this test binary, run by the next test):
/// ranks and node ranks, rank 0's NCCL id on every rank, gathers, sums and agreed verdicts.
#[test]
#[ignore = "run under mpirun by every_rank_of_the_world_exchanges"]
fn world_exchanges_on_this_rank() {
    use engine::world::{agree, open, shared_id};
    let world = open(Duration::from_secs(60)).unwrap();
    let (rank, size) = (world.rank(), world.size());
    assert_eq!(size, 2);
    assert_eq!((world.local_rank(), world.local_size()), (rank, 2), "one node");
    // Rank 0's id, made there only, on every rank.
    let id = shared_id(world.as_ref(), || {
        assert_eq!(rank, 0, "only rank 0 makes the id");
        Ok(std::array::from_fn(|i| (i * 7 + 3) as u8))
    })
    .unwrap();
    assert_eq!(id, std::array::from_fn(|i| (i * 7 + 3) as u8));
    let gathered = world.all_gather(&vec![rank as u8; rank + 1]).unwrap();
    assert_eq!(gathered, vec![vec![0u8], vec![1u8, 1]]);
    let mut values = vec![rank as f32 + 0.5, 2.0];
    world.sum_f32(&mut values).unwrap();
    assert_eq!(values, [2.0, 4.0]);
    let mut big = vec![1.0f64; 3 << 20];
    world.sum_f64(&mut big).unwrap();
    assert!(big.iter().all(|&v| v == 2.0));
    assert!(!world.check_in(7, false).unwrap());
    assert!(world.check_in(8, rank == 1).unwrap(), "a stop on one rank stops all");
    assert_eq!(agree(world.as_ref(), Ok(rank)).unwrap(), rank);
    let local = if rank == 1 { Err(anyhow::anyhow!("only here")) } else { Ok(()) };
    assert_eq!(agree(world.as_ref(), local).unwrap_err().to_string(), "rank 1: only here");
    let alike = agree::<()>(world.as_ref(), Err(anyhow::anyhow!("everywhere"))).unwrap_err();
    assert_eq!(alike.to_string(), "everywhere");
    println!("rank {rank} of {size}: every exchange agreed");
}

#[test]
fn every_rank_of_the_world_exchanges() {
    let _serial = one_at_a_time();
    let test = std::env::current_exe().unwrap();
    let out = ok(mpirun(2)
        .arg(test)
        .args(["--ignored", "--exact", "world_exchanges_on_this_rank", "--nocapture", "--test-threads", "1"])
        .output()
        .unwrap());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for rank in 0..2 {
        assert!(stdout.contains(&format!("rank {rank} of 2: every exchange agreed")), "{stdout}");
    }
}

/// One process of a build with MPI, started without a launcher, runs alone (no MPI world at all).
#[test]
fn without_a_launcher_one_process_runs_alone() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_data(&data);
    let out = ok(train_one(&data, &dir.path().join("out"), &["--max-steps", "1"]));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ranks"));
}
