//! The cluster's certificates, made by the test (rcgen, ECDSA P-256): a cluster CA that signs
//! the serving certificates and the client certificates (the user is the common name, the
//! groups the organisations, as the API server reads them), a front-proxy CA for the
//! aggregation layer, and the service-account signing key.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key (PKCS#8).
    pub key: PathBuf,
}

/// The certificate authorities and keys of one cluster, written under one directory.
pub struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    front_proxy: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    /// Makes the CAs and the service-account key pair in `dir` (created if needed).
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let pki = Pki {
            dir: dir.to_owned(),
            ca: ca("lb-tests-ca")?,
            front_proxy: ca("lb-tests-front-proxy-ca")?,
        };
        pki.write("ca.crt", &pki.ca.pem())?;
        pki.write("front-proxy-ca.crt", &pki.front_proxy.pem())?;
        let sa = KeyPair::generate()?;
        pki.write("sa.key", &sa.serialize_pem())?;
        pki.write("sa.pub", &sa.public_key_pem())?;
        Ok(pki)
    }

    /// The cluster CA's certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The front-proxy CA's certificate.
    pub fn front_proxy_ca_cert(&self) -> PathBuf {
        self.dir.join("front-proxy-ca.crt")
    }

    /// The service-account signing key (private).
    pub fn sa_key(&self) -> PathBuf {
        self.dir.join("sa.key")
    }

    /// The service-account verification key (public).
    pub fn sa_pub(&self) -> PathBuf {
        self.dir.join("sa.pub")
    }

    /// A serving certificate named `name` for these addresses and DNS names, signed by the
    /// cluster CA.
    pub fn serving(&self, name: &str, ips: &[IpAddr], dns: &[&str]) -> Result<CertFiles> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        for name in dns {
            params
                .subject_alt_names
                .push(SanType::DnsName((*name).try_into()?));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.leaf(name, params, &self.ca)
    }

    /// A client certificate for `user` in `groups`, signed by the cluster CA, in files named
    /// after `name`.
    pub fn client(&self, name: &str, user: &str, groups: &[&str]) -> Result<CertFiles> {
        self.client_of(&self.ca, name, user, groups)
    }

    /// The API server's client certificate towards aggregated API servers, signed by the
    /// front-proxy CA.
    pub fn front_proxy_client(&self) -> Result<CertFiles> {
        self.client_of(
            &self.front_proxy,
            "front-proxy-client",
            "front-proxy-client",
            &[],
        )
    }

    fn client_of(
        &self,
        issuer: &CertifiedIssuer<'static, KeyPair>,
        name: &str,
        user: &str,
        groups: &[&str],
    ) -> Result<CertFiles> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, user);
        for group in groups {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *group);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.leaf(name, params, issuer)
    }

    fn leaf(
        &self,
        name: &str,
        mut params: CertificateParams,
        issuer: &CertifiedIssuer<'static, KeyPair>,
    ) -> Result<CertFiles> {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate()?;
        let cert = params
            .signed_by(&key, issuer)
            .with_context(|| format!("sign the certificate {name}"))?;
        Ok(CertFiles {
            cert: self.write(&format!("{name}.crt"), &cert.pem())?,
            key: self.write(&format!("{name}.key"), &key.serialize_pem())?,
        })
    }

    fn write(&self, file: &str, pem: &str) -> Result<PathBuf> {
        let path = self.dir.join(file);
        std::fs::write(&path, pem).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }
}

fn ca(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}
