//! The experiment registry: every experiment `fuselab run <name>` knows.

pub mod common;
pub mod fusechat;
pub mod fusechat3;
pub mod fusechat_micro;
pub mod fusechat_tiny;
pub mod hello;
pub mod sft_dpo_demo;

use crate::recipe::ExperimentDef;

/// All experiments, in the order `fuselab list` shows them.
pub fn registry() -> Vec<ExperimentDef> {
    let mut v = vec![fusechat_tiny::define(), fusechat_micro::define()];
    v.extend(fusechat3::experiments());
    v.push(hello::define());
    v.push(sft_dpo_demo::define());
    v
}
