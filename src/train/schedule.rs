//! Learning-rate schedules as diffusers' `get_scheduler` builds them (LambdaLR factors): the rate
//! used by optimizer step k (counting from 0) is base_lr · factor(k).

use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrSchedule {
    Constant,
    ConstantWithWarmup {
        warmup: usize,
    },
    /// Half a cosine from base_lr to 0 after a linear warmup (num_cycles 0.5).
    Cosine {
        warmup: usize,
    },
}

impl LrSchedule {
    pub fn parse(name: &str, warmup: usize) -> Result<LrSchedule> {
        Ok(match name {
            "constant" => {
                if warmup > 0 {
                    bail!("$lr_schedule constant takes no warmup; use constant_with_warmup");
                }
                LrSchedule::Constant
            }
            "constant_with_warmup" => LrSchedule::ConstantWithWarmup { warmup },
            "cosine" => LrSchedule::Cosine { warmup },
            other => bail!("$lr_schedule '{other}': expected constant, constant_with_warmup or cosine"),
        })
    }

    pub fn factor(&self, k: usize, total: usize) -> f64 {
        let warm = |w: usize| if k < w { Some(k as f64 / w.max(1) as f64) } else { None };
        match *self {
            LrSchedule::Constant => 1.0,
            LrSchedule::ConstantWithWarmup { warmup } => warm(warmup).unwrap_or(1.0),
            LrSchedule::Cosine { warmup } => warm(warmup).unwrap_or_else(|| {
                let progress = (k - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }),
        }
    }

    pub fn lr(&self, base: f32, k: usize, total: usize) -> f32 {
        (base as f64 * self.factor(k, total)) as f32
    }
}

/// `torch.optim.lr_scheduler.CyclicLR(mode="triangular", step_size_down=None)` (the classifier's
/// cyclic schedule): the rate of optimizer step k rises linearly from `base` to `max` over
/// `step_size_up` steps, falls back over as many, and repeats. Computed as torch computes it (cycle,
/// position in it, scale factor) in f64.
pub fn cyclic_triangular(k: usize, base: f64, max: f64, step_size_up: usize) -> f64 {
    let up = step_size_up.max(1) as f64;
    let total = 2.0 * up;
    let step_ratio = up / total;
    let cycle = (1.0 + k as f64 / total).floor();
    let x = 1.0 + k as f64 / total - cycle;
    let scale = if x <= step_ratio { x / step_ratio } else { (x - 1.0) / (step_ratio - 1.0) };
    base + (max - base) * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_reaches_zero() {
        let s = LrSchedule::Cosine { warmup: 10 };
        assert_eq!(s.factor(0, 110), 0.0);
        assert!((s.factor(5, 110) - 0.5).abs() < 1e-12);
        assert!((s.factor(10, 110) - 1.0).abs() < 1e-12);
        assert!((s.factor(60, 110) - 0.5).abs() < 1e-12);
        assert!(s.factor(110, 110).abs() < 1e-12);
        assert_eq!(LrSchedule::ConstantWithWarmup { warmup: 4 }.factor(2, 100), 0.5);
        assert!(LrSchedule::parse("linear", 0).is_err());
    }
}
