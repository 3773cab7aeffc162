//! mTLS on the gRPC port: the serving certificate, the client CA, and the accept loop that hands tonic only
//! connections whose client certificate that CA signed — each tagged with its address and the identities
//! its certificate carries, so the xDS side can bind a node id to it.
//!
//! The files are re-read every couple of seconds and on SIGHUP; a new handshake uses what was read last.
//! A set of files that does not load (a key that does not match its certificate, half of a rotation) is
//! refused with one line and the previous set keeps serving. Open connections keep their session.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;

use crate::identity::{self, CertIdentity};
use crate::server::Server;

/// A handshake must finish within this, or the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight at once; more connections than this are dropped until some finish.
const MAX_HANDSHAKES: usize = 256;
/// How often the certificate files are checked for a change.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Where the serving certificate, its key and the client CA are, as given on the command line.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    /// Only SPIFFE ids in this trust domain name Envoys (any, when unset).
    pub trust_domain: Option<String>,
}

/// The set of files in use.
struct Loaded {
    acceptor: TlsAcceptor,
    bytes: [Vec<u8>; 3],
    subject: String,
    not_after_unix: i64,
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    /// The new serving certificate: its subject and validity end.
    Reloaded(String),
    /// The files did not load: the reason (the previous set keeps serving).
    Refused(String),
}

pub struct TlsState {
    files: TlsFiles,
    current: RwLock<Loaded>,
    /// The last refusal, so that a file left broken is reported once, not every two seconds.
    last_refusal: Mutex<Option<String>>,
}

impl TlsState {
    /// Loads the files; at startup, a set that does not load is an error naming the flag and the file.
    pub fn load(files: TlsFiles) -> Result<Self, String> {
        let loaded = load(&files)?;
        Ok(Self {
            files,
            current: RwLock::new(loaded),
            last_refusal: Mutex::new(None),
        })
    }

    pub fn trust_domain(&self) -> Option<&str> {
        self.files.trust_domain.as_deref()
    }

    fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .acceptor
            .clone()
    }

    /// The serving certificate's subject and end of validity (unix seconds).
    pub fn serving(&self) -> (String, i64) {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        (current.subject.clone(), current.not_after_unix)
    }

    /// Re-reads the files; `force` rebuilds even when they did not change (SIGHUP).
    pub fn reload(&self, force: bool) -> Reload {
        let unchanged = |bytes: &[Vec<u8>; 3]| {
            *bytes == self.current.read().unwrap_or_else(|p| p.into_inner()).bytes
        };
        let outcome = match read_all(&self.files) {
            Ok(bytes) if unchanged(&bytes) && !force => return Reload::Unchanged,
            Ok(bytes) => match build(&self.files, bytes) {
                Ok(loaded) => {
                    let what = format!(
                        "{}, valid until {}",
                        loaded.subject,
                        unix_text(loaded.not_after_unix)
                    );
                    *self.current.write().unwrap_or_else(|p| p.into_inner()) = loaded;
                    Reload::Reloaded(what)
                }
                Err(err) => Reload::Refused(err),
            },
            Err(err) => Reload::Refused(err),
        };
        let mut last = self.last_refusal.lock().unwrap_or_else(|p| p.into_inner());
        match &outcome {
            Reload::Refused(err) if !force && last.as_deref() == Some(err.as_str()) => {
                Reload::Unchanged
            }
            Reload::Refused(err) => {
                *last = Some(err.clone());
                outcome
            }
            _ => {
                *last = None;
                outcome
            }
        }
    }
}

pub fn unix_text(unix: i64) -> String {
    u64::try_from(unix)
        .ok()
        .map(|s| humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(s)))
        .map_or_else(|| unix.to_string(), |t| t.to_string())
}

fn read_all(files: &TlsFiles) -> Result<[Vec<u8>; 3], String> {
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|err| format!("{flag} {}: {err}", path.display()))
    };
    Ok([
        read("--xds-tls-cert", &files.cert)?,
        read("--xds-tls-key", &files.key)?,
        read("--xds-client-ca", &files.client_ca)?,
    ])
}

fn load(files: &TlsFiles) -> Result<Loaded, String> {
    build(files, read_all(files)?)
}

