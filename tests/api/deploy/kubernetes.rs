//! The Kubernetes manifests: probes, namespace, one image tag, forwarded addresses,
//! the metrics token and the owner role.

use serde_yaml::Value;

use super::{deploy_files, files_under, k8s, rel, repo, yaml_documents};

#[test]
fn kubernetes_probes_use_grpc_health_and_the_service_port() {
    let doc = yaml_documents(&repo().join("deploy/k8s/deployment.yaml")).remove(0);
    let container = &doc["spec"]["template"]["spec"]["containers"][0];
    let port = container["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(
        container["readinessProbe"]["grpc"]["port"].as_u64(),
        Some(port)
    );
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/health/live")
    );
    let config = yaml_documents(&repo().join("deploy/k8s/configmap.yaml")).remove(0);
    assert_eq!(
        config["data"]["USER_SERVICE_PORT"]
            .as_str()
            .map(|p| p.parse::<u64>().unwrap()),
        Some(port)
    );
    // Every Secret key the manifests reference exists in the example Secret of
    // that name.
    let secrets = yaml_documents(&repo().join("deploy/k8s/secret.example.yaml"));
    let mut refs = Vec::new();
    for f in deploy_files(&[".yaml"]) {
        for doc in yaml_documents(&f) {
            collect_secret_refs(&doc, &mut refs);
        }
    }
    assert!(!refs.is_empty());
    for (name, key) in refs {
        let secret = secrets
            .iter()
            .find(|s| s["metadata"]["name"].as_str() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("no Secret {name} in secret.example.yaml"));
        assert!(
            secret["stringData"].get(key.as_str()).is_some(),
            "secretKeyRef {name}/{key} missing from secret.example.yaml"
        );
    }
}

/// (secret name, key) of every `secretKeyRef` in a document.
fn collect_secret_refs(v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Mapping(m) => {
            for (k, child) in m {
                if k.as_str() == Some("secretKeyRef") {
                    out.push((
                        child["name"].as_str().unwrap().to_string(),
                        child["key"].as_str().unwrap().to_string(),
                    ));
                }
                collect_secret_refs(child, out);
            }
        }
        Value::Sequence(items) => items.iter().for_each(|i| collect_secret_refs(i, out)),
        _ => {}
    }
}

/// The resources a kustomization lists, as (file, documents).
fn kustomization_resources(dir: &str) -> Vec<(String, Vec<Value>)> {
    let k = k8s(&format!("{dir}/kustomization.yaml")).remove(0);
    k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| {
            let r = r.as_str().unwrap();
            let path = if dir.is_empty() {
                r.to_string()
            } else {
                format!("{dir}/{r}")
            };
            let docs = k8s(&path);
            (path, docs)
        })
        .collect()
}

fn container_images(doc: &Value) -> Vec<String> {
    let spec = &doc["spec"]["template"]["spec"];
    spec["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c["image"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn kustomize_does_not_own_the_shared_namespace() {
    let main = k8s("kustomization.yaml").remove(0);
    assert_eq!(main["namespace"].as_str(), Some("stocksblitz"));
    for dir in ["", "migrate"] {
        for (file, docs) in kustomization_resources(dir) {
            for d in docs {
                assert_ne!(
                    d["kind"].as_str(),
                    Some("Namespace"),
                    "{file}: `kubectl delete -k` would delete the platform's namespace"
                );
            }
        }
    }
    // Creating it is documented, apart from the kustomization.
    let readme = std::fs::read_to_string(repo().join("deploy/README.md")).unwrap();
    assert!(readme.contains("kubectl apply -f deploy/k8s/namespace.yaml"));
}

#[test]
fn the_deployment_and_the_migration_job_run_one_image_tag() {
    let image_of = |dir: &str, kind: &str| -> Vec<String> {
        kustomization_resources(dir)
            .into_iter()
            .flat_map(|(_, docs)| docs)
            .filter(|d| d["kind"].as_str() == Some(kind))
            .flat_map(|d| container_images(&d))
            .collect()
    };
    let deployment = image_of("", "Deployment");
    let job = image_of("migrate", "Job");
    assert_eq!(deployment.len(), 1);
    assert_eq!(
        job, deployment,
        "the Job runs another image than the Deployment"
    );
    // No tag in the manifests: the one tag is the shared component's.
    assert!(
        !deployment[0].contains(':'),
        "{deployment:?} carries its own tag"
    );
    let mut tags = Vec::new();
    let mut kustomizations = Vec::new();
    files_under(&repo().join("deploy/k8s"), &mut kustomizations);
    for f in kustomizations
        .iter()
        .filter(|f| f.file_name().unwrap() == "kustomization.yaml")
    {
        let k = yaml_documents(f).remove(0);
        for i in k["images"].as_sequence().into_iter().flatten() {
            tags.push((rel(f), i["name"].as_str().unwrap().to_string()));
        }
    }
    assert_eq!(
        tags,
        [(
            "deploy/k8s/image/kustomization.yaml".to_string(),
            deployment[0].clone()
        )],
        "exactly one images: entry, in the shared component"
    );
    let component = k8s("image/kustomization.yaml").remove(0);
    assert_eq!(component["kind"].as_str(), Some("Component"));
    for (dir, path) in [("", "image"), ("migrate", "../image")] {
        let k = k8s(&format!("{dir}/kustomization.yaml")).remove(0);
        assert!(
            k["components"]
                .as_sequence()
                .is_some_and(|c| c.iter().any(|c| c.as_str() == Some(path))),
            "deploy/k8s/{dir}: does not include the image component"
        );
    }
    // With kubectl at hand, what kustomize renders agrees.
    let render = |dir: &str| -> Option<Vec<String>> {
        let out = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(repo().join("deploy/k8s").join(dir))
            .output()
            .ok()?;
        assert!(
            out.status.success(),
            "kubectl kustomize {dir}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        Some(
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("image: "))
                .map(str::to_string)
                .collect(),
        )
    };
    if let (Some(d), Some(j)) = (render(""), render("migrate")) {
        assert_eq!(d.len(), 1);
        assert_eq!(d, j);
        assert!(d[0].starts_with("stocksblitz/user-service:"), "{d:?}");
    }
}

