//! A keyed work queue with bounded workers, the heart of every reflection loop.
//!
//! kube-runtime's `Controller` reconciles only objects present in its main store, so it cannot
//! notice that a *source* object vanished while its *target* (in another cluster) remains. Our
//! loops are keyed by name instead: any watch event on either side enqueues the name, and the
//! reconcile function compares both stores. Semantics follow client-go's workqueue: a key is
//! queued at most once, never processed by two workers at a time, and re-run if it changed while
//! being processed. Failures are retried per key with tower's jittered exponential backoff.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex, OnceLock, PoisonError, Weak},
    time::{Duration, Instant},
};

use futures::StreamExt;
use kube::runtime::{reflector, watcher};
use tokio::sync::{Mutex as AsyncMutex, mpsc};
use tokio_util::sync::CancellationToken;
use tower::{
    retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff},
    util::rng::HasherRng,
};

/// What a reconcile asks of the queue when it succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeue {
    /// Nothing more until the next event for the key.
    Done,
    /// Run again after this delay (e.g. to refresh a token, or to wait for a remote change that
    /// no watch of ours reports).
    After(Duration),
}

struct State<K> {
    queued: HashSet<K>,
    running: HashSet<K>,
    dirty: HashSet<K>,
    failures: HashMap<K, ExponentialBackoff>,
}

/// Told of every reconcile of every labelled [`WorkQueue`] in the process (for metrics); see
/// [`set_observer`].
pub trait QueueObserver: Send + Sync + 'static {
    /// A reconcile of a queue labelled `label` (the reflected kind) took `elapsed`; `ok` is
    /// whether it succeeded.
    fn reconciled(&self, label: &str, elapsed: Duration, ok: bool);
}

static OBSERVER: OnceLock<Arc<dyn QueueObserver>> = OnceLock::new();

type DepthFn = dyn Fn() -> usize + Send + Sync;
static QUEUES: Mutex<Vec<(String, Weak<DepthFn>)>> = Mutex::new(Vec::new());

/// Installs the process-wide observer; `false` if one was installed already (it stays).
pub fn set_observer(observer: Arc<dyn QueueObserver>) -> bool {
    OBSERVER.set(observer).is_ok()
}

/// Keys waiting or running, summed per label over the live labelled queues of the process.
pub fn depths() -> BTreeMap<String, usize> {
    let mut queues = lock(&QUEUES);
    queues.retain(|(_, q)| q.strong_count() > 0);
    let mut out = BTreeMap::new();
    for (label, q) in queues.iter() {
        if let Some(q) = q.upgrade() {
            *out.entry(label.clone()).or_default() += q();
        }
    }
    out
}

/// A deduplicating queue of keys; see the module docs.
pub struct WorkQueue<K> {
    label: OnceLock<(String, Arc<DepthFn>)>,
    state: Mutex<State<K>>,
    tx: mpsc::UnboundedSender<K>,
    rx: AsyncMutex<mpsc::UnboundedReceiver<K>>,
    backoff: Mutex<ExponentialBackoffMaker>,
}

