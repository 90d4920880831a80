//! Incremental JSON for streamed tool calls: a lexer that reads a JSON value one character at
//! a time (checking its grammar, decoding strings), a writer that turns its tokens back into
//! the exact text `serde_json::Value::to_string` gives the whole value (compact, serde's
//! escapes, numbers as serde writes them), and readers built on them: [`ArgsReader`] (one
//! arguments object) and [`CallsReader`] (call objects `{"name", "arguments" | "parameters"}`,
//! alone, in a list, under `function`, or in an OpenAI `{"tool_calls": [...]}` wrapper).
//!
//! So the argument fragments a stream sends concatenate to the same text as the arguments of
//! the finished output's parse (which serializes the parsed value), key order included
//! (`serde_json`'s `preserve_order`); only an object repeating a key differs.

use serde_json::Value;

/// Deepest nesting read (serde_json's own limit).
const MAX_DEPTH: usize = 128;
/// Longest number or literal.
const MAX_SCALAR: usize = 1024;

/// One JSON token, with the nesting depth it sits at (the container holding it; an opening
/// bracket sits in its parent, a closing one too).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
    Open(char),
    Close(char),
    Colon,
    Comma,
    /// A string starts; `key`: it is an object's key.
    StrStart {
        key: bool,
    },
    /// A decoded character of a string.
    Char(char),
    StrEnd {
        key: bool,
    },
    /// A number, `true`, `false` or `null`, as serde_json writes it.
    Scalar(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// A value (at the top, after a colon, or after an array's comma).
    Value,
    /// A value or the array's end (just after `[`).
    ValueOrClose,
    /// A key or the object's end (just after `{`).
    KeyOrClose,
    Key,
    Colon,
    /// A comma or the container's end.
    CommaOrClose,
    /// The top value is complete.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Lex {
    Between,
    Str { key: bool },
    Escape { key: bool },
    Unicode { key: bool },
    Scalar,
}

/// The JSON grammar read incrementally; `push` errors on anything serde_json would refuse
/// (but a repeated key).
#[derive(Debug, Clone)]
pub(super) struct Lexer {
    stack: Vec<char>,
    expect: Expect,
    lex: Lex,
    buf: String,
    high_surrogate: Option<u32>,
}

/// Malformed JSON.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Invalid;

impl Lexer {
    pub(super) fn new() -> Self {
        Self { stack: Vec::new(), expect: Expect::Value, lex: Lex::Between, buf: String::new(), high_surrogate: None }
    }

    /// Whether the top value is complete.
    pub(super) fn done(&self) -> bool {
        self.expect == Expect::Done
    }

    fn depth(&self) -> usize {
        self.stack.len()
    }

    /// A value ended at the current depth.
    fn value_ended(&mut self) {
        self.expect = if self.stack.is_empty() { Expect::Done } else { Expect::CommaOrClose };
    }

