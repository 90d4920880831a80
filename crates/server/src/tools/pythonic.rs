//! `pythonic` (Llama 3.2 / 4): `[get_weather(city="SF"), other()]`, read by a bounded reader
//! of Python calls with literal arguments. Streamed, a call starts at its `(` and each keyword
//! argument is sent once its value is complete (at the `,` or `)` after it).

use serde_json::{Map, Value};

use super::bare::Bare;
use super::{finish, Body, Events, Parsed, Step, ToolCall, ToolParser, ToolStream};

pub(super) struct Pythonic;

impl ToolParser for Pythonic {
    fn parse(&self, text: &str) -> Parsed {
        let body = text.trim();
        let body = body.strip_prefix("<|python_start|>").unwrap_or(body);
        let body = body.strip_suffix("<|python_end|>").unwrap_or(body).trim();
        let Some(list) = body.strip_prefix('[').and_then(|b| b.strip_suffix(']')) else { return Parsed::text(text) };
        let mut p = Py { s: list.as_bytes(), i: 0 };
        let mut calls = Vec::new();
        loop {
            p.ws();
            if p.i >= p.s.len() {
                break;
            }
            match p.call() {
                Some(c) => calls.push(c),
                None => return Parsed::text(text),
            }
            p.ws();
            if p.eat(b',') {
                continue;
            }
            if p.i < p.s.len() {
                return Parsed::text(text);
            }
        }
        finish(String::new(), calls, text)
    }

    fn stream(&self) -> Box<dyn ToolStream> {
        Box::new(Bare::new(&["<|python_start|>"], &['['], || Box::new(PyBody::default())))
    }
}

/// A small reader of Python call syntax with literal arguments: `name(k=v, ...)`, where a
/// value is a string, number, `True`/`False`/`None`, list, tuple or dict of such. Nesting is
/// bounded.
struct Py<'a> {
    s: &'a [u8],
    i: usize,
}

const PY_MAX_DEPTH: usize = 32;

impl Py<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn ident(&mut self) -> Option<String> {
        self.ws();
        let start = self.i;
        while self.i < self.s.len() && (self.s[self.i].is_ascii_alphanumeric() || b"_.-".contains(&self.s[self.i])) {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn call(&mut self) -> Option<ToolCall> {
        let name = self.ident()?;
        if !self.eat(b'(') {
            return None;
        }
        let mut args = Map::new();
        if !self.eat(b')') {
            loop {
                let (key, value) = self.kwarg()?;
                args.insert(key, value);
                if self.eat(b')') {
                    break;
                }
                if !self.eat(b',') {
                    return None;
                }
                if self.eat(b')') {
                    break;
                }
            }
        }
        Some(ToolCall { name, arguments: Value::Object(args).to_string() })
    }

    /// `key=value`.
    fn kwarg(&mut self) -> Option<(String, Value)> {
        let key = self.ident()?;
        if !self.eat(b'=') {
            return None;
        }
        Some((key, self.value(0)?))
    }

    fn value(&mut self, depth: usize) -> Option<Value> {
        if depth > PY_MAX_DEPTH {
            return None;
        }
        self.ws();
        let c = *self.s.get(self.i)?;
        match c {
            b'"' | b'\'' => self.string(c).map(Value::String),
            b'[' | b'(' => {
                let close = if c == b'[' { b']' } else { b')' };
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    if self.eat(close) {
                        return Some(Value::Array(items));
                    }
                    items.push(self.value(depth + 1)?);
                    if !self.eat(b',') && !self.eat(close) {
                        return None;
                    } else if self.s.get(self.i - 1) == Some(&close) {
                        return Some(Value::Array(items));
                    }
                }
            }
            b'{' => {
                self.i += 1;
                let mut map = Map::new();
                loop {
                    if self.eat(b'}') {
                        return Some(Value::Object(map));
                    }
                    let key = match self.value(depth + 1)? {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    if !self.eat(b':') {
                        return None;
                    }
                    map.insert(key, self.value(depth + 1)?);
                    if !self.eat(b',') && !self.eat(b'}') {
                        return None;
                    } else if self.s.get(self.i - 1) == Some(&b'}') {
                        return Some(Value::Object(map));
                    }
                }
            }
            _ => {
                let start = self.i;
                while self.i < self.s.len() && !b",)]}: \t\n".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                let word = std::str::from_utf8(&self.s[start..self.i]).ok()?;
                match word {
                    "True" => Some(Value::Bool(true)),
                    "False" => Some(Value::Bool(false)),
                    "None" => Some(Value::Null),
                    w => serde_json::from_str::<serde_json::Number>(w).ok().map(Value::Number),
                }
            }
        }
    }

    fn string(&mut self, quote: u8) -> Option<String> {
        self.i += 1;
        let mut out = Vec::new();
        while let Some(&c) = self.s.get(self.i) {
            self.i += 1;
            match c {
                b'\\' => {
                    let e = *self.s.get(self.i)?;
                    self.i += 1;
                    out.push(match e {
                        b'n' => b'\n',
                        b't' => b'\t',
                        other => other,
                    });
                }
                c if c == quote => return String::from_utf8(out).ok(),
                c => out.push(c),
            }
        }
        None
    }
}

#[derive(Default)]
enum PyState {
    /// Before the list's `[`.
    #[default]
    Open,
    /// Before a call's name, or the list's end.
    Seek,
    /// A name; `true` once blanks follow it.
    Name(String, bool),
    /// Inside a call's parentheses.
    Args,
    /// After a call: `,` or the list's end.
    After,
}

/// The list of calls, read a character at a time.
#[derive(Default)]
struct PyBody {
    state: PyState,
    /// The current call's text after its `(`.
    args: String,
    /// Bytes of `args` whose keyword arguments are sent.
    sent: usize,
    /// Keyword arguments sent for the current call.
    count: usize,
    /// Where the last character of `args` is: in a string (its quote, whether escaped), and
    /// how deep in brackets; a keyword argument can only end outside both.
    quote: Option<(char, bool)>,
    depth: usize,
    /// After a keyword argument's `=` (at depth 0), before its value's first character.
    at_value: bool,
    /// The current keyword argument's value is a string being sent as it comes (and was
    /// counted when it began).
    streaming: bool,
}

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.-".contains(c)
}

