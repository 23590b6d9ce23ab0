//! What a pod needs from the API server before it can run: its volumes as
//! host paths (claims through their bound PV, Secrets, ConfigMaps, the
//! projected ServiceAccount token from the TokenRequest API, downward API,
//! emptyDir) and each container's environment (`env`, `envFrom`,
//! `fieldRef`, `secretKeyRef`, `configMapKeyRef`).
//!
//! Files are written under the pod's own directory, which the agent removes
//! when the pod is gone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, PersistentVolume,
    PersistentVolumeClaim, Pod, Secret, ServiceAccount, Volume,
};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

use super::spec::{self, BindMount};
use crate::kube::storage::volume_path;

/// Errors preparing a pod.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request failed.
    #[error("{what}: {source}")]
    Api {
        /// What was attempted.
        what: String,
        /// Why.
        source: kube::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The pod cannot run yet (a claim is unbound, a key is missing); the agent retries.
    #[error("{0}")]
    NotReady(String),
    /// The pod uses something the agent does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Api { what, source }
}

fn write(path: &Path, data: &[u8]) -> Result<()> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(path, data).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Where the pod's addresses come from, for downward-API values.
#[derive(Debug, Clone)]
pub struct PodAddresses {
    /// The pod's IP.
    pub pod_ip: String,
    /// The node's IP.
    pub host_ip: String,
}

/// The pod's volumes as host paths, by volume name. Files for Secrets,
/// ConfigMaps, tokens and emptyDirs go under `pod_dir/volumes/<name>`.
pub async fn volumes(
    client: &Client,
    pod: &Pod,
    pod_dir: &Path,
    addresses: &PodAddresses,
) -> Result<BTreeMap<String, PathBuf>> {
    let ns = pod.namespace().unwrap_or_default();
    let mut out = BTreeMap::new();
    for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let dir = pod_dir.join("volumes").join(&volume.name);
        let path = volume_source(client, &ns, pod, volume, &dir, addresses).await?;
        out.insert(volume.name.clone(), path);
    }
    Ok(out)
}

async fn volume_source(
    client: &Client,
    ns: &str,
    pod: &Pod,
    volume: &Volume,
    dir: &Path,
    addresses: &PodAddresses,
) -> Result<PathBuf> {
    if let Some(claim) = &volume.persistent_volume_claim {
        let pvc = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
            .get(&claim.claim_name)
            .await
            .map_err(api(format!("get claim {}", claim.claim_name)))?;
        let Some(pv_name) = pvc.spec.and_then(|s| s.volume_name) else {
            return Err(Error::NotReady(format!(
                "claim {} is not bound",
                claim.claim_name
            )));
        };
        let pv = Api::<PersistentVolume>::all(client.clone())
            .get(&pv_name)
            .await
            .map_err(api(format!("get volume {pv_name}")))?;
        let path = volume_path(&pv).ok_or_else(|| {
            Error::Unsupported(format!("volume {pv_name} is not local or hostPath"))
        })?;
        mkdir(&path)?;
        return Ok(path);
    }
    if let Some(host) = &volume.host_path {
        let path = PathBuf::from(&host.path);
        match host.type_.as_deref() {
            Some("DirectoryOrCreate") => mkdir(&path)?,
            Some("FileOrCreate") if !path.exists() => write(&path, b"")?,
            Some("Directory") if !path.is_dir() => {
                return Err(Error::NotReady(format!(
                    "hostPath {} is not a directory",
                    host.path
                )));
            }
            _ => {}
        }
        return Ok(path);
    }
    mkdir(dir)?;
    if volume.empty_dir.is_some() {
        return Ok(dir.to_path_buf());
    }
    if let Some(secret) = &volume.secret {
        let name = secret.secret_name.clone().unwrap_or_default();
        let data = secret_data(client, ns, &name, secret.optional.unwrap_or(false)).await?;
        write_items(dir, &data, secret.items.as_deref())?;
        return Ok(dir.to_path_buf());
    }
    if let Some(cm) = &volume.config_map {
        let data = config_map_data(client, ns, &cm.name, cm.optional.unwrap_or(false)).await?;
        write_items(dir, &data, cm.items.as_deref())?;
        return Ok(dir.to_path_buf());
    }
    if let Some(downward) = &volume.downward_api {
        write_downward(
            dir,
            pod,
            downward.items.as_deref().unwrap_or_default(),
            addresses,
        )?;
        return Ok(dir.to_path_buf());
    }
    if let Some(projected) = &volume.projected {
        for source in projected.sources.iter().flatten() {
            if let Some(token) = &source.service_account_token {
                let jwt = service_account_token(
                    client,
                    pod,
                    token.audience.clone(),
                    token.expiration_seconds,
                )
                .await?;
                write(&dir.join(&token.path), jwt.as_bytes())?;
            }
            if let Some(cm) = &source.config_map {
                let data =
                    config_map_data(client, ns, &cm.name, cm.optional.unwrap_or(false)).await?;
                write_items(dir, &data, cm.items.as_deref())?;
            }
            if let Some(secret) = &source.secret {
                let data =
                    secret_data(client, ns, &secret.name, secret.optional.unwrap_or(false)).await?;
                write_items(dir, &data, secret.items.as_deref())?;
            }
            if let Some(downward) = &source.downward_api {
                write_downward(
                    dir,
                    pod,
                    downward.items.as_deref().unwrap_or_default(),
                    addresses,
                )?;
            }
        }
        return Ok(dir.to_path_buf());
    }
    Err(Error::Unsupported(format!(
        "volume {} has a source the agent cannot provide",
        volume.name
    )))
}

