//! `LLM::chat`: one conversation or a batch, the model's template or a custom one,
//! `continue_final_message`, and clear errors.

mod common;

use common::{assert_clean, llm_with};
use serde_json::json;
use vllm_engine::{ChatOptions, Error, SamplingParams};

#[test]
fn chat_renders_the_template_and_answers() {
    // The answer below is the float32 model's (the quantized default answers this prompt
    // differently: its first token is a near tie).
    let llm = llm_with(|a| a.quantization = vllm_engine::Quantization::None);
    let q = vec![json!({"role": "user", "content": "What is the capital of France?"})];
    let params = SamplingParams::greedy(30);
    let out = llm.chat(q.clone(), params.clone(), &ChatOptions::default()).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].outputs[0].text, "The capital of France is Paris.");
    // The prompt is the model's template applied to the conversation.
    let want = llm.with_engine(|e| {
        let tok = e.tokenizer();
        let text = tok
            .chat_template_for(None)
            .unwrap()
            .render(&vllm_engine::ChatRequest { messages: &q, add_generation_prompt: true, ..Default::default() })
            .unwrap();
        assert!(text.ends_with("<|im_start|>assistant\n"), "{text:?}");
        tok.encode(&text, false).unwrap()
    });
    assert_eq!(out[0].prompt_token_ids, want);

    // A batch, answered in order.
    let other = vec![json!({"role": "user", "content": "List three primary colors."})];
    let batch = llm.chat(vec![q.clone(), other], params.clone(), &ChatOptions::default()).unwrap();
    assert_eq!(batch.len(), 2);
    assert_eq!(batch[0].outputs[0].text, out[0].outputs[0].text);

    // A custom template, and continuing the final message.
    let plain = ChatOptions {
        chat_template: Some("{% for m in messages %}{{ m['content'] }}{% endfor %}".into()),
        ..Default::default()
    };
    let c = llm
        .chat(vec![json!({"role": "user", "content": "The capital of France is"})], SamplingParams::greedy(3), &plain)
        .unwrap();
    assert!(c[0].outputs[0].text.starts_with(" Paris"), "{:?}", c[0].outputs[0].text);
    let partial = vec![q[0].clone(), json!({"role": "assistant", "content": "The capital of France"})];
    let cont = ChatOptions { continue_final_message: true, add_generation_prompt: false, ..Default::default() };
    let c = llm.chat(partial.clone(), SamplingParams::greedy(3), &cont).unwrap();
    assert!(c[0].outputs[0].text.starts_with(" is"), "{:?}", c[0].outputs[0].text);

    // Errors name what is wrong, and nothing is left behind.
    let both = ChatOptions { continue_final_message: true, ..Default::default() };
    assert!(matches!(llm.chat(partial, params.clone(), &both), Err(Error::InvalidArgument { param: "messages", .. })));
    let raising =
        ChatOptions { chat_template: Some("{{ raise_exception('no system messages') }}".into()), ..Default::default() };
    match llm.chat(q.clone(), params.clone(), &raising) {
        Err(Error::InvalidArgument { param: "messages", message }) => assert!(message.contains("no system messages")),
        other => panic!("{other:?}"),
    }
    let broken = ChatOptions { chat_template: Some("{% for %}".into()), ..Default::default() };
    assert!(matches!(llm.chat(q, params, &broken), Err(Error::InvalidArgument { param: "chat_template", .. })));
    assert_clean(&llm);
}
