//! Numbered kernel versions (issue 18), llm.c's dev/cuda discipline: every hot kernel family keeps
//! its versions side by side, version 1 being the first one written; each later version says in its
//! kernel's header what it changes, its roofline arithmetic and the gain it expects, and passes the
//! same parity cases as version 1 on the emulated device. A GPU then times them all and keeps the
//! fastest correct one per shape; until it has, version 1 runs unless chosen otherwise.
//!
//! Choosing: `ROENTGEN_KERNELS=group_norm=2` (families separated by commas) for a process, or
//! [`super::CudaBackend::set_kernel_version`] in code. An unknown family or version is refused,
//! naming what exists. Otherwise the autotuned table (autotune.rs: `roentgen bench --autotune`)
//! picks per shape, where it has the shape; version 1 runs where it has not.

use anyhow::{bail, Result};
use std::collections::BTreeMap;

/// The environment variable that chooses versions.
pub const ENV: &str = "ROENTGEN_KERNELS";

/// A kernel family whose versions can be chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KernelFamily {
    /// Group norm forward (± SiLU): kernels/norm.cu `gn_forward_*`.
    GroupNorm,
    /// Group norm backward's input gradient: kernels/norm.cu `gn_backward_*`.
    GroupNormBackward,
    /// The bf16 implicit-GEMM convolution (forward and data gradient): kernels/conv.cu and
    /// kernels/conv_pipeline.cu `conv2d_igemm_bf16*`. (The f32 path is the parity path and has one version.)
    Conv,
    /// The bf16 fused attention forward: kernels/attention.cu `attention_fwd_bf16_d*` (version 1)
    /// and kernels/attention_v2.cu. (The f32 path is the parity path and has one version; the
    /// backward has one version so far.)
    Attention,
}

impl KernelFamily {
    pub const ALL: [KernelFamily; 4] =
        [KernelFamily::GroupNorm, KernelFamily::GroupNormBackward, KernelFamily::Conv, KernelFamily::Attention];

    /// The name used in `ROENTGEN_KERNELS` and in reports.
    pub fn name(self) -> &'static str {
        match self {
            KernelFamily::GroupNorm => "group_norm",
            KernelFamily::GroupNormBackward => "group_norm_backward",
            KernelFamily::Conv => "conv",
            KernelFamily::Attention => "attention",
        }
    }

    /// The versions that exist, oldest first, each with what it is in a few words.
    pub fn versions(self) -> &'static [(u32, &'static str)] {
        match self {
            KernelFamily::GroupNorm => &[
                (1, "four launches: Σx, Σ(x − μ)², statistics, normalise (x read 3 times)"),
                (2, "one-pass moments, statistics combined by each normalising block (x read twice, 1–2 launches)"),
            ],
            KernelFamily::GroupNormBackward => &[
                (1, "partial sums, statistics in BG small blocks, then a grid-stride pass over the input gradient"),
                (2, "statistics combined by each chunk's block, which then updates its chunk (one launch fewer)"),
            ],
            KernelFamily::Conv => &[
                (1, "one 128×64 block per output tile, the whole reduction in each block"),
                (2, "split-K over grid.z when fewer than 2 × SM-count blocks would launch, slices summed in order"),
                (3, "version 2 with ldmatrix operand loads and two shared stages (one barrier per reduction tile)"),
                (4, "version 3's tiles fed by a cp.async pipeline of 2 stages (kernels/conv_pipeline.cu)"),
                (5, "the cp.async pipeline with 3 stages (two reduction tiles in flight)"),
                (6, "the cp.async pipeline with 4 stages (three reduction tiles in flight)"),
            ],
            KernelFamily::Attention => &[
                (1, "64 queries per block, Q, K and Vᵀ staged synchronously in shared memory, head dim padded to 16"),
                (
                    2,
                    "128 queries per block, Q in registers, K/V by cp.async one tile ahead, ldmatrix(.trans), \
                     head dim padded to 8 only (head dims ≤ 96; version 1 beyond)",
                ),
                (
                    3,
                    "version 2 with the exp2 softmax (scale · log2 e folded into one FFMA per score): \
                     equal to version 1 up to the bf16 rounding of the probabilities",
                ),
            ],
        }
    }

    pub fn from_name(name: &str) -> Option<KernelFamily> {
        KernelFamily::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// Which version of each family runs: the one chosen for the family, else the autotuned one for
/// the shape, else version 1.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelChoice {
    chosen: BTreeMap<KernelFamily, u32>,
    /// (family, shape key) → the fastest correct version measured on this device.
    tuned: BTreeMap<(KernelFamily, String), u32>,
}

