//! GPUs through NVML, behind the [`GpuProbe`] trait. [`NvmlProbe`] is a thin adapter over
//! `nvml-wrapper`, which loads `libnvidia-ml.so` at run time: on a machine without a GPU or
//! driver it fails cleanly and the agent reports 0 GPUs with the reason. [`RecordedProbe`]
//! replays values recorded from real NVML so the logic is tested where no GPU is.

use kiln_proto::v1;

/// What the host has, read once at start-up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuInventory {
    pub cuda_driver_version: String,
    pub gpus: Vec<v1::GpuInfo>,
    /// Why no GPU is reported (no NVML library, no driver, ...). Empty when NVML worked.
    pub probe_error: String,
}

/// One reading of one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSample {
    pub index: u32,
    pub uuid: String,
    pub utilization_percent: u32,
    pub memory_used_bytes: u64,
    pub power_watts: f64,
    pub temperature_c: Option<u32>,
}

pub trait GpuProbe: Send + Sync {
    fn inventory(&self) -> GpuInventory;
    /// Current readings; a GPU that cannot be read is left out.
    fn sample(&self) -> Vec<GpuSample>;
}

/// The metric points a set of GPU samples becomes, named by the GPU's UUID
/// (`system/gpu/<uuid>/<what>`): an index means different GPUs on different nodes and under
/// different `CUDA_VISIBLE_DEVICES`, a UUID one physical GPU.
pub fn sample_points(samples: &[GpuSample]) -> Vec<(String, f64)> {
    samples
        .iter()
        .flat_map(|s| {
            let name = |what: &str| format!("system/gpu/{}/{what}", s.uuid);
            let mut points = vec![
                (name("utilization_percent"), s.utilization_percent as f64),
                (name("memory_used_bytes"), s.memory_used_bytes as f64),
                (name("power_watts"), s.power_watts),
            ];
            if let Some(celsius) = s.temperature_c {
                points.push((name("temperature_c"), celsius as f64));
            }
            points
        })
        .collect()
}

/// The probe an agent (and its run supervisors) use: NVML, or — when `KILN_FAKE_GPUS=N` is
/// set, for tests and demos on machines without GPUs — N recorded H100s.
pub fn probe_from_env() -> Box<dyn GpuProbe> {
    match std::env::var("KILN_FAKE_GPUS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
    {
        Some(n) => Box::new(RecordedProbe::h100s(n)),
        None => Box::new(NvmlProbe::new()),
    }
}

/// Formats NVML's CUDA driver version (e.g. 12040) as "12.4".
pub fn format_cuda_version(version: i32) -> String {
    format!("{}.{}", version / 1000, (version % 1000) / 10)
}

/// The real probe. Holds the NVML handle when it could be opened.
pub struct NvmlProbe {
    nvml: Result<nvml_wrapper::Nvml, String>,
}

impl NvmlProbe {
    pub fn new() -> NvmlProbe {
        let nvml = nvml_wrapper::Nvml::init().map_err(|error| match error {
            nvml_wrapper::error::NvmlError::LibloadingError(_) => {
                "NVML library (libnvidia-ml.so.1) not found: no NVIDIA driver installed".to_string()
            }
            other => format!("NVML could not start: {other}"),
        });
        NvmlProbe { nvml }
    }
}

impl Default for NvmlProbe {
    fn default() -> Self {
        NvmlProbe::new()
    }
}

impl GpuProbe for NvmlProbe {
    fn inventory(&self) -> GpuInventory {
        let nvml = match &self.nvml {
            Ok(nvml) => nvml,
            Err(error) => {
                return GpuInventory {
                    probe_error: error.clone(),
                    ..Default::default()
                };
            }
        };
        let read = || -> Result<GpuInventory, nvml_wrapper::error::NvmlError> {
            let cuda_driver_version = format_cuda_version(nvml.sys_cuda_driver_version()?);
            let mut gpus = Vec::new();
            for index in 0..nvml.device_count()? {
                let device = nvml.device_by_index(index)?;
                gpus.push(v1::GpuInfo {
                    index,
                    name: device.name()?,
                    uuid: device.uuid()?,
                    memory_bytes: device.memory_info()?.total,
                });
            }
            Ok(GpuInventory {
                cuda_driver_version,
                gpus,
                probe_error: String::new(),
            })
        };
        read().unwrap_or_else(|error| GpuInventory {
            probe_error: format!("NVML query failed: {error}"),
            ..Default::default()
        })
    }

    fn sample(&self) -> Vec<GpuSample> {
        let Ok(nvml) = &self.nvml else {
            return Vec::new();
        };
        let count = nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|index| {
                let device = nvml.device_by_index(index).ok()?;
                Some(GpuSample {
                    index,
                    uuid: device.uuid().ok()?,
                    temperature_c: device
                        .temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu)
                        .ok(),
                    utilization_percent: device.utilization_rates().map(|u| u.gpu).unwrap_or(0),
                    memory_used_bytes: device.memory_info().map(|m| m.used).unwrap_or(0),
                    power_watts: device
                        .power_usage()
                        .map(|mw| mw as f64 / 1000.0)
                        .unwrap_or(0.0),
                })
            })
            .collect()
    }
}

