//! Guided decoding: constraining a request's output to a JSON schema, a regex, one of a list of
//! choices, any JSON object or a context-free grammar.
//!
//! Two backends sit behind one interface ([`GuideBackend`] compiles a [`Constraint`] into a
//! shared [`CompiledGuide`]; each sequence walks it with its own [`GuideState`]):
//! - `outlines` (`outlines-core`, vLLM's default for JSON, regex and choice): the constraint is
//!   turned into a regex and the regex into an automaton over the model's token bytes, built
//!   ahead of time (slow for big schemas, so the engine compiles it on another thread), after
//!   which masking is a table lookup;
//! - `guidance` (`llguidance`, the only one for grammars): an Earley parser over a Lark
//!   grammar with a lazy lexer, so compiling is cheap and each step's mask is computed by
//!   walking the token trie.
//!
//! Each step the sampler sets every token the constraint does not allow to `-inf`; EOS is
//! allowed only where the output so far is complete.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::ApproximateTokEnv;
use llguidance::{Matcher, ParserFactory};
use outlines_core::prelude::{Index, Vocabulary};

use crate::compile::GuideLimits;
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
    /// A context-free grammar in Lark syntax (llguidance's dialect: `start: ...` rules,
    /// `"strings"`, `/regexes/`, `|`, `*`, `+`, `?`, `{m,n}`); needs the `guidance` backend.
    pub grammar: Option<String>,
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    pub json_object: bool,
    /// The whitespace allowed between JSON tokens (default: the backend's).
    pub whitespace_pattern: Option<String>,
    /// `auto` (default: `guidance`), `guidance` (also spelled `llguidance`) or `outlines`.
    pub backend: Option<String>,
    /// Text after which the constraint starts: a reasoning model's end-of-thinking tag, set by
    /// the server's reasoning parser while the thinking is still open at the output's start
    /// (vLLM applies structured output after the reasoning). Not a request field.
    #[serde(skip)]
    pub starts_after: Option<String>,
}

fn invalid(param: &'static str, message: impl Into<String>) -> InvalidParam {
    InvalidParam { param, message: message.into() }
}

/// A JSON value of bounded nesting, for `json_object`.
const ANY_JSON_OBJECT: &str = r#"{"type": "object"}"#;

/// The guided-decoding backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuideBackendKind {
    /// `outlines-core`: regex automata compiled ahead of time.
    Outlines,
    /// `llguidance`: Earley parsing of Lark grammars (and JSON schemas, regexes), masks
    /// computed lazily.
    Guidance,
}

/// The backends' registry: each row the names a request or flag may use for it. `auto` is
/// llguidance: it compiles lazily under fuel and size limits, so a hostile schema or regex
/// costs a bounded amount, while outlines builds the whole automaton up front.
const BACKENDS: &[(&[&str], GuideBackendKind)] =
    &[(&["auto", "guidance", "llguidance"], GuideBackendKind::Guidance), (&["outlines"], GuideBackendKind::Outlines)];

impl GuideBackendKind {
    /// The name requests use (`guided_decoding_backend`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Outlines => "outlines",
            Self::Guidance => "guidance",
        }
    }

    /// The backend a name selects (`auto` included).
    pub fn from_name(name: &str) -> Option<Self> {
        BACKENDS.iter().find(|(names, _)| names.contains(&name)).map(|&(_, kind)| kind)
    }

    /// Every name a request or flag may use.
    pub fn names() -> impl Iterator<Item = &'static str> {
        BACKENDS.iter().flat_map(|(names, _)| names.iter().copied())
    }
}

/// A checked constraint for one backend: what it compiles, and the cache key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Constraint {
    /// The request field it came from (named in errors).
    pub param: &'static str,
    /// The backend that compiles it.
    pub backend: GuideBackendKind,
    /// A regex (outlines) or a serialized llguidance grammar (guidance).
    pub spec: String,
}

