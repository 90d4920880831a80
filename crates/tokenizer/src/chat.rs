//! Chat templates: the model's Jinja template rendered with `minijinja` the way Hugging Face
//! `apply_chat_template` does (`trim_blocks`, `lstrip_blocks`, `raise_exception`, `tojson`,
//! `strftime_now`, Python string methods through minijinja-contrib's pycompat), after the
//! messages are normalized the way vLLM does (`messages.rs`) for the content format the
//! template reads (`format.rs`).

mod format;
mod messages;

pub use format::ContentFormat;
pub use messages::normalize_messages;

use minijinja::value::Kwargs;
use minijinja::value::ValueKind;
use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;

use crate::{Error, Result};

/// What to render.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest<'a> {
    /// The conversation: a list of `{"role", "content", ...}` objects, as a client sent them
    /// (normalized before rendering: see [`normalize_messages`]).
    pub messages: &'a [Json],
    /// Append the assistant turn's opening.
    pub add_generation_prompt: bool,
    /// Leave the last (assistant) message open so the model continues it.
    pub continue_final_message: bool,
    /// Tool definitions passed to the template as `tools`.
    pub tools: Option<&'a Json>,
    /// Documents passed to the template as `documents`.
    pub documents: Option<&'a Json>,
    /// Extra template variables (`chat_template_kwargs`).
    pub kwargs: Option<&'a serde_json::Map<String, Json>>,
}

/// Template instructions one render may run (minijinja's fuel): ample for real templates
/// over long conversations, a bound on a hostile template's loops.
pub const CHAT_TEMPLATE_FUEL: u64 = 5_000_000;
/// Most bytes a render may produce.
pub const MAX_RENDERED_BYTES: usize = 8 << 20;
/// Deepest nesting of macro calls and includes.
pub const CHAT_TEMPLATE_RECURSION_LIMIT: usize = 64;

/// A compiled chat template, rendered under an instruction budget, a recursion limit and an
/// output size limit.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    max_bytes: usize,
    content_format: ContentFormat,
}