fn write_items(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
) -> Result<()> {
    match items {
        Some(items) => {
            for item in items {
                let value = data.get(&item.key).ok_or_else(|| {
                    Error::NotReady(format!("key {} not found for a volume item", item.key))
                })?;
                write(&dir.join(&item.path), value)?;
            }
        }
        None => {
            for (key, value) in data {
                write(&dir.join(key), value)?;
            }
        }
    }
    Ok(())
}

fn write_downward(
    dir: &Path,
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    addresses: &PodAddresses,
) -> Result<()> {
    for item in items {
        let value = item
            .field_ref
            .as_ref()
            .and_then(|f| spec::field_value(pod, f, &addresses.pod_ip, &addresses.host_ip))
            .unwrap_or_default();
        write(&dir.join(&item.path), value.as_bytes())?;
    }
    Ok(())
}

/// A token for the pod's ServiceAccount from the TokenRequest API, bound to
/// the pod (as the kubelet requests it).
pub async fn service_account_token(
    client: &Client,
    pod: &Pod,
    audience: Option<String>,
    expiration_seconds: Option<i64>,
) -> Result<String> {
    let ns = pod.namespace().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.into_iter().filter(|a| !a.is_empty()).collect(),
            expiration_seconds: Some(expiration_seconds.unwrap_or(3607).max(600)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let response = Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create_token_request(&sa, &PostParams::default(), &request)
        .await
        .map_err(api(format!("token request for service account {ns}/{sa}")))?;
    response
        .status
        .map(|s| s.token)
        .ok_or_else(|| Error::NotReady(format!("token request for {ns}/{sa} returned no token")))
}

async fn secret_data(
    client: &Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<BTreeMap<String, Vec<u8>>> {
    match Api::<Secret>::namespaced(client.clone(), ns)
        .get(name)
        .await
    {
        Ok(secret) => {
            let mut data: BTreeMap<String, Vec<u8>> = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, ByteString(v))| (k, v))
                .collect();
            for (k, v) in secret.string_data.unwrap_or_default() {
                data.insert(k, v.into_bytes());
            }
            Ok(data)
        }
        Err(kube::Error::Api(e)) if e.code == 404 && optional => Ok(BTreeMap::new()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            Err(Error::NotReady(format!("secret {ns}/{name} not found")))
        }
        Err(e) => Err(api(format!("get secret {ns}/{name}"))(e)),
    }
}

