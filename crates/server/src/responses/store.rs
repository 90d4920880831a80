//! The stored responses (`store: true`, OpenAI's default): what `GET /v1/responses/{id}`
//! returns and `previous_response_id` continues. In memory, bounded in count
//! (`--responses-store-max-entries`) and bytes (`--responses-store-max-bytes`), the oldest
//! evicted first; each response readable only with the API key that created it (another key
//! gets the 404 an unknown id gets).
//!
//! Each entry holds its whole conversation (the inputs of every response of its chain, then
//! its own output), so continuing a chain reads one entry whatever the chain's length; a
//! conversation is bounded by the context it had to fit and by the message limit.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::oneshot;

use super::protocol::ResponseObject;
use crate::state::KeyScope;

/// One stored response.
pub(crate) struct Stored {
    /// The key that created it.
    pub owner: KeyScope,
    pub response: ResponseObject,
    /// The conversation as chat messages, inputs then output, without the `instructions`:
    /// what a request naming this response as its `previous_response_id` continues.
    pub conversation: Arc<Vec<Value>>,
    /// While a background response runs: stops it.
    pub cancel: Option<oneshot::Sender<()>>,
}

struct Entry {
    stored: Stored,
    /// Its place in the eviction order (creation order).
    seq: u64,
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Creation order: the first is evicted first.
    order: BTreeMap<u64, String>,
    bytes: usize,
    next_seq: u64,
}

/// Why a response cannot be cancelled.
#[derive(Debug)]
pub(crate) enum CancelError {
    /// No such response for this key.
    NotFound,
    /// It is not running in the background (finished, or never was): as it is.
    NotRunning(Box<ResponseObject>),
}

/// The store (cheap to share: one lock, held for map operations only).
pub(crate) struct ResponseStore {
    inner: Mutex<Inner>,
    max_entries: usize,
    max_bytes: usize,
}

/// The bytes an entry is charged: its response and conversation as JSON.
fn size(s: &Stored) -> usize {
    json_len(&s.response) + json_len(&*s.conversation)
}

/// A value's length as JSON, counted without keeping the text.
fn json_len<T: serde::Serialize + ?Sized>(v: &T) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    let _ = serde_json::to_writer(&mut counter, v);
    counter.0
}

