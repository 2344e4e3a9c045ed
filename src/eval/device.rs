//! How an evaluation network runs on a backend: the backend that holds its weights, and the
//! activation arena planned for the batch size it last ran (planned again, the old one freed, when
//! the size changes; FID runs every batch but the last at one size).

use crate::backend::Backend;
use crate::nn::{planned_arena, Cx};
use crate::tensor::{Arena, Tensor};
use anyhow::Result;

pub struct NetDevice {
    pub backend: Box<dyn Backend>,
    arena: Option<(usize, Arena)>,
}

impl NetDevice {
    pub fn new(backend: Box<dyn Backend>) -> NetDevice {
        NetDevice { backend, arena: None }
    }

    /// Runs the forward `run` of `batch` inputs in an arena planned for that batch (`label` names
    /// its pool) and downloads the tensor it returns.
    pub fn run(&mut self, label: &str, batch: usize, run: impl Fn(&mut Cx) -> Result<Tensor>) -> Result<Vec<f32>> {
        if self.arena.as_ref().is_none_or(|(b, _)| *b != batch) {
            if let Some((_, old)) = self.arena.take() {
                self.backend.free(old.pool())?;
            }
            let arena = planned_arena(self.backend.as_mut(), label, |cx| run(cx).map(|_| ()))?;
            self.arena = Some((batch, arena));
        }
        let Some((_, arena)) = self.arena.as_mut() else { unreachable!("planned above") };
        arena.reset();
        let out = run(&mut Cx::new(self.backend.as_ref(), arena))?;
        self.backend.download(&out)
    }
}
