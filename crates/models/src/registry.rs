//! The architectures vllm-rs runs: one row each in [`ARCHITECTURES`], with the names a
//! checkpoint calls it by and the functions that read its configuration. [`crate::load_gguf`],
//! [`crate::load_hf_dir`], their "supported: ..." errors, [`crate::inspect`] (model-info), the
//! engine's choice of an embedding model and docs/models.md's architecture table
//! ([`markdown_table`]) are all read off the table.
//!
//! Adding an architecture is a model file (its configuration implements [`DecoderConfig`])
//! and a row here.

use std::collections::HashMap;

use candle_core::quantized::gguf_file;

use crate::attention::RopeStyle;
use crate::bert::BertConfig;
use crate::gemma2::Gemma2Config;
use crate::gpt2::Gpt2Config;
use crate::llama::LlamaConfig;
use crate::opt::OptConfig;
use crate::weights::{gemma_tensor, gpt2_tensor, llama_tensor, GgufTensor, Weights};
use crate::{CausalLM, Result};

pub use crate::validate::Summary;

/// GGUF metadata, as the file stores it.
pub type GgufMetadata = HashMap<String, gguf_file::Value>;

/// One architecture: the names it answers to, what is special about it, and how it is read.
#[derive(Debug)]
pub struct Architecture {
    /// The models it covers, for people (`Llama 2/3, SmolLM2`).
    pub name: &'static str,
    /// The `config.json` `architectures` classes it answers to.
    pub hf_classes: &'static [&'static str],
    /// Its model file in `crates/models/src/`.
    pub file: &'static str,
    /// What sets it apart (docs/models.md's "what is special" column).
    pub special: &'static str,
    /// What it is and how its configuration is read.
    pub kind: Kind,
}

/// What an architecture is.
#[derive(Debug)]
pub enum Kind {
    /// A causal language model on the paged cache.
    Decoder {
        /// Reads `config.json`.
        config: fn(serde_json::Value) -> Result<Box<dyn DecoderConfig>>,
        /// The GGUF form, when llama.cpp writes one and we read it.
        gguf: Option<GgufForm>,
    },
    /// An encoder for embeddings ([`crate::bert::BertEmbedder`]): no KV cache, no causal model.
    Encoder {
        /// Reads `config.json` into its size (validated by the caller).
        summary: fn(serde_json::Value) -> Result<Summary>,
    },
}

/// How an architecture is stored in GGUF files.
#[derive(Debug)]
pub struct GgufForm {
    /// The `general.architecture` names llama.cpp's converter writes for it.
    pub names: &'static [&'static str],
    /// How the converter left the query and key rows: permuted for interleaved rotary
    /// (`llama`), or in Hugging Face's (NeoX) order.
    pub rope: RopeStyle,
    /// Where a Hugging Face tensor lives in the file (llama.cpp's tensor names).
    pub tensors: fn(&str) -> Option<GgufTensor>,
    /// Reads the metadata.
    pub config: fn(&GgufMetadata) -> Result<Box<dyn DecoderConfig>>,
}

/// A decoder's configuration, read from `config.json` or GGUF metadata.
pub trait DecoderConfig: Send {
    /// Its size, for model-info and for [`Summary::validate`], which every loader runs before
    /// [`DecoderConfig::load`] (names in `config.json`'s spelling; the GGUF loaders rename).
    /// It must not assume the configuration valid (no division by a head count that may be 0).
    fn summary(&self) -> Summary;
    /// Builds the model over `w`; `rope` is the order of the checkpoint's query and key rows.
    fn load(self: Box<Self>, w: &Weights, rope: RopeStyle) -> Result<Box<dyn CausalLM>>;
}

/// A configuration as a row's readers return it.
fn boxed<C: DecoderConfig + 'static>(c: C) -> Box<dyn DecoderConfig> {
    Box::new(c)
}

/// A Llama-family row's kind (`llama.rs`): read as [`LlamaConfig`], stored in GGUF files
/// named `gguf_names` with llama.cpp's Llama tensor names and query/key rows in `rope` order.
const fn llama(gguf_names: &'static [&'static str], rope: RopeStyle) -> Kind {
    Kind::Decoder {
        config: |raw| LlamaConfig::from_hf(raw).map(boxed),
        gguf: Some(GgufForm {
            names: gguf_names,
            rope,
            tensors: llama_tensor,
            config: |md| LlamaConfig::from_gguf(md).map(boxed),
        }),
    }
}

/// A Gemma row's kind (`gemma2.rs`): read as [`Gemma2Config`], stored in GGUF files named
/// `gguf_names` with Gemma's tensor names.
const fn gemma(gguf_names: &'static [&'static str]) -> Kind {
    Kind::Decoder {
        config: |raw| Gemma2Config::from_hf(raw).map(boxed),
        gguf: Some(GgufForm {
            names: gguf_names,
            rope: RopeStyle::Halves,
            tensors: gemma_tensor,
            config: |md| Gemma2Config::from_gguf(md).map(boxed),
        }),
    }
}

