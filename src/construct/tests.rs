use super::*;
use crate::data::{Annotation, Category, Message, Prompt, Sample};

fn prompt(id: &str, cat: Category) -> Prompt {
    Prompt {
        id: id.into(),
        dataset: format!("ds-{}", cat.name()),
        category: cat,
        messages: vec![Message::new("user", format!("question {id}"))],
        gold: None,
        tests: None,
        entry_point: None,
        language: if cat == Category::SecondLanguage {
            "zh"
        } else {
            "en"
        }
        .into(),
    }
}

/// (source, score, correct) answers to one prompt; texts are distinct unless `text` says otherwise.
#[derive(Default)]
struct World {
    prompts: Vec<Prompt>,
    samples: Vec<Sample>,
    notes: Vec<Annotation>,
}

impl World {
    fn add(&mut self, p: Prompt, answers: &[(&str, f64, Option<bool>)]) {
        for (i, (src, score, ok)) in answers.iter().enumerate() {
            self.answer(
                &p.id,
                src,
                i as u32,
                &format!("{} answer {i} by {src}", p.id),
                *score,
                *ok,
            );
        }
        self.prompts.push(p);
    }
    fn answer(&mut self, pid: &str, src: &str, idx: u32, text: &str, score: f64, ok: Option<bool>) {
        self.samples.push(Sample {
            prompt_id: pid.into(),
            source: src.into(),
            sample_index: idx,
            seed: 0,
            text: text.into(),
            tokens: 3,
            finish: "stop_token".into(),
        });
        self.notes.push(Annotation {
            prompt_id: pid.into(),
            source: src.into(),
            sample_index: idx,
            score: Some(score),
            correct: ok,
            reason: None,
        });
    }
    fn run(&self, p: &ConstructParams) -> Constructed {
        construct_records(&self.prompts, &self.samples, &self.notes, &[], p).unwrap()
    }
}

/// Every prompt to DPO (or to SFT with fraction 1).
fn params(sft_fraction: f64) -> ConstructParams {
    ConstructParams {
        sft_fraction,
        ..Default::default()
    }
}

fn reasons(c: &Constructed) -> Vec<(String, DropReason)> {
    c.dropped
        .iter()
        .map(|d| (d.prompt_id.clone(), d.reason))
        .collect()
}

#[test]
fn gap_window_bounds_and_inclusiveness() {
    // Gaps exactly representable in binary: 0.25, 0.5, 0.125.
    let mut w = World::default();
    w.add(
        prompt("at-max", Category::Instruction),
        &[("a", 1.0, None), ("a", 0.75, None)],
    );
    w.add(
        prompt("at-min", Category::Instruction),
        &[("a", 1.0, None), ("a", 0.875, None)],
    );
    w.add(
        prompt("above", Category::Instruction),
        &[("a", 1.0, None), ("a", 0.5, None)],
    );
    w.add(
        prompt("below", Category::Instruction),
        &[("a", 1.0, None), ("a", 0.9375, None)],
    );
    let mut p = params(0.0);
    p.gap = GapWindow {
        min: 0.125,
        max: 0.25,
        min_inclusive: true,
        max_inclusive: true,
    };
    let ids = |c: &Constructed| {
        c.dpo
            .iter()
            .map(|d| d.prompt_id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&w.run(&p)), ["at-max", "at-min"]);
    p.gap.max_inclusive = false;
    assert_eq!(ids(&w.run(&p)), ["at-min"]);
    p.gap.min_inclusive = false;
    let c = w.run(&p);
    assert!(ids(&c).is_empty());
    assert!(reasons(&c)
        .iter()
        .all(|(_, r)| *r == DropReason::NoPairInWindow));
    p.gap.max_inclusive = true;
    assert_eq!(ids(&w.run(&p)), ["at-max"]);
    // The paper's window on the paper's scale.
    let mut w = World::default();
    w.add(
        prompt("in", Category::Instruction),
        &[("a", 0.20, None), ("a", 0.15, None)],
    );
    w.add(
        prompt("wide", Category::Instruction),
        &[("a", 0.30, None), ("a", 0.15, None)],
    );
    w.add(
        prompt("narrow", Category::Instruction),
        &[("a", 0.155, None), ("a", 0.15, None)],
    );
    assert_eq!(ids(&w.run(&params(0.0))), ["in"]);
}

