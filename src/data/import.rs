//! Import of prompt sets and answers from the layouts they ship in: flat fields with a mapping
//! (`--prompt-field instruction --gold-field expected_answer`), chat `messages`, ShareGPT
//! `conversations`, the released FuseChat-3.0 SFT / DPO rows, answers generated elsewhere (JSONL of
//! prompt id, source, text) and SimPO's `all_generated_responses`. Every row error names file:line.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::Value;

use super::{Category, DataError, DpoPair, Message, Prompt, Sample, SftRow};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Decide from the first row.
    Auto,
    /// Flat fields named by the mapping.
    Fields,
    /// `messages`: [{role, content}].
    Messages,
    /// `conversations`: [{from, value}].
    Sharegpt,
    /// Released FuseChat-3.0 SFT rows: `conversations` + `dataset` + `source_model`.
    FusechatSft,
    /// Released FuseChat-3.0 DPO rows: `prompt`, `chosen`, `rejected` message lists.
    FusechatDpo,
    /// Answers made elsewhere: `prompt_id`, `source`, `text` (`sample_index` optional).
    Answers,
    /// SimPO's `all_generated_responses` (one source per file).
    Simpo,
}

/// How fields map onto records, and the values rows do not carry.
#[derive(Clone, Debug, Default)]
pub struct Mapping {
    pub layout: Option<Layout>,
    pub id_field: Option<String>,
    pub prompt_field: Option<String>,
    pub system_field: Option<String>,
    pub gold_field: Option<String>,
    pub tests_field: Option<String>,
    pub entry_point_field: Option<String>,
    pub category_field: Option<String>,
    pub dataset: Option<String>,
    pub category: Option<Category>,
    pub language: Option<String>,
    /// Source name for answer layouts that do not carry one.
    pub source: Option<String>,
}

/// What an import produced.
#[derive(Debug)]
pub enum Imported {
    Prompts(Vec<Prompt>),
    Samples(Vec<Sample>),
    Sft(Vec<SftRow>),
    Dpo(Vec<DpoPair>),
}

