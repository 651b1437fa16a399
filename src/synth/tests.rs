use std::collections::{BTreeMap, HashMap};

use super::*;
use crate::annotate::code::{Completion, Problem, Tests};

fn params(seed: u64) -> SuiteParams {
    SuiteParams {
        seed,
        train_per_skill: 60,
        sampling_per_skill: 30,
        eval_per_skill: 20,
        sampling_per_skill_by_category: Default::default(),
    }
}

#[test]
fn a_category_can_have_its_own_number_of_sampling_prompts() {
    let mut p = params(1);
    p.sampling_per_skill_by_category = BTreeMap::from([(Category::Code, 45)]);
    let a = suite(&p).unwrap();
    let n = |skill: &str| {
        a.iter()
            .filter(|t| t.split == Split::Sampling && t.skill == skill)
            .count()
    };
    assert_eq!((n("python_function"), n("count_words")), (45, 30));
}

#[test]
fn the_suite_is_seeded_and_counted() {
    let a = suite(&params(1)).unwrap();
    assert_eq!(a, suite(&params(1)).unwrap());
    assert_ne!(a, suite(&params(2)).unwrap());
    assert_eq!(a.len(), SKILLS.len() * (60 + 30 + 20));
    let mut counts: BTreeMap<(Split, &str), usize> = BTreeMap::new();
    for t in &a {
        *counts.entry((t.split, t.skill.as_str())).or_default() += 1;
        assert!((1..=3).contains(&t.difficulty));
        assert_eq!(
            t.language == "zh",
            t.category == Category::SecondLanguage,
            "{}",
            t.id
        );
    }
    assert!(counts.values().all(|&c| c == 60 || c == 30 || c == 20));
    let mut ids: Vec<&str> = a.iter().map(|t| t.id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), a.len(), "ids are unique");
    for c in Category::ALL {
        assert!(a.iter().any(|t| t.category == c), "{c:?}");
    }
}

#[test]
fn splits_never_overlap() {
    let a = suite(&params(3)).unwrap();
    let key = |t: &Task| crate::construct::decontam::words(&t.prompt).join(" ");
    let mut owner: HashMap<String, Split> = HashMap::new();
    for t in &a {
        if let Some(o) = owner.insert(key(t), t.split) {
            assert_eq!(
                o, t.split,
                "{} appears in {o:?} and {:?}",
                t.prompt, t.split
            );
        }
    }
    let eval: Vec<&str> = a
        .iter()
        .filter(|t| t.split == Split::Eval)
        .map(|t| t.prompt.as_str())
        .collect();
    let index = crate::construct::decontam::Index::new(eval.iter().copied(), NGRAM);
    for t in a.iter().filter(|t| t.split != Split::Eval) {
        assert!(
            index.hit(&t.prompt).is_none(),
            "{} shares an n-gram with an eval prompt",
            t.id
        );
    }
    // Distinct prompts within the held-out and sampling splits.
    for split in [Split::Eval, Split::Sampling] {
        let mut ks: Vec<String> = a.iter().filter(|t| t.split == split).map(key).collect();
        let n = ks.len();
        ks.sort();
        ks.dedup();
        assert_eq!(ks.len(), n, "{split:?}");
    }
}

#[test]
fn references_pass_their_own_checks_and_wrong_answers_fail() {
    for t in suite(&params(4)).unwrap() {
        match t.category {
            Category::Code => {}
            _ => {
                assert_eq!(
                    t.check(&t.reference),
                    Some(true),
                    "{}: {:?} vs {:?}",
                    t.id,
                    t.reference,
                    t.gold
                );
                assert_eq!(t.check("I do not know."), Some(false), "{}", t.id);
            }
        }
        if t.category == Category::Math {
            let p = t.to_prompt();
            assert_eq!(p.gold.as_deref(), Some(format!("#### {}", t.gold).as_str()));
        }
    }
    // Difficulty means more steps / longer inputs.
    let a = suite(&params(5)).unwrap();
    let steps = |d: u8| {
        a.iter()
            .filter(|t| t.skill == "word_problem" && t.difficulty == d)
            .map(|t| t.reference.lines().count())
            .max()
            .unwrap()
    };
    assert!(steps(1) < steps(2) && steps(2) < steps(3));
}

#[test]
fn code_references_pass_in_the_sandbox_and_stubs_fail() {
    let tasks: Vec<Task> = suite(&SuiteParams {
        seed: 6,
        train_per_skill: 0,
        sampling_per_skill: 0,
        eval_per_skill: 12,
        sampling_per_skill_by_category: Default::default(),
    })
    .unwrap()
    .into_iter()
    .filter(|t| t.category == Category::Code)
    .collect();
    assert_eq!(tasks.len(), 12);
    let problems: BTreeMap<String, Problem> = tasks
        .iter()
        .map(|t| {
            let tests = Tests::HumanEval {
                test: t.tests.clone().unwrap(),
                entry_point: t.entry_point.clone().unwrap(),
            };
            (
                t.id.clone(),
                Problem {
                    task_id: t.id.clone(),
                    prompt: String::new(),
                    tests,
                },
            )
        })
        .collect();
    let mut completions = Vec::new();
    for (i, t) in tasks.iter().enumerate() {
        let code = crate::annotate::samples::code_of(&t.reference);
        completions.push(Completion {
            task_id: t.id.clone(),
            completion: code,
            index: 0,
            line: 2 * i + 1,
        });
        let stub = format!(
            "def {}(*a):\n    return None\n",
            t.entry_point.as_ref().unwrap()
        );
        completions.push(Completion {
            task_id: t.id.clone(),
            completion: stub,
            index: 1,
            line: 2 * i + 2,
        });
    }
    let opts = crate::annotate::CodeOptions {
        jobs: 2,
        limits: Default::default(),
        python: crate::annotate::sandbox::Python::default_choice().unwrap(),
        isolation: None,
    };
    let report = crate::annotate::check_code(&problems, &completions, &opts, &|_| {}).unwrap();
    for (r, c) in report.results.iter().zip(&completions) {
        assert_eq!(
            r.passed,
            c.index == 0,
            "{} #{}: {} {:?}",
            c.task_id,
            c.index,
            r.reason,
            r.detail
        );
    }
}

#[test]
fn worked_steps_are_checked_line_by_line() {
    assert!(steps_sound("5 + 4 = 9\n9 - 2 = 7\n7 * 3 = 21\n#### 21"));
    // A right final answer over a wrong step (what small sources write) is not sound.
    assert!(!steps_sound("6 + 3 = 8\n#### 9"));
    assert!(!steps_sound("1 加 7 = 17\n#### 8"));
    assert!(!steps_sound("#### 9"), "no step at all");
    assert!(!steps_sound("5 + x = 9"));
    // Every reference of the suite is sound.
    let a = suite(&params(4)).unwrap();
    assert!(a
        .iter()
        .filter(|t| t.category == Category::Math)
        .all(|t| steps_sound(&t.reference)));
}
