//! Decontamination: a prompt that shares a long word n-gram with any evaluation item is dropped
//! before construction. Words are lowercased alphanumeric runs; each CJK character counts as a word
//! (Chinese has no spaces). Texts shorter than `n` words are compared whole, so a short evaluation
//! question copied verbatim is still caught.

use std::collections::HashMap;

/// Lowercased words of `text`.
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for ch in text.chars() {
        if is_cjk(ch) {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            out.push(ch.to_string());
        } else if ch.is_alphanumeric() {
            cur.extend(ch.to_lowercase());
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x2FA1F
        | 0x3040..=0x30FF | 0xAC00..=0xD7AF)
}

fn grams(words: &[String], n: usize) -> Vec<String> {
    if words.is_empty() {
        return vec![];
    }
    if words.len() < n {
        return vec![words.join(" ")];
    }
    words.windows(n).map(|w| w.join(" ")).collect()
}

/// The n-grams of a set of evaluation texts, each with the index of the first text that has it.
pub struct Index {
    n: usize,
    grams: HashMap<String, usize>,
}

impl Index {
    pub fn new<'a>(texts: impl IntoIterator<Item = &'a str>, n: usize) -> Index {
        let n = n.max(1);
        let mut grams = HashMap::new();
        for (i, t) in texts.into_iter().enumerate() {
            for g in self::grams(&words(t), n) {
                grams.entry(g).or_insert(i);
            }
        }
        Index { n, grams }
    }

    /// The first n-gram of `text` found in the index, with the evaluation text's index.
    pub fn hit(&self, text: &str) -> Option<(String, usize)> {
        grams(&words(text), self.n)
            .into_iter()
            .find_map(|g| self.grams.get(&g).map(|&i| (g, i)))
    }

    pub fn is_empty(&self) -> bool {
        self.grams.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_shared_ngrams_and_short_copies() {
        let eval = [
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
            "What is 2+2?",
        ];
        let idx = Index::new(eval, 13);
        let leaked = "Q: NATALIA sold clips to 48 of her friends in april, and then she sold half as many! How many?";
        let (g, i) = idx.hit(leaked).expect("13 shared words");
        assert_eq!(i, 0);
        assert!(g.starts_with("natalia sold clips"));
        assert!(idx
            .hit("Natalia sold clips to 48 of her friends in April.")
            .is_none());
        assert_eq!(idx.hit("what is 2 + 2").map(|h| h.1), Some(1));
        assert!(idx.hit("what is 2 + 3").is_none());
        // CJK characters are words.
        assert_eq!(
            words("把句子倒过来 abc"),
            ["把", "句", "子", "倒", "过", "来", "abc"]
        );
    }
}
