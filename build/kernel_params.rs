//! Typed launches, generated from the kernels' own signatures: for every `extern "C" __global__`
//! kernel in kernels/*.cu, a struct whose fields are the kernel's parameters, in order, named and
//! typed as the kernel declares them (a pointer is a device address, `u64`; `int` is `i32`,
//! `unsigned int` `u32`, `float` `f32`). The backend launches these structs, never argument lists,
//! so a launch with a missing, extra, swapped (of another type) or misnamed argument does not
//! compile, and a kernel whose signature changes breaks the build at every launch that no longer
//! fits. A parameter type the generator does not know fails the build, naming file, kernel and
//! parameter.
//!
//! Kernels instantiated by a macro as `NAME_bf16_d##H` (the bf16 attention kernels, one per head-dim
//! bucket H) must take exactly the parameters of their twin `NAME_f32`; they launch as the twin's
//! struct with `.bf16(H)`, and a numbered version `NAME_bf16_v2_d##H` with `.bf16_v2(H)`.

use std::fmt::Write as _;
use std::path::Path;

struct Kernel {
    file: String,
    /// The name, with `##H` where a macro pastes the head-dim bucket.
    name: String,
    params: Vec<(String, String)>,
}

/// The parameter list after `(` at `start`: up to the matching `)`.
fn balanced(text: &str, start: usize) -> &str {
    let mut depth = 0;
    for (i, c) in text[start..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &text[start + 1..start + i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses after byte {start}")
}

fn parse(file: &str, text: &str) -> Vec<Kernel> {
    let text = text.replace("\\\n", "\n");
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("__global__ void") {
        let at = from + at;
        from = at + 1;
        if !text[..at].trim_end().ends_with("extern \"C\"") {
            continue; // a mention in a comment, or a non-entry kernel
        }
        let mut rest = at + "__global__ void".len();
        rest += text[rest..].len() - text[rest..].trim_start().len();
        if text[rest..].starts_with("__launch_bounds__") {
            let open = rest + text[rest..].find('(').unwrap();
            rest = open + balanced(&text, open).len() + 2;
            rest += text[rest..].len() - text[rest..].trim_start().len();
        }
        let name_len = text[rest..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '#')).unwrap();
        let name = text[rest..rest + name_len].to_string();
        let open = rest + name_len + text[rest + name_len..].find('(').unwrap();
        let params = balanced(&text, open)
            .split(',')
            .map(|p| {
                let p = p.replace("__restrict__", "");
                let p = p.split_whitespace().collect::<Vec<_>>().join(" ");
                let split = p
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or_else(|| panic!("{file}: kernel {name}: cannot read parameter {p:?}"));
                (p[..=split].trim().to_string(), p[split + 1..].to_string())
            })
            .collect();
        out.push(Kernel { file: file.to_string(), name, params });
    }
    out
}

/// The Rust type of a kernel parameter, and how it becomes cuLaunchKernel's 64-bit slot.
fn rust_type(k: &Kernel, ty: &str, param: &str) -> (&'static str, &'static str) {
    if ty.ends_with('*') {
        return ("u64", "");
    }
    match ty {
        "int" => ("i32", " as u32 as u64"),
        "unsigned int" | "unsigned" => ("u32", " as u64"),
        "float" => ("f32", ".to_bits() as u64"),
        _ => panic!(
            "{}: kernel {}: parameter {param}: type {ty:?} has no launch mapping (build/kernel_params.rs)",
            k.file, k.name
        ),
    }
}

/// A parameter name as a Rust field (`in` is a keyword: `r#in`).
fn field(name: &str) -> String {
    const KEYWORDS: [&str; 12] =
        ["in", "type", "ref", "fn", "mod", "loop", "match", "move", "use", "where", "impl", "box"];
    if KEYWORDS.contains(&name) {
        format!("r#{name}")
    } else {
        name.to_string()
    }
}

fn camel(name: &str) -> String {
    name.split('_').filter(|s| !s.is_empty()).map(|s| s[..1].to_uppercase() + &s[1..]).collect()
}

/// A kernel's parameters as a launch sees them: (name, Rust type); two kernels of one shape launch
/// from each other's arguments (the pointee of a pointer may differ).
fn launch_shape(k: &Kernel) -> Vec<(String, &'static str)> {
    k.params.iter().map(|(ty, n)| (n.clone(), rust_type(k, ty, n).0)).collect()
}

/// `impl From<from's struct> for to's struct`, field by field (the callers check the shapes agree).
fn write_from(code: &mut String, from: &Kernel, to: &Kernel) {
    let fields: Vec<String> = from.params.iter().map(|(_, n)| format!("{0}: k.{0}", field(n))).collect();
    let _ = writeln!(
        code,
        "\nimpl From<{a}> for {b} {{\n    fn from(k: {a}) -> {b} {{\n        {b} {{ {f} }}\n    }}\n}}",
        a = camel(&from.name),
        b = camel(&to.name),
        f = fields.join(", ")
    );
}

/// Writes `$OUT_DIR/kernel_params.rs` from the kernels under `dir`.
pub fn generate(dir: &Path, out: &Path) {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("kernels/: cannot read")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();
    let mut code = String::from("// Generated by build.rs (build/kernel_params.rs) from kernels/*.cu. Do not edit.\n");
    let mut kernels = Vec::new();
    for path in files {
        let file = format!("kernels/{}", path.file_name().unwrap().to_string_lossy());
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        kernels.extend(parse(&file, &text));
    }
    for k in &kernels {
        if let Some(base) = k.name.strip_suffix("_d##H") {
            // A bucketed bf16 kernel takes exactly its f32 twin's parameters: it is launched as the
            // twin's struct `.bf16(head_bucket)`; a numbered version of it (`NAME_bf16_v2_d##H`)
            // as `.bf16_v2(head_bucket)`.
            let (unversioned, method) = match base.rsplit_once("_v") {
                Some((b, n)) if !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) => (b, format!("bf16_v{n}")),
                _ => (base, "bf16".to_string()),
            };
            let twin_name = unversioned.replace("_bf16", "_f32");
            let twin = kernels.iter().find(|t| t.name == twin_name).unwrap_or_else(|| {
                panic!("{}: kernel {}: no f32 twin {twin_name} to take its parameters from", k.file, k.name)
            });
            assert!(
                twin.params == k.params,
                "{}: kernel {}: parameters differ from {twin_name}'s, so it cannot launch as its bf16 instance",
                k.file,
                k.name
            );
            let _ = writeln!(
                code,
                "\nimpl {} {{\n    /// `{}` at head-dim bucket H, which takes the same parameters (build.rs checks).\n    pub fn {method}(self, head_bucket: usize) -> Bf16Bucket<Self> {{\n        Bf16Bucket {{ base: \"{base}\", head_bucket, kernel: self }}\n    }}\n}}",
                camel(&twin_name),
                k.name
            );
            continue;
        }
        assert!(!k.name.contains('#'), "{}: kernel {}: only a `_d##H` suffix is understood", k.file, k.name);
        let sig = k.params.iter().map(|(t, n)| format!("{t} {n}")).collect::<Vec<_>>().join(", ");
        let _ = writeln!(code, "\n/// `{}({sig})`, {}.", k.name, k.file);
        let _ = writeln!(
            code,
            "#[allow(non_snake_case)] // the kernel's own parameter names\npub(crate) struct {} {{",
            camel(&k.name)
        );
        let mut slots = Vec::new();
        for (ty, name) in &k.params {
            let (rty, conv) = rust_type(k, ty, name);
            let _ = writeln!(code, "    pub {}: {rty},", field(name));
            slots.push(format!("self.{}{conv}", field(name)));
        }
        let _ = writeln!(code, "}}\n\nimpl Kernel for {} {{", camel(&k.name));
        let _ = writeln!(
            code,
            "    fn name(&self) -> std::borrow::Cow<'static, str> {{\n        \"{}\".into()\n    }}",
            k.name
        );
        let _ = writeln!(code, "    fn params(&self) -> Vec<u64> {{\n        vec![{}]\n    }}\n}}", slots.join(", "));
    }
    // Precision variants of one kernel (`NAME`/`NAME_f32` and `NAME_bf16`, `NAME_bf16_copy`) take
    // the same parameters (names and launch types; the pointee may be bf16 instead of f32): each
    // variant converts from the first, so a launch builds its arguments once and picks the
    // variant. A variant whose parameters differ fails the build. A numbered version (`NAME_v3`,
    // issue 18's versioned kernels) converts likewise when it takes the same parameters; one with
    // other parameters (group norm's v2) has its own launch code and no conversion.
    let unversioned = |name: &str| -> Option<String> {
        match name.rsplit_once("_v") {
            Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => Some(base.to_string()),
            _ => None,
        }
    };
    let family = |name: &str| {
        let unversioned = unversioned(name).unwrap_or_else(|| name.to_string());
        let unversioned = unversioned.as_str();
        let base =
            ["_bf16_copy", "_bf16", "_f32"].iter().find_map(|s| unversioned.strip_suffix(s)).unwrap_or(unversioned);
        base.to_string()
    };
    let plain: Vec<&Kernel> = kernels.iter().filter(|k| !k.name.contains('#')).collect();
    for (i, first) in plain.iter().enumerate() {
        if plain[..i].iter().any(|k| family(&k.name) == family(&first.name)) {
            continue; // not the first of its family
        }
        for other in plain[i + 1..].iter().filter(|k| family(&k.name) == family(&first.name)) {
            // The element type behind a pointer may differ (bf16 against f32 buffers); the
            // names and the launch types may not.
            let shape = launch_shape;
            if shape(other) != shape(first) && unversioned(&other.name).is_some() {
                continue;
            }
            assert!(
                shape(other) == shape(first),
                "{}: kernel {}: parameters differ from {}'s, its precision variant",
                other.file,
                other.name,
                first.name
            );
            write_from(&mut code, first, other);
        }
    }
    // A numbered version's bf16-activation twin (`NAME_bf16_vN` beside `NAME_vN`, kernels/common.cuh
    // `ld_act`) converts from it likewise: the family rule above converts only from a family's
    // first kernel, which a version with its own parameters is not.
    for k in &plain {
        let Some((base, n)) = k.name.rsplit_once("_v") else { continue };
        let Some(base) = base.strip_suffix("_bf16") else { continue };
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let twin_name = format!("{base}_v{n}");
        let Some(twin) = plain.iter().find(|t| t.name == twin_name) else { continue };
        let first_of_family = plain.iter().find(|t| family(&t.name) == family(&twin.name)).unwrap();
        if first_of_family.name == twin.name {
            continue; // converted by the family rule
        }
        assert!(
            launch_shape(k) == launch_shape(twin),
            "{}: kernel {}: parameters differ from {twin_name}'s, its bf16-activation twin",
            k.file,
            k.name
        );
        write_from(&mut code, twin, k);
    }
    std::fs::write(out, code).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
}
