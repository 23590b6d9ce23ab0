//! What a user would see with `kubectl get capturecluster,pods,pvc,pv,jobs`,
//! read through kube-rs and printed as kubectl's tables, plus what only
//! Holdfast knows: each capture pod's buffered events (from its
//! `/metrics`) and the records in the Kafka topic.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::core::GroupVersionKind;
use kube::{Client, ResourceExt};

/// The CaptureCluster of the demo.
pub const CLUSTER: &str = "events";
/// Its capture pods.
pub const CAPTURE_SELECTOR: &str =
    "holdfast.dev/cluster=events,app.kubernetes.io/component=capture";
/// The topic of the default stream.
pub const TOPIC: &str = "events";
/// Annotation a capture pod and the operator keep on a buffer's PV.
pub const CLEAN_ANNOTATION: &str = "holdfast.dev/clean";

/// The CaptureCluster resource (no dependency on the operator crate).
pub fn captureclusters(client: &Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("holdfast.dev", "v1alpha1", "CaptureCluster");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "captureclusters");
    Api::namespaced_with(client.clone(), ns, &resource)
}

/// Running, Ready and not being deleted.
pub fn ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    pod.metadata.deletion_timestamp.is_none()
        && status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `holdfast_buffer_events` of the capture pod at `ip`.
