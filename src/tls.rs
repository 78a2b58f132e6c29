//! Mutual TLS pinned to node ids.
//!
//! Every node presents a self-signed certificate made from its identity key,
//! so the certificate's public key *is* the node: its SHA-256 (over the
//! SubjectPublicKeyInfo DER) is the node id. There is no CA and no hostname
//! check. A client pins the node id it expects and aborts the handshake on
//! anything else; a server accepts any well-formed certificate (the handshake
//! proves possession of the key), reads the caller's node id from it, and
//! decides per call whether that node is trusted (see `server::federation`).
//! Only TLS 1.3 is offered.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::crypto::NodeId;
use crate::error::{Error, Result};
use crate::identity::{self, Identity};

/// The name in every node certificate; clients that insist on a hostname
/// (grpcurl, grpcio) use it as the server name override.
pub(crate) const CERT_NAME: &str = "bitsync";

/// The one rustls provider (aws-lc-rs), with the key exchange groups in our
/// order of preference: the hybrid X25519MLKEM768 first, so a recorded
/// handshake stays secret against a future quantum computer, then classic
/// X25519 for peers that do not offer the hybrid. Every ClientConfig and
/// ServerConfig is built from this explicitly; nothing relies on the
/// process default.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
    Arc::new(CryptoProvider {
        kx_groups: vec![kx_group::X25519MLKEM768, kx_group::X25519],
        ..default_provider()
    })
}

/// Install the same provider as rustls' process-wide default, so any library
/// that builds a config without naming one (tonic, arti) gets it too.
pub fn install_crypto_provider() {
    let _ = Arc::unwrap_or_clone(provider()).install_default();
}

/// A self-signed certificate over this node's identity key.
pub(crate) fn certificate(id: &Identity) -> Result<CertificateDer<'static>> {
    let der = id.pkcs8_der();
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(der.as_slice()),
        &rcgen::PKCS_RSA_SHA256,
    )
    .map_err(|e| Error::io(format!("loading the node key for TLS: {e}")))?;
    let mut params = rcgen::CertificateParams::new(vec![CERT_NAME.to_string()])
        .map_err(|e| Error::io(format!("certificate parameters: {e}")))?;
    // The CN only helps a human reading the certificate: nothing matches on
    // it (the node id is the SPKI's hash). It holds the short id, since
    // RFC 5280 caps a CN at 64 characters and `bitsync node <64 hex>` was 77
    // (Python's cryptography warned).
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, common_name(&id.id()));
    params.distinguished_name = dn;
    let cert = params
        .self_signed(&key)
        .map_err(|e| Error::io(format!("signing the node certificate: {e}")))?;
    Ok(cert.der().clone())
}

/// The subject CN of a node's certificate: `bitsync <first 12 hex of the id>`.
pub(crate) fn common_name(id: &NodeId) -> String {
    format!("bitsync {}", id.short())
}

/// The certificate as PEM, for third-party clients (grpcurl, grpcio).
pub(crate) fn certificate_pem(id: &Identity) -> Result<String> {
    use base64::Engine;
    let der = certificate(id)?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    Ok(out)
}

/// The SubjectPublicKeyInfo DER inside a certificate.
pub(crate) fn spki_of(cert: &CertificateDer<'_>) -> Result<Vec<u8>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| Error::auth(format!("peer certificate does not parse: {e}")))?;
    Ok(parsed.tbs_certificate.subject_pki.raw.to_vec())
}

/// The node id and key of a peer, from the certificate it presented.
pub(crate) fn peer_node(certs: Option<&[CertificateDer<'_>]>) -> Option<(NodeId, Vec<u8>)> {
    let cert = certs?.first()?;
    let spki = spki_of(cert).ok()?;
    Some((identity::node_id_of(&spki), spki))
}

fn key_der(id: &Identity) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.pkcs8_der().to_vec()))
}

fn tls_err(e: rustls::Error) -> Error {
    Error::io(format!("TLS configuration: {e}"))
}

/// Server side: present our certificate; accept (but do not require) any node's certificate.
pub fn server_config(id: &Identity) -> Result<Arc<rustls::ServerConfig>> {
    let p = provider();
    let mut cfg = rustls::ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(Arc::new(AnyNode {
            signatures: HandshakeSignatures(p),
        }))
        .with_single_cert(vec![certificate(id)?], key_der(id))
        .map_err(tls_err)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client side: present our certificate; accept only the node `expected`.
pub fn client_config(id: &Identity, expected: NodeId) -> Result<Arc<rustls::ClientConfig>> {
    let p = provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedNode {
            expected,
            signatures: HandshakeSignatures(p),
        }))
        .with_client_auth_cert(vec![certificate(id)?], key_der(id))
        .map_err(tls_err)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(CERT_NAME).expect("static name is valid")
}

