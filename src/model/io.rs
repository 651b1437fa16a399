//! Reading and writing Hugging Face checkpoint directories: config.json, model.safetensors or a sharded
//! `model.safetensors.index.json`, tokenizer.json, tokenizer_config.json / chat_template.jinja.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::chat::ChatTemplate;
use super::config::{config_path, ModelConfig};
use super::{CandleContext, ModelError};

/// A checkpoint directory with its config, tokenizer and chat template (weights load separately).
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    pub tokenizer_config: Value,
    pub chat_template: Option<ChatTemplate>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A special token as tokenizer_config.json writes it: a string or an AddedToken dict.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint, ModelError> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.is_file() {
            Some(tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| {
                ModelError::Tokenizer {
                    path: tok_path.clone(),
                    reason: e.to_string(),
                }
            })?)
        } else {
            None
        };
        let tc_path = dir.join("tokenizer_config.json");
        let tokenizer_config: Value = if tc_path.is_file() {
            let text = fs::read_to_string(&tc_path).map_err(io_err(&tc_path))?;
            serde_json::from_str(&text).map_err(|e| ModelError::Config {
                path: tc_path.clone(),
                reason: format!("line {}: {e}", e.line()),
            })?
        } else {
            Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let (source, source_path) = if jinja.is_file() {
            (
                Some(fs::read_to_string(&jinja).map_err(io_err(&jinja))?),
                jinja,
            )
        } else {
            let t = match tokenizer_config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: the "default" one.
                Some(Value::Array(a)) => a
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            };
            (t, tc_path.clone())
        };
        let chat_template = source.map(|s| {
            ChatTemplate::new(
                s,
                source_path,
                token_text(tokenizer_config.get("bos_token")),
                token_text(tokenizer_config.get("eos_token")),
            )
        });
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            tokenizer,
            tokenizer_config,
            chat_template,
        })
    }

    pub fn tokenizer(&self) -> Result<&tokenizers::Tokenizer, ModelError> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| ModelError::Tokenizer {
                path: self.dir.join("tokenizer.json"),
                reason: "missing".into(),
            })
    }

    pub fn template(&self) -> Result<&ChatTemplate, ModelError> {
        self.chat_template
            .as_ref()
            .ok_or_else(|| ModelError::NoTemplate {
                dir: self.dir.clone(),
            })
    }

    /// The weights as a decoder on `device` in `dtype` (names and shapes checked).
    pub fn decoder(&self, device: &Device, dtype: DType) -> Result<super::Decoder, ModelError> {
        let w = load_weights(&self.dir, &self.config, device, dtype)?;
        super::Decoder::new(self.config.clone(), w)
    }

    /// The config's `pad_token_id`, where it names one.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.config
            .raw
            .get("pad_token_id")
            .and_then(Value::as_u64)
            .map(|x| x as u32)
    }

    /// Token ids that end generation: the config's eos ids plus the tokenizer's eos token.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut ids = self.config.eos_token_ids.clone();
        if let (Some(t), Some(eos)) = (
            &self.tokenizer,
            token_text(self.tokenizer_config.get("eos_token")),
        ) {
            if let Some(id) = t.token_to_id(&eos) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }
}

/// The safetensors files of a checkpoint and, for each, the path to name in errors.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(ModelError::NoWeights {
            dir: dir.to_path_buf(),
        });
    }
    let text = fs::read_to_string(&index).map_err(io_err(&index))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: index.clone(),
        reason: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| ModelError::Config {
            path: index.clone(),
            reason: "no `weight_map`".into(),
        })?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    let mut out = Vec::new();
    for s in shards {
        // A shard is a file beside the index: `../x` or `/etc/passwd` must not be read.
        let plain = !s.is_empty()
            && !s.starts_with('.')
            && !s.contains(['/', '\\', '\0'])
            && Path::new(&s).file_name() == Some(std::ffi::OsStr::new(&s));
        if !plain {
            return Err(ModelError::Config {
                path: index.clone(),
                reason: format!("shard name `{s}` is not a file name in the checkpoint directory"),
            });
        }
        let p = dir.join(&s);
        if !p.is_file() {
            return Err(ModelError::MissingShard {
                index: index.clone(),
                shard: s,
            });
        }
        out.push(p);
    }
    Ok(out)
}