pub async fn buffered(ip: &str) -> Option<u64> {
    let text = reqwest::Client::new()
        .get(format!("http://{ip}:8080/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("holdfast_buffer_events "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Buffered events of every ready capture pod, by pod name.
pub async fn buffers(client: &Client, ns: &str) -> Vec<(String, Option<u64>)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut out = Vec::new();
    let list = pods
        .list(&ListParams::default().labels(CAPTURE_SELECTOR))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    for pod in list.iter().filter(|p| ready(p)) {
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
        let n = match ip {
            Some(ip) => buffered(&ip).await,
            None => None,
        };
        out.push((pod.name_any(), n));
    }
    out
}

fn age(time: Option<&Time>) -> String {
    let Some(Time(t)) = time else {
        return "<unknown>".into();
    };
    let secs = jiff::Timestamp::now().duration_since(*t).as_secs().max(0);
    match secs {
        0..120 => format!("{secs}s"),
        120..7200 => format!("{}m{}s", secs / 60, secs % 60),
        _ => format!("{}h{}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// Prints rows under a header, columns padded as kubectl pads them.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}   "));
            }
        }
        println!("    {}", text.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    println!();
}

fn dash(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// Prints the demo namespace's CaptureCluster, pods, claims, Jobs, every
/// PV, and the record count of the topic (when `bootstrap` is given).
pub async fn print_all(client: &Client, ns: &str, bootstrap: Option<&str>) {
    println!("  $ kubectl get capturecluster,pods,pvc,pv,jobs -n {ns}");
    let list = ListParams::default();
    if let Ok(ccs) = captureclusters(client, ns).list(&list).await {
        let rows: Vec<Vec<String>> = ccs
            .items
            .iter()
            .map(|cc| {
                let condition = |kind: &str, field: &str| {
                    cc.data["status"]["conditions"]
                        .as_array()
                        .and_then(|c| c.iter().find(|c| c["type"] == kind))
                        .and_then(|c| c[field].as_str())
                        .map(str::to_string)
                };
                vec![
                    format!("capturecluster.holdfast.dev/{}", cc.name_any()),
                    dash(cc.data["spec"]["replicas"].as_i64()),
                    dash(cc.data["status"]["readyReplicas"].as_i64()),
                    dash(condition("Ready", "reason")),
                    dash(cc.data["status"]["orphanedVolumes"].as_i64()),
                    dash(condition("OrphansStuck", "status")),
                    age(cc.metadata.creation_timestamp.as_ref()),
                ]
            })
            .collect();
        table(
            &[
                "NAME", "DESIRED", "READY", "STATUS", "ORPHANS", "STUCK", "AGE",
            ],
            &rows,
        );
    }
    if let Ok(pods) = Api::<Pod>::namespaced(client.clone(), ns).list(&list).await {
        let mut rows = Vec::new();
        for pod in &pods.items {
            let status = pod.status.clone().unwrap_or_default();
            let containers = status.container_statuses.clone().unwrap_or_default();
            let ready_n = containers.iter().filter(|c| c.ready).count();
            let restarts: i32 = containers.iter().map(|c| c.restart_count).sum();
            let phase = if pod.metadata.deletion_timestamp.is_some() {
                "Terminating".to_string()
            } else {
                status.phase.clone().unwrap_or_default()
            };
            let capture =
                pod.labels().get("app.kubernetes.io/component") == Some(&"capture".to_string());
            let buffer = match (&status.pod_ip, capture && ready(pod)) {
                (Some(ip), true) => dash(buffered(ip).await),
                _ => "-".into(),
            };
            rows.push(vec![
                format!("pod/{}", pod.name_any()),
                format!(
                    "{ready_n}/{}",
                    pod.spec.as_ref().map_or(0, |s| s.containers.len())
                ),
                phase,
                restarts.to_string(),
                dash(pod.spec.as_ref().and_then(|s| s.node_name.clone())),
                dash(status.pod_ip.clone()),
                buffer,
                age(pod.metadata.creation_timestamp.as_ref()),
            ]);
        }
        table(
            &[
                "NAME", "READY", "STATUS", "RESTARTS", "NODE", "IP", "BUFFERED", "AGE",
            ],
            &rows,
        );
    }
    if let Ok(claims) = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .list(&list)
        .await
    {
        let rows: Vec<Vec<String>> = claims
            .items
            .iter()
            .map(|c| {
                vec![
                    format!("persistentvolumeclaim/{}", c.name_any()),
                    dash(c.status.as_ref().and_then(|s| s.phase.clone())),
                    dash(c.spec.as_ref().and_then(|s| s.volume_name.clone())),
                    age(c.metadata.creation_timestamp.as_ref()),
                ]
            })
            .collect();
        table(&["NAME", "STATUS", "VOLUME", "AGE"], &rows);
    }
    if let Ok(pvs) = Api::<PersistentVolume>::all(client.clone())
        .list(&list)
        .await
    {
        let rows: Vec<Vec<String>> = pvs
            .items
            .iter()
            .map(|pv| {
                let spec = pv.spec.clone().unwrap_or_default();
                let claim = spec.claim_ref.as_ref().map(|r| {
                    format!(
                        "{}/{}",
                        r.namespace.clone().unwrap_or_default(),
                        r.name.clone().unwrap_or_default()
                    )
                });
                vec![
                    format!("persistentvolume/{}", pv.name_any()),
                    dash(
                        spec.capacity
                            .as_ref()
                            .and_then(|c| c.get("storage"))
                            .map(|q| q.0.clone()),
                    ),
                    dash(spec.persistent_volume_reclaim_policy.clone()),
                    dash(pv.status.as_ref().and_then(|s| s.phase.clone())),
                    dash(claim),
                    dash(pv.annotations().get(CLEAN_ANNOTATION)),
                    age(pv.metadata.creation_timestamp.as_ref()),
                ]
            })
            .collect();
        table(
            &[
                "NAME",
                "CAPACITY",
                "RECLAIM POLICY",
                "STATUS",
                "CLAIM",
                "HOLDFAST.DEV/CLEAN",
                "AGE",
            ],
            &rows,
        );
    }
    if let Ok(jobs) = Api::<Job>::namespaced(client.clone(), ns).list(&list).await {
        let rows: Vec<Vec<String>> = jobs
            .items
            .iter()
            .map(|j| {
                let status = j.status.clone().unwrap_or_default();
                vec![
                    format!("job.batch/{}", j.name_any()),
                    job_status(j).into(),
                    format!("{}/1", status.succeeded.unwrap_or(0)),
                    age(j.metadata.creation_timestamp.as_ref()),
                ]
            })
            .collect();
        if rows.is_empty() {
            println!("    (no jobs)\n");
        } else {
            table(&["NAME", "STATUS", "COMPLETIONS", "AGE"], &rows);
        }
    }
    if let Some(bootstrap) = bootstrap {
        match holdfast_e2e::kafka::record_count(bootstrap, TOPIC).await {
            Ok(n) => println!("  kafka: topic {TOPIC} holds {n} records\n"),
            Err(_) => println!("  kafka: not answering\n"),
        }
    }
}

/// `Complete`, `Failed` or `Running`, from the Job's conditions.
pub fn job_status(job: &Job) -> &'static str {
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let has = |t: &str| {
        conditions
            .iter()
            .any(|c| c.type_ == t && c.status == "True")
    };
    if has("Complete") {
        "Complete"
    } else if has("Failed") {
        "Failed"
    } else {
        "Running"
    }
}
