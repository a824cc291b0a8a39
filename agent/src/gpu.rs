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
    pub utilization_percent: u32,
    pub memory_used_bytes: u64,
    pub power_watts: f64,
}

pub trait GpuProbe: Send + Sync {
    fn inventory(&self) -> GpuInventory;
    /// Current readings; a GPU that cannot be read is left out.
    fn sample(&self) -> Vec<GpuSample>;
}

/// The metric points a set of GPU samples becomes, named `system/gpu<index>/<what>`.
pub fn sample_points(samples: &[GpuSample]) -> Vec<(String, f64)> {
    samples
        .iter()
        .flat_map(|s| {
            [
                (
                    format!("system/gpu{}/utilization_percent", s.index),
                    s.utilization_percent as f64,
                ),
                (
                    format!("system/gpu{}/memory_used_bytes", s.index),
                    s.memory_used_bytes as f64,
                ),
                (format!("system/gpu{}/power_watts", s.index), s.power_watts),
            ]
        })
        .collect()
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
        RecordedProbe {
            inventory: GpuInventory {
                cuda_driver_version: format_cuda_version(12040),
                gpus: vec![v1::GpuInfo {
                    index: 0,
                    name: "NVIDIA H100 80GB HBM3".into(),
                    uuid: "GPU-5b3b0f4e-6c1a-3d2e-9f7a-1c2d3e4f5a6b".into(),
                    memory_bytes: 85_520_809_984,
                }],
                probe_error: String::new(),
            },
            samples: vec![GpuSample {
                index: 0,
                utilization_percent: 97,
                memory_used_bytes: 61_203_267_584,
                power_watts: 612_431.0 / 1000.0,
            }],
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
        assert_eq!(
            points,
            vec![
                ("system/gpu0/utilization_percent".to_string(), 97.0),
                (
                    "system/gpu0/memory_used_bytes".to_string(),
                    61_203_267_584.0
                ),
                ("system/gpu0/power_watts".to_string(), 612.431),
            ]
        );
    }

    #[test]
    fn cuda_versions() {
        assert_eq!(format_cuda_version(12040), "12.4");
        assert_eq!(format_cuda_version(11080), "11.8");
        assert_eq!(format_cuda_version(12000), "12.0");
    }
}