impl<K> std::fmt::Debug for WorkQueue<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkQueue").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The state is a few sets updated without awaiting: a panic elsewhere cannot leave them
    // half-written, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<K: Clone + Eq + Hash + Send + Sync + 'static> WorkQueue<K> {
    /// A queue whose failed keys are retried after `min`, doubling up to `max` (with jitter).
    pub fn new(min: Duration, max: Duration) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let maker = ExponentialBackoffMaker::new(
            min,
            max.max(min).max(Duration::from_millis(1)),
            0.2,
            HasherRng::default(),
        )
        .or_else(|_| {
            ExponentialBackoffMaker::new(
                Duration::from_millis(100),
                Duration::from_secs(30),
                0.2,
                HasherRng::default(),
            )
        });
        // Both sets of bounds are valid by construction; keep a default regardless.
        let backoff = maker.unwrap_or_default();
        Arc::new(Self {
            label: OnceLock::new(),
            state: Mutex::new(State {
                queued: HashSet::new(),
                running: HashSet::new(),
                dirty: HashSet::new(),
                failures: HashMap::new(),
            }),
            tx,
            rx: AsyncMutex::new(rx),
            backoff: Mutex::new(backoff),
        })
    }

    /// Labels the queue (with the kind it reflects) so that [`depths`] counts it and the
    /// [`QueueObserver`] hears of its reconciles. A queue is labelled once; later calls do nothing.
    pub fn labelled(self: Arc<Self>, label: &str) -> Arc<Self> {
        let weak = Arc::downgrade(&self);
        let depth: Arc<DepthFn> = Arc::new(move || weak.upgrade().map_or(0, |q| q.len()));
        if self.label.set((label.to_owned(), depth.clone())).is_ok() {
            lock(&QUEUES).push((label.to_owned(), Arc::downgrade(&depth)));
        }
        self
    }

    /// Enqueues `key` unless it is already waiting; a key being processed is re-run afterwards.
    pub fn add(&self, key: K) {
        let mut s = lock(&self.state);
        if s.running.contains(&key) {
            s.dirty.insert(key);
        } else if s.queued.insert(key.clone()) {
            // The receiver lives as long as the queue: sending cannot fail while we exist.
            let _ = self.tx.send(key);
        }
    }

    /// How many keys wait or run.
    pub fn len(&self) -> usize {
        let s = lock(&self.state);
        s.queued.len() + s.running.len()
    }

    /// Whether nothing waits or runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn add_after(
        self: &Arc<Self>,
        key: K,
        delay: impl Future<Output = ()> + Send + 'static,
        cancel: &CancellationToken,
    ) {
        let this = Arc::clone(self);
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = delay => this.add(key),
            }
        });
    }

    /// Runs `workers` workers calling `reconcile` for each key until `cancel` fires.
    pub async fn run<F, Fut, E>(
        self: Arc<Self>,
        workers: usize,
        cancel: CancellationToken,
        reconcile: F,
    ) where
        F: Fn(K) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Requeue, E>> + Send,
        E: std::fmt::Display,
    {
        let reconcile = Arc::new(reconcile);
        let workers = (0..workers.max(1)).map(|_| {
            let this = Arc::clone(&self);
            let reconcile = Arc::clone(&reconcile);
            let cancel = cancel.clone();
            async move {
                loop {
                    let key = {
                        let mut rx = this.rx.lock().await;
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            k = rx.recv() => match k { Some(k) => k, None => return },
                        }
                    };
                    {
                        let mut s = lock(&this.state);
                        s.queued.remove(&key);
                        s.running.insert(key.clone());
                    }
                    let started = Instant::now();
                    let result = tokio::select! {
                        () = cancel.cancelled() => return,
                        r = reconcile(key.clone()) => r,
                    };
                    if let (Some((label, _)), Some(o)) = (this.label.get(), OBSERVER.get()) {
                        o.reconciled(label, started.elapsed(), result.is_ok());
                    }
                    let retry = match result {
                        Ok(requeue) => {
                            lock(&this.state).failures.remove(&key);
                            if let Requeue::After(d) = requeue {
                                this.add_after(key.clone(), tokio::time::sleep(d), &cancel);
                            }
                            None
                        }
                        Err(e) => {
                            let label = this.label.get().map_or("", |(l, _)| l.as_str());
                            tracing::warn!(queue = label, error = %e, "reconcile failed; will retry with backoff");
                            let mut s = lock(&this.state);
                            let sleep = match s.failures.get_mut(&key) {
                                Some(b) => b.next_backoff(),
                                None => {
                                    let mut b = lock(&this.backoff).make_backoff();
                                    let sleep = b.next_backoff();
                                    s.failures.insert(key.clone(), b);
                                    sleep
                                }
                            };
                            Some(sleep)
                        }
                    };
                    let dirty = {
                        let mut s = lock(&this.state);
                        s.running.remove(&key);
                        s.dirty.remove(&key)
                    };
                    if let Some(sleep) = retry {
                        this.add_after(key, sleep, &cancel);
                    } else if dirty {
                        this.add(key);
                    }
                }
            }
        });
        futures::future::join_all(workers).await;
    }

    /// [`run`](Self::run), once `ready` resolves (e.g. every store listed: deciding that an
    /// object is orphaned needs every side known); returns at once if `ready` fails or `cancel`
    /// fires first.
    pub async fn run_when_ready<R, RE, F, Fut, E>(
        self: Arc<Self>,
        ready: R,
        workers: usize,
        cancel: CancellationToken,
        reconcile: F,
    ) where
        R: Future<Output = Result<(), RE>>,
        F: Fn(K) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Requeue, E>> + Send,
        E: std::fmt::Display,
    {
        tokio::select! {
            () = cancel.cancelled() => return,
            r = ready => if r.is_err() { return },
        }
        self.run(workers, cancel, reconcile).await;
    }
}

