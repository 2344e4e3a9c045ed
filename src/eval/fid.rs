//! `roentgen eval fid`: the Fréchet distance between the feature distributions of two image folders,
//! with InceptionV3 (pytorch-fid), TorchXRayVision's DenseNet-121 or CLIP's image tower.
//!
//! Features are cached per folder in `.roentgen-features-<net>-<key>.safetensors` (tensor
//! `features` [N, D]; the metadata lists each image's name, size and modification time), where
//! `<key>` hashes the weights file (and the CLIP config). A later run reuses the rows of unchanged
//! images and computes only new or modified ones; removed images drop out. A folder that is not
//! writable just goes uncached (with a warning).

use super::features::{list_images, load_image, FeatureKind, FeatureNet};

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Which weight files each network reads (shown by `--help`), the public ones from
/// `io::published`.
pub fn weights_help() -> String {
    use crate::io::published::help;
    format!(
        "\
Weights: the public releases as they are published — PyTorch files (.pth, .pt, .bin) are read
without Python and without running anything in them, and their SHA-256 is compared with the
published one (a mismatch warns) — or safetensors copies (`roentgen convert IN OUT.safetensors`).

  inception: pytorch-fid's FID Inception weights
{}
  xrv: TorchXRayVision's densenet121-res224-all, the whole pickled DenseNet (torchxrayvision
  keeps a copy in ~/.torchxrayvision/models_data/)
{}
  clip, clip-proj: openai/clip-vit-base-patch32's model.safetensors or pytorch_model.bin (a
  transformers CLIPModel or CLIPVisionModelWithProjection file works as it is).
",
        help("inception"),
        help("xrv")
    )
}

/// The features of one folder and where they came from.
pub struct FolderFeatures {
    pub dir: PathBuf,
    pub n: usize,
    pub dims: usize,
    pub features: Vec<f32>,
    pub reused: usize,
    pub computed: usize,
    pub cache: Option<PathBuf>,
}

/// Images per network call: enough rows for the CLIP tower's matrix products to fill the cores
/// (16 · 50 tokens for ViT-B/32), few enough that the decoded batch stays small.
const FEATURE_BATCH: usize = 16;