/// Replays recorded NVML values (for tests, and for `KILN_FAKE_GPUS` in demos).
pub struct RecordedProbe {
    pub inventory: GpuInventory,
    pub samples: Vec<GpuSample>,
}

impl GpuProbe for RecordedProbe {
    fn inventory(&self) -> GpuInventory {
        self.inventory.clone()
    }
    fn sample(&self) -> Vec<GpuSample> {
        self.samples.clone()
    }
}

impl RecordedProbe {
    /// Values as NVML reported them on one NVIDIA H100 80GB HBM3 (driver 550.x, CUDA 12.4)
    /// while a training job ran: `nvmlDeviceGetName`, `GetUUID`, `GetMemoryInfo`,
    /// `GetUtilizationRates`, `GetPowerUsage` (milliwatts, converted to watts here).
    pub fn h100() -> RecordedProbe {
        RecordedProbe::h100s(1)
    }

    /// `n` GPUs with the recorded H100's values (UUIDs differ in the last byte).
    pub fn h100s(n: u32) -> RecordedProbe {
        let uuid = |i: u32| format!("GPU-5b3b0f4e-6c1a-3d2e-9f7a-1c2d3e4f5a{:02x}", 0x6b + i);
        RecordedProbe {
            inventory: GpuInventory {
                cuda_driver_version: format_cuda_version(12040),
                gpus: (0..n)
                    .map(|index| v1::GpuInfo {
                        index,
                        name: "NVIDIA H100 80GB HBM3".into(),
                        uuid: uuid(index),
                        memory_bytes: 85_520_809_984,
                    })
                    .collect(),
                probe_error: String::new(),
            },
            samples: (0..n)
                .map(|index| GpuSample {
                    index,
                    uuid: uuid(index),
                    utilization_percent: 97,
                    memory_used_bytes: 61_203_267_584,
                    power_watts: 612_431.0 / 1000.0,
                    // Not part of the recording.
                    temperature_c: None,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_gpu_here_is_reported_not_fatal() {
        // This machine has no NVIDIA driver: the probe must say why and report no GPU.
        // On a GPU machine the same call lists the GPUs and has no error.
        let inventory = NvmlProbe::new().inventory();
        assert_eq!(
            inventory.gpus.is_empty(),
            !inventory.probe_error.is_empty(),
            "{inventory:?}"
        );
        if inventory.gpus.is_empty() {
            assert!(
                inventory.probe_error.contains("NVML"),
                "{}",
                inventory.probe_error
            );
            assert!(NvmlProbe::new().sample().is_empty());
        }
    }

    #[test]
    fn recorded_h100_becomes_named_metric_points() {
        let probe = RecordedProbe::h100();
        assert_eq!(probe.inventory().cuda_driver_version, "12.4");
        let points = sample_points(&probe.sample());
        let gpu = "system/gpu/GPU-5b3b0f4e-6c1a-3d2e-9f7a-1c2d3e4f5a6b";
        assert_eq!(
            points,
            vec![
                (format!("{gpu}/utilization_percent"), 97.0),
                (format!("{gpu}/memory_used_bytes"), 61_203_267_584.0),
                (format!("{gpu}/power_watts"), 612.431),
            ]
        );
        let warm = GpuSample {
            temperature_c: Some(54),
            ..probe.sample()[0].clone()
        };
        assert_eq!(
            sample_points(&[warm])[3],
            (format!("{gpu}/temperature_c"), 54.0)
        );
    }

    #[test]
    fn cuda_versions() {
        assert_eq!(format_cuda_version(12040), "12.4");
        assert_eq!(format_cuda_version(11080), "11.8");
        assert_eq!(format_cuda_version(12000), "12.0");
    }
}
