//! PyTorch checkpoints read without Python (src/io/torch) against what PyTorch reads from the same
//! files (fixture by tests/fixtures/generate_torch_files.py): every storage type, views sharing a
//! storage (strides, offsets, 0-d, empty), a whole pickled module and torchxrayvision's DenseNet
//! (state_dict() names), a Lightning-style checkpoint, both container formats (zip and legacy),
//! a deflated zip; and pickles that would run code, refused by the global's name.

mod common;

use common::*;
use roentgen::io::torch::{Format, TorchFile};
use serde_json::Value;

fn dir() -> std::path::PathBuf {
    fixture("torch-files")
}

#[test]
fn tensors_equal_what_pytorch_reads() {
    let want: Value = serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir().join("expected.safetensors")).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = 0;
    for (file, names) in want["names"].as_object().unwrap() {
        let f = TorchFile::open(&dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        assert_eq!(f.format, if file.contains("legacy") { Format::Legacy } else { Format::Zip }, "{file}");
        let got: Vec<&str> = f.tensors().iter().map(|(n, _)| n.as_str()).collect();
        let names: Vec<&str> = names.as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
        assert_eq!(got, names, "{file}: names and order as state_dict()");
        let stem = file.strip_suffix(".pt").unwrap();
        for (name, t) in f.tensors() {
            let r = reference.tensor(&format!("{stem}/{name}")).unwrap();
            assert_eq!(t.shape, r.shape(), "{file} {name}: shape");
            assert_eq!(t.dtype.name(), format!("{:?}", r.dtype()), "{file} {name}: dtype");
            assert_eq!(f.bytes(t).unwrap().as_ref(), r.data(), "{file} {name}: bytes");
            checked += 1;
        }
    }
    println!("{checked} tensors equal to PyTorch's, byte for byte");
    assert_eq!(checked, reference.len(), "every reference tensor checked");
}

