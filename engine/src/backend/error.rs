//! Errors of the backends that callers act on, by type rather than by message: an op that ran
//! out of device memory (`upscale` retries with a smaller tile).

/// Device out of memory, as a typed error so callers (tiled upscaling) can retry smaller.
#[derive(Debug)]
pub struct DeviceOutOfMemory {
    pub bytes: usize,
}

impl std::fmt::Display for DeviceOutOfMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GPU out of memory allocating {:.1} MiB", self.bytes as f64 / (1 << 20) as f64)
    }
}

impl std::error::Error for DeviceOutOfMemory {}
