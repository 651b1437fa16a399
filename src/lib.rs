//! fuselab: reproducible FuseChat-3.0 implicit model fusion. The library holds all the machinery; the
//! `fuselab` binary is a thin CLI over it.

pub mod annotate;
pub mod construct;
pub mod data;
pub mod eval;
pub mod fs;
pub mod generate;
pub mod model;
pub mod recipe;
pub mod remote;
pub mod report;
pub mod reward;
pub mod sample;
pub mod store;
pub mod synth;
pub mod train;
pub mod util;

#[path = "../experiments/mod.rs"]
pub mod experiments;
