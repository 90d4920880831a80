//! Which shape a chat template expects `message.content` in, detected from the template's
//! syntax tree the way vLLM does (`vllm/renderers/hf.py`, `_detect_content_format`): a
//! template that loops over a message's content (`{% for part in message['content'] %}`,
//! directly, through a macro parameter it is passed as, or as a bare `content` variable)
//! reads OpenAI content parts; any other reads one string.

use std::collections::{HashMap, HashSet};

use minijinja::machinery::ast::{self, CallArg, Expr, Stmt};
use minijinja::machinery::{parse, WhitespaceConfig};
use minijinja::syntax::SyntaxConfig;

/// How a template reads message content (vLLM's `--chat-template-content-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentFormat {
    /// One string per message: text parts are joined with `"\n"`, a null content is `""`.
    String,
    /// A list of `{"type": "text", "text": ..}` parts per message (a null content is `[]`).
    OpenAi,
}

impl ContentFormat {
    /// The format `source` reads, as vLLM detects it; a template that does not parse, or
    /// whose loops the detection cannot follow, reads strings (vLLM's default).
    // `SyntaxConfig` is a unit struct unless minijinja's `custom_syntax` feature is on.
    #[allow(clippy::default_constructed_unit_structs)]
    pub fn detect(source: &str) -> Self {
        let Ok(root) = parse(source, "chat", SyntaxConfig::default(), WhitespaceConfig::default()) else {
            return Self::String;
        };
        match loops_over_content(&root) {
            Some(true) => Self::OpenAi,
            _ => Self::String,
        }
    }

    /// The name vLLM gives it (`string`, `openai`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::OpenAi => "openai",
        }
    }
}

/// The nodes the detection looks at, in document order (Jinja's `find_all` order).
#[derive(Default)]
struct Nodes<'x, 'a> {
    loops: Vec<&'x ast::ForLoop<'a>>,
    sets: Vec<&'x ast::Set<'a>>,
    macros: Vec<&'x ast::Macro<'a>>,
    calls: Vec<&'x ast::Call<'a>>,
}

