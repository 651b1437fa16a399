//! `model inspect|render|logprobs|generate|save`.

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::DType;
use fuselab::generate::{generate, SamplingParams};
use fuselab::model::{
    load_weights, parse_device, parse_dtype, save_checkpoint, Checkpoint, Decoder,
};
use serde_json::{json, Value};

use super::{print_json, template_vars, Status};
use crate::cli::{DeviceArgs, ModelCommand, PromptArgs};

fn read_messages(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    if !v.is_array() {
        bail!(
            "{}: expected a JSON list of {{role, content}} messages",
            path.display()
        );
    }
    Ok(v)
}

fn load_decoder(ck: &Checkpoint, dev: &DeviceArgs) -> anyhow::Result<Decoder> {
    let device = parse_device(&dev.device)?;
    let dtype = parse_dtype(&dev.dtype)?;
    let w = load_weights(&ck.dir, &ck.config, &device, dtype)?;
    Ok(Decoder::new(ck.config.clone(), w)?)
}

/// Token ids of the prompt, from whichever source was given.
fn prompt_ids(ck: &Checkpoint, p: &PromptArgs) -> anyhow::Result<Vec<u32>> {
    if let Some(ids) = &p.prompt_ids {
        return Ok(ids.clone());
    }
    let (text, special) = if let Some(m) = &p.messages {
        (
            ck.template()?
                .render(&read_messages(m)?, true, &template_vars(&p.vars)?)?,
            false,
        )
    } else if let Some(t) = &p.prompt {
        (t.clone(), true)
    } else {
        bail!("give a prompt: --prompt, --messages or --prompt-ids");
    };
    let enc = ck
        .tokenizer()?
        .encode(text.as_str(), special)
        .map_err(|e| anyhow::anyhow!("tokenising the prompt: {e}"))?;
    Ok(enc.get_ids().to_vec())
}

pub fn model(cmd: &ModelCommand) -> Status {
    match cmd {
        ModelCommand::Inspect { dir, json } => {
            let ck = Checkpoint::open(dir)?;
            let c = &ck.config;
            let info = json!({
                "family": c.family,
                "parameters": c.parameter_count(),
                "dtype": c.dtype,
                "context_length": c.max_position_embeddings,
                "vocab_size": c.vocab_size,
                "hidden_size": c.hidden_size,
                "layers": c.num_hidden_layers,
                "attention_heads": c.num_attention_heads,
                "kv_heads": c.num_key_value_heads,
                "head_dim": c.head_dim,
                "sliding_windows": c.layer_windows,
                "tied_embeddings": c.tie_word_embeddings,
                "rope_theta": c.rope_theta,
                "rope_llama3": c.rope_llama3,
                "chat_template": ck.chat_template.as_ref().map(|t| t.path.display().to_string()),
                "tokenizer": ck.tokenizer.is_some(),
            });
            if *json {
                print_json(&info);
            } else {
                println!("{}", dir.display());
                for (k, v) in info.as_object().expect("object") {
                    println!("  {k:<16} {v}");
                }
            }
        }
        ModelCommand::Render {
            model,
            messages,
            add_generation_prompt,
            vars: v,
        } => {
            let ck = Checkpoint::open(model)?;
            let text = ck.template()?.render(
                &read_messages(messages)?,
                *add_generation_prompt,
                &template_vars(v)?,
            )?;
            print!("{text}");
        }
        ModelCommand::Logprobs {
            model,
            prompt,
            completion,
            completion_ids,
            device,
            json,
        } => {
            let ck = Checkpoint::open(model)?;
            let p = prompt_ids(&ck, prompt)?;
            let c: Vec<u32> = match (completion, completion_ids) {
                (_, Some(ids)) => ids.clone(),
                (Some(t), None) => ck
                    .tokenizer()?
                    .encode(t.as_str(), false)
                    .map_err(|e| anyhow::anyhow!("tokenising the completion: {e}"))?
                    .get_ids()
                    .to_vec(),
                (None, None) => bail!("give a completion: --completion or --completion-ids"),
            };
            if p.is_empty() || c.is_empty() {
                bail!("prompt and completion must both have at least one token");
            }
            let dec = load_decoder(&ck, device)?;
            let ids: Vec<u32> = p.iter().chain(&c).copied().collect();
            let mask = vec![vec![1u8; ids.len()]];
            let lp: Vec<f32> = dec
                .token_logprobs(std::slice::from_ref(&ids), &mask)?
                .to_dtype(DType::F32)?
                .squeeze(0)?
                .to_vec1()?;
            let per: Vec<f32> = lp[p.len() - 1..].to_vec();
            let sum: f64 = per.iter().map(|&x| x as f64).sum();
            if *json {
                print_json(
                    &json!({"prompt_ids": p, "completion_ids": c, "logprobs": per, "sum": sum}),
                );
            } else {
                for (t, l) in c.iter().zip(&per) {
                    println!("{t:>8} {l:>12.6}");
                }
                println!("sum {sum:.6}");
            }
        }
        ModelCommand::Generate {
            model,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            stop,
            seed,
            device,
            json,
        } => {
            let ck = Checkpoint::open(model)?;
            let p = prompt_ids(&ck, prompt)?;
            let dec = load_decoder(&ck, device)?;
            let params = SamplingParams {
                max_new_tokens: *max_new_tokens,
                temperature: *temperature,
                top_p: *top_p,
                top_k: *top_k,
                repetition_penalty: *repetition_penalty,
                stop_token_ids: ck.stop_token_ids(),
                stop_strings: stop.clone(),
                seed: *seed,
            };
            let tok = ck.tokenizer.as_ref();
            let decode = |ids: &[u32]| {
                tok.and_then(|t| t.decode(ids, true).ok())
                    .unwrap_or_default()
            };
            let g = generate(&dec, std::slice::from_ref(&p), &params, &decode)?
                .pop()
                .expect("one prompt, one generation");
            let mut text = decode(&g.tokens);
            if let Some(cut) = stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
            }
            if *json {
                print_json(
                    &json!({"prompt_ids": p, "token_ids": g.tokens, "text": text, "finish": g.finish}),
                );
            } else {
                println!("{text}");
            }
        }
        ModelCommand::Save { model, out, dtype } => {
            let ck = Checkpoint::open(model)?;
            let dt = parse_dtype(dtype)?;
            let w = load_weights(&ck.dir, &ck.config, &candle_core::Device::Cpu, DType::F32)?;
            let dec = Decoder::new(ck.config.clone(), w)?;
            save_checkpoint(out, &ck.config, &dec.weights(), dt, Some(&ck.dir))?;
            eprintln!(
                "saved {} ({}) to {}",
                ck.config.family.model_type(),
                dtype,
                out.display()
            );
        }
    }
    Ok(0)
}
