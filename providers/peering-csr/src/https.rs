//! The peer-to-peer path: the provider's HTTPS peering endpoint and the consumer's client.
//!
//! **Trust without a CA.** The endpoint's TLS certificate is self-signed with the provider's
//! Ed25519 *identity key*. The consumer's verifier ignores names and CAs: it accepts the
//! connection only if the certificate's public key has the fingerprint pinned from discovery (or,
//! with nothing pinned, records it — trust on first use — and then requires the provider's
//! claimed identity to carry that same key), and rustls checks the handshake signature with it.
//! So the identity answering is the holder of the pinned key.
//!
//! **Routes** (JSON, HTTP/1.1):
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /v1/challenge` | `{"consumer": id, "purpose": "grant"\|"release"}` | `{"provider": identity, "challenge": {...}}` |
//! | `POST /v1/grant` | a signed `PeeringRequest` | `PeeringGrant` |
//! | `POST /v1/release` | a signed `PeeringRequest` (release nonce) | `204` |
//!
//! Errors are `{"kind": "unauthenticated"|"refused"|"notPeered"|"badRequest"|"internal",
//! "cluster": id?, "message": text}` with status 401, 403, 404, 400 or 500; internal details stay
//! in the provider's log. Request bodies are capped at 64 KiB, connections at
//! [`PeeringServer::max_connections`], each connection at [`PeeringServer::connection_timeout`].

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use liqo_core::{
    Challenge, ClusterId, ClusterIdentity, KeyFingerprint, PeeringError, PeeringGrant,
    PeeringRequest, PeeringTarget, PublicKey,
};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, ring as ring_provider},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
};
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::{
    identity::LocalIdentity, names::PIN_MISMATCH, nonce::Purpose, provider::Provider,
    transport::ProviderTransport,
};

const MAX_BODY: usize = 64 * 1024;
const MAX_RESPONSE: usize = 1024 * 1024;
/// OID of Ed25519 public keys (RFC 8410).
const ED25519_OID: &str = "1.3.101.112";

/// Errors of the peering endpoint's server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The TLS certificate or configuration could not be made.
    #[error("TLS setup of the peering endpoint failed: {0}")]
    Tls(String),
    /// Accepting connections failed.
    #[error("peering endpoint I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// The body of `POST /v1/challenge`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChallengeRequest {
    /// The consumer asking.
    pub consumer: ClusterId,
    /// What the nonce will be used for.
    pub purpose: Purpose,
}

/// The answer of `POST /v1/challenge`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChallengeResponse {
    /// The provider's identity (its key is the TLS certificate's key).
    pub provider: ClusterIdentity,
    /// The nonce to sign.
    pub challenge: Challenge,
}

/// An error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// `unauthenticated`, `refused`, `notPeered`, `badRequest` or `internal`.
    pub kind: String,
    /// The cluster the error is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterId>,
    /// What went wrong.
    pub message: String,
}

fn crypto() -> Arc<CryptoProvider> {
    Arc::new(ring_provider::default_provider())
}

/// A self-signed TLS certificate made with the identity key itself.
fn identity_certificate(identity: &LocalIdentity) -> Result<CertificateDer<'static>, ServerError> {
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(identity.pkcs8_der().to_vec()),
        &rcgen::PKCS_ED25519,
    )
    .map_err(|e| ServerError::Tls(format!("identity key: {e}")))?;
    let mut params =
        rcgen::CertificateParams::new(vec![identity.id().to_string(), "localhost".to_owned()])
            .map_err(|e| ServerError::Tls(e.to_string()))?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365);
    let cert = params
        .self_signed(&key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    Ok(cert.der().clone())
}

/// The provider's HTTPS peering endpoint.
#[derive(Debug, Clone)]
pub struct PeeringServer {
    provider: Arc<Provider>,
    /// At most this many connections are served at once; more wait for a slot. Default 32.
    pub max_connections: usize,
    /// Bound on one connection, TLS handshake to last byte. Default 90 s.
    pub connection_timeout: Duration,
}

