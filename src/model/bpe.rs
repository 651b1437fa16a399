//! New tokenizers: a byte-level BPE trained with Hugging Face's `tokenizers` on a corpus, laid out
//! as Qwen2's (no normaliser, Qwen2's split pattern — every digit on its own, as in the real Qwen2
//! and Llama 3 vocabularies — then byte-level without a prefix space, special tokens matched
//! before BPE), and written as a checkpoint's tokenizer files with a chat template, so
//! every model built on it loads like a downloaded one.

use std::path::Path;

use serde_json::{json, Value};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Qwen2's pre-tokeniser pattern (its tokenizer.json), which splits numbers into single digits.
/// Whole-number tokens would each be rare in a small corpus, with embeddings too undertrained to
/// be told apart, and a model must then copy a constant it cannot distinguish from its
/// neighbours (a fusechat-tiny run with merged numbers lost its code specialist: 62.5% -> 0%).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

use super::init::SpecialIds;
use super::ModelError;

/// The special tokens of a tokenizer this module trains, in id order from 0.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Specials {
    /// Padding and end of text.
    pub pad: String,
    /// Ends an assistant turn: generation stops here.
    pub eos: String,
    /// Further tokens the chat template writes (e.g. `<|im_start|>`).
    pub others: Vec<String>,
    /// The beginning-of-sequence token, if the template writes one.
    pub bos: Option<String>,
}

impl Specials {
    pub fn all(&self) -> Vec<String> {
        let mut v = vec![self.pad.clone(), self.eos.clone()];
        v.extend(self.bos.iter().cloned());
        v.extend(self.others.iter().cloned());
        v
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Train a byte-level BPE of at most `vocab_size` tokens (special tokens included) on `texts`.
/// `at` names the corpus in errors. The same corpus and sizes give the same vocabulary and merges.
pub fn train_bpe(
    texts: &[String],
    vocab_size: usize,
    min_frequency: u64,
    specials: &Specials,
    at: &Path,
) -> Result<Tokenizer, ModelError> {
    let special: Vec<AddedToken> = specials
        .all()
        .into_iter()
        .map(|s| AddedToken::from(s, true))
        .collect();
    let alphabet = ByteLevel::alphabet().into_iter().collect();
    let trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .special_tokens(special.clone())
        .initial_alphabet(alphabet)
        .build();
    let mut tok = Tokenizer::new(ModelWrapper::BPE(BPE::default()));
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| tok_err(at, format!("pre-tokeniser pattern: {e}")))?;
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ]))));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    tok.with_post_processor(Some(ByteLevel::new(false, false, true)));
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| tok_err(at, format!("training BPE: {e}")))?;
    tok.add_special_tokens(&special);
    Ok(tok)
}

/// Write `tok` as a checkpoint's tokenizer files into `dir`: tokenizer.json, tokenizer_config.json
/// (special tokens and `chat_template`) and generation_config.json (the stop ids). Returns the ids
/// a model config needs.
pub fn write_tokenizer_dir(
    dir: &Path,
    tok: &Tokenizer,
    specials: &Specials,
    chat_template: &str,
    context: usize,
) -> Result<SpecialIds, ModelError> {
    let id = |s: &str| {
        tok.token_to_id(s)
            .ok_or_else(|| tok_err(dir, format!("special token `{s}` is not in the vocabulary")))
    };
    let ids = SpecialIds {
        bos: specials.bos.as_deref().map(id).transpose()?,
        eos: id(&specials.eos)?,
        pad: id(&specials.pad)?,
    };
    let tj = dir.join("tokenizer.json");
    tok.save(&tj, true).map_err(|e| tok_err(&tj, e))?;
    let mut decoder = serde_json::Map::new();
    for s in specials.all() {
        decoder.insert(
            id(&s)?.to_string(),
            json!({"content": s, "lstrip": false, "rstrip": false, "normalized": false,
                   "single_word": false, "special": true}),
        );
    }
    let config = json!({
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": specials.bos,
        "eos_token": specials.eos,
        "pad_token": specials.pad,
        "model_max_length": context,
        "clean_up_tokenization_spaces": false,
        "added_tokens_decoder": Value::Object(decoder),
        "chat_template": chat_template,
    });
    let generation = json!({
        "bos_token_id": ids.bos,
        "eos_token_id": [ids.eos, ids.pad],
        "pad_token_id": ids.pad,
    });
    for (name, v) in [
        ("tokenizer_config.json", config),
        ("generation_config.json", generation),
    ] {
        let p = dir.join(name);
        std::fs::write(
            &p,
            serde_json::to_string_pretty(&v).expect("serialises") + "\n",
        )
        .map_err(|source| ModelError::Io { path: p, source })?;
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pre_tokeniser_is_qwen2s_and_splits_digits() {
        let texts: Vec<String> = (0..200)
            .map(|i| format!("def times_{}(x):\n    return x * {}\n", i % 97, i % 97))
            .collect();
        let specials = Specials {
            pad: "<|endoftext|>".into(),
            eos: "<|im_end|>".into(),
            others: vec![],
            bos: None,
        };
        let tok = train_bpe(&texts, 400, 2, &specials, Path::new("corpus")).unwrap();
        let enc = tok.encode("times_29", false).unwrap();
        let pieces: Vec<String> = enc
            .get_ids()
            .iter()
            .map(|&i| tok.decode(&[i], false).unwrap())
            .collect();
        assert!(
            pieces.ends_with(&["2".to_string(), "9".to_string()]),
            "{pieces:?}"
        );
        // The same pre-tokeniser as a real Qwen vocabulary's tokenizer.json.
        let real = crate::eval::bench::shared_data().join("tokenizers/qwen3/tokenizer.json.gz");
        let gz = std::fs::read(&real).unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut bytes).unwrap();
        let real: Value = serde_json::from_slice(&bytes).unwrap();
        let ours: Value = serde_json::from_str(&tok.to_string(false).unwrap()).unwrap();
        assert_eq!(ours["pre_tokenizer"], real["pre_tokenizer"]);
    }
}