/// Features of every image in `dir`, reusing the cache where it is valid.
pub fn folder_features(
    dir: &Path,
    net: &mut FeatureNet,
    kind: FeatureKind,
    key: u64,
    use_cache: bool,
) -> Result<FolderFeatures> {
    let paths = list_images(dir)?;
    let dims = net.dims();
    let entries: Vec<Entry> = paths.iter().map(|p| Entry::of(p)).collect::<Result<_>>()?;
    let cache = use_cache.then(|| dir.join(format!(".roentgen-features-{}-{key:016x}.safetensors", kind.name())));
    let mut known: HashMap<Entry, Vec<f32>> = HashMap::new();
    if let Some(c) = cache.as_ref().filter(|c| c.exists()) {
        match read_cache(c, dims) {
            Ok(m) => known = m,
            Err(e) => crate::diag::warn(format!("ignoring the feature cache: {e:#}")),
        }
    }
    let mut out = vec![0f32; paths.len() * dims];
    let mut todo = Vec::new();
    let mut reused = 0;
    for (i, e) in entries.iter().enumerate() {
        match known.get(e) {
            Some(f) => {
                out[i * dims..(i + 1) * dims].copy_from_slice(f);
                reused += 1;
            }
            None => todo.push(i),
        }
    }
    let bar = crate::diag::progress_bar(
        todo.len() as u64,
        "images",
        format!("{} features of {}", kind.name(), dir.display()),
    );
    // Batches of images: decoded and preprocessed in parallel, then through the network together.
    let mut computed: Vec<(usize, Vec<f32>)> = Vec::with_capacity(todo.len());
    let preprocess = net.preprocessor();
    for chunk in todo.chunks(FEATURE_BATCH) {
        let inputs =
            chunk.par_iter().map(|&i| Ok(preprocess.apply(&load_image(&paths[i])?))).collect::<Result<Vec<_>>>()?;
        let features = net
            .forward(&inputs)
            .with_context(|| format!("{}: feature extraction of {} images", dir.display(), chunk.len()))?;
        for (&i, f) in chunk.iter().zip(features) {
            if f.len() != dims || f.iter().any(|v| !v.is_finite()) {
                bail!(
                    "{}: the network produced {} features, {} non-finite",
                    paths[i].display(),
                    f.len(),
                    f.iter().filter(|v| !v.is_finite()).count()
                );
            }
            computed.push((i, f));
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    for (i, f) in &computed {
        out[i * dims..(i + 1) * dims].copy_from_slice(f);
    }
    let n = paths.len();
    let mut cache = cache;
    if let Some(c) = &cache {
        if !computed.is_empty() || known.len() != reused {
            if let Err(e) = write_cache(c, kind, key, &entries, &out, dims) {
                crate::diag::warn(format!("features not cached: {e:#}"));
                cache = None;
            }
        }
    }
    crate::diag::progress(format!(
        "{}: {n} images ({} computed, {reused} from the cache)",
        dir.display(),
        computed.len()
    ));
    Ok(FolderFeatures { dir: dir.to_path_buf(), n, dims, features: out, reused, computed: computed.len(), cache })
}

/// One image as the cache identifies it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
struct Entry {
    name: String,
    size: u64,
    mtime_ns: u64,
}

impl Entry {
    fn of(p: &Path) -> Result<Entry> {
        let m = std::fs::metadata(p).with_context(|| format!("{}: cannot read", p.display()))?;
        let mtime_ns = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let name = p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Entry { name, size: m.len(), mtime_ns })
    }
}

fn read_cache(path: &Path, dims: usize) -> Result<HashMap<Entry, Vec<f32>>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let files = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("files"))
        .ok_or_else(|| anyhow!("{}: no file list in the metadata", path.display()))?;
    let entries: Vec<Entry> =
        serde_json::from_str(files).with_context(|| format!("{}: corrupt file list", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let t = st.tensor("features").map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if t.dtype() != safetensors::Dtype::F32 || t.shape() != [entries.len(), dims] {
        bail!(
            "{}: features {:?} {:?} do not match {} images × {dims}",
            path.display(),
            t.dtype(),
            t.shape(),
            entries.len()
        );
    }
    let v: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok(entries.into_iter().zip(v.chunks_exact(dims.max(1))).map(|(e, f)| (e, f.to_vec())).collect())
}

fn write_cache(path: &Path, kind: FeatureKind, key: u64, entries: &[Entry], feats: &[f32], dims: usize) -> Result<()> {
    let bytes: Vec<u8> = feats.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![entries.len(), dims], &bytes)
        .map_err(|e| anyhow!("{e}"))?;
    let meta: HashMap<String, String> = [
        ("files".to_string(), serde_json::to_string(entries)?),
        ("network".to_string(), kind.name().to_string()),
        ("key".to_string(), format!("{key:016x}")),
        ("software".to_string(), format!("roentgen {}", env!("CARGO_PKG_VERSION"))),
    ]
    .into();
    let out = safetensors::serialize(vec![("features".to_string(), view)], Some(meta)).map_err(|e| anyhow!("{e}"))?;
    crate::io::files::write_bytes_atomic(path, &out)
}

/// The cache key: a hash of the weights file's bytes (and of the CLIP config, which changes the
/// network, and of a pixel normalisation other than OpenAI's, which changes the input), so other
/// weights or preprocessing never reuse these features.
pub fn cache_key(
    weights: &Path,
    clip_config: Option<&Path>,
    pixel_norm: crate::eval::clip_vision::PixelNorm,
) -> Result<u64> {
    let f = std::fs::File::open(weights).with_context(|| format!("{}: cannot open", weights.display()))?;
    // SAFETY: read-only map; a concurrent writer could only change the hash.
    let map = unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("{}: cannot map", weights.display()))?;
    let mut h = hash_bytes(&map);
    if let Some(c) = clip_config {
        let b = std::fs::read(c).with_context(|| format!("{}: cannot read", c.display()))?;
        h = mix(h ^ hash_bytes(&b).rotate_left(17));
    }
    if pixel_norm != crate::eval::clip_vision::PixelNorm::Openai {
        h = mix(h ^ hash_bytes(format!("{pixel_norm:?}").as_bytes()).rotate_left(31));
    }
    Ok(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A fast 64-bit content hash (not cryptographic): 8-byte words folded per 16 MiB block in parallel,
/// blocks combined in order.
fn hash_bytes(b: &[u8]) -> u64 {
    const BLOCK: usize = 16 << 20;
    let hashes: Vec<u64> = b
        .par_chunks(BLOCK)
        .map(|blk| {
            let mut h: u64 = 0x243F_6A88_85A3_08D3;
            let mut words = blk.chunks_exact(8);
            for w in &mut words {
                let v = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
                h = (h.rotate_left(5) ^ v).wrapping_mul(0x517C_C1B7_2722_0A95);
            }
            for &x in words.remainder() {
                h = (h.rotate_left(5) ^ x as u64).wrapping_mul(0x517C_C1B7_2722_0A95);
            }
            mix(h)
        })
        .collect();
    hashes.iter().fold(mix(b.len() as u64), |acc, &h| mix(acc.rotate_left(7) ^ h))
}
