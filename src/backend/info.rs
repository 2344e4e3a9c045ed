//! `roentgen cuda-info`: what the binary's kernels are (ptxas's report of registers, shared memory,
//! stack and spills per kernel and architecture, embedded by build.rs) and what device, if any, the
//! CUDA backend would run on.

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct KernelInfo {
    pub name: String,
    pub arch: String,
    pub registers: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: String,
    pub free_bytes: usize,
    pub total_bytes: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct CudaInfo {
    /// Whether this binary was built with `--features cuda`.
    pub cuda_build: bool,
    pub nvcc: Option<String>,
    /// The targets the fatbins hold ("sm_80 and sm_90a, with compute_80 PTX" by default).
    pub targets: Option<String>,
    /// (module, fatbin bytes) of every kernels/*.cu.
    pub modules: Vec<(String, usize)>,
    pub kernels: Vec<KernelInfo>,
    pub device: Option<DeviceInfo>,
    /// Why there is no device (no driver, no GPU, too old), when there is none.
    pub device_error: Option<String>,
}

/// Parses build.rs's report lines: "name  sm_80  40 regs  0 B smem  0 B stack  spills 0/0 B".
pub fn parse_ptxas_report(report: &str) -> Vec<KernelInfo> {
    report
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.len() < 13 || w[3] != "regs" || w[6] != "smem" || w[9] != "stack" {
                return None;
            }
            let (st, ld) = w[11].split_once('/')?;
            Some(KernelInfo {
                name: w[0].to_string(),
                arch: w[1].to_string(),
                registers: w[2].parse().ok()?,
                shared_bytes: w[4].parse().ok()?,
                stack_bytes: w[7].parse().ok()?,
                spill_store_bytes: st.parse().ok()?,
                spill_load_bytes: ld.parse().ok()?,
            })
        })
        .collect()
}

#[cfg(feature = "cuda")]
pub fn cuda_info() -> CudaInfo {
    use super::cuda::{driver_present, kernels, CudaBackend};
    let (device, device_error) = if !driver_present() {
        (None, Some("no CUDA driver (libcuda) on this machine".to_string()))
    } else {
        match CudaBackend::new(0, super::Precision::Bf16) {
            Ok(b) => {
                let (major, minor) = b.compute_capability();
                let (free, total) = b.memory_info();
                (
                    Some(DeviceInfo {
                        name: b.device_name().to_string(),
                        compute_capability: format!("{major}.{minor}"),
                        free_bytes: free,
                        total_bytes: total,
                    }),
                    None,
                )
            }
            Err(e) => (None, Some(format!("{e:#}"))),
        }
    };
    CudaInfo {
        cuda_build: true,
        nvcc: Some(kernels::NVCC.to_string()),
        targets: Some(kernels::TARGETS.to_string()),
        modules: kernels::MODULES.iter().map(|(n, b)| (n.to_string(), b.len())).collect(),
        kernels: parse_ptxas_report(kernels::PTXAS_REPORT),
        device,
        device_error,
    }
}

#[cfg(not(feature = "cuda"))]
pub fn cuda_info() -> CudaInfo {
    CudaInfo {
        cuda_build: false,
        nvcc: None,
        targets: None,
        modules: Vec::new(),
        kernels: Vec::new(),
        device: None,
        device_error: Some("this binary was built without --features cuda".to_string()),
    }
}

impl CudaInfo {
    pub fn render(&self) -> String {
        if !self.cuda_build {
            return "CUDA: not in this binary (rebuild with `cargo build --release --features cuda`; \
                    scripts/install-cuda-toolchain.sh installs nvcc)"
                .to_string();
        }
        let mut s = format!(
            "kernels: {} modules ({}), compiled by {} for {}\n",
            self.modules.len(),
            self.modules.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", "),
            self.nvcc.as_deref().unwrap_or("?"),
            self.targets.as_deref().unwrap_or("?")
        );
        s += &format!(
            "  {:<40} {:<7} {:>5} {:>10} {:>7} {:>12}\n",
            "kernel", "arch", "regs", "static smem", "stack", "spills (B)"
        );
        for k in &self.kernels {
            s += &format!(
                "  {:<40} {:<7} {:>5} {:>10} {:>7} {:>12}\n",
                k.name,
                k.arch,
                k.registers,
                k.shared_bytes,
                k.stack_bytes,
                format!("{}/{}", k.spill_store_bytes, k.spill_load_bytes)
            );
        }
        match (&self.device, &self.device_error) {
            (Some(d), _) => {
                s += &format!(
                    "device 0: {} (compute capability {}), {:.1} GiB free of {:.1} GiB",
                    d.name,
                    d.compute_capability,
                    d.free_bytes as f64 / (1u64 << 30) as f64,
                    d.total_bytes as f64 / (1u64 << 30) as f64
                )
            }
            (None, Some(e)) => s += &format!("device: none ({e})"),
            (None, None) => s += "device: none",
        }
        s
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_build_rs_report_lines() {
        let r = "conv2d_igemm_bf16                            sm_80    90 regs  15360 B smem    0 B stack  spills 0/0 B\n\
                 ew_to_bf16                                   sm_90a   13 regs      0 B smem    8 B stack  spills 4/12 B\n\
                 garbage line\n";
        let k = super::parse_ptxas_report(r);
        assert_eq!(k.len(), 2);
        assert_eq!(
            (k[0].name.as_str(), k[0].arch.as_str(), k[0].registers, k[0].shared_bytes),
            ("conv2d_igemm_bf16", "sm_80", 90, 15360)
        );
        assert_eq!((k[1].stack_bytes, k[1].spill_store_bytes, k[1].spill_load_bytes), (8, 4, 12));
    }
}
