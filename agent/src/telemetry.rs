//! What the agent knows about its host (reported at registration) and the system metrics it
//! samples for each run: CPU and resident memory of the run's whole process tree.

use std::collections::HashSet;

use kiln_proto::v1;
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

use crate::gpu::GpuProbe;

pub fn host_info(hostname: Option<&str>, gpus: &dyn GpuProbe) -> v1::HostInfo {
    let mut system = System::new();
    system.refresh_memory();
    let inventory = gpus.inventory();
    let os = match (System::name(), System::os_version()) {
        (Some(name), Some(version)) => format!("{name} {version}"),
        (Some(name), None) => name,
        _ => std::env::consts::OS.to_string(),
    };
    v1::HostInfo {
        hostname: hostname
            .map(str::to_string)
            .or_else(System::host_name)
            .unwrap_or_else(|| "unknown".into()),
        os,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_bytes: system.total_memory(),
        agent_version: kiln_common::VERSION.to_string(),
        gpus: inventory.gpus,
        cuda_driver_version: inventory.cuda_driver_version,
        gpu_probe_error: inventory.probe_error,
        low_priority: false,
        advertise_address: String::new(),
    }
}

/// Samples one run's process tree. CPU percentages need two readings, so the first sample
/// after creation reports 0 CPU.
pub struct TreeSampler {
    system: System,
    root: Pid,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TreeSample {
    /// Sum over the tree; 100 means one core fully busy.
    pub cpu_percent: f64,
    pub memory_rss_bytes: u64,
    pub n_processes: usize,
}

impl TreeSampler {
    pub fn new(root_pid: u32) -> TreeSampler {
        TreeSampler {
            system: System::new(),
            root: Pid::from_u32(root_pid),
        }
    }

    pub fn sample(&mut self) -> TreeSample {
        self.system.refresh_processes_specifics(
            ProcessesToUpdate::All,
            true,
            ProcessRefreshKind::nothing().with_cpu().with_memory(),
        );
        let processes = self.system.processes();
        // Descendants of the root: walk parents until the root or the top.
        let mut in_tree: HashSet<Pid> = HashSet::new();
        for (&pid, _) in processes.iter() {
            let mut current = Some(pid);
            let mut chain = Vec::new();
            while let Some(p) = current {
                if p == self.root || in_tree.contains(&p) {
                    in_tree.extend(chain.iter().copied());
                    in_tree.insert(p);
                    break;
                }
                chain.push(p);
                current = processes.get(&p).and_then(|proc_| proc_.parent());
                if chain.len() > 4096 {
                    break;
                }
            }
        }
        let mut sample = TreeSample {
            cpu_percent: 0.0,
            memory_rss_bytes: 0,
            n_processes: 0,
        };
        for pid in &in_tree {
            if let Some(process) = processes.get(pid) {
                sample.cpu_percent += process.cpu_usage() as f64;
                sample.memory_rss_bytes += process.memory();
                sample.n_processes += 1;
            }
        }
        sample
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_info_reports_this_machine() {
        let probe = crate::gpu::RecordedProbe::h100();
        let host = host_info(Some("node-1"), &probe);
        assert_eq!(host.hostname, "node-1");
        assert!(host.cpus >= 1);
        assert!(host.memory_bytes > 0);
        assert_eq!(host.gpus.len(), 1);
        assert_eq!(host.gpus[0].name, "NVIDIA H100 80GB HBM3");
    }

    #[test]
    fn tree_sample_counts_children() {
        // A shell that starts a child which holds 1 MiB+ of memory.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 5 & sleep 5; wait"])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let sample = TreeSampler::new(child.id()).sample();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(sample.n_processes >= 3, "{sample:?}");
        assert!(sample.memory_rss_bytes > 0, "{sample:?}");
    }
}
