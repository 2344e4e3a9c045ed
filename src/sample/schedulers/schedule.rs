//! What the five schedulers share: the training noise schedule (betas → `alphas_cumprod`), the
//! timestep spacings, sigma tables, Karras sigmas, and the numpy/torch arithmetic they are built
//! with, reproduced with the same dtypes and operation order as diffusers 0.42.1:
//!
//! - `torch.linspace(..., dtype=float32)`: ATen computes `step = (end - start) / (steps - 1)` in f32
//!   and each value as `start + step·i` (first half) or `end - step·(steps-1-i)` (second half). On
//!   x86-64 with AVX2 (any AVX-512 machine included) torch's kernels are built with FMA contraction,
//!   so those are fused multiply-adds; we use the fused form, which matches torch's default on such
//!   CPUs bit for bit (the scalar DEFAULT build differs by 1 ulp in about 15% of the betas).
//! - `torch.cumprod` of f32 on CPU accumulates in double (`acc_type<float, false>`) and rounds each
//!   partial product to f32.
//! - `t ** 0.5` on a float tensor is `sqrt`, `t ** 2` is `t * t` (ATen's pow special cases). The
//!   pinned torch's CPU float32 `sqrt` is not correctly rounded (±1 ulp from IEEE for about 20% of
//!   inputs, 0-dim tensors included); we take the IEEE `sqrt`, so a scheduler coefficient can be
//!   1 ulp off diffusers' and a step's sample 1–2 ulp off (the tests' bar allows far more).
//! - numpy's `linspace`, float `arange` and `interp` are computed in f64 exactly as numpy does
//!   (see each helper), and `round` is round-half-to-even.

use anyhow::Result;
use serde_json::Value;

use super::config::Config;

/// `prediction_type`: what the U-Net predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    /// The denoised sample itself (`"sample"`; Euler also accepts `"original_sample"`).
    Sample,
}

/// `timestep_spacing` (Table 2 of "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

pub(crate) const SPACINGS: [(&str, TimestepSpacing); 3] = [
    ("linspace", TimestepSpacing::Linspace),
    ("leading", TimestepSpacing::Leading),
    ("trailing", TimestepSpacing::Trailing),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    /// Glide's cosine schedule (`betas_for_alpha_bar`, max beta 0.999).
    SquaredCosCapV2,
}

/// The largest `num_train_timesteps` accepted (published models use 1000; 100× that is still a
/// few megabytes of tables).
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// `steps_offset`, read as every scheduler with leading spacing uses it: an integer between 0 and
/// `num_train_timesteps` (SD v1.x uses 1). Beyond that no timestep it shifts can be in the table
/// (diffusers would fail on indexing, or clamp), and the bound keeps the timestep arithmetic far
/// from overflow.
pub(crate) fn steps_offset(cfg: &Config, train: &TrainSchedule) -> Result<i64> {
    cfg.int_in("steps_offset", 0, 0, train.num_train_timesteps as i64)
}

/// The training noise schedule every scheduler is configured with.
#[derive(Clone, Debug)]
pub struct TrainSchedule {
    pub num_train_timesteps: usize,
    pub beta_schedule: BetaSchedule,
    /// `alphas_cumprod` (ᾱ_t), float32 as diffusers holds it.
    pub alphas_cumprod: Vec<f32>,
}

