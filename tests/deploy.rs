//! The deployment files under deploy/ (systemd units, container images and compose file,
//! Kubernetes manifests, example configurations) parse and carry what deploy/README.md
//! relies on. Nothing is built or started: this reads files only.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

#[path = "deploy_support.rs"]
mod support;
use support::*;

#[test]
fn every_yaml_file_under_deploy_parses() {
    let yamls = files(&deploy(), &["yaml", "yml"]);
    assert!(
        yamls.len() >= 6,
        "expected the compose file and the manifests, found {yamls:?}"
    );
    for path in &yamls {
        let docs = yaml_documents(path);
        assert!(!docs.is_empty(), "{}: no YAML document", path.display());
        for doc in &docs {
            assert!(
                doc.is_object(),
                "{}: a document is not a mapping",
                path.display()
            );
        }
    }
}

#[test]
fn toml_configs_under_deploy_parse_and_use_absolute_paths() {
    let tomls = files(&deploy(), &["toml"]);
    assert!(
        tomls.len() >= 4,
        "expected the systemd and compose configs, found {tomls:?}"
    );
    for path in &tomls {
        check_config(&read(path), &path.display().to_string());
    }
    // The same for the configurations embedded in ConfigMaps.
    let mut embedded = 0;
    for (path, o) in kubernetes_objects() {
        if o["kind"] != "ConfigMap" {
            continue;
        }
        for (key, value) in o["data"].as_object().into_iter().flatten() {
            if key.ends_with(".toml") {
                let what = format!(
                    "{} ConfigMap {} {key}",
                    path.display(),
                    o["metadata"]["name"]
                );
                check_config(str_of(value, &what), &what);
                embedded += 1;
            }
        }
    }
    assert!(
        embedded >= 2,
        "expected coordinator.toml and agent.toml ConfigMaps"
    );
}

#[test]
fn kubernetes_objects_have_api_version_kind_and_name() {
    let objects = kubernetes_objects();
    assert!(objects.len() >= 6, "only {} objects", objects.len());
    let mut seen = BTreeSet::new();
    for (path, o) in &objects {
        let what = path.display().to_string();
        let api = str_of(&o["apiVersion"], &format!("{what}: apiVersion"));
        let kind = str_of(&o["kind"], &format!("{what}: kind"));
        let name = str_of(
            &o["metadata"]["name"],
            &format!("{what}: {kind} metadata.name"),
        );
        assert!(
            !api.is_empty() && !kind.is_empty() && !name.is_empty(),
            "{what}: {kind}/{name}"
        );
        assert!(
            name.len() <= 63
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{what}: {kind} name {name:?} is not a DNS label"
        );
        assert!(
            seen.insert((kind.to_string(), name.to_string())),
            "{what}: {kind}/{name} twice"
        );
    }
    for kind in [
        "Namespace",
        "ConfigMap",
        "Service",
        "StatefulSet",
        "Deployment",
    ] {
        assert!(
            seen.iter().any(|(k, _)| k == kind),
            "no {kind} under deploy/kubernetes"
        );
    }

    // kustomization.yaml lists files that exist and hold objects.
    let kustomization = deploy().join("kubernetes/kustomization.yaml");
    let docs = yaml_documents(&kustomization);
    assert_eq!(docs.len(), 1);
    let k = &docs[0];
    assert!(
        is_kustomization(k),
        "kustomization.yaml: apiVersion {}",
        k["apiVersion"]
    );
    assert_eq!(k["kind"], "Kustomization");
    for r in array_of(&k["resources"], "kustomization.yaml: resources") {
        let file = deploy().join("kubernetes").join(str_of(r, "resource"));
        assert!(
            file.is_file(),
            "kustomization.yaml: {} does not exist",
            file.display()
        );
    }
}