/// Every architecture we run (or, for encoders, embed with).
pub static ARCHITECTURES: &[Architecture] = &[
    Architecture {
        name: "Llama 2/3, SmolLM2",
        hf_classes: &["LlamaForCausalLM"],
        file: "llama.rs",
        special: "RMSNorm, RoPE (Llama 3.1 `llama3` frequency scaling), GQA, SwiGLU",
        kind: llama(&["llama"], RopeStyle::Interleaved),
    },
    Architecture {
        name: "Mistral",
        hf_classes: &["MistralForCausalLM"],
        file: "llama.rs",
        special: "sliding attention window (`sliding_window`)",
        kind: llama(&["llama"], RopeStyle::Interleaved),
    },
    Architecture {
        name: "Qwen2",
        hf_classes: &["Qwen2ForCausalLM"],
        file: "llama.rs",
        special: "Q/K/V biases; window only with `use_sliding_window`",
        kind: llama(&["qwen2"], RopeStyle::Halves),
    },
    Architecture {
        name: "Qwen3",
        hf_classes: &["Qwen3ForCausalLM"],
        file: "llama.rs",
        special: "per-head RMSNorm of queries and keys (`q_norm`, `k_norm`)",
        kind: llama(&["qwen3"], RopeStyle::Halves),
    },
    Architecture {
        name: "Phi-3",
        hf_classes: &["Phi3ForCausalLM"],
        file: "llama.rs",
        special: "fused `qkv_proj` / `gate_up_proj`, split after the product",
        kind: llama(&["phi3"], RopeStyle::Halves),
    },
    Architecture {
        name: "Gemma 2",
        hf_classes: &["Gemma2ForCausalLM"],
        file: "gemma2.rs",
        special: "`sqrt(hidden)`-scaled embeddings, `(1 + w)` RMSNorm, 4 norms per layer, tanh-GELU, \
                      attention and final-logit soft-capping, alternating sliding/global layers, \
                      `query_pre_attn_scalar`",
        kind: gemma(&["gemma2"]),
    },
    Architecture {
        name: "Gemma 3 (text)",
        hf_classes: &["Gemma3ForCausalLM"],
        file: "gemma2.rs",
        special: "Gemma 2's layout without soft-capping; 5 sliding : 1 global layers (`layer_types`, else \
                      `sliding_window_pattern` 6), `(1 + w)` Q/K norms per head, local layers rotated with \
                      `rope_local_base_freq` (10,000), global ones with `rope_theta` (1,000,000) and linear \
                      scaling",
        kind: gemma(&["gemma3"]),
    },
    Architecture {
        name: "Mixtral",
        hf_classes: &["MixtralForCausalLM"],
        file: "llama.rs",
        special: "mixture of experts: softmax router, top-2 of 8, weights renormalized",
        kind: llama(&["llama"], RopeStyle::Interleaved),
    },
    Architecture {
        name: "Qwen3 MoE",
        hf_classes: &["Qwen3MoeForCausalLM"],
        file: "llama.rs",
        special: "Qwen3 attention; top-k experts (`num_experts_per_tok`), renormalized when \
                      `norm_topk_prob`, `decoder_sparse_step` / `mlp_only_layers`",
        kind: llama(&["qwen3moe"], RopeStyle::Halves),
    },
    Architecture {
        name: "OPT",
        hf_classes: &["OPTForCausalLM"],
        file: "opt.rs",
        special: "learned positions (offset 2), pre- or post-LayerNorm, biased projections, ReLU",
        kind: Kind::Decoder { config: |raw| OptConfig::from_hf(raw).map(boxed), gguf: None },
    },
    Architecture {
        name: "GPT-2",
        hf_classes: &["GPT2LMHeadModel"],
        file: "gpt2.rs",
        special: "learned positions, `Conv1D` (`[in, out]`) weights, fused `c_attn`, tanh-GELU",
        kind: Kind::Decoder {
            config: |raw| Gpt2Config::from_hf(raw).map(boxed),
            gguf: Some(GgufForm {
                names: &["gpt2"],
                rope: RopeStyle::Halves,
                tensors: gpt2_tensor,
                config: |md| Gpt2Config::from_gguf(md).map(boxed),
            }),
        },
    },
    Architecture {
        name: "BERT (embeddings)",
        hf_classes: &["BertModel"],
        file: "bert.rs",
        special: "bidirectional encoder + sentence-transformers pooling (mean / CLS / max, normalize)",
        kind: Kind::Encoder { summary: |raw| Ok(BertConfig::from_hf(raw)?.summary()) },
    },
];

impl Architecture {
    /// Whether it is an encoder (embeddings) rather than a causal language model.
    pub fn is_encoder(&self) -> bool {
        matches!(self.kind, Kind::Encoder { .. })
    }