#[test]
fn values_convert_to_f32_as_pytorch_does() {
    let f = TorchFile::open(&dir().join("dtypes.pt")).unwrap();
    let bytes = std::fs::read(dir().join("expected.safetensors")).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // PyTorch's own conversion of each dtype to float32, computed here from the reference bytes.
    for (name, t) in f.tensors() {
        let got = f.read_f32(t).unwrap();
        let r = reference.tensor(&format!("dtypes/{name}")).unwrap();
        let d = r.data();
        let want: Vec<f32> = match name.as_str() {
            "float32" => d.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
            "float16" => d.chunks(2).map(|b| half::f16::from_le_bytes(b.try_into().unwrap()).to_f32()).collect(),
            "bfloat16" => d.chunks(2).map(|b| half::bf16::from_le_bytes(b.try_into().unwrap()).to_f32()).collect(),
            "float64" => d.chunks(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            "int64" => d.chunks(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            "int32" => d.chunks(4).map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            "int16" => d.chunks(2).map(|b| i16::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            "int8" => d.iter().map(|&b| b as i8 as f32).collect(),
            "uint8" => d.iter().map(|&b| b as f32).collect(),
            "bool" => d.iter().map(|&b| b as f32).collect(),
            other => panic!("unexpected tensor {other}"),
        };
        assert_eq!(got, want, "{name}");
        assert!(want.iter().any(|&x| x != want[0]), "{name}: seeded values vary");
    }
}

#[test]
fn pickles_that_call_code_are_refused_by_name() {
    for (file, global) in [
        ("evil-system.pt", "posix.system"),
        ("evil-eval.pt", "builtins.eval"),
        ("evil-getattr.pt", "builtins.getattr"),
        ("evil-system-legacy.pt", "posix.system"),
    ] {
        let err = format!("{:#}", TorchFile::open(&dir().join(file)).err().unwrap_or_else(|| panic!("{file} opened")));
        println!("{file}: {err}");
        assert!(err.contains(&format!("refuses to call {global}")) && err.contains(file), "{file}: {err}");
    }
}

/// The published form of TorchXRayVision's weights (a whole pickled DenseNet) feeds our DenseNet
/// directly: its state_dict() names are the ones the network loads, and the features equal what
/// torchxrayvision computes from the same file (tiny DenseNet: growth 4, blocks 1-1).
#[test]
fn xrv_module_file_gives_torchxrayvision_features() {
    use roentgen::eval::densenet::{preprocess, DenseNet, DenseNetConfig};
    use roentgen::eval::features::load_image;
    use roentgen::eval::tensors::{Weights, WeightsFile};
    let file = WeightsFile::open(&dir().join("xrv.pt")).unwrap();
    let src = file.source().unwrap();
    assert!(src.describe().contains("a whole module (torchxrayvision.models.DenseNet)"), "{}", src.describe());
    let config =
        DenseNetConfig { growth_rate: 4, block_config: vec![1, 1], num_init_features: 8, bn_size: 4, in_channels: 1 };
    let weights = Weights { src: src.as_ref(), network: "tiny xrv" };
    let mut net = DenseNet::load(Box::new(roentgen::backend::cpu::CpuBackend::new()), &weights, config).unwrap();
    let inputs: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            let img = load_image(&fixture(&format!("fid/images/{n}.png"))).unwrap();
            preprocess(&img.pixels, img.height, img.width, img.channels)
        })
        .collect();
    let got: Vec<f32> = net.forward(&inputs).unwrap().concat();
    let (shape, want) = read_f32(&dir().join("xrv-features.safetensors"), "features");
    assert_eq!(shape, [3, 10]);
    assert_close("tiny xrv features2 from xrv.pt", &got, &want, F32_PARITY);
}

/// `eval fid` takes transformers' pytorch_model.bin (torch.save of a state dict) as it takes the
/// safetensors file: the same FID.
#[test]
fn eval_fid_reads_a_pytorch_weights_file() {
    let fid = |weights: std::path::PathBuf| -> Value {
        let (out, _) = CliArgs::new(&["eval", "fid", "--json", "--no-cache", "--features", "clip"])
            .opt("--real", fixture("fid/e2e/real"))
            .opt("--fake", fixture("fid/e2e/fake"))
            .opt("--weights", weights)
            .opt("--clip-config", fixture("fid/clip-tiny/config.json"))
            .run_ok();
        serde_json::from_str(&out).unwrap()
    };
    let a = fid(fixture("fid/clip-tiny/model.safetensors"));
    let b = fid(dir().join("clip-tiny-vision.bin"));
    println!("FID from safetensors {}, from pytorch_model.bin {}", a["fid"], b["fid"]);
    assert_eq!(a["fid"], b["fid"]);
    assert!(a["fid"].as_f64().unwrap() > 0.0);
}

/// A PyTorch file given for a network with a published release is hashed: another file gets a
/// warning naming both hashes (here before the error that it holds no Inception tensors).
#[test]
fn published_hash_mismatch_is_a_warning_naming_both() {
    let path = dir().join("dtypes.pt");
    let got = roentgen::io::published::sha256_file(&path).unwrap();
    let (code, _, err) = CliArgs::new(&["eval", "fid", "--features", "inception", "--no-cache"])
        .opt("--real", fixture("fid/e2e/real"))
        .opt("--fake", fixture("fid/e2e/fake"))
        .opt("--weights", &path)
        .run();
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("SHA-256 {got} is not the published pt_inception-2015-12-05-6726825d.pth's (6726825d…")),
        "{err}"
    );
    assert!(err.contains("tensor 'Conv2d_1a_3x3.conv.weight' is missing"), "{err}");
    // FIPS 180-2's first test vector: SHA-256("abc").
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("abc"), b"abc").unwrap();
    assert_eq!(
        roentgen::io::published::sha256_file(&tmp.path().join("abc")).unwrap(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

/// `roentgen convert`: the safetensors copy holds PyTorch's tensors byte for byte, with the
/// source's name and SHA-256 in its metadata; an existing output is refused, a forbidden call too.
#[test]
fn convert_writes_pytorchs_tensors_to_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("xrv.safetensors");
    let input = dir().join("xrv-legacy.pt");
    let (stdout, _) =
        CliArgs::new(&["convert", "--json"]).with(&[input.to_str().unwrap(), out.to_str().unwrap()]).run_ok();
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["tensors"], 43);
    assert_eq!(v["dtypes"]["I64"], 7, "num_batches_tracked stays int64");
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["source"], "xrv-legacy.pt");
    assert_eq!(meta["source_sha256"], roentgen::io::published::sha256_file(&input).unwrap());
    let got = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ref_bytes = std::fs::read(dir().join("expected.safetensors")).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&ref_bytes).unwrap();
    for name in got.names() {
        let (g, r) = (got.tensor(name).unwrap(), reference.tensor(&format!("xrv-legacy/{name}")).unwrap());
        assert_eq!((g.dtype(), g.shape(), g.data()), (r.dtype(), r.shape(), r.data()), "{name}");
    }
    let (code, _, err) = CliArgs::new(&["convert"]).with(&[input.to_str().unwrap(), out.to_str().unwrap()]).run();
    assert!(code != 0 && err.contains("the file exists; pass --overwrite"), "{err}");
    let evil = dir().join("evil-eval.pt");
    let (code, _, err) = CliArgs::new(&["convert"])
        .with(&[evil.to_str().unwrap(), tmp.path().join("e.safetensors").to_str().unwrap()])
        .run();
    assert!(code != 0 && err.contains("refuses to call builtins.eval"), "{err}");
    assert!(!tmp.path().join("e.safetensors").exists());
}

