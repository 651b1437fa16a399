//! Evaluation: benchmarks as data (`bench`), scorers that turn answers into per-item verdicts
//! (`score`, with the sandbox and the math verifier behind them), judged pairwise and graded
//! benchmarks (`pairwise`, `judge`), and the statistics over item scores (`stats`, `logistic`).
//! Everything here but the judge client and code checks is pure.

pub mod answer;
pub mod bench;
pub mod judge;
pub mod logistic;
pub mod output;
pub mod pairwise;
pub mod score;
pub mod stats;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {msg}", path.display())]
    Row {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    #[error("unknown benchmark `{0}`: give a file (.json / .jsonl) or one of: {names}", names = bench::BUILTIN.join(", "))]
    UnknownBench(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Annotate(#[from] crate::annotate::AnnotateError),
    #[error(transparent)]
    Judge(#[from] judge::JudgeError),
}

impl EvalError {
    pub(crate) fn row(path: &std::path::Path, line: usize, msg: impl Into<String>) -> EvalError {
        EvalError::Row {
            path: path.to_path_buf(),
            line,
            msg: msg.into(),
        }
    }
    pub(crate) fn file(path: &std::path::Path, msg: impl Into<String>) -> EvalError {
        EvalError::File {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}
