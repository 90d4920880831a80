//! Compiling constraints under a budget: a small pool of compile threads with a bounded queue,
//! a deadline and cancellation per request, and a compile cache with a byte budget and LRU
//! eviction.
//!
//! A request's constraint is compiled off the engine loop (by the input processor), on one of
//! `compile_threads` workers with a large stack (grammar processing recurses). A caller waits
//! at most `compile_timeout`; a job whose caller has gone (timed out, cancelled, client
//! disconnected) is skipped if it has not started. Running compiles are not interrupted (neither
//! backend can be), which is why each backend also has size limits that keep one compile
//! bounded: llguidance's parser limits (lexer fuel, lexer states, grammar size) and, for
//! outlines, a determinization size limit and an index-size estimate checked before building.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use llguidance::api::ParserLimits;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::ParserFactory;
use outlines_core::prelude::Vocabulary;

use crate::guided::{
    CompiledGuide, Constraint, GuidanceBackend, GuideBackend, GuideBackendKind, GuidedDecodingParams, OutlinesBackend,
};
use crate::params::InvalidParam;

/// Budgets for guided decoding; the ones a deployment tunes are engine flags (the engine's
/// `EngineArgs` flattens this), the others keep their defaults.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct GuideLimits {
    /// Longest guided-decoding constraint (schema, regex, choices, grammar), in bytes.
    #[arg(long = "guided-decoding-max-constraint-bytes", default_value_t = 64 << 10)]
    pub max_spec_bytes: usize,
    /// outlines: most bytes of the determinized regex automaton.
    #[arg(skip = 32usize << 20)]
    pub max_dfa_bytes: usize,
    /// outlines: most bytes of the token index (estimated before it is built).
    #[arg(skip = 1usize << 30)]
    pub max_index_bytes: usize,
    /// guidance: most lexer states per constraint (1-2 kB each).
    #[arg(skip = 50_000usize)]
    pub max_lexer_states: usize,
    /// Memory kept for compiled constraints (least recently used evicted first), e.g. 512MiB.
    #[arg(long = "guided-decoding-cache", value_parser = parse_cache_bytes, default_value = "512MiB")]
    pub cache_bytes: usize,
    /// Seconds a request waits for its guided-decoding constraint to compile (then 400).
    #[arg(long = "guided-decoding-compile-timeout", value_parser = parse_seconds, default_value = "10")]
    pub compile_timeout: Duration,
    /// Threads compiling guided-decoding constraints.
    #[arg(long = "guided-decoding-compile-threads", default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub compile_threads: usize,
    /// Compiles waiting for a thread; past this, requests get a capacity error.
    #[arg(skip = 16usize)]
    pub max_queued_compiles: usize,
}

/// A non-negative, finite number of seconds.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("'{s}': seconds must be non-negative and finite"))
}

/// A byte size as a `usize`.
fn parse_cache_bytes(s: &str) -> Result<usize, String> {
    usize::try_from(parse_bytes(s)?).map_err(|_| format!("'{s}' is more bytes than this machine can address"))
}

/// Parses a byte size such as `4GiB`, `512MiB`, `2G`, `1000000` (the error says what a size
/// looks like; the caller names the setting). Every size flag of the engine takes this form.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("'{s}' is not a size like 4GiB");
    let n: f64 = num.parse().map_err(|_| bad())?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = n * mult;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("'{s}' is more bytes than there can be"));
    }
    Ok(bytes as u64)
}

impl Default for GuideLimits {
    fn default() -> Self {
        Self {
            max_spec_bytes: 64 << 10,
            max_dfa_bytes: 32 << 20,
            max_index_bytes: 1 << 30,
            max_lexer_states: 50_000,
            cache_bytes: 512 << 20,
            compile_timeout: Duration::from_secs(10),
            compile_threads: 1,
            max_queued_compiles: 16,
        }
    }
}

impl GuideLimits {
    /// llguidance's parser limits under these budgets.
    pub fn parser_limits(&self) -> ParserLimits {
        ParserLimits { max_lexer_states: self.max_lexer_states, ..ParserLimits::default() }
    }
}