    /// Reads one character, appending the tokens it completes.
    pub(super) fn push(&mut self, c: char, out: &mut Vec<(Tok, usize)>) -> Result<(), Invalid> {
        match self.lex {
            Lex::Str { key } => {
                if self.high_surrogate.is_some() && c != '\\' {
                    return Err(Invalid);
                }
                match c {
                    '"' => {
                        self.lex = Lex::Between;
                        out.push((Tok::StrEnd { key }, self.depth()));
                        if key {
                            self.expect = Expect::Colon;
                        } else {
                            self.value_ended();
                        }
                    }
                    '\\' => self.lex = Lex::Escape { key },
                    c if (c as u32) < 0x20 => return Err(Invalid),
                    c => out.push((Tok::Char(c), self.depth())),
                }
                Ok(())
            }
            Lex::Escape { key } => {
                let decoded = match c {
                    '"' | '\\' | '/' => c,
                    'b' => '\u{8}',
                    'f' => '\u{c}',
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    'u' => {
                        self.lex = Lex::Unicode { key };
                        self.buf.clear();
                        return Ok(());
                    }
                    _ => return Err(Invalid),
                };
                if self.high_surrogate.is_some() {
                    return Err(Invalid);
                }
                self.lex = Lex::Str { key };
                out.push((Tok::Char(decoded), self.depth()));
                Ok(())
            }
            Lex::Unicode { key } => {
                if !c.is_ascii_hexdigit() {
                    return Err(Invalid);
                }
                self.buf.push(c);
                if self.buf.len() < 4 {
                    return Ok(());
                }
                let code = u32::from_str_radix(&self.buf, 16).map_err(|_| Invalid)?;
                self.buf.clear();
                self.lex = Lex::Str { key };
                let ch = match (self.high_surrogate.take(), code) {
                    (None, 0xD800..=0xDBFF) => {
                        self.high_surrogate = Some(code);
                        return Ok(());
                    }
                    (None, 0xDC00..=0xDFFF) => return Err(Invalid),
                    (None, code) => char::from_u32(code),
                    (Some(high), 0xDC00..=0xDFFF) => {
                        char::from_u32(0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00))
                    }
                    (Some(_), _) => return Err(Invalid),
                };
                out.push((Tok::Char(ch.ok_or(Invalid)?), self.depth()));
                Ok(())
            }
            Lex::Scalar => {
                if matches!(c, ',' | '}' | ']' | ':' | ' ' | '\t' | '\n' | '\r') {
                    self.end_scalar(out)?;
                    self.between(c, out)
                } else if self.buf.len() >= MAX_SCALAR {
                    Err(Invalid)
                } else {
                    self.buf.push(c);
                    Ok(())
                }
            }
            Lex::Between => self.between(c, out),
        }
    }

    fn end_scalar(&mut self, out: &mut Vec<(Tok, usize)>) -> Result<(), Invalid> {
        let v: Value = serde_json::from_str(&self.buf).map_err(|_| Invalid)?;
        if v.is_string() || v.is_array() || v.is_object() {
            return Err(Invalid);
        }
        self.buf.clear();
        self.lex = Lex::Between;
        out.push((Tok::Scalar(v.to_string()), self.depth()));
        self.value_ended();
        Ok(())
    }

    fn between(&mut self, c: char, out: &mut Vec<(Tok, usize)>) -> Result<(), Invalid> {
        if matches!(c, ' ' | '\t' | '\n' | '\r') {
            return Ok(());
        }
        let value_ok = matches!(self.expect, Expect::Value | Expect::ValueOrClose);
        match c {
            '{' | '[' if value_ok => {
                if self.depth() >= MAX_DEPTH {
                    return Err(Invalid);
                }
                out.push((Tok::Open(c), self.depth()));
                self.stack.push(c);
                self.expect = if c == '{' { Expect::KeyOrClose } else { Expect::ValueOrClose };
            }
            '}' | ']' => {
                let open = if c == '}' { '{' } else { '[' };
                let closable = matches!(
                    (self.expect, open),
                    (Expect::CommaOrClose, _) | (Expect::KeyOrClose, '{') | (Expect::ValueOrClose, '[')
                );
                if !closable || self.stack.last() != Some(&open) {
                    return Err(Invalid);
                }
                self.stack.pop();
                out.push((Tok::Close(c), self.depth()));
                self.value_ended();
            }
            ':' if self.expect == Expect::Colon => {
                out.push((Tok::Colon, self.depth()));
                self.expect = Expect::Value;
            }
            ',' if self.expect == Expect::CommaOrClose => {
                out.push((Tok::Comma, self.depth()));
                self.expect = if self.stack.last() == Some(&'{') { Expect::Key } else { Expect::Value };
            }
            '"' if value_ok || matches!(self.expect, Expect::Key | Expect::KeyOrClose) => {
                let key = !value_ok;
                self.lex = Lex::Str { key };
                out.push((Tok::StrStart { key }, self.depth()));
            }
            c if value_ok && (c == '-' || c.is_ascii_alphanumeric()) => {
                self.lex = Lex::Scalar;
                self.buf.clear();
                self.buf.push(c);
            }
            _ => return Err(Invalid),
        }
        Ok(())
    }
}

