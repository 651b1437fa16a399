//! The data stage's records — prompts, samples, annotations, SFT rows, DPO pairs — as typed structs,
//! stored as Parquet through polars (`table`), imported from the usual prompt-set layouts (`import`)
//! and exported to TRL's and FuseChat-3.0's released layouts (`export`).

pub mod export;
pub mod import;
pub mod table;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use table::{read_frame, read_records, read_values, write_records, RecordKind, Table};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}:{line}: {reason}", path.display())]
    Row {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Polars {
        path: PathBuf,
        #[source]
        source: polars::error::PolarsError,
    },
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    pub fn row(path: &std::path::Path, line: usize, reason: impl Into<String>) -> DataError {
        DataError::Row {
            path: path.to_path_buf(),
            line,
            reason: reason.into(),
        }
    }
    pub fn file(path: &std::path::Path, reason: impl Into<String>) -> DataError {
        DataError::File {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The four FuseChat-3.0 categories; each has its own construction rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Instruction following and conversation: RM scores only.
    Instruction,
    /// Final answer checked against a gold answer.
    Math,
    /// Checked by running the prompt's tests in the sandbox.
    Code,
    /// A second language (Chinese in the paper): SFT only, one source.
    SecondLanguage,
}

impl Category {
    pub const ALL: [Category; 4] = [
        Category::Instruction,
        Category::Math,
        Category::Code,
        Category::SecondLanguage,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Category::Instruction => "instruction",
            Category::Math => "math",
            Category::Code => "code",
            Category::SecondLanguage => "second_language",
        }
    }
}

impl std::str::FromStr for Category {
    type Err = String;
    fn from_str(s: &str) -> Result<Category, String> {
        match s {
            "instruction" | "conversation" | "instruction_following" => Ok(Category::Instruction),
            "math" | "mathematics" => Ok(Category::Math),
            "code" | "coding" => Ok(Category::Code),
            "second_language" | "chinese" | "zh" => Ok(Category::SecondLanguage),
            _ => Err(format!(
                "unknown category `{s}` (expected instruction, math, code or second_language)"
            )),
        }
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One prompt of a prompt set. `messages` ends with the user turn the sources answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    pub id: String,
    pub dataset: String,
    pub category: Category,
    pub messages: Vec<Message>,
    /// The gold final answer (math).
    pub gold: Option<String>,
    /// Test code or cases (code): the `annotate` code layouts' `test` field.
    pub tests: Option<String>,
    /// Entry point of the function under test (HumanEval / MBPP layouts).
    pub entry_point: Option<String>,
    pub language: String,
}

/// One answer of one source to one prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub prompt_id: String,
    pub source: String,
    pub sample_index: u32,
    pub seed: u64,
    pub text: String,
    pub tokens: u32,
    /// `stop_token`, `stop_string`, `length`, or `imported`.
    pub finish: String,
}

/// What the reward model and the verifiers said about one sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Annotation {
    pub prompt_id: String,
    pub source: String,
    pub sample_index: u32,
    pub score: Option<f64>,
    /// `None` where the category has no correctness check.
    pub correct: Option<bool>,
    pub reason: Option<String>,
}

/// A constructed SFT row: the prompt's messages followed by the chosen answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SftRow {
    pub prompt_id: String,
    pub dataset: String,
    pub category: Category,
    pub source: String,
    pub sample_index: u32,
    pub messages: Vec<Message>,
    pub score: Option<f64>,
}

/// A constructed DPO pair, both answers from the same source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpoPair {
    pub prompt_id: String,
    pub dataset: String,
    pub category: Category,
    pub source: String,
    pub prompt: Vec<Message>,
    pub chosen: Vec<Message>,
    pub rejected: Vec<Message>,
    pub chosen_index: u32,
    pub rejected_index: u32,
    pub chosen_score: Option<f64>,
    pub rejected_score: Option<f64>,
}
