//! The recipe's pure data work: the tokenizer corpus, each model's training mix, the reward
//! model's (reference, corrupted) pairs, and the held-out benchmarks, all from the skill suite.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::data::Category;
use crate::eval::bench::{Benchmark, Generation, Item, Kind};
use crate::generate::Rng;
use crate::model::{ChatTemplate, ModelError};
use crate::synth::{final_line, Split, Task};

/// Every text the models will read, for training the tokenizer: each *train* task's conversation
/// rendered by the chat template exactly as the models see it (the held-out prompts never shape
/// the vocabulary), cut at the special tokens, which are added whole and must not be merged into.
/// Rendering matters: the template's default system prompt then occurs once per row, so it merges
/// into words instead of costing ~50 byte-level tokens a row, and a reference's first word, which
/// follows `assistant\n` with no space, gets its own frequency and its own token.
pub fn tokenizer_corpus(
    tasks: &[Task],
    template: &ChatTemplate,
    specials: &[String],
) -> Result<Vec<String>, ModelError> {
    let mut out = Vec::new();
    for t in tasks.iter().filter(|t| t.split == Split::Train) {
        let text = template.render(&sft_row(t)["messages"], false, &Value::Null)?;
        let mut pieces = vec![text.as_str()];
        for s in specials {
            pieces = pieces.iter().flat_map(|p| p.split(s.as_str())).collect();
        }
        out.extend(
            pieces
                .into_iter()
                .filter(|p| !p.is_empty())
                .map(str::to_string),
        );
    }
    Ok(out)
}

/// The train tasks a model learns from: per skill, `weight` copies of that skill's category share
/// (an integer part repeats the whole skill, the fraction takes a prefix of the seeded order).
pub fn mix<'a>(tasks: &'a [Task], weights: &BTreeMap<Category, f64>) -> Vec<&'a Task> {
    let mut by_skill: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
    for t in tasks.iter().filter(|t| t.split == Split::Train) {
        by_skill.entry(t.skill.as_str()).or_default().push(t);
    }
    let mut out = Vec::new();
    for list in by_skill.values() {
        let w = weights.get(&list[0].category).copied().unwrap_or(0.0);
        let whole = w.floor() as usize;
        for _ in 0..whole {
            out.extend(list.iter().copied());
        }
        let part = ((w - whole as f64) * list.len() as f64).round() as usize;
        out.extend(list.iter().take(part).copied());
    }
    out
}

/// An SFT row: the task's prompt and its reference answer.
pub fn sft_row(t: &Task) -> Value {
    json!({"messages": [
        {"role": "user", "content": t.prompt},
        {"role": "assistant", "content": t.reference},
    ]})
}

/// A wrong answer in the form of a right one, the kind of mistake a weak model makes: the result
/// line with two words swapped, one dropped or repeated, the input echoed untransformed, a number
/// off by a little; in math the final number (and the step that gives it) off; in code the
/// constant of the body off by one or two. `None` when no attempt changed the answer (the caller
/// checks that the result is actually wrong with the suite's verifiers).
pub fn corrupt(t: &Task, rng: &mut Rng) -> Option<String> {
    let r = &t.reference;
    match t.category {
        Category::Math => {
            let v: i64 = t.gold.parse().ok()?;
            let d = 1 + rng.below(5) as i64;
            let w = if rng.below(2) == 0 || v - d < 0 {
                v + d
            } else {
                v - d
            };
            let (vs, ws) = (v.to_string(), w.to_string());
            let mut lines: Vec<String> = r.lines().map(str::to_string).collect();
            let n = lines.len();
            if n >= 2 {
                if let Some(eq) = lines[n - 2].rfind(&format!("= {vs}")) {
                    lines[n - 2].replace_range(eq.., &format!("= {ws}"));
                }
            }
            let last = lines.last_mut()?;
            let at = last.rfind(&vs)?;
            last.replace_range(at..at + vs.len(), &ws);
            Some(lines.join("\n"))
        }
        Category::Code => {
            let body_at = r.find("\"\"\"\n")? + 4;
            let body = &r[body_at..];
            let digits: Vec<(usize, usize)> = number_spans(body);
            let &(s, e) = digits.last()?;
            let k: i64 = body[s..e].parse().ok()?;
            let k2 = k + 1 + rng.below(2) as i64;
            let mut out = r.clone();
            out.replace_range(body_at + s..body_at + e, &k2.to_string());
            Some(out)
        }
        Category::Instruction | Category::SecondLanguage => {
            let line = final_line(r).to_string();
            let head = &r[..r.rfind(line.as_str())?];
            let sep = if line.contains(", ") { ", " } else { " " };
            let mut words: Vec<String> = line.split(sep).map(str::to_string).collect();
            if words.len() == 1 {
                if let Ok(v) = line.parse::<i64>() {
                    let d = 1 + rng.below(3) as i64;
                    let w = if rng.below(2) == 0 || v - d < 0 {
                        v + d
                    } else {
                        v - d
                    };
                    return Some(format!("{head}{w}"));
                }
            }
            let n = words.len();
            let new = match rng.below(4) {
                0 if n >= 2 => {
                    let i = rng.below(n - 1);
                    words.swap(i, i + 1);
                    words.join(sep)
                }
                1 if n >= 2 => {
                    words.remove(rng.below(n));
                    words.join(sep)
                }
                2 => {
                    let i = rng.below(n);
                    words.insert(i, words[i].clone());
                    words.join(sep)
                }
                _ => {
                    // The input, untransformed: after the instruction's colon.
                    let p = &t.prompt;
                    let at = p
                        .rfind(": ")
                        .map(|i| i + 2)
                        .or_else(|| p.rfind('：').map(|i| i + '：'.len_utf8()))?;
                    p[at..].trim().to_string()
                }
            };
            (new != line).then(|| format!("{head}{new}"))
        }
    }
}

