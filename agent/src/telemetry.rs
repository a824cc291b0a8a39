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
    /// Sum over the tree's processes (each counted once, not once per thread) of their
    /// proportional set size (PSS: pages shared by several processes, e.g. forked data
    /// loader workers, split between them), or of their RSS where PSS cannot be read.
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
            // sysinfo lists every thread as well, with its process's memory and its own
            // share of the CPU (already in the process's): count processes only.
            if let Some(process) = processes.get(pid)
                && process.thread_kind().is_none()
            {
                sample.cpu_percent += process.cpu_usage() as f64;
                sample.memory_rss_bytes += pss_bytes(pid.as_u32()).unwrap_or(process.memory());
                sample.n_processes += 1;
            }
        }
        sample
    }
}

/// A process's proportional set size from `/proc/PID/smaps_rollup` (Linux 4.14+), if it
/// can be read (it needs the right to ptrace-read the process).
fn pss_bytes(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_pss(&rollup)
}

fn parse_pss(rollup: &str) -> Option<u64> {
    let line = rollup.lines().find(|line| line.starts_with("Pss:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
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
    fn pss_is_read_from_smaps_rollup() {
        let rollup = "55d0c0000000-7ffd5a1f2000 ---p 00000000 00:00 0    [rollup]\n\
                      Rss:              123456 kB\n\
                      Pss:               61234 kB\n\
                      Pss_Anon:          50000 kB\n";
        assert_eq!(parse_pss(rollup), Some(61234 * 1024));
        assert_eq!(parse_pss("Rss: 1 kB\n"), None);
    }

    #[test]
    fn a_threaded_process_is_counted_once() {
        // 16 threads and ~64 MiB touched: sysinfo lists 17 tasks, each with the whole
        // process's memory. Counted per task that was over 1 GiB.
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import threading, time\n\
                 b = bytearray(64 << 20)\n\
                 for _ in range(16): threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n\
                 print('ready', flush=True)\n\
                 time.sleep(30)\n",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut ready,
        )
        .unwrap();
        let sample = TreeSampler::new(child.id()).sample();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(ready.trim(), "ready");
        assert_eq!(sample.n_processes, 1, "{sample:?}");
        assert!(sample.memory_rss_bytes >= 64 << 20, "{sample:?}");
        assert!(sample.memory_rss_bytes < 256 << 20, "{sample:?}");
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