/// Load every weight the config needs, checking names and shapes, converted to `dtype` on `device`.
pub fn load_weights(
    dir: &Path,
    config: &ModelConfig,
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let files = weight_files(dir)?;
    let mut found: HashMap<String, (Tensor, PathBuf)> = HashMap::new();
    for f in &files {
        let tensors = candle_core::safetensors::load(f, &Device::Cpu)
            .ctx(|| format!("reading {}", f.display()))?;
        for (name, t) in tensors {
            found.insert(name, (t, f.clone()));
        }
    }
    let blame = if files.len() == 1 {
        files[0].clone()
    } else {
        dir.join("model.safetensors.index.json")
    };
    let layers_found = found
        .keys()
        .filter_map(|k| {
            k.strip_prefix("model.layers.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1);
    if layers_found != config.num_hidden_layers {
        return Err(ModelError::Config {
            path: config_path(dir),
            reason: format!(
                "`num_hidden_layers` is {}, but the weights in {} hold {layers_found} layers",
                config.num_hidden_layers,
                blame.display()
            ),
        });
    }
    let mut out = HashMap::new();
    for (name, shape) in config.expected_tensors() {
        let (t, file) = found
            .remove(&name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: blame.clone(),
                tensor: name.clone(),
            })?;
        if t.dims() != shape.as_slice() {
            return Err(ModelError::ShapeMismatch {
                path: file,
                tensor: name,
                found: t.dims().to_vec(),
                expected: shape,
            });
        }
        // x * 0 is 0 for every finite x and NaN otherwise, so one sum finds any NaN or infinity.
        let poisoned = t
            .to_dtype(DType::F32)
            .and_then(|x| x.affine(0.0, 0.0))
            .and_then(|x| x.sum_all())
            .and_then(|x| x.to_scalar::<f32>())
            .ctx(|| format!("checking `{name}`"))?;
        if !poisoned.is_finite() {
            return Err(ModelError::Invalid(format!(
                "{}: tensor `{name}` holds NaN or infinite values",
                file.display()
            )));
        }
        let t = t
            .to_dtype(dtype)
            .and_then(|t| t.to_device(device))
            .ctx(|| format!("converting `{name}`"))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Write a checkpoint directory that Hugging Face transformers loads unchanged: config.json (the
/// original fields, with the stored dtype), model.safetensors, and the tokenizer files of `source`.
/// Written into a temporary sibling and renamed, so a crash never leaves a half checkpoint at `out`.
pub fn save_checkpoint(
    out: &Path,
    config: &ModelConfig,
    weights: &BTreeMap<String, Tensor>,
    dtype: DType,
    source: Option<&Path>,
) -> Result<(), ModelError> {
    let out = &std::path::absolute(out).map_err(io_err(out))?;
    refuse_foreign_out(out)?;
    let tmp = crate::fs::temp_dir_beside(out).map_err(io_err(out))?;
    let res = write_checkpoint_files(&tmp, config, weights, dtype, source)
        .and_then(|_| crate::fs::publish_replacing_dir(&tmp, out).map_err(io_err(out)));
    let _ = crate::fs::remove_tree(&tmp);
    res
}

/// The files `save_checkpoint` writes; a directory holding nothing else is one we may replace.
const CHECKPOINT_FILES: [&str; 7] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// `--out` may be missing, empty, or a checkpoint this program wrote (only its files, config.json
/// among them). Anything else is someone's directory: it is never deleted or written into.
fn refuse_foreign_out(out: &Path) -> Result<(), ModelError> {
    let meta = match fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(out)(e)),
        Ok(m) => m,
    };
    let refuse = |why: String| {
        Err(ModelError::Invalid(format!(
            "{}: {why}; refusing to replace it (choose a new or empty output directory)",
            out.display()
        )))
    };
    if !meta.is_dir() {
        return refuse("exists and is not a directory".into());
    }
    let names: Vec<String> = fs::read_dir(out)
        .map_err(io_err(out))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(io_err(out))?;
    if names.is_empty() {
        return Ok(());
    }
    if let Some(foreign) = names
        .iter()
        .find(|n| !CHECKPOINT_FILES.contains(&n.as_str()))
    {
        return refuse(format!(
            "is not empty and holds `{foreign}`, which is not part of a saved checkpoint"
        ));
    }
    if !names.iter().any(|n| n == "config.json") {
        return refuse("is not empty and is not a checkpoint (no config.json)".into());
    }
    Ok(())
}

fn write_checkpoint_files(
    tmp: &Path,
    config: &ModelConfig,
    weights: &BTreeMap<String, Tensor>,
    dtype: DType,
    source: Option<&Path>,
) -> Result<(), ModelError> {
    let cfg = config.to_json(super::dtype_name(dtype));
    let cfg_path = tmp.join("config.json");
    fs::write(
        &cfg_path,
        serde_json::to_string_pretty(&cfg).expect("serialises") + "\n",
    )
    .map_err(io_err(&cfg_path))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in weights {
        let t = t
            .to_dtype(dtype)
            .and_then(|t| t.to_device(&Device::Cpu))
            .and_then(|t| t.contiguous())
            .ctx(|| format!("preparing `{name}` for saving"))?;
        tensors.insert(name.clone(), t);
    }
    let st = tmp.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &st).ctx(|| format!("writing {}", st.display()))?;
    if let Some(src) = source {
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
            "generation_config.json",
        ] {
            let p = src.join(name);
            if p.is_file() {
                fs::copy(&p, tmp.join(name)).map_err(io_err(&p))?;
            }
        }
    }
    Ok(())
}

/// Tensors outside the decoder (a reward model's heads), by name, from the checkpoint's weight
/// files: the ones present, converted to `dtype` on `device`, with the file each came from.
pub fn load_named(
    dir: &Path,
    names: &[String],
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, (Tensor, PathBuf)>, ModelError> {
    let mut out = HashMap::new();
    for f in weight_files(dir)? {
        let tensors = candle_core::safetensors::load(&f, &Device::Cpu)
            .ctx(|| format!("reading {}", f.display()))?;
        for (name, t) in tensors {
            if names.contains(&name) {
                let t = t
                    .to_dtype(dtype)
                    .and_then(|t| t.to_device(device))
                    .ctx(|| format!("converting `{name}`"))?;
                out.insert(name, (t, f.clone()));
            }
        }
    }
    Ok(out)
}
