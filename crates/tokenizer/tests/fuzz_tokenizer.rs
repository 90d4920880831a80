//! Fuzzed tokenizer loaders (issue #29): mutants of real `tokenizer.json` /
//! `tokenizer_config.json` folders and of the tokenizer metadata of real GGUF files (seeds in
//! `fixtures/fuzz/tokenizer/`), each loaded as the engine loads it and, when it loads, used:
//! texts encoded and decoded, ids (in and out of the vocabulary) detokenized incrementally, the
//! chat template rendered. The property: a typed error or a working tokenizer, never a panic,
//! an abort or an allocation past the cap (the harness is `crates/models/tests/fuzz/mod.rs`;
//! `cargo xtask fuzz tokenizer --time <s>` runs it longer).

#[path = "../../models/tests/fuzz/mod.rs"]
mod fuzz;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use fuzz::{interesting, Outcome};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use vllm_tokenizer::{ChatRequest, IncrementalDetokenizer, Tokenizer};

#[global_allocator]
static ALLOC: fuzz::CappedAlloc = fuzz::CappedAlloc;

const TEXTS: &[&str] = &["Hello world", "  leading spaces and\ttabs\n", "héllo 世界 🙂", "<|im_start|>user", ""];

/// Uses a tokenizer that loaded: encodes, decodes, detokenizes ids in and past the vocabulary,
/// renders its chat template. Errors are fine; panics are not.
fn exercise(t: &Tokenizer, rng: &mut ChaCha8Rng) -> Outcome {
    for text in TEXTS {
        if let Ok(ids) = t.encode(text, true) {
            let _ = t.decode(&ids, rng.random_bool(0.5));
        }
    }
    let n = t.vocab_size() as u32;
    let ids: Vec<u32> =
        (0..16).map(|_| if rng.random_bool(0.8) { rng.random_range(0..n.max(1)) } else { rng.random() }).collect();
    let _ = t.check_ids(&ids);
    let mut detok = IncrementalDetokenizer::new(&ids[..2], true);
    for &id in &ids {
        let _ = detok.push(t, id);
        let _ = (t.id_to_token(id), t.token_bytes(id));
    }
    if let Ok(tpl) = t.chat_template_for(None) {
        let messages =
            vec![json!({"role": "system", "content": "Be brief."}), json!({"role": "user", "content": "Hi"})];
        let req = ChatRequest {
            messages: &messages,
            add_generation_prompt: true,
            continue_final_message: false,
            tools: None,
            documents: None,
            kwargs: None,
        };
        let _ = tpl.render(&req);
    }
    Outcome::Served
}

fn load_dir(dir: &Path, rng: &mut ChaCha8Rng) -> Outcome {
    match Tokenizer::from_hf_dir(dir) {
        Ok(t) => exercise(&t, rng),
        Err(_) => Outcome::Refused,
    }
}

fn load_gguf(md: &HashMap<String, Value>, rng: &mut ChaCha8Rng) -> Outcome {
    match Tokenizer::from_gguf(md) {
        Ok(t) => exercise(&t, rng),
        Err(_) => Outcome::Refused,
    }
}

/// A hostile string: empty, long, control characters, invalid pieces, byte-fallback lookalikes.
fn string(rng: &mut ChaCha8Rng) -> String {
    match rng.random_range(0..6) {
        0 => String::new(),
        1 => "a".repeat(rng.random_range(1..100_000)),
        2 => "\u{0}\u{1}\u{fffd}".into(),
        3 => "<0xZZ>".into(),
        4 => "<0xFF>".into(),
        _ => "\u{2581}\u{2581}".into(),
    }
}

/// A value of another (or the same) type: interesting integers, floats, strings, arrays cut,
/// emptied, grown or with elements replaced.
fn mutate_value(rng: &mut ChaCha8Rng, v: &Value) -> Value {
    match (rng.random_range(0..8), v) {
        (0..=2, Value::Array(a)) if !a.is_empty() => {
            let mut a = a.clone();
            match rng.random_range(0..4) {
                0 => a.truncate(rng.random_range(0..a.len())),
                1 => a.clear(),
                2 => {
                    let i = rng.random_range(0..a.len());
                    a[i] = mutate_value(rng, &a[i]);
                }
                _ => {
                    let extra = a[rng.random_range(0..a.len())].clone();
                    a.extend(std::iter::repeat_n(extra, rng.random_range(1..1000)));
                }
            }
            Value::Array(a)
        }
        (3, _) => Value::String(string(rng)),
        (4, _) => Value::U32(interesting(rng, 0) as u32),
        (5, _) => Value::I32(-(interesting(rng, 0) as i32).abs()),
        (6, _) => Value::F32([f32::NAN, f32::INFINITY, -1e30, 0.0][rng.random_range(0..4)]),
        _ => Value::U64(interesting(rng, v.to_u64().unwrap_or(1))),
    }
}

#[test]
fn tokenizer() {
    let dir = fuzz::work_dir("tokenizer");
    let mut gguf: Vec<HashMap<String, Value>> = Vec::new();
    let mut folders: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for path in fuzz::corpus("tokenizer") {
        match path.file_name().and_then(|f| f.to_str()) {
            Some(f) if f.ends_with(".gguf") => {
                let mut file = std::fs::File::open(&path).unwrap();
                gguf.push(gguf_file::Content::read(&mut file).unwrap().metadata);
            }
            Some("tokenizer.json") => {
                let config = std::fs::read(path.with_file_name("tokenizer_config.json")).unwrap_or_default();
                folders.push((std::fs::read(&path).unwrap(), config));
            }
            _ => {}
        }
    }
    assert!(!gguf.is_empty() && !folders.is_empty(), "the tokenizer corpus");
    let mut rng = rand::SeedableRng::seed_from_u64(0);
    let write = |json: &[u8], config: &[u8]| {
        std::fs::write(dir.join("tokenizer.json"), json).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
    };
    for md in &gguf {
        assert_eq!(load_gguf(md, &mut rng), Outcome::Served, "a GGUF seed must load");
    }
    for (json, config) in &folders {
        write(json, config);
        assert_eq!(load_dir(&dir, &mut rng), Outcome::Served, "a tokenizer.json seed must load");
    }
    let counts = fuzz::run("tokenizer", |_, rng| {
        if rng.random_bool(0.5) {
            let mut md = gguf[rng.random_range(0..gguf.len())].clone();
            let keys: Vec<String> = md.keys().filter(|k| k.starts_with("tokenizer.")).cloned().collect();
            for _ in 0..rng.random_range(1..=3) {
                let key = &keys[rng.random_range(0..keys.len())];
                match rng.random_range(0..6) {
                    0 => drop(md.remove(key)),
                    _ => {
                        let v = md.get(key).cloned().unwrap_or(Value::U32(0));
                        md.insert(key.clone(), mutate_value(rng, &v));
                    }
                }
            }
            load_gguf(&md, rng)
        } else {
            let (json, config) = &folders[rng.random_range(0..folders.len())];
            if rng.random_bool(0.7) {
                write(&fuzz::mutate_json(rng, json), config);
            } else {
                write(json, &fuzz::mutate_json(rng, config));
            }
            load_dir(&dir, rng)
        }
    });
    assert!(counts[0] > 0 && counts[1] > 0, "mutants must both fail and load: {counts:?}");
}
