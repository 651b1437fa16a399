//! Chat templates rendered with minijinja the way transformers' `apply_chat_template` renders them with
//! jinja2: `trim_blocks`, `lstrip_blocks`, loop controls, Python string methods (pycompat),
//! `raise_exception`, `strftime_now`, `tojson`.

use std::path::PathBuf;

use minijinja::{Environment, Error, ErrorKind, Value as JValue};
use serde_json::Value;

use super::ModelError;

/// Work one render may do, in minijinja fuel (one instruction, or 64 bytes of strings created or
/// written): about four million instructions or 256 MB, far above any chat template's need (a
/// 100-message Llama-3.1 rendering uses well under 1% of it).
pub const TEMPLATE_FUEL: u64 = 4_000_000;

#[derive(Clone, Debug)]
pub struct ChatTemplate {
    pub source: String,
    /// The file the template came from, for error messages.
    pub path: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

/// A small strftime for the formats chat templates use (Llama-3.1's "%d %b %Y").
fn strftime(fmt: &str, unix: f64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let ts = crate::util::rfc3339(unix);
    let (y, m, d) = (&ts[0..4], &ts[5..7], &ts[8..10]);
    let (hh, mm, ss) = (&ts[11..13], &ts[14..16], &ts[17..19]);
    let month = MONTHS[m.parse::<usize>().unwrap_or(1).clamp(1, 12) - 1];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(y),
            Some('m') => out.push_str(m),
            Some('d') => out.push_str(d),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('H') => out.push_str(hh),
            Some('M') => out.push_str(mm),
            Some('S') => out.push_str(ss),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

impl ChatTemplate {
    pub fn new(
        source: String,
        path: PathBuf,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> ChatTemplate {
        ChatTemplate {
            source,
            path,
            bos_token,
            eos_token,
        }
    }

    fn env(&self) -> Environment<'static> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<JValue, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| {
            strftime(&fmt, crate::util::unix_now())
        });
        env
    }

    /// Render `messages` (a JSON list of `{role, content}`). `extra` (a JSON object) adds template
    /// variables such as `tools` or `date_string`.
    pub fn render(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
        extra: &Value,
    ) -> Result<String, ModelError> {
        let mut env = self.env();
        // A hostile or broken template (nested `range(100000)` loops, a string doubled in a loop)
        // must end with an error, not run for hours or allocate gigabytes. minijinja's fuel charges
        // every instruction and every byte the template creates, so one budget bounds both time and
        // memory. The budget grows with the input so that long benign conversations always fit.
        let input_bytes = serde_json::to_string(messages)
            .map(|s| s.len())
            .unwrap_or(0)
            + serde_json::to_string(extra).map(|s| s.len()).unwrap_or(0);
        let fuel = TEMPLATE_FUEL + (input_bytes as u64) / 4;
        env.set_fuel(Some(fuel));
        let err = |e: Error| {
            if e.kind() == ErrorKind::OutOfFuel {
                return ModelError::Template {
                    path: self.path.clone(),
                    line: e.line().unwrap_or(0),
                    reason: format!(
                        "the template exceeded its work budget ({fuel} units of instructions and \
                         produced bytes): it loops or builds strings without bound"
                    ),
                };
            }
            let mut reason = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                reason.push_str(&format!(": {s}"));
                src = s.source();
            }
            ModelError::Template {
                path: self.path.clone(),
                line: e.line().unwrap_or(0),
                reason,
            }
        };
        let tmpl = env.template_from_str(&self.source).map_err(err)?;
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), messages.clone());
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        if let Some(b) = &self.bos_token {
            ctx.insert("bos_token".into(), Value::String(b.clone()));
        }
        if let Some(e) = &self.eos_token {
            ctx.insert("eos_token".into(), Value::String(e.clone()));
        }
        if let Value::Object(m) = extra {
            for (k, v) in m {
                ctx.insert(k.clone(), v.clone());
            }
        }
        tmpl.render(minijinja::value::Serde(&ctx)).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats() {
        assert_eq!(strftime("%d %b %Y", 1_795_465_938.0), "23 Nov 2026");
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %%", 0.0),
            "1970-01-01 00:00:00 %"
        );
    }

    #[test]
    fn raise_exception_names_file_and_line() {
        let t = ChatTemplate::new(
            "ok\n{{ raise_exception('System role not supported') }}".into(),
            PathBuf::from("t.jinja"),
            None,
            None,
        );
        let e = t
            .render(&serde_json::json!([]), false, &Value::Null)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.jinja: line 2") && e.contains("System role not supported"),
            "{e}"
        );
    }
}