/// Writes a string's character as serde_json escapes it.
pub(super) fn escape_into(c: char, out: &mut String) {
    match c {
        '"' => out.push_str("\\\""),
        '\\' => out.push_str("\\\\"),
        '\u{8}' => out.push_str("\\b"),
        '\u{c}' => out.push_str("\\f"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
        c => out.push(c),
    }
}

/// Writes a token as serde_json writes the value (compact).
pub(super) fn write_tok(t: &Tok, out: &mut String) {
    match t {
        Tok::Open(c) | Tok::Close(c) => out.push(*c),
        Tok::Colon => out.push(':'),
        Tok::Comma => out.push(','),
        Tok::StrStart { .. } | Tok::StrEnd { .. } => out.push('"'),
        Tok::Char(c) => escape_into(*c, out),
        Tok::Scalar(s) => out.push_str(s),
    }
}

/// What a reader found in the characters it was given.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Found {
    /// A call's function name (complete).
    Name(String),
    /// More of the current call's arguments, as serde_json writes them.
    Args(String),
    /// The current call is complete.
    End,
}

/// One arguments object, re-written as it is read.
#[derive(Debug, Clone)]
pub(super) struct ArgsReader {
    lexer: Lexer,
    toks: Vec<(Tok, usize)>,
}

impl ArgsReader {
    pub(super) fn new() -> Self {
        Self { lexer: Lexer::new(), toks: Vec::new() }
    }

    /// Reads `c`: the argument text it completes (appended to `out`), `Ok(true)` once the
    /// object is complete. Anything but an object is invalid.
    pub(super) fn push(&mut self, c: char, out: &mut String) -> Result<bool, Invalid> {
        self.toks.clear();
        self.lexer.push(c, &mut self.toks)?;
        for (t, d) in &self.toks {
            if *d == 0 && !matches!(t, Tok::Open('{') | Tok::Close('}')) {
                return Err(Invalid);
            }
            write_tok(t, out);
        }
        Ok(self.lexer.done())
    }
}

/// What the value of a call object's key is being read as.
#[derive(Debug, Clone)]
enum Field {
    /// No value started yet (between keys).
    None,
    /// `name`: its characters.
    Name(String),
    /// `arguments` / `parameters` as an object, re-written as it comes.
    Args,
    /// `arguments` given as a string of JSON: its decoded text read as an arguments object
    /// (`true` once the object is complete: only blanks may follow).
    ArgsText(ArgsReader, bool),
    /// Any other key's value, skipped.
    Skip,
}

/// The call object being read.
#[derive(Debug, Clone)]
struct Call {
    /// Depth of the object's own keys.
    base: usize,
    /// Depth of the keys read (one more inside a `function` object).
    depth: usize,
    key: Option<String>,
    field: Field,
    /// Depth the current value started at.
    value_depth: usize,
    name: Option<String>,
    /// Arguments read before the name: sent once it comes.
    held: String,
    args_seen: bool,
    /// `Found::Name` was given.
    named: bool,
}

impl Call {
    fn new(depth: usize) -> Self {
        Self {
            base: depth,
            depth,
            key: None,
            field: Field::None,
            value_depth: 0,
            name: None,
            held: String::new(),
            args_seen: false,
            named: false,
        }
    }
}

/// Which values hold calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Shape {
    /// One call object.
    Object,
    /// A list of call objects.
    List,
    /// Either, or OpenAI's `{"tool_calls": [...]}`.
    Any,
}

/// Call objects in one JSON value, read as they come: each call's name once it is complete,
/// then its arguments as they are generated (those written before the name are held until
/// it comes), then its end.
#[derive(Debug, Clone)]
pub(super) struct CallsReader {
    lexer: Lexer,
    shape: Shape,
    /// Depth of the list whose items are calls (`None` before it is known).
    list_depth: Option<usize>,
    call: Option<Call>,
    toks: Vec<(Tok, usize)>,
}

impl CallsReader {
    pub(super) fn new(shape: Shape) -> Self {
        Self { lexer: Lexer::new(), shape, list_depth: None, call: None, toks: Vec::new() }
    }

    /// Whether the whole value is read.
    pub(super) fn done(&self) -> bool {
        self.lexer.done()
    }

    /// Reads `c`, appending what it completes.
    pub(super) fn push(&mut self, c: char, out: &mut Vec<Found>) -> Result<(), Invalid> {
        self.toks.clear();
        self.lexer.push(c, &mut self.toks)?;
        let toks = std::mem::take(&mut self.toks);
        let r = toks.iter().try_for_each(|(t, d)| self.token(t, *d, out));
        self.toks = toks;
        r
    }

