//! The parsers on each family's real format, whole and streamed: any streaming of a text (one
//! character at a time, or pieces of every size) gives the same calls, argument text for
//! argument text, as parsing the whole text, and never sends a call's text as content.

use serde_json::Value;

use super::*;

fn calls(parser: &str, text: &str) -> Parsed {
    super::parser(parser).unwrap().parse(text)
}

fn call(name: &str, args: Value) -> ToolCall {
    ToolCall { name: name.into(), arguments: args.to_string() }
}

#[test]
fn hermes() {
    let p = calls(
        "hermes",
        "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n\
         <tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>",
    );
    assert_eq!(p.content.as_deref(), Some("Let me check."));
    assert_eq!(
        p.calls,
        vec![call("get_weather", serde_json::json!({"city": "Paris"})), call("get_time", serde_json::json!({}))]
    );
    // Not JSON inside: all content.
    let p = calls("hermes", "<tool_call>not json</tool_call>");
    assert!(p.calls.is_empty() && p.content.is_some());
    assert_eq!(calls("hermes", "Just text.").content.as_deref(), Some("Just text."));
}

#[test]
fn llama3_json() {
    let p = calls("llama3_json", "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"SF\"}}");
    assert_eq!(p.calls, vec![call("get_weather", serde_json::json!({"city": "SF"}))]);
    assert_eq!(p.content, None);
    let p = calls(
        "llama3_json",
        "{\"name\": \"a\", \"parameters\": {\"x\": 1}}; {\"name\": \"b\", \"parameters\": {\"y\": [1, 2]}}",
    );
    assert_eq!(p.calls.len(), 2);
    assert_eq!(p.calls[1], call("b", serde_json::json!({"y": [1, 2]})));
    assert!(calls("llama3_json", "The answer is {x}.").calls.is_empty());
}

#[test]
fn mistral() {
    let p = calls("mistral", "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lyon\"}}]");
    assert_eq!(p.calls, vec![call("get_weather", serde_json::json!({"city": "Lyon"}))]);
    let p = calls("mistral", "Sure.[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Nice\"}[TOOL_CALLS]noop[ARGS]{}");
    assert_eq!(p.content.as_deref(), Some("Sure."));
    assert_eq!(
        p.calls,
        vec![call("get_weather", serde_json::json!({"city": "Nice"})), call("noop", serde_json::json!({}))]
    );
}

#[test]
fn pythonic() {
    let p = calls(
        "pythonic",
        "[get_weather(city='San Francisco', unit=\"c\", days=3), lookup(ids=[1, 2], opts={'a': True, 'b': None})]",
    );
    assert_eq!(
        p.calls,
        vec![
            call("get_weather", serde_json::json!({"city": "San Francisco", "unit": "c", "days": 3})),
            call("lookup", serde_json::json!({"ids": [1, 2], "opts": {"a": true, "b": null}})),
        ]
    );
    assert!(calls("pythonic", "[not a call]").calls.is_empty());
    // Nesting past the bound is not parsed (and does not recurse without end).
    let deep = format!("[f(x={}1{})]", "[".repeat(100), "]".repeat(100));
    assert!(calls("pythonic", &deep).calls.is_empty());
}

#[test]
fn qwen3_xml() {
    let p = calls(
        "qwen3_xml",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nBeijing\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
    );
    assert_eq!(p.calls, vec![call("get_weather", serde_json::json!({"city": "Beijing", "days": 3}))]);
}

#[test]
fn deepseek_v3() {
    let text = "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Tokyo\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let p = calls("deepseek_v3", text);
    assert_eq!(p.content.as_deref(), Some("Checking."));
    assert_eq!(p.calls, vec![call("get_weather", serde_json::json!({"city": "Tokyo"}))]);
    let v31 = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Oslo\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    assert_eq!(calls("deepseek_v31", v31).calls, vec![call("get_weather", serde_json::json!({"city": "Oslo"}))]);
}

#[test]
fn openai_json() {
    let p = calls("openai", "{\"tool_calls\": [{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}]}");
    assert_eq!(p.calls, vec![call("f", serde_json::json!({"a": 1}))]);
}

#[test]
fn every_listed_parser_exists() {
    assert_eq!(names().count(), 11);
    for name in names() {
        assert!(parser(name).is_some(), "{name}");
    }
    assert!(parser("nope").is_none());
}

