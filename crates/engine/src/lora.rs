//! The engine's LoRA adapters (vLLM's `LoRARequest` and its CPU-resident adapter cache): an
//! adapter named by a request is read from disk, checked against the model and installed on
//! its layers the first time it is used (or when loaded ahead), kept resident up to
//! `max_cpu_loras` (least recently used evicted first, never one a request is using), and each
//! request holds a [`LoraLease`] on its adapter until it finishes, so an adapter unloaded or
//! evicted meanwhile stays installed for the requests already using it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vllm_models::lora::{LoraAdapter, LoraRegistry};

use crate::{Error, Result};

/// An adapter a request runs with (vLLM's `LoRARequest`): its name (what the API calls it),
/// a positive id unique among adapters, and its folder.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LoraRequest {
    /// The adapter's name.
    pub name: String,
    /// Its id (`lora_int_id`): positive, one per adapter.
    pub id: u32,
    /// A PEFT folder (`adapter_config.json` + `adapter_model.safetensors`), or a llama.cpp
    /// GGUF adapter file.
    pub path: PathBuf,
}

impl LoraRequest {
    /// An adapter request.
    pub fn new(name: impl Into<String>, id: u32, path: impl Into<PathBuf>) -> Self {
        Self { name: name.into(), id, path: path.into() }
    }
}

/// LoRA limits (the engine's flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraLimits {
    /// Most distinct adapters in one step (`--max-loras`).
    pub max_loras: usize,
    /// Largest rank an adapter may have (`--max-lora-rank`).
    pub max_rank: usize,
    /// Most adapters kept installed at once (`--max-cpu-loras`).
    pub max_cpu_loras: usize,
}

impl LoraLimits {
    /// The limits `--enable-lora` asks for (`None` without it), checked: LoRA runs on the CPU,
    /// `--max-loras` and `--max-lora-rank` positive, the rank at most 1024, `--max-cpu-loras`
    /// at least `--max-loras`. One check for the generation engine and the embedder.
    pub(crate) fn from_args(args: &crate::EngineArgs, device: &candle_core::Device) -> Result<Option<Self>> {
        let invalid = |param, message: String| Error::InvalidArgument { param, message };
        if !args.enable_lora {
            return Ok(None);
        }
        if device.is_cuda() {
            return Err(invalid(
                "enable_lora",
                "LoRA adapters run on the CPU; on CUDA they are not supported yet".into(),
            ));
        }
        if args.max_loras == 0 || args.max_lora_rank == 0 {
            return Err(invalid("max_loras", "--max-loras and --max-lora-rank must be positive".into()));
        }
        if args.max_lora_rank > 1024 {
            return Err(invalid("max_lora_rank", format!("{} (at most 1024)", args.max_lora_rank)));
        }
        let max_cpu_loras = args.max_cpu_loras.unwrap_or(args.max_loras);
        if max_cpu_loras < args.max_loras {
            return Err(invalid(
                "max_cpu_loras",
                format!(
                    "{max_cpu_loras} is fewer than --max-loras {} (every adapter of a step is loaded)",
                    args.max_loras
                ),
            ));
        }
        if matches!(args.lora_dtype.as_str(), "float16" | "bfloat16") {
            tracing::info!("--lora-dtype {}: adapters compute in float32 here", args.lora_dtype);
        }
        Ok(Some(Self { max_loras: args.max_loras, max_rank: args.max_lora_rank, max_cpu_loras }))
    }
}

/// A lease on `req`'s adapter from `manager` (loading it on first use); no adapter asked for
/// is none, an adapter asked of an engine without `--enable-lora` an error naming
/// `lora_request`.
pub(crate) fn lease(manager: Option<&LoraManager>, req: Option<&LoraRequest>) -> Result<Option<LoraLease>> {
    let Some(req) = req else { return Ok(None) };
    match manager {
        Some(m) => m.acquire(req).map(Some),
        None => Err(Error::InvalidArgument {
            param: "lora_request",
            message: "this engine serves no LoRA adapters (start it with --enable-lora)".into(),
        }),
    }
}

/// A request's hold on its adapter: while any lease lives, the adapter stays installed.
#[derive(Debug, Clone)]
pub struct LoraLease {
    /// The adapter's id.
    pub id: u32,
    _held: Arc<()>,
}

/// An installed adapter.
struct Resident {
    request: LoraRequest,
    held: Arc<()>,
    last_used: u64,
}