    fn token(&mut self, t: &Tok, d: usize, out: &mut Vec<Found>) -> Result<(), Invalid> {
        let Some(call) = self.call.as_mut() else {
            // Between calls: find where the next one opens.
            return match (t, d, self.shape, self.list_depth) {
                (Tok::Open('{'), 0, Shape::Object | Shape::Any, None) => {
                    self.call = Some(Call::new(1));
                    Ok(())
                }
                (Tok::Open('['), 0, Shape::List | Shape::Any, None) => {
                    self.list_depth = Some(1);
                    Ok(())
                }
                (Tok::Open('{'), d, _, Some(l)) if d == l => {
                    self.call = Some(Call::new(l + 1));
                    Ok(())
                }
                // Between items, the list's end, and the end of OpenAI's wrapper.
                (Tok::Comma | Tok::Close(_), _, _, Some(_)) => Ok(()),
                _ => Err(Invalid),
            };
        };
        if d + 1 == call.depth && matches!(t, Tok::Close('}')) {
            if call.depth > call.base {
                call.depth -= 1; // a `function` object ends
                return Ok(());
            }
            // The call object's end.
            let call = self.call.take().unwrap_or_else(|| Call::new(0));
            let Some(name) = call.name else { return Err(Invalid) };
            if !call.named {
                out.push(Found::Name(name));
            }
            match (call.args_seen, call.held.is_empty()) {
                (false, _) => out.push(Found::Args("{}".into())),
                (true, false) => out.push(Found::Args(call.held)),
                _ => {}
            }
            out.push(Found::End);
            return Ok(());
        }
        if matches!(call.field, Field::None) {
            match (t, d == call.depth) {
                (Tok::StrStart { key: true }, true) => call.key = Some(String::new()),
                (Tok::Char(c), true) if call.key.is_some() => call.key.get_or_insert_default().push(*c),
                (Tok::StrEnd { key: true }, true) | (Tok::Colon, true) | (Tok::Comma, true) => {}
                (value, true) => {
                    // A value starts: what it is depends on its key.
                    call.value_depth = d;
                    let key = call.key.take().unwrap_or_default();
                    call.field = match (key.as_str(), value) {
                        ("name", Tok::StrStart { .. }) if call.name.is_none() => Field::Name(String::new()),
                        ("name", _) => return Err(Invalid),
                        ("arguments" | "parameters", _) if call.args_seen => Field::Skip,
                        ("arguments" | "parameters", Tok::Open('{')) => {
                            call.args_seen = true;
                            Field::Args
                        }
                        ("arguments" | "parameters", Tok::StrStart { .. }) => {
                            call.args_seen = true;
                            Field::ArgsText(ArgsReader::new(), false)
                        }
                        ("arguments" | "parameters", Tok::Scalar(s)) if s == "null" => {
                            call.args_seen = true;
                            emit_args(call, "{}".into(), out);
                            return Ok(());
                        }
                        ("arguments" | "parameters", _) => return Err(Invalid),
                        ("function", Tok::Open('{')) => {
                            call.depth += 1;
                            return Ok(());
                        }
                        ("tool_calls", Tok::Open('[')) if self.shape == Shape::Any && call.depth == 1 => {
                            self.call = None;
                            self.list_depth = Some(2);
                            return Ok(());
                        }
                        (_, Tok::Scalar(_)) => return Ok(()),
                        _ => Field::Skip,
                    };
                    if matches!(call.field, Field::Args) {
                        emit_args(call, "{".into(), out);
                    }
                }
                _ => {}
            }
            return Ok(());
        }
        // Inside a value.
        let ends = d == call.value_depth && matches!(t, Tok::StrEnd { .. } | Tok::Close(_));
        match &mut call.field {
            Field::Name(n) => match t {
                Tok::Char(c) => n.push(*c),
                _ => {
                    call.name = Some(std::mem::take(n));
                    call.named = true;
                    out.push(Found::Name(call.name.clone().unwrap_or_default()));
                    if !call.held.is_empty() {
                        out.push(Found::Args(std::mem::take(&mut call.held)));
                    }
                }
            },
            Field::Args => {
                let mut s = String::new();
                write_tok(t, &mut s);
                emit_args(call, s, out);
            }
            Field::ArgsText(reader, done) => match t {
                Tok::Char(c) if *done => {
                    if !matches!(c, ' ' | '\t' | '\n' | '\r') {
                        return Err(Invalid);
                    }
                }
                Tok::Char(c) => {
                    let mut s = String::new();
                    *done = reader.push(*c, &mut s)?;
                    emit_args(call, s, out);
                }
                _ if *done => {}
                _ => return Err(Invalid),
            },
            Field::Skip | Field::None => {}
        }
        if ends {
            call.field = Field::None;
        }
        Ok(())
    }
}