/// What a stream says about a whole text fed in pieces of `sizes` characters (cycled):
/// the content, each call's name and argument fragments, in order.
fn streamed(parser: &dyn ToolParser, text: &str, sizes: &[usize]) -> (String, Vec<(String, Vec<String>)>) {
    let mut s = parser.stream();
    let chars: Vec<char> = text.chars().collect();
    let (mut events, mut at, mut k) = (Vec::new(), 0, 0);
    while at < chars.len() {
        let n = sizes[k % sizes.len()].max(1).min(chars.len() - at);
        events.extend(s.feed(&chars[at..at + n].iter().collect::<String>()));
        (at, k) = (at + n, k + 1);
    }
    events.extend(s.finish());
    let (mut content, mut calls, mut open) = (String::new(), Vec::<(String, Vec<String>)>::new(), None);
    for e in events {
        match e {
            ToolStreamEvent::Content(c) => content.push_str(&c),
            ToolStreamEvent::Start { index, name } => {
                assert_eq!((index, open), (calls.len(), None), "{text}: calls start in order, one at a time");
                calls.push((name, Vec::new()));
                open = Some(index);
            }
            ToolStreamEvent::Arguments { index, fragment } => {
                assert_eq!(open, Some(index), "{text}");
                calls[index].1.push(fragment);
            }
            ToolStreamEvent::End { index } => {
                assert_eq!(open.take(), Some(index), "{text}");
            }
        }
    }
    assert_eq!(open, None, "{text}: finish ends every call");
    (content, calls)
}

/// Each family's outputs: calls (one, several, content around them, arguments of every JSON
/// kind, arguments before the name) and texts that are not calls.
const FIXTURES: &[(&str, &str)] = &[
    ("hermes", "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3}}\n</tool_call>\n<tool_call>\n{\"arguments\": {\"tz\": \"Europe/Paris\", \"when\": [1.50, -2e3, true, null, {\"a\": \"\\u00e9\\n\\\"q\\\"\"}]}, \"name\": \"get_time\"}\n</tool_call>"),
    ("hermes", "<tool_call>{\"name\": \"noop\"}</tool_call>"),
    ("hermes", "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": [1, 2]}\"}</tool_call>"),
    ("hermes", "Just text, with a < and a <tool and <tool_call but no call."),
    ("hermes", "<tool_call>not json</tool_call>"),
    ("llama3_json", "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"San Francisco\", \"unit\": \"celsius\"}}"),
    ("llama3_json", " {\"name\": \"a\", \"parameters\": {\"x\": 1}}; {\"name\": \"b\", \"parameters\": {\"y\": [1, 2]}}"),
    ("llama3_json", "The answer is {x}."),
    ("llama3_json", "{\"answer\": 42}"),
    ("mistral", "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lyon\"}}, {\"name\": \"noop\", \"arguments\": {}}]"),
    ("mistral", "Sure.[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Nice\", \"n\": [1, 2]}[TOOL_CALLS]noop[ARGS]{}"),
    ("mistral", "No [TOOL call here."),
    ("pythonic", "[get_weather(city='San Francisco', unit=\"c\", days=3), lookup(ids=[1, 2], opts={'a': True, 'b': None}), now()]"),
    ("pythonic", "<|python_start|>[f(text='a, b) c', n=-1.5,)]<|python_end|>"),
    ("pythonic", "[not a call]"),
    ("pythonic", "Plain answer."),
    ("qwen3_xml", "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nBeijing, the capital\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=opts>\n{\"a\": [1, 2]}\n</parameter>\n<parameter=flag>\ntrue\n</parameter>\n<parameter=note>\nnull pointer \"quoted\"\nline two\n</parameter>\n</function>\n</tool_call>"),
    ("qwen3_xml", "<tool_call>\n<function=noop>\n</function>\n</tool_call><tool_call>\n<function=f>\n<parameter=x>\n3 days\n</parameter>\n</function>\n</tool_call>"),
    ("qwen3_xml", "<tool_call>no function here</tool_call>"),
    ("deepseek_v3", "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Tokyo\", \"n\": 2}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>noop\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    ("deepseek_v31", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Oslo\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    ("deepseek_v3", "Nothing to call."),
    ("openai", "{\"tool_calls\": [{\"name\": \"f\", \"arguments\": {\"a\": 1}}, {\"type\": \"function\", \"function\": {\"name\": \"g\", \"arguments\": \"{\\\"b\\\": 2}\"}}]}"),
    ("openai", "[{\"name\": \"f\", \"arguments\": {\"a\": \"x\"}}]"),
    ("openai", "{\"name\": \"f\", \"arguments\": {\"a\": 1}}"),
    ("openai", "Hello there."),
];

