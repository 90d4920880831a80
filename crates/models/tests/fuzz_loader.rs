//! Fuzzed model loaders (issue #29): mutants of real GGUF files, safetensors files and
//! `config.json` files (seeds in `fixtures/fuzz/{gguf,safetensors,config}/`), each described
//! (`inspect`, what model-info and the engine's configuration read) and loaded as the engine
//! loads them, and when one loads, run for a step over a small paged cache. The property: a
//! typed error or a model that runs, never a panic, an abort or an allocation past the cap
//! (`fuzz/mod.rs` has the harness and its knobs; `cargo xtask fuzz <target> --time <s>` runs
//! one target longer).

mod fuzz;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fuzz::{flip_bytes, interesting, mutate_json, Outcome};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use vllm_kernels::{AttnMetadata, KvCache, SeqAttn};
use vllm_models::bert::BertEmbedder;
use vllm_models::{inspect, load_gguf, load_hf_dir, CausalLM, LoadOptions, MatrixFormat, StepInput};

#[global_allocator]
static ALLOC: fuzz::CappedAlloc = fuzz::CappedAlloc;

/// A cache block larger than this is not allocated by the harness (the engine sizes its cache
/// from its memory budget and refuses a block that does not fit it).
const MAX_BLOCK_BYTES: usize = 64 << 20;

/// One step of two tokens (ids 0 and 1, positions 0 and 1) over a one-block cache.
fn step(model: &dyn CausalLM) -> Outcome {
    let (shape, block) = (model.attn_shape(), 16);
    let per_layer = KvCache::bytes_per_token(shape, DType::F32).saturating_mul(block);
    if per_layer.saturating_mul(model.num_layers()) > MAX_BLOCK_BYTES {
        return Outcome::Refused;
    }
    let run = || -> vllm_models::Result<()> {
        let caches = (0..model.num_layers())
            .map(|_| KvCache::new(1, block, shape, &Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let meta = AttnMetadata::new(block, vec![SeqAttn { query_len: 2, context_len: 2, block_table: vec![0] }]);
        let t = |v: &[u32]| Tensor::new(v, &Device::Cpu);
        let input = StepInput {
            input_ids: t(&[0, 1])?,
            positions: t(&[0, 1])?,
            logits_indices: t(&[1])?,
            attn: &meta,
            between_layers: None,
        };
        let logits = model.forward(&input, &caches)?;
        // What the engine's warm-up step checks.
        if logits.dims() != [1, model.vocab_size()] {
            return Err(vllm_models::Error::Format(format!("logits {:?}", logits.dims())));
        }
        Ok(())
    };
    if run().is_ok() {
        Outcome::Served
    } else {
        Outcome::StepFailed
    }
}

/// Load options: the CPU's default (the file's own formats) or the dequantized reference path.
fn options(rng: &mut ChaCha8Rng) -> LoadOptions {
    let matrices = if rng.random_bool(0.5) { MatrixFormat::Native } else { MatrixFormat::Dense };
    LoadOptions { dtype: DType::F32, matrices }
}

// ---------------------------------------------------------------------------------------------
// GGUF

/// The numeric fields of a GGUF header, as (offset, width) pairs: version, counts, metadata
/// lengths, types and integer values (a few elements of each array), tensor dimensions, types
/// and offsets. Parsed here, independently of the loader.
fn gguf_fields(b: &[u8]) -> Vec<(usize, usize)> {
    struct P<'a> {
        b: &'a [u8],
        at: usize,
        fields: Vec<(usize, usize)>,
    }
    impl P<'_> {
        fn num(&mut self, width: usize, record: bool) -> Option<u64> {
            let bytes = self.b.get(self.at..self.at + width)?;
            let mut v = [0u8; 8];
            v[..width].copy_from_slice(bytes);
            if record {
                self.fields.push((self.at, width));
            }
            self.at += width;
            Some(u64::from_le_bytes(v))
        }
        fn string(&mut self) -> Option<()> {
            let n = self.num(8, true)? as usize;
            self.at = self.at.checked_add(n).filter(|&e| e <= self.b.len())?;
            Some(())
        }
        fn value(&mut self, ty: u64, record: bool) -> Option<()> {
            match ty {
                0 | 1 | 7 => self.num(1, record).map(drop),
                2 | 3 => self.num(2, record).map(drop),
                4..=6 => self.num(4, record).map(drop),
                10..=12 => self.num(8, record).map(drop),
                8 => self.string(),
                9 => {
                    let elem = self.num(4, true)?;
                    let n = self.num(8, true)?;
                    for i in 0..n {
                        self.value(elem, i < 4)?;
                    }
                    Some(())
                }
                _ => None,
            }
        }
    }
    let mut p = P { b, at: 4, fields: Vec::new() };
    let parse = |p: &mut P| -> Option<()> {
        p.num(4, true)?;
        let tensors = p.num(8, true)?;
        let kvs = p.num(8, true)?;
        for _ in 0..kvs {
            p.string()?;
            let ty = p.num(4, true)?;
            p.value(ty, true)?;
        }
        for _ in 0..tensors {
            p.string()?;
            let dims = p.num(4, true)?;
            for _ in 0..dims {
                p.num(8, true)?;
            }
            p.num(4, true)?;
            p.num(8, true)?;
        }
        Some(())
    };
    parse(&mut p);
    p.fields
}

