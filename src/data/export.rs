//! Export of constructed sets in the layouts training tools read: TRL / alignment-handbook
//! (`messages`; `prompt` / `chosen` / `rejected` message lists) and the released FuseChat-3.0 rows
//! (`conversations` of `{from, value}`; `dataset`, `source_model`), our scores as extra columns.
//! JSON lines, a JSON array (`.json`) or Parquet, written atomically.

use std::io::Cursor;
use std::path::Path;

use polars::prelude::*;
use serde_json::{json, Value};

use super::{DataError, DpoPair, Message, SftRow};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportLayout {
    Trl,
    Fusechat,
}

fn sharegpt(msgs: &[Message]) -> Value {
    Value::Array(
        msgs.iter()
            .map(|m| {
                let from = match m.role.as_str() {
                    "user" => "human",
                    "assistant" => "gpt",
                    other => other,
                };
                json!({"from": from, "value": m.content})
            })
            .collect(),
    )
}

pub fn sft_value(r: &SftRow, layout: ExportLayout) -> Value {
    let mut v = match layout {
        ExportLayout::Trl => json!({"messages": r.messages}),
        ExportLayout::Fusechat => json!({"conversations": sharegpt(&r.messages)}),
    };
    let o = v.as_object_mut().expect("object");
    o.insert("dataset".into(), r.dataset.clone().into());
    o.insert("source_model".into(), r.source.clone().into());
    o.insert("prompt_id".into(), r.prompt_id.clone().into());
    o.insert("category".into(), r.category.name().into());
    o.insert("score".into(), json!(r.score));
    v
}

pub fn dpo_value(r: &DpoPair, _layout: ExportLayout) -> Value {
    // TRL's conversational preference layout and the released FuseChat rows agree on the three
    // message lists; they differ only in SFT rows.
    json!({
        "prompt": r.prompt,
        "chosen": r.chosen,
        "rejected": r.rejected,
        "dataset": r.dataset,
        "source_model": r.source,
        "prompt_id": r.prompt_id,
        "category": r.category.name(),
        "chosen_score": r.chosen_score,
        "rejected_score": r.rejected_score,
    })
}

/// Write JSON rows to `out` as `.jsonl`, `.json` (an array) or `.parquet`.
pub fn write_values(rows: &[Value], out: &Path) -> Result<(), DataError> {
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let mut buf = Vec::new();
    if name.ends_with(".parquet") {
        let mut lines = Vec::new();
        for r in rows {
            serde_json::to_writer(&mut lines, r).expect("rows serialise");
            lines.push(b'\n');
        }
        let polars = |source| DataError::Polars {
            path: out.to_path_buf(),
            source,
        };
        let mut df = JsonReader::new(Cursor::new(lines))
            .with_json_format(JsonFormat::JsonLines)
            .infer_schema_len(None)
            .finish()
            .map_err(polars)?;
        ParquetWriter::new(&mut buf)
            .finish(&mut df)
            .map_err(polars)?;
    } else if name.ends_with(".json") {
        serde_json::to_writer_pretty(&mut buf, rows).expect("rows serialise");
        buf.push(b'\n');
    } else {
        for r in rows {
            serde_json::to_writer(&mut buf, r).expect("rows serialise");
            buf.push(b'\n');
        }
    }
    crate::fs::write_durable(out, &buf).map_err(|source| DataError::Io {
        path: out.to_path_buf(),
        source,
    })
}
