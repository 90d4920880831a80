//! Reasoning parsers: a thinking model's output split into its reasoning and its answer
//! (vLLM's `--reasoning-parser` names), streamed and not, with the same rule either way.
//!
//! | name | tags | when the output starts in reasoning |
//! |------|------|------|
//! | `deepseek_r1` (DeepSeek R1, QwQ) | `<think>` .. `</think>` | always, unless the prompt closed the thinking (R1's template opens it) |
//! | `qwen3` (Qwen3, GLM-4.5 as `glm45`) | `<think>` .. `</think>` | when the output starts with `<think>` or the prompt left one open |
//! | `mistral` (Magistral) | `[THINK]` .. `[/THINK]` | as `qwen3` |
//!
//! A prompt "closes" the thinking when it ends with the end tag after its last start tag
//! (Qwen3's `enable_thinking: false` writes `<think>\n\n</think>\n\n`); it "leaves it open"
//! when its last start tag has no end tag after it (templates that open the block for the
//! model). Structured output waits for the end tag unless the prompt closed the thinking, as
//! in vLLM: the reasoning is free, the answer constrained.

/// A model family's reasoning tags (every family differs only in these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasoningParser {
    /// The tag that opens the reasoning.
    pub start: &'static str,
    /// The tag that ends it.
    pub end: &'static str,
    /// Whether an output whose prompt says nothing starts in reasoning even without the
    /// start tag (DeepSeek R1 writes its thinking straight away).
    pub open_by_default: bool,
}

const DEEPSEEK_R1: ReasoningParser = ReasoningParser { start: "<think>", end: "</think>", open_by_default: true };
const QWEN3: ReasoningParser = ReasoningParser { start: "<think>", end: "</think>", open_by_default: false };
const MISTRAL: ReasoningParser = ReasoningParser { start: "[THINK]", end: "[/THINK]", open_by_default: false };

/// The parsers' registry: each row the names `--reasoning-parser` takes for it (vLLM's
/// names and aliases) and its tags. `--help`, the flag's check and [`parser`] read it.
const PARSERS: &[(&[&str], ReasoningParser)] =
    &[(&["deepseek_r1"], DEEPSEEK_R1), (&["qwen3", "glm45"], QWEN3), (&["mistral"], MISTRAL)];

/// The parser `--reasoning-parser <name>` names.
pub fn parser(name: &str) -> Option<ReasoningParser> {
    PARSERS.iter().find(|(names, _)| names.contains(&name)).map(|&(_, p)| p)
}

/// Every name [`parser`] knows.
pub fn names() -> impl Iterator<Item = &'static str> + Clone {
    PARSERS.iter().flat_map(|(names, _)| names.iter().copied())
}

/// Where a prompt leaves the thinking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptState {
    /// Its last start tag has no end tag after it: the output starts in reasoning.
    Open,
    /// It ends with the end tag (thinking switched off): the output is all answer.
    Closed,
    /// Neither: the parser's default, or the output's own start tag, decides.
    Unsaid,
}

/// Where `prompt` leaves the thinking for `p`'s tags.
pub fn prompt_state(p: &ReasoningParser, prompt: &str) -> PromptState {
    match (prompt.rfind(p.start), prompt.rfind(p.end)) {
        (Some(s), e) if e.is_none_or(|e| e < s) => PromptState::Open,
        (_, Some(e)) if prompt[e + p.end.len()..].trim().is_empty() => PromptState::Closed,
        _ => PromptState::Unsaid,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// At the output's start: waiting to see whether it opens with the start tag.
    Start,
    Reasoning,
    Answer,
}

/// One output's split, fed its text as it streams; the same text fed at once splits the
/// same way.
#[derive(Debug, Clone)]
pub struct Splitter {
    start: &'static str,
    end: &'static str,
    /// Whether an output that does not begin with the start tag is reasoning.
    open: bool,
    phase: Phase,
    /// Text not yet given out: a possible start tag at the beginning, or a possible end tag's
    /// first bytes at the tail.
    pending: String,
}

/// What a piece of output holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    /// Thinking.
    pub reasoning: String,
    /// Answer.
    pub content: String,
}

impl Splitter {
    /// A split for an output of a prompt in `state`.
    pub fn new(p: &ReasoningParser, state: PromptState) -> Self {
        let (phase, open) = match state {
            PromptState::Open => (Phase::Start, true),
            PromptState::Closed => (Phase::Answer, false),
            PromptState::Unsaid => (Phase::Start, p.open_by_default),
        };
        Self { start: p.start, end: p.end, open, phase, pending: String::new() }
    }

    /// Splits a finished output at once.
    pub fn split_all(mut self, text: &str) -> Split {
        let mut s = self.feed(text);
        let rest = self.finish();
        s.reasoning.push_str(&rest.reasoning);
        s.content.push_str(&rest.content);
        s
    }