fn check_rsa(cert: &CertificateDer<'_>) -> TlsResult<NodeId> {
    let spki = spki_of(cert).map_err(|e| bad_certificate(e.to_string()))?;
    identity::public_key_from_spki(&spki)
        .map_err(|_| bad_certificate("peer certificate key is not an RSA key".into()))?;
    Ok(identity::node_id_of(&spki))
}

/// Why a peer's certificate was refused, carried inside rustls' own
/// "invalid peer certificate" error, so the dialer can tell a peer that is
/// not who it should be ([`is_refused_certificate`]) from a network failure.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn bad_certificate(why: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(Refused(why)),
    )))
}

/// Whether a failed handshake means the peer's certificate was refused (a
/// wrong or malformed node certificate), as opposed to the network or the
/// protocol failing. Asks rustls' error kind, never the message text.
pub(crate) fn is_refused_certificate(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)))
}

type TlsResult<T> = std::result::Result<T, rustls::Error>;

/// The handshake-signature checks both verifiers delegate to: rustls's own,
/// with the provider's algorithms. Only the certificate checks are ours.
#[derive(Debug)]
struct HandshakeSignatures(Arc<CryptoProvider>);

impl HandshakeSignatures {
    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> TlsResult<HandshakeSignatureValid> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }
    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> TlsResult<HandshakeSignatureValid> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }
    fn schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct PinnedNode {
    expected: NodeId,
    signatures: HandshakeSignatures,
}

impl ServerCertVerifier for PinnedNode {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> TlsResult<ServerCertVerified> {
        let got = check_rsa(end_entity)?;
        if got != self.expected {
            tracing::warn!(peer = %self.expected.short(), presented = %got.short(), "refused a peer presenting the wrong node id");
            return Err(bad_certificate(format!(
                "peer presented node id {got}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> TlsResult<HandshakeSignatureValid> {
        self.signatures.tls12(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> TlsResult<HandshakeSignatureValid> {
        self.signatures.tls13(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

#[derive(Debug)]
struct AnyNode {
    signatures: HandshakeSignatures,
}

impl ClientCertVerifier for AnyNode {
    fn offer_client_auth(&self) -> bool {
        true
    }
    /// Optional, so a caller without a certificate gets a clear UNAUTHENTICATED
    /// status from gRPC instead of a bare handshake failure.
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> TlsResult<ClientCertVerified> {
        check_rsa(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> TlsResult<HandshakeSignatureValid> {
        self.signatures.tls12(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> TlsResult<HandshakeSignatureValid> {
        self.signatures.tls13(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{ClientConnection, NamedGroup, ServerConnection};

    /// Runs a TLS handshake in memory between a client and a server config
    /// and returns the key exchange group both ends agreed on.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> NamedGroup {
        let mut c = ClientConnection::new(client, server_name()).unwrap();
        let mut s = ServerConnection::new(server).unwrap();
        for _ in 0..16 {
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets().unwrap();
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets().unwrap();
        }
        assert!(
            !c.is_handshaking() && !s.is_handshaking(),
            "handshake did not finish"
        );
        let ours = c.negotiated_key_exchange_group().unwrap().name();
        assert_eq!(s.negotiated_key_exchange_group().unwrap().name(), ours);
        ours
    }

    /// Two nodes' own configs agree on the post-quantum hybrid.
    #[test]
    fn two_nodes_negotiate_x25519mlkem768() {
        let a = Identity::generate().unwrap();
        let b = Identity::generate().unwrap();
        let group = handshake(
            client_config(&b, a.id()).unwrap(),
            server_config(&a).unwrap(),
        );
        assert_eq!(group, NamedGroup::X25519MLKEM768);
    }

    /// A peer offering only classic X25519 still connects: the hybrid is
    /// preferred, not required.
    #[test]
    fn classic_x25519_is_the_fallback() {
        let a = Identity::generate().unwrap();
        let b = Identity::generate().unwrap();
        let classic = Arc::new(CryptoProvider {
            kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
            ..rustls::crypto::aws_lc_rs::default_provider()
        });
        let cfg = rustls::ClientConfig::builder_with_provider(classic.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedNode {
                expected: a.id(),
                signatures: HandshakeSignatures(classic),
            }))
            .with_client_auth_cert(vec![certificate(&b).unwrap()], key_der(&b))
            .unwrap();
        let group = handshake(Arc::new(cfg), server_config(&a).unwrap());
        assert_eq!(group, NamedGroup::X25519);
    }
}
