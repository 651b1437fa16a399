//! `fusechat-micro`: the `fusechat-tiny` recipe at the smallest sizes that still run every step for
//! real (a handful of tasks per skill, one-layer models, one epoch), for the tests; it need not
//! show a gain.

use crate::experiments::fusechat::{build, FusionParams};
use crate::model::init::Shape;
use crate::recipe::ExperimentDef;

pub fn define() -> ExperimentDef {
    ExperimentDef::new(
        "fusechat-micro",
        "fusechat-tiny at the smallest sizes: every step of the method, for the tests",
        |exp, p: &MicroParams| build(exp, &p.0),
    )
}

/// The defaults of this experiment (`--set` overrides any field).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct MicroParams(pub FusionParams);

impl Default for MicroParams {
    fn default() -> Self {
        MicroParams(params())
    }
}

fn params() -> FusionParams {
    let mut p = super::fusechat_tiny::params();
    p.suite.train_per_skill = 8;
    p.suite.sampling_per_skill = 3;
    p.suite.eval_per_skill = 2;
    p.suite.sampling_per_skill_by_category =
        std::collections::BTreeMap::from([(crate::data::Category::Code, 4)]);
    p.tokenizer.vocab_size = 400;
    let shape = Shape {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        context: 256,
        rope_theta: None,
    };
    for m in p.sources.iter_mut().chain(std::iter::once(&mut p.target)) {
        m.shape = shape.clone();
        m.train.epochs = 1;
        m.train.batch_size = 8;
        if let Some(s) = &mut m.sampling {
            s.max_new_tokens = 16;
        }
        for n in m.samples_per_category.values_mut() {
            *n = (*n).min(2);
        }
    }
    p.reward.train.epochs = 1;
    p.sft.epochs = 1;
    p.dpo.train.save_steps = 1;
    // Enough pairs survive only with a wide window at this size; the window is a parameter.
    p.construct.gap.max = 1e9;
    p.construct.gap.min = 0.0;
    p.eval.max_new_tokens = 16;
    p
}