impl PeeringServer {
    /// An endpoint for `provider`.
    pub fn new(provider: Arc<Provider>) -> Self {
        Self {
            provider,
            max_connections: 32,
            connection_timeout: Duration::from_secs(90),
        }
    }

    fn tls(&self) -> Result<TlsAcceptor, ServerError> {
        let identity = self.provider.identity();
        let cert = identity_certificate(identity)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.pkcs8_der().to_vec()));
        let config = rustls::ServerConfig::builder_with_provider(crypto())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ServerError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(|e| ServerError::Tls(e.to_string()))?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Serves on `listener` until `shutdown` completes; connections in flight finish (bounded by
    /// [`connection_timeout`](Self::connection_timeout)).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let acceptor = self.tls()?;
        let slots = Arc::new(Semaphore::new(self.max_connections.max(1)));
        let tasks = tokio_util::task::TaskTracker::new();
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                () = &mut shutdown => break,
                p = slots.clone().acquire_owned() => p.map_err(|_| ServerError::Tls("semaphore closed".into()))?,
            };
            let (tcp, peer) = tokio::select! {
                () = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a peering connection failed");
                        continue;
                    }
                },
            };
            let acceptor = acceptor.clone();
            let provider = self.provider.clone();
            let timeout = self.connection_timeout;
            tasks.spawn(async move {
                let _permit = permit;
                let serve = async {
                    let tls = acceptor.accept(tcp).await?;
                    let service = hyper::service::service_fn(move |req| {
                        let provider = provider.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(&provider, req).await) }
                    });
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await
                        .map_err(std::io::Error::other)
                };
                match tokio::time::timeout(timeout, serve).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "peering connection failed"),
                    Err(_) => tracing::debug!(%peer, "peering connection timed out"),
                }
            });
        }
        tasks.close();
        tasks.wait().await;
        Ok(())
    }

    /// Binds `addr` and serves in a background task; returns the bound address (use port 0 for
    /// any free port) and the task.
    pub async fn spawn(
        self,
        addr: SocketAddr,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(SocketAddr, tokio::task::JoinHandle<Result<(), ServerError>>), ServerError> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        Ok((local, tokio::spawn(self.serve(listener, shutdown))))
    }
}

async fn handle(provider: &Provider, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let route = (req.method().clone(), req.uri().path().to_owned());
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "badRequest",
                None,
                format!("reading the body: {e}"),
            );
        }
    };
    let parse_err = |e: serde_json::Error| {
        error(
            StatusCode::BAD_REQUEST,
            "badRequest",
            None,
            format!("invalid JSON: {e}"),
        )
    };
    let result = match (route.0, route.1.as_str()) {
        (Method::POST, "/v1/challenge") => {
            match serde_json::from_slice::<ChallengeRequest>(&body) {
                Ok(r) => provider.challenge(&r.consumer, r.purpose).map(|challenge| {
                    json(
                        StatusCode::OK,
                        &ChallengeResponse {
                            provider: provider.identity().identity(),
                            challenge,
                        },
                    )
                }),
                Err(e) => return parse_err(e),
            }
        }
        (Method::POST, "/v1/grant") => match serde_json::from_slice::<PeeringRequest>(&body) {
            Ok(r) => provider.grant(r).await.map(|g| json(StatusCode::OK, &g)),
            Err(e) => return parse_err(e),
        },
        (Method::POST, "/v1/release") => match serde_json::from_slice::<PeeringRequest>(&body) {
            Ok(r) => provider.release(r).await.map(|()| {
                let mut resp = Response::new(Full::new(Bytes::new()));
                *resp.status_mut() = StatusCode::NO_CONTENT;
                resp
            }),
            Err(e) => return parse_err(e),
        },
        (_, path) => {
            return error(
                StatusCode::NOT_FOUND,
                "badRequest",
                None,
                format!("no route {path}"),
            );
        }
    };
    result.unwrap_or_else(|e| error_response(&e))
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let mut resp = Response::new(Full::new(Bytes::from(bytes)));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            None,
            format!("encoding the answer: {e}"),
        ),
    }
}