#[test]
fn pairs_come_from_one_source_and_the_choice_is_a_parameter() {
    let mut w = World::default();
    // Across sources the best-vs-worst gap (0.9 - 0.1) is far outside the window; within each
    // source both pairs fit: a: 0.9 - 0.85 = 0.05, b: 0.5 - 0.42 = 0.08.
    w.add(
        prompt("p", Category::Instruction),
        &[
            ("a", 0.9, None),
            ("a", 0.85, None),
            ("b", 0.5, None),
            ("b", 0.42, None),
            ("c", 0.1, None),
        ],
    );
    let c = w.run(&params(0.0));
    assert_eq!(c.dpo.len(), 1);
    let d = &c.dpo[0];
    assert_eq!(
        (d.source.as_str(), d.chosen_score, d.rejected_score),
        ("a", Some(0.9), Some(0.85))
    );
    assert_eq!(d.chosen[0].content, "p answer 0 by a");
    assert_eq!(d.rejected[0].content, "p answer 1 by a");
    assert_eq!(d.prompt, w.prompts[0].messages);
    let mut p = params(0.0);
    p.pair_source = PairSource::LargestGap;
    assert_eq!(w.run(&p).dpo[0].source, "b");
    p.pair_source = PairSource::SmallestGap;
    assert_eq!(w.run(&p).dpo[0].source, "a");
    p.pair_source = PairSource::FirstSource;
    assert_eq!(w.run(&p).dpo[0].source, "a");
}

#[test]
fn ties_follow_the_tie_break() {
    let mut w = World::default();
    w.add(
        prompt("p", Category::Instruction),
        &[
            ("a", 0.5, None),
            ("a", 0.5, None),
            ("a", 0.45, None),
            ("a", 0.45, None),
        ],
    );
    let c = w.run(&params(0.0));
    assert_eq!((c.dpo[0].chosen_index, c.dpo[0].rejected_index), (0, 2));
    let mut p = params(0.0);
    p.tie_break = TieBreak::LastIndex;
    let c = w.run(&p);
    assert_eq!((c.dpo[0].chosen_index, c.dpo[0].rejected_index), (1, 3));
    let c = w.run(&params(1.0));
    assert_eq!(c.sft[0].sample_index, 0);
}

#[test]
fn math_pairs_correct_against_incorrect_and_sft_needs_a_correct_answer() {
    let mut w = World::default();
    // The incorrect answer scores highest: SFT must still take the best *correct* one.
    w.add(
        prompt("m", Category::Math),
        &[
            ("a", 0.95, Some(false)),
            ("a", 0.60, Some(true)),
            ("a", 0.55, Some(false)),
            ("a", 0.58, Some(true)),
        ],
    );
    w.add(
        prompt("none", Category::Math),
        &[("a", 0.9, Some(false)), ("a", 0.8, Some(false))],
    );
    let c = w.run(&params(1.0));
    assert_eq!(c.sft.len(), 1);
    assert_eq!((c.sft[0].sample_index, c.sft[0].score), (1, Some(0.60)));
    assert_eq!(c.sft[0].messages.last().unwrap().content, "m answer 1 by a");
    assert_eq!(
        reasons(&c),
        [("none".to_string(), DropReason::NoCorrectAnswer)]
    );
    let c = w.run(&params(0.0));
    // Best correct (0.60) vs worst incorrect (0.55): gap 0.05, inside the window.
    assert_eq!(c.dpo.len(), 1);
    assert_eq!((c.dpo[0].chosen_index, c.dpo[0].rejected_index), (1, 2));
}

#[test]
fn code_prompts_whose_answers_all_fail_are_dropped() {
    let mut w = World::default();
    w.add(
        prompt("fail", Category::Code),
        &[("a", 0.9, Some(false)), ("b", 0.8, Some(false))],
    );
    w.add(
        prompt("pass", Category::Code),
        &[("a", 0.9, Some(true)), ("a", 0.85, Some(false))],
    );
    for frac in [0.0, 1.0] {
        let c = w.run(&params(frac));
        assert_eq!(
            reasons(&c),
            [("fail".to_string(), DropReason::AllCodeAnswersFail)]
        );
        assert_eq!(c.sft.len() + c.dpo.len(), 1);
    }
    let mut p = params(0.0);
    p.drop_all_fail_code = false;
    assert_eq!(
        reasons(&w.run(&p)),
        [("fail".to_string(), DropReason::NoPairInWindow)]
    );
}