    /// Its GGUF form, if it has one.
    pub fn gguf(&self) -> Option<&GgufForm> {
        match &self.kind {
            Kind::Decoder { gguf, .. } => gguf.as_ref(),
            Kind::Encoder { .. } => None,
        }
    }
}

/// The row answering to a `config.json` class.
pub fn by_hf_class(class: &str) -> Option<&'static Architecture> {
    ARCHITECTURES.iter().find(|a| a.hf_classes.contains(&class))
}

/// The GGUF form of a `general.architecture` name (the first row listing it: rows sharing a
/// name load alike, e.g. `llama` for Llama, Mistral and Mixtral).
pub fn by_gguf_name(name: &str) -> Option<&'static GgufForm> {
    ARCHITECTURES.iter().filter_map(Architecture::gguf).find(|g| g.names.contains(&name))
}

/// The `config.json` classes of the causal language models ([`crate::load_hf_dir`]).
pub fn causal_classes() -> impl Iterator<Item = &'static str> {
    ARCHITECTURES.iter().filter(|a| !a.is_encoder()).flat_map(|a| a.hf_classes.iter().copied())
}

/// The `config.json` classes of the embedding models ([`crate::bert::BertEmbedder`]).
pub fn encoder_classes() -> impl Iterator<Item = &'static str> {
    ARCHITECTURES.iter().filter(|a| a.is_encoder()).flat_map(|a| a.hf_classes.iter().copied())
}

/// The GGUF architecture names [`crate::load_gguf`] reads, each once, in table order.
pub fn gguf_names() -> impl Iterator<Item = &'static str> {
    let all = || ARCHITECTURES.iter().filter_map(Architecture::gguf).flat_map(|g| g.names.iter().copied());
    all().enumerate().filter(move |&(i, name)| !all().take(i).any(|n| n == name)).map(|(_, name)| name)
}

/// Everything the loaders read, for "unsupported architecture" errors.
pub(crate) fn supported() -> String {
    format!(
        "GGUF: {}; config.json: {}",
        gguf_names().collect::<Vec<_>>().join(", "),
        causal_classes().collect::<Vec<_>>().join(", ")
    )
}

/// The architecture table of docs/models.md, in Markdown.
pub fn markdown_table() -> String {
    let code = |names: &[&str]| match names {
        [] => "—".to_string(),
        names => names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
    };
    let mut out = String::from("| models | `config.json` | GGUF | file | what is special |\n|---|---|---|---|---|\n");
    for a in ARCHITECTURES {
        let gguf = a.gguf().map_or(&[][..], |g| g.names);
        out += &format!("| {} | {} | {} | `{}` | {} |\n", a.name, code(a.hf_classes), code(gguf), a.file, a.special);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A class or a GGUF name means one thing: each class is in one row, and the rows sharing
    /// a GGUF name are read by the same model file in the same rotary order.
    #[test]
    fn names_are_unambiguous() {
        let classes: Vec<&str> = ARCHITECTURES.iter().flat_map(|a| a.hf_classes.iter().copied()).collect();
        for c in &classes {
            assert_eq!(classes.iter().filter(|x| *x == c).count(), 1, "{c}");
        }
        for name in gguf_names() {
            let rows: Vec<&Architecture> =
                ARCHITECTURES.iter().filter(|a| a.gguf().is_some_and(|g| g.names.contains(&name))).collect();
            let first = rows[0].gguf().map(|g| g.rope);
            for r in &rows {
                assert_eq!((r.file, r.gguf().map(|g| g.rope)), (rows[0].file, first), "{name}: {}", r.name);
            }
        }
        assert_eq!(
            gguf_names().collect::<Vec<_>>(),
            ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "qwen3moe", "gpt2"]
        );
        assert_eq!(encoder_classes().collect::<Vec<_>>(), ["BertModel"]);
        assert!(causal_classes().all(|c| c != "BertModel") && causal_classes().count() == classes.len() - 1);
        assert!(by_gguf_name("llama").is_some_and(|g| g.rope == RopeStyle::Interleaved));
        assert!(by_gguf_name("falcon").is_none() && by_hf_class("FalconForCausalLM").is_none());
    }

    /// docs/models.md holds exactly the table [`markdown_table`] renders, between its markers.
    /// `VLLM_UPDATE_MODEL_TABLE=1` rewrites it.
    #[test]
    fn docs_table_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/models.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let (start, end) = ("<!-- architectures:start -->\n", "<!-- architectures:end -->");
        let a = doc.find(start).expect("architectures start marker") + start.len();
        let b = doc.find(end).expect("architectures end marker");
        let table = markdown_table();
        if std::env::var("VLLM_UPDATE_MODEL_TABLE").is_ok_and(|v| v == "1") {
            std::fs::write(path, format!("{}{table}{}", &doc[..a], &doc[b..])).unwrap();
            return;
        }
        assert_eq!(
            &doc[a..b],
            table,
            "docs/models.md's architecture table is stale; VLLM_UPDATE_MODEL_TABLE=1 rewrites it"
        );
    }
}