impl Imported {
    pub fn len(&self) -> usize {
        match self {
            Imported::Prompts(v) => v.len(),
            Imported::Samples(v) => v.len(),
            Imported::Sft(v) => v.len(),
            Imported::Dpo(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn kind(&self) -> super::RecordKind {
        match self {
            Imported::Prompts(_) => super::RecordKind::Prompts,
            Imported::Samples(_) => super::RecordKind::Samples,
            Imported::Sft(_) => super::RecordKind::Sft,
            Imported::Dpo(_) => super::RecordKind::Dpo,
        }
    }
    /// Write as Parquet or JSONL (by extension), atomically.
    pub fn write(&self, out: &Path) -> Result<(), DataError> {
        match self {
            Imported::Prompts(v) => super::write_records(v, out),
            Imported::Samples(v) => super::write_records(v, out),
            Imported::Sft(v) => super::write_records(v, out),
            Imported::Dpo(v) => super::write_records(v, out),
        }
    }
}

/// The category of the datasets FuseChat-3.0 released, for rows that carry only `dataset`.
pub fn fusechat_category(dataset: &str) -> Option<Category> {
    let d = dataset.to_ascii_lowercase();
    Some(match d.as_str() {
        "ultrafeedback" | "magpie-pro-dpo" | "helpsteer2" => Category::Instruction,
        "openmathinstruct-2" | "openmathinstruct2" => Category::Math,
        "leetcode" | "self-oss-instruct-sc2" => Category::Code,
        "alpaca_gpt4_zh" | "magpie-qwen2-pro-zh" => Category::SecondLanguage,
        _ => return None,
    })
}

fn detect(path: &Path, line: usize, row: &Value) -> Result<Layout, DataError> {
    let has = |k: &str| row.get(k).is_some();
    Ok(if has("conversations") && has("source_model") {
        Layout::FusechatSft
    } else if has("prompt") && has("chosen") && has("rejected") {
        Layout::FusechatDpo
    } else if has("conversations") {
        Layout::Sharegpt
    } else if has("messages") {
        Layout::Messages
    } else if has("all_generated_responses") {
        Layout::Simpo
    } else if has("prompt_id") && has("source") && has("text") {
        Layout::Answers
    } else if has("prompt") || has("instruction") || has("question") || has("problem") {
        Layout::Fields
    } else {
        return Err(DataError::row(
            path,
            line,
            format!(
                "cannot tell the layout from fields {}; pass --layout (and a --prompt-field)",
                field_list(row)
            ),
        ));
    })
}

fn field_list(row: &Value) -> String {
    match row.as_object() {
        Some(o) => format!(
            "[{}]",
            o.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
        ),
        None => "(the row is not an object)".into(),
    }
}

struct Ctx<'a> {
    path: &'a Path,
    m: &'a Mapping,
}

impl Ctx<'_> {
    fn err(&self, line: usize, reason: impl Into<String>) -> DataError {
        DataError::row(self.path, line, reason)
    }

    /// A mapped field that every row must have: absent is an error naming the fields it has.
    fn required<'v>(
        &self,
        line: usize,
        row: &'v Value,
        field: &str,
    ) -> Result<&'v Value, DataError> {
        row.get(field).ok_or_else(|| {
            self.err(
                line,
                format!("no field `{field}` (the row has {})", field_list(row)),
            )
        })
    }

    fn text(&self, line: usize, row: &Value, field: &str) -> Result<String, DataError> {
        match self.required(line, row, field)? {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(self.err(
                line,
                format!("field `{field}` is {}, expected a string", kind_of(other)),
            )),
        }
    }

    /// An optional mapped field (gold answer, tests, ...). A row may lack it (a mixed set's math
    /// rows have no tests); a category that needs it says so, naming the field. A name that no row
    /// has at all is a typo, caught by [`check_mapped_fields`].
    fn mapped(&self, row: &Value, field: &Option<String>) -> Option<String> {
        match row.get(field.as_deref()?)? {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            other => Some(other.to_string()),
        }
    }

    /// Why a row lacks what its category needs, naming the mapped field.
    fn missing(
        &self,
        line: usize,
        row: &Value,
        field: &Option<String>,
        flag: &str,
        what: &str,
    ) -> DataError {
        match field {
            Some(f) if row.get(f).is_none() => self.err(
                line,
                format!("no field `{f}` (the row has {}); {what}", field_list(row)),
            ),
            Some(f) => self.err(line, format!("field `{f}` is empty; {what}")),
            None => self.err(line, format!("{what} (--{flag} names it)")),
        }
    }

    fn dataset(&self, line: usize, row: &Value) -> Result<String, DataError> {
        if let Some(d) = &self.m.dataset {
            return Ok(d.clone());
        }
        match row.get("dataset").and_then(Value::as_str) {
            Some(d) if !d.is_empty() => Ok(d.to_string()),
            _ => Err(self.err(line, "no `dataset` field; pass --dataset")),
        }
    }

    fn category(&self, line: usize, row: &Value, dataset: &str) -> Result<Category, DataError> {
        if let Some(f) = &self.m.category_field {
            let c = self.text(line, row, f)?;
            return c.parse().map_err(|e: String| self.err(line, e));
        }
        if let Some(c) = self.m.category {
            return Ok(c);
        }
        if let Some(c) = row.get("category").and_then(Value::as_str) {
            return c
                .parse()
                .map_err(|e: String| self.err(line, format!("`category`: {e}")));
        }
        fusechat_category(dataset).ok_or_else(|| {
            self.err(
                line,
                format!("no category for dataset `{dataset}`; pass --category or --category-field"),
            )
        })
    }

    fn id(
        &self,
        line: usize,
        row: &Value,
        default_field: &str,
        dataset: &str,
    ) -> Result<String, DataError> {
        let field = self.m.id_field.as_deref().unwrap_or(default_field);
        match row.get(field) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(other) if self.m.id_field.is_some() => Err(self.err(
                line,
                format!(
                    "id field `{field}` is {}, expected a string",
                    kind_of(other)
                ),
            )),
            None if self.m.id_field.is_some() => Err(self.err(
                line,
                format!("no field `{field}` (the row has {})", field_list(row)),
            )),
            // No ids in the file: the row number makes one, stable for the same file.
            _ => Ok(format!("{dataset}-{line}")),
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Messages from `messages` or ShareGPT `conversations` (or a released DPO message list).
fn messages(c: &Ctx, line: usize, v: &Value, field: &str) -> Result<Vec<Message>, DataError> {
    let list = v.as_array().ok_or_else(|| {
        c.err(
            line,
            format!("`{field}` is {}, expected a list", kind_of(v)),
        )
    })?;
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let (role, content) = if let Some(from) = m.get("from") {
            let role = match from.as_str() {
                Some("human") | Some("user") => "user",
                Some("gpt") | Some("assistant") => "assistant",
                Some("system") => "system",
                other => {
                    return Err(c.err(line, format!("`{field}`[{i}]: unknown speaker {other:?}")))
                }
            };
            (role.to_string(), m.get("value"))
        } else {
            match m.get("role").and_then(Value::as_str) {
                Some(r @ ("user" | "assistant" | "system")) => (r.to_string(), m.get("content")),
                other => return Err(c.err(line, format!("`{field}`[{i}]: unknown role {other:?}"))),
            }
        };
        let content = content
            .and_then(Value::as_str)
            .ok_or_else(|| c.err(line, format!("`{field}`[{i}] has no string content")))?;
        out.push(Message {
            role,
            content: content.to_string(),
        });
    }
    Ok(out)
}

