//! Benchmarks as data: items with their prompt turns and what each scorer needs (gold answer,
//! choices, tests, a baseline's answer, reference answers), loaded from the real sets in
//! ../shared/data by name or from a benchmark file. The generation settings a benchmark asks for
//! travel with it so the step that answers it records them.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::EvalError;
use crate::data::Message;

/// How a benchmark's answers are scored.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The final answer (after `####`, "the answer is", `\boxed{}`, else the last number) equals the
    /// gold one: numerically when both are numbers, else as trimmed case-folded text (GSM8K style).
    Exact,
    /// The answer's last non-empty line, trimmed, equals the gold text exactly: rule-checked text
    /// transformations (reverse, sort, case, format) where the whole result is the answer.
    FinalLine,
    /// The final answer is mathematically equivalent to the gold one (MATH / AMC style).
    Math,
    /// The answer's code passes the item's tests in the sandbox (HumanEval / MBPP); pass@1 and pass@k.
    Code,
    /// Multiple choice: the letter the answer gives equals the gold letter (MMLU-Pro / GPQA style).
    Choice,
    /// A judge's pairwise preference against a baseline's answer (AlpacaEval 2): win rate and LC win rate.
    Pairwise,
    /// Arena-Hard: both orders judged on a five-point scale, Bradley-Terry score against the baseline.
    Arena,
    /// MT-Bench: single-answer grading 1-10 of each turn, reference-guided for math, reasoning, coding.
    MtBench,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Exact => "exact",
            Kind::FinalLine => "final-line",
            Kind::Math => "math",
            Kind::Code => "code",
            Kind::Choice => "choice",
            Kind::Pairwise => "pairwise",
            Kind::Arena => "arena",
            Kind::MtBench => "mt-bench",
        }
    }
    pub fn judged(self) -> bool {
        matches!(self, Kind::Pairwise | Kind::Arena | Kind::MtBench)
    }
}

/// One benchmark item.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: String,
    pub category: String,
    /// The user turns, in order (MT-Bench has two; the model's own earlier answers are replayed
    /// between them when it is asked the second).
    pub turns: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Gold final answer (exact, math) or gold letter (choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gold: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
    /// Code: the HumanEval prompt (function signature and docstring) the completion continues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point: Option<String>,
    /// Pairwise / arena: the baseline's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// Pairwise: the instruction's difficulty term of the LC GLM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub difficulty: Option<f64>,
    /// MT-Bench: reference answers per turn (reference-guided grading).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reference: Vec<String>,
}

/// How a benchmark asks to be answered. Greedy by default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub max_new_tokens: usize,
    pub temperature: f64,
}

