//! A small Kubernetes API server for tests: list and watch of Services,
//! EndpointSlices and Nodes over plain HTTP, with the real protocol's
//! resourceVersions, ADDED/MODIFIED/DELETED events, bookmarks, and `410
//! Gone` reported as the real server does (an `ERROR` event carrying a
//! `Status` inside a 200 watch stream). Tests can drop every watch, compact
//! the history (so resuming watches get 410 and must re-list), and take the
//! server away and bring it back on the same port.
//!
//! The daemon reaches it through the ordinary kube-rs client and a
//! kubeconfig: no test-only path exists in the daemon.
use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};
use axum::{
    body::Body,
    extract::{Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, watch};

use crate::netns::Netns;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn parse(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            "Node" => Some(Kind::Node),
            _ => None,
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn namespaced(self) -> bool {
        self != Kind::Node
    }
}

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    kind: Kind,
    type_: &'static str,
    object: Value,
}

type Key = (Kind, String, String);

#[derive(Default)]
struct Store {
    rv: u64,
    /// Each object serialized once, when written: lists only concatenate
    /// (as kube-apiserver's watch cache keeps objects encoded).
    objects: BTreeMap<Key, Arc<str>>,
    /// Events after `compacted_rv`, oldest first.
    history: VecDeque<Event>,
    /// A watch must start after this resourceVersion, or it gets 410.
    compacted_rv: u64,
}

struct Shared {
    store: Mutex<Store>,
    events: broadcast::Sender<Event>,
    /// Bumped to end every open watch.
    drop_watches: watch::Sender<u64>,
    /// True while the server is away: every stream ends, including one that
    /// started in the instant before (level-triggered, so it cannot be missed).
    stopped: watch::Sender<bool>,
    bookmark_every: Duration,
    lists: AtomicU64,
    watches: AtomicU64,
    /// Lists in progress, by continue token prefix.
    paged: Mutex<BTreeMap<u64, Arc<Paged>>>,
    next_page_id: AtomicU64,
}

