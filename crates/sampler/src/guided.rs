//! Guided decoding: constraining a request's output to a JSON schema, a regex, one of a list of
//! choices or any JSON object, with `outlines-core` (vLLM's default backend). The constraint is
//! turned into a regex, the regex into an automaton over the model's token bytes (an
//! [`Index`]: per state, the tokens allowed and where each leads), and each step the sampler
//! masks every other token; EOS is allowed only in accepting states.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use outlines_core::prelude::{Index, Vocabulary};
use serde::{Deserialize, Serialize};

use crate::params::InvalidParam;

/// vLLM's `GuidedDecodingParams`: exactly one constraint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuidedDecodingParams {
    /// A JSON schema the output must be valid under.
    pub json: Option<serde_json::Value>,
    /// A regex the whole output must match.
    pub regex: Option<String>,
    /// The output must be one of these strings.
    pub choice: Option<Vec<String>>,
    /// A context-free grammar (EBNF / Lark). Not supported yet: rejected with a clear error.
    pub grammar: Option<String>,
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    pub json_object: bool,
    /// The whitespace allowed between JSON tokens (default: outlines-core's).
    pub whitespace_pattern: Option<String>,
    /// `outlines` (or `auto`, the same); other backends are rejected.
    pub backend: Option<String>,
}

fn invalid(param: &'static str, message: impl Into<String>) -> InvalidParam {
    InvalidParam { param, message: message.into() }
}

/// A JSON value of bounded nesting, for `json_object`.
const ANY_JSON_OBJECT: &str = r#"{"type": "object"}"#;

impl GuidedDecodingParams {
    /// The constraint as a regex over the output text, checking it on the way.
    pub fn to_regex(&self) -> Result<String, InvalidParam> {
        let set = [
            self.json.is_some(),
            self.regex.is_some(),
            self.choice.is_some(),
            self.grammar.is_some(),
            self.json_object,
        ];
        match set.iter().filter(|&&b| b).count() {
            0 => {
                return Err(invalid(
                    "guided_decoding",
                    "no constraint given (json, regex, choice, grammar or json_object)",
                ))
            }
            1 => {}
            _ => {
                return Err(invalid(
                    "guided_decoding",
                    "give exactly one of guided_json, guided_regex, guided_choice, guided_grammar, json_object",
                ))
            }
        }
        match self.backend.as_deref() {
            None | Some("outlines") | Some("auto") => {}
            Some(other) => {
                return Err(invalid("guided_decoding_backend", format!("'{other}' (choose outlines or auto)")))
            }
        }
        let ws = self.whitespace_pattern.as_deref();
        let regex = if let Some(schema) = &self.json {
            let schema = match schema {
                serde_json::Value::String(s) => {
                    serde_json::from_str(s).map_err(|e| invalid("guided_json", format!("not a JSON schema: {e}")))?
                }
                v => v.clone(),
            };
            outlines_core::json_schema::regex_from_value(&schema, ws, None)
                .map_err(|e| invalid("guided_json", format!("unsupported or invalid JSON schema: {e}")))?
        } else if let Some(r) = &self.regex {
            r.clone()
        } else if let Some(choices) = &self.choice {
            if choices.is_empty() {
                return Err(invalid("guided_choice", "the list of choices is empty"));
            }
            choices.iter().map(|c| regex_syntax::escape(c)).collect::<Vec<_>>().join("|")
        } else if self.json_object {
            let schema: serde_json::Value = serde_json::from_str(ANY_JSON_OBJECT).expect("valid schema");
            outlines_core::json_schema::regex_from_value(&schema, ws, Some(3))
                .map_err(|e| invalid("json_object", e.to_string()))?
        } else {
            return Err(invalid(
                "guided_grammar",
                "grammars are not supported yet (no CFG backend); use guided_json, guided_regex or guided_choice",
            ));
        };
        regex_syntax::Parser::new().parse(&regex).map_err(|e| {
            invalid(
                if self.regex.is_some() { "guided_regex" } else { "guided_decoding" },
                format!("invalid regex: {e}"),
            )
        })?;
        Ok(regex)
    }
}

/// Compiles constraints into automata over one tokenizer's vocabulary and caches them by
/// regex. Cheap to clone (shared).
#[derive(Clone)]
pub struct GuideCompiler {
    vocabulary: Arc<Vocabulary>,
    cache: Arc<Mutex<HashMap<String, Arc<Index>>>>,
}

impl GuideCompiler {
    /// A compiler over `tokens` (id and raw bytes of every text token) with `eos` as the end.
    pub fn new(tokens: impl IntoIterator<Item = (u32, Vec<u8>)>, eos: u32) -> Self {
        let mut vocabulary = Vocabulary::new(eos);
        for (id, bytes) in tokens {
            if id != eos && !bytes.is_empty() {
                let _ = vocabulary.try_insert(bytes, id);
            }
        }
        Self { vocabulary: Arc::new(vocabulary), cache: Arc::default() }
    }

    /// The cached automaton for `regex`, if it was compiled already.
    pub fn cached(&self, regex: &str) -> Option<Arc<Index>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(regex).cloned()
    }

    /// Compiles (or fetches) the automaton for `regex`. Slow for big schemas: call it off the
    /// engine loop.
    pub fn compile(&self, regex: &str) -> Result<Arc<Index>, String> {
        if let Some(i) = self.cached(regex) {
            return Ok(i);
        }
        let index = Arc::new(Index::new(regex, &self.vocabulary).map_err(|e| e.to_string())?);
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(regex.to_string(), index.clone());
        Ok(index)
    }
}

/// One sequence's position in its automaton.
#[derive(Debug, Clone)]
pub struct Guide {
    index: Arc<Index>,
    state: u32,
}

impl Guide {
    /// At the automaton's start.
    pub fn new(index: Arc<Index>) -> Self {
        let state = index.initial_state();
        Self { index, state }
    }

    /// Sets every token the automaton does not allow now to `-inf`.
    pub fn mask(&self, logits: &mut [f32]) {
        let Some(allowed) = self.index.allowed_tokens_iter(&self.state) else {
            return;
        };
        let keep: Vec<(u32, f32)> =
            allowed.filter(|&&t| (t as usize) < logits.len()).map(|&t| (t, logits[t as usize])).collect();
        logits.fill(f32::NEG_INFINITY);
        for (t, v) in keep {
            logits[t as usize] = v;
        }
    }

    /// Follows a sampled token.
    pub fn advance(&mut self, token: u32) {
        if let Some(s) = self.index.next_state(&self.state, &token) {
            self.state = s;
        }
    }

    /// Whether the text so far is a complete match.
    pub fn is_accepting(&self) -> bool {
        self.index.is_final_state(&self.state)
    }
}
