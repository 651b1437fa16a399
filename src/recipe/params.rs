//! `--set key.path=value` overrides of experiment parameters.

use serde_json::Value;

use super::{RecipeError, Result};

/// Apply one `key.path=value` override. The key must exist in the defaults (so typos are caught);
/// the value is read as JSON when it parses as JSON, and as a plain string otherwise.
pub fn set_param(params: &mut Value, arg: &str) -> Result<()> {
    let bad = |reason: String| RecipeError::BadSet {
        arg: arg.to_string(),
        reason,
    };
    let (path, raw) = arg
        .split_once('=')
        .ok_or_else(|| bad("expected key=value".into()))?;
    if path.is_empty() {
        return Err(bad("empty key".into()));
    }
    let value: Value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.into()));
    let mut cur = params;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let here = parts[..=i].join(".");
        let slot = match cur {
            Value::Object(obj) => {
                let known: Vec<String> = obj.keys().cloned().collect();
                obj.get_mut(*part).ok_or_else(|| {
                    bad(format!(
                        "unknown parameter `{here}` (known here: {})",
                        known.join(", ")
                    ))
                })?
            }
            // A list is addressed by position, or by the `name` of one of its groups.
            Value::Array(list) => {
                let names: Vec<String> = list
                    .iter()
                    .filter_map(|v| v.get("name").and_then(Value::as_str).map(str::to_string))
                    .collect();
                let n = list.len();
                let at = match part.parse::<usize>() {
                    Ok(k) if k < n => k,
                    Ok(k) => return Err(bad(format!("`{here}`: index {k} is past the end of a list of {n}"))),
                    Err(_) => list
                        .iter()
                        .position(|v| v.get("name").and_then(Value::as_str) == Some(*part))
                        .ok_or_else(|| {
                            bad(format!(
                                "`{here}`: no element named `{part}` (names: {}; or an index below {n})",
                                names.join(", ")
                            ))
                        })?,
                };
                &mut list[at]
            }
            _ => {
                return Err(bad(format!(
                    "`{}` is not a group of parameters",
                    parts[..i].join(".")
                )))
            }
        };
        if i + 1 == parts.len() {
            check_same_type(slot, &value).map_err(bad)?;
            *slot = value;
            return Ok(());
        }
        cur = slot;
    }
    unreachable!("split yields at least one part")
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_u64() => "a non-negative integer",
        Value::Number(n) if n.is_i64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a group",
    }
}

fn check_same_type(old: &Value, new: &Value) -> Result<(), String> {
    let ok = match (old, new) {
        (Value::Null, _) => true,
        (Value::Bool(_), Value::Bool(_)) => true,
        (Value::Number(o), Value::Number(n)) => {
            if o.is_u64() {
                n.is_u64()
            } else if o.is_i64() {
                n.is_i64()
            } else {
                true
            }
        }
        (Value::String(_), Value::String(_)) => true,
        (Value::Array(_), Value::Array(_)) => true,
        (Value::Object(_), Value::Object(_)) => true,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected {}, got {} ({new})",
            type_name(old),
            type_name(new)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sets_nested_values_with_type_checks() {
        let mut p = json!({"a": {"b": 1, "s": "x", "f": 0.5}, "flag": true});
        set_param(&mut p, "a.b=7").unwrap();
        set_param(&mut p, "a.s=hello world").unwrap();
        set_param(&mut p, "a.f=2").unwrap();
        set_param(&mut p, "flag=false").unwrap();
        assert_eq!(
            p,
            json!({"a": {"b": 7, "s": "hello world", "f": 2}, "flag": false})
        );
        for bad in [
            "a.b", "a.zz=1", "a.b=abc", "a.b=-1", "flag.x=1", "=3", "a.b.c=1",
        ] {
            let err = set_param(&mut p, bad).unwrap_err().to_string();
            assert!(err.contains(bad.split('=').next().unwrap()), "{bad}: {err}");
        }
    }
}
