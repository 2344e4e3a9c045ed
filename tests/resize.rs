//! Training-image preprocessing against diffusers' train_text_to_image (`convert("RGB")`, torchvision
//! `Resize(res, BILINEAR)` = Pillow's antialiased bilinear, `CenterCrop`, `ToTensor`, `Normalize`),
//! with the fixtures of tests/fixtures/generate_resize.py; and the decoder's refusals (decompression
//! bomb, truncated files, bad CRC), each an error naming the file.

mod common;

use common::{assert_close, fixture, read_f32};
use roentgen::train::data::{load_image, MAX_IMAGE_PIXELS};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

/// Records the largest single allocation made on the current thread, so a test can show that a
/// refused image never had its pixel buffer allocated.
struct PeakAlloc;

thread_local! {
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: the allocator may run while the thread-local is being torn down.
    let _ = PEAK.try_with(|p| p.set(p.get().max(size)));
}

unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(p, l, new_size)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// The cases tested below, in cases.json's order.
const CASES: [&str; 8] = ["gray8", "rgb8", "rgba8", "palette", "upscale", "noresize", "rgb16", "gray16"];

fn cases() -> Vec<serde_json::Value> {
    let p = fixture("resize/cases.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str::<Vec<serde_json::Value>>(&text).unwrap()
}

/// Our [3, res, res] for one case against the reference's. 8-bit samples go through the same integer
/// arithmetic as Pillow's and the same f32 operations as ToTensor/Normalize, so the bar is exact.
fn check(name: &str) {
    let all = cases();
    let case = all.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("{name}: not in cases.json"));
    let res = case["res"].as_u64().unwrap() as usize;
    let file = fixture(&format!("resize/{}", case["file"].as_str().unwrap()));
    let (shape, want) = read_f32(&fixture("resize/reference.safetensors"), case["reference"].as_str().unwrap());
    assert_eq!(shape, [3, res, res], "{name}: reference shape");
    let got = load_image(&file, res).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    println!(
        "{name}: {} {} (PIL mode {}) -> resized {}, crop (top, left) {}",
        case["file"], case["size"], case["pil_mode"], case["resized"], case["crop_top_left"]
    );
    assert_close(name, &got, &want, 0.0);
}

#[test]
fn gray8_shrunk_12x_with_odd_size_matches_pillow_bilinear() {
    check("gray8");
}

#[test]
fn rgb8_landscape_matches() {
    check("rgb8");
}

#[test]
fn rgba8_drops_alpha_like_convert_rgb() {
    check("rgba8");
}

#[test]
fn palette_png_matches() {
    check("palette");
}

#[test]
fn upscaling_matches() {
    check("upscale");
}

#[test]
fn short_side_already_at_resolution_is_only_cropped() {
    check("noresize");
}

#[test]
fn rgb16_keeps_the_high_byte_like_pillow() {
    check("rgb16");
}

/// Our decision for 16-bit gray (Pillow would clip it to 255): the high byte, i.e. what Pillow computes
/// for the same pixels stored as a 16-bit RGB PNG.
#[test]
fn gray16_matches_pillow_on_the_same_pixels_as_rgb16() {
    check("gray16");
}

#[test]
fn every_fixture_case_is_tested() {
    let names: Vec<String> = cases().iter().map(|c| c["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, CASES, "cases.json and the tests here disagree");
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// An error from load_image, as the CLI shows it (the whole context chain).
fn load_err(path: &Path) -> String {
    match load_image(path, 16) {
        Ok(_) => panic!("{}: loaded, expected an error", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// A valid PNG that decodes to 20000 × 20000 = 4·10⁸ pixels (2.2× the limit) yet is small: 1-bit
/// zeros. The refusal must come from the header, before a 400 MB pixel buffer exists.
#[test]
fn decompression_bomb_is_refused_before_allocation() {
    let dir = tempdir();
    let path = dir.path().join("bomb.png");
    let side = 20_000u32;
    {
        let file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let mut enc = png::Encoder::new(file, side, side);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::One);
        let mut w = enc.write_header().unwrap();
        let mut s = w.stream_writer().unwrap();
        let row = vec![0u8; side as usize / 8];
        for _ in 0..side {
            std::io::Write::write_all(&mut s, &row).unwrap();
        }
        s.finish().unwrap();
    }
    let size = std::fs::metadata(&path).unwrap().len();
    println!("bomb.png: {size} bytes on disk");
    assert!(size < 1 << 20, "the bomb should be small on disk ({size} bytes)");
    PEAK.with(|p| p.set(0));
    let msg = load_err(&path);
    let peak = PEAK.with(|p| p.get());
    println!("error: {msg}\nlargest allocation while refusing it: {peak} bytes");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("20000×20000") && msg.contains("400000000 pixels"), "{msg}");
    assert!(msg.contains(&MAX_IMAGE_PIXELS.to_string()), "{msg}");
    // Pillow's threshold: Image.open raises DecompressionBombError above 2 × 89478485 pixels.
    assert_eq!(MAX_IMAGE_PIXELS, 2 * 89_478_485);
    // The file itself is read (~50 KB) and the PNG reader buffers a few rows; 400 MB never appears.
    assert!(peak < 16 << 20, "largest allocation {peak} bytes: the pixel buffer was allocated");
}

/// The fixture gray8.png cut to 60 %: inside the IDAT stream.
#[test]
fn truncated_png_is_an_error_naming_the_file() {
    let bytes = std::fs::read(fixture("resize/gray8.png")).unwrap();
    let dir = tempdir();
    let path = dir.path().join("truncated.png");
    std::fs::write(&path, &bytes[..bytes.len() * 6 / 10]).unwrap();
    let msg = load_err(&path);
    println!("{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

/// Offsets of a PNG's chunks: (type, start of the length field, data length).
fn png_chunks(b: &[u8]) -> Vec<([u8; 4], usize, usize)> {
    let mut out = Vec::new();
    let mut at = 8;
    while at + 8 <= b.len() {
        let len = u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
        out.push((b[at + 4..at + 8].try_into().unwrap(), at, len));
        at += 12 + len;
    }
    out
}

/// gray8.png with one bit of the first IDAT chunk's stored CRC flipped: the data are intact, only the
/// checksum disagrees, so only a CRC check can catch it.
#[test]
fn png_with_a_bad_crc_is_an_error_naming_the_file() {
    let mut bytes = std::fs::read(fixture("resize/gray8.png")).unwrap();
    let (_, at, len) = *png_chunks(&bytes).iter().find(|c| &c.0 == b"IDAT").expect("an IDAT chunk");
    bytes[at + 8 + len] ^= 0x10;
    let dir = tempdir();
    let path = dir.path().join("bad-crc.png");
    std::fs::write(&path, &bytes).unwrap();
    let msg = load_err(&path);
    println!("{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

/// A JPEG (encoded here from the rgb8 fixture) cut in the middle of its scan. The complete file loads;
/// the truncated one is an error, as Pillow's "image file is truncated".
#[test]
fn truncated_jpeg_is_an_error_naming_the_file() {
    let img = image::open(fixture("resize/rgb8.png")).unwrap().to_rgb8();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90).encode_image(&img).unwrap();
    let dir = tempdir();
    let whole = dir.path().join("whole.jpg");
    std::fs::write(&whole, &jpeg).unwrap();
    let v = load_image(&whole, 16).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(v.iter().any(|&x| x != v[0]), "the complete JPEG decoded to a constant image");
    let path = dir.path().join("truncated.jpg");
    std::fs::write(&path, &jpeg[..jpeg.len() / 2]).unwrap();
    let msg = load_err(&path);
    println!("{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}
