//! Training rows (JSONL or Parquet) and their tokenisation.
//!
//! SFT rows carry chat `messages` (TRL / alignment-handbook) or ShareGPT `conversations`
//! (`from`: human/gpt/system, `value`). Loss is on assistant tokens: the text each assistant message adds
//! to the rendering of the conversation before it (rendered with the generation prompt), so template
//! tokens and prompts are masked.
//!
//! DPO rows carry `prompt`, `chosen`, `rejected` as message lists (and for WRPO `chosen_target`, the
//! target-preferred answer). Tokenisation follows TRL 1.x: the prompt rendered with the generation
//! prompt, each prompt+answer rendered whole, and the completion is what follows their common token
//! prefix (so the template's end-of-turn tokens belong to the completion).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::model::{ChatTemplate, ModelError};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}:{line}: {reason}", path.display())]
    Row {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {source}", path.display())]
    Model {
        path: PathBuf,
        line: usize,
        #[source]
        source: Box<ModelError>,
    },
    #[error("{}: no usable rows ({skipped} skipped)", path.display())]
    Empty { path: PathBuf, skipped: usize },
}

/// A row with where it came from.
#[derive(Clone, Debug)]
pub struct Row {
    pub line: usize,
    pub value: Value,
}

/// Rows of a `.parquet` file (row numbers stand in for line numbers) or of a JSONL file.
pub fn read_rows(path: &Path) -> Result<Vec<Row>, DataError> {
    if path.extension().is_some_and(|e| e == "parquet") {
        read_parquet(path)
    } else {
        read_jsonl(path)
    }
}

/// Parquet goes through the data stage's polars reader, so there is one Parquet path.
fn read_parquet(path: &Path) -> Result<Vec<Row>, DataError> {
    let rows = crate::data::read_values(path).map_err(|e| match e {
        crate::data::DataError::Io { path, source } => DataError::Io { path, source },
        other => row_err(path, 0, format!("Parquet: {other}")),
    })?;
    Ok(rows
        .into_iter()
        .map(|(line, value)| Row {
            line,
            value: drop_nulls(value),
        })
        .collect())
}

/// Parquet columns are rectangular: a field absent from a row reads as null. The row model treats
/// absent and null alike only where it says so, so nulls are removed (as the JSON rows lack them).
fn drop_nulls(v: Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.into_iter()
                .filter(|(_, x)| !x.is_null())
                .map(|(k, x)| (k, drop_nulls(x)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(drop_nulls).collect()),
        x => x,
    }
}

pub fn read_jsonl(path: &Path) -> Result<Vec<Row>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(l).map_err(|e| DataError::Row {
            path: path.to_path_buf(),
            line: i + 1,
            reason: format!("not JSON: {e}"),
        })?;
        out.push(Row { line: i + 1, value });
    }
    Ok(out)
}

/// Content bytes that surely hold more than `max_len` tokens: no token covers more bytes than the
/// longest string in the vocabulary, so `(max_len + 64) * longest` bytes make at least `max_len + 64`
/// tokens (the 64 keep the cut away from the tokens that are kept).
pub fn row_byte_bound(tok: &tokenizers::Tokenizer, max_len: usize) -> usize {
    let longest = tok
        .get_vocab(true)
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(16)
        .clamp(4, 1024);
    max_len.saturating_add(64).saturating_mul(longest)
}

/// The bytes of every string in a message list (or a message, or a string).
pub fn content_bytes(v: Option<&Value>) -> usize {
    match v {
        Some(Value::String(s)) => s.len(),
        Some(Value::Array(a)) => a.iter().map(|x| content_bytes(Some(x))).sum(),
        Some(Value::Object(o)) => o.values().map(|x| content_bytes(Some(x))).sum(),
        _ => 0,
    }
}

/// Cut the strings of a message list so that together they keep at most `budget` bytes (at char
/// boundaries, in order; later strings become empty). Message structure is kept, so the template
/// renders the same turns.
pub fn cut_contents(v: &mut Value, budget: usize) {
    fn walk(v: &mut Value, left: &mut usize) {
        match v {
            Value::String(s) => {
                if s.len() > *left {
                    let mut cut = *left;
                    while !s.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    s.truncate(cut);
                }
                *left -= s.len();
            }
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, left)),
            Value::Object(o) => {
                for (k, x) in o.iter_mut() {
                    // Roles and names are structure, not content.
                    if k != "role" && k != "from" && k != "name" {
                        walk(x, left);
                    }
                }
            }
            _ => {}
        }
    }
    if content_bytes(Some(v)) > budget {
        let mut left = budget;
        walk(v, &mut left);
    }
}

