//! `DPMSolverMultistepScheduler` with `algorithm_type: dpmsolver++` (Lu et al. 2022): "DPM++ 2M"
//! with the defaults (`solver_order: 2`, `solver_type: midpoint`), plus orders 1 and 3 and the Heun
//! second-order variant, which cost a few lines; as diffusers 0.42.1 runs them.
//!
//! Notes on matching diffusers:
//! - Timesteps are integers from `linspace(0, T-1, n+1)` rounded, reversed, the last dropped (class
//!   default spacing `linspace`); with Karras sigmas, from `_sigma_to_t` rounded (not rounded for
//!   `squaredcos_cap_v2`, then truncated to int64). Karras sigmas here span the full *training*
//!   table (σ of t=0 to t=T-1), unlike Euler's, which span the interpolated ones.
//! - The model works in (α_t, σ_t) = (1/sqrt(σ²+1), σ·α_t) and λ = ln α − ln σ, all float32 0-dim
//!   tensors in diffusers. With `final_sigmas_type: zero` the last sigma is 0, λ is +∞ and the last
//!   step (always first order then) returns the denoised estimate x₀ exactly.
//! - `lower_order_final` (default true) uses first/second order for the last steps when there are
//!   fewer than 15; the last step is first order whenever the final sigma is 0.
//! - `init_noise_sigma` is 1 and `scale_model_input` is the identity.
//! - `lambda_min_clipped` shortens the schedule as diffusers does (searchsorted on the flipped λ table).

use anyhow::Result;
use serde_json::Value;

use super::config::Config;
use super::schedule::{
    check_in_order, karras_sigmas, np_arange, np_interp, np_linspace, np_round, sigma_to_t, BetaSchedule,
    PredictionType, TimestepSpacing,
};
use super::{Common, Method, StepInput};
use crate::rng::torch::TorchGenerator;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

pub(crate) struct DpmSolverMultistep {
    solver_order: usize,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_min: bool,
    karras: bool,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    lambda_min_clipped: f64,
    // Multistep state, reset by set_timesteps.
    model_outputs: Vec<Option<Vec<f32>>>,
    lower_order_nums: usize,
    next_step: usize,
}