/// A writer that refuses to grow past its limit.
struct Capped {
    buf: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.limit {
            return Err(std::io::Error::other("the rendered chat is too long"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn template_error(e: minijinja::Error) -> Error {
    Error::Template(e.to_string())
}

impl ChatTemplate {
    /// Compiles `source` with the model's BOS/EOS token strings.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
        env.set_recursion_limit(CHAT_TEMPLATE_RECURSION_LIMIT);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, state, value| match value.kind() {
            // Jinja prints a list or a dict as Python's `str()` does.
            ValueKind::Seq | ValueKind::Map => out.write_str(&python_repr(value)).map_err(minijinja::Error::from),
            _ => minijinja::escape_formatter(out, state, value),
        });
        env.add_filter("tojson", tojson);
        // Jinja's `string` and `trim` turn a list or dict into Python's `str()` of it.
        env.add_filter("string", |v: Value| if v.kind() == ValueKind::String { v } else { Value::from(py_str(&v)) });
        env.add_filter("trim", |v: Value, chars: Option<String>| -> String {
            let s = py_str(&v);
            match chars {
                Some(c) => s.trim_matches(|x| c.contains(x)).to_string(),
                None => s.trim().to_string(),
            }
        });
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use this for "today's date"; UTC keeps rendering reproducible per day.
            let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            format_utc(secs, &fmt)
        });
        env.add_template_owned("chat", source.to_string()).map_err(template_error)?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
            max_bytes: MAX_RENDERED_BYTES,
            content_format: ContentFormat::detect(source),
        })
    }

    /// Sets the render budget: `fuel` template instructions and `max_bytes` of output.
    pub fn with_budget(mut self, fuel: u64, max_bytes: usize) -> Self {
        self.env.set_fuel(Some(fuel));
        self.max_bytes = max_bytes;
        self
    }

    /// The content format messages are given in: detected from the source, unless set.
    pub fn content_format(&self) -> ContentFormat {
        self.content_format
    }

    /// Gives messages' content in `format` whatever the source reads
    /// (`--chat-template-content-format string|openai`).
    pub fn with_content_format(mut self, format: ContentFormat) -> Self {
        self.content_format = format;
        self
    }

    /// Renders a conversation to the prompt text: the messages normalized for the template's
    /// content format (see [`normalize_messages`]), then the template run under its budgets.
    pub fn render(&self, req: &ChatRequest) -> Result<String> {
        if req.add_generation_prompt && req.continue_final_message {
            return Err(Error::Template("add_generation_prompt and continue_final_message cannot both be set".into()));
        }
        let tpl = self.env.get_template("chat").map_err(template_error)?;
        let mut ctx = serde_json::Map::new();
        if let Some(kw) = req.kwargs {
            ctx.extend(kw.clone());
        }
        let messages = normalize_messages(req.messages, self.content_format)?;
        let final_text = messages.last().and_then(|m| messages::final_text(m.get("content"))).map(str::to_string);
        ctx.insert("messages".into(), Json::Array(messages));
        ctx.insert("add_generation_prompt".into(), Json::Bool(req.add_generation_prompt));
        ctx.insert("bos_token".into(), Json::String(self.bos_token.clone()));
        ctx.insert("eos_token".into(), Json::String(self.eos_token.clone()));
        if let Some(t) = req.tools {
            ctx.insert("tools".into(), t.clone());
        }
        if let Some(d) = req.documents {
            ctx.insert("documents".into(), d.clone());
        }
        let mut out = Capped { buf: Vec::new(), limit: self.max_bytes };
        tpl.render_captured_to(Value::from_serialize(&ctx), &mut out).map(drop).map_err(|e| {
            if e.kind() == ErrorKind::WriteFailure {
                Error::Template(format!("the rendered chat is longer than {} bytes", self.max_bytes))
            } else {
                template_error(e)
            }
        })?;
        let mut text =
            String::from_utf8(out.buf).map_err(|_| Error::Template("the template wrote invalid UTF-8".into()))?;
        if req.continue_final_message {
            let last = final_text.as_deref().unwrap_or("");
            match text.rfind(last.trim()) {
                Some(i) if !last.trim().is_empty() => text.truncate(i + last.trim().len()),
                _ => {
                    return Err(Error::Template(
                        "continue_final_message: the final message was not found in the rendered chat".into(),
                    ))
                }
            }
        }
        Ok(text)
    }
}

/// A value as Python's `str()` writes it: a string as is, a list or dict as its `repr`, other
/// values as minijinja prints them.
fn py_str(v: &Value) -> String {
    match v.kind() {
        ValueKind::String => v.as_str().unwrap_or_default().to_string(),
        ValueKind::Seq | ValueKind::Map | ValueKind::None | ValueKind::Bool => python_repr(v),
        ValueKind::Undefined => String::new(),
        _ => v.to_string(),
    }
}

/// A value as Python's `repr` writes it (lists, dicts, strings in quotes, `None`, `True`).
fn python_repr(v: &Value) -> String {
    match v.kind() {
        ValueKind::None | ValueKind::Undefined => "None".into(),
        ValueKind::Bool => if v.is_true() { "True" } else { "False" }.into(),
        ValueKind::String => {
            let s = v.as_str().unwrap_or_default();
            let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
            let mut out = String::from(quote);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == quote => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push(quote);
            out
        }
        ValueKind::Seq => {
            let items: Vec<String> = v.try_iter().into_iter().flatten().map(|x| python_repr(&x)).collect();
            format!("[{}]", items.join(", "))
        }
        ValueKind::Map => {
            let items: Vec<String> = v
                .try_iter()
                .into_iter()
                .flatten()
                .map(|k| format!("{}: {}", python_repr(&k), python_repr(&v.get_item(&k).unwrap_or_default())))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        _ => v.to_string(),
    }
}

/// Python's `json.dumps` separators without indent: `", "` between items, `": "` after keys.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

fn sort_keys(v: &mut Json) {
    match v {
        Json::Object(m) => {
            m.sort_keys();
            m.values_mut().for_each(sort_keys);
        }
        Json::Array(a) => a.iter_mut().for_each(sort_keys),
        _ => {}
    }
}

/// `tojson` as Hugging Face's chat environment defines it (Python's `json.dumps` with
/// `ensure_ascii=False`): keys in insertion order unless `sort_keys`, Python's separators, an
/// optional `indent`, and no HTML escaping (unlike Jinja's own `tojson`).
fn tojson(v: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    use serde::Serialize as _;
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let bad = |e: serde_json::Error| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}"));
    let mut json = serde_json::to_value(&v).map_err(bad)?;
    if sort == Some(true) {
        sort_keys(&mut json);
    }
    let mut out = Vec::new();
    match indent {
        Some(n) => {
            let pad = " ".repeat(n);
            let mut ser = serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(pad.as_bytes()),
            );
            json.serialize(&mut ser).map_err(bad)?;
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
            json.serialize(&mut ser).map_err(bad)?;
        }
    }
    Ok(Value::from_safe_string(String::from_utf8(out).unwrap_or_default()))
}

