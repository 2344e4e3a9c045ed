//! The public weight files roentgen reads as they are published, and the SHA-256 each is known by.
//! A PyTorch checkpoint loaded for one of these networks is hashed and compared: a mismatch is a
//! warning naming both hashes (another release, a damaged download, a fine-tune: the user decides),
//! never an error.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// One published file.
pub struct Published {
    /// The network, as `eval` names it ("inception", "xrv").
    pub network: &'static str,
    pub file: &'static str,
    pub url: &'static str,
    /// The SHA-256 in hex, or its first hex digits where only those are published.
    pub sha256: &'static str,
    /// Where the hash comes from.
    pub source: &'static str,
}

pub const PUBLISHED: &[Published] = &[
    Published {
        network: "inception",
        file: "pt_inception-2015-12-05-6726825d.pth",
        url: "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        sha256: "6726825d",
        source: "its first 8 hex digits, in the file's name: torch.hub's check_hash convention",
    },
    Published {
        network: "xrv",
        file: "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        url: "https://github.com/mlmed/torchxrayvision/releases/download/v1/nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        sha256: "56524913dd16a906422e8d8b66a7a5c46be1d82eb7ac012d8103776f1aa68899",
        source: "as two public projects record it independently; not verified by roentgen, which could not download it",
    },
];

/// The published file of `network` for `--help`: name, address, SHA-256 and where it comes from.
pub fn help(network: &str) -> String {
    match PUBLISHED.iter().find(|p| p.network == network) {
        Some(p) => format!(
            "    {}\n    from {}\n    SHA-256 {}{} ({})\n",
            p.file,
            p.url,
            p.sha256,
            if p.sha256.len() < 64 { "…" } else { "" },
            p.source
        ),
        None => String::new(),
    }
}

/// The SHA-256 of a file, in hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// What the hash of `path` says against `network`'s published file: Ok(true) when it matches,
/// Ok(false) after a warning naming both hashes; for a network without a published file, Ok(true).
pub fn check(path: &Path, network: &str) -> Result<bool> {
    let Some(p) = PUBLISHED.iter().find(|p| p.network == network) else { return Ok(true) };
    let got = sha256_file(path)?;
    if got.starts_with(p.sha256) {
        crate::diag::progress(format!("{}: SHA-256 {got}, the published {}", path.display(), p.file));
        Ok(true)
    } else {
        crate::diag::warn(format!(
            "{}: SHA-256 {got} is not the published {}'s ({}{}, {}); reading it anyway",
            path.display(),
            p.file,
            p.sha256,
            if p.sha256.len() < 64 { "…" } else { "" },
            p.source
        ));
        Ok(false)
    }
}
