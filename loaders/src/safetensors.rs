//! safetensors files: a strict reader over mmap and an atomic writer.
//!
//! Format: `u64` LE header length `n`, `n` bytes of UTF-8 JSON, then the data section. The JSON
//! maps tensor names to `{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the data
//! section) plus an optional `__metadata__` string map.
//!
//! Decisions a reader would otherwise have to reverse-engineer:
//! - Validation is at least as strict as the reference crate (header cap, UTF-8, offsets sorted,
//!   contiguous, sizes exact, no trailing bytes) and stricter in two ways: a key repeated in the
//!   header is an error (serde_json would silently keep the last one, so two tools could disagree
//!   on what the file holds), and a shape whose non-zero dimensions overflow `usize` is rejected
//!   even when another dimension is zero, so no later product over a sub-shape can overflow.
//! - All of it happens at open, so `read` only slices bytes that are known to exist.
//! - Data sits at an arbitrary alignment inside the map; elements are decoded with
//!   `from_le_bytes`, never by reinterpreting the bytes in place.
//! - The map stays valid only while nobody truncates the file in place (that would raise SIGBUS
//!   on access, which no reader can turn into an error). `write` never does that: it renames a
//!   complete temp file over the target.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::marker::PhantomData;
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::atomic::write_atomic;
use crate::error::{Error, Result};
use crate::tensor::{DType, HostData, HostTensor};

/// The reference implementation's cap: larger headers are refused before they are parsed.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

const METADATA_KEY: &str = "__metadata__";

/// Every element type the format defines (safetensors 0.8), so that a file holding fp8 or
/// integer tensors opens and its other tensors stay readable; only `read` refuses them.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileDType {
    BOOL,
    F4,
    F6_E2M3,
    F6_E3M2,
    U8,
    I8,
    F8_E5M2,
    F8_E4M3,
    F8_E8M0,
    F8_E4M3FNUZ,
    F8_E5M2FNUZ,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    C64,
    F64,
    I64,
    U64,
}

impl FileDType {
    const ALL: [FileDType; 22] = [
        FileDType::BOOL,
        FileDType::F4,
        FileDType::F6_E2M3,
        FileDType::F6_E3M2,
        FileDType::U8,
        FileDType::I8,
        FileDType::F8_E5M2,
        FileDType::F8_E4M3,
        FileDType::F8_E8M0,
        FileDType::F8_E4M3FNUZ,
        FileDType::F8_E5M2FNUZ,
        FileDType::I16,
        FileDType::U16,
        FileDType::F16,
        FileDType::BF16,
        FileDType::I32,
        FileDType::U32,
        FileDType::F32,
        FileDType::C64,
        FileDType::F64,
        FileDType::I64,
        FileDType::U64,
    ];

    /// The spelling used in the header.
    pub fn name(self) -> &'static str {
        match self {
            FileDType::BOOL => "BOOL",
            FileDType::F4 => "F4",
            FileDType::F6_E2M3 => "F6_E2M3",
            FileDType::F6_E3M2 => "F6_E3M2",
            FileDType::U8 => "U8",
            FileDType::I8 => "I8",
            FileDType::F8_E5M2 => "F8_E5M2",
            FileDType::F8_E4M3 => "F8_E4M3",
            FileDType::F8_E8M0 => "F8_E8M0",
            FileDType::F8_E4M3FNUZ => "F8_E4M3FNUZ",
            FileDType::F8_E5M2FNUZ => "F8_E5M2FNUZ",
            FileDType::I16 => "I16",
            FileDType::U16 => "U16",
            FileDType::F16 => "F16",
            FileDType::BF16 => "BF16",
            FileDType::I32 => "I32",
            FileDType::U32 => "U32",
            FileDType::F32 => "F32",
            FileDType::C64 => "C64",
            FileDType::F64 => "F64",
            FileDType::I64 => "I64",
            FileDType::U64 => "U64",
        }
    }

    pub fn from_name(name: &str) -> Option<FileDType> {
        FileDType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bits per element: the MX formats pack elements below a byte.
    pub fn bits(self) -> usize {
        match self {
            FileDType::F4 => 4,
            FileDType::F6_E2M3 | FileDType::F6_E3M2 => 6,
            FileDType::BOOL
            | FileDType::U8
            | FileDType::I8
            | FileDType::F8_E5M2
            | FileDType::F8_E4M3
            | FileDType::F8_E8M0
            | FileDType::F8_E4M3FNUZ
            | FileDType::F8_E5M2FNUZ => 8,
            FileDType::I16 | FileDType::U16 | FileDType::F16 | FileDType::BF16 => 16,
            FileDType::I32 | FileDType::U32 | FileDType::F32 => 32,
            FileDType::C64 | FileDType::F64 | FileDType::I64 | FileDType::U64 => 64,
        }
    }

    /// The host dtype this file dtype loads as, for the three the engine computes with.
    pub fn stored(self) -> Option<DType> {
        match self {
            FileDType::F32 => Some(DType::F32),
            FileDType::F16 => Some(DType::F16),
            FileDType::BF16 => Some(DType::BF16),
            _ => None,
        }
    }
}

