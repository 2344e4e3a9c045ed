//! `roentgen serve`: a loaded pipeline answering AUTOMATIC1111's API (`POST /sdapi/v1/txt2img`,
//! `/sdapi/v1/img2img`: JSON in, base64 PNGs out), the API most Stable Diffusion clients speak,
//! plus `GET /health` and `GET /v1/models`.
//!
//! One thread accepts and parses requests; the calling thread owns the backend and runs one
//! request at a time, in arrival order, from a bounded queue. A request that finds the queue full
//! gets 429 with Retry-After at once; a malformed one gets a 4xx naming the problem, and the server
//! goes on. Each generation frees its device memory when done (`Pipeline::generate`), so memory
//! stays flat across requests (`/health` reports the device pools and the process's resident
//! memory). A request whose client has gone away (closed or reset its connection) is not run, or
//! is stopped between two U-Net calls when it is running ([`peer::client_gone`]). SIGTERM or
//! SIGINT stops it cleanly: no new connection is accepted, the running request finishes and is
//! answered, the waiting ones are answered 503, and the process exits with 0.

mod peer;

use crate::backend::Backend;
use crate::sample::edit::InitImage;
use crate::sample::init_image;
use crate::sample::pipeline::{Pipeline, SampleRequest};
use crate::sample::schedulers::{SchedulerKind, SchedulerOptions};
use anyhow::{anyhow, Result};
use base64::Engine;
use serde_json::{json, Value};
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// Requests waiting beyond the one running; more get 429.
    pub max_queue: usize,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// A request that waited longer than this in the queue is answered 503 instead of run.
    pub queue_timeout: Duration,
    /// Required as `Authorization: Bearer KEY` when set.
    pub api_key: Option<String>,
    /// The name `/v1/models` and the PNGs give the model.
    pub model_name: String,
}

/// Most images one request may ask for (batch_size × n_iter).
pub const MAX_IMAGES_PER_REQUEST: usize = 16;

/// The request fields the server reads; others are ignored and listed in the response's info.
const KNOWN_FIELDS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "cfg_scale",
    "width",
    "height",
    "batch_size",
    "n_iter",
    "sampler_name",
    "sampler_index",
    "init_images",
    "denoising_strength",
    "mask",
];

/// A parsed generation request, waiting for the device.
struct Job {
    http: tiny_http::Request,
    /// The client's address, to notice when it goes away.
    peer: Option<std::net::SocketAddr>,
    sample: SampleRequest,
    /// The JSON fields echoed back as A1111's `parameters`, and what `info` says.
    parameters: Value,
    info: Value,
    queued: Instant,
}

/// The size a request defaults to, and the VAE's scale factor (for init images).
#[derive(Clone, Copy)]
struct Defaults {
    width: usize,
    height: usize,
    factor: usize,
}

fn respond(req: tiny_http::Request, status: u16, body: &Value, extra: &[(&str, String)]) {
    let mut r = tiny_http::Response::from_string(body.to_string()).with_status_code(status);
    for (k, v) in std::iter::once(&("Content-Type", "application/json".to_string())).chain(extra) {
        if let Ok(h) = tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()) {
            r.add_header(h);
        }
    }
    // The client may have gone away; nothing more to do for it.
    let _ = req.respond(r);
}

fn error(req: tiny_http::Request, status: u16, message: impl std::fmt::Display) {
    respond(req, status, &json!({"error": message.to_string()}), &[]);
}

/// Set by SIGTERM/SIGINT; the accept and run loops poll it.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst); // async-signal-safe: one atomic store
}

/// How often the loops look at [`STOP`].
const POLL: Duration = Duration::from_millis(100);

