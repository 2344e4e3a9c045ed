//! A bounded, deterministic fuzz of what a user's files reach first: safetensors headers and
//! data, model configs (U-Net, VAE, CLIP text, BERT, CLIP vision) and model_index.json. A fixed
//! seed drives a few thousand mutations of the real fixture files; each mutated file goes through
//! the library's parsers and loaders in-process (`SafetensorsFile::open`/`parse`, the config
//! parsers, model loads, `inspect`, with random weights where the config is small) under
//! `catch_unwind`. Every outcome must be `Ok` or an `Err` naming the file; a panic fails the test
//! (and an abort would end the test process, failing it too). Runs in CI in a few seconds of a
//! release build; ROENTGEN_FUZZ_ITERS scales the budget for a longer local run (e.g. 10), and
//! ROENTGEN_FUZZ_TRACE=1 prints each case before it runs.

mod common;
use common::*;
use roentgen::backend::cpu::CpuBackend;
use roentgen::models::bert::BertConfig;
use roentgen::models::clip::ClipTextConfig;
use roentgen::models::unet::UNetConfig;
use roentgen::models::vae::VaeConfig;
use roentgen::models::Component;
use roentgen::tensor::Layout;
use roentgen::tools::inspect::{inspect, InspectOptions};
use roentgen::{io::safetensors::SafetensorsFile, io::weights};
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

/// SplitMix64: a fixed seed gives the same mutations on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

fn iters(default: usize) -> usize {
    let scale: f64 = std::env::var("ROENTGEN_FUZZ_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    ((default as f64) * scale).max(1.0) as usize
}

/// What went wrong in one case: a panic, or an error that does not name the file.
#[derive(Default)]
struct Findings {
    cases: usize,
    errors: usize,
    problems: Vec<String>,
}

impl Findings {
    /// Runs `f` under `catch_unwind`; an `Err` must contain `must_name`.
    fn check(&mut self, what: &str, must_name: &str, f: impl FnOnce() -> anyhow::Result<()>) {
        self.cases += 1;
        // An abort (allocation failure, stack overflow) ends the process before any report:
        // ROENTGEN_FUZZ_TRACE=1 names each case first, so the last line is the culprit.
        if std::env::var_os("ROENTGEN_FUZZ_TRACE").is_some() {
            eprintln!("case: {what}");
        }
        FUZZING.with(|x| x.set(true));
        let outcome = catch_unwind(AssertUnwindSafe(f));
        FUZZING.with(|x| x.set(false));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.errors += 1;
                let msg = format!("{e:#}");
                if !msg.contains(must_name) {
                    self.problems.push(format!("{what}: error does not name {must_name}: {msg}"));
                }
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                self.problems.push(format!("{what}: PANIC {msg}"));
            }
        }
    }

    fn assert_clean(&self, target: &str) {
        println!(
            "{target}: {} cases, {} refused with an error, {} problems",
            self.cases,
            self.errors,
            self.problems.len()
        );
        assert!(self.errors > 0, "{target}: no mutation was refused; the mutator is not reaching the parsers");
        // One line per distinct failure (the first case that showed it), not hundreds of repeats.
        let mut distinct = std::collections::BTreeMap::new();
        for p in &self.problems {
            let (_, msg) = p.rsplit_once("): ").unwrap_or(("", p));
            let source = p.split(" (").next().unwrap_or("");
            distinct.entry((source.to_string(), msg.to_string())).or_insert(p.clone());
        }
        assert!(
            self.problems.is_empty(),
            "{target}: {} problem(s), {} distinct:\n{}",
            self.problems.len(),
            distinct.len(),
            distinct.values().take(20).cloned().collect::<Vec<_>>().join("\n")
        );
    }
}

thread_local!(static FUZZING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });

/// A fuzz test's start: panics inside `Findings::check` silenced, the mutator seeded with `seed`,
/// no findings yet, and a scratch folder.
fn fuzz_start(seed: u64) -> (Rng, Findings, tempfile::TempDir) {
    quiet_panics();
    (Rng(seed), Findings::default(), tempfile::tempdir().unwrap())
}

/// The panic hook would print every caught panic: silence it inside `Findings::check` (panics
/// there are collected), keep it for everything else (the test's own assertions).
fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !FUZZING.with(|f| f.get()) {
                default(info)
            }
        }));
    });
}

// ---- safetensors ----