/// The conversation up to and including its last user turn.
fn prompt_part(c: &Ctx, line: usize, mut msgs: Vec<Message>) -> Result<Vec<Message>, DataError> {
    let last_user = msgs
        .iter()
        .rposition(|m| m.role == "user")
        .ok_or_else(|| c.err(line, "no user turn to answer"))?;
    msgs.truncate(last_user + 1);
    if msgs[last_user].content.trim().is_empty() {
        return Err(c.err(line, "the prompt has no text"));
    }
    Ok(msgs)
}

/// Import `path` under `m`. Nothing is written here; see [`Imported::write`].
pub fn import(path: &Path, m: &Mapping) -> Result<Imported, DataError> {
    let rows = super::read_values(path)?;
    let Some((first_line, first)) = rows.first() else {
        return Err(DataError::file(path, "no rows"));
    };
    let layout = match m.layout.unwrap_or(Layout::Auto) {
        Layout::Auto => detect(path, *first_line, first)?,
        l => l,
    };
    let c = Ctx { path, m };
    check_mapped_fields(path, m, &rows)?;
    match layout {
        Layout::Auto => unreachable!("resolved above"),
        Layout::Fields | Layout::Messages | Layout::Sharegpt => {
            prompts(&c, layout, &rows).map(Imported::Prompts)
        }
        Layout::FusechatSft => fusechat_sft(&c, &rows).map(Imported::Sft),
        Layout::FusechatDpo => fusechat_dpo(&c, &rows).map(Imported::Dpo),
        Layout::Answers | Layout::Simpo => answers(&c, layout, &rows).map(Imported::Samples),
    }
}