/// The process's resident memory (Linux VmRSS), bytes.
fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Serves until SIGTERM or SIGINT.
pub fn serve(b: &mut dyn Backend, pipe: &Pipeline, o: &ServeOptions) -> Result<()> {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
    let server = tiny_http::Server::http((o.host.as_str(), o.port))
        .map_err(|e| anyhow!("$port: cannot listen on {}:{}: {e}", o.host, o.port))?;
    let bound = server.server_addr().to_ip();
    let addr = bound.map(|a| a.to_string()).unwrap_or_else(|| format!("{}:{}", o.host, o.port));
    let port = bound.map(|a| a.port()).unwrap_or(o.port);
    let f = pipe.vae_scale_factor();
    let [dh, dw] = pipe.unet.config.sample_size.unwrap_or([64, 64]);
    let defaults = Defaults { width: dw * f, height: dh * f, factor: f };
    let inpainting = pipe.unet.config.in_channels != pipe.vae.config.latent_channels;
    if o.host != "127.0.0.1" && o.host != "localhost" && o.host != "::1" && o.api_key.is_none() {
        crate::diag::warn(format!(
            "listening on {} without --api-key: anyone who can reach this address can use the model (there is no authentication)",
            o.host
        ));
    }
    eprintln!(
        "listening on http://{addr} (model {}; queue {}; POST /sdapi/v1/txt2img, /sdapi/v1/img2img)",
        o.model_name, o.max_queue
    );
    let (tx, rx) = sync_channel::<Job>(o.max_queue);
    let waiting = Arc::new(AtomicUsize::new(0));
    let pools = Arc::new(AtomicUsize::new(pool_bytes(b)));
    let accept = {
        let (waiting, pools) = (waiting.clone(), pools.clone());
        let (api_key, model, max_body, max_queue) =
            (o.api_key.clone(), o.model_name.clone(), o.max_body_bytes, o.max_queue);
        move || {
            let ctx = Accept { tx, waiting, pools, defaults, api_key, model, inpainting, max_body, max_queue };
            while !STOP.load(Ordering::SeqCst) {
                if let Ok(Some(req)) = server.recv_timeout(POLL) {
                    accept_one(req, &ctx);
                }
            }
            // Dropping the server closes the listening socket; dropping the sender ends the run
            // loop once the queue is empty.
        }
    };
    let acceptor = std::thread::Builder::new().name("accept".into()).spawn(accept)?;
    let mut refused = 0;
    loop {
        match rx.recv_timeout(POLL) {
            Ok(job) => {
                waiting.fetch_sub(1, Ordering::SeqCst);
                if STOP.load(Ordering::SeqCst) {
                    error(job.http, 503, "the server is stopping: not run");
                    refused += 1;
                } else {
                    run_job(b, pipe, job, o, port);
                    pools.store(pool_bytes(b), Ordering::SeqCst);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = acceptor.join();
    eprintln!("stopped by a signal; {refused} waiting request(s) answered 503");
    Ok(())
}

/// The bytes of the backend's pools (the loaded weights, and whatever a request left: nothing).
fn pool_bytes(b: &dyn Backend) -> usize {
    b.pool_sizes().iter().map(|(_, n)| n).sum()
}

/// What the accept thread needs.
struct Accept {
    tx: SyncSender<Job>,
    waiting: Arc<AtomicUsize>,
    pools: Arc<AtomicUsize>,
    defaults: Defaults,
    api_key: Option<String>,
    model: String,
    inpainting: bool,
    max_body: usize,
    max_queue: usize,
}

fn accept_one(mut req: tiny_http::Request, ctx: &Accept) {
    let Accept { tx, waiting, pools, defaults, api_key, model, inpainting, max_body, max_queue } = ctx;
    let (defaults, inpainting, max_body, max_queue) = (*defaults, *inpainting, *max_body, *max_queue);
    if let Some(key) = api_key {
        let want = format!("Bearer {key}");
        if !req.headers().iter().any(|h| h.field.equiv("Authorization") && h.value.as_str() == want) {
            return error(req, 401, "missing or wrong Authorization: Bearer <--api-key>");
        }
    }
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let method = req.method().clone();
    match (method, path.as_str()) {
        (tiny_http::Method::Get, "/health") => {
            let body = json!({"status": "ok", "queued": waiting.load(Ordering::SeqCst), "max_queue": max_queue,
                "device_pool_bytes": pools.load(Ordering::SeqCst), "rss_bytes": rss_bytes()});
            respond(req, 200, &body, &[])
        }
        (tiny_http::Method::Get, "/v1/models") => {
            respond(req, 200, &json!({"models": [{"id": model, "inpainting": inpainting}]}), &[])
        }
        (tiny_http::Method::Post, "/sdapi/v1/txt2img" | "/sdapi/v1/img2img") => {
            if req.body_length().is_some_and(|n| n > max_body) {
                return error(req, 413, format!("the body is larger than {max_body} bytes (--max-body-mb)"));
            }
            let mut body = Vec::new();
            let read = req.as_reader().take(max_body as u64 + 1).read_to_end(&mut body);
            if read.is_err() {
                return error(req, 400, "could not read the request body");
            }
            if body.len() > max_body {
                return error(req, 413, format!("the body is larger than {max_body} bytes (--max-body-mb)"));
            }
            let img2img = path.ends_with("img2img");
            let parsed = serde_json::from_slice::<Value>(&body)
                .map_err(|e| anyhow!("the body is not JSON: {e}"))
                .and_then(|v| parse(&v, img2img, defaults));
            let (sample, parameters, info) = match parsed {
                Ok(p) => p,
                Err(e) => return error(req, 400, format!("{e:#}").replace('$', "")),
            };
            waiting.fetch_add(1, Ordering::SeqCst);
            let peer = req.remote_addr().copied();
            match tx.try_send(Job { http: req, peer, sample, parameters, info, queued: Instant::now() }) {
                Ok(()) => {}
                Err(TrySendError::Full(job)) | Err(TrySendError::Disconnected(job)) => {
                    waiting.fetch_sub(1, Ordering::SeqCst);
                    let body = json!({"error": format!("the queue is full ({max_queue} waiting): retry later")});
                    respond(job.http, 429, &body, &[("Retry-After", "5".into())]);
                }
            }
        }
        (_, "/health" | "/v1/models" | "/sdapi/v1/txt2img" | "/sdapi/v1/img2img") => {
            error(req, 405, "method not allowed")
        }
        _ => error(req, 404, format!("no such endpoint: {path}")),
    }
}

/// A base64 image field (a data: URL prefix allowed) to its bytes.
fn image_field(v: &Value, field: &str) -> Result<Vec<u8>> {
    let s = v.as_str().ok_or_else(|| anyhow!("{field}: expected a base64 string"))?;
    let s = s.split_once(";base64,").map(|(_, b)| b).unwrap_or(s);
    base64::engine::general_purpose::STANDARD.decode(s.trim()).map_err(|e| anyhow!("{field}: not base64: {e}"))
}

/// The A1111 fields of `v` as a sample request (our defaults where a field is absent), the
/// parameters to echo and the info to return.
fn parse(v: &Value, img2img: bool, d: Defaults) -> Result<(SampleRequest, Value, Value)> {
    let obj = v.as_object().ok_or_else(|| anyhow!("the body must be a JSON object"))?;
    let uint = |k: &str, default: usize| -> Result<usize> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => {
                x.as_u64().map(|n| n as usize).ok_or_else(|| anyhow!("{k}: expected a non-negative integer, got {x}"))
            }
        }
    };
    let text = |k: &str| -> Result<String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(x) => x.as_str().map(str::to_string).ok_or_else(|| anyhow!("{k}: expected a string")),
        }
    };
    let number = |k: &str, default: f64| -> Result<f64> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x.as_f64().ok_or_else(|| anyhow!("{k}: expected a number, got {x}")),
        }
    };
    let seed = match obj.get("seed").and_then(Value::as_i64) {
        Some(s) if s >= 0 => s as u64,
        _ => {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.as_nanos() as u64).unwrap_or(0)
                % 1_000_000_007
        }
    };
    let sampler = text("sampler_name").and_then(|s| if s.is_empty() { text("sampler_index") } else { Ok(s) })?;
    let (scheduler, karras) = if sampler.is_empty() {
        (None, false)
    } else {
        let (k, karras) = SchedulerKind::from_a1111(&sampler).ok_or_else(|| {
            anyhow!("sampler_name {sampler:?}: expected one of Euler a, Euler, DDIM, PLMS (PNDM), DPM++ 2M, DPM++ 2M Karras")
        })?;
        (Some(k), karras)
    };
    let images = uint("batch_size", 1)? * uint("n_iter", 1)?;
    if images == 0 || images > MAX_IMAGES_PER_REQUEST {
        return Err(anyhow!("batch_size × n_iter = {images}: must be between 1 and {MAX_IMAGES_PER_REQUEST}"));
    }
    let (mut width, mut height) = (uint("width", d.width)?, uint("height", d.height)?);
    let init_image = if img2img {
        let list = obj
            .get("init_images")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("init_images: expected a list of one base64 image"))?;
        if list.len() != 1 {
            return Err(anyhow!("init_images: {} images; one is supported", list.len()));
        }
        let bytes = image_field(&list[0], "init_images[0]")?;
        let strength = number("denoising_strength", 0.75)?;
        let (w, h) = (obj.get("width").map(|_| width), obj.get("height").map(|_| height));
        let mut p = init_image::prepare_bytes(&bytes, "init_images[0]", h, w, d.factor, strength)?;
        (width, height) = (p.width, p.height);
        if let Some(m) = obj.get("mask").filter(|m| !m.is_null()) {
            let mask = image_field(m, "mask")?;
            p.init.mask = Some(init_image::prepare_mask_bytes(&mask, "mask", height, width)?.0);
        }
        Some(p.init)
    } else {
        None
    };
    let steps = uint("steps", 75)?;
    let guidance = number("cfg_scale", 4.0)? as f32;
    let ignored: Vec<&String> = obj.keys().filter(|k| !KNOWN_FIELDS.contains(&k.as_str())).collect();
    let strength = init_image.as_ref().map(|i: &InitImage| i.strength);
    let sample = SampleRequest {
        prompts: vec![text("prompt")?],
        negative_prompt: Some(text("negative_prompt")?).filter(|n| !n.is_empty()),
        num_images_per_prompt: images,
        batch_size: images.min(4),
        seed,
        // As `sample` (--rng native): the seed gives what torch gives on this CPU.
        rng_variant: crate::rng::torch::NormalVariant::native(),
        height,
        width,
        steps,
        guidance,
        scheduler,
        scheduler_options: SchedulerOptions { karras_sigmas: karras.then_some(true), ..Default::default() },
        latents_in: None,
        init_image,
    };
    let mut parameters = v.clone();
    if let Some(p) = parameters.as_object_mut() {
        p.remove("init_images");
        p.remove("mask");
    }
    let info = json!({"seed": seed, "width": width, "height": height, "steps": steps, "cfg_scale": guidance,
        "sampler_name": sampler, "denoising_strength": strength, "images": images, "ignored_fields": ignored});
    Ok((sample, parameters, info))
}

