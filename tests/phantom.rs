//! `roentgen phantom` and `roentgen eval phantom` (issue 7): determinism, manifests, the class mix,
//! the sentences and their parser, and the measurement's accuracy on freshly drawn phantoms (seeds
//! that neither the measurement's baseline nor development used).

use rayon::prelude::*;
use roentgen::tools::phantom::eval::{
    evaluate, items_from_folder, items_from_manifest, png_text, tally, ClassStats, EvalOptions, Item,
};
use roentgen::tools::phantom::measure::{measure_gray, Measurement};
use roentgen::tools::phantom::parse::parse;
use roentgen::tools::phantom::spec::{draw_findings, Effusion, Findings, Laterality, Lobe, Pneumothorax, Side, Size};
use roentgen::tools::phantom::{self, report, write::write_phantoms};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect()
}

fn manifest(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("manifest.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn same_seed_same_bytes_and_image_i_does_not_depend_on_count() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, c, d) = (t.path().join("a"), t.path().join("b"), t.path().join("c"), t.path().join("d"));
    write_phantoms(&a, 12, 64, 7).unwrap();
    write_phantoms(&b, 12, 64, 7).unwrap();
    write_phantoms(&c, 12, 64, 8).unwrap();
    write_phantoms(&d, 5, 64, 7).unwrap();
    let (fa, fb, fc, fd) = (files(&a), files(&b), files(&c), files(&d));
    assert_eq!(fa.len(), 12 + 2, "12 PNGs, manifest.jsonl, summary.json: {:?}", fa.keys());
    assert_eq!(fa, fb, "same seed must write identical bytes");
    let differing = fa.iter().filter(|(k, v)| k.ends_with(".png") && fc.get(*k) != Some(v)).count();
    assert_eq!(differing, 12, "another seed must change every image");
    assert_ne!(fa["manifest.jsonl"], fc["manifest.jsonl"]);
    for (k, v) in fd.iter().filter(|(k, _)| k.ends_with(".png")) {
        assert_eq!(Some(v), fa.get(k), "{k}: image i must not depend on --count");
    }
}

#[test]
fn manifest_rows_match_images_texts_and_labels() {
    let t = tempfile::tempdir().unwrap();
    let summary = write_phantoms(t.path(), 80, 72, 11).unwrap();
    let rows = manifest(t.path());
    assert_eq!(rows.len(), 80);
    assert_eq!(summary.images, 80);
    let summary_json: Value = serde_json::from_slice(&std::fs::read(t.path().join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary_json["images"], 80);
    for row in &rows {
        let image = row["image"].as_str().unwrap();
        let text = row["text"].as_str().unwrap();
        let labels = &row["labels"];
        assert!(!text.trim().is_empty());
        let path = t.path().join(image);
        let (color, w, h, _, chunks) = roentgen::io::images::read_png(&path).unwrap();
        assert_eq!((color, w, h), (png::ColorType::Grayscale, 72, 72), "{image}");
        let chunk = |k: &str| chunks.iter().find(|c| c.0 == k).map(|c| c.1.clone());
        assert_eq!(chunk("prompt").as_deref(), Some(text), "{image}: prompt chunk");
        assert_eq!(png_text(&path, "prompt").unwrap().as_deref(), Some(text));
        let chunk_labels: Value = serde_json::from_str(&chunk("labels").unwrap()).unwrap();
        assert_eq!(&chunk_labels, labels, "{image}: labels chunk");

        // The text says exactly what the labels say: the labels of the findings parsed from the
        // text are the manifest's labels.
        let f = parse(text).findings().unwrap_or_else(|| panic!("{image}: {text:?} does not parse"));
        let ctr = labels["cardiothoracic_ratio"].as_f64().unwrap();
        assert_eq!(ctr > 0.5, f.cardiomegaly, "{text:?}: ratio {ctr}");
        assert_eq!(&f.labels_json(ctr), labels, "{image}: {text:?}");
        assert!(!labels["classes"].as_array().unwrap().is_empty());
    }
}

#[test]
fn label_distribution_gives_every_class_enough_samples() {
    let n = 20_000;
    let mut classes: BTreeMap<String, usize> = BTreeMap::new();
    let (mut multi, mut small, mut large) = (0, 0, 0);
    let mut lobes: BTreeMap<Lobe, usize> = BTreeMap::new();
    for i in 0..n {
        let f = draw_findings(&mut phantom::image_rng(2024, i));
        assert!(f.is_drawable(), "{f:?}");
        let c = f.classes();
        multi += (c.len() > 1) as usize;
        for k in c {
            *classes.entry(k).or_default() += 1;
        }
        for s in [f.effusion.map(|e| e.size), f.pneumothorax.map(|p| p.size)].into_iter().flatten() {
            if s == Size::Small {
                small += 1
            } else {
                large += 1
            }
        }
        if let Some(l) = f.consolidation {
            *lobes.entry(l).or_default() += 1;
        }
    }
    let frac = |k: &str| classes.get(k).copied().unwrap_or(0) as f64 / n as f64;
    println!("class mix over {n} draws:");
    for (k, v) in &classes {
        println!("  {k:<22}{:>6.1}%", 100.0 * *v as f64 / n as f64);
    }
    println!("  two findings: {:.1}%; small/large: {small}/{large}; lobes: {lobes:?}", 100.0 * multi as f64 / n as f64);
    assert!((0.22..0.28).contains(&frac("no-finding")), "no finding {}", frac("no-finding"));
    for k in [
        "cardiomegaly",
        "effusion-right",
        "effusion-left",
        "effusion-bilateral",
        "pneumothorax-right",
        "pneumothorax-left",
        "consolidation-right",
        "consolidation-left",
    ] {
        assert!(frac(k) > 0.05, "{k}: {}", frac(k));
    }
    for (r, l) in [("effusion-right", "effusion-left"), ("pneumothorax-right", "pneumothorax-left")] {
        assert!((frac(r) / frac(l) - 1.0).abs() < 0.1, "{r} {} vs {l} {}", frac(r), frac(l));
    }
    let (cr, cl) = (frac("consolidation-right"), frac("consolidation-left"));
    assert!((cr / cl - 1.0).abs() < 0.25, "consolidation right {cr} left {cl}");
    assert!((0.1..0.35).contains(&(multi as f64 / n as f64)));
    assert!((small as f64 / large as f64 - 1.0).abs() < 0.1);
    assert_eq!(lobes.len(), 6);
}

/// Every combination the generator draws.
fn all_findings() -> Vec<Findings> {
    let sizes = [Size::Small, Size::Large];
    let lats = [Laterality::Right, Laterality::Left, Laterality::Bilateral];
    let effs = lats.into_iter().flat_map(|l| sizes.map(|s| Some(Effusion { laterality: l, size: s })));
    let effs: Vec<Option<Effusion>> = std::iter::once(None).chain(effs).collect();
    let mut out: Vec<Findings> = Side::BOTH
        .into_iter()
        .flat_map(|side| sizes.map(|size| Some(Pneumothorax { side, size })))
        .chain([None])
        .map(|pneumothorax| Findings { pneumothorax, ..Findings::default() })
        .collect();
    for (cardiomegaly, &effusion) in [false, true].into_iter().flat_map(|c| effs.iter().map(move |e| (c, e))) {
        for consolidation in std::iter::once(None).chain(Lobe::ALL.map(Some)) {
            let f = Findings { cardiomegaly, effusion, pneumothorax: None, consolidation };
            if !f.is_normal() && f.is_drawable() {
                out.push(f);
            }
        }
    }
    out
}

#[test]
fn every_generated_phrasing_parses_back_to_its_findings() {
    let mut distinct = std::collections::BTreeSet::new();
    for f in all_findings() {
        for ctr in [0.42, 0.57, 0.6, 0.63] {
            let f = Findings { cardiomegaly: f.cardiomegaly && ctr > 0.5, ..f };
            for text in report::samples(&f, ctr, 40) {
                assert_eq!(parse(&text).findings(), Some(f), "{text:?}");
                distinct.insert(text);
            }
        }
    }
    println!("{} distinct sentences", distinct.len());
    for s in report::NORMAL {
        assert!(parse(s).normal && parse(s).classes() == ["no-finding"], "{s}");
    }
    // Phrasings the generator does not write but prompts may use.
    let cases: &[(&str, &[&str])] = &[
        ("Moderate right pleural effusion.", &["effusion-right"]),
        ("Left-sided pleural effusion, small.", &["effusion-left"]),
        ("Pleural effusions bilaterally with cardiomegaly.", &["cardiomegaly", "effusion-bilateral"]),
        ("No pneumothorax. Small left pleural effusion.", &["effusion-left"]),
        ("Small right PTX.", &["pneumothorax-right"]),
        ("Bilateral pneumothoraces.", &["pneumothorax"]),
        ("RLL consolidation.", &["consolidation-right"]),
        ("Left basilar opacity, likely pneumonia.", &["consolidation-left"]),
        ("Heart size is normal. The lungs are clear.", &["no-finding"]),
        ("The heart is not enlarged. No effusion.", &["no-finding"]),
        ("Pleural effusion.", &["effusion"]),
        ("Interval placement of a feeding tube.", &[]),
    ];
    for (text, want) in cases {
        assert_eq!(parse(text).classes(), *want, "{text:?}");
    }
    assert_eq!(parse("RLL consolidation.").consolidation, Some((Some(Side::Right), Some(Lobe::RightLower))));
    assert_eq!(parse("Left basilar opacity.").consolidation, Some((Some(Side::Left), Some(Lobe::LeftLower))));
    assert_eq!(
        parse("Cardiomegaly with small bilateral pleural effusions.").effusion,
        Some((Some(Laterality::Bilateral), Some(Size::Small)))
    );
}

/// Alters an image (pixels, side, index) as a generator might.
type Degrade = fn(&mut [f32], usize, u64);

/// Measures `n` fresh phantoms of seed `seed` at `size` (8-bit quantised, as written), optionally
/// degraded; returns the per-class tallies and, per finding, [false positives, images without it].
fn measure_fresh(
    seed: u64,
    n: u64,
    size: usize,
    degrade: Option<Degrade>,
) -> (BTreeMap<String, ClassStats>, BTreeMap<&'static str, [usize; 2]>) {
    let res: Vec<(Findings, String, Measurement)> = (0..n)
        .into_par_iter()
        .map(|i| {
            let g = phantom::generate(seed, i, size);
            let mut px: Vec<f32> = g.pixels.iter().map(|v| (v * 255.0).round() / 255.0).collect();
            if let Some(d) = degrade {
                d(&mut px, size, i);
            }
            (g.findings, g.text, measure_gray(&px, size, size))
        })
        .collect();
    let mut stats = BTreeMap::new();
    let mut fp: BTreeMap<&'static str, [usize; 2]> = BTreeMap::new();
    for (f, text, m) in &res {
        let req = parse(text);
        assert_eq!(req.findings(), Some(*f), "{text:?}");
        tally(&mut stats, &req, m);
        for (name, truth, seen) in [
            ("cardiomegaly", f.cardiomegaly, m.cardiomegaly),
            ("effusion", f.effusion.is_some(), m.effusion.is_some()),
            ("pneumothorax", f.pneumothorax.is_some(), m.pneumothorax.is_some()),
            ("consolidation", f.consolidation.is_some(), m.consolidation.is_some()),
        ] {
            if !truth {
                let e = fp.entry(name).or_default();
                e[0] += seen as usize;
                e[1] += 1;
            }
        }
    }
    (stats, fp)
}

fn table(title: &str, stats: &BTreeMap<String, ClassStats>, fp: &BTreeMap<&str, [usize; 2]>) {
    let pct = |r: Option<f64>| r.map_or("-".into(), |v| format!("{:.1}%", 100.0 * v));
    println!("{title}\n{:<22}{:>7}{:>9}{:>9}{:>9}{:>9}", "class", "images", "shown", "side", "lobe", "other");
    for (k, v) in stats {
        println!(
            "{k:<22}{:>7}{:>9}{:>9}{:>9}{:>9}",
            v.images,
            pct(v.shown_rate()),
            pct(v.side_rate()),
            pct(v.lobe_rate()),
            pct(v.other_rate())
        );
    }
    let fp: Vec<String> = fp.iter().map(|(k, [f, n])| format!("{k} {f}/{n}")).collect();
    println!("false positives (among images without the finding): {}", fp.join(", "));
}

fn assert_accuracy(stats: &BTreeMap<String, ClassStats>, fp: &BTreeMap<&str, [usize; 2]>, bar: f64) {
    assert_eq!(stats.len(), 9, "{:?}", stats.keys());
    for (k, v) in stats {
        assert!(v.images >= 15, "{k}: only {} images", v.images);
        assert!(v.shown_rate().unwrap() >= bar, "{k}: shown {:?}", v.shown_rate());
        if let Some(s) = v.side_rate() {
            assert!(s >= bar, "{k}: side {s}");
        }
        if let Some(l) = v.lobe_rate() {
            assert!(l >= bar, "{k}: lobe {l}");
        }
    }
    for (k, [f, n]) in fp {
        assert!((*f as f64) <= (1.0 - bar) * *n as f64, "{k}: {f} false positives in {n}");
    }
}

#[test]
fn measurement_recovers_labels_at_64_px() {
    let (stats, fp) = measure_fresh(0x6464_2025, 500, 64, None);
    table("fresh phantoms, 64 px (seed 0x64642025)", &stats, &fp);
    assert_accuracy(&stats, &fp, 0.9);
}

#[test]
fn measurement_recovers_labels_at_128_px() {
    let (stats, fp) = measure_fresh(0x1280_2025, 400, 128, None);
    table("fresh phantoms, 128 px (seed 0x12802025)", &stats, &fp);
    assert_accuracy(&stats, &fp, 0.9);
}

#[test]
fn measurement_recovers_labels_at_odd_sizes() {
    for (size, seed) in [(48, 481), (100, 1001), (256, 2561)] {
        let (stats, fp) = measure_fresh(seed, 180, size, None);
        table(&format!("fresh phantoms, {size} px"), &stats, &fp);
        for (k, v) in &stats {
            assert!(v.shown_rate().unwrap() >= 0.85 && v.side_rate().unwrap_or(1.0) >= 0.85, "{size} px {k}: {v:?}");
        }
    }
}

/// Blur by one analysis pixel (σ = size/64, separable Gaussian), exposure change and noise.
fn degrade(px: &mut [f32], size: usize, i: u64) {
    let (sigma, n) = (size as f32 / 64.0, size as isize);
    let r = (3.0 * sigma).ceil() as isize;
    let k: Vec<(isize, f32)> = (-r..=r).map(|t| (t, (-(t * t) as f32 / (2.0 * sigma * sigma)).exp())).collect();
    let ks: f32 = k.iter().map(|w| w.1).sum();
    let blur = |src: &[f32], (dx, dy): (isize, isize)| -> Vec<f32> {
        (0..n * n)
            .map(|p| {
                let (x, y) = (p % n, p / n);
                let at = |t: isize| src[((y + t * dy).clamp(0, n - 1) * n + (x + t * dx).clamp(0, n - 1)) as usize];
                k.iter().map(|&(t, w)| w * at(t)).sum::<f32>() / ks
            })
            .collect()
    };
    let b = blur(&blur(px, (1, 0)), (0, 1));
    let mut rng = roentgen::rng::splitmix::SplitMix64::new(i);
    let (gain, offset) = (0.8 + 0.3 * rng.next_f64() as f32, 0.08 * (rng.next_f64() as f32 - 0.5));
    for (o, v) in px.iter_mut().zip(b) {
        *o = ((v - 0.5) * gain + 0.5 + offset + 0.03 * rng.next_normal()).clamp(0.0, 1.0);
    }
}

/// Generated images are blurrier, noisier and differently exposed than phantoms.
#[test]
fn measurement_tolerates_blur_noise_and_exposure() {
    let (stats, fp) = measure_fresh(0xB1E5, 400, 64, Some(degrade));
    table("blurred (σ = 1 analysis pixel), noise σ 0.03, gain 0.8–1.1, offset ±0.04, 64 px", &stats, &fp);
    assert_accuracy(&stats, &fp, 0.85);
}

/// The measurement does not size pneumothoraces: compare with the size set to small.
fn small_ptx(mut f: Findings) -> Findings {
    if let Some(p) = f.pneumothorax.as_mut() {
        p.size = Size::Small;
    }
    f
}

/// The same thorax (same random draws) with the finding moved to the other side: the measured side
/// follows the image, not anything else.
#[test]
fn moving_a_finding_to_the_other_side_moves_the_measured_side() {
    let size = 64;
    let flip_lobe = |l: Lobe| match l {
        Lobe::RightUpper => Lobe::LeftUpper,
        Lobe::RightMiddle => Lobe::Lingula,
        Lobe::RightLower => Lobe::LeftLower,
        Lobe::LeftUpper => Lobe::RightUpper,
        Lobe::Lingula => Lobe::RightMiddle,
        Lobe::LeftLower => Lobe::RightLower,
    };
    let flip_lat = |l: Laterality| match l {
        Laterality::Right => Laterality::Left,
        Laterality::Left => Laterality::Right,
        x => x,
    };
    let mut checked = 0;
    for i in 0..120u64 {
        let f = draw_findings(&mut phantom::image_rng(4242, i));
        if f.effusion.is_none() && f.pneumothorax.is_none() && f.consolidation.is_none() {
            continue;
        }
        let flipped = Findings {
            effusion: f.effusion.map(|e| Effusion { laterality: flip_lat(e.laterality), ..e }),
            pneumothorax: f.pneumothorax.map(|p| Pneumothorax { side: p.side.other(), ..p }),
            consolidation: f.consolidation.map(flip_lobe),
            ..f
        };
        let rng = phantom::image_rng(777, i);
        let (a, b) = (
            phantom::generate_from(f, &mut rng.clone(), size),
            phantom::generate_from(flipped, &mut rng.clone(), size),
        );
        let (ma, mb) = (measure_gray(&a.pixels, size, size), measure_gray(&b.pixels, size, size));
        assert_eq!(ma.findings(), small_ptx(f), "{}", a.text);
        assert_eq!(mb.findings(), small_ptx(flipped), "{}", b.text);
        checked += 1;
    }
    assert!(checked > 60, "{checked}");
}

#[test]
fn eval_reads_a_phantom_folder_and_its_manifest() {
    let t = tempfile::tempdir().unwrap();
    write_phantoms(t.path(), 90, 64, 5150).unwrap();
    let from_folder = items_from_folder(t.path()).unwrap();
    let from_manifest = items_from_manifest(&t.path().join("manifest.jsonl"), None).unwrap();
    assert_eq!(from_folder.len(), 90);
    let key = |v: &[Item]| v.iter().map(|i| (i.path.clone(), i.prompt.clone())).collect::<Vec<_>>();
    assert_eq!(key(&from_folder), key(&from_manifest));
    let opts = EvalOptions { reference_count: 12, reference_seed: 3, reference_size: None };
    let report = evaluate(&from_folder, &opts).unwrap();
    print!("{}", report.render_table());
    assert_eq!(report.reference_size, 64);
    assert!(report.unparsed.is_empty());
    for (k, v) in &report.classes {
        assert!(v.shown_rate().unwrap() >= 0.8, "{k}: {v:?}");
        let r = &report.reference[k];
        assert_eq!(r.images, 12, "{k}");
        assert!(r.shown_rate().unwrap() >= 0.8, "reference {k}: {r:?}");
    }
    let js = report.to_json(true);
    assert_eq!(js["evaluated"], 90);
    assert_eq!(js["per_image"].as_array().unwrap().len(), 90);
    assert!(js["classes"]["no-finding"]["reference"]["shown"].as_f64().is_some());
    assert!(js["per_image"][0]["measurement"]["scores"]["ctr"].as_f64().is_some());
}

#[test]
fn eval_counts_samples_by_prompt_with_rgb_and_unknown_prompts() {
    // Images as `roentgen sample` writes them: RGB, prompt chunk; one prompt names no finding.
    let t = tempfile::tempdir().unwrap();
    let mut rng = phantom::image_rng(77, 0);
    let want =
        Findings { effusion: Some(Effusion { laterality: Laterality::Left, size: Size::Large }), ..Default::default() };
    for i in 0..4 {
        let g = phantom::generate_from(want, &mut rng, 96);
        let rgb: Vec<f32> = [g.pixels.clone(), g.pixels.clone(), g.pixels.clone()].concat();
        let prompt =
            if i == 3 { "A photograph of a cat.".to_string() } else { "Large left pleural effusion.".to_string() };
        let p = t.path().join(format!("42-{i:04}.png"));
        roentgen::io::images::write_png(
            &p,
            &roentgen::io::images::encode_png(&rgb, 3, 96, 96, false, &[("prompt", prompt), ("seed", "42".into())])
                .unwrap(),
        )
        .unwrap();
    }
    let items = items_from_folder(t.path()).unwrap();
    let report =
        evaluate(&items, &EvalOptions { reference_count: 4, reference_seed: 1, reference_size: Some(64) }).unwrap();
    assert_eq!(report.unparsed.len(), 1);
    let c = &report.classes["effusion-left"];
    assert_eq!((c.images, c.shown, c.side_right), (3, 3, 3));
    assert_eq!(report.reference["effusion-left"].images, 4);
}

#[test]
fn bad_input_gets_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    // The library names the settings by field (the command line renders them as flags: the
    // phantom rows of tests/error_messages.rs).
    let e = write_phantoms(&t.path().join("x"), 0, 64, 0).unwrap_err().to_string();
    assert!(e.contains("`count` 0"), "{e}");
    let e = format!("{:#}", write_phantoms(&t.path().join("x"), 4, 31, 0).unwrap_err());
    assert!(e.contains("`size` 31") && e.contains("32"), "{e}");

    let empty = t.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "x").unwrap();
    let e = format!("{:#}", items_from_folder(&empty).unwrap_err());
    assert!(e.contains("no PNG images"), "{e}");

    let bare = t.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    roentgen::io::images::write_png(
        &bare.join("a.png"),
        &roentgen::io::images::encode_png(&vec![0.5; 64 * 64], 1, 64, 64, true, &[]).unwrap(),
    )
    .unwrap();
    let e = format!("{:#}", items_from_folder(&bare).unwrap_err());
    assert!(e.contains("a.png") && e.contains("\"prompt\"") && e.contains("$manifest"), "{e}");

    let m = t.path().join("m.jsonl");
    std::fs::write(&m, "{\"image\": \"a.png\"}\n").unwrap();
    let e = format!("{:#}", items_from_manifest(&m, Some(&bare)).unwrap_err());
    assert!(e.contains("m.jsonl:1") && e.contains("\"text\""), "{e}");

    std::fs::write(&m, "{\"image\": \"a.png\", \"text\": \"Status post sternotomy.\"}\n").unwrap();
    let items = items_from_manifest(&m, Some(&bare)).unwrap();
    let opts = EvalOptions { reference_count: 0, reference_seed: 1, reference_size: None };
    let e = format!("{:#}", evaluate(&items, &opts).unwrap_err());
    assert!(e.contains("none of the 1 prompts"), "{e}");

    std::fs::write(&m, "{\"image\": \"missing.png\", \"text\": \"Cardiomegaly.\"}\n").unwrap();
    let items = items_from_manifest(&m, Some(&bare)).unwrap();
    let e = format!("{:#}", evaluate(&items, &opts).unwrap_err());
    assert!(e.contains("missing.png"), "{e}");
}

