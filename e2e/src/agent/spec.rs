//! Pure translations from a Pod spec to what the agent runs: the binary for a
//! container, its environment (downward API, `$(VAR)` expansion) and the
//! wrapper script that sets up the pod's private mount namespace.
//!
//! Nothing here talks to the API server; values fetched from it (Secrets,
//! ConfigMaps) are passed in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, ObjectFieldSelector, Pod};

/// The binary that runs `container`: the basename of `command[0]` looked up in
/// `bin_dir` (so `/usr/local/bin/holdfast-capture` and `holdfast-capture` both
/// map to the locally built `holdfast-capture`), or, without a command, the
/// image's last path segment prefixed with `holdfast-` (`holdfast/capture:dev`
/// runs `holdfast-capture`). Returns the binary and the remaining arguments
/// (`command[1..]` followed by `args`).
pub fn binary_for(container: &Container, bin_dir: &Path) -> Option<(PathBuf, Vec<String>)> {
    let command = container.command.clone().unwrap_or_default();
    let args = container.args.clone().unwrap_or_default();
    let (name, mut rest) = match command.split_first() {
        Some((first, rest)) => (
            Path::new(first).file_name()?.to_string_lossy().into_owned(),
            rest.to_vec(),
        ),
        None => {
            let image = container.image.as_deref()?;
            // registry:5000/holdfast/operator:1.0@sha256:... -> operator
            let without_digest = image.split('@').next()?;
            let last = without_digest.rsplit('/').next()?.split(':').next()?;
            let name = if last.starts_with("holdfast-") {
                last.to_string()
            } else {
                format!("holdfast-{last}")
            };
            (name, Vec::new())
        }
    };
    rest.extend(args);
    Some((bin_dir.join(name), rest))
}

/// Whether the pod's containers all use images the agent runs (those whose
/// name starts with `prefix`, e.g. `holdfast/`).
pub fn is_runnable(pod: &Pod, prefix: &str) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .all(|c| c.image.as_deref().is_some_and(|i| i.starts_with(prefix)))
}

/// The value of a downward-API field of `pod` (`metadata.name`,
/// `metadata.namespace`, `metadata.uid`, `metadata.labels['k']`,
/// `metadata.annotations['k']`, `spec.nodeName`, `spec.serviceAccountName`,
/// `status.podIP(s)`, `status.hostIP(s)`); `pod_ip` and `host_ip` are the
/// addresses the agent assigned, which the status may not show yet.
pub fn field_value(
    pod: &Pod,
    field: &ObjectFieldSelector,
    pod_ip: &str,
    host_ip: &str,
) -> Option<String> {
    let path = field.field_path.as_str();
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let keyed = |prefix: &str, map: Option<&BTreeMap<String, String>>| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?.to_string();
        map.and_then(|m| m.get(&key).cloned())
    };
    match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .or_else(|| Some("default".into())),
        "status.podIP" | "status.podIPs" => Some(pod_ip.to_string()),
        "status.hostIP" | "status.hostIPs" => Some(host_ip.to_string()),
        _ if path.starts_with("metadata.labels['") => {
            keyed("metadata.labels['", meta.labels.as_ref())
        }
        _ if path.starts_with("metadata.annotations['") => {
            keyed("metadata.annotations['", meta.annotations.as_ref())
        }
        _ => None,
    }
}

/// Kubernetes' `$(VAR)` expansion: `$(NAME)` becomes the value of `NAME` when
/// defined and stays as written otherwise; `$$` is a literal `$`.
pub fn expand(input: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.get(name) {
                Some(value) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// One bind mount of a container: a host path made visible at `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Host path (a directory or a file).
    pub source: PathBuf,
    /// Path inside the pod's mount namespace.
    pub target: String,
    /// Remount read-only.
    pub read_only: bool,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The `sh` script run inside `unshare --mount --propagation private`: make
/// each mount target, bind the host path onto it (read-only when asked), enter
/// `workdir`, then `exec "$@"` so the program keeps the wrapper's pid. The
/// mounts exist only in the pod's namespace and vanish with its last process.
pub fn mount_script(mounts: &[BindMount], workdir: &str) -> String {
    let mut script = String::from(
        "set -e\nm() { if [ -d \"$1\" ]; then mkdir -p \"$2\"; else mkdir -p \"$(dirname \"$2\")\"; \
         [ -e \"$2\" ] || : > \"$2\"; fi; mount --bind \"$1\" \"$2\"; }\n",
    );
    for mount in mounts {
        let source = mount.source.display().to_string();
        script.push_str(&format!("m {} {}\n", quote(&source), quote(&mount.target)));
        if mount.read_only {
            script.push_str(&format!(
                "mount -o remount,bind,ro {}\n",
                quote(&mount.target)
            ));
        }
    }
    script.push_str(&format!("cd {}\nexec \"$@\"\n", quote(workdir)));
    script
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(image: &str, command: &[&str], args: &[&str]) -> Container {
        Container {
            name: "c".into(),
            image: Some(image.into()),
            command: (!command.is_empty()).then(|| command.iter().map(|s| s.to_string()).collect()),
            args: (!args.is_empty()).then(|| args.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn binary_comes_from_command_basename_then_image() {
        let bin = Path::new("/b");
        let c = container(
            "holdfast/capture:dev",
            &["/usr/bin/holdfast-capture", "serve"],
            &["--x"],
        );
        assert_eq!(
            binary_for(&c, bin),
            Some((
                PathBuf::from("/b/holdfast-capture"),
                vec!["serve".into(), "--x".into()]
            ))
        );
        let c = container("registry:5000/holdfast/operator:1.0", &[], &["run"]);
        assert_eq!(
            binary_for(&c, bin),
            Some((PathBuf::from("/b/holdfast-operator"), vec!["run".into()]))
        );
    }

    #[test]
    fn expands_defined_variables_and_keeps_unknown_ones() {
        let vars = BTreeMap::from([("POD_IP".to_string(), "127.1.0.2".to_string())]);
        assert_eq!(
            expand("--listen=$(POD_IP):8080 $(NOPE) $$(POD_IP) $", &vars),
            "--listen=127.1.0.2:8080 $(NOPE) $(POD_IP) $"
        );
    }

    #[test]
    fn mount_script_quotes_paths_and_remounts_read_only() {
        let script = mount_script(
            &[BindMount {
                source: PathBuf::from("/h/it's"),
                target: "/data".into(),
                read_only: true,
            }],
            "/",
        );
        assert!(script.contains(r"m '/h/it'\''s' '/data'"), "{script}");
        assert!(
            script.contains("mount -o remount,bind,ro '/data'"),
            "{script}"
        );
        assert!(script.ends_with("exec \"$@\"\n"));
    }
}
