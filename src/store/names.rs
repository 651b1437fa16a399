//! Validated names that become paths inside the store: pinned ref names and record ids.
//!
//! Each is parsed once, at the CLI boundary, so that no raw user string is ever joined into a path
//! (`--pin ../../x/config` once wrote outside the store).

use std::fmt;
use std::str::FromStr;

use super::StoreError;

fn check_segment(what: &'static str, text: &str, seg: &str) -> Result<(), StoreError> {
    let bad = |reason: &str| StoreError::BadName {
        what,
        text: text.to_string(),
        reason: reason.to_string(),
    };
    if seg.is_empty() {
        return Err(bad("empty path segment"));
    }
    if seg.starts_with('.') {
        return Err(bad("a segment may not start with `.`"));
    }
    if seg.len() > 200 {
        return Err(bad("longer than 200 characters"));
    }
    if let Some(c) = seg
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | '@')))
    {
        return Err(bad(&format!(
            "character {c:?} is not allowed (letters, digits, `-_.+@`)"
        )));
    }
    Ok(())
}

/// A pinned ref's name: `/`-separated segments of `[A-Za-z0-9-_.+@]`, none empty or starting with
/// `.`, so it always names a file under `refs/`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RefName(String);

impl RefName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `prefix/self` (e.g. `pins/NAME`), both already valid.
    pub fn under(&self, prefix: &str) -> RefName {
        let s = format!("{prefix}/{}", self.0);
        s.parse()
            .expect("a valid prefix joined to a valid name is valid")
    }
}

impl FromStr for RefName {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<RefName, StoreError> {
        if s.len() > 1000 {
            return Err(StoreError::BadName {
                what: "ref name",
                text: s[..40].to_string(),
                reason: "longer than 1000 characters".into(),
            });
        }
        for seg in s.split('/') {
            check_segment("ref name", s, seg)?;
        }
        Ok(RefName(s.to_string()))
    }
}

impl fmt::Display for RefName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id of a run record or an invocation (`runs/<id>.json`, `invocations/<id>.json`): one segment.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId(String);

impl RecordId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RecordId {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<RecordId, StoreError> {
        check_segment("run or invocation id", s, s)?;
        Ok(RecordId(s.to_string()))
    }
}

impl serde::Serialize for RecordId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_leave_their_directory_are_refused() {
        for bad in [
            "../x",
            "../../../x/config",
            "/etc/passwd",
            "a//b",
            "a/./b",
            "a/..",
            ".hidden",
            "",
            "a b",
            "a\\b",
            "a\0b",
        ] {
            assert!(bad.parse::<RefName>().is_err(), "{bad:?}");
        }
        for good in ["pins/data", "my-set_v1.2", "experiments/hello"] {
            assert_eq!(good.parse::<RefName>().unwrap().as_str(), good);
        }
        for bad in ["../../x", "a/b", "..", "", "x/../y"] {
            assert!(bad.parse::<RecordId>().is_err(), "{bad:?}");
        }
        assert!("20261201T225000-abc123".parse::<RecordId>().is_ok());
    }
}