impl From<DType> for FileDType {
    fn from(d: DType) -> FileDType {
        match d {
            DType::F32 => FileDType::F32,
            DType::F16 => FileDType::F16,
            DType::BF16 => FileDType::BF16,
        }
    }
}

impl fmt::Display for FileDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's entry in the header, validated against the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: FileDType,
    pub shape: Vec<usize>,
    range: Range<usize>,
}

impl TensorInfo {
    /// The byte range inside the data section (the header's `data_offsets`).
    pub fn data_offsets(&self) -> Range<usize> {
        self.range.clone()
    }

    /// Number of elements (cannot overflow: checked at open).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// `true` when the product of the non-zero dimensions fits in `usize`: then the element count
/// and the product over any subset of dimensions can be computed without overflow.
pub(crate) fn shape_fits(shape: &[usize]) -> bool {
    shape.iter().filter(|&&d| d != 0).try_fold(1usize, |acc, &d| acc.checked_mul(d)).is_some()
}

/// Where the bytes live: a file map, or a buffer handed to `from_bytes`.
#[derive(Clone)]
enum Bytes {
    Mapped(Arc<memmap2::Mmap>),
    Owned(Arc<[u8]>),
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(b) => b,
        }
    }
}

/// An open safetensors file. Cloning shares the map.
#[derive(Clone)]
pub struct Checkpoint {
    path: PathBuf,
    bytes: Bytes,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("file_size", &self.bytes.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Maps the file and validates its header; tensor data is touched only by `read`.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
        if !meta.is_file() {
            return Err(Error::invalid(path, "not a regular file"));
        }
        // Safety: the map is read-only and private to us. Another process truncating the file
        // in place would fault on access; see the module comment.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, "mmap", e))?;
        Checkpoint::parse(path.to_path_buf(), Bytes::Mapped(Arc::new(map)))
    }

