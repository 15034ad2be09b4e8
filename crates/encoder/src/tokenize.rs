//! WordPiece tokenisation exactly as HuggingFace's fast tokenizer does it for BERT.

use std::path::Path;

use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{Tokenizer, TruncationDirection};

use crate::error::{EncoderError, Result};

/// A padded batch of token ids, row-major `[batch, seq_len]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub token_type_ids: Vec<i64>,
    pub batch: usize,
    pub seq_len: usize,
    /// Real (unpadded) tokens per row.
    pub lengths: Vec<usize>,
}

/// One sentence's tokens, before padding.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

/// The tokenizer of a checkpoint. Padding and truncation settings stored in `tokenizer.json`
/// (MiniLM's fixes both at 128) are ignored: every call says its own maximum length and batches
/// are padded to their longest row.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Tokens the post-processor adds around a single sentence ([CLS] … [SEP] = 2).
    added: usize,
    pad_id: u32,
}

impl TextTokenizer {
    /// From `tokenizer.json`, or from `vocab.txt` with the uncased BERT pipeline when the
    /// directory has no `tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let vocab = dir.join("vocab.txt");
        if json.is_file() {
            let inner = Tokenizer::from_file(&json)
                .map_err(|e| EncoderError::Tokenizer(format!("{}: {e}", json.display())))?;
            Self::from_tokenizer(inner)
        } else if vocab.is_file() {
            Self::from_vocab(&vocab, uncased(dir))
        } else {
            Err(EncoderError::MissingFile(format!(
                "{}: no tokenizer.json and no vocab.txt: cannot build the tokenizer",
                dir.display()
            )))
        }
    }

    /// From the text of a `tokenizer.json`.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self> {
        let inner = Tokenizer::from_bytes(bytes)
            .map_err(|e| EncoderError::Tokenizer(format!("tokenizer.json: {e}")))?;
        Self::from_tokenizer(inner)
    }

    /// The BERT WordPiece pipeline over a `vocab.txt` (BertNormalizer with clean_text,
    /// handle_chinese_chars, accents stripped when lowercasing, BertPreTokenizer, [CLS]/[SEP]).
    pub fn from_vocab(vocab: &Path, lowercase: bool) -> Result<Self> {
        let path = vocab.to_str().ok_or_else(|| {
            EncoderError::Tokenizer(format!("{}: path is not UTF-8", vocab.display()))
        })?;
        let model = WordPiece::from_file(path)
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| EncoderError::Tokenizer(format!("{}: {e}", vocab.display())))?;
        let mut inner = Tokenizer::new(model);
        let id = |t: &str| {
            inner.token_to_id(t).ok_or_else(|| {
                EncoderError::Tokenizer(format!("{}: vocabulary lacks {t}", vocab.display()))
            })
        };
        let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
        inner
            .with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)))
            .map_err(|e| EncoderError::Tokenizer(e.to_string()))?;
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        inner.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), sep),
            ("[CLS]".into(), cls),
        )));
        inner.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
        Self::from_tokenizer(inner)
    }

    fn from_tokenizer(mut inner: Tokenizer) -> Result<Self> {
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| EncoderError::Tokenizer(e.to_string()))?;
        let added = inner
            .get_post_processor()
            .map(|p| tokenizers::PostProcessor::added_tokens(p, false))
            .unwrap_or(0);
        let pad_id = inner.token_to_id("[PAD]").unwrap_or(0);
        Ok(TextTokenizer {
            inner,
            added,
            pad_id,
        })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The tokenizer as `tokenizer.json` text, padding and truncation left unset.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| EncoderError::Tokenizer(e.to_string()))
    }

    /// Tokenises one sentence with special tokens, truncated to `max_len` tokens the way
    /// `truncation=True` does: [CLS], the first `max_len - 2` word pieces, [SEP].
    pub fn tokenize(&self, text: &str, max_len: usize) -> Result<Tokens> {
        if max_len <= self.added {
            return Err(EncoderError::Input(format!(
                "max length {max_len} leaves no room for text: it must exceed the {} special tokens",
                self.added
            )));
        }
        let mut enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| EncoderError::Tokenizer(e.to_string()))?;
        enc.truncate(max_len - self.added, 0, TruncationDirection::Right);
        let enc = self
            .inner
            .post_process(enc, None, true)
            .map_err(|e| EncoderError::Tokenizer(e.to_string()))?;
        Ok(Tokens {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
        })
    }

    /// The word-piece strings of an untruncated encoding, special tokens included.
    pub fn token_strings(&self, text: &str) -> Result<Vec<String>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| EncoderError::Tokenizer(e.to_string()))?;
        Ok(enc.get_tokens().to_vec())
    }

    /// Tokenises and pads a batch to its longest row.
    pub fn encode_batch(&self, texts: &[&str], max_len: usize) -> Result<TokenBatch> {
        let rows = texts
            .iter()
            .map(|t| self.tokenize(t, max_len))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.pad(&rows.iter().collect::<Vec<_>>()))
    }

    /// Pads already tokenised rows to the longest one.
    pub fn pad(&self, rows: &[&Tokens]) -> TokenBatch {
        self.pad_rounded(rows, 1, usize::MAX)
    }

    /// Pads rows to the longest one rounded up to a multiple of `multiple`, but never past
    /// `limit` (the model's position table) nor shorter than the longest row. Fewer distinct
    /// shapes mean fewer kernel compilations and autotune runs on a GPU; the attention mask
    /// keeps the result the same.
    pub fn pad_rounded(&self, rows: &[&Tokens], multiple: usize, limit: usize) -> TokenBatch {
        let longest = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let seq_len = longest
            .next_multiple_of(multiple.max(1))
            .min(limit)
            .max(longest);
        let batch = rows.len();
        let mut input_ids = vec![self.pad_id as i64; batch * seq_len];
        let mut attention_mask = vec![0i64; batch * seq_len];
        let mut token_type_ids = vec![0i64; batch * seq_len];
        let mut lengths = Vec::with_capacity(batch);
        for (b, row) in rows.iter().enumerate() {
            let base = b * seq_len;
            for (t, (&id, &ty)) in row.ids.iter().zip(&row.type_ids).enumerate() {
                input_ids[base + t] = id as i64;
                attention_mask[base + t] = 1;
                token_type_ids[base + t] = ty as i64;
            }
            lengths.push(row.ids.len());
        }
        TokenBatch {
            input_ids,
            attention_mask,
            token_type_ids,
            batch,
            seq_len,
            lengths,
        }
    }
}