#[test]
fn forwarded_addresses_count_only_from_the_ingress_behind_a_network_policy() {
    let config = k8s("configmap.yaml").remove(0);
    assert!(
        config["data"].get("TRUST_FORWARDED_FOR").is_none(),
        "the boolean trusts X-Forwarded-For from anyone who reaches the pod"
    );
    let proxies = config["data"]["TRUSTED_PROXIES"]
        .as_str()
        .expect("TRUSTED_PROXIES set");
    for cidr in proxies.split(',').map(str::trim) {
        let net: ipnet::IpNet = cidr.parse().unwrap_or_else(|_| panic!("{cidr}"));
        assert!(
            net.prefix_len() > 0,
            "TRUSTED_PROXIES trusts everyone: {cidr}"
        );
    }
    let policy = kustomization_resources("")
        .into_iter()
        .flat_map(|(_, docs)| docs)
        .find(|d| d["kind"].as_str() == Some("NetworkPolicy"))
        .expect("a NetworkPolicy in the kustomization");
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"]["app"].as_str(),
        Some("user-service")
    );
    assert!(policy["spec"]["policyTypes"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|t| t.as_str() == Some("Ingress")));
    let rules = policy["spec"]["ingress"].as_sequence().unwrap();
    let mut peers = Vec::new();
    for rule in rules {
        let from = rule["from"]
            .as_sequence()
            .expect("every rule names its sources (no `from` admits everyone)");
        for p in from {
            assert!(
                p.get("ipBlock").is_none(),
                "an ipBlock admits addresses, not the platform's pods: {p:?}"
            );
            for sel in ["namespaceSelector", "podSelector"] {
                if let Some(s) = p.get(sel) {
                    assert!(
                        s.get("matchLabels").is_some() || s.get("matchExpressions").is_some(),
                        "an empty {sel} admits everyone: {p:?}"
                    );
                }
            }
            peers.push(serde_yaml::to_string(p).unwrap());
        }
    }
    let all = peers.join("\n");
    for who in [
        "ingress-nginx",
        "backend",
        "alert",
        "calendar",
        "ticker",
        "monitoring",
    ] {
        assert!(all.contains(who), "no NetworkPolicy peer for {who}:\n{all}");
    }
}

#[test]
fn the_metrics_token_comes_from_the_secret_and_the_scraper_sends_it() {
    let config = k8s("configmap.yaml").remove(0);
    assert!(
        config["data"].get("METRICS_TOKEN").is_none(),
        "a secret in plain config"
    );
    let secret = k8s("secret.example.yaml")
        .into_iter()
        .find(|s| s["metadata"]["name"].as_str() == Some("user-service"))
        .unwrap();
    assert!(
        secret["stringData"]["METRICS_TOKEN"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "METRICS_TOKEN missing or empty in secret.example.yaml"
    );
    let readme = std::fs::read_to_string(repo().join("deploy/README.md")).unwrap();
    assert!(
        readme.contains("--from-literal=METRICS_TOKEN="),
        "the secret instructions leave out METRICS_TOKEN"
    );
    let deployment = k8s("deployment.yaml").remove(0);
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .unwrap();
    let token = env
        .iter()
        .find(|e| e["name"].as_str() == Some("METRICS_TOKEN"))
        .expect("the Deployment passes METRICS_TOKEN");
    let r = &token["valueFrom"]["secretKeyRef"];
    assert_eq!(r["name"].as_str(), Some("user-service"));
    assert_ne!(
        r["optional"].as_bool(),
        Some(true),
        "a pod nobody can scrape"
    );
    let monitor = k8s("servicemonitor.yaml").remove(0);
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
    assert_eq!(endpoint["authorization"]["type"].as_str(), Some("Bearer"));
    assert_eq!(
        endpoint["authorization"]["credentials"]["key"].as_str(),
        Some("METRICS_TOKEN")
    );
    assert_eq!(
        endpoint["authorization"]["credentials"]["name"].as_str(),
        Some("user-service")
    );
}

#[test]
fn only_the_migration_job_holds_the_owner_role() {
    let refs = |path: &str| {
        let mut out = Vec::new();
        for d in k8s(path) {
            collect_secret_refs(&d, &mut out);
        }
        out
    };
    let job = refs("migrate/job.yaml");
    assert!(job.contains(&(
        "user-service-migrate".to_string(),
        "DATABASE_MIGRATION_URL".to_string()
    )));
    let deployment = refs("deployment.yaml");
    assert!(
        deployment
            .iter()
            .all(|(name, key)| name != "user-service-migrate" && key != "DATABASE_MIGRATION_URL"),
        "{deployment:?}"
    );
}