/// A mutant of a GGUF file: header integers replaced by interesting values, header bytes
/// flipped, tensor bytes flipped, or the file cut short.
fn mutate_gguf(rng: &mut ChaCha8Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    let fields = gguf_fields(seed);
    let header_end = fields.last().map_or(b.len(), |(at, w)| at + w);
    for _ in 0..rng.random_range(1..=3) {
        match rng.random_range(0..10) {
            0..=6 => {
                let (at, width) = fields[rng.random_range(0..fields.len())];
                if at + width > b.len() {
                    continue; // cut off by an earlier mutation
                }
                let mut v = [0u8; 8];
                v[..width].copy_from_slice(&b[at..at + width]);
                let new = interesting(rng, u64::from_le_bytes(v)).to_le_bytes();
                b[at..at + width].copy_from_slice(&new[..width]);
            }
            7 => {
                let end = header_end.min(b.len());
                flip_bytes(rng, &mut b, 0..end)
            }
            8 => {
                let len = b.len();
                flip_bytes(rng, &mut b, header_end.min(len)..len)
            }
            _ if b.is_empty() => {}
            _ => {
                let at = rng.random_range(0..b.len());
                b.truncate(at);
            }
        }
    }
    b
}

fn run_gguf(path: &Path, rng: &mut ChaCha8Rng) -> Outcome {
    let _ = inspect(path);
    match load_gguf(path, options(rng), &Device::Cpu) {
        Ok((model, _)) => step(&*model),
        Err(_) => Outcome::Refused,
    }
}

#[test]
fn gguf() {
    let seeds: Vec<(PathBuf, Vec<u8>)> =
        fuzz::corpus("gguf").into_iter().map(|p| (p.clone(), std::fs::read(p).unwrap())).collect();
    let dir = fuzz::work_dir("gguf");
    let mut rng = rand::SeedableRng::seed_from_u64(0);
    for (path, _) in &seeds {
        assert_eq!(run_gguf(path, &mut rng), Outcome::Served, "the seed {} must serve", path.display());
    }
    let path = dir.join("mutant.gguf");
    let counts = fuzz::run("gguf", |_, rng| {
        let (_, seed) = &seeds[rng.random_range(0..seeds.len())];
        std::fs::write(&path, mutate_gguf(rng, seed)).unwrap();
        run_gguf(&path, rng)
    });
    assert!(counts[0] > 0 && counts[1] > 0, "mutants must both fail and load: {counts:?}");
}

// ---------------------------------------------------------------------------------------------
// Hugging Face folders: safetensors and config.json

/// A folder to load: a seed's `config.json` and its model's safetensors.
struct Folder {
    config: Vec<u8>,
    safetensors: Vec<u8>,
    encoder: bool,
}

/// The seed folders of the `safetensors` target (`fixtures/fuzz/safetensors/<name>/`) or the
/// `config` target (each `fixtures/fuzz/config/<name>.json` over the same architecture's
/// `fixtures/models/<name>/model.safetensors`, or a tiny random BERT).
fn folders(target: &str) -> Vec<Folder> {
    let mut out = Vec::new();
    for path in fuzz::corpus(target) {
        let (config, safetensors) = match target {
            "safetensors" if path.file_name().is_some_and(|f| f == "model.safetensors") => {
                (std::fs::read(path.with_file_name("config.json")).unwrap(), std::fs::read(&path).unwrap())
            }
            "config" => {
                let name = path.file_stem().unwrap().to_string_lossy().to_string();
                let st = match name.as_str() {
                    "bert" => tiny_bert(),
                    _ => std::fs::read(fuzz::root().join("fixtures/models").join(&name).join("model.safetensors"))
                        .unwrap(),
                };
                (std::fs::read(&path).unwrap(), st)
            }
            _ => continue,
        };
        let encoder = String::from_utf8_lossy(&config).contains("BertModel");
        out.push(Folder { config, safetensors, encoder });
    }
    assert!(!out.is_empty(), "no {target} seeds");
    out
}