impl Default for Generation {
    fn default() -> Self {
        Generation {
            max_new_tokens: 512,
            temperature: 0.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Benchmark {
    pub name: String,
    pub kind: Kind,
    pub generation: Generation,
    /// Where it was read from, and the blake3 of those bytes (for the run record).
    pub source: String,
    pub source_digest: String,
    pub items: Vec<Item>,
    /// Pairwise / arena: the baseline's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_name: Option<String>,
}

pub const BUILTIN: [&str; 2] = ["humaneval", "mt-bench"];

/// The user message a multiple-choice item is asked with (zero-shot, simple-evals' wording).
pub fn choice_prompt(question: &str, choices: &[String]) -> String {
    let mut s = String::from(
        "Answer the following multiple choice question. The last line of your response should be \
         of the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ",
    );
    let letters: Vec<String> = (0..choices.len()).map(|i| letter(i).to_string()).collect();
    s.push_str(&letters.join(""));
    s.push_str(". Think step by step before answering.\n\n");
    s.push_str(question.trim());
    s.push('\n');
    for (i, c) in choices.iter().enumerate() {
        s.push_str(&format!("\n{}) {}", letter(i), c.trim()));
    }
    s
}

pub fn letter(i: usize) -> char {
    (b'A' + i as u8) as char
}

/// The user message a HumanEval item is asked with by a chat model.
pub fn code_prompt_message(prompt: &str) -> String {
    format!(
        "Complete the following Python function. Reply with the whole function in one ```python \
         code block.\n\n```python\n{}```",
        prompt
    )
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, EvalError> {
    let io = |e| EvalError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let bytes = std::fs::read(path).map_err(io)?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(io)?;
        return Ok(out);
    }
    Ok(bytes)
}

fn lines(path: &Path, bytes: &[u8]) -> Result<Vec<(usize, Value)>, EvalError> {
    let text =
        std::str::from_utf8(bytes).map_err(|e| EvalError::file(path, format!("not UTF-8: {e}")))?;
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(l)
            .map_err(|e| EvalError::row(path, i + 1, format!("not JSON: {e}")))?;
        out.push((i + 1, v));
    }
    Ok(out)
}

fn str_field(path: &Path, line: usize, v: &Value, keys: &[&str]) -> Result<String, EvalError> {
    for k in keys {
        match v.get(*k) {
            Some(Value::String(s)) => return Ok(s.clone()),
            Some(Value::Number(n)) => return Ok(n.to_string()),
            Some(_) => {
                return Err(EvalError::row(
                    path,
                    line,
                    format!("field `{k}` is not a string"),
                ))
            }
            None => {}
        }
    }
    Err(EvalError::row(
        path,
        line,
        format!("missing field `{}`", keys.join("` or `")),
    ))
}

fn opt_str(v: &Value, k: &str) -> Option<String> {
    match v.get(k) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// The directory of the real evaluation sets (../shared/data beside the checkout), overridable
/// with `FUSELAB_SHARED_DATA`.
pub fn shared_data() -> PathBuf {
    if let Some(p) = std::env::var_os("FUSELAB_SHARED_DATA") {
        return PathBuf::from(p);
    }
    // The build's checkout first; a binary built from another checkout path (a shared target
    // directory) falls back to the `shared` beside the working directory's checkout.
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if built.is_dir() {
        return built;
    }
    match std::env::current_dir() {
        Ok(cwd) if cwd.join("../shared/data").is_dir() => cwd.join("../shared/data"),
        _ => built,
    }
}

/// Load a benchmark by built-in name or from a file. A file is either a JSON object
/// `{"name", "kind", "generation"?, "baseline_name"?, "items": [...]}` or JSONL items with `kind`
/// given by the caller.
pub fn load(spec: &str, kind: Option<Kind>) -> Result<Benchmark, EvalError> {
    if let Some(dir) = builtin_dir(spec) {
        return load_builtin(spec, &dir).expect("a builtin name");
    }
    let path = Path::new(spec);
    if !path.exists() {
        return Err(EvalError::UnknownBench(spec.to_string()));
    }
    let bytes = read_bytes(path)?;
    let digest = blake3::hash(&bytes).to_hex().to_string();
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("bench");
    let name = name.split('.').next().unwrap_or(name).to_string();
    let trimmed = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map(|i| bytes[i]);
    let is_object = trimmed == Some(b'{')
        && serde_json::from_slice::<Value>(&bytes).is_ok_and(|v| v.get("items").is_some());
    let mut b = if is_object {
        #[derive(Deserialize)]
        struct File {
            name: Option<String>,
            kind: Kind,
            #[serde(default)]
            generation: Generation,
            baseline_name: Option<String>,
            items: Vec<Value>,
        }
        let f: File = serde_json::from_slice(&bytes)
            .map_err(|e| EvalError::file(path, format!("not a benchmark file: {e}")))?;
        let items = f
            .items
            .iter()
            .enumerate()
            .map(|(i, v)| item(path, i + 1, v, f.kind))
            .collect::<Result<Vec<_>, _>>()?;
        Benchmark {
            name: f.name.unwrap_or(name),
            kind: kind.unwrap_or(f.kind),
            generation: f.generation,
            source: spec.to_string(),
            source_digest: digest,
            items,
            baseline_name: f.baseline_name,
        }
    } else {
        let kind = kind.ok_or_else(|| EvalError::file(path, "a JSONL benchmark needs --kind"))?;
        let items = lines(path, &bytes)?
            .iter()
            .map(|(line, v)| item(path, *line, v, kind))
            .collect::<Result<Vec<_>, _>>()?;
        Benchmark {
            name,
            kind,
            generation: Generation::default(),
            source: spec.to_string(),
            source_digest: digest,
            items,
            baseline_name: None,
        }
    };
    check(&mut b, path)?;
    Ok(b)
}

fn check(b: &mut Benchmark, path: &Path) -> Result<(), EvalError> {
    let mut seen = BTreeMap::new();
    for (i, it) in b.items.iter().enumerate() {
        if let Some(prev) = seen.insert(it.id.clone(), i) {
            return Err(EvalError::file(
                path,
                format!(
                    "item id `{}` appears twice (items {} and {})",
                    it.id,
                    prev + 1,
                    i + 1
                ),
            ));
        }
    }
    if b.items.is_empty() {
        return Err(EvalError::file(path, "holds no items"));
    }
    Ok(())
}

/// One item from a JSON object: `id`/`task_id`/`question_id`, `prompt`/`instruction`/`question`
/// or `turns`, plus what its kind needs.
fn item(path: &Path, line: usize, v: &Value, kind: Kind) -> Result<Item, EvalError> {
    let id = str_field(path, line, v, &["id", "task_id", "question_id"])?;
    let turns = match v.get("turns") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| EvalError::row(path, line, "`turns` must hold strings"))
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => vec![str_field(
            path,
            line,
            v,
            &["prompt", "instruction", "question", "problem"],
        )?],
    };
    let mut it = Item {
        id,
        category: opt_str(v, "category").unwrap_or_else(|| "default".into()),
        turns,
        system: opt_str(v, "system"),
        gold: opt_str(v, "answer")
            .or_else(|| opt_str(v, "gold"))
            .or_else(|| opt_str(v, "expected_answer")),
        choices: Vec::new(),
        code_prompt: None,
        tests: opt_str(v, "test").or_else(|| opt_str(v, "tests")),
        entry_point: opt_str(v, "entry_point"),
        baseline: opt_str(v, "baseline").or_else(|| opt_str(v, "baseline_output")),
        difficulty: v.get("difficulty").and_then(Value::as_f64),
        reference: match v.get("reference") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => Vec::new(),
        },
    };
    let need = |cond: bool, what: &str| {
        if cond {
            Ok(())
        } else {
            Err(EvalError::row(
                path,
                line,
                format!("a {} item needs {what}", kind.name()),
            ))
        }
    };
    match kind {
        Kind::Exact | Kind::FinalLine | Kind::Math => need(it.gold.is_some(), "`answer`")?,
        Kind::Choice => {
            it.choices = match v.get("choices").or_else(|| v.get("options")) {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|c| {
                        c.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| c.to_string())
                    })
                    .collect(),
                _ => {
                    return Err(EvalError::row(
                        path,
                        line,
                        "a choice item needs `choices` (a list)",
                    ))
                }
            };
            if it.choices.len() < 2 || it.choices.len() > 26 {
                return Err(EvalError::row(
                    path,
                    line,
                    format!("{} choices (2 to 26 allowed)", it.choices.len()),
                ));
            }
            // The gold answer as a letter, from a letter or a 0-based index.
            let gold = match v.get("answer").or_else(|| v.get("gold")) {
                Some(Value::Number(n)) => n.as_u64().map(|i| letter(i as usize).to_string()),
                Some(Value::String(s))
                    if s.len() == 1 && s.chars().all(|c| c.is_ascii_uppercase()) =>
                {
                    Some(s.clone())
                }
                _ => v
                    .get("answer_index")
                    .and_then(Value::as_u64)
                    .map(|i| letter(i as usize).to_string()),
            };
            let gold = gold.ok_or_else(|| {
                EvalError::row(
                    path,
                    line,
                    "a choice item needs `answer` (a letter or a 0-based index)",
                )
            })?;
            let idx = (gold.as_bytes()[0] - b'A') as usize;
            if idx >= it.choices.len() {
                return Err(EvalError::row(
                    path,
                    line,
                    format!("answer {gold} but only {} choices", it.choices.len()),
                ));
            }
            it.gold = Some(gold);
            let q = it.turns[0].clone();
            it.turns = vec![choice_prompt(&q, &it.choices)];
        }
        Kind::Code => {
            need(it.tests.is_some(), "`test`")?;
            if it.entry_point.is_some() {
                it.code_prompt = Some(it.turns[0].clone());
                it.turns = vec![code_prompt_message(&it.turns[0])];
            }
        }
        Kind::Pairwise | Kind::Arena => {
            need(it.baseline.is_some(), "`baseline` (the baseline's answer)")?
        }
        Kind::MtBench => {}
    }
    Ok(it)
}