    /// The same validation as `open`, over bytes already in memory; `name` stands in for the
    /// path in messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Checkpoint> {
        Checkpoint::parse(PathBuf::from(name), Bytes::Owned(bytes.into()))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<Checkpoint> {
        let (data_start, tensors, metadata) = parse_header(&bytes).map_err(|reason| Error::malformed(&path, reason))?;
        Ok(Checkpoint { path, bytes, data_start, tensors, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The header's `__metadata__` (empty when absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn file_size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Copies one tensor out of the file in its stored dtype. Only F32, F16 and BF16 can be
    /// read; other dtypes are an error naming the tensor and its dtype.
    pub fn read(&self, name: &str) -> Result<HostTensor> {
        let info = self.tensors.get(name).ok_or_else(|| Error::invalid(&self.path, format!("no tensor named '{name}'")))?;
        let dtype = info.dtype.stored().ok_or_else(|| {
            Error::invalid(&self.path, format!("tensor '{name}' has dtype {}; only F32, F16 and BF16 can be loaded", info.dtype))
        })?;
        let range = self.data_start + info.range.start..self.data_start + info.range.end;
        let bytes = &self.bytes[range.clone()];
        let data = match dtype {
            DType::F32 => HostData::F32(decode(bytes, f32::from_le_bytes)),
            DType::F16 => HostData::F16(decode(bytes, |b| f16::from_bits(u16::from_le_bytes(b)))),
            DType::BF16 => HostData::BF16(decode(bytes, |b| bf16::from_bits(u16::from_le_bytes(b)))),
        };
        #[cfg(unix)]
        if let Bytes::Mapped(map) = &self.bytes {
            // The copy is all the caller keeps: handing the file's pages back makes a load that
            // streams a checkpoint one tensor at a time hold one tensor, not the whole file, in
            // resident memory. A failed advice only costs memory.
            // SAFETY: the map is read-only and never written, so a page dropped here (or one it
            // shares with a neighbouring tensor) refaults with the file's unchanged bytes.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len()) };
        }
        Ok(HostTensor::new(info.shape.clone(), data))
    }

    /// Copies one F64 or F32 tensor out as f64, with its shape: the parameters of statistical
    /// models (NIQE's covariance, BRISQUE's support vector machine), whose digits matter. Other
    /// dtypes are an error naming the tensor and its dtype.
    pub fn read_f64(&self, name: &str) -> Result<(Vec<usize>, Vec<f64>)> {
        let info = self.tensors.get(name).ok_or_else(|| Error::invalid(&self.path, format!("no tensor named '{name}'")))?;
        let bytes = &self.bytes[self.data_start + info.range.start..self.data_start + info.range.end];
        let data = match info.dtype {
            FileDType::F64 => decode(bytes, f64::from_le_bytes),
            FileDType::F32 => decode(bytes, f32::from_le_bytes).into_iter().map(f64::from).collect(),
            other => return Err(Error::invalid(&self.path, format!("tensor '{name}' has dtype {other}; expected F64 or F32"))),
        };
        Ok((info.shape.clone(), data))
    }
}

fn decode<T, const N: usize>(bytes: &[u8], from: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes.chunks_exact(N).map(|c| from(c.try_into().expect("chunks_exact yields N-byte chunks"))).collect()
}

/// The header of one tensor as written; checked against the file by `parse_header`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensorInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

type Header = (usize, BTreeMap<String, TensorInfo>, BTreeMap<String, String>);

/// Validates everything about the file that does not need the tensor values. Returns the data
/// section's start, the tensors and the metadata, or the reason the bytes are not a file.
fn parse_header(bytes: &[u8]) -> std::result::Result<Header, String> {
    let file_len = bytes.len();
    let Some(len_bytes) = bytes.first_chunk::<8>() else {
        return Err(format!("the file is {file_len} bytes, too short for the 8-byte header length"));
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    let room = (file_len - 8) as u64;
    if header_len > room {
        return Err(format!("header length {header_len} exceeds the file ({file_len} bytes)"));
    }
    if header_len > MAX_HEADER_LEN {
        return Err(format!("header length {header_len} exceeds the limit of {MAX_HEADER_LEN} bytes"));
    }
    // Both fit: header_len <= file_len - 8.
    let data_start = 8 + header_len as usize;
    let text = std::str::from_utf8(&bytes[8..data_start]).map_err(|e| format!("header is not UTF-8: {e}"))?;
    let entries: OrderedMap<&RawValue> = serde_json::from_str(text).map_err(|e| format!("header is not a JSON object: {e}"))?;

    let mut metadata = BTreeMap::new();
    let mut tensors = BTreeMap::new();
    for (key, raw) in entries.0 {
        if key == METADATA_KEY {
            let map: OrderedMap<String> =
                serde_json::from_str(raw.get()).map_err(|e| format!("{METADATA_KEY} must map strings to strings: {e}"))?;
            metadata = map.0.into_iter().collect();
            continue;
        }
        let info = tensor_info(&key, raw)?;
        tensors.insert(key, info);
    }

    let data_len = file_len - data_start;
    let mut by_offset: Vec<(&String, &TensorInfo)> = tensors.iter().collect();
    by_offset.sort_by_key(|(_, info)| (info.range.start, info.range.end));
    let mut end = 0;
    for (name, info) in by_offset {
        let Range { start, end: stop } = info.range;
        if start > end {
            return Err(format!("{} bytes of unclaimed data before tensor '{name}' (data_offsets [{start}, {stop}])", start - end));
        }
        if start < end {
            return Err(format!("tensor '{name}' (data_offsets [{start}, {stop}]) overlaps the tensor ending at byte {end}"));
        }
        if stop > data_len {
            return Err(format!("tensor '{name}' ends at byte {stop} of a {data_len}-byte data section (truncated file?)"));
        }
        end = stop;
    }
    if end != data_len {
        return Err(format!("{} bytes of trailing data after the last tensor", data_len - end));
    }
    Ok((data_start, tensors, metadata))
}

fn tensor_info(name: &str, raw: &RawValue) -> std::result::Result<TensorInfo, String> {
    let entry: RawTensorInfo = serde_json::from_str(raw.get()).map_err(|e| format!("tensor '{name}': {e}"))?;
    let dtype = FileDType::from_name(&entry.dtype).ok_or_else(|| format!("tensor '{name}' has unknown dtype '{}'", entry.dtype))?;
    let [start, stop] = entry.data_offsets;
    let shape = entry.shape;
    if stop < start {
        return Err(format!("tensor '{name}' has data_offsets [{start}, {stop}] that end before they begin"));
    }
    let bits = shape_fits(&shape)
        .then(|| shape.iter().product::<usize>())
        .and_then(|n| n.checked_mul(dtype.bits()))
        .ok_or_else(|| format!("tensor '{name}' has shape {shape:?}, too large to address"))?;
    if bits % 8 != 0 {
        return Err(format!("tensor '{name}' ({dtype} {shape:?}) does not fill whole bytes"));
    }
    if stop - start != bits / 8 {
        return Err(format!(
            "tensor '{name}' is {dtype} {shape:?} ({} bytes) but data_offsets [{start}, {stop}] hold {} bytes",
            bits / 8,
            stop - start
        ));
    }
    Ok(TensorInfo { dtype, shape, range: start..stop })
}

/// A JSON object in file order, refusing repeated keys (serde_json alone keeps the last).
pub(crate) struct OrderedMap<V>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct MapVisitor<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for MapVisitor<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
                let mut seen = HashSet::new();
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format_args!("duplicate key '{key}'")));
                    }
                    entries.push((key, map.next_value()?));
                }
                Ok(OrderedMap(entries))
            }
        }
        deserializer.deserialize_map(MapVisitor(PhantomData))
    }
}

