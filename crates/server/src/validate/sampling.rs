//! A request's sampling fields as engine parameters: every spelling of a constraint
//! (`guided_*`, `response_format`, `structured_outputs`) folded into one, and beam search's
//! own parameters.

use std::collections::BTreeMap;

use serde_json::Value;
use vllm_engine::{BeamSearchParams, EarlyStopping, GuidedDecodingParams, SamplingParams};

use crate::error::ApiError;
use crate::protocol::SamplingFields;

/// `response_format` as a constraint.
fn response_format(format: &Value) -> Result<Option<GuidedDecodingParams>, ApiError> {
    match format.get("type").and_then(|t| t.as_str()) {
        None if format.is_null() => Ok(None),
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(GuidedDecodingParams { json_object: true, ..Default::default() })),
        Some("json_schema") => {
            let schema = format.pointer("/json_schema/schema").cloned().ok_or_else(|| {
                ApiError::invalid_param("response_format", "json_schema needs response_format.json_schema.schema")
            })?;
            Ok(Some(GuidedDecodingParams { json: Some(schema), ..Default::default() }))
        }
        Some(other) => Err(ApiError::invalid_param(
            "response_format",
            format!("type '{other}' (choose text, json_object or json_schema)"),
        )),
        None => Err(ApiError::invalid_param("response_format", "response_format needs a 'type'")),
    }
}

/// vLLM's `structured_outputs` object as a constraint.
fn structured_outputs(v: &Value) -> Result<Option<GuidedDecodingParams>, ApiError> {
    let bad = |m: &str| ApiError::invalid_param("structured_outputs", m.to_string());
    let Some(o) = v.as_object() else {
        return if v.is_null() { Ok(None) } else { Err(bad("structured_outputs must be an object")) };
    };
    for (k, val) in o {
        match k.as_str() {
            "json" | "regex" | "choice" | "grammar" | "json_object" | "whitespace_pattern" | "backend" => {}
            "disable_any_whitespace" | "disable_additional_properties" | "disable_fallback" => {
                if val.as_bool() == Some(true) {
                    return Err(ApiError::unsupported("structured_outputs", &format!("with {k}")));
                }
            }
            "structural_tag" if !val.is_null() => {
                return Err(ApiError::unsupported("structured_outputs", "with structural_tag"))
            }
            _ if val.is_null() => {}
            _ => return Err(bad(&format!("unknown field '{k}'"))),
        }
    }
    let str_field = |k: &str| -> Result<Option<String>, ApiError> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(&format!("{k} must be a string"))),
        }
    };
    let choice = match o.get("choice") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| x.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("choice must be a list of strings"))?,
        ),
        Some(_) => return Err(bad("choice must be a list of strings")),
    };
    Ok(Some(GuidedDecodingParams {
        json: o.get("json").filter(|j| !j.is_null()).cloned(),
        regex: str_field("regex")?,
        choice,
        grammar: str_field("grammar")?,
        json_object: o.get("json_object").and_then(|b| b.as_bool()).unwrap_or(false),
        whitespace_pattern: str_field("whitespace_pattern")?,
        backend: str_field("backend")?,
        ..Default::default()
    }))
}

/// vLLM's beam search parameters when `use_beam_search` is set: `n` beams (all returned),
/// `max_tokens`, `ignore_eos`, `length_penalty`, `early_stopping`; `None` otherwise (and then
/// the beam-only fields must be left at their defaults).
pub(crate) fn beam_params(f: &SamplingFields, params: &SamplingParams) -> Result<Option<BeamSearchParams>, ApiError> {
    if f.use_beam_search != Some(true) {
        let lp = f.length_penalty.is_some_and(|x| (x - 1.0).abs() > f32::EPSILON);
        if lp || f.early_stopping.as_ref().is_some_and(|v| !v.is_null() && v != &Value::Bool(false)) {
            let name = if lp { "length_penalty" } else { "early_stopping" };
            return Err(ApiError::invalid_param(name, format!("{name} needs use_beam_search")));
        }
        return Ok(None);
    }
    let early_stopping = match &f.early_stopping {
        None | Some(Value::Null) | Some(Value::Bool(false)) => EarlyStopping::Heuristic,
        Some(Value::Bool(true)) => EarlyStopping::Finished,
        Some(Value::String(s)) if s == "never" => EarlyStopping::Never,
        Some(_) => return Err(ApiError::invalid_param("early_stopping", "must be true, false or \"never\"")),
    };
    Ok(Some(BeamSearchParams {
        beam_width: params.n,
        max_tokens: params.max_tokens.unwrap_or(super::DEFAULT_MAX_TOKENS),
        ignore_eos: params.ignore_eos,
        temperature: f.temperature.unwrap_or(0.0),
        length_penalty: f.length_penalty.unwrap_or(1.0),
        early_stopping,
    }))
}