impl TrainSchedule {
    /// Reads `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`, `trained_betas` and
    /// (where the class has it) `rescale_betas_zero_snr`. The defaults are those of all five
    /// schedulers' `__init__`: 1000, 0.0001, 0.02, "linear".
    ///
    /// `zero_snr_floor`: Euler, Euler ancestral and DPM-Solver set `alphas_cumprod[-1] = 2**-24`
    /// after rescaling (so the last sigma is finite); DDIM keeps the exact zero.
    pub(crate) fn from_config(cfg: &Config, has_rescale: bool, zero_snr_floor: bool) -> Result<TrainSchedule> {
        // Bounded before any table is sized by it: diffusers would try (and a 2^31 value would take
        // gigabytes per table, 2^63 abort on allocation). At least 2: the schedules divide by n - 1.
        let n = cfg.int_in("num_train_timesteps", 1000, 2, MAX_TRAIN_TIMESTEPS as i64)? as usize;
        let beta_start = cfg.f64("beta_start", 0.0001)?;
        let beta_end = cfg.f64("beta_end", 0.02)?;
        let schedule = cfg.choice(
            "beta_schedule",
            BetaSchedule::Linear,
            &[
                ("linear", BetaSchedule::Linear),
                ("scaled_linear", BetaSchedule::ScaledLinear),
                ("squaredcos_cap_v2", BetaSchedule::SquaredCosCapV2),
            ],
        )?;
        cfg.require_default("trained_betas", &Value::Null, "null (betas from beta_start, beta_end, beta_schedule)")?;
        let mut betas = match schedule {
            BetaSchedule::Linear => torch_linspace_f32(beta_start, beta_end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), n).iter().map(|b| b * b).collect()
            }
            BetaSchedule::SquaredCosCapV2 => betas_for_alpha_bar(n, 0.999),
        };
        let rescale = has_rescale && cfg.bool("rescale_betas_zero_snr", false)?;
        if rescale {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let mut alphas_cumprod = cumprod_f32(&alphas);
        if rescale && zero_snr_floor {
            alphas_cumprod[n - 1] = 2f32.powi(-24);
        }
        for (i, (&b, &a)) in betas.iter().zip(&alphas_cumprod).enumerate() {
            if !(b.is_finite() && a.is_finite()) || a < 0.0 {
                return Err(cfg.error(
                    "beta_start/beta_end",
                    format!("beta_start {beta_start} and beta_end {beta_end} give an invalid beta {b} at timestep {i}"),
                ));
            }
        }
        Ok(TrainSchedule { num_train_timesteps: n, beta_schedule: schedule, alphas_cumprod })
    }

    /// ᾱ at `t`, or an error when diffusers would index out of range.
    pub(crate) fn alpha_cumprod(&self, t: i64) -> Result<f32> {
        usize::try_from(t).ok().and_then(|i| self.alphas_cumprod.get(i)).copied().ok_or_else(|| {
            anyhow::anyhow!("timestep {t} is outside the {} training timesteps", self.num_train_timesteps)
        })
    }

    /// `((1 - ᾱ) / ᾱ) ** 0.5` in float32, index = training timestep.
    pub(crate) fn sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
    }

    /// The sigma after the last step of the sigma-parametrised schedulers (`final_sigmas_type`):
    /// 0 (`zero`), or σ of timestep 0 (`sigma_min`).
    pub(crate) fn final_sigma(&self, sigma_min: bool) -> f32 {
        if sigma_min {
            let a0 = self.alphas_cumprod[0];
            ((1.0 - a0) / a0).sqrt()
        } else {
            0.0
        }
    }

    /// The full training sigma table, descending, with a final 0: the sigmas of the Euler family
    /// before `set_timesteps`.
    pub(crate) fn descending_sigmas_and_zero(&self) -> Vec<f32> {
        let mut sigmas = self.sigmas();
        sigmas.reverse();
        sigmas.push(0.0);
        sigmas
    }
}

pub(crate) fn prediction_type(cfg: &Config, allowed: &[(&str, PredictionType)]) -> Result<PredictionType> {
    cfg.choice("prediction_type", PredictionType::Epsilon, allowed)
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on CPU (FMA-contracted, see the module doc).
pub fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| if i < halfway { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - i - 1) as f32, end) })
        .collect()
}

/// `torch.cumprod` of a float32 tensor on CPU: a double accumulator, each partial product rounded.
pub fn cumprod_f32(x: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    x.iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` (cosine), in Python floats, returned as a float32 tensor.
fn betas_for_alpha_bar(n: usize, max_beta: f64) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
        c * c
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (Algorithm 1 of Lin et al. 2023), in float32 as it runs.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_ac: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_ac[0], sqrt_ac[sqrt_ac.len() - 1]);
    let scale = first / (first - last);
    for s in sqrt_ac.iter_mut() {
        *s = (*s - last) * scale;
    }
    let alphas_bar: Vec<f32> = sqrt_ac.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(betas.len());
    out.push(1.0 - alphas_bar[0]);
    for i in 1..alphas_bar.len() {
        out.push(1.0 - alphas_bar[i] / alphas_bar[i - 1]);
    }
    out
}

/// `np.linspace(start, stop, num)` (float64): `i * step + start`, the last value exactly `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut y: Vec<f64> =
        (0..num).map(|i| if step == 0.0 { i as f64 / div * delta + start } else { i as f64 * step + start }).collect();
    y[num - 1] = stop;
    y
}