/// HumanEval from its own file (task_id, prompt, canonical_solution, test, entry_point).
/// The ../shared/data directory of a benchmark known by name (`humaneval`, `mt-bench`).
pub fn builtin_dir(name: &str) -> Option<PathBuf> {
    match name {
        "humaneval" => Some(shared_data().join("humaneval")),
        "mt-bench" => Some(shared_data().join("mt_bench")),
        _ => None,
    }
}

/// A benchmark known by name read from `dir` (its `builtin_dir`, or a copy such as a recipe
/// step's input); `None` for a name that is not builtin.
pub fn load_builtin(name: &str, dir: &Path) -> Option<Result<Benchmark, EvalError>> {
    match name {
        "humaneval" => Some(humaneval(&dir.join("HumanEval.jsonl.gz"))),
        "mt-bench" => Some(mt_bench(dir)),
        _ => None,
    }
}

pub fn humaneval(path: &Path) -> Result<Benchmark, EvalError> {
    let bytes = read_bytes(path)?;
    let digest = blake3::hash(&bytes).to_hex().to_string();
    let items = lines(path, &bytes)?
        .iter()
        .map(|(line, v)| item(path, *line, v, Kind::Code))
        .collect::<Result<Vec<_>, _>>()?;
    let mut b = Benchmark {
        name: "humaneval".into(),
        kind: Kind::Code,
        generation: Generation {
            max_new_tokens: 512,
            temperature: 0.0,
        },
        source: path.display().to_string(),
        source_digest: digest,
        items,
        baseline_name: None,
    };
    check(&mut b, path)?;
    Ok(b)
}

