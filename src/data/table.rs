//! Tables on disk. Typed records become a polars `DataFrame` with a fixed schema per kind (messages
//! as `list<struct<role, content>>`, the layout Hugging Face datasets write), which is written as
//! Parquet tagged with its kind; JSON lines and JSON arrays are read through the same path, so every
//! table format meets one row model. Files appear by atomic rename only.

use std::io::Cursor;
use std::path::Path;

use polars::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::DataError;

/// Which record type a table holds; written into the Parquet footer as `fuselab_kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    Prompts,
    Samples,
    Annotations,
    Sft,
    Dpo,
}

impl RecordKind {
    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Prompts => "prompts",
            RecordKind::Samples => "samples",
            RecordKind::Annotations => "annotations",
            RecordKind::Sft => "sft",
            RecordKind::Dpo => "dpo",
        }
    }

    fn from_name(s: &str) -> Option<RecordKind> {
        [
            RecordKind::Prompts,
            RecordKind::Samples,
            RecordKind::Annotations,
            RecordKind::Sft,
            RecordKind::Dpo,
        ]
        .into_iter()
        .find(|k| k.name() == s)
    }

    pub fn schema(self) -> Schema {
        let s = || DataType::String;
        let messages = || {
            DataType::List(Box::new(DataType::Struct(vec![
                Field::new("role".into(), DataType::String),
                Field::new("content".into(), DataType::String),
            ])))
        };
        let cols: Vec<(&str, DataType)> = match self {
            RecordKind::Prompts => vec![
                ("id", s()),
                ("dataset", s()),
                ("category", s()),
                ("messages", messages()),
                ("gold", s()),
                ("tests", s()),
                ("entry_point", s()),
                ("language", s()),
            ],
            RecordKind::Samples => vec![
                ("prompt_id", s()),
                ("source", s()),
                ("sample_index", DataType::UInt32),
                ("seed", DataType::UInt64),
                ("text", s()),
                ("tokens", DataType::UInt32),
                ("finish", s()),
            ],
            RecordKind::Annotations => vec![
                ("prompt_id", s()),
                ("source", s()),
                ("sample_index", DataType::UInt32),
                ("score", DataType::Float64),
                ("correct", DataType::Boolean),
                ("reason", s()),
            ],
            RecordKind::Sft => vec![
                ("prompt_id", s()),
                ("dataset", s()),
                ("category", s()),
                ("source", s()),
                ("sample_index", DataType::UInt32),
                ("messages", messages()),
                ("score", DataType::Float64),
            ],
            RecordKind::Dpo => vec![
                ("prompt_id", s()),
                ("dataset", s()),
                ("category", s()),
                ("source", s()),
                ("prompt", messages()),
                ("chosen", messages()),
                ("rejected", messages()),
                ("chosen_index", DataType::UInt32),
                ("rejected_index", DataType::UInt32),
                ("chosen_score", DataType::Float64),
                ("rejected_score", DataType::Float64),
            ],
        };
        cols.into_iter()
            .map(|(n, t)| Field::new(n.into(), t))
            .collect()
    }
}

/// A record type with its table kind.
pub trait Table: Serialize + DeserializeOwned + Sized {
    const KIND: RecordKind;
    /// The records as a frame of their kind's schema; the big tables build their columns
    /// directly, the rest go through JSON lines and polars' reader.
    fn frame(rows: &[Self], path: &Path) -> Result<DataFrame, DataError> {
        to_frame(rows, path)
    }
    /// The records straight from a frame of their kind's schema, where the type has such a
    /// reader; `None` sends the frame through JSON and serde, which also names a bad row.
    fn from_frame(_df: &DataFrame) -> Option<Vec<Self>> {
        None
    }
}

impl Table for super::Prompt {
    const KIND: RecordKind = RecordKind::Prompts;
    fn from_frame(df: &DataFrame) -> Option<Vec<Self>> {
        prompts_from_frame(df)
    }
}
impl Table for super::Sample {
    const KIND: RecordKind = RecordKind::Samples;
    fn frame(rows: &[Self], _: &Path) -> Result<DataFrame, DataError> {
        samples_frame(rows)
    }
}
impl Table for super::Annotation {
    const KIND: RecordKind = RecordKind::Annotations;
    fn frame(rows: &[Self], _: &Path) -> Result<DataFrame, DataError> {
        annotations_frame(rows)
    }
}
impl Table for super::SftRow {
    const KIND: RecordKind = RecordKind::Sft;
    fn frame(rows: &[Self], _: &Path) -> Result<DataFrame, DataError> {
        sft_frame(rows)
    }
}
impl Table for super::DpoPair {
    const KIND: RecordKind = RecordKind::Dpo;
    fn frame(rows: &[Self], _: &Path) -> Result<DataFrame, DataError> {
        dpo_frame(rows)
    }
}

