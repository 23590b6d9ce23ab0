//! Certificates and keys for one control plane, made with the `openssl` CLI
//! at start: a CA, the API server's serving certificate (valid for 127.0.0.1,
//! `localhost` and the in-cluster names of the `kubernetes` Service), client
//! certificates signed by the CA (the admin is in group `system:masters`), and
//! the service-account signing key pair.
//!
//! Every file lives in the control plane's own directory and nothing is reused
//! across runs: a new CA per start means no test can talk to another run's
//! API server by accident.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors creating keys and certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// openssl could not be run.
    #[error("cannot run openssl: {0}")]
    Run(#[source] std::io::Error),
    /// openssl ran and failed.
    #[error("openssl {what} failed: {stderr}")]
    Failed {
        /// The step.
        what: String,
        /// What openssl said.
        stderr: String,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The files of one control plane's PKI.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The directory holding every file.
    pub dir: PathBuf,
    /// CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// CA key (PEM).
    pub ca_key: PathBuf,
    /// API server serving certificate.
    pub serving_cert: PathBuf,
    /// API server serving key.
    pub serving_key: PathBuf,
    /// Admin client certificate (CN `holdfast-admin`, O `system:masters`).
    pub admin_cert: PathBuf,
    /// Admin client key.
    pub admin_key: PathBuf,
    /// Service-account signing key (private).
    pub sa_key: PathBuf,
    /// Service-account verification key (public).
    pub sa_pub: PathBuf,
}

/// A client certificate and its key.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// Certificate (PEM file).
    pub cert: PathBuf,
    /// Key (PEM file).
    pub key: PathBuf,
}

fn openssl(what: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .map_err(Error::Run)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Failed {
            what: what.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("harness paths are UTF-8")
}

impl Pki {
    /// Creates a new CA, serving certificate, admin certificate and
    /// service-account keys in `dir`. `service_ip` is the first address of the
    /// service CIDR (the `kubernetes` Service's cluster IP).
    pub fn create(dir: &Path, service_ip: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Write {
            path: dir.display().to_string(),
            source,
        })?;
        let p = |n: &str| dir.join(n);
        let pki = Self {
            dir: dir.to_path_buf(),
            ca_cert: p("ca.crt"),
            ca_key: p("ca.key"),
            serving_cert: p("apiserver.crt"),
            serving_key: p("apiserver.key"),
            admin_cert: p("admin.crt"),
            admin_key: p("admin.key"),
            sa_key: p("sa.key"),
            sa_pub: p("sa.pub"),
        };
        openssl(
            "CA",
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                s(&pki.ca_key),
                "-out",
                s(&pki.ca_cert),
                "-days",
                "30",
                "-subj",
                "/CN=holdfast-e2e-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            ],
        )?;
        let sans = format!(
            "subjectAltName=IP:127.0.0.1,IP:{service_ip},DNS:localhost,DNS:kubernetes,\
             DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
        );
        pki.sign("apiserver", "/CN=kube-apiserver", &sans, "serverAuth")?;
        pki.sign(
            "admin",
            "/O=system:masters/CN=holdfast-admin",
            "subjectAltName=DNS:holdfast-admin",
            "clientAuth",
        )?;
        openssl(
            "service-account key",
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                s(&pki.sa_key),
            ],
        )?;
        openssl(
            "service-account public key",
            &[
                "pkey",
                "-in",
                s(&pki.sa_key),
                "-pubout",
                "-out",
                s(&pki.sa_pub),
            ],
        )?;
        Ok(pki)
    }

    /// Signs a new key pair `<stem>.crt`/`<stem>.key` with the CA.
    fn sign(&self, stem: &str, subject: &str, sans: &str, usage: &str) -> Result<ClientCert> {
        let cert = self.dir.join(format!("{stem}.crt"));
        let key = self.dir.join(format!("{stem}.key"));
        openssl(
            stem,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                s(&key),
                "-out",
                s(&cert),
                "-days",
                "30",
                "-subj",
                subject,
                "-CA",
                s(&self.ca_cert),
                "-CAkey",
                s(&self.ca_key),
                "-addext",
                sans,
                "-addext",
                "basicConstraints=critical,CA:FALSE",
                "-addext",
                "keyUsage=critical,digitalSignature,keyEncipherment",
                "-addext",
                &format!("extendedKeyUsage={usage}"),
            ],
        )?;
        Ok(ClientCert { cert, key })
    }

    /// A client certificate for user `name` in `groups`, signed by the CA:
    /// the API server authenticates it as that user (RBAC tests).
    pub fn client_cert(&self, name: &str, groups: &[&str]) -> Result<ClientCert> {
        let mut subject = String::new();
        for g in groups {
            subject.push_str(&format!("/O={g}"));
        }
        subject.push_str(&format!("/CN={name}"));
        let stem = format!(
            "user-{}",
            name.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        );
        self.sign(
            &stem,
            &subject,
            "subjectAltName=DNS:holdfast-user",
            "clientAuth",
        )
    }
}
