//! `roentgen serve` on loopback (issue 21): A1111's txt2img and img2img give the images `sample`
//! gives with the same settings; concurrent clients all get theirs; a full queue answers 429; bad
//! requests get a 4xx with a message and the server goes on serving; device memory stays flat; a
//! request whose client leaves is stopped.

mod common;
use base64::Engine;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::path::Path;

/// A running server, stopped when dropped.
struct Server {
    child: std::process::Child,
    port: u16,
    /// Its stderr lines after "listening on".
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `roentgen serve --port 0 args` and waits for its "listening on" line.
fn start(args: &[&str]) -> Server {
    let mut child = std::process::Command::new(roentgen_bin())
        .args(["serve", "--port", "0"])
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let port = loop {
        let line = lines.next().expect("the server exited before listening").unwrap();
        if let Some(rest) = line.split("http://127.0.0.1:").nth(1) {
            break rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap();
        }
    };
    // Keep draining its messages so that it never blocks on a full pipe.
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = log.clone();
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| sink.lock().unwrap().push(l)));
    Server { child, port, log }
}

/// One HTTP/1.1 request (Connection: close): (status, body).
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body); // a refused body may close the connection early
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn post(port: u16, path: &str, v: &Value) -> (u16, Value) {
    let (status, body) = http(port, "POST", path, v.to_string().as_bytes());
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// The RGB pixels of a base64 PNG.
fn pixels_b64(s: &str) -> Vec<u8> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.png");
    std::fs::write(&p, bytes).unwrap();
    roentgen::io::images::read_png(&p).unwrap().3
}

fn pixels_file(p: &Path) -> Vec<u8> {
    roentgen::io::images::read_png(p).unwrap().3
}

#[test]
fn txt2img_and_img2img_give_what_sample_gives() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let srv = start(&["--model", pipe.to_str().unwrap()]);
    let (status, body) = http(srv.port, "GET", "/health", b"");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(srv.port, "GET", "/v1/models", b"");
    assert!(status == 200 && body.contains("pipe-a"), "{body}");

    let req = json!({"prompt": "Large left pleural effusion.", "seed": 3, "steps": 4, "cfg_scale": 4,
        "width": 16, "height": 16, "batch_size": 2, "sampler_name": "Euler a", "styles": []});
    let (status, r) = post(srv.port, "/sdapi/v1/txt2img", &req);
    assert_eq!(status, 200, "{r}");
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["ignored_fields"], json!(["styles"]), "{info}");
    let out = dir.path().join("sample");
    sample_16px_args(&pipe, "4", &out)
        .opt("--prompt", "Large left pleural effusion.")
        .with(&["--seed", "3", "--num-images", "2", "--batch-size", "2", "--scheduler", "euler-a", "--guidance", "4"])
        .run_ok();
    for i in 0..2 {
        let want = pixels_file(&out.join(format!("3-000{i}.png")));
        assert_eq!(pixels_b64(r["images"][i].as_str().unwrap()), want, "txt2img image {i} differs from sample's");
    }

    let init = fixture("img2img/rgb-16x16.png");
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&init).unwrap());
    let req = json!({"prompt": "Large left pleural effusion.", "seed": 11, "steps": 6, "denoising_strength": 0.75,
        "init_images": [format!("data:image/png;base64,{b64}")], "sampler_name": "DDIM"});
    let (status, r) = post(srv.port, "/sdapi/v1/img2img", &req);
    assert_eq!(status, 200, "{r}");
    let out = dir.path().join("img2img");
    CliArgs::new(&["sample", "--prompt", "Large left pleural effusion."])
        .opt("--model", &pipe)
        .opt("--init-image", &init)
        .with(&["--strength", "0.75", "--steps", "6", "--seed", "11", "--scheduler", "ddim"])
        .opt("--out", &out)
        .run_ok();
    assert_eq!(pixels_b64(r["images"][0].as_str().unwrap()), pixels_file(&out.join("11-0000.png")));
}