fn polars_err(path: &Path) -> impl Fn(PolarsError) -> DataError + '_ {
    move |source| DataError::Polars {
        path: path.to_path_buf(),
        source,
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Records as a frame with their kind's schema (`path` names the table in errors).
pub fn to_frame<T: Table>(rows: &[T], path: &Path) -> Result<DataFrame, DataError> {
    let schema = T::KIND.schema();
    if rows.is_empty() {
        return Ok(DataFrame::empty_with_schema(&schema));
    }
    let mut lines = Vec::with_capacity(rows.len() * 64);
    for r in rows {
        serde_json::to_writer(&mut lines, r).expect("records serialise");
        lines.push(b'\n');
    }
    JsonReader::new(Cursor::new(lines))
        .with_json_format(JsonFormat::JsonLines)
        .with_schema(Arc::new(schema))
        .finish()
        .map_err(polars_err(path))
}

/// Write a frame as Parquet at `path`, atomically, tagged with `kind`.
pub fn write_frame(df: &mut DataFrame, kind: RecordKind, path: &Path) -> Result<(), DataError> {
    let mut buf = Vec::new();
    let meta = KeyValueMetadata::from_static(vec![("fuselab_kind".into(), kind.name().into())]);
    ParquetWriter::new(&mut buf)
        .with_key_value_metadata(Some(meta))
        .finish(df)
        .map_err(polars_err(path))?;
    crate::fs::write_durable(path, &buf).map_err(io_err(path))
}

/// Write records as Parquet (`.parquet`) or JSON lines (any other extension), atomically.
pub fn write_records<T: Table>(rows: &[T], path: &Path) -> Result<(), DataError> {
    if is_parquet(path) {
        let mut df = T::frame(rows, path)?;
        write_frame(&mut df, T::KIND, path)
    } else {
        let mut out = Vec::new();
        for r in rows {
            serde_json::to_writer(&mut out, r).expect("records serialise");
            out.push(b'\n');
        }
        crate::fs::write_durable(path, &out).map_err(io_err(path))
    }
}

pub fn is_parquet(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "parquet")
}

/// A Parquet file as a frame, with the kind it was tagged with (if it is one of ours).
pub fn read_frame(path: &Path) -> Result<(DataFrame, Option<RecordKind>), DataError> {
    read_frame_checked(path, None, None)
}

/// [`read_frame`], refusing a file that lacks a column of `needs` (named in the error) before
/// decoding anything, and decoding only `columns` when given.
fn read_frame_checked(
    path: &Path,
    needs: Option<(RecordKind, &Schema)>,
    columns: Option<&[&str]>,
) -> Result<(DataFrame, Option<RecordKind>), DataError> {
    crate::fs::require_regular(path).map_err(io_err(path))?;
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut reader = ParquetReader::new(file);
    let kind = reader
        .get_metadata()
        .map_err(polars_err(path))?
        .key_value_metadata()
        .as_ref()
        .and_then(|kv| {
            kv.iter()
                .find(|e| e.key == "fuselab_kind")
                .and_then(|e| e.value.as_deref())
                .and_then(RecordKind::from_name)
        });
    if let Some((wanted, schema)) = needs {
        if let Some(k) = kind.filter(|k| *k != wanted) {
            return Err(DataError::file(
                path,
                format!("holds {} records, expected {}", k.name(), wanted.name()),
            ));
        }
        let have = reader.schema().map_err(polars_err(path))?;
        if let Some(f) = schema.iter_fields().find(|f| have.get(f.name()).is_none()) {
            return Err(DataError::file(
                path,
                format!(
                    "no column `{}`, which {} tables have",
                    f.name(),
                    wanted.name()
                ),
            ));
        }
    }
    if let Some(cols) = columns {
        reader = reader.with_columns(Some(cols.iter().map(|c| c.to_string()).collect()));
    }
    let df = reader.finish().map_err(polars_err(path))?;
    Ok((df, kind))
}