fn number_spans(s: &str) -> Vec<(usize, usize)> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit()
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            let s0 = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            out.push((s0, i));
        } else {
            i += 1;
        }
    }
    out
}

/// A reward-model training pair (TRL's implicit-prompt layout with an explicit prompt).
pub fn rm_pair(t: &Task, chosen: &str, rejected: &str) -> Value {
    json!({
        "prompt": [{"role": "user", "content": t.prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "category": t.category.name(),
    })
}

/// The held-out benchmark of one category: its eval tasks as items, scored by the final line
/// (instruction, second language), the math verifier, or the sandbox (code).
pub fn benchmark(tasks: &[Task], category: Category, max_new_tokens: usize) -> Benchmark {
    let chosen: Vec<&Task> = tasks
        .iter()
        .filter(|t| t.split == Split::Eval && t.category == category)
        .collect();
    benchmark_of(&chosen, category, max_new_tokens, "eval split")
}

/// The development slice of one category: per skill, the last `per_skill` distinct train
/// prompts that the target's mix never reaches (`mix` takes a prefix of each skill's train tasks,
/// and a skill with few distinct prompts repeats them, so a prompt is left out when any task of
/// the prefix has the same text).
pub fn dev_benchmark(
    tasks: &[Task],
    category: Category,
    per_skill: usize,
    target_mix: &BTreeMap<Category, f64>,
    max_new_tokens: usize,
) -> Benchmark {
    let mut by_skill: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
    for t in tasks
        .iter()
        .filter(|t| t.split == Split::Train && t.category == category)
    {
        by_skill.entry(t.skill.as_str()).or_default().push(t);
    }
    let w = target_mix.get(&category).copied().unwrap_or(0.0);
    let mut chosen: Vec<&Task> = Vec::new();
    for list in by_skill.values() {
        let reach = mix_reach(w, list.len());
        let seen: std::collections::HashSet<&str> =
            list[..reach].iter().map(|t| t.prompt.as_str()).collect();
        let mut picked: Vec<&Task> = Vec::new();
        let mut taken: std::collections::HashSet<&str> = Default::default();
        for t in list[reach..].iter().rev() {
            if picked.len() == per_skill {
                break;
            }
            if !seen.contains(t.prompt.as_str()) && taken.insert(t.prompt.as_str()) {
                picked.push(t);
            }
        }
        picked.reverse();
        chosen.extend(picked);
    }
    let mut b = benchmark_of(
        &chosen,
        category,
        max_new_tokens,
        "train split, distinct prompts the target never trains on",
    );
    b.name.push_str("-dev");
    b
}

/// How many of a skill's `n` train tasks a mix weight reaches (`mix` takes a prefix, and a
/// weight of 1 or more takes them all).
pub fn mix_reach(weight: f64, n: usize) -> usize {
    (weight.clamp(0.0, 1.0) * n as f64).round() as usize
}

fn benchmark_of(
    chosen: &[&Task],
    category: Category,
    max_new_tokens: usize,
    from: &str,
) -> Benchmark {
    let kind = match category {
        Category::Math => Kind::Math,
        Category::Code => Kind::Code,
        Category::Instruction | Category::SecondLanguage => Kind::FinalLine,
    };
    let items = chosen
        .iter()
        .map(|t| {
            let mut it = Item::new(t.id.clone(), t.skill.clone(), t.prompt.clone());
            match category {
                Category::Code => {
                    it.code_prompt = code_stub(&t.prompt);
                    it.tests = t.tests.clone();
                    it.entry_point = t.entry_point.clone();
                }
                Category::Math => it.gold = Some(format!("#### {}", t.gold)),
                _ => it.gold = Some(t.gold.clone()),
            }
            it
        })
        .collect();
    Benchmark {
        name: format!("synth-{}", category.name().replace('_', "-")),
        kind,
        generation: Generation {
            max_new_tokens,
            temperature: 0.0,
        },
        source: format!("suite/tasks.jsonl ({from})"),
        source_digest: String::new(),
        items,
        baseline_name: None,
    }
}

/// The function stub inside a code prompt's fence.
fn code_stub(prompt: &str) -> Option<String> {
    let start = prompt.find("```python\n")? + "```python\n".len();
    let end = prompt[start..].find("```")? + start;
    Some(prompt[start..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{suite, SuiteParams};

    fn tasks() -> Vec<Task> {
        suite(&SuiteParams {
            seed: 1,
            train_per_skill: 30,
            sampling_per_skill: 5,
            eval_per_skill: 5,
            sampling_per_skill_by_category: Default::default(),
        })
        .unwrap()
    }

    #[test]
    fn corruptions_are_wrong_by_the_suites_own_verifiers() {
        let tasks = tasks();
        let mut rng = Rng::new(9, 0);
        let (mut made, mut wrong) = (0, 0);
        for t in tasks.iter().filter(|t| t.category != Category::Code) {
            assert_eq!(t.check(&t.reference), Some(true), "{}", t.id);
            if let Some(bad) = corrupt(t, &mut rng) {
                made += 1;
                wrong += (t.check(&bad) == Some(false)) as usize;
            }
        }
        assert!(made > tasks.len() / 2, "{made}");
        assert_eq!(made, wrong, "every corruption fails its verifier");
        let code = tasks.iter().find(|t| t.category == Category::Code).unwrap();
        let bad = corrupt(code, &mut rng).unwrap();
        assert_ne!(bad, code.reference);
        assert!(bad.starts_with("```python\ndef "), "{bad}");
    }

    #[test]
    fn mixes_repeat_and_take_prefixes() {
        let tasks = tasks();
        let w = BTreeMap::from([(Category::Math, 2.5), (Category::Code, 0.1)]);
        let m = mix(&tasks, &w);
        let math = m.iter().filter(|t| t.category == Category::Math).count();
        let code = m.iter().filter(|t| t.category == Category::Code).count();
        assert_eq!((math, code), (75, 3));
        assert!(m.iter().all(|t| t.split == Split::Train));
    }

    #[test]
    fn benchmarks_hold_only_eval_items() {
        let tasks = tasks();
        for c in Category::ALL {
            let b = benchmark(&tasks, c, 32);
            assert!(!b.items.is_empty());
            assert!(b.items.iter().all(|i| i.id.starts_with("eval-")));
        }
        let code = benchmark(&tasks, Category::Code, 32);
        assert!(code.items[0]
            .code_prompt
            .as_ref()
            .unwrap()
            .starts_with("def "));
    }

    #[test]
    fn the_dev_slice_is_train_prompts_the_target_never_sees() {
        let tasks = tasks();
        let mix = BTreeMap::from([(Category::Code, 0.5), (Category::Instruction, 0.2)]);
        for c in Category::ALL {
            let b = dev_benchmark(&tasks, c, 4, &mix, 32);
            assert!(b.name.ends_with("-dev"));
            let reach = mix_reach(mix.get(&c).copied().unwrap_or(0.0), 30);
            let by_id: BTreeMap<&str, &Task> = tasks.iter().map(|t| (t.id.as_str(), t)).collect();
            let mut prompts = std::collections::HashSet::new();
            for it in &b.items {
                let t = by_id[it.id.as_str()];
                assert_eq!((t.split, t.category), (Split::Train, c), "{}", t.id);
                assert!(prompts.insert(t.prompt.clone()), "{} twice", t.id);
                // Not one task of the skill's trained prefix has this prompt.
                let seen = tasks
                    .iter()
                    .filter(|x| x.split == Split::Train && x.skill == t.skill)
                    .take(reach)
                    .any(|x| x.prompt == t.prompt);
                assert!(!seen, "{} is in the target's mix", t.id);
            }
            let skills = tasks
                .iter()
                .filter(|t| t.category == c)
                .map(|t| t.skill.as_str())
                .collect::<std::collections::HashSet<_>>()
                .len();
            assert_eq!(b.items.len(), 4 * skills, "{c:?}");
        }
    }
}
