//! `data import|show|export` and `construct`.

use anyhow::{bail, Context};
use fuselab::construct::{self, ConstructParams, EvalText, PairSource};
use fuselab::data::export::{dpo_value, sft_value, write_values, ExportLayout};
use fuselab::data::import::{eval_texts, import, Layout, Mapping};
use fuselab::data::table::{frame_values, read_frame, read_kind_columns};
use fuselab::data::{read_records, DpoPair, Prompt, RecordKind, SftRow};

use super::{print_json, Status};
use crate::cli::{ConstructArgs, DataCommand, ExportLayoutArg, LayoutArg, PairSourceArg};

fn layout(l: LayoutArg) -> Layout {
    match l {
        LayoutArg::Auto => Layout::Auto,
        LayoutArg::Fields => Layout::Fields,
        LayoutArg::Messages => Layout::Messages,
        LayoutArg::Sharegpt => Layout::Sharegpt,
        LayoutArg::FusechatSft => Layout::FusechatSft,
        LayoutArg::FusechatDpo => Layout::FusechatDpo,
        LayoutArg::Answers => Layout::Answers,
        LayoutArg::Simpo => Layout::Simpo,
    }
}

pub fn data(cmd: &DataCommand) -> Status {
    match cmd {
        DataCommand::Import {
            input,
            out,
            layout: l,
            id_field,
            prompt_field,
            system_field,
            gold_field,
            tests_field,
            entry_point_field,
            category_field,
            dataset,
            category,
            language,
            source,
            json,
        } => {
            let category = match category {
                Some(c) => Some(
                    c.parse()
                        .map_err(|e: String| anyhow::anyhow!("--category: {e}"))?,
                ),
                None => None,
            };
            let m = Mapping {
                layout: Some(layout(*l)),
                id_field: id_field.clone(),
                prompt_field: prompt_field.clone(),
                system_field: system_field.clone(),
                gold_field: gold_field.clone(),
                tests_field: tests_field.clone(),
                entry_point_field: entry_point_field.clone(),
                category_field: category_field.clone(),
                dataset: dataset.clone(),
                category,
                language: language.clone(),
                source: source.clone(),
            };
            let imported = import(input, &m)?;
            imported.write(out)?;
            let summary = serde_json::json!({
                "input": input, "out": out, "kind": imported.kind().name(), "rows": imported.len(),
            });
            if *json {
                print_json(&summary);
            } else {
                println!(
                    "{}: {} {} rows -> {}",
                    input.display(),
                    imported.len(),
                    imported.kind().name(),
                    out.display()
                );
            }
            Ok(0)
        }
        DataCommand::Show { input, limit, json } => {
            let (mut df, kind) = if fuselab::data::table::is_parquet(input) {
                read_frame(input)?
            } else {
                let rows = fuselab::data::read_values(input)?;
                let n = rows.len();
                let head: Vec<_> = rows.into_iter().take(*limit).map(|(_, v)| v).collect();
                if *json {
                    print_json(&serde_json::json!({"rows": n, "head": head}));
                } else {
                    println!("{}: {n} rows (JSON)", input.display());
                    for v in head {
                        println!("{v}");
                    }
                }
                return Ok(0);
            };
            let columns: Vec<(String, String)> = df
                .columns()
                .iter()
                .map(|c| (c.name().to_string(), c.dtype().to_string()))
                .collect();
            let rows = df.height();
            let mut head = df.slice(0, *limit);
            let head = frame_values(&mut head, input)?;
            if *json {
                print_json(&serde_json::json!({
                    "kind": kind.map(RecordKind::name), "rows": rows,
                    "columns": columns.iter().map(|(n, t)| serde_json::json!({"name": n, "type": t})).collect::<Vec<_>>(),
                    "head": head,
                }));
            } else {
                println!(
                    "{}: {} table, {rows} rows",
                    input.display(),
                    kind.map(RecordKind::name).unwrap_or("untagged")
                );
                for (n, t) in &columns {
                    println!("  {n}: {t}");
                }
                let _ = &mut df;
                for v in head {
                    println!("{v}");
                }
            }
            Ok(0)
        }
        DataCommand::Export { input, out, layout } => {
            let layout = match layout {
                ExportLayoutArg::Trl => ExportLayout::Trl,
                ExportLayoutArg::Fusechat => ExportLayout::Fusechat,
            };
            let kind = if fuselab::data::table::is_parquet(input) {
                read_frame(input)?.1
            } else {
                None
            };
            let rows: Vec<serde_json::Value> = match kind {
                Some(RecordKind::Sft) => read_records::<SftRow>(input)?
                    .iter()
                    .map(|r| sft_value(r, layout))
                    .collect(),
                Some(RecordKind::Dpo) => read_records::<DpoPair>(input)?
                    .iter()
                    .map(|r| dpo_value(r, layout))
                    .collect(),
                Some(k) => bail!(
                    "{}: holds {} records; export takes SFT or DPO tables",
                    input.display(),
                    k.name()
                ),
                None => match read_records::<SftRow>(input) {
                    Ok(rows) => rows.iter().map(|r| sft_value(r, layout)).collect(),
                    Err(_) => read_records::<DpoPair>(input)
                        .with_context(|| {
                            format!("{} is neither an SFT nor a DPO table", input.display())
                        })?
                        .iter()
                        .map(|r| dpo_value(r, layout))
                        .collect(),
                },
            };
            write_values(&rows, out)?;
            println!("{} rows -> {}", rows.len(), out.display());
            Ok(0)
        }
    }
}

