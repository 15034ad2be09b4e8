//! Helpers of tests/deploy.rs: reading the files under deploy/ and checking the
//! configurations, pods and units they hold.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use fedmicse_agent::AgentConfig;
use fedmicse_coordinator::CoordinatorConfig;
use serde::Deserialize;
use serde_json::Value;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn deploy() -> PathBuf {
    root().join("deploy")
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every file under `dir` (recursively) whose extension is one of `exts`, sorted.
pub fn files(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.contains(&e))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The documents of a YAML file, in order; empty documents (a stray `---`) are dropped.
pub fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

pub fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v}"))
}

pub fn array_of<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what}: expected a list, got {v}"))
}

pub fn is_kustomization(doc: &Value) -> bool {
    doc["apiVersion"]
        .as_str()
        .is_some_and(|a| a.starts_with("kustomize.config.k8s.io/"))
}

/// Every Kubernetes object under deploy/kubernetes (the Kustomization itself excluded),
/// with the file it came from.
pub fn kubernetes_objects() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    for path in files(&deploy().join("kubernetes"), &["yaml", "yml"]) {
        for doc in yaml_documents(&path) {
            if !is_kustomization(&doc) {
                out.push((path.clone(), doc));
            }
        }
    }
    out
}

pub fn find<'a>(objects: &'a [(PathBuf, Value)], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name} under deploy/kubernetes"))
}

/// A coordinator configuration: it deserializes (unknown keys are errors), validates, and
/// every path in it is absolute.
pub fn check_coordinator_config(text: &str, what: &str) -> CoordinatorConfig {
    let c: CoordinatorConfig =
        toml::from_str(text).unwrap_or_else(|e| panic!("{what}: not a coordinator config: {e}"));
    c.validate().unwrap_or_else(|e| panic!("{what}: {e}"));
    let tls = c
        .tls
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: [tls] is missing"));
    assert!(
        !c.server.allow_plaintext,
        "{what}: plaintext in a deployment"
    );
    let mut paths = vec![
        ("federation.model", &c.federation.model),
        ("federation.state_dir", &c.federation.state_dir),
        ("tls.ca", &tls.ca),
        ("tls.cert", &tls.cert),
        ("tls.key", &tls.key),
    ];
    if let Some(r) = &tls.revocation_list {
        paths.push(("tls.revocation_list", r));
    }
    if let Some(d) = &c.eval.dev_file {
        paths.push(("eval.dev_file", d));
    }
    for (key, p) in paths {
        assert!(
            p.is_absolute(),
            "{what}: {key} = {} is not absolute",
            p.display()
        );
    }
    assert!(
        !c.federation.allowlist.is_empty(),
        "{what}: empty allowlist"
    );
    c
}

/// An agent configuration: it deserializes, validates, uses mutual TLS and absolute paths.
pub fn check_agent_config(text: &str, what: &str) -> AgentConfig {
    let c: AgentConfig =
        toml::from_str(text).unwrap_or_else(|e| panic!("{what}: not an agent config: {e}"));
    c.validate().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        c.coordinator.starts_with("https://"),
        "{what}: the coordinator must be https://"
    );
    let tls = c
        .tls
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: [tls] is missing"));
    for (key, p) in [
        ("tls.ca", &tls.ca),
        ("tls.cert", &tls.cert),
        ("tls.key", &tls.key),
        ("data.file", &c.data.file),
    ] {
        assert!(
            p.is_absolute(),
            "{what}: {key} = {} is not absolute",
            p.display()
        );
    }
    c
}

/// `[http] listen` of a configuration, which must end in `:port`.
pub fn check_http_listen(text: &str, port: u16, what: &str) {
    let table: toml::Table = toml::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}"));
    let listen = table
        .get("http")
        .and_then(|h| h.get("listen"))
        .and_then(|l| l.as_str())
        .unwrap_or_else(|| panic!("{what}: [http] listen is missing"));
    assert!(
        listen.ends_with(&format!(":{port}")),
        "{what}: [http] listen = {listen:?}, expected port {port}"
    );
}