fn build(files: &TlsFiles, bytes: [Vec<u8>; 3]) -> Result<Loaded, String> {
    let [cert_pem, key_pem, ca_pem] = &bytes;
    let cert_flag = format!("--xds-tls-cert {}", files.cert.display());
    let key_flag = format!("--xds-tls-key {}", files.key.display());
    let ca_flag = format!("--xds-client-ca {}", files.client_ca.display());

    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{cert_flag}: not a PEM certificate chain: {err}"))?;
    let leaf = chain
        .first()
        .ok_or_else(|| format!("{cert_flag}: no certificate in the file"))?;
    let (subject, not_after_unix) =
        identity::describe(leaf).map_err(|err| format!("{cert_flag}: {err}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|err| format!("{key_flag}: not a PEM private key: {err}"))?;

    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|err| format!("{ca_flag}: not a PEM certificate: {err}"))?;
        roots
            .add(cert)
            .map_err(|err| format!("{ca_flag}: not a CA certificate: {err}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{ca_flag}: no certificate in the file"));
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|err| format!("{ca_flag}: {err}"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|err| format!("TLS 1.3: {err}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|err| format!("{cert_flag} with {key_flag}: {err}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        bytes,
        subject,
        not_after_unix,
    })
}

/// Why a connection or a stream was refused: the label of `canaryctl_xds_refused_total` and the fleet view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refused {
    NotTls,
    TlsVersion,
    NoCertificate,
    UnknownCa,
    BadCertificate,
    /// The client refused canaryctl's certificate (its alert).
    ClientAlert,
    HandshakeTimeout,
    TooManyHandshakes,
    HandshakeFailed,
    /// The node id or cluster is not named by the certificate.
    IdentityMismatch,
    /// A TLS stream whose first request names no node.
    NoNode,
    /// With mTLS, a node id the fleet knows under another cluster: no certificate takes over another
    /// cluster's node.
    NodeOfAnotherCluster,
    /// A report (load, stats, access log) from a node that holds no ADS stream under the same node id and
    /// cluster: only the fleet's Envoys report.
    NoAdsSubscription,
}

impl Refused {
    pub const ALL: [Refused; 13] = [
        Refused::NotTls,
        Refused::TlsVersion,
        Refused::NoCertificate,
        Refused::UnknownCa,
        Refused::BadCertificate,
        Refused::ClientAlert,
        Refused::HandshakeTimeout,
        Refused::TooManyHandshakes,
        Refused::HandshakeFailed,
        Refused::IdentityMismatch,
        Refused::NoNode,
        Refused::NodeOfAnotherCluster,
        Refused::NoAdsSubscription,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refused::NotTls => "not_tls",
            Refused::TlsVersion => "tls_version",
            Refused::NoCertificate => "no_certificate",
            Refused::UnknownCa => "unknown_ca",
            Refused::BadCertificate => "bad_certificate",
            Refused::ClientAlert => "client_alert",
            Refused::HandshakeTimeout => "handshake_timeout",
            Refused::TooManyHandshakes => "too_many_handshakes",
            Refused::HandshakeFailed => "handshake_failed",
            Refused::IdentityMismatch => "identity_mismatch",
            Refused::NoNode => "no_node",
            Refused::NodeOfAnotherCluster => "node_of_another_cluster",
            Refused::NoAdsSubscription => "no_ads_subscription",
        }
    }
}

/// A failed handshake, in words an operator can act on.
fn classify(err: &io::Error) -> (Refused, String) {
    use rustls::Error as E;
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return if err.kind() == io::ErrorKind::UnexpectedEof {
            (
                Refused::HandshakeFailed,
                "closed the connection during the TLS handshake".to_string(),
            )
        } else {
            (Refused::HandshakeFailed, format!("TLS handshake: {err}"))
        };
    };
    match tls {
        E::NoCertificatesPresented => (
            Refused::NoCertificate,
            "presented no client certificate (Envoy: tls_certificates in the canaryctl cluster's UpstreamTlsContext)".to_string(),
        ),
        E::InvalidCertificate(CertificateError::UnknownIssuer) => (
            Refused::UnknownCa,
            "its client certificate is not signed by --xds-client-ca".to_string(),
        ),
        E::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => (
            Refused::BadCertificate,
            "its client certificate has expired".to_string(),
        ),
        E::InvalidCertificate(other) => (
            Refused::BadCertificate,
            format!("its client certificate is refused: {other:?}"),
        ),
        E::PeerIncompatible(rustls::PeerIncompatible::SupportedVersionsExtensionRequired) => (
            Refused::TlsVersion,
            "offers TLS 1.2 at most; canaryctl speaks TLS 1.3 only (Envoy's client default is 1.2: set tls_params: { tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 } in the canaryctl cluster's UpstreamTlsContext)".to_string(),
        ),
        E::PeerIncompatible(_) | E::InappropriateHandshakeMessage { .. } => (
            Refused::TlsVersion,
            format!("cannot agree on TLS 1.3 parameters: {tls}"),
        ),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => (
            Refused::NotTls,
            "did not speak TLS (a plaintext xDS client? canaryctl requires mTLS on this port)".to_string(),
        ),
        E::AlertReceived(alert) => (
            Refused::ClientAlert,
            format!("refused canaryctl's certificate or parameters (TLS alert {alert:?}): check the CA and the name it expects"),
        ),
        other => (Refused::HandshakeFailed, format!("TLS handshake: {other}")),
    }
}