/// `np.arange(start, stop, step)` in float64: numpy fills `start + i·delta` with
/// `delta = (start + step) - start` (not `step`), which matters where a value rounds at .5.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    // (also catches NaN from a zero or NaN step)
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// numpy's `round` (half to even).
pub fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, np.arange(len(fp)), fp)` in float64, as numpy computes it (exact hits return the
/// table value; outside the range, the end values).
pub fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    let last = (n - 1) as f64;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last {
        return fp[n - 1] as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j] as f64;
    }
    let (y0, y1) = (fp[j] as f64, fp[j + 1] as f64);
    let slope = (y1 - y0) / 1.0;
    slope * (x - j as f64) + y0
}

/// diffusers' `_convert_to_karras` (Karras et al. 2022, ρ = 7), in float64.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n).iter().map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho)).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma matches, by linear
/// interpolation in log space. `log_sigmas` is float32 (numpy's `log` of the f32 sigma table);
/// `low - high` is therefore an f32 difference, the rest f64, as numpy's type promotion gives.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // Index of the last log_sigma_i <= log_sigma (0 if none), at most len - 2.
    let mut low_idx = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            low_idx = i;
        }
    }
    let low_idx = low_idx.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// The integer timesteps of DDIM and PNDM for `n` steps, descending, as diffusers' `set_timesteps`
/// computes them for each spacing (PNDM's `_timesteps` is this list ascending).
pub(crate) fn discrete_timesteps(spacing: TimestepSpacing, train: usize, n: usize, steps_offset: i64) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (train - 1) as f64, n).iter().rev().map(|&x| np_round(x) as i64).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = train / n;
            (0..n).rev().map(|i| (i * ratio) as i64 + steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            np_arange(train as f64, 0.0, -(train as f64 / n as f64)).iter().map(|&x| np_round(x) as i64 - 1).collect()
        }
    }
}

/// Refuses a step out of order, for the multistep schedulers whose history assumes the order.
pub(crate) fn check_in_order(class: &str, expected: usize, step_index: usize) -> Result<()> {
    if step_index != expected {
        anyhow::bail!("{class}: steps must be taken in order (expected step {expected}, got {step_index})");
    }
    Ok(())
}

/// Validates `num_inference_steps` against the training schedule.
pub(crate) fn check_steps(class: &str, n: usize, train: usize) -> Result<()> {
    if n == 0 {
        anyhow::bail!("{class}: the number of inference steps must be at least 1");
    }
    if n > train {
        anyhow::bail!("{class}: {n} inference steps is more than the {train} training timesteps");
    }
    Ok(())
}

/// Checks a step call's buffers (they come from the caller, so this is an error, not a panic).
pub(crate) fn check_step_args(class: &str, model_output: &[f32], sample: &[f32], step: usize, n: usize) -> Result<()> {
    if n == 0 {
        anyhow::bail!("{class}: set_timesteps must be called before step");
    }
    if step >= n {
        anyhow::bail!("{class}: step index {step} is past the last of {n} timesteps");
    }
    if model_output.len() != sample.len() {
        anyhow::bail!("{class}: model output has {} values, the sample {}", model_output.len(), sample.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_and_round_match_numpy() {
        // np.round(np.arange(1000, 0, -1000/48))[:5] == [1000, 979, 958, 937, 917] (937.5 → 937 only
        // because numpy's fill makes it 937.4999…, and ties go to even anyway).
        let v: Vec<f64> = np_arange(1000.0, 0.0, -1000.0 / 48.0).iter().map(|&x| np_round(x)).collect();
        assert_eq!(&v[..5], &[1000.0, 979.0, 958.0, 937.0, 917.0]);
        assert_eq!(v.len(), 48);
        assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
    }
}
