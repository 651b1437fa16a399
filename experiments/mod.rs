//! The experiment registry: every experiment `fuselab run <name>` knows.

pub mod hello;

use crate::recipe::ExperimentDef;

/// All experiments, in the order `fuselab list` shows them.
pub fn registry() -> Vec<ExperimentDef> {
    vec![hello::define()]
}