fn error(
    status: StatusCode,
    kind: &str,
    cluster: Option<ClusterId>,
    message: String,
) -> Response<Full<Bytes>> {
    let body = ErrorBody {
        kind: kind.to_owned(),
        cluster,
        message,
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp
}

fn error_response(e: &PeeringError) -> Response<Full<Bytes>> {
    match e {
        PeeringError::Unauthenticated { cluster, reason } => error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            Some(cluster.clone()),
            reason.clone(),
        ),
        PeeringError::Refused { cluster, reason } => error(
            StatusCode::FORBIDDEN,
            "refused",
            Some(cluster.clone()),
            reason.clone(),
        ),
        PeeringError::NotPeered(c) => error(
            StatusCode::NOT_FOUND,
            "notPeered",
            Some(c.clone()),
            e.to_string(),
        ),
        other => {
            tracing::warn!(error = %other, "peering request failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                None,
                "the provider failed to complete the request; see its logs".into(),
            )
        }
    }
}

/// Accepts exactly the server key with the pinned fingerprint (or, with none pinned, any Ed25519
/// key, recorded for the caller to bind to the claimed identity).
#[derive(Debug)]
struct PinnedKey {
    expected: Option<KeyFingerprint>,
    seen: Mutex<Option<KeyFingerprint>>,
    provider: Arc<CryptoProvider>,
}

fn ed25519_key(cert: &CertificateDer<'_>) -> Result<PublicKey, rustls::Error> {
    let bad = |m: &str| rustls::Error::General(format!("peering endpoint certificate: {m}"));
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| bad("not X.509"))?;
    let spki = parsed.public_key();
    if spki.algorithm.algorithm.to_id_string() != ED25519_OID {
        return Err(bad(
            "the key is not Ed25519, so it cannot be a liqo identity key",
        ));
    }
    Ok(PublicKey::from_bytes(spki.subject_public_key.data.to_vec()))
}

impl ServerCertVerifier for PinnedKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = ed25519_key(end_entity)?.fingerprint();
        if let Some(expected) = &self.expected
            && expected != &fp
        {
            return Err(rustls::Error::General(format!(
                "peering endpoint presented key {fp}, {PIN_MISMATCH} {expected}"
            )));
        }
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(fp);
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A consumer's client of one provider's peering endpoint.
pub struct HttpsTransport {
    endpoint: String,
    host: String,
    port: u16,
    verifier: Arc<PinnedKey>,
    tls: TlsConnector,
    timeout: Duration,
}

impl std::fmt::Debug for HttpsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsTransport")
            .field("endpoint", &self.endpoint)
            .field("expected", &self.verifier.expected)
            .finish_non_exhaustive()
    }
}

