//! Standalone mode: a directory of Kubernetes YAML (as `kubectl get -o yaml`
//! prints it: several documents per file, or a `List`), watched for changes.
//!
//! A file or object that cannot be used is reported with the file, the
//! object and the field at fault; the last valid version of what it held
//! stays programmed, so one bad edit never takes a working service down.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize;

use super::Snapshot;
use crate::model::objects::{EndpointSliceInfo, NodeInfo, ObjectName, Rejection, ServiceInfo};

/// One YAML document of a manifest.
#[derive(Debug)]
pub enum Document {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
    /// Any other kind (Deployments, ConfigMaps, ...): not ours to read.
    Other(String),
}

/// Parses every document of a manifest, `List`s flattened. `Err` when the
/// text is not YAML at all; a document that is YAML but not a valid object
/// is an `Err` of its own.
pub fn parse_documents(text: &str) -> Result<Vec<Result<Document, String>>, String> {
    let mut documents = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(de).map_err(|e| e.to_string())?;
        if value.is_null() {
            continue;
        }
        collect_document(value, &format!("document {}", i + 1), &mut documents);
    }
    Ok(documents)
}

fn collect_document(value: serde_yaml::Value, place: &str, out: &mut Vec<Result<Document, String>>) {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_owned();
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>")
        .to_owned();
    let typed = |e: serde_yaml::Error| format!("{place} ({kind} {name}): {e}");
    match kind.as_str() {
        "List" => match value.get("items").and_then(|i| i.as_sequence()) {
            Some(items) => {
                for (j, item) in items.iter().enumerate() {
                    collect_document(item.clone(), &format!("{place}, items[{j}]"), out);
                }
            }
            None => out.push(Err(format!("{place}: a List without items"))),
        },
        "Service" => out.push(
            serde_yaml::from_value(value)
                .map(|s| Document::Service(Box::new(s)))
                .map_err(typed),
        ),
        "EndpointSlice" => {
            let api = value.get("apiVersion").and_then(|a| a.as_str()).unwrap_or_default();
            if api != "discovery.k8s.io/v1" {
                out.push(Err(format!(
                    "{place} (EndpointSlice {name}): apiVersion {api:?} is not supported (expected discovery.k8s.io/v1)"
                )));
                return;
            }
            out.push(
                serde_yaml::from_value(value)
                    .map(|s| Document::EndpointSlice(Box::new(s)))
                    .map_err(typed),
            )
        }
        "Node" => out.push(
            serde_yaml::from_value(value)
                .map(|n| Document::Node(Box::new(n)))
                .map_err(typed),
        ),
        "" => out.push(Err(format!("{place}: no kind"))),
        _ => out.push(Ok(Document::Other(kind))),
    }
}

/// The usable objects one file held the last time it was read.
#[derive(Clone, Default)]
struct FileObjects {
    services: BTreeMap<ObjectName, ServiceInfo>,
    slices: BTreeMap<ObjectName, EndpointSliceInfo>,
    nodes: BTreeMap<String, NodeInfo>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    mtime_ns: i128,
    len: u64,
    ino: u64,
}

/// A watched manifest directory.
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, (Stamp, FileObjects)>,
    /// Problems of the current contents, so each is reported once.
    problems: BTreeSet<String>,
    scanned: bool,
}