/// `do_lower_case` from `tokenizer_config.json`; BERT vocabularies default to uncased.
fn uncased(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("do_lower_case").and_then(|b| b.as_bool()))
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> TextTokenizer {
        let dir = tempfile::tempdir().unwrap();
        let vocab = dir.path().join("vocab.txt");
        std::fs::write(&vocab, "[PAD]\n[UNK]\n[CLS]\n[SEP]\na\nb\n").unwrap();
        TextTokenizer::from_vocab(&vocab, true).unwrap()
    }

    #[test]
    fn padding_rounds_up_within_the_limit() {
        let tok = tiny();
        let short = tok.tokenize("a b", 64).unwrap(); // [CLS] a b [SEP]
        let long = tok.tokenize(&"a ".repeat(9), 64).unwrap(); // 11 tokens
        let rows = [&short, &long];
        assert_eq!(tok.pad(&rows).seq_len, 11);
        let rounded = tok.pad_rounded(&rows, 8, 512);
        assert_eq!(rounded.seq_len, 16);
        assert_eq!(rounded.lengths, vec![4, 11]);
        // Padding positions are [PAD] with mask 0; real tokens are unchanged.
        assert_eq!(&rounded.input_ids[..4], &[2, 4, 5, 3]);
        assert!(rounded.input_ids[4..16].iter().all(|&id| id == 0));
        assert_eq!(rounded.attention_mask[16..16 + 12].iter().sum::<i64>(), 11);
        // The position table caps the rounding, but never below the longest row.
        assert_eq!(tok.pad_rounded(&rows, 8, 13).seq_len, 13);
        assert_eq!(tok.pad_rounded(&rows, 8, 5).seq_len, 11);
        assert_eq!(tok.pad_rounded(&rows, 0, 512).seq_len, 11);
    }
}
