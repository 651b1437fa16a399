//! The skills: each turns a random stream, a split and a difficulty into one task with its
//! reference answer and its checkable gold answer.

use super::{Split, Task};
use crate::data::Category;
use crate::generate::Rng;

pub struct Skill {
    pub name: &'static str,
    pub category: Category,
    pub make: fn(&mut Rng, Split, u8) -> Task,
}

pub const SKILLS: [Skill; 9] = [
    Skill {
        name: "reverse_words",
        category: Category::Instruction,
        make: reverse_words,
    },
    Skill {
        name: "sort_words",
        category: Category::Instruction,
        make: sort_words,
    },
    Skill {
        name: "upper_case",
        category: Category::Instruction,
        make: upper_case,
    },
    Skill {
        name: "comma_list",
        category: Category::Instruction,
        make: comma_list,
    },
    Skill {
        name: "count_words",
        category: Category::Instruction,
        make: count_words,
    },
    Skill {
        name: "word_problem",
        category: Category::Math,
        make: word_problem,
    },
    Skill {
        name: "python_function",
        category: Category::Code,
        make: python_function,
    },
    Skill {
        name: "zh_reverse",
        category: Category::SecondLanguage,
        make: zh_reverse,
    },
    Skill {
        name: "zh_add",
        category: Category::SecondLanguage,
        make: zh_add,
    },
];

const WORDS: [&str; 48] = [
    "apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "chair", "garden", "rocket",
    "violet", "window", "forest", "bridge", "candle", "mirror", "pepper", "silver", "planet",
    "castle", "dragon", "feather", "harbor", "island", "jacket", "kettle", "ladder", "marble",
    "needle", "orange", "pencil", "quartz", "saddle", "tunnel", "valley", "wagon", "yellow",
    "zebra", "anchor", "basket", "cotton", "desert", "engine", "falcon", "glove", "hammer",
    "insect", "jungle",
];

const ZH_WORDS: [&str; 24] = [
    "苹果", "香蕉", "月亮", "太阳", "河流", "山峰", "老师", "学生", "花园", "城市", "书本", "桌子",
    "椅子", "窗户", "天空", "海洋", "森林", "朋友", "音乐", "电脑", "火车", "雨伞", "茶杯", "钢琴",
];

const NAMES: [&str; 12] = [
    "Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kira", "Leo",
];
const ITEMS: [&str; 8] = [
    "apples", "marbles", "stickers", "coins", "books", "pencils", "shells", "cards",
];

fn pick<'a>(rng: &mut Rng, from: &[&'a str]) -> &'a str {
    from[rng.below(from.len())]
}

/// `k` distinct words.
fn words<'a>(rng: &mut Rng, from: &[&'a str], k: usize) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::with_capacity(k);
    while out.len() < k {
        let w = pick(rng, from);
        if !out.contains(&w) {
            out.push(w);
        }
    }
    out
}

fn task(prompt: String, reference: String, gold: String, language: &str) -> Task {
    Task {
        id: String::new(),
        split: Split::Train,
        skill: String::new(),
        category: Category::Instruction,
        difficulty: 1,
        language: language.into(),
        prompt,
        reference,
        gold,
        tests: None,
        entry_point: None,
    }
}

fn list_len(d: u8) -> usize {
    2 + 2 * d as usize
}

fn reverse_words(rng: &mut Rng, _: Split, d: u8) -> Task {
    let w = words(rng, &WORDS, list_len(d));
    let gold: Vec<&str> = w.iter().rev().copied().collect();
    let g = gold.join(" ");
    task(
        format!("Reverse the order of these words: {}", w.join(" ")),
        g.clone(),
        g,
        "en",
    )
}

fn sort_words(rng: &mut Rng, _: Split, d: u8) -> Task {
    let w = words(rng, &WORDS, list_len(d));
    let mut s = w.clone();
    s.sort();
    let g = s.join(" ");
    task(
        format!("Sort these words alphabetically: {}", w.join(" ")),
        g.clone(),
        g,
        "en",
    )
}

fn upper_case(rng: &mut Rng, _: Split, d: u8) -> Task {
    let w = words(rng, &WORDS, list_len(d));
    let g = w.join(" ").to_uppercase();
    task(
        format!("Write these words in upper case: {}", w.join(" ")),
        g.clone(),
        g,
        "en",
    )
}