#[test]
fn coordinator_statefulset_has_probes_state_and_tls_secret() {
    let objects = kubernetes_objects();
    let sts = find(&objects, "StatefulSet", "fedmicse-coordinator");
    let what = "StatefulSet fedmicse-coordinator";
    assert_eq!(sts["spec"]["replicas"], 1, "{what}: one coordinator");
    let pod = &sts["spec"]["template"]["spec"];
    let containers = array_of(&pod["containers"], &format!("{what}: containers"));
    assert_eq!(containers.len(), 1, "{what}: one container");
    let c = &containers[0];

    // Readiness: GET /ready; liveness: GET /health; both on the HTTP port 9090.
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/health")] {
        let p = &c[probe];
        assert_eq!(p["httpGet"]["path"], path, "{what}: {probe}");
        assert_eq!(probe_port(c, p, what), 9090, "{what}: {probe} port");
    }

    // The container runs the coordinator with JSON logs.
    let args: Vec<&str> = array_of(&c["args"], &format!("{what}: args"))
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    assert!(
        args.windows(2).any(|w| w == ["--log-format", "json"]),
        "{what}: args {args:?}"
    );
    assert!(args.contains(&"coordinator"), "{what}: args {args:?}");

    // State on a PersistentVolumeClaim from the template, mounted where state_dir points.
    let templates = array_of(
        &sts["spec"]["volumeClaimTemplates"],
        &format!("{what}: volumeClaimTemplates"),
    );
    assert!(!templates.is_empty(), "{what}: no volumeClaimTemplates");
    let claim = str_of(
        &templates[0]["metadata"]["name"],
        "volumeClaimTemplate name",
    );
    let state_mount = array_of(&c["volumeMounts"], &format!("{what}: volumeMounts"))
        .iter()
        .find(|m| m["name"] == claim)
        .unwrap_or_else(|| panic!("{what}: the claim {claim} is not mounted"));
    let state_path = str_of(&state_mount["mountPath"], "mountPath");

    // TLS material from a Secret.
    let secrets = mounted_volumes(pod, c, "secret", "secretName");
    assert!(!secrets.is_empty(), "{what}: mounts no Secret");

    // Its configuration: a valid coordinator.toml whose state_dir is on the claim.
    let config_text = mounted_config(&objects, pod, c, "coordinator.toml", what);
    let config = check_coordinator_config(&config_text, what);
    assert!(
        config.federation.state_dir.starts_with(state_path),
        "{what}: state_dir {} is not on the volume mounted at {state_path}",
        config.federation.state_dir.display()
    );
    check_pod_security(pod, c, what);

    // A Service exposes gRPC 7443 and HTTP 9090 to the coordinator's pods.
    let labels = sts["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap();
    let service = find(&objects, "Service", "fedmicse-coordinator");
    let ports: BTreeSet<u64> = array_of(&service["spec"]["ports"], "Service ports")
        .iter()
        .filter_map(|p| p["port"].as_u64())
        .collect();
    assert!(
        ports.contains(&7443) && ports.contains(&9090),
        "Service ports {ports:?}"
    );
    for (k, v) in service["spec"]["selector"]
        .as_object()
        .expect("Service selector")
    {
        assert_eq!(
            labels.get(k),
            Some(v),
            "Service selector {k} does not match the pods"
        );
    }
}