pub fn construct(a: &ConstructArgs) -> Status {
    let mut p: ConstructParams = match &a.params {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not construction parameters", path.display()))?
        }
        None => ConstructParams::default(),
    };
    if let Some(s) = a.seed {
        p.seed = s;
    }
    if let Some(f) = a.sft_fraction {
        p.sft_fraction = f;
    }
    if let Some(x) = a.gap_min {
        p.gap.min = x;
    }
    if let Some(x) = a.gap_max {
        p.gap.max = x;
    }
    if a.gap_exclusive {
        p.gap.min_inclusive = false;
        p.gap.max_inclusive = false;
    }
    if let Some(ps) = a.pair_source {
        p.pair_source = match ps {
            PairSourceArg::HighestChosen => PairSource::HighestChosen,
            PairSourceArg::LargestGap => PairSource::LargestGap,
            PairSourceArg::SmallestGap => PairSource::SmallestGap,
            PairSourceArg::FirstSource => PairSource::FirstSource,
        };
    }
    if let Some(s) = &a.second_language_source {
        p.second_language_source = Some(s.clone());
    }
    if let Some(n) = a.ngram {
        p.decontam_ngram = n;
    }
    let started = std::time::Instant::now();
    // Three independent files: decode them side by side.
    let (prompts, samples, annotations) = std::thread::scope(|s| {
        let prompts = s.spawn(|| read_records::<Prompt>(&a.prompts));
        let samples = s.spawn(|| {
            read_kind_columns(
                &a.samples,
                RecordKind::Samples,
                Some(construct::SAMPLE_COLUMNS),
            )
        });
        let annotations = read_kind_columns(
            &a.annotations,
            RecordKind::Annotations,
            Some(construct::ANNOTATION_COLUMNS),
        );
        (
            prompts.join().expect("the prompt reader does not panic"),
            samples.join().expect("the samples reader does not panic"),
            annotations,
        )
    });
    let (prompts, samples, annotations) = (prompts?, samples?, annotations?);
    let mut texts = Vec::new();
    for e in &a.eval {
        let name = e.display().to_string();
        for t in eval_texts(e)? {
            texts.push((name.clone(), t));
        }
    }
    let eval: Vec<EvalText> = texts
        .iter()
        .map(|(n, t)| EvalText { name: n, text: t })
        .collect();
    let c = construct::construct(&prompts, &samples, &annotations, &eval, &p)?;
    construct::write_outputs(&c, &p, &a.out)?;
    if a.json {
        print_json(&serde_json::json!({
            "out": a.out, "sft": c.sft.len(), "dpo": c.dpo.len(), "dropped": c.dropped.len(),
            "composition": c.composition, "seconds": started.elapsed().as_secs_f64(),
        }));
    } else {
        print!("{}", construct::composition_text(&c.composition));
        println!(
            "{} SFT rows, {} DPO pairs, {} prompts dropped -> {} ({:.2}s)",
            c.sft.len(),
            c.dpo.len(),
            c.dropped.len(),
            a.out.display(),
            started.elapsed().as_secs_f64()
        );
    }
    // The process ends here: freeing a FuseChat-scale set's millions of strings one by one
    // would add a tenth to the run for nothing.
    std::mem::forget((c, prompts, samples, annotations));
    Ok(0)
}