/// (α_t, σ_t) from σ, as `_sigma_to_alpha_sigma_t`, and λ = ln α − ln σ.
fn alpha_sigma_lambda(sigma: f32) -> (f32, f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

impl DpmSolverMultistep {
    pub(crate) fn from_config(cfg: &Config, c: &mut Common) -> Result<DpmSolverMultistep> {
        // "deis" is silently mapped to dpmsolver++ by diffusers itself.
        let algo = cfg.opt_str("algorithm_type")?.unwrap_or("dpmsolver++");
        if algo != "dpmsolver++" && algo != "deis" {
            return Err(cfg.unsupported("algorithm_type", &Value::from(algo), "dpmsolver++"));
        }
        // diffusers maps the UniPC/DEIS names "logrho", "bh1", "bh2" to midpoint.
        let solver_type = cfg.choice(
            "solver_type",
            SolverType::Midpoint,
            &[
                ("midpoint", SolverType::Midpoint),
                ("heun", SolverType::Heun),
                ("logrho", SolverType::Midpoint),
                ("bh1", SolverType::Midpoint),
                ("bh2", SolverType::Midpoint),
            ],
        )?;
        let solver_order = cfg.positive("solver_order", 2)?;
        if solver_order > 3 {
            return Err(cfg.unsupported("solver_order", &Value::from(solver_order), "1, 2, 3"));
        }
        cfg.require_default("thresholding", &Value::Bool(false), "false")?;
        cfg.require_default("variance_type", &Value::Null, "null")?;
        for field in ["use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"] {
            cfg.require_default(field, &Value::Bool(false), "false")?;
        }
        // Before set_timesteps, diffusers' sigmas are the full training table, descending.
        c.sigmas = c.train.sigmas();
        c.sigmas.reverse();
        Ok(DpmSolverMultistep {
            solver_order,
            solver_type,
            lower_order_final: cfg.bool("lower_order_final", true)?,
            euler_at_final: cfg.bool("euler_at_final", false)?,
            final_sigma_min: cfg.choice("final_sigmas_type", false, &[("zero", false), ("sigma_min", true)])?,
            karras: cfg.bool("use_karras_sigmas", false)?,
            sigma_min: cfg.opt_f64("sigma_min")?,
            sigma_max: cfg.opt_f64("sigma_max")?,
            lambda_min_clipped: cfg.f64("lambda_min_clipped", f64::NEG_INFINITY)?,
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
            next_step: 0,
        })
    }

    fn x0_pred(&self, prediction: PredictionType, sigma: f32, x: &[f32], m: &[f32]) -> Vec<f32> {
        let (alpha_t, sigma_t, _) = alpha_sigma_lambda(sigma);
        x.iter()
            .zip(m)
            .map(|(&x, &m)| match prediction {
                PredictionType::Epsilon => (x - sigma_t * m) / alpha_t,
                PredictionType::Sample => m,
                PredictionType::VPrediction => alpha_t * x - sigma_t * m,
            })
            .collect()
    }

    fn first_order(&self, sigmas: &[f32], i: usize, x: &[f32], m0: &[f32]) -> Vec<f32> {
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(sigmas[i + 1]);
        let (_, sigma_s, lambda_s) = alpha_sigma_lambda(sigmas[i]);
        let h = lambda_t - lambda_s;
        let c_x = sigma_t / sigma_s;
        let c_d0 = alpha_t * ((-h).exp() - 1.0);
        x.iter().zip(m0).map(|(&x, &d0)| c_x * x - c_d0 * d0).collect()
    }

    fn second_order(&self, sigmas: &[f32], i: usize, x: &[f32]) -> Vec<f32> {
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(sigmas[i + 1]);
        let (_, sigma_s0, lambda_s0) = alpha_sigma_lambda(sigmas[i]);
        let (_, _, lambda_s1) = alpha_sigma_lambda(sigmas[i - 1]);
        let n = self.model_outputs.len();
        let (m0, m1) = (self.model_outputs[n - 1].as_deref().unwrap(), self.model_outputs[n - 2].as_deref().unwrap());
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let inv_r0 = 1.0 / r0;
        let c_x = sigma_t / sigma_s0;
        let em1 = (-h).exp() - 1.0;
        let c_d0 = alpha_t * em1;
        x.iter()
            .zip(m0)
            .zip(m1)
            .map(|((&x, &m0), &m1)| {
                let d1 = inv_r0 * (m0 - m1);
                match self.solver_type {
                    SolverType::Midpoint => c_x * x - c_d0 * m0 - 0.5 * c_d0 * d1,
                    SolverType::Heun => c_x * x - c_d0 * m0 + alpha_t * (em1 / h + 1.0) * d1,
                }
            })
            .collect()
    }

    fn third_order(&self, sigmas: &[f32], i: usize, x: &[f32]) -> Vec<f32> {
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(sigmas[i + 1]);
        let (_, sigma_s0, lambda_s0) = alpha_sigma_lambda(sigmas[i]);
        let (_, _, lambda_s1) = alpha_sigma_lambda(sigmas[i - 1]);
        let (_, _, lambda_s2) = alpha_sigma_lambda(sigmas[i - 2]);
        let n = self.model_outputs.len();
        let m = |k: usize| self.model_outputs[n - k].as_deref().unwrap();
        let (m0, m1, m2) = (m(1), m(2), m(3));
        let (h, h_0, h_1) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
        let (r0, r1) = (h_0 / h, h_1 / h);
        let (inv_r0, inv_r1) = (1.0 / r0, 1.0 / r1);
        let c_mix = r0 / (r0 + r1);
        let c_d2 = 1.0 / (r0 + r1);
        let c_x = sigma_t / sigma_s0;
        let em1 = (-h).exp() - 1.0;
        let c0 = alpha_t * em1;
        let c1 = alpha_t * (em1 / h + 1.0);
        let c2 = alpha_t * (((-h).exp() - 1.0 + h) / (h * h) - 0.5);
        (0..x.len())
            .map(|j| {
                let d1_0 = inv_r0 * (m0[j] - m1[j]);
                let d1_1 = inv_r1 * (m1[j] - m2[j]);
                let d1 = d1_0 + c_mix * (d1_0 - d1_1);
                let d2 = c_d2 * (d1_0 - d1_1);
                c_x * x[j] - c0 * m0[j] + c1 * d1 - c2 * d2
            })
            .collect()
    }
}

impl Method for DpmSolverMultistep {
    fn set_begin_index(&mut self, begin: usize) {
        self.next_step = begin;
    }

    fn set_timesteps(&mut self, c: &mut Common) -> Result<()> {
        let (train, n) = (c.train.num_train_timesteps, c.num_inference_steps);
        // clipped_idx = searchsorted(flip(lambda_t), lambda_min_clipped): the number of λ below it.
        let clipped_idx = c
            .train
            .alphas_cumprod
            .iter()
            .filter(|&&a| ((a.sqrt().ln() - (1.0 - a).sqrt().ln()) as f64) < self.lambda_min_clipped)
            .count();
        let last_timestep = train - clipped_idx;
        let mut timesteps: Vec<f64> = match c.spacing {
            TimestepSpacing::Linspace => {
                let v = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1);
                v.iter().rev().take(n).map(|&x| np_round(x)).collect()
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (n + 1);
                (1..=n).rev().map(|i| (i * ratio) as f64 + c.steps_offset as f64).collect()
            }
            TimestepSpacing::Trailing => np_arange(last_timestep as f64, 0.0, -(train as f64 / n as f64))
                .iter()
                .map(|&x| np_round(x) - 1.0)
                .collect(),
        };
        let table = c.train.sigmas();
        let sigmas: Vec<f64> = if self.karras {
            let log_sigmas: Vec<f32> = table.iter().map(|s| s.ln()).collect();
            // _convert_to_karras(in_sigmas=flip(table)): σ_min = table[0], σ_max = table[T-1].
            let lo = self.sigma_min.unwrap_or(table[0] as f64);
            let hi = self.sigma_max.unwrap_or(table[train - 1] as f64);
            let s = karras_sigmas(lo, hi, n);
            let round = c.train.beta_schedule != BetaSchedule::SquaredCosCapV2;
            timesteps = s
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    if round {
                        np_round(t)
                    } else {
                        t
                    }
                })
                .collect();
            s
        } else {
            timesteps.iter().map(|&t| np_interp(t, &table)).collect()
        };
        let last = c.train.final_sigma(self.final_sigma_min);
        c.sigmas = sigmas.iter().map(|&s| s as f32).chain([last]).collect();
        // `.to(torch.int64)` truncates toward zero.
        c.timesteps = timesteps.iter().map(|&t| t.trunc()).collect();
        self.model_outputs = vec![None; self.solver_order];
        self.lower_order_nums = 0;
        self.next_step = 0;
        Ok(())
    }

    fn step(&mut self, c: &Common, s: StepInput, _generator: &mut TorchGenerator) -> Result<Vec<f32>> {
        let StepInput { model_output, index: step_index, sample } = s;
        let len = c.timesteps.len();
        check_in_order("DPMSolverMultistepScheduler", self.next_step, step_index)?;
        let i = step_index;
        let lower_order_final =
            i == len - 1 && (self.euler_at_final || (self.lower_order_final && len < 15) || !self.final_sigma_min);
        let lower_order_second = i + 2 == len && self.lower_order_final && len < 15;
        let x0 = self.x0_pred(c.prediction, c.sigmas[i], sample, model_output);
        self.model_outputs.rotate_left(1);
        let last = self.model_outputs.len() - 1;
        self.model_outputs[last] = Some(x0);
        let m0 = self.model_outputs[last].as_deref().unwrap();
        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(&c.sigmas, i, sample, m0)
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(&c.sigmas, i, sample)
        } else {
            self.third_order(&c.sigmas, i, sample)
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.next_step += 1;
        Ok(prev)
    }
}