#[test]
fn agent_deployments_run_one_replica_with_secret_config_and_data() {
    let objects = kubernetes_objects();
    let agents: Vec<&Value> = objects
        .iter()
        .map(|(_, o)| o)
        .filter(|o| o["kind"] == "Deployment")
        .filter(|o| {
            o["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.contains("agent"))
        })
        .collect();
    assert!(!agents.is_empty(), "no agent Deployment");
    for d in agents {
        let what = format!("Deployment {}", d["metadata"]["name"]);
        assert_eq!(d["spec"]["replicas"], 1, "{what}: one replica per silo");
        let pod = &d["spec"]["template"]["spec"];
        let c = &array_of(&pod["containers"], &format!("{what}: containers"))[0];
        let args: Vec<&str> = array_of(&c["args"], &format!("{what}: args"))
            .iter()
            .map(|a| str_of(a, "arg"))
            .collect();
        assert!(args.contains(&"agent"), "{what}: args {args:?}");
        assert_eq!(
            c["livenessProbe"]["httpGet"]["path"], "/health",
            "{what}: livenessProbe"
        );
        assert_eq!(
            probe_port(c, &c["livenessProbe"], &what),
            9091,
            "{what}: livenessProbe port"
        );
        assert!(
            !mounted_volumes(pod, c, "secret", "secretName").is_empty(),
            "{what}: no Secret"
        );
        let config = check_agent_config(
            &mounted_config(&objects, pod, c, "agent.toml", &what),
            &what,
        );

        // The silo's sentences on a mounted volume, from a claim defined beside it.
        let data_mount = array_of(&c["volumeMounts"], &format!("{what}: volumeMounts"))
            .iter()
            .find(|m| {
                m["mountPath"]
                    .as_str()
                    .is_some_and(|p| config.data.file.starts_with(p))
            })
            .unwrap_or_else(|| {
                panic!(
                    "{what}: {} is on no mounted volume",
                    config.data.file.display()
                )
            });
        let claims = mounted_volumes(pod, c, "persistentVolumeClaim", "claimName");
        let claim = claims
            .get(str_of(&data_mount["name"], "mount name"))
            .unwrap_or_else(|| panic!("{what}: the data volume is not a PersistentVolumeClaim"));
        find(&objects, "PersistentVolumeClaim", claim);
        check_pod_security(pod, c, &what);
    }
}

#[test]
fn compose_runs_certs_coordinator_and_agents_with_health_checks() {
    let dir = deploy().join("container");
    let docs = yaml_documents(&dir.join("compose.yaml"));
    assert_eq!(docs.len(), 1, "compose.yaml: one document");
    let services = docs[0]["services"]
        .as_object()
        .expect("compose.yaml: services");
    for name in ["certs", "coordinator"] {
        assert!(
            services.contains_key(name),
            "compose.yaml: no {name} service"
        );
    }
    let agents: Vec<&String> = services.keys().filter(|k| k.starts_with("agent")).collect();
    assert!(agents.len() >= 2, "compose.yaml: agents {agents:?}");

    let health = |name: &str| {
        let test = &services[name]["healthcheck"]["test"];
        let joined: String = match test {
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            other => other.as_str().unwrap_or_default().to_string(),
        };
        assert!(
            joined.contains("/health"),
            "compose.yaml: {name} healthcheck {test}"
        );
    };
    health("coordinator");
    assert_eq!(
        services["coordinator"]["depends_on"]["certs"]["condition"],
        "service_completed_successfully",
        "compose.yaml: the coordinator waits for the certificates"
    );
    for a in &agents {
        health(a.as_str());
        assert!(
            services[a.as_str()]["depends_on"]["coordinator"].is_object(),
            "compose.yaml: {a} does not depend on the coordinator"
        );
    }

    // Every configuration the services bind-mount exists beside compose.yaml and is valid.
    let mut mounted = 0;
    for (name, s) in services {
        for v in s["volumes"].as_array().into_iter().flatten() {
            let Some(spec) = v.as_str() else { continue };
            let source = spec.split(':').next().unwrap_or_default();
            if let Some(rel) = source.strip_prefix("./") {
                let file = dir.join(rel);
                assert!(
                    file.is_file(),
                    "compose.yaml: {name} mounts missing {}",
                    file.display()
                );
                if rel.ends_with(".toml") {
                    check_config(&read(&file), &file.display().to_string());
                    mounted += 1;
                }
            }
        }
    }
    assert!(
        mounted >= 3,
        "compose.yaml: expected the coordinator's and agents' configs mounted"
    );
}

#[test]
fn container_images_build_the_binary_and_fetch_the_model() {
    let dir = deploy().join("container");
    for (file, cuda) in [("Dockerfile", false), ("Dockerfile.cuda", true)] {
        let text = read(&dir.join(file));
        assert!(
            text.contains("cargo build --release"),
            "{file}: no release build"
        );
        assert_eq!(
            text.contains("--features cuda"),
            cuda,
            "{file}: --features cuda"
        );
        assert!(
            text.contains("fetch-model"),
            "{file}: the model is not fetched"
        );
        assert!(
            text.contains("ENTRYPOINT [\"fedmicse\"]"),
            "{file}: ENTRYPOINT"
        );
        let user = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("USER "))
            .last()
            .unwrap_or_else(|| panic!("{file}: no USER"));
        assert!(
            !user.starts_with("root") && !user.starts_with('0'),
            "{file}: USER {user}"
        );
        assert!(
            dir.join(format!("{file}.dockerignore")).is_file(),
            "{file}: no .dockerignore"
        );
    }
    assert!(deploy().join("fetch-model").is_file());
}