/// A pipeline folder whose U-Net is `diffusion_pytorch_model.bin` (older diffusers repositories)
/// loads it through the same reader and samples what the safetensors folder samples, bit for bit.
#[test]
fn a_component_folder_with_a_pytorch_bin_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let st = assemble_pipeline("pipe-a", &tmp.path().join("st"));
    let bin = assemble_pipeline("pipe-a", &tmp.path().join("bin"));
    std::fs::remove_file(bin.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::copy(dir().join("pipe-a-unet.bin"), bin.join("unet/diffusion_pytorch_model.bin")).unwrap();
    let sample = |model: &std::path::Path, tag: &str| {
        let dump = tmp.path().join(format!("{tag}.safetensors"));
        CliArgs::new(&["sample", "--prompt", "Large left pleural effusion.", "--seed", "3", "--steps", "3"])
            .with(&["--height", "16", "--width", "16"])
            .opt("--model", model)
            .opt("--out", tmp.path().join(tag))
            .opt("--dump", &dump)
            .run_ok();
        read_f32(&dump, "image").1
    };
    assert_eq!(sample(&bin, "bin"), sample(&st, "st"));
    let (out, _) = CliArgs::new(&["inspect", "--json"]).with(&[bin.join("unet").to_str().unwrap()]).run_ok();
    assert!(out.contains("diffusion_pytorch_model.bin"), "{out}");
}

/// A safetensors file whose header length starts with the byte 0x80 (as a pickle does) is still
/// read as safetensors.
#[test]
fn a_safetensors_file_is_not_taken_for_a_pickle() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("w.safetensors");
    // Pad the metadata until the header length's low byte is 0x80 and its next byte is 2.
    let mut pad = String::new();
    loop {
        let meta: std::collections::HashMap<String, String> = [("pad".to_string(), pad.clone())].into();
        let data = [1.5f32, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &data).unwrap();
        let bytes = safetensors::serialize(vec![("w", view)], Some(meta)).unwrap();
        if bytes[0] == 0x80 && bytes[1] == 2 {
            std::fs::write(&path, &bytes).unwrap();
            break;
        }
        pad.push('x');
        assert!(pad.len() < 1000);
    }
    assert!(!roentgen::io::torch::is_torch_file(&path));
    let f = roentgen::eval::tensors::WeightsFile::open(&path).unwrap();
    assert_eq!(f.source().unwrap().read("w").unwrap(), [1.5, -2.0]);
}