pub struct ApiServer {
    pub port: u16,
    shared: Arc<Shared>,
    /// Its threads were started inside the node's namespace, so every socket
    /// its tasks create lives there.
    runtime: tokio::runtime::Runtime,
    stop: Option<watch::Sender<bool>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

#[derive(serde::Deserialize, Default)]
struct Params {
    watch: Option<String>,
    #[serde(rename = "resourceVersion")]
    resource_version: Option<String>,
    #[serde(rename = "timeoutSeconds")]
    timeout_seconds: Option<u64>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
}

/// A list being served page by page: the snapshot it started from.
struct Paged {
    rv: u64,
    items: Vec<Arc<str>>,
}

impl ApiServer {
    /// Starts a server on 127.0.0.1 of `ns` on a free port.
    pub fn start(ns: &Netns) -> Result<Self> {
        let runtime = ns.run(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
        })??;
        let (drop_watches, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            events: broadcast::channel(4096).0,
            drop_watches,
            stopped: watch::channel(false).0,
            bookmark_every: Duration::from_secs(1),
            lists: AtomicU64::new(0),
            watches: AtomicU64::new(0),
            paged: Mutex::new(BTreeMap::new()),
            next_page_id: AtomicU64::new(1),
        });
        let mut server = ApiServer {
            port: 0,
            shared,
            runtime,
            stop: None,
            server: None,
        };
        server.listen()?;
        Ok(server)
    }

    fn listen(&mut self) -> Result<()> {
        self.shared.stopped.send_replace(false);
        let port = self.port;
        // Bound on a runtime thread (inside the namespace), not this one.
        let listener = self
            .runtime
            .block_on(
                self.runtime
                    .spawn(async move { tokio::net::TcpListener::bind(("127.0.0.1", port)).await }),
            )?
            .with_context(|| format!("binding the test API server to port {port}"))?;
        self.port = listener.local_addr()?.port();
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let app = Router::new()
            .route("/api/v1/services", get(|s, q| handle(s, q, Kind::Service)))
            .route("/api/v1/nodes", get(|s, q| handle(s, q, Kind::Node)))
            .route(
                "/apis/discovery.k8s.io/v1/endpointslices",
                get(|s, q| handle(s, q, Kind::EndpointSlice)),
            )
            .fallback(|| async { (StatusCode::NOT_FOUND, "not served by the test API server") })
            .with_state(self.shared.clone());
        self.server = Some(self.runtime.spawn(async move {
            let shutdown = async move {
                let _ = stop_rx.wait_for(|stopped| *stopped).await;
            };
            // As the real API server (Go sets TCP_NODELAY): small watch
            // events are not held back by Nagle's algorithm.
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
        }));
        self.stop = Some(stop_tx);
        Ok(())
    }

    pub fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A kubeconfig pointing at this server.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://{}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\nusers:\n- name: test\n  user: {{}}\n",
            self.address()
        );
        Ok(std::fs::write(path, yaml)?)
    }

    /// Creates or updates every object of a multi-document YAML.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let object: Value = serde::Deserialize::deserialize(doc)?;
            if object.is_null() {
                continue;
            }
            let Some(kind) = object["kind"].as_str().and_then(Kind::parse) else {
                continue; // Deployments and such: not served
            };
            self.write(kind, object, false)?;
        }
        Ok(())
    }

    /// Creates or updates one object given as JSON.
    pub fn apply_json(&self, object: Value) -> Result<()> {
        let kind = object["kind"].as_str().and_then(Kind::parse).context("kind")?;
        self.write(kind, object, false)
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<()> {
        let ns = if kind.namespaced() { namespace } else { "" };
        let object = {
            let store = self.shared.store.lock().expect("store lock");
            store.objects.get(&(kind, ns.to_string(), name.to_string())).cloned()
        };
        let Some(object) = object else {
            bail!("no {} {namespace}/{name}", kind.name())
        };
        let object: Value = serde_json::from_str(&object)?;
        self.write(kind, object, true)
    }

    fn write(&self, kind: Kind, mut object: Value, delete: bool) -> Result<()> {
        let name = object["metadata"]["name"]
            .as_str()
            .context("metadata.name")?
            .to_string();
        let ns = if kind.namespaced() {
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let mut store = self.shared.store.lock().expect("store lock");
        store.rv += 1;
        let rv = store.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if kind.namespaced() {
            object["metadata"]["namespace"] = json!(ns);
        }
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{}-{ns}-{name}", kind.name()));
        }
        let key = (kind, ns, name);
        let type_ = if delete {
            store.objects.remove(&key);
            "DELETED"
        } else if store.objects.insert(key, object.to_string().into()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let event = Event {
            rv,
            kind,
            type_,
            object,
        };
        store.history.push_back(event.clone());
        // Sent under the lock, so a watch that snapshots the history under
        // the same lock and then subscribes misses nothing.
        let _ = self.shared.events.send(event);
        Ok(())
    }

    /// Forgets the history: watches resuming from before now get 410 Gone
    /// and must re-list, as after an etcd compaction.
    pub fn compact(&self) {
        let mut store = self.shared.store.lock().expect("store lock");
        store.compacted_rv = store.rv;
        store.history.clear();
    }

    /// Ends every open watch stream (clients resume from their last version).
    pub fn drop_watches(&self) {
        self.shared.drop_watches.send_modify(|g| *g += 1);
    }

    /// Goes away: open watches end, the port refuses connections.
    pub fn stop(&mut self) {
        self.shared.stopped.send_replace(true);
        self.drop_watches();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(server) = self.server.take() {
            let _ = self.runtime.block_on(server);
        }
    }

    /// Comes back on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.listen()
    }

    /// How many list and watch requests have been served.
    pub fn requests(&self) -> (u64, u64) {
        (
            self.shared.lists.load(Ordering::Relaxed),
            self.shared.watches.load(Ordering::Relaxed),
        )
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn handle(State(shared): State<Arc<Shared>>, Query(params): Query<Params>, kind: Kind) -> Response {
    let watching = matches!(params.watch.as_deref(), Some("true" | "1"));
    if !watching {
        return list(&shared, &params, kind);
    }
    shared.watches.fetch_add(1, Ordering::Relaxed);
    let from: u64 = params
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = Duration::from_secs(params.timeout_seconds.unwrap_or(290));
    let (tx, rx) = mpsc::channel::<String>(256);
    let (replay, mut live, expired) = {
        let store = shared.store.lock().expect("store lock");
        let expired = from < store.compacted_rv;
        let replay: Vec<Event> = store
            .history
            .iter()
            .filter(|e| e.kind == kind && e.rv > from)
            .cloned()
            .collect();
        (replay, shared.events.subscribe(), expired)
    };
    let mut dropped = shared.drop_watches.subscribe();
    let mut stopped = shared.stopped.subscribe();
    let stop_signal = async move {
        // Maps the (non-Send) borrow away before the task is suspended again.
        let _ = stopped.wait_for(|s| *s).await.map(|_| ());
    };
    let bookmark_every = shared.bookmark_every;
    tokio::spawn(async move {
        if expired {
            let status = json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410,
            }});
            let _ = tx.send(format!("{status}\n")).await;
            return;
        }
        let line = |e: &Event| format!("{}\n", json!({"type": e.type_, "object": e.object}));
        let mut last = from;
        for e in &replay {
            last = e.rv;
            if tx.send(line(e)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        tokio::pin!(stop_signal);
        let mut bookmarks = tokio::time::interval(bookmark_every);
        loop {
            tokio::select! {
                event = live.recv() => match event {
                    Ok(e) if e.kind == kind && e.rv > last => {
                        last = e.rv;
                        if tx.send(line(&e)).await.is_err() { return; }
                    }
                    Ok(_) => {}
                    // Fell behind or shut down: end the stream; the client resumes.
                    Err(_) => return,
                },
                _ = bookmarks.tick() => {
                    let bookmark = json!({"type": "BOOKMARK", "object": {
                        "kind": kind.name(), "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": last.to_string()},
                    }});
                    if tx.send(format!("{bookmark}\n")).await.is_err() { return; }
                }
                _ = dropped.changed() => return,
                _ = &mut stop_signal => return,
                _ = &mut deadline => return,
            }
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, std::convert::Infallible>(line), rx))
    });
    ([(header::CONTENT_TYPE, "application/json")], Body::from_stream(body)).into_response()
}