impl PyBody {
    /// Sends the keyword arguments `args` completes; `Some(false)` at the call's `)`,
    /// `None` when the text is not a call.
    fn drain(&mut self, ev: &mut Events) -> Option<bool> {
        loop {
            let mut p = Py { s: &self.args.as_bytes()[self.sent..], i: 0 };
            p.ws();
            if p.s.get(p.i) == Some(&b')') {
                ev.args(if self.count == 0 { "{}" } else { "}" });
                ev.end();
                return Some(false);
            }
            let Some((key, value)) = p.kwarg() else {
                // Cut at the end of the text so far: more is coming.
                return (p.i >= p.s.len()).then_some(true);
            };
            p.ws();
            match p.s.get(p.i) {
                Some(b',') => p.i += 1,
                Some(b')') => {}
                Some(_) => return None,
                None => return Some(true),
            }
            if self.streaming {
                self.streaming = false; // its text is sent
            } else {
                let sep = if self.count == 0 { "{" } else { "," };
                ev.args(&format!("{sep}{}:{value}", Value::String(key)));
                self.count += 1;
            }
            self.sent += p.i;
        }
    }

    /// A string value's opening quote: `"key":"` goes out, then its characters as they come.
    fn begin_string(&mut self, ev: &mut Events) {
        let mut p = Py { s: &self.args.as_bytes()[self.sent..], i: 0 };
        let Some(key) = p.ident() else { return };
        let sep = if self.count == 0 { "{" } else { "," };
        ev.args(&format!("{sep}{}:\"", Value::String(key)));
        self.count += 1;
        self.streaming = true;
    }
}

impl Body for PyBody {
    fn push(&mut self, c: char, ev: &mut Events) -> Step {
        match &mut self.state {
            PyState::Open if c == '[' => self.state = PyState::Seek,
            PyState::Seek | PyState::After if c.is_whitespace() => {}
            PyState::Seek if c == ']' => return Step::Done,
            PyState::Seek if ident_char(c) => self.state = PyState::Name(c.to_string(), false),
            PyState::Name(name, false) if ident_char(c) => name.push(c),
            PyState::Name(_, blank) if c.is_whitespace() => *blank = true,
            PyState::Name(name, _) if c == '(' => {
                ev.start(std::mem::take(name));
                self.args.clear();
                (self.sent, self.count, self.quote, self.depth) = (0, 0, None, 0);
                (self.at_value, self.streaming) = (false, false);
                self.state = PyState::Args;
            }
            PyState::Args => {
                self.args.push(c);
                let at_value = std::mem::take(&mut self.at_value);
                match (self.quote, c) {
                    (Some((q, false)), c) => {
                        self.quote = Some((q, c == '\\')).filter(|_| c != q);
                        if self.streaming && self.quote.is_some() && c != '\\' {
                            let mut s = String::new();
                            super::json::escape_into(c, &mut s);
                            ev.args(&s);
                        } else if self.streaming && c == q {
                            ev.args("\"");
                        }
                    }
                    (Some((q, true)), _) => {
                        self.quote = Some((q, false));
                        if self.streaming {
                            // The reader's escapes: `\n`, `\t`, any other character as itself.
                            let mut s = String::new();
                            super::json::escape_into(
                                match c {
                                    'n' => '\n',
                                    't' => '\t',
                                    c => c,
                                },
                                &mut s,
                            );
                            ev.args(&s);
                        }
                    }
                    (None, '\'' | '"') => {
                        self.quote = Some((c, false));
                        if at_value && self.depth == 0 {
                            self.begin_string(ev);
                        }
                    }
                    (None, '=') if self.depth == 0 => self.at_value = true,
                    (None, c) if c.is_whitespace() => self.at_value = at_value,
                    (None, '(' | '[' | '{') => self.depth += 1,
                    (None, ')' | ']' | '}') if self.depth > 0 => self.depth -= 1,
                    _ => {}
                }
                // Each keyword argument is read once, when the `,` or `)` after it comes.
                if self.quote.is_none() && self.depth == 0 && (c == ',' || c == ')') {
                    match self.drain(ev) {
                        Some(true) => {}
                        Some(false) => self.state = PyState::After,
                        None if self.streaming => {
                            // A string value followed by something else: the call is cut here.
                            ev.args("}");
                            ev.end();
                            return Step::Done;
                        }
                        None => {
                            ev.end();
                            return Step::Done;
                        }
                    }
                }
            }
            PyState::After if c == ',' => self.state = PyState::Seek,
            PyState::After if c == ']' => return Step::Done,
            _ if ev.open || ev.calls > 0 => {
                ev.end();
                return Step::Done;
            }
            _ => return Step::NotCalls,
        }
        Step::More
    }

    fn finish(&mut self, ev: &mut Events) {
        ev.end();
    }
}