impl ResponseStore {
    /// A store of at most `max_entries` responses and `max_bytes` bytes (0 entries: nothing is
    /// stored).
    pub(crate) fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), max_entries, max_bytes }
    }

    /// Whether responses are stored at all.
    pub(crate) fn enabled(&self) -> bool {
        self.max_entries > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores (or replaces) a response, evicting the oldest until it fits. Returns false when
    /// it is larger than the whole store (it is then not kept).
    pub(crate) fn put(&self, id: &str, stored: Stored) -> bool {
        let bytes = size(&stored);
        if !self.enabled() || bytes > self.max_bytes {
            tracing::warn!(id, bytes, "a response is not stored: larger than --responses-store-max-bytes");
            return false;
        }
        let mut inner = self.lock();
        let seq = match inner.entries.remove(id) {
            Some(old) => {
                inner.bytes -= old.bytes;
                old.seq
            }
            None => {
                let seq = inner.next_seq;
                inner.next_seq += 1;
                inner.order.insert(seq, id.to_string());
                seq
            }
        };
        inner.bytes += bytes;
        inner.entries.insert(id.to_string(), Entry { stored, seq, bytes });
        while inner.entries.len() > self.max_entries || inner.bytes > self.max_bytes {
            let Some((&oldest, _)) = inner.order.iter().find(|(&s, _)| s != seq) else { break };
            if let Some(victim) = inner.order.remove(&oldest) {
                if let Some(e) = inner.entries.remove(&victim) {
                    inner.bytes -= e.bytes;
                    tracing::debug!(id = %victim, "evicted from the response store");
                }
            }
        }
        true
    }

    /// A stored response and its conversation, for the key that created it.
    pub(crate) fn get(&self, id: &str, owner: KeyScope) -> Option<(ResponseObject, Arc<Vec<Value>>)> {
        let inner = self.lock();
        let e = inner.entries.get(id).filter(|e| e.stored.owner == owner)?;
        Some((e.stored.response.clone(), e.stored.conversation.clone()))
    }

    /// A background response finished: its final state, unless it was cancelled (or evicted)
    /// meanwhile.
    pub(crate) fn finish(&self, id: &str, response: ResponseObject, conversation: Arc<Vec<Value>>) {
        let owner = {
            let inner = self.lock();
            match inner.entries.get(id) {
                Some(e) if e.stored.response.status != "cancelled" => e.stored.owner,
                _ => return,
            }
        };
        self.put(id, Stored { owner, response, conversation, cancel: None });
    }

    /// Stops a running background response: its status becomes `cancelled`.
    pub(crate) fn cancel(&self, id: &str, owner: KeyScope) -> Result<ResponseObject, CancelError> {
        let mut inner = self.lock();
        let e = inner.entries.get_mut(id).filter(|e| e.stored.owner == owner).ok_or(CancelError::NotFound)?;
        let Some(stop) = e.stored.cancel.take() else {
            return Err(CancelError::NotRunning(Box::new(e.stored.response.clone())));
        };
        let _ = stop.send(());
        e.stored.response.status = "cancelled".into();
        Ok(e.stored.response.clone())
    }

    /// Removes a response (a running one stops).
    pub(crate) fn delete(&self, id: &str, owner: KeyScope) -> bool {
        let mut inner = self.lock();
        if !inner.entries.get(id).is_some_and(|e| e.stored.owner == owner) {
            return false;
        }
        if let Some(e) = inner.entries.remove(id) {
            inner.bytes -= e.bytes;
            inner.order.remove(&e.seq);
            if let Some(stop) = e.stored.cancel {
                let _ = stop.send(());
            }
        }
        true
    }

    /// Stored responses and their bytes.
    #[cfg(test)]
    fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.entries.len(), inner.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(owner: Option<u64>, text: &str) -> Stored {
        let response = super::super::render::Echo::default().response("completed", Vec::new(), None);
        Stored {
            owner: KeyScope(owner),
            response,
            conversation: Arc::new(vec![serde_json::json!({"role": "user", "content": text})]),
            cancel: None,
        }
    }

    #[test]
    fn bounded_in_count_and_bytes_oldest_first() {
        let store = ResponseStore::new(3, 1 << 20);
        for i in 0..5 {
            assert!(store.put(&format!("r{i}"), stored(None, "hi")));
        }
        assert_eq!(store.usage().0, 3);
        assert!(store.get("r0", KeyScope(None)).is_none() && store.get("r1", KeyScope(None)).is_none());
        assert!(store.get("r4", KeyScope(None)).is_some());

        let one = size(&stored(None, &"x".repeat(1000)));
        let store = ResponseStore::new(100, one * 2 + 10);
        for i in 0..4 {
            assert!(store.put(&format!("r{i}"), stored(None, &"x".repeat(1000))));
        }
        assert_eq!(store.usage(), (2, 2 * one));
        assert!(store.get("r3", KeyScope(None)).is_some() && store.get("r1", KeyScope(None)).is_none());
        // Larger than the whole store: not kept, nothing evicted for it.
        assert!(!store.put("big", stored(None, &"x".repeat(10_000))));
        assert_eq!(store.usage().0, 2);
        // Deleting frees its bytes.
        assert!(store.delete("r3", KeyScope(None)));
        assert_eq!(store.usage(), (1, one));
    }

    #[test]
    fn scoped_to_the_creating_key() {
        let store = ResponseStore::new(10, 1 << 20);
        store.put("r", stored(Some(0), "hi"));
        assert!(store.get("r", KeyScope(Some(0))).is_some());
        assert!(store.get("r", KeyScope(Some(1))).is_none());
        assert!(matches!(store.cancel("r", KeyScope(Some(1))), Err(CancelError::NotFound)));
        assert!(!store.delete("r", KeyScope(Some(1))));
        assert!(matches!(store.cancel("r", KeyScope(Some(0))), Err(CancelError::NotRunning(_))));
    }

    #[test]
    fn cancel_stops_a_running_response_and_keeps_it_cancelled() {
        let store = ResponseStore::new(10, 1 << 20);
        let (tx, mut rx) = oneshot::channel();
        let mut s = stored(None, "hi");
        s.response.status = "in_progress".into();
        s.cancel = Some(tx);
        store.put("r", s);
        assert_eq!(store.cancel("r", KeyScope(None)).unwrap().status, "cancelled");
        assert!(rx.try_recv().is_ok());
        // The finished run does not overwrite the cancellation.
        let (done, conv) = (stored(None, "x").response, Arc::new(Vec::new()));
        store.finish("r", done, conv);
        assert_eq!(store.get("r", KeyScope(None)).unwrap().0.status, "cancelled");
    }
}