// The CLI arguments as the binary parses them: defaults and the errors that name a flag.
#[test]
fn cli_arguments_defaults_and_errors() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_str().unwrap();
    let help = String::from_utf8_lossy(&roentgen(&["phantom", "--help"]).stdout).to_string();
    for (flag, default) in [("--count", "1000"), ("--size", "128"), ("--seed", "0")] {
        let line = help.lines().find(|l| l.contains(flag)).unwrap_or_else(|| panic!("no {flag} in:\n{help}"));
        assert!(line.contains(&format!("[default: {default}]")), "{flag}: {line}");
    }
    let out = roentgen(&["phantom", "--out", dir, "--count", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--count"), "{err}");
    let out = roentgen(&["eval", "phantom"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--images") && err.contains("--manifest"), "{err}");
    let out = roentgen(&["phantom", "--out", dir, "--count", "24", "--size", "64", "--seed", "9"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(manifest(t.path()).len(), 24);
    let m = t.path().join("manifest.jsonl");
    let out = roentgen(&["eval", "phantom", "--manifest", m.to_str().unwrap(), "--reference-count", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

// The CLI end to end.

fn roentgen(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_roentgen")).args(args).output().unwrap()
}

#[test]
fn cli_phantom_then_eval_phantom() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_str().unwrap();
    let out = roentgen(&["phantom", "--out", dir, "--count", "40", "--size", "64", "--seed", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("no-finding") && stdout.contains("manifest.jsonl"), "{stdout}");
    assert_eq!(manifest(t.path()).len(), 40);

    let out = roentgen(&["eval", "phantom", "--images", dir, "--json", "--reference-count", "8"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let js: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(js["evaluated"], 40);
    assert!(js["classes"].as_object().unwrap().len() >= 4);

    let m = t.path().join("manifest.jsonl");
    let out = roentgen(&["eval", "phantom", "--manifest", m.to_str().unwrap(), "--reference-count", "4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("shown"));
}

#[test]
fn cli_bad_input() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_str().unwrap();
    for (args, needle) in [
        (vec!["phantom", "--out", dir, "--count", "0"], "--count"),
        (vec!["phantom", "--out", dir, "--size", "16"], "--size"),
        (vec!["eval", "phantom", "--images", dir], "no PNG images"),
        (vec!["eval", "phantom"], "--images"),
    ] {
        let out = roentgen(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