/// Checks a configuration by what it is (an agent's has a top-level `coordinator` URL).
pub fn check_config(text: &str, what: &str) {
    let table: toml::Table =
        toml::from_str(text).unwrap_or_else(|e| panic!("{what}: invalid TOML: {e}"));
    if table.get("coordinator").is_some_and(|v| v.is_str()) {
        check_agent_config(text, what);
        check_http_listen(text, 9091, what);
    } else {
        check_coordinator_config(text, what);
        check_http_listen(text, 9090, what);
    }
}

/// The container port a probe's `port` (a number or a port name) designates.
pub fn probe_port(container: &Value, probe: &Value, what: &str) -> u64 {
    let port = &probe["httpGet"]["port"];
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = str_of(port, &format!("{what}: httpGet.port"));
    array_of(&container["ports"], &format!("{what}: ports"))
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("{what}: no container port named {name}"))
}

/// Pod-level and container-level hardening every fedmicse pod has.
pub fn check_pod_security(pod: &Value, container: &Value, what: &str) {
    assert_eq!(
        pod["securityContext"]["runAsNonRoot"], true,
        "{what}: runAsNonRoot"
    );
    assert!(
        pod["securityContext"]["runAsUser"]
            .as_u64()
            .is_some_and(|u| u != 0),
        "{what}: runAsUser"
    );
    let sc = &container["securityContext"];
    assert_eq!(
        sc["readOnlyRootFilesystem"], true,
        "{what}: readOnlyRootFilesystem"
    );
    assert_eq!(
        sc["allowPrivilegeEscalation"], false,
        "{what}: allowPrivilegeEscalation"
    );
    assert!(
        array_of(
            &sc["capabilities"]["drop"],
            &format!("{what}: capabilities.drop")
        )
        .iter()
        .any(|c| c == "ALL"),
        "{what}: capabilities are not all dropped"
    );
    assert!(
        container["resources"]["requests"].is_object(),
        "{what}: resources.requests"
    );
    assert!(
        container["resources"]["limits"].is_object(),
        "{what}: resources.limits"
    );
}

/// The names of a pod's volumes of a given source (`secret`, `configMap`, ...), mapped to
/// what they refer to, restricted to the volumes the container mounts.
pub fn mounted_volumes(
    pod: &Value,
    container: &Value,
    source: &str,
    field: &str,
) -> BTreeMap<String, String> {
    let mounts: BTreeSet<&str> = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["name"].as_str())
        .collect();
    pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v[source].is_object())
        .filter_map(|v| Some((v["name"].as_str()?, v[source][field].as_str()?)))
        .filter(|(name, _)| mounts.contains(name))
        .map(|(n, r)| (n.to_string(), r.to_string()))
        .collect()
}

/// The text of `key` in the ConfigMap that a pod mounts (it must be among the manifests).
pub fn mounted_config(
    objects: &[(PathBuf, Value)],
    pod: &Value,
    container: &Value,
    key: &str,
    what: &str,
) -> String {
    let maps = mounted_volumes(pod, container, "configMap", "name");
    maps.values()
        .filter_map(|name| {
            objects
                .iter()
                .map(|(_, o)| o)
                .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == name.as_str())
        })
        .find_map(|cm| cm["data"][key].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("{what}: mounts no ConfigMap with {key} (mounted: {maps:?})"))
}

/// `(section, key)` → values, in order, of a systemd unit file (comments, blank lines and
/// line continuations handled).
pub fn unit_settings(path: &Path) -> BTreeMap<(String, String), Vec<String>> {
    let text = read(path);
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(rest) = line.strip_suffix('\\') {
            pending.push_str(rest);
            pending.push(' ');
            continue;
        }
        let line = format!("{pending}{line}");
        pending.clear();
        if line.starts_with('[') && line.ends_with(']') {
            section = line[1..line.len() - 1].to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{}: not a setting: {line}", path.display()));
        out.entry((section.clone(), key.trim().to_string()))
            .or_default()
            .push(value.trim().to_string());
    }
    out
}