/// Why a constraint was not compiled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GuideError {
    /// The constraint is invalid or over a size limit (a client error naming the field).
    #[error(transparent)]
    Invalid(#[from] InvalidParam),
    /// It did not compile within the deadline (a client error naming the field).
    #[error("invalid value for '{param}': the constraint did not compile within {seconds} s")]
    Timeout {
        /// The request field.
        param: &'static str,
        /// The deadline.
        seconds: f64,
    },
    /// Too many compiles are queued (capacity: retry later).
    #[error("too many guided-decoding compiles are queued; retry later")]
    Busy,
    /// The request went away first.
    #[error("the request was cancelled while its constraint compiled")]
    Cancelled,
}

type Compiled = Arc<dyn CompiledGuide>;

struct Job {
    params: GuidedDecodingParams,
    key: String,
    cancel: Arc<AtomicBool>,
    reply: mpsc::Sender<Result<Compiled, GuideError>>,
}

/// The compile cache: entries charged by [`CompiledGuide::memory_bytes`], least recently used
/// evicted first once over budget.
#[derive(Default)]
struct Cache {
    entries: HashMap<String, (Compiled, usize, u64)>,
    bytes: usize,
    clock: u64,
}

impl Cache {
    fn get(&mut self, key: &str) -> Option<Compiled> {
        self.clock += 1;
        let e = self.entries.get_mut(key)?;
        e.2 = self.clock;
        Some(e.0.clone())
    }

    fn insert(&mut self, key: String, c: Compiled, budget: usize) {
        let size = c.memory_bytes();
        if size > budget {
            return;
        }
        self.clock += 1;
        if let Some(old) = self.entries.insert(key, (c, size, self.clock)) {
            self.bytes -= old.1;
        }
        self.bytes += size;
        while self.bytes > budget {
            let Some(lru) = self.entries.iter().min_by_key(|e| (e.1).2).map(|e| e.0.clone()) else { break };
            if let Some(e) = self.entries.remove(&lru) {
                self.bytes -= e.1;
            }
        }
    }
}

struct CompilerInner {
    /// Each token's bytes (empty for special tokens, which are never text).
    tokens: Vec<Vec<u8>>,
    eos: u32,
    limits: GuideLimits,
    outlines: OnceLock<Arc<dyn GuideBackend>>,
    guidance: OnceLock<Result<Arc<dyn GuideBackend>, String>>,
    cache: Mutex<Cache>,
    pool: OnceLock<Result<SyncSender<Job>, String>>,
    compiles: AtomicU64,
}

/// Compiles constraints with their backends over one tokenizer's vocabulary, under
/// [`GuideLimits`], and caches them. Each backend is set up on first use. Cheap to clone.
#[derive(Clone)]
pub struct GuideCompiler {
    inner: Arc<CompilerInner>,
}

impl GuideCompiler {
    /// A compiler over `tokens` (id and raw bytes of every text token) with `eos` as the end,
    /// under the default limits.
    pub fn new(tokens: impl IntoIterator<Item = (u32, Vec<u8>)>, eos: u32) -> Self {
        Self::with_limits(tokens, eos, GuideLimits::default())
    }

    /// [`Self::new`] under `limits`.
    pub fn with_limits(tokens: impl IntoIterator<Item = (u32, Vec<u8>)>, eos: u32, limits: GuideLimits) -> Self {
        let mut table: Vec<Vec<u8>> = Vec::new();
        for (id, bytes) in tokens {
            let id = id as usize;
            if table.len() <= id {
                table.resize(id + 1, Vec::new());
            }
            table[id] = bytes;
        }
        if table.len() <= eos as usize {
            table.resize(eos as usize + 1, Vec::new());
        }
        table[eos as usize].clear();
        let inner = CompilerInner {
            tokens: table,
            eos,
            limits,
            outlines: OnceLock::new(),
            guidance: OnceLock::new(),
            cache: Mutex::default(),
            pool: OnceLock::new(),
            compiles: AtomicU64::new(0),
        };
        Self { inner: Arc::new(inner) }
    }

    /// The limits in force.
    pub fn limits(&self) -> &GuideLimits {
        &self.inner.limits
    }