fn row_err(path: &Path, line: usize, reason: impl Into<String>) -> DataError {
    DataError::Row {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

/// Messages of an SFT row, in either convention.
pub fn sft_messages(path: &Path, row: &Row) -> Result<Value, DataError> {
    if let Some(m) = row.value.get("messages") {
        return check_messages(path, row.line, m, "messages").map(|_| m.clone());
    }
    if let Some(Value::Array(conv)) = row.value.get("conversations") {
        let mut out = Vec::new();
        for turn in conv {
            let role = match turn.get("from").and_then(Value::as_str) {
                Some("human") | Some("user") => "user",
                Some("gpt") | Some("assistant") => "assistant",
                Some("system") => "system",
                other => {
                    return Err(row_err(
                        path,
                        row.line,
                        format!("unknown ShareGPT speaker {other:?}"),
                    ))
                }
            };
            let value = turn
                .get("value")
                .and_then(Value::as_str)
                .ok_or_else(|| row_err(path, row.line, "ShareGPT turn without a string `value`"))?;
            out.push(serde_json::json!({"role": role, "content": value}));
        }
        let m = Value::Array(out);
        check_messages(path, row.line, &m, "conversations")?;
        return Ok(m);
    }
    Err(row_err(path, row.line, "no `messages` or `conversations`"))
}

fn check_messages(path: &Path, line: usize, m: &Value, field: &str) -> Result<(), DataError> {
    let list = m
        .as_array()
        .ok_or_else(|| row_err(path, line, format!("`{field}` is not a list")))?;
    if list.is_empty() {
        return Err(row_err(path, line, format!("`{field}` is empty")));
    }
    for (i, msg) in list.iter().enumerate() {
        let role = msg.get("role").and_then(Value::as_str);
        let content = msg.get("content").and_then(Value::as_str);
        match (role, content) {
            (Some(_), Some(c))
                if msg.get("role") == Some(&Value::from("assistant")) && c.trim().is_empty() =>
            {
                return Err(row_err(
                    path,
                    line,
                    format!("`{field}`[{i}]: empty assistant response"),
                ))
            }
            (Some(_), Some(_)) => {}
            _ => {
                return Err(row_err(
                    path,
                    line,
                    format!("`{field}`[{i}] needs string `role` and `content`"),
                ))
            }
        }
    }
    Ok(())
}

/// A tokenised SFT example: ids and which of them carry loss.
#[derive(Clone, Debug, PartialEq)]
pub struct SftExample {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
}

pub fn tokenize_sft(
    template: &ChatTemplate,
    tok: &tokenizers::Tokenizer,
    messages: &Value,
    extra: &Value,
) -> Result<SftExample, ModelError> {
    let list = messages.as_array().expect("checked by sft_messages");
    let text = template.render(messages, false, extra)?;
    let mut spans = Vec::new();
    for (i, m) in list.iter().enumerate() {
        if m.get("role").and_then(Value::as_str) == Some("assistant") {
            let before = Value::Array(list[..i].to_vec());
            let upto = Value::Array(list[..=i].to_vec());
            let start = template.render(&before, true, extra)?.len();
            let end = template.render(&upto, false, extra)?.len();
            spans.push((start, end));
        }
    }
    let enc = tok
        .encode(text.as_str(), false)
        .map_err(|e| ModelError::Invalid(format!("tokenising: {e}")))?;
    let mask = enc
        .get_offsets()
        .iter()
        .map(|&(s, _)| spans.iter().any(|&(a, b)| a <= s && s < b) as u8)
        .collect();
    Ok(SftExample {
        ids: enc.get_ids().to_vec(),
        mask,
    })
}

/// A tokenised preference pair (WRPO adds the target-preferred answer).
#[derive(Clone, Debug, PartialEq)]
pub struct PairExample {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub chosen_target: Option<Vec<u32>>,
}

fn messages_field<'a>(path: &Path, row: &'a Row, field: &str) -> Result<&'a Value, DataError> {
    let v = row
        .value
        .get(field)
        .ok_or_else(|| row_err(path, row.line, format!("no `{field}`")))?;
    check_messages(path, row.line, v, field)?;
    Ok(v)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

pub fn tokenize_pair(
    path: &Path,
    row: &Row,
    template: &ChatTemplate,
    tok: &tokenizers::Tokenizer,
    extra: &Value,
    wrpo: bool,
) -> Result<PairExample, DataError> {
    let model_err = |source| DataError::Model {
        path: path.to_path_buf(),
        line: row.line,
        source: Box::new(source),
    };
    let prompt = messages_field(path, row, "prompt")?;
    let encode = |m: &Value, gen: bool| -> Result<Vec<u32>, DataError> {
        let text = template.render(m, gen, extra).map_err(model_err)?;
        Ok(tok
            .encode(text.as_str(), false)
            .map_err(|e| row_err(path, row.line, format!("tokenising: {e}")))?
            .get_ids()
            .to_vec())
    };
    let joined = |answer: &Value| {
        let mut all = prompt.as_array().expect("checked").clone();
        all.extend(answer.as_array().expect("checked").iter().cloned());
        Value::Array(all)
    };
    let p = encode(prompt, true)?;
    let mut full = vec![encode(
        &joined(messages_field(path, row, "chosen")?),
        false,
    )?];
    full.push(encode(
        &joined(messages_field(path, row, "rejected")?),
        false,
    )?);
    if wrpo {
        full.push(encode(
            &joined(messages_field(path, row, "chosen_target")?),
            false,
        )?);
    }
    let plen = full.iter().map(|f| common_prefix(&p, f)).min().unwrap_or(0);
    let mut answers: Vec<Vec<u32>> = full.iter().map(|f| f[plen..].to_vec()).collect();
    if answers.iter().any(Vec::is_empty) {
        return Err(row_err(path, row.line, "an answer tokenises to nothing"));
    }
    let chosen_target = if wrpo { answers.pop() } else { None };
    let rejected = answers.pop().expect("two");
    let chosen = answers.pop().expect("one");
    Ok(PairExample {
        prompt: p[..plen].to_vec(),
        chosen,
        rejected,
        chosen_target,
    })
}
