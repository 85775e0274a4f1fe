mod common;

use std::collections::BTreeMap;

use common::{f32_file, f32_le, message, raw, write_file};
use half::{bf16, f16};
use loaders::safetensors::{self, Checkpoint, FileDType};
use loaders::{HostData, HostTensor};

fn sample_tensors() -> Vec<(&'static str, HostTensor)> {
    vec![
        ("w32", HostTensor::from_f32(vec![2, 3], vec![1.0, -2.5, 3.25, 0.0, 1e-8, -7.0])),
        ("b16", HostTensor::new(vec![3], HostData::BF16([1.5, -2.0, 0.125].map(bf16::from_f32).to_vec()))),
        ("h16", HostTensor::new(vec![1, 2], HostData::F16([0.5, 65504.0].map(f16::from_f32).to_vec()))),
        ("scalar", HostTensor::from_f32(vec![], vec![42.0])),
        ("empty", HostTensor::from_f32(vec![0, 5], vec![])),
    ]
}

#[test]
fn written_files_read_back_and_match_the_reference_crate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.safetensors");
    let tensors = sample_tensors();
    let refs: Vec<(&str, &HostTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string()), ("note".to_string(), "\"quoted\" ü".to_string())]);
    safetensors::write(&path, &refs, &metadata, false).unwrap();

    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.names().collect::<Vec<_>>(), ["b16", "empty", "h16", "scalar", "w32"]);
    assert_eq!(ckpt.metadata(), &metadata);
    assert_eq!(ckpt.file_size(), std::fs::metadata(&path).unwrap().len());
    for (name, t) in &tensors {
        assert_eq!(&ckpt.read(name).unwrap(), t, "{name}");
    }

    // The reference parser agrees on every byte: the file is standard safetensors.
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!(header_len % 8, 0, "data section should start aligned");
    let reference = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = reference.tensor("w32").unwrap();
    assert_eq!(view.dtype(), ::safetensors::Dtype::F32);
    assert_eq!(view.shape(), [2, 3]);
    assert_eq!(view.data(), f32_le(&[1.0, -2.5, 3.25, 0.0, 1e-8, -7.0]));
    let view = reference.tensor("b16").unwrap();
    assert_eq!(view.dtype(), ::safetensors::Dtype::BF16);
    // bf16 1.5 = 0x3FC0, -2.0 = 0xC000, 0.125 = 0x3E00, little endian.
    assert_eq!(view.data(), [0xC0, 0x3F, 0x00, 0xC0, 0x00, 0x3E]);
    let (_, meta) = ::safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["note"], "\"quoted\" ü");
}

#[test]
fn write_refuses_an_existing_file_unless_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "taken.safetensors", b"precious");
    let t = HostTensor::from_f32(vec![1], vec![1.0]);
    let msg = message(safetensors::write(&path, &[("t", &t)], &BTreeMap::new(), false), &path.display().to_string());
    assert!(msg.contains("--overwrite"), "{msg}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");

    safetensors::write(&path, &[("t", &t)], &BTreeMap::new(), true).unwrap();
    assert_eq!(Checkpoint::open(&path).unwrap().read("t").unwrap(), t);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, ["taken.safetensors"], "the temp file must be gone");
}

#[test]
fn write_refuses_repeated_or_reserved_names_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dup.safetensors");
    let t = HostTensor::from_f32(vec![1], vec![1.0]);
    let shown = path.display().to_string();
    let msg = message(safetensors::write(&path, &[("a", &t), ("a", &t)], &BTreeMap::new(), false), &shown);
    assert!(msg.contains("'a'"), "{msg}");
    let msg = message(safetensors::write(&path, &[("__metadata__", &t)], &BTreeMap::new(), false), &shown);
    assert!(msg.contains("reserved"), "{msg}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn data_at_an_odd_offset_decodes_correctly() {
    // 8 + 41 = 49: every tensor starts at an odd address in the map.
    let header = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[12,16]}}"#;
    let header = format!("{header:<121}");
    assert_eq!((8 + header.len()) % 2, 1);
    let mut data = f32_le(&[1.5, -3.0, 1e30]);
    data.extend([0x80, 0x3F, 0x00, 0xC1]); // bf16 1.0, -8.0
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "odd.safetensors", &raw(&header, &data));
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.read("a").unwrap().to_f32(), [1.5, -3.0, 1e30]);
    assert_eq!(ckpt.read("b").unwrap().to_f32(), [1.0, -8.0]);
    assert_eq!(ckpt.info("b").unwrap().data_offsets(), 12..16);
}

#[test]
fn other_dtypes_open_but_do_not_load() {
    let header = r#"{"ids":{"dtype":"I32","shape":[2],"data_offsets":[0,8]},"fp8":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[8,10]}}"#;
    let ckpt = Checkpoint::from_bytes("mixed.safetensors", raw(header, &[0; 10])).unwrap();
    assert_eq!(ckpt.info("fp8").unwrap().dtype, FileDType::F8_E4M3);
    let msg = message(ckpt.read("fp8"), "mixed.safetensors");
    assert!(msg.contains("'fp8'") && msg.contains("F8_E4M3"), "{msg}");
    let msg = message(ckpt.read("ids"), "mixed.safetensors");
    assert!(msg.contains("'ids'") && msg.contains("I32"), "{msg}");
    let msg = message(ckpt.read("nope"), "mixed.safetensors");
    assert!(msg.contains("'nope'"), "{msg}");
}

