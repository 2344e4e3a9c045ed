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