/// Who is on the other end of an xDS connection: tonic puts it in each request's extensions.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// Set on a TLS connection: what its verified certificate allows.
    pub identity: Option<Arc<CertIdentity>>,
}

impl Peer {
    /// The peer of a gRPC request (every connection comes through [`accept`], which sets it).
    pub fn of<T>(request: &tonic::Request<T>) -> Peer {
        request.extensions().get::<Peer>().cloned().unwrap_or(Peer {
            addr: request.remote_addr(),
            identity: None,
        })
    }

    /// Who a report stream speaks for: the node id and cluster its first message names (the peer's address
    /// when it names no node, which no ADS stream holds, so its reports count for nothing).
    pub fn reporter(&self, node: Option<&impl crate::intake::Named>) -> (String, String) {
        match node {
            Some(node) => (node.id().to_string(), node.cluster().to_string()),
            None => (
                self.addr.map(|a| a.to_string()).unwrap_or_default(),
                String::new(),
            ),
        }
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A connection tonic serves: plain TCP (no TLS configured) or TLS with a verified client.
pub struct PeerStream {
    io: Io,
    peer: Peer,
}

impl Connected for PeerStream {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts xDS connections until tonic stops taking them: plain when `tls` is None, else each after a
/// handshake (in its own task, bounded in time and number) that verified the client's certificate.
pub async fn accept(
    listener: TcpListener,
    tls: Option<Arc<TlsState>>,
    server: Arc<Server>,
    incoming: mpsc::Sender<io::Result<PeerStream>>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    eprintln!("canaryctl: xDS accept: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = incoming.closed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &tls else {
            let stream = PeerStream {
                io: Io::Plain(tcp),
                peer: Peer {
                    addr: Some(addr),
                    identity: None,
                },
            };
            if incoming.send(Ok(stream)).await.is_err() {
                return;
            }
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            server.refuse(
                Some(addr),
                Refused::TooManyHandshakes,
                format!("{MAX_HANDSHAKES} TLS handshakes already in progress"),
                None,
            );
            continue;
        };
        let acceptor = tls.acceptor();
        let trust_domain = tls.trust_domain().map(str::to_string);
        let (server, incoming) = (server.clone(), incoming.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            drop(permit);
            let stream = match handshake {
                Err(_) => {
                    let message = format!(
                        "did not finish the TLS handshake within {}",
                        humantime::format_duration(HANDSHAKE_TIMEOUT)
                    );
                    server.refuse(Some(addr), Refused::HandshakeTimeout, message, None);
                    return;
                }
                Ok(Err(err)) => {
                    let (reason, message) = classify(&err);
                    server.refuse(Some(addr), reason, message, None);
                    return;
                }
                Ok(Ok(stream)) => stream,
            };
            let leaf = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first());
            let uris = match leaf.map(|cert| identity::uri_sans(cert)) {
                Some(Ok(uris)) => uris,
                Some(Err(err)) => {
                    server.refuse(Some(addr), Refused::BadCertificate, err, None);
                    return;
                }
                None => {
                    let message = "presented no client certificate".to_string();
                    server.refuse(Some(addr), Refused::NoCertificate, message, None);
                    return;
                }
            };
            let identity = CertIdentity::from_uris(uris, trust_domain.as_deref());
            let stream = PeerStream {
                io: Io::Tls(Box::new(stream)),
                peer: Peer {
                    addr: Some(addr),
                    identity: Some(Arc::new(identity)),
                },
            };
            let _ = incoming.send(Ok(stream)).await;
        });
    }
}