#[test]
fn code_pairs_can_be_exempt_from_the_gap_window() {
    let mut w = World::default();
    // Passing 0.9 vs failing 0.2 of one source: a gap of 0.7, far outside [0.01, 0.1].
    w.add(
        prompt("code", Category::Code),
        &[("a", 0.9, Some(true)), ("a", 0.2, Some(false))],
    );
    w.add(
        prompt("instr", Category::Instruction),
        &[("a", 0.9, None), ("a", 0.2, None)],
    );
    let c = w.run(&params(0.0));
    assert!(c.dpo.is_empty());
    let mut p = params(0.0);
    p.gap_exempt = vec![Category::Code];
    let c = w.run(&p);
    assert_eq!(c.dpo.len(), 1, "only the code pair leaves the window");
    assert_eq!(c.dpo[0].prompt_id, "code");
    assert_eq!((c.dpo[0].chosen_index, c.dpo[0].rejected_index), (0, 1));
    assert_eq!(
        reasons(&c),
        [("instr".to_string(), DropReason::NoPairInWindow)]
    );
}

#[test]
fn second_language_is_sft_only_from_its_source() {
    let mut w = World::default();
    for i in 0..10 {
        w.add(
            prompt(&format!("zh{i}"), Category::SecondLanguage),
            &[("qwen", 0.3, None), ("llama", 0.9, None)],
        );
    }
    let mut english_zh = prompt("en-but-zh", Category::Instruction);
    english_zh.language = "zh".into();
    w.add(english_zh, &[("a", 0.5, None), ("a", 0.45, None)]);
    let mut p = params(0.0);
    p.second_language_source = Some("qwen".into());
    let c = w.run(&p);
    assert!(
        c.dpo.is_empty(),
        "second-language prompts never become pairs"
    );
    assert_eq!(c.sft.len(), 11);
    assert!(c
        .sft
        .iter()
        .filter(|r| r.category == Category::SecondLanguage)
        .all(|r| r.source == "qwen"));
    p.second_language_source = Some("mistral".into());
    let c = w.run(&p);
    assert_eq!(c.sft.len(), 1);
    assert_eq!(c.dropped.len(), 10);
    assert!(reasons(&c)
        .iter()
        .all(|(_, r)| *r == DropReason::NoAnswerFromSource));
}

#[test]
fn identical_answers_are_dropped_or_kept_as_asked() {
    let mut w = World::default();
    let p = prompt("same", Category::Instruction);
    w.answer("same", "a", 0, "42", 0.5, None);
    w.answer("same", "a", 1, "42", 0.45, None);
    w.prompts.push(p);
    let c = w.run(&params(0.0));
    assert_eq!(
        reasons(&c),
        [("same".to_string(), DropReason::IdenticalAnswers)]
    );
    let mut p = params(0.0);
    p.drop_identical = false;
    assert_eq!(w.run(&p).dpo.len(), 1);
}

fn big_world() -> World {
    let mut w = World::default();
    let cats = [
        Category::Instruction,
        Category::Math,
        Category::Code,
        Category::SecondLanguage,
    ];
    for i in 0..400 {
        let cat = cats[i % 4];
        let mut answers = Vec::new();
        for (s, src) in ["a", "b", "c"].iter().enumerate() {
            for k in 0..3 {
                let score = ((i * 7 + s * 13 + k * 29) % 97) as f64 / 400.0;
                let ok =
                    matches!(cat, Category::Math | Category::Code).then_some((i + s + k) % 3 != 0);
                answers.push((*src, score, ok));
            }
        }
        let mut p = prompt(&format!("p{i:03}"), cat);
        p.dataset = format!("ds{}", i % 3);
        w.add(p, &answers);
    }
    w
}

#[test]
fn split_ratio_per_dataset_and_category() {
    let w = big_world();
    let live: Vec<&Prompt> = w.prompts.iter().collect();
    let p = params(0.4);
    let s = split(&live, &p);
    let mut groups: BTreeMap<(String, Category), (usize, usize)> = BTreeMap::new();
    for (i, q) in w.prompts.iter().enumerate() {
        let e = groups.entry((q.dataset.clone(), q.category)).or_default();
        e.0 += 1;
        e.1 += s[i] as usize;
    }
    for ((_, cat), (n, sft)) in groups {
        if cat == Category::SecondLanguage {
            assert_eq!(sft, n);
        } else {
            assert_eq!(
                sft,
                (0.4 * n as f64).round() as usize,
                "{cat}: {sft} of {n}"
            );
        }
    }
    let mut p2 = p.clone();
    p2.sft_fraction_by_category.insert(Category::Math, 1.0);
    let s2 = split(&live, &p2);
    assert!(w
        .prompts
        .iter()
        .zip(&s2)
        .filter(|(q, _)| q.category == Category::Math)
        .all(|(_, &sft)| sft));
}