    /// The backend of a kind, set up on first use.
    pub fn backend(&self, kind: GuideBackendKind) -> Result<Arc<dyn GuideBackend>, String> {
        let inner = &self.inner;
        match kind {
            GuideBackendKind::Outlines => Ok(inner
                .outlines
                .get_or_init(|| {
                    let mut vocabulary = Vocabulary::new(inner.eos);
                    for (id, bytes) in inner.tokens.iter().enumerate() {
                        if !bytes.is_empty() {
                            let _ = vocabulary.try_insert(bytes.clone(), id as u32);
                        }
                    }
                    Arc::new(OutlinesBackend {
                        vocabulary,
                        vocab_size: inner.tokens.len(),
                        limits: inner.limits.clone(),
                    })
                })
                .clone()),
            GuideBackendKind::Guidance => inner
                .guidance
                .get_or_init(|| {
                    let info = TokRxInfo::new(inner.tokens.len() as u32, inner.eos);
                    let trie = TokTrie::from(&info, &inner.tokens);
                    let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
                    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                    factory.quiet();
                    *factory.limits_mut() = inner.limits.parser_limits();
                    Ok(Arc::new(GuidanceBackend { factory, eos: inner.eos }) as Arc<dyn GuideBackend>)
                })
                .clone(),
        }
    }

    /// The cached compilation of `constraint`, if there is one.
    pub fn cached(&self, constraint: &Constraint) -> Option<Compiled> {
        self.inner.lock_cache().get(&constraint_key(constraint))
    }

    /// Compiles (or fetches) `constraint` on the calling thread. Slow for big automata with
    /// outlines: call it off the engine loop.
    pub fn compile(&self, constraint: &Constraint) -> Result<Compiled, String> {
        let key = constraint_key(constraint);
        if let Some(c) = self.inner.lock_cache().get(&key) {
            return Ok(c);
        }
        let compiled = self.backend(constraint.backend)?.compile(&constraint.spec)?;
        self.inner.compiles.fetch_add(1, Ordering::Relaxed);
        self.inner.lock_cache().insert(key, compiled.clone(), self.inner.limits.cache_bytes);
        Ok(compiled)
    }

    /// Checks, compiles (or fetches from the cache) a request's constraint on the compile
    /// pool, waiting at most `compile_timeout`; gives up as soon as `cancel` is set.
    pub fn compile_request(&self, params: &GuidedDecodingParams, cancel: &AtomicBool) -> Result<Compiled, GuideError> {
        params.check_shape(self.inner.limits.max_spec_bytes)?;
        let key = serde_json::to_string(params)
            .map_err(|e| InvalidParam { param: params.param(), message: e.to_string() })?;
        if let Some(c) = self.inner.lock_cache().get(&key) {
            return Ok(c);
        }
        let pool = self.pool().map_err(|_| GuideError::Busy)?;
        let (reply, rx) = mpsc::channel();
        let job_cancel = Arc::new(AtomicBool::new(false));
        let job = Job { params: params.clone(), key, cancel: job_cancel.clone(), reply };
        match pool.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => return Err(GuideError::Busy),
        }
        let timeout = self.inner.limits.compile_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                job_cancel.store(true, Ordering::Relaxed);
                return Err(GuideError::Timeout { param: params.param(), seconds: timeout.as_secs_f64() });
            }
            if cancel.load(Ordering::Relaxed) {
                job_cancel.store(true, Ordering::Relaxed);
                return Err(GuideError::Cancelled);
            }
            match rx.recv_timeout(left.min(Duration::from_millis(25))) {
                Ok(r) => return r,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(GuideError::Cancelled),
            }
        }
    }

    /// (entries, bytes) held by the compile cache, and constraints compiled so far.
    pub fn cache_stats(&self) -> (usize, usize, u64) {
        let c = self.inner.lock_cache();
        (c.entries.len(), c.bytes, self.inner.compiles.load(Ordering::Relaxed))
    }

    fn pool(&self) -> Result<&SyncSender<Job>, &String> {
        self.inner
            .pool
            .get_or_init(|| {
                let limits = &self.inner.limits;
                let (tx, rx) = mpsc::sync_channel::<Job>(limits.max_queued_compiles.max(1));
                let rx = Arc::new(Mutex::new(rx));
                for i in 0..limits.compile_threads.max(1) {
                    let rx = rx.clone();
                    // Workers hold the compiler weakly, so dropping the last handle ends them.
                    let weak = Arc::downgrade(&self.inner);
                    std::thread::Builder::new()
                        .name(format!("vllm-guide-compile-{i}"))
                        // Grammar processing recurses with the grammar's depth.
                        .stack_size(256 << 20)
                        .spawn(move || loop {
                            let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                                Ok(j) => j,
                                Err(_) => return,
                            };
                            let Some(inner) = weak.upgrade() else { return };
                            if job.cancel.load(Ordering::Relaxed) {
                                continue;
                            }
                            let compiler = GuideCompiler { inner };
                            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                compiler.compile_params(&job.params, &job.key)
                            }))
                            .unwrap_or_else(|_| {
                                Err(GuideError::Invalid(InvalidParam {
                                    param: job.params.param(),
                                    message: "the constraint could not be compiled (the compiler failed)".into(),
                                }))
                            });
                            let _ = job.reply.send(result);
                        })
                        .map_err(|e| e.to_string())?;
                }
                Ok(tx)
            })
            .as_ref()
    }

    /// On a compile thread: the checked constraint, compiled and cached under `key`.
    fn compile_params(&self, params: &GuidedDecodingParams, key: &str) -> Result<Compiled, GuideError> {
        if let Some(c) = self.inner.lock_cache().get(key) {
            return Ok(c);
        }
        let constraint = params.constraint()?;
        let compiled = self.compile(&constraint).map_err(|message| InvalidParam {
            param: constraint.param,
            message: format!("invalid constraint: {message}"),
        })?;
        self.inner.lock_cache().insert(key.to_string(), compiled.clone(), self.inner.limits.cache_bytes);
        Ok(compiled)
    }
}

