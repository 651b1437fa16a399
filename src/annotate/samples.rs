//! Annotations of sampled answers, the step between sampling and construction: the reward model's
//! score of every (prompt, answer) conversation, math verdicts against the prompt's gold answer,
//! and code verdicts from the prompt's tests in the sandbox (the code taken from the answer's last
//! fenced block, else the whole answer).

use std::collections::{BTreeMap, HashMap};

use super::code::{Completion, Problem, Tests};
use super::{check_code, AnnotateError, CodeOptions};
use crate::data::{Annotation, Category, Message, Prompt, Sample};
use crate::model::{Checkpoint, ModelError};
use crate::reward::RewardModel;

#[derive(Debug, thiserror::Error)]
pub enum SamplesError {
    #[error("answer {index} of source {source_name} names prompt `{prompt}`, which is not in the prompt set")]
    UnknownPrompt {
        prompt: String,
        source_name: String,
        index: u32,
    },
    #[error("reward model: {0}")]
    Reward(#[from] ModelError),
    #[error(transparent)]
    Check(#[from] AnnotateError),
}

/// The code of a chat answer: the last fenced block (```python, ```py or bare), else the text.
pub fn code_of(answer: &str) -> String {
    let mut blocks = Vec::new();
    let mut rest = answer;
    while let Some(start) = rest.find("```") {
        let after = &rest[start + 3..];
        let line_end = after.find('\n').unwrap_or(after.len());
        let lang = after[..line_end].trim().to_ascii_lowercase();
        let body = &after[(line_end + 1).min(after.len())..];
        let Some(end) = body.find("```") else { break };
        if lang.is_empty() || lang == "python" || lang == "py" || lang == "python3" {
            blocks.push(body[..end].to_string());
        }
        rest = &body[end + 3..];
    }
    blocks.pop().unwrap_or_else(|| answer.to_string())
}

/// How a code prompt's tests run: HumanEval's `check(entry_point)` when it names an entry point,
/// else each non-empty line of `tests` is an assert statement (MBPP).
fn problem_of(p: &Prompt) -> Problem {
    let tests = p.tests.clone().unwrap_or_default();
    let tests = match &p.entry_point {
        Some(e) => Tests::HumanEval {
            test: tests,
            entry_point: e.clone(),
        },
        None => Tests::Asserts {
            setup: String::new(),
            asserts: tests
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect(),
        },
    };
    Problem {
        task_id: p.id.clone(),
        prompt: String::new(),
        tests,
    }
}

/// Annotate every sample: scores from `reward` (when given), verdicts for math and code prompts.
/// `progress(stage, done, total)`.
pub fn annotate_samples(
    prompts: &[Prompt],
    samples: &[Sample],
    reward: Option<(&RewardModel, &Checkpoint, usize)>,
    code: &CodeOptions,
    progress: &(dyn Fn(&str, usize, usize) + Sync),
) -> Result<Vec<Annotation>, SamplesError> {
    let by_id: HashMap<&str, &Prompt> = prompts.iter().map(|p| (p.id.as_str(), p)).collect();
    let mut of = Vec::with_capacity(samples.len());
    for s in samples {
        let p = by_id
            .get(s.prompt_id.as_str())
            .ok_or_else(|| SamplesError::UnknownPrompt {
                prompt: s.prompt_id.clone(),
                source_name: s.source.clone(),
                index: s.sample_index,
            })?;
        of.push(*p);
    }
    let mut out: Vec<Annotation> = samples
        .iter()
        .map(|s| Annotation {
            prompt_id: s.prompt_id.clone(),
            source: s.source.clone(),
            sample_index: s.sample_index,
            score: None,
            correct: None,
            reason: None,
        })
        .collect();
    if let Some((rm, ck, batch)) = reward {
        let convs: Vec<serde_json::Value> = samples
            .iter()
            .zip(&of)
            .map(|(s, p)| {
                let mut m = p.messages.clone();
                m.push(Message::new("assistant", s.text.clone()));
                serde_json::to_value(m).expect("messages serialise")
            })
            .collect();
        let n = convs.len();
        let scores =
            rm.score_conversations(ck, &convs, batch, &mut |d| progress("reward", d, n))?;
        for (a, s) in out.iter_mut().zip(scores) {
            a.score = Some(s[0] as f64);
        }
    }
    for ((a, s), p) in out.iter_mut().zip(samples).zip(&of) {
        if p.category == Category::Math {
            let v = super::math::judge(p.gold.as_deref().unwrap_or(""), &s.text);
            a.correct = Some(v.correct);
            a.reason = Some(v.reason.to_string());
        }
    }
    let code_idx: Vec<usize> = (0..samples.len())
        .filter(|&i| of[i].category == Category::Code)
        .collect();
    if !code_idx.is_empty() {
        let mut problems = BTreeMap::new();
        let mut completions = Vec::with_capacity(code_idx.len());
        for (k, &i) in code_idx.iter().enumerate() {
            let p = of[i];
            problems
                .entry(p.id.clone())
                .or_insert_with(|| problem_of(p));
            completions.push(Completion {
                task_id: p.id.clone(),
                completion: code_of(&samples[i].text),
                index: k,
                line: i + 1,
            });
        }
        let n = completions.len();
        let report = check_code(&problems, &completions, code, &|d| progress("code", d, n))?;
        for (r, &i) in report.results.iter().zip(&code_idx) {
            out[i].correct = Some(r.passed);
            out[i].reason = Some(match &r.detail {
                Some(d) => format!("{}: {d}", r.reason),
                None => r.reason.clone(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::code_of;

    #[test]
    fn code_comes_from_the_last_python_block() {
        let a = "Here:\n```python\ndef f():\n    return 1\n```\nor better\n```py\ndef f():\n    return 2\n```\nDone.";
        assert_eq!(code_of(a), "def f():\n    return 2\n");
        assert_eq!(code_of("```js\nx\n```"), "```js\nx\n```");
        assert_eq!(code_of("def g(): pass"), "def g(): pass");
        assert_eq!(code_of("```\nprint(1)\n```"), "print(1)\n");
    }
}