#[test]
fn same_seed_same_output_whatever_the_input_order() {
    let w = big_world();
    let p = params(0.4);
    let a = w.run(&p);
    assert!(
        a.sft.len() > 50 && a.dpo.len() > 20,
        "{} sft, {} dpo",
        a.sft.len(),
        a.dpo.len()
    );
    assert_eq!(a, w.run(&p));
    let mut shuffled = World {
        prompts: w.prompts.iter().rev().cloned().collect(),
        samples: w.samples.iter().rev().cloned().collect(),
        notes: w.notes.clone(),
    };
    shuffled.notes.rotate_left(17);
    let b = shuffled.run(&p);
    let key = |c: &Constructed| {
        let mut s: Vec<_> = c
            .sft
            .iter()
            .map(|r| (r.prompt_id.clone(), r.source.clone(), r.sample_index))
            .collect();
        let mut d: Vec<_> = c
            .dpo
            .iter()
            .map(|r| (r.prompt_id.clone(), r.chosen_index, r.rejected_index))
            .collect();
        s.sort();
        d.sort();
        (s, d)
    };
    assert_eq!(key(&a), key(&b));
    let mut p2 = p.clone();
    p2.seed += 1;
    assert_ne!(key(&a), key(&w.run(&p2)), "another seed splits differently");
}

#[test]
fn composition_counts_add_up() {
    let w = big_world();
    let mut eval_texts = vec![];
    // Contaminate two prompts through the evaluation set.
    for id in ["p001", "p002"] {
        eval_texts.push(format!("question {id}"));
    }
    let eval: Vec<EvalText> = eval_texts
        .iter()
        .map(|t| EvalText {
            name: "heldout",
            text: t,
        })
        .collect();
    let c = construct_records(&w.prompts, &w.samples, &w.notes, &eval, &params(0.4)).unwrap();
    let contaminated: Vec<_> = c
        .dropped
        .iter()
        .filter(|d| d.reason == DropReason::Contaminated)
        .collect();
    assert_eq!(contaminated.len(), 2);
    assert!(contaminated[0]
        .detail
        .as_deref()
        .unwrap()
        .contains("heldout"));
    let (all, per) = c.composition.split_last().unwrap();
    for r in per {
        let dropped: usize = r.dropped.values().sum();
        assert_eq!(r.prompts, r.sft + r.dpo + dropped, "{r:?}");
    }
    assert_eq!(all.prompts, w.prompts.len());
    assert_eq!(all.sft, c.sft.len());
    assert_eq!(all.dpo, c.dpo.len());
    assert_eq!(all.dropped.values().sum::<usize>(), c.dropped.len());
    let text = composition_text(&c.composition);
    assert!(
        text.lines().next().unwrap().contains("drop:contaminated"),
        "{text}"
    );
}

#[test]
fn bad_inputs_name_the_record() {
    let mut w = World::default();
    w.add(prompt("m", Category::Math), &[("a", 0.9, Some(true))]);
    w.notes[0].correct = None;
    let e = construct_records(&w.prompts, &w.samples, &w.notes, &[], &params(1.0)).unwrap_err();
    assert!(
        e.to_string().contains("answer 0 of source a to prompt m"),
        "{e}"
    );
    w.notes[0].correct = Some(true);
    w.notes[0].score = None;
    let e = construct_records(&w.prompts, &w.samples, &w.notes, &[], &params(1.0)).unwrap_err();
    assert!(e.to_string().contains("no reward score"), "{e}");
    // A NaN score has no place in "best" and "worst"; it is refused, not ranked somewhere.
    w.notes[0].score = Some(f64::NAN);
    let e = construct_records(&w.prompts, &w.samples, &w.notes, &[], &params(1.0)).unwrap_err();
    assert!(
        e.to_string()
            .contains("answer 0 of source a to prompt m has a NaN reward score"),
        "{e}"
    );
    w.notes[0].score = Some(0.9);
    w.samples[0].prompt_id = "ghost".into();
    let e = construct_records(&w.prompts, &w.samples, &w.notes, &[], &params(1.0)).unwrap_err();
    assert!(
        e.to_string().contains("`ghost` is not in the prompt set"),
        "{e}"
    );
    w.samples[0].prompt_id = "m".into();
    w.notes.push(w.notes[0].clone());
    let e = construct_records(&w.prompts, &w.samples, &w.notes, &[], &params(1.0)).unwrap_err();
    assert!(e.to_string().contains("more than once"), "{e}");
    let mut p = params(1.0);
    p.gap.min = 0.5;
    p.gap.max = 0.1;
    assert!(construct_records(&w.prompts, &w.samples, &w.notes[..1], &[], &p).is_err());
}
