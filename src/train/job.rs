//! What every training command (`train`, `train-vae`) shares around its loop, so that a long run
//! loses nothing: the output folder (locked for the run, our own leftovers cleaned), the JSONL log
//! (one write per line; on resume cut back to the checkpoint's step), the data rows (checked up
//! front, decode failures at draw time handled as `--on-bad-image` says), the resume check against
//! the checkpoint's recorded settings, and checkpoint retention.

use super::data::{load_image, OnBadImage};
use crate::io::files::{self, FolderLock};
use crate::io::manifest::Example;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A run's output folder, locked until the run ends (or is killed: the lock is the kernel's).
pub struct OutputFolder {
    pub dir: PathBuf,
    _lock: FolderLock,
}

impl OutputFolder {
    /// Refuses a non-empty folder unless resuming or overwriting; creates, locks and cleans it
    /// (the temporaries that a killed or disk-full run left: with the lock held, any of ours is
    /// stale).
    pub fn open(dir: &Path, resume: bool, overwrite: bool, job: &str) -> Result<OutputFolder> {
        if dir.exists() && !dir.is_dir() {
            bail!("$output {}: exists and is not a folder", dir.display());
        }
        // Our lock file alone (a run that failed at its start) does not make a folder "used".
        let non_empty = dir.is_dir()
            && std::fs::read_dir(dir).map(|d| d.flatten().any(|e| e.file_name() != FolderLock::FILE)).unwrap_or(false);
        if non_empty && !resume && !overwrite {
            bail!(
                "$output {}: the folder exists and is not empty; pass $resume to continue its latest checkpoint, \
                 or $overwrite to write new checkpoints into it",
                dir.display()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("$output {}: cannot create", dir.display()))?;
        let lock = FolderLock::acquire(dir, job)?;
        for p in files::clean_leftovers(dir, true)? {
            crate::diag::note(format!("removed {}, left by an interrupted run", p.display()));
        }
        Ok(OutputFolder { dir: dir.to_path_buf(), _lock: lock })
    }
}

/// The training log (JSON lines). Each line is one `write` of a complete line, so a kill leaves
/// at most a missing line, never a torn one; a resumed run first cuts the log back to the
/// checkpoint's step (dropping a torn last line and the steps it will repeat).
pub struct TrainLog {
    file: std::fs::File,
    pub path: PathBuf,
}

impl TrainLog {
    /// Opens `path` for appending after keeping only the complete lines whose `step` is at most
    /// `keep_through` (0 for a fresh run: an `--overwrite` run starts a new log).
    pub fn open(path: &Path, keep_through: usize) -> Result<TrainLog> {
        if let Ok(text) = std::fs::read(path) {
            let kept: Vec<u8> = text
                .split_inclusive(|&c| c == b'\n')
                .filter(|l| l.ends_with(b"\n"))
                .filter(|l| {
                    serde_json::from_slice::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s as usize <= keep_through)
                })
                .flatten()
                .copied()
                .collect();
            if kept.len() != text.len() {
                files::write_bytes_atomic(path, &kept)?;
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        Ok(TrainLog { file, path: path.to_path_buf() })
    }

    pub fn append(&mut self, v: &serde_json::Value) -> Result<()> {
        let line = format!("{v}\n");
        self.file.write_all(line.as_bytes()).with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

/// The manifest's rows whose images can be used: every image's header is read (or, with
/// `verify`, the whole image decoded at the training resolution) before any work, and bad rows
/// fail the run or are left out as `on_bad` says.
pub fn usable_rows(
    manifest: &Path,
    rows: Vec<Example>,
    on_bad: OnBadImage,
    verify: Option<usize>,
) -> Result<Vec<Example>> {
    let bar = verify.map(|_| indicatif::ProgressBar::new(rows.len() as u64).with_message("verifying images"));
    let mut good = Vec::with_capacity(rows.len());
    let mut bad = Vec::new();
    for r in rows {
        let check = match verify {
            Some(res) => load_image(&r.image, res).map(|_| ()),
            None => image::image_dimensions(&r.image).map(|_| ()).map_err(anyhow::Error::from),
        };
        if let Some(b) = &bar {
            b.inc(1);
        }
        match check {
            Ok(()) => good.push(r),
            Err(e) => bad.push(format!("{}:{}: {}: {e:#}", manifest.display(), r.line, r.image.display())),
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if !bad.is_empty() {
        match on_bad {
            OnBadImage::Fail => bail!(
                "{} unreadable or missing image(s), e.g. {} (use $on_bad_image skip to leave them out)",
                bad.len(),
                bad[0]
            ),
            OnBadImage::Skip => {
                crate::diag::warn(format!("skipping {} unreadable or missing image(s), e.g. {}", bad.len(), bad[0]))
            }
        }
    }
    if good.is_empty() {
        bail!("{}: no usable rows", manifest.display());
    }
    Ok(good)
}

/// Draws images for the loop. An image that passed the start-up check can still fail to decode
/// (a truncated file, a bad CRC: the check reads headers only unless `--verify-images`). With
/// `skip`, it is replaced by the next row in manifest order that decodes, and remembered: the
/// replacement depends only on the files, so a resumed run draws the same images.
pub struct ImageDraw<'a> {
    pub rows: &'a [Example],
    pub manifest: &'a Path,
    pub on_bad: OnBadImage,
    pub resolution: usize,
    bad: Vec<bool>,
    pub skipped: usize,
}

impl<'a> ImageDraw<'a> {
    pub fn new(rows: &'a [Example], manifest: &'a Path, on_bad: OnBadImage, resolution: usize) -> ImageDraw<'a> {
        ImageDraw { rows, manifest, on_bad, resolution, bad: vec![false; rows.len()], skipped: 0 }
    }

    /// The image of row `idx` (or of its replacement), planar [3, res, res] in [−1, 1], and the row
    /// it came from.
    pub fn load(&mut self, idx: usize) -> Result<(usize, Vec<f32>)> {
        let n = self.rows.len();
        for k in 0..n {
            let i = (idx + k) % n;
            if self.bad[i] {
                continue;
            }
            match load_image(&self.rows[i].image, self.resolution) {
                Ok(px) => return Ok((i, px)),
                Err(e) => {
                    let at = format!("{}:{}", self.manifest.display(), self.rows[i].line);
                    if self.on_bad == OnBadImage::Fail {
                        return Err(e.context(format!("{at} (use $on_bad_image skip to leave such images out)")));
                    }
                    self.bad[i] = true;
                    self.skipped += 1;
                    crate::diag::warn(format!("{at}: {e:#}; skipped, the next usable row is drawn in its place"));
                }
            }
        }
        bail!("{}: no image of the manifest could be decoded", self.manifest.display())
    }
}

/// Refuses to resume when the settings that shape the run differ from those the checkpoint
/// recorded (a changed seed, learning rate or batch silently makes another run), listing every
/// difference; `allow` continues with the new ones. `current` maps keys, named like the flags
/// (`batch_size` ↔ `--batch-size`), to values; keys the checkpoint did not record are not compared.
pub fn check_resume_settings(
    ckpt: &Path,
    recorded: &serde_json::Value,
    current: &serde_json::Value,
    allow: bool,
) -> Result<()> {
    let Some(cur) = current.as_object() else { return Ok(()) };
    let mut diffs = Vec::new();
    for (k, v) in cur {
        let Some(old) = recorded.get(k) else { continue };
        let same = match (old, v) {
            // Integers exactly; the f32 flags as f32 (their JSON text need not read back to the
            // same f64).
            (serde_json::Value::Number(a), serde_json::Value::Number(b)) => match (a.as_u64(), b.as_u64()) {
                (Some(x), Some(y)) => x == y,
                _ => a.as_f64().map(|x| x as f32) == b.as_f64().map(|x| x as f32),
            },
            (serde_json::Value::String(a), serde_json::Value::String(b)) if k == "data" => {
                let canon = |p: &str| std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p));
                canon(a) == canon(b)
            }
            (a, b) => a == b,
        };
        if !same {
            if k == "rng_scheme" {
                // Not a flag: the version of how samples draw their randomness (train::run).
                diffs.push(format!(
                    "randomness scheme {v} (checkpoint: {old}, written by an older roentgen; continuing would not reproduce its run)"
                ));
                continue;
            }
            if k == "global_batch" {
                // Not a flag: $batch_size × $grad_accum × ranks; any split of the same total resumes.
                diffs.push(format!(
                    "global batch {v} (checkpoint: {old}; the global batch is $batch_size × $grad_accum × ranks, \
                     and any split of the checkpoint's resumes it)"
                ));
                continue;
            }
            let flag = if k == "ema_decay" { "$ema/$ema_decay".to_string() } else { format!("${k}") };
            diffs.push(format!("{flag} {v} (checkpoint: {old})"));
        }
    }
    if !diffs.is_empty() && !allow {
        bail!(
            "$resume: {} was trained with other settings ({}): {}; pass $allow_changed_settings to continue with the new ones",
            ckpt.display(),
            ckpt.join("training_state/trainer.json").display(),
            diffs.join(", ")
        );
    }
    for d in &diffs {
        crate::diag::warn(format!("resuming with a changed setting: {d}"));
    }
    Ok(())
}

/// After a checkpoint was written: keeps the newest `limit` (when set), saying what was removed.
pub fn retain_checkpoints(dir: &Path, limit: Option<usize>) -> Result<()> {
    if let Some(limit) = limit {
        for p in super::checkpoint::prune(dir, limit)? {
            crate::diag::note(format!("removed {} ($checkpoints_total_limit {limit})", p.display()));
        }
    }
    Ok(())
}

/// A training loop's error with what is on disk: the last checkpoint, or that none was written.
pub fn with_checkpoint_note(e: anyhow::Error, last: Option<&Path>) -> anyhow::Error {
    match last {
        Some(p) => anyhow::anyhow!("{e:#} (the last checkpoint, {}, is intact)", p.display()),
        None => anyhow::anyhow!("{e:#} (no checkpoint had been written yet)"),
    }
}
