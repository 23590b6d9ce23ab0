//! Server-side apply with the operator's one field manager
//! ([`FIELD_MANAGER`]), checked against leadership before each write.

use std::fmt::Debug;

use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope};
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Context, Result, api_err};
use crate::api::FIELD_MANAGER;

/// Server-side applies `object` in `ns` with the operator's field manager.
pub async fn apply_object<K>(ctx: &Context, ns: &str, object: &K) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let name = object.name_any();
    let what = || format!("apply {} {ns}/{name}", K::kind(&()));
    ctx.may_write(what)?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(api_err(what()))
}

/// Server-side applies a cluster-scoped `object` with the operator's field manager.
pub async fn apply_cluster_object<K>(ctx: &Context, object: &K) -> Result<K>
where
    K: Resource<Scope = ClusterResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let name = object.name_any();
    let what = || format!("apply {} {name}", K::kind(&()));
    ctx.may_write(what)?;
    let api: Api<K> = Api::all(ctx.client.clone());
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(api_err(what()))
}