#[test]
fn systemd_units_are_hardened_and_point_at_their_configs() {
    let dir = deploy().join("systemd");
    for (unit, command, config_kind) in [
        ("fedmicse-coordinator.service", "coordinator", "coordinator"),
        ("fedmicse-agent.service", "agent", "agent"),
    ] {
        let s = unit_settings(&dir.join(unit));
        let get = |key: &str| {
            s.get(&("Service".to_string(), key.to_string()))
                .and_then(|v| v.last())
                .map(String::as_str)
        };
        let yes = |key: &str| {
            let v = get(key).unwrap_or_else(|| panic!("{unit}: {key}= is missing"));
            assert!(
                ["yes", "true", "on", "1"].contains(&v),
                "{unit}: {key}={v}, expected yes"
            );
        };
        let equals = |key: &str, want: &str| {
            assert_eq!(get(key), Some(want), "{unit}: {key}=");
        };

        // A dedicated, unprivileged user.
        let dynamic = get("DynamicUser").is_some_and(|v| ["yes", "true", "on", "1"].contains(&v));
        let user = get("User").unwrap_or_default();
        assert!(
            dynamic || (!user.is_empty() && user != "root"),
            "{unit}: User={user:?}"
        );

        equals("StateDirectory", "fedmicse");
        equals("ConfigurationDirectory", "fedmicse");
        equals("Restart", "on-failure");
        assert!(
            get("RestartSec").is_some(),
            "{unit}: RestartSec= (backoff) is missing"
        );
        equals("ProtectSystem", "strict");
        let home = get("ProtectHome").unwrap_or_default();
        assert!(
            ["yes", "true", "read-only", "tmpfs"].contains(&home),
            "{unit}: ProtectHome={home:?}"
        );
        yes("PrivateTmp");
        yes("NoNewPrivileges");
        equals("ReadWritePaths", "/var/lib/fedmicse");
        equals("CapabilityBoundingSet", "");

        // ExecStart: the binary, JSON logs, the subcommand and a config that exists here.
        let exec = get("ExecStart").unwrap_or_else(|| panic!("{unit}: no ExecStart="));
        let words: Vec<&str> = exec.split_whitespace().collect();
        assert!(words[0].ends_with("/fedmicse"), "{unit}: ExecStart={exec}");
        assert!(
            words.windows(2).any(|w| w == ["--log-format", "json"]),
            "{unit}: ExecStart={exec}"
        );
        assert!(words.contains(&command), "{unit}: ExecStart={exec}");
        let config = words
            .windows(2)
            .find(|w| w[0] == "--config")
            .map(|w| Path::new(w[1]))
            .unwrap_or_else(|| panic!("{unit}: ExecStart has no --config"));
        assert!(
            config.starts_with("/etc/fedmicse"),
            "{unit}: config {}",
            config.display()
        );
        let example = dir.join(config.file_name().unwrap());
        assert!(
            example.is_file(),
            "{unit}: no example {}",
            example.display()
        );
        let text = read(&example);
        let what = example.display().to_string();
        match config_kind {
            "coordinator" => {
                let c = check_coordinator_config(&text, &what);
                assert!(
                    c.federation.state_dir.starts_with("/var/lib/fedmicse"),
                    "{what}: state_dir is outside StateDirectory"
                );
            }
            _ => {
                check_agent_config(&text, &what);
            }
        }
        assert_eq!(
            s.get(&("Install".to_string(), "WantedBy".to_string()))
                .and_then(|v| v.last())
                .map(String::as_str),
            Some("multi-user.target"),
            "{unit}: [Install] WantedBy="
        );
    }
}
