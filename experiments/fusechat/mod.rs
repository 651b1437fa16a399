//! The FuseChat-3.0 recipe on models trained here (METHOD.md end to end), shared by
//! `fusechat-tiny` (the flagship) and `fusechat-micro` (the same steps at the smallest sizes, for
//! the tests). Every box is a cached step:
//!
//! ```text
//! suite -> tokenizer -> src-{llama,qwen2,mistral,gemma2}  (each trained from scratch on its mix)
//!               \----> base (the smaller target)  -> reward-model (pairs labelled by verifiers)
//! src-* -> sample-* -> annotate (RM scores, math / code verdicts) -> construct (decontaminated)
//! base + construct -> sft -> dpo (the fused target); for WRPO sft -> sample-target ->
//!   annotate-target -> dpo (the target's own best answer to each DPO prompt)
//! eval-<model>-<category> for base, sft, fused and every source -> the report
//! ```

pub mod data;
pub(crate) mod steps;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::construct::ConstructParams;
use crate::data::Category;
use crate::generate::SamplingParams;
use crate::model::init::Shape;
use crate::recipe::{step, Experiment, Handle, Result};
use crate::synth::SuiteParams;
use crate::train::{DpoLoss, TrainConfig};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FusionParams {
    pub device: String,
    pub suite: SuiteParams,
    pub tokenizer: TokenizerParams,
    pub sources: Vec<ModelSpec>,
    pub target: ModelSpec,
    pub reward: RewardParams,
    pub sampling: SamplingStage,
    pub construct: ConstructParams,
    pub sft: TrainConfig,
    pub dpo: DpoStage,
    pub eval: EvalStage,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenizerParams {
    pub vocab_size: usize,
    pub min_frequency: u64,
    /// A file of `../shared/data/chat_templates`.
    pub chat_template: String,
}

/// One model trained here: its family and size, what it learns (each category's share of the
/// train split: 2.0 is every task twice, 0.1 a tenth of them), and how it samples as a source.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelSpec {
    pub name: String,
    /// llama, qwen2, mistral or gemma2.
    pub family: String,
    pub shape: Shape,
    pub mix: BTreeMap<Category, f64>,
    pub train: TrainConfig,
    pub init_seed: u64,
    /// How it samples (sources only).
    #[serde(default)]
    pub sampling: Option<SamplingParams>,
    #[serde(default)]
    pub samples_per_category: BTreeMap<Category, u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RewardParams {
    /// The model (a source or the target base) the classifier starts from.
    pub init_from: String,
    /// Corrupted answers per train task (each a pair with the task's reference).
    pub pairs_per_task: usize,
    /// Share of the train tasks whose pairs are held out to measure pair accuracy.
    pub eval_fraction: f64,
    pub train: TrainConfig,
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SamplingStage {
    pub chunk_size: usize,
    pub slots: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DpoStage {
    /// `false`: the SFT-only variant (the fused model is the SFT model).
    pub enabled: bool,
    pub beta: f64,
    pub loss: DpoLoss,
    /// Share of the pairs held out to pick the better of the last two checkpoints.
    pub eval_fraction: f64,
    pub train: TrainConfig,
    /// `candle` (in process) or `trl` (TRL's DPOTrainer through `accelerate launch`, ZeRO-3 on
    /// clusters; the final model, no held-out pick).
    pub engine: String,
    /// How the TRL engine launches (processes, ZeRO-3, CPU, bf16).
    pub launch: crate::train::external::Launch,
    /// WRPO only: how the SFT model answers the DPO prompts; its best answer by the reward model
    /// (a correct one for math and code) is each pair's target-preferred answer. Unset: the
    /// sources' sampler at temperature 0.8, top-p 0.95, 5 / 8 / 8 answers per instruction / math
    /// / code prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_sampling: Option<TargetSampling>,
}

/// How the target samples its own answers for WRPO.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetSampling {
    pub sampling: SamplingParams,
    pub samples_per_category: BTreeMap<Category, u32>,
}

impl Default for TargetSampling {
    fn default() -> Self {
        TargetSampling {
            sampling: SamplingParams {
                max_new_tokens: 64,
                temperature: 0.8,
                top_p: 0.95,
                seed: 23,
                ..Default::default()
            },
            samples_per_category: BTreeMap::from([
                (Category::Instruction, 5),
                (Category::Math, 8),
                (Category::Code, 8),
            ]),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalStage {
    pub max_new_tokens: usize,
    pub slots: usize,
    /// Sandbox workers for code answers.
    pub jobs: usize,
    /// 0: the eval steps answer the held-out eval split (the report's numbers). N > 0: they
    /// answer a development slice instead, the last N train tasks of every skill, which the target
    /// never trains on; target-side choices are made there so the held-out split is never tuned on.
    #[serde(default)]
    pub dev_per_skill: usize,
}

pub fn build(exp: &mut Experiment, p: &FusionParams) -> Result<()> {
    if p.eval.dev_per_skill > 0 {
        let per_skill = p.eval.dev_per_skill;
        // The dev tail must be unseen by the target, or the choices made on it are biased.
        let n = p.suite.train_per_skill;
        let reached = p
            .target
            .mix
            .values()
            .map(|&w| data::mix_reach(w, n))
            .max()
            .unwrap_or(0);
        if per_skill + reached > n {
            return Err(crate::recipe::RecipeError::BadParams {
                experiment: exp.name().to_string(),
                reason: format!(
                    "eval.dev_per_skill: {per_skill} dev tasks per skill and the {reached} \
                     the target's mix trains on do not fit in suite.train_per_skill = {n}"
                ),
            });
        }
    }
    let template = exp.source(
        "chat-template",
        crate::eval::bench::shared_data()
            .join("chat_templates")
            .join(&p.tokenizer.chat_template),
    )?;
    let suite = exp.step("suite", &p.suite, &[], steps::suite)?;
    let tokenizer = exp.step(
        // v2: trained on the template-rendered rows, Qwen2's digit-splitting pre-tokeniser.
        step("tokenizer").version(2),
        &json!({"tokenizer": p.tokenizer, "context": p.target.shape.context}),
        &[suite, template],
        steps::tokenizer,
    )?;
    let train_model = |exp: &mut Experiment, m: &ModelSpec| -> Result<Handle> {
        exp.step(
            step(&m.name).kind("fusechat/pretrain"),
            &json!({"model": m, "device": p.device}),
            &[suite, tokenizer],
            steps::pretrain,
        )
    };
    let mut sources = Vec::new();
    for s in &p.sources {
        sources.push((s, train_model(exp, s)?));
    }
    let base = train_model(exp, &p.target)?;
    let rm_start = sources
        .iter()
        .find(|(s, _)| s.name == p.reward.init_from)
        .map(|(_, h)| *h)
        .or((p.target.name == p.reward.init_from).then_some(base))
        .ok_or_else(|| crate::recipe::RecipeError::BadParams {
            experiment: exp.name().to_string(),
            reason: format!(
                "reward.init_from: `{}` is not a source or the target",
                p.reward.init_from
            ),
        })?;
    let reward = exp.step(
        step("reward-model").kind("fusechat/reward-model"),
        &json!({"reward": p.reward, "device": p.device, "base": p.reward.init_from, "jobs": p.eval.jobs}),
        &[suite, rm_start],
        steps::reward_model,
    )?;
    let mut samples = Vec::new();
    for (s, h) in &sources {
        let prm = json!({"source": s.name, "sampling": s.sampling,
                         "samples_per_category": s.samples_per_category,
                         "stage": p.sampling, "device": p.device});
        samples.push(exp.step(
            step(&format!("sample-{}", s.name)).kind("fusechat/sample"),
            &prm,
            &[suite, *h],
            steps::sample,
        )?);
    }
    let mut annotate_inputs = vec![suite, reward];
    annotate_inputs.extend(&samples);
    let sample_names: Vec<String> = p
        .sources
        .iter()
        .map(|s| format!("sample-{}", s.name))
        .collect();
    let annotations = exp.step(
        step("annotate").kind("fusechat/annotate"),
        &json!({"samples": sample_names, "device": p.device, "jobs": p.eval.jobs}),
        &annotate_inputs,
        steps::annotate,
    )?;
    let mut construct_inputs = vec![suite, annotations];
    construct_inputs.extend(&samples);
    let constructed = exp.step(
        step("construct").kind("fusechat/construct"),
        &json!({"construct": p.construct, "samples": sample_names}),
        &construct_inputs,
        steps::construct,
    )?;
    let sft = exp.step(
        step("sft").kind("fusechat/sft"),
        &json!({"train": p.sft, "device": p.device, "start": p.target.name}),
        &[base, constructed],
        steps::sft,
    )?;
    let fused = if p.dpo.enabled {
        let mut dpo_inputs = vec![sft, constructed];
        if matches!(p.dpo.loss, DpoLoss::Wrpo { .. }) {
            // WRPO's target-preferred answers: the SFT model answers the DPO prompts, the reward
            // model and the verifiers judge them as they judged the sources'.
            let ts = p.dpo.target_sampling.clone().unwrap_or_default();
            let sampled = exp.step(
                step("sample-target").kind("fusechat/sample-target"),
                &json!({"source": "sft", "sampling": ts.sampling,
                        "samples_per_category": ts.samples_per_category,
                        "stage": p.sampling, "device": p.device}),
                &[suite, sft, constructed],
                steps::sample_target,
            )?;
            let judged = exp.step(
                step("annotate-target").kind("fusechat/annotate-target"),
                &json!({"samples": ["sample-target"], "device": p.device, "jobs": p.eval.jobs}),
                &[suite, reward, sampled, constructed],
                steps::annotate_target,
            )?;
            dpo_inputs.extend([sampled, judged]);
        }
        exp.step(
            step("dpo").kind("fusechat/dpo"),
            &json!({"dpo": p.dpo, "device": p.device}),
            &dpo_inputs,
            steps::dpo,
        )?
    } else {
        sft
    };
    // (label, role, the step the model comes from, its handle)
    let mut evaluated: Vec<(&str, &str, &str, Handle)> = vec![
        (p.target.name.as_str(), "base", p.target.name.as_str(), base),
        ("sft", "sft", "sft", sft),
    ];
    if p.dpo.enabled {
        evaluated.push(("fused", "fused", "dpo", fused));
    }
    for (s, h) in &sources {
        evaluated.push((s.name.as_str(), "source", s.name.as_str(), *h));
    }
    for (name, role, input, h) in evaluated {
        for c in Category::ALL {
            exp.step(
                step(&format!("eval-{name}-{}", c.name().replace('_', "-"))).kind("fusechat/eval"),
                &json!({"model": input, "label": name, "role": role, "category": c,
                        "eval": p.eval, "device": p.device,
                        // The dev slice leaves out whatever the target's mix trains on.
                        "target_mix": (p.eval.dev_per_skill > 0).then_some(&p.target.mix)}),
                &[suite, h],
                steps::eval,
            )?;
        }
    }
    Ok(())
}