/// Writes a safetensors file atomically: into a temp file beside `path`, fsync, rename over
/// `path`, fsync the directory. A crash leaves either the old file or the new one, never half
/// of one. An existing `path` is an error unless `overwrite`.
pub fn write(path: &Path, tensors: &[(&str, &HostTensor)], metadata: &BTreeMap<String, String>, overwrite: bool) -> Result<()> {
    if !overwrite && path.exists() {
        return Err(Error::Exists { path: path.to_path_buf() });
    }
    let header = header_json(tensors, metadata).map_err(|reason| Error::invalid(path, reason))?;
    write_atomic(path, overwrite, |out| {
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(header.as_bytes())?;
        for (_, t) in tensors {
            match &t.data {
                HostData::F32(v) => write_le(out, v, |x| x.to_le_bytes())?,
                HostData::F16(v) => write_le(out, v, |x| x.to_bits().to_le_bytes())?,
                HostData::BF16(v) => write_le(out, v, |x| x.to_bits().to_le_bytes())?,
            }
        }
        Ok(())
    })
}

/// The JSON header, padded with spaces to a multiple of 8 bytes so that the data section starts
/// aligned (as the reference writer does). Errors name the offending tensor.
fn header_json(tensors: &[(&str, &HostTensor)], metadata: &BTreeMap<String, String>) -> std::result::Result<String, String> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert(METADATA_KEY.into(), serde_json::to_value(metadata).map_err(|e| e.to_string())?);
    }
    let mut offset = 0usize;
    for (name, t) in tensors {
        if *name == METADATA_KEY {
            return Err(format!("'{METADATA_KEY}' is reserved and cannot name a tensor"));
        }
        let end = offset + t.len() * t.dtype().size();
        let entry = serde_json::json!({
            "dtype": FileDType::from(t.dtype()).name(),
            "shape": t.shape,
            "data_offsets": [offset, end],
        });
        if map.insert((*name).to_string(), entry).is_some() {
            return Err(format!("tensor '{name}' is given twice"));
        }
        offset = end;
    }
    let mut json = serde_json::Value::Object(map).to_string();
    let padded = json.len().next_multiple_of(8);
    json.extend(std::iter::repeat_n(' ', padded - json.len()));
    Ok(json)
}

fn write_le<T, const N: usize>(out: &mut impl Write, data: &[T], to_le: impl Fn(&T) -> [u8; N]) -> std::io::Result<()> {
    // Chunked so that a multi-GB tensor is never duplicated as bytes in memory.
    let mut buf = Vec::with_capacity(1 << 16);
    for chunk in data.chunks((1 << 16) / N) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(&to_le));
        out.write_all(&buf)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_cross_threads() {
        // The engine loads tensors from worker threads; losing this would be an API break.
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Checkpoint>();
        send_sync::<crate::flux::FluxCheckpoint>();
        send_sync::<crate::lora::LoraAdapter>();
    }

    #[test]
    fn shape_fits_ignores_zero_dims_but_not_overflow() {
        assert!(shape_fits(&[]));
        assert!(shape_fits(&[0, usize::MAX]));
        assert!(!shape_fits(&[1 << 62, 4, 0]));
        assert!(!shape_fits(&[0, 1 << 62, 4]));
    }

    #[test]
    fn dtype_names_round_trip_and_sizes_match_the_format() {
        for d in FileDType::ALL {
            assert_eq!(FileDType::from_name(d.name()), Some(d));
        }
        assert_eq!(FileDType::from_name("f32"), None);
        assert_eq!((FileDType::BF16.bits(), FileDType::F8_E4M3.bits(), FileDType::C64.bits()), (16, 8, 64));
        assert_eq!(FileDType::I32.stored(), None);
        assert_eq!(FileDType::BF16.stored(), Some(DType::BF16));
    }

    #[test]
    fn header_is_padded_to_eight_bytes() {
        let t = HostTensor::from_f32(vec![1], vec![1.0]);
        for name in ["a", "ab", "abc", "abcdefgh"] {
            let json = header_json(&[(name, &t)], &BTreeMap::new()).unwrap();
            assert_eq!(json.len() % 8, 0, "{json:?}");
            assert_eq!(json.trim_end(), format!(r#"{{"{name}":{{"data_offsets":[0,4],"dtype":"F32","shape":[1]}}}}"#));
        }
    }
}