/// Splits a safetensors file into (header JSON, data).
fn split(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), bytes[8 + n..].to_vec())
}

fn join(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// Values a header field is replaced with: edge integers, wrong types, and shapes/offsets that
/// overflow when multiplied.
fn odd_value(rng: &mut Rng) -> Value {
    let huge = [0u64, 1, 7, 1 << 31, 1 << 32, 1 << 62, 1 << 63, u64::MAX];
    match rng.below(14) {
        0 => json!(-1),
        1 => json!(*rng.pick(&huge)),
        2 => json!(1e308),
        3 => json!("NaN"),
        4 => json!(null),
        5 => json!(true),
        6 => json!([]),
        7 => json!({}),
        8 => json!([*rng.pick(&huge), *rng.pick(&huge)]),
        9 => json!([0, *rng.pick(&huge), *rng.pick(&huge)]),
        10 => json!([1, 1, 1, 1, 1, 1, 1, 1]),
        11 => json!(*rng.pick(&["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "Q4", ""])),
        12 => json!([*rng.pick(&huge)]),
        _ => json!(0.5),
    }
}

fn mutate_safetensors(rng: &mut Rng, orig: &[u8]) -> (String, Vec<u8>) {
    let hlen = u64::from_le_bytes(orig[..8].try_into().unwrap()) as usize;
    let mut b = orig.to_vec();
    match rng.below(6) {
        0 => {
            // byte flips, mostly in the length field and the header
            let k = 1 + rng.below(4);
            for _ in 0..k {
                let i = if rng.below(4) < 3 { rng.below(8 + hlen) } else { rng.below(b.len()) };
                b[i] ^= 1 << rng.below(8);
            }
            ("byte flips".into(), b)
        }
        1 => {
            let n = if rng.below(2) == 0 { rng.below(8 + hlen + 1) } else { rng.below(b.len()) };
            b.truncate(n);
            (format!("truncated to {n}"), b)
        }
        2 => {
            let v = *rng.pick(&[0u64, 1, 7, hlen as u64 - 1, hlen as u64 + 1, b.len() as u64, 100_000_001, u64::MAX]);
            b[..8].copy_from_slice(&v.to_le_bytes());
            (format!("header length {v}"), b)
        }
        _ => {
            let (mut header, data) = split(orig);
            let obj = header.as_object_mut().unwrap();
            let names: Vec<String> = obj.keys().filter(|k| *k != "__metadata__").cloned().collect();
            let name = rng.pick(&names).clone();
            let what = match rng.below(7) {
                0..=3 => {
                    let field = *rng.pick(&["dtype", "shape", "data_offsets"]);
                    let v = odd_value(rng);
                    obj[&name][field] = v.clone();
                    format!("{name}.{field} = {v}")
                }
                4 => {
                    obj.remove(&name);
                    format!("removed {name}")
                }
                5 => {
                    let v = odd_value(rng);
                    obj.insert("__metadata__".into(), json!({"format": v.clone()}));
                    format!("__metadata__.format = {v}")
                }
                _ => {
                    // a second tensor aliasing the same bytes
                    let t = obj[&name].clone();
                    obj.insert(format!("{name}.copy"), t);
                    format!("duplicated {name}")
                }
            };
            (what, join(&header, &data))
        }
    }
}

#[test]
fn fuzz_safetensors_headers_and_loads() {
    let (mut rng, mut found, tmp) = fuzz_start(0x5EED_0001);
    // A CLIP text encoder folder (loads go through weights::load_into) and a BERT one (its own
    // loader), with the weights replaced by each mutation.
    let targets = [("clip-b", "model.safetensors"), ("bert/bert-a", "model.safetensors")];
    for (i, (fix, file)) in targets.iter().enumerate() {
        let dir = tmp.path().join(format!("t{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(fixture(fix).join("config.json"), dir.join("config.json")).unwrap();
        let orig = std::fs::read(fixture(fix).join(file)).unwrap();
        let path = dir.join(file);
        for _ in 0..iters(700) {
            let (what, bytes) = mutate_safetensors(&mut rng, &orig);
            std::fs::write(&path, &bytes).unwrap();
            let case = format!("{fix}/{file} ({what})");
            found.check(&case, file, || {
                let f = SafetensorsFile::open(&path)?;
                f.infos()?;
                f.metadata()?;
                f.parse().map(|_| ())
            });
            let opts = InspectOptions { variant: None, random_weights: false, tensors: true };
            found.check(&case, file, || inspect(&mut CpuBackend::new(), &path, &opts).map(|_| ()));
            found.check(&case, file, || {
                let mut b = CpuBackend::new();
                roentgen::models::text::TextEncoder::load(&mut b, &dir, None).map(|_| ())
            });
        }
    }
    found.assert_clean("safetensors");
}

// ---- JSON configs ----

/// Every path to a value in `v` (object keys and list indices).
fn paths(v: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(prefix.clone());
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                prefix.push(k.clone());
                paths(x, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                prefix.push(i.to_string());
                paths(x, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn at<'a>(v: &'a mut Value, path: &[String]) -> &'a mut Value {
    path.iter().fold(v, |v, k| match v {
        Value::Array(a) => &mut a[k.parse::<usize>().unwrap()],
        _ => &mut v[k.as_str()],
    })
}

/// One mutation of a JSON value in place: numbers replaced by edge values, lists emptied,
/// shortened or duplicated, types swapped, keys removed.
fn mutate_json(rng: &mut Rng, v: &mut Value) -> String {
    if rng.below(6) == 0 {
        if let Some(what) = mutate_list_family(rng, v) {
            return what;
        }
    }
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    let path = rng.pick(&all[1..]).clone();
    let target = at(v, &path);
    let old = target.to_string();
    let new = match (&*target, rng.below(3)) {
        (Value::Number(_), _) => {
            let n = target.as_u64().unwrap_or(1);
            rng.pick(&[
                json!(0),
                json!(-1),
                json!(1u64 << 31),
                json!(1u64 << 63),
                json!(u64::MAX),
                json!(1e308),
                json!(-1e308),
                json!(0.5),
                json!("NaN"),
                json!("inf"),
                json!(n.saturating_add(1)),
                json!(n.saturating_mul(2)),
                json!(n.saturating_mul(1024)),
                json!(null),
                json!([n, n]),
            ])
            .clone()
        }
        (Value::Array(a), 0) => {
            let mut d = a.clone();
            d.extend(a.iter().cloned());
            Value::Array(d)
        }
        (Value::Array(a), 1) if !a.is_empty() => Value::Array(a[..a.len() - 1].to_vec()),
        (Value::Array(_), _) => json!([]),
        (Value::String(_), _) => {
            rng.pick(&[json!(1), json!(""), json!(["x"]), json!(null), json!("UpBlock2D")]).clone()
        }
        (Value::Bool(b), _) => rng.pick(&[json!(!b), json!("true"), json!(1)]).clone(),
        (Value::Null, _) => rng.pick(&[json!(1), json!("x"), json!([]), json!(false)]).clone(),
        (Value::Object(_), _) => json!([]),
    };
    if rng.below(10) == 0 {
        // remove the key (or the list entry) instead
        let (parent, last) = path.split_at(path.len() - 1);
        match at(v, parent) {
            Value::Object(o) => {
                o.remove(&last[0]);
            }
            Value::Array(a) => {
                a.remove(last[0].parse::<usize>().unwrap());
            }
            _ => {}
        }
        return format!("removed {}", path.join("."));
    }
    *target = new.clone();
    format!("{} = {new} (was {old})", path.join("."))
}

/// The same edit to every top-level list of one length (a U-Net's block_out_channels,
/// down_block_types and up_block_types), so the lists still agree and the edit reaches the code
/// past the agreement check: all emptied, shortened to one entry, or doubled.
fn mutate_list_family(rng: &mut Rng, v: &mut Value) -> Option<String> {
    let o = v.as_object_mut()?;
    let lens: Vec<usize> = o.values().filter_map(|x| x.as_array()).map(|a| a.len()).filter(|&n| n > 0).collect();
    let n = *lens.get(rng.below(lens.len().max(1)))?;
    let op = rng.below(3);
    let mut keys = Vec::new();
    for (k, x) in o.iter_mut() {
        if let Value::Array(a) = x {
            if a.len() == n {
                match op {
                    0 => a.clear(),
                    1 => a.truncate(1),
                    _ => a.extend(a.clone()),
                }
                keys.push(k.clone());
            }
        }
    }
    Some(format!("lists {keys:?} {}", ["emptied", "cut to one entry", "doubled"][op]))
}

/// The text of a mutated config: usually a few value mutations, sometimes a damaged byte stream.
fn mutated_config(rng: &mut Rng, orig: &Value) -> (String, String) {
    if rng.below(8) == 0 {
        let mut text = serde_json::to_string_pretty(orig).unwrap().into_bytes();
        let what = if rng.below(2) == 0 {
            let n = rng.below(text.len());
            text.truncate(n);
            format!("text truncated to {n}")
        } else {
            let i = rng.below(text.len());
            text[i] = *rng.pick(b"{}[]\",:0-9.eE\x00\xff");
            format!("byte {i} replaced")
        };
        return (what, String::from_utf8_lossy(&text).into_owned());
    }
    let mut v = orig.clone();
    let k = 1 + rng.below(3);
    let what: Vec<String> = (0..k).map(|_| mutate_json(rng, &mut v)).collect();
    (what.join("; "), serde_json::to_string_pretty(&v).unwrap())
}

/// Models small enough to instantiate with random weights in a fuzz loop.
const SMALL: usize = 4 << 20;

#[test]
fn fuzz_model_configs() {
    let (mut rng, mut found, tmp) = fuzz_start(0x5EED_0002);
    let read = |p: PathBuf| -> Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    // (fixture folder, config file, which parser, instantiate with random weights)
    let sd = sd14_config();
    let cases: Vec<(Value, &str, bool)> = vec![
        (read(fixture("unet-a/config.json")), "unet", true),
        (read(fixture("unet-b/config.json")), "unet", true),
        (read(sd.join("unet/config.json")), "unet", false),
        (read(fixture("vae-a/config.json")), "vae", true),
        (read(sd.join("vae/config.json")), "vae", false),
        (read(fixture("clip-b/config.json")), "clip", true),
        (read(sd.join("text_encoder/config.json")), "clip", false),
        (read(fixture("bert/bert-a/config.json")), "bert", true),
        (read(fixture("clip-b/config.json")), "clip_vision", false),
    ];
    let class = |kind: &str| match kind {
        "unet" => "UNet2DConditionModel",
        "vae" => "AutoencoderKL",
        _ => "CLIPTextModel",
    };
    for (i, (orig, kind, instantiate)) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("c{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        for _ in 0..iters(260) {
            let (what, text) = mutated_config(&mut rng, orig);
            std::fs::write(&path, &text).unwrap();
            let case = format!("{kind} config #{i} ({what})");
            let mut small = false;
            found.check(&case, "config.json", || {
                let numel = match *kind {
                    "unet" => {
                        let c = UNetConfig::from_file(&path)?;
                        let _ = c.total_downscale();
                        Layout::measure(|l| roentgen::models::unet::params_layout(l, &c)).numel()
                    }
                    "vae" => {
                        let c = VaeConfig::from_file(&path)?;
                        let _ = c.scale_factor();
                        Layout::measure(|l| roentgen::models::vae::params_layout(l, &c)).numel()
                    }
                    "clip" => {
                        let c = ClipTextConfig::from_file(&path)?;
                        Layout::measure(|l| roentgen::models::clip::params_layout(l, &c)).numel()
                    }
                    "bert" => {
                        let c = BertConfig::from_file(&path)?;
                        Layout::measure(|l| roentgen::models::bert::params_layout(l, &c)).numel()
                    }
                    _ => {
                        let c = roentgen::eval::clip_vision::ClipVisionConfig::from_file(&path)?;
                        c.expected_tensors().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
                    }
                };
                small = numel <= SMALL;
                Ok(())
            });
            if *instantiate && small {
                if *kind == "bert" {
                    found.check(&case, "config.json", || {
                        let c = BertConfig::from_file(&path)?;
                        roentgen::models::bert::BertModel::random(&mut CpuBackend::new(), c, 1).map(|_| ())
                    });
                } else {
                    // inspect finds the class in the config; make sure it is the one fuzzed
                    let mut v: Value = serde_json::from_str(&text).unwrap_or(json!({}));
                    if let Some(o) = v.as_object_mut() {
                        o.insert("_class_name".into(), json!(class(kind)));
                    }
                    std::fs::write(&path, v.to_string()).unwrap();
                    let opts = InspectOptions { variant: None, random_weights: true, tensors: false };
                    found.check(&case, "config.json", || inspect(&mut CpuBackend::new(), &dir, &opts).map(|_| ()));
                }
            }
        }
    }
    found.assert_clean("configs");
}

#[test]
fn fuzz_model_index() {
    let (mut rng, mut found, tmp) = fuzz_start(0x5EED_0003);
    let pipe = assemble_pipeline("pipe-a", tmp.path());
    let orig: Value = serde_json::from_str(&std::fs::read_to_string(pipe.join("model_index.json")).unwrap()).unwrap();
    let path = pipe.join("model_index.json");
    for _ in 0..iters(400) {
        let (what, text) = mutated_config(&mut rng, &orig);
        std::fs::write(&path, &text).unwrap();
        let case = format!("model_index.json ({what})");
        found.check(&case, "model_index.json", || weights::read_model_index(&pipe).map(|_| ()));
        found.check(&case, "model_index.json", || weights::component_dir(&pipe, "unet").map(|_| ()));
        // inspect reads the components the index names: its errors may name their files instead
        let opts = InspectOptions { variant: None, random_weights: false, tensors: false };
        found.check(&case, &pipe.display().to_string(), || inspect(&mut CpuBackend::new(), &pipe, &opts).map(|_| ()));
    }
    found.assert_clean("model_index");
}

/// The mutators above must produce the bad values the issue names; a run that never tried them
/// would pass without testing anything.
#[test]
fn fuzz_mutator_reaches_the_named_values() {
    let mut rng = Rng(0x5EED_0002);
    let orig: Value = serde_json::from_str(&std::fs::read_to_string(fixture("unet-a/config.json")).unwrap()).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..2000 {
        let (what, _) = mutated_config(&mut rng, &orig);
        for needle in
            ["= 0 ", "= -1 ", "= 2147483648 ", "= 9223372036854775808 ", "308", "= \"NaN\"", "= [] ", "removed"]
        {
            if what.contains(needle) {
                seen.insert(needle);
            }
        }
    }
    assert_eq!(seen.len(), 8, "mutations never produced some of the values: saw only {seen:?}");
}

// ---- PyTorch checkpoints ----

/// Mutations of a torch.save file: byte flips anywhere or in the pickle's region, truncations,
/// and (zip) corrupted directory sizes and offsets.
fn mutate_torch(rng: &mut Rng, orig: &[u8]) -> (String, Vec<u8>) {
    let mut b = orig.to_vec();
    match rng.below(4) {
        0 => {
            let k = 1 + rng.below(6);
            for _ in 0..k {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            (format!("{k} byte flips"), b)
        }
        1 => {
            // Flips in the first 1 KiB: the pickle of a zip (after its local header) or of a
            // legacy file, where opcodes, lengths and memo indices are.
            let i = rng.below(b.len().min(1024));
            b[i] = rng.next() as u8;
            (format!("byte {i} set"), b)
        }
        2 => {
            let n = rng.below(b.len());
            b.truncate(n);
            (format!("truncated to {n}"), b)
        }
        _ => {
            // A 4- or 8-byte little-endian field near the end (the zip directory) set to an edge value.
            let v = *rng.pick(&[0u64, 1, 0xFFFF_FFFF, u64::MAX, b.len() as u64, 1 << 40]);
            let i = b.len().saturating_sub(1 + rng.below(b.len().min(400)));
            let w = if rng.below(2) == 0 { 4 } else { 8 };
            let end = (i + w).min(b.len());
            b[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
            (format!("field at {i} = {v:#x}"), b)
        }
    }
}

#[test]
fn fuzz_torch_checkpoints() {
    use roentgen::io::torch::TorchFile;
    let (mut rng, mut found, tmp) = fuzz_start(0x5EED_0003);
    let dir = fixture("torch-files");
    let sources = ["dtypes.pt", "views-legacy.pt", "module.pt", "xrv-legacy.pt", "lightning.pt", "views-deflated.pt"];
    let originals: Vec<(&str, Vec<u8>)> = sources.iter().map(|s| (*s, std::fs::read(dir.join(s)).unwrap())).collect();
    let path = tmp.path().join("fuzzed.pt");
    let path_str = path.display().to_string();
    for i in 0..iters(1500) {
        let (src, orig) = rng.pick(&originals);
        let (what, bytes) = mutate_torch(&mut rng, orig);
        std::fs::write(&path, &bytes).unwrap();
        found.check(&format!("{src} ({what}, case {i})"), &path_str, || {
            let f = TorchFile::open(&path)?;
            // Every tensor the file claims must read (or fail with an error), never panic.
            for (_, t) in f.tensors() {
                f.read_f32(t)?;
            }
            Ok(())
        });
    }
    found.assert_clean("torch checkpoints");
}