/// Argument text: out at once when the call is named, else held for its name.
fn emit_args(call: &mut Call, s: String, out: &mut Vec<Found>) {
    if call.named {
        out.push(Found::Args(s));
    } else {
        call.held.push_str(&s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calls(shape: Shape, text: &str) -> Result<Vec<(String, String)>, Invalid> {
        let mut r = CallsReader::new(shape);
        let mut found = Vec::new();
        for c in text.chars() {
            r.push(c, &mut found)?;
        }
        let mut out: Vec<(String, String)> = Vec::new();
        for f in found {
            match f {
                Found::Name(n) => out.push((n, String::new())),
                Found::Args(a) => out.last_mut().ok_or(Invalid)?.1.push_str(&a),
                Found::End => {}
            }
        }
        Ok(out)
    }

    #[test]
    fn args_are_written_as_serde_writes_them() {
        let text =
            r#" { "a" : [1.50, -0, 1e3, true, null], "b\u00e9\ud83d\ude00\n" : {"c": "x\/y\"z\u0001"}, "d": {} } "#;
        let mut r = ArgsReader::new();
        let mut out = String::new();
        let mut done = false;
        for c in text.trim().chars() {
            done = r.push(c, &mut out).unwrap();
        }
        assert!(done);
        assert_eq!(out, serde_json::from_str::<Value>(text).unwrap().to_string());
        for bad in ["[1]", "{\"a\" 1}", "{\"a\": 1,}", "{\"a\": tru}", "{\"a\": \"\\ud800x\"}", "{'a': 1}"] {
            let mut r = ArgsReader::new();
            let mut out = String::new();
            let res = bad.chars().try_for_each(|c| r.push(c, &mut out).map(drop));
            assert!(res.is_err() || !r.lexer.done(), "{bad}");
        }
    }

    #[test]
    fn calls_in_every_shape() {
        let want = |n: &str, a: &str| (n.to_string(), a.to_string());
        assert_eq!(
            calls(Shape::Object, r#"{"name": "f", "arguments": {"x": [1, {"y": 2}]}}"#).unwrap(),
            [want("f", r#"{"x":[1,{"y":2}]}"#)]
        );
        // Arguments before the name; `parameters`; arguments as a JSON string; none.
        assert_eq!(
            calls(
                Shape::List,
                r#"[{"parameters": {"a": 1}, "name": "g"}, {"name": "h", "arguments": "{\"b\": 2}"}, {"name": "k"}]"#
            )
            .unwrap(),
            [want("g", r#"{"a":1}"#), want("h", r#"{"b":2}"#), want("k", "{}")]
        );
        // OpenAI's wrapper and `function` objects.
        assert_eq!(
            calls(Shape::Object, r#"{"type": "function", "function": {"name": "f", "arguments": {}}, "id": "x"}"#)
                .unwrap(),
            [want("f", "{}")]
        );
        assert_eq!(
            calls(
                Shape::Any,
                r#"{"tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"q": "s"}}}, {"name": "g"}]}"#
            )
            .unwrap(),
            [want("f", r#"{"q":"s"}"#), want("g", "{}")]
        );
        assert!(calls(Shape::Object, r#"{"arguments": {"a": 1}}"#).is_err());
        assert!(calls(Shape::List, r#"[1]"#).is_err());
        assert!(calls(Shape::Object, r#"{"name": "f", "arguments": [1]}"#).is_err());
    }
}
