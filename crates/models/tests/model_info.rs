//! `inspect` (what `cargo xtask model-info` prints) on the architecture fixtures and on GGUF
//! files written here, checked against independent counts.

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use vllm_models::{inspect, KvLayout};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models").join(name)
}

/// Parameters and bytes from the safetensors header, parsed here as plain JSON.
fn header_counts(file: &Path) -> (u64, u64) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let (mut params, mut size) = (0, 0);
    for (k, v) in header.as_object().unwrap() {
        if k == "__metadata__" {
            continue;
        }
        params += v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).product::<u64>();
        let off = v["data_offsets"].as_array().unwrap();
        size += off[1].as_u64().unwrap() - off[0].as_u64().unwrap();
    }
    (params, size)
}

#[test]
fn hf_folders() {
    for (name, arch, kv_heads, heads, sliding) in [
        ("llama", "LlamaForCausalLM", 2, 4, None),
        ("mistral", "MistralForCausalLM", 2, 4, Some((2, 8))),
        ("gemma2", "Gemma2ForCausalLM", 2, 4, Some((1, 8))),
        ("opt", "OPTForCausalLM", 4, 4, None),
        ("gpt2", "GPT2LMHeadModel", 4, 4, None),
    ] {
        let dir = fixture(name);
        let info = inspect(&dir).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let (params, size) = header_counts(&dir.join("model.safetensors"));
        assert_eq!(info.architecture, arch);
        assert!(info.supported);
        assert_eq!((info.parameters, info.weight_bytes), (params, size), "{name}");
        assert_eq!(info.dtypes.keys().collect::<Vec<_>>(), ["F32"], "{name}");
        assert_eq!(info.quantization, None);
        let ctx = config.get("max_position_embeddings").or(config.get("n_positions")).unwrap().as_u64().unwrap();
        assert_eq!(info.context_length, Some(ctx as usize), "{name}");
        let layers = config.get("num_hidden_layers").or(config.get("n_layer")).unwrap().as_u64().unwrap() as usize;
        let kv = info.kv.clone().unwrap();
        assert_eq!(kv, KvLayout { layers, heads, kv_heads, head_dim: 16, sliding }, "{name}");
        // Keys and values, every layer, 4 bytes each in the CPU cache.
        assert_eq!(kv.bytes_per_token(DType::F32), 2 * layers * kv_heads * 16 * 4);
        let text = info.to_string();
        for needle in [arch, "parameters:", "quantization:    none", "bytes/token in f32"] {
            assert!(text.contains(needle), "{name}: {needle} missing from\n{text}");
        }
    }
}

#[test]
fn embedding_models_have_no_kv_cache() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"{"architectures": ["BertModel"], "hidden_size": 8, "max_position_embeddings": 512,
        "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 16, "vocab_size": 4}"#;
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let t = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &[("embeddings.word_embeddings.weight", t)].into(),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let info = inspect(dir.path()).unwrap();
    assert_eq!((info.parameters, info.kv.clone(), info.context_length), (32, None, Some(512)));
    assert!(info.to_string().contains("keeps no KV cache"), "{info}");
}

fn write_gguf(path: &Path, file_type: Option<u32>) {
    use gguf_file::Value;
    let mut md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(2)),
        ("llama.embedding_length", Value::U32(256)),
        ("llama.feed_forward_length", Value::U32(512)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("llama.context_length", Value::U32(4096)),
        ("llama.vocab_size", Value::U32(32)),
    ];
    if let Some(t) = file_type {
        md.push(("general.file_type", Value::U32(t)));
    }
    let dev = &Device::Cpu;
    let norm = QTensor::quantize(&Tensor::ones(256, DType::F32, dev).unwrap(), GgmlDType::F32).unwrap();
    let q8 = QTensor::quantize(&Tensor::ones((32, 256), DType::F32, dev).unwrap(), GgmlDType::Q8_0).unwrap();
    let q6 = QTensor::quantize(&Tensor::ones((64, 256), DType::F32, dev).unwrap(), GgmlDType::Q6K).unwrap();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let tensors = [("output_norm.weight", &norm), ("token_embd.weight", &q8), ("blk.0.attn_v.weight", &q6)];
    gguf_file::write(&mut std::fs::File::create(path).unwrap(), &md_refs, &tensors).unwrap();
}

#[test]
fn gguf_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_gguf(&path, None);
    let info = inspect(&path).unwrap();
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.parameters, 256 + 32 * 256 + 64 * 256);
    // F32: 4 bytes a value; Q8_0: 34 bytes per 32 values; Q6_K: 210 bytes per 256 values.
    assert_eq!(info.weight_bytes, 256 * 4 + 32 * 256 / 32 * 34 + 64 * 210);
    assert_eq!(
        info.dtypes.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>(),
        [("F32", 256), ("Q6_K", 64 * 256), ("Q8_0", 32 * 256)]
    );
    // Without general.file_type, the quantized type holding the most parameters.
    assert_eq!(info.quantization.as_deref(), Some("Q6_K"));
    assert_eq!(info.context_length, Some(4096));
    let kv = info.kv.unwrap();
    assert_eq!((kv.layers, kv.heads, kv.kv_heads, kv.head_dim), (2, 4, 1, 64));
    assert_eq!(kv.bytes_per_token(DType::F16), 2 * 2 * 64 * 2);

    write_gguf(&path, Some(15));
    assert_eq!(inspect(&path).unwrap().quantization.as_deref(), Some("Q4_K_M (GGUF file type 15)"));
}

#[test]
fn not_a_model_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    std::fs::write(&path, b"not gguf").unwrap();
    let err = inspect(&path).unwrap_err().to_string();
    assert!(err.contains("not a valid GGUF"), "{err}");
    let err = inspect(dir.path()).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
}