impl HttpsTransport {
    /// A client for `target.endpoint` (`https://host:port`), pinning
    /// `target.expected_fingerprint` when set.
    pub fn new(target: &PeeringTarget, timeout: Duration) -> Result<Self, PeeringError> {
        let unreachable = |message: String| PeeringError::Unreachable {
            endpoint: target.endpoint.clone(),
            message,
        };
        let uri: http::Uri = target
            .endpoint
            .parse()
            .map_err(|e| unreachable(format!("not a URL: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(unreachable(
                "the peering endpoint must be an https:// URL".into(),
            ));
        }
        let host = uri
            .host()
            .ok_or_else(|| unreachable("no host".into()))?
            .trim_matches(['[', ']'])
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let provider = crypto();
        let verifier = Arc::new(PinnedKey {
            expected: target.expected_fingerprint,
            seen: Mutex::new(None),
            provider: provider.clone(),
        });
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| unreachable(format!("TLS setup: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_no_client_auth();
        Ok(Self {
            endpoint: target.endpoint.clone(),
            host,
            port,
            verifier,
            tls: TlsConnector::from(Arc::new(config)),
            timeout,
        })
    }

    fn unreachable(&self, message: String) -> PeeringError {
        PeeringError::Unreachable {
            endpoint: self.endpoint.clone(),
            message,
        }
    }

    async fn post<B: Serialize, R: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<Option<R>, PeeringError> {
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| self.unreachable(format!("connecting: {e}")))?;
            let name = ServerName::try_from(self.host.clone())
                .map_err(|e| self.unreachable(format!("server name: {e}")))?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| self.unreachable(format!("TLS: {e}")))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| self.unreachable(format!("HTTP: {e}")))?;
            let conn = tokio::spawn(conn);
            let bytes = serde_json::to_vec(body).map_err(|e| PeeringError::Other(Box::new(e)))?;
            let req = Request::post(path)
                .header(http::header::HOST, format!("{}:{}", self.host, self.port))
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(bytes)))
                .map_err(|e| PeeringError::Other(Box::new(e)))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| self.unreachable(format!("request: {e}")))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| self.unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            conn.abort();
            Ok::<_, PeeringError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| self.unreachable(format!("no answer within {:?}", self.timeout)))??;
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| self.unreachable(format!("invalid answer: {e}")));
        }
        let err: ErrorBody = serde_json::from_slice(&body)
            .map_err(|_| self.unreachable(format!("HTTP {status} without an error body")))?;
        let cluster = err.cluster.clone();
        Err(match (err.kind.as_str(), cluster) {
            ("unauthenticated", Some(cluster)) => PeeringError::Unauthenticated {
                cluster,
                reason: err.message,
            },
            ("refused", Some(cluster)) => PeeringError::Refused {
                cluster,
                reason: err.message,
            },
            ("notPeered", Some(cluster)) => PeeringError::NotPeered(cluster),
            _ => self.unreachable(format!("HTTP {status}: {}", err.message)),
        })
    }

    /// The key fingerprint the endpoint's TLS certificate carried on the last connection.
    pub fn observed_fingerprint(&self) -> Option<KeyFingerprint> {
        *self.verifier.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl ProviderTransport for HttpsTransport {
    async fn challenge(
        &self,
        consumer: &ClusterId,
        purpose: Purpose,
    ) -> Result<(ClusterIdentity, Challenge), PeeringError> {
        let resp: ChallengeResponse = self
            .post(
                "/v1/challenge",
                &ChallengeRequest {
                    consumer: consumer.clone(),
                    purpose,
                },
            )
            .await?
            .ok_or_else(|| self.unreachable("empty challenge answer".into()))?;
        // The identity claimed in the body must own the key the TLS channel proved.
        if resp.provider.fingerprint() != self.observed_fingerprint() {
            return Err(PeeringError::Unauthenticated {
                cluster: resp.provider.id,
                reason: "the identity in the answer does not carry the key of the endpoint's TLS certificate".into(),
            });
        }
        Ok((resp.provider, resp.challenge))
    }

    async fn grant(&self, request: PeeringRequest) -> Result<PeeringGrant, PeeringError> {
        self.post("/v1/grant", &request)
            .await?
            .ok_or_else(|| self.unreachable("empty grant answer".into()))
    }

    async fn release(&self, request: PeeringRequest) -> Result<(), PeeringError> {
        self.post::<_, serde_json::Value>("/v1/release", &request)
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_certificate_carries_the_identity_key() {
        let me = LocalIdentity::generate("rome".parse().unwrap(), "Rome").unwrap();
        let cert = identity_certificate(&me).unwrap();
        assert_eq!(ed25519_key(&cert).unwrap().fingerprint(), me.fingerprint());
        let other = LocalIdentity::generate("milan".parse().unwrap(), "Milan").unwrap();
        let v = PinnedKey {
            expected: Some(other.fingerprint()),
            seen: Mutex::new(None),
            provider: crypto(),
        };
        let name = ServerName::try_from("rome").unwrap();
        let err = v
            .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
            .unwrap_err();
        assert!(err.to_string().contains("not the pinned"), "{err}");
        let v = PinnedKey {
            expected: None,
            seen: Mutex::new(None),
            provider: crypto(),
        };
        v.verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
            .unwrap();
        assert_eq!(*v.seen.lock().unwrap(), Some(me.fingerprint()));
    }

    #[test]
    fn endpoint_must_be_https() {
        let t = PeeringTarget {
            cluster_id: None,
            endpoint: "http://x:1".into(),
            expected_fingerprint: None,
        };
        assert!(
            HttpsTransport::new(&t, Duration::from_secs(1))
                .unwrap_err()
                .to_string()
                .contains("https://")
        );
    }
}
