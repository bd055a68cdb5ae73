use std::path::PathBuf;

use super::manifests::{ManifestDir, ScanResult};
use crate::model::objects::ObjectName;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kpr-manifests-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, file: &str, text: &str) {
        // Files are replaced (new inode), as editors and kubectl do.
        let tmp = self.0.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.0.join(file)).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn name(n: &str) -> ObjectName {
    ObjectName {
        namespace: "default".into(),
        name: n.into(),
    }
}

fn service(name: &str, port: u32) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  clusterIP: 10.96.0.1\n  ports:\n  - name: http\n    port: {port}\n")
}

const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata:\n  name: web-1\n  labels:\n    kubernetes.io/service-name: web\nports:\n- name: http\n  port: 8080\nendpoints:\n- addresses: [10.0.0.1]\n";

const DEPLOYMENT: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n";

fn scan(dir: &mut ManifestDir) -> ScanResult {
    dir.scan().unwrap().expect("a change")
}

#[test]
fn reads_multi_document_files_and_lists_ignoring_other_kinds() {
    let tmp = TempDir::new();
    tmp.write(
        "web.yaml",
        &format!("{DEPLOYMENT}---\n{}---\n{SLICE}", service("web", 80)),
    );
    let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata:\n    name: api\n  spec:\n    clusterIP: 10.96.0.2\n    ports:\n    - name: http\n      port: 81\n";
    tmp.write("api.yml", list);
    tmp.write("notes.txt", "not a manifest");
    let mut dir = ManifestDir::new(&tmp.0);
    let result = scan(&mut dir);
    assert!(result.new_problems.is_empty(), "{:?}", result.new_problems);
    assert_eq!(
        result.snapshot.services.keys().cloned().collect::<Vec<_>>(),
        vec![name("api"), name("web")]
    );
    assert_eq!(result.snapshot.slices[&name("web-1")].service, "web");
    assert!(dir.scan().unwrap().is_none(), "nothing changed");
}

#[test]
fn a_broken_edit_is_reported_once_and_the_last_valid_version_stays() {
    let tmp = TempDir::new();
    tmp.write("web.yaml", &format!("{}---\n{SLICE}", service("web", 80)));
    tmp.write("api.yaml", &service("api", 81));
    let mut dir = ManifestDir::new(&tmp.0);
    let good = scan(&mut dir).snapshot;

    // An impossible port: the service keeps its last valid version.
    tmp.write("web.yaml", &format!("{}---\n{SLICE}", service("web", 70000)));
    let result = scan(&mut dir);
    let file = tmp.0.join("web.yaml").display().to_string();
    assert_eq!(
        result.new_problems,
        vec![format!("{file}: Service default/web: spec.ports[0].port: port 70000 is out of range 1-65535; keeping its last valid version")]
    );
    assert_eq!(result.snapshot, good);

    // Not YAML at all: everything the file held stays.
    tmp.write("web.yaml", "kind: Service\n  metadata: [unclosed\n");
    let result = scan(&mut dir);
    assert_eq!(result.new_problems.len(), 1);
    assert!(
        result.new_problems[0].starts_with(&format!("{file}: not valid YAML")),
        "{}",
        result.new_problems[0]
    );
    assert!(
        result.new_problems[0].ends_with("keeping its last valid 1 Service(s) and 1 EndpointSlice(s)"),
        "{}",
        result.new_problems[0]
    );
    assert_eq!(result.snapshot, good);

    // Another file changes: the still-broken file is not reported again.
    tmp.write("api.yaml", &service("api", 82));
    let result = scan(&mut dir);
    assert!(result.new_problems.is_empty(), "{:?}", result.new_problems);
    assert_eq!(result.snapshot.services[&name("api")].ports[0].port, 82);
    assert_eq!(result.snapshot.services[&name("web")], good.services[&name("web")]);

    // Fixed: the new version is used.
    tmp.write("web.yaml", &service("web", 8000));
    let result = scan(&mut dir);
    assert_eq!(result.snapshot.services[&name("web")].ports[0].port, 8000);
}

#[test]
fn a_slice_without_its_service_and_duplicates_are_reported() {
    let tmp = TempDir::new();
    tmp.write("slice.yaml", SLICE);
    tmp.write("a.yaml", &service("api", 80));
    tmp.write("b.yaml", &service("api", 81));
    let mut dir = ManifestDir::new(&tmp.0);
    let result = scan(&mut dir);
    let mut problems = result.new_problems.clone();
    problems.sort();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].contains("b.yaml: Service default/api is already defined in"),
        "{}",
        problems[0]
    );
    assert!(
        problems[1].contains("slice.yaml: EndpointSlice default/web-1: metadata.labels[\"kubernetes.io/service-name\"]: Service default/web does not exist"),
        "{}",
        problems[1]
    );
    assert_eq!(
        result.snapshot.services[&name("api")].ports[0].port,
        80,
        "the first file wins"
    );
}

#[test]
fn removing_a_file_removes_its_objects() {
    let tmp = TempDir::new();
    tmp.write("web.yaml", &service("web", 80));
    tmp.write("api.yaml", &service("api", 81));
    let mut dir = ManifestDir::new(&tmp.0);
    assert_eq!(scan(&mut dir).snapshot.services.len(), 2);
    std::fs::remove_file(tmp.0.join("web.yaml")).unwrap();
    let result = scan(&mut dir);
    assert_eq!(
        result.snapshot.services.keys().cloned().collect::<Vec<_>>(),
        vec![name("api")]
    );
}