#[test]
fn streaming_gives_the_whole_texts_calls() {
    let chunkings: &[&[usize]] = &[&[1], &[2], &[3], &[5, 1, 8], &[7, 2], &[13], &[1000]];
    for (name, text) in FIXTURES {
        let p = super::parser(name).unwrap();
        let whole = p.parse(text);
        for sizes in chunkings {
            let (content, calls) = streamed(p.as_ref(), text, sizes);
            let got: Vec<ToolCall> =
                calls.iter().map(|(n, a)| ToolCall { name: n.clone(), arguments: a.concat() }).collect();
            assert_eq!(got, whole.calls, "{name} {sizes:?}: {text}");
            if whole.calls.is_empty() {
                // Not calls: the whole text is content, as it came.
                assert_eq!(content, *text, "{name} {sizes:?}");
            } else {
                assert_eq!(
                    Some(content.trim()).filter(|c| !c.is_empty()),
                    whole.content.as_deref(),
                    "{name} {sizes:?}"
                );
            }
        }
        // One character at a time, a call's arguments arrive in pieces as they are written.
        let (_, calls) = streamed(p.as_ref(), text, &[1]);
        for (n, frags) in &calls {
            let args = frags.concat();
            // (Arguments written before the name wait for it.)
            if args.len() > 8 && !text.contains("{\"arguments\"") {
                assert!(frags.len() > 1, "{name}: {n}'s arguments {args} came whole");
            }
        }
    }
    // Every parser of the registry has a fixture with calls.
    for (names, _) in PARSERS {
        let with_calls =
            FIXTURES.iter().filter(|(n, t)| names.contains(n) && !super::parser(n).unwrap().parse(t).calls.is_empty());
        assert!(with_calls.count() > 0, "{names:?}");
    }
}

#[test]
fn forced_choices_stream_too() {
    let args = "{\"city\": \"Paris\", \"days\": [1, 2]}";
    for sizes in [&[1][..], &[4], &[100]] {
        let mut s = named_stream("get_weather");
        let mut events = Vec::new();
        for piece in args.as_bytes().chunks(sizes[0]) {
            events.extend(s.feed(std::str::from_utf8(piece).unwrap()));
        }
        events.extend(s.finish());
        assert_eq!(events.first(), Some(&ToolStreamEvent::Start { index: 0, name: "get_weather".into() }));
        let frags: String = events
            .iter()
            .filter_map(|e| {
                if let ToolStreamEvent::Arguments { fragment, .. } = e {
                    Some(fragment.as_str())
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(frags, serde_json::from_str::<Value>(args).unwrap().to_string());
        assert_eq!(events.last(), Some(&ToolStreamEvent::End { index: 0 }));
    }
    let text = "[{\"name\": \"a\", \"parameters\": {\"x\": 1}}, {\"name\": \"b\", \"parameters\": {}}]";
    let mut s = required_stream();
    let mut events: Vec<ToolStreamEvent> = text.chars().flat_map(|c| s.feed(&c.to_string())).collect();
    events.extend(s.finish());
    let starts: Vec<&ToolStreamEvent> = events.iter().filter(|e| matches!(e, ToolStreamEvent::Start { .. })).collect();
    assert_eq!(starts.len(), 2);
    assert!(!events.iter().any(|e| matches!(e, ToolStreamEvent::Content(_))));
}

#[test]
fn long_calls_stream_in_linear_time() {
    // 200 KB of arguments (with commas, quotes and newlines), one character at a time: each
    // format reads it in well under a second (a reader that re-read its text per character
    // would take minutes).
    let long: String = "word, \"quoted\" (x)\n".repeat(10_000);
    let json = Value::String(long.clone()).to_string();
    let py = long.replace('\\', "\\\\").replace('\'', "\\'").replace('\n', "\\n");
    let cases = [
        ("hermes", format!("<tool_call>{{\"name\": \"f\", \"arguments\": {{\"text\": {json}}}}}</tool_call>")),
        (
            "qwen3_xml",
            format!("<tool_call>\n<function=f>\n<parameter=text>\n{long}\n</parameter>\n</function>\n</tool_call>"),
        ),
        ("pythonic", format!("[f(text='{py}')]")),
        ("openai", format!("{{\"name\": \"f\", \"arguments\": {{\"text\": {json}}}}}")),
        ("mistral", format!("[TOOL_CALLS]f[ARGS]{{\"text\": {json}}}")),
    ];
    for (name, text) in cases {
        let p = super::parser(name).unwrap();
        let t = std::time::Instant::now();
        let (_, calls) = streamed(p.as_ref(), &text, &[1]);
        assert!(t.elapsed().as_secs_f64() < 1.0, "{name}: {:?}", t.elapsed());
        let whole = p.parse(&text).calls;
        assert_eq!(calls.len(), 1, "{name}");
        assert_eq!(whole.len(), 1, "{name}");
        assert!(calls[0].1.concat() == whole[0].arguments, "{name}: the streamed arguments differ");
        assert!(whole[0].arguments.len() > 190_000, "{name}");
        assert!(calls[0].1.len() > 1000, "{name}: the text value streams as it comes");
    }
}