#[test]
fn concurrent_clients_all_get_their_images() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let srv = start(&["--model", pipe.to_str().unwrap(), "--max-queue", "32"]);
    let port = srv.port;
    let req = |seed: u64| json!({"prompt": "Large right pleural effusion.", "seed": seed, "steps": 3, "width": 16, "height": 16});
    // The image each seed gives, asked alone.
    let alone: Vec<String> =
        (0..4).map(|s| post(port, "/sdapi/v1/txt2img", &req(s)).1["images"][0].as_str().unwrap().to_string()).collect();
    let clients: Vec<_> = (0..4u64)
        .map(|c| {
            std::thread::spawn(move || {
                (0..5u64)
                    .map(|k| {
                        let seed = (c + k) % 4;
                        let (status, r) = post(port, "/sdapi/v1/txt2img", &req(seed));
                        (seed, status, r["images"][0].as_str().unwrap_or_default().to_string())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut n = 0;
    for c in clients {
        for (seed, status, img) in c.join().unwrap() {
            assert_eq!(status, 200);
            assert_eq!(pixels_b64(&img), pixels_b64(&alone[seed as usize]), "seed {seed}: another image under load");
            n += 1;
        }
    }
    println!("{n} concurrent requests from 4 clients, each image equal to the one asked alone");
}

#[test]
fn a_full_queue_answers_429_and_bad_requests_get_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let srv = start(&["--model", pipe.to_str().unwrap(), "--max-queue", "1", "--max-body-mb", "1"]);
    let port = srv.port;
    // Bad requests, each answered and leaving the server up.
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("/sdapi/v1/txt2img", b"{not json".to_vec(), 400, "not JSON"),
        ("/sdapi/v1/txt2img", br#"{"prompt": "x", "steps": 0}"#.to_vec(), 400, "steps"),
        ("/sdapi/v1/txt2img", br#"{"prompt": "x", "width": 13}"#.to_vec(), 400, "multiples"),
        ("/sdapi/v1/txt2img", br#"{"prompt": "x", "sampler_name": "LMS"}"#.to_vec(), 400, "sampler_name"),
        ("/sdapi/v1/txt2img", br#"{"prompt": "x", "batch_size": 100}"#.to_vec(), 400, "batch_size"),
        ("/sdapi/v1/img2img", br#"{"prompt": "x", "init_images": ["!!!"]}"#.to_vec(), 400, "base64"),
        ("/sdapi/v1/img2img", br#"{"prompt": "x", "init_images": ["aGVsbG8="]}"#.to_vec(), 400, "init_images[0]"),
        ("/sdapi/v1/txt2img", vec![b' '; 2 << 20], 413, "larger than"),
        ("/nothing", b"{}".to_vec(), 404, "no such endpoint"),
    ];
    for (path, body, want, needle) in cases {
        let (status, text) = http(port, "POST", path, &body);
        assert_eq!(status, want, "{path} {text}");
        assert!(text.contains(needle), "{path}: {text}");
        assert_eq!(http(port, "GET", "/health", b"").0, 200, "the server stopped after {needle}");
    }
    // Eight slow requests at once: one runs, one waits, the rest are turned away with 429.
    let slow = json!({"prompt": "x", "steps": 40, "width": 16, "height": 16, "batch_size": 4, "seed": 1});
    let statuses: Vec<u16> = (0..8)
        .map(|_| {
            let s = slow.clone();
            std::thread::spawn(move || post(port, "/sdapi/v1/txt2img", &s).0)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    println!("statuses {statuses:?}");
    assert!(statuses.iter().any(|&s| s == 429), "{statuses:?}");
    assert!(statuses.iter().filter(|&&s| s == 200).count() >= 1, "{statuses:?}");
    assert!(statuses.iter().all(|&s| s == 200 || s == 429), "{statuses:?}");
}

/// A client that goes away mid-request stops its run between two U-Net calls (the server says
/// how far it got), and the device memory of the run is freed.
#[test]
fn a_request_whose_client_goes_away_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let srv = start(&["--model", pipe.to_str().unwrap()]);
    let port = srv.port;
    let health = || -> Value { serde_json::from_str(&http(port, "GET", "/health", b"").1).unwrap() };
    let loaded = health()["device_pool_bytes"].as_u64().unwrap();
    // Thousands of U-Net calls, asked on a connection that is then closed without reading.
    let slow = json!({"prompt": "x", "steps": 1000, "width": 16, "height": 16, "batch_size": 8, "seed": 1,
        "sampler_name": "Euler"})
    .to_string();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let head = format!(
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        slow.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(slow.as_bytes()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    drop(s);
    let t = std::time::Instant::now();
    let stopped = loop {
        let found = srv.log.lock().unwrap().iter().find(|l| l.contains("went away: stopped after")).cloned();
        if let Some(line) = found {
            break line;
        }
        assert!(t.elapsed().as_secs() < 20, "no stop was logged: {:?}", srv.log.lock().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    println!("{stopped} ({:.2} s after the client left)", t.elapsed().as_secs_f64());
    let words: Vec<usize> = stopped.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(words.len() == 2 && words[0] < words[1], "{stopped}");
    let small = json!({"prompt": "x", "steps": 2, "width": 16, "height": 16, "seed": 2});
    assert_eq!(post(port, "/sdapi/v1/txt2img", &small).0, 200);
    assert_eq!(health()["device_pool_bytes"].as_u64().unwrap(), loaded, "the stopped run left device memory");
}

/// 100 requests leave the device pools exactly as loaded and the resident memory flat (after
/// the first 20, which warm the allocator: at most 16 MiB more by the 100th).
#[test]
fn memory_stays_flat_over_100_requests() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let srv = start(&["--model", pipe.to_str().unwrap()]);
    let health = || -> Value { serde_json::from_str(&http(srv.port, "GET", "/health", b"").1).unwrap() };
    let loaded = health()["device_pool_bytes"].as_u64().unwrap();
    let mut rss20 = 0;
    for k in 0..100u64 {
        let req = json!({"prompt": "Large left pleural effusion.", "seed": k, "steps": 2, "width": 16, "height": 16});
        assert_eq!(post(srv.port, "/sdapi/v1/txt2img", &req).0, 200);
        if k == 19 {
            rss20 = health()["rss_bytes"].as_u64().unwrap();
        }
    }
    let h = health();
    let (pools, rss) = (h["device_pool_bytes"].as_u64().unwrap(), h["rss_bytes"].as_u64().unwrap());
    println!(
        "device pools {loaded} bytes loaded, {pools} after 100 requests; resident {rss20} after 20, {rss} after 100"
    );
    assert_eq!(pools, loaded);
    assert!(rss <= rss20 + (16 << 20), "resident memory grew from {rss20} to {rss}");
}

/// SIGTERM mid-request: the running request is answered, waiting ones get 503, no new connection
/// is taken, and the process exits with status 0.
#[test]
fn sigterm_finishes_the_running_request_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let mut srv = start(&["--model", pipe.to_str().unwrap()]);
    let port = srv.port;
    // Seconds of work, so that the signal comes while it runs.
    let slow = json!({"prompt": "x", "steps": 400, "width": 16, "height": 16, "batch_size": 4, "seed": 1});
    let small = json!({"prompt": "x", "steps": 2, "width": 16, "height": 16, "seed": 2});
    let running = std::thread::spawn(move || post(port, "/sdapi/v1/txt2img", &slow).0);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let waiting = std::thread::spawn(move || post(port, "/sdapi/v1/txt2img", &small).0);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let kill = std::process::Command::new("kill").args(["-TERM", &srv.child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let (first, second) = (running.join().unwrap(), waiting.join().unwrap());
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = srv.child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed().as_secs() < 30, "the server did not exit after SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    println!("running request {first}, waiting request {second}, exit {status}");
    assert_eq!((first, second), (200, 503));
    assert!(status.success(), "{status}");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "still accepting connections");
}
