//! CUDA graphs: a sequence of launches (one U-Net evaluation: hundreds of kernels and GEMMs)
//! captured once and replayed with a single `cuGraphLaunch`, so the host's launch overhead and the
//! gaps between small kernels leave the denoising loop.
//!
//! Per key: the first call runs the work directly (scratch buffers and cuBLAS reach their steady
//! state), the second captures it (global capture mode: any stray synchronisation, copy or
//! allocation inside fails the capture instead of being recorded wrongly), instantiates and
//! launches the graph, and later calls launch the graph without calling the closure. A failed
//! capture is reported once and the key runs directly from then on. Profiling runs directly (its
//! events synchronise).

use super::device::GraphExec;
use super::CudaBackend;
use anyhow::{anyhow, Result};

pub(crate) enum GraphState {
    /// Ran once directly; captured at the next call.
    Warm,
    Ready(GraphExec),
    /// Capture failed: run directly.
    Direct,
}

enum Next {
    Warm,
    Capture,
    Replay(GraphExec),
    Direct,
}

impl CudaBackend {
    pub(crate) fn graph_impl(&self, key: u64, f: &mut dyn FnMut() -> Result<()>) -> Result<bool> {
        if !self.graphs_on.get() || self.profile.borrow().is_some() || self.capturing.get() {
            f()?;
            return Ok(false);
        }
        // (The map's borrow ends here: `f` may launch work that looks at other keys.)
        let state = match self.graphs.borrow().get(&key) {
            None => Next::Warm,
            Some(GraphState::Warm) => Next::Capture,
            Some(GraphState::Ready(exec)) => Next::Replay(*exec),
            Some(GraphState::Direct) => Next::Direct,
        };
        match state {
            Next::Direct => f().map(|_| false),
            Next::Warm => {
                f()?;
                self.graphs.borrow_mut().insert(key, GraphState::Warm);
                Ok(false)
            }
            Next::Replay(exec) => {
                self.dev.graph_launch(exec).map_err(|e| anyhow!("CUDA: launching the graph {key:#x}: {e:?}"))?;
                self.graph_replays.set(self.graph_replays.get() + 1);
                Ok(true)
            }
            Next::Capture => match self.capture(f) {
                Ok(exec) => {
                    self.graphs.borrow_mut().insert(key, GraphState::Ready(exec));
                    self.dev.graph_launch(exec).map_err(|e| anyhow!("CUDA: launching the graph {key:#x}: {e:?}"))?;
                    Ok(true)
                }
                Err(e) => {
                    if !self.graph_warned.replace(true) {
                        crate::diag::warn(format!(
                            "CUDA graph capture failed ({e:#}); running the launches one by one"
                        ));
                    }
                    self.graphs.borrow_mut().insert(key, GraphState::Direct);
                    f()?;
                    Ok(false)
                }
            },
        }
    }

    /// Captures what `f` queues on the stream into an instantiated graph. The stream leaves
    /// capture mode whatever happens.
    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<GraphExec> {
        self.synchronize()?;
        self.dev.begin_capture().map_err(|e| anyhow!("begin capture: {e:?}"))?;
        // Refreshes of parameter copies queued by `f` are recorded, not run: should the capture
        // fail, the copies are as stale as they were.
        let staleness = self.param_staleness();
        self.capturing.set(true);
        let r = f();
        self.capturing.set(false);
        let graph = self.dev.end_capture();
        let graph = match (r, graph) {
            (Ok(()), Ok(Some(g))) => g,
            (r, g) => {
                self.restore_param_staleness(&staleness);
                if let Ok(Some(g)) = g {
                    let _ = self.dev.graph_destroy(g);
                }
                return Err(match r {
                    Err(e) => e.context("an operation failed while capturing"),
                    Ok(()) => anyhow!("end capture: {:?}", g.err()),
                });
            }
        };
        let exec = self.dev.graph_instantiate(graph);
        let _ = self.dev.graph_destroy(graph);
        if exec.is_err() {
            self.restore_param_staleness(&staleness);
        }
        exec.map_err(|e| anyhow!("instantiate: {e:?}"))
    }

    pub(crate) fn clear_graphs_impl(&self) {
        let mut g = self.graphs.borrow_mut();
        if g.values().any(|s| matches!(s, GraphState::Ready(_))) {
            let _ = self.synchronize();
        }
        for (_, s) in g.drain() {
            if let GraphState::Ready(exec) = s {
                let _ = self.dev.graph_exec_destroy(exec);
            }
        }
    }
}