/// A list, paginated like the real server's (`limit` and `continue`, every
/// page from the same snapshot).
fn list(shared: &Shared, params: &Params, kind: Kind) -> Response {
    let (id, offset, paged) = match params.continue_token.as_deref() {
        Some(token) => {
            let parsed = token
                .split_once(':')
                .and_then(|(id, off)| Some((id.parse::<u64>().ok()?, off.parse::<usize>().ok()?)));
            let found =
                parsed.and_then(|(id, off)| Some((id, off, shared.paged.lock().expect("pages").get(&id)?.clone())));
            match found {
                Some(found) => found,
                None => {
                    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                        "message": "the continue token has expired", "reason": "Expired", "code": 410});
                    return (
                        StatusCode::GONE,
                        [(header::CONTENT_TYPE, "application/json")],
                        status.to_string(),
                    )
                        .into_response();
                }
            }
        }
        None => {
            shared.lists.fetch_add(1, Ordering::Relaxed);
            let store = shared.store.lock().expect("store lock");
            let items = store
                .objects
                .iter()
                .filter(|((k, _, _), _)| *k == kind)
                .map(|(_, v)| v.clone())
                .collect();
            let id = shared.next_page_id.fetch_add(1, Ordering::Relaxed);
            (id, 0, Arc::new(Paged { rv: store.rv, items }))
        }
    };
    // Like kube-apiserver's watch cache: a list at resourceVersion=0 is
    // served whole, whatever the limit (client-go's first list is one).
    let any_version = params.resource_version.as_deref() == Some("0");
    let end = params
        .limit
        .filter(|&l| l > 0 && !any_version)
        .map_or(paged.items.len(), |l| (offset + l).min(paged.items.len()));
    let mut metadata = json!({"resourceVersion": paged.rv.to_string()});
    if end < paged.items.len() {
        metadata["continue"] = json!(format!("{id}:{end}"));
        shared.paged.lock().expect("pages").insert(id, paged.clone());
    } else {
        shared.paged.lock().expect("pages").remove(&id);
    }
    let items = &paged.items[offset..end];
    let mut list = String::with_capacity(items.iter().map(|i| i.len() + 1).sum::<usize>() + 256);
    list.push_str(&format!(
        r#"{{"kind":"{}List","apiVersion":"{}","metadata":{metadata},"items":["#,
        kind.name(),
        kind.api_version()
    ));
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            list.push(',');
        }
        list.push_str(item);
    }
    list.push_str("]}");
    ([(header::CONTENT_TYPE, "application/json")], list).into_response()
}