/// MT-Bench from FastChat's files: `question.jsonl` (question_id, category, turns, reference for
/// some) and the GPT-4 reference answers for math, reasoning and coding.
pub fn mt_bench(dir: &Path) -> Result<Benchmark, EvalError> {
    let qpath = dir.join("question.jsonl");
    let bytes = read_bytes(&qpath)?;
    let mut h = blake3::Hasher::new();
    h.update(&bytes);
    let rpath = dir.join("reference_answer/gpt-4.jsonl");
    let rbytes = read_bytes(&rpath)?;
    h.update(&rbytes);
    let mut refs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (line, v) in lines(&rpath, &rbytes)? {
        let id = str_field(&rpath, line, &v, &["question_id"])?;
        let turns = v
            .pointer("/choices/0/turns")
            .and_then(Value::as_array)
            .ok_or_else(|| EvalError::row(&rpath, line, "missing choices[0].turns"))?;
        refs.insert(
            id,
            turns
                .iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect(),
        );
    }
    let mut items = Vec::new();
    for (line, v) in lines(&qpath, &bytes)? {
        let mut it = item(&qpath, line, &v, Kind::MtBench)?;
        if matches!(it.category.as_str(), "math" | "reasoning" | "coding") {
            if let Some(r) = refs.get(&it.id) {
                it.reference = r.clone();
            }
        }
        items.push(it);
    }
    let mut b = Benchmark {
        name: "mt-bench".into(),
        kind: Kind::MtBench,
        generation: Generation {
            max_new_tokens: 1024,
            temperature: 0.0,
        },
        source: qpath.display().to_string(),
        source_digest: h.finalize().to_hex().to_string(),
        items,
        baseline_name: None,
    };
    check(&mut b, &qpath)?;
    Ok(b)
}

impl Item {
    /// A one-turn item with nothing else set.
    pub fn new(
        id: impl Into<String>,
        category: impl Into<String>,
        prompt: impl Into<String>,
    ) -> Item {
        Item {
            id: id.into(),
            category: category.into(),
            turns: vec![prompt.into()],
            system: None,
            gold: None,
            choices: vec![],
            code_prompt: None,
            tests: None,
            entry_point: None,
            baseline: None,
            difficulty: None,
            reference: vec![],
        }
    }

    /// The conversation that asks turn `turn` (0-based), given the model's earlier answers.
    pub fn messages(&self, turn: usize, earlier: &[String]) -> Vec<Message> {
        let mut m = Vec::new();
        if let Some(s) = &self.system {
            m.push(Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        for (t, q) in self.turns.iter().enumerate().take(turn + 1) {
            m.push(Message {
                role: "user".into(),
                content: q.clone(),
            });
            if t < turn {
                m.push(Message {
                    role: "assistant".into(),
                    content: earlier[t].clone(),
                });
            }
        }
        m
    }
}