fn comma_list(rng: &mut Rng, _: Split, d: u8) -> Task {
    let w = words(rng, &WORDS, list_len(d));
    let g = w.join(", ");
    task(
        format!(
            "Write these words as a comma-separated list: {}",
            w.join(" ")
        ),
        g.clone(),
        g,
        "en",
    )
}

fn count_words(rng: &mut Rng, _: Split, d: u8) -> Task {
    let k = 2 + rng.below(3 + 2 * d as usize);
    let w: Vec<&str> = (0..k).map(|_| pick(rng, &WORDS)).collect();
    let g = k.to_string();
    task(
        format!("How many words are in this list: {}", w.join(" ")),
        g.clone(),
        g,
        "en",
    )
}

/// Multi-step arithmetic: one step at difficulty 1, up to three at 3; the gold answer in GSM8K's
/// `#### n` style or MATH's `\boxed{n}`, alternating.
fn word_problem(rng: &mut Rng, _: Split, d: u8) -> Task {
    let name = pick(rng, &NAMES);
    let item = pick(rng, &ITEMS);
    let a = 2 + rng.below(20) as i64;
    let b = 2 + rng.below(20) as i64;
    let (mut prompt, mut steps, mut value) = (
        format!("{name} has {a} {item} and finds {b} more."),
        vec![format!("{a} + {b} = {}", a + b)],
        a + b,
    );
    if d >= 2 {
        let c = 1 + rng.below(value as usize - 1) as i64;
        prompt.push_str(&format!(" Then {name} gives away {c}."));
        steps.push(format!("{value} - {c} = {}", value - c));
        value -= c;
    }
    if d >= 3 {
        let m = 2 + rng.below(3) as i64;
        prompt.push_str(&format!(" Then the pile grows {m} times bigger."));
        steps.push(format!("{value} * {m} = {}", value * m));
        value *= m;
    }
    prompt.push_str(&format!(" How many {item} does {name} have now?"));
    let boxed = rng.below(2) == 1;
    let last = if boxed {
        format!("The answer is \\boxed{{{value}}}.")
    } else {
        format!("#### {value}")
    };
    let reference = format!("{}\n{last}", steps.join("\n"));
    task(prompt, reference, value.to_string(), "en")
}

