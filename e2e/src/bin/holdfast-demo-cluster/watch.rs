//! What the story observes, recorded from watches so that a state that lasts
//! a moment is not missed between two polls: every reclaim policy each PV
//! went through (a drained volume is `Delete` only briefly before the
//! storage deletes it), and every flush Job that succeeded (the operator
//! deletes a Job once it has acted on it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use crate::tables::{CLEAN_ANNOTATION, job_status};

/// The life of one PV as the watch saw it.
#[derive(Debug, Clone, Default)]
pub struct VolumeLife {
    /// Reclaim policies in the order seen (consecutive repeats collapsed).
    pub policies: Vec<String>,
    /// `holdfast.dev/clean` in the last state seen.
    pub clean: Option<String>,
    /// The PV was deleted.
    pub deleted: bool,
}

impl VolumeLife {
    /// It was seen `Retain`, later `Delete`.
    pub fn retain_then_delete(&self) -> bool {
        let retain = self.policies.iter().position(|p| p == "Retain");
        let delete = self.policies.iter().rposition(|p| p == "Delete");
        matches!((retain, delete), (Some(r), Some(d)) if r < d)
    }
}

/// Everything observed, shared with the watch tasks.
#[derive(Debug, Default)]
pub struct Seen {
    /// By PV name.
    pub volumes: BTreeMap<String, VolumeLife>,
    /// Names of Jobs seen `Complete`.
    pub succeeded_jobs: BTreeSet<String>,
}

/// The watches; dropping this stops them.
pub struct Observer {
    pub seen: Arc<Mutex<Seen>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Observer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Observer {
    /// Starts watching every PV and the Jobs of `ns`.
    pub fn start(client: &Client, ns: &str) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        let s = seen.clone();
        let volumes = tokio::spawn(async move {
            let mut stream =
                std::pin::pin!(watcher(pvs, watcher::Config::default()).default_backoff());
            while let Some(event) = stream.next().await {
                let (pv, deleted) = match event {
                    Ok(watcher::Event::Apply(pv) | watcher::Event::InitApply(pv)) => (pv, false),
                    Ok(watcher::Event::Delete(pv)) => (pv, true),
                    _ => continue,
                };
                let mut seen = s.lock().expect("seen lock");
                let life = seen.volumes.entry(pv.name_any()).or_default();
                if let Some(policy) = pv
                    .spec
                    .as_ref()
                    .and_then(|s| s.persistent_volume_reclaim_policy.clone())
                    && life.policies.last() != Some(&policy)
                {
                    life.policies.push(policy);
                }
                life.clean = pv.annotations().get(CLEAN_ANNOTATION).cloned();
                life.deleted |= deleted;
            }
        });
        let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
        let s = seen.clone();
        let jobs = tokio::spawn(async move {
            let mut stream = std::pin::pin!(
                watcher(jobs, watcher::Config::default())
                    .default_backoff()
                    .applied_objects()
            );
            while let Some(event) = stream.next().await {
                if let Ok(job) = event
                    && job_status(&job) == "Complete"
                {
                    s.lock()
                        .expect("seen lock")
                        .succeeded_jobs
                        .insert(job.name_any());
                }
            }
        });
        Self {
            seen,
            tasks: vec![volumes, jobs],
        }
    }

    /// The life of PV `name` so far.
    pub fn volume(&self, name: &str) -> VolumeLife {
        self.seen
            .lock()
            .expect("seen lock")
            .volumes
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether Job `name` was seen succeeded.
    pub fn job_succeeded(&self, name: &str) -> bool {
        self.seen
            .lock()
            .expect("seen lock")
            .succeeded_jobs
            .contains(name)
    }
}