/// The rows of a frame as JSON objects (nulls included).
pub fn frame_values(df: &mut DataFrame, path: &Path) -> Result<Vec<Value>, DataError> {
    let mut buf = Vec::new();
    JsonWriter::new(&mut buf)
        .with_json_format(JsonFormat::JsonLines)
        .finish(df)
        .map_err(polars_err(path))?;
    buf.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_slice(l)
                .map_err(|e| DataError::file(path, format!("row as JSON: {e}")))
        })
        .collect()
}

/// The rows of any table file, each with its line (JSONL), array index + 1 (JSON) or row number
/// (Parquet), which errors cite as `file:N`.
pub fn read_values(path: &Path) -> Result<Vec<(usize, Value)>, DataError> {
    if is_parquet(path) {
        let (mut df, _) = read_frame(path)?;
        return Ok(frame_values(&mut df, path)?
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i + 1, v))
            .collect());
    }
    crate::fs::require_regular(path).map_err(io_err(path))?;
    let raw = std::fs::read(path).map_err(io_err(path))?;
    let raw = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&raw[..]), &mut out)
            .map_err(io_err(path))?;
        out
    } else {
        raw
    };
    let text =
        String::from_utf8(raw).map_err(|e| DataError::file(path, format!("not UTF-8: {e}")))?;
    let first = text.trim_start().chars().next();
    let stem_json = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".json") || n.ends_with(".json.gz"));
    if first == Some('[') && stem_json {
        let rows: Vec<Value> = serde_json::from_str(&text).map_err(|e| {
            DataError::row(path, e.line(), format!("not a JSON array of rows: {e}"))
        })?;
        return Ok(rows
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i + 1, v))
            .collect());
    }
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(l)
            .map_err(|e| DataError::row(path, i + 1, format!("not JSON: {e}")))?;
        out.push((i + 1, v));
    }
    Ok(out)
}

/// Typed records from a table file of kind `T` (a Parquet table of another kind is refused).
pub fn read_records<T: Table>(path: &Path) -> Result<Vec<T>, DataError> {
    let values = if is_parquet(path) {
        let (mut df, kind) = read_frame(path)?;
        if let Some(k) = kind.filter(|k| *k != T::KIND) {
            return Err(DataError::file(
                path,
                format!("holds {} records, expected {}", k.name(), T::KIND.name()),
            ));
        }
        if let Some(rows) = T::from_frame(&df) {
            return Ok(rows);
        }
        frame_values(&mut df, path)?
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i + 1, v))
            .collect()
    } else {
        read_values(path)?
    };
    values
        .into_iter()
        .map(|(line, v)| {
            serde_json::from_value(v).map_err(|e| {
                DataError::row(path, line, format!("not a {} record: {e}", T::KIND.name()))
            })
        })
        .collect()
}

fn frame(cols: Vec<Column>, what: &str) -> Result<DataFrame, DataError> {
    DataFrame::new_infer_height(cols)
        .map_err(|e| DataError::Invalid(format!("building the {what} table: {e}")))
}