/// A small Python function with a constant in its name and contract, HumanEval layout.
fn python_function(rng: &mut Rng, _: Split, d: u8) -> Task {
    let k = 2 + rng.below(98) as i64;
    let (name, sig, doc, body, cases): (String, &str, String, String, Vec<(String, String)>) =
        match (d, rng.below(3)) {
            (1, 0) => {
                let xs: Vec<i64> = (0..3).map(|_| rng.below(50) as i64).collect();
                let name = format!("add_{k}");
                let expect = format!("{}", xs[0] + k);
                (
                    name,
                    "x",
                    format!("Return x plus {k}."),
                    format!("    return x + {k}\n"),
                    vec![
                        (xs[0].to_string(), expect),
                        (xs[1].to_string(), (xs[1] + k).to_string()),
                    ],
                )
            }
            (1, 1) => {
                let name = format!("minus_{k}");
                let x = rng.below(200) as i64;
                (
                    name,
                    "x",
                    format!("Return x minus {k}."),
                    format!("    return x - {k}\n"),
                    vec![
                        (x.to_string(), (x - k).to_string()),
                        (k.to_string(), "0".into()),
                    ],
                )
            }
            (1, _) => {
                let name = format!("times_{k}");
                let x = rng.below(30) as i64;
                (
                    name,
                    "x",
                    format!("Return x multiplied by {k}."),
                    format!("    return x * {k}\n"),
                    vec![
                        (x.to_string(), (x * k).to_string()),
                        ("0".into(), "0".into()),
                    ],
                )
            }
            (2, 0) => {
                let name = format!("add_{k}_to_all");
                let xs: Vec<i64> = (0..3).map(|_| rng.below(50) as i64).collect();
                let ys: Vec<i64> = xs.iter().map(|x| x + k).collect();
                (
                    name,
                    "xs",
                    format!("Return a list with {k} added to every element of xs."),
                    format!("    return [x + {k} for x in xs]\n"),
                    vec![
                        (format!("{xs:?}"), format!("{ys:?}")),
                        ("[]".into(), "[]".into()),
                    ],
                )
            }
            (2, 1) => {
                let name = format!("count_below_{k}");
                let xs: Vec<i64> = (0..5).map(|_| rng.below(120) as i64).collect();
                let n = xs.iter().filter(|&&x| x < k).count();
                (
                    name,
                    "xs",
                    format!("Return how many elements of xs are less than {k}."),
                    format!("    return sum(1 for x in xs if x < {k})\n"),
                    vec![
                        (format!("{xs:?}"), n.to_string()),
                        ("[]".into(), "0".into()),
                    ],
                )
            }
            (2, _) => {
                let name = format!("count_above_{k}");
                let xs: Vec<i64> = (0..5).map(|_| rng.below(80) as i64).collect();
                let n = xs.iter().filter(|&&x| x > k).count();
                (
                    name,
                    "xs",
                    format!("Return how many elements of xs are greater than {k}."),
                    format!("    return sum(1 for x in xs if x > {k})\n"),
                    vec![
                        (format!("{xs:?}"), n.to_string()),
                        ("[]".into(), "0".into()),
                    ],
                )
            }
            (_, 0) => {
                let name = format!("sum_above_{k}");
                let xs: Vec<i64> = (0..6).map(|_| rng.below(80) as i64).collect();
                let s: i64 = xs.iter().filter(|&&x| x > k).sum();
                (
                    name,
                    "xs",
                    format!("Return the sum of the elements of xs that are greater than {k}."),
                    format!("    return sum(x for x in xs if x > {k})\n"),
                    vec![
                        (format!("{xs:?}"), s.to_string()),
                        ("[]".into(), "0".into()),
                    ],
                )
            }
            (_, 1) => {
                let name = format!("keep_above_{k}");
                let xs: Vec<i64> = (0..6).map(|_| rng.below(120) as i64).collect();
                let ys: Vec<i64> = xs.iter().copied().filter(|&x| x > k).collect();
                (
                    name,
                    "xs",
                    format!("Return the elements of xs that are greater than {k}, in order."),
                    format!("    return [x for x in xs if x > {k}]\n"),
                    vec![
                        (format!("{xs:?}"), format!("{ys:?}")),
                        ("[]".into(), "[]".into()),
                    ],
                )
            }
            (_, _) => {
                let name = format!("clip_to_{k}");
                let xs: Vec<i64> = (0..5).map(|_| rng.below(80) as i64).collect();
                let ys: Vec<i64> = xs.iter().map(|&x| x.min(k)).collect();
                (
                    name,
                    "xs",
                    format!("Return xs with every element greater than {k} replaced by {k}."),
                    format!("    return [min(x, {k}) for x in xs]\n"),
                    vec![
                        (format!("{xs:?}"), format!("{ys:?}")),
                        ("[]".into(), "[]".into()),
                    ],
                )
            }
        };
    let prompt_code = format!("def {name}({sig}):\n    \"\"\"{doc}\"\"\"\n");
    let tests = format!(
        "def check(candidate):\n{}",
        cases
            .iter()
            .map(|(i, o)| format!("    assert candidate({i}) == {o}\n"))
            .collect::<String>()
    );
    let reference = format!("```python\n{prompt_code}{body}```");
    let mut t = task(
        format!("Complete this Python function.\n\n```python\n{prompt_code}```"),
        reference,
        String::new(),
        "en",
    );
    t.tests = Some(tests);
    t.entry_point = Some(name);
    t
}

fn zh_reverse(rng: &mut Rng, _: Split, d: u8) -> Task {
    let w = words(rng, &ZH_WORDS, list_len(d));
    let g: Vec<&str> = w.iter().rev().copied().collect();
    let g = g.join(" ");
    task(
        format!("把下面的词语倒序排列：{}", w.join(" ")),
        g.clone(),
        g,
        "zh",
    )
}

fn zh_add(rng: &mut Rng, _: Split, d: u8) -> Task {
    let scale = 10usize.pow(d as u32);
    let a = 1 + rng.below(scale) as i64;
    let b = 1 + rng.below(scale) as i64;
    let g = (a + b).to_string();
    task(
        format!("计算：{a} 加 {b} 等于多少？"),
        format!("{a} 加 {b} 等于 {g}。\n{g}"),
        g,
        "zh",
    )
}