impl GuidedDecodingParams {
    /// The constraint, checked, for the backend the request asks for.
    pub fn constraint(&self) -> Result<Constraint, InvalidParam> {
        self.check_one()?;
        let backend = match self.backend.as_deref() {
            None => GuideBackendKind::Guidance,
            Some(name) => GuideBackendKind::from_name(name).ok_or_else(|| {
                invalid(
                    "guided_decoding_backend",
                    format!(
                        "'{name}' is not available (choose {})",
                        GuideBackendKind::names().collect::<Vec<_>>().join(", ")
                    ),
                )
            })?,
        };
        let spec = match backend {
            GuideBackendKind::Outlines => self.to_regex()?,
            GuideBackendKind::Guidance => self.to_guidance()?,
        };
        Ok(Constraint { param: self.param(), backend, spec })
    }

    /// The request field the constraint came from.
    pub fn param(&self) -> &'static str {
        if self.json_object {
            "json_object"
        } else if self.json.is_some() {
            "guided_json"
        } else if self.regex.is_some() {
            "guided_regex"
        } else if self.choice.is_some() {
            "guided_choice"
        } else if self.grammar.is_some() {
            "guided_grammar"
        } else {
            "guided_decoding"
        }
    }

    /// Cheap checks that need no compilation: exactly one constraint, each within
    /// `max_bytes` of text.
    pub fn check_shape(&self, max_bytes: usize) -> Result<(), InvalidParam> {
        self.check_one()?;
        let size = match (&self.json, &self.regex, &self.choice, &self.grammar) {
            (Some(j), _, _, _) => j.to_string().len(),
            (_, Some(r), _, _) => r.len(),
            (_, _, Some(c), _) => c.iter().map(|s| s.len() + 1).sum(),
            (_, _, _, Some(g)) => g.len(),
            _ => 0,
        } + self.whitespace_pattern.as_ref().map_or(0, String::len);
        if size > max_bytes {
            return Err(invalid(self.param(), format!("the constraint has {size} bytes; the limit is {max_bytes}")));
        }
        Ok(())
    }

    fn check_one(&self) -> Result<(), InvalidParam> {
        let set = [
            self.json.is_some(),
            self.regex.is_some(),
            self.choice.is_some(),
            self.grammar.is_some(),
            self.json_object,
        ];
        match set.iter().filter(|&&b| b).count() {
            0 => Err(invalid("guided_decoding", "no constraint given (json, regex, choice, grammar or json_object)")),
            1 => Ok(()),
            _ => Err(invalid(
                "guided_decoding",
                "give exactly one of guided_json, guided_regex, guided_choice, guided_grammar, json_object",
            )),
        }
    }

    fn schema(&self) -> Result<Option<serde_json::Value>, InvalidParam> {
        Ok(match &self.json {
            Some(serde_json::Value::String(s)) => {
                Some(serde_json::from_str(s).map_err(|e| invalid("guided_json", format!("not a JSON schema: {e}")))?)
            }
            Some(v) => Some(v.clone()),
            None if self.json_object => Some(serde_json::from_str(ANY_JSON_OBJECT).expect("valid schema")),
            None => None,
        })
    }

    fn choice_regex(&self) -> Result<Option<String>, InvalidParam> {
        match &self.choice {
            Some(choices) if choices.is_empty() => Err(invalid("guided_choice", "the list of choices is empty")),
            Some(choices) => Ok(Some(choices.iter().map(|c| regex_syntax::escape(c)).collect::<Vec<_>>().join("|"))),
            None => Ok(None),
        }
    }

    fn check_regex(&self, regex: &str) -> Result<(), InvalidParam> {
        regex_syntax::Parser::new().parse(regex).map(|_| ()).map_err(|e| {
            invalid(
                if self.regex.is_some() { "guided_regex" } else { "guided_decoding" },
                format!("invalid regex: {e}"),
            )
        })
    }

    /// The constraint as a regex over the output text (the `outlines` backend), checking it
    /// on the way.
    pub fn to_regex(&self) -> Result<String, InvalidParam> {
        self.check_one()?;
        let ws = self.whitespace_pattern.as_deref();
        let regex = if let Some(schema) = self.schema()? {
            let depth = self.json_object.then_some(3);
            let param = if self.json_object { "json_object" } else { "guided_json" };
            outlines_core::json_schema::regex_from_value(&schema, ws, depth)
                .map_err(|e| invalid(param, format!("unsupported or invalid JSON schema: {e}")))?
        } else if let Some(r) = &self.regex {
            r.clone()
        } else if let Some(r) = self.choice_regex()? {
            r
        } else {
            return Err(invalid(
                "guided_grammar",
                "grammars need the guidance backend (guided_decoding_backend: guidance or auto)",
            ));
        };
        self.check_regex(&regex)?;
        Ok(regex)
    }

    /// The constraint as a serialized llguidance grammar (the `guidance` backend), checked by
    /// building its parser over a byte-level vocabulary (grammar errors do not depend on the
    /// model's tokenizer).
    fn to_guidance(&self) -> Result<String, InvalidParam> {
        let (param, grammar) = if let Some(mut schema) = self.schema()? {
            // Objects are closed unless the schema says otherwise (xgrammar's strict mode, vLLM's
            // default backend; outlines did the same): an open object lets a sampled model add
            // properties until max_tokens.
            if !self.json_object {
                close_objects(&mut schema);
            }
            // Without a pattern, JSON is written with Python's separators and no other
            // whitespace (as outlines did): flexible whitespace lets a sampled model wander
            // into runs of newlines until max_tokens.
            let opts = match &self.whitespace_pattern {
                Some(ws) => serde_json::json!({ "whitespace_pattern": ws }),
                None => {
                    serde_json::json!({ "whitespace_flexible": false, "item_separator": ", ", "key_separator": ": " })
                }
            };
            if let Some(obj) = schema.as_object_mut() {
                obj.insert("x-guidance".into(), opts);
            }
            (if self.json_object { "json_object" } else { "guided_json" }, TopLevelGrammar::from_json_schema(schema))
        } else if let Some(r) = &self.regex {
            self.check_regex(r)?;
            ("guided_regex", TopLevelGrammar::from_regex(r))
        } else if let Some(r) = self.choice_regex()? {
            ("guided_choice", TopLevelGrammar::from_regex(&r))
        } else {
            let g = self.grammar.as_deref().unwrap_or_default();
            if g.trim().is_empty() {
                return Err(invalid("guided_grammar", "the grammar is empty"));
            }
            ("guided_grammar", TopLevelGrammar::from_lark(g.to_string()))
        };
        static CHECKER: OnceLock<ParserFactory> = OnceLock::new();
        let checker = CHECKER.get_or_init(|| {
            let mut f = ParserFactory::new_simple(&ApproximateTokEnv::single_byte_env()).expect("byte-level factory");
            f.quiet();
            *f.limits_mut() = GuideLimits::default().parser_limits();
            f
        });
        checker.create_parser(grammar.clone()).map_err(|e| invalid(param, format!("invalid constraint: {e}")))?;
        Ok(serde_json::to_string(&grammar).expect("grammars serialize"))
    }
}

