//! The TLS listener, where a client certificate's common name is the role
//! (Smokescreen's original way to tell callers apart).

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A server config from a PEM bundle (certificate chain and key) that asks
/// for client certificates signed by `client_ca` but also accepts clients
/// without one (they fall to the ACL's default rule).
pub fn server_config(bundle: &Path, client_ca: Option<&Path>) -> Result<Arc<ServerConfig>, String> {
    let shown = |p: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", p.display());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(bundle)
        .map_err(|e| shown(bundle, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| shown(bundle, &e))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate in the bundle",
            bundle.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(bundle)
        .map_err(|e| shown(bundle, &format!("no private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| shown(ca, &e))? {
                roots
                    .add(cert.map_err(|e| shown(ca, &e))?)
                    .map_err(|e| shown(ca, &e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| shown(ca, &e))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)
        }
        None => builder.with_no_client_auth().with_single_cert(certs, key),
    }
    .map_err(|e| shown(bundle, &e))?;
    Ok(Arc::new(config))
}

/// One DER element: (tag, contents, rest).
fn tlv(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *der.first()?;
    let first = *der.get(1)? as usize;
    let (len, start) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in der.get(2..2 + n)? {
            len = (len << 8) | *b as usize;
        }
        (len, 2 + n)
    };
    let body = der.get(start..start + len)?;
    Some((tag, body, &der[start + len..]))
}

/// The subject's common name (OID 2.5.4.3) of a DER certificate.
pub fn subject_cn(cert: &[u8]) -> Option<String> {
    let (_, certificate, _) = tlv(cert)?;
    let (_, tbs, _) = tlv(certificate)?;
    let mut rest = tbs;
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xa0 {
        rest = after; // explicit version
    }
    // serialNumber, signature, issuer, validity, then subject
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (_, mut subject, _) = tlv(rest)?;
    let mut cn = None;
    while !subject.is_empty() {
        let (_, set, next) = tlv(subject)?;
        subject = next;
        let (_, attr, _) = tlv(set)?;
        let (oid_tag, oid, value) = tlv(attr)?;
        if oid_tag == 0x06 && oid == [0x55, 0x04, 0x03] {
            let (_, v, _) = tlv(value)?;
            cn = Some(String::from_utf8_lossy(v).into_owned());
        }
    }
    cn
}