/// The engine parameters of a request's sampling fields; `max_tokens` falls back to
/// `default_max_tokens`. Value ranges are checked by the engine (`SamplingParams::validate`),
/// which names the parameter.
pub(crate) fn sampling_params(
    f: &SamplingFields,
    default_max_tokens: Option<usize>,
) -> Result<SamplingParams, ApiError> {
    let strings = |name: &str, v: &Option<Value>| -> Result<Vec<String>, ApiError> {
        match v {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => {
                a.iter().map(|x| x.as_str().map(String::from)).collect::<Option<Vec<_>>>().ok_or_else(|| {
                    ApiError::invalid_param(name, format!("{name} must be a string or a list of strings"))
                })
            }
            Some(_) => Err(ApiError::invalid_param(name, format!("{name} must be a string or a list of strings"))),
        }
    };
    let uint = |name: &str, v: &Option<Value>| -> Result<Option<usize>, ApiError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| ApiError::invalid_param(name, format!("{name} must be a non-negative integer"))),
        }
    };
    let mut logit_bias = BTreeMap::new();
    match &f.logit_bias {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            for (k, v) in o {
                let (Ok(t), Some(b)) = (k.parse::<u32>(), v.as_f64()) else {
                    return Err(ApiError::invalid_param("logit_bias", "logit_bias maps token ids to numbers"));
                };
                logit_bias.insert(t, b as f32);
            }
        }
        Some(_) => return Err(ApiError::invalid_param("logit_bias", "logit_bias maps token ids to numbers")),
    }
    let allowed_token_ids = match &f.allowed_token_ids {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                .collect::<Option<Vec<u32>>>()
                .ok_or_else(|| ApiError::invalid_param("allowed_token_ids", "must be a list of token ids"))?,
        ),
        Some(_) => return Err(ApiError::invalid_param("allowed_token_ids", "must be a list of token ids")),
    };
    if f.priority.is_some_and(|p| p != 0) {
        return Err(ApiError::unsupported("priority", "(this feature)"));
    }
    let guided_choice = match &f.guided_choice {
        None | Some(Value::Null) => None,
        v => Some(strings("guided_choice", v)?),
    };
    let guided = GuidedDecodingParams {
        json: f.guided_json.clone().filter(|v| !v.is_null()),
        regex: f.guided_regex.clone(),
        choice: guided_choice,
        grammar: f.guided_grammar.clone(),
        json_object: false,
        whitespace_pattern: f.guided_whitespace_pattern.clone(),
        backend: f.guided_decoding_backend.clone(),
        ..Default::default()
    };
    let any = guided.json.is_some() || guided.regex.is_some() || guided.choice.is_some() || guided.grammar.is_some();
    // One constraint, from whichever spelling the client used.
    let mut constraints: Vec<(&str, GuidedDecodingParams)> = Vec::new();
    if any {
        constraints.push(("guided_decoding", guided));
    }
    if let Some(g) = f.response_format.as_ref().map(response_format).transpose()?.flatten() {
        constraints.push(("response_format", g));
    }
    if let Some(g) = f.structured_outputs.as_ref().map(structured_outputs).transpose()?.flatten() {
        constraints.push(("structured_outputs", g));
    }
    if constraints.len() > 1 {
        return Err(ApiError::invalid_param(
            constraints[1].0,
            format!("{} and {} cannot be combined: give one constraint", constraints[0].0, constraints[1].0),
        ));
    }
    let guided_decoding = constraints.pop().map(|(_, mut g)| {
        if g.backend.is_none() {
            g.backend = f.guided_decoding_backend.clone();
        }
        if g.whitespace_pattern.is_none() {
            g.whitespace_pattern = f.guided_whitespace_pattern.clone();
        }
        g
    });
    let d = SamplingParams::default();
    Ok(SamplingParams {
        n: f.n.unwrap_or(1),
        best_of: f.best_of,
        logprobs: None,
        temperature: f.temperature.unwrap_or(d.temperature),
        top_p: f.top_p.unwrap_or(d.top_p),
        top_k: f.top_k.unwrap_or(d.top_k),
        min_p: f.min_p.unwrap_or(d.min_p),
        seed: f.seed.map(|s| s as u64),
        max_tokens: f.max_tokens.or(default_max_tokens),
        min_tokens: f.min_tokens.unwrap_or(0),
        ignore_eos: f.ignore_eos.unwrap_or(false),
        stop_token_ids: f.stop_token_ids.clone().unwrap_or_default(),
        skip_special_tokens: f.skip_special_tokens.unwrap_or(true),
        cache_salt: f.cache_salt.clone(),
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
        repetition_penalty: f.repetition_penalty.unwrap_or(1.0),
        stop: strings("stop", &f.stop)?,
        include_stop_str_in_output: f.include_stop_str_in_output.unwrap_or(false),
        prompt_logprobs: uint("prompt_logprobs", &f.prompt_logprobs)?,
        spaces_between_special_tokens: f.spaces_between_special_tokens.unwrap_or(true),
        truncate_prompt_tokens: uint("truncate_prompt_tokens", &f.truncate_prompt_tokens)?,
        allowed_token_ids,
        logit_bias,
        bad_words: strings("bad_words", &f.bad_words)?,
        detokenize: true,
        output_kind: Default::default(),
        guided_decoding,
    })
}