/// Sets `additionalProperties: false` on every object schema with `properties` that does not
/// say whether other properties are allowed.
fn close_objects(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            if o.contains_key("properties") && !o.contains_key("additionalProperties") {
                o.insert("additionalProperties".into(), serde_json::Value::Bool(false));
            }
            o.values_mut().for_each(close_objects);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// A guided-decoding backend over one tokenizer's vocabulary.
pub trait GuideBackend: Send + Sync {
    /// Compiles a constraint's spec ([`Constraint::spec`]). May be slow: call it off the
    /// engine loop.
    fn compile(&self, spec: &str) -> Result<Arc<dyn CompiledGuide>, String>;
}

/// A compiled constraint, shared by every sequence that uses it.
pub trait CompiledGuide: Send + Sync {
    /// A sequence's state at the start of the output.
    fn start(&self) -> Box<dyn GuideState>;
    /// Roughly how many bytes it holds (what the compile cache charges for it).
    fn memory_bytes(&self) -> usize;
}

/// One sequence's position in a compiled constraint.
pub trait GuideState: Send {
    /// Sets every token not allowed next to `-inf` (EOS is allowed only where the output is
    /// complete).
    fn mask(&mut self, logits: &mut [f32]);
    /// Follows a sampled token.
    fn advance(&mut self, token: u32);
    /// Whether the output so far is complete.
    fn is_accepting(&mut self) -> bool;
    /// An independent copy (parallel samples fork their state).
    fn boxed_clone(&self) -> Box<dyn GuideState>;
}

/// Keeps only `allowed` entries of `logits`.
fn keep_only(logits: &mut [f32], allowed: impl Iterator<Item = u32>) {
    let keep: Vec<(u32, f32)> =
        allowed.filter(|&t| (t as usize) < logits.len()).map(|t| (t, logits[t as usize])).collect();
    logits.fill(f32::NEG_INFINITY);
    for (t, v) in keep {
        logits[t as usize] = v;
    }
}

/// The `outlines-core` backend.
pub(crate) struct OutlinesBackend {
    pub(crate) vocabulary: Vocabulary,
    pub(crate) vocab_size: usize,
    pub(crate) limits: GuideLimits,
}

impl GuideBackend for OutlinesBackend {
    fn compile(&self, regex: &str) -> Result<Arc<dyn CompiledGuide>, String> {
        // outlines-core determinizes the regex with no size limit and then walks every DFA
        // state against the whole vocabulary: build the DFA here first, under a size limit,
        // and refuse automata whose token index could outgrow the memory budget.
        let config = regex_automata::dfa::dense::Config::new()
            .dfa_size_limit(Some(self.limits.max_dfa_bytes))
            .determinize_size_limit(Some(self.limits.max_dfa_bytes));
        let dfa = regex_automata::dfa::dense::Builder::new()
            .configure(config)
            .build(regex)
            .map_err(|e| format!("the automaton is too large for the outlines backend ({e}); use guidance"))?;
        let states = dfa.memory_usage() / (dfa.alphabet_len().max(1) * std::mem::size_of::<u32>());
        let estimate = states.saturating_mul(self.vocab_size).saturating_mul(8);
        if estimate > self.limits.max_index_bytes {
            return Err(format!(
                "the outlines token index would take about {} MiB ({states} automaton states x {} tokens), over \
                 the {} MiB limit; use the guidance backend",
                estimate >> 20,
                self.vocab_size,
                self.limits.max_index_bytes >> 20
            ));
        }
        drop(dfa);
        let index = Index::new(regex, &self.vocabulary).map_err(|e| e.to_string())?;
        let bytes = index.transitions().values().map(|m| 48 + m.len() * 12).sum::<usize>() + 4096;
        Ok(Arc::new(OutlinesGuide(Arc::new(index), bytes)))
    }
}

struct OutlinesGuide(Arc<Index>, usize);

impl CompiledGuide for OutlinesGuide {
    fn start(&self) -> Box<dyn GuideState> {
        Box::new(OutlinesState { state: self.0.initial_state(), index: self.0.clone() })
    }

    fn memory_bytes(&self) -> usize {
        self.1
    }
}

#[derive(Clone)]
struct OutlinesState {
    index: Arc<Index>,
    state: u32,
}

impl GuideState for OutlinesState {
    fn mask(&mut self, logits: &mut [f32]) {
        if let Some(allowed) = self.index.allowed_tokens_iter(&self.state) {
            keep_only(logits, allowed.copied());
        }
    }

    fn advance(&mut self, token: u32) {
        if let Some(s) = self.index.next_state(&self.state, &token) {
            self.state = s;
        }
    }

    fn is_accepting(&mut self) -> bool {
        self.index.is_final_state(&self.state)
    }

    fn boxed_clone(&self) -> Box<dyn GuideState> {
        Box::new(self.clone())
    }
}

/// The `llguidance` backend.
pub(crate) struct GuidanceBackend {
    pub(crate) factory: ParserFactory,
    pub(crate) eos: u32,
}

impl GuideBackend for GuidanceBackend {
    fn compile(&self, spec: &str) -> Result<Arc<dyn CompiledGuide>, String> {
        let grammar: TopLevelGrammar = serde_json::from_str(spec).map_err(|e| e.to_string())?;
        let parser = self.factory.create_parser(grammar).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        // The lexer grows lazily, bounded by `max_lexer_states` (1-2 kB each); charge the
        // grammar's size and a fixed share for it.
        let bytes = spec.len() * 8 + (1 << 20);
        Ok(Arc::new(GuidanceGuide { start: Mutex::new(matcher), eos: self.eos, bytes }))
    }
}

struct GuidanceGuide {
    start: Mutex<Matcher>,
    eos: u32,
    bytes: usize,
}

impl CompiledGuide for GuidanceGuide {
    fn start(&self) -> Box<dyn GuideState> {
        let matcher = self.start.lock().unwrap_or_else(|p| p.into_inner()).deep_clone();
        Box::new(GuidanceState { matcher, eos: self.eos })
    }

    fn memory_bytes(&self) -> usize {
        self.bytes
    }
}

struct GuidanceState {
    matcher: Matcher,
    eos: u32,
}

impl GuideState for GuidanceState {
    fn mask(&mut self, logits: &mut [f32]) {
        match self.matcher.compute_mask_or_eos() {
            Ok(allowed) => {
                let n = allowed.len().min(logits.len());
                allowed.iter_unset_entries(|i| {
                    if i < n {
                        logits[i] = f32::NEG_INFINITY;
                    }
                });
                logits[n..].fill(f32::NEG_INFINITY);
            }
            // The parser failed (for instance it ran out of its step budget): end the output.
            Err(_) => keep_only(logits, std::iter::once(self.eos)),
        }
    }

    fn advance(&mut self, token: u32) {
        // A token outside the mask (only EOS once stopped) leaves the parser in its error
        // state, where the mask allows only EOS.
        let _ = self.matcher.consume_token(token);
    }

    fn is_accepting(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }

    fn boxed_clone(&self) -> Box<dyn GuideState> {
        Box::new(GuidanceState { matcher: self.matcher.deep_clone(), eos: self.eos })
    }
}

/// One sequence's walk through a compiled constraint.
pub struct Guide(Box<dyn GuideState>);

impl Guide {
    /// At the start of the output.
    pub fn new(compiled: &Arc<dyn CompiledGuide>) -> Self {
        Self(compiled.start())
    }

    /// Sets every token the constraint does not allow now to `-inf`.
    pub fn mask(&mut self, logits: &mut [f32]) {
        self.0.mask(logits)
    }

    /// Follows a sampled token.
    pub fn advance(&mut self, token: u32) {
        self.0.advance(token)
    }

    /// Whether the output so far is complete.
    pub fn is_accepting(&mut self) -> bool {
        self.0.is_accepting()
    }
}

impl Clone for Guide {
    fn clone(&self) -> Self {
        Self(self.0.boxed_clone())
    }
}

impl fmt::Debug for Guide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Guide")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuideCompiler;

    /// A byte-level vocabulary: token `b` is byte `b`, EOS is 256.
    fn bytes_compiler() -> GuideCompiler {
        GuideCompiler::new((0..=255u32).map(|b| (b, vec![b as u8])), 256)
    }

    fn allowed(g: &mut Guide) -> Vec<u32> {
        let mut row = vec![0.0f32; 257];
        g.mask(&mut row);
        (0..257).filter(|&t| row[t as usize].is_finite()).collect()
    }

    #[test]
    fn both_backends_mask_and_end_only_when_complete() {
        let compiler = bytes_compiler();
        for backend in ["outlines", "guidance"] {
            let p = GuidedDecodingParams {
                regex: Some("a[0-9]{1,2}".into()),
                backend: Some(backend.into()),
                ..Default::default()
            };
            let c = p.constraint().unwrap();
            assert_eq!(c.backend.name(), backend);
            let mut g = Guide::new(&compiler.compile(&c).unwrap());
            assert_eq!(allowed(&mut g), vec![b'a' as u32], "{backend}");
            g.advance(b'a' as u32);
            assert!(!g.is_accepting());
            assert_eq!(allowed(&mut g), (b'0' as u32..=b'9' as u32).collect::<Vec<_>>(), "{backend}: no EOS yet");
            g.advance(b'7' as u32);
            assert!(g.is_accepting());
            let mut fork = g.clone();
            let a = allowed(&mut fork);
            assert!(a.contains(&256) && a.contains(&(b'3' as u32)) && a.len() == 11, "{backend}: {a:?}");
            fork.advance(b'3' as u32);
            assert_eq!(allowed(&mut fork), vec![256], "{backend}: only EOS after two digits");
            assert_eq!(allowed(&mut g).len(), 11, "{backend}: the fork is independent");
            assert!(compiler.cached(&c).is_some());
        }
    }

    #[test]
    fn lark_grammars_go_to_guidance_and_nest() {
        let compiler = bytes_compiler();
        let grammar = "start: expr\nexpr: \"(\" expr \")\" | \"x\"";
        let c = GuidedDecodingParams { grammar: Some(grammar.into()), ..Default::default() }.constraint().unwrap();
        assert_eq!(c.backend, GuideBackendKind::Guidance);
        let mut g = Guide::new(&compiler.compile(&c).unwrap());
        // A context-free language: after three '(' only '(' or 'x', then exactly three ')'.
        for b in b"(((x" {
            assert!(allowed(&mut g).contains(&(*b as u32)));
            g.advance(*b as u32);
        }
        for _ in 0..3 {
            assert_eq!(allowed(&mut g), vec![b')' as u32]);
            g.advance(b')' as u32);
        }
        assert_eq!(allowed(&mut g), vec![256]);
        assert!(g.is_accepting());
    }

    #[test]
    fn bad_grammars_and_backends_are_named() {
        let err = |p: GuidedDecodingParams| p.constraint().unwrap_err();
        let e = err(GuidedDecodingParams { grammar: Some("start: undefined_rule".into()), ..Default::default() });
        assert_eq!(e.param, "guided_grammar");
        assert!(e.message.contains("undefined_rule"), "{}", e.message);
        let e = err(GuidedDecodingParams { grammar: Some("  ".into()), ..Default::default() });
        assert_eq!(e.param, "guided_grammar");
        let e = err(GuidedDecodingParams {
            grammar: Some("start: \"a\"".into()),
            backend: Some("outlines".into()),
            ..Default::default()
        });
        assert_eq!(e.param, "guided_grammar");
        let e = err(GuidedDecodingParams {
            regex: Some("a".into()),
            backend: Some("xgrammar".into()),
            ..Default::default()
        });
        assert_eq!(e.param, "guided_decoding_backend");
        let e = err(GuidedDecodingParams {
            regex: Some("(a".into()),
            backend: Some("guidance".into()),
            ..Default::default()
        });
        assert_eq!(e.param, "guided_regex");
        let e = err(GuidedDecodingParams {
            json: Some(serde_json::json!({"type": "no-such-type"})),
            backend: Some("guidance".into()),
            ..Default::default()
        });
        assert_eq!(e.param, "guided_json");
    }
}