impl<'x, 'a> Nodes<'x, 'a> {
    fn of(stmts: &'x [Stmt<'a>]) -> Self {
        let mut n = Self::default();
        for s in stmts {
            n.stmt(s);
        }
        n
    }

    fn stmts(&mut self, stmts: &'x [Stmt<'a>]) {
        for s in stmts {
            self.stmt(s);
        }
    }

    fn stmt(&mut self, s: &'x Stmt<'a>) {
        match s {
            Stmt::Template(t) => self.stmts(&t.children),
            Stmt::EmitExpr(e) => self.expr(&e.expr),
            Stmt::ForLoop(f) => {
                self.loops.push(f);
                self.expr(&f.target);
                self.expr(&f.iter);
                self.stmts(&f.body);
                self.stmts(&f.else_body);
                if let Some(e) = &f.filter_expr {
                    self.expr(e);
                }
            }
            Stmt::IfCond(i) => {
                self.expr(&i.expr);
                self.stmts(&i.true_body);
                self.stmts(&i.false_body);
            }
            Stmt::WithBlock(w) => {
                for (t, v) in &w.assignments {
                    self.expr(t);
                    self.expr(v);
                }
                self.stmts(&w.body);
            }
            Stmt::Set(st) => {
                self.sets.push(st);
                self.expr(&st.target);
                self.expr(&st.expr);
            }
            Stmt::SetBlock(b) => {
                self.expr(&b.target);
                if let Some(f) = &b.filter {
                    self.expr(f);
                }
                self.stmts(&b.body);
            }
            Stmt::AutoEscape(a) => {
                self.expr(&a.enabled);
                self.stmts(&a.body);
            }
            Stmt::FilterBlock(f) => {
                self.expr(&f.filter);
                self.stmts(&f.body);
            }
            Stmt::Macro(m) => {
                self.macros.push(m);
                m.args.iter().chain(&m.defaults).for_each(|e| self.expr(e));
                self.stmts(&m.body);
            }
            Stmt::CallBlock(c) => {
                self.call(&c.call);
                self.stmts(&c.macro_decl.body);
            }
            Stmt::Do(d) => self.call(&d.call),
            Stmt::Block(b) => self.stmts(&b.body),
            Stmt::Extends(e) => self.expr(&e.name),
            Stmt::Include(i) => self.expr(&i.name),
            Stmt::Import(i) => {
                self.expr(&i.expr);
                self.expr(&i.name);
            }
            Stmt::FromImport(i) => self.expr(&i.expr),
            _ => {}
        }
    }

    fn call(&mut self, c: &'x ast::Call<'a>) {
        self.calls.push(c);
        self.expr(&c.expr);
        self.args(&c.args);
    }

    fn args(&mut self, args: &'x [CallArg<'a>]) {
        for a in args {
            match a {
                CallArg::Pos(e) | CallArg::Kwarg(_, e) | CallArg::PosSplat(e) | CallArg::KwargSplat(e) => self.expr(e),
            }
        }
    }

    fn expr(&mut self, e: &'x Expr<'a>) {
        match e {
            Expr::Var(_) | Expr::Const(_) => {}
            Expr::Slice(s) => {
                self.expr(&s.expr);
                for x in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                    self.expr(x);
                }
            }
            Expr::UnaryOp(u) => self.expr(&u.expr),
            Expr::BinOp(b) => {
                self.expr(&b.left);
                self.expr(&b.right);
            }
            Expr::Compare(c) => {
                self.expr(&c.expr);
                c.ops.iter().for_each(|o| self.expr(&o.expr));
            }
            Expr::IfExpr(i) => {
                self.expr(&i.test_expr);
                self.expr(&i.true_expr);
                if let Some(f) = &i.false_expr {
                    self.expr(f);
                }
            }
            Expr::Filter(f) => {
                if let Some(x) = &f.expr {
                    self.expr(x);
                }
                self.args(&f.args);
            }
            Expr::Test(t) => {
                self.expr(&t.expr);
                self.args(&t.args);
            }
            Expr::GetAttr(g) => self.expr(&g.expr),
            Expr::GetItem(g) => {
                self.expr(&g.expr);
                self.expr(&g.subscript_expr);
            }
            Expr::Call(c) => self.call(c),
            Expr::List(l) => l.items.iter().for_each(|x| self.expr(x)),
            Expr::Map(m) => m.keys.iter().chain(&m.values).for_each(|x| self.expr(x)),
        }
    }
}

/// `name` as a variable read.
fn is_var(e: &Expr, name: &str) -> bool {
    matches!(e, Expr::Var(v) if v.id == name)
}

/// `var[key]` or `var.key`.
fn is_attr(e: &Expr, var: &str, key: &str) -> bool {
    match e {
        Expr::GetItem(g) => {
            is_var(&g.expr, var) && matches!(&g.subscript_expr, Expr::Const(c) if c.value.as_str() == Some(key))
        }
        Expr::GetAttr(g) => is_var(&g.expr, var) && g.name == key,
        _ => false,
    }
}

/// vLLM's `_is_var_or_elems_access`: `var` (or `var.key`), possibly filtered, tested or
/// sliced.
fn is_var_or_elems(e: &Expr, var: &str, key: Option<&str>) -> bool {
    match e {
        Expr::Filter(f) => f.expr.as_ref().is_some_and(|x| is_var_or_elems(x, var, key)),
        Expr::Test(t) => is_var_or_elems(&t.expr, var, key),
        Expr::Slice(s) => is_var_or_elems(&s.expr, var, key),
        _ => match key {
            Some(k) => is_attr(e, var, k),
            None => is_var(e, var),
        },
    }
}

/// The loop variable of a loop, when it is one name.
fn target_name<'a>(f: &ast::ForLoop<'a>) -> Option<&'a str> {
    match &f.target {
        Expr::Var(v) => Some(v.id),
        _ => None,
    }
}