/// Mirrors a watch into `writer`'s store and enqueues, for every object that changed, the key
/// `key_of` names (if any); after each (re-)list `resync` runs, since a re-list can hide
/// deletions. `what` names the watch in logs. Runs as long as the stream (watchers retry
/// with backoff, so: until dropped). One function for every watch of every reflection loop.
pub(crate) async fn feed<K, S>(
    writer: reflector::store::Writer<K>,
    stream: S,
    what: &str,
    queue: &WorkQueue<String>,
    key_of: impl Fn(&K) -> Option<String>,
    resync: impl Fn(),
) where
    K: reflector::Lookup + Clone,
    K::DynamicType: Eq + Hash + Clone,
    S: futures::Stream<Item = watcher::Result<watcher::Event<K>>>,
{
    reflector::reflector(writer, stream)
        .for_each(|ev| {
            match ev {
                Ok(
                    watcher::Event::Apply(o)
                    | watcher::Event::Delete(o)
                    | watcher::Event::InitApply(o),
                ) => {
                    if let Some(k) = key_of(&o) {
                        queue.add(k);
                    }
                }
                Ok(watcher::Event::InitDone) => resync(),
                Ok(watcher::Event::Init) => {}
                Err(e) => tracing::warn!(watch = what, error = %e, "watch failed; retrying"),
            }
            futures::future::ready(())
        })
        .await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn dedupes_retries_and_stops() {
        let q = WorkQueue::<String>::new(Duration::from_millis(5), Duration::from_millis(20));
        for _ in 0..5 {
            q.add("a".into());
        }
        q.add("b".into());
        assert_eq!(q.len(), 2, "a key waits once");
        let calls = Arc::new(AtomicUsize::new(0));
        let fails_left = Arc::new(AtomicUsize::new(3));
        let cancel = CancellationToken::new();
        let (c, f) = (calls.clone(), fails_left.clone());
        let run = tokio::spawn(q.clone().run(2, cancel.clone(), move |k: String| {
            let (c, f) = (c.clone(), f.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                if k == "b" && f.load(Ordering::SeqCst) > 0 {
                    f.fetch_sub(1, Ordering::SeqCst);
                    return Err("transient");
                }
                Ok(Requeue::Done)
            }
        }));
        tokio::time::timeout(Duration::from_secs(5), async {
            while calls.load(Ordering::SeqCst) < 5 || !q.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("b is retried until it succeeds");
        // Succeeded keys are not run again.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1 + 4,
            "a once, b three failures + success"
        );
        cancel.cancel();
        run.await.expect("workers stop on cancel");
    }

    #[test]
    fn labelled_queues_report_their_depth_while_alive() {
        let q = WorkQueue::<String>::new(Duration::from_millis(5), Duration::from_millis(20))
            .labelled("TestKindDepth");
        q.add("a".into());
        q.add("b".into());
        assert_eq!(depths().get("TestKindDepth"), Some(&2));
        drop(q);
        assert_eq!(
            depths().get("TestKindDepth"),
            None,
            "a dropped queue is forgotten"
        );
    }
}