/// The samples' columns directly (no JSON round trip: this is the big table).
pub fn samples_frame(rows: &[super::Sample]) -> Result<DataFrame, DataError> {
    frame(
        vec![
            Column::new(
                "prompt_id".into(),
                rows.iter()
                    .map(|r| r.prompt_id.as_str())
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "source".into(),
                rows.iter().map(|r| r.source.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "sample_index".into(),
                rows.iter().map(|r| r.sample_index).collect::<Vec<_>>(),
            ),
            Column::new(
                "seed".into(),
                rows.iter().map(|r| r.seed).collect::<Vec<_>>(),
            ),
            Column::new(
                "text".into(),
                rows.iter().map(|r| r.text.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "tokens".into(),
                rows.iter().map(|r| r.tokens).collect::<Vec<_>>(),
            ),
            Column::new(
                "finish".into(),
                rows.iter().map(|r| r.finish.as_str()).collect::<Vec<_>>(),
            ),
        ],
        "samples",
    )
}

/// Prompts from the columns of a frame with exactly the prompt schema; `None` at the first thing
/// the typed path would reject (a null where a value is required, an unknown category, another
/// layout), so that the JSON path reports it with its row.
fn prompts_from_frame(df: &DataFrame) -> Option<Vec<super::Prompt>> {
    for f in RecordKind::Prompts.schema().iter_fields() {
        if df.column(f.name()).ok()?.dtype() != f.dtype() {
            return None;
        }
    }
    let s = |n: &str| df.column(n).ok()?.str().ok();
    let (id, dataset, category) = (s("id")?, s("dataset")?, s("category")?);
    let (gold, tests, entry, language) =
        (s("gold")?, s("tests")?, s("entry_point")?, s("language")?);
    let messages = messages_of(df.column("messages").ok()?)?;
    let mut out = Vec::with_capacity(df.height());
    for (i, messages) in messages.into_iter().enumerate() {
        let name = category.get(i)?;
        out.push(super::Prompt {
            id: id.get(i)?.to_string(),
            dataset: dataset.get(i)?.to_string(),
            category: *super::Category::ALL.iter().find(|c| c.name() == name)?,
            messages,
            gold: gold.get(i).map(str::to_string),
            tests: tests.get(i).map(str::to_string),
            entry_point: entry.get(i).map(str::to_string),
            language: language.get(i)?.to_string(),
        });
    }
    Some(out)
}

/// The message lists of a `list<struct<role, content>>` column, read from its arrow arrays;
/// `None` at a null list, message, role or content.
fn messages_of(c: &Column) -> Option<Vec<Vec<super::Message>>> {
    use polars_arrow::array::{Array, StructArray, Utf8ViewArray};
    let lists = c.list().ok()?;
    let mut out = Vec::with_capacity(lists.len());
    for arr in lists.downcast_iter() {
        let st = arr.values().as_any().downcast_ref::<StructArray>()?;
        let field = |name: &str| {
            let k = st.fields().iter().position(|f| f.name.as_str() == name)?;
            st.values()[k].as_any().downcast_ref::<Utf8ViewArray>()
        };
        let (role, content) = (field("role")?, field("content")?);
        let offsets = arr.offsets();
        for i in 0..arr.len() {
            if !arr.is_valid(i) {
                return None;
            }
            let (a, b) = offsets.start_end(i);
            let mut m = Vec::with_capacity(b - a);
            for k in a..b {
                if !(st.is_valid(k) && role.is_valid(k) && content.is_valid(k)) {
                    return None;
                }
                m.push(super::Message {
                    role: role.value(k).to_string(),
                    content: content.value(k).to_string(),
                });
            }
            out.push(m);
        }
    }
    Some(out)
}

/// A `list<struct<role, content>>` column, one list per row, built as arrow arrays in one pass.
fn messages_column<'a>(
    name: &str,
    rows: impl Iterator<Item = &'a [super::Message]>,
) -> Result<Column, DataError> {
    use polars_arrow::array::{Array, ListArray};
    use polars_arrow::offset::OffsetsBuffer;
    let err = |e: PolarsError| DataError::Invalid(format!("building `{name}`: {e}"));
    let (mut roles, mut contents, mut offsets) = (Vec::new(), Vec::new(), vec![0i64]);
    for m in rows {
        for x in m {
            roles.push(x.role.as_str());
            contents.push(x.content.as_str());
        }
        offsets.push(roles.len() as i64);
    }
    let fields = [
        Series::new("role".into(), roles),
        Series::new("content".into(), contents),
    ];
    let values = StructChunked::from_series("item".into(), fields[0].len(), fields.iter())
        .map_err(err)?
        .rechunk()
        .downcast_as_array()
        .to_boxed();
    let dtype = ListArray::<i64>::default_datatype(values.dtype().clone());
    let offsets = OffsetsBuffer::try_from(offsets).map_err(err)?;
    let list = ListArray::<i64>::try_new(dtype, offsets, values, None).map_err(err)?;
    Series::from_arrow(name.into(), list.boxed())
        .map(Column::from)
        .map_err(err)
}

/// SFT rows' columns directly (construction writes ~10^5 of them).
pub fn sft_frame(rows: &[super::SftRow]) -> Result<DataFrame, DataError> {
    let strs = |f: fn(&super::SftRow) -> &str| rows.iter().map(f).collect::<Vec<_>>();
    frame(
        vec![
            Column::new("prompt_id".into(), strs(|r| &r.prompt_id)),
            Column::new("dataset".into(), strs(|r| &r.dataset)),
            Column::new("category".into(), strs(|r| r.category.name())),
            Column::new("source".into(), strs(|r| &r.source)),
            Column::new(
                "sample_index".into(),
                rows.iter().map(|r| r.sample_index).collect::<Vec<_>>(),
            ),
            messages_column("messages", rows.iter().map(|r| r.messages.as_slice()))?,
            Column::new(
                "score".into(),
                rows.iter().map(|r| r.score).collect::<Vec<_>>(),
            ),
        ],
        "SFT",
    )
}

/// DPO pairs' columns directly.
pub fn dpo_frame(rows: &[super::DpoPair]) -> Result<DataFrame, DataError> {
    let strs = |f: fn(&super::DpoPair) -> &str| rows.iter().map(f).collect::<Vec<_>>();
    frame(
        vec![
            Column::new("prompt_id".into(), strs(|r| &r.prompt_id)),
            Column::new("dataset".into(), strs(|r| &r.dataset)),
            Column::new("category".into(), strs(|r| r.category.name())),
            Column::new("source".into(), strs(|r| &r.source)),
            messages_column("prompt", rows.iter().map(|r| r.prompt.as_slice()))?,
            messages_column("chosen", rows.iter().map(|r| r.chosen.as_slice()))?,
            messages_column("rejected", rows.iter().map(|r| r.rejected.as_slice()))?,
            Column::new(
                "chosen_index".into(),
                rows.iter().map(|r| r.chosen_index).collect::<Vec<_>>(),
            ),
            Column::new(
                "rejected_index".into(),
                rows.iter().map(|r| r.rejected_index).collect::<Vec<_>>(),
            ),
            Column::new(
                "chosen_score".into(),
                rows.iter().map(|r| r.chosen_score).collect::<Vec<_>>(),
            ),
            Column::new(
                "rejected_score".into(),
                rows.iter().map(|r| r.rejected_score).collect::<Vec<_>>(),
            ),
        ],
        "DPO",
    )
}

pub fn annotations_frame(rows: &[super::Annotation]) -> Result<DataFrame, DataError> {
    frame(
        vec![
            Column::new(
                "prompt_id".into(),
                rows.iter()
                    .map(|r| r.prompt_id.as_str())
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "source".into(),
                rows.iter().map(|r| r.source.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "sample_index".into(),
                rows.iter().map(|r| r.sample_index).collect::<Vec<_>>(),
            ),
            Column::new(
                "score".into(),
                rows.iter().map(|r| r.score).collect::<Vec<_>>(),
            ),
            Column::new(
                "correct".into(),
                rows.iter().map(|r| r.correct).collect::<Vec<_>>(),
            ),
            Column::new(
                "reason".into(),
                rows.iter().map(|r| r.reason.clone()).collect::<Vec<_>>(),
            ),
        ],
        "annotations",
    )
}

/// A table of `kind` from a file: Parquet read as is (checked for the columns the kind needs),
/// JSONL through the typed records.
pub fn read_kind_frame(path: &Path, kind: RecordKind) -> Result<DataFrame, DataError> {
    read_kind_columns(path, kind, None)
}

/// [`read_kind_frame`] keeping only `columns` (when given); a Parquet file decodes no other
/// column, though it must still have every column of its kind.
pub fn read_kind_columns(
    path: &Path,
    kind: RecordKind,
    columns: Option<&[&str]>,
) -> Result<DataFrame, DataError> {
    if is_parquet(path) {
        let schema = kind.schema();
        return Ok(read_frame_checked(path, Some((kind, &schema)), columns)?.0);
    }
    let df = read_kind_records(path, kind)?;
    match columns {
        Some(cols) => df.select(cols.iter().copied()).map_err(polars_err(path)),
        None => Ok(df),
    }
}

fn read_kind_records(path: &Path, kind: RecordKind) -> Result<DataFrame, DataError> {
    match kind {
        RecordKind::Samples => super::Sample::frame(&read_records(path)?, path),
        RecordKind::Annotations => super::Annotation::frame(&read_records(path)?, path),
        RecordKind::Prompts => super::Prompt::frame(&read_records(path)?, path),
        RecordKind::Sft => super::SftRow::frame(&read_records(path)?, path),
        RecordKind::Dpo => super::DpoPair::frame(&read_records(path)?, path),
    }
}
