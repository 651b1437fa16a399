//! The seeded skill suite of `fusechat-tiny`: tasks in the paper's four categories — instruction
//! following (text transformations checked by rules), mathematics (multi-step arithmetic word
//! problems with gold answers in GSM8K `####` and `\boxed{}` styles), code (small Python functions
//! with HumanEval-style tests for the sandbox) and a second language (Chinese tasks, SFT only as
//! in the paper) — at difficulty levels that separate models of different strength. The train,
//! sampling and evaluation splits are drawn from disjoint parameter ranges, so no evaluation task can
//! appear in training data (checked again by the decontamination step and by a test).

mod tasks;

use serde::{Deserialize, Serialize};

use crate::data::{Category, Message, Prompt};
use crate::generate::Rng;

pub use tasks::{Skill, SKILLS};

/// Which part of the suite a task belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Pretraining and the per-source instruction data.
    Train,
    /// The prompts the sources answer (FuseChat's data-construction prompts).
    Sampling,
    /// Held out: evaluation only.
    Eval,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Sampling, Split::Eval];
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Sampling => "sampling",
            Split::Eval => "eval",
        }
    }
}

/// One task with its reference answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub split: Split,
    pub skill: String,
    pub category: Category,
    /// 1 (easiest) to 3.
    pub difficulty: u8,
    pub language: String,
    pub prompt: String,
    /// A correct answer, in the form a good model would give it.
    pub reference: String,
    /// The checkable answer: the transformed text (instruction, second language), the number (math).
    pub gold: String,
    /// Code: HumanEval-layout tests (`check(candidate)`) and the entry point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point: Option<String>,
}

impl Task {
    /// The prompt record the data stage reads (gold in GSM8K style for math).
    pub fn to_prompt(&self) -> Prompt {
        Prompt {
            id: self.id.clone(),
            dataset: format!("synth-{}", self.skill),
            category: self.category,
            messages: vec![Message {
                role: "user".into(),
                content: self.prompt.clone(),
            }],
            gold: (self.category == Category::Math).then(|| format!("#### {}", self.gold)),
            tests: self.tests.clone(),
            entry_point: self.entry_point.clone(),
            language: self.language.clone(),
        }
    }

    /// Whether `answer` does the task (the rule verifiers of instruction and second-language
    /// tasks: the answer's last non-empty line equals the gold text; math through the verifier;
    /// code needs the sandbox and is not checked here).
    pub fn check(&self, answer: &str) -> Option<bool> {
        match self.category {
            Category::Math => {
                Some(crate::annotate::math::judge(&format!("#### {}", self.gold), answer).correct)
            }
            Category::Code => None,
            Category::Instruction | Category::SecondLanguage => {
                Some(final_line(answer) == self.gold.trim())
            }
        }
    }
}

/// Whether a word problem's worked steps hold: at least one line `a op b = c` (op `+`, `-`, `*`)
/// and every such line arithmetically right. The math verifier, like math-verify, judges the final
/// answer only; this tells a right answer from a lucky one in the suite's own format.
pub fn steps_sound(text: &str) -> bool {
    let mut steps = 0;
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [a, op, b, "=", c] = parts[..] else {
            continue;
        };
        let (Ok(a), Ok(b), Ok(c)) = (a.parse::<i64>(), b.parse::<i64>(), c.parse::<i64>()) else {
            return false;
        };
        let value = match op {
            "+" => a.checked_add(b),
            "-" => a.checked_sub(b),
            "*" => a.checked_mul(b),
            _ => return false,
        };
        if value != Some(c) {
            return false;
        }
        steps += 1;
    }
    steps > 0
}

/// The last non-empty line, trimmed: where the suite's answers put the result.
pub fn final_line(text: &str) -> &str {
    text.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("")
}

/// How many tasks of each skill per split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SuiteParams {
    pub seed: u64,
    pub train_per_skill: usize,
    pub sampling_per_skill: usize,
    pub eval_per_skill: usize,
    /// Per-category overrides of `sampling_per_skill` (a category whose skill is slow to learn
    /// needs more constructed rows for the target to learn it from).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub sampling_per_skill_by_category: std::collections::BTreeMap<crate::data::Category, usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("skill `{skill}`: only {made} distinct {split} tasks exist apart from the other splits ({wanted} asked for)")]
    Exhausted {
        skill: String,
        split: &'static str,
        made: usize,
        wanted: usize,
    },
}

/// Every task of the suite, in (split, skill, index) order; same parameters, same bytes. The
/// evaluation split is drawn first; a sampling or train candidate whose prompt equals one already
/// drawn for another split, or shares a decontamination n-gram with an evaluation prompt, is
/// drawn again. Sampling and evaluation prompts are distinct within their split too.
pub fn suite(p: &SuiteParams) -> Result<Vec<Task>, SynthError> {
    use std::collections::{BTreeMap, HashSet};
    let mut by_split: BTreeMap<Split, Vec<Task>> = BTreeMap::new();
    let mut owner: std::collections::HashMap<String, Split> = Default::default();
    let mut eval_index: Option<crate::construct::decontam::Index> = None;
    for split in [Split::Eval, Split::Sampling, Split::Train] {
        let n = match split {
            Split::Train => p.train_per_skill,
            Split::Sampling => p.sampling_per_skill,
            Split::Eval => p.eval_per_skill,
        };
        let mut tasks = Vec::new();
        for skill in SKILLS {
            let n = match split {
                Split::Sampling => p
                    .sampling_per_skill_by_category
                    .get(&skill.category)
                    .copied()
                    .unwrap_or(n),
                _ => n,
            };
            let mut rng = Rng::new(p.seed, stream(split, skill.name));
            let mut seen: HashSet<String> = HashSet::new();
            let mut attempts = 0usize;
            let mut i = 0usize;
            while i < n {
                attempts += 1;
                if attempts > 200 * n.max(1) + 1000 {
                    return Err(SynthError::Exhausted {
                        skill: skill.name.into(),
                        split: split.name(),
                        made: i,
                        wanted: n,
                    });
                }
                let difficulty = 1 + (i % 3) as u8;
                let mut t = (skill.make)(&mut rng, split, difficulty);
                let key = crate::construct::decontam::words(&t.prompt).join(" ");
                if owner.get(&key).is_some_and(|&o| o != split) {
                    continue;
                }
                if split != Split::Train && !seen.insert(key.clone()) {
                    continue;
                }
                if split != Split::Eval
                    && eval_index
                        .as_ref()
                        .is_some_and(|ix| ix.hit(&t.prompt).is_some())
                {
                    continue;
                }
                owner.insert(key, split);
                t.id = format!("{}-{}-{i:04}", split.name(), skill.name);
                t.split = split;
                t.skill = skill.name.to_string();
                t.category = skill.category;
                t.difficulty = difficulty;
                tasks.push(t);
                i += 1;
            }
        }
        if split == Split::Eval {
            eval_index = Some(crate::construct::decontam::Index::new(
                tasks.iter().map(|t| t.prompt.as_str()),
                NGRAM,
            ));
        }
        by_split.insert(split, tasks);
    }
    Ok(Split::ALL
        .iter()
        .flat_map(|s| by_split.remove(s).unwrap_or_default())
        .collect())
}

/// The decontamination n-gram length the suite is drawn apart with (the construction default).
pub const NGRAM: usize = 13;

fn stream(split: Split, skill: &str) -> u64 {
    let h = blake3::hash(format!("fuselab-synth-v1/{}/{skill}", split.name()).as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests;
