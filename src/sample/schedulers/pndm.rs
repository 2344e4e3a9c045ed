//! `PNDMScheduler` (Liu et al. 2022, pseudo numerical methods), as diffusers 0.42.1 runs it: SD
//! v1.x's default scheduler (`skip_prk_steps: true`, so PLMS only), and the original four-call
//! Runge–Kutta warm-up (`skip_prk_steps: false`).
//!
//! Quirks reproduced on purpose:
//! - With PLMS only, the timestep list repeats the second timestep (`[901, 801, 801, 701, …]` for 10
//!   steps): the second call redoes the first step with the average of two noise predictions.
//! - With PRK, the first 12 model calls are the RK warm-up over the last 4 leading timesteps (at
//!   `t` and `t - T/n/2`), and the PLMS part starts again at the last warm-up timestep; so there are
//!   `n + 9` model calls, all listed in [`Scheduler::timesteps`].
//! - A step whose previous timestep is negative uses `final_alpha_cumprod` (1 with
//!   `set_alpha_to_one`, else ᾱ_0).

use anyhow::Result;

use super::config::Config;
use super::schedule::{check_in_order, discrete_timesteps, PredictionType};
use super::{Common, Method, StepInput};
use crate::rng::torch::TorchGenerator;

pub(crate) struct Pndm {
    skip_prk_steps: bool,
    final_alpha_cumprod: f32,
    prk_timesteps: Vec<i64>,
    // Multistep state, reset by set_timesteps.
    counter: usize,
    /// img2img: the index of the first step taken (the counter counts from there, as diffusers').
    begin: usize,
    ets: Vec<Vec<f32>>,
    cur_model_output: Option<Vec<f32>>,
    cur_sample: Option<Vec<f32>>,
}

impl Pndm {
    pub(crate) fn from_config(cfg: &Config, c: &mut Common) -> Result<Pndm> {
        let set_alpha_to_one = cfg.bool("set_alpha_to_one", false)?;
        Ok(Pndm {
            final_alpha_cumprod: if set_alpha_to_one { 1.0 } else { c.train.alphas_cumprod[0] },
            skip_prk_steps: cfg.bool("skip_prk_steps", false)?,
            prk_timesteps: Vec::new(),
            counter: 0,
            begin: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
        })
    }

    /// `_get_prev_sample`: formula (9) of the PNDM paper, coefficients in f32 as diffusers' 0-dim
    /// tensors, then `sample_coeff * sample - (ᾱ_prev - ᾱ_t) * model_output / denom` elementwise.
    fn prev_sample(&self, c: &Common, sample: &[f32], t: i64, prev_t: i64, model_output: &[f32]) -> Result<Vec<f32>> {
        let a_t = c.train.alpha_cumprod(t)?;
        let a_prev = if prev_t >= 0 { c.train.alpha_cumprod(prev_t)? } else { self.final_alpha_cumprod };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let diff = a_prev - a_t;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        Ok(sample
            .iter()
            .zip(model_output)
            .map(|(&x, &m)| {
                let m = match c.prediction {
                    PredictionType::VPrediction => sa * m + sb * x,
                    _ => m,
                };
                sample_coeff * x - diff * m / denom
            })
            .collect())
    }