/// Minimal strftime for UTC timestamps: %Y %m %d %B %b %H %M %S %%.
fn format_utc(secs: u64, fmt: &str) -> String {
    let days = (secs / 86_400) as i64;
    let (h, mi, s) = ((secs % 86_400) / 3600, (secs % 3600) / 60, secs % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_like_transformers() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let msgs = [json!({"role": "user", "content": "Hi"})];
        let s = t.render(&ChatRequest { messages: &msgs, add_generation_prompt: true, ..Default::default() }).unwrap();
        assert_eq!(s, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn continue_final_message_leaves_the_turn_open() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let msgs = [json!({"role": "user", "content": "Hi"}), json!({"role": "assistant", "content": "Hello, I"})];
        let s = t.render(&ChatRequest { messages: &msgs, continue_final_message: true, ..Default::default() }).unwrap();
        assert!(s.ends_with("<|im_start|>assistant\nHello, I"), "{s:?}");
        let both = ChatRequest {
            messages: &msgs,
            continue_final_message: true,
            add_generation_prompt: true,
            ..Default::default()
        };
        assert!(t.render(&both).is_err());
    }

    #[test]
    fn raise_exception_and_python_methods() {
        let t = ChatTemplate::new("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}", None, None).unwrap();
        let ok = [json!({"role": "user", "content": "  hi "})];
        assert_eq!(t.render(&ChatRequest { messages: &ok, ..Default::default() }).unwrap(), "HI");
        let bad = [json!({"role": "system", "content": "x"})];
        let e = t.render(&ChatRequest { messages: &bad, ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("first must be user"));
    }

    #[test]
    fn lists_and_dicts_print_as_python_does() {
        let t = ChatTemplate::new("{{ messages[0]['content'] }}|{{ messages[0] }}", None, None).unwrap();
        let msgs = [json!({"role": "user", "content": [{"type": "text", "text": "it's \"x\"\n"}]})];
        let s = t.with_content_format(ContentFormat::OpenAi);
        let got = s.render(&ChatRequest { messages: &msgs, ..Default::default() }).unwrap();
        assert_eq!(
            got,
            "[{'type': 'text', 'text': 'it\\'s \"x\"\\n'}]|{'role': 'user', 'content': [{'type': 'text', 'text': 'it\\'s \"x\"\\n'}]}"
        );
        let t =
            ChatTemplate::new("{{ messages[0]['content']|trim }}|{{ none|string }}|{{ [true, 1]|string }}", None, None)
                .unwrap()
                .with_content_format(ContentFormat::OpenAi);
        let msgs = [json!({"role": "user", "content": "a"})];
        let got = t.render(&ChatRequest { messages: &msgs, ..Default::default() }).unwrap();
        assert_eq!(got, "[{'type': 'text', 'text': 'a'}]|None|[True, 1]");
    }

    #[test]
    fn dates_format() {
        assert_eq!(format_utc(0, "%d %B %Y"), "01 January 1970");
        assert_eq!(format_utc(1_700_000_000, "%Y-%m-%d %H:%M"), "2023-11-14 22:13");
    }
}
