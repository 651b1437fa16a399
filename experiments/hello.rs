//! `hello`: a small word-statistics pipeline over real text files, exercising every engine feature
//! (a raw input, parameters, a fan-out of independent steps, a fan-in, metrics, progress).
//!
//! ```text
//! corpus (source) -> words -> counts  --\
//!                          \-> lengths --> summary
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::recipe::{step, BoxError, Experiment, ExperimentDef, Result};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HelloParams {
    /// Directory of `.txt` files, relative to the project root.
    pub corpus: String,
    /// Fold words to lower case before counting.
    pub lowercase: bool,
    /// Ignore words shorter than this when counting.
    pub min_len: u32,
    /// How many of the most frequent words the summary lists.
    pub top_k: u32,
    /// Artificial delay per step (ms), spread over its writes; the crash tests use it to land
    /// `kill -9` inside steps.
    pub delay_ms: u64,
}

impl Default for HelloParams {
    fn default() -> Self {
        HelloParams {
            corpus: "experiments/data/hello".into(),
            lowercase: true,
            min_len: 3,
            top_k: 10,
            delay_ms: 0,
        }
    }
}

pub fn define() -> ExperimentDef {
    ExperimentDef::new(
        "hello",
        "word statistics over text files: the engine's demo and test experiment",
        build,
    )
}

#[derive(Serialize, Deserialize)]
struct WordsParams {
    lowercase: bool,
    delay_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct CountsParams {
    min_len: u32,
    delay_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct DelayOnly {
    delay_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct SummaryParams {
    top_k: u32,
    delay_ms: u64,
}

/// Write `lines` to `path`, spreading `delay_ms` over the writes so a crash can land mid-file.
fn write_slowly(path: &Path, lines: &[String], delay_ms: u64) -> Result<(), BoxError> {
    let mut f = fs::File::create(path)?;
    let pause = std::time::Duration::from_millis(delay_ms / lines.len().max(1) as u64);
    for l in lines {
        f.write_all(l.as_bytes())?;
        f.write_all(b"\n")?;
        f.flush()?;
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    Ok(())
}

fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, BoxError> {
    let text = fs::read_to_string(path)?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1).into())
        })
        .collect()
}

#[derive(Serialize, Deserialize)]
struct FileWords {
    file: String,
    words: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct WordCount {
    word: String,
    count: u64,
}

fn build(exp: &mut Experiment, p: &HelloParams) -> Result<()> {
    let corpus = exp.source("corpus", &p.corpus)?;

    let words = exp.step(
        "words",
        &WordsParams {
            lowercase: p.lowercase,
            delay_ms: p.delay_ms,
        },
        &[corpus],
        |ctx| {
            let prm: WordsParams = ctx.params()?;
            let dir = ctx.input("corpus")?.to_path_buf();
            let mut files: Vec<_> = fs::read_dir(&dir)?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()?;
            files.retain(|f| f.extension().is_some_and(|x| x == "txt"));
            files.sort();
            if files.is_empty() {
                return Err(format!("{}: no .txt files in the corpus", dir.display()).into());
            }
            let bar = ctx.progress(files.len() as u64, "files");
            let mut lines = Vec::new();
            let mut total = 0usize;
            for f in &files {
                let text = fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
                let words: Vec<String> = text
                    .split(|c: char| !c.is_alphanumeric())
                    .filter(|w| !w.is_empty())
                    .map(|w| {
                        if prm.lowercase {
                            w.to_lowercase()
                        } else {
                            w.to_string()
                        }
                    })
                    .collect();
                total += words.len();
                let rec = FileWords {
                    file: f
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned(),
                    words,
                };
                lines.push(serde_json::to_string(&rec)?);
                bar.inc(1);
            }
            bar.finish_and_clear();
            write_slowly(&ctx.out("words.jsonl")?, &lines, prm.delay_ms)?;
            ctx.metric("words_total", total as f64);
            ctx.metric("files", files.len() as f64);
            Ok(())
        },
    )?;

    let counts = exp.step(
        "counts",
        &CountsParams {
            min_len: p.min_len,
            delay_ms: p.delay_ms,
        },
        &[words],
        |ctx| {
            let prm: CountsParams = ctx.params()?;
            let files: Vec<FileWords> = read_jsonl(&ctx.input("words")?.join("words.jsonl"))?;
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            for w in files.iter().flat_map(|f| &f.words) {
                if w.chars().count() >= prm.min_len as usize {
                    *counts.entry(w.clone()).or_default() += 1;
                }
            }
            let mut sorted: Vec<WordCount> = counts
                .into_iter()
                .map(|(word, count)| WordCount { word, count })
                .collect();
            sorted.sort_by(|a, b| b.count.cmp(&a.count).then(a.word.cmp(&b.word)));
            ctx.metric("distinct", sorted.len() as f64);
            let lines: Vec<String> = sorted
                .iter()
                .map(serde_json::to_string)
                .collect::<Result<_, _>>()?;
            write_slowly(&ctx.out("counts.jsonl")?, &lines, prm.delay_ms)?;
            Ok(())
        },
    )?;

    let lengths = exp.step(
        "lengths",
        &DelayOnly {
            delay_ms: p.delay_ms,
        },
        &[words],
        |ctx| {
            let prm: DelayOnly = ctx.params()?;
            let files: Vec<FileWords> = read_jsonl(&ctx.input("words")?.join("words.jsonl"))?;
            let mut hist: BTreeMap<usize, u64> = BTreeMap::new();
            let (mut n, mut sum) = (0u64, 0u64);
            for w in files.iter().flat_map(|f| &f.words) {
                let l = w.chars().count();
                *hist.entry(l).or_default() += 1;
                n += 1;
                sum += l as u64;
            }
            ctx.metric("mean_len", if n == 0 { 0.0 } else { sum as f64 / n as f64 });
            let lines: Vec<String> = hist
                .iter()
                .map(|(len, count)| format!("{{\"len\":{len},\"count\":{count}}}"))
                .collect();
            write_slowly(&ctx.out("lengths.jsonl")?, &lines, prm.delay_ms)?;
            Ok(())
        },
    )?;

    exp.step(
        step("summary").version(1),
        &SummaryParams {
            top_k: p.top_k,
            delay_ms: p.delay_ms,
        },
        &[counts, lengths],
        |ctx| {
            let prm: SummaryParams = ctx.params()?;
            let counts: Vec<WordCount> = read_jsonl(&ctx.input("counts")?.join("counts.jsonl"))?;
            let lengths: Vec<serde_json::Value> =
                read_jsonl(&ctx.input("lengths")?.join("lengths.jsonl"))?;
            let mut md = vec!["# Most frequent words".to_string(), String::new()];
            md.push("| word | count |".into());
            md.push("|---|---|".into());
            for c in counts.iter().take(prm.top_k as usize) {
                md.push(format!("| {} | {} |", c.word, c.count));
            }
            md.push(String::new());
            md.push(format!("{} word lengths observed.", lengths.len()));
            write_slowly(&ctx.out("summary.md")?, &md, prm.delay_ms)?;
            if let Some(top) = counts.first() {
                ctx.metric("top_count", top.count as f64);
            }
            Ok(())
        },
    )?;
    Ok(())
}