    fn step_prk(&mut self, c: &Common, model_output: &[f32], timestep: i64, sample: &[f32]) -> Result<Vec<f32>> {
        let half = (c.train.num_train_timesteps / c.num_inference_steps / 2) as i64;
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { half };
        let prev_t = timestep - diff_to_prev;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let combined;
        let mut mo = model_output;
        match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(model_output.iter().map(|&m| (1.0f64 / 6.0) as f32 * m).collect());
                self.ets.push(model_output.to_vec());
                self.cur_sample = Some(sample.to_vec());
            }
            1 | 2 => {
                let acc = self.cur_model_output.get_or_insert_with(|| vec![0.0; model_output.len()]);
                for (a, &m) in acc.iter_mut().zip(model_output) {
                    *a += (1.0f64 / 3.0) as f32 * m;
                }
            }
            _ => {
                let acc = self.cur_model_output.take().unwrap_or_else(|| vec![0.0; model_output.len()]);
                combined =
                    acc.iter().zip(model_output).map(|(&a, &m)| a + (1.0f64 / 6.0) as f32 * m).collect::<Vec<_>>();
                mo = &combined;
            }
        }
        let cur_sample = self.cur_sample.as_deref().unwrap_or(sample);
        let prev = self.prev_sample(c, cur_sample, t, prev_t, mo)?;
        self.counter += 1;
        Ok(prev)
    }

    fn step_plms(&mut self, c: &Common, model_output: &[f32], timestep: i64, sample: &[f32]) -> Result<Vec<f32>> {
        if !self.skip_prk_steps && self.ets.len() < 3 {
            anyhow::bail!("PNDMScheduler: PLMS steps need the 12 Runge-Kutta warm-up steps first");
        }
        let ratio = (c.train.num_train_timesteps / c.num_inference_steps) as i64;
        let (mut t, mut prev_t) = (timestep, timestep - ratio);
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.to_vec());
        } else {
            prev_t = timestep;
            t = timestep + ratio;
        }
        let n = self.ets.len();
        let e = |k: usize| &self.ets[n - k];
        let mut x = sample;
        let stored;
        let mo: Vec<f32> = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.to_vec());
            model_output.to_vec()
        } else if n == 1 && self.counter == 1 {
            stored = self.cur_sample.take().unwrap_or_else(|| sample.to_vec());
            x = &stored;
            model_output.iter().zip(e(1)).map(|(&m, &e1)| (m + e1) / 2.0).collect()
        } else if n == 2 {
            e(1).iter().zip(e(2)).map(|(&e1, &e2)| (3.0 * e1 - e2) / 2.0).collect()
        } else if n == 3 {
            (0..model_output.len()).map(|i| (23.0 * e(1)[i] - 16.0 * e(2)[i] + 5.0 * e(3)[i]) / 12.0).collect()
        } else {
            let c = (1.0f64 / 24.0) as f32;
            (0..model_output.len())
                .map(|i| c * (55.0 * e(1)[i] - 59.0 * e(2)[i] + 37.0 * e(3)[i] - 9.0 * e(4)[i]))
                .collect()
        };
        let prev = self.prev_sample(c, x, t, prev_t, &mo)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl Method for Pndm {
    fn set_begin_index(&mut self, begin: usize) {
        self.begin = begin;
    }

    fn set_timesteps(&mut self, c: &mut Common) -> Result<()> {
        let (train, n) = (c.train.num_train_timesteps, c.num_inference_steps);
        // `_timesteps`, ascending.
        let mut base = discrete_timesteps(c.spacing, train, n, c.steps_offset);
        base.reverse();
        let len = base.len();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if self.skip_prk_steps {
            // concat(_ts[:-1], _ts[-2:-1], _ts[-1:])[::-1]
            let mut plms: Vec<i64> = base[..len - 1].to_vec();
            plms.extend_from_slice(&base[len.saturating_sub(2)..len - 1]);
            plms.push(base[len - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            let half = (train / n / 2) as i64;
            let last4 = &base[len.saturating_sub(4)..];
            // _ts[-4:].repeat(2) + tile([0, half], 4)
            let tiled: Vec<i64> = last4.iter().flat_map(|&t| [t, t + half]).collect();
            // (x[:-1].repeat(2)[1:-1])[::-1]
            let rep: Vec<i64> = tiled[..tiled.len() - 1].iter().flat_map(|&t| [t, t]).collect();
            let mut prk = if rep.len() >= 2 { rep[1..rep.len() - 1].to_vec() } else { Vec::new() };
            prk.reverse();
            let mut plms = base[..len.saturating_sub(3)].to_vec();
            plms.reverse();
            (prk, plms)
        };
        c.timesteps = prk.iter().chain(&plms).map(|&t| t as f64).collect();
        self.prk_timesteps = prk;
        self.counter = 0;
        self.begin = 0;
        self.ets.clear();
        self.cur_model_output = None;
        self.cur_sample = None;
        Ok(())
    }

    fn step(&mut self, c: &Common, s: StepInput, _generator: &mut TorchGenerator) -> Result<Vec<f32>> {
        let StepInput { model_output, index: step_index, sample } = s;
        check_in_order("PNDMScheduler", self.begin + self.counter, step_index)?;
        let t = c.timesteps[step_index] as i64;
        if self.counter < self.prk_timesteps.len() && !self.skip_prk_steps {
            self.step_prk(c, model_output, t, sample)
        } else {
            self.step_plms(c, model_output, t, sample)
        }
    }
}
