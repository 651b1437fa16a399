//! The experiment registry: every experiment `fuselab run <name>` knows.

pub mod hello;
pub mod sft_dpo_demo;

use crate::recipe::ExperimentDef;

/// All experiments, in the order `fuselab list` shows them.
pub fn registry() -> Vec<ExperimentDef> {
    vec![hello::define(), sft_dpo_demo::define()]
}