fn source_spec(
    a: &crate::cli::SampleArgs,
    name: String,
    stops: Vec<u32>,
) -> fuselab::sample::job::SourceSpec {
    use fuselab::data::Category;
    let per = |x: Option<u32>| x.unwrap_or(a.n);
    fuselab::sample::job::SourceSpec {
        name,
        sampling: fuselab::generate::SamplingParams {
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            repetition_penalty: a.repetition_penalty,
            stop_token_ids: if a.ignore_eos { vec![] } else { stops },
            stop_strings: a.stop.clone(),
            seed: a.seed,
        },
        samples_per_category: [
            (Category::Instruction, per(a.n_instruction)),
            (Category::Math, per(a.n_math)),
            (Category::Code, per(a.n_code)),
            (Category::SecondLanguage, per(a.n_second_language)),
        ]
        .into(),
    }
}

fn bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} samples  {msg}  eta {eta}")
            .expect("style"),
    );
    bar
}

/// `sample --model http://host:port/v1 --served-model NAME`: an OpenAI-compatible server.
fn sample_endpoint(store: &std::path::Path, a: &crate::cli::SampleArgs, url: &str) -> Status {
    use fuselab::sample::openai::{self, Endpoint};
    let Some(model) = a.served_model.clone() else {
        bail!("--served-model: a server needs the model name each request carries");
    };
    if !(a.timeout.is_finite() && a.timeout > 0.0) {
        bail!(
            "--timeout: {} must be a positive number of seconds",
            a.timeout
        );
    }
    let prompts: Vec<Prompt> = read_records(&a.prompts)?;
    let spec = source_spec(a, a.source.clone().unwrap_or_else(|| model.clone()), vec![]);
    spec.sampling.validate()?;
    let ep = Endpoint {
        base_url: url.to_string(),
        model,
        api_key: std::env::var("OPENAI_API_KEY")
            .ok()
            .filter(|k| !k.is_empty()),
        timeout_s: a.timeout,
        retries: a.retries,
        concurrency: a.concurrency.max(1),
    };
    let cache = a
        .cache_dir
        .clone()
        .unwrap_or_else(|| store.join("request-cache"));
    let total: u64 = prompts.iter().map(|p| spec.n_for(p.category) as u64).sum();
    let bar = bar(total);
    let started = std::time::Instant::now();
    let (samples, stats) = openai::run(&ep, &prompts, &spec, &cache, &|n| bar.set_position(n))?;
    bar.finish_and_clear();
    fuselab::data::write_records(&samples, &a.out)?;
    let secs = started.elapsed().as_secs_f64();
    let summary = serde_json::json!({
        "out": a.out, "source": spec.name, "url": url, "samples": samples.len(),
        "requests": stats.requests, "cache_hits": stats.cache_hits, "retries": stats.retries,
        "generated_tokens": stats.completion_tokens, "seconds": secs,
    });
    if a.json {
        print_json(&summary);
    } else {
        println!(
            "{} samples from {url} ({} requests, {} cached, {} retries) in {secs:.1}s -> {}",
            samples.len(),
            stats.requests,
            stats.cache_hits,
            stats.retries,
            a.out.display()
        );
    }
    Ok(0)
}