/// Whether the template loops over a message's content; `None` where vLLM's detection
/// would fail (an assignment or loop over the messages it cannot follow), which it treats
/// as the default.
fn loops_over_content(root: &Stmt) -> Option<bool> {
    let all = match root {
        Stmt::Template(t) => Nodes::of(&t.children),
        other => Nodes::of(std::slice::from_ref(other)),
    };
    // Names bound to the messages (or a filtered / sliced view of them) by `set`.
    let mut messages_vars = vec!["messages"];
    let mut queue = std::collections::VecDeque::from(["messages"]);
    let mut seen: HashSet<&str> = HashSet::from(["messages"]);
    while let Some(related) = queue.pop_front() {
        for s in &all.sets {
            if is_var_or_elems(&s.expr, related, None) {
                let Expr::Var(lhs) = &s.target else { return None };
                messages_vars.push(lhs.id);
                if seen.insert(lhs.id) {
                    queue.push_back(lhs.id);
                }
            }
        }
    }
    // Names a message is bound to: `{% for message in messages %}`.
    let mut message_vars = Vec::new();
    for f in &all.loops {
        if messages_vars.iter().any(|v| is_var_or_elems(&f.iter, v, None)) {
            message_vars.push(target_name(f)?);
        }
    }
    let passes_content = |e: &Expr| message_vars.iter().any(|v| is_var_or_elems(e, v, Some("content")));
    // Macro parameters that are given a message's content, by the loops inside each macro.
    let mut macro_loops: HashSet<*const ast::ForLoop> = HashSet::new();
    let mut content_params: HashMap<*const ast::ForLoop, HashSet<&str>> = HashMap::new();
    for m in &all.macros {
        let names: Vec<&str> =
            m.args.iter().filter_map(|a| if let Expr::Var(v) = a { Some(v.id) } else { None }).collect();
        let mut params = HashSet::new();
        for c in all.calls.iter().filter(|c| is_var(&c.expr, m.name)) {
            let mut pos = 0;
            for a in &c.args {
                match a {
                    CallArg::Pos(e) => {
                        if pos < names.len() && passes_content(e) {
                            params.insert(names[pos]);
                        }
                        pos += 1;
                    }
                    CallArg::Kwarg(k, e) if names.contains(k) && passes_content(e) => {
                        params.insert(*k);
                    }
                    _ => {}
                }
            }
        }
        for f in Nodes::of(&m.body).loops {
            macro_loops.insert(f as *const _);
            if !params.is_empty() {
                content_params.insert(f as *const _, params.clone());
            }
        }
    }
    for f in &all.loops {
        let key = *f as *const ast::ForLoop;
        let over_content = passes_content(&f.iter)
            || matches!(&f.iter, Expr::Var(v) if content_params.get(&key).is_some_and(|p| p.contains(v.id)))
            || (!macro_loops.contains(&key) && is_var(&f.iter, "content"));
        if over_content {
            target_name(f)?;
            return Some(true);
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::ContentFormat::{self, OpenAi, String};

    // More cases, each checked against vLLM's detection: crates/tokenizer/tests/tool_loop.rs.
    #[test]
    fn detects_loops_over_content() {
        let cases: &[(&str, ContentFormat)] = &[
            ("{% for m in messages %}{{ m['content'] }}{% endfor %}", String),
            ("{% for m in messages %}{% for p in m['content'] %}{{ p.text }}{% endfor %}{% endfor %}", OpenAi),
            ("{% macro r(c) %}{% for p in c %}x{% endfor %}{% endmacro %}{% for m in messages %}{{ r(m.content) }}{% endfor %}", OpenAi),
            ("{% for a, b in messages|batch(2) %}{% for p in a.content %}x{% endfor %}{% endfor %}", String),
            ("{% for m in messages %", String),
        ];
        for (src, want) in cases {
            assert_eq!(ContentFormat::detect(src), *want, "{src}");
        }
    }
}
