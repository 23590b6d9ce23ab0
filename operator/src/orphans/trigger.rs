//! Wakes orphan recovery as soon as anything it looks at changes: watches
//! (reflector streams) on the pods, claims, PVs and StatefulSets labelled
//! [`CLUSTER_LABEL`], the flush Jobs and the CaptureClusters. Each change
//! stores one wake-up ([`Notify`]); the periodic pass stays as a resync.
//! A pass still lists what it needs, so a missed or coalesced event costs
//! nothing but a moment.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::debug;

use crate::api::{CLUSTER_LABEL, COMPONENT_LABEL, CaptureCluster};
use crate::flush::FLUSH_COMPONENT;
use crate::runtime::scoped;

fn changes<K>(api: Api<K>, config: watcher::Config) -> BoxStream<'static, ()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    watcher(api, config)
        .default_backoff()
        .touched_objects()
        .filter_map(|r| async move {
            if let Err(e) = &r {
                debug!(error = %e, "orphan trigger watch");
            }
            r.ok().map(|_| ())
        })
        .boxed()
}

fn namespaced<K>(
    client: &Client,
    ns: Option<&str>,
    config: watcher::Config,
) -> BoxStream<'static, ()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    changes(scoped::<K>(client, ns), config)
}

/// Starts the watches; every change notifies the returned [`Notify`].
pub fn spawn(
    client: Client,
    namespace: Option<String>,
) -> (Arc<Notify>, tokio::task::JoinHandle<()>) {
    let notify = Arc::new(Notify::new());
    let ns = namespace.as_deref();
    let labelled = watcher::Config::default().labels(CLUSTER_LABEL);
    let streams = vec![
        namespaced::<Pod>(&client, ns, labelled.clone()),
        namespaced::<PersistentVolumeClaim>(&client, ns, labelled.clone()),
        namespaced::<StatefulSet>(&client, ns, labelled.clone()),
        namespaced::<Job>(
            &client,
            ns,
            watcher::Config::default().labels(&format!("{COMPONENT_LABEL}={FLUSH_COMPONENT}")),
        ),
        namespaced::<CaptureCluster>(&client, ns, watcher::Config::default()),
        changes(Api::<PersistentVolume>::all(client.clone()), labelled),
    ];
    let n = notify.clone();
    let task = tokio::spawn(async move {
        let mut all = futures::stream::select_all(streams);
        while all.next().await.is_some() {
            n.notify_one();
        }
    });
    (notify, task)
}
