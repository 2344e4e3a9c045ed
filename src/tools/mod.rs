//! The applications beside sampling, training and evaluation: [`phantom`] draws synthetic chest
//! X-rays with known findings, [`prepare`] builds training sets from MIMIC-CXR and IU X-ray,
//! [`bench`] times model stages, [`inspect`] says what a file or folder holds.

pub mod bench;
pub mod bench_allreduce;
pub mod convert;
pub mod inspect;
pub mod parity;
pub mod phantom;
pub mod prepare;
pub mod serve;
pub mod train_memory;