pub fn sample(store: &std::path::Path, a: &crate::cli::SampleArgs) -> Status {
    use fuselab::data::write_records;
    use fuselab::model::{load_weights, parse_device, parse_dtype, Checkpoint, Decoder};
    use fuselab::sample::job::{self, JobOptions, Model};

    if let Some(url) = a
        .model
        .to_str()
        .filter(|m| m.starts_with("http://") || m.starts_with("https://"))
    {
        return sample_endpoint(store, a, url);
    }
    let device = parse_device(&a.device.device)?;
    let is_gguf = a.model.is_file()
        && a.model
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    // A checkpoint directory runs on our decoder, a .gguf file on candle-transformers' quantized
    // models; both feed the same chunked job.
    enum Loaded {
        Local(Box<(Checkpoint, Decoder)>),
        Gguf(Box<fuselab::sample::gguf::GgufModel>),
    }
    let loaded = if is_gguf {
        let g = fuselab::sample::gguf::GgufModel::load(&a.model, &device)?;
        for w in &g.warnings {
            eprintln!("warning: {w}");
        }
        Loaded::Gguf(Box::new(g))
    } else {
        let ck = Checkpoint::open(&a.model)?;
        let w = load_weights(&ck.dir, &ck.config, &device, parse_dtype(&a.device.dtype)?)?;
        let decoder = Decoder::new(ck.config.clone(), w)?;
        Loaded::Local(Box::new((ck, decoder)))
    };
    let (model, stops) = match &loaded {
        Loaded::Local(local) => (
            Model {
                decoder: &local.1,
                tokenizer: local.0.tokenizer()?,
                template: local.0.template()?,
                identity: fuselab::train::model_identity(&local.0.dir)?,
            },
            local.0.stop_token_ids(),
        ),
        Loaded::Gguf(g) => (
            Model {
                decoder: g.as_ref(),
                tokenizer: &g.tokenizer,
                template: &g.template,
                identity: g.identity()?,
            },
            g.stop_token_ids.clone(),
        ),
    };
    let prompts: Vec<Prompt> = read_records(&a.prompts)?;
    let source = a.source.clone().unwrap_or_else(|| {
        a.model
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into())
    });
    let spec = source_spec(a, source, stops);
    let total: u64 = prompts.iter().map(|p| spec.n_for(p.category) as u64).sum();
    let work_dir = a.work_dir.clone().unwrap_or_else(|| {
        let mut name = a.out.file_name().unwrap_or_default().to_os_string();
        name.push(".chunks");
        a.out.with_file_name(name)
    });
    let bar = bar(total);
    let started = std::time::Instant::now();
    let on_progress = |samples: u64, tokens: u64| {
        bar.set_position(samples);
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("{:.0} tok/s", tokens as f64 / secs));
    };
    let opts = JobOptions {
        chunk_size: a.chunk_size,
        slots: a.slots,
    };
    let (samples, stats) = job::run(
        &model,
        &prompts,
        &spec,
        &opts,
        a.workers,
        &work_dir,
        &on_progress,
    )?;
    bar.finish_and_clear();
    write_records(&samples, &a.out)?;
    let secs = started.elapsed().as_secs_f64();
    let summary = serde_json::json!({
        "out": a.out, "source": spec.name, "samples": samples.len(), "chunks": stats.chunks,
        "chunks_resumed": stats.chunks_resumed, "generated_tokens": stats.generated_tokens,
        "prefill_tokens": stats.prefill_tokens, "shared_prefix_tokens": stats.shared_prefix_tokens,
        "seconds": secs,
        "tokens_per_s": stats.generated_tokens as f64 / secs.max(1e-9),
    });
    if a.json {
        print_json(&summary);
    } else {
        println!(
            "{} samples from {} ({} chunks, {} resumed), {} tokens in {:.1}s ({:.0} tok/s) -> {}",
            samples.len(),
            spec.name,
            stats.chunks,
            stats.chunks_resumed,
            stats.generated_tokens,
            secs,
            stats.generated_tokens as f64 / secs.max(1e-9),
            a.out.display()
        );
    }
    Ok(0)
}