impl CompilerInner {
    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn constraint_key(c: &Constraint) -> String {
    format!("{}\u{0}{}", c.backend.name(), c.spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(usize);

    impl CompiledGuide for Fake {
        fn start(&self) -> Box<dyn crate::GuideState> {
            unreachable!("not walked in this test")
        }
        fn memory_bytes(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn cache_evicts_least_recently_used_within_its_budget() {
        let mut c = Cache::default();
        c.insert("a".into(), Arc::new(Fake(40)), 100);
        c.insert("b".into(), Arc::new(Fake(40)), 100);
        assert!(c.get("a").is_some()); // a is now more recent than b
        c.insert("c".into(), Arc::new(Fake(40)), 100);
        assert!(c.get("b").is_none(), "b was the least recently used");
        assert!(c.get("a").is_some() && c.get("c").is_some());
        assert_eq!(c.bytes, 80);
        c.insert("huge".into(), Arc::new(Fake(1000)), 100);
        assert!(c.get("huge").is_none(), "an entry over the whole budget is not kept");
        assert_eq!(c.bytes, 80);
    }

    fn bytes_compiler(limits: GuideLimits) -> GuideCompiler {
        GuideCompiler::with_limits((0..=255u32).map(|b| (b, vec![b as u8])), 256, limits)
    }

    #[test]
    fn outlines_refuses_automata_over_its_limits() {
        let compiler = bytes_compiler(GuideLimits { max_index_bytes: 1 << 20, ..Default::default() });
        let p = |r: &str| GuidedDecodingParams {
            regex: Some(r.into()),
            backend: Some("outlines".into()),
            ..Default::default()
        };
        let never = AtomicBool::new(false);
        assert!(compiler.compile_request(&p("[a-c]{1,3}"), &never).is_ok());
        // 5,000 states x 257 tokens x 8 bytes is about 10 MiB: over the 1 MiB index budget.
        let err = compiler.compile_request(&p(".{0,5000}"), &never).err().expect("an error");
        assert!(
            matches!(&err, GuideError::Invalid(e) if e.param == "guided_regex" && e.message.contains("MiB")),
            "{err}"
        );
    }

    #[test]
    fn cancelled_and_oversized_requests_fail_without_compiling() {
        let compiler = bytes_compiler(GuideLimits { compile_timeout: Duration::from_millis(1), ..Default::default() });
        let p = GuidedDecodingParams { regex: Some("x{1,3}y".into()), ..Default::default() };
        let cancelled = AtomicBool::new(true);
        assert_eq!(compiler.compile_request(&p, &cancelled).err().expect("an error"), GuideError::Cancelled);
        let big = GuidedDecodingParams { regex: Some("z".repeat(70_000)), ..Default::default() };
        let err = compiler.compile_request(&big, &AtomicBool::new(false)).err().expect("an error");
        assert!(matches!(err, GuideError::Invalid(ref e) if e.param == "guided_regex"), "{err}");
    }
}