async fn config_map_data(
    client: &Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<BTreeMap<String, Vec<u8>>> {
    match Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(name)
        .await
    {
        Ok(cm) => {
            let mut data: BTreeMap<String, Vec<u8>> = cm
                .binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, ByteString(v))| (k, v))
                .collect();
            for (k, v) in cm.data.unwrap_or_default() {
                data.insert(k, v.into_bytes());
            }
            Ok(data)
        }
        Err(kube::Error::Api(e)) if e.code == 404 && optional => Ok(BTreeMap::new()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            Err(Error::NotReady(format!("config map {ns}/{name} not found")))
        }
        Err(e) => Err(api(format!("get config map {ns}/{name}"))(e)),
    }
}

/// The container's environment: `envFrom` first, then `env` (which wins),
/// each value `$(VAR)`-expanded against what is defined before it.
pub async fn environment(
    client: &Client,
    pod: &Pod,
    container: &Container,
    base: &BTreeMap<String, String>,
    addresses: &PodAddresses,
) -> Result<BTreeMap<String, String>> {
    let ns = pod.namespace().unwrap_or_default();
    let mut env = base.clone();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(cm) = &from.config_map_ref {
            config_map_data(client, &ns, &cm.name, cm.optional.unwrap_or(false)).await?
        } else if let Some(secret) = &from.secret_ref {
            secret_data(client, &ns, &secret.name, secret.optional.unwrap_or(false)).await?
        } else {
            BTreeMap::new()
        };
        for (k, v) in data {
            env.insert(
                format!("{prefix}{k}"),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(value) = &var.value {
            Some(spec::expand(value, &env))
        } else if let Some(from) = &var.value_from {
            if let Some(field) = &from.field_ref {
                spec::field_value(pod, field, &addresses.pod_ip, &addresses.host_ip)
            } else if let Some(key) = &from.secret_key_ref {
                let optional = key.optional.unwrap_or(false);
                let data = secret_data(client, &ns, &key.name, optional).await?;
                match data.get(&key.key) {
                    Some(v) => Some(String::from_utf8_lossy(v).into_owned()),
                    None if optional => None,
                    None => {
                        return Err(Error::NotReady(format!(
                            "key {} not in secret {ns}/{}",
                            key.key, key.name
                        )));
                    }
                }
            } else if let Some(key) = &from.config_map_key_ref {
                let optional = key.optional.unwrap_or(false);
                let data = config_map_data(client, &ns, &key.name, optional).await?;
                match data.get(&key.key) {
                    Some(v) => Some(String::from_utf8_lossy(v).into_owned()),
                    None if optional => None,
                    None => {
                        return Err(Error::NotReady(format!(
                            "key {} not in config map {ns}/{}",
                            key.key, key.name
                        )));
                    }
                }
            } else {
                return Err(Error::Unsupported(format!(
                    "env {} uses a source the agent cannot resolve (resourceFieldRef)",
                    var.name
                )));
            }
        } else {
            Some(String::new())
        };
        if let Some(value) = value {
            env.insert(var.name.clone(), value);
        }
    }
    Ok(env)
}

/// The bind mounts of `container`, from its `volumeMounts` and the volumes'
/// host paths (`subPath` appended; `subPathExpr` is not supported).
pub fn mounts(
    container: &Container,
    volumes: &BTreeMap<String, PathBuf>,
) -> Result<Vec<BindMount>> {
    let mut out = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let source = volumes.get(&mount.name).ok_or_else(|| {
            Error::Unsupported(format!("volume mount {} names no volume", mount.name))
        })?;
        let source = match mount.sub_path.as_deref() {
            Some(sub) if !sub.is_empty() => {
                let path = source.join(sub);
                if !path.exists() {
                    mkdir(&path)?;
                }
                path
            }
            _ => source.clone(),
        };
        // A missing source would make the wrapper create a file at the
        // target on the host; refuse instead.
        if !source.exists() {
            return Err(Error::NotReady(format!(
                "volume {} path {} does not exist",
                mount.name,
                source.display()
            )));
        }
        out.push(BindMount {
            source,
            target: mount.mount_path.clone(),
            read_only: mount.read_only.unwrap_or(false),
        });
    }
    Ok(out)
}
