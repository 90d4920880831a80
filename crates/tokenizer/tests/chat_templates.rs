//! Chat templates rendered with minijinja against Hugging Face `apply_chat_template`
//! (fixtures/chat_templates.json, written by scripts/make_chat_template_fixtures.py): SmolLM2's
//! ChatML and the official Llama 3.1, Qwen2.5 and Mistral Nemo templates, with system
//! prompts, multi-turn chats, `add_generation_prompt`, `continue_final_message`, tools, tool
//! calls and results, `chat_template_kwargs`, and conversations the template must refuse.

use serde_json::Value;
use vllm_tokenizer::{ChatRequest, ChatTemplate};

#[test]
fn renders_like_transformers() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/chat_templates.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let str_of = |v: &Value| v.as_str().map(String::from);
    let (bos, eos) = (str_of(&fx["meta"]["bos_token"]), str_of(&fx["meta"]["eos_token"]));
    let mut checked = std::collections::BTreeMap::<String, usize>::new();
    for case in fx["cases"].as_array().unwrap() {
        let name = format!("{} / {}", case["template"].as_str().unwrap(), case["case"].as_str().unwrap());
        let source = fx["sources"][case["template"].as_str().unwrap()].as_str().unwrap();
        let tpl = ChatTemplate::new(source, bos.clone(), eos.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let messages = case["messages"].as_array().unwrap().clone();
        let kwargs = case["kwargs"].as_object().filter(|k| !k.is_empty());
        let req = ChatRequest {
            messages: &messages,
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
            continue_final_message: case["continue_final_message"].as_bool().unwrap(),
            tools: Some(&case["tools"]).filter(|t| !t.is_null()),
            documents: None,
            kwargs,
        };
        let got = tpl.render(&req);
        match (case.get("text").and_then(Value::as_str), case.get("error").and_then(Value::as_str)) {
            (Some(want), _) => {
                let got = got.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(got, want, "{name}");
            }
            (None, Some(err)) => {
                let e = got.expect_err(&name).to_string();
                // The template's own message (raise_exception) reaches the caller.
                let msg = err.split_once(": ").map_or(err, |(_, m)| m);
                assert!(e.contains(&msg[..msg.len().min(40)]), "{name}: {e} vs {err}");
            }
            _ => panic!("{name}: fixture has neither text nor error"),
        }
        *checked.entry(case["template"].as_str().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(checked.len(), 4, "{checked:?}");
    assert!(checked.values().all(|&n| n >= 8));
}