/// What a scan found that changed.
pub struct ScanResult {
    pub snapshot: Snapshot,
    /// Problems not reported before.
    pub new_problems: Vec<String>,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            problems: BTreeSet::new(),
            scanned: false,
        }
    }

    /// Rereads what changed since the last scan; `None` when nothing did.
    pub fn scan(&mut self) -> std::io::Result<Option<ScanResult>> {
        let stamps = self.stamps()?;
        let unchanged = self.scanned
            && stamps.len() == self.files.len()
            && stamps
                .iter()
                .all(|(p, s)| self.files.get(p).is_some_and(|(old, _)| old == s));
        if unchanged {
            return Ok(None);
        }
        self.scanned = true;
        let mut problems = BTreeSet::new();
        let mut files = BTreeMap::new();
        for (path, stamp) in stamps {
            let previous = match self.files.get(&path) {
                Some((old, objects)) if *old == stamp => {
                    files.insert(path, (stamp, objects.clone()));
                    continue;
                }
                Some((_, objects)) => objects.clone(),
                None => FileObjects::default(),
            };
            let objects = read_file(&path, &previous, &mut problems);
            files.insert(path, (stamp, objects));
        }
        self.files = files;
        let snapshot = self.merge(&mut problems);
        let new_problems = problems.difference(&self.problems).cloned().collect();
        self.problems = problems;
        Ok(Some(ScanResult { snapshot, new_problems }))
    }

    fn stamps(&self) -> std::io::Result<BTreeMap<PathBuf, Stamp>> {
        let mut stamps = BTreeMap::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let is_manifest = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"));
            if !is_manifest {
                continue;
            }
            // A file removed between listing and stat is simply gone.
            let Ok(meta) = fs::metadata(&path) else { continue };
            if !meta.is_file() {
                continue;
            }
            let mtime_ns = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
            stamps.insert(
                path,
                Stamp {
                    mtime_ns,
                    len: meta.len(),
                    ino: meta.ino(),
                },
            );
        }
        Ok(stamps)
    }

    /// All files' objects in one snapshot; an object defined in two files is
    /// taken from the first (in path order) and reported.
    fn merge(&self, problems: &mut BTreeSet<String>) -> Snapshot {
        let mut snapshot = Snapshot::default();
        let mut origin: BTreeMap<(&str, &ObjectName), &Path> = BTreeMap::new();
        for (path, (_, objects)) in &self.files {
            for (name, svc) in &objects.services {
                if let Some(first) = origin.get(&("Service", name)) {
                    problems.insert(duplicate(path, "Service", name, first));
                    continue;
                }
                origin.insert(("Service", name), path);
                snapshot.services.insert(name.clone(), svc.clone());
            }
            for (name, slice) in &objects.slices {
                if let Some(first) = origin.get(&("EndpointSlice", name)) {
                    problems.insert(duplicate(path, "EndpointSlice", name, first));
                    continue;
                }
                origin.insert(("EndpointSlice", name), path);
                snapshot.slices.insert(name.clone(), slice.clone());
            }
            for (name, node) in &objects.nodes {
                snapshot.nodes.entry(name.clone()).or_insert_with(|| node.clone());
            }
        }
        for (name, slice) in &snapshot.slices {
            let service = ObjectName {
                namespace: name.namespace.clone(),
                name: slice.service.clone(),
            };
            if !snapshot.services.contains_key(&service) {
                let path = origin[&("EndpointSlice", name)];
                problems.insert(format!(
                    "{}: EndpointSlice {name}: metadata.labels[\"kubernetes.io/service-name\"]: Service {service} does not exist",
                    path.display()
                ));
            }
        }
        snapshot
    }
}

fn duplicate(path: &Path, kind: &str, name: &ObjectName, first: &Path) -> String {
    format!(
        "{}: {kind} {name} is already defined in {}; this copy is ignored",
        path.display(),
        first.display()
    )
}

/// Reads one changed file. What cannot be used is reported, and the file's
/// previous version of that object (if any) is kept.
fn read_file(path: &Path, previous: &FileObjects, problems: &mut BTreeSet<String>) -> FileObjects {
    let file = path.display();
    let keeping = |what: &str| {
        if what.is_empty() {
            String::new()
        } else {
            format!("; keeping its last valid {what}")
        }
    };
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            problems.insert(format!("{file}: cannot read: {e}{}", keeping(&previous.describe())));
            return previous.clone();
        }
    };
    let documents = match parse_documents(&text) {
        Ok(documents) => documents,
        Err(e) => {
            problems.insert(format!("{file}: not valid YAML: {e}{}", keeping(&previous.describe())));
            return previous.clone();
        }
    };
    let mut objects = FileObjects::default();
    let mut rejected: Vec<Rejection> = Vec::new();
    for document in documents {
        match document {
            Err(e) => {
                problems.insert(format!("{file}: {e}"));
            }
            Ok(Document::Service(svc)) => match ServiceInfo::from_k8s(&svc) {
                Ok(Ok(info)) => {
                    for note in info.unsupported_notes() {
                        problems.insert(format!("{file}: {note}"));
                    }
                    objects.services.insert(info.name.clone(), info);
                }
                // Headless, ExternalName, another proxy's: not ours.
                Ok(Err(_skipped)) => {}
                Err(rejection) => rejected.push(rejection),
            },
            Ok(Document::EndpointSlice(slice)) => match EndpointSliceInfo::from_k8s(&slice) {
                Ok(Some(info)) => {
                    objects.slices.insert(info.name.clone(), info);
                }
                Ok(None) => {}
                Err(rejection) => rejected.push(rejection),
            },
            Ok(Document::Node(node)) => {
                let info = NodeInfo::from_k8s(&node);
                objects.nodes.insert(info.name.clone(), info);
            }
            Ok(Document::Other(_)) => {}
        }
    }
    for rejection in rejected {
        let kept = match rejection.kind {
            "Service" => previous.services.get(&rejection.object).map(|s| {
                objects
                    .services
                    .entry(rejection.object.clone())
                    .or_insert_with(|| s.clone());
            }),
            _ => previous.slices.get(&rejection.object).map(|s| {
                objects
                    .slices
                    .entry(rejection.object.clone())
                    .or_insert_with(|| s.clone());
            }),
        };
        let note = if kept.is_some() {
            "; keeping its last valid version"
        } else {
            ""
        };
        problems.insert(format!("{file}: {rejection}{note}"));
    }
    objects
}

impl FileObjects {
    fn describe(&self) -> String {
        let (s, e) = (self.services.len(), self.slices.len());
        if s + e == 0 {
            String::new()
        } else {
            format!("{s} Service(s) and {e} EndpointSlice(s)")
        }
    }
}