    /// The next piece of streamed text; what it could be is held back until it is known.
    pub fn feed(&mut self, delta: &str) -> Split {
        self.pending.push_str(delta);
        let mut out = Split::default();
        loop {
            match self.phase {
                Phase::Start => {
                    let t = self.pending.trim_start();
                    if let Some(rest) = t.strip_prefix(self.start) {
                        self.pending = rest.to_string();
                        self.phase = Phase::Reasoning;
                    } else if self.start.starts_with(t) {
                        return out; // could still be the start tag
                    } else {
                        self.phase = if self.open { Phase::Reasoning } else { Phase::Answer };
                    }
                }
                Phase::Reasoning => match self.pending.find(self.end) {
                    Some(i) => {
                        out.reasoning.push_str(&self.pending[..i]);
                        self.pending.drain(..i + self.end.len());
                        self.phase = Phase::Answer;
                    }
                    None => {
                        let keep = crate::render::partial_tail(&self.pending, self.end);
                        let cut = self.pending.len() - keep;
                        out.reasoning.extend(self.pending.drain(..cut));
                        return out;
                    }
                },
                Phase::Answer => {
                    out.content.push_str(&self.pending);
                    self.pending.clear();
                    return out;
                }
            }
        }
    }

    /// The output ended: whatever was held back goes where it stood.
    pub fn finish(&mut self) -> Split {
        let rest = std::mem::take(&mut self.pending);
        let reasoning = match self.phase {
            Phase::Start => self.open,
            Phase::Reasoning => true,
            Phase::Answer => false,
        };
        if reasoning {
            Split { reasoning: rest, content: String::new() }
        } else {
            Split { reasoning: String::new(), content: rest }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(p: &ReasoningParser, state: PromptState, text: &str) -> (String, String) {
        let whole = Splitter::new(p, state).split_all(text);
        // Streamed one character at a time, the pieces add up to the same split.
        let mut s = Splitter::new(p, state);
        let (mut r, mut c) = (String::new(), String::new());
        for ch in text.chars() {
            let d = s.feed(&ch.to_string());
            r.push_str(&d.reasoning);
            c.push_str(&d.content);
        }
        let d = s.finish();
        r.push_str(&d.reasoning);
        c.push_str(&d.content);
        assert_eq!((&whole.reasoning, &whole.content), (&r, &c), "streamed and whole differ on {text:?}");
        (r, c)
    }

    #[test]
    fn deepseek_r1_thinks_from_the_start() {
        let p = DEEPSEEK_R1;
        let u = PromptState::Unsaid;
        assert_eq!(both(&p, u, "Let me see.</think>\n\nIt is 4."), ("Let me see.".into(), "\n\nIt is 4.".into()));
        assert_eq!(both(&p, u, "<think>\nhm</think>4"), ("\nhm".into(), "4".into()));
        // Cut short before the end tag: all of it is reasoning.
        assert_eq!(both(&p, u, "still thinking </thi"), ("still thinking </thi".into(), String::new()));
        assert_eq!(both(&p, PromptState::Closed, "4</think>"), (String::new(), "4</think>".into()));
    }

    #[test]
    fn qwen3_thinks_only_when_it_says_so() {
        let p = QWEN3;
        let u = PromptState::Unsaid;
        assert_eq!(both(&p, u, "<think>\nok\n</think>\n\nHi!"), ("\nok\n".into(), "\n\nHi!".into()));
        assert_eq!(both(&p, u, "Hi there"), (String::new(), "Hi there".into()));
        assert_eq!(both(&p, u, "<thin"), (String::new(), "<thin".into()));
        assert_eq!(both(&p, u, "  <think>a"), ("a".into(), String::new()));
        // The template opened the block: the output is the thinking's inside.
        assert_eq!(both(&p, PromptState::Open, "a</think>b"), ("a".into(), "b".into()));
        let m = MISTRAL;
        assert_eq!(both(&m, u, "[THINK]x[/THINK]y"), ("x".into(), "y".into()));
    }

    #[test]
    fn prompt_states() {
        let p = QWEN3;
        assert_eq!(prompt_state(&p, "<|im_start|>assistant\n<think>\n"), PromptState::Open);
        assert_eq!(prompt_state(&p, "<|im_start|>assistant\n<think>\n\n</think>\n\n"), PromptState::Closed);
        assert_eq!(prompt_state(&p, "<|im_start|>assistant\n"), PromptState::Unsaid);
        // An earlier turn's closed thinking says nothing about this one.
        assert_eq!(prompt_state(&p, "<think>a</think>b<|im_end|><|im_start|>assistant\n"), PromptState::Unsaid);
    }
}