/// A random BERT's weights for `fixtures/fuzz/config/bert.json` (width 32, 2 layers of 4 heads,
/// MLP 64, 100 tokens, 64 positions).
fn tiny_bert() -> Vec<u8> {
    let (h, inter, vocab, pos) = (32, 64, 100, 64);
    let dev = &Device::Cpu;
    let r = |shape: &[usize]| Tensor::randn(0f32, 0.5, shape, dev).unwrap();
    let mut t: Vec<(String, Tensor)> = vec![
        ("embeddings.word_embeddings.weight".into(), r(&[vocab, h])),
        ("embeddings.position_embeddings.weight".into(), r(&[pos, h])),
        ("embeddings.token_type_embeddings.weight".into(), r(&[2, h])),
        ("embeddings.LayerNorm.weight".into(), r(&[h])),
        ("embeddings.LayerNorm.bias".into(), r(&[h])),
    ];
    for l in 0..2 {
        let p = format!("encoder.layer.{l}");
        for (name, out, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", inter, h),
            ("output.dense", h, inter),
        ] {
            t.push((format!("{p}.{name}.weight"), r(&[out, inp])));
            t.push((format!("{p}.{name}.bias"), r(&[out])));
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            t.push((format!("{p}.{norm}.weight"), r(&[h])));
            t.push((format!("{p}.{norm}.bias"), r(&[h])));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    candle_core::safetensors::save(&t.into_iter().collect(), &path).unwrap();
    std::fs::read(path).unwrap()
}

/// A safetensors file mutated: its header's JSON (shapes, offsets, dtypes) as
/// [`mutate_json`] does, its header length, or bytes flipped or cut.
fn mutate_safetensors(rng: &mut ChaCha8Rng, seed: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let (header, data) = (&seed[8..8 + n], &seed[8 + n..]);
    match rng.random_range(0..10) {
        0..=5 => {
            let mut h = mutate_json(rng, header);
            // Keep the data aligned as the format wants (padding with spaces).
            while !h.len().is_multiple_of(8) {
                h.push(b' ');
            }
            let len = if rng.random_range(0..4) == 0 { interesting(rng, h.len() as u64) } else { h.len() as u64 };
            [&len.to_le_bytes()[..], &h, data].concat()
        }
        6 => {
            let mut b = seed.to_vec();
            b[..8].copy_from_slice(&interesting(rng, n as u64).to_le_bytes());
            b
        }
        7 | 8 => {
            let mut b = seed.to_vec();
            flip_bytes(rng, &mut b, 0..8 + n);
            b
        }
        _ => seed[..rng.random_range(0..seed.len())].to_vec(),
    }
}

fn run_folder(dir: &Path, encoder: bool, rng: &mut ChaCha8Rng) -> Outcome {
    let _ = inspect(dir);
    if encoder {
        return match BertEmbedder::load_dir(dir, options(rng), &Device::Cpu) {
            Ok(m) if m.embed(&[vec![1, 2, 3]]).is_ok() => Outcome::Served,
            Ok(_) => Outcome::StepFailed,
            Err(_) => Outcome::Refused,
        };
    }
    match load_hf_dir(dir, options(rng), &Device::Cpu) {
        Ok(model) => step(&*model),
        Err(_) => Outcome::Refused,
    }
}

fn fuzz_folders(target: &str, mutate_config: bool) {
    let seeds = folders(target);
    let dir = fuzz::work_dir(target);
    let mut rng = rand::SeedableRng::seed_from_u64(0);
    let write = |config: &[u8], st: &[u8]| {
        std::fs::write(dir.join("config.json"), config).unwrap();
        std::fs::write(dir.join("model.safetensors"), st).unwrap();
    };
    for s in &seeds {
        write(&s.config, &s.safetensors);
        assert_eq!(run_folder(&dir, s.encoder, &mut rng), Outcome::Served, "a {target} seed must serve");
    }
    let counts = fuzz::run(target, |_, rng| {
        let s = &seeds[rng.random_range(0..seeds.len())];
        if mutate_config {
            write(&mutate_json(rng, &s.config), &s.safetensors);
        } else {
            write(&s.config, &mutate_safetensors(rng, &s.safetensors));
        }
        run_folder(&dir, s.encoder, rng)
    });
    assert!(counts[0] > 0 && counts[1] > 0, "mutants must both fail and load: {counts:?}");
}

#[test]
fn safetensors() {
    fuzz_folders("safetensors", false);
}

#[test]
fn config() {
    fuzz_folders("config", true);
}