/// A mapped field that no row has is a typo in the mapping: an error naming it and the fields the
/// first row has.
fn check_mapped_fields(path: &Path, m: &Mapping, rows: &[(usize, Value)]) -> Result<(), DataError> {
    let fields = [
        ("--gold-field", &m.gold_field),
        ("--tests-field", &m.tests_field),
        ("--entry-point-field", &m.entry_point_field),
        ("--system-field", &m.system_field),
    ];
    for (flag, f) in fields {
        if let Some(f) = f {
            if !rows.iter().any(|(_, r)| r.get(f).is_some()) {
                let (line, first) = &rows[0];
                return Err(DataError::row(
                    path,
                    *line,
                    format!(
                        "{flag} {f}: no row has this field (the first has {})",
                        field_list(first)
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn check_unique<'a>(
    path: &Path,
    ids: impl Iterator<Item = (usize, &'a str)>,
) -> Result<(), DataError> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (line, id) in ids {
        if let Some(prev) = seen.insert(id, line) {
            return Err(DataError::row(
                path,
                line,
                format!("duplicate prompt id `{id}` (first at line {prev})"),
            ));
        }
    }
    Ok(())
}

fn prompts(c: &Ctx, layout: Layout, rows: &[(usize, Value)]) -> Result<Vec<Prompt>, DataError> {
    let mut out = Vec::with_capacity(rows.len());
    for (line, row) in rows {
        let line = *line;
        let dataset = c.dataset(line, row)?;
        let category = c.category(line, row, &dataset)?;
        let msgs = match layout {
            Layout::Fields => {
                let field = c.m.prompt_field.as_deref().unwrap_or_else(|| {
                    ["prompt", "instruction", "question", "problem"]
                        .into_iter()
                        .find(|f| row.get(*f).is_some())
                        .unwrap_or("prompt")
                });
                let text = c.text(line, row, field)?;
                let mut msgs = Vec::new();
                if let Some(sys) = c.mapped(row, &c.m.system_field) {
                    msgs.push(Message::new("system", sys));
                }
                msgs.push(Message::new("user", text));
                msgs
            }
            Layout::Messages => messages(c, line, c.required(line, row, "messages")?, "messages")?,
            _ => messages(
                c,
                line,
                c.required(line, row, "conversations")?,
                "conversations",
            )?,
        };
        let msgs = prompt_part(c, line, msgs)?;
        let gold = c.mapped(row, &c.m.gold_field);
        let tests = c.mapped(row, &c.m.tests_field);
        let entry_point = c.mapped(row, &c.m.entry_point_field);
        match category {
            Category::Math if gold.as_deref().is_none_or(|g| g.trim().is_empty()) => {
                return Err(c.missing(
                    line,
                    row,
                    &c.m.gold_field,
                    "gold-field",
                    "a math prompt needs a gold answer",
                ))
            }
            Category::Code if tests.as_deref().is_none_or(|t| t.trim().is_empty()) => {
                return Err(c.missing(
                    line,
                    row,
                    &c.m.tests_field,
                    "tests-field",
                    "a code prompt needs tests",
                ))
            }
            _ => {}
        }
        let language = c.m.language.clone().unwrap_or_else(|| {
            row.get("language")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| match category {
                    Category::SecondLanguage => "zh".into(),
                    _ => "en".into(),
                })
        });
        out.push(Prompt {
            id: c.id(line, row, "id", &dataset)?,
            dataset,
            category,
            messages: msgs,
            gold,
            tests,
            entry_point,
            language,
        });
    }
    check_unique(
        c.path,
        rows.iter()
            .map(|(l, _)| *l)
            .zip(out.iter().map(|p| p.id.as_str())),
    )?;
    Ok(out)
}

fn source_model(c: &Ctx, line: usize, row: &Value) -> Result<String, DataError> {
    if let Some(s) = &c.m.source {
        return Ok(s.clone());
    }
    match row.get("source_model").or_else(|| row.get("source")) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(c.err(line, "no `source_model`; pass --source")),
    }
}

fn fusechat_sft(c: &Ctx, rows: &[(usize, Value)]) -> Result<Vec<SftRow>, DataError> {
    let mut out = Vec::with_capacity(rows.len());
    for (line, row) in rows {
        let line = *line;
        let dataset = c.dataset(line, row)?;
        let category = c.category(line, row, &dataset)?;
        let msgs = messages(
            c,
            line,
            c.required(line, row, "conversations")?,
            "conversations",
        )?;
        match msgs.last() {
            Some(m) if m.role == "assistant" && !m.content.trim().is_empty() => {}
            _ => return Err(c.err(line, "the conversation does not end with an answer")),
        }
        prompt_part(c, line, msgs[..msgs.len() - 1].to_vec())?;
        out.push(SftRow {
            prompt_id: c.id(line, row, "id", &dataset)?,
            dataset,
            category,
            source: source_model(c, line, row)?,
            sample_index: 0,
            messages: msgs,
            score: row.get("score").and_then(Value::as_f64),
        });
    }
    check_unique(
        c.path,
        rows.iter()
            .map(|(l, _)| *l)
            .zip(out.iter().map(|p| p.prompt_id.as_str())),
    )?;
    Ok(out)
}

fn fusechat_dpo(c: &Ctx, rows: &[(usize, Value)]) -> Result<Vec<DpoPair>, DataError> {
    let mut out = Vec::with_capacity(rows.len());
    for (line, row) in rows {
        let line = *line;
        let dataset = c.dataset(line, row)?;
        let category = c.category(line, row, &dataset)?;
        let prompt = match c.required(line, row, "prompt")? {
            // TRL's plain layout: the prompt as a string.
            Value::String(s) => vec![Message::new("user", s.clone())],
            v => messages(c, line, v, "prompt")?,
        };
        let prompt = prompt_part(c, line, prompt)?;
        let answer = |field: &str| -> Result<Vec<Message>, DataError> {
            let v = c.required(line, row, field)?;
            let msgs = match v {
                Value::String(s) => vec![Message::new("assistant", s.clone())],
                v => messages(c, line, v, field)?,
            };
            match msgs.as_slice() {
                [m] if m.role == "assistant" && !m.content.trim().is_empty() => Ok(msgs),
                _ => Err(c.err(
                    line,
                    format!("`{field}` must be one non-empty assistant message"),
                )),
            }
        };
        out.push(DpoPair {
            prompt_id: c.id(line, row, "id", &dataset)?,
            dataset,
            category,
            source: source_model(c, line, row)?,
            prompt,
            chosen: answer("chosen")?,
            rejected: answer("rejected")?,
            chosen_index: 0,
            rejected_index: 1,
            chosen_score: row.get("chosen_score").and_then(Value::as_f64),
            rejected_score: row.get("rejected_score").and_then(Value::as_f64),
        });
    }
    check_unique(
        c.path,
        rows.iter()
            .map(|(l, _)| *l)
            .zip(out.iter().map(|p| p.prompt_id.as_str())),
    )?;
    Ok(out)
}

fn answers(c: &Ctx, layout: Layout, rows: &[(usize, Value)]) -> Result<Vec<Sample>, DataError> {
    let mut out = Vec::new();
    let mut next_index: BTreeMap<(String, String), u32> = BTreeMap::new();
    let mut seen: HashMap<(String, String, u32), usize> = HashMap::new();
    for (line, row) in rows {
        let line = *line;
        let field = c.m.id_field.as_deref().unwrap_or("prompt_id");
        let prompt_id = match c.required(line, row, field)? {
            Value::String(s) if !s.is_empty() => s.clone(),
            Value::Number(n) => n.to_string(),
            other => return Err(c.err(line, format!("prompt id `{field}` is {}", kind_of(other)))),
        };
        let source = match &c.m.source {
            Some(s) => s.clone(),
            None => match row.get("source").or_else(|| row.get("generator")) {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                _ => return Err(c.err(line, "no `source`; pass --source")),
            },
        };
        let texts: Vec<(Option<u32>, String)> = match layout {
            Layout::Simpo => {
                let list = c
                    .required(line, row, "all_generated_responses")?
                    .as_array()
                    .ok_or_else(|| c.err(line, "`all_generated_responses` is not a list"))?;
                list.iter()
                    .enumerate()
                    .map(|(i, t)| {
                        t.as_str()
                            .map(|s| (Some(i as u32), s.to_string()))
                            .ok_or_else(|| {
                                c.err(
                                    line,
                                    format!("`all_generated_responses`[{i}] is not a string"),
                                )
                            })
                    })
                    .collect::<Result<_, _>>()?
            }
            _ => {
                let text = c.text(line, row, "text")?;
                let idx = match row.get("sample_index") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(
                        v.as_u64()
                            .and_then(|x| u32::try_from(x).ok())
                            .ok_or_else(|| c.err(line, "`sample_index` is not a small integer"))?,
                    ),
                };
                vec![(idx, text)]
            }
        };
        for (idx, text) in texts {
            let counter = next_index
                .entry((prompt_id.clone(), source.clone()))
                .or_default();
            let sample_index = idx.unwrap_or(*counter);
            *counter = (*counter).max(sample_index + 1);
            if let Some(prev) = seen.insert((prompt_id.clone(), source.clone(), sample_index), line)
            {
                return Err(c.err(
                    line,
                    format!(
                        "duplicate answer {sample_index} of `{source}` to `{prompt_id}` (first at line {prev})"
                    ),
                ));
            }
            out.push(Sample {
                prompt_id: prompt_id.clone(),
                source: source.clone(),
                sample_index,
                seed: 0,
                tokens: 0,
                finish: "imported".into(),
                text,
            });
        }
    }
    Ok(out)
}

/// The prompt texts of an evaluation set, whatever its layout: user turns of `messages` /
/// `conversations` / `prompt` lists, else the first of `prompt`, `question`, `instruction`,
/// `problem`, `text` that is a string.
pub fn eval_texts(path: &Path) -> Result<Vec<String>, DataError> {
    let mut out = Vec::new();
    for (line, row) in super::read_values(path)? {
        let list = ["messages", "conversations", "prompt"]
            .iter()
            .find_map(|k| row.get(*k).filter(|v| v.is_array()));
        let text = if let Some(list) = list {
            let c = Ctx {
                path,
                m: &Mapping::default(),
            };
            messages(&c, line, list, "messages")?
                .into_iter()
                .filter(|m| m.role != "assistant")
                .map(|m| m.content)
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            ["prompt", "question", "instruction", "problem", "text"]
                .iter()
                .find_map(|k| row.get(*k).and_then(Value::as_str))
                .map(str::to_string)
                .ok_or_else(|| {
                    DataError::row(
                        path,
                        line,
                        format!(
                            "no prompt text in an evaluation row (fields {})",
                            field_list(&row)
                        ),
                    )
                })?
        };
        out.push(text);
    }
    Ok(out)
}