impl KernelChoice {
    /// Parses "family=version,family=version" (spaces allowed; empty: every version 1).
    pub fn parse(spec: &str) -> Result<KernelChoice> {
        let mut choice = KernelChoice::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((name, version)) = item.split_once('=') else {
                bail!("{ENV}: \"{item}\" is not family=version (e.g. group_norm=2)");
            };
            let (name, version) = (name.trim(), version.trim());
            let family = KernelFamily::from_name(name).ok_or_else(|| {
                let known: Vec<&str> = KernelFamily::ALL.iter().map(|f| f.name()).collect();
                anyhow::anyhow!("{ENV}: no kernel family \"{name}\"; the families with versions: {}", known.join(", "))
            })?;
            let v: u32 =
                version.parse().map_err(|_| anyhow::anyhow!("{ENV}: {name}={version}: not a version number"))?;
            choice.set(family, v)?;
        }
        Ok(choice)
    }

    /// The choice `ROENTGEN_KERNELS` makes (every version 1 when it is unset).
    pub fn from_env() -> Result<KernelChoice> {
        match std::env::var(ENV) {
            Ok(spec) => KernelChoice::parse(&spec),
            Err(std::env::VarError::NotPresent) => Ok(KernelChoice::default()),
            Err(e) => bail!("{ENV}: {e}"),
        }
    }

    /// Chooses version `v` of `family`, refusing one that does not exist.
    pub fn set(&mut self, family: KernelFamily, v: u32) -> Result<()> {
        if !family.versions().iter().any(|&(n, _)| n == v) {
            let have: Vec<String> = family.versions().iter().map(|(n, _)| n.to_string()).collect();
            bail!("{ENV}: {} has no version {v}; its versions: {}", family.name(), have.join(", "));
        }
        self.chosen.insert(family, v);
        Ok(())
    }

    /// The version chosen for the family as a whole (1 where none was).
    pub fn version(&self, family: KernelFamily) -> u32 {
        self.chosen.get(&family).copied().unwrap_or(1)
    }

    /// The version that runs `family` at the shape `key` (see [`KernelChoice`]).
    pub fn version_for(&self, family: KernelFamily, key: &str) -> u32 {
        match self.chosen.get(&family) {
            Some(&v) => v,
            None => self.tuned.get(&(family, key.to_string())).copied().unwrap_or(1),
        }
    }

    /// The version of `family` when it does not depend on the shape (chosen for the family, or no
    /// shape of it tuned); None when the tuned table must be asked.
    pub fn fixed_version(&self, family: KernelFamily) -> Option<u32> {
        match self.chosen.get(&family) {
            Some(&v) => Some(v),
            None if !self.tuned.keys().any(|(f, _)| *f == family) => Some(1),
            None => None,
        }
    }

    /// Takes the autotuned version of `family` at shape `key` (ignored when it does not exist:
    /// a table written by another roentgen).
    pub fn set_tuned(&mut self, family: KernelFamily, key: &str, v: u32) {
        if family.versions().iter().any(|&(n, _)| n == v) {
            self.tuned.insert((family, key.to_string()), v);
        }
    }

    /// How many shapes the autotuned table covers.
    pub fn tuned_shapes(&self) -> usize {
        self.tuned.len()
    }

    /// "group_norm=2" for every family not at version 1 ("" when all are).
    pub fn describe(&self) -> String {
        let parts: Vec<String> =
            self.chosen.iter().filter(|(_, &v)| v != 1).map(|(f, v)| format!("{}={v}", f.name())).collect();
        parts.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_with_the_families_and_versions_named() {
        let c = KernelChoice::parse(" group_norm = 2 ").unwrap();
        assert_eq!(c.version(KernelFamily::GroupNorm), 2);
        assert_eq!(c.describe(), "group_norm=2");
        assert_eq!(KernelChoice::parse("").unwrap(), KernelChoice::default());
        assert_eq!(KernelChoice::parse("group_norm=1").unwrap().describe(), "");
        let err = |s: &str| format!("{:#}", KernelChoice::parse(s).unwrap_err());
        assert!(
            err("softmax=2").contains("no kernel family \"softmax\"")
                && err("softmax=2").contains("group_norm, group_norm_backward, conv, attention")
        );
        assert_eq!(KernelChoice::parse("conv=2, group_norm=2").unwrap().describe(), "group_norm=2,conv=2");
        // A tuned shape is looked up; a chosen family overrides the table.
        let mut t = KernelChoice::default();
        t.set_tuned(KernelFamily::Conv, "128x1280x1280 taps 3x3", 2);
        assert_eq!(t.fixed_version(KernelFamily::GroupNorm), Some(1));
        assert_eq!(t.fixed_version(KernelFamily::Conv), None);
        assert_eq!(t.version_for(KernelFamily::Conv, "128x1280x1280 taps 3x3"), 2);
        assert_eq!(t.version_for(KernelFamily::Conv, "8x8x8 taps 1x1"), 1);
        t.set(KernelFamily::Conv, 1).unwrap();
        assert_eq!(t.fixed_version(KernelFamily::Conv), Some(1));
        assert!(err("group_norm=9").contains("no version 9; its versions: 1, 2"));
        assert!(err("group_norm").contains("not family=version"));
        assert!(err("group_norm=x").contains("not a version number"));
    }
}