/// Why a run stopped early: its client went away.
#[derive(Debug)]
struct ClientGone;

impl std::fmt::Display for ClientGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client went away")
    }
}

impl std::error::Error for ClientGone {}

/// How often a running request looks for its client (a read of the kernel's TCP table).
const CLIENT_CHECK: Duration = Duration::from_millis(200);

fn run_job(b: &mut dyn Backend, pipe: &Pipeline, job: Job, o: &ServeOptions, port: u16) {
    let Job { http, peer, sample, parameters, mut info, queued } = job;
    let gone = || peer.is_some_and(|a| peer::client_gone(a, port));
    if gone() {
        return eprintln!("a request's client went away while it waited: not run");
    }
    let waited = queued.elapsed();
    if waited > o.queue_timeout {
        return error(http, 503, format!("waited {:.0} s in the queue (--timeout): not run", waited.as_secs_f64()));
    }
    // Messages name fields as the library does ($steps): here they are JSON fields.
    let plain = |e: &anyhow::Error| format!("{e:#}").replace('$', "");
    if let Err(e) = pipe.validate(&sample) {
        return error(http, 400, plain(&e));
    }
    let t0 = Instant::now();
    let mut warnings = Vec::new();
    let mut last_check = Instant::now();
    let mut progress = |done: usize, total: usize| -> Result<()> {
        if last_check.elapsed() >= CLIENT_CHECK {
            last_check = Instant::now();
            if gone() {
                eprintln!("a request's client went away: stopped after {done} of {total} U-Net calls");
                return Err(ClientGone.into());
            }
        }
        Ok(())
    };
    let out = pipe.generate(b, &sample, &mut progress, &mut |w| warnings.push(w));
    let out = match out {
        Ok(o) => o,
        Err(e) if e.is::<ClientGone>() => return,
        Err(e) => return error(http, if e.is::<crate::diag::SettingError>() { 400 } else { 500 }, plain(&e)),
    };
    let [c, h, w] = [pipe.vae.config.out_channels, sample.height, sample.width];
    let per = c * h * w;
    let mut images = Vec::with_capacity(out.num_images);
    for i in 0..out.num_images {
        let text = [
            ("prompt", sample.prompts[0].clone()),
            ("seed", sample.seed.to_string()),
            ("image_index", i.to_string()),
            ("model", o.model_name.clone()),
            ("software", format!("roentgen {} serve", env!("CARGO_PKG_VERSION"))),
        ];
        match crate::io::images::encode_png(&out.images[i * per..(i + 1) * per], c, h, w, false, &text) {
            Ok(png) => images.push(base64::engine::general_purpose::STANDARD.encode(png)),
            Err(e) => return error(http, 500, format!("encoding image {i}: {e:#}")),
        }
    }
    info["warnings"] = json!(warnings);
    info["seconds"] = json!(t0.elapsed().as_secs_f64());
    info["queued_seconds"] = json!(waited.as_secs_f64());
    respond(http, 200, &json!({"images": images, "parameters": parameters, "info": info.to_string()}), &[]);
}