#[test]
fn an_empty_header_is_a_valid_empty_file() {
    let ckpt = Checkpoint::from_bytes("e", raw("{}", &[])).unwrap();
    assert!(ckpt.is_empty());
    assert!(ckpt.metadata().is_empty());
}

fn t(name: &str, dtype: &str, shape: &str, begin: usize, end: usize) -> String {
    format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{begin},{end}]}}"#)
}

#[test]
fn malformed_files_are_errors_naming_the_file() {
    let valid = f32_file(&[("a", &[2], &[1.0, 2.0]), ("b", &[1], &[3.0])], &[]);
    let mut json_text = br#"{"not": "a safetensors file", "but": "JSON"}"#.to_vec();
    json_text.extend([b' '; 100]);
    let random: Vec<u8> = (0u32..300).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let mut not_utf8 = raw(r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#, &[]);
    not_utf8[10] = 0xFF;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("zero bytes", vec![], "the file is 0 bytes"),
        ("shorter than the length", vec![1, 0, 0], "the file is 3 bytes"),
        ("truncated", valid[..valid.len() - 2].to_vec(), "truncated"),
        (
            "header past the end",
            {
                let mut b = 1_234_567_890u64.to_le_bytes().to_vec();
                b.resize(200, b' ');
                b
            },
            "header length 1234567890 exceeds the file (200 bytes)",
        ),
        ("a JSON file", json_text, "exceeds the file"),
        ("random bytes", random, "exceeds the file"),
        (
            "gap",
            raw(&format!("{{{},{}}}", t("a", "F32", "[1]", 0, 4), t("b", "F32", "[1]", 8, 12)), &[0; 12]),
            "4 bytes of unclaimed data before tensor 'b'",
        ),
        (
            "overlap",
            raw(&format!("{{{},{}}}", t("a", "F32", "[2]", 0, 8), t("b", "F32", "[2]", 4, 12)), &[0; 12]),
            "tensor 'b' (data_offsets [4, 12]) overlaps",
        ),
        (
            "size mismatch",
            raw(&format!("{{{}}}", t("a", "F32", "[3]", 0, 8)), &[0; 8]),
            "tensor 'a' is F32 [3] (12 bytes) but data_offsets [0, 8] hold 8 bytes",
        ),
        ("reversed offsets", raw(&format!("{{{}}}", t("a", "F32", "[0]", 4, 0)), &[0; 4]), "end before they begin"),
        ("duplicate key", raw(&format!("{{{},{}}}", t("a", "F32", "[1]", 0, 4), t("a", "F32", "[1]", 4, 8)), &[0; 8]), "duplicate key 'a'"),
        ("duplicate metadata key", raw(r#"{"__metadata__":{"k":"1","k":"2"}}"#, &[]), "duplicate key 'k'"),
        ("metadata not strings", raw(r#"{"__metadata__":{"k":1}}"#, &[]), "__metadata__ must map strings to strings"),
        ("unknown dtype", raw(&format!("{{{}}}", t("a", "F99", "[1]", 0, 4)), &[0; 4]), "tensor 'a' has unknown dtype 'F99'"),
        (
            "unknown field",
            raw(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}}"#, &[0; 4]),
            "tensor 'a': unknown field `extra`",
        ),
        ("negative dim", raw(&format!("{{{}}}", t("a", "F32", "[-1]", 0, 4)), &[0; 4]), "tensor 'a'"),
        ("non-UTF-8", not_utf8, "header is not UTF-8"),
        ("non-object JSON", raw("[1, 2]", &[]), "header is not a JSON object"),
        ("trailing garbage", [valid.clone(), vec![9, 9, 9]].concat(), "3 bytes of trailing data after the last tensor"),
        ("overflowing shape", raw(&format!("{{{}}}", t("a", "F32", "[4611686018427387904,4]", 0, 0)), &[]), "too large to address"),
        (
            "overflow hidden by a zero dim",
            raw(&format!("{{{}}}", t("a", "F32", "[4611686018427387904,4,0]", 0, 0)), &[]),
            "too large to address",
        ),
        ("sub-byte dtype", raw(&format!("{{{}}}", t("a", "F4", "[3]", 0, 2)), &[0; 2]), "does not fill whole bytes"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (label, bytes, fragment) in cases {
        let path = write_file(dir.path(), "case.safetensors", &bytes);
        let shown = path.display().to_string();
        let msg = message(Checkpoint::open(&path), &shown);
        assert!(msg.contains(fragment), "{label}: '{fragment}' not in: {msg}");
        // The in-memory path validates identically.
        let msg = message(Checkpoint::from_bytes("mem", bytes), "mem");
        assert!(msg.contains(fragment), "{label} (from_bytes): {msg}");
    }
}

#[test]
fn header_over_the_limit_is_refused_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.safetensors");
    let mut file = std::fs::File::create(&path).unwrap();
    std::io::Write::write_all(&mut file, &100_000_001u64.to_le_bytes()).unwrap();
    // Sparse: the length fits the file, so only the cap can refuse it.
    file.set_len(8 + 100_000_001).unwrap();
    let msg = message(Checkpoint::open(&path), &path.display().to_string());
    assert!(msg.contains("header length 100000001 exceeds the limit of 100000000 bytes"), "{msg}");
}

#[test]
fn opening_a_missing_file_or_a_directory_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.safetensors");
    let msg = message(Checkpoint::open(&missing), &missing.display().to_string());
    assert!(msg.contains("cannot open"), "{msg}");
    let msg = message(Checkpoint::open(dir.path()), &dir.path().display().to_string());
    assert!(msg.contains("not a regular file"), "{msg}");
}