struct Inner {
    residents: HashMap<u32, Resident>,
    /// Unloaded or evicted while in use: removed from the layers once their leases are gone.
    retired: Vec<(u32, Arc<()>)>,
    clock: u64,
}

/// The adapters of one engine.
pub struct LoraManager {
    registry: Arc<LoraRegistry>,
    limits: LoraLimits,
    inner: Mutex<Inner>,
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument { param: "lora", message: message.into() }
}

impl LoraManager {
    /// The adapters of a model whose layers were recorded in `registry`.
    pub fn new(registry: Arc<LoraRegistry>, limits: LoraLimits) -> Self {
        let inner = Inner { residents: HashMap::new(), retired: Vec::new(), clock: 0 };
        Self { registry, limits, inner: Mutex::new(inner) }
    }

    /// The limits.
    pub fn limits(&self) -> LoraLimits {
        self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adapters retired while in use whose last request has finished leave the layers.
    fn purge(&self, inner: &mut Inner) {
        let registry = &self.registry;
        inner.retired.retain(|(id, held)| {
            let free = Arc::strong_count(held) == 1;
            if free {
                registry.remove(*id);
            }
            !free
        });
    }

    /// Makes `req`'s adapter resident (read, checked and installed on first use) and returns
    /// a lease on it. A name or id already taken by another adapter, a bad adapter, or no room
    /// (every resident adapter in use and `max_cpu_loras` reached) is an error; nothing
    /// changes then.
    pub fn acquire(&self, req: &LoraRequest) -> Result<LoraLease> {
        if req.id == 0 {
            return Err(invalid(format!("adapter '{}': ids start at 1", req.name)));
        }
        if let Some(lease) = self.resident(req)? {
            return Ok(lease);
        }
        // Read and checked without the lock (a large adapter takes a while); the registry
        // then takes it whole or refuses it whole.
        let adapter = LoraAdapter::load(&req.path, self.limits.max_rank).map_err(|e| invalid(e.to_string()))?;
        // Checked against the model before room is made for it: a bad adapter evicts nothing.
        self.registry.check(&adapter).map_err(|e| invalid(format!("adapter '{}': {e}", req.name)))?;
        let mut inner = self.lock();
        self.purge(&mut inner);
        if let Some(lease) = self.resident_locked(&mut inner, req)? {
            return Ok(lease); // another request loaded it meanwhile
        }
        if let Some(other) = inner.residents.values().find(|r| r.request.name == req.name) {
            return Err(invalid(format!("the name '{}' is taken by adapter id {}", req.name, other.request.id)));
        }
        if inner.retired.iter().any(|(id, _)| *id == req.id) {
            return Err(invalid(format!("id {} belongs to an adapter still finishing its requests", req.id)));
        }
        // Room: evict the least recently used adapter no request is using.
        if inner.residents.len() >= self.limits.max_cpu_loras {
            let victim = inner
                .residents
                .iter()
                .filter(|(_, r)| Arc::strong_count(&r.held) == 1)
                .min_by_key(|(_, r)| r.last_used)
                .map(|(&id, _)| id);
            let Some(victim) = victim else {
                return Err(Error::Overloaded(format!(
                    "{} adapters are in use, the most --max-cpu-loras keeps at once",
                    inner.residents.len()
                )));
            };
            inner.residents.remove(&victim);
            self.registry.remove(victim);
        }
        self.registry.install(req.id, &adapter).map_err(|e| invalid(format!("adapter '{}': {e}", req.name)))?;
        let held = Arc::new(());
        inner.clock += 1;
        let last_used = inner.clock;
        inner.residents.insert(req.id, Resident { request: req.clone(), held: held.clone(), last_used });
        tracing::info!(adapter = %req.name, id = req.id, rank = adapter.rank, modules = adapter.modules.len(), "LoRA adapter loaded");
        Ok(LoraLease { id: req.id, _held: held })
    }

    /// A lease on `req`'s adapter when it is resident already.
    fn resident(&self, req: &LoraRequest) -> Result<Option<LoraLease>> {
        let mut inner = self.lock();
        self.resident_locked(&mut inner, req)
    }

    fn resident_locked(&self, inner: &mut Inner, req: &LoraRequest) -> Result<Option<LoraLease>> {
        inner.clock += 1;
        let clock = inner.clock;
        let Some(r) = inner.residents.get_mut(&req.id) else { return Ok(None) };
        if r.request.name != req.name {
            return Err(invalid(format!("id {} is adapter '{}', not '{}'", req.id, r.request.name, req.name)));
        }
        r.last_used = clock;
        Ok(Some(LoraLease { id: req.id, _held: r.held.clone() }))
    }

    /// Loads an adapter ahead of its first request (so that request is not slowed by it).
    pub fn load(&self, req: &LoraRequest) -> Result<()> {
        self.acquire(req).map(drop)
    }

    /// Unloads an adapter by name: new requests can no longer use it; requests using it now
    /// finish with it. Returns whether it was loaded.
    pub fn unload(&self, name: &str) -> bool {
        let mut inner = self.lock();
        let Some(id) = inner.residents.iter().find(|(_, r)| r.request.name == name).map(|(&id, _)| id) else {
            return false;
        };
        if let Some(r) = inner.residents.remove(&id) {
            inner.retired.push((id, r.held));
        }
        self.purge(&mut inner);
        true
    }

    /// The names of adapters by id (for metrics and logs).
    pub fn names(&self) -> HashMap<u32, String> {
        self.lock().residents.iter().map(|(&id, r)| (id, r.request.name.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// The tiny Llama fixture's layers recorded for adapters, and a manager over them.
    fn manager(max_cpu_loras: usize) -> (Box<dyn vllm_models::CausalLM>, LoraManager) {
        let registry = Arc::new(LoraRegistry::default());
        let model = vllm_models::load_hf_dir_with(
            &root().join("fixtures/models/llama"),
            vllm_models::LoadOptions::float32(),
            &candle_core::Device::Cpu,
            Some(registry.clone()),
        )
        .unwrap();
        (model, LoraManager::new(registry, LoraLimits { max_loras: 2, max_rank: 64, max_cpu_loras }))
    }

    fn adapter(name: &str, id: u32, fixture: &str) -> LoraRequest {
        LoraRequest::new(name, id, root().join("fixtures/lora").join(fixture))
    }

    #[test]
    fn residents_are_bounded_and_leases_keep_adapters_installed() {
        let (_model, m) = manager(1);
        let a = m.acquire(&adapter("a", 1, "llama_r8_qv")).unwrap();
        // Every resident adapter in use and --max-cpu-loras reached: capacity (a 503), not a 400.
        let err = m.acquire(&adapter("b", 2, "llama_r8_qv_b")).unwrap_err();
        assert!(matches!(err, Error::Overloaded(_)), "{err}");
        assert_eq!(m.names().into_values().collect::<Vec<_>>(), ["a"]);
        // Once a's request finishes, b evicts it (least recently used, not in use).
        drop(a);
        let _b = m.acquire(&adapter("b", 2, "llama_r8_qv_b")).unwrap();
        assert_eq!(m.names().into_values().collect::<Vec<_>>(), ["b"]);
        // The same id under another name, or a name under another id, is refused.
        let err = m.acquire(&adapter("c", 2, "llama_r4_all")).unwrap_err().to_string();
        assert!(err.contains("id 2 is adapter 'b'"), "{err}");
        assert!(m.acquire(&adapter("x", 0, "llama_r8_qv")).is_err(), "id 0 is the base model");
    }

    #[test]
    fn unloading_lets_running_requests_finish() {
        let (_model, m) = manager(4);
        let lease = m.acquire(&adapter("a", 1, "llama_r8_qv")).unwrap();
        assert!(m.unload("a"));
        assert!(!m.unload("a"), "already unloaded");
        assert!(m.names().is_empty());
        // Its id still belongs to it while its request runs.
        let err = m.acquire(&adapter("a2", 1, "llama_r4_all")).unwrap_err().to_string();
        assert!(err.contains("still finishing"), "{err}");
        drop(lease);
        m.load(&adapter("a2", 1, "llama_r4_all")).unwrap();
        assert_eq!(m.names().into_values().collect::<Vec<_>>(), ["a2"]);
        // A bad adapter changes nothing.
        assert!(m.load(&adapter("bad", 3, "bad_nan")).is_err());
        assert_eq!(m.names().len(), 1);
    }

    #[test]
    fn an_adapter_the_model_refuses_evicts_nothing() {
        let (_model, m) = manager(1);
        m.load(&adapter("a", 1, "llama_r8_qv")).unwrap();
        // Read fine, but for modules the model lacks: refused before a's room is taken.
        let err = m.load(&adapter("missing", 2, "bad_target_missing")).unwrap_err().to_string();
        assert!(err.contains("which this model does not have"), "{err}");
        assert_eq!(m.names().into_values().collect::<Vec<_>>(), ["a"]);
    }
}
